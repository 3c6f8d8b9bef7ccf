#!/usr/bin/env python3
"""spiffe-broker's slurm-submit tokens against a real Slurm (22.05, Debian 12 packages).

backends.py re-implements Slurm's auth/jwt rules; this script asks Slurm itself. It starts,
on loopback in a temporary directory and with a generated slurm.conf, a one-node cluster:

  munged      its own key and socket (AuthInfo=socket=...)
  slurmctld   AuthAltTypes=auth/jwt, AuthAltParameters=jwks=<file>: the broker's JWKS reduced
              to what slurmctld loads (RS256 keys with kid/e/n); no slurmdbd, no cgroups
              (proctrack/pgid, task/none), so it runs in a container without systemd
  slurmd      this host as the only node
  slurmrestd  as a dedicated user (it refuses root), SLURM_JWT=daemon, rest_auth/jwt,
              openapi/v0.0.38

then `spiffe-broker dev`, and checks:

  1  a slurm-submit token for gpu/provisioner (sun=gpu-prov) submits a batch job through
     slurmrestd (X-SLURM-USER-NAME: gpu-prov, X-SLURM-USER-TOKEN: <token>); the job runs
     as gpu-prov (it writes `id -un` to a file read here);
  2  refused by Slurm (HTTP error from slurmrestd, the reason read from slurmctld's log):
       - an expired token signed with the broker's own RS256 key (forged with PyJWT from the
         dev state dir's keys/rsa.p8; a fresh token forged the same way is accepted, so the
         refusal is the expiry and nothing else);
       - the deploy-agent's token (sun=ci-deploy) presented as gpu-prov (the same token as
         ci-deploy is accepted);
       - a token signed by another RSA key under the broker key's kid;
     and no job exists for any of them.

Usage:  python3 tests/crosscheck/slurm_real.py          (as root: it starts the daemons and
                                                          runs jobs as other users)
Needs:  slurmctld slurmd slurmrestd munge slurm-wlm-jwt-plugin (Debian 12), Unix users
        gpu-prov, ci-deploy and slurmrestd (SLURM_REST_USER), PyJWT + cryptography.
Env:    SPIFFE_BROKER_BIN  broker binary (default: <repo>/target/debug/spiffe-broker)
        SLURM_REST_USER    the user slurmrestd runs as (default: slurmrestd)
        SLURM_REAL_TIMEOUT bound for each wait (default 30 s)
        CROSSCHECK_READY_TIMEOUT, CROSSCHECK_KEEP_STATE=1  as for crosscheck.py

The last line is `N passed, M failed`; the exit code is non-zero on any failure. Every daemon
is stopped on exit (own process groups), also on failure and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crosscheck as cc  # noqa: E402  (Report, Broker, free_port, http_json, REPO)
import backends as be  # noqa: E402  (Children, stop_group, jwt_parts, slurm_key_table)

REPO = cc.REPO
WAIT = float(os.environ.get("SLURM_REAL_TIMEOUT", "30"))
API = "/slurm/v0.0.38"
PROFILE = "slurm-submit"
SCOPE = "job:submit"
INTENT = ["--intent-action", "submit", "--intent-target", "queue/debug"]
PROV_USER = "gpu-prov"        # demo-config: spiffe://example.org/gpu/provisioner
DEPLOY_USER = "ci-deploy"     # demo-config: spiffe://example.org/ci/deploy-agent
REST_USER = os.environ.get("SLURM_REST_USER", "slurmrestd")
SBIN = ["munged", "slurmctld", "slurmd", "slurmrestd"]
CHILDREN = be.Children()


def wait_for(what: str, fn: Callable[[], object], timeout: float = WAIT, every: float = 0.2,
             alive: Callable[[], str | None] | None = None):
    """fn() until it returns a truthy value (returned) or `timeout` (RuntimeError). `alive`
    returns a reason to stop early (a daemon exited)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - remembered for the timeout message
            last = e
        if alive is not None and (why := alive()):
            raise RuntimeError(f"{what}: {why}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s" + (f" (last error: {last})" if last else ""))
        time.sleep(every)


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


