//! What the loop tells the world: its status (a `watch`), what happened (a
//! `broadcast` of [`Event`]s) and its counters ([`Stats`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bitcoin::{Amount, BlockHash, Txid};
use lockstep_store::WalletId;

/// Where the chain loop is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Started, not yet in touch with the source.
    Connecting,
    /// Catching up: committed `height`, the source's tip is `tip`.
    Syncing {
        /// The loop's committed tip.
        height: u32,
        /// The source's tip.
        tip: u32,
    },
    /// At the source's tip.
    Synced {
        /// The loop's committed tip.
        height: u32,
    },
    /// The source (or the database) keeps failing; the loop retries with
    /// backoff and commits nothing meanwhile.
    Offline {
        /// When the failures began.
        since: SystemTime,
        /// The last error.
        error: String,
    },
    /// Stopped by [`crate::Manager::stop`].
    Stopped,
    /// Stopped by a fatal error (a corrupt database, a block hook that
    /// failed, a panic in a write, a reorg deeper than the kept hashes):
    /// retrying cannot help, so the loop does not. Fix the cause, then
    /// [`start`](crate::Manager::start) again.
    Failed {
        /// The error.
        error: String,
    },
}

/// Something the loop committed. Published after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A block joined every active wallet's history.
    BlockConnected {
        /// Its height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
        /// The wallets it touched.
        wallets: Vec<WalletId>,
    },
    /// A block left the best chain; every wallet undid it.
    BlockDisconnected {
        /// Its height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
    },
    /// A wallet finished its import and moves in lockstep from `height`.
    WalletImported {
        /// The wallet.
        wallet: WalletId,
        /// The loop's tip it joined at.
        height: u32,
    },
    /// A wallet could not be processed and was parked: the loop goes on
    /// for every other wallet; [`crate::Manager::resume_wallet`] takes it
    /// back.
    WalletParked {
        /// The wallet.
        wallet: WalletId,
        /// The height its state is synced to.
        height: u32,
        /// Why.
        error: String,
    },
    /// A transaction in the source's mempool touches these wallets: they
    /// recorded it as unconfirmed.
    Unconfirmed {
        /// The transaction.
        txid: Txid,
        /// The wallets it pays or spends from.
        wallets: Vec<WalletId>,
    },
    /// An unconfirmed transaction left the source's mempool without
    /// confirming (replaced, evicted, or conflicted by a block): these
    /// wallets no longer count it.
    LeftMempool {
        /// The transaction.
        txid: Txid,
        /// The wallets that had it.
        wallets: Vec<WalletId>,
    },
    /// A wallet's transactions in one block.
    WalletActivity {
        /// The wallet.
        wallet: WalletId,
        /// The block's height.
        height: u32,
        /// The transactions, in block order.
        txids: Vec<Txid>,
        /// What they paid the wallet.
        received: Amount,
        /// What they spent of it.
        sent: Amount,
    },
}

/// The loop's counters since the manager was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blocks connected by the loop (imports not counted).
    pub blocks_connected: u64,
    /// Blocks disconnected by reorgs.
    pub blocks_disconnected: u64,
    /// Filters matched (by the loop and by imports).
    pub filters_matched: u64,
    /// Blocks fetched.
    pub blocks_fetched: u64,
    /// Fetched blocks that touched no wallet (filter false positives, and
    /// blocks fetched by the block strategy with nothing for anyone).
    pub false_positives: u64,
    /// Database transactions committed.
    pub commits: u64,
    /// Imports finished.
    pub imports: u64,
    /// Wallets parked.
    pub parked: u64,
    /// Switches between the filter and the block strategy.
    pub strategy_switches: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) blocks_connected: AtomicU64,
    pub(crate) blocks_disconnected: AtomicU64,
    pub(crate) filters_matched: AtomicU64,
    pub(crate) blocks_fetched: AtomicU64,
    pub(crate) false_positives: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) imports: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) strategy_switches: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            blocks_connected: get(&self.blocks_connected),
            blocks_disconnected: get(&self.blocks_disconnected),
            filters_matched: get(&self.filters_matched),
            blocks_fetched: get(&self.blocks_fetched),
            false_positives: get(&self.false_positives),
            commits: get(&self.commits),
            imports: get(&self.imports),
            parked: get(&self.parked),
            strategy_switches: get(&self.strategy_switches),
        }
    }
}
