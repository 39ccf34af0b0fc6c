//! The SQLite backend: one connection behind a mutex.
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool with
//! the one connection behind a mutex; tokio workers never wait on disk. The
//! mutex also serializes mutations, which is what makes the feed's broadcast
//! order equal to cursor order: changes are published after the commit while
//! the connection is still held.

use std::sync::{Arc, Mutex};

use futures::FutureExt;
use guardian_protocol::{Change, ChangeFingerprint, ChangesPage, Entity};
use guardian_sqlite::wal_prefill::WalPrefill;
use rusqlite::{params, CachedStatement, Connection, Transaction};
use tokio::sync::{broadcast, oneshot};

use super::apply::{apply_work, KeptResponse, RowWrite, WriteTx};
use super::entities::Row;
use super::idempotency::StoredResponse as Stored;
use super::write_queue::{Queued, WriteQueue};
use super::{
    applied, entities, feed, idempotency, lock, schema, to_i64, Answer, AppliedMutation, Backend,
    Cutoff, Feed, FeedEvent, FeedRefusal, MutationInput, OpOutcome, PurgeReport, Storage,
    StoreError, StoreOptions, TenantChanges, TransactionInput, TransactionOutcome, Work, WorkDone,
    BROADCAST_CAPACITY,
};

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    opts: StoreOptions,
    changes_tx: broadcast::Sender<FeedEvent>,
    writes: Mutex<WriteQueue<WriteJob>>,
    /// Preallocates a database file's WAL after the first commits (nothing
    /// to do in memory); only the writer uses it.
    prefill: Mutex<WalPrefill>,
}

/// One request's mutations waiting for the writer.
#[derive(Debug)]
struct WriteJob {
    tenant: Arc<str>,
    inputs: Work,
    reply: oneshot::Sender<Reply>,
}

/// A request's result, and its change event if no realtime session took
/// it: freed by the waiting request instead of on the writer thread, which
/// every mutation waits for.
type Reply = (Result<WorkDone, StoreError>, Option<FeedEvent>);

impl Queued for WriteJob {
    fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
    fn ops(&self) -> usize {
        self.inputs.len()
    }
}

/// A group commit takes queued requests up to this many ops (at least one
/// request, whatever its size).
const GROUP_MAX_OPS: usize = 1000;

/// Most bytes of WAL preallocated after one group commit: the full WAL is
/// tens of MiB (`schema::WAL_AUTOCHECKPOINT_PAGES`), too much for the
/// requests of one group to wait for.
const PREFILL_STEP: u64 = 4 << 20;

/// The SQLite store (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    inner: Arc<Inner>,
}

impl SqliteStore {
    pub(crate) fn open(opts: StoreOptions) -> Result<Self, StoreError> {
        let path = match &opts.storage {
            Storage::File(p) => Some(p.as_path()),
            Storage::Memory => None,
            Storage::Postgres(_) => {
                return Err(StoreError::Corrupt(
                    "a PostgreSQL URL was given to the SQLite store".into(),
                ))
            }
        };
        let conn = schema::open(path, opts.synchronous)?;
        let prefill = WalPrefill::new("server", &conn, schema::BUSY_TIMEOUT, PREFILL_STEP);
        let (changes_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                opts,
                changes_tx,
                writes: Mutex::new(WriteQueue::default()),
                prefill: Mutex::new(prefill),
            }),
        })
    }

    /// Receives the changes of every commit after this call.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
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
    ) -> Result<Vec<OpOutcome>, StoreError> {
        self.submit(tenant, Work::Ops(inputs)).await?.into_ops()
    }

    /// Applies an atomic transaction (see [`Backend::apply_transaction`]),
    /// in a group commit like any request, inside a savepoint of its own.
    pub(crate) async fn apply_transaction(
        &self,
        tenant: Arc<str>,
        txn: TransactionInput,
    ) -> Result<TransactionOutcome, StoreError> {
        self.submit(tenant, Work::Transaction(txn))
            .await?
            .into_transaction()
    }

    /// Queues one request's work for the writer and waits for its answer.
    async fn submit(&self, tenant: Arc<str>, inputs: Work) -> Result<WorkDone, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = WriteJob {
            tenant,
            inputs,
            reply,
        };
        let start_writer = {
            let mut q = lock(&self.inner.writes);
            q.push(job);
            !std::mem::replace(&mut q.writer_active, true)
        };
        if start_writer {
            let inner = Arc::clone(&self.inner);
            // Not awaited: the writer outlives this request if it has to.
            drop(tokio::task::spawn_blocking(move || write_loop(&inner)));
        }
        let (result, _unsent) = rx
            .await
            .map_err(|_| StoreError::Task("the database writer stopped".into()))?;
        result
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
        holds: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
        self.run(move |conn, _| {
            let tx = conn.transaction()?;
            let head = match feed::check_since(&tx, &tenant, since, holds)? {
                Ok(last) => last,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let changes = feed::read(&tx, &tenant, since, limit, super::PAGE_MAX_DATA_BYTES)?;
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
        holds: Option<ChangeFingerprint>,
    ) -> Result<Result<u64, FeedRefusal>, StoreError> {
        self.run(move |conn, _| match since {
            Some(s) => feed::check_since(conn, &tenant, s, holds),
            None => Ok(Ok(feed::counters(conn, &tenant)?.0)),
        })
        .await
    }

    /// Every applied mutation, in order.
    pub(crate) async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        if !self.inner.opts.applied_log {
            return Err(StoreError::AppliedLogOff);
        }
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
                    Cutoff::kept_for(inner.opts.idempotency_retention_ms, now),
                )?,
                changes: feed::purge(&tx, Cutoff::kept_for(inner.opts.feed_retention_ms, now))?,
            };
            tx.commit()?;
            Ok(report)
        })
        .await
    }
}

