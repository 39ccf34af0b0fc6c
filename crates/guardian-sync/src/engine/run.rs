//! Runner sessions: hold the lock, beat, drain, wait, stop.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Mutex as AsyncMutex};

use crate::lock::{Acquired, ProcessingLock};
use crate::op::Fence;
use crate::outbox::{OutboxError, Ticket};

use super::task::{self, Owned};
use super::{EngineError, Inner, SyncEngine, SyncEvent};
use crate::core::drain::{DrainEnd, DrainReport};

/// What a [`SyncEngine::run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// Totals of every drain step.
    pub drain: DrainReport,
    /// Times this runner acquired the lock.
    pub acquisitions: u64,
    /// Of those, takeovers from another owner.
    pub takeovers: u64,
}

/// How an attempt for the lock raced against a stop ended.
pub(super) enum Attempt {
    /// The lock is ours.
    Held(Session),
    /// Another runner holds it (or the outbox stayed busy): try again after
    /// this long.
    Busy(Box<ProcessingLock>, Duration),
    /// The stop came first. With a session: a write of the attempt was
    /// under way and took the lock all the same.
    Stopped(Option<Session>),
}

/// A held lock with its heartbeat task; dropping it stops the beat.
pub(super) struct Session {
    lock: Arc<AsyncMutex<ProcessingLock>>,
    fence: Fence,
    lost: Arc<AtomicBool>,
    beat: Owned<()>,
    /// Turned true when the app stops the runner: the drain sends nothing
    /// more and finishes writing what it received.
    stop: watch::Sender<bool>,
}

/// How long a stopping runner waits for the drain to write the outcomes it
/// already received; past it the drain is aborted and those ops are sent
/// again, with their keys, by the next runner.
const STOP_GRACE: Duration = Duration::from_secs(2);

impl Session {
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub(super) async fn release(self) {
        drop(self.beat);
        if let Err(e) = self.lock.lock().await.release().await {
            tracing::warn!("releasing the processing lock failed: {e}");
        }
    }
}

impl SyncEngine {
    pub(super) fn new_lock(&self) -> ProcessingLock {
        let inner = &self.inner;
        ProcessingLock::new(
            inner.outbox.clone(),
            inner.owner_id.clone(),
            inner.lock,
            inner.clock.clone(),
        )
    }

    /// Tries the lock once, its writes under `ticket` if given; on success
    /// starts the heartbeat.
    pub(super) async fn try_session(
        &self,
        lock: ProcessingLock,
        report: &mut RunReport,
        ticket: Option<&Ticket>,
    ) -> Result<Result<Session, (ProcessingLock, Duration)>, EngineError> {
        let mut lock = lock;
        // No await from the acquire's answer to this function's return: an
        // attempt withdrawn with nothing unheard (see `try_session_until`)
        // then holds no fence when it is dropped.
        match lock.try_acquire_under(ticket).await? {
            Acquired::No { retry_in } => Ok(Err((lock, retry_in))),
            Acquired::Yes {
                fence,
                took_over_from,
            } => {
                report.acquisitions += 1;
                // Ops written while another process held the lock may lie
                // ahead of this clock: check them at the first claim.
                self.inner
                    .schedule
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .new_session();
                if took_over_from.is_some() {
                    report.takeovers += 1;
                }
                self.inner.emit(SyncEvent::LockAcquired {
                    epoch: fence.epoch(),
                    took_over_from,
                });
                let lock = Arc::new(AsyncMutex::new(lock));
                let lost = Arc::new(AtomicBool::new(false));
                let beat = Owned::spawn(heartbeat(lock.clone(), lost.clone(), self.inner.clone()));
                Ok(Ok(Session {
                    lock,
                    fence,
                    lost,
                    beat,
                    stop: watch::Sender::new(false),
                }))
            }
        }
    }

