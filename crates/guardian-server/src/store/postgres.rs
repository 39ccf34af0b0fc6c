//! The PostgreSQL backend: several server instances share one database.
//!
//! Each request's mutations are one transaction on a pooled connection. The
//! transaction first locks its tenant's row in `guardian_tenants` (`SELECT
//! … FOR UPDATE`) and holds it to the commit, so the writes of one tenant
//! are serialized across every instance:
//! - idempotency records are read and written under the lock, in the same
//!   transaction as the effect: a retry on another instance waits for the
//!   first attempt's commit and replays it;
//! - `If-Match` is checked against the entity as the last commit left it;
//! - cursors come from `last_cursor` under the lock, so the commit order of
//!   a tenant's transactions is their cursor order, and a reader's snapshot
//!   always holds a prefix of the feed: no change can commit later under a
//!   lower cursor.
//!
//! Realtime: a commit with changes sends `NOTIFY guardian_feed` (delivered
//! only after the commit); every instance listens on its own connection and
//! rings the doorbell of its sessions for that tenant, which re-read the
//! feed from their last cursor. A lost notification (the listening
//! connection broke) rings every tenant's doorbell once it is back.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::{FutureExt, StreamExt};
use guardian_protocol::{Change, ChangesPage, Entity};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, GenericClient, IsolationLevel, NoTls};

use super::apply::{apply_work, KeptResponse, RowWrite, WriteTx};
use super::entities::Row;
use super::feed::parse_op;
use super::idempotency::StoredResponse as Stored;
use super::{
    from_i64, to_i64, Answer, AppliedMutation, Backend, Feed, FeedEvent, FeedRefusal,
    MutationInput, OpOutcome, PurgeReport, StoreError, StoreOptions, TenantChanges,
    TransactionInput, TransactionOutcome, Work, WorkDone, BROADCAST_CAPACITY,
};

