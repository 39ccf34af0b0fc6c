//! On-disk schema: a file written by an older version migrates in place, the
//! envelope-version bookkeeping of schema 2 finds every op to upcast, and
//! schema 3's positions (no AUTOINCREMENT) are still never reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use guardian_sync::clock::ManualClock;
use guardian_sync::op::{Ack, NewOp, OpState};
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions, Synchronous, Upcasters};
use rusqlite::{params, Connection};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

/// The schema of version 1 exactly as that version created it (frozen here:
/// a file on a user's disk does not change when the code does).
const V1: &str = r"
CREATE TABLE ops (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id            TEXT    NOT NULL UNIQUE,
    idempotency_key  TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    entity_type      TEXT    NOT NULL,
    entity_id        TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    base             TEXT,
    base_version     INTEGER,
    chained          INTEGER NOT NULL DEFAULT 0,
    txn_tokens       TEXT    NOT NULL DEFAULT '[]',
    envelope_version INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    is_head          INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    coalesced_count  INTEGER NOT NULL DEFAULT 0,
    reconciliations  INTEGER NOT NULL DEFAULT 0,
    history          TEXT    NOT NULL DEFAULT '[]'
);
CREATE INDEX ops_entity   ON ops(entity_type, entity_id, seq);
CREATE INDEX ops_ready    ON ops(next_attempt_at, seq) WHERE state = 'pending' AND is_head = 1;
CREATE INDEX ops_state    ON ops(state, seq);
CREATE INDEX ops_envelope ON ops(envelope_version);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE lock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    owner     TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL,
    beat_at   INTEGER NOT NULL
);
CREATE TABLE txn_outcomes (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    token     TEXT    NOT NULL UNIQUE,
    active    INTEGER NOT NULL DEFAULT 0,
    state     TEXT    NOT NULL,
    error     TEXT,
    at        INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX txn_outcomes_undelivered ON txn_outcomes(id) WHERE delivered = 0;
CREATE INDEX txn_outcomes_at ON txn_outcomes(at) WHERE state <> 'pending';
PRAGMA user_version = 1;
";

/// Migration 2 exactly as schema 2 shipped it (frozen here on purpose).
const V2: &str = r"
CREATE TABLE op_envelopes (
    version INTEGER PRIMARY KEY
) WITHOUT ROWID;
INSERT OR IGNORE INTO op_envelopes (version) SELECT DISTINCT envelope_version FROM ops;
DROP INDEX ops_envelope;
DROP INDEX ops_state;
CREATE INDEX ops_state ON ops(state, seq) WHERE state <> 'pending';
PRAGMA user_version = 2;
";

fn opts(clock: &Arc<ManualClock>) -> OutboxOptions {
    OutboxOptions::default()
        .clock(clock.clone())
        .synchronous(Synchronous::Normal)
}

/// One row as version 1 stored it.
struct Row<'a> {
    id: &'a str,
    kind: &'a str,
    entity: &'a str,
    payload: &'a str,
    state: &'a str,
    is_head: bool,
    attempts: i64,
    chained: bool,
}

/// Writes a version-1 file holding `rows` (all on envelope version 1), as
/// an app built on schema 1 would have left it.
fn v1_file(path: &Path, rows: &[Row<'_>]) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(V1).unwrap();
    for r in rows {
        conn.execute(
            "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, payload, \
             chained, envelope_version, state, is_head, attempts, next_attempt_at, created_at, \
             updated_at) VALUES (?1, ?2, ?3, 'device', ?4, ?5, ?6, 1, ?7, ?8, ?9, ?10, ?10, ?10)",
            params![
                r.id,
                uuid::Uuid::new_v4().to_string(),
                r.kind,
                r.entity,
                r.payload,
                r.chained,
                r.state,
                r.is_head,
                r.attempts,
                T0
            ],
        )
        .unwrap();
    }
}

fn index_sql(path: &Path) -> Vec<(String, Option<String>)> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ops' ORDER BY name")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

fn listed_envelopes(path: &Path) -> Vec<u32> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT version FROM op_envelopes ORDER BY version")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

const A1: &str = "0190a000-0000-7000-8000-000000000001";
const A2: &str = "0190a000-0000-7000-8000-000000000002";
const B1: &str = "0190a000-0000-7000-8000-000000000003";
const C1: &str = "0190a000-0000-7000-8000-000000000004";

fn v1_rows() -> Vec<Row<'static>> {
    vec![
        // Entity a: an op in flight when the app died, and a chained successor.
        Row {
            id: A1,
            kind: "update",
            entity: "a",
            payload: r#"{"on":true}"#,
            state: "in_flight",
            is_head: true,
            attempts: 1,
            chained: false,
        },
        Row {
            id: A2,
            kind: "update",
            entity: "a",
            payload: r#"{"on":false}"#,
            state: "pending",
            is_head: false,
            attempts: 0,
            chained: true,
        },
        Row {
            id: B1,
            kind: "create",
            entity: "b",
            payload: r#"{"name":"lamp"}"#,
            state: "pending",
            is_head: true,
            attempts: 0,
            chained: false,
        },
        // Entity c: a dead letter.
        Row {
            id: C1,
            kind: "delete",
            entity: "c",
            payload: "null",
            state: "failed",
            is_head: false,
            attempts: 3,
            chained: false,
        },
    ]
}

