//! The helper's configuration (`helper.toml`): how it reaches the broker, and for each
//! credential what to ask for and where to keep it.
//!
//! ```toml
//! broker = "broker.example.org:8443"
//! broker_id = "spiffe://example.org/spiffe-broker"
//! health_addr = "127.0.0.1:8089"          # GET /live, GET /ready
//!
//! [[credential]]
//! profile = "gpu-scheduler-submit"
//! scopes = ["job:submit"]
//! ttl = "10m"
//! intent = { action = "submit-training", target = "queue/a100" }
//! path = "/run/credentials/gpu-token"
//! format = "token"
//! command = ["/usr/bin/systemctl", "reload", "trainer"]
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::clock::parse_duration;
use crate::proto::v1 as pb;

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("helper config: {0}")]
pub struct ConfigError(pub String);

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The broker's gRPC address, `host:port`.
    pub broker: String,
    /// The SPIFFE ID the broker must present.
    pub broker_id: String,
    /// The Workload API endpoint (`unix:///…`); default `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub workload_api: Option<String>,
    /// An SVID from files instead of the Workload API (e.g. written by spiffe-helper):
    /// certificate chain, PKCS#8 key and trust bundle, all three or none.
    #[serde(default)]
    pub svid_cert: Option<PathBuf>,
    /// See `svid_cert`.
    #[serde(default)]
    pub svid_key: Option<PathBuf>,
    /// See `svid_cert`.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// Where `GET /live` and `GET /ready` answer; none when absent.
    #[serde(default)]
    pub health_addr: Option<SocketAddr>,
    /// Renew once this fraction of a credential's lifetime has passed.
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
    /// The first wait after a failure; doubles up to `retry_max`.
    #[serde(default = "default_retry_initial", deserialize_with = "duration")]
    pub retry_initial: Duration,
    /// The longest wait between attempts (also how often a refused credential is asked
    /// for again, and a pending approval looked at).
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_max: Duration,
    /// The credentials to keep.
    #[serde(rename = "credential", default)]
    pub credentials: Vec<CredentialSpec>,
}

/// One credential kept fresh on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// A name for logs and `/ready` (default: the profile).
    #[serde(default)]
    pub name: Option<String>,
    /// The broker profile.
    pub profile: String,
    /// Scopes asked for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lifetime asked for (default: the profile's).
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
    /// What the workload will do with it.
    #[serde(default)]
    pub intent: Option<IntentSpec>,
    /// Where the credential is written.
    pub path: PathBuf,
    /// How it is written.
    #[serde(default)]
    pub format: Format,
    /// Format `pem`: where the private key goes (default: after the chain in `path`).
    #[serde(default)]
    pub key_path: Option<PathBuf>,
    /// File mode of what is written (owner read/write by default).
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// Run after each write (no shell: the program and its arguments).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Signal a process after each write.
    #[serde(default)]
    pub signal: Option<SignalSpec>,
}

/// The stated intent, as `request --intent-*` takes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentSpec {
    /// What will be done, e.g. `submit-training`.
    pub action: String,
    /// To what, e.g. `queue/a100`.
    pub target: String,
    /// The artifact's digest.
    #[serde(default)]
    pub artifact_digest: String,
    /// A change ticket.
    #[serde(default)]
    pub ticket: String,
    /// Why.
    #[serde(default)]
    pub justification: String,
}

/// Which process to signal after a write, and with what.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalSpec {
    /// A file holding the process id.
    pub pid_file: PathBuf,
    /// `HUP`, `USR1`, `USR2`, `INT` or `TERM`.
    #[serde(default = "default_signal")]
    pub signal: String,
}

/// How a credential is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The JSON `spiffe-broker request` prints.
    #[default]
    Json,
    /// The bare token (token profiles).
    Token,
    /// `export NAME='value'` lines.
    Env,
    /// The AWS `credential_process` JSON (aws_sts profiles).
    CredentialProcess,
    /// The PEM certificate chain, with a key the helper generates (x509 profiles).
    Pem,
}

