//! `approve`, `deny`, `requests`: people and services in the approval loop.

use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::output::*;

pub async fn review(
    conn: &ConnArgs,
    id: String,
    approve: bool,
    reason: String,
) -> Result<(), String> {
    let ch = channel(conn).await?;
    let resp = pb::approvals_client::ApprovalsClient::new(ch)
        .review_access_request(pb::ReviewAccessRequestRequest {
            id,
            approve,
            reason,
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    let r = resp
        .access_request
        .ok_or("no access request in the response")?;
    out!("{}", access_request_json(&r));
    Ok(())
}

pub async fn requests(filter: String, conn: ConnArgs) -> Result<(), String> {
    use pb::list_access_requests_request::Filter;
    let filter = match filter.as_str() {
        "pending" => Filter::Pending,
        "to-review" => Filter::ToReview,
        "mine" => Filter::Mine,
        "post-review" => Filter::AwaitingPostReview,
        other => {
            return Err(format!(
                "--filter: unknown filter {other:?} (pending, to-review, mine, post-review)"
            ))
        }
    };
    let ch = channel(&conn).await?;
    let resp = pb::approvals_client::ApprovalsClient::new(ch)
        .list_access_requests(pb::ListAccessRequestsRequest {
            filter: filter as i32,
            page_size: 0,
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    for r in &resp.access_requests {
        out!("{}", access_request_json(r));
    }
    Ok(())
}
