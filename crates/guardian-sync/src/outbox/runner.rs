//! Runner-side writes. Every one is fenced: it first checks, in the same
//! transaction, that the lock row still names the caller's owner and epoch,
//! so a runner that lost the lock writes nothing more (DESIGN §11.4).

use std::collections::HashSet;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::enqueue::check_payload;
use super::error::OutboxError;
use super::writer::Ctx;
use super::{gate, lock_row, outcomes, rows};
use crate::core::mutant::{self, Mutant};
use crate::op::{Ack, Fence, HistoryEntry, OpId, OpState, PendingOp, Reconciled};
use crate::retry::clamp_due;

fn load(conn: &Connection, op_id: OpId) -> Result<PendingOp, OutboxError> {
    rows::by_id(conn, op_id)?.ok_or(OutboxError::NotFound(op_id))
}

fn expect_in_flight(op: &PendingOp) -> Result<(), OutboxError> {
    if op.state == OpState::InFlight {
        Ok(())
    } else {
        Err(OutboxError::WrongState {
            op_id: op.op_id,
            state: op.state,
            needed: "in flight",
        })
    }
}

/// Up to `limit` ready heads (pending, head of their entity, due by `now`)
/// in ready order, through the partial `ops_ready` index. A head that
/// cannot be decoded or whose seal does not match is quarantined (see
/// [`rows::quarantine`]) and the next one is read instead: one damaged op
/// never holds back the others, nor is it sent altered.
fn ready_heads(
    conn: &Connection,
    ctx: &Ctx,
    limit: usize,
    now: i64,
) -> Result<Vec<PendingOp>, OutboxError> {
    let (index, heads) = if mutant::active(Mutant::NoHeadRule) {
        ("", "")
    } else {
        ("INDEXED BY ops_ready", "AND is_head = 1")
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM ops {index} WHERE state = 'pending' {heads} AND next_attempt_at <= ?1 \
         ORDER BY next_attempt_at, seq LIMIT ?2",
        rows::OP_COLUMNS_SEALED
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // Each round quarantines at least one row, so this ends.
    loop {
        let mut ops = Vec::new();
        let mut bad = Vec::new();
        {
            let mut found = stmt.query(params![now, limit])?;
            while let Some(r) = found.next()? {
                match rows::read_checked(r, super::schema::Seal::Full) {
                    Ok(op) => ops.push(op),
                    Err(u) => bad.push(u),
                }
            }
        }
        if bad.is_empty() {
            return Ok(ops);
        }
        for u in bad {
            quarantine_op(conn, ctx, &u)?;
        }
        gate::refresh(conn, ctx.now())?;
    }
}

/// Quarantines an unreadable op, logged without its contents.
fn quarantine_op(conn: &Connection, ctx: &Ctx, u: &rows::UnreadableOp) -> Result<(), OutboxError> {
    tracing::error!(seq = u.seq, reason = %u.reason, "outbox op is damaged; moved to failed, not sent");
    rows::quarantine(
        conn,
        ctx.now(),
        u.seq,
        &format!("quarantined: {}", u.reason),
    )?;
    Ok(())
}

/// Claims up to `limit` ready ops (pending, head of their entity, due by
/// `now`) in ready order, marking them in flight with `attempts += 1`
/// durably before any request is sent. Served by the partial `ops_ready`
/// index: no scan however long the queue.
pub(crate) fn claim(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    limit: usize,
    now: i64,
) -> Result<Vec<PendingOp>, OutboxError> {
    lock_row::check(conn, fence)?;
    let heads = ready_heads(conn, ctx, limit, now)?;
    let mut ops: Vec<PendingOp> = whole_units(conn, ctx, heads)?
        .into_iter()
        .flatten()
        .collect();
    mark_claimed(conn, ctx, ops.iter_mut())?;
    Ok(ops)
}

/// Marks claimed ops in flight, `attempts + 1`, durably before any send.
fn mark_claimed<'a>(
    conn: &Connection,
    ctx: &Ctx,
    ops: impl Iterator<Item = &'a mut PendingOp>,
) -> Result<(), OutboxError> {
    let stamp = ctx.now();
    let mut update = conn.prepare_cached(
        "UPDATE ops SET state = 'in_flight', attempts = attempts + 1, updated_at = ?1 WHERE seq = ?2",
    )?;
    for op in ops {
        update.execute(params![stamp, op.seq])?;
        op.state = OpState::InFlight;
        op.attempts += 1;
        op.updated_at = stamp;
    }
    Ok(())
}

