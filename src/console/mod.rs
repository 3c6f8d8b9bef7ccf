//! The web console, on the HTTP listener under `/console/`: people sign in through an
//! OpenID Provider (or, in `spiffe-broker dev` only, as a demo person), see the requests
//! waiting for them, and approve or deny with a reason. Their reviews go through the same
//! use case as a workload's ([`Broker::review`]) with the person as the caller, so the
//! ledger names `oidc:<issuer>#<sub>` beside the approval.
//!
//! Every page is server-rendered without script under a strict Content Security Policy;
//! every state change is a POST carrying the session's anti-forgery token from a page of
//! the console's own origin (`Origin` / `Sec-Fetch-Site` checked too); the session cookie
//! is `__Host-`, `HttpOnly`, `Secure`, `SameSite=Strict`.

mod audit;
mod operate;
mod pages;
mod session;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::authn::{AuthMethod, VerifiedCaller};
use crate::broker::{Broker, RequestListing};
use crate::config::{ConsoleConfig, OidcProviderConfig};
use crate::domain::{Person, Verdict};
use crate::error::BrokerError;
use crate::oidc::{random_token, SignInError};
pub use session::{Session, Sessions};

const SESSION_COOKIE: &str = "__Host-sb-session";
const BINDING_COOKIE: &str = "__Host-sb-signin";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Dev mode's demo people: name, what they may do, roles, approver groups.
const DEV_PEOPLE: &[(&str, &str, &[&str], &[&str])] = &[
    ("alice", "registry approver", &[], &["registry-approvers"]),
    ("bob", "registry approver", &[], &["registry-approvers"]),
    ("root", "platform admin", &["platform-admin"], &[]),
    ("auditor", "read-only auditor", &["auditor"], &[]),
];

/// The console: the broker it acts on and its people's sessions.
pub struct Console {
    broker: Arc<Broker>,
    sessions: Sessions,
    /// The HTTP listener's public URL (the broker's `issuer_url`).
    base: String,
}

