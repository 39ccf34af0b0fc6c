//! `/healthz`, `/metrics`, `/openapi.json` and the committed OpenAPI document.

use reqwest::Method;
use serde_json::json;

use crate::common::{metrics, start_default};

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

/// Methods a client makes up (no token needed) share one `other` series:
/// each used to become a counter of its own, kept for good.
#[tokio::test]
async fn made_up_methods_share_one_metrics_series() {
    let h = start_default().await;
    for i in 0..3 {
        let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let r = h.http.request(method, h.url("/x")).send().await.unwrap();
        assert!(r.status().is_client_error());
    }
    let text = metrics(&h).await;
    assert!(!text.contains("MADEUP"), "{text}");
    assert!(
        text.contains(
            r#"guardian_http_requests_total{method="other",route="unmatched",status="404"} 3"#
        ),
        "{text}"
    );
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
        "/v1/transactions",
        "/v1/changes",
        "/v1/realtime",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
}

/// Every status the middleware and the extractors can answer is declared on
/// each operation they wrap, and path parameters carry their real syntax
/// (`.ci/schemathesis.sh` checks the same against the live server).
#[test]
fn openapi_declares_every_status_and_the_path_syntax() {
    let doc: serde_json::Value =
        serde_json::from_str(&guardian_server::openapi::document_json()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let declared = |status: &str| op["responses"].get(status).is_some();
            let want: &[&str] = if path.starts_with("/v1/") {
                &["401", "429", "500", "503"]
            } else if path.starts_with("/admin/") {
                &["401", "404"]
            } else {
                &[]
            };
            for status in want {
                assert!(
                    declared(status),
                    "{method} {path} does not declare {status}"
                );
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    assert!(
                        declared(status),
                        "{method} {path} does not declare {status}"
                    );
                }
            }
            if path == "/v1/entities/{type}/{id}" {
                assert!(declared("400"), "{method} {path} does not declare 400");
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                if param["in"] == "path" {
                    assert!(
                        param["schema"]["pattern"].is_string(),
                        "{method} {path}: path parameter {} has no pattern",
                        param["name"]
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}
