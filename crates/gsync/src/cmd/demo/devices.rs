//! Simulated devices: an outbox file each, the seeded actions, the model, and
//! the `gsync run` child processes that drain the outbox.
//!
//! The demo process is the device's app: it enqueues into the outbox file
//! directly. The runner is a separate process, as on a phone where a
//! background task drains the queue: it prints engine events as JSON lines
//! (`--events`) and a final report with its telemetry (`--json`) when it is
//! interrupted. The demo reads both from the child's stdout.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use guardian_sync::outbox::{Outbox, OutboxOptions, Stats};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedSender;

use super::model::DeviceModel;
use super::workload::{self, Step};

/// One simulated device.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) index: usize,
    pub(crate) outbox_path: PathBuf,
    pub(crate) outbox: Outbox,
    pub(crate) actions: Vec<Step>,
    /// Actions enqueued so far.
    pub(crate) next: usize,
    pub(crate) model: DeviceModel,
}

impl Device {
    /// Creates the device's directory (mode 0700) and opens its outbox.
    pub(crate) async fn open(
        work: &Path,
        index: usize,
        seed: u64,
        ops: usize,
        boards: usize,
        board_seed: impl Fn(usize) -> serde_json::Value,
    ) -> anyhow::Result<Self> {
        let dir = work.join(format!("device-{index}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let outbox_path = dir.join("outbox.db");
        let (outbox, _) = Outbox::open(&outbox_path, OutboxOptions::default())
            .await
            .with_context(|| format!("cannot open {}", outbox_path.display()))?;
        Ok(Self {
            index,
            outbox_path,
            outbox,
            actions: workload::generate(seed, index, ops, boards),
            next: 0,
            model: DeviceModel::new(index, boards, board_seed),
        })
    }

    /// Enqueues actions up to (not including) `until`, one at a time, as the
    /// user makes them (a scene as one transaction); each is durable when
    /// its enqueue returns.
    pub(crate) async fn enqueue_until(&mut self, until: usize) -> anyhow::Result<()> {
        while self.next < until.min(self.actions.len()) {
            match &self.actions[self.next] {
                Step::Task(action) => {
                    let op = self.model.new_op(action);
                    let enqueued = self
                        .outbox
                        .enqueue(op)
                        .await
                        .with_context(|| format!("device {} cannot enqueue", self.index))?;
                    self.model.record(action, &enqueued);
                }
                &Step::Board { board, value } => {
                    self.model.board_edit(board, value);
                }
                Step::Scene(changes) => {
                    // One commit for all of it: the runner sends it as one
                    // unit and the server applies all of it or nothing.
                    let ops = self.model.txn_ops(changes);
                    let enqueued = self
                        .outbox
                        .enqueue_transaction(ops)
                        .await
                        .with_context(|| format!("device {} cannot enqueue a scene", self.index))?;
                    self.model.record_txn(changes, &enqueued);
                }
            }
            self.next += 1;
        }
        self.flush_boards().await
    }

    /// Enqueues the waiting board edits that can go now.
    pub(crate) async fn flush_boards(&mut self) -> anyhow::Result<()> {
        for board in 0..self.model.boards.len() {
            if let Some(op) = self.model.board_op(board) {
                let payload = op.payload.clone();
                let enqueued = self
                    .outbox
                    .enqueue(op)
                    .await
                    .with_context(|| format!("device {} cannot enqueue", self.index))?;
                self.model.record_board(board, payload, &enqueued);
            }
        }
        Ok(())
    }

    pub(crate) async fn stats(&self) -> anyhow::Result<Stats> {
        Ok(self.outbox.stats().await?)
    }
}

/// A line (or the end) of a runner's stdout.
#[derive(Debug)]
pub(crate) enum RunnerMsg {
    Line { runner: usize, line: String },
    Eof { runner: usize },
}

/// What a runner process reported through its events.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EventCounts {
    pub(crate) succeeded: u64,
    pub(crate) replayed: u64,
    pub(crate) retried: u64,
    pub(crate) failed: u64,
    pub(crate) reconciled: u64,
    /// Transactions reported committed (replays included).
    pub(crate) txns_committed: u64,
    pub(crate) breaker_opened: u64,
    pub(crate) takeovers: u64,
    pub(crate) lock_lost: u64,
}

impl EventCounts {
    pub(crate) fn add(&mut self, o: &Self) {
        self.succeeded += o.succeeded;
        self.replayed += o.replayed;
        self.retried += o.retried;
        self.failed += o.failed;
        self.reconciled += o.reconciled;
        self.txns_committed += o.txns_committed;
        self.breaker_opened += o.breaker_opened;
        self.takeovers += o.takeovers;
        self.lock_lost += o.lock_lost;
    }

