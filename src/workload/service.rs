//! One identity's Workload API service.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock as _;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ca::MintedSvid;
use super::DevCa;
use crate::authn::{validate_jwt_svid, StaticTrust};
use crate::proto::workload as pb;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Longest JWT-SVID lifetime handed out.
const JWT_SVID_TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub(super) struct IdentityService {
    ca: Arc<DevCa>,
    id: SpiffeId,
    svid_ttl: Duration,
    rotate: watch::Receiver<u64>,
    /// Turns true when the socket is taken away: open SVID streams end, as they would
    /// when a real agent dies.
    gone: watch::Receiver<bool>,
}

impl IdentityService {
    pub(super) fn new(
        ca: Arc<DevCa>,
        id: SpiffeId,
        svid_ttl: Duration,
        rotate: watch::Receiver<u64>,
        gone: watch::Receiver<bool>,
    ) -> Self {
        Self {
            ca,
            id,
            svid_ttl,
            rotate,
            gone,
        }
    }

    /// The next X509SVIDResponse: `held` again while the active authority signed it
    /// (only the bundle changed), else a fresh SVID. Returns the SVID sent, to hold.
    fn x509_response(
        &self,
        held: Option<MintedSvid>,
    ) -> Result<(pb::X509svidResponse, MintedSvid), Status> {
        let (svid, bundle) = self
            .ca
            .workload_x509(&self.id, self.svid_ttl, held)
            .map_err(|e| Status::internal(e.to_string()))?;
        let response = pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: self.id.to_string(),
                x509_svid: svid
                    .chain
                    .iter()
                    .flat_map(|c| c.as_ref().to_vec())
                    .collect(),
                x509_svid_key: svid.key_pkcs8.to_vec(),
                // The spec's encoding: the bundle's certificates, DER, concatenated.
                bundle: concat_der(&bundle),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        };
        Ok((response, svid))
    }

    fn x509_bundles_response(&self) -> pb::X509BundlesResponse {
        pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(
                self.ca.trust_domain().to_owned(),
                concat_der(&self.ca.bundle()),
            )]),
        }
    }

    fn jwks_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.ca.jwt_bundle()).unwrap_or_default()
    }
}

fn concat_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

/// The Workload API requires this header on every call (SSRF protection).
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get("workload.spiffe.io")
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// Streams `first`, then a fresh value each time `next` yields, until the client leaves.
fn stream_until_closed<T: Send + 'static>(
    first: T,
) -> (mpsc::Sender<Result<T, Status>>, Stream_<T>) {
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.try_send(Ok(first));
    (tx, Box::pin(ReceiverStream::new(rx)))
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for IdentityService {
    type FetchX509SVIDStream = Stream_<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream_<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream_<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        // Both watches are marked seen before the first response is built: a change
        // after this point is then never missed (at worst one redundant response).
        let mut rotate = self.rotate.clone();
        rotate.borrow_and_update();
        let mut authorities = self.ca.subscribe();
        let (first, held) = self.x509_response(None)?;
        let (tx, stream) = stream_until_closed(first);
        let me = self.clone();
        tokio::spawn(async move {
            let mut gone = me.gone.clone();
            let mut held = Some(held);
            loop {
                // Rotate at half-life, or at once when asked; on a CA change, send the new
                // bundle (and a new SVID if the active authority changed).
                let keep = tokio::select! {
                    _ = tokio::time::sleep(me.svid_ttl / 2) => false,
                    r = rotate.changed() => if r.is_err() { return } else { false },
                    r = authorities.changed() => if r.is_err() { return } else { true },
                    // The stream ends (the connection with it, as a dying agent's).
                    _ = gone.wait_for(|g| *g) => return,
                    _ = tx.closed() => return,
                };
                let held_now = if keep { held.take() } else { None };
                let next = me.x509_response(held_now).map(|(response, svid)| {
                    held = Some(svid);
                    response
                });
                if tx.send(next).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        // Subscribed before the first response is built, so no change is missed.
        let mut authorities = self.ca.subscribe();
        let (tx, stream) = stream_until_closed(self.x509_bundles_response());
        let me = self.clone();
        // A new response at each rotation step, until the client leaves.
        tokio::spawn(async move {
            let mut gone = me.gone.clone();
            loop {
                tokio::select! {
                    r = authorities.changed() => if r.is_err() { return },
                    _ = gone.wait_for(|g| *g) => return,
                    _ = tx.closed() => return,
                }
                if tx.send(Ok(me.x509_bundles_response())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        let r = request.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !r.spiffe_id.is_empty() && r.spiffe_id != self.id.to_string() {
            return Err(Status::permission_denied(
                "no identity issued for the requested SPIFFE ID",
            ));
        }
        let ttl = JWT_SVID_TTL.min(self.svid_ttl);
        let svid = self
            .ca
            .mint_jwt_svid(&self.id, &r.audience, ttl)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: self.id.to_string(),
                svid,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let first = pb::JwtBundlesResponse {
            bundles: HashMap::from([(self.ca.trust_domain().to_owned(), self.jwks_json())]),
        };
        let (tx, stream) = stream_until_closed(first);
        tokio::spawn(async move { tx.closed().await });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let r = request.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let trust = StaticTrust::default().with_jwt(self.ca.trust_domain(), self.ca.jwt_bundle());
        let (id, claims) = validate_jwt_svid(
            &r.svid,
            &trust,
            &r.audience,
            crate::clock::SystemClock.now(),
            Duration::ZERO,
        )
        .map_err(|e| Status::invalid_argument(e.reason))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(prost_types::Struct {
                fields: claims
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_prost(v)))
                    .collect(),
            }),
        }))
    }
}
