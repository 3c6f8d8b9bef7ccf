//! The `Signer` seam and the broker's token-signing key ring.
//!
//! Keys live in `STATE_DIR/keys/` as PKCS#8 DER with mode 0600 (the ring and its rotation:
//! [`keyring`]). Key bytes read from disk are zeroized after ring has parsed them;
//! nothing here ever logs key material.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use zeroize::Zeroizing;

mod keyring;
pub use keyring::{rotate, KeyRing, Rotation, Schedule, MAX_TOKEN_LIFETIME};

use crate::jose::{b64, Jwk};

/// Why signing or key handling failed.
#[derive(Debug, thiserror::Error)]
#[error("signer: {0}")]
pub struct SignError(pub String);

/// Something that signs with one key.
///
/// Contract: `sign` returns a signature that verifies with `public_jwk()` under
/// `algorithm()`; the private key never leaves the implementation.
pub trait Signer: Send + Sync + 'static {
    /// The `kid` published in the JWKS.
    fn key_id(&self) -> &str;
    /// The JWS `alg`.
    fn algorithm(&self) -> &'static str;
    /// Signs `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;
    /// The public half, as a JWK carrying `kid`, `alg` and `use`.
    fn public_jwk(&self) -> Jwk;
    /// The public half as DER SubjectPublicKeyInfo.
    fn public_spki_der(&self) -> Vec<u8>;
}

/// The key id the Docker/OCI distribution registry derives from a public key (libtrust):
/// SHA-256 of the DER SubjectPublicKeyInfo, first 30 bytes, base32 without padding, in
/// groups of four joined by `:`. A registry finds the token's key in its
/// `rootcertbundle` by this id.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let bytes = &digest.as_ref()[..30];
    let mut out = String::with_capacity(48);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    // 30 bytes = 240 bits = 48 characters exactly: no remainder, no padding.
    out.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// DER SubjectPublicKeyInfo of an uncompressed P-256 point.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// An RS256 (RSASSA-PKCS1-v1_5, SHA-256) key held by ring, for relying parties that
/// only take RSA (slurmrestd).
pub struct RsaSigner {
    key: RsaKeyPair,
    rng: SystemRandom,
    jwk: Jwk,
    spki: Vec<u8>,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaSigner")
            .field("kid", &self.jwk.kid)
            .finish_non_exhaustive()
    }
}

impl RsaSigner {
    /// Generates a fresh 2048-bit key; returns the signer and its PKCS#8 encoding.
    /// (ring signs with RSA but cannot generate RSA keys; the `rsa` crate does that.)
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), SignError> {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
            .map_err(|_| SignError("RSA key generation failed".into()))?;
        let der = key
            .to_pkcs8_der()
            .map_err(|_| SignError("RSA key encoding failed".into()))?;
        let bytes = Zeroizing::new(der.as_bytes().to_vec());
        Ok((Self::from_pkcs8(&bytes)?, bytes))
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, SignError> {
        use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
        use rsa::traits::PublicKeyParts as _;
        let key =
            RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| SignError("not an RSA PKCS#8 key".into()))?;
        let parsed = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8)
            .map_err(|_| SignError("not an RSA PKCS#8 key".into()))?;
        let public = parsed.to_public_key();
        let spki = public
            .to_public_key_der()
            .map_err(|_| SignError("RSA public key encoding failed".into()))?
            .as_bytes()
            .to_vec();
        let (n, e) = (
            b64(&public.n().to_bytes_be()),
            b64(&public.e().to_bytes_be()),
        );
        let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref());
        let jwk = Jwk {
            kty: "RSA".into(),
            kid: Some(kid),
            use_: Some("sig".into()),
            alg: Some("RS256".into()),
            crv: None,
            x: None,
            y: None,
            n: Some(n),
            e: Some(e),
        };
        Ok(Self {
            key,
            rng: SystemRandom::new(),
            jwk,
            spki,
        })
    }
}

impl Signer for RsaSigner {
    fn key_id(&self) -> &str {
        self.jwk.kid.as_deref().unwrap_or_default()
    }
    fn algorithm(&self) -> &'static str {
        "RS256"
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
            .map_err(|_| SignError("RSA signing failed".into()))?;
        Ok(sig)
    }
    fn public_jwk(&self) -> Jwk {
        self.jwk.clone()
    }
    fn public_spki_der(&self) -> Vec<u8> {
        self.spki.clone()
    }
}

/// An ES256 (ECDSA P-256, SHA-256) key held by ring.
pub struct EcdsaP256Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    jwk: Jwk,
}

impl std::fmt::Debug for EcdsaP256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcdsaP256Signer")
            .field("kid", &self.jwk.kid)
            .finish_non_exhaustive()
    }
}

