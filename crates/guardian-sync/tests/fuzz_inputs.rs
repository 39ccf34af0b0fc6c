//! Fuzzing of everything that parses bytes from outside the process (DESIGN
//! §11 invariant 6: bad input yields an error, never a panic).
//!
//! cargo-fuzz needs nightly and a separate crate; these targets are proptest
//! properties with large case counts instead, so they run on stable in CI.
//! `GSYNC_FUZZ_CASES` sets the cases per target (default 1,000 for the
//! parsers, 150 for the nested-document targets; a long run uses 100,000).
//! Targets: server response classification (`classify_mutation`,
//! `classify_fetch`), `Retry-After` parsing, the 3-way merge, and the wire
//! messages of `guardian-protocol` (arbitrary and mutated bytes never panic;
//! valid messages round-trip).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, UNIX_EPOCH};

use guardian_protocol::{
    validate_entity_id, validate_entity_type, BatchOp, BatchRequest, BatchResponse, BatchResult,
    Change, ChangesPage, CreateRequest, Entity, MutationKind, Problem, RealtimeFrame,
    UpdateRequest,
};
use guardian_sync::reconcile::{merge3, ConflictPolicy};
use guardian_sync::retry::parse_retry_after;
use guardian_sync::transport::{
    classify_fetch, classify_mutation, classify_mutation_of, Fetched, Outcome, RetryReason, Sent,
    Stored,
};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Map, Value};

fn cases(default: u32) -> u32 {
    std::env::var("GSYNC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32) -> Config {
    Config {
        cases: cases(default_cases),
        // Failures are reported with their seed; no regression files in CI.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Arbitrary JSON without floats (so equality after a round trip is exact),
/// nested a few levels, with keys that collide often.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        "[a-z]{0,3}|\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-e]{1,2}|\\PC{0,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-e]{1,2}", json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn kind() -> impl Strategy<Value = MutationKind> {
    prop_oneof![
        Just(MutationKind::Create),
        Just(MutationKind::Update),
        Just(MutationKind::Delete),
    ]
}

fn entity() -> impl Strategy<Value = Entity> {
    (
        "[a-z][a-z0-9_]{0,10}",
        "[A-Za-z0-9._-]{1,20}",
        any::<u64>(),
        json_value(),
        "\\PC{0,30}",
        any::<bool>(),
    )
        .prop_map(
            |(entity_type, id, version, data, updated_at, deleted)| Entity {
                entity_type,
                id,
                version,
                data,
                updated_at,
                deleted,
            },
        )
}

fn change() -> impl Strategy<Value = Change> {
    (
        any::<u64>(),
        kind(),
        "[a-z]{1,8}",
        "\\PC{1,12}",
        any::<u64>(),
        json_value(),
    )
        .prop_map(|(cursor, op, entity_type, id, version, data)| Change {
            cursor,
            op,
            entity_type,
            id,
            version,
            data,
        })
}

fn batch_op() -> impl Strategy<Value = BatchOp> {
    (
        kind(),
        "[a-z]{1,8}",
        "\\PC{1,12}",
        prop::option::of(json_value()),
        prop::option::of(any::<u64>()),
        "\\PC{0,40}",
        prop::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(
                op,
                entity_type,
                id,
                data,
                if_match,
                idempotency_key,
                depends_on,
                if_match_chained,
            )| {
                BatchOp {
                    op,
                    entity_type,
                    id,
                    // `Some(Null)` serializes as `null`, which reads back as `None`.
                    data: data.filter(|d| !d.is_null()),
                    if_match,
                    idempotency_key,
                    depends_on,
                    if_match_chained,
                }
            },
        )
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        "urn:guardian:[a-z:-]{0,20}|\\PC{0,20}",
        "\\PC{0,20}",
        any::<u16>(),
        prop::option::of("\\PC{0,30}"),
        prop::option::of(entity()),
        prop::collection::btree_map("x_[a-z]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(t, title, status, detail, current, ext)| {
            let mut p = Problem::new(&t, &title, status);
            p.detail = detail;
            p.current = current;
            p.extensions = ext.into_iter().collect();
            p
        })
}

/// A byte string that is often almost JSON: a valid document with a few
/// bytes flipped, truncated or spliced, or plain noise.
fn hostile_bytes(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (
            valid,
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            any::<prop::sample::Index>(),
            any::<bool>(),
        )
            .prop_map(|(mut bytes, flips, cut, truncate)| {
                if !bytes.is_empty() {
                    for (i, b) in flips {
                        let at = i.index(bytes.len());
                        bytes[at] = b;
                    }
                    if truncate {
                        bytes.truncate(cut.index(bytes.len()));
                    }
                }
                bytes
            }),
    ]
}

