//! Docker/OCI distribution registry tokens.
//!
//! A registry configured with `auth.token` (realm, service, issuer, rootcertbundle)
//! accepts a bearer JWT whose `iss` is the configured issuer, whose `aud` is its
//! `service`, and whose `access` claim lists `{type, name, actions}`; it finds the
//! signing key in `rootcertbundle` by the header's `kid` (the libtrust key id). The
//! broker serves that bundle at `/oci/rootcertbundle.pem`: one self-signed certificate
//! per published signing key, so key rotation only needs the registry to re-read it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::IssueError;
use crate::crypto::{KeyRing, Signer};

/// Actions a registry understands on a repository.
const ACTIONS: [&str; 4] = ["pull", "push", "delete", "*"];

/// Distribution's repository name grammar: lower-case path components separated by
/// `/`, each `[a-z0-9]+` joined by `.`, `_`, `__` or `-`, at most 255 characters.
pub fn valid_repository(name: &str) -> bool {
    fn component(c: &str) -> bool {
        let b = c.as_bytes();
        let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        !b.is_empty()
            && b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum)
            && b.iter().all(|x| alnum(x) || b"._-".contains(x))
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("-.")
            && !c.contains(".-")
    }
    !name.is_empty() && name.len() <= 255 && name.split('/').all(component)
}

/// The `access` claim for granted scopes of the form `repository:NAME:ACTION`.
pub fn access_claim(scopes: &[&str]) -> Result<Value, IssueError> {
    let mut by_repo: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in scopes {
        let mut parts = s.splitn(2, ':');
        let (Some("repository"), Some(rest)) = (parts.next(), parts.next()) else {
            return Err(IssueError::Refused(format!(
                "scope {s:?} is not repository:NAME:ACTION"
            )));
        };
        let Some((name, action)) = rest.rsplit_once(':') else {
            return Err(IssueError::Refused(format!(
                "scope {s:?} is not repository:NAME:ACTION"
            )));
        };
        if !valid_repository(name) {
            return Err(IssueError::Refused(format!(
                "{name:?} is not a valid repository name (lower-case path components)"
            )));
        }
        if !ACTIONS.contains(&action) {
            return Err(IssueError::Refused(format!(
                "{action:?} is not a registry action (pull, push, delete)"
            )));
        }
        by_repo.entry(name).or_default().push(action);
    }
    Ok(Value::Array(
        by_repo
            .into_iter()
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions}))
            .collect(),
    ))
}

/// PEM certificates for the registry's `rootcertbundle`: one self-signed certificate
/// per ES256 key the broker publishes (current and previous), signed through the
/// `Signer` seam (the private key never leaves it). The registry only uses the public
/// keys in them.
pub fn rootcertbundle(keys: &KeyRing) -> Result<String, IssueError> {
    let mut out = String::new();
    for s in keys.signers() {
        if s.algorithm() != "ES256" {
            continue;
        }
        let key = SignerKey::new(s.as_ref());
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("spiffe-broker registry token key {}", s.key_id()),
        );
        params.not_before = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        params.not_after = params.not_before + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IssueError::Internal(format!("registry certificate: {e}")))?;
        out.push_str(&cert.pem());
    }
    Ok(out)
}

/// An ES256 [`Signer`] seen as an rcgen signing key (X.509 wants DER ECDSA signatures,
/// JWS wants fixed-width r‖s).
pub(crate) struct SignerKey<'a> {
    signer: &'a dyn Signer,
    point: Vec<u8>,
}

impl<'a> SignerKey<'a> {
    pub(crate) fn new(signer: &'a dyn Signer) -> Self {
        let spki = signer.public_spki_der();
        // P-256 SPKI: 26-byte prefix, then the 65-byte uncompressed point.
        let point = spki.get(26..).unwrap_or_default().to_vec();
        Self { signer, point }
    }
}

impl rcgen::PublicKeyData for SignerKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for SignerKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let fixed = self
            .signer
            .sign(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        fixed_to_der(&fixed).ok_or(rcgen::Error::RemoteKeyError)
    }
}

/// r‖s (32 bytes each) → DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn fixed_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if sig.len() != 64 {
        return None;
    }
    let int = |b: &[u8]| {
        let b = &b[b.iter().position(|x| *x != 0).unwrap_or(b.len() - 1)..];
        let mut v = vec![0x02];
        if b[0] & 0x80 != 0 {
            v.push(b.len() as u8 + 1);
            v.push(0);
        } else {
            v.push(b.len() as u8);
        }
        v.extend_from_slice(b);
        v
    };
    let (r, s) = (int(&sig[..32]), int(&sig[32..]));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_groups_actions_per_repository() {
        let v = access_claim(&[
            "repository:models/a:pull",
            "repository:models/a:push",
            "repository:models/b:pull",
        ])
        .expect("claim");
        assert_eq!(
            v,
            json!([
                {"type": "repository", "name": "models/a", "actions": ["pull", "push"]},
                {"type": "repository", "name": "models/b", "actions": ["pull"]},
            ])
        );
    }

    #[test]
    fn refuses_what_a_registry_would_misread() {
        for bad in [
            "repository:Models/A:pull",
            "repository:models/a:write",
            "repository:../a:pull",
            "repository:a//b:pull",
            "registry:catalog:*",
            "pull",
        ] {
            assert!(access_claim(&[bad]).is_err(), "{bad}");
        }
        assert!(valid_repository("library/ubuntu"));
        assert!(valid_repository("models/llama-3.1_8b"));
        assert!(!valid_repository("models/-x"));
    }

    #[test]
    fn bundle_certificates_carry_the_signing_keys() {
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = KeyRing::load_or_create(dir.path()).expect("keys");
        let pem = rootcertbundle(&keys).expect("bundle");
        use rustls::pki_types::{pem::PemObject as _, CertificateDer};
        let block = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("one block")
            .expect("pem");
        let (_, cert) = X509Certificate::from_der(&block).expect("certificate");
        assert_eq!(
            cert.public_key().raw,
            keys.current().public_spki_der().as_slice()
        );
        cert.verify_signature(None)
            .expect("self-signature verifies");
    }
}
