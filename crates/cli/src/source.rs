//! The demo's chain source: the simulated chain (in process, or through the
//! stand-in node over HTTP) through the meter, with two
//! demo aids on broadcasts only (every read is passed through untouched, so
//! the sync part's request counts are what the meter alone would count).
//!
//! - Script checks: the demo's chain is unsigned (fast to generate), so its
//!   mempool does not run scripts. The wallets' own transactions are real,
//!   signed ones: each fresh broadcast is checked here with Bitcoin Core's
//!   interpreter ([`lockstep_sim::verify`]) and refused as a node would if
//!   a signature is wrong.
//! - A lossy broadcast, on demand: [`DemoSource::drop_next_broadcast`] makes
//!   the next transaction broadcast, and every later broadcast of that same
//!   transaction, be acknowledged without being relayed (a node that lost
//!   it). The simulated chain mines its whole mempool every block, so this
//!   is the only way a transaction stays unconfirmed while blocks are mined:
//!   what makes the demo's fee bump happen.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Amount, Block, BlockHash, Transaction, TxOut, Txid};
use lockstep_chain::metered::Metered;
use lockstep_chain::{BlockId, BroadcastError, ChainSource, InvalidTx, RejectReason, SourceError};
use lockstep_sim::SimChain;

/// What the broadcasts did so far.
#[derive(Debug, Default)]
struct Broadcasts {
    /// The next fresh broadcast is to be dropped.
    drop_next: bool,
    /// The transaction being dropped, and how many times it was broadcast.
    dropped: Option<(Txid, u32)>,
    /// The fee of every transaction whose inputs were known when it was
    /// broadcast.
    fees: HashMap<Txid, Amount>,
    /// Transactions whose every input script passed the interpreter.
    verified: HashSet<Txid>,
}

/// See the module's docs.
pub(crate) struct DemoSource {
    inner: Metered,
    /// The same chain `inner` reads: where spent outputs are looked up.
    chain: SimChain,
    broadcasts: Mutex<Broadcasts>,
}

impl DemoSource {
    pub(crate) fn new(inner: Metered, chain: SimChain) -> Arc<DemoSource> {
        Arc::new(DemoSource {
            inner,
            chain,
            broadcasts: Mutex::new(Broadcasts::default()),
        })
    }

    fn broadcasts(&self) -> std::sync::MutexGuard<'_, Broadcasts> {
        self.broadcasts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the next transaction broadcast and every re-broadcast of it
    /// (acknowledged, never relayed).
    pub(crate) fn drop_next_broadcast(&self) {
        self.broadcasts().drop_next = true;
    }

    /// The transaction dropped, and how many broadcasts of it were dropped.
    pub(crate) fn dropped(&self) -> Option<(Txid, u32)> {
        self.broadcasts().dropped
    }

    /// The fee of a transaction broadcast through this source.
    pub(crate) fn fee_of(&self, txid: &Txid) -> Option<Amount> {
        self.broadcasts().fees.get(txid).copied()
    }

    /// How many distinct transactions broadcast passed the script
    /// interpreter.
    pub(crate) fn verified(&self) -> usize {
        self.broadcasts().verified.len()
    }

    /// The outputs `tx` spends, if every one is unspent on the chain or in
    /// its mempool (not so for a re-broadcast of a transaction the mempool
    /// holds: its inputs are spent by itself; the chain judges those).
    fn spent_outputs(&self, tx: &Transaction) -> Option<Vec<TxOut>> {
        tx.input
            .iter()
            .map(|input| self.chain.unspent(&input.previous_output))
            .collect()
    }
}

