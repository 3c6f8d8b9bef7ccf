//! Authentication: transport facts → [`VerifiedCaller`]. Strict SPIFFE rules, no
//! authorization. A `VerifiedCaller` can only be constructed here.

mod jwt_svid;
mod trust;
mod x509_svid;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;

use crate::clock::Clock;
use crate::domain::{Person, Principal};

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
    /// A person's console session, begun by an OpenID Connect sign-in.
    OidcSession,
    /// A dev-mode demo person's console session (never in `serve`).
    DevSignIn,
}

impl AuthMethod {
    /// Name recorded in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::X509Svid => "x509-svid",
            AuthMethod::JwtSvid => "jwt-svid",
            AuthMethod::OidcSession => "oidc-session",
            AuthMethod::DevSignIn => "dev-sign-in",
        }
    }
}

/// A caller whose SVID passed every check, or a person whose console session did. Only
/// this module (workloads) and [`VerifiedCaller::signed_in`] (the console's sessions)
/// construct it.
#[derive(Debug, Clone)]
pub struct VerifiedCaller {
    principal: Principal,
    id: String,
    method: AuthMethod,
    cert_sha256: Option<[u8; 32]>,
}

impl VerifiedCaller {
    fn workload_caller(id: SpiffeId, method: AuthMethod, cert_sha256: Option<[u8; 32]>) -> Self {
        Self {
            id: id.to_string(),
            principal: Principal::Workload(id),
            method,
            cert_sha256,
        }
    }

    /// A person whose console session verified (an OpenID Connect sign-in, or dev mode's
    /// demo sign-in). Only the console's session layer calls this.
    pub fn signed_in(person: Person, dev: bool) -> Self {
        Self {
            id: person.id.clone(),
            principal: Principal::Person(person),
            method: if dev {
                AuthMethod::DevSignIn
            } else {
                AuthMethod::OidcSession
            },
            cert_sha256: None,
        }
    }

    /// Who: a workload or a person.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    /// The id the ledger records (a SPIFFE ID, or `oidc:<issuer>#<sub>`).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The caller's SPIFFE ID, if a workload.
    pub fn workload(&self) -> Option<&SpiffeId> {
        self.principal.workload()
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

/// What the transport learned about the peer; inserted into every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, leaf first (absent for bearer-token callers).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
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
    /// Verifies a JWT-SVID presented as a token exchange's subject token, exactly as one
    /// presented to authenticate (trust bundle, signature, audience = this broker, time).
    fn verify_subject_jwt_svid(
        &self,
        token: &str,
    ) -> Result<(SpiffeId, jwt_svid::JwtSvidClaims), AuthnError>;
    /// The audience a token must name to be exchanged here: the broker's SPIFFE ID.
    fn audience(&self) -> &str;
}

/// SPIFFE authentication against a trust source.
pub struct SpiffeAuthenticator {
    trust: Arc<dyn TrustSource>,
    clock: Arc<dyn Clock>,
    audience: String,
    skew: Duration,
    verified: Remembered<Verified>,
    verified_jwts: Remembered<VerifiedJwt>,
}

/// What passed verification, by a SHA-256 of what was presented; at most
/// [`VERIFIED_CACHE`] entries (cleared when full). Each entry says what must still hold.
struct Remembered<V>(std::sync::Mutex<std::collections::HashMap<[u8; 32], V>>);

impl<V: Clone> Remembered<V> {
    fn new() -> Self {
        Self(std::sync::Mutex::new(std::collections::HashMap::new()))
    }

    fn get(&self, key: &[u8; 32]) -> Option<V> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn insert(&self, key: [u8; 32], value: V) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= VERIFIED_CACHE {
            map.clear();
        }
        map.insert(key, value);
    }
}

/// A JWT-SVID that passed every check, remembered by the SHA-256 of the token (the token
/// itself is not kept) so a workload presenting the same token again is not re-verified:
/// one ECDSA or RSA verify per request otherwise. It counts only while its trust domain
/// still has exactly the key that verified it under that `kid`, and within the token's
/// own time window, checked as on first sight; the audience is part of the token.
#[derive(Clone)]
struct VerifiedJwt {
    id: SpiffeId,
    how: jwt_svid::Verification,
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
            verified: Remembered::new(),
            verified_jwts: Remembered::new(),
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
        if let Some(v) = self.verified.get(&key) {
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
            let v = Verified {
                id: id.clone(),
                bundle,
                not_after,
            };
            self.verified.insert(key, v);
        }
        Ok(id)
    }
}

impl SpiffeAuthenticator {
    fn jwt(&self, token: &str, now: std::time::SystemTime) -> Result<SpiffeId, AuthnError> {
        let key = sha256(&[b"jwt-svid", token.as_bytes()]);
        let (t, skew) = (crate::clock::unix_seconds(now), self.skew.as_secs() as i64);
        if let Some(v) = self.verified_jwts.get(&key) {
            let same_key = self
                .trust
                .jwt_authority(v.id.trust_domain_name(), &v.how.kid)
                .is_some_and(|k| k == v.how.key);
            if same_key && v.how.in_time(t, skew).is_ok() {
                return Ok(v.id);
            }
        }
        let (id, _, how) =
            jwt_svid::validate(token, self.trust.as_ref(), &self.audience, now, self.skew)?;
        let v = VerifiedJwt {
            id: id.clone(),
            how,
        };
        self.verified_jwts.insert(key, v);
        Ok(id)
    }
}

