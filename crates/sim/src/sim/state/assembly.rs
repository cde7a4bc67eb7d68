//! Block assembly: the simulator's own payments and background
//! transactions, the coinbase, and mining the mempool into the next block.

use bitcoin::absolute::LockTime;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::transaction::Version;
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness};
use rand::Rng;

use super::{COINBASE_MATURITY, State};
use crate::sim::SimError;
use crate::sim::keys::{KeySeed, OwnKind};
use crate::sim::pool::PoolCoin;
use lockstep_chain::BlockId;

/// Regtest halves the subsidy every 150 blocks.
const HALVING_INTERVAL: u32 = 150;
/// Smallest output the simulator creates for itself.
const DUST: u64 = 1_000;
/// The simulator stops adding background transactions past this weight
/// (consensus limit: 4,000,000).
const MAX_BACKGROUND_WEIGHT: u64 = 3_800_000;
/// Most inputs a payment may gather.
const MAX_PAYMENT_INPUTS: usize = 500;

/// A transaction output the simulator is about to create.
enum OutSpec {
    /// The simulator's own, to a fresh key of this kind.
    Own(OwnKind, u64),
    /// Somebody else's.
    Foreign(TxOut),
}

impl State {
    /// Builds, signs and enters into the mempool a transaction of the
    /// simulator's own coins.
    fn own_tx(&mut self, inputs: Vec<PoolCoin>, outputs: Vec<OutSpec>) -> Txid {
        let seed = KeySeed::FirstInput(inputs[0].outpoint);
        let mut foreign = Vec::new();
        let output: Vec<TxOut> = outputs
            .into_iter()
            .enumerate()
            .map(|(vout, spec)| match spec {
                OutSpec::Own(kind, value) => TxOut {
                    value: Amount::from_sat(value),
                    script_pubkey: self.keys.script(seed, vout as u32, kind),
                },
                OutSpec::Foreign(out) => {
                    foreign.push(vout as u32);
                    out
                }
            })
            .collect();
        let mut tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: inputs
                .iter()
                .map(|coin| TxIn {
                    previous_output: coin.outpoint,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness: Witness::new(),
                })
                .collect(),
            output,
        };
        let spent: Vec<TxOut> = inputs.iter().map(|c| c.txout.clone()).collect();
        let own: Vec<(usize, KeySeed, u32)> = inputs
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.key.0, c.key.1))
            .collect();
        self.keys
            .sign(&mut tx, &spent, &own)
            .expect("the simulator signs only its own P2WPKH and P2TR coins");
        let txid = tx.compute_txid();
        for vout in foreign {
            self.foreign.insert(OutPoint::new(txid, vout));
        }
        let fee = spent.iter().map(|o| o.value).sum::<Amount>()
            - tx.output.iter().map(|o| o.value).sum::<Amount>();
        self.enter_mempool(tx, txid, fee)
    }

    /// Pays `amount` to `script` from the simulator's coins, into the mempool.
    pub(crate) fn pay(&mut self, script: ScriptBuf, amount: Amount) -> Result<OutPoint, SimError> {
        if amount.to_sat() == 0 || amount > Amount::MAX_MONEY {
            return Err(SimError::InvalidAmount(amount));
        }
        let mut inputs = Vec::new();
        let mut total = 0u64;
        let fee = |n_inputs: usize| 150 + 100 * n_inputs as u64;
        while total < amount.to_sat() + fee(inputs.len()) + DUST {
            match self.pool.take_random(&mut self.rng) {
                Some(coin) if inputs.len() < MAX_PAYMENT_INPUTS => {
                    total += coin.txout.value.to_sat();
                    inputs.push(coin);
                }
                other => {
                    let available: u64 = self.pool.iter().map(|c| c.txout.value.to_sat()).sum();
                    for coin in inputs.into_iter().chain(other) {
                        self.pool.insert(coin);
                    }
                    return Err(SimError::InsufficientFunds {
                        needed: amount,
                        available: Amount::from_sat(available + total),
                    });
                }
            }
        }
        let change = total - amount.to_sat() - fee(inputs.len());
        let outputs = vec![
            OutSpec::Foreign(TxOut {
                value: amount,
                script_pubkey: script,
            }),
            OutSpec::Own(OwnKind::P2wpkh, change),
        ];
        let txid = self.own_tx(inputs, outputs);
        Ok(OutPoint::new(txid, 0))
    }

    /// One background transaction; `false` when the simulator has no coin.
    fn background_tx(&mut self) -> bool {
        let (lo, hi) = (
            *self.params.load.outputs_per_tx.start(),
            *self.params.load.outputs_per_tx.end(),
        );
        let mut n_out = self.rng.gen_range(lo.max(1)..=hi.max(lo).max(1)) as u64;
        let n_in = if self.pool.len() > self.params.pool_target {
            n_out as usize + 1
        } else {
            1
        };
        let mut inputs = Vec::with_capacity(n_in);
        while inputs.len() < n_in {
            match self.pool.take_random(&mut self.rng) {
                Some(coin) => inputs.push(coin),
                None => break,
            }
        }
        if inputs.is_empty() {
            return false;
        }
        let total: u64 = inputs.iter().map(|c| c.txout.value.to_sat()).sum();
        let fee = (110 + 68 * inputs.len() as u64 + 31 * n_out).min(total / 2);
        let spendable = total - fee;
        n_out = n_out.min(spendable / DUST).max(1);
        let mut outputs = Vec::with_capacity(n_out as usize);
        let mut left = spendable;
        for i in 0..n_out {
            let value = if i + 1 == n_out {
                left
            } else {
                // A random share around the even split, keeping room for the rest.
                let even = left / (n_out - i);
                let value = self.rng.gen_range(even / 2..=even + even / 2).max(1);
                value.min(left - (n_out - i - 1))
            };
            left -= value;
            let kind = if self.rng.gen_bool(0.5) {
                OwnKind::P2wpkh
            } else {
                OwnKind::P2tr
            };
            outputs.push(OutSpec::Own(kind, value));
        }
        self.own_tx(inputs, outputs);
        true
    }

    // ----- blocks --------------------------------------------------------

    /// Mines one block: the mempool, the payments scheduled at its height,
    /// then background load.
    pub(crate) fn mine_block(&mut self) -> Result<BlockId, SimError> {
        let height = self.height() + 1;
        while self
            .immature
            .front()
            .is_some_and(|(h, _)| h + COINBASE_MATURITY <= height)
        {
            let (_, coin) = self.immature.pop_front().expect("front exists");
            if !self.mempool.spent.contains_key(&coin.outpoint) {
                self.pool.insert(coin);
            }
        }
        if let Some(payments) = self.scheduled.remove(&height) {
            for (script, amount) in payments {
                self.pay(script, amount)?;
            }
        }
        let (lo, hi) = (
            *self.params.load.txs_per_block.start(),
            *self.params.load.txs_per_block.end(),
        );
        let n_background = if hi == 0 {
            0
        } else {
            self.rng.gen_range(lo..=hi.max(lo))
        };
        let mut weight: u64 = self.mempool.txs.iter().map(|tx| tx.weight().to_wu()).sum();
        for _ in 0..n_background {
            if weight > MAX_BACKGROUND_WEIGHT || !self.background_tx() {
                break;
            }
            weight += self.mempool.txs.last().map_or(0, |tx| tx.weight().to_wu());
        }
        let txs = self.mempool.take();
        self.connect(height, txs)
    }

    /// The coinbase of the block at `height`: BIP34 height first in its
    /// script, the subsidy and fees to a simulator key, and the witness
    /// reserved value when the block will carry a witness commitment.
    pub(super) fn coinbase(&self, height: u32, fees: u64, with_witness: bool) -> Transaction {
        let subsidy = if height / HALVING_INTERVAL >= 64 {
            0
        } else {
            (50 * 100_000_000u64) >> (height / HALVING_INTERVAL)
        };
        let mut extra = PushBytesBuf::new();
        extra
            .extend_from_slice(&self.branch.to_le_bytes())
            .expect("8 bytes fit a push");
        let script_sig = Builder::new()
            .push_int(i64::from(height))
            .push_slice(extra)
            .into_script();
        let mut witness = Witness::new();
        if with_witness {
            witness.push([0u8; 32]);
        }
        Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig,
                sequence: Sequence::MAX,
                witness,
            }],
            output: vec![TxOut {
                value: Amount::from_sat(subsidy + fees),
                script_pubkey: self
                    .keys
                    .script(KeySeed::Coinbase(height), 0, OwnKind::P2wpkh),
            }],
        }
    }
}
