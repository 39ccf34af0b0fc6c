//! RealtimeService against the real reference server on 127.0.0.1:0, a TCP
//! proxy that can cut and refuse the WebSocket path, and fake WebSocket
//! endpoints that go silent or send garbage. No test sleeps to wait for a
//! condition: each awaits a stream or a watch with a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use guardian_protocol::{Change, ChangeFingerprint, RealtimeFrame};
use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::outbox::{Outbox, OutboxOptions};
use guardian_sync::realtime::{
    ConnectionState, CursorStore, CursorStoreError, FeedPosition, MemoryCursorStore,
    OutboxCursorStore, RealtimeConfig, RealtimeMessage, RealtimeMessages, RealtimeService,
    StartFrom,
};
use guardian_sync::telemetry::{Counter, SyncMetrics};
use guardian_sync::transport::StaticToken;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "tok-rt";
const WAIT: Duration = Duration::from_secs(20);

async fn server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-rt", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Short intervals so every path runs within a test's budget.
fn config(base_url: &str) -> RealtimeConfig {
    let mut c = RealtimeConfig::new(base_url, Arc::new(StaticToken::new(TOKEN)));
    c.first_reconnect_delay = Duration::from_millis(10);
    c.reconnect_cap = Duration::from_millis(100);
    c.max_reconnect_attempts = 5;
    c.probe_interval = Duration::from_millis(200);
    c.ping_interval = Duration::from_millis(100);
    c.pong_deadline = Duration::from_millis(200);
    c.poll_interval = Duration::from_millis(50);
    c.connect_timeout = Duration::from_secs(2);
    c.http_timeout = Duration::from_secs(5);
    c.start_from = StartFrom::After(0);
    c
}

/// Writes to the server over plain HTTP, as another client would.
struct Writer {
    http: reqwest::Client,
    url: String,
}

impl Writer {
    fn new(url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: url.to_owned(),
        }
    }

    /// Creates `note` entities with the given ids in one batch.
    async fn create(&self, ids: impl IntoIterator<Item = u32>) {
        let ops: Vec<_> = ids
            .into_iter()
            .map(|i| {
                json!({"op": "create", "type": "note", "id": format!("n{i}"),
                       "data": {"i": i}, "idempotency_key": uuid::Uuid::new_v4().to_string()})
            })
            .collect();
        let resp = self
            .http
            .post(format!("{}/v1/batch", self.url))
            .bearer_auth(TOKEN)
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        for r in body["results"].as_array().unwrap() {
            assert_eq!(r["status"], 201, "{r}");
        }
    }
}

async fn next(messages: &mut RealtimeMessages) -> RealtimeMessage {
    tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("no message in time")
        .expect("message stream ended")
}

