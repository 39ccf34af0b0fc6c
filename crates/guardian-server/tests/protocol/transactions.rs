//! `POST /v1/transactions`: all or nothing. A commit applies every op with
//! consecutive cursors and logs each under the transaction's key; a refused
//! op aborts with nothing applied, recorded or fed; a retry replays the
//! whole response; faults never leave a transaction half-applied.

use guardian_protocol::problem_type;
use guardian_server::Faults;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{builder, start, start_default, Harness, Resp, ADMIN};

fn txn_body(key: &str, ops: &Value) -> Value {
    json!({"transaction_key": key, "ops": ops})
}

pub(crate) async fn txn(h: &Harness, key: &str, ops: Value) -> Resp {
    h.send(
        h.req(Method::POST, "/v1/transactions")
            .json(&txn_body(key, &ops)),
    )
    .await
}

/// The response as raw text (for byte-for-byte comparisons).
async fn txn_text(h: &Harness, key: &str, ops: &Value) -> (u16, Option<String>, String) {
    let resp = h
        .req(Method::POST, "/v1/transactions")
        .json(&txn_body(key, ops))
        .send()
        .await
        .unwrap();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), replayed, resp.text().await.unwrap())
}

fn statuses(r: &Value) -> Vec<u64> {
    crate::common::batch_statuses(r)
}

/// What a test compares before and after a transaction that must change
/// nothing: every entity it names, the feed and the applied log.
#[derive(Debug, PartialEq)]
struct Snapshot {
    entities: Vec<(u16, Value)>,
    feed: Value,
    log: Vec<guardian_server::AppliedMutation>,
}

async fn snapshot(h: &Harness, ids: &[&str]) -> Snapshot {
    let mut entities = Vec::new();
    for id in ids {
        let r = h.get("device", id).await;
        entities.push((r.status, r.body));
    }
    Snapshot {
        entities,
        feed: h.changes(0, 1000).await.body,
        log: h.server.applied_log().await.unwrap(),
    }
}

fn assert_aborted(r: &Resp, failed: usize, status: u64, problem: &str) {
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["committed"], false, "{}", r.body);
    assert_eq!(r.body["failed_op"], failed, "{}", r.body);
    assert_eq!(r.body["replayed"], false);
    let results = r.body["results"].as_array().unwrap();
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["replayed"], false);
        if i == failed {
            assert_eq!(res["status"], status, "{res}");
            assert_eq!(res["body"]["type"], problem, "{res}");
        } else {
            assert_eq!(res["status"], 424, "{res}");
            assert_eq!(res["body"]["type"], problem_type::TRANSACTION_ABORTED);
            assert_eq!(res["body"]["title"], "Transaction aborted");
            let detail = res["body"]["detail"].as_str().unwrap();
            assert!(detail.contains(&format!("op {failed} ")), "{detail}");
        }
    }
}

/// A scene of three devices: create two, switch the third, all at once.
fn scene(tag: &str, v3: u64) -> Value {
    json!([
        {"op": "create", "type": "device", "id": "d1", "data": {"on": true}, "idempotency_key": format!("{tag}-1")},
        {"op": "create", "type": "device", "id": "d2", "data": {"on": true}, "idempotency_key": format!("{tag}-2")},
        {"op": "update", "type": "device", "id": "d3", "data": {"on": true}, "if_match": v3, "idempotency_key": format!("{tag}-3")},
        {"op": "update", "type": "device", "id": "d1", "data": {"on": false}, "depends_on": 0, "if_match_chained": true, "idempotency_key": format!("{tag}-4")},
    ])
}

