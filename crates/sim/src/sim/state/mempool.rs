//! The mempool: its transactions in acceptance order, the rules a
//! transaction must pass to enter it (the simulator's own, and those a
//! wallet submits), and replacement by fee.
//!
//! Replacement follows Bitcoin Core 28's full RBF (`mempoolfullrbf=1`, the
//! default): a transaction spending an outpoint that mempool transactions
//! already spend replaces them when it pays enough (BIP125 rules 3, 4, 5
//! and 6), whatever their inputs' nSequence says, because Core no longer
//! asks for the BIP125 signal. Core's rule 2 (a replacement may not add
//! unconfirmed inputs) and its feerate-diagram check are not simulated.

use std::collections::{HashMap, HashSet};

use bitcoin::{Amount, OutPoint, Transaction, TxOut, Txid};

use super::{COINBASE_MATURITY, State};
use crate::sim::SimMode;
use crate::sim::pool::PoolCoin;
use crate::verify;
use lockstep_chain::{FeeRule, InvalidTx, MAX_REPLACEMENTS, RejectReason};

/// Bitcoin Core's default incremental relay fee (`-incrementalrelayfee`,
/// 1 sat/vB): what a replacement must add per vbyte of its own (rule 4).
const INCREMENTAL_RELAY_FEE_PER_VB: Amount = Amount::from_sat(1);

/// What the replacement rules need of a mempool transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// Inputs minus outputs.
    pub(crate) fee: Amount,
    /// Its virtual size, as Core measures fee rates by.
    pub(crate) vsize: u64,
    /// How many outputs it has (to find its descendants by outpoint).
    pub(crate) outputs: u32,
}

/// Unconfirmed transactions, in acceptance order (which respects their
/// dependencies), mined whole into the next block.
#[derive(Debug, Default, Clone)]
pub(crate) struct Mempool {
    pub(crate) txs: Vec<Transaction>,
    /// The txid of each of `txs`, in the same order (so that eviction need
    /// not hash them again).
    order: Vec<Txid>,
    /// Every transaction's fee and size, for the replacement rules.
    pub(crate) entries: HashMap<Txid, Entry>,
    pub(crate) spent: HashMap<OutPoint, Txid>,
    pub(crate) created: HashMap<OutPoint, TxOut>,
}

impl Mempool {
    /// `txid` is `tx`'s, computed once by the caller; `fee` is what it pays.
    pub(super) fn insert(&mut self, tx: Transaction, txid: Txid, fee: Amount) {
        for input in &tx.input {
            self.spent.insert(input.previous_output, txid);
            self.created.remove(&input.previous_output);
        }
        for (vout, out) in tx.output.iter().enumerate() {
            self.created
                .insert(OutPoint::new(txid, vout as u32), out.clone());
        }
        let entry = Entry {
            fee,
            vsize: tx.vsize() as u64,
            outputs: tx.output.len() as u32,
        };
        self.entries.insert(txid, entry);
        self.order.push(txid);
        self.txs.push(tx);
    }

    pub(super) fn take(&mut self) -> Vec<Transaction> {
        let txs = std::mem::take(&mut self.txs);
        *self = Mempool::default();
        txs
    }

    /// The txids, in mempool order (parents before children).
    pub(crate) fn order(&self) -> &[Txid] {
        &self.order
    }

    pub(crate) fn contains(&self, txid: &Txid) -> bool {
        self.entries.contains_key(txid)
    }

    /// The mempool transaction `txid`.
    pub(crate) fn get(&self, txid: &Txid) -> Option<&Transaction> {
        let at = self.order.iter().position(|t| t == txid)?;
        Some(&self.txs[at])
    }

    /// `roots` and all their mempool descendants, in mempool order.
    fn with_descendants(&self, roots: &[Txid]) -> Vec<Txid> {
        let mut found: HashSet<Txid> = roots.iter().copied().collect();
        let mut todo: Vec<Txid> = roots.to_vec();
        while let Some(txid) = todo.pop() {
            let outputs = self.entries.get(&txid).map_or(0, |e| e.outputs);
            for vout in 0..outputs {
                if let Some(&child) = self.spent.get(&OutPoint::new(txid, vout))
                    && found.insert(child)
                {
                    todo.push(child);
                }
            }
        }
        self.order
            .iter()
            .filter(|t| found.contains(*t))
            .copied()
            .collect()
    }
}

/// A transaction that passed [`State::check_tx`].
pub(crate) struct Checked {
    /// Inputs minus outputs.
    pub(crate) fee: Amount,
    /// The mempool transactions spending an outpoint it spends (its direct
    /// conflicts), each once, in input order.
    pub(crate) conflicts: Vec<Txid>,
}

