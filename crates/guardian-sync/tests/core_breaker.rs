//! Model-based property test of the circuit breaker under both trip
//! policies: random sequences of requests, outcomes and time steps, checked
//! against a plain model that keeps every outcome since the breaker last
//! closed or opened (the breaker keeps a bounded ring).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use guardian_sync::breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker, TripPolicy};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Event {
    Advance(u64),
    Allow,
    Success,
    Failure(Option<u64>),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0u64..3_000).prop_map(Event::Advance),
        3 => Just(Event::Allow),
        2 => Just(Event::Success),
        3 => proptest::option::weighted(0.2, 0u64..20_000).prop_map(Event::Failure),
    ]
}

fn policy() -> impl Strategy<Value = TripPolicy> {
    prop_oneof![
        (1u32..6).prop_map(|failures| TripPolicy::Count { failures }),
        (1u32..12, 1u32..12, 1u8..=100).prop_map(|(calls, min, failure_percent)| {
            TripPolicy::Rate {
                calls,
                minimum_calls: min.min(calls),
                failure_percent,
            }
        }),
    ]
}

/// The model's rule over every outcome since the last close or open.
fn model_opens(
    policy: TripPolicy,
    outcomes: &[(Duration, bool)],
    now: Duration,
    window: Duration,
) -> bool {
    let recent: Vec<bool> = outcomes
        .iter()
        .filter(|(t, _)| now - *t < window)
        .map(|(_, failed)| *failed)
        .collect();
    match policy {
        TripPolicy::Count { failures } => {
            recent.iter().filter(|f| **f).count() >= failures as usize
        }
        TripPolicy::Rate {
            calls,
            minimum_calls,
            failure_percent,
        } => {
            let last = &recent[recent.len().saturating_sub(calls as usize)..];
            let failed = last.iter().filter(|f| **f).count();
            last.len() >= minimum_calls as usize
                && failed * 100 >= usize::from(failure_percent) * last.len()
        }
        _ => unreachable!("a policy this test does not know"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn breaker_follows_the_model(
        policy in policy(),
        window_ms in 1u64..5_000,
        cooldown_ms in 0u64..10_000,
        events in prop::collection::vec(event(), 0..300),
    ) {
        let config = BreakerConfig {
            policy,
            window: Duration::from_millis(window_ms),
            cooldown: Duration::from_millis(cooldown_ms),
            trial_wait: Duration::from_millis(100),
        };
        let mut b = CircuitBreaker::new(config).unwrap();
        let mut now = Duration::ZERO;
        // Model: every outcome since the breaker last closed or opened.
        let mut outcomes: Vec<(Duration, bool)> = Vec::new();
        let mut trips = 0u64;
        for e in events {
            let before = b.state();
            match e {
                Event::Advance(ms) => now += Duration::from_millis(ms),
                Event::Allow => match b.allow_request(now) {
                    Admission::Allowed => prop_assert_eq!(before, BreakerState::Closed),
                    Admission::Trial => {
                        let due = matches!(before, BreakerState::Open { until } if now >= until)
                            || before == BreakerState::HalfOpen;
                        prop_assert!(due);
                        prop_assert_eq!(b.state(), BreakerState::HalfOpen);
                        // Exactly one trial: the next ask is rejected
                        // (unless a zero cooldown presumes the trial lost).
                        let second = b.allow_request(now);
                        let rejected = matches!(second, Admission::Rejected { .. });
                        prop_assert!(rejected || cooldown_ms == 0);
                    }
                    Admission::Rejected { retry_in } => {
                        prop_assert!(before != BreakerState::Closed);
                        if let BreakerState::Open { until } = before {
                            prop_assert_eq!(retry_in, until - now);
                        }
                    }
                },
                Event::Success => {
                    b.record_success(now);
                    if before == BreakerState::Closed {
                        outcomes.push((now, false));
                    }
                    if before == BreakerState::HalfOpen {
                        prop_assert_eq!(b.state(), BreakerState::Closed);
                        outcomes.clear();
                    } else {
                        prop_assert_eq!(b.state(), before);
                    }
                }
                Event::Failure(ra) => {
                    let ra = ra.map(Duration::from_millis);
                    b.record_failure(now, ra);
                    match before {
                        BreakerState::Closed => {
                            outcomes.push((now, true));
                            let should_open = model_opens(policy, &outcomes, now, config.window);
                            prop_assert_eq!(
                                matches!(b.state(), BreakerState::Open { .. }),
                                should_open
                            );
                            if should_open {
                                trips += 1;
                                outcomes.clear();
                                let BreakerState::Open { until } = b.state() else { unreachable!() };
                                prop_assert!(until >= now + config.cooldown);
                                if let Some(ra) = ra {
                                    prop_assert!(until >= now + ra);
                                }
                            }
                        }
                        BreakerState::HalfOpen => {
                            trips += 1;
                            let BreakerState::Open { until } = b.state() else {
                                return Err(TestCaseError::fail("half-open failure must open"));
                            };
                            prop_assert_eq!(
                                until,
                                (now + config.cooldown).max(now + ra.unwrap_or_default())
                            );
                        }
                        BreakerState::Open { until: before_until } => {
                            let BreakerState::Open { until } = b.state() else {
                                return Err(TestCaseError::fail("open stays open"));
                            };
                            prop_assert_eq!(
                                until,
                                before_until.max(ra.map_or(Duration::ZERO, |ra| now + ra))
                            );
                        }
                    }
                }
            }
            prop_assert_eq!(b.trips(), trips);
            let would_reject = matches!(b.clone().allow_request(now), Admission::Rejected { .. });
            prop_assert_eq!(b.is_tripped(now), would_reject);
            match b.state() {
                BreakerState::Open { until } if now < until => {
                    prop_assert_eq!(b.cooldown_remaining(now), Some(until - now));
                }
                _ => prop_assert_eq!(b.cooldown_remaining(now), None),
            }
        }
        // Every change was queued, in order, each starting where the last ended.
        let t = b.take_transitions();
        for pair in t.windows(2) {
            prop_assert_eq!(pair[0].to, pair[1].from);
            prop_assert!(pair[0].at <= pair[1].at);
        }
    }
}
