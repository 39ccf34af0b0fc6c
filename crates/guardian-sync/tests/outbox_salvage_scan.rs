//! Salvage without SQLite's help (issue 15, point 3): a damaged schema page
//! and a WAL whose later commits SQLite ignores after a damaged frame cost
//! no op whose row still decodes; acknowledged ops are not brought back
//! where the file proves them deleted, and where it cannot, the server's
//! idempotency key keeps a re-sent op applied once. The salvaged outbox
//! drains to the reference server and no temporary file is left.
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
            .fenced(&fence)
            .claim_ready(n - done.len(), i64::MAX / 2)
            .await
            .unwrap();
        assert!(!ops.is_empty());
        for op in ops {
            outbox
                .fenced(&fence)
                .ack(op.op_id, Ack::default())
                .await
                .unwrap();
            done.push(op.op_id);
        }
    }
    outbox.fenced(&fence).lock_release().await.unwrap();
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
                || n == "o.db.writers"
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
    // The lock row is found too: epochs keep increasing past the old one.
    assert!(s.lock_saved, "{s:?}");
    let fence = outbox.lock_acquire("next", None).await.unwrap().unwrap();
    assert_eq!(fence.epoch(), 2);
    outbox.fenced(&fence).lock_release().await.unwrap();
    outbox.close().await;
    no_temp_files(dir.path());
    let applied = deliver(&path, &server).await;
    assert_eq!(applied.len(), 320);
    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), keys);
    no_temp_files(dir.path());
}

/// The root page of `ops` (an interior page: 320 ops span many leaves)
/// wrecked: SQLite reaches no row of the table; the scan reads the leaves
/// directly and recovers every op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrecked_ops_root_page_loses_no_op() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let (live, keys, _) = build_320(&path).await;
    let root: usize = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'ops'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        bytes[(root - 1) * PAGE],
        0x05,
        "the root is an interior page"
    );
    bytes[(root - 1) * PAGE..root * PAGE].fill(0xA5);
    std::fs::write(&path, &bytes).unwrap();
    let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
    let s = report.salvage.expect("salvaged");
    assert_eq!(s.ops_saved, 320, "{s:?}");
    assert_eq!(op_ids(&outbox).await, live);
    outbox.close().await;
    let applied = deliver(&path, &server).await;
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

/// Page number and page-image offset of each frame of a WAL.
fn wal_frames(wal: &[u8]) -> Vec<(u32, usize)> {
    let page = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
    (0..(wal.len() - 32) / (24 + page))
        .map(|i| {
            let at = 32 + i * (24 + page);
            let pgno = u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
            (pgno, at + 24)
        })
        .collect()
}

/// Flips the last byte of frame `i`'s page image.
fn damage_frame(wal: &mut [u8], frames: &[(u32, usize)], i: usize) {
    wal[frames[i].1 + PAGE - 1] ^= 0x55;
}

/// The crash image of a live outbox whose WAL holds several commits: 5
/// ops checkpointed into the file, delivered to the server by the engine
/// (claims and deletes, in the WAL), then 25 more enqueued (in the WAL).
/// Returns the image's path (`o.db` and `o.db-wal` in `dir`), the keys of
/// the 5 and of the 25, and the 25 ids.
async fn crash_image(
    server: &RunningServer,
    dir: &Path,
) -> (std::path::PathBuf, Vec<String>, Vec<String>, HashSet<OpId>) {
    let live_dir = tempfile::tempdir().unwrap();
    let live = live_dir.path().join("live.db");
    let (outbox, _) = Outbox::open(&live, opts()).await.unwrap();
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(
            outbox
                .enqueue(op(i + 1))
                .await
                .unwrap()
                .idempotency_key
                .to_string(),
        );
    }
    outbox.close().await;
    let engine = SyncEngine::builder()
        .outbox_path(&live)
        .outbox_options(opts())
        .server(server.url())
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .build()
        .await
        .unwrap();
    engine.run_until_empty().await.unwrap();
    let mut later = Vec::new();
    let mut ids = HashSet::new();
    for i in 0..25 {
        let done = engine.enqueue(op(i + 100)).await.unwrap();
        later.push(done.idempotency_key.to_string());
        ids.insert(done.op_id);
    }
    let path = dir.join("o.db");
    std::fs::copy(&live, &path).unwrap();
    std::fs::copy(live_dir.path().join("live.db-wal"), dir.join("o.db-wal")).unwrap();
    engine.outbox().close().await;
    drop(engine);
    (path, first, later, ids)
}

