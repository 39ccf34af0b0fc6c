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

use guardian_protocol::{Entity, MutationKind};
use rusqlite::{params, OptionalExtension, Statement};

use crate::clock::format_rfc3339;

use super::idempotency::json_string;
use super::{from_i64, to_i64, MutationInput, Precondition, Refusal, StoreError};

/// A stored entity row; `data` stays JSON text until someone needs the value
/// (most mutations only need the version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) version: u64,
    pub(crate) deleted: bool,
    pub(crate) updated_at_ms: i64,
    /// The data as stored: JSON text (`null` for a tombstone).
    pub(crate) data: String,
}

impl Row {
    /// The row as a protocol entity.
    pub(crate) fn to_entity(&self, entity_type: &str, id: &str) -> Result<Entity, StoreError> {
        Ok(Entity {
            entity_type: entity_type.to_owned(),
            id: id.to_owned(),
            version: self.version,
            data: serde_json::from_str(&self.data)
                .map_err(|e| StoreError::Corrupt(format!("entity data is not JSON: {e}")))?,
            updated_at: format_rfc3339(self.updated_at_ms),
            deleted: self.deleted,
        })
    }
}

/// What a mutation does to an entity.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Write the entity at `version` (a tombstone when `deleted`, else with
    /// the op's data) and answer `status` with it (or 204 with no body).
    Apply {
        version: u64,
        deleted: bool,
        status: u16,
    },
    /// Refuse; nothing is written. The store attaches the current entity
    /// to the refusals that show it ([`Refusal::with_current`]).
    Refuse(Refusal),
}

/// Applies the entity rules to the current row (`None` when absent).
pub(crate) fn decide(
    current: Option<&Row>,
    input: &MutationInput,
    require_if_match: bool,
) -> Decision {
    let what = || format!("{}/{}", input.entity_type, input.id);
    if require_if_match && input.kind != MutationKind::Create && input.if_match.is_none() {
        return Decision::Refuse(Refusal::PreconditionRequired);
    }
    let apply = |version: u64, deleted: bool, status: u16| Decision::Apply {
        version,
        deleted,
        status,
    };
    match (input.kind, current) {
        (MutationKind::Create, None) => apply(1, false, 201),
        (MutationKind::Create, Some(cur)) if cur.deleted => apply(cur.version + 1, false, 201),
        (MutationKind::Create, Some(_)) => Decision::Refuse(Refusal::Exists {
            entity: what(),
            current: None,
        }),
        (MutationKind::Update | MutationKind::Delete, None) => {
            Decision::Refuse(Refusal::NotFound { entity: what() })
        }
        (MutationKind::Update | MutationKind::Delete, Some(cur)) if cur.deleted => {
            Decision::Refuse(Refusal::Gone {
                entity: what(),
                current: None,
            })
        }
        (kind, Some(cur)) => {
            if let Some(Precondition::Version(v)) = input.if_match {
                if v != cur.version {
                    return Decision::Refuse(Refusal::VersionConflict {
                        expected: v,
                        version: cur.version,
                        entity: what(),
                        current: None,
                    });
                }
            }
            if kind == MutationKind::Delete {
                apply(cur.version + 1, true, 204)
            } else {
                apply(cur.version + 1, false, 200)
            }
        }
    }
}

/// The JSON text of an entity exactly as `serde_json::to_value(&entity)`
/// prints it (object keys sorted, no whitespace), built from parts that
/// are already JSON text: `data_json` and the RFC 3339 `updated_at`.
pub(crate) fn entity_json(
    entity_type: &str,
    id: &str,
    version: u64,
    data_json: &str,
    updated_at: &str,
    deleted: bool,
) -> String {
    let mut out = String::with_capacity(data_json.len() + entity_type.len() + id.len() + 96);
    out.push_str("{\"data\":");
    out.push_str(data_json);
    out.push_str(if deleted {
        ",\"deleted\":true,\"id\":"
    } else {
        ",\"deleted\":false,\"id\":"
    });
    out.push_str(&json_string(id));
    out.push_str(",\"type\":");
    out.push_str(&json_string(entity_type));
    out.push_str(",\"updated_at\":");
    out.push_str(&json_string(updated_at));
    out.push_str(",\"version\":");
    out.push_str(&version.to_string());
    out.push('}');
    out
}

/// SQL of [`load`].
pub(crate) const LOAD_SQL: &str = "SELECT version, data, updated_at, deleted FROM entities
             WHERE tenant = ?1 AND entity_type = ?2 AND id = ?3";

