//! The executor: drives actions step by step, persisting every step, one
//! drive per action at a time, admitted through the dispatcher.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_chain::{BlockId, ChainSource};
use lockstep_dispatcher::{
    ActionCtx, ActionSpec, DispatchError, Dispatcher, LockHolder, Outcome, lock_holder,
};
use lockstep_store::{CheckpointRow, OutcomeRow, Stop, Store, StoreError, WalletId};
use lockstep_wallet::{LiveWallet, Registry, Release, WalletError};
use tokio::sync::watch;

use crate::action::{Advance, StepCtx, StepError, StepKey, WalletAction, decode, encode};

/// How the executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Runs every `advance` (and `on_rejection`) twice for the same step,
    /// discarding the first result: tests then exercise idempotence instead
    /// of assuming it.
    pub run_each_step_twice: bool,
    /// An action's coin locks expire this many blocks after its last
    /// persisted step (unless they guard a broadcast).
    pub lock_ttl: u32,
    /// How long a drive waits for its wallet's slot in the dispatcher.
    pub admission_timeout: Duration,
    /// The dispatcher's signer limit every action signs under, if any.
    pub signer: Option<String>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            run_each_step_twice: false,
            lock_ttl: 144,
            admission_timeout: Duration::from_secs(60),
            signer: None,
        }
    }
}

/// How far to drive an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveMode {
    /// Until it parks (waits for a block or a retry) or ends.
    UntilParkOrDone,
    /// Until it ends, waking parked steps on new blocks.
    UntilDone,
}

/// How a drive ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveOutcome {
    /// The action finished in this drive.
    Done(String),
    /// It failed in this drive.
    Failed(String),
    /// It parked (only in [`DriveMode::UntilParkOrDone`]).
    Parked,
    /// Another drive of the same action runs now: this one took no step.
    AlreadyRunning,
    /// It had ended before this drive (its recorded outcome).
    Finished(OutcomeRow),
}

/// Why a drive could not run.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The dispatcher refused or timed out (retry later).
    #[error(transparent)]
    Dispatch(#[from] DispatchError<WalletId>),
    /// The wallet or the database failed.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// A checkpoint of an unknown kind, or one that does not decode.
    #[error("checkpoint of action {id}: {detail}")]
    Checkpoint {
        /// The action.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// The drive was cancelled (its checkpoint stays: resume it later).
    #[error("drive cancelled")]
    Cancelled,
    /// The action's deadline passed; its unbroadcast coins were released.
    #[error("action expired")]
    Expired,
    /// A step panicked (its checkpoint stays).
    #[error("a step panicked: {0}")]
    Panicked(String),
}

impl From<StoreError> for DriveError {
    fn from(error: StoreError) -> Self {
        DriveError::Wallet(WalletError::Store(error))
    }
}

/// Why [`Executor::stop`] refused.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// A transaction the action broadcast can still confirm; stop with
    /// `force` to abandon it anyway.
    #[error("action {0} holds a broadcast transaction that can still confirm")]
    BroadcastPending(String),
    /// No such live action.
    #[error("no live action {0}")]
    NotFound(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rest of a drive, once its place in the wallet's line is taken.
type Resumed = Pin<Box<dyn Future<Output = Result<DriveOutcome, DriveError>> + Send>>;
/// Decodes a checkpoint of one kind and admits it (resolving to the rest
/// of its drive).
type Resumer = Arc<
    dyn Fn(
            Executor,
            CheckpointRow,
            Claim,
        ) -> Pin<Box<dyn Future<Output = Result<Resumed, DriveError>> + Send>>
        + Send
        + Sync,
>;

struct Inner {
    store: Store,
    registry: Registry,
    source: Arc<dyn ChainSource>,
    dispatcher: Dispatcher<WalletId>,
    tip: watch::Receiver<Option<BlockId>>,
    config: ExecutorConfig,
    inflight: Mutex<HashSet<String>>,
    resumers: Mutex<HashMap<&'static str, Resumer>>,
}

/// Drives durable actions. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Takes an action id out of the in-flight set when dropped.
struct Claim {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.inner.inflight).remove(&self.id);
    }
}

