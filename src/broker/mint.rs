//! Minting through a backend: in-process issuers are awaited directly; remote ones run
//! within the profile's deadline, and whatever they return late is revoked there.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use crate::authn::VerifiedCaller;
use crate::config::{CredentialKind, Profile};
use crate::domain::Lease;
use crate::error::BrokerError;
use crate::issuer::{Issuer, LeaseTerms, Material, Minted, Order};
use crate::policy::Grant;

use super::backend_revocations::BACKEND_REVOKE_TIMEOUT;
use super::Broker;

/// The refusal when a backend did not answer within the profile's deadline.
pub(super) fn deadline_passed(profile: &Profile) -> BrokerError {
    BrokerError::BackendUnavailable(format!(
        "{} backend did not answer within {:?} (profile {})",
        profile.kind.as_str(),
        profile.deadline,
        profile.name
    ))
}

/// Revokes a backend credential that no lease records (a refused or timed-out issuance):
/// a few tries, each bounded, in memory only — it is not on the durable queue because
/// there is no lease to queue it on; at worst it lives out its backend TTL.
pub(super) async fn revoke_orphan(issuer: Arc<dyn Issuer>, handle: String) {
    if !issuer.kind().revocable_in_backend() {
        return;
    }
    let kind = issuer.kind().as_str();
    for attempt in 0..5u32 {
        match tokio::time::timeout(BACKEND_REVOKE_TIMEOUT, issuer.revoke(&handle)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::warn!(backend = kind, attempt, error = %e, "revoking an unrecorded backend credential failed")
            }
            Err(_) => {
                tracing::warn!(
                    backend = kind,
                    attempt,
                    "revoking an unrecorded backend credential timed out"
                )
            }
        }
        tokio::time::sleep(Duration::from_millis(500u64 << attempt)).await;
    }
    tracing::error!(
        backend = kind,
        "gave up revoking an unrecorded backend credential; it expires with its backend TTL"
    );
}

/// How long a backend call cut at the profile deadline may still answer (so that what it
/// minted late can be revoked) before it is abandoned.
pub(super) const LATE_ANSWER_LIMIT: Duration = Duration::from_secs(60);
impl Broker {
    pub(super) fn issuer_for(&self, kind: CredentialKind) -> Result<&Arc<dyn Issuer>, BrokerError> {
        self.issuers
            .iter()
            .find(|i| i.kind() == kind)
            .ok_or_else(|| BrokerError::Internal(format!("no issuer for {}", kind.as_str())))
    }

    /// Runs a backend call within the profile's deadline: a down or slow backend fails
    /// this profile with UNAVAILABLE and holds nothing else up.
    pub(super) async fn within_deadline<T>(
        profile: &Profile,
        call: crate::issuer::BoxFuture<'_, Result<T, crate::issuer::IssueError>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(profile.deadline, call).await {
            Ok(r) => r.map_err(BrokerError::from),
            Err(_) => Err(deadline_passed(profile)),
        }
    }

    /// Mints through the profile's backend; a failure is recorded as a refusal.
    pub(super) async fn mint(
        &self,
        caller: &VerifiedCaller,
        grant: &Grant,
        terms: &LeaseTerms,
        material: &Material,
        rpc: &str,
    ) -> Result<Minted, BrokerError> {
        let issuer = self.issuer_for(grant.profile.kind)?.clone();
        let span = tracing::debug_span!("backend", profile = %grant.profile.name, remote = issuer.remote());
        let result = async {
            if issuer.remote() {
                Self::mint_remote(issuer, grant, terms, material).await
            } else {
                // Signing in-process: nothing to wait for, nothing to abandon.
                issuer
                    .issue(Order {
                        grant,
                        terms,
                        material,
                    })
                    .await
                    .map_err(BrokerError::from)
            }
        }
        .instrument(span)
        .await;
        match result {
            Ok(m) => Ok(m),
            Err(e) => {
                self.metrics.backend_failures.inc();
                Err(self.reject(caller, rpc, e).await)
            }
        }
    }

    /// A call to another service, as its own task: when the profile's deadline passes,
    /// the request fails at once, and whatever the backend still returns is revoked there
    /// rather than left behind with nobody holding it.
    pub(super) async fn mint_remote(
        issuer: Arc<dyn Issuer>,
        grant: &Grant,
        terms: &LeaseTerms,
        material: &Material,
    ) -> Result<Minted, BrokerError> {
        let mut call = {
            let (issuer, grant, terms, material) = (
                issuer.clone(),
                grant.clone(),
                terms.clone(),
                material.clone(),
            );
            tokio::spawn(
                async move {
                    issuer
                        .issue(Order {
                            grant: &grant,
                            terms: &terms,
                            material: &material,
                        })
                        .await
                }
                .in_current_span(),
            )
        };
        match tokio::time::timeout(grant.profile.deadline, &mut call).await {
            Ok(Ok(r)) => r.map_err(BrokerError::from),
            Ok(Err(join)) => Err(BrokerError::Internal(format!(
                "backend call failed: {join}"
            ))),
            Err(_) => {
                tokio::spawn(async move {
                    // The late answer is awaited only so long: a backend that accepted the
                    // call and never answers must not hold a task and a connection per
                    // timed-out issuance for ever.
                    match tokio::time::timeout(LATE_ANSWER_LIMIT, &mut call).await {
                        Ok(Ok(Ok(Minted {
                            handle: Some(handle),
                            ..
                        }))) => revoke_orphan(issuer, handle).await,
                        Ok(_) => {}
                        Err(_) => {
                            call.abort();
                            tracing::warn!(
                                backend = issuer.kind().as_str(),
                                limit_s = LATE_ANSWER_LIMIT.as_secs(),
                                "backend never answered a call cut at its deadline; abandoned it"
                            );
                        }
                    }
                });
                Err(deadline_passed(&grant.profile))
            }
        }
    }

    /// A backend credential was minted but its lease could not be recorded: revoke it in
    /// the backend (in the background, a few tries) so it does not outlive the refusal.
    pub(super) fn discard(&self, lease: &Lease) {
        let Some(b) = lease.backend.clone().filter(|b| b.revocable) else {
            return;
        };
        let Some(issuer) = self
            .issuers
            .iter()
            .find(|i| i.kind().as_str() == b.kind)
            .cloned()
        else {
            return;
        };
        tokio::spawn(revoke_orphan(issuer, b.handle));
    }
}
