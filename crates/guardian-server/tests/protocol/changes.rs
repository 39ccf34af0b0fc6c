//! `GET /v1/changes`: gap-free cursors, paging, retention.

use std::time::Duration;

use guardian_protocol::problem_type;
use guardian_server::clock::ManualClock;
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, start_default};

#[tokio::test]
async fn the_feed_pages_with_gap_free_cursors() {
    let h = start_default().await;
    for i in 0..5 {
        h.create(
            "device",
            &format!("d{i}"),
            json!({"i": i}),
            &format!("c{i}"),
        )
        .await;
    }
    h.put("device", "d0", json!({"i": 10}), "u0", Some(1)).await;
    h.delete("device", "d1", "x1", None).await;
    let mut since = 0;
    let mut cursors = Vec::new();
    loop {
        let page = h.changes(since, 3).await;
        assert_eq!(page.status, 200);
        let changes = page.body["changes"].as_array().unwrap().clone();
        if changes.is_empty() {
            assert_eq!(page.body["next"], since);
            break;
        }
        cursors.extend(changes.iter().map(|c| c["cursor"].as_u64().unwrap()));
        // Every page names the feed's latest cursor, whatever it holds.
        assert_eq!(page.body["head"], 7);
        since = page.body["next"].as_u64().unwrap();
    }
    assert_eq!(cursors, (1..=7).collect::<Vec<_>>());
    let all = h.changes(0, 1000).await.body["changes"].clone();
    assert_eq!(
        all[5],
        json!({"cursor": 6, "op": "update", "type": "device", "id": "d0", "version": 2, "data": {"i": 10}})
    );
    assert_eq!(
        all[6],
        json!({"cursor": 7, "op": "delete", "type": "device", "id": "d1", "version": 2, "data": null})
    );
}

/// A page ends with the change that takes its data past 4 MiB, however
/// many changes were asked for: 1000 of the largest entities would be read
/// into memory whole. The rest follows on later pages.
#[tokio::test]
async fn a_page_of_large_changes_is_bounded_by_bytes() {
    let h = start_default().await;
    h.create_large_docs(6).await;
    let mut since = 0;
    let mut sizes = Vec::new();
    loop {
        let page = h.changes(since, 1000).await;
        assert_eq!(page.status, 200);
        let n = page.body["changes"].as_array().unwrap().len();
        if n == 0 {
            break;
        }
        sizes.push(n);
        since = page.body["next"].as_u64().unwrap();
    }
    // Four changes hold 3.6 MB, under the bound: the fifth crosses it.
    assert_eq!(sizes, [5, 1]);
    assert_eq!(since, 6);
}

#[tokio::test]
async fn bad_parameters_are_400() {
    let h = start_default().await;
    for q in ["since=-1", "since=abc", "limit=0", "limit=x"] {
        let r = h
            .send(h.req(Method::GET, &format!("/v1/changes?{q}")))
            .await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, problem_type::BAD_REQUEST),
            "{q}"
        );
    }
}

#[tokio::test]
async fn a_cursor_older_than_the_retention_is_410() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(
        builder()
            .clock(clock.clone())
            .feed_retention(Duration::from_secs(3600)),
    )
    .await;
    h.create("device", "d1", json!({}), "a").await;
    h.create("device", "d2", json!({}), "b").await;
    clock.advance_millis(3_600_001);
    h.create("device", "d3", json!({}), "c").await;
    let report = h.server.purge_expired().await.unwrap();
    assert_eq!(report.changes, 2);
    for since in [0, 1] {
        let r = h.changes(since, 10).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (410, problem_type::CURSOR_EXPIRED),
            "since={since}"
        );
        assert!(r.is_problem());
        // Where the client rejoins after refetching its state.
        assert_eq!(r.body[problem_type::FEED_HEAD], 3, "since={since}");
    }
    let r = h.changes(2, 10).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["changes"][0]["cursor"], 3);
}

#[tokio::test]
async fn a_cursor_ahead_of_the_feed_is_410() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    let r = h.changes(5, 10).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (410, problem_type::CURSOR_EXPIRED)
    );
    assert_eq!(r.body[problem_type::FEED_HEAD], 1);
    assert_eq!(h.changes(1, 10).await.status, 200);
}
