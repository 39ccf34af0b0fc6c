//! Storage: entities, idempotency records, change feed and applied log in one
//! SQLite database (a file in WAL mode, or in memory).
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool with
//! the one connection behind a mutex; tokio workers never wait on disk. The
//! mutex also serializes mutations, which is what makes the feed's broadcast
//! order equal to cursor order: changes are published after the commit while
//! the connection is still held.

mod applied;
mod entities;
mod feed;
mod idempotency;
mod schema;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use guardian_protocol::{Change, ChangesPage, Entity, MutationKind};
use rusqlite::{CachedStatement, Connection, Transaction};
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};

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
    fn replay(stored: idempotency::StoredResponse) -> Result<Self, StoreError> {
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

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Storage {
    /// A SQLite file in WAL mode.
    File(PathBuf),
    /// An in-memory database, lost at shutdown.
    Memory,
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

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    opts: StoreOptions,
    changes_tx: broadcast::Sender<Arc<TenantChanges>>,
    fault_seq: std::sync::atomic::AtomicU64,
    writes: Mutex<WriteQueue>,
}

/// One request's mutations waiting for the writer.
#[derive(Debug)]
struct WriteJob {
    tenant: Arc<str>,
    inputs: Vec<MutationInput>,
    reply: oneshot::Sender<Result<Vec<OpResult>, StoreError>>,
}

/// Mutation requests waiting for the writer, and whether a writer is
/// running (at most one: it drains the queue, then stops).
#[derive(Debug, Default)]
struct WriteQueue {
    jobs: VecDeque<WriteJob>,
    writer_active: bool,
}

/// A group commit takes queued requests up to this many ops (at least one
/// request, whatever its size).
const GROUP_MAX_OPS: usize = 1000;

/// The server's storage handle (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

/// Capacity of the realtime broadcast, in commits; a session that falls
/// further behind re-reads the feed from the database, so this only bounds
/// memory.
const BROADCAST_CAPACITY: usize = 4096;

impl Store {
    pub(crate) fn open(opts: StoreOptions) -> Result<Self, StoreError> {
        let path = match &opts.storage {
            Storage::File(p) => Some(p.as_path()),
            Storage::Memory => None,
        };
        let conn = schema::open(path, opts.synchronous)?;
        let (changes_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                opts,
                changes_tx,
                fault_seq: std::sync::atomic::AtomicU64::new(0),
                writes: Mutex::new(WriteQueue::default()),
            }),
        })
    }

    /// Receives the changes of every commit after this call.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<TenantChanges>> {
        self.inner.changes_tx.subscribe()
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection, &Inner) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&inner.conn);
            f(&mut conn, &inner)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Applies mutations in order in one transaction and returns one result
    /// each. A replay or refusal writes nothing; an applied op writes the
    /// entity, a change, an applied-log row and its idempotency record.
    ///
    /// Group commit: concurrent requests queue up and one writer on the
    /// blocking pool applies the queued requests in one transaction, each
    /// inside its own savepoint (a request that fails is rolled back alone
    /// and gets its error; the others are unaffected). Every request's
    /// result is sent only after the commit, so nothing is acknowledged
    /// before it is durable, and a failed commit fails the whole group with
    /// nothing applied.
    pub(crate) async fn apply(
        &self,
        tenant: Arc<str>,
        inputs: Vec<MutationInput>,
    ) -> Result<Vec<OpResult>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = WriteJob {
            tenant,
            inputs,
            reply,
        };
        let start_writer = {
            let mut q = lock(&self.inner.writes);
            q.jobs.push_back(job);
            !std::mem::replace(&mut q.writer_active, true)
        };
        if start_writer {
            let inner = Arc::clone(&self.inner);
            // Not awaited: the writer outlives this request if it has to.
            drop(tokio::task::spawn_blocking(move || write_loop(&inner)));
        }
        rx.await
            .map_err(|_| StoreError::Task("the database writer stopped".into()))?
    }

    /// The entity (tombstones included), if it ever existed.
    pub(crate) async fn get(
        &self,
        tenant: Arc<str>,
        entity_type: String,
        id: String,
    ) -> Result<Option<Entity>, StoreError> {
        self.run(move |conn, _| entities::load_entity(conn, &tenant, &entity_type, &id))
            .await
    }

    /// A page of the tenant's feed after `since`.
    pub(crate) async fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        limit: usize,
    ) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
        self.run(move |conn, _| {
            let tx = conn.transaction()?;
            let head = match feed::check_since(&tx, &tenant, since)? {
                Ok(last) => last,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let changes = feed::read(&tx, &tenant, since, limit)?;
            let next = changes.last().map_or(since, |c| c.cursor);
            Ok(Ok(ChangesPage {
                changes,
                next,
                head: Some(head),
            }))
        })
        .await
    }

    /// The tenant's latest cursor, or a refusal if `since` is not servable.
    pub(crate) async fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
    ) -> Result<Result<u64, FeedRefusal>, StoreError> {
        self.run(move |conn, _| match since {
            Some(s) => feed::check_since(conn, &tenant, s),
            None => Ok(Ok(feed::counters(conn, &tenant)?.0)),
        })
        .await
    }

    /// Every applied mutation, in order.
    pub(crate) async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        self.run(|conn, _| applied::read_all(conn)).await
    }

    /// Deletes expired idempotency records and changes older than the feed
    /// retention.
    pub(crate) async fn purge_expired(&self) -> Result<PurgeReport, StoreError> {
        self.run(|conn, inner| {
            let now = inner.opts.clock.now_millis();
            let tx = conn.transaction()?;
            let report = PurgeReport {
                idempotency_records: idempotency::purge(
                    &tx,
                    now.saturating_sub(inner.opts.idempotency_retention_ms),
                )?,
                changes: feed::purge(&tx, now.saturating_sub(inner.opts.feed_retention_ms))?,
            };
            tx.commit()?;
            Ok(report)
        })
        .await
    }
}

