//! Authentication attacks against a real dev broker: a generated corpus of bad
//! X.509-SVIDs and forged/bent JWT-SVIDs. Every refusal must be UNAUTHENTICATED (with
//! the one fixed client-facing message), leave an `authn_failure` entry in the ledger,
//! and create no lease. Each corpus ends with a control that succeeds, so the corpus
//! cannot pass merely because the client-side machinery is broken.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use spiffe::SpiffeId;
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::clock::Clock as _;
use spiffe_broker::crypto::{EcdsaP256Signer, Signer};
use spiffe_broker::dev::BROKER_ID;
use spiffe_broker::error::UNAUTHENTICATED_MESSAGE;
use spiffe_broker::jose::{b64, signing_input};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::workload::ca::svid_params;
use tonic::transport::Channel;

type BrokerClient = pb::credential_broker_client::CredentialBrokerClient<Channel>;

// ---------------------------------------------------------------------------------------
// Shared assertions
// ---------------------------------------------------------------------------------------

fn authn_failures(h: &Harness) -> Vec<Value> {
    h.audit_bodies()
        .into_iter()
        .filter(|b| b["kind"] == "authn_failure")
        .collect()
}

/// Sends `IssueCredential` and asserts: UNAUTHENTICATED with the fixed message, exactly
/// one new `authn_failure` ledger entry (for this RPC, with the expected method and a
/// reason containing `reason_has`), and no lease.
async fn assert_refused(
    h: &Harness,
    client: &mut BrokerClient,
    req: tonic::Request<pb::IssueCredentialRequest>,
    case: &str,
    method: Option<&str>,
    reason_has: &str,
) {
    let before = authn_failures(h).len();
    let leases_before = h.lease_count();
    let status = match client.issue_credential(req).await {
        Ok(_) => panic!("[{case}] was accepted; it must be refused"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        tonic::Code::Unauthenticated,
        "[{case}] wrong code: {status:?}"
    );
    assert_eq!(
        status.message(),
        UNAUTHENTICATED_MESSAGE,
        "[{case}] the client must see only the fixed message"
    );

    let after = authn_failures(h);
    assert_eq!(
        after.len(),
        before + 1,
        "[{case}] expected exactly one new authn_failure entry"
    );
    let entry = after.last().expect("entry");
    assert_eq!(entry["kind"], "authn_failure", "[{case}] {entry}");
    assert_eq!(entry["decision"], "deny", "[{case}] {entry}");
    assert_eq!(
        entry["request"]["rpc"], "IssueCredential",
        "[{case}] {entry}"
    );
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "[{case}] entry has no reason: {entry}");
    assert!(
        reason.contains(reason_has),
        "[{case}] refused for an unexpected reason: {reason:?} (expected it to mention {reason_has:?})"
    );
    match method {
        Some(m) => assert_eq!(entry["auth_method"], m, "[{case}] {entry}"),
        None => assert!(entry.get("auth_method").is_none(), "[{case}] {entry}"),
    }
    assert!(
        entry.get("lease_id").is_none() && entry.get("credential_sha256").is_none(),
        "[{case}] an authn failure must not reference a lease or credential: {entry}"
    );

    assert_eq!(leases_before, 0, "[{case}] precondition: no lease yet");
    assert_eq!(h.lease_count(), 0, "[{case}] a lease was created");
}

fn bundle(h: &Harness) -> Vec<CertificateDer<'static>> {
    vec![h.env.ca.ca_der().clone()]
}

// ---------------------------------------------------------------------------------------
// X.509-SVID corpus
// ---------------------------------------------------------------------------------------

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

/// A well-formed leaf for `uri` valid now, then `mutate`d to break one property.
fn leaf_params(uri: &str, mutate: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
    let now = spiffe_broker::clock::SystemClock.now();
    let mut p = svid_params(uri, now - secs(60), now + secs(3600)).expect("svid params");
    mutate(&mut p);
    p
}

