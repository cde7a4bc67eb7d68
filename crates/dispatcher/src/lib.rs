//! Per-wallet action slots: one exclusive action per wallet, deadlines in
//! blocks, release on every exit path, early release and shared signer
//! limits.
//!
//! [`Dispatcher`] decides who may act on a wallet. A second action on a busy
//! wallet is refused at once ([`Dispatcher::try_dispatch`] returns
//! [`DispatchError::WalletBusy`]) or waits its turn in a fair FIFO queue
//! ([`Dispatcher::dispatch_wait`]). Each action runs as a tokio task; the
//! slot is freed by a guard's `Drop` inside that task, so it is freed when the
//! action completes, fails, panics, is cancelled (its [`ActionHandle`]
//! dropped or [`ActionHandle::cancel`]led) or expires (its deadline height
//! reached, [`Dispatcher::set_tip`]). A wallet is never busy with an action
//! that no longer runs.
//!
//! The dispatcher knows wallet keys and block heights only: it is generic
//! over the wallet key `K` and depends on no other lockstep crate.

mod counters;
mod ctx;
mod dispatcher;
mod error;
mod holder;
mod kind;
mod outcome;
mod place;
mod running;
mod slots;

#[cfg(test)]
mod tests;

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError, RwLock};

pub use counters::Stats;
pub use ctx::{ActionCtx, SignPermit};
pub use dispatcher::Dispatcher;
pub use error::DispatchError;
pub use holder::{LockHolder, lock_holder};
pub use kind::{ActionKind, ActionSpec, DispatchId};
pub use outcome::{ActionHandle, Outcome};

pub(crate) use counters::Padded;
pub(crate) use running::{ActionShared, CANCELLED, EXPIRED};

/// What a wallet key must be: compared, hashed, cloned into errors and logs,
/// and shared between tasks.
pub trait WalletKey: Eq + Hash + Clone + Debug + Send + Sync + 'static {}

impl<K: Eq + Hash + Clone + Debug + Send + Sync + 'static> WalletKey for K {}

/// Locks a mutex; a poisoned one is used as is (no critical section here
/// leaves its data half-changed).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a lock, ignoring poisoning (see [`lock`]).
pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a lock, ignoring poisoning (see [`lock`]).
pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
