//! Random mutation sequences with random retries and dropped connections,
//! checked against a model: every status is the model's, no key takes effect
//! twice, replays equal first answers, versions step by one per entity, and
//! the feed's cursors are gap-free and match the applied log.

use std::collections::{HashMap, HashSet};

use guardian_server::Faults;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::common::{start_default, Harness};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Create,
    Update,
    UpdateIfMatch { stale: bool },
    Delete,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    DropBefore,
    DropAfter,
}

#[derive(Debug, Clone)]
struct Step {
    entity: usize,
    kind: Kind,
    in_batch: bool,
    fault: Fault,
    repeat: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0usize..3,
        prop_oneof![
            Just(Kind::Create),
            Just(Kind::Update),
            any::<bool>().prop_map(|stale| Kind::UpdateIfMatch { stale }),
            Just(Kind::Delete)
        ],
        any::<bool>(),
        prop_oneof![3 => Just(Fault::None), 1 => Just(Fault::DropBefore), 1 => Just(Fault::DropAfter)],
        any::<bool>(),
    )
        .prop_map(|(entity, kind, in_batch, fault, repeat)| Step { entity, kind, in_batch, fault, repeat })
}

/// Model of one entity: absent, or (version, deleted).
type Model = HashMap<usize, (u64, bool)>;

fn expected(model: &Model, s: &Step) -> (u16, Option<(u64, bool)>) {
    let cur = model.get(&s.entity).copied();
    match (s.kind, cur) {
        (Kind::Create, None) => (201, Some((1, false))),
        (Kind::Create, Some((v, true))) => (201, Some((v + 1, false))),
        (Kind::Create, Some(_)) => (409, None),
        (_, None) => (404, None),
        (_, Some((_, true))) => (410, None),
        (Kind::UpdateIfMatch { stale: true }, Some((v, false))) if v > 0 => (409, None),
        (Kind::Delete, Some((v, false))) => (204, Some((v + 1, true))),
        (_, Some((v, false))) => (200, Some((v + 1, false))),
    }
}

async fn send(
    h: &Harness,
    s: &Step,
    key: &str,
    if_match: Option<u64>,
    n: usize,
) -> Option<(u16, Value, bool)> {
    let id = format!("e{}", s.entity);
    let data = json!({"n": n});
    if s.in_batch {
        let op = match s.kind {
            Kind::Create => {
                json!({"op": "create", "type": "t", "id": id, "data": data, "idempotency_key": key})
            }
            Kind::Delete => json!({"op": "delete", "type": "t", "id": id, "idempotency_key": key}),
            _ => {
                json!({"op": "update", "type": "t", "id": id, "data": data, "if_match": if_match, "idempotency_key": key})
            }
        };
        let req = h
            .req(reqwest::Method::POST, "/v1/batch")
            .json(&json!({"ops": [op]}));
        let r = h.try_send(req).await.ok()?;
        let res = &r.body["results"][0];
        Some((
            u16::try_from(res["status"].as_u64()?).ok()?,
            res["body"].clone(),
            res["replayed"].as_bool()?,
        ))
    } else {
        let req = match s.kind {
            Kind::Create => h.create_req("t", &id, data, key),
            Kind::Delete => h.delete_req("t", &id, key, None),
            _ => h.put_req("t", &id, data, key, if_match),
        };
        let r = h.try_send(req).await.ok()?;
        let replayed = r.header("idempotent-replayed") == Some("true");
        Some((r.status, r.body, replayed))
    }
}

async fn run(steps: Vec<Step>) {
    let h = start_default().await;
    let mut model = Model::new();
    for (n, s) in steps.iter().enumerate() {
        let key = format!("k{n}");
        let if_match = match (s.kind, model.get(&s.entity)) {
            (Kind::UpdateIfMatch { stale }, Some((v, _))) => {
                Some(if stale { v.saturating_sub(1) } else { *v })
            }
            (Kind::UpdateIfMatch { .. }, None) => Some(1),
            _ => None,
        };
        let (want_status, next) = expected(&model, s);
        let faults = match s.fault {
            Fault::None => Faults::default(),
            Fault::DropBefore => Faults {
                drop_before_commit_next: 1,
                ..Faults::default()
            },
            Fault::DropAfter => Faults {
                drop_after_commit_next: 1,
                ..Faults::default()
            },
        };
        h.server.set_faults(faults).unwrap();
        let first = send(&h, s, &key, if_match, n).await;
        let (status, body, replayed) = match (s.fault, first) {
            (Fault::None, Some(r)) => r,
            (Fault::None, None) => panic!("request failed without a fault"),
            (_, Some(r)) => panic!("a dropped request got an answer: {r:?}"),
            (_, None) => send(&h, s, &key, if_match, n).await.expect("retry failed"),
        };
        assert_eq!(status, want_status, "step {n}: {s:?}");
        let applied = (200..300).contains(&status);
        assert_eq!(
            replayed,
            applied && matches!(s.fault, Fault::DropAfter),
            "step {n}: replay flag"
        );
        if let Some(state) = next {
            model.insert(s.entity, state);
        }
        if s.repeat {
            let (st2, body2, rep2) = send(&h, s, &key, if_match, n).await.expect("repeat failed");
            if applied {
                assert_eq!(
                    (st2, &body2, rep2),
                    (status, &body, true),
                    "step {n}: replay differs"
                );
            }
        }
    }
    let log = h.server.applied_log().await.unwrap();
    let keys: HashSet<&str> = log.iter().map(|a| a.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), log.len(), "a key took effect twice");
    let cursors: Vec<u64> = log.iter().map(|a| a.cursor).collect();
    assert_eq!(
        cursors,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "applied log and feed disagree"
    );
    let mut last_version: HashMap<&str, u64> = HashMap::new();
    for a in &log {
        let prev = last_version.insert(a.id.as_str(), a.version).unwrap_or(0);
        assert_eq!(a.version, prev + 1, "versions step by one per entity");
    }
    let feed = h.changes(0, 1000).await;
    let feed_cursors: Vec<u64> = feed.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cursor"].as_u64().unwrap())
        .collect();
    assert_eq!(
        feed_cursors, cursors,
        "feed is gap-free and equals the applied log"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_mutations_with_retries_apply_once(steps in proptest::collection::vec(step(), 1..25)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}
