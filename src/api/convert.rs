//! proto ⇄ domain conversions. Parsing refuses anything invalid with INVALID_ARGUMENT.

use std::collections::BTreeSet;

use prost_types::Timestamp;

use super::DEFAULT_PAGE_SIZE;
use crate::broker::{Explanation, InventoryEntry};
use crate::domain::delegation::MayAct;
use crate::domain::{
    parse_ttl, AccessRequest, AccessState, CredentialRequest, Delegation, Intent, Lease,
    LeaseFilter, LeaseId, LeaseState, Lock, ProfileName, RevocationEvent, RevokeSelector, Scope,
    SubjectTokenType, Verdict,
};
use crate::error::BrokerError;
use crate::issuer::Credential;
use crate::proto::v1 as pb;
use crate::store::Receipt;

/// Most scopes one request may name.
pub const MAX_SCOPES: usize = 32;

fn invalid(m: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument(m.into())
}

/// Parses an `IssueCredentialRequest`.
pub fn parse_issue_request(
    r: &pb::IssueCredentialRequest,
) -> Result<CredentialRequest, BrokerError> {
    let profile = ProfileName::parse(&r.profile)?;
    if r.scopes.len() > MAX_SCOPES {
        return Err(invalid(format!("at most {MAX_SCOPES} scopes per request")));
    }
    let scopes = r
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let ttl = r.ttl.map(|d| parse_ttl(d.seconds, d.nanos)).transpose()?;
    let intent = match &r.intent {
        None => None,
        // Absent only when every field is empty: details without an action and target are
        // refused by the parser below, never silently dropped.
        Some(i) if *i == pb::Intent::default() => None,
        Some(i) => Some(Intent::parse(&i.action, &i.target)?.with_details(
            &i.artifact_digest,
            &i.ticket,
            &i.justification,
            &i.on_behalf_of,
        )?),
    };
    Ok(CredentialRequest {
        profile,
        scopes,
        ttl,
        intent,
        delegation: None,
    })
}

/// Parses an optional access request id.
pub fn parse_request_id(id: &str) -> Result<Option<String>, BrokerError> {
    if id.is_empty() {
        return Ok(None);
    }
    Ok(Some(LeaseId::parse(id)?.to_string()))
}

/// Parses an optional `may_act` SPIFFE ID.
pub fn parse_may_act(id: &str) -> Result<Option<MayAct>, BrokerError> {
    if id.is_empty() {
        return Ok(None);
    }
    let sid = spiffe::SpiffeId::new(id).map_err(|e| invalid(format!("invalid may_act: {e}")))?;
    Ok(Some(MayAct {
        sub: sid.to_string(),
    }))
}

/// Parses an `ExchangeTokenRequest`: the request to issue and the subject token's type.
pub fn parse_exchange_request(
    r: &pb::ExchangeTokenRequest,
) -> Result<(CredentialRequest, SubjectTokenType), BrokerError> {
    if r.subject_token.is_empty() {
        return Err(invalid("subject_token is required"));
    }
    let kind = SubjectTokenType::parse(&r.subject_token_type)?;
    let req = parse_issue_request(&pb::IssueCredentialRequest {
        profile: r.profile.clone(),
        scopes: r.scopes.clone(),
        ttl: r.ttl,
        intent: r.intent.clone(),
        ..Default::default()
    })?;
    Ok((req, kind))
}

