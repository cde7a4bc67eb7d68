//! Fault switches for tests that must show a checker catches a broken
//! engine. Not an API: a test turns ONE fault on, runs a scenario, and
//! expects the oracle (`lockstep_testkit::oracle`) to report a mismatch; with every
//! switch off (the default, and always in production) nothing changes.
//!
//! Why compiled into production code rather than behind a cargo feature: a
//! feature would be unified into every build of the workspace's tests and
//! could leave a fault reachable in the binaries that test the real thing;
//! a switch that is off by default costs one relaxed atomic load where it is
//! asked, and the code it guards is the code that ships. It lives in the
//! lowest crate so that the wallet and the manager can ask it too.
//!
//! The switch is process-wide: tests that use it run in their own binary
//! (`tests/faults`), one scenario after another, never in parallel with
//! tests that expect a correct engine.

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
const NONE: u8 = 0;

static ACTIVE: AtomicU8 = AtomicU8::new(NONE);

/// Turns `fault` on (and any other off), or every fault off with `None`.
pub fn set(fault: Option<Fault>) {
    ACTIVE.store(fault.map_or(NONE, |f| f as u8), Ordering::Relaxed);
}

/// Whether `fault` is on.
#[inline]
pub fn active(fault: Fault) -> bool {
    ACTIVE.load(Ordering::Relaxed) == fault as u8
}