async fn next_change(messages: &mut RealtimeMessages) -> Change {
    match next(messages).await {
        RealtimeMessage::Change { change } => change,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// Receives `n` changes and checks they carry cursors `first..first+n`.
async fn expect_cursors(messages: &mut RealtimeMessages, first: u64, n: u64) -> Vec<Change> {
    let mut got = Vec::new();
    for expected in first..first + n {
        let c = next_change(messages).await;
        assert_eq!(c.cursor, expected, "out of order or duplicated: {c:?}");
        got.push(c);
    }
    got
}

async fn wait_state(service: &RealtimeService, want: ConnectionState) {
    let mut rx = service.state_receiver();
    tokio::time::timeout(WAIT, rx.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("state never became {want}, is {}", service.state()))
        .unwrap();
}

/// Records every state the service passes through (as seen by a watcher).
fn record_states(service: &RealtimeService) -> Arc<Mutex<Vec<ConnectionState>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut rx = service.state_receiver();
    let out = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let s = *rx.borrow_and_update();
            out.lock().unwrap().push(s);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    seen
}

/// A TCP proxy in front of the server's WebSocket route that the test can
/// cut (drop every open connection) and make refuse new connections.
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, open_rx) = watch::channel(true);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*open_rx.borrow() {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                tracked.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self {
            addr,
            open,
            conns,
            _accept: accept,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    /// Drops every proxied connection and refuses new ones.
    fn cut(&self) {
        self.open.send_replace(false);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn reopen(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test]
async fn changes_made_while_disconnected_arrive_after_reconnect() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let proxy = Proxy::start(server.addr()).await;
    let metrics = Arc::new(SyncMetrics::new());
    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(proxy.url());
    // Only the catch-up poll right after the loss: what follows must come
    // over the reconnected WebSocket.
    cfg.poll_interval = Duration::from_secs(3600);
    cfg.metrics = Some(Arc::clone(&metrics));
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Connected).await;

    writer.create(1..=3).await;
    expect_cursors(&mut messages, 1, 3).await;

    proxy.cut();
    // The catch-up poll succeeds against the server directly.
    wait_state(&service, ConnectionState::Polling).await;
    writer.create(4..=8).await;
    proxy.reopen();
    wait_state(&service, ConnectionState::Connected).await;
    let got = expect_cursors(&mut messages, 4, 5).await;
    assert_eq!(got[0].id, "n4");
    assert!(metrics.get(Counter::RealtimeReconnects) >= 1);
    assert_eq!(metrics.get(Counter::MessagesReceived), 8);
    service.shutdown().await;
}

#[tokio::test]
async fn server_restarted_on_the_same_port_is_rejoined_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let first = ServerBuilder::new()
        .token("tenant-rt", TOKEN)
        .database(&db)
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let addr = first.addr();
    let url = first.url();
    let metrics = Arc::new(SyncMetrics::new());
    let mut cfg = config(&url);
    cfg.metrics = Some(Arc::clone(&metrics));
    let service = RealtimeService::start(cfg).await.unwrap();
    let states = record_states(&service);
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Connected).await;
    Writer::new(&url).create(1..=5).await;
    expect_cursors(&mut messages, 1, 5).await;

    first.shutdown().await;
    wait_state(&service, ConnectionState::Disconnected).await;

    let second = ServerBuilder::new()
        .token("tenant-rt", TOKEN)
        .database(&db)
        .bind(addr)
        .await
        .unwrap();
    Writer::new(&second.url()).create(6..=10).await;
    expect_cursors(&mut messages, 6, 5).await;
    wait_state(&service, ConnectionState::Connected).await;
    // No replay of 1..=5 after the restart: the next change is 11.
    Writer::new(&second.url()).create([11]).await;
    assert_eq!(next_change(&mut messages).await.cursor, 11);
    assert!(metrics.get(Counter::RealtimeReconnects) >= 1);
    let states = states.lock().unwrap().clone();
    assert!(
        states.contains(&ConnectionState::Disconnected),
        "{states:?}"
    );
    service.shutdown().await;
}

/// A WebSocket endpoint that completes the handshake once and then never
/// reads or writes again (a hung server); later connections are refused so
/// the client stays on polling. Reports each upgrade request's
/// `Authorization` header and URI.
async fn silent_ws_server() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(Option<String>, String)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut served = false;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            if served {
                drop(stream);
                continue;
            }
            served = true;
            let seen = seen_tx.clone();
            let callback = move |req: &Request, resp: Response| {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                let _ = seen.send((auth, req.uri().to_string()));
                Ok(resp)
            };
            if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                held.push(ws); // kept open, never polled: no pong ever
            }
        }
    });
    (addr, seen_rx)
}

