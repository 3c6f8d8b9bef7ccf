//! The durable queue of revocations toward backends (Vault): retried with back-off,
//! visible when stuck, removable by an operator.

use std::time::Duration;

use super::{record, valid_reason, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;

use crate::domain::LeaseId;
use crate::error::BrokerError;

use crate::policy::AdminAction;
use crate::store::{LedgerOp, Receipt};

/// Backend revocations claimed per pass.
pub(super) const BACKEND_REVOKE_BATCH: u32 = 16;
/// Backend revocation attempts in flight at once.
pub(super) const BACKEND_REVOKE_CONCURRENCY: usize = 8;
/// How long one backend revocation attempt may take.
pub(super) const BACKEND_REVOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A backend revocation that failed this often is reported as stuck.
pub const STUCK_AFTER_ATTEMPTS: u32 = 5;

/// Seconds until the next attempt after `attempts` failures: 1 s doubling to 5 min,
/// with ±25 % jitter so a backend coming back is not hit by every retry at once.
pub(super) fn backoff_secs(attempts: u32) -> i64 {
    let base = 1i64 << attempts.min(9);
    let base = base.min(300);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let jitter = (i64::from(u16::from_le_bytes(b)) % 51) - 25; // -25..=25 %
    (base + base * jitter / 100).max(1)
}

impl Broker {
    /// One pass of the backend revocation queue: every due revocation (leases of
    /// stateful backends that ended by revocation, release or expiry) is tried once.
    /// Success is recorded in the ledger; failure is retried after an exponential
    /// back-off with jitter (1 s doubling to 5 min), forever: there is no give-up count.
    /// Returns (revoked, failed).
    pub async fn revoke_in_backends(&self) -> Result<(usize, usize), BrokerError> {
        let now = self.clock.unix_seconds();
        // Claimed for 60 s: another replica skips these rows meanwhile; each attempt's
        // outcome (revoked, or failed with the next attempt's time) ends the claim.
        let due = self
            .store
            .claim_backend_revocations(now, BACKEND_REVOKE_BATCH, 60)
            .await?;
        // Attempts run a few at a time, each bounded, so a whole pass ends well within
        // the claim (16 / 8 × 10 s = 20 s < 60 s) even when the backend hangs.
        use futures::StreamExt as _;
        let attempts: Vec<_> = futures::stream::iter(due)
            .map(|r| async move {
                let result = match self.issuers.iter().find(|i| i.kind().as_str() == r.kind) {
                    None => Err(format!("no {} backend is configured", r.kind)),
                    Some(issuer) => {
                        match tokio::time::timeout(BACKEND_REVOKE_TIMEOUT, issuer.revoke(&r.handle))
                            .await
                        {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {BACKEND_REVOKE_TIMEOUT:?}")),
                        }
                    }
                };
                (r, result)
            })
            .buffer_unordered(BACKEND_REVOKE_CONCURRENCY)
            .collect()
            .await;
        let (mut ok, mut failed) = (0, 0);
        for (r, result) in attempts {
            let now = self.clock.unix_seconds();
            match result {
                Ok(()) => {
                    let mut e = self.event(EventKind::BackendRevoke, "allow", None);
                    e.lease_id = Some(r.lease_id.clone());
                    e.reason = Some(format!(
                        "{} revoked the credential after the lease ended ({} failed attempts before)",
                        r.kind, r.attempts
                    ));
                    self.store
                        .apply(LedgerOp::BackendRevoked {
                            lease_id: r.lease_id.clone(),
                            now,
                            event: e,
                        })
                        .await?;
                    ok += 1;
                }
                Err(error) => {
                    tracing::warn!(lease = %r.lease_id, backend = %r.kind, attempts = r.attempts + 1, error = %error, "backend revocation failed; will retry");
                    self.store
                        .apply(LedgerOp::BackendRevokeFailed {
                            lease_id: r.lease_id.clone(),
                            error,
                            next_attempt_at: now + backoff_secs(r.attempts),
                        })
                        .await?;
                    failed += 1;
                }
            }
        }
        let stuck = self
            .store
            .pending_backend_revocations(STUCK_AFTER_ATTEMPTS, 10_000)
            .await?;
        self.metrics
            .backend_revocations_stuck
            .set(stuck.len() as i64);
        Ok((ok, failed))
    }

    /// Backend revocations still owed with at least `min_attempts` failures.
    pub async fn backend_revocations(
        &self,
        caller: &VerifiedCaller,
        min_attempts: u32,
        limit: u32,
    ) -> Result<Vec<crate::domain::BackendRevocation>, BrokerError> {
        self.admin(caller, AdminAction::ListLeases, "ListBackendRevocations")
            .await?;
        Ok(self
            .store
            .pending_backend_revocations(min_attempts, limit.clamp(1, 1000))
            .await?)
    }

    /// Stops retrying one backend revocation (platform-admin, with a reason).
    pub async fn force_remove_backend_revocation(
        &self,
        caller: &VerifiedCaller,
        lease_id: LeaseId,
        reason: String,
    ) -> Result<Receipt, BrokerError> {
        let rule = self
            .admin(caller, AdminAction::Revoke, "ForceRemoveBackendRevocation")
            .await?;
        if !valid_reason(&reason) {
            return Err(self
                .reject(
                    caller,
                    "ForceRemoveBackendRevocation",
                    BrokerError::InvalidArgument(
                        "a reason of 1..=512 printable characters is required".into(),
                    ),
                )
                .await);
        }
        let mut e = self.event(EventKind::BackendRevoke, "allow", Some(caller));
        e.request = Some(record("ForceRemoveBackendRevocation"));
        e.lease_id = Some(lease_id.to_string());
        e.rule = Some(rule);
        e.reason = Some(format!(
            "force-removed from the backend revocation queue: {reason}"
        ));
        let applied = self
            .store
            .apply(LedgerOp::ForceRemoveBackendRevocation {
                lease_id: lease_id.to_string(),
                now: self.clock.unix_seconds(),
                event: e,
            })
            .await?;
        if let Some(r) = &applied.refused {
            return Err(BrokerError::NotFound(format!(
                "no backend revocation is pending for lease {lease_id} ({})",
                r.describe()
            )));
        }
        applied
            .receipt
            .ok_or_else(|| BrokerError::Internal("force-remove recorded nothing".into()))
    }
}
