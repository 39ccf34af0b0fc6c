//! The drain as a state machine.
//!
//! [`DrainMachine::step`] takes what happened (ops claimed, responses,
//! finished writes, a fetched entity) with the time and the shared pure
//! state ([`Env`]), and returns what to do next as [`DrainCommand`]s. The
//! driver carries them out and feeds back their results; it decides
//! nothing. The machine's own state changes only when a result comes back:
//! an op's success is reported, and counted in the [`DrainReport`], only
//! after its ack is written.
//!
//! Three kinds of work overlap instead of alternating in waves: requests in
//! flight (at most `concurrency` ops, or up to [`MAX_BATCHES_IN_FLIGHT`]
//! batches), recording of outcomes that came back, and claiming the next
//! ops. An op is claimed durably (in flight, attempts + 1) before its
//! request is sent, but the claim happens while earlier requests are on the
//! wire (up to [`CLAIM_AHEAD`] ops ahead), and acks of applied ops are
//! written together, [`ACK_GROUP`] at once, while requests keep flowing.
//! Per-entity order is untouched: only an entity's head is ever claimed, and
//! its successor becomes the head when its ack commits (acks are written at
//! once whenever the claimed queue runs dry, so a chain never waits).
//!
//! Ops claimed but not yet sent when sending must stop (breaker open,
//! authentication required, the app stopping) are released as never
//! attempted. On [`DrainInput::Stop`] the requests and fetches in flight are
//! abandoned, but outcomes already received are still written and published
//! before the drain finishes: an op acknowledged in the outbox always has
//! its event.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use guardian_protocol::Entity;
use serde::Serialize;
use serde_json::Value;

use crate::breaker::{Admission, CircuitBreaker};
use crate::op::{Ack, OpId, OpKind, PendingOp, Reconciled};
use crate::reconcile::{ConflictInput, FailReason, Reconciler, Resolution};
use crate::retry::{parse_retry_after, RetryAfter, RetryDecision, RetryPolicy};
use crate::telemetry::{Counter, SyncMetrics};

use super::events::{ConflictOutcome, SyncEvent};
use super::mutant::{self, Mutant};
use super::outcome::{Fetched, Outcome, Stored};

/// Batching: several ready ops of distinct entities in one `POST /v1/batch`.
///
/// With batching on, `concurrency` bounds batch requests in flight, at most
/// [`MAX_BATCHES_IN_FLIGHT`] at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most ops per batch request.
    pub max_ops: usize,
    /// Most payload bytes per batch request (the server's body limit is 1 MiB).
    pub max_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_ops: 100,
            max_bytes: 512 * 1024,
        }
    }
}

/// What one drain (or one run) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Requests sent (a batch counts each op).
    pub sent: u64,
    /// Ops applied (acknowledged and deleted).
    pub succeeded: u64,
    /// Ops that failed permanently (kept as `failed`).
    pub failed: u64,
    /// Attempts that will be retried.
    pub retried: u64,
    /// Conflicts reconciled into a new request.
    pub conflicts_resolved: u64,
    /// Batch ops not applied because their predecessor in the batch was not,
    /// put back in the queue behind it (not counted as attempts).
    pub deferred: u64,
}

impl DrainReport {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Self) {
        self.sent += other.sent;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.retried += other.retried;
        self.conflicts_resolved += other.conflicts_resolved;
        self.deferred += other.deferred;
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Ops were sent and their outcomes recorded.
    Progressed(DrainReport),
    /// Nothing is ready now.
    Idle,
    /// The breaker is open: no request may be sent for now.
    BreakerOpen,
    /// Authentication is required; waiting for the app to resume.
    AuthPaused,
    /// Another runner took the lock: nothing more was written.
    LockLost,
    /// The app asked the drain to stop ([`DrainInput::Stop`]).
    Stopped,
}

/// Most batch requests in flight at once (fewer if `concurrency` is lower):
/// enough to keep a long link busy while earlier results are recorded,
/// while bounding what one device puts on the server at a time.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Fewest ops claimed ahead of the wire.
pub const CLAIM_AHEAD: usize = 64;

/// Acks collected before they are written while requests keep flowing.
pub const ACK_GROUP: usize = 32;

/// Longest an applied op's ack (and so its event) waits for its group to
/// fill (see [`DrainMachine::deadline`]): on a slow link 32 answers take
/// 32 round trips.
pub const ACK_DELAY: Duration = Duration::from_millis(50);

/// The drain's shape, fixed for one drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// Most ops per request.
    per_unit: usize,
    /// Most requests in flight.
    max_units: usize,
    /// Ops claimed ahead of the wire.
    ahead: usize,
    /// Most ops claimed and not yet answered.
    window: usize,
    /// Most payload bytes per batch request.
    max_bytes: usize,
    /// Batches may carry an entity's next ops behind its head.
    chains: bool,
    /// Largest payload the outbox stores: a merge larger than this fails
    /// its op instead of being written.
    max_payload: usize,
}

impl DrainConfig {
    /// The shape for `concurrency` requests, or batches as `batch` says;
    /// `chains` when the transport honors dependencies inside a batch.
    pub fn new(concurrency: usize, batch: Option<BatchConfig>, chains: bool) -> Self {
        let per_unit = batch.map_or(1, |b| b.max_ops.max(1));
        let max_units = if per_unit > 1 {
            concurrency.clamp(1, MAX_BATCHES_IN_FLIGHT)
        } else {
            concurrency.max(1)
        };
        // A full round of single ops, or one batch, so a freed slot is
        // refilled without waiting for a commit; at least CLAIM_AHEAD, so
        // even at concurrency 1 a claim commit is paid once per several
        // requests.
        let ahead = per_unit.max(max_units).max(CLAIM_AHEAD);
        Self {
            per_unit,
            max_units,
            ahead,
            // Saturating: a batch size near `usize::MAX` is a setting, not a bug.
            window: max_units.saturating_mul(per_unit).saturating_add(ahead),
            max_bytes: batch.map_or(usize::MAX, |b| b.max_bytes),
            chains: per_unit > 1 && chains,
            max_payload: usize::MAX,
        }
    }

