//! The outbox's rules, one test each, against real SQLite files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guardian_sync::clock::ManualClock;
use guardian_sync::op::{Ack, Fence, NewOp, OpKind, OpState, Reconciled, TxnOutcome};
use guardian_sync::outbox::{
    Coalesced, EnqueueError, ListFilter, OpenError, Outbox, OutboxError, OutboxOptions,
    Synchronous, Upcasters,
};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

fn opts(clock: &Arc<ManualClock>) -> OutboxOptions {
    OutboxOptions::default()
        .clock(clock.clone())
        .synchronous(Synchronous::Normal)
}

fn path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("outbox.db")
}

async fn open_with(p: &Path, o: OutboxOptions) -> Outbox {
    Outbox::open(p, o).await.unwrap().0
}

async fn fresh() -> (tempfile::TempDir, Arc<ManualClock>, Outbox, Fence) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let outbox = open_with(&path(&dir), opts(&clock)).await;
    let fence = outbox
        .lock_acquire("runner-a", None)
        .await
        .unwrap()
        .unwrap();
    (dir, clock, outbox, fence)
}

fn ids(ops: &[guardian_sync::op::PendingOp]) -> Vec<String> {
    ops.iter()
        .map(|o| format!("{}/{}", o.entity_id, o.kind))
        .collect()
}

#[tokio::test]
async fn enqueue_stores_a_durable_op_with_ids() {
    let (dir, clock, outbox, _) = fresh().await;
    let e = outbox
        .enqueue(NewOp::create("device", "d1", json!({"on": true})).with_txn_token("t1"))
        .await
        .unwrap();
    assert_eq!(e.coalesced, None);
    // Schema 6: the id is a version-8 UUID that names the op's position.
    assert_eq!(e.op_id.get_version_num(), 8);
    assert_eq!(e.op_id.as_u128() & ((1 << 62) - 1), e.seq as u128);
    outbox.close().await;
    // A second process (here: a second open) sees it.
    let again = open_with(&path(&dir), opts(&clock)).await;
    let op = again.get(e.op_id).await.unwrap().unwrap();
    assert_eq!(op.idempotency_key, e.idempotency_key);
    assert_eq!(op.kind, OpKind::Create);
    assert_eq!(op.payload, json!({"on": true}));
    assert_eq!(op.state, OpState::Pending);
    assert_eq!(op.attempts, 0);
    assert_eq!(op.created_at, T0);
    assert_eq!(op.next_attempt_at, T0);
    assert_eq!(op.txn_tokens, vec!["t1".to_string()]);
    assert_eq!(op.envelope_version, 1);
    assert_eq!(
        again.txn_outcome("t1").await.unwrap(),
        Some(TxnOutcome::Pending)
    );
}

