//! A test double of HashiCorp Vault's HTTP API, for the endpoints the broker uses, as
//! Vault documents them:
//!
//! - `POST /v1/auth/jwt/login` `{role, jwt}`: the JWT auth method with one role,
//!   `spiffe-broker`, bound to audience `vault` and subject
//!   `spiffe://example.org/spiffe-broker`; the JWT must verify against the trust
//!   domain's JWT authorities (the JWKS given with [`VaultDouble::trust`]).
//! - `GET /v1/database/creds/feature-reader` with `X-Vault-Token`: a dynamic database
//!   secret under a new lease.
//! - `PUT /v1/sys/leases/renew` `{lease_id, increment}` and
//!   `PUT /v1/sys/leases/revoke` `{lease_id}` (204), with a token.
//!
//! Errors are Vault's `{"errors": [...]}` with its status codes: 400 for a bad request or
//! a refused login, 403 "permission denied" for a missing or unknown token, 503 "Vault is
//! sealed", 500 for an internal error. Revoking a lease Vault no longer has succeeds (204),
//! as in Vault. Controls make it sealed, slow to act, slow to answer, fail revocations,
//! forget its tokens, or grant shorter leases; everything it did is recorded for the
//! test to inspect.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use spiffe_broker::clock::{unix_seconds, Clock as _, SystemClock};
use spiffe_broker::jose::{self, Alg, JwkSet};

/// The JWT auth role the broker logs in as.
pub const ROLE: &str = "spiffe-broker";
/// The audience the role binds.
pub const BOUND_AUDIENCE: &str = "vault";
/// The subject the role binds: the broker's SPIFFE ID.
pub const BOUND_SUBJECT: &str = "spiffe://example.org/spiffe-broker";
/// The database role the token's policy may read.
pub const DB_ROLE: &str = "feature-reader";
/// Vault's default leeway on `exp`/`nbf`/`iat` of the JWT auth method.
const LEEWAY_SECS: i64 = 150;

/// One dynamic secret Vault handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSecret {
    pub lease_id: String,
    pub username: String,
    pub password: String,
}

#[derive(Default)]
struct Inner {
    jwks: JwkSet,
    sealed: bool,
    delay: Duration,
    late: Duration,
    failing_revokes: u32,
    lease_duration: i64,
    max_lease_duration: i64,
    tokens: HashSet<String>,
    logins: Vec<Value>,
    refused_logins: Vec<String>,
    issued: Vec<IssuedSecret>,
    live_leases: HashSet<String>,
    renewals: Vec<(String, i64)>,
    revoked: Vec<String>,
    revoke_calls: u32,
}

type Shared = Arc<Mutex<Inner>>;

