//! Inside one write transaction: routing each fetched block's transactions
//! to the wallets they touch, ingesting them, and moving the scan's height.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bitcoin::bip158::FilterHeader;
use bitcoin::hashes::Hash as _;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, BlockHash, OutPoint, ScriptBuf};
use lockstep_store::{WalletId, WriteTx};
use lockstep_wallet::{IngestSummary, NewScripts};

use crate::books::Books;
use crate::pipeline::Fetched;
use crate::{BlockHook, ManagerError};

/// Whose scan a batch advances.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// The chain loop: the tip, the recent hashes and the block hook move,
    /// and the wallet set is checked against the database first.
    Loop {
        /// Block hashes kept below the tip.
        keep: u32,
        /// The registry version the loop last read.
        seen: Option<u64>,
    },
    /// A wallet's import: only its progress moves.
    Import(WalletId),
}

/// One block a batch connected.
#[derive(Debug)]
pub(crate) struct Connected {
    pub(crate) height: u32,
    pub(crate) hash: BlockHash,
    pub(crate) bits: CompactTarget,
    pub(crate) filter_header: Option<FilterHeader>,
    /// Per touched wallet, what the block did to it.
    pub(crate) activity: Vec<(WalletId, IngestSummary)>,
    /// Whether the block was routed (fetched and needed).
    pub(crate) routed: bool,
    /// How long routing and ingesting took (for the strategy's cost model).
    pub(crate) route_nanos: u64,
}

/// What a batch did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) connected: Vec<Connected>,
    /// Blocks not taken: a script derived inside the batch matched a block
    /// that was not fetched. They are fetched and connected next.
    pub(crate) rest: Vec<Fetched>,
    pub(crate) filters: u64,
    pub(crate) blocks: u64,
    pub(crate) false_positives: u64,
    /// The registry version read inside the transaction (the loop's).
    pub(crate) registry: Option<u64>,
    /// A wallet is marked importing and the loop is not importing it.
    pub(crate) imports_waiting: bool,
}

/// Connects `items` in order, in the caller's transaction.
pub(crate) fn connect_batch(
    tx: &mut WriteTx<'_>,
    mut books: Books,
    items: Vec<Fetched>,
    mode: Mode,
    hook: Option<Arc<dyn BlockHook>>,
) -> Result<(Books, Outcome), ManagerError> {
    let mut outcome = Outcome::default();
    if let Mode::Loop { seen, .. } = mode {
        let mut seen = seen;
        outcome.imports_waiting = books.follow_registry(tx, &mut seen)?;
        outcome.registry = seen;
    }
    // Addresses handed out since the last batch are watched before any
    // block of this one is taken (a block matched without them is matched
    // again below, and fetched if it must be).
    books.watch_revealed(tx, matches!(mode, Mode::Import(_)), outcome.registry)?;
    let last_height = items.last().map_or(0, |i| i.height);
    let mut items = items.into_iter();
    while let Some(item) = items.next() {
        let need = item.needs_block(&books.watch);
        if need && item.block.is_none() {
            outcome.rest.push(item);
            outcome.rest.extend(items);
            break;
        }
        if item.filter.is_some() {
            outcome.filters += 1;
        }
        let mut activity = Vec::new();
        let mut route_nanos = 0;
        let routed = need && item.block.is_some();
        if let (true, Some(block)) = (need, &item.block) {
            let (connected, nanos) =
                thread_cpu_timed(|| connect_block(tx, &mut books, item.height, block));
            activity = connected?;
            route_nanos = nanos;
            outcome.blocks += 1;
            if activity.is_empty() {
                outcome.false_positives += 1;
            }
        }
        if let Mode::Loop { keep, .. } = mode {
            // Only the last `keep` hashes are kept: a long catch-up batch
            // writes just those.
            if item.height + keep >= last_height {
                tx.put_block(
                    item.height,
                    &item.hash.to_byte_array(),
                    item.bits.to_consensus(),
                )?;
            }
            if let Some(hook) = &hook {
                hook.block_connected(tx, item.height, &item.hash)
                    .map_err(ManagerError::Hook)?;
            }
        }
        outcome.connected.push(Connected {
            height: item.height,
            hash: item.hash,
            bits: item.bits,
            filter_header: item.filter_header,
            activity,
            routed,
            route_nanos,
        });
    }
    if let Some(last) = outcome.connected.last() {
        let hash = last.hash.to_byte_array();
        match mode {
            Mode::Loop { keep, .. } => {
                tx.set_tip(last.height, &hash)?;
                tx.prune_block_hashes_below(last.height.saturating_sub(keep))?;
            }
            Mode::Import(wallet) => tx.set_import_progress(wallet, last.height, &hash)?,
        }
    }
    books.watch.compact();
    Ok((books, outcome))
}

