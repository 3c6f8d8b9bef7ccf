//! Access requests: opening one, reviews (approvals, denials, break-glass post-reviews),
//! redeeming an approved one exactly once; and access request reads.

use super::guards::admit;
use super::log::{append, Head};
use super::rows::{self, REQUEST_COLUMNS, REVIEW_COLUMNS};
use super::{lease, refuse, refuse_new_lease};
use crate::audit::AuditEvent;
use crate::domain::{AccessFilter, AccessRequest, AccessState, Lease, Verdict};
use crate::store::sql::{DbError, Dialect, Tx, Value};
use crate::store::{Applied, Refusal};

/// Records an access request (without reviews).
pub(crate) fn insert(tx: &mut dyn Tx, r: &AccessRequest) -> Result<(), DbError> {
    let request = r.request.canonical();
    tx.execute(
        &format!(
            "INSERT INTO access_requests ({REQUEST_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ),
        &[
            r.id.as_str().into(),
            r.requester.as_str().into(),
            r.profile.as_str().into(),
            request.as_str().into(),
            r.digest.as_str().into(),
            r.group.as_str().into(),
            r.threshold.into(),
            r.state.as_str().into(),
            r.created_at.into(),
            r.expires_at.into(),
            r.deny_ends.into(),
            r.break_glass.into(),
            r.post_review.as_deref().into(),
            r.lease_id.as_deref().into(),
        ],
    )?;
    Ok(())
}

/// Fills in a request's reviews, oldest first.
fn with_reviews(tx: &mut dyn Tx, mut r: AccessRequest) -> Result<AccessRequest, DbError> {
    let reviews = tx.query(
        &format!(
            "SELECT {REVIEW_COLUMNS} FROM access_reviews WHERE request_id = $1 ORDER BY at, reviewer"
        ),
        &[r.id.as_str().into()],
    )?;
    r.reviews = rows::all(reviews, rows::review)?;
    Ok(r)
}

/// One access request with its reviews.
pub(crate) fn select(tx: &mut dyn Tx, id: &str) -> Result<Option<AccessRequest>, DbError> {
    let row = tx.query_opt(
        &format!("SELECT {REQUEST_COLUMNS} FROM access_requests WHERE id = $1"),
        &[id.into()],
    )?;
    match row {
        None => Ok(None),
        Some(row) => with_reviews(tx, rows::access_request(&row)?).map(Some),
    }
}

/// Access requests, newest first, with their reviews.
pub(crate) fn list(tx: &mut dyn Tx, filter: &AccessFilter) -> Result<Vec<AccessRequest>, DbError> {
    // The profile filter is a set: a JSON array for SQLite's `json_each`, an array for
    // PostgreSQL's `= ANY`.
    let json;
    let (in_profiles, profiles) = match tx.dialect() {
        Dialect::Sqlite => {
            json = filter
                .profiles
                .as_ref()
                .map(|p| serde_json::to_string(p).unwrap_or_default());
            (
                "(CAST($2 AS TEXT) IS NULL OR profile IN (SELECT value FROM json_each($2)))",
                json.as_deref().into(),
            )
        }
        Dialect::Postgres => (
            "($2::text[] IS NULL OR profile = ANY($2))",
            filter.profiles.as_ref().map_or(Value::Null, |p| {
                Value::List(p.iter().map(|s| s.as_str().into()).collect())
            }),
        ),
    };
    let rows = tx.query(
        &format!(
            "SELECT {REQUEST_COLUMNS} FROM access_requests
             WHERE (CAST($1 AS TEXT) IS NULL OR state = $1)
               AND {in_profiles}
               AND (NOT CAST($3 AS BOOLEAN) OR post_review = 'pending')
               AND (CAST($4 AS TEXT) IS NULL OR requester = $4)
             ORDER BY created_at DESC, id DESC LIMIT $5"
        ),
        &[
            filter.state.map(|s| s.as_str()).into(),
            profiles,
            filter.awaiting_post_review.into(),
            filter.requester.as_deref().into(),
            filter.limit.clamp(1, 1000).into(),
        ],
    )?;
    let requests = rows::all(rows, rows::access_request)?;
    requests.into_iter().map(|r| with_reviews(tx, r)).collect()
}

/// Marks an open request expired (its expiry passed when it was reviewed or redeemed).
fn expire_request(tx: &mut dyn Tx, id: &str, now: i64) -> Result<(), DbError> {
    tx.execute(
        "UPDATE access_requests SET state = 'expired', decided_at = $2 WHERE id = $1",
        &[id.into(), now.into()],
    )?;
    Ok(())
}

/// Opens an access request that awaits approvals.
pub(crate) fn open(
    tx: &mut dyn Tx,
    head: &mut Head,
    request: AccessRequest,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    insert(tx, &request)?;
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.access_request = Some(request);
    Ok(a)
}

/// A `Review` op, apart from its event.
pub(crate) struct ReviewOp {
    pub(crate) id: String,
    pub(crate) reviewer: String,
    pub(crate) verdict: Verdict,
    pub(crate) reason: String,
    pub(crate) now: i64,
}

/// An approver's review: counts toward the threshold, or denies; for a break-glass
/// issuance, the post-review.
pub(crate) fn review(
    tx: &mut dyn Tx,
    head: &mut Head,
    op: ReviewOp,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    let (id, now) = (op.id.as_str(), op.now);
    let Some(req) = select(tx, id)? else {
        return refuse(tx, head, event, Refusal::RequestNotFound);
    };
    if req.requester == op.reviewer {
        return refuse(tx, head, event, Refusal::SelfReview);
    }
    let post = req.break_glass;
    if post {
        if req.post_review.as_deref() != Some("pending") {
            return refuse(tx, head, event, Refusal::RequestEnded(req.state));
        }
    } else {
        if req.state != AccessState::Pending {
            return refuse(tx, head, event, Refusal::RequestEnded(req.state));
        }
        if req.expires_at <= now {
            expire_request(tx, id, now)?;
            return refuse(tx, head, event, Refusal::RequestExpired);
        }
        if req
            .reviews
            .iter()
            .any(|r| r.reviewer == op.reviewer && !r.post_review)
        {
            return refuse(tx, head, event, Refusal::AlreadyReviewed);
        }
    }
    tx.execute(
        &format!(
            "INSERT INTO access_reviews (request_id, {REVIEW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ),
        &[
            id.into(),
            op.reviewer.as_str().into(),
            op.verdict.as_str().into(),
            op.reason.as_str().into(),
            now.into(),
            post.into(),
        ],
    )?;
    if post {
        let outcome = if op.verdict == Verdict::Approve {
            "approved"
        } else {
            "denied"
        };
        tx.execute(
            "UPDATE access_requests SET post_review = $2 WHERE id = $1",
            &[id.into(), outcome.into()],
        )?;
    } else {
        let req = select(tx, id)?
            .ok_or_else(|| crate::store::sql::corrupt(format!("access request {id} vanished")))?;
        let approvals = req.approvers().len() as u32;
        // One deny ends it unless the profile says otherwise; then denies are only on
        // record and the request waits for approvals or expiry.
        let next = if op.verdict == Verdict::Deny && req.deny_ends {
            Some("denied")
        } else if approvals >= req.threshold {
            Some("approved")
        } else {
            None
        };
        if let Some(state) = next {
            tx.execute(
                "UPDATE access_requests SET state = $2, decided_at = $3 WHERE id = $1",
                &[id.into(), state.into(), now.into()],
            )?;
        }
    }
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.access_request = select(tx, id)?;
    Ok(a)
}

/// A `Redeem` op, apart from its event.
pub(crate) struct Redemption {
    pub(crate) id: String,
    pub(crate) requester: String,
    pub(crate) digest: String,
    pub(crate) max_active: Option<u32>,
    pub(crate) lease: Lease,
    pub(crate) now: i64,
}

/// Issues the credential of an approved access request, exactly once.
pub(crate) fn redeem(
    tx: &mut dyn Tx,
    head: &mut Head,
    op: Redemption,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    let (id, now, lease) = (op.id.as_str(), op.now, op.lease);
    let req = match select(tx, id)? {
        Some(r) if r.requester == op.requester => r,
        _ => return refuse(tx, head, event, Refusal::RequestNotFound),
    };
    if req.digest != op.digest {
        return refuse(tx, head, event, Refusal::DigestMismatch);
    }
    if req.state != AccessState::Approved {
        return refuse(tx, head, event, Refusal::RequestEnded(req.state));
    }
    if req.expires_at <= now {
        expire_request(tx, id, now)?;
        return refuse(tx, head, event, Refusal::RequestExpired);
    }
    if let Some(refusal) = admit(tx, &lease, op.max_active)? {
        return refuse_new_lease(tx, head, event, refusal);
    }
    lease::insert(tx, &lease)?;
    tx.execute(
        "UPDATE access_requests SET state = 'issued', lease_id = $2 WHERE id = $1 AND state = 'approved'",
        &[id.into(), lease.id.as_str().into()],
    )?;
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.lease = Some(lease);
    a.access_request = select(tx, id)?;
    Ok(a)
}
