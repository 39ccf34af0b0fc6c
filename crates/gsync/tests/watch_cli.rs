//! `gsync watch` as a real process against the reference server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use guardian_protocol::MutationKind;
use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::transport::{
    HttpTransport, HttpTransportConfig, OpRequest, StaticToken, Transport,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const TOKEN: &str = "tok-watch";
const WAIT: Duration = Duration::from_secs(20);

async fn create(server: &RunningServer, ids: std::ops::RangeInclusive<u32>) {
    let t = HttpTransport::new(
        &HttpTransportConfig::new(server.url()),
        Arc::new(StaticToken::new(TOKEN)),
    )
    .unwrap();
    for i in ids {
        let op = OpRequest::new(
            MutationKind::Create,
            "note",
            format!("n{i}"),
            json!({"i": i}),
            None,
            uuid::Uuid::new_v4().to_string(),
        );
        let outcome = t.send(&op).await;
        assert!(format!("{outcome:?}").starts_with("Applied"), "{outcome:?}");
    }
}

fn watch(
    server: &RunningServer,
    outbox: &Path,
    extra: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gsync"))
        .arg("--outbox")
        .arg(outbox)
        .args([
            "--json",
            "watch",
            "--server",
            &server.url(),
            "--poll-interval",
            "100ms",
        ])
        .args(extra)
        .env("GSYNC_TOKEN", TOKEN)
        .env_remove("GSYNC_OUTBOX")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no output in time")
        .unwrap()
        .expect("output ended");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Reads lines until a change event; returns it and the states seen before.
async fn next_change(lines: &mut Lines<BufReader<ChildStdout>>) -> (Value, Vec<String>) {
    let mut states = Vec::new();
    loop {
        let v = next_json(lines).await;
        match v["event"].as_str() {
            Some("change") => return (v["change"].clone(), states),
            Some("state") => states.push(v["state"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected line {v}"),
        }
    }
}

#[tokio::test]
async fn watch_prints_backlog_and_live_changes_and_persists_the_cursor() {
    let server = ServerBuilder::new()
        .token("t", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("watch.db");
    create(&server, 1..=2).await;

    let (mut child, mut lines) = watch(
        &server,
        &outbox,
        &["--since", "0", "--count", "3", "--persist"],
    );
    let (first, states) = next_change(&mut lines).await;
    assert_eq!(
        (first["cursor"].as_u64(), first["id"].as_str()),
        (Some(1), Some("n1"))
    );
    assert!(states.contains(&"connected".to_owned()), "{states:?}");
    assert_eq!(next_change(&mut lines).await.0["cursor"], 2);
    create(&server, 3..=3).await;
    assert_eq!(next_change(&mut lines).await.0["cursor"], 3);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // Resumes after the saved cursor: no replay of 1..=3.
    create(&server, 4..=4).await;
    let (mut child, mut lines) = watch(&server, &outbox, &["--count", "1", "--persist"]);
    assert_eq!(next_change(&mut lines).await.0["cursor"], 4);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn watch_shows_the_fallback_when_the_server_goes_away() {
    let server = ServerBuilder::new()
        .token("t", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = watch(&server, &dir.path().join("unused.db"), &["--since", "0"]);
    loop {
        let v = next_json(&mut lines).await;
        if v == json!({"event": "state", "state": "connected"}) {
            break;
        }
    }
    server.shutdown().await;
    loop {
        let v = next_json(&mut lines).await;
        if v == json!({"event": "state", "state": "disconnected"}) {
            break;
        }
    }
    child.kill().await.unwrap();
    // Without --persist no outbox file is created.
    assert!(!dir.path().join("unused.db").exists());
}
