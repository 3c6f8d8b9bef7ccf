//! The `Policy` seam: a pure function of (caller, request, context) → [`Decision`].
//!
//! Request-time policy is Cedar (`cedar.rs`): entities (workloads with owner, environment,
//! roles and approver groups; profiles; the broker) come from the config, policies from
//! `.cedar` files validated against `policy/schema.cedarschema`. The profile ceiling
//! (scopes, TTL, intent) is checked here in Rust before Cedar sees the request, so no
//! policy can widen a grant beyond it.

mod cedar;
mod ceiling;
mod directory;
pub mod duties;
pub mod replay;

use std::sync::Arc;
use std::time::Duration;

use spiffe::SpiffeId;

use crate::authn::AuthMethod;
use crate::config::Profile;
use crate::domain::{CredentialRequest, Intent, Principal, Scope};

pub use cedar::{CedarPolicy, PolicyError};
pub use directory::Directory;
pub use duties::{Conflict, Parties};

/// Facts about the request that are not the request itself.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Request time (Unix seconds).
    pub now: i64,
    /// How the caller authenticated.
    pub auth_method: AuthMethod,
    /// The caller invokes break-glass (self-approval with a justification).
    pub break_glass: bool,
    /// Who approved this exact request so far: SPIFFE IDs, and people's
    /// `oidc:<issuer>#<sub>`.
    pub approvals: Vec<String>,
    /// The approver group the people among `approvals` were members of when they reviewed
    /// (their groups come from their sign-in, not the config, so policy cannot look them
    /// up later): the access request's group. `None`: people's approvals count for no group.
    pub person_approvals_group: Option<String>,
}

/// What policy granted: exactly the request, within the profile's ceiling.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The profile.
    pub profile: Arc<Profile>,
    /// Granted scopes (rendered through the profile's scope template, if any).
    pub scopes: Vec<Scope>,
    /// Granted TTL.
    pub ttl: Duration,
    /// The stated intent, carried into the credential.
    pub intent: Option<Intent>,
    /// The determining policy ids.
    pub rule: String,
    /// Hash of the policy set in force.
    pub policy_hash: String,
    /// Approvers whose approvals counted (distinct, never the requester).
    pub approvers: Vec<String>,
    /// Granted under break-glass.
    pub break_glass: bool,
}

/// What an access request still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNeed {
    /// The approver group.
    pub group: String,
    /// Approvals required.
    pub threshold: u32,
    /// Valid approvals collected so far.
    pub have: u32,
    /// Members who may approve (the requester excluded).
    pub eligible: Vec<String>,
    /// The determining policy.
    pub rule: String,
    /// Hash of the policy set in force.
    pub policy_hash: String,
}

/// Why policy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialKind {
    /// The caller may not do this at all.
    NotPermitted,
    /// The request asks for more than the ceiling, or is incomplete.
    OverAsk,
    /// No such profile.
    UnknownProfile,
    /// The caller's SPIFFE ID is not in the inventory.
    Unregistered,
}

/// A refusal with its reason and deciding rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Category (selects the gRPC code).
    pub kind: DenialKind,
    /// Human-readable reason naming what was refused.
    pub reason: String,
    /// Deciding rule(s), if specific ones refused.
    pub rule: Option<String>,
    /// Every part of the request beyond the ceiling (for `ExplainDecision`).
    pub violations: Vec<String>,
}

/// The outcome of a policy evaluation.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Issue this grant.
    Allow(Grant),
    /// Refuse.
    Deny(Denial),
    /// Policy permits it once enough approvers have approved.
    RequireApproval(Grant, ApprovalNeed),
}

/// Operator actions guarded by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// `Admin.Revoke` (Cedar action `revoke`).
    Revoke,
    /// `Admin.ListLeases` (Cedar action `administer`).
    ListLeases,
    /// `Admin.ListIdentities` (`administer`).
    ListIdentities,
    /// `Admin.ReloadPolicy` (`administer`).
    ReloadPolicy,
    /// Reading the audit log: checkpoints, proofs, events (`audit`, which `administer`
    /// implies: an auditor reads the log and changes nothing).
    ReadLog,
}

/// A way an identity can act, read off the policies' scopes (conditions not evaluated).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccessPath {
    /// `issue`, `review`, `revoke` or `administer`.
    pub action: String,
    /// The profile (or `broker`, or `*`).
    pub resource: String,
    /// The permit policy granting it.
    pub policy: String,
    /// The policy has `when`/`unless` conditions.
    pub conditional: bool,
    /// Approvals it requires: (group, count).
    pub approvals: Option<(String, u32)>,
}

/// The policy seam.
///
/// Contract: pure and deterministic (no I/O, no clock reads: time comes in the
/// context); deny by default, and an unregistered caller is always denied; a grant never
/// exceeds the request or the profile ceiling; the requester never counts as its own
/// approver.
pub trait Policy: Send + Sync + 'static {
    /// Decides a credential request.
    fn decide(
        &self,
        caller: &SpiffeId,
        request: &CredentialRequest,
        ctx: &RequestContext,
    ) -> Decision;
    /// Whether a caller may perform an operator action; `Ok` carries the rule id.
    /// An unregistered workload is always refused; a person is judged by the roles and
    /// approver groups of their sign-in.
    fn authorize_admin(&self, caller: &Principal, action: AdminAction) -> Result<String, Denial>;
    /// Whether `reviewer` may review requests for `profile`; `Ok` carries the rule id.
    fn authorize_review(&self, reviewer: &Principal, profile: &str) -> Result<String, Denial>;
    /// Every permit path of an identity (who may request, approve and revoke what).
    fn paths(&self, id: &SpiffeId) -> Vec<AccessPath>;
    /// The profiles, identities and approver groups this policy was loaded with.
    fn directory(&self) -> &Directory;
    /// Hash identifying the policy set in force (schema, policies, entities).
    fn hash(&self) -> &str;
}