#[async_trait]
impl ChainSource for DemoSource {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        self.inner.tip().await
    }
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.inner.block_hash(height).await
    }
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        self.inner.header(hash).await
    }
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        self.inner.filter(hash).await
    }
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        self.inner.filter_header(hash).await
    }
    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        self.inner.filter_headers(blocks).await
    }
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        self.inner.block(hash).await
    }
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        self.inner.headers(from, count).await
    }
    async fn mempool_txids(&self) -> Result<Option<Vec<Txid>>, SourceError> {
        self.inner.mempool_txids().await
    }
    async fn mempool_tx(&self, txid: Txid) -> Result<Transaction, SourceError> {
        self.inner.mempool_tx(txid).await
    }
    async fn mempool_news(&self, seen: u64) -> u64 {
        self.inner.mempool_news(seen).await
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let txid = tx.compute_txid();
        if let Some(spent) = self.spent_outputs(tx) {
            lockstep_sim::verify::verify_transaction(tx, &spent).map_err(|e| {
                BroadcastError::Rejected {
                    txid,
                    reason: RejectReason::Invalid(InvalidTx::Script {
                        input: e.input,
                        reason: e.reason,
                    }),
                }
            })?;
            let inputs: Amount = spent.iter().map(|o| o.value).sum();
            let outputs: Amount = tx.output.iter().map(|o| o.value).sum();
            let mut broadcasts = self.broadcasts();
            broadcasts.verified.insert(txid);
            if let Some(fee) = inputs.checked_sub(outputs) {
                broadcasts.fees.insert(txid, fee);
            }
        }
        {
            let mut broadcasts = self.broadcasts();
            if broadcasts.drop_next && broadcasts.dropped.is_none() {
                broadcasts.drop_next = false;
                broadcasts.dropped = Some((txid, 0));
            }
            if let Some((lost, times)) = &mut broadcasts.dropped
                && *lost == txid
            {
                *times += 1;
                return Ok(txid);
            }
        }
        self.inner.broadcast(tx).await
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, TxIn, Witness, absolute, transaction};
    use lockstep_sim::SimParams;

    use super::*;

    /// A spend of `coin` (an output with no signature to check) leaving
    /// `value` in one data output.
    fn spend(coin: OutPoint, value: u64) -> Transaction {
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: coin,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(value),
                script_pubkey: ScriptBuf::new_op_return([1u8; 4]),
            }],
        }
    }

    #[test]
    fn the_dropped_transaction_is_acknowledged_never_relayed_and_the_next_one_is() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let chain = SimChain::generate(SimParams::unsigned(7), 110).unwrap();
            let source = DemoSource::new(Metered::new(Arc::new(chain.clone())), chain.clone());
            // An anyone-can-spend coin: scripts pass the interpreter.
            let script = ScriptBuf::from_bytes(vec![0x51]);
            let coin = chain.pay(script, Amount::from_sat(50_000)).unwrap();
            chain.mine(1).unwrap();

            source.drop_next_broadcast();
            let first = spend(coin, 49_000);
            let txid = source.broadcast(&first).await.unwrap();
            assert_eq!(source.broadcast(&first).await.unwrap(), txid);
            assert_eq!(source.dropped(), Some((txid, 2)));
            assert!(chain.mempool().is_empty(), "never relayed");
            assert_eq!(source.fee_of(&txid), Some(Amount::from_sat(1_000)));

            // The replacement (a higher fee) is relayed and confirms.
            let second = spend(coin, 48_000);
            let replaced = source.broadcast(&second).await.unwrap();
            assert_eq!(chain.mempool().len(), 1);
            assert_eq!(source.fee_of(&replaced), Some(Amount::from_sat(2_000)));
            assert_eq!(source.verified(), 2);
            chain.mine(1).unwrap();
            assert!(chain.unspent(&coin).is_none());
        });
    }

    #[test]
    fn a_bad_signature_is_refused_as_a_node_would() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let chain = SimChain::generate(SimParams::unsigned(8), 110).unwrap();
            let source = DemoSource::new(Metered::new(Arc::new(chain.clone())), chain.clone());
            // OP_FALSE: no witness makes it pass.
            let script = ScriptBuf::from_bytes(vec![0x00]);
            let coin = chain.pay(script, Amount::from_sat(50_000)).unwrap();
            chain.mine(1).unwrap();
            let refused = source.broadcast(&spend(coin, 49_000)).await;
            assert!(
                matches!(
                    refused,
                    Err(BroadcastError::Rejected {
                        reason: RejectReason::Invalid(InvalidTx::Script { .. }),
                        ..
                    })
                ),
                "{refused:?}"
            );
            assert!(chain.mempool().is_empty());
        });
    }
}
