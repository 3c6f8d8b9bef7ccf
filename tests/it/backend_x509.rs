//! The short-lived X.509 client-certificate backend (`kind = "x509"`, demo profile
//! `gpu-node-cert`) end to end: a workload keeps its private key, sends a CSR to a running
//! dev broker over SPIFFE mTLS, and uses the chain it gets back against a real TLS relying
//! party (rustls) and `openssl verify`. The broker takes only the CSR's public key: the
//! names, SANs and extensions come from the profile and the caller's SPIFFE ID, and the
//! certificate chains to the broker's own client-certificate root, never to the SPIFFE CA.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde_json::Value;
use spiffe_broker::clock::{Clock as _, SystemClock};
use spiffe_broker::proto::v1 as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;
use tonic::Code;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

type BrokerClient = pb::credential_broker_client::CredentialBrokerClient<Channel>;

const PROFILE: &str = "gpu-node-cert";
const TEN_MINUTES: i64 = 600;

// ---------------------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------------------

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

/// A CSR for `key` asking for everything the broker must not grant: another name (CN
/// "admin", O "system:masters"), a DNS SAN and someone else's SPIFFE ID, a CA
/// certificate with keyCertSign, server auth. Only its public key may be used.
fn greedy_csr(key: &KeyPair) -> rcgen::CertificateSigningRequest {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "admin");
    dn.push(DnType::OrganizationName, "system:masters");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![
        SanType::DnsName("evil.example".try_into().expect("ia5")),
        SanType::URI(ROOT.try_into().expect("ia5")),
    ];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serialize_request(key).expect("CSR")
}

/// A plain CSR for `key` (subject only).
fn plain_csr_der(key: &KeyPair) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "node");
    p.serialize_request(key).expect("CSR").der().to_vec()
}

fn cert_request(csr: Vec<u8>, ttl_secs: i64) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: PROFILE.into(),
        scopes: vec!["client-auth".into()],
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        csr,
        ..Default::default()
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    pem_certs(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("X.509 certificate");
    assert!(rest.is_empty(), "trailing bytes after the certificate");
    cert
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A certificate the provisioner obtained for its own key.
struct Issued {
    key: KeyPair,
    csr_der: Vec<u8>,
    resp: pb::IssueCredentialResponse,
    chain_pem: String,
    serial: String,
    /// Leaf, intermediate, root.
    chain: Vec<CertificateDer<'static>>,
}

impl Issued {
    fn credential(&self) -> &pb::Credential {
        self.resp.credential.as_ref().expect("credential")
    }

    fn lease(&self) -> &pb::Lease {
        self.resp.lease.as_ref().expect("lease")
    }
}

fn certificate_of(resp: &pb::IssueCredentialResponse) -> (String, String) {
    match resp.credential.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Certificate(c)) => (c.chain_pem.clone(), c.serial.clone()),
        other => panic!("expected a certificate chain, got {other:?}"),
    }
}

/// PROVISIONER asks for `gpu-node-cert` for `ttl_secs` with the greedy CSR (as PEM).
async fn issue_as_provisioner(h: &Harness, ttl_secs: i64) -> Issued {
    let key = p256();
    let csr = greedy_csr(&key);
    let csr_der = csr.der().to_vec();
    let csr_pem = csr.pem().expect("CSR PEM");
    let mut c = h.broker_as(PROVISIONER).await;
    let resp = c
        .issue_credential(cert_request(csr_pem.into_bytes(), ttl_secs))
        .await
        .expect("gpu-node-cert issued to the provisioner")
        .into_inner();
    let (chain_pem, serial) = certificate_of(&resp);
    let chain = pem_certs(&chain_pem);
    Issued {
        key,
        csr_der,
        resp,
        chain_pem,
        serial,
        chain,
    }
}

/// The last audit entry, which a refusal must have written: a deny by `caller` that
/// names no lease and no credential.
fn assert_last_entry_is_refusal(h: &Harness, caller: &str, case: &str) -> Value {
    let last = h.audit_bodies().pop().expect("an audit entry");
    assert_eq!(last["kind"], "deny", "[{case}] {last}");
    assert_eq!(last["decision"], "deny", "[{case}] {last}");
    assert_eq!(last["caller"], caller, "[{case}] {last}");
    assert!(
        last.get("lease_id").is_none() && last.get("credential_sha256").is_none(),
        "[{case}] a refusal must not reference a lease or credential: {last}"
    );
    last
}

