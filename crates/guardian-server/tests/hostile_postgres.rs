//! The PostgreSQL store in a damaged or hostile environment, run by a
//! careless operator: connections killed mid-batch and mid-commit, a
//! database that stops answering, foreign tables under our names, a schema
//! of a newer server, revoked privileges and a least-privilege role,
//! timeouts set on the database, instances racing on one key, hostile
//! values, tenant isolation at the SQL level.
//!
//! Every test has a scratch database of its own (dropped at the end) and
//! talks only to loopback: the PostgreSQL at 127.0.0.1:5432 (or the one
//! `GUARDIAN_TEST_PG` names) and, for a database that stops answering or a
//! commit cut off from its answer, a PostgreSQL-protocol-aware TCP proxy
//! in this file. Every wait is bounded; nothing sleeps to wait for a
//! condition.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    clippy::cast_possible_truncation
)]

#[path = "protocol/pg.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardian_protocol::problem_type;
use guardian_server::{RunningServer, ServerBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_postgres::NoTls;

const TOKEN: &str = "tok-acme";
const OTHER: &str = "tok-other";
/// The `application_name` of this file's own SQL connections, which the
/// connection killers spare.
const CHECKER: &str = "hostile_checker";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn builder() -> ServerBuilder {
    ServerBuilder::new().token("acme", TOKEN)
}

async fn serve(b: ServerBuilder, url: &str) -> RunningServer {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .try_init();
    b.postgres(url).bind("127.0.0.1:0").await.expect("bind")
}

/// A direct SQL connection to `url` (as superuser unless the URL says
/// otherwise), spared by the killers.
async fn sql(url: &str) -> tokio_postgres::Client {
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}application_name={CHECKER}");
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&url, NoTls),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    tokio::spawn(conn);
    client
}

/// Runs `sql` on the maintenance database, on a thread of its own
/// (callable from `Drop`).
fn admin_sync(statement: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, conn) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_postgres::connect(&pg::admin_url(), NoTls),
            )
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(conn);
            let r = client
                .batch_execute(&statement)
                .await
                .map_err(|e| format!("{e:?}"));
            drop(client);
            let _ = driver.await;
            r
        })
    })
    .join()
    .map_err(|_| "admin thread panicked".to_owned())?
}

/// A login role that exists until this is dropped (after the databases
/// it has privileges in: declare it before them).
struct Role {
    name: String,
}

impl Role {
    fn create() -> Self {
        let name = format!("gs_hostile_{}", uuid::Uuid::new_v4().simple());
        admin_sync(format!("CREATE ROLE {name} LOGIN")).expect("create role");
        Self { name }
    }

    /// `db`'s URL as this role.
    fn url(&self, db: &pg::PgDb) -> String {
        let url = db.url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let (_, host) = rest.split_once('@').expect("a user in the test URL");
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Err(e) = admin_sync(format!("DROP ROLE IF EXISTS {}", self.name)) {
            eprintln!("could not drop role {}: {e}", self.name);
        }
    }
}

fn db_name(db: &pg::PgDb) -> String {
    db.url().rsplit('/').next().unwrap().to_owned()
}

/// The host:port of `db`'s server.
fn upstream(db: &pg::PgDb) -> SocketAddr {
    let url = db.url();
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = rest.split('/').next().unwrap();
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("a loopback address")
}

/// Polls `f` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Resp {
    status: u16,
    replayed: bool,
    body: Value,
    text: String,
}

async fn send(req: reqwest::RequestBuilder) -> reqwest::Result<Resp> {
    let r = req.send().await?;
    let status = r.status().as_u16();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let text = r.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Resp {
        status,
        replayed,
        body,
        text,
    })
}

fn create(
    http: &reqwest::Client,
    s: &RunningServer,
    token: &str,
    id: &str,
    data: &Value,
    key: &str,
) -> reqwest::RequestBuilder {
    http.post(format!("{}/v1/entities/device", s.url()))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&json!({"id": id, "data": data}))
}

