//! Shared test harness: a real dev environment (dev CA, Workload API over Unix sockets,
//! broker over mTLS on port 0) with a manual clock.
#![allow(dead_code)]

pub mod openid;
pub mod pg;
pub mod pki;
pub mod process;
pub mod vault_double;

use std::sync::Arc;
use std::time::Duration;

use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::ManualClock;
use spiffe_broker::dev::{self, DevEnv, DevOptions};
use spiffe_broker::jose::{self, Alg, JwkSet};
use spiffe_broker::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub const DEPLOY_AGENT: &str = "spiffe://example.org/ci/deploy-agent";
pub const MODEL_RUNTIME: &str = "spiffe://example.org/ml/model-runtime";
pub const PROVISIONER: &str = "spiffe://example.org/gpu/provisioner";
/// A relying party (role `relying-party`): may watch the revocation feed.
pub const SCHEDULER: &str = "spiffe://example.org/gpu/scheduler";
pub const ALICE: &str = "spiffe://example.org/ops/alice";
pub const ROOT: &str = "spiffe://example.org/ops/root";

pub struct Harness {
    pub env: DevEnv,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
}

pub async fn start() -> Harness {
    start_with(None).await
}

/// Starts a dev environment; `edit` rewrites the rendered demo config.
pub async fn start_with(edit: Option<spiffe_broker::dev::ConfigEdit>) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new());
    let env = dev::start(DevOptions {
        state_dir: dir.path().join("state"),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        svid_ttl: Duration::from_secs(3600),
        clock: clock.clone(),
        config: edit,
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await
    .expect("dev environment starts");
    Harness { env, clock, dir }
}

impl Harness {
    /// The Workload API identity of a demo workload.
    pub async fn identity(&self, spiffe_id: &str) -> ClientIdentity {
        let socket = self.env.socket(spiffe_id);
        let src = client::workload_source(Some(&format!("unix://{}", socket.display())))
            .await
            .expect("workload API serves the SVID");
        ClientIdentity::Workload(src)
    }

    pub async fn channel_as(&self, identity: &ClientIdentity) -> Channel {
        client::connect(&self.env.grpc_addr.to_string(), dev::BROKER_ID, identity)
            .await
            .expect("connects over mTLS")
    }

    /// A client for `CredentialBroker` as a demo identity.
    pub async fn broker_as(
        &self,
        spiffe_id: &str,
    ) -> pb::credential_broker_client::CredentialBrokerClient<Channel> {
        let id = self.identity(spiffe_id).await;
        pb::credential_broker_client::CredentialBrokerClient::new(self.channel_as(&id).await)
    }

    /// A client for `Admin` as a demo identity.
    pub async fn admin_as(&self, spiffe_id: &str) -> pb::admin_client::AdminClient<Channel> {
        let id = self.identity(spiffe_id).await;
        pb::admin_client::AdminClient::new(self.channel_as(&id).await)
    }

    /// GET a path from the HTTP listener; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.env.http_addr.to_string(), path).await
    }

    /// The JWKS found through OIDC discovery.
    pub async fn jwks(&self) -> JwkSet {
        let (_, disc) = self.http_get("/.well-known/openid-configuration").await;
        let disc: serde_json::Value = serde_json::from_str(&disc).expect("discovery JSON");
        let uri = disc["jwks_uri"].as_str().expect("jwks_uri");
        let path = uri
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .expect("path");
        let (_, body) = self.http_get(&path).await;
        serde_json::from_str(&body).expect("JWKS JSON")
    }

    pub fn ledger_path(&self) -> std::path::PathBuf {
        self.env.state_dir.join("ledger.db")
    }

    /// Every audit entry body, in order.
    pub fn audit_bodies(&self) -> Vec<serde_json::Value> {
        let conn = rusqlite::Connection::open(self.ledger_path()).expect("open ledger");
        let mut stmt = conn
            .prepare("SELECT body FROM audit_log ORDER BY seq")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .map(|r| serde_json::from_str(&r.expect("row")).expect("json"))
            .collect();
        rows
    }

    pub fn lease_count(&self) -> i64 {
        let conn = rusqlite::Connection::open(self.ledger_path()).expect("open ledger");
        conn.query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
            .expect("count")
    }
}

/// A minimal HTTP/1.1 GET (tests only).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Verifies a broker JWT against a JWKS and returns its claims.
pub fn verify_jwt(token: &str, jwks: &JwkSet) -> serde_json::Value {
    let parts = jose::split(token).expect("compact JWS");
    let header: serde_json::Value = serde_json::from_slice(&parts.header).expect("header");
    assert_eq!(header["alg"], "ES256");
    let kid = header["kid"].as_str().expect("kid");
    let key = jwks
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid))
        .expect("kid in JWKS");
    jose::verify(Alg::Es256, key, parts.signing_input, &parts.signature)
        .expect("signature verifies");
    serde_json::from_slice(&parts.payload).expect("claims")
}

pub fn token_of(c: &Option<pb::Credential>) -> String {
    match c.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Token(t)) => t.jwt.clone(),
        _ => panic!("no token in response"),
    }
}

/// The artifact digest of the demo registry push.
pub const PUSH_DIGEST: &str =
    "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4";

/// The demo registry push (one approval from registry-approvers): default scopes and TTL,
/// a digest and a ticket.
pub fn push_request() -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: "model-registry-push".into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: "models/llama".into(),
            artifact_digest: PUSH_DIGEST.into(),
            ticket: "CHG-1234".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn gpu_request(ttl_secs: i64) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: "gpu-scheduler-submit".into(),
        scopes: vec!["job:submit".into()],
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        intent: Some(pb::Intent {
            action: "submit-training".into(),
            target: "queue/a100".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An SVID for any SPIFFE ID of the dev trust domain, straight from the dev CA.
pub fn minted(h: &Harness, id: &str) -> (ClientIdentity, Vec<u8>) {
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &spiffe::SpiffeId::new(id).expect("id"),
            Duration::from_secs(24 * 3600),
        )
        .expect("mint");
    (
        ClientIdentity::Files {
            chain: svid.chain.clone(),
            key: Arc::new(svid.key_pkcs8.to_vec()),
            bundle: vec![h.env.ca.ca_der().clone()],
        },
        svid.chain[0].as_ref().to_vec(),
    )
}
