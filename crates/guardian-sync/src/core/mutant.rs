//! Deliberately broken variants of the engine, for the simulator to prove
//! it catches them (`tests/sim_mutants.rs`).
//!
//! Only a build with the `mutants` feature can switch one on; no shipped
//! build has it, and without it [`active`] is a constant `false` the
//! compiler removes.

/// One deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// Fenced writes skip the fence check.
    SkipFence = 1,
    /// A retry goes out under a new idempotency key.
    NewKeyOnRetry,
    /// Ops are acknowledged when sent, before any response.
    AckBeforeResponse,
    /// Any pending op may be claimed, not only its entity's head.
    NoHeadRule,
    /// Wall-clock steps are ignored: backoffs are neither re-based nor
    /// clamped.
    ParkOnFutureClock,
}

#[cfg(feature = "mutants")]
static ACTIVE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Switches `mutant` on for the whole process (`None`: all off).
#[cfg(feature = "mutants")]
pub fn set(mutant: Option<Mutant>) {
    ACTIVE.store(
        mutant.map_or(0, |m| m as u8),
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// True when `mutant` is switched on.
#[inline]
pub fn active(mutant: Mutant) -> bool {
    #[cfg(feature = "mutants")]
    {
        ACTIVE.load(std::sync::atomic::Ordering::SeqCst) == mutant as u8
    }
    #[cfg(not(feature = "mutants"))]
    {
        let _ = mutant;
        false
    }
}
