"""A credential obtained, renewed and released; refusals give clear exceptions."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from _util import AGENT_ID, GPU, claims, x5t_s256
from spiffe_broker_client import (
    BrokerClient,
    Credential,
    FailedPrecondition,
    InvalidArgument,
    LeaseState,
    PermissionDenied,
)


def test_issue_renew_release(agent: BrokerClient, broker) -> None:
    before = datetime.now(timezone.utc)
    cred = agent.request(**GPU, ttl=timedelta(minutes=10))
    assert isinstance(cred, Credential)
    assert cred.kind == "token" and cred.token and cred.token_type == "Bearer"
    assert cred.scopes == ("job:submit",)
    assert cred.lease.state is LeaseState.ACTIVE
    assert cred.receipt is not None and cred.receipt.sequence >= 1
    assert timedelta(minutes=9) < cred.expires_at - before <= timedelta(minutes=10, seconds=2)

    c = claims(cred.token)
    assert c["jti"] == cred.lease_id and c["sub"] == AGENT_ID and c["aud"] == "gpu-scheduler"
    assert c["intent"]["target"] == "queue/a100"
    # Bound to the certificate the client presented (RFC 8705), i.e. its current SVID.
    assert c["cnf"]["x5t#S256"] == x5t_s256(agent.svid_leaf_der)

    renewed = agent.renew(cred.lease_id, ttl=300)
    assert renewed.lease_id == cred.lease_id and renewed.token != cred.token
    assert renewed.lease.renewals == 1
    assert renewed.expires_at < cred.expires_at  # asked for 5 minutes this time
    seen = broker.lease(cred.lease_id)
    assert seen["renewals"] == 1
    assert seen["credential_sha256"] == hashlib.sha256(renewed.token.encode()).hexdigest()

    released = agent.release(cred.lease_id)
    assert released.state is LeaseState.RELEASED and released.end_reason
    assert broker.lease(cred.lease_id)["state"] == "released"

    with pytest.raises(FailedPrecondition) as e:
        agent.renew(cred.lease_id)
    assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION and e.value.rpc == "RenewLease"


def test_secrets_stay_out_of_repr(agent: BrokerClient) -> None:
    cred = agent.request(**GPU, ttl=60)
    assert isinstance(cred, Credential)
    try:
        for text in (repr(cred), str(cred), f"{cred}", repr([cred])):
            assert cred.token not in text and "<redacted>" in text
            assert cred.lease_id in text
    finally:
        agent.release(cred.lease_id)


def test_unknown_profile(agent: BrokerClient) -> None:
    with pytest.raises(InvalidArgument) as e:
        agent.request("no-such-profile", intent_action="a", intent_target="b")
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.reason == 'unknown profile "no-such-profile"'
    assert str(e.value) == 'IssueCredential: INVALID_ARGUMENT: unknown profile "no-such-profile"'


def test_over_ask_refused_with_reason(agent: BrokerClient) -> None:
    with pytest.raises(PermissionDenied) as e:
        agent.request(**dict(GPU, scopes=["cluster:admin"]))
    assert "cluster:admin exceeds the ceiling" in e.value.reason


def test_bad_ttl_rejected_locally(agent: BrokerClient) -> None:
    with pytest.raises(ValueError):
        agent.request(**GPU, ttl=0)


def test_explain_dry_run(agent: BrokerClient) -> None:
    d = agent.explain(**GPU, ttl=7200)
    assert d.decision == "deny" and any("max_ttl" in v for v in d.violations)
    d = agent.explain("model-registry-push", intent_action="push-model",
                      intent_target="models/llama", artifact_digest="sha256:" + "0" * 64,
                      ticket="CHG-1")
    assert d.decision == "require_approval" and d.approver_group == "registry-approvers"
