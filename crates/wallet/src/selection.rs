//! Coin selection under locks: choosing a wallet's coins for a payment and
//! reserving them for one holder (an action id) in the same database
//! transaction.
//!
//! Atomicity comes from the store: every write transaction runs alone on
//! its writer thread inside `BEGIN IMMEDIATE`, so two selections never see
//! the same free coins; the lock table's primary key would refuse a second
//! holder anyway. Locks are rows, so they survive a restart, and a lock
//! goes with its coin when a reorg disconnects it.

use bdk_coin_select::metrics::LowestFee;
use bdk_coin_select::{
    Candidate, ChangePolicy, CoinSelector, DrainWeights, FeeRate, TXIN_BASE_WEIGHT,
    TXOUT_BASE_WEIGHT, Target, TargetFee, TargetOutputs,
};
use bitcoin::hashes::Hash;
use bitcoin::{Amount, OutPoint, TxOut, Txid};
use lockstep_store::WriteTx;

use crate::descriptor::Keychain;
use crate::wallet::{Coin, Wallet, WalletError};

/// Rounds of branch and bound before falling back to picking the coins
/// with the most value per weight unit. Each round costs microseconds and a
/// wallet of a few hundred coins rarely finds a better solution past a few
/// thousand rounds; 100,000 (BDK's example) made one selection over 200
/// coins take over a second, inside the one writer transaction every other
/// wallet waits on.
const BNB_ROUNDS: usize = 5_000;

/// A payment to make.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendRequest {
    /// Who gets what.
    pub recipients: Vec<TxOut>,
    /// Fee rate in satoshis per virtual byte.
    pub fee_rate_sat_vb: f32,
}

/// Coins chosen and locked for a holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The holder the coins are locked for.
    pub holder: String,
    /// The chosen coins.
    pub coins: Vec<Coin>,
    /// The payment's outputs.
    pub recipients: Vec<TxOut>,
    /// Change back to the wallet's internal keychain, if worth an output.
    pub change: Option<TxOut>,
    /// The fee the transaction pays.
    pub fee: Amount,
}

impl Wallet {
    /// Chooses coins for `request` among those no holder has locked and
    /// locks them for `holder`, in the caller's transaction. Change goes to
    /// the next internal script.
    pub fn select_and_lock(
        &self,
        tx: &mut WriteTx<'_>,
        request: &SpendRequest,
        holder: &str,
    ) -> Result<Selection, WalletError> {
        if request.recipients.is_empty()
            || !(request.fee_rate_sat_vb.is_finite() && request.fee_rate_sat_vb > 0.0)
        {
            return Err(WalletError::InvalidRequest(
                "recipients must not be empty and the fee rate must be positive",
            ));
        }
        let (free, locked) = self.free_coins(tx)?;
        let weight = |k: Keychain| self.satisfaction_weight(k);
        let candidates = free
            .iter()
            .map(|c| {
                let keychain = Keychain::from_u8(c.keychain).unwrap_or(Keychain::External);
                Ok(Candidate {
                    value: c.value,
                    weight: TXIN_BASE_WEIGHT + weight(keychain)?,
                    input_count: 1,
                    is_segwit: true,
                })
            })
            .collect::<Result<Vec<_>, WalletError>>()?;

        let rate = FeeRate::from_sat_per_vb(request.fee_rate_sat_vb);
        let target = Target {
            fee: TargetFee::from_feerate(rate),
            outputs: TargetOutputs::fund_outputs(
                request
                    .recipients
                    .iter()
                    .map(|o| (o.weight().to_wu(), o.value.to_sat())),
            ),
        };
        let change_script = self
            .descriptors()
            .script_at(Keychain::Internal, self.next_index(Keychain::Internal))?;
        let drain_weights = DrainWeights {
            output_weight: TXOUT_BASE_WEIGHT + change_script.len() as u64 * 4,
            spend_weight: TXIN_BASE_WEIGHT + weight(Keychain::Internal)?,
            n_outputs: 1,
        };
        let change_policy = ChangePolicy::min_value_and_waste(
            drain_weights,
            change_script.minimal_non_dust().to_sat(),
            rate,
            rate,
        );

        let mut selector = CoinSelector::new(&candidates);
        let metric = LowestFee {
            target,
            long_term_feerate: rate,
            change_policy,
        };
        if selector.run_bnb(metric, BNB_ROUNDS).is_err() {
            selector.sort_candidates_by_descending_value_pwu();
            if selector.select_until_target_met(target).is_err() {
                let available: u64 = free.iter().map(|c| c.value).sum();
                return Err(WalletError::InsufficientFunds {
                    needed: Amount::from_sat(target.value())
                        + Amount::from_sat(selector.missing(target)),
                    available: Amount::from_sat(available),
                    locked: Amount::from_sat(locked),
                });
            }
        }
        let drain = selector.drain(target, change_policy);
        let chosen: Vec<_> = selector.apply_selection(&free).cloned().collect();
        let fee = selector.selected_value() - target.value() - drain.value;
        let outpoints: Vec<([u8; 32], u32)> = chosen.iter().map(|c| (c.txid, c.vout)).collect();
        tx.lock_coins(self.id(), &outpoints, holder)?;
        let coins = chosen
            .into_iter()
            .map(|c| Coin::from_row(self.id(), c))
            .collect::<Result<_, _>>()?;
        Ok(Selection {
            holder: holder.to_owned(),
            coins,
            recipients: request.recipients.clone(),
            change: drain.is_some().then(|| TxOut {
                value: Amount::from_sat(drain.value),
                script_pubkey: change_script,
            }),
            fee: Amount::from_sat(fee),
        })
    }

