//! Issuance throughput: starts `spiffe-broker dev` in-process on a temp dir and runs
//! N concurrent clients, each on its own reused SPIFFE mTLS connection, issuing ES256
//! JWTs (each one durably committed) for D seconds. Prints figures; asserts nothing.
//!
//! ```sh
//! cargo run --release --example issue_bench -- --clients 32 --seconds 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::SystemClock;
use spiffe_broker::dev::{self, DevOptions};
use spiffe_broker::proto::v1 as pb;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let clients = arg("--clients", 32) as usize;
    let seconds = arg("--seconds", 10);
    let dir = tempfile::tempdir()?;
    let env = dev::start(DevOptions {
        state_dir: dir.path().join("state"),
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        svid_ttl: Duration::from_secs(3600),
        clock: Arc::new(SystemClock),
        // A load test is not what quotas are for: lift them for the demo identities.
        config: Some(Box::new(|demo: String| {
            demo.replace("max_active_leases = 100", "max_active_leases = 100000000")
                .replace(
                    "requests_per_minute = 600",
                    "requests_per_minute = 100000000",
                )
        })),
    })
    .await?;
    let socket = env.socket("spiffe://example.org/ci/deploy-agent");
    let source = client::workload_source(Some(&format!("unix://{}", socket.display()))).await?;
    let identity = ClientIdentity::Workload(source);
    let addr = env.grpc_addr.to_string();

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ch = client::connect(&addr, dev::BROKER_ID, &identity).await?;
        tasks.push(tokio::spawn(async move {
            let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch);
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = c
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
                    .await;
                match r {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let started = Instant::now();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "clients={clients} seconds={seconds} (reused mTLS connections, durable ES256 JWT issuance)"
    );
    println!(
        "issued={} errors={} throughput={:.0}/s p50={:?} p99={:?} p99.9={:?}",
        lat.len(),
        errors,
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999)
    );
    let m = env.broker.metrics().render();
    let get = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let commits = get("spiffe_broker_ledger_commit_batch_size_count");
    let ops = get("spiffe_broker_ledger_commit_batch_size_sum");
    println!(
        "ledger: {commits:.0} commits (fsyncs) for {ops:.0} ops, mean batch {:.1}, mean commit {:.2} ms",
        ops / commits.max(1.0),
        1000.0 * get("spiffe_broker_ledger_commit_duration_seconds_sum") / commits.max(1.0)
    );
    let report =
        spiffe_broker::store::sqlite::SqliteStore::verify_file(&env.state_dir.join("ledger.db"))?;
    println!("ledger verifies: {} entries", report.entries);
    env.shutdown().await?;
    Ok(())
}
