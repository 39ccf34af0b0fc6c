//! `GET /v1/realtime`: hello, backlog then live with no gap or duplicate,
//! resume, auth, pings and dead peers.

use std::time::Duration;

use futures::StreamExt;
use guardian_protocol::{ChangeFingerprint, RealtimeFrame, SINCE_FINGERPRINT_PARAM};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{builder, start, start_default, Harness, ADMIN, OTHER_TOKEN, TOKEN};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn connect(
    h: &Harness,
    query: &str,
    token: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("{}{query}", h.server.realtime_url())
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// The next protocol frame, skipping pings; `None` once closed. Fails the
/// test if none comes within 20 s (pings do not extend the wait).
pub(crate) async fn next_frame(ws: &mut Ws) -> Option<RealtimeFrame> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no frame within 20 s")?;
        match msg.ok()? {
            Message::Text(t) => return Some(serde_json::from_str(&t).expect("frame JSON")),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

fn change_cursor(f: &RealtimeFrame) -> u64 {
    match f {
        RealtimeFrame::Change { change } => change.cursor,
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_backlog_then_live() {
    let h = start_default().await;
    h.create("device", "d1", json!({"a": 1}), "a").await;
    h.create("device", "d2", json!({"a": 2}), "b").await;
    h.put("device", "d1", json!({"a": 3}), "c", None).await;
    let mut ws = connect(&h, "?since=1", Some(TOKEN)).await.unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 3 })
    );
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 2);
    let f = next_frame(&mut ws).await.unwrap();
    let RealtimeFrame::Change { change } = f else {
        panic!()
    };
    assert_eq!(
        (change.cursor, change.id.as_str(), change.version),
        (3, "d1", 2)
    );
    h.delete("device", "d2", "d", None).await;
    let RealtimeFrame::Change { change } = next_frame(&mut ws).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        (change.cursor, change.data.clone()),
        (4, serde_json::Value::Null)
    );
    // The wire shape: change frames nest the change.
    h.create("device", "d3", json!({}), "e").await;
    let raw = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str::<serde_json::Value>(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(raw["type"], "change");
    assert_eq!(raw["change"]["type"], "device");
    assert_eq!(raw["change"]["cursor"], 5);
}

/// A backlog of large changes comes in byte-bounded pages (5 of these
/// fit the first): every one is sent, not only the first page's.
#[tokio::test]
async fn a_backlog_of_large_changes_is_sent_whole() {
    let h = start_default().await;
    h.create_large_docs(6).await;
    let mut ws = connect(&h, "?since=0", Some(TOKEN)).await.unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 6 })
    );
    for cursor in 1..=6 {
        assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), cursor);
    }
}

#[tokio::test]
async fn without_since_only_live_changes_come() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    let mut ws = connect(&h, "", Some(TOKEN)).await.unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 1 })
    );
    h.create("device", "d2", json!({}), "b").await;
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 2);
}

#[tokio::test]
async fn other_tenants_changes_are_not_pushed() {
    let h = start_default().await;
    let mut ws = connect(&h, "?since=0", Some(TOKEN)).await.unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 0 })
    );
    let other = h.as_token(crate::common::OTHER_TOKEN);
    other
        .send(
            other
                .req(Method::POST, "/v1/entities/t")
                .header("idempotency-key", "x")
                .json(&json!({"id": "o", "data": {}})),
        )
        .await;
    h.create("t", "mine", json!({}), "y").await;
    let RealtimeFrame::Change { change } = next_frame(&mut ws).await.unwrap() else {
        panic!()
    };
    assert_eq!((change.cursor, change.id.as_str()), (1, "mine"));
}

#[tokio::test]
async fn resume_from_a_cursor_after_a_disconnect() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    let mut ws = connect(&h, "?since=0", Some(TOKEN)).await.unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 1 })
    );
    let last = change_cursor(&next_frame(&mut ws).await.unwrap());
    ws.close(None).await.unwrap();
    // Changes while disconnected.
    h.create("device", "d2", json!({}), "b").await;
    h.put("device", "d1", json!({"x": 1}), "c", None).await;
    let mut ws = connect(&h, &format!("?since={last}"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 3 })
    );
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 2);
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 3);
    h.create("device", "d3", json!({}), "d").await;
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 4);
}

#[tokio::test]
async fn backlog_and_live_meet_without_gap_or_duplicate() {
    let h = start_default().await;
    const N: u64 = 300;
    let writer = {
        let reqs: Vec<_> = (0..N)
            .map(|i| h.create_req("t", &format!("i{i}"), json!({"i": i}), &format!("k{i}")))
            .collect();
        tokio::spawn(async move {
            for r in reqs {
                assert_eq!(r.send().await.unwrap().status(), 201);
            }
        })
    };
    // Connect while the writer runs.
    h.create("t", "first", json!({}), "first").await;
    let mut ws = connect(&h, "?since=0", Some(TOKEN)).await.unwrap();
    let Some(RealtimeFrame::Hello { .. }) = next_frame(&mut ws).await else {
        panic!("no hello")
    };
    let mut seen = Vec::new();
    while seen.len() < usize::try_from(N + 1).unwrap() {
        seen.push(change_cursor(&next_frame(&mut ws).await.unwrap()));
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=N + 1).collect::<Vec<_>>());
}

