//! Domain types. Everything from the network is parsed into these before any decision,
//! and none of them can hold an invalid value.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a value could not be made into a domain type. The edge maps `Invalid` to
/// INVALID_ARGUMENT and `Internal` to INTERNAL (`crate::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The input is not a valid value (the message names what and why).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The system could not make one (a random source failed).
    #[error("internal: {0}")]
    Internal(String),
}

mod access;
pub mod delegation;
mod principal;

pub use access::{
    AccessFilter, AccessRequest, AccessState, BoundGrant, RequestSpec, Review, Verdict,
};
pub use delegation::{Delegation, Party, PartyKind, SubjectTokenType};
pub use principal::{Person, PersonRecord, Principal, PERSON_ID_PREFIX};

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses, refusing anything outside the documented alphabet and length.
            pub fn parse(s: &str) -> Result<Self, DomainError> {
                let check: fn(&str) -> bool = $check;
                if s.is_empty() || s.len() > $max || !check(s) {
                    return Err(DomainError::Invalid(format!(
                        concat!("invalid ", $what, " {:?}: expected ", $rule),
                        truncate(s)
                    )));
                }
                Ok(Self(s.to_owned()))
            }

            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Shortens attacker-controlled text before it goes into an error message.
pub fn truncate(s: &str) -> String {
    if s.len() <= 64 {
        s.to_owned()
    } else {
        let mut end = 64;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

validated_string!(
    /// A profile name: lower-case letters, digits and `-`.
    ProfileName, "profile name", 64, "1..=64 characters of a-z, 0-9 and -",
    |s| s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
);
validated_string!(
    /// One scope, e.g. `job:submit` (printable ASCII, no spaces).
    Scope, "scope", 128, "1..=128 printable ASCII characters without spaces", printable
);
validated_string!(
    /// A lease id: 32 lower-case hex characters (48 bits of issuance time, 80 random bits).
    LeaseId, "lease id", 32, "exactly 32 lower-case hex characters",
    |s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
);

impl LeaseId {
    /// A fresh lease id for something created at `unix_ms`: the time in milliseconds
    /// (48 bits, big-endian) then 80 random bits. Still unguessable, and time-ordered, so
    /// the ledger's indexes on it grow at their end instead of touching a random page per
    /// insert (two fewer pages written per issuance at every commit).
    pub fn generate(unix_ms: i64) -> Result<Self, DomainError> {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&(unix_ms.max(0) as u64).to_be_bytes()[2..]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b[6..])
            .map_err(|_| DomainError::Internal("system random source failed".into()))?;
        Ok(Self(hex::encode(b)))
    }
}

/// What the caller says it will do, and to what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The operation, e.g. `submit-training`.
    pub action: String,
    /// What it acts on, e.g. `queue/a100`.
    pub target: String,
    /// Digest of the artifact concerned, e.g. `sha256:…` (64 to 128 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_digest: Option<String>,
    /// Change ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Why (mandatory for break-glass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// Who this is done for, nearest first (an AI agent's delegation chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_behalf_of: Vec<String>,
}

fn opt(field: &str, v: &str, max: usize, spaces: bool) -> Result<Option<String>, DomainError> {
    if v.is_empty() {
        return Ok(None);
    }
    let ok = v.len() <= max
        && v.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) || (spaces && b == b' '))
        && !v.starts_with(' ')
        && !v.ends_with(' ');
    if !ok {
        return Err(DomainError::Invalid(format!(
            "invalid intent {field} {:?}: expected at most {max} printable ASCII characters",
            truncate(v)
        )));
    }
    Ok(Some(v.to_owned()))
}

/// Most entries in an `on_behalf_of` chain.
pub const MAX_DELEGATION_CHAIN: usize = 8;

impl Intent {
    /// Parses both fields: printable ASCII (spaces allowed inside), bounded length.
    pub fn parse(action: &str, target: &str) -> Result<Self, DomainError> {
        fn ok(s: &str, max: usize) -> bool {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
                && !s.starts_with(' ')
                && !s.ends_with(' ')
        }
        if !ok(action, 128) {
            return Err(DomainError::Invalid(format!(
                "invalid intent action {:?}: expected 1..=128 printable ASCII characters",
                truncate(action)
            )));
        }
        if !ok(target, 256) {
            return Err(DomainError::Invalid(format!(
                "invalid intent target {:?}: expected 1..=256 printable ASCII characters",
                truncate(target)
            )));
        }
        Ok(Self {
            action: action.to_owned(),
            target: target.to_owned(),
            artifact_digest: None,
            ticket: None,
            justification: None,
            on_behalf_of: Vec::new(),
        })
    }

