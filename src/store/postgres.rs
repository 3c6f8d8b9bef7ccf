//! The HA ledger: PostgreSQL, shared by several broker replicas.
//!
//! The same shape as [`super::sqlite`]: one writer thread per replica owns a write
//! connection, takes everything queued (up to `max_batch` ops), applies each op inside its
//! own savepoint of one transaction and commits once, so many issuances share one commit
//! (one WAL flush). Reads run on `spawn_blocking` over a small pool of connections. The
//! synchronous `postgres` client drives its own runtime, so it is only ever called from
//! the writer thread and blocking tasks, never from async code.
//!
//! Several replicas, one chain: every write transaction first takes the ledger's
//! transaction-scoped advisory lock ([`LEDGER_LOCK`]), then reads the chain head fresh
//! (another replica may have appended since), applies its ops and commits. Appends are
//! therefore serialized across replicas: one gap-free hash chain, one Merkle tree. The
//! guards (locks, revocation rules, quotas, lease states) read rows inside that same
//! transaction, so what one replica committed binds every replica's next batch.
//!
//! The ops themselves are shared with SQLite (`super::ops`, over `Tx`); this file is
//! PostgreSQL's part: connecting (TLS), migrating, the writer's transaction (advisory
//! lock, fresh head), the read pool, and PostgreSQL's `Tx`.
//!
//! Fail closed: a caller waits at most `commit_timeout`, then gets `Unavailable`. A dead
//! connection is replaced on the next batch or read, so the store recovers by itself
//! when the database comes back.
//!
//! TLS: libpq's `sslmode` (`disable`, `prefer` (the default), `require`, `verify-ca`,
//! `verify-full`) with `sslrootcert` or `[ledger] postgres_ca_file`, over rustls
//! ([`super::pg_tls`]). Anything weaker than `verify-full` on a non-loopback host is
//! logged as such when the store opens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use ::postgres::{Client, NoTls, Row, SimpleQueryMessage, Statement};
use tokio::sync::Semaphore;

use super::engine::{self, Batches, Job, Outcomes, Queue};
use super::ops::{self, log as oplog, log::Head};
use super::pg_tls::PgTls;
use super::sql::{corrupt, Cell, DbError, Dialect, Row as SqlRow, Tx, Value};
use super::{unavailable, StoreError};
use crate::config::postgres::SslMode;
use crate::config::postgres::{describe, local_only, parse_url, ParsedUrl};
use crate::config::LedgerConfig;
use crate::metrics::Metrics;

/// Numbered migrations, the same numbers and meaning as SQLite's; `schema_migrations`
/// records which ran.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("migrations/postgres/0001_ledger.sql"),
    ),
    (
        2,
        "approvals_inventory",
        include_str!("migrations/postgres/0002_approvals_inventory.sql"),
    ),
    (
        3,
        "merkle",
        include_str!("migrations/postgres/0003_merkle.sql"),
    ),
    (
        4,
        "revocation",
        include_str!("migrations/postgres/0004_revocation.sql"),
    ),
    (
        5,
        "backends",
        include_str!("migrations/postgres/0005_backends.sql"),
    ),
    (
        6,
        "audit_sinks",
        include_str!("migrations/postgres/0006_audit_sinks.sql"),
    ),
    (
        7,
        "delegation",
        include_str!("migrations/postgres/0007_delegation.sql"),
    ),
    (
        8,
        "cosignatures",
        include_str!("migrations/postgres/0008_cosignatures.sql"),
    ),
    (
        9,
        "active lease indexes",
        include_str!("migrations/postgres/0009_active_lease_indexes.sql"),
    ),
];

/// Advisory lock key held while migrating ("SBMIGRAT"): replicas starting together
/// migrate one after the other, and the later ones find nothing left to do.
pub const MIGRATION_LOCK: i64 = 0x5342_4d49_4752_4154;

/// Advisory lock key every write transaction takes first ("SBLEDGER"): the one chain
/// head is appended to by one replica at a time.
pub const LEDGER_LOCK: i64 = 0x5342_4c45_4447_4552;

/// Read connections kept open, and reads in flight at once. Beyond it reads queue (within
/// the commit timeout), so a hung database never piles up blocking threads.
const READ_POOL: usize = 4;

/// How long a starting replica waits for another one's migration.
const MIGRATION_WAIT: Duration = Duration::from_secs(60);

