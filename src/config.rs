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
use crate::domain::{ProfileName, Scope};

/// A configuration error, naming what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Which backend mints a profile's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An ES256 JWT signed by the broker (verifiable with its JWKS).
    Jwt,
}

/// Who may request a profile (request-time policy replaces this in a later version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SPIFFE ID under this path prefix (written `spiffe://td/path/*`).
    Prefix {
        /// The trust domain.
        trust_domain: String,
        /// The path prefix, ending in `/`.
        path_prefix: String,
    },
}

impl AllowRule {
    fn parse(s: &str) -> Result<Self, ConfigError> {
        if let Some(base) = s.strip_suffix("/*") {
            let id =
                SpiffeId::new(base).map_err(|e| ConfigError(format!("allow entry {s:?}: {e}")))?;
            return Ok(AllowRule::Prefix {
                trust_domain: id.trust_domain_name().to_owned(),
                path_prefix: format!("{}/", id.path()),
            });
        }
        let id = SpiffeId::new(s).map_err(|e| ConfigError(format!("allow entry {s:?}: {e}")))?;
        if id.path().is_empty() {
            return err(format!(
                "allow entry {s:?}: a workload SPIFFE ID needs a path"
            ));
        }
        Ok(AllowRule::Exact(id))
    }

    /// Whether the rule covers this ID.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            AllowRule::Exact(e) => e == id,
            AllowRule::Prefix {
                trust_domain,
                path_prefix,
            } => {
                id.trust_domain_name() == trust_domain
                    && id.path().starts_with(path_prefix.as_str())
            }
        }
    }

    /// The rule as written in the config, used as the deciding rule id.
    pub fn text(&self) -> String {
        match self {
            AllowRule::Exact(e) => e.to_string(),
            AllowRule::Prefix {
                trust_domain,
                path_prefix,
            } => format!("spiffe://{trust_domain}{path_prefix}*"),
        }
    }
}

