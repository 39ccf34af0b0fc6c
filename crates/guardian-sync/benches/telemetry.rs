//! Cost of recording telemetry (target: < 100 ns per record), without a
//! `metrics` recorder installed (the facade's no-op path) and single- vs
//! two-threaded for the latency histogram's mutex.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use guardian_sync::telemetry::{Counter, SyncMetrics};

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("telemetry");
    g.throughput(Throughput::Elements(1));
    let m = SyncMetrics::new();

    g.bench_function("incr_counter", |b| {
        b.iter(|| m.incr(black_box(Counter::Sent)));
    });
    g.bench_function("incr_outcome_counter", |b| {
        b.iter(|| m.incr(black_box(Counter::Succeeded)));
    });
    let mut us = 0u64;
    g.bench_function("record_latency", |b| {
        b.iter(|| {
            us = (us + 7_919) % 2_000_000;
            m.record_latency(black_box(Duration::from_micros(us)));
        });
    });
    g.bench_function("set_queue_depth", |b| {
        b.iter(|| m.set_queue_depth(black_box(42)));
    });
    g.bench_function("summary", |b| b.iter(|| black_box(m.summary())));

    // Contended: another thread records latencies as fast as it can.
    let shared = Arc::new(SyncMetrics::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                shared.record_latency(Duration::from_millis(3));
                shared.incr(Counter::Succeeded);
            }
        })
    };
    g.bench_function("record_latency_contended", |b| {
        b.iter(|| shared.record_latency(black_box(Duration::from_millis(5))));
    });
    g.bench_function("incr_outcome_counter_contended", |b| {
        b.iter(|| shared.incr(black_box(Counter::Succeeded)));
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    other.join().unwrap();
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = record
}
criterion_main!(benches);