/// Parses a revocation selector.
pub fn parse_selector(
    s: Option<&pb::revoke_request::Selector>,
) -> Result<RevokeSelector, BrokerError> {
    use pb::revoke_request::Selector;
    let workload = |id: &str, field: &str| -> Result<String, BrokerError> {
        let parsed =
            spiffe::SpiffeId::new(id).map_err(|e| invalid(format!("invalid {field}: {e}")))?;
        if parsed.path().is_empty() {
            return Err(invalid(format!(
                "{field} must name a workload (it needs a path)"
            )));
        }
        Ok(parsed.to_string())
    };
    let person = |id: &str, field: &str| -> Result<String, BrokerError> {
        if id.len() > 512 || !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(invalid(format!(
                "invalid {field}: an oidc: id is 1..=512 printable characters"
            )));
        }
        Ok(id.to_owned())
    };
    match s {
        None => Err(invalid(
            "a selector is required: lease_id, spiffe_id, spiffe_id_prefix, profile, approver, access_request_id or all",
        )),
        Some(Selector::LeaseId(id)) => Ok(RevokeSelector::Lease(LeaseId::parse(id)?)),
        // A person signed in at an OpenID Provider is named by their `oidc:` id: as the
        // subject of delegated leases, or as the approver of leases.
        Some(Selector::SpiffeId(id)) if id.starts_with("oidc:") => Ok(RevokeSelector::SpiffeId(person(id, "spiffe_id")?)),
        Some(Selector::Approver(id)) if id.starts_with("oidc:") => Ok(RevokeSelector::Approver(person(id, "approver")?)),
        Some(Selector::SpiffeId(id)) => Ok(RevokeSelector::SpiffeId(workload(id, "spiffe_id")?)),
        Some(Selector::SpiffeIdPrefix(p)) => {
            let base = p.trim_end_matches('/');
            let parsed = spiffe::SpiffeId::new(base).map_err(|e| invalid(format!("invalid spiffe_id_prefix: {e}")))?;
            Ok(RevokeSelector::Prefix(format!("{parsed}/")))
        }
        Some(Selector::Profile(p)) => Ok(RevokeSelector::Profile(ProfileName::parse(p)?)),
        Some(Selector::Approver(a)) => Ok(RevokeSelector::Approver(workload(a, "approver")?)),
        Some(Selector::AccessRequestId(id)) => Ok(RevokeSelector::AccessRequest(LeaseId::parse(id)?.to_string())),
        Some(Selector::All(true)) => Ok(RevokeSelector::All),
        Some(Selector::All(false)) => Err(invalid("all must be true when used")),
    }
}

/// A lock as the API shows it.
pub fn lock_to_pb(l: &Lock) -> pb::Lock {
    pb::Lock {
        id: l.id.clone(),
        kind: l.kind.clone(),
        value: l.value.clone(),
        until: ts(l.until),
        reason: l.reason.clone(),
        created_by: l.created_by.clone(),
        created_at: ts(l.created_at),
    }
}

/// A revocation event as the feed carries it.
pub fn revocation_to_pb(e: &RevocationEvent) -> pb::RevocationEvent {
    pb::RevocationEvent {
        seq: e.seq,
        lease_id: e.lease_id.clone(),
        spiffe_id: e.spiffe_id.clone(),
        profile: e.profile.clone(),
        expires_at: ts(e.expires_at),
        revoked_at: ts(e.revoked_at),
        reason: e.reason.clone(),
        chain_hash: e.chain_hash.clone(),
        certificate_serial: e.certificate_serial.clone().unwrap_or_default(),
    }
}

/// Parses a lease listing request.
pub fn parse_list_filter(r: &pb::ListLeasesRequest) -> Result<LeaseFilter, BrokerError> {
    let spiffe_id = if r.spiffe_id.is_empty() {
        None
    } else {
        Some(
            spiffe::SpiffeId::new(&r.spiffe_id)
                .map_err(|e| invalid(format!("invalid spiffe_id: {e}")))?
                .to_string(),
        )
    };
    let state =
        match pb::LeaseState::try_from(r.state).map_err(|_| invalid("unknown lease state"))? {
            pb::LeaseState::Unspecified => None,
            pb::LeaseState::Active => Some(LeaseState::Active),
            pb::LeaseState::Released => Some(LeaseState::Released),
            pb::LeaseState::Revoked => Some(LeaseState::Revoked),
            pb::LeaseState::Expired => Some(LeaseState::Expired),
        };
    if r.page_size > 1000 {
        return Err(invalid("page_size must be at most 1000"));
    }
    let before = if r.page_token.is_empty() {
        None
    } else {
        let (at, id) = r
            .page_token
            .split_once(':')
            .ok_or_else(|| invalid("malformed page_token"))?;
        let at: i64 = at.parse().map_err(|_| invalid("malformed page_token"))?;
        Some((at, LeaseId::parse(id)?.to_string()))
    };
    let lease_id = if r.lease_id.is_empty() {
        None
    } else {
        Some(LeaseId::parse(&r.lease_id)?.to_string())
    };
    let derived_from = if r.derived_from.is_empty() {
        None
    } else {
        Some(LeaseId::parse(&r.derived_from)?.to_string())
    };
    Ok(LeaseFilter {
        spiffe_id,
        state,
        lease_id,
        derived_from,
        limit: if r.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            r.page_size
        },
        before,
    })
}

