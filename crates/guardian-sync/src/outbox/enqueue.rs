//! Enqueue: validation (before anything touches the database) and the
//! insert-or-coalesce step run inside the group-commit transaction.

use std::sync::{Arc, Mutex};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::error::{EnqueueError, UnknownChange};
use super::writer::Ctx;
use super::{op_ids, outcomes, rows, schema, upcast};
use crate::coalesce::{self, Decision, TailOp};
use crate::op::{sent_before_retry, HistoryEntry, NewOp, OpId, OpKind, OpState};

/// What `enqueue` did with an op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The op that now carries the change. For a merge this is the op merged
    /// into; for an annihilating DELETE it is an id that was never stored.
    pub op_id: OpId,
    /// That op's idempotency key.
    pub idempotency_key: Uuid,
    /// That op's position (for an annihilating DELETE, the removed CREATE's).
    pub seq: i64,
    /// Set when coalescing changed what is stored.
    pub coalesced: Option<Coalesced>,
}

/// An op removed by coalescing (so the app can settle its tokens as succeeded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedOp {
    /// The removed op.
    pub op_id: OpId,
    /// Its position.
    pub seq: i64,
    /// What it did.
    pub kind: OpKind,
    /// Its transaction tokens.
    pub txn_tokens: Vec<String>,
}

/// How coalescing folded the new op into the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Coalesced {
    /// The new op was merged into an earlier never-attempted op.
    MergedInto {
        /// The op that absorbed it.
        op_id: OpId,
        /// Its position.
        seq: i64,
    },
    /// A DELETE removed a never-sent CREATE (and its UPDATEs); nothing was
    /// stored and the removed ops' tokens (and the DELETE's) succeeded.
    Annihilated {
        /// The removed ops, oldest first.
        removed: Vec<RemovedOp>,
    },
    /// A DELETE replaced never-attempted UPDATEs and was stored; their tokens
    /// now travel on the DELETE.
    ReplacedUpdates {
        /// The removed ops, oldest first.
        removed: Vec<RemovedOp>,
    },
}

/// A validated op, serialized once, ready for the writer thread.
#[derive(Debug)]
pub(crate) struct Prepared {
    kind: OpKind,
    entity_type: String,
    entity_id: String,
    payload: String,
    base: Option<String>,
    base_version: Option<i64>,
    txn_token: Option<String>,
    envelope_version: u32,
    /// The id it gets if its position cannot name it (see `op_ids`), and
    /// the id an annihilating DELETE reports.
    op_id: OpId,
    /// Where it was last put, for an error whose outcome is unknown (the
    /// commit may have happened): set by [`apply`].
    stored: Arc<Mutex<Stored>>,
    key: Uuid,
    /// Ops it waits for, as given (some may be settled by the time it is stored).
    depends_on: Vec<OpId>,
    /// Its transaction's stored text (`TxnRef` as JSON), when it has one.
    txn: Option<String>,
}

/// Most ops in one atomic transaction (the reference server's default
/// batch limit is larger; a transaction is one request).
pub const MAX_TRANSACTION_OPS: usize = 100;

/// What [`Outbox::enqueue_transaction`](super::Outbox::enqueue_transaction) stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnqueuedTransaction {
    /// The transaction's id (also its idempotency key on the wire).
    pub txn_id: Uuid,
    /// Its ops, in the order given.
    pub ops: Vec<Enqueued>,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a create/update payload (object, within the size limit) and serializes it.
pub(crate) fn check_payload(
    kind: OpKind,
    payload: &Value,
    max: usize,
) -> Result<String, EnqueueError> {
    match (kind, payload) {
        (OpKind::Delete, Value::Null) => return Ok("null".into()),
        (OpKind::Delete, other) => {
            return Err(EnqueueError::PayloadOnDelete {
                found: json_type(other),
            })
        }
        (_, Value::Object(_)) => {}
        (_, other) => {
            return Err(EnqueueError::PayloadNotObject {
                kind,
                found: json_type(other),
            })
        }
    }
    let text = serde_json::to_string(payload)?;
    if text.len() > max {
        return Err(EnqueueError::PayloadTooLarge {
            size: text.len(),
            max,
        });
    }
    Ok(text)
}

