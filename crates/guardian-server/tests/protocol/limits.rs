//! Limits: body size, rate, request timeout, concurrency.

use std::time::Duration;

use guardian_protocol::problem_type;
use guardian_server::{Faults, RateLimit};
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, OTHER_TOKEN};

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let h = start(builder().body_limit(1024)).await;
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(2000)}), "k")
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (413, problem_type::PAYLOAD_TOO_LARGE)
    );
    assert!(r.is_problem());
    assert!(h.applied_keys().await.is_empty());
    assert_eq!(
        h.create("device", "d1", json!({"x": "y"}), "k")
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn the_default_limit_is_one_mebibyte() {
    let h = start(builder()).await;
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(1024 * 1024)}), "k")
        .await;
    assert_eq!(r.status, 413);
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(1000 * 1000)}), "k")
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn the_rate_limit_is_per_tenant_with_retry_after() {
    let h = start(builder().rate_limit(Some(RateLimit {
        per_second: 0.01,
        burst: 2,
    })))
    .await;
    assert_eq!(h.changes(0, 1).await.status, 200);
    assert_eq!(h.changes(0, 1).await.status, 200);
    let r = h.changes(0, 1).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (429, problem_type::RATE_LIMITED)
    );
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&secs), "{secs}");
    let other = h.as_token(OTHER_TOKEN);
    assert_eq!(
        other
            .send(other.req(Method::GET, "/v1/changes"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn slow_requests_time_out_before_commit_and_apply_nothing() {
    let h = start(
        builder()
            .request_timeout(Duration::from_millis(100))
            .faults(Faults {
                latency_ms: 5_000,
                ..Faults::default()
            }),
    )
    .await;
    let r = h.get("device", "d1").await;
    assert_eq!((r.status, r.problem_type()), (503, problem_type::TIMEOUT));
    let r = h.create("device", "d1", json!({}), "k").await;
    assert_eq!((r.status, r.problem_type()), (503, problem_type::TIMEOUT));
    assert!(
        h.applied_keys().await.is_empty(),
        "a timeout means nothing was applied"
    );
    assert_eq!(
        h.server.in_flight(),
        0,
        "the timed-out request released its key"
    );
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_wait_their_turn() {
    let h = start(builder().concurrency_limit(1)).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let req = h.create_req("t", &format!("i{i}"), json!({}), &format!("k{i}"));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
}
