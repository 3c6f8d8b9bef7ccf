//! Token exchange (RFC 8693) end to end over mTLS: a person's token handed to agents,
//! chains that nest `act` and only narrow, every widening refused and recorded, JWT-SVID
//! subjects whose forged `act` counts for nothing, separation of duties over the verified
//! chain, and revocation that cascades down the derivation tree to the feed.

use crate::common;

use std::time::Duration;

use common::*;
use spiffe_broker::domain::delegation::{ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE};
use spiffe_broker::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

type Broker = pb::credential_broker_client::CredentialBrokerClient<Channel>;

const BOB: &str = "spiffe://example.org/ops/bob";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const CRAWLER: &str = "spiffe://example.org/agents/crawler";

/// The demo plus two more agents that may pass a delegation on.
async fn harness() -> Harness {
    start_with(Some(Box::new(|c: String| {
        c + &[PLANNER, CRAWLER]
            .iter()
            .map(|id| {
                format!(
                    "\n[[identities]]\nspiffe_id = \"{id}\"\nowner = \"agents-team\"\nenvironment = \"prod\"\nroles = [\"gpu-provisioning\"]\n"
                )
            })
            .collect::<String>()
    })))
    .await
}

async fn broker_of(h: &Harness, id: &str) -> Broker {
    Broker::new(h.channel_as(&minted(h, id).0).await)
}

/// `ExchangeToken` as `id`.
async fn exchange(
    h: &Harness,
    id: &str,
    req: pb::ExchangeTokenRequest,
) -> Result<pb::ExchangeTokenResponse, tonic::Status> {
    broker_of(h, id)
        .await
        .exchange_token(req)
        .await
        .map(tonic::Response::into_inner)
}

/// Alice's token for agents: audience the broker, `scopes`, `ttl` seconds.
async fn delegation_token(
    h: &Harness,
    scopes: &[&str],
    ttl: i64,
    may_act: &str,
) -> pb::IssueCredentialResponse {
    broker_of(h, ALICE)
        .await
        .issue_credential(pb::IssueCredentialRequest {
            profile: "agent-delegation".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl: Some(prost_types::Duration {
                seconds: ttl,
                nanos: 0,
            }),
            may_act: may_act.into(),
            ..Default::default()
        })
        .await
        .expect("alice gets a delegation token")
        .into_inner()
}

fn gpu_exchange(subject: &str, scopes: &[&str], ttl: Option<i64>) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: subject.into(),
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        profile: "gpu-scheduler-submit".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl: ttl.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        intent: Some(pb::Intent {
            action: "submit-training".into(),
            target: "queue/a100".into(),
            ..Default::default()
        }),
        access_request_id: String::new(),
    }
}

fn pass_on(subject: &str) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: subject.into(),
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        profile: "agent-delegation".into(),
        scopes: vec!["job:submit".into(), "job:read".into()],
        ..Default::default()
    }
}

fn act_chain(claims: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = &claims["act"];
    while at.is_object() {
        out.push(at["sub"].as_str().expect("act.sub").to_owned());
        at = &at["act"];
    }
    out
}

fn last_deny(h: &Harness) -> serde_json::Value {
    h.audit_bodies()
        .into_iter()
        .rev()
        .find(|b| b["kind"] == "deny")
        .expect("a recorded refusal")
}