#[cfg(unix)]
#[tokio::test]
async fn file_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _, outbox, _) = fresh().await;
    outbox
        .enqueue(NewOp::create("a", "1", json!({})))
        .await
        .unwrap();
    for name in ["outbox.db", "outbox.db-wal", "outbox.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let outbox = open_with(&path(&dir), opts(&clock).max_payload_bytes(64)).await;
    outbox
        .enqueue(NewOp::create("device", "d1", json!({"a": 1})))
        .await
        .unwrap();
    let before = outbox.list(ListFilter::default()).await.unwrap();
    let cases = vec![
        NewOp::create("Device", "d1", json!({})),
        NewOp::create("device", "d/1", json!({})),
        NewOp::create("device", "", json!({})),
        NewOp::update("device", "d1", json!([1, 2])),
        NewOp::update("device", "d1", json!("x")),
        NewOp::create("device", "d1", json!(null)),
        NewOp::update("device", "d1", json!({"big": "x".repeat(100)})),
        NewOp::update("device", "d1", json!({})).with_base(json!({"big": "x".repeat(100)}), 1),
        NewOp {
            payload: json!({"a": 1}),
            ..NewOp::delete("device", "d1")
        },
        NewOp::update("device", "d1", json!({})).with_txn_token(""),
    ];
    for op in cases {
        let err = outbox.enqueue(op.clone()).await.unwrap_err();
        assert!(
            matches!(
                err,
                EnqueueError::Invalid(_)
                    | EnqueueError::PayloadNotObject { .. }
                    | EnqueueError::PayloadTooLarge { .. }
                    | EnqueueError::PayloadOnDelete { .. }
                    | EnqueueError::InvalidTxnToken
            ),
            "{op:?} -> {err}"
        );
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(outbox.list(ListFilter::default()).await.unwrap(), before);
}

#[tokio::test]
async fn per_entity_head_of_line_and_fifo() {
    let (_dir, _clock, outbox, fence) = fresh().await;
    let a1 = outbox
        .enqueue(NewOp::create("t", "a", json!({"n": 1})))
        .await
        .unwrap();
    outbox
        .enqueue(NewOp::create("t", "b", json!({"n": 1})))
        .await
        .unwrap();
    // Attempted first, so the next update is not coalesced into it.
    let first = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(ids(&first), ["a/create", "b/create"]);
    outbox
        .enqueue(NewOp::update("t", "a", json!({"n": 2})))
        .await
        .unwrap();
    outbox
        .enqueue(NewOp::create("t", "c", json!({})))
        .await
        .unwrap();
    // a's update waits behind a's in-flight create; c is free.
    let second = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(ids(&second), ["c/create"]);
    outbox
        .fenced(&fence)
        .ack(a1.op_id, Ack::default())
        .await
        .unwrap();
    let third = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(ids(&third), ["a/update"]);
    assert_eq!(third[0].attempts, 1);
    assert!(outbox.get(a1.op_id).await.unwrap().is_none());
}

#[tokio::test]
async fn claim_respects_next_attempt_at_and_limit() {
    let (_dir, clock, outbox, fence) = fresh().await;
    for i in 0..5 {
        outbox
            .enqueue(NewOp::create("t", format!("e{i}"), json!({})))
            .await
            .unwrap();
    }
    let got = outbox.fenced(&fence).claim_ready(2, T0).await.unwrap();
    assert_eq!(ids(&got), ["e0/create", "e1/create"]);
    outbox
        .fenced(&fence)
        .retry_later(got[0].op_id, T0 + 5_000, "503")
        .await
        .unwrap();
    let op = outbox.get(got[0].op_id).await.unwrap().unwrap();
    assert_eq!(
        (op.state, op.attempts, op.last_error.as_deref()),
        (OpState::Pending, 1, Some("503"))
    );
    let rest = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(ids(&rest), ["e2/create", "e3/create", "e4/create"]);
    assert!(outbox
        .fenced(&fence)
        .claim_ready(10, T0 + 4_999)
        .await
        .unwrap()
        .is_empty());
    clock.advance(Duration::from_secs(5));
    let later = outbox
        .fenced(&fence)
        .claim_ready(10, T0 + 5_000)
        .await
        .unwrap();
    assert_eq!(ids(&later), ["e0/create"]);
    assert_eq!(later[0].attempts, 2);
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.failed), (0, 5, 0));
}

#[tokio::test]
async fn in_flight_ops_go_back_to_pending_when_the_runner_is_gone() {
    let (dir, clock, outbox, fence) = fresh().await;
    let e = outbox
        .enqueue(NewOp::create("t", "a", json!({})))
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox.close().await;
    // The lock is still held by runner-a (it may be alive in another
    // process): open leaves the op alone...
    let again = open_with(&path(&dir), opts(&clock)).await;
    assert_eq!(
        again.get(e.op_id).await.unwrap().unwrap().state,
        OpState::InFlight
    );
    // ...until a new holder takes the lock over.
    let row = again.lock_read().await.unwrap().unwrap();
    let f2 = again
        .lock_acquire("runner-b", Some((row.epoch, row.heartbeat)))
        .await
        .unwrap()
        .unwrap();
    let op = again.get(e.op_id).await.unwrap().unwrap();
    assert_eq!((op.state, op.attempts), (OpState::Pending, 1));
    assert_eq!(op.idempotency_key, e.idempotency_key);
    again.fenced(&f2).lock_release().await.unwrap();
    again.close().await;
    // A released lock: open requeues by itself.
    let f3 = {
        let third = open_with(&path(&dir), opts(&clock)).await;
        let f = third.lock_acquire("runner-c", None).await.unwrap().unwrap();
        third.fenced(&f).claim_ready(10, T0).await.unwrap();
        third.fenced(&f).lock_release().await.unwrap();
        third.close().await;
        f
    };
    assert_eq!(f3.epoch(), 3);
    let (fourth, report) = Outbox::open(path(&dir), opts(&clock)).await.unwrap();
    assert_eq!(report.requeued_in_flight, 1);
    // Interrupted claims are not counted (the op may never have been sent),
    // but the op stays marked as possibly sent.
    let op = fourth.get(e.op_id).await.unwrap().unwrap();
    assert_eq!((op.state, op.attempts), (OpState::Pending, 1));
    assert!(matches!(
        fourth.cancel(e.op_id).await.unwrap_err(),
        OutboxError::AlreadyAttempted { attempts: 1, .. }
    ));
}

