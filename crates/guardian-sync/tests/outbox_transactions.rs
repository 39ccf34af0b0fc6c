//! Atomic transactions and dependencies in the outbox (issue 20): stored
//! together, gated behind earlier ops of their entities and their
//! dependencies, claimed whole, failed, retried, discarded and cancelled
//! whole, never coalesced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use guardian_sync::op::{Ack, NewOp, OpState};
use guardian_sync::outbox::{EnqueueError, Outbox, OutboxOptions};
use serde_json::json;

const NOW: i64 = i64::MAX / 2;

async fn open(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(dir.path().join("o.db"), OutboxOptions::default())
        .await
        .unwrap()
        .0
}

fn scene(ids: &[&str]) -> Vec<NewOp> {
    ids.iter()
        .map(|id| NewOp::update("device", *id, json!({"scene": "night"})))
        .collect()
}

#[tokio::test]
async fn a_transaction_is_stored_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let txn = outbox
        .enqueue_transaction(scene(&["a", "b", "c"]))
        .await
        .unwrap();
    assert_eq!(txn.ops.len(), 3);
    for e in &txn.ops {
        let op = outbox.get(e.op_id).await.unwrap().unwrap();
        let t = op.txn.unwrap();
        assert_eq!((t.id, t.size), (txn.txn_id, 3));
    }
    // One invalid op refuses the whole transaction: nothing is stored.
    let mut bad = scene(&["d", "e"]);
    bad.push(NewOp::update("device", "..", json!({})));
    assert!(outbox.enqueue_transaction(bad).await.is_err());
    assert!(matches!(
        outbox.enqueue_transaction(Vec::new()).await,
        Err(EnqueueError::TransactionSize { count: 0, .. })
    ));
    assert_eq!(outbox.stats().await.unwrap().pending, 3);
    outbox.close().await;
}

#[tokio::test]
async fn a_transaction_waits_for_earlier_ops_of_each_entity_and_is_claimed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let before = outbox
        .enqueue(NewOp::create("device", "b", json!({"on": false})))
        .await
        .unwrap();
    let txn = outbox
        .enqueue_transaction(vec![
            NewOp::create("device", "a", json!({"on": true})),
            NewOp::update("device", "b", json!({"on": true})),
            NewOp::update("device", "a", json!({"on": false})),
        ])
        .await
        .unwrap();
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    // Only b's earlier create may go: the transaction waits behind it.
    let first = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        first.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        [before.op_id]
    );
    assert!(outbox
        .fenced(&fence)
        .claim_ready(10, NOW)
        .await
        .unwrap()
        .is_empty());
    outbox
        .fenced(&fence)
        .ack(before.op_id, Ack::default())
        .await
        .unwrap();
    // Now the whole transaction comes, in order, even with a limit of one.
    let claimed = outbox.fenced(&fence).claim_ready(1, NOW).await.unwrap();
    let ids: Vec<_> = claimed.iter().map(|o| o.op_id).collect();
    let want: Vec<_> = txn.ops.iter().map(|e| e.op_id).collect();
    assert_eq!(ids, want);
    assert!(claimed.iter().all(|o| o.state == OpState::InFlight));
    // Chained claims (batching) also take it whole, as one unit.
    outbox
        .fenced(&fence)
        .release_claimed(ids.clone())
        .await
        .unwrap();
    let chains = outbox
        .fenced(&fence)
        .claim_ready_chains(100, NOW, 100, 1 << 20)
        .await
        .unwrap();
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].iter().map(|o| o.op_id).collect::<Vec<_>>(), want);
    outbox.close().await;
}

