//! Revocation end to end over SPIFFE mTLS: every `Admin.Revoke` selector (with cut-off and
//! dry run), revocation rules that bar in-flight issuance (also under a race), operator
//! locks, and the signed, hash-chained revocation feed (gRPC stream and `/revocations`).
//! Every revocation also checks the one ledger entry it leaves: who, why, which leases.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spiffe_broker::checkpoint::{LogSigner, VerifierKey};
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::clock::{rfc3339, Clock as _};
use spiffe_broker::domain::RevocationEvent;
use spiffe_broker::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

const BOB: &str = "spiffe://example.org/ops/bob";
/// A sibling path of `gpu/` (registered by [`start_with_gpux`]).
const GPUX: &str = "spiffe://example.org/gpux/provisioner";
const PUSH_PROFILE: &str = "model-registry-push";
const DIGEST: &str = "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4";
const FEED_NAME: &str = "example.org/spiffe-broker/revocations";
/// What the ledger and the error say when a revocation rule bars an issuance.
const REVOKED_BEFORE: &str = "a revocation covers this identity or profile";
/// Bound on every wait for the feed.
const FEED_WAIT: Duration = Duration::from_secs(15);

type Admin = pb::admin_client::AdminClient<Channel>;
type Broker = pb::credential_broker_client::CredentialBrokerClient<Channel>;
type Approvals = pb::approvals_client::ApprovalsClient<Channel>;
type Feed = pb::relying_party_client::RelyingPartyClient<Channel>;
type Feedstream = tonic::Streaming<pb::RevocationFeedMessage>;
use pb::revoke_request::Selector;

// ---------------------------------------------------------------------------------------
// Environment and requests
// ---------------------------------------------------------------------------------------

/// The demo environment plus `gpux/provisioner` (role gpu-provisioning), a sibling path of
/// `gpu/` that no `gpu` prefix may cover.
async fn start_with_gpux() -> Harness {
    start_with(Some(Box::new(|demo: String| {
        assert!(demo.contains("[[approver_groups]]"));
        demo.replacen(
            "[[approver_groups]]",
            &format!(
                "[[identities]]\nspiffe_id = \"{GPUX}\"\nowner = \"infra-team\"\n\
                 environment = \"prod\"\nroles = [\"gpu-provisioning\"]\n\n[[approver_groups]]"
            ),
            1,
        )
    })))
    .await
}

/// An SVID minted straight from the dev CA (identities without a Workload API socket).
fn minted(h: &Harness, id: &str) -> ClientIdentity {
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &spiffe::SpiffeId::new(id).expect("spiffe id"),
            Duration::from_secs(3600),
        )
        .expect("mint SVID");
    ClientIdentity::Files {
        chain: svid.chain,
        key: Arc::new(svid.key_pkcs8.to_vec()),
        bundle: vec![h.env.ca.ca_der().clone()],
    }
}

async fn approvals_as(h: &Harness, id: &str) -> Approvals {
    Approvals::new(h.channel_as(&h.identity(id).await).await)
}

async fn feed_as(h: &Harness, id: &str) -> Feed {
    Feed::new(h.channel_as(&h.identity(id).await).await)
}

fn now(h: &Harness) -> i64 {
    h.clock.unix_seconds()
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn dataset_request() -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: "dataset-read".into(),
        ..Default::default()
    }
}

/// The demo registry push (needs one approval from registry-approvers).
fn push_request() -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: PUSH_PROFILE.into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: "models/llama".into(),
            artifact_digest: DIGEST.into(),
            ticket: "CHG-1234".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn issue(c: &mut Broker, req: pb::IssueCredentialRequest) -> pb::Lease {
    c.issue_credential(req)
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease")
}

async fn refused(c: &mut Broker, req: pb::IssueCredentialRequest) -> tonic::Status {
    c.issue_credential(req).await.expect_err("issuance refused")
}

/// Opens a registry push as deploy-agent, has `approver` approve it, redeems it.
/// Returns (access request id, lease).
async fn approved_push(
    agent: &mut Broker,
    approver: &mut Approvals,
    why: &str,
) -> (String, pb::Lease) {
    let ar = agent
        .issue_credential(push_request())
        .await
        .expect("pending")
        .into_inner()
        .access_request
        .expect("access request");
    assert_eq!(ar.state, pb::AccessRequestState::Pending as i32);
    let reviewed = approver
        .review_access_request(pb::ReviewAccessRequestRequest {
            id: ar.id.clone(),
            approve: true,
            reason: why.into(),
        })
        .await
        .expect("approved")
        .into_inner()
        .access_request
        .expect("access request");
    assert_eq!(reviewed.state, pb::AccessRequestState::Approved as i32);
    let lease = issue(
        agent,
        pb::IssueCredentialRequest {
            access_request_id: ar.id.clone(),
            ..push_request()
        },
    )
    .await;
    (ar.id, lease)
}

// ---------------------------------------------------------------------------------------
// Ledger views
// ---------------------------------------------------------------------------------------

fn db(h: &Harness) -> rusqlite::Connection {
    rusqlite::Connection::open(h.ledger_path()).expect("open ledger")
}

/// Every lease: id → (state, end_reason).
fn lease_rows(h: &Harness) -> BTreeMap<String, (String, Option<String>)> {
    let conn = db(h);
    let mut stmt = conn
        .prepare("SELECT id, state, end_reason FROM leases")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    rows
}

fn state_of(h: &Harness, id: &str) -> String {
    lease_rows(h).get(id).expect("lease exists").0.clone()
}

fn count(h: &Harness, table: &str) -> i64 {
    db(h)
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn of_kind(h: &Harness, kind: &str) -> Vec<serde_json::Value> {
    h.audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == kind)
        .collect()
}

fn set<I: IntoIterator<Item = S>, S: ToString>(ids: I) -> BTreeSet<String> {
    ids.into_iter().map(|s| s.to_string()).collect()
}

