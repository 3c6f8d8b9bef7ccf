//! The broker's configuration file (TOML). Parsed once into types that cannot be
//! invalid; a bad file refuses to load with a message naming the field.
//! The reference, field by field, is in the README.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spiffe::SpiffeId;

use crate::clock::parse_duration;

mod backend;
mod console;
mod exchange;
mod inventory;
mod limits;
mod pg_conninfo;
pub mod postgres;
mod profile;
mod sinks;
mod witness;

pub use console::ConsoleConfig;
pub use exchange::{ClaimRule, OidcProviderConfig};
pub use sinks::{AuditSinkConfig, SinkKind, SinkTls, WebhookFormat};
pub use witness::WitnessConfig;

pub use inventory::{ApproverGroup, Identity};
use inventory::{RawGroup, RawIdentity};
pub use limits::Limits;
use limits::RawLimits;
pub use profile::{
    CredentialKind, Profile, DEFAULT_MAX_ACTIVE_LEASES, DEFAULT_REQUESTS_PER_MINUTE,
};
use profile::{RawProfile, RawQuotas};

pub use backend::{
    AwsStsConfig, BackendProfile, VaultConfig, X509CaConfig, DEFAULT_BACKEND_DEADLINE, STS_MIN_TTL,
};

/// A configuration error, naming what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Where the Cedar schema and policies live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFiles {
    /// The `.cedarschema` file.
    pub schema: PathBuf,
    /// The `.cedar` policy files.
    pub files: Vec<PathBuf>,
    /// `refuse_widening`: a reload whose replay of the ledger's recent requests
    /// (`replay_window`) would give anyone more is refused unless forced with a reason.
    pub refuse_widening: Option<Duration>,
}

/// Ledger tuning.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// How long a request waits for its durable commit before failing with UNAVAILABLE.
    pub commit_timeout: Duration,
    /// How long SQLite waits on a lock held by another process.
    pub busy_timeout: Duration,
    /// Most operations sharing one commit (one fsync).
    pub max_batch: usize,
    /// `[ledger] postgres_sslmode`: libpq's `sslmode` for the PostgreSQL link when the
    /// connection string names none, and the least it may name (a URL in a secret cannot
    /// weaken what the reviewed config asks for). `None`: the string's, else `prefer`.
    pub postgres_sslmode: Option<postgres::SslMode>,
    /// `[ledger] postgres_ca_file`: the CA (PEM) that `sslmode=verify-full`/`verify-ca`
    /// checks the PostgreSQL server's certificate against, when the connection string has
    /// no `sslrootcert` (a URL from a secret and a CA from a config map both work).
    pub postgres_ca_file: Option<PathBuf>,
}

/// A PostgreSQL connection string, URL (`postgres://user:password@host:port/db`) or
/// key=value (`host=… user=… dbname=…`) form. It may hold a password: `Debug` hides it,
/// and nothing logs [`PostgresUrl::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The connection string itself, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&postgres::redact(&self.0))
    }
}

/// `[http_tls]`: the HTTP listener serves TLS with this certificate chain and key (PEM),
/// re-read when the files change (`server::https`), so a rotation tool can replace them
/// in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTlsConfig {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
}

