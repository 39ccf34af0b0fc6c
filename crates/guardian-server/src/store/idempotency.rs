//! The idempotency store: `(tenant, key)` → fingerprint and stored response.
//!
//! The fingerprint is `sha256(METHOD "\n" PATH "\n" canonical-body)`, where
//! the canonical body is the typed request body re-serialized with object
//! keys sorted (no whitespace), and empty for DELETE. A batch op is
//! fingerprinted as the single request it stands for:
//! - `create` → `POST /v1/entities/{type}` with body `{"data":…,"id":…}`;
//! - `update` → `PUT /v1/entities/{type}/{id}` with body `{"data":…}`;
//! - `delete` → `DELETE /v1/entities/{type}/{id}` with an empty body.
//!
//! so a key first applied in a batch replays for a single request and back.
//! `If-Match` is not part of the fingerprint (DESIGN §10: method, path, body).
//!
//! Only mutations that took effect store their response: a refused mutation
//! (404, 409, 410, 428…) changed nothing, so a retry is simply evaluated
//! again. Records expire after the retention; an expired key is new again.

use guardian_protocol::MutationKind;
use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::StoreError;

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredResponse {
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) status: u16,
    pub(crate) body: Value,
}

/// The fingerprint of a mutation, as the single request it is or stands for.
pub(crate) fn fingerprint(
    kind: MutationKind,
    entity_type: &str,
    id: &str,
    data: &Value,
) -> [u8; 32] {
    let (method, path, body) = match kind {
        MutationKind::Create => (
            "POST",
            format!("/v1/entities/{entity_type}"),
            canonical(&serde_json::json!({"id": id, "data": data})),
        ),
        MutationKind::Update => (
            "PUT",
            format!("/v1/entities/{entity_type}/{id}"),
            canonical(&serde_json::json!({"data": data})),
        ),
        MutationKind::Delete => (
            "DELETE",
            format!("/v1/entities/{entity_type}/{id}"),
            String::new(),
        ),
    };
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    h.finalize().into()
}

/// JSON with object keys sorted and no whitespace.
pub(crate) fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(k) {
                    write_canonical(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The unexpired record of `(tenant, key)`, if any.
pub(crate) fn lookup(
    tx: &Transaction<'_>,
    tenant: &str,
    key: &str,
    not_before_ms: i64,
) -> Result<Option<StoredResponse>, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT fingerprint, status, body FROM idempotency
             WHERE tenant = ?1 AND key = ?2 AND created_at >= ?3",
        )?
        .query_row(params![tenant, key, not_before_ms], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, u16>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?;
    row.map(|(fingerprint, status, body)| {
        let body = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("stored response is not JSON: {e}")))?;
        Ok(StoredResponse {
            fingerprint,
            status,
            body,
        })
    })
    .transpose()
}

/// Stores the response of an applied mutation (replacing an expired record).
pub(crate) fn store(
    tx: &Transaction<'_>,
    tenant: &str,
    key: &str,
    fingerprint: &[u8],
    status: u16,
    body: &Value,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO idempotency (tenant, key, fingerprint, status, body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        tenant,
        key,
        fingerprint,
        status,
        body.to_string(),
        now_ms
    ])?;
    Ok(())
}

/// Deletes records created before `not_before_ms`; returns how many.
pub(crate) fn purge(tx: &Transaction<'_>, not_before_ms: i64) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM idempotency WHERE created_at < ?1",
        params![not_before_ms],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_recursively() {
        let v = json!({"b": [{"z": 1, "a": 2}], "a": "x\"y"});
        assert_eq!(canonical(&v), r#"{"a":"x\"y","b":[{"a":2,"z":1}]}"#);
    }

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let d = json!({"a": 1});
        let create = fingerprint(MutationKind::Create, "t", "i", &d);
        let update = fingerprint(MutationKind::Update, "t", "i", &d);
        let other = fingerprint(MutationKind::Update, "t", "j", &d);
        let body = fingerprint(MutationKind::Update, "t", "i", &json!({"a": 2}));
        assert_ne!(create, update);
        assert_ne!(update, other);
        assert_ne!(update, body);
        assert_eq!(
            update,
            fingerprint(MutationKind::Update, "t", "i", &json!({"a": 1}))
        );
    }
}
