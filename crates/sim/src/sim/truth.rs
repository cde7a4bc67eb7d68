//! The oracle: an exact, deliberately naive full scan of the best chain for a
//! set of scripts. It shares no code with anything it checks.

use std::collections::{BTreeMap, HashMap, HashSet};

use bitcoin::{Amount, Block, OutPoint, ScriptBuf, TxOut, Txid};

/// A coin the scripts received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthCoin {
    /// Where it is.
    pub outpoint: OutPoint,
    /// Its script and amount.
    pub txout: TxOut,
    /// The height of the block that created it.
    pub height: u32,
    /// Whether a coinbase created it (spendable after 100 blocks).
    pub is_coinbase: bool,
}

/// A coin the scripts received and spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpentCoin {
    /// The coin.
    pub coin: TruthCoin,
    /// The transaction that spent it.
    pub spent_by: Txid,
    /// The height of the block that spent it.
    pub spent_height: u32,
}

/// A transaction that touches the scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthTx {
    /// The transaction.
    pub txid: Txid,
    /// The height of its block.
    pub height: u32,
    /// What its outputs pay the scripts.
    pub received: Amount,
    /// What its inputs spend of the scripts' coins.
    pub sent: Amount,
}

/// Totals of one script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptTotals {
    /// Everything ever paid to it.
    pub received: Amount,
    /// Everything ever spent from it.
    pub sent: Amount,
    /// How many coins it received.
    pub coins_received: u32,
    /// How many of them are spent.
    pub coins_spent: u32,
}

/// What a full scan of the best chain says about a set of scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Truth {
    /// Unspent coins, by outpoint.
    pub unspent: Vec<TruthCoin>,
    /// Spent coins, by outpoint.
    pub spent: Vec<SpentCoin>,
    /// Totals per script (only scripts that received something).
    pub per_script: BTreeMap<ScriptBuf, ScriptTotals>,
    /// Transactions touching the scripts, in chain order.
    pub history: Vec<TruthTx>,
}

impl Truth {
    /// The sum of the unspent coins.
    pub fn balance(&self) -> Amount {
        self.unspent.iter().map(|c| c.txout.value).sum()
    }
}

/// A mempool transaction that touches the scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTruthTx {
    /// The transaction.
    pub txid: Txid,
    /// What its outputs pay the scripts.
    pub received: Amount,
    /// What its inputs spend of the scripts' coins, confirmed or not.
    pub sent: Amount,
    /// Whether every input spends a coin of the scripts that is confirmed
    /// or created by a trusted mempool transaction (Bitcoin Core's wallet
    /// calls such a transaction trusted and its outputs `trusted_pending`).
    pub trusted: bool,
}

/// What the mempool holds for a set of scripts, on top of [`Truth`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MempoolTruth {
    /// Mempool transactions touching the scripts, parents first.
    pub txs: Vec<PendingTruthTx>,
    /// Outputs of those transactions paying the scripts that no mempool
    /// transaction spends, with whether their transaction is trusted.
    pub unspent: Vec<(OutPoint, TxOut, bool)>,
    /// Confirmed coins of the scripts that mempool transactions spend.
    pub spends: Vec<OutPoint>,
    /// The sum of those confirmed coins.
    pub outgoing: Amount,
}

impl MempoolTruth {
    /// Unspent outputs of trusted mempool transactions.
    pub fn trusted_pending(&self) -> Amount {
        self.unspent.iter().filter(|u| u.2).map(|u| u.1.value).sum()
    }

    /// Unspent outputs of the other mempool transactions.
    pub fn untrusted_pending(&self) -> Amount {
        self.unspent
            .iter()
            .filter(|u| !u.2)
            .map(|u| u.1.value)
            .sum()
    }
}

