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

/// Ids that could not route as one path segment, checked by the rule the
/// client shares ([`guardian_protocol::validate_entity_id`]): `.` and `..`
/// are removed from a URL path by every client, the rest cannot be a
/// segment at all. Each is refused on create (id in the body), in a batch
/// (every kind), and, where it can be spelled in a path, on GET, PUT and
/// DELETE; nothing is applied.
#[tokio::test]
async fn unroutable_ids_are_refused_everywhere() {
    let h = start_default().await;
    let long = "x".repeat(129);
    let bad = [
        "", ".", "..", "/", "a/b", "%", "%2e", "?", "#", " ", "a b", "\t", "\n", "\0", "\u{7f}",
        "é", &long,
    ];
    for (n, id) in bad.iter().enumerate() {
        let r = h.create("device", id, json!({}), &format!("c{n}")).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, problem_type::BAD_REQUEST),
            "create {id:?}"
        );
        let ops: Vec<_> = ["create", "update", "delete"]
            .iter()
            .map(|op| json!({"op": op, "type": "device", "id": id, "data": {}, "idempotency_key": format!("b{n}{op}")}))
            .map(|mut o| {
                if o["op"] == "delete" {
                    o.as_object_mut().unwrap().remove("data");
                }
                o
            })
            .collect();
        let r = h.batch(json!(ops)).await;
        assert_eq!(r.status, 200, "batch {id:?}");
        assert_eq!(
            crate::common::batch_statuses(&r.body),
            vec![400, 400, 400],
            "batch {id:?}"
        );
    }
    // The dot segments, plain or percent-encoded, sent raw: URL libraries
    // (reqwest's included) remove them from a path before sending.
    for path_id in ["%2E", "%2e%2E", "%2e%2e", ".", ".."] {
        for (method, body) in [("GET", ""), ("PUT", r#"{"data":{}}"#), ("DELETE", "")] {
            let status =
                raw_status(&h, method, &format!("/v1/entities/device/{path_id}"), body).await;
            assert_eq!(status, 400, "{method} {path_id}");
        }
    }
    assert!(h.applied_keys().await.is_empty());
}

/// The status of one request written byte for byte on a fresh connection.
async fn raw_status(h: &crate::common::Harness, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = h.server.url().trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         idempotency-key: raw\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        h.token,
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut response),
    )
    .await
    .expect("no response in 10 s")
    .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
