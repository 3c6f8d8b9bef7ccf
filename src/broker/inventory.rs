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
    ) -> Result<String, BrokerError> {
        if let Some(c) = caller {
            self.admin(c, AdminAction::ReloadPolicy, "ReloadPolicy")
                .await?;
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
