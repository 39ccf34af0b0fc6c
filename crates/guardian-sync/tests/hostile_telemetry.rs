//! Telemetry export against a hostile or broken fleet endpoint: a scripted
//! fake on loopback (raw TCP, scripted bytes) answers `/v1/telemetry`
//! badly while ops go to a healthy server (the reference server, or the
//! same fake answering ops correctly). Whatever it does, the export must
//! not slow or pause the drain, loop hot, outlive a stop, keep dead
//! connections, panic, or log the token or a payload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::engine::{EngineError, RunReport, SyncEngine, SyncEvent};
use guardian_sync::op::{NewOp, OpState};
use guardian_sync::outbox::ListFilter;
use guardian_sync::telemetry::TelemetryConfig;
use guardian_sync::transport::StaticToken;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Event, Metadata, Subscriber};

const TOKEN: &str = "tok-secret-5e1f";
const SENTINEL: &str = "payload-sentinel-91c2";
const T: &str = "/v1/telemetry";
const NOTES: &str = "/v1/entities/note";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `check!(problems; ok; format args)`: notes a problem unless `ok`.
macro_rules! check {
    ($problems:ident; $ok:expr; $($msg:tt)+) => {
        if !$ok {
            $problems.push(format!($($msg)+));
        }
    };
}

// --- panics in the engine's tasks (they run on the test's thread) ---------

static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            let p = info.payload();
            let msg = p.downcast_ref::<&str>().map(|s| (*s).to_owned());
            let msg = msg.or_else(|| p.downcast_ref::<String>().cloned());
            let line = format!("{} at {:?}", msg.unwrap_or_default(), info.location());
            let mut panics = PANICS.lock().unwrap_or_else(PoisonError::into_inner);
            panics.push((thread, line));
            previous(info);
        }));
    });
}

/// Panics recorded on this test's thread (its runtime's tasks included).
fn panics_here() -> Vec<String> {
    let me = std::thread::current().name().unwrap_or("").to_owned();
    let all = PANICS.lock().unwrap_or_else(PoisonError::into_inner);
    all.iter()
        .filter(|p| p.0 == me)
        .map(|p| p.1.clone())
        .collect()
}

// --- the fake server -------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

enum Act {
    Send(Vec<u8>),
    Sleep(Duration),
    /// Says nothing more until the client closes the connection.
    Hang,
    /// Writes these bytes one at a time, cycling, every 30 ms, until the
    /// client closes.
    Drip(&'static [u8]),
    /// Writes as fast as the client takes it, until it closes.
    Flood,
    /// Resets the connection (RST).
    Reset,
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    /// Connections held open by the script that the client closed.
    closed: usize,
}

impl Log {
    fn count(&self, path: &str) -> usize {
        self.seen.iter().filter(|s| s.path == path).count()
    }
}

type Script = Arc<dyn Fn(usize, &Seen) -> Vec<Act> + Send + Sync>;

struct Fake {
    url: String,
    log: Arc<Mutex<Log>>,
    tick: Arc<watch::Sender<u64>>,
}

impl Fake {
    fn count(&self, path: &str) -> usize {
        self.log.lock().unwrap().count(path)
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().seen.clone()
    }

    /// Waits (at most `limit`) until `pred` holds; false if it never did.
    async fn wait(&self, limit: Duration, pred: impl Fn(&Log) -> bool) -> bool {
        let mut rx = self.tick.subscribe();
        let log = self.log.clone();
        let waited = async move { rx.wait_for(|_| pred(&log.lock().unwrap())).await.is_ok() };
        tokio::time::timeout(limit, waited).await == Ok(true)
    }
}

/// A server on 127.0.0.1 answering each request (one per connection) as
/// `script` says; `script` gets the request's index among those on its path.
async fn fake(script: impl Fn(usize, &Seen) -> Vec<Act> + Send + Sync + 'static) -> Fake {
    let script: Script = Arc::new(script);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Log::default()));
    let tick = Arc::new(watch::Sender::new(0u64));
    let (l, t) = (log.clone(), tick.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (script, log, tick) = (script.clone(), l.clone(), t.clone());
            tokio::spawn(async move { serve(socket, &script, &log, &tick).await });
        }
    });
    Fake { url, log, tick }
}

