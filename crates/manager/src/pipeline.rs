//! Fetching ahead: headers in batches, then per block its filter and filter
//! header (and, on a match, the block) in tasks that run while earlier
//! blocks are matched and committed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bitcoin::bip158::{FilterHash, FilterHeader};
use bitcoin::hashes::Hash as _;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, BlockHash};
use lockstep_chain::{BlockId, ChainSource, Missing, SourceError};
use lockstep_filter::{BasicFilter, Watchlist, matches};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::books::{AggregateWatch, Owner};
use crate::pow::HeaderChain;
use crate::{ManagerConfig, ManagerError};

/// Why a scan stopped short of committing a batch. Only `Fail` leaves the
/// manager; the others are handled by the loop or the import.
#[derive(Debug)]
pub(crate) enum Flow {
    /// The source's headers no longer extend the ones the scan holds.
    Reorg,
    /// Something fetched ahead is gone from the source's best chain:
    /// forget what was fetched ahead and look again. Carries the source's
    /// `NotFound` when there was one: if looking again keeps finding it
    /// missing from the source's own best chain (a filter index behind its
    /// block index), that error goes up after bounded retries.
    Reset(Option<SourceError>),
    /// The manager is stopping: abandon the batch, commit nothing.
    Stop,
    /// A real error.
    Fail(ManagerError),
}

impl From<ManagerError> for Flow {
    fn from(e: ManagerError) -> Self {
        Flow::Fail(e)
    }
}

impl From<SourceError> for Flow {
    fn from(e: SourceError) -> Self {
        match e {
            e @ SourceError::NotFound(_) => Flow::Reset(Some(e)),
            e => Flow::Fail(ManagerError::Source(e)),
        }
    }
}

/// How the blocks of a scan are examined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Filter first; the block only on a match.
    Filters,
    /// The block itself, always.
    Blocks,
}

/// A block's filter, checked and matched in a prefetch task.
#[derive(Debug)]
pub(crate) struct FetchedFilter {
    pub(crate) decoded: BasicFilter,
    pub(crate) filter_hash: FilterHash,
    /// How many watch-log entries the match covered.
    pub(crate) checked: usize,
    pub(crate) matched: bool,
    /// CPU time of decoding and matching (not of fetching).
    pub(crate) match_nanos: u64,
}

/// One block's worth of prefetched data.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) height: u32,
    pub(crate) hash: BlockHash,
    /// Its header's difficulty target, recorded with its hash (the loop
    /// weighs its branch's work against a source's).
    pub(crate) bits: CompactTarget,
    /// `None` on the block path, or when nothing was watched at all.
    pub(crate) filter: Option<FetchedFilter>,
    /// The source's filter header for this block, once its filter was
    /// checked against it.
    pub(crate) filter_header: Option<FilterHeader>,
    pub(crate) block: Option<Arc<Block>>,
    /// What fetching the block cost, when it was fetched.
    pub(crate) block_timing: Option<BlockTiming>,
}

/// What one block cost on the block path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockTiming {
    /// Wall time of the request: near zero for a source in the process or
    /// next door, a network round trip and transfer for a remote one.
    pub(crate) fetch_nanos: u64,
    /// CPU time of checking it against its header.
    pub(crate) check_nanos: u64,
}

impl Fetched {
    /// Whether this block must be routed to wallets: its filter matches a
    /// watched script (including any added since it was matched), or it
    /// was fetched on the block path, or it was never examined while
    /// something is watched now.
    pub(crate) fn needs_block(&self, watch: &AggregateWatch) -> bool {
        match &self.filter {
            Some(f) => f.matched || watch.unchecked_match(&f.decoded, f.checked),
            None => self.block.is_some() || watch.len() > 0,
        }
    }
}

/// What a prefetch task matches against.
#[derive(Clone)]
pub(crate) struct Snapshot {
    pub(crate) base: Arc<Watchlist<Owner>>,
    pub(crate) checked: usize,
    pub(crate) path: Path,
    /// Nothing is watched: fetch nothing.
    pub(crate) idle: bool,
}

/// The filter headers of one batch of headers.
struct FilterHeaderBatch {
    /// Never empty; shared with the task asking for them.
    blocks: Arc<[BlockId]>,
    state: FilterHeaders,
}

impl FilterHeaderBatch {
    fn first(&self) -> u32 {
        self.blocks[0].height
    }

