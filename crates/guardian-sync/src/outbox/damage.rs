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

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::rows::{self, UnreadableOp};
use super::scan;
use super::schema::Seal;
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
    /// Op rows whose values do not decode, copied into the failed list
    /// (quarantined) with the reason, so nothing readable is dropped.
    #[serde(default)]
    pub ops_quarantined: u64,
    /// Ranges of positions (`seq`, inclusive) that could not be read at all,
    /// by SQLite or by the page scan; they may have held ops (or been
    /// empty). Empty when the scan was clean.
    pub unreadable_seq_ranges: Vec<(i64, i64)>,
    /// True if SQLite could not read the `ops` table at all (its rows may
    /// still have been found by the scan, see `ops_found_by_scan`).
    pub ops_table_lost: bool,
    /// Op rows copied from the file's pages without SQLite (see
    /// `outbox::scan`): rows SQLite could not reach (a damaged schema or
    /// b-tree page) or did not read (WAL commits after a damaged frame).
    /// Included in `ops_saved` and `ops_quarantined`.
    #[serde(default)]
    pub ops_found_by_scan: u64,
    /// Ops SQLite showed that the scan proves deleted by a later commit
    /// SQLite did not read (an acknowledged op), not copied.
    #[serde(default)]
    pub ops_deleted_later: u64,
    /// Meta entries copied (realtime cursor, settings).
    pub meta_saved: u64,
    /// Transaction outcomes copied.
    pub outcomes_saved: u64,
    /// True if the lock row was copied (its epoch keeps increasing).
    pub lock_saved: bool,
    /// Errors met on the way (first few).
    pub notes: Vec<String>,
    /// The first write to the fresh file that failed for a reason of the
    /// disk, not of the row (full, read-only, I/O): the salvage is then
    /// incomplete and is undone (see [`SalvageReport::write_failure`]).
    #[serde(skip)]
    write_failed: Option<String>,
}

impl SalvageReport {
    /// Why the salvage could not write what it read, if it could not.
    pub(crate) fn write_failure(&self) -> Option<&str> {
        self.write_failed.as_deref()
    }
}

/// Notes a failed write to the fresh file; one the disk made fail (not
/// the row's values) marks the whole salvage as failed.
fn write_error(report: &mut SalvageReport, what: &str, e: &rusqlite::Error) {
    use rusqlite::ErrorCode as C;
    let disk = super::error::is_busy(e)
        || matches!(
            e.sqlite_error_code(),
            Some(
                C::DiskFull
                    | C::SystemIoFailure
                    | C::ReadOnly
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::PermissionDenied
            )
        );
    if disk && report.write_failed.is_none() {
        report.write_failed = Some(format!("{what}: {e}"));
    }
    note(report, format!("{what}: {e}"));
}

/// Result of [`Outbox::check`](super::Outbox::check) and
/// [`OutboxReader::check`](super::OutboxReader::check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// True if the file passes `PRAGMA integrity_check` now and every op
    /// row that cannot be used is in the failed list (quarantined).
    pub ok: bool,
    /// What the first integrity check reported (empty if it said "ok").
    pub problems: Vec<String>,
    /// True if indexes were rebuilt because of those problems.
    pub reindexed: bool,
    /// What remains after the rebuild (empty if it is now ok).
    pub remaining: Vec<String>,
    /// Op rows that cannot be decoded or do not match their checksum
    /// (state `failed` once quarantined).
    #[serde(default)]
    pub unreadable_ops: Vec<UnreadableOp>,
}

impl CheckReport {
    pub(crate) fn new(
        problems: Vec<String>,
        reindexed: bool,
        remaining: Vec<String>,
        unreadable_ops: Vec<UnreadableOp>,
    ) -> Self {
        let structure_ok = if reindexed {
            remaining.is_empty()
        } else {
            problems.is_empty()
        };
        Self {
            ok: structure_ok && unreadable_ops.iter().all(|u| u.state == "failed"),
            problems,
            reindexed,
            remaining,
            unreadable_ops,
        }
    }

