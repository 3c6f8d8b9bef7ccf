//! A lease after issuance: renewal (policy re-run, never past its ceiling), release,
//! and the reaper that marks expired leases.

use std::time::Duration;

use super::issue::Issued;
use super::{record, refusal_error, request_record, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;

use crate::domain::{CredentialRequest, Lease, LeaseId, LeaseState};
use crate::error::BrokerError;
use crate::issuer::LeaseTerms;
use crate::policy::{Decision, Denial, DenialKind};
use crate::store::{Applied, LedgerOp, Receipt, Refusal};

/// Most leases one reaper commit marks expired.
pub(super) const REAP_BATCH: u32 = 500;
impl Broker {
    /// Renews a lease held by the caller: policy is re-checked, a fresh credential is
    /// minted with the same lease id, never beyond the lease's max expiry.
    pub async fn renew(
        &self,
        caller: &VerifiedCaller,
        id: LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Issued, BrokerError> {
        let policy = self.policy();
        let now = self.clock.unix_seconds();
        let lease = match self.store.lease(&id).await? {
            Some(l) if l.spiffe_id == caller.id() => l,
            _ => {
                let mut e = self.event(EventKind::Deny, "deny", Some(caller));
                e.request = Some(record("RenewLease"));
                e.lease_id = Some(id.to_string());
                e.reason = Some(Refusal::NotFound.describe());
                self.record_best_effort(e).await;
                self.metrics.denied("lease_state");
                return Err(refusal_error(&Refusal::NotFound));
            }
        };
        self.throttle_renewal(caller, id.as_str()).await?;
        // Renewal re-runs policy on the original grant. Leases issued on an approval
        // or under break-glass are not renewable: a new request goes through approval again.
        // A credential issued by token exchange is not renewed either: it may not outlive
        // its subject token, so the actor exchanges that again.
        let renewable = lease.subject.is_none()
            && policy
                .directory()
                .profile(lease.profile.as_str())
                .is_some_and(|p| p.scope_template.is_none());
        let req = CredentialRequest {
            profile: lease.profile.clone(),
            scopes: lease.scopes.iter().cloned().collect(),
            ttl,
            intent: lease.intent.clone(),
            delegation: None,
        };
        let rec = || {
            let mut r = request_record("RenewLease", &req);
            r.profile = Some(lease.profile.to_string());
            r
        };
        let ctx = self.context(caller, false, Vec::new());
        let grant = match (
            renewable,
            policy.decide(super::workload_of(caller)?, &req, &ctx),
        ) {
            (true, Decision::Allow(g)) => g,
            (_, Decision::Deny(d)) => {
                return Err(self.deny(caller, rec(), &d, policy.hash()).await)
            }
            _ => {
                let d = Denial {
                    kind: DenialKind::NotPermitted,
                    reason: if lease.subject.is_some() {
                        "this lease was issued by token exchange; exchange the subject token again instead of renewing".into()
                    } else {
                        "this lease needs approval to be issued again; it cannot be renewed".into()
                    },
                    rule: None,
                    violations: Vec::new(),
                };
                return Err(self.deny(caller, rec(), &d, policy.hash()).await);
            }
        };
        let mut e = self.event(EventKind::Renew, "allow", Some(caller));
        e.request = Some(rec());
        e.lease_id = Some(id.to_string());
        e.rule = Some(grant.rule.clone());
        e.policy_hash = Some(grant.policy_hash.clone());
        if lease.state != LeaseState::Active || lease.expires_at <= now {
            let refusal = if lease.state != LeaseState::Active {
                Refusal::Ended(lease.state)
            } else {
                Refusal::Expired
            };
            e.decision = "deny".into();
            e.reason = Some(refusal.describe());
            self.record_best_effort(e).await;
            self.metrics.denied("lease_state");
            return Err(refusal_error(&refusal));
        }
        let expires_at = (now + grant.ttl.as_secs() as i64).min(lease.max_expires_at);
        let terms = LeaseTerms {
            lease_id: id.clone(),
            subject: lease.spiffe_id.clone(),
            issued_at: now,
            expires_at,
            cnf_x5t_s256: caller.cert_sha256().copied(),
            act: None,
            may_act: None,
        };
        let issuer = self.issuer_for(grant.profile.kind)?;
        let handle = lease.backend.as_ref().map(|b| b.handle.as_str());
        let minted =
            match Self::within_deadline(&grant.profile, issuer.renew(&grant, &terms, handle)).await
            {
                Ok(m) => m,
                Err(err) => return Err(self.reject(caller, "RenewLease", err).await),
            };
        let expires_at = minted.expires_at.min(expires_at);
        let credential = minted.credential;
        // A backend that extends the credential in place (Vault) hands back nothing new.
        let credential_sha256 = if credential.is_extension() {
            lease.credential_sha256.clone()
        } else {
            credential.sha256_hex()
        };
        e.credential_sha256 = Some(credential_sha256.clone());
        e.expires_at = Some(expires_at);
        e.granted_scopes = grant.scopes.iter().map(|s| s.to_string()).collect();
        let applied = self
            .store
            .apply(LedgerOp::Renew {
                lease_id: id,
                holder: lease.spiffe_id.clone(),
                now,
                expires_at,
                credential_sha256,
                event: e,
            })
            .await?;
        let (lease, receipt) = self.settled(applied)?;
        self.metrics.issued(grant.profile.name.as_str(), "renew");
        Ok(Issued {
            credential,
            lease,
            receipt,
            access_request: None,
            delegation: None,
        })
    }

    pub(super) fn settled(&self, applied: Applied) -> Result<(Lease, Receipt), BrokerError> {
        if let Some(r) = &applied.refused {
            self.metrics.denied("lease_state");
            return Err(refusal_error(r));
        }
        match (applied.lease, applied.receipt) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(BrokerError::Internal("commit returned no lease".into())),
        }
    }

    /// Gives a lease back early.
    pub async fn release(
        &self,
        caller: &VerifiedCaller,
        id: LeaseId,
    ) -> Result<(Lease, Receipt), BrokerError> {
        let now = self.clock.unix_seconds();
        let mut e = self.event(EventKind::Release, "allow", Some(caller));
        e.request = Some(record("ReleaseLease"));
        e.lease_id = Some(id.to_string());
        let applied = self
            .store
            .apply(LedgerOp::Release {
                lease_id: id,
                holder: caller.id().to_string(),
                now,
                event: e,
            })
            .await?;
        // Whatever was derived from it was revoked in the same commit: wake the feed.
        self.revocations_changed();
        self.settled(applied)
    }

    /// Marks every lease and access request whose expiry has passed, in bounded batches.
    /// Returns how many were marked.
    pub async fn reap_expired(&self) -> Result<usize, BrokerError> {
        let mut total = 0;
        loop {
            let now = self.clock.unix_seconds();
            let mut e = self.event(EventKind::Expire, "allow", None);
            e.reason = Some("ttl elapsed".into());
            let applied = self
                .store
                .apply(LedgerOp::Expire {
                    now,
                    limit: REAP_BATCH,
                    event: e,
                })
                .await?;
            total += applied.affected.len();
            if applied.affected.len() < REAP_BATCH as usize {
                return Ok(total);
            }
        }
    }
}
