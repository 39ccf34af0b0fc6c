//! Attacks on the outbox writer's three entry paths: a lone commit on a
//! tokio worker (`enqueue`), a lone commit on a blocking caller's thread
//! (`enqueue_blocking`) and the writer thread's group commit. Concurrent
//! close, refused ops, another connection holding the write lock, runtimes
//! with a single thread, handles dropped under waiting callers. Every wait
//! is bounded, so a hang fails the test instead of stalling it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guardian_sync::clock::{Clock, SystemClock};
use guardian_sync::op::{NewOp, OpId, PendingOp};
use guardian_sync::outbox::{
    EnqueueError, Enqueued, ListFilter, OpenError, Outbox, OutboxOptions, Synchronous,
    UnknownChange,
};
use serde_json::json;
use tokio::runtime::{Builder, Runtime};

/// Longest any step may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(20);
/// Longest a free tokio worker may take to run a new task.
const LIVE: Duration = Duration::from_secs(5);

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("outbox.db")
}

/// No fsync per commit: lone commits stay fast, so a lone async enqueue on
/// a runtime with several workers commits on its worker.
fn options() -> OutboxOptions {
    OutboxOptions::default().synchronous(Synchronous::Normal)
}

fn workers(n: usize) -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(n)
        .enable_all()
        .build()
        .unwrap()
}

fn one_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn open(rt: &Runtime, path: &Path, options: OutboxOptions) -> Outbox {
    rt.block_on(Outbox::open(path, options)).unwrap().0
}

/// A CREATE of an entity of its own, so nothing coalesces.
fn op(tag: &str) -> NewOp {
    NewOp::create("lamp", tag, json!({ "tag": tag }))
}

/// Every op in the file at `path`, read through a fresh open.
fn stored_ops(path: &Path) -> Vec<PendingOp> {
    one_thread().block_on(async {
        let (outbox, _) = Outbox::open(path, options()).await.unwrap();
        let all = outbox
            .list(ListFilter {
                state: None,
                limit: 1_000_000,
                after_seq: 0,
            })
            .await
            .unwrap();
        outbox.close().await;
        all
    })
}

fn stored(path: &Path) -> BTreeSet<OpId> {
    stored_ops(path).into_iter().map(|o| o.op_id).collect()
}

/// Asserts that `rt`'s workers run new tasks promptly, timed on this
/// (non-runtime) thread, so that blocked workers cannot also stop the timer.
fn workers_answer(rt: &Runtime) {
    for _ in 0..20 {
        let (tx, rx) = mpsc::channel();
        rt.spawn(async move { tx.send(()).unwrap() });
        rx.recv_timeout(LIVE)
            .expect("a tokio worker runs a new task while enqueues wait");
    }
}

/// Another connection (another process) holding the outbox's write lock
/// until told to let go.
struct ForeignLock {
    release: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl ForeignLock {
    fn take(path: &Path) -> Self {
        let path = path.to_owned();
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked_tx.send(()).unwrap();
            // Until released, or dropped by a failing test; bounded anyway.
            let _ = release_rx.recv_timeout(HANG * 2);
            conn.execute_batch("COMMIT").unwrap();
        });
        locked_rx.recv_timeout(HANG).unwrap();
        Self { release, thread }
    }

    fn release(self) {
        let _ = self.release.send(());
        self.thread.join().unwrap();
    }
}

/// A system clock that, once armed, holds its next reading (made by the
/// next job to run, on whichever thread runs it) until released.
#[derive(Debug, Default)]
struct GateClock {
    system: SystemClock,
    armed: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl GateClock {
    /// Returns (entered, release): a job reached the gate; let it go.
    fn arm(&self) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.armed.lock().unwrap() = Some((entered_tx, release_rx));
        (entered_rx, release_tx)
    }
}

impl Clock for GateClock {
    fn now_millis(&self) -> i64 {
        let gate = self.armed.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            let _ = entered.send(());
            let _ = release.recv_timeout(HANG);
        }
        self.system.now_millis()
    }

    fn monotonic(&self) -> Duration {
        self.system.monotonic()
    }
}

/// Ops acknowledged before the storm's outbox is closed.
const BEFORE_CLOSE: usize = 200;

/// What the storm's callers share.
#[derive(Default)]
struct Storm {
    acked: AtomicUsize,
    /// Set once a `close()` has returned.
    closed: AtomicBool,
    enough: Mutex<Option<mpsc::Sender<()>>>,
}

