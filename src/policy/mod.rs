//! The `Policy` seam: a pure function of (caller, request, context) → [`Decision`].
//!
//! This version decides from the profiles' static allow-lists and ceilings. The seam is
//! what request-time policy engines plug into; the rest of the broker only sees
//! decisions, deciding rule ids and the policy hash.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use spiffe::SpiffeId;

use crate::authn::VerifiedCaller;
use crate::clock::format_duration;
use crate::config::{Config, Profile};
use crate::domain::{CredentialRequest, Intent, Scope};

/// Facts about the request that are not the request itself.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Request time (Unix seconds).
    pub now: i64,
}

/// What policy granted: exactly the request, within the profile's ceiling.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The profile.
    pub profile: Arc<Profile>,
    /// Granted scopes (the request's, or the profile default when it named none).
    pub scopes: Vec<Scope>,
    /// Granted TTL.
    pub ttl: Duration,
    /// The stated intent, carried into the credential.
    pub intent: Option<Intent>,
    /// The rule that allowed it (recorded as the approver for now).
    pub rule: String,
    /// Hash of the policy in force.
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
}

/// A refusal with its reason and deciding rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Category (selects the gRPC code).
    pub kind: DenialKind,
    /// Human-readable reason naming what was refused.
    pub reason: String,
    /// Deciding rule, if a specific one refused.
    pub rule: Option<String>,
}

/// The outcome of a policy evaluation.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Issue this grant.
    Allow(Grant),
    /// Refuse.
    Deny(Denial),
}

/// Operator actions guarded by the admin role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// `Admin.Revoke`.
    Revoke,
    /// `Admin.ListLeases`.
    ListLeases,
}

/// The policy seam.
///
/// Contract: pure and deterministic (no I/O, no clock reads: time comes in the
/// context); deny by default; a grant never exceeds the request or the profile ceiling.
pub trait Policy: Send + Sync + 'static {
    /// Decides a credential request.
    fn decide(
        &self,
        caller: &VerifiedCaller,
        request: &CredentialRequest,
        ctx: &RequestContext,
    ) -> Decision;
    /// Decides whether a caller may perform an admin action; `Ok` carries the rule id.
    fn authorize_admin(
        &self,
        caller: &VerifiedCaller,
        action: AdminAction,
    ) -> Result<String, Denial>;
    /// A profile by name (for renewals, which re-check the ceiling).
    fn profile(&self, name: &str) -> Option<Arc<Profile>>;
    /// Hash identifying the policy in force.
    fn hash(&self) -> &str;
}

/// Policy from the config's profile allow-lists and the admin list.
#[derive(Debug)]
pub struct StaticPolicy {
    profiles: Vec<Arc<Profile>>,
    admins: Vec<SpiffeId>,
    hash: String,
}

impl StaticPolicy {
    /// Compiles the policy from the config.
    pub fn from_config(config: &Config) -> Self {
        let canonical = serde_json::json!({
            "admins": config.admins.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "profiles": config.profiles.iter().map(|p| serde_json::json!({
                "name": p.name.as_str(),
                "kind": format!("{:?}", p.kind),
                "audience": p.audience,
                "scopes": p.scopes,
                "default_scopes": p.default_scopes,
                "max_ttl": p.max_ttl.as_secs(),
                "default_ttl": p.default_ttl.as_secs(),
                "require_intent": p.require_intent,
                "allow": p.allow.iter().map(|r| r.text()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.to_string().as_bytes());
        Self {
            profiles: config.profiles.iter().cloned().map(Arc::new).collect(),
            admins: config.admins.clone(),
            hash: hex::encode(digest.as_ref()),
        }
    }
}

fn deny(kind: DenialKind, reason: String, rule: Option<String>) -> Decision {
    Decision::Deny(Denial { kind, reason, rule })
}

impl Policy for StaticPolicy {
    fn decide(
        &self,
        caller: &VerifiedCaller,
        request: &CredentialRequest,
        _ctx: &RequestContext,
    ) -> Decision {
        let Some(profile) = self.profile(request.profile.as_str()) else {
            return deny(
                DenialKind::UnknownProfile,
                format!("unknown profile {:?}", request.profile.as_str()),
                None,
            );
        };
        let rule_base = format!("profile:{}", profile.name);
        let Some(rule) = profile.allow.iter().find(|r| r.matches(caller.spiffe_id())) else {
            return deny(
                DenialKind::NotPermitted,
                format!(
                    "{} may not request profile {:?}",
                    caller.spiffe_id(),
                    profile.name.as_str()
                ),
                Some(format!("{rule_base}/allow")),
            );
        };
        if profile.require_intent && request.intent.is_none() {
            return deny(
                DenialKind::OverAsk,
                format!(
                    "profile {:?} requires a stated intent (action and target)",
                    profile.name.as_str()
                ),
                Some(format!("{rule_base}/require_intent")),
            );
        }
        let scopes: BTreeSet<Scope> = if request.scopes.is_empty() {
            if profile.default_scopes.is_empty() {
                return deny(
                    DenialKind::OverAsk,
                    format!(
                        "profile {:?} has no default scopes; name at least one",
                        profile.name.as_str()
                    ),
                    Some(format!("{rule_base}/scopes")),
                );
            }
            profile.default_scopes.clone()
        } else {
            request.scopes.clone()
        };
        let beyond: Vec<&str> = scopes
            .difference(&profile.scopes)
            .map(|s| s.as_str())
            .collect();
        if !beyond.is_empty() {
            return deny(
                DenialKind::NotPermitted,
                format!(
                    "scope {} exceeds the ceiling of profile {:?}",
                    beyond.join(", "),
                    profile.name.as_str()
                ),
                Some(format!("{rule_base}/scopes")),
            );
        }
        let ttl = request.ttl.unwrap_or(profile.default_ttl);
        if ttl > profile.max_ttl {
            return deny(
                DenialKind::OverAsk,
                format!(
                    "ttl {} exceeds the max_ttl {} of profile {:?}",
                    format_duration(ttl),
                    format_duration(profile.max_ttl),
                    profile.name.as_str()
                ),
                Some(format!("{rule_base}/max_ttl")),
            );
        }
        Decision::Allow(Grant {
            scopes: scopes.into_iter().collect(),
            ttl,
            intent: request.intent.clone(),
            rule: format!("{rule_base}/allow:{}", rule.text()),
            policy_hash: self.hash.clone(),
            profile,
        })
    }

    fn authorize_admin(
        &self,
        caller: &VerifiedCaller,
        action: AdminAction,
    ) -> Result<String, Denial> {
        if self.admins.iter().any(|a| a == caller.spiffe_id()) {
            Ok(format!("admins:{}", caller.spiffe_id()))
        } else {
            Err(Denial {
                kind: DenialKind::NotPermitted,
                reason: format!(
                    "{} is not a platform admin ({action:?} refused)",
                    caller.spiffe_id()
                ),
                rule: Some("admins".into()),
            })
        }
    }

    fn profile(&self, name: &str) -> Option<Arc<Profile>> {
        self.profiles
            .iter()
            .find(|p| p.name.as_str() == name)
            .cloned()
    }

    fn hash(&self) -> &str {
        &self.hash
    }
}
