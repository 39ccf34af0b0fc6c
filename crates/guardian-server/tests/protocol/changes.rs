//! `GET /v1/changes`: gap-free cursors, paging, retention.

use std::time::Duration;

use guardian_protocol::{problem_type, ChangeFingerprint, SINCE_FINGERPRINT_PARAM};
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

/// A server with an hour of feed retention whose feed holds d1 and d2,
/// then an hour later d3 (d1 and d2 expired, not yet purged).
async fn d1_d2_expired_before_d3() -> crate::common::Harness {
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
    h
}

#[tokio::test]
async fn a_cursor_older_than_the_retention_is_410() {
    let h = d1_d2_expired_before_d3().await;
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

/// The `since_fingerprint` of the change `type`/`id` at `version`.
fn held(entity_type: &str, id: &str, version: u64) -> String {
    ChangeFingerprint::of(entity_type, id, version).to_string()
}

async fn feed_query(h: &crate::common::Harness, query: &str) -> crate::common::Resp {
    h.send(h.req(Method::GET, &format!("/v1/changes?{query}")))
        .await
}

/// A client that names the change it holds at `since`, and holds this
/// feed's, gets the page it would get without naming it.
#[tokio::test]
async fn a_since_fingerprint_of_the_change_at_since_is_served_as_without_one() {
    let h = start_default().await;
    for (id, key) in [("d1", "a"), ("d2", "b"), ("d3", "c")] {
        h.create("device", id, json!({}), key).await;
    }
    let plain = h.changes(2, 10).await;
    let checked = feed_query(
        &h,
        &format!(
            "since=2&{SINCE_FINGERPRINT_PARAM}={}&limit=10",
            held("device", "d2", 1)
        ),
    )
    .await;
    assert_eq!(checked.status, 200, "{:?}", checked.body);
    assert_eq!(checked.body, plain.body);
    assert_eq!(checked.body["changes"][0]["cursor"], 3);
}

/// A client that holds another change at `since` than this feed (the feed
/// was rewritten under it: restored from a backup, then written to) is told
/// to resync, exactly as for a `since` ahead of the feed: 410
/// `cursor-expired` with the feed's head.
#[tokio::test]
async fn a_since_fingerprint_of_another_change_is_410_with_the_head() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    h.create("device", "d2", json!({}), "b").await;
    h.put("device", "d1", json!({"n": 2}), "c", Some(1)).await;
    for (since, other) in [
        (2, held("device", "d1", 1)),  // the change at 1, not 2
        (2, held("device", "d2", 2)),  // a version the feed never had
        (2, held("sensor", "d2", 1)),  // another type
        (3, held("device", "d1", 1)),  // the entity's older version
        (3, held("device", "d1x", 2)), // another id
    ] {
        let r = feed_query(
            &h,
            &format!("since={since}&{SINCE_FINGERPRINT_PARAM}={other}"),
        )
        .await;
        assert_eq!(
            (r.status, r.problem_type()),
            (410, problem_type::CURSOR_EXPIRED),
            "since={since} {other}: {:?}",
            r.body
        );
        assert!(r.is_problem());
        assert_eq!(r.body[problem_type::FEED_HEAD], 3);
    }
    let r = feed_query(
        &h,
        &format!(
            "since=3&{SINCE_FINGERPRINT_PARAM}={}",
            held("device", "d1", 2)
        ),
    )
    .await;
    assert_eq!((r.status, r.body["changes"].clone()), (200, json!([])));
}

/// A fingerprint that is not exactly 16 lower-case hex digits, or that
/// comes without the `since` it names a change at, is a 400 problem.
#[tokio::test]
async fn a_malformed_since_fingerprint_is_400() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    let good = held("device", "d1", 1);
    let long = "a".repeat(10_000);
    for q in [
        format!("since=1&{SINCE_FINGERPRINT_PARAM}="),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}={}", &good[..15]),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}={good}0"),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}={}", good.to_uppercase()),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}=zzzzzzzzzzzzzzzz"),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}=%C3%A9{}", &good[..14]),
        format!("since=1&{SINCE_FINGERPRINT_PARAM}={long}"),
        format!("{SINCE_FINGERPRINT_PARAM}={good}"),
    ] {
        let r = feed_query(&h, &q).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, problem_type::BAD_REQUEST),
            "{}",
            &q[..q.len().min(80)]
        );
        assert!(r.is_problem());
        // The detail never echoes an oversized value back.
        assert!(
            r.body["detail"].as_str().unwrap().len() < 200,
            "{:?}",
            r.body
        );
    }
}

/// At the front of the retained feed (`since` equal to what was purged
/// through, 0 included) there is no change left to compare: a fingerprint
/// is not checked there, or every client of a feed quiet for the whole
/// retention would be sent into a resync. Past the front it is.
#[tokio::test]
async fn a_since_fingerprint_at_the_front_of_the_retained_feed_is_not_compared() {
    let h = d1_d2_expired_before_d3().await;
    assert_eq!(h.server.purge_expired().await.unwrap().changes, 2);
    let any = held("device", "nothing", 9);
    for since in [0, 2] {
        let r = feed_query(
            &h,
            &format!("since={since}&{SINCE_FINGERPRINT_PARAM}={any}"),
        )
        .await;
        if since == 0 {
            // Below the front: expired whatever the fingerprint.
            assert_eq!(r.status, 410);
        } else {
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["changes"][0]["cursor"], 3);
        }
    }
    let r = feed_query(&h, &format!("since=3&{SINCE_FINGERPRINT_PARAM}={any}")).await;
    assert_eq!(r.status, 410);
    let r = feed_query(
        &h,
        &format!(
            "since=3&{SINCE_FINGERPRINT_PARAM}={}",
            held("device", "d3", 1)
        ),
    )
    .await;
    assert_eq!(r.status, 200);

    // A fresh feed: 0 is its front.
    let fresh = start_default().await;
    fresh.create("device", "d1", json!({}), "a").await;
    let r = feed_query(&fresh, &format!("since=0&{SINCE_FINGERPRINT_PARAM}={any}")).await;
    assert_eq!(
        (r.status, r.body["changes"][0]["cursor"].clone()),
        (200, json!(1))
    );
}
