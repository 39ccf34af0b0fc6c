//! Throwaway PostgreSQL databases for tests: one per test, with a unique
//! name, dropped at the end, so tests running in parallel never share one.
//!
//! The server is the one at 127.0.0.1:5432 (trust auth, user `postgres`),
//! or the one `GUARDIAN_TEST_PG` names (a URL of its maintenance database).

use std::time::Duration;

use tokio_postgres::NoTls;

/// The maintenance database the test databases are created from.
pub(crate) fn admin_url() -> String {
    std::env::var("GUARDIAN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists until this is dropped.
#[derive(Debug)]
pub(crate) struct PgDb {
    name: String,
}

/// Serializes CREATE/DROP DATABASE of every test process: two CREATE
/// DATABASE at once fail ("template1 is being accessed by other users").
const ADMIN_LOCK: i64 = 0x6773_7465_7374_6462;

/// Runs one statement on the maintenance database under [`ADMIN_LOCK`], on
/// a thread of its own (callable from sync code and from inside a runtime
/// alike).
fn admin(sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let url = admin_url();
            let connect = tokio_postgres::connect(&url, NoTls);
            let (client, conn) = tokio::time::timeout(Duration::from_secs(10), connect)
                .await
                .map_err(|_| "timed out connecting to PostgreSQL".to_owned())?
                .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
            let driver = tokio::spawn(conn);
            let detail = |e: tokio_postgres::Error| match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            };
            // Session-level: CREATE DATABASE cannot run in a transaction.
            let r = async {
                client
                    .execute("SELECT pg_advisory_lock($1)", &[&ADMIN_LOCK])
                    .await
                    .map_err(detail)?;
                client.batch_execute(&sql).await.map_err(detail)
            }
            .await;
            drop(client);
            let _ = driver.await;
            r
        })
    })
    .join()
    .map_err(|_| "admin thread panicked".to_owned())?
}

impl PgDb {
    pub(crate) fn create() -> Self {
        let name = format!("gs_test_{}", uuid::Uuid::new_v4().simple());
        admin(format!("CREATE DATABASE {name}")).expect("create a test database");
        Self { name }
    }

    pub(crate) fn url(&self) -> String {
        let admin = admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // FORCE: the servers' pooled connections may still be open.
        if let Err(e) = admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}
