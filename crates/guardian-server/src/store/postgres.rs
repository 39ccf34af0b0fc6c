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
//!
//! Nothing waits on the database without bound: connections have TCP
//! keepalives and a user timeout, a write transaction's statements are cut
//! by `statement_timeout` (the request timeout, unless the database sets a
//! shorter one) and the whole transaction is given up after twice the
//! request timeout. A connection that failed in a way that may leave it
//! unusable (closed, a `FATAL` error, no answer) is closed, never handed to
//! the next request; a commit whose answer was lost is
//! [`StoreError::OutcomeUnknown`], not a failure.

mod schema;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use guardian_protocol::{Change, ChangeFingerprint, ChangesPage, Entity};
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
/// How long a connection attempt may take, unless the URL says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Data PostgreSQL leaves unacknowledged this long (its host is gone from
/// the network) closes the connection, unless the URL says otherwise.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalive probes, unless the URL says otherwise: a connection waiting
/// for an answer is idle to TCP, so without them a peer that vanished
/// mid-query is noticed only by the kernel's default of two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// tokio-postgres's `keepalives_idle` when the URL gives none.
const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 3600);
/// A notification payload is limited to 8000 bytes; a longer tenant name
/// rings every tenant's doorbell instead.
const MAX_TENANT_IN_PAYLOAD: usize = 7000;

/// Lowers this transaction's `statement_timeout` to `$1` ms, unless the
/// database or role already sets a shorter one (its operator's choice).
const BOUND_STATEMENTS_SQL: &str = "SELECT set_config('statement_timeout', $1::bigint::text, true)
     WHERE current_setting('statement_timeout')::interval = interval '0'
        OR current_setting('statement_timeout')::interval > $1::bigint * interval '1 millisecond'";
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

/// Why no connection could be had: a failed connection attempt keeps
/// PostgreSQL's error (a wrong database name, a refused login), the rest
/// is the pool's (a timeout).
fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    }
}