impl Backend for SqliteStore {
    fn apply(&self, tenant: Arc<str>, inputs: Vec<MutationInput>) -> Answer<'_, Vec<OpOutcome>> {
        SqliteStore::apply(self, tenant, inputs).boxed()
    }

    fn apply_transaction(
        &self,
        tenant: Arc<str>,
        txn: TransactionInput,
    ) -> Answer<'_, TransactionOutcome> {
        SqliteStore::apply_transaction(self, tenant, txn).boxed()
    }

    fn get(&self, tenant: Arc<str>, entity_type: String, id: String) -> Answer<'_, Option<Entity>> {
        SqliteStore::get(self, tenant, entity_type, id).boxed()
    }

    fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        holds: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Answer<'_, Feed<ChangesPage>> {
        SqliteStore::changes(self, tenant, since, holds, limit).boxed()
    }

    fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
        holds: Option<ChangeFingerprint>,
    ) -> Answer<'_, Feed<u64>> {
        SqliteStore::check_since(self, tenant, since, holds).boxed()
    }

    fn applied_log(&self) -> Answer<'_, Vec<AppliedMutation>> {
        SqliteStore::applied_log(self).boxed()
    }

    fn purge_expired(&self) -> Answer<'_, PurgeReport> {
        SqliteStore::purge_expired(self).boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        SqliteStore::subscribe(self)
    }
}

