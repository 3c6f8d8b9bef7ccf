//! `[[audit_sinks]]`: where committed audit entries are shipped (a SIEM's file, syslog,
//! an OpenTelemetry collector), and where approval events are posted (`webhook`: Standard
//! Webhooks or a Slack incoming webhook).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, err, valid_name, ConfigError};

/// One audit sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSinkConfig {
    /// Its name: metrics label, and the key of its stored position.
    pub name: String,
    /// Where the entries go.
    pub kind: SinkKind,
    /// Most entries per delivery.
    pub batch: u32,
    /// Longest wait between retries of a failed delivery.
    pub retry_max: Duration,
}

/// Where a sink's entries go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// JSON lines (the `audit export` entry format) appended to a file, rotated by size or age.
    File {
        /// The file; rotated files are `PATH.1` (newest) … `PATH.keep`.
        path: PathBuf,
        /// Rotate before the file would pass this size.
        max_bytes: u64,
        /// Rotate a file this old (by its first entry's shipping time).
        max_age: Option<Duration>,
        /// Rotated files kept.
        keep: u32,
    },
    /// RFC 5424 messages over TCP or TLS (RFC 5425 octet-counted framing).
    Syslog {
        /// `host:port`.
        address: String,
        /// TLS, checking the server's certificate for `server_name`.
        tls: Option<SinkTls>,
        /// Syslog facility number (default 10, authpriv).
        facility: u8,
        /// HOSTNAME field (default: the machine's name).
        hostname: String,
    },
    /// Approval events (requests waiting, reviews, break-glass, approved issuances)
    /// POSTed one by one, in order, to a webhook receiver.
    Webhook {
        /// `https://…` (or `http://` on loopback); for Slack, the incoming webhook's URL,
        /// which is its secret (never logged).
        url: String,
        /// The payload and its signature.
        format: WebhookFormat,
        /// `standard-webhooks`: a file of `whsec_…` secrets, one per line, mode 0600;
        /// every secret signs each message (rotation: add the new one, retire the old).
        secret_file: Option<PathBuf>,
        /// Base URL of the request pages links point at (`…/requests/<id>`).
        console_url: Option<String>,
        /// CAs for https (default: the platform's trust store).
        ca_file: Option<PathBuf>,
    },
    /// OpenTelemetry log records over OTLP/gRPC.
    Otlp {
        /// `http://host:port` or `https://host:port` (the collector's gRPC receiver).
        endpoint: String,
        /// For https: the CA file (default: the platform's trust store).
        ca_file: Option<PathBuf>,
    },
}

impl SinkKind {
    /// Relative paths are read against the config file's directory.
    pub(super) fn resolve_paths(&mut self, base: &std::path::Path) {
        match self {
            SinkKind::File { path, .. } => *path = base.join(&*path),
            SinkKind::Syslog { tls: Some(t), .. } => {
                if let Some(f) = &mut t.ca_file {
                    *f = base.join(&*f);
                }
            }
            SinkKind::Otlp {
                ca_file: Some(f), ..
            } => *f = base.join(&*f),
            SinkKind::Webhook {
                secret_file,
                ca_file,
                ..
            } => {
                for f in [secret_file, ca_file].into_iter().flatten() {
                    *f = base.join(&*f);
                }
            }
            _ => {}
        }
    }
}

/// What a webhook sink posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `standardwebhooks.com`: `{type, timestamp, data}` with `webhook-id`,
    /// `webhook-timestamp` and `webhook-signature` (HMAC-SHA256 per secret).
    StandardWebhooks,
    /// A Slack incoming-webhook message (`text` and `blocks`).
    Slack,
}

/// How a sink checks its server over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTls {
    /// The CA file (PEM); `None`: the platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's host).
    pub server_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    batch: Option<u32>,
    retry_max: Option<String>,
    // file
    path: Option<PathBuf>,
    max_size_mb: Option<u64>,
    max_age: Option<String>,
    keep: Option<u32>,
    // syslog
    address: Option<String>,
    tls: Option<bool>,
    server_name: Option<String>,
    facility: Option<u8>,
    hostname: Option<String>,
    // otlp
    endpoint: Option<String>,
    // webhook
    url: Option<String>,
    format: Option<String>,
    secret_file: Option<PathBuf>,
    console_url: Option<String>,
    // syslog (tls) and otlp (https)
    ca_file: Option<PathBuf>,
}

