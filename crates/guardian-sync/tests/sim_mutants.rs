//! The simulator has teeth: each deliberately broken variant of the engine
//! (`core::mutant`, built only with the `mutants` feature) is caught within
//! the seeds CI runs.
//!
//! `cargo test -p guardian-sync --features mutants --test sim_mutants`

mod simulator;
use simulator as sim;

use std::sync::Mutex;

use guardian_sync::core::mutant::{self, Mutant};

/// A mutant is switched on for the whole process: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs seeds with `m` on until one breaks an invariant; returns it.
fn caught(m: Mutant) -> sim::Violation {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    mutant::set(Some(m));
    let result = sim::run_seeds(0, sim::seed_count(1_000));
    mutant::set(None);
    match result {
        Err(v) => {
            println!("{m:?} caught: {v}");
            v
        }
        Ok(stats) => panic!("{m:?} was not caught in {stats:?}"),
    }
}

#[test]
fn skipping_the_fence_check_is_caught() {
    let v = caught(Mutant::SkipFence);
    assert!(v.what.contains("stale fence"), "{v}");
}

#[test]
fn a_new_key_on_retry_is_caught() {
    let v = caught(Mutant::NewKeyOnRetry);
    assert!(v.what.contains("applied twice"), "{v}");
}

#[test]
fn acking_before_the_response_is_caught() {
    let v = caught(Mutant::AckBeforeResponse);
    assert!(v.what.contains("never applied"), "{v}");
}

#[test]
fn dropping_the_head_rule_is_caught() {
    let v = caught(Mutant::NoHeadRule);
    assert!(v.what.contains("order broken"), "{v}");
}

#[test]
fn parking_on_a_future_clock_is_caught() {
    let v = caught(Mutant::ParkOnFutureClock);
    assert!(v.what.contains("parked"), "{v}");
}
