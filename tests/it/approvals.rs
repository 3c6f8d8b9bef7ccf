//! Approvals end to end over SPIFFE mTLS: access requests, reviews (with separation of
//! duties), redemption bound to the exact request, expiry, break-glass and watching.
//! Every flow also checks the ledger entries it leaves.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

const BOB: &str = "spiffe://example.org/ops/bob";
const CAROL: &str = "spiffe://example.org/ops/carol";
const PROFILE: &str = "model-registry-push";
const DIGEST: &str = PUSH_DIGEST;
const OTHER_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000001";

type Approvals = pb::approvals_client::ApprovalsClient<Channel>;
type Broker = pb::credential_broker_client::CredentialBrokerClient<Channel>;
use pb::list_access_requests_request::Filter;

fn ttl(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    })
}

fn redeem_of(req: &pb::IssueCredentialRequest, id: &str) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        access_request_id: id.to_owned(),
        ..req.clone()
    }
}

fn break_glass_request(ttl_secs: Option<i64>, justification: &str) -> pb::IssueCredentialRequest {
    let mut r = push_request();
    r.break_glass = true;
    r.ttl = ttl_secs.and_then(ttl);
    if let Some(i) = r.intent.as_mut() {
        i.justification = justification.into();
    }
    r
}

/// An SVID minted straight from the dev CA (for identities without a Workload API socket,
/// or to stay valid after the manual clock moved past the Workload API SVIDs' 1h).
fn minted(h: &Harness, id: &str, ttl: Duration) -> ClientIdentity {
    let svid = h
        .env
        .ca
        .mint_x509_svid(&spiffe::SpiffeId::new(id).expect("spiffe id"), ttl)
        .expect("mint SVID");
    ClientIdentity::Files {
        chain: svid.chain,
        key: Arc::new(svid.key_pkcs8.to_vec()),
        bundle: vec![h.env.ca.ca_der().clone()],
    }
}

async fn approvals_as(h: &Harness, id: &str) -> Approvals {
    let identity = h.identity(id).await;
    Approvals::new(h.channel_as(&identity).await)
}

async fn approvals_with(h: &Harness, identity: &ClientIdentity) -> Approvals {
    Approvals::new(h.channel_as(identity).await)
}

async fn broker_with(h: &Harness, identity: &ClientIdentity) -> Broker {
    Broker::new(h.channel_as(identity).await)
}

/// Sends a request that needs approval and checks it came back pending, without a credential.
async fn open_pending(c: &mut Broker, req: pb::IssueCredentialRequest) -> pb::AccessRequest {
    let resp = c
        .issue_credential(req)
        .await
        .expect("pending request accepted")
        .into_inner();
    assert!(resp.credential.is_none(), "no credential before approval");
    assert!(resp.lease.is_none(), "no lease before approval");
    let ar = resp.access_request.expect("access request");
    assert_eq!(ar.state, pb::AccessRequestState::Pending as i32);
    assert_eq!(ar.id.len(), 32);
    assert_eq!(ar.profile, PROFILE);
    assert_eq!(ar.approver_group, "registry-approvers");
    assert_eq!(ar.approvals, 0);
    ar
}

async fn review(
    c: &mut Approvals,
    id: &str,
    approve: bool,
    reason: &str,
) -> Result<pb::AccessRequest, tonic::Status> {
    c.review_access_request(pb::ReviewAccessRequestRequest {
        id: id.to_owned(),
        approve,
        reason: reason.to_owned(),
    })
    .await
    .map(|r| r.into_inner().access_request.expect("access request"))
}

async fn listed(c: &mut Approvals, filter: Filter) -> Vec<String> {
    c.list_access_requests(pb::ListAccessRequestsRequest {
        filter: filter as i32,
        page_size: 0,
    })
    .await
    .expect("listed")
    .into_inner()
    .access_requests
    .into_iter()
    .map(|a| a.id)
    .collect()
}

async fn get(c: &mut Broker, id: &str) -> pb::AccessRequest {
    c.get_access_request(pb::GetAccessRequestRequest { id: id.to_owned() })
        .await
        .expect("visible")
        .into_inner()
}

/// Ledger entries that name an access request (directly or in a bulk expiry).
fn entries_for(h: &Harness, id: &str) -> Vec<serde_json::Value> {
    h.audit_bodies()
        .into_iter()
        .filter(|b| {
            b["access_request_id"] == id
                || b["affected_requests"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == id))
        })
        .collect()
}

/// `kind:decision` of the entries naming a request, without `deny` entries: a refused
/// redemption of an unapproved request is not recorded today (see
/// `refused_redemption_is_recorded`), so these lists stay right once it is.
fn lifecycle(h: &Harness, id: &str) -> (Vec<String>, Vec<serde_json::Value>) {
    let entries: Vec<serde_json::Value> = entries_for(h, id)
        .into_iter()
        .filter(|b| b["kind"] != "deny")
        .collect();
    (entries.iter().map(kind_decision).collect(), entries)
}