/// A self-signed CA that is not the dev CA but copies its name and claims the same
/// trust domain, so only the key (signature) distinguishes it.
fn foreign_ca() -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "spiffe-broker dev");
    dn.push(DnType::CommonName, "example.org dev CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org".try_into().expect("ia5"),
    )];
    let now = spiffe_broker::clock::SystemClock.now();
    p.not_before = (now - secs(3600)).into();
    p.not_after = (now + secs(86_400)).into();
    let key = p256();
    let der = p.self_signed(&key).expect("self-signed").der().clone();
    (Issuer::new(p, key), der)
}

struct X509Case {
    name: &'static str,
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    reason_has: &'static str,
}

/// Signs `params` with the dev CA under a fresh key.
fn dev_signed(
    h: &Harness,
    name: &'static str,
    params: CertificateParams,
    reason_has: &'static str,
) -> X509Case {
    let key = p256();
    let cert = h.env.ca.sign(&params, &key).expect("dev CA signs");
    X509Case {
        name,
        chain: vec![cert],
        key,
        reason_has,
    }
}

fn x509_corpus(h: &Harness) -> Vec<X509Case> {
    let now = spiffe_broker::clock::SystemClock.now();
    let agent = common::DEPLOY_AGENT;
    let mut cases = vec![
        dev_signed(
            h,
            "two URI SANs",
            leaf_params(agent, |p| {
                p.subject_alt_names
                    .push(SanType::URI(common::ROOT.try_into().expect("ia5")));
            }),
            "more than one URI SAN",
        ),
        dev_signed(
            h,
            "CA certificate as leaf",
            leaf_params(agent, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }),
            "CA",
        ),
        dev_signed(
            h,
            "leaf with keyCertSign",
            leaf_params(agent, |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }),
            "keyCertSign",
        ),
        dev_signed(
            h,
            "leaf with cRLSign",
            leaf_params(agent, |p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
            }),
            "cRLSign",
        ),
        dev_signed(
            h,
            "leaf without digitalSignature",
            leaf_params(agent, |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::KeyEncipherment,
                    KeyUsagePurpose::ContentCommitment,
                ];
            }),
            "digitalSignature",
        ),
        dev_signed(
            h,
            "leaf without keyUsage",
            leaf_params(agent, |p| p.key_usages.clear()),
            "keyUsage",
        ),
        dev_signed(
            h,
            "wrong trust domain, signed by the dev CA",
            leaf_params("spiffe://other.org/x", |_| {}),
            "trust",
        ),
        dev_signed(
            h,
            "expired",
            svid_params(agent, now - secs(7200), now - secs(3600)).expect("params"),
            "expired",
        ),
        dev_signed(
            h,
            "not yet valid",
            svid_params(agent, now + secs(3600), now + secs(7200)).expect("params"),
            "not yet valid",
        ),
        dev_signed(
            h,
            "non-spiffe URI SAN",
            leaf_params("https://example.org/x", |_| {}),
            "invalid SPIFFE ID",
        ),
        dev_signed(
            h,
            "SPIFFE ID without path",
            leaf_params("spiffe://example.org", |_| {}),
            "no path",
        ),
        dev_signed(
            h,
            "no URI SAN",
            leaf_params(agent, |p| {
                p.subject_alt_names =
                    vec![SanType::DnsName("example.org".try_into().expect("dns"))];
            }),
            "URI SAN",
        ),
    ];

    // A different CA with the dev CA's name and trust domain signs a leaf for
    // example.org; presented alone and with the foreign CA as an "intermediate".
    let (foreign, foreign_der) = foreign_ca();
    for (name, with_ca) in [
        ("foreign CA (leaf only)", false),
        ("foreign CA (leaf + foreign CA in chain)", true),
    ] {
        let key = p256();
        let leaf = leaf_params(agent, |_| {})
            .signed_by(&key, &foreign)
            .expect("foreign CA signs")
            .der()
            .clone();
        let mut chain = vec![leaf];
        if with_ca {
            chain.push(foreign_der.clone());
        }
        cases.push(X509Case {
            name,
            chain,
            key,
            reason_has: "chain does not verify",
        });
    }

    // A leaf self-signed under its own key (no CA at all).
    let key = p256();
    let self_signed = leaf_params(agent, |_| {})
        .self_signed(&key)
        .expect("self-signed")
        .der()
        .clone();
    cases.push(X509Case {
        name: "self-signed leaf",
        chain: vec![self_signed],
        key,
        reason_has: "chain does not verify",
    });
    cases
}

