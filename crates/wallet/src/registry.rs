//! The wallet registry: one live instance of each wallet in a process.
//!
//! Everyone who works on a wallet (the chain loop ingesting a block, an
//! embedder revealing an address, reading a balance or building a payment)
//! works on the same [`LiveWallet`], so each sees the others' changes at
//! once: an address handed out moves the window the loop watches, a change
//! script revealed by a payment is the one the loop credits.
//!
//! Loading is coalesced by construction: every load runs inside a write
//! transaction on the store's one writer thread, so two loads of one
//! wallet can never overlap, and a load sees every committed change to the
//! wallet's rows (no write can slip between the snapshot a load read and
//! the instance becoming live). Callers that arrive while a load is queued
//! join it and get its result, success or failure; a failure is not kept,
//! so the next call loads again.
//!
//! Why not `moka`'s coalescing cache: it coalesces loads and does not cache
//! failures, but it evicts by size and frequency without knowing whether a
//! wallet is in use. Evicting an entry whose handle is still held would let
//! the next `get_or_load` create a second live instance of the same wallet,
//! which is the one thing the registry must never do; its weigher is fixed
//! at insertion, so "in use" (a change over time) cannot be expressed. The
//! registry below keeps a plain map with a use counter and evicts, least
//! recently used first, only wallets nobody holds, nobody pinned and with
//! no coin locked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lockstep_store::{ReadTx, Store, StoreError, WalletId, WriteTx};
use tokio::sync::watch;

use crate::grown::Grown;
use crate::live::LiveWallet;
use crate::wallet::{Wallet, WalletError};

/// How many wallets a registry keeps loaded by default when none is in
/// use. A loaded wallet costs its scripts twice (a vector and a map) and
/// its descriptors: about 200 bytes per script, so 1,000 wallets of 100
/// scripts are ~20 MB.
pub const DEFAULT_CAPACITY: usize = 1_000;

type LoadResult = Option<Result<Arc<LiveWallet>, Arc<WalletError>>>;

enum Slot {
    /// Loaded; `used` is the registry's clock at the last access.
    Live { wallet: Arc<LiveWallet>, used: u64 },
    /// A load is queued on the writer thread; waiters subscribe.
    Loading(watch::Sender<LoadResult>),
}

#[derive(Default)]
struct Slots {
    slots: HashMap<WalletId, Slot>,
    clock: u64,
}

/// What a registry has done, for tests and monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Wallets loaded from the database (or created and taken in).
    pub loads: u64,
    /// Calls that found a load queued and waited for it instead.
    pub joined: u64,
    /// Loads that failed (not kept: the next call loads again).
    pub failed: u64,
    /// Wallets evicted to keep within the capacity.
    pub evicted: u64,
    /// Wallets loaded now.
    pub loaded: usize,
}

pub(crate) struct Shared {
    slots: Mutex<Slots>,
    /// Wallets whose scripts grew outside the chain loop.
    grown: Grown,
    capacity: usize,
    loads: AtomicU64,
    joined: AtomicU64,
    failed: AtomicU64,
    evicted: AtomicU64,
    /// Test hook: runs before each load (a failing loader in tests).
    #[allow(clippy::type_complexity)]
    before_load: Mutex<Option<Arc<dyn Fn(WalletId) -> Result<(), WalletError> + Send + Sync>>>,
}

