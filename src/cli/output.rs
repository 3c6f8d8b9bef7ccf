//! Talking to the broker and printing what it answers: JSON lines on stdout, errors as text.

use std::time::Duration;

use serde_json::json;

pub use spiffe_broker::client::render::*;
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;

pub fn fail(msg: impl std::fmt::Display) -> CliError {
    CliError::Failed(msg.to_string())
}

pub async fn channel(conn: &ConnArgs) -> Result<tonic::transport::Channel, CliError> {
    let identity = match (&conn.svid_cert, &conn.svid_key, &conn.bundle) {
        (Some(c), Some(k), Some(b)) => ClientIdentity::from_files(c, k, b).map_err(fail)?,
        _ => ClientIdentity::Workload(client::workload_source(None).await.map_err(fail)?),
    };
    client::connect(&conn.broker, &conn.broker_id, &identity)
        .await
        .map_err(fail)
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
