//! People's ID tokens from configured OpenID Providers (`[[oidc_providers]]`), verified by
//! the book (OpenID Connect Core 1.0 §3.1.3.7): the provider's keys through its
//! discovery document and JWKS, the signature, `iss` = the configured issuer, `aud`
//! naming this broker's client id (and `azp` = it when there are several audiences),
//! `exp`, `iat` and `nbf` with the clock skew. A person is `oidc:<issuer>#<sub>`.
//!
//! Token exchange takes such an ID token as a subject token. The broker did not start
//! the sign-in, so it cannot check `nonce`: the client that did (the person's CLI or
//! browser) checked it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::clock::Clock;
use crate::config::OidcProviderConfig;
use crate::http_client::{HttpClient, HttpError, Options, Trust};
use crate::jose::{self, Alg, Audience, Jwk, StrictHeader};

mod sign_in;

pub use sign_in::{random_token, PendingSignIn, SignInError};

/// An unknown `kid` refetches a provider's JWKS at most this often (seconds).
const REFETCH_AFTER: i64 = 60;
/// Most groups taken from one ID token.
const MAX_GROUPS: usize = 64;

/// A person whose ID token verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `oidc:<issuer>#<sub>`.
    pub id: String,
    /// The `email` claim, if any (recorded beside the id; never used to decide).
    pub email: Option<String>,
    /// The configured groups claim (Cedar's `subject_groups`).
    pub groups: Vec<String>,
    /// The ID token's `exp`.
    pub expires_at: i64,
    /// The `name` claim, if any (recorded; never used to decide).
    pub name: Option<String>,
    /// When the person authenticated at the provider (`auth_time`, else `iat`).
    pub auth_time: i64,
    /// The `nonce` claim (checked by whoever began the sign-in).
    pub nonce: Option<String>,
}

pub(crate) struct Provider {
    pub(crate) cfg: OidcProviderConfig,
    pub(crate) http: Result<HttpClient, HttpError>,
    keys: tokio::sync::Mutex<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Jwk>,
    fetched_at: Option<i64>,
}

/// The configured OpenID Providers.
pub struct OidcProviders {
    pub(crate) providers: Vec<Provider>,
    clock: Arc<dyn Clock>,
    skew: i64,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    iat: i64,
    nbf: Option<i64>,
    azp: Option<String>,
    email: Option<String>,
    name: Option<String>,
    auth_time: Option<i64>,
    nonce: Option<String>,
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

impl OidcProviders {
    /// The providers of the config; `skew` is the tolerance on the token's times.
    pub fn new(cfgs: &[OidcProviderConfig], clock: Arc<dyn Clock>, skew: Duration) -> Self {
        let providers = cfgs
            .iter()
            .map(|cfg| Provider {
                http: HttpClient::new(&Options::new(Trust::from_ca_file(cfg.ca_file.as_deref()))),
                cfg: cfg.clone(),
                keys: tokio::sync::Mutex::new(KeyCache::default()),
            })
            .collect();
        Self {
            providers,
            clock,
            skew: skew.as_secs() as i64,
        }
    }

    /// Verifies an ID token; the refusal names what failed.
    pub async fn verify(&self, token: &str) -> Result<Person, String> {
        let parts = jose::split(token).map_err(|e| format!("malformed ID token: {e}"))?;
        let header: StrictHeader = serde_json::from_slice(&parts.header)
            .map_err(|e| format!("ID token header refused: {e}"))?;
        let alg = Alg::parse(&header.alg).map_err(|e| e.0)?;
        let kid = header.kid.ok_or("ID token header has no kid")?;
        let claims: Claims = serde_json::from_slice(&parts.payload)
            .map_err(|e| format!("ID token claims refused: {e}"))?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.cfg.issuer == claims.iss)
            .ok_or_else(|| {
                format!(
                    "no OpenID Provider {:?} is configured",
                    crate::domain::truncate(&claims.iss)
                )
            })?;
        let now = self.clock.unix_seconds();
        let key = provider.key(&kid, now).await?;
        jose::verify(alg, &key, parts.signing_input, &parts.signature)
            .map_err(|e| format!("ID token signature refused: {e}"))?;
        let client = provider.cfg.client_id.as_str();
        let auds = claims.aud.as_slice();
        if !auds.iter().any(|a| a == client) {
            return Err(format!(
                "the ID token is for another client, not this broker ({client})"
            ));
        }
        if (auds.len() > 1 || claims.azp.is_some()) && claims.azp.as_deref() != Some(client) {
            return Err(format!("the ID token's azp is not this broker ({client})"));
        }
        if claims.exp <= now - self.skew {
            return Err("the ID token has expired".into());
        }
        if claims.iat > now + self.skew || claims.nbf.is_some_and(|n| n > now + self.skew) {
            return Err("the ID token is not valid yet".into());
        }
        if !printable(&claims.sub, 255) {
            return Err("the ID token's sub is empty, too long or not printable".into());
        }
        let all: serde_json::Value = serde_json::from_slice(&parts.payload)
            .map_err(|e| format!("ID token claims refused: {e}"))?;
        let groups = all[provider.cfg.groups_claim.as_str()]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(|v| v.as_str())
                    .filter(|v| printable(v, 128))
                    .take(MAX_GROUPS)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Person {
            id: format!("oidc:{}#{}", claims.iss, claims.sub),
            email: claims.email.filter(|e| printable(e, 254)),
            groups,
            expires_at: claims.exp,
            name: claims
                .name
                .filter(|n| n.len() <= 128 && !n.chars().any(char::is_control)),
            auth_time: claims.auth_time.unwrap_or(claims.iat),
            nonce: claims.nonce,
        })
    }
}

impl Provider {
    /// The key `kid` names: from the cached JWKS, or fetched through discovery (an unknown
    /// `kid` refetches at most every [`REFETCH_AFTER`] seconds; a failed fetch refuses).
    async fn key(&self, kid: &str, now: i64) -> Result<Jwk, String> {
        let mut cache = self.keys.lock().await;
        if let Some(k) = cache.keys.get(kid) {
            return Ok(k.clone());
        }
        if cache.fetched_at.is_some_and(|t| now - t < REFETCH_AFTER) {
            return Err(format!(
                "kid {:?} is not in {}'s keys",
                crate::domain::truncate(kid),
                self.cfg.issuer
            ));
        }
        let http = self
            .http
            .as_ref()
            .map_err(|e| format!("{}: HTTP client: {e}", self.cfg.issuer))?;
        let jwks = http
            .discover_jwks(&self.cfg.issuer)
            .await
            .map_err(|e| format!("cannot fetch the OpenID Provider's keys: {e}"))?;
        cache.keys = jwks
            .keys
            .into_iter()
            .filter_map(|k| k.kid.clone().map(|id| (id, k)))
            .collect();
        cache.fetched_at = Some(now);
        cache.keys.get(kid).cloned().ok_or_else(|| {
            format!(
                "kid {:?} is not in {}'s keys",
                crate::domain::truncate(kid),
                self.cfg.issuer
            )
        })
    }
}