/// Refuses `value` if it nests deeper than
/// [`guardian_protocol::MAX_DATA_DEPTH`]: it would be stored and then
/// quarantined as a damaged row, and no server may take it. Checked on what
/// the app gives (enqueue, edits), not on a merge with the server's data,
/// which its parser already bounds below serde_json's limit.
pub(crate) fn check_depth(value: &Value) -> Result<(), EnqueueError> {
    if guardian_protocol::within_data_depth(value) {
        Ok(())
    } else {
        Err(EnqueueError::PayloadTooDeep {
            max: guardian_protocol::MAX_DATA_DEPTH,
        })
    }
}

/// Where an enqueue put its change (see [`UnknownChange`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored {
    pub(crate) op_id: OpId,
    pub(crate) change: UnknownChange,
}

/// Validates `op` without touching the outbox.
pub(crate) fn prepare(
    op: NewOp,
    max: usize,
    current_envelope: u32,
) -> Result<Prepared, EnqueueError> {
    guardian_protocol::validate_entity_type(&op.entity_type)?;
    guardian_protocol::validate_entity_id(&op.entity_id)?;
    check_depth(&op.payload)?;
    let payload = check_payload(op.kind, &op.payload, max)?;
    let base = match &op.base {
        None => None,
        Some(b) => {
            check_depth(b)?;
            let text = serde_json::to_string(b)?;
            if text.len() > max {
                return Err(EnqueueError::PayloadTooLarge {
                    size: text.len(),
                    max,
                });
            }
            Some(text)
        }
    };
    if let Some(t) = &op.txn_token {
        if t.is_empty() || t.len() > 256 {
            return Err(EnqueueError::InvalidTxnToken);
        }
    }
    if op.depends_on.len() > MAX_TRANSACTION_OPS {
        return Err(EnqueueError::TooManyDependencies {
            count: op.depends_on.len(),
            max: MAX_TRANSACTION_OPS,
        });
    }
    let base_version = op
        .base_version
        .map(|v| i64::try_from(v).map_err(|_| EnqueueError::BaseVersionTooLarge(v)))
        .transpose()?;
    let op_id = Uuid::now_v7();
    Ok(Prepared {
        depends_on: op.depends_on,
        txn: None,
        kind: op.kind,
        entity_type: op.entity_type,
        entity_id: op.entity_id,
        payload,
        base,
        base_version,
        txn_token: op.txn_token,
        envelope_version: op.envelope_version.unwrap_or(current_envelope),
        op_id,
        stored: Arc::new(Mutex::new(Stored {
            op_id,
            change: UnknownChange::New,
        })),
        key: Uuid::new_v4(),
    })
}

impl Prepared {
    /// Where the op was put will be here, for reporting an unknown outcome
    /// after the job has run.
    pub(crate) fn stored(&self) -> Arc<Mutex<Stored>> {
        Arc::clone(&self.stored)
    }

    fn stored_as(&self, done: &Enqueued) {
        let stored = match &done.coalesced {
            Some(Coalesced::MergedInto { op_id, .. }) => Stored {
                op_id: *op_id,
                change: UnknownChange::MergedInto,
            },
            Some(Coalesced::Annihilated { removed }) => Stored {
                op_id: removed.first().map_or(done.op_id, |r| r.op_id),
                change: UnknownChange::Cancels,
            },
            Some(Coalesced::ReplacedUpdates { .. }) | None => Stored {
                op_id: done.op_id,
                change: UnknownChange::New,
            },
        };
        *self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stored;
    }

    /// Stores (or coalesces) it: [`apply`] as a writer job.
    pub(crate) fn apply(&self, conn: &Connection, ctx: &Ctx) -> Result<Enqueued, EnqueueError> {
        let gated = !self.depends_on.is_empty();
        let done = apply(conn, ctx, self)?;
        self.stored_as(&done);
        if gated {
            super::gate::refresh(conn, ctx.now())?;
        }
        Ok(done)
    }
}

/// Validates `ops` as one atomic transaction and gives them its id.
pub(crate) fn prepare_transaction(
    ops: Vec<NewOp>,
    max: usize,
    current_envelope: u32,
) -> Result<(Uuid, Vec<Prepared>), EnqueueError> {
    if ops.is_empty() || ops.len() > MAX_TRANSACTION_OPS {
        return Err(EnqueueError::TransactionSize {
            count: ops.len(),
            max: MAX_TRANSACTION_OPS,
        });
    }
    let txn = crate::op::TxnRef {
        id: Uuid::new_v4(),
        size: u32::try_from(ops.len()).unwrap_or(u32::MAX),
    };
    let text = serde_json::to_string(&txn)?;
    let mut prepared = Vec::with_capacity(ops.len());
    for op in ops {
        let mut p = prepare(op, max, current_envelope)?;
        p.txn = Some(text.clone());
        prepared.push(p);
    }
    Ok((txn.id, prepared))
}

