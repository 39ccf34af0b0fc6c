//! What every scenario shares: configuration, runtimes, the reference
//! server, and the shape of a report section.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use guardian_server::{RunningServer, ServerBuilder};
use guardian_sync::transport::{StaticToken, TokenProvider};

pub(crate) const TOKEN: &str = "bench-token";
pub(crate) const TENANT: &str = "bench";

/// See [`Config::near_runs`].
pub(crate) const NEAR_FACTOR: usize = 4;

/// Sizes and switches read from the environment.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) runs: usize,
    pub(crate) smoke: bool,
    only: Option<Vec<String>>,
    pub(crate) recovery_ops: usize,
    pub(crate) out: PathBuf,
    pub(crate) workspace: PathBuf,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Config {
    pub(crate) fn from_env() -> Self {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .expect("workspace root");
        let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| v != "0");
        Self {
            runs: env_usize("BENCH_RUNS")
                .unwrap_or(if smoke { 2 } else { 5 })
                .max(1),
            smoke,
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect()),
            recovery_ops: env_usize("BENCH_RECOVERY_OPS").unwrap_or(if smoke {
                20_000
            } else {
                1_000_000
            }),
            out: std::env::var("BENCH_OUT")
                .map_or_else(|_| workspace.join("BENCHMARKS.md"), PathBuf::from),
            workspace,
        }
    }

    /// Runs of the rows that sit near their target (§1's steady rows, §2's
    /// per-op rows over loopback): one run of them swings by ±0.1, so they
    /// get [`NEAR_FACTOR`] times as many runs as the rest.
    pub(crate) fn near_runs(&self) -> usize {
        self.runs * NEAR_FACTOR
    }

    pub(crate) fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }

    /// `full` normally, `smoke` with `BENCH_SMOKE`.
    pub(crate) fn size(&self, full: usize, smoke: usize) -> usize {
        if self.smoke {
            smoke
        } else {
            full
        }
    }
}

/// One target of the issue, with what was measured.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) scenario: &'static str,
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
    /// The entry of the hand-written analysis (`analysis.md`) that explains
    /// a miss, e.g. `"A1"`; several targets may share one.
    pub(crate) note: Option<&'static str>,
}

/// A section of the report.
#[derive(Debug, Clone, Default)]
pub(crate) struct Section {
    pub(crate) title: String,
    pub(crate) body: String,
    pub(crate) targets: Vec<Target>,
}

/// The client runtime: two workers, like the machine's two cores.
pub(crate) fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime")
}

/// The reference server on its own runtime (so client and server tasks do
/// not share workers), faults off, in memory.
pub(crate) struct Server {
    pub(crate) running: RunningServer,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    pub(crate) fn start() -> Self {
        Self::start_with(ServerBuilder::in_memory)
    }

    /// Like [`Server::start`], with `storage` choosing where data lives
    /// (e.g. a SQLite file instead of memory).
    pub(crate) fn start_with(storage: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-server")
            .enable_all()
            .build()
            .expect("server runtime");
        let running = runtime
            .block_on(
                storage(ServerBuilder::new().token(TENANT, TOKEN))
                    .concurrency_limit(1024)
                    .bind("127.0.0.1:0"),
            )
            .expect("bind the reference server");
        Self { running, runtime }
    }

    pub(crate) fn url(&self) -> String {
        self.running.url()
    }

    /// HTTP requests the server has answered, from its Prometheus text.
    pub(crate) fn requests(&self) -> u64 {
        guardian_bench::prom::sum(&self.running.metrics_text(), "guardian_http_requests_total")
    }

    pub(crate) fn stop(self) {
        let Self { running, runtime } = self;
        runtime.block_on(running.shutdown());
    }
}

pub(crate) fn tokens() -> Arc<dyn TokenProvider> {
    Arc::new(StaticToken::new(TOKEN))
}

/// A scratch directory on the same disk the app's outbox would use (the
/// system temp dir; never tmpfs here: fsync must mean something).
pub(crate) fn scratch(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var("BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .expect("scratch dir")
}

/// ops/s from a count and a duration.
pub(crate) fn rate(n: usize, elapsed: std::time::Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}