#[tokio::test]
async fn lock_row_compare_and_swap_and_fencing() {
    let (_dir, _clock, outbox, fence) = fresh().await;
    assert_eq!(fence.epoch(), 1);
    outbox
        .enqueue(NewOp::create("t", "a", json!({})))
        .await
        .unwrap();
    assert_eq!(outbox.lock_acquire("other", None).await.unwrap(), None);
    // Wrong expectation: not taken.
    assert_eq!(
        outbox.lock_acquire("other", Some((1, 5))).await.unwrap(),
        None
    );
    outbox.fenced(&fence).lock_heartbeat().await.unwrap();
    let row = outbox.lock_read().await.unwrap().unwrap();
    assert_eq!(
        (row.owner.as_str(), row.epoch, row.heartbeat),
        ("runner-a", 1, 1)
    );
    let stolen = outbox
        .lock_acquire("other", Some((row.epoch, row.heartbeat)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stolen.epoch(), 2);
    // The old holder can write nothing more.
    assert_eq!(
        outbox.fenced(&fence).claim_ready(10, T0).await.unwrap_err(),
        OutboxError::LockLost
    );
    assert_eq!(
        outbox.fenced(&fence).lock_heartbeat().await.unwrap_err(),
        OutboxError::LockLost
    );
    assert_eq!(
        outbox.fenced(&fence).lock_release().await.unwrap_err(),
        OutboxError::LockLost
    );
    assert_eq!(
        outbox.stats().await.unwrap().in_flight,
        0,
        "nothing written under a lost lock"
    );
    let got = outbox.fenced(&stolen).claim_ready(10, T0).await.unwrap();
    assert_eq!(
        outbox
            .fenced(&fence)
            .ack(got[0].op_id, Ack::default())
            .await
            .unwrap_err(),
        OutboxError::LockLost
    );
    assert_eq!(
        outbox
            .fenced(&fence)
            .fail(got[0].op_id, "x")
            .await
            .unwrap_err(),
        OutboxError::LockLost
    );
    assert_eq!(
        outbox.get(got[0].op_id).await.unwrap().unwrap().state,
        OpState::InFlight
    );
    // Re-acquiring our own lock bumps the epoch too.
    let again = outbox.lock_acquire("other", None).await.unwrap().unwrap();
    assert_eq!(again.epoch(), 3);
    outbox.fenced(&again).lock_release().await.unwrap();
    assert_eq!(outbox.lock_read().await.unwrap().unwrap().owner, "");
    assert_eq!(
        outbox
            .lock_acquire("x", None)
            .await
            .unwrap()
            .unwrap()
            .epoch(),
        4
    );
    assert_eq!(outbox.lock_acquire("", None).await.unwrap(), None);
}

#[tokio::test]
async fn failed_ops_are_kept_and_do_not_block_anyone() {
    let (_dir, _clock, outbox, fence) = fresh().await;
    let bad = outbox
        .enqueue(NewOp::create("t", "a", json!({})).with_txn_token("ta"))
        .await
        .unwrap();
    outbox
        .enqueue(NewOp::create("t", "b", json!({})))
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    let next_a = outbox
        .enqueue(NewOp::update("t", "a", json!({"x": 1})))
        .await
        .unwrap();
    outbox
        .fenced(&fence)
        .fail(bad.op_id, "422 unprocessable")
        .await
        .unwrap();
    let op = outbox.get(bad.op_id).await.unwrap().unwrap();
    assert_eq!(
        (op.state, op.last_error.as_deref()),
        (OpState::Failed, Some("422 unprocessable"))
    );
    assert_eq!(
        outbox.txn_outcome("ta").await.unwrap(),
        Some(TxnOutcome::Failed {
            error: "422 unprocessable".into()
        })
    );
    // a's next op is ready now, and not chained any more.
    let got = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].op_id, next_a.op_id);
    assert!(!got[0].chained);
    let failed = outbox
        .list(ListFilter {
            state: Some(OpState::Failed),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    // Retry puts it back (same key, attempts reset), and it is pending again.
    outbox.retry_failed(bad.op_id).await.unwrap();
    let op = outbox.get(bad.op_id).await.unwrap().unwrap();
    assert_eq!((op.state, op.attempts), (OpState::Pending, 0));
    assert_eq!(op.idempotency_key, bad.idempotency_key);
    assert_eq!(
        outbox.txn_outcome("ta").await.unwrap(),
        Some(TxnOutcome::Pending)
    );
    assert!(matches!(
        outbox.retry_failed(bad.op_id).await.unwrap_err(),
        OutboxError::WrongState { .. }
    ));
    // Fail again, then discard.
    let all = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert!(
        all.is_empty(),
        "a's update is in flight, a's create waits behind it"
    );
    outbox
        .fenced(&fence)
        .ack(next_a.op_id, Ack::default())
        .await
        .unwrap();
    let got = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(got[0].op_id, bad.op_id);
    outbox
        .fenced(&fence)
        .fail(bad.op_id, "again")
        .await
        .unwrap();
    assert_eq!(outbox.retry_all_failed().await.unwrap(), 1);
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .fail(bad.op_id, "again")
        .await
        .unwrap();
    assert!(matches!(
        outbox.discard(next_a.op_id).await.unwrap_err(),
        OutboxError::NotFound(_)
    ));
    outbox.discard(bad.op_id).await.unwrap();
    assert!(outbox.get(bad.op_id).await.unwrap().is_none());
}

/// `retry` makes a failed op new again: attempts reset (a full retry
/// budget) and error cleared, the old ones kept in its history. An op that
/// had been sent keeps its key and stays immutable (its key may be applied);
/// one that never was can be cancelled, edited and coalesced into again.
#[tokio::test]
async fn retry_makes_a_failed_op_new_again() {
    let (_dir, _clock, outbox, fence) = fresh().await;
    let sent = outbox
        .enqueue(NewOp::create("t", "a", json!({})))
        .await
        .unwrap();
    let never = outbox
        .enqueue(NewOp::create("t", "b", json!({})))
        .await
        .unwrap();
    // `a` is sent twice and given up on; `b` fails before any send.
    outbox
        .fenced(&fence)
        .fail(never.op_id, "upcast failed")
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .retry_later(sent.op_id, T0, "503")
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .fail(sent.op_id, "gave up after 2 attempts: 503")
        .await
        .unwrap();
    assert_eq!(outbox.retry_all_failed().await.unwrap(), 2);

    let op = outbox.get(sent.op_id).await.unwrap().unwrap();
    assert_eq!(
        (op.state, op.attempts, op.last_error.as_deref()),
        (OpState::Pending, 0, None)
    );
    assert_eq!(op.idempotency_key, sent.idempotency_key);
    assert_eq!(op.next_attempt_at, T0);
    let last = op.history.last().unwrap();
    assert_eq!(last.event, "retried");
    assert_eq!(
        last.detail,
        "failed after 2 attempt(s): gave up after 2 attempts: 503"
    );
    assert!(!op.never_attempted(), "its key may be applied");
    assert!(matches!(
        outbox.cancel(sent.op_id).await.unwrap_err(),
        OutboxError::AlreadyAttempted { attempts: 0, .. }
    ));
    assert!(matches!(
        outbox
            .edit_payload(sent.op_id, json!({"x": 1}))
            .await
            .unwrap_err(),
        OutboxError::AlreadyAttempted { .. }
    ));
    let behind = outbox
        .enqueue(NewOp::update("t", "a", json!({"x": 2})))
        .await
        .unwrap();
    assert!(behind.coalesced.is_none(), "coalesced into a sent op");

    let op = outbox.get(never.op_id).await.unwrap().unwrap();
    assert_eq!((op.attempts, op.last_error.as_deref()), (0, None));
    assert_eq!(op.history.last().unwrap().event, "requeued");
    assert!(op.never_attempted());
    let merged = outbox
        .enqueue(NewOp::update("t", "b", json!({"y": 1})))
        .await
        .unwrap();
    assert!(merged.coalesced.is_some());
    outbox.cancel(never.op_id).await.unwrap();

    // A full budget again: claiming counts from zero.
    let got = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|o| (o.op_id, o.attempts))
            .collect::<Vec<_>>(),
        [(sent.op_id, 1)]
    );
}

