//! Witnesses of the audit log (`c2sp.org/tlog-witness`): the broker submits each new
//! checkpoint with a consistency proof from the last one a witness cosigned
//! ([`submit`]), and `spiffe-broker witness` is a witness another team can run
//! ([`service`]). A witness cosigns a checkpoint only if it is consistent with everything
//! it cosigned before for that log, so two views of one log (a split view) or a shorter
//! tree (a rollback, a restore from an old backup) get no cosignature.
//!
//! This module holds the wire format both sides share: the `add-checkpoint` request body
//!
//! ```text
//! old <size>
//! <consistency proof hash, base64>   (zero to 63 lines)
//!
//! <signed checkpoint note>
//! ```
//!
//! answered by `200` with cosignature lines, or `409 Conflict` with the witness's size
//! (`text/x.tlog.size`) when `old` is not the size it last cosigned.

pub mod service;
pub mod submit;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::checkpoint::canonical_decimal;
use crate::merkle::Hash;

/// The submission path under a witness's URL prefix.
pub const ADD_CHECKPOINT: &str = "/add-checkpoint";

/// Content type of a `409 Conflict` answer: the witness's latest cosigned size.
pub const SIZE_CONTENT_TYPE: &str = "text/x.tlog.size";

/// Most consistency proof lines a request may carry (a proof of a 2^63-leaf tree).
const MAX_PROOF_LINES: usize = 63;

/// An `add-checkpoint` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the witness's latest cosigned checkpoint, as the submitter believes.
    pub old: u64,
    /// The consistency proof from `old` to the checkpoint's size (empty from 0).
    pub proof: Vec<Hash>,
    /// The signed checkpoint note.
    pub note: String,
}

impl AddCheckpoint {
    /// The request body.
    pub fn encode(&self) -> String {
        let mut body = format!("old {}\n", self.old);
        for h in &self.proof {
            body.push_str(&STANDARD.encode(h));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.note);
        body
    }

    /// Parses a request body; the error says what is malformed.
    pub fn decode(body: &str) -> Result<Self, String> {
        let (head, note) = body
            .split_once("\n\n")
            .ok_or("no empty line before the checkpoint")?;
        let mut lines = head.split('\n');
        let old = lines
            .next()
            .and_then(|l| l.strip_prefix("old "))
            .and_then(canonical_decimal)
            .ok_or("the first line is not `old <size>` in canonical decimal")?;
        let proof = lines
            .map(|l| {
                STANDARD
                    .decode(l)
                    .ok()
                    .and_then(|h| Hash::try_from(h).ok())
                    .ok_or_else(|| format!("proof line {l:?} is not a base64 SHA-256 hash"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if proof.len() > MAX_PROOF_LINES {
            return Err(format!("more than {MAX_PROOF_LINES} proof lines"));
        }
        Ok(Self {
            old,
            proof,
            note: note.to_owned(),
        })
    }
}

/// Where a witness serves its latest cosigned checkpoint of a log (its monitoring API):
/// `/<hex SHA-256 of the origin>/checkpoint`.
pub fn checkpoint_path(origin: &str) -> String {
    format!(
        "/{}/checkpoint",
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            origin.as_bytes()
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_malformed_ones_are_named() {
        let req = AddCheckpoint {
            old: 20,
            proof: vec![[1; 32], [2; 32]],
            note: "example.org/log\n21\nAAAA\n\n\u{2014} example.org/log sig\n".into(),
        };
        let body = req.encode();
        assert!(body.starts_with("old 20\nAQEB"));
        assert_eq!(AddCheckpoint::decode(&body), Ok(req));
        assert!(
            AddCheckpoint::decode("old 01\n\nx").is_err(),
            "leading zero"
        );
        assert!(AddCheckpoint::decode("old 1\nnot-base64\n\nx").is_err());
        assert!(AddCheckpoint::decode("old 1\n").is_err(), "no blank line");
        let long = format!(
            "old 1\n{}\nx",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n".repeat(64)
        );
        assert!(AddCheckpoint::decode(&long).is_err(), "64 proof lines");
    }
}
