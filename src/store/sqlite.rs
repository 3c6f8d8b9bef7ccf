//! The embedded ledger: SQLite in WAL mode with `synchronous=FULL` and group commit.
//!
//! One writer thread owns the write connection. Requests queue on a channel; the writer
//! takes everything queued (up to `max_batch`), applies the ops in one `BEGIN IMMEDIATE`
//! transaction (op by op in savepoints only if one fails), and commits once: many
//! issuances share one fsync. A caller waits at most `commit_timeout` for its reply and
//! otherwise gets `Unavailable`; nothing is handed out without a durable record.
//!
//! The ops themselves are shared with PostgreSQL (`super::ops`, over `Tx`); this file
//! is SQLite's part: opening and migrating the file, the writer's transaction, the read
//! connection, offline verification, and SQLite's `Tx` (`$N` placeholders become `?N`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::engine::{self, Batches, Job, Outcomes, Queue};
use super::ops::log::{self as oplog, Head};
use super::ops::{self, rows};
use super::sql::{self, Cell, DbError, Dialect, Row, Tx, Value};
use super::{unavailable, StoreError};
use crate::audit::{LogError, LogReport, LogVerifier};
use crate::checkpoint::VerifierKey;
use crate::config::LedgerConfig;
use crate::merkle::leaf_hash;
use crate::metrics::Metrics;

/// Numbered migrations; `schema_migrations` records which ran.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "ledger", include_str!("migrations/0001_ledger.sql")),
    (
        2,
        "approvals_inventory",
        include_str!("migrations/0002_approvals_inventory.sql"),
    ),
    (3, "merkle", include_str!("migrations/0003_merkle.sql")),
    (
        4,
        "revocation",
        include_str!("migrations/0004_revocation.sql"),
    ),
    (5, "backends", include_str!("migrations/0005_backends.sql")),
    (
        6,
        "audit_sinks",
        include_str!("migrations/0006_audit_sinks.sql"),
    ),
    (
        7,
        "delegation",
        include_str!("migrations/0007_delegation.sql"),
    ),
    (
        8,
        "cosignatures",
        include_str!("migrations/0008_cosignatures.sql"),
    ),
    (
        9,
        "active lease indexes",
        include_str!("migrations/0009_active_lease_indexes.sql"),
    ),
];

/// The SQLite store.
pub struct SqliteStore {
    queue: Queue,
    reader: Arc<Mutex<Connection>>,
}

fn open(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // 32 MiB of page cache (the default is 2 MiB): at a million leases the random-key
    // indexes no longer fit the default and every write would wait on page reads.
    conn.pragma_update(None, "cache_size", -32768)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every op runs in its own savepoint; keep those statement journals in memory instead
    // of spilling a batch's pages past 64 KiB to a temporary file that is created, written
    // and closed per commit (savepoint journalling was a fifth of the writer's profile).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoints stay on the writer (SQLite's auto-checkpoint after a commit): only a
    // checkpoint that runs between the writer's transactions lets the next one restart
    // the WAL. A background PASSIVE checkpointer racing a busy writer never did, and the
    // WAL grew without bound (27.8 GB in six minutes of load). After a burst, the WAL file
    // is cut back to this size when it restarts.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    // Every statement is prepared once per connection (`prepare_cached`); the ops use
    // about sixty, more than the default cache of 16 holds.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Creates the ledger file owner-only (0600) or tightens an existing one. SQLite gives the
/// `-wal` and `-shm` files the database file's mode, so this covers them too. The ledger
/// holds who asked for what and sealed idempotent credentials: nobody else needs to read it.
fn restrict_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path.as_os_str() == ":memory:" {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "ledger was readable by others; set to 0600");
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Runs the migrations that have not run, in one transaction.
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

/// SQLite's [`Tx`]: a connection, or a transaction or savepoint on one (they deref to
/// it). Statements are prepared once per connection (`prepare_cached`).
pub(crate) struct SqliteTx<'c>(pub(crate) &'c Connection);

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            // SQLite has no boolean type: 0 or 1, as the schema's triggers expect.
            Value::Bool(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*v))),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Value::Bytes(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
            Value::List(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no arrays (a PostgreSQL-only statement ran on SQLite)".into(),
                ))
            }
        })
    }
}

/// A result row as read, for the shared decoders.
fn to_row(r: &rusqlite::Row<'_>, names: &Arc<[String]>) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let cells = (0..names.len())
        .map(|i| {
            Ok(match r.get_ref(i)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Real(v),
                ValueRef::Text(t) => match std::str::from_utf8(t) {
                    Ok(t) => Cell::Text(t.to_owned()),
                    // Not text after all: the decoder reports it as the wrong type.
                    Err(_) => Cell::Bytes(t.to_vec()),
                },
                ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
            })
        })
        .collect::<rusqlite::Result<_>>()?;
    Ok(Row::new(names.clone(), cells))
}

