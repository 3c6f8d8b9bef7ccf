//! The `Store` seam: leases and the audit ledger, behind one trait.
//!
//! Every state change is one [`LedgerOp`]: the lease change and its audit entry commit
//! together or not at all. State-transition guards (only an active, unexpired lease of
//! the same holder can be renewed or released) are checked inside the same transaction,
//! so a revoked lease can never come back, whatever the interleaving.
//!
//! Layout: the ops are written once (`ops`, one module per op family) over a small
//! synchronous transaction trait (`sql`: `Tx`, typed values and rows, the few dialect
//! differences); `engine` holds the writer's queue and batching loop and the `Store`
//! implementation both engines share; [`sqlite`] and [`postgres`] keep only what differs
//! (opening and migrating, how the writer's transaction begins and commits, the read
//! path, file verification, and their `Tx`).

pub(crate) mod engine;
pub mod export;
pub(crate) mod ops;
pub mod pg_tls;
pub mod postgres;
pub(crate) mod sql;
pub mod sqlite;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::checkpoint::LogSigner;
use crate::domain::IdempotencyRecord;
use crate::merkle::Hash as MerkleHash;

use crate::audit::{AuditEvent, StoredEntry};
use crate::domain::{
    AccessFilter, AccessRequest, AccessState, BackendRevocation, Lease, LeaseFilter, LeaseId, Lock,
    RevocationEvent, RevokeSelector, Verdict,
};

pub use self::postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The revocation feed's end: last sequence and chain hash.
pub type FeedTail = (u64, [u8; 32]);

