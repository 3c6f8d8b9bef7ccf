//! `spiffe-broker dev`: the embedded default. A dev CA, the dev Workload API with one
//! socket per demo identity, SQLite in the state dir, the demo config, and the broker
//! itself, which gets its own SVID from the Workload API exactly as in `serve` mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spiffe::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::Config;
use crate::server::{self, ServeError};
use crate::workload::{DevCa, DevWorkloadApi};

/// The dev trust domain.
pub const TRUST_DOMAIN: &str = "example.org";
/// The broker's own SPIFFE ID in dev mode.
pub const BROKER_ID: &str = "spiffe://example.org/spiffe-broker";
/// The demo identities.
pub const DEMO_IDS: &[&str] = &[
    "spiffe://example.org/ci/deploy-agent",
    "spiffe://example.org/ml/model-runtime",
    "spiffe://example.org/gpu/provisioner",
    "spiffe://example.org/ops/alice",
    "spiffe://example.org/ops/bob",
    "spiffe://example.org/ops/root",
    "spiffe://example.org/gpu/scheduler",
];
/// Where the demo profiles reach Vault unless `--vault-addr` says otherwise.
pub const DEFAULT_VAULT_ADDR: &str = "http://127.0.0.1:8200";
/// Where the demo profiles reach STS unless `--aws-sts-endpoint` says otherwise.
pub const DEFAULT_STS_ENDPOINT: &str = "http://127.0.0.1:5000";
/// Default gRPC address (the CLI's default `--broker`).
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8443";
/// Default HTTP address.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8081";

/// The demo config; `@STATE_DIR@`, `@GRPC@`, `@HTTP@` and `@SOCKET@` are filled in.
pub const DEMO_CONFIG: &str = include_str!("../deploy/demo-config.toml");

/// A transformation of the rendered demo config text.
pub type ConfigEdit = Box<dyn FnOnce(String) -> String + Send>;

/// Options of a dev environment.
pub struct DevOptions {
    /// State directory.
    pub state_dir: PathBuf,
    /// gRPC listen address (port 0 picks one).
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (port 0 picks one).
    pub http_addr: SocketAddr,
    /// Lifetime of dev X.509-SVIDs (rotated at half-life).
    pub svid_ttl: Duration,
    /// The broker's clock.
    pub clock: Arc<dyn Clock>,
    /// Edits the rendered demo config before use (tests add identities, groups, quotas).
    pub config: Option<ConfigEdit>,
    /// Vault address for the demo's `vault` profile (default [`DEFAULT_VAULT_ADDR`]).
    pub vault_addr: Option<String>,
    /// STS endpoint for the demo's `aws_sts` profile (default [`DEFAULT_STS_ENDPOINT`]).
    pub aws_sts_endpoint: Option<String>,
}

/// A running dev environment.
pub struct DevEnv {
    /// State directory.
    pub state_dir: PathBuf,
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// The loaded config.
    pub config: Config,
    /// The dev CA. Its rotation steps (`prepare`, `activate`, `retire_inactive`) reach
    /// every Workload API stream, the broker's own included, at once.
    pub ca: Arc<DevCa>,
    /// The dev Workload API.
    pub workload_api: DevWorkloadApi,
    /// The broker core (tests drive the reaper through it).
    pub broker: Arc<Broker>,
    /// The token-signing keys (every issuer and the JWKS share them).
    pub keys: crate::crypto::KeyRing,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServeError>>,
}

impl DevEnv {
    /// The Workload API socket of a demo identity, e.g. `workloads/deploy-agent.sock`.
    pub fn socket(&self, spiffe_id: &str) -> PathBuf {
        self.workload_api
            .socket(spiffe_id)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Stops the broker and waits for it to drain.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        self.server
            .await
            .map_err(|e| ServeError(format!("server task: {e}")))?
    }
}

/// The demo Cedar schema.
pub const DEMO_SCHEMA: &str = include_str!("../policy/schema.cedarschema");
/// The demo Cedar policies.
pub const DEMO_POLICY: &str = include_str!("../policy/demo.cedar");

/// Writes the demo schema and policy into `STATE_DIR/policy/` unless already there
/// (an operator's edits survive restarts; `spiffe-broker policy check` validates them).
pub fn write_demo_policy(dir: &Path) -> Result<(), ServeError> {
    let p = dir.join("policy");
    std::fs::create_dir_all(&p)
        .map_err(|e| ServeError(format!("cannot create {}: {e}", p.display())))?;
    for (name, text) in [
        ("schema.cedarschema", DEMO_SCHEMA),
        ("demo.cedar", DEMO_POLICY),
    ] {
        let f = p.join(name);
        if !f.exists() {
            std::fs::write(&f, text)
                .map_err(|e| ServeError(format!("cannot write {}: {e}", f.display())))?;
        }
    }
    Ok(())
}