/// The notification channel of feed commits.
const CHANNEL: &str = "guardian_feed";
/// Connections per instance.
const POOL_SIZE: usize = 16;
/// Schema version this server writes (`guardian_meta.schema_version`):
/// 2 added `guardian_applied.transaction_key`.
const SCHEMA_VERSION: i64 = 2;
/// Key of the advisory lock that serializes migrations of several
/// instances starting together.
const MIGRATION_LOCK: i64 = 0x6773_796e_635f_6d31;
/// A notification payload is limited to 8000 bytes; a longer tenant name
/// rings every tenant's doorbell instead.
const MAX_TENANT_IN_PAYLOAD: usize = 7000;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS guardian_meta (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS guardian_tenants (
    tenant text PRIMARY KEY,
    last_cursor bigint NOT NULL DEFAULT 0,
    purged_through bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS guardian_entities (
    tenant text NOT NULL,
    entity_type text NOT NULL,
    id text NOT NULL,
    version bigint NOT NULL,
    data text NOT NULL,
    updated_at bigint NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (tenant, entity_type, id)
);
CREATE TABLE IF NOT EXISTS guardian_idempotency (
    tenant text NOT NULL,
    key text NOT NULL,
    fingerprint bytea NOT NULL,
    status integer NOT NULL,
    body text NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS guardian_idempotency_created ON guardian_idempotency (created_at);
CREATE TABLE IF NOT EXISTS guardian_changes (
    tenant text NOT NULL,
    cursor bigint NOT NULL,
    op text NOT NULL,
    entity_type text NOT NULL,
    id text NOT NULL,
    version bigint NOT NULL,
    data text NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (tenant, cursor)
);
CREATE INDEX IF NOT EXISTS guardian_changes_at ON guardian_changes (at);
CREATE TABLE IF NOT EXISTS guardian_applied (
    seq bigserial PRIMARY KEY,
    tenant text NOT NULL,
    idempotency_key text NOT NULL,
    entity_type text NOT NULL,
    id text NOT NULL,
    op text NOT NULL,
    version bigint NOT NULL,
    cursor bigint NOT NULL,
    at bigint NOT NULL
);
ALTER TABLE guardian_applied ADD COLUMN IF NOT EXISTS transaction_key text;
";

const LOCK_TENANT_SQL: &str =
    "SELECT last_cursor FROM guardian_tenants WHERE tenant = $1 FOR UPDATE";
const LOOKUP_SQL: &str = "SELECT fingerprint, status, body FROM guardian_idempotency
     WHERE tenant = $1 AND key = $2 AND created_at >= $3";
const LOAD_SQL: &str = "SELECT version, data, updated_at, deleted FROM guardian_entities
     WHERE tenant = $1 AND entity_type = $2 AND id = $3";
const SAVE_SQL: &str =
    "INSERT INTO guardian_entities (tenant, entity_type, id, version, data, updated_at, deleted)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (tenant, entity_type, id) DO UPDATE SET
       version = excluded.version, data = excluded.data,
       updated_at = excluded.updated_at, deleted = excluded.deleted";
const APPEND_CHANGE_SQL: &str =
    "INSERT INTO guardian_changes (tenant, cursor, op, entity_type, id, version, data, at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const APPEND_APPLIED_SQL: &str = "INSERT INTO guardian_applied
     (tenant, idempotency_key, entity_type, id, op, version, cursor, at, transaction_key)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
// An expired record may still be there (not purged yet): replaced.
const STORE_SQL: &str = "INSERT INTO guardian_idempotency
     (tenant, key, fingerprint, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (tenant, key) DO UPDATE SET fingerprint = excluded.fingerprint,
       status = excluded.status, body = excluded.body, created_at = excluded.created_at";
const COUNTERS_SQL: &str =
    "SELECT last_cursor, purged_through FROM guardian_tenants WHERE tenant = $1";

/// The PostgreSQL store.
pub(crate) struct PgStore {
    inner: Arc<PgInner>,
    listener: JoinHandle<()>,
}

struct PgInner {
    pool: Pool,
    opts: StoreOptions,
    /// Names this instance in notifications, so it skips its own.
    instance: String,
    changes_tx: broadcast::Sender<FeedEvent>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pool_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(e.to_string())
}

impl PgStore {
    /// Connects, creates or checks the schema, and starts listening.
    pub(crate) async fn open(url: &str, opts: StoreOptions) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(pool_error)?;
        migrate(&pool).await?;
        let (changes_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let listener = tokio::spawn(listen(config, instance.clone(), changes_tx.clone()));
        Ok(Self {
            inner: Arc::new(PgInner {
                pool,
                opts,
                instance,
                changes_tx,
            }),
            listener,
        })
    }
}

impl PgInner {
    async fn apply(&self, tenant: Arc<str>, inputs: Work) -> Result<WorkDone, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        let t: &str = &tenant;
        // The tenant lock, held to the commit (see the module comment).
        let lock = tx.prepare_cached(LOCK_TENANT_SQL).await?;
        let last = match tx.query_opt(&lock, &[&t]).await? {
            Some(row) => row.get::<_, i64>(0),
            None => {
                tx.execute(
                    "INSERT INTO guardian_tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&t],
                )
                .await?;
                tx.query_one(&lock, &[&t]).await?.get::<_, i64>(0)
            }
        };
        let mut w = Writer {
            tx: &tx,
            tenant: t,
            now: self.opts.clock.now_millis(),
            last_cursor: from_i64(last),
            saved_cursor: None,
            log_applied: self.opts.applied_log,
        };
        let first_cursor = w.last_cursor;
        let now = w.now;
        let (results, changes) = apply_work(&mut w, &self.opts, now, inputs).await?;
        let last_cursor = w.last_cursor;
        if last_cursor != first_cursor {
            tx.execute(
                "UPDATE guardian_tenants SET last_cursor = $2 WHERE tenant = $1",
                &[&t, &to_i64(last_cursor)],
            )
            .await?;
            let payload = if t.len() <= MAX_TENANT_IN_PAYLOAD {
                format!("{} {t}", self.instance)
            } else {
                self.instance.clone()
            };
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                .await?;
        }
        tx.commit().await?;
        if !changes.is_empty() {
            // No receiver is fine. Concurrent requests of one tenant may
            // broadcast out of cursor order: sessions fill gaps from the feed.
            let _ = self
                .changes_tx
                .send(FeedEvent::Committed(Arc::new(TenantChanges {
                    tenant,
                    changes,
                })));
        }
        Ok(results)
    }

    async fn get(
        &self,
        tenant: Arc<str>,
        entity_type: String,
        id: String,
    ) -> Result<Option<Entity>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = load(&**client, &tenant, &entity_type, &id).await?;
        row.map(|r| r.to_entity(&entity_type, &id)).transpose()
    }

    async fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        limit: usize,
    ) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // One snapshot for the head and the page.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let head = match check_since(&*tx, &tenant, since).await? {
            Ok(last) => last,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let st = tx
            .prepare_cached(
                "SELECT cursor, op, entity_type, id, version, data FROM (
                     SELECT *,
                            sum(octet_length(data)) OVER (ORDER BY cursor) - octet_length(data)
                                AS before
                     FROM (SELECT cursor, op, entity_type, id, version, data
                           FROM guardian_changes
                           WHERE tenant = $1 AND cursor > $2 ORDER BY cursor LIMIT $3) limited
                 ) page
                 WHERE before <= $4 ORDER BY cursor",
            )
            .await?;
        let rows = tx
            .query(
                &st,
                &[
                    &&*tenant,
                    &to_i64(since),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    &i64::try_from(super::PAGE_MAX_DATA_BYTES).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        tx.commit().await?;
        let mut changes = Vec::with_capacity(rows.len());
        for r in rows {
            let data: String = r.try_get(5)?;
            changes.push(Change {
                cursor: from_i64(r.try_get(0)?),
                op: parse_op(r.try_get(1)?)?,
                entity_type: r.try_get(2)?,
                id: r.try_get(3)?,
                version: from_i64(r.try_get(4)?),
                data: serde_json::from_str(&data)
                    .map_err(|e| StoreError::Corrupt(format!("change data is not JSON: {e}")))?,
            });
        }
        let next = changes.last().map_or(since, |c| c.cursor);
        Ok(Ok(ChangesPage {
            changes,
            next,
            head: Some(head),
        }))
    }

    async fn check_since_now(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
    ) -> Result<Result<u64, FeedRefusal>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        match since {
            Some(s) => check_since(&**client, &tenant, s).await,
            None => Ok(Ok(counters(&**client, &tenant).await?.0)),
        }
    }

    async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        if !self.opts.applied_log {
            return Err(StoreError::AppliedLogOff);
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        read_applied(&**client).await
    }

    async fn purge_expired(&self) -> Result<PurgeReport, StoreError> {
        let now = self.opts.clock.now_millis();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        let idempotency_records = tx
            .execute(
                "DELETE FROM guardian_idempotency WHERE created_at < $1",
                &[&now.saturating_sub(self.opts.idempotency_retention_ms)],
            )
            .await?;
        let not_before = now.saturating_sub(self.opts.feed_retention_ms);
        // Tenants in one order, so purges of several instances cannot
        // deadlock on the tenant rows.
        let fronts = tx
            .query(
                "SELECT tenant, MAX(cursor) FROM guardian_changes WHERE at < $1
                 GROUP BY tenant ORDER BY tenant",
                &[&not_before],
            )
            .await?;
        let mut changes = 0;
        for row in fronts {
            let tenant: String = row.try_get(0)?;
            let through: i64 = row.try_get(1)?;
            tx.execute(
                "UPDATE guardian_tenants SET purged_through = GREATEST(purged_through, $2)
                 WHERE tenant = $1",
                &[&tenant, &through],
            )
            .await?;
            changes += tx
                .execute(
                    "DELETE FROM guardian_changes WHERE tenant = $1 AND cursor <= $2",
                    &[&tenant, &through],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(PurgeReport {
            idempotency_records: usize::try_from(idempotency_records).unwrap_or(usize::MAX),
            changes: usize::try_from(changes).unwrap_or(usize::MAX),
        })
    }
}

impl Backend for PgStore {
    fn apply(&self, tenant: Arc<str>, inputs: Vec<MutationInput>) -> Answer<'_, Vec<OpOutcome>> {
        let done = self.submit(tenant, Work::Ops(inputs));
        async move { done.await?.into_ops() }.boxed()
    }

    fn apply_transaction(
        &self,
        tenant: Arc<str>,
        txn: TransactionInput,
    ) -> Answer<'_, TransactionOutcome> {
        let done = self.submit(tenant, Work::Transaction(txn));
        async move { done.await?.into_transaction() }.boxed()
    }

    fn get(&self, tenant: Arc<str>, entity_type: String, id: String) -> Answer<'_, Option<Entity>> {
        self.inner.get(tenant, entity_type, id).boxed()
    }

    fn changes(&self, tenant: Arc<str>, since: u64, limit: usize) -> Answer<'_, Feed<ChangesPage>> {
        self.inner.changes(tenant, since, limit).boxed()
    }

    fn check_since(&self, tenant: Arc<str>, since: Option<u64>) -> Answer<'_, Feed<u64>> {
        self.inner.check_since_now(tenant, since).boxed()
    }

    fn applied_log(&self) -> Answer<'_, Vec<AppliedMutation>> {
        self.inner.applied_log().boxed()
    }

    fn purge_expired(&self) -> Answer<'_, PurgeReport> {
        self.inner.purge_expired().boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.inner.changes_tx.subscribe()
    }
}

