//! Fetching ahead: headers in batches, then per block its filter and filter
//! header (and, on a match, the block) in tasks that run while earlier
//! blocks are matched and committed.
//!
//! This file holds the pipeline itself and its fetch tasks; the request
//! policy, the block checks and the filter-header batches are in the
//! submodules `retry`, `checks` and `filter_headers`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bitcoin::bip158::{FilterHash, FilterHeader};
use bitcoin::hashes::Hash as _;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, BlockHash};
use lockstep_chain::{BlockId, ChainSource, SourceError};
use lockstep_filter::{BasicFilter, Watchlist, matches};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::books::{AggregateWatch, Owner};
use crate::pow::HeaderChain;
use crate::{ManagerConfig, ManagerError};

mod checks;
mod filter_headers;
mod retry;

pub(crate) use checks::fetch_block;
use filter_headers::{FilterHeaderBatch, FilterHeaders};
pub(crate) use retry::{Policy, timed, wait_true};

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
    /// Its size as served: what the filter path moves per block (the cost
    /// model weighs it against a whole block's).
    pub(crate) bytes: u64,
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
    /// Its serialised size: what the block path moves per block.
    pub(crate) bytes: u64,
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

/// How many fetch tasks may finish before the loop is woken to start
/// others in their place: an eighth of the prefetch depth. Waking it for
/// every task that finishes (2,000 wake-ups in a 2,000-block sync, most
/// of them for tasks behind the one the loop waits for) cost CPU on a
/// machine whose cores the fetch tasks already keep busy; a few tasks
/// fewer in flight cost nothing.
fn refill_slack(prefetch: usize) -> usize {
    (prefetch / 8).max(1)
}

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
    /// Signalled by a fetch task that finishes leaving [`refill_slack`] or
    /// more places free: the loop, woken, starts tasks in their place.
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
        let wake_below = spawner.prefetch - refill_slack(spawner.prefetch);
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
                let left = running.fetch_sub(1, Ordering::AcqRel) - 1;
                if left <= wake_below {
                    finished.notify_one();
                }
                result
            }));
        }
    }

    /// Awaits `work` (a batch's commit) while starting fetch tasks in place
    /// of those that finish meanwhile. Without it the cores idle once the
    /// running tasks are done: a profile of the W = 10 sync over HTTP
    /// showed gaps of 25-40 ms with no CPU used at all, each a commit
    /// (an fsync) with nothing left to fetch. Tasks started here match
    /// against the snapshot the batch was fetched with; the blocks they
    /// fetch are matched again for scripts the commit adds, as any block
    /// fetched ahead is.
    pub(crate) async fn fill_while<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        let finished = Arc::clone(&self.finished);
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = finished.notified() => self.fill(),
            }
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
            Err(e) => Err(task_failed("fetch", &e)),
        })
    }
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
        let bytes = raw.len() as u64;
        // Decoding and matching cost CPU in proportion to the watchlist
        // (milliseconds a block at a million scripts): on rayon's pool, so
        // that a runtime embedding lockstep never has a worker stalled by
        // it. Timed inside, so the cost model sees CPU, not the wait.
        let base = Arc::clone(&snapshot.base);
        let work = move || {
            let start = Instant::now();
            let filter_hash = FilterHash::hash(&raw);
            let decoded = BasicFilter::decode_for(&hash, &raw, base.len())?;
            let matched = !base.is_empty() && !matches(&decoded, &base).is_empty();
            let nanos = start.elapsed().as_nanos() as u64;
            Ok((filter_hash, decoded, matched, nanos))
        };
        // A small watchlist costs tens of microseconds a filter, about
        // what handing the work to another thread costs: done here.
        let (filter_hash, decoded, matched, match_nanos) = if snapshot.base.len() < OFFLOAD_FROM {
            work()
        } else {
            on_cpu_pool(work)
                .await
                .map_err(|e| task_failed("filter matching", &e))?
        }
        .map_err(|source| ManagerError::BadFilter {
            height,
            hash,
            source,
        })?;
        fetched.filter = Some(FetchedFilter {
            decoded,
            filter_hash,
            checked: snapshot.checked,
            matched,
            match_nanos,
            bytes,
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

/// Watched scripts from which matching a filter leaves the tokio worker
/// for rayon's pool: below it, decoding and matching cost tens of
/// microseconds (about what the hand-over costs); at 16,384 scripts about
/// 60 µs of hashing, at a million milliseconds.
pub(crate) const OFFLOAD_FROM: usize = 16_384;

/// Runs CPU work (decoding and matching a filter, checking a block) on
/// rayon's pool, one thread per core, and awaits it without blocking a
/// tokio worker.
///
/// Why not `spawn_blocking`: with 256 prefetch tasks, each would get a
/// blocking thread of its own, hundreds of threads doing CPU work on two
/// cores; the sync benchmark measured the loop at 100 wallets taking
/// 1.9 s instead of 0.96 s that way. Rayon's pool keeps the work at one
/// thread per core, as when it ran on the tokio workers, without stalling
/// them.
pub(crate) async fn on_cpu_pool<T, F>(work: F) -> Result<T, CpuTaskPanicked>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let _ = done.send(outcome);
    });
    match result.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) | Err(_) => Err(CpuTaskPanicked),
    }
}

/// CPU work on rayon's pool panicked.
#[derive(Debug)]
pub(crate) struct CpuTaskPanicked;

impl std::fmt::Display for CpuTaskPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("panicked")
    }
}

/// A task that did not return (it panicked, or the runtime is shutting
/// down): a fetch task, or CPU work run on the blocking pool. The same
/// retryable failure for both, as it was when the CPU work ran inside the
/// fetch task.
pub(crate) fn task_failed(what: &str, e: &dyn std::fmt::Display) -> Flow {
    Flow::Fail(ManagerError::Source(SourceError::Unavailable {
        reason: format!("{what} task failed: {e}"),
    }))
}
