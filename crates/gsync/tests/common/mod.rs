//! Shared helpers of the chaos suite: the in-process reference server, `gsync
//! run` child processes with their JSON event stream, a workload that records
//! what it enqueued, and the checker of the six invariants of DESIGN §11.
//!
//! Every wait here is a wait *for something* (an event line, an exit, an
//! applied-log entry) with a deadline; nothing sleeps for a fixed time to let
//! a condition become true.
#![allow(dead_code, unreachable_pub, missing_debug_implementations)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guardian_protocol::MutationKind;
use guardian_server::{AppliedMutation, Faults, RunningServer, ServerBuilder};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use guardian_sync::transport::{
    Fetched, HttpTransport, HttpTransportConfig, StaticToken, Transport,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::watch;
use uuid::Uuid;

/// Tenant and bearer token of every chaos server.
pub const TENANT: &str = "chaos";
pub const TOKEN: &str = "chaos-token";
/// Entity type of every workload op.
pub const TYPE: &str = "item";

/// Iterations of the loops of the suite: `GSYNC_CHAOS_ITERATIONS` or `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("GSYNC_CHAOS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed of a randomised test: `GSYNC_CHAOS_SEED` or a fresh one, printed
/// so that a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("GSYNC_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: GSYNC_CHAOS_SEED={seed}");
    seed
}

/// An in-memory reference server on a free loopback port.
pub async fn server(faults: Faults) -> RunningServer {
    ServerBuilder::new()
        .token(TENANT, TOKEN)
        .in_memory()
        .faults(faults)
        .bind("127.0.0.1:0")
        .await
        .expect("cannot start the reference server")
}

/// A reference server on a database file, bound to `addr` (to restart it on
/// the same port after a partition).
pub async fn server_on(db: &Path, addr: &str, faults: Faults) -> RunningServer {
    ServerBuilder::new()
        .token(TENANT, TOKEN)
        .database(db)
        .faults(faults)
        .bind(addr)
        .await
        .expect("cannot start the reference server")
}

/// Fails the test with a clear message when an external tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this chaos test needs `{tool}` (Debian package `{package}`): \
         run `apt-get install -y {package}` (.ci/run installs it)"
    );
}

/// How to start a runner.
#[derive(Debug, Clone)]
pub struct RunnerOpts {
    pub heartbeat: String,
    pub stale_after: String,
    pub once: bool,
    pub concurrency: usize,
    pub batch: usize,
    /// Command and arguments to run `gsync` under (e.g. `faketime -f +2h`).
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
    /// More `gsync run` arguments.
    pub extra: Vec<String>,
}

impl Default for RunnerOpts {
    fn default() -> Self {
        Self {
            heartbeat: "1s".into(),
            stale_after: "60s".into(),
            once: true,
            concurrency: 4,
            batch: 0,
            wrapper: Vec::new(),
            env: Vec::new(),
            extra: Vec::new(),
        }
    }
}

impl RunnerOpts {
    /// Adds `gsync run` arguments.
    #[must_use]
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn stale(heartbeat: &str, stale_after: &str) -> Self {
        Self {
            heartbeat: heartbeat.into(),
            stale_after: stale_after.into(),
            ..Self::default()
        }
    }
}