/// The one live instance of each wallet in this process. Cloning gives
/// another handle on the same registry.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// A registry over `store` keeping at most `capacity` wallets loaded
    /// when they are not in use (wallets in use are never evicted, so the
    /// count can exceed it while they are).
    pub fn new(store: Store, capacity: usize) -> Registry {
        Registry {
            store,
            shared: Arc::new(Shared {
                slots: Mutex::new(Slots::default()),
                grown: Grown::default(),
                capacity: capacity.max(1),
                loads: AtomicU64::new(0),
                joined: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                before_load: Mutex::new(None),
            }),
        }
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Releases every coin lock (of any wallet) whose expiry height
    /// `height` reached: the coins of actions that stopped renewing them
    /// come back. Returns how many.
    ///
    /// # Errors
    /// The database's error.
    pub async fn expire_locks(&self, height: u32) -> Result<usize, StoreError> {
        self.store.write(move |tx| tx.expire_locks(height)).await
    }

    /// The one live instance of wallet `id`, loading it if no one has it.
    ///
    /// Concurrent calls for one id cause one load; every caller gets the
    /// same instance, or the same error. While any handle is alive this
    /// returns that instance.
    ///
    /// # Errors
    /// [`WalletError::NotFound`], or [`WalletError::LoadFailed`] with the
    /// load's error (shared by every caller that waited for it).
    pub async fn get_or_load(&self, id: WalletId) -> Result<Arc<LiveWallet>, WalletError> {
        let mut waiting = {
            let mut slots = lock(&self.shared.slots);
            slots.clock += 1;
            let now = slots.clock;
            match slots.slots.get_mut(&id) {
                Some(Slot::Live { wallet, used }) => {
                    *used = now;
                    return Ok(Arc::clone(wallet));
                }
                Some(Slot::Loading(sender)) => {
                    self.shared.joined.fetch_add(1, Ordering::Relaxed);
                    sender.subscribe()
                }
                None => {
                    let (sender, receiver) = watch::channel(None);
                    slots.slots.insert(id, Slot::Loading(sender));
                    drop(slots);
                    self.queue_load(id);
                    receiver
                }
            }
        };
        // The load's sender going away without an answer is the store
        // closing under it.
        let result = waiting
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| Err(Arc::new(WalletError::Store(StoreError::Closed))));
        result.map_err(|error| shared_error(id, error))
    }

    /// Queues the load of `id` on the writer thread. Runs in a task of its
    /// own, so that a caller giving up does not strand the others.
    fn queue_load(&self, id: WalletId) {
        let registry = self.clone();
        let load = async move {
            let inner = registry.clone();
            let result: Result<(), WalletError> = registry
                .store
                .write(move |tx| {
                    // Errors of the load itself are handed to the waiters
                    // inside; only the store failing to run this comes out.
                    let _ = inner.get_in(tx, id);
                    Ok(())
                })
                .await;
            if let Err(error) = result {
                registry.finish(id, Err(Arc::new(error)));
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(load);
            }
            Err(_) => self.finish(
                id,
                Err(Arc::new(WalletError::InvalidRequest(
                    "get_or_load needs a tokio runtime",
                ))),
            ),
        }
    }

    /// Hands a load's outcome to its waiters: a live wallet is kept, an
    /// error is not. Does nothing if no load of `id` is waiting.
    fn finish(&self, id: WalletId, result: Result<Arc<LiveWallet>, Arc<WalletError>>) {
        let mut slots = lock(&self.shared.slots);
        slots.clock += 1;
        let now = slots.clock;
        let Some(Slot::Loading(_)) = slots.slots.get(&id) else {
            return;
        };
        let replaced = match &result {
            Ok(wallet) => slots.slots.insert(
                id,
                Slot::Live {
                    wallet: Arc::clone(wallet),
                    used: now,
                },
            ),
            Err(_) => slots.slots.remove(&id),
        };
        if let Some(Slot::Loading(sender)) = replaced {
            sender.send_replace(Some(result));
        }
    }

    /// The live instance of `id`, loaded from `tx` if no one has it: for
    /// code already inside a write transaction (the chain loop, a
    /// registration). Waiters of a queued load of `id` get this instance.
    ///
    /// # Errors
    /// The load's error.
    pub fn get_in(&self, tx: &WriteTx<'_>, id: WalletId) -> Result<Arc<LiveWallet>, WalletError> {
        {
            let mut slots = lock(&self.shared.slots);
            slots.clock += 1;
            let now = slots.clock;
            if let Some(Slot::Live { wallet, used }) = slots.slots.get_mut(&id) {
                *used = now;
                return Ok(Arc::clone(wallet));
            }
        }
        // Only the writer thread loads (this runs on it), so no other load
        // of `id` can run meanwhile.
        let loaded = self.load(tx, id);
        match loaded {
            Ok(wallet) => {
                let live = Arc::new(LiveWallet::new(
                    wallet,
                    self.store.clone(),
                    self.shared.grown.clone(),
                ));
                self.take_in(tx, live)
            }
            Err(error) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                let error = Arc::new(error);
                self.finish(id, Err(Arc::clone(&error)));
                Err(shared_error(id, error))
            }
        }
    }

    fn load(&self, tx: &ReadTx<'_>, id: WalletId) -> Result<Wallet, WalletError> {
        let hook = lock(&self.shared.before_load).clone();
        if let Some(hook) = hook {
            hook(id)?;
        }
        Wallet::load(tx, id)
    }

    /// Makes a wallet just created in `tx` (or loaded) the live instance,
    /// unless one is live already (then that one is returned).
    pub(crate) fn take_in(
        &self,
        tx: &ReadTx<'_>,
        live: Arc<LiveWallet>,
    ) -> Result<Arc<LiveWallet>, WalletError> {
        let id = live.id();
        let mut slots = lock(&self.shared.slots);
        slots.clock += 1;
        let now = slots.clock;
        if let Some(Slot::Live { wallet, used }) = slots.slots.get_mut(&id) {
            *used = now;
            return Ok(Arc::clone(wallet));
        }
        self.shared.loads.fetch_add(1, Ordering::Relaxed);
        let previous = slots.slots.insert(
            id,
            Slot::Live {
                wallet: Arc::clone(&live),
                used: now,
            },
        );
        if let Some(Slot::Loading(sender)) = previous {
            sender.send_replace(Some(Ok(Arc::clone(&live))));
        }
        self.evict(&mut slots, tx)?;
        Ok(live)
    }

    /// Registers a new wallet in the caller's transaction and makes it live
    /// (with its first scripts derived beforehand, if given).
    ///
    /// # Errors
    /// As [`Wallet::create`].
    pub fn create_in(
        &self,
        tx: &mut WriteTx<'_>,
        params: &crate::WalletParams<'_>,
        descriptors: crate::WalletDescriptors,
        first: Option<crate::FirstScripts>,
    ) -> Result<Arc<LiveWallet>, WalletError> {
        let wallet = Wallet::create_with(tx, params, descriptors, first)?;
        let live = Arc::new(LiveWallet::new(
            wallet,
            self.store.clone(),
            self.shared.grown.clone(),
        ));
        self.take_in(tx, live)
    }

    /// Evicts, least recently used first, wallets not in use until at most
    /// `capacity` are loaded. In use: a handle held outside the registry,
    /// a pin ([`LiveWallet::pin`]: a running action), a coin locked, or a
    /// working copy staged (a write transaction changed it: loaded again in
    /// that transaction, it would read the transaction's own writes).
    fn evict(&self, slots: &mut Slots, tx: &ReadTx<'_>) -> Result<(), WalletError> {
        let live = slots.slots.len();
        if live <= self.shared.capacity {
            return Ok(());
        }
        let mut candidates: Vec<(u64, WalletId)> = slots
            .slots
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live { wallet, used }
                    if Arc::strong_count(wallet) == 1
                        && !wallet.is_pinned()
                        && !wallet.is_staged() =>
                {
                    Some((*used, *id))
                }
                _ => None,
            })
            .collect();
        candidates.sort_unstable();
        let mut excess = live - self.shared.capacity;
        for (_, id) in candidates {
            if excess == 0 {
                break;
            }
            if tx
                .unspent_coins_with_locks(id)?
                .iter()
                .any(|(_, holder)| holder.is_some())
            {
                continue;
            }
            slots.slots.remove(&id);
            self.shared.evicted.fetch_add(1, Ordering::Relaxed);
            excess -= 1;
        }
        Ok(())
    }

    /// Reloads every live instance from `tx`, in place (handles stay
    /// valid): after a write transaction that changed them failed, their
    /// memory may be ahead of the database. Unlocked keys stay unlocked.
    ///
    /// A wallet that fails to load for a reason of its own (its stored
    /// state is corrupt) is unloaded instead, so that one broken wallet
    /// does not stop the others: its next load fails again, where the
    /// caller knows whose failure it is.
    ///
    /// # Errors
    /// The database's error.
    pub fn reload_in(&self, tx: &ReadTx<'_>) -> Result<(), WalletError> {
        let live: Vec<Arc<LiveWallet>> = lock(&self.shared.slots)
            .slots
            .values()
            .filter_map(|slot| match slot {
                Slot::Live { wallet, .. } => Some(Arc::clone(wallet)),
                Slot::Loading(_) => None,
            })
            .collect();
        for wallet in live {
            match wallet.reload_in(tx) {
                Ok(()) => {}
                Err(error @ WalletError::Store(_)) => return Err(error),
                Err(error) => {
                    tracing::error!(wallet = %wallet.id(), %error, "a wallet failed to reload: unloaded");
                    self.unload(wallet.id());
                }
            }
        }
        Ok(())
    }

    /// Drops wallet `id`'s live instance (a parked wallet's, whose memory
    /// may be ahead of the database): the next [`get_or_load`](Self::get_or_load)
    /// loads it again from the database.
    pub fn unload(&self, id: WalletId) {
        let mut slots = lock(&self.shared.slots);
        if matches!(slots.slots.get(&id), Some(Slot::Live { .. })) {
            slots.slots.remove(&id);
        }
    }

    /// Reloads wallet `id`'s live instance from `tx` in place, if it is
    /// loaded and its stored keychains moved without it: another process
    /// changed its rows (revealed addresses, or derived scripts for a
    /// targeted import it started), so what this process holds is behind.
    ///
    /// # Errors
    /// The wallet failed to load.
    pub fn refresh_in(&self, tx: &WriteTx<'_>, id: WalletId) -> Result<(), WalletError> {
        let live = match lock(&self.shared.slots).slots.get(&id) {
            Some(Slot::Live { wallet, .. }) => Arc::clone(wallet),
            _ => return Ok(()),
        };
        live.wallet_in(tx).refresh_if_moved(tx)?;
        Ok(())
    }

    /// Drops live instances whose wallet is not in the database: one made
    /// by [`create_in`](Self::create_in) inside a transaction that rolled
    /// back. Returns how many.
    ///
    /// # Errors
    /// The database's error.
    pub fn forget_missing(&self, tx: &ReadTx<'_>) -> Result<usize, WalletError> {
        let ids: Vec<WalletId> = lock(&self.shared.slots)
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Live { .. }))
            .map(|(id, _)| *id)
            .collect();
        let mut missing = Vec::new();
        for id in ids {
            if tx.wallet(id)?.is_none() {
                missing.push(id);
            }
        }
        let mut slots = lock(&self.shared.slots);
        for id in &missing {
            if matches!(slots.slots.get(id), Some(Slot::Live { .. })) {
                slots.slots.remove(id);
            }
        }
        Ok(missing.len())
    }

    /// The wallets whose scripts grew outside the chain loop since the last
    /// call (addresses and change revealed): the loop watches their new
    /// scripts inside its next write transaction.
    pub fn take_grown(&self) -> Vec<WalletId> {
        self.shared.grown.take()
    }

    /// Has the chain loop look at wallet `id`'s scripts again inside its
    /// next write transaction.
    pub fn mark_grown(&self, id: WalletId) {
        self.shared.grown.mark(id);
    }

    /// Whether wallet `id` is loaded now.
    pub fn is_loaded(&self, id: WalletId) -> bool {
        matches!(
            lock(&self.shared.slots).slots.get(&id),
            Some(Slot::Live { .. })
        )
    }

    /// What the registry has done so far.
    pub fn stats(&self) -> RegistryStats {
        let loaded = lock(&self.shared.slots)
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Live { .. }))
            .count();
        RegistryStats {
            loads: self.shared.loads.load(Ordering::Relaxed),
            joined: self.shared.joined.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            evicted: self.shared.evicted.load(Ordering::Relaxed),
            loaded,
        }
    }

    /// Test support: runs `hook` before every load; an error fails the
    /// load as a real one would.
    #[doc(hidden)]
    #[allow(clippy::type_complexity)]
    pub fn set_before_load(
        &self,
        hook: Option<Arc<dyn Fn(WalletId) -> Result<(), WalletError> + Send + Sync>>,
    ) {
        *lock(&self.shared.before_load) = hook;
    }
}

fn shared_error(id: WalletId, error: Arc<WalletError>) -> WalletError {
    match &*error {
        WalletError::NotFound(_) => WalletError::NotFound(id),
        _ => WalletError::LoadFailed { wallet: id, error },
    }
}
