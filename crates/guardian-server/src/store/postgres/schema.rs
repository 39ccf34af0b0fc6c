//! The PostgreSQL schema: its numbered migrations and the check that the
//! `guardian_*` tables of a database are this server's before anything is
//! written.
//!
//! Invariant: a start changes nothing it did not create. The version in
//! `guardian_meta` is read first; a database with tables under our names
//! but no `guardian_meta` is someone else's, and tables whose columns are
//! not those of their version are refused, never altered. DDL runs only
//! when the stored version is older than [`SCHEMA_VERSION`], so a role
//! with DML rights alone can serve an up-to-date schema.

use std::collections::BTreeMap;

use deadpool_postgres::{Pool, Transaction};

use super::{pool_error, StoreError};

/// Schema version this server writes (`guardian_meta.schema_version`).
pub(super) const SCHEMA_VERSION: i64 = 2;

/// Key of the advisory lock that serializes the schema check and
/// migrations of instances starting together.
const MIGRATION_LOCK: i64 = 0x6773_796e_635f_6d31;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE guardian_meta (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
CREATE TABLE guardian_tenants (
    tenant text PRIMARY KEY,
    last_cursor bigint NOT NULL DEFAULT 0,
    purged_through bigint NOT NULL DEFAULT 0
);
CREATE TABLE guardian_entities (
    tenant text NOT NULL,
    entity_type text NOT NULL,
    id text NOT NULL,
    version bigint NOT NULL,
    data text NOT NULL,
    updated_at bigint NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (tenant, entity_type, id)
);
CREATE TABLE guardian_idempotency (
    tenant text NOT NULL,
    key text NOT NULL,
    fingerprint bytea NOT NULL,
    status integer NOT NULL,
    body text NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX guardian_idempotency_created ON guardian_idempotency (created_at);
CREATE TABLE guardian_changes (
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
CREATE INDEX guardian_changes_at ON guardian_changes (at);
CREATE TABLE guardian_applied (
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
",
    "ALTER TABLE guardian_applied ADD COLUMN transaction_key text;",
];

/// Every column of every version: table, column, type (as `format_type`
/// prints it) and the version that added it. Checked against what the
/// migrations create each time they run, so the two cannot drift apart.
const COLUMNS: &[(&str, &str, &str, i64)] = &[
    ("guardian_meta", "name", "text", 1),
    ("guardian_meta", "value", "bigint", 1),
    ("guardian_tenants", "tenant", "text", 1),
    ("guardian_tenants", "last_cursor", "bigint", 1),
    ("guardian_tenants", "purged_through", "bigint", 1),
    ("guardian_entities", "tenant", "text", 1),
    ("guardian_entities", "entity_type", "text", 1),
    ("guardian_entities", "id", "text", 1),
    ("guardian_entities", "version", "bigint", 1),
    ("guardian_entities", "data", "text", 1),
    ("guardian_entities", "updated_at", "bigint", 1),
    ("guardian_entities", "deleted", "boolean", 1),
    ("guardian_idempotency", "tenant", "text", 1),
    ("guardian_idempotency", "key", "text", 1),
    ("guardian_idempotency", "fingerprint", "bytea", 1),
    ("guardian_idempotency", "status", "integer", 1),
    ("guardian_idempotency", "body", "text", 1),
    ("guardian_idempotency", "created_at", "bigint", 1),
    ("guardian_changes", "tenant", "text", 1),
    ("guardian_changes", "cursor", "bigint", 1),
    ("guardian_changes", "op", "text", 1),
    ("guardian_changes", "entity_type", "text", 1),
    ("guardian_changes", "id", "text", 1),
    ("guardian_changes", "version", "bigint", 1),
    ("guardian_changes", "data", "text", 1),
    ("guardian_changes", "at", "bigint", 1),
    ("guardian_applied", "seq", "bigint", 1),
    ("guardian_applied", "tenant", "text", 1),
    ("guardian_applied", "idempotency_key", "text", 1),
    ("guardian_applied", "entity_type", "text", 1),
    ("guardian_applied", "id", "text", 1),
    ("guardian_applied", "op", "text", 1),
    ("guardian_applied", "version", "bigint", 1),
    ("guardian_applied", "cursor", "bigint", 1),
    ("guardian_applied", "at", "bigint", 1),
    ("guardian_applied", "transaction_key", "text", 2),
];

const META: &str = "guardian_meta";

/// A relation found under one of our names: its kind (`pg_class.relkind`)
/// and its columns with their types.
#[derive(Debug, Default)]
struct Found {
    kind: String,
    columns: BTreeMap<String, String>,
}

/// Our table names, each once, in the order of [`COLUMNS`].
fn table_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Vec::new();
    for (t, ..) in COLUMNS {
        if !names.contains(t) {
            names.push(t);
        }
    }
    names
}

/// Checks the schema and brings it up to date, in one transaction under
/// an advisory lock, so instances starting together do not race (the
/// second sees what the first committed).
pub(super) async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let found = relations(&tx).await?;
    let from = if found.contains_key(META) {
        check(&found, META, 1)?;
        let version = stored_version(&tx).await?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this server ({SCHEMA_VERSION})"
            )));
        }
        for table in table_names() {
            check(&found, table, version)?;
        }
        version
    } else if found.is_empty() {
        0
    } else {
        let names: Vec<&str> = found.keys().map(String::as_str).collect();
        return Err(StoreError::ForeignSchema(format!(
            "{} exist without guardian_meta",
            names.join(", ")
        )));
    };
    if from == SCHEMA_VERSION {
        // Nothing written: a role without DDL rights gets this far.
        tx.commit().await?;
        return Ok(());
    }
    for sql in MIGRATIONS.iter().skip(usize::try_from(from).unwrap_or(0)) {
        tx.batch_execute(sql).await?;
    }
    tx.execute(
        "INSERT INTO guardian_meta (name, value) VALUES ('schema_version', $1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION],
    )
    .await?;
    let made = relations(&tx).await?;
    for table in table_names() {
        check(&made, table, SCHEMA_VERSION)?;
    }
    tx.commit().await?;
    Ok(())
}

