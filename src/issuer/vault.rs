//! Vault dynamic secrets.
//!
//! The broker logs into Vault with the JWT auth method, presenting a JWT-SVID for its
//! own SPIFFE ID fetched from the Workload API (no static Vault token anywhere), reads
//! the profile's path (`database/creds/ROLE`, `aws/creds/ROLE` …), and keeps Vault's
//! `lease_id` as the lease's backend handle. Renewal is `sys/leases/renew`; when the
//! broker lease ends, the broker's revocation queue calls `sys/leases/revoke` until
//! Vault confirms.
//!
//! API used, as documented by Vault: `POST /v1/auth/:mount/login` (`{role, jwt}` →
//! `auth.client_token`, `auth.lease_duration`), `GET /v1/:path` with `X-Vault-Token`
//! (→ `lease_id`, `lease_duration`, `renewable`, `data`), `PUT /v1/sys/leases/renew`
//! (`{lease_id, increment}`), `PUT /v1/sys/leases/revoke` (`{lease_id}` → 204); errors
//! are `{"errors": [...]}` with the HTTP status.
//!
//! The calls are `vaultrs`' and `rustify`'s: the login is vaultrs' `JWTLoginRequest`
//! endpoint; a read and a renewal answer are vaultrs' `api::EndpointResult<T>`, which keeps
//! `lease_id`, `lease_duration` and `renewable` beside `data` (vaultrs' own helpers such as
//! `exec_with_result` return only `data`, which is why they are not called here); Vault's
//! errors are vaultrs' `api::EndpointError`; the read, `sys/leases/renew` and
//! `sys/leases/revoke` are defined below with rustify's `Endpoint` derive, as vaultrs
//! defines its own. Three things of vaultrs are left aside, each for a reason:
//!
//! * `VaultClient`: it would take a `reqwest::Client` (its fields are public), but it reads
//!   answers through rustify's reqwest client, which reads bodies without a bound. The
//!   endpoints run instead on [`Transport`], rustify's `Client` trait over the broker's one
//!   [`HttpClient`] (same TLS on ring, trust, proxies and pool, 1 MiB bound).
//! * `auth::oidc::login` / `api::AuthInfo`: `AuthInfo` requires fields (`entity_id`,
//!   `token_policies`, `token_type`, `orphan`) that Vault's documented login answer does not
//!   promise; the login answer is read here with only what is used.
//! * `api::EndpointMiddleware`: it puts the API version in front of the whole URL path
//!   (wrong for an address behind a path prefix) and unwraps on a token that is not a valid
//!   header value. [`Transport`] roots the endpoints at `<addr>/v1`, and [`WithToken`] adds
//!   the token as a sensitive header.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use rustify::endpoint::{Endpoint, MiddleWare};
use rustify::errors::ClientError as RestError;
use rustify_derive::Endpoint;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use vaultrs::api::auth::oidc::requests::JWTLoginRequest;
use vaultrs::api::{EndpointError, EndpointResult};
use zeroize::Zeroize as _;

use super::{BoxFuture, Credential, IssueError, Issuer, LeaseTerms, Minted, Order, Secret};
use crate::config::{BackendProfile, CredentialKind, VaultConfig};
use crate::http_client::{HttpClient, Options, Trust};
use crate::policy::Grant;

/// Where the broker gets a token proving its own identity (its JWT-SVID).
pub trait IdentityToken: Send + Sync + 'static {
    /// A JWT-SVID of the broker for `audience`.
    fn jwt_svid<'a>(&'a self, audience: &'a str) -> BoxFuture<'a, Result<Secret, String>>;
}

impl IdentityToken for spiffe::JwtSource {
    fn jwt_svid<'a>(&'a self, audience: &'a str) -> BoxFuture<'a, Result<Secret, String>> {
        Box::pin(async move {
            self.fetch_jwt_svid([audience])
                .await
                .map(|s| Secret::new(s.token().to_owned()))
                .map_err(|e| format!("cannot fetch the broker's JWT-SVID: {e}"))
        })
    }
}

/// A Vault client token and when to stop using it.
struct Session {
    token: Secret,
    renew_after: Instant,
}

/// rustify's `Client` over the broker's [`HttpClient`], rooted at `<addr>/v1`. Every request
/// says `X-Vault-Request: true` (what Vault Agent and Proxy require against request forgery).
/// Empty path segments are dropped: rustify joins an endpoint path that starts with `/`
/// (vaultrs' login does) to a base path as `/v1//auth/…`, and no Vault API path has one.
struct Transport {
    base: String,
    http: HttpClient,
}

