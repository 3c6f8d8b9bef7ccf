//! How an issued credential is written out: the JSON the CLI prints, `export` lines, an AWS
//! `credential_process` answer, the bare token, a PEM chain. The CLI and `agent` share these.

use serde_json::json;

use crate::clock::rfc3339;
use crate::proto::v1 as pb;

/// The answer cannot be written in the asked form (e.g. `credential-process` for a JWT).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

impl From<&str> for RenderError {
    fn from(s: &str) -> Self {
        RenderError(s.to_owned())
    }
}

pub fn lease_json(l: &pb::Lease) -> serde_json::Value {
    let t = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
    json!({
        "lease_id": l.id,
        "profile": l.profile,
        "spiffe_id": l.spiffe_id,
        "scopes": l.scopes,
        "audience": l.audience,
        "state": pb::LeaseState::try_from(l.state).map(|s| s.as_str_name().trim_start_matches("LEASE_STATE_").to_lowercase()).unwrap_or_default(),
        "issued_at": t(&l.issued_at),
        "expires_at": t(&l.expires_at),
        "max_expires_at": t(&l.max_expires_at),
        "renewals": l.renewals,
        "credential_sha256": l.credential_sha256,
        "ended_at": t(&l.ended_at),
        "end_reason": if l.end_reason.is_empty() { None } else { Some(&l.end_reason) },
        "intent": l.intent.as_ref().map(intent_json),
        "backend": if l.backend.is_empty() { None } else { Some(&l.backend) },
        "backend_handle": if l.backend_handle.is_empty() { None } else { Some(&l.backend_handle) },
        "subject": if l.subject.is_empty() { None } else { Some(&l.subject) },
        "parent_lease_id": if l.parent_lease_id.is_empty() { None } else { Some(&l.parent_lease_id) },
    })
}

pub fn state_name(state: i32) -> String {
    pb::AccessRequestState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ACCESS_REQUEST_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

pub fn access_request_json(r: &pb::AccessRequest) -> serde_json::Value {
    let t = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "requester": r.requester,
        "profile": r.profile,
        "scopes": r.scopes,
        "intent": r.intent.as_ref().map(intent_json),
        "approver_group": r.approver_group,
        "threshold": r.threshold,
        "approvals": r.approvals,
        "created_at": t(&r.created_at),
        "expires_at": t(&r.expires_at),
        "break_glass": r.break_glass,
        "post_review": if r.post_review.is_empty() { None } else { Some(&r.post_review) },
        "lease_id": if r.lease_id.is_empty() { None } else { Some(&r.lease_id) },
        "reviews": r.reviews.iter().map(|v| json!({
            "reviewer": v.reviewer, "approve": v.approve, "reason": v.reason, "post_review": v.post_review,
        })).collect::<Vec<_>>(),
        "delegation": r.delegation.as_ref().map(delegation_json),
    })
}

/// A verified delegation chain: whom it is for and who acts, current actor first.
pub fn delegation_json(d: &pb::Delegation) -> serde_json::Value {
    json!({
        "subject": d.subject,
        "subject_type": d.subject_type,
        "actors": d.actors,
        "parent_lease_id": (!d.parent_lease_id.is_empty()).then_some(&d.parent_lease_id),
    })
}

pub fn intent_json(i: &pb::Intent) -> serde_json::Value {
    let mut v = json!({"action": i.action, "target": i.target});
    for (k, val) in [
        ("artifact_digest", &i.artifact_digest),
        ("ticket", &i.ticket),
        ("justification", &i.justification),
    ] {
        if !val.is_empty() {
            v[k] = json!(val);
        }
    }
    if !i.on_behalf_of.is_empty() {
        v["on_behalf_of"] = json!(i.on_behalf_of);
    }
    v
}

