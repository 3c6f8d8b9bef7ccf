//! PostgreSQL connection strings as the broker reads them: the password kept out of every
//! message, libpq's `sslmode` and `sslrootcert` (which the `postgres` crate does not know)
//! taken out and resolved against `[ledger] postgres_sslmode` / `postgres_ca_file`. The
//! TLS connector that enforces the resulting [`Policy`] is `crate::store::pg_tls`.
//!
//! The ledger database may sit in another namespace or on another host: without TLS the
//! password and every ledger row cross that network in clear, and anyone on the path can
//! rewrite them. libpq's `sslmode` values mean the same here:
//!
//! | sslmode       | encrypted            | server authenticated                     |
//! |---------------|----------------------|------------------------------------------|
//! | `disable`     | no                   | no                                       |
//! | `prefer`      | if the server offers | no (falls back to plain text)            |
//! | `require`     | yes                  | no; chain only if a CA is given (libpq)  |
//! | `verify-ca`   | yes                  | chain to the CA, any host name           |
//! | `verify-full` | yes                  | chain to the CA and the host name        |
//!
//! Only `verify-full` stops an active attacker on the path; the weaker modes are logged as
//! such when the store opens. The CA comes from `sslrootcert=PATH` in the connection
//! string or `[ledger] postgres_ca_file`; `sslrootcert=system` takes the system bundle
//! ([`SYSTEM_BUNDLE`]), and (as in libpq) only with `verify-full`, since any public CA
//! can vouch for some name. `verify-*` without a CA is refused rather than guessed.
//!

use std::path::{Path, PathBuf};
use std::str::FromStr;

use ::postgres::config::Host;

use super::pg_conninfo;
use super::LedgerConfig;

/// The system's CA bundle (Debian, Ubuntu, Alpine; `SSL_CERT_FILE` overrides it), read for
/// `sslrootcert=system`.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// libpq's `sslmode`, as the broker implements it (see the module table); ordered from
/// weakest to strongest, so `[ledger] postgres_sslmode` can be a floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS if the server offers it, unverified; else plain text (libpq's default).
    Prefer,
    /// TLS, unverified (verified as `verify-ca` when a CA is given).
    Require,
    /// TLS, the chain verified, any host name.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl SslMode {
    /// A connection string's or the config's value.
    pub fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "prefer" => SslMode::Prefer,
            "disable" => SslMode::Disable,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not supported: use disable, prefer, require, verify-ca \
                     or verify-full"
                ))
            }
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the `postgres` crate is told: it knows whether TLS is optional or required;
    /// what the certificate must satisfy is this module's verifier's business.
    pub fn wire(self) -> ::postgres::config::SslMode {
        match self {
            SslMode::Disable => ::postgres::config::SslMode::Disable,
            SslMode::Prefer => ::postgres::config::SslMode::Prefer,
            _ => ::postgres::config::SslMode::Require,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the trust anchors come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The system bundle (`sslrootcert=system`).
    System,
}

/// What the server's certificate must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Nothing: encryption against passive eavesdropping only.
    Nothing,
    /// A chain to the roots, any name (`verify-ca`, and `require` with a CA).
    Chain,
    /// A chain to the roots, and the host name connected to (`verify-full`).
    ChainAndName,
}

/// The TLS policy of one connection string: the mode, and the roots it verifies against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The mode in force.
    pub mode: SslMode,
    /// The trust anchors, when a CA was given.
    pub roots: Option<Roots>,
}

impl Policy {
    /// Combines the connection string's `sslmode` / `sslrootcert` with the config's
    /// `postgres_sslmode` (the mode when the string names none, and the least it may name:
    /// the config, reviewed with the deployment, holds even when the URL in a secret was
    /// written carelessly) and `postgres_ca_file`. Without either, `prefer`, as libpq.
    /// Refuses what libpq refuses and what would be ambiguous.
    pub fn resolve(
        sslmode: Option<&str>,
        sslrootcert: Option<&str>,
        floor: Option<SslMode>,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let mode = match sslmode {
            Some(m) => SslMode::parse(m)?,
            None => floor.unwrap_or(SslMode::Prefer),
        };
        if let Some(floor) = floor.filter(|f| mode < *f) {
            return Err(format!(
                "sslmode={mode} in the connection string is weaker than ledger.postgres_sslmode \
                 = \"{floor}\""
            ));
        }
        let roots =
            match (sslrootcert, ca_file) {
                (Some(_), Some(_)) => return Err(
                    "sslrootcert in the connection string and ledger.postgres_ca_file are both \
                     set: set one"
                        .into(),
                ),
                (Some("system"), None) => Some(Roots::System),
                (Some(path), None) => Some(Roots::File(PathBuf::from(path))),
                (None, Some(path)) => Some(Roots::File(path.to_owned())),
                (None, None) => None,
            };
        match (&roots, mode) {
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => Err(format!(
                "sslmode={mode} needs the CA that signed the server's certificate: set \
                 sslrootcert=PATH (or sslrootcert=system) in the connection string, or \
                 ledger.postgres_ca_file"
            )),
            (Some(Roots::System), m) if m != SslMode::VerifyFull => Err(format!(
                "sslrootcert=system needs sslmode=verify-full (any public CA can vouch for \
                 some name), not sslmode={m}"
            )),
            _ => Ok(Self { mode, roots }),
        }
    }