impl PgStore {
    /// Connects, creates or checks the schema, and starts listening.
    pub(crate) async fn open(url: &str, opts: StoreOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
        bound_network_waits(&mut config);
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
            // Waiting for a free connection is part of a request's time.
            .wait_timeout(Some(opts.request_timeout))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        schema::migrate(&pool).await?;
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
    /// Applies one request's work in one transaction and, once it is
    /// committed, broadcasts its changes to this instance's sessions.
    async fn apply(&self, tenant: Arc<str>, work: Work) -> Result<WorkDone, StoreError> {
        let mut client = Some(self.pool.get().await.map_err(pool_error)?);
        // Statements are cut by `statement_timeout`; this also bounds a
        // database that stopped answering altogether.
        let limit = self.opts.request_timeout.saturating_mul(2);
        let done = tokio::time::timeout(limit, self.transact(&mut client, &tenant, work))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::OutcomeUnknown(format!(
                    "PostgreSQL did not finish the transaction within {} ms",
                    limit.as_millis()
                )))
            });
        let (results, changes) = match client {
            Some(client) => settle(client, done)?,
            None => done?,
        };
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

    /// Begins a transaction on `client` and applies `inputs` in it. A
    /// connection found dead at `START TRANSACTION` (PostgreSQL ended it
    /// while it idled in the pool; none of the work reached the database)
    /// is closed, and the work begins on another: up to once per pooled
    /// connection and once more, as after a restart all are dead. Leaves
    /// `client` empty only if no other could be had.
    async fn transact(
        &self,
        client: &mut Option<Object>,
        t: &str,
        inputs: Work,
    ) -> Result<(WorkDone, Vec<Change>), StoreError> {
        let mut dead_ones = 0;
        loop {
            if client.is_none() {
                *client = Some(self.pool.get().await.map_err(pool_error)?);
            }
            if let Some(c) = client.as_mut() {
                match c.transaction().await {
                    Ok(tx) => return self.write(tx, t, inputs).await,
                    Err(e) if dead(&e) && dead_ones < POOL_SIZE => dead_ones += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(c) = client.take() {
                drop(Object::take(c));
            }
        }
    }

    /// Applies `inputs` in `tx`, under the tenant's lock, and commits.
    async fn write(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        t: &str,
        inputs: Work,
    ) -> Result<(WorkDone, Vec<Change>), StoreError> {
        let bound = tx.prepare_cached(BOUND_STATEMENTS_SQL).await?;
        let lock = tx.prepare_cached(LOCK_TENANT_SQL).await?;
        let ms = statement_ms(self.opts.request_timeout);
        // The statement bound and the tenant lock (held to the commit, see
        // the module comment), sent together in one round trip, the bound
        // first so that it covers the wait for the lock.
        let (bound_args, lock_args): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&ms], [&t]);
        let (_, locked) = futures::try_join!(
            tx.query(&bound, &bound_args),
            tx.query_opt(&lock, &lock_args)
        )?;
        let last = match locked {
            Some(row) => row.try_get::<_, i64>(0)?,
            None => {
                tx.execute(
                    "INSERT INTO guardian_tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&t],
                )
                .await?;
                tx.query_one(&lock, &[&t]).await?.try_get::<_, i64>(0)?
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
        tx.commit().await.map_err(commit_failed)?;
        Ok((results, changes))
    }

    /// Runs the read `f` on a pooled connection and, while that connection
    /// turns out dead, on another, as [`Self::transact`] begins a write: a
    /// read has no effect to repeat.
    async fn read<'a, T>(
        &'a self,
        f: impl Fn(Object) -> BoxFuture<'a, (Object, Result<T, StoreError>)>,
    ) -> Result<T, StoreError> {
        let mut dead_ones = 0;
        loop {
            let client = self.pool.get().await.map_err(pool_error)?;
            let (client, r) = f(client).await;
            let gone = matches!(&r, Err(StoreError::Postgres(e)) if dead(e));
            if !gone || dead_ones == POOL_SIZE {
                return settle(client, r);
            }
            dead_ones += 1;
            // Closed (out of the pool) before the next is taken.
            drop(settle(client, r));
        }
    }

    async fn get(
        &self,
        tenant: Arc<str>,
        entity_type: String,
        id: String,
    ) -> Result<Option<Entity>, StoreError> {
        let (t, ty, i) = (&*tenant, entity_type.as_str(), id.as_str());
        let row = self
            .read(move |c| {
                async move {
                    let r = load(&**c, t, ty, i).await;
                    (c, r)
                }
                .boxed()
            })
            .await?;
        row.map(|r| r.to_entity(&entity_type, &id)).transpose()
    }

    async fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        holds: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
        let t = &*tenant;
        self.read(move |mut c| {
            async move {
                let r = page(&mut c, t, since, holds, limit).await;
                (c, r)
            }
            .boxed()
        })
        .await
    }

    async fn check_since_now(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
        holds: Option<ChangeFingerprint>,
    ) -> Result<Result<u64, FeedRefusal>, StoreError> {
        let t = &*tenant;
        self.read(move |c| {
            async move {
                let r = match since {
                    Some(s) => check_since(&**c, t, s, holds).await,
                    None => counters(&**c, t).await.map(|(last, _)| Ok(last)),
                };
                (c, r)
            }
            .boxed()
        })
        .await
    }

    async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        if !self.opts.applied_log {
            return Err(StoreError::AppliedLogOff);
        }
        self.read(|c| {
            async move {
                let r = read_applied(&**c).await;
                (c, r)
            }
            .boxed()
        })
        .await
    }

    async fn purge_expired(&self) -> Result<PurgeReport, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let report = self.purge(&mut client).await;
        settle(client, report)
    }

    /// Deletes in steps of at most [`PURGE_BATCH`] rows, each a short
    /// transaction of its own under the bounds of a write (see the module
    /// comment): a purge never holds a tenant's row for long, a backlog is
    /// worked off step by step, and a silent database ends it in bounded
    /// time. A tenant whose step fails (its row held past the bound) is left
    /// for the next purge and the others go on, unless the connection is no
    /// longer usable; the first failure is returned.
    async fn purge(&self, client: &mut Object) -> Result<PurgeReport, StoreError> {
        let now = self.opts.clock.now_millis();
        let expired = now.saturating_sub(self.opts.idempotency_retention_ms);
        let mut report = PurgeReport::default();
        loop {
            let n = self
                .bounded(client, |tx| {
                    async move {
                        tx.execute(PURGE_IDEMPOTENCY_SQL, &[&expired, &PURGE_BATCH])
                            .await
                    }
                    .boxed()
                })
                .await?;
            report.idempotency_records = report.idempotency_records.saturating_add(count(n));
            if n < PURGE_BATCH.unsigned_abs() {
                break;
            }
        }
        let not_before = now.saturating_sub(self.opts.feed_retention_ms);
        // Tenants in one order, so purges of several instances cannot
        // deadlock on the tenant rows.
        let fronts = self
            .bounded(client, |tx| {
                async move {
                    tx.query(
                        "SELECT tenant, MAX(cursor) FROM guardian_changes WHERE at < $1
                         GROUP BY tenant ORDER BY tenant",
                        &[&not_before],
                    )
                    .await
                }
                .boxed()
            })
            .await?;
        let mut first_failure = None;
        for row in fronts {
            let tenant: String = row.try_get(0)?;
            let through: i64 = row.try_get(1)?;
            match self.purge_tenant(client, &tenant, through).await {
                Ok(n) => report.changes = report.changes.saturating_add(n),
                Err(e) if unusable(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "purge of one tenant's feed failed; left for the next purge");
                    first_failure.get_or_insert(e);
                }
            }
        }
        first_failure.map_or(Ok(report), Err)
    }

    /// Marks `tenant`'s feed purged through `through` (readers behind it
    /// must resync from then on), then deletes those changes.
    async fn purge_tenant(
        &self,
        client: &mut Object,
        tenant: &str,
        through: i64,
    ) -> Result<usize, StoreError> {
        // The steps own their arguments: a step's future may borrow only
        // its transaction.
        let t = tenant.to_owned();
        self.bounded(client, move |tx| {
            async move {
                tx.execute(
                    "UPDATE guardian_tenants SET purged_through = GREATEST(purged_through, $2)
                     WHERE tenant = $1",
                    &[&t, &through],
                )
                .await
            }
            .boxed()
        })
        .await?;
        let mut deleted = 0;
        loop {
            let t = tenant.to_owned();
            let n = self
                .bounded(client, move |tx| {
                    async move {
                        tx.execute(PURGE_CHANGES_SQL, &[&t, &through, &PURGE_BATCH])
                            .await
                    }
                    .boxed()
                })
                .await?;
            deleted = count(n).saturating_add(deleted);
            if n < PURGE_BATCH.unsigned_abs() {
                return Ok(deleted);
            }
        }
    }

    /// Runs `f` in a transaction of its own under a write's bounds: its
    /// statements are cut at the request timeout, and the whole at twice it.
    async fn bounded<T>(
        &self,
        client: &mut Object,
        f: impl for<'t> FnOnce(
            &'t deadpool_postgres::Transaction<'t>,
        ) -> BoxFuture<'t, Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let limit = self.opts.request_timeout.saturating_mul(2);
        let ms = statement_ms(self.opts.request_timeout);
        let run = async {
            let tx = client.transaction().await?;
            tx.query(BOUND_STATEMENTS_SQL, &[&ms]).await?;
            let out = f(&tx).await?;
            tx.commit().await.map_err(commit_failed)?;
            Ok(out)
        };
        tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
            Err(StoreError::OutcomeUnknown(format!(
                "PostgreSQL did not finish within {} ms",
                limit.as_millis()
            )))
        })
    }
}

