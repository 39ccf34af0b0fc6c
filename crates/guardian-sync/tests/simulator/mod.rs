//! A deterministic simulator of devices draining to a server.
//!
//! One seed drives N devices, each a real SQLite outbox on a temp file with
//! the engine's own [`DrainMachine`], against a simulated server with the
//! reference server's semantics (idempotency keys replay, a version per
//! entity, batches applied in order). Time is a [`ManualClock`]; nothing
//! sleeps. The network delivers requests in any order, drops them before or
//! after the server commits, and duplicates them; runners crash and restart
//! from their files, rivals take their lock, the wall clock steps both ways,
//! and the server answers 503 storms with `Retry-After`. After every step
//! the invariants of DESIGN §11 are checked; after the faults stop, the
//! queues must drain.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use guardian_protocol::{Entity, Problem};
use guardian_sync::breaker::{BreakerConfig, CircuitBreaker};
use guardian_sync::clock::{ManualClock, SharedClock};
use guardian_sync::core::clock_watch::ScheduleGuard;
use guardian_sync::core::drain::{
    BatchConfig, DrainCommand, DrainConfig, DrainInput, DrainMachine, Env, Write,
};
use guardian_sync::op::{Fence, NewOp, OpId, OpState, PendingOp};
use guardian_sync::outbox::{
    ClaimShape, ListFilter, Outbox, OutboxError, OutboxOptions, Synchronous,
};
use guardian_sync::reconcile::{ReconcilePolicies, Reconciler};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::telemetry::SyncMetrics;
use guardian_sync::transport::{Outcome, RetryReason, Stored};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The seeds `cargo test` runs; `SIM_SEEDS` asks for more.
pub(crate) fn seed_count(default: u64) -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one seed did, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) steps: u64,
    pub(crate) enqueued: u64,
    pub(crate) requests: u64,
    pub(crate) drops_before: u64,
    pub(crate) drops_after: u64,
    pub(crate) duplicates: u64,
    pub(crate) crashes: u64,
    pub(crate) steals: u64,
    pub(crate) clock_steps: u64,
    pub(crate) storms: u64,
    pub(crate) stale_writes_refused: u64,
    pub(crate) conditional: u64,
    pub(crate) foreign_writes: u64,
    pub(crate) conflicts: u64,
    pub(crate) transactions: u64,
    pub(crate) txn_aborts: u64,
    /// Machines stepped at their deadline with nothing to feed them.
    pub(crate) alarms: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.enqueued += o.enqueued;
        self.requests += o.requests;
        self.drops_before += o.drops_before;
        self.drops_after += o.drops_after;
        self.duplicates += o.duplicates;
        self.crashes += o.crashes;
        self.steals += o.steals;
        self.clock_steps += o.clock_steps;
        self.storms += o.storms;
        self.stale_writes_refused += o.stale_writes_refused;
        self.conditional += o.conditional;
        self.foreign_writes += o.foreign_writes;
        self.conflicts += o.conflicts;
        self.transactions += o.transactions;
        self.txn_aborts += o.txn_aborts;
        self.alarms += o.alarms;
    }
}

/// A broken invariant, with the step it broke at.
#[derive(Debug)]
pub(crate) struct Violation {
    pub(crate) seed: u64,
    pub(crate) step: u64,
    pub(crate) what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} broke an invariant at step {}: {}\n  replay: SIM_SEED={} cargo test -p guardian-sync --test sim -- replay --nocapture",
            self.seed, self.step, self.what, self.seed
        )
    }
}

const ENTITY_TYPE: &str = "item";
const START_MS: i64 = 1_700_000_000_000;
/// How often a runner re-checks stored schedules (its heartbeat interval).
const CLAMP_INTERVAL: Duration = Duration::from_secs(5);

/// The simulated server: the reference server's semantics, in memory.
#[derive(Default)]
struct Server {
    /// Entity id → (version, data).
    entities: BTreeMap<String, (u64, Value)>,
    /// Idempotency key → the entity as the first application left it.
    keys: BTreeMap<String, Entity>,
    /// Entity id → the `seq` of every payload applied, in order.
    applied: BTreeMap<String, Vec<i64>>,
    /// 503 with `Retry-After` until this time of the server's clock.
    storm_until: i64,
    /// Transaction key → the outcomes its commit answered.
    txn_keys: BTreeMap<String, Vec<Outcome>>,
}

/// One request as the server sees it.
#[derive(Clone)]
struct Request {
    entity_id: String,
    payload: Value,
    key: String,
    /// `If-Match`: the version the change was made against.
    if_match: Option<u64>,
    /// In a batch: `If-Match` is the version the op it depends on left.
    if_match_chained: bool,
}