fn sorted(ids: &BTreeSet<String>) -> serde_json::Value {
    serde_json::json!(ids.iter().collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------------------
// Revoking
// ---------------------------------------------------------------------------------------

async fn revoke(
    root: &mut Admin,
    selector: Selector,
    issued_before: Option<i64>,
    reason: &str,
    dry_run: bool,
) -> Result<pb::RevokeResponse, tonic::Status> {
    root.revoke(pb::RevokeRequest {
        selector: Some(selector),
        issued_before: issued_before.and_then(ts),
        dry_run,
        reason: reason.into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Everything a revocation may change, to show a dry run changed none of it.
#[derive(Debug, PartialEq)]
struct Snapshot {
    entries: usize,
    leases: BTreeMap<String, (String, Option<String>)>,
    rules: i64,
    events: i64,
}

fn snapshot(h: &Harness) -> Snapshot {
    Snapshot {
        entries: h.audit_bodies().len(),
        leases: lease_rows(h),
        rules: count(h, "revocation_rules"),
        events: count(h, "revocation_events"),
    }
}

/// A dry run, then the real revocation, as ops/root. Checks that the dry run reported the
/// same set and changed and recorded nothing; that the revocation wrote exactly one
/// `revoke` entry (caller root, the reason, every affected lease) and one feed event per
/// lease; and that exactly those leases (and no others) are now revoked.
async fn revoke_checked(
    h: &Harness,
    root: &mut Admin,
    selector: Selector,
    issued_before: Option<i64>,
    reason: &str,
) -> BTreeSet<String> {
    let before = snapshot(h);
    let dry = revoke(root, selector.clone(), issued_before, "", true)
        .await
        .expect("dry run (no reason needed)");
    assert!(dry.dry_run);
    assert!(dry.receipt.is_none(), "a dry run has no receipt");
    assert_eq!(snapshot(h), before, "a dry run changes and records nothing");

    let real = revoke(root, selector.clone(), issued_before, reason, false)
        .await
        .expect("revoked");
    assert!(!real.dry_run);
    let ids = set(&real.revoked_lease_ids);
    assert_eq!(ids.len(), real.revoked_lease_ids.len(), "no duplicates");
    assert_eq!(
        set(&dry.revoked_lease_ids),
        ids,
        "the dry run reported exactly what {selector:?} revoked"
    );

    // Exactly one new ledger entry: the revocation.
    let bodies = h.audit_bodies();
    assert_eq!(bodies.len(), before.entries + 1, "one entry per revocation");
    let receipt = real.receipt.expect("receipt");
    assert_eq!(receipt.sequence as usize, bodies.len());
    let e = &bodies[bodies.len() - 1];
    assert_eq!(e["kind"], "revoke", "{e}");
    assert_eq!(e["decision"], "allow", "{e}");
    assert_eq!(e["caller"], ROOT, "who revoked: {e}");
    assert_eq!(e["auth_method"], "x509-svid", "{e}");
    assert_eq!(e["request"]["rpc"], "Revoke", "{e}");
    assert_eq!(e["rule"], "platform-admin/operate", "{e}");
    let why = match issued_before {
        Some(t) => format!("{reason} (issued before {})", rfc3339(t)),
        None => reason.to_owned(),
    };
    if ids.is_empty() {
        assert!(e["affected_leases"].is_null(), "{e}");
        assert_eq!(e["reason"], format!("{why} (no active lease matched)"));
    } else {
        assert_eq!(e["affected_leases"], sorted(&ids), "which leases: {e}");
        assert_eq!(e["reason"], why, "why: {e}");
    }

    // Exactly those leases changed, to revoked with the reason.
    let after = lease_rows(h);
    for (id, (state, end)) in &after {
        if ids.contains(id) {
            assert_eq!(before.leases[id].0, "active", "{id} was active");
            assert_eq!(state, "revoked", "{id}");
            assert_eq!(end.as_deref(), Some(format!("revoked: {reason}").as_str()));
        } else {
            assert_eq!(
                Some(&(state.clone(), end.clone())),
                before.leases.get(id),
                "{id} is not covered by {selector:?} and must not change"
            );
        }
    }
    assert_eq!(
        count(h, "revocation_events"),
        before.events + ids.len() as i64,
        "one feed event per revoked lease"
    );
    ids
}

// 1. Selectors ------------------------------------------------------------------------

#[tokio::test]
async fn revoke_by_lease_id_spiffe_id_and_profile() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;

    let p1 = issue(&mut prov, gpu_request(600)).await;
    let p2 = issue(&mut prov, gpu_request(600)).await;
    let p3 = issue(&mut prov, gpu_request(600)).await;
    let a1 = issue(&mut agent, gpu_request(600)).await;
    let d1 = issue(&mut runtime, dataset_request()).await;
    let d2 = issue(&mut runtime, dataset_request()).await;

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::LeaseId(p1.id.clone()),
        None,
        "runner compromised",
    )
    .await;
    assert_eq!(ids, set([&p1.id]));
    let revoke_entry = of_kind(&h, "revoke").pop().expect("entry");
    assert_eq!(revoke_entry["lease_id"], p1.id, "the lease revoked by id");

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        None,
        "provisioner decommissioned",
    )
    .await;
    assert_eq!(ids, set([&p2.id, &p3.id]), "p1 was already revoked");
    assert_eq!(state_of(&h, &a1.id), "active", "another identity's lease");

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Profile("dataset-read".into()),
        None,
        "dataset store key rotated",
    )
    .await;
    assert_eq!(ids, set([&d1.id, &d2.id]));
    assert_eq!(state_of(&h, &a1.id), "active", "another profile's lease");

    // Nothing left to revoke: an empty answer, still one entry on record.
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Profile("dataset-read".into()),
        None,
        "again",
    )
    .await;
    assert!(ids.is_empty());
    assert_eq!(of_kind(&h, "revoke").len(), 4);

    // The lease holders see it: a revoked lease never renews.
    let err = prov
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: p2.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("revoked lease never renews");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
}

