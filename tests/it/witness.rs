//! Witnesses (C2SP tlog-witness, tlog-cosignature): a real `Witness` over HTTP, real
//! SQLite ledgers signed by one log key, the broker's `Submitter`. What an operator who
//! holds the log key can do — show a witness another tree of the same size, roll back,
//! restore an old backup, rewrite every checkpoint — gets no cosignature, and an auditor
//! with a witness policy catches a rewrite even when every checkpoint row was replaced.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe_broker::audit::{AuditEvent, EventKind};
use spiffe_broker::checkpoint::{LogSigner, VerifierKey};
use spiffe_broker::clock::ManualClock;
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::cosignature::{Cosigner, CosignerKey, WitnessPolicy};
use spiffe_broker::http_client::{HttpClient, Options, Trust};
use spiffe_broker::metrics::Metrics;
use spiffe_broker::store::{Cosignature, LedgerOp, SqliteStore, Store, StoredCheckpoint};
use spiffe_broker::witness::service::Witness;
use spiffe_broker::witness::submit::{Submitter, WitnessTarget};
use spiffe_broker::witness::{checkpoint_path, AddCheckpoint};

const ORIGIN: &str = "example.org/spiffe-broker/audit";

fn open(path: &Path) -> Arc<dyn Store> {
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(5),
        busy_timeout: Duration::from_secs(2),
        max_batch: 64,
        postgres_sslmode: None,
        postgres_ca_file: None,
    };
    Arc::new(SqliteStore::open(path, &cfg, Arc::new(Metrics::new())).expect("open ledger"))
}

/// Appends entries named `tags` (deterministic: two stores given the same tags hold the
/// same tree), then signs a checkpoint.
async fn grow(store: &dyn Store, signer: &Arc<LogSigner>, tags: &[&str]) -> StoredCheckpoint {
    for tag in tags {
        let mut event = AuditEvent::new(1_000, EventKind::Revoke, "allow");
        event.reason = Some((*tag).to_owned());
        store
            .apply(LedgerOp::Record { event })
            .await
            .expect("append");
    }
    store
        .apply(LedgerOp::Checkpoint {
            signer: signer.clone(),
            time_ms: 1,
        })
        .await
        .expect("checkpoint")
        .checkpoint
        .expect("signed")
}

struct Running {
    url: String,
    key: CosignerKey,
    client: HttpClient,
}

/// A witness of the log `signer` signs, served on a free port.
async fn start_witness(dir: &Path, signer: &LogSigner) -> (Arc<Witness>, Running) {
    start_witness_of(dir, &signer.vkey()).await
}