    /// The height after the batch's last block.
    fn end(&self) -> u32 {
        self.first().saturating_add(self.blocks.len() as u32)
    }
}

enum FilterHeaders {
    /// Not asked for yet (the scan was on the block path): asked when
    /// first needed.
    NotAsked,
    /// On their way.
    Asked(JoinHandle<Result<Vec<FilterHeader>, SourceError>>),
    Got(Vec<FilterHeader>),
    /// Asked twice and failed: each block asks alone.
    Failed,
}

/// How a pipeline starts fetch tasks: the last source, policy and snapshot
/// it was given.
struct Spawner {
    source: Arc<dyn ChainSource>,
    policy: Policy,
    snapshot: Snapshot,
    prefetch: usize,
}

/// Finished fetches kept waiting for their turn, per running one: blocks
/// are consumed in order, and a block whose fetch is slow (its filter
/// matched, so its block is on the way) must not stop the tasks behind it
/// from starting, or the cores idle while it arrives.
const FINISHED_PER_RUNNING: usize = 4;

/// The blocks after `next_header - 1` that a scan has headers for, and
/// the tasks fetching their filters and blocks.
pub(crate) struct Pipeline {
    next_header: u32,
    last_hash: BlockHash,
    stop_at: Option<u32>,
    at_source_tip: bool,
    /// Checks each header's proof of work as it arrives.
    pow: HeaderChain,
    headers: VecDeque<(u32, BlockHash, CompactTarget)>,
    /// Per batch of headers not yet behind the scan, the request for their
    /// filter headers, oldest first: one request per batch instead of one
    /// per block, running while the filters are fetched and matched.
    filter_headers: VecDeque<FilterHeaderBatch>,
    /// Whether a new batch asks for its filter headers at once (the
    /// filter path) or when first needed.
    ask_filter_headers: bool,
    inflight: VecDeque<JoinHandle<Result<Fetched, Flow>>>,
    ready: VecDeque<Fetched>,
    spawner: Option<Spawner>,
    /// Signalled by every fetch task as it finishes.
    finished: Arc<tokio::sync::Notify>,
    /// Fetch tasks not yet finished (each decrements it as it ends).
    running: Arc<AtomicUsize>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for task in &self.inflight {
            task.abort();
        }
        self.forget_filter_headers(u32::MAX);
    }
}

