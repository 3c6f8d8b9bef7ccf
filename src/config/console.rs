//! `[console]`: the web console people use to review requests, served on the HTTP
//! listener under `/console/`. People sign in through an `[[oidc_providers]]` entry that
//! has a `client_secret_file`.
//!
//! ```toml
//! [console]
//! session_ttl = "8h"     # a session ends this long after sign-in, whatever happens
//! idle_timeout = "30m"   # ... or this long after its last use
//! ```
//!
//! Dev mode's demo sign-in is not a setting: only `spiffe-broker dev` turns it on.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, err, ConfigError};

/// The console's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Absolute session lifetime.
    pub session_ttl: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Offer the demo people's sign-in (set by `spiffe-broker dev` only; no config key).
    pub dev_sign_in: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    session_ttl: Option<String>,
    idle_timeout: Option<String>,
}

impl RawConsole {
    pub(super) fn resolve(self) -> Result<ConsoleConfig, ConfigError> {
        let session_ttl = duration(
            "console.session_ttl",
            self.session_ttl.as_deref(),
            Duration::from_secs(8 * 3600),
        )?;
        let idle_timeout = duration(
            "console.idle_timeout",
            self.idle_timeout.as_deref(),
            Duration::from_secs(30 * 60),
        )?;
        if session_ttl < Duration::from_secs(60) || idle_timeout < Duration::from_secs(60) {
            return err("console: session_ttl and idle_timeout must be at least 1m");
        }
        if idle_timeout > session_ttl {
            return err("console: idle_timeout is longer than session_ttl");
        }
        Ok(ConsoleConfig {
            session_ttl,
            idle_timeout,
            dev_sign_in: false,
        })
    }
}
