//! The processing lock is bound to the outbox file, not to the path it was
//! opened by (issue 15 point 10), with real processes: a live, beating
//! holder is never displaced before the stale threshold by a contender that
//! reaches the outbox through a symlink or a hard link, or after its
//! `<outbox>.lock` file was deleted; a SIGKILLed holder is still replaced at
//! once through the OS lock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{server, Runner, RunnerOpts, Workload};
use guardian_server::Faults;

const LONG: Duration = Duration::from_secs(60);
/// The contenders' stale threshold in the no-takeover cases.
const STALE: Duration = Duration::from_secs(2);

/// A live runner (not `--once`) that holds the lock on `path` and beats.
async fn holder(path: &Path, url: &str) -> Runner {
    let mut opts = RunnerOpts::stale("200ms", "60s");
    opts.once = false;
    let mut h = Runner::spawn("holder", path, url, &opts);
    assert!(
        h.wait_event(LONG, |e| e["event"] == "lock_acquired")
            .await
            .is_some(),
        "the holder never took the lock: {}",
        h.stderr()
    );
    h
}

/// A contender on `path` with a 2 s stale threshold must not take the lock
/// from the live holder within three thresholds.
async fn must_not_take_over(label: &str, path: &Path, url: &str) -> Runner {
    let opts = RunnerOpts::stale("200ms", "2s");
    let mut c = Runner::spawn(label, path, url, &opts);
    let took = c
        .wait_event(STALE * 3, |e| e["event"] == "lock_acquired")
        .await;
    assert!(
        took.is_none(),
        "{label} displaced a live holder: {took:?}; stderr: {}",
        c.stderr()
    );
    // Still waiting for the lock: a contender that failed to open the
    // outbox would pass the check above without testing anything.
    assert!(
        c.is_running(),
        "{label} exited instead of waiting for the lock; stderr: {}",
        c.stderr()
    );
    c.kill9().await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_is_not_displaced_through_another_path() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "ident").await;
    work.simple(2, 1).await;
    let mut h = holder(&path, &server.url()).await;

    // Through a symlink (and a relative spelling of its directory).
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    must_not_take_over("symlink", &link, &server.url()).await;
    let dotted = dir
        .path()
        .join(".")
        .join("..")
        .join(dir.path().file_name().unwrap());
    must_not_take_over("dotted", &dotted.join("link.db"), &server.url()).await;

    // The holder kept the lock all along: its epoch is still the row's.
    let row = work.outbox.lock_read().await.unwrap().unwrap();
    assert_eq!(Some(row.epoch), h.acquired_epochs().first().copied());

    // A crashed holder is still replaced at once (its OS lock file is the
    // one it recorded), far before this contender's 60 s threshold.
    h.kill9().await;
    let started = Instant::now();
    let mut next = Runner::spawn(
        "next",
        &link,
        &server.url(),
        &RunnerOpts::stale("200ms", "60s"),
    );
    let acquired = next
        .wait_event(LONG, |e| e["event"] == "lock_acquired")
        .await;
    let Some(acquired) = acquired else {
        panic!("no takeover after SIGKILL; stderr: {}", next.stderr());
    };
    assert!(acquired["took_over_from"].is_string(), "{acquired}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "takeover after a SIGKILL took {:?}",
        started.elapsed()
    );
    next.expect_success(LONG).await;
}

/// Through a hard link the outbox is refused outright (SQLite would keep a
/// second write-ahead log for that name, and the lock could not tell the
/// two names apart): the contender exits 1 and the holder keeps the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_link_is_refused_and_the_holder_keeps_the_lock() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "hard").await;
    work.simple(2, 1).await;
    let mut h = holder(&path, &server.url()).await;
    let hard = dir.path().join("hard.db");
    std::fs::hard_link(&path, &hard).unwrap();
    let mut c = Runner::spawn(
        "hard",
        &hard,
        &server.url(),
        &RunnerOpts::stale("200ms", "2s"),
    );
    let status = c.wait_exit(LONG).await;
    assert_eq!(status.code(), Some(1), "stderr: {}", c.stderr());
    assert!(c.stderr().contains("hard links"), "{}", c.stderr());
    assert!(c.takeovers().is_empty() && c.acquired_epochs().is_empty());
    std::fs::remove_file(&hard).unwrap();
    let row = work.outbox.lock_read().await.unwrap().unwrap();
    assert_eq!(Some(row.epoch), h.acquired_epochs().first().copied());
    // The holder still beats (the refused contender may have exited before
    // its first beat): wait, bounded, for one.
    let deadline = Instant::now() + LONG;
    loop {
        let row = work.outbox.lock_read().await.unwrap().unwrap();
        assert_eq!(Some(row.epoch), h.acquired_epochs().first().copied());
        if row.heartbeat > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the holder stopped beating");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lock_file_does_not_let_a_contender_in() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "rmlock").await;
    work.simple(2, 1).await;
    let mut h = holder(&path, &server.url()).await;
    let lock_file = dir.path().join("outbox.db.lock");
    assert!(lock_file.exists());
    std::fs::remove_file(&lock_file).unwrap();
    must_not_take_over("after-rm", &path, &server.url()).await;
    // Once the holder is gone for good, the heartbeat is the judge: a
    // contender takes over after its threshold, not before.
    h.kill9().await;
    let started = Instant::now();
    let mut next = Runner::spawn(
        "next",
        &path,
        &server.url(),
        &RunnerOpts::stale("200ms", "2s"),
    );
    let acquired = next
        .wait_event(LONG, |e| e["event"] == "lock_acquired")
        .await
        .expect("no takeover after the threshold");
    assert!(acquired["took_over_from"].is_string(), "{acquired}");
    assert!(
        started.elapsed() >= STALE,
        "took over after {:?}",
        started.elapsed()
    );
    next.expect_success(LONG).await;
}
