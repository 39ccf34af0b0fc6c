//! Adversarial tests of the runner's graceful stop (`SyncEngine::run`'s
//! shutdown) on a real outbox file and the reference server on loopback.
//! The promise checked: an op that leaves the outbox had its `op_succeeded`
//! in the run that removed it, nothing is applied twice, the stop is
//! bounded, the lock is released, and a later runner drains the rest once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use guardian_server::{Faults, RunningServer, ServerBuilder};
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::engine::{
    BatchConfig, EngineError, OnceStop, RunReport, SyncEngine, SyncEngineBuilder, SyncEvent,
};
use guardian_sync::op::{NewOp, OpId};
use guardian_sync::outbox::{ListFilter, OutboxOptions};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::{
    Fetched, HttpTransport, HttpTransportConfig, OpRequest, Outcome, StaticToken, Transport,
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

const TOKEN: &str = "tok-a";
/// `STOP_GRACE` in engine/run.rs.
const GRACE: Duration = Duration::from_secs(2);
/// What a stop may take beyond its bound on a busy 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);
/// The outbox's default busy timeout (`OutboxOptions`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

type Stopped = (Result<RunReport, EngineError>, Option<Duration>);

async fn server(faults: Faults) -> RunningServer {
    let b = ServerBuilder::new().token("tenant-a", TOKEN).in_memory();
    b.faults(faults).bind("127.0.0.1:0").await.unwrap()
}

/// A gate that holds whoever passes while it is shut.
#[derive(Debug)]
struct Gate {
    shut: AtomicBool,
    permits: Semaphore,
}

impl Gate {
    fn new() -> Self {
        Self {
            shut: AtomicBool::new(false),
            permits: Semaphore::new(0),
        }
    }
    fn shut(&self) {
        self.shut.store(true, Ordering::SeqCst);
    }
    fn open(&self) {
        self.shut.store(false, Ordering::SeqCst);
        self.permits.add_permits(1000);
    }
    /// Passes; `said` is announced first if the gate is shut.
    async fn pass(&self, seen: &mpsc::UnboundedSender<&'static str>, said: &'static str) {
        if self.shut.load(Ordering::SeqCst) {
            let _ = seen.send(said);
            self.permits.acquire().await.unwrap().forget();
        }
    }
}

/// The HTTP transport with probes: answers are counted (a watch that stops
/// wait on); sends, answers and fetches can be held at gates. `seen` says
/// "send" at a shut send gate, "answer" when an answer is in hand, "fetch"
/// at a shut fetch gate.
#[derive(Debug)]
struct Probe {
    inner: HttpTransport,
    answered: watch::Sender<usize>,
    started: AtomicUsize,
    fetches: AtomicUsize,
    sends: Gate,
    answers: Gate,
    fetch_gate: Gate,
    seen: mpsc::UnboundedSender<&'static str>,
}

impl Probe {
    fn new(url: String, token: &str) -> (Arc<Self>, mpsc::UnboundedReceiver<&'static str>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let tokens = Arc::new(StaticToken::new(token));
        let probe = Self {
            inner: HttpTransport::new(&HttpTransportConfig::new(url), tokens).unwrap(),
            answered: watch::Sender::new(0),
            started: AtomicUsize::new(0),
            fetches: AtomicUsize::new(0),
            sends: Gate::new(),
            answers: Gate::new(),
            fetch_gate: Gate::new(),
            seen,
        };
        (Arc::new(probe), rx)
    }

    async fn around<T>(&self, request: impl std::future::Future<Output = T>) -> T {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.sends.pass(&self.seen, "send").await;
        let outcome = request.await;
        let _ = self.seen.send("answer");
        self.answers.pass(&self.seen, "held").await;
        self.answered.send_modify(|n| *n += 1);
        outcome
    }
}

impl Transport for Probe {
    fn send<'a>(&'a self, op: &'a OpRequest) -> BoxFuture<'a, Outcome> {
        Box::pin(self.around(self.inner.send(op)))
    }
    fn send_batch<'a>(&'a self, ops: &'a [OpRequest]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.around(self.inner.send_batch(ops)))
    }
    fn native_batch(&self) -> bool {
        self.inner.native_batch()
    }
    fn batch_dependencies(&self) -> bool {
        self.inner.batch_dependencies()
    }
    fn send_transaction<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [OpRequest],
    ) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.around(self.inner.send_transaction(key, ops)))
    }
    fn fetch<'a>(&'a self, ty: &'a str, id: &'a str) -> BoxFuture<'a, Result<Fetched, Outcome>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.fetch_gate.pass(&self.seen, "fetch").await;
            self.inner.fetch(ty, id).await
        })
    }
}

