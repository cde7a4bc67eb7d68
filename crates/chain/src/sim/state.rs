//! The simulator's state and its rules: block assembly, mempool acceptance,
//! connecting and disconnecting blocks.
//!
//! Everything here runs under the [`super::SimChain`] lock, synchronously.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bitcoin::absolute::LockTime;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, Block, BlockHash, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn,
    TxMerkleNode, TxOut, Txid, Witness,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::keys::{KeySeed, Keys, OwnKind};
use super::pool::{Pool, PoolCoin};
use super::{ReorgReport, ReorgTxs, SimError, SimMode, SimParams};
use crate::filters;
use crate::source::{BlockId, InvalidTx, RejectReason};
use crate::verify;

/// Blocks a coinbase output must wait before it is spent (consensus).
pub(crate) const COINBASE_MATURITY: u32 = 100;
/// Regtest halves the subsidy every 150 blocks.
const HALVING_INTERVAL: u32 = 150;
/// Smallest output the simulator creates for itself.
const DUST: u64 = 1_000;
/// The simulator stops adding background transactions past this weight
/// (consensus limit: 4,000,000).
const MAX_BACKGROUND_WEIGHT: u64 = 3_800_000;
/// Most inputs a payment may gather.
const MAX_PAYMENT_INPUTS: usize = 500;

/// A block of the best chain with its filter and filter header.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) block: Arc<Block>,
    pub(crate) hash: BlockHash,
    pub(crate) filter: Vec<u8>,
    pub(crate) filter_header: FilterHeader,
}

/// An unspent output of the best chain.
#[derive(Debug, Clone)]
pub(crate) struct Utxo {
    pub(crate) txout: TxOut,
    pub(crate) height: u32,
    pub(crate) coinbase: bool,
    /// How to derive its key, when the simulator owns it.
    pub(crate) key: Option<(KeySeed, u32)>,
}

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
    fn insert(&mut self, tx: Transaction, txid: Txid) {
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

    fn take(&mut self) -> Vec<Transaction> {
        let txs = std::mem::take(&mut self.txs);
        *self = Mempool::default();
        txs
    }
}

/// What the simulator knows.
pub(crate) struct State {
    pub(crate) params: SimParams,
    pub(crate) keys: Keys,
    pub(crate) rng: ChaCha8Rng,
    /// Bumped by every reorg and written into coinbases, so that a new
    /// branch's blocks differ from the old ones.
    pub(crate) branch: u64,
    pub(crate) blocks: Vec<Stored>,
    pub(crate) by_hash: HashMap<BlockHash, u32>,
    pub(crate) utxos: HashMap<OutPoint, Utxo>,
    /// Confirmed transactions: height and number of outputs.
    pub(crate) txids: HashMap<Txid, (u32, u32)>,
    /// Per block, the outputs it spent that existed before it (for
    /// disconnecting); only the last `max_reorg_depth` blocks are kept.
    pub(crate) undo: VecDeque<Vec<(OutPoint, Utxo)>>,
    /// Outputs the simulator created for somebody else (payments, and every
    /// output of a transaction it did not build).
    pub(crate) foreign: HashSet<OutPoint>,
    pub(crate) mempool: Mempool,
    pub(crate) pool: Pool,
    /// Owned coinbase outputs waiting to mature, oldest first.
    pub(crate) immature: VecDeque<(u32, PoolCoin)>,
    pub(crate) scheduled: BTreeMap<u32, Vec<(ScriptBuf, Amount)>>,
}

/// A transaction output the simulator is about to create.
enum OutSpec {
    /// The simulator's own, to a fresh key of this kind.
    Own(OwnKind, u64),
    /// Somebody else's.
    Foreign(TxOut),
}

impl State {
    /// A chain holding only Bitcoin Core's regtest genesis block.
    pub(crate) fn new(params: SimParams, rng: ChaCha8Rng) -> State {
        let keys = Keys::new(params.seed, params.mode);
        let genesis = genesis_block(Network::Regtest);
        let filter =
            filters::basic_filter(&genesis, |_| None).expect("the genesis block spends nothing");
        let filter_header =
            filters::filter_header(&filter, &filters::genesis_previous_filter_header());
        let hash = genesis.block_hash();
        let mut txids = HashMap::new();
        txids.insert(genesis.txdata[0].compute_txid(), (0, 1));
        State {
            params,
            keys,
            rng,
            branch: 0,
            blocks: vec![Stored {
                block: Arc::new(genesis),
                hash,
                filter,
                filter_header,
            }],
            by_hash: HashMap::from([(hash, 0)]),
            // The genesis coinbase is not spendable (as in Bitcoin Core).
            utxos: HashMap::new(),
            txids,
            undo: VecDeque::new(),
            foreign: HashSet::new(),
            mempool: Mempool::default(),
            pool: Pool::default(),
            immature: VecDeque::new(),
            scheduled: BTreeMap::new(),
        }
    }

