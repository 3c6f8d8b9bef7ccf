//! Audit sinks: every committed entry reaches the sink once, in order, across receiver
//! outages and broker restarts; a sink that is down never holds up an issuance. Receivers:
//! a file, an OTLP/gRPC receiver built from OpenTelemetry's published protos, and
//! Debian's rsyslog over TCP+TLS (`syslog_rsyslog.rs`).

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{gpu_request, Harness, DEPLOY_AGENT};
use spiffe_broker::clock::Clock;
use spiffe_broker::config::{AuditSinkConfig, SinkKind};
use spiffe_broker::proto::opentelemetry::proto::collector::logs::v1::{
    logs_service_server::{LogsService, LogsServiceServer},
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use spiffe_broker::proto::opentelemetry::proto::common::v1::any_value;
use spiffe_broker::sinks::{Pass, Shipper};
use spiffe_broker::store::export::ExportEntry;

pub fn shipper(h: &Harness, name: &str, kind: SinkKind, holder: &str) -> Shipper {
    let config = AuditSinkConfig {
        name: name.into(),
        kind,
        batch: 500,
        retry_max: Duration::from_secs(30),
    };
    Shipper::new(
        config,
        h.env.broker.store().clone(),
        h.env.broker.metrics().clone(),
        h.clock.clone(),
        holder.into(),
    )
    .expect("sink opens")
}

/// Issues `n` credentials as the deploy agent.
pub async fn issue(h: &Harness, n: usize) {
    let mut client = h.broker_as(DEPLOY_AGENT).await;
    for _ in 0..n {
        client
            .issue_credential(gpu_request(600))
            .await
            .expect("issued");
    }
}

/// The log's last sequence.
pub async fn log_size(h: &Harness) -> u64 {
    let store = h.env.broker.store();
    let mut after = 0;
    loop {
        let batch = store.audit_entries(after, 1000).await.expect("read");
        match batch.last() {
            Some(e) => after = e.seq,
            None => return after,
        }
    }
}

/// Every committed entry (the tests' logs are small).
pub async fn committed(h: &Harness) -> Vec<spiffe_broker::audit::StoredEntry> {
    h.env
        .broker
        .store()
        .audit_entries(0, 10_000)
        .await
        .expect("read the log")
}

/// Passes until the sink has nothing left to ship.
pub async fn drain(s: &mut Shipper) {
    while s.pass().await.expect("delivered") == Pass::More {}
}

fn lines(path: &Path) -> Vec<ExportEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an entry per line"))
        .collect()
}

/// Every entry of the log, 1..=size, once, in order, chained.
pub fn assert_whole_chain(entries: &[ExportEntry], size: u64) {
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=size).collect::<Vec<_>>(),
        "each entry once, in order"
    );
    for w in entries.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash, "chained at {}", w[1].seq);
    }
}

fn file_sink(path: &Path, max_bytes: u64, max_age: Option<Duration>) -> SinkKind {
    SinkKind::File {
        path: path.to_owned(),
        max_bytes,
        max_age,
        keep: 3,
    }
}

#[tokio::test]
async fn a_file_sink_gets_every_entry_once_and_resumes_without_repeating() {
    let h = common::start().await;
    let path = h.dir.path().join("audit.jsonl");
    issue(&h, 3).await;
    let mut a = shipper(&h, "siem", file_sink(&path, 1 << 30, None), "a");
    drain(&mut a).await;
    let size = log_size(&h).await;
    assert_whole_chain(&lines(&path), size);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path)
            .expect("test step")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Another broker cannot ship the sink while this one holds it.
    issue(&h, 2).await;
    let mut b = shipper(&h, "siem", file_sink(&path, 1 << 30, None), "b");
    assert_eq!(b.pass().await.expect("test step"), Pass::Idle);
    assert_eq!(lines(&path).len() as u64, size, "b shipped nothing");

    // `a` dies after writing the next entries but before storing its position (the
    // file has them, the ledger says it does not): once its hold lapses, `b` takes over
    // and the file still holds each entry once. A torn last line is cut off first.
    let store = h.env.broker.store();
    let next = store.audit_entries(size, 1).await.expect("test step");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("test step");
    use std::io::Write;
    writeln!(
        file,
        "{}",
        serde_json::to_string(&ExportEntry::from(&next[0])).expect("test step")
    )
    .expect("test step");
    write!(file, "{{\"seq\":{},\"kind\":\"iss", size + 2).expect("test step");
    drop(file);
    h.clock.advance(Duration::from_secs(61));
    drain(&mut b).await;
    let size = log_size(&h).await;
    assert_whole_chain(&lines(&path), size);
    // And `a`, back late, finds the sink taken.
    assert_eq!(a.pass().await.expect("test step"), Pass::Idle);
}

#[tokio::test]
async fn a_file_sink_rotates_by_size_and_by_age_keeping_the_newest_files() {
    let h = common::start().await;
    let path = h.dir.path().join("audit.jsonl");
    let rotated = |k: u32| PathBuf::from(format!("{}.{k}", path.display()));
    issue(&h, 30).await;
    // Entries are 1-2 KiB: 4 KiB files hold two or three.
    let mut s = shipper(&h, "siem", file_sink(&path, 4096, None), "a");
    drain(&mut s).await;
    let mut all = Vec::new();
    for k in (1..=3).rev() {
        let part = lines(&rotated(k));
        assert!(!part.is_empty(), "{k} kept");
        assert!(std::fs::metadata(rotated(k)).expect("test step").len() <= 4096);
        all.extend(part);
    }
    assert!(!rotated(4).exists(), "only `keep` = 3 rotated files");
    all.extend(lines(&path));
    let size = log_size(&h).await;
    let first = all[0].seq;
    assert!(first > 1, "the oldest files were dropped");
    assert_whole_chain(
        &all.iter()
            .map(|e| ExportEntry {
                seq: e.seq - first + 1,
                ..e.clone()
            })
            .collect::<Vec<_>>(),
        size - first + 1,
    );

    // By age: entries an hour apart (the broker's clock) start a new file.
    let aged = h.dir.path().join("aged.jsonl");
    let mut s = shipper(
        &h,
        "aged",
        file_sink(&aged, 1 << 30, Some(Duration::from_secs(3600))),
        "a",
    );
    drain(&mut s).await;
    let before = lines(&aged).len();
    h.clock.advance(Duration::from_secs(3600));
    issue(&h, 1).await;
    drain(&mut s).await;
    assert_eq!(
        lines(&rotated_of(&aged, 1)).len(),
        before,
        "the old hour rotated out"
    );
    assert!(!lines(&aged).is_empty());
}

