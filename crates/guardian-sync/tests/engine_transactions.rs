//! Atomic transactions and dependencies end to end (issue 20): the engine
//! against the reference server on loopback. Every test reads the server's
//! applied log, where each op of a transaction carries its transaction key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guardian_server::{AppliedMutation, Faults, RunningServer, ServerBuilder};
use guardian_sync::engine::{BatchConfig, SyncEngine, SyncEvent};
use guardian_sync::op::{NewOp, OpState};
use guardian_sync::optimistic::Registration;
use guardian_sync::outbox::ListFilter;
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::StaticToken;
use serde_json::{json, Value};
use tokio::sync::broadcast;

const TOKEN: &str = "tok-a";

async fn server(faults: Faults) -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .faults(faults)
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}

async fn engine(
    dir: &tempfile::TempDir,
    server: &RunningServer,
    batch: Option<BatchConfig>,
) -> SyncEngine {
    let retry = RetryPolicy::new(
        Duration::from_millis(5),
        2.0,
        Duration::from_millis(50),
        20,
        Duration::from_secs(10),
    )
    .unwrap();
    let mut b = SyncEngine::builder()
        .outbox_path(dir.path().join("outbox.db"))
        .server(server.url())
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .retry(retry);
    if let Some(batch) = batch {
        b = b.batching(batch);
    }
    b.build().await.unwrap()
}

async fn drain(engine: &SyncEngine) {
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_empty())
        .await
        .expect("drain did not finish in 60 s")
        .unwrap();
}

fn collect(rx: &mut broadcast::Receiver<SyncEvent>) -> Vec<SyncEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Each transaction's rows in the applied log: all at consecutive
/// cursors (one commit), each key once.
fn transactions(log: &[AppliedMutation]) -> BTreeMap<String, Vec<&AppliedMutation>> {
    let mut keys = std::collections::HashSet::new();
    let mut by_txn: BTreeMap<String, Vec<&AppliedMutation>> = BTreeMap::new();
    for m in log {
        assert!(
            keys.insert(m.idempotency_key.clone()),
            "key applied twice: {m:?}"
        );
        if let Some(t) = &m.transaction_key {
            by_txn.entry(t.clone()).or_default().push(m);
        }
    }
    for (t, rows) in &by_txn {
        for pair in rows.windows(2) {
            assert_eq!(
                pair[1].cursor,
                pair[0].cursor + 1,
                "transaction {t} was not applied in one commit: {rows:?}"
            );
        }
    }
    by_txn
}

