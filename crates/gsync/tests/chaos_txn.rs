//! Atomic transactions under chaos (issue 20): `gsync run` child processes
//! SIGKILLed mid-drain while transactions are at the server (held by a
//! latency fault), just committed with their response dropped, or after some
//! committed; and a run whose server drops a share of its responses after
//! the commit. After every kill the server's applied log must show each
//! transaction whole or not at all; after the final drain every transaction
//! must be applied exactly once, whole, at consecutive cursors, and the six
//! invariants of DESIGN §11 must hold for every op, plain or in a transaction.
//!
//! `GSYNC_CHAOS_ITERATIONS` (default 12) sets the number of kills;
//! `GSYNC_CHAOS_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{check_invariants, iterations, seed, server, Planned, Runner, RunnerOpts, Workload};
use guardian_protocol::MutationKind;
use guardian_server::{AppliedMutation, Faults, RunningServer};
use guardian_sync::op::NewOp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

/// One transaction the test enqueued: its id and its ops (indexes into
/// [`Workload::ops`], in the transaction's order).
#[derive(Debug)]
struct Txn {
    id: Uuid,
    ops: Vec<usize>,
}

/// Transactions over their own entities (`tx-N`), interleaved with plain
/// updates of the same entities, on top of a [`Workload`] (which records
/// every op, so [`check_invariants`] covers them all).
struct TxnWorkload {
    work: Workload,
    txns: Vec<Txn>,
    live: Vec<String>,
    next: usize,
}

impl TxnWorkload {
    async fn open(path: &std::path::Path) -> Self {
        Self {
            work: Workload::open(path, "plain").await,
            txns: Vec::new(),
            live: Vec::new(),
            next: 0,
        }
    }

    /// A transaction of 2 to 5 ops on distinct entities: creates of new
    /// ones, updates and (rarely) deletes of live ones.
    async fn transaction(&mut self, rng: &mut StdRng) {
        let n = rng.random_range(2..=5);
        let t = self.txns.len();
        let mut ops = Vec::with_capacity(n);
        let mut planned: Vec<(String, MutationKind, Value)> = Vec::with_capacity(n);
        let mut free: Vec<String> = self.live.clone();
        for slot in 0..n {
            let data = json!({ "txn": t, "slot": slot });
            if free.is_empty() || rng.random_bool(0.3) {
                let id = format!("tx-{}", self.next);
                self.next += 1;
                ops.push(NewOp::create(common::TYPE, &id, data.clone()));
                planned.push((id.clone(), MutationKind::Create, data));
                self.live.push(id);
            } else {
                let id = free.swap_remove(rng.random_range(0..free.len()));
                if rng.random_bool(0.05) {
                    ops.push(NewOp::delete(common::TYPE, &id));
                    planned.push((id.clone(), MutationKind::Delete, Value::Null));
                    self.live.retain(|l| *l != id);
                } else {
                    ops.push(NewOp::update(common::TYPE, &id, data.clone()));
                    planned.push((id, MutationKind::Update, data));
                }
            }
        }
        let stored = self
            .work
            .outbox
            .enqueue_transaction(ops)
            .await
            .expect("enqueue a transaction");
        let mut indexes = Vec::with_capacity(n);
        for ((entity_id, kind, data), e) in planned.into_iter().zip(stored.ops) {
            assert!(
                e.coalesced.is_none(),
                "an op of a transaction was coalesced"
            );
            let index = self.work.ops.len();
            self.work.ops.push(Planned {
                index,
                op_id: e.op_id,
                key: e.idempotency_key,
                entity_id,
                kind,
                data,
            });
            indexes.push(index);
        }
        self.txns.push(Txn {
            id: stored.txn_id,
            ops: indexes,
        });
    }

    /// `txns` transactions, each followed by a plain update of one live
    /// entity with probability one half (it waits for the transaction's
    /// ops on that entity, and the next transaction on it waits for it).
    async fn round(&mut self, rng: &mut StdRng, txns: usize) {
        for _ in 0..txns {
            self.transaction(rng).await;
            if !self.live.is_empty() && rng.random_bool(0.5) {
                let id = self.live[rng.random_range(0..self.live.len())].clone();
                self.work.update(&id).await;
            }
        }
    }
}

