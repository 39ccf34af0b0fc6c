//! The model of one device: which ops its outbox stores and what the server
//! must end up holding.
//!
//! It mirrors the outbox's coalescing exactly, from the [`Enqueued`] result of
//! every enqueue (merged into an op, annihilated, replaced), so after the run
//! the model knows the list of ops that must each take effect on the server
//! exactly once, per entity in enqueue order, and the final state of every
//! entity. It also knows each atomic transaction (a scene) and its ops, which
//! must take effect together, in one commit, or not at all. Runner events (acks, reconciliations) only feed the progress bars
//! and the device's knowledge of server versions (for `If-Match`); the
//! verdict never trusts them, since a killed runner takes its last events
//! with it.

use std::collections::{BTreeMap, HashMap};

use guardian_sync::op::{NewOp, OpId, OpKind};
use guardian_sync::outbox::{Coalesced, Enqueued, EnqueuedTransaction};
use serde_json::Value;
use uuid::Uuid;

use super::workload::{board_field, board_id, Action, Change, BOARD_TYPE, ENTITY_TYPE};

/// An op the outbox stores (or stored, until it was acknowledged).
#[derive(Debug, Clone)]
pub(crate) struct StoredOp {
    pub(crate) op_id: OpId,
    /// The key it was enqueued with (a reconciled retry gets a new one).
    pub(crate) key: Uuid,
    pub(crate) kind: OpKind,
    pub(crate) entity_type: &'static str,
    pub(crate) entity: String,
    /// What it writes now (coalescing replaces it).
    pub(crate) payload: Value,
    /// Removed by a later DELETE's coalescing: must never take effect.
    pub(crate) removed: bool,
    /// A runner reported it applied.
    pub(crate) acked: bool,
    /// A runner reported a conflict reconciled into a new request.
    pub(crate) reconciled: bool,
    /// The payload of the reconciled request, if any.
    pub(crate) resolved: Option<Value>,
    /// A conflict settled it without our payload: the server's data is
    /// not known from the events.
    pub(crate) data_unknown: bool,
}

/// A shared board as one device sees it. The device edits a board only
/// when nothing of it is outstanding in its outbox, with the version and
/// data it last learned as `base` (so a concurrent edit of another device
/// is a 409 and a 3-way merge, never a blind overwrite); edits made
/// meanwhile wait and only the latest is sent.
#[derive(Debug, Clone)]
pub(crate) struct BoardState {
    pub(crate) id: String,
    known: Option<(u64, Value)>,
    outstanding: Option<OpId>,
    deferred: Option<u64>,
    /// The last value the device set: what the server must end with.
    pub(crate) last: u64,
}

/// What the server must hold for an entity at the end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expected {
    /// Live with exactly this data.
    Live(Value),
    /// Deleted (a tombstone: `410 Gone`).
    Deleted,
    /// Never reached the server (its CREATE was annihilated by a DELETE).
    Absent,
}

/// An atomic transaction the device enqueued.
#[derive(Debug, Clone)]
pub(crate) struct TxnModel {
    /// Its id: the key it is sent under, and the `transaction_key` of its
    /// rows in the server's applied log.
    pub(crate) id: Uuid,
    /// Indexes into [`DeviceModel::ops`], in the transaction's order.
    pub(crate) ops: Vec<usize>,
}

#[derive(Debug, Default)]
struct EntityModel {
    entity_type: &'static str,
    /// Indexes into `DeviceModel::ops`, in enqueue order.
    ops: Vec<usize>,
    /// Data after the device's last action (None once deleted).
    last: Option<Value>,
    /// Stored ops not yet reported applied.
    unacked: usize,
    /// Server version and data the device last learned from an ack.
    known: Option<(u64, Value)>,
}

