#!/usr/bin/env python3
"""The web console in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven over W3C WebDriver, against `spiffe-broker dev` and a real
OpenID Provider (panva's OpenID-certified oidc-provider, tests/oidc/).

Scenario, each step checked:
- the deploy agent runs `request --wait` for a registry push (pending, needs one approval
  from registry-approvers);
- alice signs in through the provider's own login and consent pages (authorization code
  flow with PKCE, state and nonce); the queue shows the request; she opens it and approves
  with a reason; the agent's `--wait` prints the credential; the ledger's review and issue
  entries name `oidc:<issuer>#alice` (her email beside it) and the reason;
- alice's ID token, exchanged by the deploy agent (token exchange), opens a request on her
  behalf: alice cannot approve it (separation of duties), and nothing is reviewed;
- root (platform-admins) previews a revocation of the agent's leases, then revokes it with
  a reason; the relying-party feed (/revocations) carries the lease;
- dana (auditors) sees the audit log, opens the issue entry, and the page verifies its
  inclusion proof and the checkpoint's Ed25519 signature in the browser (WebCrypto); it
  fails for another pinned key, a checkpoint with its size changed and an entry with its
  decision changed; she has no review or revoke controls, and her posts of them anyway
  are refused;
- a cross-site form post (another origin) with her cookie, a post without the
  anti-forgery token and a tampered session cookie are refused;
- bob, whose groups map to nothing here, is refused at sign-in (recorded); root sees the
  inventory and the live sessions;
- alice asks for a fresh sign-in (`/console/reauth`): the provider asks for her login again
  (`max_age=0`, `prompt=login`) and she is back on the request; she signs the CLI in
  (`spiffe-broker login --oidc`: the console's confirmation, the loopback redirect), lists
  requests with no SVID, and `logout` ends the session at the broker.
Screenshots of every page go to target/console-screens/ (review them).

Usage: browser_check.py   (SPIFFE_BROKER_BIN, CHROMEDRIVER, CHROMIUM may point elsewhere)
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("SPIFFE_BROKER_BIN", os.path.join(ROOT, "target/debug/spiffe-broker"))
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = os.path.join(ROOT, "target/console-screens")
DIGEST = "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(what, probe, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class Browser:
    """Just enough W3C WebDriver."""

    def __init__(self, profile):
        self.port = free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_until("chromedriver", lambda: self._up())
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                     f"--user-data-dir={profile}"]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def _up(self):
        try:
            return http("GET", self.base + "/status")[0] == 200
        except OSError:
            return False

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        status, text = http(method, self.base + path, data, {"content-type": "application/json"})
        value = json.loads(text)["value"] if text else None
        if status != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {status} {value}")
        return value if "sessionId" not in (value or {}) else value

    def s(self, path, body=None, method=None):
        return self.call(method or ("POST" if body is not None else "GET"),
                         f"/session/{self.session}{path}", body)

    def go(self, url):
        self.s("/url", {"url": url})

    def url(self):
        return self.s("/url")

    def source(self):
        return self.s("/source")

    def find(self, css):
        found = self.s("/elements", {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def one(self, css):
        found = self.find(css)
        if not found:
            raise RuntimeError(f"no {css} on {self.url()}")
        return found[0]

    def click(self, css):
        self.s(f"/element/{self.one(css)}/click", {})

    def type(self, css, text):
        el = self.one(css)
        self.s(f"/element/{el}/clear", {})
        self.s(f"/element/{el}/value", {"text": text})

    def text(self, css):
        return self.s(f"/element/{self.one(css)}/text")

    def attr(self, css, name):
        return self.s(f"/element/{self.one(css)}/attribute/{name}")

    def cookies(self):
        return {c["name"]: c["value"] for c in self.s("/cookie")}

    def clear_cookies(self):
        self.s("/cookie", method="DELETE")

    def shot(self, name):
        os.makedirs(SHOTS, exist_ok=True)
        with open(os.path.join(SHOTS, name + ".png"), "wb") as f:
            f.write(base64.b64decode(self.s("/screenshot")))

    def close(self):
        try:
            self.s("", method="DELETE")
        finally:
            self.driver.terminate()
            self.driver.wait()


def sign_in(b, console, who, expect="Sign out"):
    """Through the provider's own login and consent pages, as a person would."""
    b.clear_cookies()
    b.go(console + "/console/")
    b.shot("01-sign-in")
    b.click("a.button[href^='/console/signin/']")
    for _ in range(6):
        if b.url().startswith(console + "/console"):
            break
        if b.find("input[name='login']"):
            b.type("input[name='login']", who)
            b.type("input[name='password']", "any")
            if who == "alice":
                b.shot("02-provider-login")
            b.click("button[type='submit']")
        elif b.find("button[type='submit']"):
            b.click("button[type='submit']")
        time.sleep(0.3)
    wait_until(f"{who}'s console", lambda: expect in b.source(), 30)