impl RawSink {
    /// Every setting that belongs to one kind of sink, and whether it is set.
    fn settings(&self) -> [(&'static str, bool); 15] {
        [
            ("path", self.path.is_some()),
            ("max_size_mb", self.max_size_mb.is_some()),
            ("max_age", self.max_age.is_some()),
            ("keep", self.keep.is_some()),
            ("address", self.address.is_some()),
            ("tls", self.tls.is_some()),
            ("server_name", self.server_name.is_some()),
            ("facility", self.facility.is_some()),
            ("hostname", self.hostname.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("url", self.url.is_some()),
            ("format", self.format.is_some()),
            ("secret_file", self.secret_file.is_some()),
            ("console_url", self.console_url.is_some()),
        ]
    }

    /// A `webhook` sink's settings.
    fn webhook(&self, at: &dyn Fn(&str) -> String) -> Result<SinkKind, ConfigError> {
        let Some(url) = self.url.clone() else {
            return err(format!("{}: required for a webhook sink", at("url")));
        };
        let https = url.starts_with("https://");
        let loopback = ["http://127.0.0.1", "http://[::1]", "http://localhost"]
            .iter()
            .any(|p| url.starts_with(p));
        if !(https || loopback) || url.parse::<http::Uri>().is_err() {
            return err(format!(
                "{}: must be https:// (http:// only on loopback)",
                at("url")
            ));
        }
        let format = match self.format.as_deref().unwrap_or("standard-webhooks") {
            "standard-webhooks" => WebhookFormat::StandardWebhooks,
            "slack" => WebhookFormat::Slack,
            other => {
                return err(format!(
                    "{}: {other:?} is not standard-webhooks or slack",
                    at("format")
                ))
            }
        };
        match (format, &self.secret_file) {
            (WebhookFormat::StandardWebhooks, None) => {
                return err(format!(
                    "{}: required for standard-webhooks (whsec_… secrets, one per line)",
                    at("secret_file")
                ))
            }
            (WebhookFormat::Slack, Some(_)) => {
                return err(format!(
                    "{}: Slack does not check signatures; its URL is the secret",
                    at("secret_file")
                ))
            }
            _ => {}
        }
        if let Some(c) = &self.console_url {
            if !(c.starts_with("https://") || c.starts_with("http://")) {
                return err(format!(
                    "{}: {c:?} is not an http(s) URL",
                    at("console_url")
                ));
            }
        }
        Ok(SinkKind::Webhook {
            url,
            format,
            secret_file: self.secret_file.clone(),
            console_url: self.console_url.clone(),
            ca_file: self.ca_file.clone(),
        })
    }

    pub(super) fn resolve(self) -> Result<AuditSinkConfig, ConfigError> {
        let at = |field: &str| format!("audit_sinks.{}.{field}", self.name);
        if !valid_name(&self.name) {
            return err(format!(
                "audit_sinks: name {:?}: use 1-64 of a-z 0-9 - _",
                self.name
            ));
        }
        let allowed: &[&str] = match self.kind.as_str() {
            "file" => &["path", "max_size_mb", "max_age", "keep"],
            "syslog" => &[
                "address",
                "tls",
                "server_name",
                "facility",
                "hostname",
                "ca_file",
            ],
            "otlp" => &["endpoint", "ca_file"],
            "webhook" => &["url", "format", "secret_file", "console_url", "ca_file"],
            other => {
                return err(format!(
                    "{}: {other:?} is not file, syslog, otlp or webhook",
                    at("type")
                ))
            }
        };
        if let Some((f, _)) = self
            .settings()
            .into_iter()
            .find(|(f, set)| *set && !allowed.contains(f))
        {
            return err(format!("{}: not a setting of a {} sink", at(f), self.kind));
        }
        let kind = match self.kind.as_str() {
            "file" => {
                let Some(path) = self.path.clone() else {
                    return err(format!("{}: required for a file sink", at("path")));
                };
                let mb = self.max_size_mb.unwrap_or(100);
                if mb == 0 {
                    return err(format!("{}: must be at least 1", at("max_size_mb")));
                }
                SinkKind::File {
                    path,
                    max_bytes: mb.saturating_mul(1 << 20),
                    max_age: self
                        .max_age
                        .as_deref()
                        .map(|a| duration(&at("max_age"), Some(a), Duration::ZERO))
                        .transpose()?,
                    keep: self.keep.unwrap_or(10),
                }
            }
            "syslog" => {
                let Some(address) = self.address.clone() else {
                    return err(format!(
                        "{}: required for a syslog sink (host:port)",
                        at("address")
                    ));
                };
                let Some((host, port)) = address.rsplit_once(':') else {
                    return err(format!("{}: {address:?} is not host:port", at("address")));
                };
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return err(format!("{}: {address:?} is not host:port", at("address")));
                }
                let tls = self.tls.unwrap_or(false);
                if !tls && (self.ca_file.is_some() || self.server_name.is_some()) {
                    return err(format!(
                        "{}: ca_file and server_name need tls = true",
                        at("tls")
                    ));
                }
                let facility = self.facility.unwrap_or(10);
                if facility > 23 {
                    return err(format!("{}: {facility} is not 0-23", at("facility")));
                }
                let hostname = self.hostname.clone().unwrap_or_else(local_hostname);
                if hostname.is_empty()
                    || hostname.len() > 255
                    || !hostname.is_ascii()
                    || hostname.contains(' ')
                {
                    return err(format!(
                        "{}: {hostname:?} is not a syslog HOSTNAME",
                        at("hostname")
                    ));
                }
                SinkKind::Syslog {
                    tls: tls.then(|| SinkTls {
                        ca_file: self.ca_file.clone(),
                        server_name: self
                            .server_name
                            .clone()
                            .unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned()),
                    }),
                    address,
                    facility,
                    hostname,
                }
            }
            "otlp" => {
                let Some(endpoint) = self.endpoint.clone() else {
                    return err(format!("{}: required for an otlp sink", at("endpoint")));
                };
                let https = endpoint.starts_with("https://");
                if !(https || endpoint.starts_with("http://"))
                    || endpoint.parse::<http::Uri>().is_err()
                {
                    return err(format!(
                        "{}: {endpoint:?} is not http://host:port or https://host:port",
                        at("endpoint")
                    ));
                }
                if !https && self.ca_file.is_some() {
                    return err(format!("{}: only for an https endpoint", at("ca_file")));
                }
                SinkKind::Otlp {
                    endpoint,
                    ca_file: self.ca_file.clone(),
                }
            }
            "webhook" => self.webhook(&at)?,
            _ => unreachable!("the type was checked above"),
        };
        let batch = self.batch.unwrap_or(500);
        if !(1..=10_000).contains(&batch) {
            return err(format!("{}: {batch} is not 1-10000", at("batch")));
        }
        Ok(AuditSinkConfig {
            retry_max: duration(
                &at("retry_max"),
                self.retry_max.as_deref(),
                Duration::from_secs(30),
            )?,
            name: self.name,
            kind,
            batch,
        })
    }
}

