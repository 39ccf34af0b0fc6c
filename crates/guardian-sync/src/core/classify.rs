//! Classification of server responses (DESIGN §4), as pure functions.
//!
//! Kept apart from the HTTP driver so that every status, header and hostile
//! body shape is tested without a socket, and so that batch results (which
//! carry a status and a body per op) take exactly the same path.

use std::borrow::Cow;

use guardian_protocol::{problem_type, Entity, MutationKind, Problem};
use serde_json::value::RawValue;

use super::outcome::{Fetched, Outcome, RetryReason, Stored};

/// Classifies the response to one mutation.
///
/// `body` is the full (size-limited) response body; `retry_after` the raw
/// `Retry-After` header; `replayed` whether `Idempotent-Replayed: true` was set.
pub fn classify_mutation(
    kind: MutationKind,
    status: u16,
    retry_after: Option<&str>,
    replayed: bool,
    body: &[u8],
) -> Outcome {
    classify_mutation_of(kind, status, retry_after, replayed, body, None)
}

/// What a mutation request carried, for checking its answer against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent<'a> {
    /// The entity's type, as in the request.
    pub entity_type: &'a str,
    /// The entity's id, as in the request.
    pub entity_id: &'a str,
    /// The data exactly as serialized into the request; `None` for a delete.
    pub data: Option<&'a str>,
}

/// [`classify_mutation`] for a request known as `sent`:
/// - a success whose entity contradicts the request (another entity, a
///   tombstone, version 0 or one the outbox cannot store) is a protocol
///   error, not an acknowledgement;
/// - a success whose entity echoes the data sent byte for byte is
///   [`Stored::AsSent`], its copy of the data checked for shape but never
///   decoded into values.
pub fn classify_mutation_of(
    kind: MutationKind,
    status: u16,
    retry_after: Option<&str>,
    replayed: bool,
    body: &[u8],
    sent: Option<Sent<'_>>,
) -> Outcome {
    match status {
        200..=299 => classify_success(kind, status, replayed, body, sent),
        404 | 410 if kind == MutationKind::Delete => Outcome::AlreadyGone,
        409 => {
            let problem = parse_problem(body);
            match problem {
                Some(p) if p.is(problem_type::IDEMPOTENCY_IN_FLIGHT) => Outcome::Retryable {
                    reason: RetryReason::Server,
                    status: Some(status),
                    retry_after: retry_after.map(str::to_owned),
                    detail: "the same idempotency key is still being processed".into(),
                    // Says nothing about the server's health.
                    counts_for_breaker: false,
                },
                Some(p) => Outcome::Conflict {
                    problem: Box::new(p),
                },
                // A 409 without a readable problem is still a data conflict:
                // the reconciler fetches the current state itself.
                None => Outcome::Conflict {
                    problem: Box::new(Problem::new(
                        problem_type::CONFLICT_VERSION,
                        "Conflict",
                        status,
                    )),
                },
            }
        }
        412 => Outcome::Conflict {
            problem: Box::new(parse_problem(body).unwrap_or_else(|| {
                Problem::new(
                    problem_type::CONFLICT_VERSION,
                    "Precondition Failed",
                    status,
                )
            })),
        },
        401 => Outcome::AuthRequired,
        // Only meaningful inside a batch; the engine checks that the op's
        // dependency really did not succeed before believing it.
        424 if parse_problem(body).is_some_and(|p| p.is(problem_type::DEPENDENCY_FAILED)) => {
            Outcome::DependencyFailed
        }
        // 408, 425 and 429 are the retryable 4xx; every 5xx is retryable.
        408 | 425 | 429 | 500..=599 => Outcome::Retryable {
            reason: RetryReason::Server,
            status: Some(status),
            retry_after: retry_after.map(str::to_owned),
            detail: format!("server answered {status}"),
            counts_for_breaker: true,
        },
        300..=399 => Outcome::protocol(Some(status), format!("unexpected redirect {status}")),
        400..=499 => {
            let problem = parse_problem(body);
            let detail = problem
                .as_ref()
                .map(|p| {
                    format!(
                        "{status} {}: {}",
                        p.problem_type,
                        p.detail.as_deref().unwrap_or(&p.title)
                    )
                })
                .unwrap_or_else(|| format!("server refused the request with {status}"));
            Outcome::Permanent {
                status,
                problem: problem.map(Box::new),
                detail,
            }
        }
        _ => Outcome::protocol(Some(status), format!("unexpected status {status}")),
    }
}