/// One test's world: a server, a directory for the outbox, and the probe
/// the engines send through, with its announcements.
struct Rig {
    server: RunningServer,
    dir: tempfile::TempDir,
    probe: Arc<Probe>,
    seen: mpsc::UnboundedReceiver<&'static str>,
}

async fn rig(faults: Faults, token: &str) -> Rig {
    let server = server(faults).await;
    let (probe, seen) = Probe::new(server.url(), token);
    Rig {
        server,
        dir: tempfile::tempdir().unwrap(),
        probe,
        seen,
    }
}

fn builder(dir: &tempfile::TempDir, probe: &Arc<Probe>, owner: &str) -> SyncEngineBuilder {
    let retry = RetryPolicy::new(
        Duration::from_millis(5),
        2.0,
        Duration::from_millis(50),
        20,
        Duration::from_secs(10),
    );
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .transport(probe.clone())
        .retry(retry.unwrap())
        .owner_id(owner)
}

/// An engine for a stop that must come after the drain has its answer:
/// one request in flight runs inside the drain's task, so the answer the
/// probe reports is in the drain's hands before the stop. A request on one
/// of the drain's workers (at higher concurrency) may still be returning
/// it, and a stop drops it.
async fn answered_in_the_drain(dir: &tempfile::TempDir, probe: &Arc<Probe>) -> SyncEngine {
    builder(dir, probe, "runner-a")
        .concurrency(1)
        .build()
        .await
        .unwrap()
}

async fn enqueue_devices(engine: &SyncEngine, n: usize) -> Vec<OpId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let op = NewOp::create("device", format!("d{i}"), json!({"i": i}));
        ids.push(engine.enqueue(op).await.unwrap().op_id);
    }
    ids
}

/// Every event so far; a lagged receiver would hide events, so it fails.
fn collect(rx: &mut broadcast::Receiver<SyncEvent>) -> Vec<SyncEvent> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(e) => out.push(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => panic!("missed {n} events"),
            Err(_) => return out,
        }
    }
}

/// `op_succeeded` count per op.
fn succeeded(events: &[SyncEvent]) -> HashMap<OpId, usize> {
    let mut out = HashMap::new();
    for e in events {
        if let SyncEvent::OpSucceeded { op_id, .. } = e {
            *out.entry(*op_id).or_insert(0) += 1;
        }
    }
    out
}

fn settled(events: &[SyncEvent]) -> usize {
    let settles = |e: &&SyncEvent| {
        matches!(
            e,
            SyncEvent::TransactionCommitted { .. } | SyncEvent::TransactionFailed { .. }
        )
    };
    events.iter().filter(settles).count()
}

async fn in_outbox(engine: &SyncEngine) -> HashSet<OpId> {
    let filter = ListFilter {
        state: None,
        limit: 100_000,
        after_seq: 0,
    };
    let ops = engine.outbox().list(filter).await.unwrap();
    ops.into_iter().map(|op| op.op_id).collect()
}

/// The lock row's owner as another process sees it (empty: released).
fn lock_owner(dir: &tempfile::TempDir) -> String {
    let conn = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row("SELECT owner FROM lock WHERE id = 1", [], |r| r.get(0))
        .unwrap_or_default()
}

