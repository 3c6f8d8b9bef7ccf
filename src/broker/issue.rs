//! `IssueCredential`: policy (rate, ceiling, Cedar), then a pending access request, or
//! mint + one durable commit + the answer; idempotent retries; `ExplainDecision`.

use std::collections::BTreeSet;
use std::time::Duration;

use spiffe::SpiffeId;

use super::idempotency;
use super::throttle::Throttled;
use super::{refusal_error, request_record, Broker};
use crate::audit::{AuditEvent, EventKind};
use crate::authn::VerifiedCaller;
use crate::clock::unix_millis;
use crate::domain::delegation::MayAct;
use crate::domain::IdempotencyRecord;
use crate::domain::{
    AccessFilter, AccessRequest, AccessState, CredentialRequest, Lease, LeaseId, LeaseState,
    RequestSpec,
};
use crate::error::BrokerError;
use crate::issuer::{Credential, LeaseTerms, Material};
use crate::policy::{ApprovalNeed, Decision, Denial, DenialKind, Grant, Policy, RequestContext};
use crate::store::{Applied, LedgerOp, Receipt, Refusal};

/// A credential handed out, with its lease and ledger receipt.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The credential (secret).
    pub credential: Credential,
    /// Its lease.
    pub lease: Lease,
    /// Where it was recorded.
    pub receipt: Receipt,
    /// The access request it was issued on (approved or break-glass).
    pub access_request: Option<AccessRequest>,
    /// Issued by token exchange: the verified chain.
    pub delegation: Option<crate::domain::Delegation>,
}

/// What `IssueCredential` produced.
#[derive(Debug, Clone)]
pub enum IssueOutcome {
    /// The credential.
    Issued(Box<Issued>),
    /// Policy requires approval: an access request is pending.
    Pending(Box<AccessRequest>, ApprovalNeed),
}

/// How to issue: plain, break-glass, or redeeming an approved access request.
#[derive(Debug, Clone, Default)]
pub struct IssueOptions {
    /// Invoke break-glass (self-approval with a justification).
    pub break_glass: bool,
    /// Redeem this approved access request.
    pub access_request_id: Option<String>,
    /// Idempotency key: a retry with the same key and request returns the same credential.
    pub idempotency_key: Option<String>,
    /// What the caller brought for the backend (a CSR for `x509` profiles).
    pub material: Material,
    /// Names the one identity that may exchange the issued token for its subject
    /// (the token's `may_act` claim, RFC 8693 §4.4).
    pub may_act: Option<MayAct>,
    /// Token exchange: what the subject token allows (set by `exchange` only).
    pub bounds: Option<SubjectBounds>,
}

/// What a verified subject token allows: the derived credential stays within it.
#[derive(Debug, Clone)]
pub struct SubjectBounds {
    /// The subject token's expiry (Unix seconds): the credential never outlives it.
    pub not_after: i64,
    /// The subject's scopes: the grant's must be among them (`None`: the subject token
    /// carries none, as an ID token; policy alone bounds the grant).
    pub scopes: Option<BTreeSet<String>>,
}

/// A dry-run decision.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// `allow`, `deny` or `require_approval`.
    pub decision: &'static str,
    /// Determining policy ids.
    pub policies: Vec<String>,
    /// Why (for denials).
    pub reason: Option<String>,
    /// What in the request exceeds a ceiling.
    pub violations: Vec<String>,
    /// What approvals are still missing.
    pub missing: Option<ApprovalNeed>,
    /// The grant that would be issued (scopes, TTL).
    pub grant: Option<(Vec<String>, Duration)>,
    /// Hash of the policy set in force.
    pub policy_hash: String,
}

