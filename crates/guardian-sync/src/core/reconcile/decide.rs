//! The reconciler's decision after a 409/412 data conflict.
//!
//! Sans-IO: the engine fetches the server's current entity and calls
//! [`Reconciler::decide`]; it gets back what to do. The table:
//!
//! | op     | server entity          | LocalWins / Custom               | RemoteWins                  |
//! |--------|------------------------|----------------------------------|-----------------------------|
//! | CREATE | equal data             | Succeeded (already applied)      | same                        |
//! | CREATE | different data         | Retry as UPDATE, merged, If-Match current | Succeeded (remote adopted) |
//! | CREATE | absent (404)           | Retry as CREATE                  | same                        |
//! | any    | deleted (410/tombstone), CREATE or UPDATE | Fail (remote deleted) | Succeeded (superseded) |
//! | UPDATE | present                | Retry, 3-way merge, If-Match current; Succeeded if the merge equals the server | same, merged with remote winning |
//! | UPDATE | absent (404)           | Fail (remote deleted)            | Succeeded (superseded)      |
//! | DELETE | absent or deleted      | Succeeded (already gone)         | same                        |
//! | DELETE | present                | Retry DELETE, If-Match current   | Succeeded (superseded: the entity stays) |
//!
//! A remote deletion is never silently undone: only `RemoteWins` accepts
//! it, otherwise the op fails (kept in the dead-letter list) so the app
//! decides. A retry beyond `max_reconciliations` fails instead, with both
//! versions kept. "Succeeded" carries the server's version and data, so the
//! engine acks the op with them and the next op of the entity chains on it.

use guardian_protocol::{json_eq, Entity, MutationKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::merge::{merge3, FieldConflict};
use super::policy::{ConflictPolicy, ReconcilePolicies};

/// Everything the decision needs about one conflicted op.
#[derive(Debug, Clone, Copy)]
pub struct ConflictInput<'a> {
    /// What the op does.
    pub kind: MutationKind,
    /// The entity type (selects the policy).
    pub entity_type: &'a str,
    /// The op's payload (`null` for a delete).
    pub payload: &'a Value,
    /// The entity state the op was made from, if known.
    pub base: Option<&'a Value>,
    /// The server's current entity; `None` if it answered 404. A tombstone
    /// (`deleted`, or a 410) counts as deleted.
    pub current: Option<&'a Entity>,
    /// Reconciliations this op has already been through.
    pub reconciliations: u32,
}

/// Why a conflicted op was settled without a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SettledReason {
    /// The server already holds exactly what the op wanted (a create that
    /// was applied before, or a merge equal to the server's data).
    AlreadyApplied,
    /// The entity is already gone, as the delete wanted.
    AlreadyGone,
    /// `RemoteWins`: the server's state is kept and the op dropped.
    Superseded,
}

/// Why a conflicted op failed (it is kept as `failed`, never dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailReason {
    /// The op conflicted more than `max_reconciliations` times.
    TooManyReconciliations,
    /// The server deleted the entity; only `RemoteWins` accepts that.
    RemoteDeleted,
    /// The merge is larger than the outbox's payload limit.
    MergeTooLarge,
}

/// What the engine does with a conflicted op.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Resolution {
    /// Nothing more to send: ack the op with the server's state.
    Succeeded {
        /// Why no retry is needed.
        reason: SettledReason,
        /// The server's current version (for version chaining), if any.
        version: Option<u64>,
        /// The server's current data, if it has the entity.
        data: Option<Value>,
    },
    /// Send again as a new request with a fresh idempotency key.
    Retry {
        /// How to send it (a conflicted CREATE retries as an UPDATE).
        send_as: MutationKind,
        /// The body to send (merged), `null` for a delete.
        payload: Value,
        /// The version to put in `If-Match`.
        if_match: Option<u64>,
        /// The new base: the server data the payload was merged onto.
        base: Option<Value>,
        /// Fields both sides changed, and how each was settled.
        conflicts: Vec<FieldConflict>,
    },
    /// Give up: the op becomes `failed` with both sides kept for the app.
    Fail {
        /// Why.
        reason: FailReason,
        /// The op's payload.
        local: Value,
        /// The server's data, if it has the entity.
        remote: Option<Value>,
    },
}

