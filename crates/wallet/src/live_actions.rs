//! What a durable action's steps change in a live wallet. Each change runs
//! in one write transaction together with the step's [`Checkpoint`] (its
//! state and the expiry of its coin locks), so that after a crash the
//! database holds the step entirely or not at all; and a change whose
//! checkpoint is already written (a crash after the commit, a step run
//! again) is not made twice: the checkpoint written then comes back.
//!
//! The wallet owns the coin locks: an action locks, renews and releases
//! them only through these methods, never on the lock rows themselves.

use std::collections::HashSet;
use std::sync::Arc;

use bitcoin::hashes::Hash as _;
use bitcoin::{OutPoint, Transaction, Txid};
use lockstep_store::{Checkpoint, CheckpointRow, OutcomeRow, WriteTx};

use crate::live::LiveWallet;
use crate::selection::{Selection, SpendRequest};
use crate::wallet::{Wallet, WalletError};

/// How an action's step chooses the coins it locks.
#[derive(Debug, Clone, PartialEq)]
pub enum CoinChoice {
    /// Coins for a payment, change to a newly revealed internal script
    /// (as [`Wallet::select_lock_and_reveal_change`]).
    Pay(SpendRequest),
    /// The smallest free coins, swept into one newly revealed internal
    /// script (as [`Wallet::sweep_and_lock`]).
    Sweep {
        /// Fee rate in satoshis per virtual byte.
        fee_rate_sat_vb: f32,
        /// Fail unless at least this many coins are free.
        min_inputs: usize,
        /// Sweep at most this many.
        max_inputs: usize,
    },
}

/// What an action's step does to the wallet's broadcasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastChange {
    /// Records a signed transaction as broadcasting (as
    /// [`LiveWallet::record_broadcast`]): unconfirmed in the history, its
    /// inputs' locks guarded, until a block confirms or conflicts it.
    Record(Transaction),
    /// Forgets a broadcast the source rejected (as
    /// [`Wallet::forget_broadcast`]): its inputs' locks then expire with the
    /// action's.
    Forget(Txid),
}

/// Which of an ended action's coin locks go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Every one.
    All,
    /// All but the inputs of a pending broadcast (as
    /// [`Wallet::release_unbroadcast`]): a transaction it broadcast may
    /// still confirm.
    Unbroadcast,
}

impl LiveWallet {
    /// Chooses coins as `choice` says and locks them for `holder`, and
    /// writes the checkpoint `checkpoint` makes of the selection, in one
    /// transaction. Returns the checkpoint written; if action `action_id`'s
    /// checkpoint already records step `step` or a later one, nothing is
    /// chosen and that checkpoint comes back.
    ///
    /// # Errors
    /// As [`Wallet::select_lock_and_reveal_change`] or
    /// [`Wallet::sweep_and_lock`], or the database's error.
    pub async fn lock_coins_at<C>(
        self: &Arc<Self>,
        action_id: &str,
        step: u64,
        holder: &str,
        choice: CoinChoice,
        checkpoint: C,
    ) -> Result<CheckpointRow, WalletError>
    where
        C: FnOnce(&Selection) -> Checkpoint + Send + 'static,
    {
        let holder = holder.to_owned();
        self.change_at(
            action_id.to_owned(),
            step,
            move |wallet, tx| match choice {
                CoinChoice::Pay(request) => {
                    wallet.select_lock_and_reveal_change(tx, &request, &holder)
                }
                CoinChoice::Sweep {
                    fee_rate_sat_vb,
                    min_inputs,
                    max_inputs,
                } => wallet.sweep_and_lock(tx, &holder, fee_rate_sat_vb, min_inputs, max_inputs),
            },
            checkpoint,
        )
        .await
    }

    /// Makes `change` to the wallet's broadcasts and writes `checkpoint`,
    /// in one transaction; not again once the action's checkpoint reached
    /// `checkpoint`'s step (that checkpoint comes back).
    ///
    /// # Errors
    /// The database's error.
    pub async fn broadcast_at(
        self: &Arc<Self>,
        change: BroadcastChange,
        checkpoint: Checkpoint,
    ) -> Result<CheckpointRow, WalletError> {
        self.change_at(
            checkpoint.row.id.clone(),
            checkpoint.row.step,
            move |wallet, tx| {
                match change {
                    BroadcastChange::Record(transaction) => {
                        wallet.record_broadcast(tx, &transaction)?;
                    }
                    BroadcastChange::Forget(txid) => {
                        wallet.forget_broadcast(tx, txid)?;
                    }
                }
                Ok(())
            },
            move |()| checkpoint,
        )
        .await
    }

