//! `gsync demo`: the whole engine under chaos, checked against a model.
//!
//! One command, no setup: the reference server starts in-process with faults
//! on; several simulated devices enqueue a seeded workload into their own
//! outbox files while `gsync run` child processes drain them; the server
//! goes offline for a few seconds and comes back; one runner is SIGKILLed
//! mid-drain and a new runner process takes its outbox over. Then the
//! server's applied log and final entities are checked against the model
//! (see [`verdict`]) and a verdict is printed. The exit status is 0 only if
//! no op was lost, none applied twice, every entity's ops took effect in
//! enqueue order, every entity ends as the model says and every scene (an
//! atomic transaction) took effect whole, never half.
//!
//! Timeline (one tick = 200 ms): ticks 0–39 enqueue the workload evenly;
//! the server is offline from tick 12 to tick 27; at tick 32 one device's
//! runner is killed while it has requests in flight; then the demo waits
//! until every outbox is empty, stops the runners (SIGINT, so they print
//! their telemetry) and checks.
//!
//! With `--dashboard`, a second server ([`server::Monitor`]) collects the
//! runners' telemetry and serves the page; it stays up through the outage.

mod devices;
mod model;
mod progress;
mod server;
mod verdict;
mod workload;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use guardian_server::RetryAfterForm;
use guardian_sync::op::OpState;
use guardian_sync::outbox::ListFilter;
use guardian_sync::transport::{
    Fetched, HttpTransport, HttpTransportConfig, StaticToken, Transport,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::Global;
use devices::{Device, EventCounts, RunnerMsg, RunnerProc, RunnerSpec};
use progress::{Live, Ui};
use server::{DemoServer, Monitor};
use verdict::Verdict;

/// Arguments of `gsync demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Simulated devices, each with its own outbox and runner process.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    devices: u16,
    /// Actions per device (creates, updates, deletes).
    #[arg(long, default_value_t = 200)]
    ops: usize,
    /// Probability of each server fault (503/429, dropped connections); forced
    /// conflicts happen at twice this rate (at most 10 %).
    #[arg(long, default_value_t = 0.03)]
    fault_rate: f64,
    /// Seed of the workload and of the server's faults: the same seed gives
    /// the same workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shared boards every device edits (its own field of each); conflicts
    /// between devices are resolved by the default LocalWins 3-way merge.
    #[arg(long, default_value_t = 3)]
    boards: usize,
    /// Keep the work directory (outboxes, server database, runner logs) and
    /// print its path.
    #[arg(long)]
    keep: bool,
    /// Serve the fleet dashboard (`/dashboard`) for the demo's devices while
    /// the demo runs, and print its URL. The runners report their health
    /// every second (a breaker change within 250 ms) to a second server, which
    /// serves the page and stays up through the outage.
    #[arg(long)]
    dashboard: bool,
}

const TICK: Duration = Duration::from_millis(200);
const TICKS: usize = 40;
const OFFLINE_AT: usize = 12;
const ONLINE_AT: usize = 27;
const KILL_AT: usize = 32;
/// How long the demo waits for the outboxes to drain after the last enqueue.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

