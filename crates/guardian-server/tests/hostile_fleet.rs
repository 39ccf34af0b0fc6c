//! The fleet telemetry, the dashboard and the alert webhook against hostile
//! or broken devices, careless operators and hostile webhook receivers, over
//! real HTTP on 127.0.0.1: absurd numbers, markup and line breaks in device
//! text, thousands of devices, reordered snapshots, a breaker that cycles,
//! the admin token in the address, repeated headers, webhook receivers that
//! never answer, redirect, answer garbage or without end, a flapping device
//! and tenants whose names look alike.
//!
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use guardian_server::clock::ManualClock;
use guardian_server::{AlertRules, FleetLimits, RunningServer, ServerBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const TOKEN: &str = "tok-acme";
const OTHER_TOKEN: &str = "tok-globex";
const ADMIN: &str = "adm-fleet-7c1d9e";
const T0: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------- harness

struct Harness {
    server: RunningServer,
    http: reqwest::Client,
}

fn builder() -> ServerBuilder {
    ServerBuilder::new()
        .token("acme", TOKEN)
        .token("globex", OTHER_TOKEN)
        .admin_token(ADMIN)
        .in_memory()
}

async fn start(b: ServerBuilder) -> Harness {
    let server = b.bind("127.0.0.1:0").await.expect("bind");
    // A bounded client: a server that blocks shows as a failed request,
    // never as a hung test. Redirects are shown, not followed.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Harness { server, http }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// Posts a snapshot as `token`; the status and the body's text.
    async fn post(&self, token: &str, body: &Value) -> (u16, String) {
        self.post_text(token, body.to_string()).await
    }

    async fn post_text(&self, token: &str, body: String) -> (u16, String) {
        let r = self
            .http
            .post(self.url("/v1/telemetry"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the snapshot got no answer");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    async fn post_ok(&self, token: &str, body: &Value) {
        let (status, text) = self.post(token, body).await;
        assert_eq!(status, 204, "{body}: {text}");
    }

    /// `/dashboard/state` as text.
    async fn state_text(&self) -> String {
        let r = self
            .http
            .get(self.url("/dashboard/state"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("/dashboard/state got no answer");
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    async fn state(&self) -> Value {
        serde_json::from_str(&self.state_text().await).expect("the state is JSON")
    }
}

/// A valid snapshot of an idle, healthy device.
fn snap(id: &str) -> Value {
    json!({
        "runner_id": id, "labels": {}, "at": T0, "seq": 1,
        "queue": {"pending": 0, "in_flight": 0, "failed": 0},
        "last_failures": [], "breaker": "closed", "health_score": 90,
        "succeeded": 0, "failed": 0, "conflicts": 0, "breaker_trips": 0,
    })
}

/// `snap(id)` reporting `failed` dead letters.
fn dead(id: &str, failed: u64) -> Value {
    let mut s = snap(id);
    s["queue"]["failed"] = json!(failed);
    s["failed"] = json!(failed);
    s
}

/// Only the dead-letter rule, at "any dead letter".
fn dead_letter_rules() -> AlertRules {
    AlertRules {
        breaker_open_for: None,
        stalled_for: None,
        dead_letters_above: Some(0),
        fleet_health_below: None,
    }
}

// ------------------------------------------------- a hostile webhook receiver

/// How the receiver answers one request.
#[derive(Clone)]
enum Reply {
    /// 204.
    Ok,
    /// 307 to another URL.
    Redirect(String),
    /// Never answers; reports the connection's end as the string `"eof"`.
    Hang,
    /// 200 with a body that never ends.
    EndlessBody,
    /// Bytes that are no HTTP answer, then the connection closes.
    Garbage,
    /// Waits until the gate opens, then 204.
    Gated(watch::Receiver<bool>),
}

/// A webhook receiver on 127.0.0.1 written on bare TCP, so it can misbehave
/// at every step. Each request's JSON body goes to `rx` as it arrives,
/// before the answer.
struct Hook {
    url: String,
    rx: mpsc::UnboundedReceiver<Value>,
    received: Arc<AtomicUsize>,
}

async fn hook(path: &str, reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Hook {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let reply: Arc<dyn Fn(usize) -> Reply + Send + Sync> = Arc::new(reply);
    let received = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (tx, reply, count) = (tx.clone(), Arc::clone(&reply), Arc::clone(&count));
            tokio::spawn(serve_hook_conn(sock, tx, reply, count));
        }
    });
    Hook { url, rx, received }
}

async fn serve_hook_conn(
    mut sock: TcpStream,
    tx: mpsc::UnboundedSender<Value>,
    reply: Arc<dyn Fn(usize) -> Reply + Send + Sync>,
    count: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
        buf.drain(..head_end + len);
        let n = count.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(body);
        let answer = match reply(n) {
            Reply::Ok => "HTTP/1.1 204 No Content\r\n\r\n".to_owned(),
            Reply::Redirect(to) => {
                format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n")
            }
            Reply::Gated(mut gate) => {
                let _ = gate.wait_for(|open| *open).await;
                "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
            }
            Reply::Hang => {
                while matches!(sock.read(&mut chunk).await, Ok(n) if n > 0) {}
                let _ = tx.send(json!("eof"));
                return;
            }
            Reply::Garbage => {
                let _ = sock.write_all(b"\x00\xffnot http at all\r\n\r\n").await;
                return;
            }
            Reply::EndlessBody => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            content-length: 1000000000000\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b' '; 64 * 1024];
                // Written until the peer goes away (the socket's buffer
                // holds the loop back while the peer does not read).
                while sock.write_all(&piece).await.is_ok() {}
                return;
            }
        };
        if sock.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The next request's body the receiver got (bounded).
async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("no webhook call in time")
        .expect("receiver gone")
}

/// Webhook bodies until one satisfies `done` (bounded); all of them.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = next(rx).await;
        let stop = done(&v);
        got.push(v);
        if stop {
            return got;
        }
    }
}

