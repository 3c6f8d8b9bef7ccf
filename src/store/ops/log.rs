//! The verifiable log: appending entries (hash chain and Merkle nodes, in the op's
//! transaction), the chain head, signed checkpoints, proofs and entry reads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::rows::{self, CHECKPOINT_COLUMNS, ENTRY_COLUMNS};
use crate::audit::{entry_hash, AuditEvent, StoredEntry};
use crate::checkpoint::LogSigner;
use crate::merkle::{leaf_hash, Frontier, Hash as MerkleHash, NodeSource};
use crate::store::sql::{corrupt, insert_rows, DbError, Dialect, Tx, Value};
use crate::store::{Applied, Cosignature, Receipt, StoredCheckpoint};

/// The chain head and Merkle frontier the writer appends to.
#[derive(Clone)]
pub(crate) struct Head {
    /// Last sequence number (0 for an empty log).
    pub(crate) seq: u64,
    /// Last entry's hash (zeros for an empty log).
    pub(crate) hash: [u8; 32],
    /// The tree's right edge.
    pub(crate) tree: Frontier,
}

/// Appends `event` after `head`: the entry with its chain hash, and the Merkle nodes its
/// leaf completes, in the caller's transaction. The primary key on `seq` is the last line
/// of defence: were two writers ever to append at the same head, the second insert fails
/// instead of forking the chain.
pub(crate) fn append(
    tx: &mut dyn Tx,
    head: &mut Head,
    event: &AuditEvent,
) -> Result<Receipt, DbError> {
    let seq = head.seq + 1;
    let body = event.canonical();
    let hash = entry_hash(seq, &head.hash, &body);
    tx.execute(
        "INSERT INTO audit_log (seq, time_ms, kind, caller, lease_id, body, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            Value::Int(seq as i64),
            event.time_ms.into(),
            event.kind.as_str().into(),
            event.caller.as_deref().into(),
            event.lease_id.as_deref().into(),
            body.as_str().into(),
            head.hash.as_slice().into(),
            hash.as_slice().into(),
        ],
    )?;
    let leaf = leaf_hash(body.as_bytes());
    let nodes = head.tree.append(leaf);
    insert_nodes(tx, &nodes)?;
    head.seq = seq;
    head.hash = hash;
    Ok(Receipt {
        sequence: seq,
        entry_hash: hex::encode(hash),
        leaf_index: seq - 1,
        leaf_hash: hex::encode(leaf),
    })
}

/// Stores complete subtree hashes (level, index, hash).
pub(crate) fn insert_nodes(
    tx: &mut dyn Tx,
    nodes: &[(u32, u64, MerkleHash)],
) -> Result<(), DbError> {
    let rows = nodes
        .iter()
        .map(|(level, idx, hash)| {
            vec![
                Value::from(*level),
                Value::Int(*idx as i64),
                hash.as_slice().into(),
            ]
        })
        .collect();
    insert_rows(
        tx,
        "merkle_nodes",
        &[("level", "bigint"), ("idx", "bigint"), ("hash", "bytea")],
        rows,
    )
}

/// The last entry: sequence and hash (0 and zeros for an empty log).
pub(crate) fn chain_top(tx: &mut dyn Tx) -> Result<(u64, [u8; 32]), DbError> {
    match tx.query_opt(
        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
        &[],
    )? {
        None => Ok((0, [0; 32])),
        Some(r) => Ok((r.u64(0)?, r.hash32(1)?)),
    }
}

/// The tree frontier of a tree of `size` leaves, from the stored nodes.
pub(crate) fn frontier(tx: &mut dyn Tx, size: u64) -> Result<Frontier, DbError> {
    with_nodes(tx, |src| Frontier::load(src, size))
}

/// Leaves in the tree. PostgreSQL: the last sequence number (every entry's leaf is
/// written in the entry's transaction, and `count(*)` would scan the table). SQLite:
/// the level-0 nodes, since a ledger from before the tree existed gets its leaves only
/// when it is opened.
pub(crate) fn tree_size(tx: &mut dyn Tx) -> Result<u64, DbError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT count(*) FROM merkle_nodes WHERE level = 0",
        Dialect::Postgres => "SELECT COALESCE(max(seq), 0) FROM audit_log",
    };
    tx.query_one(sql, &[])?.u64(0)
}

