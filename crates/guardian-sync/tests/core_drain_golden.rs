//! Golden command streams of the drain machine (`core::drain`): for each
//! main scenario, the exact commands the machine issues for a scripted
//! sequence of results. A change to what the engine does shows up here as
//! a diff of plain lines.

mod golden;

use std::collections::HashMap;
use std::time::Duration;

use guardian_protocol::{Entity, Problem};
use guardian_sync::breaker::{BreakerConfig, CircuitBreaker, TripPolicy};
use guardian_sync::core::drain::{
    DrainCommand, DrainConfig, DrainInput, DrainMachine, Env, Published, Write, ACK_DELAY,
};
use guardian_sync::engine::SyncEvent;
use guardian_sync::op::{OpKind, OpState, PendingOp, TxnRef};
use guardian_sync::reconcile::{ReconcilePolicies, Reconciler};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::telemetry::{Counter, SyncMetrics};
use guardian_sync::transport::{Outcome, RetryReason, Stored};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use uuid::Uuid;

const NOW: i64 = 1_700_000_000_000;

fn op(entity: &str, seq: i64, payload: Value) -> PendingOp {
    PendingOp {
        seq,
        op_id: Uuid::from_u128(seq as u128),
        idempotency_key: Uuid::from_u128(1000 + seq as u128),
        kind: OpKind::Update,
        entity_type: "item".into(),
        entity_id: entity.into(),
        payload,
        base: None,
        base_version: None,
        chained: false,
        txn_tokens: Vec::new(),
        envelope_version: 1,
        state: OpState::InFlight,
        attempts: 1,
        next_attempt_at: NOW,
        last_error: None,
        created_at: NOW,
        updated_at: NOW,
        coalesced_count: 0,
        reconciliations: 0,
        history: Vec::new(),
        txn: None,
        depends_on: Vec::new(),
    }
}

fn entity(id: &str, version: u64, data: Value) -> Entity {
    Entity {
        entity_type: "item".into(),
        id: id.into(),
        version,
        data,
        updated_at: String::new(),
        deleted: false,
    }
}

fn applied(id: &str, version: u64, data: Value) -> Outcome {
    Outcome::Applied {
        stored: Stored::Entity(entity(id, version, data)),
        replayed: false,
    }
}

/// A machine with its world, recording every command as a line.
struct Script {
    machine: DrainMachine,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    reconciler: Reconciler,
    metrics: SyncMetrics,
    rng: StdRng,
    mono: Duration,
    lines: Vec<String>,
    /// What each write in flight said its commit would publish.
    published: HashMap<u64, Published>,
    /// The same for the acks riding in the claim in flight.
    claim_published: Option<Published>,
    /// The machine said `finish` (and ignores what comes after).
    finished: bool,
}

impl Script {
    fn new(concurrency: usize, breaker: BreakerConfig) -> Self {
        Self {
            machine: DrainMachine::new(DrainConfig::new(concurrency, None, false)),
            breaker: CircuitBreaker::new(breaker).unwrap_or_else(|e| panic!("breaker: {e}")),
            retry: RetryPolicy::default(),
            reconciler: Reconciler::new(ReconcilePolicies::new(), 3),
            metrics: SyncMetrics::new(),
            rng: StdRng::seed_from_u64(7),
            mono: Duration::from_secs(100),
            lines: Vec::new(),
            published: HashMap::new(),
            claim_published: None,
            finished: false,
        }
    }