/// Why the store could not do its job. Either way, nothing was issued.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Could not commit durably in time (disk full, read-only, locked, gone).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data violates an invariant.
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// One atomic ledger change.
#[derive(Debug, Clone)]
// Ops are built once and moved through the writer's queue; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum LedgerOp {
    /// Record a new lease and its issuance.
    Issue {
        /// The lease.
        lease: Lease,
        /// Its audit entry.
        event: AuditEvent,
        /// Refuse if the holder already has this many active leases on the profile.
        max_active: Option<u32>,
        /// A break-glass issuance's access request (state `issued`, post-review pending).
        break_glass: Option<AccessRequest>,
        /// The sealed credential of an idempotent request (refused as `Duplicate` if the
        /// caller already used the key).
        idempotency: Option<IdempotencyRecord>,
    },
    /// Open an access request that awaits approvals.
    OpenAccessRequest {
        /// The request (state `pending`).
        request: AccessRequest,
        /// Its audit entry.
        event: AuditEvent,
    },
    /// An approver's review: counts toward the threshold, or denies; for a break-glass
    /// issuance, the post-review.
    Review {
        /// Which access request.
        id: String,
        /// The approver (never the requester).
        reviewer: String,
        /// Approve or deny.
        verdict: Verdict,
        /// Why.
        reason: String,
        /// Now (Unix seconds).
        now: i64,
        /// Audit entry.
        event: AuditEvent,
    },
    /// Issue the credential of an approved access request, exactly once.
    Redeem {
        /// Which access request.
        id: String,
        /// Must be its requester.
        requester: String,
        /// Must equal the approved request's digest.
        digest: String,
        /// Refuse if the requester already has this many active leases on the profile.
        max_active: Option<u32>,
        /// The lease to record.
        lease: Lease,
        /// Now (Unix seconds).
        now: i64,
        /// Audit entry.
        event: AuditEvent,
    },
    /// Extend an active lease held by `holder`, with a fresh credential fingerprint.
    Renew {
        /// Which lease.
        lease_id: LeaseId,
        /// Must be its holder.
        holder: String,
        /// Now (Unix seconds): the lease must not have expired.
        now: i64,
        /// New expiry (already capped at the lease's max).
        expires_at: i64,
        /// Fingerprint of the new credential.
        credential_sha256: String,
        /// Audit entry (written with a refusal reason instead if the guard fails).
        event: AuditEvent,
    },
    /// The holder gives an active lease back.
    Release {
        /// Which lease.
        lease_id: LeaseId,
        /// Must be its holder.
        holder: String,
        /// Now (Unix seconds).
        now: i64,
        /// Audit entry.
        event: AuditEvent,
    },
    /// Revoke every active lease the selector covers.
    Revoke {
        /// Which leases.
        selector: RevokeSelector,
        /// Only leases issued strictly before this (Unix seconds).
        issued_before: Option<i64>,
        /// Why.
        reason: String,
        /// Now (Unix seconds).
        now: i64,
        /// Only report what would be revoked; change and record nothing.
        dry_run: bool,
        /// Revoke at most this many leases in this transaction (bulk revocations run as
        /// several transactions so issuance keeps flowing); part 1 leaves the rule.
        chunk: Option<(u32, u32)>,
        /// Audit entry (the affected leases are filled in).
        event: AuditEvent,
    },
    /// Set an operator lock.
    Lock {
        /// The lock.
        lock: Lock,
        /// Audit entry.
        event: AuditEvent,
    },
    /// Remove an operator lock.
    Unlock {
        /// Lock id.
        id: String,
        /// Audit entry.
        event: AuditEvent,
    },
    /// The backend confirmed the revocation of a lease's credential.
    BackendRevoked {
        /// Which lease.
        lease_id: String,
        /// Now (Unix seconds).
        now: i64,
        /// Audit entry.
        event: AuditEvent,
    },
    /// A backend revocation attempt failed; try again at `next_attempt_at`.
    BackendRevokeFailed {
        /// Which lease.
        lease_id: String,
        /// Why (no secrets).
        error: String,
        /// When to retry (Unix seconds).
        next_attempt_at: i64,
    },
    /// A platform-admin gives up on a backend revocation (the backend is gone for good).
    ForceRemoveBackendRevocation {
        /// Which lease.
        lease_id: String,
        /// Now (Unix seconds).
        now: i64,
        /// Audit entry (names who and why).
        event: AuditEvent,
    },
    /// Mark up to `limit` active leases whose expiry has passed as expired.
    Expire {
        /// Now (Unix seconds).
        now: i64,
        /// Batch bound.
        limit: u32,
        /// Audit entry (written only if something expired).
        event: AuditEvent,
    },
    /// Sign and store a checkpoint of the tree as it is after everything committed
    /// before this op (nothing happens if the tree did not grow since the last one).
    Checkpoint {
        /// The log key.
        signer: Arc<LogSigner>,
        /// Now (Unix ms).
        time_ms: i64,
    },
    /// Only an audit entry (denials, failed authentication).
    Record {
        /// The entry.
        event: AuditEvent,
    },
}

/// Why a guarded transition did not happen. The refusal itself is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such lease.
    NotFound,
    /// The lease belongs to someone else.
    NotHolder,
    /// The lease already ended (revoked, released, expired).
    Ended(crate::domain::LeaseState),
    /// The lease's expiry has passed.
    Expired,
    /// Nothing matched the selector.
    NothingMatched,
    /// The holder already has the maximum of active leases on this profile.
    QuotaExceeded(u32),
    /// No such access request (or not the caller's).
    RequestNotFound,
    /// The requester tried to review its own request.
    SelfReview,
    /// This approver already reviewed this request.
    AlreadyReviewed,
    /// The request is no longer open.
    RequestEnded(AccessState),
    /// The request expired.
    RequestExpired,
    /// The redeemed request differs from the approved one.
    DigestMismatch,
    /// An operator lock bars issuance (the lock's reason and end).
    Locked(String),
    /// A revocation acknowledged before this issuance covers it.
    RevokedBefore,
    /// The idempotency key was already used by this caller.
    Duplicate,
    /// The subject token's lease ended before the derived credential was recorded.
    ParentEnded,
}

