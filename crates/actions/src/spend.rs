//! Spending actions: a send to recipients, or a consolidation of a wallet's
//! small coins into one of its own scripts, with fee bumping by replacement.
//!
//! Steps: select and lock coins (with the checkpoint, one transaction) →
//! sign (the wallet unlocked; a signer permit while signing) and persist the
//! signed transaction, recorded in the wallet as broadcasting (one
//! transaction) → broadcast → wait for confirmations, re-broadcasting on
//! each block and replacing it with a higher fee after `after_blocks` →
//! done when one version has the confirmations asked for.

use bitcoin::{Amount, OutPoint, Transaction, TxOut, Txid};
use lockstep_chain::RejectReason;
use lockstep_store::WalletId;
use lockstep_wallet::{
    BroadcastChange, Coin, CoinChoice, HistoryTx, Keychain, Selection, SpendRequest,
};
use serde::{Deserialize, Serialize};

use crate::action::{Advance, StepCtx, StepError, WalletAction};

/// What a spend does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Plan {
    /// Pay these outputs; change goes to a new internal script.
    Pay {
        /// The recipients.
        outputs: Vec<TxOut>,
    },
    /// Sweep the wallet's free coins (smallest first) into one new internal
    /// script of its own.
    Consolidate {
        /// Fail unless at least this many coins are free.
        min_inputs: usize,
        /// Sweep at most this many.
        max_inputs: usize,
    },
}

/// When and how a spend still unconfirmed is replaced by one paying more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeeBump {
    /// Replace once the latest version waited this many blocks.
    pub after_blocks: u32,
    /// At most this many replacements.
    pub max_bumps: u32,
    /// Each replacement's fee: the previous one's times this (and at least
    /// 1 sat/vB more, Bitcoin Core's incremental relay fee).
    pub factor: f64,
}

/// A selected coin, as the checkpoint keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CoinRecord {
    outpoint: OutPoint,
    txout: TxOut,
    keychain: u8,
    index: u32,
    height: u32,
    is_coinbase: bool,
}

/// A selection, as the checkpoint keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectionRecord {
    holder: String,
    coins: Vec<CoinRecord>,
    recipients: Vec<TxOut>,
    change: Option<TxOut>,
    fee: u64,
}

impl From<&Selection> for SelectionRecord {
    fn from(s: &Selection) -> Self {
        Self {
            holder: s.holder.clone(),
            coins: s
                .coins
                .iter()
                .map(|c| CoinRecord {
                    outpoint: c.outpoint,
                    txout: c.txout.clone(),
                    keychain: c.keychain.as_u8(),
                    index: c.index,
                    height: c.height,
                    is_coinbase: c.is_coinbase,
                })
                .collect(),
            recipients: s.recipients.clone(),
            change: s.change.clone(),
            fee: s.fee.to_sat(),
        }
    }
}

impl SelectionRecord {
    fn selection(&self) -> Selection {
        Selection {
            holder: self.holder.clone(),
            coins: self
                .coins
                .iter()
                .map(|c| Coin {
                    outpoint: c.outpoint,
                    txout: c.txout.clone(),
                    keychain: Keychain::from_u8(c.keychain).unwrap_or(Keychain::External),
                    index: c.index,
                    height: c.height,
                    is_coinbase: c.is_coinbase,
                    spent: None,
                })
                .collect(),
            recipients: self.recipients.clone(),
            change: self.change.clone(),
            fee: Amount::from_sat(self.fee),
        }
    }
}

/// Where a spend stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SpendState {
    /// Nothing chosen yet.
    Start,
    /// Coins chosen and locked.
    Selected {
        /// What was chosen.
        selection: SelectionRecord,
    },
    /// The latest of `versions` is persisted and to be broadcast.
    Broadcasting {
        /// The selection the latest version pays from.
        selection: SelectionRecord,
        /// Every version signed, oldest first (later ones replace earlier).
        versions: Vec<Transaction>,
    },
    /// Broadcast; waiting for confirmations since height `since`.
    Waiting {
        /// The selection the latest version pays from.
        selection: SelectionRecord,
        /// Every version signed, oldest first.
        versions: Vec<Transaction>,
        /// The tip when the latest version was broadcast.
        since: u32,
    },
    /// The source refused the only version: it was forgotten.
    Abandoned {
        /// Why.
        reason: String,
    },
}

/// A send or a consolidation (see the module's docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    id: String,
    wallet: i64,
    plan: Plan,
    fee_rate_sat_vb: f32,
    confirmations: u32,
    bump: Option<FeeBump>,
    /// The height at which it expires (the dispatcher stops it).
    #[serde(default)]
    deadline: Option<u32>,
    /// Where it stands.
    pub state: SpendState,
}

