//! The Vault backend end to end: model-runtime asks the broker for `feature-db` over
//! SPIFFE mTLS; the broker logs into a Vault double (tests/it/common/vault_double.rs, Vault's
//! documented API) with its own JWT-SVID, hands back the database secret, renews it in
//! Vault, and revokes it in Vault when the broker lease ends (release, revocation,
//! expiry), retrying with back-off while Vault fails. A sealed or slow Vault fails only
//! the Vault profile, within the profile's deadline.
//!
//! Time is the broker's ManualClock; the backend revocation queue is driven one pass at
//! a time with `revoke_in_backends()` (the server's own 1 s poll runs as well, so every
//! assertion holds whichever pass got there first).

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::vault_double::{IssuedSecret, VaultDouble};
use common::*;
use serde_json::Value;
use spiffe_broker::broker::STUCK_AFTER_ATTEMPTS;
use spiffe_broker::clock::Clock as _;
use spiffe_broker::dev::{BROKER_ID, DEFAULT_VAULT_ADDR};
use spiffe_broker::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

type Broker = pb::credential_broker_client::CredentialBrokerClient<Channel>;
type Admin = pb::admin_client::AdminClient<Channel>;

const FEATURE_DB: &str = "feature-db";
/// The feature-db profile's deadline and the start of its Vault section in the demo
/// config (s3-datasets also has `deadline = "5s"`, followed by its STS section).
const FEATURE_DB_DEADLINE: &str = "deadline = \"5s\"\n\n[profiles.vault]";
/// The demo profile's default TTL.
const DEFAULT_TTL: i64 = 15 * 60;
const STUCK_METRIC: &str = "spiffe_broker_backend_revocations_stuck";

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// A Vault double, then the dev environment with `[vault] addr` pointing at it and
/// `edit` applied to the rendered config.
async fn start_vault(edit: fn(String) -> String) -> (Harness, VaultDouble) {
    let vault = VaultDouble::start().await;
    let addr = vault.addr();
    let h = start_with(Some(Box::new(move |demo: String| {
        assert!(
            demo.contains(DEFAULT_VAULT_ADDR),
            "demo config names the dev Vault"
        );
        edit(demo.replace(DEFAULT_VAULT_ADDR, &addr))
    })))
    .await;
    vault.trust(h.env.ca.jwt_bundle());
    (h, vault)
}

fn unchanged(demo: String) -> String {
    demo
}

fn feature_db_deadline_1s(demo: String) -> String {
    assert!(demo.contains(FEATURE_DB_DEADLINE));
    demo.replacen(
        FEATURE_DB_DEADLINE,
        "deadline = \"1s\"\n\n[profiles.vault]",
        1,
    )
}

fn feature_db_one_active_lease(demo: String) -> String {
    assert!(demo.contains(FEATURE_DB_DEADLINE));
    demo.replacen(
        FEATURE_DB_DEADLINE,
        "deadline = \"5s\"\nmax_active_leases = 1\n\n[profiles.vault]",
        1,
    )
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

fn feature_db() -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: FEATURE_DB.into(),
        ..Default::default()
    }
}

fn dataset_read() -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: "dataset-read".into(),
        ..Default::default()
    }
}

async fn issue_db(c: &mut Broker) -> pb::IssueCredentialResponse {
    c.issue_credential(feature_db())
        .await
        .expect("feature-db issued")
        .into_inner()
}

/// Issues feature-db; returns the lease and the secret Vault handed out for it.
async fn issue_db_lease(c: &mut Broker, vault: &VaultDouble) -> (pb::Lease, IssuedSecret) {
    let resp = issue_db(c).await;
    let lease = resp.lease.expect("lease");
    let secret = vault
        .issued()
        .into_iter()
        .find(|s| s.lease_id == lease.backend_handle)
        .expect("the lease's handle is a lease Vault issued");
    (lease, secret)
}