/// Explains a decision for any SPIFFE ID (the offline `policy explain` uses this too).
pub fn explain_with(
    policy: &dyn Policy,
    id: &SpiffeId,
    req: &CredentialRequest,
    ctx: &RequestContext,
) -> Explanation {
    let hash = policy.hash().to_owned();
    match policy.decide(id, req, ctx) {
        Decision::Allow(g) => Explanation {
            decision: "allow",
            policies: g.rule.split(',').map(str::to_owned).collect(),
            reason: None,
            violations: Vec::new(),
            missing: None,
            grant: Some((g.scopes.iter().map(|s| s.to_string()).collect(), g.ttl)),
            policy_hash: hash,
        },
        Decision::Deny(d) => Explanation {
            decision: "deny",
            policies: d
                .rule
                .iter()
                .flat_map(|r| r.split(','))
                .map(str::to_owned)
                .collect(),
            reason: Some(d.reason),
            violations: d.violations,
            missing: None,
            grant: None,
            policy_hash: hash,
        },
        Decision::RequireApproval(g, need) => Explanation {
            decision: "require_approval",
            policies: vec![need.rule.clone()],
            reason: Some(format!(
                "needs {} approval(s) from {}",
                need.threshold, need.group
            )),
            violations: Vec::new(),
            grant: Some((g.scopes.iter().map(|s| s.to_string()).collect(), g.ttl)),
            missing: Some(need),
            policy_hash: hash,
        },
    }
}

/// The RPC a credential request came through (what the ledger records).
pub(super) fn rpc_of(req: &CredentialRequest) -> &'static str {
    if req.delegation.is_some() {
        "ExchangeToken"
    } else {
        "IssueCredential"
    }
}

impl Broker {
    pub(super) fn context(
        &self,
        caller: &VerifiedCaller,
        break_glass: bool,
        approvals: Vec<String>,
    ) -> RequestContext {
        RequestContext {
            now: self.clock.unix_seconds(),
            auth_method: caller.method(),
            break_glass,
            approvals,
            person_approvals_group: None,
        }
    }

    /// Mints a credential for `grant` and builds its lease and audit entry.
    pub(super) async fn prepare(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        grant: &Grant,
        opts: &IssueOptions,
    ) -> Result<(Credential, Lease, AuditEvent), BrokerError> {
        let now = self.clock.unix_seconds();
        let rpc = rpc_of(req);
        let delegation = req.delegation.as_ref();
        let mut expires_at = now + grant.ttl.as_secs() as i64;
        if let Some(b) = &opts.bounds {
            expires_at = expires_at.min(b.not_after);
        }
        let terms = LeaseTerms {
            lease_id: LeaseId::generate(unix_millis(self.clock.now()))?,
            // A delegated credential is for the subject; the actors ride in `act`.
            subject: delegation.map_or_else(|| caller.id().to_string(), |d| d.subject.id.clone()),
            issued_at: now,
            expires_at,
            cnf_x5t_s256: caller.cert_sha256().copied(),
            act: delegation.and_then(|d| d.act()),
            may_act: opts.may_act.clone(),
        };
        let minted = self
            .mint(caller, grant, &terms, &opts.material, rpc)
            .await?;
        let credential = minted.credential;
        let max = if grant.break_glass {
            grant
                .profile
                .break_glass_max_ttl
                .unwrap_or(grant.profile.max_ttl)
        } else {
            grant.profile.max_ttl
        };
        let lease = Lease {
            id: terms.lease_id.clone(),
            profile: grant.profile.name.clone(),
            spiffe_id: caller.id().to_string(),
            scopes: grant.scopes.clone(),
            audience: grant.profile.audience.clone(),
            state: LeaseState::Active,
            issued_at: now,
            expires_at: minted.expires_at.min(terms.expires_at),
            max_expires_at: now + max.as_secs() as i64,
            credential_sha256: credential.sha256_hex(),
            renewals: 0,
            ended_at: None,
            end_reason: None,
            intent: grant.intent.clone(),
            backend: minted.handle.map(|handle| crate::domain::BackendHandle {
                kind: grant.profile.kind.as_str().to_owned(),
                handle,
                revocable: grant.profile.kind.revocable_in_backend(),
            }),
            parent: delegation.and_then(|d| d.parent_lease.clone()),
            subject: delegation.map(|d| d.subject.id.clone()),
        };
        let mut e = self.event(EventKind::Issue, "allow", Some(caller));
        e.request = Some(request_record(rpc, req));
        e.rule = Some(grant.rule.clone());
        e.policy_hash = Some(grant.policy_hash.clone());
        e.granted_scopes = grant.scopes.iter().map(|s| s.to_string()).collect();
        e.lease_id = Some(lease.id.to_string());
        e.credential_sha256 = Some(lease.credential_sha256.clone());
        e.expires_at = Some(lease.expires_at);
        e.break_glass = grant.break_glass;
        Ok((credential, lease, e))
    }

