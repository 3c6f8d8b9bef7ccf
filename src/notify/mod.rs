//! Approver notifications by signed webhook.
//!
//! The broker tells approvers about new pending access requests and about decisions by
//! POSTing a JSON [`Notification`] to one configured URL. Notification is strictly a
//! side effect: [`Notifier::notify`] only puts the event on a bounded in-memory queue
//! and returns, so a slow, failing or hostile endpoint can never delay, block or
//! reverse a decision that has already been committed. One background task drains the
//! queue and delivers events one at a time, in the order they were queued.
//!
//! # Delivery semantics
//!
//! * **At least once, best effort.** An attempt counts as delivered only when the
//!   endpoint answers `2xx`. Anything else (connection refused, DNS failure, timeout,
//!   a non-`2xx` status, a garbled answer) is retried with exponential back-off and
//!   jitter: 0.5 s doubling up to 60 s, at most 8 attempts per event. After that the
//!   event is dropped, logged at `error` and counted in [`Notifier::failed`]. An answer
//!   lost after the receiver acted on the request means it may see the event twice:
//!   retries of one event carry the same `X-Spiffe-Broker-Delivery` id, so receivers
//!   deduplicate on it.
//! * **In order, head-of-line.** The next event waits while the current one is being
//!   retried, so approvers never see a decision before the request it decides. A dead
//!   endpoint therefore holds the queue for up to about a minute of back-off plus eight
//!   attempt timeouts per event; the queue (1024 events) absorbs that, and when it is
//!   full new events are dropped, logged at `warn` and counted in [`Notifier::dropped`].
//! * **Not durable.** The queue lives in memory; events still queued when the process
//!   exits are lost. The ledger, not the webhook, is the record of what happened.
//!
//! # Wire format
//!
//! ```text
//! POST /path HTTP/1.1
//! Host: host[:port]
//! Content-Type: application/json
//! Content-Length: 213
//! X-Spiffe-Broker-Event: access_request.pending
//! X-Spiffe-Broker-Delivery: 9f86d081884c7d65
//! X-Spiffe-Broker-Timestamp: 1767225600
//! X-Spiffe-Broker-Signature: sha256=5d5d1398...
//!
//! {"event":"access_request.pending","access_request_id":"...",...}
//! ```
//!
//! # Verifying a delivery (receiver side)
//!
//! The signature is `HMAC-SHA256(key, "{timestamp}.{body}")`, hex-encoded in lower
//! case, where `timestamp` is the `X-Spiffe-Broker-Timestamp` header exactly as sent
//! (decimal Unix seconds), `.` is one literal full stop, and `body` is the raw request
//! body bytes exactly as received. A receiver:
//!
//! 1. reads the body as raw bytes, *before* parsing it (re-serialised JSON will not
//!    match);
//! 2. computes the HMAC above with the shared key and compares it with the hex after
//!    `sha256=` in `X-Spiffe-Broker-Signature` **in constant time**, rejecting on
//!    mismatch;
//! 3. rejects the request if the timestamp is more than a few minutes (say 300 s) away
//!    from its own clock. The timestamp is inside the signed bytes, so it cannot be
//!    changed without breaking the signature; this is what stops a captured delivery
//!    being replayed later. Each retry is signed afresh with a new timestamp;
//! 4. optionally remembers `X-Spiffe-Broker-Delivery` ids for that window and
//!    acknowledges repeats without acting on them again (retries reuse the id).
//!
//! For example, in a shell: `printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$key"`.
//!
//! # Transport
//!
//! `https://` or `http://`, through the broker's one outbound client
//! (`crate::http_client`): TLS on rustls (ring) against the platform's trust store,
//! `HTTPS_PROXY` / `NO_PROXY` honoured, connections kept alive between deliveries,
//! redirects not followed (a `3xx` is a failed attempt). Over `https` the body is
//! confidential in transit and the receiver is authenticated by its certificate; over plain
//! `http` the signature still gives integrity and authenticity, but not confidentiality.
//! Either way the body carries no credential (`reason` is the requester's free text).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use ring::rand::SystemRandom;
use tokio::sync::{mpsc, watch};

use crate::http_client::{HttpClient, HttpError, Options, Trust};

/// Events that may wait for delivery before new ones are dropped.
const QUEUE_CAPACITY: usize = 1024;
/// Attempts per event, the first included, before the event is given up.
const MAX_ATTEMPTS: u32 = 8;
/// Delay before the first retry; it doubles per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two attempts, however many have failed.
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Where and how to deliver webhooks.
pub struct WebhookConfig {
    /// `https://host[:port][/path]` or `http://…` (ports 443 and 80, path `/` by
    /// default); no user-info, no fragment. The path may carry a query string.
    pub url: String,
    /// The shared HMAC-SHA256 key receivers verify signatures with. Secret: it is never
    /// logged, and `Debug` redacts it.
    pub hmac_key: Vec<u8>,
    /// Upper bound on one delivery attempt, from connecting (TLS included) to the status.
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's path or query may itself carry a receiver token, so only the fact
        // that it is set is shown, like the key.
        f.debug_struct("WebhookConfig")
            .field("url", &"<redacted>")
            .field("hmac_key", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One event for approvers; serialised as the webhook's JSON body.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Notification {
    /// What happened, e.g. `access_request.pending` or `access_request.approved`.
    pub event: String,
    /// The access request this is about.
    pub access_request_id: String,
    /// The credential profile that was asked for.
    pub profile: String,
    /// Who asked (a SPIFFE ID).
    pub requester: String,
    /// The request's state after this event, e.g. `pending`, `approved`, `denied`.
    pub state: String,
    /// The approvers this event is addressed to.
    pub approvers_notified: Vec<String>,
    /// Whether the request invoked break-glass.
    pub break_glass: bool,
    /// When the event happened, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The requester's or approver's stated reason, if any.
    pub reason: Option<String>,
}

/// Why a [`Notifier`] could not be started.
///
/// Messages name what is wrong but never repeat the URL or the key: either may carry a
/// secret, and these errors end up in logs.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The URL is not of the form `http(s)://host[:port][/path]`.
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(&'static str),
    /// The HTTP client could not be built (e.g. the trust store).
    #[error("webhook HTTP client: {0}")]
    Client(HttpError),
    /// An empty key would make every signature forgeable.
    #[error("webhook HMAC key must not be empty")]
    EmptyKey,
    /// A zero timeout would fail every attempt.
    #[error("webhook timeout must be greater than zero")]
    ZeroTimeout,
    /// The delivery task needs a tokio runtime to run on.
    #[error("Notifier::spawn must be called from within a tokio runtime")]
    NoRuntime,
}

/// Queue size, retry schedule and attempt limit. Production uses [`Tuning::default`];
/// tests shrink the back-off so retries take milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub(crate) queue_capacity: usize,
    pub(crate) max_attempts: u32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            queue_capacity: QUEUE_CAPACITY,
            max_attempts: MAX_ATTEMPTS,
            backoff_base: BACKOFF_BASE,
            backoff_cap: BACKOFF_CAP,
        }
    }
}

