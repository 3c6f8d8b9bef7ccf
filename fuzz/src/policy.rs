//! A structured credential request → the demo Cedar policy's `decide`.
//!
//! Input format (a small, stable byte encoding, so `tests/it/fuzz_regressions.rs` replays
//! exactly what the fuzzer ran, and [`Case::encode`] writes real seeds). A *choice* is
//! one byte: an index into a table of known values (callers, profiles, scopes, intent
//! fields — the tables come from the demo config, so most inputs reach Cedar), or any
//! larger byte followed by a length byte and that many bytes of free text. Missing
//! bytes read as zero.
//!
//! ```text
//! caller:choice  flags:u8  profile:choice  [ttl:i64 BE if flags&4]
//! n:u8 (mod 40) × scope:choice
//! [if flags&8: action, target, artifact_digest, ticket, justification: choice;
//!              n:u8 (mod 10) × on_behalf_of:choice]
//! n:u8 (mod 8) × approver:choice          [now:i64 BE, else the fixture's time]
//! flags: 1 break-glass, 2 x509-svid (else jwt-svid), 4 ttl, 8 intent, 16 ttl has nanos
//! ```
//!
//! The request goes through `api::parse_issue_request` first (policy only ever sees
//! what the API accepted). Invariants: no panic; deterministic; an unregistered caller
//! is denied as such; every grant (`Allow`, or the one `RequireApproval` would issue) is
//! within the profile ceiling: its scopes are the requested (or default) scopes, all in
//! the profile's `scopes`, rendered through the profile's template; its TTL is the
//! requested (or default) one and at most `max_ttl` (`break_glass_max_ttl` under
//! break-glass); intent and justification present where required; the requester never
//! counts as its own approver.

use std::collections::BTreeSet;

use spiffe::SpiffeId;
use spiffe_broker::api::parse_issue_request;
use spiffe_broker::authn::AuthMethod;
use spiffe_broker::dev::{BROKER_ID, DEMO_IDS};
use spiffe_broker::domain::{CredentialRequest, Scope};
use spiffe_broker::policy::{Decision, DenialKind, Grant, Policy as _, RequestContext};
use spiffe_broker::proto::v1 as pb;

use super::fixture;

/// One decoded input.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The authenticated caller.
    pub caller: String,
    /// Authenticated with an X.509-SVID (else a JWT-SVID).
    pub x509: bool,
    /// Break-glass asked for.
    pub break_glass: bool,
    /// The request as the API received it.
    pub request: pb::IssueCredentialRequest,
    /// SPIFFE IDs that approved this request.
    pub approvals: Vec<String>,
    /// Request time (Unix seconds).
    pub now: i64,
}

/// The value tables choices index into.
struct Tables {
    callers: Vec<String>,
    profiles: Vec<String>,
    scopes: Vec<String>,
    actions: Vec<String>,
    targets: Vec<String>,
    digests: Vec<String>,
    tickets: Vec<String>,
    justifications: Vec<String>,
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn tables() -> &'static Tables {
    static T: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let cfg = &fixture::get().config;
        let mut callers = owned(DEMO_IDS);
        callers.extend(owned(&[
            BROKER_ID,
            "spiffe://example.org/unregistered",
            "spiffe://other.org/ci/deploy-agent",
        ]));
        let mut profiles: Vec<String> = cfg.profiles.iter().map(|p| p.name.to_string()).collect();
        profiles.push("no-such-profile".into());
        let mut scopes: BTreeSet<String> = cfg
            .profiles
            .iter()
            .flat_map(|p| p.scopes.iter().map(|s| s.to_string()))
            .collect();
        scopes.extend(owned(&["job:admin", "*", "repository:other:push"]));
        Tables {
            callers,
            profiles,
            scopes: scopes.into_iter().collect(),
            actions: owned(&[
                "submit-training",
                "push-model",
                "pull-model",
                "read-dataset",
            ]),
            targets: owned(&[
                "queue/a100",
                "ml/models",
                "arn:aws:s3:::training-data/*",
                "queue/*",
                "a:b",
            ]),
            digests: owned(&[
                "",
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ]),
            tickets: owned(&["", "CHG-1234"]),
            justifications: owned(&["", "incident 42: registry down, hotfix"]),
        }
    })
}

