//! The server database: pragmas, schema and migrations.
//!
//! Schema version 1 (`PRAGMA user_version`):
//! - `tenants`: per-tenant feed counters (`last_cursor`, `purged_through`).
//! - `entities`: current state of every entity, tombstones included.
//! - `idempotency`: `(tenant, key)` → fingerprint and stored response.
//! - `changes`: the per-tenant change feed, keyed by `(tenant, cursor)`.
//! - `applied`: the applied-mutations log, one row per mutation that took effect.
//!
//! Schema version 2 adds `applied.transaction_key` (the atomic transaction
//! a row was applied in; `NULL` for the rows of version 1).
//!
//! Schema version 3 drops the index `changes_at`: retention walks each
//! tenant's feed from its front instead (`feed::purge`).
//!
//! Schema version 4 stores idempotency records in the order they are made
//! (`seq`), found by a unique index on `(tenant, key)`: a record is appended
//! instead of placed at its random key with the response inline (which
//! split pages), and retention walks the front instead of an index on
//! `created_at` (`idempotency::purge`).

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;

/// Durability of commits in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// fsync on every commit (default): a committed mutation survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a process crash, may lose the last
    /// commits on power loss. Faster.
    Normal,
}

const SCHEMA_VERSION: i64 = 4;

/// WAL pages between automatic checkpoints (SQLite's default is 1,000). A
/// checkpoint copies each page once however often it was rewritten, and the
/// feed's, the idempotency records' and hot entities' pages are rewritten by
/// every commit: fewer checkpoints copy them fewer times, on the one writer
/// every mutation waits for. Cost: a WAL of up to ~40 MiB on disk, and
/// longer (rarer) checkpoint pauses.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// How long a statement waits for another connection's lock.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tenants (
    tenant TEXT PRIMARY KEY,
    last_cursor INTEGER NOT NULL DEFAULT 0,
    purged_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE entities (
    tenant TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (tenant, entity_type, id)
) WITHOUT ROWID;
CREATE TABLE idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_created ON idempotency (created_at);
CREATE TABLE changes (
    tenant TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    op TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (tenant, cursor)
) WITHOUT ROWID;
CREATE INDEX changes_at ON changes (at);
CREATE TABLE applied (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    id TEXT NOT NULL,
    op TEXT NOT NULL,
    version INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    at INTEGER NOT NULL
);
",
    r"
ALTER TABLE applied ADD COLUMN transaction_key TEXT;
",
    r"
DROP INDEX changes_at;
",
    r"
CREATE TABLE idempotency_v4 (
    seq INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO idempotency_v4 (tenant, key, fingerprint, status, body, created_at)
    SELECT tenant, key, fingerprint, status, body, created_at FROM idempotency
    ORDER BY created_at;
DROP TABLE idempotency;
ALTER TABLE idempotency_v4 RENAME TO idempotency;
CREATE UNIQUE INDEX idempotency_key ON idempotency (tenant, key);
",
];

/// Opens (creating if needed) the database at `path`, or in memory for `None`.
pub(crate) fn open(path: Option<&Path>, sync: Synchronous) -> Result<Connection, StoreError> {
    let conn = match path {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(StoreError::Io)?;
            }
            guardian_sqlite::create_private(p).map_err(StoreError::Io)?;
            // Looked at read-only first (a read-write connection may
            // checkpoint another application's WAL into its file, and the
            // switch to WAL mode changes the header): a wrong path must
            // change nothing.
            let look = guardian_sqlite::connect_read_only(p)?;
            if let Identity::NotOurs(why) = identify(&look)? {
                return Err(StoreError::NotOurs {
                    path: p.to_path_buf(),
                    why,
                });
            }
            drop(look);
            let conn = Connection::open(p)?;
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Corrupt(format!(
                    "could not switch {} to WAL mode (got {mode})",
                    p.display()
                )));
            }
            conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
            conn
        }
        None => Connection::open_in_memory()?,
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals (one per request of a group commit, one per atomic
    // transaction) stay in memory instead of spilling to temporary files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    migrate(&conn)?;
    let app: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    if path.is_some() && app != i64::from(APPLICATION_ID) {
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    Ok(conn)
}

/// `PRAGMA application_id` of a server database file, set at the first
/// open; files of servers from before it carry 0 and are recognised by
/// their tables.
const APPLICATION_ID: u32 = guardian_sqlite::SERVER_APPLICATION_ID;

/// The tables every version of the schema has.
const OUR_TABLES: [&str; 4] = ["tenants", "entities", "idempotency", "changes"];

/// What a database file holds, as far as this server is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Identity {
    /// A server database, or an empty file to make one of.
    Ours,
    /// Something else: why it is not ours.
    NotOurs(String),
}

