//! Three-way JSON merge over nested objects.
//!
//! Rules, applied at every level (a key absent on a side is a value too, so
//! deleting a key is a change like any other; numbers are equal when they
//! denote the same value, [`guardian_protocol::json_eq`]):
//! - both sides equal → that value (the local side's text);
//! - only one side differs from the base → that side (a clean merge);
//! - both differ, and both are objects → merge key by key, recursively
//!   (if the base is not an object there, each key counts as new);
//! - both differ otherwise → a [`FieldConflict`], resolved by the
//!   [`ConflictPolicy`]. Arrays and scalars are whole values: two edits of
//!   one array conflict, they are not spliced. A type change (object ↔
//!   scalar) is a conflict only if the other side changed the field too.
//!
//! Without a base snapshot the merge is two-way: every field of the local
//! document counts as a local change and wins (recursively inside objects),
//! and fields only the remote has are kept. Nothing is reported as a
//! conflict, since nothing shows the remote changed.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::policy::{ConflictPolicy, FieldConflictCtx};

/// A field both sides changed to different values, and how it was settled.
///
/// `None` means the key is absent on that side (or in the result); in JSON
/// an absent side is an absent member, so it stays distinct from `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldConflict {
    /// JSON Pointer (RFC 6901) of the field, `""` for the whole document.
    pub path: String,
    /// The base value.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub base: Option<Value>,
    /// The op's value.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub local: Option<Value>,
    /// The server's value.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub remote: Option<Value>,
    /// The value kept in the merged document.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub resolved: Option<Value>,
}

/// A member that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Result of [`merge3`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// The merged document (`null` if every side deleted it).
    pub merged: Value,
    /// Fields changed on both sides, in path order.
    pub conflicts: Vec<FieldConflict>,
}

impl MergeOutcome {
    /// True when no field needed the policy.
    pub fn is_clean(&self) -> bool {
        self.conflicts.is_empty()
    }
}

/// Merges `local` and `remote`, two edits of `base`. See the module docs.
///
/// Pure and total: any JSON values are accepted, nothing panics.
pub fn merge3(
    base: Option<&Value>,
    local: &Value,
    remote: &Value,
    policy: &ConflictPolicy,
) -> MergeOutcome {
    let mut conflicts = Vec::new();
    let merged = match base {
        Some(base) => {
            let mut m = Merger {
                policy,
                conflicts: &mut conflicts,
            };
            m.merge(&mut String::new(), Some(base), Some(local), Some(remote))
        }
        None => Some(overlay(local, remote)),
    };
    MergeOutcome {
        merged: merged.unwrap_or(Value::Null),
        conflicts,
    }
}

