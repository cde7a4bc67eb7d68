//! The one chain loop for all wallets.
//!
//! A [`Manager`] owns one [`ChainSource`] and runs one chain loop (a tokio
//! task) for every registered wallet:
//!
//! - **Per block**, the basic filter is fetched (several blocks ahead,
//!   while earlier blocks are matched and committed), checked against the
//!   BIP157 filter-header chain, and matched once against the aggregate
//!   watchlist of every wallet's scripts. Only a match fetches the block,
//!   which is checked against its header and merkle root; its transactions
//!   are routed to the wallets they touch through a script-to-wallets map
//!   and a spent-outpoint-to-wallets map, one lookup per output and input.
//! - **One SQLite transaction** connects a batch of blocks (one block at the
//!   tip): every touched wallet ingests; scripts a block derives (a used
//!   lookahead window) join the watchlist at once, for the rest of the
//!   block and every filter fetched ahead; the loop's tip and its recent
//!   hashes move; the [`BlockHook`] runs. A wallet's synced-to *is* the
//!   loop's tip, so no per-wallet row is rewritten per block. Events are
//!   published after the commit.
//! - **Strategy**: when hashing every watched script costs clearly more per
//!   block than fetching, checking and routing the block, its bytes
//!   counted (measured as the loop runs, confirmed over two batches), the
//!   loop fetches every block instead; it logs each switch.
//! - **Import** ([`Manager::register`], [`Manager::import_scripts`])
//!   stops the world at a block boundary, scans from the wallet's birth (or
//!   the given height) for the newcomer's scripts only, in batches that
//!   record the import's progress, and joins the newcomer at the loop's tip.
//!   A crash mid-import resumes it on restart, before the loop goes on.
//! - **Reorgs** are found when the source's headers stop extending the
//!   loop's tip (and at start-up); every wallet disconnects down to the
//!   fork point in one transaction, then the new branch is connected.
//!
//! Everything the loop commits is in the database: a restart resumes from
//! it, and a crash at any instant loses nothing (see the crash test in
//! `tests/`).

mod books;
mod config;
mod connect;
mod engine;
mod error;
mod events;
mod mempool;
mod pipeline;
mod pow;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bitcoin::{BlockHash, ScriptBuf};
use lockstep_chain::{BlockId, ChainSource};
use lockstep_store::{Parked, Store, WalletId, WriteTx};
use lockstep_wallet::{
    DEFAULT_LOOKAHEAD, FirstScripts, Keychain, LiveWallet, Registry, WalletDescriptors, WalletError,
};
use tokio::sync::{Mutex, broadcast, watch};
use tokio::task::JoinHandle;

pub use config::{ManagerConfig, Strategy};
pub use error::{ErrorKind, HookError, ManagerError};
pub use events::{Event, Stats, Status};
pub use mempool::MempoolSync;

use engine::{Engine, Outputs, StepOutcome};
use events::Counters;

/// Called inside the database transaction that connects or disconnects
/// blocks, so that what the dispatcher and actions change per block
/// commits atomically with the block. The manager knows nothing of what
/// the hook does. An error rolls the whole transaction back.
pub trait BlockHook: Send + Sync + 'static {
    /// The block at `height` is being connected (in height order; several
    /// per transaction while catching up).
    fn block_connected(
        &self,
        tx: &mut WriteTx<'_>,
        height: u32,
        hash: &BlockHash,
    ) -> Result<(), HookError>;

    /// Every block above `fork_height` is being disconnected.
    fn blocks_disconnected(&self, tx: &mut WriteTx<'_>, fork_height: u32) -> Result<(), HookError>;
}

/// A wallet to register: [`NewWallet::new`] gives the defaults (scanned
/// from the genesis block, [`DEFAULT_LOOKAHEAD`], watch-only).
#[derive(Debug, Clone)]
pub struct NewWallet {
    /// A unique name.
    pub name: String,
    /// Its two keychains.
    pub descriptors: WalletDescriptors,
    /// The first height that can hold its transactions.
    pub birth_height: u32,
    /// Scripts kept derived past the last used one.
    pub lookahead: u32,
    /// Encrypts a signing wallet's keys at rest.
    pub passphrase: Option<String>,
}