impl Console {
    /// The console of `broker`, reached at `base` (scheme, host and port, no path).
    pub fn new(broker: Arc<Broker>, cfg: ConsoleConfig, base: &str) -> Self {
        let clock = broker.clock().clone();
        Self {
            broker,
            sessions: Sessions::new(cfg, clock),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// The sessions (an operator ends a person's sessions here).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/console/", get(home))
        .route("/console", get(|| async { redirect("/console/", &[]) }))
        .route("/console/console.css", get(css))
        .route("/console/signin/{provider}", get(sign_in))
        .route("/console/callback", get(callback))
        .route("/console/dev-signin", post(dev_sign_in))
        .route("/console/signout", post(sign_out))
        .route("/console/requests/{id}", get(request_page))
        .route("/console/requests/{id}/review", post(review))
        .route("/console/leases", get(operate::leases))
        .route("/console/revoke", post(operate::revoke))
        .route("/console/inventory", get(operate::inventory))
        .route("/console/audit", get(audit::entries))
        .route("/console/audit/{seq}", get(audit::entry))
        .route("/console/verify.js", get(verify_js))
        .with_state(console)
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: under it a browser sends `Origin: null` on the console's own form
    // posts, which the origin check must then refuse.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn with_cookies(mut r: Response, cookies: &[String]) -> Response {
    secure_headers(r.headers_mut());
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

fn html(status: StatusCode, body: String, cookies: &[String]) -> Response {
    let r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    with_cookies(r, cookies)
}

fn redirect(to: &str, cookies: &[String]) -> Response {
    with_cookies(
        (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response(),
        cookies,
    )
}

fn cookie(name: &str, value: &str, max_age: i64, same_site: &str) -> String {
    format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite={same_site}")
}

fn read_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn form(body: &Bytes) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The page of a refusal, with the reason.
fn refused(status: StatusCode, session: Option<&Session>, text: &str) -> Response {
    html(
        status,
        pages::page("Refused", session, &pages::notice(text, true)),
        &[],
    )
}

impl Console {
    /// The signed-in person of a request, if its session cookie names a live session.
    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        self.sessions.get(read_cookie(headers, SESSION_COOKIE)?)
    }

    /// A POST from one of the console's own pages in a live session: the session's
    /// anti-forgery token in the form, and no cross-site origin.
    fn posted(
        &self,
        headers: &HeaderMap,
        form: &std::collections::HashMap<String, String>,
    ) -> Result<Session, Box<Response>> {
        if !self.same_origin(headers) {
            return Err(Box::new(refused(
                StatusCode::FORBIDDEN,
                None,
                "cross-site request refused",
            )));
        }
        let Some(s) = self.session(headers) else {
            return Err(Box::new(refused(
                StatusCode::UNAUTHORIZED,
                None,
                "your session has ended: sign in again",
            )));
        };
        match form.get("csrf") {
            Some(t) if session::same_secret(t, &s.csrf) => Ok(s),
            _ => Err(Box::new(refused(
                StatusCode::FORBIDDEN,
                Some(&s),
                "the form's anti-forgery token is missing or wrong: reload the page",
            ))),
        }
    }

    fn same_origin(&self, headers: &HeaderMap) -> bool {
        if let Some(o) = headers.get(header::ORIGIN) {
            return o.to_str().is_ok_and(|o| o == self.base);
        }
        headers
            .get("sec-fetch-site")
            .is_none_or(|v| v.as_bytes() == b"same-origin")
    }

    fn caller(s: &Session) -> VerifiedCaller {
        VerifiedCaller::signed_in(s.person.clone(), s.dev)
    }

    fn session_cookie(&self, token: &str) -> String {
        let ttl = self.sessions.config().session_ttl.as_secs() as i64;
        cookie(SESSION_COOKIE, token, ttl, "Strict")
    }
}

/// A person as policy sees them: the provider's claims through the config's rules.
fn person_of(cfg: &OidcProviderConfig, p: crate::oidc::Person) -> Person {
    let rules = cfg
        .claim_rules
        .iter()
        .filter(|r| p.groups.contains(&r.group));
    let mut roles: Vec<String> = rules.clone().flat_map(|r| r.roles.clone()).collect();
    let mut groups: Vec<String> = rules.flat_map(|r| r.approver_groups.clone()).collect();
    roles.sort_unstable();
    roles.dedup();
    groups.sort_unstable();
    groups.dedup();
    Person {
        id: p.id,
        email: p.email,
        name: p.name,
        roles,
        approver_groups: groups,
        auth_time: p.auth_time,
    }
}

async fn css() -> Response {
    let mut r = (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::CSS,
    )
        .into_response();
    secure_headers(r.headers_mut());
    r
}

async fn verify_js() -> Response {
    let mut r = (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        audit::VERIFY_JS,
    )
        .into_response();
    secure_headers(r.headers_mut());
    r
}

/// The console's pages a person may use (the broker decides each action again).
fn nav(broker: &Broker, caller: &VerifiedCaller) -> Vec<(&'static str, &'static str)> {
    use crate::policy::AdminAction;
    let policy = broker.policy();
    let may = |a| policy.authorize_admin(caller.principal(), a).is_ok();
    let mut links = vec![("/console/", "Approval queue")];
    if may(AdminAction::ListLeases) {
        links.push(("/console/leases", "Leases"));
    }
    if may(AdminAction::ReadLog) {
        links.push(("/console/audit", "Audit log"));
    }
    if may(AdminAction::ListIdentities) {
        links.push(("/console/inventory", "Inventory"));
    }
    links
}

async fn home(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(s) = c.session(&headers) else {
        return sign_in_page(&c, None);
    };
    let caller = Console::caller(&s);
    match c
        .broker
        .access_requests(&caller, RequestListing::ToReview, 200)
        .await
    {
        Ok(rows) => {
            let now = c.broker.clock().unix_seconds();
            html(
                StatusCode::OK,
                pages::page("Approval queue", Some(&s), &pages::queue(&rows, now)),
                &[],
            )
        }
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, Some(&s), &e.to_string()),
    }
}

fn sign_in_page(c: &Console, error: Option<&str>) -> Response {
    let providers = c
        .broker
        .oidc()
        .map(|o| o.sign_in_choices())
        .unwrap_or_default();
    let mut cookies = Vec::new();
    let mut body = error.map(|e| pages::notice(e, true)).unwrap_or_default();
    let people: Vec<(&str, &str)> = DEV_PEOPLE.iter().map(|(n, w, _, _)| (*n, *w)).collect();
    let mut dev_state = None;
    if c.sessions.config().dev_sign_in {
        // A dev sign-in is bound to this browser like a provider's: a one-use state in the
        // form, its binding in a cookie.
        match (random_token(), random_token()) {
            (Ok(state), Ok(binding)) => {
                if c.sessions.hold(state.clone(), None, &binding).is_ok() {
                    cookies.push(cookie(BINDING_COOKIE, &binding, 600, "Lax"));
                    dev_state = Some(state);
                }
            }
            _ => body.push_str(&pages::notice("no randomness for a sign-in", true)),
        }
    }
    body.push_str(&pages::sign_in(
        &providers,
        dev_state.as_deref().map(|s| (people.as_slice(), s)),
    ));
    html(
        StatusCode::OK,
        pages::page("Sign in", None, &body),
        &cookies,
    )
}

async fn sign_in(State(c): State<Arc<Console>>, Path(provider): Path<usize>) -> Response {
    let Some(oidc) = c.broker.oidc() else {
        return sign_in_page(&c, Some("no OpenID Provider is configured"));
    };
    let redirect_uri = format!("{}/console/callback", c.base);
    let begun = oidc.begin(provider, &redirect_uri, None).await;
    let (url, pending) = match begun {
        Ok(v) => v,
        Err(e) => return sign_in_page(&c, Some(&e.to_string())),
    };
    let binding = match random_token() {
        Ok(b) => b,
        Err(e) => return sign_in_page(&c, Some(&e.to_string())),
    };
    if let Err(e) = c
        .sessions
        .hold(pending.state.clone(), Some(pending), &binding)
    {
        return sign_in_page(&c, Some(&e.to_string()));
    }
    redirect(&url, &[cookie(BINDING_COOKIE, &binding, 600, "Lax")])
}

#[derive(serde::Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn callback(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let done = async {
        if let Some(e) = &q.error {
            return Err(SignInError::Refused(format!(
                "the provider answered {:?}",
                crate::domain::truncate(e)
            )));
        }
        let (Some(code), Some(state)) = (&q.code, &q.state) else {
            return Err(SignInError::Refused(
                "the callback has no code or state".into(),
            ));
        };
        let pending = c
            .sessions
            .take(state, read_cookie(&headers, BINDING_COOKIE))?
            .ok_or_else(|| SignInError::Refused("not a provider's sign-in".into()))?;
        let oidc = c
            .broker
            .oidc()
            .ok_or_else(|| SignInError::Unavailable("no OpenID Provider".into()))?;
        let cfg = oidc
            .provider_config(oidc.provider_of(&pending))
            .cloned()
            .ok_or_else(|| SignInError::Unavailable("the provider is gone".into()))?;
        let person = oidc.finish(pending, code).await?;
        Ok(person_of(&cfg, person))
    }
    .await;
    finish_sign_in(&c, done, false).await
}

