//! Wall-clock jumps during a drain (issue 7), with Debian's libfaketime
//! preloaded into the runner processes and a spec file rewritten while they
//! run (`FAKETIME_TIMESTAMP_FILE`, no cache). The monotonic clock is left
//! alone (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a real machine whose wall
//! clock is stepped by NTP or a user.
//!
//! Claims checked: no false takeover (staleness is judged on the contender's
//! monotonic clock), no op stuck (a backoff scheduled before a backward jump
//! still comes due), Retry-After still honoured, and the six invariants of
//! DESIGN §11 against the server's applied log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{check_invariants, require_tool, server, Runner, RunnerOpts, Workload};
use guardian_server::{Faults, RetryAfter, RetryAfterForm};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn faketime_lib() -> &'static str {
    require_tool("faketime", "faketime");
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "this chaos test needs {LIBFAKETIME} (Debian package `libfaketime`, pulled in by `faketime`)"
    );
    LIBFAKETIME
}

/// Runner options under a rewritable fake wall clock.
fn under_fake_clock(spec: &Path, heartbeat: &str, stale: &str) -> RunnerOpts {
    let mut o = RunnerOpts::stale(heartbeat, stale).args([
        "--retry-base",
        "100ms",
        "--retry-cap",
        "500ms",
        "--max-attempts",
        "1000",
    ]);
    o.env = vec![
        ("LD_PRELOAD".into(), faketime_lib().into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), spec.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        // The engine warns when it sees the wall clock step: keep it for diagnosis.
        ("RUST_LOG".into(), "warn".into()),
    ];
    o
}

fn set_clock(spec: &Path, offset: &str) {
    std::fs::write(spec, format!("{offset}\n")).unwrap();
}

