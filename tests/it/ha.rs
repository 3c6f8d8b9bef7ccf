//! High availability with real processes: three `spiffe-broker serve` replicas on one
//! PostgreSQL database (a throwaway cluster this test starts), sharing their signing
//! keys. Clients issue through all three at once; one replica is killed with SIGKILL
//! mid-load. Afterwards: every credential a client received has its lease and exactly
//! one issue entry, nothing was issued twice, the one log verifies (hash chain and
//! Merkle tree), the survivors carried on, and a revocation through one replica holds on
//! the others.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::BIN;
use common::{gpu_request, DEPLOY_AGENT, ROOT};
use spiffe_broker::audit::ChainVerifier;
use spiffe_broker::client;
use spiffe_broker::dev;
use spiffe_broker::domain::LeaseId;
use spiffe_broker::metrics::Metrics;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::{PostgresStore, Store};
use tonic::transport::Channel;

struct Replica {
    child: Child,
    grpc: String,
    http: SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// Starts one replica on the shared state dir (keys, CA, policy) and database.
fn replica(h: &common::Harness, shared: &Path, n: usize, pg_url: &str) -> Replica {
    let (grpc, http) = (free(), free());
    let own_socket = format!(
        "unix://{}",
        shared
            .join("workloads")
            .join("spiffe-broker.sock")
            .display()
    );
    let dev_socket = format!("unix://{}", h.env.socket(dev::BROKER_ID).display());
    let text = dev::demo_config(shared, grpc, http)
        .replace(&own_socket, &dev_socket)
        // Quotas and rate limits are not what this test is about.
        .replace("max_active_leases = 100", "max_active_leases = 0")
        .replace("requests_per_minute = 600", "requests_per_minute = 0")
        .replace(
            "[ledger]\n",
            &format!("[ledger]\npostgres_url = \"{pg_url}\"\n"),
        );
    let config = shared.join(format!("replica-{n}.toml"));
    std::fs::write(&config, text).expect("config");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(shared.join(format!("replica-{n}.log")))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .spawn()
        .expect("spawn serve");
    Replica {
        child,
        grpc: grpc.to_string(),
        http,
    }
}

async fn wait_ready(r: &Replica) {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(r.http).await.is_ok() {
            let (status, _) = common::http_get(&r.http.to_string(), "/readyz").await;
            if status == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica at {} did not become ready", r.grpc);
}

fn logs(shared: &Path) -> String {
    (0..3)
        .map(|n| {
            std::fs::read_to_string(shared.join(format!("replica-{n}.log"))).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A received credential: lease id, the token's jti, which replica answered.
type Received = (String, String, usize);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_database_survive_a_sigkill() {
    // The in-process dev environment is the Workload API (as SPIRE's agent would be).
    let h = common::start().await;
    let pg = common::pg::local();
    let shared = h.dir.path().join("replicas");
    let out = Command::new(BIN)
        .args([
            "keys",
            "init",
            "--trust-domain",
            "example.org",
            "--state-dir",
        ])
        .arg(&shared)
        .output()
        .expect("keys init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dev::write_demo_policy(&shared).expect("policy");
    spiffe_broker::issuer::x509::IssuingCa::create_dev(&shared).expect("issuing CA");

    let mut replicas: Vec<Replica> = (0..3).map(|n| replica(&h, &shared, n, pg.url())).collect();
    for r in &replicas {
        wait_ready(r).await;
    }
    // One JWKS: every replica publishes the same keys.
    let jwks: BTreeSet<String> = {
        let mut all = BTreeSet::new();
        for r in &replicas {
            let (_, body) = common::http_get(&r.http.to_string(), "/.well-known/jwks.json").await;
            all.insert(body);
        }
        all
    };
    assert_eq!(jwks.len(), 1, "replicas publish one JWKS");

    let identity = h.identity(DEPLOY_AGENT).await;
    let mut channels: Vec<Channel> = Vec::new();
    for r in &replicas {
        channels.push(
            client::connect(&r.grpc, dev::BROKER_ID, &identity)
                .await
                .expect("mTLS to a replica"),
        );
    }

    // Load through all three; replica 1 is killed mid-load.
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let after_kill: Arc<Mutex<Vec<usize>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6usize {
        let channels = channels.clone();
        let (received, after_kill, killed, stop) = (
            received.clone(),
            after_kill.clone(),
            killed.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            let mut errors = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n = i % 3;
                i += 1;
                let mut c =
                    pb::credential_broker_client::CredentialBrokerClient::new(channels[n].clone());
                match c.issue_credential(gpu_request(600)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let lease = r.lease.expect("lease").id;
                        let token = common::token_of(&r.credential);
                        let parts = spiffe_broker::jose::split(&token).expect("JWS");
                        let claims: serde_json::Value =
                            serde_json::from_slice(&parts.payload).expect("claims");
                        let jti = claims["jti"].as_str().expect("jti").to_owned();
                        received.lock().expect("lock").push((lease, jti, n));
                        if killed.load(Ordering::Relaxed) {
                            after_kill.lock().expect("lock").push(n);
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replicas[1].child.kill().expect("SIGKILL replica 1");
    let _ = replicas[1].child.wait();
    killed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for w in workers {
        errors += w.await.expect("worker");
    }
    let received = received.lock().expect("lock").clone();
    let after_kill = after_kill.lock().expect("lock").clone();

    eprintln!(
        "received {} before+after the kill, {} after; {errors} errors",
        received.len(),
        after_kill.len()
    );
    if after_kill.is_empty() {
        eprintln!("{}", logs(&shared));
    }
    // The survivors carried on.
    assert!(
        after_kill.contains(&0) && after_kill.contains(&2),
        "both survivors issued after the kill: {after_kill:?}"
    );
    assert!(
        !after_kill.contains(&1),
        "nothing from the killed replica after the kill"
    );
    // Nothing issued twice; every token's jti is its lease.
    let ids: BTreeSet<&str> = received.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(ids.len(), received.len(), "no lease id twice");
    assert!(received.iter().all(|(lease, jti, _)| lease == jti));
    let per_replica = received.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.2).or_insert(0) += 1;
        m
    });
    eprintln!(
        "received {} credentials {per_replica:?}, {errors} errors (calls to the killed replica)",
        received.len()
    );

    // A revocation through replica 0 holds on replica 2 at once.
    let victim = received
        .iter()
        .find(|r| r.2 == 0)
        .expect("a lease from replica 0")
        .0
        .clone();
    let root = h.identity(ROOT).await;
    let admin0 = client::connect(&replicas[0].grpc, dev::BROKER_ID, &root)
        .await
        .expect("admin");
    pb::admin_client::AdminClient::new(admin0)
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(victim.clone())),
            reason: "compromised runner".into(),
            ..Default::default()
        })
        .await
        .expect("revoked via replica 0");
    let err = pb::credential_broker_client::CredentialBrokerClient::new(channels[2].clone())
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: victim.clone(),
            ttl: None,
        })
        .await
        .expect_err("replica 2 refuses to renew a lease revoked via replica 0");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // The ledger: every received credential has its lease and exactly one issue entry,
    // and the one log verifies across all replicas' writes.
    let store = PostgresStore::open(
        pg.url(),
        &spiffe_broker::config::Config::from_toml(&dev::demo_config(
            &shared,
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:1".parse().expect("addr"),
        ))
        .expect("config")
        .ledger,
        Arc::new(Metrics::new()),
    )
    .expect("open the database");
    for (lease, _, _) in &received {
        let id = LeaseId::parse(lease).expect("lease id");
        assert!(
            store.lease(&id).await.expect("read").is_some(),
            "lease {lease} recorded"
        );
        let issues = store
            .entries_for_lease(lease)
            .await
            .expect("entries")
            .into_iter()
            .filter(|e| e.kind == "issue")
            .count();
        assert_eq!(issues, 1, "lease {lease}: exactly one issue entry");
    }
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 500).await.expect("entries");
        if page.is_empty() {
            break;
        }
        for e in &page {
            v.push(e).expect("the chain verifies");
            after = e.seq;
        }
    }
    let (entries, _) = v.finish();
    assert!(entries as usize >= received.len(), "{entries} entries");

