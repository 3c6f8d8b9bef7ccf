//! Revocation: revoking every active lease a selector covers (in chunks for bulk
//! revocations), the rules that bar in-flight issuance, and the hash-chained feed
//! relying parties follow.

use super::lease;
use super::log::{append, Head};
use super::rows::{self, REVOCATION_EVENT_COLUMNS};
use crate::audit::AuditEvent;
use crate::domain::{RevocationEvent, RevokeSelector};
use crate::store::sql::{insert_rows, DbError, Row, Tx, Value};
use crate::store::{Applied, FeedTail, Refusal};

/// Most lease ids listed in one revocation's audit entry; larger revocations record the
/// count and a digest of every id (the feed has each one).
const MAX_LISTED: usize = 1000;

/// A revoked lease: id, holder, profile, expiry, certificate serial (x509 leases).
type RevokedRow = (String, String, String, i64, Option<String>);

/// The columns of a [`RevokedRow`].
const REVOKED_COLUMNS: &str = "id, spiffe_id, profile, expires_at, \
     CASE WHEN backend_kind = 'x509' THEN backend_handle END";

fn revoked_from_row(r: &Row) -> Result<RevokedRow, DbError> {
    Ok((
        r.text(0)?,
        r.text(1)?,
        r.text(2)?,
        r.i64(3)?,
        r.opt_text(4)?,
    ))
}

/// The parameters of a `Revoke` op, apart from its event.
pub(crate) struct Revocation {
    pub(crate) selector: RevokeSelector,
    pub(crate) issued_before: Option<i64>,
    pub(crate) reason: String,
    pub(crate) now: i64,
    pub(crate) dry_run: bool,
    pub(crate) chunk: Option<(u32, u32)>,
}

/// The condition on `leases` a selector covers (`$1` is its value).
fn covered(tx: &dyn Tx, selector: &RevokeSelector) -> (String, String) {
    let d = tx.dialect();
    match selector {
        RevokeSelector::Lease(id) => ("id = $1".into(), id.to_string()),
        // The identity's own leases and those others hold for it by delegation.
        RevokeSelector::SpiffeId(sid) => ("(spiffe_id = $1 OR subject = $1)".into(), sid.clone()),
        // A range on the holder index (byte order: PostgreSQL's column collation is "C";
        // SPIFFE IDs are printable ASCII, below 0x7f), so each chunk of a bulk revocation
        // walks only the covered identities.
        RevokeSelector::Prefix(p) => (
            format!(
                "spiffe_id >= $1 AND spiffe_id < ($1 || {}) AND {}",
                d.del_char(),
                d.starts_with("spiffe_id", "$1")
            ),
            p.clone(),
        ),
        RevokeSelector::Profile(p) => ("profile = $1".into(), p.to_string()),
        RevokeSelector::Approver(a) => (
            "id IN (SELECT r.lease_id FROM access_requests r JOIN access_reviews v ON v.request_id = r.id
                    WHERE v.reviewer = $1 AND v.verdict = 'approve' AND NOT v.post_review
                      AND r.lease_id IS NOT NULL)"
                .into(),
            a.clone(),
        ),
        RevokeSelector::AccessRequest(r) => (
            "id = (SELECT lease_id FROM access_requests WHERE id = $1)".into(),
            r.clone(),
        ),
        RevokeSelector::All => ("CAST($1 AS TEXT) IS NOT NULL".into(), String::new()),
    }
}

