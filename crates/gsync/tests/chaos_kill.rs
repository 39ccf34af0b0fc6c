//! Runners SIGKILLed at random points of the drain (issue 7): before the
//! send, while the request is at the server (latency fault), right after the
//! server committed but before the ack was recorded (drop-after-commit fault,
//! killed as soon as the applied log grows), and after some acks. The next
//! runner takes over through the OS lock; at the end the six invariants of
//! DESIGN §11 are checked against the server's applied log.
//!
//! `GSYNC_CHAOS_ITERATIONS` (default 150) sets the number of kills;
//! `GSYNC_CHAOS_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{check_invariants, iterations, seed, server, Runner, RunnerOpts, Workload};
use guardian_server::Faults;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LONG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KillPoint {
    /// A random instant in the first milliseconds: opening, locking, claiming.
    Early,
    /// While a request is held at the server (before its commit).
    InRequest,
    /// The server committed, the response is dropped, the runner dies
    /// before it could record anything.
    AfterCommit,
    /// After a few acknowledged ops.
    AfterAcks,
}

fn opts(rng: &mut StdRng) -> RunnerOpts {
    let mut o = RunnerOpts::stale("1s", "60s");
    o.batch = if rng.random_bool(0.3) { 4 } else { 0 };
    o.concurrency = rng.random_range(1..=4);
    o
}

fn run_args() -> Vec<String> {
    // Short backoff so ops whose response was dropped come back quickly.
    vec![
        "--retry-base".into(),
        "20ms".into(),
        "--retry-cap".into(),
        "200ms".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_killed_at_random_points_loses_and_duplicates_nothing() {
    let seed = seed("sigkill_random_points");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "rk").await;
    let target = iterations(150);
    let mut kills: BTreeMap<KillPoint, usize> = BTreeMap::new();
    let mut finished_early = 0;
    let started = Instant::now();
    for i in 0..target {
        work.random_ops(&mut rng, 3).await;
        let point = match rng.random_range(0..4) {
            0 => KillPoint::Early,
            1 => KillPoint::InRequest,
            2 => KillPoint::AfterCommit,
            _ => KillPoint::AfterAcks,
        };
        let faults = match point {
            KillPoint::InRequest => Faults {
                latency_ms: 2_000,
                ..Faults::default()
            },
            KillPoint::AfterCommit => Faults {
                drop_after_commit_next: 1,
                ..Faults::default()
            },
            _ => Faults::default(),
        };
        server.set_faults(faults).unwrap();
        let applied_before = server.applied_log().await.unwrap().len();
        let o = opts(&mut rng).args(run_args());
        let mut r = Runner::spawn(&format!("rk{i}"), &path, &server.url(), &o);
        match point {
            KillPoint::Early => {
                let ms = rng.random_range(0..40);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            KillPoint::InRequest => {
                // Held at the server by the latency fault.
                let _ = tokio::time::timeout(LONG, server.wait_in_flight(1)).await;
            }
            KillPoint::AfterCommit => {
                // Kill the moment the server's log grows: the runner has at
                // best just seen its connection drop.
                let deadline = Instant::now() + Duration::from_secs(5);
                while server.applied_log().await.unwrap().len() == applied_before
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            KillPoint::AfterAcks => {
                let n = rng.random_range(1..4);
                r.wait_named("op_succeeded", n, LONG).await;
            }
        }
        let status = r.kill9().await;
        if status.signal() == Some(9) {
            *kills.entry(point).or_default() += 1;
        } else {
            assert!(status.success(), "runner {i} failed: {}", r.stderr());
            finished_early += 1;
        }
        common::assert_no_panic(&r.stderr());
        // Requests left behind by the dead runner finish at the server.
        server.set_faults(Faults::default()).unwrap();
    }
    eprintln!(
        "{} kills {kills:?}, {finished_early} runners finished first, {:?}",
        kills.values().sum::<usize>(),
        started.elapsed()
    );
    let final_opts = RunnerOpts::default().args(run_args());
    let mut last = Runner::spawn("final", &path, &server.url(), &final_opts);
    last.expect_success(LONG).await;
    let verdict = check_invariants(&server, &work).await;
    let replays = common::metric(&server, "guardian_idempotent_replays_total");
    eprintln!(
        "{} ops enqueued, {} applied, {} entities, {replays} replayed responses",
        work.ops.len(),
        verdict.applied,
        verdict.entities
    );
    assert!(
        kills.values().sum::<usize>() * 10 >= target * 7,
        "too few kills landed: {kills:?}"
    );
}
