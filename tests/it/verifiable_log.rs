//! The verifiable audit log end to end: receipts and inclusion proofs over the real gRPC
//! API, signed checkpoints and consistency proofs, offline verification of exports and
//! ledger files (and the tampering each one catches, naming the entry or checkpoint),
//! the `audit` CLI, and a restart in the middle of the tree.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use spiffe_broker::audit::{entry_hash, AuditEvent, LogError};
use spiffe_broker::checkpoint::{LogSigner, VerifierKey};
use spiffe_broker::merkle::{self, Hash};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::store::export::{self, ExportCheckpoint, ExportEntry, ExportError, ExportProof};
use spiffe_broker::store::sqlite::{SqliteStore, VerifyError};
use spiffe_broker::store::StoredCheckpoint;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_spiffe-broker");

/// The demo config with the background checkpointer slowed to once an hour, so every
/// checkpoint in these tests is one the test signed (sizes are deterministic).
fn quiet_checkpointer() -> spiffe_broker::dev::ConfigEdit {
    Box::new(|s: String| {
        let anchor = "reaper_interval = \"30s\"";
        assert!(s.contains(anchor), "demo config changed: {s}");
        s.replacen(
            anchor,
            "reaper_interval = \"30s\"\ncheckpoint_interval = \"1h\"",
            1,
        )
    })
}

async fn start_quiet() -> Harness {
    start_with(Some(quiet_checkpointer())).await
}

fn h32(s: &str) -> Hash {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .unwrap_or_else(|| panic!("{s:?} is not a hex SHA-256"))
}

fn hashes(v: &[String]) -> Vec<Hash> {
    v.iter().map(|s| h32(s)).collect()
}

/// The RFC 6962 Merkle tree hash, straight from the definition (independent of the
/// store's persisted nodes).
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => merkle::empty_root(),
        1 => leaves[0],
        n => {
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            merkle::node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

async fn signed_checkpoint(h: &Harness) -> StoredCheckpoint {
    h.env
        .broker
        .checkpoint()
        .await
        .expect("checkpoint commits")
        .expect("the log grew, so a checkpoint is signed")
}

async fn http_vkey(h: &Harness) -> VerifierKey {
    let (status, body) = h.http_get("/log/vkey").await;
    assert_eq!(status, 200, "{body}");
    VerifierKey::parse(&body).expect("/log/vkey parses")
}

fn vkey_text(h: &Harness) -> String {
    std::fs::read_to_string(h.env.state_dir.join("keys/log.vkey"))
        .expect("keys/log.vkey")
        .trim()
        .to_owned()
}

/// A log key of the same origin name that the broker never used.
fn foreign_key(name: &str) -> (tempfile::TempDir, LogSigner) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = LogSigner::load_or_create(dir.path(), name).expect("foreign log key");
    (dir, s)
}

async fn issue(
    c: &mut pb::credential_broker_client::CredentialBrokerClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<pb::IssueCredentialResponse> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            c.issue_credential(gpu_request(600))
                .await
                .expect("issued")
                .into_inner(),
        );
    }
    out
}

fn by_lease(id: &str) -> pb::GetInclusionProofRequest {
    pb::GetInclusionProofRequest {
        entry: Some(pb::get_inclusion_proof_request::Entry::LeaseId(id.into())),
        tree_size: 0,
    }
}

/// Everything a client checks about an inclusion proof: the note's signature, that the
/// returned size and root are the signed ones, the leaf hash, and the audit path.
fn check_inclusion(p: &pb::GetInclusionProofResponse, vkey: &VerifierKey) {
    let cp = vkey
        .verify(&p.checkpoint)
        .expect("checkpoint note verifies");
    assert_eq!(cp.size, p.tree_size, "signed size");
    assert_eq!(hex::encode(cp.root), p.root_hash, "signed root");
    assert_eq!(p.leaf_index, p.sequence - 1);
    assert!(p.sequence <= p.tree_size, "the entry is inside the tree");
    let leaf = merkle::leaf_hash(p.entry.as_bytes());
    assert_eq!(hex::encode(leaf), p.leaf_hash, "leaf hash is the entry's");
    let path = hashes(&p.proof);
    merkle::verify_inclusion(&leaf, p.leaf_index, p.tree_size, &path, &cp.root)
        .expect("inclusion proof verifies against the signed root");
    // A different entry does not verify on the same path.
    let other = merkle::leaf_hash(format!("{} ", p.entry).as_bytes());
    assert!(merkle::verify_inclusion(&other, p.leaf_index, p.tree_size, &path, &cp.root).is_err());
}

