//! Hostile input against a real dev broker: SPIFFE ID tricks in X.509-SVID URI SANs and
//! JWT-SVID `sub`, malformed and oversized JWTs, malformed DER and over-long chains, and
//! malformed requests from authenticated callers.
//!
//! Every case asserts: refused with the right code (UNAUTHENTICATED with the one fixed
//! message for identity tricks, INVALID_ARGUMENT with a message naming the bad field for
//! malformed requests), the ledger entry that explains the refusal, nothing issued
//! (`lease_count` unchanged), and that the broker still serves a good request afterwards.
//! Every RPC is bounded by a timeout so a hang fails the test instead of stalling it.
//!
//! Tests marked `#[ignore = "BUG: …"]` expose defects in `src/`; run them with
//! `cargo test --test hostile_input -- --ignored`.

use crate::common;

use spiffe_broker::broker::AUTHN_FAILURE_RECORDS_PER_MINUTE;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use spiffe_broker::authn::{validate_jwt_svid, StaticTrust, MAX_CHAIN_LEN};
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::clock::{unix_seconds, Clock as _};
use spiffe_broker::crypto::{EcdsaP256Signer, Signer};
use spiffe_broker::dev::BROKER_ID;
use spiffe_broker::error::UNAUTHENTICATED_MESSAGE;
use spiffe_broker::jose::{self, b64, MAX_JWT_LEN};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::server::MAX_MESSAGE_BYTES;
use spiffe_broker::workload::ca::svid_params;
use tonic::transport::Channel;
use tonic::{Code, Status};

type BrokerClient = pb::credential_broker_client::CredentialBrokerClient<Channel>;
type AdminClient = pb::admin_client::AdminClient<Channel>;
type ApprovalsClient = pb::approvals_client::ApprovalsClient<Channel>;

/// Most scopes per request (`api::convert::MAX_SCOPES`, not exported).
const MAX_SCOPES: usize = 32;

/// Longest wait for any one answer; beyond it the broker is considered hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

async fn within<T>(case: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("[{case}] no answer within {CALL_TIMEOUT:?}: the broker hung"),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

fn bundle(h: &Harness) -> Vec<CertificateDer<'static>> {
    vec![h.env.ca.ca_der().clone()]
}

/// The broker's (manual) clock in Unix seconds: tokens and certificates are minted
/// against it so they stay valid however long the test runs.
fn broker_now(h: &Harness) -> i64 {
    unix_seconds(h.clock.now())
}

/// What the ledger held before a case: the case must add exactly the expected entries
/// and no lease.
struct Mark {
    leases: i64,
    audit: usize,
}

fn mark(h: &Harness) -> Mark {
    Mark {
        leases: h.lease_count(),
        audit: h.audit_bodies().len(),
    }
}

fn entries_since(h: &Harness, m: &Mark) -> Vec<Value> {
    h.audit_bodies().into_iter().skip(m.audit).collect()
}

/// A request carrying `Bearer <token>` when `bearer` is given.
fn authed<T>(msg: T, bearer: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = bearer {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .expect("ASCII metadata value"),
        );
    }
    req
}

/// Asserts the refusal an identity trick must get: UNAUTHENTICATED with the one fixed
/// message, exactly one new `authn_failure` ledger entry for `rpc` (method `method`,
/// reason containing `reason_has`), and no lease. Returns the ledger entry.
fn assert_unauthenticated<T: std::fmt::Debug>(
    h: &Harness,
    m: &Mark,
    case: &str,
    rpc: &str,
    got: Result<T, Status>,
    method: Option<&str>,
    reason_has: &str,
) -> Value {
    let status = match got {
        Ok(v) => panic!("[{case}] was accepted ({v:?}); it must be refused"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "[{case}] wrong code: {status:?}"
    );
    assert_eq!(
        status.message(),
        UNAUTHENTICATED_MESSAGE,
        "[{case}] the client must see only the fixed message"
    );
    let new = entries_since(h, m);
    assert_eq!(
        new.len(),
        1,
        "[{case}] expected exactly one new ledger entry: {new:?}"
    );
    let e = &new[0];
    assert_eq!(e["kind"], "authn_failure", "[{case}] {e}");
    assert_eq!(e["decision"], "deny", "[{case}] {e}");
    assert_eq!(e["request"]["rpc"], rpc, "[{case}] {e}");
    match method {
        Some(m) => assert_eq!(e["auth_method"], m, "[{case}] {e}"),
        None => assert!(e.get("auth_method").is_none(), "[{case}] {e}"),
    }
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(reason_has),
        "[{case}] refused for an unexpected reason: {reason:?} (expected {reason_has:?})"
    );
    assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
    e.clone()
}

/// Asserts a malformed request from an authenticated caller: INVALID_ARGUMENT whose
/// message names the problem (`msg_has`), is bounded and free of control characters;
/// exactly one new `deny` ledger entry for `rpc`; no lease.
fn assert_invalid<T: std::fmt::Debug>(
    h: &Harness,
    m: &Mark,
    case: &str,
    rpc: &str,
    got: Result<T, Status>,
    msg_has: &str,
) -> String {
    let status = match got {
        Ok(v) => panic!("[{case}] was accepted ({v:?}); it must be refused"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "[{case}] wrong code: {status:?}"
    );
    let msg = status.message();
    assert!(
        msg.contains(msg_has),
        "[{case}] unclear message {msg:?} (expected it to mention {msg_has:?})"
    );
    assert!(
        !msg.chars().any(char::is_control),
        "[{case}] the message echoes raw control characters: {msg:?}"
    );
    assert!(
        msg.len() <= 512,
        "[{case}] the message echoes unbounded input ({} bytes)",
        msg.len()
    );
    let new = entries_since(h, m);
    assert_eq!(
        new.len(),
        1,
        "[{case}] expected exactly one new ledger entry: {new:?}"
    );
    let e = &new[0];
    assert_eq!(e["kind"], "deny", "[{case}] {e}");
    assert_eq!(e["request"]["rpc"], rpc, "[{case}] {e}");
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(msg_has),
        "[{case}] ledger reason {reason:?} does not say why"
    );
    assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
    msg.to_owned()
}

/// A good request after a hostile one: issue a credential (one new lease) and give it
/// back, over `client` (mTLS identity or `bearer`).
async fn assert_serves(h: &Harness, client: &mut BrokerClient, bearer: Option<&str>, case: &str) {
    let before = h.lease_count();
    let resp = within(
        case,
        client.issue_credential(authed(common::gpu_request(600), bearer)),
    )
    .await
    .unwrap_or_else(|s| panic!("[{case}] the broker no longer serves a good request: {s:?}"))
    .into_inner();
    assert_eq!(
        h.lease_count(),
        before + 1,
        "[{case}] the good request did not create its lease"
    );
    let lease_id = resp.lease.expect("issued lease").id;
    within(
        case,
        client.release_lease(authed(pb::ReleaseLeaseRequest { lease_id }, bearer)),
    )
    .await
    .unwrap_or_else(|s| panic!("[{case}] the good release failed: {s:?}"));
}

// ---------------------------------------------------------------------------------------
// X.509 plumbing
// ---------------------------------------------------------------------------------------

/// A leaf for `uri` signed by the dev CA, valid now on the broker's clock.
fn dev_leaf(h: &Harness, uri: &str) -> (CertificateDer<'static>, KeyPair) {
    let now = h.clock.now();
    let params = svid_params(uri, now - secs(60), now + secs(3600)).expect("svid params");
    let key = p256();
    let cert = h.env.ca.sign(&params, &key).expect("dev CA signs");
    (cert, key)
}

/// What presenting a certificate chain came to.
#[derive(Debug)]
enum Outcome {
    /// The credential was issued.
    Accepted(Box<pb::IssueCredentialResponse>),
    /// A gRPC status came back (from the broker or from the transport).
    Refused(Status),
    /// No channel could be opened.
    NoConnection(String),
}

/// Connects with `chain` (leaf first) and `key` and asks for the usual credential.
async fn present_chain(
    h: &Harness,
    case: &str,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
) -> Outcome {
    let identity = ClientIdentity::Files {
        chain,
        key: Arc::new(key.serialize_der()),
        bundle: bundle(h),
    };
    let addr = h.env.grpc_addr.to_string();
    let channel = match within(case, client::connect(&addr, BROKER_ID, &identity)).await {
        Ok(c) => c,
        Err(e) => return Outcome::NoConnection(e.to_string()),
    };
    let mut c = BrokerClient::new(channel);
    match within(case, c.issue_credential(common::gpu_request(600))).await {
        Ok(r) => Outcome::Accepted(Box::new(r.into_inner())),
        Err(s) => Outcome::Refused(s),
    }
}

