//! Storage: entities, idempotency records, change feed and applied log,
//! behind one trait ([`Backend`]) with two implementations: SQLite (a file
//! in WAL mode, or in memory; the embedded default) and PostgreSQL (shared
//! by any number of server instances).
//!
//! The rules (entity decisions, fingerprints, dependencies, replays) live
//! here and in the submodules, shared by both; each backend only decides
//! how a request's mutations become one transaction and how commits reach
//! realtime sessions ([`FeedEvent`]).

mod applied;
mod apply;
mod entities;
mod feed;
mod hooks;
mod idempotency;
mod outcome;
mod postgres;
mod schema;
mod sqlite;
mod transaction;
mod write_queue;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use guardian_protocol::{Change, ChangeFingerprint, ChangesPage, Entity, MutationKind};
use serde_json::Value;
use tokio::sync::broadcast;

pub use applied::AppliedMutation;
pub(crate) use feed::FeedRefusal;
#[cfg(test)]
pub(crate) use hooks::NoHooks;
pub(crate) use hooks::StoreHooks;
pub(crate) use idempotency::{canonical, fingerprint, fingerprint_data};
pub(crate) use outcome::{Applied, OpOutcome, Refusal};
pub use schema::Synchronous;
pub(crate) use transaction::{
    response_json as transaction_response_json, write_results, TransactionInput, TransactionOutcome,
};

use crate::clock::SharedClock;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or could not be reached.
    #[error("postgres error: {}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The connection to PostgreSQL was lost during a commit, or PostgreSQL
    /// stopped answering a transaction: it may or may not have been
    /// applied.
    #[error("commit outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// No PostgreSQL connection could be had from the pool.
    #[error("postgres pool: {0}")]
    Pool(String),
    /// The PostgreSQL URL is invalid.
    #[error("invalid postgres url: {0}")]
    Url(String),
    /// The database file or its directory could not be created.
    #[error("cannot create the database file or its directory: {0}")]
    Io(std::io::Error),
    /// The file is a SQLite database of something else: left as it was.
    #[error("{path} is not a guardian-server database ({why}); refusing to change it")]
    NotOurs {
        /// The file.
        path: std::path::PathBuf,
        /// What it holds instead.
        why: String,
    },
    /// The PostgreSQL database holds tables under this server's names that
    /// are not its own (or not of a shape it made): left as they were.
    #[error(
        "the PostgreSQL database is not a guardian-server database ({0}); refusing to change it"
    )]
    ForeignSchema(String),
    /// The database holds something this server cannot read.
    #[error("database content is invalid: {0}")]
    Corrupt(String),
    /// The blocking task running the query died.
    #[error("database task failed: {0}")]
    Task(String),
    /// The commit of a group of requests failed; nothing of the group was
    /// applied.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The applied-mutations log was asked for on a server that keeps none.
    #[error(
        "the applied-mutations log is off (ServerBuilder::applied_log, gsync serve --applied-log)"
    )]
    AppliedLogOff,
}

/// A retention purge's view of time: rows stamped before `not_before` have
/// expired. A purge walks rows in the order they were written and stops at
/// the first one it [keeps](Self::stops_at); one stamped after `now` (made
/// while the clock ran ahead) does not stop it, or a clock that stepped
/// forward and back would stall the purge until it caught up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cutoff {
    pub(crate) not_before: i64,
    pub(crate) now: i64,
}

impl Cutoff {
    /// Rows are kept for `retention_ms`; the clock reads `now`.
    pub(crate) fn kept_for(retention_ms: i64, now: i64) -> Self {
        Self {
            not_before: now.saturating_sub(retention_ms),
            now,
        }
    }

    /// Whether a row stamped `at` ends the walk: young, and not from the
    /// future.
    pub(crate) fn stops_at(self, at: i64) -> bool {
        (self.not_before..=self.now).contains(&at)
    }
}

/// A precondition of an update or delete (`If-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// `If-Match: *`: any live entity.
    Any,
    /// `If-Match: "v"`.
    Version(u64),
}

/// One validated mutation, ready for the store.
#[derive(Debug, Clone)]
pub(crate) struct MutationInput {
    pub(crate) key: String,
    pub(crate) fingerprint: [u8; 32],
    pub(crate) kind: MutationKind,
    pub(crate) entity_type: String,
    pub(crate) id: String,
    /// The new data (`Null` for deletes).
    pub(crate) data: Value,
    /// `data` as canonical JSON text (`null` for deletes), numbers as
    /// written: what is stored (the fingerprint hashes it too when its
    /// numbers are in canonical form).
    pub(crate) data_json: String,
    pub(crate) if_match: Option<Precondition>,
    /// A batch op's `depends_on`: an earlier op of the same request that
    /// must have succeeded before this one is applied.
    pub(crate) dependency: Option<Dependency>,
}