/// The PostgreSQL store.
pub struct PostgresStore {
    queue: Queue,
    pool: Arc<Pool>,
}

/// Whether an error means the connection itself is gone (server restarted, network
/// dropped), as opposed to a statement the server refused.
fn connection_lost(e: &DbError, client: &Client) -> bool {
    match e {
        DbError::Postgres(e) => {
            client.is_closed()
                || e.is_closed()
                || match e.code() {
                    // Class 08: connection exception; 57P: the server is shutting down.
                    Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
                    None => e.as_db_error().is_none(),
                }
        }
        DbError::Connect(_) => true,
        DbError::Corrupt(_) | DbError::Sqlite(_) => false,
    }
}

/// How to open a connection, and the session every connection gets.
struct Settings {
    pg: ::postgres::Config,
    /// The TLS connector (unused with `sslmode=disable`).
    tls: PgTls,
    /// For messages.
    mode: SslMode,
    /// The server, for messages (no password).
    desc: String,
    /// Run once per new connection.
    session: String,
}

impl Settings {
    fn new(url: &str, cfg: &LedgerConfig) -> Result<Self, StoreError> {
        let ParsedUrl { mut pg, tls } = parse_url(url, cfg).map_err(StoreError::Unavailable)?;
        let connector = PgTls::new(&tls)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", describe(&pg))))?;
        if let Some(why) = tls.weakness() {
            if !local_only(&pg) {
                tracing::warn!(
                    server = %describe(&pg),
                    sslmode = %tls.mode,
                    "PostgreSQL ledger link: {why}"
                );
            }
        }
        let bound = cfg.commit_timeout.max(Duration::from_secs(1));
        // Connecting must fail within the time a caller waits; a connection whose peer
        // vanished must be noticed (keepalives, unacknowledged data) rather than hang.
        let connect = pg.get_connect_timeout().map_or(bound, |t| (*t).min(bound));
        pg.connect_timeout(connect)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(bound);
        if pg.get_application_name().is_none() {
            pg.application_name("spiffe-broker");
        }
        let ms = |d: Duration| d.as_millis().max(1);
        // statement_timeout: no statement outlives the caller's wait by much.
        // lock_timeout: the wait for another replica's ledger lock (SQLite's busy wait).
        // idle_in_transaction_session_timeout: a replica that stops mid-transaction
        // (frozen, partitioned) releases the ledger lock instead of stalling every replica.
        // synchronous_commit: a commit is durable before anyone is answered (raised to
        // `on` only if the server or role turned it off; stronger settings are kept).
        let session = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET idle_in_transaction_session_timeout = {}; \
             SELECT set_config('synchronous_commit', 'on', false) \
             WHERE current_setting('synchronous_commit') = 'off'",
            ms(bound),
            ms(cfg.busy_timeout),
            ms(bound),
        );
        Ok(Self {
            desc: describe(&pg),
            pg,
            tls: connector,
            mode: tls.mode,
            session,
        })
    }

    fn connect(&self) -> Result<Conn, DbError> {
        let fail = |e: ::postgres::Error| {
            let mut why = DbError::Postgres(e).to_string();
            // The crate's words for a server that answered the TLS request with "no".
            if why.ends_with("server does not support TLS") {
                why.push_str(&format!(", but sslmode={} requires it", self.mode));
            }
            DbError::Connect(format!("cannot connect to {}: {why}", self.desc))
        };
        let client = match self.mode {
            SslMode::Disable => self.pg.connect(NoTls),
            _ => self.pg.connect(self.tls.clone()),
        };
        let mut client = client.map_err(fail)?;
        client.batch_execute(&self.session).map_err(fail)?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }
}

/// A connection and its prepared statements (prepared once per connection, as SQLite's
/// `prepare_cached`: one round trip per statement instead of two).
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Several statements in one round trip (simple protocol; rows are discarded).
    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.client.batch_execute(sql)?)
    }
}

impl ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            // An integer parameter is BIGINT everywhere in the schema; narrower ones (a
            // function's INT argument) take it if it fits.
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql_checked(ty, out),
            Value::Int(v) => v.to_sql_checked(ty, out),
            Value::Bool(v) => v.to_sql_checked(ty, out),
            Value::Text(v) => v.to_sql_checked(ty, out),
            Value::Bytes(v) => v.to_sql_checked(ty, out),
            Value::List(v) => v.to_sql_checked(ty, out),
        }
    }

    /// Any: which types a value takes is up to its variant, checked in `to_sql`.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Reads a column as the [`Cell`] its type maps to.
