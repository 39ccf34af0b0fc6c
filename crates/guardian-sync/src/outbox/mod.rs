//! The durable outbox: a SQLite-backed queue of ops that survives crashes.
//!
//! One dedicated writer thread owns the connection and commits everything
//! queued at once (group commit); every method is async and returns only
//! after its transaction committed, so an op is durable when
//! [`Outbox::enqueue`] returns. See `docs/design/outbox.md` for the on-disk
//! schema, durability assumptions, the ready index and the coalescing rules.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use guardian_sync::op::NewOp;
//! use guardian_sync::outbox::{Outbox, OutboxOptions};
//! use serde_json::json;
//!
//! let (outbox, _report) = Outbox::open("app-outbox.db", OutboxOptions::default()).await?;
//! let done = outbox
//!     .enqueue(NewOp::update("device", "d1", json!({"on": true})).with_base_version(3))
//!     .await?;
//! println!("queued {} (key {})", done.op_id, done.idempotency_key);
//! # Ok(()) }
//! ```

mod app;
mod damage;
mod enqueue;
mod error;
mod fenced;
mod gate;
mod ident;
mod lock_row;
mod op_ids;
mod outcomes;
mod reader;
mod rows;
mod runner;
mod salvage_mark;
mod scan;
mod schema;
mod upcast;
mod writer;
mod writers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use app::{ListFilter, NextDue, Stats};
pub use damage::{CheckReport, SalvageReport};
pub use enqueue::{Coalesced, Enqueued, EnqueuedTransaction, RemovedOp, MAX_TRANSACTION_OPS};
pub use error::{EnqueueError, OpenError, OutboxError, StorageError, UnknownChange};
pub use fenced::Fenced;
pub use lock_row::LockRow;
pub use outcomes::OutcomeRecord;
pub use reader::OutboxReader;
pub use rows::UnreadableOp;
pub use runner::ClaimShape;
pub use upcast::{UpcastFn, Upcasters};

use crate::clock::{SharedClock, SystemClock};
use crate::op::{Fence, NewOp, OpId, PendingOp, TxnOutcome};
use guardian_sqlite::wal_prefill::WalPrefill;
#[cfg(test)]
pub(crate) use writer::HeldCommit;
pub(crate) use writer::Ticket;
use writer::{Ctx, Unheard, Writer};

/// The newest on-disk schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

/// SQLite's `synchronous` setting: how hard a commit pushes to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Synchronous {
    /// fsync the WAL at every commit: a returned enqueue survives power loss.
    #[default]
    Full,
    /// In WAL mode, the last commits may be lost on power loss (not on a
    /// process crash). An explicit opt-in.
    Normal,
    /// No fsync at all; for tests and benchmarks only.
    Off,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
            Self::Off => "OFF",
        }
    }
}

/// How to open an outbox.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Durability of commits (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// How long to wait for another connection's write lock (default 5 s).
    pub busy_timeout: Duration,
    /// How long opening waits for another connection's write lock, at each
    /// step of the open that takes it (default: `busy_timeout`). The open
    /// outbox then waits `busy_timeout`: a caller with a short budget
    /// (`gsync run --once --max-wait`) is not held at the open for longer,
    /// yet its writes still wait out an app's ordinary commit.
    pub open_timeout: Option<Duration>,
    /// Largest accepted payload (and base), serialized (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Time source for stored timestamps.
    pub clock: SharedClock,
    /// Coalesce new ops into never-attempted ones at enqueue (default true).
    pub coalesce: bool,
    /// Zero-fill the WAL up to the size at which it wraps (about 5 MiB with
    /// SQLite's defaults) once it has grown past 256 KiB in a session, so
    /// later commits overwrite allocated blocks instead of growing the file
    /// (default true; ignored with [`Synchronous::Off`]). An append's fsync
    /// must also commit the new size to the filesystem journal, which made
    /// the first few hundred commits of every session about 1.5× slower on
    /// ext4. Turn it off only where 5 MiB of disk matters more than commit
    /// latency.
    pub preallocate_wal: bool,
    /// The app's current payload envelope version (default 1).
    pub envelope_version: u32,
    /// Migrations of queued payloads from older envelope versions.
    pub upcasters: Upcasters,
    /// Run the full `PRAGMA integrity_check` at open (default false: it is
    /// O(file size); open does a cheap probe instead).
    pub integrity_check_at_open: bool,
    /// Settled and delivered transaction outcomes older than this are
    /// forgotten at open (default 7 days).
    pub outcome_retention: Duration,
    /// Let a lone [`Outbox::enqueue`] commit on the calling task's worker
    /// thread, blocking it for that commit, instead of handing the op to
    /// the writer thread and waiting to be woken (default true). It applies
    /// only when nothing else is queued, on a multi-threaded tokio runtime
    /// with more than one worker, while lone commits average under 1 ms and
    /// no WAL fill is under way; turn it off where no executor thread may
    /// block on a disk at all.
    pub commit_on_caller: bool,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            open_timeout: None,
            max_payload_bytes: 1 << 20,
            clock: SystemClock::shared(),
            coalesce: true,
            preallocate_wal: true,
            envelope_version: 1,
            upcasters: Upcasters::default(),
            integrity_check_at_open: false,
            outcome_retention: Duration::from_secs(7 * 24 * 3600),
            commit_on_caller: true,
        }
    }
}

impl OutboxOptions {
    /// Sets the commit durability.
    #[must_use]
    pub fn synchronous(mut self, s: Synchronous) -> Self {
        self.synchronous = s;
        self
    }
    /// Sets the busy timeout.
    #[must_use]
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }
    /// Sets how long opening waits for a write lock (see
    /// [`OutboxOptions::open_timeout`]).
    #[must_use]
    pub fn open_timeout(mut self, d: Duration) -> Self {
        self.open_timeout = Some(d);
        self
    }
    /// How long each step of the open waits for a write lock.
    fn open_wait(&self) -> Duration {
        self.open_timeout.unwrap_or(self.busy_timeout)
    }
    /// Sets the payload size limit.
    #[must_use]
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }
    /// Sets the clock.
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
    /// Turns coalescing on or off.
    #[must_use]
    pub fn coalesce(mut self, on: bool) -> Self {
        self.coalesce = on;
        self
    }
    /// Turns WAL preallocation on or off (see [`OutboxOptions::preallocate_wal`]).
    #[must_use]
    pub fn preallocate_wal(mut self, on: bool) -> Self {
        self.preallocate_wal = on;
        self
    }
    /// Sets the app's current envelope version.
    #[must_use]
    pub fn envelope_version(mut self, v: u32) -> Self {
        self.envelope_version = v;
        self
    }
    /// Sets the upcasters.
    #[must_use]
    pub fn upcasters(mut self, u: Upcasters) -> Self {
        self.upcasters = u;
        self
    }
    /// Runs a full integrity check at open.
    #[must_use]
    pub fn integrity_check_at_open(mut self, on: bool) -> Self {
        self.integrity_check_at_open = on;
        self
    }
    /// Sets how long settled outcomes are kept.
    #[must_use]
    pub fn outcome_retention(mut self, d: Duration) -> Self {
        self.outcome_retention = d;
        self
    }
    /// Turns lone commits on the caller's thread on or off (see
    /// [`OutboxOptions::commit_on_caller`]).
    #[must_use]
    pub fn commit_on_caller(mut self, on: bool) -> Self {
        self.commit_on_caller = on;
        self
    }
}

