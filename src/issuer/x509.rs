//! Short-lived X.509 client certificates from the caller's CSR.
//!
//! The caller keeps its private key: it sends a PKCS#10 request, whose signature proves
//! it holds the key. The broker takes only the public key from it — subject, SANs and
//! extensions are the broker's, never the CSR's: SAN = the caller's SPIFFE ID, subject
//! from the profile (e.g. Kubernetes user as CN, groups as O), `CA:FALSE`, client-auth
//! only, `notAfter` = the lease expiry. The issuing CA is the broker's own intermediate,
//! a PKI separate from the SPIFFE trust domain, so these certificates are never SVIDs.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};
use zeroize::Zeroizing;

use super::{Credential, IssueError, Issuer, LeaseTerms, Minted, Order};
use crate::config::{BackendProfile, CredentialKind, X509CaConfig};
use crate::policy::Grant;

/// Longest CSR accepted (DER bytes).
pub const MAX_CSR_LEN: usize = 16 * 1024;

fn internal(e: impl std::fmt::Display) -> IssueError {
    IssueError::Internal(e.to_string())
}

/// The broker's issuing CA: its certificate chain and key.
pub struct IssuingCa {
    issuer: rcgen::Issuer<'static, KeyPair>,
    chain_pem: String,
    ca_spki: Vec<u8>,
}

