//! What the chain and the wallet's own broadcasts do to a wallet: a
//! block's transactions ingested and disconnected, broadcasts and
//! mempool transactions recorded.

use super::*;

/// What [`Wallet::ingest`] did with one block's transactions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestSummary {
    /// Paid to the wallet's scripts.
    pub received: Amount,
    /// Spent of the wallet's coins.
    pub sent: Amount,
    /// Coins created.
    pub coins_created: u32,
    /// Coins spent.
    pub coins_spent: u32,
    /// Transactions that touched the wallet, in block order.
    pub txids: Vec<Txid>,
    /// Scripts derived because the block used the lookahead window: the
    /// manager adds them to its watchlist.
    pub new_scripts: NewScripts,
}

impl Wallet {
    /// Ingests, inside the caller's transaction, the transactions of the
    /// block at `height` that the manager routed to this wallet (in block
    /// order; the wallet never scans a whole block): coins for outputs to
    /// its scripts, spends of its coins (a coin created and spent in the same
    /// block included), the transactions, and the lookahead window moved at
    /// once as scripts are used.
    ///
    /// The wallet's synced-to is the chain loop's tip, which the manager
    /// moves in the same transaction.
    pub fn ingest(
        &mut self,
        tx: &mut WriteTx<'_>,
        height: u32,
        txs: &[Transaction],
    ) -> Result<IngestSummary, WalletError> {
        let mut summary = IngestSummary::default();
        // The wallet's own unconfirmed broadcasts, by the outpoints they
        // spend: a block spending one of those with another transaction
        // conflicts them.
        let mut pending: HashMap<OutPoint, [u8; 32]> = HashMap::new();
        for (own, raw) in tx.pending_broadcasts(self.id)? {
            let own_tx = decode_stored(self.id, &raw)?;
            for input in &own_tx.input {
                pending.insert(input.previous_output, own);
            }
        }
        for t in txs {
            let txid = t.compute_txid();
            let txid_bytes = txid.to_byte_array();
            if !pending.is_empty() && !t.is_coinbase() {
                for input in &t.input {
                    if let Some(own) = pending
                        .get(&input.previous_output)
                        .filter(|own| **own != txid_bytes)
                    {
                        tx.set_conflicted(self.id, own, &txid_bytes, height)?;
                    }
                }
            }
            let (mut received, mut sent, mut touched) = (0u64, 0u64, false);
            if !t.is_coinbase() {
                for input in &t.input {
                    let prev = input.previous_output;
                    if let Some(value) = tx.spend_coin(
                        self.id,
                        &prev.txid.to_byte_array(),
                        prev.vout,
                        &txid_bytes,
                        height,
                    )? {
                        sent += value;
                        summary.coins_spent += 1;
                        touched = true;
                    }
                }
            }
            for (vout, out) in t.output.iter().enumerate() {
                let Some((keychain, index)) = self.script_index(&out.script_pubkey) else {
                    continue;
                };
                let new_coin = tx.insert_coin(
                    self.id,
                    &CoinRow {
                        txid: txid_bytes,
                        vout: vout as u32,
                        value: out.value.to_sat(),
                        script: out.script_pubkey.to_bytes(),
                        keychain: keychain.as_u8(),
                        index,
                        height,
                        is_coinbase: t.is_coinbase(),
                        spent: None,
                    },
                )?;
                received += out.value.to_sat();
                summary.coins_created += u32::from(new_coin);
                touched = true;
                summary
                    .new_scripts
                    .0
                    .extend(self.mark_used(tx, keychain, index)?.0);
            }
            if touched {
                tx.record_wallet_tx(
                    self.id,
                    &WalletTxRow {
                        txid: txid_bytes,
                        height: Some(height),
                        received,
                        sent,
                        conflicted_by: None,
                        from_mempool: false,
                        left_mempool: false,
                    },
                )?;
                summary.received += Amount::from_sat(received);
                summary.sent += Amount::from_sat(sent);
                summary.txids.push(txid);
            }
        }
        Ok(summary)
    }