fn update(
    http: &reqwest::Client,
    s: &RunningServer,
    id: &str,
    data: &Value,
    key: &str,
    if_match: Option<u64>,
) -> reqwest::RequestBuilder {
    let mut r = http
        .put(format!("{}/v1/entities/device/{id}", s.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", key)
        .json(&json!({"data": data}));
    if let Some(v) = if_match {
        r = r.header("if-match", format!("\"{v}\""));
    }
    r
}

fn get(
    http: &reqwest::Client,
    s: &RunningServer,
    token: &str,
    id: &str,
) -> reqwest::RequestBuilder {
    http.get(format!("{}/v1/entities/device/{id}", s.url()))
        .bearer_auth(token)
}

fn batch(http: &reqwest::Client, s: &RunningServer, ops: &Value) -> reqwest::RequestBuilder {
    http.post(format!("{}/v1/batch", s.url()))
        .bearer_auth(TOKEN)
        .json(&json!({"ops": ops}))
}

/// The statuses of a batch answer's results, in order.
fn statuses(r: &Resp) -> Vec<u64> {
    r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect()
}

/// Every change of `token`'s feed, in the order served.
async fn whole_feed(http: &reqwest::Client, s: &RunningServer, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let r = send(
            http.get(format!("{}/v1/changes?since={since}&limit=1000", s.url()))
                .bearer_auth(token),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.body["changes"].as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        since = r.body["next"].as_u64().unwrap();
        out.extend(page);
    }
}

/// Terminates the backends of `db` that this file's checkers do not own
/// (the server's pool and its listener); returns how many.
async fn kill_server_backends(c: &tokio_postgres::Client) -> usize {
    c.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND application_name <> $1",
        &[&CHECKER],
    )
    .await
    .unwrap()
    .len()
}

/// What the SQL tables hold for tenant `acme`: entity rows (id → version),
/// change cursors, idempotency keys, `last_cursor`, applied keys.
#[derive(Debug, PartialEq, Eq)]
struct Rows {
    entities: BTreeMap<String, i64>,
    cursors: Vec<i64>,
    keys: BTreeSet<String>,
    last_cursor: Option<i64>,
    applied: Vec<String>,
}

async fn rows(c: &tokio_postgres::Client, tenant: &str) -> Rows {
    let entities = c
        .query(
            "SELECT id, version FROM guardian_entities WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let cursors = c
        .query(
            "SELECT cursor FROM guardian_changes WHERE tenant = $1 ORDER BY cursor",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let keys = c
        .query(
            "SELECT key FROM guardian_idempotency WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let last_cursor = c
        .query_opt(
            "SELECT last_cursor FROM guardian_tenants WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let applied = c
        .query(
            "SELECT idempotency_key FROM guardian_applied WHERE tenant = $1 ORDER BY seq",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    Rows {
        entities,
        cursors,
        keys,
        last_cursor,
        applied,
    }
}

/// The tables of schema `public`, sorted.
async fn tables(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The columns of `table`, in order.
async fn columns(c: &tokio_postgres::Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The pid of the one backend of `db` waiting for a lock, once there is one.
/// How many backends wait on a lock now.
async fn lock_waiters(c: &tokio_postgres::Client) -> usize {
    c.query(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .unwrap()
    .len()
}

async fn lock_waiter(c: &tokio_postgres::Client) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        if r.len() == 1 {
            return r[0].get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no request came to wait on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// A PostgreSQL-protocol-aware loopback proxy
// ---------------------------------------------------------------------------

/// A TCP proxy in front of PostgreSQL that can stop forwarding (a database
/// that stops answering, with every connection still open), can cut
/// one connection right after the server answered its `COMMIT` (the commit
/// happened; the client never hears of it), and can end the connection
/// that next begins a transaction, or every one open, before the server
/// sees their next message (see [`KillSwitch`]).
struct Proxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    cut_next_commit: Arc<AtomicBool>,
    commits_cut: Arc<AtomicUsize>,
    kill: Arc<KillSwitch>,
    task: JoinHandle<()>,
}

/// How the proxy ends a connection, as a backend terminated while it
/// idled in the pool looks to the client: the `FATAL` error PostgreSQL
/// sends then, or just the socket closed.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Kill {
    Fatal = 1,
    Closed = 2,
}

/// Which connections end, before the server sees their next message: the
/// next `left` to begin a transaction, and any opened before
/// `doomed_below` (connections are numbered as accepted); how, and how
/// many did.
#[derive(Default)]
struct KillSwitch {
    how: AtomicU8,
    left: AtomicUsize,
    doomed_below: AtomicUsize,
    opened: AtomicUsize,
    done: AtomicUsize,
}

impl KillSwitch {
    /// How to end connection `conn` at a message (`begins` a
    /// transaction or not), if at all.
    fn take(&self, conn: usize, begins: bool) -> Option<u8> {
        if conn >= self.doomed_below.load(Ordering::SeqCst) {
            if !begins {
                return None;
            }
            self.left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .ok()?;
        }
        self.done.fetch_add(1, Ordering::SeqCst);
        Some(self.how.load(Ordering::SeqCst))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(upstream: SocketAddr, frozen: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen_tx, frozen_rx) = watch::channel(frozen);
        let cut_next_commit = Arc::new(AtomicBool::new(false));
        let commits_cut = Arc::new(AtomicUsize::new(0));
        let kill = Arc::new(KillSwitch::default());
        let faults = Faults {
            cut: Arc::clone(&cut_next_commit),
            done: Arc::clone(&commits_cut),
            kill: Arc::clone(&kill),
        };
        let task = tokio::spawn(async move {
            // Dropped (every connection aborted) with this task.
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (rx, faults) = (frozen_rx.clone(), faults.clone());
                let conn = faults.kill.opened.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    let Ok(Ok(up)) =
                        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream))
                            .await
                    else {
                        return;
                    };
                    carry(client, up, rx, faults, conn).await;
                });
            }
        });
        Self {
            addr,
            frozen: frozen_tx,
            cut_next_commit,
            commits_cut,
            kill,
            task,
        }
    }

    /// Ends the connections that send the next `n` `START TRANSACTION`s,
    /// as `kill`.
    fn kill_begins(&self, kill: Kill, n: usize) {
        self.kill.how.store(kill as u8, Ordering::SeqCst);
        self.kill.left.store(n, Ordering::SeqCst);
    }

    /// Ends every connection open now at its next message, as `kill`: a
    /// database restarted under the pool. Returns how many.
    fn kill_open(&self, kill: Kill) -> usize {
        self.kill.how.store(kill as u8, Ordering::SeqCst);
        let open = self.kill.opened.load(Ordering::SeqCst);
        self.kill.doomed_below.store(open, Ordering::SeqCst);
        open
    }

    fn killed(&self) -> usize {
        self.kill.done.load(Ordering::SeqCst)
    }

    /// `db`'s URL through this proxy.
    fn url(&self, db: &pg::PgDb) -> String {
        format!(
            "postgres://postgres@{}/{}?sslmode=disable",
            self.addr,
            db_name(db)
        )
    }

    fn freeze(&self, yes: bool) {
        self.frozen.send_replace(yes);
    }
}

/// The proxy's fault switches, shared by its connections.
#[derive(Clone)]
struct Faults {
    cut: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    kill: Arc<KillSwitch>,
}

async fn carry(
    client: TcpStream,
    up: TcpStream,
    frozen: watch::Receiver<bool>,
    faults: Faults,
    conn: usize,
) {
    // Messages are written one at a time: with Nagle's algorithm each
    // would wait for the peer's delayed ACK.
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    // Both directions write to the client: the server's answers, and a
    // `FATAL` error the proxy makes up.
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    let swallow = Arc::new(AtomicBool::new(false));
    let mut to_server = tokio::spawn(pump(
        cr,
        Arc::new(tokio::sync::Mutex::new(uw)),
        true,
        frozen.clone(),
        Direction::ToServer {
            cut: faults.cut,
            swallow: Arc::clone(&swallow),
            kill: faults.kill,
            conn,
            client: Arc::clone(&cw),
        },
    ));
    let mut to_client = tokio::spawn(pump(
        ur,
        cw,
        false,
        frozen,
        Direction::ToClient {
            swallow,
            done: faults.done,
        },
    ));
    tokio::select! {
        _ = &mut to_server => {}
        _ = &mut to_client => {}
    }
    to_server.abort();
    to_client.abort();
}

enum Direction {
    ToServer {
        cut: Arc<AtomicBool>,
        swallow: Arc<AtomicBool>,
        kill: Arc<KillSwitch>,
        conn: usize,
        client: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    },
    ToClient {
        swallow: Arc<AtomicBool>,
        done: Arc<AtomicUsize>,
    },
}

/// One message of the protocol: a type byte (but for the startup message)
/// and a length that counts itself.
async fn read_message(from: &mut OwnedReadHalf, typed: bool) -> std::io::Result<Vec<u8>> {
    let head_len = if typed { 5 } else { 4 };
    let mut msg = vec![0u8; head_len];
    from.read_exact(&mut msg).await?;
    let len_bytes: [u8; 4] = msg[head_len - 4..].try_into().unwrap();
    let len = u32::from_be_bytes(len_bytes) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    from.read_exact(&mut body).await?;
    msg.extend_from_slice(&body);
    Ok(msg)
}

/// The `ErrorResponse` of a backend terminated by an administrator.
fn fatal_terminated() -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, text) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (b'M', "terminating connection due to administrator command"),
    ] {
        fields.push(code);
        fields.extend_from_slice(text.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&u32::try_from(fields.len() + 4).unwrap().to_be_bytes());
    msg.extend_from_slice(&fields);
    msg
}

async fn pump(
    mut from: OwnedReadHalf,
    to: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    startup: bool,
    mut frozen: watch::Receiver<bool>,
    dir: Direction,
) {
    let mut typed = !startup;
    loop {
        let Ok(msg) = read_message(&mut from, typed).await else {
            return;
        };
        let was_typed = typed;
        typed = true;
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        match &dir {
            Direction::ToServer {
                cut,
                swallow,
                kill,
                conn,
                client,
            } => {
                if was_typed {
                    let begins = msg[0] == b'Q' && msg[5..].starts_with(b"START TRANSACTION");
                    if let Some(how) = kill.take(*conn, begins) {
                        if how == Kill::Fatal as u8 {
                            let _ = client.lock().await.write_all(&fatal_terminated()).await;
                        }
                        // Both directions end: the client sees its socket close.
                        return;
                    }
                }
                if was_typed
                    && msg[0] == b'Q'
                    && msg[5..].starts_with(b"COMMIT")
                    && cut.swap(false, Ordering::SeqCst)
                {
                    swallow.store(true, Ordering::SeqCst);
                }
            }
            Direction::ToClient { swallow, done } => {
                if swallow.load(Ordering::SeqCst) {
                    // The server's answer to COMMIT goes nowhere; once it
                    // is ready for the next query (the commit is done),
                    // the client's connection is closed.
                    if msg[0] == b'Z' {
                        done.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    continue;
                }
            }
        }
        if to.lock().await.write_all(&msg).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Foreign tables, newer schemas, privileges
// ---------------------------------------------------------------------------

/// Another application's tables named like the SQLite store's (`entities`,
/// `changes`, ...) sit beside ours: the PostgreSQL store never reads,
/// writes or alters them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_apps_tables_beside_ours_are_left_alone() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(
        "CREATE TABLE entities (id serial PRIMARY KEY, name text);
         INSERT INTO entities (name) VALUES ('precious');
         CREATE TABLE changes (cursor int, what text);
         INSERT INTO changes VALUES (1, 'theirs');
         CREATE TABLE tenants (tenant text);
         CREATE TABLE idempotency (key text);",
    )
    .await
    .unwrap();
    let snapshot = "SELECT (SELECT string_agg(id || ':' || name, ',') FROM entities),
                           (SELECT string_agg(cursor || ':' || what, ',') FROM changes),
                           (SELECT count(*) FROM tenants), (SELECT count(*) FROM idempotency)";
    let before: (String, String, i64, i64) = {
        let r = c.query_one(snapshot, &[]).await.unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    let after: (String, String, i64, i64) = {
        let r = c.query_one(snapshot, &[]).await.unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert_eq!(before, after);
    for (t, cols) in [
        ("entities", vec!["id", "name"]),
        ("changes", vec!["cursor", "what"]),
        ("tenants", vec!["tenant"]),
        ("idempotency", vec!["key"]),
    ] {
        assert_eq!(columns(&c, t).await, cols, "{t}");
    }
    drop(s);
}

/// A database where a table under one of our names is someone else's (a
/// `guardian_entities` of another shape, with data) is refused at start,
/// and left as it was: no table of ours is created beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_table_under_our_name_is_refused_and_nothing_is_created() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(
        "CREATE TABLE guardian_entities (id serial PRIMARY KEY, name text NOT NULL);
         INSERT INTO guardian_entities (name) VALUES ('precious');",
    )
    .await
    .unwrap();
    let started = builder().postgres(db.url()).bind("127.0.0.1:0").await;
    let refused = started.is_err();
    drop(started);
    assert_eq!(columns(&c, "guardian_entities").await, ["id", "name"]);
    let name: String = c
        .query_one("SELECT name FROM guardian_entities", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "precious");
    assert!(
        refused,
        "the server started on a database that is not its own"
    );
    assert_eq!(tables(&c).await, ["guardian_entities"], "nothing created");
}

/// A foreign table under one of our names is never altered: the schema
/// batch's `ALTER TABLE guardian_applied ADD COLUMN IF NOT EXISTS` must
/// not add a column to someone else's `guardian_applied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_table_under_our_name_is_never_altered() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(
        "CREATE TABLE guardian_applied (seq int PRIMARY KEY, note text);
         INSERT INTO guardian_applied VALUES (1, 'theirs');",
    )
    .await
    .unwrap();
    let started = builder().postgres(db.url()).bind("127.0.0.1:0").await;
    drop(started);
    assert_eq!(
        columns(&c, "guardian_applied").await,
        ["seq", "note"],
        "someone else's table was altered"
    );
}

