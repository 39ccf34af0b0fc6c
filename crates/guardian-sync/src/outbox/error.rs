//! Errors of the outbox, one enum per operation.

use std::path::PathBuf;
use std::sync::Arc;

use crate::op::{OpId, OpKind, OpState};

/// A failure of the underlying SQLite database (disk full, I/O error, ...),
/// keeping SQLite's (or the JSON decoder's) error as its source.
///
/// Cloneable (the source is shared) so one commit failure can be reported
/// to every caller whose work was in that commit.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// SQLite reported the file as corrupt or not a database.
    #[error("outbox storage error: the file is damaged: {0}")]
    Corrupt(#[source] Arc<rusqlite::Error>),
    /// Another connection held the database past the busy timeout (e.g. a
    /// frozen process inside a transaction): try again later.
    #[error("outbox storage error: busy: {0}")]
    Busy(#[source] Arc<rusqlite::Error>),
    /// `COMMIT` itself failed (e.g. an fsync error after the WAL frames were
    /// written): the work may or may not be on disk, and may reappear at the
    /// next open. Never treat such a write as absent.
    #[error("outbox storage error: the commit failed and may or may not be on disk: {0}")]
    OutcomeUnknown(#[source] Arc<rusqlite::Error>),
    /// Any other SQLite failure (disk full, I/O error, ...).
    #[error("outbox storage error: {0}")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// A stored JSON value does not decode.
    #[error("outbox storage error: stored JSON is unreadable: {0}")]
    Json(#[source] Arc<serde_json::Error>),
    /// Stored rows contradict an invariant the outbox keeps.
    #[error("outbox storage error: {0}")]
    Inconsistent(String),
}

impl StorageError {
    /// True if SQLite reported the file as corrupt or not a database.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Self::Corrupt(_))
    }

    /// True when another connection held the database too long.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy(_))
    }

    /// True when a commit failed and its work may still be on disk.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown(_))
    }

    /// The same failure, met by `COMMIT`.
    pub(crate) fn at_commit(self) -> Self {
        match self {
            Self::Corrupt(e) | Self::Busy(e) | Self::Sqlite(e) => Self::OutcomeUnknown(e),
            other => other,
        }
    }
}

/// Equal when of the same kind with the same text (the sources themselves
/// are not comparable).
impl PartialEq for StorageError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for StorageError {}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        if is_corrupt(&e) {
            Self::Corrupt(Arc::new(e))
        } else if is_busy(&e) {
            Self::Busy(Arc::new(e))
        } else {
            Self::Sqlite(Arc::new(e))
        }
    }
}

impl From<serde_json::Error> for StorageError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(Arc::new(e))
    }
}

