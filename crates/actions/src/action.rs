//! The model: an action is a state machine whose every step is persisted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::{Transaction, Txid};
use lockstep_chain::{BroadcastError, ChainSource, RejectReason};
use lockstep_dispatcher::{ActionCtx, ActionKind, LockHolder, SignPermit, lock_holder};
use lockstep_store::{Checkpoint, CheckpointRow, LockExpiry, WalletId};
use lockstep_wallet::{BroadcastChange, CoinChoice, LiveWallet, Selection, WalletError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// What one step of an action decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance<A> {
    /// Persist this state and take the next step at once.
    Next(A),
    /// Persist this state and stop until a new block, or `wake_after`
    /// (a hint that lives only in this process: `advance` must tolerate
    /// being called early), wakes it.
    Park {
        /// The state to persist.
        state: A,
        /// When to look again even without a new block.
        wake_after: Option<Duration>,
        /// Why it parked, if something went wrong (logged).
        error: Option<String>,
    },
    /// Finished: remove the checkpoint, release the action's coin locks,
    /// record the outcome with this detail.
    Done(String),
    /// Failed: the same, and report why.
    Failed(String),
}

/// Why a step could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The chain source refused a transaction: the executor hands the
    /// reason to [`WalletAction::on_rejection`].
    #[error("rejected: {0}")]
    Rejected(RejectReason),
    /// Something that may work if tried again (the source is away, the
    /// database is busy): the executor calls [`WalletAction::on_retry`].
    #[error("transient: {0}")]
    Transient(String),
    /// Something that will not get better: the action fails.
    #[error("{0}")]
    Fatal(String),
}

impl From<WalletError> for StepError {
    fn from(error: WalletError) -> Self {
        if let WalletError::Locked(_) = error {
            // After a restart the keys stay locked until the operator
            // unlocks the wallet: the action waits for that, it does not
            // fail.
            return StepError::Transient(format!("{error}: unlock it to go on"));
        }
        match error.kind() {
            lockstep_store::ErrorKind::Retryable => StepError::Transient(error.to_string()),
            _ => StepError::Fatal(error.to_string()),
        }
    }
}

/// A durable wallet action.
///
/// # Idempotence
///
/// `advance` and `on_rejection` may run more than once for the same step:
/// after a crash (the process died after the step's effects but before its
/// checkpoint), after an early wake, and twice per step in the executor's
/// test mode ([`crate::ExecutorConfig::run_each_step_twice`]). So each
/// step's effects must be safe to repeat:
/// - database effects go through [`StepCtx::commit_lock`] or
///   [`StepCtx::commit_broadcast`], which write them and the next checkpoint in one transaction and, when the step already
///   committed, returns the committed state instead of running again;
/// - a broadcast repeats harmlessly (a transaction the source knows is
///   success), and only a transaction already persisted is broadcast, so a
///   repeat sends the same transaction, never a new one;
/// - a signature may be produced again (the same transaction id: segwit
///   signatures do not change it), but only the persisted one is used.
#[async_trait::async_trait]
pub trait WalletAction: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The kind of action: the namespace of its checkpoints, which decodes
    /// them at start-up.
    const NAMESPACE: &'static str;

    /// A stable id derived from the action's identity: restarting the same
    /// action finds the same checkpoint (or its recorded outcome, so a
    /// finished action never runs again).
    fn id(&self) -> String;

    /// The wallet it acts on.
    fn wallet(&self) -> WalletId;

    /// Its kind for the dispatcher (margins, `WalletBusy`).
    fn kind(&self) -> ActionKind {
        ActionKind::new(Self::NAMESPACE)
    }

    /// The height at which it expires, if any.
    fn deadline(&self) -> Option<u32> {
        None
    }

    /// Whether this state holds a transaction persisted for broadcast: its
    /// inputs' locks then never expire (they go when it confirms, is
    /// conflicted or is abandoned); otherwise the action's locks expire
    /// `lock_ttl` blocks after its last persisted step.
    fn holds_broadcast(&self) -> bool {
        false
    }

    /// Takes the next step.
    async fn advance(self, ctx: &StepCtx) -> Result<Advance<Self>, StepError>;

    /// A step failed with a transient error for the `attempts`-th time in a
    /// row. Default: park, waking after a quadratic backoff (1 s × attempts²,
    /// at most 10 minutes).
    async fn on_retry(self, _ctx: &StepCtx, attempts: u32, error: StepError) -> Advance<Self> {
        let seconds = u64::from(attempts)
            .saturating_mul(u64::from(attempts))
            .min(600);
        Advance::Park {
            state: self,
            wake_after: Some(Duration::from_secs(seconds)),
            error: Some(error.to_string()),
        }
    }

    /// The chain source refused a transaction this step broadcast.
    async fn on_rejection(
        self,
        ctx: &StepCtx,
        reason: RejectReason,
    ) -> Result<Advance<Self>, StepError>;
}

