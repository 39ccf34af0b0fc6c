//! The realtime follower (`RealtimeService`: feed polls and the WebSocket)
//! against a hostile or broken server: raw-TCP fakes on 127.0.0.1 that
//! answer `GET /v1/changes` with whatever the test scripts, fake WebSocket
//! endpoints that misbehave, and the reference server restored from a
//! backup. Whatever the server does, the service must not hang, grow
//! without bound, deliver garbage, skip changes silently, or move its
//! cursor past what it delivered.
//!
//! Every wait is bounded; no test sleeps to wait for a condition (the fakes
//! pace their own output, which is the behaviour under test).
//!
//! A test marked `#[ignore = "..."]` fails on the current code and its
//! reason names what goes wrong and what fixing it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use guardian_protocol::{Change, ChangeFingerprint, ChangesPage, MutationKind, RealtimeFrame};
use guardian_server::ServerBuilder;
use guardian_sync::realtime::{
    ConnectionState, FeedPosition, MemoryCursorStore, RealtimeConfig, RealtimeMessage,
    RealtimeMessages, RealtimeService, StartFrom,
};
use guardian_sync::telemetry::{Counter, SyncMetrics};
use guardian_sync::transport::StaticToken;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "tok-hostile-feed";
/// Bound on waiting for something that must happen.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on waiting for something a defective client never does.
const SHORT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Wire values

fn change(cursor: u64) -> Change {
    Change {
        cursor,
        op: MutationKind::Update,
        entity_type: "note".into(),
        id: format!("n{cursor}"),
        version: 1,
        data: json!({ "c": cursor.to_string() }),
    }
}

fn change_frame(cursor: u64) -> String {
    serde_json::to_string(&RealtimeFrame::Change {
        change: change(cursor),
    })
    .unwrap()
}

fn hello_frame(cursor: u64) -> String {
    serde_json::to_string(&RealtimeFrame::Hello { cursor }).unwrap()
}

fn page_body(cursors: &[u64], head: Option<u64>) -> String {
    serde_json::to_string(&ChangesPage {
        changes: cursors.iter().map(|c| change(*c)).collect(),
        next: cursors.last().copied().unwrap_or(0),
        head,
    })
    .unwrap()
}

// ---------------------------------------------------------------------------
// A raw HTTP feed server

/// What the fake feed does with one request.
enum Act {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Writes this chunk again every `every` (zero: as fast as possible)
    /// until the client goes away, which is counted.
    Forever { chunk: Vec<u8>, every: Duration },
}

/// A response with `body` and a correct `Content-Length`.
fn respond(status: u16, content_type: &str, body: &str) -> Act {
    Act::Send(
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn ok_page(cursors: &[u64], head: Option<u64>) -> Act {
    respond(200, "application/json", &page_body(cursors, head))
}

/// Headers of a chunked 200 whose body follows in `Act::Forever`.
fn chunked_head() -> Act {
    Act::Send(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec(),
    )
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// A correct feed of `cursors` (answering `since` and `limit` as the
/// protocol says), with `head`.
fn honest(cursors: &[u64], head: Option<u64>, since: u64, limit: usize) -> Vec<Act> {
    let after: Vec<u64> = cursors
        .iter()
        .copied()
        .filter(|c| *c > since)
        .take(limit)
        .collect();
    vec![ok_page(&after, head)]
}

#[derive(Debug, Clone, Default)]
struct FeedStats {
    /// `(since, limit)` of every request, in arrival order.
    requests: Vec<(u64, usize)>,
    /// Responses the client abandoned while `Act::Forever` was writing.
    abandoned: u32,
}

type FeedScript = Arc<dyn Fn(usize, u64, usize) -> Vec<Act> + Send + Sync>;

struct FeedFake {
    url: String,
    stats: watch::Receiver<FeedStats>,
}

impl FeedFake {
    fn requests(&self) -> Vec<(u64, usize)> {
        self.stats.borrow().requests.clone()
    }

    async fn wait(&mut self, what: &str, f: impl FnMut(&FeedStats) -> bool) {
        let waited = tokio::time::timeout(WAIT, self.stats.wait_for(f))
            .await
            .map(|r| r.map(|_| ()));
        if waited.is_err() {
            panic!("{what} did not happen in time: {:?}", self.requests());
        }
    }
}

/// A `GET /v1/changes` server on 127.0.0.1 answering the `n`th request
/// (from 0) with `script(n, since, limit)`, one request per connection.
async fn feed(script: impl Fn(usize, u64, usize) -> Vec<Act> + Send + Sync + 'static) -> FeedFake {
    let script: FeedScript = Arc::new(script);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = watch::channel(FeedStats::default());
    let tx = Arc::new(tx);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (script, tx) = (Arc::clone(&script), Arc::clone(&tx));
            tokio::spawn(serve_feed(socket, script, tx));
        }
    });
    FeedFake { url, stats: rx }
}

