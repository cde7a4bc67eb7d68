//! Replay: connecting the blocks of a saved chain again, and restoring
//! its mempool and coin pool exactly, so that a loaded chain continues as
//! the original would. The file format itself is in `sim::file`.

use bitcoin::{OutPoint, Transaction};

use super::{COINBASE_MATURITY, State, Stored, Utxo};
use crate::sim::SimError;
use crate::sim::pool::{Pool, PoolCoin};

impl State {
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

    /// Restores a saved mempool and pool exactly (no re-selection, so a
    /// loaded chain continues as the original would).
    pub(crate) fn restore(
        &mut self,
        mempool: Vec<Transaction>,
        pool_order: Vec<OutPoint>,
    ) -> Result<(), SimError> {
        for tx in mempool {
            let txid = tx.compute_txid();
            let checked = self
                .check_tx(&tx, txid, false)
                .map_err(|e| SimError::Inconsistent(format!("saved mempool transaction: {e}")))?;
            if !checked.conflicts.is_empty() {
                return Err(SimError::Inconsistent(format!(
                    "saved mempool transaction {txid} conflicts with another"
                )));
            }
            self.mempool.insert(tx, txid, checked.fee);
        }
        self.pool = Pool::default();
        for outpoint in pool_order {
            let (txout, key) = if let Some(utxo) = self.utxos.get(&outpoint) {
                (utxo.txout.clone(), utxo.key)
            } else if let Some(out) = self.mempool.created.get(&outpoint) {
                let tx = self.mempool.get(&outpoint.txid).ok_or_else(|| {
                    SimError::Inconsistent(format!("{outpoint} has no mempool transaction"))
                })?;
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
