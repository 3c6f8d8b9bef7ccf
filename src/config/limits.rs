//! `[limits]`: what one caller can make the broker do and write.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError};

/// `[limits]`: what one caller can make the broker do and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Calls per registered identity per minute (burst of the same size); 0: unlimited.
    pub per_identity_per_minute: u32,
    /// Calls per peer address per minute from identities not in the inventory.
    pub unregistered_per_minute: u32,
    /// Renewals of one lease per minute.
    pub renewals_per_lease_per_minute: u32,
    /// At most one summarising ledger entry per throttled caller in this interval.
    pub summary_interval: Duration,
    /// Streams (`WatchAccessRequest`, `WatchRevocations`) one identity may hold open.
    pub max_streams_per_identity: usize,
    /// Break-glass issuances per identity and profile still awaiting their post-review.
    pub open_break_glass_per_identity: u32,
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            per_identity_per_minute: 1200,
            unregistered_per_minute: 60,
            renewals_per_lease_per_minute: 6,
            summary_interval: Duration::from_secs(60),
            max_streams_per_identity: 8,
            open_break_glass_per_identity: 1,
        }
    }
}
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    calls_per_identity_per_minute: Option<u32>,
    calls_per_unregistered_peer_per_minute: Option<u32>,
    renewals_per_lease_per_minute: Option<u32>,
    summary_interval: Option<String>,
    max_streams_per_identity: Option<usize>,
    open_break_glass_per_identity: Option<u32>,
}
impl RawLimits {
    pub(super) fn resolve(self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        Ok(Limits {
            per_identity_per_minute: self
                .calls_per_identity_per_minute
                .unwrap_or(d.per_identity_per_minute),
            unregistered_per_minute: self
                .calls_per_unregistered_peer_per_minute
                .unwrap_or(d.unregistered_per_minute),
            renewals_per_lease_per_minute: self
                .renewals_per_lease_per_minute
                .unwrap_or(d.renewals_per_lease_per_minute),
            summary_interval: duration(
                "limits.summary_interval",
                self.summary_interval.as_deref(),
                d.summary_interval,
            )?,
            max_streams_per_identity: self
                .max_streams_per_identity
                .unwrap_or(d.max_streams_per_identity)
                .max(1),
            open_break_glass_per_identity: self
                .open_break_glass_per_identity
                .unwrap_or(d.open_break_glass_per_identity)
                .max(1),
        })
    }
}
