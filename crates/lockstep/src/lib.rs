//! lockstep keeps many Bitcoin wallets in sync with one chain.
//!
//! This facade is what node software depends on. [`Lockstep`] is the one
//! handle: a database, a chain source, one chain loop for every wallet, and
//! the one live instance of each wallet ([`LiveWallet`]) that the loop and
//! the embedder share, so an address handed out is watched before it is
//! returned and a payment being built never picks a coin a block spent.
//!
//! The facade exposes typed operations only. The database's raw table
//! methods (setting the tip, inserting coins) live in `lockstep-store` and
//! are not reachable from here: an embedder cannot corrupt the synced state
//! by accident.
//!
//! It re-exports the [`bitcoin`] and [`miniscript`] crates it is built on,
//! so an embedder uses the same versions, and [`chain`]: the
//! [`chain::ChainSource`] trait a node implements, and the embedded
//! simulated regtest chain [`chain::SimChain`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use bitcoin;
pub use lockstep_chain as chain;
pub use lockstep_manager::{
    ErrorKind, Event, ManagerConfig as Config, ManagerError, NewWallet, ScriptImport, Stats,
    Status, Strategy, WaitError, WalletInfo,
};
pub use lockstep_store::{OpenError, StoreOptions, WalletId};
pub use lockstep_wallet::{
    Balance, Coin, CoinInfo, CoinState, DEFAULT_LOOKAHEAD, DescriptorError, HistoryTx, Keychain,
    KeychainInfo, LiveWallet, Pin, RegistryStats, Revealed, Selection, SpendRequest,
    WalletDescriptors, WalletError,
};
pub use miniscript;

use lockstep_chain::{BlockId, ChainSource};
use lockstep_manager::Manager;
use lockstep_store::Store;
use tokio::sync::{broadcast, watch};

/// Many wallets, one chain loop: the handle an embedder holds. Cloning
/// gives another handle on the same loop and wallets.
#[derive(Clone, Debug)]
pub struct Lockstep {
    manager: Manager,
}

impl Lockstep {
    /// Opens (or creates) the database at `path` with the default options
    /// and sets up the loop over `source`. Nothing is fetched until
    /// [`start`](Self::start), [`sync`](Self::sync) or a registration.
    ///
    /// # Errors
    /// The database could not be opened: see [`OpenError`] (a file of
    /// another application, a newer version, corruption, no permission).
    pub fn open(
        path: impl AsRef<Path>,
        source: Arc<dyn ChainSource>,
        config: Config,
    ) -> Result<Lockstep, OpenError> {
        Self::open_with(path, StoreOptions::default(), source, config)
    }

    /// [`open`](Self::open) with the database's options.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with(
        path: impl AsRef<Path>,
        options: StoreOptions,
        source: Arc<dyn ChainSource>,
        config: Config,
    ) -> Result<Lockstep, OpenError> {
        let store = Store::open(path.as_ref(), options)?;
        Ok(Lockstep {
            manager: Manager::new(store, source, config),
        })
    }

    /// Registers a wallet (the one way to add one): born above the loop's
    /// tip it joins at once, otherwise it is imported from its birth
    /// height while the loop stands still. Returns once it is synced. Safe
    /// to retry with the same name and descriptors.
    ///
    /// # Errors
    /// See [`ManagerError`]: another network, a name taken by other
    /// descriptors, a source or database failure; once the wallet is
    /// written, [`ManagerError::ImportIncomplete`] (the loop finishes it).
    pub async fn register(&self, wallet: NewWallet) -> Result<WalletId, ManagerError> {
        self.manager.register(wallet).await
    }

    /// Rescans some scripts of a wallet from `from_height` (payments past a
    /// gap limit), stopping the world like a registration.
    ///
    /// # Errors
    /// See [`ManagerError`].
    pub async fn import_scripts(
        &self,
        wallet: WalletId,
        scripts: ScriptImport,
        from_height: u32,
    ) -> Result<(), ManagerError> {
        self.manager
            .import_scripts(wallet, scripts, from_height)
            .await
    }

    /// The live instance of a wallet: addresses, reads and spends, shared
    /// with the chain loop. Loaded once however many callers ask.
    ///
    /// # Errors
    /// [`WalletError::NotFound`], or the load's error.
    pub async fn wallet(&self, id: WalletId) -> Result<Arc<LiveWallet>, WalletError> {
        self.manager.wallet(id).await
    }

    /// The live instance of the wallet named `name`.
    ///
    /// # Errors
    /// [`WalletError::InvalidRequest`] if no wallet has the name, or the
    /// load's error.
    pub async fn wallet_named(&self, name: &str) -> Result<Arc<LiveWallet>, WalletError> {
        self.manager.wallet_named(name).await
    }

    /// Every registered wallet.
    ///
    /// # Errors
    /// The database's error.
    pub async fn wallets(&self) -> Result<Vec<WalletInfo>, WalletError> {
        self.manager.wallets().await
    }

    /// Starts the chain loop in the background (a tokio task).
    pub fn start(&self) {
        self.manager.start();
    }

    /// Stops the chain loop; returns once nothing runs.
    pub async fn stop(&self) {
        self.manager.stop().await;
    }

    /// Runs the loop in the caller's task up to the source's tip; returns
    /// that height. For callers that drive the loop themselves.
    ///
    /// # Errors
    /// The first [`ManagerError`] of a step.
    pub async fn sync(&self) -> Result<u32, ManagerError> {
        self.manager.sync().await
    }

    /// Waits until the loop has committed a block at `height` or above
    /// (a reorg cannot strand it), and returns its tip then.
    ///
    /// # Errors
    /// [`WaitError::Timeout`], or [`WaitError::LoopFailed`] at once if the
    /// loop ends with a fatal error.
    pub async fn wait_for(&self, height: u32, timeout: Duration) -> Result<BlockId, WaitError> {
        self.manager.wait_for(height, timeout).await
    }

    /// The loop's status: connecting, syncing, synced, offline, failed.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.manager.status()
    }

    /// The loop's committed tip, as it moves.
    pub fn tip(&self) -> watch::Receiver<Option<BlockId>> {
        self.manager.tip()
    }

    /// Events from now on (blocks connected and disconnected, wallets
    /// imported, what each block did to each wallet).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.manager.subscribe()
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        self.manager.stats()
    }

    /// What the wallet registry has loaded, joined and evicted.
    pub fn registry_stats(&self) -> RegistryStats {
        self.manager.registry().stats()
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