#[tokio::test]
async fn receipts_carry_leaves_and_prove_inclusion_against_signed_checkpoints() {
    let h = start_quiet().await;
    let vkey = http_vkey(&h).await;
    assert_eq!(
        h.http_get("/log/checkpoint").await.0,
        404,
        "nothing signed yet"
    );
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let resp = issue(&mut agent, 1).await.remove(0);
    let lease = resp.lease.clone().expect("lease");
    let claims = verify_jwt(&token_of(&resp.credential), &h.jwks().await);
    assert_eq!(claims["jti"], lease.id);
    let receipt = resp.receipt.expect("receipt");
    assert_eq!(receipt.leaf_index, receipt.sequence - 1);
    assert_eq!(receipt.leaf_hash.len(), 64);
    assert_ne!(
        receipt.leaf_hash, receipt.entry_hash,
        "leaf and chain hash differ"
    );

    // As a platform admin, by lease id: no checkpoint exists yet, so one is signed.
    let mut root = h.admin_as(ROOT).await;
    let p = root
        .get_inclusion_proof(by_lease(&lease.id))
        .await
        .expect("proof")
        .into_inner();
    check_inclusion(&p, &vkey);
    assert_eq!(p.sequence, receipt.sequence);
    assert_eq!(p.leaf_index, receipt.leaf_index);
    assert_eq!(p.leaf_hash, receipt.leaf_hash);
    let entry: serde_json::Value = serde_json::from_str(&p.entry).expect("entry JSON");
    assert_eq!(entry["kind"], "issue");
    assert_eq!(
        entry["lease_id"], lease.id,
        "the entry names the token's jti"
    );
    assert_eq!(entry["lease_id"], claims["jti"]);
    assert_eq!(entry["caller"], DEPLOY_AGENT);
    assert_eq!(entry["credential_sha256"], lease.credential_sha256);
    // The on-demand checkpoint is the one now published.
    let (status, note) = h.http_get("/log/checkpoint").await;
    assert_eq!(status, 200);
    assert_eq!(note, p.checkpoint);

    // The log key from GetCheckpoint, /log/vkey and keys/log.vkey agree.
    let cp = root
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .expect("checkpoint")
        .into_inner();
    assert_eq!(cp.log_key, vkey_text(&h));
    assert_eq!(VerifierKey::parse(&cp.log_key).expect("log_key"), vkey);
    let signed = VerifierKey::parse(&cp.log_key)
        .expect("log_key")
        .verify(&cp.note)
        .expect("note verifies with GetCheckpoint.log_key");
    assert_eq!(hex::encode(signed.root), cp.root_hash);

    // The holder proves its own lease.
    let mut agent_admin = h.admin_as(DEPLOY_AGENT).await;
    let own = agent_admin
        .get_inclusion_proof(by_lease(&lease.id))
        .await
        .expect("the holder proves its own lease")
        .into_inner();
    check_inclusion(&own, &vkey);
    assert_eq!(own.leaf_hash, receipt.leaf_hash);
    assert_eq!(own.entry, p.entry);
    // ...but not arbitrary entries by sequence (that is a platform-admin read).
    let err = agent_admin
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            entry: Some(pb::get_inclusion_proof_request::Entry::Sequence(
                receipt.sequence,
            )),
            tree_size: 0,
        })
        .await
        .expect_err("not an admin");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Another workload cannot prove (and so learn the entry of) someone else's lease.
    let mut prov_admin = h.admin_as(PROVISIONER).await;
    let err = prov_admin
        .get_inclusion_proof(by_lease(&lease.id))
        .await
        .expect_err("not the holder");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(!err.message().contains(&lease.credential_sha256));

    // An entry newer than every checkpoint still gets a proof: one is signed on demand.
    let before = root
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .expect("checkpoint")
        .into_inner();
    let second = issue(&mut agent, 1).await.remove(0);
    let second_lease = second.lease.expect("lease");
    let second_receipt = second.receipt.expect("receipt");
    assert!(second_receipt.sequence > before.tree_size);
    let p2 = agent_admin
        .get_inclusion_proof(by_lease(&second_lease.id))
        .await
        .expect("proof of a fresh entry")
        .into_inner();
    check_inclusion(&p2, &vkey);
    assert!(p2.tree_size >= second_receipt.sequence);
    assert_ne!(p2.checkpoint, before.note, "a newer checkpoint was signed");
    assert_eq!(p2.leaf_hash, second_receipt.leaf_hash);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&p2.entry).expect("json")["lease_id"],
        second_lease.id
    );
    // The first entry is provable against the newer tree too, and a pinned older size
    // still works.
    let again = root
        .get_inclusion_proof(by_lease(&lease.id))
        .await
        .expect("proof")
        .into_inner();
    check_inclusion(&again, &vkey);
    assert_eq!(again.tree_size, p2.tree_size);
    let pinned = root
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            tree_size: before.tree_size,
            ..by_lease(&lease.id)
        })
        .await
        .expect("proof at a pinned size")
        .into_inner();
    check_inclusion(&pinned, &vkey);
    assert_eq!(pinned.checkpoint, before.note);
    // The fresh entry is not in the older tree.
    let err = root
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            tree_size: before.tree_size,
            ..by_lease(&second_lease.id)
        })
        .await
        .expect_err("not in that tree");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
}