/// Stops the writer if it unwinds, failing the requests still queued
/// (their callers get an error instead of waiting forever).
struct WriterGuard<'a>(&'a Inner);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = lock(&self.0.writes);
            q.jobs.clear();
            q.writer_active = false;
        }
    }
}

/// The writer: takes groups of queued requests and commits each group in
/// one transaction until the queue is empty.
fn write_loop(inner: &Inner) {
    let _guard = WriterGuard(inner);
    loop {
        let group = {
            let mut q = lock(&inner.writes);
            if q.jobs.is_empty() {
                q.writer_active = false;
                return;
            }
            let mut group = Vec::new();
            let mut ops = 0;
            while let Some(job) = q.jobs.front() {
                if !group.is_empty() && ops + job.inputs.len() > GROUP_MAX_OPS {
                    break;
                }
                ops += job.inputs.len();
                group.extend(q.jobs.pop_front());
            }
            group
        };
        let mut conn = lock(&inner.conn);
        commit_group(&mut conn, inner, group);
    }
}

/// Applies one group of requests in one transaction, then broadcasts the
/// changes (still holding the connection, so broadcast order is cursor
/// order) and answers every request.
fn commit_group(conn: &mut Connection, inner: &Inner, group: Vec<WriteJob>) {
    let mut replies = Vec::with_capacity(group.len());
    let mut work = Vec::with_capacity(group.len());
    for job in group {
        replies.push((Arc::clone(&job.tenant), job.reply));
        work.push((job.tenant, job.inputs));
    }
    let single = work.len() == 1;
    let committed = (|| -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let tx = conn.transaction()?;
        let mut outcomes = Vec::with_capacity(work.len());
        for (tenant, inputs) in work {
            // A lone request needs no savepoint: its failure is the
            // transaction's.
            if single {
                outcomes.push(Ok(apply_all(&tx, inner, &tenant, inputs)?));
                continue;
            }
            tx.prepare_cached("SAVEPOINT request")?.execute([])?;
            match apply_all(&tx, inner, &tenant, inputs) {
                Ok(done) => {
                    tx.prepare_cached("RELEASE request")?.execute([])?;
                    outcomes.push(Ok(done));
                }
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO request; RELEASE request")?;
                    outcomes.push(Err(e));
                }
            }
        }
        tx.commit()?;
        Ok(outcomes)
    })();
    match committed {
        Ok(outcomes) => {
            for ((tenant, reply), outcome) in replies.into_iter().zip(outcomes) {
                let outcome = outcome.map(|(results, changes)| {
                    if !changes.is_empty() {
                        // One message per request; no receiver is fine.
                        let _ = inner
                            .changes_tx
                            .send(Arc::new(TenantChanges { tenant, changes }));
                    }
                    results
                });
                let _ = reply.send(outcome);
            }
        }
        Err(e) if single => {
            if let Some((_, reply)) = replies.pop() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, requests = replies.len(), "group commit failed");
            let msg = e.to_string();
            for (_, reply) in replies {
                let _ = reply.send(Err(StoreError::Commit(msg.clone())));
            }
        }
    }
}

