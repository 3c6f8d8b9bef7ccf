//! A transparency-log witness (`spiffe-broker witness`): the `add-checkpoint` endpoint of
//! `c2sp.org/tlog-witness` and its monitoring endpoint, over a small state file.
//!
//! The witness trusts a fixed set of log keys (one per origin). For each log it keeps the
//! latest checkpoint it cosigned; a new one is cosigned only if it is signed by the log's
//! key and provably extends that one (an RFC 6962 consistency proof), and the new state is
//! on disk (written to a temporary file, fsync'd, renamed) before the cosignature leaves.
//! The check and the write happen under one lock, so two concurrent submissions cannot
//! roll the state back. A state file that cannot be read stops the witness from starting:
//! starting over from nothing would let a log roll back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{checkpoint_path, AddCheckpoint, ADD_CHECKPOINT, SIZE_CONTENT_TYPE};
use crate::checkpoint::{Checkpoint, SignedNote, VerifierKey};
use crate::clock::Clock;
use crate::cosignature::Cosigner;
use crate::merkle::{empty_root, verify_consistency, Hash};

/// Largest request body accepted (a note and 63 proof lines fit many times over).
const MAX_BODY: usize = 64 * 1024;

/// Why a checkpoint was not cosigned; each maps to the status the spec names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 400: the request is malformed, or its old size exceeds the checkpoint's.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// 404: no trusted key for this origin.
    #[error("unknown log {0:?}")]
    UnknownLog(String),
    /// 403: no valid signature by the log's key.
    #[error("checkpoint not signed by the log's key: {0}")]
    Unsigned(String),
    /// 409: `old` is not the size this witness last cosigned (it is carried here).
    #[error("the witness's latest cosigned size is {0}")]
    Conflict(u64),
    /// 422: the checkpoint does not extend what the witness saw.
    #[error("inconsistent with the witnessed tree: {0}")]
    Inconsistent(String),
    /// 500: the new state could not be saved; nothing was cosigned.
    #[error("state not saved: {0}")]
    Storage(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::UnknownLog(_) => StatusCode::NOT_FOUND,
            Refusal::Unsigned(_) => StatusCode::FORBIDDEN,
            Refusal::Conflict(_) => StatusCode::CONFLICT,
            Refusal::Inconsistent(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Refusal::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Conflict(size) => (
                StatusCode::CONFLICT,
                [(header::CONTENT_TYPE, SIZE_CONTENT_TYPE)],
                format!("{size}\n"),
            )
                .into_response(),
            // The state file's path stays in the witness's own log.
            Refusal::Storage(_) => (self.status(), "state not saved\n").into_response(),
            other => (other.status(), format!("{other}\n")).into_response(),
        }
    }
}

/// What the witness keeps per log: its latest cosigned checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Seen {
    size: u64,
    /// Base64 root hash.
    root: String,
    /// The checkpoint note with the log's signature and this witness's cosignature.
    note: String,
}

/// The state file: per origin, the latest cosigned checkpoint.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct WitnessState {
    logs: BTreeMap<String, Seen>,
}