/// One spelling of the state names everywhere: `in_flight`, as stored and
/// serialized; the older `in-flight` is still read.
#[test]
fn state_names_have_one_spelling() {
    assert_eq!(
        serde_json::to_value(OpState::InFlight).unwrap(),
        json!("in_flight")
    );
    assert_eq!(OpState::InFlight.as_str(), "in_flight");
    for name in ["in_flight", "in-flight"] {
        assert_eq!(
            serde_json::from_value::<OpState>(json!(name)).unwrap(),
            OpState::InFlight
        );
    }
}

#[tokio::test]
async fn cancel_and_edit_only_never_attempted_ops() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let outbox = open_with(&path(&dir), opts(&clock).coalesce(false)).await;
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let a = outbox
        .enqueue(NewOp::create("t", "a", json!({"v": 1})))
        .await
        .unwrap();
    let b = outbox
        .enqueue(
            NewOp::update("t", "b", json!({"v": 1}))
                .with_base_version(7)
                .with_txn_token("tb"),
        )
        .await
        .unwrap();
    let b2 = outbox
        .enqueue(NewOp::update("t", "b", json!({"v": 2})))
        .await
        .unwrap();
    outbox.edit_payload(a.op_id, json!({"v": 9})).await.unwrap();
    assert_eq!(
        outbox.get(a.op_id).await.unwrap().unwrap().payload,
        json!({"v": 9})
    );
    assert!(matches!(
        outbox.edit_payload(a.op_id, json!([1])).await.unwrap_err(),
        OutboxError::InvalidPayload(_)
    ));
    // Cancelling b: b2 was chained on b and now stands on b's base.
    outbox.cancel(b.op_id).await.unwrap();
    let op = outbox.get(b2.op_id).await.unwrap().unwrap();
    assert_eq!((op.base_version, op.chained), (Some(7), false));
    assert_eq!(
        outbox.txn_outcome("tb").await.unwrap(),
        Some(TxnOutcome::Failed {
            error: "cancelled".into()
        })
    );
    // Once attempted, an op is immutable even when back to pending.
    let got = outbox.fenced(&fence).claim_ready(1, T0).await.unwrap();
    assert_eq!(got[0].op_id, a.op_id);
    assert!(matches!(
        outbox.cancel(a.op_id).await.unwrap_err(),
        OutboxError::WrongState { .. }
    ));
    outbox
        .fenced(&fence)
        .retry_later(a.op_id, T0, "timeout")
        .await
        .unwrap();
    assert!(matches!(
        outbox.cancel(a.op_id).await.unwrap_err(),
        OutboxError::AlreadyAttempted { attempts: 1, .. }
    ));
    assert!(matches!(
        outbox.edit_payload(a.op_id, json!({})).await.unwrap_err(),
        OutboxError::AlreadyAttempted { .. }
    ));
    assert_eq!(
        outbox.get(a.op_id).await.unwrap().unwrap().payload,
        json!({"v": 9})
    );
}

