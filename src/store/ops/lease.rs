//! Leases: issuance, renewal, release, operator locks, expiry; and lease reads.

use super::guards::{admit, locked};
use super::log::{append, Head};
use super::rows::{self, IDEMPOTENCY_COLUMNS, LEASE_COLUMNS, LOCK_COLUMNS};
use super::{access, refuse, refuse_new_lease};
use crate::audit::AuditEvent;
use crate::domain::{AccessRequest, IdempotencyRecord, Lease, LeaseFilter, LeaseId, Lock};
use crate::store::sql::{DbError, Tx, Value};
use crate::store::{guard_holder, Applied, IdentityStats, Refusal};

/// One lease.
pub(crate) fn select(tx: &mut dyn Tx, id: &str) -> Result<Option<Lease>, DbError> {
    tx.query_opt(
        &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1"),
        &[id.into()],
    )?
    .map(|r| rows::lease(&r))
    .transpose()
}

/// Records a new lease.
pub(crate) fn insert(tx: &mut dyn Tx, lease: &Lease) -> Result<(), DbError> {
    let scopes = serde_json::to_string(&lease.scopes).unwrap_or_default();
    let intent = lease
        .intent
        .as_ref()
        .map(|i| serde_json::to_string(i).unwrap_or_default());
    let backend = lease.backend.as_ref();
    tx.execute(
        &format!(
            "INSERT INTO leases ({LEASE_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                     $18, $19)"
        ),
        &[
            lease.id.as_str().into(),
            lease.profile.as_str().into(),
            lease.spiffe_id.as_str().into(),
            scopes.as_str().into(),
            lease.audience.as_str().into(),
            lease.state.as_str().into(),
            lease.issued_at.into(),
            lease.expires_at.into(),
            lease.max_expires_at.into(),
            lease.credential_sha256.as_str().into(),
            lease.renewals.into(),
            lease.ended_at.into(),
            lease.end_reason.as_deref().into(),
            intent.as_deref().into(),
            backend.map(|b| b.kind.as_str()).into(),
            backend.map(|b| b.handle.as_str()).into(),
            backend.is_some_and(|b| b.revocable).into(),
            lease.parent.as_ref().map(|p| p.as_str()).into(),
            lease.subject.as_deref().into(),
        ],
    )?;
    Ok(())
}

/// A new lease, admitted by the guards; with its idempotency record and, for a
/// break-glass issuance, its access request.
pub(crate) fn issue(
    tx: &mut dyn Tx,
    head: &mut Head,
    lease: Lease,
    max_active: Option<u32>,
    break_glass: Option<AccessRequest>,
    idempotency: Option<IdempotencyRecord>,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    if let Some(rec) = &idempotency {
        let used = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM idempotency WHERE caller = $1 AND key_hash = $2)",
                &[rec.caller.as_str().into(), rec.key_hash.as_str().into()],
            )?
            .bool(0)?;
        if used {
            return refuse_new_lease(tx, head, event, Refusal::Duplicate);
        }
    }
    if let Some(refusal) = admit(tx, &lease, max_active)? {
        return refuse_new_lease(tx, head, event, refusal);
    }
    insert(tx, &lease)?;
    if let Some(rec) = &idempotency {
        tx.execute(
            &format!(
                "INSERT INTO idempotency ({IDEMPOTENCY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            &[
                rec.caller.as_str().into(),
                rec.key_hash.as_str().into(),
                rec.digest.as_str().into(),
                rec.lease_id.as_str().into(),
                rec.sealed.as_slice().into(),
                rec.expires_at.into(),
            ],
        )?;
    }
    if let Some(r) = &break_glass {
        access::insert(tx, r)?;
    }
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.lease = Some(lease);
    a.access_request = break_glass;
    Ok(a)
}

/// A `Renew` op, apart from its event.
pub(crate) struct Renewal {
    pub(crate) lease_id: LeaseId,
    pub(crate) holder: String,
    pub(crate) now: i64,
    pub(crate) expires_at: i64,
    pub(crate) credential_sha256: String,
}