/// The machine's name, for syslog's HOSTNAME (`-`, the nil value, if unknown).
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(toml_text: &str) -> Result<AuditSinkConfig, ConfigError> {
        toml::from_str::<RawSink>(toml_text)
            .map_err(|e| ConfigError(e.to_string()))?
            .resolve()
    }

    #[test]
    fn each_kind_parses_with_its_defaults() {
        let f =
            sink("name = \"siem\"\ntype = \"file\"\npath = \"/var/log/a.jsonl\"\nmax_age = \"1d\"")
                .expect("test step");
        assert_eq!(
            f.kind,
            SinkKind::File {
                path: "/var/log/a.jsonl".into(),
                max_bytes: 100 << 20,
                max_age: Some(Duration::from_secs(86_400)),
                keep: 10
            }
        );
        assert_eq!((f.batch, f.retry_max), (500, Duration::from_secs(30)));
        let s = sink("name = \"rsyslog\"\ntype = \"syslog\"\naddress = \"logs.example:6514\"\ntls = true\nhostname = \"broker-1\"").expect("test step");
        assert_eq!(
            s.kind,
            SinkKind::Syslog {
                address: "logs.example:6514".into(),
                tls: Some(SinkTls {
                    ca_file: None,
                    server_name: "logs.example".into()
                }),
                facility: 10,
                hostname: "broker-1".into()
            }
        );
        let o = sink("name = \"otel\"\ntype = \"otlp\"\nendpoint = \"http://127.0.0.1:4317\"")
            .expect("test step");
        assert!(matches!(o.kind, SinkKind::Otlp { .. }));
        let w = sink("name = \"slack\"\ntype = \"webhook\"\nurl = \"https://hooks.slack.com/services/T/B/x\"\nformat = \"slack\"\nconsole_url = \"https://broker.example/requests\"").expect("test step");
        assert!(matches!(
            w.kind,
            SinkKind::Webhook {
                format: WebhookFormat::Slack,
                secret_file: None,
                ..
            }
        ));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("name = \"Bad Name\"\ntype = \"file\"\npath = \"x\"", "name"),
            (
                "name = \"a\"\ntype = \"kafka\"",
                "is not file, syslog, otlp or webhook",
            ),
            (
                "name = \"a\"\ntype = \"file\"",
                "audit_sinks.a.path: required",
            ),
            (
                "name = \"a\"\ntype = \"file\"\npath = \"x\"\naddress = \"h:1\"",
                "audit_sinks.a.address: not a setting of a file sink",
            ),
            (
                "name = \"a\"\ntype = \"syslog\"\naddress = \"nohost\"",
                "is not host:port",
            ),
            (
                "name = \"a\"\ntype = \"syslog\"\naddress = \"h:1\"\nca_file = \"ca.pem\"",
                "need tls = true",
            ),
            (
                "name = \"a\"\ntype = \"syslog\"\naddress = \"h:1\"\nfacility = 24",
                "not 0-23",
            ),
            (
                "name = \"a\"\ntype = \"otlp\"\nendpoint = \"grpc://h:1\"",
                "is not http://host:port",
            ),
            (
                "name = \"a\"\ntype = \"webhook\"\nurl = \"http://hooks.example/x\"\nsecret_file = \"s\"",
                "must be https:// (http:// only on loopback)",
            ),
            (
                "name = \"a\"\ntype = \"webhook\"\nurl = \"https://hooks.example/x\"",
                "audit_sinks.a.secret_file: required for standard-webhooks",
            ),
            (
                "name = \"a\"\ntype = \"webhook\"\nurl = \"https://hooks.slack.com/x\"\nformat = \"slack\"\nsecret_file = \"s\"",
                "its URL is the secret",
            ),
            (
                "name = \"a\"\ntype = \"webhook\"\nurl = \"https://h/x\"\nformat = \"teams\"",
                "is not standard-webhooks or slack",
            ),
            (
                "name = \"a\"\ntype = \"file\"\npath = \"x\"\nurl = \"https://h/x\"",
                "audit_sinks.a.url: not a setting of a file sink",
            ),
            (
                "name = \"a\"\ntype = \"otlp\"\nendpoint = \"http://h:1\"\nca_file = \"c\"",
                "only for an https endpoint",
            ),
            (
                "name = \"a\"\ntype = \"file\"\npath = \"x\"\nbatch = 0",
                "is not 1-10000",
            ),
            (
                "name = \"a\"\ntype = \"file\"\npath = \"x\"\ncolour = 1",
                "unknown field",
            ),
        ] {
            let e = sink(text).expect_err(text).0;
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
