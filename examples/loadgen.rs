//! Load generator: starts `spiffe-broker dev` in-process (or targets running brokers
//! with `--target ADDR[,ADDR…]`, below), runs N concurrent clients with real SVIDs for
//! D seconds, and prints throughput, p50/p99/p99.9 latency, errors and the process's
//! peak RSS — beside the machine's own limits measured in the same run: the raw ES256
//! signing rate and the durable ledger commit rate (same SQLite settings and group
//! commit). Prints figures; asserts nothing.
//!
//! ```sh
//! cargo run --release --example loadgen -- --mode reused --clients 32 --seconds 10
//! ```
//!
//! Modes: `reused` (one mTLS connection per client), `new-conn` (a new TLS connection
//! per request), `jwt-svid` (bearer JWT-SVID over server-authenticated TLS), `intent`
//! (a request that needs policy with a full intent), `renew`, `revoke`, `exchange`
//! (token exchange, RFC 8693: an agent exchanges a person's delegation token for a GPU
//! token, each time). `--mode reused,exchange` runs several, one after the other, on the
//! same broker in the same window.
//!
//! `--target ADDR[,ADDR…] --workload-dir DIR` drives brokers already running (e.g.
//! `spiffe-broker serve` replicas on one PostgreSQL, `bench/replicas.sh`) instead: client
//! `i` connects to the `i mod n`-th address, and the clients take their SVIDs from the
//! demo identities' Workload API sockets in DIR (`spiffe-broker dev`'s
//! `STATE_DIR/workloads`, whose CA the brokers trust). The CPU line then covers the
//! clients only, and the ledger line is left out (read the brokers' `/metrics`); not
//! with `--mode jwt-svid`, which mints with the in-process dev CA.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe_broker::audit::{AuditEvent, EventKind};
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::{Clock, SystemClock};
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::crypto::{EcdsaP256Signer, Signer};
use spiffe_broker::dev::{self, DevOptions};
use spiffe_broker::domain::delegation::ACCESS_TOKEN_TYPE;
use spiffe_broker::metrics::Metrics;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::{LedgerOp, SqliteStore, Store};
use tonic::transport::Channel;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn num(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Latencies in 10 µs buckets up to 1 s (the last bucket takes everything slower): fixed
/// memory however long the run, so a 10-minute run's RSS is the broker's, not ours.
struct Histogram(Vec<u64>);

impl Histogram {
    const BUCKET_US: u64 = 10;
    const BUCKETS: usize = 100_000;

    fn new() -> Self {
        Self(vec![0; Self::BUCKETS])
    }

    fn record(&mut self, d: Duration) {
        let i = (d.as_micros() as u64 / Self::BUCKET_US).min(Self::BUCKETS as u64 - 1);
        self.0[i as usize] += 1;
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The upper edge of the bucket holding the `p` quantile.
    fn pct(&self, p: f64) -> Duration {
        let rank = ((self.count() as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros((i as u64 + 1) * Self::BUCKET_US);
            }
        }
        Duration::ZERO
    }
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM:` peak, `VmRSS:` now).
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time so far of each thread of this process, by thread name (ns, from schedstat).
fn thread_cpu_ns() -> std::collections::BTreeMap<u64, (String, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let ns = read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.insert(tid, (read("comm").trim().to_owned(), ns));
    }
    out
}

/// Bytes this process has caused to be written to storage (`/proc/self/io`).
fn storage_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU spent per successful operation between two snapshots, by thread name.
fn cpu_per_op(
    before: &std::collections::BTreeMap<u64, (String, u64)>,
    after: &std::collections::BTreeMap<u64, (String, u64)>,
    ops: usize,
) -> String {
    let mut by_name = std::collections::BTreeMap::<String, u64>::new();
    for (tid, (name, ns)) in after {
        let was = before.get(tid).map_or(0, |(_, b)| *b);
        *by_name.entry(name.clone()).or_default() += ns.saturating_sub(was);
    }
    let per = |ns: u64| ns as f64 / 1000.0 / ops.max(1) as f64;
    let total: u64 = by_name.values().sum();
    let parts: Vec<String> = by_name
        .iter()
        .filter(|(_, ns)| per(**ns) >= 0.5)
        .map(|(n, ns)| format!("{n} {:.1}", per(*ns)))
        .collect();
    format!("{:.1} µs ({})", per(total), parts.join(", "))
}

/// Raw ES256 signatures per second on one core (the same ring key type the issuer uses).
fn signing_rate(seconds: f64) -> Result<f64, Box<dyn std::error::Error>> {
    let (signer, _) = EcdsaP256Signer::generate()?;
    let msg = [7u8; 400];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        signer.sign(&msg)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Durable ledger appends per second through the store's group commit, 256 writers.
async fn ledger_rate(seconds: f64) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(30),
        busy_timeout: Duration::from_secs(5),
        max_batch: 256,
        postgres_sslmode: None,
        postgres_ca_file: None,
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
        &dir.path().join("l.db"),
        &cfg,
        Arc::new(Metrics::new()),
    )?);
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let (store, count) = (store.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut e =
                    AuditEvent::new(SystemClock.unix_seconds() * 1000, EventKind::Deny, "deny");
                e.reason = Some("ledger rate probe".into());
                if store.apply(LedgerOp::Record { event: e }).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn request(mode: &str) -> pb::IssueCredentialRequest {
    let mut intent = pb::Intent {
        action: "submit-training".into(),
        target: "queue/a100".into(),
        ..Default::default()
    };
    if mode == "intent" {
        intent.ticket = "CHG-1234".into();
        intent.justification = "nightly fine-tune of the ranking model".into();
        intent.artifact_digest = format!("sha256:{}", "ab".repeat(32));
    }
    pb::IssueCredentialRequest {
        profile: "gpu-scheduler-submit".into(),
        scopes: vec!["job:submit".into()],
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        intent: Some(intent),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let modes: Vec<String> = arg("--mode")
        .unwrap_or_else(|| "reused".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let clients = num("--clients", 32) as usize;
    let seconds = num("--seconds", 10);
    for mode in &modes {
        if ![
            "reused", "new-conn", "jwt-svid", "intent", "renew", "revoke", "exchange",
        ]
        .contains(&mode.as_str())
        {
            return Err(format!("unknown --mode {mode}").into());
        }
    }

    let targets: Vec<String> = arg("--target")
        .map(|t| t.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if !targets.is_empty() && modes.iter().any(|m| m == "jwt-svid") {
        return Err("--mode jwt-svid mints with the in-process dev CA: not with --target".into());
    }

    // `--no-limits` skips the machine probes (for quick A/B runs of the broker alone).
    let (sign, ledger) = if std::env::args().any(|a| a == "--no-limits") {
        (f64::NAN, f64::NAN)
    } else {
        println!("measuring this machine's limits (2 s each)…");
        let sign = signing_rate(2.0)?;
        let ledger = ledger_rate(2.0).await?;
        println!("  raw ES256 signing: {sign:.0}/s on one core; durable ledger appends (group commit): {ledger:.0}/s");
        (sign, ledger)
    };

    if !targets.is_empty() {
        let dir = arg("--workload-dir")
            .ok_or("--target needs --workload-dir (the demo identities' Workload API sockets)")?;
        let sock = |name: &str| format!("unix://{dir}/{name}.sock");
        let identity = |name: &str| {
            let endpoint = sock(name);
            async move {
                client::workload_source(Some(&endpoint))
                    .await
                    .map(ClientIdentity::Workload)
            }
        };
        let run = Run {
            targets,
            agent: identity("deploy-agent").await?,
            root: identity("root").await?,
            alice: identity("alice").await?,
            bundle: Vec::new(),
            clients,
            seconds,
            sign,
            ledger,
        };
        for mode in &modes {
            run.mode(None, mode).await?;
        }
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let env = dev::start(DevOptions {
        state_dir: dir.path().join("state"),
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        svid_ttl: Duration::from_secs(3600),
        clock: Arc::new(SystemClock),
        // A load test is not what quotas are for: lift them for the demo identities.
        config: Some(Box::new(|demo: String| {
            demo.replace("max_active_leases = 100", "max_active_leases = 0")
                .replace("requests_per_minute = 600", "requests_per_minute = 0")
                // One identity at thousands of calls a second: the bucket still runs.
                .replace(
                    "calls_per_identity_per_minute = 1200",
                    "calls_per_identity_per_minute = 100000000",
                )
                .replace(
                    "renewals_per_lease_per_minute = 6",
                    "renewals_per_lease_per_minute = 100000000",
                )
        })),
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await?;
    let addr = env.grpc_addr.to_string();
    let sock = |id: &str| format!("unix://{}", env.socket(id).display());
    let agent_src =
        client::workload_source(Some(&sock("spiffe://example.org/ci/deploy-agent"))).await?;
    let agent = ClientIdentity::Workload(agent_src);
    let root = ClientIdentity::Workload(
        client::workload_source(Some(&sock("spiffe://example.org/ops/root"))).await?,
    );
    let alice = ClientIdentity::Workload(
        client::workload_source(Some(&sock("spiffe://example.org/ops/alice"))).await?,
    );
    let bundle = vec![env.ca.ca_der().clone()];
    let run = Run {
        targets: vec![addr],
        agent,
        root,
        alice,
        bundle,
        clients,
        seconds,
        sign,
        ledger,
    };
    for mode in &modes {
        run.mode(Some(&env), mode).await?;
    }
    env.shutdown().await?;
    Ok(())
}

/// What every mode's run shares: the brokers, their callers and the machine's limits.
struct Run {
    /// Client `i` calls `targets[i % len]`.
    targets: Vec<String>,
    agent: ClientIdentity,
    root: ClientIdentity,
    alice: ClientIdentity,
    bundle: Vec<rustls::pki_types::CertificateDer<'static>>,
    clients: usize,
    seconds: u64,
    sign: f64,
    ledger: f64,
}

/// The ledger's commits (fsyncs) and the operations they carried, so far.
fn ledger_counts(env: &dev::DevEnv) -> (f64, f64) {
    let m = env.broker.metrics().render();
    let get = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        get("spiffe_broker_ledger_commit_batch_size_count"),
        get("spiffe_broker_ledger_commit_batch_size_sum"),
    )
}

/// A person's token for agents (audience: the broker), for `exchange` (not timed).
async fn delegation_token(addr: &str, alice: &ClientIdentity) -> Result<String, String> {
    let ch = client::connect(addr, dev::BROKER_ID, alice)
        .await
        .map_err(|e| e.to_string())?;
    let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
        .issue_credential(pb::IssueCredentialRequest {
            profile: "agent-delegation".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    match resp.credential.and_then(|c| c.kind) {
        Some(pb::credential::Kind::Token(t)) => Ok(t.jwt),
        _ => Err("no delegation token".into()),
    }
}

impl Run {
    /// One mode's run; `env` is the in-process broker (`None` with `--target`).
    async fn mode(
        &self,
        env: Option<&dev::DevEnv>,
        mode: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (clients, seconds, sign, ledger) = (self.clients, self.seconds, self.sign, self.ledger);
        let mode = mode.to_owned();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        // Long runs print a line a minute, so memory growth (or its absence) shows over time.
        let done = Arc::new(AtomicU64::new(0));
        if seconds >= 120 {
            let done = done.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    println!(
                        "  [{:>4.0} s] ok so far {}, RSS now {:.0} MiB",
                        start.elapsed().as_secs_f64(),
                        done.load(Ordering::Relaxed),
                        status_mib("VmRSS:")
                    );
                }
            });
        }
        // Each client's subject token, fetched before any client starts (not timed).
        let mut subjects = Vec::new();
        for _ in 0..clients {
            subjects.push(if mode == "exchange" {
                Some(delegation_token(&self.targets[0], &self.alice).await?)
            } else {
                None
            });
        }
        let counts_before = env.map(ledger_counts);
        let mut tasks = Vec::new();
        for (i, subject) in subjects.into_iter().enumerate() {
            let mode = mode.clone();
            let (agent, root, addr, bundle, done) = (
                self.agent.clone(),
                self.root.clone(),
                self.targets[i % self.targets.len()].clone(),
                self.bundle.clone(),
                done.clone(),
            );
            let jwt = if let (true, Some(env)) = (mode == "jwt-svid", env) {
                Some(env.ca.mint_jwt_svid(
                    &spiffe::SpiffeId::new("spiffe://example.org/ci/deploy-agent")?,
                    &[dev::BROKER_ID.to_owned()],
                    Duration::from_secs(3600),
                )?)
            } else {
                None
            };
            tasks.push(tokio::spawn(async move {
                let connect = |id: ClientIdentity| {
                    let addr = addr.clone();
                    async move {
                        client::connect(&addr, dev::BROKER_ID, &id)
                            .await
                            .map_err(|e| e.to_string())
                    }
                };
                let identity = if mode == "jwt-svid" {
                    ClientIdentity::Anonymous { bundle }
                } else {
                    agent.clone()
                };
                let mut ch: Channel = connect(identity.clone()).await?;
                let mut admin = pb::admin_client::AdminClient::new(connect(root).await?);
                let (mut lat, mut errors) = (Histogram::new(), 0u64);
                while Instant::now() < deadline {
                    if mode == "new-conn" {
                        ch = connect(identity.clone()).await?;
                    }
                    let mut c =
                        pb::credential_broker_client::CredentialBrokerClient::new(ch.clone());
                    // renew and revoke first need a lease of their own (not timed).
                    let lease = if mode == "renew" || mode == "revoke" {
                        match c.issue_credential(request("reused")).await {
                            Ok(r) => r.into_inner().lease.map(|l| l.id).unwrap_or_default(),
                            Err(_) => {
                                errors += 1;
                                continue;
                            }
                        }
                    } else {
                        String::new()
                    };
                    let t = Instant::now();
                    let ok = match mode.as_str() {
                        "renew" => c
                            .renew_lease(pb::RenewLeaseRequest {
                                lease_id: lease,
                                ttl: Some(prost_types::Duration {
                                    seconds: 900,
                                    nanos: 0,
                                }),
                            })
                            .await
                            .is_ok(),
                        "revoke" => admin
                            .revoke(pb::RevokeRequest {
                                selector: Some(pb::revoke_request::Selector::LeaseId(lease)),
                                reason: "loadgen".into(),
                                ..Default::default()
                            })
                            .await
                            .is_ok(),
                        "exchange" => {
                            let gpu = request("reused");
                            c.exchange_token(pb::ExchangeTokenRequest {
                                subject_token: subject.clone().unwrap_or_default(),
                                subject_token_type: ACCESS_TOKEN_TYPE.into(),
                                profile: gpu.profile,
                                scopes: gpu.scopes,
                                ttl: gpu.ttl,
                                intent: gpu.intent,
                                access_request_id: String::new(),
                            })
                            .await
                            .is_ok()
                        }
                        _ => {
                            let mut req = tonic::Request::new(request(&mode));
                            if let Some(token) = &jwt {
                                let value = format!("Bearer {token}")
                                    .parse()
                                    .map_err(|e| format!("{e:?}"))?;
                                req.metadata_mut().insert("authorization", value);
                            }
                            c.issue_credential(req).await.is_ok()
                        }
                    };
                    if ok {
                        lat.record(t.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors += 1;
                    }
                }
                Ok::<_, String>((lat, errors))
            }));
        }
        let started = Instant::now();
        let cpu_before = thread_cpu_ns();
        let written_before = storage_write_bytes();
        let (mut lat, mut errors) = (Histogram::new(), 0);
        for t in tasks {
            let (l, e) = t.await??;
            lat.merge(&l);
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let ok = lat.count() as usize;
        let cpu = cpu_per_op(&cpu_before, &thread_cpu_ns(), ok);
        let written = storage_write_bytes().saturating_sub(written_before);
        let rate = ok as f64 / elapsed;
        println!("mode={mode} clients={clients} seconds={seconds}");
        println!(
            "  ok={} errors={errors} throughput={rate:.0}/s p50={:?} p99={:?} p99.9={:?}",
            ok,
            lat.pct(0.5),
            lat.pct(0.99),
            lat.pct(0.999)
        );
        if env.is_some() {
            println!("  CPU per operation (broker and clients share this process): {cpu}");
        } else {
            println!("  CPU per operation of this process (the clients only): {cpu}");
        }
        let limit = sign.min(ledger);
        if limit.is_finite() {
            println!(
                "  {:.0}% of the lower machine limit ({limit:.0}/s)",
                100.0 * rate / limit
            );
        }
        println!(
            "  peak RSS of this process ({}clients + probes) {:.0} MiB",
            if env.is_some() { "broker + " } else { "" },
            peak_rss_mib()
        );
        let (Some(env), Some((commits_before, ops_before))) = (env, counts_before) else {
            return Ok(());
        };
        let (commits, ops) = ledger_counts(env);
        let (commits, ops) = (commits - commits_before, ops - ops_before);
        println!(
            "  ledger: {commits:.0} commits (fsyncs) for {ops:.0} ops, mean batch {:.1}; {:.1} KiB written to storage per operation",
            ops / commits.max(1.0),
            written as f64 / 1024.0 / ok.max(1) as f64
        );
        Ok(())
    }
}
