//! `spiffe_broker.v1.CredentialBroker`: what workloads call.

use tonic::{Request, Response, Status};

use super::convert::{self, access_request_to_pb, lease_to_pb, parse_issue_request};
use super::{respond, stream, Api, Call, PbStream};
use crate::broker::{IssueOptions, IssueOutcome};
use crate::domain::LeaseId;
use crate::error::to_status;
use crate::proto::v1 as pb;

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
impl pb::credential_broker_server::CredentialBroker for Api {
    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let parsed = parse_issue_request(r).and_then(|req| {
                    let id = convert::parse_request_id(&r.access_request_id)?;
                    let may_act = convert::parse_may_act(&r.may_act)?;
                    Ok((req, id, may_act))
                });
                let (req, access_request_id, may_act) = match parsed {
                    Ok(v) => v,
                    Err(e) => return Err(call.reject(b, e).await),
                };
                if !r.idempotency_key.is_empty() {
                    if let Err(e) = crate::broker::idempotency::validate(&r.idempotency_key) {
                        return Err(call.reject(b, e).await);
                    }
                }
                let opts = IssueOptions {
                    break_glass: r.break_glass,
                    access_request_id,
                    idempotency_key: (!r.idempotency_key.is_empty())
                        .then(|| r.idempotency_key.clone()),
                    material: crate::issuer::Material {
                        csr_der: (!r.csr.is_empty()).then(|| r.csr.clone()),
                    },
                    may_act,
                    bounds: None,
                };
                Ok(match b.issue(caller, req, opts).await? {
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
            }
            .await,
        )
    }

    async fn exchange_token(
        &self,
        request: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let parsed = convert::parse_exchange_request(r).and_then(|(req, kind)| {
                    Ok((req, kind, convert::parse_request_id(&r.access_request_id)?))
                });
                let (req, kind, access_request_id) = match parsed {
                    Ok(v) => v,
                    Err(e) => return Err(call.reject(b, e).await),
                };
                let opts = IssueOptions {
                    access_request_id,
                    ..IssueOptions::default()
                };
                let outcome = b
                    .exchange(caller, &r.subject_token, kind, req, opts)
                    .await?;
                let issued_token_type = crate::domain::delegation::ACCESS_TOKEN_TYPE.to_owned();
                Ok(match outcome {
                    IssueOutcome::Issued(i) => {
                        let access_request = i.access_request.as_ref().map(access_request_to_pb);
                        let delegation = i.delegation.as_ref().map(convert::delegation_to_pb);
                        let (credential, lease, receipt) = issued_to_pb(*i);
                        pb::ExchangeTokenResponse {
                            credential,
                            lease,
                            receipt,
                            access_request,
                            issued_token_type,
                            delegation,
                        }
                    }
                    IssueOutcome::Pending(ar, need) => {
                        let mut pending = access_request_to_pb(&ar);
                        pending.approvals = need.have;
                        pb::ExchangeTokenResponse {
                            delegation: pending.delegation.clone(),
                            access_request: Some(pending),
                            issued_token_type: String::new(),
                            ..Default::default()
                        }
                    }
                })
            }
            .await,
        )
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
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
                    Err(e) => return Err(call.reject(b, e).await),
                };
                let (credential, lease, receipt) = issued_to_pb(b.renew(caller, id, ttl).await?);
                Ok(pb::RenewLeaseResponse {
                    credential,
                    lease,
                    receipt,
                })
            }
            .await,
        )
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let id = call.id(b, &request.get_ref().lease_id).await?;
                let (lease, receipt) = b.release(caller, id).await?;
                Ok(pb::ReleaseLeaseResponse {
                    lease: Some(lease_to_pb(&lease)),
                    receipt: Some(convert::receipt_to_pb(&receipt)),
                })
            }
            .await,
        )
    }

    type WatchAccessRequestStream = PbStream<pb::AccessRequest>;

    async fn get_access_request(
        &self,
        request: Request<pb::GetAccessRequestRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let id = call.id(b, &request.get_ref().id).await?;
                Ok(access_request_to_pb(
                    &b.access_request(caller, id.as_str()).await?,
                ))
            }
            .await,
        )
    }

    async fn watch_access_request(
        &self,
        request: Request<pb::GetAccessRequestRequest>,
    ) -> Result<Response<Self::WatchAccessRequestStream>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        let id = call
            .id(b, &request.get_ref().id)
            .await
            .map_err(to_status)?
            .to_string();
        let rx = b
            .watch_access_request(&call.caller, &id, call.take_admission())
            .await
            .map_err(to_status)?;
        Ok(stream(rx, |ar| access_request_to_pb(&ar)))
    }

    async fn explain_decision(
        &self,
        request: Request<pb::ExplainDecisionRequest>,
    ) -> Result<Response<pb::ExplainDecisionResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let inner = request.get_ref().request.clone().unwrap_or_default();
                let req = match parse_issue_request(&inner) {
                    Ok(r) => r,
                    Err(e) => return Err(call.reject(b, e).await),
                };
                Ok(convert::explanation_to_pb(&b.explain(
                    caller,
                    &req,
                    inner.break_glass,
                )?))
            }
            .await,
        )
    }
}