async fn release(c: &mut Broker, lease_id: &str) {
    c.release_lease(pb::ReleaseLeaseRequest {
        lease_id: lease_id.into(),
    })
    .await
    .expect("released");
}

fn secret_data(c: &Option<pb::Credential>) -> HashMap<String, String> {
    match c.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Secret(s)) => s.data.clone(),
        other => panic!("expected a secret credential, got {other:?}"),
    }
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().expect("timestamp").seconds
}

// ---------------------------------------------------------------------------------------
// Queue, ledger and metrics views
// ---------------------------------------------------------------------------------------

/// One pass of the backend revocation queue: (revoked, failed).
async fn pass(h: &Harness) -> (usize, usize) {
    h.env
        .broker
        .revoke_in_backends()
        .await
        .expect("revocation pass")
}

async fn pending(admin: &mut Admin, min_attempts: u32) -> Vec<pb::BackendRevocation> {
    admin
        .list_backend_revocations(pb::ListBackendRevocationsRequest {
            min_attempts,
            page_size: 0,
        })
        .await
        .expect("listed")
        .into_inner()
        .revocations
}

fn audit_of(h: &Harness, kind: &str, lease_id: &str) -> Vec<Value> {
    h.audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == kind && b["lease_id"] == lease_id)
        .collect()
}

/// The value of the stuck-revocations gauge on /metrics.
async fn stuck_gauge(h: &Harness) -> String {
    let (status, text) = h.http_get("/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{STUCK_METRIC} ")))
        .unwrap_or_else(|| panic!("no {STUCK_METRIC} in:\n{text}"))
        .to_owned()
}

