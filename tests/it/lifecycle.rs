//! End to end over real sockets: a real client over SPIFFE mTLS against a running
//! broker; tokens verified against the JWKS found through OIDC discovery.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::sqlite::{SqliteStore, VerifyError};
use tonic::Code;

fn kinds(h: &Harness) -> Vec<String> {
    h.audit_bodies()
        .iter()
        .map(|b| {
            format!(
                "{}:{}",
                b["kind"].as_str().unwrap_or(""),
                b["decision"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test]
async fn issue_verify_renew_release() {
    let h = start().await;
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let resp = c
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner();
    let lease = resp.lease.clone().expect("lease");
    let token = token_of(&resp.credential);
    let jwks = h.jwks().await;
    let claims = verify_jwt(&token, &jwks);
    assert_eq!(claims["iss"], format!("http://{}", h.env.http_addr));
    assert_eq!(claims["sub"], DEPLOY_AGENT);
    assert_eq!(claims["aud"], "gpu-scheduler");
    assert_eq!(claims["scope"], "job:submit");
    assert_eq!(claims["jti"], lease.id);
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        600
    );
    assert_eq!(claims["intent"]["action"], "submit-training");
    assert_eq!(claims["intent"]["target"], "queue/a100");
    assert!(
        claims["cnf"]["x5t#S256"]
            .as_str()
            .is_some_and(|s| s.len() == 43),
        "{claims}"
    );
    assert_eq!(lease.state, pb::LeaseState::Active as i32);
    let receipt = resp.receipt.expect("receipt");
    assert!(receipt.sequence >= 1);
    // The ledger records the fingerprint, never the token.
    let raw = std::fs::read(h.ledger_path()).expect("ledger");
    assert!(!String::from_utf8_lossy(&raw).contains(&token));
    let issue_entry = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "issue")
        .expect("issue entry");
    assert_eq!(issue_entry["credential_sha256"], lease.credential_sha256);
    assert_eq!(issue_entry["caller"], DEPLOY_AGENT);
    assert_eq!(issue_entry["auth_method"], "x509-svid");
    assert_eq!(
        issue_entry["rule"], "gpu-provisioning/submit",
        "the determining Cedar policy"
    );
    assert_eq!(issue_entry["policy_hash"].as_str().map(str::len), Some(64));

    // Renew: later expiry, fresh token, same lease id.
    h.clock.advance(Duration::from_secs(120));
    let renewed = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: Some(prost_types::Duration {
                seconds: 900,
                nanos: 0,
            }),
        })
        .await
        .expect("renewed")
        .into_inner();
    let new_token = token_of(&renewed.credential);
    assert_ne!(new_token, token);
    let new_claims = verify_jwt(&new_token, &jwks);
    assert_eq!(new_claims["jti"], lease.id);
    assert!(new_claims["exp"].as_i64() > claims["exp"].as_i64());
    let renewed_lease = renewed.lease.expect("lease");
    assert_eq!(renewed_lease.renewals, 1);

    // Renewal never passes max_expires_at (issued_at + max_ttl of 1h).
    h.clock.advance(Duration::from_secs(10 * 60));
    let capped = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .expect("renewed")
        .into_inner()
        .lease
        .expect("lease");
    assert_eq!(capped.expires_at, lease.max_expires_at);

    // Someone else cannot renew or release it.
    let mut other = h.broker_as(PROVISIONER).await;
    let err = other
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .expect_err("not the holder");
    assert_eq!(err.code(), Code::NotFound);

    // Release, then it cannot be renewed.
    let released = c
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .expect("released")
        .into_inner();
    assert_eq!(
        released.lease.expect("lease").state,
        pb::LeaseState::Released as i32
    );
    let err = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("released lease cannot renew");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let report = SqliteStore::verify_file(&h.ledger_path()).expect("ledger verifies");
    assert!(report.entries >= 5);
    let k = kinds(&h);
    assert!(k.contains(&"issue:allow".to_string()));
    assert!(k.contains(&"renew:allow".to_string()));
    assert!(k.contains(&"release:allow".to_string()));
}

