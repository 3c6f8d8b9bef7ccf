//! The `spiffe-broker` command: the broker (`serve`, `dev`) and its clients.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod cli;

use cli::args::*;
use cli::error::CliError;
use cli::listing::ListOutput;

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
        /// Path of the TOML config: --config, else $SPIFFE_BROKER_CONFIG, else
        /// /etc/spiffe-broker/config.toml.
        #[arg(
            long,
            env = "SPIFFE_BROKER_CONFIG",
            default_value = "/etc/spiffe-broker/config.toml"
        )]
        config: PathBuf,
    },
    /// Run everything on the embedded default (dev CA, Workload API, SQLite, demo policy).
    Dev(DevArgs),
    /// Ask for a credential; prints JSON.
    Request(RequestArgs),
    /// Token exchange (RFC 8693): act for the subject of a token you were handed; the
    /// credential carries the verified chain (`act`) and can only narrow.
    Exchange(ExchangeArgs),
    /// Renew a lease you hold; prints the fresh credential as JSON.
    Renew {
        /// Lease id.
        #[arg(long)]
        lease: String,
        /// New lifetime, e.g. 10m.
        #[arg(long, value_parser = duration_arg)]
        ttl: Option<std::time::Duration>,
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
    Revoke(RevokeArgs),
    /// Operator locks: no issuance for an identity, prefix or profile until a time.
    Locks {
        #[command(subcommand)]
        command: Option<LockCommand>,
        #[command(flatten)]
        output: ListOutput,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List leases (platform admin).
    #[command(args_conflicts_with_subcommands = true)]
    Leases {
        #[command(subcommand)]
        command: Option<LeasesCommand>,
        /// Only this holder.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<LeaseStateArg>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// List backend revocations that keep failing instead (same as `leases backend --stuck`).
        #[arg(long)]
        stuck: bool,
        /// Show this lease and every lease derived from it by token exchange (its tree).
        #[arg(long, value_name = "LEASE")]
        tree: Option<String>,
        #[command(flatten)]
        output: ListOutput,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Keep credentials fresh on disk beside a workload (a sidecar or a systemd unit):
    /// request, write atomically, renew, re-request, release at shutdown.
    Agent {
        /// The helper's TOML config: --config, else $SPIFFE_BROKER_AGENT_CONFIG.
        #[arg(long, env = "SPIFFE_BROKER_AGENT_CONFIG")]
        config: PathBuf,
        /// Only check the config (and that every path can be written); ask for nothing.
        #[arg(long)]
        check: bool,
    },
    /// Sign in as a person (no SVID needed): through the broker's console and your OpenID
    /// Provider in a browser on this computer; approve, deny, requests, leases, revoke and
    /// audit then act as you. The session is kept in $XDG_CONFIG_HOME/spiffe-broker (0600).
    Login {
        /// Sign in through an OpenID Provider (the console's sign-in); the only way today.
        #[arg(long, required = true)]
        oidc: bool,
        /// The broker's console (its HTTP listener).
        #[arg(
            long,
            env = "SPIFFE_BROKER_CONSOLE",
            default_value = "http://127.0.0.1:8081"
        )]
        console: String,
        /// CA file for an https console (default: the platform's trust store).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// End the session `login` started, at the broker and here.
    Logout {
        /// CA file for an https console (default: the platform's trust store).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Approve an access request (approvers).
    Approve {
        /// Access request id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Deny an access request (approvers).
    Deny {
        /// Access request id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List access requests.
    Requests {
        /// Which requests.
        #[arg(long, value_enum, default_value_t = RequestFilter::ToReview)]
        filter: RequestFilter,
        #[command(flatten)]
        output: ListOutput,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The non-human identity inventory (platform admin).
    Inventory {
        #[command(flatten)]
        output: ListOutput,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Audit ledger tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Follow the audit log like a Certificate Transparency monitor: verify every new
    /// entry against the signed (and witnessed) checkpoint and report those that concern
    /// the watched identities, profiles or kinds, as JSON lines.
    Monitor(MonitorArgs),
    /// Run a transparency-log witness (C2SP tlog-witness): cosigns a log's checkpoints
    /// only when they extend what it cosigned before.
    Witness(WitnessArgs),
    /// Token signing key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print a shell completion script: `source <(spiffe-broker completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or with --out write one page per command into a directory.
    Man {
        /// Write spiffe-broker.1, spiffe-broker-serve.1, … here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `completion` and `man`: generated from the same definitions clap parses with.
fn generated_docs(command: &Command) -> Result<(), CliError> {
    use clap::CommandFactory;
    use std::io::Write as _;
    let mut cmd = Cli::command();
    // Written whole, so a closed pipe (`| head`) ends quietly.
    let mut text = Vec::new();
    match command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut cmd, "spiffe-broker", &mut text);
            let _ = std::io::stdout().write_all(&text);
            Ok(())
        }
        Command::Man { out: Some(dir) } => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| format!("{}: {e}", dir.display()).into())
        }
        Command::Man { out: None } => {
            clap_mangen::Man::new(cmd)
                .render(&mut text)
                .map_err(|e| format!("man page: {e}"))?;
            let _ = std::io::stdout().write_all(&text);
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    use cli::{admin, agent, audit, keys, policy, review, serve, witness, workload};
    match cli.command {
        Command::Serve { config } => serve::serve(config).await,
        Command::Dev(args) => serve::dev(args).await,
        Command::Request(a) => workload::request(a).await,
        Command::Exchange(a) => workload::exchange(a).await,
        Command::Renew { lease, ttl, conn } => workload::renew(lease, ttl, conn).await,
        Command::Release { lease, conn } => workload::release(lease, conn).await,
        Command::Agent { config, check } => agent::agent(config, check).await,
        Command::Login {
            console, ca_file, ..
        } => cli::login::login(console, ca_file).await,
        Command::Logout { ca_file } => cli::login::logout(ca_file).await,
        Command::Approve { id, reason, conn } => review::review(&conn, id, true, reason).await,
        Command::Deny { id, reason, conn } => review::review(&conn, id, false, reason).await,
        Command::Requests {
            filter,
            output,
            conn,
        } => review::requests(filter, output, conn).await,
        Command::Inventory { output, conn } => admin::inventory(output, conn).await,
        Command::Policy { command } => policy::policy_command(command).await,
        Command::Witness(a) => witness::witness(a).await,
        Command::Monitor(a) => witness::monitor(a).await,
        Command::Revoke(a) => admin::revoke(a).await,
        Command::Locks {
            command,
            output,
            conn,
        } => admin::locks(command, output, conn).await,
        Command::Leases {
            command: Some(LeasesCommand::Show { id, conn }),
            ..
        } => admin::lease_show(id, conn).await,
        Command::Leases {
            command:
                Some(LeasesCommand::Backend {
                    stuck,
                    output,
                    conn,
                }),
            ..
        } => admin::backend_revocations(&conn, stuck, output).await,
        Command::Leases {
            stuck: true,
            output,
            conn,
            ..
        } => admin::backend_revocations(&conn, true, output).await,
        Command::Leases {
            command: Some(LeasesCommand::ForceRemove { id, reason, conn }),
            ..
        } => admin::force_remove(id, reason, conn).await,
        Command::Leases {
            tree: Some(root),
            output,
            conn,
            ..
        } => admin::lease_tree(root, output, conn).await,
        Command::Leases {
            spiffe_id,
            state,
            limit,
            output,
            conn,
            ..
        } => admin::leases(spiffe_id, state, limit, output, conn).await,
        Command::Audit { command } => audit::audit_command(command).await,
        Command::Keys {
            command:
                KeysCommand::Init {
                    state_dir,
                    trust_domain,
                },
        } => keys::keys_init(state_dir, trust_domain),
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    state_dir,
                    publish_ahead,
                    retain,
                },
        } => keys::keys_rotate(state_dir, publish_ahead, retain),
        c @ (Command::Completion { .. } | Command::Man { .. }) => generated_docs(&c),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve { .. }
        | Command::Dev(DevArgs { command: None, .. })
        | Command::Witness(_)
        | Command::Agent { check: false, .. } => "info",
        _ => "warn",
    };
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        let logs = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
            );
        // The broker's own spans, exported once `[tracing]` starts the exporter: the RPC
        // span at INFO (the JSON logs carry its trace id), its steps at DEBUG (created for
        // this layer only, never formatted into logs).
        let spans = spiffe_broker::telemetry::OtlpLayer.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("spiffe_broker", tracing::Level::DEBUG),
        );
        tracing_subscriber::registry().with(logs).with(spans).init();
    }
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
            ExitCode::from(e.exit_code())
        }
    }
}
