//! Result codes and the errors behind them.

use guardian_sync::engine::BuildError;
use guardian_sync::outbox::{EnqueueError, OutboxError};

/// The result of every `gs_` call. Zero is success, positive values are
/// non-error outcomes, negative values are errors whose message
/// `gs_last_error_message` returns.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsStatus {
    /// Success.
    Ok = 0,
    /// `gs_engine_next_event`: no event arrived within the timeout.
    Timeout = 1,
    /// A null pointer, text that is not UTF-8, malformed JSON or an invalid setting.
    InvalidArgument = -1,
    /// The outbox could not be opened or the engine could not be built.
    Open = -2,
    /// The op was refused (validation); nothing was stored.
    InvalidOp = -3,
    /// The outbox's storage failed.
    Storage = -4,
    /// No op with that id.
    NotFound = -5,
    /// The op is not in a state that allows this (e.g. retry of a pending op).
    WrongState = -6,
    /// `gs_engine_start`: the runner is already running.
    AlreadyRunning = -7,
    /// The engine is closed.
    Closed = -8,
    /// Called from the event callback, where it would deadlock.
    WrongThread = -9,
    /// The commit failed and the op may or may not be stored: check before enqueueing again.
    OutcomeUnknown = -10,
    /// `gs_engine_stop`: the runner did not stop within the timeout and was aborted.
    StopTimeout = -11,
    /// A bug: a panic was caught at the boundary.
    Panic = -98,
}

/// Short alias used inside the crate.
pub(crate) type Code = GsStatus;

/// An error with its code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    /// The code returned to C.
    pub code: GsStatus,
    /// The message `gs_last_error_message` returns.
    pub message: String,
}

impl std::fmt::Display for FfiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FfiError {}

impl FfiError {
    /// An error of `code` saying `message`.
    pub fn new(code: GsStatus, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<EnqueueError> for FfiError {
    fn from(e: EnqueueError) -> Self {
        let code = match &e {
            EnqueueError::Storage(_) => Code::Storage,
            EnqueueError::OutcomeUnknown { .. } => Code::OutcomeUnknown,
            EnqueueError::Closed => Code::Closed,
            _ => Code::InvalidOp,
        };
        Self::new(code, e.to_string())
    }
}

impl From<OutboxError> for FfiError {
    fn from(e: OutboxError) -> Self {
        let code = match &e {
            OutboxError::NotFound(_) => Code::NotFound,
            OutboxError::WrongState { .. } | OutboxError::AlreadyAttempted { .. } => {
                Code::WrongState
            }
            OutboxError::InvalidPayload(_) => Code::InvalidOp,
            OutboxError::Closed => Code::Closed,
            _ => Code::Storage,
        };
        Self::new(code, e.to_string())
    }
}

impl From<BuildError> for FfiError {
    fn from(e: BuildError) -> Self {
        let code = match &e {
            BuildError::Transport(_)
            | BuildError::Breaker(_)
            | BuildError::Telemetry(_)
            | BuildError::ZeroConcurrency => Code::InvalidArgument,
            _ => Code::Open,
        };
        Self::new(code, e.to_string())
    }
}