    fn step(&mut self, input: Option<DrainInput>) -> Vec<DrainCommand> {
        if let Some(i) = &input {
            self.lines.push(format!("<- {}", input_line(i)));
        }
        let mut env = Env {
            now_ms: NOW,
            mono: self.mono,
            auth_paused: false,
            breaker: &mut self.breaker,
            retry: &self.retry,
            reconciler: &self.reconciler,
            metrics: &self.metrics,
            rng: &mut self.rng,
        };
        // A write's `published` is exactly what the machine publishes when
        // it hears of the commit: the events first, in order, and the
        // counters (the driver publishes the copy if it never hears).
        let expected = match &input {
            Some(DrainInput::Written { id }) => self.published.remove(id),
            Some(DrainInput::Claimed { .. }) => self.claim_published.take(),
            _ => None,
        };
        let counted: Vec<u64> = expected
            .iter()
            .flat_map(|p| &p.counters)
            .map(|(c, _)| env.metrics.get(*c))
            .collect();
        let latencies = env.metrics.latency_summary().count;
        let commands = self.machine.step(input, &mut env);
        if let Some(p) = expected.filter(|_| !self.finished) {
            let emitted: Vec<&SyncEvent> = commands
                .iter()
                .map_while(|c| match c {
                    DrainCommand::Emit(e) => Some(e),
                    _ => None,
                })
                .collect();
            assert_eq!(
                emitted,
                p.events.iter().collect::<Vec<_>>(),
                "published events"
            );
            for ((counter, n), before) in p.counters.iter().zip(counted) {
                assert_eq!(self.metrics.get(*counter), before + n, "{counter:?} +{n}");
            }
            assert_eq!(
                self.metrics.latency_summary().count,
                latencies + p.latencies.len() as u64,
                "latencies recorded"
            );
        }
        for c in &commands {
            self.lines.push(format!("-> {}", command_line(c)));
            match c {
                DrainCommand::Write {
                    id,
                    published,
                    write,
                } => {
                    if let Write::Ack(acks) = write {
                        assert_succeeded(published, acks.len());
                    }
                    self.published.insert(*id, published.clone());
                }
                DrainCommand::Claim {
                    published, acks, ..
                } => {
                    if !acks.is_empty() {
                        assert_succeeded(published, acks.len());
                    }
                    self.claim_published = Some(published.clone());
                }
                DrainCommand::Finish(_) => self.finished = true,
                _ => {}
            }
        }
        commands
    }
}

/// An ack write publishes one success per op: counted, timed and told.
fn assert_succeeded(published: &Published, acks: usize) {
    assert!(
        published
            .counters
            .contains(&(Counter::Succeeded, acks as u64)),
        "{published:?}"
    );
    assert_eq!(published.latencies.len(), acks);
    let told = published
        .events
        .iter()
        .filter(|e| matches!(e, SyncEvent::OpSucceeded { .. }))
        .count();
    assert_eq!(told, acks);
}

fn name(op: &PendingOp) -> String {
    format!("{}#{}", op.entity_id, op.seq)
}

fn id_name(id: &Uuid) -> String {
    format!("op{}", id.as_u128())
}

fn input_line(i: &DrainInput) -> String {
    match i {
        DrainInput::Claimed { asked, chains } => {
            let ops: Vec<String> = chains.iter().flatten().map(name).collect();
            format!("claimed {asked}: [{}]", ops.join(", "))
        }
        DrainInput::Responded { unit, outcomes, .. } => {
            let parts: Vec<String> = unit
                .iter()
                .zip(outcomes)
                .map(|(op, o)| format!("{} {}", name(op), outcome_line(o)))
                .collect();
            format!("responded {}", parts.join(", "))
        }
        DrainInput::Fetched { op, result, .. } => format!("fetched {} {result:?}", name(op)),
        DrainInput::Written { id } => format!("written {id}"),
        DrainInput::LockLost => "lock lost".into(),
        DrainInput::Stop => "stop".into(),
    }
}

fn outcome_line(o: &Outcome) -> String {
    match o {
        Outcome::Applied { stored, replayed } => format!(
            "applied v{} replayed={replayed}",
            stored.version().unwrap_or(0)
        ),
        Outcome::Retryable {
            status,
            retry_after,
            ..
        } => format!("retryable {status:?} retry-after {retry_after:?}"),
        Outcome::Conflict { problem } => format!("conflict {}", problem.status),
        other => format!("{other:?}"),
    }
}

fn command_line(c: &DrainCommand) -> String {
    match c {
        DrainCommand::Claim { limit, acks, .. } if acks.is_empty() => format!("claim {limit}"),
        DrainCommand::Claim { limit, acks, .. } => {
            format!(
                "claim {limit} after {}",
                write_line(&Write::Ack(acks.clone()))
            )
        }
        DrainCommand::Send { unit, .. } => {
            let ops: Vec<String> = unit
                .iter()
                .map(|op| format!("{}(if-match {:?})", name(op), op.base_version))
                .collect();
            format!("send {}", ops.join(", "))
        }
        DrainCommand::Fetch { op, .. } => format!("fetch {}", name(op)),
        DrainCommand::Write { id, write, .. } => format!("write {id}: {}", write_line(write)),
        DrainCommand::Release(ids) => {
            format!("release {:?}", ids.iter().map(id_name).collect::<Vec<_>>())
        }
        DrainCommand::PauseAuth => "pause auth".into(),
        DrainCommand::Emit(e) => format!("emit {}", event_line(e)),
        DrainCommand::DeliverOutcomes => "deliver outcomes".into(),
        DrainCommand::Finish(end) => format!("finish {end:?}"),
    }
}

