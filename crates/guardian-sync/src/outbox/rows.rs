//! Reading and writing op rows.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;
use uuid::Uuid;

use crate::op::{HistoryEntry, OpId, OpKind, OpState, PendingOp};

/// The columns of `ops` in the order [`read_op`] expects.
pub(crate) const OP_COLUMNS: &str = "seq, op_id, idempotency_key, kind, entity_type, entity_id, \
     payload, base, base_version, chained, txn_tokens, envelope_version, state, attempts, \
     next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations, history";

fn bad(idx: usize, what: impl Into<String>) -> rusqlite::Error {
    let msg: String = what.into();
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, msg.into())
}

fn json<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s).map_err(|e| bad(idx, e.to_string()))
}

fn opt_json(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Value>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| bad(idx, e.to_string())))
        .transpose()
}

fn uuid(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let s: String = row.get(idx)?;
    Uuid::parse_str(&s).map_err(|e| bad(idx, e.to_string()))
}

fn unsigned<T: TryFrom<i64>>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let v: i64 = row.get(idx)?;
    T::try_from(v).map_err(|_| bad(idx, format!("negative or too large: {v}")))
}

/// Decodes a row selected with [`OP_COLUMNS`].
pub(crate) fn read_op(row: &Row<'_>) -> rusqlite::Result<PendingOp> {
    let kind: String = row.get(3)?;
    let state: String = row.get(12)?;
    let base_version: Option<i64> = row.get(8)?;
    Ok(PendingOp {
        seq: row.get(0)?,
        op_id: uuid(row, 1)?,
        idempotency_key: uuid(row, 2)?,
        kind: OpKind::parse(&kind).ok_or_else(|| bad(3, format!("unknown kind {kind:?}")))?,
        entity_type: row.get(4)?,
        entity_id: row.get(5)?,
        payload: json(row, 6)?,
        base: opt_json(row, 7)?,
        base_version: base_version
            .map(|v| u64::try_from(v).map_err(|_| bad(8, "negative version")))
            .transpose()?,
        chained: row.get(9)?,
        txn_tokens: json(row, 10)?,
        envelope_version: unsigned(row, 11)?,
        state: OpState::parse(&state).ok_or_else(|| bad(12, format!("unknown state {state:?}")))?,
        attempts: unsigned(row, 13)?,
        next_attempt_at: row.get(14)?,
        last_error: row.get(15)?,
        created_at: row.get(16)?,
        updated_at: row.get(17)?,
        coalesced_count: unsigned(row, 18)?,
        reconciliations: unsigned(row, 19)?,
        history: json::<Vec<HistoryEntry>>(row, 20)?,
    })
}

/// The op with this id, if any.
pub(crate) fn by_id(conn: &Connection, op_id: OpId) -> rusqlite::Result<Option<PendingOp>> {
    conn.prepare_cached(&format!("SELECT {OP_COLUMNS} FROM ops WHERE op_id = ?1"))?
        .query_row([op_id.to_string()], read_op)
        .optional()
}

/// The op at this position, if any.
pub(crate) fn by_seq(conn: &Connection, seq: i64) -> rusqlite::Result<Option<PendingOp>> {
    conn.prepare_cached(&format!("SELECT {OP_COLUMNS} FROM ops WHERE seq = ?1"))?
        .query_row([seq], read_op)
        .optional()
}

/// Converts a version for storage (SQLite integers are signed).
pub(crate) fn version_to_sql(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Makes the head of an entity right again after any change touching it:
/// its in-flight op if any, else its lowest-seq pending op. Uses the
/// `(entity_type, entity_id, seq)` index; touches only this entity's rows.
pub(crate) fn recompute_head(
    conn: &Connection,
    entity_type: &str,
    entity_id: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE ops INDEXED BY ops_entity SET is_head = 0 WHERE entity_type = ?1 AND entity_id = ?2 AND is_head = 1",
    )?
    .execute(params![entity_type, entity_id])?;
    conn.prepare_cached(
        "UPDATE ops SET is_head = 1 WHERE seq = (SELECT seq FROM ops INDEXED BY ops_entity \
         WHERE entity_type = ?1 AND entity_id = ?2 AND state IN ('pending', 'in_flight') \
         ORDER BY state = 'in_flight' DESC, seq LIMIT 1)",
    )?
    .execute(params![entity_type, entity_id])?;
    Ok(())
}

/// The next active op of the entity after `seq`, as (seq, chained).
pub(crate) fn successor(
    conn: &Connection,
    entity_type: &str,
    entity_id: &str,
    seq: i64,
) -> rusqlite::Result<Option<(i64, bool)>> {
    conn.prepare_cached(
        "SELECT seq, chained FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 AND entity_id = ?2 AND seq > ?3 \
         AND state IN ('pending', 'in_flight') ORDER BY seq LIMIT 1",
    )?
    .query_row(params![entity_type, entity_id, seq], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Deletes one op row.
pub(crate) fn delete(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM ops WHERE seq = ?1")?
        .execute([seq])?;
    Ok(())
}
