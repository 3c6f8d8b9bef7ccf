//! Separation of duties: who may not review an access request, whatever the approver
//! groups say. A pure function of the request's parties and the inventory, used both
//! when a review is submitted (refused, naming the rule) and when approvals are counted
//! at redemption (a conflicting approval already on record does not count).

use crate::config::{ApproverGroup, Identity};
use crate::domain::{AccessRequest, Delegation};

/// Why a reviewer is barred from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The rule, e.g. `separation-of-duties/delegation-chain`.
    pub rule: &'static str,
    /// What the reviewer is to the request, for the refusal.
    pub reason: String,
}

/// The parties of one access request.
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    /// The identity that asked.
    pub requester: &'a str,
    /// The verified delegation the request was made under: its subject and actors.
    pub delegation: Option<&'a Delegation>,
    /// The approver group the request waits on.
    pub group: &'a str,
}

impl<'a> Parties<'a> {
    /// The parties of a recorded access request.
    pub fn of(ar: &'a AccessRequest) -> Self {
        Self {
            requester: &ar.requester,
            delegation: ar.request.delegation.as_ref(),
            group: &ar.group,
        }
    }
}

/// The conflict that bars `reviewer` from reviewing a request of `parties`, if any:
/// the requester itself; the subject and every actor of a verified delegation chain
/// (the request is made in their name, so they would approve their own request); and, unless the approver group
/// allows it, the requester's owner — the reviewer is the requester's `owner` in the
/// inventory, or both are answered for by the same owner.
pub fn conflict(
    identities: &[Identity],
    groups: &[ApproverGroup],
    parties: Parties<'_>,
    reviewer: &str,
) -> Option<Conflict> {
    if reviewer == parties.requester {
        return Some(Conflict {
            rule: "separation-of-duties/requester",
            reason: format!("{reviewer} may not review its own request"),
        });
    }
    if parties.delegation.is_some_and(|d| d.involves(reviewer)) {
        return Some(Conflict {
            rule: "separation-of-duties/delegation-chain",
            reason: format!(
                "{reviewer} is in the request's delegation chain (it is made on their behalf) and may not review it"
            ),
        });
    }
    let owner_allowed = groups
        .iter()
        .find(|g| g.name == parties.group)
        .is_some_and(|g| g.allow_owner_review);
    if owner_allowed {
        return None;
    }
    let owner_of = |id: &str| {
        identities
            .iter()
            .find(|i| i.spiffe_id.to_string() == id)
            .map(|i| i.owner.as_str())
            .filter(|o| !o.is_empty())
    };
    let requester_owner = owner_of(parties.requester)?;
    if requester_owner == reviewer || owner_of(reviewer) == Some(requester_owner) {
        return Some(Conflict {
            rule: "separation-of-duties/owner",
            reason: format!(
                "{reviewer} answers for the requesting identity (owner {requester_owner:?}) and may not review its requests"
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(id: &str, owner: &str) -> Identity {
        Identity {
            spiffe_id: spiffe::SpiffeId::new(id).expect("valid id"),
            owner: owner.into(),
            environment: "prod".into(),
            roles: Vec::new(),
            kind: crate::domain::PartyKind::Workload,
        }
    }

    fn group(allow_owner_review: bool) -> Vec<ApproverGroup> {
        vec![ApproverGroup {
            name: "g".into(),
            members: Vec::new(),
            allow_owner_review,
        }]
    }

    const AGENT: &str = "spiffe://example.org/ci/agent";
    const ALICE: &str = "spiffe://example.org/ops/alice";
    const BOB: &str = "spiffe://example.org/ops/bob";

    fn parties(delegation: Option<&Delegation>) -> Parties<'_> {
        Parties {
            requester: AGENT,
            delegation,
            group: "g",
        }
    }

    fn for_alice() -> Delegation {
        use crate::domain::{Party, PartyKind, SubjectTokenType};
        Delegation {
            subject: Party {
                id: ALICE.into(),
                kind: PartyKind::Person,
                email: None,
            },
            actors: vec![Party {
                id: AGENT.into(),
                kind: PartyKind::Workload,
                email: None,
            }],
            subject_token_type: SubjectTokenType::BrokerToken,
            subject_token_sha256: "00".repeat(32),
            parent_lease: None,
            subject_groups: Vec::new(),
        }
    }

    #[test]
    fn requester_and_chain_members_are_barred() {
        let ids = vec![identity(AGENT, "team"), identity(ALICE, "alice@x")];
        let chain = for_alice();
        let c = conflict(&ids, &group(true), parties(Some(&chain)), ALICE).expect("barred");
        assert_eq!(c.rule, "separation-of-duties/delegation-chain");
        let c = conflict(&ids, &group(true), parties(Some(&chain)), AGENT).expect("barred");
        assert_eq!(c.rule, "separation-of-duties/requester");
        assert_eq!(
            conflict(&ids, &group(true), parties(Some(&chain)), BOB),
            None
        );
    }

    #[test]
    fn owners_are_barred_unless_the_group_allows_it() {
        // Alice owns the agent directly; Bob and the agent share an owning team.
        let ids = vec![
            identity(AGENT, ALICE),
            identity(ALICE, "alice@x"),
            identity(BOB, "team"),
        ];
        let c = conflict(&ids, &group(false), parties(None), ALICE).expect("barred");
        assert_eq!(c.rule, "separation-of-duties/owner");
        assert_eq!(conflict(&ids, &group(true), parties(None), ALICE), None);
        let shared = vec![identity(AGENT, "team"), identity(BOB, "team")];
        let c = conflict(&shared, &group(false), parties(None), BOB).expect("barred");
        assert_eq!(c.rule, "separation-of-duties/owner");
        // No owner on record: nothing to conflict with.
        let unowned = vec![identity(AGENT, ""), identity(BOB, "")];
        assert_eq!(conflict(&unowned, &group(false), parties(None), BOB), None);
    }
}
