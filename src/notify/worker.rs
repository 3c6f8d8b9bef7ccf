//! The one task that delivers queued notifications: in order, signed, retried with
//! back-off and jitter.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;

use super::endpoint::Endpoint;
use super::{Counters, Notification, Tuning};
use crate::clock::{Clock, SystemClock};
use crate::http_client::{HttpClient, HttpError};

/// Why one attempt did not count as delivered. Never carries the key or the URL path
/// (`HttpError` names only scheme, host and port).
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
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
pub(super) struct Worker {
    pub(super) key: hmac::Key,
    pub(super) endpoint: Endpoint,
    /// Pooled: consecutive deliveries reuse a kept-alive connection.
    pub(super) http: HttpClient,
    pub(super) timeout: Duration,
    pub(super) tuning: Tuning,
    pub(super) counters: Arc<Counters>,
    pub(super) rng: SystemRandom,
}

impl Worker {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Notification>) {
        // One event at a time, retries included: that is what keeps delivery in order.
        while let Some(n) = rx.recv().await {
            self.deliver(&n).await;
        }
        tracing::debug!(endpoint = %self.endpoint.authority, "webhook queue closed; delivery task exiting");
    }

    pub(super) async fn deliver(&self, n: &Notification) {
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
    pub(super) async fn attempt(
        &self,
        n: &Notification,
        delivery: &str,
        body: &[u8],
    ) -> Result<u16, AttemptError> {
        // Signed per attempt, so a retry after minutes still passes a receiver's
        // freshness check.
        let timestamp = SystemClock.unix_seconds();
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
    pub(super) fn delivery_id(&self) -> String {
        let mut id = [0u8; 8];
        if self.rng.fill(&mut id).is_err() {
            // The OS RNG failing is near impossible; an id only needs to be unique
            // enough for receivers to deduplicate, so the clock serves.
            tracing::warn!("system RNG failed; deriving the delivery id from the clock");
            // Jitter only: the sub-second part of the wall clock is entropy enough.
            let nanos = SystemClock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()));
            id = nanos.to_be_bytes();
        }
        hex::encode(id)
    }

    /// Randomness for back-off jitter; 0 (no jitter) if the RNG fails, which only
    /// loses the spreading of retries, not the retries.
    pub(super) fn entropy(&self) -> u64 {
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
pub(super) fn backoff_delay(retry: u32, base: Duration, cap: Duration, entropy: u64) -> Duration {
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
pub(super) fn sign(key: &hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// The signed POST. The body is sent as it was signed, byte for byte.
pub(super) fn build_request(
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
