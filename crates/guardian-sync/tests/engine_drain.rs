//! The engine against the real reference server on loopback (issue 4 and 5
//! end-to-end rules). Every test checks the server's applied log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use guardian_protocol::MutationKind;
use guardian_server::{
    AppliedMutation, Faults, RetryAfter, RetryAfterForm, RunningServer, ServerBuilder,
};
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::engine::{BatchConfig, SyncEngine, SyncEngineBuilder, SyncEvent};
use guardian_sync::op::{NewOp, OpState, TxnOutcome};
use guardian_sync::optimistic::Registration;
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions};
use guardian_sync::reconcile::{ConflictPolicy, ReconcilePolicies};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::{StaticToken, TokenError, TokenProvider};
use serde_json::{json, Value};
use tokio::sync::broadcast;

const TOKEN: &str = "tok-a";

async fn server(faults: Faults) -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .faults(faults)
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// A server that requires `If-Match` on every update and delete.
async fn strict_server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .require_if_match(true)
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// Enqueues CREATEs of devices `d0..dn`, each `{"i": i}`.
async fn enqueue_devices(engine: &SyncEngine, n: usize) {
    for i in 0..n {
        engine
            .enqueue(NewOp::create("device", format!("d{i}"), json!({"i": i})))
            .await
            .unwrap();
    }
}

/// Faults that fail `fail_next` requests (every request when `None`) with a
/// 503 and, if given, a `Retry-After` of `seconds` in `form`.
fn unavailable(fail_next: Option<u32>, retry_after: Option<(u64, RetryAfterForm)>) -> Faults {
    Faults {
        fail_next: fail_next.unwrap_or(0),
        failure_rate: if fail_next.is_none() { 1.0 } else { 0.0 },
        failure_statuses: vec![503],
        retry_after: retry_after.map(|(seconds, form)| RetryAfter { seconds, form }),
        ..Faults::default()
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy::new(
        Duration::from_millis(5),
        2.0,
        Duration::from_millis(50),
        20,
        Duration::from_secs(10),
    )
    .unwrap()
}

fn builder(dir: &tempfile::TempDir, server: &RunningServer) -> SyncEngineBuilder {
    builder_at(dir, server.url())
}

/// An engine's builder for a backend at `url` (the server, or a proxy to it).
fn builder_at(dir: &tempfile::TempDir, url: String) -> SyncEngineBuilder {
    SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .server(url)
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .retry(fast_retry())
}

async fn engine(dir: &tempfile::TempDir, server: &RunningServer) -> SyncEngine {
    builder(dir, server).build().await.unwrap()
}

/// Waits (bounded) for the run to end.
async fn drain(engine: &SyncEngine) {
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_empty())
        .await
        .expect("drain did not finish in 60 s")
        .unwrap();
}

fn collect(rx: &mut broadcast::Receiver<SyncEvent>) -> Vec<SyncEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Invariants 2 and 3 on the applied log: each key once, per-entity order by version.
fn assert_log_clean(log: &[AppliedMutation]) {
    let mut keys = std::collections::HashSet::new();
    let mut versions: HashMap<(String, String), u64> = HashMap::new();
    for m in log {
        assert!(
            keys.insert(m.idempotency_key.clone()),
            "key applied twice: {m:?}"
        );
        let v = versions
            .entry((m.entity_type.clone(), m.id.clone()))
            .or_insert(0);
        assert!(m.version > *v, "version went backwards: {m:?}");
        *v = m.version;
    }
}

/// Another writer replaces the entity's data (optionally `If-Match`) under
/// its own idempotency key, as a second device would.
async fn other_writer_put(
    server: &RunningServer,
    path: &str,
    key: &str,
    if_match: Option<u64>,
    data: Value,
) {
    let mut put = reqwest::Client::new()
        .put(format!("{}/v1/entities/{path}", server.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", key);
    if let Some(v) = if_match {
        put = put.header("if-match", format!("\"{v}\""));
    }
    let r = put.json(&json!({ "data": data })).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn get(server: &RunningServer, ty: &str, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/entities/{ty}/{id}", server.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn drains_in_order_and_chains_versions() {
    let server = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server).concurrency(4).build().await.unwrap();
    // Creates go out first; then an offline burst of updates made from
    // version 1 of each entity.
    for i in 0..10 {
        engine
            .enqueue(NewOp::create(
                "device",
                format!("d{i}"),
                json!({"on": false, "n": i}),
            ))
            .await
            .unwrap();
    }
    engine.drain_once().await.unwrap();
    for round in 1..=3 {
        for i in 0..10 {
            engine
                .enqueue(
                    NewOp::update(
                        "device",
                        format!("d{i}"),
                        json!({"on": round % 2 == 1, "n": i}),
                    )
                    .with_base_version(1),
                )
                .await
                .unwrap();
        }
    }
    // The three updates of one entity coalesce into one op that keeps the
    // earliest base version (If-Match 1, required by this server).
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 20, "{log:?}");
    for i in 0..10 {
        let (status, body) = get(&server, "device", &format!("d{i}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"], json!({"on": true, "n": i}));
        assert_eq!(body["version"], 2);
    }
    let stats = engine.outbox().stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.failed), (0, 0, 0));
}

