//! Witness cosignatures on checkpoints (`c2sp.org/tlog-cosignature`, the Ed25519
//! `cosignature/v1` type) and the policy an auditor checks them against.
//!
//! A cosignature is one more signature line on a checkpoint note, by a witness's own key:
//!
//! ```text
//! — witness.example/w1 base64(key ID ‖ u64 timestamp, big-endian ‖ Ed25519 signature)
//! ```
//!
//! signed over `cosignature/v1\ntime <timestamp>\n` followed by the checkpoint's body. It
//! states that, at that time, this was the largest tree the witness had seen for the log
//! and that it is consistent with every earlier one it saw. The key ID is
//! `SHA-256(name ‖ "\n" ‖ 0x04 ‖ public key)[:4]`, so a log key (type 0x01) can never pass
//! for a witness key, nor the other way round.
//!
//! [`WitnessPolicy`] is what makes the operator's log key alone insufficient: a checkpoint
//! counts only with cosignatures from at least `quorum` of the named witnesses, so a
//! rewritten or rolled-back ledger (every checkpoint re-signed with the log key) fails.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use crate::checkpoint::{
    format_vkey, key_hash, load_or_create_key, parse_vkey, valid_name, Checkpoint, NoteError,
    SignedNote, SIGNATURE_PREFIX,
};

/// Signature type byte of Ed25519 cosignatures (`cosignature/v1`).
const COSIGNATURE_TYPE: u8 = 0x04;

/// Timestamp (8) and Ed25519 signature (64) after the key ID.
const COSIGNATURE_LEN: usize = 4 + 8 + 64;

fn err<T>(m: impl Into<String>) -> Result<T, NoteError> {
    Err(NoteError(m.into()))
}

/// The message a `cosignature/v1` signs.
fn signed_message(body: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A witness's signing key.
pub struct Cosigner {
    name: String,
    key: Ed25519KeyPair,
    id: [u8; 4],
}

impl std::fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cosigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Cosigner {
    /// Loads the PKCS#8 Ed25519 key at `path` or generates it (mode 0600), and writes the
    /// verifier key beside it (`path` with the extension `vkey`).
    pub fn load_or_create(path: &Path, name: &str) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return err(format!("invalid witness name {name:?}"));
        }
        let key = load_or_create_key(path)?;
        let id = key_hash(name, COSIGNATURE_TYPE, key.public_key().as_ref());
        let cosigner = Self {
            name: name.to_owned(),
            key,
            id,
        };
        let vkey_path = path.with_extension("vkey");
        crate::files::write_atomic(
            &vkey_path,
            format!("{}\n", cosigner.vkey()).as_bytes(),
            0o644,
        )
        .map_err(|e| NoteError(format!("{}: {e}", vkey_path.display())))?;
        Ok(cosigner)
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key a log and its auditors pin (`name+id+base64(0x04 ‖ key)`).
    pub fn vkey(&self) -> String {
        format_vkey(&self.name, COSIGNATURE_TYPE, self.key.public_key().as_ref())
    }

    /// The cosignature line (with its newline) over a checkpoint body at `timestamp`
    /// (Unix seconds; the spec forbids zero and anything past 2^63 - 1).
    pub fn cosign(&self, body: &str, timestamp: u64) -> String {
        let sig = self.key.sign(signed_message(body, timestamp).as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&timestamp.to_be_bytes());
        blob.extend_from_slice(sig.as_ref());
        format!(
            "{SIGNATURE_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(blob)
        )
    }
}

/// A witness's verifier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignerKey {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl CosignerKey {
    /// Parses `name+id+base64(0x04 ‖ public key)`.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let (name, id, public) = parse_vkey(s, COSIGNATURE_TYPE)?;
        Ok(Self { name, id, public })
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The timestamp of this witness's cosignature on the note, `None` if it has none. A
    /// line with this key's name and ID that does not verify makes the note malformed
    /// (c2sp.org/signed-note): that is an error, not a missing cosignature.
    pub fn verify(&self, note: &SignedNote) -> Result<Option<u64>, NoteError> {
        let mut verified = None;
        for blob in note.signatures_by(&self.name, &self.id) {
            if blob.len() != COSIGNATURE_LEN {
                return err(format!("malformed cosignature by {}", self.name));
            }
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&blob[4..12]);
            let timestamp = u64::from_be_bytes(ts);
            if timestamp == 0 || timestamp > i64::MAX as u64 {
                return err(format!("cosignature by {} has no valid time", self.name));
            }
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(
                    signed_message(&note.body, timestamp).as_bytes(),
                    &blob[12..],
                )
                .map_err(|_| {
                    NoteError(format!(
                        "cosignature by {} does not verify: the witness saw another tree",
                        self.name
                    ))
                })?;
            verified = Some(verified.map_or(timestamp, |t: u64| t.max(timestamp)));
        }
        Ok(verified)
    }
}

