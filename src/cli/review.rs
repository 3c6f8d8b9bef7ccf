//! `approve`, `deny`, `requests`: people and services in the approval loop.

use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;
use super::listing::ListOutput;
use super::output::*;

pub async fn review(
    conn: &ConnArgs,
    id: String,
    approve: bool,
    reason: String,
) -> Result<(), CliError> {
    let ch = channel(conn).await?;
    let resp = pb::approvals_client::ApprovalsClient::new(ch)
        .review_access_request(pb::ReviewAccessRequestRequest {
            id,
            approve,
            reason,
        })
        .await?
        .into_inner();
    let r = resp
        .access_request
        .ok_or("no access request in the response")?;
    out!("{}", access_request_json(&r));
    Ok(())
}

pub async fn requests(
    filter: RequestFilter,
    output: ListOutput,
    conn: ConnArgs,
) -> Result<(), CliError> {
    use pb::list_access_requests_request::Filter;
    let filter = match filter {
        RequestFilter::Pending => Filter::Pending,
        RequestFilter::ToReview => Filter::ToReview,
        RequestFilter::Mine => Filter::Mine,
        RequestFilter::PostReview => Filter::AwaitingPostReview,
    };
    let ch = channel(&conn).await?;
    let resp = pb::approvals_client::ApprovalsClient::new(ch)
        .list_access_requests(pb::ListAccessRequestsRequest {
            filter: filter as i32,
            page_size: 0,
        })
        .await?
        .into_inner();
    let rows: Vec<_> = resp
        .access_requests
        .iter()
        .map(access_request_json)
        .collect();
    output.print(
        &rows,
        &[
            ("ID", "/id"),
            ("STATE", "/state"),
            ("REQUESTER", "/requester"),
            ("PROFILE", "/profile"),
            ("ACTION", "/intent/action"),
            ("TARGET", "/intent/target"),
            ("APPROVALS", "/approvals"),
            ("NEEDED", "/threshold"),
            ("EXPIRES", "/expires_at"),
        ],
    );
    Ok(())
}