#[tokio::test]
async fn revoke_by_lease_and_by_spiffe_id() {
    let h = start().await;
    let mut prov = h.broker_as(PROVISIONER).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let a = prov
        .issue_credential(gpu_request(600))
        .await
        .expect("a")
        .into_inner()
        .lease
        .expect("lease");
    let b = prov
        .issue_credential(gpu_request(600))
        .await
        .expect("b")
        .into_inner()
        .lease
        .expect("lease");
    let c = agent
        .issue_credential(gpu_request(600))
        .await
        .expect("c")
        .into_inner()
        .lease
        .expect("lease");

    // Only platform admins revoke.
    let mut alice = h.admin_as(ALICE).await;
    let err = alice
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(a.id.clone())),
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("alice is not an admin");
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut root = h.admin_as(ROOT).await;
    let r = root
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(a.id.clone())),
            reason: "compromised runner".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(r.revoked_lease_ids, vec![a.id.clone()]);
    let err = prov
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: a.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("revoked lease never comes back");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let r = root
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::SpiffeId(PROVISIONER.into())),
            reason: "decommissioned".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(
        r.revoked_lease_ids,
        vec![b.id.clone()],
        "a was already revoked"
    );

    let leases = root
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .expect("listed")
        .into_inner()
        .leases;
    let state_of = |id: &str| {
        leases
            .iter()
            .find(|l| l.id == id)
            .map(|l| l.state)
            .expect("listed")
    };
    assert_eq!(state_of(&a.id), pb::LeaseState::Revoked as i32);
    assert_eq!(state_of(&b.id), pb::LeaseState::Revoked as i32);
    assert_eq!(state_of(&c.id), pb::LeaseState::Active as i32);

    // Revoking an unknown lease is NOT_FOUND; a missing reason is refused.
    let err = root
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId("0".repeat(32))),
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = root
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(c.id.clone())),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("reason required");
    assert_eq!(err.code(), Code::InvalidArgument);

    let revokes: Vec<_> = h
        .audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == "revoke")
        .collect();
    assert_eq!(revokes.len(), 3);
    assert_eq!(revokes[0]["caller"], ROOT);
    assert_eq!(revokes[1]["affected_leases"], serde_json::json!([b.id]));
    SqliteStore::verify_file(&h.ledger_path()).expect("ledger verifies");
}

#[tokio::test]
async fn expired_leases_cannot_renew_and_are_reaped() {
    let h = start().await;
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let lease = c
        .issue_credential(gpu_request(60))
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease");
    h.clock.advance(Duration::from_secs(61));
    let err = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());

    assert_eq!(h.env.broker.reap_expired().await.expect("reaped"), 1);
    assert_eq!(h.env.broker.reap_expired().await.expect("reaped"), 0);
    let mut root = h.admin_as(ROOT).await;
    let leases = root
        .list_leases(pb::ListLeasesRequest {
            state: pb::LeaseState::Expired as i32,
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].id, lease.id);
    let expire = h
        .audit_bodies()
        .into_iter()
        .find(|b| b["kind"] == "expire")
        .expect("expire entry");
    assert_eq!(expire["affected_leases"], serde_json::json!([lease.id]));
}

#[tokio::test]
async fn over_asks_and_strangers_are_refused_with_the_reason() {
    let h = start().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let cases: Vec<(pb::IssueCredentialRequest, Code, &str)> = vec![
        (
            pb::IssueCredentialRequest {
                scopes: vec!["job:submit".into(), "cluster:admin".into()],
                ..gpu_request(600)
            },
            Code::PermissionDenied,
            "cluster:admin",
        ),
        (gpu_request(2 * 3600), Code::InvalidArgument, "max_ttl"),
        (
            pb::IssueCredentialRequest {
                profile: "no-such-profile".into(),
                ..gpu_request(600)
            },
            Code::InvalidArgument,
            "unknown profile",
        ),
        (
            pb::IssueCredentialRequest {
                intent: None,
                ..gpu_request(600)
            },
            Code::InvalidArgument,
            "intent",
        ),
        (
            pb::IssueCredentialRequest {
                profile: "dataset-read".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
            "may not request",
        ),
        (
            pb::IssueCredentialRequest {
                scopes: vec!["bad scope".into()],
                ..gpu_request(600)
            },
            Code::InvalidArgument,
            "invalid scope",
        ),
        (gpu_request(0), Code::InvalidArgument, "ttl"),
    ];
    let n = cases.len();
    for (req, code, needle) in cases {
        let err = agent.issue_credential(req).await.expect_err("refused");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(needle),
            "{:?} should mention {needle}",
            err.message()
        );
    }
    assert_eq!(h.lease_count(), 0, "nothing issued");
    let denies = h
        .audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == "deny")
        .count();
    assert_eq!(denies, n, "every refusal is recorded");
}

