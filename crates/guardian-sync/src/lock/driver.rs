//! [`ProcessingLock`]: the lock row in the outbox plus the OS lock file.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::op::Fence;
use crate::outbox::{Outbox, OutboxError, Ticket};

use super::{Judgement, LockConfig, LockView, StalenessObserver};

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another runner holds the lock now (we held it before, or never did).
    #[error("the processing lock was taken over by another runner")]
    Lost,
    /// The outbox could not be read or written.
    #[error("outbox error while handling the processing lock: {0}")]
    Outbox(#[from] OutboxError),
}

/// Result of [`ProcessingLock::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// We hold the lock.
    Yes {
        /// Fencing token to pass to every queue write.
        fence: Fence,
        /// True when we took it from another owner (dead or stale).
        took_over_from: Option<String>,
    },
    /// A live runner holds it; try again later.
    No {
        /// When to try again at the latest.
        retry_in: Duration,
    },
}

/// What [`ProcessingLock::try_os_lock`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OsLock {
    /// We hold the OS lock file.
    Ours,
    /// Another live process holds it.
    Busy,
    /// It cannot be used here (no file, no locks on this file system).
    Unavailable,
}

/// How often to look again while the row is free but another process holds
/// the OS lock (it is taking the row right now, or has just released it).
const FREE_BUT_BUSY_RETRY: Duration = Duration::from_millis(20);

/// One runner's handle on an outbox's processing lock.
#[derive(Debug)]
pub struct ProcessingLock {
    outbox: Outbox,
    owner: String,
    config: LockConfig,
    clock: SharedClock,
    os_lock_path: PathBuf,
    /// The OS lock file we hold, and its identity (`dev:inode`).
    os_lock: Option<(File, String)>,
    observer: StalenessObserver,
    fence: Option<Fence>,
    /// (epoch, heartbeat) of a free row seen while another process held the
    /// OS lock, and when it was first seen (monotonic).
    free_but_busy: Option<(u64, u64, Duration)>,
}

impl ProcessingLock {
    /// A lock handle for `owner` (unique per runner, e.g. a UUID).
    pub fn new(
        outbox: Outbox,
        owner: impl Into<String>,
        config: LockConfig,
        clock: SharedClock,
    ) -> Self {
        // One lock file per outbox file however its path is spelled (a
        // symlink, `..`, a relative path): named after the resolved path.
        let resolved =
            std::fs::canonicalize(outbox.path()).unwrap_or_else(|_| outbox.path().to_path_buf());
        let mut os_lock_path = resolved.into_os_string();
        os_lock_path.push(".lock");
        Self {
            outbox,
            owner: owner.into(),
            observer: StalenessObserver::new(config.stale_after),
            config,
            clock,
            os_lock_path: PathBuf::from(os_lock_path),
            os_lock: None,
            fence: None,
            free_but_busy: None,
        }
    }

    /// Our owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The configuration.
    pub fn config(&self) -> LockConfig {
        self.config
    }

