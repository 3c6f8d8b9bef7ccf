//! The edge every broker RPC passes once, before its handler: admission (the in-flight
//! cap answers RESOURCE_EXHAUSTED at once instead of queueing), timing, and
//! authentication — all keyed on the gRPC method read from the request path. A handler
//! finds the verified caller in the request's extensions ([`Call`]) and never names its
//! own RPC. Reflection is authenticated here too; health passes through untouched (probes).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Status};

use crate::authn::{PeerInfo, TransportFacts, VerifiedCaller};
use crate::broker::Broker;
use crate::domain::LeaseId;
use crate::error::{to_status, BrokerError};
use crate::traceparent::TraceContext;
use tracing::Instrument as _;

/// The package whose methods the edge guards.
const PACKAGE: &str = "/spiffe_broker.v1.";

/// What the edge hands a handler: who called, and which RPC this is.
#[derive(Debug, Clone)]
pub struct Call {
    /// The authenticated caller.
    pub caller: VerifiedCaller,
    /// The RPC's name (`IssueCredential`), for the ledger and metrics.
    pub method: Arc<str>,
    /// The in-flight slot the call was admitted with: released when the call ends,
    /// unless a streaming handler takes it to hold for the stream's life.
    admission: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl Call {
    /// The edge's record of this request. Absent only if a service was mounted without
    /// the edge: a wiring bug, refused rather than served unauthenticated.
    pub fn of<T>(req: &Request<T>) -> Result<Call, Status> {
        req.extensions().get::<Call>().cloned().ok_or_else(|| {
            tracing::error!("a broker RPC reached its handler without passing the edge");
            Status::internal("internal error")
        })
    }

    /// The call's in-flight slot, for a stream to hold while it stays open.
    pub fn take_admission(&self) -> Option<OwnedSemaphorePermit> {
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// A lease or request id from the request; a malformed one is recorded and refused.
    pub async fn id(&self, broker: &Broker, text: &str) -> Result<LeaseId, BrokerError> {
        match LeaseId::parse(text) {
            Ok(id) => Ok(id),
            Err(e) => Err(self.reject(broker, e).await),
        }
    }

    /// Records a request this caller sent malformed, and returns the error.
    pub async fn reject(&self, broker: &Broker, err: impl Into<BrokerError>) -> BrokerError {
        broker.reject(&self.caller, &self.method, err).await
    }
}

/// Reflection describes the API to any authenticated caller, never to an anonymous one.
const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The RPC name of a guarded method path (`/spiffe_broker.v1.Admin/Revoke` → `Revoke`;
/// reflection's `ServerReflectionInfo`); `None` for the services that pass untouched.
fn method_of(path: &str) -> Option<&str> {
    let method = match path.strip_prefix(PACKAGE) {
        Some(rest) => rest.split_once('/')?.1,
        None => REFLECTION.iter().find_map(|p| path.strip_prefix(p))?,
    };
    (!method.is_empty()).then_some(method)
}

/// The authentication facts of a request: the certificate chain and address the TLS
/// layer recorded, and the `authorization` header.
fn facts<B>(req: &http::Request<B>) -> TransportFacts<'_> {
    let peer = req.extensions().get::<PeerInfo>();
    TransportFacts {
        peer_certs: peer.and_then(|p| p.certs.as_ref().map(|c| c.as_slice())),
        authorization: req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        peer_ip: peer.and_then(|p| p.remote.map(|a| a.ip())),
    }
}

/// Wraps the gRPC routes with the edge.
#[derive(Clone)]
pub struct EdgeLayer {
    broker: Arc<Broker>,
}

impl EdgeLayer {
    /// The edge of `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            broker: self.broker.clone(),
            inner,
        }
    }
}

/// The edge around one service stack.
#[derive(Clone)]
pub struct Edge<S> {
    broker: Arc<Broker>,
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Edge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let broker = self.broker.clone();
        let Some(method) = method_of(req.uri().path()).map(Arc::<str>::from) else {
            return Box::pin(inner.call(req));
        };
        // The request's trace: the caller's W3C `traceparent`, else a fresh one. The ledger
        // entry, the JSON logs and the exported spans all carry its id.
        let trace = TraceContext::from_header(
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        Box::pin(trace.scope(async move {
            let span =
                tracing::info_span!("rpc", rpc.method = %method, trace_id = %trace.trace_id_hex());
            Self::admit_and_authenticate(broker, inner, req, method)
                .instrument(span)
                .await
        }))
    }
}

impl<S> Edge<S> {
    /// Admission, authentication, then the handler, with the caller in the request.
    async fn admit_and_authenticate<B, R>(
        broker: Arc<Broker>,
        mut inner: S,
        mut req: http::Request<B>,
        method: Arc<str>,
    ) -> Result<http::Response<R>, S::Error>
    where
        S: tower::Service<http::Request<B>, Response = http::Response<R>>,
        R: Default,
    {
        let Some(permit) = broker.admit() else {
            broker.metrics().denied("overloaded");
            return Ok(to_status(BrokerError::ResourceExhausted(
                "the broker is at its concurrent request limit; retry with back-off".into(),
            ))
            .into_http());
        };
        let started = Instant::now();
        let authenticated = broker
            .authenticate(facts(&req), &method)
            .instrument(tracing::debug_span!("authn"))
            .await;
        let caller = match authenticated {
            Ok(c) => c,
            Err(e) => {
                broker.metrics().observe_rpc(&method, started.elapsed());
                return Ok(to_status(e).into_http());
            }
        };
        req.extensions_mut().insert(Call {
            caller,
            method: method.clone(),
            admission: Arc::new(Mutex::new(Some(permit))),
        });
        let out = inner.call(req).await;
        broker.metrics().observe_rpc(&method, started.elapsed());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::method_of;

    #[test]
    fn only_broker_methods_are_guarded() {
        assert_eq!(
            method_of("/spiffe_broker.v1.CredentialBroker/IssueCredential"),
            Some("IssueCredential")
        );
        assert_eq!(method_of("/spiffe_broker.v1.Admin/Revoke"), Some("Revoke"));
        assert_eq!(method_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            method_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some("ServerReflectionInfo")
        );
        assert_eq!(
            method_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some("ServerReflectionInfo")
        );
        assert_eq!(method_of("/spiffe_broker.v1.Admin/"), None);
        assert_eq!(method_of("/spiffe_broker.v1.Admin"), None);
    }
}