impl PgStore {
    /// Applies one request's work in a task of its own: a request that
    /// times out or whose client leaves does not cut a transaction short
    /// between its commit and the broadcast to this instance's sessions.
    fn submit(
        &self,
        tenant: Arc<str>,
        work: Work,
    ) -> impl std::future::Future<Output = Result<WorkDone, StoreError>> {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move { inner.apply(tenant, work).await });
        async move { task.await.map_err(|e| StoreError::Task(e.to_string()))? }
    }
}

/// A write transaction of one tenant, holding the tenant lock.
struct Writer<'a, 'c> {
    tx: &'a deadpool_postgres::Transaction<'c>,
    tenant: &'a str,
    now: i64,
    /// The last cursor handed out (written back before the commit).
    last_cursor: u64,
    /// `last_cursor` as the open atomic unit found it.
    saved_cursor: Option<u64>,
    /// Whether applied mutations get an applied-log row.
    log_applied: bool,
}

impl WriteTx for Writer<'_, '_> {
    async fn lookup(&mut self, key: &str, not_before: i64) -> Result<Option<Stored>, StoreError> {
        let st = self.tx.prepare_cached(LOOKUP_SQL).await?;
        let Some(r) = self
            .tx
            .query_opt(&st, &[&self.tenant, &key, &not_before])
            .await?
        else {
            return Ok(None);
        };
        let status: i32 = r.try_get(1)?;
        Ok(Some(Stored {
            fingerprint: r.try_get(0)?,
            status: u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("stored status {status}")))?,
            body: r.try_get(2)?,
        }))
    }

    async fn load(&mut self, entity_type: &str, id: &str) -> Result<Option<Row>, StoreError> {
        load(&**self.tx, self.tenant, entity_type, id).await
    }

    /// Writes an entity row, its change at the next cursor and its
    /// applied-log row; returns the cursor.
    async fn write(&mut self, w: RowWrite<'_>) -> Result<u64, StoreError> {
        let (tx, t, row) = (self.tx, self.tenant, w.row);
        let RowWrite {
            key,
            kind,
            entity_type,
            id,
            ..
        } = w;
        let save = tx.prepare_cached(SAVE_SQL).await?;
        tx.execute(
            &save,
            &[
                &t,
                &entity_type,
                &id,
                &to_i64(row.version),
                &row.data,
                &row.updated_at_ms,
                &row.deleted,
            ],
        )
        .await?;
        let cursor = self.last_cursor + 1;
        self.last_cursor = cursor;
        let change = tx.prepare_cached(APPEND_CHANGE_SQL).await?;
        tx.execute(
            &change,
            &[
                &t,
                &to_i64(cursor),
                &kind.as_str(),
                &entity_type,
                &id,
                &to_i64(row.version),
                &row.data,
                &self.now,
            ],
        )
        .await?;
        if !self.log_applied {
            return Ok(cursor);
        }
        let applied = tx.prepare_cached(APPEND_APPLIED_SQL).await?;
        tx.execute(
            &applied,
            &[
                &t,
                &key,
                &entity_type,
                &id,
                &kind.as_str(),
                &to_i64(row.version),
                &to_i64(cursor),
                &self.now,
                &w.transaction,
            ],
        )
        .await?;
        Ok(cursor)
    }

    async fn remember(&mut self, r: KeptResponse<'_>) -> Result<(), StoreError> {
        let st = self.tx.prepare_cached(STORE_SQL).await?;
        let status = i32::from(r.status);
        let values: [&(dyn ToSql + Sync); 6] = [
            &self.tenant,
            &r.key,
            &r.fingerprint,
            &status,
            &r.body,
            &self.now,
        ];
        self.tx.execute(&st, &values).await?;
        Ok(())
    }

    async fn begin_atomic(&mut self) -> Result<(), StoreError> {
        self.tx.batch_execute("SAVEPOINT atomic").await?;
        self.saved_cursor = Some(self.last_cursor);
        Ok(())
    }

    async fn end_atomic(&mut self, keep: bool) -> Result<(), StoreError> {
        let saved = self.saved_cursor.take();
        if keep {
            self.tx.batch_execute("RELEASE SAVEPOINT atomic").await?;
        } else {
            self.tx
                .batch_execute("ROLLBACK TO SAVEPOINT atomic; RELEASE SAVEPOINT atomic")
                .await?;
            if let Some(c) = saved {
                self.last_cursor = c;
            }
        }
        Ok(())
    }
}