/// Byte reader; past the end every read is zero.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn i64(&mut self) -> Option<i64> {
        let (b, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(i64::from_be_bytes(*b))
    }
    fn choice(&mut self, table: &[String]) -> String {
        let i = self.u8() as usize;
        if let Some(v) = table.get(i) {
            return v.clone();
        }
        let n = (self.u8() as usize).min(self.0.len());
        let (text, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(text).into_owned()
    }
}

fn put_choice(out: &mut Vec<u8>, table: &[String], v: &str) {
    match table.iter().position(|t| t == v).filter(|i| *i < 0xff) {
        Some(i) => out.push(i as u8),
        None => {
            let b = v.as_bytes();
            let b = &b[..b.len().min(255)];
            out.push(0xff);
            out.push(b.len() as u8);
            out.extend_from_slice(b);
        }
    }
}

impl Case {
    /// Decodes an input (every byte string is some case).
    pub fn decode(data: &[u8]) -> Self {
        let t = tables();
        let mut r = Reader(data);
        let caller = r.choice(&t.callers);
        let flags = r.u8();
        let mut request = pb::IssueCredentialRequest {
            profile: r.choice(&t.profiles),
            ..Default::default()
        };
        if flags & 4 != 0 {
            request.ttl = Some(prost_types::Duration {
                seconds: r.i64().unwrap_or(0),
                nanos: i32::from(flags & 16 != 0),
            });
        }
        let n = r.u8() % 40;
        request.scopes = (0..n).map(|_| r.choice(&t.scopes)).collect();
        if flags & 8 != 0 {
            let mut i = pb::Intent {
                action: r.choice(&t.actions),
                target: r.choice(&t.targets),
                artifact_digest: r.choice(&t.digests),
                ticket: r.choice(&t.tickets),
                justification: r.choice(&t.justifications),
                on_behalf_of: Vec::new(),
            };
            let n = r.u8() % 10;
            i.on_behalf_of = (0..n).map(|_| r.choice(&t.callers)).collect();
            request.intent = Some(i);
        }
        let n = r.u8() % 8;
        let approvals = (0..n).map(|_| r.choice(&t.callers)).collect();
        let now = r.i64().unwrap_or_else(fixture::now_unix);
        Case {
            caller,
            x509: flags & 2 != 0,
            break_glass: flags & 1 != 0,
            request,
            approvals,
            now,
        }
    }

    /// Encodes a case (for seeds); `decode(encode(c)) == c` for strings up to 255 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let t = tables();
        let r = &self.request;
        let mut out = Vec::new();
        put_choice(&mut out, &t.callers, &self.caller);
        let ttl_nanos = r.ttl.is_some_and(|d| d.nanos != 0);
        out.push(
            u8::from(self.break_glass)
                | u8::from(self.x509) << 1
                | u8::from(r.ttl.is_some()) << 2
                | u8::from(r.intent.is_some()) << 3
                | u8::from(ttl_nanos) << 4,
        );
        put_choice(&mut out, &t.profiles, &r.profile);
        if let Some(d) = r.ttl {
            out.extend_from_slice(&d.seconds.to_be_bytes());
        }
        out.push(r.scopes.len() as u8 % 40);
        for s in &r.scopes {
            put_choice(&mut out, &t.scopes, s);
        }
        if let Some(i) = &r.intent {
            put_choice(&mut out, &t.actions, &i.action);
            put_choice(&mut out, &t.targets, &i.target);
            put_choice(&mut out, &t.digests, &i.artifact_digest);
            put_choice(&mut out, &t.tickets, &i.ticket);
            put_choice(&mut out, &t.justifications, &i.justification);
            out.push(i.on_behalf_of.len() as u8 % 10);
            for o in &i.on_behalf_of {
                put_choice(&mut out, &t.callers, o);
            }
        }
        out.push(self.approvals.len() as u8 % 8);
        for a in &self.approvals {
            put_choice(&mut out, &t.callers, a);
        }
        out.extend_from_slice(&self.now.to_be_bytes());
        out
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    check(&Case::decode(data));
}