    // The auditor's way: `audit verify` against the database, with the pinned log key
    // (chain, encoding, Merkle tree, every signed checkpoint).
    let out = Command::new(BIN)
        .args(["audit", "verify", "--postgres-url", pg.url(), "--log-key"])
        .arg(shared.join("keys").join("log.vkey"))
        .output()
        .expect("audit verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("verify prints JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["entries"].as_u64(), Some(entries));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("password"),
        "the URL is shown without credentials"
    );
    // `audit export` from the database, then verified offline from the files alone.
    let export = shared.join("export");
    let out = Command::new(BIN)
        .args(["audit", "export", "--postgres-url", pg.url(), "--log-key"])
        .arg(shared.join("keys").join("log.vkey"))
        .arg("--out")
        .arg(&export)
        .output()
        .expect("audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(exported["entries"].as_u64(), Some(entries));
    let out = Command::new(BIN)
        .args(["audit", "verify", "--export"])
        .arg(&export)
        .arg("--log-key")
        .arg(shared.join("keys").join("log.vkey"))
        .output()
        .expect("audit verify --export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(verified["entries"].as_u64(), Some(entries));
    assert_eq!(exported["checkpoints"], verified["checkpoints_verified"]);
    // Someone with database access rewrites an entry: the verifier names it.
    pg.sql(
        "ALTER TABLE audit_log DISABLE TRIGGER USER;
         UPDATE audit_log SET body = replace(body, '\"allow\"', '\"deny\"') WHERE seq = 2;
         ALTER TABLE audit_log ENABLE TRIGGER USER;",
    );
    let out = Command::new(BIN)
        .args(["audit", "verify", "--postgres-url", pg.url(), "--log-key"])
        .arg(shared.join("keys").join("log.vkey"))
        .output()
        .expect("audit verify");
    assert!(
        !out.status.success(),
        "a rewritten entry fails verification"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entry 2") || err.contains(" 2:"), "{err}");
}
