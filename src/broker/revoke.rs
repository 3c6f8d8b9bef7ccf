//! Operator revocation (by lease, identity, prefix, profile, approver, request, cut-off)
//! and locks.

use spiffe::SpiffeId;

use super::{record, valid_reason, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;
use crate::clock::unix_millis;
use crate::domain::{LeaseId, Lock, RevokeSelector};
use crate::error::BrokerError;

use crate::policy::AdminAction;
use crate::store::{LedgerOp, Receipt, Refusal};

/// Result of a revocation.
#[derive(Debug)]
pub struct Revoked {
    /// Leases this call revoked.
    pub lease_ids: Vec<String>,
    /// Where it was recorded.
    pub receipt: Option<Receipt>,
}

/// Leases revoked per transaction in a bulk revocation.
pub(super) const REVOKE_CHUNK: u32 = 500;
impl Broker {
    /// Revokes every active lease the selector covers (platform admin only), optionally
    /// only those issued before a cut-off. Identity, prefix and profile revocations also
    /// bar any covered issuance still in flight. `dry_run` reports without changing or
    /// recording anything.
    pub async fn revoke(
        &self,
        caller: &VerifiedCaller,
        selector: RevokeSelector,
        issued_before: Option<i64>,
        reason: String,
        dry_run: bool,
    ) -> Result<Revoked, BrokerError> {
        let rule = self.admin(caller, AdminAction::Revoke, "Revoke").await?;
        if !dry_run && !valid_reason(&reason) {
            return Err(self
                .reject(
                    caller,
                    "Revoke",
                    BrokerError::InvalidArgument(
                        "a reason of 1..=512 printable characters is required".into(),
                    ),
                )
                .await);
        }
        if selector == RevokeSelector::All && issued_before.is_none() {
            return Err(self
                .reject(
                    caller,
                    "Revoke",
                    BrokerError::InvalidArgument(
                        "revoking everything needs an issued_before cut-off".into(),
                    ),
                )
                .await);
        }
        let mut e = self.event(EventKind::Revoke, "allow", Some(caller));
        e.request = Some(record("Revoke"));
        e.rule = Some(rule);
        e.reason = Some(match issued_before {
            Some(t) => format!("{reason} (issued before {})", crate::clock::rfc3339(t)),
            None => reason.clone(),
        });
        if let RevokeSelector::Lease(id) = &selector {
            e.lease_id = Some(id.to_string());
        }
        let now = self.clock.unix_seconds();
        let single = matches!(
            selector,
            RevokeSelector::Lease(_) | RevokeSelector::AccessRequest(_)
        );
        if dry_run || single {
            let applied = self
                .store
                .apply(LedgerOp::Revoke {
                    selector,
                    issued_before,
                    reason,
                    now,
                    dry_run,
                    chunk: None,
                    event: e,
                })
                .await?;
            if applied.refused == Some(Refusal::NotFound) {
                return Err(BrokerError::NotFound("lease not found".into()));
            }
            if !dry_run {
                self.revocations_changed();
            }
            return Ok(Revoked {
                lease_ids: applied.affected,
                receipt: applied.receipt,
            });
        }
        // A bulk revocation runs as transactions of REVOKE_CHUNK leases, each with its
        // own audit entry and feed events, so issuance is never blocked behind one huge
        // transaction. The first one leaves the revocation rule, so from its commit on
        // nothing covered is issued; every chunk covers only leases issued up to then.
        let cut = issued_before.map_or(now + 1, |c| c.min(now + 1));
        let mut all = Vec::new();
        let mut first_receipt = None;
        for part in 1u32.. {
            let mut event = e.clone();
            if part > 1 {
                event.reason = Some(format!(
                    "{} (part {part})",
                    e.reason.clone().unwrap_or_default()
                ));
            }
            let applied = self
                .store
                .apply(LedgerOp::Revoke {
                    selector: selector.clone(),
                    issued_before: Some(cut),
                    reason: reason.clone(),
                    now,
                    dry_run: false,
                    chunk: Some((REVOKE_CHUNK, part)),
                    event,
                })
                .await?;
            let n = applied.affected.len();
            all.extend(applied.affected);
            first_receipt = first_receipt.or(applied.receipt);
            self.revocations_changed();
            if n < REVOKE_CHUNK as usize {
                break;
            }
        }
        all.sort();
        Ok(Revoked {
            lease_ids: all,
            receipt: first_receipt,
        })
    }

    /// Sets an operator lock: no issuance for the identity, prefix or profile until `until`.
    pub async fn lock(
        &self,
        caller: &VerifiedCaller,
        kind: &str,
        value: String,
        until: i64,
        reason: String,
    ) -> Result<Lock, BrokerError> {
        let rule = self
            .admin(caller, AdminAction::Revoke, "CreateLock")
            .await?;
        let now = self.clock.unix_seconds();
        let invalid = |m: &str| BrokerError::InvalidArgument(m.to_owned());
        let problem = if !matches!(kind, "spiffe_id" | "prefix" | "profile") {
            Some(invalid("lock kind must be spiffe_id, prefix or profile"))
        } else if until <= now {
            Some(invalid("a lock must end in the future"))
        } else if !valid_reason(&reason) {
            Some(invalid(
                "a reason of 1..=512 printable characters is required",
            ))
        } else if value.is_empty() || value.len() > 2048 {
            Some(invalid("a lock needs a value"))
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(self.reject(caller, "CreateLock", p).await);
        }
        // The same normalisation as revocation selectors: a prefix is a path prefix
        // ("…/gpu" never matches "…/gpux/…"), an identity is a workload SPIFFE ID.
        let value = match kind {
            "prefix" | "spiffe_id" => {
                let parsed = SpiffeId::new(value.trim_end_matches('/'))
                    .ok()
                    .filter(|id| kind == "prefix" || !id.path().is_empty());
                match parsed {
                    Some(id) if kind == "prefix" => format!("{id}/"),
                    Some(id) => id.to_string(),
                    None => {
                        let e = invalid(
                            "the lock value is not a SPIFFE ID (with a path, for spiffe_id)",
                        );
                        return Err(self.reject(caller, "CreateLock", e).await);
                    }
                }
            }
            _ => match crate::domain::ProfileName::parse(&value) {
                Ok(p) => p.to_string(),
                Err(e) => return Err(self.reject(caller, "CreateLock", e).await),
            },
        };
        let lock = Lock {
            id: LeaseId::generate(unix_millis(self.clock.now()))?.to_string(),
            kind: kind.to_owned(),
            value,
            until,
            reason,
            created_by: caller.id().to_string(),
            created_at: now,
        };
        let mut e = self.event(EventKind::Lock, "allow", Some(caller));
        e.request = Some(record("CreateLock"));
        e.rule = Some(rule);
        e.reason = Some(format!(
            "lock {} {}={} until {}: {}",
            lock.id,
            lock.kind,
            lock.value,
            crate::clock::rfc3339(lock.until),
            lock.reason
        ));
        self.store
            .apply(LedgerOp::Lock {
                lock: lock.clone(),
                event: e,
            })
            .await?;
        Ok(lock)
    }

    /// Removes an operator lock.
    pub async fn unlock(
        &self,
        caller: &VerifiedCaller,
        id: String,
        reason: String,
    ) -> Result<(), BrokerError> {
        let rule = self
            .admin(caller, AdminAction::Revoke, "DeleteLock")
            .await?;
        if !valid_reason(&reason) {
            let e = BrokerError::InvalidArgument(
                "a reason of 1..=512 printable characters is required".into(),
            );
            return Err(self.reject(caller, "DeleteLock", e).await);
        }
        let mut e = self.event(EventKind::Lock, "allow", Some(caller));
        e.request = Some(record("DeleteLock"));
        e.rule = Some(rule);
        e.reason = Some(format!("unlock {id}: {reason}"));
        let applied = self.store.apply(LedgerOp::Unlock { id, event: e }).await?;
        if applied.refused.is_some() {
            return Err(BrokerError::NotFound("lock not found".into()));
        }
        Ok(())
    }

    /// Locks in force.
    pub async fn locks(&self, caller: &VerifiedCaller) -> Result<Vec<Lock>, BrokerError> {
        self.admin(caller, AdminAction::ListLeases, "ListLocks")
            .await?;
        Ok(self.store.locks(self.clock.unix_seconds()).await?)
    }
}
