//! The `otlp` sink: OpenTelemetry log records over OTLP/gRPC (`LogsService/Export`), one
//! record per entry: `time_unix_nano` the entry's time, the body the entry's canonical
//! JSON, attributes `audit.seq`, `audit.kind`, `audit.hash`, `audit.prev_hash`,
//! `audit.leaf_hash` and `audit.lease_id`, event name `spiffe_broker.audit.<kind>`,
//! severity WARN for refusals and INFO otherwise; resource `service.name=spiffe-broker`.
//! The collector's answer acknowledges the batch; records it reports as rejected
//! (partial success) are not retried, as OTLP asks, but logged and counted.

use futures::future::BoxFuture;
use tonic::transport::Channel;

use super::{Facts, Sink, SinkError};
use crate::audit::StoredEntry;
use crate::clock::{unix_millis, Clock, SystemClock};
use crate::config::{AuditSinkConfig, SinkKind};
use crate::otlp::{int, resource, text, OtlpEndpoint};
use crate::proto::opentelemetry::proto::collector::logs::v1::{
    logs_service_client::LogsServiceClient, ExportLogsServiceRequest,
};
use crate::proto::opentelemetry::proto::common::v1::{any_value, AnyValue, InstrumentationScope};
use crate::proto::opentelemetry::proto::logs::v1::{
    LogRecord, ResourceLogs, ScopeLogs, SeverityNumber,
};

/// The OTLP sink.
pub(super) struct OtlpSink {
    name: String,
    endpoint: OtlpEndpoint,
    client: Option<LogsServiceClient<Channel>>,
}

impl OtlpSink {
    pub(super) fn new(config: &AuditSinkConfig) -> Result<Self, SinkError> {
        let SinkKind::Otlp { endpoint, ca_file } = &config.kind else {
            unreachable!("an otlp sink's config")
        };
        Ok(Self {
            name: config.name.clone(),
            endpoint: OtlpEndpoint::new(endpoint, ca_file.as_deref()).map_err(SinkError)?,
            client: None,
        })
    }
}

/// One entry as a log record.
pub(crate) fn record(e: &StoredEntry, observed_ms: i64) -> LogRecord {
    let facts = Facts::of(e, observed_ms);
    let export = crate::store::export::ExportEntry::from(e);
    let (severity, severity_text) = if facts.is_warning() {
        (SeverityNumber::Warn, "WARN")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    let nanos = |ms: i64| u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000);
    let mut attributes = vec![
        int("audit.seq", e.seq as i64),
        text("audit.kind", e.kind.clone()),
        text("audit.hash", export.hash),
        text("audit.prev_hash", export.prev_hash),
        text("audit.leaf_hash", export.leaf_hash),
    ];
    if let Some(l) = &e.lease_id {
        attributes.push(text("audit.lease_id", l.clone()));
    }
    LogRecord {
        time_unix_nano: nanos(facts.time_ms),
        observed_time_unix_nano: nanos(observed_ms),
        severity_number: severity as i32,
        severity_text: severity_text.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(e.body.clone())),
        }),
        attributes,
        event_name: format!("spiffe_broker.audit.{}", e.kind),
        ..Default::default()
    }
}

impl Sink for OtlpSink {
    fn deliver<'a>(
        &'a mut self,
        entries: &'a [StoredEntry],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let observed = unix_millis(SystemClock.now());
            let request = ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: Some(resource()),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(InstrumentationScope {
                            name: "spiffe-broker.audit".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        log_records: entries.iter().map(|e| record(e, observed)).collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let mut client = match self.client.take() {
                Some(c) => c,
                None => LogsServiceClient::new(self.endpoint.channel().await.map_err(SinkError)?),
            };
            let answer = client.export(request).await.map_err(|s| {
                SinkError(format!(
                    "OTLP {}: {:?}: {}",
                    self.endpoint.shown,
                    s.code(),
                    s.message()
                ))
            })?;
            self.client = Some(client);
            if let Some(p) = answer.into_inner().partial_success {
                if p.rejected_log_records > 0 {
                    tracing::warn!(sink = %self.name, rejected = p.rejected_log_records, message = %p.error_message, "the OTLP collector rejected audit records; not retried");
                }
            }
            Ok(())
        })
    }
}