#[tokio::test]
async fn upgrade_needs_a_token_and_a_servable_cursor() {
    let h = start_default().await;
    match connect(&h, "", None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    match connect(&h, "?since=9", Some(TOKEN)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 410),
        other => panic!("expected 410, got {other:?}"),
    }
    // A plain GET is a problem, not a hang.
    let r = h.send(h.req(Method::GET, "/v1/realtime")).await;
    assert!(r.status >= 400 && r.is_problem(), "{r:?}");
}

/// The upgrade checks `since_fingerprint` as the feed does: the change the
/// client holds at `since` opens the session, another one is 410 before the
/// upgrade, a malformed one (or one without `since`) is 400.
#[tokio::test]
async fn upgrade_checks_the_change_held_at_since() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    h.create("device", "d2", json!({}), "b").await;
    let at1 = ChangeFingerprint::of("device", "d1", 1);
    let p = SINCE_FINGERPRINT_PARAM;
    let mut ws = connect(&h, &format!("?since=1&{p}={at1}"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 2 })
    );
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 2);
    let other = ChangeFingerprint::of("device", "d2", 1);
    for (query, status) in [
        (format!("?since=1&{p}={other}"), 410),
        (format!("?{p}={at1}"), 400),
        (format!("?since=1&{p}=0123"), 400),
        (format!("?since=1&{p}={}", "f".repeat(5000)), 400),
    ] {
        match connect(&h, &query, Some(TOKEN)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), status, "{}", &query[..query.len().min(60)]);
            }
            other => panic!("expected {status}, got {other:?}"),
        }
    }
}

/// A raw connection that has sent a realtime upgrade request, and nothing
/// more: a peer that answers no ping and reads only when the test does.
async fn raw_upgrade(h: &Harness) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(h.server.addr())
        .await
        .unwrap();
    let handshake = format!(
        "GET /v1/realtime HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n",
        h.server.addr()
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn the_server_pings_and_closes_a_dead_peer() {
    let h = start(
        builder()
            .ws_ping_interval(Duration::from_millis(50))
            .ws_idle_timeout(Duration::from_millis(300)),
    )
    .await;
    // A hand-made client that completes the handshake and then never answers.
    let mut tcp = raw_upgrade(&h).await;
    let mut received = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the server never closed the dead peer");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // 0x89 is a ping frame, 0x88 a close frame.
    assert!(received.contains(&0x89), "no ping seen");
    assert!(received.contains(&0x88), "no close frame seen");
}

#[tokio::test]
async fn live_peers_answer_pings_and_stay() {
    let h = start(
        builder()
            .ws_ping_interval(Duration::from_millis(50))
            .ws_idle_timeout(Duration::from_secs(2)),
    )
    .await;
    let mut ws = connect(&h, "", Some(TOKEN)).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { .. })
    ));
    // Read (and so answer) pings until well past the idle timeout.
    let mut pings = 0;
    while pings < 15 {
        match ws.next().await.unwrap().unwrap() {
            Message::Ping(_) => pings += 1,
            Message::Close(c) => panic!("closed a live peer: {c:?}"),
            _ => {}
        }
    }
    h.create("t", "x", json!({}), "k").await;
    assert_eq!(change_cursor(&next_frame(&mut ws).await.unwrap()), 1);
}

#[tokio::test]
async fn admin_disconnect_and_shutdown_close_sessions() {
    let h = start_default().await;
    let mut ws = connect(&h, "", Some(TOKEN)).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { .. })
    ));
    let r = h
        .send(h.admin(Method::POST, "/admin/realtime/disconnect"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(next_frame(&mut ws).await, None);

    let mut ws = connect(&h, "", Some(TOKEN)).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { .. })
    ));
    let _ = ADMIN;
    h.server.handle().shutdown();
    assert_eq!(next_frame(&mut ws).await, None);
}

