//! Thin tonic adapters: proto ⇄ domain (via `TryFrom`/`From`), errors through
//! `error::to_status`, one file per service. Admission, timing and authentication happen
//! once per call in `edge`, before any handler; no decisions here.

mod admin;
mod approvals;
mod convert;
mod credential_broker;
mod edge;
mod relying_party;

pub use convert::{
    access_request_to_pb, explanation_to_pb, lease_to_pb, parse_issue_request, parse_selector,
};
pub use edge::{Call, EdgeLayer};

use std::sync::Arc;

use tonic::{Response, Status};

use crate::broker::Broker;
use crate::error::{to_status, BrokerError};

/// The gRPC services over one broker: `Api` implements `CredentialBroker`
/// (`credential_broker.rs`), `Approvals`, `Admin` and `RelyingParty`, each in its file.
#[derive(Clone)]
pub struct Api {
    broker: Arc<Broker>,
}

impl Api {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

/// A server-streaming response.
pub(crate) type PbStream<P> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<P, Status>> + Send>>;

/// A broker stream as a gRPC response stream, each item converted, errors mapped.
pub(crate) fn stream<T: Send + 'static, P: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, BrokerError>>,
    to_pb: fn(T) -> P,
) -> Response<PbStream<P>> {
    use futures::StreamExt;
    let s = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(move |r| r.map(to_pb).map_err(to_status));
    Response::new(Box::pin(s))
}

/// A handler's result as the gRPC answer (errors through the one mapping).
pub(crate) fn respond<T>(result: Result<T, BrokerError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(to_status)
}

/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