#[tokio::test]
async fn version_chain_passes_the_acked_version_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let outbox = open_with(&path(&dir), opts(&clock).coalesce(false)).await;
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let u1 = outbox
        .enqueue(NewOp::update("t", "a", json!({"v": 1})).with_base(json!({"v": 0}), 3))
        .await
        .unwrap();
    let u2 = outbox
        .enqueue(NewOp::update("t", "a", json!({"v": 2})))
        .await
        .unwrap();
    let d = outbox.enqueue(NewOp::delete("t", "a")).await.unwrap();
    let op2 = outbox.get(u2.op_id).await.unwrap().unwrap();
    assert!(op2.chained);
    let op1 = outbox.get(u1.op_id).await.unwrap().unwrap();
    assert!(!op1.chained);
    assert_eq!(op1.base_version, Some(3));
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .ack(
            u1.op_id,
            Ack {
                version: Some(4),
                data: Some(json!({"v": 1})),
            },
        )
        .await
        .unwrap();
    let op2 = outbox.get(u2.op_id).await.unwrap().unwrap();
    assert_eq!((op2.base_version, op2.chained), (Some(4), false));
    assert_eq!(op2.base, Some(json!({"v": 1})));
    // The chain survives a restart: it is stored.
    outbox.close().await;
    let outbox = open_with(&path(&dir), opts(&clock).coalesce(false)).await;
    assert!(outbox.get(d.op_id).await.unwrap().unwrap().chained);
    let got = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    assert_eq!(got[0].op_id, u2.op_id);
    outbox
        .fenced(&fence)
        .ack(
            u2.op_id,
            Ack {
                version: Some(5),
                data: None,
            },
        )
        .await
        .unwrap();
    let del = outbox.get(d.op_id).await.unwrap().unwrap();
    assert_eq!((del.base_version, del.chained), (Some(5), false));
}

#[tokio::test]
async fn reconciled_retry_gets_a_new_key_and_history() {
    let (_dir, clock, outbox, fence) = fresh().await;
    let e = outbox
        .enqueue(NewOp::update("t", "a", json!({"x": 1})).with_base(json!({}), 1))
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(1, T0).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let key = outbox
        .fenced(&fence)
        .reconciled(
            e.op_id,
            Reconciled {
                kind: None,
                payload: json!({"x": 1, "y": 2}),
                base: Some(json!({"y": 2})),
                base_version: Some(2),
                detail: "merged y from server".into(),
            },
        )
        .await
        .unwrap();
    let op = outbox.get(e.op_id).await.unwrap().unwrap();
    assert_ne!(key, e.idempotency_key);
    assert_eq!(op.idempotency_key, key);
    assert_eq!(op.state, OpState::Pending);
    assert_eq!(op.next_attempt_at, T0 + 1_000);
    assert_eq!((op.base_version, op.reconciliations), (Some(2), 1));
    assert_eq!(op.payload, json!({"x": 1, "y": 2}));
    assert_eq!(op.history.len(), 1);
    assert_eq!(op.history[0].event, "reconciled");
    assert_eq!(op.history[0].old_idempotency_key, Some(e.idempotency_key));
    // Not in flight any more: a second reconcile is refused.
    let again = Reconciled {
        kind: None,
        payload: json!({}),
        base: None,
        base_version: None,
        detail: String::new(),
    };
    assert!(matches!(
        outbox
            .fenced(&fence)
            .reconciled(e.op_id, again)
            .await
            .unwrap_err(),
        OutboxError::WrongState { .. }
    ));
}