/// Loads an entity row (`stmt`: [`LOAD_SQL`]).
pub(crate) fn load(
    stmt: &mut Statement<'_>,
    tenant: &str,
    entity_type: &str,
    id: &str,
) -> Result<Option<Row>, StoreError> {
    Ok(stmt
        .query_row(params![tenant, entity_type, id], |r| {
            Ok(Row {
                version: from_i64(r.get::<_, i64>(0)?),
                data: r.get(1)?,
                updated_at_ms: r.get(2)?,
                deleted: r.get(3)?,
            })
        })
        .optional()?)
}

/// Loads an entity as a protocol entity (tombstones included).
pub(crate) fn load_entity(
    conn: &rusqlite::Connection,
    tenant: &str,
    entity_type: &str,
    id: &str,
) -> Result<Option<Entity>, StoreError> {
    let mut stmt = conn.prepare_cached(LOAD_SQL)?;
    load(&mut stmt, tenant, entity_type, id)?
        .map(|row| row.to_entity(entity_type, id))
        .transpose()
}

/// SQL of [`save`].
pub(crate) const SAVE_SQL: &str =
    "INSERT INTO entities (tenant, entity_type, id, version, data, updated_at, deleted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (tenant, entity_type, id) DO UPDATE SET
           version = excluded.version, data = excluded.data,
           updated_at = excluded.updated_at, deleted = excluded.deleted";

/// Writes an entity row, insert or replace (`stmt`: [`SAVE_SQL`]).
pub(crate) fn save(
    stmt: &mut Statement<'_>,
    tenant: &str,
    entity_type: &str,
    id: &str,
    row: &Row,
) -> Result<(), StoreError> {
    stmt.execute(params![
        tenant,
        entity_type,
        id,
        to_i64(row.version),
        row.data,
        row.updated_at_ms,
        row.deleted
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn input(kind: MutationKind, if_match: Option<Precondition>) -> MutationInput {
        let data = if kind == MutationKind::Delete {
            Value::Null
        } else {
            json!({"a": 1})
        };
        MutationInput {
            key: "k".into(),
            fingerprint: [0; 32],
            kind,
            entity_type: "device".into(),
            id: "d1".into(),
            data_json: data.to_string(),
            data,
            if_match,
            dependency: None,
        }
    }

    fn entity(version: u64, deleted: bool) -> Option<Row> {
        Some(Row {
            version,
            deleted,
            updated_at_ms: 0,
            data: if deleted { "null" } else { r#"{"a":0}"# }.to_owned(),
        })
    }

    fn status(d: &Decision) -> (u16, u64) {
        match d {
            Decision::Apply {
                version, status, ..
            } => (*status, *version),
            Decision::Refuse(r) => (
                match r {
                    Refusal::PreconditionRequired => 428,
                    Refusal::Exists { .. } | Refusal::VersionConflict { .. } => 409,
                    Refusal::NotFound { .. } => 404,
                    Refusal::Gone { .. } => 410,
                    _ => 0,
                },
                0,
            ),
        }
    }

    #[test]
    fn rules() {
        use MutationKind::{Create, Delete, Update};
        use Precondition::{Any, Version};
        type Case = (Option<Row>, MutationInput, bool, (u16, u64));
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
            let got = status(&decide(cur.as_ref(), &inp, require));
            assert_eq!(
                got, want,
                "{:?} {:?} require={require}",
                inp.kind, inp.if_match
            );
        }
    }

    #[test]
    fn conflicts_name_both_versions() {
        let d = decide(
            entity(2, false).as_ref(),
            &input(MutationKind::Update, Some(Precondition::Version(1))),
            false,
        );
        let Decision::Refuse(r) = d else {
            panic!("expected a refusal")
        };
        assert_eq!(
            r.to_string(),
            "If-Match 1 does not match the current version 2 of device/d1"
        );
    }

    #[test]
    fn entity_json_is_what_serde_json_prints() {
        for (data, deleted) in [
            (
                json!({"b": [1, 2.5], "a": {"z": "\u{e9}\"", "c": null}}),
                false,
            ),
            (Value::Null, true),
        ] {
            let e = Entity {
                entity_type: "device_2".into(),
                id: "A.b-c_9".into(),
                version: u64::from(u32::MAX) + 7,
                data: data.clone(),
                updated_at: format_rfc3339(1_700_000_000_123),
                deleted,
            };
            let want = serde_json::to_value(&e).map(|v| v.to_string()).unwrap();
            let got = entity_json(
                &e.entity_type,
                &e.id,
                e.version,
                &super::super::idempotency::canonical(&data),
                &e.updated_at,
                deleted,
            );
            assert_eq!(got, want);
        }
    }
}
