//! A real `SyncEngine` (SQLite outbox in a tempdir, the HTTP transport)
//! against a hostile or broken server: a scripted fake on loopback that
//! writes raw HTTP. Whatever it answers, the engine must not panic, hang,
//! lose or duplicate an op, or store a version or data the server did not
//! give.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use guardian_protocol::problem_type::DEPENDENCY_FAILED;
use guardian_sync::clock::{Clock as _, ManualClock, SharedClock, SystemClock};
use guardian_sync::engine::{BatchConfig, SyncEngine, SyncEngineBuilder, SyncEvent};
use guardian_sync::op::{NewOp, OpState, PendingOp};
use guardian_sync::outbox::{ListFilter, OutboxOptions};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::{HttpTransportConfig, StaticToken};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the fake server read it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The data the request carried, serialized as the client sent it.
    fn data(&self) -> String {
        self.json()["data"].to_string()
    }
}

/// What the fake server does with a connection after reading a request.
enum Act {
    Send(Vec<u8>),
    Sleep(Duration),
    /// Keeps the connection open and says nothing more, forever.
    Hang,
}

type Script = Arc<dyn Fn(usize, &Seen) -> Vec<Act> + Send + Sync>;

struct Fake {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A server on 127.0.0.1 that answers the `n`th request (from 0) as
/// `script` says, one request per connection.
async fn fake(script: impl Fn(usize, &Seen) -> Vec<Act> + Send + Sync + 'static) -> Fake {
    let script: Script = Arc::new(script);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (script, log) = (script.clone(), log.clone());
            tokio::spawn(async move { serve(socket, &script, &log).await });
        }
    });
    Fake { url, seen }
}

async fn serve(mut socket: TcpStream, script: &Script, log: &Mutex<Vec<Seen>>) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    let n = {
        let mut log = log.lock().unwrap();
        log.push(request.clone());
        log.len() - 1
    };
    for act in script(n, &request) {
        match act {
            Act::Send(bytes) => {
                if socket.write_all(&bytes).await.is_err() {
                    return;
                }
                let _ = socket.flush().await;
            }
            Act::Sleep(d) => tokio::time::sleep(d).await,
            Act::Hang => std::future::pending::<()>().await,
        }
    }
    let _ = socket.shutdown().await;
}

