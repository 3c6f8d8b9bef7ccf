//! The `spiffe-broker` command: the broker (`serve`, `dev`) and its clients.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::{parse_duration, rfc3339, SystemClock};
use spiffe_broker::config::Config;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::{dev, server};

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "spiffe-broker",
    version,
    about = "SPIFFE credential broker: SVID in, short-lived credential out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker from a config file.
    Serve {
        /// Path of the TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run everything on the embedded default (dev CA, Workload API, SQLite, demo policy).
    Dev(DevArgs),
    /// Ask for a credential; prints JSON.
    Request(RequestArgs),
    /// Renew a lease you hold; prints the fresh credential as JSON.
    Renew {
        /// Lease id.
        #[arg(long)]
        lease: String,
        /// New lifetime, e.g. 10m.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Give a lease back early.
    Release {
        /// Lease id.
        #[arg(long)]
        lease: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke leases (platform admin).
    Revoke {
        /// One lease.
        #[arg(
            long,
            conflicts_with = "spiffe_id",
            required_unless_present = "spiffe_id"
        )]
        lease: Option<String>,
        /// Every active lease of this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Why (recorded in the ledger).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List leases (platform admin); prints JSON lines.
    Leases {
        /// Only this holder.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only this state: active, released, revoked, expired.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Audit ledger tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Token signing key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the whole hash-chained ledger offline.
    Verify {
        /// The broker's state dir (reads STATE_DIR/ledger.db).
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new signing key current; the old one stays published as previous.
    /// Takes effect at the broker's next start.
    Rotate {
        /// The broker's state dir (keys in STATE_DIR/keys).
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    /// State directory (ledger, keys, dev CA, Workload API sockets).
    #[arg(long, default_value = "spiffe-broker-dev")]
    state_dir: PathBuf,
    /// gRPC (mTLS) listen address.
    #[arg(long, default_value = dev::DEFAULT_GRPC_ADDR)]
    grpc_addr: String,
    /// HTTP listen address.
    #[arg(long, default_value = dev::DEFAULT_HTTP_ADDR)]
    http_addr: String,
    /// Lifetime of dev X.509-SVIDs (rotated at half-life).
    #[arg(long, default_value = "1h")]
    svid_ttl: String,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Mint a test X.509-SVID from the dev CA: writes svid.pem, svid.key, bundle.pem.
    MintSvid {
        /// The SPIFFE ID to mint.
        spiffe_id: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The dev state dir holding the dev CA.
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
        /// Lifetime.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// How a client reaches the broker and proves who it is.
#[derive(Args)]
struct ConnArgs {
    /// Broker gRPC address.
    #[arg(long, env = "SPIFFE_BROKER_ADDR", default_value = dev::DEFAULT_GRPC_ADDR)]
    broker: String,
    /// The broker's expected SPIFFE ID.
    #[arg(long, env = "SPIFFE_BROKER_ID", default_value = dev::BROKER_ID)]
    broker_id: String,
    /// SVID certificate (PEM) instead of the Workload API.
    #[arg(long, requires_all = ["svid_key", "bundle"])]
    svid_cert: Option<PathBuf>,
    /// SVID private key (PKCS#8 PEM).
    #[arg(long, requires = "svid_cert")]
    svid_key: Option<PathBuf>,
    /// Trust bundle (PEM).
    #[arg(long, requires = "svid_cert")]
    bundle: Option<PathBuf>,
}

#[derive(Args)]
struct RequestArgs {
    /// Profile name.
    #[arg(long)]
    profile: String,
    /// A scope (repeat for several).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Lifetime, e.g. 10m.
    #[arg(long)]
    ttl: Option<String>,
    /// What you will do, e.g. submit-training.
    #[arg(long, requires = "intent_target")]
    intent_action: Option<String>,
    /// What you will do it to, e.g. queue/a100.
    #[arg(long, requires = "intent_action")]
    intent_target: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

fn fail(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

fn status_msg(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

async fn channel(conn: &ConnArgs) -> Result<tonic::transport::Channel, String> {
    let identity = match (&conn.svid_cert, &conn.svid_key, &conn.bundle) {
        (Some(c), Some(k), Some(b)) => ClientIdentity::from_files(c, k, b).map_err(fail)?,
        _ => ClientIdentity::Workload(client::workload_source(None).await.map_err(fail)?),
    };
    client::connect(&conn.broker, &conn.broker_id, &identity)
        .await
        .map_err(fail)
}

fn duration_pb(s: &Option<String>) -> Result<Option<prost_types::Duration>, String> {
    s.as_deref()
        .map(|t| {
            parse_duration(t).map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: 0,
            })
        })
        .transpose()
        .map_err(|e| format!("--ttl: {e}"))
}

fn lease_json(l: &pb::Lease) -> serde_json::Value {
    let t = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
    json!({
        "lease_id": l.id,
        "profile": l.profile,
        "spiffe_id": l.spiffe_id,
        "scopes": l.scopes,
        "audience": l.audience,
        "state": pb::LeaseState::try_from(l.state).map(|s| s.as_str_name().trim_start_matches("LEASE_STATE_").to_lowercase()).unwrap_or_default(),
        "issued_at": t(&l.issued_at),
        "expires_at": t(&l.expires_at),
        "max_expires_at": t(&l.max_expires_at),
        "renewals": l.renewals,
        "credential_sha256": l.credential_sha256,
        "ended_at": t(&l.ended_at),
        "end_reason": if l.end_reason.is_empty() { None } else { Some(&l.end_reason) },
        "intent": l.intent.as_ref().map(|i| json!({"action": i.action, "target": i.target})),
    })
}

fn issued_json(
    c: Option<pb::Credential>,
    l: Option<pb::Lease>,
    r: Option<pb::AuditReceipt>,
) -> serde_json::Value {
    let mut out = l.as_ref().map(lease_json).unwrap_or_else(|| json!({}));
    if let Some(pb::credential::Kind::Token(t)) = c.and_then(|c| c.kind) {
        out["token"] = json!(t.jwt);
        out["token_type"] = json!(t.token_type);
        out["key_id"] = json!(t.key_id);
    }
    if let Some(l) = &l {
        out["expires_at_unix"] = json!(l.expires_at.as_ref().map(|t| t.seconds));
    }
    if let Some(r) = r {
        out["receipt"] = json!({"sequence": r.sequence, "entry_hash": r.entry_hash});
    }
    out
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config).map_err(fail)?;
            let parts = server::assemble(&config, Arc::new(SystemClock))
                .await
                .map_err(fail)?;
            let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.grpc_addr))?;
            let http = tokio::net::TcpListener::bind(config.http_addr)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.http_addr))?;
            tracing::info!(grpc = %config.grpc_addr, http = %config.http_addr, spiffe_id = %parts.spiffe_id, "ready");
            server::run(parts, grpc, http, shutdown_signal())
                .await
                .map_err(fail)
        }
        Command::Dev(args) => match args.command {
            Some(DevCommand::MintSvid {
                spiffe_id,
                out,
                state_dir,
                ttl,
            }) => {
                let id =
                    spiffe::SpiffeId::new(&spiffe_id).map_err(|e| format!("{spiffe_id}: {e}"))?;
                let ttl = parse_duration(&ttl).map_err(|e| format!("--ttl: {e}"))?;
                let ca = spiffe_broker::workload::DevCa::load_or_create(
                    &state_dir,
                    id.trust_domain_name(),
                )
                .map_err(fail)?;
                let svid = ca.mint_x509_svid(&id, ttl).map_err(fail)?;
                std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
                std::fs::write(out.join("svid.pem"), &svid.cert_pem).map_err(fail)?;
                {
                    use std::io::Write as _;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(out.join("svid.key"))
                        .map_err(fail)?;
                    f.write_all(svid.key_pem.as_bytes()).map_err(fail)?;
                }
                std::fs::write(out.join("bundle.pem"), ca.ca_pem()).map_err(fail)?;
                out!(
                    "{}",
                    json!({"spiffe_id": id.to_string(), "out": out, "expires_at": rfc3339(spiffe_broker::clock::unix_seconds(svid.not_after))})
                );
                Ok(())
            }
            None => {
                let parse =
                    |s: &str, f: &str| s.parse().map_err(|_| format!("{f}: {s:?} is not IP:port"));
                let opts = dev::DevOptions {
                    state_dir: args.state_dir.clone(),
                    grpc_addr: parse(&args.grpc_addr, "--grpc-addr")?,
                    http_addr: parse(&args.http_addr, "--http-addr")?,
                    svid_ttl: parse_duration(&args.svid_ttl)
                        .map_err(|e| format!("--svid-ttl: {e}"))?,
                    clock: Arc::new(SystemClock),
                    config_overrides: String::new(),
                };
                let env = dev::start(opts).await.map_err(fail)?;
                let dir = std::fs::canonicalize(&env.state_dir).unwrap_or(env.state_dir.clone());
                out!("spiffe-broker dev");
                out!("  state dir:     {}", dir.display());
                out!(
                    "  gRPC (mTLS):   {}   broker id {}",
                    env.grpc_addr,
                    dev::BROKER_ID
                );
                out!(
                    "  HTTP:          http://{}   (discovery: /.well-known/openid-configuration)",
                    env.http_addr
                );
                out!("  trust bundle:  {}", dir.join("bundle.pem").display());
                out!("  workloads:");
                for id in dev::DEMO_IDS {
                    out!(
                        "    {id:<42} unix://{}",
                        dir.join("workloads")
                            .join(spiffe_broker::workload::socket_name(
                                &spiffe::SpiffeId::new(id).map_err(fail)?
                            ))
                            .display()
                    );
                }
                out!(
                    "  try: SPIFFE_ENDPOINT_SOCKET=unix://{}/workloads/deploy-agent.sock spiffe-broker request --profile gpu-scheduler-submit --scope job:submit --ttl 10m --intent-action submit-training --intent-target queue/a100",
                    dir.display()
                );
                out!("ready");
                shutdown_signal().await;
                env.shutdown().await.map_err(fail)
            }
        },
        Command::Request(a) => {
            let ch = channel(&a.conn).await?;
            let intent = match (a.intent_action, a.intent_target) {
                (Some(action), Some(target)) => Some(pb::Intent { action, target }),
                _ => None,
            };
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .issue_credential(pb::IssueCredentialRequest {
                    profile: a.profile,
                    scopes: a.scopes,
                    ttl: duration_pb(&a.ttl)?,
                    intent,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", issued_json(resp.credential, resp.lease, resp.receipt));
            Ok(())
        }
        Command::Renew { lease, ttl, conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .renew_lease(pb::RenewLeaseRequest {
                    lease_id: lease,
                    ttl: duration_pb(&ttl)?,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", issued_json(resp.credential, resp.lease, resp.receipt));
            Ok(())
        }
        Command::Release { lease, conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .release_lease(pb::ReleaseLeaseRequest { lease_id: lease })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", issued_json(None, resp.lease, resp.receipt));
            Ok(())
        }
        Command::Revoke {
            lease,
            spiffe_id,
            reason,
            conn,
        } => {
            let selector = match (lease, spiffe_id) {
                (Some(l), _) => pb::revoke_request::Selector::LeaseId(l),
                (None, Some(s)) => pb::revoke_request::Selector::SpiffeId(s),
                (None, None) => return Err("one of --lease or --spiffe-id is required".into()),
            };
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .revoke(pb::RevokeRequest {
                    selector: Some(selector),
                    reason,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!(
                "{}",
                json!({"revoked": resp.revoked_lease_ids, "receipt": resp.receipt.map(|r| json!({"sequence": r.sequence, "entry_hash": r.entry_hash}))})
            );
            Ok(())
        }
        Command::Leases {
            spiffe_id,
            state,
            limit,
            conn,
        } => {
            let state = match state.as_deref() {
                None => pb::LeaseState::Unspecified,
                Some("active") => pb::LeaseState::Active,
                Some("released") => pb::LeaseState::Released,
                Some("revoked") => pb::LeaseState::Revoked,
                Some("expired") => pb::LeaseState::Expired,
                Some(other) => return Err(format!("--state: unknown state {other:?}")),
            };
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .list_leases(pb::ListLeasesRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    state: state as i32,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            for l in &resp.leases {
                out!("{}", lease_json(l));
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { state_dir },
        } => {
            let path = state_dir.join("ledger.db");
            if !path.exists() {
                return Err(format!("no ledger at {}", path.display()));
            }
            let report =
                spiffe_broker::store::sqlite::SqliteStore::verify_file(&path).map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "ledger": report.path, "entries": report.entries, "head_hash": report.head_hash})
            );
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate { state_dir },
        } => {
            let ring =
                spiffe_broker::crypto::KeyRing::rotate(&state_dir.join("keys")).map_err(fail)?;
            out!("{}", serde_json::to_string(&ring.jwks()).map_err(fail)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve { .. } | Command::Dev(DevArgs { command: None, .. }) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Don't wait on background Workload API streams.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