impl Pipeline {
    /// A pipeline for the blocks after `after` (whose hash is `after_hash`),
    /// up to `stop_at` if given; `pow` holds the headers up to `after` that
    /// the next headers' difficulty depends on.
    pub(crate) fn new(
        after: u32,
        after_hash: BlockHash,
        stop_at: Option<u32>,
        pow: HeaderChain,
    ) -> Pipeline {
        Pipeline {
            next_header: after + 1,
            last_hash: after_hash,
            stop_at,
            at_source_tip: false,
            pow,
            headers: VecDeque::new(),
            filter_headers: VecDeque::new(),
            ask_filter_headers: true,
            inflight: VecDeque::new(),
            ready: VecDeque::new(),
            spawner: None,
            finished: Arc::new(tokio::sync::Notify::new()),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether nothing has been fetched past the scan's committed point.
    pub(crate) fn is_fresh(&self, committed: u32) -> bool {
        self.next_header == committed + 1
    }

    /// Blocks known and not yet handed out.
    pub(crate) fn pending(&self) -> usize {
        self.headers.len() + self.inflight.len() + self.ready.len()
    }

    /// The highest height with a known header.
    pub(crate) fn known_height(&self) -> u32 {
        self.next_header - 1
    }

    /// Whether the last header request found the source's tip.
    pub(crate) fn at_source_tip(&self) -> bool {
        self.at_source_tip
    }

    /// Puts back blocks a batch could not take yet, in order.
    pub(crate) fn unread(&mut self, items: Vec<Fetched>) {
        for item in items.into_iter().rev() {
            self.ready.push_front(item);
        }
    }

    /// The source's filter header for `block`, one of this pipeline's: from
    /// the request made with its header (waited for if still on its way;
    /// asked again, once, if it failed), or asked alone if none covers it.
    pub(crate) async fn filter_header(
        &mut self,
        source: &Arc<dyn ChainSource>,
        config: &ManagerConfig,
        stop: &watch::Receiver<bool>,
        block: BlockId,
    ) -> Result<FilterHeader, Flow> {
        self.forget_filter_headers(block.height);
        let policy = &Policy::of(config, stop);
        let Some(batch) = self
            .filter_headers
            .front_mut()
            .filter(|b| b.first() <= block.height)
        else {
            return Ok(timed(policy, || source.filter_header(block.hash)).await?);
        };
        let at = (block.height - batch.first()) as usize;
        if batch.blocks[at] != block {
            // Not the block this pipeline fetched at that height.
            return Err(Flow::Reset(None));
        }
        let answer = match &mut batch.state {
            FilterHeaders::NotAsked => {
                Some(timed(policy, || source.filter_headers(&batch.blocks)).await)
            }
            FilterHeaders::Asked(task) => Some(match task.await {
                Ok(Err(e)) if e.is_retryable() => {
                    timed(policy, || source.filter_headers(&batch.blocks)).await
                }
                Ok(answer) => answer,
                Err(e) => Err(SourceError::Unavailable {
                    reason: format!("filter header task failed: {e}"),
                }),
            }),
            FilterHeaders::Got(_) | FilterHeaders::Failed => None,
        };
        if let Some(answer) = answer {
            // Whatever the answer, this request is over.
            batch.state = FilterHeaders::Failed;
            let headers = answer?;
            if headers.len() != batch.blocks.len() {
                return Err(Flow::Fail(ManagerError::Source(SourceError::Invalid {
                    what: Missing::FilterHeader(batch.blocks[0].hash),
                    reason: format!(
                        "{} filter headers for {} blocks",
                        headers.len(),
                        batch.blocks.len()
                    ),
                })));
            }
            batch.state = FilterHeaders::Got(headers);
        }
        match &batch.state {
            FilterHeaders::Got(headers) => Ok(headers[at]),
            _ => Ok(timed(policy, || source.filter_header(block.hash)).await?),
        }
    }

    /// Drops the filter-header batches wholly below `height`: the scan has
    /// passed them.
    pub(crate) fn forget_filter_headers(&mut self, height: u32) {
        while self
            .filter_headers
            .front()
            .is_some_and(|b| b.end() <= height)
        {
            if let Some(FilterHeaderBatch {
                state: FilterHeaders::Asked(task),
                ..
            }) = self.filter_headers.pop_front()
            {
                task.abort();
            }
        }
    }

    /// Asks for more headers when fewer than `prefetch` are waiting, then
    /// (on the filter path, in a task of its own) for those blocks' filter
    /// headers in one more request.
    pub(crate) async fn top_up_headers(
        &mut self,
        source: &Arc<dyn ChainSource>,
        config: &ManagerConfig,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Flow> {
        if self.headers.len() >= config.prefetch {
            return Ok(());
        }
        let mut count = config.header_batch.max(1);
        if let Some(stop) = self.stop_at {
            if self.next_header > stop {
                self.at_source_tip = true;
                return Ok(());
            }
            count = count.min(stop - self.next_header + 1);
        }
        let policy = Policy::of(config, stop);
        let headers = match timed(&policy, || source.headers(self.next_header, count)).await {
            Ok(headers) => headers,
            Err(SourceError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let at_source_tip = headers.len() < count as usize;
        let mut blocks = Vec::with_capacity(headers.len());
        let mut last_hash = self.last_hash;
        let mut reorg = false;
        let mut refused = None;
        let mut bits = Vec::with_capacity(headers.len());
        for header in headers {
            if header.prev_blockhash != last_hash {
                reorg = true;
                break;
            }
            let height = self.next_header + blocks.len() as u32;
            let hash = header.block_hash();
            if let Err(reason) = self.pow.connect(height, &header, hash) {
                refused = Some(ManagerError::BadHeader {
                    height,
                    hash,
                    reason,
                });
                break;
            }
            last_hash = hash;
            blocks.push(BlockId { height, hash });
            bits.push(header.bits);
        }
        self.at_source_tip = at_source_tip && refused.is_none();
        for (block, bits) in blocks.iter().zip(bits) {
            self.headers.push_back((block.height, block.hash, bits));
            self.last_hash = block.hash;
            self.next_header += 1;
        }
        if !blocks.is_empty() {
            let blocks: Arc<[BlockId]> = blocks.into();
            let state = if self.ask_filter_headers {
                let source = Arc::clone(source);
                let asked = Arc::clone(&blocks);
                let policy = policy.clone();
                FilterHeaders::Asked(tokio::spawn(async move {
                    timed(&policy, || source.filter_headers(&asked)).await
                }))
            } else {
                FilterHeaders::NotAsked
            };
            self.filter_headers
                .push_back(FilterHeaderBatch { blocks, state });
        }
        if let Some(refused) = refused {
            // The headers before it are good; nothing from it on is taken.
            return Err(Flow::Fail(refused));
        }
        if reorg {
            return Err(Flow::Reorg);
        }
        Ok(())
    }

    /// Starts fetch tasks until `prefetch` are running (and no more than
    /// [`FINISHED_PER_RUNNING`] times that wait to be taken), matching
    /// against `snapshot` from now on.
    pub(crate) fn spawn(
        &mut self,
        source: &Arc<dyn ChainSource>,
        config: &ManagerConfig,
        stop: &watch::Receiver<bool>,
        snapshot: &Snapshot,
    ) {
        self.ask_filter_headers = snapshot.path == Path::Filters && !snapshot.idle;
        self.spawner = Some(Spawner {
            source: Arc::clone(source),
            policy: Policy::of(config, stop),
            snapshot: snapshot.clone(),
            prefetch: config.prefetch.max(1),
        });
        self.fill();
    }

    fn fill(&mut self) {
        let Some(spawner) = &self.spawner else {
            return;
        };
        while self.running.load(Ordering::Acquire) < spawner.prefetch
            && self.inflight.len() < spawner.prefetch * FINISHED_PER_RUNNING
        {
            let Some((height, hash, bits)) = self.headers.pop_front() else {
                break;
            };
            let task = fetch(
                Arc::clone(&spawner.source),
                BlockId { height, hash },
                bits,
                spawner.snapshot.clone(),
                spawner.policy.clone(),
            );
            let (finished, running) = (Arc::clone(&self.finished), Arc::clone(&self.running));
            running.fetch_add(1, Ordering::AcqRel);
            self.inflight.push_back(tokio::spawn(async move {
                let result = task.await;
                running.fetch_sub(1, Ordering::AcqRel);
                finished.notify_one();
                result
            }));
        }
    }

    /// The next block in order, once fetched; `None` if none is known.
    pub(crate) async fn next(
        &mut self,
        stop: Option<&mut watch::Receiver<bool>>,
    ) -> Option<Result<Fetched, Flow>> {
        if let Some(item) = self.ready.pop_front() {
            return Some(Ok(item));
        }
        let mut stop = stop;
        let finished = Arc::clone(&self.finished);
        let joined = loop {
            // While the next block in order is on its way, start tasks in
            // place of those that finished behind it.
            let joined = {
                let task = self.inflight.front_mut()?;
                match stop.as_deref_mut() {
                    Some(stop) => tokio::select! {
                        joined = task => Some(joined),
                        _ = finished.notified() => None,
                        _ = wait_true(stop) => return Some(Err(Flow::Stop)),
                    },
                    None => tokio::select! {
                        joined = task => Some(joined),
                        _ = finished.notified() => None,
                    },
                }
            };
            match joined {
                Some(joined) => break joined,
                None => self.fill(),
            }
        };
        self.inflight.pop_front();
        Some(match joined {
            Ok(result) => result,
            Err(e) => Err(Flow::Fail(ManagerError::Source(SourceError::Unavailable {
                reason: format!("fetch task failed: {e}"),
            }))),
        })
    }
}

/// Resolves once the stop flag is set.
pub(crate) async fn wait_true(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How one request to the source is made: its deadline, how often a
/// retryable failure is tried again (with a growing pause) before the
/// batch it belongs to gives up, and the manager's stop flag, which ends
/// it at once.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) stop: watch::Receiver<bool>,
}

impl Policy {
    pub(crate) fn of(config: &ManagerConfig, stop: &watch::Receiver<bool>) -> Policy {
        Policy {
            timeout: config.request_timeout,
            retries: config.request_retries,
            backoff: config.initial_backoff,
            stop: stop.clone(),
        }
    }
}

/// What a request ended by [`Manager::stop`](crate::Manager::stop) returns:
/// retryable, and the caller, seeing the stop flag, stops instead.
pub(crate) fn stopping() -> SourceError {
    SourceError::Unavailable {
        reason: "the manager is stopping".to_owned(),
    }
}

/// A source request with a deadline, retried while it fails retryably;
/// the request in flight (or the pause before a retry) is abandoned as
/// soon as the manager is asked to stop.
pub(crate) async fn timed<T, F, Fut>(policy: &Policy, mut request: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut stop = policy.stop.clone();
    let attempts = async {
        let mut attempt = 0;
        loop {
            let result = match tokio::time::timeout(policy.timeout, request()).await {
                Ok(result) => result,
                Err(_) => Err(SourceError::Timeout {
                    after_ms: policy.timeout.as_millis() as u64,
                }),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < policy.retries => {
                    attempt += 1;
                    tokio::time::sleep(policy.backoff * attempt).await;
                }
                result => return result,
            }
        }
    };
    tokio::select! {
        biased;
        _ = wait_true(&mut stop) => Err(stopping()),
        result = attempts => result,
    }
}

/// Fetches and checks one block, as the source committed to it.
pub(crate) async fn fetch_block(
    source: &Arc<dyn ChainSource>,
    height: u32,
    hash: BlockHash,
    policy: &Policy,
) -> Result<(Arc<Block>, BlockTiming), Flow> {
    let start = Instant::now();
    let block = timed(policy, || source.block(hash)).await?;
    let fetched = Instant::now();
    if block.block_hash() != hash {
        return Err(Flow::Fail(ManagerError::BadBlock {
            height,
            hash,
            reason: "its header does not hash to the block asked for",
        }));
    }
    if let Err(reason) = check_merkle_root(&block).and_then(|()| check_amounts(&block)) {
        return Err(Flow::Fail(ManagerError::BadBlock {
            height,
            hash,
            reason,
        }));
    }
    let timing = BlockTiming {
        fetch_nanos: (fetched - start).as_nanos() as u64,
        check_nanos: fetched.elapsed().as_nanos() as u64,
    };
    Ok((block, timing))
}

/// Checks that `block`'s transactions hash to its header's merkle root, and
/// that no two sibling nodes of the tree are equal: a block whose last
/// transactions are repeated has the same root as the real one (CVE-2012-
/// 2459), so a source could pass off such a copy; Core refuses it as
/// mutated, and so does this (`Block::check_merkle_root` does not).
///
/// Each transaction is serialised without its witness into one reused
/// buffer and hashed in one call: `Block::check_merkle_root` feeds the
/// SHA-256 engine field by field, and with the copies that makes it was a
/// tenth of a 100-wallet sync.
pub(crate) fn check_merkle_root(block: &Block) -> Result<(), &'static str> {
    use bitcoin::consensus::Encodable as _;
    use bitcoin::hashes::sha256d;

    const MISMATCH: &str = "its transactions do not match its header's merkle root";
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut level = Vec::with_capacity(block.txdata.len() + 1);
    for tx in &block.txdata {
        buf.clear();
        // The txid's serialisation: no marker, flag or witness (`TxIn`
        // encodes none of them). Writing to a Vec cannot fail; were it to,
        // the block is refused.
        let encoded = tx.version.consensus_encode(&mut buf).is_ok()
            && tx.input.consensus_encode(&mut buf).is_ok()
            && tx.output.consensus_encode(&mut buf).is_ok()
            && tx.lock_time.consensus_encode(&mut buf).is_ok();
        if !encoded {
            return Err(MISMATCH);
        }
        level.push(sha256d::Hash::hash(&buf).to_byte_array());
    }
    if level.is_empty() {
        return Err("it has no transactions");
    }
    let mut mutated = false;
    let mut pair = [0u8; 64];
    while level.len() > 1 {
        mutated |= level.chunks_exact(2).any(|p| p[0] == p[1]);
        if level.len() % 2 == 1 {
            level.push(level[level.len() - 1]);
        }
        for i in 0..level.len() / 2 {
            pair[..32].copy_from_slice(&level[2 * i]);
            pair[32..].copy_from_slice(&level[2 * i + 1]);
            level[i] = sha256d::Hash::hash(&pair).to_byte_array();
        }
        level.truncate(level.len() / 2);
    }
    if level[0] != block.header.merkle_root.to_byte_array() {
        return Err(MISMATCH);
    }
    if mutated {
        return Err("it repeats transactions: its merkle tree is mutated (CVE-2012-2459)");
    }
    Ok(())
}

/// The money supply in satoshis (Core's `MAX_MONEY`).
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// Checks every amount a block holds as Core's `CheckTransaction` does:
/// each output at most 21 million BTC, and so is each transaction's sum
/// of outputs. A source controls these numbers; above the supply they are
/// a lie (and would overflow sums or be clamped on their way into the
/// database), so the block is refused.
pub(crate) fn check_amounts(block: &Block) -> Result<(), &'static str> {
    for tx in &block.txdata {
        let mut sum: u64 = 0;
        for out in &tx.output {
            let value = out.value.to_sat();
            if value > MAX_MONEY {
                return Err("an output pays more than the 21 million BTC supply");
            }
            sum = sum
                .checked_add(value)
                .filter(|sum| *sum <= MAX_MONEY)
                .ok_or("a transaction's outputs add up to more than the 21 million BTC supply")?;
        }
    }
    Ok(())
}

/// One prefetch task: the filter, decoded and matched; the block too on a
/// match or on the block path.
async fn fetch(
    source: Arc<dyn ChainSource>,
    block: BlockId,
    bits: CompactTarget,
    snapshot: Snapshot,
    policy: Policy,
) -> Result<Fetched, Flow> {
    let BlockId { height, hash } = block;
    let mut fetched = Fetched {
        height,
        hash,
        bits,
        filter: None,
        filter_header: None,
        block: None,
        block_timing: None,
    };
    if snapshot.idle {
        return Ok(fetched);
    }
    if snapshot.path == Path::Filters {
        let raw = timed(&policy, || source.filter(hash)).await?;
        let start = Instant::now();
        let filter_hash = FilterHash::hash(&raw);
        let decoded =
            BasicFilter::decode_for(&hash, &raw, snapshot.base.len()).map_err(|source| {
                ManagerError::BadFilter {
                    height,
                    hash,
                    source,
                }
            })?;
        // On this task's thread: blocks are matched in parallel across
        // tasks already, and handing the work to rayon would park a tokio
        // worker (and the timers and fetches it drives) while it waits.
        let matched = !snapshot.base.is_empty() && !matches(&decoded, &snapshot.base).is_empty();
        fetched.filter = Some(FetchedFilter {
            decoded,
            filter_hash,
            checked: snapshot.checked,
            matched,
            match_nanos: start.elapsed().as_nanos() as u64,
        });
        if !matched {
            return Ok(fetched);
        }
    }
    let (block, timing) = fetch_block(&source, height, hash, &policy).await?;
    fetched.block = Some(block);
    fetched.block_timing = Some(timing);
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash as _;
    use bitcoin::{Amount, OutPoint, ScriptBuf, Transaction, TxIn, TxMerkleNode, TxOut, Witness};

    use super::*;

    fn block_of(txdata: Vec<Transaction>) -> Block {
        let mut block = Block {
            header: bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest).header,
            txdata,
        };
        block.header.merkle_root = block
            .compute_merkle_root()
            .unwrap_or(TxMerkleNode::all_zeros());
        block
    }

    fn tx(n: u8, witness: bool) -> Transaction {
        Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::from_consensus(u32::from(n)),
            input: vec![TxIn {
                previous_output: OutPoint::new(bitcoin::Txid::from_byte_array([n; 32]), 1),
                witness: if witness {
                    Witness::from_slice(&[vec![n; 72], vec![2; 33]])
                } else {
                    Witness::new()
                },
                ..Default::default()
            }],
            output: vec![TxOut {
                value: Amount::from_sat(1_000 + u64::from(n)),
                script_pubkey: ScriptBuf::from_bytes(vec![0x00, 0x14, n, 1, 2, 3]),
            }],
        }
    }

    /// On the block path a batch's filter headers are not asked for; when
    /// needed at last (the path switched) the whole batch is one request;
    /// and batches behind the scan are dropped, so a long block-path scan
    /// holds none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filter_headers_are_asked_per_batch_when_needed_and_forgotten_behind() {
        use lockstep_chain::metered::Metered;
        use lockstep_chain::{SimChain, SimParams};

        let chain = SimChain::generate(SimParams::unsigned(3), 130).unwrap();
        let metered = Metered::new(Arc::new(chain.clone()));
        let source: Arc<dyn ChainSource> = Arc::new(metered.clone());
        let config = ManagerConfig {
            header_batch: 50,
            prefetch: 200,
            ..ManagerConfig::default()
        };
        let (_keep, stop) = watch::channel(false);
        let pow = HeaderChain::new(bitcoin::Network::Regtest);
        let mut pipe = Pipeline::new(0, chain.hash_at(0).unwrap(), None, pow);
        pipe.ask_filter_headers = false;
        pipe.top_up_headers(&source, &config, &stop).await.unwrap();
        pipe.top_up_headers(&source, &config, &stop).await.unwrap();
        assert_eq!(pipe.filter_headers.len(), 2);
        assert_eq!(metered.meter().headers, 2, "block headers only");
        for height in 1..=50 {
            let block = BlockId {
                height,
                hash: chain.hash_at(height).unwrap(),
            };
            let header = pipe
                .filter_header(&source, &config, &stop, block)
                .await
                .unwrap();
            assert_eq!(Some(header), chain.filter_header_at(height));
        }
        assert_eq!(metered.meter().headers, 3, "one request for 50");
        // A block the pipeline did not fetch at that height: start again.
        let stranger = BlockId {
            height: 60,
            hash: chain.hash_at(61).unwrap(),
        };
        assert!(matches!(
            pipe.filter_header(&source, &config, &stop, stranger).await,
            Err(Flow::Reset(None))
        ));
        pipe.forget_filter_headers(101);
        assert!(pipe.filter_headers.is_empty());
    }

