//! What a wallet holds, read from the database: its balance in parts,
//! its coins and its history.

use super::*;

/// A wallet's balance in parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Unspent confirmed coins (immature and locked ones included).
    pub confirmed: Amount,
    /// Of those, coinbase outputs not yet spendable: as Bitcoin Core's
    /// wallet counts them, until 100 blocks are on top of their own.
    pub immature: Amount,
    /// Of those, what in-flight holders (actions) have locked.
    pub locked: Amount,
    /// Unspent outputs to the wallet of unconfirmed transactions that are
    /// trusted: every input spends a confirmed coin of the wallet or an
    /// output of another trusted one (its own payments and their change,
    /// as Bitcoin Core's wallet counts `trusted_pending`).
    pub trusted_pending: Amount,
    /// Unspent outputs to the wallet of the other unconfirmed transactions
    /// (payments from others, seen in the source's mempool): they may
    /// never confirm.
    pub untrusted_pending: Amount,
    /// Confirmed coins that unconfirmed transactions spend (on their way
    /// out; still counted in `confirmed`).
    pub unconfirmed_outgoing: Amount,
}

impl Balance {
    /// What a new payment can use now: confirmed, mature, not locked.
    pub fn spendable(&self) -> Amount {
        self.confirmed
            .checked_sub(self.locked + self.immature)
            .unwrap_or(Amount::ZERO)
    }
}

/// Whether a coin created at `height` is an immature coinbase output at
/// `tip`, as Bitcoin Core's wallet counts it (`GetBlocksToMaturity`: 100
/// blocks must be on top of its own, one more than consensus needs for the
/// spend to enter the next block). With no tip recorded, every coinbase
/// output is immature.
pub(crate) fn is_immature(is_coinbase: bool, height: u32, tip: Option<u32>) -> bool {
    is_coinbase && tip.is_none_or(|tip| tip < height.saturating_add(100))
}

/// An unconfirmed transaction of wallet `id` as stored (its broadcast, or
/// one seen in the mempool); bytes that do not decode are a corrupt
/// database, never a panic.
pub fn decode_stored(id: WalletId, raw: &[u8]) -> Result<Transaction, WalletError> {
    bitcoin::consensus::deserialize(raw).map_err(|e| WalletError::Corrupt {
        wallet_id: id,
        detail: format!("stored unconfirmed transaction: {e}"),
    })
}

/// The unconfirmed parts of a wallet's balance, in satoshis.
#[derive(Debug, Default)]
pub(super) struct PendingParts {
    trusted: u64,
    untrusted: u64,
    outgoing: u64,
}

/// Reads the wallet's unconfirmed transactions (those neither conflicted
/// nor out of the source's mempool) and splits what they leave the wallet:
/// their outputs to it that none of them spends, trusted or not, and the
/// confirmed coins they spend. Computed from the transactions themselves
/// each time, so that chains of unconfirmed transactions (a payment
/// spending the change of another) count each coin once.
pub(super) fn pending_parts(tx: &ReadTx<'_>, id: WalletId) -> Result<PendingParts, WalletError> {
    let mut live: HashMap<Txid, Transaction> = HashMap::new();
    for row in tx.unconfirmed_txs(Some(id))? {
        if !row.conflicted && !row.left_mempool {
            live.insert(
                Txid::from_byte_array(row.txid),
                decode_stored(id, &row.raw)?,
            );
        }
    }
    let mut parts = PendingParts::default();
    if live.is_empty() {
        return Ok(parts);
    }
    // Outputs to the wallet, and the outpoints the live transactions spend.
    let mut ours: HashMap<OutPoint, u64> = HashMap::new();
    for (txid, t) in &live {
        for (vout, out) in t.output.iter().enumerate() {
            if tx.wallet_owns_script(id, out.script_pubkey.as_bytes())? {
                ours.insert(OutPoint::new(*txid, vout as u32), out.value.to_sat());
            }
        }
    }
    let mut spent_here: std::collections::HashSet<OutPoint> = std::collections::HashSet::new();
    let mut confirmed_in: HashMap<OutPoint, u64> = HashMap::new();
    for t in live.values() {
        for input in &t.input {
            let prev = input.previous_output;
            spent_here.insert(prev);
            if !ours.contains_key(&prev)
                && let Some(coin) = tx.wallet_coin(id, &prev.txid.to_byte_array(), prev.vout)?
                && coin.spent.is_none()
            {
                confirmed_in.insert(prev, coin.value);
            }
        }
    }
    parts.outgoing = confirmed_in.values().sum();
    // Trusted: every input is a confirmed coin of the wallet or an output
    // to it of a trusted live transaction (parents first, memoised).
    let mut trusted: HashMap<Txid, bool> = HashMap::new();
    pub(super) fn is_trusted(
        txid: Txid,
        live: &HashMap<Txid, Transaction>,
        ours: &HashMap<OutPoint, u64>,
        confirmed_in: &HashMap<OutPoint, u64>,
        memo: &mut HashMap<Txid, bool>,
    ) -> bool {
        if let Some(&known) = memo.get(&txid) {
            return known;
        }
        // A cycle is impossible between valid transactions; guard anyway.
        memo.insert(txid, false);
        let t = &live[&txid];
        let verdict = !t.input.is_empty()
            && t.input.iter().all(|input| {
                let prev = input.previous_output;
                confirmed_in.contains_key(&prev)
                    || (ours.contains_key(&prev)
                        && live.contains_key(&prev.txid)
                        && is_trusted(prev.txid, live, ours, confirmed_in, memo))
            });
        memo.insert(txid, verdict);
        verdict
    }
    for (outpoint, value) in &ours {
        if spent_here.contains(outpoint) {
            continue;
        }
        if is_trusted(outpoint.txid, &live, &ours, &confirmed_in, &mut trusted) {
            parts.trusted += value;
        } else {
            parts.untrusted += value;
        }
    }
    Ok(parts)
}