#[tokio::test]
async fn revoke_by_prefix_covers_that_path_only() {
    let h = start_with_gpux().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut gpux = Broker::new(h.channel_as(&minted(&h, GPUX)).await);
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut root = h.admin_as(ROOT).await;

    let p1 = issue(&mut prov, gpu_request(600)).await;
    let p2 = issue(&mut prov, gpu_request(600)).await;
    let x1 = issue(&mut gpux, gpu_request(600)).await;
    let a1 = issue(&mut agent, gpu_request(600)).await;

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeIdPrefix("spiffe://example.org/gpu/".into()),
        None,
        "gpu fleet rotation",
    )
    .await;
    assert_eq!(ids, set([&p1.id, &p2.id]), "provisioner's leases only");
    assert_eq!(state_of(&h, &x1.id), "active", "gpux is not under gpu/");
    assert_eq!(state_of(&h, &a1.id), "active", "ci/ is not under gpu/");

    // The rule left behind bars provisioner now, but not its sibling path.
    let err = refused(&mut prov, gpu_request(600)).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let x2 = issue(&mut gpux, gpu_request(600)).await;

    // Without the trailing slash the prefix is still a path prefix: never `gpux/`.
    h.clock.advance(Duration::from_secs(1));
    let p3 = issue(&mut prov, gpu_request(600)).await;
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeIdPrefix("spiffe://example.org/gpu".into()),
        None,
        "gpu fleet rotation, again",
    )
    .await;
    assert_eq!(ids, set([&p3.id]), "gpu (no slash) does not match gpux/");
    assert_eq!(state_of(&h, &x1.id), "active");
    assert_eq!(state_of(&h, &x2.id), "active");
    assert_eq!(state_of(&h, &a1.id), "active");
    let rules: Vec<String> = {
        let conn = db(&h);
        let mut stmt = conn
            .prepare("SELECT value FROM revocation_rules WHERE kind = 'prefix' ORDER BY id")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        rows
    };
    assert_eq!(
        rules,
        vec!["spiffe://example.org/gpu/", "spiffe://example.org/gpu/"],
        "the rule is recorded with the trailing slash"
    );
    issue(&mut gpux, gpu_request(600)).await;
}

#[tokio::test]
async fn revoke_by_approver_and_by_access_request() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;
    let mut root = h.admin_as(ROOT).await;

    let (_r1, l1) = approved_push(&mut agent, &mut alice, "release 1 checked").await;
    let (r2, l2) = approved_push(&mut agent, &mut bob, "release 2 checked").await;
    let (_r3, l3) = approved_push(&mut agent, &mut alice, "release 3 checked").await;
    let (_r4, l4) = approved_push(&mut agent, &mut bob, "release 4 checked").await;
    let plain = issue(&mut agent, gpu_request(600)).await;

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Approver(ALICE.into()),
        None,
        "alice's approver credential was phished",
    )
    .await;
    assert_eq!(ids, set([&l1.id, &l3.id]), "what alice approved, only");
    assert_eq!(state_of(&h, &l2.id), "active", "bob approved it");
    assert_eq!(state_of(&h, &l4.id), "active", "bob approved it");
    assert_eq!(state_of(&h, &plain.id), "active", "no approval involved");

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::AccessRequestId(r2.clone()),
        None,
        "wrong artifact pushed",
    )
    .await;
    assert_eq!(ids, set([&l2.id]), "the lease issued on that request");
    assert_eq!(state_of(&h, &l4.id), "active");

    // Bob's remaining approval is revoked by his name.
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Approver(BOB.into()),
        None,
        "bob left",
    )
    .await;
    assert_eq!(ids, set([&l4.id]), "l2 was already revoked");
    assert_eq!(state_of(&h, &plain.id), "active");

    // Approver and request revocations leave no rule behind: a new approved push works.
    approved_push(&mut agent, &mut alice, "release 5 checked").await;
}

#[tokio::test]
async fn revoke_all_needs_a_cutoff_and_cutoffs_split_issuances() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;

    let t0 = now(&h);
    let p1 = issue(&mut prov, gpu_request(600)).await;
    let a1 = issue(&mut agent, gpu_request(600)).await;
    let d1 = issue(&mut runtime, dataset_request()).await;
    h.clock.advance(Duration::from_secs(10));
    let t1 = now(&h);
    let p2 = issue(&mut prov, gpu_request(600)).await;
    let a2 = issue(&mut agent, gpu_request(600)).await;
    let d2 = issue(&mut runtime, dataset_request()).await;
    h.clock.advance(Duration::from_secs(10));
    let p3 = issue(&mut prov, gpu_request(600)).await;

    // `all` without a cut-off, `all: false`, or no selector: INVALID_ARGUMENT, nothing revoked.
    let before = snapshot(&h);
    for dry_run in [false, true] {
        let err = revoke(&mut root, Selector::All(true), None, "everything", dry_run)
            .await
            .expect_err("all needs issued_before");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    let err = revoke(&mut root, Selector::All(false), Some(t1), "x", false)
        .await
        .expect_err("all must be true");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = root
        .revoke(pb::RevokeRequest {
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("a selector is required");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let after = snapshot(&h);
    assert_eq!(after.leases, before.leases);
    assert_eq!((after.rules, after.events), (before.rules, before.events));
    assert!(of_kind(&h, "revoke").is_empty(), "no revocation on record");
    let rejected: Vec<_> = h.audit_bodies()[before.entries..].to_vec();
    assert_eq!(rejected.len(), 4, "each refusal is recorded: {rejected:#?}");
    for e in &rejected {
        assert_eq!(e["kind"], "deny");
        assert_eq!(e["caller"], ROOT);
        assert_eq!(e["request"]["rpc"], "Revoke");
    }

    // A selector with a cut-off: only what the identity got before it.
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        Some(t0 + 5),
        "provisioner image with a bad CA bundle",
    )
    .await;
    assert_eq!(
        ids,
        set([&p1.id]),
        "p2 and p3 were issued after the cut-off"
    );
    // The rule ends at the cut-off: provisioner is issued again right away.
    let p4 = issue(&mut prov, gpu_request(600)).await;

    // The profile issued before t1 + 1 (p2 included, p3 not).
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Profile("gpu-scheduler-submit".into()),
        Some(t1 + 1),
        "scheduler audience key rolled",
    )
    .await;
    assert_eq!(ids, set([&p2.id, &a1.id, &a2.id]));
    assert_eq!(state_of(&h, &p3.id), "active");
    assert_eq!(state_of(&h, &p4.id), "active");

    // Everything issued strictly before t1: only d1 is left of those.
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::All(true),
        Some(t1),
        "signing key compromise window",
    )
    .await;
    assert_eq!(ids, set([&d1.id]), "d2 was issued at t1, not before");
    assert_eq!(state_of(&h, &d2.id), "active");
    assert_eq!(state_of(&h, &p3.id), "active");
    // A cut-off in the past bars nothing issued now.
    issue(&mut runtime, dataset_request()).await;
    issue(&mut agent, gpu_request(600)).await;
    assert_eq!(of_kind(&h, "revoke").len(), 3);
}

