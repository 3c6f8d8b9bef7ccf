//! Signed checkpoints of the audit log's Merkle tree, in the C2SP signed-note format
//! (`c2sp.org/signed-note`, `c2sp.org/tlog-checkpoint`):
//!
//! ```text
//! example.org/spiffe-broker/audit
//! 1234
//! <base64 root hash>
//!
//! — example.org/spiffe-broker/audit <base64(key hash ‖ Ed25519 signature)>
//! ```
//!
//! The log key is an Ed25519 key of its own (`STATE_DIR/keys/log-ed25519.p8`, mode 0600),
//! separate from the token-signing keys. Its verifier key (`STATE_DIR/keys/log.vkey`,
//! `name+keyhash+base64(0x01‖pubkey)`) is what an auditor pins.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use zeroize::Zeroizing;

use crate::merkle::Hash;

/// Signature type byte of Ed25519 in signed notes.
const ED25519_TYPE: u8 = 0x01;

/// Why a note or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoteError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, NoteError> {
    Err(NoteError(m.into()))
}

fn key_hash(name: &str, public: &[u8]) -> [u8; 4] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[ED25519_TYPE]);
    ctx.update(public);
    let d = ctx.finish();
    let mut h = [0u8; 4];
    h.copy_from_slice(&d.as_ref()[..4]);
    h
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', ' ', '\n']) && name.chars().all(|c| !c.is_control())
}

/// A checkpoint's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
    /// Extension lines after the root (c2sp.org/tlog-checkpoint), e.g. `time 1795…`.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note body that gets signed.
    pub fn body(&self) -> String {
        let mut b = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        );
        for e in &self.extensions {
            b.push_str(e);
            b.push('\n');
        }
        b
    }

    /// The `time <unix seconds>` extension, if present.
    pub fn time(&self) -> Option<i64> {
        self.extensions
            .iter()
            .find_map(|e| e.strip_prefix("time ")?.parse().ok())
    }
}

/// The log's signing key.
pub struct LogSigner {
    name: String,
    key: Ed25519KeyPair,
    hash: [u8; 4],
}

impl std::fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl LogSigner {
    /// Loads `dir/log-ed25519.p8` or generates it (mode 0600), and writes `dir/log.vkey`.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, NoteError> {
        Self::load_or_create_as(dir, "log", name)
    }

    /// Loads `dir/{stem}-ed25519.p8` or generates it (mode 0600), and writes `dir/{stem}.vkey`.
    /// Each signed stream (audit checkpoints, revocation feed heads) has its own key and
    /// name, so a note of one can never pass for the other.
    pub fn load_or_create_as(dir: &Path, stem: &str, name: &str) -> Result<Self, NoteError> {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if !valid_name(name) {
            return err(format!("invalid log name {name:?}"));
        }
        std::fs::create_dir_all(dir).map_err(|e| NoteError(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{stem}-ed25519.p8"));
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => {
                let mode = std::fs::metadata(&path)
                    .map_err(|e| NoteError(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return err(format!(
                        "{} is readable by others; chmod 600 it",
                        path.display()
                    ));
                }
                Zeroizing::new(b)
            }
            Err(_) => {
                let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| NoteError("log key generation failed".into()))?;
                let bytes = Zeroizing::new(doc.as_ref().to_vec());
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| NoteError(format!("{}: {e}", path.display())))?;
                f.write_all(&bytes)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| NoteError(format!("{}: {e}", path.display())))?;
                bytes
            }
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| NoteError(format!("{}: not an Ed25519 key", path.display())))?;
        let hash = key_hash(name, key.public_key().as_ref());
        let signer = Self {
            name: name.to_owned(),
            key,
            hash,
        };
        std::fs::write(
            dir.join(format!("{stem}.vkey")),
            format!("{}\n", signer.vkey()),
        )
        .map_err(|e| NoteError(format!("cannot write log.vkey: {e}")))?;
        Ok(signer)
    }

    /// The key name (the log origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key an auditor pins.
    pub fn vkey(&self) -> String {
        let mut k = vec![ED25519_TYPE];
        k.extend_from_slice(self.key.public_key().as_ref());
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.hash),
            STANDARD.encode(k)
        )
    }

    /// Signs a checkpoint of the tree; returns the signed note.
    pub fn sign(&self, size: u64, root: &Hash) -> String {
        self.sign_with(size, root, Vec::new())
    }

    /// Signs a checkpoint with extension lines (the revocation feed adds `time <unix s>`
    /// so a consumer can tell a fresh head from a replayed one).
    pub fn sign_with(&self, size: u64, root: &Hash, extensions: Vec<String>) -> String {
        let body = Checkpoint {
            origin: self.name.clone(),
            size,
            root: *root,
            extensions,
        }
        .body();
        let sig = self.key.sign(body.as_bytes());
        let mut blob = self.hash.to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!("{body}\n\u{2014} {} {}\n", self.name, STANDARD.encode(blob))
    }
}