#[tokio::test]
async fn a_silent_server_is_detected_by_the_ping_deadline_and_polling_takes_over() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let (fake, mut upgrades) = silent_ws_server().await;
    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(format!("ws://{fake}/v1/realtime"));
    let service = RealtimeService::start(cfg).await.unwrap();
    let states = record_states(&service);
    let mut messages = service.messages().unwrap();

    let (auth, uri) = tokio::time::timeout(WAIT, upgrades.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(!uri.contains(TOKEN), "token leaked into the URL: {uri}");
    assert_eq!(uri, "/v1/realtime?since=0");

    wait_state(&service, ConnectionState::Connected).await;
    // The socket never closes; only the missing pong can end it.
    wait_state(&service, ConnectionState::Polling).await;
    writer.create(1..=4).await;
    expect_cursors(&mut messages, 1, 4).await;
    let states = states.lock().unwrap().clone();
    let connected = states.iter().position(|s| *s == ConnectionState::Connected);
    let polling = states.iter().position(|s| *s == ConnectionState::Polling);
    assert!(connected < polling, "{states:?}");
    service.shutdown().await;
}

#[tokio::test]
async fn switching_back_to_the_websocket_delivers_no_duplicate() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let proxy = Proxy::start(server.addr()).await;
    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(proxy.url());
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Connected).await;
    writer.create(1..=3).await;
    expect_cursors(&mut messages, 1, 3).await;

    proxy.cut();
    wait_state(&service, ConnectionState::Polling).await;
    writer.create(4..=6).await;
    expect_cursors(&mut messages, 4, 3).await; // by polling

    proxy.reopen();
    wait_state(&service, ConnectionState::Connected).await;
    writer.create(7..=9).await;
    expect_cursors(&mut messages, 7, 3).await;
    // A duplicate would be queued before this one.
    writer.create([10]).await;
    assert_eq!(next_change(&mut messages).await.cursor, 10);
    service.shutdown().await;
}

#[tokio::test]
async fn a_thousand_changes_across_twenty_forced_disconnects_arrive_once_in_order() {
    let server = Arc::new(server().await);
    let metrics = Arc::new(SyncMetrics::new());
    let mut cfg = config(&server.url());
    cfg.metrics = Some(Arc::clone(&metrics));
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Connected).await;

    let srv = Arc::clone(&server);
    let writes = tokio::spawn(async move {
        let writer = Writer::new(&srv.url());
        for round in 0..20u32 {
            writer.create(round * 50 + 1..=round * 50 + 50).await;
            srv.disconnect_realtime();
        }
    });
    let got = expect_cursors(&mut messages, 1, 1000).await;
    writes.await.unwrap();
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.id, format!("n{}", i + 1));
    }
    server.disconnect_realtime();
    Writer::new(&server.url()).create([1001]).await;
    assert_eq!(next_change(&mut messages).await.cursor, 1001);
    assert_eq!(metrics.get(Counter::MessagesReceived), 1001);
    assert!(metrics.get(Counter::RealtimeReconnects) >= 1);
    service.shutdown().await;
}

#[tokio::test]
async fn an_expired_cursor_delivers_a_resync_then_continues() {
    let clock = guardian_server::clock::ManualClock::new(1_700_000_000_000);
    let server = ServerBuilder::new()
        .token("tenant-rt", TOKEN)
        .in_memory()
        .clock(clock.clone())
        .feed_retention(Duration::from_secs(3600))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let writer = Writer::new(&server.url());
    writer.create(1..=3).await;
    clock.advance_millis(2 * 3600 * 1000);
    server.purge_expired().await.unwrap();

    let service = RealtimeService::start(config(&server.url())).await.unwrap();
    let mut messages = service.messages().unwrap();
    match next(&mut messages).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!(r.stale_cursor, Some(0));
            assert_eq!(r.resume_cursor, 3);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    writer.create([4]).await;
    assert_eq!(next_change(&mut messages).await.cursor, 4);
    service.shutdown().await;
}