impl Server {
    /// Applies one request; `Err` is an invariant the request broke.
    fn apply(&mut self, r: &Request, if_match: Option<u64>) -> Result<Outcome, String> {
        if let Some(e) = self.keys.get(&r.key) {
            return Ok(Outcome::Applied {
                stored: Stored::Entity(e.clone()),
                replayed: true,
            });
        }
        if let Some(expected) = if_match {
            // The reference server's 412: the change was made against
            // another version; the problem carries the current entity.
            let current = self.entities.get(&r.entity_id);
            if current.map(|(v, _)| *v) != Some(expected) {
                let mut problem = Problem::new("conflict:version", "Version conflict", 412);
                problem.current = current.map(|(v, data)| self.entity(&r.entity_id, *v, data));
                return Ok(Outcome::Conflict {
                    problem: Box::new(problem),
                });
            }
        }
        let seq = r.payload.get("seq").and_then(Value::as_i64).unwrap_or(-1);
        let log = self.applied.entry(r.entity_id.clone()).or_default();
        if log.contains(&seq) {
            return Err(format!(
                "{}: the change with seq {seq} was applied twice",
                r.entity_id
            ));
        }
        if let Some(last) = log.last() {
            if *last > seq {
                return Err(format!(
                    "{}: seq {seq} applied after seq {last}: per-entity order broken",
                    r.entity_id
                ));
            }
        }
        log.push(seq);
        let slot = self
            .entities
            .entry(r.entity_id.clone())
            .or_insert((0, Value::Null));
        slot.0 += 1;
        slot.1 = r.payload.clone();
        let (version, data) = (slot.0, slot.1.clone());
        let entity = self.entity(&r.entity_id, version, &data);
        self.keys.insert(r.key.clone(), entity.clone());
        // What the HTTP transport makes of the reference server's answer:
        // it echoes the data as sent (replays above carry the entity).
        Ok(Outcome::Applied {
            stored: Stored::AsSent { version },
            replayed: false,
        })
    }

    fn entity(&self, id: &str, version: u64, data: &Value) -> Entity {
        Entity {
            entity_type: ENTITY_TYPE.to_owned(),
            id: id.to_owned(),
            version,
            data: data.clone(),
            updated_at: String::new(),
            deleted: false,
        }
    }

    /// Another client changes an entity (a field the devices never write),
    /// so the devices' conditional changes conflict.
    fn foreign_write(&mut self, n: u64) {
        let ids: Vec<String> = self.entities.keys().cloned().collect();
        let Some(id) = ids.get(usize::try_from(n).unwrap_or(0) % ids.len().max(1)) else {
            return;
        };
        if let Some(slot) = self.entities.get_mut(id) {
            slot.0 += 1;
            if let Value::Object(map) = &mut slot.1 {
                map.insert("foreign".into(), json!(n));
            }
        }
    }

    /// A transaction, as the reference server applies it: all its ops in
    /// one commit, or (one refused) none; a committed key replays.
    fn handle_txn(
        &mut self,
        key: &str,
        reqs: &[Request],
        deps: &[Option<usize>],
        now: i64,
    ) -> Result<Vec<Outcome>, String> {
        if let Some(stored) = self.txn_keys.get(key) {
            if now >= self.storm_until {
                return Ok(stored
                    .iter()
                    .map(|o| match o {
                        Outcome::Applied { stored, .. } => Outcome::Applied {
                            stored: stored.clone(),
                            replayed: true,
                        },
                        other => other.clone(),
                    })
                    .collect());
            }
        }
        let snapshot = (
            self.entities.clone(),
            self.keys.clone(),
            self.applied.clone(),
        );
        let out = self.handle(reqs, deps, now)?;
        if let Some(refused) = out
            .iter()
            .position(|o| !matches!(o, Outcome::Applied { .. }))
        {
            (self.entities, self.keys, self.applied) = snapshot;
            return Ok(out
                .into_iter()
                .enumerate()
                .map(|(i, o)| {
                    if i == refused {
                        o
                    } else {
                        Outcome::DependencyFailed
                    }
                })
                .collect());
        }
        self.txn_keys.insert(key.to_owned(), out.clone());
        Ok(out)
    }