/// Renders the demo config for a state dir and addresses.
pub fn demo_config(state_dir: &Path, grpc: SocketAddr, http: SocketAddr) -> String {
    DEMO_CONFIG
        .replace("@VAULT_ADDR@", DEFAULT_VAULT_ADDR)
        .replace("@STS_ENDPOINT@", DEFAULT_STS_ENDPOINT)
        .replace("@STATE_DIR@", &state_dir.display().to_string())
        .replace("@GRPC@", &grpc.to_string())
        .replace("@HTTP@", &http.to_string())
        .replace(
            "@SOCKET@",
            &format!(
                "unix://{}",
                state_dir
                    .join("workloads")
                    .join("spiffe-broker.sock")
                    .display()
            ),
        )
}

/// Starts everything: CA, Workload API sockets, broker. Returns once the broker serves.
pub async fn start(opts: DevOptions) -> Result<DevEnv, ServeError> {
    let dir = &opts.state_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| ServeError(format!("cannot create {}: {e}", dir.display())))?;
    let ca =
        Arc::new(DevCa::load_or_create(dir, TRUST_DOMAIN).map_err(|e| ServeError(e.to_string()))?);
    // The CA rewrites this file at each rotation step (`DevCa::prepare` and the rest).
    std::fs::write(dir.join(crate::workload::ca::BUNDLE_FILE), ca.bundle_pem())
        .map_err(|e| ServeError(e.to_string()))?;
    let mut ids: Vec<SpiffeId> = DEMO_IDS
        .iter()
        .map(|s| SpiffeId::new(s).map_err(|e| ServeError(e.to_string())))
        .collect::<Result<_, _>>()?;
    let broker_id = SpiffeId::new(BROKER_ID).map_err(|e| ServeError(e.to_string()))?;
    // Stock gRPC clients (grpcio, grpc-go, grpc-java) check a host name before anything
    // else; SPIRE entries carry DNS names for the same reason.
    ca.set_dns_names(&broker_id, &["localhost"]);
    ids.push(broker_id);
    let workload_api =
        DevWorkloadApi::start(ca.clone(), &dir.join("workloads"), &ids, opts.svid_ttl)
            .map_err(|e| ServeError(format!("cannot start the dev Workload API: {e}")))?;

    let grpc = TcpListener::bind(opts.grpc_addr)
        .await
        .map_err(|e| ServeError(format!("cannot listen on {}: {e}", opts.grpc_addr)))?;
    let http = TcpListener::bind(opts.http_addr)
        .await
        .map_err(|e| ServeError(format!("cannot listen on {}: {e}", opts.http_addr)))?;
    let grpc_addr = grpc.local_addr().map_err(|e| ServeError(e.to_string()))?;
    let http_addr = http.local_addr().map_err(|e| ServeError(e.to_string()))?;
    write_demo_policy(dir)?;
    crate::issuer::x509::IssuingCa::create_dev(dir).map_err(|e| ServeError(e.to_string()))?;
    let mut demo = demo_config(dir, grpc_addr, http_addr);
    if let Some(a) = &opts.vault_addr {
        demo = demo.replace(DEFAULT_VAULT_ADDR, a);
    }
    if let Some(e) = &opts.aws_sts_endpoint {
        demo = demo.replace(DEFAULT_STS_ENDPOINT, e);
    }
    let text = match opts.config {
        Some(edit) => edit(demo),
        None => demo,
    };
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &text).map_err(|e| ServeError(e.to_string()))?;
    let mut config = Config::from_toml(&text).map_err(|e| ServeError(e.to_string()))?;
    // The demo people's sign-in exists only here: no config key turns it on in `serve`.
    if let Some(console) = config.console.as_mut() {
        console.dev_sign_in = true;
    }

    let parts = server::assemble(&config, Some(&config_path), opts.clock.clone()).await?;
    let broker = parts.broker.clone();
    let keys = parts.http.keys.clone();
    let (stop, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(server::run(parts, grpc, http, async move {
        let _ = stop_rx.wait_for(|v| *v).await;
    }));
    Ok(DevEnv {
        state_dir: dir.clone(),
        grpc_addr,
        http_addr,
        config,
        ca,
        workload_api,
        broker,
        keys,
        stop,
        server,
    })
}
