//! The deterministic simulator (see `tests/sim/mod.rs`): seeds of devices
//! draining through a faulty network to a simulated server, with the
//! invariants checked after every step.

mod simulator;
use simulator as sim;

/// `cargo test` runs this many seeds; `SIM_SEEDS=N` runs more.
const SEEDS: u64 = 1_000;

#[test]
fn seeds_hold_every_invariant() {
    let seeds = sim::seed_count(SEEDS);
    let first = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match sim::run_seeds(first, seeds) {
        Ok(stats) => println!("{seeds} seeds from {first}: {stats:?}"),
        Err(v) => panic!("{v}"),
    }
}

/// Replays one seed: `SIM_SEED=N cargo test -p guardian-sync --test sim -- replay`.
#[test]
fn replay() {
    let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|v| v.parse().ok()) else {
        return;
    };
    match sim::Sim::new(seed).run() {
        Ok(stats) => println!("seed {seed}: {stats:?}"),
        Err(v) => panic!("{v}"),
    }
}