    /// [`try_session`](Self::try_session), unless `stop` completes first:
    /// then the attempt's writes are withdrawn, so that a stop does not
    /// wait out a busy outbox (another process mid-write, or frozen). A
    /// write of the attempt already under way holds the database and ends
    /// soon: it is awaited, and a lock it took comes back in `Stopped`.
    pub(super) async fn try_session_until(
        &self,
        lock: ProcessingLock,
        report: &mut RunReport,
        stop: impl Future<Output = ()>,
    ) -> Result<Attempt, EngineError> {
        let ticket = Ticket::default();
        let attempt = self.try_session(lock, report, Some(&ticket));
        tokio::pin!(attempt, stop);
        let outcome = tokio::select! {
            biased;
            () = &mut stop => {
                // Withdrawn with nothing running or unheard: dropped, the
                // attempt holds no lock and writes nothing more.
                if ticket.withdraw() {
                    return Ok(Attempt::Stopped(None));
                }
                return Ok(Attempt::Stopped(match attempt.await {
                    Ok(Ok(session)) => Some(session),
                    Ok(Err(_)) | Err(EngineError::Outbox(OutboxError::Closed)) => None,
                    Err(e) => {
                        tracing::warn!("the lock attempt a stop cut short failed: {e}");
                        None
                    }
                }));
            }
            r = &mut attempt => r,
        };
        Ok(match outcome? {
            Ok(session) => Attempt::Held(session),
            Err((lock, retry_in)) => Attempt::Busy(Box::new(lock), retry_in),
        })
    }

    /// Drains what is ready now, once, then releases the lock.
    ///
    /// Fails with [`EngineError::LockHeld`] when a live runner holds the lock.
    /// Ops in backoff are left for later; see [`SyncEngine::run_until_empty`].
    pub async fn drain_once(&self) -> Result<DrainReport, EngineError> {
        let mut report = RunReport::default();
        let Ok(session) = self.try_session(self.new_lock(), &mut report, None).await? else {
            return Err(EngineError::LockHeld);
        };
        let result = self.drain_ready(&session).await;
        session.release().await;
        result
    }

    /// Steps until nothing is ready now.
    pub(super) async fn drain_ready(&self, session: &Session) -> Result<DrainReport, EngineError> {
        let mut drain = self.spawn_drain(session);
        let joined = drain.join().await;
        self.joined(joined)
    }

    /// Starts the steps of [`Self::drain_ready`] as a task on the runtime,
    /// not inside the caller's future: an app that drives the engine with
    /// `block_on` (as `gsync` does) would otherwise run the drain loop on
    /// its own thread, and every response and every request would cross
    /// threads to and from the runtime's I/O tasks. Dropping the handle
    /// aborts the task at its next await; a write it may still issue is
    /// fenced by the lock like any other.
    fn spawn_drain(&self, session: &Session) -> DrainTask {
        let inner = self.inner.clone();
        let fence = session.fence.clone();
        let lost = session.lost.clone();
        let mut stop = session.stop.subscribe();
        Owned::spawn(async move { inner.drain_steps(&fence, &lost, &mut stop).await })
    }

    fn joined(
        &self,
        joined: Result<Result<DrainReport, EngineError>, tokio::task::JoinError>,
    ) -> Result<DrainReport, EngineError> {
        match task::outcome(joined) {
            Err(EngineError::LockLost) => Err(self.lock_lost()),
            result => result,
        }
    }

    fn lock_lost(&self) -> EngineError {
        self.inner.emit(SyncEvent::LockLost);
        tracing::warn!("lost the processing lock; this runner stops writing");
        EngineError::LockLost
    }