/// A WebSocket that never opens (a proxy refusing upgrades) does not stall
/// a resync: the polled 410 carries the feed's head, the app gets its
/// `Resync` there and polling delivers what follows.
#[tokio::test]
async fn a_polled_410_resyncs_and_polls_on_while_the_websocket_is_refused() {
    let clock = guardian_server::clock::ManualClock::new(1_700_000_000_000);
    let server = ServerBuilder::new()
        .token("tenant-rt", TOKEN)
        .in_memory()
        .clock(clock.clone())
        .feed_retention(Duration::from_secs(3600))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let writer = Writer::new(&server.url());
    let proxy = Proxy::start(server.addr()).await;
    proxy.cut();
    writer.create(1..=3).await;
    clock.advance_millis(2 * 3600 * 1000);
    server.purge_expired().await.unwrap();

    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(proxy.url());
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    match next(&mut messages).await {
        RealtimeMessage::Resync(r) => assert_eq!((r.stale_cursor, r.resume_cursor), (Some(0), 3)),
        other => panic!("expected a resync, got {other:?}"),
    }
    wait_state(&service, ConnectionState::Polling).await;
    writer.create([4, 5]).await;
    assert_eq!(next_change(&mut messages).await.cursor, 4);
    assert_eq!(next_change(&mut messages).await.cursor, 5);
    // The WebSocket coming back later delivers nothing twice, and no
    // second resync.
    proxy.reopen();
    wait_state(&service, ConnectionState::Connected).await;
    writer.create([6]).await;
    assert_eq!(next(&mut messages).await.cursor(), 6);
    service.shutdown().await;
}

/// Six entities of the largest data the server takes by default (a page
/// after the first holds ~5 MB, each change is a ~1 MB message): a client
/// with the default limits reads them all, over the WebSocket and by
/// polling. With limits below the server's (the old defaults, 256 KiB
/// messages and 4 MiB poll bodies) it stayed at the first change for
/// good, reconnecting the WebSocket several times a second.
#[tokio::test]
async fn entities_as_large_as_the_server_takes_reach_a_default_client() {
    let server = server().await;
    let http = reqwest::Client::new();
    let big = "y".repeat(guardian_protocol::DEFAULT_BODY_LIMIT - 1000);
    for i in 0..6 {
        let data = if i == 0 {
            json!({"a": 1})
        } else {
            json!({"s": big})
        };
        let resp = http
            .post(format!("{}/v1/entities/note", server.url()))
            .bearer_auth(TOKEN)
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .json(&json!({ "id": format!("n{i}"), "data": data }))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    let proxy = Proxy::start(server.addr()).await;
    proxy.cut();
    for websocket in [true, false] {
        let mut cfg = RealtimeConfig::new(server.url(), Arc::new(StaticToken::new(TOKEN)));
        cfg.start_from = StartFrom::After(0);
        cfg.poll_interval = Duration::from_millis(50);
        if !websocket {
            cfg.realtime_url = Some(proxy.url());
        }
        let service = RealtimeService::start(cfg).await.unwrap();
        let mut messages = service.messages().unwrap();
        let got = expect_cursors(&mut messages, 1, 6).await;
        assert_eq!(got[5].data["s"].as_str().map(str::len), Some(big.len()));
        service.shutdown().await;
    }
}

/// A first start with no saved cursor (`StartFrom::Latest`) behind a proxy
/// that refuses WebSockets follows the feed by polling from its head: what
/// was there before the start is not delivered, what comes after is.
#[tokio::test]
async fn a_first_start_follows_the_feed_by_polling_when_websockets_are_refused() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let proxy = Proxy::start(server.addr()).await;
    proxy.cut();
    writer.create(1..=3).await;

    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(proxy.url());
    cfg.start_from = StartFrom::Latest;
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Polling).await;
    writer.create([4]).await;
    let change = next_change(&mut messages).await;
    assert_eq!((change.cursor, change.id.as_str()), (4, "n4"));
    service.shutdown().await;
}

