//! Idempotency keys: required, replayed, mismatched, in flight, across
//! dropped responses, across batch and single requests, expiring.

use std::time::Duration;

use guardian_protocol::problem_type;
use guardian_server::clock::ManualClock;
use guardian_server::Faults;
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, start_default, OTHER_TOKEN};

#[tokio::test]
async fn every_mutation_needs_a_key() {
    let h = start_default().await;
    let reqs = [
        h.req(Method::POST, "/v1/entities/device")
            .json(&json!({"id": "d1", "data": {}})),
        h.req(Method::PUT, "/v1/entities/device/d1")
            .json(&json!({"data": {}})),
        h.req(Method::DELETE, "/v1/entities/device/d1"),
    ];
    for req in reqs {
        let r = h.send(req).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, problem_type::IDEMPOTENCY_MISSING)
        );
        assert!(r.is_problem());
    }
    let r = h
        .batch(json!([{"op": "create", "type": "device", "id": "d1", "data": {}, "idempotency_key": ""}]))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["results"][0]["status"], 400);
    assert_eq!(
        r.body["results"][0]["body"]["type"],
        problem_type::IDEMPOTENCY_MISSING
    );
    assert!(h.applied_keys().await.is_empty());
}

#[tokio::test]
async fn a_repeat_replays_the_stored_response() {
    let h = start_default().await;
    let first = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    // A later change does not alter what the key replays.
    h.put("device", "d1", json!({"a": 2}), "k2", None).await;
    let again = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("etag"), Some("\"1\""));
    // Object key order in the body does not matter (canonical fingerprint).
    let put = h
        .send(
            h.req(Method::PUT, "/v1/entities/device/d1")
                .header("idempotency-key", "k3")
                .header("content-type", "application/json")
                .body(r#"{"data":{"x":1,"y":2}}"#),
        )
        .await;
    assert_eq!(put.status, 200);
    let replay = h
        .send(
            h.req(Method::PUT, "/v1/entities/device/d1")
                .header("idempotency-key", "k3")
                .header("content-type", "application/json")
                .body(r#"{ "data": { "y": 2, "x": 1 } }"#),
        )
        .await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, put.body);
    // Deletes replay their 204.
    assert_eq!(h.delete("device", "d1", "k4", None).await.status, 204);
    let r = h.delete("device", "d1", "k4", None).await;
    assert_eq!(
        (r.status, r.header("idempotent-replayed")),
        (204, Some("true"))
    );
    assert_eq!(h.applied_keys().await, vec!["k1", "k2", "k3", "k4"]);
}

#[tokio::test]
async fn same_key_other_request_is_422() {
    let h = start_default().await;
    h.create("device", "d1", json!({"a": 1}), "k1").await;
    let r = h.create("device", "d1", json!({"a": 2}), "k1").await;
    assert_eq!(
        (r.status, r.problem_type()),
        (422, problem_type::IDEMPOTENCY_MISMATCH)
    );
    assert!(r.is_problem());
    let r = h.create("device", "d2", json!({"a": 1}), "k1").await;
    assert_eq!(r.status, 422, "another path");
    let r = h.put("device", "d1", json!({"a": 1}), "k1", None).await;
    assert_eq!(r.status, 422, "another method");
    assert_eq!(h.applied_keys().await, vec!["k1"]);
    // Keys are per tenant: the other tenant may use k1 freely.
    let other = h.as_token(OTHER_TOKEN);
    let r = other
        .send(
            other
                .req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "k1")
                .json(&json!({"id": "d1", "data": {"a": 2}})),
        )
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn dropped_response_after_commit_then_retry_replays_and_applies_once() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            drop_after_commit_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let lost = h
        .try_send(h.create_req("device", "d1", json!({"a": 1}), "k1"))
        .await;
    assert!(
        lost.is_err(),
        "the connection must close without a response: {lost:?}"
    );
    // It was applied.
    assert_eq!(h.applied_keys().await, vec!["k1"]);
    let retry = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(retry.status, 201, "the original result, not a 409 exists");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body["version"], 1);
    let log = h.server.applied_log().await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].tenant.as_str(), log[0].id.as_str(), log[0].version),
        ("acme", "d1", 1)
    );
}

#[tokio::test]
async fn dropped_before_commit_applies_nothing() {
    let h = start_default().await;
    h.create("device", "d1", json!({"a": 1}), "k1").await;
    h.server
        .set_faults(Faults {
            drop_before_commit_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let lost = h
        .try_send(h.put_req("device", "d1", json!({"a": 2}), "k2", Some(1)))
        .await;
    assert!(lost.is_err());
    assert_eq!(h.applied_keys().await, vec!["k1"]);
    let retry = h.put("device", "d1", json!({"a": 2}), "k2", Some(1)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        retry.header("idempotent-replayed"),
        None,
        "first real application"
    );
    assert_eq!(h.applied_keys().await, vec!["k1", "k2"]);
}

#[tokio::test]
async fn concurrent_same_key_gets_in_flight_then_replay() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            latency_ms: 3000,
            ..Faults::default()
        })
        .unwrap();
    let first = tokio::spawn({
        let req = h.create_req("device", "d1", json!({"a": 1}), "k1");
        async move { req.send().await.unwrap().status().as_u16() }
    });
    h.server.wait_in_flight(1).await;
    let second = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(
        (second.status, second.problem_type()),
        (409, problem_type::IDEMPOTENCY_IN_FLIGHT)
    );
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap(), 201);
    h.server.set_faults(Faults::default()).unwrap();
    let third = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(
        (third.status, third.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(h.applied_keys().await, vec!["k1"]);
}

#[tokio::test]
async fn many_concurrent_retries_apply_once() {
    let h = start_default().await;
    h.create("counter", "c", json!({"n": 0}), "init").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let req = h.put_req("counter", "c", json!({"n": 1}), "bump", Some(1));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200));
    assert_eq!(h.applied_keys().await, vec!["init", "bump"]);
}