def ledger(state):
    c = sqlite3.connect(os.path.join(state, "ledger.db"))
    try:
        return [json.loads(b) for (b,) in c.execute("select body from audit_log order by seq")]
    finally:
        c.close()


def main():
    for tool in (BIN, CHROMEDRIVER, CHROMIUM):
        if not os.path.exists(tool):
            sys.exit(f"missing {tool}")
    tmp = tempfile.mkdtemp(prefix="console-check-")
    procs = []
    b = None
    try:
        grpc, web, idp = free_port(), free_port(), free_port()
        console = f"http://127.0.0.1:{web}"
        issuer = f"http://127.0.0.1:{idp}"
        provider = subprocess.Popen(["node", os.path.join(ROOT, "tests/oidc/provider.mjs"), str(idp),
                                     console + "/console/callback"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(provider)
        check(provider.stdout.readline().startswith("ready "), "the OpenID Provider starts")
        secret = os.path.join(tmp, "client.secret")
        with open(secret, "w") as f:
            f.write("test-secret-not-for-production\n")
        os.chmod(secret, 0o600)
        extra = os.path.join(tmp, "oidc.toml")
        with open(extra, "w") as f:
            f.write(f"""
[[oidc_providers]]
issuer = "{issuer}"
client_id = "spiffe-broker"
client_secret_file = "{secret}"
display_name = "the test IdP"
[[oidc_providers.claim_rules]]
group = "registry-approvers"
approver_groups = ["registry-approvers"]
[[oidc_providers.claim_rules]]
group = "platform-admins"
roles = ["platform-admin"]
[[oidc_providers.claim_rules]]
group = "auditors"
roles = ["auditor"]
""")
        state = os.path.join(tmp, "state")
        log = open(os.path.join(tmp, "broker.log"), "w")
        broker = subprocess.Popen([BIN, "dev", "--state-dir", state, "--grpc-addr", f"127.0.0.1:{grpc}",
                                   "--http-addr", f"127.0.0.1:{web}", "--config-append", extra],
                                  stdout=log, stderr=subprocess.STDOUT)
        procs.append(broker)
        wait_until("the broker", lambda: os.path.exists(os.path.join(state, "workloads/deploy-agent.sock"))
                   and http("GET", console + "/readyz")[0] == 200)
        env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=f"unix://{state}/workloads/deploy-agent.sock")
        cli = [BIN]
        conn = ["--broker", f"127.0.0.1:{grpc}"]
        push = ["--profile", "model-registry-push", "--intent-action", "push-model",
                "--intent-target", "models/llama", "--artifact-digest", DIGEST, "--ticket", "CHG-1234"]
        waiting = subprocess.Popen(cli + ["request", "--wait"] + conn + push, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(waiting)
        wait_until("the pending request", lambda: any(e["kind"] == "access_request" for e in ledger(state)))

        b = Browser(os.path.join(tmp, "chromium"))
        # alice approves.
        sign_in(b, console, "alice")
        b.shot("03-queue")
        check("models/llama" in b.source(), "alice's queue shows the pending push")
        b.click("td a[href^='/console/requests/']")
        b.shot("04-request")
        src = b.source()
        check(DIGEST in src and "CHG-1234" in src, "the request page shows digest and ticket")
        b.type("#reason", "digest matches release notes")
        b.click("button[value='approve']")
        b.shot("05-approved")
        b.s("/window/rect", {"width": 390, "height": 844})
        b.shot("05b-approved-phone")
        b.s("/window/rect", {"width": 1280, "height": 1000})
        check("request is now approved" in b.source(), "the approval is recorded")
        out, err = waiting.communicate(timeout=60)
        check(waiting.returncode == 0 and '"lease_id"' in out, f"request --wait returns the credential ({err.strip()[-200:]})")
        lease = json.loads(out[out.index("{"):])["lease_id"]
        entries = ledger(state)
        person = f"oidc:{issuer}#alice"
        review = [e for e in entries if e["kind"] == "review"]
        issue = [e for e in entries if e["kind"] == "issue"]
        check(len(review) == 1 and review[0]["caller"] == person and review[0]["auth_method"] == "oidc-session"
              and review[0].get("caller_person", {}).get("email") == "alice@example.org"
              and review[0]["reason"] == "digest matches release notes", "the review entry names alice")
        check(len(issue) == 1 and issue[0]["approvals"][0]["reviewer"] == person,
              "the issue entry names alice as approver")

        # alice cannot approve a request made on her behalf.
        token = subprocess.run(["node", os.path.join(ROOT, "tests/oidc/login.mjs"), issuer, "alice"],
                               capture_output=True, text=True, check=True).stdout.strip()
        ex = subprocess.run(cli + ["exchange", "--subject-token", "-", "--subject-token-type", "id-token"]
                            + conn + push, env=env, input=token, capture_output=True, text=True)
        check(ex.returncode == 0 and "pending" in (ex.stdout + ex.stderr).lower(),
              f"an agent acting for alice opens a request ({(ex.stdout + ex.stderr).strip()[-200:]})")
        b.go(console + "/console/")
        ids = [b.attr(f"td a[href^='/console/requests/']", "href")] if b.find("td a[href^='/console/requests/']") else []
        check(not ids, "the request made for alice is not in her queue")
        pending = [e["access_request_id"] for e in ledger(state) if e["kind"] == "access_request"][-1]
        b.go(console + f"/console/requests/{pending}")
        if b.find("#reason"):
            b.type("#reason", "approving my own")
            b.click("button[value='approve']")
        b.shot("06-self-approval-refused")
        check("approve" not in [e.get("decision") for e in ledger(state) if e["kind"] == "review"][1:],
              "alice's approval of her own request is refused")

        # root revokes the agent's lease.
        sign_in(b, console, "root")
        b.go(console + "/console/leases")
        b.shot("07-leases")
        check(lease in b.source(), "root sees the lease")
        b.type("#value", "spiffe://example.org/ci/deploy-agent")
        b.type("#revoke-reason", "registry credentials rotated")
        b.click("button[value='preview']")
        b.shot("08-revoke-preview")
        check("would be revoked" in b.source() and lease in b.source(), "the dry run lists the lease")
        check(lease not in http("GET", console + "/revocations?since=0")[1], "a preview changes nothing")
        b.click("button[value='revoke']")
        b.shot("09-revoked")
        check("Revoked 1 lease(s)" in b.source(), "the revocation is done")
        feed = json.loads(http("GET", console + "/revocations?since=0")[1])
        check(lease in json.dumps(feed), "the relying-party feed carries the revoked lease")

        b.go(console + "/console/inventory")
        b.shot("09b-inventory")
        check("spiffe://example.org/ci/deploy-agent" in b.source(), "root sees the inventory")
        b.go(console + "/console/sessions")
        b.shot("09c-sessions")
        check(f"oidc:{issuer}#root" in b.source(), "root sees the live sessions")

        # bob is in no group the broker knows: signed in at the provider, refused here.
        sign_in(b, console, "bob", expect="Sign-in refused")
        b.shot("09d-unknown-group-refused")
        check("in no group this broker gives" in b.source(), "bob (no mapped group) is refused")
        check(any(e["kind"] == "authn_failure" and "in no group" in e.get("reason", "")
                  for e in ledger(state)), "bob's refused sign-in is on the ledger")

        # dana audits.
        sign_in(b, console, "dana")
        nav = b.source()
        check("/console/audit" in nav and "/console/leases" not in nav, "dana sees the audit log, not the leases")
        b.go(console + "/console/audit")
        b.shot("10-audit-log")
        seq = [i for i, e in enumerate(ledger(state), 1) if e["kind"] == "issue"][0]
        b.go(console + f"/console/audit/{seq}")
        wait_until("the in-browser verification", lambda: b.attr("#result", "data-verified") != "pending", 20)
        b.shot("11-audit-entry-verified")
        check(b.attr("#result", "data-verified") == "true", f"the browser verifies the proof: {b.text('#result')}")
        entry_url = console + f"/console/audit/{seq}"

        def verify_again(name, script=None, key=None):
            b.go(entry_url)
            wait_until("the verification", lambda: b.attr("#result", "data-verified") != "pending", 20)
            if script:
                b.s("/execute/sync", {"script": script, "args": []})
            if key:
                b.type("#vkey", key)
            b.click("#verify")
            wait_until("the verification", lambda: b.attr("#result", "data-verified") != "pending", 20)
            b.shot(name)
            return b.attr("#result", "data-verified"), b.text("#result")

        # Another key of the same name (a pinned key that is not this log's).
        vkey = b.s(f"/element/{b.one('#vkey')}/property/value").strip()
        name = vkey.split("+")[0]
        other = b"\x01" + os.urandom(32)
        kh = hashlib.sha256(name.encode() + b"\n" + other).digest()[:4].hex()
        got = verify_again("12-audit-entry-other-key", key=f"{name}+{kh}+{base64.b64encode(other).decode()}")
        check(got[0] == "false" and "no signature by" in got[1], f"another pinned key fails: {got[1]}")
        tamper_size = ("const e = document.getElementById('proof'); const l = e.dataset.note.split('\\n');"
                       " l[1] = String(BigInt(l[1]) + 1n); e.dataset.note = l.join('\\n');")
        got = verify_again("13-audit-entry-forged-checkpoint", script=tamper_size)
        check(got[0] == "false" and "signature does not verify" in got[1], f"a forged checkpoint fails: {got[1]}")
        tamper_entry = ("const e = document.getElementById('proof');"
                        " e.dataset.entry = e.dataset.entry.replace('\"allow\"', '\"deny\"');")
        got = verify_again("14-audit-entry-altered", script=tamper_entry)
        check(got[0] == "false" and "does not lead to the checkpoint root" in got[1], f"an altered entry fails: {got[1]}")
        b.go(console + f"/console/requests/{pending}")
        check("verdict" not in b.source(), "dana gets no review controls")

        # Her cookie and token, posted by hand.
        cookie = "__Host-sb-session=" + b.cookies()["__Host-sb-session"]
        b.go(console + "/console/")
        csrf = b.attr("input[name='csrf']", "value")
        form = urllib.parse.urlencode({"csrf": csrf, "verdict": "approve", "reason": "x"}).encode()
        path = console + f"/console/requests/{pending}/review"
        hdr = {"cookie": cookie, "content-type": "application/x-www-form-urlencoded", "origin": console}
        check(http("POST", path, form, hdr)[0] == 403, "dana's review post is refused")
        rv = urllib.parse.urlencode({"csrf": csrf, "kind": "prefix", "value": "spiffe://example.org/",
                                     "mode": "revoke", "reason": "x"}).encode()
        check(http("POST", console + "/console/revoke", rv, hdr)[0] == 403, "dana's revoke post is refused")
        check(http("POST", path, form, dict(hdr, origin="http://evil.example"))[0] == 403,
              "a cross-site post is refused")
        check(http("POST", path, urllib.parse.urlencode({"verdict": "approve", "reason": "x"}).encode(), hdr)[0] == 403,
              "a post without the anti-forgery token is refused")
        check(http("POST", path, form, dict(hdr, cookie=cookie[:-2] + "AA"))[0] == 401,
              "a tampered session cookie is refused")
        check(len([e for e in ledger(state) if e["kind"] == "review"]) == len(review),
              "none of the refused posts reviewed anything")

        # alice signs the CLI in through this browser, then uses it with no SVID.
        sign_in(b, console, "alice")
        # A fresh sign-in (what a profile's approval_max_auth_age asks for): the provider
        # authenticates her again although its own session is live, and she lands back on
        # the page she came from.
        b.go(console + f"/console/reauth?then=/console/requests/{pending}")
        wait_until("the provider's login form", lambda: b.find("input[name='login']") or
                   b.url().startswith(console), 20)
        check(bool(b.find("input[name='login']")), "a fresh sign-in makes the provider ask for the login again")
        b.shot("14b-fresh-sign-in")
        for _ in range(6):
            if b.url().startswith(console + "/console/requests/"):
                break
            if b.find("input[name='login']"):
                b.type("input[name='login']", "alice")
                b.type("input[name='password']", "any")
                b.click("button[type='submit']")
            elif b.find("button[type='submit']"):
                b.click("button[type='submit']")
            time.sleep(0.3)
        wait_until("the request page", lambda: b.url().startswith(console + f"/console/requests/{pending}"), 20)
        check(pending in b.source(), "after the fresh sign-in she is back on the request")
        cfg = os.path.join(tmp, "xdg")
        person_env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
        person_env["XDG_CONFIG_HOME"] = cfg
        login = subprocess.Popen(cli + ["login", "--oidc", "--console", console], env=person_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(login)
        url = None
        while url is None:
            line = login.stderr.readline()
            if not line:
                break
            if line.strip().startswith(console):
                url = line.strip()
        check(url is not None, "login prints the console URL")
        b.go(url)
        b.shot("15-cli-sign-in")
        check("Sign in the CLI" in b.source(), "the console asks alice to confirm the CLI sign-in")
        b.click("form[action='/console/cli'] button[type='submit']")
        out, err = login.communicate(timeout=30)
        b.shot("16-cli-signed-in")
        check(login.returncode == 0 and f"oidc:{issuer}#alice" in out, f"login completes ({err.strip()[-200:]})")
        check("close this tab" in b.source(), "the browser lands on the CLI's page")
        mode = os.stat(os.path.join(cfg, "spiffe-broker/session.json")).st_mode & 0o777
        check(mode == 0o600, "the session file is 0600")
        listed = subprocess.run(cli + ["requests", "--filter", "pending"] + conn, env=person_env, capture_output=True, text=True)
        check(listed.returncode == 0 and pending in listed.stdout, "as alice, with no SVID, the CLI lists requests")
        out = subprocess.run(cli + ["logout"], env=person_env, capture_output=True, text=True)
        check(out.returncode == 0 and '"ended_at_broker":true' in out.stdout, "logout ends the session at the broker")
    finally:
        if b:
            b.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots: {SHOTS}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("console browser check passed")


if __name__ == "__main__":
    main()
