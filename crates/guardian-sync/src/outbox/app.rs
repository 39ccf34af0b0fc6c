//! App-side reads and edits: inspection, the dead-letter list, and changes to
//! ops that were never attempted.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::enqueue::{check_depth, check_payload};
use super::error::OutboxError;
use super::writer::Ctx;
use super::{gate, outcomes, rows, upcast};
use crate::op::{
    sent_before_retry, HistoryEntry, OpId, OpKind, OpState, PendingOp, REQUEUED, RETRIED_AFTER_SEND,
};

/// Which ops [`list`](super::Outbox::list) returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only ops in this state (all states if `None`).
    pub state: Option<OpState>,
    /// At most this many ops.
    pub limit: usize,
    /// Only ops after this position (for paging; 0 to start).
    pub after_seq: i64,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            state: None,
            limit: 100,
            after_seq: 0,
        }
    }
}

/// The queue as the run loop sees it between drain steps (index lookups only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NextDue {
    /// Some op is pending or in flight.
    pub active: bool,
    /// Earliest time a ready head is due (Unix ms).
    pub next_attempt_at: Option<i64>,
}

/// Queue depth and timing. Counting rows grows with the queue: keep
/// [`Outbox::stats`](super::Outbox::stats) off hot paths (the run loop uses
/// [`Outbox::next_due`](super::Outbox::next_due)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Ops waiting to be sent.
    pub pending: u64,
    /// Ops claimed by a runner.
    pub in_flight: u64,
    /// Ops in the dead-letter list.
    pub failed: u64,
    /// Creation time of the oldest pending or in-flight op (Unix ms).
    pub oldest_created_at: Option<i64>,
    /// Earliest time a ready op is due (Unix ms).
    pub next_attempt_at: Option<i64>,
}

fn load(conn: &Connection, op_id: OpId) -> Result<PendingOp, OutboxError> {
    rows::by_id(conn, op_id)?.ok_or(OutboxError::NotFound(op_id))
}

fn expect_never_attempted(op: &PendingOp) -> Result<(), OutboxError> {
    if op.state != OpState::Pending {
        return Err(OutboxError::WrongState {
            op_id: op.op_id,
            state: op.state,
            needed: "pending",
        });
    }
    if op.attempts > 0 || sent_before_retry(&op.history) {
        return Err(OutboxError::AlreadyAttempted {
            op_id: op.op_id,
            attempts: op.attempts,
        });
    }
    Ok(())
}

/// Ops in FIFO order; rows that cannot be used are left out (see
/// [`rows::list_checked`], which shows them).
pub(crate) fn list(conn: &Connection, f: &ListFilter) -> Result<Vec<PendingOp>, OutboxError> {
    Ok(rows::list_checked(conn, f, super::schema::Seal::Full)?
        .into_iter()
        .filter_map(Result::ok)
        .collect())
}

