//! Access requests: opening one bound to its resolved grant, reviews (with separation of
//! duties), redemption, break-glass post-review, and listings for reviewers.

use std::sync::Arc;

use super::issue::{IssueOptions, IssueOutcome, Issued};
use super::{record, refusal_error, request_record, valid_reason, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;
use crate::clock::unix_millis;
use crate::config::CredentialKind;
use crate::domain::{
    AccessFilter, AccessRequest, AccessState, BoundGrant, CredentialRequest, LeaseId, LeaseState,
    Principal, RequestSpec, RevokeSelector, Verdict,
};
use crate::error::BrokerError;
use crate::issuer::Material;
use crate::notify::Notification;
use crate::policy::{
    AdminAction, ApprovalNeed, Decision, Denial, DenialKind, Grant, Parties, Policy, RequestContext,
};
use crate::store::{LedgerOp, Refusal};

/// Access request listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestListing {
    /// Pending requests the caller may review.
    Pending,
    /// Pending requests the caller may review and has not reviewed (never its own).
    ToReview,
    /// The caller's own requests.
    Mine,
    /// Break-glass issuances awaiting post-review that the caller may review.
    AwaitingPostReview,
}

/// How long a redeemed credential stays retrievable by a retry of the same redemption.
pub(super) const REDEEM_CACHE_MAX: usize = 4096;

/// What approving `grant` for `caller` commits to (see [`BoundGrant`]).
pub(super) fn bind(
    caller: &VerifiedCaller,
    grant: &Grant,
    material: &Material,
) -> Result<BoundGrant, BrokerError> {
    let sha256 = |b: &[u8]| hex::encode(ring::digest::digest(&ring::digest::SHA256, b));
    let key_sha256 = match (&material.csr_der, grant.profile.kind) {
        (Some(csr), CredentialKind::X509) => {
            Some(sha256(crate::issuer::x509::parse_csr(csr)?.spki()))
        }
        _ => None,
    };
    Ok(BoundGrant {
        scopes: grant.scopes.iter().map(|s| s.to_string()).collect(),
        ttl_secs: grant.ttl.as_secs(),
        profile_sha256: sha256(format!("{:?}", grant.profile).as_bytes()),
        auth_method: caller.method().as_str().to_owned(),
        key_sha256,
    })
}

/// Whether `caller` is in approver group `group`: a workload by the config's members, a
/// person by the groups their sign-in mapped to.
fn in_group(policy: &dyn Policy, caller: &VerifiedCaller, group: &str) -> bool {
    match caller.principal() {
        Principal::Workload(id) => policy
            .directory()
            .group_members(group)
            .contains(&id.to_string()),
        Principal::Person(p) => p.approver_groups.iter().any(|g| g == group),
    }
}

impl Broker {
    /// Identities that may review `profile` (optionally only members of `group`).
    pub(super) fn reviewers(
        &self,
        policy: &Arc<dyn Policy>,
        profile: &str,
        group: Option<&str>,
    ) -> Vec<String> {
        let members = group.map(|g| policy.directory().group_members(g));
        policy
            .directory()
            .identities()
            .iter()
            .filter(|i| {
                policy
                    .authorize_review(&Principal::Workload(i.spiffe_id.clone()), profile)
                    .is_ok()
            })
            .map(|i| i.spiffe_id.to_string())
            .filter(|id| members.as_ref().is_none_or(|m| m.contains(id)))
            .collect()
    }

    pub(super) fn notify_request(
        &self,
        ar: &AccessRequest,
        event: &str,
        approvers: &[String],
        reason: Option<String>,
    ) {
        let _ = self.changes.send(ar.id.clone());
        self.notifier.notify(Notification {
            event: event.to_owned(),
            access_request_id: ar.id.clone(),
            profile: ar.profile.to_string(),
            requester: ar.requester.clone(),
            state: ar.state.as_str().to_owned(),
            approvers_notified: approvers.to_vec(),
            break_glass: ar.break_glass,
            time_ms: unix_millis(self.clock.now()),
            reason,
        });
    }