    /// Requests whose outcome the runner reported (a lower bound of the
    /// requests it sent: a killed runner's last requests are not reported).
    pub(crate) fn answered(&self) -> u64 {
        self.succeeded + self.retried + self.failed + self.reconciled
    }
}

/// How runners are started.
#[derive(Debug, Clone)]
pub(crate) struct RunnerSpec {
    pub(crate) exe: PathBuf,
    pub(crate) url: String,
    pub(crate) token: String,
    pub(crate) work: PathBuf,
    /// Where runners send telemetry (the dashboard's server); none without
    /// `--dashboard`.
    pub(crate) telemetry: Option<String>,
}

/// One `gsync run` child process.
#[derive(Debug)]
pub(crate) struct RunnerProc {
    pub(crate) no: usize,
    pub(crate) device: usize,
    child: Child,
    pub(crate) pid: Option<u32>,
    /// We SIGKILLed it.
    pub(crate) killed: bool,
    /// We asked it to stop (SIGINT).
    pub(crate) stopping: bool,
    /// Its stdout ended.
    pub(crate) ended: bool,
    /// Its final `{"report", "metrics"}` JSON.
    pub(crate) report: Option<Value>,
    pub(crate) counts: EventCounts,
    pub(crate) log: PathBuf,
}

impl RunnerProc {
    /// Starts `gsync --outbox <device outbox> --json run --events ...`.
    pub(crate) fn spawn(
        spec: &RunnerSpec,
        device: &Device,
        no: usize,
        tx: UnboundedSender<RunnerMsg>,
    ) -> anyhow::Result<Self> {
        let log = spec
            .work
            .join(format!("runner-{no}-device-{}.log", device.index));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&spec.exe);
        command
            .arg("--outbox")
            .arg(&device.outbox_path)
            .arg("--json")
            .arg("run")
            .args(["--server", &spec.url, "--events"])
            // Quick heartbeats: an idle runner notices enqueues from the
            // app's process within one beat.
            .args(["--heartbeat", "200ms", "--stale-after", "5s"])
            // Demo-sized backoff and breaker, so outages cost seconds, not
            // minutes; a generous attempt budget, so the chaos never makes
            // an op fail permanently.
            .args(["--retry-base", "100ms", "--retry-cap", "2s"])
            .args(["--max-attempts", "200"])
            .args(["--breaker-threshold", "8", "--breaker-window", "5s"])
            .args(["--breaker-cooldown", "1s"])
            // Every device edits the shared boards: under heavy faults a
            // board edit can lose the race to another device many times.
            .args(["--max-reconciliations", "50"]);
        match &spec.telemetry {
            // Labels name the device and the runner process on the page;
            // a snapshot a second, so the charts move.
            Some(url) => command
                .args(["--telemetry-url", url, "--telemetry-interval", "1s"])
                .args(["--label", "app=gsync-demo"])
                .arg("--label")
                .arg(format!("device=device-{}", device.index))
                .arg("--label")
                .arg(format!("runner={no}")),
            None => command.arg("--no-telemetry"),
        };
        let mut child = command
            .env("GSYNC_TOKEN", &spec.token)
            .env_remove("GSYNC_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", spec.exe.display()))?;
        let pid = child.id();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(RunnerMsg::Line { runner: no, line }).is_err() {
                        return;
                    }
                }
                let _ = tx.send(RunnerMsg::Eof { runner: no });
            });
        }
        Ok(Self {
            no,
            device: device.index,
            child,
            pid,
            killed: false,
            stopping: false,
            ended: false,
            report: None,
            counts: EventCounts::default(),
            log,
        })
    }

    /// SIGKILL, and wait until the process is gone (its OS lock with it).
    pub(crate) async fn kill(&mut self) {
        self.killed = true;
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGINT: the runner stops gracefully and prints its final report.
    pub(crate) fn interrupt(&mut self) {
        self.stopping = true;
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
    }

    /// Waits for the exit (after [`Self::interrupt`]); kills it if needed.
    pub(crate) async fn reap(&mut self, patience: std::time::Duration) {
        if tokio::time::timeout(patience, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("runner {} did not stop; killing it", self.no);
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }

    /// The runner's telemetry summary from its final report.
    pub(crate) fn metrics(&self) -> Option<&Value> {
        self.report.as_ref().and_then(|r| r.get("metrics"))
    }
}