    /// True if SQLite's integrity check passes now (whatever the rows hold).
    pub fn structure_ok(&self) -> bool {
        if self.reindexed {
            self.remaining.is_empty()
        } else {
            self.problems.is_empty()
        }
    }
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
pub(crate) fn integrity_findings(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    match integrity(conn) {
        Err(e) if super::error::is_corrupt(&e) => {
            Ok(vec![format!("the integrity check stopped: {e}")])
        }
        other => other,
    }
}

/// Prepares a read of every column of every table an outbox of schema
/// `version` has: a garbled `CREATE` statement in `sqlite_master` (a
/// column name, a table name) passes SQLite's integrity check but fails
/// every later read of that column.
pub(crate) fn schema_probe(conn: &Connection, version: u32) -> rusqlite::Result<()> {
    let ops = format!(
        "{}, is_head{}{}",
        op_select_columns(version),
        if version >= 4 { ", checksum" } else { "" },
        if version >= 6 { ", foreign_id" } else { "" }
    );
    let mut tables: Vec<(&str, &str)> = vec![
        ("ops", &ops),
        ("meta", "key, value"),
        ("lock", "id, owner, epoch, heartbeat, beat_at"),
        (
            "txn_outcomes",
            "id, token, active, state, error, at, delivered",
        ),
    ];
    if version >= 2 {
        tables.push(("op_envelopes", "version"));
    }
    if version >= 3 {
        tables.push(("ops_seq_mark", "id, deleted_max, bound"));
    }
    for (table, cols) in tables {
        conn.prepare(&format!("SELECT {cols} FROM {table} LIMIT 0"))?;
    }
    Ok(())
}

/// [`schema_probe`]'s failure as a finding of a check.
pub(crate) fn schema_findings(conn: &Connection, version: u32) -> Vec<String> {
    match schema_probe(conn, version) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("the schema is not an outbox's: {e}")],
    }
}

/// Full integrity check; rebuilds indexes if it finds problems, then
/// quarantines every active op row that cannot be used (see
/// [`rows::quarantine`]).
pub(crate) fn check(conn: &Connection, now: i64) -> rusqlite::Result<CheckReport> {
    let version = super::schema::SCHEMA_VERSION;
    let mut problems = integrity_findings(conn)?;
    problems.extend(schema_findings(conn, version));
    if problems.is_empty() {
        let refiled = super::op_ids::refile_misplaced(conn)?;
        if refiled > 0 {
            tracing::warn!(
                count = refiled,
                "outbox ops whose id does not name their position were re-indexed by id"
            );
        }
        let unreadable = quarantine_unreadable(conn, now)?;
        return Ok(CheckReport::new(problems, false, Vec::new(), unreadable));
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
        Ok(()) => {
            let mut left = integrity_findings(conn)?;
            left.extend(schema_findings(conn, version));
            left
        }
    };
    let unreadable = if remaining.is_empty() {
        quarantine_unreadable(conn, now)?
    } else {
        Vec::new()
    };
    Ok(CheckReport::new(problems, true, remaining, unreadable))
}

/// Quarantines every unusable op row not yet in the failed list; returns
/// all unusable rows as they are now.
fn quarantine_unreadable(conn: &Connection, now: i64) -> rusqlite::Result<Vec<UnreadableOp>> {
    let mut found = match rows::unreadable(conn, super::schema::Seal::Full) {
        Err(e) if super::error::is_corrupt(&e) => return Ok(Vec::new()),
        other => other?,
    };
    for u in &mut found {
        if u.state != "failed" {
            let reason = format!("quarantined: {}", u.reason);
            rows::quarantine(conn, now, u.seq, &reason)?;
            u.state = "failed".into();
        }
    }
    Ok(found)
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
    if let Some(what) = bad_fixed_fields(&header) {
        return Ok(Some(format!("damaged database header: {what}")));
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

/// Header fields that have one valid value (or a few) in every outbox;
/// SQLite refuses the whole file when one is off.
fn bad_fixed_fields(h: &[u8; 100]) -> Option<&'static str> {
    if !matches!(h[18], 1 | 2) || !matches!(h[19], 1 | 2) {
        return Some("file format version bytes");
    }
    if h[21..24] != [64, 32, 32] {
        return Some("payload fraction bytes");
    }
    // 0 in both: a database whose first commit is still in the WAL.
    if u32::from_be_bytes([h[44], h[45], h[46], h[47]]) > 4 {
        return Some("schema format number");
    }
    if u32::from_be_bytes([h[56], h[57], h[58], h[59]]) > 3 {
        return Some("text encoding");
    }
    None
}

/// Writes valid values into the fields of a copy's header that SQLite
/// checks before reading anything, keeping the ones it can still use; an
/// invalid page size becomes SQLite's default, the outbox's.
fn repair_header(h: &mut [u8; 100]) {
    h[..16].copy_from_slice(b"SQLite format 3\0");
    let raw_page = u32::from(u16::from_be_bytes([h[16], h[17]]));
    let page = if raw_page == 1 { 65_536 } else { raw_page };
    if !(512..=65_536).contains(&page) || !page.is_power_of_two() {
        h[16..18].copy_from_slice(&4096u16.to_be_bytes());
    }
    for i in [18, 19] {
        if !matches!(h[i], 1 | 2) {
            h[i] = 2;
        }
    }
    h[20] = 0;
    h[21..24].copy_from_slice(&[64, 32, 32]);
    if u32::from_be_bytes([h[44], h[45], h[46], h[47]]) > 4 {
        h[44..48].copy_from_slice(&4u32.to_be_bytes());
    }
    if u32::from_be_bytes([h[56], h[57], h[58], h[59]]) > 3 {
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
    }
}

/// The first 100 bytes of a file (the database header), or fewer.
fn file_head(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(100).read_to_end(&mut head);
    }
    head
}

