//! Asking Cedar one question: the principal (a registered workload, or a person as a
//! `Person` entity with the parents of their sign-in) may take `action` on `resource`.
//! Cedar skips a policy whose evaluation errors; here any error denies, naming it.

use std::collections::{HashMap, HashSet};

use cedar_policy::{Context, Entity, EntityUid, PolicyId, Request};
use serde_json::json;
use spiffe::SpiffeId;

use super::{restricted, s, uid, CedarPolicy, EvalError};
use crate::config::Identity;
use crate::domain::{Person, Principal};
use crate::policy::{Denial, DenialKind, PolicyError};

impl CedarPolicy {
    /// Evaluates one Cedar request; returns (allowed, determining policy ids).
    pub(super) fn evaluate(
        &self,
        principal: &SpiffeId,
        action: &str,
        resource: EntityUid,
        context: serde_json::Value,
    ) -> Result<(bool, Vec<PolicyId>), EvalError> {
        let principal = uid("Workload", &principal.to_string())?;
        self.evaluate_as(principal, None, action, resource, context)
    }

    /// A person as a Cedar principal: `Person::"<id>"` whose parents are the roles and
    /// approver groups their claims mapped to (not in the config's entities: added for
    /// this one question).
    pub(super) fn person_entity(&self, p: &Person) -> Result<Entity, PolicyError> {
        let mut parents = HashSet::new();
        for r in &p.roles {
            parents.insert(uid("Role", r)?);
        }
        for g in &p.approver_groups {
            parents.insert(uid("ApproverGroup", g)?);
        }
        let attrs = HashMap::from([("email".to_owned(), s(p.email.as_deref().unwrap_or("")))]);
        Entity::new(uid("Person", &p.id)?, attrs, parents)
            .map_err(|e| PolicyError(format!("policy entity for {}: {e}", p.id)))
    }

    pub(super) fn evaluate_as(
        &self,
        principal: EntityUid,
        extra: Option<Entity>,
        action: &str,
        resource: EntityUid,
        context: serde_json::Value,
    ) -> Result<(bool, Vec<PolicyId>), EvalError> {
        let action = Self::action(action)?;
        // Built as expressions, not parsed from JSON text: the same values, without a
        // schema-guided JSON parse on every request (Request::new still checks them
        // against the schema).
        let pairs = match context {
            serde_json::Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| Ok((k, restricted(v)?)))
                .collect::<Result<Vec<_>, PolicyError>>()?,
            _ => return Err(PolicyError("policy context is not a record".into()).into()),
        };
        let context =
            Context::from_pairs(pairs).map_err(|e| PolicyError(format!("policy context: {e}")))?;
        let request = Request::new(principal, action, resource, context, Some(&self.schema))
            .map_err(|e| PolicyError(format!("policy request: {e}")))?;
        let with_extra;
        let entities = match extra {
            None => &self.entities,
            Some(e) => {
                with_extra = self
                    .entities
                    .clone()
                    .add_entities([e], Some(&self.schema))
                    .map_err(|e| PolicyError(format!("policy entities: {e}")))?;
                &with_extra
            }
        };
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, entities);
        // Cedar skips a policy whose evaluation errors and decides without it: a `forbid`
        // that overflows on a caller-controlled value would then fail open. Any error
        // denies instead, naming the policy.
        let mut errored = response.diagnostics().errors().peekable();
        if errored.peek().is_some() {
            let (ids, details): (Vec<String>, Vec<String>) = errored
                .map(
                    |cedar_policy::AuthorizationError::PolicyEvaluationError(e)| {
                        (e.policy_id().to_string(), e.inner().to_string())
                    },
                )
                .unzip();
            return Err(EvalError::Errored { ids, details });
        }
        let ids = response.diagnostics().reason().cloned().collect();
        Ok((response.decision() == cedar_policy::Decision::Allow, ids))
    }

    /// A yes/no Cedar question with no context (admin actions, reviewing): `Ok` carries
    /// the permitting policy ids, a refusal is built by `deny` from the deciding ids.
    pub(super) fn permit(
        &self,
        principal: &Principal,
        action: &str,
        resource: EntityUid,
        deny: impl FnOnce(&str) -> Denial,
    ) -> Result<String, Denial> {
        let (who, extra) = match principal {
            Principal::Workload(id) => {
                if self.registered(id).is_none() {
                    return Err(Self::unregistered(id));
                }
                (uid("Workload", &id.to_string()), None)
            }
            Principal::Person(p) => (
                uid("Person", &p.id),
                Some(self.person_entity(p).map_err(Self::internal)?),
            ),
        };
        let who = who.map_err(Self::internal)?;
        let (allowed, ids) = self
            .evaluate_as(who, extra, action, resource, json!({}))
            .map_err(Self::internal)?;
        let ids = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if allowed {
            Ok(ids)
        } else {
            Err(deny(&ids))
        }
    }

    pub(super) fn registered(&self, id: &SpiffeId) -> Option<&Identity> {
        self.directory.identity(id)
    }

    pub(super) fn unregistered(id: &SpiffeId) -> Denial {
        Denial {
            kind: DenialKind::Unregistered,
            reason: format!("{id} is not a registered identity"),
            rule: Some("inventory".into()),
            violations: Vec::new(),
        }
    }

    pub(super) fn internal(e: impl Into<EvalError>) -> Denial {
        match e.into() {
            EvalError::Internal(e) => {
                tracing::error!(error = %e, "policy evaluation failed; denying");
                Denial {
                    kind: DenialKind::NotPermitted,
                    reason: "policy evaluation failed".into(),
                    rule: None,
                    violations: Vec::new(),
                }
            }
            EvalError::Errored { ids, details } => {
                let ids = ids.join(",");
                tracing::warn!(policies = %ids, errors = ?details, "a policy errored during evaluation; denying");
                Denial {
                    kind: DenialKind::NotPermitted,
                    reason: format!(
                        "policy {ids} failed to evaluate ({}); denied (an erroring policy never allows)",
                        details.join("; ")
                    ),
                    rule: Some(ids),
                    violations: Vec::new(),
                }
            }
        }
    }
}