/// The relations under our table names, as this connection's
/// `search_path` resolves them (the way every query of the store does).
async fn relations(tx: &Transaction<'_>) -> Result<BTreeMap<String, Found>, StoreError> {
    let rows = tx
        .query(
            "SELECT t.name, c.relkind::text, a.attname::text,
                    format_type(a.atttypid, a.atttypmod)
             FROM unnest($1::text[]) AS t(name)
             JOIN pg_class c ON c.oid = to_regclass(t.name)
             LEFT JOIN pg_attribute a
                    ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table_names()],
        )
        .await?;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for r in rows {
        let f = found.entry(r.try_get(0)?).or_default();
        f.kind = r.try_get(1)?;
        if let (Some(column), Some(ty)) = (
            r.try_get::<_, Option<String>>(2)?,
            r.try_get::<_, Option<String>>(3)?,
        ) {
            f.columns.insert(column, ty);
        }
    }
    Ok(found)
}

/// The version stamped in `guardian_meta`.
async fn stored_version(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    let row = tx
        .query_opt(
            "SELECT value FROM guardian_meta WHERE name = 'schema_version'",
            &[],
        )
        .await?;
    match row.map(|r| r.try_get::<_, i64>(0)).transpose()? {
        Some(v) if v >= 1 => Ok(v),
        Some(v) => Err(StoreError::Corrupt(format!("database schema version {v}"))),
        None => Err(StoreError::ForeignSchema(
            "guardian_meta holds no schema_version".into(),
        )),
    }
}

/// Whether `table` is there with exactly the columns `version` gave it.
fn check(found: &BTreeMap<String, Found>, table: &str, version: i64) -> Result<(), StoreError> {
    let Some(f) = found.get(table) else {
        return Err(StoreError::Corrupt(format!(
            "table {table} of schema version {version} is missing"
        )));
    };
    if !matches!(f.kind.as_str(), "r" | "p") {
        return Err(StoreError::ForeignSchema(format!("{table} is not a table")));
    }
    let expected: BTreeMap<&str, &str> = COLUMNS
        .iter()
        .filter(|(t, .., since)| *t == table && *since <= version)
        .map(|(_, c, ty, _)| (*c, *ty))
        .collect();
    let actual: BTreeMap<&str, &str> = f
        .columns
        .iter()
        .map(|(c, ty)| (c.as_str(), ty.as_str()))
        .collect();
    if actual == expected {
        return Ok(());
    }
    let show = |m: &BTreeMap<&str, &str>| {
        m.iter()
            .map(|(c, ty)| format!("{c} {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(StoreError::ForeignSchema(format!(
        "{table} has columns ({}), schema version {version} has ({})",
        show(&actual),
        show(&expected)
    )))
}
