//! The request path, wired: authn → policy → issuer → ledger. Transport-agnostic: the
//! gRPC adapters in `api` call these methods with parsed domain values.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::{AuditEvent, EventKind, RequestRecord};
use crate::authn::{Authenticator, AuthnError, TransportFacts, VerifiedCaller};
use crate::clock::{unix_millis, Clock};
use crate::config::Profile;
use crate::domain::{CredentialRequest, Lease, LeaseFilter, LeaseId, LeaseState, RevokeSelector};
use crate::error::BrokerError;
use crate::issuer::{Credential, Issuer, LeaseTerms};
use crate::metrics::Metrics;
use crate::policy::{AdminAction, Decision, Denial, DenialKind, Grant, Policy, RequestContext};
use crate::store::{Applied, LedgerOp, Receipt, Refusal, Store};

/// A credential handed out, with its lease and ledger receipt.
#[derive(Debug)]
pub struct Issued {
    /// The credential (secret).
    pub credential: Credential,
    /// Its lease.
    pub lease: Lease,
    /// Where it was recorded.
    pub receipt: Receipt,
}

/// Result of a revocation.
#[derive(Debug)]
pub struct Revoked {
    /// Leases this call revoked.
    pub lease_ids: Vec<String>,
    /// Where it was recorded.
    pub receipt: Option<Receipt>,
}

