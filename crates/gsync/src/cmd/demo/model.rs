//! The model of one device: which ops its outbox stores and what the server
//! must end up holding.
//!
//! It mirrors the outbox's coalescing exactly, from the [`Enqueued`] result of
//! every enqueue (merged into an op, annihilated, replaced), so after the run
//! the model knows the list of ops that must each take effect on the server
//! exactly once, per entity in enqueue order, and the final state of every
//! entity. Runner events (acks, reconciliations) only feed the progress bars
//! and the device's knowledge of server versions (for `If-Match`); the
//! verdict never trusts them, since a killed runner takes its last events
//! with it.

use std::collections::{BTreeMap, HashMap};

use guardian_sync::op::{NewOp, OpId, OpKind};
use guardian_sync::outbox::{Coalesced, Enqueued};
use serde_json::Value;
use uuid::Uuid;

use super::workload::{board_field, board_id, Action, BOARD_TYPE, ENTITY_TYPE};

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

#[derive(Debug, Default)]
struct EntityModel {
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
        let known = self
            .entities
            .get(action.id())
            .filter(|e| e.unacked == 0)
            .and_then(|e| e.known.clone());
        match action {
            Action::Create { id, data } => NewOp::create(ENTITY_TYPE, id, data.clone()),
            Action::Update { id, data } => {
                let op = NewOp::update(ENTITY_TYPE, id, data.clone());
                match known {
                    Some((version, base)) => op.with_base(base, version),
                    None => op,
                }
            }
            Action::Delete { id } => {
                let op = NewOp::delete(ENTITY_TYPE, id);
                match known {
                    Some((version, _)) => op.with_base_version(version),
                    None => op,
                }
            }
        }
    }

    fn push(&mut self, action: &Action, kind: OpKind, enqueued: &Enqueued) {
        let index = self.ops.len();
        self.ops.push(StoredOp {
            op_id: enqueued.op_id,
            key: enqueued.idempotency_key,
            kind,
            entity_type: ENTITY_TYPE,
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
        let entity = self.entities.entry(action.id().to_owned()).or_default();
        let kind = match action {
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
        };
        match &enqueued.coalesced {
            None => self.push(action, kind, enqueued),
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
                self.push(action, kind, enqueued);
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

    /// Each entity with its ops that must take effect (in enqueue order) and
    /// its expected final state.
    pub(crate) fn entities(&self) -> impl Iterator<Item = (&str, Vec<&StoredOp>, Expected)> {
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
            (id.as_str(), ops, expected)
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
        let (_, ops, expected) = m.entities().next().unwrap();
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
        let (_, ops, expected) = m.entities().next().unwrap();
        assert!(ops.is_empty());
        assert_eq!(expected, Expected::Absent);
        assert_eq!(m.enqueued, 3);
        assert_eq!(m.expected_ops(), 0);
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