/// RFC 7638 thumbprint of an EC public key, used as its `kid`.
fn ec_thumbprint(crv: &str, x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#);
    b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

impl EcdsaP256Signer {
    /// Generates a fresh key; returns the signer and its PKCS#8 encoding.
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), SignError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| SignError("key generation failed".into()))?;
        let bytes = Zeroizing::new(pkcs8.as_ref().to_vec());
        Ok((Self::from_pkcs8(&bytes)?, bytes))
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, SignError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|_| SignError("not a P-256 PKCS#8 key".into()))?;
        let public = key.public_key().as_ref();
        // Uncompressed point: 0x04 || x || y.
        if public.len() != 65 {
            return Err(SignError("unexpected public key encoding".into()));
        }
        let (x, y) = (b64(&public[1..33]), b64(&public[33..65]));
        let kid = ec_thumbprint("P-256", &x, &y);
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some(kid),
            use_: Some("sig".into()),
            alg: Some("ES256".into()),
            crv: Some("P-256".into()),
            x: Some(x),
            y: Some(y),
            n: None,
            e: None,
        };
        Ok(Self { key, rng, jwk })
    }
}

impl Signer for EcdsaP256Signer {
    fn key_id(&self) -> &str {
        self.jwk.kid.as_deref().unwrap_or_default()
    }
    fn algorithm(&self) -> &'static str {
        "ES256"
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SignError("ECDSA signing failed".into()))
    }
    fn public_jwk(&self) -> Jwk {
        self.jwk.clone()
    }
    fn public_spki_der(&self) -> Vec<u8> {
        p256_spki(self.key.public_key().as_ref())
    }
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SignError> {
    crate::files::write_private(path, bytes).map_err(|e| SignError(format!("cannot write {e}")))
}

pub(crate) fn read_key(path: &Path) -> Result<Option<EcdsaP256Signer>, SignError> {
    read_pkcs8(path, EcdsaP256Signer::from_pkcs8)
}

pub(crate) fn read_pkcs8<T>(
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, SignError>,
) -> Result<Option<T>, SignError> {
    match fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let mode = fs::metadata(path)
                .map_err(|e| SignError(format!("{}: {e}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(SignError(format!(
                    "{} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
            parse(&bytes)
                .map(Some)
                .map_err(|e| SignError(format!("{}: {}", path.display(), e.0)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SignError(format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::{verify, Alg};

    #[test]
    fn keys_persist_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring1 = KeyRing::load_or_create(dir.path()).expect("create");
        let kid1 = ring1.current().key_id().to_owned();
        let mode = fs::metadata(dir.path().join("current.p8"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = KeyRing::load_or_create(dir.path()).expect("load");
        assert_eq!(again.current().key_id(), kid1);
    }

    #[test]
    fn signatures_verify_with_the_published_jwk() {
        let (s, _) = EcdsaP256Signer::generate().expect("gen");
        let sig = s.sign(b"hello").expect("sign");
        verify(Alg::Es256, &s.public_jwk(), b"hello", &sig).expect("verifies");
        assert!(verify(Alg::Es256, &s.public_jwk(), b"hellO", &sig).is_err());
    }

    #[test]
    fn libtrust_key_id_has_the_registry_shape() {
        let (s, _) = EcdsaP256Signer::generate().expect("gen");
        let id = libtrust_key_id(&s.public_spki_der());
        assert_eq!(id.len(), 59, "{id}");
        assert_eq!(id.split(':').count(), 12);
        assert!(id
            .bytes()
            .all(|b| b == b':' || b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".contains(&b)));
        // The SPKI we build parses as the key ring's own public key.
        let spki = s.public_spki_der();
        use x509_parser::prelude::FromDer as _;
        let (_, parsed) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).expect("spki parses");
        assert_eq!(parsed.subject_public_key.data.len(), 65);
    }

    #[test]
    fn rsa_keys_sign_rs256_that_verify_with_the_jwk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = KeyRing::load_or_create(dir.path())
            .and_then(|r| r.with_rsa(dir.path()))
            .expect("ring");
        let rsa = ring.rsa().expect("rsa").clone();
        assert_eq!(ring.jwks().keys.len(), 2);
        let sig = rsa.sign(b"payload").expect("sign");
        verify(Alg::Rs256, &rsa.public_jwk(), b"payload", &sig).expect("verifies");
        let again = KeyRing::load_or_create(dir.path())
            .and_then(|r| r.with_rsa(dir.path()))
            .expect("reload");
        assert_eq!(again.rsa().expect("rsa").key_id(), rsa.key_id());
    }

    #[test]
    fn refuses_world_readable_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        KeyRing::load_or_create(dir.path()).expect("create");
        fs::set_permissions(
            dir.path().join("current.p8"),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(KeyRing::load_or_create(dir.path()).is_err());
    }
}