async fn serve_feed(
    mut socket: TcpStream,
    script: FeedScript,
    stats: Arc<watch::Sender<FeedStats>>,
) {
    let Some((since, limit)) = read_feed_request(&mut socket).await else {
        return;
    };
    let mut n = 0;
    stats.send_modify(|s| {
        n = s.requests.len();
        s.requests.push((since, limit));
    });
    for act in script(n, since, limit) {
        match act {
            Act::Send(bytes) => {
                if socket.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Act::Forever { chunk, every } => loop {
                if socket.write_all(&chunk).await.is_err() || socket.flush().await.is_err() {
                    stats.send_modify(|s| s.abandoned += 1);
                    return;
                }
                if !every.is_zero() {
                    tokio::time::sleep(every).await; // the drip itself
                }
            },
        }
    }
    let _ = socket.flush().await;
    let _ = socket.shutdown().await;
}

/// Reads one request head and returns its `since` and `limit`.
async fn read_feed_request(socket: &mut TcpStream) -> Option<(u64, usize)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split(' ').nth(1)?;
    assert!(
        path.starts_with("/v1/changes?"),
        "unexpected request {path}"
    );
    let query = path.split_once('?')?.1;
    let mut since = 0;
    let mut limit = 0;
    for pair in query.split('&') {
        match pair.split_once('=')? {
            ("since", v) => since = v.parse().ok()?,
            ("limit", v) => limit = v.parse().ok()?,
            _ => {}
        }
    }
    Some((since, limit))
}

// ---------------------------------------------------------------------------
// A scripted WebSocket endpoint

/// What the fake WebSocket does on one connection.
enum WsPlan {
    /// Closes the TCP connection at once (no upgrade).
    Refuse,
    /// Accepts TCP and never answers the upgrade.
    NoHandshake,
    /// Upgrades, then does these steps.
    Steps(Vec<Ws>),
}

enum Ws {
    Text(String),
    Binary(Vec<u8>),
    /// Bytes written straight to the socket (frames of our own making).
    Raw(Vec<u8>),
    /// Stays open, reading (so pings are answered) until the client leaves.
    Hold,
    /// Stays open and never reads or writes again.
    Silent,
}

type WsScript = Arc<dyn Fn(usize) -> WsPlan + Send + Sync>;

/// A WebSocket endpoint on 127.0.0.1 following `script(n)` on its `n`th
/// connection; the receiver counts connections.
async fn ws_fake(
    script: impl Fn(usize) -> WsPlan + Send + Sync + 'static,
) -> (SocketAddr, watch::Receiver<usize>) {
    let script: WsScript = Arc::new(script);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, rx) = watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut n = 0;
            count.send_modify(|c| {
                n = *c;
                *c += 1;
            });
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                match script(n) {
                    WsPlan::Refuse => drop(stream),
                    WsPlan::NoHandshake => {
                        let _held = stream;
                        std::future::pending::<()>().await;
                    }
                    WsPlan::Steps(steps) => run_ws(stream, steps).await,
                }
            });
        }
    });
    (addr, rx)
}

