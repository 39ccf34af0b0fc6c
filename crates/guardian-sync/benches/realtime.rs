//! Realtime delivery: latency (mutation sent → change received) over the
//! WebSocket vs polling, and what an idle hour costs in requests and bytes.
//!
//! Not a criterion bench: the quantities are network latencies and counts
//! over wall time. Run with `cargo bench -p guardian-sync --bench realtime`;
//! it prints a Markdown report. `RT_POLL_DEFAULT_SAMPLES` (default 6) sets
//! how many samples are taken at the default 30 s poll interval (each costs
//! ~30 s of wall time); 0 skips them.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::realtime::{
    ConnectionState, RealtimeConfig, RealtimeMessage, RealtimeMessages, RealtimeService, StartFrom,
};
use guardian_sync::transport::StaticToken;
use rand::Rng;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "tok-bench";

async fn server() -> RunningServer {
    ServerBuilder::new()
        .token("bench", TOKEN)
        .in_memory()
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

/// A port nothing listens on: the WebSocket is refused, the service polls.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Counts bytes both ways through a TCP proxy.
struct Counting {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
}

async fn counting_proxy(upstream: SocketAddr) -> Counting {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes = Arc::new(AtomicU64::new(0));
    let total = Arc::clone(&bytes);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let total = Arc::clone(&total);
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = outbound.into_split();
                let t1 = Arc::clone(&total);
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = ir.read(&mut buf).await {
                        if n == 0 || ow.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        t1.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = or.read(&mut buf).await {
                    if n == 0 || iw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
                up.abort();
            });
        }
    });
    Counting { addr, bytes }
}

