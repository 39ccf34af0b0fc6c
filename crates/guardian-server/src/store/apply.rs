//! The rules of one request's mutations inside its write transaction
//! (independent ops, or one atomic transaction), shared by both backends: each backend only says how to read and write
//! rows ([`WriteTx`]); the order of the checks (dependency, replay, entity
//! rule) and what an applied op writes are decided here once.

use guardian_protocol::{Change, MutationKind};
use serde_json::Value;

use super::entities::{self, Decision, Row};
use super::idempotency::StoredResponse as Stored;
use super::transaction::{self, TransactionInput, TransactionOutcome};
use super::{
    Applied, MutationInput, OpOutcome, Precondition, Refusal, StoreError, StoreOptions, Work,
    WorkDone,
};

/// An entity row to write, with its change and its applied-log row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowWrite<'a> {
    /// The idempotency key the applied log records.
    pub(crate) key: &'a str,
    pub(crate) kind: MutationKind,
    pub(crate) entity_type: &'a str,
    pub(crate) id: &'a str,
    pub(crate) row: &'a Row,
    /// The key of the atomic transaction it belongs to, if any.
    pub(crate) transaction: Option<&'a str>,
}

/// The response of an applied mutation, kept under its key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeptResponse<'a> {
    pub(crate) key: &'a str,
    pub(crate) fingerprint: &'a [u8],
    pub(crate) status: u16,
    pub(crate) body: &'a str,
}

/// The reads and writes of a write transaction of one tenant. The SQLite
/// backend's futures are ready at once (it runs on a blocking thread); the
/// PostgreSQL backend's wait on the database.
pub(crate) trait WriteTx {
    /// The unexpired idempotency record of `key`.
    async fn lookup(&mut self, key: &str, not_before_ms: i64)
        -> Result<Option<Stored>, StoreError>;

    /// The entity row, if it ever existed.
    async fn load(&mut self, entity_type: &str, id: &str) -> Result<Option<Row>, StoreError>;

