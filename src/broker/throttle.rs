//! Bounds what one caller can make the broker write. Every authenticated call passes one
//! token bucket per caller (its SPIFFE ID, or its peer address when it is not registered,
//! so minting fresh unregistered IDs does not buy fresh buckets); renewals also pass one
//! bucket per lease. Past a bucket, refusals are counted — a metric, and one summarising
//! ledger entry per caller per interval — never written one by one, so a flood can
//! neither fill the disk nor crowd out other callers' issuance.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{record, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;
use crate::clock::unix_millis;
use crate::config::Limits;
use crate::error::BrokerError;

/// A refusal by a rate limit, and whether it is the one that writes a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    /// The limit, for the caller's message and the entry's rule.
    pub rule: String,
    /// The message.
    pub message: String,
}

/// Token buckets keyed by (who, what), `per_minute` tokens, burst of the same size.
#[derive(Default)]
pub(super) struct RateLimiter {
    /// `what` (a handful: "calls", "renew", profile names) → its buckets by `who`.
    tables: Mutex<HashMap<String, Buckets>>,
}

/// One kind of bucket, by `who`: (tokens, last update in Unix ms).
#[derive(Default)]
struct Buckets {
    by_who: HashMap<String, (f64, i64)>,
    /// Size at which idle buckets are next forgotten (amortised: it doubles with what is
    /// still live, so a flood of distinct keys costs O(1) per call, not a sweep per call).
    sweep_at: usize,
}

/// Buckets kept before the first sweep.
const SWEEP_FLOOR: usize = 100_000;

impl RateLimiter {
    /// Takes one token; `false` if the bucket is empty. A hit allocates nothing.
    pub(super) fn take(&self, who: &str, what: &str, per_minute: u32, now_ms: i64) -> bool {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if !tables.contains_key(what) {
            tables.insert(what.to_owned(), Buckets::default());
        }
        let Some(t) = tables.get_mut(what) else {
            return false;
        };
        let cap = f64::from(per_minute);
        if t.by_who.len() >= t.sweep_at.max(SWEEP_FLOOR) {
            // Bounded memory: a bucket idle for a minute has refilled; forgetting it
            // changes nothing.
            t.by_who.retain(|_, (_, at)| now_ms - *at < 60_000);
            t.sweep_at = (t.by_who.len() * 2).max(SWEEP_FLOOR);
        }
        if !t.by_who.contains_key(who) {
            t.by_who.insert(who.to_owned(), (cap, now_ms));
        }
        let Some((tokens, at)) = t.by_who.get_mut(who) else {
            return false;
        };
        let refill = (now_ms - *at).max(0) as f64 * cap / 60_000.0;
        *tokens = (*tokens + refill).min(cap);
        *at = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Refusals counted per key since that key's last summary entry.
#[derive(Default)]
struct Summaries(Mutex<HashMap<String, (u64, i64)>>);

impl Summaries {
    /// Counts one refusal; `Some(n)` when a summary of `n` refusals is due now.
    fn count(&self, key: &str, now_ms: i64, interval: Duration) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 && !m.contains_key(key) {
            m.retain(|_, (n, at)| *n > 0 || now_ms - *at < interval.as_millis() as i64);
            if m.len() > 100_000 {
                return None;
            }
        }
        let (n, last) = m.entry(key.to_owned()).or_insert((0, i64::MIN));
        *n += 1;
        if now_ms.saturating_sub(*last) >= interval.as_millis() as i64 {
            let due = *n;
            *n = 0;
            *last = now_ms;
            Some(due)
        } else {
            None
        }
    }
}

/// The broker's throttle.
pub(super) struct Throttle {
    limits: Limits,
    buckets: RateLimiter,
    summaries: Summaries,
}

impl Throttle {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: RateLimiter::default(),
            summaries: Summaries::default(),
        }
    }

    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }
}