#[tokio::test]
async fn coalescing_rules_apply_in_the_enqueue_transaction() {
    let (_dir, _clock, outbox, fence) = fresh().await;
    // UPDATE into a never-sent CREATE: one op, new payload, kind create.
    let c = outbox
        .enqueue(NewOp::create("t", "a", json!({"v": 1})).with_txn_token("t1"))
        .await
        .unwrap();
    let u = outbox
        .enqueue(NewOp::update("t", "a", json!({"v": 2})).with_txn_token("t2"))
        .await
        .unwrap();
    assert_eq!(u.op_id, c.op_id);
    assert_eq!(
        u.coalesced,
        Some(Coalesced::MergedInto {
            op_id: c.op_id,
            seq: c.seq
        })
    );
    let op = outbox.get(c.op_id).await.unwrap().unwrap();
    assert_eq!((op.kind, op.coalesced_count), (OpKind::Create, 1));
    assert_eq!(op.payload, json!({"v": 2}));
    assert_eq!(op.txn_tokens, ["t1", "t2"]);
    // DELETE annihilates it; nothing stored; tokens succeed.
    let d = outbox
        .enqueue(NewOp::delete("t", "a").with_txn_token("t3"))
        .await
        .unwrap();
    let Some(Coalesced::Annihilated { removed }) = d.coalesced else {
        panic!("{d:?}")
    };
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].txn_tokens, ["t1", "t2"]);
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    for t in ["t1", "t2", "t3"] {
        assert_eq!(
            outbox.txn_outcome(t).await.unwrap(),
            Some(TxnOutcome::Succeeded),
            "{t}"
        );
    }
    // An attempted CREATE is never merged into: the UPDATE is stored, chained.
    let c = outbox
        .enqueue(NewOp::create("t", "b", json!({"v": 1})))
        .await
        .unwrap();
    let got = outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .retry_later(got[0].op_id, T0, "lost mid-flight")
        .await
        .unwrap();
    let u1 = outbox
        .enqueue(
            NewOp::update("t", "b", json!({"v": 2}))
                .with_base(json!({"v": 1}), 1)
                .with_txn_token("u1"),
        )
        .await
        .unwrap();
    assert_eq!(u1.coalesced, None);
    let u2 = outbox
        .enqueue(NewOp::update("t", "b", json!({"v": 3})))
        .await
        .unwrap();
    assert_eq!(
        u2.op_id, u1.op_id,
        "second update merges into the first (never attempted)"
    );
    let op = outbox.get(u1.op_id).await.unwrap().unwrap();
    assert_eq!(op.payload, json!({"v": 3}));
    assert_eq!(
        (op.base_version, op.chained),
        (Some(1), true),
        "keeps the earliest base"
    );
    // DELETE replaces the never-sent updates, keeps the attempted create.
    let d = outbox.enqueue(NewOp::delete("t", "b")).await.unwrap();
    let Some(Coalesced::ReplacedUpdates { removed }) = &d.coalesced else {
        panic!("{d:?}")
    };
    assert_eq!(removed.len(), 1);
    let del = outbox.get(d.op_id).await.unwrap().unwrap();
    assert_eq!(del.txn_tokens, ["u1"]);
    assert_eq!((del.base_version, del.chained), (Some(1), true));
    assert_eq!(
        outbox.txn_outcome("u1").await.unwrap(),
        Some(TxnOutcome::Pending)
    );
    let ops = outbox.list(ListFilter::default()).await.unwrap();
    assert_eq!(ids(&ops), ["b/create", "b/delete"]);
    assert_eq!(ops[0].op_id, c.op_id);
    // A repeated DELETE folds into the stored one.
    let d2 = outbox.enqueue(NewOp::delete("t", "b")).await.unwrap();
    assert_eq!(d2.op_id, d.op_id);
}

#[tokio::test]
async fn coalescing_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let outbox = open_with(&path(&dir), opts(&clock).coalesce(false)).await;
    outbox
        .enqueue(NewOp::create("t", "a", json!({})))
        .await
        .unwrap();
    outbox
        .enqueue(NewOp::update("t", "a", json!({"v": 1})))
        .await
        .unwrap();
    outbox.enqueue(NewOp::delete("t", "a")).await.unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 3);
}