/// Decides how to settle 409/412 conflicts, per entity-type policy.
#[derive(Debug, Clone)]
pub struct Reconciler {
    policies: ReconcilePolicies,
    max_reconciliations: u32,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new(
            ReconcilePolicies::default(),
            Self::DEFAULT_MAX_RECONCILIATIONS,
        )
    }
}

impl Reconciler {
    /// Reconciliations allowed per op by default.
    pub const DEFAULT_MAX_RECONCILIATIONS: u32 = 5;

    /// A reconciler with these policies, allowing at most
    /// `max_reconciliations` retries per op.
    pub fn new(policies: ReconcilePolicies, max_reconciliations: u32) -> Self {
        Self {
            policies,
            max_reconciliations,
        }
    }

    /// The per-type policies.
    pub fn policies(&self) -> &ReconcilePolicies {
        &self.policies
    }

    /// Retries allowed per op.
    pub fn max_reconciliations(&self) -> u32 {
        self.max_reconciliations
    }

    /// `local`, an edit made on top of `base`, moved onto `onto` (what
    /// `base` became: its op's merge with the server's change), with the
    /// type's policy for fields both changed.
    pub fn rebase(&self, entity_type: &str, base: &Value, local: &Value, onto: &Value) -> Value {
        merge3(Some(base), local, onto, self.policies.get(entity_type)).merged
    }

    /// Decides what to do with one conflicted op. See the module table.
    pub fn decide(&self, input: &ConflictInput<'_>) -> Resolution {
        let policy = self.policies.get(input.entity_type);
        let remote_wins = matches!(policy, ConflictPolicy::RemoteWins);
        let live = input.current.filter(|e| !e.deleted);
        let tombstone = input.current.is_some_and(|e| e.deleted);
        let resolution = match (input.kind, live) {
            (MutationKind::Delete, None) => settled(SettledReason::AlreadyGone, input.current),
            (MutationKind::Delete, Some(cur)) if remote_wins => {
                settled(SettledReason::Superseded, Some(cur))
            }
            (MutationKind::Delete, Some(cur)) => Resolution::Retry {
                send_as: MutationKind::Delete,
                payload: Value::Null,
                if_match: Some(cur.version),
                base: Some(cur.data.clone()),
                conflicts: Vec::new(),
            },
            (MutationKind::Create, None) if !tombstone => Resolution::Retry {
                send_as: MutationKind::Create,
                payload: input.payload.clone(),
                if_match: None,
                base: None,
                conflicts: Vec::new(),
            },
            (MutationKind::Create | MutationKind::Update, None) if remote_wins => {
                settled(SettledReason::Superseded, input.current)
            }
            (MutationKind::Create | MutationKind::Update, None) => Resolution::Fail {
                reason: FailReason::RemoteDeleted,
                local: input.payload.clone(),
                remote: None,
            },
            (MutationKind::Create, Some(cur)) if json_eq(&cur.data, input.payload) => {
                settled(SettledReason::AlreadyApplied, Some(cur))
            }
            (MutationKind::Create, Some(cur)) if remote_wins => {
                settled(SettledReason::Superseded, Some(cur))
            }
            (MutationKind::Create | MutationKind::Update, Some(cur)) => {
                let out = merge3(input.base, input.payload, &cur.data, policy);
                if json_eq(&out.merged, &cur.data) {
                    let reason = if out.is_clean() && !remote_wins {
                        SettledReason::AlreadyApplied
                    } else {
                        SettledReason::Superseded
                    };
                    settled(reason, Some(cur))
                } else {
                    Resolution::Retry {
                        send_as: MutationKind::Update,
                        payload: out.merged,
                        if_match: Some(cur.version),
                        base: Some(cur.data.clone()),
                        conflicts: out.conflicts,
                    }
                }
            }
        };
        match resolution {
            Resolution::Retry { .. } if input.reconciliations >= self.max_reconciliations => {
                Resolution::Fail {
                    reason: FailReason::TooManyReconciliations,
                    local: input.payload.clone(),
                    remote: live.map(|e| e.data.clone()),
                }
            }
            other => other,
        }
    }
}

