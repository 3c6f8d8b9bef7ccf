//! The fuzz targets' logic on stable `cargo test`: every file of `fuzz/corpus/<target>/`
//! (the seeds) and `fuzz/regressions/<target>/` (minimised crashes) goes through the
//! same `run` the libFuzzer binaries call (`fuzz/src/`, compiled here as a module), so a
//! fixed crash stays fixed and the corpus is exercised on every CI run.
//!
//! The two ignored tests regenerate what the corpus is made of; see `fuzz/README.md`:
//! `cargo test --test fuzz_regressions -- --ignored regenerate_fuzz_fixtures` (new dev CA,
//! JWT key, log key and fixed clock), then, after that rebuild,
//! `cargo test --test fuzz_regressions -- --ignored regenerate_fuzz_corpus` (the seeds).

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs every corpus and regression file of `target`; names each input that failed.
fn replay(target: &str) {
    let run = harness::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .expect("known target");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.expect("dir entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(fuzz_dir().join("corpus"))),
        "fuzz/corpus/{target}/ has no seeds"
    );
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read input");
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs failed (panic message above each):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn issue_request() {
    replay("issue_request");
}

#[test]
fn x509_svid() {
    replay("x509_svid");
}

#[test]
fn jwt_svid() {
    replay("jwt_svid");
}

#[test]
fn csr() {
    replay("csr");
}

#[test]
fn policy() {
    replay("policy");
}

#[test]
fn audit_entry() {
    replay("audit_entry");
}

/// The harness's own invariants hold on what it generates.
#[test]
fn policy_encoding_round_trips() {
    for seed in seeds::policy_cases() {
        let bytes = seed.1.encode();
        assert_eq!(harness::policy::Case::decode(&bytes), seed.1, "{}", seed.0);
    }
}

/// The seeds named `valid`/`svid`/`allow` are accepted against the committed fixtures,
/// so the fuzzer starts from inputs that reach signature checks and Cedar (a fixture
/// regenerated without its corpus would leave the fuzzer stuck at the first refusal).
#[test]
fn seeds_reach_the_deep_paths() {
    use spiffe_broker::authn::{validate_jwt_svid, validate_x509_svid, SvidRole};
    use spiffe_broker::policy::{Decision, Policy as _};
    use spiffe_broker::store::export::ExportCheckpoint;

    let fx = harness::fixture::get();
    let seeds = |target: &str| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(fuzz_dir().join("corpus").join(target))
            .expect("corpus dir")
            .map(|e| {
                let p = e.expect("entry").path();
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, std::fs::read(&p).expect("read"))
            })
            .collect();
        v.sort();
        v
    };
    for (name, der) in seeds("x509_svid") {
        if name.starts_with("svid-") || name.starts_with("chain-") {
            let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
                harness::x509_svid::split_der(&der)
                    .into_iter()
                    .map(|c| c.to_vec().into())
                    .collect();
            validate_x509_svid(&chain, fx.trust.as_ref(), fx.now, SvidRole::Client)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    for (name, jwt) in seeds("jwt_svid") {
        let r = validate_jwt_svid(
            std::str::from_utf8(&jwt).expect("text"),
            fx.trust.as_ref(),
            spiffe_broker::dev::BROKER_ID,
            fx.now,
            harness::fixture::SKEW,
        );
        assert_eq!(r.is_ok(), name.starts_with("valid"), "{name}: {r:?}");
    }
    for (name, csr) in seeds("csr") {
        spiffe_broker::issuer::x509::parse_csr(&csr).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in seeds("policy") {
        let case = harness::policy::Case::decode(&bytes);
        let req = spiffe_broker::api::parse_issue_request(&case.request).expect("parses");
        let ctx = spiffe_broker::policy::RequestContext {
            now: case.now,
            auth_method: spiffe_broker::authn::AuthMethod::X509Svid,
            break_glass: case.break_glass,
            approvals: case.approvals.clone(),
            person_approvals_group: None,
        };
        let caller = spiffe::SpiffeId::new(&case.caller).expect("caller");
        let d = fx.policy.decide(&caller, &req, &ctx);
        let kind = match d {
            Decision::Allow(_) => "allow",
            Decision::RequireApproval(..) => "pending",
            Decision::Deny(_) => "deny",
        };
        assert!(name.starts_with(kind), "{name}: {d:?}");
    }
    let entries = fuzz_dir().join("corpus/audit_entry/entries.jsonl");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&entries, dir.path().join("entries.jsonl")).expect("copy");
    let note = std::fs::read_to_string(fuzz_dir().join("corpus/audit_entry/checkpoint-1.note"))
        .expect("note");
    let cp = fx.log_vkey.verify(&note).expect("seed note verifies");
    let line = serde_json::to_string(&ExportCheckpoint {
        size: cp.size,
        root: hex::encode(cp.root),
        time_ms: 0,
        note,
    })
    .expect("json");
    std::fs::write(dir.path().join("checkpoints.jsonl"), line + "\n").expect("write");
    let report = spiffe_broker::store::export::verify_export(dir.path(), Some(&fx.log_vkey))
        .expect("seed export verifies");
    assert_eq!((report.entries, report.checkpoints), (5, 1));
}

#[test]
#[ignore = "writes fuzz/fixtures/: new test-only dev CA, JWT key, log key and clock"]
fn regenerate_fuzz_fixtures() {
    seeds::fixtures();
}

#[test]
#[ignore = "writes fuzz/corpus/ from the compiled-in fuzz/fixtures/"]
fn regenerate_fuzz_corpus() {
    seeds::corpus();
}

/// Real inputs, made by the broker's own code, for the seed corpus.
mod seeds {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use prost::Message as _;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use spiffe_broker::audit::{AuditEvent, EventKind, RequestRecord};
    use spiffe_broker::checkpoint::LogSigner;
    use spiffe_broker::clock::{from_unix_seconds, Clock as _, SystemClock};
    use spiffe_broker::config::LedgerConfig;
    use spiffe_broker::crypto::{EcdsaP256Signer, RsaSigner, Signer as _};
    use spiffe_broker::dev::{BROKER_ID, DEMO_IDS, TRUST_DOMAIN};
    use spiffe_broker::domain::{Intent, Review, Verdict};
    use spiffe_broker::jose::{b64, signing_input};
    use spiffe_broker::metrics::Metrics;
    use spiffe_broker::proto::v1 as pb;
    use spiffe_broker::store::{export, LedgerOp, SqliteStore, Store as _};
    use spiffe_broker::workload::ca::svid_params;
    use spiffe_broker::workload::DevCa;

    use super::{fuzz_dir, harness};
    use harness::fixture;
    use harness::policy::Case;

    const LOG_NAME: &str = "example.org/spiffe-broker/audit";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn write(target: &str, name: &str, bytes: &[u8]) {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }

    /// New fixtures: dev CA and JWT key (`DevCa`), log key, and the fixed clock (now).
    pub fn fixtures() {
        let dir = fuzz_dir().join("fixtures");
        let ca_dir = dir.join("dev-ca");
        let _ = std::fs::remove_dir_all(&ca_dir);
        DevCa::load_or_create(&ca_dir, TRUST_DOMAIN).expect("dev CA");
        let log = tempfile::tempdir().expect("tempdir");
        let signer = LogSigner::load_or_create(log.path(), LOG_NAME).expect("log key");
        std::fs::write(log.path().join("log.vkey"), signer.vkey()).expect("vkey");
        std::fs::copy(log.path().join("log.vkey"), dir.join("log.vkey")).expect("copy vkey");
        std::fs::copy(
            log.path().join("log-ed25519.p8"),
            dir.join("log-ed25519.p8"),
        )
        .expect("copy log key");
        let now = SystemClock.unix_seconds();
        std::fs::write(dir.join("now"), format!("{now}\n")).expect("now");
    }

    /// Every seed, from the compiled-in fixtures.
    pub fn corpus() {
        let _ = std::fs::remove_dir_all(fuzz_dir().join("corpus"));
        let csrs = csr();
        x509_svid();
        jwt_svid();
        issue_request(&csrs[0].1);
        for (name, case) in policy_cases() {
            write("policy", name, &case.encode());
        }
        audit_entry();
    }

    fn csr() -> Vec<(&'static str, Vec<u8>)> {
        let (_, rsa) = RsaSigner::generate().expect("RSA key");
        let keys = [
            (
                "p256",
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"),
            ),
            (
                "p384",
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key"),
            ),
            (
                "ed25519",
                KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key"),
            ),
            (
                "rsa2048",
                KeyPair::try_from(rsa.as_slice()).expect("RSA key pair"),
            ),
        ];
        let mut out = Vec::new();
        for (name, key) in &keys {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "gpu-node-7");
            p.distinguished_name = dn;
            let csr = p.serialize_request(key).expect("CSR");
            write("csr", &format!("{name}.der"), csr.der());
            out.push((*name, csr.der().to_vec()));
        }
        // PEM, and one asking for far more than it gets (SANs, CA, key usages).
        let key = &keys[0].1;
        let mut p = CertificateParams::new(vec!["admin.example.org".to_owned()]).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/ops/root".try_into().expect("uri"),
        ));
        let greedy = p.serialize_request(key).expect("CSR");
        write(
            "csr",
            "p256-greedy.pem",
            greedy.pem().expect("PEM").as_bytes(),
        );
        write("csr", "p256-greedy.der", greedy.der());
        out
    }

    fn x509_svid() {
        let fx = fixture::get();
        let ca = &fx.ca;
        let now = fixture::now_unix();
        let from = from_unix_seconds(now - 86_400);
        let until = from_unix_seconds(now + 10 * 365 * 86_400);
        let sign = |p: &CertificateParams| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            ca.sign(p, &key).expect("sign").as_ref().to_vec()
        };
        for id in &DEMO_IDS[..3] {
            let name = id.rsplit('/').next().expect("name");
            let p = svid_params(id, from, until).expect("params");
            write("x509_svid", &format!("svid-{name}.der"), &sign(&p));
        }
        let id = DEMO_IDS[0];
        let mut p = svid_params(id, from, until).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write("x509_svid", "bad-leaf-is-ca.der", &sign(&p));
        let mut p = svid_params(id, from, until).expect("params");
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/ops/root".try_into().expect("uri"),
        ));
        write("x509_svid", "bad-two-uri-sans.der", &sign(&p));
        let p = svid_params("spiffe://other.org/ci/deploy-agent", from, until).expect("params");
        write("x509_svid", "bad-foreign-trust-domain.der", &sign(&p));
        let p = svid_params(
            id,
            from_unix_seconds(now - 7200),
            from_unix_seconds(now - 3600),
        )
        .expect("params");
        write("x509_svid", "bad-expired.der", &sign(&p));
        let mut p = svid_params(id, from, until).expect("params");
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        write("x509_svid", "bad-key-cert-sign.der", &sign(&p));
        write("x509_svid", "dev-ca.der", ca.ca_der().as_ref());

        // leaf ‖ intermediate: an intermediate CA under the dev CA signs the leaf.
        let mut ip = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fuzz intermediate");
        ip.distinguished_name = dn;
        ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ip.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{TRUST_DOMAIN}").try_into().expect("uri"),
        )];
        ip.not_before = time::OffsetDateTime::from_unix_timestamp(now - 86_400).expect("t");
        ip.not_after = time::OffsetDateTime::from_unix_timestamp(now + 3650 * 86_400).expect("t");
        let ikey = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let inter = ca.sign(&ip, &ikey).expect("intermediate");
        let issuer = rcgen::Issuer::new(ip, ikey);
        let lkey = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = svid_params(DEMO_IDS[1], from, until)
            .expect("params")
            .signed_by(&lkey, &issuer)
            .expect("leaf");
        let mut chain = leaf.der().to_vec();
        chain.extend_from_slice(inter.as_ref());
        write("x509_svid", "chain-leaf-intermediate.der", &chain);

        // SPIFFE ID text (the non-DER half of the target).
        let ids = [
            ("id-deploy-agent.txt", DEMO_IDS[0]),
            ("id-no-path.txt", "spiffe://example.org"),
            ("id-upper-case.txt", "SPIFFE://Example.org/ci/deploy-agent"),
            ("id-dot-segment.txt", "spiffe://example.org/ci/../ops/root"),
            ("id-percent.txt", "spiffe://example.org/ci%2Fdeploy"),
            ("id-port.txt", "spiffe://example.org:443/ci/deploy-agent"),
            ("id-query.txt", "spiffe://example.org/ci/deploy-agent?x=1#y"),
        ];
        for (name, id) in ids {
            write("x509_svid", name, id.as_bytes());
        }
    }

    fn jwt(header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let signer = EcdsaP256Signer::from_pkcs8(fixture::JWT_KEY).expect("JWT key");
        let input = signing_input(header, claims).expect("signing input");
        let sig = signer.sign(input.as_bytes()).expect("sign");
        format!("{input}.{}", b64(&sig))
    }

    fn jwt_svid() {
        use serde_json::json;
        let signer = EcdsaP256Signer::from_pkcs8(fixture::JWT_KEY).expect("JWT key");
        let kid = signer.key_id().to_owned();
        let now = fixture::now_unix();
        let h = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let c = |sub: &str, aud: serde_json::Value, exp: i64| json!({"sub": sub, "aud": aud, "exp": exp, "iat": now - 60});
        let far = now + 10 * 365 * 86_400;
        let seeds = [
            (
                "valid.jwt",
                jwt(&h, &c(DEMO_IDS[0], json!([BROKER_ID]), far)),
            ),
            (
                "valid-aud-string.jwt",
                jwt(&h, &c(DEMO_IDS[1], json!(BROKER_ID), far)),
            ),
            (
                "valid-nbf.jwt",
                jwt(
                    &json!({"alg": "ES256", "kid": kid}),
                    &json!({"sub": DEMO_IDS[2], "aud": [BROKER_ID, "other"], "exp": far, "nbf": now - 5}),
                ),
            ),
            (
                "bad-audience.jwt",
                jwt(&h, &c(DEMO_IDS[0], json!(["gpu-scheduler"]), far)),
            ),
            (
                "bad-expired.jwt",
                jwt(&h, &c(DEMO_IDS[0], json!([BROKER_ID]), now - 3600)),
            ),
            (
                "bad-no-path.jwt",
                jwt(&h, &c("spiffe://example.org", json!([BROKER_ID]), far)),
            ),
            (
                "bad-jku.jwt",
                jwt(
                    &json!({"alg": "ES256", "kid": kid, "jku": "http://127.0.0.1/jwks"}),
                    &c(DEMO_IDS[0], json!([BROKER_ID]), far),
                ),
            ),
            (
                "bad-alg-none.jwt",
                format!(
                    "{}.{}.",
                    b64(br#"{"alg":"none"}"#),
                    b64(c(DEMO_IDS[0], json!([BROKER_ID]), far)
                        .to_string()
                        .as_bytes())
                ),
            ),
            (
                "bad-rs256-with-ec-key.jwt",
                jwt(
                    &json!({"alg": "RS256", "kid": kid}),
                    &c(DEMO_IDS[0], json!([BROKER_ID]), far),
                ),
            ),
        ];
        for (name, token) in seeds {
            write("jwt_svid", name, token.as_bytes());
        }
    }

    fn issue_request(csr_der: &[u8]) {
        let intent = |action: &str, target: &str| pb::Intent {
            action: action.into(),
            target: target.into(),
            ..Default::default()
        };
        let seeds = [
            (
                "gpu-scheduler-submit.pb",
                pb::IssueCredentialRequest {
                    profile: "gpu-scheduler-submit".into(),
                    scopes: vec!["job:submit".into(), "job:read".into()],
                    ttl: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    intent: Some(intent("submit-training", "queue/a100")),
                    ..Default::default()
                },
            ),
            (
                "model-registry-push-break-glass.pb",
                pb::IssueCredentialRequest {
                    profile: "model-registry-push".into(),
                    scopes: vec!["push".into()],
                    intent: Some(pb::Intent {
                        artifact_digest: DIGEST.into(),
                        ticket: "CHG-1234".into(),
                        justification: "incident 42: registry down, hotfix".into(),
                        on_behalf_of: vec!["spiffe://example.org/ops/alice".into()],
                        ..intent("push-model", "ml/models")
                    }),
                    break_glass: true,
                    idempotency_key: "Zk3q9wP0xN2vR7tL5mH8cB1d".into(),
                    ..Default::default()
                },
            ),
            (
                "model-registry-push-redeem.pb",
                pb::IssueCredentialRequest {
                    profile: "model-registry-push".into(),
                    intent: Some(pb::Intent {
                        artifact_digest: DIGEST.into(),
                        ticket: "CHG-1234".into(),
                        ..intent("push-model", "ml/models")
                    }),
                    access_request_id: "0123456789abcdef0123456789abcdef".into(),
                    ..Default::default()
                },
            ),
            (
                "gpu-node-cert-csr.pb",
                pb::IssueCredentialRequest {
                    profile: "gpu-node-cert".into(),
                    ttl: Some(prost_types::Duration {
                        seconds: 1800,
                        nanos: 0,
                    }),
                    csr: csr_der.to_vec(),
                    ..Default::default()
                },
            ),
            (
                "dataset-read-defaults.pb",
                pb::IssueCredentialRequest {
                    profile: "dataset-read".into(),
                    ..Default::default()
                },
            ),
        ];
        for (name, r) in seeds {
            write("issue_request", name, &r.encode_to_vec());
        }
    }

    /// Real requests of the demo: allowed, pending approval, break-glass, refused.
    pub fn policy_cases() -> Vec<(&'static str, Case)> {
        let now = fixture::now_unix();
        let [deploy, runtime, gpu, alice, _bob, _root, _scheduler] = DEMO_IDS else {
            panic!("seven demo identities")
        };
        let req = |profile: &str, scopes: &[&str], ttl: Option<i64>, intent: Option<pb::Intent>| {
            pb::IssueCredentialRequest {
                profile: profile.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ttl: ttl.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                intent,
                ..Default::default()
            }
        };
        let intent = |action: &str, target: &str| pb::Intent {
            action: action.into(),
            target: target.into(),
            ..Default::default()
        };
        let push = pb::Intent {
            artifact_digest: DIGEST.into(),
            ticket: "CHG-1234".into(),
            ..intent("push-model", "ml/models")
        };
        let case = |caller: &str, request, approvals: &[&str], break_glass: bool| Case {
            caller: caller.into(),
            x509: true,
            break_glass,
            request,
            approvals: approvals.iter().map(|s| (*s).to_owned()).collect(),
            now,
        };
        vec![
            (
                "allow-dataset-read-default",
                case(runtime, req("dataset-read", &[], None, None), &[], false),
            ),
            (
                "allow-gpu-scheduler-submit",
                case(
                    gpu,
                    req(
                        "gpu-scheduler-submit",
                        &["job:submit"],
                        Some(600),
                        Some(intent("submit-training", "queue/a100")),
                    ),
                    &[],
                    false,
                ),
            ),
            (
                "allow-registry-push-approved",
                case(
                    deploy,
                    req(
                        "model-registry-push",
                        &["push", "pull"],
                        Some(600),
                        Some(push.clone()),
                    ),
                    &[alice],
                    false,
                ),
            ),
            (
                "pending-registry-push",
                case(
                    deploy,
                    req("model-registry-push", &["push"], None, Some(push.clone())),
                    &[deploy],
                    false,
                ),
            ),
            (
                "allow-registry-push-break-glass",
                case(
                    deploy,
                    req(
                        "model-registry-push",
                        &["push"],
                        Some(300),
                        Some(pb::Intent {
                            justification: "incident 42: registry down, hotfix".into(),
                            ..push.clone()
                        }),
                    ),
                    &[],
                    true,
                ),
            ),
            (
                "allow-gpu-node-cert",
                case(gpu, req("gpu-node-cert", &[], Some(1800), None), &[], false),
            ),
            (
                "allow-s3-datasets",
                case(
                    runtime,
                    req(
                        "s3-datasets",
                        &["s3:GetObject", "s3:ListBucket"],
                        None,
                        Some(intent("read-dataset", "arn:aws:s3:::training-data/*")),
                    ),
                    &[],
                    false,
                ),
            ),
            (
                "allow-registry-pull",
                case(
                    runtime,
                    req(
                        "model-registry-pull",
                        &[],
                        None,
                        Some(intent("pull-model", "ml/models")),
                    ),
                    &[],
                    false,
                ),
            ),
            (
                "deny-over-ttl",
                case(
                    runtime,
                    req("dataset-read", &["dataset:read"], Some(7200), None),
                    &[],
                    false,
                ),
            ),
            (
                "deny-over-scope",
                case(
                    runtime,
                    req("dataset-read", &["dataset:read", "job:admin"], None, None),
                    &[],
                    false,
                ),
            ),
            (
                "deny-unregistered",
                case(
                    "spiffe://example.org/unregistered",
                    req("dataset-read", &[], None, None),
                    &[],
                    false,
                ),
            ),
            (
                "deny-wrong-role",
                case(gpu, req("dataset-read", &[], None, None), &[], false),
            ),
        ]
    }

    fn audit_entry() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = dir.path().join("ledger.db");
            let store = SqliteStore::open(
                &db,
                &LedgerConfig {
                    commit_timeout: Duration::from_secs(5),
                    busy_timeout: Duration::from_secs(2),
                    max_batch: 16,
                    postgres_sslmode: None,
                    postgres_ca_file: None,
                },
                Arc::new(Metrics::new()),
            )
            .expect("ledger");
            let t = fixture::now_unix() * 1000;
            let intent = Intent::parse("push-model", "ml/models")
                .and_then(|i| i.with_details(DIGEST, "CHG-1234", "", &[]))
                .expect("intent");
            let mut events = Vec::new();
            let mut e = AuditEvent::new(t, EventKind::System, "allow");
            e.reason = Some("broker started".into());
            events.push(e);
            let mut e = AuditEvent::new(t + 1, EventKind::Issue, "allow");
            e.caller = Some(DEMO_IDS[1].into());
            e.auth_method = Some("x509-svid".into());
            e.cert_sha256 = Some("ab".repeat(32));
            e.request = Some(RequestRecord {
                rpc: "IssueCredential".into(),
                profile: Some("dataset-read".into()),
                scopes: vec!["dataset:read".into()],
                ttl_secs: Some(900),
                intent: None,
                delegation: None,
            });
            e.rule = Some("model-serving/dataset-read".into());
            e.policy_hash = Some("cd".repeat(32));
            e.granted_scopes = vec!["dataset:read".into()];
            e.lease_id = Some("0123456789abcdef0123456789abcdef".into());
            e.credential_sha256 = Some("ef".repeat(32));
            e.expires_at = Some(t / 1000 + 900);
            events.push(e);
            let mut e = AuditEvent::new(t + 2, EventKind::AuthnFailure, "deny");
            e.claimed_id = Some("spiffe://example.org/ops/root".into());
            e.auth_method = Some("jwt-svid".into());
            e.reason = Some("JWT-SVID signature refused: bad signature".into());
            events.push(e);
            let mut e = AuditEvent::new(t + 3, EventKind::Issue, "allow");
            e.caller = Some(DEMO_IDS[0].into());
            e.request = Some(RequestRecord {
                rpc: "IssueCredential".into(),
                profile: Some("model-registry-push".into()),
                scopes: vec!["push".into()],
                ttl_secs: None,
                intent: Some(intent),
                delegation: None,
            });
            e.access_request_id = Some("fedcba9876543210fedcba9876543210".into());
            e.approvals = vec![Review {
                reviewer: DEMO_IDS[3].into(),
                verdict: Verdict::Approve,
                reason: "ticket CHG-1234 checked".into(),
                at: t / 1000,
                post_review: false,
            }];
            e.break_glass = true;
            e.lease_id = Some("00112233445566778899aabbccddeeff".into());
            events.push(e);
            let mut e = AuditEvent::new(t + 4, EventKind::Revoke, "allow");
            e.caller = Some(DEMO_IDS[5].into());
            e.affected_leases = vec!["0123456789abcdef0123456789abcdef".into()];
            e.reason = Some("compromised".into());
            events.push(e);
            for event in events {
                store
                    .apply(LedgerOp::Record { event })
                    .await
                    .expect("record");
            }
            let log_dir = tempfile::tempdir().expect("tempdir");
            std::fs::copy(
                fuzz_dir().join("fixtures").join("log-ed25519.p8"),
                log_dir.path().join("log-ed25519.p8"),
            )
            .expect("log key fixture");
            let signer =
                Arc::new(LogSigner::load_or_create(log_dir.path(), LOG_NAME).expect("log key"));
            store
                .apply(LedgerOp::Checkpoint {
                    signer: signer.clone(),
                    time_ms: t + 5,
                })
                .await
                .expect("checkpoint");
            let out = dir.path().join("export");
            export::export(&store, &signer.vkey(), &out)
                .await
                .expect("export");
            export::verify_export(&out, None).expect("the export verifies");
            seed_files(&out);
        });
    }

    fn seed_files(out: &Path) {
        let entries = std::fs::read_to_string(out.join("entries.jsonl")).expect("entries");
        write("audit_entry", "entries.jsonl", entries.as_bytes());
        for (n, line) in entries.lines().enumerate() {
            write(
                "audit_entry",
                &format!("entry-{}.json", n + 1),
                line.as_bytes(),
            );
        }
        let cps = std::fs::read_to_string(out.join("checkpoints.jsonl")).expect("checkpoints");
        for (n, line) in cps.lines().enumerate() {
            let c: export::ExportCheckpoint = serde_json::from_str(line).expect("checkpoint");
            write(
                "audit_entry",
                &format!("checkpoint-{}.note", n + 1),
                c.note.as_bytes(),
            );
        }
        let vkey = std::fs::read_to_string(out.join("log.vkey")).expect("vkey");
        write("audit_entry", "log.vkey", vkey.as_bytes());
    }
}