/// What SQLite alone reads of a copy of the image.
fn sqlite_alone(path: &Path) -> i64 {
    let alone = tempfile::tempdir().unwrap();
    let p = alone.path().join("o.db");
    std::fs::copy(path, &p).unwrap();
    std::fs::copy(path.with_extension("db-wal"), alone.path().join("o.db-wal")).unwrap();
    Connection::open(&p)
        .unwrap()
        .query_row("SELECT count(*) FROM ops", [], |r| r.get(0))
        .unwrap()
}

/// Who opens the damaged outbox first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// `gsync check --repair`.
    Repair,
    /// An app's enqueue: a plain open, then a write.
    Enqueue,
    /// A runner: the engine opens the outbox and drains it.
    Runner,
}

/// A digest of the database file and its WAL in `dir` (the read-only
/// view may leave SQLite's shared-memory index beside a WAL).
fn snapshot(dir: &Path) -> Vec<(String, u64)> {
    use std::hash::{Hash, Hasher};
    ["o.db", "o.db-wal"]
        .iter()
        .map(|n| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(dir.join(n)).unwrap().hash(&mut h);
            ((*n).to_owned(), h.finish())
        })
        .collect()
}

/// One damaged frame in a WAL of many commits, early (before the commits
/// that deliver and delete the 5 checkpointed ops) or in the middle (among
/// the 25 enqueues): SQLite stops there and silently ignores every later
/// commit; or a damaged WAL header: SQLite ignores the whole WAL. The
/// read-only check reports it and changes nothing; whoever opens the file
/// for writing first — `check --repair`, an enqueue, a runner — finds it
/// under the write lock before the first write and salvages: every op of
/// the later commits is recovered from the frames, the 5 ops SQLite still
/// shows when the damage is early, deleted by the later commits, are not
/// brought back, and the outbox drains with every op applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_after_a_damaged_wal_frame_are_recovered() {
    for case in ["early", "middle", "header"] {
        for opener in [Opener::Repair, Opener::Enqueue, Opener::Runner] {
            let what = format!("{case}, {opener:?}");
            let middle = case == "middle";
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let (path, first, later, ids) = crash_image(&server, dir.path()).await;
            let wal_path = path.with_extension("db-wal");
            let mut wal = std::fs::read(&wal_path).unwrap();
            let frames = wal_frames(&wal);
            assert!(frames.len() > 20, "{} frames", frames.len());
            if case == "header" {
                // A salt: no frame matches the header any more.
                wal[20] ^= 0x10;
            } else {
                // A frame whose page a later frame rewrites.
                let from = if middle { frames.len() / 2 } else { 0 };
                let bad = (from..frames.len() - 1)
                    .find(|&i| frames[i + 1..].iter().any(|f| f.0 == frames[i].0))
                    .unwrap();
                damage_frame(&mut wal, &frames, bad);
            }
            std::fs::write(&wal_path, &wal).unwrap();
            let alone = sqlite_alone(&path);
            if middle {
                assert!(alone < 25, "SQLite reads past the damaged frame: {alone}");
            } else {
                assert_eq!(alone, 5, "{what}: SQLite reads past the damage");
            }
            let before = snapshot(dir.path());
            let check = OutboxReader::open(&path).unwrap().check().unwrap();
            assert!(!check.ok, "{what}: {check:?}");
            assert!(
                check.problems.iter().any(|p| p.contains("WAL")),
                "{what}: {check:?}"
            );
            assert_eq!(snapshot(dir.path()), before, "{what}: the check wrote");
            let expected: HashSet<String> = first.into_iter().chain(later).collect();
            let applied = match opener {
                Opener::Repair | Opener::Enqueue => {
                    let (outbox, report) = if opener == Opener::Repair {
                        let (outbox, report, check) = Outbox::repair(&path, opts()).await.unwrap();
                        assert!(check.ok, "{check:?}");
                        (outbox, report)
                    } else {
                        Outbox::open(&path, opts()).await.unwrap()
                    };
                    let s = report.salvage.expect("the damaged WAL is salvaged");
                    assert!(s.reason.contains("WAL"), "{s:?}");
                    assert_eq!(s.ops_saved, 25, "{what}: {s:?}");
                    assert_eq!(s.ops_deleted_later, if middle { 0 } else { 5 }, "{s:?}");
                    assert_eq!(op_ids(&outbox).await, ids, "{what}");
                    let mut expected = expected.clone();
                    if opener == Opener::Enqueue {
                        let done = outbox.enqueue(op(999)).await.unwrap();
                        expected.insert(done.idempotency_key.to_string());
                        assert_eq!(op_ids(&outbox).await.len(), 26, "{what}");
                    }
                    outbox.close().await;
                    let applied = deliver(&path, &server).await;
                    assert_eq!(
                        applied.len(),
                        expected.len(),
                        "{what}: applied twice or lost"
                    );
                    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), expected);
                    continue;
                }
                Opener::Runner => deliver(&path, &server).await,
            };
            // The runner's open salvaged (the damaged file is kept aside)
            // and it delivered the 25 recovered ops.
            let aside = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let n = e.as_ref().unwrap().file_name();
                    let n = n.to_string_lossy();
                    n.starts_with("o.db.corrupt-") && !n.contains("-wal") && !n.contains("-shm")
                })
                .count();
            assert_eq!(aside, 1, "{what}: the runner did not salvage");
            assert_eq!(applied.len(), 30, "{what}: an op was applied twice or lost");
            assert_eq!(applied.into_iter().collect::<HashSet<_>>(), expected);
            no_temp_files(dir.path());
        }
    }
}

