//! The rules of one request's mutations inside its write transaction,
//! shared by both backends: each backend only says how to read and write
//! rows ([`WriteTx`]); the order of the checks (dependency, replay, entity
//! rule) and what an applied op writes are decided here once.

use guardian_protocol::{Change, MutationKind};
use serde_json::Value;

use super::entities::{self, Decision, Row};
use super::idempotency::StoredResponse as Stored;
use super::{Applied, MutationInput, OpOutcome, Precondition, Refusal, StoreError, StoreOptions};

/// An entity row to write, with its change and its applied-log row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowWrite<'a> {
    /// The idempotency key the applied log records.
    pub(crate) key: &'a str,
    pub(crate) kind: MutationKind,
    pub(crate) entity_type: &'a str,
    pub(crate) id: &'a str,
    pub(crate) row: &'a Row,
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
    let not_before = now.saturating_sub(opts.idempotency_retention_ms);
    let updated_at = crate::clock::format_rfc3339(now);
    let mut results: Vec<OpOutcome> = Vec::with_capacity(inputs.len());
    let mut changes = Vec::new();
    for mut input in inputs {
        // Drawn before the dependency is known, so a forced conflict can
        // be spent on an op that then fails its dependency.
        let concurrent = input.is_conditional() && opts.hooks.concurrent_write(&input);
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
                // Another writer updates the live entity (same data,
                // version + 1), so a conditional op conflicts for real.
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
                current = Some(bumped);
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
    Ok((results, changes))
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
