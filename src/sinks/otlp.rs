//! The `otlp` sink: OpenTelemetry log records over OTLP/gRPC (`LogsService/Export`), one
//! record per entry: `time_unix_nano` the entry's time, the body the entry's canonical
//! JSON, attributes `audit.seq`, `audit.kind`, `audit.hash`, `audit.prev_hash`,
//! `audit.leaf_hash` and `audit.lease_id`, event name `spiffe_broker.audit.<kind>`,
//! severity WARN for refusals and INFO otherwise; resource `service.name=spiffe-broker`.
//! The collector's answer acknowledges the batch; records it reports as rejected
//! (partial success) are not retried, as OTLP asks, but logged and counted.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Facts, Sink, SinkError};
use crate::audit::StoredEntry;
use crate::clock::{unix_millis, Clock, SystemClock};
use crate::config::{AuditSinkConfig, SinkKind};
use crate::http_client::Trust;
use crate::proto::opentelemetry::proto::collector::logs::v1::{
    logs_service_client::LogsServiceClient, ExportLogsServiceRequest,
};
use crate::proto::opentelemetry::proto::common::v1::{
    any_value, AnyValue, InstrumentationScope, KeyValue,
};
use crate::proto::opentelemetry::proto::logs::v1::{
    LogRecord, ResourceLogs, ScopeLogs, SeverityNumber,
};
use crate::proto::opentelemetry::proto::resource::v1::Resource;

/// The OTLP sink.
pub(super) struct OtlpSink {
    name: String,
    endpoint: Endpoint,
    shown: String,
    tls: Option<tokio_rustls::TlsConnector>,
    client: Option<LogsServiceClient<Channel>>,
}

impl OtlpSink {
    pub(super) fn new(config: &AuditSinkConfig) -> Result<Self, SinkError> {
        let SinkKind::Otlp { endpoint, ca_file } = &config.kind else {
            unreachable!("an otlp sink's config")
        };
        let tls = if endpoint.starts_with("https://") {
            let mut tls = Trust::from_ca_file(ca_file.as_deref())
                .client_config()
                .map_err(|e| SinkError(format!("OTLP TLS: {e}")))?;
            tls.alpn_protocols = vec![b"h2".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
        } else {
            None
        };
        let plain = endpoint.replacen("https://", "http://", 1);
        let endpoint_config = Endpoint::from_shared(plain)
            .map_err(|e| SinkError(format!("OTLP endpoint {endpoint:?}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(25));
        Ok(Self {
            name: config.name.clone(),
            endpoint: endpoint_config,
            shown: endpoint.clone(),
            tls,
            client: None,
        })
    }

    async fn connect(&self) -> Result<LogsServiceClient<Channel>, SinkError> {
        let fail = |e: tonic::transport::Error| {
            SinkError(format!(
                "OTLP {}: {}",
                self.shown,
                crate::client::causes(&e)
            ))
        };
        let channel = match &self.tls {
            None => self.endpoint.connect().await.map_err(fail)?,
            Some(connector) => {
                let connector = connector.clone();
                self.endpoint
                    .connect_with_connector(tower::service_fn(move |uri: Uri| {
                        let connector = connector.clone();
                        async move {
                            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                            let port = uri.port_u16().unwrap_or(443);
                            let name = ServerName::try_from(host.to_owned()).map_err(|e| {
                                std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
                            })?;
                            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                            tcp.set_nodelay(true)?;
                            let tls = connector.connect(name, tcp).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                        }
                    }))
                    .await
                    .map_err(fail)?
            }
        };
        Ok(LogsServiceClient::new(channel))
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
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
        KeyValue {
            key: "audit.seq".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(e.seq as i64)),
            }),
            ..Default::default()
        },
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
                    resource: Some(Resource {
                        attributes: vec![text("service.name", "spiffe-broker")],
                        ..Default::default()
                    }),
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
                None => self.connect().await?,
            };
            let answer = client.export(request).await.map_err(|s| {
                SinkError(format!(
                    "OTLP {}: {:?}: {}",
                    self.shown,
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