fn outcome_result(o: Outcome, case: &str) -> Result<Box<pb::IssueCredentialResponse>, Status> {
    match o {
        Outcome::Accepted(r) => Ok(r),
        Outcome::Refused(s) => Err(s),
        Outcome::NoConnection(e) => {
            panic!("[{case}] could not even connect ({e}); expected a gRPC refusal")
        }
    }
}

// ---------------------------------------------------------------------------------------
// JWT plumbing
// ---------------------------------------------------------------------------------------

/// The dev CA's JWT-SVID key from the state dir, so forged tokens differ from valid ones
/// only in the property under test.
fn dev_jwt_key(h: &Harness) -> EcdsaP256Signer {
    let bytes = std::fs::read(h.env.state_dir.join("dev-jwt.key")).expect("dev-jwt.key");
    let key = EcdsaP256Signer::from_pkcs8(&bytes).expect("P-256 PKCS#8");
    assert_eq!(
        h.env.ca.jwt_bundle().keys[0].kid.as_deref(),
        Some(key.key_id()),
        "the state dir key is the dev JWT-SVID key"
    );
    key
}

/// Signs raw header and claims bytes (duplicate keys, invalid UTF-8 and all) with ES256.
fn sign_raw(key: &EcdsaP256Signer, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = key.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn good_header(key: &EcdsaP256Signer) -> String {
    json!({ "alg": "ES256", "kid": key.key_id(), "typ": "JWT" }).to_string()
}

fn claims_for(h: &Harness, sub: &str) -> String {
    let now = broker_now(h);
    json!({ "sub": sub, "aud": [BROKER_ID], "exp": now + 300, "iat": now }).to_string()
}

/// A valid JWT-SVID for `sub`, except for whatever `sub` itself gets wrong.
fn jwt_for(h: &Harness, key: &EcdsaP256Signer, sub: &str) -> String {
    sign_raw(
        key,
        good_header(key).as_bytes(),
        claims_for(h, sub).as_bytes(),
    )
}

async fn anonymous_client(h: &Harness) -> BrokerClient {
    let anonymous = ClientIdentity::Anonymous { bundle: bundle(h) };
    BrokerClient::new(h.channel_as(&anonymous).await)
}

// ---------------------------------------------------------------------------------------
// SPIFFE ID tricks
// ---------------------------------------------------------------------------------------

/// IDs the SPIFFE ID specification makes invalid (percent-encoding, dot and empty
/// segments, trailing slash, query, fragment, userinfo, port, bad characters, missing or
/// over-long trust domain). Each is one character away from a registered identity.
fn invalid_spiffe_ids() -> Vec<(&'static str, String)> {
    let s = |v: &str| v.to_owned();
    vec![
        (
            "percent-encoded dash",
            s("spiffe://example.org/ci/deploy%2Dagent"),
        ),
        (
            "percent-encoded slash",
            s("spiffe://example.org/ci%2Fdeploy-agent"),
        ),
        (
            "percent-encoded dot in trust domain",
            s("spiffe://example%2Eorg/ci/deploy-agent"),
        ),
        ("dot-dot segment", s("spiffe://example.org/ci/../ops/root")),
        ("dot segment", s("spiffe://example.org/ci/./deploy-agent")),
        ("trailing dot-dot", s("spiffe://example.org/ops/root/..")),
        ("trailing slash", s("spiffe://example.org/ci/deploy-agent/")),
        ("empty segment", s("spiffe://example.org/ci//deploy-agent")),
        (
            "leading empty segment",
            s("spiffe://example.org//ci/deploy-agent"),
        ),
        (
            "query",
            s("spiffe://example.org/ci/deploy-agent?as=spiffe://example.org/ops/root"),
        ),
        ("fragment", s("spiffe://example.org/ci/deploy-agent#root")),
        (
            "userinfo in authority",
            s("spiffe://root@example.org/ci/deploy-agent"),
        ),
        (
            "userinfo with password",
            s("spiffe://ops:root@example.org/ci/deploy-agent"),
        ),
        ("port", s("spiffe://example.org:443/ci/deploy-agent")),
        ("empty port", s("spiffe://example.org:/ci/deploy-agent")),
        (
            "IPv6 literal authority",
            s("spiffe://[::1]/ci/deploy-agent"),
        ),
        (
            "NUL inside the path",
            s("spiffe://example.org/ci/deploy-agent\0/ops/root"),
        ),
        ("space in path", s("spiffe://example.org/ci/deploy agent")),
        (
            "backslash in path",
            s("spiffe://example.org/ci\\deploy-agent"),
        ),
        ("scheme without //", s("spiffe:example.org/ci/deploy-agent")),
        ("empty trust domain", s("spiffe:///ci/deploy-agent")),
        (
            "trust domain over 255 bytes",
            format!("spiffe://{}.example.org/ci/deploy-agent", "a".repeat(256)),
        ),
    ]
}

/// Upper-case scheme or trust domain: the specification says the trust domain MUST be
/// lower-case; the reference implementation (go-spiffe) refuses both forms.
const NON_CANONICAL_CASE_IDS: &[(&str, &str)] = &[
    ("upper-case scheme", "SPIFFE://example.org/ci/deploy-agent"),
    (
        "upper-case trust domain",
        "spiffe://EXAMPLE.org/ci/deploy-agent",
    ),
    (
        "mixed-case scheme and trust domain",
        "Spiffe://Example.ORG/ops/root",
    ),
];

/// A SPIFFE ID over the specification's 2048-byte bound, under a registered identity's
/// trust domain.
fn over_long_id() -> String {
    let id = format!("spiffe://example.org/ci/{}", "a".repeat(2100));
    assert!(id.len() > 2048);
    id
}

/// Longest bytes of attacker text the ledger may keep from a refused ID
/// (`domain::truncate`: 64 bytes and an ellipsis).
const CLAIMED_MAX: usize = 64 + '…'.len_utf8();

#[tokio::test]
async fn x509_svid_uri_san_tricks_are_unauthenticated() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    for (name, uri) in invalid_spiffe_ids() {
        let case = format!("X.509 URI SAN: {name}");
        let (leaf, key) = dev_leaf(&h, &uri);
        let m = mark(&h);
        let got = outcome_result(present_chain(&h, &case, vec![leaf], &key).await, &case);
        let e = assert_unauthenticated(
            &h,
            &m,
            &case,
            "IssueCredential",
            got,
            Some("x509-svid"),
            "invalid SPIFFE ID",
        );
        let claimed = e["claimed_id"].as_str().unwrap_or_default();
        assert!(
            claimed.len() <= CLAIMED_MAX,
            "[{case}] the ledger keeps {} bytes of attacker text",
            claimed.len()
        );
        assert_serves(&h, &mut good, None, &case).await;
    }

    // Control: the path is case-sensitive, so an upper-case path is a different (valid,
    // unregistered) identity; it must not be folded onto deploy-agent.
    let case = "X.509 URI SAN: upper-case path is another identity";
    let (leaf, key) = dev_leaf(&h, "spiffe://example.org/CI/deploy-agent");
    let m = mark(&h);
    match present_chain(&h, case, vec![leaf], &key).await {
        Outcome::Refused(s) => assert_eq!(s.code(), Code::PermissionDenied, "[{case}] {s:?}"),
        other => panic!("[{case}] expected PERMISSION_DENIED, got {other:?}"),
    }
    assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
    assert_serves(&h, &mut good, None, case).await;
}

#[tokio::test]
async fn jwt_svid_sub_tricks_are_unauthenticated() {
    let h = common::start().await;
    let key = dev_jwt_key(&h);
    let mut anon = anonymous_client(&h).await;
    let good_token = jwt_for(&h, &key, common::DEPLOY_AGENT);
    for (name, sub) in invalid_spiffe_ids() {
        let case = format!("JWT sub: {name}");
        let token = jwt_for(&h, &key, &sub);
        let m = mark(&h);
        let got = within(
            &case,
            anon.issue_credential(authed(common::gpu_request(600), Some(&token))),
        )
        .await;
        let e = assert_unauthenticated(
            &h,
            &m,
            &case,
            "IssueCredential",
            got,
            Some("jwt-svid"),
            "invalid SPIFFE ID",
        );
        let claimed = e["claimed_id"].as_str().unwrap_or_default();
        assert!(
            claimed.len() <= CLAIMED_MAX,
            "[{case}] the ledger keeps {} bytes of attacker text",
            claimed.len()
        );
        assert_serves(&h, &mut anon, Some(&good_token), &case).await;
    }
}