/// A parsed verifier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    hash: [u8; 4],
    public: Vec<u8>,
}

impl VerifierKey {
    /// Parses `name+keyhash+base64(0x01‖pubkey)`.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let s = s.trim();
        let mut parts = s.splitn(3, '+');
        let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return err("verifier key is not name+hash+key");
        };
        let key = STANDARD
            .decode(key)
            .map_err(|_| NoteError("verifier key is not base64".into()))?;
        let hash: [u8; 4] = hex::decode(hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| NoteError("verifier key hash is not 8 hex digits".into()))?;
        if key.len() != 33 || key[0] != ED25519_TYPE {
            return err("verifier key is not an Ed25519 key");
        }
        if key_hash(name, &key[1..]) != hash {
            return err("verifier key hash does not match its name and key");
        }
        Ok(Self {
            name: name.to_owned(),
            hash,
            public: key[1..].to_vec(),
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Verifies a signed checkpoint note and returns its content.
    pub fn verify(&self, note: &str) -> Result<Checkpoint, NoteError> {
        // c2sp.org/signed-note: no control characters but newline, a final newline; the
        // text ends at the last blank line.
        if note.chars().any(|c| c.is_control() && c != '\n') || !note.ends_with('\n') {
            return err("note has control characters or no final newline");
        }
        let Some((body, sigs)) = note[..note.len() - 1].rsplit_once("\n\n") else {
            return err("note has no signature block");
        };
        let body = format!("{body}\n");
        let mut verified = false;
        for line in sigs.lines().filter(|l| !l.is_empty()) {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return err("malformed signature line");
            };
            let Some((name, sig)) = rest.split_once(' ') else {
                return err("malformed signature line");
            };
            if name != self.name {
                continue;
            }
            let blob = STANDARD
                .decode(sig)
                .map_err(|_| NoteError("signature is not base64".into()))?;
            if blob.len() < 4 || blob[..4] != self.hash {
                continue;
            }
            // Our key's id: the signature must verify; a malformed one rejects the note.
            if blob.len() != 4 + 64 {
                return err("malformed signature by the log key");
            }
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(body.as_bytes(), &blob[4..])
                .map_err(|_| NoteError("checkpoint signature does not verify".into()))?;
            verified = true;
        }
        if !verified {
            return err(format!("no signature by {} on the checkpoint", self.name));
        }
        let lines: Vec<&str> = body.lines().collect();
        let [origin, size, root, ..] = lines.as_slice() else {
            return err("checkpoint body needs origin, size and root lines");
        };
        if *origin != self.name {
            return err(format!("checkpoint origin {origin:?} is not {}", self.name));
        }
        let canonical = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (*size == "0" || !size.starts_with('0'));
        if !canonical {
            return err("checkpoint size is not a canonical decimal");
        }
        let size: u64 = size
            .parse()
            .map_err(|_| NoteError("checkpoint size is not a number".into()))?;
        let root: Hash = STANDARD
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| NoteError("checkpoint root is not a base64 SHA-256".into()))?;
        let extensions = lines[3..].iter().map(|l| l.to_string()).collect::<Vec<_>>();
        if extensions.iter().any(|e| e.is_empty()) {
            return err("empty extension line");
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_tampering_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LogSigner::load_or_create(dir.path(), "example.org/spiffe-broker/audit")
            .expect("signer");
        let root = crate::merkle::leaf_hash(b"x");
        let note = s.sign(42, &root);
        assert!(note.starts_with("example.org/spiffe-broker/audit\n42\n"));
        let vkey = VerifierKey::parse(
            &std::fs::read_to_string(dir.path().join("log.vkey")).expect("vkey"),
        )
        .expect("parse");
        let cp = vkey.verify(&note).expect("verifies");
        assert_eq!((cp.size, cp.root), (42, root));
        assert!(vkey.verify(&note.replace("\n42\n", "\n43\n")).is_err());
        let again = LogSigner::load_or_create(dir.path(), "example.org/spiffe-broker/audit")
            .expect("reload");
        assert_eq!(again.vkey(), s.vkey(), "the key persists");
        let other = tempfile::tempdir().expect("tempdir");
        let forger = LogSigner::load_or_create(other.path(), "example.org/spiffe-broker/audit")
            .expect("forger");
        assert!(
            vkey.verify(&forger.sign(42, &root)).is_err(),
            "another key's note is refused"
        );
    }
}