/// A coin of the wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coin {
    /// Where it is.
    pub outpoint: OutPoint,
    /// Its value and script.
    pub txout: TxOut,
    /// The keychain and index of its script.
    pub keychain: Keychain,
    /// The derivation index of its script.
    pub index: u32,
    /// The height of the block that created it.
    pub height: u32,
    /// Whether a coinbase created it.
    pub is_coinbase: bool,
    /// The spending transaction and its height, once spent.
    pub spent: Option<(Txid, u32)>,
}

/// A transaction in the wallet's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryTx {
    /// The transaction.
    pub txid: Txid,
    /// Its block's height, `None` while unconfirmed.
    pub height: Option<u32>,
    /// What it paid the wallet.
    pub received: Amount,
    /// What it spent of the wallet's coins.
    pub sent: Amount,
    /// For a transaction the wallet broadcast: the confirmed transaction
    /// that spent one of its inputs instead, and its height.
    pub conflicted_by: Option<(Txid, u32)>,
    /// First seen in the chain source's mempool (a payment from others, or
    /// a transaction of the wallet's keys made elsewhere), rather than
    /// broadcast by the wallet or first seen in a block.
    pub from_mempool: bool,
    /// For an unconfirmed broadcast of the wallet: the source's mempool no
    /// longer holds it (replaced, evicted), so it counts in no balance.
    pub left_mempool: bool,
}

impl HistoryTx {
    /// What it did to the wallet's balance, in satoshis.
    pub fn net(&self) -> i64 {
        self.received.to_sat() as i64 - self.sent.to_sat() as i64
    }
}

impl Coin {
    /// A stored coin row of wallet `wallet_id` as a [`Coin`]: the one
    /// conversion, so that a selection and a listing read rows alike.
    ///
    /// # Errors
    /// [`WalletError::Corrupt`] if the row names no known keychain.
    pub(crate) fn from_row(wallet_id: WalletId, row: CoinRow) -> Result<Coin, WalletError> {
        let keychain = Keychain::from_u8(row.keychain).ok_or_else(|| WalletError::Corrupt {
            wallet_id,
            detail: format!("keychain {}", row.keychain),
        })?;
        Ok(Coin {
            outpoint: OutPoint::new(Txid::from_byte_array(row.txid), row.vout),
            txout: TxOut {
                value: Amount::from_sat(row.value),
                script_pubkey: ScriptBuf::from(row.script),
            },
            keychain,
            index: row.index,
            height: row.height,
            is_coinbase: row.is_coinbase,
            spent: row.spent.map(|(t, h)| (Txid::from_byte_array(t), h)),
        })
    }
}