/// Reads (never writes) what the file behind `conn` holds. A file that is
/// not a SQLite database at all is SQLite's error.
fn identify(conn: &Connection) -> Result<Identity, StoreError> {
    // Signed 32 bits in SQLite; the same bits as ours, unsigned.
    let app: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let app = app & 0xffff_ffff;
    if app == i64::from(APPLICATION_ID) {
        return Ok(Identity::Ours);
    }
    if app == i64::from(guardian_sqlite::OUTBOX_APPLICATION_ID) {
        return Ok(Identity::NotOurs("a guardian-sync outbox".into()));
    }
    if app != 0 {
        return Ok(Identity::NotOurs(format!(
            "another application's database (application_id {app:#010x})"
        )));
    }
    let mut stmt =
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let tables = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if tables.is_empty() || OUR_TABLES.iter().all(|t| tables.iter().any(|n| n == t)) {
        return Ok(Identity::Ours);
    }
    let mut listed: Vec<&str> = tables.iter().map(String::as_str).take(5).collect();
    if tables.len() > listed.len() {
        listed.push("…");
    }
    Ok(Identity::NotOurs(format!(
        "it has tables {}",
        listed.join(", ")
    )))
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this server ({SCHEMA_VERSION})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let target = i64::try_from(i + 1).unwrap_or(i64::MAX);
        if target > version {
            conn.execute_batch(&format!(
                "BEGIN; {sql} PRAGMA user_version = {target}; COMMIT;"
            ))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new database file, and the WAL and shared-memory files SQLite
    /// creates beside it, are readable by their owner only, whatever the
    /// umask: they hold every tenant's data.
    #[cfg(unix)]
    #[test]
    fn a_new_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = open(Some(&path), Synchronous::Full).unwrap();
        conn.execute_batch("INSERT INTO tenants (tenant, last_cursor) VALUES ('t', 0)")
            .unwrap();
        for name in ["s.db", "s.db-wal", "s.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name} has mode {mode:o}");
        }
    }

    /// A database of version 1 is migrated in place: its log rows keep
    /// their values and get no transaction key; its idempotency records
    /// keep theirs, stored in the order they were made, one per key.
    #[test]
    fn version_1_migrates_to_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "BEGIN; {} PRAGMA user_version = 1; COMMIT;",
                MIGRATIONS[0]
            ))
            .unwrap();
            conn.execute(
                "INSERT INTO applied (tenant, idempotency_key, entity_type, id, op, version, cursor, at)
                 VALUES ('t', 'k', 'd', 'i', 'create', 1, 1, 0)",
                [],
            )
            .unwrap();
            conn.execute_batch(
                "INSERT INTO idempotency VALUES ('t', 'late', x'01', 200, '{\"a\":1}', 20);
                 INSERT INTO idempotency VALUES ('t', 'early', x'02', 201, 'null', 10);",
            )
            .unwrap();
        }
        let conn = open(Some(&path), Synchronous::Full).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let log = super::super::applied::read_all(&conn).unwrap();
        assert_eq!(
            (
                log[0].idempotency_key.as_str(),
                log[0].transaction_key.as_deref()
            ),
            ("k", None)
        );
        let records: Vec<(String, i64, String)> = conn
            .prepare("SELECT key, status, body FROM idempotency ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            records,
            [
                ("early".to_owned(), 201, "null".to_owned()),
                ("late".to_owned(), 200, r#"{"a":1}"#.to_owned())
            ]
        );
        assert!(conn
            .execute(
                "INSERT INTO idempotency (tenant, key, fingerprint, status, body, created_at)
                 VALUES ('t', 'late', x'03', 200, '', 30)",
                [],
            )
            .is_err());
        let every: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(every, WAL_AUTOCHECKPOINT_PAGES);
        // A file of a server from before the stamp is stamped.
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(app, i64::from(APPLICATION_ID));
        drop(conn);
        // Opening again runs no migration twice.
        open(Some(&path), Synchronous::Full).unwrap();
    }

    /// Every file in `dir` with its bytes.
    fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    /// A SQLite database of something else (another app's tables, another
    /// application id, an outbox) is refused, saying what it is, and left
    /// byte for byte as it was, with no file added beside it.
    #[test]
    fn a_database_of_something_else_is_refused_and_left_as_it_was() {
        let cases: [(&str, i64, &str); 4] = [
            (
                "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');",
                0,
                "notes",
            ),
            ("CREATE TABLE t (v);", 0x1234_5678, "0x12345678"),
            ("CREATE TABLE t (v);", -2_147_483_647, "0x80000001"),
            (
                "CREATE TABLE ops (seq INTEGER PRIMARY KEY);",
                i64::from(guardian_sqlite::OUTBOX_APPLICATION_ID),
                "outbox",
            ),
        ];
        for (sql, app, said) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("other.db");
            {
                let conn = Connection::open(&path).unwrap();
                conn.execute_batch(sql).unwrap();
                conn.pragma_update(None, "application_id", app).unwrap();
            }
            let before = snapshot(dir.path());
            let err = open(Some(&path), Synchronous::Full).unwrap_err();
            assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");
            assert!(err.to_string().contains(said), "{err}");
            assert_eq!(
                snapshot(dir.path()),
                before,
                "{said}: the directory changed"
            );
        }
    }

    /// Another application's WAL database as a crash left it, its last
    /// commit only in the WAL: refused without checkpointing that commit
    /// into the file or removing the WAL (which the close of a read-write
    /// connection would do).
    #[test]
    fn another_applications_crashed_wal_database_is_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        let theirs = Connection::open(&live).unwrap();
        let _: String = theirs
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        theirs
            .execute_batch(
                "PRAGMA wal_autocheckpoint = 0; CREATE TABLE notes (body TEXT);
                 INSERT INTO notes VALUES ('in the WAL only');",
            )
            .unwrap();
        // What a crash leaves: the two files, no shared-memory index.
        let path = dir.path().join("crashed.db");
        std::fs::copy(&live, &path).unwrap();
        std::fs::copy(
            dir.path().join("live.db-wal"),
            dir.path().join("crashed.db-wal"),
        )
        .unwrap();
        drop(theirs);
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        let (db, wal) = (read("crashed.db"), read("crashed.db-wal"));
        assert!(!wal.is_empty());
        let err = open(Some(&path), Synchronous::Full).unwrap_err();
        assert!(err.to_string().contains("notes"), "{err}");
        // Not `assert_eq!`: a failure would print both files.
        assert!(read("crashed.db") == db, "the database file changed");
        assert!(read("crashed.db-wal") == wal, "the WAL changed");
    }

    /// A new database, and an empty file given as one, are the server's and
    /// are stamped as such in the file header.
    #[test]
    fn a_new_or_empty_file_becomes_a_stamped_server_database() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        for path in [dir.path().join("new.db"), empty] {
            drop(open(Some(&path), Synchronous::Full).unwrap());
            let header = std::fs::read(&path).unwrap();
            assert_eq!(&header[68..72], b"GSRV", "{}", path.display());
            drop(open(Some(&path), Synchronous::Full).unwrap());
        }
    }
}
