//! Entity rows and the rules of create, update and delete.
//!
//! [`decide`] is the whole rule set as a pure function of the current row and
//! the request; the store only loads, decides and writes.
//!
//! Decisions the protocol leaves open, fixed here:
//! - create on a tombstone re-creates the entity: 201, version continues
//!   (tombstone version + 1), the change op is `create`;
//! - update of a tombstone is 410 `gone` with the tombstone as `current`;
//! - delete of a tombstone is 410, of an absent id 404;
//! - `If-Match: *` matches any live entity;
//! - with `require_if_match`, update and delete without `If-Match` get 428
//!   before the entity is even looked at.

use guardian_protocol::{problem_type, Entity, MutationKind};
use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use crate::clock::format_rfc3339;
use crate::problem::ApiError;

use super::{from_i64, to_i64, MutationInput, Precondition, StoreError};

/// What a mutation does to an entity.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Write `entity` and answer `status` with it (or 204 with no body).
    Apply {
        entity: Entity,
        updated_at_ms: i64,
        status: u16,
    },
    /// Refuse with a problem; nothing is written.
    Refuse(ApiError),
}

/// Applies the entity rules to the current row (`None` when absent).
pub(crate) fn decide(
    current: Option<(Entity, i64)>,
    input: &MutationInput,
    require_if_match: bool,
    now_ms: i64,
) -> Decision {
    let apply = |version: u64, data: Value, deleted: bool, status: u16| Decision::Apply {
        entity: Entity {
            entity_type: input.entity_type.clone(),
            id: input.id.clone(),
            version,
            data,
            updated_at: format_rfc3339(now_ms),
            deleted,
        },
        updated_at_ms: now_ms,
        status,
    };
    let what = || format!("{}/{}", input.entity_type, input.id);
    if require_if_match && input.kind != MutationKind::Create && input.if_match.is_none() {
        return Decision::Refuse(ApiError::new(
            problem_type::PRECONDITION_REQUIRED,
            428,
            "Precondition required",
            "this server requires If-Match on updates and deletes",
        ));
    }
    match (input.kind, current) {
        (MutationKind::Create, None) => apply(1, input.data.clone(), false, 201),
        (MutationKind::Create, Some((cur, _))) if cur.deleted => {
            apply(cur.version + 1, input.data.clone(), false, 201)
        }
        (MutationKind::Create, Some((cur, _))) => Decision::Refuse(
            ApiError::new(
                problem_type::CONFLICT_EXISTS,
                409,
                "Entity exists",
                format!("{} already exists", what()),
            )
            .with_current(cur),
        ),
        (MutationKind::Update | MutationKind::Delete, None) => {
            Decision::Refuse(ApiError::not_found(format!("{} does not exist", what())))
        }
        (MutationKind::Update | MutationKind::Delete, Some((cur, _))) if cur.deleted => {
            Decision::Refuse(ApiError::gone(format!("{} was deleted", what())).with_current(cur))
        }
        (kind, Some((cur, _))) => {
            if let Some(Precondition::Version(v)) = input.if_match {
                if v != cur.version {
                    return Decision::Refuse(
                        ApiError::new(
                            problem_type::CONFLICT_VERSION,
                            409,
                            "Version conflict",
                            format!(
                                "If-Match {v} does not match the current version {} of {}",
                                cur.version,
                                what()
                            ),
                        )
                        .with_current(cur),
                    );
                }
            }
            if kind == MutationKind::Delete {
                apply(cur.version + 1, Value::Null, true, 204)
            } else {
                apply(cur.version + 1, input.data.clone(), false, 200)
            }
        }
    }
}