async fn run_ws(stream: TcpStream, steps: Vec<Ws>) {
    // Ends only at `Hold` (when the client leaves) or never (`Silent`).
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    for step in steps {
        match step {
            Ws::Text(t) => {
                if ws.send(Message::text(t)).await.is_err() {
                    return;
                }
            }
            Ws::Binary(b) => {
                if ws.send(Message::binary(b)).await.is_err() {
                    return;
                }
            }
            Ws::Raw(bytes) => {
                let tcp = ws.get_mut();
                if tcp.write_all(&bytes).await.is_err() || tcp.flush().await.is_err() {
                    return;
                }
            }
            Ws::Hold => {
                while ws.next().await.is_some_and(|r| r.is_ok()) {}
                return;
            }
            Ws::Silent => break,
        }
    }
    let _held = ws;
    std::future::pending::<()>().await;
}

// ---------------------------------------------------------------------------
// The client

fn config(base_url: &str, ws: SocketAddr) -> RealtimeConfig {
    let mut c = RealtimeConfig::new(base_url, Arc::new(StaticToken::new(TOKEN)));
    c.realtime_url = Some(format!("ws://{ws}/v1/realtime"));
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

async fn next_within(messages: &mut RealtimeMessages, within: Duration) -> RealtimeMessage {
    tokio::time::timeout(within, messages.next())
        .await
        .expect("no message in time")
        .expect("message stream ended")
}

async fn next_change(messages: &mut RealtimeMessages) -> Change {
    match next_within(messages, SHORT).await {
        RealtimeMessage::Change { change } => change,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// The next `n` messages are changes `first..first + n`, nothing between.
async fn expect_cursors(messages: &mut RealtimeMessages, first: u64, n: u64) {
    for expected in first..first + n {
        let c = next_change(messages).await;
        assert_eq!(
            (c.cursor, c.id.as_str()),
            (expected, format!("n{expected}").as_str()),
            "changes lost, reordered or invented"
        );
    }
}

async fn wait_state(service: &RealtimeService, want: ConnectionState) {
    let mut rx = service.state_receiver();
    tokio::time::timeout(WAIT, rx.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("state never became {want}, is {}", service.state()))
        .unwrap();
}

async fn wait_count(rx: &mut watch::Receiver<usize>, at_least: usize) {
    let waited = tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= at_least))
        .await
        .map(|r| r.map(|_| ()));
    assert!(waited.is_ok(), "only {} connections", *rx.borrow());
}

async fn shutdown_promptly(service: RealtimeService) {
    tokio::time::timeout(SHORT, service.shutdown())
        .await
        .expect("shutdown hung");
}

// ---------------------------------------------------------------------------
// Feed pages: loops, sizes, time

/// A feed that ignores `since` and always answers the same changes with
/// an absurd `head`: the client takes them once, notices the next page
/// brought nothing new and stops, instead of looping on it.
#[tokio::test]
async fn a_page_that_ignores_since_is_not_fetched_in_a_loop() {
    let mut fake = feed(|_, _, _| vec![ok_page(&[1, 2, 3], Some(u64::MAX))]).await;
    let (ws, mut attempts) = ws_fake(|_| WsPlan::Refuse).await;
    let mut cfg = config(&fake.url, ws);
    // One poll round only (the first, at once); then only reconnects.
    cfg.poll_interval = Duration::from_secs(3600);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    // Reconnect attempts go on: the driver is out of the poll round.
    wait_count(&mut attempts, 6).await;
    fake.wait("two requests", |s| s.requests.len() >= 2).await;
    assert_eq!(fake.requests(), vec![(0, 100), (3, 100)]);
    assert_eq!(service.delivered_cursor(), Some(3));
    shutdown_promptly(service).await;
}

/// A page body that never ends (chunked, streamed as fast as the socket
/// takes it) is cut at `max_poll_body`, long before `http_timeout`: the
/// client drops the connection and delivers nothing from it.
#[tokio::test]
async fn an_endless_page_body_is_cut_at_the_size_limit() {
    let mut fake = feed(|_, _, _| {
        vec![
            chunked_head(),
            Act::Send(chunk(br#"{"changes":["#)),
            Act::Forever {
                chunk: chunk(&[b' '; 16 * 1024]),
                every: Duration::ZERO,
            },
        ]
    })
    .await;
    let (ws, _) = ws_fake(|_| WsPlan::Refuse).await;
    let mut cfg = config(&fake.url, ws);
    cfg.max_poll_body = 64 * 1024;
    cfg.http_timeout = Duration::from_secs(600);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    fake.wait("an abandoned response", |s| s.abandoned >= 1)
        .await;
    assert_ne!(service.state(), ConnectionState::Polling);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), messages.next())
            .await
            .is_err(),
        "something was delivered from a broken page"
    );
    shutdown_promptly(service).await;
}