    /// Writes the row, its change at the tenant's next cursor and its
    /// applied-log row; returns the cursor.
    async fn write(&mut self, w: RowWrite<'_>) -> Result<u64, StoreError>;

    /// Stores the response of an applied mutation (replacing an expired
    /// record of the key).
    async fn remember(&mut self, r: KeptResponse<'_>) -> Result<(), StoreError>;

    /// Starts an atomic unit inside the write transaction (a savepoint).
    async fn begin_atomic(&mut self) -> Result<(), StoreError>;

    /// Ends the atomic unit: keeps its writes, or undoes every one of them
    /// (the cursors it handed out included).
    async fn end_atomic(&mut self, keep: bool) -> Result<(), StoreError>;
}

/// Applies one request's work through `tx` at `now` (see [`apply_ops`] and
/// [`apply_transaction`]).
pub(crate) async fn apply_work<T: WriteTx>(
    tx: &mut T,
    opts: &StoreOptions,
    now: i64,
    work: Work,
) -> Result<(WorkDone, Vec<Change>), StoreError> {
    Ok(match work {
        Work::Ops(inputs) => {
            let (results, changes) = apply_ops(tx, opts, now, inputs).await?;
            (WorkDone::Ops(results), changes)
        }
        Work::Transaction(txn) => {
            let (outcome, changes) = apply_transaction(tx, opts, now, txn).await?;
            (WorkDone::Transaction(outcome), changes)
        }
    })
}

/// Applies `inputs` in order through `tx` at `now`: one outcome each, and
/// the changes written (to broadcast after the commit). A replay or refusal
/// writes nothing; an applied op writes its entity, change, applied-log row
/// and idempotency record.
pub(crate) async fn apply_ops<T: WriteTx>(
    tx: &mut T,
    opts: &StoreOptions,
    now: i64,
    inputs: Vec<MutationInput>,
) -> Result<(Vec<OpOutcome>, Vec<Change>), StoreError> {
    let mut changes = Vec::new();
    let results = apply_seq(tx, opts, now, inputs, None, &mut changes).await?;
    Ok((results, changes))
}

/// Applies an atomic transaction through `tx` at `now`: a replay or a
/// mismatch if its key is known; else its ops in order inside one atomic
/// unit, stopping at the first refused op and undoing the unit then, or
/// keeping it and storing the whole response under the transaction's key.
/// Returns the outcome and the changes written (to broadcast after the
/// commit): none of the transaction's own when it aborted.
///
/// A concurrent write the hooks ask for (forced conflicts) is made before
/// the unit starts, on the entity as the transaction finds it, so it stays
/// when the transaction aborts: another writer commits before or after an
/// atomic transaction, never inside it.
pub(crate) async fn apply_transaction<T: WriteTx>(
    tx: &mut T,
    opts: &StoreOptions,
    now: i64,
    txn: TransactionInput,
) -> Result<(TransactionOutcome, Vec<Change>), StoreError> {
    let not_before = now.saturating_sub(opts.idempotency_retention_ms);
    let mut changes = Vec::new();
    if let Some(stored) = tx.lookup(&txn.key, not_before).await? {
        let outcome = if stored.fingerprint == txn.fingerprint {
            TransactionOutcome::Replayed {
                body: transaction::replay(&stored.body)?,
            }
        } else {
            TransactionOutcome::Mismatch(Refusal::KeyReused { key: txn.key })
        };
        return Ok((outcome, changes));
    }
    for input in &txn.ops {
        if input.is_conditional()
            && opts.hooks.concurrent_write(input)
            && tx.lookup(&input.key, not_before).await?.is_none()
        {
            let current = tx.load(&input.entity_type, &input.id).await?;
            if let Some(cur) = current.filter(|r| !r.deleted) {
                concurrent_write(tx, opts, now, input, &cur, &mut changes).await?;
            }
        }
    }
    let before = changes.len();
    tx.begin_atomic().await?;
    let results = apply_seq(tx, opts, now, txn.ops, Some(&txn.key), &mut changes).await?;
    if let Some(failed_op) = results.iter().position(Result::is_err) {
        tx.end_atomic(false).await?;
        changes.truncate(before);
        let Some(Err(refusal)) = results.into_iter().nth(failed_op) else {
            return Err(StoreError::Task("lost a refusal".into()));
        };
        // A refusal that shows the entity showed it as the transaction had
        // left it, which never committed: show it as it is now (none if
        // the transaction itself created it).
        let shown = refusal
            .current()
            .map(|e| (e.entity_type.clone(), e.id.clone()));
        let refusal = match shown {
            Some((t, id)) => match tx.load(&t, &id).await? {
                Some(row) => refusal.with_current(row.to_entity(&t, &id)?),
                None => refusal.without_current(),
            },
            None => refusal,
        };
        return Ok((TransactionOutcome::Aborted { failed_op, refusal }, changes));
    }
    let results: Vec<Applied> = results.into_iter().filter_map(Result::ok).collect();
    let body = transaction::committed_json(&results);
    tx.remember(KeptResponse {
        key: &txn.key,
        fingerprint: &txn.fingerprint,
        status: 200,
        body: &body,
    })
    .await?;
    tx.end_atomic(true).await?;
    Ok((TransactionOutcome::Committed { results, body }, changes))
}

/// Another writer updates the live entity `cur` (same data, version + 1),
/// so a conditional op on it conflicts for real; returns the bumped row.
async fn concurrent_write<T: WriteTx>(
    tx: &mut T,
    opts: &StoreOptions,
    now: i64,
    input: &MutationInput,
    cur: &Row,
    changes: &mut Vec<Change>,
) -> Result<Row, StoreError> {
    let bumped = Row {
        version: cur.version + 1,
        deleted: false,
        updated_at_ms: now,
        data: cur.data.clone(),
    };
    let data = parse_data(&bumped.data)?;
    let key = opts.hooks.concurrent_write_key();
    let cursor = tx
        .write(RowWrite {
            key: &key,
            kind: MutationKind::Update,
            entity_type: &input.entity_type,
            id: &input.id,
            row: &bumped,
            transaction: None,
        })
        .await?;
    changes.push(Change {
        cursor,
        op: MutationKind::Update,
        entity_type: input.entity_type.clone(),
        id: input.id.clone(),
        version: bumped.version,
        data,
    });
    Ok(bumped)
}

/// Applies `inputs` in order, appending the changes written to `changes`.
/// Independent ops (`transaction` is `None`) each get an outcome and may
/// meet a concurrent writer; the ops of a transaction stop at the first
/// refusal (the last outcome then) and meet none (see [`apply_transaction`]).
async fn apply_seq<T: WriteTx>(
    tx: &mut T,
    opts: &StoreOptions,
    now: i64,
    inputs: Vec<MutationInput>,
    transaction: Option<&str>,
    changes: &mut Vec<Change>,
) -> Result<Vec<OpOutcome>, StoreError> {
    let not_before = now.saturating_sub(opts.idempotency_retention_ms);
    let updated_at = crate::clock::format_rfc3339(now);
    let mut results: Vec<OpOutcome> = Vec::with_capacity(inputs.len());
    for mut input in inputs {
        if transaction.is_some() && results.last().is_some_and(Result::is_err) {
            break;
        }
        // Drawn before the dependency is known, so a forced conflict can
        // be spent on an op that then fails its dependency.
        let concurrent =
            transaction.is_none() && input.is_conditional() && opts.hooks.concurrent_write(&input);
        if let Some(dep) = &input.dependency {
            // Resolved from the earlier op's result in this request: it was
            // applied, replayed or refused just now, in this transaction.
            let earlier = results.get(dep.on).and_then(|r| r.as_ref().ok());
            match dep.resolve(earlier, input.if_match) {
                Ok(precondition) => input.if_match = precondition,
                Err(failed) => {
                    // Not applied and nothing stored: the key stays new.
                    results.push(Err(failed));
                    continue;
                }
            }
        }
        if let Some(stored) = tx.lookup(&input.key, not_before).await? {
            results.push(if stored.fingerprint == input.fingerprint {
                Ok(Applied::replay(stored)?)
            } else {
                Err(Refusal::KeyReused { key: input.key })
            });
            continue;
        }
        let mut current = tx.load(&input.entity_type, &input.id).await?;
        if concurrent {
            if let Some(cur) = current.as_ref().filter(|r| !r.deleted) {
                current = Some(concurrent_write(tx, opts, now, &input, cur, changes).await?);
            }
        }
        let (version, deleted, status) =
            match entities::decide(current.as_ref(), &input, opts.require_if_match) {
                Decision::Refuse(refusal) => {
                    let refusal = match &current {
                        Some(row) if refusal.shows_current() => {
                            refusal.with_current(row.to_entity(&input.entity_type, &input.id)?)
                        }
                        _ => refusal,
                    };
                    results.push(Err(refusal));
                    continue;
                }
                Decision::Apply {
                    version,
                    deleted,
                    status,
                } => (version, deleted, status),
            };
        let MutationInput {
            key,
            fingerprint,
            kind,
            entity_type,
            id,
            data,
            data_json,
            ..
        } = input;
        let (data, data_json) = if deleted {
            (Value::Null, "null".to_owned())
        } else {
            (data, data_json)
        };
        let row = Row {
            version,
            deleted,
            updated_at_ms: now,
            data: data_json,
        };
        let cursor = tx
            .write(RowWrite {
                key: &key,
                kind,
                entity_type: &entity_type,
                id: &id,
                row: &row,
                transaction,
            })
            .await?;
        let body = if status == 204 {
            "null".to_owned()
        } else {
            entities::entity_json(&entity_type, &id, version, &row.data, &updated_at, deleted)
        };
        tx.remember(KeptResponse {
            key: &key,
            fingerprint: &fingerprint,
            status,
            body: &body,
        })
        .await?;
        changes.push(Change {
            cursor,
            op: kind,
            entity_type,
            id,
            version,
            data,
        });
        results.push(Ok(Applied {
            status,
            body,
            replayed: false,
            version: Some(version),
        }));
    }
    Ok(results)
}

fn parse_data(data: &str) -> Result<Value, StoreError> {
    serde_json::from_str(data)
        .map_err(|e| StoreError::Corrupt(format!("entity data is not JSON: {e}")))
}

impl MutationInput {
    /// Whether the op is a conditional update or delete: an `If-Match`
    /// version, or chained on an earlier op (unless that one turns out to be
    /// a delete, when there is no live entity to compare).
    pub(crate) fn is_conditional(&self) -> bool {
        self.kind != MutationKind::Create
            && (matches!(self.if_match, Some(Precondition::Version(_)))
                || self.dependency.is_some_and(|d| d.chained))
    }
}