impl Refusal {
    /// Text recorded in the ledger.
    pub fn describe(&self) -> String {
        match self {
            Refusal::NotFound => "lease not found".into(),
            Refusal::NotHolder => "lease held by another identity".into(),
            Refusal::Ended(s) => format!("lease is {}", s.as_str()),
            Refusal::Expired => "lease has expired".into(),
            Refusal::NothingMatched => "no active lease matched".into(),
            Refusal::QuotaExceeded(n) => {
                format!("quota exceeded: at most {n} active leases per identity on this profile")
            }
            Refusal::RequestNotFound => "access request not found".into(),
            Refusal::SelfReview => "the requester cannot review its own request".into(),
            Refusal::AlreadyReviewed => "this approver already reviewed the request".into(),
            Refusal::RequestEnded(s) => format!("access request is {}", s.as_str()),
            Refusal::RequestExpired => "access request has expired".into(),
            Refusal::DigestMismatch => "the approval was for a different request".into(),
            Refusal::ParentEnded => {
                "the subject token's lease ended (revoked, released or expired)".into()
            }
            Refusal::Locked(why) => format!("issuance is locked: {why}"),
            Refusal::RevokedBefore => "a revocation covers this identity or profile".into(),
            Refusal::Duplicate => "idempotency key already used".into(),
        }
    }
}

/// Where an entry landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// 1-based sequence number.
    pub sequence: u64,
    /// Hex hash of the entry (the hash chain).
    pub entry_hash: String,
    /// Index of the entry's leaf in the Merkle tree (`sequence - 1`).
    pub leaf_index: u64,
    /// Hex Merkle leaf hash, `SHA-256(0x00 || body)`.
    pub leaf_hash: String,
}

impl LedgerOp {
    /// The audit entry the op writes (or writes as a refusal), if it writes one.
    pub fn event(&self) -> Option<&AuditEvent> {
        match self {
            LedgerOp::Issue { event, .. }
            | LedgerOp::OpenAccessRequest { event, .. }
            | LedgerOp::Review { event, .. }
            | LedgerOp::Redeem { event, .. }
            | LedgerOp::Renew { event, .. }
            | LedgerOp::Release { event, .. }
            | LedgerOp::Revoke { event, .. }
            | LedgerOp::Lock { event, .. }
            | LedgerOp::Unlock { event, .. }
            | LedgerOp::BackendRevoked { event, .. }
            | LedgerOp::ForceRemoveBackendRevocation { event, .. }
            | LedgerOp::Record { event } => Some(event),
            LedgerOp::Expire { .. }
            | LedgerOp::Checkpoint { .. }
            | LedgerOp::BackendRevokeFailed { .. } => None,
        }
    }
}

/// The guard every holder operation (renew, release) passes, in every backend: the
/// lease exists, is the caller's, is active and has not expired.
pub(crate) fn guard_holder(lease: Option<Lease>, holder: &str, now: i64) -> Result<Lease, Refusal> {
    let lease = lease.ok_or(Refusal::NotFound)?;
    if lease.spiffe_id != holder {
        return Err(Refusal::NotHolder);
    }
    if lease.state != crate::domain::LeaseState::Active {
        return Err(Refusal::Ended(lease.state));
    }
    if lease.expires_at <= now {
        return Err(Refusal::Expired);
    }
    Ok(lease)
}

/// A store failure the caller may retry.
pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The result of a committed op.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The audit entry written (absent only for an `Expire` that found nothing).
    pub receipt: Option<Receipt>,
    /// The lease after the op (issue, renew, release, single-lease revoke).
    pub lease: Option<Lease>,
    /// Leases changed (revoke, expire).
    pub affected: Vec<String>,
    /// Set when a guard refused the transition (the refusal is what was recorded).
    pub refused: Option<Refusal>,
    /// The access request after the op.
    pub access_request: Option<AccessRequest>,
    /// The checkpoint a `Checkpoint` op signed.
    pub checkpoint: Option<StoredCheckpoint>,
}

/// A signed checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: MerkleHash,
    /// When it was signed (Unix ms).
    pub time_ms: i64,
    /// The signed note.
    pub note: String,
    /// Witness cosignature lines on it (c2sp.org/tlog-cosignature), by witness name.
    pub cosignatures: Vec<String>,
}

impl StoredCheckpoint {
    /// The note with the witnesses' cosignature lines after the log's signature: what
    /// `/log/checkpoint`, proofs and exports carry.
    pub fn cosigned_note(&self) -> String {
        let mut note = self.note.clone();
        for line in &self.cosignatures {
            note.push_str(line);
            if !line.ends_with('\n') {
                note.push('\n');
            }
        }
        note
    }
}