/// Another process holds the outbox's write lock for `hold` (a long
/// transaction); returns once it is taken.
fn hold_write_lock(dir: &tempfile::TempDir, hold: Duration) -> std::thread::JoinHandle<()> {
    let path = dir.path().join("outbox.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(hold);
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    peer
}

/// One run: every op that left the outbox during it had exactly one
/// `op_succeeded` in it, and no op still there (or gone before) had one.
fn check_run(what: &str, before: &HashSet<OpId>, after: &HashSet<OpId>, events: &[SyncEvent]) {
    let ok = succeeded(events);
    for op in before.difference(after) {
        let n = ok.get(op).copied().unwrap_or(0);
        assert_eq!(
            n, 1,
            "{what}: op {op} left the outbox with {n} op_succeeded in that run"
        );
    }
    for (op, n) in &ok {
        assert!(
            !after.contains(op),
            "{what}: op {op} had {n} op_succeeded but is still in the outbox"
        );
        assert!(
            before.contains(op),
            "{what}: op_succeeded for op {op}, gone before the run"
        );
    }
}

/// The server applied each key once, `expected` in all.
async fn assert_applied_once(server: &RunningServer, expected: usize, what: &str) {
    let log = server.applied_log().await.unwrap();
    let mut keys = HashSet::new();
    for m in &log {
        assert!(
            keys.insert(m.idempotency_key.clone()),
            "{what}: key applied twice: {m:?}"
        );
    }
    assert_eq!(log.len(), expected, "{what}: applied count");
}

/// Runs `engine` until `stop` fires; how long the runner took to return
/// after it fired (None: it returned before).
async fn run_stopped(
    engine: &SyncEngine,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Stopped {
    let fired: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mark = fired.clone();
    let run = engine.run(async move {
        stop.await;
        *mark.lock().unwrap() = Some(Instant::now());
    });
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the runner did not stop within 30 s");
    let took = fired.lock().unwrap().map(|at| at.elapsed());
    (result, took)
}

/// A runner on its own task, stopped when the sender fires.
fn spawn_run(engine: &SyncEngine) -> (oneshot::Sender<()>, JoinHandle<Stopped>) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let engine = engine.clone();
    let stop = async { stop_rx.await.unwrap() };
    (
        stop_tx,
        tokio::spawn(async move { run_stopped(&engine, stop).await }),
    )
}

/// Asserts the run ended within `bound` of its stop and released the lock.
fn assert_stopped(dir: &tempfile::TempDir, took: Option<Duration>, bound: Duration, what: &str) {
    let took = took.expect("the run returned before its stop");
    assert!(
        took < bound,
        "{what}: the stop took {took:?}, bound {bound:?}"
    );
    assert_eq!(lock_owner(dir), "", "{what}: the lock was not released");
}

/// The final runner: drains what is left, bounded.
async fn drain_rest(engine: &SyncEngine) -> RunReport {
    tokio::time::timeout(Duration::from_secs(30), engine.run_until_empty())
        .await
        .expect("the next runner did not drain within 30 s")
        .unwrap()
}

/// A fresh engine (good token, closed breaker) drains the `n` ops left,
/// each once with its event.
async fn restart_drains(dir: &tempfile::TempDir, server: &RunningServer, n: usize) {
    let (probe, _seen) = Probe::new(server.url(), TOKEN);
    let engine = builder(dir, &probe, "runner-next").build().await.unwrap();
    let mut events = engine.events();
    drain_rest(&engine).await;
    assert_eq!(
        succeeded(&collect(&mut events)).len(),
        n,
        "events after the restart"
    );
    assert_applied_once(server, n, "after the restart").await;
}

/// A cheap deterministic generator (the seed is in every message).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// One run of `engine` stopped when `trigger` completes, checked on its
/// own (bounded stop, lock released, events match what left the outbox,
/// at most `on_wire` ops left in flight). True if it cut a drain: some
/// ops left the outbox and some stayed.
async fn stop_cycle(
    engine: &SyncEngine,
    dir: &tempfile::TempDir,
    events: &mut broadcast::Receiver<SyncEvent>,
    what: String,
    on_wire: usize,
    trigger: impl std::future::Future<Output = ()> + Send + 'static,
) -> bool {
    let before = in_outbox(engine).await;
    let (result, took) = run_stopped(engine, trigger).await;
    result.unwrap_or_else(|e| panic!("{what}: the run failed: {e}"));
    assert_stopped(dir, took, GRACE + MARGIN, &what);
    let after = in_outbox(engine).await;
    check_run(&what, &before, &after, &collect(events));
    // Only ops of abandoned requests stay in flight; those claimed ahead
    // were released.
    let in_flight = engine.outbox().stats().await.unwrap().in_flight as usize;
    assert!(
        in_flight <= on_wire,
        "{what}: {in_flight} ops left in flight, more than {on_wire}"
    );
    !after.is_empty() && after.len() < before.len()
}

/// Stops at random points (after k answers, then a few yields, or while
/// idle) of a drain of 200 ops (chains of one entity, 5% of responses lost
/// after commit so replays happen), three stops per round, concurrency
/// 1..16, with and without batching; then a runner drains the rest. Each
/// run is checked on its own, each stop is bounded and releases the lock,
/// only abandoned requests' ops stay in flight, each op is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_stops_lose_nothing_and_apply_each_op_once() {
    let configs = [
        (1, None),
        (4, None),
        (16, None),
        (1, Some(10)),
        (4, Some(25)),
        (16, Some(7)),
    ];
    for (round, (concurrency, batch)) in configs.into_iter().cycle().take(12).enumerate() {
        let seed = 0x5eed_0000 + round as u64;
        let mut rng = Lcg(seed);
        let what =
            format!("round {round} (seed {seed:#x}, concurrency {concurrency}, batch {batch:?})");
        let faults = Faults {
            drop_after_commit_rate: 0.05,
            latency_ms: 1,
            seed: Some(seed),
            ..Faults::default()
        };
        let Rig {
            server,
            dir,
            probe,
            seen: _,
        } = rig(faults, TOKEN).await;
        let b = builder(&dir, &probe, "runner-a")
            .outbox_options(OutboxOptions::default().coalesce(false))
            .concurrency(concurrency);
        let b = match batch {
            Some(max_ops) => b.batching(BatchConfig {
                max_ops,
                ..BatchConfig::default()
            }),
            None => b.no_batching(),
        };
        let engine = b.build().await.unwrap();
        let mut total = 0;
        for i in 0..80 {
            for n in 0..=(i % 4) {
                let op = if n == 0 {
                    NewOp::create("device", format!("d{i}"), json!({"n": 0}))
                } else {
                    NewOp::update("device", format!("d{i}"), json!({"n": n}))
                };
                engine.enqueue(op).await.unwrap();
                total += 1;
            }
        }
        let mut events = engine.events();
        // Stops that cut a drain: some ops out, some left.
        let mut cuts = 0;
        let on_wire = batch.map_or(concurrency, |max_ops| concurrency.min(4) * max_ops);
        for cycle in 0..3 {
            let mut answered = probe.answered.subscribe();
            let k = *answered.borrow() + rng.below(if batch.is_some() { 6 } else { 60 }) as usize;
            let yields = rng.below(50);
            let idle_after = Duration::from_millis(300 + rng.below(300));
            let trigger = async move {
                let _ = tokio::time::timeout(idle_after, answered.wait_for(|n| *n >= k)).await;
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
            };
            let what = format!("{what}, stop {cycle}");
            cuts +=
                usize::from(stop_cycle(&engine, &dir, &mut events, what, on_wire, trigger).await);
        }
        if cuts == 0 && !in_outbox(&engine).await.is_empty() {
            // On a loaded machine all three points can fall before the
            // drain has an answer in hand (the probe counts answers before
            // they reach it). A stop once an ack was published cuts the
            // drain, as ops remain: the others stay queued.
            let mut published = engine.events();
            let trigger = async move {
                while !matches!(
                    published.recv().await,
                    Ok(SyncEvent::OpSucceeded { .. }) | Err(_)
                ) {}
            };
            let what = format!("{what}, stop after an ack");
            cuts +=
                usize::from(stop_cycle(&engine, &dir, &mut events, what, on_wire, trigger).await);
        }
        assert!(cuts > 0, "{what}: no stop landed inside a drain");
        let before = in_outbox(&engine).await;
        drain_rest(&engine).await;
        let after = in_outbox(&engine).await;
        assert!(
            after.is_empty(),
            "{what}: ops left after the final run: {after:?}"
        );
        check_run(
            &format!("{what}, final run"),
            &before,
            &after,
            &collect(&mut events),
        );
        assert_applied_once(&server, total, &what).await;
        engine.outbox().close().await;
    }
}

