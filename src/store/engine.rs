//! What both engines plug into: the queue callers apply ops through, the writer loop
//! that batches them (group commit), and the `Store` implementation, which is the same
//! for both over an engine's read path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::sql::DbError;
use super::{unavailable, Applied, LedgerOp, StoreError};
use crate::metrics::Metrics;

/// One op waiting for the writer, and where its result goes.
pub(crate) struct Job {
    /// The op.
    pub(crate) op: LedgerOp,
    /// The caller (gone if it stopped waiting).
    pub(crate) reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// The results of a committed batch, one per job, in order.
pub(crate) type Outcomes = Vec<Result<Applied, StoreError>>;

/// The callers' side of the writer's queue.
pub(crate) struct Queue {
    jobs: mpsc::Sender<Job>,
    commit_timeout: Duration,
}

impl Queue {
    /// A queue of `capacity` jobs; the writer takes them from the receiver.
    pub(crate) fn new(capacity: usize, commit_timeout: Duration) -> (Self, mpsc::Receiver<Job>) {
        let (jobs, rx) = mpsc::channel(capacity);
        (
            Self {
                jobs,
                commit_timeout,
            },
            rx,
        )
    }

    /// How long a caller waits for a commit or a read.
    pub(crate) fn commit_timeout(&self) -> Duration {
        self.commit_timeout
    }

    /// Queues `op` and waits for its durable result, at most the commit timeout (then
    /// `Unavailable`: nothing is handed out without a durable record).
    pub(crate) async fn apply(&self, op: LedgerOp) -> Result<Applied, StoreError> {
        use tracing::Instrument as _;
        self.commit(op)
            .instrument(tracing::debug_span!("ledger.commit"))
            .await
    }

    async fn commit(&self, op: LedgerOp) -> Result<Applied, StoreError> {
        let (reply, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.commit_timeout;
        tokio::time::timeout_at(deadline, self.jobs.send(Job { op, reply }))
            .await
            .map_err(|_| unavailable("ledger queue full past the commit timeout"))?
            .map_err(|_| unavailable("ledger writer stopped"))?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unavailable("ledger writer stopped")),
            Err(_) => Err(unavailable("ledger commit timed out")),
        }
    }
}

/// Waits for a read that runs on a blocking thread, until `deadline` (then `Unavailable`;
/// the read itself finishes in the background).
pub(crate) async fn finish_read<T>(
    deadline: tokio::time::Instant,
    work: tokio::task::JoinHandle<Result<T, DbError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(r)) => r.map_err(StoreError::from),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("ledger read timed out")),
    }
}

/// How an engine's writer commits a batch.
pub(crate) trait Batches {
    /// Whether jobs whose caller stopped waiting are dropped before the batch commits.
    /// PostgreSQL: a caller that was told `Unavailable` (the database was down) must not
    /// see its op committed later, once the database is back.
    const SKIP_ABANDONED: bool;
    /// Applies the batch in one transaction; an op that fails is rolled back alone (to
    /// its savepoint) and answered with its error. `Err`: the transaction itself failed
    /// and was rolled back.
    fn commit(&mut self, batch: &[Job]) -> Result<Outcomes, DbError>;
    /// After a failed batch: forget what may no longer hold (the head).
    fn failed(&mut self);
}

