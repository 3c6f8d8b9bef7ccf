//! The dev CA: signs X.509-SVIDs and JWT-SVIDs for the demo identities.
//!
//! Dev only. Its keys live in the state dir (`dev-ca.pem`, `dev-ca.key`, `dev-jwt.key`,
//! mode 0600) so a restarted `spiffe-broker dev` keeps its trust bundle and
//! `dev mint-svid` can mint test SVIDs offline.
//!
//! X.509 authorities rotate as SPIRE's do (`pkg/server/ca/manager`): a new authority is
//! first *prepared* (trusted, in the bundle, not signing) so every relying party learns
//! it; then *activated* (new SVIDs are signed by it, the old one stays trusted for the
//! SVIDs still out there); then the old ones are *retired* (dropped from the bundle).
//! Each step is announced on [`DevCa::subscribe`], so the dev Workload API pushes it at
//! once.
//! Only the active authority is persisted (`dev-ca.pem`, `dev-ca.key`); `bundle.pem` is
//! rewritten with the whole bundle at each step. A restart mid-rotation therefore keeps
//! just the active authority, which every SVID the restarted Workload API hands out
//! chains to.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use spiffe::SpiffeId;
use tokio::sync::watch;
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
    /// The CA certificate that signed it (the Workload API re-issues when this is no
    /// longer the active authority).
    pub issuer: CertificateDer<'static>,
}

/// The trust bundle file of the state dir (all trusted CA certificates, PEM).
pub const BUNDLE_FILE: &str = "bundle.pem";

/// One X.509 authority: a CA key and its self-signed certificate.
struct Authority {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The X.509 authorities of the trust domain.
struct Authorities {
    /// Signs new X.509-SVIDs; always one of `bundle`.
    active: Arc<Authority>,
    /// Every trusted authority, oldest first: the active one, one being prepared, and the
    /// previous ones until they are retired.
    bundle: Vec<Arc<Authority>>,
}

impl Authorities {
    /// The trusted authority whose certificate is `ca`.
    fn trusted(&self, ca: &CertificateDer<'_>) -> Option<Arc<Authority>> {
        self.bundle
            .iter()
            .find(|x| x.der.as_ref() == ca.as_ref())
            .cloned()
    }
}

/// The dev certificate authority of one trust domain.
pub struct DevCa {
    trust_domain: String,
    dir: PathBuf,
    /// Read on every SVID; written only by the three rotation steps.
    authorities: RwLock<Authorities>,
    /// Bumped after every rotation step (the dev Workload API pushes the change).
    changes: watch::Sender<u64>,
    jwt: EcdsaP256Signer,
    /// DNS names an identity's X.509-SVIDs carry beside its SPIFFE ID (SPIRE's
    /// registration-entry `dnsNames`): the broker's own, so stock TLS clients that check
    /// a host name can connect.
    dns_names: RwLock<std::collections::BTreeMap<String, Vec<String>>>,
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
    crate::files::write_private(path, bytes).map_err(ca_err)
}

/// Replaces `path` atomically, so a crash never leaves a half-written CA certificate or
/// key behind.
fn replace_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CaError> {
    let mode = if secret { 0o600 } else { 0o644 };
    crate::files::write_atomic(path, bytes, mode).map_err(ca_err)
}

/// A new authority for `trust_domain`: P-256 key, self-signed CA certificate valid for
/// ten years.
fn new_authority(trust_domain: &str) -> Result<Authority, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    let params = ca_params(trust_domain)?;
    let mut p = params.clone();
    let now = crate::clock::SystemClock.now();
    p.not_before = odt(now - Duration::from_secs(3600))?;
    p.not_after = odt(now + Duration::from_secs(10 * 365 * 86_400))?;
    let cert = p.self_signed(&key).map_err(ca_err)?;
    Ok(Authority {
        der: cert.der().clone(),
        pem: cert.pem(),
        // All authorities share the subject (as SPIRE's do); each has its own key and
        // key identifier, and path building tries every anchor of that name.
        issuer: Issuer::new(params, key),
    })
}

