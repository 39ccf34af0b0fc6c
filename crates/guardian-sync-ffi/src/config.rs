//! The JSON documents that cross the boundary: the engine's configuration,
//! an op, and a list filter. Unknown fields are refused, so a misspelt
//! setting is an error instead of a silently ignored default.

use std::path::PathBuf;
use std::time::Duration;

use guardian_protocol::MAX_DATA_DEPTH;
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::engine::BatchConfig;
use guardian_sync::lock::LockConfig;
use guardian_sync::op::{NewOp, OpId, OpKind, OpState};
use guardian_sync::outbox::EnqueueError;
use guardian_sync::outbox::{ListFilter, Synchronous};
use guardian_sync::retry::RetryPolicy;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Code, FfiError};

/// How to open an engine (`gs_engine_open`'s JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The outbox file (created if missing, mode 0600).
    pub outbox_path: PathBuf,
    /// The backend's base URL, `http://` or `https://`.
    pub server_url: String,
    /// The bearer token to start with (`set_token` replaces it).
    #[serde(default)]
    pub token: Option<String>,
    /// Backoff and attempt budget.
    #[serde(default)]
    pub retry: Option<RetryJson>,
    /// Circuit breaker tuning.
    #[serde(default)]
    pub breaker: Option<BreakerJson>,
    /// Processing lock timing.
    #[serde(default)]
    pub lock: Option<LockJson>,
    /// Batch size and bytes (batching is on without it; `max_ops` 0 turns
    /// it off).
    #[serde(default)]
    pub batch: Option<BatchJson>,
    /// Most requests in flight at once (default 8).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Commit durability: `full` (default), `normal` or `off` (tests only).
    #[serde(default)]
    pub synchronous: Option<String>,
    /// Connection timeout in ms (default 5000).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Whole-request timeout in ms (default 30000).
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// This runner's lock owner id (default: a random one).
    #[serde(default)]
    pub owner_id: Option<String>,
    /// Worker threads of the engine's own runtime (default 2).
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Raise a `stalled` event after this long without progress (default 300000).
    #[serde(default)]
    pub stall_after_ms: Option<u64>,
}

/// Retry settings; every field is optional and defaults to the library's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryJson {
    base_ms: Option<u64>,
    factor: Option<f64>,
    cap_ms: Option<u64>,
    max_attempts: Option<u32>,
    max_retry_after_ms: Option<u64>,
}

/// Breaker settings; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerJson {
    failure_threshold: Option<u32>,
    window_ms: Option<u64>,
    cooldown_ms: Option<u64>,
    trial_wait_ms: Option<u64>,
}

/// Lock settings; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockJson {
    heartbeat_interval_ms: Option<u64>,
    stale_after_ms: Option<u64>,
}

/// Batch settings; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchJson {
    max_ops: Option<usize>,
    max_bytes: Option<usize>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn invalid(message: impl Into<String>) -> FfiError {
    FfiError::new(Code::InvalidArgument, message)
}

/// Why op text did not parse. serde_json gives up at 128 levels, before the
/// outbox could refuse data nested deeper than [`MAX_DATA_DEPTH`]; such
/// text gets the outbox's refusal (an invalid op) wherever it fails, so the
/// answer does not depend on how far past the limit the data goes. Text
/// whose brackets do not even pair up stays malformed JSON.
/// `envelope` is how many levels the document wraps each op's data in.
fn parse_error(what: &str, text: &str, envelope: usize, e: &serde_json::Error) -> FfiError {
    if paired_and_deeper_than(text, MAX_DATA_DEPTH + envelope) {
        return EnqueueError::PayloadTooDeep {
            max: MAX_DATA_DEPTH,
        }
        .into();
    }
    invalid(format!("invalid {what}: {e}"))
}

/// Whether every array and object in JSON text is closed by its own kind of
/// bracket (brackets in strings aside), and more than `limit` of them nest.
/// It reads text that may not parse; the stack is one byte a level.
fn paired_and_deeper_than(text: &str, limit: usize) -> bool {
    let (mut open, mut deepest) = (Vec::new(), 0);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' => open.push(b']'),
            b'{' => open.push(b'}'),
            // A closer always ends a level: the guard pops it.
            b']' | b'}' if open.pop() != Some(b) => return false,
            _ => {}
        }
        deepest = deepest.max(open.len());
    }
    open.is_empty() && !in_string && deepest > limit
}

impl Config {
    /// Parses the JSON text of a configuration.
    pub fn parse(text: &str) -> Result<Self, FfiError> {
        serde_json::from_str(text).map_err(|e| invalid(format!("invalid configuration: {e}")))
    }

    pub(crate) fn retry_policy(&self) -> Result<RetryPolicy, FfiError> {
        let d = RetryPolicy::default();
        let Some(r) = &self.retry else {
            return Ok(d);
        };
        RetryPolicy::new(
            r.base_ms.map_or(d.base(), ms),
            r.factor.unwrap_or(d.factor()),
            r.cap_ms.map_or(d.cap(), ms),
            r.max_attempts.unwrap_or(d.max_attempts()),
            r.max_retry_after_ms.map_or(d.max_retry_after(), ms),
        )
        .map_err(|e| invalid(format!("invalid retry settings: {e}")))
    }

    pub(crate) fn breaker_config(&self) -> BreakerConfig {
        let d = BreakerConfig::default();
        let Some(b) = &self.breaker else {
            return d;
        };
        BreakerConfig {
            // A threshold selects the count policy; without it the default
            // failure-rate policy applies.
            policy: b
                .failure_threshold
                .map_or(d.policy, |failures| TripPolicy::Count { failures }),
            window: b.window_ms.map_or(d.window, ms),
            cooldown: b.cooldown_ms.map_or(d.cooldown, ms),
            trial_wait: b.trial_wait_ms.map_or(d.trial_wait, ms),
        }
    }

