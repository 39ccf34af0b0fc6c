//! The processing lock: one runner drains an outbox at a time (DESIGN §3).
//!
//! The lock is a row in the outbox database: owner, epoch (the fencing
//! token), a heartbeat counter and the wall time of the last beat (for
//! display only). Every queue write of a runner is conditioned on the row
//! still holding its `(owner, epoch)` in the same transaction, so a runner
//! that lost the lock writes nothing more.
//!
//! Staleness is judged by the *contender*, on its own monotonic clock: the
//! holder is stale when its heartbeat counter has not moved for
//! `stale_after`. Wall-clock time never enters the decision, so a clock
//! jump on either side causes no false takeover.
//!
//! A crashed holder is detected faster through an OS file lock on
//! `<outbox>.lock` that the holder keeps while it runs (taken before the
//! row, given up after it): a contender that obtains the OS lock while the
//! row names another owner knows that owner's process is gone, provided it
//! is the very file (device and inode) the holder recorded in the outbox: a
//! lock file deleted and created again, or another path's, proves nothing,
//! and the heartbeat threshold judges. The lock file is named after the
//! outbox's resolved path, so every spelling of the path shares it.

mod driver;

pub use crate::core::lock_observer::{Judgement, LockView, StalenessObserver};
pub use driver::{Acquired, LockError, ProcessingLock};

use std::time::Duration;

/// Timing of the processing lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    /// How often the holder beats (default 10 s).
    pub heartbeat_interval: Duration,
    /// How long a heartbeat counter may stand still before a contender takes
    /// over (default 2 min). Must exceed `heartbeat_interval` comfortably.
    pub stale_after: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            stale_after: Duration::from_secs(120),
        }
    }
}

/// An invalid [`LockConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lock heartbeat interval ({heartbeat_interval:?}) must be above zero and at most half the staleness threshold ({stale_after:?})")]
pub struct LockConfigError {
    /// The heartbeat interval given.
    pub heartbeat_interval: Duration,
    /// The staleness threshold given.
    pub stale_after: Duration,
}

impl LockConfig {
    /// A validated configuration: a zero interval or a threshold below two
    /// beats would make a live holder look stale.
    pub fn new(
        heartbeat_interval: Duration,
        stale_after: Duration,
    ) -> Result<Self, LockConfigError> {
        if heartbeat_interval.is_zero() || stale_after < heartbeat_interval * 2 {
            return Err(LockConfigError {
                heartbeat_interval,
                stale_after,
            });
        }
        Ok(Self {
            heartbeat_interval,
            stale_after,
        })
    }
}
