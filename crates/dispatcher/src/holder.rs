//! The holder ids coin locks are taken under: one scheme for every kind of
//! action, so that two actions never share a holder by accident.

use crate::kind::DispatchId;

/// The action a coin lock is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockHolder<'a> {
    /// An action dispatched for one run ([`crate::ActionCtx::id`]): its
    /// locks are released under this holder when it fails, panics, is
    /// cancelled or expires.
    Dispatched(DispatchId),
    /// A durable action, by its caller-chosen id: its locks outlive a
    /// restart and its drives, so they are held under that id, not under a
    /// drive's [`DispatchId`].
    Durable(&'a str),
}

/// The holder id `action`'s coins are locked under. Dispatched and durable
/// actions get distinct prefixes (`action-` and `action:`), so that no
/// durable id, whatever the caller chose, names a dispatch's locks.
pub fn lock_holder(action: LockHolder<'_>) -> String {
    match action {
        LockHolder::Dispatched(id) => format!("action-{id}"),
        LockHolder::Durable(id) => format!("action:{id}"),
    }
}