    pub(crate) fn check(&self) -> Check {
        match (self.mode, &self.roots) {
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            // libpq: `require` with a root certificate verifies the chain, as `verify-ca`.
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// Why this policy is weaker than `verify-full`, for the start-up log; `None` when it
    /// authenticates the server.
    pub fn weakness(&self) -> Option<&'static str> {
        match self.check() {
            Check::ChainAndName => None,
            Check::Chain => Some(
                "the server's certificate is checked against the CA but not its host name: any \
                 server holding a certificate from that CA can pose as the database; use \
                 sslmode=verify-full",
            ),
            Check::Nothing => Some(match self.mode {
                SslMode::Disable => {
                    "the link is not encrypted: the password and every ledger row cross the \
                     network in clear; use sslmode=verify-full"
                }
                SslMode::Prefer => {
                    "sslmode=prefer encrypts only if the server offers TLS, falls back to plain \
                     text, and does not authenticate the server; use sslmode=verify-full"
                }
                _ => {
                    "sslmode=require encrypts but does not authenticate the server: an attacker \
                     on the path can pose as the database; use sslmode=verify-full"
                }
            }),
        }
    }
}

/// An error and its causes ("error connecting to server: Connection refused"): the
/// driver's own `Display` names only the kind.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Replaces the password of a PostgreSQL URL or key=value connection string, for
/// messages and `Debug` output.
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    // URL form: postgres://user:password@host/db
    if let Some(scheme_end) = out.find("://") {
        let start = scheme_end + 3;
        let rest = &out[start..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                out.replace_range(start + colon + 1..start + at, "***");
            }
        }
    }
    // `password=…` as a query parameter (`&`-separated) or a key=value pair.
    let mut searched = 0;
    while let Some(found) = out[searched..].to_ascii_lowercase().find("password") {
        let key_start = searched + found;
        let mut i = key_start + "password".len();
        let bytes = out.as_bytes();
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            searched = key_start + "password".len();
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let value_start = i;
        let value_end = if bytes.get(i) == Some(&b'\'') {
            // Quoted: up to the closing quote that is not escaped.
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(bytes.len())
        } else {
            let mut j = i;
            while j < bytes.len() && !matches!(bytes[j], b'&' | b' ' | b'\t' | b'\n') {
                j += 1;
            }
            j
        };
        out.replace_range(value_start..value_end, "***");
        searched = value_start + 3;
    }
    out
}

/// `user@host:port/dbname`, for messages: never the password.
pub(crate) fn describe(pg: &::postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match pg.get_ports().get(i).or(pg.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        pg.get_user().unwrap_or(""),
        hosts.join(","),
        pg.get_dbname().unwrap_or("")
    )
}

/// A connection string as the broker uses it: what the `postgres` crate connects with,
/// and the TLS policy the broker applies on top.
pub struct ParsedUrl {
    /// Everything but TLS (`sslmode` is set to what the crate understands).
    pub pg: ::postgres::Config,
    /// `sslmode`, and the roots `verify-*` checks against.
    pub tls: Policy,
}

/// Parses a connection string (URL or key=value form). `sslmode` and `sslrootcert` are the
/// broker's (the crate knows neither `verify-ca`/`verify-full` nor `sslrootcert`), and so
/// are `[ledger] postgres_sslmode` / `postgres_ca_file` from `ledger`. Errors never
/// contain the password.
pub fn parse_url(url: &str, ledger: &LedgerConfig) -> Result<ParsedUrl, String> {
    let split = pg_conninfo::split(url).map_err(|e| format!("{}: {e}", redact(url)))?;
    let tls = Policy::resolve(
        split.sslmode.as_deref(),
        split.sslrootcert.as_deref(),
        ledger.postgres_sslmode,
        ledger.postgres_ca_file.as_deref(),
    )
    .map_err(|e| format!("{}: {e}", redact(url)))?;
    let mut pg = ::postgres::Config::from_str(&split.rest).map_err(|e| {
        format!(
            "{} is not a PostgreSQL connection string: {}",
            redact(url),
            with_causes(&e)
        )
    })?;
    pg.ssl_mode(tls.mode.wire());
    if pg.get_hosts().is_empty() {
        return Err(format!("{}: no host", redact(url)));
    }
    let unix_only = pg.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)));
    if unix_only && tls.mode.wire() == ::postgres::config::SslMode::Require {
        return Err(format!(
            "{}: sslmode={} needs a TCP host: PostgreSQL does not speak TLS on a Unix socket",
            redact(url),
            tls.mode
        ));
    }
    Ok(ParsedUrl { pg, tls })
}