/// A page that drips one byte at a time forever stays under the size
/// limit; `http_timeout` must end it.
#[tokio::test]
async fn a_page_that_drips_forever_is_abandoned_at_the_http_timeout() {
    let mut fake = feed(|_, _, _| {
        vec![
            chunked_head(),
            Act::Forever {
                chunk: chunk(b" "),
                every: Duration::from_millis(20),
            },
        ]
    })
    .await;
    let (ws, _) = ws_fake(|_| WsPlan::Refuse).await;
    let mut cfg = config(&fake.url, ws);
    cfg.http_timeout = Duration::from_millis(500);
    let service = RealtimeService::start(cfg).await.unwrap();
    fake.wait("an abandoned response", |s| s.abandoned >= 1)
        .await;
    assert_ne!(service.state(), ConnectionState::Polling);
    shutdown_promptly(service).await;
}

/// A feed that always has more (every page full, `head` at `u64::MAX`,
/// thousands of changes a second): delivery stays contiguous, the service
/// fetches no further ahead than its channel (no unbounded buffering), and
/// shutdown is prompt in the middle of it.
#[tokio::test]
async fn an_endless_feed_is_followed_in_order_with_bounded_read_ahead() {
    let fake = feed(|_, since, limit| {
        let cursors: Vec<u64> = (since + 1..=since + limit as u64).collect();
        vec![ok_page(&cursors, Some(u64::MAX))]
    })
    .await;
    let (ws, _) = ws_fake(|_| WsPlan::Refuse).await;
    let mut cfg = config(&fake.url, ws);
    cfg.page_size = 50;
    cfg.channel_capacity = 16;
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 2000).await;
    let pages = fake.requests().len();
    // 2000 consumed + 16 queued + one page in hand, in pages of 50.
    assert!(
        pages <= 43,
        "{pages} pages fetched for 2000 consumed changes"
    );
    shutdown_promptly(service).await;
}

// ---------------------------------------------------------------------------
// WebSocket misbehaviour

/// A WebSocket endpoint that accepts TCP and never answers the upgrade is
/// given up at `connect_timeout`; polling takes over meanwhile.
#[tokio::test]
async fn an_upgrade_that_is_never_answered_times_out_and_polling_takes_over() {
    let fake = feed(|_, since, limit| honest(&[1, 2], Some(2), since, limit)).await;
    let (ws, mut attempts) = ws_fake(|_| WsPlan::NoHandshake).await;
    let mut cfg = config(&fake.url, ws);
    cfg.connect_timeout = Duration::from_millis(300);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 2).await;
    wait_state(&service, ConnectionState::Polling).await;
    wait_count(&mut attempts, 2).await;
    shutdown_promptly(service).await;
}