#[tokio::test]
async fn concurrent_proofs_of_a_fresh_entry_all_succeed() {
    let h = start_quiet().await;
    let vkey = http_vkey(&h).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let root = h.admin_as(ROOT).await;
    let mut failures = Vec::new();
    for _ in 0..5 {
        let lease = issue(&mut agent, 1).await.remove(0).lease.expect("lease");
        // Several auditors ask for the fresh receipt's proof at once: each finds no
        // checkpoint covering it and asks for one to be signed.
        let calls = (0..8).map(|_| {
            let mut c = root.clone();
            let req = by_lease(&lease.id);
            async move { c.get_inclusion_proof(req).await }
        });
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(p) => check_inclusion(&p.into_inner(), &vkey),
                Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
}

#[tokio::test]
async fn concurrent_first_get_checkpoint_all_succeed() {
    let h = start_quiet().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    issue(&mut agent, 2).await;
    let root = h.admin_as(ROOT).await;
    let calls = (0..8).map(|_| {
        let mut c = root.clone();
        async move { c.get_checkpoint(pb::GetCheckpointRequest::default()).await }
    });
    let failures: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| format!("{:?}: {}", e.code(), e.message()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
}

#[tokio::test]
async fn checkpoints_are_consistent_and_the_log_pages_in_order() {
    let h = start_quiet().await;
    let vkey = http_vkey(&h).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let mut prov = h.broker_as(PROVISIONER).await;
    issue(&mut agent, 3).await;
    let a = signed_checkpoint(&h).await;
    assert_eq!(a.size, 3);
    let again = h
        .env
        .broker
        .checkpoint()
        .await
        .expect("ok")
        .expect("latest");
    assert_eq!(
        again, a,
        "no new checkpoint when the log did not grow: the latest one is returned"
    );
    issue(&mut prov, 2).await;
    // A refusal is an entry too.
    let err = agent
        .issue_credential(pb::IssueCredentialRequest {
            scopes: vec!["job:submit".into(), "cluster:admin".into()],
            ..gpu_request(600)
        })
        .await
        .expect_err("over-ask refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    issue(&mut agent, 2).await;
    let b = signed_checkpoint(&h).await;
    assert_eq!(b.size, 8);

    let mut root = h.admin_as(ROOT).await;
    let resp = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: b.size,
            consistency_from: a.size,
        })
        .await
        .expect("checkpoint with consistency proof")
        .into_inner();
    assert_eq!(resp.tree_size, b.size);
    assert_eq!(resp.note, b.note);
    assert_eq!(resp.root_hash, hex::encode(b.root));
    let new = vkey.verify(&resp.note).expect("B verifies");
    let old = vkey.verify(&a.note).expect("A verifies");
    assert_eq!((old.size, old.root), (a.size, a.root));
    assert_eq!((new.size, new.root), (b.size, b.root));
    let proof = hashes(&resp.consistency_proof);
    assert!(!proof.is_empty());
    merkle::verify_consistency(a.size, b.size, &old.root, &new.root, &proof).expect("B extends A");
    assert!(
        merkle::verify_consistency(
            a.size,
            b.size,
            &merkle::leaf_hash(b"fork"),
            &new.root,
            &proof
        )
        .is_err(),
        "a forked history does not pass"
    );
    // A by size, and the latest when no size is named.
    let resp_a = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: a.size,
            consistency_from: 0,
        })
        .await
        .expect("A")
        .into_inner();
    assert_eq!(resp_a.note, a.note);
    assert!(resp_a.consistency_proof.is_empty());
    let latest = root
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(latest.note, b.note);
    let (status, note) = h.http_get("/log/checkpoint").await;
    assert_eq!(status, 200);
    assert_eq!(note, b.note, "/log/checkpoint serves the latest note");
    // Unsigned sizes and backwards proofs are refused.
    let err = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: 5,
            consistency_from: 0,
        })
        .await
        .expect_err("no checkpoint of size 5");
    assert_eq!(err.code(), Code::NotFound);
    let err = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: a.size,
            consistency_from: b.size,
        })
        .await
        .expect_err("from beyond size");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Reading the log is a platform-admin action.
    let mut alice = h.admin_as(ALICE).await;
    let err = alice
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await
        .expect_err("alice is not an admin");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = alice
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .expect_err("alice is not an admin");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Page through everything, three at a time.
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = root
            .list_audit_events(pb::ListAuditEventsRequest {
                after_sequence: after,
                page_size: 3,
            })
            .await
            .expect("page")
            .into_inner()
            .entries;
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.sequence;
        all.extend(page);
    }
    let bodies = h.audit_bodies();
    assert_eq!(all.len(), bodies.len(), "every entry, once");
    assert!(
        all.len() as u64 > b.size,
        "the refusals above were recorded"
    );
    let mut prev = [0u8; 32];
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "in order, gap-free");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e.body).expect("body"),
            bodies[i]
        );
        assert_eq!(e.prev_hash, hex::encode(prev));
        let h = entry_hash(e.sequence, &prev, &e.body);
        assert_eq!(e.entry_hash, hex::encode(h), "entry {}", e.sequence);
        prev = h;
    }
    // The signed roots are the RFC 6962 hash of the listed entries.
    let leaves: Vec<Hash> = all
        .iter()
        .map(|e| merkle::leaf_hash(e.body.as_bytes()))
        .collect();
    assert_eq!(mth(&leaves[..a.size as usize]), a.root);
    assert_eq!(mth(&leaves[..b.size as usize]), b.root);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&all[5].body).expect("body")["decision"],
        "deny"
    );
}

