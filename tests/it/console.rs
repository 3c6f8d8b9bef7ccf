//! The web console end to end over real HTTP against a running dev broker: a person signs
//! in (dev mode's demo sign-in), reviews a workload's pending request, and the workload
//! redeems it; the ledger names the person. Refusals: forged cross-site posts, missing
//! anti-forgery tokens, tampered cookies, ended sessions (idle and absolute, on the
//! manual clock), a bad or replayed sign-in, and an auditor who posts a review anyway.
//! The dev sign-in cannot be turned on by a config file.

use crate::common;

use std::time::Duration;

use common::*;
use spiffe_broker::proto::v1 as pb;

const DIGEST: &str = PUSH_DIGEST;

/// A cookie-less HTTP client: cookies are sent by hand, so each test says which.
struct Web {
    http: reqwest::Client,
    base: String,
}

struct Page {
    status: u16,
    body: String,
    cookies: Vec<String>,
}

impl Page {
    /// The value of hidden input `name` in the page.
    fn hidden(&self, name: &str) -> String {
        let key = format!("name=\"{name}\" value=\"");
        let at = self.body.find(&key).expect("hidden input") + key.len();
        self.body[at..].split('"').next().expect("value").to_owned()
    }

    /// The value of cookie `name` that the answer set.
    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies.iter().find_map(|c| {
            c.strip_prefix(&format!("{name}="))
                .and_then(|v| v.split(';').next())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        })
    }
}

impl Web {
    fn new(h: &Harness) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            base: format!("http://{}", h.env.http_addr),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let resp = req.send().await.expect("console answers");
        let status = resp.status().as_u16();
        let cookies = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let body = resp.text().await.expect("body");
        Page {
            status,
            body,
            cookies,
        }
    }

    async fn get(&self, path: &str, cookie: &str) -> Page {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .header("cookie", cookie),
        )
        .await
    }

    async fn post(
        &self,
        path: &str,
        cookie: &str,
        origin: Option<&str>,
        form: &[(&str, &str)],
    ) -> Page {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish(),
            );
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        self.send(req).await
    }

    /// Posts a review of request `id` from its page.
    async fn review(
        &self,
        cookie: &str,
        id: &str,
        csrf: &str,
        verdict: &str,
        reason: &str,
    ) -> Page {
        self.post(
            &format!("/console/requests/{id}/review"),
            cookie,
            Some(&self.base),
            &[("csrf", csrf), ("verdict", verdict), ("reason", reason)],
        )
        .await
    }

    /// Signs in as a demo person; the session cookie header.
    async fn sign_in(&self, person: &str) -> String {
        let page = self.get("/console/", "").await;
        assert_eq!(page.status, 200);
        assert!(
            page.body.contains("Dev sign-in"),
            "dev mode offers the demo people"
        );
        let binding = page.cookie("__Host-sb-signin").expect("binding cookie");
        let state = page.hidden("binding");
        let done = self
            .post(
                "/console/dev-signin",
                &format!("__Host-sb-signin={binding}"),
                Some(&self.base),
                &[("binding", &state), ("person", person)],
            )
            .await;
        assert_eq!(done.status, 200, "{}", done.body);
        let token = done.cookie("__Host-sb-session").expect("session cookie");
        let set = done
            .cookies
            .iter()
            .find(|c| c.starts_with("__Host-sb-session="))
            .expect("cookie");
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attr), "session cookie has {attr}: {set}");
        }
        format!("__Host-sb-session={token}")
    }
}

/// The deploy agent's registry push, which needs one approval: the pending request's id.
async fn pending_push(h: &Harness) -> (pb::IssueCredentialRequest, String) {
    let req = push_request();
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let ar = c
        .issue_credential(req.clone())
        .await
        .expect("pending")
        .into_inner()
        .access_request
        .expect("access request");
    (req, ar.id)
}

fn reviews_in_ledger(h: &Harness) -> usize {
    h.audit_bodies()
        .iter()
        .filter(|b| b["kind"] == "review")
        .count()
}

