//! Crash consistency: `spiffe-broker dev` is SIGKILLed 20 times on one state dir while
//! 8 clients issue credentials as fast as they can. Every credential a client actually
//! received must be in the ledger (lease row and `issue` entry with the token's
//! fingerprint), nothing may appear twice, and the log must still verify offline.
//! A last run ends in SIGTERM under the same load: a clean exit whose final signed
//! checkpoint covers the whole log.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::dev::{BROKER_ID, TRUST_DOMAIN};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::sqlite::SqliteStore;
use spiffe_broker::workload::DevCa;
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_spiffe-broker");
const KILLS: usize = 20;
const CLIENTS: usize = 8;
const SEED: u64 = 0x5EED_C4A5_4B20_2611;
/// The random kill delay (the load duration of one run), in ms.
const KILL_DELAY_MS: (u64, u64) = (50, 600);
/// Bounds on waits that poll or await (never hit when things work).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// splitmix64: a deterministic pseudo-random sequence from a fixed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A running `spiffe-broker dev`; killed (SIGKILL) if dropped while running.
struct Dev {
    child: Child,
    grpc: String,
    ready_after: Duration,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `spiffe-broker dev` on `state` (loopback, port 0: the kernel picks free ports)
/// and waits, bounded, for `ready`; stderr is appended to `log`.
fn start_dev(state: &Path, log: &Path) -> Dev {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("broker log");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["dev", "--state-dir"])
        .arg(state)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut grpc = None;
    loop {
        let left = READY_TIMEOUT.saturating_sub(started.elapsed());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "dev did not print ready ({e}; exit {status:?}); log tail:\n{}",
                    tail(log)
                );
            }
        };
        if let Some(rest) = line.trim().strip_prefix("gRPC (mTLS):") {
            grpc = rest.split_whitespace().next().map(str::to_owned);
        }
        if line == "ready" {
            break;
        }
    }
    let ready_after = started.elapsed();
    Dev {
        child,
        grpc: grpc.expect("gRPC address printed"),
        ready_after,
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Waits (bounded) for the broker to exit: a thread owns it and blocks in `wait`.
fn wait_exit(mut dev: Dev, within: Duration) -> std::process::ExitStatus {
    let pid = dev.child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(dev.child.wait());
    });
    match rx.recv_timeout(within) {
        Ok(status) => status.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("broker (pid {pid}) did not exit within {within:?}");
        }
    }
}

fn identity(ca: &DevCa, spiffe_id: &str) -> ClientIdentity {
    let id = spiffe::SpiffeId::new(spiffe_id).expect("spiffe id");
    let svid = ca
        .mint_x509_svid(&id, Duration::from_secs(3600))
        .expect("mint SVID");
    ClientIdentity::Files {
        chain: svid.chain,
        key: Arc::new(svid.key_pkcs8.to_vec()),
        bundle: vec![ca.ca_der().clone()],
    }
}

async fn channel(addr: &str, id: &ClientIdentity) -> Channel {
    client::connect(addr, BROKER_ID, id)
        .await
        .expect("connects over mTLS")
}

