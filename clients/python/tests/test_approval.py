"""An approval awaited: the agent waits on WatchAccessRequest while alice approves through
the Approvals service, then the agent redeems it."""

from __future__ import annotations

import threading
from typing import List

import pytest

from _util import AGENT_ID, DIGEST, PUSH, claims
from spiffe_broker_client import (
    AccessRequest,
    AccessRequestState,
    ApprovalDenied,
    ApprovalRequired,
    ApprovalTimeout,
    BrokerClient,
    Credential,
    PendingApproval,
)


@pytest.fixture
def alice(broker):
    with BrokerClient(broker.addr, socket=broker.socket("alice")) as c:
        yield c


@pytest.fixture
def bob(broker):
    with BrokerClient(broker.addr, socket=broker.socket("bob")) as c:
        yield c


def test_approval_awaited(agent: BrokerClient, alice: BrokerClient, broker) -> None:
    pending = agent.request(**PUSH)
    assert isinstance(pending, PendingApproval)
    ar = pending.access_request
    assert ar.state is AccessRequestState.PENDING and ar.requester == AGENT_ID
    assert ar.approver_group == "registry-approvers" and ar.threshold == 1
    assert pending.id in {r.id for r in alice.list_access_requests("to_review")}

    # alice approves once the agent is already watching (its first streamed state).
    seen: List[AccessRequest] = []
    approved = threading.Event()
    errors: List[BaseException] = []

    def on_update(r: AccessRequest) -> None:
        seen.append(r)
        if r.state is AccessRequestState.PENDING and not approved.is_set():
            approved.set()

            def approve() -> None:
                try:
                    alice.approve(r.id, "digest matches release notes")
                except BaseException as e:  # surfaced below
                    errors.append(e)

            threading.Thread(target=approve, daemon=True).start()

    cred = agent.wait_for_approval(pending, timeout=60, on_update=on_update)
    assert not errors, errors
    assert [s.state for s in seen][:1] == [AccessRequestState.PENDING]
    assert seen[-1].state is AccessRequestState.APPROVED

    assert isinstance(cred, Credential) and cred.kind == "token"
    assert set(cred.scopes) == {"repository:models/llama:push", "repository:models/llama:pull"}
    assert cred.access_request is not None and cred.access_request.id == pending.id
    reviews = cred.access_request.reviews
    assert [(r.reviewer, r.approve) for r in reviews] == [("spiffe://example.org/ops/alice", True)]
    c = claims(cred.token)
    assert c["jti"] == cred.lease_id and c["intent"]["artifact_digest"] == DIGEST

    # Redeeming again (e.g. a retry) returns the same credential, once.
    again = agent.wait_for_approval(pending.id, timeout=30)
    assert again.lease_id == cred.lease_id
    assert broker.lease(cred.lease_id)["state"] == "active"
    agent.release(cred.lease_id)


def test_approved_request_redeemed_by_a_fresh_client(agent: BrokerClient, alice: BrokerClient,
                                                      broker) -> None:
    """A client that did not make the request (e.g. after a restart) redeems it by id: the
    request is rebuilt from the broker's record and must match the approved digest."""
    pending = agent.request(**PUSH, ttl=300)
    assert isinstance(pending, PendingApproval)
    alice.approve(pending.id, "ok")
    with BrokerClient(broker.addr, socket=broker.socket("deploy-agent")) as fresh:
        cred = fresh.wait_for_approval(pending.id, timeout=30)
    assert cred.lease.profile == "model-registry-push"
    agent.release(cred.lease_id)


def test_approval_denied(agent: BrokerClient, bob: BrokerClient) -> None:
    pending = agent.request(**PUSH)
    assert isinstance(pending, PendingApproval)
    bob.deny(pending.id, "no change window today")
    with pytest.raises(ApprovalDenied) as e:
        agent.wait_for_approval(pending, timeout=30)
    assert "no change window today" in str(e.value)
    assert e.value.access_request.state is AccessRequestState.DENIED


def test_approval_wait_times_out(agent: BrokerClient) -> None:
    pending = agent.request(**PUSH)
    assert isinstance(pending, PendingApproval)
    with pytest.raises(ApprovalTimeout):
        agent.wait_for_approval(pending, timeout=0.5)


def test_lease_needing_approval_raises_unless_asked_to_wait(agent: BrokerClient) -> None:
    with pytest.raises(ApprovalRequired) as e:
        with agent.lease(**PUSH):
            pass  # pragma: no cover - never entered
    assert e.value.access_request.profile == "model-registry-push"