    /// A whole request (one op or a batch in order), as committed.
    fn handle(
        &mut self,
        reqs: &[Request],
        deps: &[Option<usize>],
        now: i64,
    ) -> Result<Vec<Outcome>, String> {
        if now < self.storm_until {
            let secs = ((self.storm_until - now) / 1000).max(1);
            let o = Outcome::Retryable {
                reason: RetryReason::Server,
                status: Some(503),
                retry_after: Some(secs.to_string()),
                detail: "503 storm".into(),
                counts_for_breaker: true,
            };
            return Ok(vec![o; reqs.len()]);
        }
        let mut out: Vec<Outcome> = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let dep = deps.get(i).copied().flatten();
            let if_match = match dep.map(|d| out.get(d)) {
                Some(Some(Outcome::Applied { stored, .. })) if r.if_match_chained => {
                    stored.version()
                }
                None | Some(Some(Outcome::Applied { .. })) => r.if_match,
                Some(_) => {
                    out.push(Outcome::DependencyFailed);
                    continue;
                }
            };
            out.push(self.apply(r, if_match)?);
        }
        Ok(out)
    }
}

/// What happens to a request on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Deliver,
    /// Lost before the server saw it.
    DropBefore,
    /// The server committed; the response was lost.
    DropAfter,
    /// Delivered, and a copy delivered again later.
    Duplicate,
}

/// A request on the wire.
struct Flight {
    device: usize,
    /// The device's lock session that sent it; a crash or a lost lock
    /// orphans it.
    generation: u64,
    unit: Vec<PendingOp>,
    deps: Vec<Option<usize>>,
    reqs: Vec<Request>,
    /// The transaction key, when the unit is a transaction.
    txn_key: Option<String>,
    fate: Fate,
    /// A duplicate nobody waits for.
    ghost: bool,
    sent_at: Duration,
}

struct Device {
    path: PathBuf,
    outbox: Outbox,
    generation: u64,
    fence: Option<Fence>,
    machine: Option<DrainMachine>,
    /// Results of claims and writes, waiting to be fed to the machine.
    inbox: VecDeque<DrainInput>,
    breaker: CircuitBreaker,
    schedule: ScheduleGuard,
    metrics: SyncMetrics,
    /// Per entity: the last seq enqueued.
    next_seq: BTreeMap<String, i64>,
    /// When this session last clamped the schedule (monotonic).
    last_clamp: Option<Duration>,
    /// Op → the seq its payload now carries (coalescing moves it).
    expect: BTreeMap<OpId, (String, i64)>,
    /// Each transaction's changes, as (entity, seq).
    txns: Vec<Vec<(String, i64)>>,
}

pub(crate) struct Sim {
    pub(crate) seed: u64,
    rng: StdRng,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    server: Server,
    devices: Vec<Device>,
    flights: Vec<Flight>,
    cfg: DrainConfig,
    retry: RetryPolicy,
    reconciler: Reconciler,
    /// Current lock epoch per device's outbox, as the sim knows it.
    pub(crate) stats: Stats,
    step: u64,
    faults: bool,
    budget: u64,
}

type Res<T> = Result<T, String>;