/// Stamps the schema of `db` as written by a newer server (version 3) that
/// dropped the index `guardian_changes_at` and added a table.
async fn make_newer(db: &pg::PgDb, c: &tokio_postgres::Client) {
    let s = serve(builder(), &db.url()).await;
    s.shutdown().await;
    c.batch_execute(
        "UPDATE guardian_meta SET value = 3 WHERE name = 'schema_version';
         DROP INDEX guardian_changes_at;
         CREATE TABLE guardian_future (x int);",
    )
    .await
    .unwrap();
}

async fn has_index(c: &tokio_postgres::Client, name: &str) -> bool {
    c.query_one(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname = $1",
        &[&name],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A schema written by a newer server is refused, saying so, and left as
/// the newer server made it (the index it dropped is not recreated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_left_as_it_was() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    make_newer(&db, &c).await;
    let err = builder()
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect_err("a newer schema must be refused");
    assert!(err.to_string().contains("newer"), "{err}");
    assert!(
        !has_index(&c, "guardian_changes_at").await,
        "index recreated"
    );
    let v: i64 = c
        .query_one(
            "SELECT value FROM guardian_meta WHERE name = 'schema_version'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 3);
}

/// A newer schema that reshaped a table (here: `guardian_changes.at`
/// renamed, its index dropped) is refused for what it is, a newer
/// version, not with an SQL error of this server's DDL run against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_that_reshaped_a_table_is_refused_by_its_version() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    make_newer(&db, &c).await;
    c.batch_execute("ALTER TABLE guardian_changes RENAME COLUMN at TO at_ms")
        .await
        .unwrap();
    let err = builder()
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect_err("a newer schema must be refused");
    assert!(
        err.to_string().contains("newer"),
        "refused with an unrelated error: {err}"
    );
}

/// A schema stamped with this server's version whose table was reshaped
/// (a column's type changed), then lost, by hand: refused, naming the
/// table, and left as it is (nothing altered back, nothing recreated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_schema_of_our_version_is_refused_and_left_as_it_was() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    s.shutdown().await;
    c.batch_execute("ALTER TABLE guardian_changes ALTER COLUMN data TYPE jsonb USING data::jsonb")
        .await
        .unwrap();
    let err = builder()
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect_err("a reshaped table must be refused");
    assert!(err.to_string().contains("guardian_changes"), "{err}");
    let ty: String = c
        .query_one(
            "SELECT data_type::text FROM information_schema.columns
             WHERE table_name = 'guardian_changes' AND column_name = 'data'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "jsonb");
    c.batch_execute("DROP TABLE guardian_changes")
        .await
        .unwrap();
    let err = builder()
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect_err("a missing table must be refused");
    assert!(err.to_string().contains("guardian_changes"), "{err}");
    assert!(
        !tables(&c).await.iter().any(|t| t == "guardian_changes"),
        "recreated"
    );
}

/// An operator who runs the server as a least-privilege role (DML on the
/// existing tables, no CREATE on the schema, not their owner) on a
/// database whose schema is up to date: the server starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_can_serve_an_up_to_date_schema() {
    let role = Role::create();
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    s.shutdown().await;
    c.batch_execute(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {r};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {r};",
        r = role.name
    ))
    .await
    .unwrap();
    let s = builder()
        .postgres(role.url(&db))
        .bind("127.0.0.1:0")
        .await
        .expect("a DML-only role must be able to serve an up-to-date schema");
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    drop(s);
    drop(c);
    drop(db);
    drop(role);
}

/// A privilege revoked while the server runs (INSERT on the feed table):
/// a write fails whole (the entity row it wrote first is rolled back, no
/// idempotency record, no cursor), and once the privilege is back the
/// client's retry with the same key applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_privilege_fails_the_write_whole_and_the_retry_applies_once() {
    let role = Role::create();
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(&format!(
        "GRANT CREATE, USAGE ON SCHEMA public TO {}",
        role.name
    ))
    .await
    .unwrap();
    let s = serve(builder(), &role.url(&db)).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    let before = rows(&c, "acme").await;
    c.batch_execute(&format!(
        "REVOKE INSERT ON guardian_changes FROM {}",
        role.name
    ))
    .await
    .unwrap();
    let r = send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1)))
        .await
        .unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    assert_eq!(rows(&c, "acme").await, before, "half of the write stayed");
    let r = send(get(&http, &s, TOKEN, "d1")).await.unwrap();
    assert_eq!((r.status, r.body["version"].as_u64()), (200, Some(1)));
    c.batch_execute(&format!(
        "GRANT INSERT ON guardian_changes TO {}",
        role.name
    ))
    .await
    .unwrap();
    let r = send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1)))
        .await
        .unwrap();
    assert_eq!((r.status, r.replayed), (200, false), "{}", r.text);
    let after = rows(&c, "acme").await;
    assert_eq!(after.applied, ["k1", "k2"]);
    assert_eq!(after.cursors, [1, 2]);
    drop(s);
    drop(c);
    drop(db);
    drop(role);
}