#[tokio::test]
async fn dry_run_changes_and_records_nothing() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let p1 = issue(&mut prov, gpu_request(600)).await;
    let d1 = issue(&mut runtime, dataset_request()).await;

    let before = snapshot(&h);
    for (selector, want) in [
        (Selector::SpiffeId(PROVISIONER.into()), set([&p1.id])),
        (
            Selector::SpiffeIdPrefix("spiffe://example.org/".into()),
            set([&p1.id, &d1.id]),
        ),
        (Selector::Profile("dataset-read".into()), set([&d1.id])),
        (Selector::LeaseId(d1.id.clone()), set([&d1.id])),
        (Selector::All(true), set([&p1.id, &d1.id])),
    ] {
        let before_all = matches!(selector, Selector::All(_)).then(|| now(&h) + 1);
        let r = revoke(&mut root, selector.clone(), before_all, "why not", true)
            .await
            .expect("dry run");
        assert!(r.dry_run);
        assert!(r.receipt.is_none());
        assert_eq!(set(&r.revoked_lease_ids), want, "{selector:?}");
    }
    assert_eq!(snapshot(&h), before, "nothing changed, nothing recorded");
    assert!(of_kind(&h, "revoke").is_empty());

    // No rule was left behind: the same identity is issued at the same instant.
    issue(&mut prov, gpu_request(600)).await;
    issue(&mut runtime, dataset_request()).await;

    // A dry run is still an admin operation.
    let err = h
        .admin_as(ALICE)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(Selector::SpiffeId(PROVISIONER.into())),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect_err("alice is not an admin");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
}

// 2. No covered issuance after acknowledgement ----------------------------------------

#[tokio::test]
async fn acknowledged_revocation_bars_issuance_requested_before_it() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let p1 = issue(&mut prov, gpu_request(600)).await;

    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        None,
        "provisioner host reimaged",
    )
    .await;
    assert_eq!(ids, set([&p1.id]));

    // The clock has not moved: this request is at the revocation instant, so covered.
    let leases = h.lease_count();
    let err = refused(&mut prov, gpu_request(600)).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains(REVOKED_BEFORE), "{}", err.message());
    assert_eq!(h.lease_count(), leases, "no lease recorded");
    let denial = h.audit_bodies().pop().expect("entry");
    assert_eq!(denial["kind"], "issue", "{denial}");
    assert_eq!(denial["decision"], "deny", "{denial}");
    assert_eq!(denial["caller"], PROVISIONER, "{denial}");
    assert_eq!(denial["reason"], REVOKED_BEFORE, "{denial}");
    assert!(denial["lease_id"].is_null(), "{denial}");

    // Other identities are not covered.
    issue(&mut agent, gpu_request(600)).await;
    // The revoked lease stays revoked.
    let err = prov
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: p1.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("revoked lease never renews");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // A request after the revocation is a new one.
    h.clock.advance(Duration::from_secs(1));
    let p2 = issue(&mut prov, gpu_request(600)).await;
    assert_eq!(p2.state, pb::LeaseState::Active as i32);
    assert_eq!(state_of(&h, &p2.id), "active");

    // Same for a profile.
    let d1 = issue(&mut runtime, dataset_request()).await;
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::Profile("dataset-read".into()),
        None,
        "dataset store breach",
    )
    .await;
    assert_eq!(ids, set([&d1.id]));
    let err = refused(&mut runtime, dataset_request()).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains(REVOKED_BEFORE), "{}", err.message());
    issue(&mut prov, gpu_request(600)).await;
    h.clock.advance(Duration::from_secs(1));
    issue(&mut runtime, dataset_request()).await;
}

#[tokio::test]
async fn approved_redemption_in_flight_is_barred_by_an_identity_revocation() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut root = h.admin_as(ROOT).await;
    let ar = agent
        .issue_credential(push_request())
        .await
        .expect("pending")
        .into_inner()
        .access_request
        .expect("access request");
    alice
        .review_access_request(pb::ReviewAccessRequestRequest {
            id: ar.id.clone(),
            approve: true,
            reason: "ok".into(),
        })
        .await
        .expect("approved");
    let ids = revoke_checked(
        &h,
        &mut root,
        Selector::SpiffeId(DEPLOY_AGENT.into()),
        None,
        "pipeline compromised",
    )
    .await;
    assert!(ids.is_empty(), "nothing was active yet");
    let err = refused(
        &mut agent,
        pb::IssueCredentialRequest {
            access_request_id: ar.id.clone(),
            ..push_request()
        },
    )
    .await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert_eq!(h.lease_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_survives_a_revocation_racing_issuance() {
    let h = start().await;
    let prov = h.broker_as(PROVISIONER).await;
    let mut root = h.admin_as(ROOT).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;

    let mut pre = BTreeSet::new();
    for _ in 0..3 {
        pre.insert(issue(&mut prov.clone(), gpu_request(600)).await.id);
    }
    let bystander = issue(&mut agent, gpu_request(600)).await;
    let instant = now(&h);

    let spawn_wave = |n: usize| {
        (0..n)
            .map(|_| {
                let mut c = prov.clone();
                tokio::spawn(async move {
                    c.issue_credential(gpu_request(600))
                        .await
                        .map(|r| r.into_inner().lease.expect("lease").id)
                })
            })
            .collect::<Vec<_>>()
    };
    let before_wave = spawn_wave(20);
    tokio::task::yield_now().await;
    let revocation = {
        let mut root = root.clone();
        tokio::spawn(async move {
            revoke(
                &mut root,
                Selector::SpiffeIdPrefix("spiffe://example.org/gpu/".into()),
                None,
                "gpu fleet compromise",
                false,
            )
            .await
        })
    };
    let during_wave = spawn_wave(20);
    let revoked = revocation
        .await
        .expect("task")
        .expect("revoked")
        .revoked_lease_ids;
    let revoked = set(&revoked);
    // Acknowledged: everything requested from now on, at the same instant, is refused.
    let after_wave = spawn_wave(10);

    let mut issued = BTreeSet::new();
    let mut denied = 0;
    for (i, t) in before_wave
        .into_iter()
        .chain(during_wave)
        .chain(after_wave)
        .enumerate()
    {
        match t.await.expect("task") {
            Ok(id) => {
                assert!(i < 40, "issued after the revocation was acknowledged");
                issued.insert(id);
            }
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
                assert!(e.message().contains(REVOKED_BEFORE), "{}", e.message());
                denied += 1;
            }
        }
    }
    assert_eq!(issued.len() + denied, 50);
    assert!(pre.is_subset(&revoked));
    assert!(
        issued.is_subset(&revoked),
        "every credential handed out before the revocation committed is revoked: {:?}",
        issued.difference(&revoked).collect::<Vec<_>>()
    );
    assert_eq!(
        revoked,
        pre.union(&issued).cloned().collect(),
        "and nothing else"
    );

    // ListLeases: no lease of provisioner issued at or before the instant is alive.
    let leases = root
        .list_leases(pb::ListLeasesRequest {
            spiffe_id: PROVISIONER.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner()
        .leases;
    assert_eq!(leases.len(), pre.len() + issued.len());
    for l in &leases {
        let issued_at = l.issued_at.expect("issued_at").seconds;
        assert!(issued_at <= instant);
        assert_eq!(
            l.state,
            pb::LeaseState::Revoked as i32,
            "lease {} survived",
            l.id
        );
    }
    assert_eq!(state_of(&h, &bystander.id), "active");

    // Ledger: one revocation listing them all; one denial per refused request.
    let revokes = of_kind(&h, "revoke");
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0]["caller"], ROOT);
    assert_eq!(revokes[0]["reason"], "gpu fleet compromise");
    assert_eq!(revokes[0]["affected_leases"], sorted(&revoked));
    let denials = h
        .audit_bodies()
        .into_iter()
        .filter(|b| b["decision"] == "deny" && b["reason"] == REVOKED_BEFORE)
        .count();
    assert_eq!(denials, denied);
    assert_eq!(count(&h, "revocation_events") as usize, revoked.len());

    // Renewing any of them is refused.
    let mut c = prov.clone();
    for id in revoked.iter().take(3) {
        let err = c
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: id.clone(),
                ttl: None,
            })
            .await
            .expect_err("revoked lease never renews");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    }
    // A request after the instant is issued.
    h.clock.advance(Duration::from_secs(1));
    let fresh = issue(&mut c, gpu_request(600)).await;
    assert_eq!(state_of(&h, &fresh.id), "active");
}

