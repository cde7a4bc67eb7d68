//! A caller's place in a wallet's line, given up if the caller gives up.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::dispatcher::Inner;
use crate::{DispatchId, WalletKey, slots};

/// Where a queued `dispatch_wait` learns that the slot passed to it.
pub(crate) type Grant = oneshot::Receiver<()>;

/// A place taken by [`Dispatcher::dispatch_wait`]: the wallet's slot, or a
/// place in its queue. Until disarmed, dropping it gives the place up
/// (leaves the queue, or frees the slot for the next waiter if it was
/// granted meanwhile): a caller that gives up never keeps a wallet or a
/// turn.
pub(crate) struct Place<K: WalletKey> {
    pub(crate) inner: Arc<Inner<K>>,
    pub(crate) wallet: K,
    pub(crate) id: DispatchId,
    pub(crate) armed: bool,
}

impl<K: WalletKey> Place<K> {
    /// Gives up waiting: leaves the queue and returns `false`, or returns
    /// `true` if the slot was granted meanwhile (the caller then holds it).
    pub(crate) fn settle(&mut self) -> bool {
        self.inner.slots.leave(&self.wallet, self.id) == slots::Leave::Granted
    }

    /// The caller holds the slot now (or has left): nothing to undo.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<K: WalletKey> Drop for Place<K> {
    fn drop(&mut self) {
        if self.armed && self.settle() {
            self.inner.slots.release(&self.wallet, self.id);
        }
    }
}
