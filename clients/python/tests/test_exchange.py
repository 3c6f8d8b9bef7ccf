"""Token exchange (RFC 8693): an agent acts for a person; the chain is in the token and
in the answer; it can only narrow; the person's logout revokes what the agent got."""

from __future__ import annotations

import pytest

from _util import AGENT_ID, GPU, claims
from spiffe_broker_client import BrokerClient, Credential, InvalidArgument, PermissionDenied

ALICE = "spiffe://example.org/ops/alice"


def test_an_agent_acts_for_a_person_and_her_logout_ends_it(agent: BrokerClient, broker) -> None:
    with BrokerClient(broker.addr, socket=broker.socket("alice")) as alice:
        session = alice.request("agent-delegation", ["job:submit"], ttl=600)
        assert isinstance(session, Credential) and session.token
        assert claims(session.token)["aud"] == "spiffe://example.org/spiffe-broker"

        cred = agent.exchange(session.token, **GPU)
        assert isinstance(cred, Credential)
        c = claims(cred.token)
        assert c["sub"] == ALICE and c["act"] == {"sub": AGENT_ID}
        assert cred.delegation is not None
        assert (cred.delegation.subject, cred.delegation.subject_type) == (ALICE, "person")
        assert cred.delegation.actors == (AGENT_ID,)
        assert cred.lease.spiffe_id == AGENT_ID and cred.lease.subject == ALICE
        assert cred.lease.parent_lease_id == session.lease_id

        with pytest.raises(InvalidArgument, match="only narrow"):
            agent.exchange(session.token, **dict(GPU, scopes=["job:cancel"]))
        with pytest.raises(InvalidArgument, match="subject_token_type"):
            agent.exchange(session.token, subject_token_type="saml2", **GPU)

        alice.release(session.lease_id)
    assert broker.lease(cred.lease_id)["state"] == "revoked"
    with pytest.raises(PermissionDenied, match="released"):
        agent.exchange(session.token, **GPU)
