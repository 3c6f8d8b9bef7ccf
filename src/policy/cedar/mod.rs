//! Cedar-backed [`Policy`]: compiled once at load (schema-validated), evaluated per
//! request with no I/O. `evaluate` asks Cedar one question (a workload or a person as
//! the principal; any evaluation error denies).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::json;
use spiffe::SpiffeId;

use super::{
    ceiling, AccessPath, AdminAction, ApprovalNeed, Decision, Denial, DenialKind, Directory, Grant,
    Parties, Policy, RequestContext,
};

use crate::config::Config;
use crate::domain::{CredentialRequest, Principal, PERSON_ID_PREFIX};

/// A policy that failed to load, with the location of the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Why an evaluation produced no decision: both deny.
#[derive(Debug)]
enum EvalError {
    /// The request could not be formed (a bug or a schema mismatch).
    Internal(PolicyError),
    /// Policies (by id) raised evaluation errors, e.g. an overflow on a request value.
    Errored {
        ids: Vec<String>,
        details: Vec<String>,
    },
}

impl From<PolicyError> for EvalError {
    fn from(e: PolicyError) -> Self {
        Self::Internal(e)
    }
}

const NS: &str = "SpiffeBroker";

mod evaluate;

/// Renders a Cedar diagnostic as `file:line:col: message (help)` lines.
fn locate(diag: &dyn miette::Diagnostic, file: &str, text: &str) -> String {
    let mut out = String::new();
    let msg = diag.to_string();
    let labels: Vec<_> = diag.labels().map(|l| l.collect()).unwrap_or_default();
    if labels.is_empty() {
        out.push_str(&format!("{file}: {msg}"));
    }
    for l in labels {
        let offset = l.offset().min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rsplit('\n')
            .next()
            .map(|s| s.chars().count())
            .unwrap_or(0)
            + 1;
        let label = l.label().map(|s| format!(" [{s}]")).unwrap_or_default();
        out.push_str(&format!("{file}:{line}:{col}: {msg}{label}"));
    }
    if let Some(help) = diag.help() {
        out.push_str(&format!(" (help: {help})"));
    }
    for related in diag.related().into_iter().flatten() {
        out.push_str(&format!("\n{}", locate(related, file, text)));
    }
    out
}