    /// The outbox's payload limit (`OutboxOptions::max_payload_bytes`);
    /// none by default.
    #[must_use]
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

/// The shared state and time a step decides with.
pub struct Env<'a> {
    /// Wall clock, Unix ms.
    pub now_ms: i64,
    /// Monotonic clock.
    pub mono: Duration,
    /// The app has not resumed since the server last refused the token.
    pub auth_paused: bool,
    /// The engine's breaker.
    pub breaker: &'a mut CircuitBreaker,
    /// How long to back off.
    pub retry: &'a RetryPolicy,
    /// How to settle conflicts.
    pub reconciler: &'a Reconciler,
    /// Where counters go.
    pub metrics: &'a SyncMetrics,
    /// Jitter.
    pub rng: &'a mut dyn rand::RngCore,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("now_ms", &self.now_ms)
            .field("mono", &self.mono)
            .field("auth_paused", &self.auth_paused)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

/// Identifies a [`DrainCommand::Write`] in its [`DrainInput::Written`].
pub type WriteId = u64;

/// One fenced write to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Applied ops: acknowledge (delete) them, chaining their versions.
    Ack(Vec<(OpId, Ack)>),
    /// Send again at `at` (Unix ms), same key.
    RetryAt {
        /// The op.
        op_id: OpId,
        /// When.
        at: i64,
        /// Why the attempt failed.
        detail: String,
    },
    /// Keep the op as failed.
    Fail {
        /// The op.
        op_id: OpId,
        /// Why.
        error: String,
    },
    /// A reconciled retry: a new request with a new key.
    Reconciled {
        /// The op.
        op_id: OpId,
        /// What to send instead.
        reconciled: Reconciled,
    },
    /// Back to the queue as never attempted.
    Release(Vec<OpId>),
    /// A transaction's ops: send again at `at` (Unix ms), same keys.
    RetryTxnAt {
        /// Its ops.
        op_ids: Vec<OpId>,
        /// When.
        at: i64,
        /// Why the attempt failed.
        detail: String,
    },
    /// A transaction's ops kept as failed, each with its error.
    FailTxn(Vec<(OpId, String)>),
    /// A reconciled op of a transaction; the others go back to pending
    /// with it, so the whole transaction is sent again.
    ReconciledInTxn {
        /// The op.
        op_id: OpId,
        /// What to send instead.
        reconciled: Reconciled,
        /// The transaction's other ops.
        others: Vec<OpId>,
        /// Ops of `others` chained on the op (directly or through each
        /// other), with their edits moved onto its merge: what they send
        /// instead, under a new key.
        rebased: Vec<(OpId, Value)>,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum DrainCommand {
    /// Claim up to `limit` ready ops (each entity's head, with its next ops
    /// behind it when `chains`, up to `per_unit` and the batch byte limit),
    /// then answer [`DrainInput::Claimed`].
    Claim {
        /// Most ops.
        limit: usize,
        /// Most ops per chain.
        per_unit: usize,
        /// Claim chains rather than lone heads.
        chains: bool,
        /// Applied ops to acknowledge first, in the same transaction (one
        /// commit for both, and the claim sees the heads they make); empty
        /// for none. Their events wait for [`DrainInput::Claimed`].
        acks: Vec<(OpId, Ack)>,
        /// What the acks' commit makes known (empty for none), should it
        /// land unheard.
        published: Published,
    },
    /// Send these ops: one request, or one batch where `deps[i]` is the
    /// index of op `i`'s predecessor in the unit; then answer
    /// [`DrainInput::Responded`].
    Send {
        /// The ops.
        unit: Vec<PendingOp>,
        /// Dependencies inside the batch (empty for a lone op).
        deps: Vec<Option<usize>>,
    },
    /// Fetch the server's current entity for a conflict, then answer
    /// [`DrainInput::Fetched`].
    Fetch {
        /// The conflicted op.
        op: Box<PendingOp>,
        /// The request's latency.
        latency: Duration,
    },
    /// Write to the outbox, fenced; then answer [`DrainInput::Written`].
    /// A failed write ends the drain with its error.
    Write {
        /// For the answer.
        id: WriteId,
        /// What to write.
        write: Write,
        /// What its commit makes known, should it land unheard.
        published: Published,
    },
    /// Release claimed, unsent ops now (nothing to answer).
    Release(Vec<OpId>),
    /// The server refused the token: pause until the app resumes.
    PauseAuth,
    /// Publish an event.
    Emit(SyncEvent),
    /// Settle optimistic transactions whose ops are all settled.
    DeliverOutcomes,
    /// The drain is over.
    Finish(DrainEnd),
}

/// What happened, for [`DrainMachine::step`].
#[derive(Debug, Clone, PartialEq)]
pub enum DrainInput {
    /// A [`DrainCommand::Claim`] asked for `asked` ops and got these chains.
    Claimed {
        /// The claim's limit.
        asked: usize,
        /// Each entity's ops, in order.
        chains: Vec<Vec<PendingOp>>,
    },
    /// A [`DrainCommand::Send`] came back.
    Responded {
        /// The ops sent.
        unit: Vec<PendingOp>,
        /// As in the command.
        deps: Vec<Option<usize>>,
        /// One per op.
        outcomes: Vec<Outcome>,
        /// How long the request took.
        latency: Duration,
    },
    /// A [`DrainCommand::Fetch`] came back.
    Fetched {
        /// The conflicted op.
        op: Box<PendingOp>,
        /// The request's latency.
        latency: Duration,
        /// What the server has, or why it could not be learned.
        result: Result<Fetched, Outcome>,
    },
    /// A [`DrainCommand::Write`] committed.
    Written {
        /// The command's id.
        id: WriteId,
    },
    /// A fenced write or claim was refused: another runner holds the lock.
    LockLost,
    /// The app is stopping: send and fetch nothing more, and finish once
    /// what was received is written. The driver drops the requests and
    /// fetches in flight; their ops stay in flight in the outbox and go
    /// back to pending when the lock is next acquired.
    Stop,
}

/// An outcome that did not apply the op: what `DrainMachine::handle`
/// decides on (successes and deferred dependents never reach it).
#[derive(Debug)]
enum NotApplied {
    /// 409/412: reconcile.
    Conflict(Box<guardian_protocol::Problem>),
    /// Transient: the same request, same key, later.
    Retryable {
        retry_after: Option<String>,
        detail: String,
        counts_for_breaker: bool,
    },
    /// The token was refused after a refresh.
    AuthRequired,
    /// Will never succeed as is.
    Permanent(String),
}

impl NotApplied {
    /// An answer the protocol does not allow, retried like any transient
    /// failure of the server.
    fn protocol(detail: &str) -> Self {
        Self::Retryable {
            retry_after: None,
            detail: detail.to_owned(),
            counts_for_breaker: true,
        }
    }
}

/// Claimed ops of one entity, in order, that travel in one unit; or the
/// ops of one atomic transaction, which travel alone.
#[derive(Debug)]
struct Chain {
    ops: Vec<PendingOp>,
    /// Their wire size together (0 when not batching).
    bytes: usize,
}

impl Chain {
    fn atomic(&self) -> bool {
        self.ops.first().is_some_and(|op| op.txn.is_some())
    }
}

/// What a write's commit makes known outside the drain: its events, in
/// order, and its metrics. The machine publishes them on
/// [`DrainInput::Written`]; a command carries a copy with its write so the
/// driver can publish them itself if the commit lands after the drain was
/// abandoned (a stop past its grace), when no `Written` comes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    /// Events to emit.
    pub events: Vec<SyncEvent>,
    /// Counters to add to.
    pub counters: Vec<(Counter, u64)>,
    /// Request latencies to record.
    pub latencies: Vec<Duration>,
}

impl Published {
    /// Nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.counters.is_empty() && self.latencies.is_empty()
    }
}

/// What a write's commit makes true: reported, counted and published only
/// then.
#[derive(Debug, Default)]
struct AfterWrite {
    report: DrainReport,
    events: Vec<SyncEvent>,
    counters: Vec<(Counter, u64)>,
    latencies: Vec<Duration>,
    /// The ack group's write.
    flush: bool,
}

impl AfterWrite {
    fn published(&self) -> Published {
        Published {
            events: self.events.clone(),
            counters: self.counters.clone(),
            latencies: self.latencies.clone(),
        }
    }
}

/// An applied op whose ack is not yet written.
#[derive(Debug)]
struct Success {
    op: PendingOp,
    stored: Stored,
    replayed: bool,
    latency: Duration,
    /// Published after the op's own event (a transaction's, on its last op).
    then: Option<SyncEvent>,
}