/// A witness's cosignature on a checkpoint, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosignature {
    /// The tree size cosigned.
    pub size: u64,
    /// The witness's name (its key name).
    pub witness: String,
    /// The note signature line.
    pub line: String,
    /// The cosignature's timestamp (Unix seconds).
    pub cosigned_at: i64,
}

impl Applied {
    /// A result carrying only an audit receipt.
    pub fn recorded(receipt: Option<Receipt>) -> Self {
        Self {
            receipt,
            lease: None,
            affected: Vec::new(),
            refused: None,
            access_request: None,
            checkpoint: None,
        }
    }
}

/// What the inventory knows of one identity from traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityStats {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// First request (Unix ms).
    pub first_seen_ms: i64,
    /// Last request (Unix ms).
    pub last_seen_ms: i64,
    /// Last issuance (Unix ms).
    pub last_issued_ms: Option<i64>,
    /// Issuances and renewals.
    pub issued: u64,
    /// Refusals.
    pub denied: u64,
    /// Currently active leases.
    pub active_leases: u64,
}

/// An audit sink's claim on its position (see [`Store::audit_sink`]).
#[derive(Debug, Clone)]
pub struct SinkClaim {
    /// The sink's configured name.
    pub name: String,
    /// Who ships it (this broker process).
    pub holder: String,
    /// Now (Unix ms).
    pub now_ms: i64,
    /// The hold lasts until then (Unix ms), unless renewed.
    pub held_until_ms: i64,
    /// The last entry the sink now has, to record (`None`: only claim or renew).
    pub shipped: Option<u64>,
}

/// Where an audit sink stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkPosition {
    /// The last entry the sink has.
    pub shipped: u64,
    /// The log's last entry.
    pub log_size: u64,
}