fn files_identity(
    h: &Harness,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
) -> ClientIdentity {
    ClientIdentity::Files {
        chain,
        key: Arc::new(key.serialize_der()),
        bundle: bundle(h),
    }
}

#[tokio::test]
async fn x509_svid_corpus_is_refused_and_good_leaf_is_accepted() {
    let h = common::start().await;
    let cases = x509_corpus(&h);
    assert!(cases.len() >= 10);

    for case in cases {
        let identity = files_identity(&h, case.chain, &case.key);
        let mut client = BrokerClient::new(h.channel_as(&identity).await);
        assert_refused(
            &h,
            &mut client,
            tonic::Request::new(common::gpu_request(600)),
            case.name,
            Some("x509-svid"),
            case.reason_has,
        )
        .await;
    }

    // Control: the same construction, unbroken, is accepted and bound to the leaf.
    let key = p256();
    let leaf = h
        .env
        .ca
        .sign(&leaf_params(common::DEPLOY_AGENT, |_| {}), &key)
        .expect("dev CA signs");
    let thumb = b64(ring::digest::digest(&ring::digest::SHA256, leaf.as_ref()).as_ref());
    let identity = files_identity(&h, vec![leaf], &key);
    let mut client = BrokerClient::new(h.channel_as(&identity).await);
    let resp = client
        .issue_credential(common::gpu_request(600))
        .await
        .expect("a well-formed X.509-SVID from the dev CA is accepted")
        .into_inner();
    let claims = common::verify_jwt(&common::token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["sub"], common::DEPLOY_AGENT);
    assert_eq!(claims["cnf"]["x5t#S256"], thumb.as_str());
    assert_eq!(h.lease_count(), 1);
}

// ---------------------------------------------------------------------------------------
// JWT-SVID corpus
// ---------------------------------------------------------------------------------------

fn unix_now() -> i64 {
    spiffe_broker::clock::unix_seconds(spiffe_broker::clock::SystemClock.now())
}

/// The dev CA's JWT-SVID signing key, read from the state dir, so forged tokens differ
/// from valid ones only in the property under test.
fn dev_jwt_key(h: &Harness) -> EcdsaP256Signer {
    let bytes = std::fs::read(h.env.state_dir.join("dev-jwt.key")).expect("dev-jwt.key");
    let key = EcdsaP256Signer::from_pkcs8(&bytes).expect("P-256 PKCS#8");
    let bundle = h.env.ca.jwt_bundle();
    assert_eq!(
        bundle.keys[0].kid.as_deref(),
        Some(key.key_id()),
        "the state dir key is the dev JWT-SVID key"
    );
    key
}

fn claims(sub: &str, aud: &str, exp: i64) -> Value {
    json!({ "sub": sub, "aud": [aud], "exp": exp, "iat": unix_now() })
}

fn es256(key: &EcdsaP256Signer, header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims).expect("signing input");
    let sig = key.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims).expect("signing input");
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&k, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

fn eddsa(header: &Value, claims: &Value) -> String {
    use ring::signature::Ed25519KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519");
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519");
    let input = signing_input(header, claims).expect("signing input");
    format!("{input}.{}", b64(kp.sign(input.as_bytes()).as_ref()))
}

fn bearer(token: &str) -> tonic::Request<pb::IssueCredentialRequest> {
    bearer_raw(&format!("Bearer {token}"))
}

fn bearer_raw(value: &str) -> tonic::Request<pb::IssueCredentialRequest> {
    let mut req = tonic::Request::new(common::gpu_request(600));
    req.metadata_mut().insert(
        "authorization",
        value.parse().expect("ASCII metadata value"),
    );
    req
}