    /// Runs until `shutdown` completes: waits for the lock, drains, sleeps
    /// until the next op is due or a new one is enqueued, and repeats.
    ///
    /// On shutdown, requests in flight are abandoned (their ops stay
    /// `in_flight` and are re-sent with the same key by the next runner),
    /// outcomes already received are written and their events published
    /// (for at most `STOP_GRACE`; a write not begun by then is not made,
    /// and the aborted drain is dropped, within as long again, before
    /// this returns), and the lock is released (which waits for another
    /// connection's write at most the outbox's busy timeout). A shutdown
    /// while the runner still tries for the lock does not wait for an
    /// outbox another process keeps busy; a write of the attempt already
    /// under way is awaited, and a lock it took released. Returns
    /// [`EngineError::LockLost`] if another runner took the lock over.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RunReport, EngineError> {
        self.run_inner(shutdown, false).await
    }

    /// Runs until no op is pending or in flight (failed ops stay), waiting
    /// out backoffs and Retry-After. For tests, scripts and `gsync run --once`.
    pub async fn run_until_empty(&self) -> Result<RunReport, EngineError> {
        self.run_inner(std::future::pending(), true).await
    }

    async fn run_inner(
        &self,
        shutdown: impl Future<Output = ()>,
        until_empty: bool,
    ) -> Result<RunReport, EngineError> {
        tokio::pin!(shutdown);
        let mut report = RunReport::default();
        let mut lock = self.new_lock();
        // Wait for the lock.
        let session = loop {
            match self
                .try_session_until(lock, &mut report, shutdown.as_mut())
                .await?
            {
                Attempt::Held(session) => break session,
                Attempt::Stopped(session) => {
                    if let Some(session) = session {
                        session.release().await;
                    }
                    return Ok(report);
                }
                Attempt::Busy(l, retry_in) => {
                    lock = *l;
                    tokio::select! {
                        () = &mut shutdown => return Ok(report),
                        () = tokio::time::sleep(retry_in) => {}
                    }
                }
            }
        };
        // Telemetry runs beside the drain while this runner holds the lock.
        let _export = self
            .inner
            .telemetry
            .is_some()
            .then(|| Owned::spawn(super::export::export_loop(self.inner.clone())));
        let result = self
            .drive(&session, &mut shutdown, until_empty, &mut report)
            .await;
        if !session.lost() {
            session.release().await;
        }
        result.map(|()| report)
    }

    async fn drive(
        &self,
        session: &Session,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        until_empty: bool,
        report: &mut RunReport,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        let mut last_progress = inner.clock.monotonic();
        let mut stall_reported = false;
        loop {
            let mut drain = self.spawn_drain(session);
            let drained = tokio::select! {
                () = shutdown.as_mut() => {
                    session.stop.send_replace(true);
                    return match tokio::time::timeout(STOP_GRACE, drain.join()).await {
                        Ok(joined) => {
                            report.drain.add(&self.joined(joined)?);
                            Ok(())
                        }
                        Err(_) => {
                            tracing::warn!(
                                "stopped before the outcomes received were written; \
                                 their ops are sent again by the next runner"
                            );
                            // Dropping the drain's outbox calls publishes
                            // what their commits made known
                            // (`Fenced::if_unheard`): before `run`
                            // returns, not after.
                            if !drain.cancel(STOP_GRACE).await {
                                tracing::warn!(
                                    "the stopped drain was not dropped within the grace"
                                );
                            }
                            Ok(())
                        }
                    };
                }
                joined = drain.join() => self.joined(joined)?,
            };
            // Progress means an op left the queue or was reconciled; a retry
            // is not progress (an endless retry loop is exactly a stall).
            if drained.succeeded + drained.failed + drained.conflicts_resolved > 0 {
                last_progress = inner.clock.monotonic();
                stall_reported = false;
            }
            report.drain.add(&drained);
            // Index lookups only: counting rows here would cost O(queue) per
            // step (the queue depth gauge is refreshed at each heartbeat).
            let due = inner.outbox.next_due().await?;
            if until_empty && !due.active {
                inner.metrics.set_queue_depth(0);
                return Ok(());
            }
            // How long to sleep: until the next op is due, the breaker
            // half-opens, or a heartbeat-sized tick for the watchdog.
            let now = inner.clock.now_millis();
            let mut wait = inner.lock.heartbeat_interval;
            if let Some(due) = due.next_attempt_at {
                let until_due = u64::try_from(due.saturating_sub(now)).unwrap_or(0);
                wait = wait.min(Duration::from_millis(until_due));
            }
            if let Some(cool) = inner.breaker().cooldown_remaining(inner.clock.monotonic()) {
                wait = wait.max(cool.min(inner.lock.heartbeat_interval));
            }
            let stalled_for = inner.clock.monotonic().saturating_sub(last_progress);
            if due.active
                && !stall_reported
                && stalled_for >= inner.stall_after
                && !inner.breaker().is_tripped(inner.clock.monotonic())
            {
                stall_reported = true;
                let stats = inner.outbox.stats().await?;
                inner.metrics.incr(crate::telemetry::Counter::Stalls);
                inner.emit(SyncEvent::Stalled {
                    stalled_for_ms: u64::try_from(stalled_for.as_millis()).unwrap_or(u64::MAX),
                    pending: stats.pending,
                });
            }
            tokio::select! {
                () = shutdown.as_mut() => return Ok(()),
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
            }
        }
    }
}

