//! The `spiffe-broker` command: the broker (`serve`, `dev`) and its clients.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use spiffe_broker::checkpoint::VerifierKey;
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
    Revoke(RevokeArgs),
    /// Operator locks: no issuance for an identity, prefix or profile until a time.
    Locks {
        #[command(subcommand)]
        command: Option<LockCommand>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List leases (platform admin); prints JSON lines.
    #[command(args_conflicts_with_subcommands = true)]
    Leases {
        #[command(subcommand)]
        command: Option<LeasesCommand>,
        /// Only this holder.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only this state: active, released, revoked, expired.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// List backend revocations that keep failing instead (same as `leases backend --stuck`).
        #[arg(long)]
        stuck: bool,
        #[command(flatten)]
        conn: ConnArgs,
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
    /// List access requests; prints JSON lines.
    Requests {
        /// pending, to-review, mine, post-review.
        #[arg(long, default_value = "to-review")]
        filter: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The non-human identity inventory (platform admin); prints JSON lines.
    Inventory {
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
    /// Token signing key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum PolicyCommand {
    /// Validate the config and its Cedar policies against the schema; exits non-zero
    /// with the error location.
    Check {
        /// The broker config (its [policy] section names the schema and policy files).
        #[arg(long, default_value = "spiffe-broker-dev/config.toml")]
        config: PathBuf,
    },
    /// Dry run: what policy would decide, and why. With --config, offline for any
    /// --spiffe-id; otherwise asks the broker as the caller (ExplainDecision).
    Explain {
        /// Evaluate offline against this config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The requester to evaluate for (offline mode).
        #[arg(long, requires = "config")]
        spiffe_id: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Ask the broker to reload its policy (platform admin).
    Reload {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the whole log offline: entry encoding, hash chain, Merkle tree, every
    /// signed checkpoint; names the first bad entry.
    Verify {
        /// The broker's state dir (reads STATE_DIR/ledger.db).
        #[arg(long, default_value = "spiffe-broker-dev", conflicts_with = "export")]
        state_dir: PathBuf,
        /// Verify an export directory instead (from `audit export`).
        #[arg(long)]
        export: Option<PathBuf>,
        /// Verify the PostgreSQL ledger at this URL instead (opened like a replica; writes
        /// nothing; TLS: `?sslmode=verify-full&sslrootcert=CA.pem`). The key: --log-key, or
        /// STATE_DIR/keys/log.vkey.
        #[arg(
            long,
            env = "SPIFFE_BROKER_POSTGRES_URL",
            conflicts_with = "export",
            hide_env_values = true
        )]
        postgres_url: Option<String>,
        /// The log's verifier key, pinned out of band (a file, or the key itself).
        /// Default: STATE_DIR/keys/log.vkey, or the export's log.vkey.
        #[arg(long)]
        log_key: Option<String>,
    },
    /// Export the log (JSON Lines entries, signed checkpoints, the log key and a sample
    /// inclusion proof) for a SIEM or an auditor.
    Export {
        /// The broker's state dir.
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fetch the inclusion proof of a lease's issuance (or an entry) and verify it
    /// locally against the signed checkpoint.
    Proof {
        /// A lease id (a token's jti).
        #[arg(
            long,
            conflicts_with = "sequence",
            required_unless_present = "sequence"
        )]
        lease: Option<String>,
        /// An entry's sequence number.
        #[arg(long)]
        sequence: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create every key a broker needs in STATE_DIR/keys (token ES256 key, RS256 key for
    /// slurm profiles, audit-log key, revocation-feed key), to be shared by replicas
    /// (e.g. as a Kubernetes Secret). Existing keys are kept. Prints the JWKS.
    Init {
        /// Where to write (keys in STATE_DIR/keys, mode 0600).
        #[arg(long)]
        state_dir: PathBuf,
        /// The trust domain naming the log and feed keys (as the broker's SPIFFE ID's).
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
    },
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
    /// Vault address of the demo's `feature-db` profile.
    #[arg(long, default_value = dev::DEFAULT_VAULT_ADDR)]
    vault_addr: String,
    /// STS endpoint of the demo's `s3-datasets` profile.
    #[arg(long, default_value = dev::DEFAULT_STS_ENDPOINT)]
    aws_sts_endpoint: String,
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

/// Which leases to revoke: exactly one selector, optionally with a cut-off.
#[derive(Args)]
struct RevokeArgs {
    /// One lease.
    #[arg(long, group = "selector")]
    lease: Option<String>,
    /// Every active lease of this SPIFFE ID.
    #[arg(long, group = "selector")]
    spiffe_id: Option<String>,
    /// Every active lease under this SPIFFE ID prefix, e.g. spiffe://example.org/ci/.
    #[arg(long, group = "selector")]
    prefix: Option<String>,
    /// Every active lease of this profile.
    #[arg(long, group = "selector")]
    profile: Option<String>,
    /// Everything this approver approved.
    #[arg(long, group = "selector")]
    approver: Option<String>,
    /// The lease issued on this access request.
    #[arg(long, group = "selector")]
    access_request: Option<String>,
    /// Every active lease (needs --issued-before).
    #[arg(long, group = "selector", requires = "issued_before")]
    all: bool,
    /// Only leases issued before this instant (RFC 3339, e.g. 2026-11-26T12:00:00Z, or Unix seconds).
    #[arg(long)]
    issued_before: Option<String>,
    /// Show what would be revoked; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why (recorded in the ledger).
    #[arg(long, default_value = "revoked by operator")]
    reason: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Subcommand)]
enum LeasesCommand {
    /// One lease in full.
    Show {
        /// Lease id.
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Backend revocations still owed (e.g. Vault leases); `--stuck` only those failing
    /// repeatedly.
    Backend {
        /// Only those that failed at least 5 times.
        #[arg(long)]
        stuck: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Stop retrying the backend revocation of a lease (platform-admin; recorded).
    ForceRemove {
        /// Lease id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum LockCommand {
    /// List locks in force (the default).
    List,
    /// Lock issuance for a spiffe_id, prefix or profile.
    Add {
        /// spiffe_id, prefix or profile.
        #[arg(long)]
        kind: String,
        /// The SPIFFE ID, prefix or profile name.
        #[arg(long)]
        value: String,
        /// How long, e.g. 2h.
        #[arg(long = "for")]
        for_: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Remove a lock.
    Remove {
        /// Lock id.
        id: String,
        /// Why.
        #[arg(long, default_value = "lifted by operator")]
        reason: String,
    },
}

/// Parses RFC 3339 (UTC, `Z`) or Unix seconds.
fn parse_instant(s: &str, flag: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{flag}: {s:?} is not RFC 3339 (YYYY-MM-DDTHH:MM:SSZ) or Unix seconds");
    // Parsed by `time`; only the one form `rfc3339` writes (UTC, `Z`, whole seconds) is
    // taken, as before: an offset or a fraction would make the echoed instant differ.
    match spiffe_broker::clock::parse_rfc3339(s) {
        Some(t) if rfc3339(t) == s => Ok(t),
        _ => Err(bad()),
    }
}

/// What is asked for (shared by `request` and `policy explain`).
#[derive(Args)]
struct SpecArgs {
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
    /// Digest of the artifact concerned, e.g. sha256:….
    #[arg(long, requires = "intent_action")]
    artifact_digest: Option<String>,
    /// Change ticket.
    #[arg(long, requires = "intent_action")]
    ticket: Option<String>,
    /// Why (mandatory for --break-glass).
    #[arg(long, requires = "intent_action")]
    justification: Option<String>,
    /// On whose behalf (repeat for a delegation chain, nearest first).
    #[arg(long = "on-behalf-of", requires = "intent_action")]
    on_behalf_of: Vec<String>,
    /// Break-glass: self-approve with --justification; capped TTL; reviewed afterwards.
    #[arg(long)]
    break_glass: bool,
}

impl SpecArgs {
    fn to_pb(&self) -> Result<pb::IssueCredentialRequest, String> {
        let intent = match (&self.intent_action, &self.intent_target) {
            (Some(action), Some(target)) => Some(pb::Intent {
                action: action.clone(),
                target: target.clone(),
                artifact_digest: self.artifact_digest.clone().unwrap_or_default(),
                ticket: self.ticket.clone().unwrap_or_default(),
                justification: self.justification.clone().unwrap_or_default(),
                on_behalf_of: self.on_behalf_of.clone(),
            }),
            _ => None,
        };
        Ok(pb::IssueCredentialRequest {
            profile: self.profile.clone(),
            scopes: self.scopes.clone(),
            ttl: duration_pb(&self.ttl)?,
            intent,
            break_glass: self.break_glass,
            access_request_id: String::new(),
            idempotency_key: String::new(),
            csr: Vec::new(),
        })
    }
}

#[derive(Args)]
struct RequestArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// If approval is required, wait until the request is decided, then print the credential.
    #[arg(long)]
    wait: bool,
    /// Redeem this approved access request (send the same request as approved).
    #[arg(long)]
    access_request: Option<String>,
    /// Idempotency key (22+ random characters): retrying with it returns the same credential.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// For x509 profiles: a PKCS#10 CSR file (PEM or DER); your private key stays with you.
    #[arg(long)]
    csr: Option<std::path::PathBuf>,
    /// `json` (default): the lease and credential; `env`: shell `export` lines
    /// (AWS_* for cloud credentials, the secret's fields upper-cased for Vault, or
    /// SPIFFE_BROKER_TOKEN / SPIFFE_BROKER_CERT_CHAIN).
    #[arg(long, default_value = "json")]
    output: String,
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
        "intent": l.intent.as_ref().map(intent_json),
        "backend": if l.backend.is_empty() { None } else { Some(&l.backend) },
        "backend_handle": if l.backend_handle.is_empty() { None } else { Some(&l.backend_handle) },
    })
}

fn state_name(state: i32) -> String {
    pb::AccessRequestState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ACCESS_REQUEST_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn access_request_json(r: &pb::AccessRequest) -> serde_json::Value {
    let t = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "requester": r.requester,
        "profile": r.profile,
        "scopes": r.scopes,
        "intent": r.intent.as_ref().map(intent_json),
        "approver_group": r.approver_group,
        "threshold": r.threshold,
        "approvals": r.approvals,
        "created_at": t(&r.created_at),
        "expires_at": t(&r.expires_at),
        "break_glass": r.break_glass,
        "post_review": if r.post_review.is_empty() { None } else { Some(&r.post_review) },
        "lease_id": if r.lease_id.is_empty() { None } else { Some(&r.lease_id) },
        "reviews": r.reviews.iter().map(|v| json!({
            "reviewer": v.reviewer, "approve": v.approve, "reason": v.reason, "post_review": v.post_review,
        })).collect::<Vec<_>>(),
    })
}

fn intent_json(i: &pb::Intent) -> serde_json::Value {
    let mut v = json!({"action": i.action, "target": i.target});
    for (k, val) in [
        ("artifact_digest", &i.artifact_digest),
        ("ticket", &i.ticket),
        ("justification", &i.justification),
    ] {
        if !val.is_empty() {
            v[k] = json!(val);
        }
    }
    if !i.on_behalf_of.is_empty() {
        v["on_behalf_of"] = json!(i.on_behalf_of);
    }
    v
}

async fn review(conn: &ConnArgs, id: String, approve: bool, reason: String) -> Result<(), String> {
    let ch = channel(conn).await?;
    let resp = pb::approvals_client::ApprovalsClient::new(ch)
        .review_access_request(pb::ReviewAccessRequestRequest {
            id,
            approve,
            reason,
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    let r = resp
        .access_request
        .ok_or("no access request in the response")?;
    out!("{}", access_request_json(&r));
    Ok(())
}

fn explanation_json(e: &pb::ExplainDecisionResponse) -> serde_json::Value {
    json!({
        "decision": e.decision,
        "determining_policies": e.determining_policies,
        "reason": if e.reason.is_empty() { None } else { Some(&e.reason) },
        "violations": e.violations,
        "missing_approvals": (e.decision == "require_approval").then(|| json!({
            "group": e.approver_group,
            "required": e.approvals_required,
            "present": e.approvals_present,
            "eligible": e.eligible_approvers,
        })),
        "granted_scopes": e.granted_scopes,
        "granted_ttl": e.granted_ttl.as_ref().map(|d| spiffe_broker::clock::format_duration(Duration::from_secs(d.seconds.max(0) as u64))),
        "policy_hash": e.policy_hash,
    })
}

fn load_vkey(
    arg: &Option<String>,
    default: &std::path::Path,
) -> Result<Option<VerifierKey>, String> {
    let text = match arg {
        Some(a) if std::path::Path::new(a).exists() => std::fs::read_to_string(a).map_err(fail)?,
        Some(a) => a.clone(),
        None if default.exists() => std::fs::read_to_string(default).map_err(fail)?,
        None => return Ok(None),
    };
    VerifierKey::parse(&text)
        .map(Some)
        .map_err(|e| format!("log key: {e}"))
}

async fn audit_command(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Verify {
            export: Some(dir),
            log_key,
            ..
        } => {
            let vkey = load_vkey(&log_key, &dir.join("log.vkey"))?;
            let r =
                spiffe_broker::store::export::verify_export(&dir, vkey.as_ref()).map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "export": dir, "entries": r.entries, "head_hash": r.head_hash, "root": r.root, "checkpoints_verified": r.checkpoints, "latest_checkpoint": r.latest_checkpoint})
            );
            Ok(())
        }
        AuditCommand::Verify {
            postgres_url: Some(url),
            state_dir,
            log_key,
            ..
        } => {
            let vkey = load_vkey(&log_key, &state_dir.join("keys").join("log.vkey"))?
                .ok_or("no log key: pass --log-key (the broker writes STATE_DIR/keys/log.vkey)")?;
            let ledger = spiffe_broker::config::LedgerConfig {
                commit_timeout: std::time::Duration::from_secs(30),
                busy_timeout: std::time::Duration::from_secs(5),
                max_batch: 1,
                postgres_sslmode: None,
                postgres_ca_file: None,
            };
            let server = spiffe_broker::config::postgres::redact(&url);
            let store = tokio::task::spawn_blocking(move || {
                spiffe_broker::store::PostgresStore::open(
                    &url,
                    &ledger,
                    Arc::new(spiffe_broker::metrics::Metrics::new()),
                )
            })
            .await
            .map_err(fail)?
            .map_err(fail)?;
            let r = spiffe_broker::store::verify_store(&store, &vkey)
                .await
                .map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "ledger": server, "entries": r.entries, "head_hash": r.head_hash, "root": r.root, "checkpoints_verified": r.checkpoints, "latest_checkpoint": r.latest_checkpoint})
            );
            Ok(())
        }
        AuditCommand::Verify {
            state_dir, log_key, ..
        } => {
            let path = state_dir.join("ledger.db");
            if !path.exists() {
                return Err(format!("no ledger at {}", path.display()));
            }
            let vkey = load_vkey(&log_key, &state_dir.join("keys").join("log.vkey"))?
                .ok_or("no log key: pass --log-key (the broker writes STATE_DIR/keys/log.vkey)")?;
            let v = spiffe_broker::store::sqlite::SqliteStore::verify_file_with(&path, &vkey)
                .map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "ledger": v.path, "entries": v.entries, "head_hash": v.head_hash, "root": v.report.root, "checkpoints_verified": v.report.checkpoints, "latest_checkpoint": v.report.latest_checkpoint})
            );
            Ok(())
        }
        AuditCommand::Export { state_dir, out } => {
            let vkey = std::fs::read_to_string(state_dir.join("keys").join("log.vkey"))
                .map_err(|e| format!("{}: {e}", state_dir.join("keys/log.vkey").display()))?;
            let s = spiffe_broker::store::export::export(&state_dir.join("ledger.db"), &vkey, &out)
                .map_err(fail)?;
            out!(
                "{}",
                json!({"ok": true, "out": s.dir, "entries": s.entries, "checkpoints": s.checkpoints})
            );
            Ok(())
        }
        AuditCommand::Proof {
            lease,
            sequence,
            conn,
        } => {
            use pb::get_inclusion_proof_request::Entry;
            let entry = match (lease, sequence) {
                (Some(l), _) => Entry::LeaseId(l),
                (None, Some(n)) => Entry::Sequence(n),
                (None, None) => return Err("one of --lease or --sequence is required".into()),
            };
            let ch = channel(&conn).await?;
            let mut admin = pb::admin_client::AdminClient::new(ch);
            let p = admin
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    entry: Some(entry),
                    tree_size: 0,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            // Verify locally: the note's signature with the log key, then the path.
            let key = http_log_key(&conn).await;
            let cp_ok = key.as_ref().map(|k| {
                k.verify(&p.checkpoint)
                    .map(|c| c.size == p.tree_size && hex::encode(c.root) == p.root_hash)
            });
            let hash = |h: &str| -> Result<[u8; 32], String> {
                hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| "bad hash in proof".to_string())
            };
            let path = p
                .proof
                .iter()
                .map(|h| hash(h))
                .collect::<Result<Vec<_>, _>>()?;
            let leaf = spiffe_broker::merkle::leaf_hash(p.entry.as_bytes());
            let included = hex::encode(leaf) == p.leaf_hash
                && spiffe_broker::merkle::verify_inclusion(
                    &leaf,
                    p.leaf_index,
                    p.tree_size,
                    &path,
                    &hash(&p.root_hash)?,
                )
                .is_ok();
            out!(
                "{}",
                json!({
                    "included": included,
                    "checkpoint_signature_ok": cp_ok.as_ref().map(|r| matches!(r, Ok(true))),
                    "sequence": p.sequence,
                    "leaf_index": p.leaf_index,
                    "tree_size": p.tree_size,
                    "root_hash": p.root_hash,
                    "entry": serde_json::from_str::<serde_json::Value>(&p.entry).unwrap_or_default(),
                    "checkpoint": p.checkpoint,
                })
            );
            if included {
                Ok(())
            } else {
                Err("the inclusion proof does not verify".into())
            }
        }
    }
}

