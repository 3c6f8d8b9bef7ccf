//! Audit entries and the hash chain that makes the ledger tamper-evident.
//!
//! Each entry is a canonical JSON body (fixed field order, no secrets: credentials
//! appear only as SHA-256 fingerprints). Entry `n` is hashed as
//! `SHA-256("spiffe-broker/audit/v1\0" || n as u64 big-endian || hash(n-1) || body)`,
//! with 32 zero bytes before the first entry, so a changed, deleted, inserted or
//! reordered entry breaks the chain at that entry.

use serde::{Deserialize, Serialize};

use crate::domain::{Intent, Review};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A credential was issued.
    Issue,
    /// A lease was renewed (fresh credential, same lease).
    Renew,
    /// The holder gave a lease back.
    Release,
    /// An operator revoked leases.
    Revoke,
    /// The reaper marked leases expired.
    Expire,
    /// A request was refused by policy or validation.
    Deny,
    /// A caller failed authentication.
    AuthnFailure,
    /// An access request was opened (policy requires approval).
    AccessRequest,
    /// An approver reviewed an access request.
    Review,
    /// The policy set was reloaded (or a reload was refused).
    PolicyReload,
    /// An operator set or removed a lock.
    Lock,
    /// A backend confirmed revoking a lease's credential, or an admin force-removed it.
    BackendRevoke,
    /// Something the broker itself did (start-up).
    System,
    /// A person signed in to the console, or signed out.
    SignIn,
}

impl EventKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Issue => "issue",
            EventKind::Renew => "renew",
            EventKind::Release => "release",
            EventKind::Revoke => "revoke",
            EventKind::Expire => "expire",
            EventKind::Deny => "deny",
            EventKind::AuthnFailure => "authn_failure",
            EventKind::AccessRequest => "access_request",
            EventKind::Review => "review",
            EventKind::PolicyReload => "policy_reload",
            EventKind::Lock => "lock",
            EventKind::BackendRevoke => "backend_revoke",
            EventKind::System => "system",
            EventKind::SignIn => "sign_in",
        }
    }
}

/// The request as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// RPC name, e.g. `IssueCredential`.
    pub rpc: String,
    /// Profile asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Scopes asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// TTL asked for (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Stated intent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// Token exchange: the verified chain (subject, actors, the subject token's hash and,
    /// for a broker-issued subject token, its lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<crate::domain::Delegation>,
}

/// One audit entry body. Field order is the canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds.
    pub time_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Who asked: an authenticated SPIFFE ID, or a signed-in person's
    /// `oidc:<issuer>#<sub>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// A person caller's email and name as their provider gave them (recorded beside
    /// `caller`, never used to decide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_person: Option<crate::domain::PersonRecord>,
    /// For failed authentication only: the identity the caller claimed (unverified).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_id: Option<String>,
    /// `x509-svid` or `jwt-svid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
    /// SHA-256 of the caller's mTLS certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// The request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRecord>,
    /// `allow` or `deny`.
    pub decision: String,
    /// Why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rule that decided (the approver, until approvals exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Hash of the policy in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// Granted scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_scopes: Vec<String>,
    /// The lease concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// SHA-256 of the credential handed out (never the credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_sha256: Option<String>,
    /// Expiry of the credential handed out (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Leases changed by a bulk operation (revoke, expire).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affected_leases: Vec<String>,
    /// The access request concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_request_id: Option<String>,
    /// Every approval that counted toward this grant, with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Review>,
    /// Issued under break-glass (self-approved, reviewed afterwards).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// Access requests changed by a bulk operation (expiry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affected_requests: Vec<String>,
    /// The W3C trace id of the request that caused it (its spans, its log lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl AuditEvent {
    /// A bare event of `kind` at `time_ms` with `decision`.
    pub fn new(time_ms: i64, kind: EventKind, decision: &str) -> Self {
        Self {
            time_ms,
            kind,
            caller: None,
            caller_person: None,
            claimed_id: None,
            auth_method: None,
            cert_sha256: None,
            request: None,
            decision: decision.to_owned(),
            reason: None,
            rule: None,
            policy_hash: None,
            granted_scopes: Vec::new(),
            lease_id: None,
            credential_sha256: None,
            expires_at: None,
            affected_leases: Vec::new(),
            access_request_id: None,
            approvals: Vec::new(),
            break_glass: false,
            affected_requests: Vec::new(),
            trace_id: crate::traceparent::TraceContext::current().map(|t| t.trace_id_hex()),
        }
    }

    /// The canonical body.
    pub fn canonical(&self) -> String {
        // Serializing a struct of strings, integers and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The hash of entry `seq` given its predecessor's hash and its body.
pub fn entry_hash(seq: u64, prev: &[u8; 32], body: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"spiffe-broker/audit/v1\0");
    ctx.update(&seq.to_be_bytes());
    ctx.update(prev);
    ctx.update(body.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// An entry as stored.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// 1-based position.
    pub seq: u64,
    /// Stored kind column.
    pub kind: String,
    /// Stored lease id column.
    pub lease_id: Option<String>,
    /// Canonical body.
    pub body: String,
    /// Stored predecessor hash.
    pub prev_hash: Vec<u8>,
    /// Stored hash.
    pub hash: Vec<u8>,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {reason}")]
pub struct ChainError {
    /// The first bad entry.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Verifies entries in order; call [`ChainVerifier::push`] for each, then `finish`.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_seq: u64,
    prev: [u8; 32],
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev: [0; 32],
        }
    }
}