# =====================================================================================
# The cluster
# =====================================================================================

class Cluster:
    """munged + slurmctld + slurmd + slurmrestd in `root` (a fresh temporary directory)."""

    def __init__(self, root: Path, jwks_file: Path) -> None:
        self.root = root
        self.jwks_file = jwks_file
        self.node = socket.gethostname().split(".")[0]
        self.ctld_port, self.slurmd_port, self.rest_port = self._ports(3)
        self.conf = root / "slurm.conf"
        self.ctld_log = root / "log" / "slurmctld.log"
        self.slurmd_log = root / "log" / "slurmd.log"
        self.rest_log = root / "log" / "slurmrestd.log"
        self.munge_log = root / "log" / "munged.log"
        self.munge_sock = root / "munge-run" / "munge.sock"
        self.jobs_dir = root / "jobs"
        self.procs: dict[str, subprocess.Popen] = {}

    @staticmethod
    def _ports(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            p = cc.free_port()
            if p not in ports:
                ports.append(p)
        return ports

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def dead(self) -> str | None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                return f"{name} exited with {p.returncode}"
        return None

    def write_files(self) -> None:
        r = self.root
        os.chmod(r, 0o755)  # slurmrestd (another user) reads slurm.conf and the JWKS
        for d in ("log", "ctld", "spool", "munge", "munge-run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)  # key, pid and seed
        os.chmod(r / "munge-run", 0o755)  # munged: every directory above its socket o+x
        self.jobs_dir.mkdir()
        os.chmod(self.jobs_dir, 0o1777)  # jobs run as gpu-prov/ci-deploy and write here
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(f"""\
# generated by tests/crosscheck/slurm_real.py
ClusterName=brokertest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_sock}
AuthAltTypes=auth/jwt
AuthAltParameters=jwks={self.jwks_file}
StateSaveLocation={r / 'ctld'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroup hierarchy of our own in a container
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=1 RealMemory=100 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=10 State=UP
""")
        os.chmod(self.conf, 0o644)

    def _start(self, name: str, argv: list[str], log: Path | None = None, **kw) -> None:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "SLURM_CONF": str(self.conf),
               **kw.pop("env", {})}
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True, cwd=self.root, **kw)
        if log is not None:
            out.close()
        CHILDREN.add(p)
        self.procs[name] = p

    def start(self) -> None:
        r = self.root
        self._start("munged", ["munged", "--foreground", f"--key-file={r / 'munge' / 'munge.key'}",
                               f"--socket={self.munge_sock}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--seed-file={r / 'munge' / 'seed'}", "--num-threads=2"], self.munge_log)
        wait_for("munged socket", self.munge_sock.exists, alive=self.dead)
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], r / "log" / "slurmctld.out")
        self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)], r / "log" / "slurmd.out")
        # slurmrestd refuses to run as root; SLURM_JWT=daemon: the user's token comes with each request.
        rest = pwd.getpwnam(REST_USER)
        self._start("slurmrestd", ["slurmrestd", "-f", str(self.conf), "-a", "rest_auth/jwt",
                                   "-s", "openapi/v0.0.38", f"127.0.0.1:{self.rest_port}"],
                    self.rest_log, env={"SLURM_JWT": "daemon"}, user=rest.pw_uid, group=rest.pw_gid,
                    extra_groups=[])

    def stop(self) -> None:
        for name in ("slurmrestd", "slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None:
                be.stop_group(p)

    # -- slurmctld's log: where a refused token's reason ends up ---------------------------

    def log_mark(self) -> int:
        try:
            return self.ctld_log.stat().st_size
        except OSError:
            return 0

    def log_since(self, mark: int) -> str:
        try:
            with open(self.ctld_log, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- slurmrestd ------------------------------------------------------------------------

    def rest(self, method: str, path: str, user: str, token: str, body: dict | None = None) -> tuple[int, dict | str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.rest_url + API + path, data=data, method=method, headers={
            "X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token,
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=cc.CALL_TIMEOUT) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text


# =====================================================================================
# Tokens
# =====================================================================================

def slurm_jwks(jwks: dict) -> dict:
    """The broker's JWKS as slurmctld's jwks= file takes it: RS256 keys only, with kid/e/n
    (slurmctld stops (fatal) on an RS256 key lacking one of them)."""
    keys = [{f: k[f] for f in ("kty", "alg", "use", "kid", "e", "n") if f in k}
            for k in jwks.get("keys", []) if k.get("kty") == "RSA" and k.get("alg") == "RS256"]
    return {"keys": keys}


def request_token(binary: Path, grpc_addr: str, state: Path, workload: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPIFFE_BROKER_ADDR", "SPIFFE_BROKER_ID")}
    env["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{state / 'workloads' / (workload + '.sock')}"
    env["RUST_LOG"] = "warn"
    p = subprocess.run([str(binary), "request", "--broker", grpc_addr, "--profile", PROFILE, "--scope", SCOPE,
                        "--ttl", "10m", *INTENT, "--output", "json"],
                       capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"request for {workload} exited {p.returncode}: {p.stderr.decode('utf-8', 'replace').strip()}")
    return json.loads(p.stdout)


def broker_rsa_key(state: Path):
    """The dev broker's RS256 signing key (PKCS#8, DER or PEM) from STATE/keys/."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    for f in sorted((state / "keys").iterdir()):
        raw = f.read_bytes()
        for load in (serialization.load_der_private_key, serialization.load_pem_private_key):
            try:
                k = load(raw, password=None)
            except (ValueError, TypeError):
                continue
            if isinstance(k, rsa.RSAPrivateKey):
                return f, k
    raise RuntimeError(f"no RSA private key under {state / 'keys'}")


def rsa_public_matches(key, jwk: dict) -> bool:
    n = key.public_key().public_numbers()
    return cc.b64url_decode(jwk["n"]).lstrip(b"\0") == n.n.to_bytes((n.n.bit_length() + 7) // 8, "big") \
        and int.from_bytes(cc.b64url_decode(jwk["e"]), "big") == n.e


def forge(claims: dict, key, kid: str, **changes) -> str:
    import jwt  # PyJWT
    c = {**claims, "jti": uuid.uuid4().hex, **changes}
    return jwt.encode(c, key, algorithm="RS256", headers={"kid": kid, "typ": "JWT"})


# =====================================================================================
# The checks
# =====================================================================================

def job_body(name: str, out_dir: Path) -> dict:
    script = ("#!/bin/sh\n"
              f"id -un > {out_dir}/{name}.tmp && mv {out_dir}/{name}.tmp {out_dir}/{name}.whoami\n")
    return {"script": script, "job": {
        "name": name, "partition": "debug", "current_working_directory": str(out_dir),
        "standard_output": f"{out_dir}/{name}.out", "standard_error": f"{out_dir}/{name}.err",
        "environment": {"PATH": "/usr/bin:/bin"}, "time_limit": 2}}


def submit_and_run(r: cc.Report, cl: Cluster, user: str, token: str) -> int | None:
    name = f"{user}-{uuid.uuid4().hex[:8]}"
    status, body = cl.rest("POST", "/job/submit", user, token, job_body(name, cl.jobs_dir))
    ok = status == 200 and isinstance(body, dict) and not body.get("errors") and isinstance(body.get("job_id"), int)
    if not r.check(f"job submitted through slurmrestd as {user} (HTTP 200, a job id, no errors)", ok,
                   f"HTTP {status}: {str(body)[:400]}\n--- slurmctld.log ---\n{tail(cl.ctld_log)}"):
        return None
    job_id = body["job_id"]
    print(f"        job {job_id} ({name})")
    states: list[str] = []

    def done() -> str | None:
        st, info = cl.rest("GET", f"/job/{job_id}", user, token)
        if st == 200 and isinstance(info, dict) and info.get("jobs"):
            s = info["jobs"][0].get("job_state", "?")
            if not states or states[-1] != s:
                states.append(s)
        f = cl.jobs_dir / f"{name}.whoami"
        return f.read_text().strip() if f.exists() else None

    try:
        who = wait_for(f"job {job_id} output", done, alive=cl.dead)
    except RuntimeError as e:
        r.check(f"job {job_id} ran and wrote `id -un`", False,
                f"{e}; states {states}\n--- slurmd.log ---\n{tail(cl.slurmd_log)}\n--- slurmctld.log ---\n{tail(cl.ctld_log)}")
        return job_id
    print(f"        job states seen via slurmrestd: {' -> '.join(states) or '(none)'}")
    r.check(f"job {job_id} ran as {user} (`id -un` = {who!r})", who == user, who)
    f = cl.jobs_dir / f"{name}.whoami"
    r.check(f"its output file is owned by {user}", f.stat().st_uid == pwd.getpwnam(user).pw_uid,
            str(f.stat().st_uid))
    st, info = cl.rest("GET", f"/job/{job_id}", user, token)
    job = info["jobs"][0] if st == 200 and isinstance(info, dict) and info.get("jobs") else {}
    r.check(f"slurmrestd reports job {job_id} with user_name {user}", job.get("user_name") == user,
            repr({k: job.get(k) for k in ("user_name", "job_state")}))
    return job_id


AUTH_LINE = re.compile(r"auth_p_verify|failed to verify jwt|matching kid|auth_g_verify")


def refused(r: cc.Report, cl: Cluster, what: str, user: str, token: str, reason: str) -> None:
    """POST a job with `token` as `user`: an HTTP error from slurmrestd, and `reason` (a regex)
    in what slurmctld logs from then on (slurmrestd only says 'Zero Bytes were transmitted')."""
    mark = cl.log_mark()
    name = f"refused-{uuid.uuid4().hex[:8]}"
    status, body = cl.rest("POST", "/job/submit", user, token, job_body(name, cl.jobs_dir))
    errors = body.get("errors") if isinstance(body, dict) else None
    r.check(f"{what}: slurmrestd answers an HTTP error with errors[] and no job id",
            status >= 400 and bool(errors) and not (isinstance(body, dict) and body.get("job_id")),
            f"HTTP {status}: {str(body)[:300]}")
    print(f"        HTTP {status}: errors {json.dumps(errors)[:200]}")
    try:
        wait_for("reason in slurmctld.log", lambda: re.search(reason, cl.log_since(mark)), timeout=10, every=0.1)
        ok = True
    except RuntimeError:
        ok = False
    r.check(f"{what}: slurmctld logged /{reason}/", ok, "new slurmctld.log lines:\n" + cl.log_since(mark)[-2000:])
    for line in cl.log_since(mark).splitlines():
        if AUTH_LINE.search(line):
            print(f"        slurmctld.log: {line.strip()}")


def accepted(r: cc.Report, cl: Cluster, what: str, user: str, token: str) -> bool:
    """A read-only call (GET /jobs) with `token` as `user` succeeds: the token itself is good."""
    status, body = cl.rest("GET", "/jobs", user, token)
    ok = status == 200 and isinstance(body, dict) and not body.get("errors")
    return r.check(what, ok, f"HTTP {status}: {str(body)[:300]}\n--- slurmctld.log ---\n{tail(cl.ctld_log, 8)}")


def run(r: cc.Report, tmp: Path) -> None:
    try:
        import jwt  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: F401
    except ImportError as e:
        r.check("dependencies importable", False, f"{e}; pip install -r {Path(__file__).with_name('requirements.txt')}")
        return
    print("[1] preconditions")
    missing = [b for b in SBIN if shutil.which(b) is None]
    if not r.check("munged, slurmctld, slurmd, slurmrestd on PATH", not missing, f"missing {missing} "
                   "(apt-get install slurmctld slurmd slurmrestd munge slurm-wlm-jwt-plugin)"):
        return
    plugins = list(Path("/usr/lib").glob("*/slurm-wlm/auth_jwt.so")) + list(Path("/usr/lib").glob("slurm*/auth_jwt.so"))
    if not r.check("Slurm's auth/jwt plugin installed (slurm-wlm-jwt-plugin)", bool(plugins),
                   "no /usr/lib/*/slurm-wlm/auth_jwt.so (apt-get install slurm-wlm-jwt-plugin)"):
        return
    if not r.check("running as root (slurmd runs jobs as other users)", os.geteuid() == 0, f"euid {os.geteuid()}"):
        return
    users = {}
    for u in (PROV_USER, DEPLOY_USER, REST_USER):
        try:
            users[u] = pwd.getpwnam(u)
        except KeyError:
            pass
    if not r.check(f"Unix users {PROV_USER}, {DEPLOY_USER}, {REST_USER} exist",
                   len(users) == 3, f"missing {sorted({PROV_USER, DEPLOY_USER, REST_USER} - set(users))}"):
        return
    binary = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not r.check("broker binary exists", binary.is_file(), f"{binary} not found (cargo build --bin spiffe-broker)"):
        return

    print("[2] spiffe-broker dev")
    state = tmp / "state"
    grpc_port, http_port = Cluster._ports(2)
    grpc_addr, http_addr = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    broker = cc.Broker(binary, state, grpc_addr, http_addr)
    CHILDREN.procs.append(broker.proc)  # its own session -> own group
    try:
        broker.wait_ready(cc.READY_TIMEOUT)
        r.check("broker dev printed `ready`", True)
    except RuntimeError as e:
        r.check("broker dev printed `ready`", False, f"{e}\n{broker.stderr_tail()}")
        return
    jwks = cc.http_json(f"http://{http_addr}/.well-known/jwks.json")
    sj = slurm_jwks(jwks)
    if not r.check("the JWKS has an RS256 key (for Slurm)", bool(sj["keys"]), json.dumps(jwks)[:300]):
        return
    be.slurm_key_table(sj)  # what backends.py says slurmctld would load (raises on a fatal key)
    jwks_file = tmp / "slurm" / "jwks.json"
    jwks_file.parent.mkdir()
    jwks_file.write_text(json.dumps(sj, indent=1))
    os.chmod(jwks_file, 0o644)
    print(f"        JWKS for slurmctld: {jwks_file} (kid {', '.join(k['kid'] for k in sj['keys'])})")

    prov = request_token(binary, grpc_addr, state, "provisioner")
    deploy = request_token(binary, grpc_addr, state, "deploy-agent")
    ph, pc = be.jwt_parts(prov["token"])
    _, dc = be.jwt_parts(deploy["token"])
    print(f"        provisioner token: alg {ph.get('alg')} kid {ph.get('kid')} sun {pc.get('sun')} aud {pc.get('aud')}")
    r.check(f"provisioner token: RS256, sun {PROV_USER}", ph.get("alg") == "RS256" and pc.get("sun") == PROV_USER,
            repr((ph, pc.get("sun"))))
    r.check(f"deploy-agent token: sun {DEPLOY_USER}", dc.get("sun") == DEPLOY_USER, repr(dc.get("sun")))
    key_file, broker_key = broker_rsa_key(state)
    kid = ph["kid"]
    pub = next((k for k in sj["keys"] if k["kid"] == kid), None)
    r.check(f"{key_file.relative_to(state)} is the key behind the JWKS kid {kid}",
            pub is not None and rsa_public_matches(broker_key, pub))

    print("[3] Slurm: munged, slurmctld, slurmd, slurmrestd")
    cl = Cluster(tmp / "slurm", jwks_file)
    cl.write_files()
    t0 = time.monotonic()
    try:
        cl.start()
        print(f"        slurmctld :{cl.ctld_port}  slurmd :{cl.slurmd_port}  slurmrestd {cl.rest_url}  node {cl.node}")
        token = prov["token"]

        def node_idle() -> bool:
            st, body = cl.rest("GET", "/nodes", PROV_USER, token)
            return st == 200 and isinstance(body, dict) and any(
                "IDLE" in str(n.get("state", "")).upper() for n in body.get("nodes", []))

        wait_for("slurmrestd answers and the node is idle", node_idle, alive=cl.dead)
        r.check(f"cluster up, node idle ({time.monotonic() - t0:.1f}s)", True)
    except (RuntimeError, OSError) as e:
        r.check("cluster up, node idle", False, f"{e}\n--- slurmctld ---\n{tail(cl.ctld_log)}\n--- slurmd ---\n"
                f"{tail(cl.slurmd_log)}\n--- slurmrestd ---\n{tail(cl.rest_log)}\n--- munged ---\n{tail(cl.munge_log)}")
        return

    try:
        print(f"[4] the provisioner's slurm-submit token submits a job as {PROV_USER}")
        job_id = submit_and_run(r, cl, PROV_USER, token)

        print("[5] refused by Slurm")
        now = int(time.time())
        fresh = forge(pc, broker_key, kid, iat=now, nbf=now, exp=now + 300)
        accepted(r, cl, "control: a fresh token forged with the broker's RS256 key is accepted", PROV_USER, fresh)
        expired = forge(pc, broker_key, kid, iat=now - 900, nbf=now - 900, exp=now - 300)
        refused(r, cl, "expired token (broker's own key, exp 5 min ago)", PROV_USER, expired,
                r"auth_p_verify: token expired")
        accepted(r, cl, f"control: the deploy-agent's token as {DEPLOY_USER} is accepted", DEPLOY_USER, deploy["token"])
        refused(r, cl, f"the deploy-agent's token (sun {DEPLOY_USER}) presented as {PROV_USER}", PROV_USER,
                deploy["token"],  # auth/jwt: the token's sun may act as another user only if root/SlurmUser
                rf"auth_p_verify: attempt to authenticate as alternate user {DEPLOY_USER} from non-SlurmUser {PROV_USER}")
        from cryptography.hazmat.primitives.asymmetric import rsa
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        stranger = forge(pc, other, kid, iat=now, nbf=now, exp=now + 300)
        refused(r, cl, f"token signed by another RSA key under kid {kid}", PROV_USER, stranger,
                r"failed to verify jwt")

        st, body = cl.rest("GET", "/jobs", PROV_USER, token)
        ids = sorted(j.get("job_id") for j in body.get("jobs", [])) if st == 200 and isinstance(body, dict) else None
        r.check("Slurm holds only the accepted job (none for the refused tokens)",
                ids == ([job_id] if job_id is not None else []), f"HTTP {st}: jobs {ids}")
        left = sorted(p.name for p in cl.jobs_dir.iterdir() if p.name.startswith("refused-"))
        r.check("no output from a refused submission", left == [], repr(left))
    finally:
        if r.failed:
            print("--- slurmctld.log tail ---\n" + tail(cl.ctld_log, 40))
        cl.stop()
        print(f"Slurm daemons stopped ({', '.join(f'{n} {p.returncode}' for n, p in cl.procs.items())})")
        broker.stop()


def main() -> int:
    def on_term(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children

    signal.signal(signal.SIGTERM, on_term)
    r = cc.Report()
    tmp = Path(tempfile.mkdtemp(prefix="spiffe-broker-slurm-"))
    os.chmod(tmp, 0o711)  # traversable (munged's socket, slurmrestd's slurm.conf), not listable
    t0 = time.monotonic()
    try:
        run(r, tmp)
    except (KeyboardInterrupt, SystemExit) as e:
        r.check("ran to the end", False, f"interrupted ({type(e).__name__} {e})")
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        CHILDREN.stop_all()
        if os.environ.get("CROSSCHECK_KEEP_STATE") == "1":
            print(f"state kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    print(f"({time.monotonic() - t0:.1f}s)")
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