fn kind_decision(b: &serde_json::Value) -> String {
    format!(
        "{}:{}",
        b["kind"].as_str().unwrap_or(""),
        b["decision"].as_str().unwrap_or("")
    )
}

fn scopes_of(claims: &serde_json::Value) -> BTreeSet<String> {
    claims["scope"]
        .as_str()
        .expect("scope claim")
        .split(' ')
        .map(str::to_owned)
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A copy of the demo policy in a temp dir with a different approval threshold.
fn policy_with_threshold(dir: &std::path::Path, n: u32) -> std::path::PathBuf {
    let text = spiffe_broker::dev::DEMO_POLICY
        .replace("@approvals(\"1\")", &format!("@approvals(\"{n}\")"));
    assert_ne!(text, spiffe_broker::dev::DEMO_POLICY, "threshold edited");
    let path = dir.join("registry.cedar");
    std::fs::write(&path, text).expect("write policy");
    path
}

fn edit(text: String, from: &str, to: &str) -> String {
    assert!(text.contains(from), "demo config contains {from:?}");
    text.replacen(from, to, 1)
}

// 1. ------------------------------------------------------------------------------------

#[tokio::test]
async fn one_approval_flow_redeems_once_and_records_the_approver() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;

    let ar = open_pending(&mut agent, push_request()).await;
    assert_eq!(ar.requester, DEPLOY_AGENT);
    assert_eq!(ar.threshold, 1);
    assert_eq!(ar.request_digest.len(), 64);
    assert_eq!(
        ar.intent.as_ref().map(|i| i.artifact_digest.as_str()),
        Some(DIGEST)
    );

    // Both approvers see it to review; the requester does not review anything.
    assert_eq!(
        listed(&mut bob, Filter::ToReview).await,
        vec![ar.id.clone()]
    );
    assert_eq!(
        listed(&mut alice, Filter::ToReview).await,
        vec![ar.id.clone()]
    );
    assert_eq!(listed(&mut bob, Filter::Pending).await, vec![ar.id.clone()]);

    // Not redeemable while pending.
    let err = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("pending is not redeemable");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(h.lease_count(), 0);

    let reason = "digest matches release notes";
    let approved = review(&mut alice, &ar.id, true, reason)
        .await
        .expect("alice approves");
    assert_eq!(approved.state, pb::AccessRequestState::Approved as i32);
    assert_eq!(approved.approvals, 1);
    assert_eq!(approved.reviews.len(), 1);
    assert_eq!(approved.reviews[0].reviewer, ALICE);
    assert!(approved.reviews[0].approve);
    assert_eq!(approved.reviews[0].reason, reason);

    // No longer to review for anyone.
    assert!(listed(&mut bob, Filter::ToReview).await.is_empty());
    assert!(listed(&mut bob, Filter::Pending).await.is_empty());
    assert!(listed(&mut alice, Filter::ToReview).await.is_empty());

    // Redeem with the exact request.
    let resp = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("redeemed")
        .into_inner();
    let token = token_of(&resp.credential);
    let lease = resp.lease.clone().expect("lease");
    let issued_ar = resp.access_request.clone().expect("access request");
    assert_eq!(issued_ar.id, ar.id);
    assert_eq!(issued_ar.state, pb::AccessRequestState::Issued as i32);
    assert_eq!(issued_ar.lease_id, lease.id);

    let claims = verify_jwt(&token, &h.jwks().await);
    assert_eq!(claims["sub"], DEPLOY_AGENT);
    assert_eq!(claims["aud"], "model-registry");
    assert_eq!(claims["jti"], lease.id);
    assert_eq!(claims["profile"], PROFILE);
    assert_eq!(
        scopes_of(&claims),
        set(&[
            "repository:models/llama:pull",
            "repository:models/llama:push"
        ])
    );
    assert_eq!(claims["intent"]["action"], "push-model");
    assert_eq!(claims["intent"]["target"], "models/llama");
    assert_eq!(claims["intent"]["artifact_digest"], DIGEST);
    assert_eq!(claims["intent"]["ticket"], "CHG-1234");
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        600,
        "the profile's default TTL"
    );

    // A retry of the same redemption: the same credential, no second lease.
    let again = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("retry answered")
        .into_inner();
    assert_eq!(token_of(&again.credential), token);
    assert_eq!(again.lease.expect("lease").id, lease.id);
    assert_eq!(h.lease_count(), 1);
    assert_eq!(
        get(&mut agent, &ar.id).await.state,
        pb::AccessRequestState::Issued as i32
    );

    // A lease granted on an approval is not renewable: a new push needs a new approval.
    let err = agent
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("approved leases do not renew");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Ledger: opened, approved by alice, issued once naming alice and her reason.
    let (kinds, entries) = lifecycle(&h, &ar.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:approve",
            "issue:allow"
        ],
        "{entries:#?}"
    );
    let opened = &entries[0];
    assert_eq!(opened["caller"], DEPLOY_AGENT);
    assert_eq!(opened["rule"], "deploy/registry-push");
    assert_eq!(
        opened["reason"],
        "needs 1 approval(s) from registry-approvers"
    );
    assert_eq!(opened["request"]["intent"]["artifact_digest"], DIGEST);
    let rev = &entries[1];
    assert_eq!(rev["caller"], ALICE);
    assert_eq!(rev["reason"], reason);
    assert_eq!(rev["rule"], "approvers/review-registry-push");
    let issue = &entries[2];
    assert_eq!(issue["caller"], DEPLOY_AGENT);
    assert_eq!(issue["rule"], "deploy/registry-push");
    assert_eq!(issue["lease_id"], lease.id);
    assert_eq!(issue["credential_sha256"], lease.credential_sha256);
    assert_eq!(issue["request"]["intent"]["artifact_digest"], DIGEST);
    assert!(issue.get("break_glass").is_none(), "not break-glass");
    let approvals = issue["approvals"].as_array().expect("approvals");
    assert_eq!(approvals.len(), 1, "{issue}");
    assert_eq!(approvals[0]["reviewer"], ALICE);
    assert_eq!(approvals[0]["verdict"], "approve");
    assert_eq!(approvals[0]["reason"], reason);
    let hash = opened["policy_hash"].as_str().expect("policy hash");
    assert_eq!(hash.len(), 64);
    assert_eq!(rev["policy_hash"], hash);
    assert_eq!(issue["policy_hash"], hash);
    let issues = h
        .audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == "issue")
        .count();
    assert_eq!(issues, 1, "the retry wrote no second issuance");
}

