//! The per-wallet slots: who holds each wallet, and who waits for it.
//!
//! The map is split into shards, each a `HashMap` behind its own std
//! `Mutex`, picked by the wallet key's hash. A lock is held only for a few
//! map and queue operations (never across an `.await`), and two wallets in
//! different shards never touch the same lock, so dispatching on one wallet
//! does not wait for another wallet's dispatch (except for the rare moment
//! two wallets' short critical sections fall on the same shard). A single
//! `RwLock<HashMap>` would serialise every grant and release, which all
//! write; a per-wallet `Mutex` inside a map would still need the map's lock
//! to find or create it, and to remove idle wallets.
//!
//! A wallet with no holder and no waiter has no entry, so the map holds only
//! busy wallets. When a holder releases, the slot passes directly to the
//! first waiter in the queue (under the shard's lock), so a wallet with an
//! empty slot never has waiters, and a late `try_dispatch` cannot jump the
//! queue.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::{ActionKind, DispatchId, Padded, WalletKey, lock};

/// Number of shards: a power of two well above the core count.
const SHARDS: usize = 64;

/// The action holding a wallet's slot, as `WalletBusy` reports it.
#[derive(Clone, Debug)]
pub(crate) struct Holder {
    pub(crate) id: DispatchId,
    pub(crate) kind: ActionKind,
    pub(crate) started_at_height: Option<u32>,
    pub(crate) deadline_height: Option<u32>,
}

/// A `dispatch_wait` call waiting for a wallet.
struct Waiter {
    /// What becomes the holder when the slot is granted.
    holder: Holder,
    /// Woken once the slot is granted.
    grant: oneshot::Sender<()>,
}

/// One wallet's slot.
#[derive(Default)]
struct Slot {
    holder: Option<Holder>,
    queue: VecDeque<Waiter>,
}

impl Slot {
    /// Passes the (free) slot to the first waiter still listening.
    fn grant_next(&mut self) {
        while let Some(waiter) = self.queue.pop_front() {
            let id = waiter.holder.id;
            self.holder = Some(waiter.holder);
            if waiter.grant.send(()).is_ok() {
                return;
            }
            // Its receiver is gone (it cleans up under this lock first, so
            // this does not happen; never leave the slot held for it).
            tracing::warn!(
                action_id = id.get(),
                "waiter gone without leaving the queue"
            );
            self.holder = None;
        }
    }

    /// No holder and no waiter: the entry can go.
    fn is_idle(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty()
    }
}

/// One shard: the slots of the busy wallets whose key hashes to it.
type Shard<K> = Mutex<HashMap<K, Slot>>;

/// The sharded map of wallet slots. Each shard sits on cache lines of its
/// own ([`Padded`]): two threads working on wallets of different shards
/// never write to the same line (a bare `Mutex<HashMap>` is 56 bytes, so
/// neighbouring shards would share one and every lock taken would evict the
/// other thread's copy).
pub(crate) struct Slots<K> {
    shards: Box<[Padded<Shard<K>>]>,
    hasher: RandomState,
}

impl<K: WalletKey> Slots<K> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Padded(Mutex::new(HashMap::new())))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// The locked shard that holds `wallet`.
    fn shard(&self, wallet: &K) -> MutexGuard<'_, HashMap<K, Slot>> {
        let index = self.hasher.hash_one(wallet) as usize % SHARDS;
        lock(&self.shards[index].0)
    }

    /// Takes the slot for `holder`, or returns the action holding it.
    pub(crate) fn try_acquire(&self, wallet: &K, holder: Holder) -> Result<(), Holder> {
        let mut shard = self.shard(wallet);
        let slot = shard.entry(wallet.clone()).or_default();
        match &slot.holder {
            Some(busy) => Err(busy.clone()),
            None => {
                slot.holder = Some(holder);
                Ok(())
            }
        }
    }

    /// Takes the slot for `holder` (`None`), or queues it behind the others
    /// and returns the queue's new length.
    pub(crate) fn acquire_or_enqueue(
        &self,
        wallet: &K,
        holder: Holder,
        grant: oneshot::Sender<()>,
    ) -> Option<usize> {
        let mut shard = self.shard(wallet);
        let slot = shard.entry(wallet.clone()).or_default();
        if slot.holder.is_none() {
            slot.holder = Some(holder);
            return None;
        }
        slot.queue.push_back(Waiter { holder, grant });
        Some(slot.queue.len())
    }

    /// Frees `wallet`'s slot if action `id` holds it, passing it to the next
    /// waiter. Returns whether `id` held it.
    pub(crate) fn release(&self, wallet: &K, id: DispatchId) -> bool {
        let mut shard = self.shard(wallet);
        let Entry::Occupied(mut entry) = shard.entry(wallet.clone()) else {
            return false;
        };
        let slot = entry.get_mut();
        if slot.holder.as_ref().map(|h| h.id) != Some(id) {
            return false;
        }
        slot.holder = None;
        slot.grant_next();
        if slot.is_idle() {
            entry.remove();
        }
        true
    }

    /// Takes waiter `id` out of the queue (`Dequeued`), or, if it was already
    /// granted the slot, says so (`Granted`).
    pub(crate) fn leave(&self, wallet: &K, id: DispatchId) -> Leave {
        let mut shard = self.shard(wallet);
        let Entry::Occupied(mut entry) = shard.entry(wallet.clone()) else {
            return Leave::Gone;
        };
        let slot = entry.get_mut();
        if let Some(at) = slot.queue.iter().position(|w| w.holder.id == id) {
            slot.queue.remove(at);
            if slot.is_idle() {
                entry.remove();
            }
            return Leave::Dequeued;
        }
        if slot.holder.as_ref().map(|h| h.id) == Some(id) {
            Leave::Granted
        } else {
            Leave::Gone
        }
    }

    pub(crate) fn is_busy(&self, wallet: &K) -> bool {
        self.shard(wallet)
            .get(wallet)
            .is_some_and(|slot| slot.holder.is_some())
    }

    pub(crate) fn queue_len(&self, wallet: &K) -> usize {
        self.shard(wallet)
            .get(wallet)
            .map_or(0, |slot| slot.queue.len())
    }
}

/// What [`Slots::leave`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Leave {
    /// Taken out of the queue.
    Dequeued,
    /// Not in the queue: it holds the slot.
    Granted,
    /// Neither (not expected).
    Gone,
}