#[tokio::test]
async fn batch_and_single_requests_share_keys() {
    let h = start_default().await;
    let b = h
        .batch(json!([{"op": "create", "type": "device", "id": "d1", "data": {"a": 1}, "idempotency_key": "kb"}]))
        .await;
    assert_eq!(b.body["results"][0]["status"], 201);
    let single = h.create("device", "d1", json!({"a": 1}), "kb").await;
    assert_eq!(
        (single.status, single.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(single.body, b.body["results"][0]["body"]);

    let single = h.put("device", "d1", json!({"a": 2}), "ks", Some(1)).await;
    assert_eq!(single.status, 200);
    let b = h
        .batch(json!([
            {"op": "update", "type": "device", "id": "d1", "data": {"a": 2}, "if_match": 1, "idempotency_key": "ks"},
            {"op": "update", "type": "device", "id": "d1", "data": {"a": 9}, "idempotency_key": "ks"},
        ]))
        .await;
    assert_eq!(b.body["results"][0]["status"], 200);
    assert_eq!(b.body["results"][0]["replayed"], true);
    assert_eq!(b.body["results"][0]["body"], single.body);
    assert_eq!(b.body["results"][1]["status"], 422);
    assert_eq!(h.applied_keys().await, vec!["kb", "ks"]);
}

#[tokio::test]
async fn records_expire_after_the_retention() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(
        builder()
            .clock(clock.clone())
            .idempotency_retention(Duration::from_secs(60)),
    )
    .await;
    h.create("device", "d1", json!({"a": 1}), "k1").await;
    clock.advance_millis(59_000);
    assert_eq!(
        h.create("device", "d1", json!({"a": 1}), "k1")
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    clock.advance_millis(2_000);
    // Expired: the key is new again, so the create is evaluated afresh.
    let r = h.create("device", "d1", json!({"a": 1}), "k1").await;
    assert_eq!(
        (r.status, r.problem_type()),
        (409, problem_type::CONFLICT_EXISTS)
    );
    let report = h.server.purge_expired().await.unwrap();
    assert_eq!(report.idempotency_records, 1);
    let r = h.create("device", "d1", json!({"b": 2}), "k1").await;
    assert_eq!(r.status, 409, "no 422 after expiry");
}

/// Numbers are stored and served as written (issue 15 point 7), and a key
/// is fingerprinted by the values its numbers denote: a retry that spells
/// them differently replays, one that changes a digit beyond `f64`'s
/// precision is another request (422).
#[tokio::test]
async fn numbers_are_kept_exactly_and_fingerprinted_by_value() {
    let h = start_default().await;
    let create = |key: &str, data: &str| {
        h.send(
            h.req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(format!(r#"{{"id":"n1","data":{data}}}"#)),
        )
    };
    let data = r#"{"big":12345678901234567890123,"dec":3.141592653589793238462643383279,"exp":1E400,"neg":-9223372036854775809,"nz":-0,"one":1.0,"tiny":1e-400}"#;
    let r = create("k1", data).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // serde_json writes an exponent as `e` with a sign; the digits stay.
    let data = data.replace("1E400", "1e+400");
    assert_eq!(r.body["data"].to_string(), data);
    assert_eq!(h.get("device", "n1").await.body["data"].to_string(), data);
    let feed = h.changes(0, 10).await;
    assert_eq!(feed.body["changes"][0]["data"].to_string(), data);
    // The same values spelled otherwise: the same request, replayed as first answered.
    let respelled = r#"{"big":1.2345678901234567890123e22,"dec":3.1415926535897932384626433832790,"exp":10e399,"neg":-9223372036854775809,"nz":0,"one":1,"tiny":0.1E-399}"#;
    let r = create("k1", respelled).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(r.body["data"].to_string(), data);
    // One digit more in the 23rd place: another request under the same key.
    let changed = data.replace("12345678901234567890123", "12345678901234567890124");
    let r = create("k1", &changed).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (422, problem_type::IDEMPOTENCY_MISMATCH)
    );
    let changed = data.replace("-9223372036854775809", "-9223372036854775808");
    let r = create("k1", &changed).await;
    assert_eq!(r.status, 422);
    assert_eq!(h.applied_keys().await, vec!["k1"]);
}
