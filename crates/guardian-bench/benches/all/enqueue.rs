//! Scenario 1: durable enqueue, each op durable when the call returns.
//!
//! Ours (1 and 8 concurrent enqueuers, `synchronous=FULL`) beside the peers
//! an app would otherwise use at the same durability: a bare rusqlite INSERT
//! loop with the same pragmas (WAL, FULL), and the same loop with the two
//! indexes an outbox adds to its table (their price alone); the
//! `queue-file` crate (Square's Tape; `sync_writes` on, its default: data
//! and header `fdatasync`ed per add); and raw `pwrite + fdatasync` of the
//! same bytes into a preallocated file (the physical limit; 8 records per
//! sync for the batch limit).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use guardian_bench::report::{ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions, Synchronous};
use rusqlite::{params, Connection};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{client_runtime, rate, scratch, Config, Section, Target};

const WRITERS: usize = 8;

fn payload(i: usize) -> Value {
    json!({"on": i.is_multiple_of(2), "level": i % 100, "room": "living-room", "scene": "evening"})
}

fn entity_id(side: &str, i: usize) -> String {
    format!("{side}-{i:08}")
}

/// The bytes a peer stores for op `i`: the same fields our outbox row holds.
fn record(side: &str, i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "op_id": Uuid::now_v7(),
        "idempotency_key": Uuid::new_v4(),
        "kind": "update",
        "type": "device",
        "id": entity_id(side, i),
        "payload": payload(i),
    }))
    .expect("serialize")
}

/// Ops written (untimed) before a steady-state measurement: enough for the
/// WAL to pass SQLite's 1000-page checkpoint threshold and wrap, as in an
/// app that has been writing for a while.
const WARM_UP: usize = 1_200;

/// `n` enqueues by `writers` tasks into a new outbox, after `warm_up`
/// untimed ones (entity ids of their own, so the timed ops stay new).
fn ours(rt: &tokio::runtime::Runtime, n: usize, writers: usize, warm_up: usize) -> f64 {
    let dir = scratch("bench-enqueue-ours");
    rt.block_on(async {
        let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
            .await
            .expect("open outbox");
        for i in 0..warm_up {
            outbox
                .enqueue(NewOp::update("device", entity_id("warm", i), payload(i)))
                .await
                .expect("warm-up enqueue");
        }
        let per = n / writers;
        let start = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for k in 0..per {
                        let i = w * per + k;
                        outbox
                            .enqueue(NewOp::update("device", entity_id("ours", i), payload(i)))
                            .await
                            .expect("enqueue");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("enqueuer");
        }
        let r = rate(per * writers, start.elapsed());
        outbox.close().await;
        r
    })
}

/// [`ours`] with plain threads calling `Outbox::enqueue_blocking`, as an
/// FFI binding or a sync app would (the runtime only opens and closes), at
/// `sync` durability.
fn ours_threads(
    rt: &tokio::runtime::Runtime,
    n: usize,
    writers: usize,
    warm_up: usize,
    sync: Synchronous,
) -> f64 {
    let dir = scratch("bench-enqueue-ours-threads");
    let outbox = rt
        .block_on(Outbox::open(
            dir.path().join("outbox.db"),
            OutboxOptions::default().synchronous(sync),
        ))
        .expect("open outbox")
        .0;
    for i in 0..warm_up {
        outbox
            .enqueue_blocking(NewOp::update("device", entity_id("warm", i), payload(i)))
            .expect("warm-up enqueue");
    }
    let per = n / writers;
    let shared = outbox.clone();
    let r = threaded(writers, per, move |w| {
        let outbox = shared.clone();
        move || {
            for k in 0..per {
                let i = w * per + k;
                outbox
                    .enqueue_blocking(NewOp::update("device", entity_id("ours", i), payload(i)))
                    .expect("enqueue");
            }
        }
    });
    rt.block_on(outbox.close());
    r
}