/// Sends `req` and asserts it is refused with `code` and a message containing every
/// `needles` (case-insensitive), that no lease was created and that no issue entry was
/// written.
async fn assert_refused(
    h: &Harness,
    client: &mut BrokerClient,
    caller: &str,
    req: pb::IssueCredentialRequest,
    case: &str,
    code: Code,
    needles: &[&str],
) {
    let leases = h.lease_count();
    let issues = |h: &Harness| {
        h.audit_bodies()
            .iter()
            .filter(|b| b["kind"] == "issue")
            .count()
    };
    let issues_before = issues(h);
    let status = match client.issue_credential(req).await {
        Ok(r) => panic!("[{case}] was issued: {:?}", r.into_inner().lease),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "[{case}] {status:?}");
    let msg = status.message().to_lowercase();
    for n in needles {
        assert!(
            msg.contains(&n.to_lowercase()),
            "[{case}] message {:?} should mention {n:?}",
            status.message()
        );
    }
    assert_eq!(h.lease_count(), leases, "[{case}] a lease was created");
    assert_eq!(
        issues(h),
        issues_before,
        "[{case}] an issue entry was written"
    );
    assert_last_entry_is_refusal(h, caller, case);
}

// ---------------------------------------------------------------------------------------
// 1. The certificate: the CSR's key, the broker's names
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn issues_a_client_certificate_for_the_csr_key_only() {
    let h = start().await;
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let state = &h.env.state_dir;

    // The chain: exactly three certificates, leaf then x509-issuing-ca.pem (intermediate,
    // root); nothing else in the PEM (no private key, certainly).
    assert_eq!(
        issued.chain_pem.matches("-----BEGIN").count(),
        3,
        "{}",
        issued.chain_pem
    );
    assert_eq!(
        issued
            .chain_pem
            .matches("-----BEGIN CERTIFICATE-----")
            .count(),
        3
    );
    assert!(!issued.chain_pem.contains("PRIVATE KEY"));
    assert_eq!(issued.chain.len(), 3);
    let ca_chain = read_certs(&state.join("x509-issuing-ca.pem"));
    let root = read_certs(&state.join("x509-root.pem"));
    assert_eq!(ca_chain.len(), 2, "x509-issuing-ca.pem: intermediate, root");
    assert_eq!(root.len(), 1);
    assert_eq!(issued.chain[1..], ca_chain[..]);
    assert_eq!(issued.chain[2], root[0]);
    let leaf = parse(&issued.chain[0]);
    let inter = parse(&issued.chain[1]);
    let root_cert = parse(&issued.chain[2]);
    assert!(inter.is_ca() && root_cert.is_ca());

    // Serial = backend handle of the credential and of the lease = the leaf's serial.
    let cred = issued.credential();
    let lease = issued.lease();
    assert_eq!(cred.backend, "x509");
    assert_eq!(lease.backend, "x509");
    assert_eq!(issued.serial.len(), 32, "16-byte serial in hex");
    assert_eq!(issued.serial, cred.backend_handle);
    assert_eq!(issued.serial, lease.backend_handle);
    assert_eq!(issued.serial, hex::encode(leaf.raw_serial()));
    assert_eq!(lease.profile, PROFILE);
    assert_eq!(lease.spiffe_id, PROVISIONER);
    assert_eq!(lease.scopes, vec!["client-auth".to_string()]);
    assert_eq!(lease.state, pb::LeaseState::Active as i32);

    // The public key is the CSR's (and the caller's key pair's).
    let (_, csr) = X509CertificationRequest::from_der(&issued.csr_der).expect("CSR parses");
    assert_eq!(
        leaf.public_key().raw,
        csr.certification_request_info.subject_pki.raw
    );
    assert_eq!(
        leaf.public_key().raw,
        issued.key.subject_public_key_info().as_slice()
    );

    // SAN: exactly one URI, the caller's SPIFFE ID; no DNS name, not the ID in the CSR.
    let san = leaf
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(PROVISIONER)],
        "SAN must be the caller's SPIFFE ID only"
    );

    // Subject from the profile: CN = "{name}" = last path segment, O = gpu-provisioners.
    let cns: Vec<&str> = leaf
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().expect("CN string"))
        .collect();
    let orgs: Vec<&str> = leaf
        .subject()
        .iter_organization()
        .map(|a| a.as_str().expect("O string"))
        .collect();
    assert_eq!(cns, vec!["provisioner"]);
    assert_eq!(orgs, vec!["gpu-provisioners"]);
    assert_eq!(
        leaf.subject().iter_attributes().count(),
        2,
        "subject is CN and O only: {}",
        leaf.subject()
    );
    let subject = leaf.subject().to_string();
    assert!(
        !subject.contains("admin") && !subject.contains("system:masters"),
        "{subject}"
    );

    // Not a CA: basicConstraints present with CA:FALSE, digitalSignature only.
    let bc = leaf
        .basic_constraints()
        .expect("basicConstraints parses")
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "CA:FALSE");
    assert!(!leaf.is_ca());
    let ku = leaf
        .key_usage()
        .expect("keyUsage parses")
        .expect("keyUsage present");
    assert!(ku.value.digital_signature());
    assert!(
        !ku.value.key_cert_sign() && !ku.value.crl_sign(),
        "{}",
        ku.value
    );

    // Extended key usage: clientAuth and nothing else.
    let eku = leaf
        .extended_key_usage()
        .expect("EKU parses")
        .expect("EKU present")
        .value;
    assert!(eku.client_auth);
    assert!(
        !eku.server_auth
            && !eku.any
            && !eku.code_signing
            && !eku.email_protection
            && !eku.time_stamping
            && !eku.ocsp_signing
            && eku.other.is_empty(),
        "clientAuth only: {eku:?}"
    );

    // Validity: from the broker's (manual) clock, exactly the asked 10 minutes, equal to
    // the lease.
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert_eq!(not_after - not_before, TEN_MINUTES);
    assert_eq!(not_before, h.clock.unix_seconds());
    assert_eq!(
        lease.issued_at.as_ref().map(|t| t.seconds),
        Some(not_before)
    );
    assert_eq!(
        lease.expires_at.as_ref().map(|t| t.seconds),
        Some(not_after)
    );
    assert_eq!(cred.expires_at.as_ref().map(|t| t.seconds), Some(not_after));

    // Signed by the broker's issuing CA under its own root — not by the SPIFFE CA.
    let spiffe_ca_der = h.env.ca.ca_der().clone();
    let bundle = read_certs(&state.join("bundle.pem"));
    assert!(
        bundle.contains(&spiffe_ca_der),
        "bundle.pem is the SPIFFE CA"
    );
    assert!(!issued.chain.contains(&spiffe_ca_der));
    let spiffe_ca = parse(&spiffe_ca_der);
    assert!(
        leaf.verify_signature(Some(spiffe_ca.public_key())).is_err(),
        "the leaf must not verify under the SPIFFE CA"
    );
    assert_ne!(leaf.issuer(), spiffe_ca.subject());
    assert_eq!(leaf.issuer(), inter.subject());
    leaf.verify_signature(Some(inter.public_key()))
        .expect("leaf signed by the issuing CA");
    inter
        .verify_signature(Some(root_cert.public_key()))
        .expect("issuing CA signed by the root");
    root_cert
        .verify_signature(None)
        .expect("root is self-signed");
}