/// The schema's entity types, parsed once: Cedar parses a type name with its full
/// grammar, which was a visible share of every request's time.
static ENTITY_TYPES: std::sync::LazyLock<Vec<(&'static str, EntityTypeName)>> =
    std::sync::LazyLock::new(|| {
        [
            "Workload",
            "Action",
            "Profile",
            "Broker",
            "Role",
            "ApproverGroup",
        ]
        .into_iter()
        .filter_map(|k| Some((k, EntityTypeName::from_str(&format!("{NS}::{k}")).ok()?)))
        .collect()
    });

fn uid(kind: &str, id: &str) -> Result<EntityUid, PolicyError> {
    let t = match ENTITY_TYPES.iter().find(|(k, _)| *k == kind) {
        Some((_, t)) => t.clone(),
        None => EntityTypeName::from_str(&format!("{NS}::{kind}"))
            .map_err(|e| PolicyError(e.to_string()))?,
    };
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

/// The compiled policy set and entities.
pub struct CedarPolicy {
    schema: Schema,
    policies: PolicySet,
    entities: Entities,
    directory: Directory,
    hash: String,
    authorizer: Authorizer,
    /// Each approval-gated permit's (`@approval_group`, `@approvals`), read once at load:
    /// Cedar parses the annotation key on every lookup.
    approval_rules: HashMap<PolicyId, (String, u32)>,
}

impl std::fmt::Debug for CedarPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CedarPolicy")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path)
        .map_err(|e| PolicyError(format!("cannot read {}: {e}", path.display())))
}

impl CedarPolicy {
    /// Loads the schema and policy files named by the config, validates every policy
    /// against the schema (strict mode), and builds the entities from the config.
    pub fn load(config: &Config) -> Result<Self, PolicyError> {
        let schema_path = &config.policy.schema;
        let schema_text = read(schema_path)?;
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_text).map_err(|e| {
            PolicyError(locate(&e, &schema_path.display().to_string(), &schema_text))
        })?;

        let mut policies = PolicySet::new();
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        hasher.update(schema_text.as_bytes());
        let mut sources: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut approval_rules = HashMap::new();
        for path in &config.policy.files {
            let file = path.display().to_string();
            let text = read(path)?;
            let parsed =
                PolicySet::from_str(&text).map_err(|e| PolicyError(locate(&e, &file, &text)))?;
            for (n, p) in parsed.policies().enumerate() {
                let id = p.annotation("id").map(str::to_owned).unwrap_or_else(|| {
                    format!(
                        "{}#{n}",
                        path.file_name()
                            .and_then(|f| f.to_str())
                            .unwrap_or("policy")
                    )
                });
                if p.annotation("approval_group").is_some() != p.annotation("approvals").is_some() {
                    return Err(PolicyError(format!(
                        "{file}: policy {id:?} needs both @approval_group and @approvals, or neither"
                    )));
                }
                if let Some(n) = p.annotation("approvals") {
                    if n.parse::<u32>().map_or(true, |n| n == 0 || n > 16) {
                        return Err(PolicyError(format!(
                            "{file}: policy {id:?}: @approvals must be 1..=16"
                        )));
                    }
                }
                if let Some(g) = p.annotation("approval_group") {
                    if !config.approver_groups.iter().any(|x| x.name == g) {
                        return Err(PolicyError(format!(
                            "{file}: policy {id:?}: unknown approver group {g:?}"
                        )));
                    }
                }
                if let (Some(g), Some(n)) = (
                    p.annotation("approval_group"),
                    p.annotation("approvals").and_then(|n| n.parse().ok()),
                ) {
                    approval_rules.insert(PolicyId::new(&id), (g.to_owned(), n));
                }
                sources.insert(id.clone(), (file.clone(), text.clone()));
                policies
                    .add(p.new_id(PolicyId::new(&id)))
                    .map_err(|e| PolicyError(format!("{file}: policy {id:?}: {e}")))?;
            }
            hasher.update(file.as_bytes());
            hasher.update(text.as_bytes());
        }
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !validation.validation_passed() {
            let errors: Vec<String> = validation
                .validation_errors()
                .map(|e| {
                    let (file, text) = sources
                        .get(e.policy_id().to_string().as_str())
                        .cloned()
                        .unwrap_or_default();
                    locate(e, &file, &text)
                })
                .collect();
            return Err(PolicyError(errors.join("\n")));
        }

        let entities = Self::entities(config, &schema)?;
        let canonical = json!({
            "identities": config.identities.iter().map(|i| json!([i.spiffe_id.to_string(), i.owner, i.environment, i.roles])).collect::<Vec<_>>(),
            "groups": config.approver_groups.iter().map(|g| json!([g.name, g.members.iter().map(|m| m.to_string()).collect::<Vec<_>>()])).collect::<Vec<_>>(),
            "profiles": config.profiles.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
        });
        hasher.update(canonical.to_string().as_bytes());
        Ok(Self {
            schema,
            policies,
            entities,
            directory: Directory::new(config),
            hash: hex::encode(hasher.finish().as_ref()),
            authorizer: Authorizer::new(),
            approval_rules,
        })
    }

    fn entities(config: &Config, schema: &Schema) -> Result<Entities, PolicyError> {
        let err = |e: &dyn std::fmt::Display| {
            PolicyError(format!("building policy entities from the config: {e}"))
        };
        let mut list = Vec::new();
        let mut roles: BTreeSet<String> = BTreeSet::new();
        for i in &config.identities {
            let mut parents = HashSet::new();
            for r in &i.roles {
                roles.insert(r.clone());
                parents.insert(uid("Role", r)?);
            }
            for g in config
                .approver_groups
                .iter()
                .filter(|g| g.members.contains(&i.spiffe_id))
            {
                parents.insert(uid("ApproverGroup", &g.name)?);
            }
            let attrs = HashMap::from([
                ("owner".to_owned(), s(&i.owner)),
                ("environment".to_owned(), s(&i.environment)),
            ]);
            list.push(
                Entity::new(uid("Workload", &i.spiffe_id.to_string())?, attrs, parents)
                    .map_err(|e| err(&e))?,
            );
        }
        for g in &config.approver_groups {
            for m in &g.members {
                if config.identity(m).is_none() {
                    return Err(PolicyError(format!(
                        "approver group {:?}: member {m} is not in [[identities]]",
                        g.name
                    )));
                }
            }
            list.push(Entity::new_no_attrs(
                uid("ApproverGroup", &g.name)?,
                HashSet::new(),
            ));
        }
        for r in roles {
            list.push(Entity::new_no_attrs(uid("Role", &r)?, HashSet::new()));
        }
        for p in &config.profiles {
            let attrs = HashMap::from([
                ("audience".to_owned(), s(&p.audience)),
                (
                    "max_ttl_secs".to_owned(),
                    RestrictedExpression::new_long(p.max_ttl.as_secs() as i64),
                ),
                (
                    "break_glass_allowed".to_owned(),
                    RestrictedExpression::new_bool(p.break_glass_max_ttl.is_some()),
                ),
            ]);
            list.push(
                Entity::new(uid("Profile", p.name.as_str())?, attrs, HashSet::new())
                    .map_err(|e| err(&e))?,
            );
        }
        list.push(Entity::new_no_attrs(
            uid("Broker", "broker")?,
            HashSet::new(),
        ));
        Entities::from_entities(list, Some(schema)).map_err(|e| err(&e))
    }

    fn action(name: &str) -> Result<EntityUid, PolicyError> {
        uid("Action", name)
    }
}