fn jwt_corpus(h: &Harness) -> Vec<(&'static str, String, &'static str)> {
    let key = dev_jwt_key(h);
    let kid = key.key_id().to_owned();
    let jwk = h.env.ca.jwt_bundle().keys[0].clone();
    let agent = common::DEPLOY_AGENT;
    let good = claims(agent, BROKER_ID, unix_now() + 300);
    let es_header = json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });

    // Public key bytes of the dev JWT key: the uncompressed point, and the JWK itself.
    let x = spiffe_broker::jose::unb64(jwk.x.as_deref().expect("x")).expect("x");
    let y = spiffe_broker::jose::unb64(jwk.y.as_deref().expect("y")).expect("y");
    let mut point = vec![4u8];
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let jwk_json = serde_json::to_vec(&jwk).expect("jwk json");
    let hs_header = json!({ "alg": "HS256", "kid": kid, "typ": "JWT" });

    let (fresh, _) = EcdsaP256Signer::generate().expect("fresh key");
    let fresh_header = json!({ "alg": "ES256", "kid": fresh.key_id(), "typ": "JWT" });

    let none_input = signing_input(&json!({ "alg": "none", "kid": kid, "typ": "JWT" }), &good)
        .expect("signing input");

    vec![
        ("alg none", format!("{none_input}."), "alg"),
        (
            "alg none carrying a valid ES256 signature",
            {
                let sig = key.sign(none_input.as_bytes()).expect("sign");
                format!("{none_input}.{}", b64(&sig))
            },
            "alg",
        ),
        (
            "HS256 keyed with the dev key's public point",
            hs256(&point, &hs_header, &good),
            "alg",
        ),
        (
            "HS256 keyed with the dev key's JWK JSON",
            hs256(&jwk_json, &hs_header, &good),
            "alg",
        ),
        (
            "EdDSA",
            eddsa(&json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" }), &good),
            "alg",
        ),
        (
            "wrong audience",
            h.env
                .ca
                .mint_jwt_svid(
                    &SpiffeId::new(agent).expect("id"),
                    &["spiffe://example.org/not-the-broker".to_owned()],
                    secs(300),
                )
                .expect("mint"),
            "audience",
        ),
        (
            "expired",
            es256(
                &key,
                &es_header,
                &json!({ "sub": agent, "aud": [BROKER_ID], "exp": unix_now() - 3600, "iat": unix_now() - 7200 }),
            ),
            "expired",
        ),
        (
            "unknown kid (fresh key)",
            es256(&fresh, &fresh_header, &good),
            "kid",
        ),
        (
            "dev kid, signed by a fresh key",
            es256(&fresh, &es_header, &good),
            "signature",
        ),
        (
            "extra jku header",
            es256(
                &key,
                &json!({ "alg": "ES256", "kid": kid, "typ": "JWT", "jku": "https://attacker.example/jwks.json" }),
                &good,
            ),
            "header",
        ),
        (
            "extra x5u header",
            es256(
                &key,
                &json!({ "alg": "ES256", "kid": kid, "typ": "JWT", "x5u": "https://attacker.example/cert.pem" }),
                &good,
            ),
            "header",
        ),
        (
            "sub in another trust domain, signed by the dev key",
            es256(
                &key,
                &es_header,
                &claims("spiffe://other.org/x", BROKER_ID, unix_now() + 300),
            ),
            "kid",
        ),
        ("not a JWT at all", "not-a-jwt".to_owned(), "malformed"),
        ("empty bearer", String::new(), "malformed"),
    ]
}

#[tokio::test]
async fn jwt_svid_attacks_are_refused_and_valid_jwt_svid_is_accepted() {
    let h = common::start().await;
    let anonymous = ClientIdentity::Anonymous { bundle: bundle(&h) };
    let mut client = BrokerClient::new(h.channel_as(&anonymous).await);

    for (name, token, reason_has) in jwt_corpus(&h) {
        assert_refused(
            &h,
            &mut client,
            bearer(&token),
            name,
            Some("jwt-svid"),
            reason_has,
        )
        .await;
    }
    // Authorization metadata that is not a Bearer credential at all.
    assert_refused(
        &h,
        &mut client,
        bearer_raw("Basic ZGVwbG95OmFnZW50"),
        "Basic authorization",
        Some("jwt-svid"),
        "Bearer",
    )
    .await;

    // Control: a JWT-SVID minted by the dev CA for the broker's audience is accepted,
    // and the credential is not sender-constrained (there is no certificate to bind).
    let token = h
        .env
        .ca
        .mint_jwt_svid(
            &SpiffeId::new(common::DEPLOY_AGENT).expect("id"),
            &[BROKER_ID.to_owned()],
            secs(300),
        )
        .expect("mint");
    let resp = client
        .issue_credential(bearer(&token))
        .await
        .expect("a valid JWT-SVID is accepted")
        .into_inner();
    let issued = common::verify_jwt(&common::token_of(&resp.credential), &h.jwks().await);
    assert_eq!(issued["sub"], common::DEPLOY_AGENT);
    assert!(
        issued.get("cnf").is_none(),
        "a JWT-SVID caller's credential must carry no cnf: {issued}"
    );
    assert_eq!(h.lease_count(), 1);
}