/// A database made read-only by its operator (`default_transaction_read_only`,
/// picked up by new connections): writes are refused with an error and
/// change nothing, reads go on; once writable again, the retry applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_refuses_writes_and_keeps_serving_reads() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let name = db_name(&db);
    c.batch_execute(&format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    ))
    .await
    .unwrap();
    kill_server_backends(&c).await;
    let before = rows(&c, "acme").await;
    for i in 0..5 {
        let r = send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1)))
            .await
            .unwrap();
        assert!(r.status >= 500, "attempt {i}: {} {}", r.status, r.text);
    }
    assert!(
        eventually(Duration::from_secs(15), || async {
            send(get(&http, &s, TOKEN, "d1"))
                .await
                .is_ok_and(|r| r.status == 200 && r.body["version"] == 1)
        })
        .await,
        "reads stopped"
    );
    assert_eq!(rows(&c, "acme").await, before);
    c.batch_execute(&format!(
        "ALTER DATABASE {name} RESET default_transaction_read_only"
    ))
    .await
    .unwrap();
    kill_server_backends(&c).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1)))
            .await
            .unwrap();
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rows(&c, "acme").await.applied, ["k1", "k2"]);
    drop(s);
}

// ---------------------------------------------------------------------------
// Connections killed
// ---------------------------------------------------------------------------

/// Idle pooled connections terminated by a DBA cost no request: the pool
/// hands out live connections only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_killed_by_the_dba_cost_no_request() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    // Several connections in the pool.
    let gets: Vec<_> = (0..8).map(|_| send(get(&http, &s, TOKEN, "d1"))).collect();
    for r in futures::future::join_all(gets).await {
        assert_eq!(r.unwrap().status, 200);
    }
    assert!(kill_server_backends(&c).await >= 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name <> $1
                   AND backend_type = 'client backend' AND state = 'idle'
                   AND query NOT ILIKE 'LISTEN%'",
                &[&CHECKER],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        })
        .await
    );
    for i in 0..20 {
        let r = send(get(&http, &s, TOKEN, "d1")).await.unwrap();
        assert_eq!(r.status, 200, "request {i} after the kill: {}", r.text);
    }
    drop(s);
}

/// Sends what `make` builds until the answer is not a 5xx (at most 20
/// times): a request right after a kill may get the killed connection
/// (see `the_request_after_a_killed_one_is_not_failed_by_its_dead_connection`).
async fn until_not_5xx(make: impl Fn() -> reqwest::RequestBuilder) -> Resp {
    for _ in 0..20 {
        let r = send(make()).await.unwrap();
        if r.status < 500 {
            return r;
        }
    }
    panic!("still failing after 20 attempts");
}

/// Holds a row lock on entity `c` of `acme` from a connection of our own,
/// so that a request writing it blocks there, after the ops before it.
async fn lock_entity(url: &str, id: &str) -> tokio_postgres::Client {
    let l = sql(url).await;
    l.batch_execute("BEGIN").await.unwrap();
    let n = l
        .execute(
            "SELECT 1 FROM guardian_entities WHERE tenant = 'acme' AND id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    l
}

/// A batch whose connection is terminated mid-way (two ops written, the
/// third blocked): nothing of it stays, and its retry applies every op
/// once, at consecutive cursors in batch order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_killed_mid_way_leaves_nothing_and_its_retry_applies_once() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "c", &json!({"n": 1}), "kc"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let before = rows(&c, "acme").await;
    let ops = json!([
        {"op": "create", "type": "device", "id": "a", "data": {"n": 1}, "idempotency_key": "ka"},
        {"op": "create", "type": "device", "id": "b", "data": {"n": 1}, "idempotency_key": "kb"},
        {"op": "update", "type": "device", "id": "c", "data": {"n": 2}, "idempotency_key": "kc2"},
        {"op": "create", "type": "device", "id": "d", "data": {"n": 1}, "idempotency_key": "kd"},
    ]);
    let locker = lock_entity(&db.url(), "c").await;
    let pending = tokio::spawn(send(batch(&http, &s, &ops)));
    let pid = lock_waiter(&c).await;
    let killed: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let r = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&c, "acme").await, before, "half a batch stayed");
    let r = until_not_5xx(|| batch(&http, &s, &ops)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(statuses(&r), [201, 201, 200, 201]);
    let after = rows(&c, "acme").await;
    assert_eq!(after.applied, ["kc", "ka", "kb", "kc2", "kd"]);
    assert_eq!(after.cursors, [1, 2, 3, 4, 5]);
    let feed = whole_feed(&http, &s, TOKEN).await;
    let order: Vec<(&str, u64)> = feed
        .iter()
        .map(|ch| (ch["id"].as_str().unwrap(), ch["cursor"].as_u64().unwrap()))
        .collect();
    assert_eq!(order, [("c", 1), ("a", 2), ("b", 3), ("c", 4), ("d", 5)]);
    drop(s);
}

/// A request whose connection was terminated mid-way (a DBA's
/// `pg_terminate_backend`, or every backend at a PostgreSQL restart) fails;
/// the next request must not be handed the same dead connection and fail
/// too: PostgreSQL closes the socket a few milliseconds after its FATAL
/// error, and until then the pool's `Fast` recycling sees it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_after_a_killed_one_is_not_failed_by_its_dead_connection() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "c", &json!({"n": 1}), "kc"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    for round in 0..6 {
        let locker = lock_entity(&db.url(), "c").await;
        let pending = tokio::spawn(send(update(
            &http,
            &s,
            "c",
            &json!({"n": 2}),
            &format!("blocked{round}"),
            None,
        )));
        let pid = lock_waiter(&c).await;
        c.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(15), pending)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
        assert!(r.status >= 500, "{} {}", r.status, r.text);
        // At once, the next request.
        let next = send(create(
            &http,
            &s,
            TOKEN,
            &format!("n{round}"),
            &json!({}),
            &format!("n{round}"),
        ))
        .await
        .unwrap();
        locker.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(next.status, 201, "round {round}: {}", next.text);
    }
}

