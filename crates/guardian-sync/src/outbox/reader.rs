//! A read-only view of an outbox, for inspection: it never writes, moves
//! or creates a file. No migration, no start-up work, no salvage: a damaged
//! or foreign file is an error that says so.
//!
//! SQLite's read-only mode still creates the `-wal` and `-shm` files of a
//! WAL database and leaves them behind. So when no `-wal` exists (no
//! connection is open, and the file holds every commit) the file is opened
//! `immutable`: read directly, without locks or side files. A runner that
//! starts meanwhile writes to its new WAL, not to the file, until its first
//! checkpoint. When a `-wal` exists the view opens read-only through it and
//! sees the latest commits.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::damage::{self, CheckReport};
use super::error::{OpenError, OutboxError};
use super::ident::{self, Identity};
use super::rows::{self, UnreadableOp};
use super::{app, lock_row, schema, ListFilter, LockRow, Stats};
use crate::op::PendingOp;

pub(crate) use guardian_sqlite::connect_read_only;

/// A read-only view of an outbox (what `gsync status`, `ops` and `check`
/// use). See [`Outbox`](super::Outbox) for the read-write handle.
#[derive(Debug)]
pub struct OutboxReader {
    conn: Connection,
    path: PathBuf,
    /// The file's schema version (older files are read as they are).
    schema: u32,
}