/// What a stop did while another connection held the outbox's write lock
/// from before the answer came back until `hold` later.
struct HeldStop {
    took: Duration,
    acked: bool,
    events: usize,
}

async fn stop_while_write_lock_held(hold: Duration) -> HeldStop {
    let Rig {
        server,
        dir,
        probe,
        mut seen,
    } = rig(Faults::default(), TOKEN).await;
    probe.sends.shut();
    let engine = answered_in_the_drain(&dir, &probe).await;
    let op = enqueue_devices(&engine, 1).await[0];
    let mut events = engine.events();
    let (stop, runner) = spawn_run(&engine);
    assert_eq!(seen.recv().await, Some("send"));
    let peer = hold_write_lock(&dir, hold);
    probe.sends.open();
    assert_eq!(seen.recv().await, Some("answer"));
    stop.send(()).unwrap();
    let (result, took) = runner.await.unwrap();
    result.unwrap();
    peer.join().unwrap();
    let held = HeldStop {
        took: took.unwrap(),
        acked: engine.outbox().get(op).await.unwrap().is_none(),
        events: succeeded(&collect(&mut events))
            .get(&op)
            .copied()
            .unwrap_or(0),
    };
    assert_eq!(lock_owner(&dir), "", "the lock was not released");
    // The next runner drains what is left, exactly once.
    drain_rest(&engine).await;
    assert!(in_outbox(&engine).await.is_empty());
    assert_applied_once(&server, 1, "after the next runner").await;
    held
}

