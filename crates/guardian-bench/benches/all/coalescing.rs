//! Scenario 4: coalescing and batching on the seed's workloads.
//!
//! The same ops are enqueued offline, then drained by the engine through a
//! counting proxy in front of the reference server, in four configurations
//! within each run: coalescing off/on × per-op (concurrency 16)/batches of
//! 100. Requests come from the server's own metrics, bytes (request headers
//! and bodies, client → server) from the proxy. The toggle workload's
//! per-op and batched modes without coalescing also drain through a second
//! proxy that simulates a 20 ms round-trip link, interleaved in each run:
//! over loopback the server's CPU bounds both modes, on a real link the
//! round trips do.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use guardian_bench::proxy::CountingProxy;
use guardian_bench::report::{ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_protocol::CreateRequest;
use guardian_sync::engine::{BatchConfig, SyncEngine};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use serde_json::{json, Map, Value};

use crate::common::{client_runtime, scratch, tokens, Config, Section, Server, Target, TOKEN};
use crate::drain::BATCH;

const CONCURRENCY: usize = 16;
const ENQUEUERS: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Mode {
    name: &'static str,
    coalesce: bool,
    batch: bool,
}

/// One-way delay of the simulated link: a 20 ms round trip (as in the
/// drain section).
const ONE_WAY: Duration = Duration::from_millis(10);

const MODES: [Mode; 4] = [
    Mode {
        name: "neither",
        coalesce: false,
        batch: false,
    },
    Mode {
        name: "coalescing only",
        coalesce: true,
        batch: false,
    },
    Mode {
        name: "batching only (100)",
        coalesce: false,
        batch: true,
    },
    Mode {
        name: "coalescing + batching",
        coalesce: true,
        batch: true,
    },
];

/// An op of a workload, tagged with the lane (enqueuer) that owns its entity
/// so per-entity order is kept while 8 enqueuers share group commits.
type Workload = Vec<(usize, NewOp)>;

/// Devices switched on and off offline: `toggles` updates spread over
/// `devices` existing devices by a fixed pseudo-random sequence.
fn toggles(devices: usize, toggles: usize) -> Workload {
    let mut state = vec![false; devices];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..toggles)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = usize::try_from(x % devices as u64).unwrap_or_default();
            state[d] = !state[d];
            let op = NewOp::update(
                "device",
                format!("dev-{d:05}"),
                json!({"on": state[d], "brightness": (i * 7) % 100, "room": "living-room"}),
            );
            (d % ENQUEUERS, op)
        })
        .collect()
}

/// Forms filled in field by field (each edit saves the whole form), one in
/// five discarded at the end (a never-sent draft).
fn forms(prefix: &str, forms: usize, edits: usize) -> Workload {
    let mut out = Vec::new();
    for k in 0..forms {
        let id = format!("{prefix}-form-{k:04}");
        let lane = k % ENQUEUERS;
        let mut doc = Map::new();
        doc.insert("title".into(), json!(format!("Inspection {k}")));
        out.push((lane, NewOp::create("form", &id, Value::Object(doc.clone()))));
        for e in 0..edits {
            doc.insert(
                format!("field_{e:02}"),
                json!(format!("answer {e} to question {e}")),
            );
            out.push((lane, NewOp::update("form", &id, Value::Object(doc.clone()))));
        }
        if k.is_multiple_of(5) {
            out.push((lane, NewOp::delete("form", &id)));
        }
    }
    out
}

#[derive(Debug, Default, Clone)]
struct Figures {
    stored: Samples,
    requests: Samples,
    kib_up: Samples,
    drain_ms: Samples,
    throughput: Samples,
}

/// The toggle modes also measured over the simulated link: per-op and
/// batched, both without coalescing (indices into [`MODES`]).
const LINK_MODES: [usize; 2] = [0, 2];

struct Rig {
    server: Server,
    /// Loopback proxy.
    proxy: CountingProxy,
    /// The simulated 20 ms RTT link to the same server.
    link: CountingProxy,
}

/// Enqueues `work` (not timed), drains it through `via` (the rig's loopback
/// proxy or its link), returns (ops stored after enqueue, requests, bytes
/// up, drain seconds).
async fn measure(
    rig: &Rig,
    via: &CountingProxy,
    mode: Mode,
    work: Workload,
) -> (u64, u64, u64, f64) {
    let dir = scratch("bench-coalesce");
    let (outbox, _) = Outbox::open(
        dir.path().join("outbox.db"),
        OutboxOptions::default().coalesce(mode.coalesce),
    )
    .await
    .expect("open outbox");
    let mut lanes: Vec<Vec<NewOp>> = vec![Vec::new(); ENQUEUERS];
    for (lane, op) in work {
        lanes[lane].push(op);
    }
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|ops| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for op in ops {
                    outbox.enqueue(op).await.expect("enqueue");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("enqueuer");
    }
    let stats = outbox.stats().await.expect("stats");
    let mut builder = SyncEngine::builder()
        .outbox(outbox.clone())
        .server(via.url())
        .token_provider(tokens())
        .concurrency(CONCURRENCY);
    builder = if mode.batch {
        builder.batching(BatchConfig {
            max_ops: BATCH,
            ..BatchConfig::default()
        })
    } else {
        builder.no_batching()
    };
    let engine = builder.build().await.expect("engine");
    let requests_before = rig.server.requests();
    let up_before = via.traffic().bytes_up;
    let start = Instant::now();
    let report = engine.run_until_empty().await.expect("drain");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(report.drain.failed, 0, "no op failed");
    let requests = rig.server.requests() - requests_before;
    let up = via.traffic().bytes_up - up_before;
    outbox.close().await;
    (stats.pending, requests, up, secs)
}

