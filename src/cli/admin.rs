//! `revoke`, `locks`, `leases`, `inventory`: what a platform admin runs.

use serde_json::json;

use spiffe_broker::clock::{rfc3339, SystemClock};
use spiffe_broker::proto::v1 as pb;

use super::args::*;
use super::error::CliError;
use super::listing::ListOutput;
use super::output::*;

pub async fn backend_revocations(
    conn: &ConnArgs,
    stuck: bool,
    output: ListOutput,
) -> Result<(), CliError> {
    let ch = channel(conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_backend_revocations(pb::ListBackendRevocationsRequest {
            min_attempts: if stuck {
                spiffe_broker::broker::STUCK_AFTER_ATTEMPTS
            } else {
                0
            },
            page_size: 1000,
        })
        .await?
        .into_inner();
    let rows: Vec<_> = resp
        .revocations
        .iter()
        .map(|r| {
            json!({
                "lease_id": r.lease_id, "backend": r.backend, "backend_handle": r.backend_handle,
                "queued_at_unix": r.queued_at.as_ref().map(|t| t.seconds),
                "attempts": r.attempts,
                "next_attempt_at_unix": r.next_attempt_at.as_ref().map(|t| t.seconds),
                "last_error": r.last_error,
            })
        })
        .collect();
    output.print(
        &rows,
        &[
            ("LEASE", "/lease_id"),
            ("BACKEND", "/backend"),
            ("ATTEMPTS", "/attempts"),
            ("LAST ERROR", "/last_error"),
        ],
    );
    Ok(())
}

pub async fn revoke(a: RevokeArgs) -> Result<(), CliError> {
    use pb::revoke_request::Selector;
    let selector = if let Some(l) = a.lease {
        Selector::LeaseId(l)
    } else if let Some(s) = a.spiffe_id {
        Selector::SpiffeId(s)
    } else if let Some(p) = a.prefix {
        Selector::SpiffeIdPrefix(p)
    } else if let Some(p) = a.profile {
        Selector::Profile(p)
    } else if let Some(ap) = a.approver {
        Selector::Approver(ap)
    } else if let Some(r) = a.access_request {
        Selector::AccessRequestId(r)
    } else if a.all {
        Selector::All(true)
    } else {
        return Err("a selector is required (see --help)".into());
    };
    let issued_before = a
        .issued_before
        .as_deref()
        .map(|t| parse_instant(t, "--issued-before"))
        .transpose()?;
    let ch = channel(&a.conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .revoke(pb::RevokeRequest {
            selector: Some(selector),
            issued_before: issued_before
                .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            dry_run: a.dry_run,
            reason: a.reason,
        })
        .await?
        .into_inner();
    out!(
        "{}",
        json!({
            "dry_run": resp.dry_run,
            (if resp.dry_run { "would_revoke" } else { "revoked" }): resp.revoked_lease_ids,
            "receipt": resp.receipt.map(|r| json!({"sequence": r.sequence, "entry_hash": r.entry_hash})),
        })
    );
    Ok(())
}

pub async fn locks(
    command: Option<LockCommand>,
    output: ListOutput,
    conn: ConnArgs,
) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let mut admin = pb::admin_client::AdminClient::new(ch);
    let lock_json = |l: &pb::Lock| {
        json!({
            "id": l.id, "kind": l.kind, "value": l.value,
            "until": l.until.map(|t| rfc3339(t.seconds)), "reason": l.reason,
            "created_by": l.created_by, "created_at": l.created_at.map(|t| rfc3339(t.seconds)),
        })
    };
    match command {
        None | Some(LockCommand::List) => {
            let resp = admin
                .list_locks(pb::ListLocksRequest {})
                .await?
                .into_inner();
            let rows: Vec<_> = resp.locks.iter().map(lock_json).collect();
            output.print(
                &rows,
                &[
                    ("ID", "/id"),
                    ("KIND", "/kind"),
                    ("VALUE", "/value"),
                    ("UNTIL", "/until"),
                    ("BY", "/created_by"),
                    ("REASON", "/reason"),
                ],
            );
        }
        Some(LockCommand::Add {
            kind,
            value,
            for_,
            reason,
        }) => {
            use spiffe_broker::clock::Clock as _;
            let until = SystemClock.unix_seconds() + for_.as_secs() as i64;
            let l = admin
                .create_lock(pb::CreateLockRequest {
                    kind: kind.as_str().to_owned(),
                    value,
                    until: Some(prost_types::Timestamp {
                        seconds: until,
                        nanos: 0,
                    }),
                    reason,
                })
                .await?
                .into_inner();
            out!("{}", lock_json(&l));
        }
        Some(LockCommand::Remove { id, reason }) => {
            admin
                .delete_lock(pb::DeleteLockRequest {
                    id: id.clone(),
                    reason,
                })
                .await?;
            out!("{}", json!({"removed": id}));
        }
    }
    Ok(())
}

pub async fn lease_show(id: String, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_leases(pb::ListLeasesRequest {
            lease_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let lease = resp
        .leases
        .first()
        .ok_or_else(|| format!("no lease {id}"))?;
    out!(
        "{}",
        serde_json::to_string_pretty(&lease_json(lease)).map_err(fail)?
    );
    Ok(())
}

pub async fn force_remove(id: String, reason: String, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .force_remove_backend_revocation(pb::ForceRemoveBackendRevocationRequest {
            lease_id: id.clone(),
            reason,
        })
        .await?
        .into_inner();
    out!(
        "{}",
        json!({"ok": true, "lease_id": id, "receipt": resp.receipt.map(|r| json!({"sequence": r.sequence, "entry_hash": r.entry_hash}))})
    );
    Ok(())
}

pub async fn leases(
    spiffe_id: Option<String>,
    state: Option<LeaseStateArg>,
    limit: u32,
    output: ListOutput,
    conn: ConnArgs,
) -> Result<(), CliError> {
    let state = match state {
        None => pb::LeaseState::Unspecified,
        Some(LeaseStateArg::Active) => pb::LeaseState::Active,
        Some(LeaseStateArg::Released) => pb::LeaseState::Released,
        Some(LeaseStateArg::Revoked) => pb::LeaseState::Revoked,
        Some(LeaseStateArg::Expired) => pb::LeaseState::Expired,
    };
    let ch = channel(&conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_leases(pb::ListLeasesRequest {
            spiffe_id: spiffe_id.unwrap_or_default(),
            state: state as i32,
            page_size: limit,
            page_token: String::new(),
            lease_id: String::new(),
            derived_from: String::new(),
        })
        .await?
        .into_inner();
    let rows: Vec<_> = resp.leases.iter().map(lease_json).collect();
    output.print(
        &rows,
        &[
            ("LEASE", "/lease_id"),
            ("STATE", "/state"),
            ("PROFILE", "/profile"),
            ("SPIFFE ID", "/spiffe_id"),
            ("SCOPES", "/scopes"),
            ("EXPIRES", "/expires_at"),
        ],
    );
    Ok(())
}

/// `leases --tree LEASE`: the lease and everything derived from it by token exchange,
/// each under its parent (the table indents by depth).
pub async fn lease_tree(root: String, output: ListOutput, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_leases(pb::ListLeasesRequest {
            derived_from: root.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if resp.leases.is_empty() {
        return Err(format!("no lease {root}").into());
    }
    // Oldest first, so each parent comes before its children: depth = parent's + 1.
    let mut depth: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut children: std::collections::BTreeMap<&str, Vec<&pb::Lease>> = Default::default();
    for l in &resp.leases {
        children.entry(&l.parent_lease_id).or_default().push(l);
    }
    let mut rows = Vec::new();
    let mut stack: Vec<&pb::Lease> = resp.leases.iter().filter(|l| l.id == root).collect();
    while let Some(l) = stack.pop() {
        let d = depth.get(l.parent_lease_id.as_str()).map_or(0, |p| p + 1);
        depth.insert(&l.id, d);
        let mut v = lease_json(l);
        v["depth"] = json!(d);
        v["tree"] = json!(format!("{}{}", "  ".repeat(d), l.id));
        rows.push(v);
        if let Some(c) = children.get(l.id.as_str()) {
            stack.extend(c.iter().rev());
        }
    }
    output.print(
        &rows,
        &[
            ("LEASE", "/tree"),
            ("STATE", "/state"),
            ("PROFILE", "/profile"),
            ("HOLDER", "/spiffe_id"),
            ("SUBJECT", "/subject"),
            ("EXPIRES", "/expires_at"),
        ],
    );
    Ok(())
}

pub async fn inventory(output: ListOutput, conn: ConnArgs) -> Result<(), CliError> {
    let ch = channel(&conn).await?;
    let resp = pb::admin_client::AdminClient::new(ch)
        .list_identities(pb::ListIdentitiesRequest {})
        .await?
        .into_inner();
    let t = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| rfc3339(t.seconds));
    let rows: Vec<_> = resp.identities.iter().map(|i| {
            json!({
                "spiffe_id": i.spiffe_id,
                "registered": i.registered,
                "owner": i.owner,
                "environment": i.environment,
                "roles": i.roles,
                "approver_groups": i.approver_groups,
                "may": i.paths.iter().map(|p| json!({
                    "action": p.action, "resource": p.resource, "policy": p.policy,
                    "conditional": p.conditional,
                    "approvals": (p.approvals > 0).then(|| json!({"group": p.approval_group, "count": p.approvals})),
                })).collect::<Vec<_>>(),
                "active_leases": i.active_leases,
                "issued": i.issued,
                "denied": i.denied,
                "last_seen": t(&i.last_seen),
                "last_issued": t(&i.last_issued),
                "flags": i.flags,
            })
    }).collect();
    output.print(
        &rows,
        &[
            ("SPIFFE ID", "/spiffe_id"),
            ("OWNER", "/owner"),
            ("ROLES", "/roles"),
            ("ACTIVE", "/active_leases"),
            ("ISSUED", "/issued"),
            ("DENIED", "/denied"),
            ("LAST SEEN", "/last_seen"),
            ("FLAGS", "/flags"),
        ],
    );
    Ok(())
}
