//! Property tests of the retry policy: no overflow, delays within the cap,
//! `Retry-After` honoured, header parsing never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use guardian_sync::retry::{parse_retry_after, RetryAfter, RetryDecision, RetryPolicy};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn policy() -> impl Strategy<Value = RetryPolicy> {
    (
        1u64..10_000,
        1.0f64..10.0,
        0u64..1_000_000,
        1u32..100,
        0u64..100_000,
    )
        .prop_map(|(base_ms, factor, extra_ms, attempts, max_ra_ms)| {
            RetryPolicy::new(
                Duration::from_millis(base_ms),
                factor,
                Duration::from_millis(base_ms + extra_ms),
                attempts,
                Duration::from_millis(max_ra_ms),
            )
            .unwrap()
        })
}

proptest! {
    #[test]
    fn delay_never_exceeds_cap(p in policy(), retry in any::<u32>(), seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = p.next_delay(retry, &mut rng);
        prop_assert!(d <= p.cap());
        prop_assert!(d <= p.ceiling(retry));
    }

    #[test]
    fn ceiling_is_monotonic(p in policy(), retry in 0u32..10_000) {
        prop_assert!(p.ceiling(retry) <= p.ceiling(retry + 1));
    }

    #[test]
    fn schedule_honours_retry_after_and_never_overflows(
        p in policy(),
        attempts in any::<u32>(),
        ra_secs in proptest::option::of(any::<u64>()),
        now in any::<i64>(),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let ra = ra_secs.map(|s| RetryAfter::from_delay(Duration::from_secs(s)));
        match p.schedule(attempts, ra, now, &mut rng) {
            RetryDecision::GiveUp => prop_assert!(attempts >= p.max_attempts()),
            RetryDecision::RetryAt(at) => {
                prop_assert!(attempts < p.max_attempts());
                prop_assert!(at >= now);
                let cap_ms = i64::try_from(p.cap().as_millis()).unwrap();
                let max_ra_ms = i64::try_from(p.max_retry_after().as_millis()).unwrap();
                // Never later than the larger of the two bounds (+1 ms rounding).
                let bound = cap_ms.max(max_ra_ms) + 1;
                prop_assert!(at.saturating_sub(now) <= bound);
                if let Some(ra) = ra {
                    let wanted = i64::try_from(ra.delay().min(p.max_retry_after()).as_millis())
                        .unwrap_or(i64::MAX);
                    prop_assert!(at >= now.saturating_add(wanted));
                }
            }
        }
    }

    #[test]
    fn parse_never_panics(s in ".{0,64}", now in any::<i64>()) {
        let _ = parse_retry_after(&s, now);
    }

    #[test]
    fn delay_seconds_round_trip(secs in any::<u64>(), now in any::<i64>()) {
        prop_assert_eq!(
            parse_retry_after(&secs.to_string(), now),
            Some(RetryAfter::from_delay(Duration::from_secs(secs)))
        );
    }

    #[test]
    fn http_date_round_trip(unix in 0u64..253_402_300_799, now_s in 0i64..253_402_300_799) {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(unix);
        let header = httpdate::fmt_http_date(t);
        let got = parse_retry_after(&header, now_s * 1000).unwrap();
        let expected = u64::try_from(i64::try_from(unix).unwrap() - now_s).unwrap_or(0);
        prop_assert_eq!(got.delay(), Duration::from_secs(expected));
    }
}