fn cell(row: &Row, idx: usize) -> Result<Cell, DbError> {
    fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<Option<T>, DbError> {
        row.try_get(idx).map_err(|e| {
            let name = row.columns().get(idx).map_or("?", |c| c.name());
            corrupt(format!("column {name}: {e}"))
        })
    }
    let ty = row.columns().get(idx).map(|c| c.type_().clone());
    let cell = match ty {
        Some(t) if t == Type::INT8 => get::<i64>(row, idx)?.map(Cell::Int),
        Some(t) if t == Type::INT4 => get::<i32>(row, idx)?.map(|v| Cell::Int(v.into())),
        Some(t) if t == Type::INT2 => get::<i16>(row, idx)?.map(|v| Cell::Int(v.into())),
        Some(t) if t == Type::BOOL => get::<bool>(row, idx)?.map(Cell::Bool),
        Some(t) if t == Type::BYTEA => get::<Vec<u8>>(row, idx)?.map(Cell::Bytes),
        Some(t) if t == Type::FLOAT8 => get::<f64>(row, idx)?.map(Cell::Real),
        // TEXT, VARCHAR, NAME and the like.
        _ => get::<String>(row, idx)?.map(Cell::Text),
    };
    Ok(cell.unwrap_or(Cell::Null))
}

/// A result row as read, for the shared decoders.
fn to_row(row: &Row, names: &Arc<[String]>) -> Result<SqlRow, DbError> {
    let cells = (0..row.len())
        .map(|i| cell(row, i))
        .collect::<Result<_, _>>()?;
    Ok(SqlRow::new(names.clone(), cells))
}

/// The column names of a statement's result.
fn column_names(s: &Statement) -> Arc<[String]> {
    s.columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect::<Vec<_>>()
        .into()
}

fn params<'a>(args: &'a [Value<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Tx for Conn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<SqlRow>, DbError> {
        let s = self.statement(sql)?;
        let names = column_names(&s);
        self.client
            .query(&s, &params(args))?
            .iter()
            .map(|r| to_row(r, &names))
            .collect()
    }

    fn query_opt(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Option<SqlRow>, DbError> {
        let s = self.statement(sql)?;
        let names = column_names(&s);
        self.client
            .query_opt(&s, &params(args))?
            .map(|r| to_row(&r, &names))
            .transpose()
    }

    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, &params(args))?)
    }
}

/// Read connections. Connections are only made, used and dropped on blocking threads.
struct Pool {
    settings: Arc<Settings>,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    /// Runs `f` on a pooled connection. A pooled connection may have died while idle (the
    /// database restarted): then `f` runs once more on a new one.
    fn run<T>(&self, f: impl Fn(&mut Conn) -> Result<T, DbError>) -> Result<T, DbError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut conn, was_idle) = match pooled {
            Some(c) if !c.client.is_closed() => (c, true),
            _ => (self.settings.connect()?, false),
        };
        match f(&mut conn) {
            Ok(v) => {
                self.put(conn);
                Ok(v)
            }
            Err(e) if was_idle && connection_lost(&e, &conn.client) => {
                drop(conn);
                let mut fresh = self.settings.connect()?;
                let r = f(&mut fresh);
                self.put(fresh);
                r
            }
            Err(e) => {
                self.put(conn);
                Err(e)
            }
        }
    }

    fn put(&self, conn: Conn) {
        if conn.client.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < READ_POOL {
            idle.push(conn);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A client shuts its own runtime down when dropped, which panics on an async
        // thread (where the last reference may go): close them on a thread of their own.
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("ledger-pool-close".into())
                .spawn(move || drop(idle));
        }
    }
}

/// A 32-byte hash, or `Corrupt` naming `what`.
fn hash32(v: Vec<u8>, what: &str) -> Result<[u8; 32], DbError> {
    v.try_into()
        .map_err(|_| corrupt(format!("{what} is not 32 bytes")))
}