/// Ready heads as units: an op of an atomic transaction brings the whole
/// transaction (its ops in order, once, where its first ready op stood);
/// any other op is a unit of its own. The gate let the transaction's ops
/// be heads only when all of them may go.
///
/// A transaction that is not whole and pending here (rows removed or
/// changed behind the outbox's back) is not claimed: the gate fails it.
fn whole_units(
    conn: &Connection,
    ctx: &Ctx,
    heads: Vec<PendingOp>,
) -> Result<Vec<Vec<PendingOp>>, OutboxError> {
    let mut seen = HashSet::new();
    let mut units = Vec::with_capacity(heads.len());
    let mut broken = false;
    for head in heads {
        match head.txn {
            None => units.push(vec![head]),
            Some(txn) => {
                if seen.insert(txn.id) {
                    let unit = gate::unit_of(conn, &head)?;
                    let whole = unit.len() == txn.size as usize
                        && unit.iter().all(|op| op.state == OpState::Pending);
                    if whole {
                        units.push(unit);
                    } else {
                        broken = true;
                    }
                }
            }
        }
    }
    if broken {
        gate::refresh(conn, ctx.now())?;
    }
    Ok(units)
}

/// Like [`claim`], but each claimed head brings along the entity's next ops
/// in order while they are pending and due, up to `max_chain` ops and
/// `max_chain_bytes` (by [`PendingOp::wire_size`]) per entity, for a batch
/// that carries them with dependencies (each applied only if the one before
/// it was). Returns one chain per entity, heads in ready order; `limit`
/// bounds the ops of all chains together. A chain stops at the first op
/// that is not pending (failed ops are skipped, as they no longer hold their
/// entity back), not yet due, or chained on a reconciled op.
pub(crate) fn claim_chains(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    limit: usize,
    now: i64,
    max_chain: usize,
    max_chain_bytes: usize,
) -> Result<Vec<Vec<PendingOp>>, OutboxError> {
    lock_row::check(conn, fence)?;
    let heads = whole_units(conn, ctx, ready_heads(conn, ctx, limit, now)?)?;
    let mut next_ops = conn.prepare_cached(&format!(
        "SELECT {} FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 AND entity_id = ?2 \
         AND seq > ?3 AND state IN ('pending', 'in_flight') ORDER BY seq LIMIT ?4",
        rows::OP_COLUMNS_SEALED
    ))?;
    let mut damaged = Vec::new();
    let mut chains = Vec::with_capacity(heads.len());
    let mut total = 0;
    for mut unit in heads {
        if total >= limit {
            break;
        }
        let room = max_chain.min(limit - total).max(1);
        // A transaction, or a dependent op, travels alone.
        if unit.len() != 1 || unit.iter().any(PendingOp::is_gated) {
            total += unit.len();
            chains.push(unit);
            continue;
        }
        let Some(head) = unit.pop() else {
            continue;
        };
        let mut bytes = head.wire_size();
        let mut chain = vec![head];
        if room > 1 {
            let first = &chain[0];
            let mut more = next_ops.query(params![
                first.entity_type,
                first.entity_id,
                first.seq,
                i64::try_from(room - 1).unwrap_or(i64::MAX)
            ])?;
            while let Some(r) = more.next()? {
                // A damaged successor ends the chain; it is quarantined below.
                let op = match rows::read_checked(r, super::schema::Seal::Full) {
                    Ok(op) => op,
                    Err(u) => {
                        damaged.push(u);
                        break;
                    }
                };
                let size = op.wire_size();
                // A reconciled op's result is a merge, not the app's view
                // its chained successor was made from: the successor must see
                // that result first (`chained_base` sends it into a 3-way
                // merge), so it cannot ride in the same batch.
                let after_merge = chain.last().is_some_and(|p| p.reconciliations > 0);
                if op.state != OpState::Pending
                    || op.is_gated()
                    || op.next_attempt_at > now
                    || bytes + size > max_chain_bytes
                    || (op.chained && after_merge)
                {
                    break;
                }
                bytes += size;
                chain.push(op);
            }
        }
        total += chain.len();
        chains.push(chain);
    }
    drop(next_ops);
    for u in &damaged {
        quarantine_op(conn, ctx, u)?;
    }
    if !damaged.is_empty() {
        gate::refresh(conn, ctx.now())?;
    }
    mark_claimed(conn, ctx, chains.iter_mut().flatten())?;
    Ok(chains)
}