#[tokio::test]
async fn ledger_that_cannot_commit_fails_closed_within_a_bound() {
    let h = start().await;
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    c.issue_credential(gpu_request(600))
        .await
        .expect("works before the fault");
    let before = h.lease_count();

    // Another process holds the write lock: the writer's BEGIN IMMEDIATE times out.
    let locker = rusqlite::Connection::open(h.ledger_path()).expect("open");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let started = Instant::now();
    let err = c
        .issue_credential(gpu_request(600))
        .await
        .expect_err("fails closed");
    let waited = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(waited < Duration::from_secs(10), "bounded: took {waited:?}");
    locker.execute_batch("ROLLBACK").expect("unlock");
    drop(locker);

    assert_eq!(h.lease_count(), before, "no lease from the failed attempt");
    c.issue_credential(gpu_request(600))
        .await
        .expect("recovers by itself");
    SqliteStore::verify_file(&h.ledger_path()).expect("chain intact after the fault");
}

fn tamper(path: &std::path::Path, vkey: &VerifierKey, sql: &str) -> VerifyError {
    let conn = rusqlite::Connection::open(path).expect("open copy");
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS audit_log_no_update; DROP TRIGGER IF EXISTS audit_log_no_delete;",
    )
    .expect("drop triggers");
    conn.execute_batch(sql).expect("tamper");
    drop(conn);
    SqliteStore::verify_file_with(path, vkey).expect_err("tampering detected")
}

#[tokio::test]
async fn ledger_tampering_is_detected_and_named() {
    let h = start().await;
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    for _ in 0..4 {
        c.issue_credential(gpu_request(600)).await.expect("issued");
    }
    let cp = h
        .env
        .broker
        .checkpoint()
        .await
        .expect("checkpoint")
        .expect("signed");
    assert_eq!(cp.size, 4);
    let report = SqliteStore::verify_file(&h.ledger_path()).expect("verifies");
    assert_eq!(report.entries, 4);
    assert_eq!(report.report.checkpoints, 1);
    // The broker refuses to rewrite history itself.
    let conn = rusqlite::Connection::open(h.ledger_path()).expect("open");
    assert!(conn
        .execute("DELETE FROM audit_log WHERE seq = 1", [])
        .is_err());
    drop(conn);

    let vkey_text = std::fs::read_to_string(h.env.state_dir.join("keys/log.vkey")).expect("vkey");
    let vkey = VerifierKey::parse(&vkey_text).expect("parse vkey");
    let copy = |name: &str| {
        let p = h.dir.path().join(name);
        let conn = rusqlite::Connection::open(h.ledger_path()).expect("open");
        conn.execute("VACUUM INTO ?1", [p.display().to_string()])
            .expect("snapshot");
        p
    };
    let bad = |e: VerifyError| match e {
        VerifyError::Log(l) => l.first_bad_entry().expect("names the entry"),
        other => panic!("{other}"),
    };
    let e = tamper(
        &copy("changed.db"),
        &vkey,
        "UPDATE audit_log SET body = replace(body, 'job:submit', 'job:cancel') WHERE seq = 2",
    );
    assert_eq!(bad(e), 2);
    assert_eq!(
        bad(tamper(
            &copy("deleted.db"),
            &vkey,
            "DELETE FROM audit_log WHERE seq = 3"
        )),
        3
    );
    let e = tamper(
        &copy("reordered.db"),
        &vkey,
        "UPDATE audit_log SET seq = -1 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = -1;",
    );
    assert_eq!(bad(e), 2);
    // A truncated tail keeps the chain intact; the signed checkpoint catches it.
    let e = tamper(
        &copy("truncated.db"),
        &vkey,
        "DELETE FROM audit_log WHERE seq = 4",
    );
    assert!(e.to_string().contains("entries 4..=4 are missing"), "{e}");
    // A replaced checkpoint signature is refused.
    let e = tamper(
        &copy("forged.db"),
        &vkey,
        "UPDATE checkpoints SET note = replace(note, substr(note, -20, 10), 'AAAAAAAAAA')",
    );
    assert!(e.to_string().contains("checkpoint at tree size 4"), "{e}");
}

