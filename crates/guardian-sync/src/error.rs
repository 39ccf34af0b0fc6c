//! The crate's umbrella error.
//!
//! Each operation has its own `#[non_exhaustive]` error enum that says
//! exactly what can go wrong there (`OpenError`, `EnqueueError`,
//! `OutboxError`, `EngineError`, ...). Apps that do not care which operation
//! failed can use `?` into [`Error`].

use crate::engine::{BuildError, EngineError};
use crate::lock::{LockConfigError, LockError};
use crate::outbox::{EnqueueError, OpenError, OutboxError};
use crate::retry::RetryPolicyError;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening (or salvaging) an outbox failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// An op was refused or could not be stored.
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
    /// An outbox operation failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// Building the engine failed.
    #[error(transparent)]
    Build(#[from] Box<BuildError>),
    /// The engine stopped with an error.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A processing-lock operation failed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A lock configuration was refused.
    #[error(transparent)]
    LockConfig(#[from] LockConfigError),
    /// A retry policy was refused.
    #[error(transparent)]
    RetryPolicy(#[from] RetryPolicyError),
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Self {
        Self::Build(Box::new(e))
    }
}