#[tokio::test]
async fn a_restart_resumes_after_the_consumed_cursor_saved_in_the_outbox() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
        .await
        .unwrap();
    writer.create(1..=5).await;

    let mut cfg = config(&server.url());
    cfg.cursor_store = Arc::new(OutboxCursorStore::new(outbox.clone()));
    let service = RealtimeService::start(cfg.clone()).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    // 3 was returned but not yet consumed: a crash now redelivers it.
    service.shutdown().await;
    assert_eq!(
        OutboxCursorStore::new(outbox.clone()).load().await.unwrap(),
        Some(2)
    );

    let service = RealtimeService::start(cfg.clone()).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 3, 3).await;
    messages.ack();
    service.shutdown().await;
    assert_eq!(
        outbox.meta_get("realtime.cursor").await.unwrap().as_deref(),
        Some("5")
    );
}

/// The outbox keeps the fingerprint of the consumed change beside its
/// cursor, and hands it back only with the cursor it was saved for: a
/// fingerprint left from another cursor (a crash between the two writes, a
/// cursor saved by an older build) or unreadable is no fingerprint, never
/// an error that would stop the feed.
#[tokio::test]
async fn the_outbox_keeps_the_fingerprint_with_its_cursor_only() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
        .await
        .unwrap();
    let store = OutboxCursorStore::new(outbox.clone());
    assert_eq!(store.load_position().await.unwrap(), None);
    let fp = ChangeFingerprint::of("note", "n3", 1);
    let at3 = FeedPosition {
        cursor: 3,
        fingerprint: Some(fp),
    };
    store.save_position(at3).await.unwrap();
    assert_eq!(store.load_position().await.unwrap(), Some(at3));
    assert_eq!(store.load().await.unwrap(), Some(3));
    assert_eq!(
        outbox.meta_get("realtime.cursor").await.unwrap().as_deref(),
        Some("3")
    );
    // A resync's position (no change known there) clears it.
    store.save_position(FeedPosition::bare(3)).await.unwrap();
    assert_eq!(
        store.load_position().await.unwrap(),
        Some(FeedPosition::bare(3))
    );
    // Written for 4, but the cursor stayed at 3 (a crash in between).
    store.save_position(at3).await.unwrap();
    outbox
        .meta_set("realtime.cursor.fingerprint", &format!("4:{fp}"))
        .await
        .unwrap();
    assert_eq!(
        store.load_position().await.unwrap(),
        Some(FeedPosition::bare(3))
    );
    outbox
        .meta_set("realtime.cursor.fingerprint", "3:not-a-fingerprint")
        .await
        .unwrap();
    assert_eq!(
        store.load_position().await.unwrap(),
        Some(FeedPosition::bare(3))
    );
    // The plain `save` of a cursor leaves no fingerprint behind.
    store.save_position(at3).await.unwrap();
    store.save(3).await.unwrap();
    assert_eq!(
        store.load_position().await.unwrap(),
        Some(FeedPosition::bare(3))
    );
}

/// A cursor store written before fingerprints existed: `load` and `save`
/// only.
#[derive(Debug, Clone, Default)]
struct CursorOnly(MemoryCursorStore);

impl CursorStore for CursorOnly {
    fn load(&self) -> futures::future::BoxFuture<'_, Result<Option<u64>, CursorStoreError>> {
        self.0.load()
    }

    fn save(&self, cursor: u64) -> futures::future::BoxFuture<'_, Result<(), CursorStoreError>> {
        self.0.save(cursor)
    }
}

/// Such a store keeps working: the service follows, saves the cursor and
/// resumes after it on a restart (without a fingerprint, as before).
#[tokio::test]
async fn a_store_that_keeps_only_the_cursor_still_resumes() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    writer.create(1..=3).await;
    let store = CursorOnly::default();
    let mut cfg = config(&server.url());
    cfg.cursor_store = Arc::new(store.clone());
    let service = RealtimeService::start(cfg.clone()).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    messages.ack();
    service.shutdown().await;
    assert_eq!(store.0.position(), Some(FeedPosition::bare(3)));

    writer.create(4..=5).await;
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 4, 2).await;
    messages.ack();
    service.shutdown().await;
    assert_eq!(store.0.get(), Some(5));
}

