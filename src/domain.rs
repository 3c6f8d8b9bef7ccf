//! Domain types. Everything from the network is parsed into these before any decision,
//! and none of them can hold an invalid value.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses, refusing anything outside the documented alphabet and length.
            pub fn parse(s: &str) -> Result<Self, BrokerError> {
                let check: fn(&str) -> bool = $check;
                if s.is_empty() || s.len() > $max || !check(s) {
                    return Err(BrokerError::InvalidArgument(format!(
                        concat!("invalid ", $what, " {:?}: expected 1..={} characters of the allowed alphabet"),
                        truncate(s), $max
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
    ProfileName, "profile name", 64,
    |s| s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
);
validated_string!(
    /// One scope, e.g. `job:submit` (printable ASCII, no spaces).
    Scope, "scope", 128, printable
);
validated_string!(
    /// A lease id: 32 lower-case hex characters (128 random bits).
    LeaseId, "lease id", 32,
    |s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
);

impl LeaseId {
    /// A fresh random lease id.
    pub fn generate() -> Result<Self, BrokerError> {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| BrokerError::Internal("system random source failed".into()))?;
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
}

impl Intent {
    /// Parses both fields: printable ASCII (spaces allowed inside), bounded length.
    pub fn parse(action: &str, target: &str) -> Result<Self, BrokerError> {
        fn ok(s: &str, max: usize) -> bool {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
                && !s.starts_with(' ')
                && !s.ends_with(' ')
        }
        if !ok(action, 128) {
            return Err(BrokerError::InvalidArgument(format!(
                "invalid intent action {:?}: expected 1..=128 printable ASCII characters",
                truncate(action)
            )));
        }
        if !ok(target, 256) {
            return Err(BrokerError::InvalidArgument(format!(
                "invalid intent target {:?}: expected 1..=256 printable ASCII characters",
                truncate(target)
            )));
        }
        Ok(Self {
            action: action.to_owned(),
            target: target.to_owned(),
        })
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
}

/// Parses a requested TTL: positive, whole seconds, bounded.
pub fn parse_ttl(secs: i64, nanos: i32) -> Result<Duration, BrokerError> {
    if secs <= 0 || nanos != 0 || secs as u64 > MAX_REQUESTABLE_TTL.as_secs() {
        return Err(BrokerError::InvalidArgument(format!(
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
}

/// Which leases a revocation covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeSelector {
    /// One lease.
    Lease(LeaseId),
    /// Every active lease of one SPIFFE ID.
    SpiffeId(String),
}

/// Filter for listing leases.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    /// Only this holder.
    pub spiffe_id: Option<String>,
    /// Only this state.
    pub state: Option<LeaseState>,
    /// Page size (1..=1000).
    pub limit: u32,
    /// Only leases issued strictly before this cursor `(issued_at, id)`.
    pub before: Option<(i64, String)>,
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
        let id = LeaseId::generate().expect("random");
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
