//! The applied-mutations log: one row per mutation that took effect.
//!
//! Tests read it through [`crate::RunningServer::applied_log`] to prove that
//! no idempotency key took effect twice and that the ops of one entity took
//! effect in order. A replay never appends to it. Mutations made by the
//! forced-conflict fault (the "concurrent writer") are logged with keys that
//! start with `fault:`. The ops of an atomic transaction carry its key
//! (`transaction_key`), so a reader can check that none was half-applied.

use guardian_protocol::MutationKind;

use serde::{Deserialize, Serialize};

use super::{feed::parse_op, from_i64, StoreError};

/// One mutation that took effect on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedMutation {
    /// Global order of application (1, 2, …).
    pub seq: u64,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The idempotency key it was applied under.
    pub idempotency_key: String,
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// What it did.
    pub op: MutationKind,
    /// Entity version after it.
    pub version: u64,
    /// Its change-feed cursor in the tenant's feed.
    pub cursor: u64,
    /// When it was applied, Unix milliseconds (server clock).
    pub at_millis: i64,
    /// The key of the atomic transaction it was applied in, if any: the ops
    /// a committed transaction applied all have a row with its key, at
    /// consecutive cursors; an aborted one has none. (An op of it replayed
    /// from an earlier request keeps that request's row.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_key: Option<String>,
}

/// SQL of the applied-log row an applied mutation appends.
pub(crate) const APPEND_SQL: &str = "INSERT INTO applied
         (tenant, idempotency_key, entity_type, id, op, version, cursor, at, transaction_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

pub(crate) fn read_all(conn: &rusqlite::Connection) -> Result<Vec<AppliedMutation>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, tenant, idempotency_key, entity_type, id, op, version, cursor, at,
                transaction_key
         FROM applied ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, i64>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, Option<String>>(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, tenant, idempotency_key, entity_type, id, op, version, cursor, at, txn) = row?;
        out.push(AppliedMutation {
            seq: from_i64(seq),
            tenant,
            idempotency_key,
            entity_type,
            id,
            op: parse_op(&op)?,
            version: from_i64(version),
            cursor: from_i64(cursor),
            at_millis: at,
            transaction_key: txn,
        });
    }
    Ok(out)
}