impl Spend {
    /// Pays `outputs` from `wallet`; done after `confirmations` blocks. The
    /// id is the caller's stable name for this payment (e.g. an invoice):
    /// driving the same id again never pays twice.
    pub fn send(
        id: impl Into<String>,
        wallet: WalletId,
        outputs: Vec<TxOut>,
        fee_rate_sat_vb: f32,
        confirmations: u32,
    ) -> Self {
        Self::new(
            id,
            wallet,
            Plan::Pay { outputs },
            fee_rate_sat_vb,
            confirmations,
        )
    }

    /// Sweeps between `min_inputs` and `max_inputs` of `wallet`'s free
    /// coins into one of its own scripts.
    pub fn consolidate(
        id: impl Into<String>,
        wallet: WalletId,
        min_inputs: usize,
        max_inputs: usize,
        fee_rate_sat_vb: f32,
        confirmations: u32,
    ) -> Self {
        Self::new(
            id,
            wallet,
            Plan::Consolidate {
                min_inputs,
                max_inputs,
            },
            fee_rate_sat_vb,
            confirmations,
        )
    }

    fn new(
        id: impl Into<String>,
        wallet: WalletId,
        plan: Plan,
        fee_rate_sat_vb: f32,
        confirmations: u32,
    ) -> Self {
        Self {
            id: id.into(),
            wallet: wallet.as_i64(),
            plan,
            fee_rate_sat_vb,
            confirmations: confirmations.max(1),
            bump: None,
            deadline: None,
            state: SpendState::Start,
        }
    }

    /// Replaces the transaction with one paying more while it stays
    /// unconfirmed.
    #[must_use]
    pub fn with_fee_bump(mut self, bump: FeeBump) -> Self {
        self.bump = Some(bump);
        self
    }

    /// Expires at `height`: the dispatcher stops it there; its coins come
    /// back unless a transaction it broadcast spends them.
    #[must_use]
    pub fn with_deadline(mut self, height: u32) -> Self {
        self.deadline = Some(height);
        self
    }

    fn with_state(&self, state: SpendState) -> Self {
        Self {
            state,
            ..self.clone()
        }
    }

    /// Signs `selection` (holding a signer permit) and persists the signed
    /// transaction as the next version, recorded in the wallet as
    /// broadcasting, in one transaction.
    async fn sign_and_persist(
        &self,
        ctx: &StepCtx,
        selection: SelectionRecord,
        mut versions: Vec<Transaction>,
    ) -> Result<Self, StepError> {
        let signed = {
            let _permit = ctx.sign_permit().await?;
            ctx.wallet().sign(selection.selection()).await?
        };
        versions.push(signed.clone());
        let next = self.with_state(SpendState::Broadcasting {
            selection,
            versions,
        });
        ctx.commit_broadcast(BroadcastChange::Record(signed), next)
            .await
    }

    /// The first step: chooses and locks the coins (with the checkpoint, in
    /// one transaction), then lets the next action on the wallet go.
    async fn select(self, ctx: &StepCtx) -> Result<Advance<Self>, StepError> {
        let choice = match self.plan.clone() {
            Plan::Pay { outputs } => CoinChoice::Pay(SpendRequest {
                recipients: outputs,
                fee_rate_sat_vb: self.fee_rate_sat_vb,
            }),
            Plan::Consolidate {
                min_inputs,
                max_inputs,
            } => CoinChoice::Sweep {
                fee_rate_sat_vb: self.fee_rate_sat_vb,
                min_inputs,
                max_inputs,
            },
        };
        let me = self.clone();
        let next = ctx
            .commit_lock(choice, move |selection| {
                me.with_state(SpendState::Selected {
                    selection: SelectionRecord::from(selection),
                })
            })
            .await;
        let next = match next {
            Ok(next) => next,
            Err(StepError::Fatal(detail)) => return Ok(Advance::Failed(detail)),
            Err(other) => return Err(other),
        };
        // The coins are ours: the next action on the wallet may go.
        ctx.release_exclusivity();
        Ok(Advance::Next(next))
    }

    /// Coins locked: makes sure they still are, then signs and persists
    /// the first version.
    async fn sign_first(
        self,
        ctx: &StepCtx,
        selection: SelectionRecord,
    ) -> Result<Advance<Self>, StepError> {
        ctx.release_exclusivity();
        if !still_held(ctx, &selection).await? {
            // Its locks expired while it was stopped and another
            // spend took a coin: nothing was broadcast, so it
            // chooses again.
            return Ok(Advance::Next(self.with_state(SpendState::Start)));
        }
        let next = self.sign_and_persist(ctx, selection, Vec::new()).await?;
        Ok(Advance::Next(next))
    }