/// The head at `top`: the cached one if nobody appended since (the common case with one
/// replica), else the frontier read fresh. Every entry's leaf is written in the same
/// transaction as the entry, so the tree has exactly `seq` leaves.
fn head_at(c: &mut Conn, top: (u64, [u8; 32]), cached: Option<Head>) -> Result<Head, DbError> {
    let (seq, hash) = top;
    if let Some(h) = cached.filter(|h| h.seq == seq && h.hash == hash) {
        return Ok(h);
    }
    let tree = oplog::frontier(c, seq)?;
    Ok(Head { seq, hash, tree })
}

fn migrate(c: &mut Conn) -> Result<(), DbError> {
    c.batch(&format!(
        "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = 0;
         SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        MIGRATION_WAIT.as_millis()
    ))?;
    let run = |c: &mut Conn| -> Result<(), DbError> {
        for (version, name, sql) in MIGRATIONS {
            let done = c
                .client
                .query_opt(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[version],
                )?
                .is_some();
            if !done {
                c.batch(sql)?;
                c.client.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at)
                     VALUES ($1, $2, extract(epoch FROM now())::bigint)",
                    &[version, name],
                )?;
            }
        }
        c.batch("COMMIT")
    };
    let r = run(c);
    if r.is_err() {
        let _ = c.batch("ROLLBACK");
    }
    r
}

impl PostgresStore {
    /// Connects to the database at `url` (URL or key=value form), migrates it (once,
    /// under an advisory lock, whichever replica comes first) and starts the writer.
    /// Blocks until the database answered; call it from a blocking context.
    pub fn open(url: &str, cfg: &LedgerConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let settings = Arc::new(Settings::new(url, cfg)?);
        let (queue, rx) = Queue::new(cfg.max_batch * 16, cfg.commit_timeout);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let max_batch = cfg.max_batch;
        let writer_settings = settings.clone();
        // The writer thread opens, migrates and checks the ledger itself: the client must
        // live and die on a thread that is not async.
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let started = writer_settings.connect().and_then(|mut c| {
                    migrate(&mut c)?;
                    let top = oplog::chain_top(&mut c)?;
                    let head = head_at(&mut c, top, None)?;
                    Ok((c, head))
                });
                match started {
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                    Ok((conn, head)) => {
                        let _ = ready_tx.send(Ok(()));
                        let writer = Writer {
                            settings: writer_settings,
                            conn: Some(conn),
                            cached: Some(head),
                            begin: begin_sql(),
                        };
                        engine::run(writer, rx, max_batch, metrics);
                    }
                }
            })
            .map_err(unavailable)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(match e {
                    DbError::Corrupt(s) => StoreError::Corrupt(s),
                    DbError::Connect(s) => StoreError::Unavailable(s),
                    other => StoreError::Unavailable(format!(
                        "ledger {} could not be opened: {other}",
                        settings.desc
                    )),
                })
            }
            Err(_) => return Err(unavailable("ledger writer stopped while opening")),
        }
        Ok(Self {
            queue,
            pool: Arc::new(Pool {
                settings,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(READ_POOL)),
            }),
        })
    }

    /// A read (see `engine::impl_store!`): on a pooled connection, on a blocking thread,
    /// within the commit timeout (waiting for a pool slot included).
    async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn Tx) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.queue.commit_timeout();
        let permit = tokio::time::timeout_at(deadline, self.pool.permits.clone().acquire_owned())
            .await
            .map_err(|_| unavailable("ledger read timed out"))?
            .map_err(|_| unavailable("ledger closed"))?;
        let pool = self.pool.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.run(|c| f(c))
        });
        engine::finish_read(deadline, work).await
    }

    /// A read that writes what it read (claims). The ops that use it are one statement
    /// on PostgreSQL, atomic by itself (autocommit), so it needs no transaction of its own.
    async fn read_write<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn Tx) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.read(f).await
    }
}

/// The writer thread's state.
struct Writer {
    settings: Arc<Settings>,
    /// `None` after the connection was lost: the next batch connects again.
    conn: Option<Conn>,
    /// The head after this replica's last commit; checked against the database at the
    /// start of every batch.
    cached: Option<Head>,
    /// [`begin_sql`].
    begin: String,
}

/// Starts a write transaction: the ledger lock, then the chain's last entry, read after
/// the lock so it includes every other replica's commits; and the first op's savepoint.
/// One round trip.
fn begin_sql() -> String {
    format!(
        "BEGIN; SELECT pg_advisory_xact_lock({LEDGER_LOCK}); \
         SELECT seq, encode(hash, 'hex') FROM audit_log ORDER BY seq DESC LIMIT 1; \
         SAVEPOINT op"
    )
}