/// True when another connection held the database past the busy timeout.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// True for errors meaning the file is damaged rather than busy or full.
pub(crate) fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Why [`Outbox::open`](super::Outbox::open) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file or its directory could not be created or read.
    #[error("cannot open outbox file {path}: {source}")]
    Io {
        /// The outbox path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file was written by a newer version of this library.
    #[error("outbox schema version {found} is newer than this build supports ({supported}); upgrade the app")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// Newest schema this build knows.
        supported: u32,
    },
    /// SQLite failed (and the file did not look damaged, so it was left alone).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The file was damaged and could not even be salvaged into a fresh one.
    #[error("outbox file {path} is damaged and salvage failed: {reason}")]
    SalvageFailed {
        /// The outbox path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Another process is salvaging the damaged outbox file; nothing was
    /// touched. Try again when it is done.
    #[error("another process is salvaging outbox {path}; try again when it is done")]
    SalvageUnderWay {
        /// The outbox path.
        path: PathBuf,
    },
    /// A read-only open found a salvage that a killed process left
    /// unfinished: the file at the path may be partial. Any open for
    /// writing puts the damaged file back and salvages it again.
    #[error("a salvage of outbox {path} was interrupted; any open for writing finishes it (`Outbox::open`, `gsync check --repair`)")]
    SalvageInterrupted {
        /// The outbox path.
        path: PathBuf,
    },
    /// Nothing is at the path (a read-only open creates nothing).
    #[error("no outbox at {path}")]
    Missing {
        /// The outbox path.
        path: PathBuf,
    },
    /// The path holds something that is not an outbox; it was left as it was.
    #[error("{path} is not a guardian outbox: {reason}; nothing was changed")]
    NotAnOutbox {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// A read-only open found the outbox damaged; a repair (`gsync check
    /// --repair`, [`Outbox::repair`](super::Outbox::repair)) salvages it.
    #[error("outbox {path} is damaged ({reason}); repair it with `gsync check --repair`")]
    Damaged {
        /// The outbox path.
        path: PathBuf,
        /// What is damaged.
        reason: String,
    },
    /// The writer thread could not be started.
    #[error("cannot start the outbox writer thread: {0}")]
    Thread(std::io::Error),
    /// The file has several hard links. SQLite names its write-ahead log
    /// after the path, so two processes using two names of one file would
    /// each keep their own log of it, and the processing lock could not
    /// tell them apart: refused, nothing touched.
    #[error("outbox file {path} has {links} hard links; open it by one name only (remove the other links)")]
    HardLinked {
        /// The outbox path.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
}

/// Why [`Outbox::enqueue`](super::Outbox::enqueue) refused an op. Nothing in
/// the outbox is changed when it does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The entity type or id has the wrong syntax.
    #[error(transparent)]
    Invalid(#[from] guardian_protocol::ValidationError),
    /// A create/update payload must be a JSON object.
    #[error("{kind} payload must be a JSON object, got {found}")]
    PayloadNotObject {
        /// The op kind.
        kind: OpKind,
        /// The JSON type found.
        found: &'static str,
    },
    /// A delete carries no payload.
    #[error("delete takes no payload (got {found})")]
    PayloadOnDelete {
        /// The JSON type found.
        found: &'static str,
    },
    /// The payload (or base) is larger than `OutboxOptions::max_payload_bytes`.
    #[error("payload is {size} bytes, over the limit of {max} bytes")]
    PayloadTooLarge {
        /// Serialized size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The payload (or base) nests arrays and objects deeper than the
    /// outbox can read back.
    #[error("payload nests arrays and objects deeper than {max} levels")]
    PayloadTooDeep {
        /// The limit.
        max: usize,
    },
    /// The transaction token is empty or longer than 256 bytes.
    #[error("transaction token must be 1 to 256 bytes")]
    InvalidTxnToken,
    /// The base version is over `i64::MAX`, the largest the outbox stores
    /// (and the reference server counts to).
    #[error("base version {0} is over the largest one stored, {max}", max = i64::MAX)]
    BaseVersionTooLarge(u64),
    /// An atomic transaction must have 1 to `max` ops.
    #[error("a transaction must have 1 to {max} ops, got {count}")]
    TransactionSize {
        /// Ops given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An op may wait for at most `max` others.
    #[error("an op may depend on at most {max} ops, got {count}")]
    TooManyDependencies {
        /// Dependencies given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An op named as a dependency has failed: the new op could never be
    /// sent. Retry or discard the dependency first.
    #[error("dependency {dependency} has failed; retry or discard it first")]
    DependencyFailed {
        /// The failed op.
        dependency: OpId,
    },
    /// SQLite failed before the commit; the op was not stored.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The commit itself failed: the change may or may not be stored (it
    /// can reappear at the next open). Do not enqueue it again blindly, or
    /// it may be applied twice under two keys: look at `op_id` with
    /// [`Outbox::get`](super::Outbox::get) as `change` says.
    #[error("the commit failed and {}; check before enqueueing again: {source}", change.what(op_id))]
    OutcomeUnknown {
        /// The op to look at.
        op_id: OpId,
        /// What the enqueue did to it, and so what to look for.
        change: UnknownChange,
        /// The storage failure.
        source: StorageError,
    },
    /// The outbox was closed.
    #[error("the outbox is closed")]
    Closed,
}

/// What an enqueue whose commit failed did to the op it names
/// ([`EnqueueError::OutcomeUnknown`]), and so how to tell whether it is
/// stored. A position given to an op in a commit that failed is never given
/// to another op by the same open outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownChange {
    /// A new op: stored if an op with that id exists.
    New,
    /// Coalesced into a queued op, which exists either way: stored if that
    /// op's data is the change's.
    MergedInto,
    /// A DELETE that cancels a queued, never-sent CREATE (and its updates):
    /// stored if that op is gone.
    Cancels,
}

impl UnknownChange {
    fn what(self, op_id: &OpId) -> String {
        match self {
            Self::New => format!("the op may or may not be stored (op {op_id})"),
            Self::MergedInto => format!(
                "the change may or may not be stored (merged into queued op {op_id}: \
                 stored if that op's data is the change's)"
            ),
            Self::Cancels => format!(
                "the change may or may not be stored (it cancels queued op {op_id}: stored \
                 if that op is gone)"
            ),
        }
    }
}

/// Why an outbox call other than open/enqueue failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The processing lock is no longer held at the fence's epoch; nothing was written.
    #[error("processing lock lost: another runner took over; stop processing")]
    LockLost,
    /// No op has this id.
    #[error("no op {0} in the outbox")]
    NotFound(OpId),
    /// The op is not in a state that allows this.
    #[error("op {op_id} is {state}, this needs it {needed}")]
    WrongState {
        /// The op.
        op_id: OpId,
        /// Its state.
        state: OpState,
        /// What the call needs.
        needed: &'static str,
    },
    /// The op was already sent at least once (perhaps before a `retry`
    /// reset its attempt count); its request must not change.
    #[error("op {op_id} was already sent ({attempts} attempt(s) since it was last queued); its key may be applied, so it cannot be changed")]
    AlreadyAttempted {
        /// The op.
        op_id: OpId,
        /// Sends started since it was last queued (0 after a `retry`).
        attempts: u32,
    },
    /// A new payload was refused.
    #[error("invalid payload: {0}")]
    InvalidPayload(EnqueueError),
    /// SQLite failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The outbox was closed.
    #[error("the outbox is closed")]
    Closed,
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.into())
    }
}

impl From<rusqlite::Error> for EnqueueError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.into())
    }
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.into())
    }
}

impl From<serde_json::Error> for OutboxError {
    fn from(e: serde_json::Error) -> Self {
        Self::Storage(e.into())
    }
}

impl From<serde_json::Error> for EnqueueError {
    fn from(e: serde_json::Error) -> Self {
        Self::Storage(e.into())
    }
}

/// Errors a writer-thread job can report when its commit fails or the thread is gone.
pub(crate) trait JobError: Send + 'static {
    fn storage(e: StorageError) -> Self;
    fn closed() -> Self;
}

impl JobError for OutboxError {
    fn storage(e: StorageError) -> Self {
        Self::Storage(e)
    }
    fn closed() -> Self {
        Self::Closed
    }
}

impl JobError for EnqueueError {
    fn storage(e: StorageError) -> Self {
        Self::Storage(e)
    }
    fn closed() -> Self {
        Self::Closed
    }
}