#[tokio::test]
async fn a_failed_transaction_is_dead_lettered_retried_and_discarded_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let txn = outbox
        .enqueue_transaction(scene(&["a", "b"]))
        .await
        .unwrap();
    let ids: Vec<_> = txn.ops.iter().map(|e| e.op_id).collect();
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    outbox
        .fenced(&fence)
        .fail_many(ids.iter().map(|id| (*id, "refused".to_owned())).collect())
        .await
        .unwrap();
    assert_eq!(outbox.stats().await.unwrap().failed, 2);
    // Retrying one op retries the transaction.
    outbox.retry_failed(ids[1]).await.unwrap();
    for id in &ids {
        assert_eq!(
            outbox.get(*id).await.unwrap().unwrap().state,
            OpState::Pending
        );
    }
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(claimed.len(), 2);
    outbox
        .fenced(&fence)
        .fail_many(ids.iter().map(|id| (*id, "refused".to_owned())).collect())
        .await
        .unwrap();
    // Discarding one discards it all.
    outbox.discard(ids[0]).await.unwrap();
    assert!(outbox.get(ids[1]).await.unwrap().is_none());
    // Cancelling one never-sent op cancels the whole transaction.
    let again = outbox
        .enqueue_transaction(scene(&["c", "d"]))
        .await
        .unwrap();
    outbox.cancel(again.ops[1].op_id).await.unwrap();
    assert!(outbox.get(again.ops[0].op_id).await.unwrap().is_none());
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    outbox.close().await;
}

#[tokio::test]
async fn coalescing_never_crosses_a_transaction_or_a_dependency() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let txn = outbox.enqueue_transaction(scene(&["a"])).await.unwrap();
    // A later update of the same entity is not merged into the transaction.
    let later = outbox
        .enqueue(NewOp::update("device", "a", json!({"scene": "day"})))
        .await
        .unwrap();
    assert!(later.coalesced.is_none());
    assert_ne!(later.op_id, txn.ops[0].op_id);
    // An op others depend on is not merged away or annihilated.
    let parent = outbox
        .enqueue(NewOp::create("room", "r1", json!({"n": 1})))
        .await
        .unwrap();
    let child = outbox
        .enqueue(NewOp::create("device", "x", json!({"room": "r1"})).with_dependency(parent.op_id))
        .await
        .unwrap();
    let delete = outbox.enqueue(NewOp::delete("room", "r1")).await.unwrap();
    assert!(delete.coalesced.is_none(), "{delete:?}");
    assert!(outbox.get(parent.op_id).await.unwrap().is_some());
    assert!(outbox.get(child.op_id).await.unwrap().is_some());
    outbox.close().await;
}

#[tokio::test]
async fn a_dependent_waits_for_its_dependency_and_fails_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let parent = outbox
        .enqueue(NewOp::create("room", "r1", json!({"n": 1})))
        .await
        .unwrap();
    let child = outbox
        .enqueue(NewOp::create("device", "x", json!({"room": "r1"})).with_dependency(parent.op_id))
        .await
        .unwrap();
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        claimed.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        [parent.op_id],
        "the child is on another entity but waits for its parent"
    );
    outbox
        .fenced(&fence)
        .fail(parent.op_id, "refused")
        .await
        .unwrap();
    let failed = outbox.get(child.op_id).await.unwrap().unwrap();
    assert_eq!(failed.state, OpState::Failed);
    let error = failed.last_error.unwrap();
    assert!(
        error.starts_with(&format!("dependency {} failed", parent.op_id)),
        "{error}"
    );
    // A new dependent of a failed op is refused, nothing stored.
    assert!(matches!(
        outbox
            .enqueue(NewOp::create("device", "y", json!({})).with_dependency(parent.op_id))
            .await,
        Err(EnqueueError::DependencyFailed { .. })
    ));
    // Retrying the parent retries the child it took down; the child waits
    // again until the parent is acknowledged.
    outbox.retry_failed(parent.op_id).await.unwrap();
    assert_eq!(
        outbox.get(child.op_id).await.unwrap().unwrap().state,
        OpState::Pending
    );
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        claimed.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        [parent.op_id]
    );
    outbox
        .fenced(&fence)
        .ack(parent.op_id, Ack::default())
        .await
        .unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        claimed.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        [child.op_id]
    );
    // A dependency already acknowledged (gone) is met at once.
    outbox
        .fenced(&fence)
        .ack(child.op_id, Ack::default())
        .await
        .unwrap();
    let late = outbox
        .enqueue(NewOp::create("device", "z", json!({})).with_dependency(parent.op_id))
        .await
        .unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        claimed.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        [late.op_id]
    );
    outbox.close().await;
}