/// A running Vault double on 127.0.0.1; stops when dropped.
pub struct VaultDouble {
    addr: SocketAddr,
    state: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for VaultDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl VaultDouble {
    /// Listens on 127.0.0.1:0. Logins fail until [`VaultDouble::trust`] gives the JWKS.
    pub async fn start() -> Self {
        let state: Shared = Arc::new(Mutex::new(Inner {
            lease_duration: 3600,
            max_lease_duration: 86_400,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/v1/auth/jwt/login", post(login))
            .route("/v1/database/creds/{role}", get(read_creds))
            .route("/v1/sys/leases/renew", put(renew).post(renew))
            .route("/v1/sys/leases/revoke", put(revoke).post(revoke))
            .fallback(|| async { VaultError(StatusCode::NOT_FOUND, "no handler".into()) })
            .layer(middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Vault double");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, for `[vault] addr`.
    pub fn addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }

    /// The trust domain's JWT authorities (the JWT auth method's `jwks`).
    pub fn trust(&self, jwks: JwkSet) {
        self.state().jwks = jwks;
    }

    /// Sealed: every endpoint answers 503 "Vault is sealed".
    pub fn set_down(&self, down: bool) {
        self.state().sealed = down;
    }

    /// Each request is handled this much later (a slow Vault: nothing happens meanwhile).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Each answer leaves this much after Vault acted (a slow network back: the secret
    /// exists even if the caller gave up waiting).
    pub fn set_late_answers(&self, late: Duration) {
        self.state().late = late;
    }

    /// The next `n` revocations answer 500 (0 stops failing).
    pub fn fail_revokes(&self, n: u32) {
        self.state().failing_revokes = n;
    }

    /// `lease_duration` of new secrets (default 3600 s).
    pub fn set_lease_duration(&self, secs: i64) {
        self.state().lease_duration = secs;
    }

    /// The most a renewal grants (default 86400 s).
    pub fn set_max_lease_duration(&self, secs: i64) {
        self.state().max_lease_duration = secs;
    }

    /// Every client token stops working (its TTL ran out, or an operator revoked it).
    pub fn expire_tokens(&self) {
        self.state().tokens.clear();
    }

    /// Claims of every accepted login, in order.
    pub fn logins(&self) -> Vec<Value> {
        self.state().logins.clone()
    }

    /// Why each refused login was refused.
    pub fn refused_logins(&self) -> Vec<String> {
        self.state().refused_logins.clone()
    }

    /// Claims of the last accepted login's JWT.
    pub fn last_login_claims(&self) -> Option<Value> {
        self.state().logins.last().cloned()
    }

    /// Every secret handed out, in order.
    pub fn issued(&self) -> Vec<IssuedSecret> {
        self.state().issued.clone()
    }

    /// Every accepted renewal: (lease id, increment asked).
    pub fn renewals(&self) -> Vec<(String, i64)> {
        self.state().renewals.clone()
    }

    /// Lease ids of every successful revocation, in order (repeats included).
    pub fn revoked(&self) -> Vec<String> {
        self.state().revoked.clone()
    }

    /// How often `lease_id` was revoked successfully.
    pub fn times_revoked(&self, lease_id: &str) -> usize {
        self.state()
            .revoked
            .iter()
            .filter(|l| *l == lease_id)
            .count()
    }

    /// Revocation calls answered (successful or failed), tokens permitting.
    pub fn revoke_calls(&self) -> u32 {
        self.state().revoke_calls
    }
}

/// Vault's error answer: the status and `{"errors": [message]}`.
struct VaultError(StatusCode, String);

impl IntoResponse for VaultError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "errors": [self.1] }))).into_response()
    }
}

type Answer = Result<Response, VaultError>;

fn lock(state: &Shared) -> MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    hex::encode(b)
}

/// Around every request: the delay, the seal, then the handler, then the late answer.
async fn gate(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let delay = lock(&state).delay;
    tokio::time::sleep(delay).await;
    if lock(&state).sealed {
        return VaultError(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed".into())
            .into_response();
    }
    let answer = next.run(req).await;
    let late = lock(&state).late;
    tokio::time::sleep(late).await;
    answer
}

/// The request's client token (`X-Vault-Token`, or `Authorization: Bearer`) must be one
/// Vault issued; else 403, as Vault answers.
fn authorize(state: &Inner, headers: &HeaderMap) -> Result<(), VaultError> {
    let token = headers
        .get("x-vault-token")
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v));
    match token {
        Some(t) if state.tokens.contains(t) => Ok(()),
        _ => Err(VaultError(
            StatusCode::FORBIDDEN,
            "permission denied".into(),
        )),
    }
}

fn bad_request(msg: impl Into<String>) -> VaultError {
    VaultError(StatusCode::BAD_REQUEST, msg.into())
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, VaultError> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("failed to parse JSON input: {e}")))
}

/// Verifies a JWT-SVID as the JWT auth method with the `spiffe-broker` role would (the
/// dev Workload API mints JWT-SVIDs on the system clock); returns its claims.
fn validate_jwt(jwks: &JwkSet, jwt: &str) -> Result<Value, String> {
    let parts = jose::split(jwt).map_err(|e| format!("error validating token: {e}"))?;
    let header: Value = serde_json::from_slice(&parts.header)
        .map_err(|e| format!("error validating token: header: {e}"))?;
    let alg = Alg::parse(header["alg"].as_str().unwrap_or_default())
        .map_err(|e| format!("error validating token: {e}"))?;
    let key = jwks
        .keys
        .iter()
        .find(|k| k.kid.is_some() && k.kid.as_deref() == header["kid"].as_str())
        .ok_or("error validating token: no known key for kid")?;
    jose::verify(alg, key, parts.signing_input, &parts.signature)
        .map_err(|e| format!("error validating token: {e}"))?;
    let claims: Value = serde_json::from_slice(&parts.payload)
        .map_err(|e| format!("error validating token: claims: {e}"))?;
    let now = unix_seconds(SystemClock.now());
    match claims["exp"].as_i64() {
        Some(exp) if exp + LEEWAY_SECS > now => {}
        Some(_) => return Err("error validating claims: token is expired (exp)".into()),
        None => return Err("error validating claims: exp claim is required".into()),
    }
    if claims["iat"]
        .as_i64()
        .is_some_and(|iat| iat - LEEWAY_SECS > now)
    {
        return Err("error validating claims: token issued in the future (iat)".into());
    }
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == BOUND_AUDIENCE,
        Value::Array(list) => list.iter().any(|a| a == BOUND_AUDIENCE),
        _ => false,
    };
    if !aud_ok {
        return Err(
            "error validating claims: aud claim does not match any expected audience".into(),
        );
    }
    if claims["sub"] != BOUND_SUBJECT {
        return Err("error validating claims: sub claim does not match expected subject".into());
    }
    Ok(claims)
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(default)]
    role: String,
    #[serde(default)]
    jwt: String,
}

