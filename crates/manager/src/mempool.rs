//! The unconfirmed view: what the chain source's mempool holds for the
//! wallets, kept in step at the tip.
//!
//! Each poll lists the source's mempool (txids only), fetches each
//! transaction not seen before once, and routes it exactly as a block's
//! transactions are routed, without filters: a hash lookup per output in
//! the aggregate watchlist, and per input in the map of the wallets' coins
//! (confirmed, and outputs of their unconfirmed transactions). Every wallet
//! it touches records it in one write transaction, together with what left
//! the mempool since the last poll (replaced, evicted, or spent otherwise
//! by a block): a transaction seen in the mempool goes, the wallet's own
//! broadcast is marked out of the mempool.
//!
//! Confirmation needs nothing here: a block that confirms a mempool
//! transaction gives its row a height in the block's own transaction, and
//! a block that spends one of its inputs otherwise marks it conflicted
//! there. A reorg returns a disconnected block's transactions kept with
//! their raw bytes to unconfirmed; the next poll keeps those the
//! source's mempool took back, drops the others and records the rest of
//! what the mempool took back as new.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bitcoin::hashes::Hash as _;
use bitcoin::{OutPoint, Transaction, Txid};
use lockstep_chain::{ChainSource, Missing, SourceError};
use lockstep_store::{WalletId, WriteTx};

use crate::ManagerError;
use crate::books::{Books, OutpointOwners};
use crate::pipeline::{Policy, timed};

/// Mempool transactions fetched at once.
const FETCH_CONCURRENCY: usize = 16;

/// What the loop keeps between polls.
#[derive(Debug, Default)]
pub(crate) struct MempoolView {
    /// Every transaction in the source's mempool as last listed, fetched
    /// once each. Kept so that a wallet joining or a script newly watched
    /// is checked against the whole mempool without fetching it again (the
    /// memory of the node's mempool, at worst).
    txs: HashMap<Txid, Arc<Transaction>>,
    /// What the cached transactions were last checked against: the
    /// watchlist's size, the number of wallets and the registry version.
    /// When it moved, every cached transaction is checked again.
    checked: Option<(usize, usize, Option<u64>)>,
}

/// What one poll changed.
#[derive(Debug, Default)]
pub struct MempoolSync {
    /// Transactions in the source's mempool.
    pub listed: usize,
    /// Of those, fetched by this poll (not seen before).
    pub fetched: usize,
    /// Unconfirmed transactions recorded, and the wallets that recorded them.
    pub added: Vec<(Txid, Vec<WalletId>)>,
    /// Unconfirmed transactions that left the mempool, and the wallets that
    /// dropped or marked them.
    pub left: Vec<(Txid, Vec<WalletId>)>,
}

impl MempoolView {
    /// Lists the source's mempool and fetches what is new; returns the
    /// listed txids and the transactions to check against the books (all
    /// of them when the wallets or their scripts changed since the last
    /// check, else the new ones), parents before children. `None` when the
    /// source shows no mempool.
    pub(crate) async fn refresh(
        &mut self,
        source: &Arc<dyn ChainSource>,
        policy: &Policy,
        books: (usize, usize, Option<u64>),
    ) -> Result<Option<Refreshed>, ManagerError> {
        let Some(listed) = timed(policy, || source.mempool_txids()).await? else {
            return Ok(None);
        };
        let listed: HashSet<Txid> = listed.into_iter().collect();
        self.txs.retain(|txid, _| listed.contains(txid));
        let missing: Vec<Txid> = listed
            .iter()
            .filter(|t| !self.txs.contains_key(*t))
            .copied()
            .collect();
        let fetched = fetch_all(source, policy, &missing).await?;
        let count = fetched.len();
        let recheck = self.checked != Some(books);
        let mut candidates: Vec<(Txid, Arc<Transaction>)> = Vec::new();
        for (txid, tx) in fetched {
            let tx = Arc::new(tx);
            if !recheck {
                candidates.push((txid, tx.clone()));
            }
            self.txs.insert(txid, tx);
        }
        if recheck {
            candidates = self.txs.iter().map(|(t, tx)| (*t, tx.clone())).collect();
        }
        Ok(Some(Refreshed {
            listed,
            fetched: count,
            candidates: parents_first(candidates),
        }))
    }

    /// Notes what the books looked like when the cached transactions were
    /// checked against them.
    pub(crate) fn checked_against(&mut self, books: (usize, usize, Option<u64>)) {
        self.checked = Some(books);
    }

    /// Forgets what was checked, so that the next poll checks everything
    /// again (after a write failed, or a reorg).
    pub(crate) fn forget_checks(&mut self) {
        self.checked = None;
    }
}

