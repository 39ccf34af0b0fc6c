//! Throughput of the reference server over loopback: single PUTs and 100-op
//! batches from 16 concurrent clients, and one client sending 100-op batches
//! of CREATEs one after another (the shape of the engine's batched drain),
//! beside a bare axum handler that answers 200 without storage, in the same
//! run.
//!
//! `cargo bench -p guardian-server --bench throughput` (env `BENCH_PUTS`,
//! `BENCH_BATCHES` per client and `BENCH_SEQ_OPS` in all scale the run).
//! Prints a Markdown table.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use axum::routing::{post, put};
use axum::Router;
use guardian_server::{ServerBuilder, Synchronous};
use serde_json::json;

const CLIENTS: usize = 16;
const BATCH: usize = 100;
const TOKEN: &str = "bench-token";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `per_client` requests on each of 16 clients; returns requests/s.
async fn drive<F>(base: &str, per_client: usize, make: F) -> f64
where
    F: Fn(&reqwest::Client, &str, usize, usize) -> reqwest::RequestBuilder
        + Send
        + Sync
        + Copy
        + 'static,
{
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    // Warm-up: open the connections.
    for c in 0..CLIENTS {
        let _ = make(&http, base, c, usize::MAX - c).send().await;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let http = http.clone();
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let resp = make(&http, &base, c, i).send().await.unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                let _ = resp.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (CLIENTS * per_client) as f64 / start.elapsed().as_secs_f64()
}

fn put_req(http: &reqwest::Client, base: &str, client: usize, i: usize) -> reqwest::RequestBuilder {
    http.put(format!("{base}/v1/entities/bench/c{client}"))
        .bearer_auth(TOKEN)
        .header("idempotency-key", format!("p-{client}-{i}"))
        .json(&json!({"data": {"n": i, "name": "sensor", "tags": ["a", "b"]}}))
}

fn batch_req(
    http: &reqwest::Client,
    base: &str,
    client: usize,
    i: usize,
) -> reqwest::RequestBuilder {
    let ops: Vec<_> = (0..BATCH)
        .map(|j| {
            json!({"op": "update", "type": "bench", "id": format!("c{client}-{j}"),
                   "data": {"n": i, "name": "sensor", "tags": ["a", "b"]},
                   "idempotency_key": format!("b-{client}-{i}-{j}")})
        })
        .collect();
    http.post(format!("{base}/v1/batch"))
        .bearer_auth(TOKEN)
        .json(&json!({"ops": ops}))
}

/// One client sends `n` CREATEs of new entities in 100-op batches, one
/// request at a time; returns ops/s.
async fn sequential_creates(base: &str, n: usize, run: &str) -> f64 {
    let http = reqwest::Client::new();
    let bodies: Vec<Vec<u8>> = (0..n.div_ceil(BATCH))
        .map(|b| {
            let ops: Vec<_> = (b * BATCH..((b + 1) * BATCH).min(n))
                .map(|i| {
                    json!({"op": "create", "type": "device", "id": format!("{run}-{i:07}"),
                           "data": {"on": i % 2 == 0, "level": i % 100, "room": "living-room", "scene": "evening"},
                           "idempotency_key": format!("{run}-key-{i:07}")})
                })
                .collect();
            serde_json::to_vec(&json!({"ops": ops})).unwrap()
        })
        .collect();
    let start = Instant::now();
    for body in bodies {
        let resp = http
            .post(format!("{base}/v1/batch"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let _ = resp.bytes().await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn seed(base: &str) {
    let http = reqwest::Client::new();
    let mut ops = Vec::new();
    for c in 0..CLIENTS {
        ops.push(json!({"op": "create", "type": "bench", "id": format!("c{c}"), "data": {}, "idempotency_key": format!("s-{c}")}));
        for j in 0..BATCH {
            ops.push(json!({"op": "create", "type": "bench", "id": format!("c{c}-{j}"), "data": {}, "idempotency_key": format!("s-{c}-{j}")}));
        }
    }
    for chunk in ops.chunks(1000) {
        let r = http
            .post(format!("{base}/v1/batch"))
            .bearer_auth(TOKEN)
            .json(&json!({"ops": chunk}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}

async fn bare() -> String {
    let app = Router::new()
        .route(
            "/v1/entities/{type}/{id}",
            put(|_b: axum::body::Bytes| async { "ok" }),
        )
        .route("/v1/batch", post(|_b: axum::body::Bytes| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // expects a quick run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let puts = env_or("BENCH_PUTS", if quick { 5 } else { 300 });
    let batches = env_or("BENCH_BATCHES", if quick { 1 } else { 20 });
    let seq_ops = env_or("BENCH_SEQ_OPS", if quick { 200 } else { 10_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut rows = Vec::new();
        let bare_url = bare().await;
        rows.push((
            "bare axum (no storage)",
            drive(&bare_url, puts, put_req).await,
            drive(&bare_url, batches, batch_req).await,
            sequential_creates(&bare_url, seq_ops, "bare").await,
        ));
        let configs: [(&str, ServerBuilder); 3] = [
            ("guardian-server, in memory", ServerBuilder::new().in_memory()),
            ("guardian-server, file WAL sync=NORMAL", ServerBuilder::new().database(dir.path().join("n.db")).synchronous(Synchronous::Normal)),
            ("guardian-server, file WAL sync=FULL", ServerBuilder::new().database(dir.path().join("f.db"))),
        ];
        for (name, builder) in configs {
            let server = builder
                .token("bench", TOKEN)
                .concurrency_limit(1024)
                .request_timeout(Duration::from_secs(120))
                .bind("127.0.0.1:0")
                .await
                .unwrap();
            seed(&server.url()).await;
            let p = drive(&server.url(), puts, put_req).await;
            let b = drive(&server.url(), batches, batch_req).await;
            let s = sequential_creates(&server.url(), seq_ops, "seq").await;
            rows.push((name, p, b, s));
            server.shutdown().await;
        }
        println!("\n{CLIENTS} concurrent clients over loopback; {puts} PUTs and {batches} batches of {BATCH} ops per client; then one client sending {seq_ops} CREATEs in {BATCH}-op batches, one request at a time\n");
        println!("| server | single PUT req/s | 100-op batch req/s | batch ops/s | sequential CREATE batches ops/s |");
        println!("|---|---:|---:|---:|---:|");
        for (name, p, b, s) in rows {
            println!("| {name} | {p:.0} | {b:.1} | {:.0} | {s:.0} |", b * BATCH as f64);
        }
    });
}