async fn finish_sign_in(c: &Console, done: Result<Person, SignInError>, dev: bool) -> Response {
    let method = if dev {
        AuthMethod::DevSignIn
    } else {
        AuthMethod::OidcSession
    };
    let clear = cookie(BINDING_COOKIE, "", 0, "Lax");
    let person = match done {
        Ok(p) => p,
        Err(e) => {
            c.broker
                .record_sign_in_refused(method, None, &e.to_string(), None)
                .await;
            let status = match e {
                SignInError::Refused(_) => StatusCode::BAD_REQUEST,
                SignInError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = pages::notice(&e.to_string(), true)
                + "<p><a href=\"/console/\">Sign in again</a></p>";
            return html(
                status,
                pages::page("Sign-in refused", None, &body),
                &[clear],
            );
        }
    };
    let caller = VerifiedCaller::signed_in(person.clone(), dev);
    let token = match c.sessions.begin(person, dev, nav(&c.broker, &caller)) {
        Ok(t) => t,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, None, &e.to_string()),
    };
    c.broker
        .record_session(&caller, "allow", "signed in to the console")
        .await;
    // The provider's redirect made this a cross-site navigation, which does not carry
    // SameSite=Strict cookies: the next page is reached by a same-site navigation.
    let body = "<meta http-equiv=\"refresh\" content=\"0;url=/console/\">\
                <p><a href=\"/console/\">Continue to the console</a></p>";
    html(
        StatusCode::OK,
        pages::page("Signed in", None, body),
        &[c.session_cookie(&token), clear],
    )
}

