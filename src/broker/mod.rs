//! The request path, wired: authn → policy → (approval) → issuer → ledger.
//! Transport-agnostic: the gRPC adapters in `api` call these methods with parsed values.

mod access_watch;
mod approvals;
mod backend_revocations;
mod exchange;
mod feed;
pub mod idempotency;
mod inventory;
mod issue;
mod lifecycle;
mod log;
mod mint;
mod people;
mod revoke;
mod sessions;
mod streams;
mod throttle;

pub use approvals::RequestListing;
pub use backend_revocations::STUCK_AFTER_ATTEMPTS;
pub use exchange::ExchangeSettings;
pub use feed::{FeedItem, FeedPage, RELYING_PARTY_ROLE};
pub use inventory::{inventory_rows, InventoryEntry};
pub use issue::{explain_with, Explanation, IssueOptions, IssueOutcome, Issued, SubjectBounds};
pub use log::{EntrySelector, InclusionProof};
pub use revoke::Revoked;
pub use sessions::{same_secret, Session, Sessions, CLI_CODE_WINDOW};
pub use streams::StreamSlot;
pub use throttle::Throttled;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::audit::{AuditEvent, EventKind, RequestRecord};
use crate::authn::{Authenticator, AuthnError, TransportFacts, VerifiedCaller};
use crate::checkpoint::LogSigner;
use crate::clock::{unix_millis, Clock};
use crate::config::Limits;
use crate::domain::{AccessRequest, CredentialRequest, PersonRecord};
use crate::error::BrokerError;
use crate::issuer::Issuer;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::policy::{AdminAction, Denial, DenialKind, Policy};
use crate::store::{LedgerOp, Refusal, Store};
use throttle::RateLimiter;

/// Loads a fresh policy (the config and `.cedar` files) for a reload.
pub type PolicyLoader = Box<dyn Fn() -> Result<Arc<dyn Policy>, String> + Send + Sync>;

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
        delegation: None,
    }
}

fn request_record(rpc: &str, req: &CredentialRequest) -> RequestRecord {
    RequestRecord {
        rpc: rpc.to_owned(),
        profile: Some(req.profile.to_string()),
        scopes: req.scopes.iter().map(|s| s.to_string()).collect(),
        ttl_secs: req.ttl.map(|t| t.as_secs()),
        intent: req.intent.clone(),
        delegation: req.delegation.clone(),
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
        | Refusal::ParentEnded
        | Refusal::Duplicate => BrokerError::PermissionDenied(r.describe()),
        Refusal::Ended(_)
        | Refusal::Expired
        | Refusal::NothingMatched
        | Refusal::AlreadyReviewed
        | Refusal::RequestEnded(_)
        | Refusal::RequestExpired => BrokerError::FailedPrecondition(r.describe()),
    }
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
    exchange: Option<ExchangeSettings>,
    oidc: Option<Arc<crate::oidc::OidcProviders>>,
    /// People's sessions (console and CLI), when `[console]` is configured.
    sessions: Option<Arc<Sessions>>,
    reload_guard: Option<Duration>,
}

/// How often watchers' shared pollers re-read the store (changes made on other replicas).
const WATCH_POLL: Duration = Duration::from_secs(1);

/// The `authorization` scheme of a person's session token on gRPC (`Session <token>`).
pub const SESSION_SCHEME: &str = "Session ";

/// The caller's SPIFFE ID where only a workload may act: credentials, renewals and the
/// revocation feed are for workloads; a person's console session reaches reviews, listings
/// and operator actions only.
fn workload_of(caller: &VerifiedCaller) -> Result<&spiffe::SpiffeId, BrokerError> {
    caller.workload().ok_or_else(|| {
        BrokerError::PermissionDenied(format!(
            "{} is a person; only a workload may do this",
            caller.id()
        ))
    })
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
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_MAX_IN_FLIGHT,
            )),
            heads: Arc::new(feed::HeadSigner::new(None, clock.clone())),
            tail_hub: feed::TailHub::default(),
            access_hub: access_watch::AccessHub::default(),
            streams: streams::StreamCounts::default(),
            throttle: throttle::Throttle::new(Limits::default()),
            revocations: broadcast::channel(64).0,
            changes: broadcast::channel(1024).0,
            exchange: None,
            oidc: None,
            sessions: None,
            reload_guard: None,
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

    /// The store (read paths of the verifiable log).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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

    /// Whether the caller is in the inventory.
    fn is_registered(&self, caller: &VerifiedCaller) -> bool {
        // A person reached the broker through a verified console session.
        caller
            .workload()
            .is_none_or(|id| self.policy().directory().identity(id).is_some())
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
            e.caller = Some(c.id().to_string());
            e.caller_person = c.principal().person().map(|p| PersonRecord {
                email: p.email.clone(),
                name: p.name.clone(),
            });
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
        if let Some(token) = facts
            .authorization
            .and_then(|a| a.strip_prefix(SESSION_SCHEME))
        {
            let caller = self
                .authenticate_person(token.trim(), facts.peer_ip)
                .await?;
            self.throttle_call(&caller, facts.peer_ip, rpc).await?;
            return Ok(caller);
        }
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
        err: impl Into<BrokerError>,
    ) -> BrokerError {
        let err = err.into();
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

    /// Whether `caller` may perform an operator action (`rpc` names it in the ledger); a
    /// refusal is recorded. `Ok` carries the permitting rule.
    pub async fn admin(
        &self,
        caller: &VerifiedCaller,
        action: AdminAction,
        rpc: &str,
    ) -> Result<String, BrokerError> {
        let policy = self.policy();
        match policy.authorize_admin(caller.principal(), action) {
            Ok(rule) => Ok(rule),
            Err(d) => Err(self.deny(caller, record(rpc), &d, policy.hash()).await),
        }
    }
}