/// A write handed a pooled connection whose backend PostgreSQL had just
/// terminated (the pool's check sees the socket open until the client
/// reads the `FATAL` error or the close) fails at `START TRANSACTION`,
/// before any of its work reached the database: it is tried once more on
/// another connection, not answered 500. Single ops, a batch and an
/// atomic transaction, each way the kill shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_handed_a_just_killed_connection_is_tried_on_another() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let proxy = Proxy::start(upstream(&db), false).await;
    let s = serve(builder(), &proxy.url(&db)).await;
    let http = reqwest::Client::new();
    let mut killed = 0;
    for (round, kill) in [Kill::Fatal, Kill::Closed].into_iter().enumerate() {
        proxy.kill_begins(kill, 1);
        let r = send(create(
            &http,
            &s,
            TOKEN,
            &format!("a{round}"),
            &json!({"n": 1}),
            &format!("ka{round}"),
        ))
        .await
        .unwrap();
        assert_eq!(r.status, 201, "round {round}: {}", r.text);
        killed += 1;
        assert_eq!(proxy.killed(), killed);

        proxy.kill_begins(kill, 1);
        let ops = json!([
            {"op": "create", "type": "device", "id": format!("b{round}"), "data": {"n": 1}, "idempotency_key": format!("kb{round}")},
            {"op": "update", "type": "device", "id": format!("a{round}"), "data": {"n": 2}, "if_match": 1, "idempotency_key": format!("kb2{round}")},
        ]);
        let r = send(batch(&http, &s, &ops)).await.unwrap();
        assert_eq!(r.status, 200, "round {round}: {}", r.text);
        assert_eq!(statuses(&r), [201, 200], "round {round}: {}", r.text);
        killed += 1;
        assert_eq!(proxy.killed(), killed);

        proxy.kill_begins(kill, 1);
        let txn = json!({"transaction_key": format!("t{round}"), "ops": [
            {"op": "create", "type": "device", "id": format!("c{round}"), "data": {"n": 1}, "idempotency_key": format!("kc{round}")},
            {"op": "update", "type": "device", "id": format!("b{round}"), "data": {"n": 2}, "if_match": 1, "idempotency_key": format!("kc2{round}")},
        ]});
        let r = send(
            http.post(format!("{}/v1/transactions", s.url()))
                .bearer_auth(TOKEN)
                .json(&txn),
        )
        .await
        .unwrap();
        assert_eq!(
            (r.status, r.body["committed"].as_bool()),
            (200, Some(true)),
            "round {round}: {}",
            r.text
        );
        killed += 1;
        assert_eq!(proxy.killed(), killed);
    }
    // Each op applied once, in order.
    let after = rows(&c, "acme").await;
    assert_eq!(
        after.applied,
        ["ka0", "kb0", "kb20", "kc0", "kc20", "ka1", "kb1", "kb21", "kc1", "kc21"]
    );
    assert_eq!(after.cursors, (1..=10).collect::<Vec<i64>>());
    drop(s);
}

/// PostgreSQL restarted under a full pool: every pooled connection is
/// dead at once. As many concurrent writes each find theirs dead at
/// `START TRANSACTION` and need a fresh one, and may be handed another
/// dead one first: the dead ones must leave the pool before the next is
/// taken, or the writes wait on each other for a place until the pool's
/// wait times out. Then the same for reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_a_full_pool_of_dead_connections_each_get_a_fresh_one() {
    const WRITES: usize = 16;
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let proxy = Proxy::start(upstream(&db), false).await;
    let s = serve(builder(), &proxy.url(&db)).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d", &json!({}), "kd"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    let writes = |round: &'static str| {
        let http = &http;
        let s = &s;
        (0..WRITES).map(move |i| {
            send(create(
                http,
                s,
                TOKEN,
                &format!("{round}{i}"),
                &json!({"n": i}),
                &format!("{round}{i}"),
            ))
        })
    };
    // Fill the pool: the tenant's lock, held here, keeps every write
    // waiting on a connection of its own.
    let locker = sql(&db.url()).await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute(
            "SELECT 1 FROM guardian_tenants WHERE tenant = 'acme' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let filling = tokio::spawn(futures::future::join_all(writes("fill")));
    assert!(
        eventually(Duration::from_secs(10), || async {
            lock_waiters(&c).await >= WRITES
        })
        .await,
        "the pool did not fill"
    );
    locker.batch_execute("ROLLBACK").await.unwrap();
    for r in filling.await.unwrap() {
        assert_eq!(r.unwrap().status, 201);
    }
    // Every connection open now dies at its next transaction.
    assert!(proxy.kill_open(Kill::Fatal) >= WRITES);
    for (i, r) in futures::future::join_all(writes("w"))
        .await
        .into_iter()
        .enumerate()
    {
        let r = r.unwrap();
        assert_eq!(r.status, 201, "write {i}: {}", r.text);
    }
    assert!(proxy.killed() >= WRITES, "{}", proxy.killed());
    assert_eq!(rows(&c, "acme").await.applied.len(), 1 + 2 * WRITES);
    // Again, for reads: the pool is full of the fresh connections now.
    let killed = proxy.killed();
    assert!(proxy.kill_open(Kill::Closed) >= WRITES);
    let reads = (0..WRITES).map(|i| send(get(&http, &s, TOKEN, &format!("w{i}"))));
    for (i, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "read {i}: {}", r.text);
    }
    assert!(proxy.killed() > killed);
    drop(s);
}

/// The same for an atomic transaction: killed mid-way, nothing of it
/// stays; its retry commits it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_killed_mid_way_leaves_nothing_and_its_retry_commits_once() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "c", &json!({"n": 1}), "kc"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let before = rows(&c, "acme").await;
    let ops = json!([
        {"op": "create", "type": "device", "id": "a", "data": {"n": 1}, "idempotency_key": "ka"},
        {"op": "update", "type": "device", "id": "c", "data": {"n": 2}, "if_match": 1, "idempotency_key": "kc2"},
        {"op": "create", "type": "device", "id": "d", "data": {"n": 1}, "idempotency_key": "kd"},
    ]);
    let txn = || {
        http.post(format!("{}/v1/transactions", s.url()))
            .bearer_auth(TOKEN)
            .json(&json!({"transaction_key": "t1", "ops": ops}))
    };
    let locker = lock_entity(&db.url(), "c").await;
    let pending = tokio::spawn(send(txn()));
    let pid = lock_waiter(&c).await;
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&c, "acme").await, before, "half a transaction stayed");
    let r = until_not_5xx(txn).await;
    assert_eq!(
        (r.status, r.body["committed"].as_bool()),
        (200, Some(true)),
        "{}",
        r.text
    );
    let again = send(txn()).await.unwrap();
    assert!(again.replayed, "{}", again.text);
    let after = rows(&c, "acme").await;
    assert_eq!(after.applied, ["kc", "ka", "kc2", "kd"]);
    assert_eq!(after.cursors, [1, 2, 3, 4]);
    drop(s);
}