/// A writer killed after writing a transaction's frames but before
/// publishing them, then partly overwritten by the next writer, built
/// from real commits: the state a first outbox reached (`published`), one
/// large enqueue written over it by one writer (`killed`: many frames,
/// its commit frame last), and one small enqueue written over the same
/// state by another (fewer frames). The WAL holds the small enqueue's
/// frames, then the rest of the large one's: no damage. Every open for
/// writing looks at the WAL; none may salvage, and the outbox holds what
/// SQLite reads: the published ops and the small enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writers_unpublished_frames_are_not_damage() {
    let base = tempfile::tempdir().unwrap();
    let live = base.path().join("live.db");
    let (outbox, _) = Outbox::open(&live, opts()).await.unwrap();
    for i in 0..5 {
        outbox.enqueue(op(i + 1)).await.unwrap();
    }
    // The published state: the file and its WAL as a crash leaves them.
    let published = base.path().join("published");
    std::fs::create_dir(&published).unwrap();
    std::fs::copy(&live, published.join("o.db")).unwrap();
    std::fs::copy(base.path().join("live.db-wal"), published.join("o.db-wal")).unwrap();
    let published_wal = std::fs::read(published.join("o.db-wal")).unwrap();
    // The killed writer's transaction: a large op (overflow pages).
    outbox
        .enqueue(NewOp::create(
            "thing",
            "large",
            json!({"big": "k".repeat(30_000)}),
        ))
        .await
        .unwrap();
    let killed_wal = std::fs::read(base.path().join("live.db-wal")).unwrap();
    outbox.close().await;
    // The next writer, over the published state: a small op.
    let next = base.path().join("next");
    std::fs::create_dir(&next).unwrap();
    std::fs::copy(published.join("o.db"), next.join("o.db")).unwrap();
    std::fs::copy(published.join("o.db-wal"), next.join("o.db-wal")).unwrap();
    let (outbox, report) = Outbox::open(next.join("o.db"), opts()).await.unwrap();
    assert!(report.salvage.is_none());
    let small = outbox.enqueue(op(77)).await.unwrap();
    let next_wal = std::fs::read(next.join("o.db-wal")).unwrap();
    let expected = op_ids(&outbox).await;
    assert_eq!(expected.len(), 6);
    assert!(expected.contains(&small.op_id));
    // What the next writer leaves for a crash image: its WAL, then the
    // killed writer's frames it did not reach.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    std::fs::copy(next.join("o.db"), &path).unwrap();
    outbox.close().await;
    assert!(published_wal.len() < next_wal.len() && next_wal.len() < killed_wal.len());
    assert_eq!(next_wal[..32], killed_wal[..32], "one WAL generation");
    let mut wal = next_wal.clone();
    wal.extend_from_slice(&killed_wal[next_wal.len()..]);
    let frames = wal_frames(&wal);
    let stale = (killed_wal.len() - next_wal.len()) / (24 + PAGE);
    assert!(stale >= 2, "{stale} frames of the killed writer survive");
    let last = frames.last().unwrap().1 - 24;
    assert_ne!(
        u32::from_be_bytes(wal[last + 4..last + 8].try_into().unwrap()),
        0,
        "the killed writer's commit frame survives"
    );
    std::fs::write(dir.path().join("o.db-wal"), &wal).unwrap();
    assert_eq!(sqlite_alone(&path), 6);
    let check = OutboxReader::open(&path).unwrap().check().unwrap();
    assert!(check.ok, "{check:?}");
    for repair in [false, true] {
        // Each on its own copy: closing the outbox checkpoints the WAL.
        let copy = tempfile::tempdir().unwrap();
        let p = copy.path().join("o.db");
        std::fs::copy(&path, &p).unwrap();
        std::fs::write(copy.path().join("o.db-wal"), &wal).unwrap();
        let (outbox, report) = if repair {
            let (outbox, report, check) = Outbox::repair(&p, opts()).await.unwrap();
            assert!(check.ok, "{check:?}");
            (outbox, report)
        } else {
            Outbox::open(&p, opts()).await.unwrap()
        };
        assert!(report.salvage.is_none(), "repair {repair}: {report:?}");
        assert_eq!(op_ids(&outbox).await, expected, "repair {repair}");
        outbox.close().await;
        assert!(
            std::fs::read_dir(copy.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt")),
            "repair {repair}: a live outbox was moved aside"
        );
    }
}