/// One device's outbox as the demo expects it to behave.
#[derive(Debug, Default)]
pub(crate) struct DeviceModel {
    pub(crate) ops: Vec<StoredOp>,
    /// The atomic transactions, in enqueue order.
    pub(crate) txns: Vec<TxnModel>,
    by_id: HashMap<OpId, usize>,
    entities: BTreeMap<String, EntityModel>,
    /// Enqueue calls.
    pub(crate) enqueued: u64,
    /// Ops reported applied by a runner.
    pub(crate) acked: u64,
    /// The field of the shared boards this device owns.
    field: String,
    pub(crate) boards: Vec<BoardState>,
}

impl DeviceModel {
    /// The op to enqueue for `action`: with the server version the device
    /// last saw when nothing of the entity is outstanding (so the server can
    /// detect a concurrent writer), otherwise without one (the outbox chains
    /// it on its predecessor, or sends it unconditionally).
    pub(crate) fn new_op(&self, action: &Action) -> NewOp {
        self.new_op_of(ENTITY_TYPE, action)
    }

    /// [`Self::new_op`] for an entity of type `entity_type`.
    fn new_op_of(&self, entity_type: &str, action: &Action) -> NewOp {
        let known = self
            .entities
            .get(action.id())
            .filter(|e| e.unacked == 0)
            .and_then(|e| e.known.clone());
        match action {
            Action::Create { id, data } => NewOp::create(entity_type, id, data.clone()),
            Action::Update { id, data } => {
                let op = NewOp::update(entity_type, id, data.clone());
                match known {
                    Some((version, base)) => op.with_base(base, version),
                    None => op,
                }
            }
            Action::Delete { id } => {
                let op = NewOp::delete(entity_type, id);
                match known {
                    Some((version, _)) => op.with_base_version(version),
                    None => op,
                }
            }
        }
    }

    /// The ops of a scene, to enqueue as one transaction.
    pub(crate) fn txn_ops(&self, changes: &[Change]) -> Vec<NewOp> {
        changes
            .iter()
            .map(|c| self.new_op_of(c.entity_type, &c.action))
            .collect()
    }

    /// Records the transaction the outbox stored for `changes`. Its ops are
    /// never coalesced, so each is stored as given.
    pub(crate) fn record_txn(&mut self, changes: &[Change], enqueued: &EnqueuedTransaction) {
        let mut ops = Vec::with_capacity(changes.len());
        for (c, e) in changes.iter().zip(&enqueued.ops) {
            if e.coalesced.is_some() {
                // The outbox promises it never happens; the model records
                // the op anyway, so the verdict sees the difference.
                tracing::error!("an op of a transaction was coalesced; the verdict will count it");
            }
            self.enqueued += 1;
            let kind = self.note_action(c.entity_type, &c.action);
            ops.push(self.ops.len());
            self.push(c.entity_type, &c.action, kind, e);
        }
        self.txns.push(TxnModel {
            id: enqueued.txn_id,
            ops,
        });
    }

    fn push(
        &mut self,
        entity_type: &'static str,
        action: &Action,
        kind: OpKind,
        enqueued: &Enqueued,
    ) {
        let index = self.ops.len();
        self.ops.push(StoredOp {
            op_id: enqueued.op_id,
            key: enqueued.idempotency_key,
            kind,
            entity_type,
            entity: action.id().to_owned(),
            payload: match action {
                Action::Create { data, .. } | Action::Update { data, .. } => data.clone(),
                Action::Delete { .. } => Value::Null,
            },
            removed: false,
            acked: false,
            reconciled: false,
            resolved: None,
            data_unknown: false,
        });
        self.by_id.insert(enqueued.op_id, index);
        let entity = self.entities.entry(action.id().to_owned()).or_default();
        entity.entity_type = entity_type;
        entity.ops.push(index);
        entity.unacked += 1;
    }