impl Storm {
    /// Books one call's result (the call started after a close returned if
    /// `after_close`); false once the outbox says closed.
    fn book(
        &self,
        after_close: bool,
        r: Result<Enqueued, EnqueueError>,
        ids: &mut Vec<OpId>,
    ) -> bool {
        match r {
            Ok(e) => {
                assert!(!after_close, "accepted after close() returned: {e:?}");
                ids.push(e.op_id);
                if self.acked.fetch_add(1, Ordering::SeqCst) + 1 == BEFORE_CLOSE {
                    if let Some(tx) = self.enough.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                true
            }
            Err(EnqueueError::Closed) => false,
            Err(other) => panic!("neither accepted nor closed: {other}"),
        }
    }
}

/// Most calls one storm caller makes (a bound in case closed never comes).
const MAX_CALLS: usize = 100_000;

fn storm_then_close(n_workers: usize) {
    const THREADS: usize = 4;
    const TASKS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(n_workers);
    let outbox = open(&rt, &path, options());
    let (enough_tx, enough_rx) = mpsc::channel();
    let storm = Arc::new(Storm {
        enough: Mutex::new(Some(enough_tx)),
        ..Storm::default()
    });
    let (done_tx, done_rx) = mpsc::channel::<Vec<OpId>>();
    for t in 0..THREADS {
        let (o, s, done) = (outbox.clone(), storm.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut ids = Vec::new();
            for k in 0..MAX_CALLS {
                let after_close = s.closed.load(Ordering::SeqCst);
                let r = o.enqueue_blocking(op(&format!("t{t}-{k}")));
                if !s.book(after_close, r, &mut ids) {
                    return done.send(ids).unwrap();
                }
            }
            panic!("never told closed");
        });
    }
    for a in 0..TASKS {
        let (o, s, done) = (outbox.clone(), storm.clone(), done_tx.clone());
        rt.spawn(async move {
            let mut ids = Vec::new();
            for k in 0..MAX_CALLS {
                let after_close = s.closed.load(Ordering::SeqCst);
                let r = o.enqueue(op(&format!("a{a}-{k}"))).await;
                if !s.book(after_close, r, &mut ids) {
                    return done.send(ids).unwrap();
                }
            }
            panic!("never told closed");
        });
    }
    drop(done_tx);
    enough_rx
        .recv_timeout(HANG)
        .expect("the storm gets ops acknowledged");
    // Two closers at once: one on a thread of its own, one on the runtime.
    let (closer, second) = (outbox.clone(), storm.clone());
    let (closed_tx, closed_rx) = mpsc::channel();
    std::thread::spawn(move || {
        one_thread().block_on(closer.close());
        second.closed.store(true, Ordering::SeqCst);
        closed_tx.send(()).unwrap();
    });
    let (o, first) = (outbox.clone(), storm.clone());
    rt.spawn(async move {
        o.close().await;
        first.closed.store(true, Ordering::SeqCst);
    });
    closed_rx.recv_timeout(HANG).expect("close() returns");
    let mut acked = BTreeSet::new();
    for _ in 0..THREADS + TASKS {
        let ids = done_rx
            .recv_timeout(HANG)
            .expect("every caller is answered closed");
        acked.extend(ids);
    }
    assert!(acked.len() >= BEFORE_CLOSE);
    drop(outbox);
    assert_eq!(stored(&path), acked, "exactly the acknowledged ops");
}

/// Blocking threads and async tasks enqueue until closed while two callers
/// close at once: every call returns Ok or Closed, none started after a
/// close returned is accepted, and the file holds exactly the ops acknowledged.
#[test]
fn a_close_during_a_storm_keeps_exactly_the_acknowledged_ops() {
    for n in [2, 4] {
        storm_then_close(n);
    }
}

