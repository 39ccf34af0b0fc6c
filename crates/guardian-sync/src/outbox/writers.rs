//! `<outbox>.writers`: every open for writing holds a shared OS lock on it
//! for the life of its outbox, and a salvage holds it exclusively. So a
//! salvage never moves a file another process is writing (its writes would
//! land in the moved file, after the salvage read it), and no open sees a
//! salvage's half-filled fresh file.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::damage::with_suffix;

/// How often to try again while the lock is held the other way.
const POLL: Duration = Duration::from_millis(20);

/// One open's hold on the writers' lock. Holds nothing where the file
/// cannot be used (a file system without locks, something else at its
/// name): the salvage record still covers a killed salvage there.
#[derive(Debug)]
pub(crate) struct Writers {
    file: Option<File>,
}

/// The lock was held the other way for all of the wait.
#[derive(Debug)]
pub(crate) struct Held;

impl Writers {
    /// A shared hold, waiting up to `wait` for a salvage to end.
    pub(crate) fn shared(path: &Path, wait: Duration) -> Result<Self, Held> {
        let name = lock_name(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never follow a link, never block on a FIFO planted there.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&name)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
        let Some(file) = file else {
            tracing::debug!(file = %name.display(), "the writers' lock cannot be used here");
            return Ok(Self { file: None });
        };
        poll(wait, || file.try_lock_shared())?;
        Ok(Self { file: Some(file) })
    }

    /// Trades the shared hold for an exclusive one, waiting up to `wait`
    /// for every other writer to close the outbox. On failure the shared
    /// hold is taken again (waiting as long).
    pub(crate) fn exclusive(&mut self, wait: Duration) -> Result<(), Held> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let _ = file.unlock();
        let got = poll(wait, || file.try_lock());
        if got.is_err() {
            poll(wait, || file.try_lock_shared())?;
        }
        got
    }

    /// Back to a shared hold after a salvage.
    pub(crate) fn share(&mut self) {
        if let Some(file) = &self.file {
            // A conversion: only another salvage could take the lock
            // between, and it finds nothing to salvage.
            let _ = file.lock_shared();
        }
    }
}

/// `<outbox>.writers`, named after the resolved path (as the processing
/// lock is): every name of one file (a symlink, `..`) shares one lock.
fn lock_name(path: &Path) -> PathBuf {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    with_suffix(&resolved, ".writers")
}

/// Tries `lock` until it succeeds or `wait` has passed.
fn poll(wait: Duration, lock: impl Fn() -> Result<(), TryLockError>) -> Result<(), Held> {
    let started = Instant::now();
    loop {
        match lock() {
            // An error: locks unsupported here, as if there were no file.
            Ok(()) | Err(TryLockError::Error(_)) => return Ok(()),
            Err(TryLockError::WouldBlock) if started.elapsed() < wait => std::thread::sleep(POLL),
            Err(TryLockError::WouldBlock) => return Err(Held),
        }
    }
}

/// For a read-only open: a shared hold on the writers' lock if its file
/// exists (nothing is created), so the read never meets a salvage's
/// half-filled file; `Err` while a salvage holds it for all of `wait`.
pub(crate) fn reading(path: &Path, wait: Duration) -> Result<Option<File>, Held> {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(lock_name(path))
    else {
        return Ok(None);
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(None);
    }
    poll(wait, || file.try_lock_shared())?;
    Ok(Some(file))
}