/// A text frame whose header promises 60 000 bytes and that never
/// finishes: the half-read frame must not keep the connection "alive";
/// the ping deadline ends it and polling catches up.
#[tokio::test]
async fn a_frame_that_never_finishes_is_dropped_at_the_pong_deadline() {
    let fake = feed(|_, since, limit| honest(&[1], Some(1), since, limit)).await;
    let (ws, _) = ws_fake(|n| {
        if n > 0 {
            return WsPlan::Refuse;
        }
        let mut partial = vec![0x81, 0x7E, 0xEA, 0x60]; // FIN text, 60 000 bytes
        partial.extend_from_slice(b"{\"type\":\"c");
        WsPlan::Steps(vec![Ws::Text(hello_frame(0)), Ws::Raw(partial), Ws::Silent])
    })
    .await;
    let service = RealtimeService::start(config(&fake.url, ws)).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Connected).await;
    wait_state(&service, ConnectionState::Polling).await;
    expect_cursors(&mut messages, 1, 1).await;
    shutdown_promptly(service).await;
}

/// Binary frames are skipped, and a close frame with an invalid code (999)
/// is a broken connection, not a `cursor-expired`: the service reconnects
/// from its cursor and the app gets no spurious `Resync`.
#[tokio::test]
async fn binary_frames_and_a_garbage_close_frame_neither_resync_nor_stall() {
    let fake = feed(|_, _, _| vec![respond(503, "text/plain", "down")]).await;
    let metrics = Arc::new(SyncMetrics::new());
    let (ws, _) = ws_fake(|n| {
        if n == 0 {
            WsPlan::Steps(vec![
                Ws::Text(hello_frame(0)),
                Ws::Binary(vec![0xFF; 1000]),
                Ws::Text(change_frame(1)),
                Ws::Binary(br#"{"type":"change","change":{"cursor":2}}"#.to_vec()),
                Ws::Raw(vec![0x88, 0x05, 0x03, 0xE7, 0xC3, 0x28, 0x21]),
                Ws::Silent,
            ])
        } else {
            WsPlan::Steps(vec![
                Ws::Text(hello_frame(1)),
                Ws::Text(change_frame(2)),
                Ws::Hold,
            ])
        }
    })
    .await;
    let mut cfg = config(&fake.url, ws);
    cfg.metrics = Some(Arc::clone(&metrics));
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 2).await;
    assert_eq!(metrics.get(Counter::RealtimeReconnects), 1);
    shutdown_promptly(service).await;
}

/// A 410 whose body is not a problem document (an HTML error page) still
/// starts a resync: nothing after the refused cursor is delivered until
/// the WebSocket's `hello` says where the feed is, and then the app gets a
/// `Resync` naming the stale cursor before any change.
#[tokio::test]
async fn a_410_with_a_garbage_body_resyncs_at_the_next_hello() {
    let fake = feed(|_, _, _| vec![respond(410, "text/html", "<html><h1>Gone</h1>")]).await;
    let (ws, _) = ws_fake(|n| {
        if n < 3 {
            WsPlan::Refuse
        } else {
            WsPlan::Steps(vec![
                Ws::Text(hello_frame(7)),
                Ws::Text(change_frame(8)),
                Ws::Hold,
            ])
        }
    })
    .await;
    let mut cfg = config(&fake.url, ws);
    cfg.start_from = StartFrom::After(2);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    match next_within(&mut messages, WAIT).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!((r.stale_cursor, r.resume_cursor), (Some(2), 7), "{r:?}");
        }
        other => panic!("expected a resync first, got {other:?}"),
    }
    expect_cursors(&mut messages, 8, 1).await;
    shutdown_promptly(service).await;
}

// ---------------------------------------------------------------------------
// Holes and a feed that went back: told to the app or filled, never skipped

/// A server restored from a backup (or any server that lost data) says in
/// its `hello` that its feed ends at 3, below the client's cursor 10; the
/// changes it then writes (4, 5, ...) are new. Ignoring the `hello` would
/// drop 4..=10 as "already delivered"; the app gets a `Resync` to 3
/// instead, then 4.
#[tokio::test]
async fn a_hello_below_the_delivered_cursor_is_reported_as_a_resync() {
    let fake = feed(|_, _, _| vec![respond(503, "text/plain", "down")]).await;
    let (ws, _) = ws_fake(|_| {
        WsPlan::Steps(vec![
            Ws::Text(hello_frame(3)),
            Ws::Text(change_frame(4)),
            Ws::Hold,
        ])
    })
    .await;
    let mut cfg = config(&fake.url, ws);
    cfg.start_from = StartFrom::After(10);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    match next_within(&mut messages, SHORT).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!((r.stale_cursor, r.resume_cursor), (Some(10), 3), "{r:?}");
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    expect_cursors(&mut messages, 4, 1).await;
    shutdown_promptly(service).await;
}

