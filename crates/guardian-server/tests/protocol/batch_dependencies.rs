//! `POST /v1/batch` ops that depend on an earlier op of the same batch
//! (`depends_on`, `if_match_chained`): chains apply in order, a failed
//! dependency fails its successors with 424 without recording their keys,
//! replays chain on replayed versions, and the fingerprint ignores how the
//! precondition was given.

use guardian_protocol::problem_type;
use guardian_server::Faults;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{
    batch_outcomes as outcomes, batch_statuses as statuses, builder, start, start_default, Harness,
};

/// The batch response as raw text (for byte-for-byte comparisons).
async fn batch_text(h: &Harness, ops: &Value) -> (u16, String) {
    let resp = h
        .req(Method::POST, "/v1/batch")
        .json(&json!({ "ops": ops }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn assert_dependency_failed(result: &Value, on: u64) {
    assert_eq!(result["status"], 424, "{result}");
    assert_eq!(result["replayed"], false);
    assert_eq!(result["body"]["type"], problem_type::DEPENDENCY_FAILED);
    assert_eq!(result["body"]["status"], 424);
    assert_eq!(result["body"]["title"], "Dependency failed");
    let detail = result["body"]["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("op {on} ")), "{detail}");
}

/// create ← update ← update, each chained on its predecessor's version.
fn chain() -> Value {
    json!([
        {"op": "create", "type": "device", "id": "d1", "data": {"on": false}, "idempotency_key": "a"},
        {"op": "update", "type": "device", "id": "d1", "data": {"on": true}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "b"},
        {"op": "update", "type": "device", "id": "d1", "data": {"on": false, "n": 3}, "depends_on": 1, "if_match_chained": true, "idempotency_key": "c"},
    ])
}

#[tokio::test]
async fn a_chained_batch_applies_in_order_with_each_version() {
    let h = start(builder().require_if_match(true)).await;
    let r = h.batch(chain()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        outcomes(&r.body),
        vec![(201, false), (200, false), (200, false)]
    );
    let versions: Vec<u64> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"]["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
    let got = h.get("device", "d1").await;
    assert_eq!(got.body["version"], 3);
    assert_eq!(got.body["data"], json!({"on": false, "n": 3}));
    assert_eq!(h.applied_keys().await, vec!["a", "b", "c"]);

    // depends_on without chaining keeps the op's own precondition.
    let r = h
        .batch(json!([
            {"op": "update", "type": "device", "id": "d1", "data": {"n": 4}, "if_match": 3, "idempotency_key": "d"},
            {"op": "update", "type": "device", "id": "d1", "data": {"n": 5}, "if_match": 4, "depends_on": 0, "idempotency_key": "e"},
            {"op": "update", "type": "device", "id": "d1", "data": {"n": 6}, "if_match": 4, "depends_on": 1, "idempotency_key": "f"},
        ]))
        .await;
    assert_eq!(statuses(&r.body), vec![200, 200, 409]);
    assert_eq!(r.body["results"][2]["body"]["current"]["version"], 5);
}

#[tokio::test]
async fn a_failed_dependency_fails_every_successor_and_records_nothing() {
    let h = start_default().await;
    h.create("device", "taken", json!({"v": 0}), "pre").await;
    // The head refused (409 exists): the chain behind it is not applied.
    let r = h
        .batch(json!([
            {"op": "create", "type": "device", "id": "taken", "data": {"v": 1}, "idempotency_key": "a"},
            {"op": "update", "type": "device", "id": "taken", "data": {"v": 2}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "b"},
            {"op": "update", "type": "device", "id": "taken", "data": {"v": 3}, "depends_on": 1, "if_match_chained": true, "idempotency_key": "c"},
            {"op": "create", "type": "device", "id": "other", "data": {}, "idempotency_key": "d"},
        ]))
        .await;
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(statuses(&r.body), vec![409, 424, 424, 201]);
    assert_eq!(results[0]["body"]["type"], problem_type::CONFLICT_EXISTS);
    assert_dependency_failed(&results[1], 0);
    assert_dependency_failed(&results[2], 1);
    assert_eq!(h.applied_keys().await, vec!["pre", "d"]);
    assert_eq!(h.get("device", "taken").await.body["version"], 1);
    // Key "b" was not recorded: sent alone later it is processed afresh.
    let alone = h
        .put("device", "taken", json!({"v": 2}), "b", Some(1))
        .await;
    assert_eq!(alone.status, 200);
    assert_eq!(alone.header("idempotent-replayed"), None);
    assert_eq!(alone.body["version"], 2);
    // And "c" in another batch shape too.
    let r = h
        .batch(json!([
            {"op": "update", "type": "device", "id": "taken", "data": {"v": 3}, "if_match": 2, "idempotency_key": "c"},
        ]))
        .await;
    assert_eq!(outcomes(&r.body), vec![(200, false)]);
    assert_eq!(h.applied_keys().await, vec!["pre", "d", "b", "c"]);
}

#[tokio::test]
async fn mismatch_bad_request_and_mid_chain_conflicts_fail_the_rest() {
    let h = start_default().await;
    h.create("device", "x", json!({}), "used").await;
    let r = h
        .batch(json!([
            // 422: the key was used for another request.
            {"op": "create", "type": "device", "id": "y", "data": {"other": true}, "idempotency_key": "used"},
            {"op": "update", "type": "device", "id": "y", "data": {}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "m1"},
            // 400 before the store (data is not an object).
            {"op": "create", "type": "device", "id": "z", "data": [1], "idempotency_key": "z0"},
            {"op": "update", "type": "device", "id": "z", "data": {}, "depends_on": 2, "idempotency_key": "z1"},
            {"op": "delete", "type": "device", "id": "z", "depends_on": 3, "if_match_chained": true, "idempotency_key": "z2"},
            // The middle op conflicts (409 version): the rest of its chain 424.
            {"op": "update", "type": "device", "id": "x", "data": {"s": 1}, "if_match": 1, "idempotency_key": "x1"},
            {"op": "update", "type": "device", "id": "x", "data": {"s": 2}, "if_match": 1, "depends_on": 5, "idempotency_key": "x2"},
            {"op": "update", "type": "device", "id": "x", "data": {"s": 3}, "depends_on": 6, "if_match_chained": true, "idempotency_key": "x3"},
            {"op": "delete", "type": "device", "id": "x", "depends_on": 7, "if_match_chained": true, "idempotency_key": "x4"},
        ]))
        .await;
    assert_eq!(
        statuses(&r.body),
        vec![422, 424, 400, 424, 424, 200, 409, 424, 424]
    );
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(
        results[0]["body"]["type"],
        problem_type::IDEMPOTENCY_MISMATCH
    );
    assert_dependency_failed(&results[1], 0);
    assert_dependency_failed(&results[3], 2);
    assert_dependency_failed(&results[4], 3);
    assert_eq!(results[6]["body"]["type"], problem_type::CONFLICT_VERSION);
    assert_dependency_failed(&results[7], 6);
    assert_dependency_failed(&results[8], 7);
    assert_eq!(h.applied_keys().await, vec!["used", "x1"]);
    assert_eq!(h.get("device", "x").await.body["data"], json!({"s": 1}));
}

#[tokio::test]
async fn a_chained_batch_whose_response_was_lost_replays_byte_for_byte() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            drop_after_commit_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let lost = h
        .try_send(
            h.req(Method::POST, "/v1/batch")
                .json(&json!({ "ops": chain() })),
        )
        .await;
    assert!(lost.is_err(), "the response must be lost: {lost:?}");
    assert_eq!(h.applied_keys().await, vec!["a", "b", "c"]);
    // The client sends the same batch again: every op replays, and the
    // chained preconditions come from the replayed versions.
    let (status, first) = batch_text(&h, &chain()).await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(outcomes(&body), vec![(201, true), (200, true), (200, true)]);
    let (_, second) = batch_text(&h, &chain()).await;
    assert_eq!(first, second, "a replay is byte for byte the same");
    // Each result is what a single request under that key replays.
    for (i, key) in ["b", "c"].iter().enumerate() {
        let single = h
            .put_req("device", "d1", chain()[i + 1]["data"].clone(), key, None)
            .send()
            .await
            .unwrap();
        assert_eq!(single.headers()["idempotent-replayed"], "true");
        let text = single.text().await.unwrap();
        let spliced = serde_json::to_string(&body["results"][i + 1]["body"]).unwrap();
        assert_eq!(text, spliced);
        assert!(first.contains(&text));
    }
    let log = h.server.applied_log().await.unwrap();
    let applied: Vec<(&str, u64)> = log
        .iter()
        .map(|a| (a.idempotency_key.as_str(), a.version))
        .collect();
    assert_eq!(applied, vec![("a", 1), ("b", 2), ("c", 3)]);

    // A chain whose head is a replay and whose tail is new: the tail chains
    // on the replayed version.
    let mut longer = chain();
    longer.as_array_mut().unwrap().push(json!(
        {"op": "update", "type": "device", "id": "d1", "data": {"n": 4}, "depends_on": 2, "if_match_chained": true, "idempotency_key": "d"}
    ));
    let r = h.batch(longer).await;
    assert_eq!(
        outcomes(&r.body),
        vec![(201, true), (200, true), (200, true), (200, false)]
    );
    assert_eq!(r.body["results"][3]["body"]["version"], 4);
}

#[tokio::test]
async fn the_fingerprint_ignores_how_the_precondition_was_given() {
    let h = start_default().await;
    let (_, fresh) = batch_text(&h, &chain()).await;
    let fresh: Value = serde_json::from_str(&fresh).unwrap();
    assert_eq!(statuses(&fresh), vec![201, 200, 200]);
    // "b" alone with an explicit If-Match (even a stale one): a replay.
    for if_match in [Some(1), Some(7), None] {
        let alone = h
            .put("device", "d1", json!({"on": true}), "b", if_match)
            .await;
        assert_eq!(alone.status, 200, "{if_match:?}");
        assert_eq!(alone.header("idempotent-replayed"), Some("true"));
        assert_eq!(alone.body, fresh["results"][1]["body"]);
    }
    // "c" in another batch shape: no dependency, explicit if_match.
    let r = h
        .batch(json!([
            {"op": "update", "type": "device", "id": "d1", "data": {"on": false, "n": 3}, "if_match": 2, "idempotency_key": "c"},
        ]))
        .await;
    assert_eq!(outcomes(&r.body), vec![(200, true)]);
    assert_eq!(r.body["results"][0]["body"], fresh["results"][2]["body"]);

    // The other way round: applied alone first, then part of a chain.
    h.create("device", "d2", json!({}), "s0").await;
    let alone = h.put("device", "d2", json!({"x": 1}), "s1", Some(1)).await;
    assert_eq!(alone.status, 200);
    let r = h
        .batch(json!([
            {"op": "create", "type": "device", "id": "d2", "data": {}, "idempotency_key": "s0"},
            {"op": "update", "type": "device", "id": "d2", "data": {"x": 1}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "s1"},
            {"op": "update", "type": "device", "id": "d2", "data": {"x": 2}, "depends_on": 1, "if_match_chained": true, "idempotency_key": "s2"},
        ]))
        .await;
    assert_eq!(
        outcomes(&r.body),
        vec![(201, true), (200, true), (200, false)]
    );
    assert_eq!(r.body["results"][1]["body"], alone.body);
    assert_eq!(r.body["results"][2]["body"]["version"], 3);
    assert_eq!(
        h.applied_keys().await,
        vec!["a", "b", "c", "s0", "s1", "s2"]
    );
}

#[tokio::test]
async fn malformed_dependencies_are_400_and_their_dependents_424() {
    let h = start_default().await;
    let r = h
        .batch(json!([
            {"op": "create", "type": "t", "id": "a", "data": {}, "idempotency_key": "k0"},
            // forward reference, self reference, out of range
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 2, "idempotency_key": "k1"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 2, "idempotency_key": "k2"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 4_000_000_000_u64, "idempotency_key": "k3"},
            // another id, another type with the same id
            {"op": "update", "type": "t", "id": "b", "data": {}, "depends_on": 0, "idempotency_key": "k4"},
            {"op": "update", "type": "u", "id": "a", "data": {}, "depends_on": 0, "idempotency_key": "k5"},
            // chained without depends_on; chained together with if_match
            {"op": "update", "type": "t", "id": "a", "data": {}, "if_match_chained": true, "idempotency_key": "k6"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "if_match": 1, "depends_on": 0, "if_match_chained": true, "idempotency_key": "k7"},
            // depends on a 400: 424
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 7, "idempotency_key": "k8"},
        ]))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        statuses(&r.body),
        vec![201, 400, 400, 400, 400, 400, 400, 400, 424]
    );
    let results = r.body["results"].as_array().unwrap();
    for r in &results[1..8] {
        assert_eq!(r["body"]["type"], problem_type::BAD_REQUEST, "{r}");
    }
    assert_dependency_failed(&results[8], 7);
    assert_eq!(h.applied_keys().await, vec!["k0"]);
    // None of the refused keys was recorded.
    let r = h
        .batch(json!([
            {"op": "update", "type": "t", "id": "a", "data": {}, "if_match": 1, "idempotency_key": "k7"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 0, "idempotency_key": "k8"},
        ]))
        .await;
    assert_eq!(outcomes(&r.body), vec![(200, false), (200, false)]);
}

