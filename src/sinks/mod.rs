//! Audit sinks: every committed audit entry, in order, shipped to where a security team
//! reads it — a JSON-lines file (`file`), syslog over TCP or TLS (`syslog`), an
//! OpenTelemetry collector (`otlp`) — and the approval events among them to people
//! (`webhook`: Standard Webhooks, Slack).
//!
//! A sink reads the ledger, never the request path: entries reach it only once they are
//! committed, and a sink that is down or slow never holds up an issuance. Each sink's
//! position (the last entry it has) is stored in the ledger's database and moves only
//! after the receiver took the entries, so a restart resumes where it stopped; a broker
//! holds a sink (one replica ships it at a time) and renews the hold as it ships.
//! Delivery is retried from the same entry with back-off up to the sink's `retry_max`.

mod file;
mod otlp;
mod syslog;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::sync::watch;

use crate::audit::StoredEntry;
use crate::clock::{unix_millis, Clock};
use crate::config::{AuditSinkConfig, SinkKind};
use crate::metrics::Metrics;
use crate::store::{SinkClaim, Store, StoreError};

/// A failed delivery (or a failed read of the ledger), described.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

impl From<StoreError> for SinkError {
    fn from(e: StoreError) -> Self {
        SinkError(format!("ledger: {e}"))
    }
}

/// Where entries go.
pub trait Sink: Send {
    /// Delivers `entries` (in order, each after the last one the sink has). `Ok` only once
    /// the receiver has them, as far as its protocol can tell.
    fn deliver<'a>(
        &'a mut self,
        entries: &'a [StoredEntry],
    ) -> BoxFuture<'a, Result<(), SinkError>>;

    /// After a failed delivery: the last entry of the batch the receiver has, if the sink
    /// delivers one by one (the position moves there; the rest is retried).
    fn delivered(&self) -> Option<u64> {
        None
    }
}

/// Opens a sink as configured (connections are made at the first delivery); `store` is
/// the ledger a webhook sink reads access requests from.
pub fn open(config: &AuditSinkConfig, store: &Arc<dyn Store>) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match &config.kind {
        SinkKind::File { .. } => Box::new(file::FileSink::new(config)),
        SinkKind::Syslog { .. } => Box::new(syslog::SyslogSink::new(config)?),
        SinkKind::Otlp { .. } => Box::new(otlp::OtlpSink::new(config)?),
        SinkKind::Webhook { .. } => Box::new(webhook::WebhookSink::new(config, store.clone())?),
    })
}

/// How long a broker holds a sink without renewing it; another replica takes over after.
const HOLD: Duration = Duration::from_secs(60);
/// Longest a delivery may take (well inside the hold).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle sink looks for new entries.
pub const POLL: Duration = Duration::from_secs(1);

/// What an entry says of itself, for the fields a receiver indexes.
#[derive(Deserialize)]
pub(crate) struct Facts {
    /// When it happened (Unix ms).
    pub time_ms: i64,
    /// `allow`, `deny`, …
    #[serde(default)]
    pub decision: String,
}

impl Facts {
    /// The entry's time and decision (a body that does not parse gets now and "").
    pub(crate) fn of(e: &StoredEntry, now_ms: i64) -> Facts {
        serde_json::from_str(&e.body).unwrap_or(Facts {
            time_ms: now_ms,
            decision: String::new(),
        })
    }

    /// Refusals and failed authentications are warnings; the rest informational.
    pub(crate) fn is_warning(&self) -> bool {
        self.decision == "deny"
    }
}

/// One sink's shipping loop.
pub struct Shipper {
    config: AuditSinkConfig,
    sink: Box<dyn Sink>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    holder: String,
}

/// What a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Shipped a full batch: more may be waiting.
    More,
    /// Shipped what there was (maybe nothing), or another replica holds the sink.
    Idle,
}