impl OutboxReader {
    /// Opens the outbox at `path` for reading. Refuses a missing path, a
    /// file that is not an outbox, a damaged one (run a repair: see
    /// [`Outbox::repair`](super::Outbox::repair)) and a newer schema.
    /// Blocking: a few small reads.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        // Through a symlink, the file itself: a salvage's record is named
        // after it.
        let path = super::ident::through_link(path.as_ref());
        let io = |source| OpenError::Io {
            path: path.clone(),
            source,
        };
        // Held until the open has read what it checks: a salvage cannot
        // begin meanwhile. A killed salvage's partial copy needs the record.
        super::one_name(&path)?;
        let _reading = super::writers::reading(&path, READ_WAIT)
            .map_err(|_| OpenError::SalvageUnderWay { path: path.clone() })?;
        salvage_clear(&path)?;
        match ident::classify(&path).map_err(io)? {
            Identity::Missing => return Err(OpenError::Missing { path }),
            Identity::Empty => {
                return Err(OpenError::NotAnOutbox {
                    path,
                    reason: "it is an empty file".into(),
                })
            }
            Identity::NotOurs(reason) => return Err(OpenError::NotAnOutbox { path, reason }),
            Identity::Ours => {}
        }
        let damaged = |reason: String| OpenError::Damaged {
            path: path.clone(),
            reason,
        };
        if let Some(reason) = damage::header_damage(&path).map_err(io)? {
            return Err(damaged(reason));
        }
        let conn = connect_read_only(&path).map_err(|e| damaged(e.to_string()))?;
        let probed = (|| -> rusqlite::Result<u32> {
            let v: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })?;
            conn.query_row("SELECT max(seq) FROM ops", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?;
            lock_row::read(&conn)?;
            Ok(v)
        })();
        let schema = match probed {
            Ok(v) => v,
            Err(e) if super::error::is_corrupt(&e) || super::content_failure(&e) => {
                return Err(damaged(e.to_string()))
            }
            Err(e) => return Err(OpenError::Storage(e.into())),
        };
        if schema > schema::SCHEMA_VERSION {
            return Err(OpenError::SchemaTooNew {
                found: schema,
                supported: schema::SCHEMA_VERSION,
            });
        }
        // A salvage that began while this opened (no writers' lock file
        // yet to wait on) may have let it read a half-filled file: its
        // record is there until the salvage is complete.
        salvage_clear(&path)?;
        Ok(Self { conn, path, schema })
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's schema version (it is migrated by the next read-write open).
    pub fn schema_version(&self) -> u32 {
        self.schema
    }

    /// Queue depth by state, oldest op, next due time.
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        app::stats(&self.conn)
    }

    /// When the next ready op is due as a runner will see it: a time stored
    /// under a wall clock ahead of `now_ms` is clamped to `horizon`, like
    /// [`Outbox::next_attempt`](super::Outbox::next_attempt).
    pub fn next_attempt(
        &self,
        now_ms: i64,
        horizon: std::time::Duration,
    ) -> Result<Option<i64>, OutboxError> {
        app::next_attempt(&self.conn, now_ms, horizon)
    }

    /// The lock row, if any runner ever took the lock.
    pub fn lock_read(&self) -> Result<Option<LockRow>, OutboxError> {
        Ok(lock_row::read(&self.conn)?)
    }

    /// Whether the process of the lock's holder still runs, judged by the
    /// OS lock it keeps on `<outbox>.lock`, the very file (device and
    /// inode) it recorded; `None` when that is not known: no file recorded
    /// (released, or a file system without locks), or no lock table to
    /// read (not Linux). A holder that exited without releasing the row
    /// (a kill, a failed release) reads `Some(false)`, and the next runner
    /// takes over at once.
    pub fn lock_holder_alive(&self) -> Result<Option<bool>, OutboxError> {
        let Some(recorded) = lock_row::os_file(&self.conn)? else {
            return Ok(None);
        };
        let Some((dev, ino)) = recorded
            .split_once(':')
            .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        else {
            return Ok(None);
        };
        Ok(crate::os_locks::held(
            &[crate::os_locks::table_id(dev, ino)],
            "FLOCK",
            None,
        ))
    }

    /// A meta value (e.g. the realtime cursor, the runner's status).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, OutboxError> {
        app::meta_get(&self.conn, key)
    }

    /// Ops in FIFO order, filtered and paged; an op whose row cannot be
    /// decoded, or does not match its checksum, is listed as unreadable.
    pub fn list_checked(
        &self,
        filter: &ListFilter,
    ) -> Result<Vec<Result<PendingOp, UnreadableOp>>, OutboxError> {
        let tx = self.conn.unchecked_transaction()?;
        Ok(rows::list_checked(&tx, filter, seal_now(&tx)?)?)
    }

    /// Full `PRAGMA integrity_check`, a scan of every op row and a look
    /// for WAL commits SQLite ignores after a damaged frame, changing
    /// nothing (no index rebuild, no quarantine, no salvage: see
    /// [`Outbox::repair`](super::Outbox::repair)).
    pub fn check(&self) -> Result<CheckReport, OutboxError> {
        let mut problems = damage::integrity_findings(&self.conn)?;
        let schema = damage::schema_findings(&self.conn, self.schema);
        // Rows cannot be read through a schema that is not an outbox's.
        let rows = if schema.is_empty() {
            self.conn
                .unchecked_transaction()
                .and_then(|tx| rows::unreadable(&tx, seal_now(&tx)?))
        } else {
            Ok(Vec::new())
        };
        problems.extend(schema);
        // Commits SQLite ignores after a damaged WAL frame: the next open
        // for writing salvages them, and so does a repair.
        problems.extend(damage::wal_break_unlocked(&self.path));
        let unreadable_ops = match rows {
            Ok(u) => u,
            Err(e) if super::error::is_corrupt(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(CheckReport::new(
            problems,
            false,
            Vec::new(),
            unreadable_ops,
        ))
    }
}

/// The seal the file's rows carry now: a writer may have migrated it since
/// this reader opened it. Read inside the transaction that reads the rows.
fn seal_now(conn: &rusqlite::Connection) -> rusqlite::Result<schema::Seal> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok(schema::Seal::of(version))
}

/// How long a read-only open waits for a salvage under way.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Refuses a path whose salvage runs now or was interrupted.
fn salvage_clear(path: &Path) -> Result<(), OpenError> {
    use super::salvage_mark::{look, Look};
    match look(path) {
        Ok(Look::Clear) => Ok(()),
        Ok(Look::UnderWay) => Err(OpenError::SalvageUnderWay {
            path: path.to_path_buf(),
        }),
        Ok(Look::Interrupted) => Err(OpenError::SalvageInterrupted {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(e.at_open(path)),
    }
}
