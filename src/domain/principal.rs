//! Who acts: a workload (by SPIFFE ID) or a person signed in through an OpenID Provider.
//! Both are principals of policy (Cedar's `Workload` and `Person`), so the same review and
//! operator policies cover both; only a workload asks for credentials for itself.

use serde::Serialize;
use spiffe::SpiffeId;

/// How every person's id begins (`oidc:<issuer>#<sub>`); dev mode's demo people are
/// `oidc:dev#<name>`, so the ledger reads the same either way.
pub const PERSON_ID_PREFIX: &str = "oidc:";

/// A signed-in person: their id, what the ledger records beside it, and what policy
/// sees (roles and approver groups, from the provider's claims through the config's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `oidc:<issuer>#<sub>` (dev mode's demo people: `oidc:dev#<name>`).
    pub id: String,
    /// Recorded beside the id; never used to decide.
    pub email: Option<String>,
    /// Recorded beside the id; never used to decide.
    pub name: Option<String>,
    /// Roles (Cedar `Role` parents).
    pub roles: Vec<String>,
    /// Approver groups (Cedar `ApproverGroup` parents; membership for reviews).
    pub approver_groups: Vec<String>,
    /// When the person last authenticated at the provider (Unix seconds).
    pub auth_time: i64,
}

/// What the ledger records of a person beside their id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PersonRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A principal of policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A workload, by the SPIFFE ID of its SVID.
    Workload(SpiffeId),
    /// A person, by their provider's subject.
    Person(Person),
}

impl Principal {
    /// The id the ledger records: a SPIFFE ID or `oidc:<issuer>#<sub>`.
    pub fn id(&self) -> String {
        match self {
            Principal::Workload(id) => id.to_string(),
            Principal::Person(p) => p.id.clone(),
        }
    }

    /// The workload's SPIFFE ID, if a workload.
    pub fn workload(&self) -> Option<&SpiffeId> {
        match self {
            Principal::Workload(id) => Some(id),
            Principal::Person(_) => None,
        }
    }

    /// The person, if a person.
    pub fn person(&self) -> Option<&Person> {
        match self {
            Principal::Person(p) => Some(p),
            Principal::Workload(_) => None,
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Workload(id) => write!(f, "{id}"),
            Principal::Person(p) => f.write_str(&p.id),
        }
    }
}