/// The broker core.
pub struct Broker {
    authn: Arc<dyn Authenticator>,
    policy: Arc<dyn Policy>,
    issuers: Vec<Arc<dyn Issuer>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

/// Most leases one reaper commit marks expired.
const REAP_BATCH: u32 = 500;

fn record(rpc: &str) -> RequestRecord {
    RequestRecord {
        rpc: rpc.to_owned(),
        profile: None,
        scopes: Vec::new(),
        ttl_secs: None,
        intent: None,
    }
}

fn request_record(rpc: &str, req: &CredentialRequest) -> RequestRecord {
    RequestRecord {
        rpc: rpc.to_owned(),
        profile: Some(req.profile.to_string()),
        scopes: req.scopes.iter().map(|s| s.to_string()).collect(),
        ttl_secs: req.ttl.map(|t| t.as_secs()),
        intent: req.intent.clone(),
    }
}

fn denial_error(d: &Denial) -> BrokerError {
    match d.kind {
        DenialKind::NotPermitted => BrokerError::PermissionDenied(d.reason.clone()),
        DenialKind::OverAsk | DenialKind::UnknownProfile => {
            BrokerError::InvalidArgument(d.reason.clone())
        }
    }
}

fn refusal_error(r: &Refusal) -> BrokerError {
    match r {
        // Someone else's lease is reported as absent: lease ids are not an oracle.
        Refusal::NotFound | Refusal::NotHolder => BrokerError::NotFound("lease not found".into()),
        Refusal::Ended(_) | Refusal::Expired | Refusal::NothingMatched => {
            BrokerError::FailedPrecondition(r.describe())
        }
    }
}

impl Broker {
    /// Wires the seams together.
    pub fn new(
        authn: Arc<dyn Authenticator>,
        policy: Arc<dyn Policy>,
        issuers: Vec<Arc<dyn Issuer>>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authn,
            policy,
            issuers,
            store,
            clock,
            metrics,
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn event(
        &self,
        kind: EventKind,
        decision: &str,
        caller: Option<&VerifiedCaller>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(unix_millis(self.clock.now()), kind, decision);
        if let Some(c) = caller {
            e.caller = Some(c.spiffe_id().to_string());
            e.auth_method = Some(c.method().as_str().to_owned());
            e.cert_sha256 = c.cert_sha256().map(hex::encode);
        }
        e
    }

    /// Writes an entry whose failure must not change the answer (denials): logged loudly.
    async fn record_best_effort(&self, event: AuditEvent) {
        if let Err(e) = self.store.apply(LedgerOp::Record { event }).await {
            tracing::error!(error = %e, "could not record a refusal in the ledger");
        }
    }

    /// Authenticates a request; failures are counted and recorded.
    pub async fn authenticate(
        &self,
        facts: TransportFacts<'_>,
        rpc: &str,
    ) -> Result<VerifiedCaller, BrokerError> {
        match self.authn.authenticate(&facts) {
            Ok(c) => Ok(c),
            Err(err) => {
                self.metrics.authn_failures.inc();
                let AuthnError {
                    reason,
                    claimed,
                    method,
                } = &err;
                let mut e = self.event(EventKind::AuthnFailure, "deny", None);
                e.claimed_id = claimed.clone();
                e.auth_method = method.map(|m| m.as_str().to_owned());
                e.reason = Some(reason.clone());
                e.request = Some(record(rpc));
                self.record_best_effort(e).await;
                Err(BrokerError::Unauthenticated(err))
            }
        }
    }

    /// Records a request that an authenticated caller sent malformed, and returns the error.
    pub async fn reject(
        &self,
        caller: &VerifiedCaller,
        rpc: &str,
        err: BrokerError,
    ) -> BrokerError {
        self.metrics.denied("invalid_request");
        let mut e = self.event(EventKind::Deny, "deny", Some(caller));
        e.reason = Some(err.to_string());
        e.request = Some(record(rpc));
        self.record_best_effort(e).await;
        err
    }

    async fn deny(&self, caller: &VerifiedCaller, rec: RequestRecord, d: &Denial) -> BrokerError {
        self.metrics.denied(match d.kind {
            DenialKind::NotPermitted => "not_permitted",
            DenialKind::OverAsk => "over_ask",
            DenialKind::UnknownProfile => "unknown_profile",
        });
        let mut e = self.event(EventKind::Deny, "deny", Some(caller));
        e.request = Some(rec);
        e.reason = Some(d.reason.clone());
        e.rule = d.rule.clone();
        e.policy_hash = Some(self.policy.hash().to_owned());
        self.record_best_effort(e).await;
        denial_error(d)
    }

    fn issuer_for(&self, profile: &Profile) -> Result<&Arc<dyn Issuer>, BrokerError> {
        self.issuers
            .iter()
            .find(|i| i.kind() == profile.kind)
            .ok_or_else(|| BrokerError::Internal(format!("no issuer for {:?}", profile.kind)))
    }

    fn mint(&self, grant: &Grant, terms: &LeaseTerms) -> Result<Credential, BrokerError> {
        self.issuer_for(&grant.profile)?
            .issue(grant, terms)
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// Issues a credential: policy, mint, one durable commit, then the answer.
    pub async fn issue(
        &self,
        caller: &VerifiedCaller,
        req: CredentialRequest,
    ) -> Result<Issued, BrokerError> {
        let now = self.clock.unix_seconds();
        let grant = match self.policy.decide(caller, &req, &RequestContext { now }) {
            Decision::Allow(g) => g,
            Decision::Deny(d) => {
                return Err(self
                    .deny(caller, request_record("IssueCredential", &req), &d)
                    .await)
            }
        };
        let terms = LeaseTerms {
            lease_id: LeaseId::generate()?,
            subject: caller.spiffe_id().to_string(),
            issued_at: now,
            expires_at: now + grant.ttl.as_secs() as i64,
            cnf_x5t_s256: caller.cert_sha256().copied(),
        };
        let credential = self.mint(&grant, &terms)?;
        let lease = Lease {
            id: terms.lease_id.clone(),
            profile: grant.profile.name.clone(),
            spiffe_id: terms.subject.clone(),
            scopes: grant.scopes.clone(),
            audience: grant.profile.audience.clone(),
            state: LeaseState::Active,
            issued_at: now,
            expires_at: terms.expires_at,
            max_expires_at: now + grant.profile.max_ttl.as_secs() as i64,
            credential_sha256: credential.sha256_hex(),
            renewals: 0,
            ended_at: None,
            end_reason: None,
            intent: grant.intent.clone(),
        };
        let mut e = self.event(EventKind::Issue, "allow", Some(caller));
        e.request = Some(request_record("IssueCredential", &req));
        e.rule = Some(grant.rule.clone());
        e.policy_hash = Some(grant.policy_hash.clone());
        e.granted_scopes = grant.scopes.iter().map(|s| s.to_string()).collect();
        e.lease_id = Some(lease.id.to_string());
        e.credential_sha256 = Some(lease.credential_sha256.clone());
        e.expires_at = Some(lease.expires_at);
        let applied = self
            .store
            .apply(LedgerOp::Issue { lease, event: e })
            .await?;
        let (Some(lease), Some(receipt)) = (applied.lease, applied.receipt) else {
            return Err(BrokerError::Internal(
                "issue commit returned no lease".into(),
            ));
        };
        self.metrics.issued(grant.profile.name.as_str(), "issue");
        Ok(Issued {
            credential,
            lease,
            receipt,
        })
    }

    /// Renews a lease held by the caller: policy is re-checked, a fresh credential is
    /// minted with the same lease id, never beyond the lease's max expiry.
    pub async fn renew(
        &self,
        caller: &VerifiedCaller,
        id: LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Issued, BrokerError> {
        let now = self.clock.unix_seconds();
        let lease = match self.store.lease(&id).await? {
            Some(l) if l.spiffe_id == caller.spiffe_id().to_string() => l,
            _ => {
                let mut rec = record("RenewLease");
                rec.profile = None;
                let mut e = self.event(EventKind::Deny, "deny", Some(caller));
                e.request = Some(rec);
                e.lease_id = Some(id.to_string());
                e.reason = Some(Refusal::NotFound.describe());
                self.record_best_effort(e).await;
                self.metrics.denied("lease_state");
                return Err(refusal_error(&Refusal::NotFound));
            }
        };
        let req = CredentialRequest {
            profile: lease.profile.clone(),
            scopes: lease.scopes.iter().cloned().collect(),
            ttl,
            intent: lease.intent.clone(),
        };
        let rec = || {
            let mut r = request_record("RenewLease", &req);
            r.profile = Some(lease.profile.to_string());
            r
        };
        let grant = match self.policy.decide(caller, &req, &RequestContext { now }) {
            Decision::Allow(g) => g,
            Decision::Deny(d) => return Err(self.deny(caller, rec(), &d).await),
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
        };
        let credential = self.mint(&grant, &terms)?;
        e.credential_sha256 = Some(credential.sha256_hex());
        e.expires_at = Some(expires_at);
        e.granted_scopes = grant.scopes.iter().map(|s| s.to_string()).collect();
        let applied = self
            .store
            .apply(LedgerOp::Renew {
                lease_id: id,
                holder: lease.spiffe_id.clone(),
                now,
                expires_at,
                credential_sha256: credential.sha256_hex(),
                event: e,
            })
            .await?;
        let lease = self.settled(applied)?;
        self.metrics.issued(grant.profile.name.as_str(), "renew");
        Ok(Issued {
            credential,
            lease: lease.0,
            receipt: lease.1,
        })
    }

    fn settled(&self, applied: Applied) -> Result<(Lease, Receipt), BrokerError> {
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
                holder: caller.spiffe_id().to_string(),
                now,
                event: e,
            })
            .await?;
        self.settled(applied)
    }

    async fn admin(
        &self,
        caller: &VerifiedCaller,
        action: AdminAction,
        rpc: &str,
    ) -> Result<String, BrokerError> {
        match self.policy.authorize_admin(caller, action) {
            Ok(rule) => Ok(rule),
            Err(d) => Err(self.deny(caller, record(rpc), &d).await),
        }
    }

    /// Revokes every active lease the selector covers (admin only).
    pub async fn revoke(
        &self,
        caller: &VerifiedCaller,
        selector: RevokeSelector,
        reason: String,
    ) -> Result<Revoked, BrokerError> {
        let rule = self.admin(caller, AdminAction::Revoke, "Revoke").await?;
        if reason.trim().is_empty() || reason.len() > 512 {
            return Err(self
                .reject(
                    caller,
                    "Revoke",
                    BrokerError::InvalidArgument(
                        "a reason of 1..=512 characters is required".into(),
                    ),
                )
                .await);
        }
        let mut e = self.event(EventKind::Revoke, "allow", Some(caller));
        e.request = Some(record("Revoke"));
        e.rule = Some(rule);
        e.reason = Some(reason.clone());
        if let RevokeSelector::Lease(id) = &selector {
            e.lease_id = Some(id.to_string());
        }
        let applied = self
            .store
            .apply(LedgerOp::Revoke {
                selector,
                reason,
                now: self.clock.unix_seconds(),
                event: e,
            })
            .await?;
        if applied.refused == Some(Refusal::NotFound) {
            return Err(BrokerError::NotFound("lease not found".into()));
        }
        Ok(Revoked {
            lease_ids: applied.affected,
            receipt: applied.receipt,
        })
    }

    /// Lists leases (admin only).
    pub async fn list_leases(
        &self,
        caller: &VerifiedCaller,
        filter: LeaseFilter,
    ) -> Result<Vec<Lease>, BrokerError> {
        self.admin(caller, AdminAction::ListLeases, "ListLeases")
            .await?;
        Ok(self.store.leases(filter).await?)
    }

    /// Marks every lease whose expiry has passed as expired, in bounded batches.
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