/// An [`Entity`] answer read in place: every field must be there with
/// `Entity`'s types, but nothing is copied and `data` stays text.
#[derive(serde::Deserialize)]
struct Echo<'a> {
    #[serde(rename = "type", borrow)]
    entity_type: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    version: u64,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(rename = "updated_at", borrow)]
    _updated_at: Cow<'a, str>,
    deleted: bool,
}

/// Why a success's entity cannot be the answer to the create or update
/// `sent` (checked only when the request is known). Never quotes the body.
fn contradiction(
    sent: Option<Sent<'_>>,
    entity_type: &str,
    id: &str,
    version: u64,
    deleted: bool,
) -> Option<&'static str> {
    let sent = sent?;
    if sent.entity_type != entity_type || sent.entity_id != id {
        Some("the answer is about another entity")
    } else if deleted {
        Some("the answer to a create or update is a tombstone")
    } else if version == 0 || i64::try_from(version).is_err() {
        // The outbox stores versions as SQLite integers: a larger one
        // would be clamped into a chained successor's If-Match.
        Some("the answer's version is out of range")
    } else {
        None
    }
}

fn classify_success(
    kind: MutationKind,
    status: u16,
    replayed: bool,
    body: &[u8],
    sent: Option<Sent<'_>>,
) -> Outcome {
    if kind == MutationKind::Delete {
        return Outcome::Applied {
            stored: Stored::Nothing,
            replayed,
        };
    }
    let refused = |why: &str| {
        Outcome::protocol(
            Some(status),
            format!("{status} response contradicts the request: {why}"),
        )
    };
    if let Some(data) = sent.and_then(|s| s.data) {
        if let Ok(echo) = serde_json::from_slice::<Echo<'_>>(body) {
            if echo.data.get() == data {
                if let Some(why) = contradiction(
                    sent,
                    &echo.entity_type,
                    &echo.id,
                    echo.version,
                    echo.deleted,
                ) {
                    return refused(why);
                }
                return Outcome::Applied {
                    stored: Stored::AsSent {
                        version: echo.version,
                    },
                    replayed,
                };
            }
        }
    }
    match serde_json::from_slice::<Entity>(body) {
        Ok(entity) => match contradiction(
            sent,
            &entity.entity_type,
            &entity.id,
            entity.version,
            entity.deleted,
        ) {
            Some(why) => refused(why),
            None => Outcome::Applied {
                stored: Stored::Entity(entity),
                replayed,
            },
        },
        // Logged without the body: it may hold user data.
        Err(e) => Outcome::protocol(
            Some(status),
            format!(
                "malformed entity in a {status} response ({} bytes): {e}",
                body.len()
            ),
        ),
    }
}