#[async_trait::async_trait]
impl rustify::client::Client for Transport {
    fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        mut req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, RestError> {
        if let Some(uri) = without_empty_segments(req.uri()) {
            *req.uri_mut() = uri;
        }
        req.headers_mut()
            .insert("x-vault-request", http::HeaderValue::from_static("true"));
        if !req.body().is_empty() {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| RestError::RequestError {
                source: e.into(),
                url: path,
                method,
            })?;
        let mut out = http::Response::new(Vec::from(resp.body));
        *out.status_mut() = resp.status;
        *out.headers_mut() = resp.headers;
        Ok(out)
    }
}

/// `uri` with `//` in its path collapsed to `/`; `None` when there is none.
fn without_empty_segments(uri: &http::Uri) -> Option<http::Uri> {
    let path = uri.path();
    if !path.contains("//") {
        return None;
    }
    let mut clean: String = path
        .split('/')
        .filter(|s| !s.is_empty())
        .flat_map(|s| ["/", s])
        .collect();
    if clean.is_empty() || path.ends_with('/') {
        clean.push('/');
    }
    if let Some(q) = uri.query() {
        clean.push('?');
        clean.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(clean.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Adds the client token to a request, as a sensitive header (kept out of HTTP logging).
struct WithToken<'a>(&'a Secret);

impl MiddleWare for WithToken<'_> {
    fn request<E: Endpoint>(
        &self,
        _: &E,
        req: &mut http::Request<Vec<u8>>,
    ) -> Result<(), RestError> {
        let mut value = http::HeaderValue::from_str(self.0.expose())
            .map_err(|e| RestError::EndpointBuildError { source: e.into() })?;
        value.set_sensitive(true);
        req.headers_mut().insert("x-vault-token", value);
        Ok(())
    }

    fn response<E: Endpoint>(
        &self,
        _: &E,
        _: &mut http::Response<Vec<u8>>,
    ) -> Result<(), RestError> {
        Ok(())
    }
}

/// `GET /v1/:path`: a dynamic secret; the answer is an `EndpointResult` around `data`.
#[derive(Clone, Endpoint)]
#[endpoint(path = "{self.path}", response = "BTreeMap<String, Value>")]
struct ReadSecret {
    #[endpoint(skip)]
    path: String,
}

/// `PUT /v1/sys/leases/renew`.
#[derive(Clone, Endpoint)]
#[endpoint(path = "sys/leases/renew", method = "PUT", response = "Value")]
struct RenewLease {
    lease_id: String,
    increment: i64,
}

/// `PUT /v1/sys/leases/revoke` (204 when done).
#[derive(Clone, Endpoint)]
#[endpoint(path = "sys/leases/revoke", method = "PUT")]
struct RevokeLease {
    lease_id: String,
}

/// What the broker reads of a login answer.
#[derive(Deserialize)]
struct LoginAnswer {
    auth: LoginAuth,
}

#[derive(Deserialize)]
struct LoginAuth {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
}

/// Why a call did not succeed. Never carries the request (it may hold a token or the JWT)
/// nor an answer's body beyond Vault's `errors`.
enum Failure {
    /// Vault answered a non-2xx status; `errors` is its `{"errors": [...]}`, joined.
    Status { status: StatusCode, errors: String },
    /// Vault could not be reached or its answer could not be read or understood.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status { status, errors } if errors.is_empty() => {
                write!(f, "HTTP {}", status.as_u16())
            }
            Failure::Status { status, errors } => write!(f, "HTTP {}: {errors}", status.as_u16()),
            Failure::Other(why) => f.write_str(why),
        }
    }
}

impl Failure {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            Failure::Other(_) => None,
        }
    }
}

impl From<RestError> for Failure {
    fn from(e: RestError) -> Self {
        match e {
            RestError::ServerResponseError { code, content } => {
                // Vault's `{"errors": [...]}`, joined and cut; nothing else of the body.
                let errors = content
                    .and_then(|c| serde_json::from_str::<EndpointError>(&c).ok())
                    .map(|e| e.errors.join("; "))
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                Failure::Status {
                    status: StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                    errors,
                }
            }
            // The transport's own message: scheme://host:port and what went wrong.
            RestError::RequestError { source, .. } => Failure::Other(source.to_string()),
            // Parse errors carry the body as `content`: only the parser's message is kept.
            RestError::ResponseParseError { source, .. } => {
                Failure::Other(format!("unreadable answer: {source}"))
            }
            other => Failure::Other(other.to_string()),
        }
    }
}

