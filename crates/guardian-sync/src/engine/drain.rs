//! One drain step: claim ready ops, send them, record every outcome.

use std::collections::VecDeque;
use std::time::Duration;

use futures::future::{join_all, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt as _};
use guardian_protocol::Entity;
use serde_json::Value;

use crate::breaker::Admission;
use crate::op::{Ack, Fence, OpKind, PendingOp, Reconciled};
use crate::reconcile::{ConflictInput, Resolution};
use crate::retry::{parse_retry_after, RetryDecision};
use crate::telemetry::Counter;
use crate::transport::{Fetched, OpRequest, Outcome};

use super::run::DrainReport;
use super::{EngineError, Inner, SyncEvent};

/// What a step did.
#[derive(Debug)]
pub(super) enum Step {
    /// Ops were sent and their outcomes recorded.
    Progressed(DrainReport),
    /// Nothing is ready now.
    Idle,
    /// The breaker is open: no request may be sent for this long.
    BreakerOpen,
    /// Authentication is required; waiting for [`super::SyncEngine::resume`].
    AuthPaused,
}

/// A claimed unit on its way: one op, or one batch of ops, where ops of one
/// entity are consecutive and in order (each depends on the one before).
type Unit = Vec<PendingOp>;
/// A unit's responses: its ops, each op's dependency in the unit (see
/// [`dependency`]; empty for a lone op), each op's outcome, and the request
/// latency.
type Responses = (Unit, Vec<Option<usize>>, Vec<Outcome>, Duration);
type Recorded = Vec<Result<DrainReport, EngineError>>;
/// A claim's result: how many ops it asked for, and the chains it got.
type Claimed = Result<(usize, Vec<Chain>), EngineError>;

/// Claimed ops of one entity, in order, that travel in one unit: a lone
/// op, or (batching with dependencies) the entity's next ops behind it.
struct Chain {
    ops: Vec<PendingOp>,
    /// Their [`PendingOp::wire_size`] together (0 when not batching).
    bytes: usize,
}

/// Acks collected before they are written while requests keep flowing.
const ACK_GROUP: usize = 16;

/// An applied op whose ack is not yet written.
struct Success {
    op: PendingOp,
    entity: Option<Entity>,
    replayed: bool,
    latency: Duration,
}

/// Most batch requests in flight at once (fewer if `concurrency` is lower):
/// enough to keep a long link busy while earlier results are recorded,
/// while bounding what one device puts on the server at a time.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Fewest ops claimed ahead of the wire.
const CLAIM_AHEAD: usize = 64;

