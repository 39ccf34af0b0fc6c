//! On-disk schema: numbered forward migrations tracked by `PRAGMA user_version`,
//! file creation with mode 0600, and the connection pragmas.
//!
//! Migration `n` (1-based) brings the file from `user_version = n - 1` to `n`;
//! each runs in its own transaction together with the version bump. A file
//! with a newer version than this build knows is refused, never downgraded.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::error::OpenError;
use super::Synchronous;

/// Version 1: ops, meta, lock and transaction outcomes.
const V1: &str = r"
CREATE TABLE ops (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id            TEXT    NOT NULL UNIQUE,
    idempotency_key  TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    entity_type      TEXT    NOT NULL,
    entity_id        TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    base             TEXT,
    base_version     INTEGER,
    chained          INTEGER NOT NULL DEFAULT 0,
    txn_tokens       TEXT    NOT NULL DEFAULT '[]',
    envelope_version INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    is_head          INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    coalesced_count  INTEGER NOT NULL DEFAULT 0,
    reconciliations  INTEGER NOT NULL DEFAULT 0,
    history          TEXT    NOT NULL DEFAULT '[]'
);
CREATE INDEX ops_entity   ON ops(entity_type, entity_id, seq);
CREATE INDEX ops_ready    ON ops(next_attempt_at, seq) WHERE state = 'pending' AND is_head = 1;
CREATE INDEX ops_state    ON ops(state, seq);
CREATE INDEX ops_envelope ON ops(envelope_version);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE lock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    owner     TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL,
    beat_at   INTEGER NOT NULL
);

CREATE TABLE txn_outcomes (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    token     TEXT    NOT NULL UNIQUE,
    active    INTEGER NOT NULL DEFAULT 0,
    state     TEXT    NOT NULL,
    error     TEXT,
    at        INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX txn_outcomes_undelivered ON txn_outcomes(id) WHERE delivered = 0;
CREATE INDEX txn_outcomes_at ON txn_outcomes(at) WHERE state <> 'pending';
";

/// Version 2: a leaner insert. Enqueueing a pending op no longer touches
/// `ops_state` (now partial: only in-flight and failed ops, which its users
/// look for) nor `ops_envelope`, replaced by `op_envelopes`, the set of
/// envelope versions that pending or in-flight ops may carry (a superset).
/// An insert of an already listed version reads one row and writes nothing;
/// open upcasts only when a listed version is older than the app's.
const V2: &str = r"
CREATE TABLE op_envelopes (
    version INTEGER PRIMARY KEY
) WITHOUT ROWID;
INSERT OR IGNORE INTO op_envelopes (version) SELECT DISTINCT envelope_version FROM ops;
DROP INDEX ops_envelope;
DROP INDEX ops_state;
CREATE INDEX ops_state ON ops(state, seq) WHERE state <> 'pending';
";

/// The migrations, in order; index `i` brings version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: u32 = 2;

/// Creates the file with mode 0600 if it does not exist, so the `-wal` and
/// `-shm` files SQLite creates beside it inherit that mode. Returns true if
/// it was created.
pub(crate) fn create_file(path: &Path) -> std::io::Result<bool> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Prepared statements kept per connection (the outbox uses about 50).
const STATEMENT_CACHE: usize = 128;

/// Opens a read-write connection with the outbox's pragmas.
pub(crate) fn connect(
    path: &Path,
    synchronous: Synchronous,
    busy_timeout: Duration,
) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // Room for every statement the outbox prepares, so none is re-parsed.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(busy_timeout)?;
    let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    Ok(conn)
}

/// Brings the schema up to [`SCHEMA_VERSION`]; returns the version found if a
/// migration ran.
pub(crate) fn migrate(conn: &mut Connection) -> Result<Option<u32>, OpenError> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(None);
    }
    // Re-read the version inside each write transaction: another process may
    // be migrating the same file at the same moment.
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let Some(sql) = MIGRATIONS.get(now as usize) else {
            break;
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", now + 1)?;
        tx.commit()?;
    }
    Ok(Some(found))
}
