//! The dev CA: signs X.509-SVIDs and JWT-SVIDs for the demo identities.
//!
//! Dev only. Its keys live in the state dir (`dev-ca.pem`, `dev-ca.key`, `dev-jwt.key`,
//! mode 0600) so a restarted `spiffe-broker dev` keeps its trust bundle and
//! `dev mint-svid` can mint test SVIDs offline.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use spiffe::SpiffeId;
use zeroize::Zeroizing;

use crate::clock::{unix_seconds, Clock as _};
use crate::crypto::{EcdsaP256Signer, Signer};
use crate::jose::{self, b64, JwkSet};

/// A dev CA error.
#[derive(Debug, thiserror::Error)]
#[error("dev CA: {0}")]
pub struct CaError(pub String);

fn ca_err(e: impl std::fmt::Display) -> CaError {
    CaError(e.to_string())
}

/// A minted X.509-SVID.
pub struct MintedSvid {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Leaf in PEM.
    pub cert_pem: String,
    /// Key in PEM.
    pub key_pem: Zeroizing<String>,
    /// Expiry.
    pub not_after: SystemTime,
}

/// The dev certificate authority of one trust domain.
pub struct DevCa {
    trust_domain: String,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    jwt: EcdsaP256Signer,
}

fn ca_params(trust_domain: &str) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "spiffe-broker dev");
    dn.push(DnType::CommonName, format!("{trust_domain} dev CA"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(ca_err)?,
    )];
    Ok(p)
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CaError(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| CaError(format!("{}: {e}", path.display())))
}

fn odt(t: SystemTime) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds(t)).map_err(ca_err)
}

/// Parameters of a well-formed X.509-SVID leaf for `uri`, valid over `[from, until]`.
/// Tests start from this and break one property at a time.
pub fn svid_params(
    uri: &str,
    from: SystemTime,
    until: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "spiffe-broker dev");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(ca_err)?)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = odt(from)?;
    p.not_after = odt(until)?;
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| CaError("rng".into()))?;
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(p)
}

impl DevCa {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(|e| CaError(format!("{}: {e}", dir.display())))?;
        let (cert_path, key_path, jwt_path) = (
            dir.join("dev-ca.pem"),
            dir.join("dev-ca.key"),
            dir.join("dev-jwt.key"),
        );
        let params = ca_params(trust_domain)?;
        let (key, ca_pem) = if cert_path.exists() && key_path.exists() {
            let key_pem = Zeroizing::new(fs::read_to_string(&key_path).map_err(ca_err)?);
            (
                KeyPair::from_pem(&key_pem).map_err(ca_err)?,
                fs::read_to_string(&cert_path).map_err(ca_err)?,
            )
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
            let mut p = params.clone();
            let now = crate::clock::SystemClock.now();
            p.not_before = odt(now - Duration::from_secs(3600))?;
            p.not_after = odt(now + Duration::from_secs(10 * 365 * 86_400))?;
            let cert = p.self_signed(&key).map_err(ca_err)?;
            write_secret(&key_path, Zeroizing::new(key.serialize_pem()).as_bytes())?;
            fs::write(&cert_path, cert.pem()).map_err(ca_err)?;
            (key, cert.pem())
        };
        let ca_der = rustls_pemfile_one(&ca_pem)?;
        let jwt = match fs::read(&jwt_path) {
            Ok(b) => EcdsaP256Signer::from_pkcs8(&Zeroizing::new(b)).map_err(ca_err)?,
            Err(_) => {
                let (s, bytes) = EcdsaP256Signer::generate().map_err(ca_err)?;
                write_secret(&jwt_path, &bytes)?;
                s
            }
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            ca_der,
            ca_pem,
            issuer: Issuer::new(params, key),
            jwt,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate (the X.509 bundle).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The CA certificate in PEM (`bundle.pem`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The JWT bundle (JWKS).
    pub fn jwt_bundle(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwt.public_jwk()],
        }
    }

    /// Signs arbitrary leaf parameters with the CA (tests use this to build bad SVIDs).
    pub fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, CaError> {
        Ok(params
            .signed_by(key, &self.issuer)
            .map_err(ca_err)?
            .der()
            .clone())
    }

    /// Mints an X.509-SVID for `id` valid for `ttl`.
    pub fn mint_x509_svid(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, CaError> {
        let now = crate::clock::SystemClock.now();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let not_after = now + ttl;
        let params = svid_params(&id.to_string(), now - Duration::from_secs(30), not_after)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(ca_err)?;
        Ok(MintedSvid {
            chain: vec![cert.der().clone()],
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            not_after,
        })
    }

    /// Mints a JWT-SVID for `id` with `audience`, valid for `ttl`.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<String, CaError> {
        #[derive(Serialize)]
        struct Header<'a> {
            alg: &'a str,
            kid: &'a str,
            typ: &'a str,
        }
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: String,
            aud: &'a [String],
            exp: i64,
            iat: i64,
        }
        let now = unix_seconds(crate::clock::SystemClock.now());
        let input = jose::signing_input(
            &Header {
                alg: "ES256",
                kid: self.jwt.key_id(),
                typ: "JWT",
            },
            &Claims {
                sub: id.to_string(),
                aud: audience,
                exp: now + ttl.as_secs() as i64,
                iat: now,
            },
        )
        .map_err(ca_err)?;
        let sig = self.jwt.sign(input.as_bytes()).map_err(ca_err)?;
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

/// Reads the first certificate of a PEM document.
pub fn rustls_pemfile_one(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    pem_certs(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| CaError("no certificate in PEM".into()))
}

/// Reads every certificate of a PEM document.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError(format!("bad PEM: {e:?}")))
}