#[tokio::test]
async fn chained_ops_of_one_entity_carry_the_previous_version() {
    let server = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("note", "n1", json!({"t": "a"})))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::update("note", "n1", json!({"t": "b"})))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::update("note", "n1", json!({"t": "c"})))
        .await
        .unwrap();
    engine.enqueue(NewOp::delete("note", "n1")).await.unwrap();
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    let ops: Vec<(MutationKind, u64)> = log.iter().map(|m| (m.op, m.version)).collect();
    assert_eq!(
        ops,
        vec![
            (MutationKind::Create, 1),
            (MutationKind::Update, 2),
            (MutationKind::Update, 3),
            (MutationKind::Delete, 4)
        ]
    );
}

async fn storm_honours_retry_after(form: RetryAfterForm) {
    let server = server(unavailable(Some(2), Some((2, form)))).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server).concurrency(1).build().await.unwrap();
    let mut events = engine.events();
    engine
        .enqueue(NewOp::create("device", "d1", json!({"on": true})))
        .await
        .unwrap();
    let started = Instant::now();
    drain(&engine).await;
    let elapsed = started.elapsed();
    let retried: Vec<_> = collect(&mut events)
        .into_iter()
        .filter(|e| matches!(e, SyncEvent::OpRetried { .. }))
        .collect();
    assert_eq!(retried.len(), 2, "{retried:?}");
    // Two waits of Retry-After: 2 s each (an HTTP-date has 1 s resolution,
    // so each wait is at least 1 s in that form).
    let floor = match form {
        RetryAfterForm::Seconds => Duration::from_secs(4),
        RetryAfterForm::HttpDate => Duration::from_secs(2),
    };
    assert!(elapsed >= floor, "sent before Retry-After: {elapsed:?}");
    let log = server.applied_log().await.unwrap();
    assert_eq!(log.len(), 1);
}

#[tokio::test]
async fn retry_after_seconds_is_honoured() {
    storm_honours_retry_after(RetryAfterForm::Seconds).await;
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    storm_honours_retry_after(RetryAfterForm::HttpDate).await;
}

#[tokio::test]
async fn breaker_opens_cools_down_half_opens_and_closes() {
    let server = server(Faults {
        fail_next: 3,
        failure_statuses: vec![502],
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .concurrency(1)
        .breaker(BreakerConfig {
            policy: TripPolicy::Count { failures: 3 },
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(300),
            ..BreakerConfig::default()
        })
        .build()
        .await
        .unwrap();
    let mut events = engine.events();
    enqueue_devices(&engine, 5).await;
    drain(&engine).await;
    let transitions: Vec<(String, String)> = collect(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            SyncEvent::Breaker { from, to } => Some((from.to_string(), to.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            ("closed".into(), "open".into()),
            ("open".into(), "half_open".into()),
            ("half_open".into(), "closed".into()),
        ]
    );
    assert_eq!(
        engine
            .metrics()
            .get(guardian_sync::telemetry::Counter::BreakerTrips),
        1
    );
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 5);
}

#[tokio::test]
async fn a_response_lost_after_commit_is_retried_with_the_same_key() {
    let server = server(Faults {
        drop_after_commit_next: 1,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let mut events = engine.events();
    let e = engine
        .enqueue(NewOp::create("device", "d1", json!({"on": true})))
        .await
        .unwrap();
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].idempotency_key, e.idempotency_key.to_string());
    let events = collect(&mut events);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SyncEvent::OpRetried { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SyncEvent::OpSucceeded { replayed: true, .. })),
        "{events:?}"
    );
}

/// A provider whose first token is stale; refresh yields `fresh`.
#[derive(Debug)]
struct Rotating {
    current: Mutex<String>,
    fresh: Mutex<String>,
    refreshes: AtomicUsize,
}

impl TokenProvider for Rotating {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(async move { Ok(self.current.lock().unwrap().clone()) })
    }
    fn refresh(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(async move {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
            let fresh = self.fresh.lock().unwrap().clone();
            *self.current.lock().unwrap() = fresh.clone();
            Ok(fresh)
        })
    }
}

#[tokio::test]
async fn a_401_refreshes_once_then_pauses_until_resumed() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = Arc::new(Rotating {
        current: Mutex::new("expired".into()),
        fresh: Mutex::new(TOKEN.into()),
        refreshes: AtomicUsize::new(0),
    });
    let engine = builder(&dir, &server)
        .token_provider(tokens.clone())
        .concurrency(8)
        .build()
        .await
        .unwrap();
    for i in 0..8 {
        engine
            .enqueue(NewOp::create("device", format!("d{i}"), json!({})))
            .await
            .unwrap();
    }
    drain(&engine).await;
    assert_eq!(server.applied_log().await.unwrap().len(), 8);
    // Concurrent 401s shared one refresh.
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), 1);

    // Now the refresh itself yields a bad token: the engine pauses.
    *tokens.current.lock().unwrap() = "revoked".into();
    *tokens.fresh.lock().unwrap() = "still-bad".into();
    let mut events = engine.events();
    engine
        .enqueue(NewOp::create("device", "late", json!({})))
        .await
        .unwrap();
    let report = engine.drain_once().await.unwrap();
    assert_eq!(report.succeeded, 0);
    assert!(collect(&mut events)
        .iter()
        .any(|e| matches!(e, SyncEvent::AuthRequired)));
    let stats = engine.outbox().stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.failed),
        (1, 0),
        "the op stays pending"
    );
    // The app fixes its token and resumes.
    *tokens.current.lock().unwrap() = TOKEN.into();
    engine.resume();
    drain(&engine).await;
    assert_eq!(server.applied_log().await.unwrap().len(), 9);
}

