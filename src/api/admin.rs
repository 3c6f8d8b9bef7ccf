//! `spiffe_broker.v1.Admin`: what platform admins call.

use tonic::{Request, Response, Status};

use super::convert::{self, lease_to_pb};
use super::{respond, Api, Call, DEFAULT_PAGE_SIZE};
use crate::broker::EntrySelector;
use crate::domain::LeaseId;
use crate::error::BrokerError;
use crate::proto::v1 as pb;

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn create_lock(
        &self,
        request: Request<pb::CreateLockRequest>,
    ) -> Result<Response<pb::Lock>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let until = r.until.map(|t| t.seconds).unwrap_or_default();
                let lock = b
                    .lock(caller, &r.kind, r.value.clone(), until, r.reason.clone())
                    .await?;
                Ok(convert::lock_to_pb(&lock))
            }
            .await,
        )
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let locks = b.locks(caller).await?;
                Ok(pb::ListLocksResponse {
                    locks: locks.iter().map(convert::lock_to_pb).collect(),
                })
            }
            .await,
        )
    }

    async fn delete_lock(
        &self,
        request: Request<pb::DeleteLockRequest>,
    ) -> Result<Response<pb::DeleteLockResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let id = call.id(b, &r.id).await?;
                b.unlock(caller, id.to_string(), r.reason.clone()).await?;
                Ok(pb::DeleteLockResponse {})
            }
            .await,
        )
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let size = (r.tree_size > 0).then_some(r.tree_size);
                let from = (r.consistency_from > 0).then_some(r.consistency_from);
                let (cp, proof) = b.log_checkpoint(caller, size, from).await?;
                Ok(pb::GetCheckpointResponse {
                    note: cp.cosigned_note(),
                    tree_size: cp.size,
                    root_hash: hex::encode(cp.root),
                    consistency_proof: proof.iter().map(hex::encode).collect(),
                    log_key: b.log_vkey().unwrap_or_default(),
                })
            }
            .await,
        )
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
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
                    Err(e) => return Err(call.reject(b, e).await),
                };
                let p = b
                    .inclusion_proof(caller, selector, (r.tree_size > 0).then_some(r.tree_size))
                    .await?;
                Ok(pb::GetInclusionProofResponse {
                    sequence: p.sequence,
                    leaf_index: p.leaf_index,
                    leaf_hash: hex::encode(p.leaf_hash),
                    entry: p.entry,
                    tree_size: p.checkpoint.size,
                    root_hash: hex::encode(p.checkpoint.root),
                    proof: p.proof.iter().map(hex::encode).collect(),
                    checkpoint: p.checkpoint.cosigned_note(),
                })
            }
            .await,
        )
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let limit = if r.page_size == 0 {
                    DEFAULT_PAGE_SIZE
                } else {
                    r.page_size
                };
                let entries = b.audit_events(caller, r.after_sequence, limit).await?;
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
            }
            .await,
        )
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let rows = b.inventory(caller).await?;
                Ok(pb::ListIdentitiesResponse {
                    identities: rows.iter().map(convert::identity_to_pb).collect(),
                })
            }
            .await,
        )
    }

    async fn list_backend_revocations(
        &self,
        request: Request<pb::ListBackendRevocationsRequest>,
    ) -> Result<Response<pb::ListBackendRevocationsResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let size = if r.page_size == 0 { 100 } else { r.page_size };
                let list = b.backend_revocations(caller, r.min_attempts, size).await?;
                Ok(pb::ListBackendRevocationsResponse {
                    revocations: list.iter().map(convert::backend_revocation_to_pb).collect(),
                })
            }
            .await,
        )
    }

    async fn force_remove_backend_revocation(
        &self,
        request: Request<pb::ForceRemoveBackendRevocationRequest>,
    ) -> Result<Response<pb::ForceRemoveBackendRevocationResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let id = call.id(b, &r.lease_id).await?;
                let receipt = b
                    .force_remove_backend_revocation(caller, id, r.reason.clone())
                    .await?;
                Ok(pb::ForceRemoveBackendRevocationResponse {
                    receipt: Some(convert::receipt_to_pb(&receipt)),
                })
            }
            .await,
        )
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let force = r.force.then(|| r.reason.clone());
                let policy_hash = b.reload_policy(Some(caller), force).await?;
                Ok(pb::ReloadPolicyResponse { policy_hash })
            }
            .await,
        )
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let selector = match convert::parse_selector(r.selector.as_ref()) {
                    Ok(s) => s,
                    Err(e) => return Err(call.reject(b, e).await),
                };
                let issued_before = r.issued_before.map(|t| t.seconds);
                let revoked = b
                    .revoke(caller, selector, issued_before, r.reason.clone(), r.dry_run)
                    .await?;
                Ok(pb::RevokeResponse {
                    revoked_lease_ids: revoked.lease_ids,
                    receipt: revoked.receipt.as_ref().map(convert::receipt_to_pb),
                    dry_run: r.dry_run,
                })
            }
            .await,
        )
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let filter = match convert::parse_list_filter(request.get_ref()) {
                    Ok(f) => f,
                    Err(e) => return Err(call.reject(b, e).await),
                };
                let limit = filter.limit as usize;
                let leases = b.list_leases(caller, filter).await?;
                let next_page_token = match leases.last() {
                    Some(l) if leases.len() == limit => format!("{}:{}", l.issued_at, l.id),
                    _ => String::new(),
                };
                Ok(pb::ListLeasesResponse {
                    leases: leases.iter().map(lease_to_pb).collect(),
                    next_page_token,
                })
            }
            .await,
        )
    }
}
