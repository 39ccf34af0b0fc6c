//! `/v1/telemetry`, the fleet gauges of `/metrics`, the dashboard's routes
//! and the alert webhook, over real HTTP on 127.0.0.1.

use std::time::Duration;

use futures::StreamExt;
use guardian_server::clock::ManualClock;
use guardian_server::{AlertRules, FleetLimits};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{builder, metrics, start, start_default, Harness, ADMIN, OTHER_TOKEN, TOKEN};

fn snapshot(id: &str, breaker: &str, pending: u64, failed: u64, succeeded: u64) -> Value {
    json!({
        "runner_id": id, "labels": {"app": "test"}, "at": 1, "seq": 1,
        "queue": {"pending": pending, "in_flight": 0, "failed": failed},
        "oldest_pending_age_ms": null, "last_failures": if failed > 0 { json!(["422: bad"]) } else { json!([]) },
        "breaker": breaker, "health_score": if breaker == "open" { 10 } else { 95 },
        "latency_p50_ms": 3.0, "latency_p95_ms": 9.5,
        "succeeded": succeeded, "failed": failed, "conflicts": 0, "breaker_trips": 0,
        "last_sync_at": null,
    })
}

async fn post(h: &Harness, token: &str, body: &Value) -> u16 {
    h.http
        .post(h.url("/v1/telemetry"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn state(h: &Harness) -> Value {
    h.http
        .get(h.url("/dashboard/state"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[tokio::test]
async fn snapshots_need_a_token_and_valid_bounds() {
    let h = start_default().await;
    let good = snapshot("phone-1", "closed", 0, 0, 0);
    let r = h
        .http
        .post(h.url("/v1/telemetry"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut bad = good.clone();
    bad["runner_id"] = json!("");
    assert_eq!(post(&h, TOKEN, &bad).await, 400);
    bad = good.clone();
    bad["last_failures"] = json!(vec!["x"; 6]);
    assert_eq!(post(&h, TOKEN, &bad).await, 400);
    bad = good.clone();
    bad["breaker"] = json!("sideways");
    assert_eq!(post(&h, TOKEN, &bad).await, 400);
    let r = h
        .http
        .post(h.url("/v1/telemetry"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(state(&h).await["devices"].as_array().unwrap().len(), 0);
    assert_eq!(post(&h, TOKEN, &good).await, 204);
    let s = state(&h).await;
    assert_eq!(s["devices"][0]["runner_id"], "phone-1");
    assert_eq!(s["devices"][0]["tenant"], "acme");
}

#[tokio::test]
async fn tenants_keep_their_own_devices_and_metrics_aggregate_them() {
    let h = start_default().await;
    // The same runner id in two tenants is two devices.
    assert_eq!(
        post(&h, TOKEN, &snapshot("d1", "closed", 3, 1, 5)).await,
        204
    );
    assert_eq!(
        post(&h, OTHER_TOKEN, &snapshot("d1", "open", 4, 0, 0)).await,
        204
    );
    assert_eq!(
        post(&h, TOKEN, &snapshot("d2", "half_open", 0, 2, 0)).await,
        204
    );
    let m = metrics(&h).await;
    assert_eq!(gauge(&m, "guardian_fleet_devices{breaker=\"closed\"}"), 1);
    assert_eq!(gauge(&m, "guardian_fleet_devices{breaker=\"open\"}"), 1);
    assert_eq!(
        gauge(&m, "guardian_fleet_devices{breaker=\"half_open\"}"),
        1
    );
    assert_eq!(gauge(&m, "guardian_fleet_queue_depth"), 7);
    assert_eq!(gauge(&m, "guardian_fleet_dead_letters"), 3);
    // A later snapshot replaces the device's earlier one.
    assert_eq!(
        post(&h, TOKEN, &snapshot("d1", "closed", 0, 1, 8)).await,
        204
    );
    assert_eq!(gauge(&metrics(&h).await, "guardian_fleet_queue_depth"), 4);
    let s = state(&h).await;
    let tenants: Vec<_> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["tenant"].as_str().unwrap(),
                d["runner_id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(tenants.len(), 3, "{tenants:?}");
    assert!(tenants.contains(&"globex/d1".to_owned()));
}

#[tokio::test]
async fn stalled_devices_are_counted_by_the_server_clock() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(builder().clock(clock.clone()).alert_rules(AlertRules {
        stalled_for: Some(Duration::from_secs(60)),
        ..AlertRules::default()
    }))
    .await;
    assert_eq!(
        post(&h, TOKEN, &snapshot("busy", "closed", 5, 0, 10)).await,
        204
    );
    assert_eq!(
        post(&h, TOKEN, &snapshot("idle", "closed", 0, 0, 10)).await,
        204
    );
    clock.advance_millis(59_000);
    // Progress (acked ops) resets the stall; the idle device has no queue.
    assert_eq!(
        post(&h, TOKEN, &snapshot("busy", "closed", 5, 0, 10)).await,
        204
    );
    assert_eq!(
        gauge(&metrics(&h).await, "guardian_fleet_stalled_devices"),
        0
    );
    clock.advance_millis(1_000);
    assert_eq!(
        gauge(&metrics(&h).await, "guardian_fleet_stalled_devices"),
        1
    );
    assert_eq!(
        post(&h, TOKEN, &snapshot("busy", "closed", 4, 0, 11)).await,
        204
    );
    assert_eq!(
        gauge(&metrics(&h).await, "guardian_fleet_stalled_devices"),
        0
    );
}

/// A client that shows redirects instead of following them (the
/// dashboard answers its token with one).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The runner ids of the dashboard state's devices, sorted.
fn device_ids(state: &Value) -> Vec<String> {
    let mut v: Vec<String> = state["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["runner_id"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// A full fleet makes room for a tenant with fewer devices at the expense
/// of the tenant with the most. Before, two tenants filling the total locked
/// every other tenant's devices out for good.
#[tokio::test]
async fn a_full_fleet_makes_room_for_a_smaller_tenant() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(
        builder()
            .token("initech", "tok-initech")
            .clock(clock.clone())
            .fleet_limits(FleetLimits {
                devices_per_tenant: 3,
                devices_total: 4,
                history: 4,
            }),
    )
    .await;
    for (token, id) in [
        (TOKEN, "a1"),
        (TOKEN, "a2"),
        (TOKEN, "a3"),
        (OTHER_TOKEN, "g1"),
    ] {
        assert_eq!(post(&h, token, &snapshot(id, "closed", 0, 0, 0)).await, 204);
        clock.advance_millis(1);
    }
    // acme holds 3, initech 0: acme's least recently seen device goes.
    assert_eq!(
        post(&h, "tok-initech", &snapshot("i1", "closed", 0, 0, 0)).await,
        204
    );
    clock.advance_millis(1);
    assert_eq!(device_ids(&state(&h).await), ["a2", "a3", "g1", "i1"]);
    // Now acme holds 2 and the others 1 each: no tenant holds two more
    // than another, so a new device is refused, whoever it belongs to.
    for (token, id) in [(TOKEN, "a4"), (OTHER_TOKEN, "g2"), ("tok-initech", "i2")] {
        assert_eq!(
            post(&h, token, &snapshot(id, "closed", 0, 0, 0)).await,
            503,
            "{id}"
        );
    }
    assert_eq!(device_ids(&state(&h).await), ["a2", "a3", "g1", "i1"]);
}

#[tokio::test]
async fn the_fleet_is_bounded_per_tenant_and_in_total() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(builder().clock(clock.clone()).fleet_limits(FleetLimits {
        devices_per_tenant: 2,
        devices_total: 3,
        history: 4,
    }))
    .await;
    for id in ["a", "b", "c"] {
        assert_eq!(post(&h, TOKEN, &snapshot(id, "closed", 0, 0, 0)).await, 204);
        clock.advance_millis(1);
    }
    // acme keeps its two most recently seen devices.
    assert_eq!(device_ids(&state(&h).await), ["b", "c"]);
    assert_eq!(
        post(&h, OTHER_TOKEN, &snapshot("x", "closed", 0, 0, 0)).await,
        204
    );
    // Three devices in total: a new one is refused, a known one still reports.
    assert_eq!(
        post(&h, OTHER_TOKEN, &snapshot("y", "closed", 0, 0, 0)).await,
        503
    );
    for _ in 0..10 {
        assert_eq!(
            post(&h, TOKEN, &snapshot("c", "closed", 0, 0, 0)).await,
            204
        );
    }
    let s = state(&h).await;
    let c = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["runner_id"] == "c")
        .unwrap();
    assert_eq!(c["history"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn the_dashboard_needs_the_admin_token_and_trades_it_for_a_cookie() {
    let h = start_default().await;
    let http = no_redirects();
    let get = |path: &str| http.get(h.url(path));
    assert_eq!(get("/dashboard").send().await.unwrap().status(), 401);
    assert_eq!(
        get("/dashboard?token=nope").send().await.unwrap().status(),
        401
    );
    assert_eq!(get("/dashboard/state").send().await.unwrap().status(), 401);
    // A tenant's token is no admin token.
    let r = get("/dashboard/state")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = get(&format!("/dashboard?token={ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(
        !cookie.contains(ADMIN),
        "the cookie must not carry the token"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = get("/dashboard")
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("EventSource(\"/dashboard/events\")"));
    let r = get("/dashboard/state")
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get("/dashboard/state")
        .header("cookie", "gsync_dashboard=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Without an admin token the dashboard does not exist.
    let bare = start(guardian_server::ServerBuilder::new().token("acme", TOKEN)).await;
    let r = http
        .get(bare.url(&format!("/dashboard?token={ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http.get(bare.url("/dashboard/state")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// The session cookie lasts 12 hours by the server's clock, says so in
/// `Max-Age`, and is `Secure` when a proxy says the request came over HTTPS.
/// Before, it never expired: one copied cookie opened the dashboard for good.
#[tokio::test]
async fn the_dashboard_session_expires_and_is_secure_behind_https() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(builder().clock(clock.clone())).await;
    let http = no_redirects();
    let trade = |https: bool| {
        let mut req = http.get(h.url(&format!("/dashboard?token={ADMIN}")));
        if https {
            req = req.header("x-forwarded-proto", "https");
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 303);
            r.headers()["set-cookie"].to_str().unwrap().to_owned()
        }
    };
    let cookie = trade(false).await;
    assert!(cookie.contains("Max-Age=43200"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(trade(true).await.contains("; Secure"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    let state = |pair: String| {
        let req = http.get(h.url("/dashboard/state")).header("cookie", pair);
        async move { req.send().await.unwrap().status() }
    };
    // A stale cookie sent beside the valid one does not hide it.
    assert_eq!(state(format!("gsync_dashboard=junk; {pair}")).await, 200);
    clock.advance_millis(12 * 3600 * 1000 - 1);
    assert_eq!(state(pair.clone()).await, 200);
    clock.advance_millis(1);
    assert_eq!(state(pair.clone()).await, 401, "an expired session");
    // Its expiry pushed back by hand, the MAC no longer matches.
    let (name_expiry, mac) = pair.split_once('.').unwrap();
    let (name, _) = name_expiry.split_once('=').unwrap();
    let forged = format!("{name}={:016x}.{mac}", i64::MAX);
    assert_eq!(state(forged).await, 401);
}

/// An address that sends ten wrong admin tokens within a minute is refused
/// (429, even with the right token) until the minute ends; a browser that
/// merely opens the page without credentials is no failure. Before, the
/// admin token could be guessed at line rate.
#[tokio::test]
async fn wrong_admin_tokens_lock_the_address_out_for_a_while() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(builder().clock(clock.clone())).await;
    let http = no_redirects();
    let faults = |token: &str| {
        let req = http.get(h.url("/admin/faults")).bearer_auth(token);
        async move { req.send().await.unwrap() }
    };
    for _ in 0..20 {
        let r = http.get(h.url("/dashboard")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    for i in 0..10 {
        let wrong = if i % 2 == 0 {
            faults("guess").await.status()
        } else {
            let url = h.url("/dashboard?token=guess");
            http.get(url).send().await.unwrap().status()
        };
        assert_eq!(wrong, 401, "attempt {i}");
    }
    let r = faults(ADMIN).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    let r = http
        .get(h.url(&format!("/dashboard?token={ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // Tenants' routes are not affected.
    assert_eq!(h.get("device", "nope").await.status, 404);
    clock.advance_millis(60_000);
    assert_eq!(faults(ADMIN).await.status(), 200);
}

/// Reads SSE `data:` lines until one satisfies `pred` (bounded).
async fn next_state(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    let v: Value = serde_json::from_str(data.trim()).unwrap();
                    if pred(&v) {
                        return v;
                    }
                }
            }
        }
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("no matching event in time")
            .expect("stream ended")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn the_event_stream_pushes_changes_live() {
    let h = start_default().await;
    let resp = h
        .http
        .get(h.url("/dashboard/events"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let first = next_state(&mut stream, &mut buf, |_| true).await;
    assert_eq!(first["devices"].as_array().unwrap().len(), 0);
    assert!(first["faults"].is_object());
    assert_eq!(
        post(&h, TOKEN, &snapshot("live", "open", 2, 0, 0)).await,
        204
    );
    let s = next_state(&mut stream, &mut buf, |v| {
        v["devices"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(s["devices"][0]["breaker"], "open");
    assert_eq!(s["timeline"][0]["to"], "open");
    // Shutdown ends the stream instead of holding the server open.
    tokio::time::timeout(Duration::from_secs(10), h.server.shutdown())
        .await
        .expect("shutdown waited on the event stream");
}

async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no webhook call in time")
        .unwrap()
}

#[tokio::test]
async fn alerts_reach_a_real_webhook_with_retries() {
    use axum::routing::post as axum_post;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    // The receiver refuses its first delivery: the alert must be retried.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let calls = Arc::new(AtomicU32::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum_post({
            let calls = calls.clone();
            move |axum::Json(v): axum::Json<Value>| {
                let tx = tx.clone();
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let _ = tx.send(v);
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });

    let h = start(builder().alert_webhook(hook).alert_rules(AlertRules {
        breaker_open_for: Some(Duration::ZERO),
        stalled_for: None,
        dead_letters_above: Some(1),
        fleet_health_below: None,
    }))
    .await;
    assert_eq!(post(&h, TOKEN, &snapshot("p1", "open", 1, 0, 0)).await, 204);
    let fired = recv(&mut rx).await;
    assert_eq!(fired["status"], "firing");
    assert_eq!(fired["alert"]["rule"], "breaker_open");
    assert_eq!(fired["alert"]["device"], "p1");
    assert_eq!(fired["alert"]["tenant"], "acme");
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the first refusal was retried"
    );
    // The dashboard shows it while it fires.
    let s = state(&h).await;
    assert_eq!(s["alerts"][0]["rule"], "breaker_open");
    assert_eq!(
        post(&h, TOKEN, &snapshot("p1", "closed", 1, 2, 0)).await,
        204
    );
    let mut got = [recv(&mut rx).await, recv(&mut rx).await];
    got.sort_by_key(|v| v["alert"]["rule"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["alert"]["rule"], "breaker_open");
    assert_eq!(got[0]["status"], "resolved");
    assert_eq!(got[1]["alert"]["rule"], "dead_letters");
    assert_eq!(got[1]["status"], "firing");
    let s = state(&h).await;
    assert_eq!(s["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(s["incidents"][0]["kind"], "dead_letter");
    assert_eq!(s["incidents"][0]["reason"], "422: bad");
    receiver.abort();
}

#[tokio::test]
async fn telemetry_is_in_the_openapi_document() {
    let h = start_default().await;
    let doc: Value = h.send(h.req(Method::GET, "/openapi.json")).await.body;
    assert!(doc["paths"]["/v1/telemetry"]["post"].is_object());
    assert!(doc["components"]["schemas"]["TelemetrySnapshot"].is_object());
}

/// Behind a trusted proxy the lockout counts the forwarded client, not the
/// proxy: one client's wrong tokens lock out that client only. From a peer
/// that is not trusted, `X-Forwarded-For` changes nothing, so a guesser
/// cannot dodge the lockout by writing a new address into each request.
#[tokio::test]
async fn the_lockout_counts_the_client_behind_a_trusted_proxy_only() {
    let proxied = start(builder().trusted_proxies(["127.0.0.1".parse().unwrap()])).await;
    let direct = start(builder()).await;
    let http = no_redirects();
    let faults = |h: &Harness, token: &str, client: &str| {
        let req = http
            .get(h.url("/admin/faults"))
            .bearer_auth(token)
            .header("x-forwarded-for", format!("198.51.100.1, {client}"));
        async move { req.send().await.unwrap().status() }
    };
    for i in 0..10 {
        assert_eq!(faults(&proxied, "guess", "203.0.113.7").await, 401);
        assert_eq!(
            faults(&direct, "guess", &format!("203.0.113.{i}")).await,
            401
        );
    }
    assert_eq!(faults(&proxied, ADMIN, "203.0.113.7").await, 429);
    // The address the guesser wrote itself (left of the proxy's) is not
    // the one counted, and other clients behind the proxy are served.
    assert_eq!(faults(&proxied, ADMIN, "203.0.113.8").await, 200);
    let r = http.get(proxied.url("/admin/faults")).bearer_auth(ADMIN);
    assert_eq!(r.send().await.unwrap().status(), 200, "the proxy itself");
    assert_eq!(faults(&direct, ADMIN, "203.0.113.99").await, 429);
}
