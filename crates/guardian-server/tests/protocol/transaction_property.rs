//! Random sequences of transactions (random ops on a few entities, chained
//! or with fresh or stale `if_match`), with dropped connections, retries
//! and repeats, checked against an all-or-nothing model: every outcome is
//! the model's (committed, or aborted at the model's first refused op with
//! its status), replays equal first answers, the entities end as the model
//! says, and the applied log holds every op of each committed transaction,
//! at consecutive cursors, and nothing of an aborted one.

use std::collections::{BTreeMap, HashMap};

use guardian_server::Faults;
use proptest::prelude::*;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{start_default, Harness};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Create,
    Update,
    UpdateIfMatch { stale: bool },
    Delete,
}

#[derive(Debug, Clone, Copy)]
struct OpSpec {
    entity: usize,
    kind: Kind,
    /// Chained on the previous op of the same entity in the transaction,
    /// if there is one.
    chained: bool,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    DropBefore,
    DropAfter,
}

#[derive(Debug, Clone)]
struct Step {
    ops: Vec<OpSpec>,
    fault: Fault,
    repeat: bool,
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    (
        0usize..3,
        prop_oneof![
            Just(Kind::Create),
            Just(Kind::Update),
            any::<bool>().prop_map(|stale| Kind::UpdateIfMatch { stale }),
            Just(Kind::Delete)
        ],
        any::<bool>(),
    )
        .prop_map(|(entity, kind, chained)| OpSpec {
            entity,
            kind,
            chained,
        })
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec(op_spec(), 1..5),
        prop_oneof![3 => Just(Fault::None), 1 => Just(Fault::DropBefore), 1 => Just(Fault::DropAfter)],
        any::<bool>(),
    )
        .prop_map(|(ops, fault, repeat)| Step { ops, fault, repeat })
}

/// Entity → (version, deleted).
type Model = HashMap<usize, (u64, bool)>;

/// The ops of step `n` on the wire, given the model before it.
fn wire_ops(model: &Model, n: usize, ops: &[OpSpec]) -> Vec<Value> {
    let mut out = Vec::new();
    for (j, s) in ops.iter().enumerate() {
        let mut op = json!({
            "op": match s.kind {
                Kind::Create => "create",
                Kind::Delete => "delete",
                _ => "update",
            },
            "type": "t",
            "id": format!("e{}", s.entity),
            "idempotency_key": format!("s{n}o{j}"),
        });
        if s.kind != Kind::Delete {
            op["data"] = json!({"step": n, "op": j});
        }
        let earlier = ops[..j].iter().rposition(|e| e.entity == s.entity);
        match (earlier, s.chained, s.kind) {
            (Some(e), true, _) => {
                op["depends_on"] = json!(e);
                op["if_match_chained"] = json!(true);
            }
            (_, _, Kind::UpdateIfMatch { stale }) => {
                let v = model.get(&s.entity).map_or(1, |(v, _)| *v);
                op["if_match"] = json!(if stale { v.saturating_sub(1) } else { v });
            }
            _ => {}
        }
        out.push(op);
    }
    out
}

/// What the model says of a transaction: `Ok(statuses)` with the model
/// after it, or `Err((failed_op, status))` with the model unchanged.
fn expect(model: &Model, wire: &[Value]) -> Result<(Vec<u64>, Model), (usize, u64)> {
    let mut m = model.clone();
    let mut statuses = Vec::new();
    for (j, op) in wire.iter().enumerate() {
        let entity: usize = op["id"].as_str().unwrap()[1..].parse().unwrap();
        let cur = m.get(&entity).copied();
        let if_match = if op["if_match_chained"] == true {
            // The previous op of this entity succeeded (else the
            // transaction stopped there): its version, none after a delete.
            match cur {
                Some((v, false)) => Some(v),
                _ => None,
            }
        } else {
            op["if_match"].as_u64()
        };
        let (status, next) = match (op["op"].as_str().unwrap(), cur) {
            ("create", None) => (201, Some((1, false))),
            ("create", Some((v, true))) => (201, Some((v + 1, false))),
            ("create", Some(_)) => (409, None),
            (_, None) => (404, None),
            (_, Some((_, true))) => (410, None),
            (_, Some((v, false))) if if_match.is_some_and(|e| e != v) => (409, None),
            ("delete", Some((v, false))) => (204, Some((v + 1, true))),
            (_, Some((v, false))) => (200, Some((v + 1, false))),
        };
        match next {
            Some(state) => {
                m.insert(entity, state);
                statuses.push(status);
            }
            None => return Err((j, status)),
        }
    }
    Ok((statuses, m))
}

