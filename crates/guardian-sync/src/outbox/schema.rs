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

/// Version 3: `ops.seq` without AUTOINCREMENT, so an insert no longer
/// rewrites the `sqlite_sequence` row (one b-tree page, one WAL frame, less
/// per enqueue commit). Positions are still never reused, and a damaged
/// file's scan is still bounded, through the one-row `ops_seq_mark`:
/// - `deleted_max`: the largest `seq` deleted while it was the newest row
///   (a trigger, so every delete path keeps it, and writes only then); an
///   insert takes `max(max(seq), deleted_max) + 1` (see `enqueue::insert`);
/// - `bound`: at least every `seq` ever stored, raised in steps of 1024 by an
///   insert trigger (one write per 1024 inserts); salvage scans up to it
///   when the end of `ops` is unreadable, as it did with `sqlite_sequence`.
///
/// The table is rebuilt once; both marks start from the old counter.
const V3: &str = r"
CREATE TABLE ops_seq_mark (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    deleted_max INTEGER NOT NULL,
    bound       INTEGER NOT NULL
);
INSERT INTO ops_seq_mark (id, deleted_max, bound)
    SELECT 1, c, c + 1024
    FROM (SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ops'), 0),
                     coalesce((SELECT max(seq) FROM ops), 0)) AS c);