#[tokio::test]
async fn a_version_1_file_migrates_in_place_and_keeps_every_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    v1_file(&path, &v1_rows());
    let clock = ManualClock::new(T0);
    let up = Upcasters::new().register(1, |_, mut v| {
        v["v2"] = json!(true);
        Ok(v)
    });
    let (outbox, report) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(up))
        .await
        .unwrap();
    assert_eq!(report.migrated_from, Some(1));
    assert_eq!(report.requeued_in_flight, 1);
    assert_eq!((report.upcast, report.upcast_failed), (4, 0));

    let all = outbox.list(ListFilter::default()).await.unwrap();
    let ids: Vec<String> = all.iter().map(|o| o.op_id.to_string()).collect();
    assert_eq!(ids, [A1, A2, B1, C1]);
    assert!(all.iter().all(|o| o.envelope_version == 2));
    assert_eq!(all[1].payload, json!({"on": false, "v2": true}));
    assert!(all[1].chained);
    assert_eq!(all[3].state, OpState::Failed);

    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.failed), (3, 0, 1));
    let failed = outbox
        .list(ListFilter {
            state: Some(OpState::Failed),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert!(outbox.next_due().await.unwrap().active);

    // The ready heads are a's first op (requeued) and b's create.
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    let claimed: Vec<String> = claimed.iter().map(|o| o.op_id.to_string()).collect();
    assert_eq!(claimed, [A1, B1]);
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.failed), (1, 2, 1));
    let due = outbox.next_due().await.unwrap();
    assert!(due.active, "in-flight ops keep the queue active");
    assert_eq!(due.next_attempt_at, None, "a2 waits behind a1");
    outbox.close().await;

    let indexes = index_sql(&path);
    let names: Vec<&str> = indexes.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"ops_envelope"), "{names:?}");
    let state_sql = indexes
        .iter()
        .find(|(n, _)| n == "ops_state")
        .and_then(|(_, s)| s.clone())
        .unwrap();
    assert!(
        state_sql.contains("WHERE state <> 'pending'"),
        "{state_sql}"
    );
    assert_eq!(listed_envelopes(&path), [2]);
    let conn = Connection::open(&path).unwrap();
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, guardian_sync::outbox::SCHEMA_VERSION);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn a_version_1_file_opened_without_upcasting_lists_its_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    v1_file(&path, &v1_rows());
    let clock = ManualClock::new(T0);
    let (outbox, report) = Outbox::open(&path, opts(&clock)).await.unwrap();
    assert_eq!(report.migrated_from, Some(1));
    assert_eq!((report.upcast, report.upcast_failed), (0, 0));
    assert_eq!(outbox.stats().await.unwrap().pending, 3);
    outbox.close().await;
    assert_eq!(listed_envelopes(&path), [1]);
    // The app upgrades later: every op is still found.
    let up = Upcasters::new().register(1, |_, v| Ok(v));
    let (outbox, report) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(up))
        .await
        .unwrap();
    assert_eq!(report.migrated_from, None);
    assert_eq!((report.upcast, report.upcast_failed), (4, 0));
    outbox.close().await;
}

