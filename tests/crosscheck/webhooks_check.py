#!/usr/bin/env python3
"""Independent cross-check of spiffe-broker's approval webhooks (Standard Webhooks and Slack).

Written from the specifications, sharing no code with the Rust implementation: every
Standard Webhooks delivery is verified with the reference Python library
(`standardwebhooks`, standardwebhooks.com: `webhook-id`, `webhook-timestamp`,
`webhook-signature` = `v1,<base64 HMAC-SHA256("id.timestamp.body")>`, a five-minute
timestamp tolerance); the Slack messages are read as Slack's incoming-webhook format
(`text` plus Block Kit `blocks`, mrkdwn escaping of `&`, `<` and `>`).

Scenario: two receivers here (http.server), one for Standard Webhooks and one for Slack,
each recording every POST (headers and raw body) and the status it answered; then
`spiffe-broker dev --approval-webhook URL --slack-webhook URL` in a temp state dir on free
ports, and approval flows through the CLI: `request --profile model-registry-push` as the
dev deploy agent (a pending access request), `approve ID --reason ...` as alice.

Checked:
- STATE/webhook.secret: one `whsec_<base64>` line of 24-64 bytes, mode 0600, unchanged by a
  restart;
- every Standard Webhooks delivery (accepted or refused) verifies with
  `Webhook(secret).verify(raw_body, headers)`; a copy with one body byte changed, with the
  timestamp moved by 10 minutes either way, or signed with another secret, does not
  (WebhookVerificationError); Content-Type is JSON; the body's `timestamp` is RFC 3339;
- flow 1: `access_request.pending` then `access_request.reviewed` for the same
  `data.access_request_id`, requester `spiffe://example.org/ci/deploy-agent`, reviewer
  `spiffe://example.org/ops/alice`, verdict `approve`; distinct `webhook-id`s;
- durability: the receiver answers 503 while a second request is made and approved; the
  broker tries (503s, always the same `webhook-id`) and nothing is accepted; once it answers
  200 again both messages arrive (within 15 s), in order, with the id of the refused
  attempts (stable on redelivery); the Slack sink meanwhile is not held up;
- restart: SIGTERM, the same command on the same state dir and ports, a third approved
  request (intent target `models/llama<!channel>`, reason with `<!here>`): its two messages
  arrive and no earlier `webhook-id` is accepted a second time; overall every event is
  accepted exactly once, in ledger order;
- Slack: every body is JSON with a non-empty `text` and `blocks` whose first block is a
  `section` with `mrkdwn` text; one message per event, in the same order; `<!channel>` and
  `<!here>` arrive escaped (`&lt;!channel&gt;`), never raw.

Usage:
  webhooks_check.py            (about 15 s; when a delivery after the restart is missing at
                               its 15 s deadline the check fails, and the script then waits
                               up to 70 s after the SIGTERM to report whether it came late
                               or not at all)

Env:  SPIFFE_BROKER_BIN        broker binary (default <repo>/target/debug/spiffe-broker)
      WEBHOOKS_CHECK_KEEP=1    keep the temp dir (its path is printed)

Needs `standardwebhooks==1.3.0` (tests/crosscheck/requirements.txt).

Each check prints `PASS name` or `FAIL name: why`; the last line is
`N passed, M failed`; the exit code is non-zero on any failure.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

REPO = Path(__file__).resolve().parents[2]
POLL_STEP = 0.1
READY_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 15.0   # the sink retries with back-off up to 5 s
CLI_TIMEOUT = 30.0
DIAG_WAIT = 70.0          # after a failed delivery check only: how late, or lost?
REQUESTER = "spiffe://example.org/ci/deploy-agent"
REVIEWER = "spiffe://example.org/ops/alice"
PENDING = "access_request.pending"
REVIEWED = "access_request.reviewed"
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail or 'failed'}", flush=True)
        return ok

    def problems(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        """One check over many items: fails with the first problem (which names the item)."""
        if not problems:
            return self.check(name, True, ok_detail)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return self.check(name, False, problems[0] + more)

    @staticmethod
    def note(msg: str) -> None:
        print(f"NOTE {msg}", flush=True)

    @staticmethod
    def section(title: str) -> None:
        print(f"[{title}]", flush=True)


def one_line(s: str, limit: int = 300) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Receivers
# --------------------------------------------------------------------------------------


class Receiver:
    """An HTTP receiver recording every POST: path, headers (lower-cased names), raw body
    and the status answered. While `down` is set it answers 503."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.posts: list[dict] = []
        self.down = False
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = 503 if rec.down else 200
                with rec.lock:
                    rec.posts.append({"time": time.time(), "path": self.path,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": body, "status": status})
                raw = b"unavailable\n" if status == 503 else b"ok\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *_args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.posts)

    def accepted(self) -> list[dict]:
        return [p for p in self.snapshot() if 200 <= p["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parse_json(body: bytes) -> dict | None:
    try:
        v = json.loads(body)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def event_of(p: dict) -> tuple[str | None, str | None]:
    """A Standard Webhooks delivery -> (type, data.access_request_id)."""
    v = parse_json(p["body"]) or {}
    data = v.get("data") if isinstance(v.get("data"), dict) else {}
    return v.get("type"), data.get("access_request_id")


def sw_headers(p: dict) -> dict[str, str]:
    h = p["headers"]
    return {k: h[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature") if k in h}


def verify_error(wh: Webhook, body: bytes, headers: dict[str, str]) -> str | None:
    """None if the reference library accepts the delivery, else its complaint."""
    try:
        wh.verify(body, headers)
        return None
    except WebhookVerificationError as e:
        return f"WebhookVerificationError: {e}"
    except Exception as e:  # noqa: BLE001 - anything else is a failure to verify too
        return f"{type(e).__name__}: {e}"


def tamper_problems(wh: Webhook, other: Webhook, p: dict) -> list[str]:
    """Copies of a good delivery that the reference library must reject."""
    label = f"{p['headers'].get('webhook-id')}"
    body, headers = p["body"], sw_headers(p)
    out = []
    variants: list[tuple[str, bytes, dict[str, str]]] = []
    i = len(body) // 2
    flipped = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
    variants.append(("one body byte changed", flipped, headers))
    try:
        ts = int(headers["webhook-timestamp"])
        for delta in (600, -600):
            variants.append((f"timestamp moved by {delta:+d} s", body,
                             {**headers, "webhook-timestamp": str(ts + delta)}))
        other_sig = other.sign(headers["webhook-id"], datetime.fromtimestamp(ts, tz=timezone.utc), body)
        variants.append(("signed with another secret", body, {**headers, "webhook-signature": other_sig}))
    except (KeyError, ValueError) as e:
        out.append(f"{label}: no usable webhook-timestamp ({e})")
    for what, b, h in variants:
        try:
            wh.verify(b, h)
            out.append(f"{label}: {what}: verify() accepted it")
        except WebhookVerificationError:
            pass
        except Exception as e:  # noqa: BLE001
            out.append(f"{label}: {what}: {type(e).__name__} instead of WebhookVerificationError: {e}")
    return out


def rfc3339_problem(s: object) -> str | None:
    if not isinstance(s, str) or not RFC3339.fullmatch(s):
        return f"{s!r} is not an RFC 3339 date-time"
    try:
        t = datetime.fromisoformat(s.replace("z", "Z").replace("Z", "+00:00").replace("t", "T"))
    except ValueError as e:
        return f"{s!r}: {e}"
    if abs(t - datetime.now(timezone.utc)) > timedelta(minutes=10):
        return f"{s!r} is more than 10 minutes from now"
    return None


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn, timeout: float, step: float = POLL_STEP):
    """Calls fn every `step` s until it returns something truthy or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(step)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, f"{type(e).__name__}: {e}"


class Child:
    """A child process in its own session, stdout and stderr to files."""

    def __init__(self, args: list[str], out: Path, err: Path) -> None:
        self.err_path = err
        self._out = open(out, "ab")
        self._err = open(err, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Sends `sig`, waits up to `timeout` s (then SIGKILL); returns the exit status
        it had after `sig`, or None if it had to be killed."""
        rc = self.proc.poll()
        if rc is None:
            try:
                self.proc.send_signal(sig)
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                rc = None
        self._out.close()
        self._err.close()
        return rc

    def stderr_tail(self, n: int = 8) -> str:
        try:
            return "\n".join(self.err_path.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""


def broker_binary() -> Path:
    b = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    return b if b.is_absolute() else REPO / b


class Harness:
    def __init__(self, binary: Path, tmp: Path, hook: Receiver, slack: Receiver) -> None:
        self.binary = binary
        self.tmp = tmp
        self.state = (tmp / "sb").resolve()
        grpc_port = free_port()
        http_port = free_port()
        while http_port == grpc_port:
            http_port = free_port()
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.http = f"127.0.0.1:{http_port}"
        self.hook_url = f"http://127.0.0.1:{hook.port}/hook"
        self.slack_url = f"http://127.0.0.1:{slack.port}/slack"
        self.broker: Child | None = None
        self.starts = 0

    def start(self, r: Report, label: str) -> bool:
        self.starts += 1
        n = self.starts
        self.broker = Child([str(self.binary), "dev", "--state-dir", str(self.state),
                             "--grpc-addr", self.grpc, "--http-addr", self.http,
                             "--approval-webhook", self.hook_url, "--slack-webhook", self.slack_url],
                            self.tmp / f"broker{n}.stdout.log", self.tmp / f"broker{n}.stderr.log")
        b = self.broker
        t0 = time.monotonic()
        ready = poll(lambda: b.proc.poll() is not None
                     or http_get(f"http://{self.http}/readyz")[1].strip() == "ready", READY_TIMEOUT)
        alive = b.proc.poll() is None
        st, text = http_get(f"http://{self.http}/readyz")
        ok = bool(ready) and alive and st == 200 and text.strip() == "ready"
        why = (f"exited {b.proc.poll()}: {one_line(b.stderr_tail(4))}" if not alive
               else f"GET /readyz -> {st} {one_line(text)!r} after {READY_TIMEOUT:.0f} s")
        return r.check(f"{label}: GET /readyz answers 200 `ready`", ok,
                       f"{time.monotonic() - t0:.1f} s" if ok else why)

    def stop(self) -> int | None:
        rc = self.broker.stop() if self.broker else None
        self.broker = None
        return rc

    def cli(self, who: str, args: list[str]) -> tuple[int, str, str]:
        env = dict(os.environ)
        env["SPIFFE_BROKER_ADDR"] = self.grpc
        env["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{self.state}/workloads/{who}.sock"
        try:
            p = subprocess.run([str(self.binary), *args], stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, env=env, timeout=CLI_TIMEOUT)
            return p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            return -1, "", f"timed out after {CLI_TIMEOUT:.0f} s"

    def approved_request(self, r: Report, label: str, target: str, ticket: str,
                         reason: str) -> str | None:
        """`request` as deploy-agent (must answer a pending access request), then `approve`
        as alice. Returns the access request id."""
        digest = "sha256:" + os.urandom(32).hex()
        args = ["request", "--profile", "model-registry-push", "--intent-action", "push-model",
                "--intent-target", target, "--artifact-digest", digest, "--ticket", ticket]
        rc, out, err = self.cli("deploy-agent", args)
        v = parse_json(out.encode()) or {}
        ar = v.get("access_request") if isinstance(v.get("access_request"), dict) else {}
        rid = ar.get("id")
        if not r.check(f"{label}: `request` as deploy-agent answers a pending access request",
                       isinstance(rid, str) and bool(rid) and ar.get("state") == "pending",
                       f"id {rid}" if rid else f"exit {rc}, stdout {one_line(out)!r}, stderr {one_line(err)!r}"):
            return None
        rc, out, err = self.cli("alice", ["approve", rid, "--reason", reason])
        v = parse_json(out.encode()) or {}
        r.check(f"{label}: `approve` as alice -> the request is approved",
                rc == 0 and v.get("id") == rid and v.get("state") == "approved",
                f"exit {rc}, state {v.get('state')}" if rc == 0 and v.get("state") == "approved"
                else f"exit {rc}, stdout {one_line(out)!r}, stderr {one_line(err)!r}")
        return rid


def events_for(posts: list[dict], rid: str) -> list[dict]:
    return [p for p in posts if event_of(p)[1] == rid]


def flow_problems(posts: list[dict], rid: str) -> list[str]:
    """The accepted deliveries for `rid` must be exactly pending then reviewed."""
    got = events_for(posts, rid)
    types = [event_of(p)[0] for p in got]
    if types != [PENDING, REVIEWED]:
        return [f"request {rid}: accepted types {types}, expected [{PENDING!r}, {REVIEWED!r}]"]
    return []


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------


def run(r: Report, binary: Path, tmp: Path) -> None:
    hook = Receiver("standard-webhooks")
    slack = Receiver("slack")
    h = Harness(binary, tmp, hook, slack)
    print(f"broker: {binary}\nstate:  {h.state}   gRPC {h.grpc}   HTTP {h.http}\n"
          f"hooks:  {h.hook_url}   {h.slack_url}", flush=True)
    rids: list[str] = []
    try:
        # ---- start, the secret --------------------------------------------------------------
        r.section("start")
        h.state.mkdir(parents=True)
        if not h.start(r, "dev --approval-webhook --slack-webhook"):
            return
        secret_file = h.state / "webhook.secret"
        mode = stat.S_IMODE(secret_file.stat().st_mode) if secret_file.exists() else None
        r.check("STATE/webhook.secret exists with mode 0600", mode == 0o600,
                "0600" if mode == 0o600 else ("missing" if mode is None else f"mode {mode:04o}"))
        secret_text = secret_file.read_text() if secret_file.exists() else ""
        lines = [l.strip() for l in secret_text.splitlines() if l.strip() and not l.strip().startswith("#")]
        secret_line = lines[0] if lines else ""
        try:
            raw = base64.b64decode(secret_line.removeprefix("whsec_"), validate=True)
        except ValueError:
            raw = b""
        if not r.check("the secret file holds one whsec_<base64> line of 24-64 bytes",
                       len(lines) == 1 and secret_line.startswith("whsec_") and 24 <= len(raw) <= 64,
                       f"{len(raw)} bytes" if raw else f"{len(lines)} lines, {secret_line[:10]!r}..."):
            return
        wh = Webhook(secret_line)
        other = Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode())

        # ---- flow 1 ---------------------------------------------------------------------------
        r.section("flow 1: request, approve, both messages verified")
        rid1 = h.approved_request(r, "flow 1", "models/llama", "CHG-1", "digest ok")
        if rid1 is None:
            return
        rids.append(rid1)
        got = poll(lambda: len(events_for(hook.accepted(), rid1)) >= 2, DELIVERY_TIMEOUT)
        ev1 = events_for(hook.accepted(), rid1)
        if not r.check("flow 1: two Standard Webhooks deliveries arrive", bool(got),
                       f"{len(ev1)} within {DELIVERY_TIMEOUT:.0f} s; all posts: "
                       f"{[(p['status'], event_of(p)) for p in hook.snapshot()]}"):
            return
        r.problems("each verifies with the reference library: Webhook(secret).verify(body, headers)",
                   [f"{p['headers'].get('webhook-id')}: {e}" for p in ev1
                    if (e := verify_error(wh, p["body"], sw_headers(p)))],
                   f"{len(ev1)} deliveries")
        r.problems("a copy with one body byte changed, the timestamp moved by 10 min either way, "
                   "or signed with another secret fails (WebhookVerificationError)",
                   [x for p in ev1 for x in tamper_problems(wh, other, p)])
        r.problems(f"types in order: {PENDING} then {REVIEWED}, same data.access_request_id",
                   flow_problems(ev1, rid1), rid1)
        d = [(parse_json(p["body"]) or {}).get("data") or {} for p in ev1]
        r.check(f"pending: data.requester is {REQUESTER}", d[0].get("requester") == REQUESTER,
                f"{d[0].get('requester')!r}")
        r.check(f"reviewed: data.reviewer is {REVIEWER} and data.verdict is approve",
                d[1].get("reviewer") == REVIEWER and d[1].get("verdict") == "approve",
                f"reviewer {d[1].get('reviewer')!r}, verdict {d[1].get('verdict')!r}")
        intent = d[0].get("intent") if isinstance(d[0].get("intent"), dict) else {}
        r.check("pending: data.profile and data.intent are the request's",
                d[0].get("profile") == "model-registry-push" and intent.get("target") == "models/llama"
                and intent.get("action") == "push-model" and intent.get("ticket") == "CHG-1",
                f"profile {d[0].get('profile')!r}, intent {intent}")
        r.problems("the body's timestamp is RFC 3339 (and near now)",
                   [f"{event_of(p)[0]}: {e}" for p in ev1
                    if (e := rfc3339_problem((parse_json(p["body"]) or {}).get("timestamp")))])
        ids1 = [p["headers"].get("webhook-id") for p in ev1]
        r.check("webhook-id differs between the two messages", None not in ids1 and len(set(ids1)) == 2,
                f"{ids1}")
        r.problems("Content-Type is application/json",
                   [f"{p['headers'].get('webhook-id')}: {p['headers'].get('content-type')!r}" for p in ev1
                    if not (p["headers"].get("content-type") or "").startswith("application/json")])
        if not isinstance(d[1].get("intent"), dict):
            r.note(f"the reviewed event carries no intent (data.intent = {d[1].get('intent')!r}), "
                   f"scopes {d[1].get('scopes')!r}, ttl_secs {d[1].get('ttl_secs')!r}")

        # ---- outage ---------------------------------------------------------------------------
        r.section("outage: the receiver answers 503, then 200 again")
        before = len(hook.accepted())
        n_posts = len(hook.snapshot())
        slack_before = len(slack.accepted())
        hook.down = True
        down_since = time.monotonic()
        rid2 = h.approved_request(r, "flow 2", "models/llama", "CHG-2", "digest ok")
        if rid2 is None:
            hook.down = False
            return
        rids.append(rid2)
        refused = lambda: [p for p in hook.snapshot()[n_posts:] if p["status"] == 503]  # noqa: E731
        poll(lambda: len(refused()) >= 2, 10)
        tried = refused()
        r.check("while it is down the broker tries (and retries) delivery: 503s recorded",
                len(tried) >= 2, f"{len(tried)} refused attempts in {time.monotonic() - down_since:.1f} s")
        r.check("nothing is accepted while the receiver is down", len(hook.accepted()) == before,
                f"{len(hook.accepted()) - before} accepted")
        r.check("the refused attempts are all the first undelivered message (request 2's pending), "
                "with one webhook-id",
                bool(tried) and all(event_of(p) == (PENDING, rid2) for p in tried)
                and len({p["headers"].get("webhook-id") for p in tried}) == 1,
                f"{[(event_of(p)[0], p['headers'].get('webhook-id')) for p in tried]}")
        r.problems("each refused attempt verifies too (a fresh timestamp, the same id)",
                   [f"attempt {i}: {e}" for i, p in enumerate(tried)
                    if (e := verify_error(wh, p["body"], sw_headers(p)))])
        slack_ok = poll(lambda: len(events_for_slack(slack.accepted()[slack_before:], rid2)) >= 2, 10)
        r.check("the Slack sink is not held up by the Standard Webhooks receiver's outage", bool(slack_ok),
                f"{len(events_for_slack(slack.accepted()[slack_before:], rid2))} Slack messages for "
                f"request 2 while the other receiver was down")
        hook.down = False
        up_at = time.monotonic()
        got = poll(lambda: len(events_for(hook.accepted(), rid2)) >= 2, DELIVERY_TIMEOUT)
        ev2 = events_for(hook.accepted(), rid2)
        if not r.check("once it answers 200 again both messages of request 2 arrive",
                       bool(got), f"in {time.monotonic() - up_at:.1f} s" if got else
                       f"{len(ev2)} within {DELIVERY_TIMEOUT:.0f} s"):
            return
        r.problems("in order: pending then reviewed", flow_problems(ev2, rid2))
        r.check("the delivered pending message has the webhook-id of the refused attempts "
                "(stable on redelivery)",
                bool(tried) and ev2[0]["headers"].get("webhook-id") == tried[0]["headers"].get("webhook-id"),
                f"{ev2[0]['headers'].get('webhook-id')}")
        r.problems("both verify with the reference library",
                   [f"{p['headers'].get('webhook-id')}: {e}" for p in ev2
                    if (e := verify_error(wh, p["body"], sw_headers(p)))])

        # ---- restart ---------------------------------------------------------------------------
        r.section("restart: SIGTERM, the same command and state dir")
        ids_before = [p["headers"].get("webhook-id") for p in hook.accepted()]
        posts_before = len(hook.snapshot())
        stopped_at = time.monotonic()
        rc = h.stop()
        r.check("the broker exits on SIGTERM", rc is not None, f"exit status {rc}" if rc is not None
                else "killed after 15 s")
        if not h.start(r, "restarted broker"):
            return
        r.check("the secret file is unchanged by the restart",
                secret_file.exists() and secret_file.read_text() == secret_text
                and stat.S_IMODE(secret_file.stat().st_mode) == 0o600)
        rid3 = h.approved_request(r, "flow 3", "models/llama<!channel>", "CHG-3", "digest ok <!here>")
        if rid3 is None:
            return
        rids.append(rid3)
        approved_at = time.monotonic()
        got = poll(lambda: len(events_for(hook.accepted(), rid3)) >= 2, DELIVERY_TIMEOUT)
        ev3 = events_for(hook.accepted(), rid3)
        r.check("after the restart both messages of request 3 arrive", bool(got),
                f"in {time.monotonic() - approved_at:.1f} s" if got else
                f"{len(ev3)} of 2 within {DELIVERY_TIMEOUT:.0f} s of the approval; "
                f"{len(hook.snapshot()) - posts_before} POSTs to the receiver since the restart")
        if not got:
            # Diagnosis only (the check above has failed): late or lost? Wait out a hold
            # the stopped process may have left (up to DIAG_WAIT s after its SIGTERM).
            late = poll(lambda: len(events_for(hook.accepted(), rid3)) >= 2,
                        max(0.0, DIAG_WAIT - (time.monotonic() - stopped_at)))
            r.note(f"request 3's messages arrived {time.monotonic() - stopped_at:.1f} s after the SIGTERM "
                   f"({time.monotonic() - approved_at:.1f} s after the approval)" if late else
                   f"request 3's messages had not arrived {DIAG_WAIT:.0f} s after the SIGTERM")
            ev3 = events_for(hook.accepted(), rid3)
        if len(ev3) >= 2:
            r.problems("in order: pending then reviewed", flow_problems(ev3, rid3))
        again = [p["headers"].get("webhook-id") for p in hook.accepted()[len(ids_before):]
                 if p["headers"].get("webhook-id") in ids_before]
        r.check("no message delivered before the restart is accepted again", not again,
                f"{len(ids_before)} earlier ids" if not again else f"again: {again}")

        # ---- overall ---------------------------------------------------------------------------
        r.section("overall")
        # Slack's last messages may trail the Standard Webhooks ones.
        poll(lambda: len(events_for_slack(slack.accepted(), rid3)) >= 2, DELIVERY_TIMEOUT)
        acc = hook.accepted()
        ids = [p["headers"].get("webhook-id") for p in acc]
        dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        r.check("every accepted webhook-id is accepted exactly once", not dup and None not in ids,
                f"{len(ids)} deliveries" if not dup else f"duplicates {dup}")
        seq = [(event_of(p)[1], event_of(p)[0]) for p in acc]
        want = [(rid, t) for rid in rids for t in (PENDING, REVIEWED)]
        r.check("the accepted events are exactly pending, reviewed for each request, in order",
                seq == want, f"{len(seq)} events" if seq == want else f"got {seq}")
        all_sw = hook.snapshot()
        r.problems("every Standard Webhooks POST (accepted or refused) verifies with the reference library",
                   [f"{p['headers'].get('webhook-id')}: {e}" for p in all_sw
                    if (e := verify_error(wh, p["body"], sw_headers(p)))], f"{len(all_sw)} POSTs")
        r.problems("every accepted delivery: a tampered copy is rejected",
                   [x for p in acc for x in tamper_problems(wh, other, p)])
        r.problems("every body's timestamp is RFC 3339",
                   [f"{p['headers'].get('webhook-id')}: {e}" for p in acc
                    if (e := rfc3339_problem((parse_json(p["body"]) or {}).get("timestamp")))])
        r.problems("the receivers see only their own paths",
                   [f"{rec.name}: POST {p['path']}" for rec, path in ((hook, "/hook"), (slack, "/slack"))
                    for p in rec.snapshot() if p["path"] != path])

        # ---- Slack -----------------------------------------------------------------------------
        r.section("Slack")
        sl = slack.snapshot()
        r.problems("each Slack body is JSON with a non-empty text and blocks whose first block is a "
                   "section with mrkdwn text", [x for p in sl if (x := slack_shape_problem(p["body"]))],
                   f"{len(sl)} messages")
        sacc = slack.accepted()
        got_ids = [slack_request_id(p["body"], rids) for p in sacc]
        want_ids = [rid for rid in rids for _ in (PENDING, REVIEWED)]
        r.check("one Slack message per event, in the same order (by request id)",
                got_ids == want_ids, f"{len(got_ids)} messages" if got_ids == want_ids
                else f"got {got_ids}, expected {want_ids}")
        raw = [p for p in sl if b"<!channel>" in p["body"] or b"<!here>" in p["body"]]
        r.check("`<!channel>` / `<!here>` never arrive raw in a Slack body", not raw,
                f"raw in {one_line(raw[0]['body'].decode('utf-8', 'replace'))}" if raw else "")
        s3 = events_for_slack(sl, rid3)
        first_text = [slack_first_text(p["body"]) for p in s3]
        r.check("request 3's pending message shows the target escaped: models/llama&lt;!channel&gt;",
                bool(first_text) and "models/llama&lt;!channel&gt;" in first_text[0],
                f"{first_text[0]!r}" if first_text else "no Slack message for request 3")
        r.check("request 3's reviewed message shows the reason escaped: &lt;!here&gt;",
                len(s3) >= 2 and b"digest ok &lt;!here&gt;" in s3[1]["body"],
                f"{one_line(s3[1]['body'].decode('utf-8', 'replace'))}" if len(s3) >= 2 else
                "no reviewed Slack message for request 3")
        signed = [p for p in sl if any(k.startswith("webhook-") for k in p["headers"])]
        if signed:
            r.note(f"{len(signed)} Slack posts carry webhook-* headers")
    finally:
        hook.down = False
        h.stop()
        if r.failed:
            for n in range(1, h.starts + 1):
                f = tmp / f"broker{n}.stderr.log"
                if f.exists():
                    tail = "\n".join(f.read_text("utf-8", "replace").splitlines()[-8:])
                    print(f"--- broker run {n} stderr tail ---\n{tail}")
        hook.close()
        slack.close()


def events_for_slack(posts: list[dict], rid: str) -> list[dict]:
    return [p for p in posts if rid.encode() in p["body"]]


def slack_request_id(body: bytes, rids: list[str]) -> str | None:
    found = [rid for rid in rids if rid.encode() in body]
    return found[0] if len(found) == 1 else None


def slack_first_text(body: bytes) -> str:
    v = parse_json(body) or {}
    blocks = v.get("blocks") if isinstance(v.get("blocks"), list) else []
    first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
    text = first.get("text") if isinstance(first.get("text"), dict) else {}
    return text.get("text") if isinstance(text.get("text"), str) else ""


def slack_shape_problem(body: bytes) -> str | None:
    v = parse_json(body)
    if v is None:
        return f"not a JSON object: {one_line(body.decode('utf-8', 'replace'))}"
    if not isinstance(v.get("text"), str) or not v["text"].strip():
        return f"no non-empty text: {one_line(body.decode('utf-8', 'replace'))}"
    blocks = v.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return f"no blocks list: {one_line(body.decode('utf-8', 'replace'))}"
    first = blocks[0]
    text = first.get("text") if isinstance(first, dict) else None
    if not (isinstance(first, dict) and first.get("type") == "section" and isinstance(text, dict)
            and text.get("type") == "mrkdwn" and isinstance(text.get("text"), str) and text["text"]):
        return f"first block is not a section with mrkdwn text: {one_line(json.dumps(first))}"
    return None


# --------------------------------------------------------------------------------------


def main() -> int:
    keep = os.environ.get("WEBHOOKS_CHECK_KEEP") == "1"

    def _stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _stop)

    r = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="webhooks-check-")).resolve()
    try:
        binary = broker_binary()
        if r.check("broker binary exists", binary.is_file(), str(binary)):
            p = subprocess.run([str(binary), "dev", "--help"], capture_output=True, text=True, timeout=30)
            if r.check("`spiffe-broker dev --help` lists --approval-webhook and --slack-webhook",
                       p.returncode == 0 and "--approval-webhook" in p.stdout and "--slack-webhook" in p.stdout,
                       "" if p.returncode == 0 else f"exit {p.returncode}"):
                run(r, binary, tmp)
    except (SystemExit, KeyboardInterrupt) as e:
        r.check("ran to the end", False, f"interrupted ({type(e).__name__} {getattr(e, 'code', '')})")
    except Exception as e:  # noqa: BLE001
        r.check("ran without an unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if keep:
            print(f"files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    print(f"({time.monotonic() - started:.1f} s)")
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
