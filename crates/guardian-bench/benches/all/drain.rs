//! Scenario 2: drain throughput against the reference server (faults off,
//! in-memory storage), the engine beside a bare reqwest loop sending the same
//! requests (`POST /v1/entities/device` with bearer token, `Idempotency-Key`
//! and the same JSON body, or `POST /v1/batch`) at the same concurrency:
//! first over loopback, then through a proxy that simulates a 20 ms round
//! trip link (what a phone or an edge device syncing over a WAN sees).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use guardian_bench::proxy::CountingProxy;
use guardian_bench::report::{ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_protocol::{BatchOp, BatchRequest, CreateRequest, MutationKind};
use guardian_sync::engine::{BatchConfig, SyncEngine};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions, Synchronous};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{
    client_runtime, rate, scratch, tokens, Config, Section, Server, Target, TOKEN,
};

pub(crate) const BATCH: usize = 100;

fn data(i: usize) -> Value {
    json!({"on": i.is_multiple_of(2), "level": i % 100, "room": "living-room", "scene": "evening"})
}

/// Fills an outbox with `n` CREATEs of distinct devices (64 enqueuers at
/// once, so group commit makes this quick; not timed).
pub(crate) async fn filled_outbox(
    dir: &std::path::Path,
    options: OutboxOptions,
    prefix: &str,
    n: usize,
) -> Outbox {
    let (outbox, _) = Outbox::open(dir.join("outbox.db"), options)
        .await
        .expect("open outbox");
    futures::stream::iter(0..n)
        .map(|i| {
            let outbox = outbox.clone();
            let id = format!("{prefix}-{i:07}");
            async move { outbox.enqueue(NewOp::create("device", id, data(i))).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("fill outbox");
    outbox
}

/// CPU time of this process's threads by role (ns), from
/// `/proc/self/task/*/schedstat`: the reference server's workers, the
/// outbox writer thread(s), and everything else (the client runtime).
/// Linux only; zeros elsewhere. For `BENCH_DRAIN_PEROP` runs, which show
/// where each side's CPU per op goes.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    server: u64,
    writer: u64,
    client: u64,
    /// Context switches of all threads (voluntary and not).
    switches: u64,
    /// When it was taken, Unix seconds.
    unix: f64,
}

impl CpuSplit {
    fn now() -> Self {
        let mut split = Self {
            unix: unix_now(),
            ..Self::default()
        };
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return split;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let ns: u64 = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            split.switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            if comm.starts_with("bench-server") {
                split.server += ns;
            } else if comm.starts_with("guardian-outbox") {
                split.writer += ns;
            } else {
                split.client += ns;
            }
        }
        split
    }

    /// Microseconds per op spent between `self` (earlier) and `later`.
    /// Threads that ended in between are not counted (none do while a
    /// side is timed).
    fn per_op(self, later: Self, n: usize) -> String {
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0 / n as f64;
        format!(
            "cpu/op server {:.0} us, writer {:.0} us, client {:.0} us, switches/op {:.1}",
            us(self.server, later.server),
            us(self.writer, later.writer),
            us(self.client, later.client),
            later.switches.saturating_sub(self.switches) as f64 / n as f64
        )
    }
}

/// The last timed side's CPU split per op (`BENCH_DRAIN_PEROP` output).
static LAST_CPU: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
/// The last timed side's span in Unix seconds (`BENCH_DRAIN_PROFILE`).
static LAST_SPAN: std::sync::Mutex<(f64, f64)> = std::sync::Mutex::new((0.0, 0.0));

fn note_cpu(before: CpuSplit, n: usize) {
    let after = CpuSplit::now();
    *LAST_CPU.lock().unwrap() = before.per_op(after, n);
    *LAST_SPAN.lock().unwrap() = (before.unix, after.unix);
}

fn last_cpu() -> String {
    LAST_CPU.lock().unwrap().clone()
}

/// Now as Unix seconds, the clock `perf record -k CLOCK_REALTIME` stamps.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `BENCH_DRAIN_PROFILE=side,c`: runs one side alone, 10 times, printing
/// each run's span and CPU split, for a profiler's time filter.
async fn profile(url: &str, spec: &str) {
    let (side, c) = spec.split_once(',').unwrap_or((spec, "16"));
    let c: usize = c
        .parse()
        .expect("BENCH_DRAIN_PROFILE=engine|bare,CONCURRENCY");
    for k in 0..10 {
        let prefix = format!("profile{k}");
        // The engine's outbox is filled before its span begins.
        match side {
            "engine" => engine(url, 2_000, c, None, Synchronous::Full, &prefix).await,
            "bare" => bare(url, 2_000, c, &prefix).await,
            _ => panic!("BENCH_DRAIN_PROFILE: side is engine or bare, not {side}"),
        };
        let (from, to) = *LAST_SPAN.lock().unwrap();
        eprintln!(
            "profile {side} c={c} run {k}: --time {from:.6},{to:.6} {}",
            last_cpu()
        );
    }
}

/// The engine drains `n` CREATEs; returns ops/s (enqueue not timed).
async fn engine(
    url: &str,
    n: usize,
    concurrency: usize,
    batch: Option<usize>,
    synchronous: Synchronous,
    prefix: &str,
) -> f64 {
    let dir = scratch("bench-drain");
    let outbox = filled_outbox(
        dir.path(),
        OutboxOptions::default().synchronous(synchronous),
        prefix,
        n,
    )
    .await;
    let mut builder = SyncEngine::builder()
        .outbox(outbox.clone())
        .server(url)
        .token_provider(tokens())
        .concurrency(concurrency);
    builder = match batch {
        Some(max_ops) => builder.batching(BatchConfig {
            max_ops,
            ..BatchConfig::default()
        }),
        None => builder.no_batching(),
    };
    let engine = builder.build().await.expect("build engine");
    let cpu = CpuSplit::now();
    let start = Instant::now();
    let report = engine.run_until_empty().await.expect("drain");
    let elapsed = start.elapsed();
    note_cpu(cpu, n);
    assert_eq!(report.drain.succeeded, n as u64, "every op applied");
    outbox.close().await;
    rate(n, elapsed)
}

fn client() -> reqwest::Client {
    // The engine's transport settings: no redirects, 5 s connect, 30 s request.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A bare reqwest loop: `concurrency` workers sending the same CREATEs.
async fn bare(url: &str, n: usize, concurrency: usize, prefix: &str) -> f64 {
    let http = client();
    let endpoint = format!("{url}/v1/entities/device");
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = CpuSplit::now();
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, endpoint, next) = (http.clone(), endpoint.clone(), next.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let resp = http
                        .post(&endpoint)
                        .bearer_auth(TOKEN)
                        .header("Idempotency-Key", Uuid::new_v4().to_string())
                        .json(&CreateRequest {
                            id: format!("{prefix}-{i:07}"),
                            data: data(i),
                        })
                        .send()
                        .await
                        .expect("send");
                    assert_eq!(resp.status().as_u16(), 201);
                    let _ = resp.bytes().await.expect("body");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = start.elapsed();
    note_cpu(cpu, n);
    rate(n, elapsed)
}

/// A bare reqwest loop sending the same CREATEs in batches of `batch`.
async fn bare_batched(url: &str, n: usize, batch: usize, prefix: &str) -> f64 {
    let http = client();
    let endpoint = format!("{url}/v1/batch");
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
        let body = BatchRequest {
            ops: chunk
                .iter()
                .map(|&i| BatchOp {
                    op: MutationKind::Create,
                    entity_type: "device".into(),
                    id: format!("{prefix}-{i:07}"),
                    data: Some(data(i)),
                    if_match: None,
                    idempotency_key: Uuid::new_v4().to_string(),
                    depends_on: None,
                    if_match_chained: false,
                })
                .collect(),
        };
        let resp = http
            .post(&endpoint)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.bytes().await.expect("body");
    }
    rate(n, start.elapsed())
}

/// One-way delay of the simulated link: a 20 ms round trip.
const ONE_WAY: Duration = Duration::from_millis(10);

/// A table of rows `(name, ops)` with their samples and ratio texts.
fn rate_table(rows: &[(&str, usize)], s: &[Samples], ratio_of: impl Fn(usize) -> String) -> String {
    let mut table = Table::new([
        "side (per-op unless said)",
        "ops",
        "ops/s: median (min – max)",
        "ratio",
    ]);
    for (i, (name, n)) in rows.iter().enumerate() {
        let (lo, hi) = s[i].range().unwrap_or_default();
        table.row([
            (*name).to_owned(),
            thousands(*n as f64),
            format!(
                "{} ({} – {})",
                thousands(s[i].median().unwrap_or_default()),
                thousands(lo),
                thousands(hi)
            ),
            ratio_of(i),
        ]);
    }
    table.to_markdown()
}

pub(crate) fn run(config: &Config) -> Section {
    let n1 = config.size(2_000, 100);
    let n16 = config.size(2_000, 300);
    let nb = config.size(2_000, 1_000);
    // Over the link per-op c=16 does about 16 / 20 ms = 800 ops/s and c=8
    // half that; batches a few thousand ops/s.
    let nw = config.size(3_000, 200);
    let nwb = config.size(10_000, 1_000);
    let server = Server::start();
    let url = server.url();
    let rt = client_runtime();
    // The link's own runtime, so delaying chunks does not take the client's
    // workers.
    let link_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-link")
        .enable_all()
        .build()
        .expect("link runtime");
    let link = link_rt
        .block_on(CountingProxy::with_latency(server.running.addr(), ONE_WAY))
        .expect("link proxy");
    let wurl = link.url();
    let rtt_ms = (link.one_way() * 2).as_secs_f64() * 1000.0;
    let rows: [(&str, usize); 8] = [
        ("engine, c=1", n1),
        ("bare, c=1", n1),
        ("engine, c=16", n16),
        ("bare, c=16", n16),
        ("engine, batches of 100", nb),
        ("bare, batches of 100", nb),
        ("engine, c=1, outbox NORMAL (no fsync)", n1),
        ("engine, c=16, outbox NORMAL (no fsync)", n16),
    ];
    let wan_rows: [(&str, usize); 5] = [
        ("engine, c=8 (the default concurrency)", nw),
        ("engine, c=16", nw),
        ("bare, c=16", nw),
        ("engine, batches of 100", nwb),
        ("bare, batches of 100, one at a time", nwb),
    ];
    let mut s: Vec<Samples> = vec![Samples::new(); rows.len()];
    let mut w: Vec<Samples> = vec![Samples::new(); wan_rows.len()];
    // `BENCH_DRAIN_PEROP=1`: only the loopback per-op rows (engine and bare
    // at concurrency 1 and 16), for quick A/B runs; the other rows stay empty.
    let per_op_only = std::env::var("BENCH_DRAIN_PEROP").is_ok_and(|v| v != "0");
    if let Ok(spec) = std::env::var("BENCH_DRAIN_PROFILE") {
        rt.block_on(profile(&url, &spec));
        drop(link);
        drop(link_rt);
        server.stop();
        return Section {
            title: "2. Drain (profile run only)".into(),
            body: String::new(),
            targets: Vec::new(),
        };
    }
    // The per-op rows sit near their target: they get more runs than the
    // rest (not in the A/B mode, whose script runs its own sets).
    let runs = if per_op_only {
        config.runs
    } else {
        config.near_runs()
    };
    for run in 0..runs {
        eprintln!("drain: run {}/{runs}", run + 1);
        // Each run's loopback rows get a new server: the in-memory store
        // slows as it grows, which raises later runs' ratios (see the
        // analysis header).
        let fresh = Server::start();
        let url = fresh.url();
        rt.block_on(async {
            let p = |k: usize| format!("r{run}k{k}");
            let mut cpu = Vec::new();
            s[0].push(engine(&url, n1, 1, None, Synchronous::Full, &p(0)).await);
            cpu.push(last_cpu());
            s[1].push(bare(&url, n1, 1, &p(1)).await);
            cpu.push(last_cpu());
            s[3].push(bare(&url, n16, 16, &p(3)).await);
            cpu.push(last_cpu());
            s[2].push(engine(&url, n16, 16, None, Synchronous::Full, &p(2)).await);
            cpu.push(last_cpu());
            if run >= config.runs {
                return;
            }
            if per_op_only {
                eprintln!(
                    "  engine c=1: {}\n  bare c=1: {}\n  bare c=16: {}\n  engine c=16: {}",
                    cpu[0], cpu[1], cpu[2], cpu[3]
                );
                eprintln!(
                    "drain per-op run {}: c=1 {:.0} vs {:.0} ops/s ({:.2}x), c=16 {:.0} vs {:.0} ops/s ({:.2}x)",
                    run + 1,
                    s[0].values()[run],
                    s[1].values()[run],
                    s[0].values()[run] / s[1].values()[run],
                    s[2].values()[run],
                    s[3].values()[run],
                    s[2].values()[run] / s[3].values()[run],
                );
                return;
            }
            s[4].push(engine(&url, nb, 16, Some(BATCH), Synchronous::Full, &p(4)).await);
            s[5].push(bare_batched(&url, nb, BATCH, &p(5)).await);
            s[6].push(engine(&url, n1, 1, None, Synchronous::Normal, &p(6)).await);
            s[7].push(engine(&url, n16, 16, None, Synchronous::Normal, &p(7)).await);
            // The same ops through the simulated link.
            w[2].push(bare(&wurl, nw, 16, &p(12)).await);
            w[1].push(engine(&wurl, nw, 16, None, Synchronous::Full, &p(11)).await);
            w[0].push(engine(&wurl, nw, 8, None, Synchronous::Full, &p(10)).await);
            w[3].push(engine(&wurl, nwb, 16, Some(BATCH), Synchronous::Full, &p(13)).await);
            w[4].push(bare_batched(&wurl, nwb, BATCH, &p(14)).await);
        });
        fresh.stop();
    }
    drop(link);
    drop(link_rt);
    server.stop();

    // Loopback.
    let r1 = s[0].ratio_to(&s[1]);
    let r16 = s[2].ratio_to(&s[3]);
    let rn1 = s[6].ratio_to(&s[1]);
    let rn16 = s[7].ratio_to(&s[3]);
    let rb1 = s[4].ratio_to(&s[0]);
    let rb16 = s[4].ratio_to(&s[2]);
    let rbare = s[5].ratio_to(&s[3]);
    let loopback = rate_table(&rows, &s, |i| match i {
        0 => format!("{} of bare", ratio(r1)),
        2 => format!("{} of bare", ratio(r16)),
        4 => format!(
            "{} of engine c=16, {} of bare batches",
            ratio(rb16),
            ratio(s[4].ratio_to(&s[5]))
        ),
        5 => format!("{} of bare c=16", ratio(rbare)),
        6 => format!("{} of bare c=1", ratio(rn1)),
        7 => format!("{} of bare c=16", ratio(rn16)),
        _ => String::new(),
    });
    // The simulated link.
    let wb16 = w[3].ratio_to(&w[1]);
    let wb8 = w[3].ratio_to(&w[0]);
    let wbare = w[4].ratio_to(&w[2]);
    let wan = rate_table(&wan_rows, &w, |i| match i {
        0 => format!("{} of bare c=16", ratio(w[0].ratio_to(&w[2]))),
        1 => format!("{} of bare c=16", ratio(w[1].ratio_to(&w[2]))),
        3 => format!(
            "{} of engine c=16, {} of c=8, {} of bare batches",
            ratio(wb16),
            ratio(wb8),
            ratio(w[3].ratio_to(&w[4]))
        ),
        4 => format!("{} of bare c=16", ratio(wbare)),
        _ => String::new(),
    });

    let mut body = String::from(
        "CREATEs of distinct devices to the in-memory reference server (own 2-worker \
         runtime). The engine (`run_until_empty()`) claims each op durably before sending \
         and deletes it durably after; the bare reqwest loop keeps no state. c = requests \
         in flight.\n\n**Over loopback**\n\n",
    );
    body.push_str(&loopback);
    body.push_str(&format!(
        "\nBatched vs per-op: {} of c=16, {} of c=1; the bare loop gains {} from batches.\n",
        ratio(rb16),
        ratio(rb1),
        ratio(rbare)
    ));
    body.push_str(&format!(
        "\n**Over a simulated {rtt_ms:.0} ms RTT link** ({} ms each way, no rate cap, a \
         handshake round trip per connection)\n\n",
        link_ms(ONE_WAY),
    ));
    body.push_str(&wan);

    let targets = vec![
        Target {
            scenario: "2",
            target: "per-op, loopback, c=1 ≥ 0.8× bare reqwest".into(),
            measured: ratio(r1),
            met: r1.is_some_and(|r| r >= 0.8),
            note: Some("A4"),
        },
        Target {
            scenario: "2",
            target: "per-op, loopback, c=16 ≥ 0.8× bare reqwest".into(),
            measured: ratio(r16),
            met: r16.is_some_and(|r| r >= 0.8),
            note: Some("A4"),
        },
        Target {
            scenario: "2",
            target: "batches of 100 ≥ 10× per-op, loopback".into(),
            measured: format!("{} of c=16, {} of c=1", ratio(rb16), ratio(rb1)),
            met: rb16.is_some_and(|r| r >= 10.0),
            note: Some("A5"),
        },
        Target {
            scenario: "2",
            target: format!("batches of 100 ≥ 10× per-op c=16, {rtt_ms:.0} ms RTT link"),
            measured: format!("{} of c=16, {} of c=8", ratio(wb16), ratio(wb8)),
            met: wb16.is_some_and(|r| r >= 10.0),
            note: None,
        },
    ];
    Section {
        title: "2. Drain".into(),
        body,
        targets,
    }
}

/// A delay in whole milliseconds, for the text.
fn link_ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}