/// Each queued op with the time until it is due, in real seconds.
async fn describe_queue(work: &Workload) -> String {
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let ops = work
        .outbox
        .list(guardian_sync::outbox::ListFilter {
            state: None,
            limit: 100,
            after_seq: 0,
        })
        .await
        .unwrap();
    ops.iter()
        .map(|o| {
            format!(
                "{} {:?} attempts {} due in {} s",
                o.entity_id,
                o.state,
                o.attempts,
                (o.next_attempt_at - now) / 1000
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A holder whose wall clock jumps forward (after scheduling retries) and a
/// contender whose wall clock jumps forward and back: no false takeover,
/// nothing stuck, Retry-After honoured, invariants hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_cause_no_false_takeover() {
    let server = server(Faults {
        latency_ms: 40,
        fail_next: 3,
        failure_statuses: vec![503],
        retry_after: Some(RetryAfter {
            seconds: 1,
            form: RetryAfterForm::Seconds,
        }),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let spec_a: PathBuf = dir.path().join("clock-a");
    let spec_b: PathBuf = dir.path().join("clock-b");
    set_clock(&spec_a, "+0");
    set_clock(&spec_b, "-1h");
    let mut work = Workload::open(&path, "jump").await;
    work.simple(4, 6).await;
    let opts_a = under_fake_clock(&spec_a, "300ms", "1500ms");
    let mut a = Runner::spawn("a", &path, &server.url(), &opts_a);
    assert!(a
        .wait_event(Duration::from_secs(30), |e| e["event"] == "lock_acquired")
        .await
        .is_some());
    let opts_b = under_fake_clock(&spec_b, "300ms", "1500ms");
    let mut b = Runner::spawn("b", &path, &server.url(), &opts_b);
    // All three injected 503s answered, so no retry is scheduled between the
    // step and the runner noticing it (that case has its own test below).
    assert!(a.wait_named("op_retried", 3, Duration::from_secs(30)).await);
    let retried_at = Instant::now();
    set_clock(&spec_a, "+2h");
    set_clock(&spec_b, "+3h");
    assert!(
        a.wait_named("op_succeeded", 8, Duration::from_secs(30))
            .await
    );
    set_clock(&spec_a, "+1d");
    set_clock(&spec_b, "-2d");
    a.expect_success(Duration::from_secs(30)).await;
    let drained_in = retried_at.elapsed();
    b.expect_success(Duration::from_secs(30)).await;
    for r in [&a, &b] {
        assert!(
            r.takeovers().is_empty(),
            "false takeover by {}: {:?}",
            r.label,
            r.events()
        );
    }
    assert!(b.writes().is_empty(), "b drained while a held the lock");
    assert!(
        drained_in < Duration::from_secs(20),
        "drain took {drained_in:?}"
    );
    eprintln!(
        "clock jumps: no takeover, drained {drained_in:?} after the first retry ({} retries)",
        a.named("op_retried").len()
    );
    check_invariants(&server, &work).await;
}

/// Found by this test and fixed: `next_attempt_at` is wall-clock time, so a
/// step back of the wall clock used to strand retried ops for the size of
/// the step. The runner now detects steps (wall minus monotonic drift) and
/// re-bases the stored schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_wall_clock_step_does_not_strand_retried_ops() {
    let server = server(Faults {
        latency_ms: 40,
        fail_next: 3,
        failure_statuses: vec![503],
        retry_after: Some(RetryAfter {
            seconds: 1,
            form: RetryAfterForm::HttpDate,
        }),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let spec_a: PathBuf = dir.path().join("clock-a");
    let spec_b: PathBuf = dir.path().join("clock-b");
    set_clock(&spec_a, "+2h");
    set_clock(&spec_b, "-1h");
    let mut work = Workload::open(&path, "clock").await;
    work.simple(4, 6).await;
    let mut a = Runner::spawn(
        "a",
        &path,
        &server.url(),
        &under_fake_clock(&spec_a, "300ms", "1500ms"),
    );
    assert!(a
        .wait_event(Duration::from_secs(30), |e| e["event"] == "lock_acquired")
        .await
        .is_some());
    let mut b = Runner::spawn(
        "b",
        &path,
        &server.url(),
        &under_fake_clock(&spec_b, "300ms", "1500ms"),
    );
    // A scheduled retries on a clock two hours ahead; now its clock steps
    // back by two hours and B's forward by four.
    // All three injected 503s answered, so no retry is scheduled between the
    // step and the runner noticing it (that case has its own test below).
    assert!(a.wait_named("op_retried", 3, Duration::from_secs(30)).await);
    let jumped = Instant::now();
    set_clock(&spec_a, "+0");
    set_clock(&spec_b, "+3h");
    if !a
        .wait_named("op_succeeded", 8, Duration::from_secs(30))
        .await
    {
        panic!(
            "no op stuck: after the wall clock stepped back 2 h the drain stopped: {}; events of a: {:?}",
            describe_queue(&work).await,
            a.events()
        );
    }
    // And again: A forward a day, B back two days.
    set_clock(&spec_a, "+1d");
    set_clock(&spec_b, "-2d");
    a.expect_success(Duration::from_secs(30)).await;
    let drained_in = jumped.elapsed();
    b.expect_success(Duration::from_secs(30)).await;
    for r in [&a, &b] {
        assert!(
            r.takeovers().is_empty(),
            "false takeover by {}: {:?}",
            r.label,
            r.events()
        );
    }
    assert!(b.writes().is_empty(), "b drained while a held the lock");
    // The retried ops came back after their Retry-After (1 s), not hours later.
    assert!(
        drained_in < Duration::from_secs(20),
        "ops stuck after the clock jump: drained {drained_in:?} after it"
    );
    eprintln!(
        "clock jumps: drained {drained_in:?} after the backward jump; retries {}",
        a.named("op_retried").len()
    );
    check_invariants(&server, &work).await;
}

/// A request is at the server when the wall clock steps forward by 3 h; its
/// connection is then dropped, so its retry is scheduled on the new clock
/// before the runner notices the step. Re-basing must not move that retry a
/// second time (it would then wait 3 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_step_during_a_request_does_not_strand_its_retry() {
    let server = server(Faults {
        latency_ms: 400,
        drop_before_commit_next: 1,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let spec: PathBuf = dir.path().join("clock");
    set_clock(&spec, "+0");
    let mut work = Workload::open(&path, "inflight").await;
    work.simple(1, 2).await;
    let opts = under_fake_clock(&spec, "300ms", "1500ms");
    let mut a = Runner::spawn("a", &path, &server.url(), &opts);
    tokio::time::timeout(Duration::from_secs(30), server.wait_in_flight(1))
        .await
        .expect("the first request never reached the server");
    set_clock(&spec, "+3h");
    assert!(a.wait_named("op_retried", 1, Duration::from_secs(30)).await);
    let stepped = Instant::now();
    if tokio::time::timeout(
        Duration::from_secs(20),
        a.wait_exit(Duration::from_secs(30)),
    )
    .await
    .is_err()
    {
        panic!(
            "the retry scheduled after the step is stranded: {}; stderr: {}",
            describe_queue(&work).await,
            a.stderr()
        );
    }
    a.expect_success(Duration::from_secs(1)).await;
    eprintln!(
        "in-flight step: drained {:?} after the retry",
        stepped.elapsed()
    );
    check_invariants(&server, &work).await;
}