impl ChainVerifier {
    /// Checks the next entry.
    pub fn push(&mut self, e: &StoredEntry) -> Result<(), ChainError> {
        let bad = |reason: &str| ChainError {
            seq: e.seq,
            reason: reason.to_owned(),
        };
        if e.seq != self.expected_seq {
            return Err(ChainError {
                seq: self.expected_seq,
                reason: format!("missing (next stored entry is {})", e.seq),
            });
        }
        if e.prev_hash.as_slice() != self.prev {
            return Err(bad(
                "does not chain to its predecessor (entry removed, inserted or reordered)",
            ));
        }
        let body: AuditEvent = serde_json::from_str(&e.body)
            .map_err(|err| bad(&format!("body is not a valid entry: {err}")))?;
        if body.canonical() != e.body {
            return Err(bad("body is not in canonical form"));
        }
        if body.kind.as_str() != e.kind || body.lease_id != e.lease_id {
            return Err(bad("indexed columns disagree with the body"));
        }
        let h = entry_hash(e.seq, &self.prev, &e.body);
        if e.hash.as_slice() != h {
            return Err(bad("hash does not match its content (entry changed)"));
        }
        self.prev = h;
        self.expected_seq += 1;
        Ok(())
    }

    /// Entries verified so far, and the head hash.
    pub fn finish(self) -> (u64, [u8; 32]) {
        (self.expected_seq - 1, self.prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<StoredEntry> {
        let mut prev = [0u8; 32];
        (1..=n)
            .map(|seq| {
                let mut ev = AuditEvent::new(seq as i64, EventKind::Issue, "allow");
                ev.lease_id = Some(format!("{seq:032x}"));
                let body = ev.canonical();
                let hash = entry_hash(seq, &prev, &body);
                let e = StoredEntry {
                    seq,
                    kind: "issue".into(),
                    lease_id: ev.lease_id.clone(),
                    body,
                    prev_hash: prev.to_vec(),
                    hash: hash.to_vec(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    fn verify(entries: &[StoredEntry]) -> Result<u64, ChainError> {
        let mut v = ChainVerifier::default();
        for e in entries {
            v.push(e)?;
        }
        Ok(v.finish().0)
    }

    #[test]
    fn detects_change_delete_and_reorder() {
        let good = chain(5);
        assert_eq!(verify(&good), Ok(5));

        let mut changed = good.clone();
        changed[2].body = changed[2].body.replace("allow", "deny!");
        assert_eq!(verify(&changed).map_err(|e| e.seq), Err(3));

        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted).map_err(|e| e.seq), Err(2));

        let mut swapped = good.clone();
        swapped.swap(1, 2);
        swapped[1].seq = 2;
        swapped[2].seq = 3;
        assert_eq!(verify(&swapped).map_err(|e| e.seq), Err(2));
    }
}

/// Why the verifiable log does not verify: the first bad entry or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// An entry breaks the hash chain or its encoding.
    #[error("{0}")]
    Chain(ChainError),
    /// An entry's stored Merkle leaf is not the hash of its body.
    #[error("audit entry {seq}: Merkle leaf does not match the entry (entry or tree changed)")]
    Leaf {
        /// The entry.
        seq: u64,
    },
    /// A signed checkpoint disagrees with the entries, is forged, or covers entries
    /// that are gone.
    #[error("checkpoint at tree size {size}: {reason}")]
    Checkpoint {
        /// Its tree size.
        size: u64,
        /// What is wrong.
        reason: String,
    },
}

impl LogError {
    /// The first entry the error names, if it names one.
    pub fn first_bad_entry(&self) -> Option<u64> {
        match self {
            LogError::Chain(c) => Some(c.seq),
            LogError::Leaf { seq } => Some(*seq),
            LogError::Checkpoint { .. } => None,
        }
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReport {
    /// Entries verified.
    pub entries: u64,
    /// Hash-chain head.
    pub head_hash: String,
    /// Merkle root over all entries (hex).
    pub root: String,
    /// Signed checkpoints verified against the entries.
    pub checkpoints: usize,
    /// The largest verified checkpoint's tree size.
    pub latest_checkpoint: Option<u64>,
    /// The verified checkpoint notes as given (with any witness cosignatures), oldest
    /// first: what a [`WitnessPolicy`](crate::cosignature::WitnessPolicy) is checked on.
    pub notes: Vec<String>,
}

/// Verifies a log from scratch: entry encoding, hash chain, Merkle tree, and every
/// signed checkpoint (signature, and root against the entries it covers). Checkpoints
/// are consistent with each other because all of them are recomputed from one sequence
/// of entries; a removed tail shows as a checkpoint larger than the log.
pub struct LogVerifier {
    chain: ChainVerifier,
    tree: crate::merkle::Frontier,
    pending: std::collections::VecDeque<crate::checkpoint::Checkpoint>,
    notes: Vec<String>,
    verified: usize,
    latest: Option<u64>,
}

impl LogVerifier {
    /// Checks every checkpoint note's signature with `vkey` up front.
    pub fn new(
        notes: &[(u64, String)],
        vkey: &crate::checkpoint::VerifierKey,
    ) -> Result<Self, LogError> {
        let mut cps = Vec::new();
        let mut sorted: Vec<&(u64, String)> = notes.iter().collect();
        sorted.sort_by_key(|(size, _)| *size);
        for (size, note) in sorted.iter().copied() {
            let cp = vkey.verify(note).map_err(|e| LogError::Checkpoint {
                size: *size,
                reason: e.0,
            })?;
            if cp.size != *size {
                return Err(LogError::Checkpoint {
                    size: *size,
                    reason: format!("the signed note says size {}", cp.size),
                });
            }
            cps.push(cp);
        }
        Ok(Self {
            chain: ChainVerifier::default(),
            tree: crate::merkle::Frontier::default(),
            pending: cps.into(),
            notes: sorted.into_iter().map(|(_, n)| n.clone()).collect(),
            verified: 0,
            latest: None,
        })
    }

    /// Checks the next entry; `stored_leaf` is the leaf hash the store or export claims.
    pub fn push(&mut self, e: &StoredEntry, stored_leaf: Option<&[u8]>) -> Result<(), LogError> {
        self.chain.push(e).map_err(LogError::Chain)?;
        let leaf = crate::merkle::leaf_hash(e.body.as_bytes());
        if stored_leaf.is_some_and(|s| s != leaf) {
            return Err(LogError::Leaf { seq: e.seq });
        }
        let prev = self.latest.unwrap_or(0);
        self.tree.append(leaf);
        while let Some(cp) = self.pending.front() {
            if cp.size != self.tree.size() {
                break;
            }
            if cp.root != self.tree.root() {
                return Err(LogError::Checkpoint {
                    size: cp.size,
                    reason: format!(
                        "root differs from the entries: an entry in {}..={} was changed, removed or reordered",
                        prev + 1,
                        cp.size
                    ),
                });
            }
            self.verified += 1;
            self.latest = Some(cp.size);
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Ends the walk.
    pub fn finish(self) -> Result<LogReport, LogError> {
        if let Some(cp) = self.pending.front() {
            return Err(LogError::Checkpoint {
                size: cp.size,
                reason: format!(
                    "entries {}..={} are missing: the log was truncated after a checkpoint covered them",
                    self.tree.size() + 1,
                    cp.size
                ),
            });
        }
        let root = hex::encode(self.tree.root());
        let checkpoints = self.verified;
        let latest = self.latest;
        let (entries, head) = self.chain.finish();
        Ok(LogReport {
            entries,
            head_hash: hex::encode(head),
            root,
            checkpoints,
            latest_checkpoint: latest,
            notes: self.notes,
        })
    }
}
