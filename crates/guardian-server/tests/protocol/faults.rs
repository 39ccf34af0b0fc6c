//! Fault injection: failures with statuses and Retry-After, forced
//! conflicts, seeded determinism, the admin route.

use std::time::{Duration, SystemTime};

use guardian_protocol::problem_type;
use guardian_server::{Faults, RetryAfter, RetryAfterForm};
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, start_default, ADMIN};

#[tokio::test]
async fn injected_failures_apply_nothing_and_carry_retry_after() {
    let h = start(builder().faults(Faults {
        fail_next: 2,
        failure_statuses: vec![502],
        retry_after: Some(RetryAfter {
            seconds: 7,
            form: RetryAfterForm::Seconds,
        }),
        ..Faults::default()
    }))
    .await;
    let r = h.create("device", "d1", json!({}), "k").await;
    assert_eq!(
        (r.status, r.problem_type()),
        (502, problem_type::UNAVAILABLE)
    );
    assert!(r.is_problem());
    assert_eq!(r.header("retry-after"), Some("7"));
    let r = h.get("device", "d1").await;
    assert_eq!(r.status, 502);
    assert!(h.applied_keys().await.is_empty());
    assert_eq!(h.create("device", "d1", json!({}), "k").await.status, 201);
}

#[tokio::test]
async fn retry_after_as_an_http_date() {
    let h = start_default().await;
    h.server
        .set_faults(Faults {
            fail_next: 1,
            failure_statuses: vec![503],
            retry_after: Some(RetryAfter {
                seconds: 30,
                form: RetryAfterForm::HttpDate,
            }),
            ..Faults::default()
        })
        .unwrap();
    let before = SystemTime::now();
    let r = h.get("device", "d1").await;
    assert_eq!(r.status, 503);
    let at = httpdate::parse_http_date(r.header("retry-after").unwrap()).unwrap();
    let delta = at.duration_since(before).unwrap();
    assert!(
        delta >= Duration::from_secs(29) && delta <= Duration::from_secs(32),
        "{delta:?}"
    );
}

#[tokio::test]
async fn each_status_can_be_injected() {
    for status in [500u16, 502, 503, 429] {
        let h = start(builder().faults(Faults {
            fail_next: 1,
            failure_statuses: vec![status],
            ..Faults::default()
        }))
        .await;
        let r = h.changes(0, 1).await;
        assert_eq!(r.status, status);
        assert!(r.is_problem());
    }
}

#[tokio::test]
async fn seeded_faults_are_deterministic() {
    let faults = Faults {
        failure_rate: 0.5,
        failure_statuses: vec![500, 502, 503, 429],
        seed: Some(42),
        ..Faults::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let h = start(builder().faults(faults.clone())).await;
        let mut statuses = Vec::new();
        for _ in 0..24 {
            statuses.push(h.changes(0, 1).await.status);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&200) && runs[0].iter().any(|s| *s != 200));
}

#[tokio::test]
async fn forced_conflicts_are_real() {
    let h = start_default().await;
    h.create("device", "d1", json!({"a": 1}), "a").await;
    h.server
        .set_faults(Faults {
            conflict_next: 1,
            ..Faults::default()
        })
        .unwrap();
    let r = h.put("device", "d1", json!({"a": 2}), "b", Some(1)).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (409, problem_type::CONFLICT_VERSION)
    );
    assert_eq!(r.body["current"]["version"], 2);
    assert_eq!(r.body["current"]["data"], json!({"a": 1}));
    // The concurrent writer's change is in the feed and the log.
    assert_eq!(h.applied_keys().await, vec!["a", "fault:conflict:0"]);
    assert_eq!(h.changes(1, 10).await.body["changes"][0]["version"], 2);
    // Retrying with the current version works.
    assert_eq!(
        h.put("device", "d1", json!({"a": 2}), "c", Some(2))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn the_admin_route_sets_faults_with_its_own_token() {
    let h = start_default().await;
    let r = h.send(h.http.get(h.url("/admin/faults"))).await;
    assert_eq!(r.status, 401);
    let r = h
        .send(
            h.http
                .get(h.url("/admin/faults"))
                .bearer_auth(crate::common::TOKEN),
        )
        .await;
    assert_eq!(r.status, 401, "a tenant token is not the admin token");
    let r = h
        .send(
            h.admin(Method::PUT, "/admin/faults")
                .json(&json!({"fail_next": 1, "failure_statuses": [503]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["fail_next"], 1);
    assert_eq!(h.server.faults().fail_next, 1);
    assert_eq!(h.changes(0, 1).await.status, 503);
    assert_eq!(h.changes(0, 1).await.status, 200);
    let r = h
        .send(
            h.admin(Method::PUT, "/admin/faults")
                .json(&json!({"failure_rate": 2.0})),
        )
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (400, problem_type::BAD_REQUEST)
    );
    let r = h
        .send(
            h.admin(Method::PUT, "/admin/faults")
                .json(&json!({"no_such_fault": 1})),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = h.send(h.admin(Method::GET, "/admin/faults")).await;
    assert_eq!(r.body["fail_next"], 0);
    // The applied log over HTTP, for out-of-process tests.
    h.create("t", "x", json!({}), "k").await;
    let r = h.send(h.admin(Method::GET, "/admin/applied")).await;
    assert_eq!(r.body[0]["idempotency_key"], "k");
    let _ = ADMIN;
}

/// A server that keeps no applied-mutations log applies as ever and says
/// so when asked for the log.
#[tokio::test]
async fn the_applied_log_can_be_off() {
    let h = start(builder().applied_log(false)).await;
    assert_eq!(h.create("t", "x", json!({}), "k").await.status, 201);
    let r = h.send(h.admin(Method::GET, "/admin/applied")).await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
    assert!(matches!(
        h.server.applied_log().await,
        Err(guardian_server::StoreError::AppliedLogOff)
    ));
}

#[tokio::test]
async fn admin_routes_are_absent_without_an_admin_token() {
    let h = start(guardian_server::ServerBuilder::new().token("acme", crate::common::TOKEN)).await;
    let r = h.send(h.admin(Method::GET, "/admin/faults")).await;
    assert_eq!((r.status, r.problem_type()), (404, problem_type::NOT_FOUND));
}