fn ts(secs: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// A lease as the API shows it.
pub fn lease_to_pb(l: &Lease) -> pb::Lease {
    pb::Lease {
        id: l.id.to_string(),
        profile: l.profile.to_string(),
        spiffe_id: l.spiffe_id.clone(),
        scopes: l.scopes.iter().map(|s| s.to_string()).collect(),
        audience: l.audience.clone(),
        state: match l.state {
            LeaseState::Active => pb::LeaseState::Active,
            LeaseState::Released => pb::LeaseState::Released,
            LeaseState::Revoked => pb::LeaseState::Revoked,
            LeaseState::Expired => pb::LeaseState::Expired,
        } as i32,
        issued_at: ts(l.issued_at),
        expires_at: ts(l.expires_at),
        max_expires_at: ts(l.max_expires_at),
        credential_sha256: l.credential_sha256.clone(),
        renewals: l.renewals,
        ended_at: l.ended_at.and_then(ts),
        end_reason: l.end_reason.clone().unwrap_or_default(),
        intent: l.intent.as_ref().map(intent_to_pb),
        backend_handle: l
            .backend
            .as_ref()
            .map(|b| b.handle.clone())
            .unwrap_or_default(),
        backend: l
            .backend
            .as_ref()
            .map(|b| b.kind.clone())
            .unwrap_or_default(),
        parent_lease_id: l.parent.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        subject: l.subject.clone().unwrap_or_default(),
    }
}

/// An intent as the API shows it.
pub fn intent_to_pb(i: &Intent) -> pb::Intent {
    pb::Intent {
        action: i.action.clone(),
        target: i.target.clone(),
        artifact_digest: i.artifact_digest.clone().unwrap_or_default(),
        ticket: i.ticket.clone().unwrap_or_default(),
        justification: i.justification.clone().unwrap_or_default(),
        on_behalf_of: i.on_behalf_of.clone(),
    }
}

/// An access request as the API shows it.
pub fn access_request_to_pb(a: &AccessRequest) -> pb::AccessRequest {
    let bound = a.request.grant.as_ref();
    pb::AccessRequest {
        id: a.id.clone(),
        requester: a.requester.clone(),
        profile: a.profile.to_string(),
        scopes: a.request.scopes.clone(),
        ttl: a.request.ttl_secs.map(|s| prost_types::Duration {
            seconds: s as i64,
            nanos: 0,
        }),
        intent: a.request.intent.as_ref().map(intent_to_pb),
        request_digest: a.digest.clone(),
        approver_group: a.group.clone(),
        threshold: a.threshold,
        approvals: a.approvers().len() as u32,
        state: match a.state {
            AccessState::Pending => pb::AccessRequestState::Pending,
            AccessState::Approved => pb::AccessRequestState::Approved,
            AccessState::Denied => pb::AccessRequestState::Denied,
            AccessState::Expired => pb::AccessRequestState::Expired,
            AccessState::Issued => pb::AccessRequestState::Issued,
        } as i32,
        created_at: ts(a.created_at),
        expires_at: ts(a.expires_at),
        break_glass: a.break_glass,
        post_review: a.post_review.clone().unwrap_or_default(),
        lease_id: a.lease_id.clone().unwrap_or_default(),
        reviews: a
            .reviews
            .iter()
            .map(|r| pb::Review {
                reviewer: r.reviewer.clone(),
                approve: r.verdict == Verdict::Approve,
                reason: r.reason.clone(),
                at: ts(r.at),
                post_review: r.post_review,
            })
            .collect(),
        granted_scopes: bound.map(|g| g.scopes.clone()).unwrap_or_default(),
        granted_ttl: bound.map(|g| prost_types::Duration {
            seconds: g.ttl_secs as i64,
            nanos: 0,
        }),
        auth_method: bound.map(|g| g.auth_method.clone()).unwrap_or_default(),
        key_sha256: bound.and_then(|g| g.key_sha256.clone()).unwrap_or_default(),
        profile_sha256: bound.map(|g| g.profile_sha256.clone()).unwrap_or_default(),
        delegation: a.request.delegation.as_ref().map(delegation_to_pb),
    }
}

/// A verified delegation chain as the API shows it.
pub fn delegation_to_pb(d: &Delegation) -> pb::Delegation {
    pb::Delegation {
        subject: d.subject.id.clone(),
        subject_type: d.subject.kind.as_str().to_owned(),
        actors: d.actors.iter().map(|a| a.id.clone()).collect(),
        parent_lease_id: d
            .parent_lease
            .as_ref()
            .map(|l| l.to_string())
            .unwrap_or_default(),
    }
}

/// A dry-run decision as the API shows it.
pub fn explanation_to_pb(e: &Explanation) -> pb::ExplainDecisionResponse {
    let (scopes, ttl) = e.grant.clone().unwrap_or_default();
    pb::ExplainDecisionResponse {
        decision: e.decision.to_owned(),
        determining_policies: e.policies.clone(),
        reason: e.reason.clone().unwrap_or_default(),
        violations: e.violations.clone(),
        approver_group: e
            .missing
            .as_ref()
            .map(|m| m.group.clone())
            .unwrap_or_default(),
        approvals_required: e.missing.as_ref().map_or(0, |m| m.threshold),
        approvals_present: e.missing.as_ref().map_or(0, |m| m.have),
        eligible_approvers: e
            .missing
            .as_ref()
            .map(|m| m.eligible.clone())
            .unwrap_or_default(),
        granted_scopes: scopes,
        granted_ttl: e.grant.as_ref().map(|_| prost_types::Duration {
            seconds: ttl.as_secs() as i64,
            nanos: 0,
        }),
        policy_hash: e.policy_hash.clone(),
    }
}

/// An inventory row as the API shows it.
pub fn identity_to_pb(i: &InventoryEntry) -> pb::Identity {
    let ms = |v: Option<i64>| {
        v.map(|ms| Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        })
    };
    pb::Identity {
        spiffe_id: i.spiffe_id.clone(),
        registered: i.registered,
        owner: i.owner.clone(),
        environment: i.environment.clone(),
        roles: i.roles.clone(),
        approver_groups: i.approver_groups.clone(),
        paths: i
            .paths
            .iter()
            .map(|p| pb::AccessPath {
                action: p.action.clone(),
                resource: p.resource.clone(),
                policy: p.policy.clone(),
                conditional: p.conditional,
                approval_group: p
                    .approvals
                    .as_ref()
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
                approvals: p.approvals.as_ref().map_or(0, |a| a.1),
            })
            .collect(),
        active_leases: i.active_leases,
        issued: i.issued,
        denied: i.denied,
        last_seen: ms(i.last_seen_ms),
        last_issued: ms(i.last_issued_ms),
        flags: i.flags.clone(),
    }
}

