//! Regression tests for the holes an independent security review found (each fails on
//! the code before the fix): heads of the revocation feed signed for old positions and
//! forged `more` chains; separation of duties that ignored the delegation chain and the
//! requester's owner; ledger flooding by any authenticated caller; streams outside the
//! concurrency cap; Cedar policies that error being skipped; approvals bound to the
//! request instead of the grant; break-glass without limits or teeth.

use crate::common;

use std::time::Duration;

use common::*;
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::clock::Clock;
use spiffe_broker::domain::RevocationEvent;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::relying_party::{RelyingParty, RpConfig, RpError};
use tonic::transport::Channel;
use tonic::Code;

const BOB: &str = "spiffe://example.org/ops/bob";
const ROGUE: &str = "spiffe://example.org/rogue/x";
const PUSH: &str = "model-registry-push";
const DIGEST: &str = "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4";

type Broker = pb::credential_broker_client::CredentialBrokerClient<Channel>;
type Approvals = pb::approvals_client::ApprovalsClient<Channel>;
type Feed = pb::relying_party_client::RelyingPartyClient<Channel>;
type Feedstream = tonic::Streaming<pb::RevocationFeedMessage>;

async fn broker_of(h: &Harness, id: &str) -> Broker {
    Broker::new(h.channel_as(&minted(h, id).0).await)
}

async fn approvals_of(h: &Harness, id: &str) -> Approvals {
    Approvals::new(h.channel_as(&minted(h, id).0).await)
}

async fn feed_of(h: &Harness, id: &str) -> Feed {
    Feed::new(h.channel_as(&minted(h, id).0).await)
}

fn push_request(on_behalf_of: &[&str]) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: PUSH.into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: "models/llama".into(),
            artifact_digest: DIGEST.into(),
            ticket: "CHG-1234".into(),
            on_behalf_of: on_behalf_of.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn redeem_of(req: &pb::IssueCredentialRequest, id: &str) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        access_request_id: id.to_owned(),
        ..req.clone()
    }
}

async fn open_pending(c: &mut Broker, req: pb::IssueCredentialRequest) -> pb::AccessRequest {
    let resp = c
        .issue_credential(req)
        .await
        .expect("accepted")
        .into_inner();
    assert!(resp.credential.is_none());
    let ar = resp.access_request.expect("access request");
    assert_eq!(ar.state, pb::AccessRequestState::Pending as i32);
    ar
}

async fn review(
    c: &mut Approvals,
    id: &str,
    approve: bool,
) -> Result<pb::AccessRequest, tonic::Status> {
    c.review_access_request(pb::ReviewAccessRequestRequest {
        id: id.to_owned(),
        approve,
        reason: "reviewed".into(),
    })
    .await
    .map(|r| r.into_inner().access_request.expect("access request"))
}

fn entries_of(h: &Harness, kind: &str) -> Vec<serde_json::Value> {
    h.audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == kind)
        .collect()
}

async fn revoke_lease(h: &Harness, lease: &str) {
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(lease.into())),
            reason: "compromised".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
}