#[tokio::test]
async fn failed_upcasts_are_retried_at_each_open_and_after_retry_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let clock = ManualClock::new(T0);
    let v1 = Outbox::open(&path, opts(&clock)).await.unwrap().0;
    let bad = v1
        .enqueue(NewOp::update("device", "x", json!({"bad": 1})))
        .await
        .unwrap();
    v1.close().await;

    let broken = Upcasters::new().register(1, |_, v| {
        if v.get("bad").is_some() {
            Err("not yet".into())
        } else {
            Ok(v)
        }
    });
    let (v2, report) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(broken))
        .await
        .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (0, 1));
    // Put back in the queue while still on version 1.
    v2.retry_failed(bad.op_id).await.unwrap();
    v2.close().await;
    assert_eq!(listed_envelopes(&path), [1, 2]);

    // Still broken: failed again, found through the listed version.
    let (v2, report) = Outbox::open(
        &path,
        opts(&clock).envelope_version(2).upcasters(Upcasters::new()),
    )
    .await
    .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (0, 1));
    v2.close().await;
    assert_eq!(listed_envelopes(&path), [2]);

    // Fixed: the failed op (version 1, no longer listed) is found through
    // the failed ops and migrated; it waits for retry_failed.
    let fixed = Upcasters::new().register(1, |_, mut v| {
        v["fixed"] = json!(true);
        Ok(v)
    });
    let (v2, report) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(fixed))
        .await
        .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (1, 0));
    let op = v2.get(bad.op_id).await.unwrap().unwrap();
    assert_eq!(op.envelope_version, 2);
    assert_eq!(op.state, OpState::Failed);
    assert_eq!(op.payload, json!({"bad": 1, "fixed": true}));
    v2.close().await;
}

#[tokio::test]
async fn an_older_app_enqueueing_after_an_upgrade_is_upcast_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let clock = ManualClock::new(T0);
    let up = || Upcasters::new().register(1, |_, v| Ok(v));
    // An older build still running against the same file (here: opened in
    // the same process) while a newer one opens and upgrades it.
    let (old, _) = Outbox::open(&path, opts(&clock)).await.unwrap();
    let (v2, _) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(up()))
        .await
        .unwrap();
    assert_eq!(listed_envelopes(&path), [2]);
    let new = v2
        .enqueue(NewOp::update("device", "n", json!({})))
        .await
        .unwrap();
    let stale = old
        .enqueue(NewOp::update("device", "o", json!({"old": true})))
        .await
        .unwrap();
    let merged = old
        .enqueue(NewOp::update("device", "n", json!({"merged": true})))
        .await
        .unwrap();
    assert_eq!(merged.op_id, new.op_id, "coalesced into the v2 op");
    old.close().await;
    v2.close().await;
    let (v2, report) = Outbox::open(&path, opts(&clock).envelope_version(2).upcasters(up()))
        .await
        .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (2, 0));
    for id in [stale.op_id, new.op_id] {
        assert_eq!(v2.get(id).await.unwrap().unwrap().envelope_version, 2);
    }
    v2.close().await;
    assert_eq!(listed_envelopes(&path), [2]);
}