    pub(super) async fn open_request(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        grant: &Grant,
        need: ApprovalNeed,
        material: &Material,
    ) -> Result<IssueOutcome, BrokerError> {
        let now = self.clock.unix_seconds();
        let bound = match bind(caller, grant, material) {
            Ok(b) => b,
            Err(e) => return Err(self.reject(caller, super::issue::rpc_of(req), e).await),
        };
        let spec = RequestSpec::of(req).bound(bound);
        let id = LeaseId::generate(unix_millis(self.clock.now()))?.to_string();
        let requester = caller.id().to_string();
        let ar = AccessRequest {
            group: need.group.clone(),
            threshold: need.threshold,
            expires_at: now + grant.profile.approval_ttl.as_secs() as i64,
            deny_ends: grant.profile.deny_ends,
            ..AccessRequest::new(id, requester, req.profile.clone(), spec, now)
        };
        let mut e = self.event(EventKind::AccessRequest, "require_approval", Some(caller));
        e.request = Some(request_record(super::issue::rpc_of(req), req));
        e.rule = Some(need.rule.clone());
        e.policy_hash = Some(need.policy_hash.clone());
        e.access_request_id = Some(ar.id.clone());
        e.reason = Some(format!(
            "needs {} approval(s) from {}",
            need.threshold, need.group
        ));
        let applied = self
            .store
            .apply(LedgerOp::OpenAccessRequest {
                request: ar,
                event: e,
            })
            .await?;
        let ar = applied
            .access_request
            .ok_or_else(|| BrokerError::Internal("open request commit returned nothing".into()))?;
        self.metrics.denied("approval_required");
        self.notify_request(&ar, "access_request.pending", &need.eligible, None);
        Ok(IssueOutcome::Pending(Box::new(ar), need))
    }