async fn read_request(socket: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let (method, path) = (start.next()?.to_owned(), start.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

/// A whole response with `body` and a correct `Content-Length`.
fn reply(status: u16, body: &str) -> Act {
    Act::Send(
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// An entity answer whose `data` is `data` (raw JSON text).
fn entity(ty: &str, id: &str, version: &str, data: &str) -> String {
    format!(
        r#"{{"type":"{ty}","id":"{id}","version":{version},"data":{data},"updated_at":"2026-12-05T00:00:00Z","deleted":false}}"#
    )
}

/// The entity answer a well-behaved server gives to `request` at `version`:
/// its data echoed byte for byte.
fn echo(request: &Seen, version: u64) -> String {
    echo_at(request, &version.to_string())
}

/// [`echo`] at `version`, given as raw JSON text (valid or not).
fn echo_at(request: &Seen, version: &str) -> String {
    let (ty, id) = target(request);
    entity(&ty, &id, version, &request.data())
}

/// The entity type and id a single-entity request is about.
fn target(request: &Seen) -> (String, String) {
    let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "entities", ty] => (
            (*ty).to_owned(),
            request.json()["id"].as_str().unwrap().to_owned(),
        ),
        ["v1", "entities", ty, id] => ((*ty).to_owned(), (*id).to_owned()),
        other => panic!("not an entity request: {other:?}"),
    }
}

/// One attempt of an op per drain: a retry is drawn with full jitter, so
/// even a 60 s backoff can come due within milliseconds, and the drain
/// would send it again. Under a clock that stands still it never does.
fn one_attempt_per_drain() -> (RetryPolicy, SharedClock) {
    let retry = RetryPolicy::new(
        Duration::from_secs(60),
        2.0,
        Duration::from_secs(60),
        20,
        Duration::from_secs(60),
    )
    .unwrap();
    (retry, ManualClock::new(SystemClock::new().now_millis()))
}

fn config(url: &str, timeout: Duration) -> HttpTransportConfig {
    HttpTransportConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: timeout,
        ..HttpTransportConfig::new(url)
    }
}

/// A builder of an engine on a fresh outbox in `dir`, coalescing off.
fn builder(dir: &tempfile::TempDir, http: HttpTransportConfig) -> SyncEngineBuilder {
    let (retry, clock) = one_attempt_per_drain();
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .outbox_options(OutboxOptions::default().coalesce(false))
        .http(http)
        .token_provider(Arc::new(StaticToken::new("tok")))
        .retry(retry)
        .clock(clock)
        .no_telemetry()
}

/// An engine on a fresh outbox in `dir`, coalescing off.
async fn engine_with(
    dir: &tempfile::TempDir,
    http: HttpTransportConfig,
    batching: bool,
) -> SyncEngine {
    let builder = builder(dir, http);
    let builder = if batching {
        builder.batching(BatchConfig::default())
    } else {
        builder.no_batching()
    };
    builder.build().await.unwrap()
}

async fn engine(dir: &tempfile::TempDir, fake: &Fake, batching: bool) -> SyncEngine {
    engine_with(dir, config(&fake.url, Duration::from_secs(5)), batching).await
}

/// One bounded drain pass: must end well within the test's budget.
async fn drain(engine: &SyncEngine) {
    tokio::time::timeout(Duration::from_secs(8), engine.drain_once())
        .await
        .expect("the drain did not end")
        .unwrap();
}

async fn ops(engine: &SyncEngine) -> Vec<PendingOp> {
    engine.outbox().list(ListFilter::default()).await.unwrap()
}

/// Asserts the op is kept pending after one attempt, with an error naming `what`.
fn assert_retried(op: &PendingOp, what: &str) {
    assert_eq!(op.state, OpState::Pending, "{op:?}");
    assert_eq!(op.attempts, 1, "{op:?}");
    let error = op.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains(what),
        "last error {error:?} should mention {what:?}"
    );
}

// ---------------------------------------------------------------------------
// Single requests: 2xx answers that are not the entity the request made.
// ---------------------------------------------------------------------------

/// 2xx answers to a create that are not a whole, single entity (trailing
/// garbage, duplicate keys, empty, not JSON, a version that is not a u64):
/// the op is kept and retried, never acked.
#[tokio::test]
async fn malformed_echoes_are_retried_not_acked() {
    type Body = fn(&Seen) -> String;
    let cases: Vec<(&str, Body)> = vec![
        ("trailing garbage", |r| format!("{}xyz", echo(r, 1))),
        ("two entities", |r| format!("{}{}", echo(r, 1), echo(r, 2))),
        ("duplicate version", |r| {
            echo(r, 1).replacen("\"version\":1", "\"version\":1,\"version\":2", 1)
        }),
        ("duplicate data", |r| {
            echo(r, 1).replacen("\"data\":", "\"data\":{\"x\":1},\"data\":", 1)
        }),
        ("empty", |_| String::new()),
        ("not json", |_| "<html>ok</html>".to_owned()),
        ("version float", |r| echo_at(r, "1.0")),
        ("version negative", |r| echo_at(r, "-1")),
        ("version 2^64", |r| echo_at(r, "18446744073709551616")),
        ("version string", |r| echo_at(r, "\"1\"")),
        ("data missing", |r| {
            let (ty, id) = target(r);
            format!(r#"{{"type":"{ty}","id":"{id}","version":1,"updated_at":"x","deleted":false}}"#)
        }),
    ];
    for (name, body) in cases {
        let server = fake(move |_, r| vec![reply(201, &body(r))]).await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, false).await;
        engine
            .enqueue(NewOp::create("device", "d1", json!({"on": true, "n": 1})))
            .await
            .unwrap();
        drain(&engine).await;
        let ops = ops(&engine).await;
        assert_eq!(ops.len(), 1, "{name}: the op was acked");
        assert_retried(&ops[0], "malformed entity");
        assert_eq!(server.seen().len(), 1, "{name}");
    }
}