/// Classifies the response to `GET /v1/entities/{type}/{id}`.
pub fn classify_fetch(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<Fetched, Outcome> {
    match status {
        // A tombstone served with 200 stays Present: it carries the version.
        200 => serde_json::from_slice::<Entity>(body)
            .map(Fetched::Present)
            .map_err(|e| {
                Outcome::protocol(
                    Some(status),
                    format!(
                        "malformed entity in a fetch response ({} bytes): {e}",
                        body.len()
                    ),
                )
            }),
        404 => Ok(Fetched::Absent),
        410 => Ok(Fetched::Deleted),
        // Reuse the mutation rules for everything else (auth, retryable, permanent).
        _ => Err(classify_mutation(
            MutationKind::Update,
            status,
            retry_after,
            false,
            body,
        )),
    }
}

fn parse_problem(body: &[u8]) -> Option<Problem> {
    serde_json::from_slice::<Problem>(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entity_body(version: u64) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "device", "id": "d1", "version": version, "data": {"on": true},
            "updated_at": "2026-11-25T00:00:00Z", "deleted": false
        }))
        .unwrap()
    }

    fn problem_body(ty: &str, status: u16) -> Vec<u8> {
        serde_json::to_vec(&json!({"type": ty, "title": "t", "status": status})).unwrap()
    }

    #[test]
    fn success_carries_the_entity_for_chaining() {
        let out = classify_mutation(MutationKind::Update, 200, None, true, &entity_body(4));
        match out {
            Outcome::Applied {
                stored: Stored::Entity(e),
                replayed: true,
            } => assert_eq!(e.version, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify_mutation(MutationKind::Delete, 204, None, false, b""),
            Outcome::Applied {
                stored: Stored::Nothing,
                replayed: false
            }
        );
    }

    /// A success about another entity, a tombstone, or a version the
    /// outbox cannot hold does not acknowledge the request, echoed or not.
    #[test]
    fn an_answer_contradicting_the_request_is_a_protocol_error() {
        let body = |ty: &str, id: &str, version: &str, deleted: bool, data: &str| {
            format!(
                r#"{{"type":"{ty}","id":"{id}","version":{version},"data":{data},"updated_at":"x","deleted":{deleted}}}"#
            )
        };
        for data in [r#"{"on":true}"#, r#"{"on":false}"#] {
            let sent = Sent {
                entity_type: "device",
                entity_id: "d1",
                data: Some(r#"{"on":true}"#),
            };
            let classify = |b: String| {
                classify_mutation_of(
                    MutationKind::Update,
                    200,
                    None,
                    false,
                    b.as_bytes(),
                    Some(sent),
                )
            };
            for bad in [
                body("device", "d2", "3", false, data),
                body("sensor", "d1", "3", false, data),
                body("device", "d1", "3", true, data),
                body("device", "d1", "0", false, data),
                body("device", "d1", "9223372036854775808", false, data),
            ] {
                let out = classify(bad.clone());
                assert!(
                    matches!(
                        out,
                        Outcome::Retryable {
                            reason: RetryReason::Protocol,
                            ..
                        }
                    ),
                    "{bad}: {out:?}"
                );
            }
            match classify(body("device", "d1", "9223372036854775807", false, data)) {
                Outcome::Applied { stored, .. } => {
                    assert_eq!(stored.version(), Some(i64::MAX as u64));
                }
                other => panic!("the largest storable version: {other:?}"),
            }
        }
    }

    #[test]
    fn an_answer_echoing_the_data_sent_is_stored_as_sent() {
        let classify = |body: &[u8], data: &str| {
            let sent = Sent {
                entity_type: "device",
                entity_id: "d1",
                data: Some(data),
            };
            classify_mutation_of(MutationKind::Update, 200, None, false, body, Some(sent))
        };
        assert_eq!(
            classify(&entity_body(4), r#"{"on":true}"#),
            Outcome::Applied {
                stored: Stored::AsSent { version: 4 },
                replayed: false
            }
        );
        // The server stored something else (it merged, or formats its JSON
        // otherwise): its entity is decoded and carried.
        for sent in [r#"{"on":false}"#, r#"{ "on": true }"#, ""] {
            match classify(&entity_body(4), sent) {
                Outcome::Applied {
                    stored: Stored::Entity(e),
                    ..
                } => assert_eq!((e.version, e.data), (4, json!({"on": true}))),
                other => panic!("{other:?}"),
            }
        }
        // An echo must still be a whole entity: a field missing or of the
        // wrong type is the same protocol error as without the echo.
        for body in [
            json!({"type": "device", "id": "d1", "version": 4, "data": {"on": true}}),
            json!({"type": "device", "id": "d1", "version": "4", "data": {"on": true},
                   "updated_at": "2026-11-25T00:00:00Z", "deleted": false}),
            json!({"type": 7, "id": "d1", "version": 4, "data": {"on": true},
                   "updated_at": "2026-11-25T00:00:00Z", "deleted": false}),
        ] {
            let out = classify(&serde_json::to_vec(&body).unwrap(), r#"{"on":true}"#);
            assert!(
                matches!(
                    out,
                    Outcome::Retryable {
                        reason: RetryReason::Protocol,
                        ..
                    }
                ),
                "{out:?}"
            );
        }
        // Escaped text is accepted (copied, not borrowed) like any other.
        let escaped = br#"{"type":"dev\u0069ce","id":"d1","version":2,"data":{"on":true},"updated_at":"x","deleted":false}"#;
        assert_eq!(
            classify(escaped, r#"{"on":true}"#),
            Outcome::Applied {
                stored: Stored::AsSent { version: 2 },
                replayed: false
            }
        );
        // A delete carries nothing, whatever was sent.
        let sent = Sent {
            entity_type: "device",
            entity_id: "d1",
            data: Some("{}"),
        };
        assert_eq!(
            classify_mutation_of(MutationKind::Delete, 204, None, false, b"", Some(sent)),
            Outcome::Applied {
                stored: Stored::Nothing,
                replayed: false
            }
        );
    }

    #[test]
    fn malformed_success_is_a_retryable_protocol_error() {
        for body in [&b"{not json"[..], b"", b"[]", b"{\"version\":\"x\"}"] {
            match classify_mutation(MutationKind::Create, 201, None, false, body) {
                Outcome::Retryable {
                    reason: RetryReason::Protocol,
                    counts_for_breaker: true,
                    ..
                } => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn delete_of_a_gone_entity_is_success() {
        for status in [404, 410] {
            assert_eq!(
                classify_mutation(MutationKind::Delete, status, None, false, b""),
                Outcome::AlreadyGone
            );
        }
        // ...but an update of a missing entity is permanent.
        assert!(matches!(
            classify_mutation(MutationKind::Update, 404, None, false, b""),
            Outcome::Permanent { status: 404, .. }
        ));
    }

    #[test]
    fn conflicts_go_to_the_reconciler_but_in_flight_retries() {
        let body = problem_body(problem_type::CONFLICT_VERSION, 409);
        assert!(matches!(
            classify_mutation(MutationKind::Update, 409, None, false, &body),
            Outcome::Conflict { .. }
        ));
        assert!(matches!(
            classify_mutation(MutationKind::Update, 412, None, false, b"garbage"),
            Outcome::Conflict { .. }
        ));
        assert!(matches!(
            classify_mutation(MutationKind::Update, 409, None, false, b"garbage"),
            Outcome::Conflict { .. }
        ));
        let body = problem_body(problem_type::IDEMPOTENCY_IN_FLIGHT, 409);
        match classify_mutation(MutationKind::Update, 409, Some("1"), false, &body) {
            Outcome::Retryable {
                counts_for_breaker: false,
                retry_after: Some(r),
                ..
            } => {
                assert_eq!(r, "1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retryable_statuses_keep_retry_after() {
        for status in [408, 425, 429, 500, 502, 503, 504] {
            match classify_mutation(MutationKind::Create, status, Some("7"), false, b"") {
                Outcome::Retryable {
                    reason: RetryReason::Server,
                    status: Some(s),
                    retry_after: Some(r),
                    counts_for_breaker: true,
                    ..
                } => {
                    assert_eq!((s, r.as_str()), (status, "7"));
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_client_errors_are_permanent() {
        let body = problem_body(problem_type::IDEMPOTENCY_MISMATCH, 422);
        match classify_mutation(MutationKind::Create, 422, None, false, &body) {
            Outcome::Permanent {
                status: 422,
                problem: Some(p),
                ..
            } => {
                assert!(p.is(problem_type::IDEMPOTENCY_MISMATCH));
            }
            other => panic!("{other:?}"),
        }
        for status in [400, 403, 413, 428] {
            assert!(matches!(
                classify_mutation(MutationKind::Create, status, None, false, b"\x00\xff"),
                Outcome::Permanent { .. }
            ));
        }
        assert_eq!(
            classify_mutation(MutationKind::Create, 401, None, false, b""),
            Outcome::AuthRequired
        );
    }

    #[test]
    fn redirects_and_odd_statuses_are_protocol_errors() {
        for status in [301, 302, 307, 308, 100, 999] {
            assert!(matches!(
                classify_mutation(MutationKind::Create, status, None, false, b""),
                Outcome::Retryable {
                    reason: RetryReason::Protocol,
                    ..
                }
            ));
        }
    }

    #[test]
    fn fetch_outcomes() {
        assert!(
            matches!(classify_fetch(200, None, &entity_body(2)), Ok(Fetched::Present(e)) if e.version == 2)
        );
        assert_eq!(classify_fetch(404, None, b""), Ok(Fetched::Absent));
        assert_eq!(classify_fetch(410, None, b""), Ok(Fetched::Deleted));
        assert!(matches!(
            classify_fetch(200, None, b"nope"),
            Err(Outcome::Retryable { .. })
        ));
        assert!(matches!(
            classify_fetch(503, None, b""),
            Err(Outcome::Retryable { .. })
        ));
    }
}