fn write_line(w: &Write) -> String {
    match w {
        Write::Ack(acks) => {
            let a: Vec<String> = acks
                .iter()
                .map(|(id, ack)| format!("{} v{:?} data {:?}", id_name(id), ack.version, ack.data))
                .collect();
            format!("ack {}", a.join(", "))
        }
        Write::RetryAt { op_id, at, detail } => {
            format!("retry {} at now+{}ms ({detail})", id_name(op_id), at - NOW)
        }
        Write::Fail { op_id, error } => format!("fail {} ({error})", id_name(op_id)),
        Write::Reconciled { op_id, reconciled } => format!(
            "reconciled {} as {:?} if-match {:?} payload {} ({})",
            id_name(op_id),
            reconciled.kind,
            reconciled.base_version,
            reconciled.payload,
            reconciled.detail
        ),
        Write::Release(ids) => format!("release {:?}", ids.iter().map(id_name).collect::<Vec<_>>()),
        Write::RetryTxnAt { op_ids, at, detail } => format!(
            "retry txn {:?} at now+{}ms ({detail})",
            op_ids.iter().map(id_name).collect::<Vec<_>>(),
            at - NOW
        ),
        Write::FailTxn(failures) => {
            let f: Vec<String> = failures
                .iter()
                .map(|(id, e)| format!("{} ({e})", id_name(id)))
                .collect();
            format!("fail txn {}", f.join(", "))
        }
        Write::ReconciledInTxn {
            op_id,
            reconciled,
            others,
            rebased,
        } => {
            let rebased: Vec<String> = rebased
                .iter()
                .map(|(id, payload)| format!(", rebased {} to {payload}", id_name(id)))
                .collect();
            format!(
                "reconciled {} in txn with {:?} as {:?} if-match {:?} payload {}{}",
                id_name(op_id),
                others.iter().map(id_name).collect::<Vec<_>>(),
                reconciled.kind,
                reconciled.base_version,
                reconciled.payload,
                rebased.concat(),
            )
        }
    }
}

fn event_line(e: &SyncEvent) -> String {
    match e {
        SyncEvent::OpSucceeded {
            op_id,
            version,
            replayed,
            ..
        } => format!(
            "succeeded {} v{version:?} replayed={replayed}",
            id_name(op_id)
        ),
        SyncEvent::OpRetried {
            op_id,
            next_attempt_at,
            reason,
            ..
        } => format!(
            "retried {} at now+{}ms ({reason})",
            id_name(op_id),
            next_attempt_at - NOW
        ),
        SyncEvent::OpFailed { op_id, error, .. } => format!("failed {} ({error})", id_name(op_id)),
        SyncEvent::Conflict {
            op_id,
            resolved,
            resolution,
            ..
        } => format!(
            "conflict {} {resolution:?} resolved {resolved}",
            id_name(op_id)
        ),
        SyncEvent::Breaker { from, to } => format!("breaker {from:?} -> {to:?}"),
        SyncEvent::TransactionCommitted {
            txn_id,
            ops,
            replayed,
        } => format!(
            "txn {} committed {ops} ops replayed={replayed}",
            id_name(txn_id)
        ),
        SyncEvent::TransactionFailed { txn_id, error } => {
            format!("txn {} failed ({error})", id_name(txn_id))
        }
        other => format!("{other:?}"),
    }
}

fn written(id: u64) -> Option<DrainInput> {
    Some(DrainInput::Written { id })
}

fn claimed(asked: usize, ops: Vec<PendingOp>) -> Option<DrainInput> {
    Some(DrainInput::Claimed {
        asked,
        chains: ops.into_iter().map(|op| vec![op]).collect(),
    })
}

