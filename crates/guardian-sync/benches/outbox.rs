//! Outbox benchmarks: `cargo bench -p guardian-sync --bench outbox`.
//!
//! - enqueue at `synchronous=FULL` with 1 and 8 concurrent enqueuers, beside a
//!   bare rusqlite INSERT loop (one autocommit transaction per row, same
//!   pragmas) measured in the same run;
//! - the same with coalescing off, and from plain threads through
//!   `enqueue_blocking`;
//! - claim + ack throughput;
//! - open-to-first-ready-op with 1,000,000 pending ops (file built by a
//!   bulk insert, not through enqueue). Peak RSS of the whole bench process
//!   is printed at the end (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use rusqlite::params;
use serde_json::json;
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn payload(i: u64) -> serde_json::Value {
    json!({"name": format!("device {i}"), "on": i.is_multiple_of(2), "level": i % 100})
}

fn bench_enqueue(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("enqueue_full");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));

    // Bare loop: same pragmas, one INSERT per transaction.
    {
        let path = dir.path().join("bare.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, op_id TEXT UNIQUE, \
             idempotency_key TEXT, entity_type TEXT, entity_id TEXT, payload TEXT, state TEXT, \
             next_attempt_at INTEGER)",
        )
        .unwrap();
        let mut i = 0u64;
        group.bench_function("bare_insert_loop", |b| {
            b.iter(|| {
                i += 1;
                conn.prepare_cached(
                    "INSERT INTO ops (op_id, idempotency_key, entity_type, entity_id, payload, \
                     state, next_attempt_at) VALUES (?1, ?2, 'device', ?3, ?4, 'pending', 0)",
                )
                .unwrap()
                .execute(params![
                    Uuid::now_v7().to_string(),
                    Uuid::new_v4().to_string(),
                    format!("d{i}"),
                    payload(i).to_string()
                ])
                .unwrap();
            });
        });
    }

    for (name, coalesce) in [("outbox", true), ("outbox_no_coalesce", false)] {
        let path = dir.path().join(format!("{name}.db"));
        let (outbox, _) = rt
            .block_on(Outbox::open(
                &path,
                OutboxOptions::default().coalesce(coalesce),
            ))
            .unwrap();
        for enqueuers in [1u64, 8] {
            let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{enqueuers}_enqueuers")),
                &enqueuers,
                |b, &enqueuers| {
                    b.iter_custom(|iters| {
                        let outbox = outbox.clone();
                        let counter = counter.clone();
                        rt.block_on(async move {
                            let start = Instant::now();
                            let per = iters.div_ceil(enqueuers);
                            let mut tasks = Vec::new();
                            for _ in 0..enqueuers {
                                let o = outbox.clone();
                                let counter = counter.clone();
                                tasks.push(tokio::spawn(async move {
                                    for _ in 0..per {
                                        let i = counter
                                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        o.enqueue(NewOp::create(
                                            "device",
                                            format!("d{i}"),
                                            payload(i),
                                        ))
                                        .await
                                        .unwrap();
                                    }
                                }));
                            }
                            for t in tasks {
                                t.await.unwrap();
                            }
                            // Report per-op time for exactly `iters` ops.
                            start
                                .elapsed()
                                .mul_f64(iters as f64 / (per * enqueuers) as f64)
                        })
                    });
                },
            );
        }
        rt.block_on(outbox.close());
    }

    // The same from plain threads through `enqueue_blocking` (FFI bindings,
    // sync apps): a lone caller commits on its own thread.
    {
        let path = dir.path().join("blocking.db");
        let (outbox, _) = rt
            .block_on(Outbox::open(&path, OutboxOptions::default()))
            .unwrap();
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for enqueuers in [1u64, 8] {
            group.bench_with_input(
                BenchmarkId::new("outbox_blocking", format!("{enqueuers}_enqueuers")),
                &enqueuers,
                |b, &enqueuers| {
                    b.iter_custom(|iters| {
                        let per = iters.div_ceil(enqueuers);
                        let start = Instant::now();
                        let threads: Vec<_> = (0..enqueuers)
                            .map(|_| {
                                let o = outbox.clone();
                                let counter = counter.clone();
                                std::thread::spawn(move || {
                                    for _ in 0..per {
                                        let i = counter
                                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        o.enqueue_blocking(NewOp::create(
                                            "device",
                                            format!("b{i}"),
                                            payload(i),
                                        ))
                                        .unwrap();
                                    }
                                })
                            })
                            .collect();
                        for t in threads {
                            t.join().unwrap();
                        }
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per * enqueuers) as f64)
                    });
                },
            );
        }
        rt.block_on(outbox.close());
    }
    group.finish();
}

