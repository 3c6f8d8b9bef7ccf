//! TLS session resumption on the gRPC listener and in the client library: a workload that
//! reconnects resumes its session (no certificate exchange, no signatures), only with the
//! same leaf, and a resumed session is re-validated on every request like a fresh one.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::HandshakeKind;
use spiffe::SpiffeId;
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::dev::BROKER_ID;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::Code;

/// A TLS connection as `client::connect` makes it; returns how the handshake went (the
/// broker's HTTP/2 SETTINGS read first, so its session ticket has arrived too).
async fn handshake(h: &Harness, identity: &ClientIdentity) -> HandshakeKind {
    let broker = SpiffeId::new(BROKER_ID).expect("broker id");
    let addr = h.env.grpc_addr.to_string();
    let (cfg, name) = client::client_config(&addr, &broker, identity).expect("client TLS config");
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf))
        .await
        .expect("the broker answers in time")
        .expect("SETTINGS");
    tls.get_ref().1.handshake_kind().expect("handshake done")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_resumes_only_with_the_same_leaf() {
    let h = start().await;
    let (agent, _) = minted(&h, DEPLOY_AGENT);
    assert_eq!(handshake(&h, &agent).await, HandshakeKind::Full);
    assert_eq!(handshake(&h, &agent).await, HandshakeKind::Resumed);
    // Another leaf of the same identity (a rotated SVID): a full handshake.
    let (rotated, _) = minted(&h, DEPLOY_AGENT);
    assert_eq!(handshake(&h, &rotated).await, HandshakeKind::Full);
    // A client whose trust changed (another CA added, or one retired) does not resume a
    // session its old bundle vouched for.
    let bundle = vec![h.env.ca.ca_der().clone()];
    let anonymous = ClientIdentity::Anonymous {
        bundle: bundle.clone(),
    };
    assert_eq!(handshake(&h, &anonymous).await, HandshakeKind::Full);
    assert_eq!(handshake(&h, &anonymous).await, HandshakeKind::Resumed);
    let other_ca = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(pki::ca("another CA").2.as_bytes())
            .expect("PEM")
    };
    let changed = ClientIdentity::Anonymous {
        bundle: [bundle, vec![other_ca]].concat(),
    };
    assert_eq!(handshake(&h, &changed).await, HandshakeKind::Full);
    // And the library's channels resume too, and work.
    let (full_before, resumed_before) = spiffe_broker::server::tls::handshakes();
    for _ in 0..3 {
        let ch = client::connect(&h.env.grpc_addr.to_string(), BROKER_ID, &agent)
            .await
            .expect("connect");
        pb_issue(ch).await.expect("issued over a resumed session");
    }
    let (full_after, resumed_after) = spiffe_broker::server::tls::handshakes();
    assert!(
        resumed_after >= resumed_before + 3,
        "resumed {resumed_before} → {resumed_after}"
    );
    let _ = (full_before, full_after);
}

async fn pb_issue(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    spiffe_broker::proto::v1::credential_broker_client::CredentialBrokerClient::new(ch)
        .issue_credential(gpu_request(600))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_of_an_expired_svid_is_refused() {
    let h = start().await;
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &SpiffeId::new(DEPLOY_AGENT).expect("id"),
            Duration::from_secs(120),
        )
        .expect("mint");
    let short = ClientIdentity::Files {
        chain: svid.chain,
        key: Arc::new(svid.key_pkcs8.to_vec()),
        bundle: vec![h.env.ca.ca_der().clone()],
    };
    let addr = h.env.grpc_addr.to_string();
    assert_eq!(handshake(&h, &short).await, HandshakeKind::Full);
    let ch = client::connect(&addr, BROKER_ID, &short)
        .await
        .expect("connect");
    pb_issue(ch).await.expect("valid now");
    // The SVID expires (the broker's clock); the client still holds a session ticket.
    h.clock.advance(Duration::from_secs(300));
    assert_eq!(handshake(&h, &short).await, HandshakeKind::Resumed);
    let ch = client::connect(&addr, BROKER_ID, &short)
        .await
        .expect("connect");
    let err = pb_issue(ch)
        .await
        .expect_err("an expired SVID, resumed or not");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
}
