//! Reading and writing op rows.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::schema::Seal;
use crate::op::{HistoryEntry, OpId, OpKind, OpState, PendingOp};

/// The columns of `ops` in the order [`read_op`] expects.
pub(crate) const OP_COLUMNS: &str = "seq, op_id, idempotency_key, kind, entity_type, entity_id, \
     payload, base, base_version, chained, txn_tokens, envelope_version, state, attempts, \
     next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations, history, \
     txn, depends_on";

/// [`OP_COLUMNS`] and the row's seal (schema 4), as [`read_checked`] expects.
pub(crate) const OP_COLUMNS_SEALED: &str = "seq, op_id, idempotency_key, kind, entity_type, \
     entity_id, payload, base, base_version, chained, txn_tokens, envelope_version, state, \
     attempts, next_attempt_at, last_error, created_at, updated_at, coalesced_count, \
     reconciliations, history, txn, depends_on, checksum";

/// Index of `checksum` in [`OP_COLUMNS_SEALED`].
const CHECKSUM_COLUMN: usize = 23;

/// Indexes in [`OP_COLUMNS_SEALED`] of the sealed fields, in the order
/// [`super::schema::op_checksum`] takes them.
const SEALED_COLUMNS: [usize; super::schema::SEALED] = [1, 2, 3, 4, 5, 6, 7, 21, 22, 8, 9];

/// An op row that cannot be used: its values do not decode (damaged bytes,
/// a wrong type) or do not match its seal. Shown with whatever can be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableOp {
    /// Its position.
    pub seq: i64,
    /// Its op id, as far as it can be read (lossy text).
    pub op_id: String,
    /// Its entity type, as far as it can be read.
    pub entity_type: String,
    /// Its entity id, as far as it can be read.
    pub entity_id: String,
    /// Its stored state (`failed` once a runner or a repair quarantined it).
    pub state: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// Lossy text of a stored value, for display only.
fn lossy(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}

impl UnreadableOp {
    /// Describes a row read with [`OP_COLUMNS`] (or the sealed variant).
    fn from_row(row: &Row<'_>, reason: String) -> Self {
        let col = |i: usize| row.get_ref(i).map(lossy).unwrap_or_default();
        Self {
            seq: row.get(0).unwrap_or_default(),
            op_id: col(1),
            entity_type: col(4),
            entity_id: col(5),
            state: col(12),
            reason,
        }
    }
}

/// True if the fields `seal` covers of a row read with
/// [`OP_COLUMNS_SEALED`] match its stored seal.
fn seal_matches(row: &Row<'_>, seal: Seal) -> rusqlite::Result<bool> {
    let mut values = [ValueRef::Null; CHECKSUM_COLUMN + 1];
    for i in SEALED_COLUMNS.into_iter().chain([CHECKSUM_COLUMN]) {
        values[i] = row.get_ref(i)?;
    }
    Ok(values_match_seal(&values, seal))
}

/// [`seal_matches`] over the values of a row in [`OP_COLUMNS_SEALED`]'s
/// order, as salvage holds them; false if any is missing.
pub(crate) fn values_match_seal(values: &[ValueRef<'_>], seal: Seal) -> bool {
    let Some(&stored) = values.get(CHECKSUM_COLUMN) else {
        return false;
    };
    let mut fields = [ValueRef::Null; super::schema::SEALED];
    for (i, f) in fields.iter_mut().enumerate() {
        // Op id to base, txn, depends_on, base_version, chained (if set).
        *f = match values[SEALED_COLUMNS[i]] {
            ValueRef::Integer(0) if i == SEALED_COLUMNS.len() - 1 => ValueRef::Null,
            v => v,
        };
    }
    let fields = &fields[..seal.fields()];
    matches!(stored, ValueRef::Integer(c) if c == super::schema::op_checksum(fields))
}

/// Decodes a row read with [`OP_COLUMNS_SEALED`] (or, if `seal` is
/// [`Seal::None`], [`OP_COLUMNS`]), verifying its seal when there is one;
/// never fails on the row's contents, only says why it cannot be used.
// The error is the rare path, and no larger than the op itself.
#[allow(clippy::result_large_err)]
pub(crate) fn read_checked(row: &Row<'_>, seal: Seal) -> Result<PendingOp, UnreadableOp> {
    let op = read_op(row).map_err(|e| UnreadableOp::from_row(row, format!("damaged row: {e}")))?;
    if seal != Seal::None && !seal_matches(row, seal).unwrap_or(false) {
        return Err(UnreadableOp::from_row(
            row,
            "damaged row: its checksum does not match its contents".into(),
        ));
    }
    Ok(op)
}

fn bad(idx: usize, what: impl Into<String>) -> rusqlite::Error {
    let msg: String = what.into();
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, msg.into())
}