    /// Adds the optional details (empty strings mean absent).
    pub fn with_details(
        mut self,
        artifact_digest: &str,
        ticket: &str,
        justification: &str,
        on_behalf_of: &[String],
    ) -> Result<Self, DomainError> {
        if let Some(d) = opt("artifact_digest", artifact_digest, 200, false)? {
            let valid = d.split_once(':').is_some_and(|(alg, hex)| {
                matches!(alg, "sha256" | "sha384" | "sha512")
                    && (64..=128).contains(&hex.len())
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
            if !valid {
                return Err(DomainError::Invalid(format!(
                    "invalid intent artifact_digest {:?}: expected sha256:<hex>",
                    truncate(&d)
                )));
            }
            self.artifact_digest = Some(d);
        }
        self.ticket = opt("ticket", ticket, 64, false)?;
        self.justification = opt("justification", justification, 512, true)?;
        if on_behalf_of.len() > MAX_DELEGATION_CHAIN {
            return Err(DomainError::Invalid(format!(
                "intent on_behalf_of: at most {MAX_DELEGATION_CHAIN} entries"
            )));
        }
        self.on_behalf_of = on_behalf_of
            .iter()
            .map(|o| {
                opt("on_behalf_of", o, 256, false)?
                    .ok_or_else(|| DomainError::Invalid("intent on_behalf_of: empty entry".into()))
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }
}

/// The largest TTL anyone may ask for, whatever a profile says (a sanity bound on input).
pub const MAX_REQUESTABLE_TTL: Duration = Duration::from_secs(7 * 86_400);

/// A parsed request for a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRequest {
    /// Which profile.
    pub profile: ProfileName,
    /// Requested scopes, de-duplicated and ordered. Empty means the profile default.
    pub scopes: BTreeSet<Scope>,
    /// Requested TTL; `None` means the profile default.
    pub ttl: Option<Duration>,
    /// Stated intent.
    pub intent: Option<Intent>,
    /// Set only by the broker, after verifying a token exchange's subject token: the
    /// chain the caller acts within (policy, separation of duties and the ledger see it).
    pub delegation: Option<Delegation>,
}

/// Parses a requested TTL: positive, whole seconds, bounded.
pub fn parse_ttl(secs: i64, nanos: i32) -> Result<Duration, DomainError> {
    if secs <= 0 || nanos != 0 || secs as u64 > MAX_REQUESTABLE_TTL.as_secs() {
        return Err(DomainError::Invalid(format!(
            "invalid ttl: expected whole seconds between 1s and {}s",
            MAX_REQUESTABLE_TTL.as_secs()
        )));
    }
    Ok(Duration::from_secs(secs as u64))
}

/// Where a lease is in its life. Every state but `Active` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Issued and usable.
    Active,
    /// Given back by its holder.
    Released,
    /// Revoked by an operator.
    Revoked,
    /// TTL ran out.
    Expired,
}

impl LeaseState {
    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Released => "released",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "active" => LeaseState::Active,
            "released" => LeaseState::Released,
            "revoked" => LeaseState::Revoked,
            "expired" => LeaseState::Expired,
            _ => return None,
        })
    }
}

/// A lease: the broker's record of one credential's life. Never holds the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Lease id; the token's `jti`.
    pub id: LeaseId,
    /// Profile it was issued under.
    pub profile: ProfileName,
    /// Holder's SPIFFE ID.
    pub spiffe_id: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Credential audience.
    pub audience: String,
    /// Lifecycle state.
    pub state: LeaseState,
    /// First issuance (Unix seconds).
    pub issued_at: i64,
    /// Current expiry (Unix seconds).
    pub expires_at: i64,
    /// Renewals never go beyond this (Unix seconds).
    pub max_expires_at: i64,
    /// Hex SHA-256 of the current credential.
    pub credential_sha256: String,
    /// Renewals so far.
    pub renewals: u32,
    /// When it left `Active` (Unix seconds).
    pub ended_at: Option<i64>,
    /// Why it left `Active`.
    pub end_reason: Option<String>,
    /// The intent stated at issuance.
    pub intent: Option<Intent>,
    /// The backend's own handle for the credential, if it keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendHandle>,
    /// For a credential issued by token exchange: the lease of the broker-issued subject
    /// token it was derived from (revoking that one revokes this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<LeaseId>,
    /// For a credential issued by token exchange: the subject it is for (its `sub`),
    /// which differs from the holder, the actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// What a backend knows the credential by (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHandle {
    /// The profile kind at issuance (`vault`, `x509`, `aws_sts` …).
    pub kind: String,
    /// Vault lease id, certificate serial, STS assumed-role id.
    pub handle: String,
    /// Whether ending the lease must also revoke it in the backend.
    pub revocable: bool,
}

/// A backend revocation the broker still owes (or has done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRevocation {
    /// The broker lease.
    pub lease_id: String,
    /// Backend kind.
    pub kind: String,
    /// The backend's handle.
    pub handle: String,
    /// When the lease ended (Unix seconds).
    pub queued_at: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Next try (Unix seconds).
    pub next_attempt_at: i64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Which leases a revocation covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeSelector {
    /// One lease.
    Lease(LeaseId),
    /// Every active lease of one SPIFFE ID.
    SpiffeId(String),
    /// Every active lease of the SPIFFE IDs under a path prefix (ending in `/`).
    Prefix(String),
    /// Every active lease of a profile.
    Profile(ProfileName),
    /// Every active lease issued on an access request this approver approved.
    Approver(String),
    /// The lease issued on one access request.
    AccessRequest(String),
    /// Every active lease (only together with an issued-before cut-off).
    All,
}

