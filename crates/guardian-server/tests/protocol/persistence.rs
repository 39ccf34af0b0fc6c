//! A file-backed server keeps entities, idempotency records, the feed and the
//! applied log across a restart; shutdown is graceful.

use futures::StreamExt;
use guardian_protocol::{problem_type, ChangeFingerprint, SINCE_FINGERPRINT_PARAM};
use guardian_server::Storage;
use reqwest::Method;
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

/// A change missing from inside the retained feed (the database was
/// damaged or edited by hand) cannot be the one a client holds there: a
/// `since_fingerprint` at its cursor is 410 `cursor-expired`, while the
/// same `since` without one is served as before.
#[tokio::test]
async fn a_change_missing_inside_the_retained_feed_fails_its_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let h = start(builder().database(&db)).await;
    for (id, key) in [("d1", "a"), ("d2", "b"), ("d3", "c")] {
        h.create("device", id, json!({}), key).await;
    }
    h.server.shutdown().await;
    let deleted = rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM changes WHERE cursor = 2", [])
        .unwrap();
    assert_eq!(deleted, 1);

    let h = start(builder().database(&db)).await;
    let at2 = ChangeFingerprint::of("device", "d2", 1);
    let r = h
        .send(h.req(
            Method::GET,
            &format!("/v1/changes?since=2&{SINCE_FINGERPRINT_PARAM}={at2}"),
        ))
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (410, problem_type::CURSOR_EXPIRED),
        "{:?}",
        r.body
    );
    assert_eq!(r.body[problem_type::FEED_HEAD], 3);
    let r = h.changes(2, 10).await;
    assert_eq!(
        (r.status, r.body["changes"][0]["cursor"].clone()),
        (200, json!(3))
    );
    h.server.shutdown().await;
}