CREATE TABLE ops_v3 (
    seq              INTEGER PRIMARY KEY,
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
INSERT INTO ops_v3 (seq, op_id, idempotency_key, kind, entity_type, entity_id, payload, base,
    base_version, chained, txn_tokens, envelope_version, state, is_head, attempts,
    next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations,
    history)
SELECT seq, op_id, idempotency_key, kind, entity_type, entity_id, payload, base,
    base_version, chained, txn_tokens, envelope_version, state, is_head, attempts,
    next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations,
    history
FROM ops ORDER BY seq;
DROP TABLE ops;
ALTER TABLE ops_v3 RENAME TO ops;
CREATE INDEX ops_entity ON ops(entity_type, entity_id, seq);
CREATE INDEX ops_ready  ON ops(next_attempt_at, seq) WHERE state = 'pending' AND is_head = 1;
CREATE INDEX ops_state  ON ops(state, seq) WHERE state <> 'pending';
CREATE TRIGGER ops_seq_deleted_max AFTER DELETE ON ops
WHEN NOT EXISTS (SELECT 1 FROM ops WHERE seq > OLD.seq)
BEGIN
    UPDATE ops_seq_mark SET deleted_max = OLD.seq WHERE id = 1 AND deleted_max < OLD.seq;
END;
CREATE TRIGGER ops_seq_bound AFTER INSERT ON ops
WHEN NEW.seq > (SELECT bound FROM ops_seq_mark WHERE id = 1)
BEGIN
    UPDATE ops_seq_mark SET bound = NEW.seq + 1024 WHERE id = 1;
END;
";

/// Version 4: the file says it is an outbox (`application_id`), and each op
/// row carries `checksum`, a seal over its immutable fields (see
/// [`op_checksum`]), filled for the rows already there. Every write path
/// that changes a sealed field goes through `UPDATE`, and the trigger
/// reseals the row then, but only if the old seal still matched: a row
/// damaged on disk stays detectably damaged instead of being blessed.
/// Inserts compute the seal themselves (no second write per enqueue).
const V4: &str = r"
ALTER TABLE ops ADD COLUMN checksum INTEGER;
UPDATE ops SET checksum = op_checksum(op_id, idempotency_key, kind, entity_type, entity_id, payload, base);
CREATE TRIGGER ops_reseal AFTER UPDATE OF op_id, idempotency_key, kind, entity_type, entity_id, payload, base ON ops
BEGIN
    UPDATE ops SET checksum = CASE
        WHEN OLD.checksum IS op_checksum(OLD.op_id, OLD.idempotency_key, OLD.kind, OLD.entity_type,
                                         OLD.entity_id, OLD.payload, OLD.base)
        THEN op_checksum(NEW.op_id, NEW.idempotency_key, NEW.kind, NEW.entity_type,
                         NEW.entity_id, NEW.payload, NEW.base)
        ELSE OLD.checksum END
    WHERE seq = NEW.seq;
END;
PRAGMA application_id = 1196642114;
";

/// Version 5: atomic transactions and dependencies. `txn` names the
/// transaction an op belongs to and its size (`{"id": uuid, "size": n}`,
/// the same text on every member, so salvage can tell a whole transaction
/// from a part) and `depends_on` (a JSON array of op ids,
/// NULL when none) the ops it waits for. Both are sealed: the seal takes
/// them after the first seven fields, and skips them when NULL, so rows
/// without them keep their seal. Such "gated" ops never get `is_head`
/// from the head rule; the gate (`gate::refresh`) sets it once the whole
/// unit may go, so every reader of `ops_ready` sees them only then.
const V5: &str = r"
ALTER TABLE ops ADD COLUMN txn TEXT;
ALTER TABLE ops ADD COLUMN depends_on TEXT;
CREATE INDEX ops_txn ON ops(txn, seq) WHERE txn IS NOT NULL;
CREATE INDEX ops_gated ON ops(state, seq) WHERE txn IS NOT NULL OR depends_on IS NOT NULL;
DROP TRIGGER ops_reseal;
CREATE TRIGGER ops_reseal AFTER UPDATE OF op_id, idempotency_key, kind, entity_type, entity_id,
    payload, base, txn, depends_on ON ops
BEGIN
    UPDATE ops SET checksum = CASE
        WHEN OLD.checksum IS op_checksum(OLD.op_id, OLD.idempotency_key, OLD.kind, OLD.entity_type,
                                         OLD.entity_id, OLD.payload, OLD.base, OLD.txn,
                                         OLD.depends_on)
        THEN op_checksum(NEW.op_id, NEW.idempotency_key, NEW.kind, NEW.entity_type,
                         NEW.entity_id, NEW.payload, NEW.base, NEW.txn, NEW.depends_on)
        ELSE OLD.checksum END
    WHERE seq = NEW.seq;
END;
";

/// Version 6: op ids derived from positions (see `op_ids`). `ops` is
/// rebuilt without the unique index on `op_id`, one b-tree less to write
/// per enqueue and per ack; an op's id names its `seq`, so a lookup by id
/// is a lookup by primary key. Rows whose id does not name their own
/// position (every row before this version, and rows salvaged or written
/// by other tools: the column's default) carry `foreign_id = 1` and are
/// found, and kept unique, through the partial index `ops_foreign_id`.
/// `meta.op_id_ns` was the file's random namespace for new ids; each open
/// now draws its own, and the row is no longer read.
const V6: &str = r"
CREATE TABLE ops_v6 (
    seq              INTEGER PRIMARY KEY,
    op_id            TEXT    NOT NULL,
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
    history          TEXT    NOT NULL DEFAULT '[]',
    checksum         INTEGER,
    txn              TEXT,
    depends_on       TEXT,
    foreign_id       INTEGER NOT NULL DEFAULT 1
);
INSERT INTO ops_v6 (seq, op_id, idempotency_key, kind, entity_type, entity_id, payload, base,
    base_version, chained, txn_tokens, envelope_version, state, is_head, attempts,
    next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations,
    history, checksum, txn, depends_on, foreign_id)
SELECT seq, op_id, idempotency_key, kind, entity_type, entity_id, payload, base,
    base_version, chained, txn_tokens, envelope_version, state, is_head, attempts,
    next_attempt_at, last_error, created_at, updated_at, coalesced_count, reconciliations,
    history, checksum, txn, depends_on, 1
FROM ops ORDER BY seq;
DROP TABLE ops;
ALTER TABLE ops_v6 RENAME TO ops;
CREATE INDEX ops_entity ON ops(entity_type, entity_id, seq);
CREATE INDEX ops_ready  ON ops(next_attempt_at, seq) WHERE state = 'pending' AND is_head = 1;
CREATE INDEX ops_state  ON ops(state, seq) WHERE state <> 'pending';
CREATE INDEX ops_txn ON ops(txn, seq) WHERE txn IS NOT NULL;
CREATE INDEX ops_gated ON ops(state, seq) WHERE txn IS NOT NULL OR depends_on IS NOT NULL;
CREATE UNIQUE INDEX ops_foreign_id ON ops(op_id) WHERE foreign_id = 1;
CREATE TRIGGER ops_seq_deleted_max AFTER DELETE ON ops
WHEN NOT EXISTS (SELECT 1 FROM ops WHERE seq > OLD.seq)
BEGIN
    UPDATE ops_seq_mark SET deleted_max = OLD.seq WHERE id = 1 AND deleted_max < OLD.seq;
END;
CREATE TRIGGER ops_seq_bound AFTER INSERT ON ops
WHEN NEW.seq > (SELECT bound FROM ops_seq_mark WHERE id = 1)
BEGIN
    UPDATE ops_seq_mark SET bound = NEW.seq + 1024 WHERE id = 1;
END;
CREATE TRIGGER ops_reseal AFTER UPDATE OF op_id, idempotency_key, kind, entity_type, entity_id,
    payload, base, txn, depends_on ON ops
BEGIN
    UPDATE ops SET checksum = CASE
        WHEN OLD.checksum IS op_checksum(OLD.op_id, OLD.idempotency_key, OLD.kind, OLD.entity_type,
                                         OLD.entity_id, OLD.payload, OLD.base, OLD.txn,
                                         OLD.depends_on)
        THEN op_checksum(NEW.op_id, NEW.idempotency_key, NEW.kind, NEW.entity_type,
                         NEW.entity_id, NEW.payload, NEW.base, NEW.txn, NEW.depends_on)
        ELSE OLD.checksum END
    WHERE seq = NEW.seq;
END;
INSERT OR REPLACE INTO meta (key, value) VALUES ('op_id_ns', lower(hex(randomblob(8))));
";

/// Version 7: the seal also covers `base_version` (the request's
/// `If-Match`) and `chained` (whether it waits for its predecessor's ack
/// to learn it): a flipped bit there sent a version the app never gave.
/// They come after the nine fields of schema 5 and, like those, count only
/// when set (`base_version` not NULL, `chained` not 0), so most rows keep
/// their seal; the others are resealed here if, and only if, their old
/// seal still matched (see [`upgrade_seal`] for the same rule in salvage).
const V7: &str = r"
DROP TRIGGER ops_reseal;
UPDATE ops SET checksum = op_checksum(op_id, idempotency_key, kind, entity_type, entity_id,
                                      payload, base, txn, depends_on, base_version,
                                      nullif(chained, 0))
WHERE (base_version IS NOT NULL OR chained IS NOT 0)
  AND checksum IS op_checksum(op_id, idempotency_key, kind, entity_type, entity_id, payload, base,
                              txn, depends_on);
CREATE TRIGGER ops_reseal AFTER UPDATE OF op_id, idempotency_key, kind, entity_type, entity_id,
    payload, base, txn, depends_on, base_version, chained ON ops
BEGIN
    UPDATE ops SET checksum = CASE
        WHEN OLD.checksum IS op_checksum(OLD.op_id, OLD.idempotency_key, OLD.kind, OLD.entity_type,
                                         OLD.entity_id, OLD.payload, OLD.base, OLD.txn,
                                         OLD.depends_on, OLD.base_version, nullif(OLD.chained, 0))
        THEN op_checksum(NEW.op_id, NEW.idempotency_key, NEW.kind, NEW.entity_type,
                         NEW.entity_id, NEW.payload, NEW.base, NEW.txn, NEW.depends_on,
                         NEW.base_version, nullif(NEW.chained, 0))
        ELSE OLD.checksum END
    WHERE seq = NEW.seq;
END;
";

/// Schema 7's reseal as an expression over the parameters of a copied row
/// (`?2`..`?10`: op id to chained, in table order; `?22`, `?23`: txn and
/// depends on) and `stored`, the seal it came with: a seal of schema 4 to 6
/// that still matches becomes schema 7's, any other stays as it was, so
/// salvage from an older file neither blesses damage nor flags good rows.
pub(crate) fn upgrade_seal(stored: &str) -> String {
    format!(
        "CASE WHEN {stored} IS op_checksum(?2, ?3, ?4, ?5, ?6, ?7, ?8, ?22, ?23) \
         THEN op_checksum(?2, ?3, ?4, ?5, ?6, ?7, ?8, ?22, ?23, ?9, nullif(?10, 0)) \
         ELSE {stored} END"
    )
}

/// The migrations, in order; index `i` brings version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: u32 = 7;

/// `PRAGMA application_id` of an outbox, at offset 68 of the file header.
/// Files of schema 1 to 3 have 0 there and are recognised by their tables
/// instead (see `ident`); their first writable open stamps it.
pub(crate) const APPLICATION_ID: u32 = guardian_sqlite::OUTBOX_APPLICATION_ID;

/// Number of sealed fields, in the order [`op_checksum`] takes them: the
/// seven of schema 4, then `txn` and `depends_on` (schema 5), then
/// `base_version` and `chained` (schema 7; `chained` passed as NULL when 0).
pub(crate) const SEALED: usize = 11;

/// Sealed fields every row has; the rest count only when not NULL.
const SEALED_ALWAYS: usize = 7;

/// Which seal a file's rows carry, by its schema version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seal {
    /// Schema 1 to 3: none.
    None,
    /// Schema 4 to 6: op id to base, txn and depends on.
    Content,
    /// Schema 7: also `base_version` and `chained`.
    Full,
}