/// Runs `writers` threads doing `per` ops each and returns ops/s. Thread
/// `w` first runs `prepare(w)` (untimed: opening its connection, say), which
/// returns its timed work; the clock starts once every thread is ready.
fn threaded<P, W>(writers: usize, per: usize, prepare: P) -> f64
where
    P: Fn(usize) -> W + Send + Sync + 'static,
    W: FnOnce(),
{
    let prepare = Arc::new(prepare);
    let barrier = Arc::new(Barrier::new(writers + 1));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let barrier = barrier.clone();
            let prepare = prepare.clone();
            std::thread::spawn(move || {
                let work = prepare(w);
                barrier.wait();
                work();
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join().expect("enqueuer thread");
    }
    rate(per * writers, start.elapsed())
}

fn sqlite_conn(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).expect("open sqlite");
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .expect("busy timeout");
    let _: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn
}

const BARE_INSERT: &str = "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, \
     payload, created_at) VALUES (?1, ?2, 'update', 'device', ?3, ?4, ?5)";

fn bare_insert(stmt: &mut rusqlite::Statement<'_>, side: &str, i: usize) {
    stmt.execute(params![
        Uuid::now_v7().to_string(),
        Uuid::new_v4().to_string(),
        entity_id(side, i),
        payload(i).to_string(),
        i64::try_from(i).unwrap_or_default(),
    ])
    .expect("insert");
}

/// The two indexes an outbox keeps besides the bare table's own (an
/// entity's ops in order, and the ready queue), put on the bare table: what
/// they add to a commit, apart from anything else the outbox does.
const OUTBOX_INDEXES: &str = "CREATE INDEX ops_entity ON ops(entity_type, entity_id, seq); \
     CREATE INDEX ops_ready ON ops(created_at, seq);";

/// `n` autocommit INSERTs by `writers` threads (a connection each), after
/// `warm_up` untimed ones.
fn bare_sqlite(n: usize, writers: usize, warm_up: usize) -> f64 {
    bare_sqlite_with(n, writers, warm_up, "")
}

/// [`bare_sqlite`] by one writer into a table with [`OUTBOX_INDEXES`].
fn bare_sqlite_indexed(n: usize, warm_up: usize) -> f64 {
    bare_sqlite_with(n, 1, warm_up, OUTBOX_INDEXES)
}

fn bare_sqlite_with(n: usize, writers: usize, warm_up: usize, indexes: &str) -> f64 {
    let dir = scratch("bench-enqueue-sqlite");
    let path = dir.path().join("bare.db");
    let setup = sqlite_conn(&path);
    setup
        .execute_batch(
            "CREATE TABLE ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, op_id TEXT NOT NULL UNIQUE, \
             idempotency_key TEXT NOT NULL, kind TEXT NOT NULL, entity_type TEXT NOT NULL, \
             entity_id TEXT NOT NULL, payload TEXT NOT NULL, created_at INTEGER NOT NULL)",
        )
        .expect("schema");
    setup.execute_batch(indexes).expect("indexes");
    {
        let mut stmt = setup.prepare(BARE_INSERT).expect("prepare");
        for i in 0..warm_up {
            bare_insert(&mut stmt, "warm", i);
        }
    }
    let per = n / writers;
    threaded(writers, per, move |w| {
        let conn = sqlite_conn(&path);
        move || {
            let mut stmt = conn.prepare(BARE_INSERT).expect("prepare");
            for k in 0..per {
                bare_insert(&mut stmt, "sqlite", w * per + k);
            }
        }
    })
}

fn queue_file(n: usize, writers: usize) -> f64 {
    let dir = scratch("bench-enqueue-qf");
    let mut qf = queue_file::QueueFile::open(dir.path().join("tape.qf")).expect("open queue file");
    qf.set_sync_writes(true);
    let qf = Arc::new(Mutex::new(qf));
    let per = n / writers;
    threaded(writers, per, move |w| {
        let qf = qf.clone();
        move || {
            for k in 0..per {
                let bytes = record("qf", w * per + k);
                qf.lock().expect("queue lock").add(&bytes).expect("add");
            }
        }
    })
}

