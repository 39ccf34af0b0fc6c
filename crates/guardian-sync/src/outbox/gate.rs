//! The gate of ops that wait for more than their entity's predecessors:
//! the ops of an atomic transaction, and ops with dependencies.
//!
//! The head rule never gives such an op `is_head`; [`refresh`] does, to
//! every op of a unit (a whole transaction, or one dependent op) once the
//! unit may go:
//! - every op of the unit is pending, and a transaction has all its ops;
//! - on each of its entities, every active op before it belongs to the unit
//!   (per-entity order holds across transactions);
//! - every op it depends on is gone from the outbox (acknowledged, or
//!   discarded by the app).
//!
//! A unit one of whose dependencies failed fails too, and so does a
//! transaction that lost ops (a salvage could not read them): it is never
//! sent in part. Claims then see ready units through `ops_ready` as any
//! head, and a claim takes a transaction whole.
//!
//! Every write that may change a unit's verdict calls [`refresh`]; it costs
//! one index probe when no op is gated, and a walk of the pending gated
//! ops otherwise.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::rows;
use crate::op::{OpId, OpState, PendingOp, TxnRef};

/// Whether any op is gated and not yet done (pending, in flight or failed).
pub(crate) fn any_gated(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM ops INDEXED BY ops_gated WHERE txn IS NOT NULL OR depends_on IS NOT NULL LIMIT 1",
    )?
    .exists([])
}

/// Whether an active or failed op waits for `op_id`.
pub(crate) fn has_dependents(conn: &Connection, op_id: &str) -> rusqlite::Result<bool> {
    // Op ids are UUIDs: a substring match of the JSON array is exact.
    conn.prepare_cached(
        "SELECT 1 FROM ops INDEXED BY ops_gated WHERE (txn IS NOT NULL OR depends_on IS NOT NULL) \
         AND depends_on IS NOT NULL AND instr(depends_on, ?1) > 0 LIMIT 1",
    )?
    .exists([op_id])
}

/// A gated pending op, as the gate reads it.
struct Gated {
    seq: i64,
    entity_type: String,
    entity_id: String,
    txn: Option<String>,
    depends_on: Vec<OpId>,
    is_head: bool,
}

/// What a unit may do now.
enum Verdict {
    Go,
    Wait,
    Fail(String),
}

/// Sets `is_head` on the ops of every unit that may go and clears it on the
/// others; fails units whose dependency failed or whose transaction is
/// incomplete, until nothing more changes (a failure can fail dependents).
pub(crate) fn refresh(conn: &Connection, now: i64) -> rusqlite::Result<()> {
    if !any_gated(conn)? {
        return Ok(());
    }
    loop {
        let units = pending_units(conn)?;
        let mut failed_any = false;
        for unit in units.values() {
            match verdict(conn, unit)? {
                Verdict::Go => set_head(conn, unit, true)?,
                Verdict::Wait => set_head(conn, unit, false)?,
                Verdict::Fail(reason) => {
                    fail_unit(conn, now, unit, &reason)?;
                    failed_any = true;
                }
            }
        }
        if !failed_any {
            return Ok(());
        }
    }
}

/// Pending gated ops grouped into units: a transaction's ops under its
/// stored text, a lone dependent under its position.
fn pending_units(conn: &Connection) -> rusqlite::Result<BTreeMap<String, Vec<Gated>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, entity_type, entity_id, txn, depends_on, is_head FROM ops INDEXED BY ops_gated \
         WHERE (txn IS NOT NULL OR depends_on IS NOT NULL) AND state = 'pending' ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut units: BTreeMap<String, Vec<Gated>> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        // A row that does not decode is left to the claim, which
        // quarantines it; here it only waits.
        let (Ok(entity_type), Ok(entity_id)) = (r.get::<_, String>(1), r.get::<_, String>(2))
        else {
            continue;
        };
        let txn: Option<String> = r.get(3).unwrap_or(None);
        let depends_on: Vec<OpId> = r
            .get::<_, Option<String>>(4)
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let key = txn.clone().unwrap_or_else(|| format!("op:{seq:020}"));
        units.entry(key).or_default().push(Gated {
            seq,
            entity_type,
            entity_id,
            txn,
            depends_on,
            is_head: r.get(5)?,
        });
    }
    Ok(units)
}