fn settled(reason: SettledReason, current: Option<&Entity>) -> Resolution {
    Resolution::Succeeded {
        reason,
        version: current.map(|e| e.version),
        data: current.filter(|e| !e.deleted).map(|e| e.data.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entity(version: u64, data: Value) -> Entity {
        Entity {
            entity_type: "device".into(),
            id: "d1".into(),
            version,
            data,
            updated_at: "2026-01-01T00:00:00Z".into(),
            deleted: false,
        }
    }

    fn tombstone(version: u64) -> Entity {
        Entity {
            deleted: true,
            ..entity(version, Value::Null)
        }
    }

    fn input<'a>(
        kind: MutationKind,
        payload: &'a Value,
        base: Option<&'a Value>,
        current: Option<&'a Entity>,
    ) -> ConflictInput<'a> {
        ConflictInput {
            kind,
            entity_type: "device",
            payload,
            base,
            current,
            reconciliations: 0,
        }
    }

    fn local_wins() -> Reconciler {
        Reconciler::default()
    }

    fn remote_wins() -> Reconciler {
        Reconciler::new(
            ReconcilePolicies::new().with("device", ConflictPolicy::RemoteWins),
            3,
        )
    }

    #[test]
    fn create_already_applied_with_equal_data() {
        let p = json!({"on": true});
        let cur = entity(1, json!({"on": true}));
        for r in [local_wins(), remote_wins()] {
            assert_eq!(
                r.decide(&input(MutationKind::Create, &p, None, Some(&cur))),
                Resolution::Succeeded {
                    reason: SettledReason::AlreadyApplied,
                    version: Some(1),
                    data: Some(json!({"on": true})),
                }
            );
        }
    }

    #[test]
    fn create_with_different_data_local_wins_retries_as_update() {
        let p = json!({"on": true, "name": "lamp"});
        let cur = entity(4, json!({"on": false, "room": "hall"}));
        assert_eq!(
            local_wins().decide(&input(MutationKind::Create, &p, None, Some(&cur))),
            Resolution::Retry {
                send_as: MutationKind::Update,
                payload: json!({"on": true, "name": "lamp", "room": "hall"}),
                if_match: Some(4),
                base: Some(json!({"on": false, "room": "hall"})),
                conflicts: vec![],
            }
        );
    }

    #[test]
    fn create_with_different_data_remote_wins_adopts_remote() {
        let p = json!({"on": true});
        let cur = entity(4, json!({"on": false}));
        assert_eq!(
            remote_wins().decide(&input(MutationKind::Create, &p, None, Some(&cur))),
            Resolution::Succeeded {
                reason: SettledReason::Superseded,
                version: Some(4),
                data: Some(json!({"on": false})),
            }
        );
    }

    #[test]
    fn create_whose_entity_vanished_retries_as_create() {
        let p = json!({"on": true});
        let r = local_wins().decide(&input(MutationKind::Create, &p, None, None));
        assert!(matches!(
            r,
            Resolution::Retry {
                send_as: MutationKind::Create,
                if_match: None,
                ..
            }
        ));
    }

    #[test]
    fn remote_deletion_fails_unless_remote_wins() {
        let p = json!({"on": true});
        let t = tombstone(7);
        for kind in [MutationKind::Create, MutationKind::Update] {
            assert_eq!(
                local_wins().decide(&input(kind, &p, Some(&p), Some(&t))),
                Resolution::Fail {
                    reason: FailReason::RemoteDeleted,
                    local: p.clone(),
                    remote: None,
                },
                "{kind:?}"
            );
            assert_eq!(
                remote_wins().decide(&input(kind, &p, Some(&p), Some(&t))),
                Resolution::Succeeded {
                    reason: SettledReason::Superseded,
                    version: Some(7),
                    data: None,
                }
            );
        }
        // An UPDATE whose entity answers 404 is a remote deletion too.
        assert!(matches!(
            local_wins().decide(&input(MutationKind::Update, &p, Some(&p), None)),
            Resolution::Fail {
                reason: FailReason::RemoteDeleted,
                ..
            }
        ));
    }

    #[test]
    fn update_merges_three_way_and_retries_at_current_version() {
        let base = json!({"on": false, "level": 1, "name": "a"});
        let p = json!({"on": true, "level": 1, "name": "b"});
        let cur = entity(9, json!({"on": false, "level": 5, "name": "c"}));
        let Resolution::Retry {
            send_as,
            payload,
            if_match,
            base: new_base,
            conflicts,
        } = local_wins().decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur)))
        else {
            panic!("expected a retry");
        };
        assert_eq!(send_as, MutationKind::Update);
        assert_eq!(payload, json!({"on": true, "level": 5, "name": "b"}));
        assert_eq!(if_match, Some(9));
        assert_eq!(new_base, Some(cur.data.clone()));
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].path, "/name");

        let Resolution::Retry { payload, .. } =
            remote_wins().decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur)))
        else {
            panic!("expected a retry");
        };
        assert_eq!(payload, json!({"on": true, "level": 5, "name": "c"}));
    }

    #[test]
    fn update_whose_merge_equals_the_server_is_settled() {
        let base = json!({"on": false});
        let p = json!({"on": true});
        let cur = entity(3, json!({"on": true}));
        assert_eq!(
            local_wins().decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur))),
            Resolution::Succeeded {
                reason: SettledReason::AlreadyApplied,
                version: Some(3),
                data: Some(json!({"on": true})),
            }
        );
        let cur = entity(3, json!({"on": false, "x": 1}));
        let p = json!({"on": true, "x": 0});
        let base = json!({"on": false, "x": 0});
        // A change made only locally is kept even under RemoteWins.
        let r = remote_wins().decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur)));
        assert!(matches!(r, Resolution::Retry { .. }));
        // Remote wins every changed field: nothing left to send.
        let p = json!({"on": false, "x": 2});
        let r = remote_wins().decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur)));
        assert_eq!(
            r,
            Resolution::Succeeded {
                reason: SettledReason::Superseded,
                version: Some(3),
                data: Some(json!({"on": false, "x": 1})),
            }
        );
    }

    #[test]
    fn update_with_custom_policy() {
        let r = Reconciler::new(
            ReconcilePolicies::new().with(
                "device",
                ConflictPolicy::custom(|ctx| {
                    let l = ctx.local.and_then(Value::as_i64).unwrap_or(0);
                    let r = ctx.remote.and_then(Value::as_i64).unwrap_or(0);
                    json!(l + r)
                }),
            ),
            3,
        );
        let base = json!({"n": 1});
        let p = json!({"n": 2});
        let cur = entity(2, json!({"n": 10}));
        let Resolution::Retry { payload, .. } =
            r.decide(&input(MutationKind::Update, &p, Some(&base), Some(&cur)))
        else {
            panic!("expected a retry");
        };
        assert_eq!(payload, json!({"n": 12}));
    }

    #[test]
    fn update_without_base_is_two_way() {
        let p = json!({"on": true});
        let cur = entity(2, json!({"on": false, "room": "x"}));
        let Resolution::Retry { payload, .. } =
            remote_wins().decide(&input(MutationKind::Update, &p, None, Some(&cur)))
        else {
            panic!("expected a retry");
        };
        assert_eq!(payload, json!({"on": true, "room": "x"}));
    }

    #[test]
    fn delete_outcomes() {
        let null = Value::Null;
        let cur = entity(5, json!({"on": true}));
        let t = tombstone(6);
        for r in [local_wins(), remote_wins()] {
            for gone in [None, Some(&t)] {
                assert!(matches!(
                    r.decide(&input(MutationKind::Delete, &null, None, gone)),
                    Resolution::Succeeded {
                        reason: SettledReason::AlreadyGone,
                        data: None,
                        ..
                    }
                ));
            }
        }
        assert_eq!(
            local_wins().decide(&input(MutationKind::Delete, &null, None, Some(&cur))),
            Resolution::Retry {
                send_as: MutationKind::Delete,
                payload: Value::Null,
                if_match: Some(5),
                base: Some(json!({"on": true})),
                conflicts: vec![],
            }
        );
        assert_eq!(
            remote_wins().decide(&input(MutationKind::Delete, &null, None, Some(&cur))),
            Resolution::Succeeded {
                reason: SettledReason::Superseded,
                version: Some(5),
                data: Some(json!({"on": true})),
            }
        );
    }

    #[test]
    fn retries_are_bounded() {
        let null = Value::Null;
        let cur = entity(5, json!({"on": true}));
        let r = Reconciler::new(ReconcilePolicies::new(), 2);
        let mut i = input(MutationKind::Delete, &null, None, Some(&cur));
        i.reconciliations = 1;
        assert!(matches!(r.decide(&i), Resolution::Retry { .. }));
        i.reconciliations = 2;
        assert_eq!(
            r.decide(&i),
            Resolution::Fail {
                reason: FailReason::TooManyReconciliations,
                local: Value::Null,
                remote: Some(json!({"on": true})),
            }
        );
        // Settling needs no retry, so the bound does not apply.
        i.current = None;
        assert!(matches!(r.decide(&i), Resolution::Succeeded { .. }));
    }
}
