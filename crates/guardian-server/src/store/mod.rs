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
mod entities;
mod feed;
mod idempotency;
mod postgres;
mod schema;
mod sqlite;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;
use guardian_protocol::{Change, ChangesPage, Entity, MutationKind};
use serde_json::Value;
use tokio::sync::broadcast;

pub use applied::AppliedMutation;
pub(crate) use entities::Decision;
pub(crate) use feed::FeedRefusal;
pub(crate) use idempotency::{canonical, fingerprint, fingerprint_data};
pub use schema::Synchronous;

use crate::clock::SharedClock;
use crate::problem::ApiError;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or could not be reached.
    #[error("postgres error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    #[error("postgres pool: {0}")]
    Pool(String),
    /// The PostgreSQL URL is invalid.
    #[error("invalid postgres url: {0}")]
    Url(String),
    /// The database directory could not be created.
    #[error("cannot create the database directory: {0}")]
    Io(std::io::Error),
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
    /// Fault: a concurrent writer bumps the entity just before this op.
    pub(crate) force_conflict: bool,
    /// A batch op's `depends_on`: an earlier op of the same request that
    /// must have succeeded before this one is applied.
    pub(crate) dependency: Option<Dependency>,
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
    /// What a dependent op gets given the result of the op it depends on:
    /// `Ok(precondition)` to go ahead (the precondition only replaces the
    /// op's own when chained), or the 424 result when the earlier op did not
    /// succeed (a non-2xx status, whatever it was).
    pub(crate) fn resolve(
        &self,
        earlier: &OpResult,
        own: Option<Precondition>,
    ) -> Result<Option<Precondition>, OpResult> {
        if !(200..300).contains(&earlier.status) {
            return Err(OpResult::problem(&dependency_failed(self.batch_index)));
        }
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

/// The 424 problem of an op whose dependency did not succeed.
pub(crate) fn dependency_failed(batch_index: u32) -> ApiError {
    ApiError::new(
        guardian_protocol::problem_type::DEPENDENCY_FAILED,
        424,
        "Dependency failed",
        format!(
            "op {batch_index} of this batch, which this op depends on, did not succeed; \
             this op was not applied and its key was not recorded: send it again after that op"
        ),
    )
}

/// The response to one mutation, as a single request would get it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OpResult {
    pub(crate) status: u16,
    /// JSON text: the entity for 200/201, `null` for 204, a problem document
    /// otherwise. Object keys are sorted (as `serde_json::Value` prints them),
    /// so a replay from the store is byte for byte the first answer.
    pub(crate) body: String,
    pub(crate) replayed: bool,
    /// The entity version in the body, for the `ETag` of single requests.
    pub(crate) version: Option<u64>,
    /// A 409 `idempotency:in-flight` problem (single requests get
    /// `Retry-After: 1`).
    pub(crate) in_flight: bool,
}

impl OpResult {
    pub(crate) fn problem(e: &ApiError) -> Self {
        Self {
            status: e.status(),
            body: serde_json::to_value(&e.problem)
                .unwrap_or(Value::Null)
                .to_string(),
            replayed: false,
            version: None,
            in_flight: e.problem.problem_type
                == guardian_protocol::problem_type::IDEMPOTENCY_IN_FLIGHT,
        }
    }

    /// A 200 answer carrying `entity` (a GET).
    pub(crate) fn entity(entity: &Entity) -> Self {
        Self {
            status: 200,
            body: serde_json::to_value(entity)
                .unwrap_or(Value::Null)
                .to_string(),
            replayed: false,
            version: Some(entity.version),
            in_flight: false,
        }
    }

