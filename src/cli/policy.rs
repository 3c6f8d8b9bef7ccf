//! `policy check | explain | replay | reload`.

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
                person_approvals_group: None,
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
        PolicyCommand::Replay {
            config,
            candidate,
            since,
            postgres_url,
            fail_on_widening,
        } => replay(&config, &candidate, since, postgres_url, fail_on_widening).await,
        PolicyCommand::Reload {
            force,
            reason,
            conn,
        } => {
            let ch = channel(&conn).await?;
            let resp = pb::admin_client::AdminClient::new(ch)
                .reload_policy(pb::ReloadPolicyRequest {
                    force,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            out!("{}", json!({"ok": true, "policy_hash": resp.policy_hash}));
            Ok(())
        }
    }
}

/// `policy replay`: the ledger's credential requests under the policy in force and the
/// candidate in `dir` (its `.cedar` files; its `schema.cedarschema` if present).
async fn replay(
    config: &std::path::Path,
    dir: &std::path::Path,
    since: Option<String>,
    postgres_url: Option<String>,
    fail_on_widening: bool,
) -> Result<(), CliError> {
    use spiffe_broker::policy::CedarPolicy;
    let c = Config::load(config).map_err(fail)?;
    let current = CedarPolicy::load(&c).map_err(|e| format!("policy in force refused:\n{e}"))?;
    let mut cand = c.clone();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .cedar files", dir.display()).into());
    }
    cand.policy.files = files;
    if dir.join("schema.cedarschema").exists() {
        cand.policy.schema = dir.join("schema.cedarschema");
    }
    let candidate =
        CedarPolicy::load(&cand).map_err(|e| format!("candidate policy refused:\n{e}"))?;
    let since_ms = match since {
        Some(t) => parse_instant(&t, "--since")? * 1000,
        None => i64::MIN,
    };
    let store = super::audit::open_ledger(&c.state_dir, postgres_url).await?;
    let mut replayer = spiffe_broker::policy::replay::Replayer::new(&current, &candidate);
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 1000).await.map_err(fail)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for s in page {
            let e: spiffe_broker::audit::AuditEvent = serde_json::from_str(&s.body)
                .map_err(|e| format!("ledger entry {}: {e}", s.seq))?;
            if e.time_ms >= since_ms {
                replayer.add(s.seq, &e);
            }
        }
    }
    let report = replayer.finish();
    use spiffe_broker::policy::Policy as _;
    out!(
        "{}",
        json!({
            "replayed": report.replayed,
            "policy_in_force": current.hash(),
            "candidate": candidate.hash(),
            "widens": report.widens(),
            "changes": report.changes,
        })
    );
    if fail_on_widening && report.widens() {
        return Err("the candidate gives more than the policy in force (see \"changes\")".into());
    }
    Ok(())
}
