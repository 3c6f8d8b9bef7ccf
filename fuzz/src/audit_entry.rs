//! Exported audit log text → the verifier an auditor runs (`store::export::verify_export`).
//!
//! The input is an `entries.jsonl` (one exported entry per line), read three ways:
//! 1. strictly, as `verify_export` does: each line → `ExportEntry` → hex fields →
//!    `StoredEntry` → `LogVerifier::push` (chain, canonical body, indexed columns,
//!    Merkle leaf), stopping at the first bad line;
//! 2. re-chained: each parseable line gets the sequence number and hashes that continue
//!    the chain, so every body reaches `ChainVerifier::push`'s body checks (an attacker
//!    with write access can recompute hashes; only the body rules stop them there);
//! 3. the whole text as a signed checkpoint note (`VerifierKey::verify` with the seeds'
//!    log key) and as a verifier key (`VerifierKey::parse`).
//!
//! Invariants: no panic; an accepted entry's body is the canonical encoding of the
//! event it parses to (so one event has exactly one accepted body) and its columns and
//! hashes are the ones recomputed here; `ChainVerifier` accepts a re-chained body
//! exactly when it is canonical and its columns match; an accepted note re-renders to
//! the signed text.

use spiffe_broker::audit::{entry_hash, AuditEvent, ChainVerifier, LogVerifier, StoredEntry};
use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::merkle;
use spiffe_broker::store::export::ExportEntry;

use super::fixture;

/// Most lines read from one input.
const MAX_LINES: usize = 64;

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    strict(&text);
    rechained(&text);
    note(&text);
}

/// Lines as `BufRead::lines` yields them.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
        .map(|l| {
            let l = l.strip_suffix('\n').unwrap_or(l);
            l.strip_suffix('\r').unwrap_or(l)
        })
        .take(MAX_LINES)
}

fn strict(text: &str) {
    let fx = fixture::get();
    let mut v = LogVerifier::new(&[], &fx.log_vkey).expect("no checkpoints to check");
    let mut accepted = 0u64;
    let mut prev = [0u8; 32];
    for line in lines(text) {
        let Ok(e) = serde_json::from_str::<ExportEntry>(line) else {
            return;
        };
        let (Ok(prev_hash), Ok(hash), Ok(leaf)) = (
            hex::decode(&e.prev_hash),
            hex::decode(&e.hash),
            hex::decode(&e.leaf_hash),
        ) else {
            return;
        };
        let stored = StoredEntry {
            seq: e.seq,
            kind: e.kind.clone(),
            lease_id: e.lease_id.clone(),
            body: e.body.clone(),
            prev_hash: prev_hash.clone(),
            hash: hash.clone(),
        };
        if let Err(err) = v.push(&stored, Some(&leaf)) {
            assert!(err.first_bad_entry().is_some(), "{err}");
            return;
        }
        accepted += 1;
        assert_eq!(e.seq, accepted, "accepted out of sequence");
        assert_eq!(prev_hash, prev, "accepted a broken chain");
        let h = entry_hash(e.seq, &prev, &e.body);
        assert_eq!(hash, h, "accepted a wrong entry hash");
        assert_eq!(
            leaf,
            merkle::leaf_hash(e.body.as_bytes()),
            "accepted a wrong leaf"
        );
        canonical_body(&e.body, &e.kind, e.lease_id.as_deref());
        prev = h;
    }
    let report = v.finish().expect("no checkpoint can be missing");
    assert_eq!(report.entries, accepted);
    assert_eq!(report.head_hash, hex::encode(prev));
}

/// An accepted body is the one canonical encoding of its event.
fn canonical_body(body: &str, kind: &str, lease_id: Option<&str>) {
    let ev: AuditEvent = serde_json::from_str(body).expect("accepted body parses");
    assert_eq!(ev.canonical(), body, "accepted a non-canonical body");
    let again: AuditEvent = serde_json::from_str(&ev.canonical()).expect("canonical re-parses");
    assert_eq!(again, ev, "canonical encoding does not round-trip");
    assert_eq!(ev.kind.as_str(), kind);
    assert_eq!(ev.lease_id.as_deref(), lease_id);
}

fn rechained(text: &str) {
    let mut v = ChainVerifier::default();
    let mut seq = 1u64;
    let mut prev = [0u8; 32];
    for line in lines(text) {
        let Ok(e) = serde_json::from_str::<ExportEntry>(line) else {
            continue;
        };
        let hash = entry_hash(seq, &prev, &e.body);
        let stored = StoredEntry {
            seq,
            kind: e.kind.clone(),
            lease_id: e.lease_id.clone(),
            body: e.body.clone(),
            prev_hash: prev.to_vec(),
            hash: hash.to_vec(),
        };
        let expected = serde_json::from_str::<AuditEvent>(&e.body).is_ok_and(|ev| {
            ev.canonical() == e.body && ev.kind.as_str() == e.kind && ev.lease_id == e.lease_id
        });
        let got = v.push(&stored);
        assert_eq!(
            got.is_ok(),
            expected,
            "ChainVerifier disagrees on body {:?}: {got:?}",
            e.body
        );
        if got.is_ok() {
            canonical_body(&e.body, &e.kind, e.lease_id.as_deref());
            prev = hash;
            seq += 1;
        } else if let Err(err) = got {
            assert_eq!(err.seq, seq);
        }
    }
    let (n, head) = v.finish();
    assert_eq!((n, head), (seq - 1, prev));
}

fn note(text: &str) {
    let fx = fixture::get();
    if let Ok(cp) = fx.log_vkey.verify(text) {
        assert!(
            text.starts_with(&format!("{}\n", cp.body())),
            "accepted note does not re-render to its signed body"
        );
        assert_eq!(cp.origin, fx.log_vkey.name());
    }
    if let Ok(k) = VerifierKey::parse(text) {
        assert!(!k.name().contains('+'));
    }
}