fn verdict(conn: &Connection, unit: &[Gated]) -> rusqlite::Result<Verdict> {
    let Some(first) = unit.first() else {
        return Ok(Verdict::Wait);
    };
    if let Some(text) = &first.txn {
        let Ok(txn) = serde_json::from_str::<TxnRef>(text) else {
            return Ok(Verdict::Fail("its transaction record is unreadable".into()));
        };
        let (all, pending, failed): (i64, i64, i64) = conn
            .prepare_cached(
                "SELECT count(*), coalesce(sum(state = 'pending'), 0), \
                 coalesce(sum(state = 'failed'), 0) FROM ops INDEXED BY ops_txn WHERE txn = ?1",
            )?
            .query_row([text], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        if failed > 0 {
            // Only a damaged op (quarantined alone) gets here: every other
            // failure fails the whole transaction at once.
            return Ok(Verdict::Fail(format!(
                "transaction {} failed: {failed} of its ops cannot be sent",
                txn.id
            )));
        }
        if all < i64::from(txn.size) {
            return Ok(Verdict::Fail(format!(
                "transaction {} is incomplete: {all} of its {} ops remain",
                txn.id, txn.size
            )));
        }
        if pending < all {
            return Ok(Verdict::Wait);
        }
    }
    let mut waiting = false;
    for dep in unit.iter().flat_map(|op| &op.depends_on) {
        let found: Option<(String, Option<String>)> =
            super::op_ids::find(conn, *dep, "state, last_error", |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        match found {
            None => {}
            Some((state, error)) if OpState::parse(&state) == Some(OpState::Failed) => {
                return Ok(Verdict::Fail(format!(
                    "{}: {}",
                    dependency_failed_prefix(*dep),
                    error.as_deref().unwrap_or("no reason recorded")
                )));
            }
            Some(_) => waiting = true,
        }
    }
    for op in unit {
        // The entity's first active op must be of this unit.
        let first_active: Option<(i64, Option<String>)> = conn
            .prepare_cached(concat!(
                "SELECT seq, txn FROM ops WHERE seq = ",
                rows::first_active!()
            ))?
            .query_row(params![op.entity_type, op.entity_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let ours = match first_active {
            Some((seq, _)) if seq == op.seq => true,
            Some((_, Some(t))) => op.txn.as_deref() == Some(t.as_str()),
            _ => false,
        };
        if !ours {
            waiting = true;
            break;
        }
    }
    Ok(if waiting { Verdict::Wait } else { Verdict::Go })
}

fn set_head(conn: &Connection, unit: &[Gated], head: bool) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("UPDATE ops SET is_head = ?1 WHERE seq = ?2")?;
    for op in unit.iter().filter(|op| op.is_head != head) {
        stmt.execute(params![head, op.seq])?;
    }
    Ok(())
}

/// Fails every op of the unit (the whole transaction, in any state but
/// failed) with `reason`.
fn fail_unit(conn: &Connection, now: i64, unit: &[Gated], reason: &str) -> rusqlite::Result<()> {
    let seqs: Vec<i64> = match unit.first().and_then(|op| op.txn.as_deref()) {
        Some(txn) => conn
            .prepare_cached(
                "SELECT seq FROM ops INDEXED BY ops_txn WHERE txn = ?1 AND state <> 'failed' ORDER BY seq",
            )?
            .query_map([txn], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?,
        None => unit.iter().map(|op| op.seq).collect(),
    };
    for seq in seqs {
        if let Some(op) = rows::by_seq(conn, seq)? {
            rows::mark_failed(conn, now, &op, reason)?;
        } else {
            // Undecodable: moved to the failed list on its stored values.
            rows::quarantine(conn, now, seq, reason)?;
        }
    }
    Ok(())
}

/// The ops of `op`'s transaction (all states) in order, or `op` alone:
/// what must change state with it.
pub(crate) fn unit_of(conn: &Connection, op: &PendingOp) -> rusqlite::Result<Vec<PendingOp>> {
    let Some(txn) = op.txn else {
        return Ok(vec![op.clone()]);
    };
    let text = serde_json::to_string(&txn)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(&format!(
        "SELECT {} FROM ops INDEXED BY ops_txn WHERE txn = ?1 ORDER BY seq",
        rows::OP_COLUMNS
    ))?
    .query_map([text], rows::read_op)?
    .collect()
}

/// Failed ops that failed because `op_id` did (they depend on it).
pub(crate) fn failed_dependents(
    conn: &Connection,
    op_id: OpId,
) -> rusqlite::Result<Vec<PendingOp>> {
    let id = op_id.to_string();
    let seqs: Vec<i64> = conn
        .prepare_cached(
            "SELECT seq FROM ops INDEXED BY ops_gated WHERE (txn IS NOT NULL OR depends_on IS NOT NULL) \
             AND state = 'failed' AND depends_on IS NOT NULL AND instr(depends_on, ?1) > 0 \
             AND instr(last_error, ?2) = 1 ORDER BY seq",
        )?
        .query_map(params![id, dependency_failed_prefix(op_id)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        out.extend(rows::by_seq(conn, seq)?);
    }
    Ok(out)
}

/// How the error of an op failed by its dependency `dep` begins.
fn dependency_failed_prefix(dep: OpId) -> String {
    format!("dependency {dep} failed")
}