#[tokio::test]
async fn a_person_approves_in_the_console_and_the_workload_redeems() {
    let h = start().await;
    let web = Web::new(&h);
    let (req, id) = pending_push(&h).await;
    let alice = web.sign_in("alice").await;

    let queue = web.get("/console/", &alice).await;
    assert_eq!(queue.status, 200);
    assert!(
        queue.body.contains(&id),
        "the queue lists the pending request"
    );
    for header in ["content-security-policy", "x-frame-options"] {
        let r = web
            .http
            .get(format!("{}/console/", web.base))
            .header("cookie", &alice)
            .send()
            .await
            .expect("answer");
        assert!(r.headers().get(header).is_some(), "{header} is set");
    }
    let page = web.get(&format!("/console/requests/{id}"), &alice).await;
    assert!(page.body.contains("push-model") && page.body.contains("CHG-1234"));
    assert!(page.body.contains(DIGEST), "the artifact digest is shown");
    let csrf = page.hidden("csrf");
    let done = web
        .review(
            &alice,
            &id,
            &csrf,
            "approve",
            "digest matches release notes",
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("request is now approved"));

    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let issued = c
        .issue_credential(pb::IssueCredentialRequest {
            access_request_id: id.clone(),
            ..req
        })
        .await
        .expect("the approved request redeems")
        .into_inner();
    assert!(issued.credential.is_some());

    let bodies = h.audit_bodies();
    let review = bodies
        .iter()
        .find(|b| b["kind"] == "review")
        .expect("review entry");
    assert_eq!(review["caller"], "oidc:dev#alice");
    assert_eq!(review["auth_method"], "dev-sign-in");
    assert_eq!(review["caller_person"]["email"], "alice@example.org");
    assert_eq!(review["reason"], "digest matches release notes");
    let issue = bodies
        .iter()
        .find(|b| b["kind"] == "issue")
        .expect("issue entry");
    assert_eq!(issue["approvals"][0]["reviewer"], "oidc:dev#alice");
    assert!(bodies
        .iter()
        .any(|b| b["kind"] == "sign_in" && b["caller"] == "oidc:dev#alice"));
}

#[tokio::test]
async fn forged_posts_tampered_cookies_and_ended_sessions_change_nothing() {
    let h = start().await;
    let web = Web::new(&h);
    let (_, id) = pending_push(&h).await;
    let bob = web.sign_in("bob").await;
    let csrf = web
        .get(&format!("/console/requests/{id}"), &bob)
        .await
        .hidden("csrf");
    let path = format!("/console/requests/{id}/review");
    let form = |t: &'static str| {
        [
            ("csrf", t),
            ("verdict", "approve"),
            ("reason", "looks fine"),
        ]
    };

    // A cross-site page posting with the person's cookie (were it sent) and the token.
    let forged = web
        .post(
            &path,
            &bob,
            Some("http://evil.example"),
            &[("csrf", &csrf), ("verdict", "approve"), ("reason", "x")],
        )
        .await;
    assert_eq!(forged.status, 403);
    assert!(forged.body.contains("cross-site"));
    // No anti-forgery token, or a wrong one.
    assert_eq!(
        web.post(&path, &bob, Some(&web.base), &form(""))
            .await
            .status,
        403
    );
    assert_eq!(
        web.post(&path, &bob, Some(&web.base), &form("guess"))
            .await
            .status,
        403
    );
    // A tampered session cookie is no session.
    let tampered = format!("{}x", bob);
    assert_eq!(
        web.post(
            &path,
            &tampered,
            Some(&web.base),
            &[("csrf", &csrf), ("verdict", "approve"), ("reason", "x")]
        )
        .await
        .status,
        401
    );
    assert!(web
        .get("/console/", &tampered)
        .await
        .body
        .contains("Sign in"));
    assert_eq!(reviews_in_ledger(&h), 0, "nothing was reviewed");

    // Idle for longer than the idle timeout (30m): the session has ended.
    h.clock.advance(Duration::from_secs(31 * 60));
    let late = web
        .post(
            &path,
            &bob,
            Some(&web.base),
            &[("csrf", &csrf), ("verdict", "approve"), ("reason", "x")],
        )
        .await;
    assert_eq!(late.status, 401);
    assert!(late.body.contains("session has ended"));

    // Used now and then, a session still ends 8h after sign-in.
    let carol = web.sign_in("alice").await;
    for _ in 0..16 {
        h.clock.advance(Duration::from_secs(29 * 60));
        assert!(web
            .get("/console/", &carol)
            .await
            .body
            .contains("Approval queue"));
    }
    h.clock.advance(Duration::from_secs(20 * 60));
    assert!(web.get("/console/", &carol).await.body.contains("Sign in"));
    assert_eq!(reviews_in_ledger(&h), 0);

    // Signed out: the same cookie no longer works.
    let dana = web.sign_in("alice").await;
    let token = web.get("/console/", &dana).await.hidden("csrf");
    let out = web
        .post(
            "/console/signout",
            &dana,
            Some(&web.base),
            &[("csrf", &token)],
        )
        .await;
    assert_eq!(out.status, 303);
    assert!(web.get("/console/", &dana).await.body.contains("Sign in"));
}