impl Authenticator for SpiffeAuthenticator {
    fn verify_subject_jwt_svid(
        &self,
        token: &str,
    ) -> Result<(SpiffeId, jwt_svid::JwtSvidClaims), AuthnError> {
        jwt_svid::validate(
            token,
            self.trust.as_ref(),
            &self.audience,
            self.clock.now(),
            self.skew,
        )
        .map(|(id, claims, _)| (id, claims))
    }

    fn audience(&self) -> &str {
        &self.audience
    }

    fn authenticate(&self, facts: &TransportFacts<'_>) -> Result<VerifiedCaller, AuthnError> {
        let now = self.clock.now();
        if let Some(value) = facts.authorization {
            let token = value.strip_prefix("Bearer ").ok_or_else(|| {
                AuthnError::new("authorization metadata is not a Bearer token")
                    .via(AuthMethod::JwtSvid)
            })?;
            let id = self.jwt(token.trim(), now)?;
            return Ok(VerifiedCaller::workload_caller(
                id,
                AuthMethod::JwtSvid,
                None,
            ));
        }
        match facts.peer_certs {
            Some(chain) if !chain.is_empty() => {
                let id = self.x509(chain, now)?;
                let digest = ring::digest::digest(&ring::digest::SHA256, chain[0].as_ref());
                let mut cert_sha256 = [0u8; 32];
                cert_sha256.copy_from_slice(digest.as_ref());
                Ok(VerifiedCaller::workload_caller(
                    id,
                    AuthMethod::X509Svid,
                    Some(cert_sha256),
                ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::crypto::{EcdsaP256Signer, Signer};
    use crate::jose::{b64, signing_input, Jwk};
    use std::sync::Mutex;

    /// A trust source whose one JWT authority can be swapped, as a bundle update would.
    struct SwappableJwt(Mutex<Option<Jwk>>);

    impl TrustSource for SwappableJwt {
        fn x509_authorities(&self, _: &str) -> Option<Vec<CertificateDer<'static>>> {
            None
        }
        fn jwt_authority(&self, trust_domain: &str, kid: &str) -> Option<Jwk> {
            let key = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
            (trust_domain == "example.org" && key.kid.as_deref() == Some(kid)).then_some(key)
        }
    }

    const AUD: &str = "spiffe://example.org/broker";

    fn token(key: &EcdsaP256Signer, kid: &str, now: i64, exp: i64) -> String {
        let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/ci/deploy-agent", "aud": [AUD], "iat": now, "exp": exp
        });
        let input = signing_input(&header, &claims).expect("input");
        format!(
            "{input}.{}",
            b64(&key.sign(input.as_bytes()).expect("sign"))
        )
    }

    fn bearer(authn: &SpiffeAuthenticator, token: &str) -> Result<VerifiedCaller, AuthnError> {
        authn.authenticate(&TransportFacts {
            peer_certs: None,
            authorization: Some(&format!("Bearer {token}")),
            peer_ip: None,
        })
    }

    /// A remembered JWT-SVID is accepted again only while the key that verified it is
    /// still the trust domain's key under that kid and the token is still in its window.
    #[test]
    fn a_remembered_jwt_svid_is_held_to_its_key_and_its_window() {
        let (key, _) = EcdsaP256Signer::generate().expect("key");
        let kid = key.key_id().to_owned();
        let trust = Arc::new(SwappableJwt(Mutex::new(Some(key.public_jwk()))));
        let clock = Arc::new(ManualClock::new());
        let authn = SpiffeAuthenticator::new(
            trust.clone(),
            clock.clone(),
            AUD.into(),
            Duration::from_secs(30),
        );
        let now = crate::clock::unix_seconds(clock.now());
        let t = token(&key, &kid, now, now + 60);
        for _ in 0..3 {
            let caller = bearer(&authn, &t).expect("valid, then remembered");
            assert_eq!(
                caller.workload().map(|w| w.path()),
                Some("/ci/deploy-agent")
            );
        }

        // Expiry plus the skew tolerance ends it, remembered or not.
        clock.advance(Duration::from_secs(89));
        bearer(&authn, &t).expect("within exp + skew");
        clock.advance(Duration::from_secs(2));
        let e = bearer(&authn, &t).expect_err("past exp + skew");
        assert!(e.to_string().contains("expired"), "{e}");

        // A fresh key published under the same kid: the remembered token no longer counts.
        let t = token(&key, &kid, now + 91, now + 600);
        bearer(&authn, &t).expect("valid");
        let (other, _) = EcdsaP256Signer::generate().expect("key");
        let mut swapped = other.public_jwk();
        swapped.kid = Some(kid.clone());
        *trust.0.lock().expect("lock") = Some(swapped);
        let e = bearer(&authn, &t).expect_err("the verifying key is gone");
        assert!(e.to_string().contains("signature"), "{e}");
        // The kid withdrawn from the bundle altogether: refused as well.
        *trust.0.lock().expect("lock") = None;
        bearer(&authn, &t).expect_err("no key under that kid");
        // The original key back: accepted again (verified afresh).
        *trust.0.lock().expect("lock") = Some(key.public_jwk());
        bearer(&authn, &t).expect("the verifying key is back");
    }
}