/// Looks for a damaged WAL frame followed by commits (see
/// `scan::wal_break`) while holding the database's write lock, so the WAL
/// is read between writes. The probe connection does not checkpoint on
/// close: a checkpoint would copy only the frames before the damage into
/// the file and then drop the WAL with the commits after it. `Ok(None)` if
/// there is no WAL, no break, or the file cannot be had (the open that
/// follows reports that). Busy past `busy_timeout` (another connection
/// holds the write lock) is an error: the open would only wait for the
/// same lock again.
pub(crate) fn wal_break_locked(
    path: &Path,
    busy_timeout: std::time::Duration,
) -> rusqlite::Result<Option<String>> {
    let wal = with_suffix(path, "-wal");
    if !std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Ok(None);
    }
    let probe = || -> Option<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ok()?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .ok()?;
        conn.busy_timeout(busy_timeout).ok()?;
        Some(conn)
    };
    let Some(conn) = probe() else {
        return Ok(None);
    };
    match conn.execute_batch("BEGIN IMMEDIATE") {
        Ok(()) => {}
        Err(e) if super::error::is_busy(&e) => return Err(e),
        Err(_) => return Ok(None),
    }
    let page_size = scan::db_page_size(&file_head(path));
    let found = std::fs::read(&wal)
        .ok()
        .and_then(|bytes| scan::wal_break(&bytes, page_size));
    let _ = conn.execute_batch("ROLLBACK");
    Ok(found)
}

/// [`wal_break_locked`] for a reader, which cannot take the write lock
/// and writes nothing: the WAL is read as it is. A write in progress
/// cannot pass for damage (its frames end the checksum chain like a torn
/// tail), so this only reports; the repair looks again under the lock.
pub(crate) fn wal_break_unlocked(path: &Path) -> Option<String> {
    let resolved = std::fs::canonicalize(path).ok()?;
    let bytes = std::fs::read(with_suffix(&resolved, "-wal")).ok()?;
    scan::wal_break(&bytes, scan::db_page_size(&file_head(&resolved)))
}

/// Removes a working copy and its side files when dropped, whatever path
/// salvage leaves by: no temporary file survives it.
struct WorkCopy(PathBuf);

impl Drop for WorkCopy {
    fn drop(&mut self) {
        remove_with_side_files(&self.0);
    }
}

/// Removes a database file of the salvage's own and its side files, the
/// side files first; what cannot be removed stays.
fn remove_with_side_files(file: &Path) {
    for ext in ["-wal", "-shm", "-journal", ""] {
        let _ = std::fs::remove_file(with_suffix(file, ext));
    }
}

/// A copy of the moved file (and its WAL) to read from, so the moved file
/// stays exactly as it was: its header repaired (see [`repair_header`]),
/// and, if it is shorter than its header's page count and has no WAL,
/// extended with zero pages to that size, so unreadable pages fail one by
/// one instead of the whole file being refused.
fn work_copy(aside: &Path) -> std::io::Result<WorkCopy> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let copy = WorkCopy(with_suffix(aside, WORK_COPY));
    drop(WorkCopy(copy.0.clone()));
    std::fs::copy(aside, &copy.0)?;
    let wal = with_suffix(aside, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, with_suffix(&copy.0, "-wal"))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy.0)?;
    let len = file.metadata()?.len();
    let mut header = [0u8; 100];
    if len < 100 || file.read_exact(&mut header).is_err() {
        return Ok(copy);
    }
    repair_header(&mut header);
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    let raw_page = u32::from(u16::from_be_bytes([header[16], header[17]]));
    let page_size = u64::from(if raw_page == 1 { 65_536 } else { raw_page });
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    let expected = pages.saturating_mul(page_size);
    // A damaged page count may claim anything: pad only up to twice the file.
    if pages > 0 && len < expected && expected <= len.saturating_mul(2) && !wal.exists() {
        file.set_len(expected)?;
    }
    Ok(copy)
}

/// `<path><suffix>` as a path.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A name beside `path` to move the damaged file to, `<name>.corrupt-<ms>`,
/// with `-<n>` added while that is taken: a rename would replace a file
/// an earlier salvage moved in the same millisecond (or under a fixed
/// clock).
pub(crate) fn aside_path(path: &Path, now_ms: i64) -> PathBuf {
    let taken = |p: &Path| {
        ["", WORK_COPY, FILLING].iter().any(|base| {
            ["", "-wal", "-shm", "-journal"].iter().any(|ext| {
                std::fs::symlink_metadata(with_suffix(p, &format!("{base}{ext}"))).is_ok()
            })
        })
    };
    let first = with_suffix(path, &format!(".corrupt-{now_ms}"));
    let mut aside = first.clone();
    let mut n = 1u32;
    while taken(&aside) {
        aside = with_suffix(&first, &format!("-{n}"));
        n += 1;
    }
    aside
}