fn column_names(stmt: &rusqlite::Statement<'_>) -> Arc<[String]> {
    stmt.column_names()
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into()
}

impl Tx for SqliteTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(&sql::to_sqlite_placeholders(sql))?;
        let names = column_names(&stmt);
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(to_row(r, &names)?);
        }
        Ok(out)
    }

    fn query_opt(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Option<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(&sql::to_sqlite_placeholders(sql))?;
        let names = column_names(&stmt);
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        Ok(match rows.next()? {
            Some(r) => Some(to_row(r, &names)?),
            None => None,
        })
    }

    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(&sql::to_sqlite_placeholders(sql))?;
        Ok(stmt.execute(rusqlite::params_from_iter(args))? as u64)
    }
}

/// Loads the chain head and the tree frontier, first hashing any entries that have no
/// leaf yet (a ledger created before the Merkle tree existed), a page at a time.
fn load_head(conn: &Connection) -> Result<Head, DbError> {
    let tx = &mut SqliteTx(conn);
    let leaves = oplog::tree_size(tx)?;
    let mut tree = oplog::frontier(tx, leaves)?;
    loop {
        let page = tx.query(
            "SELECT body FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000",
            &[Value::Int(tree.size() as i64)],
        )?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            let nodes = tree.append(leaf_hash(r.text(0)?.as_bytes()));
            oplog::insert_nodes(tx, &nodes)?;
        }
    }
    let (seq, hash) = oplog::chain_top(tx)?;
    Ok(Head { seq, hash, tree })
}

impl SqliteStore {
    /// Opens (creating and migrating) the ledger at `path` and starts the writer.
    pub fn open(
        path: &Path,
        cfg: &LedgerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        restrict_mode(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let mut writer = open(path, cfg.busy_timeout).map_err(unavailable)?;
        migrate(&mut writer).map_err(|e| unavailable(format!("migration failed: {e}")))?;
        let head = {
            let tx = writer
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let head = load_head(&tx).map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            head
        };
        let reader = open(path, cfg.busy_timeout).map_err(unavailable)?;
        let (queue, rx) = Queue::new(cfg.max_batch * 16, cfg.commit_timeout);
        let max_batch = cfg.max_batch;
        let writer = Writer { conn: writer, head };
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || engine::run(writer, rx, max_batch, metrics))
            .map_err(unavailable)?;
        Ok(Self {
            queue,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Runs `f` on the read connection, on a blocking thread, within the commit timeout.
    async fn on_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.queue.commit_timeout();
        let reader = self.reader.clone();
        let work = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        });
        engine::finish_read(deadline, work).await
    }