// 2. ------------------------------------------------------------------------------------

#[tokio::test]
async fn two_of_three_needs_two_distinct_approvers() {
    let policy_dir = tempfile::tempdir().expect("tempdir");
    let policy = policy_with_threshold(policy_dir.path(), 2);
    let h = start_with(Some(Box::new(move |demo: String| {
        let start = demo.find("files = [").expect("policy files line");
        let end = start + demo[start..].find('\n').expect("end of line");
        let demo = format!(
            "{}files = [\"{}\"]{}",
            &demo[..start],
            policy.display(),
            &demo[end..]
        );
        let demo = edit(
            demo,
            "[[approver_groups]]",
            &format!(
                "[[identities]]\nspiffe_id = \"{CAROL}\"\nowner = \"carol@example.org\"\nenvironment = \"prod\"\n\n[[approver_groups]]"
            ),
        );
        edit(
            demo,
            &format!("members = [\"{ALICE}\", \"{BOB}\"]"),
            &format!("members = [\"{ALICE}\", \"{BOB}\", \"{CAROL}\"]"),
        )
    })))
    .await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;
    let mut carol = approvals_with(&h, &minted(&h, CAROL, Duration::from_secs(3600))).await;

    let ar = open_pending(&mut agent, push_request()).await;
    assert_eq!(ar.threshold, 2);
    assert_eq!(
        listed(&mut carol, Filter::ToReview).await,
        vec![ar.id.clone()]
    );

    let one = review(&mut alice, &ar.id, true, "digest checked")
        .await
        .expect("alice approves");
    assert_eq!(one.state, pb::AccessRequestState::Pending as i32, "1 of 2");
    assert_eq!(one.approvals, 1);

    // The same approver twice does not make two approvals.
    let err = review(&mut alice, &ar.id, true, "again")
        .await
        .expect_err("one review per approver");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("already reviewed"),
        "{}",
        err.message()
    );
    let still = get(&mut agent, &ar.id).await;
    assert_eq!(still.state, pb::AccessRequestState::Pending as i32);
    assert_eq!(still.approvals, 1);

    // Still pending: not redeemable; alice has nothing left to review, bob and carol do.
    let err = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("pending");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(listed(&mut alice, Filter::ToReview).await.is_empty());
    assert_eq!(
        listed(&mut bob, Filter::ToReview).await,
        vec![ar.id.clone()]
    );

    let two = review(&mut carol, &ar.id, true, "ticket approved in CAB")
        .await
        .expect("carol approves");
    assert_eq!(two.state, pb::AccessRequestState::Approved as i32, "2 of 2");
    assert_eq!(two.approvals, 2);
    assert!(listed(&mut bob, Filter::ToReview).await.is_empty());

    let resp = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("redeemed")
        .into_inner();
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["intent"]["artifact_digest"], DIGEST);
    assert_eq!(h.lease_count(), 1);

    let (kinds, entries) = lifecycle(&h, &ar.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:approve",
            "review:deny",
            "review:approve",
            "issue:allow"
        ],
        "{entries:#?}"
    );
    assert_eq!(
        entries[0]["reason"],
        "needs 2 approval(s) from registry-approvers"
    );
    assert_eq!(entries[1]["caller"], ALICE);
    assert_eq!(entries[2]["caller"], ALICE, "the refused second review");
    assert_eq!(
        entries[2]["reason"],
        "this approver already reviewed the request"
    );
    assert_eq!(entries[3]["caller"], CAROL);
    let approvers: BTreeSet<(String, String)> = entries[4]["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .map(|a| {
            assert_eq!(a["verdict"], "approve");
            (
                a["reviewer"].as_str().unwrap_or("").to_owned(),
                a["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        approvers,
        BTreeSet::from([
            (ALICE.to_owned(), "digest checked".to_owned()),
            (CAROL.to_owned(), "ticket approved in CAB".to_owned()),
        ])
    );
    drop(policy_dir);
}

// 3. ------------------------------------------------------------------------------------

#[tokio::test]
async fn requester_cannot_approve_its_own_request() {
    let h = start_with(Some(Box::new(|demo: String| {
        edit(
            demo,
            "owner = \"alice@example.org\"\nenvironment = \"prod\"\n",
            "owner = \"alice@example.org\"\nenvironment = \"prod\"\nroles = [\"deployer\"]\n",
        )
    })))
    .await;
    let mut alice_broker = h.broker_as(ALICE).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;

    let ar = open_pending(&mut alice_broker, push_request()).await;
    assert_eq!(ar.requester, ALICE);

    // Alice never sees her own request to review; bob does.
    assert!(listed(&mut alice, Filter::ToReview).await.is_empty());
    assert_eq!(
        listed(&mut bob, Filter::ToReview).await,
        vec![ar.id.clone()]
    );

    let err = review(&mut alice, &ar.id, true, "looks fine to me")
        .await
        .expect_err("self-approval");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("own request"), "{}", err.message());

    let after = get(&mut alice_broker, &ar.id).await;
    assert_eq!(after.state, pb::AccessRequestState::Pending as i32);
    assert_eq!(after.approvals, 0);
    assert!(after.reviews.is_empty());
    let err = alice_broker
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("not approved");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.lease_count(), 0);

    // The refusal is on the ledger; bob's approval then counts and alice redeems.
    review(&mut bob, &ar.id, true, "second pair of eyes")
        .await
        .expect("bob approves");
    let resp = alice_broker
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("redeemed")
        .into_inner();
    assert_eq!(
        verify_jwt(&token_of(&resp.credential), &h.jwks().await)["sub"],
        ALICE
    );

    let (kinds, entries) = lifecycle(&h, &ar.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:approve",
            "issue:allow"
        ],
        "{entries:#?}"
    );
    // The refusal is recorded against the request, naming the separation-of-duties rule.
    let refusal = entries_for(&h, &ar.id)
        .into_iter()
        .find(|b| b["kind"] == "deny" && b["caller"] == ALICE)
        .expect("self-review refusal recorded");
    assert_eq!(refusal["rule"], "separation-of-duties/requester");
    assert!(refusal["reason"]
        .as_str()
        .is_some_and(|r| r.contains("may not review its own request")));
    let approvals = entries[2]["approvals"].as_array().expect("approvals");
    assert_eq!(approvals.len(), 1);
    assert_eq!(approvals[0]["reviewer"], BOB);

    // Nor can she post-review her own break-glass issuance, though she may post-review.
    let bg = alice_broker
        .issue_credential(break_glass_request(Some(300), "prod outage INC-43"))
        .await
        .expect("break-glass issued")
        .into_inner()
        .access_request
        .expect("break-glass access request");
    assert!(listed(&mut alice, Filter::AwaitingPostReview)
        .await
        .contains(&bg.id));
    let err = review(&mut alice, &bg.id, true, "I was there")
        .await
        .expect_err("self post-review");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let (kinds, entries) = lifecycle(&h, &bg.id);
    assert_eq!(kinds, vec!["issue:allow"], "{entries:#?}");
    assert!(entries_for(&h, &bg.id)
        .iter()
        .any(|b| b["kind"] == "deny" && b["rule"] == "separation-of-duties/requester"));
    assert_eq!(
        listed(&mut bob, Filter::AwaitingPostReview).await,
        vec![bg.id.clone()],
        "still awaiting a post-review"
    );
}

