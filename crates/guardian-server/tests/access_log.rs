//! The access log names each request's method, path and status, and never
//! a token (header or `?token=`) or a body. A binary of its own: the log is
//! captured by the process-wide subscriber, which tests running in parallel
//! in a shared binary would disturb (tracing caches callsite interest
//! globally).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use guardian_server::ServerBuilder;
use serde_json::json;

const TOKEN: &str = "tok-access-log-5e21";
const ADMIN: &str = "adm-access-log-93b0";
const PAYLOAD: &str = "payload-marker-7f3a";

/// A log writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_access_log_shows_no_token_and_no_payload() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let server = ServerBuilder::new()
        .token("acme", TOKEN)
        .admin_token(ADMIN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/v1/entities/device", server.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", "k-log")
        .json(&json!({"id": "d-log", "data": {"note": PAYLOAD}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let page = http
        .get(format!("{}/dashboard?token={ADMIN}", server.url()))
        .send()
        .await
        .unwrap();
    assert!(page.status().as_u16() < 500);
    server.shutdown().await;
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("/v1/entities/device") && log.contains("status=201"),
        "the access log has the request:\n{log}"
    );
    assert!(
        log.contains("/dashboard"),
        "the access log has the page:\n{log}"
    );
    for secret in [TOKEN, ADMIN, PAYLOAD] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}
