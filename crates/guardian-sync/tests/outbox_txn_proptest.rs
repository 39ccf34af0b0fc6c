//! Model-based test of the atomic unit (issue 20): random interleavings of
//! lone ops, transactions and dependents with claims, acks, whole-unit
//! failures, retries and reopens, against a model of which units may go.
//! After every step the outbox's states equal the model's, and every claim
//! takes exactly the units the model says are ready: whole transactions
//! only, never past an earlier op of one of their entities, never before a
//! dependency is acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use guardian_sync::clock::ManualClock;
use guardian_sync::op::{Ack, Fence, NewOp, OpId, OpState};
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions, Synchronous};
use proptest::prelude::*;
use serde_json::json;

const T0: i64 = 1_700_000_000_000;
const ENTITIES: u8 = 4;

#[derive(Debug, Clone)]
enum Action {
    /// A lone update of an entity.
    Op {
        e: u8,
    },
    /// A transaction over these entities (repeats allowed).
    Txn {
        es: Vec<u8>,
    },
    /// A lone update that depends on the `pick`th live op.
    Dependent {
        e: u8,
        pick: usize,
    },
    Claim {
        limit: usize,
    },
    /// Acknowledge the `pick`th claimed unit.
    Ack {
        pick: usize,
    },
    /// Fail the `pick`th claimed unit for good.
    Fail {
        pick: usize,
    },
    /// Retry the `pick`th failed op (its whole unit, and its dependents).
    Retry {
        pick: usize,
    },
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..ENTITIES).prop_map(|e| Action::Op { e }),
        3 => prop::collection::vec(0..ENTITIES, 1..4).prop_map(|es| Action::Txn { es }),
        1 => (0..ENTITIES, any::<usize>()).prop_map(|(e, pick)| Action::Dependent { e, pick }),
        3 => (1usize..6).prop_map(|limit| Action::Claim { limit }),
        3 => any::<usize>().prop_map(|pick| Action::Ack { pick }),
        1 => any::<usize>().prop_map(|pick| Action::Fail { pick }),
        1 => any::<usize>().prop_map(|pick| Action::Retry { pick }),
        1 => Just(Action::Reopen),
    ]
}

/// An op as the model knows it.
#[derive(Debug, Clone)]
struct ModelOp {
    entity: String,
    txn: Option<u64>,
    depends_on: Vec<OpId>,
    state: OpState,
}

/// The model: ops in enqueue order; acknowledged ops are removed.
struct Model {
    ops: BTreeMap<u64, (OpId, ModelOp)>,
    next: u64,
    next_txn: u64,
}

impl Model {
    fn position(&self, id: OpId) -> Option<u64> {
        self.ops
            .iter()
            .find(|(_, (i, _))| *i == id)
            .map(|(p, _)| *p)
    }

    /// The unit of the op at `p`: its transaction's ops, or itself.
    fn unit(&self, p: u64) -> Vec<u64> {
        match self.ops[&p].1.txn {
            Some(t) => self
                .ops
                .iter()
                .filter(|(_, (_, o))| o.txn == Some(t))
                .map(|(q, _)| *q)
                .collect(),
            None => vec![p],
        }
    }

    /// Whether the unit of `p` may go now.
    fn ready(&self, p: u64) -> bool {
        let unit = self.unit(p);
        unit.iter().all(|q| {
            let op = &self.ops[q].1;
            op.state == OpState::Pending
                && self.ops.range(..*q).all(|(r, (_, earlier))| {
                    earlier.entity != op.entity
                        || earlier.state == OpState::Failed
                        || unit.contains(r)
                })
                && op.depends_on.iter().all(|d| self.position(*d).is_none())
        })
    }

    /// Fails the unit of `p` and, transitively, every pending unit that
    /// depends on a failed op.
    fn fail(&mut self, p: u64) {
        for q in self.unit(p) {
            if let Some((_, op)) = self.ops.get_mut(&q) {
                op.state = OpState::Failed;
            }
        }
        loop {
            let failed: BTreeSet<OpId> = self
                .ops
                .values()
                .filter(|(_, o)| o.state == OpState::Failed)
                .map(|(i, _)| *i)
                .collect();
            let next = self.ops.iter().find(|(_, (_, o))| {
                o.state == OpState::Pending && o.depends_on.iter().any(|d| failed.contains(d))
            });
            match next.map(|(q, _)| *q) {
                Some(q) => {
                    for r in self.unit(q) {
                        if let Some((_, op)) = self.ops.get_mut(&r) {
                            op.state = OpState::Failed;
                        }
                    }
                }
                None => return,
            }
        }
    }
}

