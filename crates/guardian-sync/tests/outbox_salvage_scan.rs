//! Salvage without SQLite's help (issue 15, point 3): a damaged schema page
//! costs no op whose row still decodes, and acknowledged ops are not
//! brought back. The salvaged outbox drains to the reference server and no
//! temporary file is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::engine::SyncEngine;
use guardian_sync::op::{Ack, NewOp, OpId};
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions, OutboxReader, Synchronous};
use guardian_sync::transport::StaticToken;
use rusqlite::Connection;
use serde_json::json;

const TOKEN: &str = "tok-a";
const PAGE: usize = 4096;

fn opts() -> OutboxOptions {
    OutboxOptions::default()
        .synchronous(Synchronous::Off)
        .coalesce(false)
        .preallocate_wal(false)
}

async fn server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Op `i`: a create of `thing/ent-i`; every 40th payload spans pages
/// (an overflow chain).
fn op(i: usize) -> NewOp {
    let payload = if i.is_multiple_of(40) {
        json!({"n": 5, "i": i, "big": "b".repeat(9000)})
    } else {
        json!({"n": 5, "i": i})
    };
    NewOp::create("thing", format!("ent-{i:04}"), payload)
}

/// Claims and acks up to `n` ops (FIFO); returns their ids.
async fn ack_first(outbox: &Outbox, n: usize) -> Vec<OpId> {
    let fence = outbox.lock_acquire("test", None).await.unwrap().unwrap();
    let mut done = Vec::new();
    while done.len() < n {
        let ops = outbox
            .claim_ready(&fence, n - done.len(), i64::MAX / 2)
            .await
            .unwrap();
        assert!(!ops.is_empty());
        for op in ops {
            outbox.ack(&fence, op.op_id, Ack::default()).await.unwrap();
            done.push(op.op_id);
        }
    }
    outbox.lock_release(&fence).await.unwrap();
    done
}

async fn op_ids(outbox: &Outbox) -> HashSet<OpId> {
    outbox
        .list(ListFilter {
            limit: 10_000,
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.op_id)
        .collect()
}

/// Delivers the outbox at `path` to `server` with the engine; returns the
/// idempotency keys the server applied.
async fn deliver(path: &Path, server: &RunningServer) -> Vec<String> {
    let engine = SyncEngine::builder()
        .outbox_path(path)
        .server(server.url())
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .build()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_empty())
        .await
        .expect("drain did not finish in 60 s")
        .unwrap();
    let stats = engine.outbox().stats().await.unwrap();
    assert_eq!(
        stats.pending + stats.in_flight + stats.failed,
        0,
        "{stats:?}"
    );
    engine.outbox().close().await;
    drop(engine);
    server
        .applied_log()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.idempotency_key)
        .collect()
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            n == "o.db"
                || n == "o.db-wal"
                || n == "o.db-shm"
                || n == "o.db.lock"
                || n.starts_with("o.db.corrupt-"),
            "unexpected file {n}"
        );
        assert!(!n.contains(".salvage"), "temporary file {n} left behind");
    }
}

/// A closed outbox of 320 live ops (some with overflow pages), after 80
/// older ops were acknowledged and deleted, their pages freed (still
/// holding their rows: SQLite does not wipe freed pages). Returns the ids
/// and keys of the live ops and the ids of the acknowledged ones.
async fn build_320(path: &Path) -> (HashSet<OpId>, HashSet<String>, Vec<OpId>) {
    let (outbox, _) = Outbox::open(path, opts()).await.unwrap();
    let mut keys = HashSet::new();
    for i in 0..400 {
        let done = outbox.enqueue(op(i)).await.unwrap();
        if i >= 80 {
            keys.insert(done.idempotency_key.to_string());
        }
    }
    let acked = ack_first(&outbox, 80).await;
    let live = op_ids(&outbox).await;
    assert_eq!(live.len(), 320);
    outbox.close().await;
    let free: i64 = Connection::open(path)
        .unwrap()
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    assert!(free > 0, "no freed page: the test would prove nothing");
    (live, keys, acked)
}

/// Page 1 (the file header aside) holds `sqlite_master`: wrecked, SQLite
/// reads no table at all. The scan finds every op row in the other pages,
/// none of the freed pages' acknowledged rows, and the result drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrecked_schema_page_loses_no_op() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let (live, keys, acked) = build_320(&path).await;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100..PAGE].fill(0xA5);
    std::fs::write(&path, &bytes).unwrap();
    let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
    let s = report.salvage.expect("salvaged");
    assert!(s.ops_table_lost, "{s:?}");
    assert_eq!(s.ops_saved, 320, "{s:?}");
    assert_eq!(s.ops_found_by_scan, 320, "{s:?}");
    assert_eq!(s.ops_quarantined, 0, "{s:?}");
    assert_eq!(op_ids(&outbox).await, live);
    assert!(acked.iter().all(|id| !live.contains(id)));
    outbox.close().await;
    no_temp_files(dir.path());
    let applied = deliver(&path, &server).await;
    assert_eq!(applied.len(), 320);
    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), keys);
    no_temp_files(dir.path());
}

/// A few bytes of the schema garbled: the `ops` table's root page number
/// and a column name in its `CREATE TABLE`. SQLite then reads another
/// b-tree as `ops` (or nothing); the repair finds the damage and the scan
/// recovers all 320 ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_schema_records_lose_no_op() {
    for what in ["root page", "column name"] {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (live, keys, _) = build_320(&path).await;
        {
            let conn = Connection::open(&path).unwrap();
            let root: i64 = conn
                .query_row(
                    "SELECT rootpage FROM sqlite_master WHERE name = 'ops_entity'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            conn.execute_batch("PRAGMA writable_schema = ON").unwrap();
            if what == "root page" {
                conn.execute(
                    "UPDATE sqlite_master SET rootpage = ?1 WHERE name = 'ops'",
                    [root],
                )
                .unwrap();
            } else {
                conn.execute(
                    "UPDATE sqlite_master SET sql = replace(sql, 'idempotency_key', 'idempotency_kex') \
                     WHERE name = 'ops'",
                    [],
                )
                .unwrap();
            }
        }
        // The read-only check sees it (changing nothing); a plain open
        // either salvages or refuses with the repair named.
        let seen = match OutboxReader::open(&path) {
            Ok(r) => !r.check().unwrap().ok,
            Err(e) => e.to_string().contains("--repair"),
        };
        assert!(seen, "{what}: the read-only check missed it");
        if what == "column name" {
            let before = std::fs::read(&path).unwrap();
            let Err(err) = Outbox::open(&path, opts()).await else {
                panic!("a garbled schema was opened");
            };
            assert!(err.to_string().contains("schema"), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), before);
        }
        let (outbox, report, check) = Outbox::repair(&path, opts()).await.unwrap();
        assert!(check.ok, "{what}: {check:?}");
        let s = report.salvage.expect("salvaged");
        assert_eq!(s.ops_saved, 320, "{what}: {s:?}");
        assert_eq!(op_ids(&outbox).await, live, "{what}");
        outbox.close().await;
        let applied = deliver(&path, &server).await;
        assert_eq!(applied.into_iter().collect::<HashSet<_>>(), keys, "{what}");
        no_temp_files(dir.path());
    }
}