// ---------------------------------------------------------------------------------------
// Export and offline verification.

/// Issues 3, checkpoints (3), issues 2 and one refusal, checkpoints (6), issues 1 more
/// (entry 7, not yet covered by a checkpoint).
async fn two_checkpoint_log(h: &Harness) -> (StoredCheckpoint, StoredCheckpoint) {
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    issue(&mut agent, 3).await;
    let a = signed_checkpoint(h).await;
    issue(&mut agent, 2).await;
    agent
        .issue_credential(gpu_request(2 * 3600))
        .await
        .expect_err("over max_ttl");
    let b = signed_checkpoint(h).await;
    issue(&mut agent, 1).await;
    assert_eq!((a.size, b.size), (3, 6));
    assert_eq!(h.audit_bodies().len(), 7);
    (a, b)
}

fn copy_dir(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).expect("mkdir");
    for f in std::fs::read_dir(src).expect("read dir") {
        let f = f.expect("entry");
        std::fs::copy(f.path(), dst.join(f.file_name())).expect("copy");
    }
    dst.to_owned()
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    std::fs::write(p, text).expect("write");
}

fn entries_of(dir: &Path) -> Vec<ExportEntry> {
    read_lines(&dir.join("entries.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).expect("entry line"))
        .collect()
}

fn write_entries(dir: &Path, entries: &[ExportEntry]) {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    write_lines(&dir.join("entries.jsonl"), &lines);
}

fn log_error(r: Result<spiffe_broker::audit::LogReport, ExportError>) -> LogError {
    match r {
        Ok(rep) => panic!("tampering went unnoticed: {rep:?}"),
        Err(ExportError::Log(l)) => l,
        Err(other) => panic!("expected a log error, got {other}"),
    }
}

/// A body rewritten the way a forger would: still canonical, same kind and lease, a
/// different decision.
fn forged_body(body: &str) -> String {
    let mut ev: AuditEvent = serde_json::from_str(body).expect("entry body");
    ev.decision = if ev.decision == "allow" {
        "deny"
    } else {
        "allow"
    }
    .into();
    ev.reason = Some("nothing to see here".into());
    let out = ev.canonical();
    assert_ne!(out, body);
    out
}

/// Flips one bit of the Ed25519 signature in a signed note (keeping the key hash).
fn forge_signature(note: &str) -> String {
    let (body, sig_line) = note.split_once("\n\n").expect("signed note");
    let (prefix, sig) = sig_line
        .trim_end()
        .rsplit_once(' ')
        .expect("signature line");
    let mut blob = STANDARD.decode(sig).expect("base64");
    assert_eq!(blob.len(), 68);
    blob[40] ^= 0x01;
    format!("{body}\n\n{prefix} {}\n", STANDARD.encode(blob))
}

/// Rewrites entry `seq` and recomputes every chain hash after it and its leaf hash:
/// everything an attacker with write access can recompute without the log key.
fn rechain_export(dir: &Path, seq: u64) {
    let mut entries = entries_of(dir);
    let i = (seq - 1) as usize;
    entries[i].body = forged_body(&entries[i].body);
    let mut prev: Hash = h32(&entries[i].prev_hash);
    for e in entries[i..].iter_mut() {
        e.prev_hash = hex::encode(prev);
        let h = entry_hash(e.seq, &prev, &e.body);
        e.hash = hex::encode(h);
        e.leaf_hash = hex::encode(merkle::leaf_hash(e.body.as_bytes()));
        prev = h;
    }
    write_entries(dir, &entries);
}

#[tokio::test]
async fn export_verifies_offline_and_names_each_tampering() {
    let h = start_quiet().await;
    let (a, b) = two_checkpoint_log(&h).await;
    let vtext = vkey_text(&h);
    let vkey = VerifierKey::parse(&vtext).expect("vkey");
    let out = h.dir.path().join("export");
    let summary = export::export(h.env.broker.store().as_ref(), &vtext, &out)
        .await
        .expect("export");
    assert_eq!((summary.entries, summary.checkpoints), (7, 2));
    for f in [
        "entries.jsonl",
        "checkpoints.jsonl",
        "log.vkey",
        "proof.json",
    ] {
        assert!(out.join(f).is_file(), "{f} exported");
    }
    let report = export::verify_export(&out, Some(&vkey)).expect("export verifies");
    assert_eq!(report.entries, 7);
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.latest_checkpoint, Some(b.size));
    let entries = entries_of(&out);
    assert_eq!(report.head_hash, entries[6].hash);
    let leaves: Vec<Hash> = entries.iter().map(|e| h32(&e.leaf_hash)).collect();
    assert_eq!(report.root, hex::encode(mth(&leaves)));
    assert_eq!(
        export::verify_export(&out, None)
            .expect("verifies with the export's own key")
            .entries,
        7
    );
    // The files are readable without this crate's verifier: checkpoints carry the
    // signed notes, proof.json proves an entry against the latest one.
    let cps: Vec<ExportCheckpoint> = read_lines(&out.join("checkpoints.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).expect("checkpoint line"))
        .collect();
    assert_eq!(
        cps.iter()
            .map(|c| (c.size, c.note.clone()))
            .collect::<Vec<_>>(),
        vec![(a.size, a.note.clone()), (b.size, b.note.clone())]
    );
    let p: ExportProof =
        serde_json::from_slice(&std::fs::read(out.join("proof.json")).expect("proof.json"))
            .expect("proof JSON");
    let signed = vkey
        .verify(&p.checkpoint)
        .expect("proof checkpoint verifies");
    assert_eq!(signed.size, b.size);
    let leaf = merkle::leaf_hash(entries[(p.sequence - 1) as usize].body.as_bytes());
    assert_eq!(hex::encode(leaf), p.leaf_hash);
    merkle::verify_inclusion(
        &leaf,
        p.leaf_index,
        p.tree_size,
        &hashes(&p.proof),
        &signed.root,
    )
    .expect("proof.json verifies");

    let copy = |name: &str| copy_dir(&out, &h.dir.path().join(name));

    // One field of one entry's body.
    let d = copy("changed");
    let mut es = entries_of(&d);
    assert!(es[1].body.contains("\"decision\":\"allow\""));
    es[1].body = es[1]
        .body
        .replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    write_entries(&d, &es);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), Some(2), "{e}");
    assert!(e.to_string().contains("entry changed"), "{e}");

    // A deleted line.
    let d = copy("deleted");
    let mut lines = read_lines(&d.join("entries.jsonl"));
    lines.remove(3);
    write_lines(&d.join("entries.jsonl"), &lines);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), Some(4), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");

    // Two lines swapped.
    let d = copy("swapped");
    let mut lines = read_lines(&d.join("entries.jsonl"));
    lines.swap(1, 2);
    write_lines(&d.join("entries.jsonl"), &lines);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), Some(2), "{e}");

    // Swapped and renumbered: the chain still breaks at 2.
    let d = copy("reordered");
    let mut es = entries_of(&d);
    es.swap(1, 2);
    es[1].seq = 2;
    es[2].seq = 3;
    write_entries(&d, &es);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), Some(2), "{e}");

    // The tail cut after a checkpoint covered it: the chain is intact, the checkpoint
    // of size 6 names what is gone.
    let d = copy("truncated");
    let mut lines = read_lines(&d.join("entries.jsonl"));
    lines.truncate(4);
    write_lines(&d.join("entries.jsonl"), &lines);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), None);
    assert!(matches!(e, LogError::Checkpoint { size: 6, .. }), "{e}");
    assert!(e.to_string().contains("entries 5..=6 are missing"), "{e}");

    // A stored leaf hash that is not the entry's.
    let d = copy("leaf");
    let mut es = entries_of(&d);
    es[4].leaf_hash = hex::encode(merkle::leaf_hash(b"something else"));
    write_entries(&d, &es);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e, LogError::Leaf { seq: 5 });

    // A checkpoint's signature replaced.
    let d = copy("forged-sig");
    let mut cps = read_lines(&d.join("checkpoints.jsonl"));
    let mut c: ExportCheckpoint = serde_json::from_str(&cps[0]).expect("cp");
    c.note = forge_signature(&c.note);
    cps[0] = serde_json::to_string(&c).expect("json");
    write_lines(&d.join("checkpoints.jsonl"), &cps);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert_eq!(e.first_bad_entry(), None);
    assert!(
        matches!(&e, LogError::Checkpoint { size: 3, reason } if reason.contains("does not verify")),
        "{e}"
    );

    // Rewritten and re-chained (chain hashes and leaf hashes all recomputed): the
    // chain is self-consistent, only the signed checkpoint catches it.
    let d = copy("rechained");
    rechain_export(&d, 2);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert!(
        matches!(&e, LogError::Checkpoint { size: 3, reason } if reason.contains("1..=3")),
        "{e}"
    );
    // Between the two checkpoints: the second one names the range.
    let d = copy("rechained-late");
    rechain_export(&d, 5);
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert!(
        matches!(&e, LogError::Checkpoint { size: 6, reason } if reason.contains("4..=6")),
        "{e}"
    );
    // The forger also replaces log.vkey in the export; pinning the key still catches it,
    // as does the broker's note signed by the real key.
    let (_forger_dir, forger) = foreign_key(vkey.name());
    std::fs::write(d.join("log.vkey"), forger.vkey()).expect("write");
    let e = log_error(export::verify_export(&d, Some(&vkey)));
    assert!(matches!(e, LogError::Checkpoint { size: 6, .. }), "{e}");
    assert!(
        export::verify_export(&d, None).is_err(),
        "real notes, foreign key"
    );

    // A different pinned key refuses even the untouched export.
    let other = VerifierKey::parse(&forger.vkey()).expect("other key");
    assert_ne!(other, vkey);
    let e = log_error(export::verify_export(&out, Some(&other)));
    assert!(
        matches!(&e, LogError::Checkpoint { size: 3, reason } if reason.contains("no signature")),
        "{e}"
    );
    let (_d2, renamed) = foreign_key("attacker.example/log");
    let e = log_error(export::verify_export(
        &out,
        Some(&VerifierKey::parse(&renamed.vkey()).expect("key")),
    ));
    assert!(matches!(e, LogError::Checkpoint { size: 3, .. }), "{e}");
}