/// Two-way merge: `local` laid over `remote`, objects recursively.
fn overlay(local: &Value, remote: &Value) -> Value {
    match (local, remote) {
        (Value::Object(l), Value::Object(r)) => {
            let mut out = r.clone();
            for (k, lv) in l {
                let v = match r.get(k) {
                    Some(rv) => overlay(lv, rv),
                    None => lv.clone(),
                };
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        _ => local.clone(),
    }
}

struct Merger<'p, 'c> {
    policy: &'p ConflictPolicy,
    conflicts: &'c mut Vec<FieldConflict>,
}

impl Merger<'_, '_> {
    /// Merges one position; `None` is "absent". `path` is restored on return.
    fn merge(
        &mut self,
        path: &mut String,
        base: Option<&Value>,
        local: Option<&Value>,
        remote: Option<&Value>,
    ) -> Option<Value> {
        if same(local, remote) || same(remote, base) {
            return local.cloned();
        }
        if same(local, base) {
            return remote.cloned();
        }
        if let (Some(Value::Object(l)), Some(Value::Object(r))) = (local, remote) {
            let b = match base {
                Some(Value::Object(b)) => Some(b),
                _ => None,
            };
            return Some(Value::Object(self.merge_objects(path, b, l, r)));
        }
        let ctx = FieldConflictCtx {
            path,
            base,
            local,
            remote,
        };
        let resolved = self.policy.resolve(&ctx);
        self.conflicts.push(FieldConflict {
            path: path.clone(),
            base: base.cloned(),
            local: local.cloned(),
            remote: remote.cloned(),
            resolved: resolved.clone(),
        });
        resolved
    }

    fn merge_objects(
        &mut self,
        path: &mut String,
        base: Option<&Map<String, Value>>,
        local: &Map<String, Value>,
        remote: &Map<String, Value>,
    ) -> Map<String, Value> {
        let keys: BTreeSet<&String> = base
            .into_iter()
            .flat_map(Map::keys)
            .chain(local.keys())
            .chain(remote.keys())
            .collect();
        let mut out = Map::new();
        for key in keys {
            let len = path.len();
            push_pointer_segment(path, key);
            let merged = self.merge(
                path,
                base.and_then(|b| b.get(key)),
                local.get(key),
                remote.get(key),
            );
            path.truncate(len);
            if let Some(v) = merged {
                out.insert(key.clone(), v);
            }
        }
        out
    }
}

/// Equal values, numbers by the value they denote (`1.5` and `1.50` are
/// one value; each side keeps its own text in the result).
fn same(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => guardian_protocol::json_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Appends `/key` with RFC 6901 escaping (`~` → `~0`, `/` → `~1`).
fn push_pointer_segment(path: &mut String, key: &str) {
    path.push('/');
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Case {
        name: &'static str,
        base: Value,
        local: Value,
        remote: Value,
        /// Expected merge under LocalWins, RemoteWins.
        local_wins: Value,
        remote_wins: Value,
        conflict_paths: &'static [&'static str],
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "disjoint edits",
                base: json!({"a": 1, "b": 1}),
                local: json!({"a": 2, "b": 1}),
                remote: json!({"a": 1, "b": 3}),
                local_wins: json!({"a": 2, "b": 3}),
                remote_wins: json!({"a": 2, "b": 3}),
                conflict_paths: &[],
            },
            Case {
                name: "same edit on both sides",
                base: json!({"a": 1}),
                local: json!({"a": 2}),
                remote: json!({"a": 2}),
                local_wins: json!({"a": 2}),
                remote_wins: json!({"a": 2}),
                conflict_paths: &[],
            },
            Case {
                name: "both edit one field",
                base: json!({"a": 1, "b": 1}),
                local: json!({"a": 2, "b": 1}),
                remote: json!({"a": 3, "b": 5}),
                local_wins: json!({"a": 2, "b": 5}),
                remote_wins: json!({"a": 3, "b": 5}),
                conflict_paths: &["/a"],
            },
            Case {
                name: "nested disjoint edits",
                base: json!({"cfg": {"x": 1, "y": 1}, "n": 0}),
                local: json!({"cfg": {"x": 2, "y": 1}, "n": 0}),
                remote: json!({"cfg": {"x": 1, "y": 2}, "n": 1}),
                local_wins: json!({"cfg": {"x": 2, "y": 2}, "n": 1}),
                remote_wins: json!({"cfg": {"x": 2, "y": 2}, "n": 1}),
                conflict_paths: &[],
            },
            Case {
                name: "nested both-sides edit",
                base: json!({"cfg": {"x": 1, "deep": {"z": 0}}}),
                local: json!({"cfg": {"x": 1, "deep": {"z": 1}}}),
                remote: json!({"cfg": {"x": 9, "deep": {"z": 2}}}),
                local_wins: json!({"cfg": {"x": 9, "deep": {"z": 1}}}),
                remote_wins: json!({"cfg": {"x": 9, "deep": {"z": 2}}}),
                conflict_paths: &["/cfg/deep/z"],
            },
            Case {
                name: "local deletes a key remote left alone",
                base: json!({"a": 1, "b": 1}),
                local: json!({"b": 1}),
                remote: json!({"a": 1, "b": 2}),
                local_wins: json!({"b": 2}),
                remote_wins: json!({"b": 2}),
                conflict_paths: &[],
            },
            Case {
                name: "remote deletes a key, local adds another",
                base: json!({"a": 1}),
                local: json!({"a": 1, "c": 3}),
                remote: json!({}),
                local_wins: json!({"c": 3}),
                remote_wins: json!({"c": 3}),
                conflict_paths: &[],
            },
            Case {
                name: "delete versus edit",
                base: json!({"a": 1}),
                local: json!({}),
                remote: json!({"a": 2}),
                local_wins: json!({}),
                remote_wins: json!({"a": 2}),
                conflict_paths: &["/a"],
            },
            Case {
                name: "both add the same key differently",
                base: json!({}),
                local: json!({"k": "l"}),
                remote: json!({"k": "r"}),
                local_wins: json!({"k": "l"}),
                remote_wins: json!({"k": "r"}),
                conflict_paths: &["/k"],
            },
            Case {
                name: "arrays are whole values",
                base: json!({"tags": [1, 2]}),
                local: json!({"tags": [1, 2, 3]}),
                remote: json!({"tags": [0, 1, 2]}),
                local_wins: json!({"tags": [1, 2, 3]}),
                remote_wins: json!({"tags": [0, 1, 2]}),
                conflict_paths: &["/tags"],
            },
            Case {
                name: "array edited on one side only",
                base: json!({"tags": [1], "n": 1}),
                local: json!({"tags": [1, 2], "n": 1}),
                remote: json!({"tags": [1], "n": 2}),
                local_wins: json!({"tags": [1, 2], "n": 2}),
                remote_wins: json!({"tags": [1, 2], "n": 2}),
                conflict_paths: &[],
            },
            Case {
                name: "type change on one side merges cleanly",
                base: json!({"v": 1, "w": 1}),
                local: json!({"v": {"x": 1}, "w": 1}),
                remote: json!({"v": 1, "w": 2}),
                local_wins: json!({"v": {"x": 1}, "w": 2}),
                remote_wins: json!({"v": {"x": 1}, "w": 2}),
                conflict_paths: &[],
            },
            Case {
                name: "type change against an edit conflicts",
                base: json!({"v": {"x": 1}}),
                local: json!({"v": "flat"}),
                remote: json!({"v": {"x": 2}}),
                local_wins: json!({"v": "flat"}),
                remote_wins: json!({"v": {"x": 2}}),
                conflict_paths: &["/v"],
            },
            Case {
                name: "both turn a scalar into objects: keys merge",
                base: json!({"v": 1}),
                local: json!({"v": {"a": 1}}),
                remote: json!({"v": {"b": 2}}),
                local_wins: json!({"v": {"a": 1, "b": 2}}),
                remote_wins: json!({"v": {"a": 1, "b": 2}}),
                conflict_paths: &[],
            },
            Case {
                name: "null is a value, not a deletion",
                base: json!({"a": 1}),
                local: json!({"a": null}),
                remote: json!({}),
                local_wins: json!({"a": null}),
                remote_wins: json!({}),
                conflict_paths: &["/a"],
            },
            Case {
                name: "pointer escaping",
                base: json!({"a/b": 0, "m~n": 0}),
                local: json!({"a/b": 1, "m~n": 1}),
                remote: json!({"a/b": 2, "m~n": 2}),
                local_wins: json!({"a/b": 1, "m~n": 1}),
                remote_wins: json!({"a/b": 2, "m~n": 2}),
                conflict_paths: &["/a~1b", "/m~0n"],
            },
            Case {
                name: "top-level scalars conflict at the root",
                base: json!(1),
                local: json!(2),
                remote: json!(3),
                local_wins: json!(2),
                remote_wins: json!(3),
                conflict_paths: &[""],
            },
        ]
    }

    #[test]
    fn table_under_each_policy() {
        for c in cases() {
            for (policy, expected) in [
                (ConflictPolicy::LocalWins, &c.local_wins),
                (ConflictPolicy::RemoteWins, &c.remote_wins),
            ] {
                let out = merge3(Some(&c.base), &c.local, &c.remote, &policy);
                assert_eq!(&out.merged, expected, "{} under {policy:?}", c.name);
                let paths: Vec<&str> = out.conflicts.iter().map(|f| f.path.as_str()).collect();
                assert_eq!(paths, c.conflict_paths, "{} under {policy:?}", c.name);
                assert_eq!(out.is_clean(), c.conflict_paths.is_empty());
            }
        }
    }

    #[test]
    fn conflict_records_all_sides() {
        let out = merge3(
            Some(&json!({"a": 1})),
            &json!({}),
            &json!({"a": 2}),
            &ConflictPolicy::LocalWins,
        );
        assert_eq!(
            out.conflicts,
            vec![FieldConflict {
                path: "/a".into(),
                base: Some(json!(1)),
                local: None,
                remote: Some(json!(2)),
                resolved: None,
            }]
        );
    }

    #[test]
    fn numbers_compare_by_value_and_keep_their_text() {
        let v = |t: &str| serde_json::from_str::<Value>(t).unwrap();
        let base = v(r#"{"a":12345678901234567890123,"b":1.50,"c":0}"#);
        // a: changed beyond f64 precision; b: respelled only; c: -0 is 0.
        let local = v(r#"{"a":12345678901234567890124,"b":1.5,"c":-0}"#);
        let remote = v(r#"{"a":12345678901234567890123,"b":2.50,"c":0,"r":1E400}"#);
        let out = merge3(Some(&base), &local, &remote, &ConflictPolicy::RemoteWins);
        assert!(out.is_clean(), "{:?}", out.conflicts);
        assert_eq!(
            out.merged.to_string(),
            r#"{"a":12345678901234567890124,"b":2.50,"c":-0,"r":1e+400}"#
        );
    }

    #[test]
    fn custom_policy_decides_each_conflict() {
        // Keep the larger number; concatenate strings.
        let policy = ConflictPolicy::custom(|ctx| match (ctx.local, ctx.remote) {
            (Some(Value::Number(l)), Some(Value::Number(r))) => {
                json!(l.as_i64().max(r.as_i64()))
            }
            (Some(Value::String(l)), Some(Value::String(r))) => json!(format!("{l}|{r}")),
            (l, r) => l.or(r).cloned().unwrap_or(Value::Null),
        });
        let out = merge3(
            Some(&json!({"n": 1, "s": "a", "k": 0, "same": 0})),
            &json!({"n": 5, "s": "b", "same": 0}),
            &json!({"n": 7, "s": "c", "k": 1, "same": 0}),
            &policy,
        );
        assert_eq!(out.merged, json!({"n": 7, "s": "b|c", "k": 1, "same": 0}));
        assert_eq!(out.conflicts.len(), 3);
        assert_eq!(out.conflicts[1].path, "/n");
        assert_eq!(out.conflicts[1].resolved, Some(json!(7)));
    }

    #[test]
    fn custom_policy_sees_the_path() {
        let policy = ConflictPolicy::custom(|ctx| json!(ctx.path));
        let out = merge3(
            Some(&json!({"o": {"p": 0}})),
            &json!({"o": {"p": 1}}),
            &json!({"o": {"p": 2}}),
            &policy,
        );
        assert_eq!(out.merged, json!({"o": {"p": "/o/p"}}));
    }

    #[test]
    fn two_way_without_base() {
        let local = json!({"a": 1, "o": {"x": 1}, "arr": [1]});
        let remote = json!({"a": 9, "b": 2, "o": {"x": 0, "y": 3}, "arr": [2, 3]});
        for policy in [ConflictPolicy::LocalWins, ConflictPolicy::RemoteWins] {
            let out = merge3(None, &local, &remote, &policy);
            assert_eq!(
                out.merged,
                json!({"a": 1, "b": 2, "o": {"x": 1, "y": 3}, "arr": [1]})
            );
            assert!(out.is_clean());
        }
    }

    #[test]
    fn everything_deleted_is_null() {
        let out = merge3(
            Some(&json!({"a": 1})),
            &Value::Null,
            &Value::Null,
            &ConflictPolicy::LocalWins,
        );
        assert_eq!(out.merged, Value::Null);
    }

    #[test]
    fn absent_and_null_stay_distinct_in_json() {
        let c = FieldConflict {
            path: "/a".into(),
            base: Some(json!(1)),
            local: Some(Value::Null),
            remote: None,
            resolved: Some(Value::Null),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"path":"/a","base":1,"local":null,"resolved":null}"#
        );
        assert_eq!(serde_json::from_str::<FieldConflict>(&text).unwrap(), c);
    }

    #[test]
    fn outcome_serializes() {
        let out = merge3(
            Some(&json!({"a": 1})),
            &json!({"a": 2}),
            &json!({"a": 3}),
            &ConflictPolicy::LocalWins,
        );
        let text = serde_json::to_string(&out).unwrap();
        assert_eq!(
            text,
            r#"{"merged":{"a":2},"conflicts":[{"path":"/a","base":1,"local":2,"remote":3,"resolved":2}]}"#
        );
        let back: MergeOutcome = serde_json::from_str(&text).unwrap();
        assert_eq!(back, out);
    }
}