#[tokio::test]
async fn permanent_failures_are_kept_and_do_not_block_other_entities() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    // An update of an entity the server never had: 404, permanent.
    let bad = engine
        .enqueue(NewOp::update("device", "ghost", json!({"x": 1})))
        .await
        .unwrap();
    for i in 0..5 {
        engine
            .enqueue(NewOp::create("device", format!("ok{i}"), json!({})))
            .await
            .unwrap();
    }
    drain(&engine).await;
    assert_eq!(server.applied_log().await.unwrap().len(), 5);
    let failed = engine
        .outbox()
        .list(ListFilter {
            state: Some(OpState::Failed),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].op_id, bad.op_id);
    assert!(
        failed[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("404"),
        "{:?}",
        failed[0].last_error
    );
}

#[tokio::test]
async fn conflicts_merge_three_ways_under_local_wins() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    engine
        .enqueue(NewOp::create(
            "form",
            "f1",
            json!({"name": "a", "city": "x", "zip": "1"}),
        ))
        .await
        .unwrap();
    drain(&engine).await;
    // Another device edits city and zip on the server (version 2).
    other_writer_put(
        &server,
        "form/f1",
        "other-device-1",
        Some(1),
        json!({"name": "a", "city": "remote", "zip": "9"}),
    )
    .await;
    // This device edited name and zip offline from version 1.
    let mut events = engine.events();
    engine
        .enqueue(
            NewOp::update(
                "form",
                "f1",
                json!({"name": "local", "city": "x", "zip": "2"}),
            )
            .with_base(json!({"name": "a", "city": "x", "zip": "1"}), 1),
        )
        .await
        .unwrap();
    drain(&engine).await;
    let (_, body) = get(&server, "form", "f1").await;
    // name: local only; city: remote only; zip: both → local wins.
    assert_eq!(
        body["data"],
        json!({"name": "local", "city": "remote", "zip": "2"})
    );
    assert_eq!(body["version"], 3);
    assert!(collect(&mut events).iter().any(
        |e| matches!(e, SyncEvent::Conflict { resolution, .. } if resolution.to_string() == "retry")
    ));
    assert_log_clean(&server.applied_log().await.unwrap());
}

#[tokio::test]
async fn conflicts_follow_remote_wins_per_entity_type() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .reconcile(ReconcilePolicies::default().with("form", ConflictPolicy::RemoteWins))
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("form", "f1", json!({"a": 1, "b": 1})))
        .await
        .unwrap();
    drain(&engine).await;
    other_writer_put(
        &server,
        "form/f1",
        "other-device-2",
        None,
        json!({"a": 1, "b": 7}),
    )
    .await;
    engine
        .enqueue(
            NewOp::update("form", "f1", json!({"a": 2, "b": 3}))
                .with_base(json!({"a": 1, "b": 1}), 1),
        )
        .await
        .unwrap();
    drain(&engine).await;
    let (_, body) = get(&server, "form", "f1").await;
    // a: local only → merged; b: both → remote wins.
    assert_eq!(body["data"], json!({"a": 2, "b": 7}));
}

#[tokio::test]
async fn forced_conflicts_from_a_concurrent_writer_are_reconciled() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    engine
        .enqueue(NewOp::create("device", "d1", json!({"on": false})))
        .await
        .unwrap();
    drain(&engine).await;
    server
        .set_faults(Faults {
            conflict_next: 2,
            ..Faults::default()
        })
        .unwrap();
    engine
        .enqueue(
            NewOp::update("device", "d1", json!({"on": true})).with_base(json!({"on": false}), 1),
        )
        .await
        .unwrap();
    drain(&engine).await;
    let (_, body) = get(&server, "device", "d1").await;
    assert_eq!(body["data"]["on"], json!(true));
    assert!(
        engine
            .metrics()
            .get(guardian_sync::telemetry::Counter::ConflictsResolved)
            >= 1
    );
    assert_log_clean(&server.applied_log().await.unwrap());
}

/// Batching is on by default over HTTP, and `no_batching` sends one
/// request per op.
#[tokio::test]
async fn ready_ops_go_in_batches_by_default_and_one_by_one_without() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    enqueue_devices(&engine, 30).await;
    drain(&engine).await;
    assert_eq!(server.requests_on("/v1/batch"), 1);
    assert_eq!(server.requests_on("/v1/entities/{type}"), 0);

    let lone_dir = tempfile::tempdir().unwrap();
    let lone = builder(&lone_dir, &server)
        .no_batching()
        .build()
        .await
        .unwrap();
    for i in 30..40 {
        lone.enqueue(NewOp::create("device", format!("d{i}"), json!({"i": i})))
            .await
            .unwrap();
    }
    drain(&lone).await;
    assert_eq!(server.requests_on("/v1/batch"), 1);
    assert_eq!(server.requests_on("/v1/entities/{type}"), 10);
    assert_log_clean(&server.applied_log().await.unwrap());
}