/// The statements of a write transaction, prepared (or fetched from the
/// cache) once per transaction rather than once per op.
struct Statements<'c> {
    lookup: CachedStatement<'c>,
    load: CachedStatement<'c>,
    save: CachedStatement<'c>,
    change: CachedStatement<'c>,
    applied: CachedStatement<'c>,
    store: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    fn prepare(tx: &'c Transaction<'_>) -> Result<Self, StoreError> {
        Ok(Self {
            lookup: tx.prepare_cached(idempotency::LOOKUP_SQL)?,
            load: tx.prepare_cached(entities::LOAD_SQL)?,
            save: tx.prepare_cached(entities::SAVE_SQL)?,
            change: tx.prepare_cached(feed::APPEND_SQL)?,
            applied: tx.prepare_cached(applied::APPEND_SQL)?,
            store: tx.prepare_cached(idempotency::STORE_SQL)?,
        })
    }
}

/// The body of [`Store::apply`] inside its transaction: the results, and
/// the changes to broadcast after the commit.
type Applied = (Vec<OpResult>, Vec<Change>);

fn apply_all(
    tx: &Transaction<'_>,
    inner: &Inner,
    tenant: &str,
    inputs: Vec<MutationInput>,
) -> Result<Applied, StoreError> {
    let now = inner.opts.clock.now_millis();
    let not_before = now.saturating_sub(inner.opts.idempotency_retention_ms);
    let updated_at = crate::clock::format_rfc3339(now);
    let mut st = Statements::prepare(tx)?;
    let mut cursors = feed::Cursors::default();
    let mut results = Vec::with_capacity(inputs.len());
    let mut changes = Vec::new();
    for mut input in inputs {
        if let Some(dep) = &input.dependency {
            // Resolved from the earlier op's result in this request: it was
            // applied, replayed or refused just now, in this transaction.
            let resolved = match results.get(dep.on) {
                Some(earlier) => dep.resolve(earlier, input.if_match),
                None => Err(OpResult::problem(&dependency_failed(dep.batch_index))),
            };
            match resolved {
                Ok(precondition) => input.if_match = precondition,
                Err(failed) => {
                    // Not applied and nothing stored: the key stays new.
                    results.push(failed);
                    continue;
                }
            }
        }
        if let Some(stored) = idempotency::lookup(&mut st.lookup, tenant, &input.key, not_before)? {
            results.push(if stored.fingerprint == input.fingerprint {
                OpResult::replay(stored)?
            } else {
                OpResult::problem(&mismatch(&input.key))
            });
            continue;
        }
        let mut current = entities::load(&mut st.load, tenant, &input.entity_type, &input.id)?;
        if input.force_conflict {
            if let Some((row, change)) = concurrent_writer(
                tx,
                &mut st,
                &mut cursors,
                inner,
                tenant,
                &input,
                current.as_ref(),
                now,
            )? {
                changes.push(change);
                current = Some(row);
            }
        }
        let (version, deleted, status) =
            match entities::decide(current.as_ref(), &input, inner.opts.require_if_match) {
                Decision::Refuse(e) => {
                    results.push(OpResult::problem(&e));
                    continue;
                }
                Decision::RefuseWithCurrent(e) => {
                    let current = match &current {
                        Some(row) => Some(row.to_entity(&input.entity_type, &input.id)?),
                        None => None,
                    };
                    let e = match current {
                        Some(c) => e.with_current(c),
                        None => e,
                    };
                    results.push(OpResult::problem(&e));
                    continue;
                }
                Decision::Apply {
                    version,
                    deleted,
                    status,
                } => (version, deleted, status),
            };
        let MutationInput {
            key,
            fingerprint,
            kind,
            entity_type,
            id,
            data,
            data_json,
            ..
        } = input;
        let (data, data_json) = if deleted {
            (Value::Null, "null".to_owned())
        } else {
            (data, data_json)
        };
        let row = entities::Row {
            version,
            deleted,
            updated_at_ms: now,
            data: data_json,
        };
        entities::save(&mut st.save, tenant, &entity_type, &id, &row)?;
        let cursor = cursors.next(tx, tenant)?;
        feed::append(
            &mut st.change,
            tenant,
            cursor,
            kind,
            &entity_type,
            &id,
            version,
            &row.data,
            now,
        )?;
        applied::append(
            &mut st.applied,
            tenant,
            &key,
            &entity_type,
            &id,
            kind,
            version,
            cursor,
            now,
        )?;
        let body = if status == 204 {
            "null".to_owned()
        } else {
            entities::entity_json(&entity_type, &id, version, &row.data, &updated_at, deleted)
        };
        idempotency::store(
            &mut st.store,
            tenant,
            &key,
            &fingerprint,
            status,
            &body,
            now,
        )?;
        changes.push(Change {
            cursor,
            op: kind,
            entity_type,
            id,
            version,
            data,
        });
        results.push(OpResult {
            status,
            body,
            replayed: false,
            version: Some(version),
            in_flight: false,
        });
    }
    drop(st);
    cursors.finish(tx, tenant)?;
    Ok((results, changes))
}

