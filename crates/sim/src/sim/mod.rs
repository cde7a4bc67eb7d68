//! [`SimChain`]: the embedded, deterministic regtest chain that the demo, the
//! tests and the benchmarks run against, and the oracle they are checked by.

mod file;
mod keys;
mod pool;
mod state;
mod truth;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{
    Amount, Block, BlockHash, OutPoint, ScriptBuf, Transaction, TxIn, TxOut, Txid, Witness,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use file::{LoadError, SaveError};
pub use keys::SignError;
pub use truth::{MempoolTruth, PendingTruthTx, ScriptTotals, SpentCoin, Truth, TruthCoin, TruthTx};

use lockstep_chain::{BlockId, BroadcastError, ChainSource, Missing, RejectReason, SourceError};
use state::State;

/// Whether the simulator signs its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimMode {
    /// Every block is consensus valid on regtest, signatures included.
    Signed,
    /// Witnesses have the right shape and size but hold no valid signature,
    /// and the simulator's scripts are made from hashes without elliptic
    /// curve work: many times faster to generate, for benchmarks that only
    /// need realistic blocks and filters. Not consensus valid.
    Unsigned,
}

/// Background load: how busy the chain is besides scripted activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Background transactions per block, drawn uniformly from the range.
    pub txs_per_block: RangeInclusive<u32>,
    /// Outputs per background transaction, drawn uniformly from the range.
    pub outputs_per_tx: RangeInclusive<u32>,
}

impl Load {
    /// No background transactions at all: blocks hold only their coinbase
    /// and what tests script.
    pub fn none() -> Load {
        Load {
            txs_per_block: 0..=0,
            outputs_per_tx: 1..=1,
        }
    }
}

/// How a [`SimChain`] is generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimParams {
    /// Everything random (keys, load, splits) follows from this seed.
    pub seed: u64,
    /// Signed (consensus valid) or unsigned (fast) generation.
    pub mode: SimMode,
    /// Background load.
    pub load: Load,
    /// Around how many coins the simulator keeps: above it background
    /// transactions consolidate, below it they split.
    pub pool_target: usize,
    /// How deep [`SimChain::reorg`] may go (undo data is kept that far).
    pub max_reorg_depth: u32,
}

impl SimParams {
    /// A signed chain with light background load (10 to 30 transactions of
    /// 1 to 3 outputs per block).
    pub fn signed(seed: u64) -> SimParams {
        SimParams {
            seed,
            mode: SimMode::Signed,
            load: Load {
                txs_per_block: 10..=30,
                outputs_per_tx: 1..=3,
            },
            pool_target: 20_000,
            max_reorg_depth: 100,
        }
    }

    /// An unsigned chain (see [`SimMode::Unsigned`]) with the same defaults.
    pub fn unsigned(seed: u64) -> SimParams {
        SimParams {
            mode: SimMode::Unsigned,
            ..SimParams::signed(seed)
        }
    }

    /// The same parameters with another background load.
    pub fn with_load(
        mut self,
        txs_per_block: RangeInclusive<u32>,
        outputs_per_tx: RangeInclusive<u32>,
    ) -> SimParams {
        self.load = Load {
            txs_per_block,
            outputs_per_tx,
        };
        self
    }
}

/// What the simulator could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Its own coins do not cover a payment.
    #[error("the simulator holds {available} in spendable coins, not enough to pay {needed}")]
    InsufficientFunds {
        /// The payment.
        needed: Amount,
        /// What it could spend.
        available: Amount,
    },
    /// Zero or more than the money supply.
    #[error("invalid payment amount {0}")]
    InvalidAmount(Amount),
    /// The reorg is deeper than the chain or the undo data kept.
    #[error("cannot reorganise {depth} blocks (at most {max})")]
    ReorgTooDeep {
        /// Asked for.
        depth: u32,
        /// Possible.
        max: u32,
    },
    /// A payment was scheduled at a height already mined.
    #[error("height {height} is already mined (tip {tip})")]
    HeightInPast {
        /// The height asked for.
        height: u32,
        /// The current tip.
        tip: u32,
    },
    /// The outpoint is not an unspent output of the chain or the mempool.
    #[error("{0} is not an unspent output")]
    UnknownOutpoint(OutPoint),
    /// A signed chain needs a key to spend somebody else's coin.
    #[error("spending {0} on a signed chain needs its key")]
    KeyRequired(OutPoint),
    /// The spend could not be signed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The transaction was refused.
    #[error("rejected: {0}")]
    Rejected(#[from] RejectReason),
    /// The simulator's own state contradicts itself (a bug, or a corrupt
    /// saved chain).
    #[error("simulator state is inconsistent: {0}")]
    Inconsistent(String),
}

