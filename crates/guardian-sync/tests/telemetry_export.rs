//! Telemetry export against the real reference server on loopback: the
//! runner's snapshots reach `/v1/telemetry`, carry its state (never a
//! payload) and follow a breaker trip; export can be turned off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use guardian_server::{Faults, RunningServer, ServerBuilder};
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::engine::{SyncEngine, SyncEngineBuilder};
use guardian_sync::op::NewOp;
use guardian_sync::retry::RetryPolicy;
use guardian_sync::telemetry::TelemetryConfig;
use guardian_sync::transport::StaticToken;
use serde_json::{json, Value};

const TOKEN: &str = "tok-a";
const ADMIN: &str = "adm";
const SENTINEL: &str = "payload-sentinel-7f3a";

async fn server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .admin_token(ADMIN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

fn builder(dir: &tempfile::TempDir, server: &RunningServer) -> SyncEngineBuilder {
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .server(server.url())
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .owner_id("phone-7")
        .concurrency(1)
        .retry(
            RetryPolicy::new(
                Duration::from_millis(5),
                2.0,
                Duration::from_millis(50),
                1000,
                Duration::from_secs(600),
            )
            .unwrap(),
        )
        .breaker(BreakerConfig {
            policy: TripPolicy::Count { failures: 2 },
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
            ..BreakerConfig::default()
        })
}

fn fast_telemetry() -> TelemetryConfig {
    TelemetryConfig {
        labels: BTreeMap::from([("app".to_owned(), "field-notes".to_owned())]),
        min_interval: Duration::from_millis(50),
        keepalive: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        ..TelemetryConfig::default()
    }
}

async fn fleet_text(server: &RunningServer) -> String {
    reqwest::Client::new()
        .get(format!("{}/dashboard/state", server.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls the server's fleet (bounded) until `pred` holds for device `phone-7`.
async fn wait_for_device(
    server: &RunningServer,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for_device_within(server, what, Duration::from_secs(20), pred).await
}

async fn wait_for_device_within(
    server: &RunningServer,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let state: Value = serde_json::from_str(&fleet_text(server).await).unwrap();
        let device = state["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["runner_id"] == "phone-7")
            .cloned();
        if let Some(d) = device.filter(|d| pred(d)) {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never saw {what}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_runner_reports_its_health_and_a_breaker_trip() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .telemetry(fast_telemetry())
        .build()
        .await
        .unwrap();
    // A dead letter (404: the entity never existed) and five good ops, all
    // carrying a payload that must never reach the telemetry.
    engine
        .enqueue(NewOp::update("note", "ghost", json!({"s": SENTINEL})))
        .await
        .unwrap();
    for i in 0..5 {
        engine
            .enqueue(NewOp::create(
                "note",
                format!("n{i}"),
                json!({"s": SENTINEL}),
            ))
            .await
            .unwrap();
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    // A snapshot is not read in one instant: the counters may lead the
    // last sync by the few steps that publish an ack group.
    let d = wait_for_device(&server, "the drained queue", |d| {
        d["succeeded"] == 5
            && d["queue"]["failed"] == 1
            && d["queue"]["pending"] == 0
            && !d["last_sync_at"].is_null()
    })
    .await;
    assert_eq!(d["tenant"], "tenant-a");
    assert_eq!(d["labels"]["app"], "field-notes");
    assert_eq!(d["breaker"], "closed");
    assert!(d["latency_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(d["latency_p95_ms"].as_f64().unwrap() >= d["latency_p50_ms"].as_f64().unwrap());
    assert!(d["last_sync_at"].as_i64().unwrap() > 0);
    let reasons = d["last_failures"].as_array().unwrap();
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].as_str().unwrap().contains("404"), "{reasons:?}");

    // The server fails everything: two failures open the breaker, and the
    // next snapshot says so.
    server
        .set_faults(Faults {
            failure_rate: 1.0,
            failure_statuses: vec![503],
            ..Faults::default()
        })
        .unwrap();
    for i in 0..3 {
        engine
            .enqueue(NewOp::create(
                "note",
                format!("late{i}"),
                json!({"s": SENTINEL}),
            ))
            .await
            .unwrap();
    }
    let d = wait_for_device(&server, "the open breaker", |d| d["breaker"] == "open").await;
    assert_eq!(d["breaker_trips"], 1);
    assert!(
        d["queue"]["pending"].as_u64().unwrap() + d["queue"]["in_flight"].as_u64().unwrap() >= 2
    );
    assert!(d["health_score"].as_u64().unwrap() < 100);
    assert!(
        !fleet_text(&server).await.contains(SENTINEL),
        "a payload leaked into telemetry"
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), runner)
        .await
        .expect("runner did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn export_can_be_turned_off() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server).no_telemetry().build().await.unwrap();
    engine
        .enqueue(NewOp::create("note", "n", json!({})))
        .await
        .unwrap();
    // Runs long enough for several snapshots at the fast interval had
    // export been on (absence cannot be polled for).
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        engine.run(std::future::pending()),
    )
    .await;
    assert_eq!(server.applied_log().await.unwrap().len(), 1);
    assert_eq!(server.requests_on("/v1/telemetry"), 0);

    // The same run with export on (the default) reports.
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .telemetry(fast_telemetry())
        .build()
        .await
        .unwrap();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        engine.run(std::future::pending()),
    )
    .await;
    assert!(server.requests_on("/v1/telemetry") > 0);
}

/// A breaker trip is exported at once, not after `min_interval`: with a
/// minute between ordinary snapshots, the server still sees the open breaker
/// within a second of the engine's event (before the breaker interval
/// existed it waited the whole minute).
#[tokio::test]
async fn a_breaker_trip_is_exported_without_waiting_for_the_minimum_interval() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .telemetry(TelemetryConfig {
            min_interval: Duration::from_secs(60),
            keepalive: Duration::from_secs(60),
            ..fast_telemetry()
        })
        .build()
        .await
        .unwrap();
    let mut events = engine.events();
    let runner = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(std::future::pending()).await })
    };
    wait_for_device(&server, "the first snapshot", |d| d["breaker"] == "closed").await;
    server
        .set_faults(Faults {
            failure_rate: 1.0,
            failure_statuses: vec![503],
            ..Faults::default()
        })
        .unwrap();
    for i in 0..3 {
        engine
            .enqueue(NewOp::create("note", format!("n{i}"), json!({})))
            .await
            .unwrap();
    }
    let tripped = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(guardian_sync::engine::SyncEvent::Breaker { to, .. }) = events.recv().await {
                if to.name() == "open" {
                    return std::time::Instant::now();
                }
            }
        }
    })
    .await
    .expect("the breaker never opened");
    let d = wait_for_device_within(&server, "the open breaker", Duration::from_secs(1), |d| {
        d["breaker"] == "open"
    })
    .await;
    eprintln!("breaker trip on the server after {:?}", tripped.elapsed());
    assert_eq!(d["breaker_trips"], 1);
    runner.abort();
}

/// With an endpoint of its own, telemetry goes there and never to the sync
/// server.
#[tokio::test]
async fn telemetry_goes_to_its_own_endpoint() {
    let data = server().await;
    let monitor = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &data)
        .telemetry(TelemetryConfig {
            endpoint: Some(monitor.url()),
            ..fast_telemetry()
        })
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("note", "n", json!({})))
        .await
        .unwrap();
    let runner = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(std::future::pending()).await })
    };
    let d = wait_for_device(&monitor, "the drained op", |d| d["succeeded"] == 1).await;
    assert_eq!(d["labels"]["app"], "field-notes");
    assert_eq!(data.applied_log().await.unwrap().len(), 1);
    assert_eq!(data.requests_on("/v1/telemetry"), 0);
    runner.abort();
}