async fn load<C: GenericClient>(
    c: &C,
    tenant: &str,
    entity_type: &str,
    id: &str,
) -> Result<Option<Row>, StoreError> {
    let Some(r) = c.query_opt(LOAD_SQL, &[&tenant, &entity_type, &id]).await? else {
        return Ok(None);
    };
    Ok(Some(Row {
        version: from_i64(r.try_get(0)?),
        data: r.try_get(1)?,
        updated_at_ms: r.try_get(2)?,
        deleted: r.try_get(3)?,
    }))
}

async fn counters<C: GenericClient>(c: &C, tenant: &str) -> Result<(u64, u64), StoreError> {
    let row = c.query_opt(COUNTERS_SQL, &[&tenant]).await?;
    Ok(match row {
        Some(r) => (
            from_i64(r.try_get::<_, i64>(0)?),
            from_i64(r.try_get::<_, i64>(1)?),
        ),
        None => (0, 0),
    })
}

async fn check_since<C: GenericClient>(
    c: &C,
    tenant: &str,
    since: u64,
) -> Result<Result<u64, FeedRefusal>, StoreError> {
    let (last, purged_through) = counters(c, tenant).await?;
    Ok(super::feed::judge_since(since, last, purged_through))
}

async fn read_applied<C: GenericClient>(c: &C) -> Result<Vec<AppliedMutation>, StoreError> {
    let rows = c
        .query(
            "SELECT seq, tenant, idempotency_key, entity_type, id, op, version, cursor, at,
                    transaction_key
             FROM guardian_applied ORDER BY seq",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(AppliedMutation {
            seq: from_i64(r.try_get(0)?),
            tenant: r.try_get(1)?,
            idempotency_key: r.try_get(2)?,
            entity_type: r.try_get(3)?,
            id: r.try_get(4)?,
            op: parse_op(r.try_get(5)?)?,
            version: from_i64(r.try_get(6)?),
            cursor: from_i64(r.try_get(7)?),
            at_millis: r.try_get(8)?,
            transaction_key: r.try_get(9)?,
        });
    }
    Ok(out)
}