    /// Releases every coin `holder` locked (in any wallet). Returns how many.
    pub fn release(tx: &mut WriteTx<'_>, holder: &str) -> Result<usize, WalletError> {
        Ok(tx.release_locks(holder)?)
    }

    /// Releases the coins `holder` locked (in any wallet) except those a
    /// pending broadcast of their wallet spends: after an action failed,
    /// was cancelled or expired, the coins it never broadcast with come
    /// back, and the inputs of a transaction it did broadcast stay locked
    /// until that transaction confirms or is conflicted. Returns how many
    /// were released.
    pub fn release_unbroadcast(tx: &mut WriteTx<'_>, holder: &str) -> Result<usize, WalletError> {
        let mut spent_by_pending: std::collections::HashMap<
            lockstep_store::WalletId,
            std::collections::HashSet<OutPoint>,
        > = std::collections::HashMap::new();
        let mut released = 0;
        for (wallet, txid, vout) in tx.locks_of(holder)? {
            if let std::collections::hash_map::Entry::Vacant(slot) = spent_by_pending.entry(wallet)
            {
                let mut inputs = std::collections::HashSet::new();
                for (_, raw) in tx.pending_broadcasts(wallet)? {
                    let pending = crate::wallet::decode_stored(wallet, &raw)?;
                    inputs.extend(pending.input.iter().map(|i| i.previous_output));
                }
                slot.insert(inputs);
            }
            let outpoint = OutPoint::new(Txid::from_byte_array(txid), vout);
            if !spent_by_pending[&wallet].contains(&outpoint) {
                released += usize::from(tx.release_lock(wallet, &txid, vout, holder)?);
            }
        }
        Ok(released)
    }

    /// The most weight spending one coin of a keychain adds besides the
    /// input's fixed fields: script signature and witness, as miniscript
    /// computes them for the descriptor.
    /// [`Wallet::select_and_lock`], then hands out the change script (the
    /// next internal one) so that no other transaction uses it: what a live
    /// wallet's spend does inside its write transaction.
    ///
    /// # Errors
    /// As [`Wallet::select_and_lock`].
    pub fn select_lock_and_reveal_change(
        &mut self,
        tx: &mut WriteTx<'_>,
        request: &SpendRequest,
        holder: &str,
    ) -> Result<Selection, WalletError> {
        // Its change index must be the one the reveal below takes.
        self.refresh_if_moved(tx)?;
        let selection = self.select_and_lock(tx, request, holder)?;
        if let Some(change) = &selection.change {
            let (_, script, _) = self.reveal_next(tx, Keychain::Internal)?;
            if script != change.script_pubkey {
                return Err(WalletError::Corrupt {
                    wallet_id: self.id(),
                    detail: "change script is not the next internal one".into(),
                });
            }
        }
        Ok(selection)
    }