async fn serve(
    mut socket: TcpStream,
    script: &Script,
    log: &Mutex<Log>,
    tick: &watch::Sender<u64>,
) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    let n = {
        let mut log = log.lock().unwrap();
        let n = log.count(&request.path);
        log.seen.push(request.clone());
        n
    };
    tick.send_modify(|t| *t += 1);
    let closed = || {
        log.lock().unwrap().closed += 1;
        tick.send_modify(|t| *t += 1);
    };
    for act in script(n, &request) {
        match act {
            Act::Send(bytes) => {
                if socket.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Act::Sleep(d) => tokio::time::sleep(d).await,
            Act::Hang => {
                let mut buf = [0u8; 1024];
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                return closed();
            }
            Act::Drip(bytes) => {
                for b in bytes.iter().cycle() {
                    if socket.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(ms(30)).await;
                }
                return closed();
            }
            Act::Flood => {
                let chunk = vec![b'x'; 64 * 1024];
                while socket.write_all(&chunk).await.is_ok() {}
                return closed();
            }
            Act::Reset => {
                let _ = socket.set_zero_linger();
                return;
            }
        }
    }
    let _ = socket.shutdown().await;
}

async fn read_request(socket: &mut TcpStream) -> Option<Seen> {
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    loop {
        let n = socket.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines.next()?.split(' ').nth(1)?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length = headers.iter().find(|h| h.0 == "content-length");
        let length: usize = length.and_then(|h| h.1.parse().ok()).unwrap_or(0);
        if buf.len() >= end + 4 + length {
            let body = buf[end + 4..].to_vec();
            return Some(Seen {
                path,
                headers,
                body,
            });
        }
    }
}

/// A whole response: `headers` are extra header lines, each ending in CRLF.
fn reply(status: u16, headers: &str, body: &str) -> Act {
    Act::Send(
        format!(
            "HTTP/1.1 {status} X\r\n{headers}content-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn raw(text: &str) -> Act {
    Act::Send(text.as_bytes().to_vec())
}

/// What a well-behaved server answers to a create: the entity at version
/// 1, its data echoed.
fn echo_create(r: &Seen) -> Act {
    let ty = r.path.trim_start_matches("/v1/entities/");
    let j: Value = serde_json::from_slice(&r.body).unwrap();
    let (id, data) = (j["id"].as_str().unwrap(), j["data"].to_string());
    reply(
        201,
        "",
        &format!(
            r#"{{"type":"{ty}","id":"{id}","version":1,"data":{data},"updated_at":"2026-12-05T00:00:00Z","deleted":false}}"#
        ),
    )
}

// --- engines and runners ---------------------------------------------------

async fn reference_server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Quick intervals: a change at most every 100 ms, a keepalive every 400
/// ms, 300 ms per send; to `endpoint` (`None`: the ops server).
fn quick(endpoint: Option<&Fake>) -> TelemetryConfig {
    TelemetryConfig {
        min_interval: ms(100),
        keepalive: ms(400),
        timeout: ms(300),
        endpoint: endpoint.map(|f| f.url.clone()),
        ..TelemetryConfig::default()
    }
}

async fn engine(dir: &tempfile::TempDir, ops_url: &str, telemetry: TelemetryConfig) -> SyncEngine {
    build(dir, ops_url, telemetry).await.unwrap()
}

async fn build(
    dir: &tempfile::TempDir,
    ops_url: &str,
    telemetry: TelemetryConfig,
) -> Result<SyncEngine, guardian_sync::engine::BuildError> {
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .server(ops_url)
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .owner_id("phone-9")
        .no_batching()
        .telemetry(telemetry)
        .build()
        .await
}

async fn create(engine: &SyncEngine, id: &str) {
    let op = NewOp::create("note", id, json!({ "s": SENTINEL }));
    engine.enqueue(op).await.unwrap();
}

struct Runner {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RunReport, EngineError>>,
}

fn start(engine: &SyncEngine) -> Runner {
    let (stop, rx) = oneshot::channel::<()>();
    let engine = engine.clone();
    let task = tokio::spawn(async move {
        engine
            .run(async {
                let _ = rx.await;
            })
            .await
    });
    Runner { stop, task }
}

impl Runner {
    /// Stops the runner; returns how long `run()` took to return.
    async fn stop(self) -> Duration {
        let t = Instant::now();
        self.stop.send(()).unwrap();
        tokio::time::timeout(secs(10), self.task)
            .await
            .expect("run() did not return within 10 s of the stop")
            .unwrap()
            .unwrap();
        t.elapsed()
    }
}

/// Runs an engine (no ops, telemetry quick to `fake`) for 2 s and stops
/// it; returns what went wrong: a count of telemetry requests outside
/// `counts`, a slow stop, or (when `holds`: the fake holds connections
/// open) connections the client never closed.
async fn bounded_case(name: &str, fake: &Fake, counts: (usize, usize), holds: bool) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &fake.url, quick(Some(fake))).await;
    let runner = start(&engine);
    tokio::time::sleep(secs(2)).await;
    let n = fake.count(T);
    let stopped_in = runner.stop().await;
    let mut problems = Vec::new();
    let in_bounds = (counts.0..=counts.1).contains(&n);
    check!(problems; in_bounds; "{name}: {n} telemetry requests in 2 s, not in {counts:?}");
    check!(problems; stopped_in < secs(2); "{name}: run() took {stopped_in:?} to stop");
    let n = fake.count(T);
    let closed = !holds || fake.wait(secs(2), |l| l.closed >= n).await;
    check!(problems; closed; "{name}: the client kept connections open ({n} made)");
    problems
}

