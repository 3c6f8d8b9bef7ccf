#!/usr/bin/env python3
"""Independent cross-implementation check of spiffe-broker.

Nothing here shares code with the Rust implementation: the SVID comes from the
Workload API through py-spiffe, PEM/DER handling is done by `cryptography`, and
the broker's token is verified by PyJWT against the JWKS found through OIDC
discovery. Every Workload API call uses stock py-spiffe
(`WorkloadApiClient(socket_path="unix://...")`) exactly as a Python workload
would: gRPC C-core >= 1.57 sends the socket path as `:authority`, and the dev
Workload API accepts that.

Steps:
  1. start `spiffe-broker dev` on two free loopback ports in a temp state dir
     and wait (bounded) for its `ready` line;
  2. fetch the deploy-agent X.509-SVID and bundle with py-spiffe, check the ID,
     write cert/PKCS#8 key/bundle PEM files;
  3. run `spiffe-broker request` with those files and parse its JSON;
  4. fetch discovery + JWKS, verify the token with PyJWT (ES256, audience,
     issuer, exp/iat/nbf required), check the claims including
     cnf["x5t#S256"] == b64url(sha256(leaf DER)) computed here;
  5. negative checks: one altered payload byte, wrong audience;
  6. fetch a JWT-SVID with py-spiffe and validate it both locally against the
     JWT bundle and through the Workload API's ValidateJWTSVID.

Usage:  python3 tests/crosscheck/crosscheck.py
Env:    SPIFFE_BROKER_BIN  broker binary (default: <repo>/target/debug/spiffe-broker)
        CROSSCHECK_READY_TIMEOUT  seconds to wait for `ready` (default 60)
        CROSSCHECK_KEEP_STATE=1   keep the temp state dir (path is printed)

The last line is `N passed, M failed`; the exit code is non-zero on any failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROKER_ID = "spiffe://example.org/spiffe-broker"
AGENT_ID = "spiffe://example.org/ci/deploy-agent"
TRUST_DOMAIN = "example.org"
PROFILE = "gpu-scheduler-submit"
AUDIENCE = "gpu-scheduler"
SCOPE = "job:submit"
TTL_SECONDS = 600
INTENT = {"action": "submit-training", "target": "queue/a100"}
READY_TIMEOUT = float(os.environ.get("CROSSCHECK_READY_TIMEOUT", "60"))
CALL_TIMEOUT = 30.0


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  PASS  {name}")
        else:
            self.failed += 1
            print(f"  FAIL  {name}" + (f": {detail}" if detail else ""))
        return ok

    def expect_raises(self, name: str, exc_types, fn) -> None:
        try:
            fn()
        except exc_types as e:  # the expected failure
            self.check(name, True)
            print(f"        (rejected as expected: {type(e).__name__}: {e})")
        except Exception as e:  # noqa: BLE001 - any other error is a failure
            self.check(name, False, f"wrong error {type(e).__name__}: {e}")
        else:
            self.check(name, False, "was accepted")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as r:
        return json.loads(r.read().decode("utf-8"))


class Broker:
    """`spiffe-broker dev` as a child process."""

    def __init__(self, binary: Path, state_dir: Path, grpc: str, http: str) -> None:
        self.stderr_path = state_dir.parent / "broker.stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        self.stdout_lines: list[str] = []
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(
            [str(binary), "dev", "--state-dir", str(state_dir),
             "--grpc-addr", grpc, "--http-addr", http],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"broker printed no `ready` within {timeout:.0f}s")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(f"broker exited with {self.proc.returncode} before `ready`")
            if line.strip() == "ready":
                return

    def stderr_tail(self, n: int = 20) -> str:
        try:
            lines = self.stderr_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()


def check_reflection(r: Report, grpc_port: int, files: Path) -> None:
    """grpcio's own reflection client lists and describes the broker's services over mTLS,
    with py-spiffe's SVID files; without a client certificate the handshake is refused."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    print("[gRPC reflection with grpcio-reflection's client]")
    root = (files / "bundle.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=root,
                                         private_key=(files / "svid.key").read_bytes(),
                                         certificate_chain=(files / "svid.pem").read_bytes())

    def ask(credentials, *requests):
        with grpc.secure_channel(f"localhost:{grpc_port}", credentials) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            return list(stub.ServerReflectionInfo(iter(requests), timeout=CALL_TIMEOUT))

    answers = ask(creds, reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(
                      file_containing_symbol="spiffe_broker.v1.CredentialBroker"))
    names = {s.name for s in answers[0].list_services_response.service}
    print(f"        services: {sorted(names)}")
    r.check("reflection lists the four broker services and health, not the Workload API",
            {"spiffe_broker.v1.CredentialBroker", "spiffe_broker.v1.Admin",
             "spiffe_broker.v1.Approvals", "spiffe_broker.v1.RelyingParty",
             "grpc.health.v1.Health"} <= names and "SpiffeWorkloadAPI" not in names,
            repr(sorted(names)))
    from google.protobuf import descriptor_pb2
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        answers[1].file_descriptor_response.file_descriptor_proto[0])
    methods = {m.name for svc in fd.service if svc.name == "CredentialBroker" for m in svc.method}
    r.check("reflection describes CredentialBroker.IssueCredential",
            "IssueCredential" in methods, repr(sorted(methods)))
    anonymous = grpc.ssl_channel_credentials(root_certificates=root)
    r.expect_raises("reflection without a client SVID is refused", grpc.RpcError,
                    lambda: ask(anonymous, reflection_pb2.ServerReflectionRequest(list_services="")))


