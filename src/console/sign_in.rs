//! Signing in and out of the console: through an OpenID Provider (authorization code flow,
//! `crate::oidc`), or in dev mode as a demo person. Each sign-in is bound to the browser
//! that began it and used once; a refused one is recorded. `then` returns the person to
//! the page they came from (a request that needed a fresh sign-in, say): only console
//! paths are followed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::pages::{self, esc};
use super::{
    cookie, form, html, nav, read_cookie, redirect, refused, Console, Posted, BINDING_COOKIE,
    SESSION_COOKIE,
};
use crate::authn::{AuthMethod, VerifiedCaller};
use crate::config::OidcProviderConfig;
use crate::domain::Person;
use crate::oidc::{random_token, SignInError};

/// Dev mode's demo people: name, what they may do, roles, approver groups.
const DEV_PEOPLE: &[(&str, &str, &[&str], &[&str])] = &[
    ("alice", "registry approver", &[], &["registry-approvers"]),
    ("bob", "registry approver", &[], &["registry-approvers"]),
    ("root", "platform admin", &["platform-admin"], &[]),
    ("auditor", "read-only auditor", &["auditor"], &[]),
];

/// Where to go after signing in: a console page of this origin, or the queue.
fn then_path(then: Option<&str>) -> String {
    then.filter(|t| {
        t.starts_with("/console/")
            && t.len() <= 200
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.?=&".contains(&b))
            && !t.contains("//")
    })
    .unwrap_or("/console/")
    .to_owned()
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

/// The sign-in page: the providers, and in dev mode the demo people.
pub(super) fn sign_in_page(c: &Console, error: Option<&str>, then: Option<&str>) -> Response {
    let then = then_path(then);
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
                if c.sessions
                    .hold(state.clone(), None, &binding, Some(then.clone()))
                    .is_ok()
                {
                    cookies.push(cookie(BINDING_COOKIE, &binding, 600, "Lax"));
                    dev_state = Some(state);
                }
            }
            _ => body.push_str(&pages::notice("no randomness for a sign-in", true)),
        }
    }
    body.push_str(&pages::sign_in(
        &providers,
        &then,
        dev_state.as_deref().map(|s| (people.as_slice(), s)),
    ));
    html(
        StatusCode::OK,
        pages::page("Sign in", None, &body),
        &cookies,
    )
}

#[derive(serde::Deserialize)]
pub(super) struct SignInQuery {
    /// Ask the provider to authenticate the person again (`max_age=0`, `prompt=login`).
    #[serde(default)]
    fresh: bool,
    then: Option<String>,
}

/// `GET /console/signin/{provider}`: off to the provider.
pub(super) async fn sign_in(
    State(c): State<Arc<Console>>,
    Path(provider): Path<usize>,
    Query(q): Query<SignInQuery>,
) -> Response {
    let Some(oidc) = c.broker.oidc() else {
        let e = "no OpenID Provider is configured";
        c.broker
            .record_sign_in_refused(AuthMethod::OidcSession, None, e, None)
            .await;
        return sign_in_page(&c, Some(e), None);
    };
    let redirect_uri = format!("{}/console/callback", c.base);
    let begun = oidc
        .begin(provider, &redirect_uri, q.fresh.then_some(0))
        .await;
    let (url, pending) = match begun {
        Ok(v) => v,
        Err(e) => {
            c.broker
                .record_sign_in_refused(AuthMethod::OidcSession, None, &e.to_string(), None)
                .await;
            return sign_in_page(&c, Some(&e.to_string()), q.then.as_deref());
        }
    };
    let binding = match random_token() {
        Ok(b) => b,
        Err(e) => return sign_in_page(&c, Some(&e.to_string()), None),
    };
    let then = then_path(q.then.as_deref());
    if let Err(e) = c
        .sessions
        .hold(pending.state.clone(), Some(pending), &binding, Some(then))
    {
        return sign_in_page(&c, Some(&e.to_string()), None);
    }
    redirect(&url, &[cookie(BINDING_COOKIE, &binding, 600, "Lax")])
}

/// `GET /console/reauth?then=PATH`: a fresh sign-in with the provider of the person's
/// session (the demo sign-in again in dev mode), back to `then`.
pub(super) async fn reauth(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<SignInQuery>,
) -> Response {
    let provider = c.session(&headers).and_then(|s| {
        c.broker
            .oidc()
            .and_then(|o| o.provider_of_person(&s.person.id))
    });
    let then = then_path(q.then.as_deref());
    match provider {
        Some(p) => redirect(
            &format!(
                "/console/signin/{p}?fresh=true&then={}",
                form_urlencoded::byte_serialize(then.as_bytes()).collect::<String>()
            ),
            &[],
        ),
        None => sign_in_page(&c, Some("sign in again to continue"), Some(&then)),
    }
}

#[derive(serde::Deserialize)]
pub(super) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /console/callback`: the provider's answer.
pub(super) async fn callback(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let mut then = None;
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
        let (pending, back) = c
            .sessions
            .take(state, read_cookie(&headers, BINDING_COOKIE))?;
        then = back;
        let pending =
            pending.ok_or_else(|| SignInError::Refused("not a provider's sign-in".into()))?;
        let oidc = c
            .broker
            .oidc()
            .ok_or_else(|| SignInError::Unavailable("no OpenID Provider".into()))?;
        let cfg = oidc
            .provider_config(oidc.provider_of(&pending))
            .cloned()
            .ok_or_else(|| SignInError::Unavailable("the provider is gone".into()))?;
        let person = person_of(&cfg, oidc.finish(pending, code).await?);
        if person.roles.is_empty() && person.approver_groups.is_empty() {
            // Signed in at the provider, but nobody here: no claim rule matches a group.
            return Err(SignInError::Refused(format!(
                "{} is in no group this broker gives a role or an approver group",
                person.id
            )));
        }
        Ok(person)
    }
    .await;
    finish_sign_in(&c, done, false, then.as_deref()).await
}

async fn finish_sign_in(
    c: &Console,
    done: Result<Person, SignInError>,
    dev: bool,
    then: Option<&str>,
) -> Response {
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
    let then = esc(&then_path(then));
    let body = format!(
        "<meta http-equiv=\"refresh\" content=\"0;url={then}\">\
         <p><a href=\"{then}\">Continue to the console</a></p>"
    );
    html(
        StatusCode::OK,
        pages::page("Signed in", None, &body),
        &[c.session_cookie(&token), clear],
    )
}

/// `POST /console/dev-signin`: dev mode's demo people (refused unless `dev` turned it on).
pub(super) async fn dev_sign_in(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let mut then = None;
    let done = async {
        if !c.sessions.config().dev_sign_in {
            return Err(SignInError::Refused("dev sign-in is not enabled".into()));
        }
        if !c.same_origin(&headers) {
            return Err(SignInError::Refused("cross-site request refused".into()));
        }
        let state = f.get("binding").map(String::as_str).unwrap_or_default();
        let (pending, back) = c
            .sessions
            .take(state, read_cookie(&headers, BINDING_COOKIE))?;
        then = back;
        if pending.is_some() {
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
    finish_sign_in(&c, done, true, then.as_deref()).await
}

/// `POST /console/signout`: ends the session.
pub(super) async fn sign_out(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Posted { session: s, .. }: Posted,
) -> Response {
    if let Some(token) = read_cookie(&headers, SESSION_COOKIE) {
        c.sessions.end(token);
    }
    c.broker
        .record_session(&Console::caller(&s), "sign_out", "signed out")
        .await;
    redirect("/console/", &[cookie(SESSION_COOKIE, "", 0, "Strict")])
}