/// Polls `cond` until it holds (bounded; nothing signals these).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------ device input

/// Numbers and text a device cannot mean are a 400 problem document, and
/// nothing is stored; numbers at the ends of their types are kept as given
/// and break neither `/metrics` nor the dashboard's JSON (even a fleet mean
/// of two `f64::MAX` latencies, which overflows to infinity).
#[tokio::test]
async fn absurd_numbers_are_refused_or_kept_exactly_never_a_500() {
    let h = start(builder()).await;
    let base = snap("d1");
    let refused: Vec<(&str, Value)> = vec![
        ("/queue/pending", json!(-1)),
        ("/queue/failed", json!(1.5)),
        ("/succeeded", json!(1e30)),
        ("/seq", json!("1")),
        ("/at", json!(1e300)),
        ("/health_score", json!(101)),
        ("/health_score", json!(256)),
        ("/health_score", json!(-1)),
        ("/latency_p50_ms", json!(-0.5)),
        ("/breaker", json!("OPEN")),
        ("/labels", json!({"": "empty key"})),
        ("/labels", json!({"k": "v".repeat(129)})),
        ("/labels", json!({"k": 5})),
        ("/runner_id", json!("dévice-1")),
        ("/runner_id", json!("a\u{0}b")),
        ("/runner_id", json!("x".repeat(129))),
        ("/last_failures", json!(["é".repeat(201)])),
    ];
    for (ptr, v) in refused {
        let mut s = base.clone();
        match s.pointer_mut(ptr) {
            Some(slot) => *slot = v.clone(),
            None => s[&ptr[1..]] = v.clone(),
        }
        let (status, text) = h.post(TOKEN, &s).await;
        assert_eq!(status, 400, "{ptr} = {v}: {text}");
        let problem: Value = serde_json::from_str(&text).expect("a problem document");
        assert_eq!(problem["status"], 400, "{text}");
    }
    // What JSON text can say but no number type holds.
    let text = base.to_string();
    for (from, to) in [
        (r#""succeeded":0"#, r#""succeeded":18446744073709551616"#),
        (r#""succeeded":0"#, r#""succeeded":0,"latency_p50_ms":NaN"#),
        (
            r#""succeeded":0"#,
            r#""succeeded":0,"latency_p95_ms":Infinity"#,
        ),
        (
            r#""succeeded":0"#,
            r#""succeeded":0,"latency_p95_ms":1e400"#,
        ),
        (r#""health_score":90"#, r#""health_score":90.0"#),
        (r#""seq":1"#, r#""seq":-0.0"#),
    ] {
        let body = text.replacen(from, to, 1);
        assert_ne!(body, text);
        let (status, answer) = h.post_text(TOKEN, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    assert_eq!(h.state().await["devices"], json!([]), "nothing stored");

    // The ends of every type, from two devices: kept exactly.
    for id in ["max-1", "max-2"] {
        let mut s = snap(id);
        s["queue"] = json!({"pending": u64::MAX, "in_flight": u64::MAX, "failed": u64::MAX});
        for k in [
            "succeeded",
            "failed",
            "conflicts",
            "breaker_trips",
            "seq",
            "oldest_pending_age_ms",
        ] {
            s[k] = json!(u64::MAX);
        }
        s["at"] = json!(i64::MIN);
        s["last_sync_at"] = json!(i64::MAX);
        s["latency_p50_ms"] = json!(f64::MAX);
        s["latency_p95_ms"] = json!(f64::MAX);
        h.post_ok(TOKEN, &s).await;
    }
    let m = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(&format!("guardian_fleet_queue_depth {}", u64::MAX)),
        "{m}"
    );
    // Wait for a second of the series to close (its mean of p50 overflows).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let state = loop {
        let s = h.state().await;
        if s["series"]
            .as_array()
            .and_then(|a| a.last())
            .is_some_and(|p| !p["p95_ms"].is_null())
        {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no series point");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let d = &state["devices"][0];
    assert_eq!(d["succeeded"], u64::MAX);
    assert_eq!(d["oldest_pending_age_ms"], u64::MAX);
    assert_eq!(d["last_sync_at"], i64::MAX);
    assert_eq!(d["latency_p95_ms"], f64::MAX);
    let point = state["series"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(point["p95_ms"], f64::MAX, "{point}");
    assert!(
        point["p50_ms"].is_null() || point["p50_ms"].is_number(),
        "{point}"
    );
}

/// Markup, script, line breaks that would end a server-sent event, bidi
/// overrides and NULs in a device's id, labels and reasons stay data: the
/// page never carries them (it is static and inserts device text with
/// `textContent` only), its policy forbids any other origin, the JSON is
/// `application/json`, and the event stream carries them as one event
/// that parses back to exactly what was sent.
#[tokio::test]
async fn markup_and_line_breaks_in_device_text_stay_data() {
    let h = start(builder()).await;
    let id = "<script>alert(1)</script>";
    let label = "</script><img src=x onerror=alert(1)>\n\nevent: state\ndata: {\"devices\":[]}\n\n";
    let reason = "<svg onload=alert(2)>\r\n\r\ndata: x\r\u{2028}\u{2029}";
    let mut s = dead(id, 1);
    s["labels"] = json!({"<b>k</b>": label, "bidi": "\u{202e}gnp.exe", "nul": "a\u{0}b"});
    s["last_failures"] = json!([reason]);
    // Known first, so the dead letter is news (an incident with its reason).
    let mut known = snap(id);
    known["labels"] = s["labels"].clone();
    h.post_ok(TOKEN, &known).await;
    h.post_ok(TOKEN, &s).await;

    let page = h
        .http
        .get(h.url("/dashboard"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(!csp.contains('*') && !csp.contains("http"), "{csp}");
    let html = page.text().await.unwrap();
    // The device's text is not in the page, and the page has no way to
    // insert text as markup.
    for bad in [
        id,
        "<img src=x",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
    ] {
        assert!(!html.contains(bad), "the page holds {bad:?}");
    }

    let r = h
        .http
        .get(h.url("/dashboard/state"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(r.headers()["cache-control"], "no-store");
    let state: Value = r.json().await.unwrap();
    let d = &state["devices"][0];
    assert_eq!(d["runner_id"], id);
    assert_eq!(d["labels"]["<b>k</b>"], label);
    assert_eq!(d["labels"]["nul"], "a\u{0}b");
    assert_eq!(state["incidents"][0]["reason"], reason);

    // The stream: the first event is whole and parses back exactly.
    let r = h
        .http
        .get(h.url("/dashboard/events"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let caching: Vec<_> = r.headers().get_all("cache-control").iter().collect();
    assert_eq!(caching, ["no-store"]);
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let event = loop {
        if let Some(i) = buf.find("\n\n") {
            let e: String = buf.drain(..i + 2).collect();
            if e.lines().any(|l| l.starts_with("data:")) {
                break e;
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("no event in time")
            .expect("stream ended")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    };
    let kinds: Vec<_> = event.lines().filter(|l| l.starts_with("event:")).collect();
    assert_eq!(kinds, ["event: state"], "{event}");
    let data: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    assert_eq!(data.len(), 1, "one data line: {event}");
    assert!(
        event
            .lines()
            .all(|l| l.is_empty() || l.starts_with("data:") || l.starts_with("event:")),
        "no other field: {event}"
    );
    let v: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(v["devices"][0]["labels"]["<b>k</b>"], label);
    assert_eq!(v["incidents"][0]["reason"], reason);
}

/// Snapshots overtaking one another (a request that timed out at the
/// device but was still queued at the server, a retrying proxy): the
/// server must keep the newest (`seq`, `at`), never roll the device back.
/// Before, the late one won: the dashboard showed a closed breaker that was
/// open, the timeline two trips that never happened, and the counters going
/// "down" counted as a restart, so the device's 3 conflicts were reported
/// as 6 (and its acked ops, the throughput chart, likewise). A restarted
/// runner, whose `seq` starts again but whose snapshots are later, is still
/// heard.
#[tokio::test]
async fn a_late_snapshot_cannot_roll_a_device_back() {
    let clock = ManualClock::new(T0);
    let h = start(builder().clock(clock.clone())).await;
    let at = |seq: u64, breaker: &str, acked: u64, conflicts: u64| {
        let mut s = snap("phone");
        s["seq"] = json!(seq);
        s["at"] = json!(T0 + 1000 * seq as i64);
        s["breaker"] = json!(breaker);
        s["succeeded"] = json!(acked);
        s["conflicts"] = json!(conflicts);
        s["queue"]["pending"] = json!(1);
        s
    };
    for s in [
        at(1, "closed", 10, 0),
        at(3, "open", 30, 3),
        at(2, "closed", 20, 2), // late: sent before seq 3
    ] {
        h.post_ok(TOKEN, &s).await;
        clock.advance_millis(1000);
    }
    let state = h.state().await;
    let d = &state["devices"][0];
    assert_eq!(
        d["breaker"], "open",
        "the late snapshot rolled it back: {d}"
    );
    assert_eq!(d["succeeded"], 30);
    h.post_ok(TOKEN, &at(4, "open", 30, 3)).await;
    let state = h.state().await;
    let conflicts: u64 = state["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "conflict")
        .map(|i| i["count"].as_u64().unwrap())
        .sum();
    assert_eq!(conflicts, 3, "{}", state["incidents"]);
    let changes: Vec<_> = state["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["closed", "open"]);

    // The runner restarts: `seq` 1 again, taken later, counters from 0.
    let mut restarted = at(1, "closed", 2, 0);
    restarted["at"] = json!(T0 + 10_000);
    h.post_ok(TOKEN, &restarted).await;
    let state = h.state().await;
    assert_eq!(state["devices"][0]["breaker"], "closed");
    assert_eq!(state["devices"][0]["succeeded"], 2);
}

/// A real breaker whose backend is down cycles open → half-open (one trial
/// after the cooldown, 60 s by default) → open. The device has not synced
/// for minutes. Before, each half-open report restarted the rule's clock,
/// so "breaker open at least X" never fired for any X above the cooldown
/// (and at X = the cooldown, the default, only if a tick landed in the
/// milliseconds before the trial); now the rule counts from the last time
/// the breaker was closed, and the alert does not resolve at each trial.
#[tokio::test]
async fn a_breaker_cycling_through_half_open_still_raises_the_open_alert() {
    let clock = ManualClock::new(T0);
    let h = start(builder().clock(clock.clone()).alert_rules(AlertRules {
        breaker_open_for: Some(Duration::from_secs(90)),
        stalled_for: None,
        dead_letters_above: None,
        fleet_health_below: None,
    }))
    .await;
    let report = |breaker: &str| {
        let mut s = snap("cycling");
        s["breaker"] = json!(breaker);
        s["health_score"] = json!(5);
        s["queue"]["pending"] = json!(3);
        s
    };
    // Five minutes of: open for the 60 s cooldown, a trial that fails.
    for _ in 0..5 {
        h.post_ok(TOKEN, &report("open")).await;
        clock.advance_millis(60_000);
        h.post_ok(TOKEN, &report("half_open")).await;
        clock.advance_millis(200);
    }
    h.post_ok(TOKEN, &report("open")).await;
    let state = h.state().await;
    let fired = state["alert_log"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["alert"]["rule"] == "breaker_open" && e["status"] == "firing");
    assert!(
        fired,
        "no breaker_open alert after 5 min without a closed breaker: {}",
        state["alert_log"]
    );
    let events: Vec<_> = state["alert_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["firing"], "it fired once, for good");
    assert_eq!(state["alerts"][0]["since"], T0);
}

/// Three tenants announcing thousands of new devices at once (each device
/// reporting twice: a trip, a conflict, a dead letter): every answer is 204
/// or 503, the fleet keeps its bounds, and every log the dashboard sends
/// keeps its length. (The fleet's total is the dashboard's bound on devices
/// sent, so the state shows every device kept.)
#[tokio::test]
async fn thousands_of_new_devices_keep_the_fleet_and_every_log_bounded() {
    let limits = FleetLimits {
        devices_per_tenant: 60,
        devices_total: 100,
        history: 5,
    };
    let h = start(
        builder()
            .token("initech", "tok-initech")
            .fleet_limits(limits),
    )
    .await;
    let hr = &h;
    let flood = move |token: &'static str| {
        let h = hr;
        async move {
            let mut answers = std::collections::BTreeMap::<u16, usize>::new();
            for i in 0..400 {
                let id = format!("{token}-{i:04}");
                let first = snap(&id);
                let mut second = dead(&id, 1);
                second["breaker"] = json!("open");
                second["conflicts"] = json!(1);
                second["last_failures"] = json!(["x".repeat(200)]);
                for s in [first, second] {
                    let (status, text) = h.post(token, &s).await;
                    assert!(status == 204 || status == 503, "{status}: {text}");
                    *answers.entry(status).or_default() += 1;
                }
            }
            answers
        }
    };
    let (a, b, c) = tokio::join!(flood(TOKEN), flood(OTHER_TOKEN), flood("tok-initech"));
    assert!(
        a[&204] > 0 && b[&204] > 0 && c[&204] > 0,
        "{a:?} {b:?} {c:?}"
    );
    let state = h.state().await;
    let devices = state["devices"].as_array().unwrap();
    assert!(devices.len() <= 100, "{} devices", devices.len());
    assert_eq!(state["aggregates"]["devices"], devices.len());
    for tenant in ["acme", "globex", "initech"] {
        let n = devices.iter().filter(|d| d["tenant"] == tenant).count();
        assert!(n <= 60, "{tenant} keeps {n}");
        assert!(n >= 20, "{tenant} was locked out: {n}");
    }
    assert!(devices
        .iter()
        .all(|d| d["history"].as_array().unwrap().len() <= 5));
    for (log, len) in [("timeline", 200), ("incidents", 50), ("alert_log", 50)] {
        let n = state[log].as_array().unwrap().len();
        assert!(n <= len, "{log}: {n}");
    }
    // One alert per device at most (dead letters), plus none per tenant.
    assert!(state["alerts"].as_array().unwrap().len() <= devices.len());
}

/// The dashboard's state goes whole in every event (at most every 200 ms,
/// and at least once a second with the series tick). Before, it held every
/// device, its labels, reasons and history, and one tenant's token was
/// enough to make that huge: here 400 devices with labels and reasons at
/// their bounds (control characters, six bytes each in JSON) passed 4 MiB,
/// the bound of a feed page; at the default limits (10 000 devices, 120
/// history points each) one event was some 250 MB, cloned under the
/// fleet's lock and serialized again for each open page, several times a
/// second. Now it holds the worst devices and the fleet's totals.
#[tokio::test]
async fn the_dashboard_state_stays_bounded_when_one_tenant_fills_its_share() {
    let h = start(builder()).await;
    let labels: serde_json::Map<String, Value> = (0..16)
        .map(|i| {
            let key = format!("{i:02}{}", "\u{1}".repeat(62));
            (key, json!("\u{1}".repeat(128)))
        })
        .collect();
    let reasons: Vec<String> = (0..5).map(|_| "\u{1}".repeat(200)).collect();
    let started = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..400 {
        let mut s = snap(&format!("fat-{i:04}"));
        s["labels"] = Value::Object(labels.clone());
        s["last_failures"] = json!(reasons);
        let t = std::time::Instant::now();
        h.post_ok(TOKEN, &s).await;
        slowest = slowest.max(t.elapsed());
    }
    let state = h.state_text().await;
    eprintln!(
        "400 devices posted in {:?} (slowest {:?}); state is {} bytes",
        started.elapsed(),
        slowest,
        state.len()
    );
    assert!(
        state.len() <= 4 * 1024 * 1024,
        "one dashboard event is {} bytes for 400 devices of one tenant",
        state.len()
    );
    // It says how many it leaves out.
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["aggregates"]["devices"], 400);
    assert!(state["devices"].as_array().unwrap().len() < 400);
}

// ------------------------------------------------------------- the operator

/// The admin token in the address (`/dashboard?token=`), right, wrong,
/// repeated or on the wrong route, is never echoed: not in a body, not in a
/// header (the redirect goes to `/dashboard` exactly, whatever else the
/// query holds, so neither the token nor an attacker's URL rides along),
/// not in the cookie.
#[tokio::test]
async fn the_admin_token_in_the_address_is_never_echoed() {
    let h = start(builder()).await;
    let cases = [
        (format!("/dashboard?token={ADMIN}"), Some(303)),
        (
            format!("/dashboard?token={ADMIN}&next=https%3A%2F%2Fevil.example%2F&x=%3Cb%3E"),
            Some(303),
        ),
        (
            format!("/dashboard?next=%2F%2Fevil.example&token={ADMIN}"),
            Some(303),
        ),
        (format!("/dashboard?token={ADMIN}&token={ADMIN}"), None),
        (format!("/dashboard?token={ADMIN}x"), Some(401)),
        (format!("/dashboard?token=%3Cscript%3E{ADMIN}"), Some(401)),
        (format!("/dashboard/state?token={ADMIN}"), Some(401)),
        (format!("/dashboard/events?token={ADMIN}"), Some(401)),
        (format!("/dashboard/?token={ADMIN}"), None),
        (format!("/v1/telemetry?token={ADMIN}"), None),
    ];
    for (path, want) in cases {
        let r = h.http.get(h.url(&path)).send().await.unwrap();
        let status = r.status().as_u16();
        if let Some(want) = want {
            assert_eq!(status, want, "{path}");
        }
        assert!(status < 500, "{path}: {status}");
        for (name, value) in r.headers() {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains(ADMIN), "{path}: the token in {name}: {v}");
            assert!(!v.contains("evil.example"), "{path}: {name}: {v}");
        }
        if status == 303 {
            assert_eq!(r.headers()["location"], "/dashboard", "{path}");
        }
        let body = r.text().await.unwrap();
        assert!(
            !body.contains(ADMIN),
            "{path}: the token in the body: {body}"
        );
        assert!(!body.contains("<script>"), "{path}: {body}");
    }
}

/// Repeated credentials are nobody's: two bearer headers of two tenants on
/// a snapshot store it under neither; two admin headers are refused; and a
/// request stuffed with session cookies has only its first four checked.
#[tokio::test]
async fn repeated_credentials_are_nobodys() {
    let h = start(builder()).await;
    for tokens in [[TOKEN, OTHER_TOKEN], [TOKEN, TOKEN], [ADMIN, TOKEN]] {
        let r = h
            .http
            .post(h.url("/v1/telemetry"))
            .header("authorization", format!("Bearer {}", tokens[0]))
            .header("authorization", format!("Bearer {}", tokens[1]))
            .json(&snap("twice"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{tokens:?}");
    }
    assert_eq!(h.state().await["devices"], json!([]));
    let r = h
        .http
        .get(h.url("/dashboard/state"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let login = h
        .http
        .get(h.url(&format!("/dashboard?token={ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let pair = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let junk = |n: usize| {
        (0..n)
            .map(|i| format!("gsync_dashboard={i:016x}.{}", "0".repeat(64)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let with_cookie = |cookie: String| {
        let req = h
            .http
            .get(h.url("/dashboard/state"))
            .header("cookie", cookie);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(with_cookie(format!("{}; {pair}", junk(3))).await, 200);
    assert_eq!(with_cookie(format!("{}; {pair}", junk(4))).await, 401);
    assert_eq!(with_cookie(format!("{}; {pair}", junk(500))).await, 401);
}

// ---------------------------------------------------------- the webhook side

/// A receiver that accepts the connection and never answers holds nothing
/// but its own deliveries: reports keep being answered at once while it
/// holds one, and shutdown neither waits for it (one attempt may take 5 s)
/// nor leaves the attempt's connection open.
#[tokio::test]
async fn a_webhook_that_never_answers_holds_neither_reports_nor_shutdown() {
    let mut hook = hook("/hook", |_| Reply::Hang).await;
    let h = start(
        builder()
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("d1", 1)).await;
    let first = next(&mut hook.rx).await;
    assert_eq!(first["status"], "firing");
    let fast = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for i in 0..50u64 {
        let r = fast
            .post(h.url("/v1/telemetry"))
            .bearer_auth(TOKEN)
            .json(&dead(&format!("d{}", i % 5), i % 2))
            .send()
            .await
            .expect("a report waited on the webhook");
        assert_eq!(r.status(), 204);
    }
    let state = fast
        .get(h.url("/dashboard/state"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("the dashboard waited on the webhook");
    assert_eq!(state.status(), 200);
    tokio::time::timeout(Duration::from_secs(4), h.server.shutdown())
        .await
        .expect("shutdown waited on the webhook");
    // The held attempt's connection is let go at shutdown.
    let end = tokio::time::timeout(Duration::from_secs(4), async {
        while let Some(v) = hook.rx.recv().await {
            if v == json!("eof") {
                return;
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "the webhook's connection was still open after shutdown"
    );
}

/// A receiver that redirects is not followed (the alert, with tenant and
/// device names, goes nowhere it was not configured to): the redirect is a
/// failed attempt, retried at the configured URL.
#[tokio::test]
async fn a_webhook_redirect_is_not_followed() {
    let mut elsewhere = hook("/elsewhere", |_| Reply::Ok).await;
    let to = elsewhere.url.clone();
    let mut hook = hook("/hook", move |_| Reply::Redirect(to.clone())).await;
    let h = start(
        builder()
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("d1", 1)).await;
    // A followed redirect would have reached `elsewhere` before the retry.
    assert_eq!(next(&mut hook.rx).await["status"], "firing");
    assert_eq!(next(&mut hook.rx).await["status"], "firing");
    assert!(
        elsewhere.rx.try_recv().is_err(),
        "the redirect was followed"
    );
    assert_eq!(elsewhere.received.load(Ordering::SeqCst), 0);
}

/// A receiver answering garbage gets the event again; one answering 200
/// with a body that never ends has it delivered (the body is not awaited):
/// the next event comes next, not a retry after a 5 s timeout.
#[tokio::test]
async fn webhook_answers_of_garbage_or_without_end_do_not_stall_deliveries() {
    let mut hook = hook("/hook", |n| match n {
        0 => Reply::Garbage,
        1 => Reply::EndlessBody,
        _ => Reply::Ok,
    })
    .await;
    let h = start(
        builder()
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("d1", 1)).await;
    let a = next(&mut hook.rx).await;
    let again = next(&mut hook.rx).await;
    assert_eq!(a, again, "the garbage answer was retried");
    assert_eq!(a["status"], "firing");
    h.post_ok(TOKEN, &dead("d1", 0)).await;
    let b = next(&mut hook.rx).await;
    assert_eq!(
        b["status"], "resolved",
        "the endless answer was not taken as delivered: {b}"
    );
    assert_eq!(b["alert"]["key"], a["alert"]["key"]);
}

/// One device whose dead-letter count flaps (1, 0, 1, ...) makes an alert
/// event per report; while the receiver is slow they wait for delivery.
/// Before, they filled a shared queue of 256 and another tenant's alert was
/// dropped: its operator was never paged. Now an alert's waiting event is
/// replaced by its newer one, so the flood holds one place, delivered in
/// its latest state. (A receiver that takes 200 ms per call, or a device
/// reporting quickly, is enough in production; here the receiver holds its
/// first call until the flood is in.)
#[tokio::test]
async fn a_flapping_device_cannot_crowd_another_tenants_alert_out_of_the_webhook() {
    let (open, gate) = watch::channel(false);
    let mut hook = hook("/hook", move |_| Reply::Gated(gate.clone())).await;
    let h = start(
        builder()
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("flapper", 1)).await;
    assert_eq!(next(&mut hook.rx).await["alert"]["device"], "flapper");
    for i in 0..300u64 {
        h.post_ok(TOKEN, &dead("flapper", i % 2)).await;
    }
    h.post_ok(OTHER_TOKEN, &dead("victim", 1)).await;
    open.send_replace(true);
    // A marker behind everything before it.
    h.post_ok(OTHER_TOKEN, &dead("marker", 1)).await;
    let got = until(&mut hook.rx, |v| v["alert"]["device"] == "marker").await;
    assert!(
        got.iter().any(|v| v["alert"]["device"] == "victim"),
        "globex's alert never reached the webhook ({} calls before the marker)",
        hook.received.load(Ordering::SeqCst)
    );
    let flood: Vec<_> = got
        .iter()
        .filter(|v| v["alert"]["device"] == "flapper")
        .collect();
    assert_eq!(flood.len(), 1, "the flood took one place: {got:?}");
    assert_eq!(flood[0]["status"], "firing", "its latest state");
}

/// Alert keys are `rule/tenant/device` joined by `/`, and both tenant and
/// runner ids may hold a `/`. Before, tenant `org`'s device `team/d1` and
/// tenant `org/team`'s device `d1` had the same key, so the second
/// tenant's alert was taken for the first's, never sent to the webhook
/// (and a resolution of one hid behind the other).
#[tokio::test]
async fn alerts_of_two_tenants_never_share_a_key() {
    let mut hook = hook("/hook", |_| Reply::Ok).await;
    let h = start(
        ServerBuilder::new()
            .token("org", "tok-org")
            .token("org/team", "tok-team")
            .admin_token(ADMIN)
            .in_memory()
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok("tok-org", &dead("team/d1", 1)).await;
    let first = next(&mut hook.rx).await;
    assert_eq!(first["alert"]["tenant"], "org");
    h.post_ok("tok-team", &dead("d1", 1)).await;
    h.post_ok("tok-org", &dead("marker", 1)).await;
    let got = until(&mut hook.rx, |v| v["alert"]["device"] == "marker").await;
    let state = h.state().await;
    let keys: Vec<_> = state["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_owned())
        .collect();
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "shared keys: {keys:?}");
    assert!(
        got.iter().any(|v| v["alert"]["tenant"] == "org/team"),
        "tenant org/team's alert never reached the webhook: {got:?}"
    );
}

/// A log writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Webhook URLs carry their secret (Slack, Teams, PagerDuty put it in the
/// path; basic auth in the userinfo). A failed delivery logs reqwest's
/// error, whose text was "... for url (<the whole URL>)": the secret
/// landed in the log, which the server otherwise keeps free of tokens (see
/// `tests/access_log.rs`). The runtime of a `#[tokio::test]` is one
/// thread, so a thread-local subscriber sees the delivery task's events.
#[tokio::test]
async fn a_failed_webhook_delivery_keeps_the_url_secret_out_of_the_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // A port nobody listens on: every attempt fails at once.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("http://alerts:pw-4f1e2d@127.0.0.1:{port}/services/T0/B0/path-secret-9a8b");
    let h = start(
        builder()
            .alert_webhook(url)
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("d1", 1)).await;
    let log = captured.clone();
    eventually("a failed delivery logged", || {
        log.text().contains("alert webhook unreachable")
    })
    .await;
    let text = captured.text();
    for secret in ["path-secret-9a8b", "pw-4f1e2d"] {
        assert!(!text.contains(secret), "{secret:?} in the log:\n{text}");
    }
}

/// A device evicted to make room (its tenant's least recently seen, which
/// is just what a broken device that went silent is) drops out of the
/// rules' input. Before, its firing alert was then sent as `resolved`: the
/// operator was told the dead letters were gone when the device merely
/// stopped being kept. Any device of the tenant (or, when the fleet is
/// full, of a smaller tenant) announcing new runner ids can do this. Now
/// the alert ends as `evicted`.
#[tokio::test]
async fn an_evicted_device_is_not_reported_as_recovered() {
    let mut hook = hook("/hook", |_| Reply::Ok).await;
    let clock = ManualClock::new(T0);
    let h = start(
        builder()
            .clock(clock.clone())
            .fleet_limits(FleetLimits {
                devices_per_tenant: 2,
                devices_total: 100,
                history: 4,
            })
            .alert_webhook(hook.url.clone())
            .alert_rules(dead_letter_rules()),
    )
    .await;
    h.post_ok(TOKEN, &dead("broken", 3)).await;
    assert_eq!(next(&mut hook.rx).await["status"], "firing");
    for id in ["new-1", "new-2"] {
        clock.advance_millis(1000);
        h.post_ok(TOKEN, &snap(id)).await;
    }
    h.post_ok(TOKEN, &dead("marker", 1)).await;
    let got = until(&mut hook.rx, |v| v["alert"]["device"] == "marker").await;
    assert!(
        !got.iter()
            .any(|v| v["alert"]["device"] == "broken" && v["status"] == "resolved"),
        "the evicted device was reported recovered: {got:?}"
    );
    assert!(
        got.iter()
            .any(|v| v["alert"]["device"] == "broken" && v["status"] == "evicted"),
        "{got:?}"
    );
}
