//! How the chain loop is tuned.

use std::time::Duration;

use bitcoin::Network;

/// How the loop decides, block by block, between matching the block's
/// filter and fetching the block itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Measure both costs as the loop runs and take the cheaper path:
    /// filters while hashing every watched script costs less than fetching
    /// and scanning the block (small watchlists, remote sources), blocks
    /// past that crossover (very large watchlists, a source next door).
    Auto,
    /// Always match filters first (a light client's way).
    Filters,
    /// Always fetch every block and route it directly.
    Blocks,
}

/// Tuning of the chain loop. [`Default`] suits a local source on regtest
/// (the embedded simulated chain); set [`network`](Self::network) for any
/// other chain.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Blocks committed per database transaction while catching up (at the
    /// tip, every block commits on its own). After each commit every
    /// wallet's synced-to equals the loop's tip.
    pub batch_size: u32,
    /// Blocks whose filter (and, on a match, block) are fetched ahead of
    /// the one being committed: enough that the fetch tasks keep both
    /// cores busy while a batch commits, and that a remote source's latency
    /// is hidden (a BIP157 peer serves 1,000 filters per message).
    pub prefetch: usize,
    /// Headers asked for per request.
    pub header_batch: u32,
    /// Block hashes kept below the tip to find a fork point: the deepest
    /// reorg the loop can follow.
    pub recent_hashes: u32,
    /// How long one request to the source may take.
    pub request_timeout: Duration,
    /// How often a request that failed retryably (unavailable, timed out)
    /// is tried again, after `initial_backoff` times the attempt, before
    /// its batch is abandoned and the loop backs off.
    pub request_retries: u32,
    /// First wait after a failure; doubled up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// How often the loop asks the source for a new tip once synced.
    pub poll_interval: Duration,
    /// How often the synced loop lists the source's mempool for
    /// unconfirmed transactions, at the least; it also does after each new
    /// block, and when the source announces a transaction (Bitcoin Core's
    /// ZMQ `rawtx`), at most once a second. Each poll lists the node's
    /// whole mempool (about 6.5 MB of JSON at 100,000 transactions), so
    /// not at `poll_interval`.
    pub mempool_poll_interval: Duration,
    /// Filters or blocks, per block.
    pub strategy: Strategy,
    /// Where a loop with an empty database starts (the block at this
    /// height is taken as already processed, and trusted as the source
    /// gives it: the proof-of-work checks start after it).
    pub start_height: u32,
    /// The chain's network: its difficulty rules check every header, the
    /// source's genesis block must be its genesis, and every wallet's
    /// descriptors must be for it.
    pub network: Network,
    /// Wallets the registry keeps loaded when none of them is in use
    /// (least recently used evicted first; a wallet in use never is).
    pub registry_capacity: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            batch_size: 250,
            prefetch: 256,
            header_batch: 2_000,
            recent_hashes: 100,
            request_timeout: Duration::from_secs(30),
            request_retries: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(10),
            poll_interval: Duration::from_millis(200),
            mempool_poll_interval: Duration::from_secs(5),
            strategy: Strategy::Auto,
            start_height: 0,
            network: Network::Regtest,
            registry_capacity: lockstep_wallet::DEFAULT_CAPACITY,
        }
    }
}
