//! The deterministic simulator (see `tests/sim/mod.rs`): seeds of devices
//! draining through a faulty network to a simulated server, with the
//! invariants checked after every step.

mod simulator;
use simulator as sim;

/// `cargo test` runs this many seeds, in four parallel quarters;
/// `SIM_SEEDS=N` runs more.
const SEEDS: u64 = 1_000;

/// Runs quarter `q` of the seeds.
fn quarter(q: u64) {
    let seeds = sim::seed_count(SEEDS);
    let first = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let per = seeds.div_ceil(4);
    let start = first + q * per;
    let count = per.min((first + seeds).saturating_sub(start));
    match sim::run_seeds(start, count) {
        Ok(stats) => println!("{count} seeds from {start}: {stats:?}"),
        Err(v) => panic!("{v}"),
    }
}

#[test]
fn seeds_first_quarter() {
    quarter(0);
}

#[test]
fn seeds_second_quarter() {
    quarter(1);
}

#[test]
fn seeds_third_quarter() {
    quarter(2);
}

#[test]
fn seeds_fourth_quarter() {
    quarter(3);
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