// 4. ------------------------------------------------------------------------------------

#[tokio::test]
async fn identities_without_the_review_permission_are_refused() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let ar = open_pending(&mut agent, push_request()).await;

    for who in [ROOT, MODEL_RUNTIME] {
        let mut c = approvals_as(&h, who).await;
        assert!(
            listed(&mut c, Filter::ToReview).await.is_empty(),
            "{who} has nothing to review"
        );
        let err = review(&mut c, &ar.id, true, "I run the platform")
            .await
            .expect_err("not an approver");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{who}: {}",
            err.message()
        );
        assert!(
            err.message().contains("may not review"),
            "{who}: {}",
            err.message()
        );
        let now = get(&mut agent, &ar.id).await;
        assert_eq!(now.state, pb::AccessRequestState::Pending as i32);
        assert_eq!(now.approvals, 0);
        assert!(now.reviews.is_empty());
    }
    let err = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("still pending");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.lease_count(), 0);

    // Both refusals are recorded as denials of ReviewAccessRequest; nothing else happened.
    let bodies = h.audit_bodies();
    for who in [ROOT, MODEL_RUNTIME] {
        let denial = bodies
            .iter()
            .find(|b| b["kind"] == "deny" && b["caller"] == who)
            .unwrap_or_else(|| panic!("deny entry for {who}"));
        assert_eq!(denial["decision"], "deny");
        assert_eq!(denial["request"]["rpc"], "ReviewAccessRequest");
        assert_eq!(denial["request"]["profile"], PROFILE);
        assert!(
            denial["reason"]
                .as_str()
                .is_some_and(|r| r.contains("may not review")),
            "{denial}"
        );
    }
    let (kinds, _) = lifecycle(&h, &ar.id);
    assert_eq!(kinds, vec!["access_request:require_approval"]);
    assert!(!bodies
        .iter()
        .any(|b| b["kind"] == "review" || b["kind"] == "issue"));
}

