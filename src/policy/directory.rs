//! Who and what policy knows about, from the config: the profiles, the registered
//! identities (the inventory) and the approver groups. Plain lookups, no evaluation.

use std::sync::Arc;

use spiffe::SpiffeId;

use super::duties::{self, Conflict, Parties};
use crate::config::{ApproverGroup, Config, Identity, Profile};

/// The profiles, identities and approver groups of one policy load.
#[derive(Debug, Clone)]
pub struct Directory {
    profiles: Vec<Arc<Profile>>,
    identities: Vec<Identity>,
    groups: Vec<ApproverGroup>,
}

impl Directory {
    /// The directory of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            profiles: config.profiles.iter().cloned().map(Arc::new).collect(),
            identities: config.identities.clone(),
            groups: config.approver_groups.clone(),
        }
    }

    /// A profile by name.
    pub fn profile(&self, name: &str) -> Option<Arc<Profile>> {
        self.profiles
            .iter()
            .find(|p| p.name.as_str() == name)
            .cloned()
    }

    /// All profiles.
    pub fn profiles(&self) -> &[Arc<Profile>] {
        &self.profiles
    }

    /// The registered identities.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// A registered identity.
    pub fn identity(&self, id: &SpiffeId) -> Option<&Identity> {
        self.identities.iter().find(|i| &i.spiffe_id == id)
    }

    /// Members of an approver group.
    pub fn group_members(&self, group: &str) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.name == group)
            .flat_map(|g| g.members.iter().map(|m| m.to_string()))
            .collect()
    }

    /// The approver groups an identity belongs to.
    pub fn groups_of(&self, id: &SpiffeId) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.members.contains(id))
            .map(|g| g.name.clone())
            .collect()
    }

    /// The separation-of-duties conflict that bars `reviewer` from one request, if any.
    pub fn review_conflict(&self, parties: Parties<'_>, reviewer: &str) -> Option<Conflict> {
        duties::conflict(&self.identities, &self.groups, parties, reviewer)
    }
}