/// One drain, from its first claim to its [`DrainCommand::Finish`].
#[derive(Debug)]
pub struct DrainMachine {
    cfg: DrainConfig,
    ready: VecDeque<Chain>,
    /// Ops in `ready`, all chains together.
    ready_ops: usize,
    /// Requests in flight.
    requests: usize,
    /// Outcome writes in flight (not the ack group).
    records: usize,
    /// Conflict fetches in flight.
    fetches: usize,
    /// The ack group's write is in flight.
    flushing: bool,
    claiming: bool,
    /// Applied ops whose acks wait to be written together.
    acks: Vec<Success>,
    /// The ack group riding in the claim in flight.
    claim_acks: Option<WriteId>,
    /// When the oldest of `acks` came back (monotonic).
    oldest_ack: Option<Duration>,
    /// The last claim found fewer ops than it asked for ...
    exhausted: bool,
    /// ... but an outcome has come back since, which may have freed an
    /// entity's next op.
    maybe_more: bool,
    /// Sending has stopped for this drain.
    stop: Option<DrainEnd>,
    /// The server refused the token during this drain.
    auth_refused: bool,
    total: DrainReport,
    progressed: bool,
    /// Ops carrying optimistic tokens were answered: settle them once their
    /// writes are done.
    outcomes_pending: bool,
    next_write: WriteId,
    after: BTreeMap<WriteId, AfterWrite>,
    /// The other ops of transactions whose conflicted op waits for a fetch.
    txn_waiting: BTreeMap<uuid::Uuid, Vec<PendingOp>>,
    finished: bool,
}

impl DrainMachine {
    /// A drain of this shape; its first [`Self::step`] claims.
    pub fn new(cfg: DrainConfig) -> Self {
        Self {
            cfg,
            ready: VecDeque::new(),
            ready_ops: 0,
            requests: 0,
            records: 0,
            fetches: 0,
            flushing: false,
            claiming: false,
            acks: Vec::new(),
            claim_acks: None,
            oldest_ack: None,
            exhausted: false,
            maybe_more: false,
            stop: None,
            auth_refused: false,
            total: DrainReport::default(),
            progressed: false,
            outcomes_pending: false,
            next_write: 0,
            after: BTreeMap::new(),
            txn_waiting: BTreeMap::new(),
            finished: false,
        }
    }