/// The ledger's bytes on disk: the database and its write-ahead log.
fn ledger_bytes(h: &Harness) -> Vec<u8> {
    let mut bytes = std::fs::read(h.ledger_path()).expect("ledger file");
    for suffix in ["-wal", "-journal"] {
        let mut p = h.ledger_path().into_os_string();
        p.push(suffix);
        if let Ok(b) = std::fs::read(&p) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// SHA-256 of a key/value credential as the ledger records it (length-prefixed names
/// and values, in name order).
fn kv_sha256(data: &HashMap<String, String>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for k in names {
        for part in [k.as_bytes(), data[k].as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    hex::encode(ctx.finish().as_ref())
}

/// After the broker lease ended: one pass leaves the Vault lease revoked and one
/// `backend_revoke` entry; a second pass has nothing to do.
async fn assert_revoked_in_vault(h: &Harness, vault: &VaultDouble, lease_id: &str, handle: &str) {
    pass(h).await;
    assert!(
        vault.times_revoked(handle) >= 1,
        "Vault lease {handle} revoked after a pass; Vault revoked {:?}",
        vault.revoked()
    );
    let entries = audit_of(h, "backend_revoke", lease_id);
    assert_eq!(entries.len(), 1, "one backend_revoke entry: {entries:?}");
    assert_eq!(entries[0]["decision"], "allow");
    assert!(
        entries[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("vault revoked")),
        "{entries:?}"
    );
    assert_eq!(pass(h).await, (0, 0), "nothing left to revoke");
    assert_eq!(audit_of(h, "backend_revoke", lease_id).len(), 1);
}

/// Waits (at most 10 s of real time) until Vault revoked `lease_id` from a background
/// task of the broker.
async fn wait_revoked(vault: &VaultDouble, lease_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vault.times_revoked(lease_id) == 0 {
        assert!(
            Instant::now() < deadline,
            "Vault lease {lease_id} was never revoked; revoked: {:?}",
            vault.revoked()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs passes (10 minutes apart on the broker's clock) while Vault fails revocations,
/// until the lease's revocation has failed STUCK_AFTER_ATTEMPTS times. Checks that a due
/// entry is tried on each pass, that a failure is recorded with its error and a back-off,
/// and that an entry is not tried again before its back-off has passed.
async fn fail_until_stuck(
    h: &Harness,
    vault: &VaultDouble,
    admin: &mut Admin,
    lease_id: &str,
    calls_before_end: u32,
) -> pb::BackendRevocation {
    let mut attempts = 0;
    let mut calls_before = calls_before_end;
    for round in 0.. {
        assert!(round < 10, "attempts stopped growing at {attempts}");
        pass(h).await;
        let list = pending(admin, 0).await;
        let r = list
            .iter()
            .find(|r| r.lease_id == lease_id)
            .unwrap_or_else(|| panic!("{lease_id} still owed: {list:?}"))
            .clone();
        assert!(
            r.attempts > attempts,
            "round {round}: a due revocation is tried ({} after {attempts})",
            r.attempts
        );
        assert!(vault.revoke_calls() > calls_before, "Vault was called");
        assert!(
            r.last_error.contains("500") && r.last_error.contains("internal error"),
            "{}",
            r.last_error
        );
        let now = h.clock.unix_seconds();
        let wait = secs(&r.next_attempt_at) - now;
        assert!(
            (1..=375).contains(&wait),
            "back-off of 1 s doubling to 5 min ±25 %: {wait} s after {} failures",
            r.attempts
        );
        // Not due yet: a pass now leaves it alone.
        assert_eq!(pass(h).await, (0, 0), "not tried before its back-off");
        calls_before = vault.revoke_calls();
        attempts = r.attempts;
        if attempts >= STUCK_AFTER_ATTEMPTS {
            return r;
        }
        h.clock.advance(Duration::from_secs(600));
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------
// Issuance and renewal
// ---------------------------------------------------------------------------------------

/// feature-db hands model-runtime the database secret Vault created, with Vault's lease
/// id as the backend handle. The broker logged into Vault once, with its own JWT-SVID
/// (no static Vault token), and reuses that token. The secret never reaches the ledger;
/// only its hash does.
#[tokio::test]
async fn issues_vault_secrets_after_logging_in_with_the_broker_jwt_svid() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let now = h.clock.unix_seconds();

    let resp = issue_db(&mut c).await;
    let lease = resp.lease.expect("lease");
    let cred = resp.credential.as_ref().expect("credential");
    let data = secret_data(&resp.credential);
    let issued = vault.issued();
    assert_eq!(issued.len(), 1, "one Vault read");
    let mut names: Vec<&str> = data.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["password", "username"]);
    assert_eq!(data["username"], issued[0].username);
    assert_eq!(data["password"], issued[0].password);
    assert!(issued[0]
        .lease_id
        .starts_with("database/creds/feature-reader/"));
    assert_eq!(cred.backend_handle, issued[0].lease_id);
    assert_eq!(cred.backend, "vault");
    assert_eq!(lease.backend, "vault");
    assert_eq!(lease.backend_handle, issued[0].lease_id);
    assert_eq!(lease.profile, FEATURE_DB);
    assert_eq!(lease.spiffe_id, MODEL_RUNTIME);
    assert_eq!(lease.state, pb::LeaseState::Active as i32);
    assert_eq!(lease.scopes, ["db:read"]);
    // Vault's lease (1 h) outlives the profile's default TTL: the broker's TTL holds.
    assert_eq!(secs(&lease.issued_at), now);
    assert_eq!(secs(&lease.expires_at), now + DEFAULT_TTL);
    assert_eq!(secs(&cred.expires_at), secs(&lease.expires_at));

    // One login, with a JWT-SVID of the broker for audience "vault".
    let logins = vault.logins();
    assert_eq!(logins.len(), 1, "refused: {:?}", vault.refused_logins());
    let claims = vault.last_login_claims().expect("login claims");
    assert_eq!(claims["sub"], BROKER_ID);
    let aud = match &claims["aud"] {
        Value::Array(a) => a.clone(),
        one => vec![one.clone()],
    };
    assert!(aud.iter().any(|a| a == "vault"), "aud {aud:?}");
    assert!(vault.refused_logins().is_empty());
    // No static Vault token is configured: [vault] has an address, a role, an audience.
    let config = std::fs::read_to_string(h.env.state_dir.join("config.toml")).expect("config");
    let section = config
        .split("\n[vault]\n")
        .nth(1)
        .expect("[vault] section")
        .split("\n[")
        .next()
        .expect("section body");
    assert!(!section.contains("token"), "{section}");
    assert!(section.contains(&vault.addr()), "{section}");

    // A second issuance: a new secret, the same Vault token (no second login).
    let again = issue_db(&mut c).await;
    let data2 = secret_data(&again.credential);
    let issued = vault.issued();
    assert_eq!(issued.len(), 2);
    assert_eq!(data2["username"], issued[1].username);
    assert_ne!(data2["username"], data["username"]);
    assert_eq!(
        again.lease.expect("lease").backend_handle,
        issued[1].lease_id
    );
    assert_eq!(vault.logins().len(), 1, "the Vault token is reused");

    // The ledger records the hash of the secret, never the secret.
    let entries = audit_of(&h, "issue", &lease.id);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["caller"], MODEL_RUNTIME);
    assert_eq!(entries[0]["credential_sha256"], lease.credential_sha256);
    assert_eq!(lease.credential_sha256, kv_sha256(&data));
    let bytes = ledger_bytes(&h);
    for s in &issued {
        assert!(
            !contains(&bytes, &s.password),
            "a Vault password in the ledger"
        );
    }
}

/// A Vault lease shorter than the broker's TTL ends the broker lease with it.
#[tokio::test]
async fn a_shorter_vault_lease_shortens_the_broker_lease() {
    let (h, vault) = start_vault(unchanged).await;
    vault.set_lease_duration(300);
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let now = h.clock.unix_seconds();
    let resp = issue_db(&mut c).await;
    let lease = resp.lease.expect("lease");
    assert_eq!(secs(&lease.expires_at), now + 300);
    assert_eq!(
        secs(&resp.credential.expect("credential").expires_at),
        now + 300
    );
}

/// A Vault token that stopped working (403) is replaced by a fresh login with a new
/// JWT-SVID, and the request goes through.
#[tokio::test]
async fn an_expired_vault_token_is_replaced_by_a_fresh_login() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    issue_db_lease(&mut c, &vault).await;
    vault.expire_tokens();
    let (lease, _) = issue_db_lease(&mut c, &vault).await;
    assert_eq!(vault.logins().len(), 2, "logged in again");
    assert_eq!(vault.issued().len(), 2);
    // Renewal and revocation go through the same retry.
    vault.expire_tokens();
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: lease.id.clone(),
        ttl: None,
    })
    .await
    .expect("renewed after a fresh login");
    assert_eq!(vault.logins().len(), 3);
    vault.expire_tokens();
    release(&mut c, &lease.id).await;
    assert_revoked_in_vault(&h, &vault, &lease.id, &lease.backend_handle).await;
    // (The server's own queue poll may race this pass and log in once more.)
    assert!(vault.logins().len() >= 4, "logged in again to revoke");
    for claims in vault.logins() {
        assert_eq!(claims["sub"], BROKER_ID);
    }
}

/// RenewLease extends the Vault lease in place (`sys/leases/renew`): no new secret, a
/// later expiry, never beyond what Vault granted, and a renew entry in the ledger.
#[tokio::test]
async fn renewal_extends_the_vault_lease_in_place() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;

    h.clock.advance(Duration::from_secs(5 * 60));
    let now = h.clock.unix_seconds();
    let renewed = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .expect("renewed")
        .into_inner();
    assert!(
        renewed.credential.is_none(),
        "the holder keeps its secret: {:?}",
        renewed.credential.as_ref().map(|c| &c.backend_handle)
    );
    assert_eq!(
        vault.renewals(),
        [(secret.lease_id.clone(), DEFAULT_TTL)],
        "Vault renewed the lease for the profile's default TTL"
    );
    let after = renewed.lease.expect("lease");
    assert_eq!(after.id, lease.id);
    assert_eq!(after.renewals, 1);
    assert_eq!(after.backend_handle, secret.lease_id);
    assert_eq!(after.credential_sha256, lease.credential_sha256);
    assert!(secs(&after.expires_at) > secs(&lease.expires_at));
    assert_eq!(secs(&after.expires_at), now + DEFAULT_TTL);
    let entries = audit_of(&h, "renew", &lease.id);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["decision"], "allow");
    assert_eq!(entries[0]["expires_at"], now + DEFAULT_TTL);
    assert_eq!(vault.issued().len(), 1, "no new secret was read");

    // Vault grants less than asked: the broker lease follows Vault.
    vault.set_max_lease_duration(120);
    h.clock.advance(Duration::from_secs(60));
    let now = h.clock.unix_seconds();
    let capped = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .expect("renewed")
        .into_inner()
        .lease
        .expect("lease");
    assert_eq!(secs(&capped.expires_at), now + 120);
    assert_eq!(capped.renewals, 2);
    assert_eq!(vault.renewals().len(), 2);
}

// ---------------------------------------------------------------------------------------
// Revocation in Vault when the broker lease ends
// ---------------------------------------------------------------------------------------

/// Released: the Vault lease is revoked; the holder's other lease is not.
#[tokio::test]
async fn release_revokes_the_vault_lease() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;
    let (_other, other_secret) = issue_db_lease(&mut c, &vault).await;
    release(&mut c, &lease.id).await;
    assert_revoked_in_vault(&h, &vault, &lease.id, &secret.lease_id).await;
    assert_eq!(vault.times_revoked(&other_secret.lease_id), 0);
}

/// Revoked by an operator: the Vault lease is revoked.
#[tokio::test]
async fn admin_revocation_revokes_the_vault_lease() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;
    let mut admin = h.admin_as(ROOT).await;
    let revoked = admin
        .revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(lease.id.clone())),
            reason: "feature-db credential leaked in a log".into(),
            ..Default::default()
        })
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(revoked.revoked_lease_ids, [lease.id.as_str()]);
    assert_revoked_in_vault(&h, &vault, &lease.id, &secret.lease_id).await;
}

