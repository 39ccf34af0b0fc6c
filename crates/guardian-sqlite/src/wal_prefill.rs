//! WAL preallocation: the writer zero-fills the `-wal` file up to the size
//! at which SQLite wraps it, so commits overwrite blocks the file already
//! owns instead of appending to it.
//!
//! Why: on ext4 (and journaling filesystems generally) the `fsync` of a
//! commit that *appended* must also commit the file's new size and block
//! allocation to the filesystem journal (figures: `docs/design/outbox.md`).
//! SQLite never preallocates its WAL: the file grows frame by frame until
//! the first checkpoint lets it restart (at `wal_autocheckpoint` pages),
//! and it is deleted when the last connection closes, so every session of
//! an app or a server would begin in the slow regime.
//!
//! When: once the WAL has grown past [`START_AFTER`] in this session (a
//! dozen commits or so), checked after each commit. A short-lived command
//! that commits once and exits never pays for a fill it would not use; a
//! process that keeps writing gets it within its first commits. A fill may
//! be split into steps of at most a given size, one per commit, so that no
//! commit waits for a large fill at once (the server's WAL wraps at tens of
//! MiB).
//!
//! Safety, the invariant that matters: zeros are written only *past the
//! file's end*, and only while this connection holds SQLite's write lock
//! (`BEGIN IMMEDIATE`), so no writer of this or another process can be
//! appending frames there. SQLite reads a WAL only up to its last valid
//! frame (salt and checksum chain) and ignores what follows, exactly as it
//! ignores the stale frames every WAL restart leaves behind; an all-zero
//! header reads as an empty WAL. The fill changes no SQL state, so the
//! transaction is rolled back.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

/// Frames of headroom past the checkpoint threshold: a group commit that
/// crosses the threshold writes all its frames before the checkpoint runs.
const HEADROOM_FRAMES: u64 = 256;
/// WAL header and per-frame header sizes (SQLite's file format).
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;
/// Zeros written per `pwrite`.
const CHUNK: usize = 256 << 10;

/// WAL size past which the writer fills it (about 64 frames).
pub const START_AFTER: u64 = 256 << 10;
/// Fill attempts that find the write lock taken, per session.
const ATTEMPTS: u32 = 3;

/// The writer's fill state for one session of a database.
#[derive(Debug)]
pub struct WalPrefill {
    /// What the database is, for logs (`"outbox"`, `"server"`).
    what: &'static str,
    /// `None` for a database in memory.
    wal: Option<PathBuf>,
    busy_timeout: Duration,
    /// Most zero bytes written after one commit.
    step: u64,
    attempts_left: u32,
    /// The fill began (the WAL passed [`START_AFTER`]) at this instant.
    began: Option<std::time::Instant>,
}

/// The WAL file SQLite itself uses for `conn`'s main database: named after
/// the path SQLite resolved (symlinks followed), which is not the `-wal`
/// beside a symlink that was given as the path. `None` in memory.
pub fn sqlite_wal(conn: &Connection) -> Option<PathBuf> {
    conn.path()
        .filter(|p| !p.is_empty())
        .map(|p| wal_path(Path::new(p)))
}

impl WalPrefill {
    /// Watches the WAL of `conn`'s database (the file SQLite uses, see
    /// [`sqlite_wal`]; nothing for a database in memory), to be filled at
    /// most `step` bytes per commit; `busy_timeout` is the connection's own
    /// and `what` names the database in logs.
    pub fn new(what: &'static str, conn: &Connection, busy_timeout: Duration, step: u64) -> Self {
        Self {
            what,
            wal: sqlite_wal(conn),
            attempts_left: ATTEMPTS,
            busy_timeout,
            step: step.max(1),
            began: None,
        }
    }