/// A credential as the API carries it, with its lease's expiry and backend handle;
/// `None` when a renewal extended the holder's credential in place.
pub fn credential_to_pb(c: &Credential, lease: &Lease) -> Option<pb::Credential> {
    if c.is_extension() {
        return None;
    }
    let kind = match c {
        Credential::Jwt { token, key_id } => pb::credential::Kind::Token(pb::SignedToken {
            jwt: token.expose().to_owned(),
            key_id: key_id.clone(),
            token_type: "Bearer".into(),
        }),
        Credential::Certificate { chain_pem, serial } => {
            pb::credential::Kind::Certificate(pb::CertificateChain {
                chain_pem: chain_pem.clone(),
                serial: serial.clone(),
            })
        }
        Credential::KeyValue { data } => pb::credential::Kind::Secret(pb::SecretData {
            data: data
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                .collect(),
        }),
    };
    Some(pb::Credential {
        kind: Some(kind),
        expires_at: ts(lease.expires_at),
        backend_handle: lease
            .backend
            .as_ref()
            .map(|b| b.handle.clone())
            .unwrap_or_default(),
        backend: lease
            .backend
            .as_ref()
            .map(|b| b.kind.clone())
            .unwrap_or_default(),
    })
}

/// A pending backend revocation.
pub fn backend_revocation_to_pb(r: &crate::domain::BackendRevocation) -> pb::BackendRevocation {
    pb::BackendRevocation {
        lease_id: r.lease_id.clone(),
        backend: r.kind.clone(),
        backend_handle: r.handle.clone(),
        queued_at: ts(r.queued_at),
        attempts: r.attempts,
        next_attempt_at: ts(r.next_attempt_at),
        last_error: r.last_error.clone().unwrap_or_default(),
    }
}

/// A ledger receipt.
pub fn receipt_to_pb(r: &Receipt) -> pb::AuditReceipt {
    pb::AuditReceipt {
        sequence: r.sequence,
        entry_hash: r.entry_hash.clone(),
        leaf_index: r.leaf_index,
        leaf_hash: r.leaf_hash.clone(),
    }
}