// 5. ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_denied_request_cannot_be_redeemed() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;
    let ar = open_pending(&mut agent, push_request()).await;

    let reason = "digest not in the release manifest";
    let denied = review(&mut bob, &ar.id, false, reason)
        .await
        .expect("bob denies");
    assert_eq!(denied.state, pb::AccessRequestState::Denied as i32);
    assert_eq!(denied.approvals, 0);
    assert_eq!(denied.reviews.len(), 1);
    assert!(!denied.reviews[0].approve);
    assert_eq!(denied.reviews[0].reason, reason);
    assert!(listed(&mut alice, Filter::ToReview).await.is_empty());

    let err = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("denied"), "{}", err.message());
    assert_eq!(h.lease_count(), 0);

    // A later approval cannot revive it.
    let err = review(&mut alice, &ar.id, true, "overrule")
        .await
        .expect_err("decided");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(
        get(&mut agent, &ar.id).await.state,
        pb::AccessRequestState::Denied as i32
    );

    let (kinds, entries) = lifecycle(&h, &ar.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:deny",
            "review:deny"
        ],
        "{entries:#?}"
    );
    assert_eq!(entries[1]["caller"], BOB);
    assert_eq!(entries[1]["reason"], reason);
    assert_eq!(entries[2]["caller"], ALICE);
    assert_eq!(entries[2]["reason"], "access request is denied");
    assert!(!h.audit_bodies().iter().any(|b| b["kind"] == "issue"));
}

// 6. ------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_requests_expire_after_the_approval_ttl() {
    let h = start().await;
    // The Workload API SVIDs last 1h of the broker's (manual) clock: callers after the
    // jump use SVIDs minted for longer.
    let long = Duration::from_secs(6 * 3600);
    let mut agent = broker_with(&h, &minted(&h, DEPLOY_AGENT, long)).await;
    let mut alice = approvals_with(&h, &minted(&h, ALICE, long)).await;
    let mut bob = approvals_with(&h, &minted(&h, BOB, long)).await;

    let reaped_one = open_pending(&mut agent, push_request()).await;
    let mut other = push_request();
    other.intent.as_mut().expect("intent").artifact_digest = OTHER_DIGEST.into();
    let unreaped = open_pending(&mut agent, other.clone()).await;
    let created = reaped_one.created_at.expect("created").seconds;
    assert_eq!(
        reaped_one.expires_at.expect("expires").seconds - created,
        3600,
        "approval_ttl"
    );

    // Just before the deadline nothing is reaped.
    h.clock.advance(Duration::from_secs(3599));
    assert_eq!(h.env.broker.reap_expired().await.expect("reaped"), 0);
    h.clock.advance(Duration::from_secs(2));

    // A review after the deadline but before the reaper ran is refused and expires it.
    let err = review(&mut alice, &unreaped.id, true, "sorry, was on leave")
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(
        get(&mut agent, &unreaped.id).await.state,
        pb::AccessRequestState::Expired as i32
    );

    // The reaper expires the other one.
    assert_eq!(h.env.broker.reap_expired().await.expect("reaped"), 1);
    assert_eq!(h.env.broker.reap_expired().await.expect("reaped"), 0);
    let now = get(&mut agent, &reaped_one.id).await;
    assert_eq!(now.state, pb::AccessRequestState::Expired as i32);
    assert!(listed(&mut bob, Filter::Pending).await.is_empty());
    assert!(listed(&mut bob, Filter::ToReview).await.is_empty());

    // A late approval is refused; the request stays expired and is not redeemable.
    let err = review(&mut alice, &reaped_one.id, true, "late")
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("expired"), "{}", err.message());
    let err = agent
        .issue_credential(redeem_of(&push_request(), &reaped_one.id))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(
        get(&mut agent, &reaped_one.id).await.state,
        pb::AccessRequestState::Expired as i32
    );
    assert_eq!(h.lease_count(), 0);

    let (kinds, entries) = lifecycle(&h, &reaped_one.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "expire:allow",
            "review:deny"
        ],
        "{entries:#?}"
    );
    assert_eq!(entries[1]["reason"], "ttl elapsed");
    assert_eq!(
        entries[1]["affected_requests"],
        serde_json::json!([reaped_one.id])
    );
    assert_eq!(entries[2]["caller"], ALICE);
    assert_eq!(entries[2]["reason"], "access request is expired");

    let (kinds, entries) = lifecycle(&h, &unreaped.id);
    assert_eq!(
        kinds,
        vec!["access_request:require_approval", "review:deny"],
        "{entries:#?}"
    );
    assert_eq!(entries[1]["reason"], "access request has expired");
}