/// A witness.
pub struct Witness {
    cosigner: Cosigner,
    logs: BTreeMap<String, VerifierKey>,
    state_path: PathBuf,
    state: Mutex<WitnessState>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness")
            .field("name", &self.cosigner.name())
            .field("logs", &self.logs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Witness {
    /// A witness with its key, the log keys it trusts (one per origin) and its state file
    /// (created empty if absent; refused if unreadable).
    pub fn open(
        cosigner: Cosigner,
        log_keys: Vec<VerifierKey>,
        state_path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let mut logs = BTreeMap::new();
        for k in log_keys {
            let name = k.name().to_owned();
            if logs.insert(name.clone(), k).is_some() {
                return Err(format!("two log keys for the origin {name:?}"));
            }
        }
        if logs.is_empty() {
            return Err("a witness needs at least one log key (--log-key)".into());
        }
        let state = match std::fs::read(state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a witness state file: {e}", state_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => WitnessState::default(),
            Err(e) => return Err(format!("{}: {e}", state_path.display())),
        };
        Ok(Self {
            cosigner,
            logs,
            state_path: state_path.to_owned(),
            state: Mutex::new(state),
            clock,
        })
    }

    /// The witness's verifier key.
    pub fn vkey(&self) -> String {
        self.cosigner.vkey()
    }

    /// Handles an `add-checkpoint` body: the cosignature line(s) to return, or why not.
    pub fn add_checkpoint(&self, body: &str) -> Result<String, Refusal> {
        let req = AddCheckpoint::decode(body).map_err(Refusal::Malformed)?;
        let note = SignedNote::parse(&req.note).map_err(|e| Refusal::Malformed(e.0))?;
        let cp = Checkpoint::parse(&note.body).map_err(|e| Refusal::Malformed(e.0))?;
        let key = self
            .logs
            .get(&cp.origin)
            .ok_or_else(|| Refusal::UnknownLog(cp.origin.clone()))?;
        key.verify(&req.note).map_err(|e| Refusal::Unsigned(e.0))?;
        if req.old > cp.size {
            return Err(Refusal::Malformed(format!(
                "old size {} is larger than the checkpoint's {}",
                req.old, cp.size
            )));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seen = state.logs.get(&cp.origin);
        let (seen_size, seen_root) = match seen {
            Some(s) => (s.size, decode_root(&s.root)?),
            None => (0, empty_root()),
        };
        if req.old != seen_size {
            return Err(Refusal::Conflict(seen_size));
        }
        check_extends(&req, &cp, seen_root)?;
        let timestamp = (self.clock.unix_seconds().max(1)) as u64;
        let line = self.cosigner.cosign(&note.body, timestamp);
        let mut next = state.clone();
        next.logs.insert(
            cp.origin.clone(),
            Seen {
                size: cp.size,
                root: STANDARD.encode(cp.root),
                note: format!("{}{line}", req.note),
            },
        );
        let bytes =
            serde_json::to_vec_pretty(&next).map_err(|e| Refusal::Storage(e.to_string()))?;
        crate::files::write_atomic(&self.state_path, &bytes, 0o600).map_err(|e| {
            tracing::error!(error = %e, "witness state not saved; nothing cosigned");
            Refusal::Storage(e.to_string())
        })?;
        *state = next;
        tracing::info!(origin = %cp.origin, size = cp.size, old = req.old, "cosigned");
        Ok(line)
    }

    /// The latest cosigned checkpoint of the log whose origin hashes to `origin_hash`.
    pub fn latest(&self, origin_hash: &str) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .logs
            .iter()
            .find(|(origin, _)| checkpoint_path(origin) == format!("/{origin_hash}/checkpoint"))
            .map(|(_, seen)| seen.note.clone())
    }

    /// The HTTP API: `POST /add-checkpoint`, `GET /<origin hash>/checkpoint`, `/healthz`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(ADD_CHECKPOINT, post(add_checkpoint))
            .route("/{origin_hash}/checkpoint", get(latest))
            .route("/healthz", get(|| async { "ok\n" }))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }
}

/// The root a witness stored (its own file: unreadable means corrupt, refuse to cosign).
fn decode_root(b64: &str) -> Result<Hash, Refusal> {
    STANDARD
        .decode(b64)
        .ok()
        .and_then(|r| Hash::try_from(r).ok())
        .ok_or_else(|| Refusal::Storage("a stored root is not a base64 SHA-256".into()))
}

/// The spec's consistency rules between the witnessed tree (`req.old`, `seen_root`) and
/// the submitted checkpoint.
fn check_extends(req: &AddCheckpoint, cp: &Checkpoint, seen_root: Hash) -> Result<(), Refusal> {
    let bad = |m: &str| Err(Refusal::Inconsistent(m.to_owned()));
    if cp.size == 0 && cp.root != empty_root() {
        return bad("a tree of size 0 must have the empty tree's root");
    }
    if req.old == 0 {
        return if req.proof.is_empty() {
            Ok(())
        } else {
            bad("a proof from the empty tree must be empty")
        };
    }
    if req.old == cp.size {
        return if cp.root == seen_root && req.proof.is_empty() {
            Ok(())
        } else {
            bad("same size as the witnessed tree but another root (a split view)")
        };
    }
    verify_consistency(req.old, cp.size, &seen_root, &cp.root, &req.proof)
        .map_err(|e| Refusal::Inconsistent(e.0))
}

async fn add_checkpoint(State(w): State<Arc<Witness>>, body: String) -> Response {
    let answer = tokio::task::spawn_blocking(move || w.add_checkpoint(&body)).await;
    match answer {
        Ok(Ok(lines)) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], lines).into_response()
        }
        Ok(Err(refusal)) => {
            tracing::info!(%refusal, "checkpoint not cosigned");
            refusal.into_response()
        }
        Err(_) => Refusal::Storage("cosigning task failed".into()).into_response(),
    }
}

async fn latest(State(w): State<Arc<Witness>>, UrlPath(origin_hash): UrlPath<String>) -> Response {
    match w.latest(&origin_hash) {
        Some(note) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no checkpoint of that log cosigned\n",
        )
            .into_response(),
    }
}