/// The log key from the broker's GetCheckpoint (an auditor should pin it instead).
async fn http_log_key(conn: &ConnArgs) -> Option<VerifierKey> {
    let ch = channel(conn).await.ok()?;
    let cp = pb::admin_client::AdminClient::new(ch)
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .ok()?
        .into_inner();
    VerifierKey::parse(&cp.log_key).ok()
}

async fn policy_command(command: PolicyCommand) -> Result<(), String> {
    match command {
        PolicyCommand::Check { config } => {
            let c = Config::load(&config).map_err(fail)?;
            let p = spiffe_broker::policy::CedarPolicy::load(&c)
                .map_err(|e| format!("policy refused:\n{e}"))?;
            use spiffe_broker::policy::Policy as _;
            out!(
                "{}",
                json!({"ok": true, "config": config, "schema": c.policy.schema, "files": c.policy.files, "policy_hash": p.hash()})
            );
            Ok(())
        }
        PolicyCommand::Explain {
            config: Some(config),
            spiffe_id,
            spec,
            ..
        } => {
            let c = Config::load(&config).map_err(fail)?;
            let p = spiffe_broker::policy::CedarPolicy::load(&c)
                .map_err(|e| format!("policy refused:\n{e}"))?;
            let id = spiffe_id.ok_or("--spiffe-id is required with --config")?;
            let id = spiffe::SpiffeId::new(&id).map_err(|e| format!("--spiffe-id: {e}"))?;
            let req = spiffe_broker::api::parse_issue_request(&spec.to_pb()?).map_err(fail)?;
            use spiffe_broker::clock::Clock as _;
            let ctx = spiffe_broker::policy::RequestContext {
                now: SystemClock.unix_seconds(),
                auth_method: spiffe_broker::authn::AuthMethod::X509Svid,
                break_glass: spec.break_glass,
                approvals: Vec::new(),
            };
            let e = spiffe_broker::broker::explain_with(&p, &id, &req, &ctx);
            out!(
                "{}",
                explanation_json(&spiffe_broker::api::explanation_to_pb(&e))
            );
            Ok(())
        }
        PolicyCommand::Explain {
            config: None,
            spec,
            conn,
            ..
        } => {
            let ch = channel(&conn).await?;
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .explain_decision(pb::ExplainDecisionRequest {
                    request: Some(spec.to_pb()?),
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", explanation_json(&resp));
            Ok(())
        }
        PolicyCommand::Reload { conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .reload_policy(pb::ReloadPolicyRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", json!({"ok": true, "policy_hash": resp.policy_hash}));
            Ok(())
        }
    }
}

fn issued_json(
    c: Option<pb::Credential>,
    l: Option<pb::Lease>,
    r: Option<pb::AuditReceipt>,
    ar: Option<pb::AccessRequest>,
) -> serde_json::Value {
    let mut out = l.as_ref().map(lease_json).unwrap_or_else(|| json!({}));
    if let Some(c) = c {
        out["credential_expires_at_unix"] = json!(c.expires_at.as_ref().map(|t| t.seconds));
        if !c.backend_handle.is_empty() {
            out["backend_handle"] = json!(c.backend_handle);
        }
        match c.kind {
            Some(pb::credential::Kind::Token(t)) => {
                out["credential_kind"] = json!("token");
                out["token"] = json!(t.jwt);
                out["token_type"] = json!(t.token_type);
                out["key_id"] = json!(t.key_id);
            }
            Some(pb::credential::Kind::Certificate(cert)) => {
                out["credential_kind"] = json!("certificate");
                out["certificate_chain_pem"] = json!(cert.chain_pem);
                out["serial"] = json!(cert.serial);
            }
            Some(pb::credential::Kind::Secret(sec)) => {
                out["credential_kind"] = json!("secret");
                out["secret"] = json!(sec.data);
            }
            None => {}
        }
    }
    if let Some(l) = &l {
        out["expires_at_unix"] = json!(l.expires_at.as_ref().map(|t| t.seconds));
    }
    if let Some(r) = r {
        out["receipt"] = json!({"sequence": r.sequence, "entry_hash": r.entry_hash});
    }
    if let Some(ar) = ar {
        out["access_request"] = access_request_json(&ar);
    }
    out
}

async fn backend_revocations(conn: &ConnArgs, stuck: bool) -> Result<(), String> {
    let ch = channel(conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_backend_revocations(pb::ListBackendRevocationsRequest {
            min_attempts: if stuck {
                spiffe_broker::broker::STUCK_AFTER_ATTEMPTS
            } else {
                0
            },
            page_size: 1000,
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    for r in &resp.revocations {
        out!(
            "{}",
            json!({
                "lease_id": r.lease_id, "backend": r.backend, "backend_handle": r.backend_handle,
                "queued_at_unix": r.queued_at.as_ref().map(|t| t.seconds),
                "attempts": r.attempts,
                "next_attempt_at_unix": r.next_attempt_at.as_ref().map(|t| t.seconds),
                "last_error": r.last_error,
            })
        );
    }
    Ok(())
}

/// `export NAME='value'` lines for a credential (`--output env`).
fn env_lines(c: Option<&pb::Credential>) -> Result<String, String> {
    let c = c.ok_or("no credential in the answer")?;
    let quote = |v: &str| format!("'{}'", v.replace('\'', r"'\''"));
    let mut lines = Vec::new();
    match &c.kind {
        Some(pb::credential::Kind::Token(t)) => {
            lines.push(format!("export SPIFFE_BROKER_TOKEN={}", quote(&t.jwt)));
        }
        Some(pb::credential::Kind::Certificate(cert)) => {
            lines.push(format!(
                "export SPIFFE_BROKER_CERT_CHAIN={}",
                quote(&cert.chain_pem)
            ));
        }
        Some(pb::credential::Kind::Secret(sec)) => {
            for (k, v) in &sec.data {
                let name: String = k
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_alphanumeric() {
                            ch.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                lines.push(format!("export {name}={}", quote(v)));
            }
            if c.backend == "aws_sts" {
                if let Some(t) = &c.expires_at {
                    lines.push(format!(
                        "export AWS_CREDENTIAL_EXPIRATION={}",
                        quote(&spiffe_broker::clock::rfc3339(t.seconds))
                    ));
                }
            }
        }
        None => return Err("the answer carries no credential".into()),
    }
    Ok(lines.join("\n"))
}

/// SIGHUP reloads the policy; a bad policy is refused and the old one stays in force.
fn reload_on_sighup(broker: Arc<spiffe_broker::broker::Broker>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match broker.reload_policy(None).await {
                Ok(hash) => tracing::info!(policy_hash = %hash, "SIGHUP: policy reloaded"),
                Err(e) => tracing::warn!(error = %e, "SIGHUP: policy reload refused"),
            }
        }
    });
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
        Command::Serve { config: path } => {
            let config = Config::load(&path).map_err(fail)?;
            let parts = server::assemble(&config, Some(&path), Arc::new(SystemClock))
                .await
                .map_err(fail)?;
            reload_on_sighup(parts.broker.clone());
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
                    config: None,
                    vault_addr: Some(args.vault_addr.clone()),
                    aws_sts_endpoint: Some(args.aws_sts_endpoint.clone()),
                };
                let env = dev::start(opts).await.map_err(fail)?;
                reload_on_sighup(env.broker.clone());
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
            let mut req = a.spec.to_pb()?;
            req.access_request_id = a.access_request.clone().unwrap_or_default();
            req.idempotency_key = a.idempotency_key.clone().unwrap_or_default();
            if let Some(path) = &a.csr {
                req.csr = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let env = match a.output.as_str() {
                "json" => false,
                "env" => true,
                other => return Err(format!("--output: {other:?} is not json or env")),
            };
            let ch = channel(&a.conn).await?;
            let mut client = pb::credential_broker_client::CredentialBrokerClient::new(ch);
            let resp = client
                .issue_credential(req.clone())
                .await
                .map_err(status_msg)?
                .into_inner();
            let Some(pending) = resp
                .access_request
                .clone()
                .filter(|_| resp.credential.is_none())
            else {
                if env {
                    out!("{}", env_lines(resp.credential.as_ref())?);
                    return Ok(());
                }
                out!(
                    "{}",
                    issued_json(
                        resp.credential,
                        resp.lease,
                        resp.receipt,
                        resp.access_request
                    )
                );
                return Ok(());
            };
            if !a.wait {
                out!(
                    "{}",
                    json!({"status": "pending", "access_request": access_request_json(&pending)})
                );
                return Ok(());
            }
            eprintln!(
                "waiting for {} approval(s) from {} on access request {} …",
                pending.threshold, pending.approver_group, pending.id
            );
            let mut stream = client
                .watch_access_request(pb::GetAccessRequestRequest {
                    id: pending.id.clone(),
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            let mut last = pending;
            while let Some(next) = stream.message().await.map_err(status_msg)? {
                last = next;
                if last.state != pb::AccessRequestState::Pending as i32 {
                    break;
                }
            }
            if last.state != pb::AccessRequestState::Approved as i32 {
                return Err(format!(
                    "access request {} ended {}",
                    last.id,
                    state_name(last.state)
                ));
            }
            req.access_request_id = last.id.clone();
            let resp = client
                .issue_credential(req)
                .await
                .map_err(status_msg)?
                .into_inner();
            if env {
                out!("{}", env_lines(resp.credential.as_ref())?);
                return Ok(());
            }
            out!(
                "{}",
                issued_json(
                    resp.credential,
                    resp.lease,
                    resp.receipt,
                    resp.access_request
                )
            );
            Ok(())
        }
        Command::Approve { id, reason, conn } => review(&conn, id, true, reason).await,
        Command::Deny { id, reason, conn } => review(&conn, id, false, reason).await,
        Command::Requests { filter, conn } => {
            use pb::list_access_requests_request::Filter;
            let filter = match filter.as_str() {
                "pending" => Filter::Pending,
                "to-review" => Filter::ToReview,
                "mine" => Filter::Mine,
                "post-review" => Filter::AwaitingPostReview,
                other => {
                    return Err(format!(
                    "--filter: unknown filter {other:?} (pending, to-review, mine, post-review)"
                ))
                }
            };
            let ch = channel(&conn).await?;
            let resp = pb::approvals_client::ApprovalsClient::new(ch)
                .list_access_requests(pb::ListAccessRequestsRequest {
                    filter: filter as i32,
                    page_size: 0,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            for r in &resp.access_requests {
                out!("{}", access_request_json(r));
            }
            Ok(())
        }
        Command::Inventory { conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .list_identities(pb::ListIdentitiesRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            for i in &resp.identities {
                let t =
                    |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
                out!(
                    "{}",
                    json!({
                        "spiffe_id": i.spiffe_id,
                        "registered": i.registered,
                        "owner": i.owner,
                        "environment": i.environment,
                        "roles": i.roles,
                        "approver_groups": i.approver_groups,
                        "may": i.paths.iter().map(|p| json!({
                            "action": p.action, "resource": p.resource, "policy": p.policy,
                            "conditional": p.conditional,
                            "approvals": (p.approvals > 0).then(|| json!({"group": p.approval_group, "count": p.approvals})),
                        })).collect::<Vec<_>>(),
                        "active_leases": i.active_leases,
                        "issued": i.issued,
                        "denied": i.denied,
                        "last_seen": t(&i.last_seen),
                        "last_issued": t(&i.last_issued),
                        "flags": i.flags,
                    })
                );
            }
            Ok(())
        }
        Command::Policy { command } => policy_command(command).await,
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
            out!(
                "{}",
                issued_json(resp.credential, resp.lease, resp.receipt, None)
            );
            Ok(())
        }
        Command::Release { lease, conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .release_lease(pb::ReleaseLeaseRequest { lease_id: lease })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!("{}", issued_json(None, resp.lease, resp.receipt, None));
            Ok(())
        }
        Command::Revoke(a) => {
            use pb::revoke_request::Selector;
            let selector = if let Some(l) = a.lease {
                Selector::LeaseId(l)
            } else if let Some(s) = a.spiffe_id {
                Selector::SpiffeId(s)
            } else if let Some(p) = a.prefix {
                Selector::SpiffeIdPrefix(p)
            } else if let Some(p) = a.profile {
                Selector::Profile(p)
            } else if let Some(ap) = a.approver {
                Selector::Approver(ap)
            } else if let Some(r) = a.access_request {
                Selector::AccessRequestId(r)
            } else if a.all {
                Selector::All(true)
            } else {
                return Err("a selector is required (see --help)".into());
            };
            let issued_before = a
                .issued_before
                .as_deref()
                .map(|t| parse_instant(t, "--issued-before"))
                .transpose()?;
            let ch = channel(&a.conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .revoke(pb::RevokeRequest {
                    selector: Some(selector),
                    issued_before: issued_before
                        .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                    dry_run: a.dry_run,
                    reason: a.reason,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!(
                "{}",
                json!({
                    "dry_run": resp.dry_run,
                    (if resp.dry_run { "would_revoke" } else { "revoked" }): resp.revoked_lease_ids,
                    "receipt": resp.receipt.map(|r| json!({"sequence": r.sequence, "entry_hash": r.entry_hash})),
                })
            );
            Ok(())
        }
        Command::Locks { command, conn } => {
            let ch = channel(&conn).await?;
            let mut admin = pb::admin_client::AdminClient::new(ch);
            let lock_json = |l: &pb::Lock| {
                json!({
                    "id": l.id, "kind": l.kind, "value": l.value,
                    "until": l.until.map(|t| rfc3339(t.seconds)), "reason": l.reason,
                    "created_by": l.created_by, "created_at": l.created_at.map(|t| rfc3339(t.seconds)),
                })
            };
            match command {
                None | Some(LockCommand::List) => {
                    let resp = admin
                        .list_locks(pb::ListLocksRequest {})
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    for l in &resp.locks {
                        out!("{}", lock_json(l));
                    }
                }
                Some(LockCommand::Add {
                    kind,
                    value,
                    for_,
                    reason,
                }) => {
                    use spiffe_broker::clock::Clock as _;
                    let d = parse_duration(&for_).map_err(|e| format!("--for: {e}"))?;
                    let until = SystemClock.unix_seconds() + d.as_secs() as i64;
                    let l = admin
                        .create_lock(pb::CreateLockRequest {
                            kind,
                            value,
                            until: Some(prost_types::Timestamp {
                                seconds: until,
                                nanos: 0,
                            }),
                            reason,
                        })
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    out!("{}", lock_json(&l));
                }
                Some(LockCommand::Remove { id, reason }) => {
                    admin
                        .delete_lock(pb::DeleteLockRequest {
                            id: id.clone(),
                            reason,
                        })
                        .await
                        .map_err(status_msg)?;
                    out!("{}", json!({"removed": id}));
                }
            }
            Ok(())
        }
        Command::Leases {
            command: Some(LeasesCommand::Show { id, conn }),
            ..
        } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .list_leases(pb::ListLeasesRequest {
                    lease_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            let lease = resp
                .leases
                .first()
                .ok_or_else(|| format!("no lease {id}"))?;
            out!(
                "{}",
                serde_json::to_string_pretty(&lease_json(lease)).map_err(fail)?
            );
            Ok(())
        }
        Command::Leases {
            command: Some(LeasesCommand::Backend { stuck, conn }),
            ..
        } => backend_revocations(&conn, stuck).await,
        Command::Leases {
            stuck: true, conn, ..
        } => backend_revocations(&conn, true).await,
        Command::Leases {
            command: Some(LeasesCommand::ForceRemove { id, reason, conn }),
            ..
        } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .force_remove_backend_revocation(pb::ForceRemoveBackendRevocationRequest {
                    lease_id: id.clone(),
                    reason,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out!(
                "{}",
                json!({"ok": true, "lease_id": id, "receipt": resp.receipt.map(|r| json!({"sequence": r.sequence, "entry_hash": r.entry_hash}))})
            );
            Ok(())
        }
        Command::Leases {
            spiffe_id,
            state,
            limit,
            conn,
            ..
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
                    lease_id: String::new(),
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            for l in &resp.leases {
                out!("{}", lease_json(l));
            }
            Ok(())
        }
        Command::Audit { command } => audit_command(command).await,
        Command::Keys {
            command:
                KeysCommand::Init {
                    state_dir,
                    trust_domain,
                },
        } => {
            let dir = state_dir.join("keys");
            let ring = spiffe_broker::crypto::KeyRing::load_or_create(&dir)
                .and_then(|r| r.with_rsa(&dir))
                .map_err(fail)?;
            spiffe_broker::checkpoint::LogSigner::load_or_create(
                &dir,
                &format!("{trust_domain}/spiffe-broker/audit"),
            )
            .map_err(fail)?;
            spiffe_broker::checkpoint::LogSigner::load_or_create_as(
                &dir,
                "revocations",
                &format!("{trust_domain}/spiffe-broker/revocations"),
            )
            .map_err(fail)?;
            out!("{}", serde_json::to_string(&ring.jwks()).map_err(fail)?);
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
