//! What a command can fail with, kept typed (with its source) until `main` prints it and
//! picks the exit code: scripts tell a refusal from an outage from a typo.

use tonic::Code;

/// A command's failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The broker answered with an error status.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Broker(#[source] tonic::Status),
    /// Anything else (a file, the local Workload API, bad input), described.
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Broker(s)
    }
}

impl From<spiffe_broker::client::render::RenderError> for CliError {
    fn from(e: spiffe_broker::client::render::RenderError) -> Self {
        CliError::Failed(e.0)
    }
}

impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError::Failed(s)
    }
}

impl From<&str> for CliError {
    fn from(s: &str) -> Self {
        CliError::Failed(s.to_owned())
    }
}

impl CliError {
    /// The process exit code: 1 a failure, 3 refused (authentication or permission),
    /// 4 unavailable or overloaded (retry later), 5 bad input, 6 not found. (2 is clap's
    /// usage error.)
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Broker(s) => match s.code() {
                Code::Unauthenticated | Code::PermissionDenied => 3,
                Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => 4,
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => 5,
                Code::NotFound => 6,
                _ => 1,
            },
        }
    }
}