/// A text column, borrowed from the row: the hot path decodes every
/// claimed op, so nothing is copied that is parsed right away.
fn text<'r>(row: &'r Row<'_>, idx: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(idx)?
        .as_str()
        .map_err(|e| bad(idx, e.to_string()))
}

fn json<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    serde_json::from_str(text(row, idx)?).map_err(|e| bad(idx, e.to_string()))
}

/// A JSON list column; most rows hold `[]`, read without the parser.
fn json_list<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<Vec<T>> {
    match text(row, idx)? {
        "[]" => Ok(Vec::new()),
        t => serde_json::from_str(t).map_err(|e| bad(idx, e.to_string())),
    }
}

fn opt_json<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<Option<T>> {
    match row.get_ref(idx)? {
        ValueRef::Null => Ok(None),
        _ => json(row, idx).map(Some),
    }
}

fn uuid(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(text(row, idx)?).map_err(|e| bad(idx, e.to_string()))
}

fn unsigned<T: TryFrom<i64>>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let v: i64 = row.get(idx)?;
    T::try_from(v).map_err(|_| bad(idx, format!("negative or too large: {v}")))
}

/// Decodes a row selected with [`OP_COLUMNS`].
pub(crate) fn read_op(row: &Row<'_>) -> rusqlite::Result<PendingOp> {
    let kind = text(row, 3)?;
    let state = text(row, 12)?;
    let base_version: Option<i64> = row.get(8)?;
    Ok(PendingOp {
        seq: row.get(0)?,
        op_id: uuid(row, 1)?,
        idempotency_key: uuid(row, 2)?,
        kind: OpKind::parse(kind).ok_or_else(|| bad(3, format!("unknown kind {kind:?}")))?,
        entity_type: row.get(4)?,
        entity_id: row.get(5)?,
        payload: json(row, 6)?,
        base: opt_json(row, 7)?,
        base_version: base_version
            .map(|v| u64::try_from(v).map_err(|_| bad(8, "negative version")))
            .transpose()?,
        chained: row.get(9)?,
        txn_tokens: json_list(row, 10)?,
        envelope_version: unsigned(row, 11)?,
        state: OpState::parse(state).ok_or_else(|| bad(12, format!("unknown state {state:?}")))?,
        attempts: unsigned(row, 13)?,
        next_attempt_at: row.get(14)?,
        last_error: row.get(15)?,
        created_at: row.get(16)?,
        updated_at: row.get(17)?,
        coalesced_count: unsigned(row, 18)?,
        reconciliations: unsigned(row, 19)?,
        history: json_list::<HistoryEntry>(row, 20)?,
        txn: opt_json(row, 21)?,
        depends_on: opt_json(row, 22)?.unwrap_or_default(),
    })
}

/// The op with this id, if any.
pub(crate) fn by_id(conn: &Connection, op_id: OpId) -> rusqlite::Result<Option<PendingOp>> {
    super::op_ids::find(conn, op_id, OP_COLUMNS, read_op)
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
/// its in-flight op if any, else its lowest-seq pending op; none when that
/// op is gated (the gate decides, see `gate::refresh`). Uses the
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
    conn.prepare_cached(concat!(
        "UPDATE ops SET is_head = 1 WHERE seq = ",
        first_active!(),
        " AND txn IS NULL AND depends_on IS NULL"
    ))?
    .execute(params![entity_type, entity_id])?;
    Ok(())
}

/// The position of the first active op of the entity `?1`, `?2` (NULL if
/// none): the one in flight, else the first pending. Two lookups in index
/// order rather than one `ORDER BY state = 'in_flight' DESC, seq`: sorting
/// on an expression builds a temporary b-tree at every call, and an ack
/// makes one. A macro so statements embed it with `concat!`, at no cost
/// per call.
macro_rules! first_active {
    () => {
        "coalesce(\
         (SELECT seq FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 AND entity_id = ?2 \
          AND state = 'in_flight' ORDER BY seq LIMIT 1), \
         (SELECT seq FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 AND entity_id = ?2 \
          AND state = 'pending' ORDER BY seq LIMIT 1))"
    };
}
pub(crate) use first_active;