fn bench_claim_ack(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drain.db");
    let (outbox, _) = rt
        .block_on(Outbox::open(&path, OutboxOptions::default()))
        .unwrap();
    let fence = rt
        .block_on(outbox.lock_acquire("bench", None))
        .unwrap()
        .unwrap();
    let mut group = c.benchmark_group("drain_full");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for batch in [1usize, 32] {
        group.bench_with_input(
            BenchmarkId::new("claim_ack", format!("batch_{batch}")),
            &batch,
            |b, &batch| {
                b.iter_custom(|iters| {
                    let outbox = outbox.clone();
                    let fence = fence.clone();
                    let next = next.clone();
                    rt.block_on(async move {
                        // Fill (not timed).
                        let rounds = iters.div_ceil(batch as u64);
                        let fill = rounds * batch as u64;
                        let mut tasks = Vec::new();
                        for w in 0..8u64 {
                            let o = outbox.clone();
                            let next = next.clone();
                            tasks.push(tokio::spawn(async move {
                                for _ in (w..fill).step_by(8) {
                                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    o.enqueue(NewOp::create("device", format!("q{i}"), payload(i)))
                                        .await
                                        .unwrap();
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                        let start = Instant::now();
                        for _ in 0..rounds {
                            let ops = outbox
                                .fenced(&fence)
                                .claim_ready(batch, i64::MAX)
                                .await
                                .unwrap();
                            // Acks of one batch arrive together: they share commits.
                            let acks = ops.iter().map(|op| {
                                outbox
                                    .fenced(&fence)
                                    .ack(op.op_id, guardian_sync::op::Ack::default())
                            });
                            for r in futures::future::join_all(acks).await {
                                r.unwrap();
                            }
                        }
                        start.elapsed().mul_f64(iters as f64 / fill as f64)
                    })
                });
            },
        );
    }
    group.finish();
    rt.block_on(outbox.close());
}

/// Builds an outbox with `n` pending ops of distinct entities by a bulk insert.
fn build_big(path: &Path, n: u64, rt: &tokio::runtime::Runtime) {
    let (outbox, _) = rt
        .block_on(Outbox::open(path, OutboxOptions::default()))
        .unwrap();
    rt.block_on(outbox.close());
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, payload, \
                 envelope_version, state, is_head, attempts, next_attempt_at, created_at, updated_at) \
                 VALUES (?1, ?2, 'update', 'device', ?3, ?4, 1, 'pending', 1, 0, ?5, ?5, ?5)",
            )
            .unwrap();
        let now = 1_700_000_000_000i64;
        for i in 0..n {
            stmt.execute(params![
                Uuid::now_v7().to_string(),
                Uuid::new_v4().to_string(),
                format!("d{i}"),
                payload(i).to_string(),
                now + i64::try_from(i).unwrap()
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
}

fn bench_open_big(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let n = 1_000_000;
    let t = Instant::now();
    build_big(&path, n, &rt);
    eprintln!(
        "built {n} pending ops in {:?} ({} MB)",
        t.elapsed(),
        std::fs::metadata(&path).unwrap().len() / 1_000_000
    );
    let mut group = c.benchmark_group("open_1m_pending");
    group.sample_size(20);
    // Open alone: the start-up path (probe, requeue check, upcast check).
    group.bench_function("open_only", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let (outbox, _) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
                    total += start.elapsed();
                    outbox.close().await;
                }
                total
            })
        });
    });
    // Open, take the lock and claim the first ready op: two fsynced commits.
    group.bench_function("open_to_first_ready", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let (outbox, _) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
                    let fence = outbox.lock_acquire("bench", None).await.unwrap().unwrap();
                    let ops = outbox
                        .fenced(&fence)
                        .claim_ready(1, i64::MAX)
                        .await
                        .unwrap();
                    total += start.elapsed();
                    assert_eq!(ops.len(), 1);
                    // Give it back, so every iteration sees the same file.
                    outbox
                        .fenced(&fence)
                        .retry_later(ops[0].op_id, 0, "bench")
                        .await
                        .unwrap();
                    outbox.close().await;
                }
                total
            })
        });
    });
    group.finish();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        {
            eprintln!("bench process {line}");
        }
    }
}

criterion_group!(benches, bench_enqueue, bench_claim_ack, bench_open_big);
criterion_main!(benches);