/// A WebSocket endpoint that sends `hello`, a malformed frame, an unknown
/// frame type, then a valid change.
async fn garbage_ws_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            let change = RealtimeFrame::Change {
                change: Change {
                    cursor: 1,
                    op: guardian_protocol::MutationKind::Create,
                    entity_type: "note".into(),
                    id: "n1".into(),
                    version: 1,
                    data: json!({}),
                },
            };
            for text in [
                json!({"type": "hello", "cursor": 0}).to_string(),
                "{not json".to_owned(),
                json!({"type": "surprise"}).to_string(),
                serde_json::to_string(&change).unwrap(),
            ] {
                ws.send(Message::text(text)).await.unwrap();
            }
            held.push(tokio::spawn(
                async move { while ws.next().await.is_some() {} },
            ));
        }
    });
    addr
}

#[tokio::test]
async fn malformed_frames_are_skipped_not_fatal() {
    let server = server().await;
    let fake = garbage_ws_server().await;
    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(format!("ws://{fake}/v1/realtime"));
    let store = MemoryCursorStore::new(None);
    cfg.cursor_store = Arc::new(store);
    cfg.start_from = StartFrom::Latest;
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    let c = next_change(&mut messages).await;
    assert_eq!((c.cursor, c.id.as_str()), (1, "n1"));
    assert_eq!(service.state(), ConnectionState::Connected);
    service.shutdown().await;
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let token = Arc::new(StaticToken::new(TOKEN));
    let mut c = RealtimeConfig::new("ftp://x", token.clone());
    assert!(RealtimeService::start(c.clone()).await.is_err());
    c.base_url = "http://127.0.0.1:1".into();
    c.max_frame_size = c.max_message_size + 1;
    assert!(RealtimeService::start(c.clone()).await.is_err());
    let mut c = RealtimeConfig::new("http://127.0.0.1:1", token);
    c.pong_deadline = Duration::ZERO;
    assert!(RealtimeService::start(c).await.is_err());
}

/// First connection: `hello` then a text frame above the client's frame
/// limit. Later connections: `hello` and a valid change.
async fn oversized_then_good_ws_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut first = true;
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            ws.send(Message::text(
                json!({"type": "hello", "cursor": 0}).to_string(),
            ))
            .await
            .unwrap();
            let text = if first {
                first = false;
                "x".repeat(200 * 1024)
            } else {
                serde_json::to_string(&RealtimeFrame::Change {
                    change: Change {
                        cursor: 1,
                        op: guardian_protocol::MutationKind::Create,
                        entity_type: "note".into(),
                        id: "n1".into(),
                        version: 1,
                        data: json!({}),
                    },
                })
                .unwrap()
            };
            let _ = ws.send(Message::text(text)).await;
            held.push(tokio::spawn(
                async move { while ws.next().await.is_some() {} },
            ));
        }
    });
    addr
}

#[tokio::test]
async fn an_oversized_frame_drops_the_connection_and_the_service_reconnects() {
    let server = server().await;
    let fake = oversized_then_good_ws_server().await;
    let metrics = Arc::new(SyncMetrics::new());
    let mut cfg = config(&server.url());
    cfg.realtime_url = Some(format!("ws://{fake}/v1/realtime"));
    cfg.start_from = StartFrom::Latest;
    cfg.max_frame_size = 64 * 1024;
    cfg.metrics = Some(Arc::clone(&metrics));
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    let c = next_change(&mut messages).await;
    assert_eq!((c.cursor, c.id.as_str()), (1, "n1"));
    assert_eq!(metrics.get(Counter::RealtimeReconnects), 1);
    service.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_saved_cursor_fails_start_instead_of_guessing() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
        .await
        .unwrap();
    outbox.meta_set("realtime.cursor", "twelve").await.unwrap();
    let mut cfg = config("http://127.0.0.1:1");
    cfg.cursor_store = Arc::new(OutboxCursorStore::new(outbox));
    let err = RealtimeService::start(cfg).await.unwrap_err();
    assert!(err.to_string().contains("twelve"), "{err}");
}

