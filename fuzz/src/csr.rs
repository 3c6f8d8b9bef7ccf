//! PKCS#10 bytes (PEM or DER) → `issuer::x509::parse_csr`, and for an accepted CSR the
//! x509 backend's whole issuance (`X509Issuer::issue`: template, sign, re-validate).
//!
//! Invariants: no panic; a refusal is `IssueError::Refused` (FAILED_PRECONDITION, never
//! INTERNAL); an accepted CSR is one whose self-signature x509-parser also verifies, and
//! it always mints a certificate carrying exactly the CSR's SubjectPublicKeyInfo.

use std::time::Duration;

use rustls::pki_types::{pem::PemObject as _, CertificateDer, CertificateSigningRequestDer};
use spiffe_broker::domain::{LeaseId, Scope};
use spiffe_broker::issuer::x509::parse_csr;
use spiffe_broker::issuer::{Credential, IssueError, Issuer as _, LeaseTerms, Material, Order};
use spiffe_broker::policy::{Grant, Policy as _};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::fixture;

/// Runs one input.
pub fn run(data: &[u8]) {
    check(data);
}

/// Checks one CSR as the API receives it (also used by `issue_request`).
pub fn check(bytes: &[u8]) {
    match parse_csr(bytes) {
        Ok(_) => accepted(bytes),
        Err(IssueError::Refused(m)) => assert!(!m.is_empty()),
        Err(e) => panic!("a bad CSR must be refused, not {e:?}"),
    }
}

fn accepted(bytes: &[u8]) {
    let der = if bytes.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(bytes)
            .expect("accepted PEM decodes")
            .as_ref()
            .to_vec()
    } else {
        bytes.to_vec()
    };
    let (rest, csr) = X509CertificationRequest::from_der(&der).expect("accepted CSR parses");
    assert!(rest.is_empty(), "accepted CSR has trailing bytes");
    csr.verify_signature()
        .expect("accepted CSR's self-signature verifies");
    let spki = csr.certification_request_info.subject_pki.raw.to_vec();

    // The x509 backend's whole issuance for this CSR must succeed, with exactly its key.
    let fx = fixture::get();
    let profile = fx
        .policy
        .directory()
        .profile("gpu-node-cert")
        .expect("demo profile gpu-node-cert");
    let now = fixture::now_unix();
    let grant = Grant {
        profile,
        scopes: vec![Scope::parse("client-auth").expect("scope")],
        ttl: Duration::from_secs(1800),
        intent: None,
        rule: "fuzz".into(),
        policy_hash: String::new(),
        approvers: Vec::new(),
        break_glass: false,
    };
    let terms = LeaseTerms {
        lease_id: LeaseId::parse(&"0".repeat(32)).expect("lease id"),
        subject: "spiffe://example.org/gpu/provisioner".into(),
        issued_at: now,
        expires_at: now + 1800,
        cnf_x5t_s256: None,
        act: None,
        may_act: None,
    };
    let material = Material {
        csr_der: Some(bytes.to_vec()),
    };
    let minted = futures::executor::block_on(fx.x509.issue(Order {
        grant: &grant,
        terms: &terms,
        material: &material,
    }))
    .unwrap_or_else(|e| panic!("parse_csr accepted a CSR the backend cannot mint: {e}"));
    let Credential::Certificate { chain_pem, .. } = minted.credential else {
        panic!("x509 backend returned a non-certificate");
    };
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).expect("minted leaf parses");
    assert_eq!(
        cert.public_key().raw,
        spki.as_slice(),
        "minted key is not the CSR's"
    );
}