    /// A read (see `engine::impl_store!`).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_reader(move |c| f(&mut SqliteTx(c))).await
    }

    /// A read that then writes what it read (claims), as one transaction that holds
    /// SQLite's write lock from the start (`BEGIN IMMEDIATE`): a concurrent claimer
    /// (another process on the same file) waits, then finds these rows changed.
    async fn read_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_reader(move |c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let v = f(&mut SqliteTx(&tx))?;
            tx.commit()?;
            Ok(v)
        })
        .await
    }

    /// [`Self::verify_file_with`] with the log key the broker wrote next to the ledger
    /// (`keys/log.vkey`). An auditor should pin the key instead.
    pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
        let vkey_path = path
            .parent()
            .unwrap_or(Path::new("."))
            .join("keys")
            .join("log.vkey");
        let text = std::fs::read_to_string(&vkey_path)
            .map_err(|e| VerifyError::Open(format!("{}: {e}", vkey_path.display())))?;
        let vkey = VerifierKey::parse(&text)
            .map_err(|e| VerifyError::Open(format!("{}: {e}", vkey_path.display())))?;
        Self::verify_file_with(path, &vkey)
    }

    /// Verifies a ledger file offline and read-only: every entry's encoding and hash
    /// chain, the Merkle tree, and every signed checkpoint against `vkey`.
    pub fn verify_file_with(path: &Path, vkey: &VerifierKey) -> Result<VerifyReport, VerifyError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| VerifyError::Open(format!("{}: {e}", path.display())))?;
        let open = |e: rusqlite::Error| VerifyError::Open(e.to_string());
        let notes: Vec<(u64, String)> = {
            let mut stmt = conn
                .prepare("SELECT size, note, root FROM checkpoints ORDER BY size")
                .map_err(open)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(open)?;
            let rows: Vec<(u64, String, Vec<u8>)> = rows.collect::<Result<_, _>>().map_err(open)?;
            // The root column is what GetCheckpoint serves: it must be the signed one.
            for (size, note, root) in &rows {
                let signed = vkey.verify(note).map_err(|e| {
                    VerifyError::Log(LogError::Checkpoint {
                        size: *size,
                        reason: e.0,
                    })
                })?;
                if signed.root.as_slice() != root.as_slice() {
                    return Err(VerifyError::Log(LogError::Checkpoint {
                        size: *size,
                        reason: "stored root differs from the signed note".into(),
                    }));
                }
            }
            let mut cosigned: Vec<(u64, String)> = rows
                .into_iter()
                .map(|(size, note, _)| (size, note))
                .collect();
            // Witness cosignations (a ledger from before 0008 has none).
            let has_table = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'cosignatures'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(open)?
                > 0;
            if has_table {
                let mut stmt = conn
                    .prepare("SELECT size, line FROM cosignatures ORDER BY size, witness")
                    .map_err(open)?;
                let lines = stmt
                    .query_map([], |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
                    })
                    .map_err(open)?;
                for line in lines {
                    let (size, line) = line.map_err(open)?;
                    if let Ok(i) = cosigned.binary_search_by_key(&size, |(s, _)| *s) {
                        cosigned[i].1.push_str(&line);
                    }
                }
            }
            cosigned
        };
        let mut v = LogVerifier::new(&notes, vkey).map_err(VerifyError::Log)?;
        let mut stmt = conn
            .prepare(
                "SELECT a.seq, a.kind, a.lease_id, a.body, a.prev_hash, a.hash, m.hash
                 FROM audit_log a LEFT JOIN merkle_nodes m ON m.level = 0 AND m.idx = a.seq - 1
                 ORDER BY a.seq",
            )
            .map_err(open)?;
        let names = column_names(&stmt);
        let mut cursor = stmt.query([]).map_err(open)?;
        let bad = |e: DbError| VerifyError::Open(e.to_string());
        while let Some(r) = cursor.next().map_err(open)? {
            let row = to_row(r, &names).map_err(open)?;
            let leaf = row.opt_bytes(6).map_err(bad)?;
            v.push(
                &rows::entry(&row).map_err(bad)?,
                Some(leaf.as_deref().unwrap_or_default()),
            )
            .map_err(VerifyError::Log)?;
        }
        let report = v.finish().map_err(VerifyError::Log)?;
        Ok(VerifyReport {
            path: path.to_owned(),
            entries: report.entries,
            head_hash: report.head_hash.clone(),
            report,
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
    /// Hash-chain head.
    pub head_hash: String,
    /// Everything that was established.
    pub report: LogReport,
}

/// Why offline verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read ledger: {0}")]
    Open(String),
    /// The log is inconsistent; names the first bad entry or checkpoint.
    #[error("{0}")]
    Log(LogError),
}

/// The writer thread's state: the write connection and the head after the last commit
/// (the writer is the only one appending to this file).
struct Writer {
    conn: Connection,
    head: Head,
}

impl Batches for Writer {
    const SKIP_ABANDONED: bool = false;

    /// One `BEGIN IMMEDIATE` transaction and one fsync for the whole batch. The ops run
    /// one after another in it; should one fail, the batch rolls back and runs again with
    /// each op in its own savepoint, so that only the failing op is refused. (A savepoint
    /// per op on every batch copied each page an op touched into its statement journal: a
    /// tenth of the writer's time, spent for a failure that almost never happens.)
    fn commit(&mut self, batch: &[Job]) -> Result<Outcomes, DbError> {
        match self.commit_together(batch)? {
            Some(results) => Ok(results),
            None => self.commit_each_alone(batch),
        }
    }

    /// The transaction rolled back: re-read the head so the chain stays exact.
    fn failed(&mut self) {
        if let Ok(h) = load_head(&self.conn) {
            self.head = h;
        }
    }
}