/// Loads an entity row with its `updated_at` in milliseconds.
pub(crate) fn load(
    tx: &rusqlite::Connection,
    tenant: &str,
    entity_type: &str,
    id: &str,
) -> Result<Option<(Entity, i64)>, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT version, data, updated_at, deleted FROM entities
             WHERE tenant = ?1 AND entity_type = ?2 AND id = ?3",
        )?
        .query_row(params![tenant, entity_type, id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .optional()?;
    let Some((version, data, updated_at, deleted)) = row else {
        return Ok(None);
    };
    let data = serde_json::from_str(&data)
        .map_err(|e| StoreError::Corrupt(format!("entity data is not JSON: {e}")))?;
    Ok(Some((
        Entity {
            entity_type: entity_type.to_owned(),
            id: id.to_owned(),
            version: from_i64(version),
            data,
            updated_at: format_rfc3339(updated_at),
            deleted,
        },
        updated_at,
    )))
}

/// Writes an entity row (insert or replace).
pub(crate) fn save(
    tx: &Transaction<'_>,
    tenant: &str,
    entity: &Entity,
    updated_at_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO entities (tenant, entity_type, id, version, data, updated_at, deleted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (tenant, entity_type, id) DO UPDATE SET
           version = excluded.version, data = excluded.data,
           updated_at = excluded.updated_at, deleted = excluded.deleted",
    )?
    .execute(params![
        tenant,
        entity.entity_type,
        entity.id,
        to_i64(entity.version),
        entity.data.to_string(),
        updated_at_ms,
        entity.deleted
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(kind: MutationKind, if_match: Option<Precondition>) -> MutationInput {
        MutationInput {
            key: "k".into(),
            fingerprint: [0; 32],
            kind,
            entity_type: "device".into(),
            id: "d1".into(),
            data: if kind == MutationKind::Delete {
                Value::Null
            } else {
                json!({"a": 1})
            },
            if_match,
            force_conflict: false,
        }
    }

    fn entity(version: u64, deleted: bool) -> Option<(Entity, i64)> {
        Some((
            Entity {
                entity_type: "device".into(),
                id: "d1".into(),
                version,
                data: if deleted {
                    Value::Null
                } else {
                    json!({"a": 0})
                },
                updated_at: format_rfc3339(0),
                deleted,
            },
            0,
        ))
    }

    fn status(d: &Decision) -> (u16, u64) {
        match d {
            Decision::Apply { entity, status, .. } => (*status, entity.version),
            Decision::Refuse(e) => (e.status(), 0),
        }
    }

    #[test]
    fn rules() {
        use MutationKind::{Create, Delete, Update};
        use Precondition::{Any, Version};
        type Case = (Option<(Entity, i64)>, MutationInput, bool, (u16, u64));
        let cases: Vec<Case> = vec![
            (None, input(Create, None), false, (201, 1)),
            (entity(3, true), input(Create, None), false, (201, 4)),
            (entity(3, false), input(Create, None), false, (409, 0)),
            (None, input(Update, None), false, (404, 0)),
            (entity(2, true), input(Update, None), false, (410, 0)),
            (entity(2, false), input(Update, None), false, (200, 3)),
            (entity(2, false), input(Update, None), true, (428, 0)),
            (
                entity(2, false),
                input(Update, Some(Version(2))),
                true,
                (200, 3),
            ),
            (
                entity(2, false),
                input(Update, Some(Version(1))),
                false,
                (409, 0),
            ),
            (entity(2, false), input(Update, Some(Any)), false, (200, 3)),
            (None, input(Delete, None), false, (404, 0)),
            (entity(2, true), input(Delete, None), false, (410, 0)),
            (
                entity(2, false),
                input(Delete, Some(Version(2))),
                false,
                (204, 3),
            ),
            (
                entity(2, false),
                input(Delete, Some(Version(5))),
                false,
                (409, 0),
            ),
            (entity(2, false), input(Delete, None), true, (428, 0)),
        ];
        for (cur, inp, require, want) in cases {
            let got = status(&decide(cur, &inp, require, 0));
            assert_eq!(
                got, want,
                "{:?} {:?} require={require}",
                inp.kind, inp.if_match
            );
        }
    }

    #[test]
    fn conflicts_carry_current() {
        let d = decide(
            entity(2, false),
            &input(MutationKind::Update, Some(Precondition::Version(1))),
            false,
            0,
        );
        let Decision::Refuse(e) = d else {
            panic!("expected a refusal")
        };
        assert_eq!(e.problem.problem_type, problem_type::CONFLICT_VERSION);
        assert_eq!(e.problem.current.map(|c| c.version), Some(2));
    }
}