// --- log capture -----------------------------------------------------------

/// A subscriber writing every event and span field into a string.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Line<'a>(&'a mut String);

impl Visit for Line<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Capture {
    fn push(&self, meta: &Metadata<'_>, fields: &str) {
        // The reference server shares the runtime: its logs are not the
        // engine's.
        if !meta.target().starts_with("guardian_server") {
            let mut out = self.0.lock().unwrap();
            let _ = writeln!(out, "{} {}:{fields}", meta.level(), meta.target());
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut s = String::new();
        span.record(&mut Line(&mut s));
        self.push(span.metadata(), &s);
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut s = String::new();
        event.record(&mut Line(&mut s));
        self.push(event.metadata(), &s);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

// --- tests -----------------------------------------------------------------

/// The same server answers ops correctly and telemetry with an error (5xx
/// with Retry-After of every shape, 429, 401, 403, no fleet route) or a
/// redirect (to another host, or the same): the export keeps to its
/// keepalive (no hot loop, no giving up), follows no redirect (the other
/// host never gets the token), ops are acked once each, and a telemetry
/// 401 does not pause op sending.
#[tokio::test]
async fn error_statuses_neither_loop_nor_pause_the_ops() {
    watch_panics();
    let elsewhere = fake(|_, _| vec![reply(204, "", "")]).await;
    let away = format!("location: {}{T}", elsewhere.url);
    #[rustfmt::skip]
    let cases: Vec<(u16, String)> = [
        (500, ""), (503, "retry-after: 0"), (503, "retry-after: -1"),
        (503, "retry-after: 99999999999999999999"),
        (503, "retry-after: Fri, 31 Dec 9999 23:59:59 GMT"), (429, "retry-after: 3600"),
        (401, "www-authenticate: Bearer error=\"invalid_token\""), (403, ""), (404, ""),
        (405, "allow: GET"), (501, ""), (302, "location: /v1/elsewhere"),
        (307, &away), (308, &away), (301, &away), (303, &away),
    ]
    .into_iter()
    .map(|(status, header)| (status, header.to_owned()))
    .collect();
    let runs = cases.into_iter().map(|(status, header)| async move {
        let name = format!("{status} {header}");
        let headers = format!("{header}{}", if header.is_empty() { "" } else { "\r\n" });
        // Ops are answered late, so a telemetry error comes first.
        let fake = fake(move |_, r| match r.path.as_str() {
            T => vec![reply(status, &headers, r#"{"title":"no"}"#)],
            _ => vec![Act::Sleep(ms(150)), echo_create(r)],
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &fake.url, quick(None)).await;
        create(&engine, "n1").await;
        let started = Instant::now();
        let runner = start(&engine);
        let mut problems = Vec::new();
        let asked = fake.wait(secs(3), |l| l.count(T) >= 2).await;
        check!(problems; asked; "{name}: no second telemetry request within 3 s");
        // Enqueued after two telemetry errors.
        create(&engine, "n2").await;
        fake.wait(secs(3), |l| l.count(NOTES) >= 2).await;
        tokio::time::sleep(secs(2).saturating_sub(started.elapsed())).await;
        let (n, elapsed) = (fake.count(T), started.elapsed());
        let stopped_in = runner.stop().await;
        let left = engine.outbox().list(ListFilter::default()).await.unwrap();
        let (sent, paused) = (fake.count(NOTES), engine.auth_paused());
        check!(problems; (2..=12).contains(&n); "{name}: {n} telemetry requests in {elapsed:?}");
        let ops_ok = left.is_empty() && sent == 2 && !paused;
        check!(problems; ops_ok; "{name}: ops sent {sent}, left {left:?}, auth paused {paused}");
        check!(problems; stopped_in < secs(2); "{name}: run() took {stopped_in:?} to stop");
        let bearer = ("authorization".to_owned(), format!("Bearer {TOKEN}"));
        let seen = fake.seen();
        let ok = |s: &Seen| [T, NOTES].contains(&s.path.as_str()) && s.headers.contains(&bearer);
        check!(problems; seen.iter().all(ok); "{name}: a redirect followed, or no token");
        problems
    });
    let problems: Vec<String> = futures::future::join_all(runs).await.concat();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        elsewhere.seen().len(),
        0,
        "a redirect followed to another host"
    );
    assert_eq!(panics_here(), Vec::<String>::new());
}

/// Answers that never come, drip or never end (the 300 ms send timeout
/// must cut each, and the client must close every connection it gave up
/// on, so none pile up), resets, garbage, a bad status line, header floods,
/// an empty close: no panic, no hot loop, a try at each keepalive.
#[tokio::test]
async fn broken_answers_are_cut_and_survived() {
    watch_panics();
    type Tail = fn() -> Option<Act>;
    let ok = "HTTP/1.1 200 OK\r\n";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, Tail)> = vec![
        ("no answer", String::new(), || Some(Act::Hang)),
        ("dripping headers", ok.into(), || Some(Act::Drip(b"x-a: b\r\n"))),
        ("dripping body", format!("{ok}content-length: 99999\r\n\r\n"), || Some(Act::Drip(b"x"))),
        ("endless body", format!("{ok}content-length: 9999999999\r\n\r\n"), || Some(Act::Flood)),
        ("endless chunk", format!("{ok}transfer-encoding: chunked\r\n\r\nfffffff\r\n"), || Some(Act::Flood)),
        ("reset", String::new(), || Some(Act::Reset)),
        ("close without answer", String::new(), || None),
        ("not http", "SSH-2.0-OpenSSH_9.6\r\n\0\u{7f}junk\r\n\r\n".into(), || None),
        ("bad status", "HTTP/1.1 9999 Huh\r\ncontent-length: 0\r\n\r\n".into(), || None),
        ("http/0.9", "hello".into(), || None),
        ("bad content-length", format!("{ok}content-length: -5\r\n\r\n"), || None),
        ("5000 headers", format!("{ok}{}\r\n", "x-h: v\r\n".repeat(5000)), || None),
        ("2 MiB header", format!("{ok}x-l: {}\r\n\r\n", "a".repeat(2 << 20)), || None),
    ];
    let runs = cases.into_iter().map(|(name, head, tail)| async move {
        let holds = matches!(tail(), Some(Act::Hang | Act::Drip(_) | Act::Flood));
        let fake = fake(move |_, _| [raw(&head)].into_iter().chain(tail()).collect()).await;
        bounded_case(name, &fake, (3, 10), holds).await
    });
    let problems: Vec<String> = futures::future::join_all(runs).await.concat();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(panics_here(), Vec::<String>::new());
}

/// A stop returns promptly while an export request hangs under a minute's
/// timeout, and the hung request does not outlive the runner.
#[tokio::test]
async fn a_stop_returns_promptly_while_an_export_hangs() {
    watch_panics();
    let server = reference_server().await;
    let fake = fake(|_, _| vec![Act::Hang]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = TelemetryConfig {
        timeout: secs(60),
        ..quick(Some(&fake))
    };
    let engine = engine(&dir, &server.url(), config).await;
    create(&engine, "n1").await;
    let mut events = engine.events();
    let runner = start(&engine);
    let asked = fake.wait(secs(5), |l| l.count(T) >= 1).await;
    assert!(asked, "no telemetry request within 5 s");
    // The op drains beside the hung export: the stop waits for its
    // success, or the count below would race the drain.
    tokio::time::timeout(secs(5), async {
        while !matches!(events.recv().await, Ok(SyncEvent::OpSucceeded { .. })) {}
    })
    .await
    .expect("the op was not applied within 5 s");
    let stopped_in = runner.stop().await;
    assert!(stopped_in < secs(1), "run() took {stopped_in:?} to stop");
    let closed = fake.wait(secs(2), |l| l.closed >= 1).await;
    assert!(
        closed,
        "the hung request was still open 2 s after run() returned"
    );
    assert_eq!(fake.count(T), 1, "telemetry sent after the stop");
    assert_eq!(server.applied_log().await.unwrap().len(), 1);
}

/// Twenty ops and a dead letter drain while the first snapshot hangs under
/// a 30 s timeout: the drain does not wait for it, every op is applied
/// exactly once and the outbox keeps just the dead letter.
#[tokio::test]
async fn the_drain_is_not_slowed_by_a_hanging_export() {
    watch_panics();
    let server = reference_server().await;
    let fake = fake(|_, _| vec![Act::Hang]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = TelemetryConfig {
        min_interval: ms(50),
        timeout: secs(30),
        ..quick(Some(&fake))
    };
    let engine = engine(&dir, &server.url(), config).await;
    let ghost = NewOp::update("note", "ghost", json!({ "s": SENTINEL }));
    engine.enqueue(ghost).await.unwrap();
    for i in 0..20 {
        create(&engine, &format!("n{i}")).await;
    }
    let t = Instant::now();
    tokio::time::timeout(secs(15), engine.run_until_empty())
        .await
        .expect("the drain did not end within 15 s")
        .unwrap();
    let took = t.elapsed();
    assert_eq!(
        fake.count(T),
        1,
        "no hanging snapshot in flight during the drain"
    );
    assert!(took < secs(8), "the drain took {took:?}");
    assert_eq!(server.applied_log().await.unwrap().len(), 20);
    let left = engine.outbox().list(ListFilter::default()).await.unwrap();
    let left: Vec<_> = left.iter().map(|o| (&*o.entity_id, o.state)).collect();
    assert_eq!(left, [("ghost", OpState::Failed)]);
}

/// The endpoint answers 500 with the token and body echoed in its reason
/// and body, or resets: the engine logs the failures (captured at every
/// level) without the token or a payload, and no snapshot carries one.
#[tokio::test]
async fn neither_token_nor_payload_reach_the_log() {
    watch_panics();
    let capture = Capture::default();
    // Two dispatchers registered: with one, tracing caches a callsite's
    // interest from whichever thread hits it first (another test's).
    let (dispatch, _other) = (
        Dispatch::new(capture.clone()),
        Dispatch::new(capture.clone()),
    );
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let server = reference_server().await;
    let fake = fake(|n, r| {
        if n % 2 == 1 {
            return vec![Act::Reset];
        }
        let auth = r.headers.iter().find(|(h, _)| h == "authorization");
        let echo = format!("{auth:?} {}", String::from_utf8_lossy(&r.body));
        let body = serde_json::to_string(&json!({ "detail": echo })).unwrap();
        let reason: String = echo
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .collect();
        let head = format!(
            "HTTP/1.1 500 {reason}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        vec![Act::Send(format!("{head}{body}").into_bytes())]
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server.url(), quick(Some(&fake))).await;
    let ghost = NewOp::update("note", "ghost", json!({ "s": SENTINEL }));
    engine.enqueue(ghost).await.unwrap();
    for i in 0..3 {
        create(&engine, &format!("n{i}")).await;
    }
    let runner = start(&engine);
    let asked = fake.wait(secs(6), |l| l.count(T) >= 5).await;
    assert!(asked, "fewer than 5 telemetry requests within 6 s");
    runner.stop().await;
    assert_eq!(server.applied_log().await.unwrap().len(), 3);
    let bodies: Vec<String> = fake
        .seen()
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).into())
        .collect();
    let dead_letter = bodies.iter().any(|b| b.contains("does not exist"));
    assert!(dead_letter, "no dead letter reported: {bodies:?}");
    assert!(
        bodies.iter().all(|b| !b.contains(SENTINEL)),
        "a payload sent"
    );
    let log = capture.0.lock().unwrap().clone();
    assert!(log.contains("telemetry not sent"), "nothing logged:\n{log}");
    assert!(
        !log.contains(TOKEN),
        "the bearer token reached the log:\n{log}"
    );
    assert!(!log.contains(SENTINEL), "a payload reached the log:\n{log}");
    assert_eq!(panics_here(), Vec::<String>::new());
}

/// Runs the export with `set` applied to the quick config (to a fake
/// answering ops and telemetry well) until the second snapshot (after an
/// op's ack) or 3 s; returns the telemetry requests seen.
async fn run_with(set: fn(&mut TelemetryConfig)) -> usize {
    let fake = fake(|_, r| match r.path.as_str() {
        T => vec![reply(204, "", "")],
        _ => vec![echo_create(r)],
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick(None);
    set(&mut config);
    let engine = engine(&dir, &fake.url, config).await;
    let runner = start(&engine);
    if fake.wait(secs(3), |l| l.count(T) >= 1).await {
        create(&engine, "n1").await;
        fake.wait(secs(3), |l| l.count(T) >= 2).await;
    }
    runner.stop().await;
    fake.count(T)
}

/// A careless operator's "never": a keepalive, timeout or breaker interval
/// of `Duration::MAX` is taken as such, without a panic; the first snapshot
/// and the change after an ack still go.
#[tokio::test]
async fn durations_of_max_are_taken_without_a_panic() {
    watch_panics();
    let keepalive = run_with(|c| c.keepalive = Duration::MAX).await;
    let timeout = run_with(|c| c.timeout = Duration::MAX).await;
    let breaker = run_with(|c| c.breaker_interval = Duration::MAX).await;
    assert_eq!(panics_here(), Vec::<String>::new());
    let sent = (keepalive, timeout, breaker);
    assert!(
        sent.0 >= 2 && sent.1 >= 2 && sent.2 >= 2,
        "snapshots sent: {sent:?}"
    );
}

/// `min_interval: Duration::MAX` ("only keepalives") must not kill the
/// export: the first snapshot goes at once, and nothing panics.
#[tokio::test]
async fn a_min_interval_of_max_does_not_panic_the_export() {
    watch_panics();
    let sent = run_with(|c| c.min_interval = Duration::MAX).await;
    let panics = panics_here();
    assert!(
        panics.is_empty(),
        "with min_interval = Duration::MAX the export task panicked ({panics:?}) after sending {sent}"
    );
    assert!(
        sent >= 1,
        "with min_interval = Duration::MAX no snapshot was sent"
    );
}

/// Intervals a runner could hammer a failing backend with (zero, or a
/// millisecond; `gsync run` refuses below 100 ms) and a zero send timeout
/// are refused when the engine is built, naming the setting.
#[tokio::test]
async fn intervals_too_short_to_be_safe_are_refused_at_build() {
    type Set = fn(&mut TelemetryConfig);
    let cases: [(&str, Set); 5] = [
        ("min_interval", |c| c.min_interval = Duration::ZERO),
        ("keepalive", |c| c.keepalive = Duration::ZERO),
        ("breaker_interval", |c| c.breaker_interval = ms(1)),
        ("min_interval", |c| c.min_interval = ms(49)),
        ("timeout", |c| c.timeout = Duration::ZERO),
    ];
    for (name, set) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut config = quick(None);
        set(&mut config);
        match build(&dir, "http://127.0.0.1:9", config).await {
            Ok(_) => panic!("{name}: a config that could hot-loop was taken"),
            Err(e) => assert!(e.to_string().contains(name), "{name}: {e}"),
        }
    }
}
