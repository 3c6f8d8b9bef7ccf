//! Trust-bundle rotation under load without failed requests (reliability issue #9).
//!
//! A handful of clients issue the demo JWT profile over mTLS on reused connections, each
//! reconnecting only when its own Workload API source hands it a new SVID
//! ([`SvidChannel`]). Meanwhile the dev CA rotates as SPIRE's does:
//!
//! - (a) load on the original authority A;
//! - (b) B prepared: the bundle is A+B everywhere before anything is signed by B;
//! - (c) B activated: every SVID is re-issued from B, every client reconnects with it,
//!   and the broker presents a B-signed certificate;
//! - (d) A retired: the bundle is B alone.
//!
//! No request may fail in any phase. Afterwards an SVID A signed before the rotation is
//! refused (UNAUTHENTICATED, nothing issued), a client that trusts only A cannot reach the
//! broker, and the ledger verifies. Every wait is bounded polling of something the test
//! observes (a source's bundle, a probe's answer, a handshake), never a fixed sleep.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{gpu_request, DEPLOY_AGENT};
use rustls::pki_types::CertificateDer;
use spiffe::{SpiffeId, TrustDomain, X509Source};
use spiffe_broker::authn::{validate_x509_svid, StaticTrust, SvidRole};
use spiffe_broker::client::{self, ClientIdentity, SvidChannel};
use spiffe_broker::clock::{Clock as _, SystemClock};
use spiffe_broker::dev::{self, DevEnv, DevOptions, BROKER_ID, TRUST_DOMAIN};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::SqliteStore;
use spiffe_broker::workload::ca::{pem_certs, BUNDLE_FILE};
use tonic::Code;

/// Concurrent load clients.
const CLIENTS: usize = 6;
/// Successful issuances required in each phase (all clients together).
const MIN_OK_PER_PHASE: u64 = 60;
const PHASES: [&str; 4] = ["a: CA A", "b: A+B prepared", "c: B active", "d: A retired"];
/// Bound on every wait for an observable condition.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// Shared by the load clients and the test body.
struct Load {
    phase: AtomicUsize,
    ok: [AtomicU64; 4],
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// What one client reports.
#[derive(Default)]
struct ClientState {
    /// The leaf its open connection presented.
    leaf: Mutex<Vec<u8>>,
    reconnects: AtomicU64,
    ok: AtomicU64,
}

/// Polls `cond` until it holds; panics after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(POLL).await;
    }
}

fn authorities_of(source: &X509Source) -> Vec<Vec<u8>> {
    let td = TrustDomain::new(TRUST_DOMAIN).expect("trust domain");
    source
        .try_bundle_for_trust_domain(&td)
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect()
        })
        .unwrap_or_default()
}

fn ders(certs: &[CertificateDer<'static>]) -> Vec<Vec<u8>> {
    certs.iter().map(|c| c.as_ref().to_vec()).collect()
}

/// Whether `leaf` is an X.509-SVID that chains to `ca` alone.
fn signed_by(leaf: &[u8], ca: &CertificateDer<'static>) -> bool {
    let trust = StaticTrust::default().with_x509(TRUST_DOMAIN, vec![ca.clone()]);
    validate_x509_svid(
        &[CertificateDer::from(leaf.to_vec())],
        &trust,
        SystemClock.now(),
        SvidRole::Client,
    )
    .is_ok()
}

/// The certificates of the state dir's `bundle.pem`.
fn bundle_file(env: &DevEnv) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(env.state_dir.join(BUNDLE_FILE)).expect("bundle.pem");
    ders(&pem_certs(&text).expect("PEM"))
}

