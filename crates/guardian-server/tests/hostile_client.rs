//! The reference server against a hostile or careless client or device,
//! over real HTTP on 127.0.0.1: counters near `u64::MAX`, data nested to the
//! parser's limit, odd preconditions, repeated headers and JSON members,
//! request framing tricks, keys reused by another tenant, wrong device
//! clocks, a peer that stops reading. Each must get a clear answer (or be
//! let go), change nothing it should not, and leave the server whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use guardian_server::clock::ManualClock;
use guardian_server::{AlertRules, RunningServer, ServerBuilder};
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "tok-acme";
const OTHER_TOKEN: &str = "tok-globex";
const ADMIN: &str = "adm-secret";

struct Harness {
    server: RunningServer,
    http: reqwest::Client,
}

struct Resp {
    status: u16,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn start() -> Harness {
    start_with(ServerBuilder::new()).await
}

async fn start_with(b: ServerBuilder) -> Harness {
    let server = b
        .token("acme", TOKEN)
        .token("globex", OTHER_TOKEN)
        .admin_token(ADMIN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Harness { server, http }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    fn req_as(&self, token: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.req_as(TOKEN, method, path)
    }

    async fn try_send(&self, req: reqwest::RequestBuilder) -> reqwest::Result<Resp> {
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok(Resp { status, text })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.try_send(req).await.expect("no answer")
    }

    /// `body` sent as JSON text exactly as written.
    async fn post_text(&self, path: &str, key: Option<&str>, body: String) -> Resp {
        let mut req = self
            .req(Method::POST, path)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        self.send(req).await
    }

    async fn applied_keys(&self) -> Vec<String> {
        let log = self.server.applied_log().await.unwrap();
        log.into_iter().map(|a| a.idempotency_key).collect()
    }

    async fn state(&self) -> reqwest::Result<Resp> {
        self.try_send(
            self.http
                .get(self.url("/dashboard/state"))
                .bearer_auth(ADMIN),
        )
        .await
    }

    async fn metrics(&self) -> reqwest::Result<Resp> {
        self.try_send(self.http.get(self.url("/metrics"))).await
    }

    /// The whole answer to `request` written byte for byte on a fresh
    /// connection (which it asks to close), or what came within 10 s.
    async fn raw(&self, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.server.addr())
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }
}

fn snapshot(runner: &str, pending: u64, in_flight: u64, failed: u64) -> Value {
    json!({
        "runner_id": runner, "labels": {}, "at": 1, "seq": 1,
        "queue": {"pending": pending, "in_flight": in_flight, "failed": failed},
        "last_failures": [], "breaker": "closed", "health_score": 90,
        "succeeded": 0, "failed": 0, "conflicts": 0, "breaker_trips": 0,
    })
}

async fn post_snapshot(h: &Harness, token: &str, body: &Value) -> reqwest::Result<Resp> {
    h.try_send(h.req_as(token, Method::POST, "/v1/telemetry").json(body))
        .await
}

/// The value of an unlabelled gauge in `/metrics` text.
fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// `depth` objects nested in one another: `{"a":{"a":{}}}` is depth 3.
fn nested(depth: usize) -> String {
    format!(
        "{}{{}}{}",
        "{\"a\":".repeat(depth - 1),
        "}".repeat(depth - 1)
    )
}

/// Whether a client parsing with `serde_json`'s defaults (as the engine
/// does) can read `text`.
fn parses(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok()
}

/// Queue counts whose sum does not fit a `u64`: the device gets an answer,
/// not a dropped connection, and its queue saturates rather than wrapping
/// to 0 (which would hide a stall).
#[tokio::test]
async fn a_queue_count_beyond_u64_is_answered_not_dropped() {
    let h = start().await;
    let r = post_snapshot(&h, TOKEN, &snapshot("d1", u64::MAX, 1, 0))
        .await
        .expect("the snapshot got no answer at all");
    assert_eq!(r.status, 204, "{}", r.text);
    let state = h.state().await.unwrap().json();
    assert_eq!(state["devices"][0]["history"][0]["queue"], u64::MAX);
}

/// Two tenants' devices, each with a queue of 2^63 (each valid alone):
/// the fleet totals must saturate, not overflow, so one tenant cannot take
/// `/metrics` (unauthenticated, every tenant's) or the dashboard down.
#[tokio::test]
async fn huge_queues_of_two_devices_cannot_break_metrics_or_the_dashboard() {
    let h = start().await;
    let half = 1u64 << 63;
    for token in [TOKEN, OTHER_TOKEN] {
        let r = post_snapshot(&h, token, &snapshot("d", half, 0, half))
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.text);
    }
    let m = h.metrics().await.expect("/metrics got no answer");
    assert_eq!(m.status, 200);
    assert_eq!(gauge(&m.text, "guardian_fleet_queue_depth"), u64::MAX);
    assert_eq!(gauge(&m.text, "guardian_fleet_dead_letters"), u64::MAX);
    let s = h.state().await.expect("/dashboard/state got no answer");
    assert_eq!(s.status, 200);
}

