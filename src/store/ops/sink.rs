//! Audit sinks' positions: which entry each sink has, and which broker ships it now.

use super::log::chain_top;
use crate::store::sql::{DbError, Tx};
use crate::store::{SinkClaim, SinkPosition};

/// Takes or keeps sink `c.name` for `c.holder` until `c.held_until_ms` (only when it is
/// free, already this holder's, or its hold lapsed before `c.now_ms`) and moves its
/// position forward to `c.shipped`. Where it stands, or `None` while another holder has it.
pub(crate) fn claim(tx: &mut dyn Tx, c: &SinkClaim) -> Result<Option<SinkPosition>, DbError> {
    tx.execute(
        "INSERT INTO audit_sinks (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[c.name.as_str().into()],
    )?;
    let shipped = i64::try_from(c.shipped.unwrap_or(0)).unwrap_or(i64::MAX);
    // The position only moves forward: a holder that lost the sink and comes back late
    // cannot make a later holder ship entries again.
    let row = tx.query_opt(
        "UPDATE audit_sinks
         SET holder = $2, held_until = $3,
             shipped = CASE WHEN $4 > shipped THEN $4 ELSE shipped END
         WHERE name = $1 AND (holder = $2 OR holder IS NULL OR held_until < $5)
         RETURNING shipped",
        &[
            c.name.as_str().into(),
            c.holder.as_str().into(),
            c.held_until_ms.into(),
            shipped.into(),
            c.now_ms.into(),
        ],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let shipped = row.i64(0)?.max(0) as u64;
    let (log_size, _) = chain_top(tx)?;
    Ok(Some(SinkPosition { shipped, log_size }))
}