impl Inner {
    /// Drains everything ready now through a sliding window.
    ///
    /// Three kinds of work overlap instead of alternating in waves:
    /// requests in flight (at most `concurrency` ops, or
    /// up to [`MAX_BATCHES_IN_FLIGHT`] batches), recording of outcomes that came back,
    /// and claiming the next ops. An op is still claimed durably (in flight,
    /// attempts + 1) before its request is sent, but the claim happens while
    /// earlier requests are on the wire (up to [`CLAIM_AHEAD`] ops ahead),
    /// and acks of applied ops are written together, one writer job at a
    /// time, [`ACK_GROUP`] at once while requests keep flowing; the writer's
    /// group commit folds claims and acks into shared transactions. Per-entity
    /// order is untouched: only an entity's head is ever claimed, and its
    /// successor becomes the head when its ack commits (acks are written at
    /// once whenever the claimed queue runs dry, so a chain never waits).
    ///
    /// Ops claimed but not yet sent when sending must stop (breaker open,
    /// authentication required) are released as never attempted. On a
    /// cancelled drain (shutdown) they stay in flight and go back to pending
    /// when the lock is next acquired, with one attempt counted.
    pub(super) async fn step(&self, fence: &Fence) -> Result<Step, EngineError> {
        let per_unit = self.batch.map_or(1, |b| b.max_ops.max(1));
        let max_units = if per_unit > 1 {
            self.concurrency.clamp(1, MAX_BATCHES_IN_FLIGHT)
        } else {
            self.concurrency.max(1)
        };
        // Claimed ahead of the wire: a full round of single ops, or one
        // batch, so a freed slot is refilled without waiting for a commit.
        // At least CLAIM_AHEAD single ops, so even at concurrency 1 a claim
        // commit is paid once per several requests, not once per request.
        let ahead = per_unit.max(max_units).max(CLAIM_AHEAD);
        let window = max_units * per_unit + ahead;
        let mut ready: VecDeque<Chain> = VecDeque::new();
        // Ops in `ready`, all chains together.
        let mut ready_ops = 0;
        let mut requests: FuturesUnordered<BoxFuture<'_, Responses>> = FuturesUnordered::new();
        let mut records: FuturesUnordered<BoxFuture<'_, Recorded>> = FuturesUnordered::new();
        // At most one claim at a time.
        let mut claiming: FuturesUnordered<BoxFuture<'_, Claimed>> = FuturesUnordered::new();
        // Applied ops whose acks are not yet written, and the one ack write
        // in progress (acks that arrive meanwhile wait and go together).
        let mut acks: Vec<Success> = Vec::new();
        let mut flushing: FuturesUnordered<BoxFuture<'_, Recorded>> = FuturesUnordered::new();
        // The last claim found fewer ops than it asked for ...
        let mut exhausted = false;
        // ... but an outcome has come back since, which may have freed an
        // entity's next op.
        let mut maybe_more = false;
        // Sending has stopped for this drain (breaker, auth).
        let mut stop: Option<Step> = None;
        let mut total = DrainReport::default();
        let mut progressed = false;
        let mut outcomes_pending = false;
        loop {
            // Send what is claimed, as far as the window and breaker allow.
            while stop.is_none() && requests.len() < max_units && !ready.is_empty() {
                if self.auth_paused.load(std::sync::atomic::Ordering::SeqCst) {
                    stop = Some(Step::AuthPaused);
                    break;
                }
                let admission = self.breaker().allow_request(self.clock.monotonic());
                self.publish_breaker();
                let take = match admission {
                    Admission::Rejected { .. } => {
                        // Wait for what is outstanding (a trial may close the
                        // breaker); with nothing outstanding, stop.
                        if requests.is_empty() && records.is_empty() {
                            stop = Some(Step::BreakerOpen);
                        }
                        break;
                    }
                    Admission::Trial => 1,
                    Admission::Allowed => per_unit,
                };
                let unit = self.next_unit(&mut ready, take);
                ready_ops -= unit.len();
                requests.push(Box::pin(self.send_unit(unit)));
            }
            // Write the acks collected so far, unless requests are flowing
            // from claimed ops and too few have come back: then they wait
            // for more (an unwritten ack only means the request would be
            // re-sent with the same key after a crash, and replayed).
            if flushing.is_empty()
                && !acks.is_empty()
                && (acks.len() >= ACK_GROUP
                    || ready.is_empty()
                    || requests.is_empty()
                    || exhausted
                    || stop.is_some())
            {
                let batch = std::mem::take(&mut acks);
                flushing.push(Box::pin(self.flush_acks(fence, batch)));
            }
            // Claim ahead while there is room in the window.
            let deficit = window.saturating_sub(ready_ops + requests.len() * per_unit);
            // Refill once half the claimed-ahead ops are used up; when the
            // queue ran dry, try again after every outcome (an ack may have
            // made an entity's next op its head).
            let want = if exhausted {
                maybe_more && deficit > 0
            } else {
                deficit >= ahead.div_ceil(2)
            };
            if stop.is_none() && claiming.is_empty() && want {
                let idle = requests.is_empty() && records.is_empty() && ready.is_empty();
                if self.auth_paused.load(std::sync::atomic::Ordering::SeqCst) {
                    stop = Some(Step::AuthPaused);
                } else if self.breaker().is_tripped(self.clock.monotonic()) {
                    // Open, or a half-open trial is out: claim nothing more.
                    if idle {
                        stop = Some(Step::BreakerOpen);
                    }
                } else {
                    maybe_more = false;
                    let limit = deficit;
                    claiming.push(Box::pin(async move {
                        self.rebase_after_clock_step(fence).await?;
                        Ok((limit, self.claim(fence, limit, per_unit).await?))
                    }));
                }
            }
            if stop.is_some() && !ready.is_empty() {
                let ids = ready
                    .drain(..)
                    .flat_map(|chain| chain.ops)
                    .map(|op| op.op_id)
                    .collect();
                ready_ops = 0;
                self.outbox.release_claimed(fence, ids).await?;
            }
            if requests.is_empty()
                && records.is_empty()
                && claiming.is_empty()
                && ready.is_empty()
                && flushing.is_empty()
                && acks.is_empty()
            {
                break;
            }
            // Records first: their writes reach the writer thread before the
            // claim's, so the claim sees the acks' effects in the same commit.
            let mut recorded: Option<Recorded> = None;
            tokio::select! {
                biased;
                Some(results) = records.next(), if !records.is_empty() => {
                    recorded = Some(results);
                }
                Some(results) = flushing.next(), if !flushing.is_empty() => {
                    recorded = Some(results);
                }
                Some((unit, deps, outcomes, latency)) = requests.next(), if !requests.is_empty() => {
                    outcomes_pending |= unit.iter().any(|op| !op.txn_tokens.is_empty());
                    let (others, deferred) =
                        self.sort_outcomes(unit, &deps, outcomes, latency, &mut acks);
                    if !others.is_empty() {
                        maybe_more = true;
                        records.push(Box::pin(self.record_others(fence, others, latency)));
                    }
                    if !deferred.is_empty() {
                        maybe_more = true;
                        records.push(Box::pin(self.defer(fence, deferred)));
                    }
                }
                Some(claimed) = claiming.next(), if !claiming.is_empty() => {
                    let (asked, chains) = claimed?;
                    let got: usize = chains.iter().map(|c| c.ops.len()).sum();
                    exhausted = got < asked;
                    ready_ops += got;
                    ready.extend(chains);
                }
            }
            if let Some(results) = recorded {
                // Outcomes were written: an entity's next op may be ready.
                maybe_more = true;
                for r in results {
                    total.add(&r?);
                    progressed = true;
                }
                if outcomes_pending && records.is_empty() && flushing.is_empty() && acks.is_empty()
                {
                    outcomes_pending = false;
                    self.deliver_outcomes().await?;
                }
            }
        }
        self.deliver_outcomes().await?;
        if let Some(step) = stop {
            if !progressed {
                return Ok(step);
            }
        }
        Ok(if progressed {
            Step::Progressed(total)
        } else {
            Step::Idle
        })
    }

