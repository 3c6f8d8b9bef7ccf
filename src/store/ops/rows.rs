//! Row decoders: one per stored shape, shared by both engines, so a damaged row is
//! reported the same way (`Corrupt`, naming the row and the column) whichever engine
//! holds it.

use crate::audit::StoredEntry;
use crate::domain::{
    AccessRequest, AccessState, BackendHandle, BackendRevocation, IdempotencyRecord, Intent, Lease,
    LeaseId, LeaseState, Lock, ProfileName, RequestSpec, Review, RevocationEvent, Scope, Verdict,
};
use crate::store::sql::{corrupt, DbError, Row};
use crate::store::{IdentityStats, StoredCheckpoint};

/// The columns [`lease`] reads, in order.
pub(crate) const LEASE_COLUMNS: &str =
    "id, profile, spiffe_id, scopes, audience, state, issued_at, expires_at, \
     max_expires_at, credential_sha256, renewals, ended_at, end_reason, intent, \
     backend_kind, backend_handle, backend_revocable, parent_lease_id, subject";

/// A lease row ([`LEASE_COLUMNS`]).
pub(crate) fn lease(r: &Row) -> Result<Lease, DbError> {
    let id = r.text(0)?;
    let profile = r.text(1)?;
    let scopes = r.text(3)?;
    let state = r.text(5)?;
    let intent = r.opt_text(13)?;
    Ok(Lease {
        profile: ProfileName::parse(&profile)
            .map_err(|_| corrupt(format!("lease {id}: profile")))?,
        spiffe_id: r.text(2)?,
        scopes: serde_json::from_str::<Vec<Scope>>(&scopes)
            .map_err(|_| corrupt(format!("lease {id}: scopes")))?,
        audience: r.text(4)?,
        state: LeaseState::from_db(&state).ok_or_else(|| corrupt(format!("lease {id}: state")))?,
        issued_at: r.i64(6)?,
        expires_at: r.i64(7)?,
        max_expires_at: r.i64(8)?,
        credential_sha256: r.text(9)?,
        renewals: r.u32(10)?,
        ended_at: r.opt_i64(11)?,
        end_reason: r.opt_text(12)?,
        intent: match intent {
            None => None,
            Some(s) => Some(
                serde_json::from_str::<Intent>(&s)
                    .map_err(|_| corrupt(format!("lease {id}: intent")))?,
            ),
        },
        backend: match (r.opt_text(14)?, r.opt_text(15)?) {
            (Some(kind), Some(handle)) => Some(BackendHandle {
                kind,
                handle,
                revocable: r.bool(16)?,
            }),
            _ => None,
        },
        parent: match r.opt_text(17)? {
            None => None,
            Some(p) => {
                Some(LeaseId::parse(&p).map_err(|_| corrupt(format!("lease {id}: parent lease")))?)
            }
        },
        subject: r.opt_text(18)?,
        id: LeaseId::parse(&id).map_err(|_| corrupt(format!("lease id {id:?}")))?,
    })
}

/// The columns [`access_request`] reads, in order.
pub(crate) const REQUEST_COLUMNS: &str =
    "id, requester, profile, request, request_digest, approver_group, threshold, state, \
     created_at, expires_at, deny_ends, break_glass, post_review, lease_id";

/// An access request row ([`REQUEST_COLUMNS`]), without its reviews.
pub(crate) fn access_request(r: &Row) -> Result<AccessRequest, DbError> {
    let id = r.text(0)?;
    let profile = r.text(2)?;
    let request = r.text(3)?;
    let state = r.text(7)?;
    Ok(AccessRequest {
        requester: r.text(1)?,
        profile: ProfileName::parse(&profile)
            .map_err(|_| corrupt(format!("access request {id}: profile")))?,
        request: serde_json::from_str::<RequestSpec>(&request)
            .map_err(|_| corrupt(format!("access request {id}: request")))?,
        digest: r.text(4)?,
        group: r.text(5)?,
        threshold: r.u32(6)?,
        state: AccessState::from_db(&state)
            .ok_or_else(|| corrupt(format!("access request {id}: state")))?,
        created_at: r.i64(8)?,
        expires_at: r.i64(9)?,
        deny_ends: r.bool(10)?,
        break_glass: r.bool(11)?,
        post_review: r.opt_text(12)?,
        lease_id: r.opt_text(13)?,
        reviews: Vec::new(),
        id,
    })
}

/// The columns [`review`] reads, in order.
pub(crate) const REVIEW_COLUMNS: &str = "reviewer, verdict, reason, at, post_review";

/// An access review row ([`REVIEW_COLUMNS`]).
pub(crate) fn review(r: &Row) -> Result<Review, DbError> {
    Ok(Review {
        reviewer: r.text(0)?,
        verdict: if r.text(1)? == "approve" {
            Verdict::Approve
        } else {
            Verdict::Deny
        },
        reason: r.text(2)?,
        at: r.i64(3)?,
        post_review: r.bool(4)?,
    })
}