#[tokio::test]
async fn sign_ins_are_bound_to_their_browser_and_used_once() {
    let h = start().await;
    let web = Web::new(&h);
    let page = web.get("/console/", "").await;
    let binding = page.cookie("__Host-sb-signin").expect("binding cookie");
    let state = page.hidden("binding");
    // Without the binding cookie (a login-CSRF attempt from another browser).
    let other = web
        .post(
            "/console/dev-signin",
            "",
            Some(&web.base),
            &[("binding", &state), ("person", "alice")],
        )
        .await;
    assert_eq!(other.status, 400);
    assert!(other.cookie("__Host-sb-session").is_none());
    // The state was used up by that attempt: the right browser must start again.
    let replay = web
        .post(
            "/console/dev-signin",
            &format!("__Host-sb-signin={binding}"),
            Some(&web.base),
            &[("binding", &state), ("person", "alice")],
        )
        .await;
    assert_eq!(replay.status, 400);
    assert!(replay.body.contains("unknown or already used"));
    // An unknown demo person.
    let page = web.get("/console/", "").await;
    let nobody = web
        .post(
            "/console/dev-signin",
            &format!(
                "__Host-sb-signin={}",
                page.cookie("__Host-sb-signin").expect("cookie")
            ),
            Some(&web.base),
            &[("binding", &page.hidden("binding")), ("person", "mallory")],
        )
        .await;
    assert_eq!(nobody.status, 400);
    // A provider callback with a state this broker never issued.
    let cb = web.get("/console/callback?code=abc&state=forged", "").await;
    assert_eq!(cb.status, 400);
    // A provider that is not configured.
    let unknown = web.get("/console/signin/7", "").await;
    assert!(
        unknown.body.contains("no OpenID Provider"),
        "{}",
        unknown.body
    );
    let refused: Vec<_> = h
        .audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == "authn_failure" && b["request"]["rpc"] == "ConsoleSignIn")
        .collect();
    assert!(
        refused.len() >= 4,
        "refused sign-ins are on the ledger: {refused:?}"
    );
    assert!(h.audit_bodies().iter().all(|b| b["kind"] != "sign_in"));
}