impl Writer {
    /// The batch with no savepoints; `None` (rolled back) if an op failed.
    fn commit_together(&mut self, batch: &[Job]) -> Result<Option<Outcomes>, DbError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut head = self.head.clone();
        let mut tally = ops::Tally::default();
        let mut results = Vec::with_capacity(batch.len());
        for job in batch {
            match ops::apply(&mut SqliteTx(&tx), &mut head, job.op.clone(), &mut tally) {
                Ok(applied) => results.push(Ok(applied)),
                Err(e) => {
                    tracing::warn!(error = %e, "ledger op failed; applying the batch op by op");
                    return Ok(None);
                }
            }
        }
        tally.write(&mut SqliteTx(&tx))?;
        tx.commit()?;
        self.head = head;
        Ok(Some(results))
    }

    /// The batch with each op in its own savepoint: an op that fails is rolled back alone
    /// and answered with its error.
    fn commit_each_alone(&mut self, batch: &[Job]) -> Result<Outcomes, DbError> {
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut tentative = self.head.clone();
        let mut tally = ops::Tally::default();
        let mut results = Vec::with_capacity(batch.len());
        for job in batch {
            let before = tentative.clone();
            let sp = tx.savepoint()?;
            // An op that fails adds nothing to the tally.
            match ops::apply(
                &mut SqliteTx(&sp),
                &mut tentative,
                job.op.clone(),
                &mut tally,
            ) {
                Ok(applied) => {
                    sp.commit()?;
                    results.push(Ok(applied));
                }
                Err(e) => {
                    drop(sp); // rolls back this op only
                    tentative = before;
                    tracing::error!(error = %e, "ledger op failed");
                    results.push(Err(StoreError::from(e)));
                }
            }
        }
        tally.write(&mut SqliteTx(&tx))?;
        tx.set_drop_behavior(rusqlite::DropBehavior::Rollback);
        tx.commit()?;
        self.head = tentative;
        Ok(results)
    }
}

engine::impl_store!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, EventKind};
    use crate::domain::{Lease, LeaseId, LeaseState, ProfileName};
    use crate::store::LedgerOp;

    const HOLDER: &str = "spiffe://example.org/ci/deploy-agent";

    fn lease(holder: &str) -> Lease {
        Lease {
            id: LeaseId::generate(1_790_000_000_000).expect("id"),
            profile: ProfileName::parse("gpu-scheduler-submit").expect("profile"),
            spiffe_id: holder.to_owned(),
            scopes: Vec::new(),
            audience: "gpu-scheduler".into(),
            state: LeaseState::Active,
            issued_at: 1_000,
            expires_at: 1_600,
            max_expires_at: 4_600,
            credential_sha256: "00".repeat(32),
            renewals: 0,
            ended_at: None,
            end_reason: None,
            intent: None,
            backend: None,
            parent: None,
            subject: None,
        }
    }

    fn issue(l: &Lease) -> Job {
        let mut event = AuditEvent::new(1_000_000, EventKind::Issue, "allow");
        event.caller = Some(l.spiffe_id.clone());
        event.lease_id = Some(l.id.to_string());
        let op = LedgerOp::Issue {
            lease: l.clone(),
            event,
            max_active: None,
            break_glass: None,
            idempotency: None,
        };
        // The reply goes nowhere: the test reads the outcomes `commit` returns.
        let (reply, _) = tokio::sync::oneshot::channel();
        Job { op, reply }
    }

    fn writer(dir: &tempfile::TempDir) -> Writer {
        let mut conn = open(&dir.path().join("ledger.db"), Duration::from_secs(5)).expect("open");
        migrate(&mut conn).expect("migrate");
        let head = load_head(&conn).expect("head");
        Writer { conn, head }
    }

    /// An op that fails (here: a lease id that exists) is refused alone: the batch runs
    /// again op by op, the others commit, and the chain and the counts have only them.
    #[test]
    fn a_failing_op_fails_alone_and_the_batch_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(&dir);
        let first = lease(HOLDER);
        assert!(w.commit(&[issue(&first)]).expect("commit")[0].is_ok());

        let (a, b) = (lease(HOLDER), lease("spiffe://example.org/other"));
        let out = w
            .commit(&[issue(&a), issue(&first), issue(&b)])
            .expect("the batch commits");
        assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
        assert!(out[1].is_err(), "a duplicate lease id must fail: {out:?}");

        let tx = &mut SqliteTx(&w.conn);
        assert_eq!(oplog::chain_top(tx).expect("top").0, 3);
        assert_eq!(w.head.seq, 3);
        assert_eq!(oplog::chain_top(tx).expect("top").1, w.head.hash);
        for l in [&first, &a, &b] {
            assert!(ops::lease::select(tx, l.id.as_str())
                .expect("select")
                .is_some());
        }
        let issued = tx
            .query_one(
                "SELECT issued FROM identities_seen WHERE spiffe_id = $1",
                &[HOLDER.into()],
            )
            .and_then(|r| r.i64(0))
            .expect("counts");
        assert_eq!(issued, 2, "the failed op is not counted");
    }
}
