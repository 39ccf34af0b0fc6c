//! Scenario 6: time to sync after reconnect (issue 21, point 2).
//!
//! A device comes back online with a queue filled offline: toggles of a few
//! hundred existing devices (most coalesce), edits of existing forms with
//! ~1 KiB payloads (some coalesce) and creates. The engine, built with only
//! an outbox, a server URL and a token (its defaults), drains it through a
//! proxy that simulates a 50 ms round trip and 10 Mbit/s each way, to the
//! reference server on a SQLite file; the clock runs from `run_until_empty`
//! (which connects) to the empty queue. Other settings and fault rates are
//! measured beside the defaults in every run, each against the physical
//! bound of its own traffic: the bytes it put on the wire over the rate, plus
//! the round trips its concurrency and batch size need at least.

use std::time::{Duration, Instant};

use guardian_bench::proxy::{CountingProxy, Link};
use guardian_bench::report::{ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_server::{Faults, ServerBuilder};
use guardian_sync::core::drain::MAX_BATCHES_IN_FLIGHT;
use guardian_sync::engine::{BatchConfig, SyncEngine};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use guardian_sync::telemetry::Counter;
use serde_json::{json, Map, Value};

use crate::common::{client_runtime, scratch, tokens, Config, Section, Server, Target};

/// The simulated link: 25 ms each way (50 ms RTT), 10 Mbit/s each way.
const LINK: Link = Link {
    one_way: Duration::from_millis(25),
    bits_per_sec: Some(10_000_000),
};

/// `SyncEngineBuilder`'s defaults, for the bound's round trips (the engine
/// itself is built without setting them). Keep in step with
/// `guardian-sync/src/engine/mod.rs`.
const DEFAULT_CONCURRENCY: usize = 8;

const ENQUEUERS: usize = 8;

/// How the engine is configured for one row.
#[derive(Debug, Clone, Copy)]
struct Setting {
    name: &'static str,
    /// `None`: the engine's default.
    concurrency: Option<usize>,
    /// `None`: the engine's default; `Some(None)`: per-op; `Some(Some(n))`:
    /// batches of at most `n` ops.
    batch: Option<Option<usize>>,
}

impl Setting {
    fn concurrency(self) -> usize {
        self.concurrency.unwrap_or(DEFAULT_CONCURRENCY)
    }

    fn batch(self) -> Option<usize> {
        self.batch.unwrap_or(Some(BatchConfig::default().max_ops))
    }

    /// Least sequential round trips to send `ops` single-op entities: the
    /// requests needed over those in flight at once, plus the TCP
    /// handshake.
    fn rounds(self, ops: f64) -> f64 {
        let (units, in_flight) = match self.batch() {
            Some(b) => (
                (ops / b as f64).ceil(),
                self.concurrency().clamp(1, MAX_BATCHES_IN_FLIGHT),
            ),
            None => (ops, self.concurrency().max(1)),
        };
        1.0 + (units / in_flight as f64).ceil()
    }
}

const DEFAULTS: Setting = Setting {
    name: "engine defaults",
    concurrency: None,
    batch: None,
};

/// Rows without faults; the first is the defaults.
const SETTINGS: [Setting; 8] = [
    DEFAULTS,
    Setting {
        name: "per-op, c=16",
        concurrency: Some(16),
        batch: Some(None),
    },
    Setting {
        name: "per-op, c=32",
        concurrency: Some(32),
        batch: Some(None),
    },
    Setting {
        name: "batches of 100, c=1",
        concurrency: Some(1),
        batch: Some(Some(100)),
    },
    Setting {
        name: "batches of 50, c=8",
        concurrency: Some(8),
        batch: Some(Some(50)),
    },
    Setting {
        name: "per-op, c=8",
        concurrency: Some(8),
        batch: Some(None),
    },
    Setting {
        name: "batches of 250, c=8",
        concurrency: Some(8),
        batch: Some(Some(250)),
    },
    Setting {
        name: "batches of 500, c=8",
        concurrency: Some(8),
        batch: Some(Some(500)),
    },
];

/// Settings measured again under injected faults (indices into [`SETTINGS`]).
const FAULT_SETTINGS: [usize; 2] = [0, 5];
const FAULT_RATES: [f64; 2] = [0.05, 0.20];

/// Sizes of the workload.
#[derive(Debug, Clone, Copy)]
struct Mix {
    devices: usize,
    toggles: usize,
    forms: usize,
    edits: usize,
    creates: usize,
}

impl Mix {
    fn total(self) -> usize {
        self.toggles + self.edits + self.creates
    }

    /// Entities touched: with coalescing, at most one stored op each.
    fn entities(self) -> usize {
        self.devices.min(self.toggles) + self.forms.min(self.edits) + self.creates
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or_default()
    }
}

/// A form of 20 answered fields, ~1 KiB of JSON; `rev` changes one answer.
fn form(k: usize, rev: usize) -> Value {
    let mut doc = Map::new();
    doc.insert("title".into(), json!(format!("Site inspection {k}")));
    for f in 0..20 {
        let answer = if f == rev % 20 {
            format!("revised answer {rev} to question {f}, checked on site")
        } else {
            format!("answer to question {f} of form {k}, as first filled in")
        };
        doc.insert(format!("field_{f:02}"), json!(answer));
    }
    Value::Object(doc)
}

fn device(d: usize) -> String {
    format!("dev-{d:04}")
}

fn form_id(k: usize) -> String {
    format!("form-{k:04}")
}

/// The offline session's ops in the order they were made, each with the
/// lane (enqueuer) that owns its entity so per-entity order holds.
fn workload(mix: Mix, prefix: &str, seed: u64) -> Vec<(usize, NewOp)> {
    let mut rng = Rng(seed | 1);
    let mut kinds: Vec<u8> = std::iter::repeat_n(0u8, mix.toggles)
        .chain(std::iter::repeat_n(1, mix.edits))
        .chain(std::iter::repeat_n(2, mix.creates))
        .collect();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    let mut on = vec![false; mix.devices];
    let mut creates = 0;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| match kind {
            0 => {
                let d = rng.below(mix.devices);
                on[d] = !on[d];
                let op = NewOp::update(
                    "device",
                    device(d),
                    json!({"on": on[d], "brightness": i % 100, "room": "living-room"}),
                );
                (d % ENQUEUERS, op)
            }
            1 => {
                let k = rng.below(mix.forms);
                (k % ENQUEUERS, NewOp::update("form", form_id(k), form(k, i)))
            }
            _ => {
                creates += 1;
                let op = NewOp::create(
                    "note",
                    format!("{prefix}-note-{creates:05}"),
                    json!({
                        "text": format!("Reading {creates} taken offline: meter fine, valve closed"),
                        "site": format!("site-{}", creates % 50),
                        "tags": ["offline", "meter"],
                        "taken_at": 1_796_000_000_000_u64 + i as u64,
                    }),
                );
                (creates % ENQUEUERS, op)
            }
        })
        .collect()
}