/// Presents every non-canonical or over-long ID over both SVID kinds and reports each
/// one that was not refused with UNAUTHENTICATED (and what it was accepted as).
async fn identity_trick_escapes(h: &Harness, ids: &[(&str, String)]) -> Vec<String> {
    let key = dev_jwt_key(h);
    let jwks = h.jwks().await;
    let mut anon = anonymous_client(h).await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let mut escapes = Vec::new();
    for (name, id) in ids {
        let x509 = {
            let (leaf, k) = dev_leaf(h, id);
            present_chain(h, name, vec![leaf], &k).await
        };
        let jwt = {
            let token = jwt_for(h, &key, id);
            match within(
                name,
                anon.issue_credential(authed(common::gpu_request(600), Some(&token))),
            )
            .await
            {
                Ok(r) => Outcome::Accepted(Box::new(r.into_inner())),
                Err(s) => Outcome::Refused(s),
            }
        };
        for (kind, outcome) in [("X.509-SVID", x509), ("JWT-SVID", jwt)] {
            match outcome {
                Outcome::Refused(s) if s.code() == Code::Unauthenticated => {}
                Outcome::Accepted(r) => {
                    let claims = common::verify_jwt(&common::token_of(&r.credential), &jwks);
                    escapes.push(format!(
                        "{kind} {name} ({}…): AUTHENTICATED and ISSUED a credential with sub={}",
                        &id[..id.len().min(48)],
                        claims["sub"]
                    ));
                }
                Outcome::Refused(s) => escapes.push(format!(
                    "{kind} {name} ({}…): authenticated, then refused {:?} with a {}-byte message: {}…",
                    &id[..id.len().min(48)],
                    s.code(),
                    s.message().len(),
                    &s.message()[..s.message().len().min(120)]
                )),
                Outcome::NoConnection(e) => escapes.push(format!("{kind} {name}: {e}")),
            }
        }
        assert_serves(h, &mut good, None, name).await;
    }
    escapes
}

#[tokio::test]
async fn non_canonical_case_spiffe_ids_are_unauthenticated() {
    let h = common::start().await;
    let ids: Vec<(&str, String)> = NON_CANONICAL_CASE_IDS
        .iter()
        .map(|(n, id)| (*n, (*id).to_owned()))
        .collect();
    let leases = h.lease_count();
    let escapes = identity_trick_escapes(&h, &ids).await;
    assert!(
        escapes.is_empty(),
        "non-canonical SPIFFE IDs were not refused as UNAUTHENTICATED:\n  {}\n(leases before {leases}, after {})",
        escapes.join("\n  "),
        h.lease_count()
    );
}