impl Authority {
    /// The CA key in PEM, for `dev-ca.key`.
    fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }
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
    /// Loads the CA from `dir`, creating it on first use. The loaded authority is the
    /// active one and the whole bundle.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(|e| CaError(format!("{}: {e}", dir.display())))?;
        let (cert_path, key_path, jwt_path) = (
            dir.join("dev-ca.pem"),
            dir.join("dev-ca.key"),
            dir.join("dev-jwt.key"),
        );
        let authority = if cert_path.exists() && key_path.exists() {
            let key_pem = Zeroizing::new(fs::read_to_string(&key_path).map_err(ca_err)?);
            let key = KeyPair::from_pem(&key_pem).map_err(ca_err)?;
            let pem = fs::read_to_string(&cert_path).map_err(ca_err)?;
            Authority {
                der: rustls_pemfile_one(&pem)?,
                pem,
                issuer: Issuer::new(ca_params(trust_domain)?, key),
            }
        } else {
            let authority = new_authority(trust_domain)?;
            write_secret(&key_path, authority.key_pem().as_bytes())?;
            fs::write(&cert_path, &authority.pem).map_err(ca_err)?;
            authority
        };
        let jwt = match fs::read(&jwt_path) {
            Ok(b) => EcdsaP256Signer::from_pkcs8(&Zeroizing::new(b)).map_err(ca_err)?,
            Err(_) => {
                let (s, bytes) = EcdsaP256Signer::generate().map_err(ca_err)?;
                write_secret(&jwt_path, &bytes)?;
                s
            }
        };
        let active = Arc::new(authority);
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            dir: dir.to_path_buf(),
            authorities: RwLock::new(Authorities {
                bundle: vec![active.clone()],
                active,
            }),
            changes: watch::channel(0).0,
            jwt,
            dns_names: RwLock::default(),
        })
    }

    /// X.509-SVIDs minted for `id` from now on also carry `names` as DNS SANs.
    pub fn set_dns_names(&self, id: &SpiffeId, names: &[&str]) {
        self.dns_names
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.to_string(),
                names.iter().map(|n| n.to_string()).collect(),
            );
    }

    fn dns_names(&self, id: &SpiffeId) -> Vec<String> {
        self.dns_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.to_string())
            .cloned()
            .unwrap_or_default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Authorities> {
        // A panic elsewhere cannot leave `Authorities` half-updated (each step replaces
        // whole fields), so a poisoned lock is still consistent.
        self.authorities.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Authorities> {
        self.authorities.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `bundle.pem` for `bundle`. Each step writes its files before it changes
    /// anything in memory, so a step that fails has not happened.
    fn write_bundle_file(&self, bundle: &[Arc<Authority>]) -> Result<(), CaError> {
        let pem: String = bundle.iter().map(|x| x.pem.as_str()).collect();
        replace_file(&self.dir.join(BUNDLE_FILE), pem.as_bytes(), false)
    }

    /// Tells subscribers a step happened; called with the write lock still held, so they
    /// see the steps in order.
    fn announce(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Step 1 of a rotation: creates a new authority (new P-256 key, self-signed CA
    /// certificate of this trust domain) and adds it to the bundle. It does not sign
    /// yet, so relying parties can learn it before any SVID chains to it. Returns its
    /// certificate, which names it in [`Self::activate`].
    pub fn prepare(&self) -> Result<CertificateDer<'static>, CaError> {
        // Its key stays in memory; it is written out only if it is activated.
        let authority = Arc::new(new_authority(&self.trust_domain)?);
        let mut a = self.write();
        let mut bundle = a.bundle.clone();
        bundle.push(authority.clone());
        self.write_bundle_file(&bundle)?;
        a.bundle = bundle;
        self.announce();
        Ok(authority.der.clone())
    }

    /// Step 2: makes the trusted authority with certificate `ca` the one that signs new
    /// SVIDs (the Workload API re-issues every SVID at once) and persists it as
    /// `dev-ca.pem`/`dev-ca.key`. The previous authorities stay in the bundle.
    pub fn activate(&self, ca: &CertificateDer<'_>) -> Result<(), CaError> {
        let mut a = self.write();
        let next = a
            .trusted(ca)
            .ok_or_else(|| CaError("cannot activate an authority that is not trusted".into()))?;
        // Each file is replaced atomically, the pair is not: a crash between the two
        // leaves a mismatched pair (dev only; delete both to start over).
        replace_file(
            &self.dir.join("dev-ca.key"),
            next.key_pem().as_bytes(),
            true,
        )?;
        replace_file(&self.dir.join("dev-ca.pem"), next.pem.as_bytes(), false)?;
        a.active = next;
        self.announce();
        Ok(())
    }

    /// Step 3: drops every authority but the active one from the bundle. SVIDs they
    /// signed are no longer trusted anywhere. Returns the retired certificates.
    pub fn retire_inactive(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut a = self.write();
        let (kept, retired): (Vec<_>, Vec<_>) = a
            .bundle
            .iter()
            .cloned()
            .partition(|x| Arc::ptr_eq(x, &a.active));
        self.write_bundle_file(&kept)?;
        a.bundle = kept;
        self.announce();
        Ok(retired.iter().map(|x| x.der.clone()).collect())
    }

    /// A receiver that changes after each rotation step.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The active CA certificate (the one signing new SVIDs). Outside a rotation it is
    /// the whole X.509 bundle; during one, see [`Self::bundle`].
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.read().active.der.clone()
    }

    /// The active CA certificate in PEM.
    pub fn ca_pem(&self) -> String {
        self.read().active.pem.clone()
    }

    /// The X.509 bundle: every trusted CA certificate, oldest first.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.read().bundle.iter().map(|x| x.der.clone()).collect()
    }

    /// The X.509 bundle in PEM (what `bundle.pem` holds).
    pub fn bundle_pem(&self) -> String {
        self.read().bundle.iter().map(|x| x.pem.as_str()).collect()
    }

    /// The JWT bundle (JWKS).
    pub fn jwt_bundle(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwt.public_jwk()],
        }
    }

    /// Signs arbitrary leaf parameters with the active CA (tests use this to build bad
    /// SVIDs).
    pub fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, CaError> {
        Ok(params
            .signed_by(key, &self.read().active.issuer)
            .map_err(ca_err)?
            .der()
            .clone())
    }

    /// Mints an X.509-SVID for `id` valid for `ttl`, signed by the active CA.
    pub fn mint_x509_svid(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, CaError> {
        let active = self.read().active.clone();
        mint(&active, id, &self.dns_names(id), ttl)
    }

    /// Mints an X.509-SVID signed by the trusted authority with certificate `ca`, active
    /// or not (tests prove that relying parties trust a prepared authority before it
    /// signs anything they depend on).
    pub fn mint_x509_svid_by(
        &self,
        ca: &CertificateDer<'_>,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<MintedSvid, CaError> {
        let authority = self
            .read()
            .trusted(ca)
            .ok_or_else(|| CaError("no trusted authority with that certificate".into()))?;
        mint(&authority, id, &self.dns_names(id), ttl)
    }

    /// What the Workload API sends `id`: `held` again while the active authority signed
    /// it, else a fresh SVID; with the bundle, both read under one lock so the SVID
    /// always chains to the bundle sent with it.
    pub(crate) fn workload_x509(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        held: Option<MintedSvid>,
    ) -> Result<(MintedSvid, Vec<CertificateDer<'static>>), CaError> {
        let dns = self.dns_names(id);
        let a = self.read();
        let svid = match held {
            Some(s) if s.issuer.as_ref() == a.active.der.as_ref() => s,
            _ => mint(&a.active, id, &dns, ttl)?,
        };
        Ok((svid, a.bundle.iter().map(|x| x.der.clone()).collect()))
    }

    /// Mints a JWT-SVID for `id` with `audience`, valid for `ttl`.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<String, CaError> {
        let now = unix_seconds(crate::clock::SystemClock.now());
        self.sign_jwt_svid(&serde_json::json!({
            "sub": id.to_string(),
            "aud": audience,
            "exp": now + ttl.as_secs() as i64,
            "iat": now,
        }))
    }

    /// Signs a JWT-SVID with exactly these claims under the trust domain's JWT key (tests
    /// craft tokens with claims a SPIFFE server would not set, e.g. a forged `act`).
    pub fn sign_jwt_svid(&self, claims: &serde_json::Value) -> Result<String, CaError> {
        #[derive(Serialize)]
        struct Header<'a> {
            alg: &'a str,
            kid: &'a str,
            typ: &'a str,
        }
        let header = Header {
            alg: "ES256",
            kid: self.jwt.key_id(),
            typ: "JWT",
        };
        let input = jose::signing_input(&header, claims).map_err(ca_err)?;
        let sig = self.jwt.sign(input.as_bytes()).map_err(ca_err)?;
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

