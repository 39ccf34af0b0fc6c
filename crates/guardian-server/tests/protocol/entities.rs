//! Entities: create, get, put, delete, versions, ETag, If-Match, tombstones,
//! tenancy, input validation.

use guardian_protocol::problem_type;
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, start_default, OTHER_TOKEN};

#[tokio::test]
async fn create_get_update_delete_with_versions_and_etags() {
    let h = start_default().await;
    let r = h.create("device", "d1", json!({"name": "a"}), "k1").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["type"], "device");
    assert_eq!(r.body["deleted"], false);
    assert!(r.body["updated_at"].as_str().unwrap().ends_with('Z'));

    let g = h.get("device", "d1").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.header("etag"), Some("\"1\""));
    assert_eq!(g.body["data"], json!({"name": "a"}));

    let u = h
        .put("device", "d1", json!({"name": "b"}), "k2", Some(1))
        .await;
    assert_eq!(u.status, 200);
    assert_eq!(u.body["version"], 2);
    assert_eq!(u.header("etag"), Some("\"2\""));

    // Unquoted If-Match is accepted on input.
    let u = h
        .send(
            h.req(Method::PUT, "/v1/entities/device/d1")
                .header("idempotency-key", "k3")
                .header("if-match", "2")
                .json(&json!({"data": {"name": "c"}})),
        )
        .await;
    assert_eq!(u.status, 200);
    assert_eq!(u.body["version"], 3);

    let d = h.delete("device", "d1", "k4", Some(3)).await;
    assert_eq!(d.status, 204);
    assert_eq!(d.body, serde_json::Value::Null);

    let g = h.get("device", "d1").await;
    assert_eq!(g.status, 410);
    assert_eq!(g.problem_type(), problem_type::GONE);
    assert_eq!(g.body["current"]["version"], 4);
    assert_eq!(g.body["current"]["deleted"], true);
}

#[tokio::test]
async fn create_conflicts_and_recreate_over_tombstone() {
    let h = start_default().await;
    assert_eq!(
        h.create("device", "d1", json!({"v": 1}), "a").await.status,
        201
    );
    let r = h.create("device", "d1", json!({"v": 2}), "b").await;
    assert_eq!(r.status, 409);
    assert!(r.is_problem());
    assert_eq!(r.problem_type(), problem_type::CONFLICT_EXISTS);
    assert_eq!(r.body["current"]["data"], json!({"v": 1}));
    assert_eq!(h.delete("device", "d1", "c", None).await.status, 204);
    // Re-create over the tombstone: version continues.
    let r = h.create("device", "d1", json!({"v": 3}), "d").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["version"], 3);
    assert_eq!(h.get("device", "d1").await.body["data"], json!({"v": 3}));
}

#[tokio::test]
async fn version_conflicts_carry_current() {
    let h = start_default().await;
    h.create("device", "d1", json!({"v": 1}), "a").await;
    h.put("device", "d1", json!({"v": 2}), "b", Some(1)).await;
    let r = h.put("device", "d1", json!({"v": 3}), "c", Some(1)).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.problem_type(), problem_type::CONFLICT_VERSION);
    assert_eq!(r.body["current"]["version"], 2);
    assert_eq!(r.body["current"]["data"], json!({"v": 2}));
    let r = h.delete("device", "d1", "d", Some(7)).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.problem_type(), problem_type::CONFLICT_VERSION);
    // The refused ops changed nothing.
    assert_eq!(h.get("device", "d1").await.body["version"], 2);
    assert_eq!(h.applied_keys().await, vec!["a", "b"]);
}

#[tokio::test]
async fn missing_and_gone() {
    let h = start_default().await;
    let r = h.get("device", "nope").await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    let r = h.put("device", "nope", json!({}), "a", None).await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    let r = h.delete("device", "nope", "b", None).await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    h.create("device", "d1", json!({}), "c").await;
    h.delete("device", "d1", "d", None).await;
    let r = h.delete("device", "d1", "e", None).await;
    assert_eq!((r.status, r.problem_type()), (410, problem_type::GONE));
    let r = h.put("device", "d1", json!({}), "f", None).await;
    assert_eq!((r.status, r.problem_type()), (410, problem_type::GONE));
}