def check_listing_yaml(r: Report, binary: Path, state: Path, grpc_addr: str) -> None:
    """`leases --output yaml` reads back (PyYAML) as exactly what `--output json` prints."""
    import yaml

    print("[leases --output yaml read by PyYAML]")
    env = {k: v for k, v in os.environ.items() if k not in ("SPIFFE_BROKER_ADDR", "SPIFFE_BROKER_ID")}
    env["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{state / 'workloads' / 'root.sock'}"
    env["RUST_LOG"] = "warn"

    def leases(fmt: str) -> str:
        p = subprocess.run([str(binary), "leases", "--broker", grpc_addr, "--output", fmt],
                           capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(p.stderr.decode("utf-8", "replace"))
        return p.stdout.decode()

    as_json = [json.loads(line) for line in leases("json").splitlines() if line.strip()]
    as_yaml = yaml.safe_load(leases("yaml"))
    print(f"        {len(as_json)} leases")
    r.check("leases --output yaml == --output json (PyYAML safe_load)",
            bool(as_json) and as_yaml == as_json, f"{as_yaml!r} != {as_json!r}")


def check_delegation(r: Report, binary: Path, state: Path, grpc_addr: str, verify) -> None:
    """Token exchange (RFC 8693) through the CLI, each token checked by PyJWT: `sub` is
    the person, `act` nests the actors with the current one outermost, `may_act` binds."""
    print("[token exchange: act chains of one, two and three actors, verified by PyJWT]")
    alice = "spiffe://example.org/ops/alice"
    runtime = "spiffe://example.org/ml/model-runtime"
    provisioner = "spiffe://example.org/gpu/provisioner"

    def cli(who: str, *args: str, token: str | None = None):
        env = {k: v for k, v in os.environ.items() if k not in ("SPIFFE_BROKER_ADDR", "SPIFFE_BROKER_ID")}
        env["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{state / 'workloads' / (who + '.sock')}"
        env["RUST_LOG"] = "warn"
        cmd = [str(binary), *args, "--broker", grpc_addr]
        if token is not None:
            cmd += ["--subject-token", "-"]
        p = subprocess.run(cmd, capture_output=True, env=env, timeout=60,
                           input=(token or "").encode())
        out = p.stdout.decode("utf-8", "replace").strip()
        return p.returncode, (json.loads(out) if p.returncode == 0 and out else None), \
            p.stderr.decode("utf-8", "replace")

    def chain(claims: dict) -> list:
        out, at = [], claims.get("act")
        while isinstance(at, dict):
            out.append(at.get("sub"))
            at = at.get("act")
        return out

    rc, root, err = cli("alice", "request", "--profile", "agent-delegation", "--scope", "job:submit",
                        "--scope", "job:read", "--ttl", "30m")
    if not r.check("alice gets a token for agents (audience: the broker)", rc == 0, err):
        return
    root_claims = verify(root["token"], BROKER_ID)
    r.check("PyJWT: alice's token is hers, for the broker, no act",
            root_claims.get("sub") == alice and "act" not in root_claims, repr(root_claims))
    pass_on = ["exchange", "--profile", "agent-delegation", "--scope", "job:submit", "--scope", "job:read"]
    gpu = ["exchange", "--profile", PROFILE, "--scope", SCOPE, "--intent-action", INTENT["action"],
           "--intent-target", INTENT["target"]]
    rc, one, err = cli("deploy-agent", *gpu, token=root["token"])
    if not r.check("deploy-agent exchanges alice's token for a GPU token", rc == 0, err):
        return
    c1 = verify(one["token"], AUDIENCE)
    r.check("PyJWT: one actor: sub alice, act = [deploy-agent]",
            c1.get("sub") == alice and chain(c1) == [AGENT_ID], repr(c1))
    r.check("PyJWT: the exchanged token never outlives the subject token",
            c1["exp"] <= root_claims["exp"], f"{c1['exp']} > {root_claims['exp']}")
    rc, mid, err = cli("deploy-agent", *pass_on, token=root["token"])
    rc2, two_pass, err2 = cli("model-runtime", *pass_on, token=mid["token"] if mid else "")
    rc3, three, err3 = cli("provisioner", *gpu, token=two_pass["token"] if two_pass else "")
    rc4, two, err4 = cli("model-runtime", *gpu[:1], "--profile", "agent-delegation", "--scope", "job:read",
                         token=mid["token"] if mid else "")
    if not r.check("chains of two and three actors issued", rc == rc2 == rc3 == rc4 == 0,
                   "\n".join([err, err2, err3, err4])):
        return
    c2 = verify(two["token"], BROKER_ID)
    r.check("PyJWT: two actors: act = [model-runtime, deploy-agent] (current outermost)",
            c2.get("sub") == alice and chain(c2) == [runtime, AGENT_ID], repr(c2))
    c3 = verify(three["token"], AUDIENCE)
    r.check("PyJWT: three actors: act = [provisioner, model-runtime, deploy-agent]",
            c3.get("sub") == alice and chain(c3) == [provisioner, runtime, AGENT_ID], repr(c3))
    r.check("narrowing: the two-actor token has only job:read", c2.get("scope") == "job:read", repr(c2))
    rc, full, err = cli("provisioner", *pass_on, token=two_pass["token"])
    r.check("PyJWT: a broker-audience token with three actors",
            rc == 0 and len(chain(verify(full["token"], BROKER_ID))) == 3, err)
    rc, _, err = cli("root", *gpu, token=full["token"] if full else "")
    r.check("a fourth actor is refused (max_chain_depth 3)", rc != 0 and "too long" in err, err)
    rc, _, err = cli("deploy-agent", *gpu, token=two_pass["token"])
    r.check("an actor already in the chain is refused", rc != 0 and "cycle" in err, err)

    rc, bound, err = cli("alice", "request", "--profile", "agent-delegation", "--scope", "job:submit",
                         "--may-act", provisioner)
    if not r.check("alice names who may act for her (may_act)", rc == 0, err):
        return
    r.check("PyJWT: may_act.sub is the provisioner",
            verify(bound["token"], BROKER_ID).get("may_act") == {"sub": provisioner})
    rc, _, err = cli("deploy-agent", *gpu, token=bound["token"])
    r.check("may_act enforced: deploy-agent refused", rc != 0 and "may_act" in err, err)
    rc, ok, err = cli("provisioner", *gpu, token=bound["token"])
    r.check("may_act enforced: the provisioner may",
            rc == 0 and chain(verify(ok["token"], AUDIENCE)) == [provisioner], err)


def run(r: Report) -> None:
    # Imported here so a missing package gives one clear message.
    try:
        import jwt
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from spiffe import JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient
    except ImportError as e:
        r.check("dependencies importable", False,
                f"{e}; pip install -r {Path(__file__).with_name('requirements.txt')}")
        return

    binary = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.is_file():
        r.check("broker binary exists", False, f"{binary} not found (cargo build --bin spiffe-broker)")
        return

    tmp = Path(tempfile.mkdtemp(prefix="spiffe-broker-xc-"))
    state = tmp / "state"
    files = tmp / "client"
    files.mkdir()
    grpc_port = free_port()
    http_port = free_port()
    while http_port == grpc_port:
        http_port = free_port()
    grpc_addr = f"127.0.0.1:{grpc_port}"
    http_addr = f"127.0.0.1:{http_port}"
    print(f"broker: {binary}")
    print(f"state:  {state}   gRPC {grpc_addr}   HTTP {http_addr}")

    broker = None
    try:
        broker = Broker(binary, state, grpc_addr, http_addr)
        try:
            broker.wait_ready(READY_TIMEOUT)
            r.check("broker dev printed `ready`", True)
        except RuntimeError as e:
            r.check("broker dev printed `ready`", False, str(e))
            return

        # ---- X.509-SVID through py-spiffe --------------------------------------
        print("[x509-svid via py-spiffe]")
        sock = state / "workloads" / "deploy-agent.sock"
        r.check("deploy-agent Workload API socket exists", sock.exists(), str(sock))
        # The stock py-spiffe client, exactly as a Python workload would use it.
        client = WorkloadApiClient(socket_path=f"unix://{sock}", default_timeout=CALL_TIMEOUT)
        try:
            try:
                svid = client.fetch_x509_svid()
            except Exception as e:  # noqa: BLE001
                r.check("stock py-spiffe client fetches an X.509-SVID", False,
                        f"{type(e).__name__}: {e}")
                return
            r.check("stock py-spiffe client fetches an X.509-SVID", True)
            ctx = client.fetch_x509_context()
            r.check("fetched SVID SPIFFE ID is the deploy agent",
                    str(svid.spiffe_id) == AGENT_ID, f"got {svid.spiffe_id}")
            leaf = svid.leaf
            chain = svid.cert_chain
            print(f"        leaf serial {leaf.serial_number:x}, chain length {len(chain)}, "
                  f"valid {leaf.not_valid_before_utc:%H:%M:%S}..{leaf.not_valid_after_utc:%H:%M:%S} UTC")
            r.check("SVID private key matches the leaf public key",
                    svid.private_key.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                    == leaf.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

            bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
            r.check("Workload API serves an X.509 bundle for example.org", bundle is not None)
            authorities = list(bundle.x509_authorities) if bundle else []
            file_cas = x509.load_pem_x509_certificates((state / "bundle.pem").read_bytes())
            der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
            r.check("Workload API bundle == DIR/bundle.pem",
                    sorted(map(der, authorities)) == sorted(map(der, file_cas)),
                    f"{len(authorities)} vs {len(file_cas)} certs")
            issuer = chain[1] if len(chain) > 1 else None
            roots = [c for c in authorities if c.subject == (issuer or leaf).issuer]
            try:
                (issuer or leaf).verify_directly_issued_by(roots[0])
                if issuer is not None:
                    leaf.verify_directly_issued_by(issuer)
                r.check("leaf chains to the bundle (signature checked by cryptography)", True)
            except Exception as e:  # noqa: BLE001
                r.check("leaf chains to the bundle (signature checked by cryptography)", False, repr(e))

            # Write PEM files for the CLI. The cert file holds the chain, leaf first
            # (with a CA-issued leaf, as in dev, that is the leaf alone).
            cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            key_pem = svid.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            bundle_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
            (files / "svid.pem").write_bytes(cert_pem)
            (files / "svid.key").write_bytes(key_pem)
            os.chmod(files / "svid.key", 0o600)
            (files / "bundle.pem").write_bytes(bundle_pem)
            r.check("key written as PKCS#8 PEM", key_pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
            leaf_der = leaf.public_bytes(serialization.Encoding.DER)
            expected_x5t = b64url(hashlib.sha256(leaf_der).digest())
            print(f"        x5t#S256 of leaf (Python): {expected_x5t}")

            # ---- the broker's CLI with those files --------------------------------
            print("[spiffe-broker request with py-spiffe's files]")
            env = {k: v for k, v in os.environ.items()
                   if k not in ("SPIFFE_ENDPOINT_SOCKET", "SPIFFE_BROKER_ADDR", "SPIFFE_BROKER_ID")}
            env["RUST_LOG"] = "warn"
            cmd = [str(binary), "request", "--profile", PROFILE, "--scope", SCOPE, "--ttl", "10m",
                   "--intent-action", INTENT["action"], "--intent-target", INTENT["target"],
                   "--broker", grpc_addr, "--svid-cert", str(files / "svid.pem"),
                   "--svid-key", str(files / "svid.key"), "--bundle", str(files / "bundle.pem")]
            t0 = int(time.time())
            p = subprocess.run(cmd, capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
            t1 = int(time.time())
            out = p.stdout.decode("utf-8", "replace").strip()
            if not r.check("request exited 0", p.returncode == 0,
                           f"rc={p.returncode} stderr={p.stderr.decode('utf-8', 'replace').strip()}"):
                return
            try:
                issued = json.loads(out)
            except json.JSONDecodeError as e:
                r.check("request printed one JSON object", False, f"{e}: {out!r}")
                return
            r.check("request printed one JSON object", isinstance(issued, dict))
            token = issued.get("token", "")
            lease_id = issued.get("lease_id", "")
            print(f"        lease_id {lease_id}, scopes {issued.get('scopes')}, "
                  f"expires_at_unix {issued.get('expires_at_unix')}, key_id {issued.get('key_id')}")
            r.check("response has token and lease_id", bool(token) and bool(lease_id))
            r.check("response scopes == [job:submit]", issued.get("scopes") == [SCOPE], repr(issued.get("scopes")))
            r.check("response spiffe_id is the deploy agent", issued.get("spiffe_id") == AGENT_ID,
                    repr(issued.get("spiffe_id")))

            check_reflection(r, grpc_port, files)
            check_listing_yaml(r, binary, state, grpc_addr)

            # ---- discovery, JWKS, PyJWT verification -------------------------------
            print("[token verified by PyJWT]")
            disc = http_json(f"http://{http_addr}/.well-known/openid-configuration")
            iss = disc.get("issuer")
            jwks_uri = disc.get("jwks_uri")
            print(f"        issuer {iss}, jwks_uri {jwks_uri}")
            r.check("discovery lists ES256", "ES256" in disc.get("id_token_signing_alg_values_supported", []))
            jwks = http_json(jwks_uri)
            keys = jwks.get("keys", [])
            # EC P-256 keys (ES256 tokens), and an RSA key (RS256, slurm profiles); all
            # public (no private members) and named.
            r.check("JWKS has keys, each public EC P-256 (ES256) or RSA (RS256) with kid",
                    bool(keys) and all(k.get("kid") and not ({"d", "p", "q", "dp", "dq", "qi"} & set(k))
                                       and ((k.get("kty") == "EC" and k.get("crv") == "P-256"
                                             and k.get("alg") == "ES256")
                                            or (k.get("kty") == "RSA" and k.get("alg") == "RS256"))
                                       for k in keys), json.dumps(keys))
            header = jwt.get_unverified_header(token)
            r.check("token header alg ES256 and kid in JWKS",
                    header.get("alg") == "ES256" and header.get("kid") in {k.get("kid") for k in keys},
                    repr(header))
            r.check("token kid == response key_id", header.get("kid") == issued.get("key_id"))

            jwk_client = jwt.PyJWKClient(jwks_uri, cache_keys=False, timeout=int(CALL_TIMEOUT))
            signing_key = jwk_client.get_signing_key_from_jwt(token)
            r.check("JWKS key is an EC P-256 public key",
                    isinstance(signing_key.key, ec.EllipticCurvePublicKey)
                    and signing_key.key.curve.name == "secp256r1")

            def verify(tok: str, aud: str):
                return jwt.decode(tok, signing_key.key, algorithms=["ES256"], audience=aud, issuer=iss,
                                  options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]})

            try:
                claims = verify(token, AUDIENCE)
                r.check("PyJWT verifies signature/aud/iss/exp/iat/nbf", True)
            except jwt.PyJWTError as e:
                r.check("PyJWT verifies signature/aud/iss/exp/iat/nbf", False, f"{type(e).__name__}: {e}")
                return
            print("        claims " + json.dumps(claims, sort_keys=True))
            r.check("sub == deploy agent", claims.get("sub") == AGENT_ID, repr(claims.get("sub")))
            r.check("aud == gpu-scheduler", claims.get("aud") == AUDIENCE, repr(claims.get("aud")))
            r.check("scope == job:submit", claims.get("scope") == SCOPE, repr(claims.get("scope")))
            r.check("jti == lease_id", claims.get("jti") == lease_id, f"{claims.get('jti')} vs {lease_id}")
            r.check("profile == gpu-scheduler-submit", claims.get("profile") == PROFILE, repr(claims.get("profile")))
            r.check("intent == {submit-training, queue/a100}", claims.get("intent") == INTENT,
                    repr(claims.get("intent")))
            iat, nbf, exp = claims["iat"], claims["nbf"], claims["exp"]
            r.check("iat within the request's wall-clock window", t0 - 5 <= iat <= t1 + 5, f"iat={iat} window {t0}..{t1}")
            r.check("nbf <= iat", nbf <= iat, f"nbf={nbf} iat={iat}")
            r.check("exp - iat == 10m", exp - iat == TTL_SECONDS, f"exp-iat={exp - iat}")
            r.check("exp == response expires_at_unix", exp == issued.get("expires_at_unix"),
                    f"{exp} vs {issued.get('expires_at_unix')}")
            cnf = claims.get("cnf") or {}
            r.check("cnf x5t#S256 == b64url(sha256(leaf DER)) from py-spiffe's cert",
                    cnf.get("x5t#S256") == expected_x5t, f"token {cnf.get('x5t#S256')!r} vs {expected_x5t!r}")

            # One altered payload byte, JSON kept valid so only the signature can reject it.
            h64, p64, s64 = token.split(".")
            payload = bytearray(b64url_decode(p64))
            at = bytes(payload).find(SCOPE.encode())
            payload[at + len(SCOPE) - 1] ^= 0x01  # "job:submit" -> "job:submiu"
            tampered = f"{h64}.{b64url(bytes(payload))}.{s64}"
            check_delegation(r, binary, state, grpc_addr, verify)

            r.expect_raises("token with one altered payload byte is rejected",
                            jwt.InvalidSignatureError, lambda: verify(tampered, AUDIENCE))
            r.expect_raises("token rejected for audience model-registry",
                            jwt.InvalidAudienceError, lambda: verify(token, "model-registry"))

            # ---- JWT-SVID through py-spiffe ----------------------------------------
            print("[jwt-svid via py-spiffe]")
            jsvid = client.fetch_jwt_svid(audience={BROKER_ID})
            r.check("JWT-SVID sub is the deploy agent", str(jsvid.spiffe_id) == AGENT_ID, str(jsvid.spiffe_id))
            r.check("JWT-SVID aud contains the broker", BROKER_ID in jsvid.audience, repr(jsvid.audience))
            jheader = jwt.get_unverified_header(jsvid.token)
            print(f"        JWT-SVID header {jheader}, exp in {jsvid.expiry - int(time.time())}s")
            jbundles = client.fetch_jwt_bundles()
            jbundle = jbundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
            r.check("Workload API serves a JWT bundle for example.org",
                    jbundle is not None and bool(jbundle.jwt_authorities))
            try:
                v = JwtSvid.parse_and_validate(jsvid.token, jbundle, {BROKER_ID})
                r.check("JWT-SVID validates locally against the JWT bundle (py-spiffe/PyJWT)",
                        v.spiffe_id == SpiffeId(AGENT_ID))
            except Exception as e:  # noqa: BLE001
                r.check("JWT-SVID validates locally against the JWT bundle (py-spiffe/PyJWT)", False,
                        f"{type(e).__name__}: {e}")
            try:
                v = client.validate_jwt_svid(jsvid.token, BROKER_ID)
                r.check("JWT-SVID validates through Workload API ValidateJWTSVID", str(v.spiffe_id) == AGENT_ID)
            except Exception as e:  # noqa: BLE001
                r.check("JWT-SVID validates through Workload API ValidateJWTSVID", False, f"{type(e).__name__}: {e}")
            r.expect_raises("ValidateJWTSVID rejects a wrong audience", Exception,
                            lambda: client.validate_jwt_svid(jsvid.token, "spiffe://example.org/other"))
            jh, jp, js = jsvid.token.split(".")
            jpay = bytearray(b64url_decode(jp))
            i = bytes(jpay).find(b"deploy-agent")
            jpay[i] ^= 0x01  # 'd' -> 'e'
            jtampered = f"{jh}.{b64url(bytes(jpay))}.{js}"
            r.expect_raises("tampered JWT-SVID rejected locally", Exception,
                            lambda: JwtSvid.parse_and_validate(jtampered, jbundle, {BROKER_ID}))
            r.expect_raises("tampered JWT-SVID rejected by ValidateJWTSVID", Exception,
                            lambda: client.validate_jwt_svid(jtampered, BROKER_ID))
            other = "spiffe://example.org/gpu-scheduler"
            multi = client.fetch_jwt_svid(audience={BROKER_ID, other})
            try:
                v = JwtSvid.parse_and_validate(multi.token, jbundle, {other})
                r.check("two-audience JWT-SVID validates locally for either audience",
                        v.audience == {BROKER_ID, other}, repr(v.audience))
            except Exception as e:  # noqa: BLE001
                r.check("two-audience JWT-SVID validates locally for either audience", False,
                        f"{type(e).__name__}: {e}")
            r.expect_raises("broker access token is not accepted as a JWT-SVID by ValidateJWTSVID",
                            Exception, lambda: client.validate_jwt_svid(token, AUDIENCE))
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if broker is not None:
            broker.stop()
            print(f"broker stopped (exit {broker.proc.returncode})")
            if r.failed:
                print("--- broker stderr tail ---\n" + broker.stderr_tail())
        if os.environ.get("CROSSCHECK_KEEP_STATE") == "1":
            print(f"state kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    r = Report()
    try:
        run(r)
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