    /// Takes in what happened (nothing on the first call, or once
    /// [`Self::deadline`] has passed) and returns what to do now. After
    /// [`DrainCommand::Finish`] it returns nothing more.
    pub fn step(&mut self, input: Option<DrainInput>, env: &mut Env<'_>) -> Vec<DrainCommand> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if matches!(input, Some(DrainInput::LockLost)) {
            // Nothing more may be written, and what was not written did
            // not happen: no event, no report.
            self.finished = true;
            out.push(DrainCommand::Finish(DrainEnd::LockLost));
            return out;
        }
        if let Some(input) = input {
            self.take(input, env, &mut out);
        }
        self.schedule(env, &mut out);
        out
    }

    /// When the machine must step (with no input) even if nothing comes
    /// back: once the oldest collected ack has waited [`ACK_DELAY`], on the
    /// monotonic clock of [`Env::mono`]. `None` while a claim or an ack
    /// write in flight will step it first, or when no ack waits. Without
    /// it, acks behind a request that hangs would wait for its timeout.
    pub fn deadline(&self) -> Option<Duration> {
        if self.finished || self.claiming || self.flushing || self.acks.is_empty() {
            return None;
        }
        self.acks_stale_at()
    }

    /// When the oldest collected ack will have waited [`ACK_DELAY`].
    fn acks_stale_at(&self) -> Option<Duration> {
        self.oldest_ack.map(|at| at.saturating_add(ACK_DELAY))
    }

    /// How the drain ends, given what it did so far.
    pub fn verdict(&self) -> DrainEnd {
        match self.stop {
            Some(stop) if !self.progressed => stop,
            _ if self.progressed => DrainEnd::Progressed(self.total),
            _ => DrainEnd::Idle,
        }
    }

    fn take(&mut self, input: DrainInput, env: &mut Env<'_>, out: &mut Vec<DrainCommand>) {
        match input {
            DrainInput::Claimed { asked, chains } => {
                self.claiming = false;
                if let Some(id) = self.claim_acks.take() {
                    // Committed with the claim, which already saw the heads
                    // these acks made: no new op to look for on their account.
                    self.written(id, false, env, out);
                }
                let got: usize = chains.iter().map(Vec::len).sum();
                self.exhausted = got < asked;
                self.ready_ops += got;
                let batching = self.cfg.per_unit > 1;
                self.ready.extend(chains.into_iter().map(|ops| Chain {
                    bytes: if batching {
                        ops.iter().map(PendingOp::wire_size).sum()
                    } else {
                        0
                    },
                    ops,
                }));
            }
            DrainInput::Responded {
                unit,
                deps,
                outcomes,
                latency,
            } => {
                self.requests = self.requests.saturating_sub(1);
                if mutant::active(Mutant::AckBeforeResponse) {
                    return;
                }
                self.outcomes_pending |= unit.iter().any(|op| !op.txn_tokens.is_empty());
                if unit.first().is_some_and(|op| op.txn.is_some()) {
                    self.txn_responded(unit, outcomes, latency, env, out);
                } else {
                    self.responded(unit, &deps, outcomes, latency, env, out);
                }
                if !self.acks.is_empty() {
                    self.oldest_ack.get_or_insert(env.mono);
                }
            }
            DrainInput::Fetched {
                op,
                latency: _,
                result,
            } => {
                self.fetches = self.fetches.saturating_sub(1);
                if let Some(txn) = op.txn {
                    let others = self.txn_waiting.remove(&txn.id).unwrap_or_default();
                    match result {
                        Ok(current) => self.txn_reconcile(*op, others, current, env, out),
                        Err(failure) => {
                            let mut unit = others;
                            unit.push(*op);
                            unit.sort_by_key(|op| op.seq);
                            self.txn_retry_or_fail(unit, fetch_failure(&failure), None, env, out);
                        }
                    }
                    return;
                }
                match result {
                    Ok(current) => self.reconcile(*op, current, env, out),
                    // Could not learn the server state: retry the same
                    // request later (it was not applied).
                    Err(failure) => {
                        let detail = fetch_failure(&failure);
                        self.retry_or_fail(*op, detail, None, DrainReport::sent(), env, out);
                    }
                }
            }
            DrainInput::LockLost => {}
            DrainInput::Stop => {
                self.stop.get_or_insert(DrainEnd::Stopped);
                self.requests = 0;
                self.fetches = 0;
                self.txn_waiting.clear();
            }
            DrainInput::Written { id } => self.written(id, true, env, out),
        }
    }

    /// A write committed: count, record and publish what it made true.
    /// `more`: it may have made an entity's next op ready.
    fn written(&mut self, id: WriteId, more: bool, env: &mut Env<'_>, out: &mut Vec<DrainCommand>) {
        let Some(after) = self.after.remove(&id) else {
            return;
        };
        if after.flush {
            self.flushing = false;
        } else {
            self.records = self.records.saturating_sub(1);
        }
        self.maybe_more |= more;
        self.total.add(&after.report);
        self.progressed = true;
        for (counter, n) in after.counters {
            env.metrics.add(counter, n);
        }
        for latency in after.latencies {
            env.metrics.record_latency(latency);
        }
        out.extend(after.events.into_iter().map(DrainCommand::Emit));
        if self.outcomes_pending
            && self.records == 0
            && self.fetches == 0
            && !self.flushing
            && self.acks.is_empty()
        {
            self.outcomes_pending = false;
            out.push(DrainCommand::DeliverOutcomes);
        }
    }

    /// Sends, writes the ack group, claims, or finishes, as the window and
    /// the breaker allow.
    fn schedule(&mut self, env: &mut Env<'_>, out: &mut Vec<DrainCommand>) {
        let cfg = self.cfg;
        while self.stop.is_none() && self.requests < cfg.max_units && !self.ready.is_empty() {
            if self.auth_paused(env) {
                self.stop = Some(DrainEnd::AuthPaused);
                break;
            }
            let admission = env.breaker.allow_request(env.mono);
            publish_breaker(env, out);
            let take = match admission {
                Admission::Rejected { .. } => {
                    // Wait for what is outstanding (a trial may close the
                    // breaker); with nothing outstanding, stop.
                    if self.requests == 0 && self.records == 0 && self.fetches == 0 {
                        self.stop = Some(DrainEnd::BreakerOpen);
                    }
                    break;
                }
                Admission::Trial => 1,
                Admission::Allowed => cfg.per_unit,
            };
            let unit = self.next_unit(take);
            self.ready_ops -= unit.len();
            self.requests += 1;
            env.metrics.add(Counter::Sent, unit.len() as u64);
            let deps = if unit.len() > 1 {
                (0..unit.len()).map(|i| dependency(&unit, i)).collect()
            } else {
                Vec::new()
            };
            if mutant::active(Mutant::AckBeforeResponse) {
                let acks = unit.iter().map(|op| (op.op_id, Ack::default())).collect();
                self.write(Write::Ack(acks), AfterWrite::default(), out);
            }
            out.push(DrainCommand::Send { unit, deps });
        }
        // The acks collected so far are written with the next claim, or on
        // their own once ACK_GROUP have come back or the oldest has waited
        // ACK_DELAY (or nothing else is flowing). Until then they wait: an
        // unwritten ack only means the request would be re-sent with the
        // same key after a crash, and replayed. Once the queue ran dry, an
        // ack may free its entity's next op, but that op would queue behind
        // the claimed ops anyway: only an empty queue makes it pressing.
        let stale = self.acks_stale_at().is_some_and(|at| env.mono >= at);
        let pressing = self.ready.is_empty() || self.requests == 0 || self.stop.is_some();
        let acks_due = !self.flushing
            && !self.acks.is_empty()
            && (self.acks.len() >= ACK_GROUP || stale || pressing);
        let deficit = cfg.window.saturating_sub(
            self.ready_ops
                .saturating_add(self.requests.saturating_mul(cfg.per_unit)),
        );
        // Refill once half the claimed-ahead ops are used up, or with a due
        // ack group when there is any room (claims and ack groups then stay
        // in step, one commit for both); when the queue ran dry, try again
        // with every due ack group and after every other outcome (either may
        // have made an entity's next op its head).
        let want = if self.exhausted {
            (self.maybe_more || acks_due) && deficit > 0
        } else {
            deficit >= cfg.ahead.div_ceil(2) || (acks_due && deficit > 0)
        };
        let mut claimed = false;
        if self.stop.is_none() && !self.claiming && want {
            let idle = self.requests == 0
                && self.records == 0
                && self.fetches == 0
                && self.ready.is_empty();
            if self.auth_paused(env) {
                self.stop = Some(DrainEnd::AuthPaused);
            } else if env.breaker.is_tripped(env.mono) {
                // Open, or a half-open trial is out: claim nothing more.
                if idle {
                    self.stop = Some(DrainEnd::BreakerOpen);
                }
            } else {
                let (acks, published) = if !self.flushing && !self.acks.is_empty() {
                    let (acks, after) = self.ack_group();
                    let published = after.published();
                    self.claim_acks = Some(self.register(after));
                    (acks, published)
                } else {
                    (Vec::new(), Published::default())
                };
                self.maybe_more = false;
                self.claiming = true;
                claimed = true;
                out.push(DrainCommand::Claim {
                    limit: deficit,
                    per_unit: cfg.per_unit,
                    chains: cfg.chains,
                    acks,
                    published,
                });
            }
        }
        // A group due for its size or age waits for a claim in flight, to
        // ride in the next one.
        if acks_due && !claimed && (!self.claiming || pressing) {
            self.flush(out);
        }
        if self.stop.is_some() && !self.ready.is_empty() {
            let ids = self
                .ready
                .drain(..)
                .flat_map(|chain| chain.ops)
                .map(|op| op.op_id)
                .collect();
            self.ready_ops = 0;
            out.push(DrainCommand::Release(ids));
        }
        if self.requests == 0
            && self.records == 0
            && self.fetches == 0
            && !self.claiming
            && self.ready.is_empty()
            && !self.flushing
            && self.acks.is_empty()
        {
            self.finished = true;
            out.push(DrainCommand::DeliverOutcomes);
            out.push(DrainCommand::Finish(self.verdict()));
        }
    }

    fn auth_paused(&self, env: &Env<'_>) -> bool {
        env.auth_paused || self.auth_refused
    }

    /// Takes the next unit off the claimed queue: whole chains, as many as
    /// `take` ops and the batch byte limit allow (at least one chain, so a
    /// chain is never split across units and a trial is one chain).
    fn next_unit(&mut self, take: usize) -> Vec<PendingOp> {
        let mut unit = Vec::new();
        let mut bytes = 0;
        while let Some(chain) = self.ready.front() {
            if !unit.is_empty()
                && (chain.atomic()
                    || unit.len() + chain.ops.len() > take
                    || bytes + chain.bytes > self.cfg.max_bytes)
            {
                break;
            }
            let atomic = chain.atomic();
            bytes += chain.bytes;
            if let Some(chain) = self.ready.pop_front() {
                if unit.is_empty() {
                    unit = chain.ops;
                } else {
                    unit.extend(chain.ops);
                }
            }
            if atomic {
                break;
            }
        }
        unit
    }

    /// Issues a write; `after` comes true when it commits.
    fn write(&mut self, write: Write, after: AfterWrite, out: &mut Vec<DrainCommand>) {
        let published = after.published();
        let id = self.register(after);
        out.push(DrainCommand::Write {
            id,
            write,
            published,
        });
    }

    /// Books a write in flight: what its commit makes true, under a new id.
    fn register(&mut self, after: AfterWrite) -> WriteId {
        let id = self.next_write;
        self.next_write += 1;
        if after.flush {
            self.flushing = true;
        } else {
            self.records += 1;
        }
        self.after.insert(id, after);
        id
    }

    /// Writes the collected acks in one write.
    fn flush(&mut self, out: &mut Vec<DrainCommand>) {
        let (acks, after) = self.ack_group();
        self.write(Write::Ack(acks), after, out);
    }

    /// The collected acks as one write, and what its commit makes true.
    fn ack_group(&mut self) -> (Vec<(OpId, Ack)>, AfterWrite) {
        self.oldest_ack = None;
        let batch = std::mem::take(&mut self.acks);
        let n = batch.len() as u64;
        let mut acks = Vec::with_capacity(batch.len());
        let mut after = AfterWrite {
            report: DrainReport {
                sent: n,
                succeeded: n,
                ..DrainReport::default()
            },
            counters: vec![(Counter::Succeeded, n)],
            flush: true,
            ..AfterWrite::default()
        };
        for mut s in batch {
            // The entity's data moves into the ack (it is only needed there,
            // for version chaining); stored as sent, it is the op's payload,
            // which the op no longer needs.
            let (version, data) = match s.stored {
                Stored::Entity(e) => (Some(e.version), Some(e.data)),
                Stored::AsSent { version } => {
                    (Some(version), Some(std::mem::take(&mut s.op.payload)))
                }
                Stored::Nothing => (None, None),
            };
            acks.push((s.op.op_id, Ack { version, data }));
            after.latencies.push(s.latency);
            after.events.push(succeeded(s.op, version, s.replayed));
            after.events.extend(s.then);
        }
        (acks, after)
    }

    /// Splits a unit's outcomes: successes join the ack group (the breaker
    /// hears of them at once); ops not applied because their predecessor in
    /// the batch was not go back to the queue; everything else is handled.
    ///
    /// A dependency failure is believed only when the op's predecessor in
    /// the unit really did not succeed, or succeeded but was stored with
    /// other data than it sent (a chained op must merge onto that, see
    /// `send_in_order`); otherwise it is a protocol error (a server that
    /// answered it for nothing would otherwise have the op released and
    /// re-sent at once, forever).
    fn responded(
        &mut self,
        unit: Vec<PendingOp>,
        deps: &[Option<usize>],
        mut outcomes: Vec<Outcome>,
        latency: Duration,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        count_whole_failure_once(&mut outcomes, env, out);
        let mut deferred = Vec::new();
        let mut successes = 0;
        let mut succeeded = vec![false; deps.len()];
        let mut changed = vec![false; deps.len()];
        let mut others = Vec::new();
        // A server answering fewer outcomes than ops broke the protocol: the
        // ops without one are retried like any malformed answer.
        let mut outcomes = outcomes.into_iter();
        for (i, op) in unit.into_iter().enumerate() {
            let outcome = outcomes
                .next()
                .unwrap_or_else(|| Outcome::protocol(None, "no outcome for an op of the batch"));
            let (stored, replayed) = match outcome {
                Outcome::Applied { stored, replayed } => (stored, replayed),
                Outcome::AlreadyGone => (Stored::Nothing, false),
                Outcome::DependencyFailed => {
                    match deps.get(i).copied().flatten() {
                        Some(dep)
                            if !succeeded.get(dep).copied().unwrap_or(false)
                                || changed.get(dep).copied().unwrap_or(false) =>
                        {
                            deferred.push(op);
                        }
                        _ => others.push((
                            op,
                            NotApplied::protocol(
                                "dependency failure reported for an op without a failed dependency",
                            ),
                        )),
                    }
                    continue;
                }
                Outcome::Conflict { problem } => {
                    others.push((op, NotApplied::Conflict(problem)));
                    continue;
                }
                Outcome::Retryable {
                    retry_after,
                    detail,
                    counts_for_breaker,
                    ..
                } => {
                    let failure = NotApplied::Retryable {
                        retry_after,
                        detail,
                        counts_for_breaker,
                    };
                    others.push((op, failure));
                    continue;
                }
                Outcome::AuthRequired => {
                    others.push((op, NotApplied::AuthRequired));
                    continue;
                }
                Outcome::Permanent { detail, .. } => {
                    others.push((op, NotApplied::Permanent(detail)));
                    continue;
                }
            };
            if let Some(s) = succeeded.get_mut(i) {
                *s = true;
            }
            if let Some(c) = changed.get_mut(i) {
                *c = stored.differs_from(&op.payload);
            }
            successes += 1;
            self.acks.push(Success {
                op,
                stored,
                replayed,
                latency,
                then: None,
            });
        }
        if successes > 0 {
            for _ in 0..successes {
                env.breaker.record_success(env.mono);
            }
            publish_breaker(env, out);
        }
        for (op, outcome) in others {
            self.maybe_more = true;
            self.handle(op, outcome, latency, env, out);
        }
        if !deferred.is_empty() {
            // Not an attempt: the server recorded nothing under their keys.
            self.maybe_more = true;
            let n = deferred.len() as u64;
            let ids = deferred.iter().map(|op| op.op_id).collect();
            let after = AfterWrite {
                report: DrainReport {
                    sent: n,
                    deferred: n,
                    ..DrainReport::default()
                },
                counters: vec![(Counter::Deferred, n)],
                ..AfterWrite::default()
            };
            self.write(Write::Release(ids), after, out);
        }
    }

    /// Decides on one outcome other than success (DESIGN §4).
    fn handle(
        &mut self,
        op: PendingOp,
        outcome: NotApplied,
        latency: Duration,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        match outcome {
            // A conflict says the server is healthy.
            NotApplied::Conflict(problem) => {
                env.breaker.record_success(env.mono);
                publish_breaker(env, out);
                env.metrics.record_latency(latency);
                match problem.current {
                    Some(e) => self.reconcile(op, Fetched::Present(e), env, out),
                    None => {
                        self.fetches += 1;
                        out.push(DrainCommand::Fetch {
                            op: Box::new(op),
                            latency,
                        });
                    }
                }
            }
            NotApplied::Retryable {
                retry_after,
                detail,
                counts_for_breaker,
            } => {
                let retry_after = retry_after.and_then(|v| parse_retry_after(&v, env.now_ms));
                if counts_for_breaker {
                    env.breaker
                        .record_failure(env.mono, retry_after.map(|r| r.delay()));
                    publish_breaker(env, out);
                }
                self.retry_or_fail(op, detail, retry_after, DrainReport::sent(), env, out);
            }
            NotApplied::AuthRequired => {
                self.auth_refused = true;
                out.push(DrainCommand::PauseAuth);
                let after = AfterWrite {
                    report: DrainReport::sent(),
                    events: vec![SyncEvent::AuthRequired],
                    ..AfterWrite::default()
                };
                let write = Write::RetryAt {
                    op_id: op.op_id,
                    at: env.now_ms,
                    detail: "authentication required".to_owned(),
                };
                self.write(write, after, out);
            }
            NotApplied::Permanent(detail) => {
                env.breaker.record_success(env.mono);
                publish_breaker(env, out);
                let mut report = DrainReport::sent();
                report.failed = 1;
                self.fail(op, detail, report, Vec::new(), out);
            }
        }
    }

    /// Keeps the op as failed; `events` go out before its `OpFailed`.
    fn fail(
        &mut self,
        op: PendingOp,
        error: String,
        report: DrainReport,
        mut events: Vec<SyncEvent>,
        out: &mut Vec<DrainCommand>,
    ) {
        tracing::info!(op = %op.op_id, entity_type = %op.entity_type, "op failed permanently: {error}");
        events.insert(
            0,
            SyncEvent::OpFailed {
                op_id: op.op_id,
                entity_type: op.entity_type,
                entity_id: op.entity_id,
                error: error.clone(),
            },
        );
        let after = AfterWrite {
            report,
            events,
            counters: vec![(Counter::Failed, 1)],
            ..AfterWrite::default()
        };
        self.write(
            Write::Fail {
                op_id: op.op_id,
                error,
            },
            after,
            out,
        );
    }

    fn retry_or_fail(
        &mut self,
        op: PendingOp,
        detail: String,
        retry_after: Option<RetryAfter>,
        mut report: DrainReport,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        let decision = env
            .retry
            .schedule(op.attempts, retry_after, env.now_ms, &mut env.rng);
        match decision {
            RetryDecision::RetryAt(at) => {
                report.retried += 1;
                let after = AfterWrite {
                    report,
                    events: vec![SyncEvent::OpRetried {
                        op_id: op.op_id,
                        attempts: op.attempts,
                        next_attempt_at: at,
                        reason: detail.clone(),
                    }],
                    counters: vec![(Counter::Retried, 1)],
                    ..AfterWrite::default()
                };
                let write = Write::RetryAt {
                    op_id: op.op_id,
                    at,
                    detail,
                };
                self.write(write, after, out);
            }
            RetryDecision::GiveUp => {
                let error = format!("gave up after {} attempts: {detail}", op.attempts);
                report.failed += 1;
                self.fail(op, error, report, Vec::new(), out);
            }
        }
    }

    fn reconcile(
        &mut self,
        op: PendingOp,
        current: Fetched,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        let (resolution, remote) = decide_conflict(&op, current, env);
        let resolution = self.within_limit(&op, resolution);
        let event = |resolved: Value, resolution: ConflictOutcome| SyncEvent::Conflict {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            local: op.payload.clone(),
            remote: remote.clone(),
            resolved,
            resolution,
        };
        let mut report = DrainReport::sent();
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
                report.conflicts_resolved = 1;
                let after = AfterWrite {
                    report,
                    events: vec![event(payload.clone(), ConflictOutcome::Retry)],
                    counters: vec![(Counter::ConflictsResolved, 1)],
                    ..AfterWrite::default()
                };
                let write = Write::Reconciled {
                    op_id: op.op_id,
                    reconciled: Reconciled {
                        kind: Some(OpKind::from_mutation(send_as)),
                        payload,
                        base,
                        base_version: if_match,
                        detail,
                    },
                };
                self.write(write, after, out);
            }
            Resolution::Succeeded { version, data, .. } => {
                report.succeeded = 1;
                let conflict = event(Value::Null, ConflictOutcome::Succeeded);
                let after = AfterWrite {
                    report,
                    events: vec![conflict, succeeded(op.clone(), version, false)],
                    counters: vec![(Counter::ConflictsResolved, 1)],
                    ..AfterWrite::default()
                };
                let write = Write::Ack(vec![(op.op_id, Ack { version, data })]);
                self.write(write, after, out);
            }
            Resolution::Fail {
                reason,
                local,
                remote,
            } => {
                let error = conflict_error(reason, &local, remote.as_ref());
                report.failed = 1;
                let conflict = event(Value::Null, ConflictOutcome::Failed);
                self.fail(op, error, report, vec![conflict], out);
            }
        }
    }
}