/// A loopback proxy to `upstream` that answers 404 to `POST /v1/batch`, as
/// a backend without the batch route does; returns its URL and how many
/// batch requests reached it.
async fn proxy_without_batch_route(upstream: String) -> (String, Arc<AtomicUsize>) {
    use axum::body::{to_bytes, Body};
    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::response::Response;

    let batches = Arc::new(AtomicUsize::new(0));
    let seen = batches.clone();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (seen, client, upstream) = (seen.clone(), client.clone(), upstream.clone());
        async move {
            if req.uri().path() == "/v1/batch" {
                seen.fetch_add(1, Ordering::SeqCst);
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Body::empty())
                    .unwrap();
            }
            let (parts, body) = req.into_parts();
            let body = to_bytes(body, 1 << 20).await.unwrap();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forwarded = client.request(parts.method, format!("{upstream}{path}"));
            for (name, value) in &parts.headers {
                if name != axum::http::header::HOST {
                    forwarded = forwarded.header(name, value);
                }
            }
            let answer = forwarded.body(body).send().await.unwrap();
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if name != axum::http::header::TRANSFER_ENCODING {
                    response = response.header(name, value);
                }
            }
            response
                .body(Body::from(answer.bytes().await.unwrap()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, batches)
}

/// A backend without the batch route is asked once: the ops of that batch
/// and of every later one go op by op, and none fails.
#[tokio::test]
async fn a_backend_without_the_batch_route_is_asked_once() {
    let server = server(Faults::default()).await;
    let (url, batches) = proxy_without_batch_route(server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder_at(&dir, url).no_telemetry().build().await.unwrap();
    let mut events = engine.events();
    enqueue_devices(&engine, 20).await;
    drain(&engine).await;
    for i in 0..20 {
        engine
            .enqueue(NewOp::update(
                "device",
                format!("d{i}"),
                json!({"i": i, "again": true}),
            ))
            .await
            .unwrap();
    }
    drain(&engine).await;
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert!(!collect(&mut events)
        .iter()
        .any(|e| matches!(e, SyncEvent::OpFailed { .. })));
    assert_eq!(server.requests_on("/v1/batch"), 0);
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 40);
    let (_, body) = get(&server, "device", "d7").await;
    assert_eq!(body["data"], json!({"i": 7, "again": true}));
}

#[tokio::test]
async fn a_batch_with_one_bad_op_fails_it_alone() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .batching(BatchConfig {
            max_ops: 50,
            ..BatchConfig::default()
        })
        .build()
        .await
        .unwrap();
    enqueue_devices(&engine, 20).await;
    engine
        .enqueue(NewOp::update("device", "ghost", json!({})))
        .await
        .unwrap();
    let mut events = engine.events();
    drain(&engine).await;
    assert_eq!(server.applied_log().await.unwrap().len(), 20);
    let stats = engine.outbox().stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed), (0, 1));
    let failed = collect(&mut events)
        .into_iter()
        .filter(|e| matches!(e, SyncEvent::OpFailed { entity_id, .. } if entity_id == "ghost"))
        .count();
    assert_eq!(failed, 1);
    // All 21 went out in one batch request, and no single mutation was sent.
    assert_eq!(server.requests_on("/v1/batch"), 1);
    assert_eq!(server.requests_on("/v1/entities/{type}"), 0);
}

#[tokio::test]
async fn optimistic_updates_commit_roll_back_and_survive_restarts() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (ok_tx, err_tx) = (tx.clone(), tx.clone());
    engine.optimistic().register(
        "toggle-1",
        Registration::new(json!({"on": false}), || {})
            .on_success(move || ok_tx.send("committed".into()).unwrap()),
    );
    engine.optimistic().register(
        "edit-ghost",
        Registration::new(json!({}), move || tx.send("rolled back".into()).unwrap())
            .on_error(move |e| err_tx.send(format!("error {}", e.contains("404"))).unwrap()),
    );
    engine
        .enqueue(NewOp::create("device", "d1", json!({"on": true})).with_txn_token("toggle-1"))
        .await
        .unwrap();
    engine
        .enqueue(NewOp::update("device", "ghost", json!({})).with_txn_token("edit-ghost"))
        .await
        .unwrap();
    drain(&engine).await;
    let mut got: Vec<String> = (0..3)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    got.sort();
    assert_eq!(got, vec!["committed", "error true", "rolled back"]);
    drop(engine);

    // A token settled by a process that died before telling the app: the
    // next engine publishes it, and outcome() answers.
    let dir2 = tempfile::tempdir().unwrap();
    let path = dir2.path().join("outbox.db");
    {
        let e1 = builder(&dir2, &server).build().await.unwrap();
        e1.enqueue(NewOp::create("device", "d2", json!({})).with_txn_token("t-restart"))
            .await
            .unwrap();
        drain(&e1).await;
    }
    let (outbox, _) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
    assert_eq!(
        outbox.txn_outcome("t-restart").await.unwrap(),
        Some(TxnOutcome::Succeeded)
    );
    assert_eq!(outbox.txn_outcome("never-seen").await.unwrap(), None);
}