/// Enqueues a create of `device/d1` and an update chained on it.
async fn create_then_update(engine: &SyncEngine) {
    engine
        .enqueue(NewOp::create("device", "d1", json!({"n": 0})))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::update("device", "d1", json!({"n": 1})))
        .await
        .unwrap();
}

/// A server version above `i64::MAX` is a valid `u64` on the wire, but the
/// outbox stores versions as SQLite integers: the ack clamped it to
/// `i64::MAX`, and the chained update went out with `If-Match` of a
/// version the server never gave. (Echoed data and a decoded entity take
/// the same way.)
#[tokio::test]
async fn a_version_the_outbox_cannot_store_never_becomes_an_if_match() {
    const HUGE: u64 = (i64::MAX as u64) + 1;
    for echoed in [true, false] {
        let server = fake(move |_, r| {
            let body = if echoed {
                echo(r, HUGE)
            } else {
                let (ty, id) = target(r);
                // The data sent, formatted otherwise: decoded, equal.
                entity(&ty, &id, &HUGE.to_string(), r#"{ "n": 0 }"#)
            };
            match r.method.as_str() {
                "POST" => vec![reply(201, &body)],
                _ => vec![reply(200, &echo(r, HUGE + 1))],
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, false).await;
        create_then_update(&engine).await;
        drain(&engine).await;
        for request in server.seen() {
            if let Some(if_match) = request.header("if-match") {
                assert_eq!(
                    if_match,
                    format!("\"{HUGE}\""),
                    "echoed: {echoed}: the update was sent against a version the server never gave"
                );
            }
        }
    }
}

/// A 2xx answer that is not the entity the request was about (another id,
/// another type), a tombstone for a create, or a version the protocol
/// never gives (0): it contradicts the request, so nothing says the op was
/// applied. It must be kept (a retry with the same key is safe: the
/// server replays it if it did apply it), not acked and deleted.
#[tokio::test]
async fn an_answer_about_another_entity_does_not_ack_the_op() {
    type Body = fn(&Seen) -> String;
    let cases: Vec<(&str, Body)> = vec![
        ("another id", |r| entity("device", "d2", "1", &r.data())),
        ("another type", |r| entity("lamp", "d1", "1", &r.data())),
        ("a tombstone", |r| {
            echo(r, 1).replacen("\"deleted\":false", "\"deleted\":true", 1)
        }),
        ("version 0", |r| entity("device", "d1", "0", &r.data())),
        // The same, not echoing the data sent (decoded whole).
        ("another id, decoded", |_| {
            entity("device", "d2", "1", r#"{"n":0,"x":1}"#)
        }),
    ];
    let mut acked = Vec::new();
    for (name, body) in cases {
        let server = fake(move |_, r| vec![reply(201, &body(r))]).await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, false).await;
        engine
            .enqueue(NewOp::create("device", "d1", json!({"n": 0})))
            .await
            .unwrap();
        drain(&engine).await;
        let ops = ops(&engine).await;
        if ops.is_empty() {
            acked.push(name);
        } else {
            assert_eq!(ops[0].state, OpState::Pending, "{name}");
        }
    }
    assert!(acked.is_empty(), "acked (deleted) on: {acked:?}");
}

// ---------------------------------------------------------------------------
// Slow, stuck and oversized answers.
// ---------------------------------------------------------------------------

/// Servers that never finish an answer: the drain ends within the request
/// timeout (plus slack), the op is kept pending with its attempt counted
/// and a timeout named, and nothing is acked.
#[tokio::test]
async fn stuck_servers_end_the_drain_at_the_request_timeout() {
    type Acts = fn() -> Vec<Act>;
    let cases: Vec<(&str, Acts)> = vec![
        ("never answers", || vec![Act::Hang]),
        ("headers, then no body", || {
            vec![
                Act::Send(
                    b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                      content-length: 200\r\n\r\n{\"type\""
                        .to_vec(),
                ),
                Act::Hang,
            ]
        }),
        ("half the status line", || {
            vec![Act::Send(b"HTTP/1.1 20".to_vec()), Act::Hang]
        }),
        ("40 bytes, one every 50 ms", || {
            let mut acts = vec![Act::Send(
                b"HTTP/1.1 201 Created\r\ncontent-length: 40\r\nconnection: close\r\n\r\n".to_vec(),
            )];
            for _ in 0..40 {
                acts.push(Act::Sleep(Duration::from_millis(50)));
                acts.push(Act::Send(b" ".to_vec()));
            }
            acts
        }),
        ("chunked, a chunk that never ends", || {
            vec![
                Act::Send(
                    b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n\
                      ffff\r\n{\"type\":"
                        .to_vec(),
                ),
                Act::Hang,
            ]
        }),
    ];
    let timeout = Duration::from_millis(300);
    for batching in [false, true] {
        for (name, acts) in &cases {
            let acts = *acts;
            let server = fake(move |_, _| acts()).await;
            let dir = tempfile::tempdir().unwrap();
            let engine = engine_with(&dir, config(&server.url, timeout), batching).await;
            for id in ["d1", "d2"] {
                engine
                    .enqueue(NewOp::create("device", id, json!({"on": true})))
                    .await
                    .unwrap();
            }
            let started = Instant::now();
            drain(&engine).await;
            let took = started.elapsed();
            assert!(
                took < timeout * 5,
                "{name} (batching {batching}): the drain took {took:?}"
            );
            let ops = ops(&engine).await;
            assert_eq!(
                ops.len(),
                2,
                "{name} (batching {batching}): an op was acked"
            );
            for op in &ops {
                assert_retried(op, "timed out");
            }
        }
    }
}

/// An applied op is reported (its ack written) within `ACK_DELAY` plus a
/// commit even when the next request hangs: before the drain's alarm, its
/// ack waited for the hung request's answer or timeout, with the op's
/// event, and after a crash the op would have been sent again.
#[tokio::test]
async fn an_applied_op_is_reported_while_the_next_request_hangs() {
    let server = fake(|n, request| match n {
        0 => vec![reply(201, &echo(request, 1))],
        _ => vec![Act::Hang],
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // One request at a time, so the ops behind the hung one stay claimed
    // and the ack group is not written for an empty queue. The ack's delay
    // must pass, so time runs.
    let engine = builder(&dir, config(&server.url, Duration::from_secs(60)))
        .clock(SystemClock::shared())
        .no_batching()
        .concurrency(1)
        .build()
        .await
        .unwrap();
    for id in ["d0", "d1", "d2"] {
        engine
            .enqueue(NewOp::create("device", id, json!({"on": true})))
            .await
            .unwrap();
    }
    let mut events = engine.events();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(stopped.map(drop)).await }
    });
    let reported = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await.unwrap() {
                SyncEvent::OpSucceeded { entity_id, .. } => break entity_id,
                _ => continue,
            }
        }
    })
    .await
    .expect("d0 was not reported while d1 hung");
    assert_eq!(reported, "d0");
    let left: Vec<String> = ops(&engine)
        .await
        .into_iter()
        .map(|op| op.entity_id)
        .collect();
    assert_eq!(left, ["d1", "d2"], "d0's ack is written");
    assert_eq!(server.seen().len(), 2, "d2 waits behind the hung d1");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), runner)
        .await
        .expect("the runner did not stop")
        .unwrap()
        .unwrap();
}