impl Policy for CedarPolicy {
    fn decide(
        &self,
        caller: &SpiffeId,
        request: &CredentialRequest,
        ctx: &RequestContext,
    ) -> Decision {
        let _span = tracing::debug_span!("policy", policy_hash = %self.hash()).entered();
        if self.registered(caller).is_none() {
            return Decision::Deny(Self::unregistered(caller));
        }
        let Some(profile) = self.directory.profile(request.profile.as_str()) else {
            return Decision::Deny(Denial {
                kind: DenialKind::UnknownProfile,
                reason: format!("unknown profile {:?}", request.profile.as_str()),
                rule: None,
                violations: Vec::new(),
            });
        };
        let (violations, permission, scopes, ttl) = ceiling::ceiling(&profile, request, ctx);
        if !violations.is_empty() {
            return Decision::Deny(Denial {
                kind: if permission {
                    DenialKind::NotPermitted
                } else {
                    DenialKind::OverAsk
                },
                reason: violations.join("; "),
                rule: Some(format!("profile:{}/ceiling", profile.name)),
                violations,
            });
        }
        let rendered = match ceiling::render_scopes(&profile, &scopes, request) {
            Ok(r) => r,
            Err(e) => {
                return Decision::Deny(Denial {
                    kind: DenialKind::OverAsk,
                    reason: format!("intent target cannot form a scope: {e}"),
                    rule: Some(format!("profile:{}/scope_template", profile.name)),
                    violations: vec![e],
                })
            }
        };
        let approvers: BTreeSet<&String> = ctx.approvals.iter().collect();
        let intent = request.intent.as_ref().map(|i| {
            let mut o = json!({"action": i.action, "target": i.target});
            if let Some(d) = &i.artifact_digest {
                o["artifact_digest"] = json!(d);
            }
            if let Some(t) = &i.ticket {
                o["ticket"] = json!(t);
            }
            if let Some(j) = &i.justification {
                o["justification"] = json!(j);
            }
            o
        });
        let mut context = json!({
            "scopes": scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "ttl_secs": ttl.as_secs() as i64,
            "auth_method": ctx.auth_method.as_str(),
            "now": ctx.now,
            "hour_utc": ctx.now.rem_euclid(86_400) / 3600,
            "break_glass": ctx.break_glass,
            "approval_count": 0,
            "approvers": [],
        });
        if let Some(i) = intent {
            context["intent"] = i;
        }
        if let Some(d) = &request.delegation {
            context["delegation"] = json!({
                "subject": d.subject.id,
                "subject_type": d.subject.kind.as_str(),
                "subject_token_type": d.subject_token_type.uri(),
                "actors": d.actors.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                "actor_types": d.actors.iter().map(|a| a.kind.as_str()).collect::<Vec<_>>(),
                "depth": d.actors.len() as i64,
                "subject_groups": d.subject_groups,
            });
        }
        let resource = match uid("Profile", profile.name.as_str()) {
            Ok(r) => r,
            Err(e) => return Decision::Deny(Self::internal(e)),
        };
        let mut grant = Grant {
            profile: profile.clone(),
            scopes: rendered,
            ttl,
            intent: request.intent.clone(),
            rule: String::new(),
            policy_hash: self.hash.clone(),
            approvers: Vec::new(),
            break_glass: ctx.break_glass,
        };
        // Valid approvals: distinct, never the requester or anyone in its verified
        // delegation chain, and each approver may review.
        let delegation = request.delegation.as_ref();
        let requester = caller.to_string();
        let valid: Vec<String> = approvers
            .iter()
            .filter(|a| {
                a.as_str() != requester && !delegation.is_some_and(|d| d.involves(a.as_str()))
            })
            .filter(|a| match SpiffeId::new(a.as_str()) {
                // A workload approver must still be allowed to review now.
                Ok(id) => self
                    .authorize_review(&Principal::Workload(id), profile.name.as_str())
                    .is_ok(),
                // A person's approval was authorized at review time from the roles and
                // groups of their sign-in (the ledger records only verified sessions'
                // ids); their claims are not at hand to ask again.
                Err(_) => a.starts_with(PERSON_ID_PREFIX),
            })
            .map(|a| a.to_string())
            .collect();
        context["approval_count"] = json!(valid.len());
        context["approvers"] = json!(valid);
        let (allowed, ids) = match self.evaluate(caller, "issue", resource, context) {
            Ok(v) => v,
            Err(e) => return Decision::Deny(Self::internal(e)),
        };
        let id_list = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if !allowed {
            let reason = if ids.is_empty() {
                format!(
                    "{caller} may not request profile {:?} (no policy permits it)",
                    profile.name.as_str()
                )
            } else {
                format!("forbidden by policy {id_list}")
            };
            return Decision::Deny(Denial {
                kind: DenialKind::NotPermitted,
                reason,
                rule: (!ids.is_empty()).then_some(id_list),
                violations: Vec::new(),
            });
        }
        // A permit without approval annotations decides on its own.
        let mut needs: Vec<(String, String, u32)> = Vec::new();
        for id in &ids {
            match self.approval_rules.get(id) {
                Some((g, n)) => needs.push((id.to_string(), g.clone(), *n)),
                None => {
                    grant.rule = id.to_string();
                    return Decision::Allow(grant);
                }
            }
        }
        needs.sort_by_key(|(id, _, n)| (*n, id.clone()));
        let Some((rule, group, threshold)) = needs.into_iter().next() else {
            return Decision::Deny(Self::internal(PolicyError(
                "allow without a determining policy".into(),
            )));
        };
        grant.rule = rule.clone();
        let members = self.directory.group_members(&group);
        // Separation of duties, with the group now known: an approval on record from
        // someone barred (the owner rule may depend on the group) does not count.
        let parties = Parties {
            requester: &requester,
            delegation,
            group: &group,
        };
        let counted: Vec<String> = valid
            .into_iter()
            .filter(|a| {
                let member = if a.starts_with(PERSON_ID_PREFIX) {
                    ctx.person_approvals_group.as_deref() == Some(group.as_str())
                } else {
                    members.contains(a)
                };
                member && self.directory.review_conflict(parties, a).is_none()
            })
            .collect();
        if ctx.break_glass {
            return Decision::Deny(Denial {
                kind: DenialKind::NotPermitted,
                reason: format!(
                    "no policy permits break-glass for profile {:?}",
                    profile.name.as_str()
                ),
                rule: Some(rule),
                violations: Vec::new(),
            });
        }
        if counted.len() as u32 >= threshold {
            grant.approvers = counted;
            return Decision::Allow(grant);
        }
        let eligible = members
            .into_iter()
            .filter(|m| self.directory.review_conflict(parties, m).is_none())
            .collect();
        let need = ApprovalNeed {
            group,
            threshold,
            have: counted.len() as u32,
            eligible,
            rule,
            policy_hash: self.hash.clone(),
        };
        Decision::RequireApproval(grant, need)
    }