async fn login(State(state): State<Shared>, body: Bytes) -> Answer {
    let body: LoginBody = parse(&body)?;
    let mut s = lock(&state);
    let checked = if body.role != ROLE {
        Err(format!("role {:?} could not be found", body.role))
    } else if body.jwt.is_empty() {
        Err("missing token".to_owned())
    } else {
        validate_jwt(&s.jwks, &body.jwt)
    };
    let claims = checked.map_err(|why| {
        s.refused_logins.push(why.clone());
        bad_request(why)
    })?;
    let token = format!("hvs.{}", random_hex(12));
    s.tokens.insert(token.clone());
    s.logins.push(claims);
    Ok(Json(json!({
        "request_id": random_hex(8),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": null,
        "wrap_info": null,
        "warnings": null,
        "auth": {
            "client_token": token,
            "accessor": random_hex(12),
            "policies": ["default", DB_ROLE],
            "token_policies": ["default", DB_ROLE],
            "metadata": { "role": ROLE },
            "lease_duration": 3600,
            "renewable": true,
            "token_type": "service",
            "orphan": true
        }
    }))
    .into_response())
}

async fn read_creds(
    State(state): State<Shared>,
    Path(role): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let mut s = lock(&state);
    authorize(&s, &headers)?;
    if role != DB_ROLE {
        // The token's policy grants read on database/creds/feature-reader only.
        return Err(VaultError(
            StatusCode::FORBIDDEN,
            "permission denied".into(),
        ));
    }
    let secret = IssuedSecret {
        lease_id: format!("database/creds/{role}/{}", random_hex(12)),
        username: format!("v-jwt-feature-{}", random_hex(8)),
        password: format!("A1a-{}", random_hex(10)),
    };
    s.live_leases.insert(secret.lease_id.clone());
    s.issued.push(secret.clone());
    Ok(Json(json!({
        "request_id": random_hex(8),
        "lease_id": secret.lease_id,
        "renewable": true,
        "lease_duration": s.lease_duration,
        "data": { "username": secret.username, "password": secret.password },
        "wrap_info": null,
        "warnings": null,
        "auth": null
    }))
    .into_response())
}

#[derive(Deserialize)]
struct RenewBody {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    increment: i64,
}

async fn renew(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Answer {
    let mut s = lock(&state);
    authorize(&s, &headers)?;
    let body: RenewBody = parse(&body)?;
    if !s.live_leases.contains(&body.lease_id) {
        return Err(bad_request("lease not found"));
    }
    let granted = body.increment.clamp(0, s.max_lease_duration);
    s.renewals.push((body.lease_id.clone(), body.increment));
    Ok(Json(json!({
        "request_id": random_hex(8),
        "lease_id": body.lease_id,
        "renewable": true,
        "lease_duration": granted,
        "data": null,
        "wrap_info": null,
        "warnings": null,
        "auth": null
    }))
    .into_response())
}

#[derive(Deserialize)]
struct RevokeBody {
    #[serde(default)]
    lease_id: String,
}

async fn revoke(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Answer {
    let mut s = lock(&state);
    authorize(&s, &headers)?;
    let body: RevokeBody = parse(&body)?;
    if body.lease_id.is_empty() {
        return Err(bad_request("lease_id must be specified"));
    }
    s.revoke_calls += 1;
    if s.failing_revokes > 0 {
        s.failing_revokes -= 1;
        return Err(VaultError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".into(),
        ));
    }
    // Revoking a lease Vault no longer has (revoked or expired) also succeeds.
    s.live_leases.remove(&body.lease_id);
    s.revoked.push(body.lease_id);
    Ok(StatusCode::NO_CONTENT.into_response())
}
