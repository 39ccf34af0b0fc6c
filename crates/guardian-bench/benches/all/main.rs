//! Every benchmark of issue 8 in one reproducible command:
//!
//! ```text
//! cargo bench -p guardian-bench
//! ```
//!
//! Runs each scenario `BENCH_RUNS` times (default 5), interleaving the sides
//! of every comparison inside each run, and writes `BENCHMARKS.md` at the
//! repository root with the machine, date, command, medians, and ratios
//! computed pair by pair within a run. Environment knobs (all optional):
//!
//! - `BENCH_RUNS=N`: runs per scenario.
//! - `BENCH_SMOKE=1`: tiny sizes, to check the harness (figures meaningless).
//! - `BENCH_ONLY=enqueue,drain,recovery,coalescing,reconnect`: a subset.
//! - `BENCH_RECOVERY_OPS=N`: pending ops for the recovery scenario (1,000,000).
//! - `BENCH_OUT=path`: where to write the report (default `BENCHMARKS.md`).
//! - `GSYNC_BIN=path`: a prebuilt `gsync` (otherwise built with cargo).
//! - `BENCH_DRAIN_PEROP=1` (with `BENCH_ONLY=drain`): only the loopback
//!   per-op rows, with CPU per op by thread; `ab-drain.sh` beside this
//!   crate's `Cargo.toml` alternates such runs of several binaries.
//! - `BENCH_DRAIN_PROFILE=engine|bare,1|16` (with `BENCH_ONLY=drain`): only
//!   that side, 10 times over 2,000 ops at that concurrency, each printing
//!   its wall-clock span (Unix seconds, as `perf record -k CLOCK_REALTIME`
//!   stamps samples; pass it to `perf report --time`) and its CPU split.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Benchmark arithmetic: counts and durations far below 2^52.
#![allow(clippy::cast_precision_loss)]

mod coalescing;
mod common;
mod doc;
mod drain;
mod enqueue;
mod reconnect;
mod recovery;

use common::Config;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let config = Config::from_env();
    eprintln!("guardian-bench: {config:?}");
    let started = doc::RunInfo::start(&config);
    let mut sections = Vec::new();
    if config.wants("enqueue") {
        sections.push(enqueue::run(&config));
    }
    if config.wants("drain") {
        sections.push(drain::run(&config));
    }
    if config.wants("recovery") {
        sections.push(recovery::run(&config));
    }
    if config.wants("coalescing") {
        sections.push(coalescing::run(&config));
    }
    sections.push(doc::telemetry_and_realtime());
    if config.wants("reconnect") {
        sections.push(reconnect::run(&config));
    }
    let text = doc::render(&config, &started.finish(), &sections);
    std::fs::write(&config.out, text).expect("write the report");
    eprintln!("guardian-bench: wrote {}", config.out.display());
}
