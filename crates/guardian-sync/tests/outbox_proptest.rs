//! Model-based test: random interleavings of enqueue / claim / ack / retry /
//! fail / reopen against an in-memory model. Nothing is lost, nothing is
//! duplicated, ops of one entity take effect in enqueue order, the version
//! chain hands every op the server version it must send, and (with
//! coalescing on) the server ends in the same state as if every op had been
//! sent one by one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use guardian_sync::clock::ManualClock;
use guardian_sync::op::{Ack, Fence, NewOp, OpId, OpKind, OpState, PendingOp};
use guardian_sync::outbox::{Coalesced, ListFilter, Outbox, OutboxOptions, Synchronous};
use proptest::prelude::*;
use serde_json::{json, Value};

const T0: i64 = 1_700_000_000_000;
const ENTITIES: u8 = 4;

#[derive(Debug, Clone)]
enum Action {
    /// Enqueue a change of entity `e`: create if absent locally, else update
    /// (or delete when `delete`).
    Enqueue {
        e: u8,
        delete: bool,
    },
    Claim {
        limit: usize,
    },
    Ack {
        pick: usize,
    },
    RetryLater {
        pick: usize,
    },
    /// Fail permanently, then the user retries it from the dead-letter list.
    FailAndRetry {
        pick: usize,
    },
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..ENTITIES, prop::bool::weighted(0.25)).prop_map(|(e, delete)| Action::Enqueue { e, delete }),
        2 => (1usize..5).prop_map(|limit| Action::Claim { limit }),
        3 => any::<usize>().prop_map(|pick| Action::Ack { pick }),
        1 => any::<usize>().prop_map(|pick| Action::RetryLater { pick }),
        1 => any::<usize>().prop_map(|pick| Action::FailAndRetry { pick }),
        1 => Just(Action::Reopen),
    ]
}

/// The server as the ops reach it: data and version per entity.
#[derive(Debug, Default, Clone, PartialEq)]
struct Server {
    data: BTreeMap<String, Value>,
    version: HashMap<String, u64>,
}

impl Server {
    fn apply(&mut self, op: &PendingOp) -> u64 {
        let v = self.version.entry(op.entity_id.clone()).or_insert(0);
        *v += 1;
        match op.kind {
            OpKind::Create | OpKind::Update => {
                self.data.insert(op.entity_id.clone(), op.payload.clone());
            }
            OpKind::Delete => {
                self.data.remove(&op.entity_id);
            }
        }
        *v
    }
}

struct Harness {
    dir: tempfile::TempDir,
    coalesce: bool,
    outbox: Outbox,
    fence: Fence,
    /// What the app believes (every op applied in enqueue order).
    local: BTreeMap<String, Value>,
    server: Server,
    /// Ops that must be in the outbox.
    expected: BTreeSet<OpId>,
    in_flight: Vec<PendingOp>,
    last_acked_seq: HashMap<String, i64>,
    acked: BTreeSet<OpId>,
    counter: u64,
}

fn options(coalesce: bool) -> OutboxOptions {
    OutboxOptions::default()
        .clock(ManualClock::new(T0))
        .synchronous(Synchronous::Off)
        .coalesce(coalesce)
}