/// As above, and a second damaged frame that is the newest image of its
/// (index) page: the scan cannot prove what the later commits deleted, so
/// the 5 delivered ops SQLite still shows are kept and sent again. The
/// server's idempotency key applies each once (at-least-once delivery
/// with idempotent apply keeps the invariant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_salvage_cannot_prove_deleted_is_resent_and_applied_once() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, first, later, ids) = crash_image(&server, dir.path()).await;
    let wal_path = path.with_extension("db-wal");
    let mut wal = std::fs::read(&wal_path).unwrap();
    let frames = wal_frames(&wal);
    let bad = (0..frames.len() - 1)
        .find(|&i| frames[i + 1..].iter().any(|f| f.0 == frames[i].0))
        .unwrap();
    let newest_index = (bad + 1..frames.len() - 1)
        .find(|&i| {
            let (pgno, at) = frames[i];
            let kind = wal[at + if pgno == 1 { 100 } else { 0 }];
            matches!(kind, 0x02 | 0x0A) && frames[i + 1..].iter().all(|f| f.0 != pgno)
        })
        .expect("an index page written once after the damage");
    damage_frame(&mut wal, &frames, bad);
    damage_frame(&mut wal, &frames, newest_index);
    std::fs::write(&wal_path, &wal).unwrap();
    let (outbox, report, _) = Outbox::repair(&path, opts()).await.unwrap();
    let s = report.salvage.expect("the damaged WAL is salvaged");
    assert_eq!(s.ops_saved, 30, "{s:?}");
    assert_eq!(s.ops_deleted_later, 0, "{s:?}");
    let now = op_ids(&outbox).await;
    assert!(ids.iter().all(|id| now.contains(id)));
    outbox.close().await;
    let applied = deliver(&path, &server).await;
    let expected: HashSet<String> = first.into_iter().chain(later).collect();
    assert_eq!(applied.len(), 30, "a re-sent op was applied twice");
    assert_eq!(applied.into_iter().collect::<HashSet<_>>(), expected);
    no_temp_files(dir.path());
}