/// What a salvage's fresh file is named after the moved file while it is
/// filled (see [`filling_path`]).
const FILLING: &str = ".fresh";

/// What a salvage's working copy is named after the moved file (see
/// [`work_copy`]).
const WORK_COPY: &str = ".salvage";

/// Where a salvage fills its fresh file, `<aside>.fresh`, before linking
/// it into the outbox's place whole. Named after the moved file (a name
/// no other salvage uses), so it is the salvage's own, as its working copy
/// `<aside>.salvage` is.
pub(crate) fn filling_path(aside: &Path) -> PathBuf {
    with_suffix(aside, FILLING)
}

/// Removes the files a salvage names after the moved file: its working
/// copy, and the fresh file it created (inode `fresh`) if that was not
/// moved into place, each with its side files. A file at the fresh file's
/// name with another inode is someone else's: left alone, with its side
/// files. With no inode recorded (killed between creating the file and
/// recording it), only an empty private file there is taken for the
/// salvage's.
pub(crate) fn remove_salvage_files(aside: &Path, fresh: Option<u64>) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    remove_with_side_files(&with_suffix(aside, WORK_COPY));
    let filling = filling_path(aside);
    match (fresh, std::fs::symlink_metadata(&filling)) {
        (Some(ino), Ok(m)) if m.ino() == ino => remove_with_side_files(&filling),
        (Some(_), Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            remove_with_side_files(&filling);
        }
        (None, Ok(m))
            if m.is_file() && m.len() == 0 && m.permissions().mode() & 0o7777 == 0o600 =>
        {
            let _ = std::fs::remove_file(&filling);
        }
        _ => {}
    }
}

/// Moves the damaged file (and its WAL and shared-memory files) to
/// `aside`: the side files first, so a main file found at `aside` after a
/// kill means every file at `path` came later (see `salvage_mark`).
pub(crate) fn move_aside(path: &Path, aside: &Path) -> std::io::Result<()> {
    for ext in ["-wal", "-shm"] {
        let from = with_suffix(path, ext);
        if from.exists() {
            // Keep the WAL beside the moved file under SQLite's naming, so
            // opening the moved file reads its last commits too.
            std::fs::rename(&from, with_suffix(aside, ext))?;
        }
    }
    std::fs::rename(path, aside)
}

/// Undoes [`move_aside`] after a salvage that could not finish: removes
/// the fresh file the salvage created at `path` (and its side files), then
/// puts the damaged file back, then its WAL and shared-memory files (see
/// [`put_back_one`]). The main file goes first: while it is still aside,
/// every file at `path` is the salvage's (`salvage_mark::put_back`).
pub(crate) fn move_back(path: &Path, aside: &Path) -> std::io::Result<()> {
    for ext in ["-wal", "-shm", "-journal", ""] {
        match std::fs::remove_file(with_suffix(path, ext)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    for ext in ["", "-wal", "-shm"] {
        let from = with_suffix(aside, ext);
        if ext.is_empty() || from.exists() {
            put_back_one(&from, &with_suffix(path, ext))?;
        }
    }
    Ok(())
}

/// True if both paths name one file.
pub(crate) fn same_inode(a: &Path, b: &Path) -> bool {
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => same_identity(&a, &b),
        _ => false,
    }
}

/// True if `path` still names the file `file` has open.
pub(crate) fn same_file(file: &std::fs::File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => same_identity(&a, &b),
        _ => false,
    }
}

fn same_identity(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Renames `from` to `to` in one step unless something is at `to`
/// (`AlreadyExists`): no moment with both names, which every open refuses
/// as a hard-linked outbox. `Ok(false)` where the system or file system
/// cannot (then nothing was done).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(std::io::Error::from_raw_os_error(e as i32)),
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (from, to);
        Ok(false)
    }
}

/// Moves `from` to `to` only where no file has appeared meanwhile, so
/// another process's file is never replaced: a rename that refuses to
/// replace ([`rename_noreplace`]), else a link and then the old name
/// removed. Where the file system has neither (vfat, some FUSE mounts), a
/// rename after checking `to` is free.
pub(crate) fn put_back_one(from: &Path, to: &Path) -> std::io::Result<()> {
    match rename_noreplace(from, to) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        // Linked by an earlier put-back killed before it removed `from`.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && same_inode(from, to) => {
            return std::fs::remove_file(from)
        }
        Err(e) => return Err(e),
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        // Linked by an earlier put-back killed before it removed `from`.
        Err(_) if same_inode(from, to) => std::fs::remove_file(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(e) if std::fs::symlink_metadata(to).is_ok() => Err(e),
        Err(_) => std::fs::rename(from, to),
    }
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
    "txn",
    "depends_on",
];