impl NewWallet {
    /// A wallet with the defaults: born at height 0 (the whole chain is
    /// scanned for it: never a missed payment, at the cost of the scan;
    /// give the height the wallet was made at with [`born_at`](Self::born_at)),
    /// [`DEFAULT_LOOKAHEAD`] scripts past the last used one, and no
    /// passphrase (needed if the descriptors carry private keys).
    pub fn new(name: impl Into<String>, descriptors: WalletDescriptors) -> NewWallet {
        NewWallet {
            name: name.into(),
            descriptors,
            birth_height: 0,
            lookahead: DEFAULT_LOOKAHEAD,
            passphrase: None,
        }
    }

    /// The first height that can hold its transactions.
    pub fn born_at(mut self, height: u32) -> NewWallet {
        self.birth_height = height;
        self
    }

    /// Scripts kept derived past the last used one.
    pub fn lookahead(mut self, scripts: u32) -> NewWallet {
        self.lookahead = scripts;
        self
    }

    /// Encrypts a signing wallet's keys at rest with `passphrase`.
    pub fn passphrase(mut self, passphrase: impl Into<String>) -> NewWallet {
        self.passphrase = Some(passphrase.into());
        self
    }
}

/// Why [`Manager::wait_for`] returned without the height.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The loop had not committed the height when the time was up.
    #[error("timed out waiting for height {height} (the loop is at {reached:?})")]
    Timeout {
        /// The height waited for.
        height: u32,
        /// Where the loop's committed tip was.
        reached: Option<BlockId>,
    },
    /// The chain loop ended with a fatal error: it will not get there.
    #[error("the chain loop failed: {error}")]
    LoopFailed {
        /// Why.
        error: String,
    },
}

impl WaitError {
    /// What the caller can do: a timeout may be retried, a failed loop not.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WaitError::Timeout { .. } => ErrorKind::Retryable,
            WaitError::LoopFailed { .. } => ErrorKind::Fatal,
        }
    }
}

/// A registered wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletInfo {
    /// Its id.
    pub id: WalletId,
    /// Its unique name.
    pub name: String,
    /// The first height scanned for it.
    pub birth_height: u32,
    /// While it is being imported: the height its scan has reached.
    pub importing: Option<u32>,
    /// While it is parked: where its state is synced to, and why (see
    /// [`Manager::resume_wallet`]).
    pub parked: Option<Parked>,
}