/// Decides one case and checks the decision.
pub fn check(case: &Case) {
    let Ok(req) = parse_issue_request(&case.request) else {
        return;
    };
    // The authenticator only ever yields valid SPIFFE IDs.
    let Ok(caller) = SpiffeId::new(&case.caller) else {
        return;
    };
    let ctx = RequestContext {
        now: case.now,
        auth_method: if case.x509 {
            AuthMethod::X509Svid
        } else {
            AuthMethod::JwtSvid
        },
        break_glass: case.break_glass,
        approvals: case.approvals.clone(),
        person_approvals_group: None,
    };
    let fx = fixture::get();
    let d = fx.policy.decide(&caller, &req, &ctx);
    let again = fx.policy.decide(&caller, &req, &ctx);
    assert_eq!(
        format!("{d:?}"),
        format!("{again:?}"),
        "decide is not deterministic"
    );

    let registered = fx.config.identities.iter().any(|i| i.spiffe_id == caller);
    match &d {
        Decision::Deny(denial) => {
            if !registered {
                assert_eq!(denial.kind, DenialKind::Unregistered);
            }
            assert!(!denial.reason.is_empty());
        }
        Decision::Allow(g) => {
            within_ceiling(&caller, registered, &req, &ctx, g);
            let distinct: BTreeSet<&String> = g.approvers.iter().collect();
            assert_eq!(
                distinct.len(),
                g.approvers.len(),
                "an approver counted twice"
            );
            for a in &g.approvers {
                assert!(ctx.approvals.contains(a), "approver {a} never approved");
            }
        }
        Decision::RequireApproval(g, need) => {
            within_ceiling(&caller, registered, &req, &ctx, g);
            assert!(need.have < need.threshold, "pending with enough approvals");
            assert!(need.threshold >= 1);
            assert!(
                !need.eligible.contains(&caller.to_string()),
                "the requester is its own eligible approver"
            );
            assert!(!ctx.break_glass, "break-glass left pending");
        }
    }
}

/// The grant is within the profile ceiling.
fn within_ceiling(
    caller: &SpiffeId,
    registered: bool,
    req: &CredentialRequest,
    ctx: &RequestContext,
    g: &Grant,
) {
    assert!(registered, "granted to an unregistered caller {caller}");
    let p = &g.profile;
    assert_eq!(p.name, req.profile, "granted another profile");
    let wanted: &BTreeSet<Scope> = if req.scopes.is_empty() {
        &p.default_scopes
    } else {
        &req.scopes
    };
    assert!(!wanted.is_empty(), "granted no scopes");
    assert!(
        wanted.is_subset(&p.scopes),
        "granted scopes {wanted:?} beyond the ceiling {:?} of {}",
        p.scopes,
        p.name
    );
    let target = req.intent.as_ref().map_or("", |i| i.target.as_str());
    let expected: Vec<String> = wanted
        .iter()
        .map(|s| match &p.scope_template {
            None => s.to_string(),
            Some(t) => t.replace("{scope}", s.as_str()).replace("{target}", target),
        })
        .collect();
    let granted: Vec<String> = g.scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(granted, expected, "granted scopes are not the request's");

    let max = if ctx.break_glass {
        p.break_glass_max_ttl
            .expect("break-glass granted on a profile without break_glass_max_ttl")
    } else {
        p.max_ttl
    };
    assert!(
        g.ttl <= max && g.ttl <= p.max_ttl,
        "ttl {:?} beyond the ceiling {max:?}",
        g.ttl
    );
    assert!(!g.ttl.is_zero());
    match req.ttl {
        Some(t) => assert_eq!(g.ttl, t, "ttl is not the request's"),
        None => assert_eq!(g.ttl, p.default_ttl.min(max), "ttl is not the default"),
    }
    assert_eq!(g.intent, req.intent, "intent changed");
    if p.require_intent {
        assert!(g.intent.is_some(), "granted without the required intent");
    }
    assert_eq!(g.break_glass, ctx.break_glass);
    if ctx.break_glass {
        assert!(
            g.intent.as_ref().is_some_and(|i| i.justification.is_some()),
            "break-glass without a justification"
        );
    }
    let me = caller.to_string();
    assert!(!g.approvers.contains(&me), "the requester approved itself");
}