#[tokio::test]
async fn a_chain_across_a_delete_has_no_precondition_after_it() {
    let h = start(builder().require_if_match(true)).await;
    // create ← delete ← create: the server re-creates over a tombstone.
    let r = h
        .batch(json!([
            {"op": "create", "type": "t", "id": "a", "data": {"gen": 1}, "idempotency_key": "c1"},
            {"op": "delete", "type": "t", "id": "a", "depends_on": 0, "if_match_chained": true, "idempotency_key": "d1"},
            {"op": "create", "type": "t", "id": "a", "data": {"gen": 2}, "depends_on": 1, "if_match_chained": true, "idempotency_key": "c2"},
            {"op": "update", "type": "t", "id": "a", "data": {"gen": 3}, "depends_on": 2, "if_match_chained": true, "idempotency_key": "u1"},
        ]))
        .await;
    assert_eq!(statuses(&r.body), vec![201, 204, 201, 200]);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results[1]["body"], Value::Null);
    assert_eq!(results[2]["body"]["version"], 3);
    assert_eq!(results[3]["body"]["version"], 4);
    // update ← delete: chained on a delete there is no precondition, so
    // this server (require_if_match) answers 428, and the next op 424.
    let r = h
        .batch(json!([
            {"op": "delete", "type": "t", "id": "a", "if_match": 4, "idempotency_key": "d2"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "u2"},
            {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 1, "if_match_chained": true, "idempotency_key": "u3"},
        ]))
        .await;
    assert_eq!(statuses(&r.body), vec![204, 428, 424]);
    // A replayed delete (204, no entity) chains the same way.
    let h2 = start_default().await;
    h2.create("t", "a", json!({}), "c").await;
    let ops = json!([
        {"op": "delete", "type": "t", "id": "a", "idempotency_key": "d"},
        {"op": "update", "type": "t", "id": "a", "data": {}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "u"},
    ]);
    let first = h2.batch(ops.clone()).await;
    assert_eq!(statuses(&first.body), vec![204, 410]);
    let again = h2.batch(ops).await;
    assert_eq!(outcomes(&again.body), vec![(204, true), (410, false)]);
    assert_eq!(h2.applied_keys().await, vec!["c", "d"]);
}

