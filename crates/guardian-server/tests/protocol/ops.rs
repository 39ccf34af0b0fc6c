//! `/healthz`, `/metrics`, `/openapi.json` and the committed OpenAPI document.

use reqwest::Method;
use serde_json::json;

use crate::common::start_default;

#[tokio::test]
async fn healthz_needs_no_token() {
    let h = start_default().await;
    let r = h.send(h.http.get(h.url("/healthz"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
}

#[tokio::test]
async fn metrics_count_requests_replays_conflicts_and_ws_clients() {
    let h = start_default().await;
    h.create("device", "d1", json!({}), "a").await;
    h.create("device", "d1", json!({}), "a").await;
    h.create("device", "d1", json!({}), "b").await;
    let r = h.http.get(h.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"guardian_http_requests_total{method="POST",route="/v1/entities/{type}",status="201"} 2"#),
        "{text}"
    );
    assert!(text.contains(
        r#"guardian_http_requests_total{method="POST",route="/v1/entities/{type}",status="409"} 1"#
    ));
    assert!(text.contains("guardian_idempotent_replays_total 1"));
    assert!(text.contains("guardian_conflicts_total 1"));
    assert!(text.contains("guardian_mutations_applied_total 1"));
    assert!(text.contains("guardian_realtime_clients 0"));
}

/// The committed document must equal the generated one. Regenerate with
/// `UPDATE_OPENAPI=1 cargo test -p guardian-server --test protocol openapi`.
#[tokio::test]
async fn openapi_is_served_and_matches_the_committed_document() {
    let generated = guardian_server::openapi::document_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date: run UPDATE_OPENAPI=1 cargo test -p guardian-server --test protocol openapi"
    );
    let h = start_default().await;
    let served = h
        .send(h.http.request(Method::GET, h.url("/openapi.json")))
        .await;
    assert_eq!(served.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(served.body, doc);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in [
        "/v1/entities/{type}",
        "/v1/entities/{type}/{id}",
        "/v1/batch",
        "/v1/changes",
        "/v1/realtime",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
}
