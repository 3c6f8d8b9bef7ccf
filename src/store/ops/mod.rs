//! The ledger's operations, written once for both engines over [`Tx`](super::sql::Tx).
//!
//! Every [`LedgerOp`] is applied here, inside the transaction (savepoint) the engine's
//! writer opened: guards, row changes and the audit entry commit together or not at all.
//! Reads are here too. What stays in an engine is how it opens and migrates, how its
//! writer begins and commits (SQLite: `BEGIN IMMEDIATE` and group commit; PostgreSQL:
//! the ledger's advisory lock and a fresh head), its read path, and its `Tx`.
//!
//! One module per op family: [`lease`] (issue, renew, release, locks, expiry),
//! [`access`] (access requests and reviews), [`revoke`] (revocation and its feed),
//! [`backend`] (backend revocations), [`log`] (the hash chain, Merkle tree and
//! checkpoints), [`guards`] (what bars an issuance) and [`rows`] (row decoders).

pub(crate) mod access;
pub(crate) mod backend;
pub(crate) mod guards;
pub(crate) mod lease;
pub(crate) mod log;
pub(crate) mod revoke;
pub(crate) mod rows;
pub(crate) mod sink;

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use self::log::{append, Head};
use super::sql::{DbError, Tx, Value};
use super::{Applied, LedgerOp, Refusal};
use crate::audit::{AuditEvent, EventKind};

/// Applies one op in the caller's transaction, and counts the caller's traffic in
/// `tally` (written by [`Tally::write`] once per batch, before it commits) only if the
/// op succeeded.
pub(crate) fn apply(
    tx: &mut dyn Tx,
    head: &mut Head,
    op: LedgerOp,
    tally: &mut Tally,
) -> Result<Applied, DbError> {
    let seen = op.event().and_then(Seen::of);
    let applied = apply_guarded(tx, head, op)?;
    if let Some((caller, mut seen)) = seen {
        if applied.refused.is_some() {
            seen.issued = 0;
            seen.denied = 1;
            seen.last_issued = None;
        }
        tally.add(caller, seen);
    }
    Ok(applied)
}

fn apply_guarded(tx: &mut dyn Tx, head: &mut Head, op: LedgerOp) -> Result<Applied, DbError> {
    match op {
        LedgerOp::Issue {
            lease,
            event,
            max_active,
            break_glass,
            idempotency,
        } => lease::issue(tx, head, lease, max_active, break_glass, idempotency, event),
        LedgerOp::OpenAccessRequest { request, event } => access::open(tx, head, request, event),
        LedgerOp::Review {
            id,
            reviewer,
            verdict,
            reason,
            now,
            event,
        } => {
            let op = access::ReviewOp {
                id,
                reviewer,
                verdict,
                reason,
                now,
            };
            access::review(tx, head, op, event)
        }
        LedgerOp::Redeem {
            id,
            requester,
            digest,
            max_active,
            lease,
            now,
            event,
        } => {
            let op = access::Redemption {
                id,
                requester,
                digest,
                max_active,
                lease,
                now,
            };
            access::redeem(tx, head, op, event)
        }
        LedgerOp::Renew {
            lease_id,
            holder,
            now,
            expires_at,
            credential_sha256,
            event,
        } => {
            let op = lease::Renewal {
                lease_id,
                holder,
                now,
                expires_at,
                credential_sha256,
            };
            lease::renew(tx, head, op, event)
        }
        LedgerOp::Release {
            lease_id,
            holder,
            now,
            event,
        } => lease::release(tx, head, &lease_id, &holder, now, event),
        LedgerOp::Revoke {
            selector,
            issued_before,
            reason,
            now,
            dry_run,
            chunk,
            event,
        } => {
            let op = revoke::Revocation {
                selector,
                issued_before,
                reason,
                now,
                dry_run,
                chunk,
            };
            revoke::revoke(tx, head, op, event)
        }
        LedgerOp::Lock { lock, event } => lease::lock(tx, head, &lock, event),
        LedgerOp::Unlock { id, event } => lease::unlock(tx, head, &id, event),
        LedgerOp::BackendRevoked {
            lease_id,
            now,
            event,
        } => backend::revoked(tx, head, &lease_id, now, &event),
        LedgerOp::BackendRevokeFailed {
            lease_id,
            error,
            next_attempt_at,
        } => backend::failed(tx, &lease_id, &error, next_attempt_at),
        LedgerOp::ForceRemoveBackendRevocation {
            lease_id,
            now,
            event,
        } => backend::force_remove(tx, head, &lease_id, now, event),
        LedgerOp::Expire { now, limit, event } => lease::expire(tx, head, now, limit, event),
        LedgerOp::Record { event } => {
            let receipt = append(tx, head, &event)?;
            Ok(Applied::recorded(Some(receipt)))
        }
        LedgerOp::Checkpoint { signer, time_ms } => log::checkpoint(tx, head, &signer, time_ms),
    }
}