#[tokio::test]
async fn a_forced_conflict_on_a_chained_op_fails_the_rest_of_the_chain() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            conflict_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let r = h.batch(chain()).await;
    assert_eq!(statuses(&r.body), vec![201, 409, 424]);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results[1]["body"]["type"], problem_type::CONFLICT_VERSION);
    assert_eq!(results[1]["body"]["current"]["version"], 2);
    assert_dependency_failed(&results[2], 1);
    let log = h.server.applied_log().await.unwrap();
    let keys: Vec<&str> = log.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys, vec!["a", "fault:conflict:0"]);
}

#[tokio::test]
async fn an_injected_failure_fails_the_whole_chained_batch() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            fail_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let r = h.batch(chain()).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (503, problem_type::UNAVAILABLE)
    );
    assert!(h.applied_keys().await.is_empty());
    let r = h.batch(chain()).await;
    assert_eq!(statuses(&r.body), vec![201, 200, 200]);
}

#[tokio::test]
async fn an_op_depending_on_an_in_flight_op_is_424() {
    let h = start_default().await;
    h.create("t", "e", json!({}), "init").await;
    h.server
        .set_faults(Faults {
            latency_ms: 3000,
            ..Faults::default()
        })
        .unwrap();
    let first = tokio::spawn({
        let req = h.put_req("t", "e", json!({"step": 1}), "one", Some(1));
        async move { req.send().await.unwrap().status().as_u16() }
    });
    h.server.wait_in_flight(1).await;
    let r = h
        .batch(json!([
            {"op": "update", "type": "t", "id": "e", "data": {"step": 1}, "if_match": 1, "idempotency_key": "one"},
            {"op": "update", "type": "t", "id": "e", "data": {"step": 2}, "depends_on": 0, "if_match_chained": true, "idempotency_key": "two"},
        ]))
        .await;
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 409);
    assert_eq!(
        results[0]["body"]["type"],
        problem_type::IDEMPOTENCY_IN_FLIGHT
    );
    assert_dependency_failed(&results[1], 0);
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(h.applied_keys().await, vec!["init", "one"]);
}