/// The write lock is held a moment, well inside the grace, while the answer
/// comes back and the app stops: the ack is written and its event published
/// before the runner returns. (Dropping the drain at once, as the runner
/// did before the graceful stop, acked the op with no event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_an_ack_waits_for_the_outbox_publishes_its_event() {
    let held = stop_while_write_lock_held(Duration::from_millis(300)).await;
    assert!(held.acked, "the op answered before the stop was not acked");
    assert_eq!(held.events, 1, "op_succeeded of the acked op");
}

/// The write lock is held 1.5 s past the grace (less than the 5 s busy
/// timeout): the drain is aborted, and the ack it had handed to the
/// outbox's writer thread must not commit afterwards without its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_past_the_grace_never_acks_an_op_without_its_event() {
    let held = stop_while_write_lock_held(GRACE + Duration::from_millis(1500)).await;
    assert!(
        !held.acked || held.events == 1,
        "the op left the outbox after the stop with {} op_succeeded event(s) \
         (the drain was aborted after STOP_GRACE, but its queued ack still committed)",
        held.events
    );
}

/// Same scenario, for the bound: the runner returns within the grace, plus
/// what releasing the lock waits for the other connection (at most the
/// outbox's busy timeout), plus a margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_past_the_grace_returns_within_the_grace_and_the_busy_timeout() {
    let held = stop_while_write_lock_held(GRACE + Duration::from_millis(1500)).await;
    assert!(
        held.took < GRACE + BUSY_TIMEOUT + MARGIN,
        "the stop took {:?} (STOP_GRACE is {GRACE:?}, the busy timeout {BUSY_TIMEOUT:?})",
        held.took
    );
}

/// An engine with `n` ops queued, on an outbox whose write lock another
/// connection (another process mid-write, or frozen) holds for 4 s.
async fn busy_outbox(n: usize) -> (Rig, SyncEngine, std::thread::JoinHandle<()>) {
    let rig = rig(Faults::default(), TOKEN).await;
    let engine = builder(&rig.dir, &rig.probe, "runner-a")
        .build()
        .await
        .unwrap();
    enqueue_devices(&engine, n).await;
    let peer = hold_write_lock(&rig.dir, Duration::from_secs(4));
    (rig, engine, peer)
}

/// Once the busy peer lets go: no lock was left taken, and the next runner
/// applies the `n` ops once.
async fn after_busy(rig: &Rig, engine: &SyncEngine, peer: std::thread::JoinHandle<()>, n: usize) {
    peer.join().unwrap();
    assert_eq!(lock_owner(&rig.dir), "", "a lock was left taken");
    drain_rest(engine).await;
    assert_applied_once(&rig.server, n, "after the busy outbox").await;
}

