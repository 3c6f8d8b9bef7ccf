//! `request`, `exchange`, `renew`, `release`: what a workload runs.

use std::time::Duration;

use serde_json::json;

use spiffe_broker::domain::delegation::{ACCESS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE};
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;
use super::output::*;

pub async fn request(a: RequestArgs) -> Result<(), CliError> {
    let mut req = a.spec.to_pb()?;
    req.access_request_id = a.access_request.clone().unwrap_or_default();
    req.idempotency_key = a.idempotency_key.clone().unwrap_or_default();
    req.may_act = a.may_act.clone().unwrap_or_default();
    if let Some(path) = &a.csr {
        req.csr = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let ch = channel(&a.conn).await?;
    let mut client = pb::credential_broker_client::CredentialBrokerClient::new(ch);
    let resp = client.issue_credential(req.clone()).await?.into_inner();
    let Some(pending) = resp
        .access_request
        .clone()
        .filter(|_| resp.credential.is_none())
    else {
        return print_issued(a.output, resp);
    };
    if !a.wait {
        out!(
            "{}",
            json!({"status": "pending", "access_request": access_request_json(&pending)})
        );
        return Ok(());
    }
    eprintln!(
        "waiting for {} approval(s) from {} on access request {} …",
        pending.threshold, pending.approver_group, pending.id
    );
    let mut stream = client
        .watch_access_request(pb::GetAccessRequestRequest {
            id: pending.id.clone(),
        })
        .await?
        .into_inner();
    let mut last = pending;
    while let Some(next) = stream.message().await? {
        last = next;
        if last.state != pb::AccessRequestState::Pending as i32 {
            break;
        }
    }
    if last.state != pb::AccessRequestState::Approved as i32 {
        return Err(format!(
            "access request {} ended {}",
            last.id,
            state_name(last.state)
        )
        .into());
    }
    req.access_request_id = last.id.clone();
    let resp = client.issue_credential(req).await?.into_inner();
    print_issued(a.output, resp)
}

/// Token exchange: the subject token is read from a file (or stdin), never argv.
pub async fn exchange(a: ExchangeArgs) -> Result<(), CliError> {
    let token = if a.subject_token.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&a.subject_token)
            .map_err(|e| format!("{}: {e}", a.subject_token.display()))?
    };
    let spec = a.spec.to_pb()?;
    let req = pb::ExchangeTokenRequest {
        subject_token: token.trim().to_owned(),
        subject_token_type: match a.subject_token_type {
            SubjectTokenTypeArg::AccessToken => ACCESS_TOKEN_TYPE,
            SubjectTokenTypeArg::Jwt => JWT_TOKEN_TYPE,
            SubjectTokenTypeArg::IdToken => ID_TOKEN_TYPE,
        }
        .to_owned(),
        profile: spec.profile,
        scopes: spec.scopes,
        ttl: spec.ttl,
        intent: spec.intent,
        access_request_id: a.access_request.unwrap_or_default(),
    };
    let ch = channel(&a.conn).await?;
    let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
        .exchange_token(req)
        .await?
        .into_inner();
    let chain = resp.delegation.as_ref().map(delegation_json);
    let Some(pending) = resp
        .access_request
        .clone()
        .filter(|_| resp.credential.is_none())
    else {
        let mut v = issued_json(
            resp.credential,
            resp.lease,
            resp.receipt,
            resp.access_request,
        );
        v["issued_token_type"] = json!(resp.issued_token_type);
        v["delegation"] = json!(chain);
        out!("{v}");
        return Ok(());
    };
    out!(
        "{}",
        json!({"status": "pending", "access_request": access_request_json(&pending), "delegation": chain})
    );
    Ok(())
}

/// Prints an issued credential the way `--output` asks.
fn print_issued(output: RequestOutput, resp: pb::IssueCredentialResponse) -> Result<(), CliError> {
    let text = match output {
        RequestOutput::Env => env_lines(resp.credential.as_ref())?,
        RequestOutput::CredentialProcess => credential_process_json(resp.credential.as_ref())?,
        RequestOutput::Json => issued_json(
            resp.credential,
            resp.lease,
            resp.receipt,
            resp.access_request,
        )
        .to_string(),
    };
    out!("{text}");
    Ok(())
}

pub async fn renew(lease: String, ttl: Option<Duration>, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease,
            ttl: duration_pb(ttl),
        })
        .await?
        .into_inner();
    out!(
        "{}",
        issued_json(resp.credential, resp.lease, resp.receipt, None)
    );
    Ok(())
}

pub async fn release(lease: String, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
        .release_lease(pb::ReleaseLeaseRequest { lease_id: lease })
        .await?
        .into_inner();
    out!("{}", issued_json(None, resp.lease, resp.receipt, None));
    Ok(())
}