fn valid_entity_bytes() -> impl Strategy<Value = Vec<u8>> {
    entity().prop_map(|e| serde_json::to_vec(&e).unwrap())
}

fn valid_problem_bytes() -> impl Strategy<Value = Vec<u8>> {
    problem().prop_map(|p| serde_json::to_vec(&p).unwrap())
}

fn retry_after_header() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        "[0-9]{1,25}",
        "\\PC{0,40}",
        (0u64..5_000_000_000)
            .prop_map(|s| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(s))),
    ])
}

fn assert_sane(outcome: &Outcome) {
    if let Outcome::Retryable { detail, .. } | Outcome::Permanent { detail, .. } = outcome {
        // Details are logged: they must never carry the (possibly huge,
        // possibly private) body.
        assert!(
            detail.len() < 1_000,
            "detail too long: {} bytes",
            detail.len()
        );
    }
}

proptest! {
    #![proptest_config(config(1_000))]

    /// Any status, header and body: a classification, never a panic; the
    /// status classes of DESIGN §4 hold whatever the body says.
    #[test]
    fn classify_mutation_total(
        kind in kind(),
        status in prop_oneof![100u16..600, any::<u16>()],
        retry_after in retry_after_header(),
        replayed in any::<bool>(),
        body in hostile_bytes(prop_oneof![valid_entity_bytes(), valid_problem_bytes()]),
    ) {
        let outcome = classify_mutation(kind, status, retry_after.as_deref(), replayed, &body);
        assert_sane(&outcome);
        match status {
            500..=599 | 408 | 425 | 429 => {
                let is_retryable = matches!(outcome, Outcome::Retryable { .. });
                prop_assert!(is_retryable, "{status}: {outcome:?}");
            }
            401 => prop_assert!(matches!(outcome, Outcome::AuthRequired)),
            404 | 410 if kind == MutationKind::Delete => {
                prop_assert!(matches!(outcome, Outcome::AlreadyGone));
            }
            409 | 412 => {
                let ok = matches!(outcome, Outcome::Conflict { .. } | Outcome::Retryable { .. });
                prop_assert!(ok, "{status}: {outcome:?}");
            }
            // A non-2xx status can never count as applied.
            s if !(200..=299).contains(&s) => {
                let applied = matches!(outcome, Outcome::Applied { .. });
                prop_assert!(!applied, "{status}: {outcome:?}");
            }
            _ => {}
        }
        // A 2xx with a body that is not an entity is a protocol error,
        // except for deletes (no body needed).
        if (200..=299).contains(&status) && kind != MutationKind::Delete
            && serde_json::from_slice::<Entity>(&body).is_err()
        {
            let retryable = matches!(outcome, Outcome::Retryable { .. });
            prop_assert!(retryable, "{outcome:?}");
        }
    }

    /// A valid entity under 2xx is applied, with exactly that entity.
    #[test]
    fn classify_mutation_accepts_valid_entities(e in entity(), status in 200u16..300, replayed in any::<bool>()) {
        let body = serde_json::to_vec(&e).unwrap();
        let outcome = classify_mutation(MutationKind::Update, status, None, replayed, &body);
        prop_assert_eq!(outcome, Outcome::Applied { stored: Stored::Entity(e), replayed });
    }

    /// An entity echoing the data sent byte for byte is stored as sent at
    /// its version, any other data is decoded and carried whole, and an
    /// entity that contradicts the request (another entity, a tombstone, a
    /// version the outbox cannot hold) is a protocol error either way.
    #[test]
    fn classify_mutation_of_echoes_only_the_exact_data(e in entity(), other in entity(), replayed in any::<bool>()) {
        let body = serde_json::to_vec(&e).unwrap();
        let classify = |about: &Entity, data: &str| {
            let sent = Sent { entity_type: &about.entity_type, entity_id: &about.id, data: Some(data) };
            classify_mutation_of(MutationKind::Update, 200, None, replayed, &body, Some(sent))
        };
        let protocol = |o: &Outcome| matches!(o, Outcome::Retryable { reason: RetryReason::Protocol, .. });
        let consistent = !e.deleted && e.version > 0 && i64::try_from(e.version).is_ok();
        let own = serde_json::to_string(&e.data).unwrap();
        let outcome = classify(&e, &own);
        if consistent {
            prop_assert_eq!(outcome, Outcome::Applied { stored: Stored::AsSent { version: e.version }, replayed });
        } else {
            prop_assert!(protocol(&outcome), "{:?}", outcome);
        }
        let outcome = classify(&e, &serde_json::to_string(&other.data).unwrap());
        if consistent {
            let expected = if other.data == e.data {
                Stored::AsSent { version: e.version }
            } else {
                Stored::Entity(e.clone())
            };
            prop_assert_eq!(outcome, Outcome::Applied { stored: expected, replayed });
        } else {
            prop_assert!(protocol(&outcome), "{:?}", outcome);
        }
        if (&other.entity_type, &other.id) != (&e.entity_type, &e.id) {
            let outcome = classify(&other, &own);
            prop_assert!(protocol(&outcome), "{:?}", outcome);
        }
    }

    #[test]
    fn classify_fetch_total(
        status in prop_oneof![100u16..600, any::<u16>()],
        retry_after in retry_after_header(),
        body in hostile_bytes(prop_oneof![valid_entity_bytes(), valid_problem_bytes()]),
    ) {
        match classify_fetch(status, retry_after.as_deref(), &body) {
            Ok(Fetched::Present(e)) => {
                prop_assert_eq!(status, 200);
                prop_assert_eq!(Some(e), serde_json::from_slice::<Entity>(&body).ok());
            }
            Ok(_) => prop_assert!(status == 404 || status == 410, "{status}"),
            Err(outcome) => assert_sane(&outcome),
        }
    }

    /// Any header value: `None` or a delay, never a panic, whatever `now`.
    #[test]
    fn retry_after_total(value in "\\PC{0,60}|[0-9 ]{0,30}|[A-Za-z, :0-9-]{0,40}", now in any::<i64>()) {
        let _ = parse_retry_after(&value, now);
    }

    /// delay-seconds parse to exactly that delay.
    #[test]
    fn retry_after_seconds(secs in any::<u64>(), now in any::<i64>()) {
        let parsed = parse_retry_after(&secs.to_string(), now).map(|r| r.delay());
        prop_assert_eq!(parsed, Some(Duration::from_secs(secs)));
    }

    /// An HTTP-date `d` seconds after `now` parses to a delay within the
    /// one-second resolution of the date, and a past date to zero.
    #[test]
    fn retry_after_http_date(now_s in 0u64..4_000_000_000, d in 0u64..1_000_000, past in any::<bool>()) {
        let now_ms = i64::try_from(now_s * 1000).unwrap();
        let at = if past { now_s.saturating_sub(d) } else { now_s + d };
        let header = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(at));
        let delay = parse_retry_after(&header, now_ms).expect("a valid HTTP-date parses").delay();
        let expected = Duration::from_secs(if past { 0 } else { d });
        prop_assert_eq!(delay, expected, "{}", header);
    }

}

