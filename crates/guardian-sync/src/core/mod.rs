//! The sans-IO core: what the engine decides, with no I/O in it.
//!
//! Everything here takes state, an event and the time, and returns
//! decisions; nothing here touches tokio, an HTTP client or SQLite. The
//! engine's drain loop and the realtime driver carry the decisions out
//! (see `docs/design/core.md`), and the simulator in `tests/sim.rs` drives the
//! same machines through faults no live test reaches.
//!
//! - [`drain`]: one drain, from claiming ready ops to recording every
//!   outcome, as a [`drain::DrainMachine`].
//! - [`feed`]: the realtime follower's decisions, as a [`feed::FeedMachine`].
//! - [`outcome`]: what became of a request, the machine's input vocabulary.
//! - [`events`]: what the machines tell the app (`SyncEvent`).
//! - [`clock_watch`]: keeps stored backoffs their length across wall-clock
//!   steps.
//! - [`mutant`]: deliberate bugs the simulator must catch (test builds only).
//! - The small decisions under them: [`retry`] (backoff, `Retry-After`),
//!   [`breaker`], [`reconcile`] (conflict policies and the 3-way merge),
//!   [`coalesce`], [`classify`] (an HTTP answer into an [`outcome::Outcome`]),
//!   [`lock_observer`] (is the lock holder stale?) and the realtime
//!   reconnect schedule. The crate re-exports the first four at its root.

pub mod breaker;
pub mod classify;
pub mod clock_watch;
pub mod coalesce;
mod dedupe;
pub mod drain;
pub mod events;
pub mod feed;
pub mod lock_observer;
pub mod mutant;
pub mod outcome;
pub mod reconcile;
pub(crate) mod reconnect;
pub mod retry;
