//! The mempool: its transactions in acceptance order, and the rules a
//! transaction must pass to enter it (the simulator's own, and those a
//! wallet submits).

use std::collections::{HashMap, HashSet};

use bitcoin::{Amount, OutPoint, Transaction, TxOut, Txid};

use super::{COINBASE_MATURITY, State};
use crate::sim::SimMode;
use crate::sim::pool::PoolCoin;
use crate::source::{InvalidTx, RejectReason};
use crate::verify;

/// Unconfirmed transactions, in acceptance order (which respects their
/// dependencies), mined whole into the next block.
#[derive(Debug, Default, Clone)]
pub(crate) struct Mempool {
    pub(crate) txs: Vec<Transaction>,
    pub(crate) txids: HashSet<Txid>,
    pub(crate) spent: HashMap<OutPoint, Txid>,
    pub(crate) created: HashMap<OutPoint, TxOut>,
}

impl Mempool {
    /// `txid` is `tx`'s, computed once by the caller.
    pub(super) fn insert(&mut self, tx: Transaction, txid: Txid) {
        for input in &tx.input {
            self.spent.insert(input.previous_output, txid);
            self.created.remove(&input.previous_output);
        }
        for (vout, out) in tx.output.iter().enumerate() {
            self.created
                .insert(OutPoint::new(txid, vout as u32), out.clone());
        }
        self.txids.insert(txid);
        self.txs.push(tx);
    }

    pub(super) fn take(&mut self) -> Vec<Transaction> {
        let txs = std::mem::take(&mut self.txs);
        *self = Mempool::default();
        txs
    }
}

impl State {
    /// Checks a transaction against the best chain and the mempool; returns
    /// the outputs it spends, in input order.
    pub(crate) fn check_tx(
        &self,
        tx: &Transaction,
        txid: Txid,
        verify_scripts: bool,
    ) -> Result<Vec<TxOut>, RejectReason> {
        let invalid = RejectReason::Invalid;
        if tx.is_coinbase() {
            return Err(invalid(InvalidTx::Coinbase));
        }
        if tx.input.is_empty() {
            return Err(invalid(InvalidTx::NoInputs));
        }
        if tx.output.is_empty() {
            return Err(invalid(InvalidTx::NoOutputs));
        }

        if self.txids.contains_key(&txid) {
            return Err(RejectReason::AlreadyConfirmed);
        }
        let mut seen = HashSet::with_capacity(tx.input.len());
        let next_height = self.height() + 1;
        let mut spent = Vec::with_capacity(tx.input.len());
        for input in &tx.input {
            let outpoint = input.previous_output;
            if !seen.insert(outpoint) {
                return Err(invalid(InvalidTx::DuplicateInput(outpoint)));
            }
            if let Some(&spent_by) = self.mempool.spent.get(&outpoint) {
                return Err(RejectReason::ConflictMempool { outpoint, spent_by });
            }
            if let Some(utxo) = self.utxos.get(&outpoint) {
                if utxo.coinbase && utxo.height + COINBASE_MATURITY > next_height {
                    return Err(invalid(InvalidTx::PrematureCoinbaseSpend {
                        outpoint,
                        mature_at: utxo.height + COINBASE_MATURITY,
                    }));
                }
                spent.push(utxo.txout.clone());
            } else if let Some(out) = self.mempool.created.get(&outpoint) {
                spent.push(out.clone());
            } else if self
                .txids
                .get(&outpoint.txid)
                .is_some_and(|&(_, n)| outpoint.vout < n)
            {
                return Err(RejectReason::ConflictConfirmed { outpoint });
            } else {
                return Err(RejectReason::MissingInputs { outpoint });
            }
        }
        let outputs = tx
            .output
            .iter()
            .try_fold(Amount::ZERO, |sum, out| sum.checked_add(out.value))
            .filter(|sum| *sum <= Amount::MAX_MONEY)
            .ok_or(invalid(InvalidTx::ValueOutOfRange))?;
        let inputs = spent
            .iter()
            .try_fold(Amount::ZERO, |sum, out| sum.checked_add(out.value))
            .ok_or(invalid(InvalidTx::ValueOutOfRange))?;
        if outputs > inputs {
            return Err(invalid(InvalidTx::OutputsExceedInputs { inputs, outputs }));
        }
        if verify_scripts {
            verify::verify_transaction(tx, &spent).map_err(|e| {
                invalid(InvalidTx::Script {
                    input: e.input,
                    reason: e.reason,
                })
            })?;
        }
        Ok(spent)
    }

    /// Puts a checked transaction into the mempool and keeps the pool of
    /// spendable simulator coins in step with it.
    pub(super) fn enter_mempool(&mut self, tx: Transaction, txid: Txid) -> Txid {
        for input in &tx.input {
            self.pool.remove(&input.previous_output);
        }
        let next_height = self.height() + 1;
        for vout in 0..tx.output.len() as u32 {
            if let Some(key) = self.ownership(&tx, txid, vout, next_height) {
                let txout = tx.output[vout as usize].clone();
                self.pool.insert(PoolCoin {
                    outpoint: OutPoint::new(txid, vout),
                    txout,
                    key,
                });
            }
        }
        self.mempool.insert(tx, txid);
        txid
    }

    /// Accepts a transaction from outside: every output is somebody else's.
    pub(crate) fn submit(&mut self, tx: Transaction) -> Result<Txid, RejectReason> {
        let txid = tx.compute_txid();
        if self.mempool.txids.contains(&txid) {
            return Ok(txid);
        }
        self.check_tx(&tx, txid, self.params.mode == SimMode::Signed)?;
        for vout in 0..tx.output.len() as u32 {
            self.foreign.insert(OutPoint::new(txid, vout));
        }
        Ok(self.enter_mempool(tx, txid))
    }
}
