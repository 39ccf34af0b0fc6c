//! The idempotency store: `(tenant, key)` → fingerprint and stored response.
//!
//! The fingerprint is `sha256(METHOD "\n" PATH "\n" canonical-body)`, where
//! the canonical body is the typed request body re-serialized with object
//! keys sorted (no whitespace) and numbers by the value they denote
//! ([`guardian_protocol::canonical_number`]: `1.0` and `1` are one request,
//! `12345678901234567890123` and `…124` two), and empty for DELETE. A batch op is
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

use std::borrow::Cow;

use guardian_protocol::MutationKind;
use rusqlite::{params, OptionalExtension, Statement, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::apply::KeptResponse;
use super::{Cutoff, StoreError};

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredResponse {
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) status: u16,
    /// The response body as stored: JSON text.
    pub(crate) body: String,
}

/// The fingerprint of a mutation, as the single request it is or stands for.
///
/// `data_json` is [`fingerprint_data`] of the data (ignored for deletes). The
/// canonical body of a create, `{"data":…,"id":…}`, and of an update,
/// `{"data":…}`, is hashed piecewise rather than built.
pub(crate) fn fingerprint(
    kind: MutationKind,
    entity_type: &str,
    id: &str,
    data_json: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    match kind {
        MutationKind::Create => {
            h.update(b"POST\n/v1/entities/");
            h.update(entity_type.as_bytes());
            h.update(b"\n{\"data\":");
            h.update(data_json.as_bytes());
            h.update(b",\"id\":");
            h.update(json_string(id).as_bytes());
            h.update(b"}");
        }
        MutationKind::Update => {
            h.update(b"PUT\n/v1/entities/");
            h.update(entity_type.as_bytes());
            h.update(b"/");
            h.update(id.as_bytes());
            h.update(b"\n{\"data\":");
            h.update(data_json.as_bytes());
            h.update(b"}");
        }
        MutationKind::Delete => {
            h.update(b"DELETE\n/v1/entities/");
            h.update(entity_type.as_bytes());
            h.update(b"/");
            h.update(id.as_bytes());
            h.update(b"\n");
        }
    }
    h.finalize().into()
}

/// `s` as a JSON string literal.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_json_string(s, &mut out);
    into_string(out)
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// serde_json only ever writes UTF-8.
fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// JSON with object keys sorted and no whitespace, numbers as written: the
/// text the store keeps and serves.
pub(crate) fn canonical(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(v, &mut out, false);
    into_string(out)
}

/// The data text a [`fingerprint`] hashes: `data_json` ([`canonical`] of
/// `data`) with every number in its canonical form, which it already is
/// unless a number is spelled otherwise (`1.0`, `-0`, `1e+2`).
pub(crate) fn fingerprint_data<'a>(data: &Value, data_json: &'a str) -> Cow<'a, str> {
    if guardian_protocol::numbers_are_canonical(data) {
        Cow::Borrowed(data_json)
    } else {
        let mut out = Vec::with_capacity(data_json.len());
        write_canonical(data, &mut out, true);
        Cow::Owned(into_string(out))
    }
}