/// The signals a helper sends.
pub const SIGNALS: [&str; 5] = ["HUP", "USR1", "USR2", "INT", "TERM"];

fn default_renew_fraction() -> f64 {
    0.5
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_mode() -> u32 {
    0o600
}
fn default_signal() -> String {
    "HUP".into()
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl AgentConfig {
    /// Parses and checks a `helper.toml`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        spiffe::SpiffeId::new(&self.broker_id)
            .map_err(|e| ConfigError(format!("broker_id {:?}: {e}", self.broker_id)))?;
        let files = [&self.svid_cert, &self.svid_key, &self.bundle];
        if files.iter().any(|f| f.is_some()) && !files.iter().all(|f| f.is_some()) {
            return bad("svid_cert, svid_key and bundle go together".into());
        }
        if self.workload_api.is_some() && self.svid_cert.is_some() {
            return bad("workload_api and svid_cert exclude each other".into());
        }
        if !(0.1..=0.9).contains(&self.renew_fraction) {
            return bad(format!(
                "renew_fraction {} is outside 0.1–0.9",
                self.renew_fraction
            ));
        }
        if self.retry_initial.is_zero() || self.retry_initial > self.retry_max {
            return bad("retry_initial must be at least 1s and at most retry_max".into());
        }
        if self.credentials.is_empty() {
            return bad("no [[credential]] to keep".into());
        }
        let (mut names, mut paths) = (BTreeSet::new(), BTreeSet::new());
        for c in &self.credentials {
            let name = c.name();
            if !names.insert(name.to_owned()) {
                return bad(format!("two credentials are named {name:?} (set name)"));
            }
            for p in c.paths() {
                if !paths.insert(p.clone()) {
                    return bad(format!("{} is written by two credentials", p.display()));
                }
            }
            if c.profile.is_empty() {
                return bad(format!("credential {name:?}: empty profile"));
            }
            if c.path.file_name().is_none() {
                return bad(format!("credential {name:?}: path names no file"));
            }
            if c.mode & !0o777 != 0 || c.mode & 0o002 != 0 {
                return bad(format!(
                    "credential {name:?}: mode {:o} (world-writable or not a permission)",
                    c.mode
                ));
            }
            if c.key_path.is_some() && c.format != Format::Pem {
                return bad(format!(
                    "credential {name:?}: key_path is for format \"pem\""
                ));
            }
            if c.command.as_ref().is_some_and(|v| v.is_empty()) {
                return bad(format!("credential {name:?}: empty command"));
            }
            if let Some(s) = &c.signal {
                if !SIGNALS.contains(&s.signal.as_str()) {
                    return bad(format!(
                        "credential {name:?}: signal {:?} (one of {})",
                        s.signal,
                        SIGNALS.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Checks that every file can be written (its directory exists and takes a new
    /// file), leaving nothing behind.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        for c in &self.credentials {
            for path in c.paths() {
                crate::files::check_writable(path).map_err(|e| {
                    ConfigError(format!("credential {:?}: cannot write: {e}", c.name()))
                })?;
            }
        }
        Ok(())
    }
}

impl CredentialSpec {
    /// The files it writes: the credential, and the key of format `pem` if apart.
    pub fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [Some(&self.path), self.key_path.as_ref()]
            .into_iter()
            .flatten()
    }

    /// The name shown in logs and `/ready`.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.profile)
    }

    /// The `IssueCredential` request this asks for (without a CSR).
    pub fn to_pb(&self) -> pb::IssueCredentialRequest {
        let intent = self.intent.as_ref().map(|i| pb::Intent {
            action: i.action.clone(),
            target: i.target.clone(),
            artifact_digest: i.artifact_digest.clone(),
            ticket: i.ticket.clone(),
            justification: i.justification.clone(),
            ..Default::default()
        });
        pb::IssueCredentialRequest {
            profile: self.profile.clone(),
            scopes: self.scopes.clone(),
            ttl: crate::client::duration_pb(self.ttl),
            intent,
            ..Default::default()
        }
    }
}