impl RevokeSelector {
    /// The revocation rule this selector leaves behind: identity, prefix and profile
    /// revocations also bar issuing covered credentials requested before the revocation.
    pub fn rule(&self) -> Option<(&'static str, String)> {
        match self {
            RevokeSelector::SpiffeId(id) => Some(("spiffe_id", id.clone())),
            RevokeSelector::Prefix(p) => Some(("prefix", p.clone())),
            RevokeSelector::Profile(p) => Some(("profile", p.to_string())),
            RevokeSelector::All => Some(("all", String::new())),
            RevokeSelector::Lease(_)
            | RevokeSelector::Approver(_)
            | RevokeSelector::AccessRequest(_) => None,
        }
    }
}

/// What an operator lock applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// Lock id (32 hex).
    pub id: String,
    /// `spiffe_id`, `prefix` or `profile`.
    pub kind: String,
    /// The SPIFFE ID, path prefix or profile name.
    pub value: String,
    /// No issuance until then (Unix seconds).
    pub until: i64,
    /// Why.
    pub reason: String,
    /// Who set it.
    pub created_by: String,
    /// When (Unix seconds).
    pub created_at: i64,
}

/// One event of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEvent {
    /// Position in the feed (1-based, gap-free).
    pub seq: u64,
    /// The revoked lease (the token's `jti`).
    pub lease_id: String,
    /// Its holder.
    pub spiffe_id: String,
    /// Its profile.
    pub profile: String,
    /// When the credential would have expired anyway: consumers may forget it then.
    pub expires_at: i64,
    /// When it was revoked.
    pub revoked_at: i64,
    /// Why.
    pub reason: String,
    /// Hex `SHA-256(previous chain hash ‖ canonical event)`.
    pub chain_hash: String,
    /// Hex serial of the revoked certificate (x509 leases), for TLS relying parties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
}

impl RevocationEvent {
    /// The canonical encoding hashed into the feed chain (everything but the chain hash;
    /// `certificate_serial` only when there is one, so older events hash as they did).
    pub fn canonical(&self) -> String {
        let mut v = serde_json::json!({
            "seq": self.seq,
            "lease_id": self.lease_id,
            "spiffe_id": self.spiffe_id,
            "profile": self.profile,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "reason": self.reason,
        });
        if let Some(s) = &self.certificate_serial {
            v["certificate_serial"] = serde_json::json!(s);
        }
        v.to_string()
    }

    /// The chain hash of this event after `prev`.
    pub fn chain(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"spiffe-broker/revocations/v1\0");
        ctx.update(prev);
        ctx.update(self.canonical().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// Filter for listing leases.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    /// Only this holder.
    pub spiffe_id: Option<String>,
    /// Only this state.
    pub state: Option<LeaseState>,
    /// Only this lease.
    pub lease_id: Option<String>,
    /// Only leases derived from this one by token exchange, transitively (its tree).
    pub derived_from: Option<String>,
    /// Page size (1..=1000).
    pub limit: u32,
    /// Only leases issued strictly before this cursor `(issued_at, id)`.
    pub before: Option<(i64, String)>,
}

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// Who made the request.
    pub caller: String,
    /// Hex SHA-256 of the idempotency key.
    pub key_hash: String,
    /// Digest of the request it was used for.
    pub digest: String,
    /// The lease issued.
    pub lease_id: String,
    /// Nonce ‖ sealed credential.
    pub sealed: Vec<u8>,
    /// When the record may be dropped (the credential's expiry).
    pub expires_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_validated() {
        assert!(ProfileName::parse("gpu-scheduler-submit").is_ok());
        assert!(ProfileName::parse("GPU").is_err());
        assert!(ProfileName::parse("").is_err());
        assert!(Scope::parse("job:submit").is_ok());
        assert!(Scope::parse("job submit").is_err());
        assert!(LeaseId::parse("not-hex").is_err());
        let id = LeaseId::generate(0).expect("random");
        assert_eq!(LeaseId::parse(id.as_str()).expect("parse"), id);
        assert!(Intent::parse("submit", "queue/a100").is_ok());
        assert!(Intent::parse("", "queue/a100").is_err());
        assert!(Intent::parse("submit", "bad\nnewline").is_err());
    }

    #[test]
    fn ttl_bounds() {
        assert!(parse_ttl(600, 0).is_ok());
        assert!(parse_ttl(0, 0).is_err());
        assert!(parse_ttl(-5, 0).is_err());
        assert!(parse_ttl(600, 5).is_err());
        assert!(parse_ttl(8 * 86_400, 0).is_err());
    }
}
