//! Property tests of the three-way merge: identities and commutation of
//! clean merges, on random nested JSON documents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use guardian_sync::reconcile::{merge3, ConflictPolicy};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Random JSON with small key and value alphabets, so that edits collide.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0i64..4).prop_map(Value::from),
        "[ab]{0,2}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            object(inner),
        ]
    })
}

fn object(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-e]", inner, 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

fn policies() -> [ConflictPolicy; 3] {
    [
        ConflictPolicy::LocalWins,
        ConflictPolicy::RemoteWins,
        ConflictPolicy::custom(|_| Value::String("custom".into())),
    ]
}

/// Applies a random set of key-level edits to an object: keeps, deletions,
/// replacements and additions of keys drawn from `keys`.
fn edit(base: &Value, edits: &[(String, Option<Value>)]) -> Value {
    let mut out = base.as_object().cloned().unwrap_or_default();
    for (k, v) in edits {
        match v {
            Some(v) => {
                out.insert(k.clone(), v.clone());
            }
            None => {
                out.remove(k);
            }
        }
    }
    Value::Object(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn merge_with_unchanged_remote_is_local(base in json(), x in json()) {
        for p in policies() {
            let out = merge3(Some(&base), &x, &base, &p);
            prop_assert_eq!(&out.merged, &x);
            prop_assert!(out.is_clean());
        }
    }

    #[test]
    fn merge_with_unchanged_local_is_remote(base in json(), y in json()) {
        for p in policies() {
            let out = merge3(Some(&base), &base, &y, &p);
            prop_assert_eq!(&out.merged, &y);
            prop_assert!(out.is_clean());
        }
    }

    #[test]
    fn equal_edits_merge_to_themselves(base in json(), x in json()) {
        let out = merge3(Some(&base), &x, &x, &ConflictPolicy::RemoteWins);
        prop_assert_eq!(&out.merged, &x);
        prop_assert!(out.is_clean());
    }

    #[test]
    fn clean_merges_commute(base in json(), x in json(), y in json()) {
        let a = merge3(Some(&base), &x, &y, &ConflictPolicy::LocalWins);
        if a.is_clean() {
            let b = merge3(Some(&base), &y, &x, &ConflictPolicy::LocalWins);
            prop_assert!(b.is_clean());
            prop_assert_eq!(a.merged, b.merged);
        }
    }

    #[test]
    fn disjoint_key_edits_merge_cleanly_and_commute(
        base in object(json()),
        left in prop::collection::vec(("[a-c]", proptest::option::of(json())), 0..4),
        right in prop::collection::vec(("[d-f]", proptest::option::of(json())), 0..4),
    ) {
        let x = edit(&base, &left);
        let y = edit(&base, &right);
        let a = merge3(Some(&base), &x, &y, &ConflictPolicy::LocalWins);
        let b = merge3(Some(&base), &y, &x, &ConflictPolicy::RemoteWins);
        prop_assert!(a.is_clean());
        prop_assert!(b.is_clean());
        prop_assert_eq!(&a.merged, &b.merged);
        // Applying both edit sets in sequence gives the same document.
        let sequential = edit(&x, &right);
        prop_assert_eq!(&a.merged, &sequential);
    }

    #[test]
    fn local_and_remote_wins_are_mirror_images(base in json(), x in json(), y in json()) {
        let a = merge3(Some(&base), &x, &y, &ConflictPolicy::LocalWins);
        let b = merge3(Some(&base), &y, &x, &ConflictPolicy::RemoteWins);
        prop_assert_eq!(a.merged, b.merged);
        prop_assert_eq!(a.conflicts.len(), b.conflicts.len());
    }

    #[test]
    fn conflicts_resolve_as_the_policy_says(base in json(), x in json(), y in json()) {
        let out = merge3(Some(&base), &x, &y, &ConflictPolicy::LocalWins);
        for c in &out.conflicts {
            prop_assert_eq!(&c.resolved, &c.local);
            prop_assert_ne!(&c.local, &c.remote);
            prop_assert_ne!(&c.local, &c.base);
            prop_assert_ne!(&c.remote, &c.base);
        }
    }

    #[test]
    fn two_way_keeps_every_local_field(x in object(json()), y in object(json())) {
        let out = merge3(None, &x, &y, &ConflictPolicy::RemoteWins);
        prop_assert!(out.is_clean());
        let merged = out.merged.as_object().unwrap();
        for (k, v) in x.as_object().unwrap() {
            if !(v.is_object() && y.get(k).is_some_and(Value::is_object)) {
                prop_assert_eq!(merged.get(k), Some(v));
            }
        }
        for k in y.as_object().unwrap().keys() {
            prop_assert!(merged.contains_key(k));
        }
    }
}
