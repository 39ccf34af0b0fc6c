//! ProcessingLock rules on a real outbox file with a manual clock: no
//! sleeping, every takeover decided by the injected monotonic time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use guardian_sync::clock::{Clock, ManualClock, SharedClock};
use guardian_sync::lock::{Acquired, LockConfig, LockError, ProcessingLock};
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxError, OutboxOptions};
use serde_json::json;

const S: fn(u64) -> Duration = Duration::from_secs;

async fn outbox(dir: &tempfile::TempDir, clock: SharedClock) -> Outbox {
    Outbox::open(
        dir.path().join("o.db"),
        OutboxOptions::default().clock(clock),
    )
    .await
    .unwrap()
    .0
}

fn config() -> LockConfig {
    LockConfig::new(S(10), S(120)).unwrap()
}

async fn acquired(lock: &mut ProcessingLock) -> (guardian_sync::op::Fence, Option<String>) {
    match lock.try_acquire().await.unwrap() {
        Acquired::Yes {
            fence,
            took_over_from,
        } => (fence, took_over_from),
        Acquired::No { retry_in } => panic!("not acquired (retry in {retry_in:?})"),
    }
}

#[tokio::test]
async fn a_live_holder_keeps_the_lock_and_a_released_one_is_free_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let ob = outbox(&dir, clock.clone()).await;
    let mut a = ProcessingLock::new(ob.clone(), "a", config(), clock.clone());
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    let (fa, _) = acquired(&mut a).await;
    assert_eq!(fa.epoch(), 1);
    // A beats every 10 s for 10 minutes: B never takes over.
    for _ in 0..60 {
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquired::No { .. }
        ));
        clock.advance(S(10));
        a.heartbeat().await.unwrap();
    }
    a.release().await.unwrap();
    let (fb, took) = acquired(&mut b).await;
    assert_eq!((fb.epoch(), took), (2, None));
}

#[tokio::test]
async fn a_hung_holder_is_replaced_after_the_threshold_and_its_writes_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let ob = outbox(&dir, clock.clone()).await;
    let e = ob
        .enqueue(NewOp::create("device", "d1", json!({})))
        .await
        .unwrap();
    let mut a = ProcessingLock::new(ob.clone(), "a", config(), clock.clone());
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    let (fa, _) = acquired(&mut a).await;
    let claimed = ob
        .fenced(&fa)
        .claim_ready(10, clock.now_millis())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // A hangs (alive, OS lock held, no beats). B watches on its own clock.
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquired::No { .. }
    ));
    clock.advance(S(119));
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquired::No { .. }
    ));
    clock.advance(S(1));
    let (fb, took) = acquired(&mut b).await;
    assert_eq!((fb.epoch(), took.as_deref()), (2, Some("a")));
    // The takeover put A's in-flight op back to pending for B.
    let again = ob
        .fenced(&fb)
        .claim_ready(10, clock.now_millis())
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].idempotency_key, e.idempotency_key,
        "same key on re-send"
    );
    // A wakes up: every write is refused, its heartbeat reports the loss.
    assert!(matches!(
        ob.fenced(&fa).ack(e.op_id, Default::default()).await,
        Err(OutboxError::LockLost)
    ));
    assert!(matches!(a.heartbeat().await, Err(LockError::Lost)));
    ob.fenced(&fb)
        .ack(e.op_id, Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dead_holder_is_replaced_at_once_through_the_os_lock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let ob = outbox(&dir, clock.clone()).await;
    let mut a = ProcessingLock::new(ob.clone(), "a", config(), clock.clone());
    let (fa, _) = acquired(&mut a).await;
    // The process dies: its OS lock goes with it, the row stays.
    drop(a);
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    let (fb, took) = acquired(&mut b).await;
    assert_eq!((fb.epoch(), took.as_deref()), (fa.epoch() + 1, Some("a")));
}

#[tokio::test]
async fn wall_clock_jumps_cause_no_false_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000_000);
    let ob = outbox(&dir, clock.clone()).await;
    let mut a = ProcessingLock::new(ob.clone(), "a", config(), clock.clone());
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    acquired(&mut a).await;
    for jump in [3_600_000, -7_200_000, 86_400_000, -86_400_000] {
        clock.jump_wall(jump);
        assert!(matches!(
            b.try_acquire().await.unwrap(),
            Acquired::No { .. }
        ));
        clock.advance(S(5));
        a.heartbeat().await.unwrap();
    }
}

#[tokio::test]
async fn two_contenders_for_a_stale_lock_produce_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let ob = outbox(&dir, clock.clone()).await;
    let mut a = ProcessingLock::new(ob.clone(), "a", config(), clock.clone());
    acquired(&mut a).await;
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    let mut c = ProcessingLock::new(ob.clone(), "c", config(), clock.clone());
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquired::No { .. }
    ));
    assert!(matches!(
        c.try_acquire().await.unwrap(),
        Acquired::No { .. }
    ));
    clock.advance(S(121));
    let rb = b.try_acquire().await.unwrap();
    let rc = c.try_acquire().await.unwrap();
    let winners = [&rb, &rc]
        .iter()
        .filter(|r| matches!(r, Acquired::Yes { .. }))
        .count();
    assert_eq!(winners, 1, "{rb:?} {rc:?}");
}

#[tokio::test]
async fn a_database_held_by_a_frozen_writer_reads_as_held_not_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let ob = Outbox::open(
        dir.path().join("o.db"),
        OutboxOptions::default()
            .clock(clock.clone())
            .busy_timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap()
    .0;
    // Another process froze inside a write transaction.
    let frozen = rusqlite::Connection::open(dir.path().join("o.db")).unwrap();
    frozen
        .execute_batch("BEGIN IMMEDIATE; UPDATE meta SET value = value;")
        .unwrap();
    let mut b = ProcessingLock::new(ob.clone(), "b", config(), clock.clone());
    assert!(matches!(
        b.try_acquire().await.unwrap(),
        Acquired::No { .. }
    ));
    frozen.execute_batch("ROLLBACK").unwrap();
    acquired(&mut b).await;
}