    /// Claims up to `limit` ready ops: lone ops, or, when batches may carry
    /// dependencies, each entity's head with its next ops behind it (up to a
    /// batch's worth of ops and bytes).
    async fn claim(
        &self,
        fence: &Fence,
        limit: usize,
        per_unit: usize,
    ) -> Result<Vec<Chain>, EngineError> {
        let now = self.clock.now_millis();
        let Some(batch) = self.batch.filter(|_| per_unit > 1) else {
            let ops = self.outbox.claim_ready(fence, limit, now).await?;
            return Ok(ops
                .into_iter()
                .map(|op| Chain {
                    ops: vec![op],
                    bytes: 0,
                })
                .collect());
        };
        let chains = if self.transport.batch_dependencies() {
            self.outbox
                .claim_ready_chains(fence, limit, now, per_unit, batch.max_bytes)
                .await?
        } else {
            let ops = self.outbox.claim_ready(fence, limit, now).await?;
            ops.into_iter().map(|op| vec![op]).collect()
        };
        Ok(chains
            .into_iter()
            .map(|ops| Chain {
                bytes: ops.iter().map(PendingOp::wire_size).sum(),
                ops,
            })
            .collect())
    }

    /// Takes the next unit off the claimed queue: whole chains, as many as
    /// `take` ops and the batch byte limit allow (at least one chain, so a
    /// chain is never split across units and a trial is one chain).
    fn next_unit(&self, ready: &mut VecDeque<Chain>, take: usize) -> Unit {
        let max_bytes = self.batch.map_or(usize::MAX, |b| b.max_bytes);
        let mut unit = Vec::new();
        let mut bytes = 0;
        while let Some(chain) = ready.front() {
            if !unit.is_empty()
                && (unit.len() + chain.ops.len() > take || bytes + chain.bytes > max_bytes)
            {
                break;
            }
            bytes += chain.bytes;
            if let Some(chain) = ready.pop_front() {
                if unit.is_empty() {
                    unit = chain.ops;
                } else {
                    unit.extend(chain.ops);
                }
            }
        }
        unit
    }