/// How a claim takes ready ops ([`super::Fenced::ack_then_claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimShape {
    /// Each entity's head alone, a transaction's ops together.
    Heads,
    /// Each head with its entity's next pending, due ops behind it, as
    /// [`super::Fenced::claim_ready_chains`] does.
    Chains {
        /// Most ops per chain.
        max_chain: usize,
        /// Most bytes per chain (its head alone may be larger).
        max_chain_bytes: usize,
    },
}

/// [`ack_many`] (if any acks), then a claim, in one job: one commit
/// instead of two, and the claim sees the heads the acks made.
pub(crate) fn ack_then_claim(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    acks: &[(OpId, Ack)],
    limit: usize,
    now: i64,
    shape: ClaimShape,
) -> Result<Vec<Vec<PendingOp>>, OutboxError> {
    if !acks.is_empty() {
        ack_many(conn, ctx, fence, acks)?;
    }
    match shape {
        ClaimShape::Heads => Ok(crate::core::drain::units(claim(
            conn, ctx, fence, limit, now,
        )?)),
        ClaimShape::Chains {
            max_chain,
            max_chain_bytes,
        } => claim_chains(conn, ctx, fence, limit, now, max_chain, max_chain_bytes),
    }
}

/// The server applied the op: delete it, settle its tokens, and give the
/// entity's next op its `If-Match` (and base) and the head position.
///
/// The hot path of a drain, so it reads only the columns it needs: the
/// payload and history are read only when a chained successor must be
/// given a base. An in-flight op is its entity's only head, so no other
/// row's head flag needs clearing.
pub(crate) fn ack(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_id: OpId,
    ack: &Ack,
) -> Result<(), OutboxError> {
    lock_row::check(conn, fence)?;
    let acked = ack_op(conn, ctx, op_id, ack, &HashSet::new())?;
    rows::delete(conn, acked.seq)?;
    acked.set_head(conn)?;
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

/// Several acks in one job: one lock check, no savepoint per op. Any error
/// refuses them all (the writer rolls the job back), as a lost lock would.
/// Acks come in send order, so an entity's chain from one batch is acked
/// front to back.
///
/// The acked rows go in one `DELETE` after every op's successor was given
/// its base: a delete fires the schema's `AFTER DELETE` trigger, so SQLite
/// journals the pages each delete statement touches (a statement journal);
/// one statement journals each page once for the group instead of once per
/// op. The heads are set after that delete, as each lone ack does after its
/// own.
pub(crate) fn ack_many(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    acks: &[(OpId, Ack)],
) -> Result<(), OutboxError> {
    lock_row::check(conn, fence)?;
    if acks.is_empty() {
        return Ok(());
    }
    if let [(op_id, ack)] = acks {
        let acked = ack_op(conn, ctx, *op_id, ack, &HashSet::new())?;
        rows::delete(conn, acked.seq)?;
        acked.set_head(conn)?;
        gate::refresh(conn, ctx.now())?;
        return Ok(());
    }
    let all: HashSet<OpId> = acks.iter().map(|(id, _)| *id).collect();
    if all.len() < acks.len() {
        // The same op twice: its second ack would find it deleted.
        let mut seen = HashSet::new();
        if let Some((op_id, _)) = acks.iter().find(|(id, _)| !seen.insert(*id)) {
            return Err(OutboxError::NotFound(*op_id));
        }
    }
    let mut done = Vec::with_capacity(acks.len());
    for (op_id, ack) in acks {
        done.push(ack_op(conn, ctx, *op_id, ack, &all)?);
    }
    let seqs = serde_json::to_string(&done.iter().map(|a| a.seq).collect::<Vec<i64>>())?;
    conn.prepare_cached("DELETE FROM ops WHERE seq IN (SELECT value FROM json_each(?1))")?
        .execute([seqs])?;
    for acked in &done {
        acked.set_head(conn)?;
    }
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

/// An acked op whose row is still to be deleted.
struct Acked {
    seq: i64,
    /// Its entity, whose head must be set once the row is gone; `None` when
    /// the entity has no other active op, or its successor is acked later
    /// in the same job (that ack sets it).
    head_of: Option<(String, String)>,
}

impl Acked {
    /// The acked op was the entity's head; the first active op by position
    /// takes over (usually the successor, but a failed op put back by
    /// `retry_failed` can sit before it). Runs after the row is deleted.
    fn set_head(&self, conn: &Connection) -> Result<(), OutboxError> {
        if let Some((entity_type, entity_id)) = &self.head_of {
            conn.prepare_cached(concat!(
                "UPDATE ops SET is_head = 1 WHERE seq = ",
                rows::first_active!(),
                " AND txn IS NULL AND depends_on IS NULL"
            ))?
            .execute(params![entity_type, entity_id])?;
        }
        Ok(())
    }
}

/// Acks one op, all but deleting its row and setting its entity's next head
/// (the caller does both, in that order). `acked_later` holds ops acked
/// after it in the same job: when its successor is one of them, the
/// successor needs no base and no head flag (it is about to be deleted too,
/// and its own ack sets the head).
fn ack_op(
    conn: &Connection,
    ctx: &Ctx,
    op_id: OpId,
    ack: &Ack,
    acked_later: &HashSet<OpId>,
) -> Result<Acked, OutboxError> {
    // The state and tokens are read borrowed: most ops have no tokens
    // (`[]`), and only the parsed state is kept.
    let (seq, entity_type, entity_id, state, tokens) = super::op_ids::find(
        conn,
        op_id,
        "seq, entity_type, entity_id, state, txn_tokens",
        |r| {
            let tokens = match r.get_ref(4)?.as_str()? {
                "[]" => Ok(Vec::new()),
                t => serde_json::from_str::<Vec<String>>(t),
            };
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                OpState::parse(r.get_ref(3)?.as_str()?),
                tokens,
            ))
        },
    )?
    .ok_or(OutboxError::NotFound(op_id))?;
    let state = state.ok_or(OutboxError::NotFound(op_id))?;
    if state != OpState::InFlight {
        return Err(OutboxError::WrongState {
            op_id,
            state,
            needed: "in flight",
        });
    }
    let now = ctx.now();
    // The entity's first other active op. Usually none (nothing to chain,
    // no head to set: the common case costs one lookup), or the successor;
    // an op before this one (put back by `retry_failed`) is rare, and then
    // the successor is looked up on its own.
    let next_active = |after: Option<i64>| -> rusqlite::Result<Option<(i64, bool, String)>> {
        conn.prepare_cached(
            "SELECT seq, chained, op_id FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 \
             AND entity_id = ?2 AND seq <> ?3 AND seq > ?4 AND state IN ('pending', 'in_flight') \
             ORDER BY seq LIMIT 1",
        )?
        .query_row(
            params![entity_type, entity_id, seq, after.unwrap_or(i64::MIN)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
    };
    let first_other = next_active(None)?;
    let others = first_other.is_some();
    let successor = match first_other {
        Some((other, _, _)) if other < seq => next_active(Some(seq))?,
        other => other,
    };
    let successor_acked = successor.as_ref().is_some_and(|(_, _, id)| {
        !acked_later.is_empty() && Uuid::parse_str(id).is_ok_and(|id| acked_later.contains(&id))
    });
    let chain = match successor {
        Some((next, true, _)) if !successor_acked => Some((next, chained_base(conn, seq, ack)?)),
        _ => None,
    };
    for t in &tokens? {
        outcomes::succeeded(conn, t, now)?;
    }
    if let Some((next, (base, version))) = chain {
        conn.prepare_cached(
            "UPDATE ops SET base_version = ?1, base = coalesce(?2, base), chained = 0, updated_at = ?3 \
             WHERE seq = ?4",
        )?
        .execute(params![rows::version_to_sql(version), base, now, next])?;
    }
    Ok(Acked {
        seq,
        head_of: (others && !successor_acked).then_some((entity_type, entity_id)),
    })
}

/// The base and `If-Match` a chained successor gets from an ack.
///
/// The successor was made from the app's view after the acked op. When the
/// server's result differs from that view (the acked op was merged with a
/// concurrent change), chaining on the new version would overwrite that
/// change: the successor keeps the app's view as its base and gets a
/// version the server is certain to refuse, so its 409 goes through the
/// reconciler's 3-way merge onto the server's state.
fn chained_base(
    conn: &Connection,
    seq: i64,
    ack: &Ack,
) -> Result<(Option<String>, Option<u64>), OutboxError> {
    let Some(data) = &ack.data else {
        return Ok((None, ack.version));
    };
    let (payload, history): (String, String) = conn
        .prepare_cached("SELECT payload, history FROM ops WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let history: Vec<HistoryEntry> = serde_json::from_str(&history)?;
    let app_view = match history.into_iter().find_map(|h| h.app_payload) {
        Some(v) => v,
        None => serde_json::from_str(&payload)?,
    };
    Ok(match ack.version {
        Some(v) if !guardian_protocol::json_eq(data, &app_view) => {
            (Some(app_view.to_string()), Some(v.saturating_sub(1)))
        }
        v => (Some(data.to_string()), v),
    })
}

/// A retryable failure: back to pending, due at `next_attempt_at`.
pub(crate) fn retry_later(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_id: OpId,
    next_attempt_at: i64,
    error: &str,
) -> Result<(), OutboxError> {
    lock_row::check(conn, fence)?;
    let op = load(conn, op_id)?;
    expect_in_flight(&op)?;
    conn.prepare_cached(
        "UPDATE ops SET state = 'pending', next_attempt_at = ?1, last_error = ?2, updated_at = ?3 \
         WHERE seq = ?4",
    )?
    .execute(params![next_attempt_at, error, ctx.now(), op.seq])?;
    if mutant::active(Mutant::NewKeyOnRetry) {
        conn.execute(
            "UPDATE ops SET idempotency_key = ?1 WHERE seq = ?2",
            params![uuid::Uuid::new_v4().to_string(), op.seq],
        )?;
    }
    rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

/// [`retry_later`] for several ops (a transaction's) in one job.
pub(crate) fn retry_later_many(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_ids: &[OpId],
    next_attempt_at: i64,
    error: &str,
) -> Result<(), OutboxError> {
    for &op_id in op_ids {
        retry_later(conn, ctx, fence, op_id, next_attempt_at, error)?;
    }
    Ok(())
}

/// [`fail`] for several ops (a transaction's), each with its error, in one job.
pub(crate) fn fail_many(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    failures: &[(OpId, String)],
) -> Result<(), OutboxError> {
    for (op_id, error) in failures {
        fail(conn, ctx, fence, *op_id, error)?;
    }
    Ok(())
}

/// [`reconciled`] for an op of a transaction: in the same job the other
/// ops of the transaction go back to pending, due now with their keys (the
/// server applied none of them), so the whole transaction is sent again.
pub(crate) fn reconciled_in_txn(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_id: OpId,
    r: &Reconciled,
    others: &[OpId],
    rebased: &[(OpId, serde_json::Value)],
) -> Result<Uuid, OutboxError> {
    let key = reconciled(conn, ctx, fence, op_id, r)?;
    for (id, payload) in rebased {
        rebase(conn, ctx, *id, payload, op_id)?;
    }
    let detail = format!("sent again with its transaction after a conflict on op {op_id}");
    retry_later_many(conn, ctx, fence, others, ctx.now(), &detail)?;
    Ok(key)
}

/// Gives an in-flight op of a transaction the payload its edit has once
/// moved onto the merge of `onto`, its predecessor, and a new key (a new
/// request); its history keeps the app's own payload. The caller holds
/// the fence.
fn rebase(
    conn: &Connection,
    ctx: &Ctx,
    op_id: OpId,
    payload: &serde_json::Value,
    onto: OpId,
) -> Result<(), OutboxError> {
    let op = load(conn, op_id)?;
    expect_in_flight(&op)?;
    let payload = check_payload(op.kind, payload, ctx.max_payload_bytes)
        .map_err(OutboxError::InvalidPayload)?;
    let now = ctx.now();
    let mut history = op.history;
    let first_change = !history.iter().any(|h| h.app_payload.is_some());
    history.push(HistoryEntry {
        at: now,
        event: "rebased".into(),
        detail: format!("moved onto the merge of op {onto}, its predecessor in the transaction"),
        old_idempotency_key: Some(op.idempotency_key),
        app_payload: first_change.then(|| op.payload.clone()),
    });
    conn.prepare_cached(
        "UPDATE ops SET idempotency_key = ?1, payload = ?2, history = ?3, updated_at = ?4 \
         WHERE seq = ?5",
    )?
    .execute(params![
        Uuid::new_v4().to_string(),
        payload,
        serde_json::to_string(&history)?,
        now,
        op.seq
    ])?;
    Ok(())
}

/// Re-bases the schedule after the wall clock stepped by `delta_ms`: every
/// pending op due after `after_ms` (a time in the old timeline) and
/// scheduled at or before `scheduled_by_ms` (the old timeline's "now") moves
/// by the step, so a backoff keeps its length instead of shrinking (step
/// forward) or growing by the step (step back). A retry scheduled after the
/// step but before the runner noticed it was computed on the new clock
/// already and must not move again (after a forward step it would wait the
/// step twice). Returns how many ops moved.
///
/// A scan of the pending ops: clock steps are rare, and correctness of every
/// backoff matters more than the cost of this one statement.
pub(crate) fn rebase_schedule(
    conn: &Connection,
    fence: &Fence,
    after_ms: i64,
    scheduled_by_ms: i64,
    delta_ms: i64,
) -> Result<u64, OutboxError> {
    lock_row::check(conn, fence)?;
    // `updated_at` moves too: the row is then wholly in the new timeline,
    // and `clamp_schedule` finds nothing more to take out.
    let moved = conn
        .prepare_cached(
            "UPDATE ops SET next_attempt_at = next_attempt_at + ?1, updated_at = updated_at + ?1 \
             WHERE state = 'pending' AND next_attempt_at > ?2 AND updated_at <= ?3",
        )?
        .execute(params![delta_ms, after_ms, scheduled_by_ms])?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// Brings every ready head (and every gated op, waiting or not: it becomes
/// a head with the schedule it has) due after `now` back to when it is due by
/// [`clamp_due`] (never attempted: now; written under a clock ahead: its
/// delay from now; never beyond `horizon`), so an op written before a step
/// back of the wall clock is not parked for the size of the step. Rows it
/// moves get `updated_at = now`: they are in this timeline from then on.
/// Reads the part of `ops_ready` due after `now`: the heads in backoff.
/// Returns how many moved.
pub(crate) fn clamp_schedule(
    conn: &Connection,
    fence: &Fence,
    now: i64,
    horizon: Duration,
) -> Result<u64, OutboxError> {
    lock_row::check(conn, fence)?;
    let moves: Vec<(i64, i64)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT o.seq, o.next_attempt_at, o.attempts, o.updated_at FROM ops AS o \
             WHERE o.seq IN (SELECT seq FROM ops INDEXED BY ops_ready \
             WHERE state = 'pending' AND is_head = 1 AND next_attempt_at > ?1 \
             UNION ALL SELECT seq FROM ops INDEXED BY ops_gated \
             WHERE (txn IS NOT NULL OR depends_on IS NOT NULL) AND state = 'pending' \
             AND next_attempt_at > ?1)",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut moves = Vec::new();
        for row in rows {
            let (seq, next, attempts, updated_at) = row?;
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            let due = clamp_due(next, attempts, updated_at, now, horizon);
            if due != next {
                moves.push((seq, due));
            }
        }
        moves
    };
    let mut update = conn.prepare_cached(
        "UPDATE ops SET next_attempt_at = ?1, updated_at = min(updated_at, ?2) WHERE seq = ?3",
    )?;
    for &(seq, due) in &moves {
        update.execute(params![due, now, seq])?;
    }
    Ok(u64::try_from(moves.len()).unwrap_or(u64::MAX))
}

/// A permanent failure: the op moves to the dead-letter list (kept), its
/// tokens fail, and the entity's next op no longer waits for it.
pub(crate) fn fail(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_id: OpId,
    error: &str,
) -> Result<(), OutboxError> {
    lock_row::check(conn, fence)?;
    let op = load(conn, op_id)?;
    if op.state == OpState::Failed {
        return Err(OutboxError::WrongState {
            op_id,
            state: op.state,
            needed: "pending or in flight",
        });
    }
    rows::mark_failed(conn, ctx.now(), &op, error)?;
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

/// A conflict was reconciled: the op becomes a new request (new idempotency
/// key, merged payload, new `If-Match`), due now; the old key is kept in history.
pub(crate) fn reconciled(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_id: OpId,
    r: &Reconciled,
) -> Result<Uuid, OutboxError> {
    lock_row::check(conn, fence)?;
    let op = load(conn, op_id)?;
    expect_in_flight(&op)?;
    let kind = r.kind.unwrap_or(op.kind);
    let payload = check_payload(kind, &r.payload, ctx.max_payload_bytes)
        .map_err(OutboxError::InvalidPayload)?;
    let now = ctx.now();
    let key = Uuid::new_v4();
    let mut history = op.history;
    history.push(HistoryEntry {
        at: now,
        event: "reconciled".into(),
        detail: r.detail.clone(),
        old_idempotency_key: Some(op.idempotency_key),
        // Only the first reconciliation sees the app's own payload.
        app_payload: (op.reconciliations == 0).then(|| op.payload.clone()),
    });
    conn.prepare_cached(
        "UPDATE ops SET state = 'pending', idempotency_key = ?1, payload = ?2, base = ?3, \
         base_version = ?4, chained = 0, next_attempt_at = ?5, updated_at = ?5, \
         reconciliations = reconciliations + 1, history = ?6, kind = ?8 WHERE seq = ?7",
    )?
    .execute(params![
        key.to_string(),
        payload,
        r.base.as_ref().map(serde_json::Value::to_string),
        rows::version_to_sql(r.base_version),
        now,
        serde_json::to_string(&history)?,
        op.seq,
        kind.as_str()
    ])?;
    rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
    gate::refresh(conn, now)?;
    Ok(key)
}

/// Gives claimed ops that were never sent back to the queue: pending again,
/// `attempts` restored, so they count as never attempted (coalescable,
/// cancellable) exactly as before the claim. Ops no longer in flight are left
/// alone. Used when the engine claimed ahead of its sends and then stops
/// sending (breaker open, authentication required).
pub(crate) fn release(
    conn: &Connection,
    ctx: &Ctx,
    fence: &Fence,
    op_ids: &[OpId],
) -> Result<(), OutboxError> {
    lock_row::check(conn, fence)?;
    let mut update = conn.prepare_cached(
        "UPDATE ops SET state = 'pending', attempts = max(attempts - 1, 0) \
         WHERE seq = ?1 AND state = 'in_flight'",
    )?;
    for &op_id in op_ids {
        let Some(op) = rows::by_id(conn, op_id)? else {
            continue;
        };
        if update.execute([op.seq])? > 0 {
            rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
        }
    }
    gate::refresh(conn, ctx.now())?;
    Ok(())
}

impl super::Outbox {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::op::{Ack, NewOp, OpState};
    use crate::outbox::{Outbox, OutboxOptions};

    /// Acks written together delete their rows in one statement: the
    /// newest position is still never reused (the delete trigger sees each
    /// row), a chained successor still gets its base and `If-Match` and
    /// becomes its entity's head, and an op acked twice in one job is
    /// refused with nothing written.
    #[tokio::test]
    async fn acks_in_one_job_delete_together_and_keep_positions_chains_and_heads() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path().join("o.db"), OutboxOptions::default())
            .await
            .unwrap();
        let create = |id: &str| NewOp::create("device", id, json!({"on": false}));
        let a = outbox.enqueue(create("a")).await.unwrap();
        let b = outbox.enqueue(create("b")).await.unwrap();
        let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
        let now = i64::MAX / 2;
        assert_eq!(
            outbox
                .fenced(&fence)
                .claim_ready(10, now)
                .await
                .unwrap()
                .len(),
            2
        );
        // Made while b's create is in flight: chains on it.
        let b2 = outbox
            .enqueue(NewOp::update("device", "b", json!({"on": true})))
            .await
            .unwrap();
        let c = outbox.enqueue(create("c")).await.unwrap();
        assert_eq!(
            outbox
                .fenced(&fence)
                .claim_ready(10, now)
                .await
                .unwrap()
                .len(),
            1
        );

        let twice = vec![(a.op_id, Ack::default()), (a.op_id, Ack::default())];
        assert!(outbox.fenced(&fence).ack_many(twice).await.is_err());
        assert_eq!(outbox.stats().await.unwrap().in_flight, 3);

        let acks = vec![
            (a.op_id, Ack::default()),
            (
                b.op_id,
                Ack {
                    version: Some(1),
                    data: Some(json!({"on": false})),
                },
            ),
            // The newest op: its position must not come back.
            (c.op_id, Ack::default()),
        ];
        outbox.fenced(&fence).ack_many(acks).await.unwrap();
        for id in [a.op_id, b.op_id, c.op_id] {
            assert!(outbox.get(id).await.unwrap().is_none());
        }
        let next = outbox.get(b2.op_id).await.unwrap().unwrap();
        assert_eq!(next.state, OpState::Pending);
        assert_eq!(next.base_version, Some(1));
        assert!(!next.chained);
        let claimed = outbox.fenced(&fence).claim_ready(10, now).await.unwrap();
        assert_eq!(
            claimed.iter().map(|op| op.op_id).collect::<Vec<_>>(),
            [b2.op_id]
        );
        outbox
            .fenced(&fence)
            .ack_many(vec![(b2.op_id, Ack::default())])
            .await
            .unwrap();
        let d = outbox.enqueue(create("d")).await.unwrap();
        assert!(d.seq > b2.seq.max(c.seq), "position {} reused", d.seq);
        outbox.close().await;
    }
}