/// The rows of the applied log under each transaction key, by cursor.
fn by_txn(log: &[AppliedMutation]) -> HashMap<&str, Vec<&AppliedMutation>> {
    let mut out: HashMap<&str, Vec<&AppliedMutation>> = HashMap::new();
    for m in log.iter().filter(|m| m.tenant == common::TENANT) {
        if let Some(t) = &m.transaction_key {
            out.entry(t.as_str()).or_default().push(m);
        }
    }
    for rows in out.values_mut() {
        rows.sort_by_key(|m| m.cursor);
    }
    out
}

/// All or nothing, at any moment: each transaction has no row in the log, or
/// one row per op, under the op's own key, in the transaction's order, at
/// consecutive cursors; no row names a transaction the test did not enqueue.
/// Returns how many transactions were applied.
fn assert_all_or_nothing(log: &[AppliedMutation], w: &TxnWorkload) -> usize {
    let mut rows = by_txn(log);
    let mut applied = 0;
    for t in &w.txns {
        let Some(got) = rows.remove(t.id.to_string().as_str()) else {
            continue;
        };
        let keys: Vec<&str> = got.iter().map(|m| m.idempotency_key.as_str()).collect();
        let want: Vec<String> = t
            .ops
            .iter()
            .map(|&i| w.work.ops[i].key.to_string())
            .collect();
        assert_eq!(
            keys, want,
            "transaction {} half-applied or applied twice: {got:?}",
            t.id
        );
        let first = got[0].cursor;
        for (n, m) in got.iter().enumerate() {
            assert_eq!(
                m.cursor,
                first + n as u64,
                "transaction {}: cursors not consecutive: {got:?}",
                t.id
            );
        }
        applied += 1;
    }
    assert!(rows.is_empty(), "rows of unknown transactions: {rows:?}");
    applied
}

/// After the final drain: every transaction applied whole, exactly once, and
/// every op outside a transaction applied outside one.
fn assert_every_transaction_whole(log: &[AppliedMutation], w: &TxnWorkload) {
    assert_eq!(assert_all_or_nothing(log, w), w.txns.len());
    let in_txn: HashMap<String, Uuid> = w
        .txns
        .iter()
        .flat_map(|t| t.ops.iter().map(|&i| (w.work.ops[i].key.to_string(), t.id)))
        .collect();
    for m in log.iter().filter(|m| m.tenant == common::TENANT) {
        assert_eq!(
            m.transaction_key,
            in_txn.get(&m.idempotency_key).map(Uuid::to_string),
            "op applied outside its transaction (or a plain op inside one): {m:?}"
        );
    }
}

fn run_args() -> Vec<String> {
    // Short backoff, so a transaction whose response was lost comes back
    // quickly; a breaker that never stops the drain for long.
    [
        "--retry-base",
        "20ms",
        "--retry-cap",
        "200ms",
        "--max-attempts",
        "1000",
        "--breaker-threshold",
        "1000",
        "--breaker-cooldown",
        "100ms",
    ]
    .map(String::from)
    .to_vec()
}