    /// A version persisted: broadcasts it, then waits from the tip.
    async fn broadcast_latest(
        self,
        ctx: &StepCtx,
        selection: SelectionRecord,
        versions: Vec<Transaction>,
    ) -> Result<Advance<Self>, StepError> {
        ctx.release_exclusivity();
        let Some(latest) = versions.last() else {
            return Err(StepError::Fatal("no version to broadcast".into()));
        };
        ctx.broadcast(latest).await?;
        Ok(Advance::Next(self.with_state(SpendState::Waiting {
            selection,
            versions,
            since: ctx.tip().unwrap_or(0),
        })))
    }

    /// Broadcast: done once a version has its confirmations, failed once
    /// every version is conflicted; else replaced with a higher fee when
    /// due, or broadcast again, and parked until the next block.
    async fn wait_for_confirmations(
        self,
        ctx: &StepCtx,
        selection: SelectionRecord,
        versions: Vec<Transaction>,
        since: u32,
    ) -> Result<Advance<Self>, StepError> {
        ctx.release_exclusivity();
        let history = ctx.wallet().history().await?;
        let ours: Vec<Txid> = versions.iter().map(Transaction::compute_txid).collect();
        let tip = ctx.tip().unwrap_or(0);
        if let Some(ended) = self.settled(&history, &ours, tip) {
            return Ok(ended);
        }
        let confirming = history
            .iter()
            .any(|h| ours.contains(&h.txid) && h.height.is_some());
        let Some(latest) = versions.last() else {
            return Err(StepError::Fatal("no version to wait for".into()));
        };
        if !confirming
            && let Some(bump) = &self.bump
            && tip >= since + bump.after_blocks
            && versions.len() <= bump.max_bumps as usize
            && let Some(next) = self.bumped(&selection, latest)
        {
            let next = self.sign_and_persist(ctx, next, versions.clone()).await?;
            return Ok(Advance::Next(next));
        }
        if !confirming {
            // The source may have dropped it (a restart, an
            // eviction): sending it again is harmless.
            if let Err(error) = ctx.broadcast(latest).await {
                tracing::debug!(action = %self.id, %error, "re-broadcast refused");
            }
        }
        Ok(Advance::Park {
            state: self,
            wake_after: None,
            error: None,
        })
    }

    /// How the wait ends, if it does: done once a version of `ours` has
    /// the confirmations asked for at `tip`, failed once every version is
    /// conflicted by another transaction.
    fn settled(&self, history: &[HistoryTx], ours: &[Txid], tip: u32) -> Option<Advance<Self>> {
        let mut conflicted = 0;
        for entry in history.iter().filter(|h| ours.contains(&h.txid)) {
            if let Some(height) = entry.height
                && tip + 1 >= height + self.confirmations
            {
                let replaced: Vec<String> = ours
                    .iter()
                    .filter(|t| **t != entry.txid)
                    .map(ToString::to_string)
                    .collect();
                return Some(Advance::Done(format!(
                    "{} confirmed at height {height}; replaced: [{}]",
                    entry.txid,
                    replaced.join(", ")
                )));
            }
            if let Some((by, _)) = entry.conflicted_by
                && !ours.contains(&by)
            {
                conflicted += 1;
            }
        }
        if conflicted == ours.len() {
            return Some(Advance::Failed(
                "every version was conflicted by another transaction".into(),
            ));
        }
        None
    }

    /// The selection of the next replacement, or `None` if it cannot pay
    /// more (no change, or change would fall to dust).
    fn bumped(&self, selection: &SelectionRecord, latest: &Transaction) -> Option<SelectionRecord> {
        let bump = self.bump.as_ref()?;
        let vsize = latest.vsize() as u64;
        let scaled = (selection.fee as f64 * bump.factor).ceil() as u64;
        let fee = scaled.max(selection.fee + vsize + 2);
        let extra = fee - selection.fee;
        let mut next = selection.clone();
        let output = match (&self.plan, next.change.as_mut()) {
            (Plan::Pay { .. }, Some(change)) => change,
            (Plan::Consolidate { .. }, _) => next.recipients.first_mut()?,
            (Plan::Pay { .. }, None) => return None,
        };
        let left = output.value.to_sat().checked_sub(extra)?;
        if left < output.script_pubkey.minimal_non_dust().to_sat() {
            return None;
        }
        output.value = Amount::from_sat(left);
        next.fee = fee;
        Some(next)
    }
}

