//! X.509-SVID validation by the SPIFFE X.509-SVID specification.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{workload_id, AuthMethod, AuthnError, TrustSource};
use crate::clock::unix_seconds;

/// Longest chain accepted (leaf + intermediates).
pub const MAX_CHAIN_LEN: usize = 8;

/// Which side of a TLS connection presented the SVID (selects the extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidRole {
    /// A client in mTLS (clientAuth).
    Client,
    /// A server (serverAuth).
    Server,
}

/// Validates a presented chain (leaf first) as an X.509-SVID and returns its SPIFFE ID.
///
/// Checks: exactly one URI SAN holding a SPIFFE ID with a path; leaf is not a CA; key
/// usage present with digitalSignature and without keyCertSign/cRLSign; validity window
/// at `now`; chain to the X.509 bundle of the ID's own trust domain.
pub fn validate_x509_svid(
    chain: &[CertificateDer<'_>],
    trust: &dyn TrustSource,
    now: SystemTime,
    role: SvidRole,
) -> Result<SpiffeId, AuthnError> {
    let fail = |r: &str| AuthnError::new(r.to_owned()).via(AuthMethod::X509Svid);
    let leaf_der = chain
        .first()
        .ok_or_else(|| fail("empty certificate chain"))?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(fail("certificate chain too long"));
    }
    let (rest, leaf) = X509Certificate::from_der(leaf_der.as_ref())
        .map_err(|_| fail("malformed leaf certificate"))?;
    if !rest.is_empty() {
        return Err(fail("trailing data after leaf certificate"));
    }

    let san = leaf
        .subject_alternative_name()
        .map_err(|_| fail("malformed subjectAltName"))?
        .ok_or_else(|| fail("leaf has no subjectAltName"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => return Err(fail("leaf has no URI SAN")),
        _ => return Err(fail("leaf has more than one URI SAN")),
    };
    let id = workload_id(uri).map_err(|e| e.via(AuthMethod::X509Svid))?;
    let fail = |r: &str| fail(r).claimed(id.to_string());

    if let Some(bc) = leaf
        .basic_constraints()
        .map_err(|_| fail("malformed basicConstraints"))?
    {
        if bc.value.ca {
            return Err(fail("leaf is a CA certificate"));
        }
    }
    let ku = leaf
        .key_usage()
        .map_err(|_| fail("malformed keyUsage"))?
        .ok_or_else(|| fail("leaf has no keyUsage"))?;
    if !ku.value.digital_signature() {
        return Err(fail("leaf keyUsage lacks digitalSignature"));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(fail("leaf keyUsage has keyCertSign or cRLSign"));
    }

    let t = unix_seconds(now);
    let validity = leaf.validity();
    if t < validity.not_before.timestamp() {
        return Err(fail("leaf is not yet valid"));
    }
    if t > validity.not_after.timestamp() {
        return Err(fail("leaf has expired"));
    }

    let roots = trust
        .x509_authorities(id.trust_domain_name())
        .ok_or_else(|| fail("no trust bundle for the SVID's trust domain"))?;
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    if anchors.is_empty() {
        return Err(fail("trust bundle is empty"));
    }
    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|_| fail("malformed leaf certificate"))?;
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| fail("clock before epoch"))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
        match role {
            SvidRole::Client => webpki::KeyUsage::client_auth(),
            SvidRole::Server => webpki::KeyUsage::server_auth(),
        },
        None,
        None,
    )
    .map_err(|e| {
        fail(&format!(
            "chain does not verify to the trust domain's bundle: {e}"
        ))
    })?;
    Ok(id)
}
