//! Reading the verifiable log: signed checkpoints, inclusion proofs and entries.

use super::Broker;
use crate::audit::{AuditEvent, EventKind};
use crate::authn::VerifiedCaller;
use crate::clock::unix_millis;
use crate::domain::LeaseId;
use crate::error::BrokerError;

use crate::policy::AdminAction;
use crate::store::{LedgerOp, StoredCheckpoint};

/// Which audit entry to prove.
#[derive(Debug, Clone)]
pub enum EntrySelector {
    /// By sequence number.
    Sequence(u64),
    /// The issuance entry of a lease (a token's `jti`).
    Lease(LeaseId),
}

/// An inclusion proof of one audit entry against a signed checkpoint.
#[derive(Debug, Clone)]
pub struct InclusionProof {
    /// The entry's sequence.
    pub sequence: u64,
    /// Its leaf index.
    pub leaf_index: u64,
    /// Its leaf hash.
    pub leaf_hash: crate::merkle::Hash,
    /// Its canonical body.
    pub entry: String,
    /// The checkpoint proven against.
    pub checkpoint: StoredCheckpoint,
    /// The audit path.
    pub proof: Vec<crate::merkle::Hash>,
}

impl Broker {
    /// Signs a checkpoint of the audit log if it grew since the last one; returns the
    /// latest checkpoint (new or not), or `None` for an empty log.
    pub async fn checkpoint(&self) -> Result<Option<StoredCheckpoint>, BrokerError> {
        let Some(signer) = self.log_signer.clone() else {
            return Ok(None);
        };
        let applied = self
            .store
            .apply(LedgerOp::Checkpoint {
                signer,
                time_ms: unix_millis(self.clock.now()),
            })
            .await?;
        Ok(applied.checkpoint)
    }

    /// The log's verifier key, if the broker signs checkpoints.
    pub fn log_vkey(&self) -> Option<String> {
        self.log_signer.as_ref().map(|s| s.vkey())
    }

    /// A signed checkpoint (latest, or of `size`), with a consistency proof from `from`.
    pub async fn log_checkpoint(
        &self,
        caller: &VerifiedCaller,
        size: Option<u64>,
        from: Option<u64>,
    ) -> Result<(StoredCheckpoint, Vec<crate::merkle::Hash>), BrokerError> {
        self.admin(caller, AdminAction::ReadLog, "GetCheckpoint")
            .await?;
        let cp = match self.store.checkpoint(size).await? {
            Some(cp) => cp,
            None if size.is_none() => self
                .checkpoint()
                .await?
                .ok_or_else(|| BrokerError::NotFound("the log is empty".into()))?,
            None => {
                return Err(BrokerError::NotFound(
                    "no checkpoint of that tree size".into(),
                ))
            }
        };
        let proof = match from {
            None => Vec::new(),
            Some(old) => self
                .store
                .consistency_proof(old, cp.size)
                .await?
                .ok_or_else(|| {
                    BrokerError::InvalidArgument(format!(
                        "consistency_from {old} is beyond tree size {}",
                        cp.size
                    ))
                })?,
        };
        Ok((cp, proof))
    }

    /// The inclusion proof of one entry against a signed checkpoint. Platform admins may
    /// prove any entry; a lease holder may prove its own lease's issuance.
    pub async fn inclusion_proof(
        &self,
        caller: &VerifiedCaller,
        selector: EntrySelector,
        size: Option<u64>,
    ) -> Result<InclusionProof, BrokerError> {
        let entry = match &selector {
            EntrySelector::Sequence(seq) => {
                self.admin(caller, AdminAction::ReadLog, "GetInclusionProof")
                    .await?;
                self.store
                    .audit_entries(seq.saturating_sub(1), 1)
                    .await?
                    .into_iter()
                    .find(|e| e.seq == *seq)
            }
            EntrySelector::Lease(id) => {
                let entries = self.store.entries_for_lease(id.as_str()).await?;
                let issue = entries
                    .into_iter()
                    .find(|e| e.kind == EventKind::Issue.as_str());
                let holder = issue.as_ref().and_then(|e| {
                    serde_json::from_str::<AuditEvent>(&e.body)
                        .ok()
                        .and_then(|b| b.caller)
                });
                if holder.as_deref() != Some(caller.id().to_string().as_str()) {
                    self.admin(caller, AdminAction::ReadLog, "GetInclusionProof")
                        .await?;
                }
                issue
            }
        }
        .ok_or_else(|| BrokerError::NotFound("no such audit entry".into()))?;
        let mut cp =
            match size {
                Some(n) => self.store.checkpoint(Some(n)).await?.ok_or_else(|| {
                    BrokerError::NotFound("no checkpoint of that tree size".into())
                })?,
                None => match self.store.checkpoint(None).await? {
                    Some(cp) => cp,
                    None => self
                        .checkpoint()
                        .await?
                        .ok_or_else(|| BrokerError::NotFound("the log is empty".into()))?,
                },
            };
        if entry.seq > cp.size {
            if size.is_some() {
                return Err(BrokerError::InvalidArgument(format!(
                    "entry {} is not in the tree of size {}",
                    entry.seq, cp.size
                )));
            }
            // Newer than every checkpoint: sign one now so the receipt can be proven.
            cp = self
                .checkpoint()
                .await?
                .ok_or_else(|| BrokerError::Internal("no checkpoint after appending".into()))?;
        }
        let proof = self
            .store
            .inclusion_proof(entry.seq - 1, cp.size)
            .await?
            .ok_or_else(|| BrokerError::Internal("proof out of range".into()))?;
        Ok(InclusionProof {
            sequence: entry.seq,
            leaf_index: entry.seq - 1,
            leaf_hash: crate::merkle::leaf_hash(entry.body.as_bytes()),
            entry: entry.body,
            checkpoint: cp,
            proof,
        })
    }

    /// Audit entries after `after`, in order (platform admin only).
    pub async fn audit_events(
        &self,
        caller: &VerifiedCaller,
        after: u64,
        limit: u32,
    ) -> Result<Vec<crate::audit::StoredEntry>, BrokerError> {
        self.admin(caller, AdminAction::ReadLog, "ListAuditEvents")
            .await?;
        Ok(self
            .store
            .audit_entries(after, limit.clamp(1, 1000))
            .await?)
    }
}
