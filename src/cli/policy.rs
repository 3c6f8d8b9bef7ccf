//! `policy check | explain | reload`.

use serde_json::json;

use spiffe_broker::clock::SystemClock;
use spiffe_broker::config::Config;
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;
use super::output::*;

pub async fn policy_command(command: PolicyCommand) -> Result<(), CliError> {
    match command {
        PolicyCommand::Check { config } => {
            let c = Config::load(&config).map_err(fail)?;
            let p = spiffe_broker::policy::CedarPolicy::load(&c)
                .map_err(|e| format!("policy refused:\n{e}"))?;
            use spiffe_broker::policy::Policy as _;
            out!(
                "{}",
                json!({"ok": true, "config": config, "schema": c.policy.schema, "files": c.policy.files, "policy_hash": p.hash()})
            );
            Ok(())
        }
        PolicyCommand::Explain {
            config: Some(config),
            spiffe_id,
            spec,
            ..
        } => {
            let c = Config::load(&config).map_err(fail)?;
            let p = spiffe_broker::policy::CedarPolicy::load(&c)
                .map_err(|e| format!("policy refused:\n{e}"))?;
            let id = spiffe_id.ok_or("--spiffe-id is required with --config")?;
            let id = spiffe::SpiffeId::new(&id).map_err(|e| format!("--spiffe-id: {e}"))?;
            let req = spiffe_broker::api::parse_issue_request(&spec.to_pb()?).map_err(fail)?;
            use spiffe_broker::clock::Clock as _;
            let ctx = spiffe_broker::policy::RequestContext {
                now: SystemClock.unix_seconds(),
                auth_method: spiffe_broker::authn::AuthMethod::X509Svid,
                break_glass: spec.break_glass,
                approvals: Vec::new(),
            };
            let e = spiffe_broker::broker::explain_with(&p, &id, &req, &ctx);
            out!(
                "{}",
                explanation_json(&spiffe_broker::api::explanation_to_pb(&e))
            );
            Ok(())
        }
        PolicyCommand::Explain {
            config: None,
            spec,
            conn,
            ..
        } => {
            let ch = channel(&conn).await?;
            let resp = pb::credential_broker_client::CredentialBrokerClient::new(ch)
                .explain_decision(pb::ExplainDecisionRequest {
                    request: Some(spec.to_pb()?),
                })
                .await?
                .into_inner();
            out!("{}", explanation_json(&resp));
            Ok(())
        }
        PolicyCommand::Reload { conn } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .reload_policy(pb::ReloadPolicyRequest {})
                .await?
                .into_inner();
            out!("{}", json!({"ok": true, "policy_hash": resp.policy_hash}));
            Ok(())
        }
    }
}