/// What one request asks of the store.
#[derive(Debug, Clone)]
pub(crate) enum Work {
    /// Independent mutations (a single request or a batch).
    Ops(Vec<MutationInput>),
    /// An atomic transaction.
    Transaction(TransactionInput),
}

impl Work {
    /// How many ops it carries.
    pub(crate) fn len(&self) -> usize {
        match self {
            Work::Ops(ops) => ops.len(),
            Work::Transaction(t) => t.ops.len(),
        }
    }
}

/// The store's answer to a [`Work`], of the same kind.
#[derive(Debug, Clone)]
pub(crate) enum WorkDone {
    Ops(Vec<OpOutcome>),
    Transaction(TransactionOutcome),
}

impl WorkDone {
    /// The outcomes of independent ops.
    fn into_ops(self) -> Result<Vec<OpOutcome>, StoreError> {
        match self {
            WorkDone::Ops(o) => Ok(o),
            WorkDone::Transaction(_) => Err(StoreError::Task("a transaction answered ops".into())),
        }
    }

    /// The outcome of a transaction.
    fn into_transaction(self) -> Result<TransactionOutcome, StoreError> {
        match self {
            WorkDone::Transaction(t) => Ok(t),
            WorkDone::Ops(_) => Err(StoreError::Task("ops answered a transaction".into())),
        }
    }
}

/// A batch op's dependency on an earlier op of its batch (same entity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dependency {
    /// Where the earlier op is: its index in the batch while the request is
    /// prepared; its index in the inputs given to [`Store::apply`] (whose
    /// results come in the same order) once the pipeline hands it over.
    pub(crate) on: usize,
    /// The earlier op's index in the batch, as the client sent it (for the
    /// 424 detail).
    pub(crate) batch_index: u32,
    /// `if_match_chained`: the precondition is the version the earlier op
    /// left the entity at (none after a delete).
    pub(crate) chained: bool,
}

impl Dependency {
    /// What a dependent op gets given the outcome of the op it depends on
    /// (`Some` when that op took effect, fresh or replayed): `Ok(precondition)`
    /// to go ahead (the precondition only replaces the op's own when
    /// chained), or the refusal when the earlier op did not succeed.
    pub(crate) fn resolve(
        &self,
        earlier: Option<&Applied>,
        own: Option<Precondition>,
    ) -> Result<Option<Precondition>, Refusal> {
        let Some(earlier) = earlier else {
            return Err(Refusal::DependencyFailed {
                batch_index: self.batch_index,
            });
        };
        if !self.chained {
            return Ok(own);
        }
        // A delete (204) returns no entity: nothing to chain on.
        Ok(if earlier.status == 204 {
            None
        } else {
            earlier.version.map(Precondition::Version)
        })
    }
}

/// The changes of one commit, with the tenant they belong to, as broadcast
/// to realtime sessions: one message per commit, in cursor order.
#[derive(Debug, Clone)]
pub(crate) struct TenantChanges {
    pub(crate) tenant: Arc<str>,
    pub(crate) changes: Vec<Change>,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Expired idempotency records deleted.
    pub idempotency_records: usize,
    /// Changes deleted from the front of the feeds.
    pub changes: usize,
}

/// What realtime sessions hear from the store.
#[derive(Debug, Clone)]
pub(crate) enum FeedEvent {
    /// The changes of one commit made by this instance, in cursor order.
    Committed(Arc<TenantChanges>),
    /// The feed of this tenant (of every tenant for `None`) may have grown
    /// elsewhere: read it from the database. The database is the truth; a
    /// doorbell only says when to look.
    Doorbell(Option<Arc<str>>),
}

impl FeedEvent {
    /// Whether a session of `tenant` should look at this event.
    pub(crate) fn concerns(&self, tenant: &str) -> bool {
        match self {
            FeedEvent::Committed(tc) => *tc.tenant == *tenant,
            FeedEvent::Doorbell(t) => t.as_deref().is_none_or(|t| t == tenant),
        }
    }
}

/// Where the database lives.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Storage {
    /// A SQLite file in WAL mode.
    File(PathBuf),
    /// An in-memory database, lost at shutdown.
    Memory,
    /// A PostgreSQL database (`postgres://user@host:port/dbname`), which
    /// several server instances may share.
    Postgres(String),
}