/// Two instances, writers sending batches with retries, while every
/// connection of both instances is terminated again and again: each key
/// takes effect exactly once, a batch is whole or absent at every moment
/// a 2xx is answered (the answer comes after the commit), the feed is
/// 1..=N without a hole, each batch at consecutive cursors in its order,
/// and applied-log order equals cursor order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_again_and_again_keep_exactly_once_and_feed_order() {
    const WRITERS: usize = 4;
    const BATCHES: usize = 12;
    const OPS: usize = 3;
    let db = pg::PgDb::create();
    let c = Arc::new(sql(&db.url()).await);
    let s = Arc::new([
        serve(builder(), &db.url()).await,
        serve(builder(), &db.url()).await,
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (c, stop, kills) = (Arc::clone(&c), Arc::clone(&stop), Arc::clone(&kills));
        tokio::spawn(async move {
            // Kills 30 ms apart, with a longer gap every fourth: on a slow
            // machine a batch's reconnect and transaction can take longer
            // than 30 ms, and kills at a steady 30 ms then let none finish.
            for n in 0usize.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let gap = if n % 4 == 3 { 150 } else { 30 };
                tokio::time::sleep(Duration::from_millis(gap)).await;
                kills.fetch_add(kill_server_backends(&c).await, Ordering::SeqCst);
            }
        })
    };
    let failures = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (s, c, failures) = (Arc::clone(&s), Arc::clone(&c), Arc::clone(&failures));
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for b in 0..BATCHES {
                let ops: Vec<Value> = (0..OPS)
                    .map(|o| {
                        json!({"op": "create", "type": "device", "id": format!("w{w}b{b}o{o}"),
                               "data": {"w": w, "b": b, "o": o},
                               "idempotency_key": format!("w{w}b{b}o{o}")})
                    })
                    .collect();
                let ops = Value::Array(ops);
                let mut attempt = 0;
                let started = tokio::time::Instant::now();
                loop {
                    attempt += 1;
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "writer {w} batch {b}: no success in {attempt} attempts"
                    );
                    let at = &s[(w + b + attempt) % 2];
                    let Ok(r) = send(batch(&http, at, &ops)).await else {
                        continue;
                    };
                    if r.status >= 500 {
                        failures.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    assert_eq!(r.status, 200, "{}", r.text);
                    let results = r.body["results"].as_array().unwrap();
                    let in_flight = results
                        .iter()
                        .any(|x| x["body"]["type"] == problem_type::IDEMPOTENCY_IN_FLIGHT);
                    if in_flight {
                        continue;
                    }
                    for x in results {
                        assert_eq!(x["status"], 201, "{}", r.text);
                    }
                    // Answered: committed, all three records there.
                    let keys: Vec<String> = (0..OPS).map(|o| format!("w{w}b{b}o{o}")).collect();
                    let n: i64 = c
                        .query_one(
                            "SELECT count(*) FROM guardian_idempotency
                             WHERE tenant = 'acme' AND key = ANY($1)",
                            &[&keys],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(n, OPS as i64, "answered before commit: {keys:?}");
                    break;
                }
            }
        }));
    }
    let done = tokio::time::timeout(Duration::from_secs(240), async {
        for w in writers {
            w.await.unwrap();
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    done.expect("writers finished in time");
    eprintln!(
        "killed {} backends, {} failed attempts",
        kills.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst)
    );
    assert!(kills.load(Ordering::SeqCst) > 0);
    let total = WRITERS * BATCHES * OPS;
    let http = reqwest::Client::new();
    let feed = whole_feed(&http, &s[0], TOKEN).await;
    let cursors: Vec<u64> = feed
        .iter()
        .map(|ch| ch["cursor"].as_u64().unwrap())
        .collect();
    assert_eq!(
        cursors,
        (1..=total as u64).collect::<Vec<_>>(),
        "feed has holes"
    );
    // Each batch at consecutive cursors, in op order.
    let mut at: BTreeMap<String, u64> = BTreeMap::new();
    for ch in &feed {
        let prev = at.insert(
            ch["id"].as_str().unwrap().to_owned(),
            ch["cursor"].as_u64().unwrap(),
        );
        assert!(prev.is_none(), "twice in the feed: {ch}");
    }
    for w in 0..WRITERS {
        for b in 0..BATCHES {
            let first = at[&format!("w{w}b{b}o0")];
            for o in 1..OPS {
                assert_eq!(at[&format!("w{w}b{b}o{o}")], first + o as u64, "w{w}b{b}");
            }
        }
    }
    let log = s[1].applied_log().await.unwrap();
    assert_eq!(log.len(), total, "each key once");
    let keys: BTreeSet<&str> = log.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), total);
    for pair in log.windows(2) {
        assert!(pair[0].cursor < pair[1].cursor, "log order != cursor order");
    }
    drop(s);
}

// ---------------------------------------------------------------------------
// A commit cut off from its answer
// ---------------------------------------------------------------------------

async fn commit_cut(db: &pg::PgDb) -> (Proxy, RunningServer, reqwest::Client, Resp) {
    let proxy = Proxy::start(upstream(db), false).await;
    let s = serve(builder(), &proxy.url(db)).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "pre", &json!({}), "kpre"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    proxy.cut_next_commit.store(true, Ordering::SeqCst);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        send(create(&http, &s, TOKEN, "x", &json!({"n": 1}), "kx")),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(proxy.commits_cut.load(Ordering::SeqCst), 1, "no commit cut");
    (proxy, s, http, r)
}

/// The connection drops right after PostgreSQL committed, before the
/// server hears of it: the server does not claim success, the change is
/// there, and the client's retry with the same key replays it (exactly
/// once in effect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_off_from_its_answer_is_applied_once_on_retry() {
    let db = pg::PgDb::create();
    let (_proxy, s, http, r) = commit_cut(&db).await;
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    let g = send(get(&http, &s, TOKEN, "x")).await.unwrap();
    assert_eq!(g.status, 200, "the commit happened");
    let again = send(create(&http, &s, TOKEN, "x", &json!({"n": 1}), "kx"))
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.replayed),
        (201, true),
        "{}",
        again.text
    );
    assert_eq!(again.body, g.body);
    let log = s.applied_log().await.unwrap();
    let keys: Vec<&str> = log.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["kpre", "kx"]);
}

/// ... and its error answer must not tell the client that nothing was
/// applied: the commit went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_commit_outcome_is_not_reported_as_nothing_applied() {
    let db = pg::PgDb::create();
    let (_proxy, s, http, r) = commit_cut(&db).await;
    let g = send(get(&http, &s, TOKEN, "x")).await.unwrap();
    assert_eq!(g.status, 200, "the commit happened");
    let detail = r.body["detail"].as_str().unwrap_or("");
    assert!(
        !detail.contains("nothing was applied"),
        "{} says `{detail}` about a committed write",
        r.status
    );
}

// ---------------------------------------------------------------------------
// A database that stops answering, locks that are never released
// ---------------------------------------------------------------------------

/// A PostgreSQL that accepts connections and never answers: the server
/// does not start, in bounded time, with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_at_start_fails_the_start_in_bounded_time() {
    let db = pg::PgDb::create();
    let proxy = Proxy::start(upstream(&db), true).await;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(40),
        builder().postgres(proxy.url(&db)).bind("127.0.0.1:0"),
    )
    .await
    .expect("bind must not wait forever on a silent database");
    let err = r.expect_err("no server on a silent database");
    eprintln!("refused after {:?}: {err}", started.elapsed());
}

/// A server (request timeout 2 s) on `db` behind a proxy, with device d1
/// created; then the proxy goes silent (connections open, nothing comes
/// back).
async fn silenced(db: &pg::PgDb, b: ServerBuilder) -> (Proxy, RunningServer, reqwest::Client) {
    let proxy = Proxy::start(upstream(db), false).await;
    let s = serve(b.request_timeout(Duration::from_secs(2)), &proxy.url(db)).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    proxy.freeze(true);
    (proxy, s, http)
}

/// A database that stops answering (connections open, nothing comes
/// back): a read is answered 503 `timeout` within the request timeout;
/// once the database answers again, reads work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_silent_database_times_out_and_recovers() {
    let db = pg::PgDb::create();
    let (proxy, s, http) = silenced(&db, builder()).await;
    let r = tokio::time::timeout(Duration::from_secs(15), send(get(&http, &s, TOKEN, "d1")))
        .await
        .expect("a read must not wait forever")
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["type"], problem_type::TIMEOUT);
    proxy.freeze(false);
    assert!(
        eventually(Duration::from_secs(20), || async {
            send(get(&http, &s, TOKEN, "d1"))
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await,
        "reads did not recover"
    );
}

/// A database that stops answering: a write must be answered too, in
/// bounded time, with an error the client can act on (retry with the same
/// key), not wait forever holding the client's connection and a pooled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_silent_database_is_answered_in_bounded_time() {
    let db = pg::PgDb::create();
    let (_proxy, s, http) = silenced(&db, builder()).await;
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1))),
    )
    .await
    .expect("a write on a silent database waited more than 30 s (request timeout 2 s)")
    .unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
}

