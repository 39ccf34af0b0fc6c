//! Upcasters: app-registered migrations of queued payloads from an older
//! envelope version to the next, run at open so an app upgrade never strands
//! or drops queued ops.
//!
//! Finding the ops to migrate costs nothing per insert and no scan in the
//! common case: the `op_envelopes` table lists every envelope version a
//! pending or in-flight op may carry (each write that gives an active op a
//! version lists it; listing an already listed version writes nothing). At
//! open, only if a listed version is older than the app's are the ops
//! scanned (once, by the open that upgrades the app); failed ops, which keep
//! their old version, are found through the small partial `ops_state`
//! index. An op whose migration fails (or has no upcaster) moves to `failed`
//! with the error: kept, visible, never dropped. The migration is retried at
//! every open, so registering a fixed upcaster repairs the payload (the op
//! then waits for `retry_failed`).

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{params, Connection};
use serde_json::Value;

use super::{outcomes, rows};
use crate::op::{HistoryEntry, OpState, PendingOp};

/// Migrates one payload of `entity_type` from version `v` to `v + 1`.
pub type UpcastFn = Arc<dyn Fn(&str, Value) -> Result<Value, String> + Send + Sync>;

/// The app's upcasters, one per from-version.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_from: BTreeMap<u32, UpcastFn>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcasters")
            .field("from_versions", &self.by_from.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the migration from version `from` to `from + 1`.
    #[must_use]
    pub fn register(
        mut self,
        from: u32,
        f: impl Fn(&str, Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.by_from.insert(from, Arc::new(f));
        self
    }

    /// Migrates `value` from version `from` up to `to`, step by step.
    pub fn upcast(
        &self,
        entity_type: &str,
        from: u32,
        to: u32,
        value: Value,
    ) -> Result<Value, String> {
        let mut value = value;
        for v in from..to {
            let f = self
                .by_from
                .get(&v)
                .ok_or_else(|| format!("no upcaster registered from envelope version {v}"))?;
            value = f(entity_type, value)
                .map_err(|e| format!("upcast from envelope version {v} failed: {e}"))?;
        }
        Ok(value)
    }
}

/// Counts of one upcasting pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpcastCounts {
    pub(crate) migrated: u64,
    pub(crate) failed: u64,
}

fn migrate_op(up: &Upcasters, op: &PendingOp, to: u32) -> Result<(Value, Option<Value>), String> {
    let payload = if op.payload.is_null() {
        Value::Null
    } else {
        up.upcast(&op.entity_type, op.envelope_version, to, op.payload.clone())?
    };
    let base = op
        .base
        .clone()
        .map(|b| up.upcast(&op.entity_type, op.envelope_version, to, b))
        .transpose()?;
    Ok((payload, base))
}

/// Lists `version` as one an active op may carry. Call it in the same
/// transaction as any write that gives a pending or in-flight op an envelope
/// version (insert, merge, retry of a failed op). Writes nothing when the
/// version is already listed (the common case: one index probe).
pub(crate) fn note_version(conn: &Connection, version: u32) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO op_envelopes (version) VALUES (?1)")?
        .execute([version])?;
    Ok(())
}

/// The positions of the ops to migrate to `current`, oldest first: a scan
/// of `ops` only if an active op may carry an older version, else the
/// failed ops (through the partial `ops_state` index) still on one.
fn candidates(conn: &Connection, current: u32) -> rusqlite::Result<Vec<i64>> {
    let old_listed = conn
        .prepare_cached("SELECT 1 FROM op_envelopes WHERE version < ?1 LIMIT 1")?
        .exists([current])?;
    let sql = if old_listed {
        "SELECT seq FROM ops WHERE envelope_version < ?1 ORDER BY seq"
    } else {
        "SELECT seq FROM ops INDEXED BY ops_state WHERE state <> 'pending' AND state = 'failed' \
         AND envelope_version < ?1 ORDER BY seq"
    };
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([current], |r| r.get(0))?;
    rows.collect()
}

/// Migrates every op with `envelope_version < current`; afterwards only
/// `current` (and any newer version) stays listed in `op_envelopes`.
pub(crate) fn run(
    conn: &Connection,
    up: &Upcasters,
    current: u32,
    now: i64,
) -> rusqlite::Result<UpcastCounts> {
    let mut counts = UpcastCounts::default();
    let seqs = candidates(conn, current)?;
    for seq in seqs {
        let Some(op) = rows::by_seq(conn, seq)? else {
            continue;
        };
        match migrate_op(up, &op, current) {
            Ok((payload, base)) => {
                let mut history = op.history.clone();
                history.push(HistoryEntry {
                    at: now,
                    event: "upcast".into(),
                    detail: format!("envelope v{} -> v{current}", op.envelope_version),
                    old_idempotency_key: None,
                    app_payload: None,
                });
                conn.execute(
                    "UPDATE ops SET payload = ?1, base = ?2, envelope_version = ?3, history = ?4, \
                     updated_at = ?5 WHERE seq = ?6",
                    params![
                        payload.to_string(),
                        base.map(|b| b.to_string()),
                        current,
                        serde_json::to_string(&history).unwrap_or_else(|_| "[]".into()),
                        now,
                        seq
                    ],
                )?;
                counts.migrated += 1;
            }
            Err(error) => {
                tracing::warn!(op_id = %op.op_id, %error, "queued op could not be upcast; moved to failed");
                conn.execute(
                    "UPDATE ops SET state = 'failed', last_error = ?1, updated_at = ?2 WHERE seq = ?3",
                    params![error, now, seq],
                )?;
                if op.state != OpState::Failed {
                    for t in &op.txn_tokens {
                        outcomes::failed(conn, t, &error, now)?;
                    }
                    rows::recompute_head(conn, &op.entity_type, &op.entity_id)?;
                }
                counts.failed += 1;
            }
        }
    }
    // Every active op is on `current` (or newer) now; failed ones that kept
    // an older version are found through `ops_state` at the next open.
    conn.prepare_cached("DELETE FROM op_envelopes WHERE version < ?1")?
        .execute([current])?;
    note_version(conn, current)?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chains_versions_and_reports_gaps() {
        let up = Upcasters::new()
            .register(1, |_, mut v| {
                v["v2"] = json!(true);
                Ok(v)
            })
            .register(2, |t, mut v| {
                v["type"] = json!(t);
                Ok(v)
            });
        let out = up.upcast("device", 1, 3, json!({})).unwrap();
        assert_eq!(out, json!({"v2": true, "type": "device"}));
        assert_eq!(up.upcast("device", 3, 3, json!(1)).unwrap(), json!(1));
        let err = up.upcast("device", 0, 2, json!({})).unwrap_err();
        assert!(err.contains("no upcaster"), "{err}");
    }
}
