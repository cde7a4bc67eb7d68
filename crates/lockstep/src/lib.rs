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
//! [`chain::ChainSource`] trait a node implements, and
//! [`chain::BitcoindSource`], Bitcoin Core as a source. The simulated
//! regtest chain the examples run on is the `lockstep-sim` crate, a
//! dev-dependency only: an embedder's build carries none of it.
//!
//! # Features
//!
//! - `zmq` (off by default): `lockstep-chain/zmq`, Bitcoin Core's ZMQ
//!   `rawtx` notifications for [`chain::BitcoindSource`]
//!   (`BitcoindConfig::with_zmq_rawtx`), through the pure-Rust `zeromq`
//!   crate. Without it the mempool is polled (every
//!   `Config::mempool_poll_interval`, and after each block).
//!
//! With default features the facade pulls no random number generator, no
//! HTTP server and no ZeroMQ: its HTTP is reqwest's client, for
//! [`chain::BitcoindSource`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use bitcoin;
pub use lockstep_actions::{
    Advance, DriveError, DriveMode, DriveOutcome, Executor, ExecutorConfig, FeeBump, Spend,
    SpendState, StepCtx, StepError, StopError, WalletAction,
};
pub use lockstep_chain as chain;
pub use lockstep_dispatcher::{
    ActionCtx, ActionHandle, ActionKind, ActionSpec, DispatchError, DispatchId, LockHolder,
    Outcome, SignPermit, Stats as DispatchStats, lock_holder,
};
pub use lockstep_manager::{
    ErrorKind, Event, ManagerConfig as Config, ManagerError, MempoolSync, NewWallet, ScriptImport,
    Stats, Status, Strategy, WaitError, WalletInfo,
};
pub use lockstep_store::{OpenError, StoreOptions, WalletId};
pub use lockstep_wallet::{
    Balance, Coin, CoinInfo, CoinState, DEFAULT_LOOKAHEAD, DescriptorError, HistoryTx, Keychain,
    KeychainInfo, LiveWallet, Pin, RegistryStats, Revealed, Selection, SpendRequest,
    WalletDescriptors, WalletError,
};
pub use miniscript;

use std::future::Future;

use lockstep_chain::{BlockId, ChainSource};
use lockstep_dispatcher::Dispatcher;
use lockstep_manager::Manager;
use lockstep_store::Store;
use tokio::sync::{broadcast, watch};

/// Many wallets, one chain loop, one dispatcher: the handle an embedder
/// holds. Cloning gives another handle on the same loop, wallets and
/// action slots.
#[derive(Clone)]
pub struct Lockstep {
    manager: Manager,
    dispatcher: Dispatcher<WalletId>,
    /// Durable actions, admitted through `dispatcher`.
    executor: Executor,
    /// The task feeding the loop's tip to the dispatcher (deadlines in
    /// blocks), while the loop runs.
    tip_feed: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Lockstep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockstep")
            .field("manager", &self.manager)
            .field("dispatcher", &self.dispatcher.stats())
            .finish_non_exhaustive()
    }
}

