//! Conflict reconciliation (DESIGN §5): what to do after a 409/412.
//!
//! - [`merge`]: the pure three-way JSON merge ([`merge3`]).
//! - [`policy`]: who wins a field changed on both sides, per entity type.
//! - [`decide`]: the decision for a conflicted op ([`Reconciler::decide`]).
//!
//! All of it is sans-IO: the engine fetches the server's entity, asks the
//! [`Reconciler`], and performs the [`Resolution`].

pub mod decide;
pub mod merge;
pub mod policy;

pub use decide::{ConflictInput, FailReason, Reconciler, Resolution, SettledReason};
pub use merge::{merge3, FieldConflict, MergeOutcome};
pub use policy::{ConflictPolicy, CustomMerge, FieldConflictCtx, ReconcilePolicies};