/// Same over polling: every page says the feed's `head` is 5 while the
/// client stands at 10. Rather than polling after 10 forever with nothing
/// delivered, the client resyncs to 5.
#[tokio::test]
async fn a_page_head_below_the_delivered_cursor_is_reported_as_a_resync() {
    let fake = feed(|_, since, limit| honest(&[1, 2, 3, 4, 5], Some(5), since, limit)).await;
    let (ws, _) = ws_fake(|_| WsPlan::Refuse).await;
    let store = MemoryCursorStore::new(Some(10));
    let mut cfg = config(&fake.url, ws);
    cfg.cursor_store = Arc::new(store.clone());
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    wait_state(&service, ConnectionState::Polling).await;
    match next_within(&mut messages, SHORT).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!((r.stale_cursor, r.resume_cursor), (Some(10), 5), "{r:?}");
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    shutdown_promptly(service).await;
}

/// The WebSocket skips cursor 2 (1, then 3) while the feed holds 2: the
/// client does not deliver 3 over the hole; it ends the session and the
/// catch-up poll reads 2 and 3 from the feed.
#[tokio::test]
async fn a_websocket_gap_is_filled_from_the_feed() {
    let fake = feed(|_, since, limit| honest(&[1, 2, 3], Some(3), since, limit)).await;
    let (ws, _) = ws_fake(|_| {
        WsPlan::Steps(vec![
            Ws::Text(hello_frame(0)),
            Ws::Text(change_frame(1)),
            Ws::Text(change_frame(3)),
            Ws::Hold,
        ])
    })
    .await;
    let service = RealtimeService::start(config(&fake.url, ws)).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    shutdown_promptly(service).await;
}

/// A change frame that does not parse (an unknown `op`) is not skipped
/// (the next change would move the cursor past it for good): the session
/// ends and the catch-up poll reads change 2 from the feed.
#[tokio::test]
async fn a_malformed_change_frame_does_not_lose_the_change() {
    let fake = feed(|_, since, limit| honest(&[1, 2, 3], Some(3), since, limit)).await;
    let (ws, _) = ws_fake(|_| {
        let broken = change_frame(2).replace("\"update\"", "\"explode\"");
        WsPlan::Steps(vec![
            Ws::Text(hello_frame(0)),
            Ws::Text(change_frame(1)),
            Ws::Text(broken),
            Ws::Text(change_frame(3)),
            Ws::Hold,
        ])
    })
    .await;
    let service = RealtimeService::start(config(&fake.url, ws)).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    shutdown_promptly(service).await;
}

/// One bogus frame with cursor `u64::MAX` is a gap: delivering it would
/// make every real change "already delivered" and save `u64::MAX`. It ends
/// the session instead, and the feed brings 2 and 3.
#[tokio::test]
async fn a_bogus_huge_cursor_does_not_swallow_later_changes() {
    let fake = feed(|_, since, limit| honest(&[1, 2, 3], Some(3), since, limit)).await;
    let (ws, _) = ws_fake(|_| {
        WsPlan::Steps(vec![
            Ws::Text(hello_frame(0)),
            Ws::Text(change_frame(1)),
            Ws::Text(change_frame(u64::MAX)),
            Ws::Text(change_frame(2)),
            Ws::Text(change_frame(3)),
            Ws::Hold,
        ])
    })
    .await;
    let store = MemoryCursorStore::new(None);
    let mut cfg = config(&fake.url, ws);
    cfg.cursor_store = Arc::new(store.clone());
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    messages.ack();
    shutdown_promptly(service).await;
    assert_eq!(store.get(), Some(3));
}

