//! The command line's arguments: subcommands, how a client connects, what it asks for.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use spiffe_broker::clock::{parse_duration, rfc3339};
use spiffe_broker::dev;
use spiffe_broker::proto::v1 as pb;

use super::error::CliError;

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum PolicyCommand {
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
    /// Decide the credential requests in the ledger again with a candidate policy, beside
    /// the policy in force, and report what would change (offline; reads the ledger).
    Replay {
        /// The broker config (the policy in force, and the ledger in its state_dir).
        #[arg(long, default_value = "spiffe-broker-dev/config.toml")]
        config: PathBuf,
        /// A directory of candidate `.cedar` files (and `schema.cedarschema`, if it changes).
        #[arg(long)]
        candidate: PathBuf,
        /// Only requests logged at or after this instant (RFC 3339 or Unix seconds).
        #[arg(long)]
        since: Option<String>,
        /// Read the PostgreSQL ledger at this URL instead of the state dir's.
        #[arg(long, env = "SPIFFE_BROKER_POSTGRES_URL", hide_env_values = true)]
        postgres_url: Option<String>,
        /// Exit 1 when the candidate gives anyone more than the policy in force (for CI).
        #[arg(long)]
        fail_on_widening: bool,
    },
    /// Ask the broker to reload its policy (platform admin).
    Reload {
        /// With `[policy] refuse_widening`: load it even though it gives someone more
        /// than the policy in force (needs --reason; recorded).
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why the widening is intended.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// A witness policy: trust the log only as far as independent witnesses cosigned it.
#[derive(Args)]
pub struct WitnessPolicyArgs {
    /// A witness's verifier key (a file, or the key itself). Repeatable. With any, the
    /// log passes only if a checkpoint is cosigned by --witness-quorum of them and every
    /// cosignature by them verifies: a ledger rewritten or rolled back with the log's own
    /// key fails.
    #[arg(long = "witness", value_name = "VKEY")]
    pub keys: Vec<String>,
    /// How many of the --witness keys must have cosigned.
    #[arg(long, default_value_t = 1, requires = "keys")]
    pub witness_quorum: usize,
    /// The smallest witnessed tree accepted (what you know the log had reached).
    #[arg(long, default_value_t = 0, requires = "keys")]
    pub min_size: u64,
}

#[derive(Subcommand)]
pub enum AuditCommand {
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
        #[command(flatten)]
        witnesses: WitnessPolicyArgs,
    },
    /// Export the log (JSON Lines entries, signed checkpoints, the log key and a sample
    /// inclusion proof) for a SIEM or an auditor.
    Export {
        /// The broker's state dir (reads STATE_DIR/ledger.db and STATE_DIR/keys/log.vkey).
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
        /// Export the PostgreSQL ledger at this URL instead (TLS:
        /// `?sslmode=verify-full&sslrootcert=CA.pem`).
        #[arg(long, env = "SPIFFE_BROKER_POSTGRES_URL", hide_env_values = true)]
        postgres_url: Option<String>,
        /// The log's verifier key written into the export (a file, or the key itself).
        /// Default: STATE_DIR/keys/log.vkey.
        #[arg(long)]
        log_key: Option<String>,
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
pub enum KeysCommand {
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
    /// Stage a new token-signing key: published in the JWKS at once, signing after
    /// --publish-ahead; running brokers follow within a second, no restart. Settles the
    /// last rotation first (refused while it is under way, or while its retired key may
    /// still verify live tokens).
    Rotate {
        /// The broker's state dir (keys in STATE_DIR/keys).
        #[arg(long, default_value = "spiffe-broker-dev")]
        state_dir: PathBuf,
        /// How long the new key is published before it signs (relying parties' JWKS
        /// refresh interval, at least).
        #[arg(long, default_value = "10m", value_parser = duration_arg)]
        publish_ahead: Duration,
        /// How long a retired key stays published: the longest token lifetime (the
        /// config's largest max_ttl).
        #[arg(long, default_value = "7d", value_parser = duration_arg)]
        retain: Duration,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    /// State directory (ledger, keys, dev CA, Workload API sockets).
    #[arg(long, default_value = "spiffe-broker-dev")]
    pub state_dir: PathBuf,
    /// gRPC (mTLS) listen address.
    #[arg(long, default_value = dev::DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,
    /// HTTP listen address.
    #[arg(long, default_value = dev::DEFAULT_HTTP_ADDR)]
    pub http_addr: String,
    /// Lifetime of dev X.509-SVIDs (rotated at half-life).
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    pub svid_ttl: Duration,
    /// Vault address of the demo's `feature-db` profile.
    #[arg(long, default_value = dev::DEFAULT_VAULT_ADDR)]
    pub vault_addr: String,
    /// STS endpoint of the demo's `s3-datasets` profile.
    #[arg(long, default_value = dev::DEFAULT_STS_ENDPOINT)]
    pub aws_sts_endpoint: String,
    /// How often a checkpoint of the audit log is signed (when it grew).
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub checkpoint_interval: Duration,
    /// A witness to submit checkpoints to: `URL,VKEY` (its submission prefix and its
    /// verifier key). Repeatable.
    #[arg(long = "witness", value_name = "URL,VKEY")]
    pub witnesses: Vec<String>,
    /// Post approval events to this URL (Standard Webhooks, signed with a secret
    /// generated at STATE_DIR/webhook.secret), durably, from the ledger.
    #[arg(long, value_name = "URL")]
    pub approval_webhook: Option<String>,
    /// Post approval events to this Slack incoming-webhook URL.
    #[arg(long, value_name = "URL")]
    pub slack_webhook: Option<String>,
    /// TOML appended to the demo config: an `[[oidc_providers]]` entry, say, to sign in to
    /// the console through your own OpenID Provider beside the demo people.
    #[arg(long, value_name = "FILE")]
    pub config_append: Option<PathBuf>,
}

/// `spiffe-broker monitor`.
#[derive(Args)]
pub struct MonitorArgs {
    /// The broker's HTTP base URL (it serves /log/checkpoint and /log/entries).
    #[arg(long = "log")]
    pub log_url: String,
    /// The log's verifier key, pinned out of band (a file, or the key itself).
    #[arg(long)]
    pub log_key: String,
    /// What to report: `spiffe://ID` (a trailing * matches a prefix), `profile=NAME`,
    /// `kind=KIND` or `kind=break-glass`. Repeatable.
    #[arg(long = "watch", required = true)]
    pub watches: Vec<String>,
    #[command(flatten)]
    pub witnesses: WitnessPolicyArgs,
    /// Where the monitor keeps its position (it resumes from there).
    #[arg(long, default_value = "monitor-state.json")]
    pub state: PathBuf,
    /// Also POST each batch of reports (JSON) to this URL; a failed delivery stops the
    /// monitor before it saves its position, so the batch is sent again.
    #[arg(long)]
    pub webhook: Option<String>,
    /// CAs for https URLs (default: the platform's trust store).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Check once and exit (for cron); otherwise follow the log.
    #[arg(long)]
    pub once: bool,
    /// How often to look for a new checkpoint when following.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub interval: Duration,
}

/// `spiffe-broker witness`.
#[derive(Args)]
pub struct WitnessArgs {
    /// The witness's name (its key name, e.g. `witness.example/w1`).
    #[arg(long)]
    pub name: String,
    /// Its Ed25519 key (PKCS#8, created with mode 0600 if absent); the verifier key to
    /// give to logs and auditors is written beside it (extension `.vkey`).
    #[arg(long)]
    pub key: PathBuf,
    /// Its state file: the latest checkpoint it cosigned per log (created if absent).
    #[arg(long)]
    pub state: PathBuf,
    /// A log it witnesses: the log's verifier key (a file, or the key itself); the log's
    /// origin is the key's name. Repeat for more logs.
    #[arg(long = "log-key", required = true)]
    pub log_keys: Vec<String>,
    /// HTTP listen address (`POST /add-checkpoint`, `GET /<origin hash>/checkpoint`).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: String,
}

#[derive(Subcommand)]
pub enum DevCommand {
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
        #[arg(long, default_value = "1h", value_parser = duration_arg)]
        ttl: Duration,
    },
}

/// How a client reaches the broker and proves who it is.
#[derive(Args)]
pub struct ConnArgs {
    /// Broker gRPC address.
    #[arg(long, env = "SPIFFE_BROKER_ADDR", default_value = dev::DEFAULT_GRPC_ADDR)]
    pub broker: String,
    /// The broker's expected SPIFFE ID.
    #[arg(long, env = "SPIFFE_BROKER_ID", default_value = dev::BROKER_ID)]
    pub broker_id: String,
    /// SVID certificate (PEM) instead of the Workload API.
    #[arg(long, requires_all = ["svid_key", "bundle"])]
    pub svid_cert: Option<PathBuf>,
    /// SVID private key (PKCS#8 PEM).
    #[arg(long, requires = "svid_cert")]
    pub svid_key: Option<PathBuf>,
    /// Trust bundle (PEM).
    #[arg(long, requires = "svid_cert")]
    pub bundle: Option<PathBuf>,
}

/// Which leases to revoke: exactly one selector, optionally with a cut-off.
#[derive(Args)]
pub struct RevokeArgs {
    /// One lease.
    #[arg(long, group = "selector")]
    pub lease: Option<String>,
    /// Every active lease of this SPIFFE ID.
    #[arg(long, group = "selector")]
    pub spiffe_id: Option<String>,
    /// Every active lease under this SPIFFE ID prefix, e.g. spiffe://example.org/ci/.
    #[arg(long, group = "selector")]
    pub prefix: Option<String>,
    /// Every active lease of this profile.
    #[arg(long, group = "selector")]
    pub profile: Option<String>,
    /// Everything this approver approved.
    #[arg(long, group = "selector")]
    pub approver: Option<String>,
    /// The lease issued on this access request.
    #[arg(long, group = "selector")]
    pub access_request: Option<String>,
    /// Every active lease (needs --issued-before).
    #[arg(long, group = "selector", requires = "issued_before")]
    pub all: bool,
    /// Only leases issued before this instant (RFC 3339, e.g. 2026-11-26T12:00:00Z, or Unix seconds).
    #[arg(long)]
    pub issued_before: Option<String>,
    /// Show what would be revoked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Why (recorded in the ledger).
    #[arg(long, default_value = "revoked by operator")]
    pub reason: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Subcommand)]
pub enum LeasesCommand {
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
        output: super::listing::ListOutput,
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
pub enum LockCommand {
    /// List locks in force (the default).
    List,
    /// Lock issuance for a spiffe_id, prefix or profile.
    Add {
        /// What it covers.
        #[arg(long, value_enum)]
        kind: LockKind,
        /// The SPIFFE ID, prefix or profile name.
        #[arg(long)]
        value: String,
        /// How long, e.g. 2h.
        #[arg(long = "for", value_parser = duration_arg)]
        for_: Duration,
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

/// What is asked for (shared by `request` and `policy explain`).
#[derive(Args)]
pub struct SpecArgs {
    /// Profile name.
    #[arg(long)]
    pub profile: String,
    /// A scope (repeat for several).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Lifetime, e.g. 10m.
    #[arg(long, value_parser = duration_arg)]
    pub ttl: Option<Duration>,
    /// What you will do, e.g. submit-training.
    #[arg(long, requires = "intent_target")]
    pub intent_action: Option<String>,
    /// What you will do it to, e.g. queue/a100.
    #[arg(long, requires = "intent_action")]
    pub intent_target: Option<String>,
    /// Digest of the artifact concerned, e.g. sha256:….
    #[arg(long, requires = "intent_action")]
    pub artifact_digest: Option<String>,
    /// Change ticket.
    #[arg(long, requires = "intent_action")]
    pub ticket: Option<String>,
    /// Why (mandatory for --break-glass).
    #[arg(long, requires = "intent_action")]
    pub justification: Option<String>,
    /// Deprecated note of on whose behalf (recorded, never verified or used in a
    /// decision); use `exchange` for a verified chain.
    #[arg(long = "on-behalf-of", requires = "intent_action", hide = true)]
    pub on_behalf_of: Vec<String>,
    /// Break-glass: self-approve with --justification; capped TTL; reviewed afterwards.
    #[arg(long)]
    pub break_glass: bool,
}

impl SpecArgs {
    pub fn to_pb(&self) -> Result<pb::IssueCredentialRequest, CliError> {
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
            ttl: duration_pb(self.ttl),
            intent,
            break_glass: self.break_glass,
            access_request_id: String::new(),
            idempotency_key: String::new(),
            csr: Vec::new(),
            may_act: String::new(),
        })
    }
}

/// RFC 8693 subject token types, by what they are.
#[derive(Clone, Copy, ValueEnum)]
pub enum SubjectTokenTypeArg {
    /// A credential this broker issued (urn:ietf:params:oauth:token-type:access_token).
    AccessToken,
    /// A JWT-SVID whose audience is the broker (urn:ietf:params:oauth:token-type:jwt).
    Jwt,
    /// A person's ID token from a configured OpenID Provider
    /// (urn:ietf:params:oauth:token-type:id_token).
    IdToken,
}

#[derive(Args)]
pub struct ExchangeArgs {
    /// File holding the subject token (`-` for stdin). Never on the command line.
    #[arg(long)]
    pub subject_token: PathBuf,
    /// What the subject token is.
    #[arg(long, value_enum, default_value_t = SubjectTokenTypeArg::AccessToken)]
    pub subject_token_type: SubjectTokenTypeArg,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Redeem this approved access request (the same request and subject token).
    #[arg(long)]
    pub access_request: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args)]
pub struct RequestArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// If approval is required, wait until the request is decided, then print the credential.
    #[arg(long)]
    pub wait: bool,
    /// Redeem this approved access request (send the same request as approved).
    #[arg(long)]
    pub access_request: Option<String>,
    /// Idempotency key (22+ random characters): retrying with it returns the same credential.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Token profiles: the one SPIFFE ID that may exchange the token to act for you
    /// (`may_act`).
    #[arg(long)]
    pub may_act: Option<String>,
    /// For x509 profiles: a PKCS#10 CSR file (PEM or DER); your private key stays with you.
    #[arg(long)]
    pub csr: Option<std::path::PathBuf>,
    /// `json` (default): the lease and credential; `env`: shell `export` lines
    /// (AWS_* for cloud credentials, the secret's fields upper-cased for Vault, or
    /// SPIFFE_BROKER_TOKEN / SPIFFE_BROKER_CERT_CHAIN); `credential-process`: what an AWS
    /// profile's `credential_process` prints (Version, AccessKeyId, SecretAccessKey,
    /// SessionToken, Expiration).
    #[arg(long, value_enum, default_value_t = RequestOutput::Json)]
    pub output: RequestOutput,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Parses RFC 3339 (UTC, `Z`) or Unix seconds.
pub fn parse_instant(s: &str, flag: &str) -> Result<i64, CliError> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{flag}: {s:?} is not RFC 3339 (YYYY-MM-DDTHH:MM:SSZ) or Unix seconds");
    // Parsed by `time`; only the one form `rfc3339` writes (UTC, `Z`, whole seconds) is
    // taken: an offset or a fraction would make the echoed instant differ.
    match spiffe_broker::clock::parse_rfc3339(s) {
        Some(t) if rfc3339(t) == s => Ok(t),
        _ => Err(bad().into()),
    }
}

/// A duration option (`90s`, `10m`, `1h30m`, `7d`), checked when the command line is parsed.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

pub use spiffe_broker::client::duration_pb;

/// How `request` prints what it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RequestOutput {
    /// The lease and credential as JSON.
    Json,
    /// Shell `export` lines.
    Env,
    /// The JSON the AWS SDKs read from a `credential_process` (AWS credentials only).
    CredentialProcess,
}

/// Which access requests `requests` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RequestFilter {
    /// Pending requests you may review.
    Pending,
    /// Pending requests you may review and have not.
    ToReview,
    /// Your own requests.
    Mine,
    /// Break-glass issuances awaiting post-review.
    PostReview,
}

/// A lease state to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LeaseStateArg {
    /// In force.
    Active,
    /// Given back early.
    Released,
    /// Revoked by an operator.
    Revoked,
    /// Past its expiry.
    Expired,
}

/// What a lock covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LockKind {
    /// One SPIFFE ID.
    #[value(name = "spiffe_id")]
    SpiffeId,
    /// A SPIFFE ID path prefix.
    Prefix,
    /// A profile.
    Profile,
}

impl LockKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::SpiffeId => "spiffe_id",
            LockKind::Prefix => "prefix",
            LockKind::Profile => "profile",
        }
    }
}