async fn get(server: &RunningServer, ty: &str, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/entities/{ty}/{id}", server.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Creates `device/lamp` at `{"on": false, "level": 1}` (version 1) through
/// the engine; another device then sets its level to 9 (version 2).
async fn lamp_changed_elsewhere(engine: &SyncEngine, server: &RunningServer) {
    engine
        .enqueue(NewOp::create(
            "device",
            "lamp",
            json!({"on": false, "level": 1}),
        ))
        .await
        .unwrap();
    drain(engine).await;
    let r = reqwest::Client::new()
        .put(format!("{}/v1/entities/device/lamp", server.url()))
        .bearer_auth(TOKEN)
        .header("idempotency-key", "other-device-1")
        .json(&json!({"data": {"on": false, "level": 9}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_transaction_applies_in_one_commit_after_earlier_ops_of_its_entities() {
    for batch in [None, Some(BatchConfig::default())] {
        let server = server(Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, &server, batch).await;
        let mut events = engine.events();
        engine
            .enqueue(NewOp::create("device", "lamp", json!({"on": false})))
            .await
            .unwrap();
        let txn = engine
            .transaction(vec![
                NewOp::update("device", "lamp", json!({"on": true})),
                NewOp::create("scene", "evening", json!({"lamp": true})),
                NewOp::create("device", "blind", json!({"open": false})),
                NewOp::update("device", "blind", json!({"open": true})),
            ])
            .await
            .unwrap();
        engine
            .enqueue(NewOp::update("device", "lamp", json!({"on": false})))
            .await
            .unwrap();
        drain(&engine).await;
        let log = server.applied_log().await.unwrap();
        let txns = transactions(&log);
        let rows = &txns[&txn.txn_id.to_string()];
        assert_eq!(rows.len(), 4, "{rows:?}");
        // Per-entity order across the transaction: lamp's create before it,
        // its later update after it.
        let lamp: Vec<u64> = log
            .iter()
            .filter(|m| m.id == "lamp")
            .map(|m| m.cursor)
            .collect();
        assert_eq!(lamp.len(), 3);
        assert!(
            lamp[0] < rows[0].cursor && lamp[2] > rows[3].cursor,
            "{log:?}"
        );
        assert_eq!(
            get(&server, "device", "blind").await.1["data"],
            json!({"open": true})
        );
        assert_eq!(
            get(&server, "device", "lamp").await.1["data"],
            json!({"on": false})
        );
        let events = collect(&mut events);
        assert!(events.iter().any(|e| matches!(e,
            SyncEvent::TransactionCommitted { txn_id, ops: 4, .. } if *txn_id == txn.txn_id)));
        engine.outbox().close().await;
    }
}

#[tokio::test]
async fn a_conflict_in_a_transaction_is_merged_and_the_whole_transaction_sent_again() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, None).await;
    lamp_changed_elsewhere(&engine, &server).await;
    let mut events = engine.events();
    let txn = engine
        .transaction(vec![
            NewOp::create("scene", "night", json!({"lamp": "on"})),
            NewOp::update("device", "lamp", json!({"on": true, "level": 1}))
                .with_base(json!({"on": false, "level": 1}), 1),
        ])
        .await
        .unwrap();
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    let txns = transactions(&log);
    assert_eq!(txns[&txn.txn_id.to_string()].len(), 2);
    // Merged: our field, their field.
    assert_eq!(
        get(&server, "device", "lamp").await.1["data"],
        json!({"on": true, "level": 9})
    );
    assert_eq!(get(&server, "scene", "night").await.0, 200);
    let events = collect(&mut events);
    assert!(events
        .iter()
        .any(|e| matches!(e, SyncEvent::Conflict { .. })));
    assert!(events
        .iter()
        .any(|e| matches!(e, SyncEvent::TransactionCommitted { .. })));
    engine.outbox().close().await;
}

/// Two updates of one entity in a transaction, the second made from the
/// app's view after the first: when the first merges with a concurrent
/// change, the second must not lay that view back over the merge.
#[tokio::test]
async fn a_chained_op_in_a_transaction_keeps_what_its_predecessor_merged() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, None).await;
    lamp_changed_elsewhere(&engine, &server).await;
    engine
        .transaction(vec![
            NewOp::update("device", "lamp", json!({"on": true, "level": 1}))
                .with_base(json!({"on": false, "level": 1}), 1),
            NewOp::update(
                "device",
                "lamp",
                json!({"on": true, "level": 1, "color": "red"}),
            ),
        ])
        .await
        .unwrap();
    drain(&engine).await;
    assert_eq!(
        get(&server, "device", "lamp").await.1["data"],
        json!({"on": true, "level": 9, "color": "red"})
    );
    engine.outbox().close().await;
}

#[tokio::test]
async fn a_refused_transaction_fails_whole_and_its_optimistic_update_rolls_back_once() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, None).await;
    let mut events = engine.events();
    let rollbacks = Arc::new(AtomicUsize::new(0));
    let r = rollbacks.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let registration = Registration::new(json!({"before": true}), move || {
        r.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(());
    });
    // The delete of an entity that never existed is refused: the create
    // beside it must not be applied either.
    let (txn, _token) = engine
        .transaction_optimistic(
            vec![
                NewOp::create("scene", "morning", json!({"blinds": "open"})),
                NewOp::delete("device", "ghost"),
            ],
            registration,
        )
        .await
        .unwrap();
    drain(&engine).await;
    assert_eq!(get(&server, "scene", "morning").await.0, 404);
    assert!(server.applied_log().await.unwrap().is_empty());
    let failed = engine
        .outbox()
        .list(ListFilter {
            state: Some(OpState::Failed),
            limit: 10,
            after_seq: 0,
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed
        .iter()
        .all(|op| op.txn.map(|t| t.id) == Some(txn.txn_id)));
    // The rollback runs on the handlers' thread; one for the whole
    // transaction. A second drain settles nothing more.
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    drain(&engine).await;
    assert_eq!(rollbacks.load(Ordering::SeqCst), 1);
    let events = collect(&mut events);
    assert!(events.iter().any(
        |e| matches!(e, SyncEvent::TransactionFailed { txn_id, .. } if *txn_id == txn.txn_id)
    ));
    // Discarding one op discards the transaction.
    engine.outbox().discard(failed[0].op_id).await.unwrap();
    assert_eq!(engine.outbox().stats().await.unwrap().failed, 0);
    engine.outbox().close().await;
}