/// A drain running as a task; aborted when dropped.
type DrainTask = Owned<Result<DrainReport, EngineError>>;

impl Inner {
    /// Delivers outcomes left from earlier, then steps until nothing is ready.
    async fn drain_steps(
        self: &Arc<Self>,
        fence: &Fence,
        lost: &AtomicBool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<DrainReport, EngineError> {
        let mut report = DrainReport::default();
        self.deliver_outcomes().await?;
        loop {
            if lost.load(Ordering::SeqCst) {
                return Err(EngineError::LockLost);
            }
            if *stop.borrow() {
                return Ok(report);
            }
            match self.step(fence, stop).await? {
                DrainEnd::Progressed(r) => report.add(&r),
                _ => return Ok(report),
            }
        }
    }
}

/// Meta key under which a live runner publishes its status for `gsync status`.
pub const RUNNER_STATUS_KEY: &str = "runner.status";

impl Inner {
    /// Publishes breaker state and telemetry for other processes
    /// (`gsync status --metrics`). Informational, so not fenced; a failure
    /// is logged, never fatal.
    pub(super) async fn publish_status(&self) {
        if let Ok(stats) = self.outbox.stats().await {
            self.metrics
                .set_queue_depth(stats.pending + stats.in_flight);
        }
        let status = serde_json::json!({
            "owner": self.owner_id,
            "breaker": self.breaker().state().name(),
            "at": self.clock.now_millis(),
            "metrics": self.metrics.summary(),
        });
        if let Err(e) = self
            .outbox
            .meta_set(RUNNER_STATUS_KEY, &status.to_string())
            .await
        {
            tracing::debug!("cannot publish runner status: {e}");
        }
    }
}

/// Beats every interval; on loss flags the session and wakes the runner.
async fn heartbeat(
    lock: Arc<AsyncMutex<ProcessingLock>>,
    lost: Arc<AtomicBool>,
    inner: Arc<Inner>,
) {
    let interval = inner.lock.heartbeat_interval;
    loop {
        tokio::time::sleep(interval).await;
        match lock.lock().await.heartbeat().await {
            Ok(()) => inner.publish_status().await,
            Err(crate::lock::LockError::Lost) => {
                lost.store(true, Ordering::SeqCst);
                inner.wake.notify_one();
                return;
            }
            Err(e) => tracing::warn!("heartbeat failed (will retry): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;
    use futures::FutureExt as _;
    use serde_json::json;
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::clock::ManualClock;
    use crate::core::outcome::{Outcome, Stored};
    use crate::op::NewOp;
    use crate::outbox::{HeldCommit, Outbox, OutboxOptions};
    use crate::transport::{Fetched, OpRequest, Transport};

    /// Applies every op; at each send, holds the outbox's next commit with
    /// an unheard hook (the ack's) and hands the hold to the test, after
    /// stepping `clock`'s wall time a minute ahead if there is one.
    #[derive(Debug)]
    struct HoldsTheAck {
        outbox: Outbox,
        held: mpsc::UnboundedSender<HeldCommit>,
        step: Option<Arc<ManualClock>>,
    }

    impl Transport for HoldsTheAck {
        fn send<'a>(&'a self, _op: &'a OpRequest) -> BoxFuture<'a, Outcome> {
            if let Some(clock) = &self.step {
                clock.jump_wall(60_000);
            }
            let _ = self.held.send(self.outbox.hold_next_commit(true));
            Box::pin(async {
                Outcome::Applied {
                    stored: Stored::AsSent { version: 1 },
                    replayed: false,
                }
            })
        }

        fn fetch<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Fetched, Outcome>> {
            unreachable!("no conflict here")
        }
    }

    /// An engine over a new outbox whose transport holds acks (and steps
    /// `clock` if given), one op enqueued, a runner started, and what the
    /// test needs to stop it and check its events.
    struct Rig {
        _dir: tempfile::TempDir,
        outbox: Outbox,
        engine: SyncEngine,
        op_id: crate::op::OpId,
        events: tokio::sync::broadcast::Receiver<SyncEvent>,
        held: mpsc::UnboundedReceiver<HeldCommit>,
        stop: oneshot::Sender<()>,
        runner: tokio::task::JoinHandle<Result<RunReport, EngineError>>,
    }

    async fn rig(clock: Option<Arc<ManualClock>>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut options = OutboxOptions::default();
        if let Some(clock) = &clock {
            options.clock = clock.clone();
        }
        let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), options)
            .await
            .unwrap();
        let (held_tx, held) = mpsc::unbounded_channel();
        let transport = Arc::new(HoldsTheAck {
            outbox: outbox.clone(),
            held: held_tx,
            step: clock.clone(),
        });
        let mut builder = SyncEngine::builder()
            .outbox(outbox.clone())
            .transport(transport);
        if let Some(clock) = clock {
            builder = builder.clock(clock);
        }
        let engine = builder.build().await.unwrap();
        let op = NewOp::create("device", "d1", json!({"on": true}));
        let op_id = engine.enqueue(op).await.unwrap().op_id;
        let events = engine.events();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = engine.clone();
        let runner = tokio::spawn(async move { run.run(stopped.map(drop)).await });
        Rig {
            _dir: dir,
            outbox,
            engine,
            op_id,
            events,
            held,
            stop,
            runner,
        }
    }

    impl Rig {
        /// Stops the runner and lets the grace pass (paused time: at once),
        /// then lets `go` go and waits for the runner. Asserts the op was
        /// acked and had its `op_succeeded` once.
        async fn stop_past_the_grace(mut self, go: std::sync::mpsc::Sender<()>) {
            self.stop.send(()).unwrap();
            tokio::time::sleep(STOP_GRACE + Duration::from_millis(1)).await;
            go.send(()).unwrap();
            self.runner.await.unwrap().unwrap();
            assert!(
                self.outbox.get(self.op_id).await.unwrap().is_none(),
                "acked"
            );
            let mut succeeded = 0;
            while let Ok(event) = self.events.try_recv() {
                if matches!(event, SyncEvent::OpSucceeded { op_id, .. } if op_id == self.op_id) {
                    succeeded += 1;
                }
            }
            assert_eq!(succeeded, 1, "op_succeeded of the acked op");
            let counted = self
                .engine
                .metrics()
                .get(crate::telemetry::Counter::Succeeded);
            assert_eq!(counted, 1);
            self.outbox.close().await;
        }
    }

    /// The app stops the runner while the ack of an applied op commits, and
    /// the commit outlasts the grace: the drain is abandoned, the ack
    /// commits after it, and the op's `op_succeeded` is published all the
    /// same (before the fix it was lost: the op left the outbox unreported).
    /// Paused time: the grace passes as soon as the runtime idles.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_commits_after_a_stop_past_the_grace_publishes_its_events() {
        let mut rig = rig(None).await;
        let (reached, go) = rig.held.recv().await.unwrap();
        reached.await.unwrap();
        rig.stop_past_the_grace(go).await;
    }

    /// After a wall-clock step the claim's acks are committed on their own,
    /// before the schedule is re-based: they are heard by the claim, not by
    /// the machine. A stop past the grace while the re-base commits still
    /// publishes their events (before the fix: the op acked, 0 events).
    #[tokio::test(start_paused = true)]
    async fn acks_heard_before_a_clock_step_rebase_keep_their_events_at_a_stop() {
        let clock = ManualClock::new(1_700_000_000_000);
        let mut rig = rig(Some(clock)).await;
        // Held: the acks' own commit. Hold the next (the re-base's), then
        // let the acks go. Waiting in a blocking task keeps paused time
        // from jumping ahead (to a heartbeat, whose commit would be held).
        let (reached, go) = rig.held.recv().await.unwrap();
        reached.await.unwrap();
        let (reached, rebase) = rig.outbox.hold_next_commit(false);
        go.send(()).unwrap();
        tokio::task::spawn_blocking(move || reached.blocking_recv())
            .await
            .unwrap()
            .unwrap();
        rig.stop_past_the_grace(rebase).await;
    }

    /// Answers `a` as [`HoldsTheAck`] does; never answers `b`, whose
    /// request blocks when dropped until the test lets it go.
    #[derive(Debug)]
    struct BlocksADrop {
        acks: HoldsTheAck,
        blocking: std::sync::Mutex<Option<SlowDrop>>,
    }

    /// A request that never completes and, dropped, says so and then
    /// blocks until `resume` fires or is dropped (bounded all the same).
    #[derive(Debug)]
    struct SlowDrop {
        dropping: Option<oneshot::Sender<()>>,
        resume: std::sync::mpsc::Receiver<()>,
    }

    impl std::future::Future for SlowDrop {
        type Output = Outcome;
        fn poll(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Outcome> {
            std::task::Poll::Pending
        }
    }

    impl Drop for SlowDrop {
        fn drop(&mut self) {
            if let Some(dropping) = self.dropping.take() {
                let _ = dropping.send(());
            }
            let _ = self.resume.recv_timeout(Duration::from_secs(10));
        }
    }

    impl Transport for BlocksADrop {
        fn send<'a>(&'a self, op: &'a OpRequest) -> BoxFuture<'a, Outcome> {
            if op.entity_id == "b" {
                if let Some(slow) = self.blocking.lock().unwrap().take() {
                    return Box::pin(slow);
                }
                return Box::pin(std::future::pending());
            }
            self.acks.send(op)
        }

        fn fetch<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Fetched, Outcome>> {
            unreachable!("no conflict here")
        }
    }

    /// A stop past the grace aborts the drain; its requests and writes are
    /// dropped by the runtime, and dropping a write whose commit was not
    /// heard publishes its events. The runner returns only once that drop
    /// is done: an app that stops listening when `run` returns misses
    /// nothing (before the fix, `run` returned while the drop still ran).
    /// Real time on two workers: the blocked drop holds one of them. One
    /// request at a time, so the blocked drop is the drain's own (a request
    /// among several runs as a task of its own, dropped apart).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_runner_returns_after_its_abandoned_drain_is_dropped() {
        let (_dir, outbox) = fresh_outbox().await;
        let (held_tx, mut held) = mpsc::unbounded_channel();
        let (dropping_tx, dropping) = oneshot::channel();
        let (resume, resume_rx) = std::sync::mpsc::channel();
        let transport = Arc::new(BlocksADrop {
            acks: HoldsTheAck {
                outbox: outbox.clone(),
                held: held_tx,
                step: None,
            },
            blocking: std::sync::Mutex::new(Some(SlowDrop {
                dropping: Some(dropping_tx),
                resume: resume_rx,
            })),
        });
        let engine = SyncEngine::builder()
            .outbox(outbox.clone())
            .transport(transport)
            .concurrency(1)
            .build()
            .await
            .unwrap();
        let a = engine
            .enqueue(NewOp::create("device", "a", json!({"on": true})))
            .await
            .unwrap()
            .op_id;
        engine
            .enqueue(NewOp::create("device", "b", json!({"on": true})))
            .await
            .unwrap();
        let mut events = engine.events();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = engine.clone();
        let mut runner = tokio::spawn(async move { run.run(stopped.map(drop)).await });
        // `a`'s ack is held; the stop makes the drain drop `b`'s request,
        // which blocks; then the ack commits, unheard by the blocked drain.
        let (reached, go) = held.recv().await.unwrap();
        reached.await.unwrap();
        stop.send(()).unwrap();
        dropping.await.unwrap();
        go.send(()).unwrap();
        let early =
            tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), &mut runner).await;
        assert!(
            early.is_err(),
            "the runner returned while its abandoned drain was still being dropped"
        );
        drop(resume);
        runner.await.unwrap().unwrap();
        assert!(outbox.get(a).await.unwrap().is_none(), "a acked");
        let mut succeeded = 0;
        while let Ok(event) = events.try_recv() {
            if matches!(event, SyncEvent::OpSucceeded { op_id, .. } if op_id == a) {
                succeeded += 1;
            }
        }
        assert_eq!(succeeded, 1, "op_succeeded of the acked op, once");
        outbox.close().await;
    }

    /// An outbox of its own, in a temp dir that lives as long as the guard.
    async fn fresh_outbox() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path().join("outbox.db"), OutboxOptions::default())
            .await
            .unwrap();
        (dir, outbox)
    }

    /// Never answers; says when each request is sent, and when it is
    /// dropped.
    #[derive(Debug)]
    struct Hangs {
        sent: mpsc::UnboundedSender<()>,
        dropped: mpsc::UnboundedSender<()>,
    }

    struct SaysWhenDropped(mpsc::UnboundedSender<()>);

    impl Drop for SaysWhenDropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    impl Transport for Hangs {
        fn send<'a>(&'a self, _op: &'a OpRequest) -> BoxFuture<'a, Outcome> {
            let _ = self.sent.send(());
            let dropped = SaysWhenDropped(self.dropped.clone());
            Box::pin(async move {
                let _dropped = dropped;
                std::future::pending().await
            })
        }

        fn fetch<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Fetched, Outcome>> {
            unreachable!("no conflict here")
        }
    }

    /// An engine on `outbox` whose requests never end (none is sent here).
    async fn idle_engine(outbox: &Outbox) -> SyncEngine {
        let (sent, _) = mpsc::unbounded_channel();
        let (dropped, _) = mpsc::unbounded_channel();
        SyncEngine::builder()
            .outbox(outbox.clone())
            .transport(Arc::new(Hangs { sent, dropped }))
            .build()
            .await
            .unwrap()
    }

    /// A stop that comes while the lock attempt's write is committing
    /// cannot withdraw it: `run` waits for it, and releases the lock it took
    /// before returning (an attempt dropped there would give the lock back
    /// later, from the writer, after `run` returned).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_the_lock_attempts_commit_releases_what_it_took() {
        let (dir, outbox) = fresh_outbox().await;
        let engine = idle_engine(&outbox).await;
        // The acquire is the first write with an unheard hook.
        let (reached, go) = outbox.hold_next_commit(true);
        // The stop fires once the acquire's commit is held, and lets it go:
        // its answer then waits, unread, for the attempt to be polled.
        let stop = async move {
            reached.await.unwrap();
            go.send(()).unwrap();
        };
        let report = tokio::time::timeout(Duration::from_secs(30), engine.run(stop))
            .await
            .expect("the runner did not stop")
            .unwrap();
        assert_eq!(report.acquisitions, 1, "{report:?}");
        let conn = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
        let (owner, epoch): (String, u64) = conn
            .query_row("SELECT owner, epoch FROM lock WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((owner.as_str(), epoch), ("", 1), "held when run returned");
        outbox.close().await;
    }

    /// `run_once`'s budget runs out while the acquire's write commits: the
    /// lock it takes is kept for the pass, which ends empty, instead of
    /// being released and reported as held by nobody.
    #[tokio::test(start_paused = true)]
    async fn a_pass_keeps_a_lock_taken_as_its_budget_ran_out() {
        let (_dir, outbox) = fresh_outbox().await;
        let engine = idle_engine(&outbox).await;
        let (reached, go) = outbox.hold_next_commit(true);
        let pass = engine.clone();
        let pass = tokio::spawn(async move { pass.run_once(Duration::ZERO).await });
        // Waiting in a blocking task keeps paused time from jumping ahead
        // before the acquire's commit is held.
        tokio::task::spawn_blocking(move || reached.blocking_recv())
            .await
            .unwrap()
            .unwrap();
        // Past the attempt's least wait (1 s): the budget runs out while
        // the commit is held, and the pass sees it before it is let go.
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        let once = pass.await.unwrap().unwrap();
        assert_eq!(once.stop, crate::engine::OnceStop::Empty, "{once:?}");
        assert_eq!(once.run.acquisitions, 1, "{once:?}");
        outbox.close().await;
    }

    /// Requests in flight together run as tasks of their own; a stop drops
    /// them all the same, so none is left running after the runner
    /// returns (each would hold a connection, and its ops, for good).
    #[tokio::test]
    async fn a_stop_ends_the_requests_that_run_as_tasks() {
        let (_dir, outbox) = fresh_outbox().await;
        let (sent_tx, mut sent) = mpsc::unbounded_channel();
        let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
        let engine = SyncEngine::builder()
            .outbox(outbox.clone())
            .transport(Arc::new(Hangs {
                sent: sent_tx,
                dropped: dropped_tx,
            }))
            .concurrency(2)
            .build()
            .await
            .unwrap();
        for id in ["a", "b"] {
            engine
                .enqueue(NewOp::create("device", id, json!({"on": true})))
                .await
                .unwrap();
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let run = engine.clone();
        let runner = tokio::spawn(async move { run.run(stopped.map(drop)).await });
        for _ in 0..2 {
            sent.recv().await.unwrap();
        }
        stop.send(()).unwrap();
        tokio::time::timeout(STOP_GRACE, runner)
            .await
            .expect("the runner stops within the grace")
            .unwrap()
            .unwrap();
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), dropped.recv())
                .await
                .expect("a request still runs after the runner returned")
                .unwrap();
        }
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            stats.pending + stats.in_flight,
            2,
            "both ops wait for the next run"
        );
        outbox.close().await;
    }

    /// An app may drop a running `run` future instead of using its
    /// shutdown. The heartbeat must end with it: a beat left running keeps
    /// the lock fresh for good, and no other runner could ever take it.
    #[tokio::test]
    async fn dropping_a_running_runner_stops_its_heartbeat() {
        let (_dir, outbox) = fresh_outbox().await;
        let (sent_tx, mut sent) = mpsc::unbounded_channel();
        let (dropped_tx, _dropped) = mpsc::unbounded_channel();
        let beat = Duration::from_millis(20);
        let engine = SyncEngine::builder()
            .outbox(outbox.clone())
            .transport(Arc::new(Hangs {
                sent: sent_tx,
                dropped: dropped_tx,
            }))
            .lock(crate::lock::LockConfig {
                heartbeat_interval: beat,
                stale_after: Duration::from_secs(1),
            })
            .build()
            .await
            .unwrap();
        engine
            .enqueue(NewOp::create("device", "a", json!({"on": true})))
            .await
            .unwrap();
        let run = engine.clone();
        let runner = tokio::spawn(async move { run.run(std::future::pending()).await });
        // The lock is held and the drain waits on the request.
        sent.recv().await.unwrap();
        runner.abort();
        assert!(runner.await.unwrap_err().is_cancelled());
        let beats = || async { outbox.lock_read().await.unwrap().unwrap().heartbeat };
        let before = beats().await;
        // Ten intervals: a beat left running would add about ten. One may
        // still land, begun before the abort.
        tokio::time::sleep(beat * 10).await;
        let after = beats().await;
        assert!(
            after <= before + 1,
            "the heartbeat went on after its runner was dropped: {before} -> {after}"
        );
        outbox.close().await;
    }
}
