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