/// The response limit holds exactly: a body of `max_response_bytes` is
/// read, one byte more is refused (announced by `Content-Length`, or only
/// seen while streaming chunks) and the op kept.
#[tokio::test]
async fn a_body_at_the_limit_is_read_and_one_byte_over_is_refused() {
    const LIMIT: usize = 4096;
    for (over, chunked) in [(0, false), (0, true), (1, false), (1, true)] {
        let server = fake(move |_, r| {
            let body = echo(r, 1);
            let padded = format!("{body}{}", " ".repeat(LIMIT + over - body.len()));
            let bytes = if chunked {
                // In small chunks, so no single one is over the limit.
                let mut out =
                    b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                        .to_vec();
                for piece in padded.as_bytes().chunks(1000) {
                    out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    out.extend_from_slice(piece);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                out
            } else {
                let Act::Send(bytes) = reply(201, &padded) else {
                    unreachable!()
                };
                bytes
            };
            vec![Act::Send(bytes)]
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let http = HttpTransportConfig {
            max_response_bytes: LIMIT,
            ..config(&server.url, Duration::from_secs(5))
        };
        let engine = engine_with(&dir, http, false).await;
        engine
            .enqueue(NewOp::create("device", "d1", json!({"on": true})))
            .await
            .unwrap();
        drain(&engine).await;
        let ops = ops(&engine).await;
        if over == 0 {
            assert!(ops.is_empty(), "chunked {chunked}: {ops:?}");
        } else {
            assert_eq!(ops.len(), 1, "chunked {chunked}: acked over the limit");
            assert_retried(&ops[0], "larger than the limit");
        }
    }
}

// ---------------------------------------------------------------------------
// Batch and transaction answers.
// ---------------------------------------------------------------------------

/// The ops of a batch request.
fn batch_ops(request: &Seen) -> Vec<Value> {
    request.json()["ops"].as_array().unwrap().clone()
}

/// The entity a batch op's result echoes at `version`.
fn echo_op(op: &Value, version: u64) -> Value {
    json!({"type": op["type"], "id": op["id"], "version": version, "data": op["data"],
           "updated_at": "2026-12-05T00:00:00Z", "deleted": false})
}

async fn enqueue_creates(engine: &SyncEngine, n: usize) {
    for i in 0..n {
        engine
            .enqueue(NewOp::create("device", format!("d{i}"), json!({"i": i})))
            .await
            .unwrap();
    }
}

/// A 200 to a batch that is not one result per op (fewer, more, not a
/// list, not JSON, empty): every op is retried, none acked.
#[tokio::test]
async fn a_batch_answer_without_one_result_per_op_retries_every_op() {
    type Body = fn(&[Value]) -> String;
    let cases: Vec<(&str, Body)> = vec![
        ("fewer", |ops| {
            json!({"results": [{"status": 201, "body": echo_op(&ops[0], 1)}]}).to_string()
        }),
        ("more", |ops| {
            let mut results: Vec<Value> = ops
                .iter()
                .map(|op| json!({"status": 201, "body": echo_op(op, 1)}))
                .collect();
            results.push(results[0].clone());
            json!({ "results": results }).to_string()
        }),
        ("a hundred thousand", |_| {
            let one = r#"{"status":201},"#.repeat(100_000);
            format!(r#"{{"results":[{}{{"status":201}}]}}"#, one)
        }),
        ("not a list", |_| r#"{"results":{"status":201}}"#.to_owned()),
        ("no results", |_| "{}".to_owned()),
        ("empty", |_| String::new()),
        ("not json", |_| "<html>ok</html>".to_owned()),
        ("duplicate results", |ops| {
            let results: Vec<Value> = ops
                .iter()
                .map(|op| json!({"status": 201, "body": echo_op(op, 1)}))
                .collect();
            format!(
                r#"{{"results":[],"results":{}}}"#,
                serde_json::to_string(&results).unwrap()
            )
        }),
    ];
    for (name, body) in cases {
        let server = fake(move |_, r| vec![reply(200, &body(&batch_ops(r)))]).await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, true).await;
        enqueue_creates(&engine, 4).await;
        drain(&engine).await;
        let seen = server.seen();
        assert_eq!(seen.len(), 1, "{name}");
        assert_eq!(seen[0].path, "/v1/batch", "{name}");
        let ops = ops(&engine).await;
        assert_eq!(ops.len(), 4, "{name}: an op was acked");
        for op in &ops {
            assert_retried(op, "batch");
        }
    }
}

/// Results a batch may not carry (no body on a 201, status 0, 999, 100, a
/// redirect, an entity nested beyond any parser's depth, a 424 for an op
/// without a dependency): that op alone is retried, the well-answered one
/// is acked, nothing panics.
#[tokio::test]
async fn odd_results_in_a_batch_retry_their_op_alone() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let server = fake(move |_, r| {
        let ops = batch_ops(r);
        // d8's own entity, holding d7's data.
        let mut other_data = echo_op(&ops[8], 1);
        other_data["data"] = ops[7]["data"].clone();
        let results = vec![
            json!({"status": 201, "body": echo_op(&ops[0], 1)}),
            json!({"status": 201}),
            json!({"status": 0, "body": echo_op(&ops[2], 1)}),
            json!({"status": 999, "body": echo_op(&ops[3], 1)}),
            json!({"status": 100, "body": echo_op(&ops[4], 1)}),
            json!({"status": 302, "body": echo_op(&ops[5], 1)}),
            json!({"status": 201, "body": "DEEP"}),
            json!({"status": 424, "body": {"type": DEPENDENCY_FAILED, "title": "t", "status": 424}}),
            json!({"status": 201, "body": other_data}),
        ];
        let text = json!({ "results": results })
            .to_string()
            .replace("\"DEEP\"", &deep);
        vec![reply(200, &text)]
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, true).await;
    enqueue_creates(&engine, 9).await;
    drain(&engine).await;
    let ops = ops(&engine).await;
    let left: Vec<&str> = ops.iter().map(|op| op.entity_id.as_str()).collect();
    // d0 applied; d8 answered with d7's data: decoded, applied (the server
    // says it stored that). Every other op is kept for a retry.
    assert_eq!(left, ["d1", "d2", "d3", "d4", "d5", "d6", "d7"]);
    for op in &ops {
        assert_eq!((op.state, op.attempts), (OpState::Pending, 1), "{op:?}");
        assert!(op.last_error.is_some(), "{op:?}");
    }
    assert_retried(&ops[6], "dependency failure reported for an op without");
}

/// A result that echoes another op's data is not taken as an echo of its
/// own op's: the ack keeps what the server said it stored, and the next op
/// of the entity (sent after it) is made to conflict and merge instead of
/// chaining on a version whose data is not the app's.
#[tokio::test]
async fn a_result_echoing_the_wrong_op_is_not_stored_as_sent() {
    let server = fake(move |_, r| {
        if r.path == "/v1/batch" {
            let ops = batch_ops(r);
            // The update's result carries the create's data.
            let results = vec![
                json!({"status": 201, "body": echo_op(&ops[0], 1)}),
                json!({"status": 200, "body": echo_op(&ops[0], 2)}),
            ];
            return vec![reply(200, &json!({ "results": results }).to_string())];
        }
        vec![reply(200, &echo(r, 3))]
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, config(&server.url, Duration::from_secs(5)))
        .batching(BatchConfig {
            max_ops: 2,
            ..BatchConfig::default()
        })
        .build()
        .await
        .unwrap();
    create_then_update(&engine).await;
    engine
        .enqueue(NewOp::update("device", "d1", json!({"n": 2})))
        .await
        .unwrap();
    drain(&engine).await;
    let seen = server.seen();
    assert_eq!(seen[0].path, "/v1/batch");
    assert_eq!(batch_ops(&seen[0]).len(), 2);
    let put = &seen[1];
    assert_eq!(put.method, "PUT");
    // Version 2 holds {"n":0}, not the app's {"n":1} the update was made
    // from: chaining on "2" would overwrite it unseen.
    assert_eq!(put.header("if-match"), Some("\"1\""));
}

/// Transaction answers that contradict themselves (committed with a
/// refused op, aborted naming an applied op or no op at all, a failed op
/// out of range, the wrong number of results): nothing is acked, every op
/// is retried together.
#[tokio::test]
async fn a_self_contradicting_transaction_answer_retries_the_whole_transaction() {
    type Body = fn(&[Value]) -> Value;
    let cases: Vec<(&str, Body)> = vec![
        ("committed, one refused", |ops| {
            json!({"committed": true, "results": [
                {"status": 201, "body": echo_op(&ops[0], 1)},
                {"status": 500}]})
        }),
        ("committed, with a failed op", |ops| {
            json!({"committed": true, "failed_op": 1, "results": [
                {"status": 201, "body": echo_op(&ops[0], 1)},
                {"status": 201, "body": echo_op(&ops[1], 1)}]})
        }),
        ("aborted on an applied op", |ops| {
            json!({"committed": false, "failed_op": 0, "results": [
                {"status": 201, "body": echo_op(&ops[0], 1)},
                {"status": 424, "body": {"type": DEPENDENCY_FAILED, "title": "t", "status": 424}}]})
        }),
        (
            "aborted, no failed op",
            |_| json!({"committed": false, "results": [{"status": 409}, {"status": 409}]}),
        ),
        (
            "aborted, failed op out of range",
            |_| json!({"committed": false, "failed_op": 7, "results": [{"status": 409}, {"status": 409}]}),
        ),
        (
            "aborted, failed op huge",
            |_| json!({"committed": false, "failed_op": 4_294_967_296_u64, "results": [{"status": 409}, {"status": 409}]}),
        ),
        (
            "committed, one result",
            |ops| json!({"committed": true, "results": [{"status": 201, "body": echo_op(&ops[0], 1)}]}),
        ),
    ];
    for (name, body) in cases {
        let server = fake(move |_, r| {
            assert_eq!(r.path, "/v1/transactions");
            vec![reply(200, &body(&batch_ops(r)).to_string())]
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, true).await;
        engine
            .transaction(vec![
                NewOp::create("device", "a", json!({"n": 1})),
                NewOp::create("device", "b", json!({"n": 2})),
            ])
            .await
            .unwrap();
        drain(&engine).await;
        assert_eq!(server.seen().len(), 1, "{name}");
        let ops = ops(&engine).await;
        assert_eq!(ops.len(), 2, "{name}: an op was acked");
        for op in &ops {
            assert_eq!(op.state, OpState::Pending, "{name}: {op:?}");
            assert_eq!(op.attempts, 1, "{name}: {op:?}");
        }
    }
}

/// A conflict whose merge with the server's entity is larger than the
/// outbox stores (the server's entity may be as large as the server
/// allows): the op fails with the reason and its own payload kept, and the
/// drain goes on. Before, every drain ended in an error at the write and
/// the op stayed in flight, blocking the queue for good. A delete of such
/// an entity merges nothing large (only its base is) and still goes
/// through.
#[tokio::test]
async fn a_merge_larger_than_the_outbox_takes_fails_its_op_not_the_drain() {
    let big = "x".repeat(4000);
    let refused_delete = std::sync::atomic::AtomicBool::new(false);
    let conflict = || {
        vec![reply(
            409,
            r#"{"type":"https://guardian-sync.dev/problems/conflict/version","title":"Conflict","status":409}"#,
        )]
    };
    let fake = fake(
        move |_, request| match (request.method.as_str(), target(request)) {
            ("GET", (ty, id)) => vec![reply(
                200,
                &entity(&ty, &id, "7", &format!(r#"{{"n":5,"big":"{big}"}}"#)),
            )],
            ("PUT", _) => conflict(),
            ("DELETE", _) if !refused_delete.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                conflict()
            }
            ("DELETE", _) => vec![reply(204, "")],
            _ => vec![reply(201, &echo(request, 1))],
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, config(&fake.url, Duration::from_secs(5)))
        .outbox_options(
            OutboxOptions::default()
                .coalesce(false)
                .max_payload_bytes(1024),
        )
        .no_batching()
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::update("device", "d1", json!({"n": 1})).with_base(json!({"n": 0}), 3))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("device", "d2", json!({"n": 2})))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::delete("device", "d3").with_base_version(3))
        .await
        .unwrap();
    drain(&engine).await;
    drain(&engine).await;
    let left = ops(&engine).await;
    assert_eq!(left.len(), 1, "d2 and d3 applied, d1 kept: {left:?}");
    let op = &left[0];
    assert_eq!((op.state, op.entity_id.as_str()), (OpState::Failed, "d1"));
    let error: Value = serde_json::from_str(op.last_error.as_deref().unwrap()).unwrap();
    assert_eq!(
        error,
        json!({"conflict": "merge_too_large", "local": {"n": 1}, "remote": null})
    );
    let sent = fake.seen().len();
    assert_eq!(
        sent, 6,
        "d1's update and fetch, d2's create, d3's delete, fetch and delete again"
    );
    drain(&engine).await;
    assert_eq!(fake.seen().len(), sent, "a failed op is not sent again");
}

/// A server without the batch route that stores more than a create sent
/// (it adds a field) and checks `If-Match`. The update was made from the
/// app's view of the create, so it must merge onto what the server holds
/// and keep the added field, alone or in a batch. In a batch the
/// transport's op-by-op fallback chained it on the create's new version,
/// and it overwrote the field.
#[tokio::test]
async fn an_update_chained_on_data_the_server_changed_merges_onto_it() {
    for batching in [false, true] {
        // The entity as stored: (version, data).
        let stored: Arc<Mutex<Option<(u64, Value)>>> = Arc::new(Mutex::new(None));
        let state = stored.clone();
        let fake = fake(move |_, r| {
            let mut state = state.lock().unwrap();
            let answer = |(v, data): &(u64, Value)| entity("device", "d1", &v.to_string(), &data.to_string());
            match (r.method.as_str(), r.path.as_str()) {
                ("POST", "/v1/batch") => vec![reply(404, "")],
                ("POST", _) => {
                    let mut data = r.json()["data"].clone();
                    data["server"] = json!(1);
                    *state = Some((1, data));
                    vec![reply(201, &answer(state.as_ref().unwrap()))]
                }
                ("GET", _) => vec![reply(200, &answer(state.as_ref().unwrap()))],
                ("PUT", _) => {
                    let (version, _) = state.clone().unwrap();
                    if r.header("if-match") != Some(&format!("\"{version}\"")) {
                        return vec![reply(
                            409,
                            r#"{"type":"https://guardian-sync.dev/problems/conflict/version","title":"Conflict","status":409}"#,
                        )];
                    }
                    *state = Some((version + 1, r.json()["data"].clone()));
                    vec![reply(200, &answer(state.as_ref().unwrap()))]
                }
                _ => vec![reply(400, "")],
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &fake, batching).await;
        create_then_update(&engine).await;
        for _ in 0..3 {
            drain(&engine).await;
        }
        assert!(ops(&engine).await.is_empty(), "batching {batching}");
        let held = stored.lock().unwrap().clone().unwrap().1;
        assert_eq!(
            held,
            json!({"n": 1, "server": 1}),
            "batching {batching}: {:?}",
            fake.seen()
                .iter()
                .map(|r| format!("{} {} {:?}", r.method, r.path, r.header("if-match")))
                .collect::<Vec<_>>()
        );
    }
}