fn opts(rng: &mut StdRng) -> RunnerOpts {
    let mut o = RunnerOpts::stale("1s", "60s").args(run_args());
    // Plain ops go one by one or in batches; transactions always alone.
    o.batch = if rng.random_bool(0.3) { 4 } else { 0 };
    o.concurrency = rng.random_range(1..=4);
    o
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KillPoint {
    /// While a request is held at the server, before its commit; the
    /// server finishes it after the client died.
    InRequest,
    /// The server committed, the response was dropped, and the runner dies
    /// the moment the log grows.
    AfterCommit,
    /// After the runner reported 1 to 3 committed transactions.
    AfterCommitted,
}

/// Polls the applied log until it holds more than `before` rows (deadline
/// `timeout`); false at the deadline.
async fn log_grows(server: &RunningServer, before: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if server.applied_log().await.unwrap().len() > before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Waits until no request is being processed at the server (a request a
/// killed runner left there finishes on its own).
async fn quiet(server: &RunningServer) {
    let deadline = Instant::now() + LONG;
    while server.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "requests still in flight at the server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn final_drain(server: &RunningServer, w: &TxnWorkload, path: &std::path::Path) {
    let mut last = Runner::spawn(
        "final",
        path,
        &server.url(),
        &RunnerOpts::default().args(run_args()),
    );
    last.expect_success(LONG).await;
    let log = server.applied_log().await.unwrap();
    check_invariants(server, &w.work).await;
    assert_every_transaction_whole(&log, w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_whole_when_runners_are_killed() {
    let seed = seed("txn_sigkill");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = TxnWorkload::open(&path).await;
    let target = iterations(12);
    let mut kills: BTreeMap<KillPoint, usize> = BTreeMap::new();
    let mut finished_early = 0;
    let mut seen_applied = Vec::new();
    for i in 0..target {
        w.round(&mut rng, 6).await;
        let point = match i % 3 {
            0 => KillPoint::InRequest,
            1 => KillPoint::AfterCommit,
            _ => KillPoint::AfterCommitted,
        };
        server
            .set_faults(match point {
                KillPoint::InRequest => Faults {
                    latency_ms: 2_000,
                    ..Faults::default()
                },
                KillPoint::AfterCommit => Faults {
                    drop_after_commit_next: 1,
                    ..Faults::default()
                },
                KillPoint::AfterCommitted => Faults::default(),
            })
            .unwrap();
        let before = server.applied_log().await.unwrap().len();
        let mut r = Runner::spawn(&format!("tk{i}"), &path, &server.url(), &opts(&mut rng));
        match point {
            KillPoint::InRequest => {
                let _ = tokio::time::timeout(LONG, server.wait_in_flight(1)).await;
            }
            KillPoint::AfterCommit => {
                log_grows(&server, before, Duration::from_secs(10)).await;
            }
            KillPoint::AfterCommitted => {
                let n = rng.random_range(1..=3);
                r.wait_named("transaction_committed", n, LONG).await;
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
        // A request the dead runner left at the server finishes there.
        server.set_faults(Faults::default()).unwrap();
        quiet(&server).await;
        let log = server.applied_log().await.unwrap();
        seen_applied.push(assert_all_or_nothing(&log, &w));
    }
    final_drain(&server, &w, &path).await;
    let replays = common::metric(&server, "guardian_idempotent_replays_total");
    eprintln!(
        "{} transactions ({} ops in all, {} applied rows), {} kills {kills:?}, \
         {finished_early} runners finished first, transactions applied after each kill \
         {seen_applied:?}, {replays} replayed op responses",
        w.txns.len(),
        w.work.ops.len(),
        server.applied_log().await.unwrap().len(),
        kills.values().sum::<usize>(),
    );
    assert!(
        kills.values().sum::<usize>() * 10 >= target * 7,
        "too few kills landed: {kills:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_whole_when_responses_are_lost_after_commit() {
    let seed = seed("txn_drop_after_commit");
    let mut rng = StdRng::seed_from_u64(seed);
    let faults = Faults {
        drop_after_commit_rate: 0.3,
        seed: Some(seed),
        ..Faults::default()
    };
    let server = server(faults).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = TxnWorkload::open(&path).await;
    let rounds = iterations(12) / 3;
    let mut kills = 0;
    for i in 0..rounds {
        w.round(&mut rng, 10).await;
        // Killed as soon as something more was committed, whether or not
        // its response reached the runner.
        let before = server.applied_log().await.unwrap().len();
        let mut r = Runner::spawn(&format!("td{i}"), &path, &server.url(), &opts(&mut rng));
        log_grows(&server, before, LONG).await;
        if r.kill9().await.signal() == Some(9) {
            kills += 1;
        }
        common::assert_no_panic(&r.stderr());
        quiet(&server).await;
        assert_all_or_nothing(&server.applied_log().await.unwrap(), &w);
    }
    // The last runner drains with the faults still on: every lost response
    // is retried under the transaction's key and replayed whole.
    final_drain(&server, &w, &path).await;
    let replays = common::metric(&server, "guardian_idempotent_replays_total");
    let dropped = common::metric(&server, "guardian_dropped_connections_total");
    let sent = server.requests_on("/v1/transactions");
    eprintln!(
        "{} transactions ({} ops in all) in {sent} requests, {kills} kills, \
         {dropped} responses dropped after commit, {replays} replayed op responses",
        w.txns.len(),
        w.work.ops.len(),
    );
    // Each transaction was applied once (checked above), so every request
    // beyond one per transaction was a retry answered by a replay.
    assert!(dropped > 0, "the fault never fired");
    assert!(
        sent > w.txns.len() as u64,
        "no transaction was sent twice: {sent} requests"
    );
}
