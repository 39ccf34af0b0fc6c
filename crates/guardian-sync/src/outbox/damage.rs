//! Damage: cheap detection at open, full checks on demand, and salvage.
//!
//! `PRAGMA quick_check` is O(file size), far too slow for a start-up path
//! that must reach the first ready op in milliseconds with a million queued
//! ops. So open detects damage cheaply: the 100-byte header (magic string,
//! page size, and the page count against the file length when no WAL is
//! pending), then SQLite's own open, schema read and a few index probes.
//! A failure that SQLite calls corrupt or "not a database" triggers salvage;
//! `Outbox::check` (and `OutboxOptions::integrity_check_at_open`) run the
//! full `PRAGMA integrity_check` and `REINDEX`.
//!
//! Salvage never deletes anything: the damaged file (and its `-wal`) is
//! renamed to `<name>.corrupt-<unix_ms>`, a fresh outbox is created in its
//! place, and every row that can still be read is copied over, one by one,
//! skipping what fails.

use std::path::{Path, PathBuf};

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::op::{OpKind, OpState};

/// What salvage saved and lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvageReport {
    /// Why the file was judged damaged.
    pub reason: String,
    /// Where the damaged file was moved.
    pub moved_to: PathBuf,
    /// Ops copied into the fresh file.
    pub ops_saved: u64,
    /// Op rows found but unreadable (bad values), not copied.
    pub ops_unreadable: u64,
    /// Ranges of positions (`seq`, inclusive) that could not be read at all;
    /// they may have held ops (or been empty). Empty when the scan was clean.
    pub unreadable_seq_ranges: Vec<(i64, i64)>,
    /// True if the `ops` table could not be read at all: every op is lost.
    pub ops_table_lost: bool,
    /// Meta entries copied (realtime cursor, settings).
    pub meta_saved: u64,
    /// Transaction outcomes copied.
    pub outcomes_saved: u64,
    /// True if the lock row was copied (its epoch keeps increasing).
    pub lock_saved: bool,
    /// Errors met on the way (first few).
    pub notes: Vec<String>,
}

/// Result of [`Outbox::check`](super::Outbox::check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// True if the file passes `PRAGMA integrity_check` now.
    pub ok: bool,
    /// What the first integrity check reported (empty if it said "ok").
    pub problems: Vec<String>,
    /// True if indexes were rebuilt because of those problems.
    pub reindexed: bool,
    /// What remains after the rebuild (empty if it is now ok).
    pub remaining: Vec<String>,
}

fn integrity(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA integrity_check(100)")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let lines: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(if lines.len() == 1 && lines[0] == "ok" {
        Vec::new()
    } else {
        lines
    })
}

/// Runs [`integrity`]; a check that SQLite had to abort on a corrupt page
/// is itself a finding, reported like the others instead of as an error.
fn integrity_findings(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    match integrity(conn) {
        Err(e) if super::error::is_corrupt(&e) => {
            Ok(vec![format!("the integrity check stopped: {e}")])
        }
        other => other,
    }
}

/// Full integrity check; rebuilds indexes if it finds problems.
pub(crate) fn check(conn: &Connection) -> rusqlite::Result<CheckReport> {
    let problems = integrity_findings(conn)?;
    if problems.is_empty() {
        return Ok(CheckReport {
            ok: true,
            problems,
            reindexed: false,
            remaining: Vec::new(),
        });
    }
    tracing::warn!(
        count = problems.len(),
        "outbox integrity check failed; rebuilding indexes"
    );
    let remaining = match conn.execute_batch("REINDEX") {
        Err(e) if super::error::is_corrupt(&e) => {
            vec![format!("rebuilding the indexes failed: {e}")]
        }
        Err(e) => return Err(e),
        Ok(()) => integrity_findings(conn)?,
    };
    Ok(CheckReport {
        ok: remaining.is_empty(),
        problems,
        reindexed: true,
        remaining,
    })
}