/// Revokes every active lease the selector covers (at most a chunk of them), or with
/// `dry_run` only reports which.
pub(crate) fn revoke(
    tx: &mut dyn Tx,
    head: &mut Head,
    op: Revocation,
    mut event: AuditEvent,
) -> Result<Applied, DbError> {
    let (selector, reason, now, issued_before) =
        (&op.selector, op.reason.as_str(), op.now, op.issued_before);
    let (dry_run, chunk) = (op.dry_run, op.chunk);
    // One predicate for preview and revocation: what the selector covers.
    let (filter, value) = covered(tx, selector);
    let cut = "(CAST($2 AS BIGINT) IS NULL OR issued_at < $2)";
    let rows = if dry_run {
        tx.query(
            &format!(
                "SELECT {REVOKED_COLUMNS} FROM leases WHERE state = 'active' AND {filter} AND {cut}"
            ),
            &[value.as_str().into(), issued_before.into()],
        )?
    } else {
        // The chunk is chosen once (MATERIALIZED), so the limit holds however the planner
        // would otherwise rescan the subquery.
        let limit = tx.dialect().limit(chunk.map(|(limit, _)| i64::from(limit)));
        let end_reason = format!("revoked: {reason}");
        tx.query(
            &format!(
                "WITH chunk AS MATERIALIZED (
                     SELECT id FROM leases WHERE state = 'active' AND {filter} AND {cut} LIMIT $5)
                 UPDATE leases SET state = 'revoked', ended_at = $3, end_reason = $4
                 WHERE id IN (SELECT id FROM chunk) AND state = 'active'
                 RETURNING {REVOKED_COLUMNS}"
            ),
            &[
                value.as_str().into(),
                issued_before.into(),
                now.into(),
                end_reason.as_str().into(),
                limit,
            ],
        )?
    };
    let mut rows = rows::all(rows, revoked_from_row)?;
    let roots: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    rows.extend(cascade(tx, roots, now, reason, dry_run)?);
    let mut ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    ids.sort();
    if dry_run {
        let mut a = Applied::recorded(None);
        a.affected = ids;
        return Ok(a);
    }
    let part = chunk.map_or(1, |(_, part)| part);
    if part > 1 && ids.is_empty() {
        return Ok(Applied::recorded(None));
    }
    // Identity, prefix and profile revocations also bar in-flight issuance, on every
    // writer: each one checks the rules inside its own write transaction.
    if let Some((kind, v)) = selector.rule().filter(|_| part == 1) {
        let cutoff = issued_before.map_or(now, |cut| cut.min(now));
        tx.execute(
            "INSERT INTO revocation_rules (kind, value, cutoff, created_at) VALUES ($1, $2, $3, $4)",
            &[kind.into(), v.as_str().into(), cutoff.into(), now.into()],
        )?;
    }
    append_feed(tx, &rows, now, reason)?;
    event.affected_leases = ids.iter().take(MAX_LISTED).cloned().collect();
    if ids.len() > MAX_LISTED {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for id in &ids {
            ctx.update(id.as_bytes());
            ctx.update(b"\n");
        }
        event.reason = Some(format!(
            "{} ({} leases; the first {MAX_LISTED} listed; SHA-256 of all sorted ids: {})",
            event.reason.clone().unwrap_or_else(|| reason.to_owned()),
            ids.len(),
            hex::encode(ctx.finish().as_ref())
        ));
    }
    if ids.is_empty() {
        let refusal = match selector {
            RevokeSelector::Lease(id) => match lease::select(tx, id.as_str())? {
                None => Refusal::NotFound,
                Some(l) => Refusal::Ended(l.state),
            },
            _ => Refusal::NothingMatched,
        };
        // An empty revocation is still an operator action worth recording.
        event.reason = Some(format!("{reason} ({})", refusal.describe()));
        let receipt = append(tx, head, &event)?;
        let mut a = Applied::recorded(Some(receipt));
        a.refused = Some(refusal);
        return Ok(a);
    }
    let receipt = append(tx, head, &event)?;
    let mut a = Applied::recorded(Some(receipt));
    if let RevokeSelector::Lease(id) = selector {
        a.lease = lease::select(tx, id.as_str())?;
    }
    a.affected = ids;
    Ok(a)
}

/// Ids per statement of a cascade step.
const CASCADE_CHUNK: usize = 500;

/// Revokes (or, for a dry run, finds) every active lease derived by token exchange from
/// `roots`, transitively: a credential never outlives the one it was exchanged for.
/// Breadth first, one statement per level and chunk of parents.
fn cascade(
    tx: &mut dyn Tx,
    roots: Vec<String>,
    now: i64,
    reason: &str,
    dry_run: bool,
) -> Result<Vec<RevokedRow>, DbError> {
    let end_reason = format!("revoked: {reason} (derived from a revoked credential)");
    let mut out = Vec::new();
    let mut frontier = roots;
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for parents in frontier.chunks(CASCADE_CHUNK) {
            let list = (0..parents.len())
                .map(|i| format!("${}", i + 3))
                .collect::<Vec<_>>()
                .join(", ");
            let derived = format!(
                "state = 'active' AND parent_lease_id IS NOT NULL AND parent_lease_id IN ({list})"
            );
            let sql = if dry_run {
                format!("SELECT {REVOKED_COLUMNS} FROM leases WHERE {derived} AND CAST($1 AS BIGINT) IS NOT NULL AND CAST($2 AS TEXT) IS NOT NULL")
            } else {
                format!(
                    "UPDATE leases SET state = 'revoked', ended_at = $1, end_reason = $2
                     WHERE {derived} RETURNING {REVOKED_COLUMNS}"
                )
            };
            let mut params: Vec<Value> = vec![now.into(), end_reason.as_str().into()];
            params.extend(parents.iter().map(|p| Value::from(p.as_str())));
            let found = rows::all(tx.query(&sql, &params)?, revoked_from_row)?;
            next.extend(found.iter().map(|r| r.0.clone()));
            out.extend(found);
        }
        frontier = next;
    }
    Ok(out)
}

