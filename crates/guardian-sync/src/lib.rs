//! guardian-sync: an offline-first sync engine.
//!
//! Apps record changes in a durable local [`outbox`]; a runner drains them to
//! an HTTP backend exactly once in effect, in order per entity, through
//! crashes, server storms and conflicts. See the repository's
//! `docs/design.md` for the on-disk schema, the lock protocol and the wire
//! protocol.
#![warn(missing_docs)]

pub mod clock;
pub mod core;
pub mod engine;
pub mod error;
pub mod lock;
pub mod op;
pub mod optimistic;
mod os_locks;
pub mod outbox;
pub mod realtime;
pub mod telemetry;
pub mod transport;

pub use crate::core::{breaker, coalesce, reconcile, retry};
pub use error::Error;

/// The README's examples, compiled and run as doc-tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