/// A runner trying for the lock on a busy outbox is stopped while it
/// waits: its attempt is withdrawn, so it returns at once, having taken no
/// lock and left none behind. Before, it waited out the other connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_trying_for_the_lock_on_a_busy_outbox_is_prompt() {
    let (rig, engine, peer) = busy_outbox(1).await;
    // A stop at a point in time, not on a condition: whether the attempt
    // has begun to wait by then or not, the stop must be prompt. Measured
    // from the start: a stop future polled late would fire late.
    let stop_at = Duration::from_millis(300);
    let started = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        engine.run(tokio::time::sleep(stop_at)),
    )
    .await
    .expect("the runner did not stop within 30 s")
    .unwrap();
    let took = started.elapsed();
    assert!(
        took < stop_at + MARGIN,
        "stopped at {stop_at:?}, returned at {took:?}, while the outbox was busy"
    );
    assert_eq!(report.acquisitions, 0, "{report:?}");
    after_busy(&rig, &engine, peer, 1).await;
}

/// A pass with no wait budget on a busy outbox ends after its attempt's
/// least wait (1 s), not after the busy timeout three times over (the
/// attempt, then the report's two reads), and says that the lock is held
/// and how many ops wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_on_a_busy_outbox_ends_within_its_budget() {
    let (rig, engine, peer) = busy_outbox(2).await;
    let started = Instant::now();
    let once = tokio::time::timeout(Duration::from_secs(30), engine.run_once(Duration::ZERO))
        .await
        .expect("the pass did not end within 30 s")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(once.stop, OnceStop::LockHeld, "{once:?}");
    assert_eq!(once.remaining, 2, "{once:?}");
    assert_eq!(once.run.acquisitions, 0, "{once:?}");
    assert!(
        took < Duration::from_secs(1) + MARGIN,
        "the pass took {took:?} on a busy outbox"
    );
    after_busy(&rig, &engine, peer, 2).await;
}

/// A transaction whose answer (committed at the server) is held when the
/// app stops: dropped, its ops stay, and the next runner replays it, with
/// one `transaction_committed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_transaction_on_the_wire_replays_it_once() {
    let Rig {
        server,
        dir,
        probe,
        mut seen,
    } = rig(Faults::default(), TOKEN).await;
    probe.answers.shut();
    let engine = builder(&dir, &probe, "runner-a").build().await.unwrap();
    let ops = vec![
        NewOp::create("device", "lamp", json!({"on": true})),
        NewOp::create("scene", "evening", json!({"lamp": true})),
        NewOp::update("device", "lamp", json!({"on": false})),
    ];
    engine.transaction(ops).await.unwrap();
    let mut events = engine.events();
    let (result, took) = run_stopped(&engine, async move {
        assert_eq!(seen.recv().await, Some("answer"));
    })
    .await;
    result.unwrap();
    assert_stopped(&dir, took, MARGIN, "nothing to write");
    let first = collect(&mut events);
    assert_eq!(
        settled(&first),
        0,
        "a dropped answer was reported: {first:?}"
    );
    assert_eq!(
        in_outbox(&engine).await.len(),
        3,
        "the transaction's ops stay"
    );
    probe.answers.open();
    drain_rest(&engine).await;
    let second = collect(&mut events);
    assert!(
        second
            .iter()
            .any(|e| matches!(e, SyncEvent::TransactionCommitted { replayed: true, .. })),
        "{second:?}"
    );
    assert_eq!(settled(&second), 1, "{second:?}");
    assert_eq!(succeeded(&second).len(), 3, "{second:?}");
    assert!(in_outbox(&engine).await.is_empty());
    assert_applied_once(&server, 3, "transaction").await;
}

