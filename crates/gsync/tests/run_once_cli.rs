//! `gsync run --once` and the command line as a script sees them (issue 15,
//! points 11 and 12): the real binary as a child process, against the
//! reference server on 127.0.0.1, a port with no listener, or a listener
//! that answers garbage. Every pass must end on its own with the exit status
//! that says why (0 delivered, 3 ops remain, 4 dead-lettered, 5 token
//! refused, 6 lock held); every child is bounded by a deadline and killed
//! at it, so a hang fails the test instead of stalling the suite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{metric, server, TOKEN};
use guardian_server::{Faults, RetryAfter, RetryAfterForm};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Longest any single gsync child may take here; far above what a pass
/// needs, far below "forever".
const DEADLINE: Duration = Duration::from_secs(40);

fn command(outbox: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gsync"));
    cmd.arg("--outbox")
        .arg(outbox)
        .args(args)
        // The defaults a user gets: no log filter, colours allowed.
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("GSYNC_OUTBOX")
        .env_remove("GSYNC_SERVER")
        .env_remove("GSYNC_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs gsync to its end, or kills it at the deadline and fails.
async fn gsync(outbox: &Path, args: &[&str]) -> Output {
    let started = Instant::now();
    let out = tokio::time::timeout(DEADLINE, command(outbox, args).output())
        .await
        .unwrap_or_else(|_| panic!("gsync {args:?} did not end within {DEADLINE:?}"))
        .unwrap();
    eprintln!(
        "gsync {args:?}: {:?} after {:?}",
        out.status.code(),
        started.elapsed()
    );
    out
}

async fn enqueue(outbox: &Path, n: usize) {
    for i in 0..n {
        let out = gsync(
            outbox,
            &["enqueue", "create", "item", &format!("i{i}"), r#"{"n":1}"#],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last line of stderr: the line that says why the pass stopped.
fn last_line(out: &Output) -> String {
    stderr(out).lines().last().unwrap_or_default().to_owned()
}

fn run_once<'a>(url: &'a str, token: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--once",
        "--server",
        url,
        "--token",
        token,
        "--retry-base",
        "50ms",
        "--retry-cap",
        "200ms",
    ];
    args.extend_from_slice(extra);
    args
}

fn assert_clean(out: &Output) {
    let err = stderr(out);
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape off a terminal: {err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_delivers_everything_exits_0() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 3).await;
    let out = gsync(&outbox, &run_once(&server.url(), TOKEN, &[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(last_line(&out).starts_with("done: queue empty; 3 succeeded"));
    assert_clean(&out);
}

/// Ops go in batches unless `--batch 0` asks for one request per op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_batches_by_default_and_batch_0_sends_op_by_op() {
    let batched = server(Faults::default()).await;
    let other = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 3).await;
    let out = gsync(&outbox, &run_once(&batched.url(), TOKEN, &[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(batched.requests_on("/v1/batch"), 1);
    assert_eq!(batched.requests_on("/v1/entities/{type}"), 0);

    let lone = dir.path().join("lone.db");
    enqueue(&lone, 3).await;
    let out = gsync(&lone, &run_once(&other.url(), TOKEN, &["--batch", "0"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(other.requests_on("/v1/batch"), 0);
    assert_eq!(other.requests_on("/v1/entities/{type}"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_exits_5_at_once() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 2).await;
    let out = gsync(&outbox, &run_once(&server.url(), "not-the-token", &[])).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(
        line.starts_with("gsync: the server refused the token"),
        "{line}"
    );
    assert!(line.contains("2 op(s) remain"), "{line}");
    assert_clean(&out);
}

/// A token no bearer header can carry is refused before anything starts,
/// on one line that does not quote it. Before, it reached the runner, which
/// reported it as "the server refused the token".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_no_header_can_carry_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    for token in ["sec ret", "sec\tret"] {
        let out = gsync(&outbox, &run_once("http://127.0.0.1:9", token, &[])).await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("gsync: --token (GSYNC_TOKEN)"), "{err}");
        assert!(!err.contains("sec"), "the token was quoted: {err}");
        assert_clean(&out);
    }
    assert!(!outbox.exists(), "nothing was created");
}

/// Option values refused once parsed are usage errors, exit 2 like those
/// clap refuses, on one line, before the outbox is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_values_refused_once_parsed_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    for extra in [
        &["--heartbeat", "0s"][..],
        &["--heartbeat", "2m"],
        &["--retry-base", "0s"],
        &["--breaker-threshold", "0"],
        &["--telemetry-interval", "1ns"],
        &["--telemetry-url", "nope"],
        &["--concurrency", "99999999999999999999"],
    ] {
        let out = gsync(&outbox, &run_once("http://127.0.0.1:9", TOKEN, extra)).await;
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        assert_clean(&out);
    }
    let out = gsync(&outbox, &run_once("not a url", TOKEN, &[])).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = gsync(
        &outbox,
        &run_once("http://127.0.0.1:9", TOKEN, &["--heartbeat", "0s"]),
    )
    .await;
    assert!(
        stderr(&out).contains("must be above zero and at most half the staleness threshold"),
        "{}",
        stderr(&out)
    );
    assert!(!outbox.exists(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_exits_3_and_says_so() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 2).await;
    let out = gsync(&outbox, &run_once(&url, TOKEN, &["--max-wait", "1s"])).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.contains("2 op(s) remain"), "{line}");
    assert!(line.contains("Connection refused"), "{line}");
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_garbage_exits_3() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let garbage = tokio::spawn(async move {
        // Bounded: a pass makes a handful of requests.
        for _ in 0..200 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(b"\x00\xffnot http at all\r\n\r\n").await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 1).await;
    let out = gsync(&outbox, &run_once(&url, TOKEN, &["--max-wait", "1s"])).await;
    garbage.abort();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.contains("1 op(s) remain"), "{line}");
    assert!(line.contains("last error"), "{line}");
    assert_clean(&out);
}

/// A server's refusal quoting line breaks and terminal escapes: they must
/// not reach the terminal or split a line (each event line, the last
/// line, and the failed op's row in `gsync ops`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_control_characters_never_reach_the_output() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hostile = tokio::spawn(async move {
        let body = serde_json::json!({
            "type": "urn:x:\nbad",
            "title": "t",
            "status": 422,
            "detail": "line one\nline two\r\n\u{1b}[1mbold\u{1b}[0m\u{7}",
        })
        .to_string();
        let answer = format!(
            "HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // Bounded: a pass makes a handful of requests.
        for _ in 0..200 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 1).await;
    let out = gsync(
        &outbox,
        &run_once(&url, TOKEN, &["--max-wait", "1s", "--batch", "0"]),
    )
    .await;
    hostile.abort();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains('\r') && !err.contains('\u{7}'), "{err:?}");
    for line in err.lines() {
        assert!(
            line.starts_with("failed ") || line.starts_with("gsync: ") || line.starts_with("lock "),
            "a line split off: {line:?} in {err:?}"
        );
    }
    assert!(last_line(&out).contains("\\u{1b}[1mbold"), "{err:?}");
    assert_clean(&out);
    let ops = gsync(&outbox, &["ops", "--state", "failed"]).await;
    let table = String::from_utf8_lossy(&ops.stdout).into_owned();
    assert!(
        !table.contains('\u{1b}') && !table.contains('\r') && table.lines().count() == 2,
        "{table:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_live_runner_exits_6() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 1).await;
    // A live runner (no --once) holds the lock until it is killed; it
    // sends to a port with no listener, so the ops stay queued.
    let dead = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let mut holder = command(
        &outbox,
        &[
            "run",
            "--server",
            &dead,
            "--token",
            TOKEN,
            "--events",
            "--heartbeat",
            "200ms",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("\"lock_acquired\"") {
                return;
            }
        }
        panic!("the holder ended without taking the lock");
    })
    .await
    .expect("the holder never took the lock");
    enqueue(&outbox, 1).await;
    let out = gsync(
        &outbox,
        &run_once(&server.url(), TOKEN, &["--max-wait", "1s"]),
    )
    .await;
    holder.start_kill().unwrap();
    let _ = holder.wait().await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(
        line.starts_with("gsync: another runner holds the processing lock (runner-"),
        "{line}"
    );
    assert!(line.contains("2 op(s) wait for it"), "{line}");
    assert_clean(&out);
}

/// An outbox another process keeps busy as the pass opens it (here a
/// connection holding its write lock) stops the pass after the busy
/// timeout like a held lock, with status 6 and the queue counted, and
/// touches nothing: once the lock is let go, a pass delivers every op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_kept_busy_as_it_opens_exits_6() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 2).await;
    let holder = rusqlite::Connection::open(&outbox).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let out = gsync(
        &outbox,
        &run_once(&server.url(), TOKEN, &["--max-wait", "0s"]),
    )
    .await;
    let took = started.elapsed();
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let line = last_line(&out);
    // `--max-wait 0s` bounds the open's wait to the pass's one attempt at
    // the lock (1 s), not the 5 s busy timeout.
    assert!(
        line.starts_with(
            "gsync: the outbox stayed busy: another process held its write lock for 1s as it opened"
        ),
        "{line}"
    );
    assert!(took < Duration::from_secs(5), "the open waited {took:?}");
    assert!(line.contains("2 op(s) wait for it"), "{line}");
    assert_clean(&out);
    let out = gsync(&outbox, &run_once(&server.url(), TOKEN, &[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        last_line(&out).starts_with("done: queue empty; 2 succeeded"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_through_a_v1_url_exits_4() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 1).await;
    let url = format!("{}/v1", server.url());
    let out = gsync(&outbox, &run_once(&url, TOKEN, &[])).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.contains("1 op(s) failed for good"), "{line}");
    assert!(line.contains("404"), "{line}");
    assert_clean(&out);
}

fn unavailable(retry_after_s: u64) -> Faults {
    Faults {
        failure_rate: 1.0,
        failure_statuses: vec![503],
        retry_after: Some(RetryAfter {
            seconds: retry_after_s,
            form: RetryAfterForm::Seconds,
        }),
        ..Faults::default()
    }
}

/// A Retry-After beyond `--max-wait` ends the pass at once with 3 and the
/// next attempt time; in JSON, the report says the same and the error is a
/// JSON object on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_left_past_max_wait_exit_3_with_the_next_attempt() {
    let server = server(unavailable(120)).await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 2).await;
    let out = gsync(&outbox, &run_once(&url, TOKEN, &["--max-wait", "2s"])).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let line = last_line(&out);
    assert!(line.contains("2 op(s) remain, next attempt in "), "{line}");
    assert!(line.contains("server answered 503"), "{line}");
    assert_clean(&out);

    let mut args = vec!["--json"];
    args.extend(run_once(&url, TOKEN, &["--max-wait", "2s"]));
    let out = gsync(&outbox, &args).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stop"], "remaining", "{report}");
    assert_eq!(report["exit_code"], 3, "{report}");
    assert_eq!(report["remaining"], 2, "{report}");
    assert!(report["next_attempt_at"].is_i64(), "{report}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let error: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(error["error"]["kind"], "ops_remain", "{error}");
    assert_eq!(error["error"]["exit_code"], 3, "{error}");
}

/// A Retry-After within `--max-wait` is waited out: once the server
/// recovers, the same pass delivers everything and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_after_is_waited_out() {
    let server = server(unavailable(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 2).await;
    let child = command(
        &outbox,
        &run_once(&server.url(), TOKEN, &["--max-wait", "30s"]),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while metric(&server, "guardian_injected_failures_total") == 0 {
        assert!(Instant::now() < deadline, "no request reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.set_faults(Faults::default()).unwrap();
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the pass did not end")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_clean(&out);
}

/// Errors are one line on stderr, with no colour and no log record, in
/// text and in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_and_json_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let out = gsync(&missing, &["ops"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("gsync: no outbox at "), "{err}");
    assert_clean(&out);

    let out = gsync(&missing, &["--json", "ops"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let error: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(error["error"]["exit_code"], 1, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("no outbox at "),
        "{error}"
    );
    assert!(out.stdout.is_empty());
}

/// A failing disk: the error names its cause once, on one line, without a
/// log record before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_error_is_one_line_with_its_cause_once() {
    common::require_tool("fiu-run", "fiu-utils");
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 1).await;
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("fiu-run")
            .args([
                "-x",
                "-c",
                "enable name=posix/io/sync/fsync,failinfo=28",
                env!("CARGO_BIN_EXE_gsync"),
                "--outbox",
            ])
            .arg(&outbox)
            .args(["enqueue", "create", "item", "full", "{}"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("gsync hung")
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_clean(&out);
    let parts: Vec<&str> = err.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(p),
            "cause {p:?} repeated in {err:?}"
        );
    }
}

/// A reader that went away (`gsync ops | head -1`) ends gsync quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 3).await;
    for args in [&["ops"][..], &["--json", "ops"], &["status"]] {
        let mut child = command(&outbox, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before gsync writes: its first write fails
        // with EPIPE.
        drop(child.stdout.take());
        let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
            .await
            .expect("gsync hung")
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", stderr(&out));
    }
    // The same through a shell pipeline, as a user types it.
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg("\"$0\" --outbox \"$1\" ops | head -1")
            .arg(env!("CARGO_BIN_EXE_gsync"))
            .arg(&outbox)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pipeline hung")
    .unwrap();
    assert!(out.status.success());
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// Output that cannot be written (`/dev/full`) after a change is made is
/// a warning naming the change, with status 0: a script retrying on a
/// failure would otherwise store the op twice. A read-only command still
/// fails with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_is_not_reported_as_failed_when_its_output_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    // `output()` would pipe standard output; spawned, it keeps /dev/full.
    async fn into_full(mut cmd: tokio::process::Command) -> std::process::Output {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
        cmd.stdout(full.unwrap()).stderr(Stdio::piped());
        cmd.spawn().unwrap().wait_with_output().await.unwrap()
    }
    for (json, id) in [(false, "a"), (true, "b")] {
        let mut args = vec!["enqueue", "create", "thing", id, "{\"x\":1}"];
        if json {
            args.insert(0, "--json");
        }
        let out = tokio::time::timeout(DEADLINE, into_full(command(&outbox, &args)))
            .await
            .expect("gsync hung");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("was stored"), "{err}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&err).unwrap();
            assert_eq!(v["warning"]["kind"], "output_lost", "{err}");
        } else {
            assert!(err.starts_with("gsync: warning: op "), "{err}");
        }
    }
    // Stderr on the same full disk (`> log 2>&1`): still status 0, no panic.
    let mut both = command(&outbox, &["enqueue", "create", "thing", "c", "{}"]);
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full");
    both.stdout(full().unwrap()).stderr(full().unwrap());
    let status = tokio::time::timeout(DEADLINE, both.status())
        .await
        .expect("gsync hung")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let listed = command(&outbox, &["--json", "ops"]).output().await.unwrap();
    let ops: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(ops.len(), 3, "each enqueue stored its op once");
    let out = tokio::time::timeout(DEADLINE, into_full(command(&outbox, &["ops"])))
        .await
        .expect("gsync hung");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot write to standard output"));
}

/// `serve --json` announces its address as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_json_prints_its_listening_line_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(
        &dir.path().join("unused.db"),
        &[
            "--json",
            "serve",
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "acme:secret",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("no listening line")
        .unwrap()
        .unwrap();
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["event"], "listening");
    assert!(v["url"].as_str().unwrap().starts_with("http://127.0.0.1:"));
}

/// On a terminal (a pty from `script`), the progress line redraws on its
/// own while the runner waits for an open breaker, counting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_line_counts_down_on_a_terminal() {
    common::require_tool("script", "bsdutils");
    let server = server(unavailable(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    enqueue(&outbox, 3).await;
    let line = format!(
        "'{}' --outbox '{}' run --once --server {} --token {TOKEN} --retry-base 50ms \
         --retry-cap 200ms --breaker-threshold 2 --breaker-cooldown 4s --max-wait 5s",
        env!("CARGO_BIN_EXE_gsync"),
        outbox.display(),
        server.url()
    );
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("script")
            .args(["-qfec", &line, "/dev/null"])
            .env_remove("RUST_LOG")
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the run under a pty did not end")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let countdowns: std::collections::BTreeSet<&str> = text
        .split(['\r', '\n'])
        .filter_map(|l| l.split("breaker open, trial in ").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|n| !n.is_empty())
        .collect();
    assert!(
        countdowns.len() >= 2,
        "the line did not count down while waiting: {countdowns:?} in {text:?}"
    );
}
