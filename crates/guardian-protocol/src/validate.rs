//! Syntax of entity types and ids (DESIGN §10) and of bearer tokens,
//! checked by client and server alike.

/// Why an entity type or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The entity type does not match `[a-z][a-z0-9_]{0,63}`.
    #[error("invalid entity type {0:?}: expected a lower-case letter, then up to 63 of [a-z0-9_]")]
    EntityType(String),
    /// The entity id does not match `[A-Za-z0-9._-]{1,128}`, or is `.` or `..`.
    #[error(
        "invalid entity id {0:?}: expected 1 to 128 of [A-Za-z0-9._-], other than \".\" and \"..\""
    )]
    EntityId(String),
}

/// Deepest nesting of arrays and objects an entity's data may have, for
/// client and server alike: `serde_json` refuses to read text nested 128
/// levels deep, and every message that carries data (a stored op, a feed
/// page, a batch answer, a realtime frame) wraps it a few levels deeper.
pub const MAX_DATA_DEPTH: usize = 100;

/// Whether `data` nests no deeper than [`MAX_DATA_DEPTH`]. The walk stops at
/// that depth, so a value deeper than the stack allows is safe to check.
pub fn within_data_depth(data: &serde_json::Value) -> bool {
    use serde_json::Value;
    fn within(v: &Value, depth: usize) -> bool {
        match v {
            Value::Array(items) => {
                depth < MAX_DATA_DEPTH && items.iter().all(|c| within(c, depth + 1))
            }
            Value::Object(map) => {
                depth < MAX_DATA_DEPTH && map.values().all(|c| within(c, depth + 1))
            }
            _ => true,
        }
    }
    within(data, 0)
}

/// Whether `token` can travel as a bearer token: 1 or more printable ASCII
/// characters, no space. A line break or control character cannot be in a
/// header at all; servers trim or split on spaces and tabs, and refuse to
/// read text beyond ASCII, so any of them would make a token that never
/// matches. (RFC 6750's `b64token` is stricter; opaque tokens in the wild
/// use more of ASCII, so the rule stops at what HTTP itself breaks.)
pub fn is_bearer_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks an entity type against `[a-z][a-z0-9_]{0,63}`.
pub fn validate_entity_type(entity_type: &str) -> Result<(), ValidationError> {
    let bytes = entity_type.as_bytes();
    let ok = matches!(bytes.first(), Some(b'a'..=b'z'))
        && bytes.len() <= 64
        && bytes[1..]
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::EntityType(truncated(entity_type)))
    }
}

/// Checks an entity id against `[A-Za-z0-9._-]{1,128}`, other than `.` and `..`.
///
/// Every id that passes is a path segment that routes unchanged: URL parsers
/// (RFC 3986 §5.2.4) remove the dot segments `.` and `..` from a path, so
/// `PUT /v1/entities/device/..` would reach `/v1/entities/` instead. This is
/// the one rule for client and server.
pub fn validate_entity_id(id: &str) -> Result<(), ValidationError> {
    let ok = (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::EntityId(truncated(id)))
    }
}

/// Keeps error messages short when the input is huge.
fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_types() {
        for ok in ["a", "device", "a_b9", &"a".repeat(64)] {
            assert_eq!(validate_entity_type(ok), Ok(()), "{ok}");
        }
        for bad in ["", "A", "9a", "_a", "a-b", "a b", "dév", &"a".repeat(65)] {
            assert!(validate_entity_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entity_ids() {
        for ok in ["1", "A.b_c-9", "...", ".a", "a.", "-", &"x".repeat(128)] {
            assert_eq!(validate_entity_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "/",
            "a/b",
            "%",
            "%2e",
            "?",
            "#",
            " ",
            "a b",
            "\t",
            "\0",
            "\u{7f}",
            "é",
            "..%2f",
            &"x".repeat(129),
        ] {
            assert!(validate_entity_id(bad).is_err(), "{bad}");
        }
    }
}