/// Expired: once the reaper marks the lease expired, the Vault lease is revoked.
#[tokio::test]
async fn expiry_revokes_the_vault_lease() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;
    assert_eq!(pass(&h).await, (0, 0), "an active lease is not revoked");
    assert_eq!(vault.times_revoked(&secret.lease_id), 0);
    h.clock.advance(Duration::from_secs(DEFAULT_TTL as u64 + 1));
    h.env.broker.reap_expired().await.expect("reaped");
    assert_revoked_in_vault(&h, &vault, &lease.id, &secret.lease_id).await;
}

// ---------------------------------------------------------------------------------------
// Vault down or slow
// ---------------------------------------------------------------------------------------

/// A sealed Vault fails feature-db with UNAVAILABLE (whether the broker still has to log
/// in or already holds a token) while JWT profiles are issued as usual; once Vault is
/// back, feature-db works again without a restart.
#[tokio::test]
async fn sealed_vault_fails_only_vault_profiles() {
    let (h, vault) = start_vault(unchanged).await;
    let c = h.broker_as(MODEL_RUNTIME).await;
    for logged_in in [false, true] {
        vault.set_down(true);
        let before = h.lease_count();
        let (mut a, mut b) = (c.clone(), c.clone());
        let (db, ds) = tokio::join!(
            a.issue_credential(feature_db()),
            b.issue_credential(dataset_read())
        );
        let err = db.expect_err("feature-db refused while Vault is sealed");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        ds.expect("dataset-read does not depend on Vault");
        assert_eq!(h.lease_count(), before + 1, "only the dataset-read lease");
        let denied = h
            .audit_bodies()
            .into_iter()
            .rfind(|b| b["kind"] == "deny")
            .expect("the refusal is recorded");
        assert_eq!(denied["caller"], MODEL_RUNTIME);
        assert!(
            denied["reason"]
                .as_str()
                .is_some_and(|r| r.contains("Vault is sealed")),
            "logged in: {logged_in}: {denied}"
        );

        vault.set_down(false);
        let mut c = c.clone();
        let (lease, _) = issue_db_lease(&mut c, &vault).await;
        assert_eq!(lease.state, pb::LeaseState::Active as i32);
    }
    assert_eq!(vault.logins().len(), 1, "one login once Vault was back");
}