/// The columns of [`OP_COPY_COLUMNS`] that schema 5 added, read as NULL
/// from an older file.
const OP_COLUMNS_SINCE_V5: [&str; 2] = ["txn", "depends_on"];

/// [`OP_COPY_COLUMNS`] as a select list for a file of schema `version`.
fn op_select_columns(version: u32) -> String {
    OP_COPY_COLUMNS
        .iter()
        .map(|c| {
            if version < 5 && OP_COLUMNS_SINCE_V5.contains(c) {
                "NULL"
            } else {
                c
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stored value as an owned one; text that is not UTF-8 is kept, as a
/// blob (rusqlite's own conversion panics on it).
fn owned(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(f) => SqlValue::Real(f),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => SqlValue::Text(s.to_owned()),
            Err(_) => SqlValue::Blob(t.to_vec()),
        },
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

/// Rejects rows whose values cannot be a valid op: they are copied into
/// the failed list instead of the queue.
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
        && (matches!(v[21], SqlValue::Null)
            || text(21).is_some_and(|s| serde_json::from_str::<crate::op::TxnRef>(s).is_ok()))
        && (matches!(v[22], SqlValue::Null)
            || text(22).is_some_and(|s| serde_json::from_str::<Vec<Uuid>>(s).is_ok()))
}

/// The statement that copies one op row: the values of
/// [`OP_COPY_COLUMNS`] and the seal the source file's schema wrote (`from`),
/// brought to this schema's if it is an older seal that still matches,
/// computed from the row if the source had none.
fn op_insert(from: Seal) -> String {
    let cols = OP_COPY_COLUMNS.join(", ");
    let placeholders = vec!["?"; OP_COPY_COLUMNS.len()].join(", ");
    let stored = format!("?{}", OP_COPY_COLUMNS.len() + 1);
    let seal = match from {
        Seal::Full => stored,
        Seal::Content => super::schema::upgrade_seal(&stored),
        // `stored` is the select's NULL: bound, so referenced.
        Seal::None => format!(
            "coalesce({stored}, op_checksum(?2, ?3, ?4, ?5, ?6, ?7, ?8, ?22, ?23, ?9, nullif(?10, 0)))"
        ),
    };
    format!("INSERT OR IGNORE INTO ops ({cols}, checksum) VALUES ({placeholders}, {seal})")
}

/// The reason written on an op row that salvage quarantines.
const QUARANTINE_REASON: &str =
    "quarantined: damaged row found by salvage (its values do not make an op)";

/// The reason written on an op row found in a damaged WAL frame of a file
/// without seals.
const UNVERIFIED_REASON: &str =
    "quarantined: row found by salvage in a damaged WAL frame, with no seal to check it";

/// Files larger than this are not read whole by the scan (it holds the
/// file and its WAL in memory); salvage then relies on SQLite alone.
const SCAN_MAX_BYTES: u64 = 1 << 30;

fn read_for_scan(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
        Ok(m) if m.len() > SCAN_MAX_BYTES => Err(std::io::Error::other(format!(
            "{} bytes, over the scan's limit",
            m.len()
        ))),
        Ok(_) => std::fs::read(path).map(Some),
    }
}

/// When SQLite could not read every op row, or the WAL holds commits it
/// ignores, copies the op rows the scan finds in the moved file's pages
/// and WAL frames (see `outbox::scan`) that SQLite did not copy, and replaces a
/// copied row by a newer version SQLite did not read (a WAL commit after a
/// damaged frame). When the WAL had such commits and the scan saw every
/// page's newest image intact, an op SQLite showed but the scan does not
/// find was deleted by one of them (acknowledged): it is removed. Returns
/// the largest position seen (rows and the position marks). The lock row
/// is taken from the scan if SQLite could not read it.
fn copy_scanned(aside: &Path, new: &Connection, report: &mut SalvageReport) -> i64 {
    let sql_complete = !report.ops_table_lost && report.unreadable_seq_ranges.is_empty();
    let wal = match read_for_scan(&with_suffix(aside, "-wal")) {
        Ok(wal) => wal,
        Err(e) => {
            note(report, format!("the page scan was skipped: {e}"));
            return 0;
        }
    };
    // When SQLite read every op row and every commit, the scan has nothing
    // to add: skip it (and its memory).
    let page_size = scan::db_page_size(&file_head(aside));
    let wal_broken = wal
        .as_deref()
        .is_some_and(|w| scan::wal_break(w, page_size).is_some());
    if sql_complete && !wal_broken {
        return 0;
    }
    let db = match read_for_scan(aside) {
        Ok(Some(db)) => db,
        Ok(None) => return 0,
        Err(e) => {
            note(report, format!("the page scan was skipped: {e}"));
            return 0;
        }
    };
    let found = scan::scan(&db, wal.as_deref());
    drop(db);
    drop(wal);
    note(
        report,
        format!(
            "page scan: {} table leaf pages, {} op rows, {} cells that did not decode",
            found.leaf_pages,
            found.rows.len(),
            found.bad_cells
        ),
    );
    // Rows the scan found carry the seal their file's schema wrote, or one
    // it computed in this schema's form. A file whose version cannot be
    // read gets no upgrade: an old seal then flags its row, never blesses it.
    let from = match file_head(aside).get(60..64) {
        Some(&[a, b, c, d]) if (4..=6).contains(&u32::from_be_bytes([a, b, c, d])) => Seal::Content,
        _ => Seal::Full,
    };
    let insert = op_insert(from);
    let mut ids = std::collections::HashSet::new();
    for row in found.rows {
        let op_id = row.values[1].clone();
        ids.insert(id_key(&op_id));
        let seq = match row.values[0] {
            SqlValue::Integer(s) => s,
            _ => 0,
        };
        let present = new
            .query_row(
                "SELECT 1 FROM ops WHERE op_id = ?1 AND foreign_id = 1",
                [&op_id],
                |_| Ok(()),
            )
            .is_ok();
        if present {
            if !row.past_break {
                continue;
            }
            // A newer version replaces the copy only if it is whole: a
            // damaged frame can hold a row of valid shape whose sealed
            // bytes changed, and the copy SQLite read is intact.
            if row.unverified
                || !op_row_valid(&row.values[..OP_COPY_COLUMNS.len()])
                || !seal_intact(&row.values, from)
            {
                note(
                    report,
                    format!("op {seq}: its newer version past the WAL break is damaged; the older copy is kept"),
                );
                continue;
            }
            if let Err(e) = new.execute(
                "DELETE FROM ops WHERE op_id = ?1 AND foreign_id = 1",
                [&op_id],
            ) {
                write_error(report, &format!("op {seq}: newer version not copied"), &e);
                continue;
            }
        }
        report.ops_found_by_scan += u64::from(!present);
        // Nothing vouches for a row of a damaged frame without its own
        // seal: it is kept, but in the failed list, never sent as it is.
        let quarantine = row.unverified.then_some(UNVERIFIED_REASON);
        copy_row(new, &insert, seq, Some(row.values), quarantine, report);
    }
    if let (false, Some(lock)) = (report.lock_saved, found.lock) {
        let copied = new.execute(
            "INSERT OR IGNORE INTO lock (id, owner, epoch, heartbeat, beat_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params_from_iter(lock),
        );
        report.lock_saved = matches!(copied, Ok(1));
    }
    if found.wal_break.is_some() && found.complete && sql_complete {
        remove_deleted_later(new, &ids, report);
    }
    drop_recovered(new, report);
    recount(new, report);
    found.max_rowid.max(found.seq_mark)
}

/// True if a found row's sealed fields match the seal it carries, which
/// is of the form `from` (see [`copy_scanned`]), or of this schema's form:
/// a file migrated to it in its WAL still has the older version in its
/// header.
fn seal_intact(values: &[SqlValue], from: Seal) -> bool {
    let refs: Vec<ValueRef<'_>> = values.iter().map(ValueRef::from).collect();
    rows::values_match_seal(&refs, from)
        || (from != Seal::Full && rows::values_match_seal(&refs, Seal::Full))
}

/// An op id as a set key (a damaged one may not be text).
fn id_key(v: &SqlValue) -> String {
    match v {
        SqlValue::Text(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// Removes the copied ops whose op id is not in `ids` (see [`copy_scanned`]).
fn remove_deleted_later(
    new: &Connection,
    ids: &std::collections::HashSet<String>,
    report: &mut SalvageReport,
) {
    let copied: Vec<(i64, SqlValue)> =
        match new.prepare("SELECT seq, op_id FROM ops").and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get_ref(1).map(owned)?)))?
                .collect()
        }) {
            Ok(v) => v,
            Err(e) => {
                note(report, format!("listing the copied ops failed: {e}"));
                return;
            }
        };
    for (seq, id) in copied {
        if ids.contains(&id_key(&id)) {
            continue;
        }
        match new.execute("DELETE FROM ops WHERE seq = ?1", [seq]) {
            Ok(_) => report.ops_deleted_later += 1,
            Err(e) => note(report, format!("op {seq}: deleted later, not removed: {e}")),
        }
    }
}