impl DrainMachine {
    /// True if the outbox would refuse `v` as a payload.
    fn too_large(&self, v: &Value) -> bool {
        serde_json::to_string(v).map_or(true, |t| t.len() > self.cfg.max_payload)
    }

    /// A merged payload the outbox would refuse to store (larger than its
    /// payload limit: the server's entity may be as large as the server
    /// allows) fails the op instead of failing every drain. The error keeps
    /// the op's own payload; the server's side, too large to keep, stays
    /// on the server. The base is not limited (the outbox stores it as it
    /// comes), so a delete of a large entity still goes through.
    fn within_limit(&self, op: &PendingOp, resolution: Resolution) -> Resolution {
        match resolution {
            Resolution::Retry { payload, .. } if self.too_large(&payload) => Resolution::Fail {
                reason: FailReason::MergeTooLarge,
                local: op.payload.clone(),
                remote: None,
            },
            other => other,
        }
    }
}

/// Ops claimed one by one, as the units a drain sends: a transaction's ops
/// (a claim returns them together, in order) as one, any other op alone.
pub fn units(ops: Vec<PendingOp>) -> Vec<Vec<PendingOp>> {
    let mut out: Vec<Vec<PendingOp>> = Vec::with_capacity(ops.len());
    for op in ops {
        let txn = op.txn.map(|t| t.id);
        match out.last_mut() {
            Some(last)
                if txn.is_some() && last.first().and_then(|o| o.txn).map(|t| t.id) == txn =>
            {
                last.push(op);
            }
            _ => out.push(vec![op]),
        }
    }
    out
}

