//! Benchmark (not a test): one enqueue through the C ABI
//! (`gs_engine_enqueue`, JSON in, op id out) against the Rust
//! `SyncEngine::enqueue_blocking` in the same run, on two outboxes in one
//! temporary directory, rounds interleaved so both see the same disk.
//!
//! `cargo run --release -p guardian-sync-ffi --example enqueue_bench [OPS_PER_ROUND] [ROUNDS]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{c_char, CString};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardian_sync::engine::SyncEngine;
use guardian_sync::op::NewOp;
use guardian_sync::transport::StaticToken;
use guardian_sync_ffi::{
    gs_engine_close, gs_engine_enqueue, gs_engine_open, gs_string_free, GsEngine, GsStatus,
};
use serde_json::json;

fn main() {
    let mut args = std::env::args().skip(1);
    let per_round: usize = args
        .next()
        .map_or(500, |a| a.parse().expect("OPS_PER_ROUND"));
    let rounds: usize = args.next().map_or(4, |a| a.parse().expect("ROUNDS"));
    let dir = tempfile::tempdir().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let rust = rt
        .block_on(
            SyncEngine::builder()
                .outbox_path(dir.path().join("rust.db"))
                .server("http://127.0.0.1:9")
                .token_provider(Arc::new(StaticToken::new("t")))
                .build(),
        )
        .unwrap();

    let config = CString::new(
        json!({
            "outbox_path": dir.path().join("c.db"),
            "server_url": "http://127.0.0.1:9",
            "token": "t",
        })
        .to_string(),
    )
    .unwrap();
    let mut c: *mut GsEngine = ptr::null_mut();
    // SAFETY: a valid NUL-terminated config and a writable out-pointer.
    let opened = unsafe { gs_engine_open(config.as_ptr(), &mut c) };
    assert_eq!(opened, GsStatus::Ok);

    let (mut rust_t, mut c_t) = (Duration::ZERO, Duration::ZERO);
    let mut n = 0usize;
    for round in 0..rounds {
        let t = Instant::now();
        for i in 0..per_round {
            let op = NewOp::create(
                "note",
                format!("r{round}-{i}"),
                json!({"i": i, "text": "hello"}),
            );
            rust.enqueue_blocking(op).unwrap();
        }
        rust_t += t.elapsed();

        let t = Instant::now();
        for i in 0..per_round {
            // The app's side of the call: build the JSON, pass it, free the id.
            let op = CString::new(
                json!({"kind": "create", "entity_type": "note", "entity_id": format!("c{round}-{i}"),
                       "payload": {"i": i, "text": "hello"}})
                .to_string(),
            )
            .unwrap();
            let mut id: *mut c_char = ptr::null_mut();
            // SAFETY: `c` is open, `op` is NUL-terminated, `id` is writable.
            let status = unsafe { gs_engine_enqueue(c, op.as_ptr(), &mut id) };
            assert_eq!(status, GsStatus::Ok);
            // SAFETY: `id` came from the library and is freed once.
            unsafe { gs_string_free(id) };
        }
        c_t += t.elapsed();
        n += per_round;
    }
    // SAFETY: `c` is open and nothing else uses it.
    let closed = unsafe { gs_engine_close(c) };
    assert_eq!(closed, GsStatus::Ok);

    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!("ops per path: {n} ({rounds} interleaved rounds), synchronous=FULL");
    println!("rust enqueue_blocking: {:8.1} us/op", per(rust_t));
    println!("C ABI gs_engine_enqueue: {:6.1} us/op", per(c_t));
    println!("ratio C/Rust: {:.3}", per(c_t) / per(rust_t));
}
