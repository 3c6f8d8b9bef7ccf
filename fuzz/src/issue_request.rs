//! `IssueCredentialRequest` bytes → everything the gRPC handler checks before policy.
//!
//! Input: the protobuf encoding of `spiffe_broker.v1.IssueCredentialRequest`. Path:
//! `prost` decode → `api::parse_issue_request` (profile, scopes, TTL, intent) →
//! `LeaseId::parse` of `access_request_id` → `idempotency::validate` →
//! `RequestSpec` digest (what approvals bind to) → `parse_csr` of `csr` (as the x509
//! backend does). Invariants: no panic; every refusal is INVALID_ARGUMENT; an accepted
//! request is exactly what was sent, within the parser's documented bounds.

use std::time::Duration;

use prost::Message as _;
use spiffe_broker::api::parse_issue_request;
use spiffe_broker::domain::{LeaseId, RequestSpec, Scope, MAX_REQUESTABLE_TTL};
use spiffe_broker::error::BrokerError;
use spiffe_broker::proto::v1 as pb;

/// Most scopes per request (`api::convert::MAX_SCOPES`, not exported).
const MAX_SCOPES: usize = 32;

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Ok(r) = pb::IssueCredentialRequest::decode(data) {
        check(&r);
    }
}

fn printable(s: &str, spaces: bool) -> bool {
    s.bytes()
        .all(|b| (0x21..=0x7e).contains(&b) || (spaces && b == b' '))
}

/// Checks one decoded request (also used by the `policy` target).
pub fn check(r: &pb::IssueCredentialRequest) {
    match parse_issue_request(r) {
        Ok(req) => {
            assert_eq!(req.profile.as_str(), r.profile, "profile changed");
            assert!(
                !r.profile.is_empty() && r.profile.len() <= 64,
                "profile length"
            );
            assert!(req.scopes.len() <= MAX_SCOPES.min(r.scopes.len()));
            assert_eq!(
                req.scopes.len(),
                r.scopes
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                "scopes lost or invented"
            );
            for s in &req.scopes {
                assert!(r.scopes.iter().any(|x| x == s.as_str()), "scope invented");
                assert!(
                    printable(s.as_str(), false) && s.as_str().len() <= 128,
                    "scope {s:?} outside its alphabet"
                );
                assert_eq!(Scope::parse(s.as_str()).ok().as_ref(), Some(s));
            }
            match (req.ttl, r.ttl) {
                (None, None) => {}
                (Some(t), Some(d)) => {
                    assert!(t >= Duration::from_secs(1) && t <= MAX_REQUESTABLE_TTL);
                    assert_eq!((t.as_secs() as i64, 0), (d.seconds, d.nanos), "ttl changed");
                }
                other => panic!("ttl presence changed: {other:?}"),
            }
            match (&req.intent, &r.intent) {
                (None, None) => {}
                (None, Some(i)) => assert_eq!(*i, pb::Intent::default(), "intent dropped"),
                (Some(i), Some(p)) => {
                    assert_eq!(
                        (i.action.as_str(), i.target.as_str()),
                        (p.action.as_str(), p.target.as_str())
                    );
                    assert_eq!(
                        i.artifact_digest.as_deref().unwrap_or(""),
                        p.artifact_digest
                    );
                    assert_eq!(i.ticket.as_deref().unwrap_or(""), p.ticket);
                    assert_eq!(i.justification.as_deref().unwrap_or(""), p.justification);
                    assert_eq!(i.on_behalf_of, p.on_behalf_of);
                    assert!(printable(&i.action, true) && printable(&i.target, true));
                    assert!(i.action.len() <= 128 && i.target.len() <= 256);
                    assert!(i.on_behalf_of.len() <= 8);
                }
                (Some(_), None) => panic!("intent invented"),
            }
            // What an approval binds to: deterministic and distinct per profile.
            let spec = RequestSpec::of(&req);
            let canonical = spec.canonical();
            let back: RequestSpec =
                serde_json::from_str(&canonical).expect("canonical request spec re-parses");
            assert_eq!(back, spec);
            assert_eq!(
                spec.digest(req.profile.as_str()),
                RequestSpec::of(&req).digest(req.profile.as_str())
            );
        }
        Err(BrokerError::InvalidArgument(m)) => assert!(!m.is_empty()),
        Err(e) => panic!("a malformed request must be INVALID_ARGUMENT, got {e:?}"),
    }
    if !r.access_request_id.is_empty() {
        match LeaseId::parse(&r.access_request_id) {
            Ok(id) => {
                assert_eq!(id.as_str(), r.access_request_id);
                assert!(
                    id.as_str().len() == 32
                        && id
                            .as_str()
                            .bytes()
                            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                );
            }
            Err(e) => assert!(
                matches!(e, spiffe_broker::domain::DomainError::Invalid(_)),
                "{e:?}"
            ),
        }
    }
    if !r.idempotency_key.is_empty() {
        if let Err(e) = spiffe_broker::broker::idempotency::validate(&r.idempotency_key) {
            assert!(matches!(e, BrokerError::InvalidArgument(_)), "{e:?}");
        }
    }
    if !r.csr.is_empty() {
        super::csr::check(&r.csr);
    }
}
