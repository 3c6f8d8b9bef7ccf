//! Lease lifecycle at scale: fills a ledger with N live leases (default 1,000,000, each a
//! real lease row plus its hash-chained, Merkle-tree audit entry, written through the
//! store's group commit), then starts `spiffe-broker dev` on it and reports:
//! start-up to ready, RSS at rest, issuance latency while a revoke-by-prefix of 10% of
//! the leases runs, and how long that revocation takes; then the revocation cascade of a
//! token-exchange derivation tree (`--tree N` derived leases under one root, default
//! 1,000: revoking the root revokes all of them, one feed event each). Prints figures;
//! asserts nothing.
//!
//! ```sh
//! cargo run --release --example lease_scale -- --leases 1000000 --clients 8
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe_broker::audit::{AuditEvent, EventKind};
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::{Clock, SystemClock};
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::dev::{self, DevOptions};
use spiffe_broker::domain::{Lease, LeaseId, LeaseState, ProfileName, Scope};
use spiffe_broker::metrics::Metrics;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::{LedgerOp, SqliteStore, Store};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Writes `n` live leases through the store: 10% under `…/batch/`, the rest spread
/// over `…/fleet/N` identities.
/// A lease for the fill (a real row and audit entry, like an issuance writes).
fn filled(
    i: u64,
    now: i64,
    holder: &str,
    parent: Option<&LeaseId>,
) -> Result<(Lease, AuditEvent), String> {
    let lease = Lease {
        id: LeaseId::generate(now * 1000 + i as i64 / 100).map_err(|e| e.to_string())?,
        profile: ProfileName::parse("dataset-read").map_err(|e| e.to_string())?,
        spiffe_id: holder.to_owned(),
        scopes: vec![Scope::parse("dataset:read").map_err(|e| e.to_string())?],
        audience: "dataset-store".into(),
        state: LeaseState::Active,
        issued_at: now,
        expires_at: now + 86_400,
        max_expires_at: now + 86_400,
        credential_sha256: hex::encode([i as u8; 32]),
        renewals: 0,
        ended_at: None,
        end_reason: None,
        intent: None,
        backend: None,
        parent: parent.cloned(),
        subject: parent.map(|_| "spiffe://example.org/people/dana".to_owned()),
    };
    let mut event = AuditEvent::new(now * 1000, EventKind::Issue, "allow");
    event.caller = Some(holder.to_owned());
    event.lease_id = Some(lease.id.to_string());
    event.credential_sha256 = Some(lease.credential_sha256.clone());
    Ok((lease, event))
}

fn issue_op((lease, event): (Lease, AuditEvent)) -> LedgerOp {
    LedgerOp::Issue {
        lease,
        event,
        max_active: None,
        break_glass: None,
        idempotency: None,
    }
}

/// A derivation tree: a person's lease, ten agents' leases derived from it, and the rest
/// derived from those (as token exchange records them). Returns the root's id.
async fn fill_tree(path: &std::path::Path, n: u64) -> Result<String, Box<dyn std::error::Error>> {
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(60),
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        postgres_sslmode: None,
        postgres_ca_file: None,
    };
    let store = SqliteStore::open(path, &cfg, Arc::new(Metrics::new()))?;
    let now = SystemClock.unix_seconds();
    let root = filled(0, now, "spiffe://example.org/people/dana", None)?;
    let root_id = root.0.id.clone();
    store.apply(issue_op(root)).await?;
    let mut agents = Vec::new();
    for i in 1..=n.min(10) {
        let (lease, event) = filled(
            i,
            now,
            "spiffe://example.org/agents/planner",
            Some(&root_id),
        )?;
        agents.push(lease.id.clone());
        store.apply(issue_op((lease, event))).await?;
    }
    let rest = (n.min(10) + 1..=n).map(|i| {
        let parent = &agents[(i % agents.len() as u64) as usize];
        filled(i, now, "spiffe://example.org/agents/runner", Some(parent)).map(issue_op)
    });
    let ops = rest.collect::<Result<Vec<_>, _>>()?;
    futures::future::try_join_all(ops.into_iter().map(|op| store.apply(op))).await?;
    Ok(root_id.to_string())
}

