//! Telemetry and alerts from the command line, with real child processes:
//! `gsync run`'s telemetry flags (labels, interval, a telemetry URL of its
//! own, off) and `gsync serve`'s alert flags, whose alerts a real webhook
//! receiver on 127.0.0.1 gets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Runner, RunnerOpts, Workload, TENANT, TOKEN};
use guardian_server::{Faults, RunningServer, ServerBuilder};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const ADMIN: &str = "adm-cli";
const LONG: Duration = Duration::from_secs(20);

/// The runners' sync server and, apart, the server that collects their
/// telemetry.
async fn servers() -> (RunningServer, RunningServer) {
    let data = common::server(Faults::default()).await;
    let monitor = ServerBuilder::new()
        .token(TENANT, TOKEN)
        .admin_token(ADMIN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    (data, monitor)
}

async fn fleet(http: &reqwest::Client, server: &str) -> Value {
    http.get(format!("{server}/dashboard/state"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn run_reports_its_labels_at_its_interval_to_its_telemetry_url() {
    let (data, monitor) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut workload = Workload::open(&path, "tel").await;
    workload.create().await;
    let opts = RunnerOpts {
        once: false,
        ..RunnerOpts::default()
    }
    .args(["--label", "app=field-notes", "--label", "device=tablet-3"])
    .args(["--telemetry-interval", "200ms"])
    .args(["--telemetry-url", monitor.url().as_str()]);
    let mut runner = Runner::spawn("labelled", &path, &data.url(), &opts);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + LONG;
    let mut first_seen = None;
    let device = loop {
        let state = fleet(&http, &monitor.url()).await;
        if let Some(d) = state["devices"].as_array().and_then(|a| a.first()) {
            let seen = *first_seen.get_or_insert_with(Instant::now);
            if d["succeeded"] == 1 {
                break d.clone();
            }
            // The default interval (5 s) would not report the ack this soon.
            assert!(
                seen.elapsed() < Duration::from_secs(3),
                "the ack was not reported at the 200ms interval: {d}"
            );
        }
        assert!(Instant::now() < deadline, "no telemetry: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        device["labels"],
        json!({"app": "field-notes", "device": "tablet-3"})
    );
    assert_eq!(data.requests_on("/v1/telemetry"), 0);
    // Event lines carry the runner's wall-clock time.
    let ok = runner
        .wait_event(LONG, |e| e["event"] == "op_succeeded")
        .await
        .unwrap();
    assert!(ok["at"].as_i64().is_some_and(|at| at > 0), "{ok}");
    runner.signal(Signal::SIGINT);
    runner.expect_success(LONG).await;
}

#[tokio::test]
async fn run_with_no_telemetry_sends_none() {
    let (data, _monitor) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let live = RunnerOpts {
        once: false,
        ..RunnerOpts::default()
    };
    // Telemetry is on by default: a runner reports as soon as it holds the lock.
    let path = dir.path().join("on.db");
    Workload::open(&path, "on").await.create().await;
    let mut on = Runner::spawn("on", &path, &data.url(), &live);
    let deadline = Instant::now() + LONG;
    while data.requests_on("/v1/telemetry") == 0 {
        assert!(
            Instant::now() < deadline,
            "a default runner sent no telemetry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    on.signal(Signal::SIGINT);
    on.expect_success(LONG).await;
    let before = data.requests_on("/v1/telemetry");

    let path = dir.path().join("off.db");
    Workload::open(&path, "off").await.create().await;
    let mut off = Runner::spawn("off", &path, &data.url(), &live.args(["--no-telemetry"]));
    assert!(off
        .wait_event(LONG, |e| e["event"] == "op_succeeded")
        .await
        .is_some());
    off.signal(Signal::SIGINT);
    off.expect_success(LONG).await;
    assert_eq!(data.requests_on("/v1/telemetry"), before);

    // Telemetry settings and --no-telemetry contradict each other.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args(["--outbox", path.to_str().unwrap(), "run", "--server"])
        .arg(data.url())
        .args(["--no-telemetry", "--label", "a=b"])
        .env("GSYNC_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A webhook receiver on 127.0.0.1: answers 503 to the first delivery (so
/// the server must retry) and 200 to the rest; hands over every body.
async fn webhook_receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/alerts", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((conn, _)) = listener.accept().await {
            let Some(body) = read_request(conn, first).await else {
                continue;
            };
            first = false;
            if tx.send(body).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// Reads one POST, answers it (503 when `refuse`) and closes.
async fn read_request(conn: TcpStream, refuse: bool) -> Option<Value> {
    let mut conn = BufReader::new(conn);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("POST /hooks/alerts "), "{head}");
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await.ok()?;
    let status = if refuse {
        "503 Service Unavailable"
    } else {
        "200 OK"
    };
    let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    conn.get_mut().write_all(reply.as_bytes()).await.ok()?;
    serde_json::from_slice(&body).ok()
}

fn snapshot(id: &str, breaker: &str, pending: u64, failed: u64) -> Value {
    json!({
        "runner_id": id, "labels": {}, "at": 0, "seq": 1,
        "queue": {"pending": pending, "in_flight": 0, "failed": failed},
        "oldest_pending_age_ms": null, "last_failures": [], "breaker": breaker,
        "health_score": 10, "latency_p50_ms": null, "latency_p95_ms": null,
        "succeeded": 0, "failed": failed, "conflicts": 0, "breaker_trips": 0,
        "last_sync_at": null,
    })
}

#[tokio::test]
async fn serve_fires_its_alert_rules_to_a_real_webhook() {
    let (hook, mut received) = webhook_receiver().await;
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--in-memory"])
        .args(["--token", "acme:tok-acme"])
        .args(["--alert-breaker-open", "200ms", "--alert-stalled", "300ms"])
        .args(["--alert-dead-letters", "2", "--alert-fleet-health", "50"])
        .args(["--alert-webhook", &hook])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(serve.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(LONG, stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let http = reqwest::Client::new();
    for body in [
        snapshot("tripped", "open", 0, 0),
        snapshot("stuck", "closed", 5, 0),
        snapshot("dead", "closed", 0, 3),
        // At the limit (2), not above it.
        snapshot("edge", "closed", 0, 2),
    ] {
        let r = http
            .post(format!("{url}/v1/telemetry"))
            .bearer_auth("tok-acme")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let wanted: BTreeSet<(String, String)> = [
        ("breaker_open", "tripped"),
        ("stalled", "stuck"),
        ("dead_letters", "dead"),
        // A tenant-wide rule: no device.
        ("fleet_health", ""),
    ]
    .iter()
    .map(|(r, d)| ((*r).to_owned(), (*d).to_owned()))
    .collect();
    let mut fired = BTreeSet::new();
    let mut deliveries = Vec::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !wanted.is_subset(&fired) {
        let event = tokio::time::timeout_at(deadline, received.recv())
            .await
            .unwrap_or_else(|_| panic!("alerts missing; got {deliveries:?}"))
            .unwrap();
        assert_eq!(event["status"], "firing", "{event}");
        let alert = &event["alert"];
        assert_eq!(alert["tenant"], "acme");
        fired.insert((
            alert["rule"].as_str().unwrap().to_owned(),
            alert["device"].as_str().unwrap_or("").to_owned(),
        ));
        deliveries.push(alert["key"].clone());
    }
    assert_eq!(fired, wanted, "{deliveries:?}");
    // The first delivery was refused and sent again.
    assert_eq!(deliveries.first(), deliveries.get(1), "{deliveries:?}");
    serve.start_kill().unwrap();
    let _ = serve.wait().await;
}