/// Makes `dead` a failed op, so that ops depending on it are refused inside
/// the writer's transaction.
async fn failed_op(outbox: &Outbox) -> OpId {
    let dead = outbox.enqueue(op("dead")).await.unwrap().op_id;
    let fence = outbox
        .lock_acquire("adversary", None)
        .await
        .unwrap()
        .unwrap();
    let claimed = outbox
        .fenced(&fence)
        .claim_ready(10, i64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    outbox.fenced(&fence).fail(dead, "refused").await.unwrap();
    dead
}

/// The refusals tried on each path: one refused before the writer (too
/// large), one before the writer by its entity type, one by the writer
/// before it writes, and a transaction whose first op is written (with a
/// token) before its second is refused.
fn refusals(tag: &str, dead: OpId) -> (NewOp, NewOp, NewOp, Vec<NewOp>) {
    (
        NewOp::create(
            "lamp",
            format!("{tag}-big"),
            json!({ "pad": "x".repeat(100) }),
        ),
        NewOp::create("Lamp!", format!("{tag}-type"), json!({})),
        op(&format!("{tag}-dep")).with_dependency(dead),
        vec![
            op(&format!("{tag}-first")).with_txn_token(format!("tok-{tag}")),
            op(&format!("{tag}-second")).with_dependency(dead),
        ],
    )
}

fn assert_refused(results: [Result<(), EnqueueError>; 4], dead: OpId) {
    let [big, bad_type, dep, txn] = results;
    assert!(
        matches!(big, Err(EnqueueError::PayloadTooLarge { .. })),
        "{big:?}"
    );
    assert!(
        matches!(bad_type, Err(EnqueueError::Invalid(_))),
        "{bad_type:?}"
    );
    for r in [dep, txn] {
        assert_eq!(r, Err(EnqueueError::DependencyFailed { dependency: dead }));
    }
}

/// Tries every refusal with `enqueue`, each followed by a good op and a
/// good transaction; returns the ids stored.
async fn refuse_async(o: &Outbox, tag: &str, dead: OpId) -> Vec<OpId> {
    let (big, bad_type, dep, txn) = refusals(tag, dead);
    let mut ids = Vec::new();
    let mut results = Vec::new();
    for (i, bad) in [big, bad_type, dep].into_iter().enumerate() {
        results.push(o.enqueue(bad).await.map(drop));
        ids.push(o.enqueue(op(&format!("{tag}-ok{i}"))).await.unwrap().op_id);
    }
    results.push(o.enqueue_transaction(txn).await.map(drop));
    let good = vec![op(&format!("{tag}-t1")), op(&format!("{tag}-t2"))];
    let t = o.enqueue_transaction(good).await.unwrap();
    ids.extend(t.ops.iter().map(|e| e.op_id));
    assert_refused(results.try_into().unwrap(), dead);
    ids
}

/// [`refuse_async`] with `enqueue_blocking`.
fn refuse_blocking(o: &Outbox, tag: &str, dead: OpId) -> Vec<OpId> {
    let (big, bad_type, dep, txn) = refusals(tag, dead);
    let mut ids = Vec::new();
    let mut results = Vec::new();
    for (i, bad) in [big, bad_type, dep].into_iter().enumerate() {
        results.push(o.enqueue_blocking(bad).map(drop));
        ids.push(
            o.enqueue_blocking(op(&format!("{tag}-ok{i}")))
                .unwrap()
                .op_id,
        );
    }
    results.push(o.enqueue_transaction_blocking(txn).map(drop));
    let good = vec![op(&format!("{tag}-t1")), op(&format!("{tag}-t2"))];
    let t = o.enqueue_transaction_blocking(good).unwrap();
    ids.extend(t.ops.iter().map(|e| e.op_id));
    assert_refused(results.try_into().unwrap(), dead);
    ids
}

/// A refused op (too large, a bad entity type, a failed dependency, a
/// transaction refused after its first op was written) leaves no trace,
/// alone on each path and mixed into group commits, and the next op is accepted.
#[test]
fn refused_ops_leave_no_trace_on_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(2);
    let outbox = open(&rt, &path, options().max_payload_bytes(64));
    let dead = rt.block_on(failed_op(&outbox));
    let mut expected = BTreeSet::from([dead]);
    let mut tags = Vec::new();

    // Alone: on a worker, handed to the writer thread (a current-thread
    // runtime), on a blocking caller's thread.
    let o = outbox.clone();
    let on_worker = rt.spawn(async move { refuse_async(&o, "worker", dead).await });
    expected.extend(rt.block_on(on_worker).unwrap());
    expected.extend(one_thread().block_on(refuse_async(&outbox, "writer", dead)));
    let o = outbox.clone();
    expected.extend(
        std::thread::spawn(move || refuse_blocking(&o, "thread", dead))
            .join()
            .unwrap(),
    );
    tags.extend(["worker", "writer", "thread"].map(String::from));

    // Mixed: threads and tasks at once, so refusals share group commits.
    let (ids_tx, ids_rx) = mpsc::channel();
    for w in 0..3 {
        let (o, tx) = (outbox.clone(), ids_tx.clone());
        std::thread::spawn(move || {
            let ids: Vec<OpId> = (0..10)
                .flat_map(|k| refuse_blocking(&o, &format!("mt{w}-{k}"), dead))
                .collect();
            tx.send(ids).unwrap();
        });
        let (o, tx) = (outbox.clone(), ids_tx.clone());
        rt.spawn(async move {
            let mut ids = Vec::new();
            for k in 0..10 {
                ids.extend(refuse_async(&o, &format!("ma{w}-{k}"), dead).await);
            }
            tx.send(ids).unwrap();
        });
        for k in 0..10 {
            tags.push(format!("mt{w}-{k}"));
            tags.push(format!("ma{w}-{k}"));
        }
    }
    drop(ids_tx);
    for _ in 0..6 {
        expected.extend(ids_rx.recv_timeout(HANG).expect("every caller is answered"));
    }

    rt.block_on(async {
        for tag in &tags {
            let outcome = outbox.txn_outcome(&format!("tok-{tag}")).await.unwrap();
            assert_eq!(
                outcome, None,
                "the refused transaction's token of {tag} is gone"
            );
        }
        outbox.close().await;
    });
    assert_eq!(stored(&path), expected, "exactly the accepted ops");
}

