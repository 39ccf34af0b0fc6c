//! Throughput of the reference server over loopback: single PUTs and 100-op
//! batches from 16 concurrent clients, and one client sending 100-op batches
//! of CREATEs one after another (the shape of the engine's batched drain),
//! beside a bare axum handler that answers 200 without storage, in the same
//! run. The servers keep no applied-mutations log, as `gsync serve` by
//! default.
//!
//! The PostgreSQL rows run one instance, then two instances on one
//! database with the clients split between them, against a throwaway
//! database on the server `GUARDIAN_BENCH_PG` names (default: the local
//! one, trust auth); they are skipped when none answers.
//!
//! `cargo bench -p guardian-server --bench throughput` (env `BENCH_PUTS`,
//! `BENCH_BATCHES` per client and `BENCH_SEQ_OPS` in all scale the run;
//! `BENCH_ONLY` keeps the server rows whose name contains it).
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

/// Runs `per_client` requests on each of 16 clients, client `c` talking to
/// `bases[c % bases.len()]`, numbered from `first` (so runs on one
/// database never replay each other's keys); returns requests/s.
async fn drive<F>(bases: &[String], first: usize, per_client: usize, make: F) -> f64
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
        let _ = make(&http, &bases[c % bases.len()], c, usize::MAX - c)
            .send()
            .await;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let http = http.clone();
        let base = bases[c % bases.len()].clone();
        tasks.push(tokio::spawn(async move {
            for i in first..first + per_client {
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

/// A throwaway database on the benchmark's PostgreSQL server: its URL, and
/// the maintenance connection that drops it at the end.
async fn pg_database() -> Result<(String, tokio_postgres::Client, String), String> {
    let admin = std::env::var("GUARDIAN_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let connect = tokio_postgres::connect(&admin, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("{admin}: timed out"))?
        .map_err(|e| format!("{admin}: {e}"))?;
    tokio::spawn(conn);
    let name = format!("gsync_bench_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("{sql}: {e:?}"))?;
    }
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Ok((format!("{base}/{name}"), client, name))
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
        let bare_url = vec![bare().await];
        rows.push((
            "bare axum (no storage)".to_owned(),
            drive(&bare_url, 0, puts, put_req).await,
            drive(&bare_url, 0, batches, batch_req).await,
            sequential_creates(&bare_url[0], seq_ops, "bare").await,
        ));
        let mut configs: Vec<(String, Vec<ServerBuilder>)> = vec![
            ("guardian-server, in memory".into(), vec![ServerBuilder::new().in_memory()]),
            ("guardian-server, file WAL sync=NORMAL".into(), vec![ServerBuilder::new().database(dir.path().join("n.db")).synchronous(Synchronous::Normal)]),
            ("guardian-server, file WAL sync=FULL".into(), vec![ServerBuilder::new().database(dir.path().join("f.db"))]),
        ];
        let pg = pg_database().await;
        match &pg {
            Ok((url, _, _)) => {
                configs.push(("guardian-server, PostgreSQL, 1 instance".into(), vec![ServerBuilder::new().postgres(url.clone())]));
                configs.push(("guardian-server, PostgreSQL, 2 instances".into(), vec![ServerBuilder::new().postgres(url.clone()), ServerBuilder::new().postgres(url.clone())]));
            }
            Err(e) => eprintln!("PostgreSQL rows skipped: {e}"),
        }
        // `BENCH_ONLY=sync=FULL` keeps the rows whose name contains it (the
        // bare row always runs: it is the baseline).
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        for (i, (name, builders)) in configs.into_iter().enumerate() {
            if !name.contains(only.as_str()) {
                continue;
            }
            let mut servers = Vec::new();
            for builder in builders {
                // As `gsync serve` runs by default: no applied-mutations log.
                let server = builder
                    .applied_log(false)
                    .token("bench", TOKEN)
                    .concurrency_limit(1024)
                    .request_timeout(Duration::from_secs(120))
                    .bind("127.0.0.1:0")
                    .await
                    .unwrap();
                servers.push(server);
            }
            let urls: Vec<String> = servers.iter().map(guardian_server::RunningServer::url).collect();
            // Each configuration gets its own ids: the PostgreSQL rows share
            // one database.
            let run = format!("seq{i}");
            seed(&urls[0]).await;
            let first = (i + 1) * 1_000_000;
            let p = drive(&urls, first, puts, put_req).await;
            let b = drive(&urls, first, batches, batch_req).await;
            let s = sequential_creates(&urls[0], seq_ops, &run).await;
            rows.push((name, p, b, s));
            for server in servers {
                server.shutdown().await;
            }
        }
        if let Ok((_, client, name)) = pg {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
        println!("\n{CLIENTS} concurrent clients over loopback; {puts} PUTs and {batches} batches of {BATCH} ops per client; then one client sending {seq_ops} CREATEs in {BATCH}-op batches, one request at a time\n");
        println!("| server | single PUT req/s | 100-op batch req/s | batch ops/s | sequential CREATE batches ops/s |");
        println!("|---|---:|---:|---:|---:|");
        for (name, p, b, s) in rows {
            println!("| {name} | {p:.0} | {b:.1} | {:.0} | {s:.0} |", b * BATCH as f64);
        }
    });
}