/// Revokes what was derived from a lease that just ended (released), with a feed event
/// each; returns their ids.
pub(crate) fn end_derived(
    tx: &mut dyn Tx,
    id: &str,
    now: i64,
    reason: &str,
) -> Result<Vec<String>, DbError> {
    let rows = cascade(tx, vec![id.to_owned()], now, reason, false)?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    append_feed(tx, &rows, now, reason)?;
    let mut ids: Vec<String> = rows.into_iter().map(|r| r.0).collect();
    ids.sort();
    ids.truncate(MAX_LISTED);
    Ok(ids)
}

/// Appends one feed event per revoked lease (in lease id order), each chained to the
/// one before. Under the writer's lock: the feed, like the log, has one writer at a time.
fn append_feed(
    tx: &mut dyn Tx,
    rows: &[RevokedRow],
    now: i64,
    reason: &str,
) -> Result<(), DbError> {
    let (mut seq, mut prev) = tail(tx)?.unwrap_or_default();
    let mut sorted: Vec<&RevokedRow> = rows.iter().collect();
    sorted.sort();
    let mut chains = Vec::with_capacity(sorted.len());
    for (lease_id, spiffe_id, profile, expires_at, serial) in &sorted {
        seq += 1;
        let ev = RevocationEvent {
            seq,
            lease_id: lease_id.clone(),
            spiffe_id: spiffe_id.clone(),
            profile: profile.clone(),
            expires_at: *expires_at,
            revoked_at: now,
            reason: reason.to_owned(),
            chain_hash: String::new(),
            certificate_serial: serial.clone(),
        };
        prev = ev.chain(&prev);
        chains.push((seq, prev));
    }
    let rows = sorted
        .iter()
        .zip(&chains)
        .map(
            |((lease_id, spiffe_id, profile, expires_at, serial), (seq, chain))| {
                vec![
                    Value::Int(*seq as i64),
                    lease_id.as_str().into(),
                    spiffe_id.as_str().into(),
                    profile.as_str().into(),
                    Value::Int(*expires_at),
                    Value::Int(now),
                    reason.into(),
                    chain.as_slice().into(),
                    serial.as_deref().into(),
                ]
            },
        )
        .collect();
    // One statement for the whole chunk on PostgreSQL (up to 500 leases), not one round
    // trip per lease.
    insert_rows(
        tx,
        "revocation_events",
        &[
            ("seq", "bigint"),
            ("lease_id", "text"),
            ("spiffe_id", "text"),
            ("profile", "text"),
            ("expires_at", "bigint"),
            ("revoked_at", "bigint"),
            ("reason", "text"),
            ("chain_hash", "bytea"),
            ("certificate_serial", "text"),
        ],
        rows,
    )
}

/// The feed's last sequence and chain hash.
pub(crate) fn tail(tx: &mut dyn Tx) -> Result<Option<FeedTail>, DbError> {
    tx.query_opt(
        "SELECT seq, chain_hash FROM revocation_events ORDER BY seq DESC LIMIT 1",
        &[],
    )?
    .map(|r| Ok((r.u64(0)?, r.hash32(1)?)))
    .transpose()
}

/// Feed events with `seq > after`, in order, at most `limit` (clamped to 1..=10,000).
pub(crate) fn events(
    tx: &mut dyn Tx,
    after: u64,
    limit: u32,
) -> Result<Vec<RevocationEvent>, DbError> {
    let rows = tx.query(
        &format!(
            "SELECT {REVOCATION_EVENT_COLUMNS} FROM revocation_events
             WHERE seq > $1 ORDER BY seq LIMIT $2"
        ),
        &[Value::Int(after as i64), limit.clamp(1, 10_000).into()],
    )?;
    rows::all(rows, rows::revocation_event)
}
