//! Realtime dropped repeatedly while changes flow (issue 7): a `gsync run`
//! child drains a workload into the server while the server closes every
//! WebSocket session again and again; the app-side `RealtimeService` must
//! deliver every change of the feed exactly once, in cursor order (none
//! missed across WebSocket ↔ polling switches, none twice), and the drain
//! itself must satisfy the invariants of DESIGN §11.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_invariants, seed, server, Runner, RunnerOpts, Workload, TENANT, TOKEN};
use futures::StreamExt;
use guardian_server::Faults;
use guardian_sync::realtime::{RealtimeConfig, RealtimeMessage, RealtimeService, StartFrom};
use guardian_sync::transport::StaticToken;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_dropped_repeatedly_misses_nothing_and_repeats_nothing() {
    let seed = seed("realtime_drops");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = server(Faults {
        latency_ms: 5,
        ..Faults::default()
    })
    .await;
    let mut config = RealtimeConfig::new(server.url(), Arc::new(StaticToken::new(TOKEN)));
    config.first_reconnect_delay = Duration::from_millis(20);
    config.reconnect_cap = Duration::from_millis(100);
    config.max_reconnect_attempts = 50;
    config.probe_interval = Duration::from_millis(200);
    config.ping_interval = Duration::from_millis(200);
    config.pong_deadline = Duration::from_millis(500);
    config.poll_interval = Duration::from_millis(50);
    config.page_size = 7;
    config.start_from = StartFrom::After(0);
    let service = RealtimeService::start(config).await.unwrap();
    let mut messages = service.messages().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut work = Workload::open(&path, "rt").await;
    work.random_ops(&mut rng, 80).await;
    let mut runner = Runner::spawn("rt", &path, &server.url(), &RunnerOpts::default());

    let mut cursors: Vec<u64> = Vec::new();
    let mut drops = 0;
    let mut next_drop = rng.random_range(1..6);
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected = work.ops.len();
    while cursors.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, messages.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {expected} changes arrived: {cursors:?}",
                    cursors.len()
                )
            })
            .expect("the realtime stream ended");
        match msg {
            RealtimeMessage::Change { change } => cursors.push(change.cursor),
            other => panic!("unexpected message {other:?}"),
        }
        if cursors.len() == next_drop {
            server.disconnect_realtime();
            drops += 1;
            next_drop += rng.random_range(1..6);
        }
    }
    runner.expect_success(Duration::from_secs(60)).await;
    check_invariants(&server, &work).await;
    // Exactly the feed: every applied mutation's cursor once, in order.
    let feed: Vec<u64> = server
        .applied_log()
        .await
        .unwrap()
        .iter()
        .filter(|m| m.tenant == TENANT)
        .map(|m| m.cursor)
        .collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "changes out of order or repeated: {cursors:?}"
    );
    assert_eq!(cursors, feed, "delivered changes differ from the feed");
    // Nothing more (no late duplicate) arrives.
    server.disconnect_realtime();
    let extra = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
    assert!(extra.is_err(), "a change was delivered twice: {extra:?}");
    eprintln!(
        "realtime: {} changes delivered once each across {drops} forced disconnects",
        cursors.len()
    );
    service.shutdown().await;
}