    /// The fence while we hold the lock.
    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// Tries the OS lock file; true when we hold it. An error other than
    /// "held elsewhere" (e.g. a file system without locks) counts as not held,
    /// which leaves the heartbeat threshold as the only judge.
    fn try_os_lock(&mut self) -> OsLock {
        if self.os_lock.is_some() {
            return OsLock::Ours;
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.os_lock_path)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("cannot open {}: {e}", self.os_lock_path.display());
                return OsLock::Unavailable;
            }
        };
        match file.try_lock() {
            Ok(()) => {
                let id = match file.metadata() {
                    Ok(m) => format!("{}:{}", m.dev(), m.ino()),
                    Err(e) => {
                        tracing::debug!("cannot stat {}: {e}", self.os_lock_path.display());
                        return OsLock::Unavailable;
                    }
                };
                self.os_lock = Some((file, id));
                OsLock::Ours
            }
            Err(TryLockError::WouldBlock) => OsLock::Busy,
            Err(TryLockError::Error(e)) => {
                tracing::debug!(
                    "OS lock unsupported on {}: {e}",
                    self.os_lock_path.display()
                );
                OsLock::Unavailable
            }
        }
    }

    /// Takes the lock if it is free, ours, held by a dead process, or stale.
    ///
    /// Taking it increments the epoch, so the previous holder's writes are
    /// refused from now on.
    pub async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        self.try_acquire_under(None).await
    }

    /// [`try_acquire`](Self::try_acquire), its writes under `ticket` if
    /// given: withdrawn, they are not made and a wait for a busy outbox
    /// ends. The fence comes back from the acquire's answer with no await
    /// between, so an attempt dropped after a successful withdrawal holds
    /// none.
    pub(crate) async fn try_acquire_under(
        &mut self,
        ticket: Option<&Ticket>,
    ) -> Result<Acquired, LockError> {
        match self.try_acquire_inner(ticket).await {
            // Another process holds the database inside a transaction past
            // the busy timeout (e.g. a holder frozen mid-write): the lock is
            // held as far as we can tell; look again later.
            Err(LockError::Outbox(OutboxError::Storage(e))) if e.is_busy() => {
                self.os_lock = None;
                Ok(Acquired::No {
                    retry_in: self.config.heartbeat_interval,
                })
            }
            other => other,
        }
    }

    async fn try_acquire_inner(&mut self, ticket: Option<&Ticket>) -> Result<Acquired, LockError> {
        let os = self.try_os_lock();
        let (row, holder_os_file) = self.outbox.lock_read_with_os_file(ticket).await?;
        // Obtaining an OS lock proves the holder's process gone only if it
        // is the very file the holder recorded: a lock file deleted and
        // created again, or another path's, proves nothing, and the
        // heartbeat stays the judge.
        let holder_process_dead = match (&self.os_lock, &holder_os_file) {
            (Some((_, ours)), Some(theirs)) => ours == theirs,
            _ => false,
        };
        let view = LockView {
            owner: row
                .as_ref()
                .map(|r| r.owner.as_str())
                .filter(|o| !o.is_empty()),
            epoch: row.as_ref().map_or(0, |r| r.epoch),
            heartbeat: row.as_ref().map_or(0, |r| r.heartbeat),
        };
        let previous = view.owner.map(str::to_owned);
        let now = self.clock.monotonic();
        let judgement = self
            .observer
            .judge(&self.owner, view, holder_process_dead, now);
        if let (Judgement::Free { epoch, heartbeat }, OsLock::Busy) = (&judgement, os) {
            // Another live process holds the OS lock: it is about to take
            // the row (or has just released it). Taking the row now would
            // make us a holder without the OS lock, whom the next contender
            // to get that lock would judge dead and take over from. Wait for
            // it, but no longer than for a stale holder (it may be hung).
            let since = match self.free_but_busy {
                Some((e, h, at)) if e == *epoch && h == *heartbeat => at,
                _ => {
                    self.free_but_busy = Some((*epoch, *heartbeat, now));
                    now
                }
            };
            let still = now.saturating_sub(since);
            if still < self.config.stale_after {
                return Ok(Acquired::No {
                    retry_in: (self.config.stale_after - still).min(FREE_BUT_BUSY_RETRY),
                });
            }
        }
        self.free_but_busy = None;
        let (epoch, heartbeat, took_over) = match judgement {
            Judgement::Free { epoch, heartbeat } | Judgement::Ours { epoch, heartbeat } => {
                (epoch, heartbeat, None)
            }
            Judgement::Stale { epoch, heartbeat } => (epoch, heartbeat, previous),
            Judgement::Held { stale_in } => {
                self.os_lock = None;
                return Ok(Acquired::No {
                    retry_in: stale_in.min(self.config.heartbeat_interval),
                });
            }
        };
        let os_file = self.os_lock.as_ref().map(|(_, id)| id.clone());
        match self
            .outbox
            .lock_acquire_noting(&self.owner, Some((epoch, heartbeat)), os_file, ticket)
            .await?
        {
            Some(fence) => {
                if let Some(prev) = &took_over {
                    tracing::info!(
                        epoch = fence.epoch(),
                        "took over the processing lock from {prev}"
                    );
                }
                self.fence = Some(fence.clone());
                Ok(Acquired::Yes {
                    fence,
                    took_over_from: took_over,
                })
            }
            // Someone beat us to it (or the holder beat in between).
            None => {
                self.os_lock = None;
                Ok(Acquired::No {
                    retry_in: self.config.heartbeat_interval,
                })
            }
        }
    }

    /// Proves we are alive; fails with [`LockError::Lost`] once taken over.
    pub async fn heartbeat(&mut self) -> Result<(), LockError> {
        let Some(fence) = self.fence.clone() else {
            return Err(LockError::Lost);
        };
        // After a stale takeover the hung holder may still have the OS lock;
        // pick it up as soon as it is free (and record it) so fast takeover
        // works against us.
        let had = self.os_lock.is_some();
        if !had && self.try_os_lock() == OsLock::Ours {
            if let Some((_, id)) = &self.os_lock {
                match self.outbox.lock_note_os_file(&fence, id.clone()).await {
                    Ok(()) => {}
                    Err(OutboxError::LockLost) => {
                        self.fence = None;
                        self.os_lock = None;
                        return Err(LockError::Lost);
                    }
                    Err(e) => {
                        // Not recorded: keep trying at the next beat.
                        self.os_lock = None;
                        return Err(e.into());
                    }
                }
            }
        }
        match self.outbox.fenced(&fence).lock_heartbeat().await {
            Ok(()) => Ok(()),
            Err(OutboxError::LockLost) => {
                self.fence = None;
                self.os_lock = None;
                Err(LockError::Lost)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lock up: the row first, then the OS lock (the order matters:
    /// a contender that gets the OS lock must never see our row as live).
    pub async fn release(&mut self) -> Result<(), LockError> {
        if let Some(fence) = self.fence.take() {
            match self.outbox.fenced(&fence).lock_release().await {
                Ok(()) | Err(OutboxError::LockLost) => {}
                Err(e) => {
                    self.os_lock = None;
                    return Err(e.into());
                }
            }
        }
        self.os_lock = None;
        Ok(())
    }
}