/// The ops of one atomic transaction (id 900), claimed as one unit.
fn txn(ops: Vec<PendingOp>) -> Vec<PendingOp> {
    let size = u32::try_from(ops.len()).unwrap_or(u32::MAX);
    ops.into_iter()
        .map(|mut op| {
            op.txn = Some(TxnRef {
                id: Uuid::from_u128(900),
                size,
            });
            op
        })
        .collect()
}

fn claimed_units(asked: usize, units: Vec<Vec<PendingOp>>) -> Option<DrainInput> {
    Some(DrainInput::Claimed {
        asked,
        chains: units,
    })
}

fn responded(unit: Vec<PendingOp>, outcomes: Vec<Outcome>) -> Option<DrainInput> {
    Some(DrainInput::Responded {
        unit,
        deps: Vec::new(),
        outcomes,
        latency: Duration::from_millis(20),
    })
}

fn assert_golden(script: &Script, expected: &str) {
    golden::assert_transcript(&script.lines, expected);
}

#[test]
fn a_chain_of_updates_chains_versions() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let a1 = op("a", 1, json!({"n": 1}));
    s.step(claimed(65, vec![a1.clone()]));
    s.step(responded(vec![a1], vec![applied("a", 1, json!({"n": 1}))]));
    // The queue ran dry: the ack rides in the next claim, which the outbox
    // answers after chaining a#2 on it (a#2 now carries version 1).
    let mut a2 = op("a", 2, json!({"n": 2}));
    a2.base_version = Some(1);
    s.step(claimed(65, vec![a2.clone()]));
    s.step(responded(vec![a2], vec![applied("a", 2, json!({"n": 2}))]));
    s.step(claimed(65, vec![]));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [a#1]
        -> send a#1(if-match None)
        <- responded a#1 applied v1 replayed=false
        -> claim 65 after ack op1 vSome(1) data Some(Object {"n": Number(1)})
        <- claimed 65: [a#2]
        -> emit succeeded op1 vSome(1) replayed=false
        -> send a#2(if-match Some(1))
        <- responded a#2 applied v2 replayed=false
        -> claim 65 after ack op2 vSome(2) data Some(Object {"n": Number(2)})
        <- claimed 65: []
        -> emit succeeded op2 vSome(2) replayed=false
        -> deliver outcomes
        -> finish Progressed(DrainReport { sent: 2, succeeded: 2, failed: 0, retried: 0, conflicts_resolved: 0, deferred: 0 })
        "#,
    );
}

#[test]
fn a_409_is_merged_and_retried_under_a_new_request() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let mut a1 = op("a", 1, json!({"title": "mine", "done": false}));
    a1.base = Some(json!({"title": "old", "done": false}));
    a1.base_version = Some(4);
    s.step(claimed(65, vec![a1.clone()]));
    let mut problem = Problem::new("conflict:version", "Version conflict", 409);
    problem.current = Some(entity("a", 5, json!({"title": "old", "done": true})));
    s.step(responded(
        vec![a1],
        vec![Outcome::Conflict {
            problem: Box::new(problem),
        }],
    ));
    s.step(written(0));
    s.step(claimed(65, vec![]));
    s.step(claimed(65, vec![]));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [a#1]
        -> send a#1(if-match Some(4))
        <- responded a#1 conflict 409
        -> write 0: reconciled op1 as Some(Update) if-match Some(5) payload {"done":true,"title":"mine"} (conflict at version 5; merged (0 field conflict(s)), retrying)
        -> claim 65
        <- written 0
        -> emit conflict op1 Retry resolved {"done":true,"title":"mine"}
        <- claimed 65: []
        -> claim 65
        <- claimed 65: []
        -> deliver outcomes
        -> finish Progressed(DrainReport { sent: 1, succeeded: 0, failed: 0, retried: 0, conflicts_resolved: 1, deferred: 0 })
        "#,
    );
}