/// Enqueues `work` with 8 enqueuers (untimed) into a new outbox with the
/// default options (coalescing on).
async fn enqueue(dir: &std::path::Path, work: Vec<(usize, NewOp)>) -> Outbox {
    let (outbox, _) = Outbox::open(dir.join("outbox.db"), OutboxOptions::default())
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
    outbox
}

/// The devices and forms exist on the server before the device goes
/// offline: created by an engine over loopback.
async fn seed(server_url: &str, mix: Mix) {
    let dir = scratch("bench-reconnect-seed");
    let work = (0..mix.devices)
        .map(|d| {
            (
                0,
                NewOp::create("device", device(d), json!({"on": false, "brightness": 0})),
            )
        })
        .chain((0..mix.forms).map(|k| (0, NewOp::create("form", form_id(k), form(k, 0)))))
        .collect();
    let outbox = enqueue(dir.path(), work).await;
    let engine = SyncEngine::builder()
        .outbox(outbox.clone())
        .server(server_url)
        .token_provider(tokens())
        .batching(BatchConfig::default())
        .build()
        .await
        .expect("seed engine");
    let report = engine.run_until_empty().await.expect("seed");
    assert_eq!(report.drain.failed, 0, "seeding failed");
    outbox.close().await;
}

#[derive(Debug, Default, Clone)]
struct Figures {
    secs: Samples,
    stored: Samples,
    requests: Samples,
    connections: Samples,
    up: Samples,
    down: Samples,
    bound: Samples,
    retried: Samples,
    trips: Samples,
}

