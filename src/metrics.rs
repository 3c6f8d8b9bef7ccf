//! Prometheus metrics. Counters count; nothing here ever carries a credential or a
//! secret (labels are profile names, RPC names and fixed reason categories).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// All of the broker's metrics.
pub struct Metrics {
    registry: Registry,
    issued: Family<Labels, Counter>,
    denied: Family<Labels, Counter>,
    /// Failed authentication attempts.
    pub authn_failures: Counter,
    /// Failed authentication attempts over the per-peer recording limit (counted only).
    pub authn_failures_unrecorded: Counter,
    /// Calls refused by a rate limit and only counted (each caller gets one summarising
    /// ledger entry per interval instead of one entry per refusal).
    pub throttled_unrecorded: Counter,
    rpc_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    /// Batches that failed to commit.
    pub ledger_failures: Counter,
    /// Break-glass issuances (each one is also loud in the log and the ledger).
    pub break_glass: Counter,
    /// Requests a credential backend (Vault, STS, CSR checks) failed or refused.
    pub backend_failures: Counter,
    /// Backend revocations that failed at least `STUCK_AFTER_ATTEMPTS` times and are
    /// still being retried (`spiffe-broker leases --stuck`).
    pub backend_revocations_stuck: Gauge,
    /// 1 while the broker can serve (its own SVID is valid), else 0.
    pub ready: Gauge,
    /// When the broker's own SVID expires (Unix seconds; 0: it has none).
    pub own_svid_expiry: Gauge,
    /// Spans the tracing exporter dropped (queue full, collector down).
    pub spans_dropped: Counter,
    sink_lag: Family<Labels, Gauge>,
    sink_shipped: Family<Labels, Counter>,
    sink_failures: Family<Labels, Counter>,
    witness_failures: Family<Labels, Counter>,
    witness_size: Family<Labels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spiffe_broker");
        let issued = Family::<Labels, Counter>::default();
        let denied = Family::<Labels, Counter>::default();
        let authn_failures = Counter::default();
        let authn_failures_unrecorded = Counter::default();
        let throttled_unrecorded = Counter::default();
        let rpc_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let commit_seconds = latency_histogram();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let ledger_failures = Counter::default();
        let break_glass = Counter::default();
        let backend_failures = Counter::default();
        let backend_revocations_stuck = Gauge::default();
        let ready = Gauge::default();
        let own_svid_expiry = Gauge::default();
        let spans_dropped = Counter::default();
        registry.register(
            "tracing_spans_dropped",
            "Spans the OpenTelemetry exporter dropped (queue full or collector down)",
            spans_dropped.clone(),
        );
        let sink_lag = Family::<Labels, Gauge>::default();
        let sink_shipped = Family::<Labels, Counter>::default();
        let sink_failures = Family::<Labels, Counter>::default();
        registry.register(
            "audit_sink_lag_entries",
            "Committed audit entries an audit sink does not have yet",
            sink_lag.clone(),
        );
        registry.register(
            "audit_sink_shipped_entries",
            "Audit entries delivered to an audit sink",
            sink_shipped.clone(),
        );
        registry.register(
            "audit_sink_failures",
            "Failed deliveries to an audit sink (retried from the same entry)",
            sink_failures.clone(),
        );
        let witness_failures = Family::<Labels, Counter>::default();
        let witness_size = Family::<Labels, Gauge>::default();
        registry.register(
            "witness_failures",
            "Checkpoint submissions a witness refused or did not answer (a refusal on \
             consistency means a split view or a rollback)",
            witness_failures.clone(),
        );
        registry.register(
            "witness_cosigned_size",
            "The largest audit-log tree size a witness has cosigned",
            witness_size.clone(),
        );
        registry.register(
            "ready",
            "1 while the broker can serve (its own SVID is valid), else 0",
            ready.clone(),
        );
        registry.register(
            "own_svid_expiry_timestamp_seconds",
            "When the broker's own X.509-SVID expires (Unix seconds; 0 without one)",
            own_svid_expiry.clone(),
        );
        registry.register(
            "backend_failures",
            "Issuances or renewals a credential backend failed or refused",
            backend_failures.clone(),
        );
        registry.register(
            "backend_revocations_stuck",
            "Backend revocations that keep failing and are still retried",
            backend_revocations_stuck.clone(),
        );
        registry.register(
            "break_glass_issuances",
            "Credentials issued under break-glass, awaiting post-review",
            break_glass.clone(),
        );
        registry.register(
            "credentials_issued",
            "Credentials issued (including renewals)",
            issued.clone(),
        );
        registry.register(
            "requests_denied",
            "Requests refused by policy or lease state",
            denied.clone(),
        );
        registry.register(
            "authn_failures",
            "Requests that failed SPIFFE authentication",
            authn_failures.clone(),
        );
        registry.register(
            "authn_failures_unrecorded",
            "Failed authentications over the per-peer ledger limit: counted, not written",
            authn_failures_unrecorded.clone(),
        );
        registry.register(
            "throttled_unrecorded",
            "Calls refused by a rate limit that were counted into a summary entry, not written one by one",
            throttled_unrecorded.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "RPC latency by method",
            rpc_seconds.clone(),
        );
        registry.register(
            "ledger_commit_duration_seconds",
            "Time for one durable ledger commit (one fsync)",
            commit_seconds.clone(),
        );
        registry.register(
            "ledger_commit_batch_size",
            "Operations sharing one ledger commit",
            batch_size.clone(),
        );
        registry.register(
            "ledger_commit_failures",
            "Ledger batches that failed to commit",
            ledger_failures.clone(),
        );
        Self {
            registry,
            issued,
            denied,
            authn_failures,
            authn_failures_unrecorded,
            throttled_unrecorded,
            rpc_seconds,
            commit_seconds,
            batch_size,
            ledger_failures,
            break_glass,
            backend_failures,
            backend_revocations_stuck,
            ready,
            own_svid_expiry,
            spans_dropped,
            sink_lag,
            sink_shipped,
            sink_failures,
            witness_failures,
            witness_size,
        }
    }

    /// An audit sink's state after a pass: entries it lacks, entries it just got.
    pub fn observe_sink(&self, sink: &str, lag: u64, shipped: u64) {
        let l = vec![("sink".to_owned(), sink.to_owned())];
        self.sink_lag
            .get_or_create(&l)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        self.sink_shipped.get_or_create(&l).inc_by(shipped);
    }

    /// Counts a checkpoint a witness did not cosign.
    pub fn witness_failed(&self, witness: &str) {
        self.witness_failures
            .get_or_create(&vec![("witness".to_owned(), witness.to_owned())])
            .inc();
    }

    /// Records the tree size a witness cosigned.
    pub fn witness_cosigned(&self, witness: &str, size: u64) {
        self.witness_size
            .get_or_create(&vec![("witness".to_owned(), witness.to_owned())])
            .set(size as i64);
    }

    /// Counts a failed delivery to an audit sink.
    pub fn sink_failed(&self, sink: &str) {
        self.sink_failures
            .get_or_create(&vec![("sink".to_owned(), sink.to_owned())])
            .inc();
    }

    /// Counts an issued credential.
    pub fn issued(&self, profile: &str, kind: &str) {
        self.issued
            .get_or_create(&vec![
                ("profile".into(), profile.into()),
                ("op".into(), kind.into()),
            ])
            .inc();
    }

    /// Counts a denial by category.
    pub fn denied(&self, category: &str) {
        self.denied
            .get_or_create(&vec![("reason".into(), category.into())])
            .inc();
    }

    /// Records an RPC's latency.
    pub fn observe_rpc(&self, method: &str, d: Duration) {
        self.rpc_seconds
            .get_or_create(&vec![("method".into(), method.into())])
            .observe(d.as_secs_f64());
    }

    /// Records one ledger commit.
    pub fn observe_commit(&self, d: Duration, batch: usize) {
        self.commit_seconds.observe(d.as_secs_f64());
        self.batch_size.observe(batch as f64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
