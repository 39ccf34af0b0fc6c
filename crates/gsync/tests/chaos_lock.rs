//! The processing lock across real processes (issue 4, issue 7 item 2):
//! runners started together never both drain; a SIGKILLed holder is replaced
//! at once through the OS lock file; a SIGSTOPped holder is replaced after the
//! stale threshold and, once resumed, writes nothing. Every test ends with the
//! six invariants of DESIGN §11 checked against the server's applied log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{
    check_invariants, final_drain, iterations, seed, server, Runner, RunnerOpts, Workload,
};
use guardian_server::Faults;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LONG: Duration = Duration::from_secs(60);

fn latency(ms: u64) -> Faults {
    Faults {
        latency_ms: ms,
        ..Faults::default()
    }
}

/// No op was acknowledged by two runners: a runner whose fence was taken
/// away cannot record an outcome for an op the next holder re-sent.
fn assert_disjoint_acks(runners: &[Runner]) {
    let mut by_op = std::collections::HashMap::new();
    for r in runners {
        for op in r.succeeded_ops() {
            if let Some(other) = by_op.insert(op.clone(), r.label.clone()) {
                panic!("op {op} acknowledged by both {other} and {}", r.label);
            }
        }
    }
}

/// Two or three runners started at the same instant on one outbox: exactly
/// one drains; the others wait (no takeover of a live holder) and find
/// nothing left once it released the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_started_together_never_both_drain() {
    let server = server(latency(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "race").await;
    // Each round re-checks the whole history, so long runs get 1/20 of the
    // iterations as rounds (6 by default, 50 for 1,000).
    let rounds = (iterations(120) / 20).max(6);
    for round in 0..rounds {
        work.simple(4, 2).await;
        let k = 2 + round % 2;
        let opts = RunnerOpts::stale("300ms", "60s");
        let mut runners: Vec<Runner> = (0..k)
            .map(|i| Runner::spawn(&format!("r{round}.{i}"), &path, &server.url(), &opts))
            .collect();
        for r in &mut runners {
            r.expect_success(LONG).await;
        }
        assert_disjoint_acks(&runners);
        let drainers: Vec<&Runner> = runners.iter().filter(|r| !r.writes().is_empty()).collect();
        assert_eq!(
            drainers.len(),
            1,
            "round {round}: {} runners drained: {:?}",
            drainers.len(),
            runners.iter().map(Runner::events).collect::<Vec<_>>()
        );
        let mut epochs: Vec<u64> = runners.iter().flat_map(Runner::acquired_epochs).collect();
        let n = epochs.len();
        epochs.sort_unstable();
        epochs.dedup();
        assert_eq!(
            epochs.len(),
            n,
            "round {round}: an epoch was handed out twice"
        );
        for r in &runners {
            assert!(
                r.takeovers().is_empty(),
                "round {round}: {} took the lock from a live runner: {:?}",
                r.label,
                r.events()
            );
        }
        check_invariants(&server, &work).await;
    }
}

/// A runner SIGKILLed mid-drain, again and again; the next one is started at
/// once and must take over through the OS lock, long before the 60 s stale
/// threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_runner_is_replaced_at_once_through_the_os_lock() {
    let seed = seed("sigkill_takeover");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = server(latency(15)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "kill").await;
    let target_kills = iterations(32).max(30);
    let opts = RunnerOpts::stale("1s", "60s");
    let mut kills = 0;
    let mut takeovers = Vec::new();
    let mut holder_killed = false;
    let mut spawned = 0;
    while kills < target_kills {
        spawned += 1;
        assert!(
            spawned < target_kills * 3,
            "runners keep finishing before the kill"
        );
        work.random_ops(&mut rng, 4).await;
        let mut r = Runner::spawn(&format!("k{spawned}"), &path, &server.url(), &opts);
        let acquired = r
            .wait_event(LONG, |e| e["event"] == "lock_acquired")
            .await
            .unwrap_or_else(|| panic!("no lock_acquired: {}", r.stderr()));
        let took = r.started.elapsed();
        if holder_killed {
            assert!(
                acquired["took_over_from"].is_string(),
                "the previous holder was killed, yet no takeover: {acquired}"
            );
            takeovers.push(took);
            assert!(
                took < Duration::from_secs(15),
                "takeover after a SIGKILL took {took:?}: the OS lock path did not work"
            );
        }
        // Kill after a random number of applied ops (0 = right after acquiring).
        let after = rng.random_range(0..3);
        if after > 0 {
            r.wait_named("op_succeeded", after, LONG).await;
        }
        let status = r.kill9().await;
        // Killed while still holding the lock (a runner that drained
        // everything may have released it just before the signal).
        let row = work.outbox.lock_read().await.unwrap();
        holder_killed = status.signal() == Some(9)
            && row.is_some_and(|row| !row.owner.is_empty() && acquired["epoch"] == row.epoch);
        if holder_killed {
            kills += 1;
        } else {
            assert!(
                status.success() || status.signal() == Some(9),
                "runner failed: {}",
                r.stderr()
            );
        }
    }
    let max = takeovers.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{kills} SIGKILLs, {} takeovers, slowest takeover {max:?} (stale threshold 60 s)",
        takeovers.len()
    );
    assert!(
        takeovers.len() >= 29,
        "too few takeovers: {}",
        takeovers.len()
    );
    let last = final_drain(&path, &server.url()).await;
    assert!(last.takeovers().len() <= 1);
    check_invariants(&server, &work).await;
}