/// Data nested as deep as the request parser allows would make the answers
/// that embed it a few levels deeper (a feed page, a batch result) pass
/// `serde_json`'s default depth of 128: no client could read the tenant's
/// feed past that change, or its own batch answer. The nesting of `data`
/// is bounded (a 400), so every answer embedding it stays readable.
#[tokio::test]
async fn deeply_nested_data_cannot_make_the_feed_or_a_batch_answer_unreadable() {
    let h = start().await;
    let create = h
        .post_text(
            "/v1/entities/doc",
            Some("deep"),
            format!("{{\"id\":\"deep\",\"data\":{}}}", nested(126)),
        )
        .await;
    assert_eq!(create.status, 400, "{}", create.text);
    let page = h.send(h.req(Method::GET, "/v1/changes?since=0")).await;
    assert_eq!(page.status, 200);
    assert!(parses(&page.text), "the feed page cannot be parsed");
    let batch = h
        .post_text(
            "/v1/batch",
            None,
            format!(
                "{{\"ops\":[{{\"op\":\"create\",\"type\":\"doc\",\"id\":\"b\",\
                 \"idempotency_key\":\"b\",\"data\":{}}}]}}",
                nested(124)
            ),
        )
        .await;
    assert!(
        batch.status == 200 || batch.status == 400,
        "{}",
        batch.status
    );
    assert!(parses(&batch.text), "the batch answer cannot be parsed");
}

/// `If-Match` is a quoted version, digits or `*` (server.md): a sign is
/// not a digit (`u64::from_str` would take `+1` as 1).
#[tokio::test]
async fn an_if_match_with_a_sign_is_400() {
    let h = start().await;
    let r = h
        .post_text(
            "/v1/entities/t",
            Some("c"),
            r#"{"id":"x","data":{}}"#.into(),
        )
        .await;
    assert_eq!(r.status, 201);
    for (i, v) in ["\"+1\"", "+1"].into_iter().enumerate() {
        let r = h
            .send(
                h.req(Method::PUT, "/v1/entities/t/x")
                    .header("idempotency-key", format!("p{i}"))
                    .header("if-match", v)
                    .json(&json!({"data": {"i": i}})),
            )
            .await;
        assert_eq!(r.status, 400, "If-Match {v}: {}", r.text);
    }
    assert_eq!(h.applied_keys().await, ["c"]);
}

