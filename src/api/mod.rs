//! Thin tonic adapters: proto ⇄ domain (via `TryFrom`/`From`), transport facts out of
//! the request, errors through `error::to_status`. No decisions here.

mod convert;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::authn::{PeerInfo, TransportFacts};
use crate::broker::{Broker, EntrySelector, FeedItem, IssueOptions, IssueOutcome, RequestListing};
use crate::domain::LeaseId;
use crate::domain::Verdict;
use crate::error::{to_status, BrokerError};
use crate::proto::v1 as pb;

pub use convert::{access_request_to_pb, explanation_to_pb, lease_to_pb, parse_issue_request};

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
        peer_ip: req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote.map(|a| a.ip())),
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

/// `spiffe_broker.v1.RelyingParty`.
#[derive(Clone)]
pub struct RelyingPartyService {
    broker: Arc<Broker>,
}

impl RelyingPartyService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl pb::relying_party_server::RelyingParty for RelyingPartyService {
    type WatchRevocationsStream = PbStream<pb::RevocationFeedMessage>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        use pb::revocation_feed_message::Item;
        let b = &self.broker;
        let caller = b
            .authenticate(facts(&request), "WatchRevocations")
            .await
            .map_err(to_status)?;
        let rx = b
            .watch_revocations(&caller, request.get_ref().since)
            .await
            .map_err(to_status)?;
        Ok(stream(rx, |item| pb::RevocationFeedMessage {
            item: Some(match item {
                FeedItem::Event(e) => Item::Event(convert::revocation_to_pb(&e)),
                FeedItem::Head(note) => Item::SignedHead(note),
            }),
        }))
    }
}

/// A server-streaming response.
type PbStream<P> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<P, Status>> + Send>>;

/// A broker stream as a gRPC response stream, each item converted, errors mapped.
fn stream<T: Send + 'static, P: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, BrokerError>>,
    to_pb: fn(T) -> P,
) -> Response<PbStream<P>> {
    use futures::StreamExt;
    let s = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(move |r| r.map(to_pb).map_err(to_status));
    Response::new(Box::pin(s))
}

/// `spiffe_broker.v1.Approvals`.
#[derive(Clone)]
pub struct ApprovalsService {
    broker: Arc<Broker>,
}

