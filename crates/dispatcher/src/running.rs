//! One running action: the state its task, context and handle share, and
//! the lease that frees its slot and counts its end whatever way it ends.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::dispatcher::{Inner, InnerRef};
use crate::{ActionKind, DispatchId, WalletKey, lock, read};

/// Why an action's task was stopped from outside, if it was.
pub(crate) const RUNNING: u8 = 0;
/// Its handle cancelled it (or was dropped without `detach`).
pub(crate) const CANCELLED: u8 = 1;
/// Its deadline height was reached.
pub(crate) const EXPIRED: u8 = 2;

/// One running action, shared by its task, its context and its handle.
pub(crate) struct ActionShared<K> {
    pub(crate) id: DispatchId,
    pub(crate) wallet: K,
    pub(crate) kind: ActionKind,
    pub(crate) deadline_height: Option<u32>,
    pub(crate) early_release: bool,
    /// [`RUNNING`], [`CANCELLED`] or [`EXPIRED`]: set once, by whoever stops
    /// the task first.
    pub(crate) reason: AtomicU8,
    /// Set once exclusivity was given up early.
    pub(crate) released_early: AtomicBool,
    /// The task's abort handle, set right after it is spawned (never, for
    /// an action run in its caller's task: [`Dispatcher::try_run`]).
    pub(crate) abort: OnceLock<AbortHandle>,
    /// Notified when the action is stopped, for an action run in its
    /// caller's task (which has no task to abort).
    pub(crate) stopped: Notify,
}

impl<K> ActionShared<K> {
    /// Marks the action stopped for `reason` (unless something else stopped
    /// it first) and aborts its task. Returns whether this call marked it.
    pub(crate) fn stop(&self, reason: u8) -> bool {
        let marked = self
            .reason
            .compare_exchange(RUNNING, reason, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if let Some(abort) = self.abort.get() {
            abort.abort();
        }
        // Stores a permit if the inline run is not waiting yet.
        self.stopped.notify_one();
        marked
    }
}

/// Gives up and cleans up one action's slot, deadline entry and counters
/// when dropped: whatever way its task ends (completion, panic, abort), this
/// runs inside it.
pub(crate) struct Lease<K: WalletKey> {
    pub(crate) inner: InnerRef<K>,
    pub(crate) shared: Arc<ActionShared<K>>,
    /// When the slot was granted.
    pub(crate) granted_at: Instant,
    /// Set when the action's future returned (`Some(is_ok)`).
    pub(crate) finished: Option<bool>,
}

/// Frees an action's slot when dropped (if the action still holds it).
pub(crate) struct FreeSlot<'a, K: WalletKey> {
    pub(crate) inner: &'a Inner<K>,
    pub(crate) shared: &'a ActionShared<K>,
}

impl<K: WalletKey> Drop for FreeSlot<'_, K> {
    fn drop(&mut self) {
        self.inner
            .slots
            .release(&self.shared.wallet, self.shared.id);
    }
}

impl<K: WalletKey> Drop for Lease<K> {
    fn drop(&mut self) {
        let shared = &self.shared;
        // Freed last, after the expiry callback (so that the next action
        // sees the coins it released), and even if that callback panics.
        let _free = FreeSlot {
            inner: &self.inner,
            shared,
        };
        if let Some(deadline) = shared.deadline_height {
            lock(&self.inner.deadlines)
                .pending
                .remove(&(deadline, shared.id));
        }
        let hold_ms = self.granted_at.elapsed().as_secs_f64() * 1e3;
        let c = self.inner.counters.mine();
        let outcome = match self.finished {
            Some(true) => {
                c.completed.fetch_add(1, Ordering::Relaxed);
                "completed"
            }
            Some(false) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                "failed"
            }
            None if std::thread::panicking() => {
                c.panics.fetch_add(1, Ordering::Relaxed);
                "panicked"
            }
            None if shared.reason.load(Ordering::SeqCst) == EXPIRED => {
                c.expirations.fetch_add(1, Ordering::Relaxed);
                let callback = read(&self.inner.on_expired).clone();
                if let Some(callback) = callback {
                    callback(&shared.wallet, shared.id, &shared.kind);
                }
                "expired"
            }
            None => {
                c.cancellations.fetch_add(1, Ordering::Relaxed);
                "cancelled"
            }
        };
        tracing::debug!(
            wallet = ?shared.wallet,
            action_id = shared.id.get(),
            kind = %shared.kind,
            hold_ms,
            outcome,
            "action ended"
        );
    }
}