/// A page whose changes are not in cursor order ([3, 2, 1]) is sorted:
/// delivering 3 first would drop 1 and 2, in hand, as duplicates.
#[tokio::test]
async fn a_page_out_of_cursor_order_loses_nothing() {
    let fake = feed(|_, since, limit| {
        let mut after: Vec<u64> = [1, 2, 3]
            .into_iter()
            .filter(|c| *c > since)
            .take(limit)
            .collect();
        after.reverse();
        vec![ok_page(&after, Some(3))]
    })
    .await;
    let (ws, _) = ws_fake(|_| WsPlan::Refuse).await;
    let service = RealtimeService::start(config(&fake.url, ws)).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 3).await;
    shutdown_promptly(service).await;
}

// ---------------------------------------------------------------------------
// The reference server restored from a backup

/// Writes to the reference server over plain HTTP, as another client would.
async fn create(url: &str, prefix: &str, ids: impl IntoIterator<Item = u64>) {
    let ops: Vec<_> = ids
        .into_iter()
        .map(|i| {
            json!({"op": "create", "type": "note", "id": format!("{prefix}{i}"),
                   "data": {"i": i}, "idempotency_key": uuid::Uuid::new_v4().to_string()})
        })
        .collect();
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/batch"))
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

async fn server_on(db: &std::path::Path, addr: &str) -> guardian_server::RunningServer {
    ServerBuilder::new()
        .token("tenant-feed", TOKEN)
        .database(db)
        .bind(addr)
        .await
        .unwrap()
}

/// A consistent copy of the running server's database at `to`, taken
/// through SQLite (`VACUUM INTO`) so no file is copied while open.
fn backup_db(from: &std::path::Path, to: &std::path::Path) {
    let conn = rusqlite::Connection::open(from).unwrap();
    conn.execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .unwrap();
}

/// A TCP proxy to `upstream` that can drop every connection and refuse new
/// ones (both the feed and the WebSocket go through it).
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, open_rx) = watch::channel(true);
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let tracked = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*open_rx.borrow() {
                    continue; // refused: dropped at once
                }
                tracked.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self { addr, open, conns }
    }

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

/// A server on a new database holding `n1..=n5`, with a backup of it
/// taken at 2 (`backup.db` beside it, in the returned dir).
async fn backed_up_at_2_then_at_5() -> (tempfile::TempDir, guardian_server::RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let server = server_on(&db, "127.0.0.1:0").await;
    create(&server.url(), "n", 1..=2).await;
    backup_db(&db, &dir.path().join("backup.db"));
    create(&server.url(), "n", 3..=5).await;
    (dir, server)
}

/// Polling only, against `url`, keeping its cursor in `store`.
fn polling(url: &str, addr: SocketAddr, store: &MemoryCursorStore) -> RealtimeConfig {
    let mut cfg = config(url, addr);
    cfg.realtime_url = None;
    cfg.cursor_store = Arc::new(store.clone());
    cfg
}

/// The brief's backup scenario against the reference server: the client
/// followed the feed to 5, the server comes back from a backup taken at 2.
/// The server refuses the client's cursor as ahead of its feed (410), and
/// the app gets a `Resync` to 2, then the new change 3: no silent stall.
#[tokio::test]
async fn a_server_restored_from_a_backup_behind_the_client_is_reported_as_a_resync() {
    let (dir, second) = backed_up_at_2_then_at_5().await;
    let (addr, url) = (second.addr(), second.url());
    let backup = dir.path().join("backup.db");

    let store = MemoryCursorStore::new(None);
    let cfg = polling(&url, addr, &store);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 5).await;
    messages.ack();

    second.shutdown().await;
    // Restored: the backup serves on the same address.
    let third = server_on(&backup, &addr.to_string()).await;
    match next_within(&mut messages, WAIT).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!((r.stale_cursor, r.resume_cursor), (Some(5), 2), "{r:?}");
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    create(&url, "n", [3]).await;
    expect_cursors(&mut messages, 3, 1).await;
    messages.ack();
    shutdown_promptly(service).await;
    third.shutdown().await;
    assert_eq!(store.get(), Some(3));
}