/// Rows one purge step deletes at most.
const PURGE_BATCH: i64 = 10_000;
const PURGE_IDEMPOTENCY_SQL: &str = "DELETE FROM guardian_idempotency WHERE ctid = ANY(ARRAY(
     SELECT ctid FROM guardian_idempotency WHERE created_at < $1 LIMIT $2))";
const PURGE_CHANGES_SQL: &str = "DELETE FROM guardian_changes WHERE ctid = ANY(ARRAY(
     SELECT ctid FROM guardian_changes WHERE tenant = $1 AND cursor <= $2 LIMIT $3))";

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The request timeout as `statement_timeout` milliseconds (PostgreSQL
/// takes at most `i32::MAX`).
fn statement_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, i64::from(i32::MAX))
}

/// A page of `tenant`'s feed after `since` with its head, from one snapshot.
async fn page(
    client: &mut Object,
    tenant: &str,
    since: u64,
    holds: Option<ChangeFingerprint>,
    limit: usize,
) -> Result<Result<ChangesPage, FeedRefusal>, StoreError> {
    // One snapshot for the head, the held change and the page.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head = match check_since(&*tx, tenant, since, holds).await? {
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
                &tenant,
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

/// Bounds the network waits of `config`'s connections where its URL sets
/// none (see the constants).
fn bound_network_waits(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_keepalives_idle() == DEFAULT_KEEPALIVE_IDLE {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_RETRIES);
    }
}