/// Stores a prepared transaction, all of it or (on error, which rolls the
/// writer's job back) none of it. Its ops are never coalesced.
pub(crate) fn apply_transaction(
    conn: &Connection,
    ctx: &Ctx,
    txn_id: Uuid,
    ops: &[Prepared],
) -> Result<EnqueuedTransaction, EnqueueError> {
    let mut out = Vec::with_capacity(ops.len());
    for p in ops {
        let done = apply(conn, ctx, p)?;
        p.stored_as(&done);
        out.push(done);
    }
    super::gate::refresh(conn, ctx.now())?;
    Ok(EnqueuedTransaction { txn_id, ops: out })
}

/// The dependencies still to wait for, as stored text (`None` when none):
/// a dependency no longer in the outbox was acknowledged (or discarded by
/// the app) and is met; one that failed refuses the op.
fn open_dependencies(conn: &Connection, p: &Prepared) -> Result<Option<String>, EnqueueError> {
    let mut open = Vec::new();
    for dep in &p.depends_on {
        let state: Option<String> = super::op_ids::find(conn, *dep, "state", |r| r.get(0))?;
        match state.as_deref().and_then(OpState::parse) {
            None => {}
            Some(OpState::Failed) => {
                return Err(EnqueueError::DependencyFailed { dependency: *dep });
            }
            Some(_) => open.push(*dep),
        }
    }
    Ok(if open.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&open)?)
    })
}