/// What a checkpoint must carry to be trusted beyond the log's own key: cosignatures of
/// at least `quorum` of `witnesses`, on a tree of at least `min_size` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessPolicy {
    /// The witnesses' keys.
    pub witnesses: Vec<CosignerKey>,
    /// How many of them must have cosigned (1 ≤ quorum ≤ witnesses).
    pub quorum: usize,
    /// The smallest tree an auditor accepts (what it knows the log reached).
    pub min_size: u64,
}

/// A checkpoint that satisfied a [`WitnessPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witnessed {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The witnesses that cosigned it.
    pub cosigners: Vec<String>,
}

impl WitnessPolicy {
    /// A policy; refuses a quorum of zero or one above the number of witnesses, and two
    /// keys of one name.
    pub fn new(
        witnesses: Vec<CosignerKey>,
        quorum: usize,
        min_size: u64,
    ) -> Result<Self, NoteError> {
        if quorum == 0 || quorum > witnesses.len() {
            return err(format!(
                "witness quorum {quorum} must be between 1 and the {} witness key(s) given",
                witnesses.len()
            ));
        }
        let mut names: Vec<&str> = witnesses.iter().map(|w| w.name()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return err("two witness keys share a name");
        }
        Ok(Self {
            witnesses,
            quorum,
            min_size,
        })
    }

    /// The witnesses whose cosignature on `note` verifies (any count; an invalid
    /// cosignature by a named witness is an error).
    pub fn cosigners(&self, note: &str) -> Result<Vec<String>, NoteError> {
        let note = SignedNote::parse(note)?;
        let mut names = Vec::new();
        for w in &self.witnesses {
            if w.verify(&note)?.is_some() {
                names.push(w.name.clone());
            }
        }
        Ok(names)
    }

    /// Checks a checkpoint note (already verified under the log key, which the caller
    /// does) against the policy: quorum and minimum size.
    pub fn check(&self, note: &str) -> Result<Witnessed, NoteError> {
        let cosigners = self.cosigners(note)?;
        let checkpoint = Checkpoint::parse(&SignedNote::parse(note)?.body)?;
        if cosigners.len() < self.quorum {
            return err(format!(
                "checkpoint of size {} is cosigned by {} of the {} required witnesses",
                checkpoint.size,
                cosigners.len(),
                self.quorum
            ));
        }
        if checkpoint.size < self.min_size {
            return err(format!(
                "the witnessed checkpoint has {} entries, fewer than the {} required: \
                 the log was rolled back or is stale",
                checkpoint.size, self.min_size
            ));
        }
        Ok(Witnessed {
            checkpoint,
            cosigners,
        })
    }

