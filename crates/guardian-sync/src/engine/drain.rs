//! The drain's driver: carries out what [`DrainMachine`] decides.
//!
//! It claims, sends, writes and publishes, and feeds every result back; the
//! decisions (what to send, what an outcome means, when to stop) are all the
//! machine's.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _};
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, watch};

use crate::core::drain::{
    DrainCommand, DrainConfig, DrainEnd, DrainInput, DrainMachine, Env, Published, Write, ACK_DELAY,
};
use crate::op::{Ack, Fence, OpId, PendingOp};
use crate::outbox::{ClaimShape, Fenced};
use crate::transport::OpRequest;

use super::task::Owned;
use super::{EngineError, Inner, SyncEvent};

type Step<'a> = BoxFuture<'a, Result<DrainInput, EngineError>>;

/// Outstanding futures of one kind.
///
/// `FuturesUnordered` wakes its task and yields whenever one poll went
/// through all its futures (futures-rs #2333): with one request in flight
/// that is every poll, and tokio turns the self-wake into a yield that wakes
/// another worker before the request just built reaches its socket. A
/// never-ready sentinel, polled only the first time, keeps a poll from ever
/// going through them all.
struct Pending<'a> {
    set: FuturesUnordered<Step<'a>>,
}

impl<'a> Pending<'a> {
    fn new() -> Self {
        let set = FuturesUnordered::new();
        set.push(Box::pin(std::future::pending()) as Step<'a>);
        Self { set }
    }

    fn push(&mut self, step: Step<'a>) {
        self.set.push(step);
    }

    fn is_empty(&self) -> bool {
        self.set.len() <= 1
    }

    /// The next result; pending forever while empty.
    async fn next(&mut self) -> Option<Result<DrainInput, EngineError>> {
        self.set.next().await
    }
}

/// A unit to send and its ops' dependencies (see [`DrainCommand::Send`]).
type Unit = (Vec<PendingOp>, Vec<Option<usize>>);

/// A request's result, or its panic, with the worker that sent it.
type Sent = (usize, std::thread::Result<Result<DrainInput, EngineError>>);

/// The drain's request tasks when more than one request may be in flight:
/// each worker sends one unit at a time and then waits for the next, so
/// a request costs two channel hand-offs instead of a task's spawn, boxing
/// and join. Workers are started as needed, up to the most requests ever
/// in flight at once, and aborted when dropped (a stop drops the requests
/// in flight with them).
struct Workers {
    inner: Arc<Inner>,
    /// Each worker's channel and task; idle ones are listed in `idle`.
    workers: Vec<(mpsc::UnboundedSender<Unit>, Owned<()>)>,
    idle: Vec<usize>,
    /// Units handed out and not yet answered.
    busy: usize,
    results_tx: mpsc::UnboundedSender<Sent>,
    results: mpsc::UnboundedReceiver<Sent>,
}

impl Workers {
    fn new(inner: &Arc<Inner>) -> Self {
        let (results_tx, results) = mpsc::unbounded_channel();
        Self {
            inner: Arc::clone(inner),
            workers: Vec::new(),
            idle: Vec::new(),
            busy: 0,
            results_tx,
            results,
        }
    }

