//! The verdict: the server's applied log and final entities against the model.
//!
//! Definitions (per entity, the model's ops are the ops the device's outbox
//! stored and did not coalesce away, in enqueue order; the applied rows are
//! the server's applied-log rows of the entity in order of application,
//! without the forced-conflict fault's own writes, whose keys start with
//! `fault:`):
//!
//! - **duplicated**: an idempotency key that appears in more than one
//!   applied row (an op that took effect twice);
//! - **lost**: model ops beyond the number of applied rows of the entity (an
//!   op that never took effect), plus ops still queued or failed in an outbox;
//! - **unexpected**: applied rows beyond the number of model ops, or rows of
//!   entities no device wrote;
//! - **order violations**: positions `i` where applied row `i` is not model
//!   op `i`: its key is the key of another op, or its kind differs. A row
//!   under a key the model never saw is model op `i` after a reconciled
//!   conflict (a 409 is a definitive "not applied"; the retry gets a new
//!   key), so it must have op `i`'s kind;
//! - **state mismatches**: entities whose final server state (live data,
//!   tombstone, or absent) differs from the model's;
//! - **half-applied transactions**: a transaction the devices enqueued whose
//!   rows under its `transaction_key` are not exactly one per op, on the
//!   op's entity, in the transaction's order, at consecutive cursors (each
//!   under the op's own key or, after a reconciled conflict, a key the model
//!   never saw), or one of whose op keys was applied outside it. A
//!   transaction with no row at all is unapplied: all or nothing holds, but
//!   a drained demo must have applied it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use guardian_server::AppliedMutation;
use guardian_sync::transport::Fetched;
use serde::Serialize;
use uuid::Uuid;

use super::model::{DeviceModel, Expected};
use super::workload::BOARD_TYPE;

/// Prefix of the keys the demo itself uses to create the shared boards.
pub(crate) const SETUP_KEY_PREFIX: &str = "demo-setup:";

/// Everything the demo measured and checked.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Verdict {
    pub(crate) passed: bool,
    pub(crate) seed: u64,
    pub(crate) devices: usize,
    pub(crate) ops_per_device: usize,
    pub(crate) fault_rate: f64,
    pub(crate) ops_enqueued: u64,
    pub(crate) coalesced_away: u64,
    pub(crate) ops_expected: u64,
    pub(crate) requests_sent: u64,
    pub(crate) applied_on_server: u64,
    pub(crate) concurrent_writes: u64,
    pub(crate) replayed: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) unexpected: u64,
    pub(crate) order_violations: u64,
    pub(crate) state_mismatches: u64,
    pub(crate) entities_checked: u64,
    /// Atomic transactions (scenes) the devices enqueued.
    pub(crate) transactions: u64,
    /// Of those, the ones applied whole.
    pub(crate) transactions_whole: u64,
    pub(crate) transactions_half_applied: u64,
    pub(crate) transactions_unapplied: u64,
    pub(crate) left_in_outboxes: u64,
    pub(crate) failed: u64,
    pub(crate) conflicts_resolved: u64,
    pub(crate) breaker_trips: u64,
    pub(crate) takeovers: u64,
    pub(crate) runners_killed: u64,
    pub(crate) offline_ms: u64,
    pub(crate) p95_latency_ms: f64,
    pub(crate) health_score: u8,
    pub(crate) elapsed_ms: u64,
    pub(crate) work_dir: Option<String>,
    /// The first few problems found, in words.
    pub(crate) problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 20;