impl Executor {
    /// An executor over the shared store, its wallets' registry, the chain
    /// source (broadcasts), the dispatcher (admission) and the loop's tip.
    pub fn new(
        store: Store,
        registry: Registry,
        source: Arc<dyn ChainSource>,
        dispatcher: Dispatcher<WalletId>,
        tip: watch::Receiver<Option<BlockId>>,
        config: ExecutorConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                registry,
                source,
                dispatcher,
                tip,
                config,
                inflight: Mutex::new(HashSet::new()),
                resumers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Makes checkpoints of kind `A` resumable by [`Executor::resume_all`].
    pub fn register<A: WalletAction>(&self) {
        let resumer: Resumer = Arc::new(|executor: Executor, row: CheckpointRow, claim: Claim| {
            Box::pin(async move {
                let action: A = decode(&row.state).map_err(|detail| DriveError::Checkpoint {
                    id: row.id.clone(),
                    detail,
                })?;
                executor.admit(claim, action, DriveMode::UntilDone).await
            }) as Pin<Box<dyn Future<Output = Result<Resumed, DriveError>> + Send>>
        });
        lock(&self.inner.resumers).insert(A::NAMESPACE, resumer);
    }

    /// Re-drives every live checkpoint (each until done, in a task of its
    /// own). Before this returns, every resumed action is claimed (a drive
    /// of the same id started afterwards returns
    /// [`DriveOutcome::AlreadyRunning`]) and has taken its place in its
    /// wallet's line in the dispatcher, in the order the checkpoints were
    /// created: an action dispatched afterwards on the same wallet comes
    /// after them. Call it at start-up before admitting new actions. A checkpoint of a kind never
    /// registered is reported, not dropped: its locks expire on their own.
    ///
    /// # Errors
    /// The database's error.
    pub async fn resume_all(
        &self,
    ) -> Result<Vec<tokio::task::JoinHandle<Result<DriveOutcome, DriveError>>>, DriveError> {
        let rows: Vec<CheckpointRow> = self.inner.store.read(|tx| tx.checkpoints()).await?;
        let mut tasks = Vec::new();
        for row in rows {
            let resumer = lock(&self.inner.resumers)
                .get(row.namespace.as_str())
                .cloned();
            match resumer {
                Some(resume) => {
                    let Some(claim) = self.claim(&row.id) else {
                        // Already being driven in this process.
                        continue;
                    };
                    // Admitted one by one, in order, before anything is
                    // spawned: each takes its place in its wallet's line now.
                    match resume(self.clone(), row, claim).await {
                        Ok(rest) => tasks.push(tokio::spawn(rest)),
                        Err(error) => tasks.push(tokio::spawn(async move { Err(error) })),
                    }
                }
                None => tracing::warn!(
                    action = %row.id,
                    namespace = %row.namespace,
                    "a checkpoint of an unregistered kind is left alone; its coin locks expire"
                ),
            }
        }
        Ok(tasks)
    }

    /// Releases every coin lock whose expiry height `height` reached: the
    /// coins of actions that can never resume come back. Returns how many.
    ///
    /// # Errors
    /// The database's error.
    pub async fn expire_locks(&self, height: u32) -> Result<usize, StoreError> {
        self.inner.registry.expire_locks(height).await
    }

    /// Stops a live action: removes its checkpoint and releases its coin
    /// locks, recording the outcome `stopped`. Refused while it holds a
    /// transaction that can still confirm, unless `force`.
    ///
    /// # Errors
    /// [`StopError`].
    pub async fn stop(&self, id: &str, force: bool) -> Result<(), StopError> {
        let holder = lock_holder(LockHolder::Durable(id));
        let detail = if force {
            "stopped by hand (forced)"
        } else {
            "stopped by hand"
        };
        let stopped = {
            let id = id.to_owned();
            self.inner
                .store
                .write(move |tx| tx.stop_action(&id, &holder, force, detail))
                .await?
        };
        match stopped {
            Stop::Stopped => Ok(()),
            Stop::NotFound => Err(StopError::NotFound(id.to_owned())),
            Stop::BroadcastPending => Err(StopError::BroadcastPending(id.to_owned())),
        }
    }

    /// Drives `action`: from its checkpoint if it has one (the state passed
    /// in is then ignored), else from the state given, which is persisted
    /// first. An action that already ended is not run again
    /// ([`DriveOutcome::Finished`]); a second concurrent drive of the same
    /// id returns [`DriveOutcome::AlreadyRunning`] at once.
    ///
    /// The action runs as its wallet's exclusive action in the dispatcher
    /// until it releases exclusivity (once its coins are locked).
    ///
    /// # Errors
    /// [`DriveError`].
    pub async fn drive<A: WalletAction>(
        &self,
        action: A,
        mode: DriveMode,
    ) -> Result<DriveOutcome, DriveError> {
        let Some(claim) = self.claim(&action.id()) else {
            return Ok(DriveOutcome::AlreadyRunning);
        };
        self.drive_claimed(claim, action, mode).await
    }

    /// Marks action `id` as driven, unless it already is.
    fn claim(&self, id: &str) -> Option<Claim> {
        lock(&self.inner.inflight)
            .insert(id.to_owned())
            .then(|| Claim {
                inner: Arc::clone(&self.inner),
                id: id.to_owned(),
            })
    }

    /// [`Executor::drive`] once the action is claimed.
    async fn drive_claimed<A: WalletAction>(
        &self,
        claim: Claim,
        action: A,
        mode: DriveMode,
    ) -> Result<DriveOutcome, DriveError> {
        self.admit(claim, action, mode).await?.await
    }

    /// Everything of a drive up to its place in the wallet's line: looks
    /// the action up (a recorded outcome ends it here; a checkpoint wins
    /// over the state given, which is persisted if there is none), loads
    /// its wallet and takes its place in the dispatcher. The future it
    /// returns runs the action to the drive's end.
    async fn admit<A: WalletAction>(
        &self,
        claim: Claim,
        action: A,
        mode: DriveMode,
    ) -> Result<Resumed, DriveError> {
        let id = action.id();
        let initial = encode(&action);
        let wallet_id = action.wallet();
        let found = self
            .inner
            .store
            .write({
                let id = id.clone();
                move |tx| {
                    if let Some(outcome) = tx.action_outcome(&id)? {
                        return Ok::<_, StoreError>(Err(outcome));
                    }
                    if let Some(row) = tx.checkpoint(&id)? {
                        return Ok(Ok(row));
                    }
                    let row = CheckpointRow {
                        id,
                        namespace: A::NAMESPACE.to_owned(),
                        wallet_id,
                        step: 0,
                        attempts: 0,
                        state: initial,
                    };
                    tx.put_checkpoint(&row)?;
                    Ok(Ok(row))
                }
            })
            .await?;
        let row = match found {
            Ok(row) => row,
            Err(outcome) => {
                return Ok(Box::pin(async move { Ok(DriveOutcome::Finished(outcome)) }));
            }
        };
        let state: A = decode(&row.state).map_err(|detail| DriveError::Checkpoint {
            id: id.clone(),
            detail,
        })?;
        let wallet = self.inner.registry.get_or_load(state.wallet()).await?;
        let mut spec = ActionSpec::new(state.kind()).early_release(true);
        if let Some(deadline) = state.deadline() {
            spec = spec.deadline(deadline);
        }
        let expiring = Arc::clone(&wallet);
        let me = self.clone();
        let step = row.step;
        let attempts = row.attempts;
        // The place is taken here, before the returned future is polled.
        let admitted = self.inner.dispatcher.dispatch_wait(
            state.wallet(),
            spec,
            move |dispatch| me.run(state, step, attempts, wallet, dispatch, mode),
            self.inner.config.admission_timeout,
        );
        let me = self.clone();
        Ok(Box::pin(async move {
            let _claim = claim;
            let handle = admitted.await?;
            match handle.outcome().await {
                Outcome::Completed(outcome) => Ok(outcome),
                Outcome::Failed(error) => Err(error),
                Outcome::Panicked(message) => Err(DriveError::Panicked(message)),
                Outcome::Cancelled => Err(DriveError::Cancelled),
                Outcome::Expired => {
                    me.expired::<A>(&expiring, &id, wallet_id).await?;
                    Err(DriveError::Expired)
                }
            }
        }))
    }

    /// An expired action: its checkpoint goes, its coins come back except
    /// the inputs of a transaction it broadcast.
    async fn expired<A: WalletAction>(
        &self,
        wallet: &Arc<LiveWallet>,
        id: &str,
        wallet_id: WalletId,
    ) -> Result<(), WalletError> {
        let outcome = OutcomeRow {
            id: id.to_owned(),
            namespace: A::NAMESPACE.to_owned(),
            wallet_id,
            outcome: "expired".into(),
            detail: "its deadline height was reached".into(),
        };
        wallet
            .finish_action(
                outcome,
                &lock_holder(LockHolder::Durable(id)),
                Release::Unbroadcast,
            )
            .await
    }

    /// The step loop, inside the action's dispatcher task.
    async fn run<A: WalletAction>(
        self,
        mut state: A,
        mut step: u64,
        mut attempts: u32,
        wallet: Arc<LiveWallet>,
        dispatch: ActionCtx<WalletId>,
        mode: DriveMode,
    ) -> Result<DriveOutcome, DriveError> {
        let mut tip = self.inner.tip.clone();
        let released = Arc::new(AtomicBool::new(false));
        loop {
            let height = tip.borrow_and_update().as_ref().map(|b| b.height);
            let ctx = StepCtx {
                id: state.id(),
                namespace: A::NAMESPACE,
                wallet: Arc::clone(&wallet),
                source: Arc::clone(&self.inner.source),
                dispatch: Some(dispatch.clone()),
                signer: self.inner.config.signer.clone(),
                step,
                tip: height,
                lock_ttl: self.inner.config.lock_ttl,
                committed: Mutex::new(None),
                released: AtomicBool::new(released.load(std::sync::atomic::Ordering::SeqCst)),
            };
            if self.inner.config.run_each_step_twice {
                let _ = step_once(state.clone(), &ctx, attempts).await;
                *lock(&ctx.committed) = None;
            }
            let current = state.clone();
            let (advance, tries) = step_once(state, &ctx, attempts).await;
            if ctx.released.load(std::sync::atomic::Ordering::SeqCst) {
                released.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let committed = lock(&ctx.committed).take().is_some();
            match advance {
                Advance::Next(next) => {
                    if !committed {
                        self.persist(&wallet, &next, step + 1, 0, height).await?;
                    }
                    step += 1;
                    attempts = 0;
                    state = next;
                }
                Advance::Park {
                    state: next,
                    wake_after,
                    error,
                } => {
                    if let Some(error) = &error {
                        tracing::info!(action = %next.id(), %error, attempts = tries, "action parked");
                    }
                    if !committed || tries > 0 {
                        self.persist(&wallet, &next, step + 1, tries, height)
                            .await?;
                    }
                    step += 1;
                    attempts = tries;
                    state = next;
                    if mode == DriveMode::UntilParkOrDone {
                        return Ok(DriveOutcome::Parked);
                    }
                    let wait = wake_after.unwrap_or(Duration::from_secs(3600));
                    tokio::select! {
                        _ = tip.changed() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                Advance::Done(detail) => {
                    self.finish(&wallet, &current, "done", &detail).await?;
                    return Ok(DriveOutcome::Done(detail));
                }
                Advance::Failed(detail) => {
                    self.finish(&wallet, &current, "failed", &detail).await?;
                    return Ok(DriveOutcome::Failed(detail));
                }
            }
        }
    }

    /// Writes a checkpoint (and sets its locks' expiry) in one transaction.
    async fn persist<A: WalletAction>(
        &self,
        wallet: &Arc<LiveWallet>,
        state: &A,
        step: u64,
        attempts: u32,
        tip: Option<u32>,
    ) -> Result<(), WalletError> {
        let id = state.id();
        let key = StepKey {
            holder: lock_holder(LockHolder::Durable(&id)),
            id,
            namespace: A::NAMESPACE,
            wallet_id: state.wallet(),
            step,
            attempts,
            expires_at: tip.map(|t| t.saturating_add(self.inner.config.lock_ttl)),
        };
        wallet.put_step(key.checkpoint(state)).await
    }

    /// Ends an action: its checkpoint goes, its outcome is recorded and its
    /// coin locks are released, in one transaction.
    async fn finish<A: WalletAction>(
        &self,
        wallet: &Arc<LiveWallet>,
        state: &A,
        outcome: &str,
        detail: &str,
    ) -> Result<(), WalletError> {
        let row = OutcomeRow {
            id: state.id(),
            namespace: A::NAMESPACE.to_owned(),
            wallet_id: state.wallet(),
            outcome: outcome.to_owned(),
            detail: detail.to_owned(),
        };
        let holder = lock_holder(LockHolder::Durable(&row.id));
        wallet.finish_action(row, &holder, Release::All).await
    }
}

/// One run of a step: `advance`, and on a rejection `on_rejection`, on a
/// transient error `on_retry`. Returns the decision and the failed
/// attempts in a row.
async fn step_once<A: WalletAction>(state: A, ctx: &StepCtx, attempts: u32) -> (Advance<A>, u32) {
    let before = state.clone();
    match state.advance(ctx).await {
        Ok(advance) => (advance, 0),
        Err(StepError::Rejected(reason)) => match before.clone().on_rejection(ctx, reason).await {
            Ok(advance) => (advance, 0),
            Err(error @ StepError::Transient(_)) => {
                let tries = attempts + 1;
                (before.on_retry(ctx, tries, error).await, tries)
            }
            Err(error) => (Advance::Failed(error.to_string()), 0),
        },
        Err(error @ StepError::Transient(_)) => {
            let tries = attempts + 1;
            (before.on_retry(ctx, tries, error).await, tries)
        }
        Err(StepError::Fatal(detail)) => (Advance::Failed(detail), 0),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