    /// Hands `unit` to an idle worker, or to a new one.
    fn send(&mut self, unit: Vec<PendingOp>, deps: Vec<Option<usize>>) {
        self.busy += 1;
        let mut job = (unit, deps);
        while let Some(worker) = self.idle.pop() {
            match self.workers[worker].0.send(job) {
                Ok(()) => return,
                // Its task ended (after a panic, which ends the drain
                // too, or with the drain gone); never reused.
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        let worker = self.workers.len();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let inner = Arc::clone(&self.inner);
        let results = self.results_tx.clone();
        let task = Owned::spawn(async move {
            while let Some((unit, deps)) = rx.recv().await {
                // A transport's panic goes on in the drain, as it would
                // inline; caught here, or the drain would wait for this
                // result forever.
                let result = AssertUnwindSafe(inner.send_unit(unit, deps))
                    .catch_unwind()
                    .await;
                let panicked = result.is_err();
                if results.send((worker, result)).is_err() || panicked {
                    return;
                }
            }
        });
        // Cannot fail: the task holds the receiver until this sender is gone.
        let _ = tx.send(job);
        self.workers.push((tx, task));
    }

    fn is_empty(&self) -> bool {
        self.busy == 0
    }

    /// The next result; its worker is idle again.
    async fn next(&mut self) -> Option<Result<DrainInput, EngineError>> {
        let (worker, result) = self.results.recv().await?;
        self.busy -= 1;
        self.idle.push(worker);
        Some(result.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    }
}

impl Inner {
    /// Drains everything ready now (see [`DrainMachine`]).
    ///
    /// Once `stop` turns true, the requests and fetches in flight are
    /// dropped (their ops stay in flight and go back to pending when the
    /// lock is next acquired, with one attempt counted) and the machine
    /// finishes with the outcomes it already has written and published.
    pub(super) async fn step(
        self: &Arc<Self>,
        fence: &Fence,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<DrainEnd, EngineError> {
        let cfg = DrainConfig::new(
            self.concurrency,
            self.batch,
            self.transport.batch_dependencies(),
        )
        .max_payload(self.outbox.max_payload_bytes());
        let mut machine = DrainMachine::new(cfg);
        // Writes (then conflict fetches) are polled first: their jobs reach
        // the writer thread before a claim's, so the claim sees their effects
        // in the same commit.
        let mut writes = Pending::new();
        let mut fetches = Pending::new();
        let mut requests = Pending::new();
        // A lone request stays inline: a worker would add two wake-ups to
        // each of its round trips. More run on workers, so their client
        // work (serializing, the exchange, classifying the answer) runs on
        // any thread instead of queueing behind every other answer in the
        // drain's task.
        let pooled = self.concurrency > 1;
        let mut workers = Workers::new(self);
        // One future for the whole drain, made once rather than at every
        // select; polled until it completes (a stop, or its sender gone).
        let mut listening = true;
        let stopped = stop.wait_for(|s| *s);
        tokio::pin!(stopped);
        let mut claims = Pending::new();
        // Steps the machine at its deadline; re-armed only when that moves
        // (about once per ack group).
        let alarm = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(alarm);
        let mut armed: Option<Duration> = None;
        let mut input = None;
        loop {
            for command in self.decide(&mut machine, input.take()) {
                match command {
                    DrainCommand::Claim {
                        limit,
                        per_unit,
                        chains,
                        acks,
                        published,
                    } => claims.push(Box::pin(
                        self.claim(fence, limit, per_unit, chains, acks, published),
                    )),
                    DrainCommand::Send { unit, deps } if pooled => workers.send(unit, deps),
                    DrainCommand::Send { unit, deps } => {
                        requests.push(Box::pin(self.send_unit(unit, deps)));
                    }
                    DrainCommand::Fetch { op, latency } => {
                        fetches.push(Box::pin(async move {
                            let result = self.transport.fetch(&op.entity_type, &op.entity_id).await;
                            Ok(DrainInput::Fetched {
                                op,
                                latency,
                                result,
                            })
                        }));
                    }
                    DrainCommand::Write {
                        id,
                        write,
                        published,
                    } => {
                        writes.push(Box::pin(async move {
                            self.write(fence, write, published).await?;
                            Ok(DrainInput::Written { id })
                        }));
                    }
                    DrainCommand::Release(ids) => {
                        if let Err(e) = self.outbox.fenced(fence).release_claimed(ids).await {
                            input = Some(lock_lost(e.into())?);
                            break;
                        }
                    }
                    DrainCommand::PauseAuth => {
                        self.auth_paused
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    DrainCommand::Emit(event) => self.emit(event),
                    DrainCommand::DeliverOutcomes => self.deliver_outcomes().await?,
                    DrainCommand::Finish(DrainEnd::LockLost) => return Err(EngineError::LockLost),
                    DrainCommand::Finish(end) => return Ok(end),
                }
            }
            if input.is_some() {
                continue;
            }
            let deadline = machine.deadline();
            if deadline != armed {
                armed = deadline;
                if let Some(at) = deadline {
                    let wait = alarm_in(at, self.clock.monotonic());
                    alarm.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
            let result = tokio::select! {
                biased;
                Some(r) = writes.next(), if !writes.is_empty() => r,
                Some(r) = fetches.next(), if !fetches.is_empty() => r,
                Some(r) = workers.next(), if !workers.is_empty() => r,
                Some(r) = requests.next(), if !requests.is_empty() => r,
                // After the answers already in hand, which are recorded.
                heard = &mut stopped, if listening => {
                    listening = false;
                    if heard.is_ok() {
                        requests = Pending::new();
                        workers = Workers::new(self);
                        fetches = Pending::new();
                        input = Some(DrainInput::Stop);
                    }
                    continue;
                }
                Some(r) = claims.next(), if !claims.is_empty() => r,
                () = &mut alarm, if armed.is_some() => {
                    // Stepped with no input; re-armed if still due.
                    armed = None;
                    continue;
                }
                // The machine finishes when nothing is outstanding; this is
                // only reached if it did not.
                else => return Ok(machine.verdict()),
            };
            input = Some(result.or_else(lock_lost)?);
        }
    }

    /// One step of the machine, with the engine's shared state and time.
    fn decide(&self, machine: &mut DrainMachine, input: Option<DrainInput>) -> Vec<DrainCommand> {
        let mut breaker = self.breaker();
        let mut rng = rand::rng();
        let mut env = Env {
            now_ms: self.clock.now_millis(),
            mono: self.clock.monotonic(),
            auth_paused: self.auth_paused.load(std::sync::atomic::Ordering::SeqCst),
            breaker: &mut breaker,
            retry: &self.retry,
            reconciler: &self.reconciler,
            metrics: &self.metrics,
            rng: &mut rng,
        };
        machine.step(input, &mut env)
    }

    /// The runner's outbox API for one write: if the write commits after
    /// this drain was abandoned (a stop past its grace aborts it), what its
    /// commit made known is published all the same, as the machine would
    /// have on [`DrainInput::Written`]. Without that, an op could leave the
    /// outbox with no `op_succeeded`.
    fn fenced<'a>(self: &'a Arc<Self>, fence: &'a Fence, published: Published) -> Fenced<'a> {
        let fenced = self.outbox.fenced(fence);
        if published.is_empty() {
            return fenced;
        }
        let inner = Arc::clone(self);
        fenced.if_unheard(move || inner.publish(published))
    }

    /// Counts, records and emits what a write's commit made known.
    fn publish(&self, published: Published) {
        for (counter, n) in published.counters {
            self.metrics.add(counter, n);
        }
        for latency in published.latencies {
            self.metrics.record_latency(latency);
        }
        for event in published.events {
            self.emit(event);
        }
    }

    /// Claims up to `limit` ready ops: lone heads, or each entity's head
    /// with its next ops behind it (up to a batch's worth of ops and bytes);
    /// writes `acks` first, in the same transaction.
    async fn claim(
        self: &Arc<Self>,
        fence: &Fence,
        limit: usize,
        per_unit: usize,
        chains: bool,
        mut acks: Vec<(OpId, Ack)>,
        mut published: Published,
    ) -> Result<DrainInput, EngineError> {
        let heard = self
            .rebase_after_clock_step(fence, &mut acks, &mut published)
            .await?;
        let shape = if chains {
            ClaimShape::Chains {
                max_chain: per_unit,
                max_chain_bytes: self.batch.map_or(usize::MAX, |b| b.max_bytes),
            }
        } else {
            ClaimShape::Heads
        };
        let now = self.clock.now_millis();
        let chains = self
            .fenced(fence, published)
            .ack_then_claim(acks, limit, now, shape)
            .await?;
        // The machine publishes them on `Claimed`, which it now gets.
        if let Some(heard) = heard {
            heard.disarm();
        }
        Ok(DrainInput::Claimed {
            asked: limit,
            chains,
        })
    }

    /// Sends a unit: one request per op, or one batch request.
    ///
    /// The requests borrow the ops' payloads (moved out and back, not
    /// copied): a payload is needed again only if the outcome is a conflict.
    async fn send_unit(
        &self,
        mut unit: Vec<PendingOp>,
        deps: Vec<Option<usize>>,
    ) -> Result<DrainInput, EngineError> {
        let started = self.clock.monotonic();
        let txn = unit.first().and_then(|op| op.txn);
        let outcomes = if let Some(txn) = txn {
            let requests: Vec<OpRequest> = unit
                .iter_mut()
                .enumerate()
                .map(|(i, op)| {
                    let depends_on = deps.get(i).copied().flatten();
                    let mut request = lend_request(op);
                    request.depends_on = depends_on;
                    request.if_match_chained = depends_on.is_some() && op.chained;
                    request
                })
                .collect();
            let outcomes = self
                .transport
                .send_transaction(&txn.id.to_string(), &requests)
                .await;
            for (op, request) in unit.iter_mut().zip(requests) {
                op.payload = request.payload;
            }
            outcomes
        } else if unit.len() > 1 {
            let requests: Vec<OpRequest> = unit
                .iter_mut()
                .zip(deps.iter().copied())
                .map(|(op, depends_on)| {
                    let mut request = lend_request(op);
                    request.depends_on = depends_on;
                    request.if_match_chained = depends_on.is_some() && op.chained;
                    request
                })
                .collect();
            let outcomes = self.transport.send_batch(&requests).await;
            for (op, request) in unit.iter_mut().zip(requests) {
                op.payload = request.payload;
            }
            outcomes
        } else {
            let mut outcomes = Vec::with_capacity(1);
            for op in &mut unit {
                let request = lend_request(op);
                outcomes.push(self.transport.send(&request).await);
                op.payload = request.payload;
            }
            outcomes
        };
        let latency = self.clock.monotonic().saturating_sub(started);
        Ok(DrainInput::Responded {
            unit,
            deps,
            outcomes,
            latency,
        })
    }

    /// Carries out one fenced write.
    async fn write(
        self: &Arc<Self>,
        fence: &Fence,
        write: Write,
        published: Published,
    ) -> Result<(), EngineError> {
        let fenced = self.fenced(fence, published);
        match write {
            Write::Ack(acks) => fenced.ack_many(acks).await?,
            Write::RetryAt { op_id, at, detail } => {
                fenced.retry_later(op_id, at, &detail).await?;
            }
            Write::Fail { op_id, error } => fenced.fail(op_id, &error).await?,
            Write::Reconciled { op_id, reconciled } => {
                fenced.reconciled(op_id, reconciled).await?;
            }
            Write::Release(ids) => fenced.release_claimed(ids).await?,
            Write::RetryTxnAt { op_ids, at, detail } => {
                fenced.retry_later_many(op_ids, at, &detail).await?;
            }
            Write::FailTxn(failures) => fenced.fail_many(failures).await?,
            Write::ReconciledInTxn {
                op_id,
                reconciled,
                others,
                rebased,
            } => {
                fenced
                    .reconciled_in_txn(op_id, reconciled, others, rebased)
                    .await?;
            }
        }
        Ok(())
    }

    /// Carries out the [`ScheduleGuard`]'s plan before a claim. The claim's
    /// `acks` are written first when there is a plan, so the heads they
    /// make are re-based and clamped too; `published` goes with them, and
    /// once they are heard, the returned guard publishes it unless the
    /// claim returns (the machine publishes it on `Claimed`).
    ///
    /// [`ScheduleGuard`]: crate::core::clock_watch::ScheduleGuard
    async fn rebase_after_clock_step(
        self: &Arc<Self>,
        fence: &Fence,
        acks: &mut Vec<(OpId, Ack)>,
        published: &mut Published,
    ) -> Result<Option<PublishOnDrop>, EngineError> {
        let now = self.clock.now_millis();
        let plan = self
            .schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .plan(now, self.clock.monotonic());
        let mut heard = None;
        if (plan.rebase.is_some() || plan.clamp) && !acks.is_empty() {
            let published = std::mem::take(published);
            self.fenced(fence, published.clone())
                .ack_many(std::mem::take(acks))
                .await?;
            heard = Some(PublishOnDrop(Some((Arc::clone(self), published))));
        }
        if let Some((after, step)) = plan.rebase {
            let moved = self
                .outbox
                .fenced(fence)
                .rebase_schedule(after, step.old_now, step.delta_ms)
                .await?;
            tracing::warn!(
                delta_ms = step.delta_ms,
                moved,
                "wall clock stepped; re-based the schedule of pending ops"
            );
        }
        if plan.clamp {
            let moved = self
                .outbox
                .fenced(fence)
                .clamp_schedule(now, self.retry.horizon())
                .await?;
            if moved > 0 {
                tracing::warn!(
                    moved,
                    "ops were scheduled further ahead than they may wait (written under a \
                     wall clock ahead of this one); they are due again"
                );
            }
        }
        Ok(heard)
    }

    /// Publishes settled optimistic outcomes (live, and those left undelivered
    /// by an earlier process), runs registered handlers, marks them delivered.
    pub(super) async fn deliver_outcomes(&self) -> Result<(), EngineError> {
        loop {
            let records = self.outbox.undelivered_outcomes(256).await?;
            if records.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
            for r in records {
                let (succeeded, error) = match &r.outcome {
                    crate::op::TxnOutcome::Succeeded => (true, None),
                    crate::op::TxnOutcome::Failed { error } => (false, Some(error.clone())),
                    crate::op::TxnOutcome::Pending => continue,
                };
                if succeeded {
                    self.optimistic.commit(&r.token);
                } else {
                    self.optimistic
                        .rollback(&r.token, error.as_deref().unwrap_or("failed"));
                }
                self.emit(SyncEvent::TxnSettled {
                    token: r.token,
                    succeeded,
                    error,
                });
            }
            self.outbox.mark_outcomes_delivered(ids).await?;
        }
    }
}

/// What a heard write made known, published when dropped unless disarmed:
/// held while the machine has yet to hear of the write.
struct PublishOnDrop(Option<(Arc<Inner>, Published)>);

impl PublishOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for PublishOnDrop {
    fn drop(&mut self) {
        if let Some((inner, published)) = self.0.take() {
            inner.publish(published);
        }
    }
}

/// How long until the machine's `deadline`, by the engine's clock at
/// `now`. A deadline lies at most `ACK_DELAY` ahead of a clock that does
/// not go back; the bound keeps an injected clock that did from setting
/// an alarm years away, or past what an `Instant` can hold.
fn alarm_in(deadline: Duration, now: Duration) -> Duration {
    deadline.saturating_sub(now).min(ACK_DELAY)
}

/// A lost lock is the machine's to hear; any other error ends the drain.
fn lock_lost(e: EngineError) -> Result<DrainInput, EngineError> {
    match e {
        EngineError::LockLost => Ok(DrainInput::LockLost),
        other => Err(other),
    }
}

/// The op's request, holding its payload (left `Null` in the op until the
/// caller puts it back).
fn lend_request(op: &mut PendingOp) -> OpRequest {
    OpRequest {
        kind: op.kind.mutation(),
        entity_type: op.entity_type.clone(),
        entity_id: op.entity_id.clone(),
        payload: std::mem::take(&mut op.payload),
        if_match: op.base_version,
        idempotency_key: op.idempotency_key.to_string(),
        depends_on: None,
        if_match_chained: false,
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use futures::task::{waker, ArcWake};

    use super::*;

    /// Counts the wakes of the task that polls.
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A step that finishes when `go` fires, as a response does.
    fn answered_on<'a>(go: futures::channel::oneshot::Receiver<()>, asked: usize) -> Step<'a> {
        Box::pin(async move {
            let _ = go.await;
            Ok(DrainInput::Claimed {
                asked,
                chains: Vec::new(),
            })
        })
    }

    /// One request in flight: polling for it leaves the drain task asleep
    /// until the response comes, which wakes it once. The control shows
    /// the bare set waking it at every poll as well.
    #[test]
    fn a_lone_request_wakes_the_drain_only_when_answered() {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let w = waker(wakes.clone());
        let mut cx = Context::from_waker(&w);

        let mut bare: FuturesUnordered<Step<'_>> = FuturesUnordered::new();
        let (_go, rx) = futures::channel::oneshot::channel();
        bare.push(answered_on(rx, 0));
        assert!(Box::pin(bare.next()).as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            wakes.0.swap(0, Ordering::SeqCst),
            1,
            "the control self-wakes"
        );

        let mut set = Pending::new();
        // The first poll goes through the sentinel (one wake, once a drain).
        assert!(Box::pin(set.next()).as_mut().poll(&mut cx).is_pending());
        for asked in 1..4 {
            wakes.0.store(0, Ordering::SeqCst);
            let (go, rx) = futures::channel::oneshot::channel();
            set.push(answered_on(rx, asked));
            assert!(Box::pin(set.next()).as_mut().poll(&mut cx).is_pending());
            assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "asleep while in flight");
            go.send(()).ok();
            assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken by the answer");
            match Box::pin(set.next()).as_mut().poll(&mut cx) {
                Poll::Ready(Some(Ok(DrainInput::Claimed { asked: a, .. }))) => assert_eq!(a, asked),
                other => panic!(
                    "expected step {asked}, got {:?}",
                    other.map(|o| o.is_some())
                ),
            }
        }
    }

    /// The alarm is due at the deadline, and never further ahead than
    /// `ACK_DELAY`, even when the clock went back from the end of time.
    #[test]
    fn the_alarm_is_never_set_further_than_ack_delay() {
        let at = Duration::from_secs(100);
        assert_eq!(
            alarm_in(at, at - Duration::from_millis(20)),
            Duration::from_millis(20)
        );
        assert_eq!(alarm_in(at, at + Duration::from_secs(1)), Duration::ZERO);
        let wait = alarm_in(Duration::MAX, Duration::ZERO);
        assert_eq!(wait, ACK_DELAY);
        // Would overflow (and panic) with the unbounded wait.
        let _ = tokio::time::Instant::now() + wait;
    }

    /// A result comes out as from the bare set, and the sentinel does not
    /// count as outstanding.
    #[test]
    fn results_come_out_and_the_sentinel_is_not_outstanding() {
        let w = futures::task::noop_waker();
        let mut cx = Context::from_waker(&w);
        let mut set = Pending::new();
        set.push(Box::pin(async {
            Ok(DrainInput::Claimed {
                asked: 7,
                chains: Vec::new(),
            })
        }));
        assert!(!set.is_empty());
        match Box::pin(set.next()).as_mut().poll(&mut cx) {
            Poll::Ready(Some(Ok(DrainInput::Claimed { asked: 7, .. }))) => {}
            other => panic!("expected the claim, got {:?}", other.map(|o| o.is_some())),
        }
        assert!(set.is_empty());
        assert!(Box::pin(set.next()).as_mut().poll(&mut cx).is_pending());
    }
}