#[test]
fn a_503_storm_honours_retry_after_and_opens_the_breaker() {
    let breaker = BreakerConfig {
        policy: TripPolicy::Count { failures: 2 },
        ..BreakerConfig::default()
    };
    let mut s = Script::new(4, breaker);
    s.step(None);
    let ops = vec![
        op("a", 1, json!({})),
        op("b", 2, json!({})),
        op("c", 3, json!({})),
    ];
    s.step(claimed(68, ops.clone()));
    let storm = Outcome::Retryable {
        reason: RetryReason::Server,
        status: Some(503),
        retry_after: Some("30".into()),
        detail: "503 Service Unavailable".into(),
        counts_for_breaker: true,
    };
    for (i, op) in ops.into_iter().enumerate() {
        s.step(responded(vec![op], vec![storm.clone()]));
        s.step(written(i as u64));
    }
    assert_golden(
        &s,
        r#"
        -> claim 68
        <- claimed 68: [a#1, b#2, c#3]
        -> send a#1(if-match None)
        -> send b#2(if-match None)
        -> send c#3(if-match None)
        <- responded a#1 retryable Some(503) retry-after Some("30")
        -> write 0: retry op1 at now+30000ms (503 Service Unavailable)
        -> claim 66
        <- written 0
        -> emit retried op1 at now+30000ms (503 Service Unavailable)
        <- responded b#2 retryable Some(503) retry-after Some("30")
        -> emit breaker Closed -> Open
        -> write 1: retry op2 at now+30000ms (503 Service Unavailable)
        <- written 1
        -> emit retried op2 at now+30000ms (503 Service Unavailable)
        <- responded c#3 retryable Some(503) retry-after Some("30")
        -> write 2: retry op3 at now+30000ms (503 Service Unavailable)
        <- written 2
        -> emit retried op3 at now+30000ms (503 Service Unavailable)
        "#,
    );
}

#[test]
fn a_refused_token_pauses_the_drain() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let a1 = op("a", 1, json!({}));
    let b2 = op("b", 2, json!({}));
    s.step(claimed(65, vec![a1.clone(), b2]));
    s.step(responded(vec![a1], vec![Outcome::AuthRequired]));
    s.step(written(0));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [a#1, b#2]
        -> send a#1(if-match None)
        <- responded a#1 AuthRequired
        -> pause auth
        -> write 0: retry op1 at now+0ms (authentication required)
        -> release ["op2"]
        <- written 0
        -> emit AuthRequired
        -> deliver outcomes
        -> finish Progressed(DrainReport { sent: 1, succeeded: 0, failed: 0, retried: 0, conflicts_resolved: 0, deferred: 0 })
        "#,
    );
}

#[test]
fn a_stop_writes_and_publishes_the_acks_in_hand_and_releases_the_rest() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let a1 = op("a", 1, json!({}));
    let b2 = op("b", 2, json!({}));
    let c3 = op("c", 3, json!({}));
    s.step(claimed(3, vec![a1.clone(), b2, c3]));
    // a#1's ack waits for more while b#2 is on the wire.
    s.step(responded(vec![a1], vec![applied("a", 1, json!({}))]));
    // b#2's request is abandoned; the refill claim is waited for.
    s.step(Some(DrainInput::Stop));
    s.step(claimed(62, vec![op("d", 4, json!({}))]));
    s.step(written(0));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 3: [a#1, b#2, c#3]
        -> send a#1(if-match None)
        -> claim 62
        <- responded a#1 applied v1 replayed=false
        -> send b#2(if-match None)
        <- stop
        -> write 0: ack op1 vSome(1) data Some(Object {})
        -> release ["op3"]
        <- claimed 62: [d#4]
        -> release ["op4"]
        <- written 0
        -> emit succeeded op1 vSome(1) replayed=false
        -> deliver outcomes
        -> finish Progressed(DrainReport { sent: 1, succeeded: 1, failed: 0, retried: 0, conflicts_resolved: 0, deferred: 0 })
        "#,
    );
}