impl std::fmt::Debug for Storage {
    // The URL may carry a password: it never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::File(p) => f.debug_tuple("File").field(p).finish(),
            Storage::Memory => f.write_str("Memory"),
            Storage::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// Settings the store needs.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    pub(crate) storage: Storage,
    pub(crate) synchronous: Synchronous,
    pub(crate) idempotency_retention_ms: i64,
    pub(crate) feed_retention_ms: i64,
    pub(crate) require_if_match: bool,
    /// Whether applied mutations are logged (see [`AppliedMutation`]).
    pub(crate) applied_log: bool,
    /// How long a request may take (the PostgreSQL store bounds its
    /// statements and transactions by it).
    pub(crate) request_timeout: Duration,
    pub(crate) clock: SharedClock,
    /// Called while mutations are applied (fault injection).
    pub(crate) hooks: Arc<dyn StoreHooks>,
}

/// The feed page bound ([`guardian_protocol::FEED_PAGE_DATA_BYTES`]): a
/// page as long as a client may ask for, of the largest entities, would
/// otherwise be read into memory whole, for one request or one realtime
/// backlog page.
pub(crate) const PAGE_MAX_DATA_BYTES: usize = guardian_protocol::FEED_PAGE_DATA_BYTES;

/// One storage implementation. Every method is one unit of work against
/// the database; [`Backend::apply`] is one atomic commit per request (or per
/// group of requests) that writes each applied op's entity, change,
/// applied-log row and idempotency record together.
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    /// Applies mutations in order in one transaction and returns one outcome
    /// each. A replay or refusal writes nothing; an applied op writes the
    /// entity, a change, an applied-log row and its idempotency record.
    /// Outcomes are returned only after the commit.
    fn apply(&self, tenant: Arc<str>, inputs: Vec<MutationInput>) -> Answer<'_, Vec<OpOutcome>>;

    /// Applies an atomic transaction in one database transaction: all of
    /// its ops, or (at the first refused op) none; see
    /// `apply::apply_transaction`. Answered only after the commit.
    fn apply_transaction(
        &self,
        tenant: Arc<str>,
        txn: TransactionInput,
    ) -> Answer<'_, TransactionOutcome>;

    /// The entity (tombstones included), if it ever existed.
    fn get(&self, tenant: Arc<str>, entity_type: String, id: String) -> Answer<'_, Option<Entity>>;

    /// A page of the tenant's feed after `since`, with its head, read from
    /// one snapshot: at most `limit` changes, ending with the one whose
    /// data takes the page past [`PAGE_MAX_DATA_BYTES`] (so never empty
    /// while changes are left). With `holds`, the retained change at
    /// `since` must be the one it names (`feed::check_since`).
    fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        holds: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Answer<'_, Feed<ChangesPage>>;

    /// The tenant's latest cursor, or a refusal if `since` (with the
    /// change it `holds`, as for [`Backend::changes`]) is not servable.
    fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
        holds: Option<ChangeFingerprint>,
    ) -> Answer<'_, Feed<u64>>;

    /// Every applied mutation, in order.
    fn applied_log(&self) -> Answer<'_, Vec<AppliedMutation>>;

    /// Deletes expired idempotency records and changes older than the feed
    /// retention.
    fn purge_expired(&self) -> Answer<'_, PurgeReport>;

    /// Receives the feed events after this call.
    fn subscribe(&self) -> broadcast::Receiver<FeedEvent>;
}

/// What a [`Backend`] call answers, later.
pub(crate) type Answer<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// A feed read's answer: what was asked, or why the cursor is not servable.
pub(crate) type Feed<T> = Result<T, FeedRefusal>;

/// Capacity of the realtime broadcast, in events; a session that falls
/// further behind re-reads the feed from the database, so this only bounds
/// memory.
const BROADCAST_CAPACITY: usize = 4096;

/// The server's storage handle (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    /// Opens the storage `opts` names (creating or migrating its schema).
    pub(crate) async fn open(opts: StoreOptions) -> Result<Self, StoreError> {
        let backend: Arc<dyn Backend> = match &opts.storage {
            Storage::File(_) | Storage::Memory => Arc::new(
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(opts))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??,
            ),
            Storage::Postgres(url) => {
                let url = url.clone();
                Arc::new(postgres::PgStore::open(&url, opts).await?)
            }
        };
        Ok(Self { backend })
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend + 'static;

    fn deref(&self) -> &(dyn Backend + 'static) {
        &*self.backend
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SQLite stores signed 64-bit integers; versions and cursors never reach 2^63.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
