//! Policy replay: the credential requests the ledger recorded, decided again by the policy
//! in force and by a candidate, side by side — what loading the candidate would change
//! (grants that would now be denied, denials that would now be allowed, approvals that
//! would no longer be needed), before it is loaded. Pure: the caller reads the entries.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use spiffe::SpiffeId;

use super::{Decision, Policy, RequestContext};
use crate::audit::AuditEvent;
use crate::authn::AuthMethod;
use crate::domain::{CredentialRequest, ProfileName, Scope, Verdict};

/// What a policy decides for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Refused.
    Deny,
    /// Permitted once approvers agree.
    RequireApproval,
    /// Issued.
    Allow,
}

impl Outcome {
    fn of(d: &Decision) -> Self {
        match d {
            Decision::Allow(_) => Outcome::Allow,
            Decision::Deny(_) => Outcome::Deny,
            Decision::RequireApproval(..) => Outcome::RequireApproval,
        }
    }
}

/// Requests of one identity and profile whose outcome the candidate changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Who asked.
    pub identity: String,
    /// For what.
    pub profile: String,
    /// The policy in force decides …
    pub from: Outcome,
    /// … the candidate decides.
    pub to: Outcome,
    /// How many logged requests.
    pub count: u64,
    /// The ledger positions of the first few (examples to look at).
    pub examples: Vec<u64>,
    /// Whether this gives more than before (a denial allowed, an approval dropped).
    pub widens: bool,
}

/// The candidate against the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Credential requests decided again.
    pub replayed: u64,
    /// What would change, by identity, profile and outcome.
    pub changes: Vec<Change>,
}

impl ReplayReport {
    /// Whether the candidate gives anyone more than the policy in force did.
    pub fn widens(&self) -> bool {
        self.changes.iter().any(|c| c.widens)
    }
}

/// Changes by (identity, profile, from, to): how many, and the first few positions.
type Tally = BTreeMap<(String, String, Outcome, Outcome), (u64, Vec<u64>)>;

/// Examples kept per change.
const EXAMPLES: usize = 3;

/// The request an entry recorded, and the facts it was decided with; `None` for entries
/// that are not a credential request a policy decided.
fn recorded(e: &AuditEvent) -> Option<(SpiffeId, CredentialRequest, RequestContext)> {
    let r = e.request.as_ref()?;
    if !matches!(r.rpc.as_str(), "IssueCredential" | "ExchangeToken") {
        return None;
    }
    let caller = SpiffeId::new(e.caller.as_deref()?).ok()?;
    let req = CredentialRequest {
        profile: ProfileName::parse(r.profile.as_deref()?).ok()?,
        scopes: r
            .scopes
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<Result<_, _>>()
            .ok()?,
        ttl: r.ttl_secs.map(Duration::from_secs),
        intent: r.intent.clone(),
        delegation: r.delegation.clone(),
    };
    let ctx = RequestContext {
        now: e.time_ms.div_euclid(1000),
        auth_method: if e.auth_method.as_deref() == Some("jwt-svid") {
            AuthMethod::JwtSvid
        } else {
            AuthMethod::X509Svid
        },
        break_glass: e.break_glass,
        approvals: e
            .approvals
            .iter()
            .filter(|a| a.verdict == Verdict::Approve && !a.post_review)
            .map(|a| a.reviewer.clone())
            .collect(),
        // The entry does not record the group a person reviewed in: people's approvals
        // count for no group in a replay (a person-approved issuance replays as denied).
        person_approvals_group: None,
    };
    Some((caller, req, ctx))
}

/// Decides recorded credential requests, one entry at a time (a ledger is read in pages).
pub struct Replayer<'a> {
    current: &'a dyn Policy,
    candidate: &'a dyn Policy,
    replayed: u64,
    changes: Tally,
}

impl<'a> Replayer<'a> {
    /// Compares `current` with `candidate`.
    pub fn new(current: &'a dyn Policy, candidate: &'a dyn Policy) -> Self {
        Self {
            current,
            candidate,
            replayed: 0,
            changes: BTreeMap::new(),
        }
    }

    /// Decides the request entry `seq` recorded, if it recorded one.
    pub fn add(&mut self, seq: u64, e: &AuditEvent) {
        let Some((caller, req, ctx)) = recorded(e) else {
            return;
        };
        self.replayed += 1;
        let from = Outcome::of(&self.current.decide(&caller, &req, &ctx));
        let to = Outcome::of(&self.candidate.decide(&caller, &req, &ctx));
        if from == to {
            return;
        }
        let key = (caller.to_string(), req.profile.to_string(), from, to);
        let (count, examples) = self.changes.entry(key).or_default();
        *count += 1;
        if examples.len() < EXAMPLES {
            examples.push(seq);
        }
    }

    /// What would change.
    pub fn finish(self) -> ReplayReport {
        ReplayReport {
            replayed: self.replayed,
            changes: self
                .changes
                .into_iter()
                .map(
                    |((identity, profile, from, to), (count, examples))| Change {
                        identity,
                        profile,
                        from,
                        to,
                        count,
                        examples,
                        widens: to > from,
                    },
                )
                .collect(),
        }
    }
}

/// Decides every recorded credential request in `entries` (ledger position, entry) with
/// `current` and `candidate` and reports where they differ.
pub fn replay(
    entries: impl IntoIterator<Item = (u64, AuditEvent)>,
    current: &dyn Policy,
    candidate: &dyn Policy,
) -> ReplayReport {
    let mut r = Replayer::new(current, candidate);
    for (seq, e) in entries {
        r.add(seq, &e);
    }
    r.finish()
}
