//! Conflict reconciliation (DESIGN §5): what to do after a 409/412.
//!
//! - [`merge`]: the pure three-way JSON merge ([`merge3`]).
//! - [`policy`]: who wins a field changed on both sides, per entity type.
//! - [`decide`]: the decision for a conflicted op ([`Reconciler::decide`]).
//!
//! All of it is sans-IO: the engine fetches the server's entity, asks the
//! [`Reconciler`], and performs the [`Resolution`].
//!
//! ```
//! use guardian_sync::reconcile::{merge3, ConflictPolicy};
//! use serde_json::json;
//!
//! let base = json!({"on": false, "name": "lamp", "room": "hall"});
//! let local = json!({"on": true, "name": "desk lamp", "room": "hall"});
//! let remote = json!({"on": false, "name": "reading lamp"});
//! let out = merge3(Some(&base), &local, &remote, &ConflictPolicy::LocalWins);
//! // "on" changed only locally, "room" was deleted only remotely: clean.
//! // "name" changed on both sides: the policy picks the local value.
//! assert_eq!(out.merged, json!({"on": true, "name": "desk lamp"}));
//! assert_eq!(out.conflicts.len(), 1);
//! assert_eq!(out.conflicts[0].path, "/name");
//! ```

pub mod decide;
pub mod merge;
pub mod policy;

pub use decide::{ConflictInput, FailReason, Reconciler, Resolution, SettledReason};
pub use merge::{merge3, FieldConflict, MergeOutcome};
pub use policy::{ConflictPolicy, CustomMerge, FieldConflictCtx, ReconcilePolicies};