    pub(super) fn settle_issue(
        &self,
        applied: Applied,
        credential: Credential,
        profile: &str,
        op: &str,
    ) -> Result<Issued, BrokerError> {
        if let Some(r) = &applied.refused {
            self.metrics.denied(match r {
                Refusal::QuotaExceeded(_) => "quota",
                _ => "access_request_state",
            });
            return Err(refusal_error(r));
        }
        let (Some(lease), Some(receipt)) = (applied.lease, applied.receipt) else {
            return Err(BrokerError::Internal(
                "issue commit returned no lease".into(),
            ));
        };
        self.metrics.issued(profile, op);
        Ok(Issued {
            credential,
            lease,
            receipt,
            access_request: applied.access_request,
            delegation: None,
        })
    }

    /// Issues a credential: policy (rate, ceiling, Cedar), then either a pending access
    /// request, or mint + one durable commit + the answer.
    pub async fn issue(
        &self,
        caller: &VerifiedCaller,
        req: CredentialRequest,
        opts: IssueOptions,
    ) -> Result<IssueOutcome, BrokerError> {
        let policy = self.policy();
        let rpc = rpc_of(&req);
        if let Some(profile) = policy.directory().profile(req.profile.as_str()) {
            let who = caller.id().to_string();
            if profile.requests_per_minute > 0
                && !self.limiter.take(
                    &who,
                    profile.name.as_str(),
                    profile.requests_per_minute,
                    unix_millis(self.clock.now()),
                )
            {
                let t = Throttled {
                    rule: format!("profile:{}/requests_per_minute", profile.name),
                    message: format!(
                        "rate limit: at most {} requests per minute per identity on profile {:?}",
                        profile.requests_per_minute,
                        profile.name.as_str()
                    ),
                };
                let key = format!("{who}#{}", profile.name);
                return Err(self.refuse_throttled(caller, &key, rpc, t).await);
            }
        }
        if opts.may_act.is_some()
            && policy
                .directory()
                .profile(req.profile.as_str())
                .is_some_and(|p| !p.kind.carries_claims())
        {
            let err = BrokerError::InvalidArgument(format!(
                "may_act needs a token profile; {:?} issues no token that could carry it",
                req.profile.as_str()
            ));
            return Err(self.reject(caller, rpc, err).await);
        }
        if let Some(key) = &opts.idempotency_key {
            if let Some(done) = self.replay(caller, &req, key).await? {
                return Ok(IssueOutcome::Issued(Box::new(done)));
            }
        }
        if let Some(id) = opts.access_request_id.clone() {
            return self
                .redeem(caller, req, &id, policy, &opts)
                .await
                .map(|i| IssueOutcome::Issued(Box::new(i)));
        }
        let ctx = self.context(caller, opts.break_glass, Vec::new());
        match policy.decide(super::workload_of(caller)?, &req, &ctx) {
            Decision::Deny(d) => Err(self
                .deny(caller, request_record(rpc, &req), &d, policy.hash())
                .await),
            Decision::RequireApproval(grant, need) => {
                self.narrow(caller, &req, &grant, &opts).await?;
                self.open_request(caller, &req, &grant, need, &opts.material)
                    .await
            }
            Decision::Allow(grant) => {
                self.narrow(caller, &req, &grant, &opts).await?;
                if grant.break_glass {
                    self.break_glass_allowance(caller, &req, policy.hash())
                        .await?;
                }
                let (credential, lease, mut e) = self.prepare(caller, &req, &grant, &opts).await?;
                let minted_lease = lease.clone();
                let break_glass = if grant.break_glass {
                    let now = self.clock.unix_seconds();
                    let id = LeaseId::generate(unix_millis(self.clock.now()))?.to_string();
                    let requester = caller.id().to_string();
                    let spec = RequestSpec::of(&req);
                    let ar = AccessRequest {
                        group: "break-glass".into(),
                        state: AccessState::Issued,
                        expires_at: lease.expires_at,
                        break_glass: true,
                        post_review: Some("pending".into()),
                        lease_id: Some(lease.id.to_string()),
                        ..AccessRequest::new(id, requester, req.profile.clone(), spec, now)
                    };
                    e.access_request_id = Some(ar.id.clone());
                    e.reason = req.intent.as_ref().and_then(|i| i.justification.clone());
                    Some(ar)
                } else {
                    None
                };
                let max_active = Some(grant.profile.max_active_leases).filter(|m| *m > 0);
                let idempotency = match &opts.idempotency_key {
                    None => None,
                    Some(key) => Some(IdempotencyRecord {
                        caller: caller.id().to_string(),
                        key_hash: idempotency::key_hash(key),
                        digest: RequestSpec::of(&req).digest(req.profile.as_str()),
                        lease_id: lease.id.to_string(),
                        sealed: idempotency::seal(key, caller.id(), &credential)?,
                        expires_at: lease.expires_at,
                    }),
                };
                let applied = self
                    .store
                    .apply(LedgerOp::Issue {
                        lease,
                        event: e,
                        max_active,
                        break_glass,
                        idempotency,
                    })
                    .await
                    .inspect_err(|_| self.discard(&minted_lease))?;
                if applied.refused.is_some() {
                    self.discard(&minted_lease);
                }
                if applied.refused == Some(Refusal::Duplicate) {
                    // A concurrent request with the same key won the race: its credential.
                    if let Some(key) = &opts.idempotency_key {
                        if let Some(done) = self.replay(caller, &req, key).await? {
                            return Ok(IssueOutcome::Issued(Box::new(done)));
                        }
                    }
                }
                let issued =
                    self.settle_issue(applied, credential, grant.profile.name.as_str(), "issue")?;
                if let Some(ar) = &issued.access_request {
                    self.metrics.break_glass.inc();
                    tracing::warn!(
                        requester = %ar.requester,
                        profile = %ar.profile,
                        access_request = %ar.id,
                        lease = %issued.lease.id,
                        "BREAK-GLASS issuance: self-approved, awaiting post-review"
                    );
                    self.notify_request(
                        ar,
                        "access_request.break_glass",
                        &self.reviewers(&policy, ar.profile.as_str(), None),
                        None,
                    );
                }
                Ok(IssueOutcome::Issued(Box::new(issued)))
            }
        }
    }
    /// Token exchange only narrows: every scope granted is one the subject token has,
    /// and a TTL asked for beyond the subject token's expiry is refused (an unnamed one
    /// is capped to it when the credential is minted). Refusals are recorded.
    pub(super) async fn narrow(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        grant: &Grant,
        opts: &IssueOptions,
    ) -> Result<(), BrokerError> {
        let Some(b) = &opts.bounds else {
            return Ok(());
        };
        let asked: Vec<String> = if req.scopes.is_empty() {
            grant
                .profile
                .default_scopes
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            req.scopes.iter().map(|s| s.to_string()).collect()
        };
        let mut violations = Vec::new();
        if let Some(scopes) = &b.scopes {
            let beyond: Vec<&str> = asked
                .iter()
                .map(String::as_str)
                .filter(|s| !scopes.contains(*s))
                .collect();
            if !beyond.is_empty() {
                violations.push(format!(
                    "scope(s) {} beyond the subject token's ({})",
                    beyond.join(" "),
                    scopes.iter().cloned().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        let left = b.not_after - self.clock.unix_seconds();
        if let Some(ttl) = req.ttl {
            if ttl.as_secs() as i64 > left {
                violations.push(format!(
                    "ttl {}s outlives the subject token (it expires in {left}s)",
                    ttl.as_secs()
                ));
            }
        }
        if violations.is_empty() {
            return Ok(());
        }
        let d = Denial {
            kind: DenialKind::OverAsk,
            reason: format!("token exchange may only narrow: {}", violations.join("; ")),
            rule: Some("delegation/narrowing".into()),
            violations,
        };
        Err(self
            .deny(
                caller,
                request_record(rpc_of(req), req),
                &d,
                &grant.policy_hash,
            )
            .await)
    }

    /// Break-glass is for emergencies, not a way around approval: an identity may hold
    /// only so many break-glass issuances of a profile that nobody has post-reviewed yet.
    pub(super) async fn break_glass_allowance(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        policy_hash: &str,
    ) -> Result<(), BrokerError> {
        let limit = self.limits().open_break_glass_per_identity;
        let open = self
            .store
            .access_requests(AccessFilter {
                state: None,
                profiles: Some(vec![req.profile.to_string()]),
                awaiting_post_review: true,
                requester: Some(caller.id().to_string()),
                limit,
            })
            .await?;
        if (open.len() as u32) < limit {
            return Ok(());
        }
        let d = Denial {
            kind: DenialKind::NotPermitted,
            reason: format!(
                "break-glass for profile {:?} already used {} time(s) awaiting post-review (at most {limit}); ask an approver to post-review first",
                req.profile.as_str(),
                open.len()
            ),
            rule: Some("limits/open-break-glass".into()),
            violations: Vec::new(),
        };
        Err(self
            .deny(
                caller,
                request_record("IssueCredential", req),
                &d,
                policy_hash,
            )
            .await)
    }

    /// The credential an earlier request with this idempotency key received, if any.
    pub(super) async fn replay(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        key: &str,
    ) -> Result<Option<Issued>, BrokerError> {
        let me = caller.id().to_string();
        let Some(rec) = self
            .store
            .idempotency(&me, &idempotency::key_hash(key))
            .await?
        else {
            return Ok(None);
        };
        let refuse = |why: String| BrokerError::FailedPrecondition(why);
        if rec.digest != RequestSpec::of(req).digest(req.profile.as_str()) {
            let err = refuse("this idempotency key was used for a different request".into());
            return Err(self.reject(caller, "IssueCredential", err).await);
        }
        let credential = idempotency::open(key, &me, &rec.sealed)?;
        let id = LeaseId::parse(&rec.lease_id)?;
        let lease =
            self.store.lease(&id).await?.ok_or_else(|| {
                BrokerError::Internal("idempotency record without its lease".into())
            })?;
        if lease.state != LeaseState::Active || lease.expires_at <= self.clock.unix_seconds() {
            return Err(refuse(format!(
                "the credential issued for this idempotency key is no longer usable (lease {})",
                if lease.state == LeaseState::Active {
                    "expired"
                } else {
                    lease.state.as_str()
                }
            )));
        }
        let entry = self
            .store
            .entries_for_lease(lease.id.as_str())
            .await?
            .into_iter()
            .find(|e| e.kind == EventKind::Issue.as_str())
            .ok_or_else(|| BrokerError::Internal("lease without its issue entry".into()))?;
        let receipt = Receipt {
            sequence: entry.seq,
            entry_hash: hex::encode(&entry.hash),
            leaf_index: entry.seq - 1,
            leaf_hash: hex::encode(crate::merkle::leaf_hash(entry.body.as_bytes())),
        };
        Ok(Some(Issued {
            credential,
            lease,
            receipt,
            access_request: None,
            delegation: None,
        }))
    }

    /// Dry run: what policy would decide for the caller's request, and why.
    pub fn explain(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        break_glass: bool,
    ) -> Result<Explanation, BrokerError> {
        let policy = self.policy();
        let ctx = self.context(caller, break_glass, Vec::new());
        Ok(explain_with(
            policy.as_ref(),
            super::workload_of(caller)?,
            req,
            &ctx,
        ))
    }
}