/// Merkle nodes fetched together. A walk over the tree (frontier, proofs) asks for nodes
/// by position only, never by value, so it runs once recording what it needs, the nodes
/// are fetched, and it runs again on them: on PostgreSQL one round trip, not O(log n).
#[derive(Default)]
pub(crate) struct Prefetch {
    wanted: RefCell<Vec<(u32, u64)>>,
    nodes: Option<HashMap<(u32, u64), MerkleHash>>,
}

impl NodeSource for Prefetch {
    type Error = DbError;
    fn node(&self, level: u32, index: u64) -> Result<MerkleHash, DbError> {
        match &self.nodes {
            None => {
                self.wanted.borrow_mut().push((level, index));
                Ok([0; 32])
            }
            Some(nodes) => nodes.get(&(level, index)).copied().ok_or_else(|| {
                corrupt(format!(
                    "merkle node (level {level}, index {index}) is missing"
                ))
            }),
        }
    }
}

impl Prefetch {
    fn fill(&mut self, tx: &mut dyn Tx) -> Result<(), DbError> {
        let wanted = self.wanted.take();
        let mut nodes = HashMap::with_capacity(wanted.len());
        let mut keep = |level: i64, idx: i64, hash| {
            nodes.insert((level as u32, idx as u64), hash);
        };
        match tx.dialect() {
            Dialect::Postgres if !wanted.is_empty() => {
                let levels = wanted.iter().map(|(l, _)| Value::from(*l)).collect();
                let idxs = wanted.iter().map(|(_, i)| Value::Int(*i as i64)).collect();
                let rows = tx.query(
                    "SELECT n.level, n.idx, n.hash FROM merkle_nodes n
                     JOIN unnest($1::bigint[], $2::bigint[]) AS w(level, idx)
                       ON n.level = w.level AND n.idx = w.idx",
                    &[Value::List(levels), Value::List(idxs)],
                )?;
                for r in &rows {
                    keep(r.i64(0)?, r.i64(1)?, r.hash32(2)?);
                }
            }
            Dialect::Postgres => {}
            // In-process: one cached point lookup per node.
            Dialect::Sqlite => {
                for (level, idx) in wanted {
                    let row = tx.query_opt(
                        "SELECT hash FROM merkle_nodes WHERE level = $1 AND idx = $2",
                        &[level.into(), Value::Int(idx as i64)],
                    )?;
                    if let Some(r) = row {
                        keep(i64::from(level), idx as i64, r.hash32(0)?);
                    }
                }
            }
        }
        self.nodes = Some(nodes);
        Ok(())
    }
}

/// Runs a tree walk on nodes prefetched together (see [`Prefetch`]).
pub(crate) fn with_nodes<T>(
    tx: &mut dyn Tx,
    walk: impl Fn(&Prefetch) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let mut p = Prefetch::default();
    walk(&p)?;
    p.fill(tx)?;
    walk(&p)
}

/// Signs and stores a checkpoint of the tree at `head` (nothing if the tree is empty;
/// the stored one if this size was signed already, by a concurrent request or, on
/// PostgreSQL, another replica: every writer signs the same tree at a size).
pub(crate) fn checkpoint(
    tx: &mut dyn Tx,
    head: &Head,
    signer: &Arc<LogSigner>,
    time_ms: i64,
) -> Result<Applied, DbError> {
    let size = head.tree.size();
    if size == 0 {
        return Ok(Applied::recorded(None));
    }
    let last = tx
        .query_one("SELECT max(size) FROM checkpoints", &[])?
        .opt_i64(0)?;
    let mut a = Applied::recorded(None);
    if last == Some(size as i64) {
        a.checkpoint = tx
            .query_opt(
                &format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE size = $1"),
                &[Value::Int(size as i64)],
            )?
            .map(|r| rows::checkpoint(&r))
            .transpose()?;
        return Ok(a);
    }
    let root = head.tree.root();
    let note = signer.sign(size, &root);
    tx.execute(
        "INSERT INTO checkpoints (size, root, time_ms, note) VALUES ($1, $2, $3, $4)",
        &[
            Value::Int(size as i64),
            root.as_slice().into(),
            time_ms.into(),
            note.as_str().into(),
        ],
    )?;
    a.checkpoint = Some(StoredCheckpoint {
        size,
        root,
        time_ms,
        note,
        cosignatures: Vec::new(),
    });
    Ok(a)
}

