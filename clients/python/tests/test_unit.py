"""Pieces that need no broker: the peer-certificate check, key files, typed results."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import List, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spiffe_broker_client import _tls
from spiffe_broker_client.client import _split_addr
from spiffe_broker_client.types import Credential, Lease, LeaseState

BROKER = "spiffe://example.org/spiffe-broker"


def _leaf(sans: List[x509.GeneralName], ca: bool = False,
          usage: Optional[x509.KeyUsage] = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    if usage is not None:
        b = b.add_extension(usage, critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


SIGN = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
CA_USAGE = x509.KeyUsage(True, False, False, False, False, True, True, False, False)


def test_peer_check_accepts_exactly_the_broker() -> None:
    assert _tls.peer_problem(_leaf([x509.UniformResourceIdentifier(BROKER),
                                    x509.DNSName("localhost")], usage=SIGN), BROKER) is None


@pytest.mark.parametrize("sans,ca,usage,expected", [
    ([x509.UniformResourceIdentifier("spiffe://example.org/evil")], False, SIGN,
     "spiffe://example.org/evil"),
    ([x509.DNSName("localhost")], False, SIGN, "no URI SAN (no SPIFFE ID); DNS names localhost"),
    ([], False, SIGN, "a certificate without subjectAltName (no SPIFFE ID)"),
    ([x509.UniformResourceIdentifier(BROKER), x509.UniformResourceIdentifier("spiffe://example.org/x")],
     False, SIGN, "2 URI SANs"),
    ([x509.UniformResourceIdentifier(BROKER)], True, CA_USAGE, f"{BROKER} on a CA certificate"),
    ([x509.UniformResourceIdentifier(BROKER)], False, None, f"{BROKER} on a certificate without keyUsage"),
    ([x509.UniformResourceIdentifier(BROKER)], False, CA_USAGE, "keyUsage is not an X.509-SVID leaf's"),
    # A prefix or case variant is another ID.
    ([x509.UniformResourceIdentifier(BROKER + "/x")], False, SIGN, BROKER + "/x"),
])
def test_peer_check_refuses(sans, ca, usage, expected) -> None:
    problem = _tls.peer_problem(_leaf(sans, ca, usage), BROKER)
    assert problem is not None and expected in problem


def test_peer_check_without_certificate() -> None:
    assert _tls.peer_problem(None, BROKER) == "no certificate"
    assert _tls.peer_problem(b"\x30\x00", BROKER) == "a malformed certificate"


@pytest.mark.parametrize("memfd", [True, False])
def test_key_file_exists_only_while_loading(tmp_path: Path, monkeypatch, memfd: bool) -> None:
    if memfd and not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create here")
    monkeypatch.setattr(_tls, "USE_MEMFD", memfd)
    workdir = tmp_path / "d"
    workdir.mkdir(mode=0o700)
    with _tls._secret_file(b"secret", str(workdir)) as path:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 or memfd
        assert Path(path).read_bytes() == b"secret"
        assert (path.startswith("/proc/self/fd/")) == memfd
    assert not os.path.exists(path) or memfd
    assert list(workdir.iterdir()) == []


def test_split_addr() -> None:
    assert _split_addr("broker.internal:8443") == ("broker.internal", 8443)
    assert _split_addr("[::1]:8443") == ("::1", 8443)
    for bad in ("broker", ":8443", "host:port"):
        with pytest.raises(ValueError):
            _split_addr(bad)


def test_secret_credential_repr_hides_values() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    lease = Lease(id="l1", profile="feature-db", spiffe_id="spiffe://example.org/x", scopes=("db:read",),
                  audience="feature-db", state=LeaseState.ACTIVE, issued_at=now, expires_at=now,
                  max_expires_at=now, renewals=0, credential_sha256="")
    cred = Credential(kind="secret", lease_id="l1", scopes=("db:read",), expires_at=now, lease=lease,
                      receipt=None, secret={"username": "v-user", "password": "hunter2"})
    text = repr(cred)
    assert "hunter2" not in text and "v-user" not in text
    assert "password" in text and "username" in text  # the field names, for debugging