/// Runs `work` and says how long it took in this thread's CPU time (wall
/// time where the platform has no thread clock), for the strategy's cost
/// model: the fetch tasks keep every core busy meanwhile, and wall time
/// counted the time the writer waited for one (half again as much on two
/// cores).
fn thread_cpu_timed<T>(work: impl FnOnce() -> T) -> (T, u64) {
    let (cpu, wall) = (
        cpu_time::ThreadTime::try_now().ok(),
        std::time::Instant::now(),
    );
    let out = work();
    let took = cpu.map_or_else(|| wall.elapsed(), |cpu| cpu.elapsed());
    (out, took.as_nanos() as u64)
}

/// Routes one block's transactions to the wallets they touch and ingests
/// them, in block order, one transaction at a time: a transaction that
/// uses a wallet's lookahead window derives new scripts at once, so later
/// transactions of the block paying them are routed too. If a script
/// derived this way is paid by an *earlier* transaction of the block, the
/// block is routed again (ingest is idempotent), until nothing new is found.
///
/// What the block did to each wallet is kept per (wallet, transaction):
/// a later pass that routes the transaction again replaces its summary
/// (re-ingesting gives the same amounts), and a transaction a later pass
/// does not route keeps the one it had. A pass does not route everything
/// the last one did: a spend of a wallet coin is routed by the coin's
/// outpoint, which the first pass already took out of the books. Coins
/// created are counted across passes (re-inserting a coin creates none).
fn connect_block(
    tx: &mut WriteTx<'_>,
    books: &mut Books,
    height: u32,
    block: &Block,
) -> Result<Vec<(WalletId, IngestSummary)>, ManagerError> {
    let mut per_tx: BTreeMap<(WalletId, usize), IngestSummary> = BTreeMap::new();
    let mut touched: Vec<WalletId> = Vec::new();
    let mut added: Vec<ScriptBuf> = Vec::new();
    for _pass in 0..64 {
        let mut derived: HashSet<ScriptBuf> = HashSet::new();
        let mut last_derivation = None;
        for (position, t) in block.txdata.iter().enumerate() {
            books.wallets_touched(t, None, &mut touched);
            if touched.is_empty() {
                continue;
            }
            let txid = t.compute_txid();
            for &id in &touched {
                if !books.wallets.contains_key(&id) {
                    continue;
                }
                let live = books
                    .registry
                    .get_in(tx, id)
                    .map_err(|e| ManagerError::of_wallet(id, e))?;
                let mut wallet = live.wallet_in(tx);
                let summary = wallet
                    .ingest(tx, height, std::slice::from_ref(t))
                    .map_err(|e| ManagerError::of_wallet(id, e))?;
                if !t.is_coinbase() {
                    for input in &t.input {
                        if let Some(owners) = books.outpoints.get_mut(&input.previous_output) {
                            owners.retain(|o| *o != id);
                            if owners.is_empty() {
                                books.outpoints.remove(&input.previous_output);
                            }
                        }
                    }
                }
                for (vout, out) in t.output.iter().enumerate() {
                    if wallet.script_index(&out.script_pubkey).is_some() {
                        let owners = books
                            .outpoints
                            .entry(OutPoint {
                                txid,
                                vout: vout as u32,
                            })
                            .or_default();
                        if !owners.contains(&id) {
                            owners.push(id);
                        }
                    }
                }
                added.clear();
                books.watch_derived(id, &wallet, &summary.new_scripts, &mut added);
                drop(wallet);
                if !added.is_empty() {
                    derived.extend(added.drain(..));
                    last_derivation = Some(position);
                }
                let slot = per_tx.entry((id, position)).or_default();
                let created = slot.coins_created + summary.coins_created;
                let mut scripts = std::mem::take(&mut slot.new_scripts.0);
                scripts.extend(summary.new_scripts.0.iter().cloned());
                *slot = IngestSummary {
                    coins_created: created,
                    new_scripts: NewScripts(scripts),
                    ..summary
                };
            }
        }
        // Did a script derived in this pass pay a transaction the pass had
        // already gone by?
        let missed = last_derivation.is_some_and(|last| {
            block.txdata[..=last]
                .iter()
                .any(|t| t.output.iter().any(|o| derived.contains(&o.script_pubkey)))
        });
        if !missed || lockstep_store::faults::active(lockstep_store::faults::Fault::SinglePass) {
            break;
        }
    }
    // Per wallet, its transactions in block order (the map's order).
    let mut activity: BTreeMap<WalletId, IngestSummary> = BTreeMap::new();
    for ((id, _), summary) in per_tx {
        merge(activity.entry(id).or_default(), summary);
    }
    Ok(activity.into_iter().collect())
}

/// Adds a later transaction's summary of the same block to an earlier one.
fn merge(into: &mut IngestSummary, more: IngestSummary) {
    into.received += more.received;
    into.sent += more.sent;
    into.coins_created += more.coins_created;
    into.coins_spent += more.coins_spent;
    for txid in more.txids {
        if !into.txids.contains(&txid) {
            into.txids.push(txid);
        }
    }
    into.new_scripts.0.extend(more.new_scripts.0);
}