/// Stops the writer if it unwinds, failing the requests still queued
/// (their callers get an error instead of waiting forever).
struct WriterGuard<'a>(&'a Inner);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = lock(&self.0.writes);
            q.clear();
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
            if q.is_empty() {
                q.writer_active = false;
                return;
            }
            q.take_group(GROUP_MAX_OPS)
        };
        let mut conn = lock(&inner.conn);
        commit_group(&mut conn, inner, group);
        // After the answers: the fill delays the next group, not this one.
        lock(&inner.prefill).after_commit(&conn);
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
    let committed = (|| -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        let tx = conn.transaction()?;
        let mut outcomes = Vec::with_capacity(work.len());
        // Fetched from the cache once per group, not once per request.
        let mut st = Statements::prepare(&tx)?;
        // Each tenant's cursors over the whole group: its counter row is
        // read once and written once per group, not per request.
        let mut cursors: Vec<(Arc<str>, feed::Cursors)> = Vec::new();
        for (tenant, inputs) in work {
            let at = match cursors.iter().position(|(t, _)| *t == tenant) {
                Some(i) => i,
                None => {
                    cursors.push((Arc::clone(&tenant), feed::Cursors::default()));
                    cursors.len() - 1
                }
            };
            let before = cursors[at].1;
            // A lone request needs no savepoint: its failure is the
            // transaction's.
            if single {
                let (done, after) = apply_all(&tx, &mut st, inner, &tenant, before, inputs)?;
                cursors[at].1 = after;
                outcomes.push(Ok(done));
                continue;
            }
            tx.prepare_cached("SAVEPOINT request")?.execute([])?;
            match apply_all(&tx, &mut st, inner, &tenant, before, inputs) {
                Ok((done, after)) => {
                    tx.prepare_cached("RELEASE request")?.execute([])?;
                    cursors[at].1 = after;
                    outcomes.push(Ok(done));
                }
                Err(e) => {
                    // The cursors it handed out are undone with its rows.
                    tx.execute_batch("ROLLBACK TO request; RELEASE request")?;
                    outcomes.push(Err(e));
                }
            }
        }
        for (tenant, c) in cursors {
            c.finish(&tx, &tenant)?;
        }
        drop(st);
        tx.commit()?;
        Ok(outcomes)
    })();
    match committed {
        Ok(outcomes) => {
            for ((tenant, reply), outcome) in replies.into_iter().zip(outcomes) {
                let answer = match outcome {
                    Ok((results, changes)) if !changes.is_empty() => {
                        // One message per request; no receiver is fine.
                        let event =
                            FeedEvent::Committed(Arc::new(TenantChanges { tenant, changes }));
                        (Ok(results), inner.changes_tx.send(event).err().map(|e| e.0))
                    }
                    Ok((results, _)) => (Ok(results), None),
                    Err(e) => (Err(e), None),
                };
                let _ = reply.send(answer);
            }
        }
        Err(e) if single => {
            if let Some((_, reply)) = replies.pop() {
                let _ = reply.send((Err(e), None));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, requests = replies.len(), "group commit failed");
            let msg = e.to_string();
            for (_, reply) in replies {
                let _ = reply.send((Err(StoreError::Commit(msg.clone())), None));
            }
        }
    }
}

/// The statements of a write transaction, prepared (or fetched from the
/// cache) once per group commit rather than once per request or op.
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

/// The body of [`Store::apply`] inside its transaction: the outcomes, and
/// the changes to broadcast after the commit.
type Done = (WorkDone, Vec<Change>);

/// Applies one request's work; takes the tenant's cursors as the group has
/// left them and returns them as this request leaves them (written back
/// once, before the group's commit).
fn apply_all(
    tx: &Transaction<'_>,
    st: &mut Statements<'_>,
    inner: &Inner,
    tenant: &str,
    cursors: feed::Cursors,
    inputs: Work,
) -> Result<(Done, feed::Cursors), StoreError> {
    let now = inner.opts.clock.now_millis();
    let mut w = SqliteTx {
        tx,
        st,
        cursors,
        saved: None,
        tenant,
        now,
        log_applied: inner.opts.applied_log,
    };
    // Every future of `SqliteTx` is ready at once: this never blocks.
    let applied = futures::executor::block_on(apply_work(&mut w, &inner.opts, now, inputs))?;
    Ok((applied, w.cursors))
}

/// A write transaction of one tenant on the SQLite connection.
struct SqliteTx<'t, 'c, 's> {
    tx: &'t Transaction<'c>,
    st: &'t mut Statements<'s>,
    cursors: feed::Cursors,
    /// The cursors as the open atomic unit found them.
    saved: Option<feed::Cursors>,
    tenant: &'t str,
    now: i64,
    log_applied: bool,
}