impl IssuingCa {
    /// Loads the CA named in the config (`[x509] cert`, `key`).
    pub fn load(cfg: &X509CaConfig) -> Result<Self, IssueError> {
        let chain_pem = fs::read_to_string(&cfg.cert)
            .map_err(|e| internal(format!("{}: {e}", cfg.cert.display())))?;
        let key_pem = Zeroizing::new(
            fs::read_to_string(&cfg.key)
                .map_err(|e| internal(format!("{}: {e}", cfg.key.display())))?,
        );
        let key = KeyPair::from_pem(&key_pem).map_err(internal)?;
        let ca_der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .ok_or_else(|| internal(format!("{}: no certificate", cfg.cert.display())))?
            .map_err(|e| internal(format!("{}: {e:?}", cfg.cert.display())))?;
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(internal)?;
        if !ca.is_ca() {
            return Err(internal(format!(
                "{}: the issuing certificate is not a CA",
                cfg.cert.display()
            )));
        }
        if ca.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(internal(format!(
                "{} and {} are not a pair",
                cfg.cert.display(),
                cfg.key.display()
            )));
        }
        let ca_spki = ca.public_key().raw.to_vec();
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, key).map_err(internal)?;
        Ok(Self {
            issuer,
            chain_pem,
            ca_spki,
        })
    }

    /// Dev only: a root and an intermediate under `dir` (`x509-root.pem`,
    /// `x509-issuing-ca.pem`, `x509-issuing-ca.key` mode 0600), created on first use.
    pub fn create_dev(dir: &Path) -> Result<X509CaConfig, IssueError> {
        let cfg = X509CaConfig {
            cert: dir.join("x509-issuing-ca.pem"),
            key: dir.join("x509-issuing-ca.key"),
        };
        if cfg.cert.exists() && cfg.key.exists() {
            return Ok(cfg);
        }
        let now = time::OffsetDateTime::now_utc();
        let ca = |cn: &str, pathlen: Option<u8>| {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "spiffe-broker dev");
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(match pathlen {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(3650);
            p
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
        let root_params = ca("spiffe-broker dev client-certificate root", None);
        let root = root_params.self_signed(&root_key).map_err(internal)?;
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
        let mut p = ca("spiffe-broker dev issuing CA", Some(0));
        p.use_authority_key_identifier_extension = true;
        let inter = p.signed_by(&key, &root_issuer).map_err(internal)?;
        fs::write(dir.join("x509-root.pem"), root.pem()).map_err(internal)?;
        write_private(&cfg.key, key.serialize_pem().as_bytes())?;
        fs::write(&cfg.cert, format!("{}{}", inter.pem(), root.pem())).map_err(internal)?;
        Ok(cfg)
    }

    /// The root a relying party trusts, for the dev CA (`x509-root.pem`).
    pub fn dev_root_path(dir: &Path) -> PathBuf {
        dir.join("x509-root.pem")
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IssueError> {
    crate::files::write_private(path, bytes).map_err(internal)
}

/// The public key of a verified CSR: exactly the key the caller holds.
///
/// The key type comes from the key's own algorithm and curve, never from the CSR's
/// signature algorithm (a P-256 key may sign its CSR with SHA-384).
pub struct CsrKey {
    /// The whole DER SubjectPublicKeyInfo, as the CSR carries it.
    spki: Vec<u8>,
    /// The BIT STRING contents (EC point, Ed25519 key, RSA `RSAPublicKey`).
    key: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
/// Smallest RSA key accepted.
const MIN_RSA_BITS: usize = 2048;

/// Parses a CSR from the network (PEM or DER), checks its signature (proof of
/// possession of the private key) and returns its public key. Everything else in the
/// CSR (subject, SANs, extensions) is ignored: the certificate's content is the broker's.
pub fn parse_csr(bytes: &[u8]) -> Result<CsrKey, IssueError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::public_key::PublicKey;
    let refuse = |m: &str| IssueError::Refused(m.to_owned());
    if bytes.is_empty() {
        return Err(refuse(
            "this profile issues a certificate: send a PKCS#10 CSR (csr)",
        ));
    }
    if bytes.len() > MAX_CSR_LEN {
        return Err(IssueError::Refused(format!(
            "csr longer than {MAX_CSR_LEN} bytes"
        )));
    }
    let der = if bytes.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(bytes)
            .map_err(|_| refuse("csr is not a PEM CERTIFICATE REQUEST"))?
    } else {
        CertificateSigningRequestDer::from(bytes.to_vec())
    };
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|_| refuse("csr is not a valid PKCS#10 request"))?;
    if !rest.is_empty() {
        return Err(refuse("csr has trailing bytes"));
    }
    csr.verify_signature()
        .map_err(|_| refuse("csr signature does not verify (proof of possession failed)"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let alg = match (alg.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => &rcgen::PKCS_ECDSA_P256_SHA256,
        (OID_EC_PUBLIC_KEY, Some(OID_P384)) => &rcgen::PKCS_ECDSA_P384_SHA384,
        (OID_ED25519, _) => &rcgen::PKCS_ED25519,
        (OID_RSA, _) => match spki.parsed() {
            Ok(PublicKey::RSA(k)) if k.key_size() >= MIN_RSA_BITS => &rcgen::PKCS_RSA_SHA256,
            _ => return Err(refuse("csr RSA key is smaller than 2048 bits")),
        },
        _ => {
            return Err(refuse(
                "csr key must be ECDSA P-256 or P-384, Ed25519, or RSA of 2048+ bits",
            ))
        }
    };
    Ok(CsrKey {
        spki: spki.raw.to_vec(),
        key: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

impl CsrKey {
    /// The DER SubjectPublicKeyInfo (what an approval of a certificate binds to).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
}

/// Signs client certificates with the issuing CA.
pub struct X509Issuer {
    ca: IssuingCa,
}

impl X509Issuer {
    /// An issuer signing with `ca`.
    pub fn new(ca: IssuingCa) -> Self {
        Self { ca }
    }

    /// The certificate's parameters: a pure function of the grant and terms (and the serial).
    pub fn template(
        grant: &Grant,
        terms: &LeaseTerms,
        serial: [u8; 16],
    ) -> Result<CertificateParams, IssueError> {
        let BackendProfile::X509 {
            common_name,
            organizations,
        } = &grant.profile.backend
        else {
            return Err(internal("not an x509 profile"));
        };
        let name = terms
            .subject
            .rsplit('/')
            .next()
            .unwrap_or(&terms.subject)
            .to_owned();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for o in organizations {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        dn.push(
            DnType::CommonName,
            common_name
                .as_deref()
                .map(|c| c.replace("{name}", &name))
                .unwrap_or(name),
        );
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(
            terms
                .subject
                .as_str()
                .try_into()
                .map_err(|e| internal(format!("SAN: {e}")))?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before =
            time::OffsetDateTime::from_unix_timestamp(terms.issued_at).map_err(internal)?;
        p.not_after =
            time::OffsetDateTime::from_unix_timestamp(terms.expires_at).map_err(internal)?;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        Ok(p)
    }

    /// Re-reads the minted leaf: signed by the CA, SAN = the subject only, not a CA,
    /// client-auth, the expected validity and serial.
    fn validate(
        &self,
        der: &[u8],
        terms: &LeaseTerms,
        serial: &[u8],
        key: &CsrKey,
    ) -> Result<(), IssueError> {
        let bad = |m: &str| IssueError::Internal(format!("minted certificate: {m}"));
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| bad("unparseable"))?;
        if cert.public_key().raw != key.spki.as_slice() {
            return Err(bad("public key differs from the CSR's"));
        }
        let (_, ca_key) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&self.ca.ca_spki)
            .map_err(|_| bad("CA key unparseable"))?;
        cert.verify_signature(Some(&ca_key))
            .map_err(|_| bad("signature does not verify with the issuing CA"))?;
        if cert.is_ca() {
            return Err(bad("is a CA"));
        }
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            _ => return Err(bad("SAN other than the SPIFFE ID")),
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku)
                    if !eku.client_auth || eku.server_auth || eku.any =>
                {
                    return Err(bad("extended key usage is not client-auth only"));
                }
                _ => {}
            }
        }
        if uris != [terms.subject.clone()] {
            return Err(bad("SAN is not exactly the caller's SPIFFE ID"));
        }
        if cert.validity().not_after.timestamp() != terms.expires_at
            || cert.validity().not_before.timestamp() != terms.issued_at
        {
            return Err(bad("validity differs from the lease"));
        }
        if cert.raw_serial() != serial {
            return Err(bad("serial differs"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Issuer for X509Issuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::X509
    }

    async fn issue(&self, order: Order<'_>) -> Result<Minted, IssueError> {
        let Order {
            grant,
            terms,
            material,
        } = order;
        let key = parse_csr(material.csr_der.as_deref().unwrap_or_default())?;
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| internal("rng"))?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01; // positive and exactly 16 bytes in DER
        let cert = Self::template(grant, terms, serial)?
            .signed_by(&key, &self.ca.issuer)
            .map_err(internal)?;
        self.validate(cert.der(), terms, &serial, &key)?;
        let chain_pem = format!("{}{}", cert.pem(), self.ca.chain_pem);
        let serial = hex::encode(serial);
        Ok(Minted {
            credential: Credential::Certificate {
                chain_pem,
                serial: serial.clone(),
            },
            expires_at: terms.expires_at,
            handle: Some(serial),
        })
    }

    fn not_renewable(&self) -> Option<&'static str> {
        Some("certificates are not renewed: request a new one with a fresh CSR")
    }
}
