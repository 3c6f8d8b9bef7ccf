//! Reaching an OpenTelemetry collector over OTLP/gRPC (`http://` or `https://`), shared
//! by the audit log sink (`sinks::otlp`) and span export (`telemetry`).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::http_client::Trust;
use crate::proto::opentelemetry::proto::common::v1::{any_value, AnyValue, KeyValue};

/// A collector's endpoint; connections are made by [`OtlpEndpoint::channel`].
#[derive(Clone)]
pub struct OtlpEndpoint {
    endpoint: Endpoint,
    /// The endpoint as configured (no secrets in it), for messages.
    pub shown: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl OtlpEndpoint {
    /// `endpoint` is `http://host:port` or `https://host:port`; https trusts `ca_file`, else
    /// the platform's store.
    pub fn new(endpoint: &str, ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        let tls = if endpoint.starts_with("https://") {
            let mut tls = Trust::from_ca_file(ca_file)
                .client_config()
                .map_err(|e| format!("OTLP TLS: {e}"))?;
            tls.alpn_protocols = vec![b"h2".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
        } else {
            None
        };
        // tonic dials plain TCP for http://; TLS is ours (ring, the configured CAs).
        let plain = endpoint.replacen("https://", "http://", 1);
        let endpoint_config = Endpoint::from_shared(plain)
            .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(25));
        Ok(Self {
            endpoint: endpoint_config,
            shown: endpoint.to_owned(),
            tls,
        })
    }

    /// A connected channel.
    pub async fn channel(&self) -> Result<Channel, String> {
        let fail = |e: tonic::transport::Error| {
            format!("OTLP {}: {}", self.shown, crate::client::causes(&e))
        };
        let Some(connector) = self.tls.clone() else {
            return self.endpoint.connect().await.map_err(fail);
        };
        self.endpoint
            .connect_with_connector(tower::service_fn(move |uri: Uri| {
                let connector = connector.clone();
                async move {
                    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                    let port = uri.port_u16().unwrap_or(443);
                    let name = ServerName::try_from(host.to_owned())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .map_err(fail)
    }
}

/// A string attribute.
pub fn text(key: &str, value: impl Into<String>) -> KeyValue {
    value_of(key, any_value::Value::StringValue(value.into()))
}

/// An integer attribute.
pub fn int(key: &str, value: i64) -> KeyValue {
    value_of(key, any_value::Value::IntValue(value))
}

fn value_of(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The resource every export names: `service.name=spiffe-broker`.
pub fn resource() -> crate::proto::opentelemetry::proto::resource::v1::Resource {
    crate::proto::opentelemetry::proto::resource::v1::Resource {
        attributes: vec![text("service.name", "spiffe-broker")],
        ..Default::default()
    }
}
