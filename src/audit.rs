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
    /// Something the broker itself did (start-up).
    System,
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
            EventKind::System => "system",
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
}

/// One audit entry body. Field order is the canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds.
    pub time_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Who asked: an authenticated SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
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
}

impl AuditEvent {
    /// A bare event of `kind` at `time_ms` with `decision`.
    pub fn new(time_ms: i64, kind: EventKind, decision: &str) -> Self {
        Self {
            time_ms,
            kind,
            caller: None,
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
