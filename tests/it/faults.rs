//! Faults in the ledger's file system: the broker's state dir on a small tmpfs the test
//! mounts, filled up while the broker runs. Issuance must fail closed with UNAVAILABLE
//! within the commit bound, nothing half-written may appear (`PRAGMA integrity_check`,
//! the chain verifies), and issuance must recover by itself once space returns.
//!
//! Mounting needs root (CI runs as root); without the privilege the test says so and fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{gpu_request, DEPLOY_AGENT};
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::ManualClock;
use spiffe_broker::dev::{self, DevOptions};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::SqliteStore;
use tonic::Code;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros until the file system is full; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test]
async fn a_full_disk_fails_closed_and_recovers_when_space_returns() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _fs = Tmpfs::mount(&state, "8m");
    let env = dev::start(DevOptions {
        state_dir: state.clone(),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        svid_ttl: Duration::from_secs(3600),
        clock: Arc::new(ManualClock::new()),
        config: Some(Box::new(|demo: String| {
            demo.replace("commit_timeout = \"5s\"", "commit_timeout = \"2s\"")
        })),
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await
    .expect("dev environment on the tmpfs");
    let socket = env.socket(DEPLOY_AGENT);
    let source = client::workload_source(Some(&format!("unix://{}", socket.display())))
        .await
        .expect("SVID");
    let channel = client::connect(
        &env.grpc_addr.to_string(),
        dev::BROKER_ID,
        &ClientIdentity::Workload(source),
    )
    .await
    .expect("mTLS");
    let mut c = pb::credential_broker_client::CredentialBrokerClient::new(channel);
    c.issue_credential(gpu_request(600))
        .await
        .expect("issues while there is space");

    // The disk fills up: every issuance is refused, quickly, with UNAVAILABLE.
    let filler = fill(&state);
    let mut refused = 0;
    for _ in 0..20 {
        let started = Instant::now();
        // (SQLite may still fit a page or two in space it already holds: an Ok is allowed.)
        if let Err(s) = c.issue_credential(gpu_request(600)).await {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "refused within the 2 s commit bound (+ slack): {:?}",
                started.elapsed()
            );
            refused += 1;
        }
    }
    assert!(refused >= 15, "a full disk refuses issuance ({refused}/20)");

    // Space returns: issuance recovers by itself, no restart.
    std::fs::remove_file(&filler).expect("free space");
    let mut recovered = false;
    for _ in 0..50 {
        if c.issue_credential(gpu_request(600)).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "issuance recovers once space returns");

    // Nothing half-written: SQLite's own check, and the hash chain and Merkle tree.
    let conn = rusqlite::Connection::open(state.join("ledger.db")).expect("open");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    let issued: i64 = conn
        .query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
        .expect("count");
    let issue_entries: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit_log WHERE kind = 'issue'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(issued, issue_entries, "every lease has its issue entry");
    drop(conn);
    let report = SqliteStore::verify_file(&state.join("ledger.db")).expect("the log verifies");
    assert!(report.entries > 0);
    drop(c);
    drop(env);
}

/// The serial of the certificate the broker presents on a fresh TLS connection.
async fn broker_serial(h: &common::Harness) -> Vec<u8> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let identity = h.identity(DEPLOY_AGENT).await;
    let broker_id = spiffe::SpiffeId::new(dev::BROKER_ID).expect("id");
    let cfg = client::tls_config(&identity, &broker_id).expect("tls config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(h.env.grpc_addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("spiffe-broker.invalid").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let leaf = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    let (_, cert) = X509Certificate::from_der(&leaf).expect("certificate");
    cert.raw_serial().to_vec()
}

/// The Workload API (the SPIRE agent) goes away: the broker keeps serving with the SVID
/// it holds (new connections, issuance, readiness); when the socket comes back it picks
/// up a fresh SVID by itself. (Refusing once that cached SVID has expired is
/// `lifecycle::not_ready_once_its_own_svid_has_expired`.)
#[tokio::test]
async fn the_workload_api_going_away_keeps_the_cached_svid_and_picks_up_a_new_one() {
    let h = common::start().await;
    let before = broker_serial(&h).await;
    h.env.workload_api.take_away(dev::BROKER_ID);
    assert!(!h.env.socket(dev::BROKER_ID).exists(), "socket removed");

    // Still serving on the cached SVID: a new connection, an issuance, ready.
    assert_eq!(broker_serial(&h).await, before);
    h.broker_as(DEPLOY_AGENT)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect("issues on the cached SVID");
    assert_eq!(h.http_get("/readyz").await.0, 200);

    // The agent is back: the source reconnects (its own back-off, bounded here) and the
    // broker presents a fresh SVID without a restart.
    h.env
        .workload_api
        .bring_back(dev::BROKER_ID)
        .expect("socket back");
    let mut fresh = false;
    for _ in 0..300 {
        if broker_serial(&h).await != before {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fresh, "a fresh SVID once the Workload API is back");
    h.broker_as(DEPLOY_AGENT)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect("issues on the fresh SVID");
}