// ---------------------------------------------------------------------------------------
// The same tampering on a copy of the real ledger file.

fn snapshot(h: &Harness, name: &str) -> PathBuf {
    let p = h.dir.path().join(name);
    let conn = rusqlite::Connection::open(h.ledger_path()).expect("open");
    conn.execute("VACUUM INTO ?1", [p.display().to_string()])
        .expect("snapshot");
    let copy = rusqlite::Connection::open(&p).expect("open copy");
    copy.execute_batch(
        "DROP TRIGGER IF EXISTS audit_log_no_update; DROP TRIGGER IF EXISTS audit_log_no_delete;",
    )
    .expect("drop triggers");
    p
}

fn db_error(path: &Path, vkey: &VerifierKey) -> LogError {
    match SqliteStore::verify_file_with(path, vkey) {
        Ok(r) => panic!("tampering went unnoticed: {r:?}"),
        Err(VerifyError::Log(l)) => l,
        Err(other) => panic!("expected a log error, got {other}"),
    }
}

/// Rewrites entry `seq` in a ledger file and recomputes, consistently, the hash chain of
/// every later row and the Merkle tree (leaf and every interior node).
fn rechain_db(path: &Path, seq: u64) {
    let mut conn = rusqlite::Connection::open(path).expect("open copy");
    let tx = conn.transaction().expect("tx");
    let rows: Vec<(u64, String, Vec<u8>)> = {
        let mut stmt = tx
            .prepare("SELECT seq, body, prev_hash FROM audit_log ORDER BY seq")
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
    };
    let i = (seq - 1) as usize;
    let mut prev: Hash = rows[i].2.clone().try_into().expect("32 bytes");
    let mut leaves = Vec::new();
    for (n, (s, body, _)) in rows.iter().enumerate() {
        let body = if n == i {
            forged_body(body)
        } else {
            body.clone()
        };
        if n >= i {
            let h = entry_hash(*s, &prev, &body);
            tx.execute(
                "UPDATE audit_log SET body = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
                rusqlite::params![*s as i64, body, prev.as_slice(), h.as_slice()],
            )
            .expect("rewrite row");
            prev = h;
        }
        leaves.push(merkle::leaf_hash(body.as_bytes()));
    }
    tx.execute("DELETE FROM merkle_nodes", [])
        .expect("clear tree");
    let mut f = merkle::Frontier::default();
    for leaf in leaves {
        for (level, idx, hash) in f.append(leaf) {
            tx.execute(
                "INSERT INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)",
                rusqlite::params![level, idx as i64, hash.as_slice()],
            )
            .expect("node");
        }
    }
    tx.commit().expect("commit");
}