#[tokio::test]
async fn outcomes_are_delivered_once_and_survive_restart() {
    let (dir, clock, outbox, fence) = fresh().await;
    let a = outbox
        .enqueue(NewOp::create("t", "a", json!({})).with_txn_token("ok"))
        .await
        .unwrap();
    let b = outbox
        .enqueue(NewOp::create("t", "b", json!({})).with_txn_token("bad"))
        .await
        .unwrap();
    outbox.fenced(&fence).claim_ready(10, T0).await.unwrap();
    outbox
        .fenced(&fence)
        .ack(a.op_id, Ack::default())
        .await
        .unwrap();
    outbox.fenced(&fence).fail(b.op_id, "422").await.unwrap();
    outbox.close().await;
    let outbox = open_with(&path(&dir), opts(&clock)).await;
    let pending = outbox.undelivered_outcomes(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].token, "ok");
    assert_eq!(pending[0].outcome, TxnOutcome::Succeeded);
    assert_eq!(
        pending[1].outcome,
        TxnOutcome::Failed {
            error: "422".into()
        }
    );
    outbox
        .mark_outcomes_delivered(vec![pending[0].id])
        .await
        .unwrap();
    let left = outbox.undelivered_outcomes(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].token, "bad");
    assert_eq!(
        outbox.txn_outcome("ok").await.unwrap(),
        Some(TxnOutcome::Succeeded)
    );
    assert_eq!(outbox.txn_outcome("never").await.unwrap(), None);
}

#[tokio::test]
async fn upcasters_migrate_old_payloads_and_failures_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let p = path(&dir);
    let v1 = open_with(&p, opts(&clock).coalesce(false)).await;
    let a = v1
        .enqueue(NewOp::update("t", "a", json!({"name": "x"})).with_txn_token("ta"))
        .await
        .unwrap();
    let b = v1
        .enqueue(NewOp::update("t", "b", json!({"oops": 1})))
        .await
        .unwrap();
    let d = v1.enqueue(NewOp::delete("t", "c")).await.unwrap();
    v1.close().await;
    let up = Upcasters::new().register(1, |entity_type, mut v| {
        if v.get("oops").is_some() {
            return Err("cannot migrate oops".into());
        }
        v["kind"] = json!(entity_type);
        Ok(v)
    });
    let (v2, report) = Outbox::open(&p, opts(&clock).envelope_version(2).upcasters(up))
        .await
        .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (2, 1));
    let op = v2.get(a.op_id).await.unwrap().unwrap();
    assert_eq!(op.payload, json!({"name": "x", "kind": "t"}));
    assert_eq!(op.envelope_version, 2);
    assert_eq!(op.history[0].event, "upcast");
    let failed = v2.get(b.op_id).await.unwrap().unwrap();
    assert_eq!(failed.state, OpState::Failed);
    assert!(failed.last_error.unwrap().contains("cannot migrate oops"));
    assert_eq!(v2.get(d.op_id).await.unwrap().unwrap().envelope_version, 2);
    v2.close().await;
    // No upcaster for v2 -> v3: ops with data fail, nothing is dropped (a
    // delete has no data to migrate).
    let (v3, report) = Outbox::open(&p, opts(&clock).envelope_version(3))
        .await
        .unwrap();
    assert_eq!((report.upcast, report.upcast_failed), (1, 2));
    assert_eq!(v3.stats().await.unwrap().failed, 2);
    assert_eq!(v3.get(d.op_id).await.unwrap().unwrap().envelope_version, 3);
    assert_eq!(
        v3.txn_outcome("ta").await.unwrap(),
        Some(TxnOutcome::Failed {
            error: "no upcaster registered from envelope version 2".into()
        })
    );
}

#[tokio::test]
async fn concurrent_enqueuers_share_commits_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_with(&path(&dir), OutboxOptions::default()).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let o = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                ids.push(
                    o.enqueue(NewOp::create("t", format!("w{t}-{i}"), json!({"i": i})))
                        .await
                        .unwrap()
                        .op_id,
                );
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 400);
    let listed = outbox
        .list(ListFilter {
            limit: 1000,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 400);
    // FIFO per task: each worker's ops appear in its own order.
    for t in 0..8 {
        let mine: Vec<_> = listed
            .iter()
            .filter(|o| o.entity_id.starts_with(&format!("w{t}-")))
            .collect();
        let order: Vec<i64> = mine
            .iter()
            .map(|o| o.payload["i"].as_i64().unwrap())
            .collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn meta_stats_paging_and_check() {
    let (_dir, clock, outbox, fence) = fresh().await;
    assert_eq!(outbox.meta_get("cursor").await.unwrap(), None);
    outbox.meta_set("cursor", "42").await.unwrap();
    outbox.meta_set("cursor", "43").await.unwrap();
    assert_eq!(
        outbox.meta_get("cursor").await.unwrap().as_deref(),
        Some("43")
    );
    let s = outbox.stats().await.unwrap();
    assert_eq!(
        (s.pending, s.oldest_created_at, s.next_attempt_at),
        (0, None, None)
    );
    for i in 0..5 {
        outbox
            .enqueue(NewOp::create("t", format!("e{i}"), json!({})))
            .await
            .unwrap();
        clock.advance(Duration::from_millis(10));
    }
    let got = outbox
        .fenced(&fence)
        .claim_ready(1, clock_now(&clock))
        .await
        .unwrap();
    outbox
        .fenced(&fence)
        .retry_later(got[0].op_id, T0 + 99_999, "x")
        .await
        .unwrap();
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.pending, s.in_flight, s.failed), (5, 0, 0));
    assert_eq!(s.oldest_created_at, Some(T0));
    assert_eq!(s.next_attempt_at, Some(T0 + 10));
    let page1 = outbox
        .list(ListFilter {
            state: None,
            limit: 2,
            after_seq: 0,
        })
        .await
        .unwrap();
    let page2 = outbox
        .list(ListFilter {
            state: Some(OpState::Pending),
            limit: 10,
            after_seq: page1[1].seq,
        })
        .await
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 5);
    let report = outbox.check().await.unwrap();
    assert!(report.ok && report.problems.is_empty() && !report.reindexed);
}