/// The store seam.
///
/// Contract: `apply` returns `Ok` only after the op and its audit entry are durable
/// (fsync'd, or committed on PostgreSQL); it returns `Unavailable` within the configured
/// commit timeout otherwise, having applied nothing visible. Audit entries form one
/// gap-free hash chain, also when several brokers share one database. Implementations
/// pass the shared conformance suite in `tests/it/store_conformance.rs`.
pub trait Store: Send + Sync + 'static {
    /// Applies one op durably.
    fn apply(&self, op: LedgerOp) -> BoxFuture<'_, Result<Applied, StoreError>>;
    /// One lease.
    fn lease(&self, id: &LeaseId) -> BoxFuture<'_, Result<Option<Lease>, StoreError>>;
    /// Leases, newest first.
    fn leases(&self, filter: LeaseFilter) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>>;
    /// Audit entries with `seq > after`, in order, at most `limit`.
    fn audit_entries(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<StoredEntry>, StoreError>>;
    /// One access request with its reviews.
    fn access_request(&self, id: &str) -> BoxFuture<'_, Result<Option<AccessRequest>, StoreError>>;
    /// Access requests, newest first.
    fn access_requests(
        &self,
        filter: AccessFilter,
    ) -> BoxFuture<'_, Result<Vec<AccessRequest>, StoreError>>;
    /// Traffic statistics of every identity seen.
    fn identity_stats(&self) -> BoxFuture<'_, Result<Vec<IdentityStats>, StoreError>>;
    /// The checkpoint of a tree size, or the latest one.
    fn checkpoint(
        &self,
        size: Option<u64>,
    ) -> BoxFuture<'_, Result<Option<StoredCheckpoint>, StoreError>>;
    /// Every checkpoint, oldest first.
    fn checkpoints(&self) -> BoxFuture<'_, Result<Vec<StoredCheckpoint>, StoreError>>;
    /// Records a witness's cosignature of a stored checkpoint (replacing an earlier one by
    /// the same witness of the same size). The caller has verified it.
    fn add_cosignature(&self, c: Cosignature) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The largest tree size a witness has cosigned, if any.
    fn cosigned_size(&self, witness: &str) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;
    /// Inclusion proof of leaf `index` in the tree of `size` (`None` if out of range).
    fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> BoxFuture<'_, Result<Option<Vec<MerkleHash>>, StoreError>>;
    /// Consistency proof between two tree sizes (`None` if out of range).
    fn consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> BoxFuture<'_, Result<Option<Vec<MerkleHash>>, StoreError>>;
    /// The idempotency record of a caller's key.
    fn idempotency(
        &self,
        caller: &str,
        key_hash: &str,
    ) -> BoxFuture<'_, Result<Option<IdempotencyRecord>, StoreError>>;
    /// Operator locks in force at `now`.
    fn locks(&self, now: i64) -> BoxFuture<'_, Result<Vec<Lock>, StoreError>>;
    /// The revocation feed's last sequence and chain hash.
    fn revocation_tail(&self) -> BoxFuture<'_, Result<Option<FeedTail>, StoreError>>;
    /// Revocation feed events with `seq > after`, in order, at most `limit`.
    fn revocations(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<RevocationEvent>, StoreError>>;
    /// Claims up to `limit` backend revocations due at `now` (oldest due first) for
    /// `hold_secs`: each claimed row's `next_attempt_at` moves to `now + hold_secs`, in one
    /// atomic step, so no other caller (another broker replica on the same database) gets
    /// it while this one works on it. The rows come back with that new `next_attempt_at`.
    /// The claimer then records `BackendRevoked` or `BackendRevokeFailed` (which sets the
    /// next attempt); a claimer that dies leaves the row due again when the hold ends.
    fn claim_backend_revocations(
        &self,
        now: i64,
        limit: u32,
        hold_secs: u32,
    ) -> BoxFuture<'_, Result<Vec<BackendRevocation>, StoreError>>;
    /// Backend revocations not yet done with at least `min_attempts` failures, oldest first.
    fn pending_backend_revocations(
        &self,
        min_attempts: u32,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<BackendRevocation>, StoreError>>;
    /// The entries that name a lease (issuance first).
    fn entries_for_lease(
        &self,
        lease_id: &str,
    ) -> BoxFuture<'_, Result<Vec<StoredEntry>, StoreError>>;
    /// Takes or keeps an audit sink for `claim.holder` and records how far it got, in one
    /// atomic step; `None` while another holder (replica) ships it.
    fn audit_sink(
        &self,
        claim: SinkClaim,
    ) -> BoxFuture<'_, Result<Option<SinkPosition>, StoreError>>;
}

/// Why a log read through the `Store` seam does not verify.
#[derive(Debug, thiserror::Error)]
pub enum StoreVerifyError {
    /// The store could not be read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The log is inconsistent; names the first bad entry or checkpoint.
    #[error("{0}")]
    Log(#[from] crate::audit::LogError),
}

/// Verifies a whole log through the `Store` seam, whatever the backend (this is how a
/// PostgreSQL ledger is verified offline): every checkpoint's signature under `vkey` and
/// its stored root, the hash chain and encoding of every entry, and the Merkle tree
/// recomputed from the entries against every checkpoint.
pub async fn verify_store(
    store: &dyn Store,
    vkey: &crate::checkpoint::VerifierKey,
) -> Result<crate::audit::LogReport, StoreVerifyError> {
    use crate::audit::{LogError, LogVerifier};
    let checkpoints = store.checkpoints().await?;
    for cp in &checkpoints {
        let signed = vkey.verify(&cp.note).map_err(|e| LogError::Checkpoint {
            size: cp.size,
            reason: e.0,
        })?;
        if signed.root.as_slice() != cp.root.as_slice() {
            return Err(LogError::Checkpoint {
                size: cp.size,
                reason: "stored root differs from the signed note".into(),
            }
            .into());
        }
    }
    let notes: Vec<(u64, String)> = checkpoints
        .iter()
        .map(|c| (c.size, c.cosigned_note()))
        .collect();
    let mut v = LogVerifier::new(&notes, vkey)?;
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 1000).await?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            v.push(e, None)?;
            after = e.seq;
        }
    }
    Ok(v.finish()?)
}