/// Counters shared by the notifier handles and the delivery task.
#[derive(Debug)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Delivery attempts finished, bumped after the counters above are updated, so
    /// tests can await an outcome instead of sleeping and polling.
    attempts: watch::Sender<u64>,
}

impl Counters {
    fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            attempts: watch::Sender::new(0),
        }
    }

    fn attempt_finished(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }
}

/// Hands notifications to the background delivery task.
///
/// Cheap to clone; clones share the queue and the counters. When the last handle is
/// dropped the task delivers what is still queued and then exits.
#[derive(Clone)]
pub struct Notifier {
    /// `None` when no webhook is configured: every event is discarded.
    tx: Option<mpsc::Sender<Notification>>,
    counters: Arc<Counters>,
    capacity: usize,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.tx.is_some())
            .field("delivered", &self.delivered())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Notifier {
    /// A notifier that accepts and discards every event.
    pub fn noop() -> Self {
        Self {
            tx: None,
            counters: Arc::new(Counters::new()),
            capacity: 0,
        }
    }

    /// Starts the delivery task for `cfg` on the current tokio runtime; `None` gives a
    /// notifier that accepts and discards every event (and needs no runtime).
    ///
    /// Fails if the URL is not `http(s)://host[:port][/path]`, the key is empty, the
    /// timeout is zero, or (with a config) there is no current tokio runtime.
    pub fn spawn(cfg: Option<WebhookConfig>) -> Result<Self, NotifyError> {
        Self::spawn_tuned(cfg, Tuning::default())
    }

    /// [`Notifier::spawn`] with an explicit queue size and retry schedule.
    pub(crate) fn spawn_tuned(
        cfg: Option<WebhookConfig>,
        tuning: Tuning,
    ) -> Result<Self, NotifyError> {
        let counters = Arc::new(Counters::new());
        let Some(cfg) = cfg else {
            return Ok(Self {
                tx: None,
                counters,
                capacity: 0,
            });
        };
        let endpoint = Endpoint::parse(&cfg.url)?;
        if cfg.hmac_key.is_empty() {
            return Err(NotifyError::EmptyKey);
        }
        if cfg.timeout.is_zero() {
            return Err(NotifyError::ZeroTimeout);
        }
        // Checked before anything is built: `tokio::spawn` would panic without one.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NotifyError::NoRuntime)?;
        // mpsc::channel panics on zero capacity.
        let capacity = tuning.queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let http = HttpClient::new(&Options {
            timeout: cfg.timeout,
            connect_timeout: cfg.timeout,
            ..Options::new(Trust::System)
        })
        .map_err(NotifyError::Client)?;
        let worker = Worker {
            key: hmac::Key::new(hmac::HMAC_SHA256, &cfg.hmac_key),
            endpoint,
            http,
            timeout: cfg.timeout,
            tuning,
            counters: Arc::clone(&counters),
            rng: SystemRandom::new(),
        };
        runtime.spawn(worker.run(rx));
        Ok(Self {
            tx: Some(tx),
            counters,
            capacity,
        })
    }

    /// Queues `n` for delivery and returns at once. Never blocks and never fails: if the
    /// queue is full (or the delivery task is gone) the event is dropped, logged and
    /// counted in [`Notifier::dropped`].
    pub fn notify(&self, n: Notification) {
        let Some(tx) = &self.tx else {
            return;
        };
        // try_send, not send: waiting for room would let a dead endpoint stall the
        // caller, i.e. the decision path.
        match tx.try_send(n) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(n)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = %n.event,
                    access_request_id = %n.access_request_id,
                    capacity = self.capacity,
                    "webhook queue full; dropping notification"
                );
            }
            Err(mpsc::error::TrySendError::Closed(n)) => {
                // Only when the runtime that ran the delivery task has shut down.
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    event = %n.event,
                    access_request_id = %n.access_request_id,
                    "webhook delivery task is gone; dropping notification"
                );
            }
        }
    }

    /// Events the endpoint acknowledged with a `2xx`.
    pub fn delivered(&self) -> u64 {
        self.counters.delivered.load(Ordering::Relaxed)
    }

    /// Events given up after every attempt failed.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }

    /// Events discarded without an attempt: the queue was full (or the delivery task
    /// had stopped with its runtime).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

mod endpoint;
mod worker;

use endpoint::Endpoint;
use worker::Worker;
#[cfg(test)]
mod tests;