// Targets that build nested documents cost more per case.
proptest! {
    #![proptest_config(config(150))]

    /// The merge is total: no panic on any three documents, either policy,
    /// with or without a base.
    #[test]
    fn merge_total(base in prop::option::of(json_value()), local in json_value(), remote in json_value(), remote_wins in any::<bool>()) {
        let policy = if remote_wins { ConflictPolicy::RemoteWins } else { ConflictPolicy::LocalWins };
        let _ = merge3(base.as_ref(), &local, &remote, &policy);
    }

    /// One side unchanged: the other side is the result, cleanly. Both sides
    /// equal: that value, cleanly.
    #[test]
    fn merge_one_sided(base in json_value(), other in json_value()) {
        let p = ConflictPolicy::LocalWins;
        let m = merge3(Some(&base), &base, &other, &p);
        prop_assert!(m.is_clean(), "{m:?}");
        prop_assert_eq!(&m.merged, &other);
        let m = merge3(Some(&base), &other, &base, &p);
        prop_assert!(m.is_clean(), "{m:?}");
        prop_assert_eq!(&m.merged, &other);
        let m = merge3(Some(&base), &other, &other, &p);
        prop_assert!(m.is_clean(), "{m:?}");
        prop_assert_eq!(&m.merged, &other);
    }

    /// Idempotence: merging the result again against the same remote
    /// changes nothing, and swapping sides with the opposite policy gives
    /// the same document.
    #[test]
    fn merge_idempotent_and_symmetric(base in json_object(), local in json_object(), remote in json_object()) {
        let lw = ConflictPolicy::LocalWins;
        let rw = ConflictPolicy::RemoteWins;
        let m = merge3(Some(&base), &local, &remote, &lw);
        let again = merge3(Some(&base), &m.merged, &remote, &lw);
        prop_assert_eq!(&again.merged, &m.merged);
        let swapped = merge3(Some(&base), &remote, &local, &rw);
        prop_assert_eq!(&swapped.merged, &m.merged);
        prop_assert_eq!(swapped.conflicts.len(), m.conflicts.len());
        // Without a base: local fields win, remote-only fields stay.
        let two = merge3(None, &local, &remote, &lw).merged;
        for (k, v) in remote.as_object().unwrap() {
            if !local.as_object().unwrap().contains_key(k) {
                prop_assert_eq!(two.get(k), Some(v));
            }
        }
        for (k, v) in local.as_object().unwrap() {
            if !v.is_object() {
                prop_assert_eq!(two.get(k), Some(v));
            }
        }
    }

    /// Arbitrary and mutated bytes into every wire type: errors, no panics.
    #[test]
    fn wire_messages_from_hostile_bytes(bytes in hostile_bytes(prop_oneof![
        valid_entity_bytes(),
        valid_problem_bytes(),
        prop::collection::vec(change(), 0..3).prop_map(|changes| serde_json::to_vec(&ChangesPage { changes, next: 7, head: Some(7) }).unwrap()),
        change().prop_map(|change| serde_json::to_vec(&RealtimeFrame::Change { change }).unwrap()),
        prop::collection::vec(batch_op(), 0..3).prop_map(|ops| serde_json::to_vec(&BatchRequest { ops }).unwrap()),
    ])) {
        let _ = serde_json::from_slice::<Entity>(&bytes);
        let _ = serde_json::from_slice::<Problem>(&bytes);
        let _ = serde_json::from_slice::<ChangesPage>(&bytes);
        let _ = serde_json::from_slice::<RealtimeFrame>(&bytes);
        let _ = serde_json::from_slice::<BatchRequest>(&bytes);
        let _ = serde_json::from_slice::<BatchResponse>(&bytes);
        let _ = serde_json::from_slice::<CreateRequest>(&bytes);
        let _ = serde_json::from_slice::<UpdateRequest>(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = validate_entity_type(text);
            let _ = validate_entity_id(text);
        }
    }

    /// Valid messages survive a round trip unchanged.
    #[test]
    fn wire_messages_round_trip(
        e in entity(),
        p in problem(),
        changes in prop::collection::vec(change(), 0..4),
        ops in prop::collection::vec(batch_op(), 0..4),
        results in prop::collection::vec((any::<u16>(), json_value(), any::<bool>()), 0..4),
        cursor in any::<u64>(),
        data in json_value(),
    ) {
        fn rt<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> Result<(), TestCaseError> {
            let text = serde_json::to_string(v).unwrap();
            let back: T = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            prop_assert_eq!(&back, v);
            Ok(())
        }
        rt(&e)?;
        rt(&p)?;
        rt(&ChangesPage { changes: changes.clone(), next: cursor, head: None })?;
        rt(&RealtimeFrame::Hello { cursor })?;
        for change in changes {
            rt(&RealtimeFrame::Change { change })?;
        }
        rt(&BatchRequest { ops })?;
        rt(&BatchResponse { results: results.into_iter().map(|(status, body, replayed)| BatchResult { status, body, replayed }).collect() })?;
        rt(&CreateRequest { id: e.id.clone(), data: data.clone() })?;
        rt(&UpdateRequest { data })?;
    }
}