/// The forced-conflict fault: another writer updates the live entity (same
/// data, version + 1) just before the op, so a conditional op conflicts for
/// real. Returns the bumped row and its change.
#[allow(clippy::too_many_arguments)]
fn concurrent_writer(
    tx: &Transaction<'_>,
    st: &mut Statements<'_>,
    cursors: &mut feed::Cursors,
    inner: &Inner,
    tenant: &str,
    input: &MutationInput,
    current: Option<&entities::Row>,
    now: i64,
) -> Result<Option<(entities::Row, Change)>, StoreError> {
    let Some(cur) = current.filter(|r| !r.deleted) else {
        return Ok(None);
    };
    let (entity_type, id) = (input.entity_type.as_str(), input.id.as_str());
    let bumped = entities::Row {
        version: cur.version + 1,
        deleted: false,
        updated_at_ms: now,
        data: cur.data.clone(),
    };
    let data: Value = serde_json::from_str(&bumped.data)
        .map_err(|e| StoreError::Corrupt(format!("entity data is not JSON: {e}")))?;
    entities::save(&mut st.save, tenant, entity_type, id, &bumped)?;
    let cursor = cursors.next(tx, tenant)?;
    feed::append(
        &mut st.change,
        tenant,
        cursor,
        MutationKind::Update,
        entity_type,
        id,
        bumped.version,
        &bumped.data,
        now,
    )?;
    let n = inner
        .fault_seq
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    applied::append(
        &mut st.applied,
        tenant,
        &format!("fault:conflict:{n}"),
        entity_type,
        id,
        MutationKind::Update,
        bumped.version,
        cursor,
        now,
    )?;
    let change = Change {
        cursor,
        op: MutationKind::Update,
        entity_type: entity_type.to_owned(),
        id: id.to_owned(),
        version: bumped.version,
        data,
    };
    Ok(Some((bumped, change)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use serde_json::json;

    fn store() -> Store {
        Store::open(StoreOptions {
            storage: Storage::Memory,
            synchronous: Synchronous::Full,
            idempotency_retention_ms: 60_000,
            feed_retention_ms: 60_000,
            require_if_match: false,
            clock: ManualClock::new(1_700_000_000_000),
        })
        .unwrap()
    }

    fn create(key: &str, id: &str) -> MutationInput {
        let data = json!({"k": key});
        let data_json = canonical(&data);
        MutationInput {
            key: key.into(),
            fingerprint: fingerprint(MutationKind::Create, "device", id, &data_json),
            kind: MutationKind::Create,
            entity_type: "device".into(),
            id: id.into(),
            data,
            data_json,
            if_match: None,
            force_conflict: false,
            dependency: None,
        }
    }

    fn job(
        tenant: &str,
        inputs: Vec<MutationInput>,
    ) -> (
        WriteJob,
        oneshot::Receiver<Result<Vec<OpResult>, StoreError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let job = WriteJob {
            tenant: Arc::from(tenant),
            inputs,
            reply,
        };
        (job, rx)
    }

    /// A request of a group that fails is rolled back alone (its earlier
    /// ops too) and gets its error; the others commit, with gap-free cursors.
    #[test]
    fn a_failing_request_of_a_group_leaves_no_trace() {
        let store = store();
        let inner = &store.inner;
        let mut conn = lock(&inner.conn);
        // A stored response that is not JSON: replaying it fails.
        let bad = create("bad", "y");
        conn.execute(
            "INSERT INTO idempotency (tenant, key, fingerprint, status, body, created_at)
             VALUES ('t', 'bad', ?1, 201, 'not json', 1700000000000)",
            [&bad.fingerprint[..]],
        )
        .unwrap();
        let mut rx = store.subscribe();
        let (a, a_rx) = job("t", vec![create("k1", "x"), bad]);
        let (b, b_rx) = job("t", vec![create("k2", "z")]);
        let (c, c_rx) = job("u", vec![create("k3", "x")]);
        commit_group(&mut conn, inner, vec![a, b, c]);
        assert!(matches!(
            a_rx.blocking_recv().unwrap(),
            Err(StoreError::Corrupt(_))
        ));
        let b = b_rx.blocking_recv().unwrap().unwrap();
        assert_eq!((b[0].status, b[0].version), (201, Some(1)));
        let c = c_rx.blocking_recv().unwrap().unwrap();
        assert_eq!(c[0].status, 201);
        assert!(entities::load_entity(&conn, "t", "device", "x")
            .unwrap()
            .is_none());
        assert!(entities::load_entity(&conn, "t", "device", "z")
            .unwrap()
            .is_some());
        let applied = applied::read_all(&conn).unwrap();
        let keys: Vec<_> = applied.iter().map(|a| a.idempotency_key.as_str()).collect();
        assert_eq!(keys, ["k2", "k3"]);
        assert_eq!(feed::counters(&conn, "t").unwrap().0, 1);
        let feed = feed::read(&conn, "t", 0, 10).unwrap();
        assert_eq!(
            feed.iter()
                .map(|c| (c.cursor, c.id.as_str()))
                .collect::<Vec<_>>(),
            [(1, "z")]
        );
        // One broadcast per committed request, in order.
        let first = rx.try_recv().unwrap();
        assert_eq!((&*first.tenant, first.changes[0].id.as_str()), ("t", "z"));
        let second = rx.try_recv().unwrap();
        assert_eq!((&*second.tenant, second.changes[0].cursor), ("u", 1));
        assert!(rx.try_recv().is_err());
    }

    /// A dependency names an earlier input of its own request, whatever
    /// else shares the group; a chained op takes its predecessor's version
    /// (a replay's too), and a failed predecessor stores nothing for it.
    #[test]
    fn dependencies_resolve_within_their_request() {
        let store = store();
        let inner = &store.inner;
        let mut conn = lock(&inner.conn);
        let chained = |key: &str, id: &str, on: usize| {
            let mut input = create(key, id);
            input.kind = MutationKind::Update;
            input.fingerprint = fingerprint(MutationKind::Update, "device", id, &input.data_json);
            input.dependency = Some(Dependency {
                on,
                batch_index: u32::try_from(on).unwrap(),
                chained: true,
            });
            input
        };
        let (a, a_rx) = job("t", vec![create("k1", "a"), create("k2", "b")]);
        // In b, input 0 is a replay of k1 (version 1): k3 chains on it.
        let (b, b_rx) = job("t", vec![create("k1", "a"), chained("k3", "a", 0)]);
        // In c, input 0 refuses (exists): k5 gets 424 and is not stored.
        let (c, c_rx) = job(
            "t",
            vec![
                create("k4", "b"),
                chained("k5", "b", 0),
                chained("k6", "b", 1),
            ],
        );
        commit_group(&mut conn, inner, vec![a, b, c]);
        let _ = a_rx.blocking_recv().unwrap().unwrap();
        let b = b_rx.blocking_recv().unwrap().unwrap();
        assert_eq!((b[0].status, b[0].replayed), (201, true));
        assert_eq!((b[1].status, b[1].version), (200, Some(2)));
        let c = c_rx.blocking_recv().unwrap().unwrap();
        let got: Vec<u16> = c.iter().map(|r| r.status).collect();
        assert_eq!(got, [409, 424, 424]);
        assert!(c[1]
            .body
            .contains(guardian_protocol::problem_type::DEPENDENCY_FAILED));
        let stored: i64 = conn
            .query_row(
                "SELECT count(*) FROM idempotency WHERE key IN ('k4', 'k5', 'k6')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 0);
    }

    /// Requests of one tenant in one group get consecutive cursors, and a
    /// key applied earlier in the group replays later in it.
    #[test]
    fn a_group_counts_cursors_across_requests() {
        let store = store();
        let inner = &store.inner;
        let mut conn = lock(&inner.conn);
        let (a, a_rx) = job("t", vec![create("k1", "a"), create("k2", "b")]);
        let (b, b_rx) = job("t", vec![create("k3", "c"), create("k1", "a")]);
        commit_group(&mut conn, inner, vec![a, b]);
        let a = a_rx.blocking_recv().unwrap().unwrap();
        let b = b_rx.blocking_recv().unwrap().unwrap();
        assert!(a.iter().all(|r| r.status == 201 && !r.replayed));
        assert_eq!((b[0].status, b[0].replayed), (201, false));
        assert_eq!((b[1].status, b[1].replayed), (201, true));
        assert_eq!(
            b[1].body, a[0].body,
            "a replay is the first answer, byte for byte"
        );
        let cursors: Vec<u64> = feed::read(&conn, "t", 0, 10)
            .unwrap()
            .iter()
            .map(|c| c.cursor)
            .collect();
        assert_eq!(cursors, [1, 2, 3]);
        assert_eq!(feed::counters(&conn, "t").unwrap().0, 3);
    }
}