async fn feed_page(h: &Harness, since: u64, limit: u32) -> serde_json::Value {
    let (status, body) = h
        .http_get(&format!("/revocations?since={since}&limit={limit}"))
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

fn head_of(page: &serde_json::Value) -> String {
    page["signed_head"]
        .as_str()
        .expect("signed head")
        .to_owned()
}

async fn next_item(s: &mut Feedstream) -> pb::revocation_feed_message::Item {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("the feed answers in time")
        .expect("stream ok")
        .expect("stream open")
        .item
        .expect("item")
}

// ---------------------------------------------------------------------------------------
// 1. The revocation feed
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn feed_heads_cover_only_the_tail_and_a_relying_party_goes_stale_on_replays_and_forgeries() {
    let h = start().await;
    let (agent, agent_cert) = minted(&h, DEPLOY_AGENT);
    let mut c = Broker::new(h.channel_as(&agent).await);
    let mut tokens = Vec::new();
    for _ in 0..4 {
        let r = c
            .issue_credential(gpu_request(3000))
            .await
            .expect("issued")
            .into_inner();
        tokens.push((token_of(&r.credential), r.lease.expect("lease").id));
    }
    let feed_key =
        std::fs::read_to_string(h.env.state_dir.join("keys/revocations.vkey")).expect("feed key");
    let mut cfg = RpConfig::new(
        &format!("http://{}", h.env.http_addr),
        "gpu-scheduler",
        &feed_key,
    )
    .expect("rp config");
    cfg.clock = h.clock.clone();
    cfg.max_staleness = Duration::from_secs(60);
    let rp = RelyingParty::new(cfg);
    rp.refresh_keys().await.expect("keys");
    rp.sync_revocations().await.expect("first sync");
    rp.verify(&tokens[1].0, Some(&agent_cert))
        .expect("fresh and valid");
    // What an attacker keeps: the genuine empty page at position 0.
    let old_head = head_of(&feed_page(&h, 0, 1000).await);

    // Revoke token 0; the feed's tail is now 1. Time passes beyond the staleness bound.
    revoke_lease(&h, &tokens[0].1).await;
    h.clock.advance(Duration::from_secs(61));

    // The broker signs no fresh head for position 0 any more, on either path.
    let page = feed_page(&h, 0, 1000).await;
    assert_eq!(page["tail"], 1);
    assert!(head_of(&page).contains("\n1\n"), "head at the tail: {page}");
    let mut feed = feed_of(&h, SCHEDULER).await;
    let mut s = feed
        .watch_revocations(pb::WatchRevocationsRequest { since: 0 })
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        next_item(&mut s).await,
        pb::revocation_feed_message::Item::Event(_)
    ));
    match next_item(&mut s).await {
        pb::revocation_feed_message::Item::SignedHead(note) => {
            assert!(
                note.contains("\n1\n"),
                "the stream's head is at the tail: {note}"
            )
        }
        other => panic!("expected a head, got {other:?}"),
    }
    drop(s);

    // Replaying the old empty page keeps nothing fresh: the relying party fails closed.
    let _ = rp.apply_feed(&[], Some(&old_head), false);
    assert!(
        matches!(
            rp.verify(&tokens[1].0, Some(&agent_cert)),
            Err(RpError::Stale(_))
        ),
        "a replayed old head must not refresh the feed"
    );
    // A genuine fresh head for a position we have not reached is refused too.
    let err = rp
        .apply_feed(&[], Some(&head_of(&page)), false)
        .expect_err("a head ahead of our position with no events");
    assert!(err.to_string().contains("not over the position"), "{err}");
    assert!(matches!(
        rp.verify(&tokens[1].0, Some(&agent_cert)),
        Err(RpError::Stale(_))
    ));

    // A forged `more` chain: events of the attacker's choosing (revoking token 1), chained
    // correctly, under a genuine head further on. Buffered, never applied.
    revoke_lease(&h, &tokens[2].1).await;
    let genuine_ahead = head_of(&feed_page(&h, 0, 1).await);
    let mut forged = RevocationEvent {
        seq: 1,
        lease_id: tokens[1].1.clone(),
        spiffe_id: DEPLOY_AGENT.into(),
        profile: "gpu-scheduler-submit".into(),
        expires_at: h.clock.unix_seconds() + 3000,
        revoked_at: h.clock.unix_seconds(),
        reason: "forged".into(),
        chain_hash: String::new(),
        certificate_serial: None,
    };
    forged.chain_hash = hex::encode(forged.chain(&[0; 32]));
    assert_eq!(
        rp.apply_feed(&[forged.clone()], Some(&genuine_ahead), true)
            .expect("a more page is buffered"),
        0,
        "nothing applied before a head covers it"
    );
    // Its end can never be covered: no head over the forged chain exists.
    assert!(rp.apply_feed(&[], Some(&genuine_ahead), false).is_err());

    // The genuine feed catches the relying party up: tokens 0 and 2 revoked, token 1 not.
    assert_eq!(rp.sync_revocations().await.expect("sync"), 2);
    assert_eq!(
        rp.verify(&tokens[0].0, Some(&agent_cert)),
        Err(RpError::Revoked)
    );
    assert_eq!(
        rp.verify(&tokens[2].0, Some(&agent_cert)),
        Err(RpError::Revoked)
    );
    rp.verify(&tokens[1].0, Some(&agent_cert))
        .expect("the forged revocation was never applied");

    // A position past the tail is refused on both paths.
    let (status, body) = h.http_get("/revocations?since=99").await;
    assert_eq!(status, 416, "{body}");
    assert!(body.contains("past the revocation feed's tail"), "{body}");
    let err = feed
        .watch_revocations(pb::WatchRevocationsRequest { since: 99 })
        .await
        .expect_err("past the tail");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