/// What [`MempoolView::refresh`] found.
pub(crate) struct Refreshed {
    pub(crate) listed: HashSet<Txid>,
    pub(crate) fetched: usize,
    /// With their txids, parents first.
    pub(crate) candidates: Vec<(Txid, Arc<Transaction>)>,
}

/// Fetches `txids`, [`FETCH_CONCURRENCY`] at a time, each checked to hash
/// to its txid; one that left the mempool meanwhile is skipped.
async fn fetch_all(
    source: &Arc<dyn ChainSource>,
    policy: &Policy,
    txids: &[Txid],
) -> Result<Vec<(Txid, Transaction)>, ManagerError> {
    let mut out = Vec::with_capacity(txids.len());
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = txids.iter().copied();
    loop {
        while tasks.len() < FETCH_CONCURRENCY {
            let Some(txid) = next.next() else { break };
            let (source, policy) = (source.clone(), policy.clone());
            tasks.spawn(async move {
                let result = timed(&policy, || source.mempool_tx(txid)).await;
                (txid, result)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (txid, result) = joined.map_err(|e| {
            ManagerError::Source(SourceError::Unavailable {
                reason: format!("fetching mempool transactions: task failed: {e}"),
            })
        })?;
        match result {
            Ok(tx) if tx.compute_txid() == txid => out.push((txid, tx)),
            Ok(_) => {
                return Err(ManagerError::Source(SourceError::Invalid {
                    what: Missing::Transaction(txid),
                    reason: "the transaction has another txid".to_owned(),
                }));
            }
            Err(SourceError::NotFound(_)) => {}
            Err(e) => return Err(ManagerError::Source(e)),
        }
    }
    Ok(out)
}

/// `txs` ordered so that a transaction spending another of them comes
/// after it (a node lists its mempool in no such order).
fn parents_first(txs: Vec<(Txid, Arc<Transaction>)>) -> Vec<(Txid, Arc<Transaction>)> {
    let by_txid: HashMap<Txid, usize> = txs
        .iter()
        .enumerate()
        .map(|(i, (txid, _))| (*txid, i))
        .collect();
    let mut placed = vec![false; txs.len()];
    let mut order = Vec::with_capacity(txs.len());
    for start in 0..txs.len() {
        // Depth first, parents before the transaction; iterative so that
        // a long chain cannot overflow the stack.
        let mut stack = vec![(start, false)];
        while let Some((i, expanded)) = stack.pop() {
            if placed[i] {
                continue;
            }
            if expanded {
                placed[i] = true;
                order.push(i);
                continue;
            }
            stack.push((i, true));
            for input in &txs[i].1.input {
                if let Some(&parent) = by_txid.get(&input.previous_output.txid)
                    && !placed[parent]
                {
                    stack.push((parent, false));
                }
            }
        }
    }
    let mut slots: Vec<Option<(Txid, Arc<Transaction>)>> = txs.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// In one write transaction: every active wallet's unconfirmed
/// transactions brought in step with the source's mempool (`listed`), and
/// `candidates` (parents first) recorded by every wallet they touch.
pub(crate) fn record_mempool(
    tx: &mut WriteTx<'_>,
    mut books: Books,
    listed: &HashSet<Txid>,
    candidates: &[(Txid, Arc<Transaction>)],
) -> Result<(Books, MempoolSync), ManagerError> {
    let mut sync = MempoolSync {
        listed: listed.len(),
        ..MempoolSync::default()
    };
    // What the wallets hold unconfirmed, and the outputs of it that are
    // theirs (a mempool transaction spending one touches them).
    let mut have: HashSet<(WalletId, Txid)> = HashSet::new();
    let mut pending = OutpointOwners::default();
    let mut left: HashMap<Txid, Vec<WalletId>> = HashMap::new();
    let mut owners = Vec::new();
    for row in tx.unconfirmed_txs(None)? {
        let id = row.wallet_id;
        if !books.wallets.contains_key(&id) {
            // Importing: its import gives it what it must have.
            continue;
        }
        let txid = Txid::from_byte_array(row.txid);
        let in_mempool = listed.contains(&txid);
        if in_mempool == row.left_mempool || (!in_mempool && row.from_mempool) {
            let live = books
                .registry
                .get_in(tx, id)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            let changed = live
                .wallet_in(tx)
                .set_in_mempool(tx, txid, in_mempool)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            if changed && !in_mempool {
                left.entry(txid).or_default().push(id);
            }
        }
        if !in_mempool && row.from_mempool {
            continue;
        }
        have.insert((id, txid));
        if in_mempool && !row.conflicted {
            let t = lockstep_wallet::decode_stored(id, &row.raw)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            for (vout, out) in t.output.iter().enumerate() {
                owners.clear();
                books.watch.wallets_of(&out.script_pubkey, &mut owners);
                if owners.contains(&id) {
                    pending
                        .entry(OutPoint::new(txid, vout as u32))
                        .or_default()
                        .push(id);
                }
            }
        }
    }
    let mut touched: Vec<WalletId> = Vec::new();
    let mut derived = Vec::new();
    // A payment to a wallet's window moves it; a transaction that pays a
    // script derived that way and was passed over is found by another
    // pass (recording is idempotent), as for a block.
    for _pass in 0..64 {
        let derived_before = books.watch.len();
        record_pass(
            tx,
            &mut books,
            candidates,
            &mut have,
            &mut pending,
            &mut touched,
            &mut derived,
            &mut sync,
        )?;
        if books.watch.len() == derived_before {
            break;
        }
    }
    if books.watch.wants_compaction() {
        books.watch.compact();
    }
    sync.left = left.into_iter().collect();
    sync.left.sort();
    Ok((books, sync))
}

/// One pass of [`record_mempool`] over the candidates.
#[allow(clippy::too_many_arguments)]
fn record_pass(
    tx: &mut WriteTx<'_>,
    books: &mut Books,
    candidates: &[(Txid, Arc<Transaction>)],
    have: &mut HashSet<(WalletId, Txid)>,
    pending: &mut OutpointOwners,
    touched: &mut Vec<WalletId>,
    derived: &mut Vec<bitcoin::ScriptBuf>,
    sync: &mut MempoolSync,
) -> Result<(), ManagerError> {
    for (txid, t) in candidates {
        let txid = *txid;
        books.wallets_touched(t, Some(pending), touched);
        if touched.is_empty() {
            continue;
        }
        let mut recorded = Vec::new();
        for &id in touched.iter() {
            if !books.wallets.contains_key(&id) || have.contains(&(id, txid)) {
                continue;
            }
            let live = books
                .registry
                .get_in(tx, id)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            let mut wallet = live.wallet_in(tx);
            let Some(new_scripts) = wallet
                .record_from_mempool(tx, t)
                .map_err(|e| ManagerError::of_wallet(id, e))?
            else {
                continue;
            };
            have.insert((id, txid));
            recorded.push(id);
            for (vout, out) in t.output.iter().enumerate() {
                if wallet.script_index(&out.script_pubkey).is_some() {
                    pending
                        .entry(OutPoint::new(txid, vout as u32))
                        .or_default()
                        .push(id);
                }
            }
            derived.clear();
            books.watch_derived(id, &wallet, &new_scripts, derived);
        }
        if !recorded.is_empty() {
            sync.added.push((txid, recorded));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bitcoin::absolute::LockTime;
    use bitcoin::transaction::Version;
    use bitcoin::{Amount, ScriptBuf, Sequence, TxIn, TxOut, Witness};

    use super::*;

    fn tx(spends: &[OutPoint], tag: u64) -> Arc<Transaction> {
        Arc::new(Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: spends
                .iter()
                .map(|p| TxIn {
                    previous_output: *p,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::MAX,
                    witness: Witness::new(),
                })
                .collect(),
            output: vec![TxOut {
                value: Amount::from_sat(tag),
                script_pubkey: ScriptBuf::new(),
            }],
        })
    }

    #[test]
    fn parents_come_before_their_children_whatever_the_listing_order() {
        let root = tx(&[OutPoint::null()], 1);
        let child = tx(&[OutPoint::new(root.compute_txid(), 0)], 2);
        let grandchild = tx(&[OutPoint::new(child.compute_txid(), 0)], 3);
        let other = tx(&[OutPoint::null()], 4);
        let both = tx(
            &[
                OutPoint::new(grandchild.compute_txid(), 0),
                OutPoint::new(other.compute_txid(), 0),
            ],
            5,
        );
        let listed = [&both, &grandchild, &other, &child, &root]
            .map(|t| (t.compute_txid(), Arc::clone(t)))
            .to_vec();
        let order: Vec<Txid> = parents_first(listed)
            .iter()
            .map(|(txid, _)| *txid)
            .collect();
        assert_eq!(order.len(), 5);
        let at = |t: &Arc<Transaction>| {
            order
                .iter()
                .position(|x| *x == t.compute_txid())
                .expect("placed")
        };
        assert!(at(&root) < at(&child));
        assert!(at(&child) < at(&grandchild));
        assert!(at(&grandchild) < at(&both));
        assert!(at(&other) < at(&both));
    }
}
