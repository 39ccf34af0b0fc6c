//! Scenario 1: durable enqueue, each op durable when the call returns.
//!
//! Ours (1 and 8 concurrent enqueuers, `synchronous=FULL`) beside the peers
//! an app would otherwise use at the same durability: a bare rusqlite INSERT
//! loop with the same pragmas (WAL, FULL), the `queue-file` crate (Square's
//! Tape; `sync_writes` on, its default: data and header `fdatasync`ed per
//! add), and raw `pwrite + fdatasync` of the same bytes into a preallocated
//! file (the physical limit; 8 records per sync for the batch limit).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use guardian_bench::report::{ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions};
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

fn ours(rt: &tokio::runtime::Runtime, n: usize, writers: usize) -> f64 {
    let dir = scratch("bench-enqueue-ours");
    rt.block_on(async {
        let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
            .await
            .expect("open outbox");
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

fn bare_sqlite(n: usize, writers: usize) -> f64 {
    let dir = scratch("bench-enqueue-sqlite");
    let path = dir.path().join("bare.db");
    sqlite_conn(&path)
        .execute_batch(
            "CREATE TABLE ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, op_id TEXT NOT NULL UNIQUE, \
             idempotency_key TEXT NOT NULL, kind TEXT NOT NULL, entity_type TEXT NOT NULL, \
             entity_id TEXT NOT NULL, payload TEXT NOT NULL, created_at INTEGER NOT NULL)",
        )
        .expect("schema");
    let per = n / writers;
    let barrier = Arc::new(Barrier::new(writers + 1));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let barrier = barrier.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                let conn = sqlite_conn(&path);
                let mut stmt = conn
                    .prepare(
                        "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, \
                         payload, created_at) VALUES (?1, ?2, 'update', 'device', ?3, ?4, ?5)",
                    )
                    .expect("prepare");
                barrier.wait();
                for k in 0..per {
                    let i = w * per + k;
                    stmt.execute(params![
                        Uuid::now_v7().to_string(),
                        Uuid::new_v4().to_string(),
                        entity_id("sqlite", i),
                        payload(i).to_string(),
                        i64::try_from(i).unwrap_or_default(),
                    ])
                    .expect("insert");
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join().expect("writer thread");
    }
    rate(per * writers, start.elapsed())
}

fn queue_file(n: usize, writers: usize) -> f64 {
    let dir = scratch("bench-enqueue-qf");
    let mut qf = queue_file::QueueFile::open(dir.path().join("tape.qf")).expect("open queue file");
    qf.set_sync_writes(true);
    let qf = Arc::new(Mutex::new(qf));
    let per = n / writers;
    let barrier = Arc::new(Barrier::new(writers + 1));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let barrier = barrier.clone();
            let qf = qf.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for k in 0..per {
                    let bytes = record("qf", w * per + k);
                    qf.lock().expect("queue lock").add(&bytes).expect("add");
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join().expect("writer thread");
    }
    rate(per * writers, start.elapsed())
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
        "ours, 1 enqueuer",
        "ours, 8 enqueuers",
        "bare rusqlite INSERT, 1 writer",
        "bare rusqlite INSERT, 8 writers (8 connections)",
        "queue-file (Tape), 1 writer",
        "queue-file (Tape), 8 writers (shared Mutex)",
        "raw pwrite + fdatasync, 1 record per sync",
        "raw pwrite + fdatasync, 8 records per sync",
    ];
    let mut s: Vec<Samples> = vec![Samples::new(); names.len()];
    let record_bytes = record("raw", 0).len();
    for run in 0..config.runs {
        eprintln!("enqueue: run {}/{}", run + 1, config.runs);
        s[0].push(ours(&rt, n, 1));
        s[2].push(bare_sqlite(n, 1));
        s[4].push(queue_file(n, 1));
        s[6].push(raw_fdatasync(n, 1));
        s[1].push(ours(&rt, n, WRITERS));
        s[3].push(bare_sqlite(n, WRITERS));
        s[5].push(queue_file(n, WRITERS));
        s[7].push(raw_fdatasync(n, WRITERS));
    }
    let mut table = Table::new([
        "side",
        "ops/s (median)",
        "min – max",
        "KiB/s of op records",
        "vs bare rusqlite, same writers",
    ]);
    for (i, name) in names.iter().enumerate() {
        let (lo, hi) = s[i].range().unwrap_or_default();
        let med = s[i].median().unwrap_or_default();
        let vs = match i {
            0 | 4 | 6 => ratio(s[i].ratio_to(&s[2])),
            1 | 5 | 7 => ratio(s[i].ratio_to(&s[3])),
            _ => "1.00×".into(),
        };
        table.row([
            (*name).to_owned(),
            thousands(med),
            format!("{} – {}", thousands(lo), thousands(hi)),
            thousands(med * record_bytes as f64 / 1024.0),
            vs,
        ]);
    }
    let one_vs_sqlite = s[0].ratio_to(&s[2]);
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
    let group_gain = s[1].ratio_to(&s[0]);
    let mut body = format!(
        "{n} ops per side per run, each durable when the call returns \
         (`synchronous=FULL` in WAL mode for SQLite; `fdatasync` for the others). Records are ~{record_bytes} bytes \
         (op id, idempotency key, kind, type, id, a 4-field JSON payload); every op is a \
         distinct entity, so coalescing never applies. Files live in the system temp dir \
         (ext4 on the same disk as the repository). `strace -c` of a run shows SQLite (ours \
         and bare) issuing one `fsync()` per commit, queue-file two `fdatasync()` per add (data, \
         then header) and the raw loop one `fdatasync()` per sync. Group commit lifts ours from 1 to 8 \
         enqueuers by {} (median of per-run ratios).\n\n",
        ratio(group_gain)
    );
    body.push_str(&table.to_markdown());
    let targets = vec![
        Target {
            scenario: "1 enqueue",
            target: "1 enqueuer ≥ 0.9× bare rusqlite (issue 2)".into(),
            measured: ratio(one_vs_sqlite),
            met: one_vs_sqlite.is_some_and(|r| r >= 0.9),
            why: "when fsync is fast (~0.15 ms on a quiet machine) what each commit writes shows: \
                  an enqueue of a new entity dirties 4 b-tree pages (the row, the op_id unique \
                  index, `ops_entity`, `ops_ready`; schema 3 no longer rewrites \
                  `sqlite_sequence`), the bare loop 3 (row, unique index, its AUTOINCREMENT \
                  sequence), and every dirty page is a WAL frame written and fsynced (~20 µs \
                  each here); each op also crosses to the writer thread and back (two thread \
                  wake-ups; a writer that spins briefly for the next job instead of sleeping \
                  measured slower on this shared 2-core machine). The per-entity and ready \
                  indexes are what keep claims and coalescing index-only, so the rest of the \
                  gap needs a different layout (an append log in front of SQLite), not fewer \
                  indexes. With slower fsync the fixed costs shrink relatively (0.91–0.94× \
                  at 1.4–6 ms per fsync, outbox bench)"
                .into(),
        },
        Target {
            scenario: "1 enqueue",
            target: "8 enqueuers ≥ 5× one enqueuer (issue 2)".into(),
            measured: ratio(group_gain),
            met: group_gain.is_some_and(|r| r >= 5.0),
            why: "groups are full (the writer stops gathering as soon as as many callers as \
                  the last group had have joined; 99 of 102 groups held all 8 in a traced run), \
                  but a group of 8 ops on 8 distinct entities dirties about three times the \
                  pages of a lone op (8 `ops_entity` leaves of 8 key ranges, more table and \
                  op_id pages) and runs its 8 jobs one after another on the writer thread, so \
                  on a fast disk a group commit costs ~2× a single one and 8 callers gain \
                  ~4×; the gain grows with fsync latency (7.7× at ~6 ms per fsync in the \
                  outbox bench)"
                .into(),
        },
        Target {
            scenario: "1 enqueue",
            target: "8 enqueuers ahead of every peer".into(),
            measured: format!(
                "{} the best peer ({best_peer})",
                ratio(
                    s[1].median()
                        .zip(peers.iter().filter_map(|&p| s[p].median()).reduce(f64::max))
                        .map(|(a, b)| a / b)
                )
            ),
            met: worst_lead > 1.0,
            why: "group commit should put 8 ops in each fsync; if a peer is ahead, the \
                  writer thread is CPU-bound on this loaded 2-core machine"
                .into(),
        },
        Target {
            scenario: "1 enqueue",
            target: "8 enqueuers ≥ 50 % of the fdatasync-limited byte rate (8 records per sync)"
                .into(),
            measured: format!("{:.0} %", vs_raw8.unwrap_or_default() * 100.0),
            met: vs_raw8.is_some_and(|r| r >= 0.5),
            why: "a SQLite WAL commit writes a whole 4 KiB page per touched b-tree page plus \
                  frame headers (for 8 ops on 8 entities about 10 pages: table, op_id index, \
                  8 `ops_entity` leaves, `ops_ready`), not ~1.8 KiB of \
                  records, and the 8 ops run one after another on the single writer thread; \
                  closing it needs a dedicated append log in front of SQLite"
                .into(),
        },
    ];
    Section {
        title: "1. Durable enqueue".into(),
        body,
        targets,
    }
}
