//! Guards every engine checks inside the op's own transaction, so what one writer (or,
//! on PostgreSQL, one replica) committed binds the next transaction of every other.

use crate::domain::Lease;
use crate::store::sql::{DbError, Tx, Value};
use crate::store::Refusal;

/// Whether a new lease may be recorded: no lock or revocation covers it and the holder
/// is under its quota.
pub(crate) fn admit(
    tx: &mut dyn Tx,
    lease: &Lease,
    max_active: Option<u32>,
) -> Result<Option<Refusal>, DbError> {
    if let Some(refusal) = barred(tx, lease)? {
        return Ok(Some(refusal));
    }
    if let Some(refusal) = orphaned(tx, lease)? {
        return Ok(Some(refusal));
    }
    if over_quota(tx, lease, max_active)? {
        return Ok(Some(Refusal::QuotaExceeded(max_active.unwrap_or_default())));
    }
    Ok(None)
}

/// Whether the lease's holder already has `max` active leases on its profile.
fn over_quota(tx: &mut dyn Tx, lease: &Lease, max: Option<u32>) -> Result<bool, DbError> {
    let Some(max) = max else {
        return Ok(false);
    };
    // Bounded by the limit: at most `max` index steps, however many leases the holder has.
    let active = tx
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM leases WHERE spiffe_id = $1 AND profile = $2
                 AND state = 'active' AND expires_at > $3 LIMIT $4) AS q",
            &[
                lease.spiffe_id.as_str().into(),
                lease.profile.as_str().into(),
                lease.issued_at.into(),
                max.into(),
            ],
        )?
        .i64(0)?;
    Ok(active >= i64::from(max))
}

/// Whether a lock or rule row (`kind`, `value`) covers SPIFFE ID `$1` or profile `$2`.
fn matches(tx: &dyn Tx) -> String {
    format!(
        "(kind = 'spiffe_id' AND value = $1) OR (kind = 'prefix' AND {}) \
         OR (kind = 'profile' AND value = $2)",
        tx.dialect().starts_with("$1", "value")
    )
}

/// An operator lock in force at `at` over this identity or profile.
pub(crate) fn locked(
    tx: &mut dyn Tx,
    spiffe_id: &str,
    profile: &str,
    at: i64,
) -> Result<Option<Refusal>, DbError> {
    let row = tx.query_opt(
        &format!(
            "SELECT reason, until FROM locks WHERE until > $3 AND ({}) ORDER BY until DESC LIMIT 1",
            matches(tx)
        ),
        &[spiffe_id.into(), profile.into(), at.into()],
    )?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some(Refusal::Locked(format!(
            "{} (until {})",
            r.text(0)?,
            crate::clock::rfc3339(r.i64(1)?)
        )))),
    }
}

/// A lease derived by token exchange needs its subject token's lease still active at
/// commit: a revocation of the parent that committed first binds the derived lease too
/// (the cascade cannot miss a child that was being minted while it ran).
fn orphaned(tx: &mut dyn Tx, lease: &Lease) -> Result<Option<Refusal>, DbError> {
    let Some(parent) = &lease.parent else {
        return Ok(None);
    };
    let live = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM leases WHERE id = $1 AND state = 'active' AND expires_at > $2)",
            &[parent.as_str().into(), lease.issued_at.into()],
        )?
        .bool(0)?;
    Ok((!live).then_some(Refusal::ParentEnded))
}

/// Why a new lease may not be recorded: an active lock, or a revocation that covers it
/// (its holder, or the subject it acts for).
fn barred(tx: &mut dyn Tx, lease: &Lease) -> Result<Option<Refusal>, DbError> {
    let (holder, profile) = (lease.spiffe_id.as_str(), lease.profile.as_str());
    if let Some(r) = locked(tx, holder, profile, lease.issued_at)? {
        return Ok(Some(r));
    }
    if let Some(subject) = lease.subject.as_deref() {
        if let Some(r) = locked(tx, subject, profile, lease.issued_at)? {
            return Ok(Some(r));
        }
        if revoked_rule(tx, subject, profile, lease.issued_at)? {
            return Ok(Some(Refusal::RevokedBefore));
        }
    }
    let revoked = revoked_rule(tx, holder, profile, lease.issued_at)?;
    Ok(revoked.then_some(Refusal::RevokedBefore))
}

/// Whether a revocation rule cut off issuance to `id` or of `profile` at `at`.
fn revoked_rule(tx: &mut dyn Tx, id: &str, profile: &str, at: i64) -> Result<bool, DbError> {
    tx.query_one(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM revocation_rules WHERE cutoff >= $3 AND ({} OR kind = 'all'))",
            matches(tx)
        ),
        &[id.into(), profile.into(), Value::Int(at)],
    )?
    .bool(0)
}