fn table(name: &str, ops: usize, figures: &[Figures]) -> String {
    let mut t = Table::new([
        "mode",
        "ops stored",
        "requests",
        "KiB sent",
        "requests / bytes vs neither",
        "drain time",
        "enqueued ops/s",
    ]);
    for (m, f) in MODES.iter().zip(figures) {
        t.row([
            m.name.to_owned(),
            thousands(f.stored.median().unwrap_or_default()),
            thousands(f.requests.median().unwrap_or_default()),
            thousands(f.kib_up.median().unwrap_or_default()),
            format!(
                "{} / {}",
                ratio(f.requests.ratio_to(&figures[0].requests)),
                ratio(f.kib_up.ratio_to(&figures[0].kib_up))
            ),
            format!("{:.0} ms", f.drain_ms.median().unwrap_or_default()),
            thousands(f.throughput.median().unwrap_or_default()),
        ]);
    }
    format!(
        "**{name}** ({} ops enqueued)\n\n{}",
        thousands(ops as f64),
        t.to_markdown()
    )
}

/// The toggle workload over the simulated link: per-op and batched.
fn link_table(ops: usize, figures: &[Figures]) -> String {
    let mut t = Table::new([
        "mode",
        "requests",
        "ops per request",
        "drain time: median (min – max)",
        "enqueued ops/s",
        "vs per-op",
    ]);
    for (&m, f) in LINK_MODES.iter().zip(figures) {
        let requests = f.requests.median().unwrap_or_default();
        let (lo, hi) = f.drain_ms.range().unwrap_or_default();
        t.row([
            MODES[m].name.to_owned(),
            thousands(requests),
            if requests > 0.0 {
                format!("{:.1}", ops as f64 / requests)
            } else {
                "n/a".into()
            },
            format!(
                "{:.0} ms ({lo:.0} – {hi:.0})",
                f.drain_ms.median().unwrap_or_default()
            ),
            thousands(f.throughput.median().unwrap_or_default()),
            ratio(f.throughput.ratio_to(&figures[0].throughput)),
        ]);
    }
    t.to_markdown()
}

/// Per-entity chains of a workload: (longest, mean) ops of one entity. The
/// batched drain sends only entities' heads, so its sequential batch rounds
/// are at least the longest chain.
fn chains(work: &Workload) -> (usize, f64) {
    let mut per: HashMap<&str, usize> = HashMap::new();
    for (_, op) in work {
        *per.entry(op.entity_id.as_str()).or_default() += 1;
    }
    let longest = per.values().copied().max().unwrap_or_default();
    let mean = if per.is_empty() {
        0.0
    } else {
        work.len() as f64 / per.len() as f64
    };
    (longest, mean)
}