/// A tenant row locked by a session that never finishes (a stuck instance,
/// an operator's open transaction): a write of that tenant must be
/// answered in bounded time, not queue forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_a_stuck_tenant_lock_is_answered_in_bounded_time() {
    let db = pg::PgDb::create();
    let s = serve(builder().request_timeout(Duration::from_secs(2)), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let locker = sql(&db.url()).await;
    locker
        .batch_execute("BEGIN; SELECT 1 FROM guardian_tenants WHERE tenant = 'acme' FOR UPDATE")
        .await
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1))),
    )
    .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let r = r
        .expect("a write behind a stuck lock waited more than 30 s (request timeout 2 s)")
        .unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
}

/// A purge on a database that stops answering ends in bounded time with an
/// error (the next one retries), instead of holding a pooled connection
/// for as long as TCP stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_a_silent_database_ends_in_bounded_time() {
    let db = pg::PgDb::create();
    let (_proxy, s, _) = silenced(&db, builder().purge_interval(Duration::from_secs(3600))).await;
    let purged = tokio::time::timeout(Duration::from_secs(30), s.purge_expired())
        .await
        .expect("a purge on a silent database waited more than 30 s (request timeout 2 s)");
    assert!(purged.is_err(), "{purged:?}");
}

/// A tenant row held by a session that never finishes: the purge gives up
/// on that tenant in bounded time and still purges the other tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_behind_a_stuck_tenant_lock_purges_the_other_tenants() {
    let db = pg::PgDb::create();
    let clock = guardian_server::clock::ManualClock::new(1_700_000_000_000);
    let s = serve(
        builder()
            .token("other", OTHER)
            .clock(clock.clone())
            .request_timeout(Duration::from_secs(2))
            .feed_retention(Duration::from_secs(60))
            .purge_interval(Duration::from_secs(3600)),
        &db.url(),
    )
    .await;
    let http = reqwest::Client::new();
    for token in [TOKEN, OTHER] {
        let r = send(create(&http, &s, token, "d1", &json!({"n": 1}), "k1"))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    }
    let c = sql(&db.url()).await;
    let feed = |tenant: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT count(*) FROM guardian_changes WHERE tenant = $1",
                &[&tenant],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    // The first tenant in the purge's order is the one held.
    let locker = sql(&db.url()).await;
    locker
        .batch_execute("BEGIN; SELECT 1 FROM guardian_tenants WHERE tenant = 'acme' FOR UPDATE")
        .await
        .unwrap();
    clock.advance_millis(61_000);
    let purged = tokio::time::timeout(Duration::from_secs(30), s.purge_expired()).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let purged =
        purged.expect("a purge behind a stuck lock waited more than 30 s (request timeout 2 s)");
    assert!(
        purged.is_err(),
        "the held tenant's failure is reported: {purged:?}"
    );
    assert_eq!(feed("other").await, 0, "the other tenant was not purged");
    assert_eq!(feed("acme").await, 1, "the held tenant's feed changed");
    let purged = s.purge_expired().await.unwrap();
    assert_eq!(purged.changes, 1, "the next purge takes what was left");
    assert_eq!(feed("acme").await, 0);
}

/// `lock_timeout` set on the database by its operator: a write behind a
/// held tenant lock fails cleanly (nothing applied), and its retry once the
/// lock is gone applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_set_by_the_operator_fails_the_write_cleanly() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET lock_timeout = '300ms'",
        db_name(&db)
    ))
    .await
    .unwrap();
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, TOKEN, "d1", &json!({"n": 1}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let before = rows(&c, "acme").await;
    let locker = sql(&db.url()).await;
    locker
        .batch_execute(
            "SET lock_timeout = 0; BEGIN; SELECT 1 FROM guardian_tenants WHERE tenant = 'acme' FOR UPDATE",
        )
        .await
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1))),
    )
    .await
    .expect("answered")
    .unwrap();
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    assert_eq!(rows(&c, "acme").await, before);
    let r = send(update(&http, &s, "d1", &json!({"n": 2}), "k2", Some(1)))
        .await
        .unwrap();
    assert_eq!((r.status, r.replayed), (200, false), "{}", r.text);
    assert_eq!(rows(&c, "acme").await.applied, ["k1", "k2"]);
    drop(s);
}

// ---------------------------------------------------------------------------
// Races, values, tenants
// ---------------------------------------------------------------------------