/// A Vault slower than the profile's deadline (1 s here) fails feature-db with
/// UNAVAILABLE at the deadline, records nothing as issued, and holds up nothing else.
#[tokio::test]
async fn slow_vault_fails_within_the_profile_deadline() {
    let (h, vault) = start_vault(feature_db_deadline_1s).await;
    let c = h.broker_as(MODEL_RUNTIME).await;
    vault.set_delay(Duration::from_secs(3));
    let before = h.lease_count();
    let (mut a, mut b) = (c.clone(), c.clone());
    let started = Instant::now();
    let (db, ds) = tokio::join!(
        async {
            let r = a.issue_credential(feature_db()).await;
            (r, started.elapsed())
        },
        b.issue_credential(dataset_read())
    );
    let (db, took) = db;
    let err = db.expect_err("feature-db times out");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        took < Duration::from_millis(2500),
        "answered at the 1 s deadline, not after Vault's 3 s: {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "waited for the deadline: {took:?}"
    );
    ds.expect("dataset-read is not held up");
    assert_eq!(h.lease_count(), before + 1, "no feature-db lease recorded");
    assert!(h
        .audit_bodies()
        .iter()
        .all(|b| b["kind"] != "issue" || b["request"]["profile"] != FEATURE_DB));

    vault.set_delay(Duration::ZERO);
    let mut c = c.clone();
    issue_db_lease(&mut c, &vault).await;
}

