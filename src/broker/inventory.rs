//! The non-human identity inventory, lease listings and policy reloads.

use std::collections::HashMap;

use super::{record, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;
use crate::domain::{Lease, LeaseFilter};
use crate::error::BrokerError;
use crate::policy::{AccessPath, AdminAction, Policy};
use crate::store::{IdentityStats, LedgerOp};

/// One row of the non-human identity inventory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InventoryEntry {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Registered in the config.
    pub registered: bool,
    /// Owner ("" if unknown).
    pub owner: String,
    /// Environment.
    pub environment: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Approver groups it belongs to.
    pub approver_groups: Vec<String>,
    /// Who may request, approve and revoke what, and through which policy.
    pub paths: Vec<AccessPath>,
    /// Active leases now.
    pub active_leases: u64,
    /// Issuances and renewals.
    pub issued: u64,
    /// Refusals.
    pub denied: u64,
    /// Last request (Unix ms).
    pub last_seen_ms: Option<i64>,
    /// Last issuance (Unix ms).
    pub last_issued_ms: Option<i64>,
    /// Why this identity needs attention (no owner, unregistered caller).
    pub flags: Vec<String>,
}

/// The inventory from a policy and traffic statistics.
pub fn inventory_rows(
    policy: &dyn Policy,
    stats: &HashMap<String, IdentityStats>,
) -> Vec<InventoryEntry> {
    let mut rows = Vec::new();
    for i in policy.directory().identities() {
        let id = i.spiffe_id.to_string();
        let s = stats.get(&id);
        let groups = policy.directory().groups_of(&i.spiffe_id);
        let mut flags = Vec::new();
        if i.owner.trim().is_empty() {
            flags.push("no owner".into());
        }
        rows.push(InventoryEntry {
            spiffe_id: id,
            registered: true,
            owner: i.owner.clone(),
            environment: i.environment.clone(),
            roles: i.roles.clone(),
            approver_groups: groups,
            paths: policy.paths(&i.spiffe_id),
            active_leases: s.map_or(0, |s| s.active_leases),
            issued: s.map_or(0, |s| s.issued),
            denied: s.map_or(0, |s| s.denied),
            last_seen_ms: s.map(|s| s.last_seen_ms),
            last_issued_ms: s.and_then(|s| s.last_issued_ms),
            flags,
        });
    }
    for (id, s) in stats {
        if policy
            .directory()
            .identities()
            .iter()
            .any(|i| &i.spiffe_id.to_string() == id)
        {
            continue;
        }
        rows.push(InventoryEntry {
            spiffe_id: id.clone(),
            registered: false,
            owner: String::new(),
            environment: String::new(),
            roles: Vec::new(),
            approver_groups: Vec::new(),
            paths: Vec::new(),
            active_leases: s.active_leases,
            issued: s.issued,
            denied: s.denied,
            last_seen_ms: Some(s.last_seen_ms),
            last_issued_ms: s.last_issued_ms,
            flags: vec!["unregistered caller".into(), "no owner".into()],
        });
    }
    rows.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    rows
}

impl Broker {
    /// Lists leases (platform admin only).
    pub async fn list_leases(
        &self,
        caller: &VerifiedCaller,
        filter: LeaseFilter,
    ) -> Result<Vec<Lease>, BrokerError> {
        self.admin(caller, AdminAction::ListLeases, "ListLeases")
            .await?;
        Ok(self.store.leases(filter).await?)
    }

    /// The non-human identity inventory (platform admin only).
    pub async fn inventory(
        &self,
        caller: &VerifiedCaller,
    ) -> Result<Vec<InventoryEntry>, BrokerError> {
        self.admin(caller, AdminAction::ListIdentities, "ListIdentities")
            .await?;
        let policy = self.policy();
        let stats: HashMap<String, IdentityStats> = self
            .store
            .identity_stats()
            .await?
            .into_iter()
            .map(|s| (s.spiffe_id.clone(), s))
            .collect();
        Ok(inventory_rows(policy.as_ref(), &stats))
    }

