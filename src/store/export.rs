//! Exporting the verifiable log for a SIEM or an external auditor, and verifying an
//! export offline. The export is plain files anyone can read without this code:
//!
//! - `entries.jsonl`: one entry per line: `seq`, `kind`, `lease_id`, `body` (the canonical
//!   JSON that is hashed), `prev_hash`, `hash` (the chain), `leaf_hash` (the Merkle leaf);
//! - `checkpoints.jsonl`: `size`, `root`, `time_ms`, `note` (C2SP signed note);
//! - `log.vkey`: the log's verifier key;
//! - `proof.json`: an inclusion proof of one entry against the latest checkpoint.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::{LogError, LogReport, LogVerifier, StoredEntry};
use crate::checkpoint::VerifierKey;
use crate::merkle::{self, Hash};
use crate::store::Store;

/// One exported entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportEntry {
    /// Sequence (1-based).
    pub seq: u64,
    /// Entry kind.
    pub kind: String,
    /// Lease concerned.
    pub lease_id: Option<String>,
    /// Canonical JSON body.
    pub body: String,
    /// Hex chain hash of the predecessor.
    pub prev_hash: String,
    /// Hex chain hash.
    pub hash: String,
    /// Hex Merkle leaf hash.
    pub leaf_hash: String,
}

impl From<&StoredEntry> for ExportEntry {
    fn from(e: &StoredEntry) -> Self {
        Self {
            seq: e.seq,
            kind: e.kind.clone(),
            lease_id: e.lease_id.clone(),
            body: e.body.clone(),
            prev_hash: hex::encode(&e.prev_hash),
            hash: hex::encode(&e.hash),
            leaf_hash: hex::encode(merkle::leaf_hash(e.body.as_bytes())),
        }
    }
}

/// One exported checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportCheckpoint {
    /// Tree size.
    pub size: u64,
    /// Hex root.
    pub root: String,
    /// When signed (Unix ms).
    pub time_ms: i64,
    /// The signed note.
    pub note: String,
}

/// An exported inclusion proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportProof {
    /// The entry's sequence.
    pub sequence: u64,
    /// Its leaf index (`sequence - 1`).
    pub leaf_index: u64,
    /// Hex leaf hash.
    pub leaf_hash: String,
    /// Tree size proven against.
    pub tree_size: u64,
    /// Hex root of that size.
    pub root: String,
    /// Hex audit path.
    pub proof: Vec<String>,
    /// The signed checkpoint of that size.
    pub checkpoint: String,
}

/// Why an export or its verification failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing files or the database.
    #[error("{0}")]
    Io(String),
    /// The log does not verify.
    #[error("{0}")]
    Log(LogError),
}