/// What a step is given: the wallet's live instance, the chain source, the
/// tip, and the executor's ways to persist, broadcast and sign.
pub struct StepCtx {
    pub(crate) id: String,
    pub(crate) namespace: &'static str,
    pub(crate) wallet: Arc<LiveWallet>,
    pub(crate) source: Arc<dyn ChainSource>,
    pub(crate) dispatch: Option<ActionCtx<WalletId>>,
    pub(crate) signer: Option<String>,
    pub(crate) step: u64,
    pub(crate) tip: Option<u32>,
    pub(crate) lock_ttl: u32,
    /// The state a commit ([`StepCtx::commit_lock`] and the like)
    /// persisted (or found persisted) as this step's successor, encoded.
    pub(crate) committed: Mutex<Option<Vec<u8>>>,
    pub(crate) released: AtomicBool,
}

impl std::fmt::Debug for StepCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepCtx")
            .field("id", &self.id)
            .field("step", &self.step)
            .field("tip", &self.tip)
            .finish_non_exhaustive()
    }
}

impl StepCtx {
    /// The action's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The holder id its coins are locked under.
    pub fn holder(&self) -> String {
        lock_holder(LockHolder::Durable(&self.id))
    }

    /// The wallet's live instance.
    pub fn wallet(&self) -> &Arc<LiveWallet> {
        &self.wallet
    }

    /// The chain tip the step runs at (the loop's last committed block).
    pub fn tip(&self) -> Option<u32> {
        self.tip
    }

    /// The step's number (how many steps were persisted before it).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Gives up the wallet's exclusivity (the coins are locked): the next
    /// action on the wallet may start. Idempotent.
    pub fn release_exclusivity(&self) {
        if !self.released.swap(true, Ordering::SeqCst)
            && let Some(dispatch) = &self.dispatch
        {
            dispatch.release_early();
        }
    }

    /// A permit of the executor's signer limit, if it has one, held while
    /// signing; refused once too close to the action's deadline.
    ///
    /// # Errors
    /// [`StepError::Fatal`] when it is too late to sign.
    pub async fn sign_permit(&self) -> Result<Option<SignPermit>, StepError> {
        match (&self.dispatch, &self.signer) {
            (Some(dispatch), Some(name)) => dispatch
                .sign_permit(name)
                .await
                .map(Some)
                .map_err(|e| StepError::Fatal(e.to_string())),
            _ => Ok(None),
        }
    }

    /// Chooses coins as `choice` says, locks them under the action's holder
    /// and persists the state `next` makes of the selection as this step's
    /// successor, in one transaction, with the action's coin locks set to
    /// expire `lock_ttl` blocks from the tip unless they guard a
    /// broadcast. If this step already committed (a crash after the
    /// commit, an early wake, the test mode's second run), nothing is
    /// chosen again and the committed state comes back.
    ///
    /// # Errors
    /// The selection's error, the database's, or a checkpoint that does
    /// not decode.
    pub async fn commit_lock<A, F>(&self, choice: CoinChoice, next: F) -> Result<A, StepError>
    where
        A: WalletAction,
        F: FnOnce(&Selection) -> A + Send + 'static,
    {
        let (key, successor) = (self.step_key(), self.successor_step());
        let row = self
            .wallet
            .lock_coins_at(
                &self.id,
                successor,
                &self.holder(),
                choice,
                move |selection| key.checkpoint(&next(selection)),
            )
            .await?;
        self.committed(row)
    }