impl Wallet {
    /// The sum of the wallet's unspent confirmed coins.
    pub fn balance(&self, tx: &ReadTx<'_>) -> Result<Amount, WalletError> {
        Ok(Amount::from_sat(tx.wallet_balance(self.id)?))
    }

    /// The balance in parts: confirmed coins, the immature coinbase outputs
    /// and what in-flight holders have locked of them, and what the
    /// wallet's own pending broadcasts will move (their inputs leaving,
    /// their outputs to the wallet arriving).
    pub fn balance_details(&self, tx: &ReadTx<'_>) -> Result<Balance, WalletError> {
        Self::balance_of(tx, self.id)
    }

    pub(crate) fn balance_of(tx: &ReadTx<'_>, id: WalletId) -> Result<Balance, WalletError> {
        let tip = tx.tip()?.map(|(h, _)| h);
        let coins = tx.unspent_coins_with_locks(id)?;
        let (mut confirmed, mut immature, mut locked) = (0u64, 0u64, 0u64);
        for (coin, holder) in &coins {
            confirmed += coin.value;
            if holder.is_some() {
                locked += coin.value;
            } else if is_immature(coin.is_coinbase, coin.height, tip) {
                immature += coin.value;
            }
        }
        let pending = pending_parts(tx, id)?;
        Ok(Balance {
            confirmed: Amount::from_sat(confirmed),
            immature: Amount::from_sat(immature),
            locked: Amount::from_sat(locked),
            trusted_pending: Amount::from_sat(pending.trusted),
            untrusted_pending: Amount::from_sat(pending.untrusted),
            unconfirmed_outgoing: Amount::from_sat(pending.outgoing),
        })
    }

    /// The wallet's coins (unspent only, or all), by outpoint.
    pub fn coins(&self, tx: &ReadTx<'_>, unspent_only: bool) -> Result<Vec<Coin>, WalletError> {
        Self::coins_of(tx, self.id, unspent_only)
    }

    pub(super) fn coins_of(
        tx: &ReadTx<'_>,
        id: WalletId,
        unspent_only: bool,
    ) -> Result<Vec<Coin>, WalletError> {
        tx.wallet_coins(id, unspent_only)?
            .into_iter()
            .map(|row| Coin::from_row(id, row))
            .collect()
    }

    /// Every coin of wallet `id` with its state at the loop's tip.
    pub(crate) fn coins_with_state(
        tx: &ReadTx<'_>,
        id: WalletId,
    ) -> Result<Vec<crate::CoinInfo>, WalletError> {
        use crate::CoinState;
        let tip = tx.tip()?.map(|(h, _)| h);
        let holders: HashMap<OutPoint, String> = tx
            .unspent_coins_with_locks(id)?
            .into_iter()
            .filter_map(|(c, holder)| {
                holder.map(|h| (OutPoint::new(Txid::from_byte_array(c.txid), c.vout), h))
            })
            .collect();
        Ok(Self::coins_of(tx, id, false)?
            .into_iter()
            .map(|coin| {
                let state = match (coin.spent, holders.get(&coin.outpoint)) {
                    (Some((txid, height)), _) => CoinState::Spent { txid, height },
                    (None, Some(holder)) => CoinState::Locked {
                        holder: holder.clone(),
                    },
                    (None, None) if is_immature(coin.is_coinbase, coin.height, tip) => {
                        CoinState::Immature
                    }
                    (None, None) => CoinState::Spendable,
                };
                crate::CoinInfo { coin, state }
            })
            .collect())
    }

    /// The transactions that touched the wallet, oldest first, with what
    /// each paid it and spent of it.
    pub fn history(&self, tx: &ReadTx<'_>) -> Result<Vec<HistoryTx>, WalletError> {
        Self::history_of(tx, self.id)
    }

    pub(crate) fn history_of(tx: &ReadTx<'_>, id: WalletId) -> Result<Vec<HistoryTx>, WalletError> {
        Ok(tx
            .wallet_txs(id)?
            .into_iter()
            .map(|row| HistoryTx {
                txid: Txid::from_byte_array(row.txid),
                height: row.height,
                received: Amount::from_sat(row.received),
                sent: Amount::from_sat(row.sent),
                conflicted_by: row
                    .conflicted_by
                    .map(|(t, h)| (Txid::from_byte_array(t), h)),
                from_mempool: row.from_mempool,
                left_mempool: row.left_mempool,
            })
            .collect())
    }
}