#[tokio::test]
async fn an_agent_acting_for_a_person_gets_a_narrower_token_that_names_both() {
    let h = harness().await;
    let root = delegation_token(&h, &["job:submit", "job:read"], 1800, "").await;
    let root_token = token_of(&root.credential);
    let root_lease = root.lease.expect("lease");
    let jwks = h.jwks().await;
    let root_claims = verify_jwt(&root_token, &jwks);
    assert_eq!(root_claims["aud"], spiffe_broker::dev::BROKER_ID);
    assert_eq!(root_claims["sub"], ALICE);

    let resp = exchange(
        &h,
        DEPLOY_AGENT,
        gpu_exchange(&root_token, &["job:submit"], None),
    )
    .await
    .expect("the agent exchanges alice's token");
    assert_eq!(resp.issued_token_type, ACCESS_TOKEN_TYPE);
    let claims = verify_jwt(&token_of(&resp.credential), &jwks);
    assert_eq!(claims["sub"], ALICE, "the credential is for the subject");
    assert_eq!(act_chain(&claims), vec![DEPLOY_AGENT.to_owned()]);
    assert_eq!(claims["aud"], "gpu-scheduler");
    assert_eq!(claims["scope"], "job:submit");
    // The profile's default TTL (10 min) is within the subject token's 30 min.
    assert!(claims["exp"].as_i64() <= root_claims["exp"].as_i64());
    // Bound to the actor's certificate: the actor holds it.
    assert!(claims["cnf"]["x5t#S256"].is_string());

    let lease = resp.lease.expect("lease");
    assert_eq!(lease.spiffe_id, DEPLOY_AGENT, "the actor holds the lease");
    assert_eq!(lease.subject, ALICE);
    assert_eq!(lease.parent_lease_id, root_lease.id);
    let d = resp.delegation.expect("chain");
    assert_eq!(d.subject, ALICE);
    assert_eq!(d.subject_type, "person");
    assert_eq!(d.actors, vec![DEPLOY_AGENT.to_owned()]);

    // The ledger records every link: subject, actors, token hash, parent lease.
    let issue = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "issue" && b["lease_id"] == lease.id.as_str())
        .expect("issue entry");
    assert_eq!(issue["caller"], DEPLOY_AGENT);
    let rec = &issue["request"]["delegation"];
    assert_eq!(issue["request"]["rpc"], "ExchangeToken");
    assert_eq!(rec["subject"]["id"], ALICE);
    assert_eq!(rec["subject"]["type"], "person");
    assert_eq!(rec["actors"][0]["id"], DEPLOY_AGENT);
    assert_eq!(rec["actors"][0]["type"], "workload");
    assert_eq!(rec["parent_lease"], root_lease.id.as_str());
    assert_eq!(
        rec["subject_token_sha256"],
        root_lease.credential_sha256.as_str()
    );
    assert!(
        !issue.to_string().contains(&root_token),
        "the subject token itself is never recorded"
    );
}

#[tokio::test]
async fn chains_nest_act_current_actor_outermost_and_are_bounded() {
    let h = harness().await;
    let root = token_of(
        &delegation_token(&h, &["job:submit", "job:read"], 3600, "")
            .await
            .credential,
    );
    let one = exchange(&h, DEPLOY_AGENT, pass_on(&root))
        .await
        .expect("first agent");
    let two = exchange(&h, PROVISIONER, pass_on(&token_of(&one.credential)))
        .await
        .expect("second agent");
    let three = exchange(
        &h,
        PLANNER,
        gpu_exchange(&token_of(&two.credential), &["job:submit"], Some(300)),
    )
    .await
    .expect("third agent");
    let claims = verify_jwt(&token_of(&three.credential), &h.jwks().await);
    assert_eq!(claims["sub"], ALICE);
    assert_eq!(
        act_chain(&claims),
        vec![
            PLANNER.to_owned(),
            PROVISIONER.to_owned(),
            DEPLOY_AGENT.to_owned()
        ]
    );
    assert_eq!(three.delegation.expect("chain").actors.len(), 3);

    // A fourth actor exceeds the default bound of three.
    let planner_pass = exchange(&h, PLANNER, pass_on(&token_of(&two.credential)))
        .await
        .expect("planner passes on (three actors)");
    let err = exchange(
        &h,
        CRAWLER,
        gpu_exchange(&token_of(&planner_pass.credential), &["job:submit"], None),
    )
    .await
    .expect_err("four actors");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("too long"), "{}", err.message());

    // An actor appears once: the first agent may not act again further down.
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        gpu_exchange(&token_of(&two.credential), &["job:submit"], None),
    )
    .await
    .expect_err("cycle");
    assert!(err.message().contains("cycle"), "{}", err.message());
    // Nor may the subject exchange its own token as if it were someone else.
    let err = exchange(&h, ALICE, gpu_exchange(&root, &["job:submit"], None))
        .await
        .expect_err("self");
    assert!(err.message().contains("cycle"), "{}", err.message());
}

