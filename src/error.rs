//! The one place a domain error becomes a `tonic::Status`.
//!
//! Client-caused errors carry a message that names what was wrong with the request
//! (never a secret); server-caused errors get a fixed message and the cause goes to
//! the log. Authentication failures get one fixed message whatever the cause, so a
//! prober learns nothing about which check failed; the cause is logged and audited.

use tonic::{Code, Status};

use crate::authn::AuthnError;
use crate::domain::DomainError;
use crate::issuer::IssueError;
use crate::store::StoreError;

/// Everything the request path can refuse with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No valid SVID.
    #[error("unauthenticated: {0}")]
    Unauthenticated(#[from] AuthnError),
    /// Authenticated, but policy does not allow it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Malformed request or an over-ask.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named lease does not exist (or is not the caller's).
    #[error("not found: {0}")]
    NotFound(String),
    /// The lease is not in a state that allows the operation.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A position beyond what exists (a feed read past its tail).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A quota or rate limit was reached (the message names it).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The ledger could not durably record the operation.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// A credential backend (Vault, STS) was down, slow or failing.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A bug or a broken invariant.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DomainError> for BrokerError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Invalid(m) => BrokerError::InvalidArgument(m),
            DomainError::Internal(m) => BrokerError::Internal(m),
        }
    }
}

impl From<IssueError> for BrokerError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Refused(m) => BrokerError::FailedPrecondition(m),
            IssueError::Unavailable(m) => BrokerError::BackendUnavailable(m),
            IssueError::Internal(m) => BrokerError::Internal(m),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => BrokerError::Unavailable(m),
            StoreError::Corrupt(m) => BrokerError::Internal(format!("ledger corrupt: {m}")),
        }
    }
}

/// Fixed client message for authentication failures.
pub const UNAUTHENTICATED_MESSAGE: &str =
    "caller could not be authenticated: present a valid X.509-SVID over mTLS or a JWT-SVID bearer token for this broker";

/// Maps a domain error to the status a client sees, logging the cause.
pub fn to_status(err: BrokerError) -> Status {
    match err {
        BrokerError::Unauthenticated(cause) => {
            tracing::warn!(error = %cause, "authentication failed");
            Status::new(Code::Unauthenticated, UNAUTHENTICATED_MESSAGE)
        }
        BrokerError::PermissionDenied(m) => {
            tracing::warn!(reason = %m, "permission denied");
            Status::new(Code::PermissionDenied, m)
        }
        BrokerError::InvalidArgument(m) => {
            tracing::warn!(reason = %m, "invalid argument");
            Status::new(Code::InvalidArgument, m)
        }
        BrokerError::NotFound(m) => {
            tracing::warn!(reason = %m, "not found");
            Status::new(Code::NotFound, m)
        }
        BrokerError::FailedPrecondition(m) => {
            tracing::warn!(reason = %m, "failed precondition");
            Status::new(Code::FailedPrecondition, m)
        }
        BrokerError::OutOfRange(m) => {
            tracing::warn!(reason = %m, "out of range");
            Status::new(Code::OutOfRange, m)
        }
        BrokerError::ResourceExhausted(m) => {
            tracing::warn!(reason = %m, "limit reached");
            Status::new(Code::ResourceExhausted, m)
        }
        BrokerError::Unavailable(cause) => {
            tracing::error!(error = %cause, "ledger unavailable; nothing issued");
            Status::new(
                Code::Unavailable,
                "the broker could not durably record this operation; nothing was issued, retry later",
            )
        }
        BrokerError::BackendUnavailable(cause) => {
            tracing::error!(error = %cause, "credential backend unavailable; nothing issued");
            Status::new(
                Code::Unavailable,
                "the credential backend for this profile is unavailable; nothing was issued, retry later",
            )
        }
        BrokerError::Internal(cause) => {
            tracing::error!(error = %cause, "internal error");
            Status::new(Code::Internal, "internal error")
        }
    }
}