    /// Writes a step's checkpoint that changes nothing else in the wallet,
    /// with the expiry of the action's coin locks it sets.
    ///
    /// # Errors
    /// The database's error.
    pub async fn put_step(self: &Arc<Self>, checkpoint: Checkpoint) -> Result<(), WalletError> {
        self.change(move |_, tx| Ok(tx.put_step(&checkpoint)?))
            .await
    }

    /// Makes sure `holder` holds every one of `coins`: locks that expired
    /// are taken again if their coins are still unspent and free. Returns
    /// `false`, with `holder`'s remaining locks released, if another holder
    /// took one or one was spent meanwhile.
    ///
    /// # Errors
    /// The database's error.
    pub async fn retake_locks(
        self: &Arc<Self>,
        holder: &str,
        coins: Vec<OutPoint>,
    ) -> Result<bool, WalletError> {
        let holder = holder.to_owned();
        self.change(move |wallet, tx| {
            let mine: HashSet<([u8; 32], u32)> = tx
                .locks_of(&holder)?
                .into_iter()
                .map(|(_, txid, vout)| (txid, vout))
                .collect();
            let missing: Vec<([u8; 32], u32)> = coins
                .iter()
                .map(|c| (c.txid.to_byte_array(), c.vout))
                .filter(|c| !mine.contains(c))
                .collect();
            if missing.is_empty() {
                return Ok(true);
            }
            let free: HashSet<([u8; 32], u32)> = tx
                .unspent_coins_with_locks(wallet.id())?
                .into_iter()
                .filter(|(_, locked_by)| locked_by.is_none())
                .map(|(coin, _)| (coin.txid, coin.vout))
                .collect();
            if missing.iter().all(|c| free.contains(c)) {
                tx.lock_coins(wallet.id(), &missing, &holder)?;
                return Ok(true);
            }
            tx.release_locks(&holder)?;
            Ok(false)
        })
        .await
    }

    /// Ends an action: removes its checkpoint, records `outcome` and
    /// releases `holder`'s coin locks as `release` says, in one
    /// transaction (an ended action never keeps a coin it did not
    /// broadcast).
    ///
    /// # Errors
    /// The database's error.
    pub async fn finish_action(
        self: &Arc<Self>,
        outcome: OutcomeRow,
        holder: &str,
        release: Release,
    ) -> Result<(), WalletError> {
        let holder = holder.to_owned();
        self.change(move |_, tx| {
            match release {
                Release::All => {
                    tx.finish_action(&outcome, &holder)?;
                }
                Release::Unbroadcast => {
                    // No holder: released below, keeping a broadcast's
                    // inputs.
                    tx.finish_action(&outcome, "")?;
                    Wallet::release_unbroadcast(tx, &holder)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Runs `change` and writes the checkpoint `checkpoint` makes of its
    /// result in one transaction, unless action `action_id`'s checkpoint
    /// already records step `step` or a later one (then that checkpoint
    /// comes back and `change` does not run).
    async fn change_at<T, F, C>(
        self: &Arc<Self>,
        action_id: String,
        step: u64,
        change: F,
        checkpoint: C,
    ) -> Result<CheckpointRow, WalletError>
    where
        F: FnOnce(&mut Wallet, &mut WriteTx<'_>) -> Result<T, WalletError> + Send + 'static,
        C: FnOnce(&T) -> Checkpoint + Send + 'static,
    {
        self.change(move |wallet, tx| {
            if let Some(row) = tx.checkpoint(&action_id)?
                && row.step >= step
            {
                return Ok(row);
            }
            let made = change(wallet, tx)?;
            let checkpoint = checkpoint(&made);
            tx.put_step(&checkpoint)?;
            Ok(checkpoint.row)
        })
        .await
    }
}