    pub(crate) fn height(&self) -> u32 {
        (self.blocks.len() - 1) as u32
    }

    pub(crate) fn tip(&self) -> BlockId {
        let last = self.blocks.last().expect("genesis is always there");
        BlockId {
            height: self.height(),
            hash: last.hash,
        }
    }

    /// Whether the simulator owns output `vout` of `tx`, and with which key.
    fn ownership(
        &self,
        tx: &Transaction,
        txid: Txid,
        vout: u32,
        height: u32,
    ) -> Option<(KeySeed, u32)> {
        let out = &tx.output[vout as usize];
        let owned = out.value.to_sat() > 0
            && OwnKind::of(&out.script_pubkey).is_some()
            && !self.foreign.contains(&OutPoint::new(txid, vout));
        owned.then(|| (KeySeed::of(tx, height), vout))
    }

    // ----- mempool -------------------------------------------------------

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
    fn enter_mempool(&mut self, tx: Transaction, txid: Txid) -> Txid {
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
        self.enter_mempool(tx, txid)
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

    /// Turns `txs` (valid, in dependency order) into the block at `height`
    /// and connects it.
    fn connect(&mut self, height: u32, txs: Vec<Transaction>) -> Result<BlockId, SimError> {
        // Spend and create, recording what existed before for undo and what
        // every input spent for the filter.
        let mut undo = Vec::new();
        let mut in_block: HashMap<OutPoint, TxOut> = HashMap::new();
        let mut prevouts: HashMap<OutPoint, ScriptBuf> = HashMap::new();
        let mut fees = 0u64;
        // Each txid once: hashing is most of a transaction's cost here.
        let txids: Vec<Txid> = txs.iter().map(Transaction::compute_txid).collect();
        for (tx, &txid) in txs.iter().zip(&txids) {
            let mut value_in = 0u64;
            for input in &tx.input {
                let outpoint = input.previous_output;
                let spent = if let Some(out) = in_block.remove(&outpoint) {
                    out
                } else if let Some(utxo) = self.utxos.remove(&outpoint) {
                    let out = utxo.txout.clone();
                    undo.push((outpoint, utxo));
                    out
                } else {
                    return Err(SimError::Inconsistent(format!(
                        "{txid} spends missing {outpoint}"
                    )));
                };
                value_in += spent.value.to_sat();
                prevouts.insert(outpoint, spent.script_pubkey);
            }
            let value_out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
            fees += value_in - value_out;
            for (vout, out) in tx.output.iter().enumerate() {
                in_block.insert(OutPoint::new(txid, vout as u32), out.clone());
            }
        }

        let coinbase = self.coinbase(
            height,
            fees,
            txs.iter()
                .any(|tx| tx.input.iter().any(|i| !i.witness.is_empty())),
        );
        let mut block = Block {
            header: Header {
                version: BlockVersion::from_consensus(0x2000_0000),
                prev_blockhash: self.tip().hash,
                merkle_root: TxMerkleNode::all_zeros(),
                time: self.blocks.last().expect("genesis").block.header.time + 600,
                bits: self.blocks[0].block.header.bits,
                nonce: 0,
            },
            txdata: std::iter::once(coinbase).chain(txs).collect(),
        };
        if block.txdata.len() > 1
            && block.txdata[1..]
                .iter()
                .any(|tx| tx.input.iter().any(|i| !i.witness.is_empty()))
        {
            let witness_root = block
                .witness_root()
                .expect("a block with transactions has a witness root");
            let reserved = &block.txdata[0].input[0].witness[0];
            let commitment = Block::compute_witness_commitment(&witness_root, reserved);
            let mut data = PushBytesBuf::from([0xaa, 0x21, 0xa9, 0xed]);
            data.extend_from_slice(commitment.as_byte_array())
                .expect("36 bytes fit a push");
            block.txdata[0].output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: Builder::new()
                    .push_opcode(OP_RETURN)
                    .push_slice(data)
                    .into_script(),
            });
        }
        block.header.merkle_root = block.compute_merkle_root().expect("a block has a coinbase");
        let target = block.header.target();
        while block.header.validate_pow(target).is_err() {
            block.header.nonce += 1;
        }