#[tokio::test]
async fn only_registered_relying_parties_watch_the_feed() {
    let h = start().await;
    for (who, why) in [
        (ROGUE, "not a registered identity"),
        (MODEL_RUNTIME, "relying-party"),
    ] {
        let err = feed_of(&h, who)
            .await
            .watch_revocations(pb::WatchRevocationsRequest { since: 0 })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains(why), "{who}: {}", err.message());
    }
    let mut ok = feed_of(&h, SCHEDULER)
        .await
        .watch_revocations(pb::WatchRevocationsRequest { since: 0 })
        .await
        .expect("a relying party watches")
        .into_inner();
    assert!(matches!(
        next_item(&mut ok).await,
        pb::revocation_feed_message::Item::SignedHead(_)
    ));
}

// ---------------------------------------------------------------------------------------
// 2. Separation of duties
// ---------------------------------------------------------------------------------------

/// `on_behalf_of` is what the caller says, so it decides nothing: naming alice neither
/// bars her from approving nor does anything else; it is recorded as a note. The verified
/// chain of a token exchange is what bars its subject and actors
/// (`delegation::nobody_in_the_verified_chain_may_approve_and_the_approval_binds_the_chain`).
#[tokio::test]
async fn an_unverified_on_behalf_of_is_a_note_that_decides_nothing() {
    let h = start().await;
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let req = push_request(&[ALICE]);
    let ar = open_pending(&mut agent, req.clone()).await;
    assert!(ar.delegation.is_none(), "no verified chain");
    let approved = review(&mut approvals_of(&h, ALICE).await, &ar.id, true)
        .await
        .expect("alice is an approver; the name in the note is not verified");
    assert_eq!(approved.state, pb::AccessRequestState::Approved as i32);
    let issued = agent
        .issue_credential(redeem_of(&req, &ar.id))
        .await
        .expect("redeemed")
        .into_inner();
    let claims = verify_jwt(&token_of(&issued.credential), &h.jwks().await);
    assert_eq!(claims["sub"], DEPLOY_AGENT);
    assert!(claims.get("act").is_none(), "no act from a note");
    let entry = entries_of(&h, "issue")
        .into_iter()
        .find(|e| e["access_request_id"] == ar.id.as_str())
        .expect("issue entry");
    assert_eq!(
        entry["request"]["intent"]["on_behalf_of"][0], ALICE,
        "kept as a note"
    );
}

#[tokio::test]
async fn the_owner_of_the_requester_may_not_approve_unless_the_group_allows_it() {
    let owned = |allow: bool| -> spiffe_broker::dev::ConfigEdit {
        Box::new(move |c: String| {
            let c = c.replacen(
                "owner = \"ml-platform-team\"",
                "owner = \"spiffe://example.org/ops/bob\"",
                1,
            );
            if allow {
                c.replacen(
                    "name = \"registry-approvers\"",
                    "name = \"registry-approvers\"\nallow_owner_review = true",
                    1,
                )
            } else {
                c
            }
        })
    };
    let h = start_with(Some(owned(false))).await;
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let ar = open_pending(&mut agent, push_request(&[])).await;
    let err = review(&mut approvals_of(&h, BOB).await, &ar.id, true)
        .await
        .expect_err("bob owns the deploy agent");
    assert!(
        err.message().contains("separation-of-duties/owner"),
        "{}",
        err.message()
    );
    review(&mut approvals_of(&h, ALICE).await, &ar.id, true)
        .await
        .expect("alice does not own it");

    let h = start_with(Some(owned(true))).await;
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let ar = open_pending(&mut agent, push_request(&[])).await;
    review(&mut approvals_of(&h, BOB).await, &ar.id, true)
        .await
        .expect("the group allows owners to review");
}