    #[test]
    fn merkle_check_agrees_with_rust_bitcoin_and_refuses_any_change() {
        let merkle_root_matches = |block: &Block| check_merkle_root(block).is_ok();
        // Witness transactions (whose txid leaves the witness out), legacy
        // ones, one alone, and an odd count (the last is paired with itself).
        for txdata in [
            vec![tx(1, true)],
            vec![tx(1, false), tx(2, true), tx(3, true)],
            (0..8).map(|n| tx(n, n % 2 == 0)).collect(),
        ] {
            let block = block_of(txdata);
            assert!(block.check_merkle_root());
            assert!(merkle_root_matches(&block));
            // A changed witness keeps the txid, so the root still matches.
            let mut rewitnessed = block.clone();
            rewitnessed.txdata[0].input[0].witness = Witness::from_slice(&[vec![9u8; 10]]);
            assert!(merkle_root_matches(&rewitnessed));
            // Any change to what the txid covers is refused.
            let mut paid_elsewhere = block.clone();
            paid_elsewhere.txdata[0].output[0].value = Amount::from_sat(1);
            assert!(!merkle_root_matches(&paid_elsewhere));
            let mut dropped = block.clone();
            dropped.txdata.pop();
            assert!(!merkle_root_matches(&dropped));
            let mut wrong_header = block.clone();
            wrong_header.header.merkle_root = TxMerkleNode::all_zeros();
            assert!(!merkle_root_matches(&wrong_header));
        }
        assert!(
            !merkle_root_matches(&block_of(Vec::new())),
            "no transactions"
        );
    }

    /// A block whose last transactions are repeated keeps its merkle root
    /// (rust-bitcoin's check passes it); the check refuses it as mutated.
    #[test]
    fn a_block_repeating_its_last_transactions_is_refused() {
        for (count, repeat) in [(3, 1), (5, 1), (6, 2), (2, 0)] {
            let txdata: Vec<_> = (0..count).map(|n| tx(n, n % 2 == 1)).collect();
            let block = block_of(txdata);
            assert_eq!(check_merkle_root(&block), Ok(()), "{count} transactions");
            let mut mutated = block.clone();
            let tail = block.txdata[block.txdata.len() - repeat.max(1)..].to_vec();
            if repeat == 0 {
                // Two equal transactions side by side at the bottom.
                mutated.txdata[1] = mutated.txdata[0].clone();
                mutated.header.merkle_root = mutated
                    .compute_merkle_root()
                    .unwrap_or(TxMerkleNode::all_zeros());
            } else {
                mutated.txdata.extend(tail);
                assert!(mutated.check_merkle_root(), "same root, {count}+{repeat}");
            }
            let err = check_merkle_root(&mutated).unwrap_err();
            assert!(err.contains("mutated"), "{count}+{repeat}: {err}");
        }
    }
}