#[tokio::test]
async fn broker_svid_rotation_keeps_clients_working() {
    let h = start().await;
    let identity = h.identity(DEPLOY_AGENT).await;
    let ch = h.channel_as(&identity).await;
    let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch);
    c.issue_credential(gpu_request(600))
        .await
        .expect("before rotation");

    let served = || async {
        let cfg = spiffe_broker::client::tls_config(
            &identity,
            &spiffe::SpiffeId::new(spiffe_broker::dev::BROKER_ID).expect("id"),
        )
        .expect("tls config");
        let tcp = tokio::net::TcpStream::connect(h.env.grpc_addr)
            .await
            .expect("tcp");
        let name = rustls::pki_types::ServerName::try_from("spiffe-broker.invalid").expect("name");
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("handshake verifies the broker SVID");
        tls.get_ref().1.peer_certificates().expect("certs")[0]
            .as_ref()
            .to_vec()
    };
    let first = served().await;
    h.env.workload_api.rotate_now();
    // Wait (bounded) for the broker's X509Source to receive the pushed SVID.
    let mut rotated = None;
    for _ in 0..100 {
        let now = served().await;
        if now != first {
            rotated = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rotated.is_some(),
        "the broker serves its rotated SVID without a restart"
    );
    // The existing connection and new ones both keep working.
    c.issue_credential(gpu_request(600))
        .await
        .expect("old connection after rotation");
    let mut fresh = h.broker_as(DEPLOY_AGENT).await;
    fresh
        .issue_credential(gpu_request(600))
        .await
        .expect("new connection after rotation");
}

/// The SVID source keeps the broker's last SVID when the Workload API is gone; once that
/// SVID has expired the broker says it is not ready (load balancers stop sending), and
/// it is ready again as soon as it holds a current one.
#[tokio::test]
async fn not_ready_once_its_own_svid_has_expired() {
    let h = start().await;
    assert_eq!(h.http_get("/readyz").await.0, 200);
    // Past the dev SVID's lifetime (1 h) on the broker's clock.
    h.clock.advance(Duration::from_secs(3600 + 60));
    let (status, body) = h.http_get("/readyz").await;
    assert_eq!(status, 503, "expired own SVID: {body}");
    assert_eq!(h.http_get("/healthz").await.0, 200, "alive, just not ready");
    // gRPC health follows: NOT_SERVING for the server and each service. (The follower
    // re-reads readiness every 500 ms; this waits for that tick, bounded.)
    let identity = h.identity(DEPLOY_AGENT).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(h.channel_as(&identity).await);
    let status_of = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let mut status = 0;
    for _ in 0..100 {
        status = health
            .check(status_of(""))
            .await
            .expect("health answers")
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let broker_service = health
        .check(status_of("spiffe_broker.v1.CredentialBroker"))
        .await
        .expect("health answers")
        .into_inner()
        .status;
    assert_eq!(
        broker_service,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let h = start().await;
    assert_eq!(h.http_get("/healthz").await.0, 200);
    assert_eq!(h.http_get("/readyz").await.0, 200);
    let identity = h.identity(DEPLOY_AGENT).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(h.channel_as(&identity).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "spiffe_broker.v1.CredentialBroker".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let token = token_of(
        &c.issue_credential(gpu_request(600))
            .await
            .expect("issued")
            .into_inner()
            .credential,
    );
    let (_, m) = h.http_get("/metrics").await;
    assert!(m.contains("spiffe_broker_credentials_issued_total{profile=\"gpu-scheduler-submit\",op=\"issue\"} 1"), "{m}");
    assert!(m.contains("spiffe_broker_ledger_commit_duration_seconds_count"));
    assert!(!m.contains(&token), "metrics never carry a credential");
}

#[tokio::test]
async fn idempotent_retries_return_the_same_credential() {
    let h = start().await;
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    let key = "retry-key-7f3a9c0e5b2d4816a0c9";
    let req = || pb::IssueCredentialRequest {
        idempotency_key: key.into(),
        ..gpu_request(600)
    };
    let first = c
        .issue_credential(req())
        .await
        .expect("issued")
        .into_inner();
    let again = c
        .issue_credential(req())
        .await
        .expect("retried")
        .into_inner();
    assert_eq!(token_of(&first.credential), token_of(&again.credential));
    assert_eq!(
        first.lease.as_ref().map(|l| &l.id),
        again.lease.as_ref().map(|l| &l.id)
    );
    assert_eq!(first.receipt, again.receipt, "the same ledger entry");
    assert_eq!(h.lease_count(), 1, "issued once");
    // The ledger holds the credential only sealed.
    let raw = std::fs::read(h.ledger_path()).expect("ledger");
    assert!(!String::from_utf8_lossy(&raw).contains(&token_of(&first.credential)));

    // Concurrent retries with one key still issue once.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.issue_credential(pb::IssueCredentialRequest {
                idempotency_key: "concurrent-key-1c9e0f4b7a2d".into(),
                ..gpu_request(600)
            })
            .await
            .map(|r| r.into_inner().lease.map(|l| l.id))
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task").expect("issued"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(h.lease_count(), 2);

    // The same key for a different request, a short key, and a revoked lease are refused.
    let err = c
        .issue_credential(pb::IssueCredentialRequest {
            idempotency_key: key.into(),
            ..gpu_request(300)
        })
        .await
        .expect_err("different request");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .issue_credential(pb::IssueCredentialRequest {
            idempotency_key: "short".into(),
            ..gpu_request(600)
        })
        .await
        .expect_err("short key");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut root = h.admin_as(ROOT).await;
    root.revoke(pb::RevokeRequest {
        selector: Some(pb::revoke_request::Selector::LeaseId(
            first.lease.expect("lease").id,
        )),
        reason: "test".into(),
        ..Default::default()
    })
    .await
    .expect("revoked");
    let err = c
        .issue_credential(req())
        .await
        .expect_err("revoked lease is not handed out again");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.lease_count(), 2);
}