fn write_canonical(v: &Value, out: &mut Vec<u8>, numbers_by_value: bool) {
    match v {
        Value::Object(map) => {
            out.push(b'{');
            let mut write_member = |i: usize, k: &str, inner: &Value| {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(k, out);
                out.push(b':');
                write_canonical(inner, out, numbers_by_value);
            };
            // serde_json's default map is already sorted: no need to sort.
            if map.keys().is_sorted() {
                for (i, (k, inner)) in map.iter().enumerate() {
                    write_member(i, k, inner);
                }
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (i, (k, inner)) in entries.into_iter().enumerate() {
                    write_member(i, k, inner);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out, numbers_by_value);
            }
            out.push(b']');
        }
        Value::Number(n) if numbers_by_value => {
            out.extend_from_slice(guardian_protocol::canonical_number(n).as_bytes());
        }
        // Scalars: serde_json's own compact form (cannot fail into a Vec).
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// SQL of [`lookup`].
pub(crate) const LOOKUP_SQL: &str = "SELECT fingerprint, status, body FROM idempotency
             WHERE tenant = ?1 AND key = ?2 AND created_at >= ?3";

/// The unexpired record of `(tenant, key)`, if any (`stmt`: [`LOOKUP_SQL`]).
pub(crate) fn lookup(
    stmt: &mut Statement<'_>,
    tenant: &str,
    key: &str,
    not_before_ms: i64,
) -> Result<Option<StoredResponse>, StoreError> {
    Ok(stmt
        .query_row(params![tenant, key, not_before_ms], |r| {
            Ok(StoredResponse {
                fingerprint: r.get(0)?,
                status: r.get(1)?,
                body: r.get(2)?,
            })
        })
        .optional()?)
}

/// SQL of [`store`].
pub(crate) const STORE_SQL: &str =
    "INSERT OR REPLACE INTO idempotency (tenant, key, fingerprint, status, body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Stores the response of an applied mutation, replacing an expired record
/// (`stmt`: [`STORE_SQL`]).
pub(crate) fn store(
    stmt: &mut Statement<'_>,
    tenant: &str,
    r: KeptResponse<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    stmt.execute(params![
        tenant,
        r.key,
        r.fingerprint,
        r.status,
        r.body,
        now_ms
    ])?;
    Ok(())
}

/// Deletes the expired records of the front, in the order they were
/// stored, up to the first one still young (see [`Cutoff`]); returns how
/// many. A record stamped in the future is passed over but kept: lookups
/// honour it until it expires.
///
/// Records are appended (`seq`), so the walk reads only what it deletes and
/// one row more, and no index on `created_at` is kept up to date on every
/// write. After a clock step back an expired record may wait behind a
/// younger one; lookups ignore it meanwhile, as they ignore every expired
/// record.
pub(crate) fn purge(tx: &Transaction<'_>, cutoff: Cutoff) -> Result<usize, StoreError> {
    let through = {
        let mut stmt = tx.prepare("SELECT seq, created_at FROM idempotency ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut through = None;
        while let Some(row) = rows.next()? {
            if cutoff.stops_at(row.get::<_, i64>(1)?) {
                break;
            }
            through = Some(row.get::<_, i64>(0)?);
        }
        through
    };
    match through {
        Some(seq) => Ok(tx.execute(
            "DELETE FROM idempotency WHERE seq <= ?1 AND created_at < ?2",
            params![seq, cutoff.not_before],
        )?),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A cutoff at `not_before` with the clock at 50,000.
    fn cut(not_before: i64) -> Cutoff {
        Cutoff {
            not_before,
            now: 50_000,
        }
    }

    /// The stored keys, oldest record first.
    fn keys(tx: &Transaction<'_>) -> Vec<String> {
        tx.prepare("SELECT key FROM idempotency ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A record stamped in the future does not stall the purge: the expired
    /// records on either side of it go, and it stays (lookups honour it).
    #[test]
    fn purge_passes_over_a_record_from_the_future() {
        let mut conn = super::super::schema::open(None, super::super::Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        let mut st = tx.prepare(STORE_SQL).unwrap();
        for (key, at) in [("a", 100), ("b", 90_000), ("c", 200), ("d", 2_000)] {
            let r = KeptResponse {
                key,
                fingerprint: b"f",
                status: 200,
                body: "null",
            };
            store(&mut st, "t", r, at).unwrap();
        }
        drop(st);
        assert_eq!(purge(&tx, cut(1_000)).unwrap(), 2);
        assert_eq!(keys(&tx), ["b", "d"]);
    }

    /// Retention deletes the records made before the cutoff from the
    /// front, stops at the first one still young (after a clock step back,
    /// older records wait behind it), and a replaced record moves to the end.
    #[test]
    fn purge_takes_the_expired_front_only() {
        let mut conn = super::super::schema::open(None, super::super::Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        let mut st = tx.prepare(STORE_SQL).unwrap();
        let keep = |key: &'static str| KeptResponse {
            key,
            fingerprint: b"f",
            status: 200,
            body: "null",
        };
        for (key, at) in [("a", 100), ("b", 200), ("c", 9_000), ("d", 300), ("a", 400)] {
            store(&mut st, "t", keep(key), at).unwrap();
        }
        drop(st);
        assert_eq!(keys(&tx), ["b", "c", "d", "a"]);
        assert_eq!(purge(&tx, cut(1_000)).unwrap(), 1);
        assert_eq!(keys(&tx), ["c", "d", "a"]);
        assert_eq!(purge(&tx, cut(10_000)).unwrap(), 3);
        assert_eq!(purge(&tx, cut(10_000)).unwrap(), 0);
    }

    #[test]
    fn canonical_sorts_keys_recursively() {
        let v = json!({"b": [{"z": 1, "a": 2}], "a": "x\"y"});
        assert_eq!(canonical(&v), r#"{"a":"x\"y","b":[{"a":2,"z":1}]}"#);
    }

    fn fp(kind: MutationKind, t: &str, i: &str, d: &Value) -> [u8; 32] {
        fingerprint(kind, t, i, &canonical(d))
    }

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let d = json!({"a": 1});
        let create = fp(MutationKind::Create, "t", "i", &d);
        let update = fp(MutationKind::Update, "t", "i", &d);
        let other = fp(MutationKind::Update, "t", "j", &d);
        let body = fp(MutationKind::Update, "t", "i", &json!({"a": 2}));
        assert_ne!(create, update);
        assert_ne!(update, other);
        assert_ne!(update, body);
        assert_eq!(update, fp(MutationKind::Update, "t", "i", &json!({"a": 1})));
    }

    /// The documented definition, built the slow way: the hash of
    /// `METHOD "\n" PATH "\n" canonical(typed body)`.
    fn by_definition(kind: MutationKind, t: &str, i: &str, d: &Value) -> [u8; 32] {
        let (method, path, body) = match kind {
            MutationKind::Create => (
                "POST",
                format!("/v1/entities/{t}"),
                canonical(&json!({"id": i, "data": d})),
            ),
            MutationKind::Update => (
                "PUT",
                format!("/v1/entities/{t}/{i}"),
                canonical(&json!({"data": d})),
            ),
            MutationKind::Delete => ("DELETE", format!("/v1/entities/{t}/{i}"), String::new()),
        };
        Sha256::digest(format!("{method}\n{path}\n{body}")).into()
    }

    #[test]
    fn piecewise_fingerprint_is_the_documented_one() {
        let d = json!({"z": [1, 2.5, {"y": null, "b": "\u{e9}\"\n"}], "a": {"k": true}});
        for kind in [
            MutationKind::Create,
            MutationKind::Update,
            MutationKind::Delete,
        ] {
            assert_eq!(
                fp(kind, "device", "d-1.x_", &d),
                by_definition(kind, "device", "d-1.x_", &d),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn numbers_are_kept_as_written_and_fingerprinted_by_value() {
        let written: Value =
            serde_json::from_str(r#"{"b":[1.0,-0],"a":{"x":1E2,"y":1.2345678901234567890123e22}}"#)
                .unwrap();
        let plain: Value =
            serde_json::from_str(r#"{"a":{"x":100,"y":12345678901234567890123},"b":[1,0]}"#)
                .unwrap();
        let text = canonical(&written);
        assert_eq!(
            text,
            r#"{"a":{"x":1e+2,"y":1.2345678901234567890123e+22},"b":[1.0,-0]}"#
        );
        let by_value = fingerprint_data(&written, &text);
        assert_eq!(by_value, canonical(&plain));
        assert!(matches!(
            fingerprint_data(&plain, &canonical(&plain)),
            Cow::Borrowed(_)
        ));
        let fp = |d: &Value| {
            fingerprint(
                MutationKind::Update,
                "t",
                "i",
                &fingerprint_data(d, &canonical(d)),
            )
        };
        assert_eq!(fp(&written), fp(&plain));
        let other: Value =
            serde_json::from_str(r#"{"a":{"x":100,"y":12345678901234567890124},"b":[1,0]}"#)
                .unwrap();
        assert_ne!(fp(&other), fp(&plain));
    }

    #[test]
    fn canonical_escapes_and_formats_like_serde_json() {
        // Keys already in order, so this holds whatever map serde_json uses.
        let d = json!({"a": "x\u{1}\u{2028}\\", "b": [1, -2, 3.25, 1e300, u64::MAX], "c": {"d": [], "e": {}}});
        assert_eq!(canonical(&d), d.to_string());
    }
}