// 3. Locks ----------------------------------------------------------------------------

async fn create_lock(
    root: &mut Admin,
    kind: &str,
    value: &str,
    until: Option<i64>,
    reason: &str,
) -> Result<pb::Lock, tonic::Status> {
    root.create_lock(pb::CreateLockRequest {
        kind: kind.into(),
        value: value.into(),
        until: until.and_then(ts),
        reason: reason.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn list_locks(root: &mut Admin) -> Vec<pb::Lock> {
    root.list_locks(pb::ListLocksRequest {})
        .await
        .expect("listed")
        .into_inner()
        .locks
}

async fn delete_lock(root: &mut Admin, id: &str, reason: &str) -> Result<(), tonic::Status> {
    root.delete_lock(pb::DeleteLockRequest {
        id: id.into(),
        reason: reason.into(),
    })
    .await
    .map(|_| ())
}

fn assert_locked(err: &tonic::Status, reason: &str) {
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("issuance is locked") && err.message().contains(reason),
        "the lock's reason: {}",
        err.message()
    );
}

#[tokio::test]
async fn locks_bar_issuance_until_deleted_or_expired() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let t = now(&h);

    // By SPIFFE ID.
    let why = "incident 17: provisioner key exposure";
    let lock = create_lock(&mut root, "spiffe_id", PROVISIONER, Some(t + 600), why)
        .await
        .expect("locked");
    assert_eq!(lock.id.len(), 32);
    assert_eq!(lock.kind, "spiffe_id");
    assert_eq!(lock.value, PROVISIONER);
    assert_eq!(lock.until.map(|u| u.seconds), Some(t + 600));
    assert_eq!(lock.reason, why);
    assert_eq!(lock.created_by, ROOT);
    assert_eq!(lock.created_at.map(|u| u.seconds), Some(t));
    assert_eq!(list_locks(&mut root).await, vec![lock.clone()]);
    let entry = of_kind(&h, "lock").pop().expect("lock entry");
    assert_eq!(entry["caller"], ROOT, "{entry}");
    assert_eq!(entry["decision"], "allow", "{entry}");
    assert_eq!(entry["request"]["rpc"], "CreateLock", "{entry}");
    let text = entry["reason"].as_str().expect("reason");
    assert!(text.contains(&lock.id) && text.contains(why), "{entry}");

    let leases = h.lease_count();
    assert_locked(&refused(&mut prov, gpu_request(600)).await, why);
    assert_eq!(h.lease_count(), leases);
    let denial = h.audit_bodies().pop().expect("entry");
    assert_eq!(denial["decision"], "deny", "{denial}");
    assert_eq!(denial["caller"], PROVISIONER, "{denial}");
    assert!(
        denial["reason"]
            .as_str()
            .is_some_and(|r| r.contains("issuance is locked") && r.contains(why)),
        "{denial}"
    );
    issue(&mut agent, gpu_request(600)).await;

    delete_lock(&mut root, &lock.id, "contained")
        .await
        .expect("unlocked");
    assert!(list_locks(&mut root).await.is_empty());
    let entry = of_kind(&h, "lock").pop().expect("unlock entry");
    assert_eq!(entry["caller"], ROOT, "{entry}");
    assert_eq!(entry["request"]["rpc"], "DeleteLock", "{entry}");
    assert_eq!(entry["reason"], format!("unlock {}: contained", lock.id));
    issue(&mut prov, gpu_request(600)).await;
    let err = delete_lock(&mut root, &lock.id, "again")
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let entry = of_kind(&h, "lock").pop().expect("refused unlock entry");
    assert_eq!(
        entry["decision"], "deny",
        "the refusal is on record: {entry}"
    );
    assert_eq!(entry["caller"], ROOT, "{entry}");

    // By prefix.
    let why = "gpu fleet quarantine";
    let lock = create_lock(
        &mut root,
        "prefix",
        "spiffe://example.org/gpu/",
        Some(t + 600),
        why,
    )
    .await
    .expect("locked");
    assert_eq!(lock.created_by, ROOT);
    assert_locked(&refused(&mut prov, gpu_request(600)).await, why);
    issue(&mut agent, gpu_request(600)).await;
    issue(&mut runtime, dataset_request()).await;
    delete_lock(&mut root, &lock.id, "lifted")
        .await
        .expect("unlocked");
    issue(&mut prov, gpu_request(600)).await;

    // By profile.
    let why = "dataset store maintenance";
    let lock = create_lock(&mut root, "profile", "dataset-read", Some(t + 600), why)
        .await
        .expect("locked");
    assert_eq!(list_locks(&mut root).await, vec![lock.clone()]);
    assert_locked(&refused(&mut runtime, dataset_request()).await, why);
    issue(&mut prov, gpu_request(600)).await;
    delete_lock(&mut root, &lock.id, "done")
        .await
        .expect("unlocked");
    issue(&mut runtime, dataset_request()).await;

    // Until a time: expired locks no longer apply and are no longer listed.
    let why = "cool-down after rotation";
    let lock = create_lock(&mut root, "spiffe_id", PROVISIONER, Some(t + 60), why)
        .await
        .expect("locked");
    h.clock.advance(Duration::from_secs(59));
    assert_locked(&refused(&mut prov, gpu_request(600)).await, why);
    assert_eq!(list_locks(&mut root).await, vec![lock.clone()]);
    h.clock.advance(Duration::from_secs(2));
    issue(&mut prov, gpu_request(600)).await;
    assert!(list_locks(&mut root).await.is_empty());
    let allowed = of_kind(&h, "lock")
        .into_iter()
        .filter(|b| b["decision"] == "allow")
        .count();
    assert_eq!(allowed, 7, "4 locks, 3 unlocks");
}

#[tokio::test]
async fn lock_rpcs_are_admin_only_and_validated() {
    let h = start().await;
    let mut root = h.admin_as(ROOT).await;
    let t = now(&h);

    for who in [ALICE, MODEL_RUNTIME, PROVISIONER] {
        let mut c = h.admin_as(who).await;
        let err = create_lock(&mut c, "spiffe_id", PROVISIONER, Some(t + 600), "x")
            .await
            .expect_err("not an admin");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{who}: {}",
            err.message()
        );
        let err = c
            .list_locks(pb::ListLocksRequest {})
            .await
            .expect_err("not an admin");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{who}: {}",
            err.message()
        );
        let err = delete_lock(&mut c, &"a".repeat(32), "x")
            .await
            .expect_err("not an admin");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{who}: {}",
            err.message()
        );
    }

    let long = "r".repeat(513);
    let bad: &[(&str, &str, Option<i64>, &str)] = &[
        ("bogus", PROVISIONER, Some(t + 600), "x"),
        ("all", PROVISIONER, Some(t + 600), "x"),
        ("", PROVISIONER, Some(t + 600), "x"),
        ("spiffe_id", PROVISIONER, Some(t - 1), "x"),
        ("spiffe_id", PROVISIONER, Some(t), "x"),
        ("spiffe_id", PROVISIONER, None, "x"),
        ("spiffe_id", PROVISIONER, Some(t + 600), ""),
        ("spiffe_id", PROVISIONER, Some(t + 600), "   "),
        ("spiffe_id", PROVISIONER, Some(t + 600), &long),
        ("profile", "", Some(t + 600), "x"),
    ];
    let entries = h.audit_bodies().len();
    for (kind, value, until, reason) in bad {
        let err = create_lock(&mut root, kind, value, *until, reason)
            .await
            .expect_err("bad lock");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{kind:?} {value:?} {until:?} {reason:?}: {}",
            err.message()
        );
    }
    let err = delete_lock(&mut root, "not-a-lock-id", "x")
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = delete_lock(&mut root, &"0".repeat(32), "x")
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    assert!(list_locks(&mut root).await.is_empty(), "nothing was locked");
    assert_eq!(count(&h, "locks"), 0);
    let refusals: Vec<_> = h.audit_bodies()[entries..]
        .iter()
        .filter(|b| b["kind"] == "deny" && b["request"]["rpc"] == "CreateLock")
        .cloned()
        .collect();
    assert_eq!(refusals.len(), bad.len(), "each refusal is on record");
    assert!(refusals.iter().all(|b| b["caller"] == ROOT));
    // Issuance is unaffected.
    issue(&mut h.broker_as(PROVISIONER).await, gpu_request(600)).await;
}