#[tokio::test]
async fn over_long_spiffe_ids_are_unauthenticated() {
    let h = common::start().await;
    let ids = vec![("SPIFFE ID over 2048 bytes", over_long_id())];
    let m = mark(&h);
    let mut escapes = identity_trick_escapes(&h, &ids).await;
    // What the ledger kept of the attacker's ID.
    for e in entries_since(&h, &m) {
        for field in ["caller", "claimed_id", "reason"] {
            if let Some(v) = e[field].as_str().filter(|v| v.len() > 2048) {
                escapes.push(format!(
                    "ledger {} entry keeps a {}-byte {field}",
                    e["kind"],
                    v.len()
                ));
            }
        }
    }
    assert!(
        escapes.is_empty(),
        "over-long SPIFFE IDs were not refused as UNAUTHENTICATED:\n  {}",
        escapes.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// Malformed and oversized JWTs
// ---------------------------------------------------------------------------------------

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// Structurally broken compact JWS, and signed tokens whose JSON is hostile.
fn jwt_corpus(h: &Harness, key: &EcdsaP256Signer) -> Vec<(String, String, &'static str)> {
    let kid = key.key_id().to_owned();
    let now = broker_now(h);
    let exp = now + 300;
    let agent = common::DEPLOY_AGENT;
    let root = common::ROOT;
    let header = good_header(key);
    let claims = claims_for(h, agent);
    let good = sign_raw(key, header.as_bytes(), claims.as_bytes());
    let parts: Vec<&str> = good.split('.').collect();
    let (hd, pl, sg) = (parts[0], parts[1], parts[2]);
    let raw = |header: &str, claims: &str| sign_raw(key, header.as_bytes(), claims.as_bytes());
    let padded = |s: &str| format!("{s}{}", "=".repeat(((4 - s.len() % 4) % 4).max(1)));
    // The signature is 64 bytes: 86 base64url characters whose last one carries 4
    // unused bits. Setting one of them changes the text but not (if tolerated) the bytes.
    let trailing_bits = {
        let mut s = sg.to_owned();
        let last = s.pop().expect("signature");
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let v = alphabet.find(last).expect("base64url");
        s.push(alphabet.as_bytes()[v ^ 1] as char);
        format!("{hd}.{pl}.{s}")
    };
    let c = |sub: &str, extra: &str| {
        format!(r#"{{"sub":"{sub}","aud":["{BROKER_ID}"],"exp":{exp},"iat":{now}{extra}}}"#)
    };
    let h_alg = |first: &str, second: &str| {
        format!(r#"{{"alg":"{first}","kid":"{kid}","typ":"JWT","alg":"{second}"}}"#)
    };

    let mut v: Vec<(String, String, &'static str)> = vec![
        // --- structure
        (
            "two parts".into(),
            format!("{hd}.{pl}"),
            "three dot-separated parts",
        ),
        (
            "four parts".into(),
            format!("{good}.{sg}"),
            "three dot-separated parts",
        ),
        (
            "trailing dot (four parts, last empty)".into(),
            format!("{good}."),
            "three dot-separated parts",
        ),
        ("only dots".into(), "..".into(), "header refused"),
        (
            "empty header".into(),
            format!(".{pl}.{sg}"),
            "header refused",
        ),
        (
            "'+' in header (base64, not base64url)".into(),
            format!("+{}.{pl}.{sg}", &hd[1..]),
            "malformed base64url",
        ),
        (
            "'/' in signature".into(),
            format!("{hd}.{pl}./{}", &sg[1..]),
            "malformed base64url",
        ),
        (
            "'*' in payload".into(),
            format!("{hd}.*{}.{sg}", &pl[1..]),
            "malformed base64url",
        ),
        (
            "space inside payload".into(),
            format!("{hd}.{} {}.{sg}", &pl[..4], &pl[4..]),
            "malformed base64url",
        ),
        (
            "padded header".into(),
            format!("{}.{pl}.{sg}", padded(hd)),
            "malformed base64url",
        ),
        (
            "padded signature".into(),
            format!("{hd}.{pl}.{}", padded(sg)),
            "malformed base64url",
        ),
        (
            "non-canonical trailing bits in signature".into(),
            trailing_bits,
            "malformed base64url",
        ),
        // --- header JSON
        (
            "duplicate alg (ES256 then none)".into(),
            raw(&h_alg("ES256", "none"), &claims),
            "duplicate field `alg`",
        ),
        (
            "duplicate alg (none then ES256)".into(),
            raw(&h_alg("none", "ES256"), &claims),
            "duplicate field `alg`",
        ),
        (
            "duplicate kid".into(),
            raw(
                &format!(r#"{{"alg":"ES256","kid":"other","typ":"JWT","kid":"{kid}"}}"#),
                &claims,
            ),
            "duplicate field `kid`",
        ),
        (
            "duplicate typ".into(),
            raw(
                &format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT","typ":"JWT"}}"#),
                &claims,
            ),
            "duplicate field `typ`",
        ),
        (
            "trailing data after header JSON".into(),
            raw(&format!("{header}{{}}"), &claims),
            "header refused",
        ),
        (
            "header is a JSON array".into(),
            raw(r#"["ES256"]"#, &claims),
            "header refused",
        ),
        (
            "deeply nested kid".into(),
            raw(
                &format!(r#"{{"alg":"ES256","kid":{}}}"#, nested_arrays(2000)),
                &claims,
            ),
            "header refused",
        ),
        // --- claims JSON
        (
            "duplicate sub (root, then deploy-agent)".into(),
            raw(
                &header,
                &format!(r#"{{"sub":"{root}",{}"#, &c(agent, "")[1..]),
            ),
            "duplicate field `sub`",
        ),
        (
            "duplicate sub (deploy-agent, then root)".into(),
            raw(&header, &c(agent, &format!(r#","sub":"{root}""#))),
            "duplicate field `sub`",
        ),
        (
            "duplicate aud".into(),
            raw(
                &header,
                &c(agent, r#","aud":["spiffe://example.org/elsewhere"]"#),
            ),
            "duplicate field `aud`",
        ),
        (
            "duplicate exp (future, then past)".into(),
            raw(&header, &c(agent, r#","exp":1"#)),
            "duplicate field `exp`",
        ),
        (
            "deeply nested extra claim (arrays)".into(),
            raw(
                &header,
                &c(agent, &format!(r#","nest":{}"#, nested_arrays(2000))),
            ),
            "recursion limit",
        ),
        (
            "deeply nested extra claim (objects)".into(),
            raw(
                &header,
                &c(agent, &format!(r#","nest":{}"#, nested_objects(1000))),
            ),
            "recursion limit",
        ),
        (
            "deeply nested aud".into(),
            raw(
                &header,
                &format!(
                    r#"{{"sub":"{agent}","aud":{},"exp":{exp}}}"#,
                    nested_arrays(2000)
                ),
            ),
            "claims refused",
        ),
        (
            "trailing data after claims JSON".into(),
            raw(&header, &format!("{claims} x")),
            "claims refused",
        ),
        (
            "claims is a JSON array".into(),
            raw(&header, &format!("[{claims}]")),
            "claims refused",
        ),
        (
            "numeric sub".into(),
            raw(
                &header,
                &format!(r#"{{"sub":7,"aud":["{BROKER_ID}"],"exp":{exp}}}"#),
            ),
            "claims refused",
        ),
        (
            "exp beyond i64".into(),
            raw(
                &header,
                &format!(r#"{{"sub":"{agent}","aud":["{BROKER_ID}"],"exp":9223372036854775808}}"#),
            ),
            "claims refused",
        ),
    ];
    // Invalid UTF-8 inside the sub string (signed).
    let mut bad_utf8 = c(agent, "").into_bytes();
    let at = bad_utf8
        .windows(b"deploy-agent".len())
        .position(|w| w == b"deploy-agent")
        .expect("sub");
    bad_utf8[at] = 0xff;
    v.push((
        "invalid UTF-8 in sub".into(),
        sign_raw(key, header.as_bytes(), &bad_utf8),
        "claims refused",
    ));
    v
}

#[tokio::test]
async fn malformed_jwts_are_unauthenticated() {
    let h = common::start().await;
    let key = dev_jwt_key(&h);
    let mut anon = anonymous_client(&h).await;
    let good_token = jwt_for(&h, &key, common::DEPLOY_AGENT);
    let corpus = jwt_corpus(&h, &key);
    assert!(corpus.len() >= 25);
    for (name, token, reason_has) in corpus {
        let case = format!("JWT: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            anon.issue_credential(authed(common::gpu_request(600), Some(&token))),
        )
        .await;
        assert_unauthenticated(
            &h,
            &m,
            &case,
            "IssueCredential",
            got,
            Some("jwt-svid"),
            reason_has,
        );
        assert_serves(&h, &mut anon, Some(&good_token), &case).await;
    }

    // Control: moderate nesting in an extra claim is fine (the refusal above is a depth
    // bound, not a refusal of extra claims).
    let now = broker_now(&h);
    let nested = format!(
        r#"{{"sub":"{}","aud":["{BROKER_ID}"],"exp":{},"iat":{now},"ctx":{}}}"#,
        common::DEPLOY_AGENT,
        now + 300,
        nested_arrays(32)
    );
    let token = sign_raw(&key, good_header(&key).as_bytes(), nested.as_bytes());
    assert_serves(&h, &mut anon, Some(&token), "JWT with 32-deep extra claim").await;
}

/// The largest valid token of at most `MAX_JWT_LEN` bytes and the smallest above it.
fn tokens_around_max_len(h: &Harness, key: &EcdsaP256Signer) -> (String, String) {
    let header = good_header(key);
    let now = broker_now(h);
    let mut fits = None;
    for n in 11_000.. {
        let claims = json!({
            "sub": common::DEPLOY_AGENT, "aud": [BROKER_ID], "exp": now + 300, "iat": now,
            "pad": "x".repeat(n),
        })
        .to_string();
        let token = sign_raw(key, header.as_bytes(), claims.as_bytes());
        if token.len() > MAX_JWT_LEN {
            return (fits.expect("started below the limit"), token);
        }
        fits = Some(token);
    }
    unreachable!()
}

#[tokio::test]
async fn oversized_jwt_is_refused_and_the_broker_keeps_serving() {
    let h = common::start().await;
    let key = dev_jwt_key(&h);
    let (fits, over) = tokens_around_max_len(&h, &key);
    assert!(fits.len() <= MAX_JWT_LEN && over.len() > MAX_JWT_LEN);

    // The authenticator itself: the bound is checked before anything is decoded.
    let trust = StaticTrust::default().with_jwt("example.org", h.env.ca.jwt_bundle());
    let now = h.clock.now();
    validate_jwt_svid(&fits, &trust, BROKER_ID, now, secs(30))
        .expect("an otherwise valid token of at most MAX_JWT_LEN bytes is accepted");
    let err = validate_jwt_svid(&over, &trust, BROKER_ID, now, secs(30))
        .expect_err("a token over MAX_JWT_LEN is refused");
    assert!(
        err.reason
            .contains(&format!("token longer than {MAX_JWT_LEN} bytes")),
        "{err:?}"
    );
    let huge = "A".repeat(4 * MAX_JWT_LEN);
    let err = jose::split(&huge).expect_err("refused");
    assert!(err.0.contains("longer than"), "{err:?}");

    // Over the wire: refused (by the authenticator, or already by the HTTP/2 header-list
    // limit, which is no larger than MAX_JWT_LEN), nothing issued, and the same
    // connection keeps serving.
    let mut anon = anonymous_client(&h).await;
    let good_token = jwt_for(&h, &key, common::DEPLOY_AGENT);
    for (name, token) in [
        ("JWT of MAX_JWT_LEN+1 bytes", &over),
        ("JWT of 64 KiB", &huge),
    ] {
        let m = mark(&h);
        let got = within(
            name,
            anon.issue_credential(authed(common::gpu_request(600), Some(token))),
        )
        .await;
        match got {
            Ok(r) => panic!("[{name}] was accepted: {r:?}"),
            Err(s) if s.code() == Code::Unauthenticated => {
                assert_unauthenticated(
                    &h,
                    &m,
                    name,
                    "IssueCredential",
                    Err::<(), _>(s),
                    Some("jwt-svid"),
                    "longer than",
                );
            }
            Err(s) => {
                // Refused below the broker: no handler ran, so no ledger entry either.
                eprintln!(
                    "[{name}] refused by the transport: {:?} {:?}",
                    s.code(),
                    s.message()
                );
                assert!(entries_since(&h, &m).is_empty(), "[{name}] a handler ran");
                assert_eq!(h.lease_count(), m.leases, "[{name}] a lease was created");
            }
        }
        assert_serves(&h, &mut anon, Some(&good_token), name).await;
    }
}

#[tokio::test]
async fn bearer_tokens_around_max_jwt_len_reach_the_authenticator() {
    let h = common::start().await;
    let key = dev_jwt_key(&h);
    let (fits, over) = tokens_around_max_len(&h, &key);
    let mut anon = anonymous_client(&h).await;
    let mut problems = Vec::new();

    let before = h.lease_count();
    match within(
        "fits",
        anon.issue_credential(authed(common::gpu_request(600), Some(&fits))),
    )
    .await
    {
        Ok(_) => assert_eq!(h.lease_count(), before + 1),
        Err(s) => problems.push(format!(
            "a valid {}-byte token (<= MAX_JWT_LEN {MAX_JWT_LEN}) was refused: {:?} {:?}",
            fits.len(),
            s.code(),
            s.message()
        )),
    }

    let m = mark(&h);
    match within(
        "over",
        anon.issue_credential(authed(common::gpu_request(600), Some(&over))),
    )
    .await
    {
        Ok(r) => panic!("a token over MAX_JWT_LEN was accepted: {r:?}"),
        Err(s) if s.code() == Code::Unauthenticated => {
            assert_unauthenticated(
                &h,
                &m,
                "over",
                "IssueCredential",
                Err::<(), _>(s),
                Some("jwt-svid"),
                "longer than",
            );
        }
        Err(s) => problems.push(format!(
            "a {}-byte token (> MAX_JWT_LEN) got {:?} {:?} and {} ledger entries instead of UNAUTHENTICATED and an authn_failure entry",
            over.len(),
            s.code(),
            s.message(),
            entries_since(&h, &m).len()
        )),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn admin_reasons_refuse_control_characters() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let mut admin: AdminClient = h.admin_as(common::ROOT).await;
    let until = Some(prost_types::Timestamp {
        seconds: broker_now(&h) + 3600,
        nanos: 0,
    });
    let lock = |reason: &str| pb::CreateLockRequest {
        kind: "spiffe_id".into(),
        value: common::MODEL_RUNTIME.into(),
        until,
        reason: reason.into(),
    };
    let mut accepted = Vec::new();

    let held = within("issue", good.issue_credential(common::gpu_request(600)))
        .await
        .expect("issue")
        .into_inner()
        .lease
        .expect("lease")
        .id;
    let reason = "rotated\0\x1b[2J\nforged: entry";
    if within(
        "revoke",
        admin.revoke(pb::RevokeRequest {
            selector: Some(pb::revoke_request::Selector::LeaseId(held.clone())),
            reason: reason.into(),
            ..Default::default()
        }),
    )
    .await
    .is_ok()
    {
        accepted.push(format!(
            "Revoke with reason {reason:?} (lease {held} revoked)"
        ));
    }

    let reason = "maintenance\nforged: entry";
    if let Ok(l) = within("create lock", admin.create_lock(lock(reason))).await {
        accepted.push(format!("CreateLock with reason {reason:?}"));
        within(
            "cleanup",
            admin.delete_lock(pb::DeleteLockRequest {
                id: l.into_inner().id,
                reason: "cleanup".into(),
            }),
        )
        .await
        .expect("cleanup");
    }

    for (name, reason) in [
        ("empty", String::new()),
        ("NUL", "done\0".to_owned()),
        ("60 KiB", "r".repeat(60 * 1024)),
    ] {
        let id = within("lock", admin.create_lock(lock("maintenance")))
            .await
            .expect("a good lock")
            .into_inner()
            .id;
        if within(
            "delete lock",
            admin.delete_lock(pb::DeleteLockRequest {
                id,
                reason: reason.clone(),
            }),
        )
        .await
        .is_ok()
        {
            accepted.push(format!(
                "DeleteLock with a {name} reason ({} bytes)",
                reason.len()
            ));
        }
    }
    assert_serves(&h, &mut good, None, "after admin reasons").await;
    assert!(
        accepted.is_empty(),
        "free-text reasons with control characters or no bound were accepted:\n  {}",
        accepted.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// Malformed DER and over-long chains
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_der_client_certificates_fail_cleanly() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let (leaf, leaf_key) = dev_leaf(&h, common::DEPLOY_AGENT);
    let der = leaf.as_ref().to_vec();
    let mut der_like = vec![0x30, 0x82, 0x01, 0x00];
    der_like.extend(std::iter::repeat_n(0u8, 256));
    let mut trailing = der.clone();
    trailing.extend_from_slice(&[0x00, 0x00]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage bytes", b"this is not a certificate".to_vec()),
        ("DER header over zeros", der_like),
        ("leaf truncated to half", der[..der.len() / 2].to_vec()),
        ("leaf missing its last byte", der[..der.len() - 1].to_vec()),
        ("leaf with trailing bytes", trailing),
        ("empty certificate", Vec::new()),
    ];
    for (name, bytes) in cases {
        let case = format!("client certificate: {name}");
        let m = mark(&h);
        let outcome = present_chain(&h, &case, vec![CertificateDer::from(bytes)], &leaf_key).await;
        match outcome {
            Outcome::Accepted(r) => panic!("[{case}] was accepted: {r:?}"),
            Outcome::Refused(s) if s.code() == Code::Unauthenticated => {
                // The handshake let it through; authn refused it.
                assert_unauthenticated(
                    &h,
                    &m,
                    &case,
                    "IssueCredential",
                    Err::<(), _>(s),
                    Some("x509-svid"),
                    "leaf",
                );
            }
            other => {
                // The TLS layer refused it: a clean transport failure, no handler ran.
                if let Outcome::Refused(s) = &other {
                    assert!(
                        matches!(
                            s.code(),
                            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                        ),
                        "[{case}] unexpected code {s:?}"
                    );
                }
                eprintln!("[{case}] refused at the TLS layer: {other:?}");
                assert!(entries_since(&h, &m).is_empty(), "[{case}] a handler ran");
                assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
            }
        }
        assert_serves(&h, &mut good, None, &case).await;
    }
}

#[tokio::test]
async fn chains_longer_than_max_chain_len_are_unauthenticated() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let ca = h.env.ca.ca_der().clone();
    for extra in [MAX_CHAIN_LEN, MAX_CHAIN_LEN + 1, 64] {
        let case = format!("chain of {} certificates", extra + 1);
        let (leaf, key) = dev_leaf(&h, common::DEPLOY_AGENT);
        let mut chain = vec![leaf];
        chain.extend(std::iter::repeat_n(ca.clone(), extra));
        let m = mark(&h);
        let got = outcome_result(present_chain(&h, &case, chain, &key).await, &case);
        assert_unauthenticated(
            &h,
            &m,
            &case,
            "IssueCredential",
            got,
            Some("x509-svid"),
            "certificate chain too long",
        );
        assert_serves(&h, &mut good, None, &case).await;
    }

    // Boundary: exactly MAX_CHAIN_LEN certificates is accepted.
    let case = format!("chain of exactly {MAX_CHAIN_LEN} certificates");
    let (leaf, key) = dev_leaf(&h, common::DEPLOY_AGENT);
    let mut chain = vec![leaf];
    chain.extend(std::iter::repeat_n(ca, MAX_CHAIN_LEN - 1));
    let before = h.lease_count();
    match present_chain(&h, &case, chain, &key).await {
        Outcome::Accepted(_) => assert_eq!(h.lease_count(), before + 1),
        other => panic!("[{case}] must be accepted: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Malformed requests from authenticated callers
// ---------------------------------------------------------------------------------------

fn issue_with(f: impl FnOnce(&mut pb::IssueCredentialRequest)) -> pb::IssueCredentialRequest {
    let mut r = common::gpu_request(600);
    f(&mut r);
    r
}

fn intent_with(f: impl FnOnce(&mut pb::Intent)) -> pb::IssueCredentialRequest {
    issue_with(|r| f(r.intent.get_or_insert_with(Default::default)))
}

fn ttl(seconds: i64, nanos: i32) -> pb::IssueCredentialRequest {
    issue_with(|r| r.ttl = Some(prost_types::Duration { seconds, nanos }))
}

fn malformed_issue_requests() -> Vec<(&'static str, pb::IssueCredentialRequest, &'static str)> {
    let s = |v: &str| v.to_owned();
    let digest = "a".repeat(64);
    vec![
        // scopes
        (
            "33 distinct scopes",
            issue_with(|r| r.scopes = (0..=MAX_SCOPES).map(|i| format!("job:s{i}")).collect()),
            "at most 32 scopes",
        ),
        (
            "33 copies of one scope",
            issue_with(|r| r.scopes = vec![s("job:submit"); MAX_SCOPES + 1]),
            "at most 32 scopes",
        ),
        (
            "scope of 129 characters",
            issue_with(|r| r.scopes = vec!["j".repeat(129)]),
            "invalid scope",
        ),
        (
            "scope with NUL",
            issue_with(|r| r.scopes = vec![s("job:submit\0")]),
            "invalid scope",
        ),
        (
            "scope with space",
            issue_with(|r| r.scopes = vec![s("job submit")]),
            "invalid scope",
        ),
        (
            "scope with newline",
            issue_with(|r| r.scopes = vec![s("job:submit\njob:cancel")]),
            "invalid scope",
        ),
        (
            "empty scope",
            issue_with(|r| r.scopes = vec![String::new()]),
            "invalid scope",
        ),
        (
            "non-ASCII scope",
            issue_with(|r| r.scopes = vec![s("job:sübmit")]),
            "invalid scope",
        ),
        // profile
        (
            "profile of 65 characters",
            issue_with(|r| r.profile = "p".repeat(65)),
            "invalid profile name",
        ),
        (
            "profile of 10 KiB",
            issue_with(|r| r.profile = "p".repeat(10 * 1024)),
            "invalid profile name",
        ),
        (
            "multi-byte profile of 300 bytes",
            issue_with(|r| r.profile = "é".repeat(150)),
            "invalid profile name",
        ),
        (
            "upper-case profile",
            issue_with(|r| r.profile = s("GPU-SCHEDULER-SUBMIT")),
            "invalid profile name",
        ),
        (
            "profile with NUL",
            issue_with(|r| r.profile = s("gpu-scheduler-submit\0")),
            "invalid profile name",
        ),
        (
            "profile with path",
            issue_with(|r| r.profile = s("../gpu-scheduler-submit")),
            "invalid profile name",
        ),
        (
            "empty profile",
            issue_with(|r| r.profile = String::new()),
            "invalid profile name",
        ),
        // intent action / target
        (
            "action of 129 characters",
            intent_with(|i| i.action = "a".repeat(129)),
            "invalid intent action",
        ),
        (
            "target of 257 characters",
            intent_with(|i| i.target = "q".repeat(257)),
            "invalid intent target",
        ),
        (
            "action with NUL",
            intent_with(|i| i.action = s("submit-training\0")),
            "invalid intent action",
        ),
        (
            "action with newline",
            intent_with(|i| i.action = s("submit-training\nforged: line")),
            "invalid intent action",
        ),
        (
            "action with tab",
            intent_with(|i| i.action = s("submit\ttraining")),
            "invalid intent action",
        ),
        (
            "action with ANSI escape",
            intent_with(|i| i.action = s("\x1b[2Jsubmit-training")),
            "invalid intent action",
        ),
        (
            "action with DEL",
            intent_with(|i| i.action = s("submit-training\x7f")),
            "invalid intent action",
        ),
        (
            "action with leading space",
            intent_with(|i| i.action = s(" submit-training")),
            "invalid intent action",
        ),
        (
            "action with trailing space",
            intent_with(|i| i.action = s("submit-training ")),
            "invalid intent action",
        ),
        (
            "non-ASCII action",
            intent_with(|i| i.action = s("submit–training")),
            "invalid intent action",
        ),
        (
            "empty action with target",
            intent_with(|i| i.action = String::new()),
            "invalid intent action",
        ),
        (
            "target with NUL",
            intent_with(|i| i.target = s("queue/a100\0queue/h100")),
            "invalid intent target",
        ),
        (
            "target with CRLF",
            intent_with(|i| i.target = s("queue/a100\r\nqueue/h100")),
            "invalid intent target",
        ),
        (
            "empty target with action",
            intent_with(|i| i.target = String::new()),
            "invalid intent target",
        ),
        // intent details
        (
            "artifact_digest of 201 characters",
            intent_with(|i| i.artifact_digest = format!("sha256:{}", "a".repeat(194))),
            "invalid intent artifact_digest",
        ),
        (
            "artifact_digest not hex",
            intent_with(|i| i.artifact_digest = format!("sha256:{}", "g".repeat(64))),
            "invalid intent artifact_digest",
        ),
        (
            "artifact_digest upper-case hex",
            intent_with(|i| i.artifact_digest = format!("sha256:{}", "A".repeat(64))),
            "invalid intent artifact_digest",
        ),
        (
            "artifact_digest with NUL",
            intent_with(|i| i.artifact_digest = format!("sha256:{digest}\0")),
            "invalid intent artifact_digest",
        ),
        (
            "artifact_digest md5",
            intent_with(|i| i.artifact_digest = format!("md5:{}", "a".repeat(32))),
            "invalid intent artifact_digest",
        ),
        (
            "ticket of 65 characters",
            intent_with(|i| i.ticket = "T".repeat(65)),
            "invalid intent ticket",
        ),
        (
            "ticket with NUL",
            intent_with(|i| i.ticket = s("CHG-1\0")),
            "invalid intent ticket",
        ),
        (
            "ticket with space",
            intent_with(|i| i.ticket = s("CHG 1")),
            "invalid intent ticket",
        ),
        (
            "justification of 513 characters",
            intent_with(|i| i.justification = "j".repeat(513)),
            "invalid intent justification",
        ),
        (
            "justification with NUL",
            intent_with(|i| i.justification = s("because\0")),
            "invalid intent justification",
        ),
        (
            "justification with newline",
            intent_with(|i| i.justification = s("because\nforged: line")),
            "invalid intent justification",
        ),
        (
            "justification with leading space",
            intent_with(|i| i.justification = s(" because")),
            "invalid intent justification",
        ),
        (
            "9 on_behalf_of entries",
            intent_with(|i| i.on_behalf_of = vec![s(common::ALICE); 9]),
            "at most 8 entries",
        ),
        (
            "on_behalf_of entry of 257 characters",
            intent_with(|i| i.on_behalf_of = vec!["o".repeat(257)]),
            "invalid intent on_behalf_of",
        ),
        (
            "empty on_behalf_of entry",
            intent_with(|i| i.on_behalf_of = vec![String::new()]),
            "empty entry",
        ),
        (
            "on_behalf_of with NUL",
            intent_with(|i| i.on_behalf_of = vec![s("spiffe://example.org/ops/alice\0")]),
            "invalid intent on_behalf_of",
        ),
        (
            "on_behalf_of with space",
            intent_with(|i| i.on_behalf_of = vec![s("spiffe://example.org/ops/ alice")]),
            "invalid intent on_behalf_of",
        ),
        // TTL
        ("ttl with nanos", ttl(600, 1), "invalid ttl"),
        ("ttl with negative nanos", ttl(600, -1), "invalid ttl"),
        (
            "ttl with 999999999 nanos",
            ttl(600, 999_999_999),
            "invalid ttl",
        ),
        ("ttl of half a second", ttl(0, 500_000_000), "invalid ttl"),
        ("negative ttl", ttl(-600, 0), "invalid ttl"),
        (
            "negative ttl with negative nanos",
            ttl(-1, -1),
            "invalid ttl",
        ),
        ("zero ttl", ttl(0, 0), "invalid ttl"),
        ("ttl of i64::MIN", ttl(i64::MIN, 0), "invalid ttl"),
        ("ttl of i64::MAX", ttl(i64::MAX, 0), "invalid ttl"),
        (
            "ttl one second over the bound",
            ttl(7 * 86_400 + 1, 0),
            "invalid ttl",
        ),
        // other fields
        (
            "access_request_id not hex",
            issue_with(|r| r.access_request_id = s("not-a-request-id")),
            "invalid lease id",
        ),
        (
            "idempotency_key too short",
            issue_with(|r| r.idempotency_key = s("short")),
            "idempotency_key must be",
        ),
        (
            "idempotency_key too long",
            issue_with(|r| r.idempotency_key = "k".repeat(257)),
            "idempotency_key must be",
        ),
        (
            "idempotency_key with NUL",
            issue_with(|r| r.idempotency_key = format!("{}\0", "k".repeat(30))),
            "idempotency_key must be",
        ),
    ]
}

#[tokio::test]
async fn malformed_issue_requests_are_invalid_argument() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let cases = malformed_issue_requests();
    assert!(cases.len() >= 50);
    for (name, req, msg_has) in cases {
        let case = format!("IssueCredential: {name}");
        let m = mark(&h);
        let got = within(&case, good.issue_credential(req)).await;
        assert_invalid(&h, &m, &case, "IssueCredential", got, msg_has);
        assert_serves(&h, &mut good, None, &case).await;
    }
}

/// Lease ids that must not parse, derived from a real one so near-misses are covered.
fn bad_lease_ids(real: &str) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("empty", String::new()),
        ("not hex", "not-hex".to_owned()),
        ("32 non-hex characters", "z".repeat(32)),
        ("31 characters", real[..31].to_owned()),
        ("33 characters", format!("{real}0")),
        ("trailing NUL", format!("{real}\0")),
        ("leading space", format!(" {}", &real[1..])),
        ("non-hex first character", format!("g{}", &real[1..])),
        ("32 bytes of non-ASCII", "é".repeat(16)),
        ("0x prefix", format!("0x{}", &real[2..])),
        ("4 KiB", "a".repeat(4096)),
    ];
    let upper = real.to_uppercase();
    if upper != real {
        v.push(("upper-case copy of a real id", upper));
    }
    v
}

#[tokio::test]
async fn malformed_lease_ids_are_invalid_argument_everywhere() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let mut admin: AdminClient = h.admin_as(common::ROOT).await;
    let held = within("issue", good.issue_credential(common::gpu_request(600)))
        .await
        .expect("issue")
        .into_inner()
        .lease
        .expect("lease")
        .id;
    use pb::revoke_request::Selector;
    for (name, id) in bad_lease_ids(&held) {
        let case = format!("RenewLease: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            good.renew_lease(pb::RenewLeaseRequest {
                lease_id: id.clone(),
                ttl: None,
            }),
        )
        .await;
        assert_invalid(&h, &m, &case, "RenewLease", got, "invalid lease id");
        assert_serves(&h, &mut good, None, &case).await;

        let case = format!("ReleaseLease: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            good.release_lease(pb::ReleaseLeaseRequest {
                lease_id: id.clone(),
            }),
        )
        .await;
        assert_invalid(&h, &m, &case, "ReleaseLease", got, "invalid lease id");
        assert_serves(&h, &mut good, None, &case).await;

        for (what, selector) in [
            ("lease_id", Selector::LeaseId(id.clone())),
            ("access_request_id", Selector::AccessRequestId(id.clone())),
        ] {
            let case = format!("Revoke {what}: {name}");
            let m = mark(&h);
            let got = within(
                &case,
                admin.revoke(pb::RevokeRequest {
                    selector: Some(selector),
                    reason: "hostile input test".into(),
                    ..Default::default()
                }),
            )
            .await;
            assert_invalid(&h, &m, &case, "Revoke", got, "invalid lease id");
            assert_serves(&h, &mut good, None, &case).await;
        }
    }

    // A real lease id with a bad TTL.
    for (name, seconds, nanos) in [
        ("nanos", 600, 1),
        ("negative seconds", -600, 0),
        ("zero", 0, 0),
        ("i64::MAX", i64::MAX, 0),
    ] {
        let case = format!("RenewLease ttl: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            good.renew_lease(pb::RenewLeaseRequest {
                lease_id: held.clone(),
                ttl: Some(prost_types::Duration { seconds, nanos }),
            }),
        )
        .await;
        assert_invalid(&h, &m, &case, "RenewLease", got, "invalid ttl");
        assert_serves(&h, &mut good, None, &case).await;
    }

    // The held lease was never touched: still active, never renewed; then it renews
    // and releases normally.
    let listed = within(
        "list",
        admin.list_leases(pb::ListLeasesRequest {
            lease_id: held.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("list")
    .into_inner()
    .leases;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, pb::LeaseState::Active as i32);
    assert_eq!(listed[0].renewals, 0);
    within(
        "renew",
        good.renew_lease(pb::RenewLeaseRequest {
            lease_id: held.clone(),
            ttl: None,
        }),
    )
    .await
    .expect("a good renewal");
    within(
        "release",
        good.release_lease(pb::ReleaseLeaseRequest { lease_id: held }),
    )
    .await
    .expect("a good release");
}

#[tokio::test]
async fn unknown_enum_values_and_bad_filters_are_invalid_argument() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let mut admin: AdminClient = h.admin_as(common::ROOT).await;
    let mut approvals = ApprovalsClient::new(h.channel_as(&h.identity(common::ALICE).await).await);

    let list = |f: fn(&mut pb::ListLeasesRequest)| {
        let mut r = pb::ListLeasesRequest::default();
        f(&mut r);
        r
    };
    let list_cases: Vec<(&str, pb::ListLeasesRequest, &str)> = vec![
        ("state 99", list(|r| r.state = 99), "unknown lease state"),
        (
            "state 5 (one past the last)",
            list(|r| r.state = 5),
            "unknown lease state",
        ),
        ("state -1", list(|r| r.state = -1), "unknown lease state"),
        (
            "state i32::MAX",
            list(|r| r.state = i32::MAX),
            "unknown lease state",
        ),
        (
            "state i32::MIN",
            list(|r| r.state = i32::MIN),
            "unknown lease state",
        ),
        ("page_size 1001", list(|r| r.page_size = 1001), "page_size"),
        (
            "page_token garbage",
            list(|r| r.page_token = "garbage".into()),
            "malformed page_token",
        ),
        (
            "page_token time overflow",
            list(|r| r.page_token = format!("99999999999999999999:{}", "a".repeat(32))),
            "malformed page_token",
        ),
        (
            "page_token bad lease id",
            list(|r| r.page_token = "12:ZZZ".into()),
            "invalid lease id",
        ),
        (
            "lease_id not hex",
            list(|r| r.lease_id = "xyz".into()),
            "invalid lease id",
        ),
        (
            "spiffe_id with dot segment",
            list(|r| r.spiffe_id = "spiffe://example.org/ci/../ops/root".into()),
            "invalid spiffe_id",
        ),
    ];
    for (name, req, msg_has) in list_cases {
        let case = format!("ListLeases: {name}");
        let m = mark(&h);
        let got = within(&case, admin.list_leases(req)).await;
        assert_invalid(&h, &m, &case, "ListLeases", got, msg_has);
        assert_serves(&h, &mut good, None, &case).await;
    }

    for (name, filter, page_size, msg_has) in [
        ("filter 99", 99, 0, "unknown filter"),
        ("filter -1", -1, 0, "unknown filter"),
        ("page_size 1001", 0, 1001, "page_size"),
    ] {
        let case = format!("ListAccessRequests: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            approvals.list_access_requests(pb::ListAccessRequestsRequest { filter, page_size }),
        )
        .await;
        assert_invalid(&h, &m, &case, "ListAccessRequests", got, msg_has);
        assert_serves(&h, &mut good, None, &case).await;
    }

    use pb::revoke_request::Selector;
    for (name, selector, msg_has) in [
        ("no selector", None, "a selector is required"),
        (
            "all = false",
            Some(Selector::All(false)),
            "all must be true",
        ),
        (
            "spiffe_id with dot segment",
            Some(Selector::SpiffeId(
                "spiffe://example.org/ops/../ci/deploy-agent".into(),
            )),
            "invalid spiffe_id",
        ),
        (
            "spiffe_id without path",
            Some(Selector::SpiffeId("spiffe://example.org".into())),
            "must name a workload",
        ),
        (
            "spiffe_id_prefix with percent-encoding",
            Some(Selector::SpiffeIdPrefix(
                "spiffe://example.org/ci%2F".into(),
            )),
            "invalid spiffe_id_prefix",
        ),
        (
            "approver not a SPIFFE ID",
            Some(Selector::Approver("alice".into())),
            "invalid approver",
        ),
        (
            "upper-case profile",
            Some(Selector::Profile("GPU".into())),
            "invalid profile name",
        ),
    ] {
        let case = format!("Revoke: {name}");
        let m = mark(&h);
        let got = within(
            &case,
            admin.revoke(pb::RevokeRequest {
                selector,
                reason: "hostile input test".into(),
                ..Default::default()
            }),
        )
        .await;
        assert_invalid(&h, &m, &case, "Revoke", got, msg_has);
        assert_serves(&h, &mut good, None, &case).await;
    }

    // Controls: the same services answer well-formed requests.
    within(
        "list",
        admin.list_leases(pb::ListLeasesRequest {
            state: pb::LeaseState::Active as i32,
            ..Default::default()
        }),
    )
    .await
    .expect("a good ListLeases");
    within(
        "list access requests",
        approvals.list_access_requests(pb::ListAccessRequestsRequest::default()),
    )
    .await
    .expect("a good ListAccessRequests");
}

#[tokio::test]
async fn grpc_message_over_max_message_bytes_is_refused_and_the_connection_survives() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    for (name, size) in [
        ("MAX_MESSAGE_BYTES + 1", MAX_MESSAGE_BYTES + 1),
        ("1 MiB", 1 << 20),
        ("8 MiB", 8 << 20),
    ] {
        let case = format!("message of {name}");
        let req = intent_with(|i| i.justification = "x".repeat(size));
        let m = mark(&h);
        let got = within(&case, good.issue_credential(req)).await;
        let status = match got {
            Ok(r) => panic!("[{case}] was accepted: {r:?}"),
            Err(s) => s,
        };
        assert!(
            matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
            "[{case}] wrong code: {status:?}"
        );
        assert!(
            status.message().contains("too large")
                && status.message().contains(&MAX_MESSAGE_BYTES.to_string()),
            "[{case}] unclear message: {status:?}"
        );
        assert!(
            entries_since(&h, &m).is_empty(),
            "[{case}] the handler ran on an oversized message"
        );
        assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
        // The same connection keeps serving.
        assert_serves(&h, &mut good, None, &case).await;
    }

    // Just under the limit the message is decoded, and refused by validation instead:
    // the cut-off is the decoder's bound, not something smaller.
    let case = "message just under MAX_MESSAGE_BYTES";
    let req = intent_with(|i| i.justification = "x".repeat(MAX_MESSAGE_BYTES - 1024));
    let m = mark(&h);
    let got = within(case, good.issue_credential(req)).await;
    assert_invalid(
        &h,
        &m,
        case,
        "IssueCredential",
        got,
        "invalid intent justification",
    );
    assert_serves(&h, &mut good, None, case).await;

    // Unauthenticated senders are refused at the edge, before their message is decoded:
    // one authentication-failure entry (bounded per peer), and no handler runs.
    let mut anon = anonymous_client(&h).await;
    let case = "oversized message without credentials";
    let m = mark(&h);
    let got = within(
        case,
        anon.issue_credential(intent_with(|i| i.justification = "x".repeat(1 << 20))),
    )
    .await;
    let status = got.expect_err("refused");
    assert!(
        matches!(
            status.code(),
            Code::Unauthenticated | Code::ResourceExhausted | Code::OutOfRange
        ),
        "[{case}] wrong code: {status:?}"
    );
    assert!(
        entries_since(&h, &m)
            .iter()
            .all(|e| e["kind"] == "authn_failure"),
        "[{case}] the handler ran"
    );
    assert_serves(&h, &mut good, None, case).await;
}

/// `IssueCredentialRequest` as raw wire fields, to send what a typed client cannot.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBytesProfile {
    #[prost(bytes = "vec", tag = "1")]
    profile: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawVarintProfile {
    #[prost(uint64, tag = "1")]
    profile: u64,
}

async fn raw_issue<M: prost::Message + Default + Send + Sync + 'static>(
    channel: Channel,
    msg: M,
) -> Result<tonic::Response<pb::IssueCredentialResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<M, pb::IssueCredentialResponse>::default();
    grpc.unary(
        tonic::Request::new(msg),
        http::uri::PathAndQuery::from_static("/spiffe_broker.v1.CredentialBroker/IssueCredential"),
        codec,
    )
    .await
}

#[tokio::test]
async fn undecodable_protobuf_is_refused_before_the_handler() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let id = h.identity(common::DEPLOY_AGENT).await;
    let channel = h.channel_as(&id).await;
    for case in [
        "invalid UTF-8 in a string field",
        "wrong wire type for a string field",
    ] {
        let m = mark(&h);
        let got = if case.starts_with("invalid UTF-8") {
            let msg = RawBytesProfile {
                profile: b"gpu-scheduler-\xff\xfe".to_vec(),
            };
            within(case, raw_issue(channel.clone(), msg)).await
        } else {
            let msg = RawVarintProfile { profile: 7 };
            within(case, raw_issue(channel.clone(), msg)).await
        };
        let status = match got {
            Ok(r) => panic!("[{case}] was accepted: {r:?}"),
            Err(s) => s,
        };
        // tonic answers decode errors with INTERNAL (as grpc-go does).
        assert!(
            matches!(status.code(), Code::Internal | Code::InvalidArgument),
            "[{case}] wrong code: {status:?}"
        );
        assert!(
            status.message().contains("decode"),
            "[{case}] unclear message: {status:?}"
        );
        let new = entries_since(&h, &m);
        assert!(new.is_empty(), "[{case}] a handler ran: {new:?}");
        assert_eq!(h.lease_count(), m.leases, "[{case}] a lease was created");
        assert_serves(&h, &mut good, None, case).await;
    }
    // The raw channel itself still works for well-formed input.
    let mut same = BrokerClient::new(channel);
    assert_serves(&h, &mut same, None, "raw channel after decode errors").await;
}

#[tokio::test]
async fn intent_details_without_action_and_target_are_not_silently_dropped() {
    let h = common::start().await;
    let mut runtime = h.broker_as(common::MODEL_RUNTIME).await;
    let request = |intent: pb::Intent| pb::IssueCredentialRequest {
        profile: "dataset-read".into(),
        intent: Some(intent),
        ..Default::default()
    };
    // Control: the profile issues without any intent at all.
    let before = h.lease_count();
    within(
        "control",
        runtime.issue_credential(request(pb::Intent::default())),
    )
    .await
    .expect("dataset-read needs no intent");
    assert_eq!(h.lease_count(), before + 1);

    let cases = [
        (
            "ticket with NUL",
            pb::Intent {
                ticket: "CHG-1\0".into(),
                ..Default::default()
            },
            "invalid intent",
        ),
        (
            "justification with newline",
            pb::Intent {
                justification: "because\nforged: line".into(),
                ..Default::default()
            },
            "invalid intent",
        ),
        (
            "on_behalf_of with NUL",
            pb::Intent {
                on_behalf_of: vec!["spiffe://example.org/ops/alice\0".into()],
                ..Default::default()
            },
            "invalid intent",
        ),
        (
            "artifact_digest not hex",
            pb::Intent {
                artifact_digest: format!("sha256:{}", "g".repeat(64)),
                ..Default::default()
            },
            "invalid intent",
        ),
    ];
    // Refused as an incomplete intent (details need an action and a target), never
    // dropped: the message names the intent.
    for (name, intent, msg_has) in cases {
        let case = format!("details without action/target: {name}");
        let m = mark(&h);
        let got = within(&case, runtime.issue_credential(request(intent))).await;
        assert_invalid(&h, &m, &case, "IssueCredential", got, msg_has);
    }
}

#[tokio::test]
async fn lease_id_errors_name_the_real_rule() {
    let h = common::start().await;
    let mut good = h.broker_as(common::DEPLOY_AGENT).await;
    let case = "RenewLease: 31 hex characters";
    let m = mark(&h);
    let got = within(
        case,
        good.renew_lease(pb::RenewLeaseRequest {
            lease_id: "0123456789abcdef0123456789abcde".into(),
            ttl: None,
        }),
    )
    .await;
    let msg = assert_invalid(&h, &m, case, "RenewLease", got, "invalid lease id");
    assert!(
        msg.contains("32") && msg.contains("hex") && !msg.contains("1..=32"),
        "[{case}] the message does not state the rule (exactly 32 lower-case hex characters): {msg:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_hundred_concurrent_bad_tokens_do_not_break_the_broker() {
    const N: usize = 200;
    const CHANNELS: usize = 4;
    let h = common::start().await;
    let key = dev_jwt_key(&h);
    let now = broker_now(&h);
    let header = good_header(&key);
    let agent = common::DEPLOY_AGENT;
    let bad_tokens: Vec<String> = vec![
        "garbage".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        jwt_for(&h, &key, "spiffe://example.org/ci/deploy%2Dagent"),
        jwt_for(&h, &key, "spiffe://example.org/ci/../ops/root"),
        sign_raw(
            &key,
            header.as_bytes(),
            json!({ "sub": agent, "aud": [BROKER_ID], "exp": now - 3600 })
                .to_string()
                .as_bytes(),
        ),
        sign_raw(
            &key,
            header.as_bytes(),
            json!({ "sub": agent, "aud": ["spiffe://example.org/elsewhere"], "exp": now + 300 })
                .to_string()
                .as_bytes(),
        ),
        sign_raw(
            &key,
            header.as_bytes(),
            format!(
                r#"{{"sub":"{agent}","aud":["{BROKER_ID}"],"exp":{},"nest":{}}}"#,
                now + 300,
                nested_arrays(2000)
            )
            .as_bytes(),
        ),
        {
            // A valid token with one signature character changed.
            let mut t = jwt_for(&h, &key, agent).into_bytes();
            let i = t.len() - 10;
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            String::from_utf8(t).expect("ASCII")
        },
    ];
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(anonymous_client(&h).await);
    }
    let m = mark(&h);
    let unrecorded_before = unrecorded_failures(&h).await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut c = clients[i % CHANNELS].clone();
        let token = bad_tokens[i % bad_tokens.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.issue_credential(authed(common::gpu_request(600), Some(&token)))
                .await
        }));
    }
    let results = within(
        "200 concurrent bad tokens",
        futures::future::join_all(tasks),
    )
    .await;
    let mut codes = std::collections::BTreeMap::new();
    for r in results {
        let got = r.expect("task did not panic");
        let status = match got {
            Ok(resp) => panic!("a bad token was accepted: {resp:?}"),
            Err(s) => s,
        };
        if status.code() == Code::Unauthenticated {
            assert_eq!(status.message(), UNAUTHENTICATED_MESSAGE);
        }
        *codes
            .entry(format!("{:?}", status.code()))
            .or_insert(0usize) += 1;
    }
    assert_eq!(
        codes.get("Unauthenticated").copied(),
        Some(N),
        "every bad token must be refused as UNAUTHENTICATED: {codes:?}"
    );
    let failures = entries_since(&h, &m)
        .into_iter()
        .filter(|e| e["kind"] == "authn_failure")
        .count();
    // Every refusal is in the ledger, up to the per-peer limit; the rest are counted.
    let unrecorded = unrecorded_failures(&h).await - unrecorded_before;
    assert!(
        failures > 0 && failures <= AUTHN_FAILURE_RECORDS_PER_MINUTE as usize,
        "{failures} entries"
    );
    assert_eq!(
        failures + unrecorded,
        N,
        "every refusal is recorded or counted"
    );
    assert_eq!(h.lease_count(), m.leases, "a lease was created");

    // Every channel still serves a good bearer, and mTLS still works.
    let good_token = jwt_for(&h, &key, agent);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_serves(
            &h,
            c,
            Some(&good_token),
            &format!("channel {i} after the storm"),
        )
        .await;
    }
    let mut mtls = h.broker_as(agent).await;
    assert_serves(&h, &mut mtls, None, "mTLS after the storm").await;
}

/// `spiffe_broker_authn_failures_unrecorded_total` from `/metrics`.
async fn unrecorded_failures(h: &common::Harness) -> usize {
    let text = h.http_get("/metrics").await.1;
    text.lines()
        .find_map(|l| l.strip_prefix("spiffe_broker_authn_failures_unrecorded_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("unrecorded failures metric")
}
