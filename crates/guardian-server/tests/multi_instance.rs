//! Several server instances on one PostgreSQL database behave as one
//! server: idempotent retries replay on another instance, `If-Match` holds
//! across instances, the feed has one total order per tenant with no gap a
//! concurrent reader can see, and realtime sessions on every instance see
//! every change exactly once. Each test has a database of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "protocol/pg.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use guardian_protocol::{ChangesPage, RealtimeFrame};
use guardian_server::{RunningServer, ServerBuilder};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "tok-acme";

async fn instance(db: &pg::PgDb) -> RunningServer {
    ServerBuilder::new()
        .token("acme", TOKEN)
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect("bind an instance")
}

async fn instances(db: &pg::PgDb, n: usize) -> Vec<RunningServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(instance(db).await);
    }
    out
}

fn put(
    http: &reqwest::Client,
    s: &RunningServer,
    id: &str,
    data: &Value,
    key: &str,
) -> reqwest::RequestBuilder {
    http.put(format!("{}/v1/entities/device/{id}", s.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", key)
        .json(&json!({ "data": data }))
}

async fn page(http: &reqwest::Client, s: &RunningServer, since: u64) -> ChangesPage {
    let r = http
        .get(format!("{}/v1/changes?since={since}&limit=1000", s.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_instance_replays() {
    let db = pg::PgDb::create();
    let s = instances(&db, 2).await;
    let http = reqwest::Client::new();
    let data = json!({"n": 1});
    let create = |srv: &RunningServer| {
        http.post(format!("{}/v1/entities/device", srv.url()))
            .bearer_auth(TOKEN)
            .header("idempotency-key", "k1")
            .json(&json!({"id": "d1", "data": data}))
    };
    let first = create(&s[0]).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.text().await.unwrap();
    let again = create(&s[1]).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(
        again.headers().get("idempotent-replayed").unwrap(),
        "true",
        "the second instance replays the first one's answer"
    );
    assert_eq!(again.text().await.unwrap(), first_body);
    let log = s[1].applied_log().await.unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_holds_across_instances() {
    let db = pg::PgDb::create();
    let s = instances(&db, 2).await;
    let http = reqwest::Client::new();
    let r = put(&http, &s[0], "d1", &json!({"a": 1}), "c")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no upsert");
    let r = http
        .post(format!("{}/v1/entities/device", s[0].url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", "c")
        .json(&json!({"id": "d1", "data": {"a": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = put(&http, &s[1], "d1", &json!({"a": 2}), "u1")
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = put(&http, &s[0], "d1", &json!({"a": 3}), "u2")
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "version 1 is stale on A too"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["current"]["version"], 2);
}

/// A transaction committed on one instance replays whole on another, and
/// one aborted there leaves nothing behind for either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_one_unit_across_instances() {
    let db = pg::PgDb::create();
    let s = instances(&db, 2).await;
    let http = reqwest::Client::new();
    let send = |at: &RunningServer, key: &str, ops: &Value| {
        http.post(format!("{}/v1/transactions", at.url()))
            .bearer_auth(TOKEN)
            .json(&json!({"transaction_key": key, "ops": ops}))
            .send()
    };
    let ops = json!([
        {"op": "create", "type": "device", "id": "a", "data": {"n": 1}, "idempotency_key": "a1"},
        {"op": "create", "type": "device", "id": "b", "data": {"n": 1}, "idempotency_key": "b1"},
    ]);
    let first = send(&s[0], "t1", &ops).await.unwrap().text().await.unwrap();
    let again = send(&s[1], "t1", &ops).await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    let again = again.text().await.unwrap();
    assert_eq!(
        again.strip_suffix(",\"replayed\":true}"),
        first.strip_suffix(",\"replayed\":false}")
    );
    // b at version 1 on instance B: the stale if_match aborts all of it.
    let stale = json!([
        {"op": "update", "type": "device", "id": "a", "data": {"n": 2}, "if_match": 1, "idempotency_key": "a2"},
        {"op": "update", "type": "device", "id": "b", "data": {"n": 2}, "if_match": 7, "idempotency_key": "b2"},
    ]);
    let r: Value = send(&s[1], "t2", &stale)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["committed"].as_bool(), r["failed_op"].as_u64()),
        (Some(false), Some(1))
    );
    let feed = page(&http, &s[0], 0).await;
    assert_eq!(feed.changes.len(), 2, "nothing of the aborted transaction");
    assert_eq!(feed.head, Some(2));
    let log = s[0].applied_log().await.unwrap();
    let rows: Vec<_> = log
        .iter()
        .map(|a| (a.idempotency_key.as_str(), a.transaction_key.as_deref()))
        .collect();
    assert_eq!(rows, [("a1", Some("t1")), ("b1", Some("t1"))]);
}

/// Writers on three instances and readers polling through them all at
/// once: every page a reader gets starts right after its cursor and has no
/// hole, so no change can commit later under a lower cursor than one a
/// reader has seen. At the end the feed is 1..=N, each key applied once,
/// each entity's versions in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_has_no_gap_a_concurrent_reader_can_see() {
    const WRITERS: usize = 12;
    const OPS: usize = 25;
    const ENTITIES: usize = 4;
    let db = pg::PgDb::create();
    let s = Arc::new(instances(&db, 3).await);
    let http = reqwest::Client::new();
    // The entities exist first, so every writer op is an update.
    for e in 0..ENTITIES {
        let r = http
            .post(format!("{}/v1/entities/device", s[0].url()))
            .bearer_auth(TOKEN)
            .header("idempotency-key", format!("create-{e}"))
            .json(&json!({"id": format!("e{e}"), "data": {"w": -1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (s, http, done) = (Arc::clone(&s), http.clone(), Arc::clone(&done));
        readers.push(tokio::spawn(async move {
            let mut since = 0;
            let mut seen = Vec::new();
            let mut turn = r;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let p = page(&http, &s[turn % s.len()], since).await;
                turn += 1;
                for (i, c) in p.changes.iter().enumerate() {
                    assert_eq!(
                        c.cursor,
                        since + 1 + i as u64,
                        "reader {r}: a hole after cursor {since} in {:?}",
                        p.changes.iter().map(|c| c.cursor).collect::<Vec<_>>()
                    );
                }
                seen.extend(p.changes.iter().map(|c| c.cursor));
                since = p.next;
                // A last full read after the writers finished.
                if finished && p.changes.is_empty() {
                    return seen;
                }
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (s, http) = (Arc::clone(&s), http.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..OPS {
                let srv = &s[(w + i) % s.len()];
                let id = format!("e{}", (w + i) % ENTITIES);
                let r = put(
                    &http,
                    srv,
                    &id,
                    &json!({"w": w, "i": i}),
                    &format!("w{w}-{i}"),
                )
                .send()
                .await
                .unwrap();
                assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let total = (ENTITIES + WRITERS * OPS) as u64;
    for r in readers {
        let seen = r.await.unwrap();
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    }
    let log = s[2].applied_log().await.unwrap();
    assert_eq!(log.len() as u64, total);
    let keys: BTreeSet<&str> = log.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys.len() as u64, total, "a key applied twice");
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for a in &log {
        versions.entry(a.id.as_str()).or_default().push(a.version);
    }
    for (id, v) in versions {
        let want: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(v, want, "{id}: versions out of order in the applied log");
    }
    let mut cursors: Vec<u64> = log.iter().map(|a| a.cursor).collect();
    cursors.sort_unstable();
    assert_eq!(cursors, (1..=total).collect::<Vec<_>>());
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn watch(s: &RunningServer) -> Ws {
    let mut req = format!("{}?since=0", s.realtime_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// The next change cursor on `ws` (hello frames skipped); fails after 20 s.
async fn next_change(ws: &mut Ws) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no change within 20 s")
            .expect("the session closed")
            .unwrap();
        if let Message::Text(t) = msg {
            match serde_json::from_str(&t).unwrap() {
                RealtimeFrame::Change { change } => return change.cursor,
                RealtimeFrame::Hello { .. } => {}
            }
        }
    }
}

/// A watcher on each instance; writes through every instance. Each watcher
/// gets every change once, in cursor order, including those committed on
/// another instance (the NOTIFY doorbell, then a read of the feed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_every_instance_see_every_change_once() {
    let db = pg::PgDb::create();
    let s = instances(&db, 3).await;
    let http = reqwest::Client::new();
    let mut watchers = Vec::new();
    for srv in &s {
        watchers.push(watch(srv).await);
    }
    const N: u64 = 30;
    let writes = async {
        for i in 0..N {
            let srv = &s[i as usize % s.len()];
            let r = http
                .post(format!("{}/v1/entities/device", srv.url()))
                .bearer_auth(TOKEN)
                .header("idempotency-key", format!("k{i}"))
                .json(&json!({"id": format!("d{i}"), "data": {"i": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
    };
    writes.await;
    for (w, ws) in watchers.iter_mut().enumerate() {
        for want in 1..=N {
            assert_eq!(next_change(ws).await, want, "watcher on instance {w}");
        }
    }
    // Nothing more: no change is sent twice.
    let quiet = tokio::time::timeout(Duration::from_millis(300), async {
        for ws in &mut watchers {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                return Some(t);
            }
        }
        None
    })
    .await;
    assert!(!matches!(quiet, Ok(Some(_))), "an extra frame: {quiet:?}");
}

/// The listening connections are killed by the database while another
/// instance writes: those notifications are lost, yet the watcher gets
/// every change once the listener is back (it rings every doorbell on
/// reconnecting, and the session re-reads the feed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_costs_a_re_read_not_a_change() {
    let db = pg::PgDb::create();
    let s = instances(&db, 2).await;
    let http = reqwest::Client::new();
    let mut ws = watch(&s[0]).await;
    let (client, conn) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let create = |i: u64| {
        http.post(format!("{}/v1/entities/device", s[1].url()))
            .bearer_auth(TOKEN)
            .header("idempotency-key", format!("k{i}"))
            .json(&json!({"id": format!("d{i}"), "data": {"i": i}}))
            .send()
    };
    assert_eq!(create(1).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(next_change(&mut ws).await, 1);
    for i in 2..=4 {
        // Every listening connection of the database goes.
        let killed = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        assert!(!killed.is_empty(), "no listener to kill");
        assert_eq!(create(i).await.unwrap().status(), StatusCode::CREATED);
        assert_eq!(next_change(&mut ws).await, i);
    }
    drop(client);
    let _ = driver.await;
}
