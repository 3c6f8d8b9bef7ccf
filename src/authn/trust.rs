//! Where trust bundles come from: the Workload API (production and dev), or files.

use std::collections::HashMap;

use rustls::pki_types::CertificateDer;
use spiffe::{JwtSource, TrustDomain, X509Source};

use crate::jose::{Jwk, JwkSet};

/// Trust bundles by trust domain.
///
/// Contract: returns only authorities for the named trust domain; `None` when that
/// trust domain has no bundle (the caller is then refused).
pub trait TrustSource: Send + Sync + 'static {
    /// X.509 authorities (DER) of a trust domain.
    fn x509_authorities(&self, trust_domain: &str) -> Option<Vec<CertificateDer<'static>>>;
    /// The JWT authority with this key id in a trust domain's JWT bundle.
    fn jwt_authority(&self, trust_domain: &str, kid: &str) -> Option<Jwk>;
}

/// Bundles streamed from the SPIFFE Workload API; follows bundle rotation.
pub struct WorkloadTrust {
    x509: X509Source,
    jwt: Option<JwtSource>,
}

impl WorkloadTrust {
    /// Wraps live sources. Without a `JwtSource`, JWT-SVIDs are refused.
    pub fn new(x509: X509Source, jwt: Option<JwtSource>) -> Self {
        Self { x509, jwt }
    }
}

impl TrustSource for WorkloadTrust {
    fn x509_authorities(&self, trust_domain: &str) -> Option<Vec<CertificateDer<'static>>> {
        let td = TrustDomain::new(trust_domain).ok()?;
        let bundle = self.x509.try_bundle_for_trust_domain(&td)?;
        Some(
            bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn jwt_authority(&self, trust_domain: &str, kid: &str) -> Option<Jwk> {
        let td = TrustDomain::new(trust_domain).ok()?;
        let bundle = self.jwt.as_ref()?.try_bundle_for_trust_domain(&td)?;
        let authority = bundle.find_jwt_authority(kid)?;
        serde_json::from_slice(authority.jwk_json()).ok()
    }
}

/// Fixed bundles, e.g. read from `bundle.pem`.
#[derive(Debug, Clone, Default)]
pub struct StaticTrust {
    x509: HashMap<String, Vec<CertificateDer<'static>>>,
    jwt: HashMap<String, JwkSet>,
}

impl StaticTrust {
    /// Adds X.509 authorities for a trust domain.
    pub fn with_x509(
        mut self,
        trust_domain: &str,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Self {
        self.x509
            .entry(trust_domain.to_owned())
            .or_default()
            .extend(authorities);
        self
    }
    /// Adds JWT authorities for a trust domain.
    pub fn with_jwt(mut self, trust_domain: &str, keys: JwkSet) -> Self {
        self.jwt
            .entry(trust_domain.to_owned())
            .or_default()
            .keys
            .extend(keys.keys);
        self
    }
}

impl TrustSource for StaticTrust {
    fn x509_authorities(&self, trust_domain: &str) -> Option<Vec<CertificateDer<'static>>> {
        self.x509.get(trust_domain).cloned()
    }
    fn jwt_authority(&self, trust_domain: &str, kid: &str) -> Option<Jwk> {
        self.jwt
            .get(trust_domain)?
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .cloned()
    }
}
