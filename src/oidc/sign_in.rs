//! A person's sign-in through an OpenID Provider, for the console: the authorization code
//! flow with PKCE (RFC 7636, `S256`), `state` and `nonce` (OpenID Connect Core 1.0 §3.1).
//!
//! [`OidcProviders::begin`] builds the provider's authorization URL and a
//! [`PendingSignIn`] that the console keeps server-side, keyed by `state`, until the
//! browser comes back; [`OidcProviders::finish`] exchanges the code at the token endpoint
//! (`client_secret_basic`, the PKCE verifier) and verifies the ID token by the book
//! ([`OidcProviders::verify`]) and against this sign-in: issued by the provider it began
//! with (no mix-up), carrying its `nonce`.

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{OidcProviders, Person};
use crate::jose;

/// A sign-in begun and not yet finished. Holds the PKCE verifier: never leaves the broker.
pub struct PendingSignIn {
    /// The `state` sent to the provider (the key it is kept under).
    pub state: String,
    /// When it began (Unix seconds).
    pub created_at: i64,
    provider: usize,
    nonce: String,
    verifier: Zeroizing<String>,
    token_endpoint: String,
    redirect_uri: String,
}

impl std::fmt::Debug for PendingSignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSignIn")
            .field("provider", &self.provider)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Why a sign-in did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    /// The sign-in itself is refused (bad code, wrong token, wrong nonce).
    #[error("sign-in refused: {0}")]
    Refused(String),
    /// The provider could not be reached or is not set up for sign-in.
    #[error("sign-in unavailable: {0}")]
    Unavailable(String),
}

/// 32 random bytes, base64url.
pub fn random_token() -> Result<String, SignInError> {
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SignInError::Unavailable("no randomness".into()))?;
    Ok(jose::b64(&b))
}

impl OidcProviders {
    /// The providers people can sign in with (those with a client secret): index and name.
    pub fn sign_in_choices(&self) -> Vec<(usize, &str)> {
        self.providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.cfg.client_secret_file.is_some())
            .map(|(i, p)| (i, p.cfg.display_name.as_str()))
            .collect()
    }

    /// The provider's authorization URL for a new sign-in, and what to keep until the
    /// browser returns to `redirect_uri`. `max_age` asks the provider to authenticate the
    /// person again when their last authentication is older (seconds; 0: now).
    pub async fn begin(
        &self,
        provider: usize,
        redirect_uri: &str,
        max_age: Option<u64>,
    ) -> Result<(String, PendingSignIn), SignInError> {
        let p = self
            .providers
            .get(provider)
            .filter(|p| p.cfg.client_secret_file.is_some())
            .ok_or_else(|| SignInError::Refused("no such OpenID Provider".into()))?;
        let http = p
            .http
            .as_ref()
            .map_err(|e| SignInError::Unavailable(format!("{}: {e}", p.cfg.issuer)))?;
        let disc = http
            .discover(&p.cfg.issuer)
            .await
            .map_err(|e| SignInError::Unavailable(e.to_string()))?;
        let endpoint = |name: &str| {
            disc[name]
                .as_str()
                .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
                .map(str::to_owned)
                .ok_or_else(|| {
                    SignInError::Unavailable(format!("{}: discovery has no {name}", p.cfg.issuer))
                })
        };
        let authorize = endpoint("authorization_endpoint")?;
        let token_endpoint = endpoint("token_endpoint")?;
        let verifier = Zeroizing::new(random_token()?);
        let challenge =
            jose::b64(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
        let pending = PendingSignIn {
            state: random_token()?,
            created_at: self.clock.unix_seconds(),
            provider,
            nonce: random_token()?,
            verifier,
            token_endpoint,
            redirect_uri: redirect_uri.to_owned(),
        };
        let mut scope = vec!["openid"];
        scope.extend(p.cfg.scopes.iter().map(String::as_str));
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", &p.cfg.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scope.join(" "))
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if let Some(age) = max_age {
            q.append_pair("max_age", &age.to_string());
            if age == 0 {
                q.append_pair("prompt", "login");
            }
        }
        let sep = if authorize.contains('?') { '&' } else { '?' };
        Ok((format!("{authorize}{sep}{}", q.finish()), pending))
    }

    /// Exchanges the provider's `code` for the person's ID token and verifies it.
    pub async fn finish(&self, pending: PendingSignIn, code: &str) -> Result<Person, SignInError> {
        let p = &self.providers[pending.provider];
        let http = p
            .http
            .as_ref()
            .map_err(|e| SignInError::Unavailable(format!("{}: {e}", p.cfg.issuer)))?;
        let secret_file = p
            .cfg
            .client_secret_file
            .as_ref()
            .ok_or_else(|| SignInError::Unavailable("no client secret".into()))?;
        let secret = Zeroizing::new(
            std::fs::read_to_string(secret_file)
                .map_err(|e| {
                    SignInError::Unavailable(format!(
                        "cannot read {}: {}",
                        secret_file.display(),
                        e.kind()
                    ))
                })?
                .trim()
                .to_owned(),
        );
        // RFC 6749 §2.3.1: both halves form-encoded before base64.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = Zeroizing::new(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", enc(&p.cfg.client_id), enc(&secret)),
        ));
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", &pending.redirect_uri)
            .append_pair("code_verifier", &pending.verifier)
            .finish();
        let req = http::Request::post(&pending.token_endpoint)
            .header(http::header::AUTHORIZATION, format!("Basic {}", *basic))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body.into_bytes())
            .map_err(|e| SignInError::Unavailable(format!("token request: {e}")))?;
        let resp = http
            .send(req)
            .await
            .map_err(|e| SignInError::Unavailable(e.to_string()))?;
        let answer: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if resp.status != http::StatusCode::OK {
            let error = answer["error"].as_str().unwrap_or("no error code");
            return Err(SignInError::Refused(format!(
                "the provider refused the code (HTTP {}, {})",
                resp.status.as_u16(),
                crate::domain::truncate(error)
            )));
        }
        let id_token = answer["id_token"]
            .as_str()
            .ok_or_else(|| SignInError::Refused("the provider's answer has no id_token".into()))?;
        let person = self.verify(id_token).await.map_err(SignInError::Refused)?;
        if !person.id.starts_with(&format!("oidc:{}#", p.cfg.issuer)) {
            return Err(SignInError::Refused(
                "the ID token is from another provider than the sign-in began with".into(),
            ));
        }
        // The nonce is no secret (it travelled in the authorization URL): a plain compare.
        if person.nonce.as_deref() != Some(pending.nonce.as_str()) {
            return Err(SignInError::Refused(
                "the ID token's nonce is not this sign-in's".into(),
            ));
        }
        Ok(person)
    }

    /// The provider's config, by index.
    pub fn provider_config(&self, provider: usize) -> Option<&crate::config::OidcProviderConfig> {
        self.providers.get(provider).map(|p| &p.cfg)
    }

    /// The provider a person (`oidc:<issuer>#<sub>`) signed in with.
    pub fn provider_of_person(&self, id: &str) -> Option<usize> {
        self.providers.iter().position(|p| {
            p.cfg.client_secret_file.is_some()
                && id
                    .strip_prefix("oidc:")
                    .and_then(|rest| rest.strip_prefix(p.cfg.issuer.as_str()))
                    .is_some_and(|rest| rest.starts_with('#'))
        })
    }

    /// The provider a pending sign-in began with.
    pub fn provider_of(&self, pending: &PendingSignIn) -> usize {
        pending.provider
    }
}