/// Concurrent single requests and batches of two tenants share group
/// commits: every op applies once, each tenant's feed is gap-free, and a
/// live session sees its tenant's changes once each, in cursor order.
#[tokio::test]
async fn concurrent_writers_share_commits_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(builder().database(dir.path().join("s.db"))).await;
    let mut ws = connect(&h, "?since=0", Some(TOKEN)).await.unwrap();
    let Some(RealtimeFrame::Hello { cursor: 0 }) = next_frame(&mut ws).await else {
        panic!("no hello")
    };
    const WRITERS: usize = 8;
    const ROUNDS: usize = 5;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let token = if w % 2 == 0 { TOKEN } else { OTHER_TOKEN };
        let (http, base) = (h.http.clone(), h.server.url());
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                let id = format!("w{w}r{r}");
                let resp = http
                    .post(format!("{base}/v1/entities/t"))
                    .bearer_auth(token)
                    .header("idempotency-key", format!("s-{id}"))
                    .json(&json!({"id": id, "data": {"w": w}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
                let ops: Vec<_> = (0..3)
                    .map(|j| {
                        json!({"op": "create", "type": "t", "id": format!("{id}b{j}"),
                                    "data": {"j": j}, "idempotency_key": format!("b-{id}-{j}")})
                    })
                    .collect();
                let resp = http
                    .post(format!("{base}/v1/batch"))
                    .bearer_auth(token)
                    .json(&json!({"ops": ops}))
                    .send()
                    .await
                    .unwrap();
                let body: serde_json::Value = resp.json().await.unwrap();
                assert!(body["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["status"] == 201 && r["replayed"] == false));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_tenant = u64::try_from(WRITERS / 2 * ROUNDS * 4).unwrap();
    let mut seen = Vec::new();
    while seen.len() < usize::try_from(per_tenant).unwrap() {
        seen.push(change_cursor(&next_frame(&mut ws).await.unwrap()));
    }
    assert_eq!(seen, (1..=per_tenant).collect::<Vec<_>>());
    let log = h.server.applied_log().await.unwrap();
    assert_eq!(log.len(), WRITERS * ROUNDS * 4);
    let mut keys: Vec<_> = log
        .iter()
        .map(|a| (&a.tenant, &a.idempotency_key))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), log.len(), "no key applied twice");
    for tenant in ["acme", "globex"] {
        let mut cursors: Vec<u64> = log
            .iter()
            .filter(|a| a.tenant == tenant)
            .map(|a| a.cursor)
            .collect();
        cursors.sort_unstable();
        assert_eq!(cursors, (1..=per_tenant).collect::<Vec<_>>(), "{tenant}");
    }
    let feed = h.changes(0, 1000).await;
    assert_eq!(feed.body["next"], per_tenant);
}

/// A client sends only control frames: a large message ends its session
/// at once, instead of being buffered (tungstenite's default allows 64 MiB
/// per message, and one address may hold dozens of sessions).
#[tokio::test]
async fn an_oversized_client_message_ends_the_session() {
    use futures::SinkExt;
    let h = start_default().await;
    let mut ws = connect(&h, "", Some(TOKEN)).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { .. })
    ));
    // The send may fail midway once the server has hung up.
    let _ = ws.send(Message::Binary(vec![0u8; 1 << 20].into())).await;
    assert_eq!(next_frame(&mut ws).await, None);
}

/// A peer that stops reading fills the socket's buffers; the server gives
/// up on a send it cannot finish within the idle timeout and ends the
/// session. Before, the send waited for good, deaf to the idle check and
/// to shutdown, and the session held its connection forever.
#[tokio::test]
async fn a_peer_that_stops_reading_is_let_go() {
    let h = start(
        builder()
            .ws_ping_interval(Duration::from_secs(3600))
            .ws_idle_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut tcp = raw_upgrade(&h).await;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("no handshake answer within 10 s")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    tokio::time::timeout(Duration::from_secs(10), h.server.wait_realtime_sessions(1))
        .await
        .expect("the session did not start");
    // ~24 MB of changes, far more than the socket buffers hold; this peer
    // reads none of them.
    let big = "x".repeat(800_000);
    for i in 0..30 {
        let r = h
            .create("t", &format!("e{i}"), json!({ "v": big }), &format!("k{i}"))
            .await;
        assert_eq!(r.status, 201);
    }
    tokio::time::timeout(Duration::from_secs(20), h.server.wait_realtime_sessions(0))
        .await
        .expect("the session of a peer that stopped reading was still open after 20 s");
    drop(tcp);
}

/// The same peer in paused time, where the interval can be bounded: the
/// session ends one idle timeout after its send stalled. It used to wait
/// on the full socket once more for its close frame and closing handshake.
#[tokio::test(start_paused = true)]
async fn a_stuck_session_ends_one_idle_timeout_after_its_send_stalled() {
    let limit = Duration::from_secs(60);
    // In memory on both suites: a PostgreSQL server answers from another
    // process, and paused time would run out the pool's timeouts while it
    // waits. The session's code is the same on every store.
    let h = start(
        guardian_server::ServerBuilder::new()
            .token("acme", TOKEN)
            .in_memory()
            .ws_ping_interval(Duration::from_secs(3600))
            .ws_idle_timeout(limit),
    )
    .await;
    let mut tcp = raw_upgrade(&h).await;
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    h.server.wait_realtime_sessions(1).await;
    let big = "x".repeat(800_000);
    let start = tokio::time::Instant::now();
    for i in 0..30 {
        let r = h
            .create("t", &format!("e{i}"), json!({ "v": big }), &format!("k{i}"))
            .await;
        assert_eq!(r.status, 201);
    }
    // The stalled send began at or after `start`, during the creates.
    h.server.wait_realtime_sessions(0).await;
    let took = start.elapsed();
    assert!(
        took >= limit && took < limit * 3 / 2,
        "the session ended {took:?} after the changes began, idle timeout {limit:?}"
    );
    drop(tcp);
}