/// What happened while opening.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReport {
    /// The file did not exist and was created.
    pub created: bool,
    /// The schema was migrated from this version.
    pub migrated_from: Option<u32>,
    /// In-flight ops of a dead runner put back to pending (only when the lock was free).
    pub requeued_in_flight: u64,
    /// Ops whose payloads were upcast to the current envelope version.
    pub upcast: u64,
    /// Ops whose upcast failed (moved to `failed`).
    pub upcast_failed: u64,
    /// Set if the file was damaged and salvaged.
    pub salvage: Option<SalvageReport>,
}

/// A handle to an open outbox. Cheap to clone; all clones share one writer thread.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: Writer,
    path: PathBuf,
    max_payload_bytes: usize,
    envelope_version: u32,
}

/// Why preparing a connection failed.
enum Prep {
    /// SQLite calls the file corrupt: salvage.
    Damaged(String),
    /// A failure that damage can cause but SQLite does not call corrupt
    /// (an unsupported format, a value of the wrong type): an error at a
    /// plain open, salvaged by a repair.
    Suspect(String, OpenError),
    /// Anything else (busy, I/O, disk full, a newer schema).
    Fatal(OpenError),
}

/// True for SQLite failures that point at the file's contents rather than
/// at the system (busy, I/O, disk full, permissions, memory).
pub(crate) fn content_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            C::Unknown
                | C::SchemaChanged
                | C::TypeMismatch
                | C::ParameterOutOfRange
                | C::ConstraintViolation
                | C::TooBig
        ),
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => true,
        _ => false,
    }
}

impl From<rusqlite::Error> for Prep {
    fn from(e: rusqlite::Error) -> Self {
        if error::is_corrupt(&e) {
            Prep::Damaged(e.to_string())
        } else if content_failure(&e) {
            Prep::Suspect(e.to_string(), e.into())
        } else {
            Prep::Fatal(e.into())
        }
    }
}

impl From<OpenError> for Prep {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Storage(StorageError::Corrupt(e)) => Prep::Damaged(e.to_string()),
            other => Prep::Fatal(other),
        }
    }
}

/// Reads a few pages through the indexes the start-up path needs: cheap
/// damage detection (a full check is O(file size)).
fn probe(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    conn.query_row("SELECT max(seq) FROM ops", [], |r| {
        r.get::<_, Option<i64>>(0)
    })?;
    conn.query_row(
        "SELECT count(*) FROM (SELECT seq FROM ops INDEXED BY ops_ready WHERE state = 'pending' AND is_head = 1 \
         ORDER BY next_attempt_at, seq LIMIT 1)",
        [],
        |r| r.get::<_, i64>(0),
    )?;
    lock_row::read(conn)?;
    // The root page of every other table: damage there would otherwise stay
    // hidden until an optimistic outcome, an envelope or a position is read.
    for table in ["meta", "txn_outcomes", "op_envelopes", "ops_seq_mark"] {
        conn.query_row(
            &format!("SELECT count(*) FROM (SELECT * FROM {table} NOT INDEXED LIMIT 1)"),
            [],
            |r| r.get::<_, i64>(0),
        )?;
    }
    // And the root page of every index (one page each): an index used only
    // now and then (a token's outcome, a transaction's ops) would otherwise
    // fail a write long after the open, or only a full check.
    for query in INDEX_PROBES {
        conn.query_row(
            &format!("SELECT count(*) FROM ({query} LIMIT 1)"),
            [],
            |r| r.get::<_, i64>(0),
        )?;
    }
    Ok(())
}

/// One read through each index of the current schema (a partial index
/// with its own condition, so `INDEXED BY` can use it).
const INDEX_PROBES: &[&str] = &[
    "SELECT seq FROM ops INDEXED BY ops_entity WHERE entity_type > ''",
    "SELECT seq FROM ops INDEXED BY ops_state WHERE state <> 'pending'",
    "SELECT seq FROM ops INDEXED BY ops_txn WHERE txn IS NOT NULL",
    "SELECT seq FROM ops INDEXED BY ops_gated WHERE txn IS NOT NULL OR depends_on IS NOT NULL",
    "SELECT op_id FROM ops INDEXED BY ops_foreign_id WHERE foreign_id = 1",
    "SELECT token FROM txn_outcomes INDEXED BY sqlite_autoindex_txn_outcomes_1 WHERE token > ''",
    "SELECT id FROM txn_outcomes INDEXED BY txn_outcomes_undelivered WHERE delivered = 0",
    "SELECT id FROM txn_outcomes INDEXED BY txn_outcomes_at WHERE state <> 'pending'",
];

/// Start-up work, all through indexes: requeue a dead runner's in-flight
/// ops, upcast old payloads, forget old outcomes.
fn startup(
    conn: &mut Connection,
    options: &OutboxOptions,
    report: &mut OpenReport,
) -> rusqlite::Result<()> {
    let now = options.clock.now_millis();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let lock_free = lock_row::read(&tx)?.is_none_or(|l| l.owner.is_empty());
    if lock_free {
        report.requeued_in_flight = requeue_in_flight(&tx, now)?;
    }
    let counts = upcast::run(&tx, &options.upcasters, options.envelope_version, now)?;
    report.upcast = counts.migrated;
    report.upcast_failed = counts.failed;
    let retention = i64::try_from(options.outcome_retention.as_millis()).unwrap_or(i64::MAX);
    outcomes::prune(&tx, now.saturating_sub(retention))?;
    tx.commit()
}