/// Where approval notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationConfig {
    /// `https://host[:port]/path` (or `http://…`) receiving signed JSON POSTs; checked by
    /// `notify::Notifier::spawn` when the server starts.
    pub webhook_url: String,
    /// File holding the HMAC key (its bytes, trimmed).
    pub hmac_key_file: PathBuf,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `iss` of minted tokens and base of the discovery document.
    pub issuer_url: String,
    /// gRPC (mTLS) listener.
    pub grpc_addr: SocketAddr,
    /// HTTP listener (discovery, JWKS, health, metrics, revocation feed): plain, or TLS
    /// with `http_tls`.
    pub http_addr: SocketAddr,
    /// `[http_tls]`: TLS on the HTTP listener.
    pub http_tls: Option<HttpTlsConfig>,
    /// Where the ledger and signing keys live.
    pub state_dir: PathBuf,
    /// Workload API endpoint for the broker's own SVID (`unix:///path`); `None` reads
    /// `SPIFFE_ENDPOINT_SOCKET`.
    pub workload_api_socket: Option<String>,
    /// Cedar schema and policy files.
    pub policy: PolicyFiles,
    /// Registered identities (the inventory's source and Cedar's entities).
    pub identities: Vec<Identity>,
    /// Approver groups.
    pub approver_groups: Vec<ApproverGroup>,
    /// Webhook for approval notifications.
    pub notifications: Option<NotificationConfig>,
    /// Tolerated clock skew when checking JWT-SVID `exp`/`nbf`.
    pub jwt_clock_skew: Duration,
    /// How often expired leases are marked.
    pub reaper_interval: Duration,
    /// How often a signed checkpoint of the audit log is published (if it grew).
    pub checkpoint_interval: Duration,
    /// Most requests in flight at once; beyond it RPCs answer RESOURCE_EXHAUSTED at once.
    pub max_in_flight: usize,
    /// Per-caller rate, stream and break-glass limits.
    pub limits: Limits,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Most TLS connections from one peer address.
    pub max_connections_per_peer: usize,
    /// How long a client has to finish its TLS handshake before the connection is dropped
    /// (its per-peer slot with it).
    pub handshake_timeout: Duration,
    /// The audit log's origin line and key name (default `<trust domain>/spiffe-broker/audit`).
    pub log_origin: Option<String>,
    /// Whether the HTTP listener serves the log's entries to monitors (`/log/entries`).
    pub publish_log_entries: bool,
    /// Ledger tuning.
    pub ledger: LedgerConfig,
    /// `[ledger] postgres_url`: the ledger lives in this PostgreSQL database, which several
    /// broker replicas may share (one chain, background work done once); `None` keeps the
    /// embedded SQLite ledger in `state_dir`. TLS as libpq's `sslmode` says (use
    /// `verify-full` off loopback; see `store::pg_tls`).
    pub postgres_url: Option<PostgresUrl>,
    /// `[ledger] postgres_url_file`: the same, read from a file at start (a mounted
    /// secret), so the password is not in the config file.
    pub postgres_url_file: Option<PathBuf>,
    /// Credential profiles.
    pub profiles: Vec<Profile>,
    /// Vault, for `kind = "vault"` profiles.
    pub vault: Option<VaultConfig>,
    /// AWS STS, for `kind = "aws_sts"` profiles.
    pub aws_sts: Option<AwsStsConfig>,
    /// The issuing CA for `kind = "x509"` profiles.
    pub x509: Option<X509CaConfig>,
    /// `[[audit_sinks]]`: where committed audit entries are shipped.
    pub audit_sinks: Vec<AuditSinkConfig>,
    /// `[tracing]`: OpenTelemetry span export (off when absent).
    pub tracing: Option<TracingConfig>,
    /// `[keys]`: token-signing key rotation.
    pub keys: KeysConfig,
    /// `[delegation] max_chain_depth`: most actors in a token-exchange chain.
    pub max_chain_depth: usize,
    /// `[[oidc_providers]]`: whose people's ID tokens token exchange accepts.
    pub oidc_providers: Vec<OidcProviderConfig>,
    /// `[[witnesses]]`: who cosigns the audit log's checkpoints.
    pub witnesses: Vec<WitnessConfig>,
    /// `[console]`: the web console (not served when absent).
    pub console: Option<ConsoleConfig>,
}

/// `[keys]`: how the token-signing key rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysConfig {
    /// Rotate on this schedule (`None`: only by `spiffe-broker keys rotate`).
    pub rotate_every: Option<Duration>,
    /// How long a new key is published before it signs.
    pub publish_ahead: Duration,
}

/// `[tracing]`: where spans are exported (OTLP/gRPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    /// `http://host:port` or `https://host:port`.
    pub otlp_endpoint: String,
    /// For https: the CA file (default: the platform's trust store).
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    issuer_url: String,
    grpc_addr: String,
    http_addr: String,
    http_tls: Option<RawHttpTls>,
    state_dir: PathBuf,
    workload_api_socket: Option<String>,
    policy: RawPolicy,
    #[serde(default)]
    identities: Vec<RawIdentity>,
    #[serde(default)]
    approver_groups: Vec<RawGroup>,
    notifications: Option<RawNotifications>,
    #[serde(default)]
    quotas: RawQuotas,
    #[serde(default)]
    limits: RawLimits,
    jwt_clock_skew: Option<String>,
    reaper_interval: Option<String>,
    checkpoint_interval: Option<String>,
    max_in_flight: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_connections_per_peer: Option<usize>,
    handshake_timeout: Option<String>,
    log_origin: Option<String>,
    publish_log_entries: Option<bool>,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    profiles: Vec<RawProfile>,
    vault: Option<backend::RawVault>,
    aws_sts: Option<backend::RawAwsSts>,
    x509: Option<backend::RawX509Ca>,
    #[serde(default)]
    audit_sinks: Vec<sinks::RawSink>,
    tracing: Option<RawTracing>,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    delegation: exchange::RawDelegation,
    #[serde(default)]
    oidc_providers: Vec<exchange::RawOidcProvider>,
    #[serde(default)]
    witnesses: Vec<witness::RawWitness>,
    console: Option<console::RawConsole>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    rotate_every: Option<String>,
    publish_ahead: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracing {
    otlp_endpoint: String,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    schema: PathBuf,
    files: Vec<PathBuf>,
    #[serde(default)]
    refuse_widening: bool,
    replay_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    webhook_url: String,
    hmac_key_file: PathBuf,
}

