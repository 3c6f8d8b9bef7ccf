//! Authentication: transport facts → [`VerifiedCaller`]. Strict SPIFFE rules, no
//! authorization. A `VerifiedCaller` can only be constructed here.

mod jwt_svid;
mod trust;
mod x509_svid;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;

use crate::clock::Clock;

pub use jwt_svid::{validate_jwt_svid, JwtSvidClaims};
pub use trust::{StaticTrust, TrustSource, WorkloadTrust};
pub use x509_svid::{validate_x509_svid, SvidRole, MAX_CHAIN_LEN};

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// X.509-SVID in the mTLS handshake.
    X509Svid,
    /// JWT-SVID bearer token.
    JwtSvid,
}

impl AuthMethod {
    /// Name recorded in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::X509Svid => "x509-svid",
            AuthMethod::JwtSvid => "jwt-svid",
        }
    }
}

/// A caller whose SVID passed every check. Only this module constructs it.
#[derive(Debug, Clone)]
pub struct VerifiedCaller {
    id: SpiffeId,
    method: AuthMethod,
    cert_sha256: Option<[u8; 32]>,
}

impl VerifiedCaller {
    /// The caller's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }
    /// How it authenticated.
    pub fn method(&self) -> AuthMethod {
        self.method
    }
    /// SHA-256 of the leaf certificate presented over mTLS (for `cnf.x5t#S256`).
    pub fn cert_sha256(&self) -> Option<&[u8; 32]> {
        self.cert_sha256.as_ref()
    }
}

/// Why authentication failed. The client sees one fixed message; this goes to the log
/// and the ledger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct AuthnError {
    /// What failed.
    pub reason: String,
    /// The identity the caller claimed, when one could be read (untrusted).
    pub claimed: Option<String>,
    /// The method attempted.
    pub method: Option<AuthMethod>,
}

impl AuthnError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            claimed: None,
            method: None,
        }
    }
    pub(crate) fn claimed(mut self, id: impl Into<String>) -> Self {
        self.claimed = Some(id.into());
        self
    }
    pub(crate) fn via(mut self, m: AuthMethod) -> Self {
        self.method = Some(m);
        self
    }
}

/// What the transport knows about the caller.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransportFacts<'a> {
    /// The client certificate chain from the mTLS handshake (leaf first).
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    /// The `authorization` metadata value, if any.
    pub authorization: Option<&'a str>,
    /// The peer's IP address, when the transport knows it (bounds failure records).
    pub peer_ip: Option<std::net::IpAddr>,
}

/// The authentication seam.
///
/// Contract: returns a `VerifiedCaller` only when the presented SVID satisfies the
/// X.509-SVID or JWT-SVID specification against the current trust bundle of the SVID's
/// own trust domain at the clock's current time. A bearer token, when present, is the
/// credential; there is no fallback from a bad token to the certificate.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates one request.
    fn authenticate(&self, facts: &TransportFacts<'_>) -> Result<VerifiedCaller, AuthnError>;
}

/// SPIFFE authentication against a trust source.
pub struct SpiffeAuthenticator {
    trust: Arc<dyn TrustSource>,
    clock: Arc<dyn Clock>,
    audience: String,
    skew: Duration,
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verified>>,
}

/// A chain that passed every X.509-SVID check, remembered so a busy connection does not
/// re-verify the same signatures on every request. The entry only counts while the trust
/// bundle it was verified against is unchanged and the leaf has not expired; everything
/// else is rechecked exactly as on first sight.
#[derive(Clone)]
struct Verified {
    id: SpiffeId,
    bundle: [u8; 32],
    not_after: i64,
}