// 7. ------------------------------------------------------------------------------------

#[tokio::test]
async fn break_glass_issues_at_once_capped_loud_and_post_reviewed() {
    // Two break-glass uses awaiting post-review at once (the default allows one).
    let h = start_with(Some(Box::new(|c: String| {
        c.replacen(
            "open_break_glass_per_identity = 1",
            "open_break_glass_per_identity = 2",
            1,
        )
    })))
    .await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut bob = approvals_as(&h, BOB).await;
    let justification = "prod outage INC-42";

    // Beyond break_glass_max_ttl (5m): refused with the reason.
    let err = agent
        .issue_credential(break_glass_request(Some(600), justification))
        .await
        .expect_err("over the break-glass cap");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("break_glass_max_ttl 5m"),
        "{}",
        err.message()
    );
    // Without a justification: refused.
    let err = agent
        .issue_credential(break_glass_request(None, ""))
        .await
        .expect_err("no justification");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("justification"), "{}", err.message());
    assert_eq!(h.lease_count(), 0);

    // Within the cap, with a justification: issued at once, no approval.
    let resp = agent
        .issue_credential(break_glass_request(Some(300), justification))
        .await
        .expect("break-glass issued")
        .into_inner();
    let lease = resp.lease.clone().expect("lease");
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["sub"], DEPLOY_AGENT);
    assert_eq!(claims["intent"]["justification"], justification);
    assert_eq!(claims["intent"]["artifact_digest"], DIGEST);
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        300
    );
    assert!(
        lease.max_expires_at.expect("max").seconds - lease.issued_at.expect("issued").seconds
            <= 300,
        "break-glass leases never extend past the cap"
    );
    let ar = resp.access_request.expect("break-glass access request");
    assert!(ar.break_glass);
    assert_eq!(ar.state, pb::AccessRequestState::Issued as i32);
    assert_eq!(ar.post_review, "pending");
    assert_eq!(ar.lease_id, lease.id);
    assert_eq!(ar.requester, DEPLOY_AGENT);
    let (_, metrics) = h.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "spiffe_broker_break_glass_issuances_total 1"),
        "{metrics}"
    );

    // The default TTL under break-glass is capped too.
    let capped = agent
        .issue_credential(break_glass_request(None, justification))
        .await
        .expect("break-glass issued")
        .into_inner();
    let c2 = verify_jwt(&token_of(&capped.credential), &h.jwks().await);
    assert_eq!(
        c2["exp"].as_i64().expect("exp") - c2["iat"].as_i64().expect("iat"),
        300
    );
    let ar2 = capped.access_request.expect("access request");
    assert_eq!(h.lease_count(), 2);

    let (_, metrics) = h.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "spiffe_broker_break_glass_issuances_total 2"),
        "{metrics}"
    );

    // Listed for post-review to the profile's approvers (not the requester, not root).
    let mut awaiting = listed(&mut alice, Filter::AwaitingPostReview).await;
    awaiting.sort();
    let mut expected = vec![ar.id.clone(), ar2.id.clone()];
    expected.sort();
    assert_eq!(awaiting, expected);
    assert!(listed(&mut alice, Filter::ToReview).await.is_empty());
    let mut root = approvals_as(&h, ROOT).await;
    assert!(listed(&mut root, Filter::AwaitingPostReview)
        .await
        .is_empty());
    let mut self_review = approvals_as(&h, DEPLOY_AGENT).await;
    assert!(listed(&mut self_review, Filter::AwaitingPostReview)
        .await
        .is_empty());

    // Alice's post-review removes it from the list (for bob too); the lease stands.
    let reviewed = review(&mut alice, &ar.id, true, "outage confirmed, INC-42")
        .await
        .expect("post-review");
    assert_eq!(reviewed.post_review, "approved");
    assert_eq!(reviewed.state, pb::AccessRequestState::Issued as i32);
    assert!(reviewed.reviews.iter().all(|r| r.post_review));
    assert_eq!(
        listed(&mut alice, Filter::AwaitingPostReview).await,
        vec![ar2.id.clone()]
    );
    assert_eq!(
        listed(&mut bob, Filter::AwaitingPostReview).await,
        vec![ar2.id.clone()]
    );
    let err = review(&mut bob, &ar.id, false, "second opinion")
        .await
        .expect_err("post-reviewed once");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // Ledger: the issuance is marked break-glass with its justification; refusals recorded.
    let entries = entries_for(&h, &ar.id);
    let kinds: Vec<String> = entries.iter().map(kind_decision).collect();
    assert_eq!(
        kinds,
        vec!["issue:allow", "review:approve", "review:deny"],
        "{entries:#?}"
    );
    let issue = &entries[0];
    assert_eq!(issue["break_glass"], true);
    assert_eq!(issue["reason"], justification);
    assert_eq!(issue["rule"], "deploy/registry-push-break-glass");
    assert_eq!(issue["lease_id"], lease.id);
    assert_eq!(issue["request"]["intent"]["justification"], justification);
    assert_eq!(entries[1]["caller"], ALICE);
    assert_eq!(entries[1]["reason"], "outage confirmed, INC-42");
    assert_eq!(entries[1]["lease_id"], lease.id);
    let bodies = h.audit_bodies();
    let denials: Vec<&serde_json::Value> = bodies
        .iter()
        .filter(|b| b["kind"] == "deny" && b["request"]["profile"] == PROFILE)
        .collect();
    assert_eq!(denials.len(), 2, "{denials:#?}");
    assert!(denials[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("break_glass_max_ttl")));
    assert!(denials[1]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("justification")));
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b["kind"] == "issue" && b["break_glass"] == true)
            .count(),
        2
    );
}

