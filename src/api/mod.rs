//! Thin tonic adapters: proto ⇄ domain (via `TryFrom`/`From`), transport facts out of
//! the request, errors through `error::to_status`. No decisions here.

mod convert;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::authn::TransportFacts;
use crate::broker::Broker;
use crate::domain::LeaseId;
use crate::error::{to_status, BrokerError};
use crate::proto::v1 as pb;
use crate::server::tls::PeerInfo;

pub use convert::{lease_to_pb, parse_issue_request};

/// Pulls the authentication facts out of a request.
fn facts<T>(req: &Request<T>) -> TransportFacts<'_> {
    TransportFacts {
        peer_certs: req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.certs.as_ref().map(|c| c.as_slice())),
        authorization: req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    }
}

/// `spiffe_broker.v1.CredentialBroker`.
#[derive(Clone)]
pub struct CredentialBrokerService {
    broker: Arc<Broker>,
}

/// `spiffe_broker.v1.Admin`.
#[derive(Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl CredentialBrokerService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

impl AdminService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

/// Runs one RPC body, timing it and mapping its error.
async fn rpc<T>(
    broker: &Broker,
    method: &str,
    body: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let out = body.await;
    broker.metrics().observe_rpc(method, started.elapsed());
    out.map(Response::new).map_err(to_status)
}

fn issued_to_pb(
    i: crate::broker::Issued,
) -> (
    Option<pb::Credential>,
    Option<pb::Lease>,
    Option<pb::AuditReceipt>,
) {
    (
        Some(convert::credential_to_pb(&i.credential)),
        Some(lease_to_pb(&i.lease)),
        Some(convert::receipt_to_pb(&i.receipt)),
    )
}

#[tonic::async_trait]
impl pb::credential_broker_server::CredentialBroker for CredentialBrokerService {
    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialResponse>, Status> {
        let b = &self.broker;
        rpc(b, "IssueCredential", async {
            let caller = b.authenticate(facts(&request), "IssueCredential").await?;
            let req = match parse_issue_request(request.get_ref()) {
                Ok(r) => r,
                Err(e) => return Err(b.reject(&caller, "IssueCredential", e).await),
            };
            let (credential, lease, receipt) = issued_to_pb(b.issue(&caller, req).await?);
            Ok(pb::IssueCredentialResponse {
                credential,
                lease,
                receipt,
            })
        })
        .await
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let b = &self.broker;
        rpc(b, "RenewLease", async {
            let caller = b.authenticate(facts(&request), "RenewLease").await?;
            let r = request.get_ref();
            let parsed = LeaseId::parse(&r.lease_id).and_then(|id| {
                let ttl = r
                    .ttl
                    .map(|d| crate::domain::parse_ttl(d.seconds, d.nanos))
                    .transpose()?;
                Ok((id, ttl))
            });
            let (id, ttl) = match parsed {
                Ok(v) => v,
                Err(e) => return Err(b.reject(&caller, "RenewLease", e).await),
            };
            let (credential, lease, receipt) = issued_to_pb(b.renew(&caller, id, ttl).await?);
            Ok(pb::RenewLeaseResponse {
                credential,
                lease,
                receipt,
            })
        })
        .await
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ReleaseLease", async {
            let caller = b.authenticate(facts(&request), "ReleaseLease").await?;
            let id = match LeaseId::parse(&request.get_ref().lease_id) {
                Ok(id) => id,
                Err(e) => return Err(b.reject(&caller, "ReleaseLease", e).await),
            };
            let (lease, receipt) = b.release(&caller, id).await?;
            Ok(pb::ReleaseLeaseResponse {
                lease: Some(lease_to_pb(&lease)),
                receipt: Some(convert::receipt_to_pb(&receipt)),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let b = &self.broker;
        rpc(b, "Revoke", async {
            let caller = b.authenticate(facts(&request), "Revoke").await?;
            let r = request.get_ref();
            let selector = match convert::parse_selector(r.selector.as_ref()) {
                Ok(s) => s,
                Err(e) => return Err(b.reject(&caller, "Revoke", e).await),
            };
            let revoked = b.revoke(&caller, selector, r.reason.clone()).await?;
            Ok(pb::RevokeResponse {
                revoked_lease_ids: revoked.lease_ids,
                receipt: revoked.receipt.as_ref().map(convert::receipt_to_pb),
            })
        })
        .await
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListLeases", async {
            let caller = b.authenticate(facts(&request), "ListLeases").await?;
            let filter = match convert::parse_list_filter(request.get_ref()) {
                Ok(f) => f,
                Err(e) => return Err(b.reject(&caller, "ListLeases", e).await),
            };
            let limit = filter.limit as usize;
            let leases = b.list_leases(&caller, filter).await?;
            let next_page_token = match leases.last() {
                Some(l) if leases.len() == limit => format!("{}:{}", l.issued_at, l.id),
                _ => String::new(),
            };
            Ok(pb::ListLeasesResponse {
                leases: leases.iter().map(lease_to_pb).collect(),
                next_page_token,
            })
        })
        .await
    }
}

/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