/// Requests in flight at once when the config does not say.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    commit_timeout: Option<String>,
    busy_timeout: Option<String>,
    max_batch: Option<usize>,
    postgres_url: Option<String>,
    postgres_url_file: Option<PathBuf>,
    postgres_sslmode: Option<String>,
    postgres_ca_file: Option<PathBuf>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn duration(field: &str, v: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|e| ConfigError(format!("{field}: {e}"))),
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let addr = |field: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse()
                .map_err(|_| ConfigError(format!("{field}: {v:?} is not an IP:port address")))
        };
        if !(raw.issuer_url.starts_with("https://") || raw.issuer_url.starts_with("http://"))
            || raw.issuer_url.ends_with('/')
        {
            return err("issuer_url: must be an http(s) URL without a trailing slash");
        }
        let identities = Self::identities(raw.identities)?;
        let approver_groups = Self::groups(raw.approver_groups)?;
        let quotas = (
            raw.quotas
                .max_active_leases
                .unwrap_or(DEFAULT_MAX_ACTIVE_LEASES),
            raw.quotas
                .requests_per_minute
                .unwrap_or(DEFAULT_REQUESTS_PER_MINUTE),
        );
        let vault = raw.vault.map(backend::RawVault::resolve).transpose()?;
        let aws_sts = raw.aws_sts.map(backend::RawAwsSts::resolve).transpose()?;
        let mut profiles = Vec::new();
        let mut names = BTreeSet::new();
        for p in raw.profiles {
            let profile = Self::profile(p, quotas)?;
            backend::check_profile(
                profile.name.as_str(),
                profile.kind,
                profile.default_ttl,
                vault.is_some(),
                aws_sts.is_some(),
            )?;
            if !names.insert(profile.name.clone()) {
                return err(format!(
                    "profiles: {:?} is defined twice",
                    profile.name.as_str()
                ));
            }
            profiles.push(profile);
        }
        let max_batch = raw.ledger.max_batch.unwrap_or(256);
        if max_batch == 0 || max_batch > 10_000 {
            return err("ledger.max_batch: must be between 1 and 10000");
        }
        if raw.ledger.postgres_url.is_some() && raw.ledger.postgres_url_file.is_some() {
            return err("ledger: set postgres_url or postgres_url_file, not both");
        }
        let ledger = LedgerConfig {
            commit_timeout: duration(
                "ledger.commit_timeout",
                raw.ledger.commit_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            busy_timeout: duration(
                "ledger.busy_timeout",
                raw.ledger.busy_timeout.as_deref(),
                Duration::from_secs(2),
            )?,
            max_batch,
            postgres_sslmode: raw
                .ledger
                .postgres_sslmode
                .as_deref()
                .map(postgres::SslMode::parse)
                .transpose()
                .map_err(|e| ConfigError(format!("ledger.postgres_sslmode: {e}")))?,
            postgres_ca_file: raw.ledger.postgres_ca_file,
        };
        let postgres_url = match raw.ledger.postgres_url {
            None => None,
            Some(url) => {
                postgres::parse_url(&url, &ledger)
                    .map_err(|e| ConfigError(format!("ledger.postgres_url: {e}")))?;
                Some(PostgresUrl(url))
            }
        };
        Ok(Config {
            issuer_url: raw.issuer_url,
            grpc_addr: addr("grpc_addr", &raw.grpc_addr)?,
            http_addr: addr("http_addr", &raw.http_addr)?,
            http_tls: raw.http_tls.map(|t| HttpTlsConfig {
                cert_file: t.cert_file,
                key_file: t.key_file,
            }),
            state_dir: raw.state_dir,
            workload_api_socket: raw.workload_api_socket,
            policy: PolicyFiles {
                refuse_widening: if raw.policy.refuse_widening {
                    Some(duration(
                        "policy.replay_window",
                        raw.policy.replay_window.as_deref(),
                        Duration::from_secs(7 * 86_400),
                    )?)
                } else {
                    None
                },
                schema: raw.policy.schema,
                files: raw.policy.files,
            },
            identities,
            approver_groups,
            notifications: raw.notifications.map(|n| NotificationConfig {
                webhook_url: n.webhook_url,
                hmac_key_file: n.hmac_key_file,
            }),
            jwt_clock_skew: duration(
                "jwt_clock_skew",
                raw.jwt_clock_skew.as_deref(),
                Duration::from_secs(30),
            )?,
            reaper_interval: duration(
                "reaper_interval",
                raw.reaper_interval.as_deref(),
                Duration::from_secs(30),
            )?,
            checkpoint_interval: duration(
                "checkpoint_interval",
                raw.checkpoint_interval.as_deref(),
                Duration::from_secs(10),
            )?,
            log_origin: raw.log_origin,
            publish_log_entries: raw.publish_log_entries.unwrap_or(true),
            max_in_flight: raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT).max(1),
            limits: raw.limits.resolve()?,
            max_streams_per_connection: raw.max_streams_per_connection.unwrap_or(128).max(1),
            max_connections_per_peer: raw.max_connections_per_peer.unwrap_or(512).max(1),
            handshake_timeout: duration(
                "handshake_timeout",
                raw.handshake_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            ledger,
            postgres_url,
            postgres_url_file: raw.ledger.postgres_url_file,
            profiles,
            vault,
            aws_sts,
            x509: raw.x509.map(backend::RawX509Ca::resolve),
            audit_sinks: {
                let sinks = raw
                    .audit_sinks
                    .into_iter()
                    .map(sinks::RawSink::resolve)
                    .collect::<Result<Vec<_>, _>>()?;
                let mut names: Vec<_> = sinks.iter().map(|s| s.name.as_str()).collect();
                names.sort_unstable();
                if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                    return err(format!("audit_sinks: two sinks named {:?}", w[0]));
                }
                sinks
            },
            oidc_providers: exchange::providers(raw.oidc_providers)?,
            witnesses: witness::witnesses(raw.witnesses)?,
            console: raw.console.map(console::RawConsole::resolve).transpose()?,
            max_chain_depth: raw.delegation.max_chain_depth()?,
            keys: {
                let publish_ahead = duration(
                    "keys.publish_ahead",
                    raw.keys.publish_ahead.as_deref(),
                    Duration::from_secs(600),
                )?;
                let rotate_every = raw
                    .keys
                    .rotate_every
                    .as_deref()
                    .map(|r| duration("keys.rotate_every", Some(r), Duration::ZERO))
                    .transpose()?;
                if let Some(every) = rotate_every {
                    if every <= publish_ahead {
                        return err("keys.rotate_every: must be longer than keys.publish_ahead");
                    }
                }
                KeysConfig {
                    rotate_every,
                    publish_ahead,
                }
            },
            tracing: match raw.tracing {
                None => None,
                Some(t) => {
                    let https = t.otlp_endpoint.starts_with("https://");
                    if !(https || t.otlp_endpoint.starts_with("http://"))
                        || t.otlp_endpoint.parse::<http::Uri>().is_err()
                    {
                        return err(format!(
                            "tracing.otlp_endpoint: {:?} is not http://host:port or https://host:port",
                            t.otlp_endpoint
                        ));
                    }
                    if !https && t.ca_file.is_some() {
                        return err("tracing.ca_file: only for an https endpoint");
                    }
                    Some(TracingConfig {
                        otlp_endpoint: t.otlp_endpoint,
                        ca_file: t.ca_file,
                    })
                }
            },
        })
    }

    /// Reads and parses a config file; relative policy paths are resolved against the
    /// file's directory.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        c.policy.schema = base.join(&c.policy.schema);
        c.policy.files = c.policy.files.iter().map(|f| base.join(f)).collect();
        if let Some(n) = &mut c.notifications {
            n.hmac_key_file = base.join(&n.hmac_key_file);
        }
        if let Some(f) = &mut c.postgres_url_file {
            *f = base.join(&*f);
        }
        if let Some(f) = &mut c.ledger.postgres_ca_file {
            *f = base.join(&*f);
        }
        if let Some(t) = &mut c.http_tls {
            t.cert_file = base.join(&t.cert_file);
            t.key_file = base.join(&t.key_file);
        }
        if let Some(x) = &mut c.x509 {
            x.cert = base.join(&x.cert);
            x.key = base.join(&x.key);
        }
        for sink in &mut c.audit_sinks {
            sink.kind.resolve_paths(base);
        }
        for f in c.witnesses.iter_mut().filter_map(|w| w.ca_file.as_mut()) {
            *f = base.join(&*f);
        }
        if let Some(f) = c.tracing.as_mut().and_then(|t| t.ca_file.as_mut()) {
            *f = base.join(&*f);
        }
        Ok(c)
    }

    /// The PostgreSQL URL, from the config or read from `postgres_url_file` (trimmed);
    /// `None` means the SQLite ledger in the state dir.
    pub fn database_url(&self) -> Result<Option<PostgresUrl>, ConfigError> {
        if let Some(u) = &self.postgres_url {
            return Ok(Some(u.clone()));
        }
        let Some(path) = &self.postgres_url_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("ledger.postgres_url_file {}: {e}", path.display()))
        })?;
        let url = text.trim().to_owned();
        postgres::parse_url(&url, &self.ledger).map_err(|e| {
            ConfigError(format!("ledger.postgres_url_file {}: {e}", path.display()))
        })?;
        Ok(Some(PostgresUrl(url)))
    }

    /// A registered identity.
    pub fn identity(&self, id: &SpiffeId) -> Option<&Identity> {
        self.identities.iter().find(|i| &i.spiffe_id == id)
    }

    /// The SQLite ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("ledger.db")
    }

    /// The signing key directory.
    /// The longest a token may live (profiles' `max_ttl`, break-glass included): how long
    /// a retired signing key stays published.
    pub fn max_token_lifetime(&self) -> Duration {
        self.profiles
            .iter()
            .flat_map(|p| [Some(p.max_ttl), p.break_glass_max_ttl])
            .flatten()
            .max()
            .unwrap_or(Duration::ZERO)
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.state_dir.join("keys")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
issuer_url = "http://127.0.0.1:8081"
grpc_addr = "127.0.0.1:8443"
http_addr = "127.0.0.1:8081"
state_dir = "/tmp/x"
[policy]
schema = "policy/schema.cedarschema"
files = ["policy/demo.cedar"]
[[identities]]
spiffe_id = "spiffe://example.org/ci/deploy-agent"
owner = "ml-platform"
environment = "prod"
roles = ["deployer"]
[[approver_groups]]
name = "registry-approvers"
members = ["spiffe://example.org/ops/alice"]
[[profiles]]
name = "p"
kind = "jwt"
audience = "a"
scopes = ["s:1", "s:2"]
max_ttl = "1h"
default_ttl = "10m"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Config::from_toml(GOOD).expect("config");
        let p = &c.profiles[0];
        assert_eq!(p.approval_ttl, Duration::from_secs(3600));
        assert!(p.deny_ends);
        assert_eq!(p.max_active_leases, DEFAULT_MAX_ACTIVE_LEASES);
        assert_eq!(c.identities[0].roles, vec!["deployer".to_string()]);
        assert_eq!(c.approver_groups[0].members.len(), 1);
    }

    #[test]
    fn shipped_configs_parse() {
        Config::from_toml(include_str!("../../deploy/config.example.toml"))
            .expect("example config");
        let addr = "127.0.0.1:1".parse().expect("addr");
        let demo = crate::dev::demo_config(std::path::Path::new("/tmp/x"), addr, addr);
        let c = Config::from_toml(&demo).expect("demo config");
        assert_eq!(c.profiles.len(), 10);
    }

    #[test]
    fn no_slurm_user_map_may_name_root_or_the_slurm_user() {
        let addr = "127.0.0.1:1".parse().expect("addr");
        let demo = crate::dev::demo_config(std::path::Path::new("/tmp/x"), addr, addr);
        for (from, to) in [
            ("= \"gpu-prov\"", "= \"root\""),
            ("= \"gpu-prov\"", "= \"slurm\""),
            (
                "= \"gpu-prov\", ",
                "= \"gpu-prov\", \"spiffe://example.org/x\" = \"slurmadm\", ",
            ),
        ] {
            let mut bad = demo.replace(from, to);
            if to.contains("slurmadm") {
                bad = bad.replace(
                    "[profiles.slurm]\n",
                    "[profiles.slurm]\nslurm_user = \"slurmadm\"\n",
                );
            }
            assert_ne!(bad, demo, "{to}");
            let e = Config::from_toml(&bad).expect_err(to);
            assert!(e.to_string().contains("act as any user"), "{e}");
        }
    }

    #[test]
    fn refuses_bad_fields_with_their_name() {
        let bad = GOOD.replace("max_ttl = \"1h\"", "max_ttl = \"1x\"");
        let e = Config::from_toml(&bad).expect_err("bad ttl");
        assert!(e.to_string().contains("max_ttl"), "{e}");
        let bad = GOOD.replace("default_ttl = \"10m\"", "default_ttl = \"2h\"");
        assert!(Config::from_toml(&bad).is_err());
        let bad = format!("{GOOD}\nunknown_field = 1\n");
        assert!(Config::from_toml(&bad).is_err());
        let bad = GOOD.replace("\"s:1\", \"s:2\"", "\"has space\"");
        assert!(Config::from_toml(&bad).is_err());
        let bad = GOOD.replace("roles = [\"deployer\"]", "roles = [\"Bad Role\"]");
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn http_tls_names_a_certificate_and_key() {
        assert!(Config::from_toml(GOOD).expect("config").http_tls.is_none());
        let c = Config::from_toml(&format!(
            "{GOOD}\n[http_tls]\ncert_file = \"/etc/tls/tls.crt\"\nkey_file = \"/etc/tls/tls.key\"\n"
        ))
        .expect("http_tls");
        assert_eq!(
            c.http_tls,
            Some(HttpTlsConfig {
                cert_file: "/etc/tls/tls.crt".into(),
                key_file: "/etc/tls/tls.key".into(),
            })
        );
        let e = Config::from_toml(&format!("{GOOD}\n[http_tls]\ncert_file = \"/x\"\n"))
            .expect_err("no key");
        assert!(e.to_string().contains("key_file"), "{e}");
    }

    #[test]
    fn postgres_url_is_checked_and_never_shown() {
        assert!(Config::from_toml(GOOD)
            .expect("config")
            .postgres_url
            .is_none());
        let with = |url: &str| format!("{GOOD}\n[ledger]\npostgres_url = \"{url}\"\n");
        let c =
            Config::from_toml(&with("postgres://broker:s3cret@db:5432/ledger")).expect("URL form");
        let url = c.postgres_url.as_ref().expect("set");
        assert_eq!(url.expose(), "postgres://broker:s3cret@db:5432/ledger");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug hides the password"
        );
        Config::from_toml(&with("host=db user=broker password=s3cret dbname=ledger"))
            .expect("key=value form");
        Config::from_toml(&with("postgres://broker:s3cret@db/ledger?sslmode=require"))
            .expect("sslmode=require");
        let e = Config::from_toml(&with(
            "postgres://broker:s3cret@db/ledger?sslmode=verify-full",
        ))
        .expect_err("verify-full without a CA is refused");
        assert!(e.to_string().contains("ledger.postgres_url"), "{e}");
        assert!(e.to_string().contains("postgres_ca_file"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let c = Config::from_toml(&format!(
            "{}postgres_ca_file = \"/etc/pg/ca.crt\"\n",
            with("postgres://broker:s3cret@db/ledger?sslmode=verify-full")
        ))
        .expect("verify-full with a CA file");
        assert_eq!(
            c.ledger.postgres_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/pg/ca.crt"))
        );
        // postgres_sslmode: the mode when the URL names none, and a floor.
        let floor = |url: &str, mode: &str| {
            Config::from_toml(&format!(
                "{}postgres_sslmode = \"{mode}\"\npostgres_ca_file = \"/etc/pg/ca.crt\"\n",
                with(url)
            ))
        };
        let c = floor("postgres://broker:s3cret@db/ledger", "verify-full").expect("floor");
        assert_eq!(
            c.ledger.postgres_sslmode,
            Some(postgres::SslMode::VerifyFull)
        );
        let e = floor(
            "postgres://broker:s3cret@db/ledger?sslmode=disable",
            "verify-full",
        )
        .expect_err("a URL weaker than the floor");
        assert!(e.to_string().contains("postgres_sslmode"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = floor("postgres://broker@db/ledger", "allow").expect_err("unknown mode");
        assert!(e.to_string().contains("ledger.postgres_sslmode"), "{e}");
        let e = Config::from_toml(&format!("{GOOD}\n[ledger]\npostgres = \"x\"\n"))
            .expect_err("unknown ledger field");
        assert!(e.to_string().contains("postgres"), "{e}");
    }
}
