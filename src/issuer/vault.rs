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
//! `vaultrs` (the crate DESIGN.md names) is not used: its dynamic-credential calls
//! return only `data` and drop `lease_id`, and it has no `sys/leases` calls, so it
//! cannot renew or revoke what it read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::http::{HttpClient, Response};
use super::{BoxFuture, Credential, IssueError, Issuer, LeaseTerms, Material, Minted, Secret};
use crate::config::{BackendProfile, CredentialKind, VaultConfig};
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

/// Reads Vault dynamic secrets for `vault` profiles.
pub struct VaultIssuer {
    cfg: VaultConfig,
    http: HttpClient,
    identity: Arc<dyn IdentityToken>,
    session: Mutex<Option<Session>>,
}

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

#[derive(Deserialize)]
struct SecretAnswer {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    lease_duration: i64,
    #[serde(default)]
    data: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RenewAnswer {
    lease_id: String,
    lease_duration: i64,
}

fn unavailable(e: impl std::fmt::Display) -> IssueError {
    IssueError::Unavailable(format!("vault: {e}"))
}

/// Vault's `{"errors": [...]}`, joined; never the request (it may hold a token).
fn errors_of(resp: &Response) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let list = serde_json::from_slice::<Errors>(&resp.body)
        .map(|e| e.errors.join("; "))
        .unwrap_or_default();
    let list: String = list.chars().take(300).collect();
    format!(
        "HTTP {}{}",
        resp.status.as_u16(),
        if list.is_empty() {
            String::new()
        } else {
            format!(": {list}")
        }
    )
}

impl VaultIssuer {
    /// A Vault backend; `identity` supplies the broker's JWT-SVID for login.
    pub fn new(cfg: VaultConfig, identity: Arc<dyn IdentityToken>) -> Result<Self, IssueError> {
        let http = HttpClient::new(&cfg.addr, cfg.ca_file.as_deref())
            .map_err(|e| IssueError::Internal(format!("vault.addr: {e}")))?;
        Ok(Self {
            cfg,
            http,
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
        let body = json!({"role": self.cfg.role, "jwt": jwt.expose()}).to_string();
        let path = format!("/v1/auth/{}/login", self.cfg.auth_mount);
        let resp = self
            .http
            .send(
                Method::POST,
                &path,
                &[("content-type", "application/json")],
                body.into_bytes(),
            )
            .await
            .map_err(unavailable)?;
        if resp.status != StatusCode::OK {
            return Err(unavailable(format!("login refused: {}", errors_of(&resp))));
        }
        let answer: LoginAnswer = serde_json::from_slice(&resp.body)
            .map_err(|e| unavailable(format!("login answer: {e}")))?;
        // Log in again well before the token's TTL runs out.
        let ttl = Duration::from_secs(answer.auth.lease_duration.max(1));
        Ok(Session {
            token: Secret::new(answer.auth.client_token),
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

    /// Sends with the client token; on 403 logs in once more (the token may have been
    /// revoked or expired early) and retries.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response, IssueError> {
        let mut fresh = false;
        loop {
            let token = self.token(fresh).await?;
            let mut headers = vec![("x-vault-token", token.expose())];
            if body.is_some() {
                headers.push(("content-type", "application/json"));
            }
            let bytes = body
                .as_ref()
                .map(|b| b.to_string().into_bytes())
                .unwrap_or_default();
            let resp = self
                .http
                .send(method.clone(), path, &headers, bytes)
                .await
                .map_err(unavailable)?;
            if resp.status == StatusCode::FORBIDDEN && !fresh {
                fresh = true;
                continue;
            }
            return Ok(resp);
        }
    }

    fn classify(resp: &Response, what: &str) -> IssueError {
        let s = resp.status;
        if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS {
            unavailable(format!("{what}: {}", errors_of(resp)))
        } else {
            IssueError::Refused(format!("vault refused {what}: {}", errors_of(resp)))
        }
    }
}

impl Issuer for VaultIssuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Vault
    }

    fn remote(&self) -> bool {
        true
    }

    fn issue<'a>(
        &'a self,
        grant: &'a Grant,
        terms: &'a LeaseTerms,
        _material: &'a Material,
    ) -> BoxFuture<'a, Result<Minted, IssueError>> {
        Box::pin(async move {
            let BackendProfile::Vault { path } = &grant.profile.backend else {
                return Err(IssueError::Internal("not a vault profile".into()));
            };
            let resp = self.call(Method::GET, &format!("/v1/{path}"), None).await?;
            if resp.status != StatusCode::OK {
                return Err(Self::classify(&resp, &format!("the read of {path}")));
            }
            let answer: SecretAnswer = serde_json::from_slice(&resp.body)
                .map_err(|e| unavailable(format!("answer for {path}: {e}")))?;
            if answer.data.is_empty() {
                return Err(IssueError::Internal(format!(
                    "vault returned no data for {path}"
                )));
            }
            let data = answer
                .data
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
                    .min(terms.issued_at + answer.lease_duration)
            } else {
                terms.expires_at
            };
            Ok(Minted {
                credential: Credential::KeyValue { data },
                expires_at,
                handle: Some(answer.lease_id).filter(|l| !l.is_empty()),
            })
        })
    }

    fn renew<'a>(
        &'a self,
        _grant: &'a Grant,
        terms: &'a LeaseTerms,
        handle: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Minted, IssueError>> {
        Box::pin(async move {
            let Some(lease_id) = handle else {
                return Err(IssueError::Refused(
                    "this secret has no Vault lease to renew".into(),
                ));
            };
            let increment = (terms.expires_at - terms.issued_at).max(1);
            let resp = self
                .call(
                    Method::PUT,
                    "/v1/sys/leases/renew",
                    Some(json!({"lease_id": lease_id, "increment": increment})),
                )
                .await?;
            if resp.status != StatusCode::OK {
                return Err(Self::classify(&resp, "the lease renewal"));
            }
            let answer: RenewAnswer = serde_json::from_slice(&resp.body)
                .map_err(|e| unavailable(format!("renew answer: {e}")))?;
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
                    .min(terms.issued_at + answer.lease_duration.max(0)),
                handle: Some(answer.lease_id),
            })
        })
    }

    fn revoke<'a>(&'a self, handle: &'a str) -> BoxFuture<'a, Result<(), IssueError>> {
        Box::pin(async move {
            let resp = self
                .call(
                    Method::PUT,
                    "/v1/sys/leases/revoke",
                    Some(json!({"lease_id": handle})),
                )
                .await?;
            match resp.status {
                StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
                // Already gone (revoked or expired in Vault): the goal is reached.
                StatusCode::BAD_REQUEST if errors_of(&resp).contains("invalid lease") => Ok(()),
                _ => Err(unavailable(format!("revoke: {}", errors_of(&resp)))),
            }
        })
    }
}