/// A transaction creating one entity twice is refused (409, exists) without
/// `current` (what it shows never committed), so the drain fetches; the app
/// stops while the fetch is held. The stop must not wait for it; the next
/// runner settles the transaction once (failed after its
/// reconciliations), applying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_conflict_fetch_returns_at_once_and_settles_later() {
    let Rig {
        server,
        dir,
        probe,
        mut seen,
    } = rig(Faults::default(), TOKEN).await;
    probe.fetch_gate.shut();
    let engine = builder(&dir, &probe, "runner-a").build().await.unwrap();
    let ops = vec![
        NewOp::create("scene", "s1", json!({"a": 1})),
        NewOp::create("scene", "s1", json!({"a": 2})),
    ];
    engine.transaction(ops).await.unwrap();
    let mut events = engine.events();
    let (result, took) = run_stopped(&engine, async move {
        assert_eq!(seen.recv().await, Some("answer"));
        assert_eq!(
            seen.recv().await,
            Some("fetch"),
            "the conflict was not fetched"
        );
    })
    .await;
    result.unwrap();
    assert_stopped(&dir, took, MARGIN, "the stop waited for the fetch");
    assert_eq!(settled(&collect(&mut events)), 0);
    assert_eq!(in_outbox(&engine).await.len(), 2);
    probe.fetch_gate.open();
    let mut settles = engine.events();
    let until_settled = async move {
        while !matches!(
            settles.recv().await,
            Ok(SyncEvent::TransactionCommitted { .. } | SyncEvent::TransactionFailed { .. })
        ) {}
    };
    run_stopped(&engine, until_settled).await.0.unwrap();
    assert_eq!(settled(&collect(&mut events)), 1);
    assert!(
        probe.fetches.load(Ordering::SeqCst) >= 2,
        "fetched again after the restart"
    );
    assert_applied_once(&server, 0, "a refused transaction").await;
}

/// Sending paused, by an open breaker (every request 503, long cooldown)
/// or a refused token: the drain is idle, a stop returns at once with every
/// op pending (none in flight once the answers are in), and a fresh engine
/// drains them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_sending_is_paused_leaves_ops_pending() {
    for breaker_open in [true, false] {
        let what = if breaker_open {
            "breaker open"
        } else {
            "auth paused"
        };
        let failing = Faults {
            failure_rate: if breaker_open { 1.0 } else { 0.0 },
            failure_statuses: vec![503],
            ..Faults::default()
        };
        let token = if breaker_open { TOKEN } else { "revoked" };
        let Rig {
            server, dir, probe, ..
        } = rig(failing, token).await;
        let breaker = BreakerConfig {
            policy: TripPolicy::Count { failures: 3 },
            cooldown: Duration::from_secs(600),
            ..BreakerConfig::default()
        };
        let b = builder(&dir, &probe, "runner-a")
            .no_batching()
            .concurrency(4);
        let engine = b.breaker(breaker).build().await.unwrap();
        enqueue_devices(&engine, 30).await;
        let mut paused = engine.events();
        let mut answered = probe.answered.subscribe();
        let counts = probe.clone();
        let (result, took) = run_stopped(&engine, async move {
            while !matches!(
                paused.recv().await,
                Ok(SyncEvent::Breaker { .. } | SyncEvent::AuthRequired)
            ) {}
            // Every request sent before sending paused has been answered.
            let all = |n: &usize| *n == counts.started.load(Ordering::SeqCst);
            let _ = answered.wait_for(all).await;
        })
        .await;
        result.unwrap();
        assert_stopped(&dir, took, MARGIN, what);
        // A request the machine had issued but the driver had not yet
        // polled is abandoned like any other: its op stays in flight.
        let stats = engine.outbox().stats().await.unwrap();
        assert_eq!(
            (stats.pending + stats.in_flight, stats.failed),
            (30, 0),
            "{what}: {stats:?}"
        );
        assert!(
            stats.in_flight <= 4,
            "{what}: more in flight than sent: {stats:?}"
        );
        engine.outbox().close().await;
        server.set_faults(Faults::default()).unwrap();
        restart_drains(&dir, &server, 30).await;
    }
}