#[tokio::test]
async fn renewal_is_refused_under_a_lock() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut root = h.admin_as(ROOT).await;
    let lease = issue(&mut prov, gpu_request(600)).await;
    let why = "incident 18: provisioner under investigation";
    create_lock(
        &mut root,
        "spiffe_id",
        PROVISIONER,
        Some(now(&h) + 3600),
        why,
    )
    .await
    .expect("locked");
    h.clock.advance(Duration::from_secs(60));
    let renewed = prov
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await;
    match renewed {
        Err(e) => assert_locked(&e, why),
        Ok(r) => panic!(
            "a locked identity got a fresh credential expiring at {:?}",
            r.into_inner().lease.and_then(|l| l.expires_at)
        ),
    }
}

#[tokio::test]
async fn prefix_lock_is_a_path_prefix() {
    let h = start_with_gpux().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut gpux = Broker::new(h.channel_as(&minted(&h, GPUX)).await);
    let mut root = h.admin_as(ROOT).await;
    let why = "gpu fleet quarantine";
    create_lock(
        &mut root,
        "prefix",
        "spiffe://example.org/gpu",
        Some(now(&h) + 600),
        why,
    )
    .await
    .expect("locked");
    assert_locked(&refused(&mut prov, gpu_request(600)).await, why);
    let r = gpux.issue_credential(gpu_request(600)).await;
    assert!(
        r.is_ok(),
        "gpux/ is not under gpu/: {:?}",
        r.err().map(|e| e.message().to_owned())
    );
}

// 4. The feed -------------------------------------------------------------------------