#[tokio::test]
async fn every_widening_attempt_is_refused_and_recorded() {
    let h = harness().await;
    let root = delegation_token(&h, &["job:submit"], 600, "").await;
    let token = token_of(&root.credential);
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;

    let cases: Vec<(&str, pb::ExchangeTokenRequest, Code, &str)> = vec![
        (
            "a scope the subject never had",
            gpu_exchange(&token, &["job:submit", "job:cancel"], None),
            Code::InvalidArgument,
            "job:cancel beyond the subject token",
        ),
        (
            "a TTL beyond the subject token",
            gpu_exchange(&token, &["job:submit"], Some(3000)),
            Code::InvalidArgument,
            "outlives the subject token",
        ),
        (
            "a profile that is not delegable",
            pb::ExchangeTokenRequest {
                profile: "dataset-read".into(),
                scopes: vec![],
                intent: None,
                ..gpu_exchange(&token, &[], None)
            },
            Code::PermissionDenied,
            "not delegable",
        ),
        (
            "a token type that is not what it is",
            pb::ExchangeTokenRequest {
                subject_token_type: JWT_TOKEN_TYPE.into(),
                ..gpu_exchange(&token, &["job:submit"], None)
            },
            Code::PermissionDenied,
            "subject token refused",
        ),
        (
            "an unknown token type",
            pb::ExchangeTokenRequest {
                subject_token_type: "urn:example:saml".into(),
                ..gpu_exchange(&token, &["job:submit"], None)
            },
            Code::InvalidArgument,
            "is not accepted",
        ),
        (
            "garbage",
            gpu_exchange("not.a.token", &["job:submit"], None),
            Code::PermissionDenied,
            "malformed",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = agent.exchange_token(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(err.message().contains(needle), "{what}: {}", err.message());
        let deny = last_deny(&h);
        assert_eq!(deny["caller"], DEPLOY_AGENT, "{what} recorded");
        assert!(
            deny["reason"].as_str().expect("reason").contains(needle),
            "{what}: {deny}"
        );
    }

    // A token for another audience (a GPU scheduler token) is not a subject token.
    let gpu = token_of(
        &h.broker_as(PROVISIONER)
            .await
            .issue_credential(gpu_request(600))
            .await
            .expect("gpu token")
            .into_inner()
            .credential,
    );
    let err = exchange(&h, DEPLOY_AGENT, gpu_exchange(&gpu, &["job:submit"], None))
        .await
        .expect_err("other audience");
    assert!(err.message().contains("audience"), "{}", err.message());

    // Revoked, then expired: refused.
    let lease = root.lease.expect("lease").id;
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(lease.clone())),
            reason: "alice left".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
    let err = agent
        .exchange_token(gpu_exchange(&token, &["job:submit"], None))
        .await
        .expect_err("revoked subject");
    assert!(err.message().contains("revoked"), "{}", err.message());
    let fresh = token_of(
        &delegation_token(&h, &["job:submit"], 120, "")
            .await
            .credential,
    );
    h.clock.advance(Duration::from_secs(180));
    let err = agent
        .exchange_token(gpu_exchange(&fresh, &["job:submit"], None))
        .await
        .expect_err("expired subject");
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(
        h.audit_bodies()
            .iter()
            .filter(|b| b["kind"] == "issue" && b["request"]["rpc"] == "ExchangeToken")
            .count(),
        0,
        "nothing was issued"
    );
}

#[tokio::test]
async fn may_act_names_the_only_identity_that_may_exchange() {
    let h = harness().await;
    let token = token_of(
        &delegation_token(&h, &["job:submit"], 600, PROVISIONER)
            .await
            .credential,
    );
    let claims = verify_jwt(&token, &h.jwks().await);
    assert_eq!(claims["may_act"]["sub"], PROVISIONER);
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        gpu_exchange(&token, &["job:submit"], None),
    )
    .await
    .expect_err("not the named actor");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may_act"), "{}", err.message());
    exchange(&h, PROVISIONER, gpu_exchange(&token, &["job:submit"], None))
        .await
        .expect("the named actor may");
}