// ---------------------------------------------------------------------------------------
// Retries, stuck revocations, force-removal
// ---------------------------------------------------------------------------------------

/// Vault fails revocations: each pass where the entry is due records a failure and a
/// back-off; after STUCK_AFTER_ATTEMPTS failures it is listed as stuck and counted on
/// /metrics; once Vault recovers, the next due pass revokes it and clears both.
#[tokio::test]
async fn failed_vault_revocations_are_retried_until_vault_confirms() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let mut admin = h.admin_as(ROOT).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;
    vault.fail_revokes(1000);
    let calls = vault.revoke_calls();
    release(&mut c, &lease.id).await;

    let stuck = fail_until_stuck(&h, &vault, &mut admin, &lease.id, calls).await;
    assert_eq!(stuck.backend, "vault");
    assert_eq!(stuck.backend_handle, secret.lease_id);
    let listed = pending(&mut admin, STUCK_AFTER_ATTEMPTS).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].lease_id, lease.id);
    assert!(!listed[0].last_error.is_empty());
    assert_eq!(stuck_gauge(&h).await, "1");
    assert_eq!(vault.times_revoked(&secret.lease_id), 0);
    assert!(audit_of(&h, "backend_revoke", &lease.id).is_empty());

    vault.fail_revokes(0);
    h.clock.advance(Duration::from_secs(600));
    pass(&h).await;
    assert!(
        vault.times_revoked(&secret.lease_id) >= 1,
        "revoked once Vault is back"
    );
    assert!(pending(&mut admin, 0).await.is_empty());
    assert_eq!(stuck_gauge(&h).await, "0");
    let entries = audit_of(&h, "backend_revoke", &lease.id);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("failed attempts before")),
        "{entries:?}"
    );
}