/// Extends the holder's active lease (capped at its maximum) with a fresh credential.
pub(crate) fn renew(
    tx: &mut dyn Tx,
    head: &mut Head,
    op: Renewal,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    let id = op.lease_id.as_str();
    let lease = match guard_holder(select(tx, id)?, &op.holder, op.now) {
        Err(r) => return refuse(tx, head, event, r),
        Ok(lease) => lease,
    };
    // A renewal mints a fresh credential: locks apply to it as to issuance.
    if let Some(r) = locked(tx, &lease.spiffe_id, lease.profile.as_str(), op.now)? {
        return refuse(tx, head, event, r);
    }
    let expires_at = op.expires_at.min(lease.max_expires_at);
    tx.execute(
        "UPDATE leases SET expires_at = $2, credential_sha256 = $3, renewals = renewals + 1
         WHERE id = $1 AND state = 'active'",
        &[
            id.into(),
            expires_at.into(),
            op.credential_sha256.as_str().into(),
        ],
    )?;
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.lease = select(tx, id)?;
    Ok(a)
}

/// The holder gives its active lease back.
pub(crate) fn release(
    tx: &mut dyn Tx,
    head: &mut Head,
    lease_id: &LeaseId,
    holder: &str,
    now: i64,
    mut event: AuditEvent,
) -> Result<Applied, DbError> {
    let id = lease_id.as_str();
    if let Err(r) = guard_holder(select(tx, id)?, holder, now) {
        return refuse(tx, head, event, r);
    }
    tx.execute(
        "UPDATE leases SET state = 'released', ended_at = $2, end_reason = 'released by holder'
         WHERE id = $1 AND state = 'active'",
        &[id.into(), now.into()],
    )?;
    // A person's session token given back (a logout) takes what agents derived from it.
    event.affected_leases = super::revoke::end_derived(tx, id, now, "released by holder")?;
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.lease = select(tx, id)?;
    a.affected = vec![id.to_owned()];
    Ok(a)
}

/// Sets an operator lock.
pub(crate) fn lock(
    tx: &mut dyn Tx,
    head: &mut Head,
    lock: &Lock,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    tx.execute(
        &format!("INSERT INTO locks ({LOCK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
        &[
            lock.id.as_str().into(),
            lock.kind.as_str().into(),
            lock.value.as_str().into(),
            lock.until.into(),
            lock.reason.as_str().into(),
            lock.created_by.as_str().into(),
            lock.created_at.into(),
        ],
    )?;
    let receipt = append(tx, head, &event)?;
    Ok(Applied::recorded(Some(receipt)))
}

/// Removes an operator lock (refused if there is none by that id).
pub(crate) fn unlock(
    tx: &mut dyn Tx,
    head: &mut Head,
    id: &str,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    if tx.execute("DELETE FROM locks WHERE id = $1", &[id.into()])? == 0 {
        return refuse(tx, head, event, Refusal::NothingMatched);
    }
    let receipt = append(tx, head, &event)?;
    Ok(Applied::recorded(Some(receipt)))
}

/// Marks up to `limit` active leases and open access requests whose expiry has passed as
/// expired, and forgets expired idempotency records. The entry is written only if
/// something expired.
///
/// The batch is a MATERIALIZED CTE: as `id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`
/// PostgreSQL may rescan the subquery, skip the rows this very statement just updated,
/// and exceed the limit. With SKIP LOCKED (PostgreSQL), a pass also never waits on (or
/// takes) a row another transaction holds; the ledger lock already serializes replicas.
/// The batch's column is `batch_id` and `RETURNING` names `id` unqualified: SQLite's
/// `RETURNING` sees only the updated table, and PostgreSQL's would find `id` ambiguous.
pub(crate) fn expire(
    tx: &mut dyn Tx,
    head: &mut Head,
    now: i64,
    limit: u32,
    mut event: AuditEvent,
) -> Result<Applied, DbError> {
    // Sealed credentials are kept no longer than the credentials live.
    tx.execute(
        "DELETE FROM idempotency WHERE expires_at <= $1",
        &[now.into()],
    )?;
    let skip_locked = tx.dialect().skip_locked();
    let args = [Value::Int(now), limit.into()];
    let leases = tx.query(
        &format!(
            "WITH batch AS MATERIALIZED (
                 SELECT id AS batch_id FROM leases WHERE state = 'active' AND expires_at <= $1
                 ORDER BY expires_at LIMIT $2{skip_locked})
             UPDATE leases AS l SET state = 'expired', ended_at = expires_at, end_reason = 'ttl elapsed'
             FROM batch WHERE l.id = batch.batch_id AND l.state = 'active'
             RETURNING id"
        ),
        &args,
    )?;
    let requests = tx.query(
        &format!(
            "WITH batch AS MATERIALIZED (
                 SELECT id AS batch_id FROM access_requests WHERE state IN ('pending', 'approved')
                     AND expires_at <= $1
                 ORDER BY expires_at LIMIT $2{skip_locked})
             UPDATE access_requests AS r SET state = 'expired', decided_at = $1
             FROM batch WHERE r.id = batch.batch_id AND r.state IN ('pending', 'approved')
             RETURNING id"
        ),
        &args,
    )?;
    let mut ids = rows::all(leases, |r| r.text(0))?;
    ids.sort();
    let mut requests = rows::all(requests, |r| r.text(0))?;
    requests.sort();
    if ids.is_empty() && requests.is_empty() {
        return Ok(Applied::recorded(None));
    }
    event.affected_leases = ids.clone();
    event.affected_requests = requests.clone();
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    ids.extend(requests);
    a.affected = ids;
    Ok(a)
}

