//! Fault switches for tests that must show a checker catches a broken
//! engine, and damage a test does to the database on purpose. Not an API:
//! a test turns ONE fault on, runs a scenario, and expects the oracle
//! (`lockstep_testkit::oracle`) to report a mismatch; with every switch off
//! nothing changes.
//!
//! The switches exist only with the `faults` cargo feature, which only the
//! test packages enable: without it [`active`] is a constant `false` and
//! the code it guards is compiled out, so a release build of the binaries
//! holds none of it. (In `cargo test --workspace` the feature is unified
//! into every package of the build; the switches are still off unless a
//! test sets one.) It lives in the lowest crate so that the wallet and the
//! manager can ask it too.
//!
//! The switch is process-wide: tests that use it run in their own binary
//! (`tests/faults`), one scenario after another, never in parallel with
//! tests that expect a correct engine.

#[cfg(feature = "faults")]
use std::sync::atomic::{AtomicU8, Ordering};

/// A deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Fault {
    /// The wallet's lookahead window keeps one script fewer than asked.
    WindowOneShort = 1,
    /// Disconnecting a wallet does not restore the coins spent at or above
    /// the height.
    DisconnectKeepsSpent = 2,
    /// The manager routes each block once, even when a script derived in
    /// the block paid an earlier transaction of it.
    SinglePass = 3,
}

/// No fault.
#[cfg(feature = "faults")]
const NONE: u8 = 0;

#[cfg(feature = "faults")]
static ACTIVE: AtomicU8 = AtomicU8::new(NONE);

/// Turns `fault` on (and any other off), or every fault off with `None`.
#[cfg(feature = "faults")]
pub fn set(fault: Option<Fault>) {
    ACTIVE.store(fault.map_or(NONE, |f| f as u8), Ordering::Relaxed);
}

/// Whether `fault` is on.
#[cfg(feature = "faults")]
#[inline]
pub fn active(fault: Fault) -> bool {
    ACTIVE.load(Ordering::Relaxed) == fault as u8
}

/// Whether `fault` is on: never, without the `faults` feature.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub const fn active(_fault: Fault) -> bool {
    false
}

/// Replaces the stored public descriptor of a wallet's keychain (0
/// external, 1 internal) with `descriptor`, as a damaged disk or an
/// operator's SQL shell could: for tests of what the engine does with a
/// wallet whose stored state no longer parses, and of its repair.
///
/// # Errors
/// The database's error; [`crate::StoreError::WalletNotFound`] if the
/// wallet has no such keychain.
#[cfg(feature = "faults")]
pub fn overwrite_descriptor(
    tx: &mut crate::WriteTx<'_>,
    wallet_id: crate::WalletId,
    keychain: u8,
    descriptor: &str,
) -> Result<(), crate::StoreError> {
    tx.overwrite_descriptor(wallet_id, keychain, descriptor)
}