/// Freezes the current holder among `runners` with SIGSTOP once it applied an
/// op, and returns its index.
///
/// A process frozen inside a SQLite write transaction blocks every writer of
/// the file (nobody could take over, whatever the lock protocol), so the
/// freeze is kept only when `probe` can still write; otherwise the holder is
/// resumed and frozen again at its next event.
async fn freeze_holder(runners: &mut [Runner], frozen: &[(usize, usize)], probe: &Outbox) -> usize {
    let deadline = Instant::now() + LONG;
    let mut tries = 0;
    loop {
        let holder = runners.iter().enumerate().position(|(i, r)| {
            !frozen.iter().any(|(f, _)| *f == i) && !r.named("op_succeeded").is_empty()
        });
        if let Some(i) = holder {
            let r = &mut runners[i];
            r.signal(Signal::SIGSTOP);
            tries += 1;
            if probe
                .meta_set("chaos.probe", &tries.to_string())
                .await
                .is_ok()
            {
                return i;
            }
            r.signal(Signal::SIGCONT);
            // Let it finish that transaction: wait for its next event.
            let seen = r.event_count();
            r.wait_more(seen, Duration::from_secs(2)).await;
        }
        assert!(Instant::now() < deadline, "no runner drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A holder frozen with SIGSTOP keeps its OS lock, so a contender must wait
/// out the stale threshold (on its own monotonic clock) and then take over.
/// Resumed with SIGCONT, the frozen runner must find its fence gone: it
/// exits with the lost-lock error and writes nothing (no outcome event, no
/// new applied mutation, the lock row keeps the new epoch).
async fn frozen_holders_round(k: usize, started_together: bool, tag: &str) {
    let server = server(latency(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, tag).await;
    work.simple(6, 7).await;
    let (probe, _) = Outbox::open(
        &path,
        OutboxOptions::default().busy_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let stale = Duration::from_millis(1200);
    let opts = RunnerOpts::stale("300ms", "1200ms");
    let mut runners: Vec<Runner> = Vec::new();
    let mut frozen: Vec<(usize, usize)> = Vec::new(); // (runner, step)
    if started_together {
        for i in 0..k {
            runners.push(Runner::spawn(
                &format!("{tag}{i}"),
                &path,
                &server.url(),
                &opts,
            ));
        }
    } else {
        runners.push(Runner::spawn(
            &format!("{tag}0"),
            &path,
            &server.url(),
            &opts,
        ));
    }
    // Freeze holders one after the other until one runner is left.
    for step in 0..k - 1 {
        let i = freeze_holder(&mut runners, &frozen, &probe).await;
        let frozen_at = Instant::now();
        frozen.push((i, step));
        if !started_together {
            runners.push(Runner::spawn(
                &format!("{tag}{}", step + 1),
                &path,
                &server.url(),
                &opts,
            ));
        }
        // Somebody live takes over, after the stale threshold.
        let deadline = Instant::now() + LONG;
        let taker = loop {
            let found = runners.iter().enumerate().position(|(j, r)| {
                !frozen.iter().any(|(f, _)| *f == j)
                    && r.named("lock_acquired")
                        .iter()
                        .any(|e| e["took_over_from"].is_string())
            });
            if let Some(j) = found {
                break j;
            }
            assert!(
                Instant::now() < deadline,
                "nobody took over from the frozen holder {i}: {:?}",
                runners
                    .iter()
                    .map(|r| (r.label.clone(), r.events(), r.stderr()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let waited = frozen_at.elapsed();
        // The contender's watch started at the holder's last beat, at most one
        // heartbeat interval before the freeze.
        assert!(
            waited >= stale - Duration::from_millis(300),
            "{tag}: takeover {waited:?} after freezing, before the stale threshold {stale:?}"
        );
        eprintln!("{tag}: runner {taker} took over {waited:?} after the freeze");
    }
    // The last live runner drains everything.
    let live: Vec<usize> = (0..runners.len())
        .filter(|j| !frozen.iter().any(|(f, _)| f == j))
        .collect();
    for &j in &live {
        runners[j].expect_success(LONG).await;
    }
    let stats = work.outbox.stats().await.unwrap();
    assert_eq!(stats.pending + stats.in_flight, 0, "{stats:?}");
    let applied_before = server.applied_log().await.unwrap().len();
    let row_before = work.outbox.lock_read().await.unwrap();
    for (i, _) in &frozen {
        let r = &mut runners[*i];
        r.signal(Signal::SIGCONT);
        let status = r.wait_exit(LONG).await;
        let stderr = r.stderr();
        assert_eq!(status.code(), Some(1), "{}: {status}; {stderr}", r.label);
        assert!(
            stderr.contains("lost the processing lock"),
            "{}: expected the lost-lock error, got: {stderr}",
            r.label
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("gsync:")).count(),
            1,
            "one-line error: {stderr}"
        );
    }
    // Events of writes made before the freeze may still be printed after
    // SIGCONT (they sat in the printer's channel); an ack made after the
    // takeover would show up as an op acknowledged by two runners.
    assert_disjoint_acks(&runners);
    assert_eq!(
        server.applied_log().await.unwrap().len(),
        applied_before,
        "a resumed runner's request took effect"
    );
    assert_eq!(work.outbox.lock_read().await.unwrap(), row_before);
    check_invariants(&server, &work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_runner_is_replaced_after_the_stale_threshold_and_writes_nothing() {
    frozen_holders_round(2, false, "stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_race_with_a_stale_takeover() {
    frozen_holders_round(2, true, "two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_race_with_two_stale_takeovers() {
    frozen_holders_round(3, true, "three").await;
}