#[tokio::test]
async fn unconditional_writes_by_default_and_428_when_required() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    assert_eq!(
        h.put("device", "d1", json!({"x": 1}), "b", None)
            .await
            .status,
        200
    );

    let h = start(builder().require_if_match(true)).await;
    h.create("device", "d1", json!({}), "a").await;
    let r = h.put("device", "d1", json!({"x": 1}), "b", None).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (428, problem_type::PRECONDITION_REQUIRED)
    );
    let r = h.delete("device", "d1", "c", None).await;
    assert_eq!(r.status, 428);
    assert_eq!(
        h.put("device", "d1", json!({"x": 1}), "d", Some(1))
            .await
            .status,
        200
    );
    let r = h
        .send(
            h.req(Method::DELETE, "/v1/entities/device/d1")
                .header("idempotency-key", "e")
                .header("if-match", "*"),
        )
        .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn tenants_are_isolated() {
    let h = start_default().await;
    h.create("device", "d1", json!({"secret": true}), "a").await;
    let other = h.as_token(OTHER_TOKEN);
    let r = other
        .send(other.req(Method::GET, "/v1/entities/device/d1"))
        .await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    let r = other
        .send(
            other
                .req(Method::PUT, "/v1/entities/device/d1")
                .header("idempotency-key", "a")
                .json(&json!({"data": {}})),
        )
        .await;
    assert_eq!(
        r.status, 404,
        "another tenant's entity is absent, and keys are per tenant"
    );
    // The same id is free in the other tenant.
    let r = other
        .send(
            other
                .req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "a")
                .json(&json!({"id": "d1", "data": {"mine": 1}})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        h.get("device", "d1").await.body["data"],
        json!({"secret": true})
    );
    let feed = other.send(other.req(Method::GET, "/v1/changes")).await;
    assert_eq!(feed.body["changes"].as_array().unwrap().len(), 1);
    assert_eq!(
        feed.body["changes"][0]["cursor"], 1,
        "cursors are per tenant"
    );
}

#[tokio::test]
async fn unauthorized_without_or_with_unknown_token() {
    let h = start_default().await;
    let r = h.send(h.http.get(h.url("/v1/entities/device/d1"))).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (401, problem_type::UNAUTHORIZED)
    );
    assert!(r.is_problem());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = h
        .send(h.http.get(h.url("/v1/changes")).bearer_auth("wrong"))
        .await;
    assert_eq!(r.status, 401);
    let r = h
        .send(
            h.http
                .get(h.url("/v1/changes"))
                .header("authorization", "Basic dTpw"),
        )
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn bad_input_is_400_problem() {
    let h = start_default().await;
    for (ty, id) in [("Device", "d1"), ("device", "a b"), ("9x", "d1")] {
        let r = h.create(ty, id, json!({}), "k").await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, problem_type::BAD_REQUEST),
            "{ty}/{id}"
        );
    }
    let r = h.get("device", &"x".repeat(129)).await;
    assert_eq!(r.status, 400);
    // Malformed JSON, with a message saying where.
    let r = h
        .send(
            h.req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "k")
                .header("content-type", "application/json")
                .body("{\"id\": \"d1\", \"data\": {"),
        )
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::BAD_REQUEST)
    );
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{:?}",
        r.body
    );
    // Not JSON at all.
    let r = h
        .send(
            h.req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "k")
                .header("content-type", "text/plain")
                .body("hello"),
        )
        .await;
    assert_eq!(r.status, 415);
    assert!(r.is_problem());
    // Right JSON, wrong shape.
    let r = h
        .send(
            h.req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "k")
                .json(&json!({"data": {}})),
        )
        .await;
    assert_eq!(r.status, 400);
    // Data must be an object.
    let r = h.create("device", "d1", json!([1, 2]), "k").await;
    assert_eq!(r.status, 400);
    // Bad If-Match.
    h.create("device", "d1", json!({}), "c1").await;
    let r = h
        .send(
            h.req(Method::PUT, "/v1/entities/device/d1")
                .header("idempotency-key", "k2")
                .header("if-match", "W/\"x\"")
                .json(&json!({"data": {}})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(h.applied_keys().await == vec!["c1"]);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let h = start_default().await;
    let r = h.send(h.req(Method::GET, "/v2/nothing")).await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    assert!(r.is_problem());
    let r = h.send(h.req(Method::PATCH, "/v1/entities/device/d1")).await;
    assert_eq!(r.status, 405);
    assert!(r.is_problem());
}