// 8. ------------------------------------------------------------------------------------

#[tokio::test]
async fn an_approval_does_not_cover_a_wider_request() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let mut original = push_request();
    original.scopes = vec!["pull".into()];
    original.ttl = ttl(300);
    let ar = open_pending(&mut agent, original.clone()).await;
    assert_eq!(ar.scopes, vec!["pull".to_owned()]);
    review(&mut alice, &ar.id, true, "pull only, 5 minutes")
        .await
        .expect("approved");

    let mut other_target = original.clone();
    other_target.intent.as_mut().expect("intent").target = "models/mistral".into();
    let mut more_scopes = original.clone();
    more_scopes.scopes = vec!["pull".into(), "push".into()];
    let mut longer = original.clone();
    longer.ttl = ttl(600);
    let mut other_digest = original.clone();
    other_digest
        .intent
        .as_mut()
        .expect("intent")
        .artifact_digest = OTHER_DIGEST.into();
    let wider = [
        ("target", other_target),
        ("scope", more_scopes),
        ("ttl", longer),
        ("digest", other_digest),
    ];
    for (what, req) in &wider {
        let err = agent
            .issue_credential(redeem_of(req, &ar.id))
            .await
            .expect_err("wider than approved");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{what}: {}",
            err.message()
        );
        assert!(
            err.message().contains("different request"),
            "{what}: {}",
            err.message()
        );
    }
    assert_eq!(h.lease_count(), 0);
    assert_eq!(
        get(&mut agent, &ar.id).await.state,
        pb::AccessRequestState::Approved as i32
    );

    // Someone else cannot redeem it at all.
    let mut stranger = h.broker_as(PROVISIONER).await;
    let err = stranger
        .issue_credential(redeem_of(&original, &ar.id))
        .await
        .expect_err("not the requester");
    assert_eq!(err.code(), Code::NotFound);

    // The exact original still redeems.
    let resp = agent
        .issue_credential(redeem_of(&original, &ar.id))
        .await
        .expect("exact original redeems")
        .into_inner();
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(scopes_of(&claims), set(&["repository:models/llama:pull"]));
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        300
    );
    assert_eq!(h.lease_count(), 1);

    // After redemption, a wider retry is still refused (the retry cache is exact too).
    let err = agent
        .issue_credential(redeem_of(&wider[1].1, &ar.id))
        .await
        .expect_err("wider after redemption");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert_eq!(h.lease_count(), 1);

    // (The stranger's attempt is left out: see `refused_redemption_is_recorded`.)
    let entries: Vec<serde_json::Value> = entries_for(&h, &ar.id)
        .into_iter()
        .filter(|b| b["caller"] != PROVISIONER)
        .collect();
    let kinds: Vec<String> = entries.iter().map(kind_decision).collect();
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:approve",
            "deny:deny",
            "deny:deny",
            "deny:deny",
            "deny:deny",
            "issue:allow",
            "deny:deny"
        ],
        "{entries:#?}"
    );
    for d in entries.iter().filter(|e| e["kind"] == "deny") {
        assert_eq!(d["caller"], DEPLOY_AGENT);
        assert_eq!(d["reason"], "the approval was for a different request");
        assert!(d.get("lease_id").is_none());
    }
    assert_eq!(entries[2]["request"]["intent"]["target"], "models/mistral");
    assert_eq!(
        entries[3]["request"]["scopes"],
        serde_json::json!(["pull", "push"])
    );
    assert_eq!(entries[4]["request"]["ttl_secs"], 600);
    assert_eq!(
        entries[5]["request"]["intent"]["artifact_digest"],
        OTHER_DIGEST
    );
    assert_eq!(
        entries[6]["granted_scopes"],
        serde_json::json!(["repository:models/llama:pull"])
    );
}