#[test]
fn approvals_on_record_from_the_chain_do_not_count() {
    use spiffe_broker::authn::AuthMethod;
    use spiffe_broker::config::Config;
    use spiffe_broker::domain::{
        CredentialRequest, Delegation, Party, PartyKind, SubjectTokenType,
    };
    use spiffe_broker::policy::{CedarPolicy, Decision, Policy, RequestContext};
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    spiffe_broker::dev::write_demo_policy(&state).expect("policy files");
    let addr = "127.0.0.1:1".parse().expect("addr");
    let config =
        Config::from_toml(&spiffe_broker::dev::demo_config(&state, addr, addr)).expect("config");
    let policy = CedarPolicy::load(&config).expect("policy");
    let mut req = spiffe_broker::api::parse_issue_request(&push_request(&[])).expect("request");
    // Made by token exchange for alice: she is the verified subject.
    req.delegation = Some(Delegation {
        subject: Party {
            id: ALICE.into(),
            kind: PartyKind::Person,
            email: None,
        },
        actors: vec![Party {
            id: DEPLOY_AGENT.into(),
            kind: PartyKind::Workload,
            email: None,
        }],
        subject_token_type: SubjectTokenType::BrokerToken,
        subject_token_sha256: "00".repeat(32),
        parent_lease: None,
        subject_groups: Vec::new(),
    });
    let decide = |approvals: &[&str], req: &CredentialRequest| {
        policy.decide(
            &spiffe::SpiffeId::new(DEPLOY_AGENT).expect("id"),
            req,
            &RequestContext {
                now: 1_800_000_000,
                auth_method: AuthMethod::X509Svid,
                break_glass: false,
                approvals: approvals.iter().map(|s| s.to_string()).collect(),
                person_approvals_group: None,
            },
        )
    };
    assert!(
        matches!(decide(&[ALICE], &req), Decision::RequireApproval(_, ref need) if need.have == 0 && !need.eligible.contains(&ALICE.to_string())),
        "alice's approval of a request made for her (verified) does not count"
    );
    assert!(matches!(decide(&[BOB], &req), Decision::Allow(_)));
}

// ---------------------------------------------------------------------------------------
// 3. Ledger flooding
// ---------------------------------------------------------------------------------------

fn limited(per_minute: u32) -> spiffe_broker::dev::ConfigEdit {
    Box::new(move |c: String| {
        c.replacen(
            "calls_per_identity_per_minute = 1200",
            &format!("calls_per_identity_per_minute = {per_minute}"),
            1,
        )
    })
}

/// Sends `n` requests 32 at a time; returns how many were refused with `code`.
async fn flood(c: &Broker, n: usize, req: pb::IssueCredentialRequest, code: Code) -> usize {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|_| {
            let mut c = c.clone();
            let req = req.clone();
            async move { c.issue_credential(req).await }
        })
        .buffer_unordered(32)
        .filter(|r| {
            let hit = matches!(r, Err(s) if s.code() == code);
            async move { hit }
        })
        .count()
        .await
}

#[tokio::test]
async fn a_flood_from_one_identity_adds_a_bounded_number_of_entries_and_others_keep_issuing() {
    let h = start_with(Some(limited(100))).await;
    let runtime = broker_of(&h, MODEL_RUNTIME).await;
    let mut prov = broker_of(&h, PROVISIONER).await;
    let before = h.audit_bodies().len();
    let unknown = pb::IssueCredentialRequest {
        profile: "no-such-profile".into(),
        ..Default::default()
    };

    let flooding = flood(&runtime, 10_000, unknown.clone(), Code::ResourceExhausted);
    let issuing = async {
        // Another identity issues while the flood runs.
        for _ in 0..5 {
            prov.issue_credential(gpu_request(600))
                .await
                .expect("another identity keeps issuing");
        }
    };
    let (throttled, ()) = tokio::join!(flooding, issuing);
    assert_eq!(throttled, 10_000 - 100, "the bucket admits 100 a minute");
    let added = h.audit_bodies().len() - before;
    // 100 admitted refusals, one summary, five issuances.
    assert!(added <= 100 + 1 + 5, "{added} entries for 10,000 requests");
    let summaries: Vec<_> = entries_of(&h, "deny")
        .into_iter()
        .filter(|e| e["rule"] == "limits/per-identity")
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");

    // A minute later the next refusal carries the count of those only counted.
    h.clock.advance(Duration::from_secs(60));
    flood(&runtime, 150, unknown, Code::ResourceExhausted).await;
    let summaries: Vec<_> = entries_of(&h, "deny")
        .into_iter()
        .filter(|e| e["rule"] == "limits/per-identity")
        .collect();
    assert_eq!(summaries.len(), 2);
    let reason = summaries[1]["reason"].as_str().expect("reason");
    assert!(reason.contains("call(s) refused"), "{reason}");

    // Unregistered identities share one bucket per address, whatever IDs they mint.
    let before = h.audit_bodies().len();
    let mut refused = 0;
    for i in 0..10 {
        let rogue = broker_of(&h, &format!("spiffe://example.org/rogue/{i}")).await;
        refused += flood(&rogue, 20, gpu_request(600), Code::ResourceExhausted).await;
    }
    assert_eq!(refused, 200 - 60);
    assert!(h.audit_bodies().len() - before <= 60 + 1);
}