/// The same backup, but the restored server takes writes (3..=6, new data)
/// before the client is back. Its head (6) is past the client's cursor, so
/// the cursor alone looks servable, and the new 3, 4 and 5 would be skipped
/// without a word. The client sends the fingerprint of the change it holds
/// at 5 (`since_fingerprint`); the restored feed's 5 is another change, so
/// the server refuses the cursor (410) and the app gets a `Resync`.
#[tokio::test]
async fn a_restored_server_that_took_writes_before_the_client_returned_is_detected() {
    let (dir, second) = backed_up_at_2_then_at_5().await;
    let (addr, url) = (second.addr(), second.url());
    let backup = dir.path().join("backup.db");

    let proxy = Proxy::start(addr).await;
    let store = MemoryCursorStore::new(None);
    let cfg = polling(&format!("http://{}", proxy.addr), addr, &store);
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 5).await;

    proxy.cut();
    second.shutdown().await;
    // Restored: the backup serves on the same address.
    let third = server_on(&backup, &addr.to_string()).await;
    create(&url, "m", 3..=6).await; // the restored timeline's 3..=6
    proxy.reopen();
    match next_within(&mut messages, WAIT).await {
        RealtimeMessage::Resync(r) => assert_eq!(r.stale_cursor, Some(5), "{r:?}"),
        RealtimeMessage::Change { change } => panic!(
            "the client skipped the restored feed's 3..=5 and went on with {} ({})",
            change.cursor, change.id
        ),
        other => panic!("unexpected {other:?}"),
    }
    // The feed is followed on from the restored head; the position saved
    // is the new timeline's, with its change's fingerprint.
    create(&url, "m", [7]).await;
    let c = next_change(&mut messages).await;
    assert_eq!((c.cursor, c.id.as_str()), (7, "m7"));
    messages.ack();
    shutdown_promptly(service).await;
    third.shutdown().await;
    assert_eq!(
        store.position(),
        Some(FeedPosition {
            cursor: 7,
            fingerprint: Some(ChangeFingerprint::of("note", "m7", 1)),
        })
    );
}

/// The same rewritten feed, met by a client that was not running: the
/// fingerprint saved with its cursor goes out with its first request after
/// the restart, so the rewrite is detected then too.
#[tokio::test]
async fn a_restarted_client_detects_a_rewritten_feed_by_its_saved_fingerprint() {
    let (dir, second) = backed_up_at_2_then_at_5().await;
    let (addr, url) = (second.addr(), second.url());
    let backup = dir.path().join("backup.db");

    let store = MemoryCursorStore::new(None);
    let cfg = polling(&url, addr, &store);
    let service = RealtimeService::start(cfg.clone()).await.unwrap();
    let mut messages = service.messages().unwrap();
    expect_cursors(&mut messages, 1, 5).await;
    messages.ack();
    shutdown_promptly(service).await;
    assert_eq!(
        store.position(),
        Some(FeedPosition {
            cursor: 5,
            fingerprint: Some(ChangeFingerprint::of("note", "n5", 1)),
        })
    );

    second.shutdown().await;
    let third = server_on(&backup, &addr.to_string()).await;
    create(&url, "m", 3..=6).await;
    let service = RealtimeService::start(cfg).await.unwrap();
    let mut messages = service.messages().unwrap();
    match next_within(&mut messages, WAIT).await {
        RealtimeMessage::Resync(r) => {
            assert_eq!((r.stale_cursor, r.resume_cursor), (Some(5), 6), "{r:?}");
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    messages.ack();
    shutdown_promptly(service).await;
    third.shutdown().await;
    // The resync reached 6 without its change: no fingerprint is kept.
    assert_eq!(store.position(), Some(FeedPosition::bare(6)));
}