/// Most leases of one derivation tree listed.
const MAX_TREE: i64 = 10_000;

/// A lease and every lease derived from it by token exchange, transitively, oldest first.
fn tree(tx: &mut dyn Tx, root: &str) -> Result<Vec<Lease>, DbError> {
    let rows = tx.query(
        &format!(
            "WITH RECURSIVE tree(id) AS (
                 SELECT id FROM leases WHERE id = $1
                 UNION SELECT l.id FROM leases l JOIN tree t ON l.parent_lease_id = t.id)
             SELECT {LEASE_COLUMNS} FROM leases WHERE id IN (SELECT id FROM tree)
             ORDER BY issued_at, id LIMIT $2"
        ),
        &[root.into(), MAX_TREE.into()],
    )?;
    rows::all(rows, rows::lease)
}

/// Leases, newest first (or one derivation tree, oldest first).
pub(crate) fn list(tx: &mut dyn Tx, filter: &LeaseFilter) -> Result<Vec<Lease>, DbError> {
    if let Some(root) = &filter.derived_from {
        return tree(tx, root);
    }
    let (before_at, before_id) = filter.before.clone().unwrap_or((i64::MAX, String::new()));
    let rows = tx.query(
        &format!(
            "SELECT {LEASE_COLUMNS} FROM leases
             WHERE (CAST($1 AS TEXT) IS NULL OR spiffe_id = $1)
               AND (CAST($2 AS TEXT) IS NULL OR state = $2)
               AND (CAST($7 AS TEXT) IS NULL OR id = $7)
               AND (NOT CAST($3 AS BOOLEAN) OR issued_at < $4 OR (issued_at = $4 AND id < $5))
             ORDER BY issued_at DESC, id DESC LIMIT $6"
        ),
        &[
            filter.spiffe_id.as_deref().into(),
            filter.state.map(|s| s.as_str()).into(),
            filter.before.is_some().into(),
            before_at.into(),
            before_id.as_str().into(),
            filter.limit.clamp(1, 1000).into(),
            filter.lease_id.as_deref().into(),
        ],
    )?;
    rows::all(rows, rows::lease)
}

/// Operator locks in force at `now`.
pub(crate) fn locks(tx: &mut dyn Tx, now: i64) -> Result<Vec<Lock>, DbError> {
    let rows = tx.query(
        &format!("SELECT {LOCK_COLUMNS} FROM locks WHERE until > $1 ORDER BY created_at"),
        &[now.into()],
    )?;
    rows::all(rows, rows::lock)
}

/// The idempotency record of a caller's key.
pub(crate) fn idempotency(
    tx: &mut dyn Tx,
    caller: &str,
    key_hash: &str,
) -> Result<Option<IdempotencyRecord>, DbError> {
    tx.query_opt(
        &format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency WHERE caller = $1 AND key_hash = $2"
        ),
        &[caller.into(), key_hash.into()],
    )?
    .map(|r| rows::idempotency(&r))
    .transpose()
}

/// Traffic statistics of every identity seen, with its active leases.
pub(crate) fn identity_stats(tx: &mut dyn Tx) -> Result<Vec<IdentityStats>, DbError> {
    let rows = tx.query(
        "SELECT s.spiffe_id, s.first_seen, s.last_seen, s.last_issued, s.issued, s.denied,
                (SELECT count(*) FROM leases l WHERE l.spiffe_id = s.spiffe_id AND l.state = 'active')
         FROM identities_seen s ORDER BY s.spiffe_id",
        &[],
    )?;
    rows::all(rows, rows::identity_stats)
}
