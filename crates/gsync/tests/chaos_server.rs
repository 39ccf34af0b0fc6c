//! The server misbehaves (issue 7): a 503 storm with Retry-After, a network
//! partition, and hostile responses from a raw TCP server (garbage, a 100 MB
//! body, a body dripping a byte a second, invalid JSON under 200, a redirect
//! loop). The runner must retry or fail cleanly, never lose an op, never send
//! before Retry-After, and keep its memory bounded. Every test ends with the
//! six invariants of DESIGN §11 checked against the server's applied log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_invariants, metric, server, server_on, Runner, RunnerOpts, Workload, TOKEN};
use guardian_server::{Faults, RetryAfter, RetryAfterForm};
use guardian_sync::engine::SyncEngine;
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::{HttpTransportConfig, StaticToken};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LONG: Duration = Duration::from_secs(60);

/// 100 % 503 with `Retry-After: 1` for a while, then recovery: the breaker
/// opens and closes again, no request reaches the server before the
/// Retry-After it was given, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_503_with_retry_after_then_recovery() {
    let retry_after = Duration::from_secs(1);
    let server = server(Faults {
        failure_rate: 1.0,
        failure_statuses: vec![503],
        retry_after: Some(RetryAfter {
            seconds: 1,
            form: RetryAfterForm::Seconds,
        }),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "storm").await;
    work.simple(4, 2).await;
    let opts = RunnerOpts::default().args([
        "--retry-base",
        "20ms",
        "--retry-cap",
        "100ms",
        "--max-attempts",
        "1000",
        "--breaker-threshold",
        "3",
        "--breaker-window",
        "10s",
        "--breaker-cooldown",
        "300ms",
    ]);
    let mut r = Runner::spawn("storm", &path, &server.url(), &opts);
    // Watch the server's injected failures: each wave of requests must come
    // at least Retry-After after the previous one.
    let storm_until = Instant::now() + Duration::from_millis(3_500);
    let mut waves: Vec<Instant> = Vec::new();
    let mut last_count = 0;
    while Instant::now() < storm_until {
        let n = metric(&server, "guardian_injected_failures_total");
        if n > last_count {
            let now = Instant::now();
            if waves
                .last()
                .is_none_or(|w| now.duration_since(*w) > retry_after / 2)
            {
                waves.push(now);
            }
            last_count = n;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.set_faults(Faults::default()).unwrap();
    r.expect_success(LONG).await;
    assert!(waves.len() >= 2, "the storm saw {} waves", waves.len());
    for pair in waves.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= retry_after - Duration::from_millis(50),
            "requests came back {gap:?} after a Retry-After of {retry_after:?}"
        );
    }
    let transitions: Vec<(String, String)> = r
        .named("breaker")
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        transitions.iter().any(|(_, to)| to == "open"),
        "the breaker never opened: {transitions:?}"
    );
    assert_eq!(
        transitions.last().map(|(_, to)| to.as_str()),
        Some("closed"),
        "the breaker did not close again: {transitions:?}"
    );
    assert!(r.named("op_failed").is_empty());
    eprintln!(
        "storm: {last_count} injected 503s in {} waves, breaker {transitions:?}",
        waves.len()
    );
    check_invariants(&server, &work).await;
}

/// The server disappears mid-drain (connections refused), then comes back on
/// the same port and database file: the runner waits it out and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let first = server_on(
        &db,
        "127.0.0.1:0",
        Faults {
            latency_ms: 30,
            ..Faults::default()
        },
    )
    .await;
    let addr = first.addr().to_string();
    let url = first.url();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "part").await;
    work.simple(4, 5).await;
    let opts = RunnerOpts::default().args([
        "--retry-base",
        "50ms",
        "--retry-cap",
        "200ms",
        "--max-attempts",
        "1000",
        "--breaker-threshold",
        "5",
        "--breaker-cooldown",
        "300ms",
    ]);
    let mut r = Runner::spawn("part", &path, &url, &opts);
    assert!(r.wait_named("op_succeeded", 3, LONG).await);
    first.shutdown().await;
    // Unreachable: the runner keeps retrying and its breaker opens.
    assert!(
        r.wait_named("op_retried", 5, LONG).await,
        "{:?}",
        r.events()
    );
    assert!(
        r.wait_event(LONG, |e| e["event"] == "breaker" && e["to"] == "open")
            .await
            .is_some(),
        "{:?}",
        r.events()
    );
    let partitioned = r.named("op_succeeded").len();
    let healed = server_on(&db, &addr, Faults::default()).await;
    r.expect_success(LONG).await;
    assert!(r.named("op_succeeded").len() > partitioned);
    assert!(r.named("op_failed").is_empty());
    check_invariants(&healed, &work).await;
}

/// How the raw TCP server answers.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    Garbage,
    HugeBody,
    Drip,
    InvalidJson,
    RedirectLoop,
}