pub fn issued_json(
    c: Option<pb::Credential>,
    l: Option<pb::Lease>,
    r: Option<pb::AuditReceipt>,
    ar: Option<pb::AccessRequest>,
) -> serde_json::Value {
    let mut out = l.as_ref().map(lease_json).unwrap_or_else(|| json!({}));
    if let Some(c) = c {
        out["credential_expires_at_unix"] = json!(c.expires_at.as_ref().map(|t| t.seconds));
        if !c.backend_handle.is_empty() {
            out["backend_handle"] = json!(c.backend_handle);
        }
        match c.kind {
            Some(pb::credential::Kind::Token(t)) => {
                out["credential_kind"] = json!("token");
                out["token"] = json!(t.jwt);
                out["token_type"] = json!(t.token_type);
                out["key_id"] = json!(t.key_id);
            }
            Some(pb::credential::Kind::Certificate(cert)) => {
                out["credential_kind"] = json!("certificate");
                out["certificate_chain_pem"] = json!(cert.chain_pem);
                out["serial"] = json!(cert.serial);
            }
            Some(pb::credential::Kind::Secret(sec)) => {
                out["credential_kind"] = json!("secret");
                out["secret"] = json!(sec.data);
            }
            None => {}
        }
    }
    if let Some(l) = &l {
        out["expires_at_unix"] = json!(l.expires_at.as_ref().map(|t| t.seconds));
    }
    if let Some(r) = r {
        out["receipt"] = json!({"sequence": r.sequence, "entry_hash": r.entry_hash});
    }
    if let Some(ar) = ar {
        out["access_request"] = access_request_json(&ar);
    }
    out
}

/// `export NAME='value'` lines for a credential (`--output env`).
pub fn env_lines(c: Option<&pb::Credential>) -> Result<String, RenderError> {
    let c = c.ok_or("no credential in the answer")?;
    let quote = |v: &str| format!("'{}'", v.replace('\'', r"'\''"));
    let mut lines = Vec::new();
    match &c.kind {
        Some(pb::credential::Kind::Token(t)) => {
            lines.push(format!("export SPIFFE_BROKER_TOKEN={}", quote(&t.jwt)));
        }
        Some(pb::credential::Kind::Certificate(cert)) => {
            lines.push(format!(
                "export SPIFFE_BROKER_CERT_CHAIN={}",
                quote(&cert.chain_pem)
            ));
        }
        Some(pb::credential::Kind::Secret(sec)) => {
            for (k, v) in &sec.data {
                let name: String = k
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_alphanumeric() {
                            ch.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                lines.push(format!("export {name}={}", quote(v)));
            }
            if c.backend == "aws_sts" {
                if let Some(t) = &c.expires_at {
                    lines.push(format!(
                        "export AWS_CREDENTIAL_EXPIRATION={}",
                        quote(&crate::clock::rfc3339(t.seconds))
                    ));
                }
            }
        }
        None => return Err("the answer carries no credential".into()),
    }
    Ok(lines.join("\n"))
}

/// The credential as an AWS `credential_process` answer: the SDKs (boto3, the AWS CLI,
/// every AWS SDK) run `credential_process = spiffe-broker request … --output
/// credential-process` and refresh before `Expiration`.
pub fn credential_process_json(c: Option<&pb::Credential>) -> Result<String, RenderError> {
    let c = c.ok_or("no credential in the answer")?;
    let (Some(pb::credential::Kind::Secret(sec)), "aws_sts") = (&c.kind, c.backend.as_str()) else {
        return Err(
            "--output credential-process needs an AWS credential (an aws_sts profile)".into(),
        );
    };
    let field = |k: &str| {
        sec.data
            .get(k)
            .cloned()
            .ok_or_else(|| RenderError(format!("the AWS credential has no {k}")))
    };
    let expires = c
        .expires_at
        .as_ref()
        .ok_or("the AWS credential has no expiry")?;
    Ok(json!({
        "Version": 1,
        "AccessKeyId": field("aws_access_key_id")?,
        "SecretAccessKey": field("aws_secret_access_key")?,
        "SessionToken": field("aws_session_token")?,
        "Expiration": crate::clock::rfc3339(expires.seconds),
    })
    .to_string())
}

/// The bare token of a token credential (a JWT), for files that tools read as-is.
pub fn token_text(c: Option<&pb::Credential>) -> Result<String, RenderError> {
    match c.and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Token(t)) => Ok(t.jwt.clone()),
        _ => Err("format \"token\" needs a token credential (use json or env)".into()),
    }
}

/// The PEM certificate chain of a certificate credential (leaf first).
pub fn pem_chain(c: Option<&pb::Credential>) -> Result<String, RenderError> {
    match c.and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Certificate(cert)) => Ok(cert.chain_pem.clone()),
        _ => Err("format \"pem\" needs a certificate credential (an x509 profile)".into()),
    }
}