impl Verdict {
    fn problem(&mut self, text: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        }
    }

    /// Checks the applied log (of the demo tenant) against the models.
    pub(crate) fn check_log(&mut self, models: &[&DeviceModel], log: &[AppliedMutation]) {
        let rows: Vec<&AppliedMutation> = log
            .iter()
            .filter(|r| r.tenant == super::server::TENANT)
            .collect();
        self.concurrent_writes = rows
            .iter()
            .filter(|r| r.idempotency_key.starts_with("fault:"))
            .count() as u64;
        let rows: Vec<&AppliedMutation> = rows
            .into_iter()
            .filter(|r| {
                !r.idempotency_key.starts_with("fault:")
                    && !r.idempotency_key.starts_with(SETUP_KEY_PREFIX)
            })
            .collect();
        self.applied_on_server = rows.len() as u64;

        let mut seen = HashSet::new();
        for r in &rows {
            if !seen.insert(r.idempotency_key.as_str()) {
                self.duplicated += 1;
                let text = format!(
                    "key {} applied twice ({} {})",
                    r.idempotency_key, r.entity_type, r.id
                );
                self.problem(text);
            }
        }

        let mut by_entity: HashMap<(&str, &str), Vec<&AppliedMutation>> = HashMap::new();
        for r in &rows {
            by_entity
                .entry((r.entity_type.as_str(), r.id.as_str()))
                .or_default()
                .push(r);
        }
        // Every key the devices enqueued with, and whose op it is.
        let mut owner: HashMap<String, Uuid> = HashMap::new();
        for m in models {
            for op in &m.ops {
                owner.insert(op.key.to_string(), op.op_id);
            }
        }
        let mut modelled: HashSet<(&str, String)> = HashSet::new();
        for m in models {
            for (entity_type, id, ops, _) in m.entities() {
                modelled.insert((entity_type, id.to_owned()));
                let applied = by_entity
                    .get(&(entity_type, id))
                    .map_or(&[][..], Vec::as_slice);
                for i in 0..ops.len().max(applied.len()) {
                    match (ops.get(i), applied.get(i)) {
                        (Some(op), Some(row)) => {
                            let same_key = row.idempotency_key == op.key.to_string();
                            let other_op = owner
                                .get(&row.idempotency_key)
                                .is_some_and(|o| *o != op.op_id);
                            if other_op || (!same_key && row.op != op.kind.mutation()) {
                                self.order_violations += 1;
                                let text = format!(
                                    "{entity_type}/{id}: applied #{} is a {} under key {}, expected the {} enqueued with key {}",
                                    i + 1,
                                    row.op.as_str(),
                                    row.idempotency_key,
                                    op.kind.as_str(),
                                    op.key
                                );
                                self.problem(text);
                            }
                        }
                        (Some(op), None) => {
                            self.lost += 1;
                            let text = format!(
                                "{entity_type}/{id}: the {} enqueued with key {} never took effect",
                                op.kind.as_str(),
                                op.key
                            );
                            self.problem(text);
                        }
                        (None, Some(row)) => {
                            self.unexpected += 1;
                            let text = format!(
                                "{entity_type}/{id}: unexpected {} under key {}",
                                row.op.as_str(),
                                row.idempotency_key
                            );
                            self.problem(text);
                        }
                        (None, None) => {}
                    }
                }
            }
        }
        self.check_boards(models, &by_entity, &mut modelled);
        self.check_transactions(models, &rows, &owner);
        for ((entity_type, id), rows) in &by_entity {
            if !modelled.contains(&(*entity_type, (*id).to_owned())) {
                self.unexpected += rows.len() as u64;
                self.problem(format!(
                    "{entity_type}/{id}: written but no device wrote it"
                ));
            }
        }
    }

    /// Shared boards: every device's board ops must each take effect once
    /// (counted over the board, since reconciled keys cannot be attributed
    /// to a device), and the rows under a device's own keys must come in
    /// that device's enqueue order.
    fn check_boards(
        &mut self,
        models: &[&DeviceModel],
        by_entity: &HashMap<(&str, &str), Vec<&AppliedMutation>>,
        modelled: &mut HashSet<(&str, String)>,
    ) {
        let mut boards: HashSet<&str> = HashSet::new();
        for m in models {
            for b in &m.boards {
                boards.insert(b.id.as_str());
            }
        }
        for board in boards {
            modelled.insert((BOARD_TYPE, board.to_owned()));
            // key → (device, position among the device's ops on this board)
            let mut owner: HashMap<String, (usize, usize)> = HashMap::new();
            let mut expected = 0usize;
            for (d, m) in models.iter().enumerate() {
                let ops = m
                    .ops
                    .iter()
                    .filter(|o| o.entity_type == BOARD_TYPE && o.entity == board && !o.removed);
                for (i, op) in ops.enumerate() {
                    owner.insert(op.key.to_string(), (d, i));
                    expected += 1;
                }
            }
            let rows = by_entity
                .get(&(BOARD_TYPE, board))
                .map_or(&[][..], Vec::as_slice);
            if rows.len() < expected {
                self.lost += (expected - rows.len()) as u64;
                self.problem(format!(
                    "{BOARD_TYPE}/{board}: {} of {expected} edits never took effect",
                    expected - rows.len()
                ));
            } else if rows.len() > expected {
                self.unexpected += (rows.len() - expected) as u64;
                self.problem(format!(
                    "{BOARD_TYPE}/{board}: {} applied rows for {expected} edits",
                    rows.len()
                ));
            }
            let mut last: HashMap<usize, usize> = HashMap::new();
            for row in rows {
                if let Some(&(d, i)) = owner.get(&row.idempotency_key) {
                    if last.get(&d).is_some_and(|&prev| prev >= i) {
                        self.order_violations += 1;
                        self.problem(format!(
                            "{BOARD_TYPE}/{board}: device {d}'s edit #{} applied after a later one",
                            i + 1
                        ));
                    }
                    last.insert(d, i);
                }
            }
        }
    }

    /// Atomicity, through the applied log: every transaction of the models
    /// took effect whole (see the module's definitions) or not at all, and
    /// no row claims a transaction no device enqueued. `owner` maps every
    /// key the devices enqueued with to its op.
    fn check_transactions(
        &mut self,
        models: &[&DeviceModel],
        rows: &[&AppliedMutation],
        owner: &HashMap<String, Uuid>,
    ) {
        let mut by_txn: HashMap<&str, Vec<&AppliedMutation>> = HashMap::new();
        let mut by_key: HashMap<&str, Vec<&AppliedMutation>> = HashMap::new();
        for r in rows {
            if let Some(t) = &r.transaction_key {
                by_txn.entry(t.as_str()).or_default().push(r);
            }
            by_key
                .entry(r.idempotency_key.as_str())
                .or_default()
                .push(r);
        }
        for (d, m) in models.iter().enumerate() {
            for txn in &m.txns {
                self.transactions += 1;
                let id = txn.id.to_string();
                let mut applied = by_txn.remove(id.as_str()).unwrap_or_default();
                applied.sort_by_key(|r| r.cursor);
                // An op of the transaction applied alone, or in another one.
                let outside = txn
                    .ops
                    .iter()
                    .flat_map(|&i| by_key.get(m.ops[i].key.to_string().as_str()))
                    .flatten()
                    .filter(|r| r.transaction_key.as_deref() != Some(id.as_str()))
                    .count();
                if applied.is_empty() && outside == 0 {
                    self.transactions_unapplied += 1;
                    self.problem(format!(
                        "device {d}: transaction {id} ({} ops) never took effect",
                        txn.ops.len()
                    ));
                    continue;
                }
                let first = applied.first().map_or(0, |r| r.cursor);
                let mut whole = outside == 0 && applied.len() == txn.ops.len();
                for (n, (&i, row)) in txn.ops.iter().zip(&applied).enumerate() {
                    let op = &m.ops[i];
                    let key_ok = row.idempotency_key == op.key.to_string()
                        || !owner.contains_key(&row.idempotency_key);
                    whole &= row.entity_type == op.entity_type
                        && row.id == op.entity
                        && key_ok
                        && row.cursor == first + n as u64;
                }
                if whole {
                    self.transactions_whole += 1;
                } else {
                    self.transactions_half_applied += 1;
                    let rows: Vec<String> = applied
                        .iter()
                        .map(|r| format!("{}/{}@{}", r.entity_type, r.id, r.cursor))
                        .collect();
                    self.problem(format!(
                        "device {d}: transaction {id} of {} ops half-applied: rows [{}], {outside} op(s) applied outside it",
                        txn.ops.len(),
                        rows.join(", ")
                    ));
                }
            }
        }
        for (key, rows) in by_txn {
            self.transactions_half_applied += 1;
            self.problem(format!(
                "{} row(s) under transaction key {key}, which no device enqueued",
                rows.len()
            ));
        }
    }

    /// Compares one entity's final server state with the model.
    pub(crate) fn check_state(
        &mut self,
        entity_type: &str,
        id: &str,
        expected: &Expected,
        actual: &Fetched,
    ) {
        self.entities_checked += 1;
        let ok = match (expected, actual) {
            (Expected::Live(data), Fetched::Present(e)) => !e.deleted && e.data == *data,
            (Expected::Deleted, Fetched::Deleted) | (Expected::Absent, Fetched::Absent) => true,
            (Expected::Deleted, Fetched::Present(e)) => e.deleted,
            _ => false,
        };
        if !ok {
            self.state_mismatches += 1;
            let text = format!("{entity_type}/{id}: expected {expected:?}, server has {actual:?}");
            self.problem(text);
        }
    }

    /// Sets `passed` from the invariants.
    pub(crate) fn decide(&mut self) {
        self.passed = self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.order_violations == 0
            && self.state_mismatches == 0
            && self.transactions_half_applied == 0
            && self.transactions_unapplied == 0
            && self.left_in_outboxes == 0
            && self.failed == 0
            && self.problems.is_empty();
    }

    /// The human-readable table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |label: &str, value: String, check: Option<bool>| {
            let mark = match check {
                Some(true) => "  ok",
                Some(false) => "  FAIL",
                None => "",
            };
            let _ = writeln!(out, "  {label:<34} {value:>10}{mark}");
        };
        row("ops enqueued", self.ops_enqueued.to_string(), None);
        row("coalesced away", self.coalesced_away.to_string(), None);
        row("ops to apply (model)", self.ops_expected.to_string(), None);
        row("requests sent", self.requests_sent.to_string(), None);
        row(
            "applied on the server",
            self.applied_on_server.to_string(),
            None,
        );
        row("replayed (lost responses)", self.replayed.to_string(), None);
        row(
            "concurrent writer bumps",
            self.concurrent_writes.to_string(),
            None,
        );
        row("lost", self.lost.to_string(), Some(self.lost == 0));
        row(
            "duplicated",
            self.duplicated.to_string(),
            Some(self.duplicated == 0),
        );
        row(
            "unexpected effects",
            self.unexpected.to_string(),
            Some(self.unexpected == 0),
        );
        row(
            "order violations",
            self.order_violations.to_string(),
            Some(self.order_violations == 0),
        );
        row(
            "final state == model",
            format!(
                "{}/{}",
                self.entities_checked - self.state_mismatches,
                self.entities_checked
            ),
            Some(self.state_mismatches == 0),
        );
        row(
            "scenes (atomic transactions)",
            self.transactions.to_string(),
            None,
        );
        row(
            "transactions applied whole",
            format!("{}/{}", self.transactions_whole, self.transactions),
            Some(self.transactions_whole == self.transactions),
        );
        row(
            "half-applied transactions",
            self.transactions_half_applied.to_string(),
            Some(self.transactions_half_applied == 0),
        );
        row(
            "left in outboxes / failed",
            format!("{}/{}", self.left_in_outboxes, self.failed),
            Some(self.left_in_outboxes == 0 && self.failed == 0),
        );
        row(
            "conflicts resolved",
            self.conflicts_resolved.to_string(),
            None,
        );
        row("breaker trips", self.breaker_trips.to_string(), None);
        row(
            "lock takeovers (runner SIGKILLed)",
            format!("{} ({})", self.takeovers, self.runners_killed),
            None,
        );
        row(
            "offline window",
            format!("{:.1} s", self.offline_ms as f64 / 1000.0),
            None,
        );
        row(
            "p95 latency (worst runner)",
            format!("{:.1} ms", self.p95_latency_ms),
            None,
        );
        row("health score (mean)", self.health_score.to_string(), None);
        row(
            "elapsed",
            format!("{:.1} s", self.elapsed_ms as f64 / 1000.0),
            None,
        );
        let mut text = format!(
            "gsync demo: {} devices x {} ops, fault rate {}, seed {}\n{out}",
            self.devices, self.ops_per_device, self.fault_rate, self.seed
        );
        for p in &self.problems {
            let _ = writeln!(text, "  problem: {p}");
        }
        let _ = writeln!(
            text,
            "verdict: {}",
            if self.passed {
                "PASS (no op lost, none applied twice, every entity in order and as modelled, \
                 no transaction half-applied)"
            } else {
                "FAIL"
            }
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::demo::workload::{Action, Change, ENTITY_TYPE, LIGHT_TYPE, SCENE_TYPE};
    use guardian_protocol::MutationKind;
    use guardian_sync::outbox::{Enqueued, EnqueuedTransaction};
    use serde_json::json;

    fn row(seq: u64, key: &str, id: &str, op: MutationKind) -> AppliedMutation {
        AppliedMutation {
            seq,
            tenant: super::super::server::TENANT.into(),
            idempotency_key: key.into(),
            entity_type: ENTITY_TYPE.into(),
            id: id.into(),
            op,
            version: seq,
            cursor: seq,
            at_millis: 0,
            transaction_key: None,
        }
    }

    /// A model with one scene: light "l" created, scene "s" created, as
    /// transaction 900 with op keys 200 and 201.
    fn scene_model() -> DeviceModel {
        let mut m = DeviceModel::default();
        let changes = [
            Change {
                entity_type: LIGHT_TYPE,
                action: Action::Create {
                    id: "l".into(),
                    data: json!({"on": true}),
                },
            },
            Change {
                entity_type: SCENE_TYPE,
                action: Action::Create {
                    id: "s".into(),
                    data: json!({"activations": 1}),
                },
            },
        ];
        let ops = (0..2u128)
            .map(|n| Enqueued {
                op_id: Uuid::from_u128(50 + n),
                idempotency_key: Uuid::from_u128(200 + n),
                seq: i64::try_from(n).unwrap(),
                coalesced: None,
            })
            .collect();
        m.record_txn(
            &changes,
            &EnqueuedTransaction {
                txn_id: Uuid::from_u128(900),
                ops,
            },
        );
        m
    }

    fn txn_row(cursor: u64, key: &str, entity_type: &str, id: &str, txn: &str) -> AppliedMutation {
        AppliedMutation {
            entity_type: entity_type.into(),
            transaction_key: Some(txn.into()),
            ..row(cursor, key, id, MutationKind::Create)
        }
    }

    #[test]
    fn whole_transaction_passes() {
        let m = scene_model();
        let mut v = Verdict::default();
        let log = vec![
            txn_row(1, &key(200), LIGHT_TYPE, "l", &key(900)),
            txn_row(2, &key(201), SCENE_TYPE, "s", &key(900)),
        ];
        v.check_log(&[&m], &log);
        v.decide();
        assert!(v.passed, "{:?}", v.problems);
        assert_eq!((v.transactions, v.transactions_whole), (1, 1));
    }

    #[test]
    fn reconciled_op_in_a_whole_transaction_passes() {
        // The scene's op got a new key from a reconciled conflict; the
        // transaction went again whole under its own key.
        let m = scene_model();
        let mut v = Verdict::default();
        let log = vec![
            txn_row(4, "reconciled", LIGHT_TYPE, "l", &key(900)),
            txn_row(5, &key(201), SCENE_TYPE, "s", &key(900)),
        ];
        v.check_log(&[&m], &log);
        assert_eq!(v.transactions_whole, 1, "{:?}", v.problems);
    }

    #[test]
    fn finds_half_applied_transactions() {
        let m = scene_model();
        let broken = [
            // One op only.
            vec![txn_row(1, &key(200), LIGHT_TYPE, "l", &key(900))],
            // Another write between its ops.
            vec![
                txn_row(1, &key(200), LIGHT_TYPE, "l", &key(900)),
                txn_row(3, &key(201), SCENE_TYPE, "s", &key(900)),
            ],
            // One op applied on its own, outside the transaction.
            vec![
                txn_row(1, &key(200), LIGHT_TYPE, "l", &key(900)),
                AppliedMutation {
                    entity_type: SCENE_TYPE.into(),
                    ..row(2, &key(201), "s", MutationKind::Create)
                },
            ],
            // Applied twice.
            vec![
                txn_row(1, &key(200), LIGHT_TYPE, "l", &key(900)),
                txn_row(2, &key(201), SCENE_TYPE, "s", &key(900)),
                txn_row(3, &key(200), LIGHT_TYPE, "l", &key(900)),
                txn_row(4, &key(201), SCENE_TYPE, "s", &key(900)),
            ],
        ];
        for log in broken {
            let mut v = Verdict::default();
            v.check_log(&[&m], &log);
            v.decide();
            assert_eq!(v.transactions_half_applied, 1, "{log:?}");
            assert!(!v.passed);
        }
        let mut v = Verdict::default();
        v.check_log(&[&m], &[]);
        v.decide();
        assert_eq!((v.transactions_unapplied, v.passed), (1, false));
    }

    fn model() -> DeviceModel {
        let mut m = DeviceModel::default();
        for (n, action) in [
            Action::Create {
                id: "a".into(),
                data: json!({}),
            },
            Action::Update {
                id: "a".into(),
                data: json!({"x": 1}),
            },
        ]
        .iter()
        .enumerate()
        {
            m.record(
                action,
                &Enqueued {
                    op_id: Uuid::from_u128(n as u128),
                    idempotency_key: Uuid::from_u128(100 + n as u128),
                    seq: n as i64,
                    coalesced: None,
                },
            );
        }
        m
    }

    fn key(n: u128) -> String {
        Uuid::from_u128(n).to_string()
    }

    #[test]
    fn clean_log_passes() {
        let m = model();
        let mut v = Verdict::default();
        let log = vec![
            row(1, &key(100), "a", MutationKind::Create),
            row(2, "fault:conflict:0", "a", MutationKind::Update),
            row(3, "reconciled-key", "a", MutationKind::Update),
        ];
        v.check_log(&[&m], &log);
        v.decide();
        assert!(v.passed, "{:?}", v.problems);
        assert_eq!(v.concurrent_writes, 1);
        assert_eq!(v.applied_on_server, 2);
    }

    #[test]
    fn finds_lost_duplicated_and_reordered() {
        let m = model();
        let mut v = Verdict::default();
        v.check_log(&[&m], &[row(1, &key(100), "a", MutationKind::Create)]);
        assert_eq!(v.lost, 1);

        let mut v = Verdict::default();
        let log = vec![
            row(1, &key(100), "a", MutationKind::Create),
            row(2, &key(101), "a", MutationKind::Update),
            row(3, &key(101), "a", MutationKind::Update),
        ];
        v.check_log(&[&m], &log);
        assert_eq!((v.duplicated, v.unexpected), (1, 1));

        let mut v = Verdict::default();
        let log = vec![
            row(1, &key(101), "a", MutationKind::Update),
            row(2, &key(100), "a", MutationKind::Create),
        ];
        v.check_log(&[&m], &log);
        assert_eq!(v.order_violations, 2);
        v.decide();
        assert!(!v.passed);
    }
}
