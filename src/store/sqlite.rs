//! The embedded ledger: SQLite in WAL mode with `synchronous=FULL` and group commit.
//!
//! One writer thread owns the write connection. Requests queue on a channel; the writer
//! takes everything queued (up to `max_batch`), applies each op inside its own
//! savepoint of one `BEGIN IMMEDIATE` transaction, and commits once: many issuances share
//! one fsync. A caller waits at most `commit_timeout` for its reply and otherwise gets
//! `Unavailable`; nothing is handed out without a durable record.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::{Applied, LedgerOp, Receipt, Refusal, Store, StoreError};
use crate::audit::{entry_hash, AuditEvent, ChainError, ChainVerifier, StoredEntry};
use crate::config::LedgerConfig;
use crate::domain::{
    Intent, Lease, LeaseFilter, LeaseId, LeaseState, ProfileName, RevokeSelector, Scope,
};
use crate::metrics::Metrics;

/// Numbered migrations; `schema_migrations` records which ran.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "ledger", include_str!("migrations/0001_ledger.sql"))];

struct Job {
    op: LedgerOp,
    reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// The SQLite store.
pub struct SqliteStore {
    tx: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    commit_timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn open(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )?;
    for (version, name, sql) in MIGRATIONS {
        let done: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()?;
        if done.is_none() {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, strftime('%s','now'))",
                params![version, name],
            )?;
        }
    }
    tx.commit()
}

/// The chain head the writer appends to.
#[derive(Clone, Copy)]
struct Head {
    seq: u64,
    hash: [u8; 32],
}

fn load_head(conn: &Connection) -> rusqlite::Result<Head> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        None => Head {
            seq: 0,
            hash: [0; 32],
        },
        Some((seq, h)) => {
            let mut hash = [0u8; 32];
            if h.len() == 32 {
                hash.copy_from_slice(&h);
            }
            Head {
                seq: seq as u64,
                hash,
            }
        }
    })
}

impl SqliteStore {
    /// Opens (creating and migrating) the ledger at `path` and starts the writer.
    pub fn open(
        path: &Path,
        cfg: &LedgerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut writer = open(path, cfg.busy_timeout).map_err(unavailable)?;
        migrate(&mut writer).map_err(|e| unavailable(format!("migration failed: {e}")))?;
        let head = load_head(&writer).map_err(unavailable)?;
        let reader = open(path, cfg.busy_timeout).map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(cfg.max_batch * 16);
        let max_batch = cfg.max_batch;
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer_loop(writer, head, rx, max_batch, metrics))
            .map_err(unavailable)?;
        Ok(Self {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            commit_timeout: cfg.commit_timeout,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        let work = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        });
        match tokio::time::timeout(self.commit_timeout, work).await {
            Ok(Ok(r)) => r.map_err(unavailable),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("ledger read timed out")),
        }
    }

    /// Verifies the whole audit chain of a ledger file, read-only, without a broker.
    pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| VerifyError::Open(format!("{}: {e}", path.display())))?;
        let mut stmt = conn
            .prepare(
                "SELECT seq, kind, lease_id, body, prev_hash, hash FROM audit_log ORDER BY seq",
            )
            .map_err(|e| VerifyError::Open(e.to_string()))?;
        let rows = stmt
            .query_map([], entry_from_row)
            .map_err(|e| VerifyError::Open(e.to_string()))?;
        let mut v = ChainVerifier::default();
        for row in rows {
            let e = row.map_err(|e| VerifyError::Open(e.to_string()))?;
            v.push(&e).map_err(VerifyError::Chain)?;
        }
        let (entries, head) = v.finish();
        Ok(VerifyReport {
            path: path.to_owned(),
            entries,
            head_hash: hex::encode(head),
        })
    }
}

/// A successful offline verification.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The file checked.
    pub path: PathBuf,
    /// Entries verified.
    pub entries: u64,
    /// Hash of the last entry.
    pub head_hash: String,
}

/// Why offline verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read ledger: {0}")]
    Open(String),
    /// The chain is broken.
    #[error("{0}")]
    Chain(ChainError),
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEntry> {
    Ok(StoredEntry {
        seq: r.get::<_, i64>(0)? as u64,
        kind: r.get(1)?,
        lease_id: r.get(2)?,
        body: r.get(3)?,
        prev_hash: r.get(4)?,
        hash: r.get(5)?,
    })
}