/// `pwrite` of `group` records at a time into a preallocated file, then
/// `fdatasync`: no metadata changes, nothing else written.
fn raw_fdatasync(n: usize, group: usize) -> f64 {
    let dir = scratch("bench-enqueue-raw");
    let records: Vec<Vec<u8>> = (0..n).map(|i| record("raw", i)).collect();
    let total: usize = records.iter().map(Vec::len).sum();
    let mut file = File::create(dir.path().join("raw.log")).expect("create raw");
    file.write_all(&vec![0u8; total]).expect("preallocate");
    file.sync_all().expect("sync");
    let start = Instant::now();
    let mut offset = 0u64;
    for chunk in records.chunks(group) {
        let bytes = chunk.concat();
        file.write_all_at(&bytes, offset).expect("pwrite");
        file.sync_data().expect("fdatasync");
        offset += bytes.len() as u64;
    }
    rate(n, start.elapsed())
}

pub(crate) fn run(config: &Config) -> Section {
    let n = config.size(600, 160);
    let rt = client_runtime();
    let names = [
        "ours, 1 task",
        "ours, 8 tasks",
        "bare rusqlite, 1 writer",
        "bare rusqlite, 8 writers (8 connections)",
        "queue-file (Tape), 1 writer",
        "queue-file (Tape), 8 writers (shared Mutex)",
        "raw pwrite + fdatasync, 1 record per sync",
        "raw pwrite + fdatasync, 8 records per sync",
        "ours, 1 task, steady",
        "ours, 8 tasks, steady",
        "bare rusqlite, 1 writer, steady",
        "bare rusqlite + the outbox's 2 indexes, steady",
        "ours, 1 thread",
        "ours, 8 threads",
        "ours, 1 thread, steady",
        "ours, 8 threads, steady",
        "ours, 1 thread, steady, `synchronous=OFF`",
        "ours, 8 threads, steady, `synchronous=OFF`",
    ];
    let mut s: Vec<Samples> = vec![Samples::new(); names.len()];
    let record_bytes = record("raw", 0).len();
    // The steady rows sit near their targets: runs past `config.runs`
    // measure them alone.
    for run in 0..config.near_runs() {
        let all = run < config.runs;
        eprintln!(
            "enqueue: run {}/{}{}",
            run + 1,
            config.near_runs(),
            if all { "" } else { " (steady rows)" }
        );
        if all {
            s[0].push(ours(&rt, n, 1, 0));
            s[2].push(bare_sqlite(n, 1, 0));
            s[4].push(queue_file(n, 1));
            s[6].push(raw_fdatasync(n, 1));
            s[1].push(ours(&rt, n, WRITERS, 0));
            s[3].push(bare_sqlite(n, WRITERS, 0));
            s[5].push(queue_file(n, WRITERS));
            s[7].push(raw_fdatasync(n, WRITERS));
        }
        let warm = config.size(WARM_UP, 300);
        s[8].push(ours(&rt, n, 1, warm));
        s[10].push(bare_sqlite(n, 1, warm));
        s[11].push(bare_sqlite_indexed(n, warm));
        s[9].push(ours(&rt, n, WRITERS, warm));
        let full = Synchronous::Full;
        if all {
            s[12].push(ours_threads(&rt, n, 1, 0, full));
            s[13].push(ours_threads(&rt, n, WRITERS, 0, full));
        }
        s[14].push(ours_threads(&rt, n, 1, warm, full));
        s[15].push(ours_threads(&rt, n, WRITERS, warm, full));
        if all {
            // Without fsync: what a group costs besides its commit's sync.
            s[16].push(ours_threads(&rt, n, 1, warm, Synchronous::Off));
            s[17].push(ours_threads(&rt, n, WRITERS, warm, Synchronous::Off));
        }
    }
    let mut table = Table::new([
        "side",
        "ops/s: median (min – max)",
        "vs bare rusqlite (same writers unless said)",
    ]);
    for (i, name) in names.iter().enumerate() {
        let (lo, hi) = s[i].range().unwrap_or_default();
        let med = s[i].median().unwrap_or_default();
        let vs = match i {
            0 | 4 | 6 | 12 => ratio(s[i].ratio_to(&s[2])),
            1 | 13 => format!(
                "{} of 8 writers, {} of 1",
                ratio(s[i].ratio_to(&s[3])),
                ratio(s[i].ratio_to(&s[2]))
            ),
            5 | 7 => ratio(s[i].ratio_to(&s[3])),
            8 | 11 | 14 => ratio(s[i].ratio_to(&s[10])),
            9 | 15 => format!("{} of 1 writer", ratio(s[i].ratio_to(&s[10]))),
            16 | 17 => "–".into(),
            _ => "1.00×".into(),
        };
        table.row([
            (*name).to_owned(),
            format!("{} ({} – {})", thousands(med), thousands(lo), thousands(hi)),
            vs,
        ]);
    }
    let steady_one_vs_sqlite = s[8].ratio_to(&s[10]);
    let thread_steady_one_vs_sqlite = s[14].ratio_to(&s[10]);
    let peers = [2, 3, 4, 5];
    let worst_lead = peers
        .iter()
        .filter_map(|&p| s[1].ratio_to(&s[p]))
        .fold(f64::INFINITY, f64::min);
    let best_peer = peers
        .iter()
        .max_by(|&&a, &&b| {
            s[a].median()
                .unwrap_or_default()
                .total_cmp(&s[b].median().unwrap_or_default())
        })
        .map_or("", |&p| names[p]);
    let vs_raw8 = s[1].ratio_to(&s[7]);
    let warm = config.size(WARM_UP, 300);
    let mut body = format!(
        "{n} durable ops per side per run, ~{record_bytes}-byte records, distinct entities, \
         new files; \"steady\" rows first write {warm} ops so the WAL wraps. Tasks call \
         `Outbox::enqueue`, threads `enqueue_blocking`; `synchronous=OFF` rows are not durable \
         (what an enqueue costs besides its fsync).\n\n"
    );
    body.push_str(&table.to_markdown());
    let one = |measured: Option<f64>, target: &str| Target {
        scenario: "1",
        target: target.into(),
        measured: ratio(measured),
        met: measured.is_some_and(|r| r >= 0.9),
        note: Some("A1"),
    };
    let eight = |measured: Option<f64>, target: &str| Target {
        scenario: "1",
        target: target.into(),
        measured: ratio(measured),
        met: measured.is_some_and(|r| r >= 4.0),
        note: Some("A2"),
    };
    let targets = vec![
        one(
            thread_steady_one_vs_sqlite,
            "1 thread, steady ≥ 0.9× bare rusqlite",
        ),
        one(steady_one_vs_sqlite, "1 task, steady ≥ 0.9× bare rusqlite"),
        eight(
            s[1].ratio_to(&s[2]),
            "8 tasks, new files ≥ 4× bare, 1 writer",
        ),
        eight(s[9].ratio_to(&s[10]), "8 tasks, steady ≥ 4× bare, 1 writer"),
        eight(
            s[13].ratio_to(&s[2]),
            "8 threads, new files ≥ 4× bare, 1 writer",
        ),
        eight(
            s[15].ratio_to(&s[10]),
            "8 threads, steady ≥ 4× bare, 1 writer",
        ),
        Target {
            scenario: "1",
            target: "8 tasks ahead of every peer".into(),
            measured: format!(
                "{} the best ({best_peer})",
                ratio(
                    s[1].median()
                        .zip(peers.iter().filter_map(|&p| s[p].median()).reduce(f64::max))
                        .map(|(a, b)| a / b)
                )
            ),
            met: worst_lead > 1.0,
            note: None,
        },
        Target {
            scenario: "1",
            target: "8 tasks ≥ 50 % of raw fdatasync's byte rate (8 per sync)".into(),
            measured: format!("{:.0} %", vs_raw8.unwrap_or_default() * 100.0),
            met: vs_raw8.is_some_and(|r| r >= 0.5),
            note: Some("A3"),
        },
    ];
    Section {
        title: "1. Durable enqueue".into(),
        body,
        targets,
    }
}
