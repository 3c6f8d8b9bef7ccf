//! The one transaction interface the ledger's operations are written against.
//!
//! Both engines run the same operations (`super::ops`): the same statements, the same
//! guards, the same row decoding. What they share is this small synchronous trait,
//! [`Tx`]: run a statement with typed [`Value`]s, get [`Row`]s back whose typed getters
//! report a value that does not fit as [`DbError::Corrupt`], the same way on both.
//!
//! Why a trait of our own rather than a crate: the ops run synchronously on a writer
//! thread inside one transaction, and both drivers (`rusqlite`, `postgres`) are
//! synchronous. sqlx is async, and its `Any` driver passes SQL through unchanged (no help
//! with placeholders or dialect); sea-query would add a large dependency to build about
//! sixty statements that are plain, reviewable text here. Most statements are identical
//! in both engines once placeholders are written one way, so statements are written once
//! in PostgreSQL's `$N` form (the SQLite `Tx` rewrites them to SQLite's `?N`, which means
//! the same thing), and the few real differences are [`Dialect`] hooks: prefix matching,
//! `FOR UPDATE SKIP LOCKED`, an unbounded `LIMIT`, arrays (bulk inserts, `= ANY`).

use std::sync::Arc;

use super::StoreError;

/// Which SQL the engine speaks, where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// SQLite (one writer holds the whole database; no row locks, no arrays).
    Sqlite,
    /// PostgreSQL (row locks, arrays, several replicas on one database).
    Postgres,
}

impl Dialect {
    /// An SQL condition: text `text` begins with text `prefix` (both SQL expressions).
    /// SQLite has no `starts_with`; PostgreSQL's can use a "C"-collated index.
    pub(crate) fn starts_with(self, text: &str, prefix: &str) -> String {
        match self {
            Dialect::Sqlite => format!("substr({text}, 1, length({prefix})) = {prefix}"),
            Dialect::Postgres => format!("starts_with({text}, {prefix})"),
        }
    }

    /// The character that sorts after every printable ASCII character (DEL), which bounds
    /// a prefix range on an index.
    pub(crate) fn del_char(self) -> &'static str {
        match self {
            Dialect::Sqlite => "char(127)",
            Dialect::Postgres => "chr(127)",
        }
    }

    /// Appended to a `SELECT … LIMIT n` that picks rows to change: PostgreSQL skips rows
    /// another transaction holds, so concurrent passes (other replicas) take disjoint
    /// batches; SQLite has no row locks (its writer holds the whole database).
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// A `LIMIT` argument: `Some(n)`, or no limit (SQLite: a negative limit; PostgreSQL:
    /// `LIMIT NULL`, which refuses a negative one).
    pub(crate) fn limit(self, n: Option<i64>) -> Value<'static> {
        match (self, n) {
            (_, Some(n)) => Value::Int(n),
            (Dialect::Sqlite, None) => Value::Int(-1),
            (Dialect::Postgres, None) => Value::Null,
        }
    }
}

