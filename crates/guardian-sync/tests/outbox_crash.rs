//! Crash test with real processes: a child enqueues in a loop (four
//! concurrent enqueuers, so group commits are in flight) and prints each op
//! id once `enqueue` returned; the parent SIGKILLs it at random moments
//! (including during the very first open and schema creation), reopens the
//! file and checks that every printed op is there with its payload, that
//! nothing else is (at most the ops whose enqueue had started), that no op
//! appears twice, and that the integrity check passes.
//!
//! The child is this same test binary, re-executed to run `crash_child`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guardian_sync::op::NewOp;
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use serde_json::json;

const CHILD_ENV: &str = "GUARDIAN_OUTBOX_CRASH_CHILD";
const RUN_ENV: &str = "GUARDIAN_OUTBOX_CRASH_RUN";
const KILLS: usize = 60;

/// The child: enqueue forever (until killed; 20 s safety limit).
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return; // Not a child: nothing to do.
    };
    let run: u32 = std::env::var(RUN_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (outbox, _) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
        println!("OPEN");
        let mut tasks = Vec::new();
        for w in 0..4u32 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0u32;
                while started.elapsed() < Duration::from_secs(20) {
                    let id = format!("r{run}-w{w}-{n}");
                    println!("TRY {id}");
                    let done = outbox
                        .enqueue(NewOp::create(
                            "crash",
                            &id,
                            json!({"run": run, "w": w, "n": n}),
                        ))
                        .await
                        .unwrap();
                    println!("OK {id} {}", done.op_id);
                    n += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

struct RunLog {
    tried: BTreeSet<String>,
    confirmed: BTreeMap<String, String>,
}

fn run_child(path: &std::path::Path, run: u32, kill_after: Duration) -> RunLog {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env(RUN_ENV, run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = RunLog {
            tried: BTreeSet::new(),
            confirmed: BTreeMap::new(),
        };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TRY"), Some(id), None) => {
                    log.tried.insert(id.to_owned());
                }
                (Some("OK"), Some(id), Some(op)) => {
                    log.confirmed.insert(id.to_owned(), op.to_owned());
                }
                _ => {}
            }
        }
        log
    });
    std::thread::sleep(kill_after);
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

#[test]
fn sigkill_never_loses_an_acknowledged_op() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut all_tried = BTreeSet::new();
    let mut all_confirmed = BTreeMap::new();
    let mut total_confirmed = 0;
    for run in 0..KILLS {
        // Early kills hit open and schema creation; later ones the enqueue loop.
        let ms = if run < 5 {
            rng.random_range(0..30)
        } else {
            rng.random_range(20..120)
        };
        let log = run_child(
            &path,
            u32::try_from(run).unwrap(),
            Duration::from_millis(ms),
        );
        total_confirmed += log.confirmed.len();
        all_tried.extend(log.tried);
        all_confirmed.extend(log.confirmed);
        rt.block_on(async {
            let (outbox, report) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
            assert!(
                report.salvage.is_none(),
                "run {run}: file judged damaged: {report:?}"
            );
            let ops = outbox
                .list(ListFilter {
                    limit: 1_000_000,
                    ..ListFilter::default()
                })
                .await
                .unwrap();
            let mut seen = BTreeMap::new();
            for op in &ops {
                assert!(
                    seen.insert(op.entity_id.clone(), op.op_id.to_string())
                        .is_none(),
                    "run {run}: {} stored twice",
                    op.entity_id
                );
                assert!(
                    all_tried.contains(&op.entity_id),
                    "run {run}: unexpected op {op:?}"
                );
                let mut parts = op.entity_id.trim_start_matches('r').split(['-', 'w']);
                let r: u64 = parts.next().unwrap().parse().unwrap();
                assert_eq!(
                    op.payload["run"],
                    json!(r),
                    "run {run}: payload of {}",
                    op.entity_id
                );
            }
            for (id, op_id) in &all_confirmed {
                assert_eq!(
                    seen.get(id),
                    Some(op_id),
                    "run {run}: acknowledged op {id} lost"
                );
            }
            // Unconfirmed extras: at most the enqueues in progress at the kill.
            assert!(ops.len() - all_confirmed.len() <= 4 * (run + 1));
            let check = outbox.check().await.unwrap();
            assert!(check.ok && !check.reindexed, "run {run}: {check:?}");
            outbox.close().await;
        });
    }
    eprintln!(
        "{KILLS} kills, {total_confirmed} acknowledged ops, {} tried",
        all_tried.len()
    );
    assert!(
        total_confirmed > KILLS,
        "the child barely ran: {total_confirmed} ops"
    );
}
