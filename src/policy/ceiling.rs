//! The profile ceiling, checked in Rust before Cedar sees a request, so no policy can
//! widen a grant: scopes within the profile's, TTL within its maximum (the break-glass
//! maximum under break-glass), the intent and the intent fields it requires, and scopes
//! rendered through the profile's template.

use std::collections::BTreeSet;

use super::RequestContext;
use crate::clock::format_duration;
use crate::config::Profile;
use crate::domain::{CredentialRequest, Scope};

/// The profile ceiling: every way the request exceeds it.
pub(super) fn ceiling(
    profile: &Profile,
    request: &CredentialRequest,
    ctx: &RequestContext,
) -> (Vec<String>, bool, BTreeSet<Scope>, std::time::Duration) {
    let name = profile.name.as_str();
    let mut v = Vec::new();
    let mut permission = false;
    if request.delegation.is_some() && !profile.delegable {
        permission = true;
        v.push(format!(
            "profile {name:?} is not delegable: token exchange may not issue it"
        ));
    }
    if profile.require_intent && request.intent.is_none() {
        v.push(format!(
            "profile {name:?} requires a stated intent (action and target)"
        ));
    }
    if let Some(intent) = &request.intent {
        let missing: Vec<&str> = profile
            .require_intent_fields
            .iter()
            .map(String::as_str)
            .filter(|f| match *f {
                "ticket" => intent.ticket.is_none(),
                "artifact_digest" => intent.artifact_digest.is_none(),
                "justification" => intent.justification.is_none(),
                _ => true,
            })
            .collect();
        if !missing.is_empty() {
            v.push(format!(
                "profile {name:?} requires the intent to state {}",
                missing.join(", ")
            ));
        }
    }
    let scopes = if request.scopes.is_empty() {
        if profile.default_scopes.is_empty() {
            v.push(format!(
                "profile {name:?} has no default scopes; name at least one"
            ));
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
        permission = true;
        v.push(format!(
            "scope {} exceeds the ceiling of profile {name:?}",
            beyond.join(", ")
        ));
    }
    let mut max = profile.max_ttl;
    let mut default = profile.default_ttl;
    if ctx.break_glass {
        match profile.break_glass_max_ttl {
            None => v.push(format!("profile {name:?} does not allow break-glass")),
            Some(bg) => {
                max = bg;
                default = default.min(bg);
            }
        }
        if request
            .intent
            .as_ref()
            .and_then(|i| i.justification.as_ref())
            .is_none()
        {
            v.push("break-glass requires an intent justification".into());
        }
    }
    let ttl = request.ttl.unwrap_or(default);
    if ttl > max {
        v.push(format!(
            "ttl {} exceeds the {} {} of profile {name:?}",
            format_duration(ttl),
            if ctx.break_glass {
                "break_glass_max_ttl"
            } else {
                "max_ttl"
            },
            format_duration(max),
        ));
    }
    if profile
        .scope_template
        .as_deref()
        .is_some_and(|t| t.contains("{target}"))
        && request.intent.is_none()
    {
        v.push(format!(
            "profile {name:?} derives scopes from the intent target; state an intent"
        ));
    }
    (v, permission, scopes, ttl)
}

pub(super) fn render_scopes(
    profile: &Profile,
    scopes: &BTreeSet<Scope>,
    request: &CredentialRequest,
) -> Result<Vec<Scope>, String> {
    let Some(t) = &profile.scope_template else {
        return Ok(scopes.iter().cloned().collect());
    };
    let target = request
        .intent
        .as_ref()
        .map(|i| i.target.as_str())
        .unwrap_or_default();
    scopes
        .iter()
        .map(|s| {
            let rendered = t.replace("{scope}", s.as_str()).replace("{target}", target);
            Scope::parse(&rendered).map_err(|e| e.to_string())
        })
        .collect()
}