// 9. ------------------------------------------------------------------------------------

#[tokio::test]
async fn watch_streams_the_review_as_it_happens() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let ar = open_pending(&mut agent, push_request()).await;
    let bound = Duration::from_secs(5);

    let mut stream = agent
        .watch_access_request(pb::GetAccessRequestRequest { id: ar.id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(bound, stream.message())
        .await
        .expect("current state within the bound")
        .expect("stream ok")
        .expect("a message");
    assert_eq!(first.id, ar.id);
    assert_eq!(first.state, pb::AccessRequestState::Pending as i32);

    let mut alice = approvals_as(&h, ALICE).await;
    let id = ar.id.clone();
    let reviewer = tokio::spawn(async move { review(&mut alice, &id, true, "watched").await });

    let next = tokio::time::timeout(bound, stream.message())
        .await
        .expect("the change arrives within the bound")
        .expect("stream ok")
        .expect("a message");
    assert_eq!(next.state, pb::AccessRequestState::Approved as i32);
    assert_eq!(next.approvals, 1);
    assert_eq!(next.reviews[0].reviewer, ALICE);
    assert_eq!(next.reviews[0].reason, "watched");
    reviewer
        .await
        .expect("review task")
        .expect("review accepted");

    // Redeeming ends the stream with the final state.
    agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("redeemed");
    let last = tokio::time::timeout(bound, stream.message())
        .await
        .expect("issued within the bound")
        .expect("stream ok")
        .expect("a message");
    assert_eq!(last.state, pb::AccessRequestState::Issued as i32);
    let end = tokio::time::timeout(bound, stream.message())
        .await
        .expect("stream ends within the bound")
        .expect("stream ok");
    assert!(end.is_none(), "final state closes the stream");

    let (kinds, _) = lifecycle(&h, &ar.id);
    assert_eq!(
        kinds,
        vec![
            "access_request:require_approval",
            "review:approve",
            "issue:allow"
        ]
    );
}

// Bugs found ----------------------------------------------------------------------------

#[tokio::test]
async fn refused_redemption_is_recorded() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut bob = approvals_as(&h, BOB).await;
    let ar = open_pending(&mut agent, push_request()).await;
    review(&mut bob, &ar.id, false, "no")
        .await
        .expect("bob denies");
    let before = h.audit_bodies().len();
    let err = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let bodies = h.audit_bodies();
    assert_eq!(
        bodies.len(),
        before + 1,
        "every refusal is a ledger entry, like a digest mismatch is"
    );
    let last = bodies.last().expect("entry");
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["caller"], DEPLOY_AGENT);
    assert_eq!(last["access_request_id"], ar.id);
    assert_eq!(last["reason"], "access request is denied");
}

#[tokio::test]
async fn refused_review_names_the_request() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let ar = open_pending(&mut agent, push_request()).await;
    let mut root = approvals_as(&h, ROOT).await;
    let err = review(&mut root, &ar.id, true, "I run the platform")
        .await
        .expect_err("not an approver");
    assert_eq!(err.code(), Code::PermissionDenied);
    let bodies = h.audit_bodies();
    let denial = bodies
        .iter()
        .find(|b| b["kind"] == "deny" && b["caller"] == ROOT)
        .expect("deny entry");
    assert_eq!(
        denial["access_request_id"], ar.id,
        "which request root tried to approve: {denial}"
    );
}

#[tokio::test]
async fn redemption_retry_does_not_report_a_revoked_lease_as_active() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut alice = approvals_as(&h, ALICE).await;
    let ar = open_pending(&mut agent, push_request()).await;
    review(&mut alice, &ar.id, true, "ok")
        .await
        .expect("approved");
    let lease = agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
        .expect("redeemed")
        .into_inner()
        .lease
        .expect("lease");
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(lease.id.clone())),
            reason: "wrong artifact pushed".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
    match agent
        .issue_credential(redeem_of(&push_request(), &ar.id))
        .await
    {
        Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message()),
        Ok(r) => {
            let again = r.into_inner().lease.expect("lease");
            assert_eq!(again.id, lease.id);
            assert_eq!(
                again.state,
                pb::LeaseState::Revoked as i32,
                "the retry answers a revoked lease as {:?}",
                pb::LeaseState::try_from(again.state)
            );
        }
    }
}