/// Two instances, many concurrent requests with one idempotency key (the
/// same create): it takes effect once, and every success carries the same
/// answer. Then many concurrent updates of one entity at `If-Match: "1"`
/// through both instances: exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_on_one_key_and_one_entity_apply_once() {
    let db = pg::PgDb::create();
    let s = [
        serve(builder(), &db.url()).await,
        serve(builder(), &db.url()).await,
    ];
    let http = reqwest::Client::new();
    let data = json!({"n": 1});
    let reqs: Vec<_> = (0..12)
        .map(|i| send(create(&http, &s[i % 2], TOKEN, "e", &data, "same")))
        .collect();
    let answers = futures::future::join_all(reqs).await;
    let mut bodies = BTreeSet::new();
    let mut fresh = 0;
    for r in answers {
        let r = r.unwrap();
        match r.status {
            201 => {
                fresh += usize::from(!r.replayed);
                bodies.insert(r.text);
            }
            409 => assert_eq!(
                r.body["type"],
                problem_type::IDEMPOTENCY_IN_FLIGHT,
                "{}",
                r.text
            ),
            other => panic!("{other}: {}", r.text),
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let reqs: Vec<_> = (0..12)
        .map(|i| {
            send(update(
                &http,
                &s[i % 2],
                "e",
                &json!({"n": i}),
                &format!("u{i}"),
                Some(1),
            ))
        })
        .collect();
    let mut won = 0;
    for r in futures::future::join_all(reqs).await {
        let r = r.unwrap();
        match r.status {
            200 => won += 1,
            409 => {}
            other => panic!("{other}: {}", r.text),
        }
    }
    assert_eq!(won, 1);
    let log = s[0].applied_log().await.unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    let g = send(get(&http, &s[1], TOKEN, "e")).await.unwrap();
    assert_eq!(g.body["version"], 2);
}

/// Values PostgreSQL `text` cannot hold as such (NUL) or that are hostile
/// otherwise (control characters, NUL in a key, astral characters, the
/// deepest nesting allowed, a large string): stored and served unaltered,
/// by GET, the feed and a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_round_trip_unaltered() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder().body_limit(16 << 20), &db.url()).await;
    let http = reqwest::Client::new();
    let mut deep = json!(1);
    // An object holding arrays: MAX_DATA_DEPTH levels in all.
    for _ in 1..guardian_protocol::MAX_DATA_DEPTH {
        deep = json!([deep]);
    }
    let deep = json!({ "d": deep });
    let cases = [
        (
            "nul",
            json!({"s": "a\u{0}b", "\u{0}k": "\u{1}\u{1f}\u{7f}", "e": "😀\u{2028}\\u0000"}),
        ),
        ("deep", deep),
        ("big", json!({"s": "ž".repeat(4 << 20)})),
    ];
    for (i, (id, data)) in cases.iter().enumerate() {
        let key = format!("k{id}");
        let r = send(create(&http, &s, TOKEN, id, data, &key))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{id}: {}", &r.text[..r.text.len().min(300)]);
        assert_eq!(&r.body["data"], data, "{id}: answer");
        let g = send(get(&http, &s, TOKEN, id)).await.unwrap();
        assert_eq!(&g.body["data"], data, "{id}: GET");
        let again = send(create(&http, &s, TOKEN, id, data, &key))
            .await
            .unwrap();
        assert!(again.replayed, "{id}");
        assert_eq!(again.text, r.text, "{id}: replay");
        let feed = send(
            http.get(format!("{}/v1/changes?since={i}&limit=1", s.url()))
                .bearer_auth(TOKEN),
        )
        .await
        .unwrap();
        assert_eq!(&feed.body["changes"][0]["data"], data, "{id}: feed");
    }
    // Stored as JSON text, the NUL escaped.
    let stored: String = c
        .query_one("SELECT data FROM guardian_entities WHERE id = 'nul'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.contains("\\u0000"), "{stored}");
    drop(s);
}

/// Tenants whose names are hostile SQL or hold a space (the notification
/// payload is `<instance> <tenant>`) share one database with another
/// tenant: same entity ids, separate rows, separate feeds and cursors,
/// nothing of one visible to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_at_the_sql_level() {
    const EVIL: &str = "o'reilly\"; DROP TABLE guardian_entities; -- a b";
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let b = || builder().token(EVIL, OTHER);
    let s = [serve(b(), &db.url()).await, serve(b(), &db.url()).await];
    let http = reqwest::Client::new();
    for (i, token) in [TOKEN, OTHER].into_iter().enumerate() {
        for n in 0..=i {
            let r = send(create(
                &http,
                &s[i],
                token,
                &format!("d{n}"),
                &json!({"owner": token}),
                &format!("k{n}"),
            ))
            .await
            .unwrap();
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }
    // Same key, same id, two tenants: two rows, each tenant's own.
    let r = send(get(&http, &s[1], TOKEN, "d0")).await.unwrap();
    assert_eq!(r.body["data"]["owner"], TOKEN);
    let r = send(get(&http, &s[0], OTHER, "d0")).await.unwrap();
    assert_eq!(r.body["data"]["owner"], OTHER);
    let r = send(get(&http, &s[0], TOKEN, "d1")).await.unwrap();
    assert_eq!(r.status, 404, "the other tenant's entity is invisible");
    let acme = whole_feed(&http, &s[0], TOKEN).await;
    let evil = whole_feed(&http, &s[1], OTHER).await;
    let cursors = |f: &[Value]| {
        f.iter()
            .map(|c| c["cursor"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(cursors(&acme), [1]);
    assert_eq!(cursors(&evil), [1, 2]);
    let per_tenant: Vec<(String, i64)> = c
        .query(
            "SELECT tenant, count(*) FROM guardian_entities GROUP BY tenant ORDER BY tenant",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_tenant, [("acme".to_owned(), 1), (EVIL.to_owned(), 2)]);
    // A cursor of one tenant means nothing to the other.
    let r = send(
        http.get(format!("{}/v1/changes?since=2", s[0].url()))
            .bearer_auth(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 410, "{}", r.text);
    drop(s);
}

/// A careless operator names a tenant with a NUL byte (the builder accepts
/// any non-empty tenant name; SQLite stores it): on PostgreSQL, whose text
/// cannot hold NUL, the server must either refuse the configuration at
/// start or serve the tenant, not start and then fail its every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_name_postgres_cannot_store_is_refused_or_served() {
    let db = pg::PgDb::create();
    let started = builder()
        .token("nul\u{0}tenant", OTHER)
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await;
    let Ok(s) = started else {
        return; // Refused at start: fine.
    };
    let http = reqwest::Client::new();
    let r = send(create(&http, &s, OTHER, "d1", &json!({}), "k1"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
}

/// A database error at start (here: the operator made the database
/// read-only) is reported with what PostgreSQL said, so the operator can
/// act on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_at_start_says_what_postgres_said() {
    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        db_name(&db)
    ))
    .await
    .unwrap();
    let err = builder()
        .postgres(db.url())
        .bind("127.0.0.1:0")
        .await
        .expect_err("a read-only database cannot be migrated");
    assert!(err.to_string().contains("read-only"), "{err}");
}

// ---------------------------------------------------------------------------
// A feed rewritten under a client's cursor
// ---------------------------------------------------------------------------

/// `since_fingerprint` on PostgreSQL, against rows edited behind the
/// server's back: the change the client holds is served on, another one
/// (the row rewritten, as by a restore that then took writes) or none (the
/// row deleted inside the retained feed) is 410 `cursor-expired` with the
/// head, on the feed and on the WebSocket upgrade alike; without the
/// parameter nothing changes, and a malformed one is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_rewritten_under_the_clients_cursor_is_refused_by_its_fingerprint() {
    use guardian_protocol::{ChangeFingerprint, SINCE_FINGERPRINT_PARAM as P};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let db = pg::PgDb::create();
    let c = sql(&db.url()).await;
    let s = serve(builder(), &db.url()).await;
    let http = reqwest::Client::new();
    for (id, key) in [("d1", "a"), ("d2", "b"), ("d3", "c")] {
        let r = send(create(&http, &s, TOKEN, id, &json!({}), key))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let feed = |query: String| {
        send(
            http.get(format!("{}/v1/changes?{query}", s.url()))
                .bearer_auth(TOKEN),
        )
    };
    let upgrade = |query: String| {
        let mut req = format!("{}?{query}", s.realtime_url())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        async move {
            match tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async(req),
            )
            .await
            .expect("upgrade answered in time")
            {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
                Err(e) => panic!("upgrade failed: {e}"),
            }
        }
    };
    let at2 = ChangeFingerprint::of("device", "d2", 1);
    let plain = feed("since=2".to_owned()).await.unwrap();
    let r = feed(format!("since=2&{P}={at2}")).await.unwrap();
    assert_eq!((r.status, &r.body), (200, &plain.body), "{}", r.text);
    assert_eq!(upgrade(format!("since=2&{P}={at2}")).await, 101);
    let r = feed(format!("since=2&{P}=nothex")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text);

    // The row at 2 now names another change.
    c.execute(
        "UPDATE guardian_changes SET id = 'm2' WHERE tenant = 'acme' AND cursor = 2",
        &[],
    )
    .await
    .unwrap();
    let r = feed(format!("since=2&{P}={at2}")).await.unwrap();
    assert_eq!(r.status, 410, "{}", r.text);
    assert_eq!(r.body["type"], problem_type::CURSOR_EXPIRED);
    assert_eq!(r.body[problem_type::FEED_HEAD], 3);
    assert_eq!(upgrade(format!("since=2&{P}={at2}")).await, 410);
    let at2_now = ChangeFingerprint::of("device", "m2", 1);
    assert_eq!(
        feed(format!("since=2&{P}={at2_now}")).await.unwrap().status,
        200
    );

    // No row at 2 at all, inside the retained feed.
    c.execute(
        "DELETE FROM guardian_changes WHERE tenant = 'acme' AND cursor = 2",
        &[],
    )
    .await
    .unwrap();
    let r = feed(format!("since=2&{P}={at2_now}")).await.unwrap();
    assert_eq!(
        (r.status, r.body["type"].clone()),
        (410, json!(problem_type::CURSOR_EXPIRED))
    );
    let r = feed("since=2".to_owned()).await.unwrap();
    assert_eq!(
        (r.status, r.body["changes"][0]["cursor"].clone()),
        (200, json!(3))
    );
    s.shutdown().await;
}
