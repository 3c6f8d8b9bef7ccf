//! Backend revocations: a lease whose backend holds state is queued (by a schema trigger)
//! when it ends; a broker claims due rows, then records the outcome; a platform-admin may
//! give up on one.

use super::log::{append, Head};
use super::refuse;
use super::rows::{self, BACKEND_REVOCATION_COLUMNS};
use crate::audit::AuditEvent;
use crate::domain::BackendRevocation;
use crate::store::sql::{DbError, Dialect, Tx};
use crate::store::{Applied, Receipt, Refusal};

/// Ends a pending backend revocation with `outcome` and records `event`; `None` when
/// nothing was pending (already done or force-removed).
fn end(
    tx: &mut dyn Tx,
    head: &mut Head,
    lease_id: &str,
    now: i64,
    outcome: &str,
    event: &AuditEvent,
) -> Result<Option<Receipt>, DbError> {
    let n = tx.execute(
        "UPDATE backend_revocations SET done_at = $2, outcome = $3
         WHERE lease_id = $1 AND done_at IS NULL",
        &[lease_id.into(), now.into(), outcome.into()],
    )?;
    if n == 0 {
        return Ok(None);
    }
    append(tx, head, event).map(Some)
}

/// The backend confirmed the revocation.
pub(crate) fn revoked(
    tx: &mut dyn Tx,
    head: &mut Head,
    lease_id: &str,
    now: i64,
    event: &AuditEvent,
) -> Result<Applied, DbError> {
    // Force-removed meanwhile: nothing to record twice.
    let receipt = end(tx, head, lease_id, now, "revoked", event)?;
    Ok(Applied::recorded(receipt))
}

/// An attempt failed: count it and set the next one.
pub(crate) fn failed(
    tx: &mut dyn Tx,
    lease_id: &str,
    error: &str,
    next_attempt_at: i64,
) -> Result<Applied, DbError> {
    tx.execute(
        "UPDATE backend_revocations SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3
         WHERE lease_id = $1 AND done_at IS NULL",
        &[lease_id.into(), error.into(), next_attempt_at.into()],
    )?;
    Ok(Applied::recorded(None))
}

/// A platform-admin gives up on a pending backend revocation (refused if none is).
pub(crate) fn force_remove(
    tx: &mut dyn Tx,
    head: &mut Head,
    lease_id: &str,
    now: i64,
    event: AuditEvent,
) -> Result<Applied, DbError> {
    match end(tx, head, lease_id, now, "force_removed", &event)? {
        Some(receipt) => Ok(Applied::recorded(Some(receipt))),
        None => refuse(tx, head, event, Refusal::NothingMatched),
    }
}

/// Claims up to `limit` due backend revocations (oldest due first) until `now +
/// hold_secs` (see `Store::claim_backend_revocations`).
///
/// Atomicity differs by engine. SQLite: a select, then one update per row, so the caller
/// runs this inside a transaction that holds SQLite's write lock (a concurrent claimer
/// waits, then finds these rows no longer due). PostgreSQL: one statement, atomic by
/// itself, that skips rows another replica is claiming right now instead of waiting.
pub(crate) fn claim(
    tx: &mut dyn Tx,
    now: i64,
    limit: u32,
    hold_secs: u32,
) -> Result<Vec<BackendRevocation>, DbError> {
    let until = now.saturating_add(i64::from(hold_secs));
    match tx.dialect() {
        Dialect::Sqlite => {
            let due = tx.query(
                &format!(
                    "SELECT {BACKEND_REVOCATION_COLUMNS} FROM backend_revocations
                     WHERE done_at IS NULL AND next_attempt_at <= $1
                     ORDER BY next_attempt_at, lease_id LIMIT $2"
                ),
                &[now.into(), limit.into()],
            )?;
            let mut claimed = rows::all(due, rows::backend_revocation)?;
            for r in &mut claimed {
                tx.execute(
                    "UPDATE backend_revocations SET next_attempt_at = $2
                     WHERE lease_id = $1 AND done_at IS NULL",
                    &[r.lease_id.as_str().into(), until.into()],
                )?;
                r.next_attempt_at = until;
            }
            Ok(claimed)
        }
        Dialect::Postgres => {
            let rows = tx.query(
                "WITH due AS MATERIALIZED (
                     SELECT lease_id, next_attempt_at FROM backend_revocations
                     WHERE done_at IS NULL AND next_attempt_at <= $1
                     ORDER BY next_attempt_at, lease_id LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 UPDATE backend_revocations b SET next_attempt_at = $3
                 FROM due
                 WHERE b.lease_id = due.lease_id AND b.done_at IS NULL
                 RETURNING b.lease_id, b.kind, b.handle, b.queued_at, b.attempts, b.next_attempt_at,
                           b.last_error, due.next_attempt_at",
                &[now.into(), limit.into(), until.into()],
            )?;
            let mut claimed = rows
                .iter()
                .map(|r| Ok((r.i64(7)?, rows::backend_revocation(r)?)))
                .collect::<Result<Vec<_>, DbError>>()?;
            // In the order they were due, as SQLite's select returns them.
            claimed.sort_by(|a, b| (a.0, &a.1.lease_id).cmp(&(b.0, &b.1.lease_id)));
            Ok(claimed.into_iter().map(|(_, r)| r).collect())
        }
    }
}

/// Pending backend revocations with at least `min_attempts` failures, oldest first.
pub(crate) fn pending(
    tx: &mut dyn Tx,
    min_attempts: u32,
    limit: u32,
) -> Result<Vec<BackendRevocation>, DbError> {
    let rows = tx.query(
        &format!(
            "SELECT {BACKEND_REVOCATION_COLUMNS} FROM backend_revocations
             WHERE done_at IS NULL AND attempts >= $1 ORDER BY queued_at, lease_id LIMIT $2"
        ),
        &[min_attempts.into(), limit.into()],
    )?;
    rows::all(rows, rows::backend_revocation)
}