/// A feed endpoint from a backend without `head`: every request gets an
/// empty page (`{"changes":[],"next":0}`) and is counted, as is every
/// connection to its (refusing) WebSocket port.
async fn headless_feed() -> (SocketAddr, SocketAddr, watch::Receiver<(u32, u32)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, ws_addr) = (http.local_addr().unwrap(), ws.local_addr().unwrap());
    let (counts, rx) = watch::channel((0u32, 0u32));
    let counts = Arc::new(counts);
    let polls = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = http.accept().await {
            let polls = Arc::clone(&polls);
            tokio::spawn(async move {
                let body = r#"{"changes":[],"next":0}"#;
                let mut buf = vec![0u8; 4096];
                // One request per read is enough for reqwest's small GETs.
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    polls.send_modify(|c| c.0 += 1);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = ws.accept().await {
            counts.send_modify(|c| c.1 += 1);
            drop(stream); // refused: closed at once
        }
    });
    (http_addr, ws_addr, rx)
}

/// Against a backend whose feed reports no `head`, a first start from the
/// latest cannot learn a baseline by polling: the service asks once, notes
/// it, and then only retries the WebSocket (no poll per interval, no
/// delivery, state `disconnected`).
#[tokio::test]
async fn without_a_head_in_the_feed_a_first_start_waits_for_the_websocket() {
    let (http, ws, mut counts) = headless_feed().await;
    let mut cfg = config(&format!("http://{http}"));
    cfg.realtime_url = Some(format!("ws://{ws}/v1/realtime"));
    cfg.start_from = StartFrom::Latest;
    let service = RealtimeService::start(cfg).await.unwrap();
    // Several reconnect attempts, each with poll intervals in between.
    tokio::time::timeout(WAIT, counts.wait_for(|c| c.1 >= 6))
        .await
        .expect("reconnect attempts")
        .unwrap();
    assert_eq!(counts.borrow().0, 1, "one feed request, then none");
    assert_eq!(service.state(), ConnectionState::Disconnected);
    service.shutdown().await;
}

/// A token that the server refuses until the first refresh replaces it.
#[derive(Debug)]
struct StaleUntilRefreshed {
    current: Mutex<String>,
    refreshes: std::sync::atomic::AtomicUsize,
}

impl guardian_sync::transport::TokenProvider for StaleUntilRefreshed {
    fn token(
        &self,
    ) -> futures::future::BoxFuture<'_, Result<String, guardian_sync::transport::TokenError>> {
        let t = self.current.lock().unwrap().clone();
        Box::pin(async move { Ok(t) })
    }

    fn refresh(
        &self,
    ) -> futures::future::BoxFuture<'_, Result<String, guardian_sync::transport::TokenError>> {
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        TOKEN.clone_into(&mut self.current.lock().unwrap());
        Box::pin(async { Ok(TOKEN.to_owned()) })
    }
}

/// A poll refused with 401 refreshes the token once (through the
/// transport's single-flight refresh) and goes on polling with the new one.
#[tokio::test]
async fn a_refused_poll_refreshes_the_token_once_and_polls_on() {
    let server = server().await;
    let writer = Writer::new(&server.url());
    let proxy = Proxy::start(server.addr()).await;
    proxy.cut();
    writer.create(1..=2).await;
    let tokens = Arc::new(StaleUntilRefreshed {
        current: Mutex::new("stale".to_owned()),
        refreshes: std::sync::atomic::AtomicUsize::new(0),
    });
    let mut cfg = config(&server.url());
    cfg.tokens = tokens.clone();
    cfg.realtime_url = Some(proxy.url());
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 2).await;
    writer.create([3]).await;
    expect_cursors(&mut messages, 3, 1).await;
    assert_eq!(
        tokens.refreshes.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    service.shutdown().await;
}