impl Shipper {
    /// A shipper for `config`, holding the sink as `holder` (unique per broker process).
    pub fn new(
        config: AuditSinkConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        holder: String,
    ) -> Result<Self, SinkError> {
        Ok(Self {
            sink: open(&config, &store)?,
            config,
            store,
            metrics,
            clock,
            holder,
        })
    }

    fn claim(&self, shipped: Option<u64>) -> SinkClaim {
        let now_ms = unix_millis(self.clock.now());
        SinkClaim {
            name: self.config.name.clone(),
            holder: self.holder.clone(),
            now_ms,
            held_until_ms: now_ms + HOLD.as_millis() as i64,
            shipped,
        }
    }

    /// One pass: claim, read the next batch after the stored position, deliver it, record
    /// the new position. A failure is counted in the sink's metrics.
    pub async fn pass(&mut self) -> Result<Pass, SinkError> {
        let r = self.ship().await;
        if r.is_err() {
            self.metrics.sink_failed(&self.config.name);
        }
        r
    }

    async fn ship(&mut self) -> Result<Pass, SinkError> {
        let name = self.config.name.clone();
        let Some(at) = self.store.audit_sink(self.claim(None)).await? else {
            // Another replica ships it and reports its lag; this one owes nothing.
            self.metrics.observe_sink(&name, 0, 0);
            return Ok(Pass::Idle);
        };
        let entries = self
            .store
            .audit_entries(at.shipped, self.config.batch)
            .await?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            self.metrics
                .observe_sink(&name, at.log_size.saturating_sub(at.shipped), 0);
            return Ok(Pass::Idle);
        };
        let failed = match tokio::time::timeout(DELIVERY_TIMEOUT, self.sink.deliver(&entries)).await
        {
            Ok(r) => r.err(),
            Err(_) => Some(SinkError("delivery timed out".into())),
        };
        if let Some(e) = failed {
            // What the receiver already has of the batch is not sent again.
            if let Some(done) = self.sink.delivered() {
                self.store.audit_sink(self.claim(Some(done))).await?;
            }
            return Err(e);
        }
        if self
            .store
            .audit_sink(self.claim(Some(last)))
            .await?
            .is_none()
        {
            // Held too long: another replica took the sink over and ships from the
            // position stored before this batch.
            tracing::warn!(sink = %name, "audit sink taken over by another broker during a delivery");
        }
        self.metrics.observe_sink(
            &name,
            at.log_size.max(last).saturating_sub(last),
            entries.len() as u64,
        );
        Ok(if entries.len() as u32 == self.config.batch {
            Pass::More
        } else {
            Pass::Idle
        })
    }

    /// Ships until `stop` turns true: a pass, then the next at once (more waiting),
    /// after `poll` (idle), or after a back-off doubling to `retry_max` (failed).
    pub async fn run(mut self, poll: Duration, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1).min(self.config.retry_max);
        loop {
            let wait = match self.pass().await {
                Ok(Pass::More) => Duration::ZERO,
                Ok(Pass::Idle) => {
                    backoff = Duration::from_secs(1).min(self.config.retry_max);
                    poll
                }
                Err(e) => {
                    tracing::warn!(sink = %self.config.name, error = %e, retry_in = ?backoff, "audit sink delivery failed");
                    let w = backoff;
                    backoff = (backoff * 2).min(self.config.retry_max);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        // Give the sink up at once, so a broker started after this one (or another
        // replica) ships it now rather than when the hold lapses.
        let mut release = self.claim(None);
        release.held_until_ms = 0;
        if let Err(e) = self.store.audit_sink(release).await {
            tracing::warn!(sink = %self.config.name, error = %e, "audit sink not released; another broker takes it when the hold lapses");
        }
    }
}

/// A name for this broker process as a sink holder: host, process id and a random tag.
pub fn holder_name() -> String {
    let mut tag = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}:{}:{}",
        host.trim(),
        std::process::id(),
        hex::encode(tag)
    )
}
