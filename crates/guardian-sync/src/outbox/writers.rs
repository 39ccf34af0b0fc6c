//! `<outbox>.writers`: every open for writing holds a shared OS lock on it
//! until its connection is closed, and a salvage holds it exclusively. So a
//! salvage never moves a file another open is writing (its writes would
//! land in the moved file, after the salvage read it), and no open sees a
//! salvage's half-filled fresh file.
//!
//! Writers go on where the lock cannot be used (something else at its
//! name, a file system without locks); a salvage does not: it needs the
//! lock really held alone.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::damage::{same_file, with_suffix};

/// How often to try again while the lock is held the other way.
const POLL: Duration = Duration::from_millis(20);

/// One open's hold on the writers' lock.
#[derive(Debug)]
pub(crate) struct Writers {
    /// The outbox file, resolved.
    db: PathBuf,
    name: PathBuf,
    /// The lock file, if it could be opened.
    file: Option<File>,
    /// Why the lock cannot be used here, if it cannot.
    unusable: Option<String>,
}

/// Why [`Writers::exclusive`] failed.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Other opens kept it for all of the wait; the shared hold is back.
    OthersOpen,
    /// A salvage holds it now (the shared hold could not be taken back).
    Salvaging,
    /// The lock cannot be used here: the reason.
    Unusable(String),
}

impl Writers {
    /// A shared hold, waiting up to `wait` for a salvage to end; `Err`
    /// when one held it exclusively for all of the wait.
    pub(crate) fn shared(path: &Path, wait: Duration) -> Result<Self, Refused> {
        let db = resolved(path);
        let name = with_suffix(&db, ".writers");
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never follow a link, never block on a FIFO planted there.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&name);
        let mut hold = Self {
            db,
            name,
            file: None,
            unusable: None,
        };
        match opened {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => hold.file = Some(f),
            Ok(_) => hold.unusable = Some("it is not a regular file".into()),
            Err(e) => hold.unusable = Some(e.to_string()),
        }
        hold.take_shared(wait)?;
        Ok(hold)
    }

    /// Takes the shared lock; where locks fail, notes why and goes on.
    fn take_shared(&mut self, wait: Duration) -> Result<(), Refused> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        match poll(wait, || file.try_lock_shared()) {
            Err(Refused::Unusable(why)) => {
                self.unusable = Some(why);
                Ok(())
            }
            Err(_) => Err(Refused::Salvaging),
            Ok(()) => Ok(()),
        }
    }

    /// Trades the shared hold for an exclusive one, waiting up to `wait`
    /// for every other open to close. On `OthersOpen` the shared hold is
    /// back.
    pub(crate) fn exclusive(&mut self, wait: Duration) -> Result<(), Refused> {
        if let Some(why) = &self.unusable {
            return Err(Refused::Unusable(format!(
                "cannot lock {}: {why}",
                self.name.display()
            )));
        }
        let Some(file) = &self.file else {
            return Err(Refused::Unusable(format!(
                "cannot lock {}",
                self.name.display()
            )));
        };
        let _ = file.unlock();
        // The lock alone, and no other process with the file open through
        // SQLite: that also finds a writer whose lock file was removed, or
        // one that never took the lock (an older build, another tool).
        let alone = || {
            file.try_lock()?;
            if open_elsewhere(&self.db) {
                let _ = file.unlock();
                return Err(TryLockError::WouldBlock);
            }
            Ok(())
        };
        match poll(wait, alone) {
            // Someone removed the lock file: opens since lock another one,
            // which this hold cannot see.
            Ok(()) if !same_file(file, &self.name) => {
                let _ = file.unlock();
                Err(Refused::Unusable(format!(
                    "{} was removed or replaced while the outbox was open",
                    self.name.display()
                )))
            }
            Ok(()) => Ok(()),
            Err(Refused::Unusable(why)) => Err(Refused::Unusable(format!(
                "cannot lock {}: {why}",
                self.name.display()
            ))),
            Err(_) => match poll(wait, || file.try_lock_shared()) {
                Ok(()) => Err(Refused::OthersOpen),
                Err(_) => Err(Refused::Salvaging),
            },
        }
    }

    /// Back to a shared hold after a salvage. Linux converts a lock by
    /// dropping it first, so another salvage could take it in between (and
    /// find nothing to salvage): waits up to `wait`, then goes on without
    /// the hold, logged, rather than wait for good.
    pub(crate) fn share(&mut self, wait: Duration) {
        if let Some(file) = &self.file {
            if poll(wait, || file.try_lock_shared()).is_err() {
                tracing::warn!(file = %self.name.display(), "cannot keep the writers' lock");
            }
        }
    }
}

/// For a read-only open: a shared hold on the writers' lock if its file
/// exists (nothing is created), so the read never meets a salvage's
/// half-filled file; `Err` while a salvage holds it for all of `wait`.
pub(crate) fn reading(path: &Path, wait: Duration) -> Result<Option<File>, Refused> {
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
    match poll(wait, || file.try_lock_shared()) {
        Ok(()) => Ok(Some(file)),
        Err(Refused::Unusable(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `<outbox>.writers`, named after the resolved path (as the processing
/// lock is): every name of one file (a symlink, `..`) shares one lock.
fn lock_name(path: &Path) -> PathBuf {
    with_suffix(&resolved(path), ".writers")
}

fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Whether another process has `db`, its `-wal` or its `-shm` open: a
/// descriptor of it (`/proc/<pid>/fd`, as `fuser` looks; a process that
/// opened the file but has not locked it yet), or SQLite's POSIX locks on
/// it (`/proc/locks`, for processes whose descriptors this one may not
/// list). Never probed through a descriptor of this process: closing one
/// would drop this process's own SQLite locks on the file. Where `/proc`
/// is missing (not Linux) nothing is known: false.
pub(crate) fn open_elsewhere(db: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let names = [
        db.to_path_buf(),
        with_suffix(db, "-wal"),
        with_suffix(db, "-shm"),
    ];
    let files: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let me = std::process::id().to_string();
    described_elsewhere(&names, &me) || locked_elsewhere(&files, &me)
}

/// Whether a process other than `me` has a descriptor of one of `names`
/// (resolved paths). Compared by the path the kernel keeps for each
/// descriptor, never by following it: a stat through another process's
/// descriptor can wait for good on a file system that does not answer.
/// An outbox has one name (hard links are refused), so its path is enough.
fn described_elsewhere(names: &[PathBuf], me: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| names.contains(&target)))
    })
}

/// Whether a process other than `me` holds a POSIX lock on one of `files`
/// (every SQLite connection keeps read locks on its database and `-shm`
/// while open).
fn locked_elsewhere(files: &[(u64, u64)], me: &str) -> bool {
    let ids: Vec<String> = files
        .iter()
        .map(|&(dev, ino)| crate::os_locks::table_id(dev, ino))
        .collect();
    crate::os_locks::held(&ids, "POSIX", Some(me)).unwrap_or(false)
}

/// Tries `lock` until it succeeds or `wait` has passed (`OthersOpen`);
/// an error other than "held" is `Unusable`.
fn poll(wait: Duration, lock: impl Fn() -> Result<(), TryLockError>) -> Result<(), Refused> {
    let started = Instant::now();
    loop {
        match lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if started.elapsed() < wait => std::thread::sleep(POLL),
            Err(TryLockError::WouldBlock) => return Err(Refused::OthersOpen),
            Err(TryLockError::Error(e)) => return Err(Refused::Unusable(e.to_string())),
        }
    }
}