// ---------------------------------------------------------------------------------------
// 2. A real TLS relying party trusting x509-root.pem
// ---------------------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A TLS server for "localhost" that requires a client certificate chaining to `root`.
/// Returns its config and its (self-signed) certificate for clients to trust.
fn relying_party(root: CertificateDer<'static>) -> (Arc<ServerConfig>, CertificateDer<'static>) {
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("server certificate");
    let mut roots = RootCertStore::empty();
    roots.add(root).expect("client-certificate root");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("client verifier");
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert.der().clone()], pkcs8(&server.signing_key))
        .expect("server config");
    (Arc::new(cfg), server.cert.der().clone())
}

/// A TLS client trusting `server_cert` and presenting `chain` with `key`.
fn tls_client(
    server_cert: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(server_cert.clone()).expect("server cert");
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, pkcs8(key))
        .expect("client config");
    Arc::new(cfg)
}

/// One TLS connection over an in-memory pipe, with a ping/pong on top. Returns what the
/// server saw (the client's certificates, or its error) and the client's outcome.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (
    Result<Vec<CertificateDer<'static>>, String>,
    Result<(), String>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let server_side = async move {
        let mut tls = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"ping" {
            return Err(format!("server read {buf:?}"));
        }
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    let client_side = async move {
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = connector
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"pong" {
            return Err(format!("client read {buf:?}"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("the handshake finishes (no hang)")
}

#[tokio::test]
async fn a_tls_relying_party_accepts_the_certificate() {
    let h = start().await;
    // The leaf's validity starts at the broker's ManualClock, which starts at the real
    // time of its creation; rustls checks against the real clock, so it is already valid.
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let leaf = parse(&issued.chain[0]);
    let real_now = spiffe_broker::clock::unix_seconds(SystemClock.now());
    assert!(
        leaf.validity().not_before.timestamp() <= real_now
            && real_now < leaf.validity().not_after.timestamp(),
        "the certificate is valid at real time {real_now}"
    );

    let root = read_certs(&h.env.state_dir.join("x509-root.pem"))
        .pop()
        .expect("root");
    let (server, server_cert) = relying_party(root);

    // Leaf + intermediate, with the key that never left the client: accepted, and the
    // server sees the broker-issued leaf.
    let chain = issued.chain[..2].to_vec();
    let (seen, client) =
        handshake(server.clone(), tls_client(&server_cert, chain, &issued.key)).await;
    let seen = seen.expect("the relying party accepts the broker's certificate");
    client.expect("the client completes the exchange");
    assert_eq!(seen.first(), Some(&issued.chain[0]), "server saw the leaf");

    // The same key in a self-signed certificate claiming the same names: refused.
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, "gpu-provisioners");
    p.distinguished_name.push(DnType::CommonName, "provisioner");
    p.subject_alt_names = vec![SanType::URI(PROVISIONER.try_into().expect("ia5"))];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let self_signed = p.self_signed(&issued.key).expect("self-signed");
    let (seen, _) = handshake(
        server.clone(),
        tls_client(&server_cert, vec![self_signed.der().clone()], &issued.key),
    )
    .await;
    let err = seen.expect_err("a self-signed certificate is refused");
    assert!(err.contains("invalid peer certificate"), "{err}");

    // The leaf alone (without the intermediate the server does not hold): refused.
    let (seen, _) = handshake(
        server.clone(),
        tls_client(&server_cert, vec![issued.chain[0].clone()], &issued.key),
    )
    .await;
    let err = seen.expect_err("a chain without the intermediate is refused");
    assert!(err.contains("invalid peer certificate"), "{err}");

    // An X.509-SVID of the same workload is no client certificate for this PKI.
    let now = h.clock.now();
    let svid_key = p256();
    let svid = h
        .env
        .ca
        .sign(
            &spiffe_broker::workload::ca::svid_params(
                PROVISIONER,
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
            .expect("svid params"),
            &svid_key,
        )
        .expect("dev CA signs");
    let (seen, _) = handshake(server, tls_client(&server_cert, vec![svid], &svid_key)).await;
    let err = seen.expect_err("an SVID is not trusted by the client-certificate PKI");
    assert!(err.contains("invalid peer certificate"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 3. openssl verify
// ---------------------------------------------------------------------------------------

fn openssl(args: &[&std::ffi::OsStr]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("runs openssl")
}

fn write_pem(dir: &Path, name: &str, der: &CertificateDer<'_>) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        wrap64(&base64_std(der.as_ref()))
    );
    std::fs::write(&path, text).expect("write PEM");
    path
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn wrap64(s: &str) -> String {
    s.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn openssl_verifies_the_chain_against_the_x509_root_only() {
    let h = start().await;
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = write_pem(dir.path(), "leaf.pem", &issued.chain[0]);
    let inter = write_pem(dir.path(), "intermediate.pem", &issued.chain[1]);
    let root = h.env.state_dir.join("x509-root.pem");
    let bundle = h.env.state_dir.join("bundle.pem");

    let ok = openssl(&[
        "verify".as_ref(),
        "-CAfile".as_ref(),
        root.as_os_str(),
        "-untrusted".as_ref(),
        inter.as_os_str(),
        leaf.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "openssl verify failed: {stdout} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.trim_end().ends_with(": OK"), "{stdout}");

    // As a TLS client certificate: fine; as a server certificate: not (clientAuth only).
    let client = openssl(&[
        "verify".as_ref(),
        "-purpose".as_ref(),
        "sslclient".as_ref(),
        "-CAfile".as_ref(),
        root.as_os_str(),
        "-untrusted".as_ref(),
        inter.as_os_str(),
        leaf.as_os_str(),
    ]);
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let server = openssl(&[
        "verify".as_ref(),
        "-purpose".as_ref(),
        "sslserver".as_ref(),
        "-CAfile".as_ref(),
        root.as_os_str(),
        "-untrusted".as_ref(),
        inter.as_os_str(),
        leaf.as_os_str(),
    ]);
    assert!(
        !server.status.success(),
        "a clientAuth-only certificate must not verify for sslserver"
    );

    // Against the SPIFFE trust bundle: not trusted, even given the whole issuing chain.
    let ca_chain = h.env.state_dir.join("x509-issuing-ca.pem");
    for untrusted in [&inter, &ca_chain] {
        let spiffe = openssl(&[
            "verify".as_ref(),
            "-CAfile".as_ref(),
            bundle.as_os_str(),
            "-untrusted".as_ref(),
            untrusted.as_os_str(),
            leaf.as_os_str(),
        ]);
        assert!(
            !spiffe.status.success(),
            "the certificate must not verify under the SPIFFE bundle: {}",
            String::from_utf8_lossy(&spiffe.stdout)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. Refusals
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_is_issued() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let key = p256();
    let good = plain_csr_der(&key);

    // No CSR at all.
    assert_refused(
        &h,
        &mut prov,
        PROVISIONER,
        cert_request(Vec::new(), TEN_MINUTES),
        "no CSR",
        Code::FailedPrecondition,
        &["CSR"],
    )
    .await;

    // A CSR whose signature does not verify: flip a bit in the last byte of the DER, which
    // is inside the signature BIT STRING (the end of the ECDSA `s`).
    let (_, parsed) = X509CertificationRequest::from_der(&good).expect("CSR parses");
    let sig = parsed.signature_value.data.to_vec();
    assert!(good.ends_with(&sig), "the signature ends the DER");
    let mut broken = good.clone();
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let (_, reparsed) = X509CertificationRequest::from_der(&broken)
        .expect("still a well-formed CSR: only the signature value changed");
    assert_ne!(reparsed.signature_value.data.as_ref(), sig.as_slice());
    assert_refused(
        &h,
        &mut prov,
        PROVISIONER,
        cert_request(broken.clone(), TEN_MINUTES),
        "broken CSR signature (DER)",
        Code::FailedPrecondition,
        &["proof of possession"],
    )
    .await;
    // The same as PEM.
    let broken_pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        wrap64(&base64_std(&broken))
    );
    assert_refused(
        &h,
        &mut prov,
        PROVISIONER,
        cert_request(broken_pem.into_bytes(), TEN_MINUTES),
        "broken CSR signature (PEM)",
        Code::FailedPrecondition,
        &["proof of possession"],
    )
    .await;

    // Garbage: random-looking bytes, a DER prefix that is not a CSR, PEM that is not a CSR.
    for (case, bytes) in [
        (
            "garbage bytes",
            b"\x00\xffnot a certificate request\x13\x37".to_vec(),
        ),
        ("truncated DER", good[..good.len() / 2].to_vec()),
        (
            "PEM of something else",
            b"-----BEGIN GARBAGE-----\nAAAA\n-----END GARBAGE-----\n".to_vec(),
        ),
    ] {
        assert_refused(
            &h,
            &mut prov,
            PROVISIONER,
            cert_request(bytes, TEN_MINUTES),
            case,
            Code::FailedPrecondition,
            &["csr"],
        )
        .await;
    }

    // A genuine, well-signed CSR over 16 KiB (thousands of SANs): refused for its size.
    let mut big = CertificateParams::default();
    big.distinguished_name.push(DnType::CommonName, "node");
    big.subject_alt_names = (0..600)
        .map(|i| {
            SanType::DnsName(
                format!("node-{i:04}.gpu-cluster.example.org")
                    .try_into()
                    .expect("ia5"),
            )
        })
        .collect();
    let big = big.serialize_request(&key).expect("big CSR").der().to_vec();
    assert!(
        big.len() > 16 * 1024 && big.len() < 60 * 1024,
        "{} bytes: over the CSR limit, under the message limit",
        big.len()
    );
    assert_refused(
        &h,
        &mut prov,
        PROVISIONER,
        cert_request(big, TEN_MINUTES),
        "CSR over 16 KiB",
        Code::FailedPrecondition,
        &["csr", "16384"],
    )
    .await;

    // Over the profile's max TTL (1h).
    assert_refused(
        &h,
        &mut prov,
        PROVISIONER,
        cert_request(good.clone(), 2 * 3600),
        "ttl 2h",
        Code::InvalidArgument,
        &["ttl"],
    )
    .await;

    // A model runtime may not have a GPU node certificate, even with a good CSR.
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    assert_refused(
        &h,
        &mut runtime,
        MODEL_RUNTIME,
        cert_request(good.clone(), TEN_MINUTES),
        "model runtime",
        Code::PermissionDenied,
        &[],
    )
    .await;

    assert_eq!(h.lease_count(), 0);

    // Control: the same good CSR (DER this time) from the provisioner is issued.
    let ok = prov
        .issue_credential(cert_request(good, TEN_MINUTES))
        .await
        .expect("the control request is issued")
        .into_inner();
    let (chain_pem, _) = certificate_of(&ok);
    let leaf = pem_certs(&chain_pem).remove(0);
    assert_eq!(
        parse(&leaf).public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(h.lease_count(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. No renewal: a new certificate needs a new CSR
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn renewing_a_certificate_lease_is_refused() {
    let h = start().await;
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let lease = issued.lease().clone();
    let mut c = h.broker_as(PROVISIONER).await;
    h.clock.advance(Duration::from_secs(60));
    let err = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: Some(prost_types::Duration {
                seconds: TEN_MINUTES,
                nanos: 0,
            }),
        })
        .await
        .expect_err("certificates are not renewed");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let msg = err.message().to_lowercase();
    assert!(
        msg.contains("not renewed") && msg.contains("request a new"),
        "{}",
        err.message()
    );
    assert_last_entry_is_refusal(&h, PROVISIONER, "renew");

    // The lease is untouched: same expiry, no renewal, no renew entry.
    let bodies = h.audit_bodies();
    assert!(
        !bodies
            .iter()
            .any(|b| b["kind"] == "renew" && b["decision"] == "allow"),
        "no renewal recorded"
    );
    let mut admin = h.admin_as(ROOT).await;
    let now = admin
        .list_leases(pb::ListLeasesRequest {
            lease_id: lease.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list leases")
        .into_inner()
        .leases;
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].renewals, 0);
    assert_eq!(now[0].expires_at, lease.expires_at);
    assert_eq!(now[0].credential_sha256, lease.credential_sha256);
    assert_eq!(now[0].state, pb::LeaseState::Active as i32);
}

// ---------------------------------------------------------------------------------------
// 6. The ledger fingerprints the chain it handed out
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_issue_entry_fingerprints_the_returned_chain() {
    let h = start().await;
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let fingerprint = sha256_hex(issued.chain_pem.as_bytes());
    let lease = issued.lease();
    assert_eq!(lease.credential_sha256, fingerprint);
    let entry = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "issue" && b["lease_id"] == lease.id.as_str())
        .expect("issue entry of the lease");
    assert_eq!(entry["decision"], "allow");
    assert_eq!(entry["caller"], PROVISIONER);
    assert_eq!(entry["rule"], "gpu-provisioning/node-cert");
    assert_eq!(entry["credential_sha256"], fingerprint.as_str());
    assert_eq!(
        entry["expires_at"],
        lease.expires_at.as_ref().map(|t| t.seconds).expect("exp")
    );
}

// ---------------------------------------------------------------------------------------
// The CSR's signature algorithm must not change the certified key
// ---------------------------------------------------------------------------------------

/// A CSR made by `openssl req` for `key_pem` with digest `digest`.
fn openssl_csr(dir: &Path, name: &str, key_pem: &str, digest: &str) -> Vec<u8> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    std::fs::write(&key, key_pem).expect("write key");
    let out = openssl(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-key".as_ref(),
        key.as_os_str(),
        format!("-{digest}").as_ref(),
        "-subj".as_ref(),
        "/CN=node".as_ref(),
        "-outform".as_ref(),
        "DER".as_ref(),
        "-out".as_ref(),
        csr.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&csr).expect("read CSR")
}

/// ECDSA CSRs are legitimately signed with any SHA-2 hash, independent of the curve
/// (RFC 5758): a P-256 key may sign its CSR with ecdsa-with-SHA384, a P-384 key with
/// ecdsa-with-SHA256. The certificate must carry the CSR's SubjectPublicKeyInfo as is (or
/// the request be refused with FAILED_PRECONDITION and no lease); never a certificate
/// whose key is not the caller's.
#[tokio::test]
async fn the_csr_signature_hash_does_not_change_the_certified_key() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("p256-sha256", &rcgen::PKCS_ECDSA_P256_SHA256, "sha256"),
        ("p256-sha384", &rcgen::PKCS_ECDSA_P256_SHA256, "sha384"),
        ("p384-sha384", &rcgen::PKCS_ECDSA_P384_SHA384, "sha384"),
        ("p384-sha256", &rcgen::PKCS_ECDSA_P384_SHA384, "sha256"),
    ];
    let mut wrong = Vec::new();
    for (name, alg, digest) in cases {
        let key = KeyPair::generate_for(alg).expect("key");
        let spki = key.subject_public_key_info();
        let csr = openssl_csr(dir.path(), name, &key.serialize_pem(), digest);
        let (_, parsed) = X509CertificationRequest::from_der(&csr).expect("CSR parses");
        assert_eq!(
            parsed.certification_request_info.subject_pki.raw,
            spki.as_slice(),
            "[{name}] openssl put the key in the CSR"
        );
        let leases = h.lease_count();
        match prov.issue_credential(cert_request(csr, TEN_MINUTES)).await {
            Ok(resp) => {
                let (chain_pem, _) = certificate_of(&resp.into_inner());
                let leaf_der = pem_certs(&chain_pem).remove(0);
                let leaf = parse(&leaf_der);
                if leaf.public_key().raw != spki.as_slice() {
                    wrong.push(format!(
                        "[{name}] issued a certificate for another key:\n  leaf SPKI {}\n  CSR  SPKI {}",
                        hex::encode(leaf.public_key().raw),
                        hex::encode(&spki)
                    ));
                }
            }
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "[{name}] {s:?}");
                assert_eq!(
                    h.lease_count(),
                    leases,
                    "[{name}] refused but a lease exists"
                );
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A revoked certificate reaches TLS relying parties by serial: the revocation feed
/// event of an x509 lease names the certificate's serial (and the chain still verifies).
#[tokio::test]
async fn a_revoked_certificate_is_named_by_serial_in_the_feed() {
    let h = start().await;
    let issued = issue_as_provisioner(&h, TEN_MINUTES).await;
    let lease_id = issued.lease().id.clone();
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(lease_id.clone())),
            reason: "node decommissioned".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
    let (status, body) = h.http_get("/revocations?since=0").await;
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).expect("feed JSON");
    let event = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["lease_id"] == lease_id.as_str())
        .expect("the lease's revocation event");
    assert_eq!(event["certificate_serial"], issued.serial.as_str());
    // A JWT lease's event carries no serial.
    let token = h
        .broker_as(PROVISIONER)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect("token")
        .into_inner();
    let jwt_lease = token.lease.expect("lease").id;
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(jwt_lease.clone())),
            reason: "rotation".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
    let (_, body) = h.http_get("/revocations?since=0").await;
    let page: Value = serde_json::from_str(&body).expect("feed JSON");
    let event = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["lease_id"] == jwt_lease.as_str())
        .expect("the JWT lease's event");
    assert!(event.get("certificate_serial").is_none(), "{event}");
}