/// Creates the tables if missing and checks the schema version, under an
/// advisory lock so instances starting together do not race.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    let version: Option<i64> = tx
        .query_opt(
            "SELECT value FROM guardian_meta WHERE name = 'schema_version'",
            &[],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    match version {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::Corrupt(format!(
                "database schema version {v} is newer than this server ({SCHEMA_VERSION})"
            )))
        }
        Some(v) if v < SCHEMA_VERSION => {
            // The schema batch above added what the newer versions need.
            tx.execute(
                "UPDATE guardian_meta SET value = $1 WHERE name = 'schema_version'",
                &[&SCHEMA_VERSION],
            )
            .await?;
        }
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO guardian_meta (name, value) VALUES ('schema_version', $1)",
                &[&SCHEMA_VERSION],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Listens for commits of other instances and rings the doorbell of the
/// sessions of their tenant; reconnects when the connection breaks, then
/// rings every tenant's doorbell (notifications may have been missed).
async fn listen(
    config: tokio_postgres::Config,
    instance: String,
    tx: broadcast::Sender<FeedEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                if ntx.send(n).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "feed listener connection failed");
                                return;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        let _ = tx.send(FeedEvent::Doorbell(None));
                        while let Some(n) = nrx.recv().await {
                            let payload = n.payload();
                            let (from, tenant) = match payload.split_once(' ') {
                                Some((from, tenant)) => (from, Some(Arc::from(tenant))),
                                None => (payload, None),
                            };
                            if from != instance {
                                let _ = tx.send(FeedEvent::Doorbell(tenant));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for feed commits"),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the feed listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
