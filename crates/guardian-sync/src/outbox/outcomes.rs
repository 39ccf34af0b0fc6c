//! Outcomes of optimistic-update transaction tokens, kept on disk so they
//! survive restarts (an app whose callbacks died with the process still
//! learns what happened).
//!
//! One row per token: `active` counts the pending/in-flight ops carrying it.
//! A token succeeds when its last active op is acknowledged (or coalesced
//! away) and no op carrying it failed; it fails as soon as one of its ops
//! fails permanently or is cancelled. Settled rows are marked undelivered
//! until the app (or engine) confirms it published them.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::op::TxnOutcome;

/// A settled outcome not yet confirmed as delivered to the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// Row id, passed back to `mark_outcomes_delivered`.
    pub id: i64,
    /// The transaction token.
    pub token: String,
    /// What happened.
    pub outcome: TxnOutcome,
    /// When it was settled (Unix ms).
    pub at: i64,
}

/// One more active op carries `token`.
pub(crate) fn add(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_outcomes (token, active, state, at, delivered) VALUES (?1, 1, 'pending', ?2, 1) \
         ON CONFLICT(token) DO UPDATE SET active = active + 1, \
         state = CASE WHEN state = 'failed' THEN 'failed' ELSE 'pending' END",
    )?
    .execute(params![token, now])?;
    Ok(())
}

/// One op carrying `token` left without settling anything (its token moved to another op).
pub(crate) fn drop_one(conn: &Connection, token: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE txn_outcomes SET active = max(active - 1, 0) WHERE token = ?1")?
        .execute([token])?;
    Ok(())
}

/// One op carrying `token` was applied; the token succeeds if it was the last.
pub(crate) fn succeeded(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE txn_outcomes SET active = max(active - 1, 0), \
         at = CASE WHEN state = 'pending' AND active <= 1 THEN ?2 ELSE at END, \
         delivered = CASE WHEN state = 'pending' AND active <= 1 THEN 0 ELSE delivered END, \
         state = CASE WHEN state = 'pending' AND active <= 1 THEN 'succeeded' ELSE state END \
         WHERE token = ?1",
    )?
    .execute(params![token, now])?;
    Ok(())
}

/// A token that was settled the moment it arrived (its op was coalesced away).
pub(crate) fn succeeded_at_once(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<()> {
    add(conn, token, now)?;
    succeeded(conn, token, now)
}

/// An op carrying `token` failed permanently: the token fails.
pub(crate) fn failed(
    conn: &Connection,
    token: &str,
    error: &str,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE txn_outcomes SET active = max(active - 1, 0), \
         delivered = CASE WHEN state = 'failed' THEN delivered ELSE 0 END, \
         error = CASE WHEN state = 'failed' THEN error ELSE ?2 END, \
         at = CASE WHEN state = 'failed' THEN at ELSE ?3 END, \
         state = 'failed' WHERE token = ?1",
    )?
    .execute(params![token, error, now])?;
    Ok(())
}

/// A failed op carrying `token` was put back in the queue: the token is pending again.
pub(crate) fn reopened(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_outcomes (token, active, state, at, delivered) VALUES (?1, 1, 'pending', ?2, 1) \
         ON CONFLICT(token) DO UPDATE SET active = active + 1, state = 'pending', error = NULL, \
         delivered = 1, at = ?2",
    )?
    .execute(params![token, now])?;
    Ok(())
}

fn decode(state: &str, error: Option<String>) -> TxnOutcome {
    match state {
        "succeeded" => TxnOutcome::Succeeded,
        "failed" => TxnOutcome::Failed {
            error: error.unwrap_or_default(),
        },
        _ => TxnOutcome::Pending,
    }
}

/// The outcome of `token`, if it is known.
pub(crate) fn get(conn: &Connection, token: &str) -> rusqlite::Result<Option<TxnOutcome>> {
    conn.prepare_cached("SELECT state, error FROM txn_outcomes WHERE token = ?1")?
        .query_row([token], |r| {
            let state: String = r.get(0)?;
            Ok(decode(&state, r.get(1)?))
        })
        .optional()
}

/// Settled outcomes not yet delivered, oldest first.
pub(crate) fn undelivered(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<OutcomeRecord>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT id, token, state, error, at FROM txn_outcomes WHERE delivered = 0 ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |r| {
        let state: String = r.get(2)?;
        Ok(OutcomeRecord {
            id: r.get(0)?,
            token: r.get(1)?,
            outcome: decode(&state, r.get(3)?),
            at: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Marks outcomes as delivered.
pub(crate) fn mark_delivered(conn: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("UPDATE txn_outcomes SET delivered = 1 WHERE id = ?1")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// Forgets delivered, settled outcomes older than `before` (Unix ms).
pub(crate) fn prune(conn: &Connection, before: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM txn_outcomes WHERE state <> 'pending' AND at < ?1 AND delivered = 1",
    )?
    .execute([before])
}