    /// Sends a unit: one request per op, or one batch request.
    ///
    /// The requests borrow the ops' payloads (moved out and back, not
    /// copied): a payload is needed again only if the outcome is a conflict.
    async fn send_unit(&self, unit: Unit) -> Responses {
        let mut unit = unit;
        self.metrics.add(Counter::Sent, unit.len() as u64);
        let started = self.clock.monotonic();
        let mut deps = Vec::new();
        let outcomes = if unit.len() > 1 {
            deps = (0..unit.len()).map(|i| dependency(&unit, i)).collect();
            let requests: Vec<OpRequest> = unit
                .iter_mut()
                .zip(deps.iter().copied())
                .map(|(op, depends_on)| {
                    let mut request = Self::lend_request(op);
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
                let request = Self::lend_request(op);
                outcomes.push(self.transport.send(&request).await);
                op.payload = request.payload;
            }
            outcomes
        };
        let latency = self.clock.monotonic().saturating_sub(started);
        (unit, deps, outcomes, latency)
    }

    /// Splits a unit's outcomes: successes join `acks` (the breaker hears
    /// of them at once); ops not applied because their predecessor in the
    /// batch was not are returned second, to go back to the queue; everything
    /// else is returned first, for [`Self::handle`].
    ///
    /// A dependency failure is believed only when the op's predecessor in
    /// the unit really did not succeed; otherwise it is a protocol error (a
    /// server that answered it for nothing would otherwise have the op
    /// released and re-sent at once, forever).
    fn sort_outcomes(
        &self,
        unit: Unit,
        deps: &[Option<usize>],
        outcomes: Vec<Outcome>,
        latency: Duration,
        acks: &mut Vec<Success>,
    ) -> (Vec<(PendingOp, Outcome)>, Vec<PendingOp>) {
        let mut outcomes = outcomes;
        self.count_whole_failure_once(&mut outcomes);
        let mut others = Vec::new();
        let mut deferred = Vec::new();
        let mut successes = 0;
        // Which ops succeeded, for their dependents (none for a lone op).
        let mut succeeded = vec![false; deps.len()];
        for (i, (op, outcome)) in unit.into_iter().zip(outcomes).enumerate() {
            let (entity, replayed) = match outcome {
                Outcome::Applied { entity, replayed } => (entity, replayed),
                Outcome::AlreadyGone => (None, false),
                Outcome::DependencyFailed => {
                    match deps.get(i).copied().flatten() {
                        Some(dep) if !succeeded.get(dep).copied().unwrap_or(false) => {
                            deferred.push(op);
                        }
                        _ => others.push((
                            op,
                            protocol_error(
                                "dependency failure reported for an op without a failed dependency",
                            ),
                        )),
                    }
                    continue;
                }
                other => {
                    others.push((op, other));
                    continue;
                }
            };
            if let Some(s) = succeeded.get_mut(i) {
                *s = true;
            }
            successes += 1;
            acks.push(Success {
                op,
                entity,
                replayed,
                latency,
            });
        }
        if successes > 0 {
            let now = self.clock.monotonic();
            let mut breaker = self.breaker();
            for _ in 0..successes {
                breaker.record_success(now);
            }
            drop(breaker);
            self.publish_breaker();
        }
        (others, deferred)
    }

    /// A batch request that failed as a whole (network, timeout, 5xx) is one
    /// failure of the server, not one per op: the breaker hears of it once,
    /// here, and the ops' own outcomes no longer count. Otherwise a single
    /// lost response to a batch of ten ops would open the breaker.
    fn count_whole_failure_once(&self, outcomes: &mut [Outcome]) {
        let Some((first, rest)) = outcomes.split_first() else {
            return;
        };
        let Outcome::Retryable {
            retry_after,
            counts_for_breaker: true,
            ..
        } = first
        else {
            return;
        };
        if rest.is_empty() || rest.iter().any(|o| o != first) {
            return;
        }
        let retry_after = retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, self.clock.now_millis()));
        self.breaker()
            .record_failure(self.clock.monotonic(), retry_after.map(|r| r.delay()));
        self.publish_breaker();
        for outcome in outcomes.iter_mut() {
            if let Outcome::Retryable {
                counts_for_breaker, ..
            } = outcome
            {
                *counts_for_breaker = false;
            }
        }
    }

    /// Puts ops back in the queue that were not applied because their
    /// predecessor in the same batch was not: not an attempt (the server
    /// recorded nothing under their keys), so they are released as if never
    /// claimed and go out again after their predecessor.
    async fn defer(&self, fence: &Fence, ops: Vec<PendingOp>) -> Recorded {
        let n = ops.len();
        let ids = ops.iter().map(|op| op.op_id).collect();
        if let Err(e) = self.outbox.release_claimed(fence, ids).await {
            return vec![Err(e.into())];
        }
        self.metrics.add(Counter::Deferred, n as u64);
        vec![Ok(DrainReport {
            sent: n as u64,
            deferred: n as u64,
            ..DrainReport::default()
        })]
    }

    /// Records outcomes other than success, concurrently, so the outbox's
    /// group commit writes them together.
    async fn record_others(
        &self,
        fence: &Fence,
        others: Vec<(PendingOp, Outcome)>,
        latency: Duration,
    ) -> Recorded {
        join_all(
            others.into_iter().map(|(op, outcome)| async move {
                self.handle(fence, &op, outcome, latency).await
            }),
        )
        .await
    }

    /// Writes collected acks in one writer job, then reports them.
    ///
    /// The entities' data moves into the acks (it is only needed there, for
    /// version chaining), so nothing is copied.
    async fn flush_acks(&self, fence: &Fence, batch: Vec<Success>) -> Recorded {
        let mut acks = Vec::with_capacity(batch.len());
        let mut done = Vec::with_capacity(batch.len());
        for s in batch {
            let (version, data) = match s.entity {
                Some(e) => (Some(e.version), Some(e.data)),
                None => (None, None),
            };
            acks.push((s.op.op_id, Ack { version, data }));
            done.push((s.op, version, s.replayed, s.latency));
        }
        if let Err(e) = self.outbox.ack_many(fence, acks).await {
            return vec![Err(EngineError::from(e))];
        }
        let n = done.len() as u64;
        self.metrics.add(Counter::Succeeded, n);
        for (op, version, replayed, latency) in done {
            self.metrics.record_latency(latency);
            self.emit(SyncEvent::OpSucceeded {
                op_id: op.op_id,
                entity_type: op.entity_type,
                entity_id: op.entity_id,
                version,
                replayed,
            });
        }
        vec![Ok(DrainReport {
            sent: n,
            succeeded: n,
            ..DrainReport::default()
        })]
    }

    /// Keeps stored backoffs their length across wall-clock steps: a step
    /// seen by this runner re-bases the schedule by its size; then stored
    /// times further ahead than they may wait (written by any process before
    /// a step back, seen or not) are clamped, at the start of each session,
    /// after a step, and at most once a heartbeat interval otherwise (it
    /// reads every head in backoff). Both use one reading of the clock, and
    /// the re-base goes first, so no step is taken out twice.
    async fn rebase_after_clock_step(&self, fence: &Fence) -> Result<(), EngineError> {
        let now = self.clock.now_millis();
        let mono = self.clock.monotonic();
        let step = self
            .clock_watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(now, mono);
        if let Some(step) = step {
            // Ops not yet due in the old timeline move by the step. After a
            // step back, ops that were already due would look due far in the
            // future: they move too (anything due after the new "now").
            let after = step.old_now.saturating_add(step.delta_ms.min(0));
            let moved = self
                .outbox
                .rebase_schedule(fence, after, step.old_now, step.delta_ms)
                .await?;
            tracing::warn!(
                delta_ms = step.delta_ms,
                moved,
                "wall clock stepped; re-based the schedule of pending ops"
            );
        }
        let clamp = {
            let mut last = self
                .schedule_clamped_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = step.is_some()
                || last.is_none_or(|at| mono.saturating_sub(at) >= self.lock.heartbeat_interval);
            if due {
                *last = Some(mono);
            }
            due
        };
        if clamp {
            let moved = self
                .outbox
                .clamp_schedule(fence, now, self.retry.horizon())
                .await?;
            if moved > 0 {
                tracing::warn!(
                    moved,
                    "ops were scheduled further ahead than they may wait (written under a \
                     wall clock ahead of this one); they are due again"
                );
            }
        }
        Ok(())
    }

    /// The op's request, holding its payload (left `Null` in the op until
    /// the caller puts it back).
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

    /// Records one outcome (DESIGN §4).
    async fn handle(
        &self,
        fence: &Fence,
        op: &PendingOp,
        outcome: Outcome,
        latency: Duration,
    ) -> Result<DrainReport, EngineError> {
        let mut report = DrainReport {
            sent: 1,
            ..DrainReport::default()
        };
        let now_mono = self.clock.monotonic();
        match outcome {
            Outcome::Applied { entity, replayed } => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.incr(Counter::Succeeded);
                self.metrics.record_latency(latency);
                self.ack(fence, op, entity.as_ref(), replayed).await?;
                report.succeeded = 1;
            }
            Outcome::AlreadyGone => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.incr(Counter::Succeeded);
                self.metrics.record_latency(latency);
                self.ack(fence, op, None, false).await?;
                report.succeeded = 1;
            }
            Outcome::Conflict { problem } => {
                // A conflict says the server is healthy.
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.record_latency(latency);
                let current = match problem.current {
                    Some(e) => Fetched::Present(e),
                    None => match self.transport.fetch(&op.entity_type, &op.entity_id).await {
                        Ok(f) => f,
                        Err(failure) => {
                            // Could not learn the server state: retry the
                            // same request later (it was not applied).
                            return self
                                .retry_or_fail(
                                    fence,
                                    op,
                                    failure_detail(&failure),
                                    None,
                                    &mut report,
                                )
                                .await;
                        }
                    },
                };
                self.reconcile(fence, op, current, &mut report).await?;
            }
            Outcome::Retryable {
                retry_after,
                detail,
                counts_for_breaker,
                ..
            } => {
                let now = self.clock.now_millis();
                let retry_after = retry_after.and_then(|v| parse_retry_after(&v, now));
                if counts_for_breaker {
                    self.breaker()
                        .record_failure(now_mono, retry_after.map(|r| r.delay()));
                    self.publish_breaker();
                }
                self.retry_or_fail(fence, op, detail, retry_after, &mut report)
                    .await?;
            }
            Outcome::AuthRequired => {
                self.auth_paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.outbox
                    .retry_later(
                        fence,
                        op.op_id,
                        self.clock.now_millis(),
                        "authentication required",
                    )
                    .await?;
                self.emit(SyncEvent::AuthRequired);
            }
            // Sorted out before handling when the op had a failed
            // dependency; anything else is a server breaking the protocol.
            Outcome::DependencyFailed => {
                return Box::pin(self.handle(
                    fence,
                    op,
                    protocol_error("dependency failure reported for a lone request"),
                    latency,
                ))
                .await;
            }
            Outcome::Permanent { detail, .. } => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.fail(fence, op, &detail).await?;
                report.failed = 1;
            }
        }
        Ok(report)
    }

    async fn ack(
        &self,
        fence: &Fence,
        op: &PendingOp,
        entity: Option<&Entity>,
        replayed: bool,
    ) -> Result<(), EngineError> {
        let version = entity.map(|e| e.version);
        self.outbox
            .ack(
                fence,
                op.op_id,
                Ack {
                    version,
                    data: entity.map(|e| e.data.clone()),
                },
            )
            .await?;
        self.emit(SyncEvent::OpSucceeded {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            version,
            replayed,
        });
        Ok(())
    }

    async fn fail(&self, fence: &Fence, op: &PendingOp, error: &str) -> Result<(), EngineError> {
        self.outbox.fail(fence, op.op_id, error).await?;
        self.metrics.incr(Counter::Failed);
        tracing::info!(op = %op.op_id, entity_type = %op.entity_type, "op failed permanently: {error}");
        self.emit(SyncEvent::OpFailed {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            error: error.to_owned(),
        });
        Ok(())
    }

    async fn retry_or_fail(
        &self,
        fence: &Fence,
        op: &PendingOp,
        detail: String,
        retry_after: Option<crate::retry::RetryAfter>,
        report: &mut DrainReport,
    ) -> Result<DrainReport, EngineError> {
        let now = self.clock.now_millis();
        // Decided before any await: the thread-local RNG is not `Send`.
        let decision = self
            .retry
            .schedule(op.attempts, retry_after, now, &mut rand::rng());
        match decision {
            RetryDecision::RetryAt(at) => {
                self.outbox
                    .retry_later(fence, op.op_id, at, &detail)
                    .await?;
                self.metrics.incr(Counter::Retried);
                report.retried += 1;
                self.emit(SyncEvent::OpRetried {
                    op_id: op.op_id,
                    attempts: op.attempts,
                    next_attempt_at: at,
                    reason: detail,
                });
            }
            RetryDecision::GiveUp => {
                let error = format!("gave up after {} attempts: {detail}", op.attempts);
                self.fail(fence, op, &error).await?;
                report.failed += 1;
            }
        }
        Ok(*report)
    }

    async fn reconcile(
        &self,
        fence: &Fence,
        op: &PendingOp,
        current: Fetched,
        report: &mut DrainReport,
    ) -> Result<(), EngineError> {
        // A tombstone (deleted flag, or a 410 without a body) is not the same
        // as "absent": a CREATE or UPDATE against it must not loop.
        let tombstone;
        let entity = match &current {
            Fetched::Present(e) => Some(e),
            Fetched::Absent => None,
            Fetched::Deleted => {
                tombstone = Entity {
                    entity_type: op.entity_type.clone(),
                    id: op.entity_id.clone(),
                    version: 0,
                    data: Value::Null,
                    updated_at: String::new(),
                    deleted: true,
                };
                Some(&tombstone)
            }
        };
        let resolution = self.reconciler.decide(&ConflictInput {
            kind: op.kind.mutation(),
            entity_type: &op.entity_type,
            payload: &op.payload,
            base: op.base.as_ref(),
            current: entity,
            reconciliations: op.reconciliations,
        });
        let remote = entity.map_or(Value::Null, |e| e.data.clone());
        let event = |resolved: Value, resolution: &str| SyncEvent::Conflict {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            local: op.payload.clone(),
            remote: remote.clone(),
            resolved,
            resolution: resolution.to_owned(),
        };
        match resolution {
            Resolution::Retry {
                send_as,
                payload,
                if_match,
                base,
                conflicts,
            } => {
                let detail = format!(
                    "conflict at version {}; merged ({} field conflict(s)), retrying{}",
                    if_match.map_or_else(|| "?".to_owned(), |v| v.to_string()),
                    conflicts.len(),
                    if send_as == op.kind.mutation() {
                        String::new()
                    } else {
                        format!(" as {}", send_as.as_str())
                    },
                );
                self.outbox
                    .reconciled(
                        fence,
                        op.op_id,
                        Reconciled {
                            kind: Some(OpKind::from_mutation(send_as)),
                            payload: payload.clone(),
                            base,
                            base_version: if_match,
                            detail,
                        },
                    )
                    .await?;
                self.metrics.incr(Counter::ConflictsResolved);
                report.conflicts_resolved += 1;
                self.emit(event(payload, "retry"));
            }
            Resolution::Succeeded { version, data, .. } => {
                self.metrics.incr(Counter::ConflictsResolved);
                self.outbox
                    .ack(fence, op.op_id, Ack { version, data })
                    .await?;
                report.succeeded += 1;
                self.emit(event(Value::Null, "succeeded"));
                self.emit(SyncEvent::OpSucceeded {
                    op_id: op.op_id,
                    entity_type: op.entity_type.clone(),
                    entity_id: op.entity_id.clone(),
                    version,
                    replayed: false,
                });
            }
            Resolution::Fail {
                reason,
                local,
                remote,
            } => {
                // Both versions are kept in the error for the app.
                let error = serde_json::json!({
                    "conflict": reason,
                    "local": local,
                    "remote": remote,
                })
                .to_string();
                self.fail(fence, op, &error).await?;
                report.failed += 1;
                self.emit(event(Value::Null, "failed"));
            }
        }
        Ok(())
    }

    /// Publishes queued breaker transitions as events and metrics.
    pub(super) fn publish_breaker(&self) {
        let transitions = self.breaker().take_transitions();
        for t in transitions {
            self.metrics.record_breaker_transition(&t);
            tracing::info!("circuit breaker {} -> {}", t.from.name(), t.to.name());
            self.emit(SyncEvent::Breaker {
                from: t.from.name().to_owned(),
                to: t.to.name().to_owned(),
            });
        }
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

fn failure_detail(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Retryable { detail, .. } | Outcome::Permanent { detail, .. } => {
            format!("fetching the current entity failed: {detail}")
        }
        Outcome::AuthRequired => "fetching the current entity needs authentication".into(),
        other => format!("fetching the current entity failed: {other:?}"),
    }
}

/// The index of the op before `i` in `unit` when it is of the same entity:
/// chains are consecutive in a unit, so that op is `i`'s predecessor, and
/// `i` must not be applied unless it was.
fn dependency(unit: &[PendingOp], i: usize) -> Option<usize> {
    let prev = unit.get(i.checked_sub(1)?)?;
    let op = unit.get(i)?;
    (prev.entity_type == op.entity_type && prev.entity_id == op.entity_id).then(|| i - 1)
}

/// A response the protocol does not allow, as the transport classifies one.
fn protocol_error(detail: &str) -> Outcome {
    Outcome::Retryable {
        reason: crate::transport::RetryReason::Protocol,
        status: None,
        retry_after: None,
        detail: detail.to_owned(),
        counts_for_breaker: true,
    }
}