impl State {
    /// Checks a transaction against the best chain and the mempool, as if
    /// its direct conflicts were gone: whether it may replace them is
    /// [`State::replacement`]'s question.
    pub(crate) fn check_tx(
        &self,
        tx: &Transaction,
        txid: Txid,
        verify_scripts: bool,
    ) -> Result<Checked, RejectReason> {
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
        let mut conflicts = Vec::new();
        for input in &tx.input {
            let outpoint = input.previous_output;
            if !seen.insert(outpoint) {
                return Err(invalid(InvalidTx::DuplicateInput(outpoint)));
            }
            if let Some(&spent_by) = self.mempool.spent.get(&outpoint)
                && !conflicts.contains(&spent_by)
            {
                conflicts.push(spent_by);
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
            } else if let Some(out) = self
                .mempool
                .get(&outpoint.txid)
                .and_then(|parent| parent.output.get(outpoint.vout as usize))
            {
                // An output of a mempool transaction that another one (a
                // conflict) already spends.
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
        Ok(Checked {
            fee: inputs - outputs,
            conflicts,
        })
    }

    /// Whether `tx` (checked, paying `fee`) may replace its direct
    /// `conflicts`, by Bitcoin Core's rules in Core's order; returns
    /// everything it would evict (the conflicts and all their mempool
    /// descendants), in mempool order.
    fn replacement(
        &self,
        tx: &Transaction,
        fee: Amount,
        conflicts: &[Txid],
    ) -> Result<Vec<Txid>, RejectReason> {
        let evicted = self.mempool.with_descendants(conflicts);
        // A transaction spending what it evicts could never be mined.
        let evicted_set: HashSet<&Txid> = evicted.iter().collect();
        if let Some(input) = tx
            .input
            .iter()
            .find(|i| evicted_set.contains(&i.previous_output.txid))
        {
            return Err(RejectReason::SpendsConflictingTx {
                outpoint: input.previous_output,
            });
        }
        let vsize = tx.vsize() as u64;
        // Rule 6, as Core's `CFeeRate`: whole sat/kvB, truncated.
        let per_kvb = |fee: Amount, vsize: u64| fee.to_sat() * 1000 / vsize.max(1);
        for conflict in conflicts {
            let entry = self.mempool.entries[conflict];
            if per_kvb(fee, vsize) <= per_kvb(entry.fee, entry.vsize) {
                return Err(RejectReason::InsufficientFee {
                    rule: FeeRule::FeeRate {
                        fee,
                        vsize,
                        conflict: *conflict,
                        conflict_fee: entry.fee,
                        conflict_vsize: entry.vsize,
                    },
                });
            }
        }
        // Rule 5.
        if evicted.len() > MAX_REPLACEMENTS {
            return Err(RejectReason::TooManyReplacements {
                count: evicted.len(),
                max: MAX_REPLACEMENTS,
            });
        }
        // Rules 3 and 4.
        let replaced_fees: Amount = evicted.iter().map(|t| self.mempool.entries[t].fee).sum();
        if fee < replaced_fees {
            return Err(RejectReason::InsufficientFee {
                rule: FeeRule::AbsoluteFee {
                    fee,
                    replaced_fees,
                    replaced: evicted.len(),
                },
            });
        }
        let additional = fee - replaced_fees;
        let required = INCREMENTAL_RELAY_FEE_PER_VB * vsize;
        if additional < required {
            return Err(RejectReason::InsufficientFee {
                rule: FeeRule::RelayFee {
                    additional,
                    required,
                },
            });
        }
        Ok(evicted)
    }

    /// Evicts `txid` and its mempool descendants (a node's expiry or size
    /// limit); returns what went, in mempool order.
    pub(crate) fn evict_with_descendants(&mut self, txid: Txid) -> Vec<Txid> {
        if !self.mempool.contains(&txid) {
            return Vec::new();
        }
        let gone = self.mempool.with_descendants(&[txid]);
        self.evict(&gone);
        gone
    }

    /// Takes every transaction out of the mempool, and their inputs out of
    /// the pool of spendable simulator coins too, so that blocks mined
    /// meanwhile neither carry nor conflict with them (a reorg's
    /// [`ReorgTxs::ToMempool`](crate::ReorgTxs::ToMempool)); returns them in
    /// mempool order for [`State::restore_mempool`].
    pub(crate) fn hold_mempool(&mut self) -> Vec<Transaction> {
        let txs = self.mempool.txs.clone();
        let all = self.mempool.order.clone();
        self.evict(&all);
        for tx in &txs {
            for input in &tx.input {
                self.pool.remove(&input.previous_output);
            }
        }
        txs
    }

    /// Puts held transactions back, each checked against the chain as it
    /// is now; returns how many no longer fit (conflicting or invalid).
    pub(crate) fn restore_mempool(&mut self, txs: Vec<Transaction>) -> usize {
        let mut dropped = 0;
        for tx in txs {
            let txid = tx.compute_txid();
            match self.check_tx(&tx, txid, false) {
                Ok(checked) if checked.conflicts.is_empty() => {
                    self.enter_mempool(tx, txid, checked.fee);
                }
                _ => dropped += 1,
            }
        }
        dropped
    }

    /// Removes `evicted` (mempool transactions, closed under descendants)
    /// with everything kept for them: what they spent is unspent again, and
    /// the simulator's own coins among it go back to the pool; what they
    /// created is gone, from the pool too, so that background load never
    /// builds on it.
    fn evict(&mut self, evicted: &[Txid]) {
        let gone: HashSet<&Txid> = evicted.iter().collect();
        let txs = std::mem::take(&mut self.mempool.txs);
        let order = std::mem::take(&mut self.mempool.order);
        let mut removed = Vec::with_capacity(evicted.len());
        for (tx, txid) in txs.into_iter().zip(order) {
            if gone.contains(&txid) {
                removed.push((tx, txid));
            } else {
                self.mempool.txs.push(tx);
                self.mempool.order.push(txid);
            }
        }
        for (tx, txid) in &removed {
            self.mempool.entries.remove(txid);
            for vout in 0..tx.output.len() as u32 {
                let outpoint = OutPoint::new(*txid, vout);
                self.mempool.created.remove(&outpoint);
                self.pool.remove(&outpoint);
                self.foreign.remove(&outpoint);
            }
        }
        // In mempool and input order, so that the pool stays deterministic.
        let next_height = self.height() + 1;
        for (tx, _) in &removed {
            for input in &tx.input {
                let outpoint = input.previous_output;
                self.mempool.spent.remove(&outpoint);
                if gone.contains(&outpoint.txid) {
                    continue;
                }
                let coin = if let Some(utxo) = self.utxos.get(&outpoint) {
                    // An immature coinbase output waits in `immature`, which
                    // hands it to the pool when it matures.
                    let mature = !utxo.coinbase || utxo.height + COINBASE_MATURITY <= self.height();
                    utxo.key
                        .filter(|_| mature)
                        .map(|key| (utxo.txout.clone(), key))
                } else if let Some(parent) = self.mempool.get(&outpoint.txid) {
                    let txout = parent.output[outpoint.vout as usize].clone();
                    let key = self.ownership(parent, outpoint.txid, outpoint.vout, next_height);
                    self.mempool.created.insert(outpoint, txout.clone());
                    key.map(|key| (txout, key))
                } else {
                    None
                };
                if let Some((txout, key)) = coin {
                    self.pool.insert(PoolCoin {
                        outpoint,
                        txout,
                        key,
                    });
                }
            }
        }
    }

    /// Puts a checked transaction into the mempool and keeps the pool of
    /// spendable simulator coins in step with it.
    pub(super) fn enter_mempool(&mut self, tx: Transaction, txid: Txid, fee: Amount) -> Txid {
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
        self.mempool.insert(tx, txid, fee);
        txid
    }

    /// What [`State::submit`] would say, without changing anything: the fee
    /// the transaction would pay (Core's `testmempoolaccept`).
    pub(crate) fn test_accept(&self, tx: &Transaction) -> Result<Amount, RejectReason> {
        let txid = tx.compute_txid();
        let checked = self.check_tx(tx, txid, self.params.mode == SimMode::Signed)?;
        if !checked.conflicts.is_empty() {
            self.replacement(tx, checked.fee, &checked.conflicts)?;
        }
        Ok(checked.fee)
    }

    /// Accepts a transaction from outside: every output is somebody else's.
    /// A transaction conflicting with the mempool replaces what it conflicts
    /// with when it pays enough (see the module documentation); returns its
    /// txid and the txids it evicted, in mempool order.
    pub(crate) fn submit(&mut self, tx: Transaction) -> Result<(Txid, Vec<Txid>), RejectReason> {
        let txid = tx.compute_txid();
        if self.mempool.contains(&txid) {
            return Ok((txid, Vec::new()));
        }
        let checked = self.check_tx(&tx, txid, self.params.mode == SimMode::Signed)?;
        let evicted = if checked.conflicts.is_empty() {
            Vec::new()
        } else {
            let evicted = self.replacement(&tx, checked.fee, &checked.conflicts)?;
            self.evict(&evicted);
            evicted
        };
        for vout in 0..tx.output.len() as u32 {
            self.foreign.insert(OutPoint::new(txid, vout));
        }
        Ok((self.enter_mempool(tx, txid, checked.fee), evicted))
    }
}