    /// Reloads the policy set; a bad policy is refused and the old one stays in force.
    /// `who` is the caller's SPIFFE ID or `signal:SIGHUP`.
    pub async fn reload_policy(
        &self,
        caller: Option<&VerifiedCaller>,
        force: Option<String>,
    ) -> Result<String, BrokerError> {
        if let Some(c) = caller {
            self.admin(c, AdminAction::ReloadPolicy, "ReloadPolicy")
                .await?;
        }
        if force.as_deref().is_some_and(|r| !super::valid_reason(r)) {
            let err = BrokerError::InvalidArgument(
                "a forced reload needs a reason of 1..=512 printable characters".into(),
            );
            return Err(match caller {
                Some(c) => self.reject(c, "ReloadPolicy", err).await,
                None => err,
            });
        }
        let Some(loader) = &self.loader else {
            return Err(BrokerError::FailedPrecondition(
                "this broker has no policy source to reload from".into(),
            ));
        };
        let old = self.policy().hash().to_owned();
        let mut e = self.event(EventKind::PolicyReload, "allow", caller);
        let by = if caller.is_none() {
            "reloaded on SIGHUP"
        } else {
            "reloaded by the caller"
        };
        e.request = Some(record("ReloadPolicy"));
        match loader() {
            Ok(new) => {
                let hash = new.hash().to_owned();
                e.policy_hash = Some(hash.clone());
                e.reason = Some(format!("{by}; replaced policy {old}"));
                if let Some(window) = self.reload_guard {
                    let report = self.replay_recent(new.as_ref(), window).await?;
                    if report.widens() {
                        let what = widening_summary(&report);
                        match &force {
                            None => {
                                e.decision = "deny".into();
                                e.policy_hash = Some(old.clone());
                                e.rule = Some("policy/refuse-widening".into());
                                e.reason = Some(format!(
                                    "reload refused, policy {old} stays in force: replaying the last {}s of requests, policy {hash} would give more: {what}",
                                    window.as_secs()
                                ));
                                self.record_best_effort(e).await;
                                return Err(BrokerError::FailedPrecondition(format!(
                                    "the new policy gives more than the one in force ({what}); reload with force and a reason to load it anyway"
                                )));
                            }
                            Some(reason) => {
                                e.rule = Some("policy/refuse-widening".into());
                                e.reason = Some(format!(
                                    "{by}, FORCED past a widening replay ({what}): {reason}; replaced policy {old}"
                                ));
                            }
                        }
                    }
                }
                // Record first: a reload nobody can see in the ledger did not happen.
                self.store.apply(LedgerOp::Record { event: e }).await?;
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = new;
                tracing::info!(old = %old, new = %hash, "policy reloaded");
                Ok(hash)
            }
            Err(err) => {
                e.decision = "deny".into();
                e.policy_hash = Some(old.clone());
                e.reason = Some(format!(
                    "reload refused, policy {old} stays in force: {err}"
                ));
                self.record_best_effort(e).await;
                tracing::warn!(error = %err, "policy reload refused; the old policy stays in force");
                Err(BrokerError::InvalidArgument(format!(
                    "policy refused: {err}"
                )))
            }
        }
    }
}

/// Most recent entries a reload guard replays.
const RELOAD_REPLAY_MAX: u64 = 100_000;

/// The widening changes of a replay, shortly: "identity profile from→to ×n", at most five.
fn widening_summary(r: &crate::policy::replay::ReplayReport) -> String {
    let widening: Vec<_> = r.changes.iter().filter(|c| c.widens).collect();
    let mut parts: Vec<String> = widening
        .iter()
        .take(5)
        .map(|c| {
            format!(
                "{} {} {:?}→{:?} ×{} (e.g. entry {})",
                c.identity,
                c.profile,
                c.from,
                c.to,
                c.count,
                c.examples.first().copied().unwrap_or_default()
            )
        })
        .collect();
    if widening.len() > 5 {
        parts.push(format!("and {} more", widening.len() - 5));
    }
    parts.join("; ")
}

impl Broker {
    /// Sets `[policy] refuse_widening`: a reload replays this window of the ledger first.
    pub fn with_reload_guard(mut self, window: Option<std::time::Duration>) -> Self {
        self.reload_guard = window;
        self
    }

    /// The recent credential requests (within `window`, at most [`RELOAD_REPLAY_MAX`]
    /// entries) decided by the policy in force and by `candidate`.
    async fn replay_recent(
        &self,
        candidate: &dyn Policy,
        window: std::time::Duration,
    ) -> Result<crate::policy::replay::ReplayReport, BrokerError> {
        let current = self.policy();
        let since_ms = crate::clock::unix_millis(self.clock.now()) - window.as_millis() as i64;
        let size = self.store.checkpoint(None).await?.map_or(0, |c| c.size);
        let mut after = size.saturating_sub(RELOAD_REPLAY_MAX);
        let mut replayer = crate::policy::replay::Replayer::new(current.as_ref(), candidate);
        loop {
            let page = self.store.audit_entries(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for s in &page {
                let e: crate::audit::AuditEvent = serde_json::from_str(&s.body)
                    .map_err(|e| BrokerError::Internal(format!("ledger entry {}: {e}", s.seq)))?;
                if e.time_ms >= since_ms {
                    replayer.add(s.seq, &e);
                }
            }
        }
        Ok(replayer.finish())
    }
}