    /// A response replayed from the idempotency store.
    pub(crate) fn replay(stored: idempotency::StoredResponse) -> Result<Self, StoreError> {
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: Option<u64>,
        }
        // Validates the stored text too: it is spliced into responses as is.
        let body: Value = serde_json::from_str(&stored.body)
            .map_err(|e| StoreError::Corrupt(format!("stored response is not JSON: {e}")))?;
        let version = match body {
            Value::Object(_) => serde_json::from_value::<Versioned>(body)
                .ok()
                .and_then(|v| v.version),
            _ => None,
        };
        Ok(Self {
            status: stored.status,
            body: stored.body,
            replayed: true,
            version,
            in_flight: false,
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
    pub(crate) clock: SharedClock,
}

/// One storage implementation. Every method is one unit of work against
/// the database; [`Backend::apply`] is one atomic commit per request (or per
/// group of requests) that writes each applied op's entity, change,
/// applied-log row and idempotency record together.
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    /// Applies mutations in order in one transaction and returns one result
    /// each. A replay or refusal writes nothing; an applied op writes the
    /// entity, a change, an applied-log row and its idempotency record.
    /// Results are returned only after the commit.
    fn apply(
        &self,
        tenant: Arc<str>,
        inputs: Vec<MutationInput>,
    ) -> BoxFuture<'_, Result<Vec<OpResult>, StoreError>>;

    /// The entity (tombstones included), if it ever existed.
    fn get(
        &self,
        tenant: Arc<str>,
        entity_type: String,
        id: String,
    ) -> BoxFuture<'_, Result<Option<Entity>, StoreError>>;

    /// A page of the tenant's feed after `since`, with its head, read from
    /// one snapshot.
    fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Result<ChangesPage, FeedRefusal>, StoreError>>;

    /// The tenant's latest cursor, or a refusal if `since` is not servable.
    fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
    ) -> BoxFuture<'_, Result<Result<u64, FeedRefusal>, StoreError>>;

    /// Every applied mutation, in order.
    fn applied_log(&self) -> BoxFuture<'_, Result<Vec<AppliedMutation>, StoreError>>;

    /// Deletes expired idempotency records and changes older than the feed
    /// retention.
    fn purge_expired(&self) -> BoxFuture<'_, Result<PurgeReport, StoreError>>;

    /// Receives the feed events after this call.
    fn subscribe(&self) -> broadcast::Receiver<FeedEvent>;
}

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

    /// Receives the feed events after this call.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.backend.subscribe()
    }

    /// See [`Backend::apply`].
    pub(crate) async fn apply(
        &self,
        tenant: Arc<str>,
        inputs: Vec<MutationInput>,
    ) -> Result<Vec<OpResult>, StoreError> {
        self.backend.apply(tenant, inputs).await
    }

    /// See [`Backend::get`].
    pub(crate) async fn get(
        &self,
        tenant: Arc<str>,
        entity_type: String,
        id: String,
    ) -> Result<Option<Entity>, StoreError> {
        self.backend.get(tenant, entity_type, id).await
    }

    /// See [`Backend::changes`].
    pub(crate) async fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        limit: usize,
    ) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
        self.backend.changes(tenant, since, limit).await
    }

    /// See [`Backend::check_since`].
    pub(crate) async fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
    ) -> Result<Result<u64, FeedRefusal>, StoreError> {
        self.backend.check_since(tenant, since).await
    }

    /// See [`Backend::applied_log`].
    pub(crate) async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        self.backend.applied_log().await
    }

    /// See [`Backend::purge_expired`].
    pub(crate) async fn purge_expired(&self) -> Result<PurgeReport, StoreError> {
        self.backend.purge_expired().await
    }
}

/// The key of the `n`th change made by the forced-conflict fault in this
/// server instance (not a client's key; unique per instance only).
pub(crate) fn fault_key(n: u64) -> String {
    format!("fault:conflict:{n}")
}

fn mismatch(key: &str) -> ApiError {
    ApiError::new(
        guardian_protocol::problem_type::IDEMPOTENCY_MISMATCH,
        422,
        "Idempotency key reused",
        format!(
            "idempotency key {key:?} was used before with another method, path or body; \
             use a new key for a different request"
        ),
    )
}

/// A problem document from a feed refusal.
pub(crate) fn feed_problem(refusal: &FeedRefusal) -> ApiError {
    match *refusal {
        FeedRefusal::Expired {
            since,
            purged_through,
            last,
        } => ApiError::cursor_expired(
            format!(
                "cursor {since} is older than the retained feed (changes through \
                 {purged_through} were purged); resync from scratch"
            ),
            last,
        ),
        FeedRefusal::Ahead { since, last } => ApiError::cursor_expired(
            format!(
                "cursor {since} is ahead of this server's feed (latest {last}); the server \
                 lost its data or this is another server: resync from scratch"
            ),
            last,
        ),
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