#[tokio::test]
async fn the_stall_watchdog_fires_when_nothing_progresses() {
    // Every request fails with a Retry-After far beyond the stall time; the
    // breaker never opens (threshold high), so the queue is stuck.
    let server = server(unavailable(None, Some((3600, RetryAfterForm::Seconds)))).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .breaker(BreakerConfig {
            policy: TripPolicy::Count { failures: 1000 },
            ..BreakerConfig::default()
        })
        .lock(
            guardian_sync::lock::LockConfig::new(Duration::from_millis(50), Duration::from_secs(5))
                .unwrap(),
        )
        .stall_after(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("device", "d1", json!({})))
        .await
        .unwrap();
    let mut events = engine.events();
    let stalled = async {
        loop {
            if let Ok(SyncEvent::Stalled { pending, .. }) = events.recv().await {
                return pending;
            }
        }
    };
    let pending = tokio::select! {
        p = tokio::time::timeout(Duration::from_secs(20), stalled) => p.expect("no stall event"),
        r = engine.run(std::future::pending()) => panic!("run ended: {r:?}"),
    };
    assert_eq!(pending, 1);
    assert_eq!(
        engine
            .metrics()
            .get(guardian_sync::telemetry::Counter::Stalls),
        1
    );
}

#[tokio::test]
async fn outcomes_settled_by_a_dead_process_are_published_after_restart() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    {
        // A runner acks an op carrying a token, then dies before telling the app.
        let (outbox, _) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
        let e = outbox
            .enqueue(NewOp::create("device", "d1", json!({})).with_txn_token("tok-1"))
            .await
            .unwrap();
        // It holds the lock as a runner does (row and OS lock file); its
        // handle is dropped without a release, as its process would die.
        let mut lock = guardian_sync::lock::ProcessingLock::new(
            outbox.clone(),
            "dead-runner",
            guardian_sync::lock::LockConfig::default(),
            guardian_sync::clock::SystemClock::shared(),
        );
        let guardian_sync::lock::Acquired::Yes { fence, .. } = lock.try_acquire().await.unwrap()
        else {
            panic!("the lock was free");
        };
        drop(lock);
        outbox
            .fenced(&fence)
            .claim_ready(1, i64::MAX)
            .await
            .unwrap();
        outbox
            .fenced(&fence)
            .ack(e.op_id, Default::default())
            .await
            .unwrap();
        outbox.close().await;
    }
    let engine = engine(&dir, &server).await;
    let (tx, rx) = std::sync::mpsc::channel();
    engine.optimistic().register(
        "tok-1",
        Registration::new(json!(null), || {}).on_success(move || tx.send(()).unwrap()),
    );
    let mut events = engine.events();
    engine.drain_once().await.unwrap();
    assert!(collect(&mut events).iter().any(
        |e| matches!(e, SyncEvent::TxnSettled { token, succeeded: true, .. } if token == "tok-1")
    ));
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Delivered once: a second drain publishes nothing more.
    engine.drain_once().await.unwrap();
    assert!(!collect(&mut events)
        .iter()
        .any(|e| matches!(e, SyncEvent::TxnSettled { .. })));
}

#[tokio::test]
async fn a_wall_clock_step_back_keeps_backoffs_their_length() {
    let server = server(unavailable(Some(1), Some((1, RetryAfterForm::Seconds)))).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = guardian_sync::clock::ManualClock::new(1_795_000_000_000);
    let engine = builder(&dir, &server)
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("device", "d1", json!({})))
        .await
        .unwrap();
    let first = engine.drain_once().await.unwrap();
    assert_eq!(first.retried, 1);
    // The wall clock steps back two hours; 1.5 s of real (monotonic) time pass.
    clock.jump_wall(-7_200_000);
    clock.advance(Duration::from_millis(1_500));
    let second = engine.drain_once().await.unwrap();
    assert_eq!(second.succeeded, 1, "the op was stranded by the clock step");
    assert_eq!(server.applied_log().await.unwrap().len(), 1);
}

/// Waits (bounded) until the server applied `n` mutations.
async fn wait_applied(server: &RunningServer, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = server.applied_log().await.unwrap().len();
        if got >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {got} of {n} applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 15 point 9: ops written while the wall clock was 2 h ahead (by an
/// enqueuer, or by a runner that scheduled a retry) are not parked for 2 h
/// once it is back: a one-pass drain sends the never-attempted ones at once,
/// and a retry waits its own delay (its Retry-After), not the step.
#[tokio::test]
async fn ops_written_under_a_clock_two_hours_ahead_are_not_parked() {
    let server = server(unavailable(Some(1), Some((1, RetryAfterForm::Seconds)))).await;
    let dir = tempfile::tempdir().unwrap();
    let t = 1_795_000_000_000;
    let ahead = guardian_sync::clock::ManualClock::new(t + 7_200_000);
    {
        let runner = builder(&dir, &server)
            .clock(ahead.clone())
            .build()
            .await
            .unwrap();
        runner
            .enqueue(NewOp::create("device", "retried", json!({})))
            .await
            .unwrap();
        // 503 with Retry-After: 1 s, scheduled on the clock ahead.
        assert_eq!(runner.drain_once().await.unwrap().retried, 1);
        enqueue_devices(&runner, 3).await;
        runner.outbox().close().await;
    }
    let clock = guardian_sync::clock::ManualClock::new(t);
    let engine = builder(&dir, &server)
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let first = engine.drain_once().await.unwrap();
    let queue = engine.outbox().list(ListFilter::default()).await.unwrap();
    assert_eq!(
        first.succeeded, 3,
        "never-attempted ops were parked by the clock step: {queue:?}"
    );
    let retried = &queue[0];
    assert_eq!(retried.entity_id, "retried");
    assert_eq!(
        retried.next_attempt_at,
        t + 1_000,
        "the retry waits its Retry-After from now"
    );
    clock.advance(Duration::from_millis(1_000));
    assert_eq!(engine.drain_once().await.unwrap().succeeded, 1);
    assert_eq!(server.applied_log().await.unwrap().len(), 4);
}

/// Issue 15 point 9, live runner: ops another process enqueued under a wall
/// clock 2 h ahead are sent within a heartbeat, not 2 h later.
#[tokio::test]
async fn a_live_runner_sends_ops_enqueued_under_a_clock_ahead() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let t = 1_795_000_000_000;
    let clock = guardian_sync::clock::ManualClock::new(t);
    let engine = builder(&dir, &server)
        .clock(clock.clone())
        .lock(
            guardian_sync::lock::LockConfig::new(
                Duration::from_millis(50),
                Duration::from_secs(60),
            )
            .unwrap(),
        )
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("device", "first", json!({})))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    wait_applied(&server, 1, "the runner did not start").await;
    let ahead = guardian_sync::clock::ManualClock::new(t + 7_200_000);
    let (other, _) = Outbox::open(
        dir.path().join("outbox.db"),
        OutboxOptions::default().clock(ahead),
    )
    .await
    .unwrap();
    for i in 0..3 {
        other
            .enqueue(NewOp::create("device", format!("ahead{i}"), json!({})))
            .await
            .unwrap();
    }
    // A heartbeat interval passes on the runner's clock.
    clock.advance(Duration::from_millis(100));
    wait_applied(&server, 4, "ops enqueued under a clock ahead were parked").await;
    stop.send(()).unwrap();
    runner.await.unwrap().unwrap();
    other.close().await;
}