/// What happens to the transactions of blocks a reorg removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReorgTxs {
    /// They go back to the mempool and, where still valid, into the new
    /// branch (what usually happens on the network).
    Reappear,
    /// They vanish: a payment the old branch confirmed is gone (what a
    /// double spend in the new branch looks like to a wallet).
    Drop,
    /// They go back to the mempool, where still valid, and stay there: the
    /// new branch carries none of them (nor the old mempool), so wallets
    /// see their confirmed payments return to unconfirmed.
    ToMempool,
}

/// What a reorg did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReorgReport {
    /// The last block both branches share.
    pub fork: BlockId,
    /// The old branch's blocks, lowest first.
    pub disconnected: Vec<BlockId>,
    /// The new branch's blocks, lowest first (one more than disconnected).
    pub connected: Vec<BlockId>,
    /// Old-branch or mempool transactions that did not make it back.
    pub dropped_txs: usize,
}

/// A transaction [`SimChain::submit_replacing`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its txid.
    pub txid: Txid,
    /// The mempool transactions it evicted: the ones it conflicts with and
    /// all their descendants, in mempool order (empty when it conflicted
    /// with nothing, or was already in the mempool).
    pub replaced: Vec<Txid>,
}

/// Counts describing a chain, for the demo and the benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainStats {
    /// Tip height.
    pub height: u32,
    /// Transactions, coinbases included.
    pub transactions: u64,
    /// Outputs, coinbases included.
    pub outputs: u64,
    /// Serialized size of all blocks.
    pub block_bytes: u64,
    /// Size of all basic filters.
    pub filter_bytes: u64,
    /// Fewest elements in one filter.
    pub min_filter_elements: u64,
    /// Most elements in one filter.
    pub max_filter_elements: u64,
    /// Mean elements per filter.
    pub mean_filter_elements: f64,
}

/// The embedded simulated regtest chain.
///
/// A cheap handle: clones share one chain, so a test can mine, pay and reorg
/// through one clone while the manager reads through another (as an
/// `Arc<dyn ChainSource>`). Generation is deterministic: the same
/// [`SimParams`] and the same calls give the same blocks.
///
/// It starts from Bitcoin Core's regtest genesis block. In
/// [`SimMode::Signed`] every block is valid on regtest: proof of work, BIP34
/// height, merkle root, witness commitment, coinbase maturity, inputs that
/// exist, and P2WPKH / P2TR key-path signatures. Its BIP158 filters are
/// built by rust-bitcoin (see [`lockstep_chain::filters`]), and their headers chain
/// from the genesis filter header.
#[derive(Clone)]
pub struct SimChain {
    state: Arc<RwLock<State>>,
}

impl SimChain {
    /// A chain holding only the regtest genesis block.
    pub fn new(params: SimParams) -> SimChain {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        SimChain::from_state(State::new(params, rng))
    }

    /// A chain mined up to `height`.
    pub fn generate(params: SimParams, height: u32) -> Result<SimChain, SimError> {
        let chain = SimChain::new(params);
        chain.mine_to(height)?;
        Ok(chain)
    }

