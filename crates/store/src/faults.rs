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
    /// Every write transaction's COMMIT fails (as `SQLITE_BUSY` past the
    /// busy timeout would): the transaction rolls back and its caller gets
    /// a retryable error.
    CommitFails = 4,
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

/// The error a COMMIT that [`Fault::CommitFails`] fails returns: SQLite's
/// own `SQLITE_BUSY`.
#[cfg_attr(not(feature = "faults"), allow(dead_code))]
pub(crate) fn commit_failed() -> crate::StoreError {
    #[cfg(feature = "faults")]
    COMMITS_FAILED.fetch_add(1, Ordering::Relaxed);
    crate::StoreError::sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        Some("COMMIT failed (fault switch)".to_owned()),
    ))
}

/// What a test runs on the writer thread just before each COMMIT (a
/// failing one too): it looks at what readers see while the transaction
/// may still roll back.
#[cfg(feature = "faults")]
pub type BeforeCommit = std::sync::Arc<dyn Fn() + Send + Sync>;

#[cfg(feature = "faults")]
static BEFORE_COMMIT: std::sync::Mutex<Option<BeforeCommit>> = std::sync::Mutex::new(None);

/// Sets (or with `None` clears) the hook run just before each COMMIT.
#[cfg(feature = "faults")]
pub fn set_before_commit(hook: Option<BeforeCommit>) {
    *BEFORE_COMMIT.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// Runs the hook set by [`set_before_commit`], if any.
#[inline]
pub(crate) fn before_commit() {
    #[cfg(feature = "faults")]
    {
        let hook = BEFORE_COMMIT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// How many COMMITs [`Fault::CommitFails`] has failed so far.
#[cfg(feature = "faults")]
pub fn commits_failed() -> u64 {
    COMMITS_FAILED.load(Ordering::Relaxed)
}

#[cfg(feature = "faults")]
static COMMITS_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