/// A statement argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value<'a> {
    /// SQL `NULL` (of whatever type the statement expects).
    Null,
    /// An integer (`INTEGER` in SQLite, `BIGINT` in PostgreSQL).
    Int(i64),
    /// A boolean (`0`/`1` in SQLite, `BOOLEAN` in PostgreSQL).
    Bool(bool),
    /// Text.
    Text(&'a str),
    /// Bytes (`BLOB` in SQLite, `BYTEA` in PostgreSQL).
    Bytes(&'a [u8]),
    /// A PostgreSQL array (of values of one type). SQLite has none: its `Tx` refuses it,
    /// so only [`Dialect::Postgres`] code paths pass one.
    List(Vec<Value<'a>>),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Bytes(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A stored value as read, before it is checked against what the decoder expects.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    /// `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A floating-point number (never written by the broker).
    Real(f64),
    /// A boolean (PostgreSQL; SQLite stores `0`/`1`).
    Bool(bool),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl Cell {
    fn kind(&self) -> &'static str {
        match self {
            Cell::Null => "NULL",
            Cell::Int(_) => "an integer",
            Cell::Real(_) => "a real",
            Cell::Bool(_) => "a boolean",
            Cell::Text(_) => "text",
            Cell::Bytes(_) => "bytes",
        }
    }
}

/// One result row, with typed getters. A value of the wrong type (or out of range) is
/// [`DbError::Corrupt`] naming the column, in either engine: the schema only ever holds
/// what the broker wrote, so anything else is damage, not a transient failure.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    names: Arc<[String]>,
    cells: Vec<Cell>,
}

impl Row {
    /// A row of `cells`, named by the result's column `names`.
    pub(crate) fn new(names: Arc<[String]>, cells: Vec<Cell>) -> Self {
        Self { names, cells }
    }

    fn cell(&self, i: usize) -> Result<&Cell, DbError> {
        self.cells
            .get(i)
            .ok_or_else(|| corrupt(format!("column {i}: missing from the result")))
    }

    fn bad(&self, i: usize, want: &str) -> DbError {
        let name = self.names.get(i).map_or("?", String::as_str);
        let found = self.cells.get(i).map_or("nothing", Cell::kind);
        corrupt(format!("column {name}: expected {want}, found {found}"))
    }

    /// An integer.
    pub(crate) fn i64(&self, i: usize) -> Result<i64, DbError> {
        self.opt_i64(i)?.ok_or_else(|| self.bad(i, "an integer"))
    }

    /// An integer or `NULL`.
    pub(crate) fn opt_i64(&self, i: usize) -> Result<Option<i64>, DbError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            _ => Err(self.bad(i, "an integer")),
        }
    }

    /// A non-negative integer (sequence numbers, sizes, counts).
    pub(crate) fn u64(&self, i: usize) -> Result<u64, DbError> {
        let v = self.i64(i)?;
        u64::try_from(v).map_err(|_| self.bad(i, "a non-negative integer"))
    }

    /// An integer that fits 32 bits unsigned (counters, thresholds).
    pub(crate) fn u32(&self, i: usize) -> Result<u32, DbError> {
        let v = self.i64(i)?;
        u32::try_from(v).map_err(|_| self.bad(i, "a 32-bit unsigned integer"))
    }

    /// A boolean: PostgreSQL's `BOOLEAN`, or SQLite's `0`/`1` (the only integers the
    /// broker writes for one, and what the SQLite schema's triggers compare against).
    pub(crate) fn bool(&self, i: usize) -> Result<bool, DbError> {
        match self.cell(i)? {
            Cell::Bool(b) => Ok(*b),
            Cell::Int(0) => Ok(false),
            Cell::Int(1) => Ok(true),
            _ => Err(self.bad(i, "a boolean")),
        }
    }

    /// Text.
    pub(crate) fn text(&self, i: usize) -> Result<String, DbError> {
        self.opt_text(i)?.ok_or_else(|| self.bad(i, "text"))
    }

    /// Text or `NULL`.
    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s.clone())),
            _ => Err(self.bad(i, "text")),
        }
    }

    /// Bytes.
    pub(crate) fn bytes(&self, i: usize) -> Result<Vec<u8>, DbError> {
        self.opt_bytes(i)?.ok_or_else(|| self.bad(i, "bytes"))
    }

    /// Bytes or `NULL`.
    pub(crate) fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, DbError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Bytes(b) => Ok(Some(b.clone())),
            _ => Err(self.bad(i, "bytes")),
        }
    }

    /// A SHA-256 hash (32 bytes).
    pub(crate) fn hash32(&self, i: usize) -> Result<[u8; 32], DbError> {
        self.bytes(i)?
            .try_into()
            .map_err(|_| self.bad(i, "32 bytes"))
    }
}

/// Why a statement failed.
#[derive(Debug)]
pub(crate) enum DbError {
    /// SQLite refused a statement (locked, full, read-only, constraint).
    Sqlite(rusqlite::Error),
    /// PostgreSQL refused a statement, or the connection failed or is gone.
    Postgres(::postgres::Error),
    /// Could not connect; the message names the server, never its password.
    Connect(String),
    /// A stored value violates an invariant.
    Corrupt(String),
}

/// A stored value that violates an invariant.
pub(crate) fn corrupt(what: impl Into<String>) -> DbError {
    DbError::Corrupt(what.into())
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e)
    }
}

impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Sqlite(e) => e.fmt(f),
            // `Error`'s Display says only "db error"; the server's message is the cause.
            DbError::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "{} ({})", db.message(), db.code().code()),
                None => f.write_str(&crate::config::postgres::with_causes(e)),
            },
            DbError::Connect(s) | DbError::Corrupt(s) => f.write_str(s),
        }
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Corrupt(s) => StoreError::Corrupt(s),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// One transaction (or one connection, for reads) of either engine. Statements use
/// `$1`, `$2`, … placeholders; arguments bind by position.
pub(crate) trait Tx {
    /// Which SQL this engine speaks where the two differ.
    fn dialect(&self) -> Dialect;
    /// Every row a statement returns.
    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError>;
    /// The first row a statement returns, if any (statements that return at most one).
    fn query_opt(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Option<Row>, DbError>;
    /// Runs a statement that returns no rows; how many rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError>;

    /// The one row an aggregate (`count`, `max`, `EXISTS`) returns.
    fn query_one(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Row, DbError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| corrupt("an aggregate returned no row"))
    }
}