const LEASE_COLUMNS: &str =
    "id, profile, spiffe_id, scopes, audience, state, issued_at, expires_at, \
     max_expires_at, credential_sha256, renewals, ended_at, end_reason, intent";

fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            what.to_owned().into(),
        )
    };
    let id: String = r.get(0)?;
    let profile: String = r.get(1)?;
    let scopes: String = r.get(3)?;
    let state: String = r.get(5)?;
    let intent: Option<String> = r.get(13)?;
    Ok(Lease {
        id: LeaseId::parse(&id).map_err(|_| bad(0, "lease id"))?,
        profile: ProfileName::parse(&profile).map_err(|_| bad(1, "profile"))?,
        spiffe_id: r.get(2)?,
        scopes: serde_json::from_str::<Vec<Scope>>(&scopes).map_err(|_| bad(3, "scopes"))?,
        audience: r.get(4)?,
        state: LeaseState::from_db(&state).ok_or_else(|| bad(5, "state"))?,
        issued_at: r.get(6)?,
        expires_at: r.get(7)?,
        max_expires_at: r.get(8)?,
        credential_sha256: r.get(9)?,
        renewals: r.get(10)?,
        ended_at: r.get(11)?,
        end_reason: r.get(12)?,
        intent: match intent {
            None => None,
            Some(s) => Some(serde_json::from_str::<Intent>(&s).map_err(|_| bad(13, "intent"))?),
        },
    })
}

fn select_lease(conn: &Connection, id: &str) -> rusqlite::Result<Option<Lease>> {
    conn.query_row(
        &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1"),
        [id],
        lease_from_row,
    )
    .optional()
}

fn append(conn: &Connection, head: &mut Head, event: &AuditEvent) -> rusqlite::Result<Receipt> {
    let seq = head.seq + 1;
    let body = event.canonical();
    let hash = entry_hash(seq, &head.hash, &body);
    conn.prepare_cached(
        "INSERT INTO audit_log (seq, time_ms, kind, caller, lease_id, body, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        seq as i64,
        event.time_ms,
        event.kind.as_str(),
        event.caller,
        event.lease_id,
        body,
        head.hash.as_slice(),
        hash.as_slice()
    ])?;
    *head = Head { seq, hash };
    Ok(Receipt {
        sequence: seq,
        entry_hash: hex::encode(hash),
    })
}

/// Records a refused transition: the same event, marked as a denial with the reason.
fn refuse(
    conn: &Connection,
    head: &mut Head,
    mut event: AuditEvent,
    refusal: Refusal,
) -> rusqlite::Result<Applied> {
    event.decision = "deny".into();
    event.reason = Some(refusal.describe());
    event.credential_sha256 = None;
    event.expires_at = None;
    let receipt = append(conn, head, &event)?;
    Ok(Applied {
        receipt: Some(receipt),
        lease: None,
        affected: Vec::new(),
        refused: Some(refusal),
    })
}

fn guard(lease: Option<Lease>, holder: &str, now: i64) -> Result<Lease, Refusal> {
    let lease = lease.ok_or(Refusal::NotFound)?;
    if lease.spiffe_id != holder {
        return Err(Refusal::NotHolder);
    }
    if lease.state != LeaseState::Active {
        return Err(Refusal::Ended(lease.state));
    }
    if lease.expires_at <= now {
        return Err(Refusal::Expired);
    }
    Ok(lease)
}