    fn remove(&mut self, op_id: OpId) {
        if let Some(&i) = self.by_id.get(&op_id) {
            let op = &mut self.ops[i];
            if !op.removed {
                op.removed = true;
                if !op.acked {
                    if let Some(e) = self.entities.get_mut(&op.entity) {
                        e.unacked = e.unacked.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// The model of device `device`, which knows the `boards` shared boards
    /// at version 1 with the data `seed(n)`.
    pub(crate) fn new(device: usize, boards: usize, seed: impl Fn(usize) -> Value) -> Self {
        Self {
            field: board_field(device),
            boards: (0..boards)
                .map(|n| BoardState {
                    id: board_id(n),
                    known: Some((1, seed(n))),
                    outstanding: None,
                    deferred: None,
                    last: 0,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// The user set the device's field of `board` to `value`.
    pub(crate) fn board_edit(&mut self, board: usize, value: u64) {
        if let Some(b) = self.boards.get_mut(board) {
            b.deferred = Some(value);
            b.last = value;
        }
    }

    /// The op that sends `board`'s waiting edit, when it can go now.
    pub(crate) fn board_op(&self, board: usize) -> Option<NewOp> {
        let b = self.boards.get(board)?;
        let value = b.deferred?;
        if b.outstanding.is_some() {
            return None;
        }
        let (version, data) = b.known.clone()?;
        let mut payload = data.clone();
        if let Value::Object(fields) = &mut payload {
            fields.insert(self.field.clone(), Value::from(value));
        }
        Some(NewOp::update(BOARD_TYPE, &b.id, payload).with_base(data, version))
    }

    /// Records the enqueue of [`Self::board_op`]'s op.
    pub(crate) fn record_board(&mut self, board: usize, payload: Value, enqueued: &Enqueued) {
        let Some(b) = self.boards.get_mut(board) else {
            return;
        };
        self.enqueued += 1;
        b.outstanding = Some(enqueued.op_id);
        b.deferred = None;
        if enqueued.coalesced.is_some() {
            // Cannot happen (nothing of the board was outstanding); a
            // merged op would break the model, so make it visible.
            tracing::error!("a board edit was coalesced; the verdict will count it");
            return;
        }
        self.by_id.insert(enqueued.op_id, self.ops.len());
        self.ops.push(StoredOp {
            op_id: enqueued.op_id,
            key: enqueued.idempotency_key,
            kind: OpKind::Update,
            entity_type: BOARD_TYPE,
            entity: b.id.clone(),
            payload,
            removed: false,
            acked: false,
            reconciled: false,
            resolved: None,
            data_unknown: false,
        });
    }

    /// Boards with an edit waiting or an op outstanding.
    pub(crate) fn boards_busy(&self) -> bool {
        self.boards
            .iter()
            .any(|b| b.deferred.is_some() || b.outstanding.is_some())
    }

    /// Boards whose op is outstanding or whose server state is unknown
    /// (to read again once the outbox is empty: the runner that applied the
    /// op may have been killed before it reported it).
    pub(crate) fn boards_to_refresh(&self) -> Vec<usize> {
        (0..self.boards.len())
            .filter(|&n| self.boards[n].outstanding.is_some() || self.boards[n].known.is_none())
            .collect()
    }

    /// The device read `board` from the server.
    pub(crate) fn board_refreshed(&mut self, board: usize, version: u64, data: Value) {
        if let Some(b) = self.boards.get_mut(board) {
            if let Some(op) = b.outstanding.take() {
                if let Some(&i) = self.by_id.get(&op) {
                    if !self.ops[i].acked {
                        self.ops[i].acked = true;
                        self.acked += 1;
                    }
                }
            }
            b.known = Some((version, data));
        }
    }

    /// A conflict of `op_id` was settled without a new request.
    pub(crate) fn on_settled_by_conflict(&mut self, op_id: OpId) {
        if let Some(&i) = self.by_id.get(&op_id) {
            self.ops[i].data_unknown = true;
        }
    }

    /// Records what the outbox did with `action`.
    pub(crate) fn record(&mut self, action: &Action, enqueued: &Enqueued) {
        self.enqueued += 1;
        let kind = self.note_action(ENTITY_TYPE, action);
        match &enqueued.coalesced {
            None => self.push(ENTITY_TYPE, action, kind, enqueued),
            Some(Coalesced::MergedInto { op_id, .. }) => {
                if let (Some(&i), Action::Update { data, .. }) = (self.by_id.get(op_id), action) {
                    self.ops[i].payload = data.clone();
                }
            }
            Some(Coalesced::Annihilated { removed }) => {
                for r in removed {
                    self.remove(r.op_id);
                }
            }
            Some(Coalesced::ReplacedUpdates { removed }) => {
                for r in removed {
                    self.remove(r.op_id);
                }
                self.push(ENTITY_TYPE, action, kind, enqueued);
            }
        }
    }

    /// Notes the entity's data after `action`; returns the op's kind.
    fn note_action(&mut self, entity_type: &'static str, action: &Action) -> OpKind {
        let entity = self.entities.entry(action.id().to_owned()).or_default();
        entity.entity_type = entity_type;
        match action {
            Action::Create { data, .. } => {
                entity.last = Some(data.clone());
                OpKind::Create
            }
            Action::Update { data, .. } => {
                entity.last = Some(data.clone());
                OpKind::Update
            }
            Action::Delete { .. } => {
                entity.last = None;
                OpKind::Delete
            }
        }
    }

    /// A runner applied `op_id` (server version `version`).
    pub(crate) fn on_applied(&mut self, op_id: OpId, version: Option<u64>) {
        let Some(&i) = self.by_id.get(&op_id) else {
            return;
        };
        let op = &mut self.ops[i];
        if op.acked || op.removed {
            return;
        }
        op.acked = true;
        self.acked += 1;
        let data = op.resolved.clone().unwrap_or_else(|| op.payload.clone());
        let known = if op.data_unknown {
            None
        } else {
            version.map(|v| (v, data.clone()))
        };
        if op.entity_type == BOARD_TYPE {
            if let Some(b) = self.boards.iter_mut().find(|b| b.id == op.entity) {
                if b.outstanding == Some(op_id) {
                    b.outstanding = None;
                    b.known = known;
                }
            }
            return;
        }
        if let Some(e) = self.entities.get_mut(&op.entity) {
            e.unacked = e.unacked.saturating_sub(1);
            e.known = known;
        }
    }

    /// A runner reconciled a conflict of `op_id` into a new request.
    pub(crate) fn on_reconciled(&mut self, op_id: OpId, resolved: Value) {
        if let Some(&i) = self.by_id.get(&op_id) {
            self.ops[i].reconciled = true;
            self.ops[i].resolved = Some(resolved);
        }
    }

    /// Ops that must take effect on the server (stored and not removed).
    pub(crate) fn expected_ops(&self) -> usize {
        self.ops.iter().filter(|o| !o.removed).count()
    }

    /// Each entity (type and id) with its ops that must take effect (in
    /// enqueue order) and its expected final state.
    pub(crate) fn entities(
        &self,
    ) -> impl Iterator<Item = (&'static str, &str, Vec<&StoredOp>, Expected)> {
        self.entities.iter().map(|(id, e)| {
            let ops: Vec<&StoredOp> = e
                .ops
                .iter()
                .map(|&i| &self.ops[i])
                .filter(|o| !o.removed)
                .collect();
            let expected = match (&e.last, ops.is_empty()) {
                (_, true) => Expected::Absent,
                (Some(data), false) => Expected::Live(data.clone()),
                (None, false) => Expected::Deleted,
            };
            (e.entity_type, id.as_str(), ops, expected)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardian_sync::outbox::RemovedOp;
    use serde_json::json;

    fn enq(n: u128, coalesced: Option<Coalesced>) -> Enqueued {
        Enqueued {
            op_id: Uuid::from_u128(n),
            idempotency_key: Uuid::from_u128(1000 + n),
            seq: i64::try_from(n).unwrap(),
            coalesced,
        }
    }

    #[test]
    fn mirrors_coalescing() {
        let mut m = DeviceModel::default();
        let create = Action::Create {
            id: "a".into(),
            data: json!({"x": 1}),
        };
        let update = Action::Update {
            id: "a".into(),
            data: json!({"x": 2}),
        };
        m.record(&create, &enq(1, None));
        m.record(
            &update,
            &enq(
                1,
                Some(Coalesced::MergedInto {
                    op_id: Uuid::from_u128(1),
                    seq: 1,
                }),
            ),
        );
        let (_, _, ops, expected) = m.entities().next().unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].payload, json!({"x": 2}));
        assert_eq!(expected, Expected::Live(json!({"x": 2})));
        m.record(
            &Action::Delete { id: "a".into() },
            &enq(
                3,
                Some(Coalesced::Annihilated {
                    removed: vec![RemovedOp {
                        op_id: Uuid::from_u128(1),
                        seq: 1,
                        kind: OpKind::Create,
                        txn_tokens: vec![],
                    }],
                }),
            ),
        );
        let (_, _, ops, expected) = m.entities().next().unwrap();
        assert!(ops.is_empty());
        assert_eq!(expected, Expected::Absent);
        assert_eq!(m.enqueued, 3);
        assert_eq!(m.expected_ops(), 0);
    }

    #[test]
    fn records_a_scene_as_one_transaction() {
        use crate::cmd::demo::workload::{LIGHT_TYPE, SCENE_TYPE};
        let mut m = DeviceModel::default();
        let scene = |light: Action, scene: Action| {
            [
                Change {
                    entity_type: LIGHT_TYPE,
                    action: light,
                },
                Change {
                    entity_type: SCENE_TYPE,
                    action: scene,
                },
            ]
        };
        let first = scene(
            Action::Create {
                id: "l".into(),
                data: json!({"on": true}),
            },
            Action::Create {
                id: "s".into(),
                data: json!({"n": 1}),
            },
        );
        let ops = m.txn_ops(&first);
        assert_eq!(
            (ops[0].entity_type.as_str(), ops[1].entity_type.as_str()),
            (LIGHT_TYPE, SCENE_TYPE)
        );
        m.record_txn(
            &first,
            &EnqueuedTransaction {
                txn_id: Uuid::from_u128(9),
                ops: vec![enq(1, None), enq(2, None)],
            },
        );
        assert_eq!(m.txns.len(), 1);
        assert_eq!(m.txns[0].ops, vec![0, 1]);
        assert_eq!((m.enqueued, m.expected_ops()), (2, 2));
        let types: Vec<(&str, &str, Expected)> =
            m.entities().map(|(t, id, _, e)| (t, id, e)).collect();
        assert_eq!(
            types,
            vec![
                (LIGHT_TYPE, "l", Expected::Live(json!({"on": true}))),
                (SCENE_TYPE, "s", Expected::Live(json!({"n": 1}))),
            ]
        );
        // The next scene carries the versions the acks taught.
        m.on_applied(Uuid::from_u128(1), Some(1));
        let next = scene(
            Action::Update {
                id: "l".into(),
                data: json!({"on": false}),
            },
            Action::Update {
                id: "s".into(),
                data: json!({"n": 2}),
            },
        );
        let ops = m.txn_ops(&next);
        assert_eq!(ops[0].base_version, Some(1));
        assert_eq!(ops[1].base_version, None, "the scene's create is unacked");
    }

    #[test]
    fn knows_the_version_only_when_nothing_is_outstanding() {
        let mut m = DeviceModel::default();
        let create = Action::Create {
            id: "a".into(),
            data: json!({"x": 1}),
        };
        m.record(&create, &enq(1, None));
        let update = Action::Update {
            id: "a".into(),
            data: json!({"x": 2}),
        };
        assert_eq!(m.new_op(&update).base_version, None);
        m.on_applied(Uuid::from_u128(1), Some(1));
        let op = m.new_op(&update);
        assert_eq!(op.base_version, Some(1));
        assert_eq!(op.base, Some(json!({"x": 1})));
    }
}