#[tokio::test]
async fn renewals_of_one_lease_have_a_quota() {
    let h = start().await;
    let mut prov = broker_of(&h, PROVISIONER).await;
    let lease = prov
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease")
        .id;
    let renew = |c: &mut Broker| {
        let mut c = c.clone();
        let id = lease.clone();
        async move {
            c.renew_lease(pb::RenewLeaseRequest {
                lease_id: id,
                ttl: None,
            })
            .await
        }
    };
    for _ in 0..6 {
        renew(&mut prov).await.expect("within the quota");
    }
    let err = renew(&mut prov).await.expect_err("the 7th in a minute");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("renewals per minute per lease"));
    h.clock.advance(Duration::from_secs(10));
    renew(&mut prov).await.expect("the bucket refills");
}

// ---------------------------------------------------------------------------------------
// 4. Streams
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn streams_count_per_identity_and_against_the_in_flight_cap() {
    let h = start_with(Some(Box::new(|c: String| {
        c.replacen(
            "max_streams_per_identity = 8",
            "max_streams_per_identity = 2",
            1,
        )
    })))
    .await;
    let mut feed = feed_of(&h, SCHEDULER).await;
    let watch = |f: &mut Feed| {
        let mut f = f.clone();
        async move {
            f.watch_revocations(pb::WatchRevocationsRequest { since: 0 })
                .await
                .map(|r| r.into_inner())
        }
    };
    let mut a = watch(&mut feed).await.expect("first");
    let _b = watch(&mut feed).await.expect("second");
    next_item(&mut a).await;
    let err = watch(&mut feed).await.expect_err("third");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("open streams"), "{}", err.message());

    // A normal client still issues while the limit is held.
    broker_of(&h, PROVISIONER)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect("issuance goes on");

    // Closing a stream frees its slot.
    drop(a);
    let reopened = async {
        loop {
            if let Ok(s) = watch(&mut feed).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("the slot is released when the stream ends");

    // Unregistered callers open no streams at all.
    let err = broker_of(&h, ROGUE)
        .await
        .watch_access_request(pb::GetAccessRequestRequest { id: "0".repeat(32) })
        .await
        .expect_err("unregistered");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Streams hold in-flight slots: with a cap of 2, two streams leave none for a call.
    let h = start_with(Some(Box::new(|c: String| {
        format!("max_in_flight = 2\n{c}")
    })))
    .await;
    let mut feed = feed_of(&h, SCHEDULER).await;
    let _s1 = watch(&mut feed).await.expect("first");
    let _s2 = watch(&mut feed).await.expect("second");
    let err = broker_of(&h, PROVISIONER)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect_err("no slot left");
    assert_eq!(err.code(), Code::ResourceExhausted);
}

// ---------------------------------------------------------------------------------------
// 5. Cedar evaluation errors deny
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_policy_that_errors_denies_naming_the_policy() {
    let h = start().await;
    let file = h.env.state_dir.join("policy").join("demo.cedar");
    let mut text = std::fs::read_to_string(&file).expect("policy");
    // Overflows for every TTL above 1 s: Cedar would skip this forbid and allow.
    text.push_str(
        "\n@id(\"limits/overflowing-forbid\")\nforbid (principal, action == SpiffeBroker::Action::\"issue\", resource)\nwhen { context.ttl_secs * 9223372036854775807 > 0 };\n",
    );
    std::fs::write(&file, text).expect("write policy");
    h.admin_as(ROOT)
        .await
        .reload_policy(pb::ReloadPolicyRequest::default())
        .await
        .expect("reloaded");
    let err = broker_of(&h, PROVISIONER)
        .await
        .issue_credential(gpu_request(600))
        .await
        .expect_err("an erroring forbid denies");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("limits/overflowing-forbid"),
        "{}",
        err.message()
    );
    assert_eq!(h.lease_count(), 0);
    let denial = entries_of(&h, "deny").pop().expect("recorded");
    assert_eq!(denial["rule"], "limits/overflowing-forbid");
}