/// What PostgreSQL said (severity, SQLSTATE, message), or what went wrong
/// on the way to it: tokio-postgres prints only `db error` for the first.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// Whether the connection is gone: closed, or its session ended.
fn dead(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || ends_session(e)
}

/// Whether `e` ends the session: PostgreSQL closes the connection after
/// a `FATAL` (a terminated backend, a shutdown) or `PANIC` error.
fn ends_session(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// The error of a `COMMIT`. PostgreSQL's own error answer means it did not
/// commit (the transaction was rolled back); without one (the connection
/// closed before the answer came) or with the session ending, it may have.
fn commit_failed(e: tokio_postgres::Error) -> StoreError {
    if e.as_db_error().is_some() && !ends_session(&e) {
        StoreError::Postgres(e)
    } else {
        StoreError::OutcomeUnknown(describe(&e))
    }
}

/// Hands `client` back to the pool with `result`, unless the failure may
/// have left the connection unusable: then it is closed, so no later
/// request is handed it. PostgreSQL closes the socket only a moment after
/// a `FATAL` error, and the pool's recycling check (is it closed?) would
/// pass it in between.
fn settle<T>(client: Object, result: Result<T, StoreError>) -> Result<T, StoreError> {
    if result.as_ref().is_err_and(unusable) {
        drop(Object::take(client));
    }
    result
}

/// Whether a failure may have left its connection unusable.
fn unusable(e: &StoreError) -> bool {
    match e {
        // Anything but PostgreSQL's own answer may have broken the session.
        StoreError::Postgres(e) => e.as_db_error().is_none() || ends_session(e),
        StoreError::OutcomeUnknown(_) => true,
        _ => false,
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

    fn changes(
        &self,
        tenant: Arc<str>,
        since: u64,
        holds: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Answer<'_, Feed<ChangesPage>> {
        self.inner.changes(tenant, since, holds, limit).boxed()
    }

    fn check_since(
        &self,
        tenant: Arc<str>,
        since: Option<u64>,
        holds: Option<ChangeFingerprint>,
    ) -> Answer<'_, Feed<u64>> {
        self.inner.check_since_now(tenant, since, holds).boxed()
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

/// As `feed::check_since` on SQLite: `since` retained and, with `holds`,
/// the change there the one the reader holds.
async fn check_since<C: GenericClient>(
    c: &C,
    tenant: &str,
    since: u64,
    holds: Option<ChangeFingerprint>,
) -> Result<Result<u64, FeedRefusal>, StoreError> {
    let (last, purged_through) = counters(c, tenant).await?;
    let last = match super::feed::judge_since(since, last, purged_through) {
        Ok(last) => last,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let Some(holds) = holds.filter(|_| super::feed::checkable(since, purged_through)) else {
        return Ok(Ok(last));
    };
    let found = match c
        .query_opt(
            "SELECT entity_type, id, version FROM guardian_changes
             WHERE tenant = $1 AND cursor = $2",
            &[&tenant, &to_i64(since)],
        )
        .await?
    {
        Some(r) => Some(ChangeFingerprint::of(
            r.try_get(0)?,
            r.try_get(1)?,
            from_i64(r.try_get(2)?),
        )),
        None => None,
    };
    Ok(super::feed::judge_held(since, last, holds, found))
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
                                tracing::warn!(error = %describe(&e), "feed listener connection failed");
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
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), "cannot listen for feed commits");
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %describe(&e), "cannot connect the feed listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