/// With the write lock held by another connection, async enqueues on a
/// runtime with `n` workers leave every worker free, commit nothing while
/// the lock is held, and all commit once it is released.
fn enqueues_wait_out_a_foreign_lock(n: usize) {
    const CALLERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(n);
    // Far longer than the test: only the release lets the enqueues through.
    let outbox = open(&rt, &path, options().busy_timeout(HANG * 3));
    let lock = ForeignLock::take(&path);
    let (polled_tx, polled_rx) = mpsc::channel();
    let (result_tx, result_rx) = mpsc::channel();
    for i in 0..CALLERS {
        let (o, polled, result) = (outbox.clone(), polled_tx.clone(), result_tx.clone());
        rt.spawn(async move {
            let mut call = std::pin::pin!(o.enqueue(op(&format!("c{i}"))));
            // A lone commit on this worker would happen inside this poll.
            let first = futures::poll!(&mut call);
            polled.send(first.is_pending()).unwrap();
            result.send(call.await).unwrap();
        });
    }
    for _ in 0..CALLERS {
        let pending = polled_rx
            .recv_timeout(LIVE)
            .expect("an enqueue's first poll returns: no worker waits for the lock");
        assert!(pending, "nothing commits under another connection's lock");
    }
    workers_answer(&rt);
    assert!(
        result_rx.try_recv().is_err(),
        "nothing commits under another connection's lock"
    );
    lock.release();
    let ids: BTreeSet<OpId> = (0..CALLERS)
        .map(|_| {
            let r = result_rx
                .recv_timeout(HANG)
                .expect("answered after the release");
            r.unwrap().op_id
        })
        .collect();
    rt.block_on(outbox.close());
    assert_eq!(stored(&path), ids);
}

/// Another connection's write lock blocks no tokio worker: async enqueues
/// (2 and 4 workers) wait off the workers and commit after the release.
#[test]
fn a_foreign_write_lock_blocks_no_worker() {
    for n in [2, 4] {
        enqueues_wait_out_a_foreign_lock(n);
    }
}

/// A foreign write lock held past `busy_timeout` fails every path's enqueue
/// as busy (not "outcome unknown") within a bound, blocking no worker and
/// storing nothing, and the outbox works once the lock is released.
#[test]
fn a_write_lock_held_past_the_busy_timeout_fails_every_path_as_busy() {
    const BUSY: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(2);
    let outbox = open(&rt, &path, options().busy_timeout(BUSY));
    let lock = ForeignLock::take(&path);
    let (tx, rx) = mpsc::channel::<(String, Duration, Result<Enqueued, EnqueueError>)>();
    for i in 0..6 {
        let (o, tx) = (outbox.clone(), tx.clone());
        rt.spawn(async move {
            let tag = format!("task{i}");
            let started = Instant::now();
            let r = o.enqueue(op(&tag)).await;
            tx.send((tag, started.elapsed(), r)).unwrap();
        });
    }
    for i in 0..3 {
        let (o, tx) = (outbox.clone(), tx.clone());
        std::thread::spawn(move || {
            let tag = format!("thread{i}");
            let started = Instant::now();
            let r = o.enqueue_blocking(op(&tag));
            tx.send((tag, started.elapsed(), r)).unwrap();
        });
    }
    drop(tx);
    workers_answer(&rt);
    for _ in 0..9 {
        let (tag, took, r) = rx.recv_timeout(HANG).expect("every caller is answered");
        match r {
            Err(EnqueueError::Storage(e)) if e.is_busy() => {}
            other => panic!("{tag}: expected busy, got {other:?}"),
        }
        // At most a wait for the group before its own, and its own.
        assert!(took < BUSY * 10, "{tag} took {took:?}");
    }
    lock.release();
    let after = rt.block_on(outbox.enqueue(op("after"))).unwrap();
    rt.block_on(outbox.close());
    assert_eq!(stored(&path), BTreeSet::from([after.op_id]));
}

/// Opening an outbox whose write lock another connection holds past the
/// busy timeout fails as busy after one wait, not two (the WAL check and
/// the start-up each waited out the busy timeout), and stores nothing.
#[test]
fn an_open_under_a_foreign_write_lock_fails_as_busy_after_one_wait() {
    const BUSY: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(2);
    // Open, so the WAL has frames for the open below to check.
    let outbox = open(&rt, &path, options());
    let kept = rt.block_on(outbox.enqueue(op("kept"))).unwrap();
    let lock = ForeignLock::take(&path);
    let started = Instant::now();
    let second = rt.block_on(Outbox::open(&path, options().busy_timeout(BUSY)));
    let took = started.elapsed();
    match second {
        Err(OpenError::Storage(e)) if e.is_busy() => {}
        other => panic!("expected busy, got {:?}", other.map(|_| ())),
    }
    assert!(
        took < BUSY + BUSY / 2,
        "the open took {took:?} with a busy timeout of {BUSY:?}"
    );
    lock.release();
    rt.block_on(outbox.close());
    assert_eq!(stored(&path), BTreeSet::from([kept.op_id]));
}