fn to_domain(e: &pb::RevocationEvent) -> RevocationEvent {
    RevocationEvent {
        seq: e.seq,
        lease_id: e.lease_id.clone(),
        spiffe_id: e.spiffe_id.clone(),
        profile: e.profile.clone(),
        expires_at: e.expires_at.expect("expires_at").seconds,
        revoked_at: e.revoked_at.expect("revoked_at").seconds,
        reason: e.reason.clone(),
        chain_hash: e.chain_hash.clone(),
        certificate_serial: Some(e.certificate_serial.clone()).filter(|s| !s.is_empty()),
    }
}

/// Checks the chain of `events` (consecutive, from `prev` at `prev_seq`) by recomputing
/// every hash; returns the last hash.
fn check_chain(events: &[RevocationEvent], prev_seq: u64, prev: [u8; 32]) -> [u8; 32] {
    let mut prev = prev;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, prev_seq + 1 + i as u64, "gap-free, in order");
        let h = e.chain(&prev);
        assert_eq!(
            e.chain_hash,
            hex::encode(h),
            "chain hash of event {}",
            e.seq
        );
        prev = h;
    }
    prev
}

fn hash_of(e: &RevocationEvent) -> [u8; 32] {
    hex::decode(&e.chain_hash)
        .expect("hex")
        .try_into()
        .expect("32 bytes")
}

async fn watch(feed: &mut Feed, since: u64) -> Feedstream {
    feed.watch_revocations(pb::WatchRevocationsRequest { since })
        .await
        .expect("watching")
        .into_inner()
}

async fn next_item(s: &mut Feedstream) -> pb::revocation_feed_message::Item {
    tokio::time::timeout(FEED_WAIT, s.message())
        .await
        .expect("the feed answers in time")
        .expect("stream ok")
        .expect("stream open")
        .item
        .expect("item")
}

/// Reads events up to and including the next signed head.
async fn next_batch(s: &mut Feedstream) -> (Vec<RevocationEvent>, String) {
    use pb::revocation_feed_message::Item;
    let mut events = Vec::new();
    loop {
        match next_item(s).await {
            Item::Event(e) => events.push(to_domain(&e)),
            // A head with no events before it is the stream's freshness heartbeat.
            Item::SignedHead(_) if events.is_empty() => continue,
            Item::SignedHead(note) => return (events, note),
        }
    }
}

/// The head verifies under the feed key and names the last event (seq, chain hash).
fn check_head(vkey: &VerifierKey, note: &str, last: &RevocationEvent) {
    let cp = vkey
        .verify(note)
        .expect("the head verifies with the feed key");
    assert_eq!(cp.origin, FEED_NAME);
    assert_eq!(cp.size, last.seq, "head size is the last seq");
    assert_eq!(cp.root, hash_of(last), "head root is the last chain hash");
}

#[tokio::test]
async fn revocation_feed_is_chained_signed_resumable_and_live() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let mut feed = feed_as(&h, SCHEDULER).await;
    let vkey_path = h.env.state_dir.join("keys").join("revocations.vkey");
    let vkey = VerifierKey::parse(&std::fs::read_to_string(&vkey_path).expect("feed vkey"))
        .expect("feed vkey parses");
    assert_eq!(vkey.name(), FEED_NAME);

    // An empty feed: a signed head over (0, zero hash).
    let mut s = watch(&mut feed, 0).await;
    let head = match next_item(&mut s).await {
        pb::revocation_feed_message::Item::SignedHead(note) => note,
        other => panic!("expected a head on an empty feed, got {other:?}"),
    };
    let cp = vkey.verify(&head).expect("empty head verifies");
    assert_eq!((cp.size, cp.root), (0, [0; 32]));
    drop(s);

    let p1 = issue(&mut prov, gpu_request(600)).await;
    let p2 = issue(&mut prov, gpu_request(300)).await;
    let a1 = issue(&mut agent, gpu_request(900)).await;
    let d1 = issue(&mut runtime, dataset_request()).await;
    let t0 = now(&h);
    revoke(
        &mut root,
        Selector::LeaseId(p1.id.clone()),
        None,
        "r1: one lease",
        false,
    )
    .await
    .expect("revoked");
    h.clock.advance(Duration::from_secs(5));
    revoke(
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        None,
        "r2: the identity",
        false,
    )
    .await
    .expect("revoked");
    h.clock.advance(Duration::from_secs(5));
    revoke(
        &mut root,
        Selector::Profile("dataset-read".into()),
        Some(t0 + 60),
        "r3: the profile",
        false,
    )
    .await
    .expect("revoked");

    // From the beginning: one event per revoked lease, then a head over the last.
    let mut s = watch(&mut feed, 0).await;
    let (events, head) = next_batch(&mut s).await;
    drop(s);
    let expect = [
        (&p1, "r1: one lease", t0),
        (&p2, "r2: the identity", t0 + 5),
        (&d1, "r3: the profile", t0 + 10),
    ];
    assert_eq!(events.len(), expect.len(), "{events:#?}");
    for (e, (lease, reason, at)) in events.iter().zip(expect) {
        assert_eq!(e.lease_id, lease.id);
        assert_eq!(e.spiffe_id, lease.spiffe_id);
        assert_eq!(e.profile, lease.profile);
        assert_eq!(Some(e.expires_at), lease.expires_at.map(|t| t.seconds));
        assert_eq!(e.revoked_at, at);
        assert_eq!(
            e.reason, reason,
            "the operator's reason, without the cut-off"
        );
    }
    let last = check_chain(&events, 0, [0; 32]);
    assert_eq!(last, hash_of(&events[2]));
    check_head(&vkey, &head, &events[2]);
    // The ledger's revoke entries list exactly the feed's leases.
    let listed: Vec<String> = of_kind(&h, "revoke")
        .iter()
        .flat_map(|b| b["affected_leases"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        listed,
        events
            .iter()
            .map(|e| e.lease_id.clone())
            .collect::<Vec<_>>()
    );

    // Disconnect after the first event, resume after it: no gap, no duplicate.
    let mut s = watch(&mut feed, 0).await;
    let first = match next_item(&mut s).await {
        pb::revocation_feed_message::Item::Event(e) => to_domain(&e),
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(first, events[0]);
    drop(s);
    let mut s = watch(&mut feed, first.seq).await;
    let (rest, head) = next_batch(&mut s).await;
    drop(s);
    assert_eq!(rest, events[1..].to_vec(), "exactly the events after 1");
    check_chain(&rest, first.seq, hash_of(&first));
    check_head(&vkey, &head, &events[2]);

    // Live: a stream opened at the head receives a revocation made after it started.
    let mut live = watch(&mut feed, 3).await;
    // Nothing after 3 yet: only a timed head (the stream's freshness heartbeat) at 3.
    match tokio::time::timeout(Duration::from_secs(5), live.message()).await {
        Ok(Ok(Some(pb::RevocationFeedMessage {
            item: Some(pb::revocation_feed_message::Item::SignedHead(note)),
        }))) => {
            let head = vkey.verify(&note).expect("heartbeat head verifies");
            assert_eq!(head.size, 3);
            assert!(
                head.time().is_some(),
                "heads carry the time they were signed"
            );
        }
        other => panic!("expected a heartbeat head at 3, got {other:?}"),
    }
    h.clock.advance(Duration::from_secs(5));
    revoke(
        &mut root,
        Selector::LeaseId(a1.id.clone()),
        None,
        "r4: live",
        false,
    )
    .await
    .expect("revoked");
    let (fresh, head) = next_batch(&mut live).await;
    assert_eq!(fresh.len(), 1, "{fresh:#?}");
    assert_eq!(fresh[0].seq, 4);
    assert_eq!(fresh[0].lease_id, a1.id);
    assert_eq!(fresh[0].spiffe_id, DEPLOY_AGENT);
    assert_eq!(fresh[0].reason, "r4: live");
    assert_eq!(fresh[0].revoked_at, t0 + 15);
    check_chain(&fresh, 3, hash_of(&events[2]));
    check_head(&vkey, &head, &fresh[0]);

    // A dry run and a revocation that matches nothing add no event.
    revoke(&mut root, Selector::All(true), Some(now(&h) + 1), "", true)
        .await
        .expect("dry run");
    revoke(
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        None,
        "nothing left",
        false,
    )
    .await
    .expect("empty revocation");
    // Only heartbeat heads (still at 4) may arrive, never an event.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(msg) = tokio::time::timeout_at(deadline, live.message()).await {
        match msg.expect("stream ok").and_then(|m| m.item) {
            Some(pb::revocation_feed_message::Item::SignedHead(note)) => {
                assert_eq!(vkey.verify(&note).expect("head").size, 4);
            }
            other => panic!("no event without a revoked lease: {other:?}"),
        }
    }
    assert_eq!(count(&h, "revocation_events"), 4);
}