/// A witness of the log with verifier key `log_vkey`.
async fn start_witness_of(dir: &Path, log_vkey: &str) -> (Arc<Witness>, Running) {
    let cosigner = Cosigner::load_or_create(&dir.join("w1.p8"), "witness.test/w1").expect("key");
    let key = CosignerKey::parse(&cosigner.vkey()).expect("vkey");
    let witness = Arc::new(
        Witness::open(
            cosigner,
            vec![VerifierKey::parse(log_vkey).expect("log vkey")],
            &dir.join("state").join("w1.json"),
            Arc::new(ManualClock::new()),
        )
        .expect("witness"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = witness.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = HttpClient::new(&Options::new(Trust::System)).expect("client");
    (witness, Running { url, key, client })
}

fn submitter(w: &Running, store: &Arc<dyn Store>) -> Submitter {
    Submitter::new(
        vec![WitnessTarget {
            key: w.key.clone(),
            url: w.url.clone(),
            client: w.client.clone(),
        }],
        store.clone(),
    )
}

async fn post(w: &Running, body: String) -> (u16, String) {
    let req = http::Request::post(format!("{}/add-checkpoint", w.url))
        .body(body.into_bytes())
        .expect("request");
    let resp = w.client.send(req).await.expect("answer");
    (
        resp.status.as_u16(),
        String::from_utf8_lossy(&resp.body).into_owned(),
    )
}

/// The witness's own view of the log (its monitoring endpoint).
async fn witnessed_size(w: &Running) -> u64 {
    let note = w
        .client
        .get_ok(&format!("{}{}", w.url, checkpoint_path(ORIGIN)))
        .await
        .expect("the witness serves its checkpoint");
    let text = String::from_utf8(note.to_vec()).expect("utf-8");
    text.lines()
        .nth(1)
        .expect("size line")
        .parse()
        .expect("size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_views_rollbacks_and_restored_backups_get_no_cosignature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer =
        Arc::new(LogSigner::load_or_create(&dir.path().join("keys"), ORIGIN).expect("log key"));
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    let (witness, w) = start_witness(dir.path(), &signer).await;

    // The live ledger: cosigned at 3, then at 5 (with a consistency proof from 3).
    let live = open(&dir.path().join("live.db"));
    let at3 = grow(live.as_ref(), &signer, &["a", "b", "c"]).await;
    let to_live = submitter(&w, &live);
    assert_eq!(
        to_live.submit(&at3).await,
        vec![Ok("witness.test/w1".into())]
    );
    let stored3 = live.checkpoint(Some(3)).await.expect("read").expect("cp");
    assert_eq!(stored3.cosignatures.len(), 1, "the cosignature is stored");
    let cosig3 = stored3.cosignatures[0].clone();
    let at5 = grow(live.as_ref(), &signer, &["d", "e"]).await;
    assert_eq!(
        to_live.submit(&at5).await,
        vec![Ok("witness.test/w1".into())]
    );
    assert_eq!(witnessed_size(&w).await, 5);
    let served = live.checkpoint(None).await.expect("read").expect("cp");
    let policy = WitnessPolicy::new(vec![w.key.clone()], 1, 5).expect("policy");
    assert_eq!(
        policy
            .check(&served.cosigned_note())
            .expect("witnessed")
            .checkpoint
            .size,
        5
    );

    // Rollback: the live log's older checkpoint, submitted again.
    let err = to_live
        .submit(&stored3)
        .await
        .remove(0)
        .expect_err("refused");
    assert!(err.reason.contains("rolled back"), "{err}");

    // A restore from a backup taken at 3 (same entries, the cosignature it held), then a
    // different history on top: the witness knows 5, and 3→7 on this tree is not 5→7.
    let restored = open(&dir.path().join("restored.db"));
    let r3 = grow(restored.as_ref(), &signer, &["a", "b", "c"]).await;
    assert_eq!(r3.root, at3.root, "the backup holds the same tree at 3");
    restored
        .add_cosignature(Cosignature {
            size: 3,
            witness: "witness.test/w1".into(),
            line: cosig3,
            cosigned_at: 1,
        })
        .await
        .expect("backup's cosignature");
    let r7 = grow(restored.as_ref(), &signer, &["x", "y", "z", "w"]).await;
    let err = submitter(&w, &restored)
        .submit(&r7)
        .await
        .remove(0)
        .expect_err("refused");
    assert!(
        err.reason.contains("422"),
        "a restored backup cannot extend: {err}"
    );

    // Split view: another tree of size 5 signed by the same key.
    let split = open(&dir.path().join("split.db"));
    let s5 = grow(split.as_ref(), &signer, &["p", "q", "r", "s", "t"]).await;
    let err = submitter(&w, &split)
        .submit(&s5)
        .await
        .remove(0)
        .expect_err("refused");
    assert!(err.reason.contains("422"), "split view: {err}");
    assert_eq!(witnessed_size(&w).await, 5, "nothing moved the witness");

    // The spec's answers, raw: unknown origin 404, another key 403, old > size 400,
    // a stale old size 409 with the witness's size as text/x.tlog.size.
    let other = LogSigner::load_or_create(&dir.path().join("other"), "example.org/other")
        .expect("other log");
    let body = |old: u64, note: String| {
        AddCheckpoint {
            old,
            proof: vec![],
            note,
        }
        .encode()
    };
    assert_eq!(post(&w, body(0, other.sign(1, &[7; 32]))).await.0, 404);
    let forger = LogSigner::load_or_create(&dir.path().join("forger"), ORIGIN).expect("forger");
    assert_eq!(post(&w, body(5, forger.sign(5, &at5.root))).await.0, 403);
    assert_eq!(post(&w, body(6, signer.sign(5, &at5.root))).await.0, 400);
    assert_eq!(
        post(&w, body(0, at5.note.clone())).await,
        (409, "5\n".into())
    );
    assert_eq!(
        post(&w, body(5, at5.note.clone())).await.0,
        200,
        "same tree again"
    );

    // The state survives a restart; a state that cannot be saved cosigns nothing.
    drop(witness);
    let (_again, w2) = start_witness(dir.path(), &signer).await;
    assert_eq!(
        post(&w2, body(0, at5.note.clone())).await,
        (409, "5\n".into())
    );
    std::fs::remove_dir_all(dir.path().join("state")).expect("remove state dir");
    let at6 = grow(live.as_ref(), &signer, &["f"]).await;
    let proof = live
        .consistency_proof(5, 6)
        .await
        .expect("read")
        .expect("proof");
    let extend = AddCheckpoint {
        old: 5,
        proof,
        note: at6.note.clone(),
    }
    .encode();
    assert_eq!(
        post(&w2, extend.clone()).await.0,
        500,
        "disk gone: no cosignature"
    );
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir back");
    assert_eq!(
        post(&w2, extend).await.0,
        200,
        "the failed save changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_ledger_fails_the_witness_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer =
        Arc::new(LogSigner::load_or_create(&dir.path().join("keys"), ORIGIN).expect("log key"));
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    let (_witness, w) = start_witness(dir.path(), &signer).await;
    let live = open(&dir.path().join("live.db"));
    let to_live = submitter(&w, &live);
    for tags in [&["a", "b"][..], &["c", "d"], &["e", "f"]] {
        let cp = grow(live.as_ref(), &signer, tags).await;
        assert!(to_live.submit(&cp).await[0].is_ok());
    }

    // The operator rewrites history from entry 3 on with the log key: every checkpoint
    // re-signed, the chain recomputed, the witnesses' cosignatures kept.
    let forged_dir = dir.path().join("forged");
    std::fs::create_dir_all(forged_dir.join("keys")).expect("dir");
    std::fs::write(forged_dir.join("keys").join("log.vkey"), signer.vkey()).expect("vkey");
    let forged = open(&forged_dir.join("ledger.db"));
    for tags in [&["a", "b"][..], &["C", "d"], &["e", "f"]] {
        grow(forged.as_ref(), &signer, tags).await;
    }
    for cp in live.checkpoints().await.expect("read") {
        for line in cp.cosignatures {
            forged
                .add_cosignature(Cosignature {
                    size: cp.size,
                    witness: "witness.test/w1".into(),
                    line,
                    cosigned_at: 1,
                })
                .await
                .expect("copy");
        }
    }
    drop(forged);
    let vkey = VerifierKey::parse(&signer.vkey()).expect("vkey");
    let reopened = open(&forged_dir.join("ledger.db"));
    let report = spiffe_broker::store::verify_store(reopened.as_ref(), &vkey)
        .await
        .expect("the log key alone cannot tell");
    let policy = WitnessPolicy::new(vec![w.key.clone()], 1, 0).expect("policy");
    let err = policy
        .check_log(report.notes.iter().map(String::as_str))
        .expect_err("rewrite caught");
    assert!(err.0.starts_with("checkpoint of size 4:"), "{err}");
    drop(reopened);

    // The same through the CLI an auditor runs, on the ledger file.
    let vkey_file = dir.path().join("w1.vkey");
    let out = std::process::Command::new(crate::common::process::BIN)
        .args(["audit", "verify", "--state-dir"])
        .arg(&forged_dir)
        .arg("--witness")
        .arg(&vkey_file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checkpoint of size 4:") && stderr.contains("does not verify"),
        "{stderr}"
    );
    // The untouched ledger passes with its witnessed size.
    let live_dir = dir.path().join("live");
    std::fs::create_dir_all(live_dir.join("keys")).expect("dir");
    drop(to_live);
    drop(live);
    std::fs::rename(dir.path().join("live.db"), live_dir.join("ledger.db")).expect("move");
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::rename(
            dir.path().join(format!("live.db{ext}")),
            live_dir.join(format!("ledger.db{ext}")),
        );
    }
    std::fs::write(live_dir.join("keys").join("log.vkey"), signer.vkey()).expect("vkey");
    let out = std::process::Command::new(crate::common::process::BIN)
        .args(["audit", "verify", "--state-dir"])
        .arg(&live_dir)
        .args(["--witness"])
        .arg(&vkey_file)
        .args(["--min-size", "6"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#""witnessed":{"size":6,"cosigners":["witness.test/w1"]}"#),
        "{stdout}"
    );
}

/// A relying party that requires a token's issuance to be in the witnessed log: the
/// holder presents the inclusion proof it may fetch for its own lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relying_party_can_require_a_witnessed_issuance() {
    use crate::common::{gpu_request, start_with, token_of, DEPLOY_AGENT};
    use spiffe_broker::proto::v1 as pb;
    use spiffe_broker::relying_party::{verify_logged, LogProof, RpError};

    let h = start_with(Some(Box::new(|s: String| {
        format!("checkpoint_interval = \"1h\"\n{s}")
    })))
    .await;
    let issue = || async {
        let r = h
            .broker_as(DEPLOY_AGENT)
            .await
            .issue_credential(gpu_request(600))
            .await
            .expect("issued")
            .into_inner();
        (token_of(&r.credential), r.lease.expect("lease").id)
    };
    let (token, jti) = issue().await;
    let (other_token, other_jti) = issue().await;
    let cp = h
        .env
        .broker
        .checkpoint()
        .await
        .expect("checkpoint")
        .expect("signed");
    let log_vkey = std::fs::read_to_string(h.env.state_dir.join("keys/log.vkey")).expect("vkey");
    let log_key = VerifierKey::parse(&log_vkey).expect("log key");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    let (_w, w) = start_witness_of(dir.path(), &log_vkey).await;
    let policy = WitnessPolicy::new(vec![w.key.clone()], 1, 2).expect("policy");
    let proof_of = |jti: String| {
        let h = &h;
        async move {
            let p = h
                .admin_as(DEPLOY_AGENT)
                .await
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    entry: Some(pb::get_inclusion_proof_request::Entry::LeaseId(jti)),
                    tree_size: 0,
                })
                .await
                .expect("the holder proves its own lease")
                .into_inner();
            LogProof {
                entry: serde_json::Value::String(p.entry),
                leaf_index: p.leaf_index,
                tree_size: p.tree_size,
                proof: p.proof,
                checkpoint: p.checkpoint,
            }
        }
    };

    // Before any witness cosigned: signed by the log key, but not witnessed.
    let unwitnessed = proof_of(jti.clone()).await;
    assert!(verify_logged(&token, &jti, &unwitnessed, &log_key, None).is_ok());
    assert!(matches!(
        verify_logged(&token, &jti, &unwitnessed, &log_key, Some(&policy)),
        Err(RpError::NotLogged(m)) if m.contains("cosigned by 0")
    ));

    let store = h.env.broker.store().clone();
    assert!(submitter(&w, &store).submit(&cp).await[0].is_ok());
    let proof = proof_of(jti.clone()).await;
    assert_eq!(
        verify_logged(&token, &jti, &proof, &log_key, Some(&policy)),
        Ok(cp.size)
    );
    // Another token's proof, or this proof with another token, proves nothing.
    let theirs = proof_of(other_jti.clone()).await;
    assert!(verify_logged(&token, &jti, &theirs, &log_key, Some(&policy)).is_err());
    assert!(verify_logged(&other_token, &jti, &proof, &log_key, Some(&policy)).is_err());
    // An altered entry is not included.
    let mut altered = proof.clone();
    if let serde_json::Value::String(e) = &mut altered.entry {
        *e = e.replace("queue/a100", "queue/h100");
    }
    assert!(matches!(
        verify_logged(&token, &jti, &altered, &log_key, Some(&policy)),
        Err(RpError::NotLogged(m)) if m.contains("inclusion")
    ));
}