/// A credential profile: what can be asked for, by whom, and the ceiling.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Name callers ask for.
    pub name: ProfileName,
    /// Which backend.
    pub kind: CredentialKind,
    /// `aud` of the credential.
    pub audience: String,
    /// The scope ceiling.
    pub scopes: BTreeSet<Scope>,
    /// Scopes granted when the request names none (empty: the request must name some).
    pub default_scopes: BTreeSet<Scope>,
    /// TTL ceiling; also the bound on renewals counted from first issuance.
    pub max_ttl: Duration,
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Whether a stated intent is mandatory.
    pub require_intent: bool,
    /// Who may request it.
    pub allow: Vec<AllowRule>,
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
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `iss` of minted tokens and base of the discovery document.
    pub issuer_url: String,
    /// gRPC (mTLS) listener.
    pub grpc_addr: SocketAddr,
    /// Plain HTTP listener (discovery, JWKS, health, metrics).
    pub http_addr: SocketAddr,
    /// Where the ledger and signing keys live.
    pub state_dir: PathBuf,
    /// Workload API endpoint for the broker's own SVID (`unix:///path`); `None` reads
    /// `SPIFFE_ENDPOINT_SOCKET`.
    pub workload_api_socket: Option<String>,
    /// SPIFFE IDs allowed to call the Admin service.
    pub admins: Vec<SpiffeId>,
    /// Tolerated clock skew when checking JWT-SVID `exp`/`nbf`.
    pub jwt_clock_skew: Duration,
    /// How often expired leases are marked.
    pub reaper_interval: Duration,
    /// Ledger tuning.
    pub ledger: LedgerConfig,
    /// Credential profiles.
    pub profiles: Vec<Profile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    issuer_url: String,
    grpc_addr: String,
    http_addr: String,
    state_dir: PathBuf,
    workload_api_socket: Option<String>,
    #[serde(default)]
    admins: Vec<String>,
    jwt_clock_skew: Option<String>,
    reaper_interval: Option<String>,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    profiles: Vec<RawProfile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    commit_timeout: Option<String>,
    busy_timeout: Option<String>,
    max_batch: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    kind: CredentialKind,
    audience: String,
    scopes: Vec<String>,
    #[serde(default)]
    default_scopes: Vec<String>,
    max_ttl: String,
    default_ttl: Option<String>,
    #[serde(default)]
    require_intent: bool,
    allow: Vec<String>,
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
        let admins = raw
            .admins
            .iter()
            .map(|a| SpiffeId::new(a).map_err(|e| ConfigError(format!("admins: {a:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut profiles = Vec::new();
        let mut names = BTreeSet::new();
        for p in raw.profiles {
            let profile = Self::profile(p)?;
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
        Ok(Config {
            issuer_url: raw.issuer_url,
            grpc_addr: addr("grpc_addr", &raw.grpc_addr)?,
            http_addr: addr("http_addr", &raw.http_addr)?,
            state_dir: raw.state_dir,
            workload_api_socket: raw.workload_api_socket,
            admins,
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
            ledger: LedgerConfig {
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
            },
            profiles,
        })
    }

    fn profile(p: RawProfile) -> Result<Profile, ConfigError> {
        let name =
            ProfileName::parse(&p.name).map_err(|e| ConfigError(format!("profiles: {e}")))?;
        let ctx = |e: crate::error::BrokerError| ConfigError(format!("profile {}: {e}", p.name));
        let scopes = p
            .scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(ctx))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let default_scopes = p
            .default_scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(ctx))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if scopes.is_empty() {
            return err(format!("profile {}: scopes must not be empty", p.name));
        }
        if !default_scopes.is_subset(&scopes) {
            return err(format!(
                "profile {}: default_scopes must be within scopes",
                p.name
            ));
        }
        let max_ttl = duration(
            &format!("profile {}: max_ttl", p.name),
            Some(&p.max_ttl),
            Duration::ZERO,
        )?;
        if max_ttl.is_zero() || max_ttl > crate::domain::MAX_REQUESTABLE_TTL {
            return err(format!(
                "profile {}: max_ttl must be between 1s and 7d",
                p.name
            ));
        }
        let default_ttl = duration(
            &format!("profile {}: default_ttl", p.name),
            p.default_ttl.as_deref(),
            max_ttl,
        )?;
        if default_ttl.is_zero() || default_ttl > max_ttl {
            return err(format!(
                "profile {}: default_ttl must be between 1s and max_ttl",
                p.name
            ));
        }
        if p.audience.is_empty() || p.audience.len() > 256 {
            return err(format!(
                "profile {}: audience must be 1..=256 characters",
                p.name
            ));
        }
        let allow = p
            .allow
            .iter()
            .map(|a| AllowRule::parse(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError(format!("profile {}: {}", p.name, e.0)))?;
        Ok(Profile {
            name,
            kind: p.kind,
            audience: p.audience,
            scopes,
            default_scopes,
            max_ttl,
            default_ttl,
            require_intent: p.require_intent,
            allow,
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// The SQLite ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("ledger.db")
    }

    /// The signing key directory.
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
admins = ["spiffe://example.org/ops/root"]
[[profiles]]
name = "p"
kind = "jwt"
audience = "a"
scopes = ["s:1", "s:2"]
max_ttl = "1h"
default_ttl = "10m"
allow = ["spiffe://example.org/ci/deploy-agent", "spiffe://example.org/gpu/*"]
"#;

    #[test]
    fn parses_and_matches_prefixes() {
        let c = Config::from_toml(GOOD).expect("config");
        let p = &c.profiles[0];
        let id = |s: &str| SpiffeId::new(s).expect("id");
        assert!(p
            .allow
            .iter()
            .any(|r| r.matches(&id("spiffe://example.org/gpu/provisioner"))));
        assert!(!p
            .allow
            .iter()
            .any(|r| r.matches(&id("spiffe://example.org/gpux/provisioner"))));
        assert!(!p
            .allow
            .iter()
            .any(|r| r.matches(&id("spiffe://other.org/gpu/provisioner"))));
        assert!(p
            .allow
            .iter()
            .any(|r| r.matches(&id("spiffe://example.org/ci/deploy-agent"))));
        assert!(!p
            .allow
            .iter()
            .any(|r| r.matches(&id("spiffe://example.org/ci/deploy-agent/x"))));
    }

    #[test]
    fn shipped_configs_parse() {
        Config::from_toml(include_str!("../deploy/config.example.toml")).expect("example config");
        let addr = "127.0.0.1:1".parse().expect("addr");
        let demo = crate::dev::demo_config(std::path::Path::new("/tmp/x"), addr, addr);
        let c = Config::from_toml(&demo).expect("demo config");
        assert_eq!(c.profiles.len(), 3);
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
    }
}
