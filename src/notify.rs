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

use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
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

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `https` or `http`.
    scheme: &'static str,
    /// `host[:port]` (the port only when not the scheme's default; IPv6 in brackets): the
    /// `Host` header, and the only part of the URL that is ever logged, since the path or
    /// query may carry a receiver's token.
    authority: String,
    /// Request target: path and query, starting with `/`.
    path: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, NotifyError> {
        let invalid = NotifyError::InvalidUrl;
        let (scheme, default_port, rest): (_, u16, _) =
            if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
                ("https", 443, rest)
            } else if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
                ("http", 80, rest)
            } else {
                return Err(invalid("must start with https:// or http://"));
            };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if target.contains('#') {
            return Err(invalid(
                "fragments are not sent to servers; remove the '#...'",
            ));
        }
        // Anything that is not visible ASCII could smuggle a header in via CR/LF, or
        // split the request line at a space.
        if !target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "the path must be visible ASCII (percent-encode anything else)",
            ));
        }
        let path = match target.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{target}"),
            Some(_) => target.to_owned(),
        };
        if authority.is_empty() {
            return Err(invalid("missing host"));
        }
        if authority.contains('@') {
            return Err(invalid("user-info (user:password@) is not supported"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (v6, after) = bracketed
                .split_once(']')
                .ok_or(invalid("unterminated IPv6 literal"))?;
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(invalid("bad IPv6 literal"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or(invalid("junk after IPv6 literal"))?,
                ),
            };
            (v6, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let is_v6 = authority.starts_with('[');
        if !is_v6
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(invalid("the host must be a DNS name or an IP address"));
        }
        let port = match port {
            None => default_port,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u16>() {
                    Ok(0) | Err(_) => return Err(invalid("the port must be 1-65535")),
                    Ok(n) => n,
                }
            }
            Some(_) => return Err(invalid("the port must be 1-65535")),
        };
        let shown_host = if is_v6 {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == default_port {
            shown_host
        } else {
            format!("{shown_host}:{port}")
        };
        Ok(Self {
            scheme,
            authority,
            path,
        })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Why one attempt did not count as delivered. Never carries the key or the URL path
/// (`HttpError` names only scheme, host and port).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    #[error("request not built: {0}")]
    Request(String),
}

/// The background task: owns the key and the queue's receiving end.
struct Worker {
    key: hmac::Key,
    endpoint: Endpoint,
    /// Pooled: consecutive deliveries reuse a kept-alive connection.
    http: HttpClient,
    timeout: Duration,
    tuning: Tuning,
    counters: Arc<Counters>,
    rng: SystemRandom,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Notification>) {
        // One event at a time, retries included: that is what keeps delivery in order.
        while let Some(n) = rx.recv().await {
            self.deliver(&n).await;
        }
        tracing::debug!(endpoint = %self.endpoint.authority, "webhook queue closed; delivery task exiting");
    }

    async fn deliver(&self, n: &Notification) {
        let body = match serde_json::to_vec(n) {
            Ok(body) => body,
            Err(e) => {
                // Unreachable for this plain struct; counted rather than retried, since
                // retrying cannot fix it.
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters.attempt_finished();
                tracing::error!(event = %n.event, access_request_id = %n.access_request_id, error = %e, "could not serialise notification; dropping it");
                return;
            }
        };
        let delivery = self.delivery_id();
        let max_attempts = self.tuning.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            let outcome =
                match tokio::time::timeout(self.timeout, self.attempt(n, &delivery, &body)).await {
                    Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
                    Ok(Ok(status)) => Err(AttemptError::Status(status)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(AttemptError::Timeout(self.timeout)),
                };
            let error = match outcome {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    self.counters.attempt_finished();
                    tracing::info!(
                        event = %n.event,
                        access_request_id = %n.access_request_id,
                        delivery = %delivery,
                        endpoint = %self.endpoint.authority,
                        attempt,
                        "webhook delivered"
                    );
                    return;
                }
                Err(e) => e,
            };
            if attempt == max_attempts {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters.attempt_finished();
                tracing::error!(
                    event = %n.event,
                    access_request_id = %n.access_request_id,
                    delivery = %delivery,
                    endpoint = %self.endpoint.authority,
                    attempts = attempt,
                    error = %error,
                    "webhook delivery failed; giving up on this notification"
                );
                return;
            }
            self.counters.attempt_finished();
            let delay = backoff_delay(
                attempt,
                self.tuning.backoff_base,
                self.tuning.backoff_cap,
                self.entropy(),
            );
            tracing::warn!(
                event = %n.event,
                access_request_id = %n.access_request_id,
                delivery = %delivery,
                endpoint = %self.endpoint.authority,
                attempt,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "webhook delivery attempt failed; will retry"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One POST; the final status code (interim `1xx` answers are skipped by the client).
    async fn attempt(
        &self,
        n: &Notification,
        delivery: &str,
        body: &[u8],
    ) -> Result<u16, AttemptError> {
        // Signed per attempt, so a retry after minutes still passes a receiver's
        // freshness check.
        let timestamp = unix_seconds_now();
        let signature = sign(&self.key, timestamp, body);
        let request = build_request(
            &self.endpoint,
            &n.event,
            delivery,
            timestamp,
            &signature,
            body,
        )
        .map_err(|e| AttemptError::Request(e.to_string()))?;
        Ok(self.http.send_for_status(request).await?.as_u16())
    }

    /// The event's id for `X-Spiffe-Broker-Delivery`: 8 random bytes in hex.
    fn delivery_id(&self) -> String {
        let mut id = [0u8; 8];
        if self.rng.fill(&mut id).is_err() {
            // The OS RNG failing is near impossible; an id only needs to be unique
            // enough for receivers to deduplicate, so the clock serves.
            tracing::warn!("system RNG failed; deriving the delivery id from the clock");
            let nanos = WallClock::nanos();
            id = nanos.to_be_bytes();
        }
        hex::encode(id)
    }

    /// Randomness for back-off jitter; 0 (no jitter) if the RNG fails, which only
    /// loses the spreading of retries, not the retries.
    fn entropy(&self) -> u64 {
        let mut bytes = [0u8; 8];
        match self.rng.fill(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => 0,
        }
    }
}

/// The wait before retry number `retry` (1 = after the first failed attempt):
/// "equal jitter", uniformly in `[d/2, d]` where `d = min(base * 2^(retry-1), cap)`.
/// Half of it fixed keeps the back-off a back-off; the random half stops many brokers
/// hammering a recovering endpoint in lock-step.
fn backoff_delay(retry: u32, base: Duration, cap: Duration, entropy: u64) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    let full = base.saturating_mul(1u32 << doublings).min(cap);
    let fixed = full / 2;
    let span = u64::try_from((full - fixed).as_nanos()).unwrap_or(u64::MAX);
    let jitter = match span.checked_add(1) {
        Some(modulus) => entropy % modulus,
        None => entropy,
    };
    fixed + Duration::from_nanos(jitter)
}

/// `sha256=` followed by hex `HMAC-SHA256(key, "{timestamp}.{body}")`.
fn sign(key: &hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// The signed POST. The body is sent as it was signed, byte for byte.
fn build_request(
    endpoint: &Endpoint,
    event: &str,
    delivery: &str,
    timestamp: i64,
    signature: &str,
    body: &[u8],
) -> Result<http::Request<Vec<u8>>, http::Error> {
    // The event name comes from broker code, but it lands in a header: anything that
    // could end the header early is replaced.
    let event: String = event
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let url = format!(
        "{}://{}{}",
        endpoint.scheme, endpoint.authority, endpoint.path
    );
    http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-spiffe-broker-event", event)
        .header("x-spiffe-broker-delivery", delivery)
        .header("x-spiffe-broker-timestamp", timestamp.to_string())
        .header("x-spiffe-broker-signature", signature)
        .body(body.to_vec())
}

/// Reads of the real wall clock, kept in one place.
struct WallClock;

impl WallClock {
    // The signing timestamp is checked by *receivers* against *their* clocks, so it must
    // be real wall time, never a test or manual clock: this is the sanctioned read.
    #[allow(clippy::disallowed_methods)]
    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn nanos() -> u64 {
        Self::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Now, in whole seconds since the Unix epoch (0 if the clock is before it).
fn unix_seconds_now() -> i64 {
    WallClock::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    const KEY: &[u8] = b"test-webhook-key-0123456789abcdef";

    /// Test retries take milliseconds, not minutes.
    fn fast() -> Tuning {
        Tuning {
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(100),
            ..Tuning::default()
        }
    }

    fn config(addr: SocketAddr) -> WebhookConfig {
        WebhookConfig {
            url: format!("http://{addr}/hooks/approvals"),
            hmac_key: KEY.to_vec(),
            timeout: Duration::from_secs(5),
        }
    }

    fn sample(id: &str) -> Notification {
        Notification {
            event: "access_request.pending".into(),
            access_request_id: id.into(),
            profile: "db-admin".into(),
            requester: "spiffe://example.org/ns/ops/sa/alice".into(),
            state: "pending".into(),
            approvers_notified: vec!["spiffe://example.org/ns/ops/sa/bob".into()],
            break_glass: false,
            time_ms: 1_767_225_600_000,
            reason: Some("incident 42: \"quoted\" and ünïcode".into()),
        }
    }

    /// A request as the test server saw it.
    #[derive(Debug)]
    struct Received {
        request_line: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Received {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    async fn read_request(stream: &mut TcpStream) -> std::io::Result<Received> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|l| l.split_once(':').unwrap())
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .unwrap()
            .1
            .parse()
            .unwrap();
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(body.len(), len, "body longer than Content-Length");
        Ok(Received {
            request_line,
            headers,
            body,
        })
    }

    /// A tiny HTTP server: answers each request with the next of `statuses` (200 once
    /// they run out). Each request is reported on `seen` *before* it is answered, so
    /// once the notifier has counted an outcome the test already has the request.
    fn serve(listener: TcpListener, statuses: Vec<u16>) -> mpsc::UnboundedReceiver<Received> {
        let (seen, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let Ok(req) = read_request(&mut stream).await else {
                    continue;
                };
                let status = statuses.next().unwrap_or(200);
                let _ = seen.send(req);
                let reason = if status == 200 { "OK" } else { "Nope" };
                let answer = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        rx
    }

    /// Waits (bounded, so a bug fails instead of hanging) until `done` holds; re-checked
    /// after every finished delivery attempt rather than on a timer.
    async fn wait_until(notifier: &Notifier, done: impl Fn(&Notifier, u64) -> bool) {
        let mut attempts = notifier.counters.attempts.subscribe();
        tokio::time::timeout(
            Duration::from_secs(20),
            attempts.wait_for(|&n| done(notifier, n)),
        )
        .await
        .expect("timed out waiting for the notifier")
        .expect("counters dropped");
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Received>) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }

    /// An address with nothing listening on it.
    async fn closed_addr() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// Checks a received request's signature exactly as a receiver would, with ring
    /// directly rather than this module's `sign`.
    fn assert_signed(req: &Received) {
        let ts = req.header("X-Spiffe-Broker-Timestamp").unwrap();
        let ts_num: i64 = ts.parse().unwrap();
        assert!(
            (unix_seconds_now() - ts_num).abs() < 300,
            "stale timestamp {ts}"
        );
        let sig = req
            .header("X-Spiffe-Broker-Signature")
            .unwrap()
            .strip_prefix("sha256=")
            .unwrap();
        assert_eq!(sig.len(), 64);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(&req.body);
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
        hmac::verify(&key, &signed, &hex::decode(sig).unwrap()).expect("signature must verify");
        // And a tampered timestamp must not.
        let mut replayed = format!("{}.", ts_num + 1).into_bytes();
        replayed.extend_from_slice(&req.body);
        assert!(hmac::verify(&key, &replayed, &hex::decode(sig).unwrap()).is_err());
    }

    // (1)
    #[tokio::test]
    async fn delivers_signed_json() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut seen = serve(listener, vec![]);
        let notifier = Notifier::spawn(Some(config(addr))).unwrap();

        let n = sample("ar-1");
        notifier.notify(n.clone());
        wait_until(&notifier, |n, _| n.delivered() == 1).await;

        let reqs = drain(&mut seen);
        assert_eq!(reqs.len(), 1);
        let req = &reqs[0];
        assert_eq!(req.request_line, "POST /hooks/approvals HTTP/1.1");
        assert_eq!(req.header("Host"), Some(addr.to_string().as_str()));
        assert_eq!(req.header("Content-Type"), Some("application/json"));
        assert_eq!(
            req.header("Content-Length"),
            Some(req.body.len().to_string().as_str())
        );
        assert_eq!(
            req.header("X-Spiffe-Broker-Event"),
            Some("access_request.pending")
        );
        let delivery = req.header("X-Spiffe-Broker-Delivery").unwrap();
        assert_eq!(delivery.len(), 16);
        assert!(hex::decode(delivery).is_ok());
        assert_signed(req);

        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body, serde_json::to_value(&n).unwrap());
        assert_eq!(body["access_request_id"], "ar-1");
        assert_eq!(
            body["approvers_notified"][0],
            "spiffe://example.org/ns/ops/sa/bob"
        );
        assert_eq!(body["break_glass"], false);
        assert_eq!(body["time_ms"], 1_767_225_600_000_i64);

        assert_eq!((notifier.failed(), notifier.dropped()), (0, 0));
    }

    // (2)
    #[tokio::test]
    async fn retries_server_errors_then_delivers_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut seen = serve(listener, vec![500, 500, 200]);
        let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

        notifier.notify(sample("ar-2"));
        wait_until(&notifier, |n, _| n.delivered() == 1).await;

        let reqs = drain(&mut seen);
        assert_eq!(reqs.len(), 3, "two 500s then a 200");
        assert_eq!(notifier.delivered(), 1);
        assert_eq!(notifier.failed(), 0);
        // Retries are the same delivery (receivers dedupe on it), each signed afresh.
        let id = reqs[0].header("X-Spiffe-Broker-Delivery").unwrap();
        for r in &reqs {
            assert_eq!(r.header("X-Spiffe-Broker-Delivery"), Some(id));
            assert_eq!(r.body, reqs[0].body);
            assert_signed(r);
        }
    }

    // (3)
    #[tokio::test]
    async fn delivers_once_a_down_endpoint_comes_up() {
        let addr = closed_addr().await;
        let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

        notifier.notify(sample("ar-3"));
        // At least one attempt has been refused before anything listens.
        wait_until(&notifier, |_, attempts| attempts >= 1).await;
        assert_eq!(notifier.delivered(), 0);

        let listener = TcpListener::bind(addr).await.unwrap();
        let mut seen = serve(listener, vec![]);
        wait_until(&notifier, |n, _| n.delivered() == 1).await;

        let reqs = drain(&mut seen);
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&reqs[0].body).unwrap()
                ["access_request_id"],
            "ar-3"
        );
        assert_eq!(notifier.failed(), 0);
    }

    // (4)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notify_returns_at_once_while_endpoint_hangs() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Accept, never read, never answer; hold the sockets open.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                let _ = accepted_tx.send(());
            }
        });
        let cfg = WebhookConfig {
            timeout: Duration::from_millis(200),
            ..config(addr)
        };
        let notifier = Notifier::spawn_tuned(Some(cfg), fast()).unwrap();

        let start = Instant::now();
        notifier.notify(sample("ar-4a"));
        let first = start.elapsed();

        // The delivery task is now connected and stuck waiting for an answer.
        accepted.recv().await.unwrap();
        let start = Instant::now();
        notifier.notify(sample("ar-4b"));
        let second = start.elapsed();

        assert!(first < Duration::from_millis(50), "notify took {first:?}");
        assert!(second < Duration::from_millis(50), "notify took {second:?}");

        // The hung attempt is abandoned at the timeout instead of blocking the queue.
        wait_until(&notifier, |_, attempts| attempts >= 1).await;
        assert_eq!(notifier.delivered(), 0);
        assert_eq!(notifier.dropped(), 0);
    }

    // (5)
    #[tokio::test(flavor = "current_thread")]
    async fn full_queue_drops_and_counts() {
        let notifier = Notifier::spawn(Some(config(closed_addr().await))).unwrap();
        // On a current-thread runtime the delivery task cannot run until this test
        // awaits, so nothing drains the queue while it is filled: exactly
        // QUEUE_CAPACITY fit and the rest are dropped.
        for i in 0..QUEUE_CAPACITY + 5 {
            notifier.notify(sample(&format!("ar-5-{i}")));
        }
        assert_eq!(notifier.dropped(), 5);
        assert_eq!((notifier.delivered(), notifier.failed()), (0, 0));
    }

    // (6)
    #[test]
    fn noop_notifier_accepts_events_without_a_runtime() {
        let notifier = Notifier::spawn(None).unwrap();
        for i in 0..3 {
            notifier.notify(sample(&format!("ar-6-{i}")));
        }
        assert_eq!(
            (notifier.delivered(), notifier.failed(), notifier.dropped()),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_and_moves_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut seen = serve(listener, vec![503, 503, 503]);
        let tuning = Tuning {
            max_attempts: 3,
            ..fast()
        };
        let notifier = Notifier::spawn_tuned(Some(config(addr)), tuning).unwrap();

        notifier.notify(sample("ar-7a"));
        notifier.notify(sample("ar-7b"));
        wait_until(&notifier, |n, _| n.failed() == 1 && n.delivered() == 1).await;

        let ids: Vec<String> = drain(&mut seen)
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["access_request_id"]
                    .to_string()
            })
            .collect();
        assert_eq!(ids, ["\"ar-7a\"", "\"ar-7a\"", "\"ar-7a\"", "\"ar-7b\""]);
    }

    #[tokio::test]
    async fn delivers_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A failure on the first event must not let later ones overtake it.
        let mut seen = serve(listener, vec![500]);
        let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

        for i in 0..5 {
            notifier.notify(sample(&format!("ar-8-{i}")));
        }
        wait_until(&notifier, |n, _| n.delivered() == 5).await;

        let ids: Vec<String> = drain(&mut seen)
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["access_request_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            ids,
            ["ar-8-0", "ar-8-0", "ar-8-1", "ar-8-2", "ar-8-3", "ar-8-4"]
        );
    }

    #[tokio::test]
    async fn interim_1xx_is_skipped_and_non_http_answer_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let answers: [&[u8]; 2] = [
                b"garbage\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            ];
            for answer in answers {
                let (mut stream, _) = listener.accept().await.unwrap();
                read_request(&mut stream).await.unwrap();
                stream.write_all(answer).await.unwrap();
            }
        });
        let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();
        notifier.notify(sample("ar-9"));
        wait_until(&notifier, |n, _| n.delivered() == 1).await;
        assert_eq!(*notifier.counters.attempts.borrow(), 2);
    }

    #[test]
    fn url_parsing() {
        let ok = |url: &str| Endpoint::parse(url).unwrap();
        let shape = |url: &str| {
            let e = ok(url);
            (e.scheme, e.authority, e.path)
        };
        let expect = |scheme: &'static str, authority: &str, path: &str| {
            (scheme, authority.to_owned(), path.to_owned())
        };
        assert_eq!(
            shape("http://example.com"),
            expect("http", "example.com", "/")
        );
        assert_eq!(
            shape("HTTP://hooks.internal:8080/a/b?x=1"),
            expect("http", "hooks.internal:8080", "/a/b?x=1")
        );
        assert_eq!(
            shape("http://127.0.0.1:9/"),
            expect("http", "127.0.0.1:9", "/")
        );
        assert_eq!(
            shape("http://[::1]:8443/h"),
            expect("http", "[::1]:8443", "/h")
        );
        // https: port 443 by default, and the default port is not repeated.
        assert_eq!(
            shape("https://example.com"),
            expect("https", "example.com", "/")
        );
        assert_eq!(
            shape("HTTPS://example.com:443/h"),
            expect("https", "example.com", "/h")
        );
        assert_eq!(
            shape("https://h:8443/x?t=1"),
            expect("https", "h:8443", "/x?t=1")
        );
        assert_eq!(shape("http://h:443/"), expect("http", "h:443", "/"));
        assert_eq!(shape("https://h:80/"), expect("https", "h:80", "/"));
        let e = ok("http://h?q");
        assert_eq!(e.path, "/?q");

        for bad in [
            "",
            "ftp://example.com/",
            "https://",
            "https://user:pw@h/",
            "https://h:0/",
            "example.com/hook",
            "http://",
            "http:///path",
            "http://:80/",
            "http://host:/",
            "http://host:0/",
            "http://host:65536/",
            "http://host:8x/",
            "http://host:1:2/",
            "http://[::1/",
            "http://[nope]/",
            "http://[::1]x/",
            "http://host/a b",
            "http://host/a\r\nX-Evil: 1",
            "http://host/#frag",
            "http://ho st/",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(NotifyError::InvalidUrl(_))),
                "{bad:?} should be rejected"
            );
        }
        // The error never echoes the URL, which may carry a secret.
        let err = Endpoint::parse("http://user:hunter2@host/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn spawn_rejects_bad_config() {
        let cfg = |url: &str, key: &[u8], timeout| WebhookConfig {
            url: url.into(),
            hmac_key: key.to_vec(),
            timeout,
        };
        let t = Duration::from_secs(1);
        assert!(matches!(
            Notifier::spawn(Some(cfg("ftp://h/", KEY, t))),
            Err(NotifyError::InvalidUrl(_))
        ));
        assert!(matches!(
            Notifier::spawn(Some(cfg("http://h/", b"", t))),
            Err(NotifyError::EmptyKey)
        ));
        assert!(matches!(
            Notifier::spawn(Some(cfg("http://h/", KEY, Duration::ZERO))),
            Err(NotifyError::ZeroTimeout)
        ));
        // No runtime here: an error, not a panic.
        assert!(matches!(
            Notifier::spawn(Some(cfg("http://h/", KEY, t))),
            Err(NotifyError::NoRuntime)
        ));
    }

    #[test]
    fn debug_never_shows_the_key_or_url() {
        let cfg = WebhookConfig {
            url: "http://h/hook?token=s3cret".into(),
            hmac_key: b"k3y".to_vec(),
            timeout: Duration::from_secs(1),
        };
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("107, 51, 121"),
            "{shown}"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        for retry in 1..=20u32 {
            let full = base.saturating_mul(1u32 << (retry - 1).min(31)).min(cap);
            let lo = backoff_delay(retry, base, cap, 0);
            let hi = backoff_delay(retry, base, cap, u64::MAX);
            assert_eq!(lo, full / 2, "retry {retry}");
            assert!(hi >= lo && hi <= full, "retry {retry}: {hi:?} vs {full:?}");
            for entropy in [1, 12_345, 0xdead_beef_cafe] {
                let d = backoff_delay(retry, base, cap, entropy);
                assert!(d >= lo && d <= full);
            }
        }
        assert_eq!(backoff_delay(1, base, cap, 0), Duration::from_millis(250));
        assert_eq!(backoff_delay(40, base, cap, 0), Duration::from_secs(30));
        assert_eq!(backoff_delay(1000, base, cap, u64::MAX).max(cap), cap);
    }

    #[test]
    fn signature_matches_the_documented_recipe() {
        // Fixed vector from outside this code, so a receiver implementation can be
        // checked against it too:
        // printf '%s.%s' 1700000000 '{}' | openssl dgst -sha256 -hmac key
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"key");
        assert_eq!(
            sign(&key, 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn event_header_cannot_inject() {
        let ep = Endpoint::parse("https://h/").unwrap();
        let req = build_request(&ep, "x\r\nX-Evil: 1", "00", 1, "sha256=00", b"{}").unwrap();
        assert_eq!(
            req.headers()
                .get("x-spiffe-broker-event")
                .and_then(|v| v.to_str().ok()),
            Some("x__X-Evil: 1")
        );
        assert!(req.headers().get("x-evil").is_none());
        assert_eq!(req.uri().to_string(), "https://h/");
        assert_eq!(req.body(), b"{}");
    }

    /// Over https, through the platform's trust store: a receiver whose certificate no
    /// trusted CA signed gets nothing, and the failure names only scheme, host and port.
    #[tokio::test]
    async fn https_receivers_are_authenticated() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (handshakes_tx, mut handshakes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let ok = acceptor.accept(tcp).await.is_ok();
                let _ = handshakes_tx.send(ok);
            }
        });
        let cfg = WebhookConfig {
            url: format!("https://{addr}/hooks?token=s3cret"),
            ..config(addr)
        };
        let tuning = Tuning {
            max_attempts: 2,
            ..fast()
        };
        let notifier = Notifier::spawn_tuned(Some(cfg), tuning).unwrap();
        notifier.notify(sample("ar-10"));
        wait_until(&notifier, |n, _| n.failed() == 1).await;
        assert_eq!(notifier.delivered(), 0);
        // The TLS handshakes were attempted and refused by the broker's side.
        assert_eq!(handshakes.recv().await, Some(false));
    }
}