/// Puts a failed op back in the queue as new: due now, attempt count reset
/// (a full retry budget) and error cleared. Its key is kept (it may be
/// applied: the server then replays the result), and so is the old error,
/// in its history. An op that had been sent stays marked as such there, so
/// it is never coalesced into, edited or cancelled.
///
/// A transaction is retried whole, whichever of its ops is named, and ops
/// that failed only because this one did (their dependency) are retried
/// with it.
pub(crate) fn retry_failed(conn: &Connection, ctx: &Ctx, op_id: OpId) -> Result<(), OutboxError> {
    let op = load(conn, op_id)?;
    if op.state != OpState::Failed {
        return Err(OutboxError::WrongState {
            op_id,
            state: op.state,
            needed: "failed",
        });
    }
    let mut todo = vec![op];
    while let Some(op) = todo.pop() {
        for member in gate::unit_of(conn, &op)? {
            if member.state != OpState::Failed {
                continue;
            }
            todo.extend(gate::failed_dependents(conn, member.op_id)?);
            retry_one(conn, ctx, member.op_id)?;
        }
    }
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

fn retry_one(conn: &Connection, ctx: &Ctx, op_id: OpId) -> Result<(), OutboxError> {
    let op = load(conn, op_id)?;
    if op.state != OpState::Failed {
        return Err(OutboxError::WrongState {
            op_id,
            state: op.state,
            needed: "failed",
        });
    }
    let now = ctx.now();
    let mut history = op.history;
    history.push(HistoryEntry {
        at: now,
        event: if op.attempts > 0 {
            RETRIED_AFTER_SEND
        } else {
            REQUEUED
        }
        .to_owned(),
        detail: format!(
            "failed after {} attempt(s): {}",
            op.attempts,
            op.last_error.as_deref().unwrap_or("no error recorded")
        ),
        old_idempotency_key: None,
        app_payload: None,
    });
    conn.prepare_cached(
        "UPDATE ops SET state = 'pending', attempts = 0, last_error = NULL, history = ?1, \
         next_attempt_at = ?2, updated_at = ?2 WHERE seq = ?3",
    )?
    .execute(params![serde_json::to_string(&history)?, now, op.seq])?;
    // It may still carry an old envelope version: list it for the next open.
    upcast::note_version(conn, op.envelope_version)?;
    for t in &op.txn_tokens {
        outcomes::reopened(conn, t, now)?;
    }
    rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
    Ok(())
}

pub(crate) fn retry_all_failed(conn: &Connection, ctx: &Ctx) -> Result<u64, OutboxError> {
    let ids: Vec<String> = {
        let mut stmt = conn.prepare_cached(
            "SELECT op_id FROM ops INDEXED BY ops_state WHERE state <> 'pending' AND state = 'failed' \
             ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut n = 0;
    for id in ids {
        if let Ok(id) = uuid::Uuid::parse_str(&id) {
            // Retried already with its transaction or its dependency.
            if load(conn, id)?.state != OpState::Failed {
                continue;
            }
            retry_failed(conn, ctx, id)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes a failed op for good (its tokens already failed); a
/// transaction goes whole. Ops that depend on it no longer wait for it.
pub(crate) fn discard(conn: &Connection, ctx: &Ctx, op_id: OpId) -> Result<PendingOp, OutboxError> {
    let op = load(conn, op_id)?;
    let unit = gate::unit_of(conn, &op)?;
    if let Some(active) = unit.iter().find(|m| m.state != OpState::Failed) {
        return Err(OutboxError::WrongState {
            op_id: active.op_id,
            state: active.state,
            needed: "failed",
        });
    }
    for member in &unit {
        rows::delete(conn, member.seq)?;
    }
    gate::refresh(conn, ctx.now())?;
    Ok(op)
}

/// Removes a never-attempted op; its tokens fail as "cancelled", and a
/// successor chained on it inherits its base (it now follows what preceded it).
///
/// A transaction is cancelled whole, and only if none of its ops was sent.
pub(crate) fn cancel(conn: &Connection, ctx: &Ctx, op_id: OpId) -> Result<PendingOp, OutboxError> {
    let op = load(conn, op_id)?;
    let unit = gate::unit_of(conn, &op)?;
    for member in &unit {
        expect_never_attempted(member)?;
    }
    for member in unit.iter().rev() {
        cancel_one(conn, ctx, member.op_id)?;
    }
    gate::refresh(conn, ctx.now())?;
    Ok(op)
}

fn cancel_one(conn: &Connection, ctx: &Ctx, op_id: OpId) -> Result<PendingOp, OutboxError> {
    let op = load(conn, op_id)?;
    expect_never_attempted(&op)?;
    let now = ctx.now();
    rows::delete(conn, op.seq)?;
    for t in &op.txn_tokens {
        outcomes::failed(conn, t, "cancelled", now)?;
    }
    if let Some((next, true)) = rows::successor(conn, &op.entity_type, &op.entity_id, op.seq)? {
        conn.prepare_cached(
            "UPDATE ops SET base = ?1, base_version = ?2, chained = ?3, updated_at = ?4 WHERE seq = ?5",
        )?
        .execute(params![
            op.base.as_ref().map(Value::to_string),
            rows::version_to_sql(op.base_version),
            op.chained,
            now,
            next
        ])?;
    }
    rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
    Ok(op)
}

/// Replaces the payload of a never-attempted create/update.
pub(crate) fn edit_payload(
    conn: &Connection,
    ctx: &Ctx,
    op_id: OpId,
    payload: &Value,
) -> Result<(), OutboxError> {
    let op = load(conn, op_id)?;
    expect_never_attempted(&op)?;
    if op.kind == OpKind::Delete && !payload.is_null() {
        return Err(OutboxError::InvalidPayload(
            super::EnqueueError::PayloadOnDelete { found: "a value" },
        ));
    }
    check_depth(payload).map_err(OutboxError::InvalidPayload)?;
    let text = check_payload(op.kind, payload, ctx.max_payload_bytes)
        .map_err(OutboxError::InvalidPayload)?;
    conn.prepare_cached("UPDATE ops SET payload = ?1, updated_at = ?2 WHERE seq = ?3")?
        .execute(params![text, ctx.now(), op.seq])?;
    Ok(())
}

/// Counts by state: all ops through the smallest index, in-flight and
/// failed ones through the partial `ops_state` index (pending is the rest),
/// plus two O(log n) probes.
pub(crate) fn stats(conn: &Connection) -> Result<Stats, OutboxError> {
    let mut s = Stats::default();
    let total: i64 = conn
        .prepare_cached("SELECT count(*) FROM ops")?
        .query_row([], |r| r.get(0))?;
    let mut others: i64 = 0;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT state, count(*) FROM ops INDEXED BY ops_state WHERE state <> 'pending' \
             GROUP BY state",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let state: String = r.get(0)?;
            let n: i64 = r.get(1)?;
            others += n;
            let n = u64::try_from(n).unwrap_or(0);
            match OpState::parse(&state) {
                Some(OpState::InFlight) => s.in_flight = n,
                Some(OpState::Failed) => s.failed = n,
                Some(OpState::Pending) | None => {}
            }
        }
    }
    s.pending = u64::try_from(total - others).unwrap_or(0);
    s.oldest_created_at = conn
        .prepare_cached(
            "SELECT created_at FROM ops WHERE state IN ('pending', 'in_flight') ORDER BY seq LIMIT 1",
        )?
        .query_row([], |r| r.get(0))
        .optional()?;
    s.next_attempt_at = next_ready_at(conn)?;
    Ok(s)
}

/// Earliest time a ready head is due, through `ops_ready`.
fn next_ready_at(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT min(next_attempt_at) FROM ops INDEXED BY ops_ready WHERE state = 'pending' AND is_head = 1",
    )?
    .query_row([], |r| r.get(0))
}

/// When the next ready head is due as the runner will see it
/// ([`crate::retry::clamp_due`]), for display: a stored time written under a
/// wall clock ahead of `now` is not shown as hours away. Reads the heads in
/// backoff only when none is due.
pub(crate) fn next_attempt(
    conn: &Connection,
    now: i64,
    horizon: std::time::Duration,
) -> Result<Option<i64>, OutboxError> {
    let Some(first) = next_ready_at(conn)? else {
        return Ok(None);
    };
    if first <= now {
        return Ok(Some(first));
    }
    let mut stmt = conn.prepare_cached(
        "SELECT o.next_attempt_at, o.attempts, o.updated_at FROM ops AS o \
         WHERE o.seq IN (SELECT seq FROM ops INDEXED BY ops_ready \
         WHERE state = 'pending' AND is_head = 1 AND next_attempt_at > ?1)",
    )?;
    let mut rows = stmt.query([now])?;
    let mut due = first;
    while let Some(r) = rows.next()? {
        let attempts = u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX);
        due = due.min(crate::retry::clamp_due(
            r.get(0)?,
            attempts,
            r.get(2)?,
            now,
            horizon,
        ));
    }
    Ok(Some(due))
}

/// What the run loop needs between drain steps, from indexes only (no
/// count): whether any op is still pending or in flight, and when the next
/// ready head is due. Every entity with a pending op has a head: its
/// in-flight op (found through `ops_state`) or its lowest pending op (in
/// `ops_ready`), so the two probes answer "active" without touching the
/// pending rows.
pub(crate) fn next_due(conn: &Connection) -> Result<NextDue, OutboxError> {
    let next_attempt_at = next_ready_at(conn)?;
    let active = next_attempt_at.is_some()
        || conn
            .prepare_cached(
                "SELECT 1 FROM ops INDEXED BY ops_state WHERE state <> 'pending' AND state = 'in_flight' \
                 LIMIT 1",
            )?
            .exists([])?;
    Ok(NextDue {
        active,
        next_attempt_at,
    })
}

pub(crate) fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, OutboxError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

pub(crate) fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), OutboxError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
    )?
    .execute(params![key, value])?;
    Ok(())
}