#[tokio::test]
async fn an_auditor_reads_and_proves_the_log_but_cannot_approve_or_revoke() {
    let h = start().await;
    let web = Web::new(&h);
    let (_, id) = pending_push(&h).await;
    let auditor = web.sign_in("auditor").await;
    let home = web.get("/console/", &auditor).await;
    assert!(
        home.body.contains("/console/audit"),
        "the auditor sees the log"
    );
    assert!(!home.body.contains("/console/leases"), "but not the leases");
    let page = web.get(&format!("/console/requests/{id}"), &auditor).await;
    assert_eq!(page.status, 200, "an auditor sees the request");
    assert!(page.body.contains("push-model"));
    assert!(
        !page.body.contains("verdict"),
        "but gets no review controls"
    );
    let csrf = home.hidden("csrf");
    let posted = web.review(&auditor, &id, &csrf, "approve", "sneaky").await;
    assert_eq!(posted.status, 403);
    assert_eq!(reviews_in_ledger(&h), 0);
    let revoke = web
        .post(
            "/console/revoke",
            &auditor,
            Some(&web.base),
            &[
                ("csrf", &csrf),
                ("kind", "prefix"),
                ("value", "spiffe://example.org/"),
                ("mode", "revoke"),
                ("reason", "x"),
            ],
        )
        .await;
    assert_eq!(revoke.status, 403);
    assert!(
        revoke.body.contains("not a platform admin"),
        "{}",
        revoke.body
    );

    let log = web.get("/console/audit", &auditor).await;
    assert_eq!(log.status, 200);
    let entry = web.get("/console/audit/1", &auditor).await;
    assert_eq!(entry.status, 200);
    assert!(entry.body.contains("id=\"proof\"") && entry.body.contains("data-note="));
    assert!(entry.body.contains("/console/verify.js"));
}

#[tokio::test]
async fn a_platform_admin_previews_then_revokes_and_the_feed_carries_it() {
    let h = start().await;
    let web = Web::new(&h);
    let mut c = h.broker_as(PROVISIONER).await;
    let lease = c
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease");
    let root = web.sign_in("root").await;
    let leases = web.get("/console/leases", &root).await;
    assert!(leases.body.contains(&lease.id));
    let csrf = leases.hidden("csrf");
    let form = |mode: &'static str| {
        vec![
            ("csrf", csrf.clone()),
            ("kind", "spiffe-id".to_owned()),
            ("value", PROVISIONER.to_owned()),
            ("mode", mode.to_owned()),
            ("reason", "rotating the provisioner".to_owned()),
        ]
    };
    let preview_form = form("preview");
    let refs: Vec<(&str, &str)> = preview_form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let preview = web
        .post("/console/revoke", &root, Some(&web.base), &refs)
        .await;
    assert_eq!(preview.status, 200, "{}", preview.body);
    assert!(preview.body.contains("1 active lease(s) would be revoked"));
    let (_, feed) = h.http_get("/revocations?since=0").await;
    assert!(!feed.contains(&lease.id), "a preview changes nothing");

    let revoke_form = form("revoke");
    let refs: Vec<(&str, &str)> = revoke_form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let done = web
        .post("/console/revoke", &root, Some(&web.base), &refs)
        .await;
    assert!(done.body.contains("Revoked 1 lease(s)"), "{}", done.body);
    let (_, feed) = h.http_get("/revocations?since=0").await;
    assert!(feed.contains(&lease.id), "the feed carries the revocation");
    let revoke = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "revoke")
        .expect("revoke entry");
    assert_eq!(revoke["caller"], "oidc:dev#root");
    assert_eq!(revoke["reason"], "rotating the provisioner");
}

#[test]
fn no_config_file_turns_on_the_dev_sign_in() {
    let base = spiffe_broker::dev::DEMO_CONFIG
        .replace("@STATE_DIR@", "/tmp/x")
        .replace("@GRPC@", "127.0.0.1:1")
        .replace("@HTTP@", "127.0.0.1:2")
        .replace("@SOCKET@", "/tmp/x.sock")
        .replace("@VAULT_ADDR@", spiffe_broker::dev::DEFAULT_VAULT_ADDR)
        .replace("@STS_ENDPOINT@", spiffe_broker::dev::DEFAULT_STS_ENDPOINT);
    let config = spiffe_broker::config::Config::from_toml(&base).expect("demo config");
    assert!(!config.console.expect("console").dev_sign_in);
    let forced = base.replace(
        "idle_timeout = \"30m\"",
        "idle_timeout = \"30m\"\ndev_sign_in = true",
    );
    let err = spiffe_broker::config::Config::from_toml(&forced).expect_err("refused");
    assert!(err.to_string().contains("dev_sign_in"), "{err}");
}