// ---------------------------------------------------------------------------------------
// 7. Approvals bound to the grant and how it is held
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_approval_binds_the_resolved_grant_and_the_auth_method() {
    let h = start().await;
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let req = push_request(&[]);
    let ar = open_pending(&mut agent, req.clone()).await;
    assert_eq!(ar.auth_method, "x509-svid");
    assert_eq!(ar.granted_ttl.expect("resolved ttl").seconds, 600);
    assert_eq!(
        ar.granted_scopes,
        vec![
            "repository:models/llama:pull".to_owned(),
            "repository:models/llama:push".to_owned()
        ]
    );
    review(&mut approvals_of(&h, ALICE).await, &ar.id, true)
        .await
        .expect("approved");

    // Redeeming with a bearer JWT-SVID would turn an mTLS-bound token into a bearer one.
    let jwt = h
        .env
        .ca
        .mint_jwt_svid(
            &spiffe::SpiffeId::new(DEPLOY_AGENT).expect("id"),
            &[spiffe_broker::dev::BROKER_ID.to_owned()],
            Duration::from_secs(300),
        )
        .expect("jwt-svid");
    let anonymous = ClientIdentity::Anonymous {
        bundle: vec![h.env.ca.ca_der().clone()],
    };
    let mut bearer = Broker::new(h.channel_as(&anonymous).await);
    let mut r = tonic::Request::new(redeem_of(&req, &ar.id));
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {jwt}").parse().expect("header"),
    );
    let err = bearer
        .issue_credential(r)
        .await
        .expect_err("another method");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("approved for x509-svid authentication, redeemed with jwt-svid"),
        "{}",
        err.message()
    );
    assert_eq!(h.lease_count(), 0);

    agent
        .issue_credential(redeem_of(&req, &ar.id))
        .await
        .expect("the approved way still works");
}

// ---------------------------------------------------------------------------------------
// 8. Break-glass
// ---------------------------------------------------------------------------------------

fn break_glass(ticket: bool) -> pb::IssueCredentialRequest {
    let mut r = push_request(&[]);
    r.break_glass = true;
    if let Some(i) = r.intent.as_mut() {
        i.justification = "registry outage, prod model rollback".into();
        if !ticket {
            i.ticket.clear();
        }
    }
    r
}

#[tokio::test]
async fn break_glass_is_limited_keeps_required_fields_and_a_denied_post_review_revokes() {
    let h = start().await;
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;

    let err = agent
        .issue_credential(break_glass(false))
        .await
        .expect_err("the profile requires a ticket, break-glass included");
    assert!(err.message().contains("ticket"), "{}", err.message());

    let first = agent
        .issue_credential(break_glass(true))
        .await
        .expect("break-glass")
        .into_inner();
    let lease = first.lease.expect("lease").id;
    let ar = first.access_request.expect("post-review request");

    let err = agent
        .issue_credential(break_glass(true))
        .await
        .expect_err("one open break-glass use per identity and profile");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("awaiting post-review"),
        "{}",
        err.message()
    );

    let reviewed = review(&mut approvals_of(&h, ALICE).await, &ar.id, false)
        .await
        .expect("post-review denies");
    assert_eq!(reviewed.post_review, "denied");
    let leases = h
        .admin_as(ROOT)
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .expect("leases")
        .into_inner()
        .leases;
    let l = leases.iter().find(|l| l.id == lease).expect("lease listed");
    assert_eq!(l.state, pb::LeaseState::Revoked as i32, "{l:?}");
    let feed = feed_page(&h, 0, 1000).await;
    assert_eq!(feed["events"][0]["lease_id"], lease.as_str());

    // Reviewed: break-glass is available again.
    agent
        .issue_credential(break_glass(true))
        .await
        .expect("after the post-review");
}