    /// Checks a log's checkpoints, oldest first, each already verified under the log key
    /// and against the entries: every cosignature by a named witness must verify (the
    /// first that does not is named: the log was rewritten after it was witnessed), and
    /// the largest checkpoint with a quorum must satisfy [`check`](Self::check).
    pub fn check_log<'a>(
        &self,
        notes: impl IntoIterator<Item = &'a str>,
    ) -> Result<Witnessed, NoteError> {
        let mut best = None;
        for note in notes {
            let cosigners = self.cosigners(note).map_err(|e| {
                let size = SignedNote::parse(note)
                    .and_then(|n| Checkpoint::parse(&n.body))
                    .map_or_else(|_| "?".to_owned(), |c| c.size.to_string());
                NoteError(format!("checkpoint of size {size}: {e}"))
            })?;
            if cosigners.len() >= self.quorum {
                best = Some(note);
            }
        }
        match best {
            Some(note) => self.check(note),
            None => err(format!(
                "no checkpoint is cosigned by {} of the witnesses",
                self.quorum
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::LogSigner;

    fn witness(dir: &Path, name: &str) -> (Cosigner, CosignerKey) {
        let c = Cosigner::load_or_create(&dir.join(format!("{name}.p8")), name).expect("key");
        let vkey = std::fs::read_to_string(dir.join(format!("{name}.vkey"))).expect("vkey");
        (c, CosignerKey::parse(&vkey).expect("parse"))
    }

    #[test]
    fn cosignatures_verify_and_a_policy_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogSigner::load_or_create(dir.path(), "example.org/log").expect("log");
        let (w1, k1) = witness(dir.path(), "w1.example");
        let (w2, k2) = witness(dir.path(), "w2.example");
        let note = log.sign(7, &crate::merkle::leaf_hash(b"x"));
        let body = SignedNote::parse(&note).expect("note").body;
        let cosigned = format!("{note}{}", w1.cosign(&body, 1_700_000_000));
        let parsed = SignedNote::parse(&cosigned).expect("still a note");
        assert_eq!(k1.verify(&parsed), Ok(Some(1_700_000_000)));
        assert_eq!(k2.verify(&parsed), Ok(None));

        let policy = WitnessPolicy::new(vec![k1.clone(), k2.clone()], 1, 7).expect("policy");
        assert_eq!(
            policy.check(&cosigned).expect("quorum").cosigners,
            ["w1.example"]
        );
        let two = WitnessPolicy::new(vec![k1.clone(), k2.clone()], 2, 0).expect("policy");
        assert!(two.check(&cosigned).is_err(), "one of two is not a quorum");
        let both = format!("{cosigned}{}", w2.cosign(&body, 1_700_000_001));
        assert_eq!(two.check(&both).expect("quorum").cosigners.len(), 2);
        let bigger = WitnessPolicy::new(vec![k1.clone()], 1, 8).expect("policy");
        assert!(bigger.check(&cosigned).is_err(), "smaller than min_size");

        // A cosignature over another tree (a rewritten log re-signed by the log key).
        let forged = log.sign(7, &crate::merkle::leaf_hash(b"y"));
        let moved = format!("{forged}{}", w1.cosign(&body, 1_700_000_000));
        let e = policy.check(&moved).expect_err("bad cosignature");
        assert!(e.0.contains("does not verify"), "{e}");
        // A log key's vkey is not a witness key and vice versa.
        assert!(CosignerKey::parse(&log.vkey()).is_err());
        assert!(crate::checkpoint::VerifierKey::parse(&w1.vkey()).is_err());
        assert!(WitnessPolicy::new(vec![k1.clone()], 0, 0).is_err());
        assert!(WitnessPolicy::new(vec![k1.clone(), k1], 1, 0).is_err());
    }

    #[test]
    fn check_log_names_the_first_checkpoint_whose_cosignature_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogSigner::load_or_create(dir.path(), "example.org/log").expect("log");
        let (w, k) = witness(dir.path(), "w.example");
        let cosign = |size: u64, seed: &[u8]| {
            let note = log.sign(size, &crate::merkle::leaf_hash(seed));
            let body = SignedNote::parse(&note).expect("note").body;
            format!("{note}{}", w.cosign(&body, 1_700_000_000 + size))
        };
        let notes = [cosign(1, b"a"), cosign(2, b"b"), log.sign(3, &[0; 32])];
        let policy = WitnessPolicy::new(vec![k], 1, 2).expect("policy");
        let ok = policy
            .check_log(notes.iter().map(String::as_str))
            .expect("witnessed");
        assert_eq!(ok.checkpoint.size, 2, "the largest cosigned checkpoint");
        // Rewritten: checkpoint 2 re-signed over another root, the old cosignature kept.
        let (_, sigs) = notes[1].split_once("\n\n").expect("sigs");
        let cosig = sigs.lines().nth(1).expect("cosignature line");
        let rewritten = log.sign(2, &crate::merkle::leaf_hash(b"other"));
        let forged = [notes[0].clone(), format!("{rewritten}{cosig}\n")];
        let e = policy
            .check_log(forged.iter().map(String::as_str))
            .expect_err("rewritten");
        assert!(e.0.starts_with("checkpoint of size 2:"), "{e}");
        // Every cosignature dropped: no quorum anywhere.
        let bare = [log.sign(1, &[1; 32]), log.sign(2, &[2; 32])];
        assert!(policy.check_log(bare.iter().map(String::as_str)).is_err());
    }
}
