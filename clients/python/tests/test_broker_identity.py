"""The broker is authenticated by its SPIFFE ID on every connection, and nothing is sent
(or issued) when the peer is anyone else."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from _util import AGENT_ID, BROKER_ID, GPU
from spiffe_broker_client import (
    BrokerClient,
    BrokerClientError,
    BrokerIdentityMismatch,
    BrokerTLSError,
    Unavailable,
)


def test_wrong_expected_broker_id_refused(broker) -> None:
    before = len(broker.leases_of(AGENT_ID))
    wrong = "spiffe://example.org/not-the-broker"
    with BrokerClient(broker.addr, broker_id=wrong, socket=broker.socket("deploy-agent")) as c:
        with pytest.raises(BrokerIdentityMismatch) as e:
            c.request(**GPU, ttl=60)
    err = e.value
    assert isinstance(err, Unavailable)
    assert err.expected == wrong and err.presented == BROKER_ID
    assert str(err) == (f"IssueCredential: UNAVAILABLE: the peer is not the broker: "
                        f"expected {wrong}, it presented {BROKER_ID}")
    # The request never reached the broker: no lease was issued.
    assert len(broker.leases_of(AGENT_ID)) == before


def test_broker_id_of_another_trust_domain_refused(broker) -> None:
    with pytest.raises(BrokerClientError, match="no trust bundle for other.org"):
        BrokerClient(broker.addr, broker_id="spiffe://other.org/spiffe-broker",
                     socket=broker.socket("deploy-agent"))


class Impostor:
    """A TLS server on loopback that records, per connection, how many bytes it received
    after the handshake in its first read (the request must never be sent to it)."""

    def __init__(self, cert_pem: Path, key_pem: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert_pem), str(key_pem))
        self.ctx.set_alpn_protocols(["h2"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.received: List[int] = []
        self.handshakes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(5)
            n = 0
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    # Act like an HTTP/2 server: its SETTINGS frame first (grpcio waits
                    # for it before it sends a request).
                    tls.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                    # Until the client hangs up, or sends something: then it has leaked.
                    n = len(tls.recv(65536))
            except (OSError, ssl.SSLError):
                pass  # a refused handshake, a reset, or a client that never hangs up
            finally:
                self.received.append(n)

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def test_impostor_with_a_valid_svid_of_another_workload(broker, tmp_path: Path) -> None:
    """Another workload of the same trust domain (its SVID chains to the bundle) poses as
    the broker: refused by ID, and not one byte of the request reaches it."""
    out = tmp_path / "evil"
    subprocess.run([str(broker.binary), "dev", "mint-svid", "spiffe://example.org/evil",
                    "--out", str(out), "--state-dir", str(broker.state)],
                   check=True, capture_output=True, timeout=60)
    imp = Impostor(out / "svid.pem", out / "svid.key")
    try:
        with BrokerClient(imp.addr, socket=broker.socket("deploy-agent")) as c:
            with pytest.raises(BrokerIdentityMismatch) as e:
                c.request(**GPU, ttl=60)
        assert e.value.presented == "spiffe://example.org/evil"
        assert "expected spiffe://example.org/spiffe-broker" in str(e.value)
        assert imp.handshakes >= 1 and imp.received and set(imp.received) == {0}
    finally:
        imp.close()


def _self_signed_broker_impostor(tmp: Path) -> tuple[Path, Path]:
    """A certificate claiming the broker's SPIFFE ID (and DNS:localhost) from a CA that
    is not in the trust bundle."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attacker")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(BROKER_ID), x509.DNSName("localhost")]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_pem, key_pem = tmp / "impostor.pem", tmp / "impostor.key"
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                         + ca.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_impostor_outside_the_trust_bundle(broker, tmp_path: Path) -> None:
    """The right SPIFFE ID from the wrong CA: the chain check refuses it."""
    imp = Impostor(*_self_signed_broker_impostor(tmp_path))
    try:
        with BrokerClient(imp.addr, socket=broker.socket("deploy-agent")) as c:
            with pytest.raises(BrokerTLSError) as e:
                c.request(**GPU, ttl=60)
        assert "does not chain to the trust bundle of example.org" in str(e.value)
        assert not any(imp.received)
    finally:
        imp.close()


def test_nothing_listening(broker) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % port.getsockname()[1]
    port.close()
    with BrokerClient(addr, socket=broker.socket("deploy-agent")) as c:
        with pytest.raises(BrokerTLSError, match="cannot connect to the broker at"):
            c.request(**GPU, ttl=60)


def test_bridge_is_private(agent: BrokerClient) -> None:
    """The plaintext side: a 0700 directory of this user, and connections from any other
    process are dropped unanswered."""
    bridge = agent._bridge
    assert bridge is not None
    st = os.stat(bridge.directory)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    agent.request(**GPU, ttl=60)  # a working connection first
    forwarded = bridge.connections
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
        "try:\n"
        "    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
        "    print(len(s.recv(65536)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, bridge.socket_path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"  # closed (or reset), nothing answered
    assert bridge.connections == forwarded


def test_close_removes_the_bridge(broker) -> None:
    c = BrokerClient(broker.addr, socket=broker.socket("deploy-agent"))
    directory = c._bridge.directory
    assert os.path.isdir(directory)
    c.close()
    c.close()  # idempotent
    assert not os.path.exists(directory)
    with pytest.raises(BrokerClientError, match="closed"):
        c.request(**GPU, ttl=60)