/// An authn probe that can never issue: an empty request is refused after authentication
/// (INVALID_ARGUMENT), so the answer says only whether the broker accepted the SVID.
async fn probe_accepted(channel: &tonic::transport::Channel) -> bool {
    let mut c = pb::credential_broker_client::CredentialBrokerClient::new(channel.clone());
    match c
        .issue_credential(pb::IssueCredentialRequest::default())
        .await
    {
        Err(s) if s.code() == Code::InvalidArgument => true,
        Err(s) if s.code() == Code::Unauthenticated => false,
        other => panic!("unexpected probe answer: {other:?}"),
    }
}

fn files_identity(
    svid: &spiffe_broker::workload::ca::MintedSvid,
    bundle: Vec<CertificateDer<'static>>,
) -> ClientIdentity {
    ClientIdentity::Files {
        chain: svid.chain.clone(),
        key: Arc::new(svid.key_pkcs8.to_vec()),
        bundle,
    }
}

fn leases(env: &DevEnv) -> i64 {
    let conn = rusqlite::Connection::open(env.state_dir.join("ledger.db")).expect("ledger");
    conn.query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
        .expect("count")
}

fn authn_failures(env: &DevEnv) -> i64 {
    let conn = rusqlite::Connection::open(env.state_dir.join("ledger.db")).expect("ledger");
    conn.query_row(
        "SELECT count(*) FROM audit_log WHERE json_extract(body, '$.kind') = 'authn_failure'",
        [],
        |r| r.get(0),
    )
    .expect("count")
}