/// An open timeout shorter than the busy timeout bounds only the open:
/// under a foreign write lock the open fails as busy after it, and the
/// opened outbox's own writes still wait out a foreign commit for the
/// whole busy timeout.
#[test]
fn an_open_timeout_bounds_the_open_and_not_later_writes() {
    const OPEN: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = workers(2);
    let first = open(&rt, &path, options());
    rt.block_on(first.close());
    let short = || options().busy_timeout(HANG).open_timeout(OPEN);

    let lock = ForeignLock::take(&path);
    let started = Instant::now();
    match rt.block_on(Outbox::open(&path, short())) {
        Err(OpenError::Storage(e)) if e.is_busy() => {}
        other => panic!("expected busy, got {:?}", other.map(|_| ())),
    }
    let took = started.elapsed();
    assert!(
        took < HANG / 2,
        "the open waited {took:?}, not its {OPEN:?}"
    );
    lock.release();

    let outbox = open(&rt, &path, short());
    let lock = ForeignLock::take(&path);
    let (o, (tx, rx)) = (outbox.clone(), mpsc::channel());
    rt.spawn(async move { tx.send(o.enqueue(op("after")).await).unwrap() });
    // Held well past the open timeout: the enqueue waits for it.
    std::thread::sleep(OPEN * 3);
    lock.release();
    let done = rx
        .recv_timeout(HANG)
        .unwrap()
        .expect("stored after the release");
    rt.block_on(outbox.close());
    assert_eq!(stored(&path), BTreeSet::from([done.op_id]));
}

/// Runs an async enqueue on `rt` (a runtime whose blocking would stall every
/// task) under another connection's write lock: its one thread keeps
/// running other tasks, and the enqueue commits after the release.
fn one_thread_stays_free(rt: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let outbox = open(&rt, &path, options().busy_timeout(HANG * 3));
    let lock = ForeignLock::take(&path);
    let (free_tx, free_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let o = outbox.clone();
    let driver = std::thread::spawn(move || {
        let result = rt.block_on(async move {
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let call = tokio::spawn(async move {
                started_tx.send(()).unwrap();
                o.enqueue(op("waits")).await
            });
            // The enqueue task has had its first poll.
            started_rx.await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { tx.send(()).unwrap() });
            rx.await.unwrap();
            assert!(!call.is_finished());
            free_tx.send(()).unwrap();
            call.await.unwrap()
        });
        done_tx.send(result).unwrap();
        rt
    });
    free_rx
        .recv_timeout(LIVE)
        .expect("the runtime's only thread runs another task while the enqueue waits");
    lock.release();
    let id = done_rx
        .recv_timeout(HANG)
        .expect("answered after the release")
        .unwrap()
        .op_id;
    let rt = driver.join().unwrap();
    rt.block_on(outbox.close());
    assert_eq!(stored(&path), BTreeSet::from([id]));
}

/// A current-thread runtime, and a multi-threaded one with one worker, are
/// never blocked by an enqueue, even while the database is locked.
#[test]
fn a_runtime_with_one_thread_is_never_blocked() {
    one_thread_stays_free(one_thread());
    one_thread_stays_free(workers(1));
}

/// Blocking callers (threads and `spawn_blocking`) queued behind one that
/// holds the connection are all answered Ok while every other handle is
/// dropped (async tasks' by a runtime shutdown mid-enqueue), and the file
/// holds their ops plus at most the cancelled tasks'.
#[test]
fn handles_dropped_under_waiting_blocking_callers() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let gate = Arc::new(GateClock::default());
    let rt = workers(2);
    let outbox = open(&rt, &path, options().clock(gate.clone()));
    type Answer = (String, Result<Enqueued, EnqueueError>);
    let (answer_tx, answer_rx) = mpsc::channel::<Answer>();
    let enqueue_blocking = {
        let (outbox, answer_tx) = (outbox.clone(), answer_tx.clone());
        move |tag: String| {
            let (o, tx) = (outbox.clone(), answer_tx.clone());
            move || {
                tx.send((tag.clone(), o.enqueue_blocking(op(&tag))))
                    .unwrap();
            }
        }
    };

    // Idle, so a lone blocking caller commits on its own thread; the gate
    // stops it inside its job, holding the connection.
    let (entered, release) = gate.arm();
    let mut threads = vec![std::thread::spawn(enqueue_blocking("holder".into()))];
    entered
        .recv_timeout(HANG)
        .expect("the lone caller runs its job");
    let mut callers = 1;
    for i in 0..3 {
        threads.push(std::thread::spawn(enqueue_blocking(format!("thread{i}"))));
        callers += 1;
    }
    let (started_tx, started_rx) = mpsc::channel();
    for i in 0..3 {
        let (call, started) = (enqueue_blocking(format!("pool{i}")), started_tx.clone());
        drop(rt.spawn_blocking(move || {
            started.send(()).unwrap();
            call();
        }));
        callers += 1;
    }
    for _ in 0..3 {
        // Started blocking tasks outlive the runtime's shutdown.
        started_rx.recv_timeout(HANG).unwrap();
    }
    let mut cancelled = BTreeSet::new();
    for i in 0..4 {
        let (o, tag) = (outbox.clone(), format!("task{i}"));
        cancelled.insert(tag.clone());
        rt.spawn(async move {
            let _ = o.enqueue(op(&tag)).await;
        });
    }
    drop(enqueue_blocking);
    drop(answer_tx);
    drop(outbox);
    rt.shutdown_background();
    release.send(()).unwrap();

    let mut acked = BTreeMap::new();
    for _ in 0..callers {
        let (tag, r) = answer_rx
            .recv_timeout(HANG)
            .expect("every waiting caller is answered");
        acked.insert(tag, r.unwrap().op_id);
    }
    for t in threads {
        t.join().unwrap();
    }
    let stored: BTreeMap<String, OpId> = stored_ops(&path)
        .into_iter()
        .map(|o| (o.entity_id, o.op_id))
        .collect();
    for (tag, id) in &acked {
        assert_eq!(stored.get(tag), Some(id), "{tag} was acknowledged");
    }
    for tag in stored.keys() {
        assert!(
            acked.contains_key(tag) || cancelled.contains(tag),
            "{tag} was never enqueued"
        );
    }
}