/// A platform-admin may stop retrying a stuck revocation, with a reason that is
/// recorded; others may not; and there must be something to remove.
#[tokio::test]
async fn force_removing_a_stuck_vault_revocation() {
    let (h, vault) = start_vault(unchanged).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let mut root = h.admin_as(ROOT).await;
    let (lease, secret) = issue_db_lease(&mut c, &vault).await;
    let (active, _) = issue_db_lease(&mut c, &vault).await;
    vault.fail_revokes(1000);
    let calls = vault.revoke_calls();
    release(&mut c, &lease.id).await;
    fail_until_stuck(&h, &vault, &mut root, &lease.id, calls).await;

    let force = |lease_id: &str, reason: &str| pb::ForceRemoveBackendRevocationRequest {
        lease_id: lease_id.into(),
        reason: reason.into(),
    };
    let reason = "vault cluster decommissioned; database user dropped by hand";
    let mut not_admin = h.admin_as(MODEL_RUNTIME).await;
    let err = not_admin
        .force_remove_backend_revocation(force(&lease.id, reason))
        .await
        .expect_err("only platform-admins");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = root
        .force_remove_backend_revocation(force(&lease.id, ""))
        .await
        .expect_err("a reason is required");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(pending(&mut root, STUCK_AFTER_ATTEMPTS).await.len(), 1);

    root.force_remove_backend_revocation(force(&lease.id, reason))
        .await
        .expect("force-removed")
        .into_inner()
        .receipt
        .expect("receipt");
    assert!(pending(&mut root, 0).await.is_empty());
    let entries = audit_of(&h, "backend_revoke", &lease.id);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["caller"], ROOT);
    assert_eq!(entries[0]["request"]["rpc"], "ForceRemoveBackendRevocation");
    assert!(
        entries[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(reason)),
        "{entries:?}"
    );

    // Nothing pending: again, or for a lease that never ended.
    for id in [&lease.id, &active.id] {
        let err = root
            .force_remove_backend_revocation(force(id, reason))
            .await
            .expect_err("nothing to remove");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    // Removed means no longer retried, even once Vault would accept it.
    vault.fail_revokes(0);
    h.clock.advance(Duration::from_secs(600));
    assert_eq!(pass(&h).await, (0, 0));
    assert_eq!(vault.times_revoked(&secret.lease_id), 0);
    assert_eq!(stuck_gauge(&h).await, "0");
}

// ---------------------------------------------------------------------------------------
// Orphans
// ---------------------------------------------------------------------------------------

/// A secret Vault created for an issuance the ledger then refused (quota) is revoked in
/// Vault right away, so it does not outlive the refusal.
#[tokio::test]
async fn the_vault_lease_of_a_refused_issuance_is_revoked() {
    let (h, vault) = start_vault(feature_db_one_active_lease).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    let (kept, kept_secret) = issue_db_lease(&mut c, &vault).await;
    let err = c
        .issue_credential(feature_db())
        .await
        .expect_err("over the profile's quota");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let issued = vault.issued();
    assert_eq!(issued.len(), 2, "Vault created a second secret");
    wait_revoked(&vault, &issued[1].lease_id).await;
    assert_eq!(vault.times_revoked(&kept_secret.lease_id), 0);
    assert_eq!(h.lease_count(), 1, "only the kept lease is recorded");
    assert_eq!(kept.state, pb::LeaseState::Active as i32);
}

/// A secret Vault created for an issuance that then missed the profile's deadline (Vault
/// acted, its answer came back late) was never handed out: it is revoked in Vault once
/// the answer arrives, like the secret of a refused issuance.
#[tokio::test]
async fn the_vault_lease_of_a_timed_out_issuance_is_revoked() {
    let (h, vault) = start_vault(feature_db_deadline_1s).await;
    let mut c = h.broker_as(MODEL_RUNTIME).await;
    issue_db_lease(&mut c, &vault).await;
    vault.set_late_answers(Duration::from_secs(2));
    let err = c
        .issue_credential(feature_db())
        .await
        .expect_err("the answer misses the 1 s deadline");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    vault.set_late_answers(Duration::ZERO);
    let issued = vault.issued();
    assert_eq!(issued.len(), 2, "Vault created the second secret");
    assert_eq!(h.lease_count(), 1, "the broker recorded no lease for it");
    wait_revoked(&vault, &issued[1].lease_id).await;
}