    /// Makes `change` to the wallet's broadcasts (records a signed
    /// transaction, or forgets one the source rejected) and persists `next`
    /// as this step's successor, in one transaction; once only, as
    /// [`StepCtx::commit_lock`].
    ///
    /// # Errors
    /// The database's error, or a checkpoint that does not decode.
    pub async fn commit_broadcast<A: WalletAction>(
        &self,
        change: BroadcastChange,
        next: A,
    ) -> Result<A, StepError> {
        let checkpoint = self.step_key().checkpoint(&next);
        let row = self.wallet.broadcast_at(change, checkpoint).await?;
        self.committed(row)
    }

    /// The step number this step's successor is persisted as.
    fn successor_step(&self) -> u64 {
        self.step + 1
    }

    /// What this step's checkpoints are written under.
    fn step_key(&self) -> StepKey {
        StepKey {
            id: self.id.clone(),
            namespace: self.namespace,
            wallet_id: self.wallet.id(),
            step: self.successor_step(),
            attempts: 0,
            holder: self.holder(),
            expires_at: self.tip.map(|tip| tip.saturating_add(self.lock_ttl)),
        }
    }

    /// Takes the successor checkpoint a commit wrote (or found written):
    /// the state it holds, remembered as this step's.
    fn committed<A: WalletAction>(&self, row: CheckpointRow) -> Result<A, StepError> {
        let state = decode::<A>(&row.state).map_err(|detail| {
            StepError::from(WalletError::Corrupt {
                wallet_id: row.wallet_id,
                detail,
            })
        })?;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(row.state);
        Ok(state)
    }

    /// Broadcasts a transaction. One the source already has is success.
    ///
    /// # Errors
    /// [`StepError::Rejected`] with the source's reason;
    /// [`StepError::Transient`] when the source cannot be asked.
    pub async fn broadcast(&self, transaction: &Transaction) -> Result<Txid, StepError> {
        match self.source.broadcast(transaction).await {
            Ok(txid) => Ok(txid),
            Err(BroadcastError::Rejected { reason, .. }) => Err(StepError::Rejected(reason)),
            Err(BroadcastError::Source(error)) => Err(StepError::Transient(error.to_string())),
            Err(other) => Err(StepError::Transient(other.to_string())),
        }
    }
}

/// Where an action's checkpoints of one step go: the action, the step
/// number, and the expiry its coin locks take.
pub(crate) struct StepKey {
    pub(crate) id: String,
    pub(crate) namespace: &'static str,
    pub(crate) wallet_id: WalletId,
    pub(crate) step: u64,
    pub(crate) attempts: u32,
    pub(crate) holder: String,
    /// When the locks expire unless they guard a broadcast (none while
    /// the tip is unknown).
    pub(crate) expires_at: Option<u32>,
}

impl StepKey {
    /// The checkpoint of `state`: its locks never expire while it holds a
    /// broadcast, else they expire at `expires_at` (if the tip is known).
    pub(crate) fn checkpoint<A: WalletAction>(&self, state: &A) -> Checkpoint {
        let locks = if state.holds_broadcast() {
            LockExpiry::Never
        } else if let Some(height) = self.expires_at {
            LockExpiry::At(height)
        } else {
            LockExpiry::Unchanged
        };
        Checkpoint {
            row: CheckpointRow {
                id: self.id.clone(),
                namespace: self.namespace.to_owned(),
                wallet_id: self.wallet_id,
                step: self.step,
                attempts: self.attempts,
                state: encode(state),
            },
            holder: self.holder.clone(),
            locks,
        }
    }
}

pub(crate) fn encode<A: Serialize>(state: &A) -> Vec<u8> {
    // Serialising plain data with derived impls into a Vec cannot fail.
    serde_json::to_vec(state).unwrap_or_default()
}

pub(crate) fn decode<A: DeserializeOwned>(bytes: &[u8]) -> Result<A, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("checkpoint does not decode: {e}"))
}
