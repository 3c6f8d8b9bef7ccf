"""client.lease(): renewed in the background while the block runs, released on exit; a
refused renewal surfaces. The lease state is checked through the broker's own CLI as the
platform admin (`ops/root`)."""

from __future__ import annotations

import hashlib
import threading
from typing import List

import pytest

from _util import GPU
from spiffe_broker_client import BrokerClient, FailedPrecondition, LeaseLost, ManagedLease


def test_lease_renews_in_background_and_releases_on_exit(agent: BrokerClient, broker) -> None:
    # A 3-second credential renewed at half its lifetime: without the background renewals
    # it would have expired long before the two renewals below are observed.
    with agent.lease(**GPU, ttl=3) as held:
        assert isinstance(held, ManagedLease)
        first = held.credential
        lease_id = held.lease_id
        assert broker.lease(lease_id)["state"] == "active"
        assert held.wait_renewed(2, timeout=20), held.error
        current = held.credential
        assert current.lease_id == lease_id and current.token != first.token
        seen = broker.lease(lease_id)
        assert seen["state"] == "active" and seen["renewals"] >= 2
        # The broker's record is of the credential the block holds now (or a newer one).
        assert held.renewals >= 2
        if held.renewals == seen["renewals"]:
            assert seen["credential_sha256"] == hashlib.sha256(current.token.encode()).hexdigest()
    after = broker.lease(lease_id)
    assert after["state"] == "released" and after["end_reason"] == "released by holder"


def test_revoked_lease_surfaces(agent: BrokerClient, broker) -> None:
    lost: List[BaseException] = []
    called = threading.Event()

    def on_lost(e: BaseException) -> None:
        lost.append(e)
        called.set()

    with pytest.raises(LeaseLost) as exit_error:
        with agent.lease(**GPU, ttl=3, on_lost=on_lost) as held:
            broker.cli("root", "revoke", "--lease", held.lease_id, "--reason", "test: runner compromised")
            assert called.wait(timeout=20)
            with pytest.raises(LeaseLost) as e:
                held.credential
            assert isinstance(e.value.__cause__, FailedPrecondition)
            assert held.error is e.value
            lease_id = held.lease_id
    # Leaving the block raised it too (the block itself raised nothing).
    assert exit_error.value is lost[0]
    assert exit_error.value.lease_id == lease_id
    assert broker.lease(lease_id)["state"] == "revoked"


def test_block_error_wins_and_lease_is_released(agent: BrokerClient, broker) -> None:
    with pytest.raises(ZeroDivisionError):
        with agent.lease(**GPU, ttl=60) as held:
            lease_id = held.lease_id
            1 / 0
    assert broker.lease(lease_id)["state"] == "released"