async fn send(h: &Harness, key: &str, ops: &[Value]) -> Option<Value> {
    let req = h
        .req(Method::POST, "/v1/transactions")
        .json(&json!({"transaction_key": key, "ops": ops}));
    let r = h.try_send(req).await.ok()?;
    assert_eq!(r.status, 200, "{}", r.body);
    Some(r.body)
}

fn result_statuses(body: &Value) -> Vec<u64> {
    crate::common::batch_statuses(body)
}

async fn run(steps: Vec<Step>) {
    let h = start_default().await;
    let mut model = Model::new();
    // Transaction key → its ops' keys, for every committed transaction.
    let mut committed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (n, s) in steps.iter().enumerate() {
        let key = format!("t{n}");
        let wire = wire_ops(&model, n, &s.ops);
        let want = expect(&model, &wire);
        h.server
            .set_faults(match s.fault {
                Fault::None => Faults::default(),
                Fault::DropBefore => Faults {
                    drop_before_commit_next: 1,
                    ..Faults::default()
                },
                Fault::DropAfter => Faults {
                    drop_after_commit_next: 1,
                    ..Faults::default()
                },
            })
            .unwrap();
        let body = match (s.fault, send(&h, &key, &wire).await) {
            (Fault::None, Some(b)) => b,
            (Fault::None, None) => panic!("step {n}: request failed without a fault"),
            (_, Some(b)) => panic!("step {n}: a dropped request got an answer: {b}"),
            (_, None) => send(&h, &key, &wire).await.expect("retry failed"),
        };
        match &want {
            Ok((statuses, after)) => {
                assert_eq!(body["committed"], true, "step {n}: {s:?} {body}");
                assert_eq!(&result_statuses(&body), statuses, "step {n}");
                assert_eq!(
                    body["replayed"],
                    matches!(s.fault, Fault::DropAfter),
                    "step {n}: replayed only after a lost commit"
                );
                model = after.clone();
                committed.insert(
                    key.clone(),
                    (0..wire.len()).map(|j| format!("s{n}o{j}")).collect(),
                );
            }
            Err((failed, status)) => {
                assert_eq!(body["committed"], false, "step {n}: {s:?} {body}");
                assert_eq!(body["failed_op"], *failed, "step {n}: {body}");
                assert_eq!(body["replayed"], false);
                let mut statuses = vec![424; wire.len()];
                statuses[*failed] = *status;
                assert_eq!(result_statuses(&body), statuses, "step {n}");
            }
        }
        if s.repeat {
            let again = send(&h, &key, &wire).await.expect("repeat failed");
            assert_eq!(
                again["results"], body["results"],
                "step {n}: repeat differs"
            );
            assert_eq!(again["replayed"], want.is_ok(), "step {n}");
        }
    }

    // The entities are as the model says.
    for e in 0..3 {
        let got = h.get("t", &format!("e{e}")).await;
        match model.get(&e) {
            None => assert_eq!(got.status, 404),
            Some((v, false)) => assert_eq!(got.body["version"], *v, "e{e}"),
            Some((v, true)) => {
                assert_eq!(got.status, 410, "e{e}");
                assert_eq!(got.body["current"]["version"], *v, "e{e}");
            }
        }
    }
    // Every op of each committed transaction in the log, in order, at
    // consecutive cursors; nothing of any other.
    let log = h.server.applied_log().await.unwrap();
    let mut logged: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for a in &log {
        let t = a.transaction_key.clone().expect("only transactions ran");
        logged
            .entry(t)
            .or_default()
            .push((a.idempotency_key.clone(), a.cursor));
    }
    assert_eq!(
        logged.keys().collect::<Vec<_>>(),
        committed.keys().collect::<Vec<_>>()
    );
    for (t, rows) in &logged {
        let keys: Vec<&String> = rows.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, committed[t].iter().collect::<Vec<_>>(), "{t}");
        let first = rows[0].1;
        let cursors: Vec<u64> = rows.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            cursors,
            (first..first + rows.len() as u64).collect::<Vec<_>>(),
            "{t}: consecutive cursors"
        );
    }
    let feed = h.changes(0, 1000).await;
    let feed_cursors: Vec<u64> = feed.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cursor"].as_u64().unwrap())
        .collect();
    let log_cursors: Vec<u64> = log.iter().map(|a| a.cursor).collect();
    assert_eq!(feed_cursors, log_cursors, "the feed is the applied log");
    assert_eq!(
        log_cursors,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "gap-free"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_transactions_are_all_or_nothing(steps in proptest::collection::vec(step(), 1..16)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}