fn apply_op(conn: &Connection, head: &mut Head, op: LedgerOp) -> rusqlite::Result<Applied> {
    match op {
        LedgerOp::Issue { lease, event } => {
            conn.prepare_cached(&format!(
                "INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ))?
            .execute(params![
                lease.id.as_str(),
                lease.profile.as_str(),
                lease.spiffe_id,
                serde_json::to_string(&lease.scopes).unwrap_or_default(),
                lease.audience,
                lease.state.as_str(),
                lease.issued_at,
                lease.expires_at,
                lease.max_expires_at,
                lease.credential_sha256,
                lease.renewals,
                lease.ended_at,
                lease.end_reason,
                lease.intent.as_ref().map(|i| serde_json::to_string(i).unwrap_or_default()),
            ])?;
            let receipt = append(conn, head, &event)?;
            Ok(Applied {
                receipt: Some(receipt),
                lease: Some(lease),
                affected: Vec::new(),
                refused: None,
            })
        }
        LedgerOp::Renew {
            lease_id,
            holder,
            now,
            expires_at,
            credential_sha256,
            event,
        } => match guard(select_lease(conn, lease_id.as_str())?, &holder, now) {
            Err(r) => refuse(conn, head, event, r),
            Ok(lease) => {
                let expires_at = expires_at.min(lease.max_expires_at);
                conn.execute(
                    "UPDATE leases SET expires_at = ?2, credential_sha256 = ?3, renewals = renewals + 1
                     WHERE id = ?1 AND state = 'active'",
                    params![lease_id.as_str(), expires_at, credential_sha256],
                )?;
                let receipt = append(conn, head, &event)?;
                Ok(Applied {
                    receipt: Some(receipt),
                    lease: select_lease(conn, lease_id.as_str())?,
                    affected: Vec::new(),
                    refused: None,
                })
            }
        },
        LedgerOp::Release {
            lease_id,
            holder,
            now,
            event,
        } => match guard(select_lease(conn, lease_id.as_str())?, &holder, now) {
            Err(r) => refuse(conn, head, event, r),
            Ok(_) => {
                conn.execute(
                    "UPDATE leases SET state = 'released', ended_at = ?2, end_reason = 'released by holder'
                     WHERE id = ?1 AND state = 'active'",
                    params![lease_id.as_str(), now],
                )?;
                let receipt = append(conn, head, &event)?;
                Ok(Applied {
                    receipt: Some(receipt),
                    lease: select_lease(conn, lease_id.as_str())?,
                    affected: vec![lease_id.to_string()],
                    refused: None,
                })
            }
        },
        LedgerOp::Revoke {
            selector,
            reason,
            now,
            mut event,
        } => {
            let end_reason = format!("revoked: {reason}");
            let ids: Vec<String> = match &selector {
                RevokeSelector::Lease(id) => {
                    let mut stmt = conn.prepare_cached(
                        "UPDATE leases SET state = 'revoked', ended_at = ?2, end_reason = ?3
                         WHERE id = ?1 AND state = 'active' RETURNING id",
                    )?;
                    let rows =
                        stmt.query_map(params![id.as_str(), now, end_reason], |r| r.get(0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                }
                RevokeSelector::SpiffeId(sid) => {
                    let mut stmt = conn.prepare_cached(
                        "UPDATE leases SET state = 'revoked', ended_at = ?2, end_reason = ?3
                         WHERE spiffe_id = ?1 AND state = 'active' RETURNING id",
                    )?;
                    let rows = stmt.query_map(params![sid, now, end_reason], |r| r.get(0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                }
            };
            let mut ids = ids;
            ids.sort();
            event.affected_leases = ids.clone();
            if ids.is_empty() {
                let refusal = match &selector {
                    RevokeSelector::Lease(id) => match select_lease(conn, id.as_str())? {
                        None => Refusal::NotFound,
                        Some(l) => Refusal::Ended(l.state),
                    },
                    RevokeSelector::SpiffeId(_) => Refusal::NothingMatched,
                };
                // An empty revocation is still an operator action worth recording.
                event.reason = Some(format!("{reason} ({})", refusal.describe()));
                let receipt = append(conn, head, &event)?;
                return Ok(Applied {
                    receipt: Some(receipt),
                    lease: None,
                    affected: ids,
                    refused: Some(refusal),
                });
            }
            let receipt = append(conn, head, &event)?;
            let lease = match &selector {
                RevokeSelector::Lease(id) => select_lease(conn, id.as_str())?,
                RevokeSelector::SpiffeId(_) => None,
            };
            Ok(Applied {
                receipt: Some(receipt),
                lease,
                affected: ids,
                refused: None,
            })
        }
        LedgerOp::Expire {
            now,
            limit,
            mut event,
        } => {
            let mut stmt = conn.prepare_cached(
                "UPDATE leases SET state = 'expired', ended_at = expires_at, end_reason = 'ttl elapsed'
                 WHERE id IN (SELECT id FROM leases WHERE state = 'active' AND expires_at <= ?1
                              ORDER BY expires_at LIMIT ?2)
                 RETURNING id",
            )?;
            let mut ids: Vec<String> = stmt
                .query_map(params![now, limit], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            ids.sort();
            if ids.is_empty() {
                return Ok(Applied {
                    receipt: None,
                    lease: None,
                    affected: ids,
                    refused: None,
                });
            }
            event.affected_leases = ids.clone();
            let receipt = append(conn, head, &event)?;
            Ok(Applied {
                receipt: Some(receipt),
                lease: None,
                affected: ids,
                refused: None,
            })
        }
        LedgerOp::Record { event } => {
            let receipt = append(conn, head, &event)?;
            Ok(Applied {
                receipt: Some(receipt),
                lease: None,
                affected: Vec::new(),
                refused: None,
            })
        }
    }
}

fn writer_loop(
    mut conn: Connection,
    mut head: Head,
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
        let started = Instant::now();
        let outcome = commit_batch(&mut conn, &mut head, &mut batch);
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
                // The transaction rolled back: re-read the head so the chain stays exact.
                if let Ok(h) = load_head(&conn) {
                    head = h;
                }
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(unavailable(&e)));
                }
            }
        }
    }
}

/// Applies a batch in one transaction. An op whose SQL fails is rolled back to its
/// savepoint and answered with `Unavailable`; the others still commit. A failure of the
/// transaction itself (begin or commit) fails the whole batch.
fn commit_batch(
    conn: &mut Connection,
    head: &mut Head,
    batch: &mut [Job],
) -> rusqlite::Result<Vec<Result<Applied, StoreError>>> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut tentative = *head;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.iter() {
        let before = tentative;
        let sp = tx.savepoint()?;
        match apply_op(&sp, &mut tentative, job.op.clone()) {
            Ok(applied) => {
                sp.commit()?;
                results.push(Ok(applied));
            }
            Err(e) => {
                drop(sp); // rolls back this op only
                tentative = before;
                tracing::error!(error = %e, "ledger op failed");
                results.push(Err(unavailable(e)));
            }
        }
    }
    tx.set_drop_behavior(rusqlite::DropBehavior::Rollback);
    tx.commit()?;
    *head = tentative;
    Ok(results)
}

impl Store for SqliteStore {
    fn apply(&self, op: LedgerOp) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let deadline = tokio::time::Instant::now() + self.commit_timeout;
            tokio::time::timeout_at(deadline, self.tx.send(Job { op, reply }))
                .await
                .map_err(|_| unavailable("ledger queue full past the commit timeout"))?
                .map_err(|_| unavailable("ledger writer stopped"))?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(unavailable("ledger writer stopped")),
                Err(_) => Err(unavailable("ledger commit timed out")),
            }
        })
    }

    fn lease(&self, id: &LeaseId) -> BoxFuture<'_, Result<Option<Lease>, StoreError>> {
        let id = id.to_string();
        Box::pin(self.read(move |c| select_lease(c, &id)))
    }

    fn leases(&self, filter: LeaseFilter) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        Box::pin(self.read(move |c| {
            let (before_at, before_id) = filter.before.clone().unwrap_or((i64::MAX, String::new()));
            let has_cursor = filter.before.is_some();
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases
                 WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR state = ?2)
                   AND (?3 = 0 OR issued_at < ?4 OR (issued_at = ?4 AND id < ?5))
                 ORDER BY issued_at DESC, id DESC LIMIT ?6"
            ))?;
            let rows = stmt.query_map(
                params![
                    filter.spiffe_id,
                    filter.state.map(|s| s.as_str()),
                    has_cursor as i64,
                    before_at,
                    before_id,
                    filter.limit.clamp(1, 1000)
                ],
                lease_from_row,
            )?;
            rows.collect()
        }))
    }

    fn audit_entries(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<StoredEntry>, StoreError>> {
        Box::pin(self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, kind, lease_id, body, prev_hash, hash FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit], entry_from_row)?;
            rows.collect()
        }))
    }
}