/// A `gsync run --events` child process and everything it printed.
pub struct Runner {
    pub label: String,
    pub pid: i32,
    pub started: Instant,
    child: tokio::process::Child,
    events: Arc<Mutex<Vec<Value>>>,
    changed: watch::Receiver<usize>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Runner {
    /// Starts `gsync --outbox OUTBOX run --server URL --events ...`.
    pub fn spawn(label: &str, outbox: &Path, url: &str, opts: &RunnerOpts) -> Self {
        let bin = env!("CARGO_BIN_EXE_gsync");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        cmd.arg("--outbox")
            .arg(outbox)
            .args(["run", "--server", url, "--events"])
            .args(["--heartbeat", &opts.heartbeat])
            .args(["--stale-after", &opts.stale_after])
            .args(["--concurrency", &opts.concurrency.to_string()])
            .args(["--batch", &opts.batch.to_string()])
            .env("GSYNC_TOKEN", TOKEN)
            .env("RUST_LOG", "error")
            .env("NO_COLOR", "1")
            .env_remove("GSYNC_OUTBOX")
            .env_remove("GSYNC_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if opts.once {
            cmd.arg("--once");
        }
        cmd.args(&opts.extra);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start gsync run");
        let pid = i32::try_from(child.id().expect("child has a pid")).expect("pid fits i32");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, changed) = watch::channel(0usize);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let ev = events.clone();
        let out_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| json!({ "event": "raw", "line": line }));
                let n = {
                    let mut all = ev.lock().unwrap();
                    all.push(value);
                    all.len()
                };
                tx.send_replace(n);
            }
            // Dropping `tx` tells waiters the stream ended.
        });
        let se = stderr.clone();
        let err_reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err_pipe.read_to_end(&mut buf).await;
            se.lock().unwrap().push_str(&String::from_utf8_lossy(&buf));
        });
        Self {
            label: label.to_owned(),
            pid,
            started: Instant::now(),
            child,
            events,
            changed,
            stderr,
            readers: vec![out_reader, err_reader],
            status: None,
        }
    }

    /// Every event line so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Number of event lines so far.
    pub fn event_count(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Events named `name` so far.
    pub fn named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// What the child wrote on stderr (complete once it exited).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until an event satisfies `pred`; `None` at the deadline or when
    /// the child closed its stdout first.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                // Stream closed: one last look, then give up.
                Ok(Err(_)) => {
                    return self
                        .events
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|e| pred(e))
                        .cloned();
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until more than `n` events were printed; false at the deadline.
    pub async fn wait_more(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.event_count() > n {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.event_count() > n,
            }
        }
    }

    /// Waits for the `n`-th event named `name`.
    pub async fn wait_named(&mut self, name: &str, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.named(name).len() >= n {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return self.named(name).len() >= n,
                Err(_) => return false,
            }
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("cannot signal the runner");
    }

    /// Waits for the child to exit and for its output to be read completely.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(s) => s.expect("wait for runner"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "runner {} did not exit within {timeout:?}; events: {:?}; stderr: {}",
                    self.label,
                    self.events(),
                    self.stderr()
                );
            }
        };
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        self.status = Some(status);
        status
    }

    /// Whether the child is still running (not exited, not reaped).
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> ExitStatus {
        // The child may have exited on its own in the meantime: fine.
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// Waits for a successful exit, failing with the child's output otherwise.
    pub async fn expect_success(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout).await;
        assert!(
            status.success(),
            "runner {} failed ({status}); stderr: {}; events: {:?}",
            self.label,
            self.stderr(),
            self.events()
        );
        assert_no_panic(&self.stderr());
    }

    /// Peak resident set size in KiB (VmHWM), while the child is alive.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.pid)
    }

    /// Epochs of this runner's `lock_acquired` events.
    pub fn acquired_epochs(&self) -> Vec<u64> {
        self.named("lock_acquired")
            .iter()
            .filter_map(|e| e["epoch"].as_u64())
            .collect()
    }

    /// Owners this runner took the lock over from.
    pub fn takeovers(&self) -> Vec<String> {
        self.named("lock_acquired")
            .iter()
            .filter_map(|e| e["took_over_from"].as_str().map(str::to_owned))
            .collect()
    }

    /// Events that report an outbox write (see [`WRITE_EVENTS`]).
    pub fn writes(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| WRITE_EVENTS.iter().any(|w| e["event"] == *w))
            .collect()
    }

    /// Op ids this runner reported as applied.
    pub fn succeeded_ops(&self) -> Vec<String> {
        self.named("op_succeeded")
            .iter()
            .filter_map(|e| e["op_id"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Events that mean the runner wrote an op outcome into the outbox (each is
/// emitted only after its fenced write committed).
pub const WRITE_EVENTS: &[&str] = &["op_succeeded", "op_failed", "op_retried", "conflict"];

/// VmHWM of a live process, KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A panic or backtrace on stderr is a bug whatever the exit status.
pub fn assert_no_panic(stderr: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "the process panicked: {stderr}"
    );
}

/// Polls the server's applied log until `pred` holds (deadline `timeout`).
pub async fn wait_applied(
    server: &RunningServer,
    timeout: Duration,
    pred: impl Fn(&[AppliedMutation]) -> bool,
) -> Vec<AppliedMutation> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = server.applied_log().await.expect("applied log");
        if pred(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "applied log condition not met within {timeout:?} ({} entries)",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A plain counter of the server's Prometheus text (0 when absent).
pub fn metric(server: &RunningServer, name: &str) -> u64 {
    server
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// One op the workload enqueued, and what it must do on the server.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Position in enqueue order.
    pub index: usize,
    pub op_id: Uuid,
    pub key: Uuid,
    pub entity_id: String,
    pub kind: MutationKind,
    /// Data after this op (`Null` for a delete).
    pub data: Value,
}

/// A workload: enqueues ops through its own handle on the outbox (coalescing
/// off, so every op must reach the server under its own key) and remembers
/// every acknowledged-durable op.
pub struct Workload {
    pub path: PathBuf,
    pub outbox: Outbox,
    pub ops: Vec<Planned>,
    live: Vec<String>,
    next_entity: usize,
    prefix: String,
}

impl Workload {
    pub async fn open(path: &Path, prefix: &str) -> Self {
        let (outbox, _) = Outbox::open(path, OutboxOptions::default().coalesce(false))
            .await
            .expect("open the outbox");
        Self {
            path: path.to_owned(),
            outbox,
            ops: Vec::new(),
            live: Vec::new(),
            next_entity: 0,
            prefix: prefix.to_owned(),
        }
    }

    async fn push(&mut self, op: NewOp, kind: MutationKind, data: Value) {
        let entity_id = op.entity_id.clone();
        let done = self.outbox.enqueue(op).await.expect("enqueue");
        assert!(done.coalesced.is_none(), "coalescing is off");
        let index = self.ops.len();
        self.ops.push(Planned {
            index,
            op_id: done.op_id,
            key: done.idempotency_key,
            entity_id,
            kind,
            data,
        });
    }

    /// Creates a new entity; returns its id.
    pub async fn create(&mut self) -> String {
        let id = format!("{}-{}", self.prefix, self.next_entity);
        self.next_entity += 1;
        let data = json!({ "n": self.ops.len(), "v": 0 });
        self.push(
            NewOp::create(TYPE, &id, data.clone()),
            MutationKind::Create,
            data,
        )
        .await;
        self.live.push(id.clone());
        id
    }

    /// Updates an entity (unconditionally or chained on its queued predecessor).
    pub async fn update(&mut self, id: &str) {
        let data = json!({ "n": self.ops.len(), "text": format!("edit {}", self.ops.len()) });
        self.push(
            NewOp::update(TYPE, id, data.clone()),
            MutationKind::Update,
            data,
        )
        .await;
    }

    /// Deletes an entity; it is not touched again.
    pub async fn delete(&mut self, id: &str) {
        self.push(NewOp::delete(TYPE, id), MutationKind::Delete, Value::Null)
            .await;
        self.live.retain(|l| l != id);
    }

    /// `n` random ops over a small pool of entities: creates, mostly updates,
    /// a few deletes.
    pub async fn random_ops(&mut self, rng: &mut impl Rng, n: usize) {
        for _ in 0..n {
            let roll: f64 = rng.random();
            if self.live.len() < 3 || roll < 0.15 {
                self.create().await;
            } else if roll < 0.22 {
                let id = self.live[rng.random_range(0..self.live.len())].clone();
                self.delete(&id).await;
            } else {
                let id = self.live[rng.random_range(0..self.live.len())].clone();
                self.update(&id).await;
            }
        }
    }

    /// Creates `entities` entities and `updates` updates of each.
    pub async fn simple(&mut self, entities: usize, updates: usize) {
        let mut ids = Vec::new();
        for _ in 0..entities {
            ids.push(self.create().await);
        }
        for _ in 0..updates {
            for id in &ids {
                self.update(id).await;
            }
        }
    }

    /// The last op of each entity.
    pub fn expected_state(&self) -> HashMap<String, &Planned> {
        let mut last = HashMap::new();
        for op in &self.ops {
            last.insert(op.entity_id.clone(), op);
        }
        last
    }
}

/// What [`check_invariants`] found (for the test's own extra assertions).
#[derive(Debug)]
pub struct Verdict {
    pub applied: usize,
    pub entities: usize,
}

/// Checks DESIGN §11 against the server after a complete drain:
/// 1. nothing acknowledged-durable lost: every enqueued op's key is in the
///    applied log and the outbox holds nothing pending, in flight or failed;
/// 2. no op took effect twice: every key appears at most once;
/// 3. per-entity order: each entity's applied entries follow enqueue order
///    with increasing versions;
/// 4. (together with 2) no stray write: the log holds only our keys;
/// 5. the final server state equals the sequential application of all ops;
/// 6. the outbox passes its integrity check.
pub async fn check_invariants(server: &RunningServer, workload: &Workload) -> Verdict {
    let stats = workload.outbox.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.in_flight, stats.failed),
        (0, 0, 0),
        "the outbox is not drained: {stats:?}"
    );
    let log: Vec<AppliedMutation> = server
        .applied_log()
        .await
        .expect("applied log")
        .into_iter()
        .filter(|m| m.tenant == TENANT)
        .collect();
    let by_key: HashMap<String, &Planned> = workload
        .ops
        .iter()
        .map(|p| (p.key.to_string(), p))
        .collect();
    let mut seen = HashSet::new();
    for m in &log {
        assert!(
            seen.insert(m.idempotency_key.clone()),
            "invariant 2: key {} applied twice",
            m.idempotency_key
        );
        let planned = by_key
            .get(&m.idempotency_key)
            .unwrap_or_else(|| panic!("stray write under unknown key: {m:?}"));
        assert_eq!(
            (&planned.entity_id, planned.kind),
            (&m.id, m.op),
            "key applied to the wrong entity or kind"
        );
    }
    for p in &workload.ops {
        assert!(
            seen.contains(&p.key.to_string()),
            "invariant 1: op {} #{} ({:?} {}) was never applied",
            p.op_id,
            p.index,
            p.kind,
            p.entity_id
        );
    }
    // Per-entity order.
    let mut last: HashMap<&str, (usize, u64)> = HashMap::new();
    for m in &log {
        let planned = by_key[&m.idempotency_key];
        if let Some((index, version)) = last.get(m.id.as_str()) {
            assert!(
                planned.index > *index && m.version > *version,
                "invariant 3: {} applied op #{} (v{}) after op #{index} (v{version})",
                m.id,
                planned.index,
                m.version
            );
        }
        last.insert(&m.id, (planned.index, m.version));
    }
    // Final state.
    let transport = HttpTransport::new(
        &HttpTransportConfig::new(server.url()),
        Arc::new(StaticToken::new(TOKEN)),
    )
    .expect("transport");
    let expected = workload.expected_state();
    for (id, op) in &expected {
        let got = transport.fetch(TYPE, id).await;
        match (op.kind, got) {
            (MutationKind::Delete, Ok(Fetched::Deleted | Fetched::Absent)) => {}
            (MutationKind::Delete, Ok(Fetched::Present(e))) if e.deleted => {}
            (_, Ok(Fetched::Present(e))) if !e.deleted => {
                assert_eq!(e.data, op.data, "final state of {id}");
            }
            (_, other) => panic!("final state of {id}: expected {op:?}, got {other:?}"),
        }
    }
    let check = workload.outbox.check().await.expect("integrity check");
    assert!(check.ok, "outbox integrity: {check:?}");
    Verdict {
        applied: log.len(),
        entities: expected.len(),
    }
}

/// Drains what is left with one clean runner (used at the end of a chaos loop).
pub async fn final_drain(outbox: &Path, url: &str) -> Runner {
    let mut r = Runner::spawn("final", outbox, url, &RunnerOpts::default());
    r.expect_success(Duration::from_secs(90)).await;
    r
}
