//! `spiffe-broker login`: a person signs the CLI in through the console, like a browser
//! sign-in but ending in the CLI. The CLI listens on a loopback port and opens
//! `/console/cli?port=P&state=S&challenge=C` (PKCE `S256`); the person, signed in to the
//! console (their provider, MFA and all), confirms; the browser is sent to
//! `http://127.0.0.1:P/callback` with a one-time code, which the CLI redeems here with
//! its verifier for a session token of its own. The CLI then sends
//! `authorization: Session <token>` on gRPC: `requests`, `approve`, `deny`, `leases`,
//! `revoke` and `audit` work for the person with no SVID, and the broker decides each
//! call as for the console.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::pages::{self, esc};
use super::{form, html, Console, Posted, Session};
use crate::broker::SESSION_SCHEME;

/// What the CLI asks for: the loopback port it listens on, its `state`, its PKCE challenge.
struct CliAsk {
    port: u16,
    state: String,
    challenge: String,
}

fn ask(q: &HashMap<String, String>) -> Result<CliAsk, &'static str> {
    let token = |s: &str, len: std::ops::RangeInclusive<usize>| {
        len.contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let port = q
        .get("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p >= 1024)
        .ok_or("the CLI's port is missing or not 1024..=65535")?;
    let state = q.get("state").cloned().unwrap_or_default();
    let challenge = q.get("challenge").cloned().unwrap_or_default();
    if !token(&state, 16..=128) || !token(&challenge, 43..=43) {
        return Err("the CLI's state or PKCE challenge is malformed");
    }
    Ok(CliAsk {
        port,
        state,
        challenge,
    })
}

fn cli_page(s: &Session, a: &CliAsk) -> String {
    let who = s.person.email.as_deref().unwrap_or(&s.person.id);
    let mut b = String::from("<h1>Sign in the command-line tool</h1><div class=\"card\">");
    let _ = write!(
        b,
        "<p>The <code>spiffe-broker</code> CLI on this computer (listening on port {}) asks to act \
         as <strong>{}</strong>: to list, approve and deny requests, and whatever else you may do \
         here, for as long as a console session lasts. Continue only if you just ran \
         <code>spiffe-broker login</code>.</p>\
         <form method=\"post\" action=\"/console/cli\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"port\" value=\"{}\">\
         <input type=\"hidden\" name=\"state\" value=\"{}\"><input type=\"hidden\" name=\"challenge\" value=\"{}\">\
         <div class=\"actions\"><button type=\"submit\">Sign in the CLI</button>\
         <a class=\"button deny\" href=\"/console/\">Cancel</a></div></form></div>",
        a.port,
        esc(who),
        esc(&s.csrf),
        a.port,
        esc(&a.state),
        esc(&a.challenge)
    );
    b
}

/// `GET /console/cli?port=&state=&challenge=`: the confirmation page (after sign-in).
pub(super) async fn confirm(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let a = match ask(&q) {
        Ok(a) => a,
        Err(e) => return super::refused(StatusCode::BAD_REQUEST, None, e),
    };
    let Some(s) = c.session(&headers) else {
        let then = format!(
            "/console/cli?port={}&state={}&challenge={}",
            a.port, a.state, a.challenge
        );
        return super::sign_in::sign_in_page(&c, Some("sign in to sign in the CLI"), Some(&then));
    };
    html(
        StatusCode::OK,
        pages::page("Sign in the CLI", Some(&s), &cli_page(&s, &a)),
        &[],
    )
}

/// `POST /console/cli`: the person confirmed; the browser goes back to the CLI with a
/// one-time code (a page that navigates, not a redirect: the CSP's `form-action` would
/// stop a form's redirect to another origin).
pub(super) async fn approve(
    State(c): State<Arc<Console>>,
    Posted { session, form }: Posted,
) -> Response {
    let a = match ask(&form) {
        Ok(a) => a,
        Err(e) => return super::refused(StatusCode::BAD_REQUEST, Some(&session), e),
    };
    let code = match c.sessions.grant_cli(&session, &a.challenge) {
        Ok(code) => code,
        Err(e) => {
            return super::refused(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(&session),
                &e.to_string(),
            )
        }
    };
    let url = format!(
        "http://127.0.0.1:{}/callback?code={code}&state={}",
        a.port, a.state
    );
    let body = format!(
        "<meta http-equiv=\"refresh\" content=\"0;url={u}\">\
         <p class=\"notice\">Handing the sign-in to the CLI… <a href=\"{u}\">continue</a></p>",
        u = esc(&url)
    );
    html(
        StatusCode::OK,
        pages::page("Sign in the CLI", Some(&session), &body),
        &[],
    )
}

/// `POST /console/cli/token` (`code`, `verifier`): the CLI's session token, the person,
/// and the trust bundle to verify the gRPC listener with. Not a browser call: no cookie.
pub(super) async fn token(State(c): State<Arc<Console>>, body: Bytes) -> Response {
    let f = form(&body);
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    match c.sessions.redeem_cli(get("code"), get("verifier")) {
        Ok((token, s)) => {
            let caller = Console::caller(&s);
            c.broker
                .record_session(&caller, "allow", "signed in the command-line tool")
                .await;
            let ttl = c.sessions.config().session_ttl.as_secs() as i64;
            Json(serde_json::json!({
                "session": token,
                "expires_at": s.created_at + ttl,
                "person": s.person.id,
                "email": s.person.email,
                "bundle_pem": (c.bundle_pem)(),
            }))
            .into_response()
        }
        Err(e) => {
            c.broker
                .record_sign_in_refused(
                    crate::authn::AuthMethod::OidcSession,
                    None,
                    &e.to_string(),
                    None,
                )
                .await;
            (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

/// `POST /console/cli/signout` with `authorization: Session <token>`: ends that session.
pub(super) async fn sign_out(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(SESSION_SCHEME));
    match token.and_then(|t| c.sessions.end(t.trim())) {
        Some(s) => {
            c.broker
                .record_session(
                    &Console::caller(&s),
                    "sign_out",
                    "signed out of the command-line tool",
                )
                .await;
            StatusCode::NO_CONTENT.into_response()
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}