#[tokio::test]
async fn a_chained_update_after_a_merged_conflict_keeps_remote_fields() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    engine
        .enqueue(NewOp::create("board", "b1", json!({"a": 0, "b": 0})))
        .await
        .unwrap();
    drain(&engine).await;
    // Another writer sets b = 1 (version 2).
    other_writer_put(
        &server,
        "board/b1",
        "other-writer",
        None,
        json!({"a": 0, "b": 1}),
    )
    .await;
    // Offline, this device sets a = 1 then a = 2 (from version 1); the first
    // send fails so the two edits stay separate ops, chained.
    let first = engine
        .enqueue(
            NewOp::update("board", "b1", json!({"a": 1, "b": 0}))
                .with_base(json!({"a": 0, "b": 0}), 1),
        )
        .await
        .unwrap();
    server
        .set_faults(unavailable(Some(1), Some((1, RetryAfterForm::Seconds))))
        .unwrap();
    assert_eq!(engine.drain_once().await.unwrap().retried, 1);
    let second = engine
        .enqueue(NewOp::update("board", "b1", json!({"a": 2, "b": 0})))
        .await
        .unwrap();
    assert!(second.coalesced.is_none());
    assert_ne!(first.op_id, second.op_id);
    assert!(
        engine
            .outbox()
            .get(second.op_id)
            .await
            .unwrap()
            .unwrap()
            .chained
    );
    drain(&engine).await;
    let (_, body) = get(&server, "board", "b1").await;
    assert_eq!(
        body["data"],
        json!({"a": 2, "b": 1}),
        "the other writer's b = 1 was overwritten"
    );
}

#[tokio::test]
async fn a_422_rolls_the_optimistic_update_back() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let e = engine
        .enqueue(NewOp::create("device", "d1", json!({"on": true})).with_txn_token("t422"))
        .await
        .unwrap();
    // Someone used this op's idempotency key for another body: the server
    // answers the op with 422 idempotency:mismatch, a permanent failure.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/entities/device", server.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", e.idempotency_key.to_string())
        .json(&json!({"id": "other", "data": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    engine.optimistic().register(
        "t422",
        Registration::new(json!({"on": false}), move || {
            tx.send("rollback".into()).unwrap();
        })
        .on_error(move |err| tx2.send(format!("error: {}", err.contains("422"))).unwrap()),
    );
    drain(&engine).await;
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "rollback");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "error: true"
    );
    assert_eq!(
        engine.outbox().txn_outcome("t422").await.unwrap(),
        Some(TxnOutcome::Failed {
            error: engine
                .outbox()
                .get(e.op_id)
                .await
                .unwrap()
                .unwrap()
                .last_error
                .unwrap()
        })
    );
}

/// The engine claims ahead of its sends; when the breaker opens, the ops it
/// claimed but never sent go back to the queue as never attempted (still
/// coalescable and cancellable), and the attempts stored equal the requests
/// actually sent.
#[tokio::test]
async fn ops_claimed_ahead_are_released_unattempted_when_the_breaker_opens() {
    let server = server(unavailable(None, None)).await;
    let dir = tempfile::tempdir().unwrap();
    // One request per op: a batch of all 40 would fail as one request.
    let engine = builder(&dir, &server)
        .no_batching()
        .concurrency(4)
        .breaker(BreakerConfig {
            policy: TripPolicy::Count { failures: 4 },
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(600),
            ..BreakerConfig::default()
        })
        .build()
        .await
        .unwrap();
    let mut events = engine.events();
    enqueue_devices(&engine, 40).await;
    engine.drain_once().await.unwrap();
    let retried = collect(&mut events)
        .into_iter()
        .filter(|e| matches!(e, SyncEvent::OpRetried { .. }))
        .count();
    let ops = engine
        .outbox()
        .list(ListFilter {
            state: None,
            limit: 100,
            after_seq: 0,
        })
        .await
        .unwrap();
    assert_eq!(ops.len(), 40);
    assert!(ops.iter().all(|op| op.state == OpState::Pending), "{ops:?}");
    let attempts: u32 = ops.iter().map(|op| op.attempts).sum();
    // Every failure was a real request; the breaker stopped the rest.
    assert_eq!(attempts as usize, retried);
    assert!(
        (4..40).contains(&retried),
        "breaker should stop sending after 4 failures, {retried} sent"
    );
    // A released op is never attempted again: it can still be cancelled.
    let unsent = ops.iter().find(|op| op.attempts == 0).unwrap();
    engine.outbox().cancel(unsent.op_id).await.unwrap();
    assert!(server.applied_log().await.unwrap().is_empty());
}