/// Writes a version-2 file holding `rows` at positions 1..=n, whose newest
/// `acked_after` positions were used and deleted (acknowledged) afterwards,
/// as an app built on schema 2 would have left it.
fn v2_file(path: &Path, rows: &[Row<'_>], acked_after: i64) {
    v1_file(path, rows);
    let conn = Connection::open(path).unwrap();
    let n = i64::try_from(rows.len()).unwrap();
    for k in 1..=acked_after {
        conn.execute(
            "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, payload, \
             envelope_version, state, next_attempt_at, created_at, updated_at) \
             VALUES (?1, ?2, 'update', 'device', 'gone', '{}', 1, 'pending', ?3, ?3, ?3)",
            params![
                format!("0190a000-0000-7000-8000-0000000001{k:02}"),
                uuid::Uuid::new_v4().to_string(),
                T0
            ],
        )
        .unwrap();
    }
    conn.execute("DELETE FROM ops WHERE seq > ?1", [n]).unwrap();
    conn.execute_batch(V2).unwrap();
}

fn ops_table_sql(path: &Path) -> String {
    let conn = Connection::open(path).unwrap();
    conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ops'",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_version_2_file_migrates_to_3_and_never_reuses_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    // Positions 1-4 live, 5-6 used by ops acknowledged since.
    v2_file(&path, &v1_rows(), 2);
    let clock = ManualClock::new(T0);
    let (outbox, report) = Outbox::open(&path, opts(&clock)).await.unwrap();
    assert_eq!(report.migrated_from, Some(2));
    assert_eq!(report.requeued_in_flight, 1);

    let all = outbox.list(ListFilter::default()).await.unwrap();
    let got: Vec<(i64, String)> = all.iter().map(|o| (o.seq, o.op_id.to_string())).collect();
    let want: Vec<(i64, String)> = [A1, A2, B1, C1]
        .iter()
        .zip(1..)
        .map(|(id, seq)| (seq, (*id).to_owned()))
        .collect();
    assert_eq!(got, want);
    assert!(all[1].chained);
    assert_eq!(all[3].state, OpState::Failed);

    // Above the old AUTOINCREMENT counter, not just above the live ops.
    let d = outbox
        .enqueue(NewOp::create("device", "d", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(d.seq, 7);
    // Deleting the newest op does not hand its position out again.
    outbox.cancel(d.op_id).await.unwrap();
    let e = outbox
        .enqueue(NewOp::create("device", "e", json!({"n": 2})))
        .await
        .unwrap();
    assert_eq!(e.seq, 8);

    // Order and heads are intact: a1 and b's create are the ready heads.
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    let claimed: Vec<String> = claimed.iter().map(|o| o.op_id.to_string()).collect();
    assert_eq!(claimed, [A1.to_owned(), B1.to_owned(), e.op_id.to_string()]);
    outbox.close().await;

    let sql = ops_table_sql(&path);
    assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
    let indexes = index_sql(&path);
    let names: Vec<&str> = indexes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "ops_entity",
            "ops_foreign_id",
            "ops_gated",
            "ops_ready",
            "ops_state",
            "ops_txn"
        ]
    );
    let conn = Connection::open(&path).unwrap();
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, guardian_sync::outbox::SCHEMA_VERSION);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// Schema 3 dropped AUTOINCREMENT, yet a position is never handed out twice:
/// not after the newest op is acknowledged, cancelled or coalesced away, not
/// when the queue runs empty, not across a reopen.
#[tokio::test]
async fn positions_are_never_reused_after_the_newest_op_goes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let clock = ManualClock::new(T0);
    let (outbox, _) = Outbox::open(&path, opts(&clock)).await.unwrap();
    let enqueue = |id: &'static str| {
        let outbox = outbox.clone();
        async move {
            outbox
                .enqueue(NewOp::create("device", id, json!({"id": id})))
                .await
                .unwrap()
        }
    };
    let a = enqueue("a").await;
    let b = enqueue("b").await;
    assert_eq!((a.seq, b.seq), (1, 2));

    // Acknowledged newest op, then the queue runs empty.
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(claimed.len(), 2);
    outbox
        .fenced(&fence)
        .ack(b.op_id, Ack::default())
        .await
        .unwrap();
    outbox
        .fenced(&fence)
        .ack(a.op_id, Ack::default())
        .await
        .unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    let c = enqueue("c").await;
    assert_eq!(c.seq, 3);

    // Cancelled newest op.
    outbox.cancel(c.op_id).await.unwrap();
    let d = enqueue("d").await;
    assert_eq!(d.seq, 4);

    // Coalesced away: a DELETE annihilates d's never-sent CREATE.
    let gone = outbox.enqueue(NewOp::delete("device", "d")).await.unwrap();
    assert!(gone.coalesced.is_some());
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    outbox.close().await;

    // Across a reopen.
    let (outbox, _) = Outbox::open(&path, opts(&clock)).await.unwrap();
    let e = outbox
        .enqueue(NewOp::create("device", "e", json!({})))
        .await
        .unwrap();
    assert_eq!(e.seq, 5);
    outbox.close().await;
}

/// The id schema 6 derives for position `seq` under namespace `ns` (the
/// layout of `op_ids::derive`, written out again so a change to it shows).
fn derived_id(ns: u64, seq: i64) -> uuid::Uuid {
    let ns = u128::from(ns);
    let v = (((ns >> 12) & ((1 << 48) - 1)) << 80)
        | (0x8 << 76)
        | ((ns & 0xfff) << 64)
        | (0b10 << 62)
        | u128::try_from(seq).unwrap();
    uuid::Uuid::from_u128(v)
}

