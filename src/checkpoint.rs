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

/// The note-signature prefix of a signature line (U+2014 and a space).
pub const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// Why a note or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoteError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, NoteError> {
    Err(NoteError(m.into()))
}

/// A signed note's key ID: `SHA-256(name ‖ "\n" ‖ type ‖ public key)[:4]`.
pub(crate) fn key_hash(name: &str, kind: u8, public: &[u8]) -> [u8; 4] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[kind]);
    ctx.update(public);
    let d = ctx.finish();
    let mut h = [0u8; 4];
    h.copy_from_slice(&d.as_ref()[..4]);
    h
}

pub(crate) fn valid_name(name: &str) -> bool {
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
        if !valid_name(name) {
            return err(format!("invalid log name {name:?}"));
        }
        std::fs::create_dir_all(dir).map_err(|e| NoteError(format!("{}: {e}", dir.display())))?;
        let key = load_or_create_key(&dir.join(format!("{stem}-ed25519.p8")))?;
        let hash = key_hash(name, ED25519_TYPE, key.public_key().as_ref());
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
        format_vkey(&self.name, ED25519_TYPE, self.key.public_key().as_ref())
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
        format!(
            "{body}\n{SIGNATURE_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(blob)
        )
    }
}

/// Loads the Ed25519 key at `path` (PKCS#8, refused if others can read it) or generates
/// it there (mode 0600, fsync'd).
pub(crate) fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair, NoteError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let pkcs8 = match std::fs::read(path) {
        Ok(b) => {
            let mode = std::fs::metadata(path)
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
                .map_err(|_| NoteError("key generation failed".into()))?;
            let bytes = Zeroizing::new(doc.as_ref().to_vec());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| NoteError(format!("{}: {e}", path.display())))?;
            f.write_all(&bytes)
                .and_then(|_| f.sync_all())
                .map_err(|e| NoteError(format!("{}: {e}", path.display())))?;
            bytes
        }
    };
    Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| NoteError(format!("{}: not an Ed25519 key", path.display())))
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
        let (name, hash, public) = parse_vkey(s, ED25519_TYPE)?;
        Ok(Self { name, hash, public })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Verifies a signed checkpoint note and returns its content.
    pub fn verify(&self, note: &str) -> Result<Checkpoint, NoteError> {
        let note = SignedNote::parse(note)?;
        let mut verified = false;
        for sig in note.signatures_by(&self.name, &self.hash) {
            // Our key's id: the signature must verify; a malformed one rejects the note.
            let sig = sig
                .get(4..)
                .filter(|s| s.len() == 64)
                .ok_or_else(|| NoteError("malformed signature by the log key".into()))?;
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(note.body.as_bytes(), sig)
                .map_err(|_| NoteError("checkpoint signature does not verify".into()))?;
            verified = true;
        }
        if !verified {
            return err(format!("no signature by {} on the checkpoint", self.name));
        }
        let cp = Checkpoint::parse(&note.body)?;
        if cp.origin != self.name {
            return err(format!(
                "checkpoint origin {:?} is not {}",
                cp.origin, self.name
            ));
        }
        Ok(cp)
    }
}

/// `name+<8 hex key ID>+base64(type ‖ public key)` (c2sp.org/signed-note verifier keys).
pub(crate) fn format_vkey(name: &str, kind: u8, public: &[u8]) -> String {
    let mut k = vec![kind];
    k.extend_from_slice(public);
    format!(
        "{name}+{}+{}",
        hex::encode(key_hash(name, kind, public)),
        STANDARD.encode(k)
    )
}

/// An ASCII decimal with no leading zeroes (except `0` itself), as tree sizes are written.
pub fn canonical_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// A parsed verifier key of signature type `kind`: its name, key ID and public key.
pub(crate) fn parse_vkey(s: &str, kind: u8) -> Result<(String, [u8; 4], Vec<u8>), NoteError> {
    let mut parts = s.trim().splitn(3, '+');
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
    if key.len() != 33 || key[0] != kind {
        return err(format!(
            "verifier key is not an Ed25519 key of type 0x{kind:02x}"
        ));
    }
    if key_hash(name, kind, &key[1..]) != hash {
        return err("verifier key hash does not match its name and key");
    }
    Ok((name.to_owned(), hash, key[1..].to_vec()))
}

/// A signed note split into its text and its signature lines (c2sp.org/signed-note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    /// The text that is signed, with its final newline.
    pub body: String,
    /// `(key name, base64-decoded key ID ‖ signature)` per signature line, in order.
    pub signatures: Vec<(String, Vec<u8>)>,
}

impl SignedNote {
    /// Splits a note: no control characters but newline, a final newline, the text up
    /// to the last blank line, then well-formed signature lines only.
    pub fn parse(note: &str) -> Result<Self, NoteError> {
        if note.chars().any(|c| c.is_control() && c != '\n') || !note.ends_with('\n') {
            return err("note has control characters or no final newline");
        }
        let Some((body, sigs)) = note[..note.len() - 1].rsplit_once("\n\n") else {
            return err("note has no signature block");
        };
        let mut signatures = Vec::new();
        for line in sigs.split('\n') {
            let (name, sig) = line
                .strip_prefix(SIGNATURE_PREFIX)
                .and_then(|rest| rest.split_once(' '))
                .ok_or_else(|| NoteError("malformed signature line".into()))?;
            let blob = STANDARD
                .decode(sig)
                .map_err(|_| NoteError("signature is not base64".into()))?;
            if blob.len() < 4 {
                return err("signature shorter than its key ID");
            }
            signatures.push((name.to_owned(), blob));
        }
        Ok(Self {
            body: format!("{body}\n"),
            signatures,
        })
    }

    /// The signature blobs (key ID first) made under a key of this name and ID.
    pub fn signatures_by<'a>(
        &'a self,
        name: &'a str,
        id: &'a [u8; 4],
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.signatures
            .iter()
            .filter(move |(n, blob)| n == name && blob[..4] == id[..])
            .map(|(_, blob)| blob.as_slice())
    }
}

impl Checkpoint {
    /// Parses a checkpoint body (c2sp.org/tlog-checkpoint): origin, canonical decimal
    /// size, base64 SHA-256 root, then non-empty extension lines.
    pub fn parse(body: &str) -> Result<Self, NoteError> {
        let lines: Vec<&str> = body.lines().collect();
        let [origin, size, root, ..] = lines.as_slice() else {
            return err("checkpoint body needs origin, size and root lines");
        };
        let size = canonical_decimal(size)
            .ok_or_else(|| NoteError("checkpoint size is not a canonical decimal".into()))?;
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