/// Batched drain of chains: each batch's successes are recorded together,
/// and every entity's next op is sent with `If-Match` of the version its
/// predecessor got (the server requires it), in order, with no conflict.
#[tokio::test]
async fn batches_record_successes_together_and_chain_versions() {
    let server = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .concurrency(4)
        .batching(BatchConfig {
            max_ops: 7,
            ..BatchConfig::default()
        })
        .build()
        .await
        .unwrap();
    for i in 0..30 {
        engine
            .enqueue(NewOp::create("device", format!("d{i}"), json!({"n": 0})))
            .await
            .unwrap();
        for n in 1..=3 {
            engine
                .enqueue(NewOp::update("device", format!("d{i}"), json!({"n": n})))
                .await
                .unwrap();
        }
    }
    drain(&engine).await;
    let report = engine.run_until_empty().await.unwrap();
    assert_eq!(report.drain.sent, 0);
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 120, "{log:?}");
    for i in 0..30 {
        let (status, body) = get(&server, "device", &format!("d{i}")).await;
        assert_eq!(status, 200);
        assert_eq!(
            (body["data"]["n"].clone(), body["version"].clone()),
            (json!(3), json!(4))
        );
    }
    assert_eq!(
        engine
            .metrics()
            .get(guardian_sync::telemetry::Counter::ConflictsResolved),
        0
    );
}

/// Enqueues, with coalescing off, a CREATE `{"n": 0}` then UPDATEs
/// `{"n": 1..=updates}` of each device `d0..d{devices}`: chains of one entity.
async fn enqueue_chains(engine: &SyncEngine, devices: usize, updates: u64) {
    for i in 0..devices {
        engine
            .enqueue(NewOp::create("device", format!("d{i}"), json!({"n": 0})))
            .await
            .unwrap();
        for n in 1..=updates {
            engine
                .enqueue(NewOp::update("device", format!("d{i}"), json!({"n": n})))
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn an_entitys_consecutive_ops_travel_in_one_batch() {
    let server = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .batching(BatchConfig::default())
        .build()
        .await
        .unwrap();
    enqueue_chains(&engine, 10, 9).await;
    drain(&engine).await;
    // 100 ops of 10 entities, each chained on the version of the one before
    // (the server requires If-Match): one request.
    assert_eq!(server.requests_on("/v1/batch"), 1);
    assert_eq!(server.requests_on("/v1/entities/{type}"), 0);
    assert_eq!(server.requests_on("/v1/entities/{type}/{id}"), 0);
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 100);
    for i in 0..10 {
        let (_, body) = get(&server, "device", &format!("d{i}")).await;
        assert_eq!(
            (&body["data"], &body["version"]),
            (&json!({"n": 9}), &json!(10))
        );
    }
}

#[tokio::test]
async fn a_conflict_in_a_batch_holds_its_entitys_next_ops_back_and_merges() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .batching(BatchConfig::default())
        .build()
        .await
        .unwrap();
    engine
        .enqueue(NewOp::create("board", "b1", json!({"a": 0, "b": 0})))
        .await
        .unwrap();
    drain(&engine).await;
    // Another writer sets b = 1 (version 2) while this device, from
    // version 1, sets a = 1 then a = 2 (the second chained on the first).
    other_writer_put(
        &server,
        "board/b1",
        "other-writer",
        None,
        json!({"a": 0, "b": 1}),
    )
    .await;
    engine
        .enqueue(
            NewOp::update("board", "b1", json!({"a": 1, "b": 0}))
                .with_base(json!({"a": 0, "b": 0}), 1),
        )
        .await
        .unwrap();
    let second = engine
        .enqueue(NewOp::update("board", "b1", json!({"a": 2, "b": 0})))
        .await
        .unwrap();
    enqueue_devices(&engine, 3).await;
    let report = engine.run_until_empty().await.unwrap();
    // The first batch carried both edits; the first conflicted, so the
    // second was not applied and waited; it never counted as an attempt.
    assert_eq!(report.drain.deferred, 1, "{report:?}");
    assert_eq!(report.drain.failed, 0, "{report:?}");
    // The first edit merged with b = 1; the second, made from the app's
    // view, then went into its own 3-way merge instead of overwriting b.
    assert_eq!(report.drain.conflicts_resolved, 2, "{report:?}");
    assert_log_clean(&server.applied_log().await.unwrap());
    assert!(engine.outbox().get(second.op_id).await.unwrap().is_none());
    let (_, body) = get(&server, "board", "b1").await;
    assert_eq!(
        body["data"],
        json!({"a": 2, "b": 1}),
        "the other writer's b = 1 was overwritten"
    );
    for i in 0..3 {
        assert_eq!(get(&server, "device", &format!("d{i}")).await.0, 200);
    }
}

#[tokio::test]
async fn a_lost_response_to_a_batch_of_chains_replays_every_op_once() {
    let server = ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .require_if_match(true)
        .faults(Faults {
            drop_after_commit_next: 1,
            ..Faults::default()
        })
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .batching(BatchConfig::default())
        .build()
        .await
        .unwrap();
    let mut events = engine.events();
    enqueue_chains(&engine, 5, 3).await;
    // One lost response is one failure for the breaker, not twenty (the
    // default opens at ten, and its minute of cooldown would outlast `drain`).
    drain(&engine).await;
    assert_eq!(engine.breaker_state(), "closed");
    // The batch was applied but its response lost; every op was sent again
    // with its key (in whatever batch shape its retry fell into) and replayed.
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 20, "{log:?}");
    let replayed = collect(&mut events)
        .iter()
        .filter(|e| matches!(e, SyncEvent::OpSucceeded { replayed: true, .. }))
        .count();
    assert_eq!(replayed, 20);
    for i in 0..5 {
        let (_, body) = get(&server, "device", &format!("d{i}")).await;
        assert_eq!(
            (&body["data"], &body["version"]),
            (&json!({"n": 3}), &json!(4))
        );
    }
}