/// Reads Vault dynamic secrets for `vault` profiles.
pub struct VaultIssuer {
    cfg: VaultConfig,
    vault: Transport,
    identity: Arc<dyn IdentityToken>,
    session: Mutex<Option<Session>>,
}

fn unavailable(e: impl std::fmt::Display) -> IssueError {
    IssueError::Unavailable(format!("vault: {e}"))
}

impl VaultIssuer {
    /// A Vault backend; `identity` supplies the broker's JWT-SVID for login.
    pub fn new(cfg: VaultConfig, identity: Arc<dyn IdentityToken>) -> Result<Self, IssueError> {
        let internal = |e: &dyn std::fmt::Display| IssueError::Internal(format!("vault.addr: {e}"));
        let url = reqwest::Url::parse(&cfg.addr).map_err(|e| internal(&e))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(internal(&"not an http(s) URL"));
        }
        let http = HttpClient::new(&Options::new(Trust::from_ca_file(cfg.ca_file.as_deref())))
            .map_err(|e| internal(&e))?;
        if url.scheme() == "https" && http.trust_anchors() == 0 {
            return Err(internal(
                &"https, but the platform's trust store has no CA certificate: set vault.ca_file",
            ));
        }
        Ok(Self {
            vault: Transport {
                base: format!("{}/v1", cfg.addr.trim_end_matches('/')),
                http,
            },
            cfg,
            identity,
            session: Mutex::new(None),
        })
    }

    async fn login(&self) -> Result<Session, IssueError> {
        let jwt = self
            .identity
            .jwt_svid(&self.cfg.audience)
            .await
            .map_err(unavailable)?;
        let mut endpoint = JWTLoginRequest {
            mount: self.cfg.auth_mount.clone(),
            jwt: jwt.expose().to_owned(),
            role: Some(self.cfg.role.clone()),
        };
        let sent = endpoint.exec(&self.vault).await;
        endpoint.jwt.zeroize();
        let answer = sent.map_err(|e| match Failure::from(e) {
            f @ Failure::Status { .. } => unavailable(format!("login refused: {f}")),
            f => unavailable(format!("login: {f}")),
        })?;
        // `Endpoint::Response` of the login is `()`: the answer is read here, into only
        // what is used, and the body buffer is wiped after.
        let mut body = answer.response.into_body();
        let parsed = serde_json::from_slice::<LoginAnswer>(&body);
        body.zeroize();
        let answer = parsed.map_err(|e| unavailable(format!("login answer: {e}")))?;
        let token = Secret::new(answer.auth.client_token);
        // The token travels as a header: one that is not a valid header value is refused
        // here rather than failing every later call.
        if http::HeaderValue::from_str(token.expose()).is_err() {
            return Err(unavailable(
                "login answer: the client token is not a valid header value",
            ));
        }
        // Log in again well before the token's TTL runs out.
        let ttl = Duration::from_secs(answer.auth.lease_duration.max(1));
        Ok(Session {
            token,
            renew_after: Instant::now() + ttl.mul_f64(0.7),
        })
    }

    /// A current client token, logging in when there is none (or `fresh` is asked).
    /// The lock is not held across the login: a login stuck behind a slow Vault (or
    /// still finishing for a request that gave up at its deadline) never holds up the
    /// next request; two concurrent logins are harmless.
    async fn token(&self, fresh: bool) -> Result<Secret, IssueError> {
        if !fresh {
            if let Some(sess) = &*self.session.lock().await {
                if Instant::now() < sess.renew_after {
                    return Ok(sess.token.clone());
                }
            }
        }
        let sess = self.login().await?;
        let token = sess.token.clone();
        *self.session.lock().await = Some(sess);
        Ok(token)
    }

    /// Runs `endpoint` with the client token; on 403 logs in once more (the token may have
    /// been revoked or expired early) and retries. `Err` is a login failure; the call's own
    /// outcome is the inner result.
    async fn call<E: Endpoint + Clone>(
        &self,
        endpoint: &E,
    ) -> Result<Result<rustify::endpoint::EndpointResult<E::Response>, Failure>, IssueError> {
        let mut fresh = false;
        loop {
            let token = self.token(fresh).await?;
            let outcome = endpoint
                .clone()
                .with_middleware(&WithToken(&token))
                .exec(&self.vault)
                .await
                .map_err(Failure::from);
            match outcome {
                Err(f) if f.status() == Some(StatusCode::FORBIDDEN) && !fresh => fresh = true,
                other => return Ok(other),
            }
        }
    }

    /// A failed call as the broker reports it: Vault down or overloaded, or unreachable, is
    /// `Unavailable` (retry later); any other status is Vault refusing.
    fn classify(f: Failure, what: &str) -> IssueError {
        match f.status() {
            Some(s) if !(s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS) => {
                IssueError::Refused(format!("vault refused {what}: {f}"))
            }
            _ => unavailable(format!("{what}: {f}")),
        }
    }
}