#[tokio::test]
async fn a_lost_response_after_commit_is_replayed_never_applied_twice() {
    let faults = Faults {
        drop_after_commit_next: 2,
        ..Faults::default()
    };
    let server = server(faults).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, None).await;
    let mut events = engine.events();
    let txn = engine
        .transaction(vec![
            NewOp::create("device", "a", json!({"n": 1})),
            NewOp::create("device", "b", json!({"n": 2})),
        ])
        .await
        .unwrap();
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    assert_eq!(transactions(&log)[&txn.txn_id.to_string()].len(), 2);
    assert_eq!(log.len(), 2, "{log:?}");
    // The answer that got through was a replay, and says so.
    let events = collect(&mut events);
    assert!(
        events.iter().any(|e| matches!(e,
            SyncEvent::TransactionCommitted { txn_id, replayed: true, .. } if *txn_id == txn.txn_id)),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, SyncEvent::OpSucceeded { replayed: true, .. }))
            .count(),
        2
    );
    assert_eq!(engine.outbox().stats().await.unwrap().pending, 0);
    engine.outbox().close().await;
}

#[tokio::test]
async fn a_dependent_on_another_entity_waits_and_fails_with_its_dependency() {
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir, &server, Some(BatchConfig::default())).await;
    let room = engine
        .enqueue(NewOp::create("room", "kitchen", json!({"floor": 1})))
        .await
        .unwrap();
    engine
        .enqueue(
            NewOp::create("device", "oven", json!({"room": "kitchen"})).with_dependency(room.op_id),
        )
        .await
        .unwrap();
    drain(&engine).await;
    let log = server.applied_log().await.unwrap();
    let order: Vec<&str> = log.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(order, ["kitchen", "oven"]);
    engine.outbox().close().await;

    // A parent the server refuses for good takes its child down with it.
    let refusing = strict_server().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = self::engine(&dir, &refusing, None).await;
    // An update without `If-Match` on a server that requires it: 428.
    let parent = engine
        .enqueue(NewOp::update("room", "attic", json!({"floor": 3})))
        .await
        .unwrap();
    let child = engine
        .enqueue(
            NewOp::create("device", "fan", json!({"room": "attic"})).with_dependency(parent.op_id),
        )
        .await
        .unwrap();
    drain(&engine).await;
    assert!(refusing.applied_log().await.unwrap().is_empty());
    let child = engine.outbox().get(child.op_id).await.unwrap().unwrap();
    assert_eq!(child.state, OpState::Failed);
    let error = child.last_error.unwrap_or_default();
    assert!(
        error.starts_with(&format!("dependency {} failed", parent.op_id)),
        "{error}"
    );
    engine.outbox().close().await;
}

/// A server that requires `If-Match` on every update and delete.
async fn strict_server() -> RunningServer {
    ServerBuilder::new()
        .token("tenant-a", TOKEN)
        .in_memory()
        .require_if_match(true)
        .bind("127.0.0.1:0")
        .await
        .unwrap()
}
