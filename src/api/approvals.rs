//! `spiffe_broker.v1.Approvals`: what approvers call.

use tonic::{Request, Response, Status};

use super::convert::access_request_to_pb;
use super::{respond, Api, Call, DEFAULT_PAGE_SIZE};
use crate::broker::RequestListing;
use crate::domain::Verdict;
use crate::error::BrokerError;
use crate::proto::v1 as pb;

#[tonic::async_trait]
impl pb::approvals_server::Approvals for Api {
    async fn list_access_requests(
        &self,
        request: Request<pb::ListAccessRequestsRequest>,
    ) -> Result<Response<pb::ListAccessRequestsResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                use pb::list_access_requests_request::Filter;
                let listing = match Filter::try_from(r.filter) {
                    Ok(Filter::Unspecified | Filter::Pending) => RequestListing::Pending,
                    Ok(Filter::ToReview) => RequestListing::ToReview,
                    Ok(Filter::Mine) => RequestListing::Mine,
                    Ok(Filter::AwaitingPostReview) => RequestListing::AwaitingPostReview,
                    Err(_) => {
                        return Err(call
                            .reject(b, BrokerError::InvalidArgument("unknown filter".into()))
                            .await)
                    }
                };
                if r.page_size > 1000 {
                    return Err(call
                        .reject(
                            b,
                            BrokerError::InvalidArgument("page_size must be at most 1000".into()),
                        )
                        .await);
                }
                let limit = if r.page_size == 0 {
                    DEFAULT_PAGE_SIZE
                } else {
                    r.page_size
                };
                let rows = b.access_requests(caller, listing, limit).await?;
                Ok(pb::ListAccessRequestsResponse {
                    access_requests: rows.iter().map(access_request_to_pb).collect(),
                })
            }
            .await,
        )
    }

    async fn review_access_request(
        &self,
        request: Request<pb::ReviewAccessRequestRequest>,
    ) -> Result<Response<pb::ReviewAccessRequestResponse>, Status> {
        let b = &self.broker;
        let call = Call::of(&request)?;
        respond(
            async {
                let caller = &call.caller;
                let r = request.get_ref();
                let id = call.id(b, &r.id).await?;
                let verdict = if r.approve {
                    Verdict::Approve
                } else {
                    Verdict::Deny
                };
                let ar = b
                    .review(caller, id.as_str(), verdict, r.reason.clone())
                    .await?;
                Ok(pb::ReviewAccessRequestResponse {
                    access_request: Some(access_request_to_pb(&ar)),
                })
            }
            .await,
        )
    }
}