/// Records a refused transition: the same event, marked as a denial with the reason.
pub(crate) fn refuse(
    tx: &mut dyn Tx,
    head: &mut Head,
    mut event: AuditEvent,
    refusal: Refusal,
) -> Result<Applied, DbError> {
    event.decision = "deny".into();
    event.reason = Some(refusal.describe());
    event.credential_sha256 = None;
    event.expires_at = None;
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    a.refused = Some(refusal);
    Ok(a)
}

/// Records a refused issuance: the entry names no lease or credential, since none exists.
pub(crate) fn refuse_new_lease(
    tx: &mut dyn Tx,
    head: &mut Head,
    mut event: AuditEvent,
    refusal: Refusal,
) -> Result<Applied, DbError> {
    event.lease_id = None;
    event.granted_scopes.clear();
    event.credential_sha256 = None;
    refuse(tx, head, event, refusal)
}

/// One identity's traffic in a batch: what `identities_seen` adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    first: i64,
    last: i64,
    last_issued: Option<i64>,
    issued: i64,
    denied: i64,
}

impl Seen {
    /// What `event` adds to its caller's counts (nothing for an event without a caller).
    fn of(event: &AuditEvent) -> Option<(String, Self)> {
        let caller = event.caller.clone()?;
        let issued =
            matches!(event.kind, EventKind::Issue | EventKind::Renew) && event.decision == "allow";
        let seen = Self {
            first: event.time_ms,
            last: event.time_ms,
            last_issued: issued.then_some(event.time_ms),
            issued: i64::from(issued),
            denied: i64::from(event.decision == "deny"),
        };
        Some((caller, seen))
    }

    fn merge(&mut self, o: Self) {
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
        self.last_issued = self.last_issued.max(o.last_issued);
        self.issued += o.issued;
        self.denied += o.denied;
    }
}

/// Traffic per identity, gathered over a batch's ops and written once before it commits
/// (in the same transaction as their entries): one upsert per caller per batch, not one
/// per op.
#[derive(Debug, Default)]
pub(crate) struct Tally(HashMap<String, Seen>);

impl Tally {
    fn add(&mut self, caller: String, seen: Seen) {
        match self.0.entry(caller) {
            Entry::Occupied(mut e) => e.get_mut().merge(seen),
            Entry::Vacant(e) => {
                e.insert(seen);
            }
        }
    }

    /// Adds the batch's counts to `identities_seen`.
    pub(crate) fn write(self, tx: &mut dyn Tx) -> Result<(), DbError> {
        for (caller, seen) in self.0 {
            // The new row's values are what an update adds (`EXCLUDED`).
            tx.execute(
                "INSERT INTO identities_seen AS s (spiffe_id, first_seen, last_seen, last_issued, issued, denied)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (spiffe_id) DO UPDATE SET
                     last_seen = CASE WHEN EXCLUDED.last_seen > s.last_seen THEN EXCLUDED.last_seen ELSE s.last_seen END,
                     last_issued = COALESCE(EXCLUDED.last_issued, s.last_issued),
                     issued = s.issued + EXCLUDED.issued,
                     denied = s.denied + EXCLUDED.denied",
                &[
                    caller.as_str().into(),
                    seen.first.into(),
                    seen.last.into(),
                    seen.last_issued.into(),
                    Value::Int(seen.issued),
                    Value::Int(seen.denied),
                ],
            )?;
        }
        Ok(())
    }
}