    /// Called after each commit, with the write lock released: fills the
    /// WAL (a step at a time) once it has grown past [`START_AFTER`]. Cheap
    /// until then (one `stat`), free once done.
    pub fn after_commit(&mut self, conn: &Connection) {
        if !self.due() {
            return;
        }
        let Some(wal) = self.wal.as_deref() else {
            return;
        };
        match prefill(conn, wal, self.busy_timeout, self.step) {
            Ok(Filled { complete: true, .. }) => {
                self.attempts_left = 0;
                let took = self.began.map_or(0, |t| t.elapsed().as_micros());
                tracing::debug!(
                    db = self.what,
                    took_us = u64::try_from(took).unwrap_or(u64::MAX),
                    "WAL preallocated"
                );
            }
            Ok(Filled { added: 0, .. }) => self.attempts_left -= 1,
            Ok(_) => {}
            Err(e) => {
                self.attempts_left = 0;
                tracing::warn!(db = self.what, error = %e, "WAL preallocation failed; commits append");
            }
        }
    }

    /// True when the next [`after_commit`](Self::after_commit) would write:
    /// the WAL has grown past [`START_AFTER`] and the fill is not complete.
    /// Costs a `stat` until the fill begins, nothing once it has ended.
    pub fn due(&mut self) -> bool {
        let Some(wal) = self.wal.as_deref().filter(|_| self.attempts_left > 0) else {
            return false;
        };
        if self.began.is_none() {
            if std::fs::metadata(wal).map_or(true, |m| m.len() < START_AFTER) {
                return false;
            }
            self.began = Some(std::time::Instant::now());
        }
        true
    }

    /// True while a fill has begun and not ended: a commit now may have a
    /// fill step to run after it.
    pub fn filling(&self) -> bool {
        self.began.is_some() && self.wal.is_some() && self.attempts_left > 0
    }

    /// True once no further fill will be tried.
    #[cfg(test)]
    fn finished(&self) -> bool {
        self.wal.is_none() || self.attempts_left == 0
    }
}

/// What one fill step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Filled {
    /// Zero bytes appended.
    added: u64,
    /// The WAL is at its full size (or there is nothing to fill: checkpoints
    /// are off, or the file is missing).
    complete: bool,
}

/// The size the WAL is filled to: the checkpoint threshold plus headroom,
/// in frames of `page_size + 24` bytes.
pub fn target_len(page_size: u64, autocheckpoint_pages: u64) -> u64 {
    WAL_HEADER + (autocheckpoint_pages + HEADROOM_FRAMES) * (page_size + FRAME_HEADER)
}

/// The `-wal` file beside `db_path`, as given (see [`sqlite_wal`]).
pub fn wal_path(db_path: &Path) -> PathBuf {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Zero-fills the WAL file `wal` (of `conn`'s database) from its end
/// towards [`target_len`], at most `max_bytes` of it, and syncs it.
/// Adds nothing when another connection holds the write lock (the fill
/// never waits for one). `busy_timeout` is the connection's own, restored
/// afterwards. Errors are the caller's to log: the database works without
/// the fill, only its commits that grow the WAL are slower.
fn prefill(
    conn: &Connection,
    wal: &Path,
    busy_timeout: Duration,
    max_bytes: u64,
) -> std::io::Result<Filled> {
    let page_size: u64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(std::io::Error::other)?;
    let autocheckpoint: u64 = conn
        .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
        .map_err(std::io::Error::other)?;
    if autocheckpoint == 0 {
        // Checkpoints are off: the WAL grows without bound, so there is no
        // size it would wrap at.
        return Ok(Filled {
            added: 0,
            complete: true,
        });
    }
    let target = target_len(page_size, autocheckpoint);
    // Holding the write lock is what makes writing past the end safe.
    conn.busy_timeout(Duration::ZERO)
        .map_err(std::io::Error::other)?;
    let began = conn.execute_batch("BEGIN IMMEDIATE");
    let filled = match began {
        Ok(()) => fill(wal, target, max_bytes),
        Err(_) => Ok(Filled {
            added: 0,
            complete: false,
        }),
    };
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.busy_timeout(busy_timeout)
        .map_err(std::io::Error::other)?;
    filled
}

#[cfg(unix)]
fn fill(wal: &Path, target: u64, max_bytes: u64) -> std::io::Result<Filled> {
    use std::os::unix::fs::FileExt as _;

    let file = match OpenOptions::new().write(true).open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Filled {
                added: 0,
                complete: true,
            })
        }
        Err(e) => return Err(e),
    };
    let start = file.metadata()?.len();
    let end = target.min(start.saturating_add(max_bytes));
    if start >= end {
        return Ok(Filled {
            added: 0,
            complete: true,
        });
    }
    let zeros = vec![0u8; CHUNK];
    let mut at = start;
    let written = (|| {
        while at < end {
            let n = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_data()
    })();
    match written {
        Ok(()) => Ok(Filled {
            added: end - start,
            complete: end >= target,
        }),
        Err(e) => {
            // Disk full or an I/O error: give the space back (still past
            // every frame, still under the write lock).
            let _ = file.set_len(start);
            Err(e)
        }
    }
}