pub(crate) fn run(config: &Config) -> Section {
    let devices = config.size(200, 20);
    let n_toggles = config.size(2_000, 200);
    let n_forms = config.size(20, 8);
    let edits = config.size(24, 5);
    let rt = client_runtime();
    let server = Server::start();
    let proxy = rt
        .block_on(CountingProxy::start(server.running.addr()))
        .expect("proxy");
    // The link's own runtime, so delaying chunks does not take the client's
    // workers (as in the drain section).
    let link_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-link")
        .enable_all()
        .build()
        .expect("link runtime");
    let link = link_rt
        .block_on(CountingProxy::with_latency(server.running.addr(), ONE_WAY))
        .expect("link proxy");
    let rtt_ms = (link.one_way() * 2).as_secs_f64() * 1000.0;
    let rig = Rig {
        server,
        proxy,
        link,
    };
    // The devices exist on the server before going offline (not counted).
    rt.block_on(async {
        let http = reqwest::Client::new();
        for d in 0..devices {
            let resp = http
                .post(format!("{}/v1/entities/device", rig.server.url()))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
                .json(&CreateRequest {
                    id: format!("dev-{d:05}"),
                    data: json!({"on": false}),
                })
                .send()
                .await
                .expect("seed");
            assert_eq!(resp.status().as_u16(), 201);
        }
    });
    let toggle_work = toggles(devices, n_toggles);
    let toggle_ops = toggle_work.len();
    let (longest_chain, mean_chain) = chains(&toggle_work);
    drop(toggle_work);
    let form_ops = forms("x", n_forms, edits).len();
    let mut tog = vec![Figures::default(); MODES.len()];
    let mut frm = vec![Figures::default(); MODES.len()];
    let mut lnk = vec![Figures::default(); LINK_MODES.len()];
    for run in 0..config.runs {
        eprintln!("coalescing: run {}/{}", run + 1, config.runs);
        for (i, mode) in MODES.iter().enumerate() {
            let (stored, req, up, secs) = rt.block_on(measure(
                &rig,
                &rig.proxy,
                *mode,
                toggles(devices, n_toggles),
            ));
            let f = &mut tog[i];
            f.stored.push(stored as f64);
            f.requests.push(req as f64);
            f.kib_up.push(up as f64 / 1024.0);
            f.drain_ms.push(secs * 1000.0);
            f.throughput.push(toggle_ops as f64 / secs);
            let prefix = format!("r{run}m{i}");
            let (stored, req, up, secs) = rt.block_on(measure(
                &rig,
                &rig.proxy,
                *mode,
                forms(&prefix, n_forms, edits),
            ));
            let f = &mut frm[i];
            f.stored.push(stored as f64);
            f.requests.push(req as f64);
            f.kib_up.push(up as f64 / 1024.0);
            f.drain_ms.push(secs * 1000.0);
            f.throughput.push(form_ops as f64 / secs);
        }
        // The same toggles through the simulated link.
        for (j, &m) in LINK_MODES.iter().enumerate() {
            let (stored, req, up, secs) = rt.block_on(measure(
                &rig,
                &rig.link,
                MODES[m],
                toggles(devices, n_toggles),
            ));
            let f = &mut lnk[j];
            f.stored.push(stored as f64);
            f.requests.push(req as f64);
            f.kib_up.push(up as f64 / 1024.0);
            f.drain_ms.push(secs * 1000.0);
            f.throughput.push(toggle_ops as f64 / secs);
        }
    }
    let Rig {
        server,
        proxy,
        link,
    } = rig;
    drop(proxy);
    drop(link);
    drop(link_rt);
    server.stop();
    let mut body = format!(
        "Toggles: {} UPDATEs of {devices} existing devices. Forms: {n_forms} created, saved \
         after each of {edits} edits, one in five discarded. Enqueued offline by {ENQUEUERS} \
         enqueuers, then drained (per-op at c=16).\n\n",
        thousands(n_toggles as f64)
    );
    body.push_str(&table("Toggle workload", toggle_ops, &tog));
    body.push('\n');
    body.push_str(&table("Form-editing workload", form_ops, &frm));
    let fewer = tog[3].requests.ratio_to(&tog[0].requests).map(|r| 1.0 - r);
    let batch_gain = tog[2].throughput.ratio_to(&tog[0].throughput);
    let store_cut = tog[1].stored.ratio_to(&tog[0].stored).map(|r| 1.0 - r);
    body.push_str(&format!(
        "\nCoalescing makes the toggle queue {:.0} % smaller (the seed claims 20–50 %).\n",
        store_cut.unwrap_or_default() * 100.0
    ));
    let link_gain = lnk[1].throughput.ratio_to(&lnk[0].throughput);
    body.push_str(&format!(
        "\n**Toggles over the drain section's {rtt_ms:.0} ms RTT link** ({} ms each way, \
         interleaved with the loopback rows)\n\n",
        ONE_WAY.as_millis()
    ));
    body.push_str(&link_table(toggle_ops, &lnk));
    body.push_str(&format!(
        "\nBatched vs per-op over the link: {}; up to {longest_chain} toggles per device \
         ({mean_chain:.1} on average).\n",
        ratio(link_gain)
    ));
    let targets = vec![
        Target {
            scenario: "4",
            target: "toggles: ≥ 60 % fewer requests, coalescing + batching".into(),
            measured: format!("{:.1} % fewer", fewer.unwrap_or_default() * 100.0),
            met: fewer.is_some_and(|f| f >= 0.6),
            note: None,
        },
        Target {
            scenario: "4",
            target: "toggles, no coalescing: batches of 100 ≥ 10× per-op, loopback".into(),
            measured: ratio(batch_gain),
            met: batch_gain.is_some_and(|r| r >= 10.0),
            note: Some("A5"),
        },
        Target {
            scenario: "4",
            target: format!("the same over the {rtt_ms:.0} ms RTT link"),
            measured: ratio(link_gain),
            met: link_gain.is_some_and(|r| r >= 10.0),
            note: None,
        },
    ];
    Section {
        title: "4. Coalescing and batching".into(),
        body,
        targets,
    }
}
