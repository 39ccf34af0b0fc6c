//! No payload or token in any log at any level: `gsync serve`, `run` and
//! `watch` as child processes at `RUST_LOG=trace`, moving a recognisable
//! payload with a recognisable token, over HTTP and the WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "tok-SECRET-4f1e9b";
const PAYLOAD: &str = "PAYLOAD-MARKER-8c2d7a";

fn gsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gsync"));
    c.env("RUST_LOG", "trace").env_remove("GSYNC_TOKEN");
    c
}

/// Runs `cmd` to completion within `limit`; returns (stdout, stderr).
async fn output(mut cmd: Command, limit: Duration) -> (String, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(limit, out).await {
        Ok(out) => {
            let out = out.unwrap().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("a gsync command did not finish within {limit:?}");
        }
    }
}

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.is_empty() || what.ends_with("stdout"),
        "{what} logged nothing at trace"
    );
    for secret in [TOKEN, PAYLOAD] {
        if let Some(at) = text.find(secret) {
            let line = text[..at].rsplit('\n').next().unwrap_or("");
            panic!("{what} contains {secret}: {line}...");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_no_payload_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = gsync()
        .args(["serve", "--listen", "127.0.0.1:0", "--in-memory", "--token"])
        .arg(format!("acme:{TOKEN}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(server.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        (line, stdout)
    });
    let (line, mut stdout) = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("no 'listening on' line within 30 s")
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let mut server_err = server.stderr.take().unwrap();
    let server_log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = server_err.read_to_string(&mut s);
        let _ = stdout.read_to_string(&mut s);
        s
    });

    let outbox = dir.path().join("outbox.db");
    // The watcher follows the feed from the start: the change reaches it
    // over the WebSocket (both sides trace their frames).
    let mut watch = gsync();
    watch
        .args(["watch", "--since", "0", "--count", "1", "--server", &url])
        .env("GSYNC_TOKEN", TOKEN)
        .arg("--outbox")
        .arg(dir.path().join("watch.db"));
    let watcher = tokio::spawn(output(watch, Duration::from_secs(60)));

    let mut enqueue = gsync();
    enqueue
        .arg("--outbox")
        .arg(&outbox)
        .args(["enqueue", "create", "device", "d1"])
        .arg(format!(r#"{{"note":"{PAYLOAD}"}}"#));
    output(enqueue, Duration::from_secs(30)).await;
    let mut run = gsync();
    run.arg("--outbox")
        .arg(&outbox)
        .args(["run", "--once", "--server", &url])
        .env("GSYNC_TOKEN", TOKEN);
    let (run_out, run_err) = output(run, Duration::from_secs(60)).await;
    let (watch_out, watch_err) = watcher.await.unwrap();
    assert!(
        watch_out.contains(PAYLOAD),
        "the watcher did not print the change: {watch_out}"
    );

    let _ = server.kill();
    let _ = server.wait();
    let server_log = server_log.join().unwrap();
    assert_clean("serve output", &server_log);
    assert_clean("run stderr", &run_err);
    assert_clean("run stdout", &run_out);
    assert_clean("watch stderr", &watch_err);
}