/// Moves an active op to the failed list with `error`: its tokens fail,
/// its chained successor is unchained (it can never learn a version from
/// it: it goes with its own base version, and a conflict then goes to the
/// reconciler), and its entity's next op takes over as head. Ops that
/// depend on it are failed by the next `gate::refresh`.
pub(crate) fn mark_failed(
    conn: &Connection,
    now: i64,
    op: &PendingOp,
    error: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE ops SET state = 'failed', is_head = 0, last_error = ?1, updated_at = ?2 WHERE seq = ?3",
    )?
    .execute(params![error, now, op.seq])?;
    for t in &op.txn_tokens {
        super::outcomes::failed(conn, t, error, now)?;
    }
    if let Some((next, true)) = successor(conn, &op.entity_type, &op.entity_id, op.seq)? {
        conn.prepare_cached("UPDATE ops SET chained = 0 WHERE seq = ?1")?
            .execute([next])?;
    }
    recompute_head(conn, &op.entity_type, &op.entity_id)
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

/// Ops in FIFO order, filtered and paged like [`super::Outbox::list`], each
/// decoded or described as unreadable. `seal`: the seal the file's rows
/// carry, verified.
pub(crate) fn list_checked(
    conn: &Connection,
    f: &super::ListFilter,
    seal: Seal,
) -> rusqlite::Result<Vec<Result<PendingOp, UnreadableOp>>> {
    let cols = if seal != Seal::None {
        OP_COLUMNS_SEALED
    } else {
        OP_COLUMNS
    };
    let limit = i64::try_from(f.limit).unwrap_or(i64::MAX);
    // Pending ops are most of the table: walk it in order. The others are
    // few: read them through the partial `ops_state` index.
    let sql = match f.state {
        Some(OpState::Pending) => {
            format!("SELECT {cols} FROM ops WHERE state = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
        }
        Some(_) => format!(
            "SELECT {cols} FROM ops INDEXED BY ops_state WHERE state <> 'pending' AND state = ?1 \
             AND seq > ?2 ORDER BY seq LIMIT ?3"
        ),
        None => format!("SELECT {cols} FROM ops WHERE ?1 = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"),
    };
    let state = f.state.map_or("", OpState::as_str);
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![state, f.after_seq, limit])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_checked(r, seal));
    }
    Ok(out)
}

/// Every row that cannot be used, in position order (a full scan: for
/// `check`, not for hot paths).
pub(crate) fn unreadable(conn: &Connection, seal: Seal) -> rusqlite::Result<Vec<UnreadableOp>> {
    let cols = if seal != Seal::None {
        OP_COLUMNS_SEALED
    } else {
        OP_COLUMNS
    };
    let mut stmt = conn.prepare(&format!("SELECT {cols} FROM ops ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        if let Err(bad) = read_checked(r, seal) {
            out.push(bad);
        }
    }
    Ok(out)
}

/// Moves an unusable op to the failed list (quarantine) with `reason`: it
/// is kept, shown, never sent; its tokens fail; its entity's next op takes
/// over as head and no longer waits for it. Works on the stored values
/// alone, whatever their encoding.
pub(crate) fn quarantine(
    conn: &Connection,
    now: i64,
    seq: i64,
    reason: &str,
) -> rusqlite::Result<()> {
    let tokens: Vec<String> = conn
        .prepare_cached("SELECT txn_tokens FROM ops WHERE seq = ?1")?
        .query_row([seq], |r| r.get::<_, String>(0))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    conn.prepare_cached(
        "UPDATE ops SET state = 'failed', is_head = 0, last_error = ?1, updated_at = ?2 WHERE seq = ?3",
    )?
    .execute(params![reason, now, seq])?;
    for t in &tokens {
        super::outcomes::failed(conn, t, reason, now)?;
    }
    // The same entity, compared as stored values (they may not be text).
    conn.prepare_cached(
        "UPDATE ops SET chained = 0 WHERE seq = (SELECT o.seq FROM ops o, ops q WHERE q.seq = ?1 \
         AND o.entity_type = q.entity_type AND o.entity_id = q.entity_id AND o.seq > ?1 \
         AND o.state IN ('pending', 'in_flight') ORDER BY o.seq LIMIT 1)",
    )?
    .execute([seq])?;
    conn.prepare_cached(
        "UPDATE ops SET is_head = 1 WHERE seq = (SELECT o.seq FROM ops o, ops q WHERE q.seq = ?1 \
         AND o.entity_type = q.entity_type AND o.entity_id = q.entity_id \
         AND o.state IN ('pending', 'in_flight') \
         AND NOT EXISTS (SELECT 1 FROM ops h WHERE h.entity_type = q.entity_type \
             AND h.entity_id = q.entity_id AND h.is_head = 1) \
         ORDER BY o.state = 'in_flight' DESC, o.seq LIMIT 1) AND txn IS NULL AND depends_on IS NULL",
    )?
    .execute([seq])?;
    Ok(())
}
