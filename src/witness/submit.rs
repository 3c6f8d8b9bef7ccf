//! The broker's side of `c2sp.org/tlog-witness`: each new checkpoint goes to every
//! configured witness with a consistency proof from the size that witness last cosigned
//! (as the ledger remembers it; a `409` answer names the witness's own size, and the
//! submission is retried once from there). A returned cosignature is verified under the
//! witness's pinned key before it is stored beside the checkpoint.
//!
//! Witnesses are outside the request path: a witness that is down or refuses delays
//! nothing and loses nothing (the next checkpoint is submitted with a proof from the last
//! size it cosigned). A refusal is logged as an error and counted: a witness that says the
//! log is inconsistent is reporting a split view or a rollback.

use std::sync::Arc;

use http::StatusCode;

use super::{AddCheckpoint, ADD_CHECKPOINT};
use crate::checkpoint::{canonical_decimal, SignedNote, SIGNATURE_PREFIX};
use crate::cosignature::CosignerKey;
use crate::http_client::HttpClient;
use crate::store::{Cosignature, Store, StoredCheckpoint};

/// Why a witness did not cosign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("witness {witness}: {reason}")]
pub struct WitnessError {
    /// The witness's name.
    pub witness: String,
    /// What happened.
    pub reason: String,
}

/// One configured witness.
#[derive(Debug, Clone)]
pub struct WitnessTarget {
    /// Its pinned key (its name is the key's).
    pub key: CosignerKey,
    /// Its submission prefix (`https://witness.example/` …); `add-checkpoint` goes under it.
    pub url: String,
    /// The outbound client (its CAs).
    pub client: HttpClient,
}

/// Submits checkpoints to witnesses and stores their cosignatures.
#[derive(Clone)]
pub struct Submitter {
    targets: Vec<WitnessTarget>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl Submitter {
    /// A submitter over the ledger that holds the checkpoints.
    pub fn new(targets: Vec<WitnessTarget>, store: Arc<dyn Store>) -> Self {
        Self { targets, store }
    }

    /// Whether any witness is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Submits `cp` to every witness, concurrently (one the ledger says cosigned this size
    /// already is not asked again); returns one result per witness (its name once it has
    /// cosigned this size).
    pub async fn submit(&self, cp: &StoredCheckpoint) -> Vec<Result<String, WitnessError>> {
        futures::future::join_all(self.targets.iter().map(|t| self.submit_to(t, cp))).await
    }

    async fn submit_to(
        &self,
        t: &WitnessTarget,
        cp: &StoredCheckpoint,
    ) -> Result<String, WitnessError> {
        let fail = |reason: String| WitnessError {
            witness: t.key.name().to_owned(),
            reason,
        };
        let old = self
            .store
            .cosigned_size(t.key.name())
            .await
            .map_err(|e| fail(format!("ledger: {e}")))?
            .unwrap_or(0);
        if old == cp.size {
            return Ok(t.key.name().to_owned());
        }
        let mut old = old.min(cp.size);
        // Once from what the ledger remembers, once more from what a 409 says.
        for _ in 0..2 {
            match self.ask(t, cp, old).await.map_err(fail)? {
                Answer::Cosigned(line, cosigned_at) => {
                    self.store
                        .add_cosignature(Cosignature {
                            size: cp.size,
                            witness: t.key.name().to_owned(),
                            line,
                            cosigned_at,
                        })
                        .await
                        .map_err(|e| fail(format!("cosignature not stored: {e}")))?;
                    tracing::debug!(
                        witness = t.key.name(),
                        size = cp.size,
                        "checkpoint cosigned"
                    );
                    return Ok(t.key.name().to_owned());
                }
                Answer::Conflict(theirs) if theirs > cp.size => {
                    return Err(fail(format!(
                        "it has cosigned a tree of {theirs} entries, larger than this log's \
                         {}: the ledger was rolled back (restored from a backup?)",
                        cp.size
                    )))
                }
                Answer::Conflict(theirs) => old = theirs,
            }
        }
        Err(fail("its cosigned size keeps changing".into()))
    }

    /// One `add-checkpoint` round trip from `old`.
    async fn ask(
        &self,
        t: &WitnessTarget,
        cp: &StoredCheckpoint,
        old: u64,
    ) -> Result<Answer, String> {
        let proof = if old == 0 || old == cp.size {
            Vec::new()
        } else {
            self.store
                .consistency_proof(old, cp.size)
                .await
                .map_err(|e| format!("ledger: {e}"))?
                .ok_or_else(|| format!("no consistency proof from {old} to {}", cp.size))?
        };
        let body = AddCheckpoint {
            old,
            proof,
            note: cp.note.clone(),
        }
        .encode();
        let url = format!("{}{ADD_CHECKPOINT}", t.url.trim_end_matches('/'));
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body.into_bytes())
            .map_err(|e| format!("request: {e}"))?;
        let resp = t.client.send(req).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&resp.body);
        match resp.status {
            StatusCode::OK => {
                let cosigned = format!("{}{text}", cp.note);
                let note = SignedNote::parse(&cosigned)
                    .map_err(|e| format!("its answer is not signature lines: {e}"))?;
                let at = t
                    .key
                    .verify(&note)
                    .map_err(|e| e.0)?
                    .ok_or("its answer holds no cosignature by its key")?;
                let prefix = format!("{SIGNATURE_PREFIX}{} ", t.key.name());
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&prefix))
                    .map(|l| format!("{l}\n"))
                    .ok_or("its answer holds no cosignature by its key")?;
                Ok(Answer::Cosigned(line, at as i64))
            }
            StatusCode::CONFLICT => canonical_decimal(text.trim_end_matches('\n'))
                .map(Answer::Conflict)
                .ok_or_else(|| "409 without a tree size".to_owned()),
            status => Err(format!(
                "HTTP {status}: {}",
                text.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
        }
    }
}

/// A witness's answer.
enum Answer {
    /// Its cosignature line and timestamp.
    Cosigned(String, i64),
    /// Its latest cosigned size differs from the one sent.
    Conflict(u64),
}