#[allow(clippy::needless_pass_by_value)] // the dispatch in main hands every command its args
pub(crate) fn run(global: &Global, args: Args) -> anyhow::Result<()> {
    if !(0.0..=0.5).contains(&args.fault_rate) {
        anyhow::bail!("--fault-rate must be between 0 and 0.5");
    }
    if args.ops == 0 {
        anyhow::bail!("--ops must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let verdict = runtime.block_on(demo(&args))?;
    if global.json {
        println!("{}", serde_json::json!({ "verdict": verdict }));
    } else {
        print!("{}", verdict.table());
    }
    if let Some(dir) = &verdict.work_dir {
        eprintln!("work directory kept: {dir}");
        eprintln!("  inspect an outbox: gsync --outbox {dir}/device-0/outbox.db ops");
        eprintln!("  runner logs:       {dir}/runner-*.log");
    }
    if !verdict.passed {
        anyhow::bail!("the invariants did not hold (see the verdict above)");
    }
    Ok(())
}

/// The running demo.
struct Demo {
    devices: Vec<Device>,
    runners: Vec<RunnerProc>,
    /// Device → index of its current runner in `runners`.
    current: Vec<usize>,
    spec: RunnerSpec,
    tx: mpsc::UnboundedSender<RunnerMsg>,
    rx: mpsc::UnboundedReceiver<RunnerMsg>,
    ui: Ui,
    server: DemoServer,
    http: HttpTransport,
    phase: &'static str,
    problems: Vec<String>,
}

async fn demo(args: &Args) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("gsync-demo-")
        .tempdir()
        .context("cannot create a work directory")?;
    let token = uuid::Uuid::new_v4().to_string();
    let server = DemoServer::start(
        work.path().join("server.db"),
        token.clone(),
        server::faults(args.fault_rate, args.seed, RetryAfterForm::Seconds),
    )
    .await?;
    let monitor = if args.dashboard {
        Some(Monitor::start(&token, uuid::Uuid::new_v4().to_string()).await?)
    } else {
        None
    };
    if let Some(monitor) = &monitor {
        // Printed at once, before the run, so it can be opened while it runs.
        eprintln!("dashboard: {}", monitor.dashboard_url());
    }
    let http = HttpTransport::new(
        &HttpTransportConfig::new(server.url()),
        Arc::new(StaticToken::new(token.clone())),
    )?;
    let n = usize::from(args.devices);
    setup_boards(&server, &http, args.boards, n).await?;
    let mut devices = Vec::new();
    for d in 0..n {
        let device = Device::open(work.path(), d, args.seed, args.ops, args.boards, |b| {
            board_seed(b, n)
        })
        .await?;
        devices.push(device);
    }
    let spec = RunnerSpec {
        exe: std::env::current_exe().context("cannot find the gsync executable")?,
        url: server.url(),
        token,
        work: work.path().to_owned(),
        telemetry: monitor.as_ref().map(Monitor::url),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let ui = Ui::new(devices.len(), std::io::stderr().is_terminal());
    ui.note(&format!(
        "server on {} (faults: {:.0}% 503/429 with Retry-After, {:.0}% forced conflicts, {:.0}% dropped responses); {} devices in {}",
        server.url(),
        args.fault_rate * 100.0,
        (args.fault_rate * 2.0).min(server::MAX_CONFLICT_RATE) * 100.0,
        args.fault_rate * 150.0,
        devices.len(),
        work.path().display()
    ));
    let mut demo = Demo {
        devices,
        runners: Vec::new(),
        current: Vec::new(),
        spec,
        tx,
        rx,
        ui,
        server,
        http,
        phase: "enqueueing",
        problems: Vec::new(),
    };
    for d in 0..demo.devices.len() {
        let i = demo.spawn(d)?;
        demo.current.push(i);
    }
    let outcome = demo.play(args).await;
    let mut verdict = Verdict {
        seed: args.seed,
        devices: demo.devices.len(),
        ops_per_device: args.ops,
        fault_rate: args.fault_rate,
        ..Verdict::default()
    };
    match outcome {
        Ok(offline) => verdict.offline_ms = u64::try_from(offline.as_millis()).unwrap_or(0),
        Err(e) => demo.problems.push(format!("the demo stopped early: {e:#}")),
    }
    demo.stop_runners().await;
    demo.ui.finish();
    demo.check(&mut verdict).await;
    demo.server.shutdown().await;
    if let Some(monitor) = monitor {
        monitor.shutdown().await;
    }
    verdict.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if args.keep {
        verdict.work_dir = Some(work.keep().display().to_string());
    }
    verdict.decide();
    Ok(verdict)
}

impl Demo {
    fn spawn(&mut self, device: usize) -> anyhow::Result<usize> {
        let no = self.runners.len();
        let runner = RunnerProc::spawn(&self.spec, &self.devices[device], no, self.tx.clone())?;
        self.runners.push(runner);
        Ok(no)
    }

    fn live(&self) -> Live {
        let mut counts = EventCounts::default();
        for r in &self.runners {
            counts.add(&r.counts);
        }
        Live {
            online: self.server.online(),
            counts,
            phase: self.phase,
        }
    }

    /// Handles everything the runners printed so far; restarts a runner
    /// that exited on its own.
    fn pump(&mut self) -> anyhow::Result<()> {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                RunnerMsg::Line { runner, line } => self.on_line(runner, &line),
                RunnerMsg::Eof { runner } => {
                    if let Some(r) = self.runners.get_mut(runner) {
                        r.ended = true;
                    }
                }
            }
        }
        for d in 0..self.devices.len() {
            let r = &self.runners[self.current[d]];
            if r.ended && !r.killed && !r.stopping {
                let text = format!(
                    "runner {} of device {d} exited on its own (log: {}); starting another",
                    r.no,
                    r.log.display()
                );
                self.ui.note(&text);
                self.problems.push(text);
                self.current[d] = self.spawn(d)?;
            }
        }
        let live = self.live();
        self.ui.update(&self.devices, &live);
        Ok(())
    }

    fn on_line(&mut self, runner: usize, line: &str) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let Some(r) = self.runners.get_mut(runner) else {
            return;
        };
        let Some(event) = v.get("event").and_then(Value::as_str) else {
            if v.get("report").is_some() {
                r.report = Some(v);
            }
            return;
        };
        let model = &mut self.devices[r.device].model;
        let op_id = || {
            v.get("op_id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<uuid::Uuid>().ok())
        };
        match event {
            "op_succeeded" => {
                r.counts.succeeded += 1;
                if v.get("replayed").and_then(Value::as_bool) == Some(true) {
                    r.counts.replayed += 1;
                }
                if let Some(id) = op_id() {
                    model.on_applied(id, v.get("version").and_then(Value::as_u64));
                }
            }
            "op_retried" => r.counts.retried += 1,
            "transaction_committed" => r.counts.txns_committed += 1,
            "op_failed" => r.counts.failed += 1,
            "conflict" if v.get("resolution").and_then(Value::as_str) == Some("retry") => {
                r.counts.reconciled += 1;
                if let Some(id) = op_id() {
                    model.on_reconciled(id, v.get("resolved").cloned().unwrap_or(Value::Null));
                }
            }
            "conflict" if v.get("resolution").and_then(Value::as_str) == Some("succeeded") => {
                if let Some(id) = op_id() {
                    model.on_settled_by_conflict(id);
                }
            }
            "breaker" if v.get("to").and_then(Value::as_str) == Some("open") => {
                r.counts.breaker_opened += 1;
                if v.get("from").and_then(Value::as_str) == Some("closed") {
                    // With the runner's time of the event, so the moment a
                    // dashboard shows the trip can be compared with it.
                    let at = v.get("at").and_then(Value::as_i64).unwrap_or(0);
                    let text = format!(
                        "device {}: breaker tripped (runner {}, Unix ms {at})",
                        r.device, r.no
                    );
                    self.ui.note(&text);
                }
            }
            "lock_acquired" if v.get("took_over_from").is_some_and(|o| !o.is_null()) => {
                r.counts.takeovers += 1;
                let text = format!(
                    "runner {} took over device {}'s outbox lock at epoch {}",
                    r.no,
                    r.device,
                    v.get("epoch").and_then(Value::as_u64).unwrap_or(0)
                );
                self.ui.note(&text);
            }
            "lock_lost" => r.counts.lock_lost += 1,
            _ => {}
        }
    }

    /// Sleeps `d` while handling runner output.
    async fn idle(&mut self, d: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + d;
        loop {
            self.pump()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(left.min(Duration::from_millis(20))).await;
        }
    }

    /// The timeline; returns how long the server was offline.
    async fn play(&mut self, args: &Args) -> anyhow::Result<Duration> {
        let mut offline_since = None;
        let mut offline = Duration::ZERO;
        let start = Instant::now();
        for tick in 0..TICKS {
            if tick == OFFLINE_AT {
                self.server.go_offline().await;
                offline_since = Some(Instant::now());
                self.ui
                    .note("server OFFLINE: connections refused; devices keep enqueueing");
            }
            if tick == ONLINE_AT {
                let faults = server::faults(
                    args.fault_rate,
                    args.seed.wrapping_add(1),
                    RetryAfterForm::HttpDate,
                );
                self.server.come_back(faults).await?;
                offline = offline_since.map_or(Duration::ZERO, |s| s.elapsed());
                self.ui.note(&format!(
                    "server back online on the same port and database after {:.1} s (Retry-After now as an HTTP date)",
                    offline.as_secs_f64()
                ));
            }
            if tick == KILL_AT {
                self.kill_one(args.seed, tick).await?;
            }
            let enqueues = self.devices.iter_mut().map(|d| {
                let until = (d.actions.len() * (tick + 1)).div_ceil(TICKS);
                d.enqueue_until(until)
            });
            for r in futures::future::join_all(enqueues).await {
                r?;
            }
            // Acks seen since the last tick may have freed waiting board edits.
            for d in &mut self.devices {
                d.flush_boards().await?;
            }
            let next = start + TICK * u32::try_from(tick + 1).unwrap_or(u32::MAX);
            self.idle(next.saturating_duration_since(Instant::now()))
                .await?;
        }
        self.phase = "draining";
        self.ui
            .note("all actions enqueued; waiting for every outbox to drain");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            self.idle(Duration::from_millis(50)).await?;
            let mut left = 0;
            let mut boards_busy = false;
            for d in 0..self.devices.len() {
                self.devices[d].flush_boards().await?;
                let s = self.devices[d].stats().await?;
                left += s.pending + s.in_flight;
                if s.pending + s.in_flight == 0 && self.devices[d].model.boards_busy() {
                    // Everything this device queued was applied; a killed
                    // runner may have taken the last acks with it: read the
                    // boards again, as an app would, and send what waits.
                    self.refresh_boards(d).await?;
                    boards_busy = true;
                }
            }
            if left == 0 && !boards_busy {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{left} ops still queued after {} s",
                    DRAIN_TIMEOUT.as_secs()
                );
            }
        }
        self.phase = "checking";
        self.ui.note("every outbox is empty");
        Ok(offline)
    }

    /// SIGKILLs one device's runner while it has requests in flight, then
    /// starts another runner process on that outbox: it finds the OS lock
    /// free and takes the lock over at once (epoch + 1). The network is made
    /// slow (250 ms per request) for the moment, so the kill lands mid-request.
    async fn kill_one(&mut self, seed: u64, tick: usize) -> anyhow::Result<()> {
        let d = usize::try_from(seed).unwrap_or(0) % self.devices.len();
        self.server.set_latency(250)?;
        let device = &mut self.devices[d];
        let until = (device.actions.len() * (tick + 1)).div_ceil(TICKS);
        device.enqueue_until(until).await?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut in_flight = 0;
        while Instant::now() < deadline {
            let s = self.devices[d].stats().await?;
            if s.in_flight > 0 {
                in_flight = s.in_flight;
                break;
            }
            self.pump()?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let i = self.current[d];
        let pid = self.runners[i].pid.unwrap_or(0);
        self.runners[i].kill().await;
        self.server.set_latency(0)?;
        self.ui.note(&format!(
            "SIGKILLed runner {i} (pid {pid}) of device {d} with {in_flight} op(s) in flight"
        ));
        self.current[d] = self.spawn(d)?;
        Ok(())
    }

    /// Reads device `d`'s boards from the server (faults may fail a read:
    /// the drain loop simply tries again).
    async fn refresh_boards(&mut self, d: usize) -> anyhow::Result<()> {
        for b in self.devices[d].model.boards_to_refresh() {
            let id = workload::board_id(b);
            if let Ok(Fetched::Present(e)) = self.http.fetch(workload::BOARD_TYPE, &id).await {
                self.devices[d].model.board_refreshed(b, e.version, e.data);
            }
        }
        self.devices[d].flush_boards().await
    }

    /// SIGINTs every live runner and waits for their final reports.
    async fn stop_runners(&mut self) {
        for r in &mut self.runners {
            if !r.killed && !r.ended {
                r.interrupt();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.runners.iter().any(|r| !r.killed && !r.ended) && Instant::now() < deadline {
            if let Some(msg) = tokio::time::timeout(Duration::from_millis(100), self.rx.recv())
                .await
                .ok()
                .flatten()
            {
                match msg {
                    RunnerMsg::Line { runner, line } => self.on_line(runner, &line),
                    RunnerMsg::Eof { runner } => {
                        if let Some(r) = self.runners.get_mut(runner) {
                            r.ended = true;
                        }
                    }
                }
            }
        }
        for r in &mut self.runners {
            if !r.killed {
                r.reap(Duration::from_secs(5)).await;
                if r.report.is_none() {
                    self.problems.push(format!(
                        "runner {} printed no final report (log: {})",
                        r.no,
                        r.log.display()
                    ));
                }
            }
        }
        let live = self.live();
        self.ui.update(&self.devices, &live);
    }

    /// Fills the verdict: figures from the runners, then the checks.
    async fn check(&mut self, v: &mut Verdict) {
        let mut health_weighted = 0.0;
        let mut health_weight = 0.0;
        for r in &self.runners {
            v.takeovers += r.counts.takeovers;
            v.replayed += r.counts.replayed;
            if r.killed {
                v.runners_killed += 1;
            }
            let metric = |path: &[&str]| {
                let mut cur = r.metrics()?;
                for p in path {
                    cur = cur.get(p)?;
                }
                cur.as_f64()
            };
            if r.metrics().is_some() {
                let sent = metric(&["operations", "sent"]).unwrap_or(0.0);
                v.requests_sent += sent as u64;
                v.conflicts_resolved +=
                    metric(&["operations", "conflicts_resolved"]).unwrap_or(0.0) as u64;
                v.breaker_trips += metric(&["operations", "breaker_trips"]).unwrap_or(0.0) as u64;
                v.p95_latency_ms = v
                    .p95_latency_ms
                    .max(metric(&["latency", "p95_ms"]).unwrap_or(0.0));
                if sent > 0.0 {
                    health_weighted += sent * metric(&["health_score"]).unwrap_or(0.0);
                    health_weight += sent;
                }
            } else {
                // A killed runner's telemetry died with it: count what its
                // events told us.
                v.requests_sent += r.counts.answered();
                v.conflicts_resolved += r.counts.reconciled;
                v.breaker_trips += r.counts.breaker_opened;
            }
        }
        v.health_score = if health_weight > 0.0 {
            (health_weighted / health_weight).round().clamp(0.0, 100.0) as u8
        } else {
            0
        };
        for d in &self.devices {
            v.ops_enqueued += d.model.enqueued;
            v.ops_expected += d.model.expected_ops() as u64;
            match d.stats().await {
                Ok(s) => {
                    v.left_in_outboxes += s.pending + s.in_flight;
                    v.failed += s.failed;
                    if s.failed > 0 {
                        self.problems.push(format!(
                            "device {}: {} op(s) failed (inspect: gsync --outbox {} ops)",
                            d.index,
                            s.failed,
                            d.outbox_path.display()
                        ));
                        let filter = ListFilter {
                            state: Some(OpState::Failed),
                            limit: 3,
                            after_seq: 0,
                        };
                        for op in d.outbox.list(filter).await.unwrap_or_default() {
                            self.problems.push(format!(
                                "device {}: {} {}/{} failed: {}",
                                d.index,
                                op.kind.as_str(),
                                op.entity_type,
                                op.entity_id,
                                op.last_error.unwrap_or_default()
                            ));
                        }
                    }
                }
                Err(e) => self
                    .problems
                    .push(format!("device {}: cannot read the outbox: {e:#}", d.index)),
            }
        }
        v.coalesced_away = v.ops_enqueued.saturating_sub(v.ops_expected);
        for p in self.problems.drain(..) {
            v.problems.push(p);
        }
        if let Err(e) = self.check_server(v).await {
            v.problems
                .push(format!("cannot check the server's state: {e:#}"));
        }
    }

    async fn check_server(&self, v: &mut Verdict) -> anyhow::Result<()> {
        if !self.server.online() {
            anyhow::bail!("the server is offline");
        }
        self.server.calm()?;
        let log = self.server.applied_log().await?;
        let models: Vec<_> = self.devices.iter().map(|d| &d.model).collect();
        v.check_log(&models, &log);
        let mut wanted: Vec<(&str, String, model::Expected)> = self
            .devices
            .iter()
            .flat_map(|d| {
                d.model
                    .entities()
                    .map(|(t, id, _, expected)| (t, id.to_owned(), expected))
            })
            .collect();
        // Each board must hold every device's last value of its own field.
        let boards = self.devices.first().map_or(0, |d| d.model.boards.len());
        for b in 0..boards {
            let mut data = board_seed(b, self.devices.len());
            if let Value::Object(fields) = &mut data {
                for d in &self.devices {
                    fields.insert(
                        workload::board_field(d.index),
                        Value::from(d.model.boards[b].last),
                    );
                }
            }
            wanted.push((
                workload::BOARD_TYPE,
                workload::board_id(b),
                model::Expected::Live(data),
            ));
        }
        let fetched: Vec<_> = futures::stream::iter(wanted.iter())
            .map(|(t, id, _)| self.http.fetch(t, id))
            .buffered(16)
            .collect()
            .await;
        for ((t, id, expected), actual) in wanted.iter().zip(fetched) {
            match actual {
                Ok(actual) => v.check_state(t, id, expected, &actual),
                Err(outcome) => {
                    v.state_mismatches += 1;
                    v.problems
                        .push(format!("cannot read {t}/{id}: {outcome:?}"));
                }
            }
        }
        Ok(())
    }
}

/// The data a shared board starts with: a title and every device's field at 0.
fn board_seed(board: usize, devices: usize) -> Value {
    let mut fields = serde_json::Map::new();
    fields.insert("title".into(), Value::from(format!("shared board {board}")));
    for d in 0..devices {
        fields.insert(workload::board_field(d), Value::from(0));
    }
    Value::Object(fields)
}

/// Creates the shared boards (version 1) before the devices start, with
/// faults off for the moment.
async fn setup_boards(
    server: &DemoServer,
    http: &HttpTransport,
    boards: usize,
    devices: usize,
) -> anyhow::Result<()> {
    server.calm()?;
    for b in 0..boards {
        let request = guardian_sync::transport::OpRequest::new(
            guardian_protocol::MutationKind::Create,
            workload::BOARD_TYPE,
            workload::board_id(b),
            board_seed(b, devices),
            None,
            format!("{}{}", verdict::SETUP_KEY_PREFIX, workload::board_id(b)),
        );
        match http.send(&request).await {
            guardian_sync::transport::Outcome::Applied { .. } => {}
            other => anyhow::bail!("cannot create the shared boards: {other:?}"),
        }
    }
    server.set_latency(0)
}