impl Broker {
    /// Passes `caller` through its bucket; past it, the call is refused and counted.
    pub(super) async fn throttle_call(
        &self,
        caller: &VerifiedCaller,
        peer: Option<std::net::IpAddr>,
        rpc: &str,
    ) -> Result<(), BrokerError> {
        let limits = self.throttle.limits;
        let registered = self.is_registered(caller);
        let (key, per_minute, what) = if registered {
            (
                caller.id().to_string(),
                limits.per_identity_per_minute,
                "identity",
            )
        } else {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
            (
                format!("unregistered@{peer}"),
                limits.unregistered_per_minute,
                "unregistered-peer",
            )
        };
        if per_minute == 0 {
            return Ok(());
        }
        let now_ms = unix_millis(self.clock.now());
        if self
            .throttle
            .buckets
            .take(&key, "calls", per_minute, now_ms)
        {
            return Ok(());
        }
        let t = Throttled {
            rule: format!("limits/per-{what}"),
            message: if registered {
                format!("rate limit: at most {per_minute} calls per minute per identity")
            } else {
                format!("rate limit: at most {per_minute} calls per minute from an unregistered identity's address")
            },
        };
        Err(self.refuse_throttled(caller, &key, rpc, t).await)
    }

    /// Passes one renewal of `lease` through that lease's bucket.
    pub(super) async fn throttle_renewal(
        &self,
        caller: &VerifiedCaller,
        lease: &str,
    ) -> Result<(), BrokerError> {
        let per_minute = self.throttle.limits.renewals_per_lease_per_minute;
        let now_ms = unix_millis(self.clock.now());
        if per_minute == 0
            || self
                .throttle
                .buckets
                .take(lease, "renew", per_minute, now_ms)
        {
            return Ok(());
        }
        let t = Throttled {
            rule: "limits/renewals-per-lease".into(),
            message: format!("rate limit: at most {per_minute} renewals per minute per lease"),
        };
        Err(self
            .refuse_throttled(caller, &format!("renew:{lease}"), "RenewLease", t)
            .await)
    }

    /// The refusal of a throttled call: counted, and recorded as one summary entry per
    /// key and interval (the first refusal of a burst, then the count every interval).
    pub(super) async fn refuse_throttled(
        &self,
        caller: &VerifiedCaller,
        key: &str,
        rpc: &str,
        t: Throttled,
    ) -> BrokerError {
        self.metrics.denied("rate_limited");
        let now_ms = unix_millis(self.clock.now());
        let interval = self.throttle.limits.summary_interval;
        match self.throttle.summaries.count(key, now_ms, interval) {
            None => {
                self.metrics.throttled_unrecorded.inc();
            }
            Some(n) => {
                let mut e = self.event(EventKind::Deny, "deny", Some(caller));
                e.request = Some(record(rpc));
                e.rule = Some(t.rule.clone());
                e.reason = Some(format!(
                    "{}: {n} call(s) refused since the last summary (at most one entry per {} s per caller)",
                    t.message,
                    interval.as_secs()
                ));
                self.record_best_effort(e).await;
            }
        }
        BrokerError::ResourceExhausted(t.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_summary_per_interval_carries_the_count() {
        let s = Summaries::default();
        let minute = Duration::from_secs(60);
        assert_eq!(
            s.count("a", 0, minute),
            Some(1),
            "the first refusal is recorded"
        );
        for t in 1..1000 {
            assert_eq!(s.count("a", t, minute), None);
        }
        assert_eq!(s.count("b", 10, minute), Some(1), "keys are independent");
        assert_eq!(s.count("a", 60_000, minute), Some(1000));
        assert_eq!(s.count("a", 60_001, minute), None);
    }

    #[test]
    fn idle_buckets_are_forgotten_in_amortised_sweeps() {
        let r = RateLimiter::default();
        for i in 0..SWEEP_FLOOR {
            assert!(r.take(&format!("lease-{i}"), "renew", 6, 0));
        }
        let size = |r: &RateLimiter| {
            r.tables
                .lock()
                .map_or(0, |t| t.get("renew").map_or(0, |b| b.by_who.len()))
        };
        assert_eq!(size(&r), SWEEP_FLOOR);
        // A minute later the next new key sweeps the idle ones away.
        assert!(r.take("fresh", "renew", 6, 61_000));
        assert_eq!(size(&r), 1);
    }

    #[test]
    fn buckets_refill_with_time() {
        let r = RateLimiter::default();
        assert!((0..60).all(|_| r.take("x", "calls", 60, 0)));
        assert!(!r.take("x", "calls", 60, 0));
        assert!(r.take("x", "calls", 60, 1000), "one token a second");
        assert!(!r.take("x", "calls", 60, 1000));
    }
}