struct Rig {
    server: Server,
    link: CountingProxy,
}

/// One measurement: enqueue offline, then time the engine from start to
/// empty queue through the link.
async fn measure(
    rig: &Rig,
    setting: Setting,
    faults: (f64, u64),
    work: Vec<(usize, NewOp)>,
    f: &mut Figures,
) {
    let (failure_rate, fault_seed) = faults;
    let dir = scratch("bench-reconnect");
    let outbox = enqueue(dir.path(), work).await;
    let stored = outbox.stats().await.expect("stats").pending;
    let mut builder = SyncEngine::builder()
        .outbox(outbox.clone())
        .server(rig.link.url())
        .token_provider(tokens());
    if let Some(c) = setting.concurrency {
        builder = builder.concurrency(c);
    }
    match setting.batch {
        None => {}
        Some(None) => builder = builder.no_batching(),
        Some(Some(max_ops)) => {
            builder = builder.batching(BatchConfig {
                max_ops,
                ..BatchConfig::default()
            });
        }
    }
    let engine = builder.build().await.expect("engine");
    rig.server
        .running
        .set_faults(Faults {
            failure_rate,
            seed: Some(fault_seed),
            ..Faults::default()
        })
        .expect("faults");
    let requests_before = rig.server.requests();
    rig.link.reset();
    let start = Instant::now();
    let report = engine.run_until_empty().await.expect("drain");
    let secs = start.elapsed().as_secs_f64();
    let traffic = rig.link.traffic();
    let requests = rig.server.requests() - requests_before;
    rig.server
        .running
        .set_faults(Faults::default())
        .expect("faults off");
    assert_eq!(report.drain.failed, 0, "no op failed");
    assert_eq!(report.drain.succeeded, stored, "every stored op applied");
    let trips = engine.metrics().get(Counter::BreakerTrips);
    drop(engine);
    outbox.close().await;
    let bound = bound(setting, stored as f64, traffic.bytes_up, traffic.bytes_down);
    eprintln!(
        "reconnect: {} at {:.0} % faults: {secs:.2} s, bound {bound:.2} s, {stored} ops, \
         {requests} requests, {} connections, {} B up, {} B down, {} retried, {trips} trips",
        setting.name,
        failure_rate * 100.0,
        traffic.connections,
        traffic.bytes_up,
        traffic.bytes_down,
        report.drain.retried
    );
    f.secs.push(secs);
    f.stored.push(stored as f64);
    f.requests.push(requests as f64);
    f.connections.push(traffic.connections as f64);
    f.up.push(traffic.bytes_up as f64);
    f.down.push(traffic.bytes_down as f64);
    f.bound.push(bound);
    f.retried.push(report.drain.retried as f64);
    f.trips.push(trips as f64);
}

/// The least time the link allows a row: its bytes at the link's rate plus
/// the handshake and one exchange (the last bytes up still cross the link,
/// the last response still comes back), and never less than the round trips
/// its settings need. Transfer and round trips overlap once requests are
/// pipelined, so the two are not added.
fn bound(setting: Setting, ops: f64, up: u64, down: u64) -> f64 {
    let rtt = (LINK.one_way * 2).as_secs_f64();
    let transfer = LINK.transmit_secs(up).max(LINK.transmit_secs(down));
    (transfer + 2.0 * rtt).max(setting.rounds(ops) * rtt)
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |s| format!("{s:.2} s"))
}