/// What one transaction's answer means.
enum TxnVerdict {
    /// What each op's answer says the server stored, and whether it was
    /// replayed.
    Committed(Vec<(Stored, bool)>),
    /// The whole request failed alike for every op (nothing applied).
    Whole(NotApplied),
    /// This op was refused, so nothing was applied.
    Refused(usize, NotApplied),
}

impl DrainMachine {
    /// Decides on an atomic transaction's outcomes: all applied, or none
    /// (a refused op, or a failure of the whole request). It is retried,
    /// reconciled or failed as one, and its writes change all its ops in
    /// one commit.
    fn txn_responded(
        &mut self,
        unit: Vec<PendingOp>,
        mut outcomes: Vec<Outcome>,
        latency: Duration,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        count_whole_failure_once(&mut outcomes, env, out);
        self.maybe_more = true;
        match txn_verdict(&unit, outcomes) {
            TxnVerdict::Committed(entities) => {
                let n = unit.len();
                let txn_id = unit.first().and_then(|op| op.txn).map(|t| t.id);
                for _ in 0..n {
                    env.breaker.record_success(env.mono);
                }
                publish_breaker(env, out);
                let all_replayed = entities.iter().all(|(_, r)| *r);
                // Acks of one response are written in one commit (the
                // group is flushed whole), so the transaction's ops leave
                // the outbox together.
                for (i, (op, (stored, replayed))) in unit.into_iter().zip(entities).enumerate() {
                    let then = (i + 1 == n).then_some(()).and(txn_id).map(|txn_id| {
                        SyncEvent::TransactionCommitted {
                            txn_id,
                            ops: n,
                            replayed: all_replayed,
                        }
                    });
                    self.acks.push(Success {
                        op,
                        stored,
                        replayed,
                        latency,
                        then,
                    });
                }
            }
            TxnVerdict::Whole(failure) => {
                self.txn_not_applied(unit, None, failure, latency, env, out);
            }
            TxnVerdict::Refused(i, failure) => {
                self.txn_not_applied(unit, Some(i), failure, latency, env, out);
            }
        }
    }

