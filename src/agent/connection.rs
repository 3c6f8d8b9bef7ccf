//! The helper's one connection to the broker, shared by its keepers: opened on first use,
//! reopened after a failure, and (with the Workload API) reopened when the helper's own
//! SVID rotates, so every call presents the current one.

use std::time::Duration;

use spiffe::X509Source;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::Code;

use crate::client::{self, ClientError, ClientIdentity, SvidChannel};
use crate::proto::v1 as pb;
use crate::proto::v1::credential_broker_client::CredentialBrokerClient;

/// Why a call did not succeed: worth trying again later, or refused.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The broker (or the Workload API) could not be reached or was overloaded.
    #[error("{0}")]
    Transient(String),
    /// The broker said no, or the helper cannot use what it got; with the reason.
    #[error("{0}")]
    Refused(String),
}

/// Whether trying again later may help.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        let text = format!("{:?}: {}", s.code(), s.message());
        if transient(s.code()) {
            CallError::Transient(text)
        } else {
            CallError::Refused(text)
        }
    }
}

impl From<ClientError> for CallError {
    fn from(e: ClientError) -> Self {
        if e.is_transient() {
            CallError::Transient(e.to_string())
        } else {
            CallError::Refused(e.to_string())
        }
    }
}

/// Where the helper's SVID comes from.
pub enum Identity {
    /// The Workload API (rotation followed).
    Workload(X509Source),
    /// Files (`svid_cert`, `svid_key`, `bundle`).
    Files(ClientIdentity),
}

enum Open {
    Svid(SvidChannel),
    Plain(Channel),
}

/// A broker connection for the keepers.
pub struct Connection {
    addr: String,
    broker_id: String,
    identity: Identity,
    open: Mutex<Option<Open>>,
}

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Connection {
    /// Not connected yet: the first call connects.
    pub fn new(addr: &str, broker_id: &str, identity: Identity) -> Self {
        Self {
            addr: addr.to_owned(),
            broker_id: broker_id.to_owned(),
            identity,
            open: Mutex::new(None),
        }
    }

    /// Connects now (the helper checks the broker's SPIFFE ID before it asks for anything).
    pub async fn check(&self) -> Result<(), CallError> {
        self.channel().await.map(|_| ())
    }

    async fn channel(&self) -> Result<Channel, CallError> {
        let mut open = self.open.lock().await;
        if open.is_none() {
            *open = Some(match &self.identity {
                Identity::Workload(src) => Open::Svid(
                    SvidChannel::connect(&self.addr, &self.broker_id, src.clone()).await?,
                ),
                Identity::Files(id) => {
                    Open::Plain(client::connect(&self.addr, &self.broker_id, id).await?)
                }
            });
        }
        match open.as_mut() {
            Some(Open::Svid(s)) => Ok(s.channel().await?),
            Some(Open::Plain(c)) => Ok(c.clone()),
            None => Err(CallError::Transient("not connected".into())),
        }
    }

    /// Runs one call; a transient failure drops the connection, so the next call opens a
    /// new one.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(CredentialBrokerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = CredentialBrokerClient::new(self.channel().await?);
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
            Ok(r) => r.map(|r| r.into_inner()).map_err(CallError::from),
            Err(_) => Err(CallError::Transient(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        };
        if matches!(result, Err(CallError::Transient(_))) {
            *self.open.lock().await = None;
        }
        result
    }

    /// `IssueCredential`.
    pub async fn issue(
        &self,
        req: pb::IssueCredentialRequest,
    ) -> Result<pb::IssueCredentialResponse, CallError> {
        self.call(|mut c| async move { c.issue_credential(req).await })
            .await
    }

    /// `RenewLease`.
    pub async fn renew(
        &self,
        lease: &str,
        ttl: Option<Duration>,
    ) -> Result<pb::RenewLeaseResponse, CallError> {
        let req = pb::RenewLeaseRequest {
            lease_id: lease.to_owned(),
            ttl: client::duration_pb(ttl),
        };
        self.call(|mut c| async move { c.renew_lease(req).await })
            .await
    }

    /// `ReleaseLease`.
    pub async fn release(&self, lease: &str) -> Result<(), CallError> {
        let req = pb::ReleaseLeaseRequest {
            lease_id: lease.to_owned(),
        };
        self.call(|mut c| async move { c.release_lease(req).await })
            .await
            .map(|_| ())
    }

    /// `GetAccessRequest`.
    pub async fn access_request(&self, id: &str) -> Result<pb::AccessRequest, CallError> {
        let req = pb::GetAccessRequestRequest { id: id.to_owned() };
        self.call(|mut c| async move { c.get_access_request(req).await })
            .await
    }
}