#[async_trait::async_trait]
impl WalletAction for Spend {
    const NAMESPACE: &'static str = "spend";

    fn id(&self) -> String {
        self.id.clone()
    }

    fn wallet(&self) -> WalletId {
        WalletId::from_i64(self.wallet)
    }

    fn kind(&self) -> lockstep_dispatcher::ActionKind {
        match self.plan {
            Plan::Pay { .. } => lockstep_dispatcher::ActionKind::SEND,
            Plan::Consolidate { .. } => lockstep_dispatcher::ActionKind::CONSOLIDATE,
        }
    }

    fn deadline(&self) -> Option<u32> {
        self.deadline
    }

    fn holds_broadcast(&self) -> bool {
        matches!(
            self.state,
            SpendState::Broadcasting { .. } | SpendState::Waiting { .. }
        )
    }

    async fn advance(self, ctx: &StepCtx) -> Result<Advance<Self>, StepError> {
        match self.state.clone() {
            SpendState::Start => self.select(ctx).await,
            SpendState::Selected { selection } => self.sign_first(ctx, selection).await,
            SpendState::Broadcasting {
                selection,
                versions,
            } => self.broadcast_latest(ctx, selection, versions).await,
            SpendState::Waiting {
                selection,
                versions,
                since,
            } => {
                self.wait_for_confirmations(ctx, selection, versions, since)
                    .await
            }
            SpendState::Abandoned { reason } => Ok(Advance::Failed(reason)),
        }
    }

    async fn on_rejection(
        self,
        ctx: &StepCtx,
        reason: RejectReason,
    ) -> Result<Advance<Self>, StepError> {
        let SpendState::Broadcasting {
            selection,
            mut versions,
        } = self.state.clone()
        else {
            return Err(StepError::Fatal(format!("unexpected rejection: {reason}")));
        };
        let since = ctx.tip().unwrap_or(0);
        if reason == RejectReason::AlreadyConfirmed {
            return Ok(Advance::Next(self.with_state(SpendState::Waiting {
                selection,
                versions,
                since,
            })));
        }
        let Some(rejected) = versions.pop() else {
            return Err(StepError::Fatal("no version was broadcast".into()));
        };
        let txid = rejected.compute_txid();
        if versions.is_empty() {
            // The only version: forget it; the executor releases the coins.
            let abandoned = self.with_state(SpendState::Abandoned {
                reason: format!("broadcast of {txid} rejected: {reason}"),
            });
            let state = ctx
                .commit_broadcast(BroadcastChange::Forget(txid), abandoned)
                .await?;
            return Ok(Advance::Next(state));
        }
        // A replacement refused (an earlier version may have confirmed, or
        // the fee is not enough): wait for the versions before it, on the
        // selection of the last of them.
        tracing::info!(action = %self.id, %txid, %reason, "replacement refused");
        let previous = versions.clone();
        let earlier = earlier_selection(&selection, versions.last(), &rejected);
        let waiting = self.with_state(SpendState::Waiting {
            selection: earlier,
            versions: previous,
            since,
        });
        let state = ctx
            .commit_broadcast(BroadcastChange::Forget(txid), waiting)
            .await?;
        Ok(Advance::Next(state))
    }
}

/// Whether the action still holds every coin of `selection`: locks that
/// expired (the action was stopped longer than its lock lifetime) are
/// taken again if the coins are still unspent and free. Returns `false`,
/// with the action's remaining locks released, if another holder took one
/// or one was spent meanwhile.
async fn still_held(ctx: &StepCtx, selection: &SelectionRecord) -> Result<bool, StepError> {
    let coins = selection.coins.iter().map(|c| c.outpoint).collect();
    Ok(ctx.wallet().retake_locks(&ctx.holder(), coins).await?)
}

/// The selection that `previous` paid from, given the one the rejected
/// version paid from: the same coins, with the outputs `previous` had.
fn earlier_selection(
    rejected_selection: &SelectionRecord,
    previous: Option<&Transaction>,
    rejected: &Transaction,
) -> SelectionRecord {
    let mut earlier = rejected_selection.clone();
    if let Some(previous) = previous {
        let paid = |t: &Transaction| t.output.iter().map(|o| o.value.to_sat()).sum::<u64>();
        earlier.fee = earlier
            .fee
            .saturating_sub(paid(previous).saturating_sub(paid(rejected)));
        for output in earlier
            .recipients
            .iter_mut()
            .chain(earlier.change.iter_mut())
        {
            if let Some(same) = previous
                .output
                .iter()
                .find(|o| o.script_pubkey == output.script_pubkey)
            {
                output.value = same.value;
            }
        }
    }
    earlier
}
