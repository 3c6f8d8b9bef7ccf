//! The web console, on the HTTP listener under `/console/`: people sign in through an
//! OpenID Provider (or, in `spiffe-broker dev` only, as a demo person), see the requests
//! waiting for them, and approve or deny with a reason. Their reviews go through the same
//! use case as a workload's ([`Broker::review`]) with the person as the caller, so the
//! ledger names `oidc:<issuer>#<sub>` beside the approval.
//!
//! Pages: the approval queue and each request (review with a reason, or a fresh sign-in
//! first where the profile asks for one); for platform admins the leases (revoke by any
//! selector, dry run first), the identity inventory and the live sessions (end a
//! person's); for auditors and admins the audit log, each entry's inclusion proof
//! verified in the browser.
//!
//! Every page is server-rendered under a strict Content Security Policy (the one script,
//! the audit entry's verifier, is served from the console itself); every state change is a POST carrying the session's anti-forgery token from a page of
//! the console's own origin (`Origin` / `Sec-Fetch-Site` checked too); the session cookie
//! is `__Host-`, `HttpOnly`, `Secure`, `SameSite=Strict`.

mod audit;
mod cli;
mod operate;
mod pages;
mod sign_in;

use std::sync::Arc;

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::authn::VerifiedCaller;
use crate::broker::{Broker, RequestListing};
use crate::broker::{Session, Sessions};
use crate::domain::Verdict;
use crate::error::BrokerError;

const SESSION_COOKIE: &str = "__Host-sb-session";
const BINDING_COOKIE: &str = "__Host-sb-signin";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The trust bundle (PEM) a person's CLI verifies the broker's gRPC listener with.
pub type BundlePem = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The console: the broker it acts on and its people's sessions.
pub struct Console {
    broker: Arc<Broker>,
    sessions: Arc<Sessions>,
    /// The HTTP listener's public URL (the broker's `issuer_url`).
    base: String,
    bundle_pem: BundlePem,
}

impl Console {
    /// The console of `broker` (which keeps people's sessions: `Broker::with_sessions`),
    /// reached at `base` (scheme, host and port, no path).
    pub fn new(broker: Arc<Broker>, base: &str, bundle_pem: BundlePem) -> Option<Self> {
        Some(Self {
            sessions: broker.sessions()?.clone(),
            broker,
            base: base.trim_end_matches('/').to_owned(),
            bundle_pem,
        })
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/console/", get(home))
        .route("/console", get(|| async { redirect("/console/", &[]) }))
        .route("/console/console.css", get(css))
        .route("/console/signin/{provider}", get(sign_in::sign_in))
        .route("/console/reauth", get(sign_in::reauth))
        .route("/console/callback", get(sign_in::callback))
        .route("/console/dev-signin", post(sign_in::dev_sign_in))
        .route("/console/signout", post(sign_in::sign_out))
        .route("/console/requests/{id}", get(request_page))
        .route("/console/requests/{id}/review", post(review))
        .route("/console/leases", get(operate::leases))
        .route("/console/revoke", post(operate::revoke))
        .route("/console/inventory", get(operate::inventory))
        .route("/console/sessions", get(operate::sessions))
        .route("/console/sessions/end", post(operate::end_sessions))
        .route("/console/audit", get(audit::entries))
        .route("/console/audit/{seq}", get(audit::entry))
        .route("/console/verify.js", get(verify_js))
        .route("/console/cli", get(cli::confirm).post(cli::approve))
        .route("/console/cli/token", post(cli::token))
        .route("/console/cli/signout", post(cli::sign_out))
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

fn form(body: &Bytes) -> HashMap<String, String> {
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
        form: &HashMap<String, String>,
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
            Some(t) if crate::broker::same_secret(t, &s.csrf) => Ok(s),
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

    /// Ending people's sessions is an operator's revocation: the broker's `revoke` right.
    async fn may_end_sessions(&self, s: &Session) -> Result<String, BrokerError> {
        self.broker
            .admin(
                &Self::caller(s),
                crate::policy::AdminAction::Revoke,
                "EndSessions",
            )
            .await
    }

    fn caller(s: &Session) -> VerifiedCaller {
        VerifiedCaller::signed_in(s.person.clone(), s.dev)
    }

    fn session_cookie(&self, token: &str) -> String {
        let ttl = self.sessions.config().session_ttl.as_secs() as i64;
        cookie(SESSION_COOKIE, token, ttl, "Strict")
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
    if may(AdminAction::Revoke) {
        links.push(("/console/sessions", "Sessions"));
    }
    links
}

async fn home(State(c): State<Arc<Console>>, SignedIn(s): SignedIn) -> Response {
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
        Err(e) => broker_refused(&s, &e),
    }
}

async fn request_page(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    SignedIn(s): SignedIn,
) -> Response {
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
        Err(e) => return broker_refused(s, &e),
    };
    let controls = if c
        .broker
        .policy()
        .authorize_review(caller.principal(), ar.profile.as_str())
        .is_err()
    {
        pages::ReviewControls::None
    } else if let Some(max) = c.broker.fresh_sign_in_needed(&caller, ar.profile.as_str()) {
        pages::ReviewControls::FreshSignIn(crate::clock::format_duration(max))
    } else {
        pages::ReviewControls::Form
    };
    let now = c.broker.clock().unix_seconds();
    let status = note.map_or(StatusCode::OK, |(_, status)| status);
    let mut body = note
        .map(|(t, _)| pages::notice(t, status != StatusCode::OK))
        .unwrap_or_default();
    body.push_str(&pages::request(&ar, s, controls, now));
    html(status, pages::page("Request", Some(s), &body), &[])
}

async fn review(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    Posted {
        session: s,
        form: f,
    }: Posted,
) -> Response {
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

/// A form posted from one of the console's own pages in a live session, with its
/// anti-forgery token ([`Console::posted`]); anything else is answered with the refusal.
pub(super) struct Posted {
    session: Session,
    form: HashMap<String, String>,
}

impl axum::extract::FromRequest<Arc<Console>> for Posted {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, c: &Arc<Console>) -> Result<Self, Response> {
        let headers = req.headers().clone();
        let body = Bytes::from_request(req, c)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = form(&body);
        let session = c.posted(&headers, &form).map_err(|r| *r)?;
        Ok(Self { session, form })
    }
}

/// The page of a refusal the broker gave `s`, with its reason and status.
fn broker_refused(s: &Session, e: &BrokerError) -> Response {
    refused(status_of(e), Some(s), &e.to_string())
}

/// The signed-in person of a page; without a live session, the sign-in page (which
/// returns here afterwards) is the answer.
pub(super) struct SignedIn(Session);

impl axum::extract::FromRequestParts<Arc<Console>> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Arc<Console>,
    ) -> Result<Self, Response> {
        c.session(&parts.headers).map(Self).ok_or_else(|| {
            let here = parts.uri.path_and_query().map(|p| p.as_str());
            sign_in::sign_in_page(c, None, here)
        })
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