// ---------------------------------------------------------------------------------------
// No credential / no fallback
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn no_certificate_and_no_bearer_is_refused() {
    let h = common::start().await;
    let anonymous = ClientIdentity::Anonymous { bundle: bundle(&h) };
    let mut client = BrokerClient::new(h.channel_as(&anonymous).await);
    assert_refused(
        &h,
        &mut client,
        tonic::Request::new(common::gpu_request(600)),
        "no certificate, no bearer",
        None,
        "no client certificate and no bearer token",
    )
    .await;
}

/// A bad bearer token is not rescued by a valid client certificate on the same call.
#[tokio::test]
async fn bad_bearer_with_valid_certificate_is_refused() {
    let h = common::start().await;
    let key = p256();
    let leaf = h
        .env
        .ca
        .sign(&leaf_params(common::DEPLOY_AGENT, |_| {}), &key)
        .expect("dev CA signs");
    let identity = files_identity(&h, vec![leaf], &key);
    let mut client = BrokerClient::new(h.channel_as(&identity).await);
    let wrong_aud = h
        .env
        .ca
        .mint_jwt_svid(
            &SpiffeId::new(common::DEPLOY_AGENT).expect("id"),
            &["spiffe://example.org/not-the-broker".to_owned()],
            secs(300),
        )
        .expect("mint");
    assert_refused(
        &h,
        &mut client,
        bearer(&wrong_aud),
        "valid X.509-SVID + wrong-audience JWT-SVID",
        Some("jwt-svid"),
        "audience",
    )
    .await;
    assert_refused(
        &h,
        &mut client,
        bearer("not-a-jwt"),
        "valid X.509-SVID + garbage bearer",
        Some("jwt-svid"),
        "malformed",
    )
    .await;

    // Control: the same connection without the bad header is accepted.
    client
        .issue_credential(common::gpu_request(600))
        .await
        .expect("the certificate alone is accepted");
    assert_eq!(h.lease_count(), 1);
}