#[tokio::test]
async fn a_transaction_survives_a_reopen_and_keeps_its_seals() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let txn = outbox
        .enqueue_transaction(scene(&["a", "b"]))
        .await
        .unwrap();
    outbox.close().await;
    let outbox = open(&dir).await;
    let report = outbox.check().await.unwrap();
    assert!(report.ok, "{report:?}");
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    let claimed = outbox.fenced(&fence).claim_ready(10, NOW).await.unwrap();
    assert_eq!(
        claimed.iter().map(|o| o.op_id).collect::<Vec<_>>(),
        txn.ops.iter().map(|e| e.op_id).collect::<Vec<_>>()
    );
    outbox.close().await;
}

/// A salvage that loses some ops of a transaction fails what is left of
/// it instead of sending it in part; whole transactions keep their unit.
#[tokio::test]
async fn a_salvage_never_leaves_a_transaction_in_part() {
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("built.db");
    let options = || {
        OutboxOptions::default()
            .synchronous(guardian_sync::outbox::Synchronous::Off)
            .preallocate_wal(false)
    };
    {
        let (outbox, _) = Outbox::open(&built, options()).await.unwrap();
        for t in 0..300 {
            let ops = (0..3)
                .map(|i| {
                    NewOp::create(
                        "device",
                        format!("t{t}-{i}"),
                        json!({"pad": "p".repeat(1500)}),
                    )
                })
                .collect();
            outbox.enqueue_transaction(ops).await.unwrap();
        }
        outbox.close().await;
    }
    let bytes = std::fs::read(&built).unwrap();
    // Two ops fill a page: cutting the file page by page from 60 %, a cut
    // soon falls inside a transaction.
    let first_cut = bytes.len() * 6 / 10 / 4096;
    let mut cut_one = false;
    for cut_pages in first_cut..first_cut + 8 {
        let path = dir.path().join(format!("cut-{cut_pages}.db"));
        std::fs::write(&path, &bytes[..cut_pages * 4096]).unwrap();
        let (outbox, report) = Outbox::open(&path, options()).await.unwrap();
        let salvage = report.salvage.expect("the truncation must be found");
        let ops = outbox
            .list(guardian_sync::outbox::ListFilter {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut by_txn: std::collections::BTreeMap<uuid::Uuid, Vec<&guardian_sync::op::PendingOp>> =
            Default::default();
        for op in &ops {
            by_txn
                .entry(op.txn.expect("every op is in a transaction").id)
                .or_default()
                .push(op);
        }
        let mut whole = 0;
        for members in by_txn.values() {
            if members.len() == 3 {
                whole += 1;
                assert!(
                    members.iter().all(|m| m.state == OpState::Pending),
                    "{members:?}"
                );
            } else {
                cut_one = true;
                for m in members {
                    assert_eq!(m.state, OpState::Failed, "{m:?}");
                    let error = m.last_error.clone().unwrap_or_default();
                    assert!(error.contains("is incomplete"), "{error}");
                }
            }
        }
        assert!(whole > 0, "no whole transaction survived: {salvage:?}");
        // Claims take only whole transactions.
        let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
        let claimed = outbox
            .fenced(&fence)
            .claim_ready(10_000, NOW)
            .await
            .unwrap();
        assert_eq!(claimed.len(), whole * 3);
        outbox.close().await;
        if cut_one {
            break;
        }
    }
    assert!(cut_one, "no cut fell inside a transaction");
}

/// A transaction that lost an op behind the outbox's back (a row deleted
/// by another program) is failed at the claim, never sent in part.
#[tokio::test]
async fn a_transaction_missing_an_op_is_failed_at_the_claim() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir).await;
    let txn = outbox
        .enqueue_transaction(scene(&["a", "b", "c"]))
        .await
        .unwrap();
    outbox.close().await;
    {
        let conn = rusqlite::Connection::open(dir.path().join("o.db")).unwrap();
        conn.execute(
            "DELETE FROM ops WHERE op_id = ?1",
            [txn.ops[1].op_id.to_string()],
        )
        .unwrap();
    }
    let outbox = open(&dir).await;
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    assert!(outbox
        .fenced(&fence)
        .claim_ready(10, NOW)
        .await
        .unwrap()
        .is_empty());
    for e in [&txn.ops[0], &txn.ops[2]] {
        let op = outbox.get(e.op_id).await.unwrap().unwrap();
        assert_eq!(op.state, OpState::Failed);
        assert!(
            op.last_error
                .as_deref()
                .unwrap_or("")
                .contains("is incomplete"),
            "{op:?}"
        );
    }
    outbox.close().await;
}
