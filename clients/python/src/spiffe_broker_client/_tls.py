"""TLS material for reaching the broker: an ``ssl.SSLContext`` presenting the current
X.509-SVID, and the check of the broker's SPIFFE ID on the peer certificate.

Why not let OpenSSL check the peer's name: SPIFFE identifies servers by the URI SAN
(``spiffe://…``), which neither OpenSSL's host name check nor grpcio's can match. The
context therefore verifies the chain only (``CERT_REQUIRED``, ``check_hostname=False``)
against the bundle of the *broker's* trust domain, and :func:`peer_problem` then requires
exactly one URI SAN equal to the expected ID before a single byte is sent.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, X509Source

from .errors import BrokerClientError


@dataclass(frozen=True)
class TlsMaterial:
    """One SSLContext and what it was built from (to notice rotations)."""

    context: ssl.SSLContext
    spiffe_id: str
    leaf_der: bytes
    bundle_der: frozenset[bytes]


def snapshot(source: X509Source, broker_id: SpiffeId) -> tuple[bytes, frozenset[bytes]]:
    """The current leaf (DER) and the broker trust domain's authorities (DER): cheap
    enough to compare on every call."""
    try:
        ctx = source.get_x509_context()
    except Exception as e:  # py-spiffe raises its own X509SourceError
        raise BrokerClientError(f"no SVID from the Workload API: {e}") from e
    leaf = ctx.default_svid.leaf.public_bytes(serialization.Encoding.DER)
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(broker_id.trust_domain)
    authorities = frozenset(
        a.public_bytes(serialization.Encoding.DER) for a in (bundle.x509_authorities if bundle else ())
    )
    return leaf, authorities


def build(source: X509Source, broker_id: SpiffeId, workdir: str) -> TlsMaterial:
    """An SSLContext presenting the source's current SVID and trusting only the bundle
    of the broker's trust domain.

    Only that bundle: with federation the source also holds other trust domains'
    authorities, and none of those may vouch for an ``example.org`` broker.
    """
    try:
        ctx = source.get_x509_context()
    except Exception as e:
        raise BrokerClientError(f"no SVID from the Workload API: {e}") from e
    svid = ctx.default_svid
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(broker_id.trust_domain)
    if bundle is None or not bundle.x509_authorities:
        raise BrokerClientError(
            f"the Workload API gave no trust bundle for {broker_id.trust_domain}, "
            f"the broker's trust domain"
        )
    pem = serialization.Encoding.PEM
    cadata = "".join(a.public_bytes(pem).decode("ascii") for a in bundle.x509_authorities)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the SPIFFE ID is checked instead (peer_problem)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cadata)
    context.set_alpn_protocols(["h2"])

    # ssl can only load a key from a file. It is written encrypted under a one-time
    # passphrase that lives only in this frame, to an anonymous memory file when the OS
    # has them, else a 0600 file in the client's 0700 directory, removed right away.
    passphrase = secrets.token_bytes(32)
    blob = svid.private_key.private_bytes(
        pem,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    ) + b"".join(c.public_bytes(pem) for c in svid.cert_chain)
    with _secret_file(blob, workdir) as path:
        context.load_cert_chain(path, password=passphrase)

    return TlsMaterial(
        context=context,
        spiffe_id=str(svid.spiffe_id),
        leaf_der=svid.leaf.public_bytes(serialization.Encoding.DER),
        bundle_der=frozenset(a.public_bytes(serialization.Encoding.DER) for a in bundle.x509_authorities),
    )


# Tests flip this to exercise the file fallback where memfd_create exists.
USE_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _secret_file(data: bytes, workdir: str) -> Iterator[str]:
    """A path holding ``data`` for as long as the block runs, then gone."""
    if USE_MEMFD:
        fd = os.memfd_create("spiffe-broker-client-svid", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="svid-", suffix=".pem", dir=workdir)  # mode 0600
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def peer_problem(leaf_der: Optional[bytes], expected: str) -> Optional[str]:
    """What is wrong with the broker's leaf certificate, as "what it presented", or None
    when it is an X.509-SVID for exactly ``expected``.

    The chain was verified by the handshake; this adds what SPIFFE requires of the leaf
    (and what the broker's own Rust client checks): exactly one URI SAN, equal to the
    expected ID; not a CA; keyUsage with digitalSignature and without certificate or
    CRL signing.
    """
    if not leaf_der:
        return "no certificate"
    try:
        cert = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return "a malformed certificate"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "a certificate without subjectAltName (no SPIFFE ID)"
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        dns = san.get_values_for_type(x509.DNSName)
        return "no URI SAN (no SPIFFE ID)" + (f"; DNS names {', '.join(dns)}" if dns else "")
    if len(uris) > 1:
        return f"{len(uris)} URI SANs ({', '.join(uris)}); an X.509-SVID has exactly one"
    if uris[0] != expected:
        return uris[0]
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return f"{uris[0]} on a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return f"{uris[0]} on a certificate without keyUsage"
    if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
        return f"{uris[0]} on a certificate whose keyUsage is not an X.509-SVID leaf's"
    return None