/// A flood of unauthenticated requests cannot grow the ledger without bound: each peer
/// gets a fixed number of entries per minute; the rest are refused the same way,
/// counted in a metric, and their number lands in that peer's next entry.
#[tokio::test]
async fn an_unauthenticated_flood_is_refused_but_bounded_in_the_ledger() {
    use spiffe_broker::broker::AUTHN_FAILURE_RECORDS_PER_MINUTE as LIMIT;
    let h = common::start().await;
    let anonymous = ClientIdentity::Anonymous { bundle: bundle(&h) };
    let mut client = BrokerClient::new(h.channel_as(&anonymous).await);
    let flood = LIMIT as usize + 40;
    for _ in 0..flood {
        let status = client
            .issue_credential(common::gpu_request(600))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), UNAUTHENTICATED_MESSAGE);
    }
    assert_eq!(
        authn_failures(&h).len(),
        LIMIT as usize,
        "one minute's worth"
    );
    let metrics = h.http_get("/metrics").await.1;
    assert!(
        metrics.contains("spiffe_broker_authn_failures_unrecorded_total 40"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("spiffe_broker_authn_failures_total {flood}")));

    // A minute later the peer's next failure is recorded and carries the count.
    h.clock.advance(Duration::from_secs(60));
    client
        .issue_credential(common::gpu_request(600))
        .await
        .expect_err("refused");
    let entries = authn_failures(&h);
    assert_eq!(entries.len(), LIMIT as usize + 1);
    let reason = entries.last().expect("entry")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(
        reason.contains("and 40 earlier failures from 127.0.0.1 not recorded"),
        "{reason}"
    );
    assert_eq!(h.lease_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Clock skew between client and broker
// ---------------------------------------------------------------------------------------

/// A caller whose clock differs from the broker's by less than `jwt_clock_skew` (30 s in
/// the demo) is accepted — a JWT-SVID issued "in the future" or expired a moment ago —
/// and beyond the tolerance it is refused, with the reason recorded.
#[tokio::test]
async fn jwt_svid_clock_skew_within_tolerance_is_accepted_beyond_it_refused() {
    let h = common::start().await;
    let anonymous = ClientIdentity::Anonymous { bundle: bundle(&h) };
    let mut client = BrokerClient::new(h.channel_as(&anonymous).await);
    let key = dev_jwt_key(&h);
    let header = json!({ "alg": "ES256", "kid": key.key_id(), "typ": "JWT" });
    let now = spiffe_broker::clock::unix_seconds(h.clock.now());
    let token = |iat: i64, nbf: i64, exp: i64| {
        es256(
            &key,
            &header,
            &json!({"sub": common::DEPLOY_AGENT, "aud": [BROKER_ID], "iat": iat, "nbf": nbf, "exp": exp}),
        )
    };
    // Beyond 30 s: refused as unauthenticated, with the reason, nothing issued.
    for (case, t, reason) in [
        (
            "issued 60 s in the future",
            token(now + 60, now + 60, now + 300),
            "not yet valid",
        ),
        (
            "expired 60 s ago",
            token(now - 300, now - 300, now - 60),
            "expired",
        ),
    ] {
        assert_refused(&h, &mut client, bearer(&t), case, Some("jwt-svid"), reason).await;
    }
    // Within 30 s: the client's clock runs 20 s ahead; or its token expired 20 s ago.
    for (case, t) in [
        (
            "issued 20 s in the broker's future",
            token(now + 20, now + 20, now + 300),
        ),
        (
            "expired 20 s ago on the broker's clock",
            token(now - 300, now - 300, now - 20),
        ),
    ] {
        client
            .issue_credential(bearer(&t))
            .await
            .unwrap_or_else(|e| panic!("{case}: within the skew tolerance: {e:?}"));
    }
    assert_eq!(h.lease_count(), 2);
}

/// X.509-SVID validity has no tolerance (unlike JWT-SVIDs): it is checked to the second on
/// the broker's clock, at every request, on the same connection — a chain remembered as
/// verified is not trusted past its leaf's notAfter. SVID issuers backdate notBefore for
/// skew (SPIRE by 10 s, the dev CA by 30 s), so the edges are where a skewed clock bites.
#[tokio::test]
async fn x509_svid_validity_edges_are_exact_on_the_brokers_clock() {
    let h = common::start().await;
    let now = h.clock.now();
    let key = p256();
    let leaf = h
        .env
        .ca
        .sign(
            &svid_params(common::DEPLOY_AGENT, now + secs(10), now + secs(70)).expect("params"),
            &key,
        )
        .expect("dev CA signs");
    let identity = files_identity(&h, vec![leaf], &key);
    let mut client = BrokerClient::new(h.channel_as(&identity).await);
    let req = || tonic::Request::new(common::gpu_request(600));

    // One second before notBefore (the clock's sub-second part is below the second).
    h.clock.advance(secs(9));
    assert_refused(
        &h,
        &mut client,
        req(),
        "1 s before notBefore",
        Some("x509-svid"),
        "not yet valid",
    )
    .await;
    // At notBefore and at notAfter, the same connection is accepted.
    h.clock.advance(secs(1));
    client
        .issue_credential(req())
        .await
        .expect("valid from notBefore");
    h.clock.advance(secs(60));
    client
        .issue_credential(req())
        .await
        .expect("valid until notAfter");
    assert_eq!(h.lease_count(), 2);
    // One second past notAfter: refused although this chain was verified a moment ago.
    h.clock.advance(secs(1));
    let status = client.issue_credential(req()).await.expect_err("expired");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let last = authn_failures(&h).pop().expect("an authn_failure entry");
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{last}"
    );
    assert_eq!(h.lease_count(), 2, "nothing issued to an expired SVID");
}