/// Puts every in-flight op back to pending (found through the state index).
fn requeue_in_flight(conn: &Connection, now: i64) -> rusqlite::Result<u64> {
    let entities: Vec<(String, String)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT entity_type, entity_id FROM ops INDEXED BY ops_state \
             WHERE state <> 'pending' AND state = 'in_flight'",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if entities.is_empty() {
        return Ok(0);
    }
    // The interrupted claim is not counted as an attempt (the runner claims
    // ahead of its sends, so it may never have been sent, and a crash loop
    // must not exhaust `max_attempts` of ops no server ever refused), but an
    // op stays marked as possibly sent (attempts >= 1): it is never
    // coalesced into, edited or cancelled, since its key may be applied.
    let n = conn.execute(
        "UPDATE ops INDEXED BY ops_state SET state = 'pending', attempts = max(attempts - 1, 1) \
         WHERE state <> 'pending' AND state = 'in_flight'",
        [],
    )?;
    for (t, id) in &entities {
        rows::recompute_head(conn, t, id)?;
    }
    gate::refresh(conn, now)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn prepare_conn(
    path: &Path,
    options: &OutboxOptions,
    report: &mut OpenReport,
) -> Result<Connection, Prep> {
    let io = |source| {
        Prep::Fatal(OpenError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    if let Some(reason) = damage::header_damage(path).map_err(io)? {
        return Err(Prep::Damaged(reason));
    }
    let mut conn = schema::connect(path, options.synchronous, options.open_wait())?;
    report.migrated_from = schema::migrate(&mut conn)?;
    probe(&conn)?;
    // A garbled schema fails only later reads, with an error SQLite does
    // not call corrupt: a plain open refuses the file, a repair salvages.
    if let Err(e) = damage::schema_probe(&conn, schema::SCHEMA_VERSION) {
        let reason = format!("the schema is not an outbox's: {e}");
        return Err(Prep::Suspect(
            reason.clone(),
            OpenError::Damaged {
                path: path.to_path_buf(),
                reason,
            },
        ));
    }
    if options.integrity_check_at_open {
        let check = damage::check(&conn, options.clock.now_millis())?;
        if !check.structure_ok() {
            return Err(Prep::Damaged(format!(
                "integrity check: {}",
                check.remaining.join("; ")
            )));
        }
    }
    startup(&mut conn, options, report)?;
    Ok(conn)
}

/// Refuses an outbox file with other names (hard links): its salvage
/// record and writers' lock are named after one of them, so an open by
/// another would miss them. Only a regular file can be a second name; a
/// directory's link count says nothing (it is refused as not ours).
pub(crate) fn one_name(path: &Path) -> Result<(), OpenError> {
    if let Some(meta) = std::fs::metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_file)
    {
        let links = std::os::unix::fs::MetadataExt::nlink(&meta);
        if links > 1 {
            return Err(OpenError::HardLinked {
                path: path.to_path_buf(),
                links,
            });
        }
    }
    Ok(())
}

fn open_blocking(path: &Path, options: &OutboxOptions) -> Result<(Outbox, OpenReport), OpenError> {
    let (conn, report, _, writers) = open_conn(path, options, false)?;
    Ok((spawn(path, options, conn, writers)?, report))
}

/// Opens (creating, migrating, salvaging) the outbox's connection. With
/// `repair`, also runs the full check (index rebuild, quarantine) and
/// salvages what the cheap probe at open cannot see: a failed check, or a
/// file that fails in a way SQLite does not call corrupt.
fn open_conn(
    path: &Path,
    options: &OutboxOptions,
    repair: bool,
) -> Result<
    (
        Connection,
        OpenReport,
        Option<CheckReport>,
        writers::Writers,
    ),
    OpenError,
> {
    // Through a symlink, every file operation below names the file itself:
    // a salvage must move the outbox, not the link, and its record must be
    // found through every name.
    let resolved = ident::through_link(path);
    let path = resolved.as_path();
    // The writers' lock file is made only beside an outbox (or nothing).
    match ident::classify(path) {
        Ok(ident::Identity::NotOurs(reason)) => {
            return Err(OpenError::NotAnOutbox {
                path: path.to_path_buf(),
                reason,
            })
        }
        Err(source) => {
            return Err(OpenError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => {}
    }
    let under_way = || OpenError::SalvageUnderWay {
        path: path.to_path_buf(),
    };
    let refused = |reason: String| OpenError::SalvageFailed {
        path: path.to_path_buf(),
        reason,
    };
    // Before the lock file is made beside this name.
    one_name(path)?;
    let mut writers =
        writers::Writers::shared(path, options.open_wait()).map_err(|_| under_way())?;
    let mut exclusive = false;
    let mut looked_again = false;
    loop {
        match open_conn_once(path, options, repair, exclusive)? {
            Once::Opened(conn, report, check) => {
                if exclusive {
                    writers.share(options.open_wait());
                }
                return Ok((conn, *report, check, writers));
            }
            Once::Salvage if exclusive => return Err(under_way()),
            Once::Salvage => match writers.exclusive(options.open_wait()) {
                // Another process may have salvaged it meanwhile: look
                // again from the start.
                Ok(()) => exclusive = true,
                // The other open may be a salvage that has just ended.
                Err(writers::Refused::OthersOpen) if !looked_again => looked_again = true,
                Err(writers::Refused::OthersOpen) => return Err(refused(OPEN_ELSEWHERE.into())),
                Err(writers::Refused::Salvaging) => return Err(under_way()),
                Err(writers::Refused::Unusable(why)) => {
                    return Err(refused(format!(
                        "{why}: a salvage needs that lock (fix its owner or move it away when no process has the outbox open); nothing was changed"
                    )))
                }
            },
        }
    }
}

/// Why a salvage is refused while the outbox is open elsewhere.
const OPEN_ELSEWHERE: &str = "it is open elsewhere (another process, or another handle in this one), and a salvage moves the file: close it there, then open again; nothing was changed";

/// What one pass of [`open_conn_once`] came to.
enum Once {
    Opened(Connection, Box<OpenReport>, Option<CheckReport>),
    /// The file must be salvaged, which needs the writers' lock alone.
    Salvage,
}

/// [`open_conn`], once; salvages only when `exclusive` (it holds the
/// writers' lock alone).
fn open_conn_once(
    path: &Path,
    options: &OutboxOptions,
    repair: bool,
    exclusive: bool,
) -> Result<Once, OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Before anything else looks at the path: a salvage killed midway left
    // a partial file there, which only the damaged one may replace.
    let mut foreign_mark = None;
    let put_back = match salvage_mark::settle(path, options.open_wait()) {
        Ok(salvage_mark::Settled::Nothing) => None,
        Ok(salvage_mark::Settled::PutBack(aside)) => {
            tracing::warn!(
                path = %path.display(),
                "a salvage of this outbox was interrupted; the damaged file is back in place"
            );
            Some(aside)
        }
        // Only a salvage needs the record's name: refused there.
        Err(salvage_mark::MarkError::NotOurs(why)) => {
            foreign_mark = Some(why);
            None
        }
        Err(e) => return Err(e.at_open(path)),
    };
    one_name(path)?;
    // Decided before anything is written: a path that is not ours is never
    // moved, replaced or written to.
    let created = match ident::classify(path).map_err(io)? {
        ident::Identity::Missing => guardian_sqlite::create_private(path).map_err(io)?,
        ident::Identity::Empty | ident::Identity::Ours => false,
        ident::Identity::NotOurs(reason) => {
            return Err(OpenError::NotAnOutbox {
                path: path.to_path_buf(),
                reason,
            })
        }
    };
    let mut report = OpenReport {
        created,
        ..OpenReport::default()
    };
    // Every open for writing (a runner, an enqueue, a repair) looks for
    // WAL commits SQLite would ignore, before anything writes: the first
    // write would overwrite them.
    let wal_break = damage::wal_break_locked(path, options.open_wait())
        .map_err(|e| OpenError::Storage(e.into()))?;
    let prepared = match wal_break {
        Some(reason) => Err(Prep::Damaged(reason)),
        None => prepare_conn(path, options, &mut report),
    };
    let reason = match prepared {
        Ok(conn) if !repair => return Ok(Once::Opened(conn, Box::new(report), None)),
        Ok(conn) => match damage::check(&conn, options.clock.now_millis()) {
            Ok(check) if check.structure_ok() => {
                return Ok(Once::Opened(conn, Box::new(report), Some(check)))
            }
            Ok(check) => format!("integrity check: {}", check.remaining.join("; ")),
            Err(e) if error::is_corrupt(&e) => e.to_string(),
            Err(e) => return Err(e.into()),
        },
        Err(Prep::Fatal(e)) => return Err(e),
        Err(Prep::Suspect(_, e)) if !repair => return Err(e),
        Err(Prep::Damaged(reason) | Prep::Suspect(reason, _)) => reason,
    };
    if !exclusive {
        return Ok(Once::Salvage);
    }
    tracing::error!(path = %path.display(), %reason, "outbox file is damaged; salvaging");
    let salvage_failed = |reason: String| OpenError::SalvageFailed {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(why) = foreign_mark {
        return Err(salvage_failed(format!(
            "cannot record the salvage: {why}; nothing was changed"
        )));
    }
    let aside = damage::aside_path(path, options.clock.now_millis());
    let mut mark = salvage_mark::Mark::begin(path, &aside).map_err(|e| match e {
        salvage_mark::MarkError::UnderWay => e.at_open(path),
        other => salvage_failed(format!("{other}; nothing was changed")),
    })?;
    // Looked for once more just before the move: a process that opened
    // the file since the lock was won (not gsync's: those take the lock).
    if writers::open_elsewhere(path) {
        mark.finish_or_log();
        return Err(salvage_failed(OPEN_ELSEWHERE.into()));
    }
    if let Err(e) = damage::move_aside(path, &aside) {
        let why = format!("cannot move it aside: {e}");
        return Err(match salvage_mark::put_back(path, &aside, None) {
            Ok(()) => {
                mark.finish_or_log();
                salvage_failed(format!("{why}; nothing was changed"))
            }
            // The record stays: the next open puts the rest back.
            Err(e) => salvage_failed(format!("{why}; {e}")),
        });
    }
    // Filled under a name of its own and linked into the outbox's place
    // whole: at that place a half-filled file could take an enqueue (were
    // the record and the writers' lock file removed meanwhile), whose
    // position an original op then could not be copied to.
    let filling = damage::filling_path(&aside);
    // The fresh file, held open from its creation until it is in place:
    // its inode cannot be reused meanwhile, so a file is the salvage's if
    // and only if it is this one. Closed before the outbox is opened at
    // its place (closing a descriptor drops the process's POSIX locks on
    // the file, SQLite's too).
    let fresh_file = std::cell::OnceCell::<std::fs::File>::new();
    let is_fresh = |p: &Path| fresh_file.get().is_some_and(|f| damage::same_file(f, p));
    let fresh_ino = || {
        use std::os::unix::fs::MetadataExt;
        fresh_file
            .get()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino())
    };
    // What to do about a file another process put at the outbox's name
    // during the salvage: never the salvage's to replace or remove.
    let someone_created = |mark: salvage_mark::Mark, what: String| {
        let intact = mark.intact();
        // The record stays, so that no open takes that file for the outbox
        // and the next one, once it is moved away, puts the damaged back.
        drop(mark);
        salvage_failed(if intact {
            format!(
                "{what}; another process created {} during the salvage: move that file away and open again to put the damaged file ({}) back",
                path.display(),
                aside.display()
            )
        } else {
            format!(
                "{what}; another process created {} during the salvage, and the salvage's record was removed: the damaged file is at {}",
                path.display(),
                aside.display()
            )
        })
    };
    // A salvage that cannot write all it read (a full disk) is undone: a
    // partial copy in the file's place would pass for the whole outbox.
    let undo = |mark: salvage_mark::Mark, why: String| {
        // Until the fresh file is moved into place nothing at the path is
        // the salvage's.
        if std::fs::symlink_metadata(path).is_ok() && !is_fresh(path) {
            return someone_created(mark, why);
        }
        match damage::move_back(path, &aside) {
            Ok(()) => {
                damage::remove_salvage_files(&aside, fresh_ino());
                mark.finish_or_log();
                salvage_failed(format!(
                    "{why}; nothing was changed (the damaged file is back in place)"
                ))
            }
            // The record stays, so the next open puts the damaged file back.
            Err(e) => salvage_failed(format!(
                "{why}; moving the damaged file back failed too ({e}): it is at {}",
                aside.display()
            )),
        }
    };
    let fresh = match guardian_sqlite::create_private(&filling) {
        Ok(true) => {
            use std::os::unix::fs::OpenOptionsExt;
            let held = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&filling);
            let recorded = mark.fresh_created(&filling);
            match held {
                Ok(file) if damage::same_file(&file, &filling) => {
                    let _ = fresh_file.set(file);
                    recorded.map_err(|e| format!("cannot record the salvage: {e}"))
                }
                Ok(_) => Err(format!(
                    "another process replaced the fresh file {}",
                    filling.display()
                )),
                Err(e) => Err(format!("cannot open the fresh file: {e}")),
            }
        }
        // `aside_path` chose a name beside which none was: someone made it
        // since, and it is not ours to fill or remove.
        Ok(false) => Err(format!(
            "another process created {} during the salvage",
            filling.display()
        )),
        Err(e) => Err(format!("cannot create a fresh file: {e}")),
    };
    let fresh = fresh.and_then(|()| {
        let mut fresh = schema::connect(&filling, options.synchronous, options.open_wait())
            .map_err(|e| format!("cannot open the fresh file: {e}"))?;
        schema::migrate(&mut fresh).map_err(|e| format!("cannot set up the fresh file: {e}"))?;
        Ok(fresh)
    });
    let mut salvage = match fresh {
        Ok(fresh) => {
            let salvage = damage::salvage_into(&aside, &fresh, reason);
            match close_filled(fresh) {
                Ok(()) => salvage,
                Err(e) => return Err(undo(mark, format!("cannot finish the fresh file: {e}"))),
            }
        }
        Err(why) => return Err(undo(mark, why)),
    };
    if let Some(why) = salvage.write_failure() {
        return Err(undo(mark, format!("cannot write the salvaged copy: {why}")));
    }
    #[cfg(test)]
    tests::FILLED.with(|hook| hook.take().map(|f| f(path, &filling)));
    // The file moved into place must be the one filled: someone may have
    // put another at its name meanwhile.
    if !is_fresh(&filling) {
        return Err(undo(
            mark,
            format!(
                "another process replaced the fresh file {}",
                filling.display()
            ),
        ));
    }
    // Never over a file: one someone put at the outbox's name meanwhile is
    // not replaced.
    if let Err(e) = damage::put_back_one(&filling, path) {
        return Err(undo(
            mark,
            format!(
                "cannot move the salvaged copy ({}) into place: {e}",
                filling.display()
            ),
        ));
    }
    damage::remove_salvage_files(&aside, fresh_ino());
    salvage_mark::sync_dir(path);
    // Only now may anything write to the fresh file: while the record is
    // there, the next open would remove it.
    if let Err((mark, e)) = mark.finish() {
        return Err(undo(mark, format!("cannot end the salvage's record: {e}")));
    }
    drop(fresh_file);
    if let Some(earlier) = put_back {
        salvage.notes.push(format!(
            "an earlier salvage of this file was interrupted; its damaged file {} was put back and salvaged again",
            earlier.display()
        ));
    }
    let mut again = OpenReport::default();
    let conn = match prepare_conn(path, options, &mut again) {
        Ok(conn) => conn,
        Err(Prep::Fatal(e)) => return Err(e),
        Err(Prep::Damaged(r) | Prep::Suspect(r, _)) => return Err(salvage_failed(r)),
    };
    report.requeued_in_flight = again.requeued_in_flight;
    report.upcast = again.upcast;
    report.upcast_failed = again.upcast_failed;
    report.salvage = Some(salvage);
    let check = if repair {
        Some(
            damage::check(&conn, options.clock.now_millis())
                .map_err(|e| salvage_failed(e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Once::Opened(conn, Box::new(report), check))
}

/// Closes a salvage's filled fresh file with every commit in the file
/// itself: it is linked into place without its WAL.
fn close_filled(conn: Connection) -> Result<(), String> {
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if busy != 0 {
        return Err("another process has it open".into());
    }
    conn.close().map_err(|(_, e)| e.to_string())
}

fn spawn(
    path: &Path,
    options: &OutboxOptions,
    conn: Connection,
    writers: writers::Writers,
) -> Result<Outbox, OpenError> {
    conn.busy_timeout(options.busy_timeout)?;
    let ctx = Ctx {
        clock: options.clock.clone(),
        max_payload_bytes: options.max_payload_bytes,
        coalesce: options.coalesce,
        op_id_ns: op_ids::namespace(),
        seq_floor: std::sync::atomic::AtomicI64::new(0),
    };
    let prefill = (options.preallocate_wal && options.synchronous != Synchronous::Off)
        .then(|| WalPrefill::new("outbox", &conn, options.busy_timeout, u64::MAX));
    let writer = Writer::spawn(
        conn,
        ctx,
        prefill,
        options.commit_on_caller,
        options.busy_timeout,
        Some(writers),
    )
    .map_err(OpenError::Thread)?;
    Ok(Outbox {
        inner: Arc::new(Inner {
            writer,
            path: path.to_path_buf(),
            max_payload_bytes: options.max_payload_bytes,
            envelope_version: options.envelope_version,
        }),
    })
}

/// A commit that failed after its frames may have reached the file leaves
/// the op's fate unknown: say so, with the id it has if it was stored.
/// [`outcome`] for a transaction, named by its first op.
fn transaction_outcome(
    first: Option<Arc<Mutex<enqueue::Stored>>>,
    result: Result<EnqueuedTransaction, EnqueueError>,
) -> Result<EnqueuedTransaction, EnqueueError> {
    match (result, first) {
        (Err(EnqueueError::Storage(source)), Some(stored)) if source.is_outcome_unknown() => {
            Err(unknown(&stored, source))
        }
        (other, _) => other,
    }
}

fn outcome(
    stored: &Mutex<enqueue::Stored>,
    result: Result<Enqueued, EnqueueError>,
) -> Result<Enqueued, EnqueueError> {
    match result {
        Err(EnqueueError::Storage(source)) if source.is_outcome_unknown() => {
            Err(unknown(stored, source))
        }
        other => other,
    }
}

/// The unknown outcome of the change last stored as `stored` (see
/// `enqueue::Prepared::stored`).
fn unknown(stored: &Mutex<enqueue::Stored>, source: StorageError) -> EnqueueError {
    let stored = *stored
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    EnqueueError::OutcomeUnknown {
        op_id: stored.op_id,
        change: stored.change,
        source,
    }
}

impl Outbox {
    /// Opens (creating, migrating or salvaging as needed) the outbox at `path`.
    ///
    /// The file is created with mode 0600; put it in a directory only the
    /// app can read. A damaged file is moved aside and salvaged (see
    /// [`OpenReport::salvage`]); open never panics on a bad file.
    pub async fn open(
        path: impl AsRef<Path>,
        options: OutboxOptions,
    ) -> Result<(Self, OpenReport), OpenError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || open_blocking(&path, &options))
            .await
            .map_err(|e| OpenError::Thread(std::io::Error::other(e.to_string())))?
    }

    /// Opens the outbox at `path` like [`open`](Self::open), then checks it
    /// in full and repairs what it finds: rebuilds damaged indexes,
    /// quarantines op rows that cannot be used, and salvages the file (as
    /// open does) when the check still fails or the file fails in a way the
    /// cheap probe at open does not catch (`gsync check --repair`). Returns
    /// the final file's check; a salvage is in [`OpenReport::salvage`].
    /// Refuses a path that is not an outbox, like `open`.
    pub async fn repair(
        path: impl AsRef<Path>,
        options: OutboxOptions,
    ) -> Result<(Self, OpenReport, CheckReport), OpenError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let (conn, report, check, writers) = open_conn(&path, &options, true)?;
            let check = check
                .unwrap_or_else(|| CheckReport::new(Vec::new(), false, Vec::new(), Vec::new()));
            Ok((spawn(&path, &options, conn, writers)?, report, check))
        })
        .await
        .map_err(|e| OpenError::Thread(std::io::Error::other(e.to_string())))?
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The largest payload it stores ([`OutboxOptions::max_payload_bytes`]).
    pub fn max_payload_bytes(&self) -> usize {
        self.inner.max_payload_bytes
    }

    /// Ops in FIFO order, filtered and paged, each decoded or, if its row
    /// cannot be decoded or does not match its checksum, described as
    /// unreadable ([`list`](Self::list) leaves those out).
    pub async fn list_checked(
        &self,
        filter: ListFilter,
    ) -> Result<Vec<Result<PendingOp, UnreadableOp>>, OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| {
                Ok::<_, OutboxError>(rows::list_checked(conn, &filter, schema::Seal::Full)?)
            })
            .await
    }

    /// Finishes queued work and closes the database. Later calls on any
    /// clone fail with `Closed`.
    pub async fn close(&self) {
        self.inner.writer.close().await;
    }

    /// See `Writer::hold_next_commit`.
    #[cfg(test)]
    pub(crate) fn hold_next_commit(&self, hooked_only: bool) -> HeldCommit {
        self.inner.writer.hold_next_commit(hooked_only)
    }

    /// Validates and stores an op; returns once it is durable. Coalesces it
    /// into never-attempted ops of its entity when enabled. On error nothing
    /// in the outbox changed. A lone call may commit on the calling task's
    /// worker thread (see [`OutboxOptions::commit_on_caller`]).
    pub async fn enqueue(&self, op: NewOp) -> Result<Enqueued, EnqueueError> {
        let p = self.prepare(op)?;
        let stored = p.stored();
        outcome(
            &stored,
            self.inner
                .writer
                .call_inline(move |c, x| p.apply(c, x))
                .await,
        )
    }

    /// [`enqueue`](Self::enqueue) for a thread that may block: an FFI
    /// binding's worker thread, or an app without an async runtime. Same
    /// validation, durability (returns once the op is durable) and group
    /// commit. When no group is forming, the op is committed on the calling
    /// thread itself, without the hand-off to the writer thread and back
    /// (two cross-thread wake-ups, about 15 % of a lone enqueue on the
    /// benchmark machine); concurrent callers join one group commit.
    ///
    /// It blocks for a commit (an fsync): never call it on an async
    /// executor's thread, use [`enqueue`](Self::enqueue) there.
    pub fn enqueue_blocking(&self, op: NewOp) -> Result<Enqueued, EnqueueError> {
        let p = self.prepare(op)?;
        let stored = p.stored();
        outcome(
            &stored,
            self.inner.writer.call_blocking(move |c, x| p.apply(c, x)),
        )
    }

    /// Stores `ops` as one atomic transaction: durable together in one
    /// commit, under one transaction id, or (on any error) not at all. They
    /// are never coalesced, are sent as one unit once every earlier op of
    /// each of their entities is acknowledged, and are applied, retried,
    /// failed and discarded together.
    pub async fn enqueue_transaction(
        &self,
        ops: Vec<NewOp>,
    ) -> Result<EnqueuedTransaction, EnqueueError> {
        let (txn_id, prepared) = self.prepare_transaction(ops)?;
        let first = prepared.first().map(enqueue::Prepared::stored);
        let result = self
            .inner
            .writer
            .call_inline(move |c, x| enqueue::apply_transaction(c, x, txn_id, &prepared))
            .await;
        transaction_outcome(first, result)
    }

    /// [`enqueue_transaction`](Self::enqueue_transaction) for a thread that
    /// may block, as [`enqueue_blocking`](Self::enqueue_blocking) is.
    pub fn enqueue_transaction_blocking(
        &self,
        ops: Vec<NewOp>,
    ) -> Result<EnqueuedTransaction, EnqueueError> {
        let (txn_id, prepared) = self.prepare_transaction(ops)?;
        let first = prepared.first().map(enqueue::Prepared::stored);
        let result = self
            .inner
            .writer
            .call_blocking(move |c, x| enqueue::apply_transaction(c, x, txn_id, &prepared));
        transaction_outcome(first, result)
    }

    fn prepare_transaction(
        &self,
        ops: Vec<NewOp>,
    ) -> Result<(uuid::Uuid, Vec<enqueue::Prepared>), EnqueueError> {
        enqueue::prepare_transaction(
            ops,
            self.inner.max_payload_bytes,
            self.inner.envelope_version,
        )
    }

    fn prepare(&self, op: NewOp) -> Result<enqueue::Prepared, EnqueueError> {
        enqueue::prepare(
            op,
            self.inner.max_payload_bytes,
            self.inner.envelope_version,
        )
    }

    // ---- runner side (fenced) ----

    // ---- processing lock row ----

    /// The lock row, if any runner ever took the lock.
    pub async fn lock_read(&self) -> Result<Option<LockRow>, OutboxError> {
        self.inner
            .writer
            .call(|conn, _| Ok::<_, OutboxError>(lock_row::read(conn)?))
            .await
    }

    /// Takes the lock (epoch + 1) if it is free, ours, or still exactly
    /// `expect = (epoch, heartbeat)` as the caller saw it when judging it
    /// stale. On success the previous holder's in-flight ops go back to
    /// pending in the same transaction (that holder is gone).
    ///
    /// Safe to drop: a write not yet begun is not made, and a lock taken by
    /// a write its caller no longer hears is given back.
    pub async fn lock_acquire(
        &self,
        owner: &str,
        expect: Option<(u64, u64)>,
    ) -> Result<Option<Fence>, OutboxError> {
        self.lock_acquire_noting(owner, expect, None, None).await
    }

    /// [`Outbox::lock_acquire`], recording in the same transaction the
    /// identity of the OS lock file the new holder keeps (`None`: none),
    /// under `ticket` if given (see [`Ticket`]).
    pub(crate) async fn lock_acquire_noting(
        &self,
        owner: &str,
        expect: Option<(u64, u64)>,
        os_file: Option<String>,
        ticket: Option<&Ticket>,
    ) -> Result<Option<Fence>, OutboxError> {
        let owner = owner.to_owned();
        // Taken but never heard (the caller gave up, e.g. a runner stopped
        // while the outbox was busy): given back, or the row would name a
        // holder that never beats until it is judged stale.
        let taken: Arc<Mutex<Option<Fence>>> = Arc::default();
        let (noted, writer) = (taken.clone(), self.inner.writer.clone());
        let give_back: Unheard = Box::new(move || {
            let fence = noted.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(fence) = fence {
                writer.run_detached("giving back a lock taken unheard", move |conn, _| {
                    match lock_row::release(conn, &fence) {
                        Err(OutboxError::LockLost) => Ok(()),
                        other => other,
                    }
                });
            }
        });
        self.inner
            .writer
            .call_unheard(
                move |conn, ctx| {
                    let fence = lock_row::acquire(conn, &owner, expect, ctx.now())?;
                    if let Some(f) = &fence {
                        lock_row::note_os_file(conn, os_file.as_deref())?;
                        requeue_in_flight(conn, ctx.now())?;
                        *taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(f.clone());
                    }
                    Ok::<_, OutboxError>(fence)
                },
                Some(give_back),
                ticket,
            )
            .await
    }

    /// The lock row and the identity of the OS lock file its holder keeps,
    /// read together, under `ticket` if given.
    pub(crate) async fn lock_read_with_os_file(
        &self,
        ticket: Option<&Ticket>,
    ) -> Result<(Option<LockRow>, Option<String>), OutboxError> {
        self.inner
            .writer
            .call_unheard(
                |conn, _| Ok::<_, OutboxError>((lock_row::read(conn)?, lock_row::os_file(conn)?)),
                None,
                ticket,
            )
            .await
    }

    /// Records the OS lock file the holder of `fence` obtained after it
    /// took the lock. Fenced.
    pub(crate) async fn lock_note_os_file(
        &self,
        fence: &Fence,
        os_file: String,
    ) -> Result<(), OutboxError> {
        let fence = fence.clone();
        self.inner
            .writer
            .call(move |conn, _| {
                lock_row::check(conn, &fence)?;
                Ok::<_, OutboxError>(lock_row::note_os_file(conn, Some(&os_file))?)
            })
            .await
    }

    // ---- app side ----

    /// One op by id.
    pub async fn get(&self, op_id: OpId) -> Result<Option<PendingOp>, OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| Ok::<_, OutboxError>(rows::by_id(conn, op_id)?))
            .await
    }

    /// Ops in FIFO order, filtered and paged; ops whose rows cannot be used
    /// are left out (see [`list_checked`](Self::list_checked)).
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<PendingOp>, OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| app::list(conn, &filter))
            .await
    }

    /// Puts a failed op back in the queue, due now (same key; attempts kept).
    pub async fn retry_failed(&self, op_id: OpId) -> Result<(), OutboxError> {
        self.inner
            .writer
            .call(move |conn, ctx| app::retry_failed(conn, ctx, op_id))
            .await
    }

    /// Puts every failed op back in the queue; returns how many.
    pub async fn retry_all_failed(&self) -> Result<u64, OutboxError> {
        self.inner.writer.call(app::retry_all_failed).await
    }

    /// Removes a failed op for good; returns it.
    pub async fn discard(&self, op_id: OpId) -> Result<PendingOp, OutboxError> {
        self.inner
            .writer
            .call(move |conn, ctx| app::discard(conn, ctx, op_id))
            .await
    }

    /// Removes a pending op that was never attempted; returns it. Its tokens fail as cancelled.
    pub async fn cancel(&self, op_id: OpId) -> Result<PendingOp, OutboxError> {
        self.inner
            .writer
            .call(move |conn, ctx| app::cancel(conn, ctx, op_id))
            .await
    }

    /// Replaces the payload of a pending op that was never attempted.
    pub async fn edit_payload(&self, op_id: OpId, payload: Value) -> Result<(), OutboxError> {
        self.inner
            .writer
            .call(move |conn, ctx| app::edit_payload(conn, ctx, op_id, &payload))
            .await
    }

    /// When the next ready op is due as a runner at wall time `now_ms`
    /// with a retry policy of this `horizon` sees it
    /// ([`crate::retry::clamp_due`]: a time stored under a wall clock ahead
    /// is not shown as hours away), or `None` when none is pending.
    pub async fn next_attempt(
        &self,
        now_ms: i64,
        horizon: Duration,
    ) -> Result<Option<i64>, OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| app::next_attempt(conn, now_ms, horizon))
            .await
    }

    /// Whether any op is pending or in flight, and when the next ready op is
    /// due: two index lookups, cheap at any queue length (unlike `stats`).
    pub async fn next_due(&self) -> Result<NextDue, OutboxError> {
        self.inner
            .writer
            .call(|conn, _ctx| app::next_due(conn))
            .await
    }

    /// Queue depth by state, oldest op, next due time.
    pub async fn stats(&self) -> Result<Stats, OutboxError> {
        self.inner.writer.call(|conn, _| app::stats(conn)).await
    }

    /// A meta value (e.g. the realtime cursor).
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>, OutboxError> {
        let key = key.to_owned();
        self.inner
            .writer
            .call(move |conn, _| app::meta_get(conn, &key))
            .await
    }

    /// Sets a meta value durably.
    pub async fn meta_set(&self, key: &str, value: &str) -> Result<(), OutboxError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.inner
            .writer
            .call(move |conn, _| app::meta_set(conn, &key, &value))
            .await
    }

    /// Sets several meta values durably, in one transaction: all or none.
    pub async fn meta_set_all(&self, entries: &[(&str, &str)]) -> Result<(), OutboxError> {
        let entries: Vec<(String, String)> = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.inner
            .writer
            .call(move |conn, _| {
                for (key, value) in &entries {
                    app::meta_set(conn, key, value)?;
                }
                Ok::<_, OutboxError>(())
            })
            .await
    }

    /// Full `PRAGMA integrity_check`; rebuilds indexes (`REINDEX`) if it
    /// fails; quarantines every op row that cannot be used (see
    /// [`CheckReport::unreadable_ops`]).
    pub async fn check(&self) -> Result<CheckReport, OutboxError> {
        self.inner
            .writer
            .call(|conn, ctx| Ok::<_, OutboxError>(damage::check(conn, ctx.now())?))
            .await
    }

    /// The outcome of an optimistic-update token, if known.
    pub async fn txn_outcome(&self, token: &str) -> Result<Option<TxnOutcome>, OutboxError> {
        let token = token.to_owned();
        self.inner
            .writer
            .call(move |conn, _| Ok::<_, OutboxError>(outcomes::get(conn, &token)?))
            .await
    }

    /// Settled outcomes not yet confirmed as delivered, oldest first.
    pub async fn undelivered_outcomes(
        &self,
        limit: usize,
    ) -> Result<Vec<OutcomeRecord>, OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| Ok::<_, OutboxError>(outcomes::undelivered(conn, limit)?))
            .await
    }

    /// Confirms outcomes as delivered (they stop showing in `undelivered_outcomes`).
    pub async fn mark_outcomes_delivered(&self, ids: Vec<i64>) -> Result<(), OutboxError> {
        self.inner
            .writer
            .call(move |conn, _| Ok::<_, OutboxError>(outcomes::mark_delivered(conn, &ids)?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by a salvage on this thread once its fresh file is filled and
    /// closed, before it is linked into place (outbox path, the fresh
    /// file's own path).
    type Filled = Box<dyn FnOnce(&Path, &Path)>;

    thread_local! {
        pub(super) static FILLED: std::cell::Cell<Option<Filled>> =
            const { std::cell::Cell::new(None) };
    }

    /// An outbox at `path` with `n` ops, its first byte broken after a
    /// checkpoint (so the file holds every page): a repair salvages it.
    fn damaged_outbox(path: &Path, n: usize) {
        let (outbox, _) = open_blocking(path, &OutboxOptions::default()).unwrap();
        for i in 0..n {
            let op = NewOp::create("t", format!("e{i}"), serde_json::json!({"i": i}));
            outbox.enqueue_blocking(op).unwrap();
        }
        drop(outbox);
        Connection::open(path)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let mut bytes = std::fs::read(path).unwrap();
        bytes[0] = b'X';
        std::fs::write(path, bytes).unwrap();
    }

    /// A repair of `path` with `hook` run between the fill and the move;
    /// it must fail: its error, as text.
    fn repair_failing_with(path: &Path, hook: Filled) -> String {
        FILLED.with(|h| h.set(Some(hook)));
        open_conn(path, &OutboxOptions::default(), true)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    /// A repair of `path` salvages `n` ops, and they are in its file.
    fn repair_salvages(path: &Path, n: u64) {
        let (conn, report, _, _) = open_conn(path, &OutboxOptions::default(), true).unwrap();
        assert_eq!(report.salvage.map(|s| s.ops_saved), Some(n));
        drop(conn);
        assert_eq!(ops_in(path), i64::try_from(n).unwrap());
    }

    fn ops_in(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM ops", [], |r| r.get(0))
            .unwrap()
    }

    /// The fresh file is filled under its own name and appears at the
    /// outbox's name whole: a half-filled file there once took an enqueue
    /// (its record and the writers' lock file removed by someone), whose
    /// position an original op then could not be copied to.
    #[test]
    fn a_salvage_fills_its_fresh_file_away_from_the_outbox_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        damaged_outbox(&path, 30);
        let seen = std::rc::Rc::new(std::cell::Cell::new(false));
        let saw = std::rc::Rc::clone(&seen);
        FILLED.with(|hook| {
            hook.set(Some(Box::new(move |path: &Path, filling: &Path| {
                assert!(
                    std::fs::symlink_metadata(path).is_err(),
                    "a file at the outbox's name"
                );
                assert_eq!(ops_in(filling), 30, "filled whole first");
                saw.set(true);
            })));
        });
        repair_salvages(&path, 30);
        assert!(seen.get(), "the salvage ran");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".fresh") || n.contains(".salvag"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A fresh file someone replaced while it was filled is not moved into
    /// place, and a file put at the outbox's name meanwhile stays where it
    /// is: the salvage's undo used to remove whatever was at that name.
    #[test]
    fn a_replaced_fresh_file_is_not_moved_in_and_nothing_of_theirs_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        damaged_outbox(&path, 5);
        let damaged = std::fs::read(&path).unwrap();
        for put_at_path in [false, true] {
            let theirs = dir.path().join("theirs");
            let err = repair_failing_with(
                &path,
                Box::new(move |path: &Path, filling: &Path| {
                    std::fs::write(&theirs, b"theirs").unwrap();
                    std::fs::rename(&theirs, filling).unwrap();
                    if put_at_path {
                        std::fs::write(path, b"at the path").unwrap();
                    }
                }),
            );
            assert!(err.contains("replaced the fresh file"), "{err}");
            let fresh: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with(".fresh"))
                .collect();
            assert_eq!(fresh.len(), 1, "{fresh:?}");
            assert_eq!(std::fs::read(&fresh[0]).unwrap(), b"theirs");
            std::fs::remove_file(&fresh[0]).unwrap();
            if put_at_path {
                assert!(err.contains("another process created"), "{err}");
                assert_eq!(std::fs::read(&path).unwrap(), b"at the path");
                std::fs::remove_file(&path).unwrap();
            } else {
                assert!(err.contains("nothing was changed"), "{err}");
                assert_eq!(std::fs::read(&path).unwrap(), damaged);
            }
        }
        repair_salvages(&path, 5);
    }

    /// A file another process put at the outbox's name while the fresh one
    /// was filled is never replaced nor removed; once it is moved away,
    /// the next open puts the damaged file back and salvages it again.
    #[test]
    fn a_file_put_at_the_outbox_name_during_a_salvage_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        damaged_outbox(&path, 5);
        let err = repair_failing_with(
            &path,
            Box::new(|path: &Path, _: &Path| std::fs::write(path, b"theirs").unwrap()),
        );
        assert!(err.contains("another process created"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
        std::fs::remove_file(&path).unwrap();
        repair_salvages(&path, 5);
    }

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join(" | ")
    }

    /// The open probe reads every index's root page (`ops_ready` has its
    /// own probe), so damage in one is found at open.
    #[test]
    fn the_open_probe_reads_every_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name <> 'ops_ready' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut probed: Vec<String> = Vec::new();
        for query in INDEX_PROBES {
            let p = plan(&conn, query);
            let name = indexes
                .iter()
                .find(|i| p.contains(i.as_str()))
                .unwrap_or_else(|| panic!("{query} reads no index: {p}"));
            probed.push(name.clone());
        }
        probed.sort();
        assert_eq!(probed, indexes, "an index the open probe does not read");
        super::probe(&conn).unwrap();
    }

    /// The hot and start-up queries must be served by indexes, never a scan
    /// (they pin their index with `INDEXED BY`, which fails to prepare if the
    /// index cannot serve them).
    #[test]
    fn queries_use_their_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let cases = [
            (
                "SELECT seq FROM ops INDEXED BY ops_ready WHERE state = 'pending' AND is_head = 1 \
                 AND next_attempt_at <= 5 ORDER BY next_attempt_at, seq LIMIT 10",
                "ops_ready",
            ),
            (
                "SELECT seq FROM ops INDEXED BY ops_entity WHERE entity_type = 't' AND entity_id = 'a' \
                 AND state IN ('pending', 'in_flight') ORDER BY seq DESC",
                "ops_entity",
            ),
            (
                "SELECT DISTINCT entity_type, entity_id FROM ops INDEXED BY ops_state \
                 WHERE state <> 'pending' AND state = 'in_flight'",
                "ops_state",
            ),
            (
                "SELECT min(next_attempt_at) FROM ops INDEXED BY ops_ready \
                 WHERE state = 'pending' AND is_head = 1",
                "ops_ready",
            ),
            (
                "SELECT 1 FROM ops INDEXED BY ops_state WHERE state <> 'pending' \
                 AND state = 'in_flight' LIMIT 1",
                "ops_state",
            ),
            (
                "SELECT seq FROM ops INDEXED BY ops_state WHERE state <> 'pending' \
                 AND state = 'failed' AND seq > 0 ORDER BY seq LIMIT 10",
                "ops_state",
            ),
            (
                "SELECT state, count(*) FROM ops INDEXED BY ops_state WHERE state <> 'pending' \
                 GROUP BY state",
                "ops_state",
            ),
            (
                "SELECT seq FROM ops INDEXED BY ops_state WHERE state <> 'pending' AND state = 'failed' \
                 AND envelope_version < 3 ORDER BY seq",
                "ops_state",
            ),
            ("SELECT 1 FROM op_envelopes WHERE version < 3 LIMIT 1", "op_envelopes"),
        ];
        for (sql, index) in cases {
            let p = plan(&conn, sql);
            assert!(p.contains(index), "{sql}\n  plan: {p}");
            assert!(!p.contains("TEMP B-TREE FOR ORDER"), "{sql}\n  plan: {p}");
        }
    }
}