/// Five ops checkpointed into the main file; returns their ids in order.
async fn five_in_the_file(path: &Path) -> Vec<OpId> {
    let (outbox, _) = Outbox::open(path, opts()).await.unwrap();
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(outbox.enqueue(op(i)).await.unwrap().op_id);
    }
    outbox.close().await;
    Connection::open(path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    ids
}

/// The offset of the header-size byte of the record holding `id`: the
/// header ends where the op id's text begins (the rowid alias before it is
/// stored as NULL, with no body), and its first byte is its own size.
fn record_start(bytes: &[u8], id: &OpId) -> usize {
    let text = id.to_string();
    let at = bytes
        .windows(text.len())
        .position(|w| w == text.as_bytes())
        .expect("the op id is in the file");
    (1..0x80)
        .find(|&k| usize::from(bytes[at - k]) == k)
        .map(|k| at - k)
        .expect("a record header before the op id")
}

/// One flipped bit in a record's first byte (its header size) made
/// SQLite call the row malformed and the page scan skip it: a repair
/// saved four ops and said nothing was lost. The size is redundant (the
/// column types must fill the payload), so the row is read again, intact;
/// a row whose column types are damaged cannot be, and its position is
/// reported as unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_header_loses_no_op_or_says_which_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let ids = five_in_the_file(&path).await;
    let clean = std::fs::read(&path).unwrap();
    let start = record_start(&clean, &ids[2]);

    let mut bytes = clean.clone();
    bytes[start] ^= 0x82;
    std::fs::write(&path, &bytes).unwrap();
    let (outbox, report, check) = Outbox::repair(&path, opts()).await.unwrap();
    let s = report.salvage.expect("salvaged");
    assert_eq!((s.ops_saved, s.ops_quarantined), (5, 0), "{s:?}");
    assert_eq!(s.ops_found_by_scan, 1, "{s:?}");
    assert!(s.unreadable_seq_ranges.is_empty(), "{s:?}");
    assert!(check.ok, "{check:?}");
    let listed = outbox
        .list(ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|op| op.op_id)
        .collect::<Vec<_>>();
    assert_eq!(listed, ids);
    outbox.close().await;

    // The header size and the op id's column type damaged (made a
    // reserved type): neither SQLite nor the scan can read the row.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let mut bytes = clean;
    bytes[start] ^= 0x82;
    bytes[start + 2] = 10;
    std::fs::write(&path, &bytes).unwrap();
    let (outbox, report, _) = Outbox::repair(&path, opts()).await.unwrap();
    let s = report.salvage.expect("salvaged");
    assert_eq!((s.ops_saved, s.ops_quarantined), (4, 0), "{s:?}");
    assert_eq!(s.unreadable_seq_ranges, vec![(3, 3)], "{s:?}");
    outbox.close().await;
}