#[tokio::test]
async fn a_profile_that_wants_a_fresh_sign_in_gets_one_before_a_review() {
    let h = start_with(Some(Box::new(|c: String| {
        c.replacen(
            "approval_ttl = \"1h\"",
            "approval_ttl = \"1h\"\napproval_max_auth_age = \"10m\"",
            1,
        )
    })))
    .await;
    let web = Web::new(&h);
    let (_, id) = pending_push(&h).await;
    let alice = web.sign_in("alice").await;
    let fresh = web.get(&format!("/console/requests/{id}"), &alice).await;
    assert!(fresh.body.contains("verdict"), "a fresh sign-in may review");

    h.clock.advance(Duration::from_secs(11 * 60));
    let page = web.get(&format!("/console/requests/{id}"), &alice).await;
    assert!(!page.body.contains("verdict"), "no form on a stale sign-in");
    assert!(page.body.contains("Sign in again to review"));
    assert!(page
        .body
        .contains("/console/reauth?then=/console/requests/"));
    let csrf = page.hidden("csrf");
    let stale = web.review(&alice, &id, &csrf, "approve", "ok").await;
    assert_eq!(stale.status, 403);
    assert!(stale.body.contains("sign in again"), "{}", stale.body);
    assert_eq!(reviews_in_ledger(&h), 0);
    assert!(h
        .audit_bodies()
        .iter()
        .any(|b| b["kind"] == "deny" && b["rule"] == "profile/approval_max_auth_age"));

    // Signing in again (the dev sign-in stands in for the provider's max_age=0 login).
    let again = web.sign_in("alice").await;
    let page = web.get(&format!("/console/requests/{id}"), &again).await;
    let done = web
        .review(
            &again,
            &id,
            &page.hidden("csrf"),
            "approve",
            "re-authenticated",
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(reviews_in_ledger(&h), 1);
}

#[tokio::test]
async fn an_operator_ends_a_persons_sessions() {
    let h = start().await;
    let web = Web::new(&h);
    let alice = web.sign_in("alice").await;
    let alice_again = web.sign_in("alice").await;
    let bob = web.sign_in("bob").await;
    // Not for approvers.
    assert_eq!(web.get("/console/sessions", &bob).await.status, 403);
    let root = web.sign_in("root").await;
    let page = web.get("/console/sessions", &root).await;
    assert!(page.body.contains("oidc:dev#alice") && page.body.contains("oidc:dev#bob"));
    let done = web
        .post(
            "/console/sessions/end",
            &root,
            Some(&web.base),
            &[("csrf", &page.hidden("csrf")), ("person", "oidc:dev#alice")],
        )
        .await;
    assert!(done.body.contains("Ended 2 session(s)"), "{}", done.body);
    for gone in [&alice, &alice_again] {
        assert!(web.get("/console/", gone).await.body.contains("Sign in"));
    }
    assert!(web
        .get("/console/", &bob)
        .await
        .body
        .contains("Approval queue"));
    assert!(h.audit_bodies().iter().any(|b| b["kind"] == "sign_in"
        && b["decision"] == "sessions_ended"
        && b["caller"] == "oidc:dev#root"));
}

const BIN: &str = env!("CARGO_BIN_EXE_spiffe-broker");

/// Runs the CLI as a person: no Workload API, `XDG_CONFIG_HOME` at `config`.
fn as_person(config: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("SPIFFE_BROKER_ADDR")
        .env("XDG_CONFIG_HOME", config);
    cmd
}

/// The value of the `url=` of a meta refresh, unescaped.
fn refresh_target(body: &str) -> String {
    let at = body.find("url=").expect("a meta refresh") + 4;
    body[at..]
        .split('"')
        .next()
        .expect("url")
        .replace("&amp;", "&")
}

// Multi-threaded: the CLI runs as a child process the test waits for, while the broker
// (in this process) serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_the_cli_in_and_reviews_without_an_svid() {
    let h = start().await;
    let web = Web::new(&h);
    let (_, id) = pending_push(&h).await;
    let config = tempfile::tempdir().expect("tempdir");
    let grpc = h.env.grpc_addr.to_string();

    // Before signing in: a clear refusal, not a Workload API timeout.
    let out = as_person(config.path(), &["requests", "--broker", &grpc])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("login --oidc"));

    let mut login = as_person(config.path(), &["login", "--oidc", "--console", &web.base])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("login starts");
    let stderr = login.stderr.take().expect("stderr");
    let url = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.trim()
                    .strip_prefix("http://")
                    .map(|u| format!("http://{u}"))
            })
    })
    .await
    .expect("reader")
    .expect("login prints the URL");
    let path = url
        .strip_prefix(&web.base)
        .expect("the console's URL")
        .to_owned();

    // The browser: signed in to the console as alice, confirms.
    assert!(
        web.get(&path, "").await.body.contains("Sign in"),
        "sign-in first"
    );
    let alice = web.sign_in("alice").await;
    let page = web.get(&path, &alice).await;
    assert!(page.body.contains("Sign in the CLI"), "{}", page.body);
    let form = ["csrf", "port", "state", "challenge"].map(|k| (k, page.hidden(k)));
    let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let forged = web
        .post("/console/cli", &alice, Some("http://evil.example"), &refs)
        .await;
    assert_eq!(forged.status, 403, "a cross-site confirmation is refused");
    let done = web
        .post("/console/cli", &alice, Some(&web.base), &refs)
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let back = refresh_target(&done.body);
    assert!(back.starts_with("http://127.0.0.1:"), "{back}");
    let code = back
        .split("code=")
        .nth(1)
        .and_then(|c| c.split('&').next())
        .expect("code")
        .to_owned();
    let landed = web.http.get(&back).send().await.expect("the CLI answers");
    assert_eq!(landed.status().as_u16(), 200);
    let status = tokio::task::spawn_blocking(move || login.wait())
        .await
        .expect("join")
        .expect("login exits");
    assert!(status.success());
    let saved = config.path().join("spiffe-broker/session.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&saved).expect("saved").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // The code was used up: a second redemption (or one without the verifier) is refused.
    let replay = web
        .post(
            "/console/cli/token",
            "",
            None,
            &[("code", &code), ("verifier", "x")],
        )
        .await;
    assert_eq!(replay.status, 400);

    // As alice, with no SVID: list and approve over gRPC.
    let out = as_person(config.path(), &["requests", "--broker", &grpc])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = as_person(
        config.path(),
        &[
            "approve",
            &id,
            "--reason",
            "checked from the terminal",
            "--broker",
            &grpc,
        ],
    )
    .output()
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "review")
        .expect("review entry");
    assert_eq!(review["caller"], "oidc:dev#alice");
    assert_eq!(review["reason"], "checked from the terminal");
    // What alice may not do, she may not do from the CLI either.
    let out = as_person(config.path(), &["leases", "--broker", &grpc])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a platform admin"));

    // Signed out: the token is dead at the broker and gone from disk.
    let token =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&saved).expect("read"))
            .expect("json")["session"]
            .as_str()
            .expect("token")
            .to_owned();
    let out = as_person(config.path(), &["logout"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(!saved.exists());
    let mut admin = pb::approvals_client::ApprovalsClient::new(
        spiffe_broker::client::connect(
            &grpc,
            spiffe_broker::dev::BROKER_ID,
            &spiffe_broker::client::ClientIdentity::Anonymous {
                bundle: vec![h.env.ca.ca_der().clone()],
            },
        )
        .await
        .expect("connects"),
    );
    let mut req = tonic::Request::new(pb::ListAccessRequestsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Session {token}").parse().expect("metadata"),
    );
    let err = admin.list_access_requests(req).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}