/// One load client: issues the demo profile until told to stop, on one connection that
/// is replaced only when its own SVID changes. Every error is recorded as a failure.
async fn run_client(
    n: usize,
    addr: String,
    source: X509Source,
    load: Arc<Load>,
    me: Arc<ClientState>,
) {
    let fail = |what: String| {
        load.failures
            .lock()
            .expect("lock")
            .push(format!("client {n}: {what}"))
    };
    let mut ch = match SvidChannel::connect(&addr, BROKER_ID, source).await {
        Ok(c) => c,
        Err(e) => return fail(format!("connect: {e}")),
    };
    while !load.stop.load(Ordering::SeqCst) {
        let phase = load.phase.load(Ordering::SeqCst);
        let channel = match ch.channel().await {
            Ok(c) => c,
            Err(e) => {
                fail(format!("[{}] reconnect: {e}", PHASES[phase]));
                continue;
            }
        };
        *me.leaf.lock().expect("lock") = ch.leaf().to_vec();
        me.reconnects.store(ch.reconnects(), Ordering::SeqCst);
        let mut c = pb::credential_broker_client::CredentialBrokerClient::new(channel);
        match c.issue_credential(gpu_request(600)).await {
            Ok(_) => {
                load.ok[phase].fetch_add(1, Ordering::SeqCst);
                me.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(s) => fail(format!(
                "[{}] {:?}: {}",
                PHASES[phase],
                s.code(),
                s.message()
            )),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_trust_bundle_under_load_fails_no_request() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    // The wall clock: SVIDs are minted from it and nothing here waits for expiry.
    let env = dev::start(DevOptions {
        state_dir: dir.path().join("state"),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        svid_ttl: Duration::from_secs(3600),
        clock: Arc::new(SystemClock),
        // Sustained load is not what quotas are for: lift them.
        config: Some(Box::new(|demo: String| {
            demo.replace("max_active_leases = 100", "max_active_leases = 0")
                .replace("requests_per_minute = 600", "requests_per_minute = 0")
        })),
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await
    .expect("dev environment starts");
    let addr = env.grpc_addr.to_string();
    let agent = SpiffeId::new(DEPLOY_AGENT).expect("id");
    let ca_a = env.ca.ca_der();
    assert_eq!(ders(&env.ca.bundle()), vec![ca_a.to_vec()]);
    // Kept for the end: an SVID A signed before the rotation.
    let old_svid = env
        .ca
        .mint_x509_svid(&agent, Duration::from_secs(3600))
        .expect("mint");

    // (a) Load on A. Each client has its own source, so its own SVID.
    let load = Arc::new(Load {
        phase: AtomicUsize::new(0),
        ok: Default::default(),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let socket = format!("unix://{}", env.socket(DEPLOY_AGENT).display());
    let mut sources = Vec::new();
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let source = client::workload_source(Some(&socket))
            .await
            .expect("SVID from the Workload API");
        let state = Arc::new(ClientState::default());
        tasks.push(tokio::spawn(run_client(
            n,
            addr.clone(),
            source.clone(),
            load.clone(),
            state.clone(),
        )));
        sources.push(source);
        states.push(state);
    }
    let phase_done = |p: usize| {
        let load = load.clone();
        async move { load.ok[p].load(Ordering::SeqCst) >= MIN_OK_PER_PHASE }
    };
    wait_until("phase a has its successes", || phase_done(0)).await;
    assert!(states
        .iter()
        .all(|s| signed_by(&s.leaf.lock().expect("lock"), &ca_a)));

    // (b) Prepare B: trusted everywhere, signing nothing yet.
    load.phase.store(1, Ordering::SeqCst);
    let ca_b = env.ca.prepare().expect("prepare B");
    let a_and_b = vec![ca_a.to_vec(), ca_b.to_vec()];
    assert_eq!(ders(&env.ca.bundle()), a_and_b);
    assert_eq!(bundle_file(&env), a_and_b, "bundle.pem holds A and B");
    assert_eq!(env.ca.ca_der(), ca_a, "A still signs");
    wait_until("every client's source has the bundle A+B", || {
        let ok = sources.iter().all(|s| authorities_of(s) == a_and_b);
        async move { ok }
    })
    .await;
    // The broker trusts B: an SVID B signed (B is not active, so minted explicitly) is
    // accepted. The probe connection trusts A, which the broker still presents.
    let b_svid = env
        .ca
        .mint_x509_svid_by(&ca_b, &agent, Duration::from_secs(3600))
        .expect("mint by B");
    let b_probe = client::connect(
        &addr,
        BROKER_ID,
        &files_identity(&b_svid, vec![ca_a.clone()]),
    )
    .await
    .expect("probe connects");
    wait_until("the broker trusts B", || probe_accepted(&b_probe)).await;
    wait_until("phase b has its successes", || phase_done(1)).await;
    assert!(
        states
            .iter()
            .all(|s| signed_by(&s.leaf.lock().expect("lock"), &ca_a)),
        "B signs nothing before it is activated"
    );
    // (Each X509Source opens a second stream after its initial sync and the dev
    // Workload API mints per stream, so a client may have reconnected once already.)
    let reconnects_before_c: Vec<u64> = states
        .iter()
        .map(|s| s.reconnects.load(Ordering::SeqCst))
        .collect();

    // (c) Activate B: every SVID is re-issued from B.
    load.phase.store(2, Ordering::SeqCst);
    env.ca.activate(&ca_b).expect("activate B");
    assert_eq!(env.ca.ca_der(), ca_b);
    assert_eq!(
        ders(
            &pem_certs(&std::fs::read_to_string(env.state_dir.join("dev-ca.pem")).expect("pem"))
                .expect("PEM")
        ),
        vec![ca_b.to_vec()],
        "dev-ca.pem is the active authority"
    );
    wait_until("every client reconnected with a B-signed SVID", || {
        let ok = states
            .iter()
            .all(|s| signed_by(&s.leaf.lock().expect("lock"), &ca_b));
        async move { ok }
    })
    .await;
    let trusts_b_only = ClientIdentity::Anonymous {
        bundle: vec![ca_b.clone()],
    };
    wait_until("a new connection sees a broker certificate from B", || {
        let (addr, id) = (addr.clone(), trusts_b_only.clone());
        async move { client::connect(&addr, BROKER_ID, &id).await.is_ok() }
    })
    .await;
    let ok_at_reconnect: Vec<u64> = states.iter().map(|s| s.ok.load(Ordering::SeqCst)).collect();
    wait_until("every client succeeded on its B connection", || {
        let ok = states
            .iter()
            .zip(&ok_at_reconnect)
            .all(|(s, before)| s.ok.load(Ordering::SeqCst) > *before);
        async move { ok }
    })
    .await;
    wait_until("phase c has its successes", || phase_done(2)).await;

    // The old A-signed SVID is still trusted: the broker verifies its chain and remembers
    // it. The same connection must be refused once A is retired (a remembered chain counts
    // only under the bundle it was verified against).
    let a_probe = client::connect(
        &addr,
        BROKER_ID,
        &files_identity(&old_svid, vec![ca_a.clone(), ca_b.clone()]),
    )
    .await
    .expect("probe connects");
    assert!(
        probe_accepted(&a_probe).await,
        "an A-signed SVID is trusted while A is in the bundle"
    );

    // (d) Retire A: the bundle is B alone.
    load.phase.store(3, Ordering::SeqCst);
    let retired = env.ca.retire_inactive().expect("retire A");
    assert_eq!(ders(&retired), vec![ca_a.to_vec()]);
    let b_only = vec![ca_b.to_vec()];
    assert_eq!(ders(&env.ca.bundle()), b_only);
    assert_eq!(bundle_file(&env), b_only, "bundle.pem holds B alone");
    wait_until("every client's source has the bundle B", || {
        let ok = sources.iter().all(|s| authorities_of(s) == b_only);
        async move { ok }
    })
    .await;
    // The broker no longer trusts A: the old SVID's probe is refused on the connection
    // whose chain it had verified and remembered.
    wait_until("the broker no longer trusts A", || async {
        !probe_accepted(&a_probe).await
    })
    .await;
    wait_until("phase d has its successes", || phase_done(3)).await;

    load.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("client task");
    }
    let ok: Vec<u64> = load.ok.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let reconnects: Vec<u64> = states
        .iter()
        .map(|s| s.reconnects.load(Ordering::SeqCst))
        .collect();
    eprintln!(
        "successes per phase: {}; reconnects per client before activation: \
         {reconnects_before_c:?}, in all: {reconnects:?}",
        PHASES
            .iter()
            .zip(&ok)
            .map(|(p, n)| format!("[{p}] {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let failures = load.failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    for (p, n) in PHASES.iter().zip(&ok) {
        assert!(*n >= MIN_OK_PER_PHASE, "[{p}] only {n} successes");
    }
    assert!(
        reconnects
            .iter()
            .zip(&reconnects_before_c)
            .all(|(r, b)| r > b),
        "every client reconnected once B re-issued its SVID"
    );

    // (i) The SVID A signed before the rotation is refused, and nothing is issued for it.
    let (leases_before, failures_before) = (leases(&env), authn_failures(&env));
    let err = pb::credential_broker_client::CredentialBrokerClient::new(a_probe.clone())
        .issue_credential(gpu_request(600))
        .await
        .expect_err("an SVID of a retired authority is refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(leases(&env), leases_before, "nothing issued for it");
    assert_eq!(
        authn_failures(&env),
        failures_before + 1,
        "the refusal is in the ledger"
    );

    // (ii) A client that trusts only A cannot reach the broker any more.
    let trusts_a_only = ClientIdentity::Anonymous {
        bundle: vec![ca_a.clone()],
    };
    client::connect(&addr, BROKER_ID, &trusts_a_only)
        .await
        .expect_err("the broker's certificate no longer chains to A");

    // (iii) The ledger verifies end to end.
    drop((a_probe, b_probe));
    let report =
        SqliteStore::verify_file(&env.state_dir.join("ledger.db")).expect("the ledger verifies");
    let issued: u64 = ok.iter().sum();
    assert!(
        report.entries >= issued,
        "{} entries for {issued} issuances",
        report.entries
    );
    env.shutdown().await.expect("clean shutdown");
}
