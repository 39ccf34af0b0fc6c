//! Data fidelity end to end (issue 15, points 7 and 8): what `enqueue`
//! accepts reaches the real reference server unaltered and routable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::engine::SyncEngine;
use guardian_sync::op::{NewOp, OpState};
use guardian_sync::outbox::{EnqueueError, ListFilter};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::StaticToken;
use serde_json::{json, Value};

const TOKEN: &str = "tok-a";

async fn server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

async fn engine(dir: &tempfile::TempDir, server: &RunningServer) -> SyncEngine {
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .server(server.url())
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .retry(
            RetryPolicy::new(
                Duration::from_millis(5),
                2.0,
                Duration::from_millis(50),
                5,
                Duration::from_secs(10),
            )
            .unwrap(),
        )
        .build()
        .await
        .unwrap()
}

/// Waits (bounded) for the run to end.
async fn drain(engine: &SyncEngine) {
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_empty())
        .await
        .expect("drain did not finish in 60 s")
        .unwrap();
}

/// Status and body text of a GET, as the server wrote it.
async fn get_text(server: &RunningServer, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", server.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn failed_ops(engine: &SyncEngine) -> Vec<String> {
    engine
        .outbox()
        .list(ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.state == OpState::Failed)
        .map(|o| format!("{}/{}: {:?}", o.entity_type, o.entity_id, o.last_error))
        .collect()
}

#[tokio::test]
async fn ids_that_cannot_route_are_refused_at_enqueue() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let long = "x".repeat(129);
    for id in [
        "", ".", "..", "/", "a/b", "%", "%2e", "?", "#", " ", "a b", "\t", "\n", "\0", "\u{7f}",
        "é", &long,
    ] {
        for op in [
            NewOp::create("device", id, json!({})),
            NewOp::update("device", id, json!({})),
            NewOp::delete("device", id),
        ] {
            let err = engine.enqueue(op).await.unwrap_err();
            assert!(matches!(err, EnqueueError::Invalid(_)), "{id:?}: {err:?}");
            assert!(err.to_string().contains("invalid entity id"), "{err}");
        }
    }
    assert!(engine
        .outbox()
        .list(ListFilter::default())
        .await
        .unwrap()
        .is_empty());
}

/// Ids made of dots (other than `.` and `..`) route: every kind delivers.
#[tokio::test]
async fn dotted_ids_deliver_every_kind() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let ids = ["...", ".a", "a.", "a..b", "..a", "-", "_"];
    for id in ids {
        engine
            .enqueue(NewOp::create("device", id, json!({"v": 1})))
            .await
            .unwrap();
        engine
            .enqueue(NewOp::update("device", id, json!({"v": 2})))
            .await
            .unwrap();
    }
    drain(&engine).await;
    for id in ids {
        let (status, text) = get_text(&server, &format!("/v1/entities/device/{id}")).await;
        assert_eq!(status, 200, "{id}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (body["id"].as_str(), &body["data"]),
            (Some(id), &json!({"v": 2}))
        );
        engine.enqueue(NewOp::delete("device", id)).await.unwrap();
    }
    drain(&engine).await;
    for id in ids {
        let (status, _) = get_text(&server, &format!("/v1/entities/device/{id}")).await;
        assert_eq!(status, 410, "{id}");
    }
    assert_eq!(failed_ops(&engine).await, Vec::<String>::new());
}

/// JSON text parsed as the application would hand it to `enqueue`.
fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// The `data` of every change of the feed, as text.
async fn feed_data(server: &RunningServer) -> Vec<String> {
    let (status, text) = get_text(server, "/v1/changes?since=0&limit=100").await;
    assert_eq!(status, 200, "{text}");
    parse(&text)["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["data"].to_string())
        .collect()
}

/// Numbers beyond `i64`, `u64` and `f64`, in every spelling JSON allows,
/// reach the server's store, `GET` and the change feed as written.
#[tokio::test]
async fn numbers_round_trip_exactly_through_outbox_server_and_feed() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    // Keys in order: the server stores objects with sorted keys.
    let created = r#"{"big":12345678901234567890123,"dec":3.141592653589793238462643383279,"exp":1E400,"neg":-9223372036854775809,"nz":-0,"one":1.0,"tiny":-2.5e-400,"u":18446744073709551616}"#;
    let updated = r#"{"big":-12345678901234567890123.000,"dec":0.1000000000000000000001,"exp":1e+22,"neg":-9223372036854775810,"nz":-0.0,"one":1.00}"#;
    engine
        .enqueue(NewOp::create("device", "n1", parse(created)))
        .await
        .unwrap();
    let pending = engine.outbox().list(ListFilter::default()).await.unwrap();
    // serde_json writes an exponent as `e` with a sign; the digits stay.
    let created = &created.replace("1E400", "1e+400");
    assert_eq!(pending[0].payload.to_string(), *created, "outbox");
    drain(&engine).await;
    let (status, text) = get_text(&server, "/v1/entities/device/n1").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(&format!("\"data\":{created},")),
        "GET: {text}"
    );
    // Sent alone (not coalesced into the create).
    engine
        .enqueue(NewOp::update("device", "n1", parse(updated)))
        .await
        .unwrap();
    drain(&engine).await;
    assert_eq!(failed_ops(&engine).await, Vec::<String>::new());
    let (status, text) = get_text(&server, "/v1/entities/device/n1").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(&format!("\"data\":{updated},")),
        "GET: {text}"
    );
    assert_eq!(feed_data(&server).await, vec![created.as_str(), updated]);
}

/// A 409 merged three ways compares numbers by value and keeps their text:
/// a digit changed beyond `f64`'s precision is a change, a respelling of
/// the base's value (`1.5` for `1.50`) is not.
#[tokio::test]
async fn a_conflict_merges_exact_numbers() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let base = r#"{"a":12345678901234567890123,"b":1.50,"d":-9223372036854775809}"#;
    engine
        .enqueue(NewOp::create("form", "f1", parse(base)))
        .await
        .unwrap();
    drain(&engine).await;
    // Another device changes b and d, and adds r, at version 2.
    let remote = r#"{"a":12345678901234567890123,"b":2.50,"d":-9223372036854775810,"r":0.1000000000000000000001}"#;
    let r = reqwest::Client::new()
        .put(format!("{}/v1/entities/form/f1", server.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", "other-device")
        .header("if-match", "\"1\"")
        .header("content-type", "application/json")
        .body(format!(r#"{{"data":{remote}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // This device, from version 1: a changed in its 23rd digit, b respelled
    // (same value), d changed too (a conflict: local wins).
    let local = r#"{"a":12345678901234567890124,"b":1.5,"d":-9223372036854775811}"#;
    engine
        .enqueue(NewOp::update("form", "f1", parse(local)).with_base(parse(base), 1))
        .await
        .unwrap();
    drain(&engine).await;
    assert_eq!(failed_ops(&engine).await, Vec::<String>::new());
    let (_, text) = get_text(&server, "/v1/entities/form/f1").await;
    let merged = r#"{"a":12345678901234567890124,"b":2.50,"d":-9223372036854775811,"r":0.1000000000000000000001}"#;
    assert!(text.contains(&format!("\"data\":{merged},")), "GET: {text}");
    assert!(text.contains("\"version\":3"), "GET: {text}");
}
