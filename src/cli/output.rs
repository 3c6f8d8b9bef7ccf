//! Talking to the broker and printing what it answers: JSON lines on stdout, errors as text.

use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use serde_json::json;

pub use spiffe_broker::client::render::*;
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;

pub fn fail(msg: impl std::fmt::Display) -> CliError {
    CliError::Failed(msg.to_string())
}

/// Adds a person's session token (from `spiffe-broker login`) to every call, if any.
#[derive(Clone)]
pub struct SessionHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for SessionHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to the broker as a workload (its SVID) or as a signed-in person.
pub type BrokerChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, SessionHeader>;

/// Connects as the workload (`--svid-cert`, else the Workload API at
/// `SPIFFE_ENDPOINT_SOCKET`), or, with neither, as the person `spiffe-broker login` signed
/// in (no client certificate; the session token on every call).
pub async fn channel(conn: &ConnArgs) -> Result<BrokerChannel, CliError> {
    let workload_api = std::env::var_os("SPIFFE_ENDPOINT_SOCKET").is_some_and(|v| !v.is_empty());
    let (identity, header) = match (&conn.svid_cert, &conn.svid_key, &conn.bundle) {
        (Some(c), Some(k), Some(b)) => (ClientIdentity::from_files(c, k, b).map_err(fail)?, None),
        _ => match super::login::saved().filter(|_| !workload_api) {
            Some(s) => {
                let pem = s.bundle_pem.unwrap_or_default();
                let bundle = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| fail(format!("the saved session's trust bundle: {e}")))?;
                let mut value: tonic::metadata::MetadataValue<_> =
                    format!("{}{}", spiffe_broker::broker::SESSION_SCHEME, s.session)
                        .parse()
                        .map_err(|_| fail("the saved session token is malformed"))?;
                value.set_sensitive(true);
                (ClientIdentity::Anonymous { bundle }, Some(value))
            }
            None if !workload_api => {
                return Err(fail(
                    "no identity: SPIFFE_ENDPOINT_SOCKET is not set (a workload's SVID) and no one is signed in (a person: `spiffe-broker login --oidc`)",
                ))
            }
            None => (
                ClientIdentity::Workload(client::workload_source(None).await.map_err(fail)?),
                None,
            ),
        },
    };
    let ch = client::connect(&conn.broker, &conn.broker_id, &identity)
        .await
        .map_err(fail)?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        ch,
        SessionHeader(header),
    ))
}

pub fn explanation_json(e: &pb::ExplainDecisionResponse) -> serde_json::Value {
    json!({
        "decision": e.decision,
        "determining_policies": e.determining_policies,
        "reason": if e.reason.is_empty() { None } else { Some(&e.reason) },
        "violations": e.violations,
        "missing_approvals": (e.decision == "require_approval").then(|| json!({
            "group": e.approver_group,
            "required": e.approvals_required,
            "present": e.approvals_present,
            "eligible": e.eligible_approvers,
        })),
        "granted_scopes": e.granted_scopes,
        "granted_ttl": e.granted_ttl.as_ref().map(|d| spiffe_broker::clock::format_duration(Duration::from_secs(d.seconds.max(0) as u64))),
        "policy_hash": e.policy_hash,
    })
}
