//! Throughput of the reference server over loopback: single PUTs and 100-op
//! batches from 16 concurrent clients, beside a bare axum handler that
//! answers 200 without storage, in the same run.
//!
//! `cargo bench -p guardian-server` (env `BENCH_PUTS`, `BENCH_BATCHES` per
//! client scale the run). Prints a Markdown table.
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut rows = Vec::new();
        let bare_url = bare().await;
        rows.push(("bare axum (no storage)", drive(&bare_url, puts, put_req).await, drive(&bare_url, batches, batch_req).await));
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
            rows.push((name, p, b));
            server.shutdown().await;
        }
        println!("\n{CLIENTS} concurrent clients over loopback; {puts} PUTs and {batches} batches of {BATCH} ops per client\n");
        println!("| server | single PUT req/s | 100-op batch req/s | batch ops/s |");
        println!("|---|---:|---:|---:|");
        for (name, p, b) in rows {
            println!("| {name} | {p:.0} | {b:.1} | {:.0} |", b * BATCH as f64);
        }
    });
}