impl ApprovalsService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
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
    // Overload answers at once instead of queueing without bound.
    let Some(_permit) = broker.admit() else {
        broker.metrics().denied("overloaded");
        return Err(to_status(BrokerError::ResourceExhausted(
            "the broker is at its concurrent request limit; retry with back-off".into(),
        )));
    };
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
        convert::credential_to_pb(&i.credential, &i.lease),
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
            let r = request.get_ref();
            let parsed = parse_issue_request(r).and_then(|req| {
                let id = if r.access_request_id.is_empty() {
                    None
                } else {
                    Some(LeaseId::parse(&r.access_request_id)?.to_string())
                };
                Ok((req, id))
            });
            let (req, access_request_id) = match parsed {
                Ok(v) => v,
                Err(e) => return Err(b.reject(&caller, "IssueCredential", e).await),
            };
            if !r.idempotency_key.is_empty() {
                if let Err(e) = crate::broker::idempotency::validate(&r.idempotency_key) {
                    return Err(b.reject(&caller, "IssueCredential", e).await);
                }
            }
            let opts = IssueOptions {
                break_glass: r.break_glass,
                access_request_id,
                idempotency_key: (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone()),
                material: crate::issuer::Material {
                    csr_der: (!r.csr.is_empty()).then(|| r.csr.clone()),
                },
            };
            Ok(match b.issue(&caller, req, opts).await? {
                IssueOutcome::Issued(i) => {
                    let access_request = i.access_request.as_ref().map(access_request_to_pb);
                    let (credential, lease, receipt) = issued_to_pb(*i);
                    pb::IssueCredentialResponse {
                        credential,
                        lease,
                        receipt,
                        access_request,
                    }
                }
                IssueOutcome::Pending(ar, need) => {
                    let mut pending = access_request_to_pb(&ar);
                    pending.approvals = need.have;
                    pb::IssueCredentialResponse {
                        credential: None,
                        lease: None,
                        receipt: None,
                        access_request: Some(pending),
                    }
                }
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

    type WatchAccessRequestStream = PbStream<pb::AccessRequest>;

    async fn get_access_request(
        &self,
        request: Request<pb::GetAccessRequestRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let b = &self.broker;
        rpc(b, "GetAccessRequest", async {
            let caller = b.authenticate(facts(&request), "GetAccessRequest").await?;
            let id = match LeaseId::parse(&request.get_ref().id) {
                Ok(id) => id,
                Err(e) => return Err(b.reject(&caller, "GetAccessRequest", e).await),
            };
            Ok(access_request_to_pb(
                &b.access_request(&caller, id.as_str()).await?,
            ))
        })
        .await
    }

    async fn watch_access_request(
        &self,
        request: Request<pb::GetAccessRequestRequest>,
    ) -> Result<Response<Self::WatchAccessRequestStream>, Status> {
        let b = &self.broker;
        let caller = b
            .authenticate(facts(&request), "WatchAccessRequest")
            .await
            .map_err(to_status)?;
        let id = match LeaseId::parse(&request.get_ref().id) {
            Ok(id) => id.to_string(),
            Err(e) => return Err(to_status(b.reject(&caller, "WatchAccessRequest", e).await)),
        };
        let rx = b
            .watch_access_request(&caller, &id)
            .await
            .map_err(to_status)?;
        Ok(stream(rx, |ar| access_request_to_pb(&ar)))
    }

    async fn explain_decision(
        &self,
        request: Request<pb::ExplainDecisionRequest>,
    ) -> Result<Response<pb::ExplainDecisionResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ExplainDecision", async {
            let caller = b.authenticate(facts(&request), "ExplainDecision").await?;
            let inner = request.get_ref().request.clone().unwrap_or_default();
            let req = match parse_issue_request(&inner) {
                Ok(r) => r,
                Err(e) => return Err(b.reject(&caller, "ExplainDecision", e).await),
            };
            Ok(convert::explanation_to_pb(&b.explain(
                &caller,
                &req,
                inner.break_glass,
            )))
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::approvals_server::Approvals for ApprovalsService {
    async fn list_access_requests(
        &self,
        request: Request<pb::ListAccessRequestsRequest>,
    ) -> Result<Response<pb::ListAccessRequestsResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListAccessRequests", async {
            let caller = b
                .authenticate(facts(&request), "ListAccessRequests")
                .await?;
            let r = request.get_ref();
            use pb::list_access_requests_request::Filter;
            let listing = match Filter::try_from(r.filter) {
                Ok(Filter::Unspecified | Filter::Pending) => RequestListing::Pending,
                Ok(Filter::ToReview) => RequestListing::ToReview,
                Ok(Filter::Mine) => RequestListing::Mine,
                Ok(Filter::AwaitingPostReview) => RequestListing::AwaitingPostReview,
                Err(_) => {
                    return Err(b
                        .reject(
                            &caller,
                            "ListAccessRequests",
                            BrokerError::InvalidArgument("unknown filter".into()),
                        )
                        .await)
                }
            };
            if r.page_size > 1000 {
                return Err(b
                    .reject(
                        &caller,
                        "ListAccessRequests",
                        BrokerError::InvalidArgument("page_size must be at most 1000".into()),
                    )
                    .await);
            }
            let limit = if r.page_size == 0 {
                DEFAULT_PAGE_SIZE
            } else {
                r.page_size
            };
            let rows = b.access_requests(&caller, listing, limit).await?;
            Ok(pb::ListAccessRequestsResponse {
                access_requests: rows.iter().map(access_request_to_pb).collect(),
            })
        })
        .await
    }

    async fn review_access_request(
        &self,
        request: Request<pb::ReviewAccessRequestRequest>,
    ) -> Result<Response<pb::ReviewAccessRequestResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ReviewAccessRequest", async {
            let caller = b
                .authenticate(facts(&request), "ReviewAccessRequest")
                .await?;
            let r = request.get_ref();
            let id = match LeaseId::parse(&r.id) {
                Ok(id) => id,
                Err(e) => return Err(b.reject(&caller, "ReviewAccessRequest", e).await),
            };
            let verdict = if r.approve {
                Verdict::Approve
            } else {
                Verdict::Deny
            };
            let ar = b
                .review(&caller, id.as_str(), verdict, r.reason.clone())
                .await?;
            Ok(pb::ReviewAccessRequestResponse {
                access_request: Some(access_request_to_pb(&ar)),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_lock(
        &self,
        request: Request<pb::CreateLockRequest>,
    ) -> Result<Response<pb::Lock>, Status> {
        let b = &self.broker;
        rpc(b, "CreateLock", async {
            let caller = b.authenticate(facts(&request), "CreateLock").await?;
            let r = request.get_ref();
            let until = r.until.map(|t| t.seconds).unwrap_or_default();
            let lock = b
                .lock(&caller, &r.kind, r.value.clone(), until, r.reason.clone())
                .await?;
            Ok(convert::lock_to_pb(&lock))
        })
        .await
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListLocks", async {
            let caller = b.authenticate(facts(&request), "ListLocks").await?;
            let locks = b.locks(&caller).await?;
            Ok(pb::ListLocksResponse {
                locks: locks.iter().map(convert::lock_to_pb).collect(),
            })
        })
        .await
    }

    async fn delete_lock(
        &self,
        request: Request<pb::DeleteLockRequest>,
    ) -> Result<Response<pb::DeleteLockResponse>, Status> {
        let b = &self.broker;
        rpc(b, "DeleteLock", async {
            let caller = b.authenticate(facts(&request), "DeleteLock").await?;
            let r = request.get_ref();
            let id = match LeaseId::parse(&r.id) {
                Ok(id) => id,
                Err(e) => return Err(b.reject(&caller, "DeleteLock", e).await),
            };
            b.unlock(&caller, id.to_string(), r.reason.clone()).await?;
            Ok(pb::DeleteLockResponse {})
        })
        .await
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let b = &self.broker;
        rpc(b, "GetCheckpoint", async {
            let caller = b.authenticate(facts(&request), "GetCheckpoint").await?;
            let r = request.get_ref();
            let size = (r.tree_size > 0).then_some(r.tree_size);
            let from = (r.consistency_from > 0).then_some(r.consistency_from);
            let (cp, proof) = b.log_checkpoint(&caller, size, from).await?;
            Ok(pb::GetCheckpointResponse {
                note: cp.note,
                tree_size: cp.size,
                root_hash: hex::encode(cp.root),
                consistency_proof: proof.iter().map(hex::encode).collect(),
                log_key: b.log_vkey().unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let b = &self.broker;
        rpc(b, "GetInclusionProof", async {
            let caller = b.authenticate(facts(&request), "GetInclusionProof").await?;
            let r = request.get_ref();
            use pb::get_inclusion_proof_request::Entry;
            let selector = match &r.entry {
                Some(Entry::Sequence(n)) if *n > 0 => Ok(EntrySelector::Sequence(*n)),
                Some(Entry::LeaseId(id)) => LeaseId::parse(id)
                    .map(EntrySelector::Lease)
                    .map_err(BrokerError::from),
                _ => Err(BrokerError::InvalidArgument(
                    "a sequence (> 0) or a lease_id is required".into(),
                )),
            };
            let selector = match selector {
                Ok(s) => s,
                Err(e) => return Err(b.reject(&caller, "GetInclusionProof", e).await),
            };
            let p = b
                .inclusion_proof(&caller, selector, (r.tree_size > 0).then_some(r.tree_size))
                .await?;
            Ok(pb::GetInclusionProofResponse {
                sequence: p.sequence,
                leaf_index: p.leaf_index,
                leaf_hash: hex::encode(p.leaf_hash),
                entry: p.entry,
                tree_size: p.checkpoint.size,
                root_hash: hex::encode(p.checkpoint.root),
                proof: p.proof.iter().map(hex::encode).collect(),
                checkpoint: p.checkpoint.note,
            })
        })
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListAuditEvents", async {
            let caller = b.authenticate(facts(&request), "ListAuditEvents").await?;
            let r = request.get_ref();
            let limit = if r.page_size == 0 {
                DEFAULT_PAGE_SIZE
            } else {
                r.page_size
            };
            let entries = b.audit_events(&caller, r.after_sequence, limit).await?;
            Ok(pb::ListAuditEventsResponse {
                entries: entries
                    .into_iter()
                    .map(|e| pb::AuditEntry {
                        sequence: e.seq,
                        body: e.body,
                        prev_hash: hex::encode(e.prev_hash),
                        entry_hash: hex::encode(e.hash),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListIdentities", async {
            let caller = b.authenticate(facts(&request), "ListIdentities").await?;
            let rows = b.inventory(&caller).await?;
            Ok(pb::ListIdentitiesResponse {
                identities: rows.iter().map(convert::identity_to_pb).collect(),
            })
        })
        .await
    }

    async fn list_backend_revocations(
        &self,
        request: Request<pb::ListBackendRevocationsRequest>,
    ) -> Result<Response<pb::ListBackendRevocationsResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ListBackendRevocations", async {
            let caller = b
                .authenticate(facts(&request), "ListBackendRevocations")
                .await?;
            let r = request.get_ref();
            let size = if r.page_size == 0 { 100 } else { r.page_size };
            let list = b.backend_revocations(&caller, r.min_attempts, size).await?;
            Ok(pb::ListBackendRevocationsResponse {
                revocations: list.iter().map(convert::backend_revocation_to_pb).collect(),
            })
        })
        .await
    }

    async fn force_remove_backend_revocation(
        &self,
        request: Request<pb::ForceRemoveBackendRevocationRequest>,
    ) -> Result<Response<pb::ForceRemoveBackendRevocationResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ForceRemoveBackendRevocation", async {
            let caller = b
                .authenticate(facts(&request), "ForceRemoveBackendRevocation")
                .await?;
            let r = request.get_ref();
            let id = match LeaseId::parse(&r.lease_id) {
                Ok(id) => id,
                Err(e) => return Err(b.reject(&caller, "ForceRemoveBackendRevocation", e).await),
            };
            let receipt = b
                .force_remove_backend_revocation(&caller, id, r.reason.clone())
                .await?;
            Ok(pb::ForceRemoveBackendRevocationResponse {
                receipt: Some(convert::receipt_to_pb(&receipt)),
            })
        })
        .await
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let b = &self.broker;
        rpc(b, "ReloadPolicy", async {
            let caller = b.authenticate(facts(&request), "ReloadPolicy").await?;
            let policy_hash = b.reload_policy(Some(&caller)).await?;
            Ok(pb::ReloadPolicyResponse { policy_hash })
        })
        .await
    }

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
            let issued_before = r.issued_before.map(|t| t.seconds);
            let revoked = b
                .revoke(
                    &caller,
                    selector,
                    issued_before,
                    r.reason.clone(),
                    r.dry_run,
                )
                .await?;
            Ok(pb::RevokeResponse {
                revoked_lease_ids: revoked.lease_ids,
                receipt: revoked.receipt.as_ref().map(convert::receipt_to_pb),
                dry_run: r.dry_run,
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