#[tokio::test]
async fn a_transaction_commits_every_op_with_consecutive_cursors() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    let r = txn(&h, "t1", scene("a", 1)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_eq!(r.body["committed"], true);
    assert!(r.body.get("failed_op").is_none(), "{}", r.body);
    assert_eq!(r.body["replayed"], false);
    assert_eq!(statuses(&r.body), vec![201, 201, 200, 200]);
    let versions: Vec<u64> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"]["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 1, 2, 2]);
    assert_eq!(
        h.get("device", "d1").await.body["data"],
        json!({"on": false})
    );
    assert_eq!(h.get("device", "d2").await.body["version"], 1);
    assert_eq!(
        h.get("device", "d3").await.body["data"],
        json!({"on": true})
    );

    let feed = h.changes(1, 100).await.body;
    let changes: Vec<(u64, &str, u64)> = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["cursor"].as_u64().unwrap(),
                c["id"].as_str().unwrap(),
                c["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![(2, "d1", 1), (3, "d2", 1), (4, "d3", 2), (5, "d1", 2)]
    );
    let log = h.server.applied_log().await.unwrap();
    let rows: Vec<(&str, Option<&str>, u64)> = log
        .iter()
        .map(|a| {
            (
                a.idempotency_key.as_str(),
                a.transaction_key.as_deref(),
                a.cursor,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("pre", None, 1),
            ("a-1", Some("t1"), 2),
            ("a-2", Some("t1"), 3),
            ("a-3", Some("t1"), 4),
            ("a-4", Some("t1"), 5),
        ]
    );
    // Over HTTP: the key is there on a transaction's rows only.
    let admin = h.send(h.admin(Method::GET, "/admin/applied")).await;
    assert!(admin.body[0].get("transaction_key").is_none());
    assert_eq!(admin.body[1]["transaction_key"], "t1");
    let _ = ADMIN;
}

#[tokio::test]
async fn a_refused_op_aborts_everything_and_every_key_stays_new() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    h.create("device", "gone", json!({}), "pre-g").await;
    h.delete("device", "gone", "pre-gd", None).await;
    let ids = ["d1", "d2", "d3", "gone", "nope"];
    let before = snapshot(&h, &ids).await;
    let base = scene("a", 1);
    // (the op replacing op 2, the status and type op 2 gets)
    let cases = [
        (
            json!({"op": "update", "type": "device", "id": "d3", "data": {"on": true}, "if_match": 7, "idempotency_key": "a-3"}),
            409,
            problem_type::CONFLICT_VERSION,
        ),
        (
            json!({"op": "create", "type": "device", "id": "d3", "data": {}, "idempotency_key": "a-3"}),
            409,
            problem_type::CONFLICT_EXISTS,
        ),
        (
            json!({"op": "update", "type": "device", "id": "nope", "data": {}, "idempotency_key": "a-3"}),
            404,
            problem_type::NOT_FOUND,
        ),
        (
            json!({"op": "delete", "type": "device", "id": "gone", "idempotency_key": "a-3"}),
            410,
            problem_type::GONE,
        ),
        (
            // The key was used for another request before: 422 for the op.
            json!({"op": "update", "type": "device", "id": "d3", "data": {"x": 1}, "idempotency_key": "pre"}),
            422,
            problem_type::IDEMPOTENCY_MISMATCH,
        ),
        (
            // Malformed: refused before the store, at its own index.
            json!({"op": "update", "type": "device", "id": "d3", "data": [1], "idempotency_key": "a-3"}),
            400,
            problem_type::BAD_REQUEST,
        ),
    ];
    for (op, status, problem) in cases {
        let mut ops = base.clone();
        ops[2] = op;
        let r = txn(&h, "t1", ops).await;
        assert_aborted(&r, 2, status, problem);
        if status == 409 && problem == problem_type::CONFLICT_VERSION {
            assert_eq!(r.body["results"][2]["body"]["current"]["version"], 1);
        }
        assert_eq!(snapshot(&h, &ids).await, before, "{problem}");
    }
    // Nothing was recorded, the transaction's key included: the corrected
    // transaction commits under the same key, every op fresh.
    let r = txn(&h, "t1", base).await;
    assert_eq!(r.body["committed"], true, "{}", r.body);
    let fresh: Vec<bool> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(fresh, vec![false; 4]);
}

#[tokio::test]
async fn an_op_needing_if_match_aborts_with_428() {
    let h = start(builder().require_if_match(true)).await;
    h.create("device", "d3", json!({}), "pre").await;
    let before = snapshot(&h, &["d1", "d3"]).await;
    let r = txn(
        &h,
        "t",
        json!([
            {"op": "create", "type": "device", "id": "d1", "data": {}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "d3", "data": {"x": 1}, "idempotency_key": "b"},
        ]),
    )
    .await;
    assert_aborted(&r, 1, 428, problem_type::PRECONDITION_REQUIRED);
    assert_eq!(snapshot(&h, &["d1", "d3"]).await, before);
}