#[tokio::test]
async fn a_jwt_svid_subject_is_bounded_by_its_own_entitlement_and_its_act_is_ignored() {
    let h = harness().await;
    let now = {
        use spiffe_broker::clock::Clock as _;
        h.clock.unix_seconds()
    };
    let sign = |sub: &str, aud: &str, extra: serde_json::Value| {
        let mut claims =
            serde_json::json!({"sub": sub, "aud": [aud], "iat": now, "exp": now + 600});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        h.env.ca.sign_jwt_svid(&claims).expect("signed")
    };
    let jwt = |token: String| pb::ExchangeTokenRequest {
        subject_token_type: JWT_TOKEN_TYPE.into(),
        ..gpu_exchange(&token, &["job:submit"], None)
    };
    // The provisioner's JWT-SVID with a forged `act` naming root: only the broker
    // asserts `act`, so the chain is the caller alone.
    let forged = sign(
        PROVISIONER,
        spiffe_broker::dev::BROKER_ID,
        serde_json::json!({"act": {"sub": ROOT, "act": {"sub": BOB}}}),
    );
    let resp = exchange(&h, DEPLOY_AGENT, jwt(forged))
        .await
        .expect("exchanged");
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["sub"], PROVISIONER);
    assert_eq!(act_chain(&claims), vec![DEPLOY_AGENT.to_owned()]);
    assert_eq!(resp.delegation.expect("chain").subject_type, "workload");

    // For another audience: refused.
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        jwt(sign(
            PROVISIONER,
            "spiffe://example.org/other",
            serde_json::json!({}),
        )),
    )
    .await
    .expect_err("audience");
    assert!(err.message().contains("audience"), "{}", err.message());
    // A subject that may not have the credential itself lends nothing.
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        jwt(sign(
            MODEL_RUNTIME,
            spiffe_broker::dev::BROKER_ID,
            serde_json::json!({}),
        )),
    )
    .await
    .expect_err("subject not entitled");
    assert!(
        err.message().contains("may not be issued this itself"),
        "{}",
        err.message()
    );
    // may_act in a JWT-SVID is enforced too.
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        jwt(sign(
            PROVISIONER,
            spiffe_broker::dev::BROKER_ID,
            serde_json::json!({"may_act": {"sub": PLANNER}}),
        )),
    )
    .await
    .expect_err("may_act");
    assert!(err.message().contains("may_act"), "{}", err.message());
}

#[tokio::test]
async fn nobody_in_the_verified_chain_may_approve_and_the_approval_binds_the_chain() {
    let h = harness().await;
    let token = token_of(
        &delegation_token(&h, &["push", "pull"], 3600, "")
            .await
            .credential,
    );
    let push = pb::ExchangeTokenRequest {
        subject_token: token.clone(),
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        profile: "model-registry-push".into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: "models/llama".into(),
            artifact_digest:
                "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4".into(),
            ticket: "CHG-1234".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let pending = agent
        .exchange_token(push.clone())
        .await
        .expect("opens a request")
        .into_inner();
    assert!(pending.credential.is_none());
    let ar = pending.access_request.expect("access request");
    let chain = ar.delegation.clone().expect("the request shows its chain");
    assert_eq!(chain.subject, ALICE);
    assert_eq!(chain.actors, vec![DEPLOY_AGENT.to_owned()]);

    let approvals = |id: &'static str| {
        let h = &h;
        async move { pb::approvals_client::ApprovalsClient::new(h.channel_as(&minted(h, id).0).await) }
    };
    let review = |approve: bool| pb::ReviewAccessRequestRequest {
        id: ar.id.clone(),
        approve,
        reason: "checked CHG-1234".into(),
    };
    let err = approvals(ALICE)
        .await
        .review_access_request(review(true))
        .await
        .expect_err("alice is the subject");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("separation-of-duties/delegation-chain"),
        "{}",
        err.message()
    );
    approvals(BOB)
        .await
        .review_access_request(review(true))
        .await
        .expect("bob approves");

    // Redeemed with a different subject token: the approval does not cover it.
    let other = token_of(
        &delegation_token(&h, &["push", "pull"], 3600, "")
            .await
            .credential,
    );
    let err = agent
        .exchange_token(pb::ExchangeTokenRequest {
            subject_token: other,
            access_request_id: ar.id.clone(),
            ..push.clone()
        })
        .await
        .expect_err("another subject token");
    assert_eq!(err.code(), Code::PermissionDenied);
    let issued = agent
        .exchange_token(pb::ExchangeTokenRequest {
            access_request_id: ar.id.clone(),
            ..push
        })
        .await
        .expect("redeemed with the same chain")
        .into_inner();
    assert!(issued.credential.is_some());
    let entry = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "issue" && b["access_request_id"] == ar.id.as_str())
        .expect("issue entry");
    assert_eq!(entry["approvals"][0]["reviewer"], BOB);
    assert_eq!(entry["request"]["delegation"]["subject"]["id"], ALICE);
}

