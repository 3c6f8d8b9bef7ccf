"""examples/stock_grpcio.py (documented in docs/clients.md) against a real broker, and
what stock grpcio cannot check: another workload's SVID that carries the broker's DNS name
is accepted as the broker by grpcio, refused by spiffe_broker_client."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from _util import GPU
from spiffe_broker_client import BrokerClient, BrokerIdentityMismatch
from test_broker_identity import Impostor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stock_grpcio.py"


def run_example(socket: str, addr: str) -> subprocess.CompletedProcess:
    # The same interpreter and environment: spiffe_broker_client.proto comes from the
    # installed wheel in CI, from PYTHONPATH=src in a source checkout.
    env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=socket, SPIFFE_BROKER_ADDR=addr)
    return subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_stock_grpcio_example(broker) -> None:
    out = run_example(broker.socket("deploy-agent"), broker.addr)
    assert out.returncode == 0, out.stderr
    print(out.stdout.strip())
    assert out.stdout.startswith("lease ") and "scopes ['job:submit']" in out.stdout
    lease_id = out.stdout.split()[1]
    assert broker.lease(lease_id)["spiffe_id"] == "spiffe://example.org/ci/deploy-agent"


def _workload_svid_with_dns_localhost(state: Path, tmp: Path) -> tuple[Path, Path]:
    """What any workload of the trust domain may hold: an SVID from the trust domain's CA
    for *its own* ID, with a DNS SAN (SPIRE: a registration entry's dnsNames)."""
    ca = x509.load_pem_x509_certificate((state / "dev-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((state / "dev-ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("spiffe://example.org/ml/model-runtime"),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_pem, key_pem = tmp / "runtime.pem", tmp / "runtime.key"
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_what_stock_grpcio_cannot_check(broker, tmp_path: Path) -> None:
    imp = Impostor(*_workload_svid_with_dns_localhost(broker.state, tmp_path))
    try:
        # Stock grpcio: the host name matches, so the request is sent to the impostor.
        out = run_example(broker.socket("deploy-agent"), imp.addr)
        assert out.returncode != 0  # the impostor answers nothing
        assert any(imp.received), "stock grpcio did not send the request to the impostor"
        sent = list(imp.received)

        # The package: refused by SPIFFE ID, before any byte.
        with BrokerClient(imp.addr, socket=broker.socket("deploy-agent")) as c:
            with pytest.raises(BrokerIdentityMismatch) as e:
                c.request(**GPU, ttl=60)
        assert e.value.presented == "spiffe://example.org/ml/model-runtime"
        assert imp.received[len(sent):] and not any(imp.received[len(sent):])
    finally:
        imp.close()


def test_docs_show_the_example_verbatim() -> None:
    """docs/clients.md's stock grpcio block is this file's code (after the docstring)."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "clients.md").read_text("utf-8")
    code = EXAMPLE.read_text("utf-8")
    code = code[code.index("import os\n"):]
    assert f"```python\n{code}```\n" in doc