fn kib(s: &Samples) -> String {
    thousands(s.median().unwrap_or_default() / 1024.0)
}

fn describe(s: Setting) -> String {
    let batch = s
        .batch()
        .map_or_else(|| "per-op".to_owned(), |b| format!("batches of {b}"));
    format!("{batch}, c={}", s.concurrency())
}

#[allow(clippy::too_many_lines)]
pub(crate) fn run(config: &Config) -> Section {
    let mix = Mix {
        devices: config.size(300, 30),
        toggles: config.size(6_000, 300),
        forms: config.size(500, 40),
        edits: config.size(2_000, 100),
        creates: config.size(2_000, 100),
    };
    let rt = client_runtime();
    let db_dir = scratch("bench-reconnect-server");
    let db = db_dir.path().join("server.db");
    let server = Server::start_with(|b: ServerBuilder| b.database(&db));
    rt.block_on(seed(&server.url(), mix));
    // The link's own runtime, so delaying chunks does not take the client's
    // workers (as in the drain section).
    let link_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-link")
        .enable_all()
        .build()
        .expect("link runtime");
    let link = link_rt
        .block_on(CountingProxy::with_link(server.running.addr(), LINK))
        .expect("link proxy");
    let rig = Rig { server, link };
    let mut plain = vec![Figures::default(); SETTINGS.len()];
    let mut faulty = vec![Figures::default(); FAULT_SETTINGS.len() * FAULT_RATES.len()];
    for run in 0..config.runs {
        eprintln!("reconnect: run {}/{}", run + 1, config.runs);
        let seed = 0x9e37_79b9_7f4a_7c15 ^ run as u64;
        for (i, &s) in SETTINGS.iter().enumerate() {
            let work = workload(mix, &format!("r{run}-s{i}"), seed);
            rt.block_on(measure(&rig, s, (0.0, 0), work, &mut plain[i]));
        }
        for (j, &si) in FAULT_SETTINGS.iter().enumerate() {
            for (k, &rate) in FAULT_RATES.iter().enumerate() {
                let work = workload(mix, &format!("r{run}-f{j}-{k}"), seed);
                rt.block_on(measure(
                    &rig,
                    SETTINGS[si],
                    (rate, 0x5eed + run as u64),
                    work,
                    &mut faulty[j * FAULT_RATES.len() + k],
                ));
            }
        }
    }
    let Rig { server, link } = rig;
    drop(link);
    drop(link_rt);
    server.stop();

    // The lowest bound of any setting: what the link allows this queue.
    let best_bound = plain
        .iter()
        .filter_map(|f| f.bound.median())
        .fold(f64::INFINITY, f64::min);
    let mut t = Table::new([
        "setting",
        "ops stored",
        "requests",
        "conns",
        "KiB up / down",
        "time to sync: median (min – max)",
        "bound",
        "vs its bound",
        "vs link's bound",
    ]);
    for (s, f) in SETTINGS.iter().zip(&plain) {
        let (lo, hi) = f.secs.range().unwrap_or_default();
        let name = if s.concurrency.is_none() && s.batch.is_none() {
            format!("{} ({})", s.name, describe(*s))
        } else {
            s.name.to_owned()
        };
        t.row([
            name,
            thousands(f.stored.median().unwrap_or_default()),
            thousands(f.requests.median().unwrap_or_default()),
            thousands(f.connections.median().unwrap_or_default()),
            format!("{} / {}", kib(&f.up), kib(&f.down)),
            format!("{} ({lo:.2} – {hi:.2})", secs(f.secs.median())),
            secs(f.bound.median()),
            ratio(f.secs.ratio_to(&f.bound)),
            ratio(f.secs.median().map(|m| m / best_bound)),
        ]);
    }
    let mut ft = Table::new([
        "setting",
        "faults",
        "time to sync: median (min – max)",
        "vs 0 %",
        "retries",
        "breaker trips: median (min – max)",
    ]);
    for (j, &si) in FAULT_SETTINGS.iter().enumerate() {
        let base = &plain[si];
        ft.row([
            SETTINGS[si].name.to_owned(),
            "0 %".to_owned(),
            {
                let (lo, hi) = base.secs.range().unwrap_or_default();
                format!("{} ({lo:.2} – {hi:.2})", secs(base.secs.median()))
            },
            "1.00×".to_owned(),
            thousands(base.retried.median().unwrap_or_default()),
            thousands(base.trips.median().unwrap_or_default()),
        ]);
        for (k, &rate) in FAULT_RATES.iter().enumerate() {
            let f = &faulty[j * FAULT_RATES.len() + k];
            let (lo, hi) = f.secs.range().unwrap_or_default();
            ft.row([
                SETTINGS[si].name.to_owned(),
                format!("{:.0} %", rate * 100.0),
                format!("{} ({lo:.2} – {hi:.2})", secs(f.secs.median())),
                ratio(f.secs.ratio_to(&base.secs)),
                thousands(f.retried.median().unwrap_or_default()),
                {
                    let (lo, hi) = f.trips.range().unwrap_or_default();
                    format!(
                        "{} ({lo:.0} – {hi:.0})",
                        thousands(f.trips.median().unwrap_or_default())
                    )
                },
            ]);
        }
    }
    let rtt_ms = (LINK.one_way * 2).as_secs_f64() * 1000.0;
    let mbit = LINK.bits_per_sec.unwrap_or_default() as f64 / 1e6;
    let mut body = format!(
        "{} ops queued offline ({} toggles of {} devices, {} edits of {} forms of ~1 KiB, {} \
         creates; coalesced to one op per entity, {} entities), drained by an engine given only \
         outbox, URL and token, through a {rtt_ms:.0} ms RTT, {mbit:.0} Mbit/s link (each way, \
         shared, no burst, TCP/IP headers not simulated) to the server on SQLite, timed to the \
         empty queue. Bound: the larger of the busier direction's bytes at the rate plus 2 RTT, \
         and the RTTs the settings need (1 + ⌈requests / in flight⌉; batches in flight: \
         min(c, {MAX_BATCHES_IN_FLIGHT})). Faults: seeded 503s on every request.\n\n",
        thousands(mix.total() as f64),
        thousands(mix.toggles as f64),
        thousands(mix.devices as f64),
        thousands(mix.edits as f64),
        thousands(mix.forms as f64),
        thousands(mix.creates as f64),
        thousands(mix.entities() as f64),
    );
    body.push_str(&t.to_markdown());
    body.push('\n');
    body.push_str(&ft.to_markdown());
    let d = &plain[0];
    let d_ratio = d.secs.ratio_to(&d.bound);
    let link_ratio = d.secs.median().map(|m| m / best_bound);
    let targets = vec![
        Target {
            scenario: "6",
            target: format!(
                "{} ops, {rtt_ms:.0} ms RTT, {mbit:.0} Mbit/s, defaults ≤ 2× the bound of its \
                 settings",
                thousands(mix.total() as f64)
            ),
            measured: format!("{} ({})", ratio(d_ratio), secs(d.secs.median())),
            met: d_ratio.is_some_and(|r| r <= 2.0),
            note: Some("A6"),
        },
        Target {
            scenario: "6",
            target: "the same ≤ 2× the link's bound".into(),
            measured: format!("{} (bound {})", ratio(link_ratio), secs(Some(best_bound))),
            met: link_ratio.is_some_and(|r| r <= 2.0),
            note: Some("A6"),
        },
    ];
    Section {
        title: "6. Time to sync after reconnect".into(),
        body,
        targets,
    }
}