/// Takes the positions whose ops the scan found out of
/// `unreadable_seq_ranges`, which then name only what may be lost.
fn drop_recovered(new: &Connection, report: &mut SalvageReport) {
    let mut left = Vec::new();
    for &(first, last) in &report.unreadable_seq_ranges {
        let found: rusqlite::Result<Vec<i64>> = new
            .prepare_cached("SELECT seq FROM ops WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")
            .and_then(|mut s| s.query_map([first, last], |r| r.get(0))?.collect());
        let Ok(found) = found else {
            left.push((first, last));
            continue;
        };
        let mut from = first;
        for seq in found {
            if seq > from {
                left.push((from, seq - 1));
            }
            from = seq.saturating_add(1);
        }
        if from <= last {
            left.push((from, last));
        }
    }
    report.unreadable_seq_ranges = left;
}

/// Counts the copied ops again after the scan replaced or removed some.
fn recount(new: &Connection, report: &mut SalvageReport) {
    let counts = new.query_row(
        "SELECT count(*), count(*) FILTER (WHERE last_error IS ?1) FROM ops",
        [QUARANTINE_REASON],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    );
    if let Ok((all, quarantined)) = counts {
        report.ops_quarantined = u64::try_from(quarantined).unwrap_or(0);
        report.ops_saved = u64::try_from(all - quarantined).unwrap_or(0);
    }
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
    let version: u32 = old
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap_or(0);
    let seal_version = version;
    // A file whose version is unreadable may still have the new columns.
    let version = if version < 5
        && old
            .prepare("SELECT txn, depends_on FROM ops LIMIT 0")
            .is_ok()
    {
        5
    } else {
        version
    };
    let cols = op_select_columns(version);
    // A row keeps its stored seal (a row altered on disk stays detectable
    // and is quarantined before it is sent); rows of files older than the
    // seals get one computed from what they hold.
    let sealed = old.prepare("SELECT checksum FROM ops LIMIT 0").is_ok();
    // Upgraded only from a version known to write the older seal: an old
    // seal then flags its row, never blesses a damaged one.
    let from = match (sealed, Seal::of(seal_version)) {
        (false, _) => Seal::None,
        (true, Seal::Content) => Seal::Content,
        (true, _) => Seal::Full,
    };
    let seal = if sealed { "checksum" } else { "NULL" };
    let select = format!("SELECT {cols}, {seal} FROM ops WHERE seq >= ?1 ORDER BY seq");
    let insert = op_insert(from);
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
                let values: Result<Vec<SqlValue>, _> = (0..=OP_COPY_COLUMNS.len())
                    .map(|i| row.get_ref(i).map(owned))
                    .collect();
                let seq = match values.as_ref().ok().and_then(|v| v.first()) {
                    Some(SqlValue::Integer(s)) => *s,
                    _ => pos,
                };
                end.first_read.get_or_insert(seq);
                copy_row(new, insert, seq, values.ok(), None, report);
                pos = seq.saturating_add(1);
            }
            Err(e) => {
                end.result = Err((pos, e.to_string()));
                return end;
            }
        }
    }
}

