//! Telemetry from the command line, with real child processes: `gsync
//! run`'s telemetry flags (labels, interval, a telemetry URL of its own,
//! off).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Runner, RunnerOpts, Workload, TENANT, TOKEN};
use guardian_server::{Faults, RunningServer, ServerBuilder};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

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