impl Harness {
    async fn new(coalesce: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path().join("o.db"), options(coalesce))
            .await
            .unwrap();
        let fence = outbox.lock_acquire("model", None).await.unwrap().unwrap();
        Self {
            dir,
            coalesce,
            outbox,
            fence,
            local: BTreeMap::new(),
            server: Server::default(),
            expected: BTreeSet::new(),
            in_flight: Vec::new(),
            last_acked_seq: HashMap::new(),
            acked: BTreeSet::new(),
            counter: 0,
        }
    }

    async fn entity_has_active(&self, id: &str) -> bool {
        let all = self
            .outbox
            .list(ListFilter {
                limit: 100_000,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        all.iter()
            .any(|o| o.entity_id == id && o.state != OpState::Failed)
    }

    async fn enqueue(&mut self, e: u8, delete: bool) {
        let id = format!("e{e}");
        self.counter += 1;
        let payload = json!({"n": self.counter});
        let mut op = match (self.local.contains_key(&id), delete) {
            (false, _) => NewOp::create("thing", &id, payload.clone()),
            (true, false) => NewOp::update("thing", &id, payload.clone()),
            (true, true) => NewOp::delete("thing", &id),
        };
        // The app knows the server version only when nothing is queued for
        // the entity; otherwise the outbox chains the op.
        if op.kind != OpKind::Create && !self.entity_has_active(&id).await {
            op = op.with_base_version(self.server.version.get(&id).copied().unwrap_or(0));
        }
        let kind = op.kind;
        let done = self.outbox.enqueue(op).await.unwrap();
        match kind {
            OpKind::Delete => {
                self.local.remove(&id);
            }
            _ => {
                self.local.insert(id.clone(), payload);
            }
        }
        match &done.coalesced {
            None => assert!(self.expected.insert(done.op_id), "op id reused"),
            Some(Coalesced::MergedInto { op_id, .. }) => {
                assert!(self.coalesce);
                assert!(
                    self.expected.contains(op_id),
                    "merged into an op that is gone"
                );
            }
            Some(Coalesced::Annihilated { removed }) => {
                assert!(self.coalesce);
                for r in removed {
                    assert!(self.expected.remove(&r.op_id), "removed an unknown op");
                }
            }
            Some(Coalesced::ReplacedUpdates { removed }) => {
                assert!(self.coalesce);
                for r in removed {
                    assert_eq!(r.kind, OpKind::Update);
                    assert!(self.expected.remove(&r.op_id), "removed an unknown op");
                }
                self.expected.insert(done.op_id);
            }
        }
        for r in removed_ops(&done.coalesced) {
            assert!(
                !self.in_flight.iter().any(|f| f.op_id == r),
                "coalescing touched an in-flight op"
            );
        }
    }

    async fn claim(&mut self, limit: usize) {
        let got = self
            .outbox
            .fenced(&self.fence)
            .claim_ready(limit, T0)
            .await
            .unwrap();
        for op in got {
            assert!(
                self.expected.contains(&op.op_id),
                "claimed an unknown op {op:?}"
            );
            assert!(!self.acked.contains(&op.op_id), "claimed an acked op");
            assert!(
                !self.in_flight.iter().any(|f| f.entity_id == op.entity_id),
                "two ops of {} in flight",
                op.entity_id
            );
            assert!(op.attempts >= 1);
            if op.kind != OpKind::Create && !op.chained {
                if let Some(v) = op.base_version {
                    let server_v = self.server.version.get(&op.entity_id).copied().unwrap_or(0);
                    assert_eq!(v, server_v, "stale If-Match for {op:?}");
                }
            }
            self.in_flight.push(op);
        }
    }

    async fn ack(&mut self, pick: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        let op = self.in_flight.remove(pick % self.in_flight.len());
        let last = self.last_acked_seq.get(&op.entity_id).copied().unwrap_or(0);
        assert!(
            op.seq > last,
            "entity order broken: {} after {}",
            op.seq,
            last
        );
        self.last_acked_seq.insert(op.entity_id.clone(), op.seq);
        let version = self.server.apply(&op);
        let data = self.server.data.get(&op.entity_id).cloned();
        self.outbox
            .fenced(&self.fence)
            .ack(
                op.op_id,
                Ack {
                    version: Some(version),
                    data,
                },
            )
            .await
            .unwrap();
        assert!(self.acked.insert(op.op_id), "acked twice");
        assert!(self.expected.remove(&op.op_id));
    }

    async fn retry_later(&mut self, pick: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        let op = self.in_flight.remove(pick % self.in_flight.len());
        self.outbox
            .fenced(&self.fence)
            .retry_later(op.op_id, T0, "503")
            .await
            .unwrap();
    }

    async fn fail_and_retry(&mut self, pick: usize) {
        if self.in_flight.is_empty() {
            return;
        }
        let op = self.in_flight.remove(pick % self.in_flight.len());
        self.outbox
            .fenced(&self.fence)
            .fail(op.op_id, "422")
            .await
            .unwrap();
        self.outbox.retry_failed(op.op_id).await.unwrap();
    }

    async fn reopen(&mut self) {
        self.outbox.close().await;
        let (outbox, _) = Outbox::open(self.dir.path().join("o.db"), options(self.coalesce))
            .await
            .unwrap();
        self.outbox = outbox;
        // The same runner restarting takes its lock back (epoch + 1), which
        // puts its in-flight ops back to pending.
        let fence = self
            .outbox
            .lock_acquire("model", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fence.epoch(), self.fence.epoch() + 1);
        self.fence = fence;
        self.in_flight.clear();
    }

    async fn check_contents(&self) {
        let all = self
            .outbox
            .list(ListFilter {
                limit: 100_000,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let ids: BTreeSet<OpId> = all.iter().map(|o| o.op_id).collect();
        assert_eq!(ids.len(), all.len(), "duplicate rows");
        assert_eq!(ids, self.expected, "outbox differs from the model");
        let flying: BTreeSet<OpId> = all
            .iter()
            .filter(|o| o.state == OpState::InFlight)
            .map(|o| o.op_id)
            .collect();
        let model_flying: BTreeSet<OpId> = self.in_flight.iter().map(|o| o.op_id).collect();
        assert_eq!(flying, model_flying);
        let s = self.outbox.stats().await.unwrap();
        assert_eq!(s.pending + s.in_flight + s.failed, all.len() as u64);
    }

    async fn drain(&mut self) {
        for _ in 0..10_000 {
            while !self.in_flight.is_empty() {
                self.ack(0).await;
            }
            self.claim(8).await;
            if self.in_flight.is_empty() {
                break;
            }
        }
        assert!(
            self.expected.is_empty(),
            "ops left after drain: {:?}",
            self.expected
        );
        assert_eq!(self.outbox.stats().await.unwrap().pending, 0);
        assert_eq!(
            self.server.data, self.local,
            "server state differs from the app's intent"
        );
    }
}

fn removed_ops(c: &Option<Coalesced>) -> Vec<OpId> {
    match c {
        Some(Coalesced::Annihilated { removed } | Coalesced::ReplacedUpdates { removed }) => {
            removed.iter().map(|r| r.op_id).collect()
        }
        _ => Vec::new(),
    }
}

fn run(actions: Vec<Action>, coalesce: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut h = Harness::new(coalesce).await;
        for a in actions {
            match a {
                Action::Enqueue { e, delete } => h.enqueue(e, delete).await,
                Action::Claim { limit } => h.claim(limit).await,
                Action::Ack { pick } => h.ack(pick).await,
                Action::RetryLater { pick } => h.retry_later(pick).await,
                Action::FailAndRetry { pick } => h.fail_and_retry(pick).await,
                Action::Reopen => h.reopen().await,
            }
            h.check_contents().await;
        }
        h.drain().await;
        let check = h.outbox.check().await.unwrap();
        assert!(check.ok, "{check:?}");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn outbox_matches_model_without_coalescing(actions in prop::collection::vec(action(), 1..60)) {
        run(actions, false);
    }

    #[test]
    fn outbox_matches_model_with_coalescing(actions in prop::collection::vec(action(), 1..60)) {
        run(actions, true);
    }
}