fn parse_top(messages: &[SimpleQueryMessage]) -> Result<(u64, [u8; 32]), DbError> {
    // The lock's row (one void column) comes first; the head's row has two columns.
    let row = messages.iter().rev().find_map(|m| match m {
        SimpleQueryMessage::Row(r) if r.len() == 2 => Some(r),
        _ => None,
    });
    let Some(row) = row else {
        return Ok((0, [0; 32]));
    };
    let seq = row
        .get(0)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| corrupt("chain head: bad seq"))?;
    let hash = row
        .get(1)
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| corrupt("chain head: bad hash"))?;
    Ok((seq, hash32(hash, "entry hash")?))
}

impl Batches for Writer {
    /// A caller that stopped waiting was told `Unavailable`: keep it that way rather
    /// than commit its op later (e.g. once the database is back).
    const SKIP_ABANDONED: bool = true;

    /// Applies a batch in one transaction. An op whose SQL fails is rolled back to its
    /// savepoint and answered with the error; the others still commit. A failure of the
    /// transaction itself (begin, lock, commit, a lost connection) fails the whole batch.
    fn commit(&mut self, batch: &[Job]) -> Result<Outcomes, DbError> {
        let result = self.try_batch(batch);
        if result.is_err() {
            if let Some(conn) = self.conn.as_mut() {
                if conn.batch("ROLLBACK").is_err() {
                    self.conn = None;
                }
            }
        }
        result
    }

    /// The next batch reads the head fresh.
    fn failed(&mut self) {
        self.cached = None;
    }
}

impl Writer {
    /// The writer's connection, made again if it was lost.
    fn conn(&mut self) -> Result<&mut Conn, DbError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some(self.settings.connect()?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| DbError::Connect("no ledger connection".into()))
    }

    /// Opens the batch's transaction. A connection that died while idle (the database
    /// restarted) fails here before anything was sent in the transaction, so the batch
    /// moves to a new connection instead of failing.
    fn begin(&mut self) -> Result<(u64, [u8; 32]), DbError> {
        let reused = self.conn.is_some();
        let sql = std::mem::take(&mut self.begin);
        let r = self.begin_with(&sql, reused);
        self.begin = sql;
        r
    }

    fn begin_with(&mut self, sql: &str, reused: bool) -> Result<(u64, [u8; 32]), DbError> {
        let conn = self.conn()?;
        match conn.client.simple_query(sql) {
            Ok(messages) => parse_top(&messages),
            Err(e) => {
                let e = DbError::Postgres(e);
                if !(reused && connection_lost(&e, &conn.client)) {
                    return Err(e);
                }
                self.conn = None;
                let conn = self.conn()?;
                parse_top(&conn.client.simple_query(sql)?)
            }
        }
    }

    fn try_batch(&mut self, batch: &[Job]) -> Result<Outcomes, DbError> {
        let top = self.begin()?;
        let cached = self.cached.take();
        let conn = self.conn()?;
        let mut head = head_at(conn, top, cached)?;
        let mut results = Vec::with_capacity(batch.len());
        let mut tally = ops::Tally::default();
        for (i, job) in batch.iter().enumerate() {
            if i > 0 {
                // The previous op's savepoint is released (kept) or was rolled back to
                // (still there); either way this op gets a fresh one.
                conn.batch("RELEASE SAVEPOINT op; SAVEPOINT op")?;
            }
            let before = head.clone();
            // An op that fails adds nothing to the tally.
            match ops::apply(conn, &mut head, job.op.clone(), &mut tally) {
                Ok(applied) => results.push(Ok(applied)),
                Err(e) if connection_lost(&e, &conn.client) => return Err(e),
                Err(e) => {
                    conn.batch("ROLLBACK TO SAVEPOINT op")?;
                    head = before;
                    tracing::error!(error = %e, "ledger op failed");
                    results.push(Err(StoreError::from(e)));
                }
            }
        }
        tally.write(conn)?;
        conn.batch("COMMIT")?;
        self.cached = Some(head);
        Ok(results)
    }
}

engine::impl_store!(PostgresStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_takes_the_ledger_lock() {
        assert!(begin_sql().contains("pg_advisory_xact_lock(5999441513992897874)"));
    }
}