async fn create(http: &reqwest::Client, url: &str, i: u64) -> Duration {
    let t = Instant::now();
    let resp = http
        .post(format!("{url}/v1/entities/note"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&json!({"id": format!("n{i}"), "data": {"i": i}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    t.elapsed()
}

async fn next(messages: &mut RealtimeMessages) -> RealtimeMessage {
    tokio::time::timeout(Duration::from_secs(120), messages.next())
        .await
        .unwrap()
        .unwrap()
}

async fn wait_state(service: &RealtimeService, want: ConnectionState) {
    let mut rx = service.state_receiver();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| *s == want))
        .await
        .unwrap()
        .unwrap();
}

#[derive(Debug)]
struct Stats {
    n: usize,
    mean: Duration,
    p50: Duration,
    p95: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    let at = |q: f64| v[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
    Stats {
        n,
        mean: v.iter().sum::<Duration>() / u32::try_from(n).unwrap(),
        p50: at(0.5),
        p95: at(0.95),
        max: v[n - 1],
    }
}

fn row(name: &str, s: &Stats) -> String {
    format!(
        "| {name} | {} | {:.2?} | {:.2?} | {:.2?} | {:.2?} |",
        s.n, s.mean, s.p50, s.p95, s.max
    )
}

/// Latency samples: the mutation is sent at a random phase of the poll
/// interval (`jitter` up to that long before each), then the change is awaited.
async fn latency(
    server: &RunningServer,
    messages: &mut RealtimeMessages,
    samples: usize,
    first_id: u64,
    jitter: Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    let http = reqwest::Client::new();
    let mut lat = Vec::new();
    let mut rtt = Vec::new();
    for k in 0..samples {
        if !jitter.is_zero() {
            let wait = rand::rng().random_range(Duration::ZERO..jitter);
            tokio::time::sleep(wait).await;
        }
        let t = Instant::now();
        rtt.push(create(&http, &server.url(), first_id + k as u64).await);
        let m = next(messages).await;
        lat.push(t.elapsed());
        assert!(matches!(m, RealtimeMessage::Change { .. }));
    }
    (lat, rtt)
}

fn ws_config(server: &RunningServer) -> RealtimeConfig {
    let mut c = RealtimeConfig::new(server.url(), Arc::new(StaticToken::new(TOKEN)));
    c.start_from = StartFrom::After(0);
    c
}

fn polling_config(server: &RunningServer, dead: SocketAddr, poll: Duration) -> RealtimeConfig {
    let mut c = ws_config(server);
    c.realtime_url = Some(format!("ws://{dead}/v1/realtime"));
    c.poll_interval = poll;
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("realtime bench: skipped (run with cargo bench)");
        return;
    }
    let default_samples: usize = std::env::var("RT_POLL_DEFAULT_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let defaults = RealtimeConfig::new("http://x", Arc::new(StaticToken::new("x")));
    let mut out = Vec::new();
    out.push("## Realtime delivery latency (mutation sent → change received)\n".to_owned());
    out.push(
        "Loopback, reference server in process (in-memory SQLite), optimized bench profile, 2 cores shared with other builds. \
         Latency is measured from just before the mutation's POST is sent to the change's arrival on the \
         stream, so it includes the POST round trip (its median is listed).\n"
            .to_owned(),
    );
    out.push("| path | samples | mean | p50 | p95 | max |\n|---|---|---|---|---|---|".to_owned());

    // WebSocket.
    {
        let server = server().await;
        let service = RealtimeService::start(ws_config(&server)).await.unwrap();
        let mut messages = service.messages().unwrap();
        wait_state(&service, ConnectionState::Connected).await;
        let (lat, rtt) = latency(&server, &mut messages, 500, 1, Duration::ZERO).await;
        out.push(row("WebSocket (defaults)", &stats(lat)));
        out.push(row("  (POST round trip alone)", &stats(rtt)));
        service.shutdown().await;
    }
    // Polling, short interval (shape of the distribution), then the default.
    for (poll, samples) in [
        (Duration::from_secs(1), 40),
        (defaults.poll_interval, default_samples),
    ] {
        if samples == 0 {
            continue;
        }
        let server = server().await;
        let dead = dead_port().await;
        let service = RealtimeService::start(polling_config(&server, dead, poll))
            .await
            .unwrap();
        let mut messages = service.messages().unwrap();
        wait_state(&service, ConnectionState::Polling).await;
        let (lat, _) = latency(&server, &mut messages, samples, 1, poll).await;
        out.push(row(&format!("polling every {poll:?}"), &stats(lat)));
        service.shutdown().await;
    }
    out.push(format!(
        "\nExpected for polling: the change waits for the next poll, uniform in [0, interval], so the mean is \
         interval/2 + one request (15 s at the default {:?}).\n",
        defaults.poll_interval
    ));

    // Idle cost, measured at scaled-down intervals, extrapolated to the defaults.
    let scaled = Duration::from_millis(250);
    let window = Duration::from_secs(10);
    out.push("## Idle hour: requests and bytes\n".to_owned());
    out.push(format!(
        "Measured over a {window:?} idle window with ping and poll intervals scaled to {scaled:?} \
         (HTTP requests counted by the server's own request metrics, bytes both ways counted by a TCP proxy \
         in front of the server), then scaled to an hour at the default intervals \
         (ping {:?}, poll {:?}). The server's own WebSocket pings (every 15 s by default) are included \
         in the WebSocket bytes.\n",
        defaults.ping_interval, defaults.poll_interval
    ));
    out.push(
        "| mode | HTTP requests in window | bytes in window | events expected from config | HTTP requests / idle hour at defaults | bytes / idle hour at defaults |\n|---|---|---|---|---|---|"
            .to_owned(),
    );
    let per_hour = |count: u64, interval: Duration| {
        // count events in `window` at `scaled`; at the default interval the
        // same events happen (scaled / interval) as often.
        count as f64
            * (3600.0 / window.as_secs_f64())
            * (scaled.as_secs_f64() / interval.as_secs_f64())
    };
    {
        let server = server().await;
        let proxy = counting_proxy(server.addr()).await;
        let mut c = ws_config(&server);
        c.base_url = format!("http://{}", proxy.addr);
        c.ping_interval = scaled;
        let service = RealtimeService::start(c).await.unwrap();
        wait_state(&service, ConnectionState::Connected).await;
        let (r0, b0) = (
            server.requests_on("/v1/realtime") + server.requests_on("/v1/changes"),
            proxy.bytes.load(Ordering::Relaxed),
        );
        tokio::time::sleep(window).await;
        let reqs = server.requests_on("/v1/realtime") + server.requests_on("/v1/changes") - r0;
        let bytes = proxy.bytes.load(Ordering::Relaxed) - b0;
        let pings = window.as_secs_f64() / scaled.as_secs_f64();
        out.push(format!(
            "| WebSocket | {reqs} | {bytes} | {pings:.0} client pings + pongs | {:.0} (reconnects only) | {:.0} |",
            per_hour(reqs, defaults.ping_interval),
            per_hour(bytes, defaults.ping_interval)
        ));
        service.shutdown().await;
    }
    {
        let server = server().await;
        let proxy = counting_proxy(server.addr()).await;
        let dead = dead_port().await;
        let mut c = polling_config(&server, dead, scaled);
        c.base_url = format!("http://{}", proxy.addr);
        c.probe_interval = Duration::from_secs(3600);
        let service = RealtimeService::start(c).await.unwrap();
        wait_state(&service, ConnectionState::Polling).await;
        let (r0, b0) = (
            server.requests_on("/v1/changes"),
            proxy.bytes.load(Ordering::Relaxed),
        );
        tokio::time::sleep(window).await;
        let reqs = server.requests_on("/v1/changes") - r0;
        let bytes = proxy.bytes.load(Ordering::Relaxed) - b0;
        let polls = window.as_secs_f64() / scaled.as_secs_f64();
        out.push(format!(
            "| polling | {reqs} | {bytes} | {polls:.0} polls | {:.0} | {:.0} |",
            per_hour(reqs, defaults.poll_interval),
            per_hour(bytes, defaults.poll_interval)
        ));
        service.shutdown().await;
    }
    out.push(format!(
        "\nFrom the configuration alone: polling every {:?} is {} requests per idle hour; the WebSocket makes \
         one upgrade per connection and {} client pings per hour (WebSocket control frames of a few bytes, \
         not HTTP requests). Refused WebSocket reconnect attempts while polling (backoff, then one probe per \
         {:?}) are TCP connects, not counted above.",
        defaults.poll_interval,
        3600 / defaults.poll_interval.as_secs(),
        3600 / defaults.ping_interval.as_secs(),
        defaults.probe_interval
    ));
    println!("{}", out.join("\n"));
}