    fn from_state(state: State) -> SimChain {
        SimChain {
            state: Arc::new(RwLock::new(state)),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied block
        // visible: blocks are pushed last. Keep going with what is there.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The parameters it was generated with.
    pub fn params(&self) -> SimParams {
        self.read().params.clone()
    }

    /// The tip of the best chain.
    pub fn tip(&self) -> BlockId {
        self.read().tip()
    }

    /// The tip's height.
    pub fn height(&self) -> u32 {
        self.read().height()
    }

    /// The serialized size of every block of the best chain, genesis
    /// included (what the stand-in node reports as `size_on_disk`).
    pub fn blocks_size(&self) -> u64 {
        self.read().blocks.iter().map(|s| s.size as u64).sum()
    }

    /// The best chain's block at `height`.
    pub fn block_at(&self, height: u32) -> Option<Arc<Block>> {
        self.read()
            .blocks
            .get(height as usize)
            .map(|s| s.block.clone())
    }

    /// The best chain's block hash at `height`.
    pub fn hash_at(&self, height: u32) -> Option<BlockHash> {
        self.read().blocks.get(height as usize).map(|s| s.hash)
    }

    /// The raw basic filter of the best chain's block at `height`.
    pub fn filter_at(&self, height: u32) -> Option<Vec<u8>> {
        self.read()
            .blocks
            .get(height as usize)
            .map(|s| s.filter.clone())
    }

    /// The basic filter header of the best chain's block at `height`.
    pub fn filter_header_at(&self, height: u32) -> Option<FilterHeader> {
        self.read()
            .blocks
            .get(height as usize)
            .map(|s| s.filter_header)
    }

    /// The height of a block of the best chain.
    pub fn height_of(&self, hash: &BlockHash) -> Option<u32> {
        self.read().by_hash.get(hash).copied()
    }

    /// Mines `n` blocks: first the mempool and any payment scheduled at the
    /// height, then background load.
    pub fn mine(&self, n: u32) -> Result<Vec<BlockId>, SimError> {
        let mut state = self.write();
        (0..n).map(|_| state.mine_block()).collect()
    }

    /// Mines until the tip is at `height` (nothing if it is already).
    pub fn mine_to(&self, height: u32) -> Result<(), SimError> {
        let mut state = self.write();
        while state.height() < height {
            state.mine_block()?;
        }
        Ok(())
    }

    /// Pays `amount` to `script` from the simulator's own coins: the payment
    /// enters the mempool and confirms in the next block. Returns the paying
    /// output.
    pub fn pay(&self, script: ScriptBuf, amount: Amount) -> Result<OutPoint, SimError> {
        self.write().pay(script, amount)
    }

    /// Pays `amount` to `script` in the block at `height` (which must not be
    /// mined yet).
    pub fn schedule_payment(
        &self,
        height: u32,
        script: ScriptBuf,
        amount: Amount,
    ) -> Result<(), SimError> {
        let mut state = self.write();
        if height <= state.height() {
            return Err(SimError::HeightInPast {
                height,
                tip: state.height(),
            });
        }
        state
            .scheduled
            .entry(height)
            .or_default()
            .push((script, amount));
        Ok(())
    }

    /// Spends `outpoint` (anybody's unspent output) to `outputs`, through
    /// the mempool. On a signed chain `key` must control it, as a P2WPKH or
    /// P2TR key-path output; on an unsigned chain it may be `None`.
    pub fn spend(
        &self,
        outpoint: OutPoint,
        outputs: Vec<TxOut>,
        key: Option<&SecretKey>,
    ) -> Result<Txid, SimError> {
        let mut state = self.write();
        let spent = state
            .utxos
            .get(&outpoint)
            .map(|u| u.txout.clone())
            .or_else(|| state.mempool.created.get(&outpoint).cloned())
            .ok_or(SimError::UnknownOutpoint(outpoint))?;
        let mut tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: outpoint,
                script_sig: ScriptBuf::new(),
                sequence: bitcoin::Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            }],
            output: outputs,
        };
        let spent = [spent];
        tx.input[0].witness = match (state.params.mode, key) {
            (SimMode::Signed, None) => return Err(SimError::KeyRequired(outpoint)),
            (SimMode::Signed, Some(key)) => {
                let mut cache = bitcoin::sighash::SighashCache::new(&tx);
                keys::sign_input(state.keys.secp(), &mut cache, 0, &spent, key)?
            }
            (SimMode::Unsigned, _) => keys::placeholder_witness(&spent[0].script_pubkey),
        };
        Ok(state.submit(tx)?.0)
    }

    /// Spends `outpoint` whole to `script`, less a 500 sat fee.
    pub fn spend_to(
        &self,
        outpoint: OutPoint,
        script: ScriptBuf,
        key: Option<&SecretKey>,
    ) -> Result<Txid, SimError> {
        let value = self
            .unspent(&outpoint)
            .ok_or(SimError::UnknownOutpoint(outpoint))?
            .value
            .checked_sub(Amount::from_sat(500))
            .ok_or(SimError::InvalidAmount(Amount::ZERO))?;
        self.spend(
            outpoint,
            vec![TxOut {
                value,
                script_pubkey: script,
            }],
            key,
        )
    }

    /// Validates a transaction and puts it into the mempool (what
    /// [`ChainSource::broadcast`] does). A transaction spending an outpoint
    /// that mempool transactions already spend replaces them, and their
    /// descendants, when it pays enough by Bitcoin Core's full-RBF rules
    /// (BIP125 rules 3 to 6, no nSequence signal needed); otherwise it is
    /// rejected with [`RejectReason::InsufficientFee`],
    /// [`RejectReason::TooManyReplacements`] or
    /// [`RejectReason::SpendsConflictingTx`] and the mempool is untouched.
    pub fn submit(&self, tx: Transaction) -> Result<Txid, RejectReason> {
        self.submit_replacing(tx).map(|accepted| accepted.txid)
    }

    /// [`SimChain::submit`], also telling what the transaction replaced
    /// (a wallet bumping a fee learns that its original is gone).
    pub fn submit_replacing(&self, tx: Transaction) -> Result<Accepted, RejectReason> {
        let (txid, replaced) = self.write().submit(tx)?;
        Ok(Accepted { txid, replaced })
    }

    /// The unspent output at `outpoint`, confirmed or in the mempool.
    pub fn unspent(&self, outpoint: &OutPoint) -> Option<TxOut> {
        let state = self.read();
        if state.mempool.spent.contains_key(outpoint) {
            return None;
        }
        state
            .utxos
            .get(outpoint)
            .map(|u| u.txout.clone())
            .or_else(|| state.mempool.created.get(outpoint).cloned())
    }

    /// The transactions waiting for the next block.
    pub fn mempool(&self) -> Vec<Transaction> {
        self.read().mempool.txs.clone()
    }

    /// The mempool with each transaction's fee, in acceptance order (what a
    /// node's `getrawmempool true` reports besides the transactions).
    pub fn mempool_fees(&self) -> Vec<(Transaction, Amount)> {
        let state = self.read();
        state
            .mempool
            .txs
            .iter()
            .map(|tx| {
                let fee = state
                    .mempool
                    .entries
                    .get(&tx.compute_txid())
                    .map_or(Amount::ZERO, |e| e.fee);
                (tx.clone(), fee)
            })
            .collect()
    }

    /// Whether [`SimChain::submit`] would accept `tx`, without submitting
    /// it: the fee it would pay, or why not (Core's `testmempoolaccept`).
    /// A transaction already in the mempool is checked as if it were not.
    pub fn test_accept(&self, tx: &Transaction) -> Result<Amount, RejectReason> {
        self.read().test_accept(tx)
    }

    /// Replaces the last `depth` blocks with a different branch of
    /// `depth + 1` blocks.
    pub fn reorg(&self, depth: u32, txs: ReorgTxs) -> Result<ReorgReport, SimError> {
        self.write().reorg(depth, txs)
    }

    /// The truth about `scripts`: what an exact full scan of the best chain
    /// gives. Every test compares wallets with this.
    pub fn truth<'a>(&self, scripts: impl IntoIterator<Item = &'a ScriptBuf>) -> Truth {
        let scripts: HashSet<&ScriptBuf> = scripts.into_iter().collect();
        let state = self.read();
        truth::scan(state.blocks.iter().map(|s| &*s.block), &scripts)
    }

    /// The truth about `scripts` in the mempool, on top of
    /// [`SimChain::truth`]: the unconfirmed transactions touching them,
    /// what those pay them (trusted or not) and which of their confirmed
    /// coins they spend. Every mempool test compares wallets with this.
    pub fn mempool_truth<'a>(
        &self,
        scripts: impl IntoIterator<Item = &'a ScriptBuf>,
    ) -> MempoolTruth {
        let scripts: HashSet<&ScriptBuf> = scripts.into_iter().collect();
        let state = self.read();
        let confirmed = truth::scan(state.blocks.iter().map(|s| &*s.block), &scripts);
        truth::scan_mempool(&confirmed, state.mempool.txs.iter(), &scripts)
    }

    /// Evicts the mempool transaction `txid` and its mempool descendants,
    /// as a node does when a transaction expires or the mempool is full.
    /// Returns what went, in mempool order (nothing if `txid` is not in
    /// the mempool).
    pub fn evict(&self, txid: Txid) -> Vec<Txid> {
        self.write().evict_with_descendants(txid)
    }

    /// Counts describing the chain.
    pub fn stats(&self) -> ChainStats {
        let state = self.read();
        let mut stats = ChainStats {
            height: state.height(),
            min_filter_elements: u64::MAX,
            ..Default::default()
        };
        let mut elements = 0u64;
        for stored in &state.blocks {
            stats.transactions += stored.block.txdata.len() as u64;
            stats.outputs += stored
                .block
                .txdata
                .iter()
                .map(|tx| tx.output.len() as u64)
                .sum::<u64>();
            stats.block_bytes += stored.size as u64;
            stats.filter_bytes += stored.filter.len() as u64;
            let n = lockstep_chain::filters::filter_element_count(&stored.filter).unwrap_or(0);
            elements += n;
            stats.min_filter_elements = stats.min_filter_elements.min(n);
            stats.max_filter_elements = stats.max_filter_elements.max(n);
        }
        stats.mean_filter_elements = elements as f64 / state.blocks.len() as f64;
        stats
    }

    /// Writes the whole chain, and what it needs to go on exactly as it
    /// would have, to one file.
    pub fn save(&self, path: &Path) -> Result<(), SaveError> {
        file::save(&self.read(), path)
    }

    /// Reads a chain written by [`SimChain::save`].
    pub fn load(path: &Path) -> Result<SimChain, LoadError> {
        file::load(path).map(SimChain::from_state)
    }

    /// Loads the chain cached at `path` if it was generated with `params` and
    /// reaches `height`; otherwise generates it and saves it there. Benchmarks
    /// use this to generate a large chain once (under `target/`).
    pub fn load_or_generate(
        path: &Path,
        params: SimParams,
        height: u32,
    ) -> Result<SimChain, SimError> {
        if let Ok(chain) = SimChain::load(path)
            && chain.params() == params
            && chain.height() == height
        {
            return Ok(chain);
        }
        let chain = SimChain::generate(params, height)?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = chain.save(path) {
            tracing::warn!(
                "could not cache the generated chain at {}: {e}",
                path.display()
            );
        }
        Ok(chain)
    }
}

