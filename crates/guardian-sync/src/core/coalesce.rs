//! BatchCoalescer: the pure decision of how a new op folds into the ops of its
//! entity that are still waiting (DESIGN §6).
//!
//! The outbox asks [`decide`] inside the enqueue transaction and applies the
//! answer there, so coalescing is atomic with the enqueue. The rules only ever
//! touch ops that were **never attempted** (`attempts == 0`, pending): an
//! attempted op's idempotency key may already be applied by the server, so its
//! request body must never change. Rules, looking only at the entity's tail
//! (its latest active ops):
//!
//! - UPDATE after a never-attempted CREATE or UPDATE merges into it (the
//!   payload is replaced: an update is a full PUT). The merged op keeps its
//!   kind, position, base and base version.
//! - DELETE after a never-attempted CREATE (followed only by never-attempted
//!   UPDATEs) removes them all and is not stored: the entity never reaches the
//!   server.
//! - DELETE after never-attempted UPDATEs removes those UPDATEs; the DELETE is
//!   stored and inherits the earliest removed op's base and chaining.
//! - DELETE after a never-attempted DELETE merges into it (deleting twice
//!   changes nothing).
//! - Everything else (CREATE, anything after an attempted or in-flight op) is
//!   stored as a new op.

use crate::op::OpKind;

/// An active (pending or in-flight) op of the entity, as the coalescer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailOp {
    /// Its FIFO position.
    pub seq: i64,
    /// What it does.
    pub kind: OpKind,
    /// Pending with zero attempts: safe to change or remove.
    pub never_attempted: bool,
}

/// What to do with a new op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store the new op as it is.
    Insert,
    /// Replace the payload of the op at `seq` with the new op's (or, for a
    /// repeated DELETE, just fold the new op's token into it).
    MergeInto {
        /// The op that absorbs the new one.
        seq: i64,
    },
    /// Remove these ops (a CREATE and its UPDATEs, oldest first); store nothing.
    Annihilate {
        /// Ops to remove.
        remove: Vec<i64>,
    },
    /// Remove these UPDATEs (oldest first) and store the DELETE in their place,
    /// inheriting the first removed op's base, base version and chaining.
    ReplaceUpdates {
        /// Ops to remove.
        remove: Vec<i64>,
    },
}

/// Decides how `new` folds into `active`: the entity's active ops, oldest
/// first. Passing only the tail is enough: the never-attempted suffix plus,
/// if there is one, the attempted op just before it.
pub fn decide(active: &[TailOp], new: OpKind, enabled: bool) -> Decision {
    if !enabled {
        return Decision::Insert;
    }
    let last = active.last().filter(|t| t.never_attempted);
    match new {
        OpKind::Create => Decision::Insert,
        OpKind::Update => match last {
            Some(t) if matches!(t.kind, OpKind::Create | OpKind::Update) => {
                Decision::MergeInto { seq: t.seq }
            }
            _ => Decision::Insert,
        },
        OpKind::Delete => {
            if let Some(t) = last.filter(|t| t.kind == OpKind::Delete) {
                return Decision::MergeInto { seq: t.seq };
            }
            let mut start = active.len();
            while start > 0
                && active[start - 1].never_attempted
                && active[start - 1].kind == OpKind::Update
            {
                start -= 1;
            }
            let before = start.checked_sub(1).map(|i| active[i]);
            match before {
                Some(c) if c.never_attempted && c.kind == OpKind::Create => Decision::Annihilate {
                    remove: active[start - 1..].iter().map(|t| t.seq).collect(),
                },
                _ if start < active.len() => Decision::ReplaceUpdates {
                    remove: active[start..].iter().map(|t| t.seq).collect(),
                },
                _ => Decision::Insert,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpKind::{Create as C, Delete as D, Update as U};

    fn fresh(seq: i64, kind: OpKind) -> TailOp {
        TailOp {
            seq,
            kind,
            never_attempted: true,
        }
    }

    fn tried(seq: i64, kind: OpKind) -> TailOp {
        TailOp {
            seq,
            kind,
            never_attempted: false,
        }
    }

    #[test]
    fn disabled_always_inserts() {
        assert_eq!(decide(&[fresh(1, C)], U, false), Decision::Insert);
        assert_eq!(decide(&[fresh(1, C)], D, false), Decision::Insert);
    }

    #[test]
    fn empty_entity_inserts() {
        for k in [C, U, D] {
            assert_eq!(decide(&[], k, true), Decision::Insert);
        }
    }

    #[test]
    fn update_merges_into_fresh_create_or_update() {
        assert_eq!(
            decide(&[fresh(1, C)], U, true),
            Decision::MergeInto { seq: 1 }
        );
        assert_eq!(
            decide(&[tried(1, U), fresh(4, U)], U, true),
            Decision::MergeInto { seq: 4 }
        );
    }

    #[test]
    fn never_touches_attempted_ops() {
        // First send was lost mid-flight: attempts >= 1, back to pending.
        assert_eq!(decide(&[tried(1, C)], U, true), Decision::Insert);
        assert_eq!(decide(&[tried(1, U)], U, true), Decision::Insert);
        assert_eq!(decide(&[tried(1, C)], D, true), Decision::Insert);
        assert_eq!(decide(&[tried(1, U)], D, true), Decision::Insert);
        assert_eq!(decide(&[tried(1, D)], D, true), Decision::Insert);
    }

    #[test]
    fn update_after_fresh_delete_is_stored() {
        assert_eq!(decide(&[fresh(1, D)], U, true), Decision::Insert);
    }

    #[test]
    fn create_is_always_stored() {
        assert_eq!(decide(&[fresh(1, D)], C, true), Decision::Insert);
        assert_eq!(decide(&[fresh(1, U)], C, true), Decision::Insert);
    }

    #[test]
    fn delete_annihilates_fresh_create_and_its_updates() {
        assert_eq!(
            decide(&[fresh(1, C)], D, true),
            Decision::Annihilate { remove: vec![1] }
        );
        assert_eq!(
            decide(
                &[tried(1, D), fresh(2, C), fresh(3, U), fresh(5, U)],
                D,
                true
            ),
            Decision::Annihilate {
                remove: vec![2, 3, 5]
            }
        );
    }

    #[test]
    fn delete_replaces_fresh_updates_behind_an_attempted_create() {
        assert_eq!(
            decide(&[tried(1, C), fresh(2, U), fresh(3, U)], D, true),
            Decision::ReplaceUpdates { remove: vec![2, 3] }
        );
        assert_eq!(
            decide(&[fresh(2, U)], D, true),
            Decision::ReplaceUpdates { remove: vec![2] }
        );
    }

    #[test]
    fn repeated_delete_merges() {
        assert_eq!(
            decide(&[tried(1, U), fresh(2, D)], D, true),
            Decision::MergeInto { seq: 2 }
        );
    }
}