#[tokio::test]
async fn a_remembered_svid_is_refused_once_it_expires() {
    let h = start().await;
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &spiffe::SpiffeId::new(DEPLOY_AGENT).expect("id"),
            Duration::from_secs(120),
        )
        .expect("mint");
    let identity = spiffe_broker::client::ClientIdentity::Files {
        chain: svid.chain.clone(),
        key: std::sync::Arc::new(svid.key_pkcs8.to_vec()),
        bundle: vec![h.env.ca.ca_der().clone()],
    };
    let mut c =
        pb::credential_broker_client::CredentialBrokerClient::new(h.channel_as(&identity).await);
    c.issue_credential(gpu_request(60))
        .await
        .expect("valid SVID");
    c.issue_credential(gpu_request(60))
        .await
        .expect("valid SVID, verified chain remembered");
    // Same connection, same certificate: once it has expired it is refused.
    h.clock.advance(Duration::from_secs(200));
    let err = c
        .issue_credential(gpu_request(60))
        .await
        .expect_err("expired SVID");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_quickly_and_the_broker_keeps_serving() {
    let h = start_with(Some(Box::new(|demo: String| {
        demo.replacen(
            "reaper_interval = \"30s\"",
            "reaper_interval = \"30s\"\nmax_in_flight = 2\nmax_connections_per_peer = 3",
            1,
        )
    })))
    .await;
    let identity = h.identity(DEPLOY_AGENT).await;
    let ch = h.channel_as(&identity).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            (
                c.issue_credential(gpu_request(600)).await.map(|_| ()),
                t.elapsed(),
            )
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            (Ok(()), _) => ok += 1,
            (Err(s), took) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                assert!(
                    took < Duration::from_secs(5),
                    "refused without queueing: {took:?}"
                );
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    let m = h.http_get("/metrics").await.1;
    assert!(
        m.contains("spiffe_broker_requests_denied_total{reason=\"overloaded\"}"),
        "{m}"
    );
    // Per-peer connection limit: three are served, a fourth is refused.
    let extra = vec![h.channel_as(&identity).await, h.channel_as(&identity).await];
    let fourth = spiffe_broker::client::connect(
        &h.env.grpc_addr.to_string(),
        spiffe_broker::dev::BROKER_ID,
        &identity,
    )
    .await;
    let refused = match fourth {
        Err(_) => true,
        Ok(ch4) => pb::credential_broker_client::CredentialBrokerClient::new(ch4)
            .issue_credential(gpu_request(600))
            .await
            .is_err(),
    };
    assert!(refused, "a fourth connection from one peer is refused");
    drop(extra);
    // Still serving.
    let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch);
    c.issue_credential(gpu_request(600))
        .await
        .expect("serves after the burst");
}
