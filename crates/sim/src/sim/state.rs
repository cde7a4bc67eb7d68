//! The simulator's state and its rules: block assembly, mempool acceptance,
//! connecting and disconnecting blocks.
//!
//! This file holds the state and connecting/disconnecting blocks; the
//! mempool, block assembly and replay of a saved chain are in the
//! submodules of those names.
//!
//! Everything here runs under the [`super::SimChain`] lock, synchronously.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bitcoin::bip158::FilterHeader;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{
    Amount, Block, BlockHash, Network, OutPoint, ScriptBuf, Transaction, TxMerkleNode, TxOut, Txid,
};
use rand_chacha::ChaCha8Rng;

use super::keys::{KeySeed, Keys, OwnKind};
use super::pool::{Pool, PoolCoin};
use super::{ReorgReport, ReorgTxs, SimError, SimParams};
use lockstep_chain::BlockId;
use lockstep_chain::filters;

mod assembly;
mod mempool;
mod replay;

pub(crate) use mempool::Mempool;

/// Blocks a coinbase output must wait before it is spent (consensus).
pub(crate) const COINBASE_MATURITY: u32 = 100;

/// A block of the best chain with its filter and filter header.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) block: Arc<Block>,
    pub(crate) hash: BlockHash,
    pub(crate) filter: Vec<u8>,
    pub(crate) filter_header: FilterHeader,
    /// The block's serialized size, counted once when it is stored: the
    /// stand-in node reports the chain's size on every `chaininfo`, and
    /// walking every transaction's witnesses for it each time cost a sync
    /// over HTTP a tenth of its wall time.
    pub(crate) size: usize,
}

impl Stored {
    pub(crate) fn new(block: Block, filter: Vec<u8>, filter_header: FilterHeader) -> Stored {
        Stored {
            hash: block.block_hash(),
            size: block.total_size(),
            block: Arc::new(block),
            filter,
            filter_header,
        }
    }
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
            blocks: vec![Stored::new(genesis, filter, filter_header)],
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
        let stored = Stored::new(block, filter, filter_header);
        let hash = stored.hash;
        self.by_hash.insert(hash, height);
        self.blocks.push(stored);
        self.undo.push_back(undo);
        while self.undo.len() > self.params.max_reorg_depth as usize {
            self.undo.pop_front();
        }
        Ok(BlockId { height, hash })
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
        if txs != ReorgTxs::Drop {
            for stored in &disconnected {
                candidates.extend(stored.block.txdata.iter().skip(1).cloned());
            }
        }
        candidates.extend(old_mempool);
        // Nothing replaces here: the old mempool was valid on top of the
        // old blocks, so a conflict among candidates cannot pay for itself;
        // a conflicting candidate is dropped.
        let mut dropped = self.restore_mempool(candidates);
        self.branch += 1;
        let held = if txs == ReorgTxs::ToMempool {
            self.hold_mempool()
        } else {
            Vec::new()
        };
        let mut new_blocks = Vec::with_capacity(depth as usize + 1);
        for _ in 0..=depth {
            new_blocks.push(self.mine_block()?);
        }
        dropped += self.restore_mempool(held);
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
}