/// Checks the 100-byte header without SQLite: returns why the file is
/// damaged, or `None` if it looks sane (or is empty, which SQLite treats as
/// a new database).
pub(crate) fn header_damage(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut header = [0u8; 100];
    if len < 100 || file.read_exact(&mut header).is_err() {
        return Ok(Some(format!(
            "file is {len} bytes, shorter than a database header"
        )));
    }
    if &header[..16] != b"SQLite format 3\0" {
        return Ok(Some("not a SQLite database (bad header magic)".into()));
    }
    let raw_page = u32::from(u16::from_be_bytes([header[16], header[17]]));
    let page_size = if raw_page == 1 { 65_536 } else { raw_page };
    if page_size < 512 || !page_size.is_power_of_two() {
        return Ok(Some(format!("invalid page size {raw_page} in header")));
    }
    let pages = u32::from_be_bytes([header[28], header[29], header[30], header[31]]);
    let change = &header[24..28];
    let valid_for = &header[92..96];
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_pending = std::fs::metadata(PathBuf::from(wal))
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    // The header's page count is trustworthy only when it is marked valid,
    // and the file may legitimately be short while a WAL holds newer pages.
    if pages > 0 && change == valid_for && !wal_pending {
        let expected = u64::from(pages) * u64::from(page_size);
        if len < expected {
            return Ok(Some(format!(
                "file is truncated: {len} bytes, header says {pages} pages of {page_size} ({expected} bytes)"
            )));
        }
    }
    Ok(None)
}

/// If `path` is shorter than its header's page count (and has no WAL), a
/// copy of it extended with zero pages to that size; unreadable pages then
/// fail one by one instead of the whole file being refused.
fn padded_copy(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::Read;
    let mut header = [0u8; 100];
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if file.read_exact(&mut header).is_err() || &header[..16] != b"SQLite format 3\0" {
        return Ok(None);
    }
    let raw_page = u32::from(u16::from_be_bytes([header[16], header[17]]));
    let page_size = u64::from(if raw_page == 1 { 65_536 } else { raw_page });
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    let expected = pages * page_size;
    if pages == 0 || len >= expected || with_suffix(path, "-wal").exists() {
        return Ok(None);
    }
    let copy = with_suffix(path, ".salvage");
    std::fs::copy(path, &copy)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)?
        .set_len(expected)?;
    Ok(Some(copy))
}

/// `<path><suffix>` as a path.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Moves the damaged file (and its WAL and shared-memory files) aside.
pub(crate) fn move_aside(path: &Path, now_ms: i64) -> std::io::Result<PathBuf> {
    let aside = with_suffix(path, &format!(".corrupt-{now_ms}"));
    std::fs::rename(path, &aside)?;
    for ext in ["-wal", "-shm"] {
        let from = with_suffix(path, ext);
        if from.exists() {
            // Keep the WAL beside the moved file under SQLite's naming, so
            // opening the moved file reads its last commits too.
            std::fs::rename(&from, with_suffix(&aside, ext))?;
        }
    }
    Ok(aside)
}

const OP_COPY_COLUMNS: &[&str] = &[
    "seq",
    "op_id",
    "idempotency_key",
    "kind",
    "entity_type",
    "entity_id",
    "payload",
    "base",
    "base_version",
    "chained",
    "txn_tokens",
    "envelope_version",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "created_at",
    "updated_at",
    "coalesced_count",
    "reconciliations",
    "history",
];

/// Rejects rows whose values cannot be a valid op (they would poison the fresh file).
fn op_row_valid(v: &[SqlValue]) -> bool {
    let text = |i: usize| match &v[i] {
        SqlValue::Text(s) => Some(s.as_str()),
        _ => None,
    };
    let int = |i: usize| matches!(v[i], SqlValue::Integer(_));
    let json_ok =
        |i: usize| text(i).is_some_and(|s| serde_json::from_str::<serde_json::Value>(s).is_ok());
    int(0)
        && text(1).is_some_and(|s| Uuid::parse_str(s).is_ok())
        && text(2).is_some_and(|s| Uuid::parse_str(s).is_ok())
        && text(3).and_then(OpKind::parse).is_some()
        && text(4).is_some_and(|s| guardian_protocol::validate_entity_type(s).is_ok())
        && text(5).is_some_and(|s| guardian_protocol::validate_entity_id(s).is_ok())
        && json_ok(6)
        && (matches!(v[7], SqlValue::Null) || json_ok(7))
        && text(12).and_then(OpState::parse).is_some()
        && json_ok(10)
        && json_ok(20)
        && [9, 11, 13, 14, 16, 17, 18, 19].iter().all(|&i| int(i))
}