#[tokio::test]
async fn a_chain_longer_than_a_batch_continues_in_the_next() {
    let server = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir, &server)
        .outbox_options(OutboxOptions::default().coalesce(false))
        .batching(BatchConfig {
            max_ops: 4,
            ..BatchConfig::default()
        })
        .build()
        .await
        .unwrap();
    enqueue_chains(&engine, 1, 9).await;
    drain(&engine).await;
    // 4 + 4 + 2: each batch's last ack hands the head to the next op.
    assert_eq!(server.requests_on("/v1/batch"), 3);
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(log.len(), 10);
    let (_, body) = get(&server, "device", "d0").await;
    assert_eq!(
        (&body["data"], &body["version"]),
        (&json!({"n": 9}), &json!(10))
    );
}

/// A running engine drains what a plain thread (an FFI binding's) enqueues
/// with `enqueue_blocking`: each enqueue wakes the run loop, every op is
/// applied once, in order per entity, and counted as enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_engine_drains_blocking_enqueues_from_a_thread() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server).await;
    let mut events = engine.events();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    let app = engine.clone();
    let thread = std::thread::spawn(move || {
        for i in 0..20 {
            app.enqueue_blocking(NewOp::create("device", format!("b{i}"), json!({"i": i})))
                .unwrap();
        }
    });
    let applied = async {
        let mut n = 0;
        while n < 20 {
            if let Ok(SyncEvent::OpSucceeded { .. }) = events.recv().await {
                n += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), applied)
        .await
        .expect("the running engine did not drain the blocking enqueues");
    thread.join().unwrap();
    let _ = stop.send(());
    runner.await.unwrap().unwrap();
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    assert_eq!(
        engine
            .metrics()
            .get(guardian_sync::telemetry::Counter::Enqueued),
        20
    );
    assert_eq!(log.len(), 20);
    for i in 0..20 {
        let (status, body) = get(&server, "device", &format!("b{i}")).await;
        assert_eq!((status, &body["data"]), (200, &json!({"i": i})));
    }
}

/// The HTTP transport, but its `panic_at`-th send panics.
#[derive(Debug)]
struct PanicsAt {
    inner: guardian_sync::transport::HttpTransport,
    sends: AtomicUsize,
    panic_at: usize,
}

impl guardian_sync::transport::Transport for PanicsAt {
    fn send<'a>(
        &'a self,
        op: &'a guardian_sync::transport::OpRequest,
    ) -> BoxFuture<'a, guardian_sync::transport::Outcome> {
        Box::pin(async move {
            if self.sends.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_at {
                panic!("the app's transport failed an assertion");
            }
            self.inner.send(op).await
        })
    }
    fn fetch<'a>(
        &'a self,
        ty: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<guardian_sync::transport::Fetched, guardian_sync::transport::Outcome>>
    {
        self.inner.fetch(ty, id)
    }
}

/// A transport that panics with several requests in flight: the drain
/// passes the panic on to its caller instead of waiting for an answer
/// that will never come, and a later drain sends every op once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_panic_with_requests_in_flight_ends_the_drain() {
    use futures::FutureExt as _;

    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(PanicsAt {
        inner: guardian_sync::transport::HttpTransport::new(
            &guardian_sync::transport::HttpTransportConfig::new(server.url()),
            Arc::new(StaticToken::new(TOKEN)),
        )
        .unwrap(),
        sends: AtomicUsize::new(0),
        panic_at: 5,
    });
    let panicking = SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .transport(transport)
        .retry(fast_retry())
        .concurrency(4)
        .build()
        .await
        .unwrap();
    enqueue_devices(&panicking, 20).await;
    let run = std::panic::AssertUnwindSafe(panicking.run_until_empty()).catch_unwind();
    let ended = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the drain waited for a request whose transport panicked");
    assert!(ended.is_err(), "the transport's panic reaches the caller");
    drop(panicking);

    let engine = engine(&dir, &server).await;
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    assert_log_clean(&log);
    let ids: std::collections::HashSet<&str> = log.iter().map(|m| m.id.as_str()).collect();
    assert_eq!((log.len(), ids.len()), (20, 20), "every op applied once");
}
