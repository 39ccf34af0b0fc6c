//! `POST /v1/batch`: in-order application, per-op results, limits.

use guardian_protocol::problem_type;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{batch_outcomes, batch_statuses, builder, start, start_default};

#[tokio::test]
async fn ops_apply_in_order_with_per_op_results() {
    let h = start_default().await;
    h.create("device", "x", json!({}), "pre").await;
    let r = h
        .batch(json!([
            {"op": "create", "type": "device", "id": "d1", "data": {"v": 1}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "d1", "data": {"v": 2}, "if_match": 1, "idempotency_key": "b"},
            {"op": "update", "type": "device", "id": "d1", "data": {"v": 3}, "if_match": 1, "idempotency_key": "c"},
            {"op": "create", "type": "device", "id": "x", "data": {}, "idempotency_key": "d"},
            {"op": "delete", "type": "device", "id": "d1", "idempotency_key": "e"},
            {"op": "update", "type": "Bad", "id": "d1", "data": {}, "idempotency_key": "f"},
            {"op": "update", "type": "device", "id": "nope", "data": {}, "idempotency_key": "g"},
        ]))
        .await;
    assert_eq!(r.status, 200);
    let results = r.body["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 200, 409, 409, 204, 400, 404]);
    assert_eq!(results[1]["body"]["version"], 2);
    assert_eq!(results[2]["body"]["type"], problem_type::CONFLICT_VERSION);
    assert_eq!(results[2]["body"]["current"]["version"], 2);
    assert_eq!(results[3]["body"]["type"], problem_type::CONFLICT_EXISTS);
    assert_eq!(results[4]["body"], Value::Null);
    assert!(results.iter().all(|r| r["replayed"] == false));
    assert_eq!(h.applied_keys().await, vec!["pre", "a", "b", "e"]);
    let feed = h.changes(1, 100).await;
    let ops: Vec<&str> = feed.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, vec!["create", "update", "delete"]);

    // The whole batch again: everything applied replays, nothing applies twice.
    let again = h
        .batch(json!([
            {"op": "create", "type": "device", "id": "d1", "data": {"v": 1}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "d1", "data": {"v": 2}, "if_match": 1, "idempotency_key": "b"},
            {"op": "delete", "type": "device", "id": "d1", "idempotency_key": "e"},
        ]))
        .await;
    assert_eq!(
        batch_outcomes(&again.body),
        vec![(201, true), (200, true), (204, true)]
    );
    assert_eq!(h.applied_keys().await, vec!["pre", "a", "b", "e"]);
}

#[tokio::test]
async fn empty_batch_is_fine() {
    let h = start_default().await;
    let r = h.batch(json!([])).await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"results": []})));
}

#[tokio::test]
async fn batches_are_bounded() {
    let h = start(builder().max_batch_ops(3).body_limit(4096)).await;
    let op = |i: usize| json!({"op": "create", "type": "t", "id": format!("i{i}"), "data": {}, "idempotency_key": format!("k{i}")});
    let r = h.batch(Value::Array((0..4).map(op).collect())).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (413, problem_type::PAYLOAD_TOO_LARGE)
    );
    let r = h
        .batch(json!([{"op": "create", "type": "t", "id": "big", "data": {"x": "y".repeat(5000)}, "idempotency_key": "k"}]))
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (413, problem_type::PAYLOAD_TOO_LARGE)
    );
    assert!(h.applied_keys().await.is_empty());
    let r = h.batch(Value::Array((0..3).map(op).collect())).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.applied_keys().await.len(), 3);
}

#[tokio::test]
async fn malformed_batches_are_400() {
    let h = start_default().await;
    let r = h
        .send(h.req(Method::POST, "/v1/batch").json(
            &json!({"ops": [{"op": "upsert", "type": "t", "id": "i", "idempotency_key": "k"}]}),
        ))
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::BAD_REQUEST)
    );
    let r = h
        .batch(json!([{"op": "create", "type": "t", "id": "i", "idempotency_key": "k"}]))
        .await;
    assert_eq!(r.body["results"][0]["status"], 400, "create without data");
}

#[tokio::test]
async fn batch_ops_respect_require_if_match() {
    let h = start(builder().require_if_match(true)).await;
    let r = h
        .batch(json!([
            {"op": "create", "type": "t", "id": "i", "data": {}, "idempotency_key": "a"},
            {"op": "update", "type": "t", "id": "i", "data": {"x": 1}, "idempotency_key": "b"},
            {"op": "update", "type": "t", "id": "i", "data": {"x": 1}, "if_match": 1, "idempotency_key": "c"},
        ]))
        .await;
    assert_eq!(batch_statuses(&r.body), vec![201, 428, 200]);
}

#[tokio::test]
async fn ops_behind_an_in_flight_op_of_the_same_entity_wait() {
    let h = start_default().await;
    h.create("t", "e", json!({}), "init").await;
    h.server
        .set_faults(guardian_server::Faults {
            latency_ms: 3000,
            ..guardian_server::Faults::default()
        })
        .unwrap();
    let first = tokio::spawn({
        let req = h.put_req("t", "e", json!({"step": 1}), "one", None);
        async move { req.send().await.unwrap().status().as_u16() }
    });
    h.server.wait_in_flight(1).await;
    let r = h
        .batch(json!([
            {"op": "update", "type": "t", "id": "e", "data": {"step": 1}, "idempotency_key": "one"},
            {"op": "update", "type": "t", "id": "e", "data": {"step": 2}, "idempotency_key": "two"},
        ]))
        .await;
    let types: Vec<&str> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![
            problem_type::IDEMPOTENCY_IN_FLIGHT,
            problem_type::IDEMPOTENCY_IN_FLIGHT
        ]
    );
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        h.applied_keys().await,
        vec!["init", "one"],
        "two did not overtake one"
    );
}