/// Set for the disk-limit test's child process: the outbox's path.
const FULL_DISK_CHILD: &str = "GUARDIAN_WRITER_ADVERSARIAL_FULL_DISK";

/// The child's side of the disk-limit test: runs under a file size limit
/// and writes each caller's answer to `<path>.results` as
/// `ok|unknown|refused <tag> <op id or error>`.
fn fill_the_disk(path: &Path) {
    let rt = workers(2);
    let outbox = open(&rt, path, options());
    let (tx, rx) = mpsc::channel::<(String, Result<Enqueued, EnqueueError>)>();
    for w in 0..3 {
        let (o, answers) = (outbox.clone(), tx.clone());
        std::thread::spawn(move || {
            for k in 0..150 {
                let tag = format!("t{w}-{k}");
                let r = o.enqueue_blocking(op(&tag));
                answers.send((tag, r)).unwrap();
            }
        });
        let (o, answers) = (outbox.clone(), tx.clone());
        rt.spawn(async move {
            for k in 0..150 {
                let tag = format!("a{w}-{k}");
                let r = o.enqueue(op(&tag)).await;
                answers.send((tag, r)).unwrap();
            }
        });
    }
    drop(tx);
    let mut answers: Vec<_> = (0..900)
        .map(|_| rx.recv_timeout(HANG).expect("every caller is answered"))
        .collect();

    // Room again.
    file_size_limit(None);
    let o = outbox.clone();
    let on_thread = std::thread::spawn(move || o.enqueue_blocking(op("after-thread")));
    answers.push(("after-thread".into(), on_thread.join().unwrap()));
    let o = outbox.clone();
    let on_worker = rt.spawn(async move { o.enqueue(op("after-worker")).await });
    answers.push(("after-worker".into(), rt.block_on(on_worker).unwrap()));
    let on_writer = one_thread().block_on(outbox.enqueue(op("after-writer")));
    answers.push(("after-writer".into(), on_writer));
    rt.block_on(outbox.close());

    let mut lines = String::new();
    for (tag, r) in answers {
        lines += &match r {
            Ok(e) => format!("ok {tag} {}\n", e.op_id),
            Err(EnqueueError::OutcomeUnknown { op_id, .. }) => format!("unknown {tag} {op_id}\n"),
            Err(EnqueueError::Storage(e)) => format!("refused {tag} {e}\n"),
            Err(other) => panic!("{tag}: {other:?}"),
        };
    }
    std::fs::write(path.with_extension("results"), lines).unwrap();
}