    fn authorize_admin(&self, caller: &Principal, action: AdminAction) -> Result<String, Denial> {
        let resource = uid("Broker", "broker").map_err(Self::internal)?;
        if action == AdminAction::ReadLog {
            // An auditor may read the log; so may whoever may administer (also under a
            // schema written before the `audit` action existed).
            let audit = self.permit(caller, "audit", resource.clone(), |_| Denial {
                kind: DenialKind::NotPermitted,
                reason: String::new(),
                rule: None,
                violations: Vec::new(),
            });
            if audit.is_ok() {
                return audit;
            }
        }
        let name = match action {
            AdminAction::Revoke => "revoke",
            _ => "administer",
        };
        self.permit(caller, name, resource, |ids| Denial {
            kind: DenialKind::NotPermitted,
            reason: format!("{caller} is not a platform admin ({action:?} refused)"),
            rule: (!ids.is_empty()).then(|| ids.to_owned()),
            violations: Vec::new(),
        })
    }

    fn authorize_review(&self, reviewer: &Principal, profile: &str) -> Result<String, Denial> {
        let resource = uid("Profile", profile).map_err(Self::internal)?;
        self.permit(reviewer, "review", resource, |_| Denial {
            kind: DenialKind::NotPermitted,
            reason: format!("{reviewer} may not review requests for profile {profile:?}"),
            rule: None,
            violations: Vec::new(),
        })
    }