impl Sim {
    pub(crate) fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let clock = ManualClock::new(START_MS);
        let concurrency = rng.random_range(1..=4);
        let batch = rng.random_bool(0.4).then(|| BatchConfig {
            max_ops: rng.random_range(2..=8),
            max_bytes: 512 * 1024,
        });
        let cfg = DrainConfig::new(concurrency, batch, true);
        let retry = RetryPolicy::new(
            Duration::from_millis(200),
            2.0,
            Duration::from_secs(30),
            10_000,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("retry policy: {e}"));
        let n_devices = rng.random_range(1..=3);
        let mut sim = Sim {
            seed,
            rng,
            rt,
            _dir: dir,
            clock,
            server: Server::default(),
            devices: Vec::new(),
            flights: Vec::new(),
            cfg,
            retry,
            reconciler: Reconciler::new(ReconcilePolicies::new(), 1_000),
            stats: Stats::default(),
            step: 0,
            faults: true,
            budget: 0,
        };
        for d in 0..n_devices {
            let path = sim._dir.path().join(format!("dev{d}.db"));
            let outbox = sim.open(&path);
            sim.devices.push(Device {
                path,
                outbox,
                generation: 0,
                fence: None,
                machine: None,
                inbox: VecDeque::new(),
                breaker: new_breaker(),
                schedule: ScheduleGuard::new(Duration::from_secs(2), CLAMP_INTERVAL),
                metrics: SyncMetrics::new(),
                last_clamp: None,
                next_seq: BTreeMap::new(),
                expect: BTreeMap::new(),
                txns: Vec::new(),
            });
        }
        sim.budget = sim.rng.random_range(8..=30);
        sim
    }

    fn open(&self, path: &std::path::Path) -> Outbox {
        let clock: SharedClock = self.clock.clone();
        let options = OutboxOptions::default()
            .synchronous(Synchronous::Off)
            .clock(clock);
        let (outbox, _) = self
            .rt
            .block_on(Outbox::open(path, options))
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        outbox
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what,
        }
    }

    /// Runs the seed: a phase with faults, then a calm one that must drain.
    pub(crate) fn run(mut self) -> Result<Stats, Violation> {
        let fault_steps = self.rng.random_range(100..=400);
        for _ in 0..fault_steps {
            self.step += 1;
            if let Err(what) = self.one_step() {
                return Err(self.violation(what));
            }
        }
        // Calm: no new faults; a storm and backoffs run out with time.
        self.faults = false;
        self.budget = 0;
        for _ in 0..20_000 {
            self.step += 1;
            if self.quiet() {
                break;
            }
            if let Err(what) = self.one_step() {
                return Err(self.violation(what));
            }
        }
        if let Err(what) = self.final_check() {
            return Err(self.violation(what));
        }
        self.stats.steps = self.step;
        Ok(self.stats)
    }

    fn quiet(&self) -> bool {
        self.flights.is_empty()
            && self.devices.iter().all(|d| {
                d.machine.is_none()
                    && d.inbox.is_empty()
                    && self
                        .rt
                        .block_on(d.outbox.stats())
                        .map(|s| s.pending + s.in_flight == 0)
                        .unwrap_or(false)
            })
    }

    fn one_step(&mut self) -> Res<()> {
        let n = self.devices.len();
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=14 if self.budget > 0 => {
                let d = self.rng.random_range(0..n);
                self.enqueue(d)?;
            }
            40..=74 if !self.flights.is_empty() => self.deliver()?,
            40..=84 => {
                let ms = self.rng.random_range(1..=2_000);
                self.clock.advance(Duration::from_millis(ms));
            }
            85..=87 if self.faults => {
                let d = self.rng.random_range(0..n);
                self.crash(d);
            }
            88..=89 if self.faults => {
                let d = self.rng.random_range(0..n);
                self.steal(d)?;
            }
            90..=92 if self.faults => {
                // Steps of minutes to a day, forward or back.
                let mag = self.rng.random_range(60_000..=86_400_000);
                let delta = if self.rng.random_bool(0.5) { mag } else { -mag };
                self.clock.jump_wall(delta);
                self.stats.clock_steps += 1;
            }
            95..=96 if self.faults => {
                let n = self.rng.random();
                self.server.foreign_write(n);
                self.stats.foreign_writes += 1;
            }
            93..=94 if self.faults => {
                let secs = self.rng.random_range(1..=20);
                self.server.storm_until = self.server_now() + secs * 1000;
                self.stats.storms += 1;
            }
            _ => {
                let d = self.rng.random_range(0..n);
                self.advance_device(d)?;
            }
        }
        Ok(())
    }

    /// The server's own clock: the device's wall-clock steps do not move it.
    fn server_now(&self) -> i64 {
        i64::try_from(self.mono().as_millis()).unwrap_or(i64::MAX)
    }

    fn clock_now(&self) -> i64 {
        guardian_sync::clock::Clock::now_millis(&*self.clock)
    }

    fn mono(&self) -> Duration {
        guardian_sync::clock::Clock::monotonic(&*self.clock)
    }

    fn enqueue(&mut self, d: usize) -> Res<()> {
        self.budget -= 1;
        if self.rng.random_bool(0.2) {
            return self.enqueue_txn(d);
        }
        let (op, entity, seq) = self.new_op(d);
        let dev = &mut self.devices[d];
        let done = self
            .rt
            .block_on(dev.outbox.enqueue(op))
            .map_err(|e| format!("enqueue failed: {e}"))?;
        // Merged or not, the op now carries this seq.
        dev.expect.insert(done.op_id, (entity, seq));
        self.stats.enqueued += 1;
        Ok(())
    }

    /// An atomic transaction of two or three changes on the device's
    /// entities (some of them the same).
    fn enqueue_txn(&mut self, d: usize) -> Res<()> {
        let n = self.rng.random_range(2..=3);
        let mut ops = Vec::with_capacity(n);
        let mut changes = Vec::with_capacity(n);
        for _ in 0..n {
            let (op, entity, seq) = self.new_op(d);
            ops.push(op);
            changes.push((entity, seq));
        }
        let dev = &mut self.devices[d];
        let done = self
            .rt
            .block_on(dev.outbox.enqueue_transaction(ops))
            .map_err(|e| format!("enqueue_transaction failed: {e}"))?;
        for (e, change) in done.ops.iter().zip(&changes) {
            dev.expect.insert(e.op_id, change.clone());
        }
        dev.txns.push(changes);
        self.stats.enqueued += n as u64;
        self.stats.transactions += 1;
        Ok(())
    }

    /// The device's next change of one of its entities: its seq, and now
    /// and then made against what the server has (a conditional change).
    fn new_op(&mut self, d: usize) -> (NewOp, String, i64) {
        let e = self.rng.random_range(0..3);
        let dev = &mut self.devices[d];
        let entity = format!("d{d}-e{e}");
        let seq = dev.next_seq.get(&entity).copied().unwrap_or(0) + 1;
        dev.next_seq.insert(entity.clone(), seq);
        let mut op = NewOp::update(ENTITY_TYPE, entity.clone(), json!({ "seq": seq }));
        // Now and then the app edits what it last read from the server: a
        // conditional change, which conflicts if anyone wrote since.
        let conditional = self.rng.random_bool(0.3);
        if let Some((version, data)) = self.server.entities.get(&entity).filter(|_| conditional) {
            op.base_version = Some(*version);
            op.base = Some(data.clone());
            let mut payload = data.clone();
            if let Value::Object(map) = &mut payload {
                map.insert("seq".into(), json!(seq));
            }
            op.payload = payload;
            self.stats.conditional += 1;
        }
        (op, entity, seq)
    }

    /// Lets a device do its next thing: take the lock, start a drain, or
    /// feed its machine the next result.
    fn advance_device(&mut self, d: usize) -> Res<()> {
        if self.devices[d].fence.is_none() {
            return self.acquire(d);
        }
        if self.devices[d].machine.is_none() {
            self.devices[d].machine = Some(DrainMachine::new(self.cfg));
            return self.machine_step(d, None);
        }
        match self.devices[d].inbox.pop_front() {
            Some(input) => self.machine_step(d, Some(input)),
            // As the driver's alarm does.
            None if self.devices[d]
                .machine
                .as_ref()
                .and_then(DrainMachine::deadline)
                .is_some_and(|at| at <= self.mono()) =>
            {
                self.stats.alarms += 1;
                self.machine_step(d, None)
            }
            None => Ok(()),
        }
    }

    fn acquire(&mut self, d: usize) -> Res<()> {
        let dev = &self.devices[d];
        let row = self
            .rt
            .block_on(dev.outbox.lock_read())
            .map_err(|e| format!("lock read: {e}"))?;
        let owner = format!("dev{d}-gen{}", dev.generation);
        // Whoever holds it is judged gone (a crashed incarnation, a rival).
        let expect = row.map(|r| (r.epoch, r.heartbeat));
        let fence = self
            .rt
            .block_on(dev.outbox.lock_acquire(&owner, expect))
            .map_err(|e| format!("lock acquire: {e}"))?;
        let dev = &mut self.devices[d];
        if fence.is_some() {
            dev.schedule.new_session();
            // Responses to the last session's requests reach nobody.
            dev.generation += 1;
        }
        dev.fence = fence;
        Ok(())
    }

    /// Another process takes the device's lock: the device's machine keeps
    /// running on a stale fence until its writes are refused.
    fn steal(&mut self, d: usize) -> Res<()> {
        let dev = &self.devices[d];
        let Some(row) = self
            .rt
            .block_on(dev.outbox.lock_read())
            .map_err(|e| format!("lock read: {e}"))?
        else {
            return Ok(());
        };
        self.rt
            .block_on(
                dev.outbox
                    .lock_acquire("rival", Some((row.epoch, row.heartbeat))),
            )
            .map_err(|e| format!("rival acquire: {e}"))?;
        self.stats.steals += 1;
        Ok(())
    }

    /// Kills the device's runner: everything in memory is gone; the file
    /// stays.
    fn crash(&mut self, d: usize) {
        let path = self.devices[d].path.clone();
        let outbox = self.open(&path);
        let old = std::mem::replace(&mut self.devices[d].outbox, outbox);
        self.rt.block_on(old.close());
        let dev = &mut self.devices[d];
        dev.generation += 1;
        dev.last_clamp = None;
        dev.fence = None;
        dev.machine = None;
        dev.inbox.clear();
        dev.breaker = new_breaker();
        dev.schedule = ScheduleGuard::new(Duration::from_secs(2), CLAMP_INTERVAL);
        self.stats.crashes += 1;
    }

    fn machine_step(&mut self, d: usize, input: Option<DrainInput>) -> Res<()> {
        let now_ms = self.clock_now();
        let mono = self.mono();
        let dev = &mut self.devices[d];
        let Some(machine) = dev.machine.as_mut() else {
            return Ok(());
        };
        let mut rng = StdRng::seed_from_u64(self.rng.random());
        let mut env = Env {
            now_ms,
            mono,
            auth_paused: false,
            breaker: &mut dev.breaker,
            retry: &self.retry,
            reconciler: &self.reconciler,
            metrics: &dev.metrics,
            rng: &mut rng,
        };
        let commands = machine.step(input, &mut env);
        for c in commands {
            self.execute(d, c)?;
            if self.devices[d].machine.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn execute(&mut self, d: usize, command: DrainCommand) -> Res<()> {
        let Some(fence) = self.devices[d].fence.clone() else {
            return Ok(());
        };
        match command {
            DrainCommand::Claim {
                limit,
                per_unit,
                chains,
                acks,
                ..
            } => {
                let plan = {
                    let now = self.clock_now();
                    let mono = self.mono();
                    self.devices[d].schedule.plan(now, mono)
                };
                let now = self.clock_now();
                let dev = &self.devices[d];
                let mut acks = acks;
                let result: Result<Vec<Vec<PendingOp>>, OutboxError> = self.rt.block_on(async {
                    // As the driver does: acks first when the schedule is
                    // maintained, so the heads they make are maintained too.
                    if (plan.rebase.is_some() || plan.clamp) && !acks.is_empty() {
                        dev.outbox
                            .fenced(&fence)
                            .ack_many(std::mem::take(&mut acks))
                            .await?;
                    }
                    if let Some((after, step)) = plan.rebase {
                        dev.outbox
                            .fenced(&fence)
                            .rebase_schedule(after, step.old_now, step.delta_ms)
                            .await?;
                    }
                    if plan.clamp {
                        dev.outbox
                            .fenced(&fence)
                            .clamp_schedule(now, self.retry.horizon())
                            .await?;
                    }
                    let shape = if chains {
                        ClaimShape::Chains {
                            max_chain: per_unit,
                            max_chain_bytes: usize::MAX,
                        }
                    } else {
                        ClaimShape::Heads
                    };
                    dev.outbox
                        .fenced(&fence)
                        .ack_then_claim(acks, limit, now, shape)
                        .await
                });
                match self.fenced(d, &fence, result)? {
                    Some(chains) => {
                        self.check_parked(d, now, plan.clamp)?;
                        self.devices[d].inbox.push_back(DrainInput::Claimed {
                            asked: limit,
                            chains,
                        });
                    }
                    None => return Ok(()),
                }
            }
            DrainCommand::Send { unit, deps } => {
                let txn = unit.first().and_then(|op| op.txn);
                if let Some(txn) = txn {
                    let whole = unit.len() == txn.size as usize
                        && unit.iter().all(|op| op.txn.map(|t| t.id) == Some(txn.id));
                    if !whole {
                        return Err(format!(
                            "transaction {} sent in part or mixed: {} ops of {}",
                            txn.id,
                            unit.len(),
                            txn.size
                        ));
                    }
                } else if unit.iter().any(|op| op.txn.is_some()) {
                    return Err("an op of a transaction was sent outside it".into());
                }
                let reqs = unit
                    .iter()
                    .zip(deps.iter().copied().chain(std::iter::repeat(None)))
                    .map(|(op, dep)| Request {
                        entity_id: op.entity_id.clone(),
                        payload: op.payload.clone(),
                        key: op.idempotency_key.to_string(),
                        if_match: op.base_version,
                        if_match_chained: dep.is_some() && op.chained,
                    })
                    .collect();
                let fate = if self.faults {
                    match self.rng.random_range(0..100) {
                        0..=7 => Fate::DropBefore,
                        8..=15 => Fate::DropAfter,
                        16..=21 => Fate::Duplicate,
                        _ => Fate::Deliver,
                    }
                } else {
                    Fate::Deliver
                };
                self.stats.requests += 1;
                self.flights.push(Flight {
                    device: d,
                    generation: self.devices[d].generation,
                    unit,
                    deps,
                    reqs,
                    txn_key: txn.map(|t| t.id.to_string()),
                    fate,
                    ghost: false,
                    sent_at: self.mono(),
                });
            }
            DrainCommand::Fetch { op, latency } => {
                let result = Ok(match self.server.entities.get(&op.entity_id) {
                    Some((v, data)) => guardian_sync::transport::Fetched::Present(Entity {
                        entity_type: ENTITY_TYPE.to_owned(),
                        id: op.entity_id.clone(),
                        version: *v,
                        data: data.clone(),
                        updated_at: String::new(),
                        deleted: false,
                    }),
                    None => guardian_sync::transport::Fetched::Absent,
                });
                self.devices[d].inbox.push_back(DrainInput::Fetched {
                    op,
                    latency,
                    result,
                });
            }
            DrainCommand::Write { id, write, .. } => {
                let dev = &self.devices[d];
                let result = self.rt.block_on(async {
                    match write {
                        Write::Ack(acks) => dev.outbox.fenced(&fence).ack_many(acks).await,
                        Write::RetryAt { op_id, at, detail } => {
                            dev.outbox
                                .fenced(&fence)
                                .retry_later(op_id, at, &detail)
                                .await
                        }
                        Write::Fail { op_id, error } => {
                            dev.outbox.fenced(&fence).fail(op_id, &error).await
                        }
                        Write::Reconciled { op_id, reconciled } => dev
                            .outbox
                            .fenced(&fence)
                            .reconciled(op_id, reconciled)
                            .await
                            .map(|_| ()),
                        Write::Release(ids) => dev.outbox.fenced(&fence).release_claimed(ids).await,
                        Write::RetryTxnAt { op_ids, at, detail } => {
                            dev.outbox
                                .fenced(&fence)
                                .retry_later_many(op_ids, at, &detail)
                                .await
                        }
                        Write::FailTxn(failures) => {
                            dev.outbox.fenced(&fence).fail_many(failures).await
                        }
                        Write::ReconciledInTxn {
                            op_id,
                            reconciled,
                            others,
                            rebased,
                        } => dev
                            .outbox
                            .fenced(&fence)
                            .reconciled_in_txn(op_id, reconciled, others, rebased)
                            .await
                            .map(|_| ()),
                    }
                });
                if self.fenced(d, &fence, result)?.is_some() {
                    self.devices[d].inbox.push_back(DrainInput::Written { id });
                }
            }
            DrainCommand::Release(ids) => {
                let dev = &self.devices[d];
                let result = self
                    .rt
                    .block_on(dev.outbox.fenced(&fence).release_claimed(ids));
                self.fenced(d, &fence, result)?;
            }
            DrainCommand::PauseAuth | DrainCommand::Emit(_) | DrainCommand::DeliverOutcomes => {}
            DrainCommand::Finish(_) => {
                self.devices[d].machine = None;
            }
        }
        Ok(())
    }

    /// A fenced write's result: a refusal on a stale fence ends the drain
    /// (`None`); success on a stale fence breaks the fencing invariant.
    fn fenced<T>(
        &mut self,
        d: usize,
        fence: &Fence,
        result: Result<T, OutboxError>,
    ) -> Res<Option<T>> {
        let holder = self
            .rt
            .block_on(self.devices[d].outbox.lock_read())
            .map_err(|e| format!("lock read: {e}"))?;
        let current = holder.is_some_and(|r| r.owner == fence.owner() && r.epoch == fence.epoch());
        match result {
            Ok(v) if current => Ok(Some(v)),
            Ok(_) => Err(format!(
                "a write with the stale fence of {} (epoch {}) was accepted",
                fence.owner(),
                fence.epoch()
            )),
            Err(OutboxError::LockLost) => {
                self.stats.stale_writes_refused += 1;
                let dev = &mut self.devices[d];
                dev.machine = None;
                dev.inbox.clear();
                dev.fence = None;
                Ok(None)
            }
            Err(e) => Err(format!("outbox write failed: {e}")),
        }
    }

    /// No entity's next op waits longer than the retry policy allows: right
    /// after the schedule was clamped, every pending head is due within the
    /// policy's horizon, and clamps come at least once per interval.
    fn check_parked(&mut self, d: usize, now: i64, clamped: bool) -> Res<()> {
        let mono = self.mono();
        let dev = &mut self.devices[d];
        match dev.last_clamp {
            _ if clamped => dev.last_clamp = Some(mono),
            None => {
                return Err(
                    "the schedule was not checked for parked ops at the session's first claim"
                        .to_owned(),
                )
            }
            Some(at) if mono.saturating_sub(at) > CLAMP_INTERVAL * 2 => {
                return Err(format!(
                    "the schedule was not checked for parked ops for {:?}",
                    mono.saturating_sub(at)
                ));
            }
            Some(_) => {}
        }
        if !clamped {
            return Ok(());
        }
        let horizon = i64::try_from(self.retry.horizon().as_millis()).unwrap_or(i64::MAX);
        let ops = self
            .rt
            .block_on(self.devices[d].outbox.list(ListFilter {
                state: None,
                limit: 100_000,
                after_seq: 0,
            }))
            .map_err(|e| format!("list: {e}"))?;
        let mut heads: BTreeMap<&str, &PendingOp> = BTreeMap::new();
        for op in ops.iter().filter(|o| o.state != OpState::Failed) {
            heads.entry(op.entity_id.as_str()).or_insert(op);
        }
        for op in heads.values().filter(|o| o.state == OpState::Pending) {
            if op.next_attempt_at > now.saturating_add(horizon) {
                return Err(format!(
                    "op {} is parked {} ms ahead, past the policy's {} ms",
                    op.op_id,
                    op.next_attempt_at - now,
                    horizon
                ));
            }
        }
        Ok(())
    }

    /// Delivers one request on the wire, chosen at random (reordering).
    fn deliver(&mut self) -> Res<()> {
        let i = self.rng.random_range(0..self.flights.len());
        let f = self.flights.swap_remove(i);
        let now = self.server_now();
        let outcomes = match f.fate {
            Fate::DropBefore => {
                self.stats.drops_before += 1;
                vec![Outcome::network(RetryReason::Network, "connection reset"); f.reqs.len()]
            }
            Fate::DropAfter => {
                self.handle(&f, now)?;
                self.stats.drops_after += 1;
                vec![Outcome::network(RetryReason::Timeout, "timed out"); f.reqs.len()]
            }
            Fate::Deliver | Fate::Duplicate => {
                let o = self.handle(&f, now)?;
                if f.fate == Fate::Duplicate {
                    self.stats.duplicates += 1;
                    self.flights.push(Flight {
                        device: f.device,
                        generation: f.generation,
                        unit: Vec::new(),
                        deps: f.deps.clone(),
                        reqs: f.reqs.clone(),
                        txn_key: f.txn_key.clone(),
                        fate: Fate::Deliver,
                        ghost: true,
                        sent_at: f.sent_at,
                    });
                }
                o
            }
        };
        self.stats.conflicts += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Conflict { .. }))
            .count() as u64;
        if f.ghost || f.generation != self.devices[f.device].generation {
            return Ok(());
        }
        if self.devices[f.device].machine.is_none() {
            // The drain ended (lock lost): the response has nobody to hear it.
            return Ok(());
        }
        let latency = self.mono().saturating_sub(f.sent_at);
        self.devices[f.device]
            .inbox
            .push_back(DrainInput::Responded {
                unit: f.unit,
                deps: f.deps,
                outcomes,
                latency,
            });
        Ok(())
    }

    /// The server handles a request: a transaction or not. After it, no
    /// transaction is applied in part.
    fn handle(&mut self, f: &Flight, now: i64) -> Res<Vec<Outcome>> {
        let out = match &f.txn_key {
            Some(key) => {
                let out = self.server.handle_txn(key, &f.reqs, &f.deps, now)?;
                if out.iter().any(|o| matches!(o, Outcome::DependencyFailed)) {
                    self.stats.txn_aborts += 1;
                }
                out
            }
            None => self.server.handle(&f.reqs, &f.deps, now)?,
        };
        for (i, dev) in self.devices.iter().enumerate() {
            for changes in &dev.txns {
                let applied = changes
                    .iter()
                    .filter(|(entity, seq)| {
                        self.server
                            .applied
                            .get(entity)
                            .is_some_and(|log| log.contains(seq))
                    })
                    .count();
                if applied != 0 && applied != changes.len() {
                    return Err(format!(
                        "dev{i}: a transaction is half-applied: {applied} of {changes:?}"
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Nothing acknowledged is lost, and the queue drained.
    fn final_check(&self) -> Res<()> {
        if !self.quiet() {
            let left: Vec<String> = self
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let s = self.rt.block_on(d.outbox.stats());
                    format!(
                        "dev{i}: {s:?}, inbox {}, drain: {:?}",
                        d.inbox.len(),
                        d.machine
                    )
                })
                .collect();
            return Err(format!(
                "the queues did not drain once faults stopped: {}; {} requests on the wire",
                left.join("; "),
                self.flights.len()
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            let failed = self
                .rt
                .block_on(d.outbox.stats())
                .map_err(|e| format!("stats: {e}"))?
                .failed;
            if failed > 0 {
                return Err(format!("dev{i}: {failed} ops failed"));
            }
            for (entity, seq) in d.expect.values() {
                let applied = self.server.applied.get(entity);
                if !applied.is_some_and(|log| log.contains(seq)) {
                    return Err(format!(
                        "dev{i}: the change with seq {seq} of {entity} was enqueued and never applied (applied: {applied:?})"
                    ));
                }
            }
            for (entity, last) in &d.next_seq {
                let state = self.server.entities.get(entity).map(|(_, v)| v.clone());
                if state.as_ref().and_then(|v| v.get("seq")) != Some(&json!(last)) {
                    return Err(format!(
                        "dev{i}: {entity} ends as {state:?}, not its last change {last}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn new_breaker() -> CircuitBreaker {
    CircuitBreaker::new(BreakerConfig::default()).unwrap_or_else(|e| panic!("breaker: {e}"))
}

/// Runs `seeds` seeds from `first`; returns the totals or the first
/// violation.
pub(crate) fn run_seeds(first: u64, seeds: u64) -> Result<Stats, Violation> {
    let mut total = Stats::default();
    for seed in first..first + seeds {
        total.add(&Sim::new(seed).run()?);
    }
    Ok(total)
}