/// Inserts `rows` into `table`. `columns` are (name, PostgreSQL type) pairs. PostgreSQL
/// gets one statement for all rows (`unnest` of one array per column: one round trip
/// however many rows); SQLite runs one cached statement per row (in-process, no round
/// trips to save).
pub(crate) fn insert_rows(
    tx: &mut dyn Tx,
    table: &str,
    columns: &[(&str, &str)],
    rows: Vec<Vec<Value<'_>>>,
) -> Result<(), DbError> {
    if rows.is_empty() {
        return Ok(());
    }
    let names = columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ");
    match tx.dialect() {
        Dialect::Postgres => {
            let arrays = columns
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
                .collect::<Vec<_>>()
                .join(", ");
            let mut lists: Vec<Vec<Value<'_>>> = columns
                .iter()
                .map(|_| Vec::with_capacity(rows.len()))
                .collect();
            for row in rows {
                for (list, value) in lists.iter_mut().zip(row) {
                    list.push(value);
                }
            }
            let args: Vec<Value<'_>> = lists.into_iter().map(Value::List).collect();
            tx.execute(
                &format!("INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"),
                &args,
            )?;
        }
        Dialect::Sqlite => {
            let params = (1..=columns.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("INSERT INTO {table} ({names}) VALUES ({params})");
            for row in rows {
                tx.execute(&sql, &row)?;
            }
        }
    }
    Ok(())
}

/// Rewrites `$N` placeholders to SQLite's `?N` (the same numbered parameter; SQLite would
/// read `$1` as a named one, numbered by first appearance). Quoted text is left alone.
pub(crate) fn to_sqlite_placeholders(sql: &str) -> std::borrow::Cow<'_, str> {
    let bytes = sql.as_bytes();
    if !bytes.contains(&b'$') {
        return std::borrow::Cow::Borrowed(sql);
    }
    // Byte by byte: every statement of every op passes here, on the writer's thread.
    let mut out = bytes.to_vec();
    let mut quote: Option<u8> = None;
    for i in 0..out.len() {
        let c = out[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => quote = Some(c),
            None if c == b'$' && out.get(i + 1).is_some_and(u8::is_ascii_digit) => out[i] = b'?',
            None => {}
        }
    }
    // One ASCII byte replaced by another: still the UTF-8 it was.
    match String::from_utf8(out) {
        Ok(s) => std::borrow::Cow::Owned(s),
        Err(_) => std::borrow::Cow::Borrowed(sql),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_sqlite_numbered_parameters() {
        assert_eq!(
            to_sqlite_placeholders("SELECT a FROM t WHERE b = $2 AND c = '$1' AND d = $10"),
            "SELECT a FROM t WHERE b = ?2 AND c = '$1' AND d = ?10"
        );
        assert_eq!(to_sqlite_placeholders("SELECT 1"), "SELECT 1");
    }

    #[test]
    fn getters_report_corruption_with_the_column() {
        let row = Row::new(
            vec!["n".to_owned(), "b".to_owned(), "h".to_owned()].into(),
            vec![Cell::Text("x".into()), Cell::Int(2), Cell::Bytes(vec![1])],
        );
        let msg = |e: DbError| e.to_string();
        assert_eq!(
            msg(row.i64(0).unwrap_err()),
            "column n: expected an integer, found text"
        );
        assert!(matches!(row.bool(1), Err(DbError::Corrupt(_))));
        assert_eq!(
            msg(row.hash32(2).unwrap_err()),
            "column h: expected 32 bytes, found bytes"
        );
        assert!(matches!(row.text(3), Err(DbError::Corrupt(_))));
    }

    #[test]
    fn unbounded_limits_differ() {
        assert_eq!(Dialect::Sqlite.limit(None), Value::Int(-1));
        assert_eq!(Dialect::Postgres.limit(None), Value::Null);
        assert_eq!(Dialect::Postgres.limit(Some(5)), Value::Int(5));
    }
}