#[tokio::test]
async fn a_retry_replays_the_whole_response_and_feeds_nothing() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    let ops = scene("a", 1);
    let (status, header, first) = txn_text(&h, "t1", &ops).await;
    assert_eq!((status, header), (200, None));
    let after = snapshot(&h, &["d1", "d2", "d3"]).await;
    let (status, header, again) = txn_text(&h, "t1", &ops).await;
    assert_eq!((status, header.as_deref()), (200, Some("true")));
    let flagged = format!(
        "{},\"replayed\":true}}",
        first.strip_suffix(",\"replayed\":false}").unwrap()
    );
    assert_eq!(
        again, flagged,
        "the first answer, byte for byte, flagged as a replay"
    );
    let replayed: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(replayed["replayed"], true);
    // Preconditions are not part of the fingerprint: a stale if_match on a
    // retry still replays (the transaction is not evaluated again).
    let mut stale = ops.clone();
    stale[2]["if_match"] = json!(99);
    let (_, header, third) = txn_text(&h, "t1", &stale).await;
    assert_eq!((header.as_deref(), third), (Some("true"), again));
    assert_eq!(snapshot(&h, &["d1", "d2", "d3"]).await, after);
    // Each op's key replays alone too, as its first result.
    let single = h.create("device", "d2", json!({"on": true}), "a-2").await;
    assert_eq!(single.header("idempotent-replayed"), Some("true"));
    assert_eq!(single.body, replayed["results"][1]["body"]);
}

#[tokio::test]
async fn the_same_key_with_other_ops_is_422() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    txn(&h, "t1", scene("a", 1)).await;
    let before = snapshot(&h, &["d1", "d2", "d3", "x"]).await;
    let mut other = scene("a", 1);
    other[1]["data"] = json!({"on": "other"});
    let r = txn(&h, "t1", other).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (422, problem_type::IDEMPOTENCY_MISMATCH)
    );
    assert!(r.is_problem());
    let fewer =
        json!([{"op": "create", "type": "device", "id": "x", "data": {}, "idempotency_key": "x"}]);
    assert_eq!(txn(&h, "t1", fewer).await.status, 422);
    // A transaction key is a key like any other: a single request under it
    // is another request.
    let r = h.create("device", "x", json!({}), "t1").await;
    assert_eq!(r.status, 422);
    assert_eq!(snapshot(&h, &["d1", "d2", "d3", "x"]).await, before);
}

#[tokio::test]
async fn chains_within_a_transaction_see_each_version() {
    let h = start(builder().require_if_match(true)).await;
    let r = txn(
        &h,
        "t",
        json!([
            {"op": "create", "type": "device", "id": "d", "data": {"n": 1}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "d", "data": {"n": 2}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "b"},
            {"op": "create", "type": "scene", "id": "s", "data": {}, "idempotency_key": "s"},
            {"op": "delete", "type": "device", "id": "d", "depends_on": 1, "if_match_chained": true, "idempotency_key": "c"},
            {"op": "create", "type": "device", "id": "d", "data": {"n": 4}, "depends_on": 3, "if_match_chained": true, "idempotency_key": "d"},
        ]),
    )
    .await;
    assert_eq!(r.body["committed"], true, "{}", r.body);
    assert_eq!(statuses(&r.body), vec![201, 200, 201, 204, 201]);
    let got = h.get("device", "d").await.body;
    assert_eq!(
        (got["version"].as_u64(), &got["data"]),
        (Some(4), &json!({"n": 4}))
    );
    // A chain after a delete has no precondition: with require_if_match
    // the update is 428, and the transaction aborts there.
    let r = txn(
        &h,
        "u",
        json!([
            {"op": "delete", "type": "device", "id": "d", "if_match": 4, "idempotency_key": "e"},
            {"op": "update", "type": "device", "id": "d", "data": {}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "f"},
        ]),
    )
    .await;
    assert_aborted(&r, 1, 428, problem_type::PRECONDITION_REQUIRED);
    assert_eq!(h.get("device", "d").await.body["version"], 4);
}