fn sha256_hex(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

fn jti_of(token: &str) -> String {
    let parts = spiffe_broker::jose::split(token).expect("compact JWS");
    let claims: serde_json::Value = serde_json::from_slice(&parts.payload).expect("claims");
    claims["jti"].as_str().expect("jti").to_owned()
}

/// A credential a client actually received.
struct Received {
    lease_id: String,
    token: String,
    run: usize,
}

/// What the load of one run saw.
#[derive(Default)]
struct Tally {
    received: Mutex<Vec<Received>>,
    /// Refusals while the broker was up (RESOURCE_EXHAUSTED: rate limit or quota).
    refused: AtomicUsize,
    /// Errors while the broker was up that are not refusals: a failure.
    unexpected: Mutex<Vec<String>>,
    /// Errors after the kill (connections cut).
    cut: AtomicUsize,
}

/// Releases every active lease of `holder` so the per-identity quota (100 active leases)
/// never stops issuance: leases left active by a kill (received and not yet released,
/// or committed and never answered) are given back before the next load.
async fn give_back(addr: &str, admin: &ClientIdentity, holder: &ClientIdentity) -> usize {
    let mut a = pb::admin_client::AdminClient::new(channel(addr, admin).await);
    let active = a
        .list_leases(pb::ListLeasesRequest {
            spiffe_id: common::DEPLOY_AGENT.into(),
            state: pb::LeaseState::Active as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list active leases")
        .into_inner()
        .leases;
    let c = pb::credential_broker_client::CredentialBrokerClient::new(channel(addr, holder).await);
    let releases = active.iter().map(|l| {
        let mut c = c.clone();
        let lease_id = l.id.clone();
        async move {
            c.release_lease(pb::ReleaseLeaseRequest { lease_id })
                .await
                .expect("release a leftover lease")
        }
    });
    futures::future::join_all(releases).await;
    active.len()
}

/// One client: issue as fast as possible, record what arrives, give it back, repeat
/// until the broker dies.
async fn load(
    mut c: pb::credential_broker_client::CredentialBrokerClient<Channel>,
    run: usize,
    killed: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    tally: Arc<Tally>,
) {
    let failed = |what: &str, s: tonic::Status| {
        if killed.load(Ordering::SeqCst) {
            tally.cut.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        if matches!(s.code(), Code::ResourceExhausted) {
            tally.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        tally
            .unexpected
            .lock()
            .expect("lock")
            .push(format!("run {run}: {what}: {s}"));
        true
    };
    loop {
        in_flight.fetch_add(1, Ordering::SeqCst);
        let r = c.issue_credential(common::gpu_request(600)).await;
        in_flight.fetch_sub(1, Ordering::SeqCst);
        let resp = match r {
            Ok(r) => r.into_inner(),
            Err(s) => {
                if failed("issue", s) {
                    return;
                }
                continue;
            }
        };
        let token = common::token_of(&resp.credential);
        let lease_id = resp.lease.expect("lease").id;
        assert_eq!(jti_of(&token), lease_id, "the token's jti is the lease id");
        tally.received.lock().expect("lock").push(Received {
            lease_id: lease_id.clone(),
            token,
            run,
        });
        in_flight.fetch_add(1, Ordering::SeqCst);
        let r = c.release_lease(pb::ReleaseLeaseRequest { lease_id }).await;
        in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Err(s) = r {
            if failed("release", s) {
                return;
            }
        }
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[test]
fn sigkill_under_load_loses_no_issued_credential() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let state: PathBuf = dir.path().join("state");
    let log = dir.path().join("broker.log");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = Rng(SEED);
    let tally = Arc::new(Tally::default());
    let mut ready_times = Vec::new();
    let mut identities: Option<(ClientIdentity, ClientIdentity)> = None;
    let mut in_flight_at_kill = Vec::new();
    let mut left_over = 0;

    for run in 0..KILLS {
        let dev = start_dev(&state, &log);
        if run > 0 {
            ready_times.push(dev.ready_after);
        }
        // The dev CA persists in the state dir: SVIDs minted once serve every restart.
        let (agent, root) = &*identities.get_or_insert_with(|| {
            let ca = DevCa::load_or_create(&state, TRUST_DOMAIN).expect("dev CA");
            (
                identity(&ca, common::DEPLOY_AGENT),
                identity(&ca, common::ROOT),
            )
        });
        let delay = Duration::from_millis(rng.between(KILL_DELAY_MS.0, KILL_DELAY_MS.1));
        let killed = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let before = tally.received.lock().expect("lock").len();
        let dev = rt.block_on(async {
            left_over += give_back(&dev.grpc, root, agent).await;
            let channels =
                futures::future::join_all((0..CLIENTS).map(|_| channel(&dev.grpc, agent))).await;
            let tasks: Vec<_> = channels
                .into_iter()
                .map(|ch| {
                    tokio::spawn(load(
                        pb::credential_broker_client::CredentialBrokerClient::new(ch),
                        run,
                        killed.clone(),
                        in_flight.clone(),
                        tally.clone(),
                    ))
                })
                .collect();
            // The point of the test: a random moment while requests are in flight.
            tokio::time::sleep(delay).await;
            killed.store(true, Ordering::SeqCst);
            in_flight_at_kill.push(in_flight.load(Ordering::SeqCst));
            let mut dev = dev;
            dev.child.kill().expect("SIGKILL");
            tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(tasks))
                .await
                .expect("clients see the broker die")
                .into_iter()
                .for_each(|r| r.expect("client task"));
            dev
        });
        let status = wait_exit(dev, DRAIN_TIMEOUT);
        assert!(
            !status.success(),
            "run {run}: killed, not exited: {status:?}"
        );
        let got = tally.received.lock().expect("lock").len() - before;
        eprintln!(
            "run {run:2}: killed after {:3} ms with {} requests in flight; {got} credentials received",
            delay.as_millis(),
            in_flight_at_kill[run],
        );
    }

    // One clean start (recovery after the last kill): it still issues, under the same
    // load; then SIGTERM in the middle of it. The broker drains, signs a last checkpoint
    // over everything it answered, and exits 0.
    let dev = start_dev(&state, &log);
    ready_times.push(dev.ready_after);
    let survived = ready_times.len();
    let (agent, root) = identities.as_ref().expect("identities");
    let termed = Arc::new(AtomicBool::new(false));
    let before = tally.received.lock().expect("lock").len();
    let status = rt.block_on(async {
        left_over += give_back(&dev.grpc, root, agent).await;
        let channels =
            futures::future::join_all((0..CLIENTS).map(|_| channel(&dev.grpc, agent))).await;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = channels
            .into_iter()
            .map(|ch| {
                tokio::spawn(load(
                    pb::credential_broker_client::CredentialBrokerClient::new(ch),
                    KILLS,
                    termed.clone(),
                    in_flight.clone(),
                    tally.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(KILL_DELAY_MS.1)).await;
        termed.store(true, Ordering::SeqCst);
        let pid = dev.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(tasks))
            .await
            .expect("clients see the broker stop")
            .into_iter()
            .for_each(|r| r.expect("client task"));
        wait_exit(dev, DRAIN_TIMEOUT)
    });
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let during_term = tally.received.lock().expect("lock").len() - before;
    assert!(during_term > 0, "the recovered broker issued under load");

    let unexpected = tally.unexpected.lock().expect("lock").clone();
    assert!(
        unexpected.is_empty(),
        "errors while the broker was up: {unexpected:#?}"
    );
    let received = std::mem::take(&mut *tally.received.lock().expect("lock"));
    assert!(!received.is_empty(), "clients received credentials");
    assert!(
        in_flight_at_kill.iter().filter(|n| **n > 0).count() >= KILLS / 2,
        "kills landed while requests were in flight: {in_flight_at_kill:?}"
    );

    // What the clients hold: no lease id and no token twice.
    let mut ids = HashSet::new();
    let mut fps = HashSet::new();
    for r in &received {
        assert!(ids.insert(r.lease_id.clone()), "lease {} twice", r.lease_id);
        assert!(
            fps.insert(sha256_hex(&r.token)),
            "token of {} twice",
            r.lease_id
        );
    }

    // Reconcile against the ledger, read-only.
    let db = state.join("ledger.db");
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open ledger read-only");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    let leases: HashMap<String, String> = conn
        .prepare("SELECT id, credential_sha256 FROM leases")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("leases");
    let mut issued: HashMap<String, Vec<String>> = HashMap::new();
    let mut issued_fps: HashMap<String, usize> = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT seq, lease_id, body FROM audit_log WHERE kind = 'issue' ORDER BY seq")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .expect("query");
        for row in rows {
            let (seq, lease_id, body) = row.expect("row");
            let body: serde_json::Value = serde_json::from_str(&body).expect("body JSON");
            let Some(lease_id) = lease_id else {
                // A refused issuance names no lease and no credential.
                assert!(body.get("credential_sha256").is_none(), "entry {seq}");
                continue;
            };
            assert_eq!(body["lease_id"], lease_id.as_str(), "entry {seq}");
            let fp = body["credential_sha256"]
                .as_str()
                .unwrap_or_else(|| panic!("entry {seq} has no credential_sha256"))
                .to_owned();
            *issued_fps.entry(fp.clone()).or_default() += 1;
            issued.entry(lease_id).or_default().push(fp);
        }
    }
    for (id, fps) in &issued {
        assert_eq!(fps.len(), 1, "lease {id} has {} issue entries", fps.len());
        assert_eq!(
            leases.get(id),
            Some(&fps[0]),
            "lease {id}: issue entry and lease row agree"
        );
    }
    for (fp, n) in &issued_fps {
        assert_eq!(*n, 1, "credential {fp} issued {n} times");
    }
    for id in leases.keys() {
        assert!(issued.contains_key(id), "lease {id} without an issue entry");
    }
    for r in &received {
        let fp = sha256_hex(&r.token);
        assert_eq!(
            leases.get(&r.lease_id),
            Some(&fp),
            "received lease {} (run {}) has its lease row",
            r.lease_id,
            r.run
        );
        assert_eq!(
            issued.get(&r.lease_id),
            Some(&vec![fp]),
            "received lease {} (run {}) has its issue entry",
            r.lease_id,
            r.run
        );
    }
    let entries: i64 = conn
        .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
        .expect("count");
    let checkpoints: i64 = conn
        .query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))
        .expect("count");
    let last_checkpoint: i64 = conn
        .query_row("SELECT max(size) FROM checkpoints", [], |r| r.get(0))
        .expect("latest checkpoint");
    assert_eq!(
        last_checkpoint, entries,
        "the checkpoint signed at SIGTERM covers every entry, including answers drained after it"
    );
    drop(conn);
    let report = SqliteStore::verify_file(&db).expect("ledger verifies offline");
    assert_eq!(report.entries, entries as u64);

    let refused = tally.refused.load(Ordering::SeqCst);
    eprintln!(
        "kills survived: {survived}/{KILLS}; credentials received: {}; ledger entries: {entries} \
         ({checkpoints} checkpoints, {} leases, {} issued, {} left active by kills and given back); \
         refused under load: {refused}; requests cut by kills: {}; \
         restart-to-ready: max {:?}, median {:?}; total {:?}",
        received.len(),
        leases.len(),
        issued.len(),
        left_over,
        tally.cut.load(Ordering::SeqCst),
        ready_times.iter().max().expect("restarts"),
        median(&ready_times),
        t0.elapsed(),
    );
}