/// The entity's tail: its never-attempted active suffix plus the active op
/// just before it, oldest first (empty if the entity has no active op).
fn tail(conn: &Connection, p: &Prepared, only_last: bool) -> rusqlite::Result<Vec<TailOp>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kind, state, attempts, history, op_id, txn IS NOT NULL OR depends_on IS NOT NULL \
         FROM ops INDEXED BY ops_entity WHERE entity_type = ?1 AND entity_id = ?2 \
         AND state IN ('pending', 'in_flight') ORDER BY seq DESC",
    )?;
    // Ops of a transaction, ops that wait for others, and ops others wait
    // for are never merged, removed or merged into: coalescing must not
    // change what is atomic or what a dependency names.
    let any_gated = super::gate::any_gated(conn)?;
    let mut rows = stmt.query(params![p.entity_type, p.entity_id])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let kind: String = r.get(1)?;
        let state: String = r.get(2)?;
        let attempts: i64 = r.get(3)?;
        // A retried op starts again at zero attempts but may be applied:
        // its history says so (an unreadable history counts as sent).
        let gated: bool = r.get(6)?;
        let never_attempted = attempts == 0
            && OpState::parse(&state) == Some(OpState::Pending)
            && serde_json::from_str::<Vec<HistoryEntry>>(&r.get::<_, String>(4)?)
                .is_ok_and(|h| !sent_before_retry(&h))
            && !gated
            && !(any_gated && super::gate::has_dependents(conn, &r.get::<_, String>(5)?)?);
        out.push(TailOp {
            seq: r.get(0)?,
            kind: OpKind::parse(&kind).unwrap_or(OpKind::Update),
            never_attempted,
        });
        if !never_attempted || only_last {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

struct Inherit {
    base: Option<String>,
    base_version: Option<i64>,
    chained: bool,
    tokens: Vec<String>,
}

/// Stores `p` as a new op; returns its position and id.
#[allow(clippy::too_many_arguments)]
fn insert(
    conn: &Connection,
    ctx: &Ctx,
    p: &Prepared,
    inherit: Option<&Inherit>,
    chained: bool,
    is_head: bool,
    depends_on: Option<&str>,
    now: i64,
) -> Result<(i64, OpId), EnqueueError> {
    let mut tokens: Vec<String> = inherit.map(|i| i.tokens.clone()).unwrap_or_default();
    if let Some(t) = &p.txn_token {
        if !tokens.contains(t) {
            tokens.push(t.clone());
        }
    }
    let (base, base_version, chained) = match inherit {
        Some(i) => (i.base.as_deref(), i.base_version, i.chained),
        None => (p.base.as_deref(), p.base_version, chained),
    };
    let tokens_json = if tokens.is_empty() {
        "[]".to_owned()
    } else {
        serde_json::to_string(&tokens)?
    };
    let (mut id_buf, mut key_buf) = (
        [0u8; uuid::fmt::Hyphenated::LENGTH],
        [0u8; uuid::fmt::Hyphenated::LENGTH],
    );
    // The new position is above every live op and every op ever deleted
    // while newest (`ops_seq_mark.deleted_max`, kept by a trigger): FIFO
    // order holds and no position is reused, without a counter write per
    // insert. Nor is one that a rolled-back commit gave an op (the floor).
    let stored: i64 = conn
        .prepare_cached(
            "SELECT max(coalesce((SELECT max(seq) FROM ops), 0), \
             coalesce((SELECT deleted_max FROM ops_seq_mark WHERE id = 1), 0)) + 1",
        )?
        .query_row([], |r| r.get(0))?;
    let seq = stored.max(ctx.seq_floor.load(std::sync::atomic::Ordering::Acquire));
    ctx.seq_floor
        .fetch_max(seq.saturating_add(1), std::sync::atomic::Ordering::AcqRel);
    let derived = op_ids::derive(ctx.op_id_ns, seq);
    let mut id = derived.unwrap_or(p.op_id);
    let mut op_id = &*id.hyphenated().encode_lower(&mut id_buf);
    // A foreign row already holding the derived id would make it name two
    // ops: the op keeps its random id then, as a foreign row itself.
    let foreign = derived.is_none() || op_ids::taken_by_foreign(conn, op_id)?;
    if foreign && derived.is_some() {
        id = p.op_id;
        op_id = &*id.hyphenated().encode_lower(&mut id_buf);
    }
    let key = &*p.key.hyphenated().encode_lower(&mut key_buf);
    let checksum = schema::op_checksum(&[
        ValueRef::from(op_id),
        ValueRef::from(key),
        ValueRef::from(p.kind.as_str()),
        ValueRef::from(p.entity_type.as_str()),
        ValueRef::from(p.entity_id.as_str()),
        ValueRef::from(p.payload.as_str()),
        base.map_or(ValueRef::Null, ValueRef::from),
        p.txn.as_deref().map_or(ValueRef::Null, ValueRef::from),
        depends_on.map_or(ValueRef::Null, ValueRef::from),
        base_version.map_or(ValueRef::Null, ValueRef::Integer),
        if chained {
            ValueRef::Integer(1)
        } else {
            ValueRef::Null
        },
    ]);
    conn.prepare_cached(
        "INSERT INTO ops (seq, op_id, idempotency_key, kind, entity_type, entity_id, payload, base, \
         base_version, chained, txn_tokens, envelope_version, state, is_head, attempts, \
         next_attempt_at, created_at, updated_at, checksum, txn, depends_on, foreign_id) \
         VALUES (?17, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', ?12, 0, ?13, ?13, ?13, \
         ?14, ?15, ?16, ?18)",
    )?
    .execute(params![
        op_id,
        key,
        p.kind.as_str(),
        p.entity_type,
        p.entity_id,
        p.payload,
        base,
        base_version,
        chained,
        tokens_json,
        p.envelope_version,
        is_head,
        now,
        checksum,
        p.txn,
        depends_on,
        seq,
        foreign,
    ])?;
    upcast::note_version(conn, p.envelope_version)?;
    for t in &tokens {
        outcomes::add(conn, t, now)?;
    }
    Ok((seq, id))
}

/// Removes ops for coalescing; returns what was removed, oldest first, and
/// what the first one carried for a DELETE to inherit.
fn remove(
    conn: &Connection,
    seqs: &[i64],
) -> Result<(Vec<RemovedOp>, Option<Inherit>), EnqueueError> {
    let mut removed = Vec::with_capacity(seqs.len());
    let mut inherit: Option<Inherit> = None;
    for &seq in seqs {
        let Some(op) = rows::by_seq(conn, seq)? else {
            continue;
        };
        rows::delete(conn, seq)?;
        match &mut inherit {
            None => {
                inherit = Some(Inherit {
                    base: op.base.as_ref().map(Value::to_string),
                    base_version: rows::version_to_sql(op.base_version),
                    chained: op.chained,
                    tokens: op.txn_tokens.clone(),
                });
            }
            Some(i) => {
                for t in &op.txn_tokens {
                    if !i.tokens.contains(t) {
                        i.tokens.push(t.clone());
                    }
                }
            }
        }
        removed.push(RemovedOp {
            op_id: op.op_id,
            seq,
            kind: op.kind,
            txn_tokens: op.txn_tokens,
        });
    }
    Ok((removed, inherit))
}

/// Stores (or coalesces) a validated op. Runs in the writer's transaction.
pub(crate) fn apply(conn: &Connection, ctx: &Ctx, p: &Prepared) -> Result<Enqueued, EnqueueError> {
    let now = ctx.now();
    let depends_on = if p.depends_on.is_empty() {
        None
    } else {
        open_dependencies(conn, p)?
    };
    if p.txn.is_some() || depends_on.is_some() {
        // Never coalesced; the gate gives it `is_head` once it may go.
        let has_active = !tail(conn, p, true)?.is_empty();
        let (seq, op_id) = insert(
            conn,
            ctx,
            p,
            None,
            has_active,
            false,
            depends_on.as_deref(),
            now,
        )?;
        return Ok(Enqueued {
            op_id,
            idempotency_key: p.key,
            seq,
            coalesced: None,
        });
    }
    // Without coalescing only the existence of an active op matters.
    let tail = tail(conn, p, !ctx.coalesce)?;
    let has_active = !tail.is_empty();
    match coalesce::decide(&tail, p.kind, ctx.coalesce) {
        Decision::Insert => {
            let (seq, op_id) = insert(conn, ctx, p, None, has_active, !has_active, None, now)?;
            Ok(Enqueued {
                op_id,
                idempotency_key: p.key,
                seq,
                coalesced: None,
            })
        }
        Decision::MergeInto { seq } => {
            let Some(target) = rows::by_seq(conn, seq)? else {
                return Err(EnqueueError::Storage(super::StorageError::Inconsistent(
                    format!("coalescing target {seq} vanished"),
                )));
            };
            let mut tokens = target.txn_tokens.clone();
            if let Some(t) = &p.txn_token {
                if !tokens.contains(t) {
                    tokens.push(t.clone());
                    outcomes::add(conn, t, now)?;
                }
            }
            let (payload, envelope) = if p.kind == OpKind::Delete {
                (target.payload.to_string(), target.envelope_version)
            } else {
                (p.payload.clone(), p.envelope_version)
            };
            upcast::note_version(conn, envelope)?;
            conn.prepare_cached(
                "UPDATE ops SET payload = ?1, envelope_version = ?2, txn_tokens = ?3, \
                 coalesced_count = coalesced_count + 1, updated_at = ?4 WHERE seq = ?5",
            )?
            .execute(params![
                payload,
                envelope,
                serde_json::to_string(&tokens)?,
                now,
                seq
            ])?;
            Ok(Enqueued {
                op_id: target.op_id,
                idempotency_key: target.idempotency_key,
                seq,
                coalesced: Some(Coalesced::MergedInto {
                    op_id: target.op_id,
                    seq,
                }),
            })
        }
        Decision::Annihilate { remove: seqs } => {
            let (removed, _) = remove(conn, &seqs)?;
            for r in &removed {
                for t in &r.txn_tokens {
                    outcomes::succeeded(conn, t, now)?;
                }
            }
            if let Some(t) = &p.txn_token {
                outcomes::succeeded_at_once(conn, t, now)?;
            }
            rows::recompute_head(conn, &p.entity_type, &p.entity_id)?;
            Ok(Enqueued {
                op_id: p.op_id,
                idempotency_key: p.key,
                seq: seqs.first().copied().unwrap_or_default(),
                coalesced: Some(Coalesced::Annihilated { removed }),
            })
        }
        Decision::ReplaceUpdates { remove: seqs } => {
            let (removed, inherit) = remove(conn, &seqs)?;
            for r in &removed {
                for t in &r.txn_tokens {
                    outcomes::drop_one(conn, t)?;
                }
            }
            let (seq, op_id) =
                insert(conn, ctx, p, inherit.as_ref(), has_active, false, None, now)?;
            rows::recompute_head(conn, &p.entity_type, &p.entity_id)?;
            Ok(Enqueued {
                op_id,
                idempotency_key: p.key,
                seq,
                coalesced: Some(Coalesced::ReplacedUpdates { removed }),
            })
        }
    }
}
