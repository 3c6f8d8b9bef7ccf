//! What every target validates against, built once per process.
//!
//! The dev CA's key material is committed under `fuzz/fixtures/dev-ca/` (test-only keys,
//! trusted nowhere) so the seeds in `fuzz/corpus/` — real SVIDs it signed — verify, and
//! the fuzzer explores the whole validation path, signature checks included. The clock
//! is fixed at `fuzz/fixtures/now` (written when the seeds were minted), so the seeds
//! never expire. `tests/it/fuzz_regressions.rs` (`regenerate_fuzz_corpus`, ignored) remints
//! all of it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use spiffe_broker::authn::{SpiffeAuthenticator, StaticTrust, TrustSource};
use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::clock::{from_unix_seconds, Clock};
use spiffe_broker::config::Config;
use spiffe_broker::dev::{demo_config, write_demo_policy, BROKER_ID, TRUST_DOMAIN};
use spiffe_broker::issuer::x509::{IssuingCa, X509Issuer};
use spiffe_broker::policy::CedarPolicy;
use spiffe_broker::workload::DevCa;

/// The dev CA certificate (PEM).
pub const CA_PEM: &str = include_str!("../fixtures/dev-ca/dev-ca.pem");
/// The dev CA key (PEM).
pub const CA_KEY: &str = include_str!("../fixtures/dev-ca/dev-ca.key");
/// The dev JWT-SVID signing key (PKCS#8 DER).
pub const JWT_KEY: &[u8] = include_bytes!("../fixtures/dev-ca/dev-jwt.key");
/// The audit log's verifier key (the seeds' checkpoints are signed with it).
pub const LOG_VKEY: &str = include_str!("../fixtures/log.vkey");
/// The fixed clock (Unix seconds).
pub const NOW: &str = include_str!("../fixtures/now");
/// JWT-SVID clock skew, as the demo config sets it.
pub const SKEW: Duration = Duration::from_secs(30);

/// A clock that never moves.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// Everything the targets validate against.
pub struct Fixture {
    /// The dev CA of `example.org` (X.509 and JWT authority).
    pub ca: DevCa,
    /// Its trust bundles.
    pub trust: Arc<StaticTrust>,
    /// The broker's authenticator over those bundles (with its verified-chain cache).
    pub authn: SpiffeAuthenticator,
    /// The fixed time.
    pub now: SystemTime,
    /// The demo config.
    pub config: Config,
    /// The demo Cedar policy.
    pub policy: CedarPolicy,
    /// An x509 backend with a fresh dev issuing CA.
    pub x509: X509Issuer,
    /// The audit log verifier key.
    pub log_vkey: VerifierKey,
}

/// The unix time of [`NOW`].
pub fn now_unix() -> i64 {
    NOW.trim()
        .parse()
        .expect("fuzz/fixtures/now holds Unix seconds")
}

/// The fixture, built on first use.
pub fn get() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build)
}

fn build() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).expect("mkdir");
    std::fs::write(ca_dir.join("dev-ca.pem"), CA_PEM).expect("write");
    std::fs::write(ca_dir.join("dev-ca.key"), CA_KEY).expect("write");
    std::fs::write(ca_dir.join("dev-jwt.key"), JWT_KEY).expect("write");
    let ca = DevCa::load_or_create(&ca_dir, TRUST_DOMAIN).expect("dev CA fixture loads");
    let trust = Arc::new(
        StaticTrust::default()
            .with_x509(TRUST_DOMAIN, vec![ca.ca_der().clone()])
            .with_jwt(TRUST_DOMAIN, ca.jwt_bundle()),
    );
    let now = from_unix_seconds(now_unix());
    let authn = SpiffeAuthenticator::new(
        trust.clone() as Arc<dyn TrustSource>,
        Arc::new(FixedClock(now)),
        BROKER_ID.to_owned(),
        SKEW,
    );

    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    write_demo_policy(dir.path()).expect("demo policy");
    let config = Config::from_toml(&demo_config(dir.path(), any, any)).expect("demo config parses");
    let policy = CedarPolicy::load(&config).expect("demo policy loads");
    let x509_cfg = IssuingCa::create_dev(dir.path()).expect("dev issuing CA");
    let x509 = X509Issuer::new(IssuingCa::load(&x509_cfg).expect("issuing CA loads"));
    let log_vkey = VerifierKey::parse(LOG_VKEY).expect("fuzz/fixtures/log.vkey parses");
    Fixture {
        ca,
        trust,
        authn,
        now,
        config,
        policy,
        x509,
        log_vkey,
    }
}
