//! The non-human identity inventory (`[[identities]]`) and the approver groups.

use std::collections::BTreeSet;

use serde::Deserialize;
use spiffe::SpiffeId;

use super::{err, valid_name, Config, ConfigError};
use crate::domain::PartyKind;

/// A registered non-human identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Who answers for it (empty: flagged in the inventory).
    pub owner: String,
    /// Deployment environment, e.g. `prod`.
    pub environment: String,
    /// Roles it holds.
    pub roles: Vec<String>,
    /// A workload, or a person (who holds an SVID too, e.g. on a laptop); what Cedar
    /// sees as `subject_type` and `actor_types` in a delegation chain.
    pub kind: PartyKind,
}
/// A named group of approvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApproverGroup {
    /// Group name (the Cedar `ApproverGroup` id).
    pub name: String,
    /// Members' SPIFFE IDs.
    pub members: Vec<SpiffeId>,
    /// Whether a member may review requests of an identity it owns (the inventory's
    /// `owner`). Off by default: owning the requester is a conflict of interest.
    pub allow_owner_review: bool,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    spiffe_id: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    kind: Option<PartyKind>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    name: String,
    members: Vec<String>,
    #[serde(default)]
    allow_owner_review: bool,
}
impl Config {
    pub(super) fn identities(raw: Vec<RawIdentity>) -> Result<Vec<Identity>, ConfigError> {
        let mut seen = BTreeSet::new();
        raw.into_iter()
            .map(|i| {
                let id = SpiffeId::new(&i.spiffe_id)
                    .map_err(|e| ConfigError(format!("identities: {:?}: {e}", i.spiffe_id)))?;
                if id.path().is_empty() {
                    return err(format!("identities: {:?} needs a path", i.spiffe_id));
                }
                if !seen.insert(id.to_string()) {
                    return err(format!("identities: {id} is listed twice"));
                }
                for r in &i.roles {
                    if !valid_name(r) {
                        return err(format!("identities: {id}: invalid role name {r:?}"));
                    }
                }
                Ok(Identity {
                    spiffe_id: id,
                    owner: i.owner,
                    environment: i.environment,
                    roles: i.roles,
                    kind: i.kind.unwrap_or(PartyKind::Workload),
                })
            })
            .collect()
    }
    pub(super) fn groups(raw: Vec<RawGroup>) -> Result<Vec<ApproverGroup>, ConfigError> {
        let mut seen = BTreeSet::new();
        raw.into_iter()
            .map(|g| {
                if !valid_name(&g.name) || !seen.insert(g.name.clone()) {
                    return err(format!(
                        "approver_groups: invalid or duplicate name {:?}",
                        g.name
                    ));
                }
                let members = g
                    .members
                    .iter()
                    .map(|m| {
                        SpiffeId::new(m).map_err(|e| {
                            ConfigError(format!("approver_groups.{}: {m:?}: {e}", g.name))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ApproverGroup {
                    name: g.name,
                    members,
                    allow_owner_review: g.allow_owner_review,
                })
            })
            .collect()
    }
}
