//! The `Issuer` seam: one implementation per backend. Issuance is build → sign →
//! validate: the template is a pure function of the grant and lease terms, and what was
//! minted is checked against it before it leaves.

mod jwt;

use std::fmt;

use zeroize::Zeroizing;

use crate::config::CredentialKind;
use crate::domain::LeaseId;
use crate::policy::Grant;

pub use jwt::{JwtClaims, JwtIssuer};

/// Secret text: zeroized on drop, redacted in `Debug`, never `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
    /// The secret itself: only for handing it to the requester.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Hex SHA-256, the only form the ledger and logs ever see.
    pub fn sha256_hex(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes()).as_ref())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Terms of the lease a credential is minted for.
#[derive(Debug, Clone)]
pub struct LeaseTerms {
    /// Lease id (the token's `jti`).
    pub lease_id: LeaseId,
    /// Holder's SPIFFE ID (the token's `sub`).
    pub subject: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// SHA-256 of the holder's mTLS certificate, for sender-constrained tokens.
    pub cnf_x5t_s256: Option<[u8; 32]>,
}

/// A minted credential.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A signed JWT.
    Jwt {
        /// The compact JWS.
        token: Secret,
        /// Signing key id.
        key_id: String,
    },
}

impl Credential {
    /// Hex SHA-256 of the credential (what the ledger records).
    pub fn sha256_hex(&self) -> String {
        match self {
            Credential::Jwt { token, .. } => token.sha256_hex(),
        }
    }
}

/// Why a backend could not issue.
#[derive(Debug, thiserror::Error)]
#[error("issuer: {0}")]
pub struct IssueError(pub String);

/// A credential backend.
///
/// Contract: `issue` returns a credential that exactly reflects the grant and terms
/// (scopes, audience, expiry, subject) and has been validated after minting; it never
/// widens the grant and never logs the credential.
pub trait Issuer: Send + Sync + 'static {
    /// The profile kind this backend serves.
    fn kind(&self) -> CredentialKind;
    /// Mints a credential.
    fn issue(&self, grant: &Grant, terms: &LeaseTerms) -> Result<Credential, IssueError>;
}