/// The namespace an id of `derived_id`'s layout was made under.
fn namespace_of(id: uuid::Uuid) -> u64 {
    let v = id.as_u128();
    u64::try_from((((v >> 80) & ((1 << 48) - 1)) << 12) | ((v >> 64) & 0xfff)).unwrap()
}

/// Enqueues one op into a new outbox at `path`, closes it, and runs `sql`
/// on the file as another tool would.
async fn one_op_then(
    path: &Path,
    clock: &Arc<ManualClock>,
    sql: &str,
) -> guardian_sync::outbox::Enqueued {
    let (outbox, _) = Outbox::open(path, opts(clock)).await.unwrap();
    let op = outbox
        .enqueue(NewOp::create("device", "x", json!({"n": 1})))
        .await
        .unwrap();
    outbox.close().await;
    Connection::open(path).unwrap().execute(sql, []).unwrap();
    op
}

/// An op's id names its position; a row whose id does not (moved by
/// another tool, here by hand, and marked foreign as such rows are) is
/// still found, claimed and acknowledged by id; a later open giving that
/// position again gives another id; and a new op whose derived id a foreign
/// row holds gets an id of its own instead.
#[tokio::test]
async fn ids_name_positions_and_other_ids_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids.db");
    let clock = ManualClock::new(T0);
    // Moved below position 1, so the next op gets position 1 again.
    let x = one_op_then(
        &path,
        &clock,
        "UPDATE ops SET seq = 0, foreign_id = 1 WHERE seq = 1",
    )
    .await;
    assert_eq!((x.seq, x.op_id), (1, derived_id(namespace_of(x.op_id), 1)));

    let (outbox, _) = Outbox::open(&path, opts(&clock)).await.unwrap();
    assert_eq!(outbox.get(x.op_id).await.unwrap().unwrap().seq, 0);
    let b = outbox
        .enqueue(NewOp::create("device", "b", json!({"n": 2})))
        .await
        .unwrap();
    assert_eq!(b.seq, 1);
    assert_ne!(b.op_id, x.op_id, "an id is never given twice");
    assert_eq!(outbox.get(b.op_id).await.unwrap().unwrap().seq, 1);
    assert_eq!(outbox.get(x.op_id).await.unwrap().unwrap().seq, 0);

    // Another tool plants a foreign row holding the id this open derives
    // for the next position.
    let planted = derived_id(namespace_of(b.op_id), 2);
    Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO ops (seq, op_id, idempotency_key, kind, entity_type, entity_id, \
             payload, envelope_version, state, next_attempt_at, created_at, updated_at, \
             foreign_id) VALUES (-1, ?1, ?1, 'create', 'device', 'planted', '{}', 1, 'failed', \
             0, 0, 0, 1)",
            [planted.to_string()],
        )
        .unwrap();
    let c = outbox
        .enqueue(NewOp::create("device", "c", json!({"n": 3})))
        .await
        .unwrap();
    assert_eq!(c.seq, 2);
    assert_ne!(
        c.op_id, planted,
        "a derived id a foreign row holds is not given"
    );
    assert_eq!(outbox.get(c.op_id).await.unwrap().unwrap().seq, 2);

    // All go through claim and ack by id.
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    let ids: Vec<_> = claimed.iter().map(|o| o.op_id).collect();
    assert_eq!(ids, [x.op_id, b.op_id, c.op_id]);
    for id in ids {
        outbox.fenced(&fence).ack(id, Ack::default()).await.unwrap();
    }
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    outbox.close().await;
}

/// A row moved to another position by hand keeps being found by its id
/// once the outbox is checked.
#[tokio::test]
async fn a_check_refiles_an_op_moved_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moved.db");
    let clock = ManualClock::new(T0);
    let a = one_op_then(&path, &clock, "UPDATE ops SET seq = 99 WHERE seq = 1").await;

    let (outbox, _) = Outbox::open(&path, opts(&clock)).await.unwrap();
    assert!(outbox.get(a.op_id).await.unwrap().is_none());
    outbox.check().await.unwrap();
    let found = outbox.get(a.op_id).await.unwrap().unwrap();
    assert_eq!(found.seq, 99);
    outbox.close().await;
}