impl std::fmt::Debug for SimChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tip = self.tip();
        f.debug_struct("SimChain")
            .field("height", &tip.height)
            .field("tip", &tip.hash)
            .finish()
    }
}

#[async_trait]
impl ChainSource for SimChain {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        Ok(SimChain::tip(self))
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.hash_at(height)
            .ok_or(SourceError::NotFound(Missing::Height(height)))
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        let state = self.read();
        let height = state
            .by_hash
            .get(&hash)
            .ok_or(SourceError::NotFound(Missing::Header(hash)))?;
        Ok(state.blocks[*height as usize].block.header)
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        let state = self.read();
        let height = state
            .by_hash
            .get(&hash)
            .ok_or(SourceError::NotFound(Missing::Filter(hash)))?;
        Ok(state.blocks[*height as usize].filter.clone())
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        let state = self.read();
        let height = state
            .by_hash
            .get(&hash)
            .ok_or(SourceError::NotFound(Missing::FilterHeader(hash)))?;
        Ok(state.blocks[*height as usize].filter_header)
    }

    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        let state = self.read();
        blocks
            .iter()
            .map(|block| match state.by_hash.get(&block.hash) {
                Some(&height) if height == block.height => {
                    Ok(state.blocks[height as usize].filter_header)
                }
                _ => Err(SourceError::NotFound(Missing::FilterHeader(block.hash))),
            })
            .collect()
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        let state = self.read();
        let height = state
            .by_hash
            .get(&hash)
            .ok_or(SourceError::NotFound(Missing::Block(hash)))?;
        Ok(state.blocks[*height as usize].block.clone())
    }

    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        let state = self.read();
        let end = (from as usize)
            .saturating_add(count as usize)
            .min(state.blocks.len());
        if from as usize >= state.blocks.len() {
            return Err(SourceError::NotFound(Missing::Height(from)));
        }
        Ok(state.blocks[from as usize..end]
            .iter()
            .map(|b| b.block.header)
            .collect())
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let txid = tx.compute_txid();
        self.submit(tx.clone())
            .map_err(|reason| BroadcastError::Rejected { txid, reason })
    }

    async fn mempool_txids(&self) -> Result<Option<Vec<Txid>>, SourceError> {
        Ok(Some(self.read().mempool.order().to_vec()))
    }

    async fn mempool_tx(&self, txid: Txid) -> Result<Transaction, SourceError> {
        self.read()
            .mempool
            .get(&txid)
            .cloned()
            .ok_or(SourceError::NotFound(Missing::Transaction(txid)))
    }
}