async fn fill(path: &std::path::Path, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(60),
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        postgres_sslmode: None,
        postgres_ca_file: None,
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path, &cfg, Arc::new(Metrics::new()))?);
    let now = SystemClock.unix_seconds();
    let started = Instant::now();
    let workers = 512u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let holder = if i % 10 == 0 {
                    format!("spiffe://example.org/batch/job-{}", i % 5000)
                } else {
                    format!("spiffe://example.org/fleet/node-{}", i % 50_000)
                };
                store
                    .apply(issue_op(filled(i, now, &holder, None)?))
                    .await
                    .map_err(|e| e.to_string())?;
                i += workers;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "filled {n} live leases (lease + audit entry + Merkle leaf each) in {secs:.1}s ({:.0}/s)",
        n as f64 / secs
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--leases", 1_000_000);
    let clients = arg("--clients", 8) as usize;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    fill(&state.join("ledger.db"), n).await?;
    let tree = arg("--tree", 1000);
    let tree_root = fill_tree(&state.join("ledger.db"), tree).await?;
    let db_mib = std::fs::metadata(state.join("ledger.db"))?.len() as f64 / 1048576.0;

    let rss_before = rss_mib();
    let started = Instant::now();
    let env = dev::start(DevOptions {
        state_dir: state.clone(),
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        svid_ttl: Duration::from_secs(3600),
        clock: Arc::new(SystemClock),
        // A load test is not what quotas are for: lift them for the demo identities.
        config: Some(Box::new(|demo: String| {
            demo.replace("max_active_leases = 100", "max_active_leases = 0")
                .replace("requests_per_minute = 600", "requests_per_minute = 0")
                // Nor the per-identity call bucket: the clients are one identity.
                .replace(
                    "calls_per_identity_per_minute = 1200",
                    "calls_per_identity_per_minute = 100000000",
                )
        })),
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await?;
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "start-up to ready with {n} leases on disk ({db_mib:.0} MiB ledger): {:.0} ms; process RSS at rest {:.0} MiB (was {:.0} MiB before start-up)",
        ready.as_secs_f64() * 1000.0,
        rss_mib(),
        rss_before
    );

    let sock = |id: &str| format!("unix://{}", env.socket(id).display());
    let agent = ClientIdentity::Workload(
        client::workload_source(Some(&sock("spiffe://example.org/ci/deploy-agent"))).await?,
    );
    let root = ClientIdentity::Workload(
        client::workload_source(Some(&sock("spiffe://example.org/ops/root"))).await?,
    );
    let addr = env.grpc_addr.to_string();

    // Issuance load, measured before and during the revocation.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ch = client::connect(&addr, dev::BROKER_ID, &agent).await?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch);
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ok = c
                    .issue_credential(pb::IssueCredentialRequest {
                        profile: "gpu-scheduler-submit".into(),
                        scopes: vec!["job:submit".into()],
                        ttl: Some(prost_types::Duration {
                            seconds: 600,
                            nanos: 0,
                        }),
                        intent: Some(pb::Intent {
                            action: "submit-training".into(),
                            target: "queue/a100".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                samples.push((Instant::now(), t.elapsed(), ok));
            }
            samples
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut admin =
        pb::admin_client::AdminClient::new(client::connect(&addr, dev::BROKER_ID, &root).await?);
    let revoke_start = Instant::now();
    let resp = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::SpiffeIdPrefix(
                "spiffe://example.org/batch/".into(),
            )),
            reason: "batch fleet decommissioned".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let revoke_end = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = Vec::new();
    let mut before = Vec::new();
    let mut errors = 0;
    for t in tasks {
        for (end, lat, ok) in t.await? {
            if !ok {
                errors += 1;
            }
            let start = end - lat;
            if start < revoke_end && end > revoke_start {
                during.push(lat);
            } else if end <= revoke_start {
                before.push(lat);
            }
        }
    }
    during.sort();
    before.sort();
    println!(
        "revoke by prefix: {} leases in {:.2}s (transactions of 500 leases, each with its feed events and audit entry; {} feed events)",
        resp.revoked_lease_ids.len(),
        (revoke_end - revoke_start).as_secs_f64(),
        resp.revoked_lease_ids.len()
    );
    println!(
        "issuance with {clients} clients before the revoke: n={} p50={:?} p99={:?}; during it: n={} p50={:?} p99={:?} max={:?}; errors={errors}",
        before.len(),
        pct(&before, 0.5),
        pct(&before, 0.99),
        during.len(),
        pct(&during, 0.5),
        pct(&during, 0.99),
        during.last().copied().unwrap_or_default()
    );
    // The cascade: revoking the root of the derivation tree takes every derived lease.
    let cascade_start = Instant::now();
    let resp = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(tree_root)),
            reason: "dana's session ended".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "revocation cascade: the root of a tree of {tree} derived leases took {} leases in {:.3}s (one transaction, a feed event each)",
        resp.revoked_lease_ids.len(),
        cascade_start.elapsed().as_secs_f64()
    );
    env.shutdown().await?;
    Ok(())
}