#[tokio::test]
async fn ledger_file_tampering_is_caught_by_the_signed_checkpoints() {
    let h = start_quiet().await;
    let (a, b) = two_checkpoint_log(&h).await;
    let vkey = VerifierKey::parse(&vkey_text(&h)).expect("vkey");
    let report = SqliteStore::verify_file_with(&h.ledger_path(), &vkey).expect("verifies");
    assert_eq!(report.entries, 7);
    assert_eq!(report.report.checkpoints, 2);
    assert_eq!(report.report.latest_checkpoint, Some(b.size));

    // Rewritten and re-chained, Merkle tree rebuilt: self-consistent...
    let p = snapshot(&h, "rechained.db");
    rechain_db(&p, 2);
    let stripped = snapshot(&h, "rechained-stripped.db");
    rechain_db(&stripped, 2);
    rusqlite::Connection::open(&stripped)
        .expect("open")
        .execute("DELETE FROM checkpoints", [])
        .expect("strip");
    assert_eq!(
        SqliteStore::verify_file_with(&stripped, &vkey)
            .expect("the forged chain and tree are internally consistent")
            .report
            .checkpoints,
        0
    );
    // ...and caught by the first signed checkpoint covering it.
    let e = db_error(&p, &vkey);
    assert_eq!(e.first_bad_entry(), None);
    assert!(
        matches!(&e, LogError::Checkpoint { size, reason } if *size == a.size && reason.contains("1..=3")),
        "{e}"
    );
    let p = snapshot(&h, "rechained-late.db");
    rechain_db(&p, 5);
    let e = db_error(&p, &vkey);
    assert!(
        matches!(&e, LogError::Checkpoint { size, reason } if *size == b.size && reason.contains("4..=6")),
        "{e}"
    );

    // A truncated tail (rows and their leaves): the chain is intact, the checkpoint
    // says what is missing.
    let p = snapshot(&h, "truncated.db");
    rusqlite::Connection::open(&p)
        .expect("open")
        .execute_batch(
            "DELETE FROM audit_log WHERE seq >= 5; DELETE FROM merkle_nodes WHERE level = 0 AND idx >= 4;",
        )
        .expect("truncate");
    let e = db_error(&p, &vkey);
    assert!(matches!(e, LogError::Checkpoint { size: 6, .. }), "{e}");
    assert!(e.to_string().contains("entries 5..=6 are missing"), "{e}");

    // Forged checkpoint rows: a flipped signature bit...
    let p = snapshot(&h, "forged-sig.db");
    let conn = rusqlite::Connection::open(&p).expect("open");
    conn.execute(
        "UPDATE checkpoints SET note = ?2 WHERE size = ?1",
        rusqlite::params![b.size as i64, forge_signature(&b.note)],
    )
    .expect("forge");
    drop(conn);
    let e = db_error(&p, &vkey);
    assert!(
        matches!(&e, LogError::Checkpoint { size: 6, reason } if reason.contains("does not verify")),
        "{e}"
    );
    // ...a checkpoint signed by another key of the same name (over the true root)...
    let p = snapshot(&h, "forged-key.db");
    let (_fd, forger) = foreign_key(vkey.name());
    let leaves: Vec<Hash> = h
        .audit_bodies()
        .iter()
        .map(|v| {
            let ev: AuditEvent = serde_json::from_value(v.clone()).expect("event");
            merkle::leaf_hash(ev.canonical().as_bytes())
        })
        .collect();
    let root7 = mth(&leaves);
    let conn = rusqlite::Connection::open(&p).expect("open");
    conn.execute(
        "INSERT INTO checkpoints (size, root, time_ms, note) VALUES (7, ?1, 0, ?2)",
        rusqlite::params![root7.as_slice(), forger.sign(7, &root7)],
    )
    .expect("insert forged");
    drop(conn);
    let e = db_error(&p, &vkey);
    assert!(
        matches!(&e, LogError::Checkpoint { size: 7, reason } if reason.contains("no signature")),
        "{e}"
    );
    // ...and a genuine note filed under another size.
    let p = snapshot(&h, "resized.db");
    rusqlite::Connection::open(&p)
        .expect("open")
        .execute("UPDATE checkpoints SET size = 4 WHERE size = 3", [])
        .expect("resize");
    let e = db_error(&p, &vkey);
    assert!(
        matches!(&e, LogError::Checkpoint { size: 4, reason } if reason.contains("says size 3")),
        "{e}"
    );
    // The live ledger is untouched by all of this.
    SqliteStore::verify_file(&h.ledger_path()).expect("original still verifies");
}