/// A tiny HTTP-ish server on loopback that answers every connection badly.
async fn hostile_server(mode: Hostile) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // Read (part of) the request; its content does not matter.
                let _ = sock.read(&mut buf).await;
                let _ = answer(&mut sock, mode).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn answer(sock: &mut tokio::net::TcpStream, mode: Hostile) -> std::io::Result<()> {
    match mode {
        Hostile::Garbage => {
            sock.write_all(b"\x00\xffGARBAGE \x01\x02 not http at all\r\n\r\n")
                .await
        }
        Hostile::HugeBody => {
            let size: usize = 100 << 20;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
            );
            sock.write_all(head.as_bytes()).await?;
            let chunk = vec![b'7'; 256 * 1024];
            let mut sent = 0;
            while sent < size {
                sock.write_all(&chunk).await?;
                sent += chunk.len();
            }
            Ok(())
        }
        Hostile::Drip => {
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
            )
            .await?;
            loop {
                sock.write_all(b" ").await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Hostile::InvalidJson => {
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"id\": tr",
            )
            .await
        }
        Hostile::RedirectLoop => {
            sock.write_all(
                b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /v1/entities/item\r\ncontent-length: 0\r\n\r\n",
            )
            .await
        }
    }
}

/// Each hostile answer makes the runner (a real `gsync run` process) retry
/// cleanly: no panic, no op lost or failed, memory bounded even against a
/// 100 MB body. Then the real server gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_server_answers_are_retried_cleanly_with_bounded_memory() {
    let real = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "host").await;
    work.simple(3, 1).await;
    let total = work.ops.len() as u64;
    for mode in [
        Hostile::Garbage,
        Hostile::HugeBody,
        Hostile::InvalidJson,
        Hostile::RedirectLoop,
    ] {
        let url = hostile_server(mode).await;
        let opts = RunnerOpts::default().args([
            "--retry-base",
            "20ms",
            "--retry-cap",
            "100ms",
            "--max-attempts",
            "1000",
        ]);
        let mut r = Runner::spawn(&format!("{mode:?}"), &path, &url, &opts);
        let mut peak = 0;
        let deadline = Instant::now() + LONG;
        while r.named("op_retried").len() < 6 {
            peak = peak.max(r.peak_rss_kib().unwrap_or(0));
            assert!(
                Instant::now() < deadline,
                "{mode:?}: no retries: {:?}",
                r.events()
            );
            r.wait_more(r.event_count(), Duration::from_millis(20))
                .await;
        }
        peak = peak.max(r.peak_rss_kib().unwrap_or(0));
        r.kill9().await;
        common::assert_no_panic(&r.stderr());
        assert!(
            r.named("op_succeeded").is_empty(),
            "{mode:?}: {:?}",
            r.events()
        );
        assert!(
            r.named("op_failed").is_empty(),
            "{mode:?}: {:?}",
            r.events()
        );
        let reason = r.named("op_retried")[0]["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        // The 4 MiB response limit keeps a 100 MB body out of memory.
        assert!(peak < 80 * 1024, "{mode:?}: peak RSS {peak} KiB");
        eprintln!(
            "{mode:?}: retried cleanly ({reason}); peak RSS {} MiB",
            peak / 1024
        );
        let stats = work.outbox.stats().await.unwrap();
        assert_eq!(
            stats.pending + stats.in_flight,
            total,
            "{mode:?}: {stats:?}"
        );
        assert_eq!(stats.failed, 0);
    }
    let mut last = Runner::spawn("final", &path, &real.url(), &RunnerOpts::default());
    last.expect_success(LONG).await;
    check_invariants(&real, &work).await;
}

/// A body that drips a byte a second: the request timeout ends the attempt
/// (the engine in-process with a 1 s timeout; `gsync run` uses 30 s), the op
/// is retried, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dripping_body_times_out_and_is_retried() {
    let url = hostile_server(Hostile::Drip).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "drip").await;
    work.simple(2, 0).await;
    let mut http = HttpTransportConfig::new(url);
    http.request_timeout = Duration::from_secs(1);
    let engine = SyncEngine::builder()
        .outbox(work.outbox.clone())
        .http(http)
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .retry(
            RetryPolicy::new(
                Duration::from_secs(2),
                2.0,
                Duration::from_secs(2),
                100,
                Duration::from_secs(10),
            )
            .unwrap(),
        )
        .build()
        .await
        .unwrap();
    let mut events = engine.events();
    let started = Instant::now();
    let report = engine.drain_once().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!((report.succeeded, report.failed), (0, 0), "{report:?}");
    // Every send was cut off and retried. Full jitter may draw a delay short
    // enough for an op to come due again within this drain, so an op may be
    // sent more than once here.
    assert!(
        report.retried >= 2 && report.retried == report.sent,
        "{report:?}"
    );
    let mut reasons = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let guardian_sync::engine::SyncEvent::OpRetried { reason, .. } = e {
            reasons.push(reason);
        }
    }
    assert!(
        elapsed < Duration::from_secs(10),
        "the drip held the drain {elapsed:?}"
    );
    eprintln!("drip: {reasons:?} after {elapsed:?}");
    assert!(
        reasons.iter().all(|r| r.starts_with("timed out")),
        "a body cut off by the timeout must be reported as a timeout: {reasons:?}"
    );
    let stats = work.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed), (2, 0), "{stats:?}");
    // Then the real server gets everything.
    let real = server(Faults::default()).await;
    let mut last = Runner::spawn("final", &path, &real.url(), &RunnerOpts::default());
    last.expect_success(LONG).await;
    check_invariants(&real, &work).await;
}