#[test]
fn a_lock_lost_mid_drain_ends_it_without_reporting_unwritten_acks() {
    let mut s = Script::new(2, BreakerConfig::default());
    s.step(None);
    let a1 = op("a", 1, json!({}));
    let b2 = op("b", 2, json!({}));
    s.step(claimed(66, vec![a1.clone(), b2]));
    s.step(responded(vec![a1], vec![applied("a", 1, json!({}))]));
    s.step(Some(DrainInput::LockLost));
    // The claim carrying the ack is refused with the lost lock: nothing
    // more comes out, and op1's success is never reported.
    assert!(s.step(claimed(65, vec![])).is_empty());
    assert_golden(
        &s,
        r#"
        -> claim 66
        <- claimed 66: [a#1, b#2]
        -> send a#1(if-match None)
        -> send b#2(if-match None)
        <- responded a#1 applied v1 replayed=false
        -> claim 65 after ack op1 vSome(1) data Some(Object {})
        <- lock lost
        -> finish LockLost
        <- claimed 65: []
        "#,
    );
}

#[test]
fn a_transaction_is_resent_whole_after_a_conflict_and_acked_whole() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let mut b2 = op("b", 2, json!({"scene": "night", "level": 1}));
    b2.base = Some(json!({"scene": "day", "level": 1}));
    b2.base_version = Some(3);
    let unit = txn(vec![op("a", 1, json!({"scene": "night"})), b2]);
    s.step(claimed_units(65, vec![unit.clone()]));
    // b conflicts; the server applied nothing of the transaction.
    let mut problem = Problem::new("conflict:version", "Version conflict", 412);
    problem.current = Some(entity("b", 4, json!({"scene": "day", "level": 7})));
    s.step(responded(
        unit.clone(),
        vec![
            Outcome::DependencyFailed,
            Outcome::Conflict {
                problem: Box::new(problem),
            },
        ],
    ));
    s.step(written(0));
    // The outbox put both back; the merged b goes with a again.
    let mut again = unit;
    again[1].payload = json!({"scene": "night", "level": 7});
    again[1].base_version = Some(4);
    s.step(claimed_units(65, vec![again.clone()]));
    s.step(responded(
        again,
        vec![
            applied("a", 1, json!({"scene": "night"})),
            applied("b", 5, json!({"scene": "night", "level": 7})),
        ],
    ));
    s.step(written(1));
    s.step(claimed(65, vec![]));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [a#1, b#2]
        -> send a#1(if-match None), b#2(if-match Some(3))
        <- responded a#1 DependencyFailed, b#2 conflict 412
        -> write 0: reconciled op2 in txn with ["op1"] as Some(Update) if-match Some(4) payload {"level":7,"scene":"night"}
        -> claim 65
        <- written 0
        -> emit conflict op2 Retry resolved {"level":7,"scene":"night"}
        <- claimed 65: [a#1, b#2]
        -> send a#1(if-match None), b#2(if-match Some(4))
        -> claim 64
        <- responded a#1 applied v1 replayed=false, b#2 applied v5 replayed=false
        -> write 1: ack op1 vSome(1) data Some(Object {"scene": String("night")}), op2 vSome(5) data Some(Object {"level": Number(7), "scene": String("night")})
        <- written 1
        -> emit succeeded op1 vSome(1) replayed=false
        -> emit succeeded op2 vSome(5) replayed=false
        -> emit txn op900 committed 2 ops replayed=false
        <- claimed 65: []
        -> claim 65
        "#,
    );
}

/// An op chained on a merged op of its transaction is moved onto the
/// merge: sent as it was made, it would undo the server's change.
#[test]
fn a_chained_op_of_a_transaction_is_moved_onto_its_predecessors_merge() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let mut b2 = op("b", 2, json!({"on": true, "level": 1}));
    b2.base = Some(json!({"on": false, "level": 1}));
    b2.base_version = Some(3);
    let mut b3 = op("b", 3, json!({"on": true, "level": 1, "color": "red"}));
    b3.chained = true;
    let unit = txn(vec![b2, b3]);
    s.step(claimed_units(65, vec![unit.clone()]));
    let mut problem = Problem::new("conflict:version", "Version conflict", 412);
    problem.current = Some(entity("b", 4, json!({"on": false, "level": 9})));
    s.step(responded(
        unit,
        vec![
            Outcome::Conflict {
                problem: Box::new(problem),
            },
            Outcome::DependencyFailed,
        ],
    ));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [b#2, b#3]
        -> send b#2(if-match Some(3)), b#3(if-match None)
        <- responded b#2 conflict 412, b#3 DependencyFailed
        -> write 0: reconciled op2 in txn with ["op3"] as Some(Update) if-match Some(4) payload {"level":9,"on":true}, rebased op3 to {"color":"red","level":9,"on":true}
        -> claim 65
        "#,
    );
}

