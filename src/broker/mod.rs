//! The request path, wired: authn → policy → (approval) → issuer → ledger.
//! Transport-agnostic: the gRPC adapters in `api` call these methods with parsed values.

mod access_watch;
mod feed;
mod streams;
mod throttle;

pub use feed::{FeedItem, FeedPage, RELYING_PARTY_ROLE};
pub use streams::StreamSlot;
pub use throttle::Throttled;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use spiffe::SpiffeId;
use tokio::sync::broadcast;

use crate::audit::{AuditEvent, EventKind, RequestRecord};
use crate::authn::{Authenticator, AuthnError, TransportFacts, VerifiedCaller};
use crate::checkpoint::LogSigner;
use crate::clock::{unix_millis, Clock};
use crate::config::{CredentialKind, Limits, Profile};
use crate::domain::{
    AccessFilter, AccessRequest, AccessState, BoundGrant, CredentialRequest, Lease, LeaseFilter,
    LeaseId, LeaseState, Lock, RequestSpec, RevokeSelector, Verdict,
};
use crate::error::BrokerError;
use crate::idempotency::{self, IdempotencyRecord};
use crate::issuer::{Credential, Issuer, LeaseTerms, Material, Minted};
use crate::metrics::Metrics;
use crate::notify::{Notification, Notifier};
use crate::policy::{
    AccessPath, AdminAction, ApprovalNeed, Decision, Denial, DenialKind, Grant, Parties, Policy,
    RequestContext,
};
use crate::store::{Applied, IdentityStats, LedgerOp, Receipt, Refusal, Store, StoredCheckpoint};
use throttle::RateLimiter;

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
}

/// Result of a revocation.
#[derive(Debug)]
pub struct Revoked {
    /// Leases this call revoked.
    pub lease_ids: Vec<String>,
    /// Where it was recorded.
    pub receipt: Option<Receipt>,
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

/// Which audit entry to prove.
#[derive(Debug, Clone)]
pub enum EntrySelector {
    /// By sequence number.
    Sequence(u64),
    /// The issuance entry of a lease (a token's `jti`).
    Lease(LeaseId),
}

/// An inclusion proof of one audit entry against a signed checkpoint.
#[derive(Debug, Clone)]
pub struct InclusionProof {
    /// The entry's sequence.
    pub sequence: u64,
    /// Its leaf index.
    pub leaf_index: u64,
    /// Its leaf hash.
    pub leaf_hash: crate::merkle::Hash,
    /// Its canonical body.
    pub entry: String,
    /// The checkpoint proven against.
    pub checkpoint: StoredCheckpoint,
    /// The audit path.
    pub proof: Vec<crate::merkle::Hash>,
}

/// One row of the non-human identity inventory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InventoryEntry {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Registered in the config.
    pub registered: bool,
    /// Owner ("" if unknown).
    pub owner: String,
    /// Environment.
    pub environment: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Approver groups it belongs to.
    pub approver_groups: Vec<String>,
    /// Who may request, approve and revoke what, and through which policy.
    pub paths: Vec<AccessPath>,
    /// Active leases now.
    pub active_leases: u64,
    /// Issuances and renewals.
    pub issued: u64,
    /// Refusals.
    pub denied: u64,
    /// Last request (Unix ms).
    pub last_seen_ms: Option<i64>,
    /// Last issuance (Unix ms).
    pub last_issued_ms: Option<i64>,
    /// Why this identity needs attention (no owner, unregistered caller).
    pub flags: Vec<String>,
}

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

/// Loads a fresh policy (the config and `.cedar` files) for a reload.
pub type PolicyLoader = Box<dyn Fn() -> Result<Arc<dyn Policy>, String> + Send + Sync>;

/// Requests in flight at once when the config does not say.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Leases revoked per transaction in a bulk revocation.
const REVOKE_CHUNK: u32 = 500;
/// Most leases one reaper commit marks expired.
const REAP_BATCH: u32 = 500;
/// How long a redeemed credential stays retrievable by a retry of the same redemption.
const REDEEM_CACHE_MAX: usize = 4096;

/// An operator's or approver's reason: 1..=512 printable characters (it goes into the
/// ledger and the revocation feed, so no control characters).
fn valid_reason(r: &str) -> bool {
    !r.trim().is_empty() && r.len() <= 512 && !r.chars().any(char::is_control)
}

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
        DenialKind::NotPermitted | DenialKind::Unregistered => {
            BrokerError::PermissionDenied(d.reason.clone())
        }
        DenialKind::OverAsk | DenialKind::UnknownProfile => {
            BrokerError::InvalidArgument(d.reason.clone())
        }
    }
}