#[async_trait::async_trait]
impl Issuer for VaultIssuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Vault
    }

    async fn issue(&self, Order { grant, terms, .. }: Order<'_>) -> Result<Minted, IssueError> {
        let BackendProfile::Vault { path } = &grant.profile.backend else {
            return Err(IssueError::Internal("not a vault profile".into()));
        };
        let read = ReadSecret { path: path.clone() };
        let what = format!("the read of {path}");
        let result = self
            .call(&read)
            .await?
            .map_err(|f| Self::classify(f, &what))?;
        let parsed = result.wrap::<EndpointResult<BTreeMap<String, Value>>>();
        // The body holds the secret: wiped once parsed.
        result.response.into_body().zeroize();
        let answer =
            parsed.map_err(|e| unavailable(format!("answer for {path}: {}", Failure::from(e))))?;
        let data = answer.data.unwrap_or_default();
        if data.is_empty() {
            return Err(IssueError::Internal(format!(
                "vault returned no data for {path}"
            )));
        }
        let data = data
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, Secret::new(v))
            })
            .collect();
        // The secret stops working when Vault's lease ends, if that is sooner.
        let expires_at = if answer.lease_duration > 0 {
            terms
                .expires_at
                .min(terms.issued_at + i64::from(answer.lease_duration))
        } else {
            terms.expires_at
        };
        Ok(Minted {
            credential: Credential::KeyValue { data },
            expires_at,
            handle: Some(answer.lease_id).filter(|l| !l.is_empty()),
        })
    }

    async fn renew(
        &self,
        _grant: &Grant,
        terms: &LeaseTerms,
        handle: Option<&str>,
    ) -> Result<Minted, IssueError> {
        let Some(lease_id) = handle else {
            return Err(IssueError::Refused(
                "this secret has no Vault lease to renew".into(),
            ));
        };
        let increment = (terms.expires_at - terms.issued_at).max(1);
        let renew = RenewLease {
            lease_id: lease_id.to_owned(),
            increment,
        };
        let result = self
            .call(&renew)
            .await?
            .map_err(|f| Self::classify(f, "the lease renewal"))?;
        let answer = result
            .wrap::<EndpointResult<Value>>()
            .map_err(|e| unavailable(format!("renew answer: {}", Failure::from(e))))?;
        if answer.lease_id != lease_id {
            return Err(IssueError::Internal(
                "vault renewed a different lease".into(),
            ));
        }
        Ok(Minted {
            // The holder keeps the secret it has; only its lifetime changes.
            credential: Credential::KeyValue {
                data: BTreeMap::new(),
            },
            expires_at: terms
                .expires_at
                .min(terms.issued_at + i64::from(answer.lease_duration)),
            handle: Some(answer.lease_id),
        })
    }

    async fn revoke(&self, handle: &str) -> Result<(), IssueError> {
        let revoke = RevokeLease {
            lease_id: handle.to_owned(),
        };
        match self.call(&revoke).await? {
            Ok(_) => Ok(()),
            // Already gone (revoked or expired in Vault): the goal is reached.
            Err(Failure::Status { status, errors })
                if status == StatusCode::BAD_REQUEST && errors.contains("invalid lease") =>
            {
                Ok(())
            }
            Err(f) => Err(unavailable(format!("revoke: {f}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_path_segments_are_dropped() {
        let clean = |u: &str| without_empty_segments(&u.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(
            clean("http://v:8200/v1//auth/jwt/login").as_deref(),
            Some("http://v:8200/v1/auth/jwt/login")
        );
        assert_eq!(
            clean("https://h/vault/v1//sys//leases/renew/?x=a//b").as_deref(),
            Some("https://h/vault/v1/sys/leases/renew/?x=a//b")
        );
        assert_eq!(clean("http://v:8200/v1/database/creds/r"), None);
    }
}