/// Mints an X.509-SVID for `id` valid for `ttl`, signed by `authority`.
fn mint(
    authority: &Authority,
    id: &SpiffeId,
    dns_names: &[String],
    ttl: Duration,
) -> Result<MintedSvid, CaError> {
    let now = crate::clock::SystemClock.now();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    let not_after = now + ttl;
    let mut params = svid_params(&id.to_string(), now - Duration::from_secs(30), not_after)?;
    for name in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into().map_err(ca_err)?));
    }
    let cert = params.signed_by(&key, &authority.issuer).map_err(ca_err)?;
    Ok(MintedSvid {
        chain: vec![cert.der().clone()],
        key_pkcs8: Zeroizing::new(key.serialize_der()),
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        not_after,
        issuer: authority.der.clone(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_file(dir: &Path, name: &str) -> Vec<CertificateDer<'static>> {
        pem_certs(&fs::read_to_string(dir.join(name)).expect("read")).expect("PEM")
    }

    /// The three steps, what the Workload API would send after each, and what survives
    /// a restart.
    #[test]
    fn rotation_steps_change_bundle_signer_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::load_or_create(dir.path(), "example.org").expect("CA");
        let id = SpiffeId::new("spiffe://example.org/w").expect("id");
        let ttl = Duration::from_secs(600);
        let mut changes = ca.subscribe();
        let a = ca.ca_der();
        let (held, bundle) = ca.workload_x509(&id, ttl, None).expect("svid");
        assert_eq!(bundle, vec![a.clone()]);
        assert_eq!(held.issuer, a);

        let b = ca.prepare().expect("prepare");
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        let leaf = held.chain[0].clone();
        let (held, bundle) = ca.workload_x509(&id, ttl, Some(held)).expect("svid");
        assert_eq!(bundle, vec![a.clone(), b.clone()]);
        assert_eq!(
            held.chain[0], leaf,
            "a prepared authority re-issues nothing"
        );
        assert_eq!(
            pem_file(dir.path(), BUNDLE_FILE),
            vec![a.clone(), b.clone()]
        );

        ca.activate(&b).expect("activate");
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        let (held, bundle) = ca.workload_x509(&id, ttl, Some(held)).expect("svid");
        assert_eq!(
            held.issuer, b,
            "activation re-issues from the new authority"
        );
        assert_eq!(bundle, vec![a.clone(), b.clone()]);
        assert_eq!(pem_file(dir.path(), "dev-ca.pem"), vec![b.clone()]);

        assert_eq!(ca.retire_inactive().expect("retire"), vec![a.clone()]);
        assert!(changes.has_changed().expect("open"));
        assert_eq!(ca.bundle(), vec![b.clone()]);
        assert_eq!(pem_file(dir.path(), BUNDLE_FILE), vec![b.clone()]);
        assert!(ca.mint_x509_svid_by(&a, &id, ttl).is_err(), "A is gone");
        assert!(
            ca.activate(&a).is_err(),
            "an untrusted authority cannot sign"
        );

        // A restart loads B, with its key: what it signs chains to B.
        drop(ca);
        let ca = DevCa::load_or_create(dir.path(), "example.org").expect("reload");
        assert_eq!(ca.bundle(), vec![b.clone()]);
        let svid = ca.mint_x509_svid(&id, ttl).expect("svid");
        let trust = crate::authn::StaticTrust::default().with_x509("example.org", vec![b]);
        crate::authn::validate_x509_svid(
            &svid.chain,
            &trust,
            crate::clock::SystemClock.now(),
            crate::authn::SvidRole::Client,
        )
        .expect("the reloaded authority signs SVIDs that chain to B");
    }
}
