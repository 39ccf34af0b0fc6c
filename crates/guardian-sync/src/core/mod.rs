//! The sans-IO core: what the engine decides, with no I/O in it.
//!
//! Everything here takes state, an event and the time, and returns
//! decisions; nothing here touches tokio, an HTTP client or SQLite. The
//! engine's drain loop and the realtime driver carry the decisions out
//! (see `docs/design/core.md`), and the simulator in `tests/sim` drives the
//! same machines through faults no live test reaches.
//!
//! - [`drain`]: one drain, from claiming ready ops to recording every
//!   outcome, as a [`drain::DrainMachine`].
//! - [`feed`]: the realtime follower's decisions, as a [`feed::FeedMachine`].
//! - [`outcome`]: what became of a request, the machine's input vocabulary.
//! - [`clock_watch`]: keeps stored backoffs their length across wall-clock
//!   steps.
//! - [`mutant`]: deliberate bugs the simulator must catch (test builds only).

pub mod clock_watch;
mod dedupe;
pub mod drain;
pub mod feed;
pub mod mutant;
pub mod outcome;