/// Which scripts of a wallet a targeted import rescans.
#[derive(Debug, Clone)]
pub enum ScriptImport {
    /// These scripts, each one the wallet already derives.
    Scripts(Vec<ScriptBuf>),
    /// A keychain's scripts `0..end`, derived first where the lookahead
    /// window has not reached them (a payment past the gap limit).
    Range {
        /// The keychain.
        keychain: Keychain,
        /// One past the last index.
        end: u32,
    },
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Shared {
    engine: Mutex<Engine>,
    registry: Registry,
    out: Arc<Outputs>,
    running: std::sync::Mutex<Option<Running>>,
    /// Set by [`Manager::stop`] until everything holding the engine (the
    /// loop, an import, a `sync`) has let go of it.
    stop: watch::Sender<bool>,
    store: Store,
    config: ManagerConfig,
    /// The chain source (also the engine's), for those who broadcast.
    source: Arc<dyn ChainSource>,
}

/// The one chain loop for all wallets. Cloning gives another handle on the
/// same manager.
#[derive(Clone)]
pub struct Manager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("status", &*self.shared.out.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager over `store` and `source`. Nothing is read or fetched
    /// until [`start`](Self::start), [`sync`](Self::sync) or an import.
    pub fn new(store: Store, source: Arc<dyn ChainSource>, config: ManagerConfig) -> Manager {
        let out = Arc::new(Outputs {
            counters: Counters::default(),
            events: broadcast::channel(4096).0,
            status: watch::channel(Status::Connecting).0,
            tip: watch::channel(None).0,
        });
        let stop = watch::channel(false).0;
        let registry = Registry::new(store.clone(), config.registry_capacity);
        let engine = Engine::new(
            store.clone(),
            Arc::clone(&source),
            config.clone(),
            Arc::clone(&out),
            stop.subscribe(),
            registry.clone(),
        );
        Manager {
            shared: Arc::new(Shared {
                engine: Mutex::new(engine),
                registry,
                out,
                running: std::sync::Mutex::new(None),
                stop,
                store,
                config,
                source,
            }),
        }
    }

    /// The chain source the loop follows (broadcasts go to it too).
    pub fn source(&self) -> &Arc<dyn ChainSource> {
        &self.shared.source
    }

    /// Sets the hook called inside every block's transaction.
    pub async fn set_hook(&self, hook: Arc<dyn BlockHook>) {
        self.shared.engine.lock().await.hook = Some(hook);
    }

    /// [`Manager::set_hook`] for a manager nothing runs on yet (the facade
    /// sets its hook as it is built). Returns the hook back if the loop, a
    /// sync or an import holds the engine now.
    ///
    /// # Errors
    /// The hook, if the engine is busy.
    pub fn try_set_hook(&self, hook: Arc<dyn BlockHook>) -> Result<(), Arc<dyn BlockHook>> {
        match self.shared.engine.try_lock() {
            Ok(mut engine) => {
                engine.hook = Some(hook);
                Ok(())
            }
            Err(_) => Err(hook),
        }
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The one live instance of each wallet, shared with the chain loop.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The live instance of wallet `id` (loaded once; see [`Registry`]).
    ///
    /// # Errors
    /// [`WalletError::NotFound`], or the load's error.
    pub async fn wallet(&self, id: WalletId) -> Result<Arc<LiveWallet>, WalletError> {
        self.shared.registry.get_or_load(id).await
    }

    /// The live instance of the wallet named `name`.
    ///
    /// # Errors
    /// [`WalletError::InvalidRequest`] if no wallet has the name, or the
    /// load's error.
    pub async fn wallet_named(&self, name: &str) -> Result<Arc<LiveWallet>, WalletError> {
        let name = name.to_owned();
        let row = self
            .shared
            .store
            .read(move |tx| Ok::<_, WalletError>(tx.wallet_by_name(&name)?))
            .await?
            .ok_or(WalletError::InvalidRequest("no wallet has this name"))?;
        self.wallet(row.wallet_id).await
    }

    /// Every registered wallet, by id.
    ///
    /// # Errors
    /// The database's error.
    pub async fn wallets(&self) -> Result<Vec<WalletInfo>, WalletError> {
        self.shared
            .store
            .read(|tx| {
                Ok(tx
                    .wallets()?
                    .into_iter()
                    .map(|row| WalletInfo {
                        id: row.wallet_id,
                        name: row.name,
                        birth_height: row.birth_height,
                        importing: row.importing_height,
                        parked: row.parked,
                    })
                    .collect())
            })
            .await
    }

    /// Starts the chain loop (a tokio task). Does nothing if it runs.
    ///
    /// One loop runs per database: if another manager (in this process or
    /// another) runs one, this loop shows Offline with
    /// [`ManagerError::LoopElsewhere`] and takes over when that one ends.
    /// A fatal error ends the loop with [`Status::Failed`].
    pub fn start(&self) {
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|r| !r.task.is_finished()) {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        self.shared.stop.send_replace(false);
        let task = tokio::spawn(run_loop(Arc::clone(&self.shared), stop_rx));
        *running = Some(Running { stop, task });
    }

    /// Stops the chain loop: the request in flight and the batch being
    /// fetched are abandoned (nothing of it is committed), a batch being
    /// committed finishes; an import (the loop's, or one a caller runs)
    /// ends at its next block boundary and is resumed at the next start.
    /// The database's loop claim is released, so that another manager (a
    /// standby, in this process or another) can run the loop.
    /// Returns once nothing runs, without waiting out timeouts or retries.
    pub async fn stop(&self) {
        let running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.shared.stop.send_replace(true);
        if let Some(running) = running {
            let _ = running.stop.send(true);
            let _ = running.task.await;
        }
        // Whoever else holds the engine (an import, a `sync`) sees the flag
        // at once; once it has let go, later calls may run again. A stopped
        // loop holds no claim on the database: a standby may take it.
        self.shared.engine.lock().await.release_claim();
        self.shared.stop.send_replace(false);
        self.shared.out.status.send_if_modified(|status| {
            if matches!(status, Status::Failed { .. }) {
                return false;
            }
            *status = Status::Stopped;
            true
        });
    }

    /// Runs the loop in the caller's task until it reaches the source's
    /// tip; returns that height. For callers that drive the loop
    /// themselves (tests, benchmarks, one-shot tools); errors are returned,
    /// not retried.
    ///
    /// # Errors
    /// The first [`ManagerError`] of a step.
    pub async fn sync(&self) -> Result<u32, ManagerError> {
        // A block that arrives while a step finds the tip shows up as the
        // source's tip moving: look again, a few times, before returning.
        let mut looks = 0;
        loop {
            let mut engine = self.shared.engine.lock().await;
            match engine.step().await? {
                StepOutcome::Progress => looks = 0,
                StepOutcome::AtTip | StepOutcome::Stopped => {
                    let tip = engine.tip();
                    looks += 1;
                    if looks >= 3 || engine.source_tip_is(tip).await? {
                        engine.sync_mempool().await?;
                        return Ok(tip.map_or(0, |t| t.height));
                    }
                }
            }
        }
    }

    /// Polls the source's mempool once and brings every active wallet's
    /// unconfirmed transactions in step with it (the running loop does
    /// this at the tip after every poll for blocks, and [`Manager::sync`]
    /// before it returns). `None` when the source shows no mempool.
    ///
    /// # Errors
    /// A source or database failure; nothing is half-recorded.
    pub async fn sync_mempool(&self) -> Result<Option<MempoolSync>, ManagerError> {
        let mut engine = self.shared.engine.lock().await;
        engine.sync_mempool().await
    }

    /// Registers a wallet, the one way to add one. Born above the loop's
    /// tip, it joins at once. Born at or below it, it is imported,
    /// stopping the world: the loop pauses at a block boundary; the blocks
    /// from the wallet's birth height to the loop's tip are scanned for its
    /// scripts only (other wallets receive nothing meanwhile, and lose
    /// nothing); the wallet joins with its synced-to equal to the loop's;
    /// the loop resumes. Either way it returns once the wallet is synced.
    ///
    /// Safe to retry: the same name with the same descriptors returns the
    /// registered wallet (finishing its import if one was interrupted).
    /// If another process runs the loop on this database, the wallet is
    /// written and that loop imports it (or takes it in) at its next
    /// commit at the latest; this returns at once.
    ///
    /// # Errors
    /// [`ManagerError::WrongNetwork`] (descriptors of another network than
    /// the chain's) and [`ManagerError::WalletNameTaken`] (the name is
    /// registered with other descriptors), with nothing written; a source
    /// or database failure before the wallet is written; and, once it is
    /// written, [`ManagerError::ImportIncomplete`] with its id: the wallet
    /// stays marked importing and the loop finishes its import before it
    /// goes on.
    pub async fn register(&self, wallet: NewWallet) -> Result<WalletId, ManagerError> {
        // Its first scripts are derived before the world is held still and
        // outside the writer: registrations made at once derive in
        // parallel, and the loop's commits do not wait for the curve
        // arithmetic. A failure here is reported by the registration itself.
        let (descriptors, lookahead) = (wallet.descriptors.clone(), wallet.lookahead);
        let first =
            tokio::task::spawn_blocking(move || FirstScripts::derive(&descriptors, lookahead))
                .await
                .ok()
                .and_then(Result::ok);
        let mut engine = self.shared.engine.lock().await;
        let result = engine.add_wallet(wallet, first).await;
        self.release_unless_looping(&mut engine);
        result
    }

    /// Whether the chain loop task runs.
    fn is_running(&self) -> bool {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|r| !r.task.is_finished())
    }

    /// A manager that runs no loop lets go of the database's loop claim
    /// after registering or importing, so that a daemon can start.
    fn release_unless_looping(&self, engine: &mut Engine) {
        if !self.is_running() {
            engine.release_claim();
        }
    }

    /// Rescans some scripts of a registered wallet from `from_height` to
    /// the loop's tip, stopping the world like an import: for payments a
    /// lookahead window did not reach, or scripts derived past it.
    ///
    /// # Errors
    /// [`ManagerError::UnknownWallet`], [`ManagerError::NotWalletScript`],
    /// or a source or database failure (the rescan then completes, for all
    /// of the wallet's scripts, before the loop goes on).
    pub async fn import_scripts(
        &self,
        wallet: WalletId,
        scripts: ScriptImport,
        from_height: u32,
    ) -> Result<(), ManagerError> {
        let mut engine = self.shared.engine.lock().await;
        let result = engine.import_scripts(wallet, scripts, from_height).await;
        self.release_unless_looping(&mut engine);
        result
    }

    /// Takes back a parked wallet (once the operator has mended what
    /// parked it): it is imported from the height it was parked at, with
    /// the world stopped as for any import, and joins the loop at its
    /// tip; no restart. Returns once it has joined (at once if it was not
    /// parked). If another process runs the loop, that loop imports it.
    ///
    /// # Errors
    /// [`ManagerError::UnknownWallet`]; a source or database failure (the
    /// wallet then stays marked importing, and the loop finishes it); the
    /// wallet's own failure again (it is parked again, with the new error).
    pub async fn resume_wallet(&self, wallet: WalletId) -> Result<(), ManagerError> {
        let mut engine = self.shared.engine.lock().await;
        let result = engine.resume_wallet(wallet).await;
        self.release_unless_looping(&mut engine);
        result
    }

    /// The loop's status.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.out.status.subscribe()
    }