#[tokio::test]
async fn malformed_transactions_are_refused_whole() {
    let h = start(builder().max_batch_ops(3)).await;
    let op = |k: &str| json!({"op": "create", "type": "device", "id": k, "data": {}, "idempotency_key": k});
    let r = txn(&h, "t", json!([op("a"), op("b"), op("c"), op("d")])).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (413, problem_type::PAYLOAD_TOO_LARGE)
    );
    let r = txn(&h, "t", json!([])).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::BAD_REQUEST)
    );
    let r = txn(&h, "", json!([op("a")])).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::IDEMPOTENCY_MISSING)
    );
    let r = txn(&h, "a b", json!([op("a")])).await;
    assert_eq!(r.status, 400);
    let r = txn(&h, "a", json!([op("a")])).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::BAD_REQUEST)
    );
    let r = h
        .send(
            h.req(Method::POST, "/v1/transactions")
                .json(&json!({"ops": [op("a")]})),
        )
        .await;
    assert_eq!(r.status, 400, "no transaction_key");
    // A dependency on a later op, or on another entity: op 1 is malformed.
    let r = txn(
        &h,
        "t",
        json!([op("a"), {"op": "update", "type": "device", "id": "b", "data": {}, "depends_on": 0, "idempotency_key": "u"}]),
    )
    .await;
    assert_aborted(&r, 1, 400, problem_type::BAD_REQUEST);
    assert!(h.server.applied_log().await.unwrap().is_empty());
    assert_eq!(h.get("device", "a").await.status, 404);
}

#[tokio::test]
async fn keys_in_flight_make_a_409_and_the_winner_commits_once() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            latency_ms: 3000,
            ..Faults::default()
        })
        .unwrap();
    let ops = json!([
        {"op": "create", "type": "device", "id": "a", "data": {}, "idempotency_key": "ka"},
        {"op": "create", "type": "device", "id": "b", "data": {}, "idempotency_key": "kb"},
    ]);
    let first = tokio::spawn({
        let req = h
            .req(Method::POST, "/v1/transactions")
            .json(&txn_body("t", &ops));
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    });
    h.server.wait_in_flight(3).await;
    let same = txn(&h, "t", ops.clone()).await;
    assert_eq!(
        (same.status, same.problem_type()),
        (409, problem_type::IDEMPOTENCY_IN_FLIGHT)
    );
    assert_eq!(same.header("retry-after"), Some("1"));
    // Another transaction sharing one op key, and the op key alone.
    let other = txn(&h, "t2", json!([ops[1].clone()])).await;
    assert_eq!(
        (other.status, other.problem_type()),
        (409, problem_type::IDEMPOTENCY_IN_FLIGHT)
    );
    let single = h.create("device", "b", json!({}), "kb").await;
    assert_eq!(single.status, 409);
    let first = first.await.unwrap();
    assert_eq!(first["committed"], true);
    h.server.set_faults(Faults::default()).unwrap();
    let again = txn(&h, "t", ops).await;
    assert_eq!(again.body["replayed"], true);
    assert_eq!(again.body["results"], first["results"]);
    assert_eq!(h.applied_keys().await, vec!["ka", "kb"]);
}