/// Copies every readable op row from `old` to `new`, skipping unreadable ones.
fn copy_ops(old: &Connection, new: &Connection, report: &mut SalvageReport) {
    // Without a readable max, probe a bounded distance past the last good row.
    const BLIND_PROBE: i64 = 100_000;
    if let Err(e) = old.prepare("SELECT seq FROM ops LIMIT 0") {
        report.ops_table_lost = true;
        note(report, format!("ops table unreadable: {e}"));
        return;
    }
    let cols = OP_COPY_COLUMNS.join(", ");
    let select = format!("SELECT {cols} FROM ops WHERE seq >= ?1 ORDER BY seq");
    let placeholders = vec!["?"; OP_COPY_COLUMNS.len()].join(", ");
    let insert = format!("INSERT OR IGNORE INTO ops ({cols}) VALUES ({placeholders})");
    // A tiny table that usually survives when the end of `ops` does not
    // bounds every seq ever used: `ops_seq_mark.bound` (schema 3), or
    // AUTOINCREMENT's `sqlite_sequence` (schemas 1 and 2).
    let max_seq: Option<i64> = match old.query_row("SELECT max(seq) FROM ops", [], |r| r.get(0)) {
        Ok(v) => v,
        Err(e) => {
            note(report, format!("max(seq) unreadable: {e}"));
            old.query_row("SELECT bound FROM ops_seq_mark WHERE id = 1", [], |r| {
                r.get(0)
            })
            .or_else(|_| {
                old.query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'ops'",
                    [],
                    |r| r.get(0),
                )
            })
            .ok()
        }
    };
    let mut next: i64 = 0;
    let mut gap_start: Option<i64> = None;
    let mut first_error = true;
    loop {
        let end = scan_from(old, new, &select, &insert, next, report);
        if let (Some(gap), Some(first)) = (gap_start, end.first_read) {
            report.unreadable_seq_ranges.push((gap, first - 1));
            gap_start = None;
        }
        let Err((pos, e)) = end.result else {
            if let Some(gap) = gap_start {
                report
                    .unreadable_seq_ranges
                    .push((gap, max_seq.unwrap_or(gap).max(gap)));
            }
            break;
        };
        if first_error {
            note(report, format!("unreadable rows from seq {pos}: {e}"));
            first_error = false;
        }
        // The row at `pos` (or the page holding it) cannot be read: skip it.
        gap_start.get_or_insert(pos);
        next = pos + 1;
        // Blind: at most BLIND_PROBE positions past the last good row (the
        // gap's start), not past each failed probe, or it never ends.
        let limit = max_seq.unwrap_or_else(|| gap_start.unwrap_or(pos).saturating_add(BLIND_PROBE));
        if next > limit {
            if let Some(gap) = gap_start.take() {
                report.unreadable_seq_ranges.push((gap, limit.max(gap)));
            }
            break;
        }
    }
}

/// How one scan ended.
struct ScanEnd {
    /// Position of the first row read, if any.
    first_read: Option<i64>,
    /// `Err((first position not read, error))` if the scan broke off.
    result: Result<(), (i64, String)>,
}

/// Copies rows with `seq >= from` until the end or the first read error.
fn scan_from(
    old: &Connection,
    new: &Connection,
    select: &str,
    insert: &str,
    from: i64,
    report: &mut SalvageReport,
) -> ScanEnd {
    let mut end = ScanEnd {
        first_read: None,
        result: Ok(()),
    };
    let mut stmt = match old.prepare_cached(select) {
        Ok(s) => s,
        Err(e) => {
            end.result = Err((from, e.to_string()));
            return end;
        }
    };
    let mut rows = match stmt.query([from]) {
        Ok(r) => r,
        Err(e) => {
            end.result = Err((from, e.to_string()));
            return end;
        }
    };
    let mut pos = from;
    loop {
        match rows.next() {
            Ok(None) => return end,
            Ok(Some(row)) => {
                let values: Result<Vec<SqlValue>, _> = (0..OP_COPY_COLUMNS.len())
                    .map(|i| row.get::<_, SqlValue>(i))
                    .collect();
                let seq = match values.as_ref().ok().and_then(|v| v.first()) {
                    Some(SqlValue::Integer(s)) => *s,
                    _ => pos,
                };
                end.first_read.get_or_insert(seq);
                match values {
                    Ok(v) if op_row_valid(&v) => {
                        match new.execute(insert, rusqlite::params_from_iter(v)) {
                            Ok(_) => report.ops_saved += 1,
                            Err(e) => {
                                report.ops_unreadable += 1;
                                note(report, format!("op {seq} not copied: {e}"));
                            }
                        }
                    }
                    _ => report.ops_unreadable += 1,
                }
                pos = seq.saturating_add(1);
            }
            Err(e) => {
                end.result = Err((pos, e.to_string()));
                return end;
            }
        }
    }
}