    /// The loop's committed tip, as it moves.
    pub fn tip(&self) -> watch::Receiver<Option<BlockId>> {
        self.shared.out.tip.subscribe()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.out.events.subscribe()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.out.counters.snapshot()
    }

    /// Waits until the loop has committed a block at `height` or above,
    /// and returns its tip then. A reorg cannot strand it: it waits for a
    /// height, not for a block, so whichever branch reaches the height
    /// ends the wait.
    ///
    /// # Errors
    /// [`WaitError::Timeout`] when `timeout` passes first (with where the
    /// loop got to); [`WaitError::LoopFailed`] as soon as the loop ends with
    /// a fatal error.
    pub async fn wait_for(&self, height: u32, timeout: Duration) -> Result<BlockId, WaitError> {
        self.wait_until(|t| t.height >= height, height, timeout)
            .await
    }

    /// Waits until the loop's committed tip is exactly `target` (its
    /// height and hash): for callers that know which block they expect
    /// (tests of reorgs). Errors as [`wait_for`](Self::wait_for).
    ///
    /// # Errors
    /// As [`wait_for`](Self::wait_for).
    pub async fn wait_for_block(
        &self,
        target: BlockId,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        self.wait_until(|t| *t == target, target.height, timeout)
            .await
            .map(|_| ())
    }