        // The coinbase's outputs, then the index of every transaction.
        let coinbase_txid = block.txdata[0].compute_txid();
        for (i, tx) in block.txdata.iter().enumerate() {
            let txid = if i == 0 { coinbase_txid } else { txids[i - 1] };
            self.txids.insert(txid, (height, tx.output.len() as u32));
            for vout in 0..tx.output.len() as u32 {
                let outpoint = OutPoint::new(txid, vout);
                let out = if i == 0 {
                    Some(tx.output[vout as usize].clone())
                } else {
                    in_block.remove(&outpoint)
                };
                let Some(txout) = out else { continue };
                if txout.script_pubkey.is_op_return() {
                    continue;
                }
                let key = self.ownership(tx, txid, vout, height);
                if i == 0
                    && let Some(key) = key
                {
                    let coin = PoolCoin {
                        outpoint,
                        txout: txout.clone(),
                        key,
                    };
                    self.immature.push_back((height, coin));
                }
                self.utxos.insert(
                    outpoint,
                    Utxo {
                        txout,
                        height,
                        coinbase: i == 0,
                        key,
                    },
                );
            }
        }

        let filter = filters::basic_filter(&block, |outpoint| prevouts.get(outpoint).cloned())
            .map_err(|e| SimError::Inconsistent(e.to_string()))?;
        let previous = self.blocks.last().expect("genesis").filter_header;
        let filter_header = filters::filter_header(&filter, &previous);
        let hash = block.block_hash();
        self.by_hash.insert(hash, height);
        self.blocks.push(Stored {
            block: Arc::new(block),
            hash,
            filter,
            filter_header,
        });
        self.undo.push_back(undo);
        while self.undo.len() > self.params.max_reorg_depth as usize {
            self.undo.pop_front();
        }
        Ok(BlockId { height, hash })
    }

    /// The coinbase of the block at `height`: BIP34 height first in its
    /// script, the subsidy and fees to a simulator key, and the witness
    /// reserved value when the block will carry a witness commitment.
    fn coinbase(&self, height: u32, fees: u64, with_witness: bool) -> Transaction {
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

    /// Connects a block read back from a file: the same bookkeeping as
    /// mining, without building anything.
    pub(crate) fn replay(&mut self, stored: Stored) -> Result<(), SimError> {
        let height = self.height() + 1;
        let block = stored.block.clone();
        if block.header.prev_blockhash != self.tip().hash {
            return Err(SimError::Inconsistent(format!(
                "block {height} does not extend the chain"
            )));
        }
        let mut undo = Vec::new();
        for (i, tx) in block.txdata.iter().enumerate() {
            let txid = tx.compute_txid();
            if i > 0 {
                for input in &tx.input {
                    let utxo = self.utxos.remove(&input.previous_output).ok_or_else(|| {
                        SimError::Inconsistent(format!(
                            "{txid} spends missing {}",
                            input.previous_output
                        ))
                    })?;
                    // Outputs created earlier in the same block need no undo.
                    if utxo.height < height {
                        undo.push((input.previous_output, utxo));
                    }
                }
            }
            self.txids.insert(txid, (height, tx.output.len() as u32));
            for (vout, out) in tx.output.iter().enumerate() {
                if out.script_pubkey.is_op_return() {
                    continue;
                }
                let outpoint = OutPoint::new(txid, vout as u32);
                let key = self.ownership(tx, txid, vout as u32, height);
                if i == 0
                    && let Some(key) = key
                {
                    self.immature.push_back((
                        height,
                        PoolCoin {
                            outpoint,
                            txout: out.clone(),
                            key,
                        },
                    ));
                }
                self.utxos.insert(
                    outpoint,
                    Utxo {
                        txout: out.clone(),
                        height,
                        coinbase: i == 0,
                        key,
                    },
                );
            }
        }
        self.by_hash.insert(stored.hash, height);
        self.blocks.push(stored);
        self.undo.push_back(undo);
        while self.undo.len() > self.params.max_reorg_depth as usize {
            self.undo.pop_front();
        }
        while self
            .immature
            .front()
            .is_some_and(|(h, _)| h + COINBASE_MATURITY <= height)
        {
            self.immature.pop_front();
        }
        Ok(())
    }

    /// Disconnects the tip, restoring what it spent.
    fn disconnect_tip(&mut self) -> Stored {
        let stored = self.blocks.pop().expect("the caller keeps genesis");
        let undo = self
            .undo
            .pop_back()
            .expect("the caller checked the undo depth");
        self.by_hash.remove(&stored.hash);
        for tx in stored.block.txdata.iter().rev() {
            let txid = tx.compute_txid();
            self.txids.remove(&txid);
            for vout in 0..tx.output.len() as u32 {
                self.utxos.remove(&OutPoint::new(txid, vout));
            }
        }
        for (outpoint, utxo) in undo {
            self.utxos.insert(outpoint, utxo);
        }
        stored
    }

    /// Rebuilds the pool and the immature queue from the UTXO set, in a
    /// deterministic order.
    fn rebuild_pool(&mut self) {
        let next_height = self.height() + 1;
        let mut owned: Vec<(u32, bool, PoolCoin)> = self
            .utxos
            .iter()
            .filter_map(|(outpoint, utxo)| {
                let key = utxo.key?;
                Some((
                    utxo.height,
                    utxo.coinbase,
                    PoolCoin {
                        outpoint: *outpoint,
                        txout: utxo.txout.clone(),
                        key,
                    },
                ))
            })
            .collect();
        owned.sort_by_key(|(height, _, coin)| (*height, coin.outpoint));
        self.pool = Pool::default();
        self.immature.clear();
        for (height, coinbase, coin) in owned {
            if coinbase && height + COINBASE_MATURITY > next_height {
                self.immature.push_back((height, coin));
            } else {
                self.pool.insert(coin);
            }
        }
    }

    /// Replaces the last `depth` blocks with `depth + 1` new ones (more work,
    /// so a node would switch to them).
    pub(crate) fn reorg(&mut self, depth: u32, txs: ReorgTxs) -> Result<ReorgReport, SimError> {
        let max = (self.undo.len() as u32).min(self.height());
        if depth == 0 || depth > max {
            return Err(SimError::ReorgTooDeep { depth, max });
        }
        let old_mempool = self.mempool.take();
        let mut disconnected = Vec::with_capacity(depth as usize);
        for _ in 0..depth {
            disconnected.push(self.disconnect_tip());
        }
        disconnected.reverse();
        let fork = self.tip();
        self.rebuild_pool();
        let mut candidates: Vec<Transaction> = Vec::new();
        if txs == ReorgTxs::Reappear {
            for stored in &disconnected {
                candidates.extend(stored.block.txdata.iter().skip(1).cloned());
            }
        }
        candidates.extend(old_mempool);
        let mut dropped = 0;
        for tx in candidates {
            let txid = tx.compute_txid();
            match self.check_tx(&tx, txid, false) {
                Ok(_) => {
                    self.enter_mempool(tx, txid);
                }
                Err(_) => dropped += 1,
            }
        }
        self.branch += 1;
        let mut new_blocks = Vec::with_capacity(depth as usize + 1);
        for _ in 0..=depth {
            new_blocks.push(self.mine_block()?);
        }
        Ok(ReorgReport {
            fork,
            disconnected: disconnected
                .iter()
                .enumerate()
                .map(|(i, s)| BlockId {
                    height: fork.height + 1 + i as u32,
                    hash: s.hash,
                })
                .collect(),
            connected: new_blocks,
            dropped_txs: dropped,
        })
    }

    /// Restores a saved mempool and pool exactly (no re-selection, so a
    /// loaded chain continues as the original would).
    pub(crate) fn restore(
        &mut self,
        mempool: Vec<Transaction>,
        pool_order: Vec<OutPoint>,
    ) -> Result<(), SimError> {
        for tx in mempool {
            let txid = tx.compute_txid();
            self.check_tx(&tx, txid, false)
                .map_err(|e| SimError::Inconsistent(format!("saved mempool transaction: {e}")))?;
            self.mempool.insert(tx, txid);
        }
        self.pool = Pool::default();
        for outpoint in pool_order {
            let (txout, key) = if let Some(utxo) = self.utxos.get(&outpoint) {
                (utxo.txout.clone(), utxo.key)
            } else if let Some(out) = self.mempool.created.get(&outpoint) {
                let tx = self
                    .mempool
                    .txs
                    .iter()
                    .find(|tx| tx.compute_txid() == outpoint.txid)
                    .expect("created outputs come from mempool transactions");
                (
                    out.clone(),
                    self.ownership(tx, outpoint.txid, outpoint.vout, self.height() + 1),
                )
            } else {
                return Err(SimError::Inconsistent(format!(
                    "saved pool coin {outpoint} is not unspent"
                )));
            };
            let key = key.ok_or_else(|| {
                SimError::Inconsistent(format!("saved pool coin {outpoint} is not ours"))
            })?;
            self.pool.insert(PoolCoin {
                outpoint,
                txout,
                key,
            });
        }
        Ok(())
    }
}