    fn txn_not_applied(
        &mut self,
        mut unit: Vec<PendingOp>,
        refused: Option<usize>,
        failure: NotApplied,
        latency: Duration,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        match failure {
            NotApplied::Conflict(problem) => {
                env.breaker.record_success(env.mono);
                publish_breaker(env, out);
                env.metrics.record_latency(latency);
                let i = refused.unwrap_or(0);
                if i >= unit.len() {
                    return;
                }
                let op = unit.remove(i);
                match problem.current {
                    Some(e) => self.txn_reconcile(op, unit, Fetched::Present(e), env, out),
                    None => {
                        if let Some(txn) = op.txn {
                            self.txn_waiting.insert(txn.id, unit);
                        }
                        self.fetches += 1;
                        out.push(DrainCommand::Fetch {
                            op: Box::new(op),
                            latency,
                        });
                    }
                }
            }
            NotApplied::Retryable {
                retry_after,
                detail,
                counts_for_breaker,
            } => {
                let retry_after = retry_after.and_then(|v| parse_retry_after(&v, env.now_ms));
                if counts_for_breaker {
                    env.breaker
                        .record_failure(env.mono, retry_after.map(|r| r.delay()));
                    publish_breaker(env, out);
                }
                self.txn_retry_or_fail(unit, detail, retry_after, env, out);
            }
            NotApplied::AuthRequired => {
                self.auth_refused = true;
                out.push(DrainCommand::PauseAuth);
                let after = AfterWrite {
                    report: DrainReport::sent_n(unit.len()),
                    events: vec![SyncEvent::AuthRequired],
                    ..AfterWrite::default()
                };
                let write = Write::RetryTxnAt {
                    op_ids: unit.iter().map(|op| op.op_id).collect(),
                    at: env.now_ms,
                    detail: "authentication required".to_owned(),
                };
                self.write(write, after, out);
            }
            NotApplied::Permanent(detail) => {
                env.breaker.record_success(env.mono);
                publish_breaker(env, out);
                let culprit = refused.and_then(|i| unit.get(i)).map(|op| op.op_id);
                self.txn_fail(unit, culprit, detail, Vec::new(), out);
            }
        }
    }

    /// Retries the transaction at its backoff (its first op's attempts),
    /// or fails it once the budget is spent.
    fn txn_retry_or_fail(
        &mut self,
        unit: Vec<PendingOp>,
        detail: String,
        retry_after: Option<RetryAfter>,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        let attempts = unit.iter().map(|op| op.attempts).max().unwrap_or(0);
        match env
            .retry
            .schedule(attempts, retry_after, env.now_ms, &mut env.rng)
        {
            RetryDecision::RetryAt(at) => {
                let n = unit.len();
                let mut report = DrainReport::sent_n(n);
                report.retried = n as u64;
                let events = unit
                    .iter()
                    .map(|op| SyncEvent::OpRetried {
                        op_id: op.op_id,
                        attempts: op.attempts,
                        next_attempt_at: at,
                        reason: detail.clone(),
                    })
                    .collect();
                let after = AfterWrite {
                    report,
                    events,
                    counters: vec![(Counter::Retried, n as u64)],
                    ..AfterWrite::default()
                };
                let write = Write::RetryTxnAt {
                    op_ids: unit.iter().map(|op| op.op_id).collect(),
                    at,
                    detail,
                };
                self.write(write, after, out);
            }
            RetryDecision::GiveUp => {
                let error = format!("gave up after {attempts} attempts: {detail}");
                self.txn_fail(unit, None, error, Vec::new(), out);
            }
        }
    }

    /// Fails the whole transaction: `culprit` (the refused op) keeps
    /// `error`, the others say the transaction was aborted because of it.
    fn txn_fail(
        &mut self,
        unit: Vec<PendingOp>,
        culprit: Option<OpId>,
        error: String,
        mut events: Vec<SyncEvent>,
        out: &mut Vec<DrainCommand>,
    ) {
        let Some(txn) = unit.first().and_then(|op| op.txn) else {
            return;
        };
        tracing::info!(txn = %txn.id, ops = unit.len(), "transaction failed permanently: {error}");
        let n = unit.len();
        let mut failures = Vec::with_capacity(n);
        for op in unit {
            let own = match culprit {
                Some(c) if c != op.op_id => {
                    format!("transaction {} aborted: op {c} failed: {error}", txn.id)
                }
                _ => error.clone(),
            };
            events.push(SyncEvent::OpFailed {
                op_id: op.op_id,
                entity_type: op.entity_type,
                entity_id: op.entity_id,
                error: own.clone(),
            });
            failures.push((op.op_id, own));
        }
        events.push(SyncEvent::TransactionFailed {
            txn_id: txn.id,
            error,
        });
        let mut report = DrainReport::sent_n(n);
        report.failed = n as u64;
        let after = AfterWrite {
            report,
            events,
            counters: vec![(Counter::Failed, n as u64)],
            ..AfterWrite::default()
        };
        self.write(Write::FailTxn(failures), after, out);
    }

    /// Settles a conflict on one op of a transaction with the entity type's
    /// policy: the merged op and the rest of the transaction are sent again
    /// together, or the whole transaction fails. Never half-applied: an op
    /// whose effect the server already has is sent again as an update of
    /// the current version (a delete of a deleted entity fails the
    /// transaction), so the transaction stays whole.
    fn txn_reconcile(
        &mut self,
        op: PendingOp,
        others: Vec<PendingOp>,
        current: Fetched,
        env: &mut Env<'_>,
        out: &mut Vec<DrainCommand>,
    ) {
        let (resolution, remote) = decide_conflict(&op, current, env);
        let resolution = self.within_limit(&op, resolution);
        let conflict = |resolved: Value, resolution: ConflictOutcome| SyncEvent::Conflict {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            local: op.payload.clone(),
            remote: remote.clone(),
            resolved,
            resolution,
        };
        let retry = match resolution {
            Resolution::Retry {
                send_as,
                payload,
                if_match,
                base,
                conflicts,
            } => Ok((send_as, payload, if_match, base, conflicts.len())),
            Resolution::Succeeded { version, .. } if op.kind != OpKind::Delete => Ok((
                guardian_protocol::MutationKind::Update,
                op.payload.clone(),
                version,
                None,
                0,
            )),
            Resolution::Succeeded { .. } => Err(
                "the entity is already deleted; the transaction cannot apply as a whole".to_owned(),
            ),
            Resolution::Fail {
                reason,
                local,
                remote,
            } => Err(conflict_error(reason, &local, remote.as_ref())),
        };
        // A chained op moved onto the merge must fit the outbox too.
        let retry = retry.and_then(|(send_as, payload, if_match, base, conflicts)| {
            let rebased = rebase_chained(&op, &payload, &others, env);
            if rebased.iter().any(|(_, v)| self.too_large(v)) {
                Err(conflict_error(FailReason::MergeTooLarge, &op.payload, None))
            } else {
                Ok((send_as, payload, if_match, base, conflicts, rebased))
            }
        });
        let (send_as, payload, if_match, base, conflicts, rebased) = match retry {
            Ok(retry) => retry,
            Err(error) => {
                let event = conflict(Value::Null, ConflictOutcome::Failed);
                let mut unit = others;
                let culprit = op.op_id;
                unit.push(op);
                unit.sort_by_key(|op| op.seq);
                self.txn_fail(unit, Some(culprit), error, vec![event], out);
                return;
            }
        };
        let detail = format!(
            "conflict at version {} in transaction; merged ({conflicts} field conflict(s)), \
             retrying the transaction",
            if_match.map_or_else(|| "?".to_owned(), |v| v.to_string()),
        );
        let n = others.len() + 1;
        let mut report = DrainReport::sent_n(n);
        report.conflicts_resolved = 1;
        let after = AfterWrite {
            report,
            events: vec![conflict(payload.clone(), ConflictOutcome::Retry)],
            counters: vec![(Counter::ConflictsResolved, 1)],
            ..AfterWrite::default()
        };
        let write = Write::ReconciledInTxn {
            op_id: op.op_id,
            reconciled: Reconciled {
                kind: Some(OpKind::from_mutation(send_as)),
                payload,
                base,
                base_version: if_match,
                detail,
            },
            others: others.iter().map(|o| o.op_id).collect(),
            rebased,
        };
        self.write(write, after, out);
    }
}

