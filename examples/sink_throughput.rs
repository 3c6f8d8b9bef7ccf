//! Audit sink throughput: fills a SQLite ledger with N entries (default 50,000, written
//! through the store's group commit), then ships them from position 0 to a JSON-lines file
//! sink and to an OTLP/gRPC sink (a local receiver from the published protos that only
//! counts), and prints entries per second for each — how fast a sink catches up after an
//! outage. Prints figures; asserts nothing.
//!
//! ```sh
//! cargo run --release --example sink_throughput -- --entries 50000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe_broker::audit::{AuditEvent, EventKind};
use spiffe_broker::clock::{unix_millis, Clock, SystemClock};
use spiffe_broker::config::{AuditSinkConfig, LedgerConfig, SinkKind};
use spiffe_broker::metrics::Metrics;
use spiffe_broker::proto::opentelemetry::proto::collector::logs::v1::{
    logs_service_server::{LogsService, LogsServiceServer},
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use spiffe_broker::sinks::{Pass, Shipper};
use spiffe_broker::store::{LedgerOp, SqliteStore, Store};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default, Clone)]
struct Counting(Arc<AtomicU64>);

#[tonic::async_trait]
impl LogsService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

async fn ship(name: &str, kind: SinkKind, store: Arc<dyn Store>, n: u64) -> f64 {
    let config = AuditSinkConfig {
        name: name.into(),
        kind,
        batch: 500,
        retry_max: Duration::from_secs(1),
    };
    let mut s = Shipper::new(
        config,
        store,
        Arc::new(Metrics::new()),
        Arc::new(SystemClock),
        "bench".into(),
    )
    .expect("sink");
    let started = Instant::now();
    while s.pass().await.expect("delivered") == Pass::More {}
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--entries", 50_000);
    let dir = tempfile::tempdir()?;
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(60),
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        postgres_sslmode: None,
        postgres_ca_file: None,
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
        &dir.path().join("ledger.db"),
        &cfg,
        Arc::new(Metrics::new()),
    )?);
    let filled = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(64) {
                let mut e =
                    AuditEvent::new(unix_millis(SystemClock.now()), EventKind::Deny, "deny");
                e.caller = Some(format!("spiffe://example.org/fleet/{}", i % 1000));
                e.reason = Some("unknown profile \"gpu-scheduler-submit-x\"".into());
                store
                    .apply(LedgerOp::Record { event: e })
                    .await
                    .expect("record");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "filled {n} entries in {:.1} s",
        filled.elapsed().as_secs_f64()
    );

    let file = dir.path().join("audit.jsonl");
    let rate = ship(
        "file",
        SinkKind::File {
            path: file.clone(),
            max_bytes: u64::MAX,
            max_age: None,
            keep: 1,
        },
        store.clone(),
        n,
    )
    .await;
    println!(
        "file sink: {rate:.0} entries/s ({:.1} MiB written, fsync per 500-entry batch)",
        std::fs::metadata(&file)?.len() as f64 / (1 << 20) as f64
    );

    let counted = Counting::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(counted.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let rate = ship(
        "otlp",
        SinkKind::Otlp {
            endpoint,
            ca_file: None,
        },
        store.clone(),
        n,
    )
    .await;
    println!(
        "otlp sink: {rate:.0} entries/s ({} records received)",
        counted.0.load(Ordering::Relaxed)
    );
    Ok(())
}