    /// Records a transaction the wallet is broadcasting: it shows in the
    /// history as unconfirmed (with what it pays and spends of the wallet)
    /// until a block confirms it, or conflicts it by spending one of its
    /// inputs with another transaction. Call it in the same transaction
    /// that hands it to the chain source's broadcast queue, or before.
    pub fn record_broadcast(
        &self,
        tx: &mut WriteTx<'_>,
        transaction: &Transaction,
    ) -> Result<HistoryTx, WalletError> {
        let txid = transaction.compute_txid();
        let mut sent = 0u64;
        for input in &transaction.input {
            let prev = input.previous_output;
            if let Some(coin) = tx.wallet_coin(self.id, &prev.txid.to_byte_array(), prev.vout)? {
                sent += coin.value;
            }
        }
        let received: u64 = transaction
            .output
            .iter()
            .filter(|o| self.script_index(&o.script_pubkey).is_some())
            .map(|o| o.value.to_sat())
            .sum();
        let row = WalletTxRow {
            txid: txid.to_byte_array(),
            height: None,
            received,
            sent,
            conflicted_by: None,
            from_mempool: false,
            left_mempool: false,
        };
        tx.record_broadcast(self.id, &row, &bitcoin::consensus::serialize(transaction))?;
        Ok(HistoryTx {
            txid,
            height: None,
            received: Amount::from_sat(received),
            sent: Amount::from_sat(sent),
            conflicted_by: None,
            from_mempool: false,
            left_mempool: false,
        })
    }

    /// Records an unconfirmed transaction seen in the chain source's
    /// mempool that pays the wallet or spends its coins (confirmed, or
    /// outputs of its other unconfirmed transactions), unless the wallet
    /// has it already. Scripts it pays count as used, as a block's would:
    /// the window moves and the new scripts are returned for the
    /// watchlist. `None` when the wallet had it.
    pub fn record_from_mempool(
        &mut self,
        tx: &mut WriteTx<'_>,
        transaction: &Transaction,
    ) -> Result<Option<NewScripts>, WalletError> {
        let txid = transaction.compute_txid();
        // Each input's parent looked up by its txid (not every unconfirmed
        // transaction of the wallet read for each one recorded): a spend
        // of the wallet's coin, confirmed or in one of its unconfirmed
        // transactions still in the mempool.
        let mut parents: HashMap<Txid, Option<Transaction>> = HashMap::new();
        let mut sent = 0u64;
        for input in &transaction.input {
            let prev = input.previous_output;
            if let Some(coin) = tx.wallet_coin(self.id, &prev.txid.to_byte_array(), prev.vout)? {
                sent += coin.value;
                continue;
            }
            let parent = match parents.entry(prev.txid) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let row = tx
                        .unconfirmed_tx(self.id, &prev.txid.to_byte_array())?
                        .filter(|row| !row.conflicted && !row.left_mempool);
                    let parent = match row {
                        Some(row) => Some(decode_stored(self.id, &row.raw)?),
                        None => None,
                    };
                    slot.insert(parent)
                }
            };
            if let Some(out) = parent
                .as_ref()
                .and_then(|parent| parent.output.get(prev.vout as usize))
                && self.script_index(&out.script_pubkey).is_some()
            {
                sent += out.value.to_sat();
            }
        }
        let mut received = 0u64;
        let mut used = Vec::new();
        for out in &transaction.output {
            if let Some((keychain, index)) = self.script_index(&out.script_pubkey) {
                received += out.value.to_sat();
                used.push((keychain, index));
            }
        }
        let row = WalletTxRow {
            txid: txid.to_byte_array(),
            height: None,
            received,
            sent,
            conflicted_by: None,
            from_mempool: true,
            left_mempool: false,
        };
        if !tx.record_from_mempool(self.id, &row, &bitcoin::consensus::serialize(transaction))? {
            return Ok(None);
        }
        let mut new_scripts = NewScripts::default();
        for (keychain, index) in used {
            new_scripts.0.extend(self.mark_used(tx, keychain, index)?.0);
        }
        Ok(Some(new_scripts))
    }

    /// Says whether the source's mempool holds the wallet's unconfirmed
    /// transaction `txid`. One seen in the mempool that left it goes from
    /// the wallet (it comes back as new if the mempool takes it again);
    /// the wallet's own broadcast stays in the history, marked
    /// [`HistoryTx::left_mempool`] and counted in no balance until the
    /// mempool holds it again. Returns whether anything changed.
    pub fn set_in_mempool(
        &self,
        tx: &mut WriteTx<'_>,
        txid: Txid,
        in_mempool: bool,
    ) -> Result<bool, WalletError> {
        Ok(tx.set_in_mempool(self.id, &txid.to_byte_array(), in_mempool)?)
    }

    /// Undoes exactly what [`Wallet::ingest`] did at `height` and above:
    /// coins created there go, coins spent there come back, transactions
    /// confirmed there are dropped (or return to unconfirmed if the wallet
    /// broadcast them). Derived scripts stay: a wider window loses nothing,
    /// and reconnecting the same blocks gives the identical state.
    pub fn disconnect(
        &self,
        tx: &mut WriteTx<'_>,
        height: u32,
    ) -> Result<Disconnected, WalletError> {
        Ok(tx.disconnect_wallet(self.id, height)?)
    }
}