/// Most remembered chains (the cache is cleared when full).
const VERIFIED_CACHE: usize = 4096;

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl SpiffeAuthenticator {
    /// `audience` is the broker's own SPIFFE ID: JWT-SVIDs must name it in `aud`.
    pub fn new(
        trust: Arc<dyn TrustSource>,
        clock: Arc<dyn Clock>,
        audience: String,
        skew: Duration,
    ) -> Self {
        Self {
            trust,
            clock,
            audience,
            skew,
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl SpiffeAuthenticator {
    fn bundle_fingerprint(&self, trust_domain: &str) -> Option<[u8; 32]> {
        let roots = self.trust.x509_authorities(trust_domain)?;
        let parts: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
        Some(sha256(&parts))
    }

    fn x509(
        &self,
        chain: &[CertificateDer<'static>],
        now: std::time::SystemTime,
    ) -> Result<SpiffeId, AuthnError> {
        let key = sha256(&chain.iter().map(|c| c.as_ref()).collect::<Vec<_>>());
        let t = crate::clock::unix_seconds(now);
        let hit = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(v) = hit {
            if t <= v.not_after
                && self.bundle_fingerprint(v.id.trust_domain_name()) == Some(v.bundle)
            {
                return Ok(v.id);
            }
        }
        let id = validate_x509_svid(chain, self.trust.as_ref(), now, SvidRole::Client)?;
        let not_after = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(t);
        if let Some(bundle) = self.bundle_fingerprint(id.trust_domain_name()) {
            let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= VERIFIED_CACHE {
                cache.clear();
            }
            cache.insert(
                key,
                Verified {
                    id: id.clone(),
                    bundle,
                    not_after,
                },
            );
        }
        Ok(id)
    }
}

impl Authenticator for SpiffeAuthenticator {
    fn authenticate(&self, facts: &TransportFacts<'_>) -> Result<VerifiedCaller, AuthnError> {
        let now = self.clock.now();
        if let Some(value) = facts.authorization {
            let token = value.strip_prefix("Bearer ").ok_or_else(|| {
                AuthnError::new("authorization metadata is not a Bearer token")
                    .via(AuthMethod::JwtSvid)
            })?;
            let (id, _) = validate_jwt_svid(
                token.trim(),
                self.trust.as_ref(),
                &self.audience,
                now,
                self.skew,
            )?;
            return Ok(VerifiedCaller {
                id,
                method: AuthMethod::JwtSvid,
                cert_sha256: None,
            });
        }
        match facts.peer_certs {
            Some(chain) if !chain.is_empty() => {
                let id = self.x509(chain, now)?;
                let digest = ring::digest::digest(&ring::digest::SHA256, chain[0].as_ref());
                let mut cert_sha256 = [0u8; 32];
                cert_sha256.copy_from_slice(digest.as_ref());
                Ok(VerifiedCaller {
                    id,
                    method: AuthMethod::X509Svid,
                    cert_sha256: Some(cert_sha256),
                })
            }
            _ => Err(AuthnError::new("no client certificate and no bearer token")),
        }
    }
}

/// Parses a SPIFFE ID that must name a workload (it has a path).
pub(crate) fn workload_id(s: &str) -> Result<SpiffeId, AuthnError> {
    let claimed = || crate::domain::truncate(s);
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(
            AuthnError::new(format!("SPIFFE ID longer than {MAX_SPIFFE_ID_LEN} bytes"))
                .claimed(claimed()),
        );
    }
    let id = SpiffeId::new(s)
        .map_err(|e| AuthnError::new(format!("invalid SPIFFE ID: {e}")).claimed(claimed()))?;
    // Exactly the canonical form: the parser lower-cases `SPIFFE://` and upper-case trust
    // domains, which the SPIFFE spec forbids in an SVID (go-spiffe refuses them too).
    if id.to_string() != s {
        return Err(AuthnError::new("SPIFFE ID is not in canonical form").claimed(claimed()));
    }
    if id.path().is_empty() {
        return Err(
            AuthnError::new("SPIFFE ID has no path; a workload ID needs one").claimed(claimed()),
        );
    }
    Ok(id)
}

/// The SPIFFE spec's maximum URI length.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