fn io(e: impl std::fmt::Display) -> ExportError {
    ExportError::Io(e.to_string())
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Output directory.
    pub dir: PathBuf,
    /// Entries written.
    pub entries: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// Exports a ledger, through the `Store` seam whatever the engine (SQLite or
/// PostgreSQL), into `out`; `vkey` is the log's verifier key.
pub async fn export(
    store: &dyn Store,
    vkey: &str,
    out: &Path,
) -> Result<ExportSummary, ExportError> {
    std::fs::create_dir_all(out).map_err(io)?;
    // The checkpoints first: every entry they cover is in the pages read after them.
    let checkpoints = store.checkpoints().await.map_err(io)?;
    let mut entries = 0;
    let mut sample = None;
    let proven = checkpoints.last().map(|c| c.size.div_ceil(2));
    {
        let mut w = BufWriter::new(std::fs::File::create(out.join("entries.jsonl")).map_err(io)?);
        loop {
            let page = store.audit_entries(entries, 1000).await.map_err(io)?;
            if page.is_empty() {
                break;
            }
            for e in &page {
                let e = ExportEntry::from(e);
                serde_json::to_writer(&mut w, &e).map_err(io)?;
                w.write_all(b"\n").map_err(io)?;
                entries = e.seq;
                if Some(e.seq) == proven {
                    sample = Some(e.leaf_hash);
                }
            }
        }
        w.flush().map_err(io)?;
    }
    {
        let mut w =
            BufWriter::new(std::fs::File::create(out.join("checkpoints.jsonl")).map_err(io)?);
        for c in &checkpoints {
            let c = ExportCheckpoint {
                size: c.size,
                root: hex::encode(c.root),
                time_ms: c.time_ms,
                note: c.cosigned_note(),
            };
            serde_json::to_writer(&mut w, &c).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    std::fs::write(out.join("log.vkey"), format!("{}\n", vkey.trim())).map_err(io)?;
    if let (Some(last), Some(seq), Some(leaf_hash)) = (checkpoints.last(), proven, sample) {
        let proof = store
            .inclusion_proof(seq - 1, last.size)
            .await
            .map_err(io)?
            .ok_or_else(|| {
                io(format!(
                    "no inclusion proof of entry {seq} in {}",
                    last.size
                ))
            })?;
        let p = ExportProof {
            sequence: seq,
            leaf_index: seq - 1,
            leaf_hash,
            tree_size: last.size,
            root: hex::encode(last.root),
            proof: proof.iter().map(hex::encode).collect(),
            checkpoint: last.cosigned_note(),
        };
        std::fs::write(
            out.join("proof.json"),
            serde_json::to_vec_pretty(&p).map_err(io)?,
        )
        .map_err(io)?;
    }
    Ok(ExportSummary {
        dir: out.to_owned(),
        entries,
        checkpoints: checkpoints.len() as u64,
    })
}

fn unhex(field: &str, seq: u64, v: &str) -> Result<Vec<u8>, ExportError> {
    hex::decode(v).map_err(|_| ExportError::Io(format!("entry {seq}: {field} is not hex")))
}

/// Verifies an export from scratch with `vkey` (which an auditor pins; `None` reads the
/// export's own `log.vkey`). Names the first bad entry or checkpoint.
pub fn verify_export(dir: &Path, vkey: Option<&VerifierKey>) -> Result<LogReport, ExportError> {
    let own;
    let vkey = match vkey {
        Some(k) => k,
        None => {
            let text = std::fs::read_to_string(dir.join("log.vkey")).map_err(io)?;
            own = VerifierKey::parse(&text).map_err(io)?;
            &own
        }
    };
    let mut notes = Vec::new();
    let cp_file = std::fs::File::open(dir.join("checkpoints.jsonl")).map_err(io)?;
    for line in std::io::BufReader::new(cp_file).lines() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let c: ExportCheckpoint =
            serde_json::from_str(&line).map_err(|e| io(format!("checkpoints.jsonl: {e}")))?;
        // The plain root field must be the signed one (a SIEM may read only the field).
        let signed = vkey.verify(&c.note).map_err(|e| {
            ExportError::Log(LogError::Checkpoint {
                size: c.size,
                reason: e.0,
            })
        })?;
        if hex::encode(signed.root) != c.root {
            return Err(ExportError::Log(LogError::Checkpoint {
                size: c.size,
                reason: "the root field differs from the signed note".into(),
            }));
        }
        notes.push((c.size, c.note));
    }
    let mut v = LogVerifier::new(&notes, vkey).map_err(ExportError::Log)?;
    let mut leaves: Vec<Hash> = Vec::new();
    let file = std::fs::File::open(dir.join("entries.jsonl")).map_err(io)?;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let e: ExportEntry = serde_json::from_str(&line)
            .map_err(|err| io(format!("entries.jsonl line {}: {err}", n + 1)))?;
        let stored = StoredEntry {
            seq: e.seq,
            kind: e.kind.clone(),
            lease_id: e.lease_id.clone(),
            body: e.body.clone(),
            prev_hash: unhex("prev_hash", e.seq, &e.prev_hash)?,
            hash: unhex("hash", e.seq, &e.hash)?,
        };
        let leaf = unhex("leaf_hash", e.seq, &e.leaf_hash)?;
        v.push(&stored, Some(&leaf)).map_err(ExportError::Log)?;
        leaves.push(merkle::leaf_hash(e.body.as_bytes()));
    }
    let report = v.finish().map_err(ExportError::Log)?;
    if let Ok(text) = std::fs::read_to_string(dir.join("proof.json")) {
        let p: ExportProof =
            serde_json::from_str(&text).map_err(|e| io(format!("proof.json: {e}")))?;
        let cp = vkey
            .verify(&p.checkpoint)
            .map_err(|e| io(format!("proof.json checkpoint: {e}")))?;
        let leaf: Hash = unhex("leaf_hash", p.sequence, &p.leaf_hash)?
            .try_into()
            .map_err(|_| io("proof.json: leaf hash is not 32 bytes"))?;
        let path = p
            .proof
            .iter()
            .map(|h| {
                unhex("proof", p.sequence, h)
                    .and_then(|b| b.try_into().map_err(|_| io("proof hash length")))
            })
            .collect::<Result<Vec<Hash>, _>>()?;
        // Every plain field must agree with the signed checkpoint and the entries.
        let entry_leaf = p
            .sequence
            .checked_sub(1)
            .and_then(|i| leaves.get(i as usize));
        if p.leaf_index + 1 != p.sequence
            || entry_leaf != Some(&leaf)
            || p.tree_size != cp.size
            || p.root != hex::encode(cp.root)
        {
            return Err(io(
                "proof.json disagrees with the entries or its signed checkpoint",
            ));
        }
        merkle::verify_inclusion(&leaf, p.leaf_index, cp.size, &path, &cp.root)
            .map_err(|e| io(format!("proof.json: {e}")))?;
    }
    Ok(report)
}