/// The writer thread: takes everything queued (up to `max_batch`), commits it as one
/// batch, answers each caller. Ends when every sender is gone.
pub(crate) fn run<W: Batches>(
    mut writer: W,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if W::SKIP_ABANDONED {
            batch.retain(|j| !j.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
        }
        let started = Instant::now();
        let outcome = writer.commit(&batch);
        metrics.observe_commit(started.elapsed(), batch.len());
        match outcome {
            Ok(results) => {
                for (job, r) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "ledger commit failed; refusing the batch");
                metrics.ledger_failures.inc();
                writer.failed();
                let e = StoreError::from(e);
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Implements [`Store`](super::Store) for an engine type with
///
/// - a field `queue: Queue` (the writer's queue),
/// - `async fn read<T>(&self, f) -> Result<T, StoreError>`, running
///   `f: Fn(&mut dyn Tx) -> Result<T, DbError>` on its read path within the commit
///   timeout, and
/// - `async fn read_write<T>(&self, f)`, the same as one atomic unit that may write (claims).
///
/// A macro rather than a generic type: the two engines stay the public types they are
/// (`SqliteStore`, `PostgresStore`), and no crate-private trait leaks into a public bound.
/// The anonymous `const` scopes its imports.
macro_rules! impl_store {
    ($engine:ty) => {
        const _: () = {
            use ::futures::future::BoxFuture;
            use $crate::audit::StoredEntry;
            use $crate::domain::{
                AccessFilter, AccessRequest, BackendRevocation, IdempotencyRecord, Lease,
                LeaseFilter, LeaseId, Lock, RevocationEvent,
            };
            use $crate::merkle::Hash;
            use $crate::store::ops::{access, backend, lease, log, revoke, sink};
            use $crate::store::{
                Applied, Cosignature, FeedTail, IdentityStats, LedgerOp, SinkClaim, SinkPosition,
                Store, StoreError, StoredCheckpoint,
            };

            /// What every `Store` method returns.
            type Answer<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

            impl Store for $engine {
                fn apply(&self, op: LedgerOp) -> Answer<'_, Applied> {
                    Box::pin(self.queue.apply(op))
                }

                fn lease(&self, id: &LeaseId) -> Answer<'_, Option<Lease>> {
                    let id = id.to_string();
                    Box::pin(self.read(move |tx| lease::select(tx, &id)))
                }

                fn leases(&self, filter: LeaseFilter) -> Answer<'_, Vec<Lease>> {
                    Box::pin(self.read(move |tx| lease::list(tx, &filter)))
                }

                fn audit_entries(&self, after: u64, limit: u32) -> Answer<'_, Vec<StoredEntry>> {
                    Box::pin(self.read(move |tx| log::entries(tx, after, limit)))
                }

                fn access_request(&self, id: &str) -> Answer<'_, Option<AccessRequest>> {
                    let id = id.to_owned();
                    Box::pin(self.read(move |tx| access::select(tx, &id)))
                }

                fn access_requests(&self, filter: AccessFilter) -> Answer<'_, Vec<AccessRequest>> {
                    Box::pin(self.read(move |tx| access::list(tx, &filter)))
                }

                fn identity_stats(&self) -> Answer<'_, Vec<IdentityStats>> {
                    Box::pin(self.read(lease::identity_stats))
                }

                fn checkpoint(&self, size: Option<u64>) -> Answer<'_, Option<StoredCheckpoint>> {
                    Box::pin(self.read(move |tx| log::stored_checkpoint(tx, size)))
                }

                fn checkpoints(&self) -> Answer<'_, Vec<StoredCheckpoint>> {
                    Box::pin(self.read(log::checkpoints))
                }

                fn add_cosignature(&self, c: Cosignature) -> Answer<'_, ()> {
                    Box::pin(self.read_write(move |tx| log::add_cosignature(tx, &c)))
                }

                fn cosigned_size(&self, witness: &str) -> Answer<'_, Option<u64>> {
                    let witness = witness.to_owned();
                    Box::pin(self.read(move |tx| log::cosigned_size(tx, &witness)))
                }

                fn inclusion_proof(&self, index: u64, size: u64) -> Answer<'_, Option<Vec<Hash>>> {
                    Box::pin(self.read(move |tx| log::inclusion_proof(tx, index, size)))
                }

                fn consistency_proof(&self, old: u64, new: u64) -> Answer<'_, Option<Vec<Hash>>> {
                    Box::pin(self.read(move |tx| log::consistency_proof(tx, old, new)))
                }

                fn idempotency(
                    &self,
                    caller: &str,
                    key_hash: &str,
                ) -> Answer<'_, Option<IdempotencyRecord>> {
                    let (caller, key_hash) = (caller.to_owned(), key_hash.to_owned());
                    Box::pin(self.read(move |tx| lease::idempotency(tx, &caller, &key_hash)))
                }

                fn locks(&self, now: i64) -> Answer<'_, Vec<Lock>> {
                    Box::pin(self.read(move |tx| lease::locks(tx, now)))
                }

                fn revocation_tail(&self) -> Answer<'_, Option<FeedTail>> {
                    Box::pin(self.read(revoke::tail))
                }

                fn revocations(&self, after: u64, limit: u32) -> Answer<'_, Vec<RevocationEvent>> {
                    Box::pin(self.read(move |tx| revoke::events(tx, after, limit)))
                }

                fn claim_backend_revocations(
                    &self,
                    now: i64,
                    limit: u32,
                    hold_secs: u32,
                ) -> Answer<'_, Vec<BackendRevocation>> {
                    Box::pin(self.read_write(move |tx| backend::claim(tx, now, limit, hold_secs)))
                }

                fn pending_backend_revocations(
                    &self,
                    min_attempts: u32,
                    limit: u32,
                ) -> Answer<'_, Vec<BackendRevocation>> {
                    Box::pin(self.read(move |tx| backend::pending(tx, min_attempts, limit)))
                }

                fn entries_for_lease(&self, lease_id: &str) -> Answer<'_, Vec<StoredEntry>> {
                    let id = lease_id.to_owned();
                    Box::pin(self.read(move |tx| log::entries_for_lease(tx, &id)))
                }

                fn audit_sink(&self, claim: SinkClaim) -> Answer<'_, Option<SinkPosition>> {
                    Box::pin(self.read_write(move |tx| sink::claim(tx, &claim)))
                }
            }
        };
    };
}
pub(crate) use impl_store;