struct Harness {
    dir: tempfile::TempDir,
    outbox: Outbox,
    fence: Fence,
    model: Model,
    /// Claimed units (model positions), in claim order.
    claimed: Vec<Vec<u64>>,
}

fn options() -> OutboxOptions {
    OutboxOptions::default()
        .clock(ManualClock::new(T0))
        .synchronous(Synchronous::Off)
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path().join("o.db"), options())
            .await
            .unwrap();
        let fence = outbox.lock_acquire("model", None).await.unwrap().unwrap();
        Self {
            dir,
            outbox,
            fence,
            model: Model {
                ops: BTreeMap::new(),
                next: 0,
                next_txn: 0,
            },
            claimed: Vec::new(),
        }
    }

    fn record(&mut self, id: OpId, entity: String, txn: Option<u64>, depends_on: Vec<OpId>) {
        self.model.ops.insert(
            self.model.next,
            (
                id,
                ModelOp {
                    entity,
                    txn,
                    depends_on,
                    state: OpState::Pending,
                },
            ),
        );
        self.model.next += 1;
    }

    async fn step(&mut self, action: Action) {
        match action {
            Action::Op { e } => {
                let entity = format!("e{e}");
                let done = self
                    .outbox
                    .enqueue(NewOp::update(
                        "thing",
                        &entity,
                        json!({"n": self.model.next}),
                    ))
                    .await
                    .unwrap();
                if done.coalesced.is_none() {
                    self.record(done.op_id, entity, None, Vec::new());
                }
            }
            Action::Txn { es } => {
                let ops = es
                    .iter()
                    .map(|e| NewOp::update("thing", format!("e{e}"), json!({"t": self.model.next})))
                    .collect();
                let done = self.outbox.enqueue_transaction(ops).await.unwrap();
                let t = self.model.next_txn;
                self.model.next_txn += 1;
                for (e, op) in es.iter().zip(done.ops) {
                    assert!(op.coalesced.is_none(), "a transaction op was coalesced");
                    self.record(op.op_id, format!("e{e}"), Some(t), Vec::new());
                }
            }
            Action::Dependent { e, pick } => {
                let live: Vec<(OpId, OpState)> = self
                    .model
                    .ops
                    .values()
                    .map(|(i, o)| (*i, o.state))
                    .collect();
                let Some((dep, state)) = live.get(pick % live.len().max(1)).copied() else {
                    return;
                };
                let entity = format!("e{e}");
                let result = self
                    .outbox
                    .enqueue(NewOp::update("thing", &entity, json!({"d": 1})).with_dependency(dep))
                    .await;
                if state == OpState::Failed {
                    assert!(result.is_err(), "a dependent of a failed op was accepted");
                } else {
                    self.record(result.unwrap().op_id, entity, None, vec![dep]);
                }
            }
            Action::Claim { limit } => {
                let got = self
                    .outbox
                    .fenced(&self.fence)
                    .claim_ready(limit, T0)
                    .await
                    .unwrap();
                let ready: BTreeSet<u64> = self
                    .model
                    .ops
                    .keys()
                    .copied()
                    .filter(|p| self.model.ready(*p))
                    .collect();
                let units = guardian_sync::core::drain::units(got);
                for unit in units {
                    let ps: Vec<u64> = unit
                        .iter()
                        .map(|op| {
                            self.model
                                .position(op.op_id)
                                .expect("claimed an unknown op")
                        })
                        .collect();
                    let first = ps[0];
                    assert!(
                        ready.contains(&first),
                        "claimed a unit that may not go: {unit:?}"
                    );
                    assert_eq!(ps, self.model.unit(first), "a unit claimed in part");
                    for p in &ps {
                        self.model.ops.get_mut(p).unwrap().1.state = OpState::InFlight;
                    }
                    self.claimed.push(ps);
                }
            }
            Action::Ack { pick } => {
                if self.claimed.is_empty() {
                    return;
                }
                let unit = self.claimed.remove(pick % self.claimed.len());
                let acks = unit
                    .iter()
                    .map(|p| (self.model.ops[p].0, Ack::default()))
                    .collect();
                self.outbox
                    .fenced(&self.fence)
                    .ack_many(acks)
                    .await
                    .unwrap();
                for p in unit {
                    self.model.ops.remove(&p);
                }
            }
            Action::Fail { pick } => {
                if self.claimed.is_empty() {
                    return;
                }
                let unit = self.claimed.remove(pick % self.claimed.len());
                let failures = unit
                    .iter()
                    .map(|p| (self.model.ops[p].0, "refused".to_owned()))
                    .collect();
                self.outbox
                    .fenced(&self.fence)
                    .fail_many(failures)
                    .await
                    .unwrap();
                self.model.fail(unit[0]);
            }
            Action::Retry { pick } => {
                let failed: Vec<u64> = self
                    .model
                    .ops
                    .iter()
                    .filter(|(_, (_, o))| o.state == OpState::Failed)
                    .map(|(p, _)| *p)
                    .collect();
                let Some(p) = failed.get(pick % failed.len().max(1)).copied() else {
                    return;
                };
                self.outbox
                    .retry_failed(self.model.ops[&p].0)
                    .await
                    .unwrap();
                // The unit and, transitively, units failed by it.
                let mut todo = vec![p];
                while let Some(q) = todo.pop() {
                    for r in self.model.unit(q) {
                        let id = self.model.ops[&r].0;
                        if self.model.ops[&r].1.state == OpState::Failed {
                            self.model.ops.get_mut(&r).unwrap().1.state = OpState::Pending;
                            todo.extend(self.model.ops.iter().filter_map(|(s, (_, o))| {
                                (o.state == OpState::Failed && o.depends_on.contains(&id))
                                    .then_some(*s)
                            }));
                        }
                    }
                }
                // A unit whose dependency is still failed fails again.
                let still: Vec<u64> = self
                    .model
                    .ops
                    .iter()
                    .filter(|(_, (_, o))| {
                        o.state == OpState::Pending
                            && o.depends_on.iter().any(|d| {
                                self.model
                                    .position(*d)
                                    .is_some_and(|q| self.model.ops[&q].1.state == OpState::Failed)
                            })
                    })
                    .map(|(q, _)| *q)
                    .collect();
                for q in still {
                    self.model.fail(q);
                }
            }
            Action::Reopen => {
                self.outbox.close().await;
                let (outbox, _) = Outbox::open(self.dir.path().join("o.db"), options())
                    .await
                    .unwrap();
                self.outbox = outbox;
                self.fence = self
                    .outbox
                    .lock_acquire("model", None)
                    .await
                    .unwrap()
                    .unwrap();
                // The lock was ours and is taken again: in-flight ops stay
                // claimed; the model keeps them so.
                let all = self.list().await;
                for (p, (id, op)) in &mut self.model.ops {
                    if let Some(state) = all.get(id) {
                        if op.state == OpState::InFlight && *state == OpState::Pending {
                            op.state = OpState::Pending;
                            self.claimed.retain(|u| !u.contains(p));
                        }
                    }
                }
            }
        }
        self.compare().await;
    }

    async fn list(&self) -> BTreeMap<OpId, OpState> {
        self.outbox
            .list(ListFilter {
                limit: 100_000,
                ..ListFilter::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|op| (op.op_id, op.state))
            .collect()
    }

    async fn compare(&self) {
        let actual = self.list().await;
        let model: BTreeMap<OpId, OpState> = self
            .model
            .ops
            .values()
            .map(|(i, o)| (*i, o.state))
            .collect();
        assert_eq!(actual, model);
    }
}

fn run(actions: Vec<Action>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new().await;
        for a in actions {
            h.step(a).await;
        }
        // Everything still pending or in flight drains: ack until empty.
        for _ in 0..1_000 {
            h.step(Action::Claim { limit: 100 }).await;
            if h.claimed.is_empty() {
                break;
            }
            h.step(Action::Ack { pick: 0 }).await;
        }
        let left = h
            .model
            .ops
            .values()
            .filter(|(_, o)| o.state != OpState::Failed)
            .count();
        assert_eq!(
            left, 0,
            "ops left that never became ready: {:?}",
            h.model.ops
        );
        h.outbox.close().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_atomic_unit_matches_the_model(actions in prop::collection::vec(action(), 1..50)) {
        run(actions);
    }
}