    async fn wait_until(
        &self,
        reached: impl Fn(&BlockId) -> bool,
        height: u32,
        timeout: Duration,
    ) -> Result<BlockId, WaitError> {
        let mut tip = self.tip();
        let mut status = self.status();
        let wait = async {
            loop {
                if let Some(t) = *tip.borrow_and_update()
                    && reached(&t)
                {
                    return Ok(t);
                }
                if let Status::Failed { error } = &*status.borrow_and_update() {
                    return Err(WaitError::LoopFailed {
                        error: error.clone(),
                    });
                }
                tokio::select! {
                    changed = tip.changed() => if changed.is_err() {
                        return Err(WaitError::LoopFailed { error: "the manager was dropped".into() });
                    },
                    _ = status.changed() => {}
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(WaitError::Timeout {
                height,
                reached: *self.shared.out.tip.borrow(),
            }),
        }
    }
}

/// The shortest gap between two mempool polls woken by the source's news:
/// a busy node announces several transactions a second, and each poll
/// lists its whole mempool.
const MEMPOOL_WAKE_GAP: Duration = Duration::from_secs(1);

/// The chain loop: steps while there is work, waits for new blocks at the
/// tip, retries failures with backoff while the status says offline.
async fn run_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = &shared.config;
    let mut backoff = config.initial_backoff;
    let mut offline_since: Option<SystemTime> = None;
    // How many mempool transactions the source had announced when the
    // loop last looked (`ChainSource::mempool_news`).
    let mut news_seen = 0u64;
    // The last mempool poll: when, and at which tip. The next is due
    // `mempool_poll_interval` after it, after a new block, or on news.
    let mut mempool_polled: Option<(tokio::time::Instant, Option<BlockId>)> = None;
    let mut mempool_news = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let step = {
            let mut engine = shared.engine.lock().await;
            engine.step().await
        };
        let wait = match step {
            Ok(StepOutcome::Progress) => {
                backoff = config.initial_backoff;
                offline_since = None;
                continue;
            }
            Ok(StepOutcome::Stopped) => break,
            Ok(StepOutcome::AtTip) => {
                backoff = config.initial_backoff;
                offline_since = None;
                // At the tip: the mempool, when a poll is due. A failure
                // here leaves the confirmed view as it is; the next poll
                // tries again.
                let now = tokio::time::Instant::now();
                let mut engine = shared.engine.lock().await;
                let tip = engine.tip();
                let due = match mempool_polled {
                    None => true,
                    Some((at, polled_tip)) => {
                        mempool_news
                            || polled_tip != tip
                            || now >= at + config.mempool_poll_interval
                    }
                };
                if due {
                    mempool_news = false;
                    mempool_polled = Some((now, tip));
                    if let Err(error) = engine.sync_mempool().await {
                        tracing::warn!(%error, "mempool poll failed");
                    }
                }
                drop(engine);
                // Until the next look for blocks, news from the source
                // (ZMQ `rawtx`) wakes the loop for a mempool poll, at most
                // every MEMPOOL_WAKE_GAP.
                let wake_after = mempool_polled.map_or(now, |(at, _)| at) + MEMPOOL_WAKE_GAP;
                tokio::select! {
                    _ = tokio::time::sleep(config.poll_interval) => {}
                    seen = shared.source.mempool_news(news_seen) => {
                        news_seen = seen;
                        mempool_news = true;
                        tokio::time::sleep_until(wake_after).await;
                    }
                    _ = pipeline::wait_true(&mut stop) => break,
                }
                continue;
            }
            Err(error) if error.kind() == ErrorKind::Fatal => {
                // Retrying cannot mend a corrupt database or a failing
                // hook: stop, and say why.
                tracing::error!(%error, "chain loop stopped by a fatal error");
                shared.out.status.send_replace(Status::Failed {
                    error: error.to_string(),
                });
                break;
            }
            Err(error) => {
                let since = *offline_since.get_or_insert_with(SystemTime::now);
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "chain loop step failed");
                shared.out.status.send_replace(Status::Offline {
                    since,
                    error: error.to_string(),
                });
                let wait = backoff;
                backoff = (backoff * 2).min(config.max_backoff);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = pipeline::wait_true(&mut stop) => break,
        }
    }
}
