//! OpenTelemetry tracing: a request's spans (RPC, authentication, policy, backend, ledger
//! commit) reach an OTLP trace receiver built from the published protos, in the trace the
//! caller named with W3C `traceparent`, and the ledger entry records that trace id.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{gpu_request, DEPLOY_AGENT};
use spiffe_broker::proto::opentelemetry::proto::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use spiffe_broker::proto::opentelemetry::proto::trace::v1::Span;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer as _;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                got.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_traced_issuance_is_one_trace_from_the_rpc_to_the_ledger_commit() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The broker's subscriber, as `serve` installs it (this test's thread runs the broker).
    let subscriber = tracing_subscriber::registry().with(
        spiffe_broker::telemetry::OtlpLayer.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("spiffe_broker", tracing::Level::DEBUG),
        ),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    spiffe_broker::telemetry::start(&endpoint, None).expect("exporter starts");

    let h = common::start().await;
    // This thread's subscriber came after the other tests' threads (no subscriber) began
    // registering the broker's callsites: a callsite registered concurrently with
    // `set_default` keeps the interest computed without it. `serve` installs its
    // subscriber before any span exists; here the cache is rebuilt once every callsite
    // the test uses has registered.
    tracing::callsite::rebuild_interest_cache();
    let mut client = h.broker_as(DEPLOY_AGENT).await;
    let mut request = tonic::Request::new(gpu_request(600));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01")
            .parse()
            .expect("ascii"),
    );
    let issued = client.issue_credential(request).await.expect("issued");
    let lease = issued.into_inner().lease.expect("lease").id;
    // And one without a traceparent: a trace of its own.
    let other = client
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease")
        .id;

    // The exporter sends within a second; wait (bounded) for the commit's span.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<Span> = receiver
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| hex::encode(&s.trace_id) == TRACE)
            .cloned()
            .collect();
        if spans.iter().any(|s| s.name == "ledger.commit") || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let named = |n: &str| {
        spans.iter().find(|s| s.name == n).unwrap_or_else(|| {
            let all: Vec<_> = receiver
                .0
                .lock()
                .expect("lock")
                .iter()
                .map(|s| (s.name.clone(), hex::encode(&s.trace_id)))
                .collect();
            panic!(
                "no {n} span in {:?}; all received: {all:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let rpc = named("rpc");
    assert_eq!(
        hex::encode(&rpc.parent_span_id),
        CALLER_SPAN,
        "continues the caller's span"
    );
    assert!(rpc
        .attributes
        .iter()
        .any(|a| a.key == "rpc.method" && format!("{:?}", a.value).contains("IssueCredential")));
    // Every other step descends from the RPC span, and ends within it.
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    for step in ["authn", "policy", "backend", "ledger.commit"] {
        let s = named(step);
        let mut at = s;
        while at.span_id != rpc.span_id {
            at = by_id(&at.parent_span_id).unwrap_or_else(|| panic!("{step}: broken parent chain"));
        }
        assert!(rpc.start_time_unix_nano <= s.start_time_unix_nano);
        assert!(s.end_time_unix_nano <= rpc.end_time_unix_nano);
    }

    // The ledger's issue entry names the trace; the untraced request got another one.
    let bodies = h.audit_bodies();
    let entry = |l: &str| {
        bodies
            .iter()
            .find(|b| b["kind"] == "issue" && b["lease_id"] == l)
            .expect("issue entry")
            .clone()
    };
    assert_eq!(entry(&lease)["trace_id"], TRACE);
    let fresh = entry(&other)["trace_id"]
        .as_str()
        .expect("a trace id")
        .to_owned();
    assert_eq!(fresh.len(), 32);
    assert_ne!(fresh, TRACE);
}
