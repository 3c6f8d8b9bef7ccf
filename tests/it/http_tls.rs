//! TLS on the HTTP listener (`[http_tls]`): a TLS client fetches the discovery document;
//! the certificate files are then replaced in place, as a rotation tool does, and new
//! handshakes get the new certificate without a restart. A half-done rotation (new
//! certificate, old key) keeps the old pair in service.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server certificate for localhost and 127.0.0.1, and its key (PEM), signed by `ca`.
fn server_pair(ca: &rcgen::Issuer<'_, KeyPair>, cn: &str) -> (String, String, Vec<u8>) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.signed_by(&key, ca).expect("cert");
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// Replaces a file the way rotation tools do: a new file renamed over the old one.
fn replace(path: &Path, pem: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// One TLS connection: GET `path`; the status, the body and the certificate served.
async fn fetch(
    addr: std::net::SocketAddr,
    ca_der: &CertificateDer<'static>,
    path: &str,
) -> (u16, String, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).expect("CA");
    // A fresh config per connection: no session resumption, every handshake full.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the HTTP listener");
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .to_vec();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    // The server may close without close_notify after `Connection: close`.
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_serves_tls_and_follows_replaced_certificate_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "http-tls test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_der = ca_params.self_signed(&ca_key).expect("CA").der().clone();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (cert_a, key_a, der_a) = server_pair(&ca, "broker-http-a");
    let (cert_b, key_b, der_b) = server_pair(&ca, "broker-http-b");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, &cert_a).expect("cert");
    std::fs::write(&key_path, &key_a).expect("key");

    let section = format!(
        "\n[http_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let h = common::start_with(Some(Box::new(move |text| text + &section))).await;
    let addr = h.env.http_addr;

    let (status, body, served) = fetch(addr, &ca_der, "/.well-known/openid-configuration").await;
    assert_eq!(status, 200, "{body}");
    let disc: serde_json::Value = serde_json::from_str(&body).expect("discovery JSON");
    assert_eq!(disc["issuer"], h.env.config.issuer_url.as_str());
    assert_eq!(served, der_a, "the configured certificate is served");
    let (status, _, _) = fetch(addr, &ca_der, "/.well-known/jwks.json").await;
    assert_eq!(status, 200);

    // Half a rotation: the new certificate is there, its key not yet. The old pair stays.
    replace(&cert_path, &cert_b);
    tokio::time::sleep(spiffe_broker::server::https::RECHECK + Duration::from_millis(300)).await;
    let (status, _, served) = fetch(addr, &ca_der, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(served, der_a, "a mismatched pair is not served");

    // The key follows: the next handshakes get the new certificate, no restart.
    replace(&key_path, &key_b);
    let t = Instant::now();
    loop {
        let (status, _, served) = fetch(addr, &ca_der, "/.well-known/openid-configuration").await;
        assert_eq!(status, 200);
        if served == der_b {
            break;
        }
        assert_eq!(served, der_a, "only the old or the new certificate");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the replaced certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "new certificate served {:?} after the key was replaced",
        t.elapsed()
    );
    drop(h);
}

/// The relying-party library against a broker whose HTTP listener is TLS with a private CA
/// (`RpConfig::ca_file`): discovery, JWKS and the feed are fetched over https, and a token
/// then verifies up to its certificate binding. Without the CA (the platform's trust store
/// only) nothing is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relying_party_follows_a_broker_over_https() {
    use common::{gpu_request, token_of, DEPLOY_AGENT};
    use spiffe_broker::relying_party::{RelyingParty, RpConfig, RpError};

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "relying-party test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA").pem();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (cert, key, _) = server_pair(&ca, "broker-http");
    let (cert_path, key_path, ca_path) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    std::fs::write(&cert_path, &cert).expect("cert");
    std::fs::write(&key_path, &key).expect("key");
    std::fs::write(&ca_path, &ca_pem).expect("CA file");
    let section = format!(
        "\n[http_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let h = common::start_with(Some(Box::new(move |text: String| {
        assert!(text.contains("issuer_url = \"http://"), "{text}");
        text.replacen("issuer_url = \"http://", "issuer_url = \"https://", 1) + &section
    })))
    .await;
    let issuer = h.env.config.issuer_url.clone();
    assert!(issuer.starts_with("https://"), "{issuer}");
    let feed_key =
        std::fs::read_to_string(h.env.state_dir.join("keys/revocations.vkey")).expect("feed key");

    // The platform's trust store does not know the private CA.
    let stranger =
        RelyingParty::new(RpConfig::new(&issuer, "gpu-scheduler", &feed_key).expect("config"));
    match stranger.refresh_keys().await {
        Err(RpError::Broker(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("fetched without trusting the CA: {other:?}"),
    }

    let mut cfg = RpConfig::new(&issuer, "gpu-scheduler", &feed_key).expect("config");
    cfg.ca_file = Some(ca_path);
    let rp = RelyingParty::new(cfg);
    rp.refresh_keys()
        .await
        .expect("discovery and JWKS over https");
    rp.sync_revocations().await.expect("the feed over https");

    let mut broker = h.broker_as(DEPLOY_AGENT).await;
    let resp = broker
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner();
    // Keys, issuer, audience, times and freshness pass; only the `cnf` binding to the
    // caller's certificate (not presented here) is left.
    assert_eq!(
        rp.verify(&token_of(&resp.credential), None).map(|_| ()),
        Err(RpError::CnfMismatch)
    );
    drop(h);
}