async fn dev_sign_in(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    let done = async {
        if !c.sessions.config().dev_sign_in {
            return Err(SignInError::Refused("dev sign-in is not enabled".into()));
        }
        if !c.same_origin(&headers) {
            return Err(SignInError::Refused("cross-site request refused".into()));
        }
        let state = f.get("binding").map(String::as_str).unwrap_or_default();
        if c.sessions
            .take(state, read_cookie(&headers, BINDING_COOKIE))?
            .is_some()
        {
            return Err(SignInError::Refused("not a dev sign-in".into()));
        }
        let name = f.get("person").map(String::as_str).unwrap_or_default();
        let (n, _, roles, groups) = DEV_PEOPLE
            .iter()
            .find(|(n, ..)| *n == name)
            .ok_or_else(|| SignInError::Refused("no such demo person".into()))?;
        Ok(Person {
            id: format!("oidc:dev#{n}"),
            email: Some(format!("{n}@example.org")),
            name: Some((*n).to_owned()),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            approver_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            auth_time: c.broker.clock().unix_seconds(),
        })
    }
    .await;
    finish_sign_in(&c, done, true).await
}

async fn sign_out(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match c.posted(&headers, &form(&body)) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    if let Some(token) = read_cookie(&headers, SESSION_COOKIE) {
        c.sessions.end(token);
    }
    c.broker
        .record_session(&Console::caller(&s), "sign_out", "signed out")
        .await;
    redirect("/console/", &[cookie(SESSION_COOKIE, "", 0, "Strict")])
}

async fn request_page(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(s) = c.session(&headers) else {
        return sign_in_page(&c, Some("sign in to see this request"));
    };
    show_request(&c, &s, &id, None).await
}

/// A request's page; `note` is a notice above it (an error when its status is not 200).
async fn show_request(
    c: &Console,
    s: &Session,
    id: &str,
    note: Option<(&str, StatusCode)>,
) -> Response {
    let caller = Console::caller(s);
    let ar = match c.broker.access_request(&caller, id).await {
        Ok(ar) => ar,
        Err(e) => return refused(StatusCode::NOT_FOUND, Some(s), &e.to_string()),
    };
    let can_review = c
        .broker
        .policy()
        .authorize_review(caller.principal(), ar.profile.as_str())
        .is_ok();
    let now = c.broker.clock().unix_seconds();
    let status = note.map_or(StatusCode::OK, |(_, status)| status);
    let mut body = note
        .map(|(t, _)| pages::notice(t, status != StatusCode::OK))
        .unwrap_or_default();
    body.push_str(&pages::request(&ar, s, can_review, now));
    html(status, pages::page("Request", Some(s), &body), &[])
}

async fn review(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let s = match c.posted(&headers, &f) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let verdict = match f.get("verdict").map(String::as_str) {
        Some("approve") => Verdict::Approve,
        Some("deny") => Verdict::Deny,
        _ => {
            return show_request(
                &c,
                &s,
                &id,
                Some(("choose approve or deny", StatusCode::BAD_REQUEST)),
            )
            .await
        }
    };
    let reason = f
        .get("reason")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    match c
        .broker
        .review(&Console::caller(&s), &id, verdict, reason)
        .await
    {
        Ok(ar) => {
            let text = format!(
                "Recorded: {} (request is now {}).",
                verdict.as_str(),
                ar.state.as_str()
            );
            show_request(&c, &s, &id, Some((&text, StatusCode::OK))).await
        }
        Err(e) => show_request(&c, &s, &id, Some((&e.to_string(), status_of(&e)))).await,
    }
}

/// The HTTP status of a refusal the broker gave a person at the console.
fn status_of(e: &BrokerError) -> StatusCode {
    match e {
        BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        BrokerError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        BrokerError::InvalidArgument(_) | BrokerError::OutOfRange(_) => StatusCode::BAD_REQUEST,
        BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
        BrokerError::FailedPrecondition(_) => StatusCode::CONFLICT,
        BrokerError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        BrokerError::Unavailable(_) | BrokerError::BackendUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