#[tokio::test]
async fn revoking_a_subject_revokes_every_credential_derived_from_it() {
    let h = harness().await;
    let root = delegation_token(&h, &["job:submit", "job:read"], 3600, "").await;
    let root_lease = root.lease.expect("lease").id;
    let one = exchange(&h, DEPLOY_AGENT, pass_on(&token_of(&root.credential)))
        .await
        .expect("one");
    let mut derived = vec![one.lease.clone().expect("lease").id];
    for agent in [PROVISIONER, PLANNER] {
        let r = broker_of(&h, agent)
            .await
            .exchange_token(gpu_exchange(
                &token_of(&one.credential),
                &["job:submit"],
                None,
            ))
            .await
            .expect("leaf")
            .into_inner();
        derived.push(r.lease.expect("lease").id);
    }
    let mut admin = h.admin_as(ROOT).await;
    let tree = admin
        .list_leases(pb::ListLeasesRequest {
            derived_from: root_lease.clone(),
            ..Default::default()
        })
        .await
        .expect("tree")
        .into_inner()
        .leases;
    assert_eq!(tree.len(), 4, "root, one agent, two leaves");
    assert!(tree
        .iter()
        .any(|l| l.id == root_lease && l.parent_lease_id.is_empty()));
    assert_eq!(
        tree.iter()
            .filter(|l| l.parent_lease_id == root_lease)
            .count(),
        1,
        "one child of the root"
    );

    // A dry run previews the whole tree.
    let preview = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(root_lease.clone())),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(preview.revoked_lease_ids.len(), 4);

    let since = feed_seq(&h).await;
    let done = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(root_lease.clone())),
            reason: "alice's session ended".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    let mut all = derived.clone();
    all.push(root_lease.clone());
    all.sort();
    let mut got = done.revoked_lease_ids.clone();
    got.sort();
    assert_eq!(got, all, "one operation revokes the tree");
    let (_, body) = h
        .http_get(&format!("/revocations?since={since}&limit=100"))
        .await;
    let page: serde_json::Value = serde_json::from_str(&body).expect("feed JSON");
    let mut fed: Vec<String> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["lease_id"].as_str().expect("lease id").to_owned())
        .collect();
    fed.sort();
    assert_eq!(fed, all, "the feed carries each");

    // Revoking the identity of the subject reaches what agents hold for it.
    let again = delegation_token(&h, &["job:submit"], 3600, "").await;
    let held = exchange(
        &h,
        DEPLOY_AGENT,
        gpu_exchange(&token_of(&again.credential), &["job:submit"], None),
    )
    .await
    .expect("exchanged")
    .lease
    .expect("lease")
    .id;
    let done = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::SpiffeId(ALICE.into())),
            reason: "alice offboarded".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    assert!(
        done.revoked_lease_ids.contains(&held),
        "{:?}",
        done.revoked_lease_ids
    );
    // And nothing more is issued for her through an agent.
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        gpu_exchange(&token_of(&again.credential), &["job:submit"], None),
    )
    .await
    .expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn feed_seq(h: &Harness) -> u64 {
    let (_, body) = h.http_get("/revocations?since=0&limit=10000").await;
    let page: serde_json::Value = serde_json::from_str(&body).expect("feed JSON");
    page["events"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_delegated_credential_is_not_renewed() {
    let h = harness().await;
    let root = token_of(
        &delegation_token(&h, &["job:submit"], 3600, "")
            .await
            .credential,
    );
    let mut agent = broker_of(&h, DEPLOY_AGENT).await;
    let lease = agent
        .exchange_token(gpu_exchange(&root, &["job:submit"], None))
        .await
        .expect("exchanged")
        .into_inner()
        .lease
        .expect("lease");
    let err = agent
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id,
            ttl: None,
        })
        .await
        .expect_err("not renewable");
    assert!(
        err.message().contains("exchange the subject token again"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_relying_party_reads_the_chain_applies_its_rule_and_learns_of_the_cascade() {
    use spiffe_broker::relying_party::{DelegationRule, RelyingParty, RpConfig, RpError};
    let h = harness().await;
    let root = delegation_token(&h, &["job:submit", "job:read"], 3600, "").await;
    let one = exchange(&h, DEPLOY_AGENT, pass_on(&token_of(&root.credential)))
        .await
        .expect("one");
    let (identity, cert) = minted(&h, PROVISIONER);
    let two = Broker::new(h.channel_as(&identity).await)
        .exchange_token(gpu_exchange(
            &token_of(&one.credential),
            &["job:submit"],
            None,
        ))
        .await
        .expect("two")
        .into_inner();
    let token = token_of(&two.credential);
    let feed_key =
        std::fs::read_to_string(h.env.state_dir.join("keys/revocations.vkey")).expect("feed key");
    let rp = |rule: DelegationRule| {
        let mut cfg = RpConfig::new(
            &format!("http://{}", h.env.http_addr),
            "gpu-scheduler",
            &feed_key,
        )
        .expect("config");
        cfg.clock = h.clock.clone();
        cfg.delegation = rule;
        RelyingParty::new(cfg)
    };
    let any = rp(DelegationRule::default());
    any.refresh_keys().await.expect("keys");
    any.sync_revocations().await.expect("feed");
    let claims = any.verify(&token, Some(&cert)).expect("verified");
    assert_eq!(claims.sub, ALICE);
    assert_eq!(claims.actors(), vec![PROVISIONER, DEPLOY_AGENT]);

    let strict = rp(DelegationRule {
        max_actors: Some(1),
        actors: None,
    });
    strict.refresh_keys().await.expect("keys");
    strict.sync_revocations().await.expect("feed");
    assert!(matches!(
        strict.verify(&token, Some(&cert)),
        Err(RpError::Delegation(_))
    ));
    let only_planner = rp(DelegationRule {
        max_actors: None,
        actors: Some(vec![PLANNER.into()]),
    });
    only_planner.refresh_keys().await.expect("keys");
    only_planner.sync_revocations().await.expect("feed");
    assert!(matches!(
        only_planner.verify(&token, Some(&cert)),
        Err(RpError::Delegation(_))
    ));

    // Alice's root token is revoked: the derived token is refused from the next sync.
    h.admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(
                root.lease.expect("lease").id,
            )),
            reason: "alice logged out".into(),
            ..Default::default()
        })
        .await
        .expect("revoked");
    any.sync_revocations().await.expect("feed");
    assert_eq!(any.verify(&token, Some(&cert)), Err(RpError::Revoked));
}