#[cfg(not(unix))]
fn fill(_wal: &Path, _target: u64, _max_bytes: u64) -> std::io::Result<Filled> {
    Ok(Filled {
        added: 0,
        complete: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_conn(dir: &Path) -> (std::path::PathBuf, Connection) {
        let path = dir.join("p.db");
        let conn = Connection::open(&path).unwrap();
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
        conn.execute_batch("CREATE TABLE t (v TEXT)").unwrap();
        (path, conn)
    }

    fn wal_len(path: &Path) -> u64 {
        std::fs::metadata(wal_path(path)).unwrap().len()
    }

    /// What a crash leaves: the database and WAL files as they are now,
    /// without the shared-memory index, so opening the copy must recover
    /// every commit from the WAL file itself.
    fn crash_copy(path: &Path, dir: &Path, rows: i64) {
        let copy = dir.join("copy.db");
        std::fs::copy(path, &copy).unwrap();
        std::fs::copy(
            format!("{}-wal", path.display()),
            format!("{}-wal", copy.display()),
        )
        .unwrap();
        let conn = Connection::open(&copy).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows);
        drop(conn);
        for f in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{f}", copy.display()));
        }
    }

    /// The WAL is filled once to the wrap size; commits before the fill,
    /// right after it (frames followed by zeros) and after the WAL wrapped
    /// inside the filled region (frames followed by stale frames) are all
    /// recovered from the files alone.
    #[test]
    fn filled_wal_keeps_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = wal_conn(dir.path());
        conn.execute("INSERT INTO t VALUES ('before')", []).unwrap();
        let busy = Duration::from_secs(5);
        let filled = prefill(&conn, &wal_path(&path), busy, u64::MAX).unwrap();
        let target = target_len(4096, 1000);
        assert_eq!(wal_len(&path), target);
        assert!(filled.complete);
        assert!(filled.added > 0 && filled.added < target);
        assert_eq!(
            prefill(&conn, &wal_path(&path), busy, u64::MAX).unwrap(),
            Filled {
                added: 0,
                complete: true
            },
            "filled once"
        );
        crash_copy(&path, dir.path(), 1);
        for i in 0..10 {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("after {i}")])
                .unwrap();
        }
        crash_copy(&path, dir.path(), 11);
        for i in 10..3000 {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("after {i}")])
                .unwrap();
        }
        assert_eq!(wal_len(&path), target, "the WAL wrapped inside the fill");
        crash_copy(&path, dir.path(), 3001);
    }

    /// A session that writes little never fills; one that keeps writing is
    /// filled once, right after its WAL passes the threshold.
    #[test]
    fn fills_once_the_wal_has_grown() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = wal_conn(dir.path());
        let mut watch = WalPrefill::new("test", &conn, Duration::from_secs(5), u64::MAX);
        conn.execute("INSERT INTO t VALUES ('one')", []).unwrap();
        watch.after_commit(&conn);
        assert!(wal_len(&path) < START_AFTER);
        assert!(!watch.finished());
        assert!(!watch.due() && !watch.filling(), "nothing to fill yet");
        let mut i = 0;
        while wal_len(&path) < START_AFTER {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("row {i}")])
                .unwrap();
            i += 1;
        }
        assert!(watch.due() && watch.filling(), "a fill is due");
        watch.after_commit(&conn);
        assert!(watch.finished());
        assert!(!watch.due() && !watch.filling(), "the fill has ended");
        assert_eq!(wal_len(&path), target_len(4096, 1000));
        crash_copy(&path, dir.path(), i + 1);
    }

    /// A fill in steps adds at most one step per commit, keeps every commit
    /// recoverable between steps, and ends at the same size as a fill at once.
    #[test]
    fn fills_in_steps_one_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = wal_conn(dir.path());
        let step = 1 << 20;
        let mut watch = WalPrefill::new("test", &conn, Duration::from_secs(5), step);
        let mut rows = 0;
        while wal_len(&path) < START_AFTER {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("row {rows}")])
                .unwrap();
            rows += 1;
        }
        let target = target_len(4096, 1000);
        let mut steps = 0;
        while !watch.finished() {
            let before = wal_len(&path);
            watch.after_commit(&conn);
            let after = wal_len(&path);
            assert!(
                after > before && after - before <= step,
                "{before} -> {after}"
            );
            steps += 1;
            conn.execute("INSERT INTO t VALUES (?1)", [format!("row {rows}")])
                .unwrap();
            rows += 1;
            crash_copy(&path, dir.path(), rows);
            assert!(steps <= target / step + 1, "the fill never ends");
        }
        assert_eq!(wal_len(&path), target);
        assert!(steps > 1, "filled in one step");
        watch.after_commit(&conn);
        assert_eq!(wal_len(&path), target, "filled once");
    }

    /// Opened through a symlink, the fill goes to the WAL SQLite uses (beside
    /// the link's target) and leaves a file named like a WAL beside the link,
    /// which is not SQLite's, as it was.
    #[cfg(unix)]
    #[test]
    fn through_a_symlink_only_the_real_wal_is_filled() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        std::fs::create_dir(&real_dir).unwrap();
        let (real, conn) = wal_conn(&real_dir);
        drop(conn);
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // As long as a WAL the fill would start on, so a fill that took it
        // for the WAL would append to it.
        let decoy = wal_path(&link);
        let foreign = vec![b'x'; usize::try_from(START_AFTER).unwrap()];
        std::fs::write(&decoy, &foreign).unwrap();
        let conn = Connection::open(&link).unwrap();
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
        let real_wal = std::fs::canonicalize(wal_path(&real)).unwrap_or(wal_path(&real));
        assert_eq!(
            sqlite_wal(&conn).map(|p| std::fs::canonicalize(p).unwrap()),
            Some(real_wal.clone())
        );
        let mut watch = WalPrefill::new("test", &conn, Duration::from_secs(5), u64::MAX);
        let mut i = 0;
        while std::fs::metadata(&real_wal).unwrap().len() < START_AFTER {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("row {i}")])
                .unwrap();
            i += 1;
        }
        watch.after_commit(&conn);
        assert!(watch.finished());
        assert_eq!(
            std::fs::metadata(&real_wal).unwrap().len(),
            target_len(4096, 1000)
        );
        assert_eq!(std::fs::read(&decoy).unwrap(), foreign);
    }

    /// A database in memory has no WAL to fill.
    #[test]
    fn in_memory_there_is_nothing_to_fill() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(sqlite_wal(&conn), None);
        let mut watch = WalPrefill::new("test", &conn, Duration::from_secs(5), u64::MAX);
        assert!(watch.finished());
        watch.after_commit(&conn);
    }

    /// While another connection holds the write lock nothing is written.
    #[test]
    fn busy_write_lock_skips_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = wal_conn(dir.path());
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let before = wal_len(&path);
        // Had it waited for the lock, it would have waited this long.
        let long = Duration::from_secs(120);
        let started = std::time::Instant::now();
        let busy = prefill(&conn, &wal_path(&path), long, u64::MAX).unwrap();
        assert_eq!(
            busy,
            Filled {
                added: 0,
                complete: false
            }
        );
        assert!(started.elapsed() < long / 2, "waited for the lock");
        assert_eq!(wal_len(&path), before);
        other.execute_batch("ROLLBACK").unwrap();
        assert!(
            prefill(&conn, &wal_path(&path), long, u64::MAX)
                .unwrap()
                .added
                > 0
        );
    }
}