/// A disk that fills mid-storm (a file size limit on the process) and then
/// frees up: no acknowledged op is lost, no op refused before its commit is
/// stored, an unknown outcome is either (and its id is no other op's), and
/// every path commits again.
#[test]
fn a_disk_that_fills_and_frees_loses_no_acknowledged_op() {
    if let Some(path) = std::env::var_os(FULL_DISK_CHILD) {
        return fill_the_disk(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let rt = one_thread();
    rt.block_on(open(&rt, &path, options()).close());
    // Room for the file and some 96 KiB of log: a few dozen commits.
    let blocks = (std::fs::metadata(&path).unwrap().len() + 96 * 1024) / 512;
    run_child(
        "a_disk_that_fills_and_frees_loses_no_acknowledged_op",
        FULL_DISK_CHILD,
        &path,
        &format!("ulimit -S -f {blocks}"),
    );

    let results = std::fs::read_to_string(path.with_extension("results")).unwrap();
    let stored: BTreeMap<String, String> = stored_ops(&path)
        .into_iter()
        .map(|o| (o.entity_id, o.op_id.to_string()))
        .collect();
    let mut answered = BTreeMap::new();
    for line in results.lines() {
        let mut words = line.splitn(3, ' ');
        let (kind, tag, rest) = (
            words.next().unwrap(),
            words.next().unwrap(),
            words.next().unwrap(),
        );
        match kind {
            "ok" => assert_eq!(
                stored.get(tag).map(String::as_str),
                Some(rest),
                "{tag} acked"
            ),
            // The caller looks for the id it was given: if its op is not
            // there, no other op may hold that id.
            "unknown" => match stored.get(tag) {
                Some(id) => assert_eq!(id, rest, "{tag}"),
                None => assert!(
                    !stored.values().any(|id| id == rest),
                    "{tag}: its unknown outcome named {rest}, which a later op holds"
                ),
            },
            _ => assert!(
                !stored.contains_key(tag),
                "{tag} refused ({rest}) but stored"
            ),
        }
        *answered.entry(kind.to_owned()).or_insert(0) += 1;
    }
    assert!(answered["ok"] > 3, "some commits fit: {answered:?}");
    assert!(answered.len() > 1, "the limit was hit: {answered:?}");
    for tag in stored.keys() {
        assert!(
            results.contains(&format!(" {tag} ")),
            "{tag} was never enqueued"
        );
    }
    for tag in ["after-thread", "after-worker", "after-writer"] {
        assert!(
            results.contains(&format!("ok {tag} ")),
            "{tag} after the disk freed up"
        );
    }
}

/// Runs this binary's test `name` in a child process with `key` set to
/// `path`, after `limits` (shell); a write past a file size limit then
/// fails with EFBIG instead of killing the child (SIGXFSZ ignored).
fn run_child(name: &str, key: &str, path: &Path, limits: &str) {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' XFSZ; {limits}; exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(key, path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (exited_tx, exited) = mpsc::channel();
    std::thread::spawn(move || exited_tx.send(child.wait().unwrap()).unwrap());
    let Ok(status) = exited.recv_timeout(HANG * 2) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("the child process hung");
    };
    assert!(status.success(), "the child failed: {status}");
}

/// Sets this process's soft limit on file size to `bytes`, or back to its
/// hard limit (`None`).
fn file_size_limit(bytes: Option<u64>) {
    let pid = std::process::id().to_string();
    let soft = match bytes {
        Some(b) => b.to_string(),
        None => {
            let hard = std::process::Command::new("prlimit")
                .args([
                    "--pid",
                    &pid,
                    "--fsize",
                    "--output=HARD",
                    "--noheadings",
                    "--raw",
                ])
                .output()
                .unwrap();
            assert!(hard.status.success());
            String::from_utf8(hard.stdout).unwrap().trim().to_owned()
        }
    };
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--fsize={soft}:")])
        .status()
        .unwrap();
    assert!(set.success());
}

/// Set for the unknown-outcome test's child process: the outbox's path.
const UNKNOWN_OUTCOME_CHILD: &str = "GUARDIAN_WRITER_ADVERSARIAL_UNKNOWN_OUTCOME";

/// Big CREATEs under a file size limit until one's commit fails: its error.
fn until_a_commit_fails(rt: &Runtime, outbox: &Outbox, path: &Path, tag: &str) -> EnqueueError {
    let wal = path.with_extension("db-wal");
    let used = std::fs::metadata(path).unwrap().len()
        + std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    file_size_limit(Some(used + 64 * 1024));
    let big = "x".repeat(20_000);
    for k in 0..100 {
        let op = NewOp::create("lamp", format!("{tag}{k}"), json!({ "big": big }));
        if let Err(e) = rt.block_on(outbox.enqueue(op)) {
            return e;
        }
    }
    panic!("no commit failed under the limit");
}

/// The unknown-outcome test's child: every answer is checked here.
fn unknown_outcomes(path: &Path) {
    let rt = one_thread();
    let outbox = open(&rt, path, options());
    let a = rt
        .block_on(outbox.enqueue(NewOp::create("lamp", "a", json!({ "v": 1 }))))
        .unwrap();
    let EnqueueError::OutcomeUnknown {
        op_id: lost,
        change: UnknownChange::New,
        ..
    } = until_a_commit_fails(&rt, &outbox, path, "big")
    else {
        panic!("a failed commit's outcome is unknown");
    };
    // Less room than any commit needs (the log ends past it).
    file_size_limit(Some(4096));
    let unknown = |op: NewOp, change: UnknownChange, says: &str| {
        let e = rt.block_on(outbox.enqueue(op)).unwrap_err();
        assert!(
            matches!(&e, EnqueueError::OutcomeUnknown { op_id, change: c, .. } if *op_id == a.op_id && *c == change),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("{says} {}: stored if", a.op_id)),
            "{text}"
        );
    };
    unknown(
        NewOp::update("lamp", "a", json!({ "v": 2 })),
        UnknownChange::MergedInto,
        "merged into queued op",
    );
    unknown(
        NewOp::delete("lamp", "a"),
        UnknownChange::Cancels,
        "it cancels queued op",
    );
    file_size_limit(None);
    rt.block_on(outbox.close());

    // Another open takes the failed op's position, under an id of its own.
    let outbox = open(&rt, path, options());
    let later = rt.block_on(outbox.enqueue(op("later"))).unwrap();
    assert_eq!(
        later.seq,
        i64::try_from(lost.as_u128() & ((1 << 62) - 1)).unwrap(),
        "the failed op's position is free"
    );
    assert_ne!(later.op_id, lost, "another open gave the failed op's id");
    let found = rt.block_on(outbox.get(a.op_id)).unwrap().unwrap();
    assert_eq!(
        found.payload,
        json!({ "v": 1 }),
        "the failed merge changed nothing"
    );

    // The same open never gives a failed op's position again.
    let EnqueueError::OutcomeUnknown { op_id: lost, .. } =
        until_a_commit_fails(&rt, &outbox, path, "again")
    else {
        panic!("a failed commit's outcome is unknown");
    };
    file_size_limit(None);
    let after = rt.block_on(outbox.enqueue(op("after"))).unwrap();
    assert_ne!(
        after.op_id, lost,
        "the same open gave the failed op's id again"
    );
    rt.block_on(outbox.close());
}