fn rotated_of(path: &Path, k: u32) -> PathBuf {
    PathBuf::from(format!("{}.{k}", path.display()))
}

/// What the receiver got, by sequence: times received, kind, body.
type Received = BTreeMap<i64, (usize, String, String)>;

/// An OTLP logs receiver from the published protos: records what it accepts, by
/// sequence; answers UNAVAILABLE while down.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Received>>,
    down: Arc<Mutex<bool>>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if *self.down.lock().expect("test step") {
            return Err(tonic::Status::unavailable("collector down"));
        }
        let mut got = self.got.lock().expect("test step");
        for rl in request.into_inner().resource_logs {
            let service = rl.resource.expect("test step").attributes[0].clone();
            assert_eq!(service.key, "service.name");
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    let attr = |k: &str| {
                        r.attributes
                            .iter()
                            .find(|a| a.key == k)
                            .and_then(|a| a.value.clone()?.value)
                    };
                    let Some(any_value::Value::IntValue(seq)) = attr("audit.seq") else {
                        panic!("audit.seq");
                    };
                    let Some(any_value::Value::StringValue(kind)) = attr("audit.kind") else {
                        panic!("audit.kind");
                    };
                    let Some(any_value::Value::StringValue(body)) =
                        r.body.expect("test step").value
                    else {
                        panic!("body");
                    };
                    assert_eq!(r.event_name, format!("spiffe_broker.audit.{kind}"));
                    let time_ms: i64 = serde_json::from_str::<serde_json::Value>(&body)
                        .expect("test step")["time_ms"]
                        .as_i64()
                        .expect("test step");
                    assert_eq!(r.time_unix_nano, time_ms as u64 * 1_000_000);
                    got.entry(seq).or_insert((0, kind, body)).0 += 1;
                }
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

async fn start_receiver(r: Receiver) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("test step");
    let addr = listener.local_addr().expect("test step");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(r))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

#[tokio::test]
async fn an_otlp_collector_down_for_a_while_gets_every_entry_exactly_once() {
    let h = common::start().await;
    let receiver = Receiver::default();
    let endpoint = start_receiver(receiver.clone()).await;
    issue(&h, 2).await;
    let kind = SinkKind::Otlp {
        endpoint,
        ca_file: None,
    };
    let mut s = shipper(&h, "otel", kind.clone(), "a");
    drain(&mut s).await;

    *receiver.down.lock().expect("test step") = true;
    issue(&h, 3).await;
    assert!(s.pass().await.is_err(), "the collector refuses");
    assert!(s.pass().await.is_err(), "and again: nothing moves on");
    *receiver.down.lock().expect("test step") = false;
    // A broker restart in between: a new shipper resumes from the stored position.
    drop(s);
    h.clock.advance(Duration::from_secs(61));
    let mut s = shipper(&h, "otel", kind, "b");
    drain(&mut s).await;

    let got = receiver.got.lock().expect("test step").clone();
    let size = log_size(&h).await;
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (1..=size as i64).collect::<Vec<_>>()
    );
    assert!(
        got.values().all(|(n, _, _)| *n == 1),
        "exactly once: {got:?}"
    );
    for e in committed(&h).await {
        let (_, kind, body) = &got[&(e.seq as i64)];
        assert_eq!((kind, body), (&e.kind, &e.body), "the entry as committed");
    }
    let metrics = h.http_get("/metrics").await.1;
    assert!(
        metrics.contains("spiffe_broker_audit_sink_lag_entries{sink=\"otel\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spiffe_broker_audit_sink_failures_total{sink=\"otel\"} "),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_configured_sink_ships_in_the_background_and_one_that_is_down_blocks_nothing() {
    let dir = tempfile::tempdir().expect("test step");
    let file = dir.path().join("audit.jsonl");
    // A port nothing listens on: the syslog sink fails and retries, issuance goes on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("test step");
    let dead_addr = dead.local_addr().expect("test step");
    drop(dead);
    let sinks = format!(
        "\n[[audit_sinks]]\nname = \"siem\"\ntype = \"file\"\npath = \"{}\"\n\n[[audit_sinks]]\nname = \"down\"\ntype = \"syslog\"\naddress = \"{dead_addr}\"\n",
        file.display()
    );
    let h = common::start_with(Some(Box::new(move |c| c + &sinks))).await;
    issue(&h, 3).await;
    let size = log_size(&h).await;
    // The shipper polls every second; wait (bounded) for it, no fixed sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (lines(&file).len() as u64) < size {
        assert!(std::time::Instant::now() < deadline, "shipped in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_whole_chain(&lines(&file)[..size as usize], size);
    let metrics = h.http_get("/metrics").await.1;
    assert!(
        metrics.contains("spiffe_broker_audit_sink_failures_total{sink=\"down\"} "),
        "{metrics}"
    );
    let _ = h.clock.now();
}
