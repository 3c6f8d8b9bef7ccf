//! OpenTelemetry tracing (off by default; `[tracing] otlp_endpoint`): the broker's own
//! `tracing` spans — the RPC, authentication, policy, the backend call, the ledger commit
//! — exported as OTLP spans to a collector. A span's trace is the request's
//! ([`TraceContext`]: the caller's W3C `traceparent`, or a fresh one), so the trace id an
//! auditor reads in a ledger entry finds the trace.
//!
//! The `rpc` span is at INFO (the JSON log lines of a request carry its trace id); its
//! steps are DEBUG spans, so logging at INFO formats none of them.
//!
//! Spans are collected by [`OtlpLayer`] (installed in the `tracing` subscriber; it does
//! nothing until [`start`] is called) into a bounded queue; one task sends them in batches.
//! A collector that is down or slow costs dropped spans (counted), never a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::clock::{Clock as _, SystemClock};
use crate::otlp::{int, resource, text, OtlpEndpoint};
use crate::proto::opentelemetry::proto::collector::trace::v1::{
    trace_service_client::TraceServiceClient, ExportTraceServiceRequest,
};
use crate::proto::opentelemetry::proto::common::v1::{InstrumentationScope, KeyValue};
use crate::proto::opentelemetry::proto::trace::v1::{
    span::SpanKind, ResourceSpans, ScopeSpans, Span,
};
use crate::traceparent::{span_id, TraceContext};

/// Where finished spans go once export is started.
static QUEUE: OnceLock<mpsc::Sender<Span>> = OnceLock::new();
/// Spans dropped because the queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Most spans waiting for export.
const QUEUE_LEN: usize = 8192;
/// Most spans per export request.
const BATCH: usize = 512;
/// Longest a finished span waits for its batch.
const FLUSH: Duration = Duration::from_secs(1);

/// The `tracing` layer that turns the broker's spans into OTLP spans.
#[derive(Debug, Default, Clone, Copy)]
pub struct OtlpLayer;

/// A span in progress.
struct Open {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start_ns: u64,
    attributes: Vec<KeyValue>,
}

struct Fields<'a>(&'a mut Vec<KeyValue>);

impl Visit for Fields<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push(int(field.name(), value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0
            .push(int(field.name(), i64::try_from(value).unwrap_or(i64::MAX)));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push(text(field.name(), value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push(text(field.name(), format!("{value:?}")));
    }
}

/// Span times are wall time, read through the clock seam like every other read of it.
fn now_ns() -> u64 {
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl<S> tracing_subscriber::Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if QUEUE.get().is_none() {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let parent = span.parent().and_then(|p| {
            p.extensions()
                .get::<Open>()
                .map(|o| (o.trace_id, o.span_id))
        });
        // A child continues its parent's trace; a root span, the request's.
        let (trace_id, parent_span_id) = match parent {
            Some((trace, parent)) => (trace, Some(parent)),
            None => {
                let t = TraceContext::current().unwrap_or_else(TraceContext::fresh);
                (t.trace_id, t.parent_span_id)
            }
        };
        let mut attributes = Vec::new();
        attrs.record(&mut Fields(&mut attributes));
        span.extensions_mut().insert(Open {
            trace_id,
            span_id: span_id(),
            parent_span_id,
            start_ns: now_ns(),
            attributes,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                values.record(&mut Fields(&mut open.attributes));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let (Some(queue), Some(span)) = (QUEUE.get(), ctx.span(&id)) else {
            return;
        };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let kind = if open.parent_span_id.is_none() || span.parent().is_none() {
            SpanKind::Server
        } else {
            SpanKind::Internal
        };
        let done = Span {
            trace_id: open.trace_id.to_vec(),
            span_id: open.span_id.to_vec(),
            parent_span_id: open.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: span.name().to_owned(),
            kind: kind as i32,
            start_time_unix_nano: open.start_ns,
            end_time_unix_nano: now_ns(),
            attributes: open.attributes,
            ..Default::default()
        };
        if queue.try_send(done).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts exporting to `endpoint` (once per process; later calls change nothing).
pub fn start(endpoint: &str, ca_file: Option<&std::path::Path>) -> Result<(), String> {
    let endpoint = OtlpEndpoint::new(endpoint, ca_file)?;
    let (tx, rx) = mpsc::channel(QUEUE_LEN);
    if QUEUE.set(tx).is_ok() {
        tokio::spawn(export(endpoint, rx));
    }
    Ok(())
}

/// Spans dropped so far (queue full or the collector refused them).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

async fn export(endpoint: OtlpEndpoint, mut rx: mpsc::Receiver<Span>) {
    let mut client: Option<TraceServiceClient<tonic::transport::Channel>> = None;
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "spiffe-broker".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let c = match client.take() {
            Some(c) => Ok(c),
            None => endpoint.channel().await.map(TraceServiceClient::new),
        };
        let sent = match c {
            Ok(mut c) => {
                let r = c.export(request).await.map_err(|s| s.message().to_owned());
                client = Some(c);
                r.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            DROPPED.fetch_add(n, Ordering::Relaxed);
            // An event, not a span: it does not feed the exporter that failed.
            tracing::warn!(collector = %endpoint.shown, error = %e, spans = n, "span export failed; spans dropped");
        }
    }
}