/// The checkpoint of a tree size, or the latest one.
pub(crate) fn stored_checkpoint(
    tx: &mut dyn Tx,
    size: Option<u64>,
) -> Result<Option<StoredCheckpoint>, DbError> {
    let Some(mut cp) = tx
        .query_opt(
            &format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints
                 WHERE (CAST($1 AS BIGINT) IS NULL OR size = $1) ORDER BY size DESC LIMIT 1"
            ),
            &[size.map(|s| s as i64).into()],
        )?
        .map(|r| rows::checkpoint(&r))
        .transpose()?
    else {
        return Ok(None);
    };
    cp.cosignatures = tx
        .query(
            "SELECT line FROM cosignatures WHERE size = $1 ORDER BY witness",
            &[Value::Int(cp.size as i64)],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    Ok(Some(cp))
}

/// Records a witness's cosignature (the newest per witness and size wins).
pub(crate) fn add_cosignature(tx: &mut dyn Tx, c: &Cosignature) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO cosignatures (size, witness, line, cosigned_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (witness, size) DO UPDATE SET line = excluded.line,
             cosigned_at = excluded.cosigned_at",
        &[
            Value::Int(c.size as i64),
            c.witness.as_str().into(),
            c.line.as_str().into(),
            c.cosigned_at.into(),
        ],
    )?;
    Ok(())
}

/// The largest tree size `witness` cosigned.
pub(crate) fn cosigned_size(tx: &mut dyn Tx, witness: &str) -> Result<Option<u64>, DbError> {
    Ok(tx
        .query_one(
            "SELECT max(size) FROM cosignatures WHERE witness = $1",
            &[witness.into()],
        )?
        .opt_i64(0)?
        .map(|s| s as u64))
}

/// Every checkpoint, oldest first.
pub(crate) fn checkpoints(tx: &mut dyn Tx) -> Result<Vec<StoredCheckpoint>, DbError> {
    let rows = tx.query(
        &format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY size"),
        &[],
    )?;
    let mut all = rows::all(rows, rows::checkpoint)?;
    let lines = tx.query(
        "SELECT size, line FROM cosignatures ORDER BY size, witness",
        &[],
    )?;
    let mut at = 0;
    for r in &lines {
        let size = r.u64(0)?;
        while all.get(at).is_some_and(|c| c.size < size) {
            at += 1;
        }
        if let Some(cp) = all.get_mut(at).filter(|c| c.size == size) {
            cp.cosignatures.push(r.text(1)?);
        }
    }
    Ok(all)
}

/// Inclusion proof of leaf `index` in the tree of `size` (`None` if out of range).
pub(crate) fn inclusion_proof(
    tx: &mut dyn Tx,
    index: u64,
    size: u64,
) -> Result<Option<Vec<MerkleHash>>, DbError> {
    if index >= size || size > tree_size(tx)? {
        return Ok(None);
    }
    with_nodes(tx, |src| crate::merkle::inclusion_proof(src, index, size)).map(Some)
}

/// Consistency proof between two tree sizes (`None` if out of range).
pub(crate) fn consistency_proof(
    tx: &mut dyn Tx,
    old: u64,
    new: u64,
) -> Result<Option<Vec<MerkleHash>>, DbError> {
    if old > new || new > tree_size(tx)? {
        return Ok(None);
    }
    with_nodes(tx, |src| crate::merkle::consistency_proof(src, old, new)).map(Some)
}

/// Entries with `seq > after`, in order, at most `limit`.
pub(crate) fn entries(
    tx: &mut dyn Tx,
    after: u64,
    limit: u32,
) -> Result<Vec<StoredEntry>, DbError> {
    let rows = tx.query(
        &format!("SELECT {ENTRY_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"),
        &[Value::Int(after as i64), limit.into()],
    )?;
    rows::all(rows, rows::entry)
}

/// The entries that name a lease, in order.
pub(crate) fn entries_for_lease(
    tx: &mut dyn Tx,
    lease_id: &str,
) -> Result<Vec<StoredEntry>, DbError> {
    let rows = tx.query(
        &format!("SELECT {ENTRY_COLUMNS} FROM audit_log WHERE lease_id = $1 ORDER BY seq"),
        &[lease_id.into()],
    )?;
    rows::all(rows, rows::entry)
}