/// A runner stopped while it waits for the lock another runner holds
/// returns at once, takes nothing, and the holder keeps draining; a stop
/// while idle is prompt; shutdowns already complete at start, twice in a
/// row with ops queued, lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_before_the_lock_at_start_and_while_idle_are_prompt() {
    let Rig {
        server,
        dir,
        probe,
        seen: _,
    } = rig(Faults::default(), TOKEN).await;
    let a = builder(&dir, &probe, "runner-a").build().await.unwrap();
    let b = builder(&dir, &probe, "runner-b").build().await.unwrap();
    let mut a_events = a.events();
    let (stop_a, runner_a) = spawn_run(&a);
    while !matches!(a_events.recv().await, Ok(SyncEvent::LockAcquired { .. })) {}
    let mut b_events = b.events();
    let (result, took) = run_stopped(&b, tokio::task::yield_now()).await;
    let report = result.unwrap();
    assert!(took.unwrap() < MARGIN, "{took:?}");
    assert_eq!(report.acquisitions, 0, "{report:?}");
    assert_eq!(collect(&mut b_events), vec![]);
    assert_eq!(lock_owner(&dir), "runner-a");
    // The holder is untouched and drains a new op.
    let op = enqueue_devices(&a, 1).await[0];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), a_events.recv()).await {
            Ok(Ok(SyncEvent::OpSucceeded { op_id, .. })) if op_id == op => break,
            Ok(Ok(_)) => {}
            other => panic!("the holder did not drain after the other's stop: {other:?}"),
        }
    }
    stop_a.send(()).unwrap();
    let (result, took) = runner_a.await.unwrap();
    result.unwrap();
    assert_stopped(&dir, took, MARGIN, "idle stop");
    for i in 0..50 {
        let op = NewOp::create("device", format!("e{i}"), json!({"i": i}));
        a.enqueue(op).await.unwrap();
    }
    for round in 0..2 {
        let what = format!("ready stop {round}");
        let before = in_outbox(&a).await;
        let (result, took) = run_stopped(&a, std::future::ready(())).await;
        result.unwrap();
        assert_stopped(&dir, took, MARGIN, &what);
        check_run(
            &what,
            &before,
            &in_outbox(&a).await,
            &collect(&mut a_events),
        );
    }
    let before = in_outbox(&a).await;
    drain_rest(&a).await;
    check_run(
        "final",
        &before,
        &in_outbox(&a).await,
        &collect(&mut a_events),
    );
    assert_applied_once(&server, 51, "after the stops").await;
}

/// Another process takes the lock over (a peer connection rewrites the row
/// in a transaction) while the answer is in hand and the ack waits for the
/// write lock; then the app stops. The fence refuses the ack, so the op
/// stays with no event; the stopped runner must not touch the new owner's
/// row and must return within the grace; a later runner (which finds the
/// thief's process gone) drains the op once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_lost_during_the_stop_writes_nothing_and_is_bounded() {
    let Rig {
        server,
        dir,
        probe,
        mut seen,
    } = rig(Faults::default(), TOKEN).await;
    probe.sends.shut();
    let engine = answered_in_the_drain(&dir, &probe).await;
    let op = enqueue_devices(&engine, 1).await[0];
    let mut events = engine.events();
    let (stop, runner) = spawn_run(&engine);
    assert_eq!(seen.recv().await, Some("send"));
    let peer = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    let takeover =
        "BEGIN IMMEDIATE; UPDATE lock SET owner = 'thief', epoch = epoch + 1, heartbeat = 0;";
    peer.execute_batch(takeover).unwrap();
    probe.sends.open();
    assert_eq!(seen.recv().await, Some("answer"));
    stop.send(()).unwrap();
    peer.execute_batch("COMMIT").unwrap();
    let (result, took) = runner.await.unwrap();
    let took = took.unwrap();
    assert!(took < GRACE + MARGIN, "the stop took {took:?}");
    assert!(
        matches!(result, Ok(_) | Err(EngineError::LockLost)),
        "{result:?}"
    );
    assert_eq!(
        lock_owner(&dir),
        "thief",
        "the stopped runner rewrote the new owner's row"
    );
    let stored = engine.outbox().get(op).await.unwrap();
    let n = succeeded(&collect(&mut events))
        .get(&op)
        .copied()
        .unwrap_or(0);
    assert!(
        stored.is_some() && n == 0,
        "after losing the lock: stored {stored:?}, {n} op_succeeded"
    );
    let next = builder(&dir, &probe, "runner-c").build().await.unwrap();
    let mut next_events = next.events();
    let report = drain_rest(&next).await;
    assert_eq!(report.takeovers, 1, "{report:?}");
    let ok = collect(&mut next_events);
    assert_eq!(succeeded(&ok).get(&op), Some(&1), "{ok:?}");
    assert_applied_once(&server, 1, "after the takeover").await;
}
