//! `gsync serve` as a user runs it: a child process on an ephemeral port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test]
async fn serve_listens_authenticates_and_applies() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "acme:secret",
            "--db",
        ])
        .arg(dir.path().join("server.db"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .expect("no 'listening on' line within 30 s")
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let http = reqwest::Client::new();
    let anon = http
        .get(format!("{url}/v1/entities/device/d1"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let created = http
        .post(format!("{url}/v1/entities/device"))
        .bearer_auth("secret")
        .header("idempotency-key", "k1")
        .json(&serde_json::json!({"id": "d1", "data": {"on": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let got = http
        .get(format!("{url}/v1/entities/device/d1"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["etag"], "\"1\"");
    child.kill().unwrap();
    child.wait().unwrap();
}