/// The mempool `txs` (parents before children, as a mempool holds them)
/// against the confirmed `truth` of the same scripts.
pub(crate) fn scan_mempool<'a>(
    truth: &Truth,
    txs: impl Iterator<Item = &'a bitcoin::Transaction>,
    scripts: &HashSet<&ScriptBuf>,
) -> MempoolTruth {
    let confirmed: HashMap<OutPoint, &TruthCoin> =
        truth.unspent.iter().map(|c| (c.outpoint, c)).collect();
    // Outputs of touching mempool transactions: value and trusted.
    let mut pending: HashMap<OutPoint, (TxOut, bool)> = HashMap::new();
    let mut order: Vec<OutPoint> = Vec::new();
    let mut out = MempoolTruth::default();
    for tx in txs {
        let txid = tx.compute_txid();
        let (mut sent, mut all_ours, mut touched) = (Amount::ZERO, true, false);
        for input in &tx.input {
            let prev = input.previous_output;
            if let Some(coin) = confirmed.get(&prev) {
                sent += coin.txout.value;
                touched = true;
                out.spends.push(prev);
                out.outgoing += coin.txout.value;
            } else if let Some((txout, trusted)) = pending.remove(&prev) {
                sent += txout.value;
                touched = true;
                all_ours &= trusted;
            } else {
                all_ours = false;
            }
        }
        let trusted = touched && all_ours;
        let mut received = Amount::ZERO;
        for (vout, output) in tx.output.iter().enumerate() {
            if scripts.contains(&output.script_pubkey) {
                touched = true;
                received += output.value;
                let outpoint = OutPoint::new(txid, vout as u32);
                pending.insert(outpoint, (output.clone(), trusted));
                order.push(outpoint);
            }
        }
        if touched {
            out.txs.push(PendingTruthTx {
                txid,
                received,
                sent,
                trusted,
            });
        }
    }
    out.unspent = order
        .into_iter()
        .filter_map(|op| pending.remove(&op).map(|(txout, t)| (op, txout, t)))
        .collect();
    out.spends.sort();
    out
}

pub(crate) fn scan<'a>(
    blocks: impl Iterator<Item = &'a Block>,
    scripts: &HashSet<&ScriptBuf>,
) -> Truth {
    let mut live: HashMap<OutPoint, TruthCoin> = HashMap::new();
    let mut spent = Vec::new();
    let mut per_script: BTreeMap<ScriptBuf, ScriptTotals> = BTreeMap::new();
    let mut history = Vec::new();
    // Height 0: the genesis coinbase can never be spent, as in Bitcoin Core.
    for (height, block) in blocks.enumerate().skip(1) {
        let height = height as u32;
        for (i, tx) in block.txdata.iter().enumerate() {
            let txid = tx.compute_txid();
            let mut entry = TruthTx {
                txid,
                height,
                received: Amount::ZERO,
                sent: Amount::ZERO,
            };
            let mut touched = false;
            if i > 0 {
                for input in &tx.input {
                    if let Some(coin) = live.remove(&input.previous_output) {
                        touched = true;
                        entry.sent += coin.txout.value;
                        let totals = per_script
                            .get_mut(&coin.txout.script_pubkey)
                            .expect("received first");
                        totals.sent += coin.txout.value;
                        totals.coins_spent += 1;
                        spent.push(SpentCoin {
                            coin,
                            spent_by: txid,
                            spent_height: height,
                        });
                    }
                }
            }
            for (vout, out) in tx.output.iter().enumerate() {
                if scripts.contains(&out.script_pubkey) {
                    touched = true;
                    entry.received += out.value;
                    let totals = per_script.entry(out.script_pubkey.clone()).or_default();
                    totals.received += out.value;
                    totals.coins_received += 1;
                    let outpoint = OutPoint::new(txid, vout as u32);
                    live.insert(
                        outpoint,
                        TruthCoin {
                            outpoint,
                            txout: out.clone(),
                            height,
                            is_coinbase: i == 0,
                        },
                    );
                }
            }
            if touched {
                history.push(entry);
            }
        }
    }
    let mut unspent: Vec<TruthCoin> = live.into_values().collect();
    unspent.sort_by_key(|c| c.outpoint);
    spent.sort_by_key(|c| c.coin.outpoint);
    Truth {
        unspent,
        spent,
        per_script,
        history,
    }
}