// ---------------------------------------------------------------------------------------
// The CLI.

fn cli(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("RUST_LOG")
        .output()
        .expect("run cli")
}

fn ok_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// The one `error:` line of a failed run.
fn error_line(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    errors[0].to_owned()
}

#[tokio::test]
async fn cli_exports_and_verifies_and_names_the_bad_entry() {
    let h = start_quiet().await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    issue(&mut agent, 4).await;
    let cp = signed_checkpoint(&h).await;
    assert_eq!(cp.size, 4);
    let state = h.env.state_dir.clone();
    let out = h.dir.path().join("cli-export");
    let os = |s: &str| std::ffi::OsString::from(s);

    let v = ok_json(&cli(&[
        &os("audit"),
        &os("export"),
        &os("--state-dir"),
        state.as_os_str(),
        &os("--out"),
        out.as_os_str(),
    ]));
    assert_eq!(
        (v["entries"].as_u64(), v["checkpoints"].as_u64()),
        (Some(4), Some(1))
    );

    let v = ok_json(&cli(&[
        &os("audit"),
        &os("verify"),
        &os("--export"),
        out.as_os_str(),
    ]));
    assert_eq!(v["entries"], 4);
    assert_eq!(v["checkpoints_verified"], 1);
    assert_eq!(v["latest_checkpoint"], 4);

    // The ledger itself, with the key pinned as text.
    let vtext = vkey_text(&h);
    let v = ok_json(&cli(&[
        &os("audit"),
        &os("verify"),
        &os("--state-dir"),
        state.as_os_str(),
        &os("--log-key"),
        &os(&vtext),
    ]));
    assert_eq!(v["entries"], 4);
    assert_eq!(v["checkpoints_verified"], 1);
    assert_eq!(v["root"], hex::encode(cp.root));

    // A deleted entry in a copy of the export: non-zero, one line naming entry 3.
    let bad = copy_dir(&out, &h.dir.path().join("cli-bad"));
    let mut lines = read_lines(&bad.join("entries.jsonl"));
    lines.remove(2);
    write_lines(&bad.join("entries.jsonl"), &lines);
    let o = cli(&[
        &os("audit"),
        &os("verify"),
        &os("--export"),
        bad.as_os_str(),
    ]);
    let line = error_line(&o);
    assert!(line.contains("audit entry 3"), "{line}");
    assert!(o.stdout.is_empty(), "no ok JSON on failure");

    // A changed entry.
    let bad = copy_dir(&out, &h.dir.path().join("cli-changed"));
    let mut es = entries_of(&bad);
    es[1].body = es[1].body.replace("job:submit", "job:cancel");
    write_entries(&bad, &es);
    let line = error_line(&cli(&[
        &os("audit"),
        &os("verify"),
        &os("--export"),
        bad.as_os_str(),
    ]));
    assert!(line.contains("audit entry 2"), "{line}");

    // Another pinned key (as a file, and as text) fails, naming the checkpoint.
    let (fd, forger) = foreign_key(VerifierKey::parse(&vtext).expect("vkey").name());
    let line = error_line(&cli(&[
        &os("audit"),
        &os("verify"),
        &os("--export"),
        out.as_os_str(),
        &os("--log-key"),
        fd.path().join("log.vkey").as_os_str(),
    ]));
    assert!(line.contains("checkpoint at tree size 4"), "{line}");
    let line = error_line(&cli(&[
        &os("audit"),
        &os("verify"),
        &os("--state-dir"),
        state.as_os_str(),
        &os("--log-key"),
        &os(&forger.vkey()),
    ]));
    assert!(line.contains("checkpoint at tree size 4"), "{line}");
}