    pub(super) async fn redeem(
        &self,
        caller: &VerifiedCaller,
        req: CredentialRequest,
        id: &str,
        policy: Arc<dyn Policy>,
        opts: &IssueOptions,
    ) -> Result<Issued, BrokerError> {
        let material = &opts.material;
        let rpc = super::issue::rpc_of(&req);
        let digest = RequestSpec::of(&req).digest(req.profile.as_str());
        // A retry of a redemption that already succeeded (same requester, same exact
        // request) gets the same credential while its lease is still active; anything
        // else goes through the checks below.
        let cached = self
            .redeemed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|(d, done)| *d == digest && done.lease.spiffe_id == caller.id())
            .map(|(_, done)| done.clone());
        if let Some(done) = cached {
            let now = self.clock.unix_seconds();
            match self.store.lease(&done.lease.id).await? {
                Some(l) if l.state == LeaseState::Active && l.expires_at > now => return Ok(done),
                _ => {
                    self.redeemed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                }
            }
        }
        let refuse = |refusal: Refusal, ar_id: Option<String>| {
            let mut e = self.event(EventKind::Deny, "deny", Some(caller));
            e.request = Some(request_record(rpc, &req));
            e.access_request_id = ar_id;
            e.reason = Some(refusal.describe());
            e
        };
        let Some(ar) = self
            .store
            .access_request(id)
            .await?
            .filter(|a| a.requester == caller.id())
        else {
            self.record_best_effort(refuse(Refusal::RequestNotFound, Some(id.to_owned())))
                .await;
            self.metrics.denied("access_request_state");
            return Err(refusal_error(&Refusal::RequestNotFound));
        };
        let asked = RequestSpec {
            grant: None,
            ..ar.request.clone()
        };
        if asked.digest(req.profile.as_str()) != digest || ar.profile != req.profile {
            self.record_best_effort(refuse(Refusal::DigestMismatch, Some(ar.id.clone())))
                .await;
            self.metrics.denied("approval_mismatch");
            return Err(refusal_error(&Refusal::DigestMismatch));
        }
        if ar.state != AccessState::Approved {
            self.record_best_effort(refuse(Refusal::RequestEnded(ar.state), Some(ar.id.clone())))
                .await;
            self.metrics.denied("access_request_state");
            if ar.state == AccessState::Issued {
                return Err(BrokerError::FailedPrecondition(format!(
                    "access request already issued as lease {}",
                    ar.lease_id.clone().unwrap_or_default()
                )));
            }
            return Err(refusal_error(&Refusal::RequestEnded(ar.state)));
        }
        // Policy is re-checked at redemption with the approvals collected.
        let ctx = RequestContext {
            // People were checked against the request's group when they reviewed.
            person_approvals_group: Some(ar.group.clone()),
            ..self.context(caller, false, ar.approvers())
        };
        let decided = match policy.decide(super::workload_of(caller)?, &req, &ctx) {
            Decision::Allow(g) => Ok(g),
            Decision::Deny(d) => Err(d),
            Decision::RequireApproval(_, need) => Err(Denial {
                kind: DenialKind::NotPermitted,
                reason: format!(
                    "approvals no longer satisfy policy: need {} from {}",
                    need.threshold, need.group
                ),
                rule: Some(need.rule),
                violations: Vec::new(),
            }),
        };
        let grant = match decided {
            Ok(g) => g,
            Err(d) => {
                let rec = request_record(rpc, &req);
                return Err(self.deny(caller, rec, &d, policy.hash()).await);
            }
        };
        self.narrow(caller, &req, &grant, opts).await?;
        // The approval covers the grant as resolved when it was asked for, and how it is
        // held: defaults changed by a reload, another key or another auth method void it.
        let now_bound = match bind(caller, &grant, material) {
            Ok(b) => b,
            Err(e) => return Err(self.reject(caller, rpc, e).await),
        };
        let differences = match &ar.request.grant {
            Some(approved) => approved.differences(&now_bound),
            None => vec!["the approval predates grant binding; ask again".into()],
        };
        if !differences.is_empty() {
            let why = format!(
                "the approval was for a different grant: {}",
                differences.join("; ")
            );
            let mut e = refuse(Refusal::DigestMismatch, Some(ar.id.clone()));
            e.reason = Some(why.clone());
            self.record_best_effort(e).await;
            self.metrics.denied("approval_mismatch");
            return Err(BrokerError::PermissionDenied(why));
        }
        let bound_digest = asked.bound(now_bound).digest(req.profile.as_str());
        let (credential, lease, mut e) = self.prepare(caller, &req, &grant, opts).await?;
        let minted_lease = lease.clone();
        e.access_request_id = Some(ar.id.clone());
        e.approvals = ar
            .reviews
            .iter()
            .filter(|r| r.verdict == Verdict::Approve && !r.post_review)
            .cloned()
            .collect();
        let applied = self
            .store
            .apply(LedgerOp::Redeem {
                id: ar.id.clone(),
                requester: ar.requester.clone(),
                digest: bound_digest,
                max_active: Some(grant.profile.max_active_leases).filter(|m| *m > 0),
                lease,
                now: self.clock.unix_seconds(),
                event: e,
            })
            .await
            .inspect_err(|_| self.discard(&minted_lease))?;
        if applied.refused.is_some() {
            self.discard(&minted_lease);
        }
        let issued =
            self.settle_issue(applied, credential, grant.profile.name.as_str(), "redeem")?;
        let _ = self.changes.send(ar.id.clone());
        let mut cache = self.redeemed.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.unix_seconds();
        cache.retain(|_, (_, i)| i.lease.expires_at > now);
        if cache.len() < REDEEM_CACHE_MAX {
            cache.insert(ar.id.clone(), (digest, issued.clone()));
        }
        Ok(issued)
    }

    /// An approver's review of an access request (or the post-review of a break-glass one).
    pub async fn review(
        &self,
        caller: &VerifiedCaller,
        id: &str,
        verdict: Verdict,
        reason: String,
    ) -> Result<AccessRequest, BrokerError> {
        let policy = self.policy();
        let mut rec = record("ReviewAccessRequest");
        if !valid_reason(&reason) {
            return Err(self
                .reject(
                    caller,
                    "ReviewAccessRequest",
                    BrokerError::InvalidArgument(
                        "a reason of 1..=512 printable characters is required".into(),
                    ),
                )
                .await);
        }
        let Some(ar) = self.store.access_request(id).await? else {
            return Err(refusal_error(&Refusal::RequestNotFound));
        };
        rec.profile = Some(ar.profile.to_string());
        let allowed = policy
            .authorize_review(caller.principal(), ar.profile.as_str())
            .and_then(|rule| {
                if ar.break_glass || in_group(policy.as_ref(), caller, &ar.group) {
                    Ok(rule)
                } else {
                    Err(Denial {
                        kind: DenialKind::NotPermitted,
                        reason: format!("{} is not in approver group {:?}", caller.id(), ar.group),
                        rule: None,
                        violations: Vec::new(),
                    })
                }
            });
        let allowed = allowed.and_then(|rule| {
            match policy
                .directory()
                .review_conflict(Parties::of(&ar), caller.id())
            {
                None => Ok(rule),
                Some(c) => Err(Denial {
                    kind: DenialKind::NotPermitted,
                    reason: format!("{} ({})", c.reason, c.rule),
                    rule: Some(c.rule.to_owned()),
                    violations: Vec::new(),
                }),
            }
        });
        let allowed =
            allowed.and_then(
                |rule| match self.fresh_sign_in_needed(caller, ar.profile.as_str()) {
                    None => Ok(rule),
                    Some(max) => Err(Denial {
                        kind: DenialKind::NotPermitted,
                        reason: format!(
                            "sign in again: reviewing {} needs a sign-in within the last {}",
                            ar.profile.as_str(),
                            crate::clock::format_duration(max)
                        ),
                        rule: Some("profile/approval_max_auth_age".into()),
                        violations: Vec::new(),
                    }),
                },
            );
        let rule = match allowed {
            Ok(r) => r,
            Err(d) => {
                return Err(self
                    .deny_about(caller, rec, &d, policy.hash(), Some(&ar))
                    .await)
            }
        };
        if ar.break_glass
            && verdict == Verdict::Deny
            && ar.post_review.as_deref() == Some("pending")
        {
            // The issuance is judged wrong: its credential stops working now, before the
            // verdict is on record (a failure here leaves the post-review pending, to retry).
            self.revoke_break_glass(caller, &ar, &reason).await?;
        }
        let mut e = self.event(EventKind::Review, verdict.as_str(), Some(caller));
        e.request = Some(rec);
        e.rule = Some(rule);
        e.reason = Some(reason.clone());
        e.access_request_id = Some(ar.id.clone());
        e.lease_id = ar.lease_id.clone();
        e.policy_hash = Some(policy.hash().to_owned());
        let applied = self
            .store
            .apply(LedgerOp::Review {
                id: ar.id.clone(),
                reviewer: caller.id().to_string(),
                verdict,
                reason: reason.clone(),
                now: self.clock.unix_seconds(),
                event: e,
            })
            .await?;
        if let Some(r) = &applied.refused {
            self.metrics.denied("review_refused");
            return Err(refusal_error(r));
        }
        let ar = applied
            .access_request
            .ok_or_else(|| BrokerError::Internal("review commit returned nothing".into()))?;
        let event = match (ar.break_glass, ar.state) {
            (true, _) => "access_request.post_reviewed",
            (false, AccessState::Approved) => "access_request.approved",
            (false, AccessState::Denied) => "access_request.denied",
            _ => "access_request.reviewed",
        };
        self.notify_request(&ar, event, &[], Some(reason));
        Ok(ar)
    }

    /// Revokes the lease of a break-glass issuance whose post-review denies it (and its
    /// backend credential, through the revocation queue). Already ended: nothing to do.
    pub(super) async fn revoke_break_glass(
        &self,
        reviewer: &VerifiedCaller,
        ar: &AccessRequest,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut e = self.event(EventKind::Revoke, "allow", Some(reviewer));
        e.request = Some(record("ReviewAccessRequest"));
        e.access_request_id = Some(ar.id.clone());
        e.lease_id = ar.lease_id.clone();
        e.rule = Some("break-glass/post-review-denied".into());
        let why = format!("break-glass post-review denied: {reason}");
        e.reason = Some(why.clone());
        let applied = self
            .store
            .apply(LedgerOp::Revoke {
                selector: RevokeSelector::AccessRequest(ar.id.clone()),
                issued_before: None,
                reason: why,
                now: self.clock.unix_seconds(),
                dry_run: false,
                chunk: None,
                event: e,
            })
            .await?;
        if !applied.affected.is_empty() {
            tracing::warn!(
                access_request = %ar.id,
                lease = ?ar.lease_id,
                reviewer = %reviewer.id(),
                "break-glass issuance denied at post-review; its lease is revoked"
            );
            self.revocations_changed();
        }
        Ok(())
    }

    /// One access request, for its requester, its reviewers, operators and auditors.
    pub async fn access_request(
        &self,
        caller: &VerifiedCaller,
        id: &str,
    ) -> Result<AccessRequest, BrokerError> {
        let policy = self.policy();
        let ar = self
            .store
            .access_request(id)
            .await?
            .ok_or_else(|| refusal_error(&Refusal::RequestNotFound))?;
        let me = caller.principal();
        let visible = ar.requester == caller.id()
            || policy.authorize_review(me, ar.profile.as_str()).is_ok()
            || policy.authorize_admin(me, AdminAction::ListLeases).is_ok()
            || policy.authorize_admin(me, AdminAction::ReadLog).is_ok();
        if visible {
            Ok(ar)
        } else {
            Err(refusal_error(&Refusal::RequestNotFound))
        }
    }

    /// Access requests, by listing kind.
    pub async fn access_requests(
        &self,
        caller: &VerifiedCaller,
        listing: RequestListing,
        limit: u32,
    ) -> Result<Vec<AccessRequest>, BrokerError> {
        let policy = self.policy();
        let me = caller.id().to_string();
        if listing == RequestListing::Mine {
            return Ok(self
                .store
                .access_requests(AccessFilter {
                    requester: Some(me),
                    limit,
                    ..Default::default()
                })
                .await?);
        }
        let reviewable: Vec<String> = policy
            .directory()
            .profiles()
            .iter()
            .filter(|p| {
                policy
                    .authorize_review(caller.principal(), p.name.as_str())
                    .is_ok()
            })
            .map(|p| p.name.to_string())
            .collect();
        let filter = AccessFilter {
            state: (listing != RequestListing::AwaitingPostReview).then_some(AccessState::Pending),
            profiles: Some(reviewable),
            awaiting_post_review: listing == RequestListing::AwaitingPostReview,
            requester: None,
            limit,
        };
        let mut rows = self.store.access_requests(filter).await?;
        if listing == RequestListing::ToReview {
            rows.retain(|r| {
                policy
                    .directory()
                    .review_conflict(Parties::of(r), &me)
                    .is_none()
                    && in_group(policy.as_ref(), caller, &r.group)
                    && !r.reviews.iter().any(|v| v.reviewer == me)
            });
        }
        Ok(rows)
    }
}