fn note(report: &mut SalvageReport, msg: String) {
    if report.notes.len() < 20 {
        report.notes.push(msg);
    }
}

/// Copies the small tables best-effort.
fn copy_small(old: &Connection, new: &Connection, report: &mut SalvageReport) {
    let tables: [(&str, &str, usize); 3] = [
        ("meta", "key, value", 2),
        ("lock", "id, owner, epoch, heartbeat, beat_at", 5),
        (
            "txn_outcomes",
            "id, token, active, state, error, at, delivered",
            7,
        ),
    ];
    for (table, cols, n) in tables {
        let Ok(mut stmt) = old.prepare(&format!("SELECT {cols} FROM {table}")) else {
            note(report, format!("{table} table unreadable"));
            continue;
        };
        let Ok(mut rows) = stmt.query([]) else {
            note(report, format!("{table} table unreadable"));
            continue;
        };
        let placeholders = vec!["?"; n].join(", ");
        let insert = format!("INSERT OR IGNORE INTO {table} ({cols}) VALUES ({placeholders})");
        loop {
            match rows.next() {
                Ok(Some(row)) => {
                    let values: Result<Vec<SqlValue>, _> =
                        (0..n).map(|i| row.get::<_, SqlValue>(i)).collect();
                    let Ok(values) = values else { continue };
                    if new
                        .execute(&insert, rusqlite::params_from_iter(values))
                        .is_ok()
                    {
                        match table {
                            "meta" => report.meta_saved += 1,
                            "lock" => report.lock_saved = true,
                            _ => report.outcomes_saved += 1,
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    note(report, format!("{table} scan stopped: {e}"));
                    break;
                }
            }
        }
    }
}

/// Moves the damaged file aside and copies what can be read into `fresh`
/// (an already migrated, empty outbox at the original path).
pub(crate) fn salvage_into(aside: &Path, fresh: &Connection, reason: String) -> SalvageReport {
    let mut report = SalvageReport {
        reason,
        moved_to: aside.to_path_buf(),
        ops_saved: 0,
        ops_unreadable: 0,
        unreadable_seq_ranges: Vec::new(),
        ops_table_lost: false,
        meta_saved: 0,
        outcomes_saved: 0,
        lock_saved: false,
        notes: Vec::new(),
    };
    // SQLite refuses a file shorter than its header says: read from a copy
    // padded with zero pages instead (the moved file stays as it was).
    let padded = match padded_copy(aside) {
        Ok(p) => p,
        Err(e) => {
            note(&mut report, format!("cannot pad the truncated file: {e}"));
            None
        }
    };
    let source = padded.as_deref().unwrap_or(aside);
    let old = match Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_WRITE) {
        Ok(c) => c,
        Err(e) => {
            report.ops_table_lost = true;
            note(&mut report, format!("moved file cannot be opened: {e}"));
            return report;
        }
    };
    copy_ops(&old, fresh, &mut report);
    copy_small(&old, fresh, &mut report);
    drop(old);
    if let Some(p) = padded {
        for f in [with_suffix(&p, "-wal"), with_suffix(&p, "-shm"), p] {
            let _ = std::fs::remove_file(f);
        }
    }
    if report.ops_saved > 0 {
        // Heads and in-flight state are rebuilt from scratch below.
        let fix = fresh.execute_batch(
            "UPDATE ops SET state = 'pending' WHERE state = 'in_flight';
             UPDATE ops SET is_head = 0;
             UPDATE ops SET is_head = 1 WHERE seq IN (SELECT min(seq) FROM ops
                 WHERE state = 'pending' GROUP BY entity_type, entity_id);
             INSERT OR IGNORE INTO op_envelopes (version)
                 SELECT DISTINCT envelope_version FROM ops;",
        );
        if let Err(e) = fix {
            note(&mut report, format!("rebuilding heads failed: {e}"));
        }
    }
    report
}