/// The columns [`entry`] reads, in order.
pub(crate) const ENTRY_COLUMNS: &str = "seq, kind, lease_id, body, prev_hash, hash";

/// An audit entry row ([`ENTRY_COLUMNS`]).
pub(crate) fn entry(r: &Row) -> Result<StoredEntry, DbError> {
    Ok(StoredEntry {
        seq: r.u64(0)?,
        kind: r.text(1)?,
        lease_id: r.opt_text(2)?,
        body: r.text(3)?,
        prev_hash: r.bytes(4)?,
        hash: r.bytes(5)?,
    })
}

/// The columns [`backend_revocation`] reads, in order.
pub(crate) const BACKEND_REVOCATION_COLUMNS: &str =
    "lease_id, kind, handle, queued_at, attempts, next_attempt_at, last_error";

/// A backend revocation row ([`BACKEND_REVOCATION_COLUMNS`]).
pub(crate) fn backend_revocation(r: &Row) -> Result<BackendRevocation, DbError> {
    Ok(BackendRevocation {
        lease_id: r.text(0)?,
        kind: r.text(1)?,
        handle: r.text(2)?,
        queued_at: r.i64(3)?,
        attempts: r.u32(4)?,
        next_attempt_at: r.i64(5)?,
        last_error: r.opt_text(6)?,
    })
}

/// The columns [`checkpoint`] reads, in order.
pub(crate) const CHECKPOINT_COLUMNS: &str = "size, root, time_ms, note";

/// A checkpoint row ([`CHECKPOINT_COLUMNS`]).
pub(crate) fn checkpoint(r: &Row) -> Result<StoredCheckpoint, DbError> {
    Ok(StoredCheckpoint {
        size: r.u64(0)?,
        root: r.hash32(1)?,
        time_ms: r.i64(2)?,
        note: r.text(3)?,
        cosignatures: Vec::new(),
    })
}

/// The columns [`lock`] reads, in order.
pub(crate) const LOCK_COLUMNS: &str = "id, kind, value, until, reason, created_by, created_at";

/// An operator lock row ([`LOCK_COLUMNS`]).
pub(crate) fn lock(r: &Row) -> Result<Lock, DbError> {
    Ok(Lock {
        id: r.text(0)?,
        kind: r.text(1)?,
        value: r.text(2)?,
        until: r.i64(3)?,
        reason: r.text(4)?,
        created_by: r.text(5)?,
        created_at: r.i64(6)?,
    })
}

/// The columns [`revocation_event`] reads, in order.
pub(crate) const REVOCATION_EVENT_COLUMNS: &str =
    "seq, lease_id, spiffe_id, profile, expires_at, revoked_at, reason, chain_hash, \
     certificate_serial";

/// A revocation feed row ([`REVOCATION_EVENT_COLUMNS`]).
pub(crate) fn revocation_event(r: &Row) -> Result<RevocationEvent, DbError> {
    Ok(RevocationEvent {
        seq: r.u64(0)?,
        lease_id: r.text(1)?,
        spiffe_id: r.text(2)?,
        profile: r.text(3)?,
        expires_at: r.i64(4)?,
        revoked_at: r.i64(5)?,
        reason: r.text(6)?,
        chain_hash: hex::encode(r.bytes(7)?),
        certificate_serial: r.opt_text(8)?,
    })
}

/// The columns [`idempotency`] reads, in order.
pub(crate) const IDEMPOTENCY_COLUMNS: &str =
    "caller, key_hash, digest, lease_id, sealed, expires_at";

/// An idempotency record row ([`IDEMPOTENCY_COLUMNS`]).
pub(crate) fn idempotency(r: &Row) -> Result<IdempotencyRecord, DbError> {
    Ok(IdempotencyRecord {
        caller: r.text(0)?,
        key_hash: r.text(1)?,
        digest: r.text(2)?,
        lease_id: r.text(3)?,
        sealed: r.bytes(4)?,
        expires_at: r.i64(5)?,
    })
}

/// An `identities_seen` row with its active lease count (see `reads::identity_stats`).
pub(crate) fn identity_stats(r: &Row) -> Result<IdentityStats, DbError> {
    Ok(IdentityStats {
        spiffe_id: r.text(0)?,
        first_seen_ms: r.i64(1)?,
        last_seen_ms: r.i64(2)?,
        last_issued_ms: r.opt_i64(3)?,
        issued: r.u64(4)?,
        denied: r.u64(5)?,
        active_leases: r.u64(6)?,
    })
}

/// Decodes every row with `f`.
pub(crate) fn all<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, DbError>,
) -> Result<Vec<T>, DbError> {
    rows.iter().map(f).collect()
}
