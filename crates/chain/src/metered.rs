//! [`Metered`]: a [`ChainSource`] wrapper that counts what is asked of the
//! source it wraps (requests, bytes, blocks), and can charge each request a
//! network's cost ([`LinkModel`]): a fixed latency, and the time its bytes
//! take on one shared link of a given bandwidth.
//!
//! Benchmarks use it to report requests and bytes, and to give fetching a
//! cost an in-process chain does not have; tests use its counters to check
//! that N wallets cost the requests of one.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use tokio::time::Instant;

use crate::source::{BlockId, BroadcastError, ChainSource, SourceError};

/// What one request costs on a simulated network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Paid by every request, concurrently with other requests (a round
    /// trip plus the server's work).
    pub latency: Duration,
    /// Bytes per second of the one link all answers share: concurrent
    /// answers queue for it.
    pub bytes_per_sec: u64,
}

impl LinkModel {
    /// A node in the same data centre, asked over REST: 5 ms per request,
    /// 1 Gbit/s.
    pub fn datacenter() -> LinkModel {
        LinkModel {
            latency: Duration::from_millis(5),
            bytes_per_sec: 125_000_000,
        }
    }
}

impl std::fmt::Display for LinkModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ms per request, {} Mbit/s shared",
            self.latency.as_secs_f64() * 1e3,
            self.bytes_per_sec * 8 / 1_000_000
        )
    }
}

/// What a [`Metered`] source has been asked, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meter {
    /// Requests of every kind.
    pub requests: u64,
    /// Filter requests.
    pub filters: u64,
    /// Block requests.
    pub blocks: u64,
    /// Header and filter-header requests (single or batched).
    pub headers: u64,
    /// Tip requests: a synced loop's polls for new blocks.
    pub tips: u64,
    /// Listings of the source's mempool (each lists all of it).
    pub mempool_listings: u64,
    /// Bytes answered, in their wire encoding.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    filters: AtomicU64,
    blocks: AtomicU64,
    headers: AtomicU64,
    tips: AtomicU64,
    mempool_listings: AtomicU64,
    bytes: AtomicU64,
}

/// Counts (and optionally charges for) every request to the source it
/// wraps. Cloning gives another handle on the same counters.
#[derive(Clone)]
pub struct Metered {
    inner: Arc<dyn ChainSource>,
    link: Option<LinkModel>,
    counters: Arc<Counters>,
    /// When the shared link is next free.
    link_free: Arc<Mutex<Instant>>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("link", &self.link)
            .field("meter", &self.meter())
            .finish_non_exhaustive()
    }
}

impl Metered {
    /// Counts requests to `inner`, at no cost.
    pub fn new(inner: Arc<dyn ChainSource>) -> Metered {
        Metered {
            inner,
            link: None,
            counters: Arc::default(),
            link_free: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Counts requests to `inner`, and makes each wait as `link` says.
    pub fn charging(inner: Arc<dyn ChainSource>, link: LinkModel) -> Metered {
        Metered {
            link: Some(link),
            ..Metered::new(inner)
        }
    }

    /// The counters so far.
    pub fn meter(&self) -> Meter {
        let c = &self.counters;
        Meter {
            requests: c.requests.load(Ordering::Relaxed),
            filters: c.filters.load(Ordering::Relaxed),
            blocks: c.blocks.load(Ordering::Relaxed),
            headers: c.headers.load(Ordering::Relaxed),
            tips: c.tips.load(Ordering::Relaxed),
            mempool_listings: c.mempool_listings.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    /// Counts one answer of `bytes` bytes, and waits what the link charges.
    async fn account(&self, counter: Option<&AtomicU64>, bytes: usize) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let Some(link) = self.link else { return };
        let start = Instant::now();
        let on_wire = Duration::from_secs_f64(bytes as f64 / link.bytes_per_sec as f64);
        // The answer leaves the server after the latency, then queues for
        // the link: its transfer ends when the link has carried it.
        let done = {
            let mut free = self.link_free.lock().unwrap_or_else(|e| e.into_inner());
            let begin = (*free).max(start + link.latency);
            *free = begin + on_wire;
            *free
        };
        tokio::time::sleep_until(done).await;
    }
}

#[async_trait]
impl ChainSource for Metered {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        let tip = self.inner.tip().await?;
        self.account(Some(&self.counters.tips), 36).await;
        Ok(tip)
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        let hash = self.inner.block_hash(height).await?;
        self.account(Some(&self.counters.headers), 32).await;
        Ok(hash)
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        let header = self.inner.header(hash).await?;
        self.account(Some(&self.counters.headers), 80).await;
        Ok(header)
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        let filter = self.inner.filter(hash).await?;
        self.account(Some(&self.counters.filters), filter.len())
            .await;
        Ok(filter)
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        let header = self.inner.filter_header(hash).await?;
        self.account(Some(&self.counters.headers), 32).await;
        Ok(header)
    }

    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        let headers = self.inner.filter_headers(blocks).await?;
        self.account(Some(&self.counters.headers), 32 * headers.len())
            .await;
        Ok(headers)
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        let block = self.inner.block(hash).await?;
        self.account(Some(&self.counters.blocks), block.total_size())
            .await;
        Ok(block)
    }

    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        let headers = self.inner.headers(from, count).await?;
        self.account(Some(&self.counters.headers), 80 * headers.len())
            .await;
        Ok(headers)
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let txid = self.inner.broadcast(tx).await?;
        self.account(None, 32).await;
        Ok(txid)
    }

    async fn mempool_txids(&self) -> Result<Option<Vec<Txid>>, SourceError> {
        let txids = self.inner.mempool_txids().await?;
        let len = txids.as_ref().map_or(0, Vec::len);
        self.account(Some(&self.counters.mempool_listings), 32 * len)
            .await;
        Ok(txids)
    }

    async fn mempool_news(&self, seen: u64) -> u64 {
        self.inner.mempool_news(seen).await
    }

    async fn mempool_tx(&self, txid: Txid) -> Result<Transaction, SourceError> {
        let tx = self.inner.mempool_tx(txid).await?;
        self.account(None, tx.total_size()).await;
        Ok(tx)
    }
}
