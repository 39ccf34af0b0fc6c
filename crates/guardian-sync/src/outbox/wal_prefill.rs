//! WAL preallocation: the writer zero-fills the `-wal` file up to the size
//! at which SQLite wraps it, so commits overwrite blocks the file already
//! owns instead of appending to it.
//!
//! Why: on ext4 (and journaling filesystems generally) the `fsync` of a
//! commit that *appended* must also commit the file's new size and block
//! allocation to the filesystem journal. On the benchmark machine that
//! made a `synchronous=FULL` commit cost ~270 µs while the WAL grew against
//! ~185 µs once it wrapped (`docs/design/outbox.md`). SQLite never
//! preallocates its WAL: the file grows frame by frame until the first
//! checkpoint lets it restart (about `wal_autocheckpoint` = 1000 pages,
//! ~4 MiB, some 250 enqueues), and it is deleted when the last connection
//! closes, so every app session would begin in the slow regime.
//!
//! When: once the WAL has grown past [`START_AFTER`] in this session (a
//! dozen commits or so), checked after each group commit. A short-lived
//! command that enqueues one op and exits never pays for a fill it would
//! not use; an app that keeps writing gets it within its first commits.
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
pub(crate) const START_AFTER: u64 = 256 << 10;
/// Fill attempts per session (one normally; a busy write lock retries).
const ATTEMPTS: u32 = 3;

/// The writer's fill state for one session of the outbox.
#[derive(Debug)]
pub(crate) struct WalPrefill {
    wal: PathBuf,
    busy_timeout: Duration,
    attempts_left: u32,
}

impl WalPrefill {
    /// Watches the WAL of the database at `db_path`; `busy_timeout` is the
    /// connection's own.
    pub(crate) fn new(db_path: &Path, busy_timeout: Duration) -> Self {
        Self {
            wal: wal_path(db_path),
            busy_timeout,
            attempts_left: ATTEMPTS,
        }
    }

    /// Called after each commit: fills the WAL once it has grown past
    /// [`START_AFTER`]. Cheap until then (one `stat`), free afterwards.
    pub(crate) fn after_commit(&mut self, conn: &Connection) {
        if self.attempts_left == 0 {
            return;
        }
        if std::fs::metadata(&self.wal).map_or(true, |m| m.len() < START_AFTER) {
            return;
        }
        self.attempts_left -= 1;
        let started = std::time::Instant::now();
        match prefill(conn, &self.wal, self.busy_timeout) {
            Ok(0) => {}
            Ok(bytes) => {
                self.attempts_left = 0;
                tracing::debug!(
                    bytes,
                    took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "outbox WAL preallocated"
                );
            }
            Err(e) => {
                self.attempts_left = 0;
                tracing::warn!(error = %e, "outbox WAL preallocation failed; commits append");
            }
        }
    }

    /// True once no further fill will be tried.
    #[cfg(test)]
    pub(crate) fn finished(&self) -> bool {
        self.attempts_left == 0
    }
}

/// The size the WAL is filled to: the checkpoint threshold plus headroom,
/// in frames of `page_size + 24` bytes.
pub(crate) fn target_len(page_size: u64, autocheckpoint_pages: u64) -> u64 {
    WAL_HEADER + (autocheckpoint_pages + HEADROOM_FRAMES) * (page_size + FRAME_HEADER)
}

/// The `-wal` file beside the database at `db_path`.
pub(crate) fn wal_path(db_path: &Path) -> PathBuf {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Zero-fills the WAL file `wal` (of `conn`'s database) from its end up to
/// [`target_len`] and syncs it.
/// Returns the bytes added (0 when it was long enough already, missing, or
/// another connection held the write lock: the fill never waits for one).
/// `busy_timeout` is the connection's own, restored afterwards. Errors are
/// the caller's to log: the outbox works without the fill, only its first
/// commits are slower.
pub(crate) fn prefill(
    conn: &Connection,
    wal: &Path,
    busy_timeout: Duration,
) -> std::io::Result<u64> {
    let page_size: u64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(std::io::Error::other)?;
    let autocheckpoint: u64 = conn
        .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
        .map_err(std::io::Error::other)?;
    if autocheckpoint == 0 {
        // Checkpoints are off: the WAL grows without bound, so there is no
        // size it would wrap at.
        return Ok(0);
    }
    let target = target_len(page_size, autocheckpoint);
    // Holding the write lock is what makes writing past the end safe.
    conn.busy_timeout(Duration::ZERO)
        .map_err(std::io::Error::other)?;
    let began = conn.execute_batch("BEGIN IMMEDIATE");
    let filled = match began {
        Ok(()) => fill(wal, target),
        Err(_) => Ok(0),
    };
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.busy_timeout(busy_timeout)
        .map_err(std::io::Error::other)?;
    filled
}

#[cfg(unix)]
fn fill(wal: &Path, target: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt as _;

    let file = match OpenOptions::new().write(true).open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let start = file.metadata()?.len();
    if start >= target {
        return Ok(0);
    }
    let zeros = vec![0u8; CHUNK];
    let mut at = start;
    let written = (|| {
        while at < target {
            let n = usize::try_from(target - at).unwrap_or(CHUNK).min(CHUNK);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_data()
    })();
    match written {
        Ok(()) => Ok(target - start),
        Err(e) => {
            // Disk full or an I/O error: give the space back (still past
            // every frame, still under the write lock).
            let _ = file.set_len(start);
            Err(e)
        }
    }
}

#[cfg(not(unix))]
fn fill(_wal: &Path, _target: u64) -> std::io::Result<u64> {
    Ok(0)
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
        let added = prefill(&conn, &wal_path(&path), busy).unwrap();
        let target = target_len(4096, 1000);
        assert_eq!(wal_len(&path), target);
        assert!(added > 0 && added < target);
        assert_eq!(
            prefill(&conn, &wal_path(&path), busy).unwrap(),
            0,
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
        let mut watch = WalPrefill::new(&path, Duration::from_secs(5));
        conn.execute("INSERT INTO t VALUES ('one')", []).unwrap();
        watch.after_commit(&conn);
        assert!(wal_len(&path) < START_AFTER);
        assert!(!watch.finished());
        let mut i = 0;
        while wal_len(&path) < START_AFTER {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("row {i}")])
                .unwrap();
            i += 1;
        }
        watch.after_commit(&conn);
        assert!(watch.finished());
        assert_eq!(wal_len(&path), target_len(4096, 1000));
        crash_copy(&path, dir.path(), i + 1);
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
        assert_eq!(prefill(&conn, &wal_path(&path), long).unwrap(), 0);
        assert!(started.elapsed() < long / 2, "waited for the lock");
        assert_eq!(wal_len(&path), before);
        other.execute_batch("ROLLBACK").unwrap();
        assert!(prefill(&conn, &wal_path(&path), long).unwrap() > 0);
    }
}