    fn paths(&self, id: &SpiffeId) -> Vec<AccessPath> {
        use cedar_policy::{ActionConstraint, Effect, PrincipalConstraint, ResourceConstraint};
        let Some(identity) = self.registered(id) else {
            return Vec::new();
        };
        let Ok(me) = uid("Workload", &id.to_string()) else {
            return Vec::new();
        };
        let mut mine = vec![me.clone()];
        mine.extend(identity.roles.iter().filter_map(|r| uid("Role", r).ok()));
        mine.extend(
            self.directory
                .groups_of(id)
                .iter()
                .filter_map(|g| uid("ApproverGroup", g).ok()),
        );
        let workload_type = EntityTypeName::from_str(&format!("{NS}::Workload")).ok();
        let mut out = Vec::new();
        for p in self
            .policies
            .policies()
            .filter(|p| p.effect() == Effect::Permit)
        {
            let applies = match p.principal_constraint() {
                PrincipalConstraint::Any => true,
                PrincipalConstraint::Eq(u) => u == me,
                PrincipalConstraint::In(u) => mine.contains(&u),
                PrincipalConstraint::Is(t) => Some(&t) == workload_type.as_ref(),
                PrincipalConstraint::IsIn(t, u) => {
                    Some(&t) == workload_type.as_ref() && mine.contains(&u)
                }
            };
            if !applies {
                continue;
            }
            let actions: Vec<String> = match p.action_constraint() {
                ActionConstraint::Any => vec![
                    "issue".into(),
                    "review".into(),
                    "revoke".into(),
                    "administer".into(),
                ],
                ActionConstraint::Eq(a) => vec![a.id().unescaped().to_owned()],
                ActionConstraint::In(v) => {
                    v.iter().map(|a| a.id().unescaped().to_owned()).collect()
                }
            };
            let resource = match p.resource_constraint() {
                ResourceConstraint::Eq(u)
                | ResourceConstraint::In(u)
                | ResourceConstraint::IsIn(_, u) => u.id().unescaped().to_owned(),
                ResourceConstraint::Any | ResourceConstraint::Is(_) => "*".to_owned(),
            };
            let approvals = self.approval_rules.get(p.id()).cloned();
            for action in actions {
                out.push(AccessPath {
                    action,
                    resource: resource.clone(),
                    policy: p.id().to_string(),
                    conditional: p.has_non_scope_constraint(),
                    approvals: approvals.clone(),
                });
            }
        }
        out.sort_by(|a, b| {
            (&a.action, &a.resource, &a.policy).cmp(&(&b.action, &b.resource, &b.policy))
        });
        out
    }

    fn directory(&self) -> &Directory {
        &self.directory
    }

    fn hash(&self) -> &str {
        &self.hash
    }
}

/// A JSON context value as a Cedar expression (records, sets, strings, longs, booleans:
/// what the schema's `IssueContext` holds).
fn restricted(v: serde_json::Value) -> Result<cedar_policy::RestrictedExpression, PolicyError> {
    use cedar_policy::RestrictedExpression as R;
    Ok(match v {
        serde_json::Value::String(s) => R::new_string(s),
        serde_json::Value::Bool(b) => R::new_bool(b),
        serde_json::Value::Number(n) => R::new_long(
            n.as_i64()
                .ok_or_else(|| PolicyError(format!("policy context: {n} is not a long")))?,
        ),
        serde_json::Value::Array(a) => R::new_set(
            a.into_iter()
                .map(restricted)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        serde_json::Value::Object(m) => R::new_record(
            m.into_iter()
                .map(|(k, v)| Ok((k, restricted(v)?)))
                .collect::<Result<Vec<_>, PolicyError>>()?,
        )
        .map_err(|e| PolicyError(format!("policy context: {e}")))?,
        serde_json::Value::Null => {
            return Err(PolicyError(
                "policy context: null has no Cedar value".into(),
            ))
        }
    })
}