// ---------------------------------------------------------------------------------------
// A restart in the middle.

#[tokio::test]
async fn restart_in_the_middle_keeps_the_tree_consistent() {
    let h = start_quiet().await;
    let first_lease = {
        let mut agent = h.broker_as(DEPLOY_AGENT).await;
        let r = issue(&mut agent, 3).await;
        r[0].lease.clone().expect("lease")
    };
    let a = signed_checkpoint(&h).await;
    assert_eq!(a.size, 3);
    let vkey_before = h.env.broker.log_vkey().expect("log key");

    let Harness { env, clock, dir } = h;
    let state_dir = env.state_dir.clone();
    env.shutdown().await.expect("broker stops");
    {
        // Stopped cleanly, nothing appended past the checkpoint.
        let r = SqliteStore::verify_file(&state_dir.join("ledger.db")).expect("verifies offline");
        assert_eq!((r.entries, r.report.checkpoints), (3, 1));
    }

    let env = spiffe_broker::dev::start(spiffe_broker::dev::DevOptions {
        state_dir: state_dir.clone(),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        svid_ttl: Duration::from_secs(3600),
        clock: clock.clone(),
        config: Some(quiet_checkpointer()),
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await
    .expect("restarts on the same state dir");
    let h = Harness { env, clock, dir };
    assert_eq!(
        h.env.broker.log_vkey().expect("log key"),
        vkey_before,
        "the log key persists"
    );
    let vkey = http_vkey(&h).await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let after = issue(&mut agent, 2).await;
    let receipt = after[0].receipt.clone().expect("receipt");
    assert_eq!(receipt.sequence, 4, "the sequence continues");
    assert_eq!(receipt.leaf_index, 3);
    let b = signed_checkpoint(&h).await;
    assert_eq!(b.size, 5);

    let mut root = h.admin_as(ROOT).await;
    let resp = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: b.size,
            consistency_from: a.size,
        })
        .await
        .expect("consistency proof across the restart")
        .into_inner();
    let new = vkey.verify(&resp.note).expect("B verifies");
    let old = vkey.verify(&a.note).expect("A verifies with the same key");
    merkle::verify_consistency(
        a.size,
        b.size,
        &old.root,
        &new.root,
        &hashes(&resp.consistency_proof),
    )
    .expect("the tree after the restart extends the one before");
    let resp_a = root
        .get_checkpoint(pb::GetCheckpointRequest {
            tree_size: a.size,
            consistency_from: 0,
        })
        .await
        .expect("A still served")
        .into_inner();
    assert_eq!(resp_a.note, a.note);

    // An entry from before the restart proves against the new checkpoint.
    let p = root
        .get_inclusion_proof(by_lease(&first_lease.id))
        .await
        .expect("proof")
        .into_inner();
    check_inclusion(&p, &vkey);
    assert_eq!(p.tree_size, b.size);
    assert_eq!(p.sequence, 1);

    let leaves: Vec<Hash> = h
        .audit_bodies()
        .iter()
        .map(|v| {
            let ev: AuditEvent = serde_json::from_value(v.clone()).expect("event");
            merkle::leaf_hash(ev.canonical().as_bytes())
        })
        .collect();
    assert_eq!(mth(&leaves[..3]), a.root);
    assert_eq!(mth(&leaves[..5]), b.root);
    let r = SqliteStore::verify_file(&h.ledger_path()).expect("verifies");
    assert_eq!(r.entries, 5);
    assert_eq!(r.report.checkpoints, 2);
    assert_eq!(r.report.latest_checkpoint, Some(b.size));
}