    pub(crate) fn lock_config(&self) -> Result<LockConfig, FfiError> {
        let d = LockConfig::default();
        let Some(l) = &self.lock else {
            return Ok(d);
        };
        LockConfig::new(
            l.heartbeat_interval_ms.map_or(d.heartbeat_interval, ms),
            l.stale_after_ms.map_or(d.stale_after, ms),
        )
        .map_err(|e| invalid(format!("invalid lock settings: {e}")))
    }

    pub(crate) fn batch_config(&self) -> Option<BatchConfig> {
        let b = self.batch.as_ref()?;
        let d = BatchConfig::default();
        Some(BatchConfig {
            max_ops: b.max_ops.unwrap_or(d.max_ops),
            max_bytes: b.max_bytes.unwrap_or(d.max_bytes),
        })
    }

    pub(crate) fn synchronous(&self) -> Result<Synchronous, FfiError> {
        match self.synchronous.as_deref() {
            None | Some("full") => Ok(Synchronous::Full),
            Some("normal") => Ok(Synchronous::Normal),
            Some("off") => Ok(Synchronous::Off),
            Some(other) => Err(invalid(format!(
                "invalid synchronous {other:?}: expected full, normal or off"
            ))),
        }
    }
}

/// An op to enqueue (`gs_engine_enqueue`'s JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpJson {
    kind: OpKind,
    entity_type: String,
    entity_id: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    base: Option<Value>,
    #[serde(default)]
    base_version: Option<u64>,
    #[serde(default)]
    txn_token: Option<String>,
    /// Op ids this op waits for.
    #[serde(default)]
    depends_on: Vec<OpId>,
}

impl OpJson {
    /// Parses the JSON text of an op.
    pub fn parse(text: &str) -> Result<Self, FfiError> {
        serde_json::from_str(text).map_err(|e| parse_error("op", text, 1, &e))
    }

    /// The library's op.
    pub fn into_new_op(self) -> NewOp {
        let mut op = match self.kind {
            OpKind::Create => NewOp::create(self.entity_type, self.entity_id, self.payload),
            OpKind::Update => NewOp::update(self.entity_type, self.entity_id, self.payload),
            // A payload on a delete is refused by the outbox, not dropped here.
            OpKind::Delete => NewOp {
                payload: self.payload,
                ..NewOp::delete(self.entity_type, self.entity_id)
            },
        };
        op.base = self.base;
        op.base_version = self.base_version;
        op.txn_token = self.txn_token;
        op.depends_on = self.depends_on;
        op
    }

    /// Parses a JSON array of ops (`gs_engine_transaction`'s JSON).
    pub fn parse_all(text: &str) -> Result<Vec<Self>, FfiError> {
        serde_json::from_str(text).map_err(|e| parse_error("ops", text, 2, &e))
    }
}

/// Which ops to list (`gs_engine_ops`'s JSON); every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterJson {
    state: Option<OpState>,
    limit: Option<usize>,
    after_seq: Option<i64>,
}

impl FilterJson {
    /// Parses a filter; an empty text is the default filter.
    pub fn parse(text: &str) -> Result<Self, FfiError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text).map_err(|e| invalid(format!("invalid filter: {e}")))
    }

    /// The library's filter (default limit 100).
    pub fn into_filter(self) -> ListFilter {
        let d = ListFilter::default();
        ListFilter {
            state: self.state,
            limit: self.limit.unwrap_or(d.limit),
            after_seq: self.after_seq.unwrap_or(d.after_seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(levels: usize) -> Value {
        (0..levels).fold(Value::from(1), |v, _| serde_json::json!({ "a": v }))
    }

    fn op_text(payload: &Value) -> String {
        serde_json::json!({
            "kind": "create", "entity_type": "note", "entity_id": "n", "payload": payload
        })
        .to_string()
    }

    #[test]
    fn data_too_deep_is_an_invalid_op_however_deep() {
        // 126 still parses and reaches the outbox's check; past it,
        // serde_json's own limit would have made it an invalid argument.
        for levels in [MAX_DATA_DEPTH + 1, 126, 127, 128, 500] {
            let text = op_text(&nest(levels));
            let code = match OpJson::parse(&text) {
                Ok(_) => continue,
                Err(e) => e.code,
            };
            assert_eq!(code, Code::InvalidOp, "{levels} levels");
        }
        let text = format!("[{}]", op_text(&nest(300)));
        assert_eq!(OpJson::parse_all(&text).unwrap_err().code, Code::InvalidOp);
    }

    #[test]
    fn other_parse_errors_stay_invalid_arguments() {
        let deep_but_allowed = op_text(&nest(MAX_DATA_DEPTH));
        assert!(OpJson::parse(&deep_but_allowed).is_ok());
        let broken = format!("{} trailing", deep_but_allowed);
        assert_eq!(
            OpJson::parse(&broken).unwrap_err().code,
            Code::InvalidArgument
        );
        // Brackets inside strings, escaped quotes included, are not nesting.
        let in_string = op_text(&Value::from(format!("\\\"{}", "[".repeat(300))));
        assert!(OpJson::parse(&in_string).is_ok());
        // Deep, but never closed or closed by the wrong kind: malformed.
        for text in [
            "[".repeat(300),
            format!("{}{}", "[".repeat(300), "}".repeat(300)),
        ] {
            assert_eq!(
                OpJson::parse(&text).unwrap_err().code,
                Code::InvalidArgument
            );
        }
    }
}