/// Two header lines of a field mean the same as one line joining them
/// (RFC 9110 §5.3): `If-Match: "1", "2"` is refused, so two `If-Match`
/// lines must be too, and two `Idempotency-Key` lines name no single key.
#[tokio::test]
async fn repeated_key_or_precondition_lines_are_400() {
    let h = start().await;
    let head = |extra: &str, body: &str| {
        format!(
            "POST /v1/entities/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             {extra}Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let body = r#"{"id":"k","data":{}}"#;
    let answer = h
        .raw(&head("Idempotency-Key: a\r\nIdempotency-Key: b\r\n", body))
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let r = h.post_text("/v1/entities/t", Some("c"), body.into()).await;
    assert_eq!(r.status, 201);
    let put = format!(
        "PUT /v1/entities/t/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Idempotency-Key: u\r\nIf-Match: \"1\"\r\nIf-Match: \"2\"\r\n\
         Content-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n\
         {{\"data\":{{}}}}"
    );
    let answer = h.raw(&put).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(h.applied_keys().await, ["c"]);
}

/// Preconditions no version can satisfy or parse are 400 and change
/// nothing: beyond `u64`, weak, a list, empty, unterminated, padded.
#[tokio::test]
async fn hostile_if_match_values_are_400_and_change_nothing() {
    let h = start().await;
    let r = h
        .post_text(
            "/v1/entities/t",
            Some("c"),
            r#"{"id":"x","data":{"v":0}}"#.into(),
        )
        .await;
    assert_eq!(r.status, 201);
    let values = [
        "\"18446744073709551616\"",
        "99999999999999999999999",
        "W/\"1\"",
        "\"1\", \"2\"",
        "\"\"",
        "\"",
        "\" 1\"",
        "-1",
        "**",
    ];
    for (i, v) in values.into_iter().enumerate() {
        let r = h
            .send(
                h.req(Method::PUT, "/v1/entities/t/x")
                    .header("idempotency-key", format!("p{i}"))
                    .header("if-match", v)
                    .json(&json!({"data": {"v": i + 1}})),
            )
            .await;
        assert_eq!(r.status, 400, "If-Match {v}: {}", r.text);
        assert_eq!(r.json()["type"], "urn:guardian:bad-request");
    }
    let r = h.send(h.req(Method::GET, "/v1/entities/t/x")).await;
    assert_eq!(
        (r.json()["version"].as_u64(), &r.json()["data"]),
        (Some(1), &json!({"v": 0}))
    );
    // The refusals recorded nothing: a key of one of them is new.
    let r = h
        .send(
            h.req(Method::PUT, "/v1/entities/t/x")
                .header("idempotency-key", "p0")
                .header("if-match", "\"1\"")
                .json(&json!({"data": {"v": 9}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(h.applied_keys().await, ["c", "p0"]);
}

/// A member given twice at the top of a request is ambiguous: which `id`,
/// which key? Each is a 400 and nothing is applied, for every body type
/// (a parse through `Value`, or `flatten`, would silently take the last).
#[tokio::test]
async fn duplicate_json_members_are_400_everywhere() {
    let h = start().await;
    let op = r#"{"op":"create","type":"t","id":"z","data":{},"idempotency_key":"a"}"#;
    let cases = [
        ("/v1/entities/t", r#"{"id":"a","id":"b","data":{}}"#.to_owned()),
        (
            "/v1/entities/t",
            r#"{"id":"a","data":{"x":1},"data":{"x":2}}"#.to_owned(),
        ),
        (
            "/v1/batch",
            r#"{"ops":[{"op":"create","type":"t","id":"z","data":{},"idempotency_key":"a","idempotency_key":"b"}]}"#
                .to_owned(),
        ),
        ("/v1/batch", format!(r#"{{"ops":[{op}],"ops":[]}}"#)),
        (
            "/v1/transactions",
            format!(r#"{{"transaction_key":"t1","transaction_key":"t2","ops":[{op}]}}"#),
        ),
        (
            "/v1/telemetry",
            r#"{"runner_id":"d1","runner_id":"d2","at":1,"seq":1,"queue":{"pending":0,"in_flight":0,"failed":0},"breaker":"closed","health_score":1,"succeeded":0,"failed":0,"conflicts":0,"breaker_trips":0}"#
                .to_owned(),
        ),
    ];
    for (path, body) in cases {
        let r = h.post_text(path, Some("k"), body.clone()).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
        assert!(r.text.contains("duplicate field"), "{}", r.text);
    }
    assert!(h.applied_keys().await.is_empty());
    let s = h.state().await.unwrap();
    assert_eq!(s.json()["devices"], json!([]));
}

/// Idempotency keys, transaction keys and in-flight reservations are per
/// tenant: another tenant reusing them with other content gets its own
/// fresh answer, never the first tenant's stored one (nor a 422), and the
/// first tenant's retries still replay its own.
#[tokio::test]
async fn keys_are_per_tenant_in_batches_and_transactions() {
    let h = start().await;
    let txn = |data: Value| {
        json!({"transaction_key": "tx", "ops": [
            {"op": "create", "type": "t", "id": "a", "data": data, "idempotency_key": "op"},
        ]})
    };
    let batch = |data: Value| json!({"ops": [{"op": "create", "type": "t", "id": "b", "data": data, "idempotency_key": "bk"}]});
    let mut first = Vec::new();
    for (token, secret) in [(TOKEN, "acme-secret"), (OTHER_TOKEN, "globex-secret")] {
        let t = h
            .send(
                h.req_as(token, Method::POST, "/v1/transactions")
                    .json(&txn(json!({"s": secret}))),
            )
            .await;
        let b = h
            .send(
                h.req_as(token, Method::POST, "/v1/batch")
                    .json(&batch(json!({"s": secret}))),
            )
            .await;
        assert_eq!((t.status, b.status), (200, 200));
        let (t, b) = (t.json(), b.json());
        assert_eq!(
            (&t["committed"], &t["replayed"]),
            (&json!(true), &json!(false)),
            "{t}"
        );
        assert_eq!(t["results"][0]["body"]["data"]["s"], secret, "{t}");
        assert_eq!(b["results"][0]["status"], 201, "{b}");
        assert_eq!(b["results"][0]["body"]["data"]["s"], secret, "{b}");
        first.push((t, b));
    }
    // acme's retries replay acme's answers, byte for byte in substance.
    let t = h
        .send(
            h.req(Method::POST, "/v1/transactions")
                .json(&txn(json!({"s": "acme-secret"}))),
        )
        .await
        .json();
    assert_eq!(t["replayed"], true);
    assert_eq!(t["results"], first[0].0["results"]);
    let b = h
        .send(
            h.req(Method::POST, "/v1/batch")
                .json(&batch(json!({"s": "acme-secret"}))),
        )
        .await
        .json();
    assert_eq!(b["results"][0]["replayed"], true);
    assert_eq!(b["results"][0]["body"], first[0].1["results"][0]["body"]);
    let keys = h.applied_keys().await;
    assert_eq!(keys, ["op", "bk", "op", "bk"], "each tenant applied once");
}

/// Request framing a smuggler or a broken client sends (two body lengths,
/// a length beyond `u64`, too many headers, a path that is not UTF-8) is
/// refused with a 4xx and nothing is applied; a length beside chunked
/// closes the connection after the answer; the server goes on serving.
#[tokio::test]
async fn hostile_request_framing_is_refused_and_applies_nothing() {
    let h = start().await;
    let body = r#"{"id":"s","data":{}}"#;
    let post = |headers: &str, body: &str| {
        format!(
            "POST /v1/entities/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Idempotency-Key: s\r\nContent-Type: application/json\r\n{headers}\
             Connection: close\r\n\r\n{body}"
        )
    };
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let requests = [
        post(
            &format!("Content-Length: {}\r\nContent-Length: 2\r\n", body.len()),
            body,
        ),
        post("Content-Length: 18446744073709551616\r\n", body),
        post(&format!("{many}Content-Length: {}\r\n", body.len()), body),
        format!(
            "GET /v1/entities/t/%FF%FE HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\n\r\n"
        ),
    ];
    for request in &requests {
        let answer = h.raw(request).await;
        let status: u16 = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no answer to {request:?}: {answer:?}"));
        assert!((400..500).contains(&status), "{status} to {request:?}");
    }
    assert!(h.applied_keys().await.is_empty());
    // Both a length and chunked: the chunks count (RFC 9112 §6.3), the
    // connection closes after the answer, and a request smuggled behind
    // the body is never served.
    let te = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let smuggled = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", "")
        .replace("Connection: close\r\n", "")
        + &te
        + smuggled;
    let answer = h.raw(&request).await.to_ascii_lowercase();
    assert_eq!(answer.matches("http/1.1 ").count(), 1, "{answer}");
    assert!(answer.starts_with("http/1.1 201"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(h.applied_keys().await, ["s"]);
    let r = h.post_text("/v1/entities/t", Some("s2"), body.into()).await;
    assert_eq!(r.status, 409, "the server still serves: {}", r.text);
}

/// A device whose clock is far off (timestamps at the ends of `i64`)
/// cannot hide a stall: stall, last-seen and breaker times are the
/// server's clock, never the device's.
#[tokio::test]
async fn a_device_clock_far_off_cannot_hide_a_stall() {
    let start_ms = 1_700_000_000_000;
    let clock = ManualClock::new(start_ms);
    let h = start_with(
        ServerBuilder::new()
            .clock(clock.clone())
            .alert_rules(AlertRules {
                stalled_for: Some(Duration::from_secs(60)),
                ..AlertRules::default()
            }),
    )
    .await;
    let mut s = snapshot("liar", 5, 0, 0);
    s["succeeded"] = json!(10);
    s["oldest_pending_age_ms"] = json!(u64::MAX);
    for (at, advance) in [(i64::MAX, 61_000), (i64::MIN, 0)] {
        s["at"] = json!(at);
        s["last_sync_at"] = json!(at);
        let r = post_snapshot(&h, TOKEN, &s).await.unwrap();
        assert_eq!(r.status, 204, "{}", r.text);
        clock.advance_millis(advance);
    }
    let m = h.metrics().await.unwrap();
    assert_eq!(gauge(&m.text, "guardian_fleet_stalled_devices"), 1);
    let state = h.state().await.unwrap().json();
    let device = &state["devices"][0];
    assert_eq!(device["last_seen"], start_ms + 61_000);
    assert_eq!(device["last_progress_at"], start_ms);
    assert_eq!(device["breaker_since"], start_ms);
    assert!(
        state["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["rule"] == "stalled"),
        "{state}"
    );
}

/// A client that sends requests and never reads the answers must not hold
/// its connection (and the answer, here a feed page of ~5 MB) for good:
/// like the WebSocket, plain HTTP ends a write its peer does not take
/// within a bound (the request and realtime idle timeouts). Seen through
/// the per-peer cap of 1: while the stuck connection is open, every other
/// connection from its address is closed at once.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_let_go() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_with(
        ServerBuilder::new()
            .max_connections_per_peer(1)
            .header_read_timeout(Duration::from_millis(300))
            .request_timeout(Duration::from_secs(1))
            .ws_idle_timeout(Duration::from_secs(1)),
    )
    .await;
    for i in 0..6 {
        let data = format!("{{\"s\":\"{}\"}}", "x".repeat(900_000));
        let body = format!("{{\"id\":\"e{i}\",\"data\":{data}}}");
        let r = h
            .post_text("/v1/entities/t", Some(&format!("k{i}")), body)
            .await;
        assert_eq!(r.status, 201);
    }
    let addr = h.server.addr();
    // Connections from 127.0.0.2, so the harness's own (127.0.0.1) are
    // not counted.
    let open = || async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 0);
        socket.bind(local).unwrap();
        socket.connect(addr).await.unwrap()
    };
    let mut stuck = open().await;
    let page = format!(
        "GET /v1/changes?since=0&limit=1000 HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    stuck.write_all(page.repeat(30).as_bytes()).await.unwrap();
    // Polled: nothing signals the server letting a connection go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = open().await;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        if matches!(read, Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection that stopped reading was still open after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stuck);
}