fn refusal_error(r: &Refusal) -> BrokerError {
    match r {
        // Someone else's lease or request is reported as absent: ids are not an oracle.
        Refusal::NotFound | Refusal::NotHolder => BrokerError::NotFound("lease not found".into()),
        Refusal::RequestNotFound => BrokerError::NotFound("access request not found".into()),
        Refusal::QuotaExceeded(_) => BrokerError::ResourceExhausted(r.describe()),
        Refusal::SelfReview
        | Refusal::DigestMismatch
        | Refusal::Locked(_)
        | Refusal::RevokedBefore
        | Refusal::Duplicate => BrokerError::PermissionDenied(r.describe()),
        Refusal::Ended(_)
        | Refusal::Expired
        | Refusal::NothingMatched
        | Refusal::AlreadyReviewed
        | Refusal::RequestEnded(_)
        | Refusal::RequestExpired => BrokerError::FailedPrecondition(r.describe()),
    }
}

/// What approving `grant` for `caller` commits to (see [`BoundGrant`]).
fn bind(
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

/// Authentication failures recorded in the ledger per peer address and minute.
pub const AUTHN_FAILURE_RECORDS_PER_MINUTE: u32 = 60;

/// Bounds the ledger entries that unauthenticated peers can cause.
#[derive(Default)]
struct FailureRecords {
    limiter: RateLimiter,
    /// Failures per peer that were refused but not recorded since its last entry.
    unrecorded: Mutex<HashMap<String, u64>>,
}

impl FailureRecords {
    /// `Some(n)` if this failure is to be recorded (`n` earlier ones were not), `None`
    /// if it is only counted.
    fn admit(&self, peer: &str, now_ms: i64) -> Option<u64> {
        let admitted = self.limiter.take(
            peer,
            "authn_failure",
            AUTHN_FAILURE_RECORDS_PER_MINUTE,
            now_ms,
        );
        let mut u = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
        if admitted {
            return Some(u.remove(peer).unwrap_or(0));
        }
        if u.len() >= 100_000 && !u.contains_key(peer) {
            // Bounded memory under a spoofed-source storm: the metric still counts it.
            return None;
        }
        *u.entry(peer.to_owned()).or_default() += 1;
        None
    }
}

/// The broker core.
pub struct Broker {
    authn: Arc<dyn Authenticator>,
    policy: RwLock<Arc<dyn Policy>>,
    loader: Option<PolicyLoader>,
    issuers: Vec<Arc<dyn Issuer>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    limiter: RateLimiter,
    failure_records: FailureRecords,
    redeemed: Mutex<HashMap<String, (String, Issued)>>,
    log_signer: Option<Arc<LogSigner>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    heads: Arc<feed::HeadSigner>,
    tail_hub: feed::TailHub,
    access_hub: access_watch::AccessHub,
    streams: streams::StreamCounts,
    throttle: throttle::Throttle,
    revocations: broadcast::Sender<()>,
    changes: broadcast::Sender<String>,
}

/// How often watchers' shared pollers re-read the store (changes made on other replicas).
const WATCH_POLL: Duration = Duration::from_secs(1);

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
            policy: RwLock::new(policy),
            loader: None,
            issuers,
            store,
            clock: clock.clone(),
            metrics,
            notifier: Notifier::noop(),
            limiter: RateLimiter::default(),
            failure_records: FailureRecords::default(),
            redeemed: Mutex::new(HashMap::new()),
            log_signer: None,
            in_flight: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            heads: Arc::new(feed::HeadSigner::new(None, clock.clone())),
            tail_hub: feed::TailHub::default(),
            access_hub: access_watch::AccessHub::default(),
            streams: streams::StreamCounts::default(),
            throttle: throttle::Throttle::new(Limits::default()),
            revocations: broadcast::channel(64).0,
            changes: broadcast::channel(1024).0,
        }
    }

    /// Sets how policy reloads read the policy.
    pub fn with_loader(mut self, loader: PolicyLoader) -> Self {
        self.loader = Some(loader);
        self
    }
    /// Sets how many requests may be in flight at once; beyond it, RESOURCE_EXHAUSTED.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.in_flight = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// A slot for one request, or `None` when the broker is at its limit.
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// Sets the key that signs revocation feed heads.
    pub fn with_feed_signer(mut self, signer: Arc<LogSigner>) -> Self {
        self.heads = Arc::new(feed::HeadSigner::new(Some(signer), self.clock.clone()));
        self
    }

    /// Sets the per-caller limits: call rates, renewals, streams, open break-glass uses.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.throttle = throttle::Throttle::new(limits);
        self
    }

    fn limits(&self) -> &Limits {
        self.throttle.limits()
    }

    /// Sets the key that signs audit log checkpoints.
    pub fn with_log_signer(mut self, signer: Arc<LogSigner>) -> Self {
        self.log_signer = Some(signer);
        self
    }

    /// Signs a checkpoint of the audit log if it grew since the last one; returns the
    /// latest checkpoint (new or not), or `None` for an empty log.
    pub async fn checkpoint(&self) -> Result<Option<StoredCheckpoint>, BrokerError> {
        let Some(signer) = self.log_signer.clone() else {
            return Ok(None);
        };
        let applied = self
            .store
            .apply(LedgerOp::Checkpoint {
                signer,
                time_ms: unix_millis(self.clock.now()),
            })
            .await?;
        Ok(applied.checkpoint)
    }

    /// The store (read paths of the verifiable log).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The log's verifier key, if the broker signs checkpoints.
    pub fn log_vkey(&self) -> Option<String> {
        self.log_signer.as_ref().map(|s| s.vkey())
    }

    /// A signed checkpoint (latest, or of `size`), with a consistency proof from `from`.
    pub async fn log_checkpoint(
        &self,
        caller: &VerifiedCaller,
        size: Option<u64>,
        from: Option<u64>,
    ) -> Result<(StoredCheckpoint, Vec<crate::merkle::Hash>), BrokerError> {
        self.admin(caller, AdminAction::ReadLog, "GetCheckpoint")
            .await?;
        let cp = match self.store.checkpoint(size).await? {
            Some(cp) => cp,
            None if size.is_none() => self
                .checkpoint()
                .await?
                .ok_or_else(|| BrokerError::NotFound("the log is empty".into()))?,
            None => {
                return Err(BrokerError::NotFound(
                    "no checkpoint of that tree size".into(),
                ))
            }
        };
        let proof = match from {
            None => Vec::new(),
            Some(old) => self
                .store
                .consistency_proof(old, cp.size)
                .await?
                .ok_or_else(|| {
                    BrokerError::InvalidArgument(format!(
                        "consistency_from {old} is beyond tree size {}",
                        cp.size
                    ))
                })?,
        };
        Ok((cp, proof))
    }

    /// The inclusion proof of one entry against a signed checkpoint. Platform admins may
    /// prove any entry; a lease holder may prove its own lease's issuance.
    pub async fn inclusion_proof(
        &self,
        caller: &VerifiedCaller,
        selector: EntrySelector,
        size: Option<u64>,
    ) -> Result<InclusionProof, BrokerError> {
        let entry = match &selector {
            EntrySelector::Sequence(seq) => {
                self.admin(caller, AdminAction::ReadLog, "GetInclusionProof")
                    .await?;
                self.store
                    .audit_entries(seq.saturating_sub(1), 1)
                    .await?
                    .into_iter()
                    .find(|e| e.seq == *seq)
            }
            EntrySelector::Lease(id) => {
                let entries = self.store.entries_for_lease(id.as_str()).await?;
                let issue = entries
                    .into_iter()
                    .find(|e| e.kind == EventKind::Issue.as_str());
                let holder = issue.as_ref().and_then(|e| {
                    serde_json::from_str::<AuditEvent>(&e.body)
                        .ok()
                        .and_then(|b| b.caller)
                });
                if holder.as_deref() != Some(caller.spiffe_id().to_string().as_str()) {
                    self.admin(caller, AdminAction::ReadLog, "GetInclusionProof")
                        .await?;
                }
                issue
            }
        }
        .ok_or_else(|| BrokerError::NotFound("no such audit entry".into()))?;
        let mut cp =
            match size {
                Some(n) => self.store.checkpoint(Some(n)).await?.ok_or_else(|| {
                    BrokerError::NotFound("no checkpoint of that tree size".into())
                })?,
                None => match self.store.checkpoint(None).await? {
                    Some(cp) => cp,
                    None => self
                        .checkpoint()
                        .await?
                        .ok_or_else(|| BrokerError::NotFound("the log is empty".into()))?,
                },
            };
        if entry.seq > cp.size {
            if size.is_some() {
                return Err(BrokerError::InvalidArgument(format!(
                    "entry {} is not in the tree of size {}",
                    entry.seq, cp.size
                )));
            }
            // Newer than every checkpoint: sign one now so the receipt can be proven.
            cp = self
                .checkpoint()
                .await?
                .ok_or_else(|| BrokerError::Internal("no checkpoint after appending".into()))?;
        }
        let proof = self
            .store
            .inclusion_proof(entry.seq - 1, cp.size)
            .await?
            .ok_or_else(|| BrokerError::Internal("proof out of range".into()))?;
        Ok(InclusionProof {
            sequence: entry.seq,
            leaf_index: entry.seq - 1,
            leaf_hash: crate::merkle::leaf_hash(entry.body.as_bytes()),
            entry: entry.body,
            checkpoint: cp,
            proof,
        })
    }

    /// Audit entries after `after`, in order (platform admin only).
    pub async fn audit_events(
        &self,
        caller: &VerifiedCaller,
        after: u64,
        limit: u32,
    ) -> Result<Vec<crate::audit::StoredEntry>, BrokerError> {
        self.admin(caller, AdminAction::ReadLog, "ListAuditEvents")
            .await?;
        Ok(self
            .store
            .audit_entries(after, limit.clamp(1, 1000))
            .await?)
    }

    /// Sets the approval notifier.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The caller's entry in the inventory, if it is registered.
    fn registered(&self, caller: &VerifiedCaller) -> Option<crate::config::Identity> {
        self.policy()
            .identities()
            .iter()
            .find(|i| &i.spiffe_id == caller.spiffe_id())
            .cloned()
    }

    /// The policy in force (a snapshot: a reload swaps it atomically).
    pub fn policy(&self) -> Arc<dyn Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Access request ids as they change on this replica.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
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
            Ok(c) => {
                self.throttle_call(&c, facts.peer_ip, rpc).await?;
                Ok(c)
            }
            Err(err) => {
                self.metrics.authn_failures.inc();
                let AuthnError {
                    reason,
                    claimed,
                    method,
                } = &err;
                // A flood of bad SVIDs must not grow the ledger without bound: each
                // peer gets AUTHN_FAILURE_RECORDS_PER_MINUTE entries; the rest are
                // counted and the count goes into that peer's next entry.
                let peer = facts
                    .peer_ip
                    .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
                let now_ms = unix_millis(self.clock.now());
                let Some(unrecorded) = self.failure_records.admit(&peer, now_ms) else {
                    self.metrics.authn_failures_unrecorded.inc();
                    return Err(BrokerError::Unauthenticated(err));
                };
                let mut e = self.event(EventKind::AuthnFailure, "deny", None);
                e.claimed_id = claimed.clone();
                e.auth_method = method.map(|m| m.as_str().to_owned());
                e.reason = Some(if unrecorded == 0 {
                    reason.clone()
                } else {
                    format!(
                        "{reason} (and {unrecorded} earlier failures from {peer} not recorded: over {AUTHN_FAILURE_RECORDS_PER_MINUTE} per minute)"
                    )
                });
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

    async fn deny(
        &self,
        caller: &VerifiedCaller,
        rec: RequestRecord,
        d: &Denial,
        policy_hash: &str,
    ) -> BrokerError {
        self.deny_about(caller, rec, d, policy_hash, None).await
    }

    /// A denial recorded against a specific access request.
    async fn deny_about(
        &self,
        caller: &VerifiedCaller,
        rec: RequestRecord,
        d: &Denial,
        policy_hash: &str,
        access_request: Option<&AccessRequest>,
    ) -> BrokerError {
        self.metrics.denied(match d.kind {
            DenialKind::NotPermitted => "not_permitted",
            DenialKind::OverAsk => "over_ask",
            DenialKind::UnknownProfile => "unknown_profile",
            DenialKind::Unregistered => "unregistered_caller",
        });
        let mut e = self.event(EventKind::Deny, "deny", Some(caller));
        e.request = Some(rec);
        e.reason = Some(if d.kind == DenialKind::Unregistered {
            format!("unregistered caller: {}", d.reason)
        } else {
            d.reason.clone()
        });
        e.rule = d.rule.clone();
        e.policy_hash = Some(policy_hash.to_owned());
        if let Some(ar) = access_request {
            e.access_request_id = Some(ar.id.clone());
            e.lease_id = ar.lease_id.clone();
        }
        self.record_best_effort(e).await;
        denial_error(d)
    }

    fn issuer_for(&self, kind: CredentialKind) -> Result<&Arc<dyn Issuer>, BrokerError> {
        self.issuers
            .iter()
            .find(|i| i.kind() == kind)
            .ok_or_else(|| BrokerError::Internal(format!("no issuer for {}", kind.as_str())))
    }

    /// Runs a backend call within the profile's deadline: a down or slow backend fails
    /// this profile with UNAVAILABLE and holds nothing else up.
    async fn within_deadline<T>(
        profile: &Profile,
        call: crate::issuer::BoxFuture<'_, Result<T, crate::issuer::IssueError>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(profile.deadline, call).await {
            Ok(r) => r.map_err(BrokerError::from),
            Err(_) => Err(deadline_passed(profile)),
        }
    }

    /// Mints through the profile's backend; a failure is recorded as a refusal.
    async fn mint(
        &self,
        caller: &VerifiedCaller,
        grant: &Grant,
        terms: &LeaseTerms,
        material: &Material,
        rpc: &str,
    ) -> Result<Minted, BrokerError> {
        let issuer = self.issuer_for(grant.profile.kind)?.clone();
        let result = if issuer.remote() {
            Self::mint_remote(issuer, grant, terms, material).await
        } else {
            // Signing in-process: nothing to wait for, nothing to abandon.
            issuer
                .issue(grant, terms, material)
                .await
                .map_err(BrokerError::from)
        };
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
    async fn mint_remote(
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
            tokio::spawn(async move { issuer.issue(&grant, &terms, &material).await })
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
    fn discard(&self, lease: &Lease) {
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

    fn context(
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
        }
    }

    /// Mints a credential for `grant` and builds its lease and audit entry.
    async fn prepare(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        grant: &Grant,
        material: &Material,
        rpc: &str,
    ) -> Result<(Credential, Lease, AuditEvent), BrokerError> {
        let now = self.clock.unix_seconds();
        let terms = LeaseTerms {
            lease_id: LeaseId::generate(unix_millis(self.clock.now()))?,
            subject: caller.spiffe_id().to_string(),
            issued_at: now,
            expires_at: now + grant.ttl.as_secs() as i64,
            cnf_x5t_s256: caller.cert_sha256().copied(),
        };
        let minted = self.mint(caller, grant, &terms, material, rpc).await?;
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
            spiffe_id: terms.subject.clone(),
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

    fn settle_issue(
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
        if let Some(profile) = policy.profile(req.profile.as_str()) {
            let who = caller.spiffe_id().to_string();
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
                return Err(self
                    .refuse_throttled(caller, &key, "IssueCredential", t)
                    .await);
            }
        }
        if let Some(key) = &opts.idempotency_key {
            if let Some(done) = self.replay(caller, &req, key).await? {
                return Ok(IssueOutcome::Issued(Box::new(done)));
            }
        }
        if let Some(id) = opts.access_request_id.clone() {
            return self
                .redeem(caller, req, &id, policy, &opts.material)
                .await
                .map(|i| IssueOutcome::Issued(Box::new(i)));
        }
        let ctx = self.context(caller, opts.break_glass, Vec::new());
        match policy.decide(caller.spiffe_id(), &req, &ctx) {
            Decision::Deny(d) => Err(self
                .deny(
                    caller,
                    request_record("IssueCredential", &req),
                    &d,
                    policy.hash(),
                )
                .await),
            Decision::RequireApproval(grant, need) => {
                self.open_request(caller, &req, &grant, need, &opts.material)
                    .await
            }
            Decision::Allow(grant) => {
                if grant.break_glass {
                    self.break_glass_allowance(caller, &req, policy.hash())
                        .await?;
                }
                let (credential, lease, mut e) = self
                    .prepare(caller, &req, &grant, &opts.material, "IssueCredential")
                    .await?;
                let minted_lease = lease.clone();
                let break_glass = if grant.break_glass {
                    let now = self.clock.unix_seconds();
                    let spec = RequestSpec::of(&req);
                    let ar = AccessRequest {
                        id: LeaseId::generate(unix_millis(self.clock.now()))?.to_string(),
                        requester: caller.spiffe_id().to_string(),
                        profile: req.profile.clone(),
                        digest: spec.digest(req.profile.as_str()),
                        request: spec,
                        group: "break-glass".into(),
                        threshold: 0,
                        state: AccessState::Issued,
                        created_at: now,
                        expires_at: lease.expires_at,
                        deny_ends: true,
                        break_glass: true,
                        post_review: Some("pending".into()),
                        lease_id: Some(lease.id.to_string()),
                        reviews: Vec::new(),
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
                        caller: caller.spiffe_id().to_string(),
                        key_hash: idempotency::key_hash(key),
                        digest: RequestSpec::of(&req).digest(req.profile.as_str()),
                        lease_id: lease.id.to_string(),
                        sealed: idempotency::seal(
                            key,
                            &caller.spiffe_id().to_string(),
                            &credential,
                        )?,
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
    /// Break-glass is for emergencies, not a way around approval: an identity may hold
    /// only so many break-glass issuances of a profile that nobody has post-reviewed yet.
    async fn break_glass_allowance(
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
                requester: Some(caller.spiffe_id().to_string()),
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
    async fn replay(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        key: &str,
    ) -> Result<Option<Issued>, BrokerError> {
        let me = caller.spiffe_id().to_string();
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
        }))
    }

    /// Identities that may review `profile` (optionally only members of `group`).
    fn reviewers(
        &self,
        policy: &Arc<dyn Policy>,
        profile: &str,
        group: Option<&str>,
    ) -> Vec<String> {
        let members = group.map(|g| policy.group_members(g));
        policy
            .identities()
            .iter()
            .filter(|i| policy.authorize_review(&i.spiffe_id, profile).is_ok())
            .map(|i| i.spiffe_id.to_string())
            .filter(|id| members.as_ref().is_none_or(|m| m.contains(id)))
            .collect()
    }

    fn notify_request(
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

    async fn open_request(
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
            Err(e) => return Err(self.reject(caller, "IssueCredential", e).await),
        };
        let spec = RequestSpec::of(req).bound(bound);
        let ar = AccessRequest {
            id: LeaseId::generate(unix_millis(self.clock.now()))?.to_string(),
            requester: caller.spiffe_id().to_string(),
            profile: req.profile.clone(),
            digest: spec.digest(req.profile.as_str()),
            request: spec,
            group: need.group.clone(),
            threshold: need.threshold,
            state: AccessState::Pending,
            created_at: now,
            expires_at: now + grant.profile.approval_ttl.as_secs() as i64,
            deny_ends: grant.profile.deny_ends,
            break_glass: false,
            post_review: None,
            lease_id: None,
            reviews: Vec::new(),
        };
        let mut e = self.event(EventKind::AccessRequest, "require_approval", Some(caller));
        e.request = Some(request_record("IssueCredential", req));
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

    async fn redeem(
        &self,
        caller: &VerifiedCaller,
        req: CredentialRequest,
        id: &str,
        policy: Arc<dyn Policy>,
        material: &Material,
    ) -> Result<Issued, BrokerError> {
        let digest = RequestSpec::of(&req).digest(req.profile.as_str());
        // A retry of a redemption that already succeeded (same requester, same exact
        // request) gets the same credential while its lease is still active; anything
        // else goes through the checks below.
        let cached = self
            .redeemed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|(d, done)| {
                *d == digest && done.lease.spiffe_id == caller.spiffe_id().to_string()
            })
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
            e.request = Some(request_record("IssueCredential", &req));
            e.access_request_id = ar_id;
            e.reason = Some(refusal.describe());
            e
        };
        let Some(ar) = self
            .store
            .access_request(id)
            .await?
            .filter(|a| a.requester == caller.spiffe_id().to_string())
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
        let ctx = self.context(caller, false, ar.approvers());
        let grant = match policy.decide(caller.spiffe_id(), &req, &ctx) {
            Decision::Allow(g) => g,
            Decision::Deny(d) => {
                return Err(self
                    .deny(
                        caller,
                        request_record("IssueCredential", &req),
                        &d,
                        policy.hash(),
                    )
                    .await)
            }
            Decision::RequireApproval(_, need) => {
                let d = Denial {
                    kind: DenialKind::NotPermitted,
                    reason: format!(
                        "approvals no longer satisfy policy: need {} from {}",
                        need.threshold, need.group
                    ),
                    rule: Some(need.rule),
                    violations: Vec::new(),
                };
                return Err(self
                    .deny(
                        caller,
                        request_record("IssueCredential", &req),
                        &d,
                        policy.hash(),
                    )
                    .await);
            }
        };
        // The approval covers the grant as resolved when it was asked for, and how it is
        // held: defaults changed by a reload, another key or another auth method void it.
        let now_bound = match bind(caller, &grant, material) {
            Ok(b) => b,
            Err(e) => return Err(self.reject(caller, "IssueCredential", e).await),
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
        let (credential, lease, mut e) = self
            .prepare(caller, &req, &grant, material, "IssueCredential")
            .await?;
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
            .authorize_review(caller.spiffe_id(), ar.profile.as_str())
            .and_then(|rule| {
                if ar.break_glass
                    || policy
                        .group_members(&ar.group)
                        .contains(&caller.spiffe_id().to_string())
                {
                    Ok(rule)
                } else {
                    Err(Denial {
                        kind: DenialKind::NotPermitted,
                        reason: format!(
                            "{} is not in approver group {:?}",
                            caller.spiffe_id(),
                            ar.group
                        ),
                        rule: None,
                        violations: Vec::new(),
                    })
                }
            });
        let allowed = allowed.and_then(|rule| {
            match policy.review_conflict(Parties::of(&ar), &caller.spiffe_id().to_string()) {
                None => Ok(rule),
                Some(c) => Err(Denial {
                    kind: DenialKind::NotPermitted,
                    reason: format!("{} ({})", c.reason, c.rule),
                    rule: Some(c.rule.to_owned()),
                    violations: Vec::new(),
                }),
            }
        });
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
                reviewer: caller.spiffe_id().to_string(),
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
    async fn revoke_break_glass(
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
                reviewer = %reviewer.spiffe_id(),
                "break-glass issuance denied at post-review; its lease is revoked"
            );
            self.revocations_changed();
        }
        Ok(())
    }

    /// One access request, for its requester, its reviewers and operators.
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
        let me = caller.spiffe_id();
        let visible = ar.requester == me.to_string()
            || policy.authorize_review(me, ar.profile.as_str()).is_ok()
            || policy.authorize_admin(me, AdminAction::ListLeases).is_ok();
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
        let me = caller.spiffe_id().to_string();
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
            .profiles()
            .iter()
            .filter(|p| {
                policy
                    .authorize_review(caller.spiffe_id(), p.name.as_str())
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
                policy.review_conflict(Parties::of(r), &me).is_none()
                    && policy.group_members(&r.group).contains(&me)
                    && !r.reviews.iter().any(|v| v.reviewer == me)
            });
        }
        Ok(rows)
    }

    /// Dry run: what policy would decide for the caller's request, and why.
    pub fn explain(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        break_glass: bool,
    ) -> Explanation {
        let policy = self.policy();
        let ctx = self.context(caller, break_glass, Vec::new());
        explain_with(policy.as_ref(), caller.spiffe_id(), req, &ctx)
    }

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
            Some(l) if l.spiffe_id == caller.spiffe_id().to_string() => l,
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
        let renewable = policy
            .profile(lease.profile.as_str())
            .is_some_and(|p| p.scope_template.is_none());
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
        let ctx = self.context(caller, false, Vec::new());
        let grant = match (renewable, policy.decide(caller.spiffe_id(), &req, &ctx)) {
            (true, Decision::Allow(g)) => g,
            (_, Decision::Deny(d)) => {
                return Err(self.deny(caller, rec(), &d, policy.hash()).await)
            }
            _ => {
                let d = Denial {
                    kind: DenialKind::NotPermitted,
                    reason: "this lease needs approval to be issued again; it cannot be renewed"
                        .into(),
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
        let policy = self.policy();
        match policy.authorize_admin(caller.spiffe_id(), action) {
            Ok(rule) => Ok(rule),
            Err(d) => Err(self.deny(caller, record(rpc), &d, policy.hash()).await),
        }
    }

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
            created_by: caller.spiffe_id().to_string(),
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

    /// Lists leases (platform admin only).
    pub async fn list_leases(
        &self,
        caller: &VerifiedCaller,
        filter: LeaseFilter,
    ) -> Result<Vec<Lease>, BrokerError> {
        self.admin(caller, AdminAction::ListLeases, "ListLeases")
            .await?;
        Ok(self.store.leases(filter).await?)
    }

    /// The non-human identity inventory (platform admin only).
    pub async fn inventory(
        &self,
        caller: &VerifiedCaller,
    ) -> Result<Vec<InventoryEntry>, BrokerError> {
        self.admin(caller, AdminAction::ListIdentities, "ListIdentities")
            .await?;
        let policy = self.policy();
        let stats: HashMap<String, IdentityStats> = self
            .store
            .identity_stats()
            .await?
            .into_iter()
            .map(|s| (s.spiffe_id.clone(), s))
            .collect();
        Ok(inventory_rows(policy.as_ref(), &stats))
    }

    /// Reloads the policy set; a bad policy is refused and the old one stays in force.
    /// `who` is the caller's SPIFFE ID or `signal:SIGHUP`.
    pub async fn reload_policy(
        &self,
        caller: Option<&VerifiedCaller>,
    ) -> Result<String, BrokerError> {
        if let Some(c) = caller {
            self.admin(c, AdminAction::ReloadPolicy, "ReloadPolicy")
                .await?;
        }
        let Some(loader) = &self.loader else {
            return Err(BrokerError::FailedPrecondition(
                "this broker has no policy source to reload from".into(),
            ));
        };
        let old = self.policy().hash().to_owned();
        let mut e = self.event(EventKind::PolicyReload, "allow", caller);
        let by = if caller.is_none() {
            "reloaded on SIGHUP"
        } else {
            "reloaded by the caller"
        };
        e.request = Some(record("ReloadPolicy"));
        match loader() {
            Ok(new) => {
                let hash = new.hash().to_owned();
                e.policy_hash = Some(hash.clone());
                e.reason = Some(format!("{by}; replaced policy {old}"));
                // Record first: a reload nobody can see in the ledger did not happen.
                self.store.apply(LedgerOp::Record { event: e }).await?;
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = new;
                tracing::info!(old = %old, new = %hash, "policy reloaded");
                Ok(hash)
            }
            Err(err) => {
                e.decision = "deny".into();
                e.policy_hash = Some(old.clone());
                e.reason = Some(format!(
                    "reload refused, policy {old} stays in force: {err}"
                ));
                self.record_best_effort(e).await;
                tracing::warn!(error = %err, "policy reload refused; the old policy stays in force");
                Err(BrokerError::InvalidArgument(format!(
                    "policy refused: {err}"
                )))
            }
        }
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

/// The refusal when a backend did not answer within the profile's deadline.
fn deadline_passed(profile: &Profile) -> BrokerError {
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
async fn revoke_orphan(issuer: Arc<dyn Issuer>, handle: String) {
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
const LATE_ANSWER_LIMIT: Duration = Duration::from_secs(60);
/// Backend revocations claimed per pass.
const BACKEND_REVOKE_BATCH: u32 = 16;
/// Backend revocation attempts in flight at once.
const BACKEND_REVOKE_CONCURRENCY: usize = 8;
/// How long one backend revocation attempt may take.
const BACKEND_REVOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A backend revocation that failed this often is reported as stuck.
pub const STUCK_AFTER_ATTEMPTS: u32 = 5;

/// Seconds until the next attempt after `attempts` failures: 1 s doubling to 5 min,
/// with ±25 % jitter so a backend coming back is not hit by every retry at once.
fn backoff_secs(attempts: u32) -> i64 {
    let base = 1i64 << attempts.min(9);
    let base = base.min(300);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let jitter = (i64::from(u16::from_le_bytes(b)) % 51) - 25; // -25..=25 %
    (base + base * jitter / 100).max(1)
}

/// The inventory from a policy and traffic statistics.
pub fn inventory_rows(
    policy: &dyn Policy,
    stats: &HashMap<String, IdentityStats>,
) -> Vec<InventoryEntry> {
    let mut rows = Vec::new();
    for i in policy.identities() {
        let id = i.spiffe_id.to_string();
        let s = stats.get(&id);
        let groups = policy.groups_of(&i.spiffe_id);
        let mut flags = Vec::new();
        if i.owner.trim().is_empty() {
            flags.push("no owner".into());
        }
        rows.push(InventoryEntry {
            spiffe_id: id,
            registered: true,
            owner: i.owner.clone(),
            environment: i.environment.clone(),
            roles: i.roles.clone(),
            approver_groups: groups,
            paths: policy.paths(&i.spiffe_id),
            active_leases: s.map_or(0, |s| s.active_leases),
            issued: s.map_or(0, |s| s.issued),
            denied: s.map_or(0, |s| s.denied),
            last_seen_ms: s.map(|s| s.last_seen_ms),
            last_issued_ms: s.and_then(|s| s.last_issued_ms),
            flags,
        });
    }
    for (id, s) in stats {
        if policy
            .identities()
            .iter()
            .any(|i| &i.spiffe_id.to_string() == id)
        {
            continue;
        }
        rows.push(InventoryEntry {
            spiffe_id: id.clone(),
            registered: false,
            owner: String::new(),
            environment: String::new(),
            roles: Vec::new(),
            approver_groups: Vec::new(),
            paths: Vec::new(),
            active_leases: s.active_leases,
            issued: s.issued,
            denied: s.denied,
            last_seen_ms: Some(s.last_seen_ms),
            last_issued_ms: s.last_issued_ms,
            flags: vec!["unregistered caller".into(), "no owner".into()],
        });
    }
    rows.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    rows
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
