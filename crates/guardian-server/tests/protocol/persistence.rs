//! A file-backed server keeps entities, idempotency records, the feed and the
//! applied log across a restart; shutdown is graceful.

use futures::StreamExt;
use guardian_server::Storage;
use serde_json::json;

use crate::common::{builder, start, TOKEN};

#[tokio::test]
async fn a_file_database_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nested/server.db");
    let h = start(builder().database(&db)).await;
    let created = h.create("device", "d1", json!({"a": 1}), "k1").await;
    h.put("device", "d1", json!({"a": 2}), "k2", Some(1)).await;
    h.server.shutdown().await;
    assert!(db.exists());

    let h = start(builder().database(&db)).await;
    assert_eq!(h.get("device", "d1").await.body["version"], 2);
    let replay = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, created.body);
    h.create("device", "d2", json!({}), "k3").await;
    let feed = h.changes(0, 10).await;
    let cursors: Vec<u64> = feed.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cursor"].as_u64().unwrap())
        .collect();
    assert_eq!(cursors, vec![1, 2, 3]);
    assert_eq!(h.applied_keys().await, vec!["k1", "k2", "k3"]);
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let _ = Storage::Memory;
}

#[tokio::test]
async fn shutdown_completes_with_open_connections_and_sessions() {
    let h = start(builder()).await;
    h.create("device", "d1", json!({}), "k").await; // leaves a keep-alive connection
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        h.server.realtime_url(),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let _hello = ws.next().await;
    let addr = h.server.addr();
    h.server.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
