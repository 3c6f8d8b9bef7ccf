"""SVID rotation mid-run (dev SVIDs live 6 s and rotate every 3 s): after the Workload API
hands over a new SVID, new calls present it, which the broker proves by binding the token
to it (`cnf.x5t#S256`). Every wait is on the X509Source's update event, with a timeout."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import List

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from _util import GPU, claims, x5t_s256
from spiffe_broker_client import BrokerClient, Credential

ROTATION_TIMEOUT = 20.0  # two rotations are due within ~6 s


class LeafWatcher:
    """Collects every leaf the source hands out after the one current at start."""

    def __init__(self, client: BrokerClient) -> None:
        self._source = client.x509_source
        self.initial = self._leaf()
        self.new_leaves: List[bytes] = []
        self._cond = threading.Condition()
        self._source.subscribe_for_updates(self._update)

    def _leaf(self) -> bytes:
        return self._source.get_x509_context().default_svid.leaf.public_bytes(serialization.Encoding.DER)

    def _update(self) -> None:
        leaf = self._leaf()
        with self._cond:
            if leaf != self.initial and leaf not in self.new_leaves:
                self.new_leaves.append(leaf)
                self._cond.notify_all()

    def new_hashes(self) -> set:
        """x5t#S256 of every new leaf, the current one included: the client reads the
        source on every call, so it may present a leaf before our callback has run."""
        self._update()
        with self._cond:
            return {x5t_s256(leaf) for leaf in self.new_leaves}

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.new_leaves) >= count, ROTATION_TIMEOUT)

    def close(self) -> None:
        self._source.unsubscribe_for_updates(self._update)


def test_new_calls_present_the_rotated_svid(rotating_broker) -> None:
    with BrokerClient(rotating_broker.addr, socket=rotating_broker.socket("deploy-agent")) as c:
        watcher = LeafWatcher(c)
        try:
            before = c.request(**GPU, ttl=600)
            assert isinstance(before, Credential)
            assert claims(before.token)["cnf"]["x5t#S256"] == x5t_s256(watcher.initial)
            generation = c.generation
            connections = c._bridge.connections

            assert watcher.wait_for(1), "no SVID rotation within the timeout"
            after = c.request(**GPU, ttl=600)
            assert isinstance(after, Credential)
            cnf = claims(after.token)["cnf"]["x5t#S256"]
            assert cnf != x5t_s256(watcher.initial)
            assert cnf in watcher.new_hashes()
            assert c.generation > generation
            assert c._bridge.connections > connections  # a new TLS connection, new SVID
            # A lease from before the rotation renews on the new connection (same holder ID)
            # and its fresh token is bound to the new certificate.
            renewed = c.renew(before.lease_id, ttl=600)
            assert claims(renewed.token)["cnf"]["x5t#S256"] in watcher.new_hashes()

            # Past the first SVID's expiry (two rotations later), calls still work: they
            # never travel on a connection that presented an expired certificate.
            assert watcher.wait_for(2), "no second SVID rotation within the timeout"
            first_expiry = x509.load_der_x509_certificate(watcher.initial).not_valid_after_utc
            if datetime.now(timezone.utc) <= first_expiry:
                assert watcher.wait_for(3), "no third SVID rotation within the timeout"
            assert datetime.now(timezone.utc) > first_expiry
            late = c.request(**GPU, ttl=600)
            assert isinstance(late, Credential)
            assert claims(late.token)["cnf"]["x5t#S256"] in watcher.new_hashes()
            for cred in (before, after, late):
                c.release(cred.lease_id)
        finally:
            watcher.close()


def test_stream_open_across_a_rotation_survives(rotating_broker) -> None:
    """A call running on the old channel (here a watch) is not cut by the rotation: the
    old channel is closed only when its last call ends."""
    from _util import PUSH

    with BrokerClient(rotating_broker.addr, socket=rotating_broker.socket("deploy-agent")) as agent, \
            BrokerClient(rotating_broker.addr, socket=rotating_broker.socket("alice")) as alice:
        watcher = LeafWatcher(agent)
        try:
            pending = agent.request(**PUSH)
            rotated_during_wait = []

            def on_update(r) -> None:
                # First state streamed: wait (bounded) for a rotation, then approve.
                if not rotated_during_wait:
                    rotated_during_wait.append(watcher.wait_for(1))
                    threading.Thread(target=alice.approve, args=(r.id, "ok"), daemon=True).start()

            cred = agent.wait_for_approval(pending, timeout=60, on_update=on_update)
            assert rotated_during_wait == [True]
            assert agent.generation >= 2
            assert not agent._retired  # the old channel was closed once the watch ended
            # Redeemed on a new connection, with the new SVID (grpcio must not have reused
            # the old channel's connection, which the watch kept open).
            assert claims(cred.token)["cnf"]["x5t#S256"] in watcher.new_hashes()
            agent.release(cred.lease_id)
        finally:
            watcher.close()