/// Whether every host is this machine (loopback or a Unix socket): there a weak
/// `sslmode` is not worth a warning.
pub(crate) fn local_only(pg: &::postgres::Config) -> bool {
    pg.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A ledger config with no TLS settings of its own.
    fn no_tls_config() -> LedgerConfig {
        LedgerConfig {
            commit_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(2),
            max_batch: 1,
            postgres_sslmode: None,
            postgres_ca_file: None,
        }
    }

    #[test]
    fn policies_follow_libpq() {
        let p = |m: Option<&str>, r: Option<&str>| Policy::resolve(m, r, None, None);
        assert_eq!(p(None, None).expect("default").mode, SslMode::Prefer);
        assert_eq!(p(None, None).expect("default").check(), Check::Nothing);
        assert_eq!(
            p(Some("require"), None).expect("require").check(),
            Check::Nothing
        );
        assert_eq!(
            p(Some("require"), Some("/ca.pem"))
                .expect("require + CA")
                .check(),
            Check::Chain
        );
        assert_eq!(
            p(Some("verify-ca"), Some("/ca.pem"))
                .expect("verify-ca")
                .check(),
            Check::Chain
        );
        assert_eq!(
            p(Some("verify-full"), Some("system"))
                .expect("verify-full")
                .check(),
            Check::ChainAndName
        );
        assert!(p(Some("verify-full"), None)
            .expect_err("no CA")
            .contains("sslrootcert"));
        assert!(p(Some("verify-ca"), Some("system"))
            .expect_err("system needs verify-full")
            .contains("verify-full"));
        assert!(p(Some("allow"), None)
            .expect_err("allow")
            .contains("not supported"));
        assert!(
            Policy::resolve(Some("verify-full"), Some("/a"), None, Some(Path::new("/b")))
                .expect_err("both")
                .contains("set one")
        );
        let from_config =
            Policy::resolve(None, None, Some(SslMode::VerifyFull), Some(Path::new("/b")))
                .expect("config");
        assert_eq!(from_config.mode, SslMode::VerifyFull);
        assert_eq!(from_config.roots, Some(Roots::File("/b".into())));
        assert!(from_config.weakness().is_none());
        // The config's mode is a floor: the URL may be stricter, never weaker.
        let e = Policy::resolve(Some("require"), None, Some(SslMode::VerifyFull), None)
            .expect_err("weaker than the floor");
        assert!(e.contains("postgres_sslmode"), "{e}");
        let stricter = Policy::resolve(
            Some("verify-full"),
            Some("/a"),
            Some(SslMode::VerifyCa),
            None,
        )
        .expect("stricter");
        assert_eq!(stricter.mode, SslMode::VerifyFull);
    }

    #[test]
    fn passwords_never_show() {
        for (url, want) in [
            (
                "postgres://broker:s3cret@db:5432/ledger",
                "postgres://broker:***@db:5432/ledger",
            ),
            (
                "postgresql://broker:p%40ss@db/ledger?sslmode=disable",
                "postgresql://broker:***@db/ledger?sslmode=disable",
            ),
            (
                "postgres://broker@db/ledger?password=s3cret&connect_timeout=2",
                "postgres://broker@db/ledger?password=***&connect_timeout=2",
            ),
            (
                "host=db user=broker password=s3cret dbname=ledger",
                "host=db user=broker password=*** dbname=ledger",
            ),
            (
                "host=db password = 'se cr\\'et' dbname=ledger",
                "host=db password = *** dbname=ledger",
            ),
            ("postgres://broker@db/ledger", "postgres://broker@db/ledger"),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
        for (url, says) in [
            (
                "postgres://broker:s3cret@db/ledger?sslmode=verify-full",
                "sslrootcert",
            ),
            (
                "postgres://broker:s3cret@db/ledger?sslmode=allow",
                "not supported",
            ),
            (
                "postgres://broker:s3cret@db:notaport/ledger",
                "not a PostgreSQL",
            ),
            (
                "host=/run/pg password=s3cret sslmode=require",
                "Unix socket",
            ),
            (
                "host=db password=s3cret sslmode=verify-ca sslrootcert='/ca",
                "unterminated",
            ),
        ] {
            let e = parse_url(url, &no_tls_config()).err().expect("refused");
            assert!(!e.contains("s3cret") && e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn descriptions_name_the_server_only() {
        let parsed = parse_url(
            "host=db port=5433 user=broker password=s3cret dbname=ledger",
            &no_tls_config(),
        )
        .expect("parses");
        assert_eq!(describe(&parsed.pg), "postgres://broker@db:5433/ledger");
    }

    #[test]
    fn tls_modes_reach_the_driver() {
        let parsed = parse_url(
            "postgres://broker:s3cret@db/ledger?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=3",
            &no_tls_config(),
        )
        .expect("parses");
        assert_eq!(parsed.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            parsed.pg.get_ssl_mode(),
            ::postgres::config::SslMode::Require
        );
        assert_eq!(
            parsed.pg.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        let default =
            parse_url("postgres://broker@127.0.0.1/ledger", &no_tls_config()).expect("parses");
        assert_eq!(default.tls.mode, SslMode::Prefer);
        assert!(local_only(&default.pg));
        let plain = parse_url("host=db sslmode=disable", &no_tls_config()).expect("parses");
        assert_eq!(
            plain.pg.get_ssl_mode(),
            ::postgres::config::SslMode::Disable
        );
        assert!(!local_only(&plain.pg));
    }
}