/// Copies one op row: into the queue if its values make an op, else into
/// the failed list with the reason (quarantine); counted as unreadable only
/// if even that fails.
fn copy_row(
    new: &Connection,
    insert: &str,
    seq: i64,
    values: Option<Vec<SqlValue>>,
    quarantine: Option<&str>,
    report: &mut SalvageReport,
) {
    let Some(mut v) = values else {
        report.ops_unreadable += 1;
        return;
    };
    let reason = match quarantine {
        Some(reason) => Some(reason),
        None => (!op_row_valid(&v[..OP_COPY_COLUMNS.len()])).then_some(QUARANTINE_REASON),
    };
    let valid = reason.is_none();
    if let Some(reason) = reason {
        v[12] = SqlValue::Text("failed".into());
        v[15] = SqlValue::Text(reason.into());
    }
    match new.execute(insert, rusqlite::params_from_iter(v)) {
        Ok(1) if valid => report.ops_saved += 1,
        Ok(1) => report.ops_quarantined += 1,
        Ok(_) => {
            report.ops_unreadable += 1;
            note(
                report,
                format!("op {seq} not copied: its op id is already copied"),
            );
        }
        Err(e) => {
            report.ops_unreadable += 1;
            write_error(report, &format!("op {seq} not copied"), &e);
        }
    }
}

fn note(report: &mut SalvageReport, msg: String) {
    if report.notes.len() < 20 {
        report.notes.push(msg);
    }
}