/// A WAL frame damaged inside a row's sealed bytes, with an intact commit
/// after it: the frame holds a newer version of an op (a later write to
/// a column the seal does not cover), and its payload has one letter
/// changed, so the row still has an op's shape. Salvage used to put that
/// version in place of the intact copy SQLite read, and the op then
/// failed its seal. The damaged version is not taken; the intact newer
/// version in the later commit is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newer_version_does_not_replace_an_intact_row() {
    // Schema 7, and a file from before the seals (schema 3), whose rows
    // get a seal computed from what the scan reads: a damaged frame's row
    // must not pass for whole there either.
    for schema3 in [false, true] {
        damaged_newer_version(schema3).await;
    }
}

async fn damaged_newer_version(schema3: bool) {
    let live_dir = tempfile::tempdir().unwrap();
    let live = live_dir.path().join("o.db");
    let (outbox, _) = Outbox::open(&live, opts()).await.unwrap();
    // About two ops to a page: the first and the last are on different
    // pages, so each update below writes its own frame.
    let letters = ["q", "w", "e", "r", "t"];
    let mut payloads = Vec::new();
    for (i, l) in letters.iter().enumerate() {
        let payload = json!({"i": i, "pad": l.repeat(1500)});
        payloads.push(payload.clone());
        outbox
            .enqueue(NewOp::create("thing", format!("ent-{i}"), payload))
            .await
            .unwrap();
    }
    outbox.close().await;
    let conn = Connection::open(&live).unwrap();
    if schema3 {
        conn.execute_batch(
            "DROP INDEX ops_txn; DROP INDEX ops_gated; DROP INDEX ops_foreign_id;
             DROP TRIGGER ops_reseal;
             ALTER TABLE ops DROP COLUMN checksum; ALTER TABLE ops DROP COLUMN txn;
             ALTER TABLE ops DROP COLUMN depends_on; ALTER TABLE ops DROP COLUMN foreign_id;
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    conn.execute_batch(
        "PRAGMA wal_checkpoint(TRUNCATE); PRAGMA wal_autocheckpoint = 0;
         UPDATE ops SET last_error = 'first' WHERE seq = 1;
         UPDATE ops SET last_error = 'last' WHERE seq = 5;",
    )
    .unwrap();
    // The image, taken while the connection is open (its close would
    // checkpoint the WAL away).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    std::fs::copy(&live, &path).unwrap();
    let mut wal = std::fs::read(live_dir.path().join("o.db-wal")).unwrap();
    drop(conn);

    let frames = wal_frames(&wal);
    let run = "q".repeat(64);
    let (bad, at) = frames
        .iter()
        .enumerate()
        .find_map(|(i, f)| {
            let image = &wal[f.1..f.1 + PAGE];
            image
                .windows(run.len())
                .position(|w| w == run.as_bytes())
                .map(|at| (i, f.1 + at))
        })
        .expect("a frame holds the first op's new version");
    assert!(bad + 1 < frames.len(), "no commit after the damaged frame");
    wal[at + 32] = b'x';
    std::fs::write(path.with_extension("db-wal"), &wal).unwrap();

    let (outbox, report, check) = Outbox::repair(&path, opts()).await.unwrap();
    let s = report.salvage.expect("the damaged WAL is salvaged");
    assert!(s.reason.contains("WAL"), "{s:?}");
    assert_eq!((s.ops_saved, s.ops_quarantined), (5, 0), "{s:?}");
    assert!(
        s.notes.iter().any(|n| n.contains("the older copy is kept")),
        "{s:?}"
    );
    assert!(check.ok, "{check:?}");
    let listed = outbox.list(ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 5);
    for (op, want) in listed.iter().zip(&payloads) {
        assert_eq!(op.state, guardian_sync::op::OpState::Pending, "{op:?}");
        assert_eq!(&op.payload, want, "op {}", op.entity_id);
    }
    // The intact later commit's version was taken.
    assert_eq!(listed[4].last_error.as_deref(), Some("last"));
    assert_eq!(listed[0].last_error, None);
    outbox.close().await;
}