/// Why an action could not be dispatched on a wallet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActError {
    /// The dispatcher refused it: [`DispatchError::WalletBusy`] (at once),
    /// [`DispatchError::Timeout`], a deadline already passed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError<WalletId>),
    /// The wallet could not be loaded.
    #[error(transparent)]
    Wallet(#[from] WalletError),
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
        Ok(Self::from_manager(Manager::new(store, source, config)))
    }

    /// A facade over a manager built by lockstep's own tests (they read the
    /// database to compare with the oracle).
    #[doc(hidden)]
    pub fn from_manager(manager: Manager) -> Lockstep {
        Self::from_manager_with(manager, ExecutorConfig::default())
    }

    /// [`Lockstep::from_manager`] with the executor's configuration (the
    /// tests run every step twice).
    #[doc(hidden)]
    pub fn from_manager_with(manager: Manager, config: ExecutorConfig) -> Lockstep {
        let dispatcher = Dispatcher::new();
        let executor = Executor::new(
            manager.store().clone(),
            manager.registry().clone(),
            Arc::clone(manager.source()),
            dispatcher.clone(),
            manager.tip(),
            config,
        );
        executor.register::<Spend>();
        if manager.try_set_hook(Arc::new(ActionsHook)).is_err() {
            tracing::warn!(
                "the manager is busy: coin locks of dead actions expire only through Executor::expire_locks"
            );
        }
        Lockstep {
            manager,
            dispatcher,
            executor,
            tip_feed: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The durable actions' executor: [`Executor::drive`] a [`Spend`] (a
    /// send or a consolidation) to its end, surviving crashes and restarts;
    /// [`Executor::resume_all`] at start-up re-drives every action a
    /// previous run left.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// The action slots: one exclusive action per wallet, deadlines in
    /// blocks (fed the loop's tip while it runs), signer limits and
    /// per-kind signing margins (`add_signer_limit`, `set_margin`,
    /// `on_expired`).
    pub fn dispatcher(&self) -> &Dispatcher<WalletId> {
        &self.dispatcher
    }

    /// Runs `action` on wallet `id` as its one exclusive action, or refuses
    /// at once with [`DispatchError::WalletBusy`] (naming the action that
    /// holds it). The action gets the dispatcher's context (its id, to lock
    /// coins under; early release; signer permits) and the wallet's live
    /// instance, which the registry keeps loaded until the action ends.
    ///
    /// # Errors
    /// [`ActError::Dispatch`], or [`ActError::Wallet`] if the wallet cannot
    /// be loaded.
    pub async fn try_dispatch<F, Fut, T, E>(
        &self,
        id: WalletId,
        spec: ActionSpec,
        action: F,
    ) -> Result<ActionHandle<T, E>, ActError>
    where
        F: FnOnce(ActionCtx<WalletId>, Arc<LiveWallet>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let wallet = self.wallet(id).await?;
        Ok(self
            .dispatcher
            .try_dispatch(id, spec, pinned(action, wallet))?)
    }

    /// [`try_dispatch`](Self::try_dispatch), waiting in the wallet's FIFO
    /// queue up to `timeout` when it is busy.
    ///
    /// # Errors
    /// [`DispatchError::Timeout`] (in [`ActError::Dispatch`]), or as
    /// [`try_dispatch`](Self::try_dispatch).
    pub async fn dispatch_wait<F, Fut, T, E>(
        &self,
        id: WalletId,
        spec: ActionSpec,
        action: F,
        timeout: Duration,
    ) -> Result<ActionHandle<T, E>, ActError>
    where
        F: FnOnce(ActionCtx<WalletId>, Arc<LiveWallet>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let wallet = self.wallet(id).await?;
        Ok(self
            .dispatcher
            .dispatch_wait(id, spec, pinned(action, wallet), timeout)
            .await?)
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

    /// Takes back a parked wallet (one the loop could not process, see
    /// [`WalletInfo::parked`] and [`Event::WalletParked`]) once its cause
    /// is mended: it is imported from where it was parked, no restart.
    ///
    /// # Errors
    /// See [`ManagerError`]; the wallet's own failure again parks it again.
    pub async fn resume_wallet(&self, wallet: WalletId) -> Result<(), ManagerError> {
        self.manager.resume_wallet(wallet).await
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

    /// Starts the chain loop in the background (a tokio task), and feeds
    /// its tip to the dispatcher (actions past their deadline height
    /// expire).
    pub fn start(&self) {
        self.manager.start();
        let mut feed = self.tip_feed.lock().unwrap_or_else(|e| e.into_inner());
        if feed.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let mut tip = self.manager.tip();
        let dispatcher = self.dispatcher.clone();
        *feed = Some(tokio::spawn(async move {
            loop {
                let height = tip.borrow_and_update().map(|t| t.height);
                if let Some(height) = height {
                    dispatcher.set_tip(height);
                }
                if tip.changed().await.is_err() {
                    return;
                }
            }
        }));
    }

    /// Stops the chain loop; returns once nothing runs. Running actions
    /// go on (their deadlines wait for the next start).
    pub async fn stop(&self) {
        let feed = self
            .tip_feed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(feed) = feed {
            feed.abort();
        }
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

    /// Polls the source's mempool once: every wallet's unconfirmed
    /// transactions follow it (the running loop does this at the tip, and
    /// [`Lockstep::sync`] before it returns). `None` when the source shows
    /// no mempool.
    ///
    /// # Errors
    /// A source or database failure; nothing is half-recorded.
    pub async fn sync_mempool(&self) -> Result<Option<MempoolSync>, ManagerError> {
        self.manager.sync_mempool().await
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

/// An action's future, boxed once to carry the wallet's pin.
type ActionFuture<T, E> = std::pin::Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// `action` on `wallet`, which the registry keeps loaded (never evicted)
/// until the action's future ends, whichever way.
fn pinned<F, Fut, T, E>(
    action: F,
    wallet: Arc<LiveWallet>,
) -> impl FnOnce(ActionCtx<WalletId>) -> ActionFuture<T, E>
where
    F: FnOnce(ActionCtx<WalletId>, Arc<LiveWallet>) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let pin = wallet.pin();
    move |ctx| {
        let mut unlock = ReleaseOnDrop {
            wallet: Some(Arc::clone(&wallet)),
            holder: lock_holder(LockHolder::Dispatched(ctx.id())),
        };
        let running = action(ctx, wallet);
        Box::pin(async move {
            let _pin = pin;
            let result = running.await;
            if let Some(wallet) = unlock.wallet.take()
                && result.is_err()
            {
                // Failed: the coins it locked but never broadcast with come
                // back before its outcome is reported.
                if let Err(error) = wallet.release_unbroadcast(&unlock.holder).await {
                    tracing::warn!(holder = %unlock.holder, %error, "releasing a failed action's coins");
                }
            }
            result
        })
    }
}

/// Releases an action's unbroadcast coins when its future is dropped
/// before it returned (a panic, a cancellation, an expiry).
struct ReleaseOnDrop {
    wallet: Option<Arc<LiveWallet>>,
    holder: String,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(wallet) = self.wallet.take() else {
            return;
        };
        let holder = std::mem::take(&mut self.holder);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = wallet.release_unbroadcast(&holder).await {
                    tracing::warn!(%holder, %error, "releasing a stopped action's coins");
                }
            });
        }
    }
}

/// Runs inside every block's transaction: the coin locks of actions that
/// stopped renewing them (never resumed) expire with the block that reaches
/// their height, in the same transaction as the block.
struct ActionsHook;

impl lockstep_manager::BlockHook for ActionsHook {
    fn block_connected(
        &self,
        tx: &mut lockstep_store::WriteTx<'_>,
        height: u32,
        _hash: &bitcoin::BlockHash,
    ) -> Result<(), lockstep_manager::HookError> {
        tx.expire_locks(height)
            .map(|_| ())
            .map_err(|e| Box::new(e) as lockstep_manager::HookError)
    }

    fn blocks_disconnected(
        &self,
        _tx: &mut lockstep_store::WriteTx<'_>,
        _fork_height: u32,
    ) -> Result<(), lockstep_manager::HookError> {
        Ok(())
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