/// The error kept on an op whose conflict failed: the reason and both
/// versions, for the app.
fn conflict_error(reason: FailReason, local: &Value, remote: Option<&Value>) -> String {
    serde_json::json!({
        "conflict": reason,
        "local": local,
        "remote": remote,
    })
    .to_string()
}

/// The ops of a transaction chained on `op` (same entity, after it, each
/// taking its `If-Match` from the one before), each edit moved onto what
/// the one before it now sends: `op`'s merge is no longer the view they
/// were made from, and sent as they are they would lay that view back over
/// the server's change. Only those that change are returned.
fn rebase_chained(
    op: &PendingOp,
    merged: &Value,
    others: &[PendingOp],
    env: &Env<'_>,
) -> Vec<(OpId, Value)> {
    let mut chain: Vec<&PendingOp> = others
        .iter()
        .filter(|o| {
            o.seq > op.seq && o.entity_type == op.entity_type && o.entity_id == op.entity_id
        })
        .collect();
    chain.sort_by_key(|o| o.seq);
    let mut rebased = Vec::new();
    let (mut before, mut after) = (&op.payload, merged.clone());
    for o in chain {
        if !o.chained || o.kind == OpKind::Delete {
            break;
        }
        let moved = env
            .reconciler
            .rebase(&o.entity_type, before, &o.payload, &after);
        before = &o.payload;
        if !guardian_protocol::json_eq(&moved, &o.payload) {
            rebased.push((o.op_id, moved.clone()));
        }
        after = moved;
    }
    rebased
}

/// The entity type's policy on a conflict of `op` with what the server
/// has; returns its resolution and the server's data (for the event).
fn decide_conflict(op: &PendingOp, current: Fetched, env: &Env<'_>) -> (Resolution, Value) {
    // A tombstone (deleted flag, or a 410 without a body) is not the same
    // as "absent": a CREATE or UPDATE against it must not loop.
    let entity = match current {
        Fetched::Present(e) => Some(e),
        Fetched::Absent => None,
        Fetched::Deleted => Some(Entity {
            entity_type: op.entity_type.clone(),
            id: op.entity_id.clone(),
            version: 0,
            data: Value::Null,
            updated_at: String::new(),
            deleted: true,
        }),
    };
    let resolution = env.reconciler.decide(&ConflictInput {
        kind: op.kind.mutation(),
        entity_type: &op.entity_type,
        payload: &op.payload,
        base: op.base.as_ref(),
        current: entity.as_ref(),
        reconciliations: op.reconciliations,
    });
    (resolution, entity.map_or(Value::Null, |e| e.data))
}

/// Reads a transaction's outcomes: committed only if every op applied.
fn txn_verdict(unit: &[PendingOp], outcomes: Vec<Outcome>) -> TxnVerdict {
    let n = unit.len();
    let mut applied = Vec::with_capacity(n);
    let mut outcomes = outcomes.into_iter();
    for i in 0..n {
        let outcome = outcomes
            .next()
            .unwrap_or_else(|| Outcome::protocol(None, "no outcome for an op of the transaction"));
        match outcome {
            Outcome::Applied { stored, replayed } => applied.push((stored, replayed)),
            Outcome::DependencyFailed => {}
            Outcome::Conflict { problem } => {
                return TxnVerdict::Refused(i, NotApplied::Conflict(problem));
            }
            Outcome::AlreadyGone => {
                return TxnVerdict::Refused(
                    i,
                    NotApplied::Permanent(
                        "the entity is already deleted; the transaction cannot apply as a whole"
                            .into(),
                    ),
                );
            }
            Outcome::Permanent { detail, .. } => {
                return TxnVerdict::Refused(i, NotApplied::Permanent(detail));
            }
            Outcome::AuthRequired => return TxnVerdict::Whole(NotApplied::AuthRequired),
            Outcome::Retryable {
                retry_after,
                detail,
                counts_for_breaker,
                ..
            } => {
                // Whole or for one op, nothing was applied: the same
                // transaction goes again later.
                return TxnVerdict::Whole(NotApplied::Retryable {
                    retry_after,
                    detail,
                    counts_for_breaker,
                });
            }
        }
    }
    if applied.len() == n {
        TxnVerdict::Committed(applied)
    } else {
        // Every op "not applied because of another", none refused: the
        // server broke the protocol.
        TxnVerdict::Whole(NotApplied::protocol(
            "transaction aborted without a refused op",
        ))
    }
}

impl DrainReport {
    /// One op sent, nothing else yet.
    fn sent() -> Self {
        Self::sent_n(1)
    }

    /// `n` ops sent, nothing else yet.
    fn sent_n(n: usize) -> Self {
        Self {
            sent: n as u64,
            ..Self::default()
        }
    }
}

/// The event for an applied op.
fn succeeded(op: PendingOp, version: Option<u64>, replayed: bool) -> SyncEvent {
    SyncEvent::OpSucceeded {
        op_id: op.op_id,
        entity_type: op.entity_type,
        entity_id: op.entity_id,
        version,
        replayed,
    }
}

/// Publishes the breaker's queued transitions as events and metrics.
fn publish_breaker(env: &mut Env<'_>, out: &mut Vec<DrainCommand>) {
    out.extend(
        breaker_events(env.breaker, env.metrics)
            .into_iter()
            .map(DrainCommand::Emit),
    );
}

/// The breaker's queued transitions, recorded in `metrics`, as events.
fn breaker_events(breaker: &mut CircuitBreaker, metrics: &SyncMetrics) -> Vec<SyncEvent> {
    breaker
        .take_transitions()
        .into_iter()
        .map(|t| {
            metrics.record_breaker_transition(&t);
            tracing::info!("circuit breaker {} -> {}", t.from.name(), t.to.name());
            SyncEvent::Breaker {
                from: t.from.phase(),
                to: t.to.phase(),
            }
        })
        .collect()
}

/// A batch request that failed as a whole (network, timeout, 5xx) is one
/// failure of the server, not one per op: the breaker hears of it once,
/// here, and the ops' own outcomes no longer count. Otherwise a single lost
/// response to a batch of ten ops would open the breaker.
fn count_whole_failure_once(
    outcomes: &mut [Outcome],
    env: &mut Env<'_>,
    out: &mut Vec<DrainCommand>,
) {
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
        .and_then(|v| parse_retry_after(v, env.now_ms));
    env.breaker
        .record_failure(env.mono, retry_after.map(|r| r.delay()));
    publish_breaker(env, out);
    for outcome in outcomes.iter_mut() {
        if let Outcome::Retryable {
            counts_for_breaker, ..
        } = outcome
        {
            *counts_for_breaker = false;
        }
    }
}

fn fetch_failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Retryable { detail, .. } | Outcome::Permanent { detail, .. } => {
            format!("fetching the current entity failed: {detail}")
        }
        Outcome::AuthRequired => "fetching the current entity needs authentication".into(),
        other => format!("fetching the current entity failed: {other:?}"),
    }
}

/// The index of the last op before `i` in `unit` on the same entity: `i`'s
/// predecessor, which must be applied before it (and whose version it
/// chains on). In a batch an entity's ops are consecutive; in a
/// transaction they may be interleaved with other entities'.
fn dependency(unit: &[PendingOp], i: usize) -> Option<usize> {
    let op = unit.get(i)?;
    unit.get(..i)?
        .iter()
        .rposition(|p| p.entity_type == op.entity_type && p.entity_id == op.entity_id)
}