#[tokio::test]
async fn http_revocations_match_the_stream_and_forged_heads_fail() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut runtime = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let mut feed = feed_as(&h, SCHEDULER).await;

    // Nothing yet: no events, and a timed head over the empty feed (size 0).
    let (status, body) = h.http_get("/revocations?since=0").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["events"], serde_json::json!([]));
    let empty_head = doc["signed_head"].as_str().expect("a head even when empty");
    assert!(
        empty_head.starts_with("example.org/spiffe-broker/revocations\n0\n"),
        "{doc}"
    );
    let file = std::fs::read_to_string(h.env.state_dir.join("keys").join("revocations.vkey"))
        .expect("feed vkey");
    assert_eq!(
        doc["feed_key"].as_str(),
        Some(file.trim()),
        "served key = file"
    );
    let vkey = VerifierKey::parse(doc["feed_key"].as_str().expect("feed_key")).expect("parses");

    for _ in 0..3 {
        issue(&mut prov, gpu_request(600)).await;
    }
    issue(&mut runtime, dataset_request()).await;
    revoke(
        &mut root,
        Selector::SpiffeId(PROVISIONER.into()),
        None,
        "batch",
        false,
    )
    .await
    .expect("revoked");
    revoke(
        &mut root,
        Selector::Profile("dataset-read".into()),
        None,
        "profile",
        false,
    )
    .await
    .expect("revoked");

    let mut s = watch(&mut feed, 0).await;
    let (streamed, _) = next_batch(&mut s).await;
    drop(s);
    assert_eq!(streamed.len(), 4);
    let last = streamed.last().expect("last").clone();

    let get = |since: u64| {
        let h = &h;
        async move {
            let (status, body) = h.http_get(&format!("/revocations?since={since}")).await;
            assert_eq!(status, 200, "{body}");
            let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let events: Vec<RevocationEvent> =
                serde_json::from_value(doc["events"].clone()).expect("events");
            (doc, events)
        }
    };
    let (doc, all) = get(0).await;
    assert_eq!(all, streamed, "HTTP and gRPC serve the same feed");
    assert_eq!(doc["since"], 0);
    assert_eq!(doc["more"], false);
    check_chain(&all, 0, [0; 32]);
    let head = doc["signed_head"].as_str().expect("signed head");
    check_head(&vkey, head, &last);

    let (doc, tail) = get(2).await;
    assert_eq!(tail, streamed[2..].to_vec(), "exactly the events after 2");
    check_chain(&tail, 2, hash_of(&streamed[1]));
    let head = doc["signed_head"].as_str().expect("signed head").to_owned();
    check_head(&vkey, &head, &last);

    let (doc, none) = get(4).await;
    assert!(none.is_empty());
    // Caught up: the head still comes, fresh, over the same tail.
    let head = doc["signed_head"].as_str().expect("signed head").to_owned();
    check_head(&vkey, &head, &last);

    // Forgeries: a head by another key under the same name, a tampered head, and a note
    // of the audit log (another key and name) are all refused.
    let other = tempfile::tempdir().expect("tempdir");
    let forger =
        LogSigner::load_or_create_as(other.path(), "revocations", vkey.name()).expect("forger");
    assert_eq!(forger.name(), FEED_NAME);
    let forged = forger.sign(last.seq, &hash_of(&last));
    assert!(vkey.verify(&forged).is_err(), "another key's head");
    let forged_more = forger.sign(last.seq + 1, &[7; 32]);
    assert!(vkey.verify(&forged_more).is_err(), "another key's head");
    let tampered = head.replacen("\n4\n", "\n5\n", 1);
    assert_ne!(tampered, head);
    assert!(vkey.verify(&tampered).is_err(), "a tampered head");
    let log_key = VerifierKey::parse(
        &std::fs::read_to_string(h.env.state_dir.join("keys").join("log.vkey")).expect("log key"),
    )
    .expect("log key parses");
    assert!(
        log_key.verify(&head).is_err(),
        "the audit log key is not the feed key"
    );
}