fn clock_now(clock: &Arc<ManualClock>) -> i64 {
    use guardian_sync::clock::Clock;
    clock.now_millis()
}

#[tokio::test]
async fn a_newer_schema_is_refused_not_downgraded() {
    let dir = tempfile::tempdir().unwrap();
    let p = path(&dir);
    {
        // As a newer version would write it: marked as an outbox.
        let conn = rusqlite::Connection::open(&p).unwrap();
        conn.pragma_update(None, "application_id", 0x4753_4F42)
            .unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Outbox::open(&p, OutboxOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn closed_outbox_reports_closed() {
    let (_dir, _clock, outbox, _) = fresh().await;
    outbox.close().await;
    assert_eq!(
        outbox
            .enqueue(NewOp::create("t", "a", json!({})))
            .await
            .unwrap_err(),
        EnqueueError::Closed
    );
    assert_eq!(outbox.stats().await.unwrap_err(), OutboxError::Closed);
}

/// `enqueue_blocking` from plain threads (an FFI binding's, a sync app's):
/// a lone caller commits on its own thread, concurrent callers (threads and
/// async tasks together) share group commits; every op is stored exactly
/// once, each caller's ops in order, coalescing and validation as for
/// `enqueue`, and nothing is accepted after close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_enqueue_from_threads_shares_commits_with_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    // FULL: the lone path commits with its own fsync.
    let outbox = open_with(&path(&dir), opts(&clock).synchronous(Synchronous::Full)).await;

    // A lone caller, on a thread outside the runtime.
    let lone = outbox.clone();
    let (first, merged, refused) = std::thread::spawn(move || {
        let first = lone
            .enqueue_blocking(NewOp::create("lamp", "solo", json!({"on": false})))
            .unwrap();
        let merged = lone
            .enqueue_blocking(NewOp::update("lamp", "solo", json!({"on": true})))
            .unwrap();
        let refused = lone.enqueue_blocking(NewOp::create("lamp", "bad", json!([1])));
        (first, merged, refused)
    })
    .join()
    .unwrap();
    assert_eq!(
        merged.coalesced,
        Some(Coalesced::MergedInto {
            op_id: first.op_id,
            seq: first.seq
        })
    );
    assert!(matches!(
        refused,
        Err(EnqueueError::PayloadNotObject { .. })
    ));

    // 4 threads and 4 tasks at once, 40 ops each on entities of their own.
    let threads: Vec<_> = (0..4)
        .map(|w| {
            let o = outbox.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|k| {
                        o.enqueue_blocking(NewOp::create(
                            "lamp",
                            format!("t{w}-{k}"),
                            json!({"k": k}),
                        ))
                        .unwrap()
                        .seq
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let o = outbox.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for k in 0..40 {
                    let e = o
                        .enqueue(NewOp::create("lamp", format!("a{w}-{k}"), json!({"k": k})))
                        .await
                        .unwrap();
                    seqs.push(e.seq);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<Vec<i64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    for seqs in &all {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a caller's ops in order"
        );
    }
    let stored = outbox
        .list(ListFilter {
            state: None,
            limit: 1000,
            after_seq: 0,
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 1 + 8 * 40);
    let mut seen: Vec<i64> = all.concat();
    seen.push(first.seq);
    seen.sort_unstable();
    let mut listed: Vec<i64> = stored.iter().map(|o| o.seq).collect();
    listed.sort_unstable();
    assert_eq!(seen, listed, "each op stored exactly once, at its position");

    outbox.close().await;
    let after = outbox.clone();
    let closed = std::thread::spawn(move || {
        after.enqueue_blocking(NewOp::create("lamp", "late", json!({})))
    })
    .join()
    .unwrap();
    assert!(matches!(closed, Err(EnqueueError::Closed)), "{closed:?}");
    // Everything acknowledged is in the file.
    let reopened = open_with(&path(&dir), opts(&clock)).await;
    assert_eq!(reopened.stats().await.unwrap().pending, 1 + 8 * 40);
}
