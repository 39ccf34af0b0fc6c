//! The processing-lock row (DESIGN §3) kept in the outbox database, so every
//! runner write can check the lock in the same transaction.
//!
//! These are compare-and-swap primitives only; deciding *when* a lock is
//! stale (on the contender's monotonic clock) is the `lock` module's job.
//! An empty owner means the lock is free; the epoch never goes back, even
//! across release, so an old holder's fence can never match again.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::error::OutboxError;
use crate::core::mutant::{self, Mutant};
use crate::op::Fence;

/// The lock as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRow {
    /// Holder's owner id; empty when released.
    pub owner: String,
    /// Fencing token, incremented by every acquisition.
    pub epoch: u64,
    /// Heartbeat counter, incremented by every beat.
    pub heartbeat: u64,
    /// Wall time of the last beat (Unix ms; informational only).
    pub beat_at: i64,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The lock row, if any runner ever took the lock.
pub(crate) fn read(conn: &Connection) -> rusqlite::Result<Option<LockRow>> {
    conn.prepare_cached("SELECT owner, epoch, heartbeat, beat_at FROM lock WHERE id = 1")?
        .query_row([], |r| {
            Ok(LockRow {
                owner: r.get(0)?,
                epoch: to_u64(r.get(1)?),
                heartbeat: to_u64(r.get(2)?),
                beat_at: r.get(3)?,
            })
        })
        .optional()
}

/// Fails with [`OutboxError::LockLost`] unless `fence` still holds the lock.
pub(crate) fn check(conn: &Connection, fence: &Fence) -> Result<(), OutboxError> {
    if mutant::active(Mutant::SkipFence) {
        return Ok(());
    }
    match read(conn)? {
        Some(row)
            if !fence.owner().is_empty()
                && row.owner == fence.owner()
                && row.epoch == fence.epoch() =>
        {
            Ok(())
        }
        _ => Err(OutboxError::LockLost),
    }
}

/// Takes the lock if it is free, already ours, or exactly as the caller last
/// saw it when judging it stale (`expect = (epoch, heartbeat)`).
pub(crate) fn acquire(
    conn: &Connection,
    owner: &str,
    expect: Option<(u64, u64)>,
    now: i64,
) -> rusqlite::Result<Option<Fence>> {
    if owner.is_empty() {
        return Ok(None);
    }
    let epoch = match read(conn)? {
        None => 1,
        Some(row) => {
            let free = row.owner.is_empty();
            let ours = row.owner == owner;
            let stale_as_seen = expect == Some((row.epoch, row.heartbeat));
            if !(free || ours || stale_as_seen) {
                return Ok(None);
            }
            row.epoch + 1
        }
    };
    conn.prepare_cached(
        "INSERT INTO lock (id, owner, epoch, heartbeat, beat_at) VALUES (1, ?1, ?2, 0, ?3) \
         ON CONFLICT(id) DO UPDATE SET owner = ?1, epoch = ?2, heartbeat = 0, beat_at = ?3",
    )?
    .execute(params![owner, to_i64(epoch), now])?;
    Ok(Some(Fence::new(owner.to_owned(), epoch)))
}

/// Meta key of the identity (`dev:inode`) of the OS lock file the holder
/// keeps. A contender that obtains an OS lock takes it as proof that the
/// holder's process is gone only if it is this very file: a lock file
/// deleted and created again, or reached by another name, proves nothing.
const OS_FILE_KEY: &str = "lock.os_file";

/// The identity of the holder's OS lock file, if it recorded one.
pub(crate) fn os_file(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([OS_FILE_KEY], |r| r.get(0))
        .optional()
}

/// Records (or, with `None`, forgets) the holder's OS lock file.
pub(crate) fn note_os_file(conn: &Connection, id: Option<&str>) -> rusqlite::Result<()> {
    match id {
        Some(id) => conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = ?2",
            )?
            .execute(params![OS_FILE_KEY, id])?,
        None => conn
            .prepare_cached("DELETE FROM meta WHERE key = ?1")?
            .execute([OS_FILE_KEY])?,
    };
    Ok(())
}

/// Proves liveness: heartbeat += 1, beat_at = now.
pub(crate) fn heartbeat(conn: &Connection, fence: &Fence, now: i64) -> Result<(), OutboxError> {
    check(conn, fence)?;
    conn.prepare_cached("UPDATE lock SET heartbeat = heartbeat + 1, beat_at = ?1 WHERE id = 1")?
        .execute([now])?;
    Ok(())
}

/// Frees the lock (keeping the epoch) if `fence` still holds it.
pub(crate) fn release(conn: &Connection, fence: &Fence) -> Result<(), OutboxError> {
    check(conn, fence)?;
    conn.prepare_cached("UPDATE lock SET owner = '' WHERE id = 1")?
        .execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::outbox::{Outbox, OutboxOptions};

    /// An acquire whose caller gave up once its write had begun (a runner
    /// stopped while the outbox was busy) commits, and gives the lock back:
    /// the row names no holder that will never beat. Heard, it keeps it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_taken_unheard_is_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path().join("o.db"), OutboxOptions::default())
            .await
            .unwrap();
        let (reached, go) = outbox.hold_next_commit(true);
        let mut acquire = Box::pin(outbox.lock_acquire("runner-a", None));
        assert!(futures::poll!(acquire.as_mut()).is_pending());
        tokio::time::timeout(Duration::from_secs(30), reached)
            .await
            .expect("the acquire's commit was not held")
            .unwrap();
        drop(acquire);
        go.send(()).unwrap();
        // The give-back is queued while the held group is answered, so
        // before any later group's answer: the second read comes after it.
        outbox.lock_read().await.unwrap();
        let row = outbox.lock_read().await.unwrap().unwrap();
        assert_eq!((row.owner.as_str(), row.epoch), ("", 1), "{row:?}");
        let fence = outbox.lock_acquire("runner-a", None).await.unwrap();
        assert_eq!(fence.map(|f| f.epoch()), Some(2));
        outbox.lock_read().await.unwrap();
        let row = outbox.lock_read().await.unwrap().unwrap();
        assert_eq!((row.owner.as_str(), row.epoch), ("runner-a", 2), "{row:?}");
        outbox.close().await;
    }
}