impl Seal {
    pub(crate) fn of(schema: u32) -> Self {
        match schema {
            0..=3 => Self::None,
            4..=6 => Self::Content,
            _ => Self::Full,
        }
    }

    /// How many of the [`SEALED`] fields it covers.
    pub(crate) fn fields(self) -> usize {
        match self {
            Self::None => 0,
            Self::Content => 9,
            Self::Full => SEALED,
        }
    }
}

/// The seal of an op row: the first 8 bytes of SHA-256 over its op id,
/// idempotency key, kind, entity type, entity id, payload, base, and, when
/// not NULL, its transaction id, dependencies, base version and chained
/// flag, each as stored (length-prefixed bytes, an integer's 8 bytes, or a
/// marker for NULL or any other type), as a signed 64-bit integer. It
/// detects damage, not forgery: who can write the file can also recompute
/// it.
pub(crate) fn op_checksum(fields: &[rusqlite::types::ValueRef<'_>]) -> i64 {
    use rusqlite::types::ValueRef;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (i, &f) in fields.iter().enumerate() {
        if i >= SEALED_ALWAYS && f == ValueRef::Null {
            continue;
        }
        match f {
            ValueRef::Text(b) => {
                h.update([1u8]);
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            ValueRef::Null => h.update([0u8]),
            ValueRef::Integer(v) => {
                h.update([3u8]);
                h.update(v.to_le_bytes());
            }
            // No sealed field is real or blob: that is damage, and gets a
            // seal no well-typed row can have.
            ValueRef::Real(_) | ValueRef::Blob(_) => h.update([2u8]),
        }
    }
    let d = h.finalize();
    i64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Registers [`op_checksum`] as the SQL function the schema's trigger and
/// the migration call.
pub(crate) fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    // Variadic: schema 4's trigger passes seven fields, schema 5's nine,
    // schema 7's eleven.
    conn.create_scalar_function(
        "op_checksum",
        -1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let mut refs = [rusqlite::types::ValueRef::Null; SEALED];
            let n = ctx.len().min(SEALED);
            for (i, r) in refs.iter_mut().enumerate().take(n) {
                *r = ctx.get_raw(i);
            }
            Ok(op_checksum(&refs[..n]))
        },
    )
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
    // SQLite reads a name as `:memory:` or a `file:` URI by its text: a
    // relative path goes as `./name`, so it is always the file it names
    // (an outbox named `:memory:` would take ops and keep none).
    let conn = if path.is_relative() {
        Connection::open_with_flags(Path::new(".").join(path), flags)?
    } else {
        Connection::open_with_flags(path, flags)?
    };
    // Room for every statement the outbox prepares, so none is re-parsed.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(busy_timeout)?;
    register_functions(&conn)?;
    let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    Ok(conn)
}

/// Brings the schema up to [`SCHEMA_VERSION`]; returns the version found if a
/// migration ran.
pub(crate) fn migrate(conn: &mut Connection) -> Result<Option<u32>, OpenError> {
    register_functions(conn)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{damage, rows, ListFilter};

    /// A schema 6 file holding four ops with schema 6's seal over what
    /// each row holds: one with a base version, one chained, one with
    /// neither, and one whose seal was already wrong (damaged under 6).
    fn v6_file(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        register_functions(&conn).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
        for sql in &MIGRATIONS[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 6;").unwrap();
        for (seq, base_version, chained, sealed_payload) in [
            (1, Some(7), 0, r#"{"n":1}"#),
            (2, None, 1, r#"{"n":2}"#),
            (3, None, 0, r#"{"n":3}"#),
            (4, Some(9), 0, r#"{"n":"other"}"#),
        ] {
            conn.execute(
                "INSERT INTO ops (seq, op_id, idempotency_key, kind, entity_type, entity_id, \
                 payload, base_version, chained, envelope_version, state, is_head, \
                 next_attempt_at, created_at, updated_at, checksum) \
                 VALUES (?1, ?2, ?3, 'update', 't', ?4, ?5, ?6, ?7, 1, 'pending', 1, 0, 0, 0, \
                 op_checksum(?2, ?3, 'update', 't', ?4, ?8, NULL, NULL, NULL))",
                rusqlite::params![
                    seq,
                    uuid::Uuid::new_v4().to_string(),
                    uuid::Uuid::new_v4().to_string(),
                    format!("e{seq}"),
                    format!(r#"{{"n":{seq}}}"#),
                    base_version,
                    chained,
                    sealed_payload,
                ],
            )
            .unwrap();
        }
        conn
    }

    /// Positions of the readable rows, and of the unreadable ones.
    fn readable(conn: &Connection, seal: Seal) -> (Vec<i64>, Vec<i64>) {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for r in rows::list_checked(conn, &ListFilter::default(), seal).unwrap() {
            match r {
                Ok(op) => good.push(op.seq),
                Err(u) => bad.push(u.seq),
            }
        }
        (good, bad)
    }

    #[test]
    fn migration_to_7_seals_base_versions_and_keeps_damage_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = v6_file(&dir.path().join("o.db"));
        // A reader of the file as it is checks schema 6's seal.
        assert_eq!(readable(&conn, Seal::Content), (vec![1, 2, 3], vec![4]));
        assert_eq!(
            readable(&conn, Seal::Full).1,
            vec![1, 2, 4],
            "7's seal differs"
        );
        assert_eq!(migrate(&mut conn).unwrap(), Some(6));
        assert_eq!(readable(&conn, Seal::Full), (vec![1, 2, 3], vec![4]));
        // A legitimate change is resealed by the trigger; a damaged row
        // stays damaged whatever is changed.
        conn.execute_batch(
            "UPDATE ops SET base_version = 8, chained = 0 WHERE seq IN (1, 2, 4);
             UPDATE ops SET chained = 1 WHERE seq = 3;",
        )
        .unwrap();
        assert_eq!(readable(&conn, Seal::Full), (vec![1, 2, 3], vec![4]));
        // Only a seal of 7 catches a changed base version.
        conn.execute_batch(
            "DROP TRIGGER ops_reseal; UPDATE ops SET base_version = 9 WHERE seq = 1;",
        )
        .unwrap();
        assert_eq!(readable(&conn, Seal::Full).1, vec![1, 4]);
    }

    #[test]
    fn salvage_from_a_schema_6_file_upgrades_only_seals_that_match() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.db");
        drop(v6_file(&old));
        let fresh_path = dir.path().join("fresh.db");
        drop(Connection::open(&fresh_path).unwrap());
        let mut fresh = connect(&fresh_path, Synchronous::Full, Duration::from_secs(1)).unwrap();
        migrate(&mut fresh).unwrap();
        let report = damage::salvage_into(&old, &fresh, "test".into());
        assert_eq!(report.ops_saved + report.ops_quarantined, 4, "{report:?}");
        // The damaged row is kept, never blessed.
        assert_eq!(readable(&fresh, Seal::Full), (vec![1, 2, 3], vec![4]));
        let versions: Vec<Option<i64>> = fresh
            .prepare("SELECT base_version FROM ops ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, vec![Some(7), None, None, Some(9)]);
    }

    /// A reader opened before a writer migrated the file checks the seal
    /// the file now carries, not the one it found at open.
    #[test]
    fn a_reader_open_across_the_migration_checks_the_new_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        // Kept open, so the file has a live WAL the reader follows.
        let mut writer = v6_file(&path);
        let reader = crate::outbox::OutboxReader::open(&path).unwrap();
        assert_eq!(reader.schema_version(), 6);
        migrate(&mut writer).unwrap();
        let listed: Vec<bool> = reader
            .list_checked(&ListFilter::default())
            .unwrap()
            .iter()
            .map(Result::is_ok)
            .collect();
        assert_eq!(listed, [true, true, true, false]);
        assert_eq!(reader.check().unwrap().unreadable_ops.len(), 1);
    }

    /// In a schema 7 file a row without base version or chained flag has
    /// the same seal as under 6: one bit giving it either must not pass
    /// salvage as an old seal to upgrade.
    #[test]
    fn salvage_from_a_schema_7_file_keeps_its_seals() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.db");
        let mut conn = v6_file(&old);
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "DROP TRIGGER ops_reseal; UPDATE ops SET chained = 1, base_version = 0 WHERE seq = 3;",
        )
        .unwrap();
        assert_eq!(readable(&conn, Seal::Full).1, vec![3, 4]);
        drop(conn);
        let fresh_path = dir.path().join("fresh.db");
        drop(Connection::open(&fresh_path).unwrap());
        let mut fresh = connect(&fresh_path, Synchronous::Full, Duration::from_secs(1)).unwrap();
        migrate(&mut fresh).unwrap();
        damage::salvage_into(&old, &fresh, "test".into());
        assert_eq!(readable(&fresh, Seal::Full), (vec![1, 2], vec![3, 4]));
    }
}