#[tokio::test]
async fn may_act_is_refused_on_a_profile_that_issues_no_token() {
    let h = harness().await;
    let err = broker_of(&h, MODEL_RUNTIME)
        .await
        .issue_credential(pb::IssueCredentialRequest {
            profile: "feature-db".into(),
            may_act: DEPLOY_AGENT.into(),
            ..Default::default()
        })
        .await
        .expect_err("a Vault secret cannot carry may_act");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("may_act"), "{}", err.message());
    let err = broker_of(&h, ALICE)
        .await
        .issue_credential(pb::IssueCredentialRequest {
            profile: "agent-delegation".into(),
            may_act: "not a spiffe id".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad may_act");
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A person signed in at a real OpenID Provider (panva's `oidc-provider`, through its own
/// login and consent pages); an agent exchanges the person's ID token. The provider's keys
/// come from its discovery document; its groups reach Cedar; a token for another client,
/// a tampered one and one from an unconfigured provider are refused and recorded.
#[tokio::test]
async fn an_agent_acts_for_a_person_signed_in_at_an_openid_provider() {
    use common::openid::OpenIdProvider;
    let op = OpenIdProvider::start();
    let extra = op.config();
    let h = start_with(Some(Box::new(move |c: String| c + &extra))).await;
    let id_token = |user: &str| op.login(user);
    let by_id_token = |token: String| pb::ExchangeTokenRequest {
        subject_token_type: spiffe_broker::domain::delegation::ID_TOKEN_TYPE.into(),
        ..gpu_exchange(&token, &["job:submit"], Some(300))
    };

    let alice = id_token("alice");
    let resp = exchange(&h, DEPLOY_AGENT, by_id_token(alice.clone()))
        .await
        .expect("the agent acts for alice");
    let person = format!("oidc:{}#alice", op.issuer);
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["sub"], person.as_str());
    assert_eq!(act_chain(&claims), vec![DEPLOY_AGENT.to_owned()]);
    let d = resp.delegation.expect("chain");
    assert_eq!(
        (d.subject.as_str(), d.subject_type.as_str()),
        (person.as_str(), "person")
    );
    let entry = h
        .audit_bodies()
        .into_iter()
        .rev()
        .find(|b| b["kind"] == "issue")
        .expect("issue entry");
    let rec = &entry["request"]["delegation"];
    assert_eq!(rec["subject"]["email"], "alice@example.org");
    assert_eq!(
        rec["subject_token_type"],
        spiffe_broker::domain::delegation::ID_TOKEN_TYPE
    );
    assert_eq!(rec["subject_groups"][0], "ml-engineers");

    // Bob's provider says he is a contractor: the demo policy forbids, naming itself.
    let err = exchange(&h, DEPLOY_AGENT, by_id_token(id_token("bob")))
        .await
        .expect_err("not an ML engineer");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("people/oidc-needs-ml-engineers"),
        "{}",
        err.message()
    );

    // Tampered (the sub swapped for root), another provider, another type: refused.
    let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
    let payload = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &parts[1])
            .expect("payload"),
    )
    .expect("utf-8")
    .replace("\"sub\":\"alice\"", "\"sub\":\"root\"");
    parts[1] = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload);
    let err = exchange(&h, DEPLOY_AGENT, by_id_token(parts.join(".")))
        .await
        .expect_err("tampered");
    assert!(err.message().contains("signature"), "{}", err.message());
    let other = OpenIdProvider::start();
    let err = exchange(&h, DEPLOY_AGENT, by_id_token(other.login("alice")))
        .await
        .expect_err("unconfigured provider");
    assert!(err.message().contains("is configured"), "{}", err.message());
    let err = exchange(
        &h,
        DEPLOY_AGENT,
        pb::ExchangeTokenRequest {
            subject_token_type: JWT_TOKEN_TYPE.into(),
            ..by_id_token(id_token("alice"))
        },
    )
    .await
    .expect_err("an ID token is not a JWT-SVID");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(last_deny(&h)["reason"]
        .as_str()
        .expect("reason")
        .contains("subject token refused"));

    // Revoking the person's identity revokes what agents hold for her.
    let held = resp.lease.expect("lease").id;
    let done = h
        .admin_as(ROOT)
        .await
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::SpiffeId(person.clone())),
            reason: "alice's account disabled at the provider".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(done.revoked_lease_ids, vec![held]);
}