/// A commit that fails names the op to look at and what to look for: a new
/// op's id, the queued op a change was merged into (which exists either
/// way), or the CREATE a DELETE cancels. And that id never names another
/// op: neither the next op of the same open nor one of a later open, which
/// takes the failed op's position. The error used to name the merged-into
/// op as if it were new, and the next op got the failed op's id, so a
/// caller looking for it found a stranger.
#[test]
fn an_unknown_outcome_names_what_to_look_for_and_no_other_op() {
    if let Some(path) = std::env::var_os(UNKNOWN_OUTCOME_CHILD) {
        return unknown_outcomes(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    run_child(
        "an_unknown_outcome_names_what_to_look_for_and_no_other_op",
        UNKNOWN_OUTCOME_CHILD,
        &path,
        "true",
    );
}

/// A clock that panics at its next reading once armed: an app's bug.
#[derive(Debug, Default)]
struct PanicClock {
    system: SystemClock,
    armed: AtomicBool,
}

impl Clock for PanicClock {
    fn now_millis(&self) -> i64 {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("hostile clock");
        }
        self.system.now_millis()
    }

    fn monotonic(&self) -> Duration {
        self.system.monotonic()
    }
}

/// A job that panics on the writer thread closes the outbox: `close()`
/// still returns, and no path commits anything afterwards.
#[test]
fn a_writer_thread_panic_closes_the_outbox_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let clock = Arc::new(PanicClock::default());
    // A current-thread runtime hands every job to the writer thread.
    let rt = one_thread();
    let outbox = open(&rt, &path, options().clock(clock.clone()));
    rt.block_on(outbox.enqueue(op("before"))).unwrap();
    clock.armed.store(true, Ordering::SeqCst);
    assert_eq!(
        rt.block_on(outbox.enqueue(op("boom"))).unwrap_err(),
        EnqueueError::Closed
    );
    assert_eq!(
        rt.block_on(outbox.enqueue(op("after-panic"))).unwrap_err(),
        EnqueueError::Closed
    );
    rt.block_on(outbox.close());
    let o = outbox.clone();
    let blocking = std::thread::spawn(move || o.enqueue_blocking(op("blocking")));
    assert_eq!(blocking.join().unwrap().unwrap_err(), EnqueueError::Closed);
    let pool = workers(2);
    let o = outbox.clone();
    let inline = pool.block_on(async move { o.enqueue(op("inline")).await });
    assert_eq!(inline.unwrap_err(), EnqueueError::Closed);
    drop(outbox);
    let tags: Vec<String> = stored_ops(&path).into_iter().map(|o| o.entity_id).collect();
    assert_eq!(tags, ["before"]);
}

/// Two `close()` calls queued together both return only once the database
/// is closed (its WAL checkpointed and removed), not just the first.
#[test]
fn every_concurrent_close_waits_for_the_database_to_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let wal = path.with_file_name("outbox.db-wal");
    let gate = Arc::new(GateClock::default());
    let rt = one_thread();
    let outbox = open(&rt, &path, options().clock(gate.clone()));
    // Holds the writer thread inside a job while both closes are queued.
    let (entered, release) = gate.arm();
    let o = outbox.clone();
    let held = std::thread::spawn(move || one_thread().block_on(o.enqueue(op("held"))));
    entered.recv_timeout(HANG).unwrap();
    rt.block_on(async {
        let mut first = std::pin::pin!(outbox.close());
        let mut second = std::pin::pin!(outbox.close());
        assert!(futures::poll!(&mut first).is_pending());
        assert!(futures::poll!(&mut second).is_pending());
        release.send(()).unwrap();
        tokio::time::timeout(HANG, &mut second).await.unwrap();
        assert!(
            !wal.exists(),
            "a close() returned before the database was closed"
        );
        tokio::time::timeout(HANG, &mut first).await.unwrap();
    });
    held.join().unwrap().unwrap();
    assert_eq!(stored(&path).len(), 1);
}