#[tokio::test]
async fn faults_never_leave_a_transaction_half_applied() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    let ops = scene("a", 1);
    let before = snapshot(&h, &["d1", "d2", "d3"]).await;
    // Injected failures and a drop before the commit: nothing applied.
    h.server
        .set_faults(Faults {
            fail_next: 1,
            failure_statuses: vec![503],
            ..Faults::default()
        })
        .unwrap();
    let r = txn(&h, "t1", ops.clone()).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (503, problem_type::UNAVAILABLE)
    );
    h.server
        .set_faults(Faults {
            drop_before_commit_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let lost = h
        .try_send(
            h.req(Method::POST, "/v1/transactions")
                .json(&txn_body("t1", &ops)),
        )
        .await;
    assert!(lost.is_err(), "{lost:?}");
    assert_eq!(snapshot(&h, &["d1", "d2", "d3"]).await, before);
    // A drop after the commit: everything applied once, and the retry
    // replays the whole response.
    h.server
        .set_faults(Faults {
            drop_after_commit_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let lost = h
        .try_send(
            h.req(Method::POST, "/v1/transactions")
                .json(&txn_body("t1", &ops)),
        )
        .await;
    assert!(lost.is_err(), "{lost:?}");
    let committed = snapshot(&h, &["d1", "d2", "d3"]).await;
    assert_eq!(committed.log.len(), 5);
    let r = txn(&h, "t1", ops).await;
    assert_eq!(
        (r.body["committed"].as_bool(), r.body["replayed"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(statuses(&r.body), vec![201, 201, 200, 200]);
    assert_eq!(snapshot(&h, &["d1", "d2", "d3"]).await, committed);
}

#[tokio::test]
async fn a_forced_conflict_aborts_and_the_other_writer_stays() {
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    h.server
        .set_faults(Faults {
            conflict_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let r = txn(&h, "t1", scene("a", 1)).await;
    assert_aborted(&r, 2, 409, problem_type::CONFLICT_VERSION);
    assert_eq!(r.body["results"][2]["body"]["current"]["version"], 2);
    // The concurrent writer committed before the transaction, and only it.
    let log = h.server.applied_log().await.unwrap();
    let rows: Vec<(&str, Option<&str>, u64)> = log
        .iter()
        .map(|a| {
            (
                a.idempotency_key.as_str(),
                a.transaction_key.as_deref(),
                a.cursor,
            )
        })
        .collect();
    assert_eq!(rows, vec![("pre", None, 1), ("fault:conflict:0", None, 2)]);
    assert_eq!(h.get("device", "d3").await.body["version"], 2);
    assert_eq!(h.get("device", "d1").await.status, 404);
    let feed = h.changes(0, 10).await.body;
    assert_eq!(feed["changes"].as_array().unwrap().len(), 2);
    // Reconciled: the same transaction key commits at the new version.
    let r = txn(&h, "t1", scene("a", 2)).await;
    assert_eq!(r.body["committed"], true, "{}", r.body);
    assert_eq!(h.changes(0, 10).await.body["head"], 6);
}

/// A server database of schema version 1 (before `transaction_key`)
/// opens, keeps its log and logs transactions.
#[tokio::test]
async fn a_schema_1_database_opens_and_logs_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v1.db");
    let (b, _db) = if crate::POSTGRES {
        let db = crate::pg::PgDb::create();
        old_pg_schema(&db.url()).await;
        (builder().postgres(db.url()), Some(db))
    } else {
        old_sqlite_schema(&file);
        (builder().database(&file), None)
    };
    let h = start(b).await;
    let r = txn(
        &h,
        "t",
        json!([{"op": "create", "type": "device", "id": "n", "data": {}, "idempotency_key": "new"}]),
    )
    .await;
    assert_eq!(r.body["committed"], true, "{}", r.body);
    let log = h.server.applied_log().await.unwrap();
    let rows: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|a| (a.idempotency_key.as_str(), a.transaction_key.as_deref()))
        .collect();
    assert_eq!(rows, vec![("old", None), ("new", Some("t"))]);
    h.server.shutdown().await;
}

/// The applied-log table as schema version 1 made it, with one row.
const OLD_APPLIED: &str = "(seq, tenant, idempotency_key, entity_type, id, op, version, cursor, at)
    VALUES (1, 'acme', 'old', 'device', 'o', 'create', 1, 1, 0)";

fn old_sqlite_schema(file: &std::path::Path) {
    let conn = rusqlite::Connection::open(file).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE applied (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
            idempotency_key TEXT NOT NULL, entity_type TEXT NOT NULL, id TEXT NOT NULL,
            op TEXT NOT NULL, version INTEGER NOT NULL, cursor INTEGER NOT NULL,
            at INTEGER NOT NULL);
         INSERT INTO applied {OLD_APPLIED};"
    ))
    .unwrap();
    // The other tables of version 1, empty but for the tenant's cursor.
    conn.execute_batch(
        "CREATE TABLE tenants (tenant TEXT PRIMARY KEY, last_cursor INTEGER NOT NULL DEFAULT 0,
            purged_through INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
         INSERT INTO tenants VALUES ('acme', 1, 0);
         CREATE TABLE entities (tenant TEXT NOT NULL, entity_type TEXT NOT NULL, id TEXT NOT NULL,
            version INTEGER NOT NULL, data TEXT NOT NULL, updated_at INTEGER NOT NULL,
            deleted INTEGER NOT NULL, PRIMARY KEY (tenant, entity_type, id)) WITHOUT ROWID;
         CREATE TABLE idempotency (tenant TEXT NOT NULL, key TEXT NOT NULL,
            fingerprint BLOB NOT NULL, status INTEGER NOT NULL, body TEXT NOT NULL,
            created_at INTEGER NOT NULL, PRIMARY KEY (tenant, key)) WITHOUT ROWID;
         CREATE INDEX idempotency_created ON idempotency (created_at);
         CREATE TABLE changes (tenant TEXT NOT NULL, cursor INTEGER NOT NULL, op TEXT NOT NULL,
            entity_type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
            data TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (tenant, cursor)) WITHOUT ROWID;
         CREATE INDEX changes_at ON changes (at);
         PRAGMA user_version = 1;",
    )
    .unwrap();
}

async fn old_pg_schema(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "CREATE TABLE guardian_meta (name text PRIMARY KEY, value bigint NOT NULL);
             INSERT INTO guardian_meta VALUES ('schema_version', 1);
             CREATE TABLE guardian_tenants (tenant text PRIMARY KEY,
                last_cursor bigint NOT NULL DEFAULT 0, purged_through bigint NOT NULL DEFAULT 0);
             INSERT INTO guardian_tenants VALUES ('acme', 1, 0);
             CREATE TABLE guardian_entities (tenant text NOT NULL, entity_type text NOT NULL,
                id text NOT NULL, version bigint NOT NULL, data text NOT NULL,
                updated_at bigint NOT NULL, deleted boolean NOT NULL,
                PRIMARY KEY (tenant, entity_type, id));
             CREATE TABLE guardian_idempotency (tenant text NOT NULL, key text NOT NULL,
                fingerprint bytea NOT NULL, status integer NOT NULL, body text NOT NULL,
                created_at bigint NOT NULL, PRIMARY KEY (tenant, key));
             CREATE INDEX guardian_idempotency_created ON guardian_idempotency (created_at);
             CREATE TABLE guardian_changes (tenant text NOT NULL, cursor bigint NOT NULL,
                op text NOT NULL, entity_type text NOT NULL, id text NOT NULL,
                version bigint NOT NULL, data text NOT NULL, at bigint NOT NULL,
                PRIMARY KEY (tenant, cursor));
             CREATE INDEX guardian_changes_at ON guardian_changes (at);
             CREATE TABLE guardian_applied (seq bigserial PRIMARY KEY, tenant text NOT NULL,
                idempotency_key text NOT NULL, entity_type text NOT NULL, id text NOT NULL,
                op text NOT NULL, version bigint NOT NULL, cursor bigint NOT NULL,
                at bigint NOT NULL);
             INSERT INTO guardian_applied {OLD_APPLIED};
             SELECT setval('guardian_applied_seq_seq', 1);"
        ))
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
}

/// A refused op shows the entity as committed, not as the aborted
/// transaction had left it.
#[tokio::test]
async fn an_abort_shows_the_committed_entity() {
    let h = start_default().await;
    let pre = h.create("device", "d", json!({"n": 0}), "pre").await;
    let r = txn(
        &h,
        "t",
        json!([
            {"op": "update", "type": "device", "id": "d", "data": {"n": 1}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "d", "data": {"n": 2}, "if_match": 1, "idempotency_key": "b"},
            {"op": "create", "type": "device", "id": "new", "data": {}, "idempotency_key": "c"},
            {"op": "create", "type": "device", "id": "new", "data": {}, "idempotency_key": "d"},
        ]),
    )
    .await;
    assert_aborted(&r, 1, 409, problem_type::CONFLICT_VERSION);
    assert_eq!(r.body["results"][1]["body"]["current"], pre.body);
    // Exists only inside the transaction: nothing to show.
    let r = txn(
        &h,
        "u",
        json!([
            {"op": "create", "type": "device", "id": "new", "data": {}, "idempotency_key": "c"},
            {"op": "create", "type": "device", "id": "new", "data": {}, "idempotency_key": "d"},
        ]),
    )
    .await;
    assert_aborted(&r, 1, 409, problem_type::CONFLICT_EXISTS);
    assert!(r.body["results"][1]["body"].get("current").is_none());
}

/// Realtime sessions hear a committed transaction's changes, at
/// consecutive cursors, and nothing of an aborted one.
#[tokio::test]
async fn only_committed_transactions_are_broadcast() {
    use guardian_protocol::RealtimeFrame;
    let h = start_default().await;
    h.create("device", "d3", json!({"on": false}), "pre").await;
    let mut ws = crate::realtime::connect(&h, "?since=1", Some(crate::common::TOKEN))
        .await
        .unwrap();
    assert_eq!(
        crate::realtime::next_frame(&mut ws).await,
        Some(RealtimeFrame::Hello { cursor: 1 })
    );
    let r = txn(
        &h,
        "t0",
        json!([
            {"op": "create", "type": "device", "id": "ghost", "data": {}, "idempotency_key": "g"},
            {"op": "update", "type": "device", "id": "d3", "data": {}, "if_match": 9, "idempotency_key": "h"},
        ]),
    )
    .await;
    assert_eq!(r.body["committed"], false);
    assert_eq!(txn(&h, "t1", scene("a", 1)).await.body["committed"], true);
    h.create("device", "after", json!({}), "after").await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        match crate::realtime::next_frame(&mut ws).await {
            Some(RealtimeFrame::Change { change }) => seen.push((change.cursor, change.id)),
            other => panic!("expected a change, got {other:?}"),
        }
    }
    let want: Vec<(u64, String)> = [(2, "d1"), (3, "d2"), (4, "d3"), (5, "d1"), (6, "after")]
        .into_iter()
        .map(|(c, id)| (c, id.to_owned()))
        .collect();
    assert_eq!(seen, want);
}

/// Concurrent transactions on the same two entities, each written against
/// the versions it read and retried until it commits: each commits whole,
/// so both entities end with the same writer's data and version, and the
/// log holds each transaction's pair at consecutive cursors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_are_each_all_or_nothing() {
    let h = start_default().await;
    h.create("device", "a", json!({"by": -1}), "ca").await;
    h.create("device", "b", json!({"by": -1}), "cb").await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let http = h.http.clone();
        let base = h.server.url();
        tasks.push(tokio::spawn(async move {
            let version = |id: &'static str| {
                let req = http
                    .get(format!("{base}/v1/entities/device/{id}"))
                    .bearer_auth(crate::common::TOKEN);
                async move {
                    let e: Value = req.send().await.unwrap().json().await.unwrap();
                    e["version"].as_u64().unwrap()
                }
            };
            // Until it commits: an aborted transaction recorded nothing, so
            // it is retried, re-read, under the same keys.
            for attempt in 0..200 {
                let (va, vb) = (version("a").await, version("b").await);
                let ops = json!([
                    {"op": "update", "type": "device", "id": "a", "data": {"by": i}, "if_match": va, "idempotency_key": format!("a{i}")},
                    {"op": "update", "type": "device", "id": "b", "data": {"by": i}, "if_match": vb, "idempotency_key": format!("b{i}")},
                ]);
                let r: Value = http
                    .post(format!("{base}/v1/transactions"))
                    .bearer_auth(crate::common::TOKEN)
                    .json(&txn_body(&format!("t{i}"), &ops))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if r["committed"] == true {
                    return attempt;
                }
                assert_eq!(r["results"][r["failed_op"].as_u64().unwrap() as usize]["status"], 409, "{r}");
            }
            panic!("transaction {i} never committed");
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    assert!(retries > 0, "the transactions never met");
    let committed = 12;
    let (a, b) = (
        h.get("device", "a").await.body,
        h.get("device", "b").await.body,
    );
    assert_eq!(a["version"], 1 + committed);
    assert_eq!((&a["version"], &a["data"]), (&b["version"], &b["data"]));
    let log = h.server.applied_log().await.unwrap();
    assert_eq!(log.len() as u64, 2 + 2 * committed);
    for pair in log[2..].chunks(2) {
        assert_eq!(pair[0].transaction_key, pair[1].transaction_key);
        assert!(pair[0].transaction_key.is_some());
        assert_eq!(pair[0].cursor + 1, pair[1].cursor);
    }
}