#[test]
fn a_refused_op_fails_its_whole_transaction() {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let unit = txn(vec![
        op("a", 1, json!({"scene": "night"})),
        op("b", 2, json!({"scene": "night"})),
    ]);
    s.step(claimed_units(65, vec![unit.clone()]));
    s.step(responded(
        unit,
        vec![
            Outcome::Permanent {
                status: 422,
                problem: None,
                detail: "422 unprocessable".into(),
            },
            Outcome::DependencyFailed,
        ],
    ));
    s.step(written(0));
    s.step(claimed(65, vec![]));
    assert_golden(
        &s,
        r#"
        -> claim 65
        <- claimed 65: [a#1, b#2]
        -> send a#1(if-match None), b#2(if-match None)
        <- responded a#1 Permanent { status: 422, problem: None, detail: "422 unprocessable" }, b#2 DependencyFailed
        -> write 0: fail txn op1 (422 unprocessable), op2 (transaction 00000000-0000-0000-0000-000000000384 aborted: op 00000000-0000-0000-0000-000000000001 failed: 422 unprocessable)
        -> claim 65
        <- written 0
        -> emit failed op1 (422 unprocessable)
        -> emit failed op2 (transaction 00000000-0000-0000-0000-000000000384 aborted: op 00000000-0000-0000-0000-000000000001 failed: 422 unprocessable)
        -> emit txn op900 failed (422 unprocessable)
        <- claimed 65: []
        -> claim 65
        "#,
    );
}

/// What a per-op drain of `total` distinct entities committed, with each
/// request answered in send order and each claim and write committing at
/// once.
#[derive(Debug, Default)]
struct Flow {
    claims: usize,
    /// Claims that carried acks.
    riding: usize,
    /// Ack groups written on their own.
    alone: usize,
    acked: usize,
    reported: usize,
}

fn steady_flow(concurrency: usize, total: i64) -> Flow {
    let mut s = Script::new(concurrency, BreakerConfig::default());
    let mut next_seq = 1;
    let mut wire = std::collections::VecDeque::new();
    let mut inputs = std::collections::VecDeque::new();
    let mut flow = Flow::default();
    let mut commands = s.step(None);
    let mut finished = false;
    for _ in 0..10_000 {
        for c in commands {
            match c {
                DrainCommand::Claim { limit, acks, .. } => {
                    flow.claims += 1;
                    flow.riding += usize::from(!acks.is_empty());
                    flow.acked += acks.len();
                    let take = (total + 1 - next_seq).min(limit as i64);
                    let ops: Vec<PendingOp> = (next_seq..next_seq + take)
                        .map(|seq| op(&format!("e{seq}"), seq, json!({})))
                        .collect();
                    next_seq += take;
                    inputs.push_back(claimed(limit, ops));
                }
                DrainCommand::Send { unit, .. } => wire.extend(unit),
                DrainCommand::Write {
                    id,
                    write: Write::Ack(acks),
                    ..
                } => {
                    flow.alone += 1;
                    flow.acked += acks.len();
                    inputs.push_back(written(id));
                }
                DrainCommand::Emit(SyncEvent::OpSucceeded { .. }) => flow.reported += 1,
                DrainCommand::Finish(_) => finished = true,
                DrainCommand::DeliverOutcomes => {}
                other => panic!("unexpected {}", command_line(&other)),
            }
        }
        if finished {
            break;
        }
        // Answers in hand are fed first, then the oldest request's.
        let input = inputs.pop_front().flatten().or_else(|| {
            let sent: PendingOp = wire.pop_front()?;
            let answer = applied(&sent.entity_id, 1, json!({}));
            responded(vec![sent], vec![answer])
        });
        assert!(input.is_some(), "stalled: nothing outstanding");
        commands = s.step(input);
    }
    assert!(finished, "the drain did not finish");
    assert_eq!(
        (flow.acked, flow.reported),
        (total as usize, total as usize),
        "each op acked and reported once"
    );
    flow
}

/// A steady per-op flow at concurrency 16, answered in send order: after
/// the first claim, every ack group rides in a claim, so the outbox commits
/// once per claim instead of once per claim and once per ack group; every
/// op is acked once and reported once.
#[test]
fn a_steady_flow_writes_each_ack_group_with_the_next_claim() {
    let flow = steady_flow(16, 400);
    // 400 ops in claims of about 32 after the first 80: each later claim
    // carries the group that came back meanwhile; at most the last group,
    // written as the queue runs dry, goes alone.
    assert!(
        flow.claims >= 10 && flow.riding + 1 >= flow.claims,
        "{flow:?}"
    );
    assert!(flow.alone <= 1, "{flow:?}");
}

/// Once a claim found fewer ops than it asked for, the ops already
/// claimed still go first: an ack is written only with a group, or when
/// the claimed queue is empty. Writing each ack as it came back (with a
/// claim looking for the entity's next op) cost a commit per op for the
/// last 64 ops of every drain.
#[test]
fn the_last_claimed_ops_are_acked_in_groups() {
    for concurrency in [1, 16] {
        let flow = steady_flow(concurrency, 200);
        // 200 ops: a claim of 64 + c, then claims of about 32; the queue runs dry
        // with some 64 ops claimed. Their acks go in groups of 32, then
        // with the claims of the queue's last requests (at most one per
        // request in flight when the claimed queue empties).
        let bound = 200 / 32 + 3 + concurrency;
        assert!(
            flow.claims + flow.alone <= bound,
            "c={concurrency}: {flow:?}, more than {bound} commits"
        );
    }
}

/// The sizes of the ack groups `commands` write, riding in a claim or not.
fn acks_written(commands: &[DrainCommand]) -> Vec<usize> {
    commands
        .iter()
        .filter_map(|c| match c {
            DrainCommand::Claim { acks, .. } if !acks.is_empty() => Some(acks.len()),
            DrainCommand::Write {
                write: Write::Ack(acks),
                ..
            } => Some(acks.len()),
            _ => None,
        })
        .collect()
}

/// A machine at concurrency 1 with 65 ops claimed, and the answer that
/// applies the `i`th of them.
fn sixty_five_claimed() -> (Script, impl Fn(usize) -> Option<DrainInput>) {
    let mut s = Script::new(1, BreakerConfig::default());
    s.step(None);
    let ops: Vec<PendingOp> = (1..=65)
        .map(|seq| op(&format!("e{seq}"), seq, json!({})))
        .collect();
    s.step(claimed(65, ops.clone()));
    let answer = move |i: usize| {
        responded(
            vec![ops[i].clone()],
            vec![applied(&ops[i].entity_id, 1, json!({}))],
        )
    };
    (s, answer)
}

/// An ack waits for its group at most `ACK_DELAY`: on a slow link, 32
/// answers would take 32 round trips, and the app would hear of an
/// applied op that much later.
#[test]
fn an_ack_waits_for_its_group_at_most_ack_delay() {
    let (mut s, answer) = sixty_five_claimed();
    // Answered quickly: the acks wait for more.
    assert!(acks_written(&s.step(answer(0))).is_empty());
    s.mono += ACK_DELAY / 2;
    assert!(acks_written(&s.step(answer(1))).is_empty());
    // The first ack has waited ACK_DELAY: all three go, with a claim.
    s.mono += ACK_DELAY / 2;
    assert_eq!(acks_written(&s.step(answer(2))), vec![3]);
}

/// With nothing coming back (the next request hangs), the machine asks to
/// be stepped once its oldest ack has waited `ACK_DELAY`, and stepped then
/// with no input it writes the group; a claim or write in flight steps it
/// anyway, so it asks for nothing meanwhile.
#[test]
fn a_waiting_ack_asks_to_be_stepped_at_ack_delay() {
    let (mut s, answer) = sixty_five_claimed();
    assert_eq!(s.machine.deadline(), None, "no ack waits");
    let answered = s.mono;
    assert!(acks_written(&s.step(answer(0))).is_empty());
    assert_eq!(s.machine.deadline(), Some(answered + ACK_DELAY));
    s.mono += ACK_DELAY - Duration::from_millis(1);
    assert!(acks_written(&s.step(None)).is_empty(), "not yet due");
    s.mono += Duration::from_millis(1);
    assert_eq!(acks_written(&s.step(None)), vec![1]);
    assert_eq!(s.machine.deadline(), None, "the claim in flight steps it");
}