impl WriteTx for SqliteTx<'_, '_, '_> {
    async fn lookup(&mut self, key: &str, not_before: i64) -> Result<Option<Stored>, StoreError> {
        idempotency::lookup(&mut self.st.lookup, self.tenant, key, not_before)
    }

    async fn load(&mut self, entity_type: &str, id: &str) -> Result<Option<Row>, StoreError> {
        entities::load(&mut self.st.load, self.tenant, entity_type, id)
    }

    async fn write(&mut self, w: RowWrite<'_>) -> Result<u64, StoreError> {
        let (t, row) = (self.tenant, w.row);
        entities::save(&mut self.st.save, t, w.entity_type, w.id, row)?;
        let cursor = self.cursors.next(self.tx, t)?;
        let (kind, version) = (w.kind.as_str(), to_i64(row.version));
        self.st.change.execute(params![
            t,
            to_i64(cursor),
            kind,
            w.entity_type,
            w.id,
            version,
            row.data,
            self.now
        ])?;
        if self.log_applied {
            self.st.applied.execute(params![
                t,
                w.key,
                w.entity_type,
                w.id,
                kind,
                version,
                to_i64(cursor),
                self.now,
                w.transaction
            ])?;
        }
        Ok(cursor)
    }

    async fn remember(&mut self, r: KeptResponse<'_>) -> Result<(), StoreError> {
        idempotency::store(&mut self.st.store, self.tenant, r, self.now)
    }

    async fn begin_atomic(&mut self) -> Result<(), StoreError> {
        self.tx.prepare_cached("SAVEPOINT atomic")?.execute([])?;
        self.saved = Some(self.cursors);
        Ok(())
    }

    async fn end_atomic(&mut self, keep: bool) -> Result<(), StoreError> {
        let saved = self.saved.take();
        if keep {
            self.tx.prepare_cached("RELEASE atomic")?.execute([])?;
        } else {
            self.tx
                .execute_batch("ROLLBACK TO atomic; RELEASE atomic")?;
            if let Some(c) = saved {
                self.cursors = c;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{
        canonical, fingerprint, Applied, Dependency, NoHooks, Refusal, Synchronous,
    };
    use guardian_protocol::MutationKind;
    use serde_json::json;

    fn store() -> SqliteStore {
        store_with(Arc::new(NoHooks))
    }

    fn store_with(hooks: Arc<dyn crate::store::StoreHooks>) -> SqliteStore {
        open_with(hooks, true)
    }

    fn open_with(hooks: Arc<dyn crate::store::StoreHooks>, applied_log: bool) -> SqliteStore {
        open_at(Storage::Memory, hooks, applied_log)
    }

    fn open_at(
        storage: Storage,
        hooks: Arc<dyn crate::store::StoreHooks>,
        applied_log: bool,
    ) -> SqliteStore {
        SqliteStore::open(StoreOptions {
            storage,
            synchronous: Synchronous::Full,
            idempotency_retention_ms: 60_000,
            feed_retention_ms: 60_000,
            require_if_match: false,
            applied_log,
            request_timeout: std::time::Duration::from_secs(30),
            clock: ManualClock::new(1_700_000_000_000),
            hooks,
        })
        .unwrap()
    }

    /// Hooks that make every concurrent write they are asked about, and
    /// remember which ops they were asked about.
    #[derive(Debug, Default)]
    struct AlwaysConflict {
        asked: Mutex<Vec<String>>,
    }

    impl crate::store::StoreHooks for AlwaysConflict {
        fn concurrent_write(&self, input: &MutationInput) -> bool {
            lock(&self.asked).push(input.key.clone());
            true
        }

        fn concurrent_write_key(&self) -> String {
            "hook:writer".to_owned()
        }
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
            dependency: None,
        }
    }

    /// The outcomes of a request whose every op must have taken effect.
    fn all_applied(outcomes: Vec<OpOutcome>) -> Vec<Applied> {
        outcomes
            .into_iter()
            .map(|o| o.expect("every op applied"))
            .collect()
    }

    type Rx = oneshot::Receiver<Reply>;

    fn job(tenant: &str, inputs: Vec<MutationInput>) -> (WriteJob, Rx) {
        job_of(tenant, Work::Ops(inputs))
    }

    fn job_of(tenant: &str, inputs: Work) -> (WriteJob, Rx) {
        let (reply, rx) = oneshot::channel();
        let job = WriteJob {
            tenant: Arc::from(tenant),
            inputs,
            reply,
        };
        (job, rx)
    }

    /// The outcomes of a job of independent ops.
    fn outcomes(rx: Rx) -> Result<Vec<OpOutcome>, StoreError> {
        rx.blocking_recv().unwrap().0?.into_ops()
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
        assert!(matches!(outcomes(a_rx), Err(StoreError::Corrupt(_))));
        let b = all_applied(outcomes(b_rx).unwrap());
        assert_eq!((b[0].status, b[0].version), (201, Some(1)));
        let c = all_applied(outcomes(c_rx).unwrap());
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
        let feed = feed::read(&conn, "t", 0, 10, usize::MAX).unwrap();
        assert_eq!(
            feed.iter()
                .map(|c| (c.cursor, c.id.as_str()))
                .collect::<Vec<_>>(),
            [(1, "z")]
        );
        // One broadcast per committed request, in order.
        let committed = |e: FeedEvent| match e {
            FeedEvent::Committed(tc) => tc,
            FeedEvent::Doorbell(_) => panic!("SQLite rings no doorbell"),
        };
        let first = committed(rx.try_recv().unwrap());
        assert_eq!((&*first.tenant, first.changes[0].id.as_str()), ("t", "z"));
        let second = committed(rx.try_recv().unwrap());
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
        let _ = outcomes(a_rx).unwrap();
        let b = all_applied(outcomes(b_rx).unwrap());
        assert_eq!((b[0].status, b[0].replayed), (201, true));
        assert_eq!((b[1].status, b[1].version), (200, Some(2)));
        let c = outcomes(c_rx).unwrap();
        assert!(matches!(c[0], Err(Refusal::Exists { .. })));
        assert_eq!(c[1], Err(Refusal::DependencyFailed { batch_index: 0 }));
        assert_eq!(c[2], Err(Refusal::DependencyFailed { batch_index: 1 }));
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
        let a = all_applied(outcomes(a_rx).unwrap());
        let b = all_applied(outcomes(b_rx).unwrap());
        assert!(a.iter().all(|r| r.status == 201 && !r.replayed));
        assert_eq!((b[0].status, b[0].replayed), (201, false));
        assert_eq!((b[1].status, b[1].replayed), (201, true));
        assert_eq!(
            b[1].body, a[0].body,
            "a replay is the first answer, byte for byte"
        );
        let cursors: Vec<u64> = feed::read(&conn, "t", 0, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|c| c.cursor)
            .collect();
        assert_eq!(cursors, [1, 2, 3]);
        assert_eq!(feed::counters(&conn, "t").unwrap().0, 3);
    }

    /// Without the applied-mutations log an applied op writes no log row,
    /// and asking for the log is an error rather than an empty answer.
    #[test]
    fn the_applied_log_can_be_off() {
        let rows = |store: &SqliteStore| -> i64 {
            let inner = &store.inner;
            let mut conn = lock(&inner.conn);
            let (a, a_rx) = job("t", vec![create("k1", "a"), create("k2", "b")]);
            commit_group(&mut conn, inner, vec![a]);
            assert_eq!(all_applied(outcomes(a_rx).unwrap()).len(), 2);
            assert_eq!(feed::counters(&conn, "t").unwrap().0, 2);
            conn.query_row("SELECT count(*) FROM applied", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(rows(&open_with(Arc::new(NoHooks), true)), 2);
        let off = open_with(Arc::new(NoHooks), false);
        assert_eq!(rows(&off), 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(off.applied_log()),
            Err(StoreError::AppliedLogOff)
        ));
    }

    /// A database file's WAL is preallocated, a step per group commit, once
    /// it has grown past the threshold, and stops at the size it wraps at;
    /// what a crash leaves then (the files without the shared-memory index)
    /// holds every committed entity.
    #[test]
    fn the_wal_is_preallocated_after_the_first_commits() {
        use guardian_sqlite::wal_prefill::{target_len, wal_path, START_AFTER};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = open_at(Storage::File(path.clone()), Arc::new(NoHooks), false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let wal_len = || std::fs::metadata(wal_path(&path)).unwrap().len();
        let target = target_len(4096, 10_000);
        let mut created = 0;
        let mut grew = Vec::new();
        while wal_len() < target {
            let before = wal_len();
            let key = format!("k{created}");
            let id = format!("d{created}");
            let done = rt.block_on(store.apply("t".into(), vec![create(&key, &id)]));
            assert_eq!(all_applied(done.unwrap()).len(), 1);
            created += 1;
            if before >= START_AFTER {
                grew.push(wal_len() - before);
            }
            assert!(created < 1_000, "the WAL was never filled");
        }
        assert_eq!(wal_len(), target);
        // A step runs after its group's answers, so it may land while the
        // next request is being made: a request sees at most two.
        assert!(
            grew.iter().all(|&g| g <= 2 * PREFILL_STEP + 64 * 4120),
            "{grew:?}"
        );
        let steps = grew.iter().filter(|&&g| g > 64 * 4120).count();
        assert!(steps >= 4, "filled in too few steps: {grew:?}");
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::copy(wal_path(&path), wal_path(&copy)).unwrap();
        let conn = Connection::open(&copy).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM entities", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, created);
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    /// A transaction that aborts inside a group commit takes back its own
    /// writes only (its cursors included): the requests around it commit
    /// with gap-free cursors, and one that commits logs its key.
    #[test]
    fn an_aborted_transaction_of_a_group_leaves_no_trace() {
        let store = store();
        let inner = &store.inner;
        let mut conn = lock(&inner.conn);
        let (a, a_rx) = job("t", vec![create("k1", "a")]);
        // k3 creates "a" again: refused, so k2 (applied just before) goes too.
        let txn = TransactionInput::new("tx1".into(), vec![create("k2", "b"), create("k3", "a")]);
        let (b, b_rx) = job_of("t", Work::Transaction(txn));
        let (c, c_rx) = job("t", vec![create("k4", "c")]);
        let ok = TransactionInput::new("tx2".into(), vec![create("k5", "d"), create("k6", "e")]);
        let (d, d_rx) = job_of("t", Work::Transaction(ok));
        commit_group(&mut conn, inner, vec![a, b, c, d]);
        outcomes(a_rx).unwrap();
        let aborted = b_rx.blocking_recv().unwrap().0.unwrap().into_transaction();
        assert!(matches!(
            aborted,
            Ok(TransactionOutcome::Aborted {
                failed_op: 1,
                refusal: Refusal::Exists { .. }
            })
        ));
        outcomes(c_rx).unwrap();
        let committed = d_rx.blocking_recv().unwrap().0.unwrap().into_transaction();
        assert!(matches!(
            committed,
            Ok(TransactionOutcome::Committed { .. })
        ));
        let rows: Vec<_> = applied::read_all(&conn)
            .unwrap()
            .into_iter()
            .map(|a| (a.idempotency_key, a.transaction_key, a.cursor))
            .collect();
        let tx2 = Some("tx2".to_owned());
        assert_eq!(
            rows,
            [
                ("k1".to_owned(), None, 1),
                ("k4".to_owned(), None, 2),
                ("k5".to_owned(), tx2.clone(), 3),
                ("k6".to_owned(), tx2, 4),
            ]
        );
        assert!(entities::load_entity(&conn, "t", "device", "b")
            .unwrap()
            .is_none());
        let kept: Vec<String> = conn
            .prepare("SELECT key FROM idempotency ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, ["k1", "k4", "k5", "k6", "tx2"]);
    }

    /// The store asks its hooks about each conditional op only, in op
    /// order, and a concurrent write they ask for lands before the op is
    /// decided: the op conflicts with the bumped version, which is in the
    /// feed and the applied log under the hook's key.
    #[test]
    fn hooks_make_a_concurrent_write_before_a_conditional_op() {
        let hooks = Arc::new(AlwaysConflict::default());
        let store = store_with(Arc::clone(&hooks) as Arc<dyn crate::store::StoreHooks>);
        let inner = &store.inner;
        let mut conn = lock(&inner.conn);
        let mut update = create("k2", "a");
        update.kind = MutationKind::Update;
        update.fingerprint = fingerprint(MutationKind::Update, "device", "a", &update.data_json);
        update.if_match = Some(crate::store::Precondition::Version(1));
        let (j, rx) = job("t", vec![create("k1", "a"), update]);
        commit_group(&mut conn, inner, vec![j]);
        let out = outcomes(rx).unwrap();
        assert_eq!(*lock(&hooks.asked), ["k2"]);
        assert!(out[0].is_ok());
        assert!(matches!(
            &out[1],
            Err(Refusal::VersionConflict {
                expected: 1,
                version: 2,
                current: Some(_),
                ..
            })
        ));
        let keys: Vec<_> = applied::read_all(&conn)
            .unwrap()
            .into_iter()
            .map(|a| (a.idempotency_key, a.version))
            .collect();
        assert_eq!(keys, [("k1".to_owned(), 1), ("hook:writer".to_owned(), 2)]);
    }
}