    /// Locks the wallet's free mature coins (the smallest first, at most
    /// `max_inputs`) for `holder` and pays them, less the fee at
    /// `fee_rate_sat_vb`, to one newly revealed internal script of the
    /// wallet: a consolidation. Needs at least `min_inputs` coins.
    ///
    /// # Errors
    /// [`WalletError::InsufficientFunds`] if fewer than `min_inputs` coins
    /// are free or they do not cover the fee; a bad request; the database's
    /// error.
    pub fn sweep_and_lock(
        &mut self,
        tx: &mut WriteTx<'_>,
        holder: &str,
        fee_rate_sat_vb: f32,
        min_inputs: usize,
        max_inputs: usize,
    ) -> Result<Selection, WalletError> {
        if !(fee_rate_sat_vb.is_finite() && fee_rate_sat_vb > 0.0)
            || min_inputs == 0
            || max_inputs < min_inputs
        {
            return Err(WalletError::InvalidRequest(
                "the fee rate must be positive and 1 <= min_inputs <= max_inputs",
            ));
        }
        self.refresh_if_moved(tx)?;
        let (mut free, locked) = self.free_coins(tx)?;
        free.sort_by_key(|c| (c.value, c.txid, c.vout));
        free.truncate(max_inputs);
        let available: u64 = free.iter().map(|c| c.value).sum();
        let to = self
            .descriptors()
            .script_at(Keychain::Internal, self.next_index(Keychain::Internal))?;
        // Version, locktime, counts, segwit marker: ~10.5 vB; each input its
        // outpoint, sequence and witness; one output.
        let mut weight = 4 * 10 + 2;
        for c in &free {
            let keychain = Keychain::from_u8(c.keychain).unwrap_or(Keychain::External);
            weight += TXIN_BASE_WEIGHT + self.satisfaction_weight(keychain)?;
        }
        weight += TXOUT_BASE_WEIGHT + to.len() as u64 * 4;
        let fee = (weight.div_ceil(4) as f64 * f64::from(fee_rate_sat_vb)).ceil() as u64;
        let dust = to.minimal_non_dust().to_sat();
        if free.len() < min_inputs || available < fee + dust {
            return Err(WalletError::InsufficientFunds {
                needed: Amount::from_sat(fee + dust),
                available: Amount::from_sat(available),
                locked: Amount::from_sat(locked),
            });
        }
        let outpoints: Vec<([u8; 32], u32)> = free.iter().map(|c| (c.txid, c.vout)).collect();
        tx.lock_coins(self.id(), &outpoints, holder)?;
        let (_, script, _) = self.reveal_next(tx, Keychain::Internal)?;
        if script != to {
            return Err(WalletError::Corrupt {
                wallet_id: self.id(),
                detail: "sweep script is not the next internal one".into(),
            });
        }
        let coins = free
            .into_iter()
            .map(|c| Coin::from_row(self.id(), c))
            .collect::<Result<_, _>>()?;
        Ok(Selection {
            holder: holder.to_owned(),
            coins,
            recipients: vec![TxOut {
                value: Amount::from_sat(available - fee),
                script_pubkey: to,
            }],
            change: None,
            fee: Amount::from_sat(fee),
        })
    }

    /// Forgets a broadcast the source rejected (it leaves the history and
    /// no longer keeps its inputs locked). Returns whether it was there.
    ///
    /// # Errors
    /// The database's error.
    pub fn forget_broadcast(&self, tx: &mut WriteTx<'_>, txid: Txid) -> Result<bool, WalletError> {
        Ok(tx.forget_broadcast(self.id(), &txid.to_byte_array())?)
    }

    /// The wallet's unspent coins no holder has locked, mature ones only
    /// (immature coinbase outputs are left out, as Bitcoin Core's wallet
    /// counts them and as the balance does), and the sum the holders lock.
    fn free_coins(
        &self,
        tx: &WriteTx<'_>,
    ) -> Result<(Vec<lockstep_store::CoinRow>, u64), WalletError> {
        let rows = tx.unspent_coins_with_locks(self.id())?;
        let locked = rows
            .iter()
            .filter(|(_, h)| h.is_some())
            .map(|(c, _)| c.value)
            .sum();
        let tip = tx.tip()?.map(|(h, _)| h);
        let free = rows
            .into_iter()
            .filter(|(c, h)| {
                h.is_none() && !crate::wallet::is_immature(c.is_coinbase, c.height, tip)
            })
            .map(|(c, _)| c)
            .collect();
        Ok((free, locked))
    }

    fn satisfaction_weight(&self, keychain: Keychain) -> Result<u64, WalletError> {
        self.descriptors()
            .descriptor(keychain)
            .max_weight_to_satisfy()
            .map(|w| w.to_wu())
            .map_err(|e| WalletError::Corrupt {
                wallet_id: self.id(),
                detail: format!("unsatisfiable descriptor: {e}"),
            })
    }
}