/// None of the small tables holds blobs (a blob here is text that is not
/// UTF-8), and the lock row's counters are integers: a row that breaks
/// this would fail every open of the fresh file.
fn small_row_valid(table: &str, v: &[SqlValue]) -> bool {
    let no_blob = v.iter().all(|x| !matches!(x, SqlValue::Blob(_)));
    let ints = |ix: &[usize]| ix.iter().all(|&i| matches!(v[i], SqlValue::Integer(_)));
    no_blob
        && match table {
            "lock" => ints(&[0, 2, 3, 4]) && matches!(v[1], SqlValue::Text(_)),
            "txn_outcomes" => ints(&[0, 2, 5, 6]),
            _ => true,
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
                        (0..n).map(|i| row.get_ref(i).map(owned)).collect();
                    let Ok(values) = values else { continue };
                    if !small_row_valid(table, &values) {
                        note(report, format!("a damaged {table} row was not copied"));
                        continue;
                    }
                    match new.execute(&insert, rusqlite::params_from_iter(values)) {
                        Ok(_) => match table {
                            "meta" => report.meta_saved += 1,
                            "lock" => report.lock_saved = true,
                            _ => report.outcomes_saved += 1,
                        },
                        Err(e) => write_error(report, &format!("a {table} row not copied"), &e),
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

/// The wall clock in Unix ms, for the rows a salvage changes.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Moves the damaged file aside and copies what can be read into `fresh`
/// (an already migrated, empty outbox at the original path).
pub(crate) fn salvage_into(aside: &Path, fresh: &Connection, reason: String) -> SalvageReport {
    let mut report = SalvageReport {
        reason,
        moved_to: aside.to_path_buf(),
        ops_saved: 0,
        ops_unreadable: 0,
        ops_quarantined: 0,
        unreadable_seq_ranges: Vec::new(),
        ops_table_lost: false,
        ops_found_by_scan: 0,
        ops_deleted_later: 0,
        meta_saved: 0,
        outcomes_saved: 0,
        lock_saved: false,
        notes: Vec::new(),
        write_failed: None,
    };
    // Read from a working copy: the moved file stays exactly as it was,
    // and the copy's header can be repaired (see `work_copy`).
    let copy = match work_copy(aside) {
        Ok(c) => c,
        Err(e) => {
            // Without room for the copy nothing can be read: not a loss of
            // the file's ops, a salvage that cannot run here.
            report.write_failed = Some(format!("cannot copy the moved file: {e}"));
            return report;
        }
    };
    let old = Connection::open_with_flags(&copy.0, OpenFlags::SQLITE_OPEN_READ_WRITE);
    match &old {
        Ok(old) => {
            copy_ops(old, fresh, &mut report);
            copy_small(old, fresh, &mut report);
        }
        Err(e) => {
            report.ops_table_lost = true;
            note(&mut report, format!("moved file cannot be opened: {e}"));
        }
    }
    // Then what SQLite could not reach or did not read.
    let scanned_max = copy_scanned(aside, fresh, &mut report);
    // No position is reused: every one the old file may have used is
    // marked as taken (its bound is above all of them).
    let taken: i64 = [
        "SELECT bound FROM ops_seq_mark WHERE id = 1",
        "SELECT deleted_max FROM ops_seq_mark WHERE id = 1",
        "SELECT seq FROM sqlite_sequence WHERE name = 'ops'",
    ]
    .iter()
    .filter_map(|q| {
        old.as_ref()
            .ok()?
            .query_row(q, [], |r| r.get::<_, i64>(0))
            .ok()
    })
    .chain(report.unreadable_seq_ranges.iter().map(|r| r.1))
    .chain([scanned_max])
    .max()
    .unwrap_or(0);
    drop(old);
    drop(copy);
    if let Err(e) = fresh.execute(
        "UPDATE ops_seq_mark SET deleted_max = max(deleted_max, ?1) WHERE id = 1",
        [taken],
    ) {
        write_error(&mut report, "marking old positions failed", &e);
    }
    // The runner that held the old file is gone from this one: the lock is
    // free (its epoch is kept, so fences keep increasing).
    if let Err(e) = fresh.execute("UPDATE lock SET owner = '' WHERE id = 1", []) {
        write_error(&mut report, "freeing the lock failed", &e);
    }
    if report.ops_saved + report.ops_quarantined > 0 {
        // Heads and in-flight state are rebuilt from scratch below.
        let fix = fresh.execute_batch(
            "UPDATE ops SET state = 'pending' WHERE state = 'in_flight';
             UPDATE ops SET is_head = 0;
             UPDATE ops SET is_head = 1 WHERE seq IN (SELECT min(seq) FROM ops
                 WHERE state = 'pending' GROUP BY entity_type, entity_id)
                 AND txn IS NULL AND depends_on IS NULL;
             INSERT OR IGNORE INTO op_envelopes (version)
                 SELECT DISTINCT envelope_version FROM ops;",
        );
        if let Err(e) = fix {
            write_error(&mut report, "rebuilding heads failed", &e);
        }
        // Gated ops get their heads from the gate, which also fails a
        // transaction that lost ops: it is never sent in part.
        if let Err(e) = super::gate::refresh(fresh, wall_ms()) {
            write_error(&mut report, "rebuilding transaction gates failed", &e);
        }
    }
    report
}
