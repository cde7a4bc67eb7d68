//! The loop's state and its steps: connect a batch, follow a reorg, run an
//! import. One `Engine` lives behind the manager's mutex; whoever holds the
//! mutex holds the world still (the loop between two batches, or an
//! import for as long as it runs).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bitcoin::bip158::FilterHeader;
use bitcoin::hashes::Hash as _;
use bitcoin::pow::{CompactTarget, Work};
use bitcoin::{BlockHash, ScriptBuf};
use lockstep_chain::{BlockId, ChainSource, Missing, SourceError};
use lockstep_store::{LoopClaim, Store, WalletId, WalletRow, WriteTx};
use lockstep_wallet::{IngestSummary, Keychain, Wallet, WalletParams};
use tokio::sync::{broadcast, watch};

use crate::books::Books;
use crate::config::Strategy;
use crate::connect::{Mode, Outcome, connect_batch};
use crate::events::Counters;
use crate::pipeline::{
    Fetched, Flow, Path, Pipeline, Policy, Snapshot, fetch_block, timed, wait_true,
};
use crate::pow::{HeaderChain, Link, no_work, work_of};
use crate::{BlockHook, Event, ManagerConfig, ManagerError, NewWallet, ScriptImport, Status};

/// The loop's committed tip.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tip {
    pub(crate) height: u32,
    pub(crate) hash: BlockHash,
}

/// What a step of the loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    /// Committed blocks (or followed a reorg): step again at once.
    Progress,
    /// At the source's tip: wait for a new block.
    AtTip,
    /// Stopped before committing anything.
    Stopped,
}

/// Where the manager tells the world what happened.
pub(crate) struct Outputs {
    pub(crate) counters: Counters,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) tip: watch::Sender<Option<BlockId>>,
}

impl Outputs {
    fn publish(&self, event: Event) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    /// What one block did to each wallet it touched.
    fn publish_activity(&self, height: u32, activity: &[(WalletId, IngestSummary)]) {
        for (wallet, summary) in activity {
            self.publish(Event::WalletActivity {
                wallet: *wallet,
                height,
                txids: summary.txids.clone(),
                received: summary.received,
                sent: summary.sent,
            });
        }
    }
}

/// A running average of one path's cost per block, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Ema {
    value: f64,
    samples: u32,
}

impl Ema {
    fn add(&mut self, nanos: u64) {
        self.samples += 1;
        let alpha = 1.0 / f64::from(self.samples.min(64));
        self.value += alpha * (nanos as f64 - self.value);
    }
}

/// The measured costs behind the per-block strategy. Fetches overlap (the
/// pipeline keeps many in flight), so what limits throughput is CPU, and for
/// a remote source the link: the filter path costs decoding and hashing
/// every watched script; the block path costs checking and routing every
/// block, and moving every block over the link.
#[derive(Debug, Clone, Copy, Default)]
struct CostModel {
    /// CPU per block of decoding and matching a filter.
    filter: Ema,
    /// Watched scripts when `filter` was last measured (it grows with them).
    filter_scripts: usize,
    /// Wall time of a block request.
    block_fetch: Ema,
    /// CPU per block of checking a block against its header.
    block_check: Ema,
    /// CPU of routing a block that touches no wallet.
    route: Ema,
}

impl CostModel {
    /// The path the next blocks should take, from `path`, with `scripts`
    /// watched: the block path is taken only from a local source and when
    /// it is a quarter cheaper, and left the same way.
    fn next_path(&self, path: Path, scripts: usize) -> Path {
        if self.block_check.samples < 8 || self.filter.samples == 0 {
            return path;
        }
        // Filter cost grows with the watchlist; scale the last measurement.
        let filter = self.filter.value * scripts.max(1) as f64 / self.filter_scripts.max(1) as f64;
        let block = self.block_check.value + self.route.value;
        let local = self.block_fetch.value < LOCAL_BLOCK_FETCH_NS;
        match path {
            Path::Filters if local && block * 1.25 < filter => Path::Blocks,
            Path::Blocks if !local || block > filter * 1.25 => Path::Filters,
            path => path,
        }
    }
}

/// A block request answered faster than this comes from a source in the
/// process or next door, where moving a whole block costs next to nothing;
/// a slower one crosses a network, and the filter path stays (fetching
/// every block would move ~100× the bytes of its filter).
const LOCAL_BLOCK_FETCH_NS: f64 = 200_000.0;

pub(crate) struct Engine {
    pub(crate) store: Store,
    pub(crate) source: Arc<dyn ChainSource>,
    pub(crate) config: ManagerConfig,
    pub(crate) hook: Option<Arc<dyn BlockHook>>,
    pub(crate) out: Arc<Outputs>,
    /// The active wallets; `None` after a failed write, until reloaded.
    books: Option<Books>,
    tip: Option<Tip>,
    /// The filter header of the tip, when known.
    tip_filter_header: Option<FilterHeader>,
    /// The recent blocks: hash, and difficulty target where known.
    recent: BTreeMap<u32, (BlockHash, Option<CompactTarget>)>,
    pipe: Option<Pipeline>,
    started: bool,
    cost: CostModel,
    path: Path,
    /// The manager's stop flag: requests in flight end at once, imports
    /// at their next block boundary.
    stop: watch::Receiver<bool>,
    /// The right to run the loop on this database; `None` until taken (a
    /// manager that cannot take it only registers wallets).
    claim: Option<LoopClaim>,
    /// The registry version the books last followed.
    registry_seen: Option<u64>,
    /// Some wallet is marked importing and no import of it runs: finished
    /// before the loop goes on (after a hiccup, a restart, a stop, or a
    /// registration by another process).
    pending_imports: bool,
    /// Scans started again in a row because something was not found on
    /// the source's best chain; bounded, then the error goes up.
    resets: u32,
}

impl Engine {
    pub(crate) fn new(
        store: Store,
        source: Arc<dyn ChainSource>,
        config: ManagerConfig,
        out: Arc<Outputs>,
        stop: watch::Receiver<bool>,
    ) -> Engine {
        let path = initial_path(config.strategy);
        Engine {
            store,
            source,
            config,
            hook: None,
            out,
            books: None,
            tip: None,
            tip_filter_header: None,
            recent: BTreeMap::new(),
            pipe: None,
            started: false,
            cost: CostModel::default(),
            path,
            stop,
            claim: None,
            registry_seen: None,
            pending_imports: false,
            resets: 0,
        }
    }

    /// How this engine's requests are made.
    pub(crate) fn policy(&self) -> Policy {
        Policy::of(&self.config, &self.stop)
    }

    /// Whether the manager was asked to stop.
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits `wait`, or less if the manager is asked to stop.
    async fn pause(&self, wait: std::time::Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wait_true(&mut stop) => {}
        }
    }

    /// Takes the right to run the loop on this database, or says who has
    /// it. Taken again after [`release_claim`](Self::release_claim), what
    /// this engine knows is kept only if the committed tip did not move
    /// meanwhile (another loop ran); wallets registered meanwhile are
    /// followed through the registry as always.
    async fn claim_loop(&mut self) -> Result<(), ManagerError> {
        if self.claim.is_some() {
            return Ok(());
        }
        let claim = self
            .store
            .try_claim_loop()?
            .ok_or(ManagerError::LoopElsewhere)?;
        self.claim = Some(claim);
        if self.started {
            let committed = self.store.read(|tx| tx.tip()).await?;
            let ours = self.tip.map(|t| (t.height, t.hash.to_byte_array()));
            if committed != ours {
                self.started = false;
            }
        }
        Ok(())
    }

    /// Whether this engine runs the loop (it holds the claim, or takes it
    /// now); `false` when another manager does, and this one only writes.
    async fn owns_loop(&mut self) -> Result<bool, ManagerError> {
        match self.claim_loop().await {
            Ok(()) => Ok(true),
            Err(ManagerError::LoopElsewhere) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Lets another manager run the loop (this one registered wallets or
    /// started an import but runs no loop): a process that only registers
    /// must not keep a daemon from starting.
    pub(crate) fn release_claim(&mut self) {
        self.claim = None;
        self.pipe = None;
    }

    /// The headers below `after + 1` that the difficulty rules read (none
    /// on regtest), fetched from the source and checked to chain to
    /// `after_hash`, which the caller trusts.
    async fn header_chain(
        &self,
        after: u32,
        after_hash: BlockHash,
    ) -> Result<HeaderChain, ManagerError> {
        let mut chain = HeaderChain::new(self.config.network);
        let history = chain.history();
        if history == 0 {
            return Ok(chain);
        }
        let from = (after + 1).saturating_sub(history);
        let count = after - from + 1;
        // In requests of `header_batch` (Core's REST serves 2,000 at most).
        let mut headers = Vec::with_capacity(count as usize);
        while headers.len() < count as usize {
            let next = from + headers.len() as u32;
            let ask = (count - headers.len() as u32).min(self.config.header_batch.max(1));
            let got = timed(&self.policy(), || self.source.headers(next, ask)).await?;
            if got.is_empty() {
                break;
            }
            headers.extend(got);
        }
        headers.truncate(count as usize);
        let chains = headers.len() == count as usize
            && headers
                .windows(2)
                .all(|w| w[1].prev_blockhash == w[0].block_hash())
            && headers.last().is_some_and(|h| h.block_hash() == after_hash);
        if !chains {
            return Err(ManagerError::Source(SourceError::NotFound(
                Missing::Header(after_hash),
            )));
        }
        chain.seed(
            headers
                .iter()
                .enumerate()
                .map(|(i, h)| Link::of(from + i as u32, h)),
        );
        Ok(chain)
    }

    /// Whether the source's best chain, from the fork below the loop's tip
    /// to `best`, has more work than the loop's own blocks above the fork.
    /// Every header of the source's branch is checked for proof of work on
    /// the way; a branch that changes while it is read is "not more".
    async fn source_has_more_work(
        &self,
        fork: u32,
        fork_hash: BlockHash,
        best: BlockId,
    ) -> Result<bool, ManagerError> {
        let ours = self
            .recent
            .range(fork + 1..)
            .fold(no_work(), |work, (_, (_, bits))| work + work_of(*bits));
        let mut theirs: Work = no_work();
        let mut pow = self.header_chain(fork, fork_hash).await?;
        let (mut next, mut prev) = (fork + 1, fork_hash);
        while next <= best.height && theirs <= ours {
            let count = (best.height - next + 1).min(self.config.header_batch.max(1));
            let headers = match timed(&self.policy(), || self.source.headers(next, count)).await {
                Ok(headers) => headers,
                Err(SourceError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            };
            if headers.is_empty() {
                break;
            }
            for header in headers {
                if header.prev_blockhash != prev {
                    return Ok(false);
                }
                let hash = header.block_hash();
                pow.connect(next, &header, hash)
                    .map_err(|reason| ManagerError::BadHeader {
                        height: next,
                        hash,
                        reason,
                    })?;
                theirs = theirs + header.work();
                (next, prev) = (next + 1, hash);
            }
        }
        Ok(theirs > ours)
    }

    pub(crate) fn tip(&self) -> Option<BlockId> {
        self.tip.map(|t| BlockId {
            height: t.height,
            hash: t.hash,
        })
    }

    fn tip_or_err(&self) -> Tip {
        self.tip.expect("started engine has a tip")
    }

    /// Whether the source's best tip is `tip`.
    pub(crate) async fn source_tip_is(&self, tip: Option<BlockId>) -> Result<bool, ManagerError> {
        let best = timed(&self.policy(), || self.source.tip()).await?;
        Ok(Some(best) == tip)
    }

    /// Whether `hash` is the source's best-chain block at `height`.
    async fn on_best_chain(&self, height: u32, hash: BlockHash) -> Result<bool, ManagerError> {
        match timed(&self.policy(), || self.source.block_hash(height)).await {
            Ok(found) => Ok(found == hash),
            Err(SourceError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The highest of `blocks` (given highest first) still on the source's
    /// best chain: a fork point.
    async fn highest_on_chain(
        &self,
        blocks: impl Iterator<Item = (u32, BlockHash)>,
    ) -> Result<Option<(u32, BlockHash)>, ManagerError> {
        for (height, hash) in blocks {
            if self.on_best_chain(height, hash).await? {
                return Ok(Some((height, hash)));
            }
        }
        Ok(None)
    }

    /// Follows a reorg if the loop's tip has left the source's best chain
    /// for a branch with more work.
    async fn follow_reorg_below_tip(&mut self) -> Result<(), ManagerError> {
        let tip = self.tip_or_err();
        if !self.on_best_chain(tip.height, tip.hash).await? {
            self.handle_reorg().await?;
        }
        Ok(())
    }

    /// Follows the database's wallet set outside a write (at the tip, or
    /// when a registration finds its wallet already there).
    async fn follow_registry(&mut self) -> Result<(), ManagerError> {
        let books = self.take_books().await?;
        let seen = self.registry_seen;
        let (books, seen, waiting) = self
            .store
            .read(move |tx| {
                let (mut books, mut seen) = (books, seen);
                let waiting = books.follow_registry(tx, &mut seen)?;
                Ok::<_, ManagerError>((books, seen, waiting))
            })
            .await?;
        self.books = Some(books);
        self.registry_seen = seen;
        self.pending_imports |= waiting;
        Ok(())
    }

    /// The active wallets, loaded again from the database if a failed
    /// write left them unknown.
    async fn books(&mut self) -> Result<&mut Books, ManagerError> {
        let books = self.take_books().await?;
        Ok(self.books.insert(books))
    }

    /// The active wallets, taken out to move into a write transaction; put
    /// back what comes back (or nothing: they are read again when needed).
    async fn take_books(&mut self) -> Result<Books, ManagerError> {
        match self.books.take() {
            Some(books) => Ok(books),
            None => self.store.read(Books::load_active).await,
        }
    }

    /// Takes the right to run the loop, checks the source is on the
    /// configured network, loads the tip and the wallets, checks the tip is
    /// still on the source's best chain (a reorg while the process was
    /// down); then, and after any hiccup, finishes every import that is
    /// waiting (a crash, a failure, a stop or another process left it).
    pub(crate) async fn ensure_started(&mut self) -> Result<(), ManagerError> {
        self.ensure_loaded().await?;
        if self.pending_imports {
            self.resume_imports().await?;
        }
        Ok(())
    }

    /// Starts the engine if it has not started, without resuming imports
    /// (a registration does not wait for another wallet's import).
    async fn ensure_loaded(&mut self) -> Result<(), ManagerError> {
        self.claim_loop().await?;
        if !self.started {
            self.start().await?;
        }
        Ok(())
    }

    async fn start(&mut self) -> Result<(), ManagerError> {
        self.claim_loop().await?;
        self.out.status.send_replace(Status::Connecting);
        let genesis = timed(&self.policy(), || self.source.block_hash(0)).await?;
        let expected = bitcoin::blockdata::constants::genesis_block(self.config.network);
        if genesis != expected.block_hash() {
            return Err(ManagerError::SourceNetwork {
                expected: self.config.network,
                genesis,
            });
        }
        let keep = self.config.recent_hashes as usize + 1;
        // One snapshot: the wallets and the registry version they are.
        let (books, tip, recent, registry) = self
            .store
            .read(move |tx| {
                Ok::<_, ManagerError>((
                    Books::load_active(tx)?,
                    tx.tip()?,
                    tx.recent_blocks(keep)?,
                    tx.registry_version()?,
                ))
            })
            .await?;
        self.books = Some(books);
        self.registry_seen = Some(registry);
        self.recent = recent
            .into_iter()
            .map(|(h, hash, bits)| {
                let bits = bits.map(CompactTarget::from_consensus);
                (h, (BlockHash::from_byte_array(hash), bits))
            })
            .collect();
        match tip {
            Some((height, hash)) => {
                self.tip = Some(Tip {
                    height,
                    hash: BlockHash::from_byte_array(hash),
                });
            }
            None => {
                let height = self.config.start_height;
                let hash = timed(&self.policy(), || self.source.block_hash(height)).await?;
                let bits = timed(&self.policy(), || self.source.header(hash))
                    .await?
                    .bits;
                let raw = hash.to_byte_array();
                self.store
                    .write(move |tx| {
                        tx.set_tip(height, &raw)?;
                        tx.put_block(height, &raw, bits.to_consensus())
                    })
                    .await?;
                self.tip = Some(Tip { height, hash });
                self.recent.insert(height, (hash, Some(bits)));
            }
        }
        self.tip_filter_header = None;
        self.pipe = None;
        self.publish_tip();
        self.follow_reorg_below_tip().await?;
        self.started = true;
        self.pending_imports = true;
        Ok(())
    }

    fn publish_tip(&self) {
        self.out.tip.send_replace(self.tip());
    }

    /// Finishes every import the database says is in progress (each
    /// import that fails marks them pending again).
    async fn resume_imports(&mut self) -> Result<(), ManagerError> {
        self.pending_imports = false;
        let resumed = self.resume_each_import().await;
        if resumed.is_err() {
            self.pending_imports = true;
        }
        resumed
    }

    async fn resume_each_import(&mut self) -> Result<(), ManagerError> {
        let rows: Vec<WalletRow> = self.store.read(|tx| tx.wallets()).await?;
        for row in rows {
            let Some(after) = row.importing_height else {
                continue;
            };
            let id = row.wallet_id;
            if let Some(books) = &mut self.books
                && books.wallets.contains_key(&id)
            {
                // Its import was started elsewhere: the loop stops serving it.
                books.remove_wallet(id);
            }
            let on_chain = match row.importing_hash.map(BlockHash::from_byte_array) {
                Some(hash) if self.on_best_chain(after, hash).await? => Some(hash),
                _ => None,
            };
            let (after, after_hash) = match (on_chain, row.importing_hash) {
                (Some(hash), _) => (after, Some(hash)),
                (None, None) => (after, None),
                (None, Some(_)) => {
                    // What the import scanned was reorganised away while
                    // the process was down: scan again from the birth height.
                    let restart = row.birth_height.saturating_sub(1);
                    tracing::warn!(wallet = %id, "import's blocks left the best chain; rescanning from birth");
                    self.store
                        .write(move |tx| {
                            tx.disconnect_wallet(id, 0)?;
                            tx.set_importing_height(id, Some(restart))
                        })
                        .await?;
                    (restart, None)
                }
            };
            let wallet = self.store.read(move |tx| Wallet::load(tx, id)).await?;
            tracing::info!(wallet = %id, from = after + 1, "resuming import");
            self.run_import(wallet, None, after, after_hash).await?;
        }
        Ok(())
    }

    /// One step of the loop: connect one batch of blocks, or follow a reorg,
    /// or find the loop at the source's tip. Once the manager is asked to
    /// stop, whatever a request ended by the stop returned is `Stopped`.
    pub(crate) async fn step(&mut self) -> Result<StepOutcome, ManagerError> {
        if self.stopping() {
            return Ok(StepOutcome::Stopped);
        }
        let result = self.step_once().await;
        if self.stopping() {
            self.pipe = None;
            return Ok(StepOutcome::Stopped);
        }
        result
    }

    async fn step_once(&mut self) -> Result<StepOutcome, ManagerError> {
        self.ensure_started().await?;
        match self.advance().await {
            Ok(outcome) => Ok(outcome),
            Err(Flow::Reorg) => {
                let tip = self.tip_or_err();
                if !self.pipe.as_ref().is_some_and(|p| p.is_fresh(tip.height)) {
                    // Fetched ahead on a branch that changed: look again.
                    self.pipe = None;
                    return Ok(StepOutcome::Progress);
                }
                if self.handle_reorg().await? {
                    return Ok(StepOutcome::Progress);
                }
                // A lagging source, or a branch with no more work than the
                // loop's: wait, keeping the pipeline (and, off regtest, the
                // headers its difficulty rules read) for the next look.
                Ok(StepOutcome::AtTip)
            }
            Err(Flow::Reset(missing)) => {
                self.pipe = None;
                self.resets += 1;
                if self.resets > self.config.request_retries.max(1) {
                    // Not a reorg: the source keeps missing something of
                    // its own best chain (a filter index behind its block
                    // index). Offline, with backoff, naming what is missing.
                    self.resets = 0;
                    return Err(ManagerError::Source(missing.unwrap_or_else(|| {
                        SourceError::Unavailable {
                            reason: "the source's chain keeps changing under the scan".to_owned(),
                        }
                    })));
                }
                self.pause(self.config.initial_backoff * self.resets).await;
                Ok(StepOutcome::Progress)
            }
            Err(Flow::Stop) => {
                self.pipe = None;
                Ok(StepOutcome::Stopped)
            }
            Err(Flow::Fail(e)) => {
                self.pipe = None;
                Err(e)
            }
        }
    }

    async fn advance(&mut self) -> Result<StepOutcome, Flow> {
        let tip = self.tip_or_err();
        let mut pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => {
                let pow = match self.header_chain(tip.height, tip.hash).await {
                    Ok(pow) => pow,
                    Err(ManagerError::Source(SourceError::NotFound(_))) => return Err(Flow::Reorg),
                    Err(e) => return Err(Flow::Fail(e)),
                };
                Pipeline::new(tip.height, tip.hash, None, pow)
            }
        };
        let result = self.advance_with(&mut pipe).await;
        self.pipe = Some(pipe);
        result
    }

    async fn advance_with(&mut self, pipe: &mut Pipeline) -> Result<StepOutcome, Flow> {
        let tip = self.tip_or_err();
        pipe.top_up_headers(&self.source, &self.config, &self.stop)
            .await?;
        if pipe.pending() == 0 {
            // At the source's tip, as far as headers go. Pick up wallets
            // other processes registered meanwhile.
            self.follow_registry().await?;
            if self.pending_imports {
                return Ok(StepOutcome::Progress);
            }
            let best = timed(&self.policy(), || self.source.tip()).await?;
            if best.hash == tip.hash {
                self.out
                    .status
                    .send_replace(Status::Synced { height: tip.height });
                return Ok(StepOutcome::AtTip);
            }
            if best.height > tip.height {
                // A new block arrived after the header request: take it
                // at the next poll.
                return Ok(StepOutcome::AtTip);
            }
            if self.source_lags(best) {
                return Ok(StepOutcome::AtTip);
            }
            // Another branch: followed only if it has more work.
            return Err(Flow::Reorg);
        }
        let books = self.take_books().await?;
        let mut filter_header = self.tip_filter_header;
        let stop = self.stop.clone();
        let (items, failure) = self
            .next_batch(
                pipe,
                &books,
                self.path,
                true,
                tip.hash,
                &mut filter_header,
                &stop,
            )
            .await;
        if items.is_empty() {
            self.books = Some(books);
            return match failure {
                Some(failure) => Err(failure),
                None => Ok(StepOutcome::Progress),
            };
        }
        let hook = self.hook.clone();
        let mode = Mode::Loop {
            keep: self.config.recent_hashes,
            seen: self.registry_seen,
        };
        let result = self
            .store
            .write(move |tx| connect_batch(tx, books, items, mode, hook))
            .await;
        let (books, outcome) = match result {
            Ok(done) => done,
            Err(e) => return Err(Flow::Fail(e)),
        };
        self.books = Some(books);
        self.after_loop_commit(pipe, outcome);
        match failure {
            Some(failure) => Err(failure),
            None => Ok(StepOutcome::Progress),
        }
    }

    /// Bookkeeping after the loop committed a batch: the tip, recent
    /// hashes, counters, the strategy, events, status.
    fn after_loop_commit(&mut self, pipe: &mut Pipeline, mut outcome: Outcome) {
        let c = &self.out.counters;
        Counters::add(&c.commits, 1);
        Counters::add(&c.blocks_connected, outcome.connected.len() as u64);
        self.count(&outcome);
        self.registry_seen = outcome.registry;
        self.pending_imports |= outcome.imports_waiting;
        if !outcome.connected.is_empty() {
            self.resets = 0;
        }
        pipe.unread(std::mem::take(&mut outcome.rest));
        for block in &outcome.connected {
            self.recent
                .insert(block.height, (block.hash, Some(block.bits)));
            self.tip = Some(Tip {
                height: block.height,
                hash: block.hash,
            });
            self.tip_filter_header = block.filter_header;
            if block.routed && block.activity.is_empty() {
                self.cost.route.add(block.route_nanos);
            }
        }
        let keep_from = self
            .tip_or_err()
            .height
            .saturating_sub(self.config.recent_hashes);
        self.recent = self.recent.split_off(&keep_from);
        self.publish_tip();
        for block in outcome.connected {
            self.out.publish(Event::BlockConnected {
                height: block.height,
                hash: block.hash,
                wallets: block.activity.iter().map(|(id, _)| *id).collect(),
            });
            self.out.publish_activity(block.height, &block.activity);
        }
        let height = self.tip_or_err().height;
        let status = if pipe.pending() == 0 && pipe.at_source_tip() {
            Status::Synced { height }
        } else {
            Status::Syncing {
                height,
                tip: pipe.known_height().max(height),
            }
        };
        self.out.status.send_replace(status);
        self.choose_path();
    }

    fn count(&self, outcome: &Outcome) {
        let c = &self.out.counters;
        Counters::add(&c.filters_matched, outcome.filters);
        Counters::add(&c.blocks_fetched, outcome.blocks);
        Counters::add(&c.false_positives, outcome.false_positives);
    }

    /// Switches between the filter and the block path when the measured
    /// costs cross (by a quarter either way, so that noise does not flip
    /// it), and says so in the log. The block path is only taken from a
    /// source that answers a block request at once.
    fn choose_path(&mut self) {
        if self.config.strategy != Strategy::Auto {
            return;
        }
        let scripts = self.books.as_ref().map_or(0, |b| b.watch.len());
        let next = self.cost.next_path(self.path, scripts);
        if next != self.path {
            tracing::info!(
                from = ?self.path,
                to = ?next,
                watched_scripts = scripts,
                cost = ?self.cost,
                "matching strategy switched"
            );
            Counters::add(&self.out.counters.strategy_switches, 1);
            self.path = next;
        }
    }

    /// The next batch of a scan of `books`: starts fetch tasks, takes up to
    /// a batch of fetched blocks in order, and prepares them. Blocks before
    /// a failure are returned with it: they are still committed, and the
    /// failure reported after. Only the loop's own scan (`main`) feeds the
    /// strategy's cost model.
    #[allow(clippy::too_many_arguments)]
    async fn next_batch(
        &mut self,
        pipe: &mut Pipeline,
        books: &Books,
        path: Path,
        main: bool,
        prev_hash: BlockHash,
        filter_header: &mut Option<FilterHeader>,
        stop: &watch::Receiver<bool>,
    ) -> (Vec<Fetched>, Option<Flow>) {
        let snapshot = snapshot(books, path);
        pipe.spawn(&self.source, &self.config, stop, &snapshot);
        let (mut items, fetch_failure) =
            collect(pipe, &self.source, &self.config, &snapshot, stop).await;
        let mut good = Vec::with_capacity(items.len());
        let check_failure = self
            .prepare(
                pipe,
                &mut items,
                &mut good,
                prev_hash,
                filter_header,
                books,
                main,
            )
            .await
            .err();
        (good, check_failure.or(fetch_failure))
    }

    /// Checks each fetched block's filter against the filter-header chain,
    /// matches it again for scripts added since it was matched, and fetches
    /// the blocks those new matches need, moving each block that passes to
    /// `good`.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &mut self,
        pipe: &mut Pipeline,
        items: &mut Vec<Fetched>,
        good: &mut Vec<Fetched>,
        mut prev_hash: BlockHash,
        filter_header: &mut Option<FilterHeader>,
        books: &Books,
        main: bool,
    ) -> Result<(), Flow> {
        let watch = &books.watch;
        for mut item in items.drain(..) {
            if let Some(f) = &item.filter {
                let previous = match *filter_header {
                    Some(header) => header,
                    None => timed(&self.policy(), || self.source.filter_header(prev_hash)).await?,
                };
                // Checked before if the item was put back after a batch.
                let header = match item.filter_header {
                    Some(header) => header,
                    None => {
                        pipe.filter_header(
                            &self.source,
                            &self.config,
                            &self.stop,
                            BlockId {
                                height: item.height,
                                hash: item.hash,
                            },
                        )
                        .await?
                    }
                };
                if f.filter_hash.filter_header(&previous) != header {
                    return Err(Flow::Fail(ManagerError::FilterHeaderMismatch {
                        height: item.height,
                        hash: item.hash,
                    }));
                }
                item.filter_header = Some(header);
                *filter_header = Some(header);
                if main {
                    self.cost.filter.add(f.match_nanos);
                    self.cost.filter_scripts = watch.len();
                }
            } else {
                *filter_header = None;
                pipe.forget_filter_headers(item.height);
            }
            if let (Some(timing), true) = (item.block_timing, main) {
                self.cost.block_fetch.add(timing.fetch_nanos);
                self.cost.block_check.add(timing.check_nanos);
            }
            let need = item.needs_block(watch);
            let checked = watch.len();
            if let Some(f) = &mut item.filter {
                f.matched |= need;
                f.checked = checked;
            }
            if item.block.is_none() && need {
                let (block, timing) =
                    fetch_block(&self.source, item.height, item.hash, &self.policy()).await?;
                item.block = Some(block);
                item.block_timing = Some(timing);
            }
            prev_hash = item.hash;
            good.push(item);
        }
        Ok(())
    }

    /// Whether the source's tip `best` is behind the loop's on the loop's
    /// own chain (a node restarting, an index catching up), or below every
    /// block the loop keeps: waited for, with no request to find a fork.
    fn source_lags(&self, best: BlockId) -> bool {
        let tip = self.tip_or_err();
        let lowest = self.recent.keys().next().copied().unwrap_or(tip.height);
        let ours = self.recent.get(&best.height).map(|(hash, _)| *hash);
        best.height <= tip.height && (ours == Some(best.hash) || best.height < lowest)
    }

    /// Follows a reorg: finds the highest recorded block still on the
    /// source's best chain and, if the source's branch above it has more
    /// work than the loop's, disconnects every wallet above it in one
    /// transaction (the loop then connects the new branch). Returns
    /// whether the loop's tip is on the source's best chain now: `false`
    /// when the source lags or offers a branch with no more work, which is
    /// waited for, not followed.
    pub(crate) async fn handle_reorg(&mut self) -> Result<bool, ManagerError> {
        let tip = self.tip_or_err();
        let best = timed(&self.policy(), || self.source.tip()).await?;
        if self.source_lags(best) {
            tracing::info!(
                source_tip = best.height,
                tip = tip.height,
                "the source lags behind the loop: waiting"
            );
            return Ok(false);
        }
        let lowest = self.recent.keys().next().copied().unwrap_or(tip.height);
        let recent: Vec<(u32, BlockHash)> = self
            .recent
            .iter()
            .rev()
            .map(|(h, (b, _))| (*h, *b))
            .collect();
        let Some((fork_height, fork_hash)) = self.highest_on_chain(recent.into_iter()).await?
        else {
            return Err(ManagerError::ReorgTooDeep {
                kept: self.recent.len(),
                lowest,
            });
        };
        if fork_height == tip.height {
            return Ok(true);
        }
        if !self
            .source_has_more_work(fork_height, fork_hash, best)
            .await?
        {
            tracing::info!(
                fork = fork_height,
                source_tip = best.height,
                tip = tip.height,
                "the source's branch has no more work than the loop's: waiting"
            );
            return Ok(false);
        }
        self.pipe = None;
        let disconnected: Vec<(u32, BlockHash)> = self
            .recent
            .range(fork_height + 1..)
            .rev()
            .map(|(h, (hash, _))| (*h, *hash))
            .collect();
        tracing::info!(fork = fork_height, depth = disconnected.len(), "reorg");
        let mut books = self.take_books().await?;
        let hook = self.hook.clone();
        let raw_fork = fork_hash.to_byte_array();
        let result = self
            .store
            .write(move |tx| {
                for row in tx.wallets()? {
                    tx.disconnect_wallet(row.wallet_id, fork_height + 1)?;
                    if row.importing_height.is_some_and(|h| h > fork_height) {
                        tx.set_import_progress(row.wallet_id, fork_height, &raw_fork)?;
                    }
                }
                tx.delete_block_hashes_above(fork_height)?;
                tx.set_tip(fork_height, &raw_fork)?;
                if let Some(hook) = &hook {
                    hook.blocks_disconnected(tx, fork_height)
                        .map_err(ManagerError::Hook)?;
                }
                books.reload_coins(tx)?;
                Ok::<_, ManagerError>(books)
            })
            .await?;
        self.books = Some(result);
        Counters::add(&self.out.counters.commits, 1);
        Counters::add(
            &self.out.counters.blocks_disconnected,
            disconnected.len() as u64,
        );
        self.recent.retain(|h, _| *h <= fork_height);
        self.tip = Some(Tip {
            height: fork_height,
            hash: fork_hash,
        });
        self.tip_filter_header = None;
        self.resets = 0;
        self.publish_tip();
        for (height, hash) in disconnected {
            self.out.publish(Event::BlockDisconnected { height, hash });
        }
        Ok(true)
    }

    /// Registers a wallet. Born above the loop's tip, it joins at once;
    /// otherwise it is imported (the world stands still meanwhile). The
    /// same name with the same descriptors again returns the wallet (and
    /// finishes its import if a failure interrupted it); another manager's
    /// loop on the database picks the wallet up instead of this one.
    pub(crate) async fn add_wallet(&mut self, spec: NewWallet) -> Result<WalletId, ManagerError> {
        if spec.descriptors.network() != self.config.network {
            return Err(ManagerError::WrongNetwork {
                wallet: spec.descriptors.network(),
                chain: self.config.network,
            });
        }
        let owner = self.owns_loop().await?;
        if owner {
            self.ensure_loaded().await?;
        }
        let registered = self.store.write(move |tx| register(tx, spec)).await?;
        let id = registered.wallet.id();
        if !owner {
            // The loop that owns the database imports it, or takes it in
            // at its next commit.
            return Ok(id);
        }
        let incomplete = |source: ManagerError| ManagerError::ImportIncomplete {
            wallet: id,
            source: Box::new(source),
        };
        match (registered.existing, registered.importing_after) {
            (false, None) => {
                let tip = self.tip_or_err();
                let wallet = registered.wallet;
                let joined = self
                    .store
                    .read(move |tx| Books::of_wallet(tx, wallet))
                    .await?;
                self.books().await?.merge(joined);
                Counters::add(&self.out.counters.imports, 1);
                self.out.publish(Event::WalletImported {
                    wallet: id,
                    height: tip.height,
                });
            }
            (false, Some(after)) => self
                .run_import(registered.wallet, None, after, None)
                .await
                .map_err(incomplete)?,
            (true, None) => {
                if !self.books().await?.wallets.contains_key(&id) {
                    self.follow_registry().await?;
                }
            }
            (true, Some(_)) => {
                self.pending_imports = true;
                self.resume_imports().await.map_err(incomplete)?;
            }
        }
        Ok(id)
    }

    /// Rescans, for some scripts of a wallet only, from `from_height` to
    /// the loop's tip. A manager that does not run the loop marks the
    /// wallet importing, and the loop that does picks it up.
    pub(crate) async fn import_scripts(
        &mut self,
        id: WalletId,
        import: ScriptImport,
        from_height: u32,
    ) -> Result<(), ManagerError> {
        let owner = self.owns_loop().await?;
        let tip = if owner {
            self.ensure_loaded().await?;
            Some(self.tip_or_err().height)
        } else {
            self.store
                .read(|tx| tx.tip())
                .await?
                .map(|(height, _)| height)
        };
        let after = from_height.saturating_sub(1).min(tip.unwrap_or(u32::MAX));
        let after_hash = timed(&self.policy(), || self.source.block_hash(after)).await?;
        if owner {
            let books = self.books().await?;
            if !books.wallets.contains_key(&id) {
                self.follow_registry().await?;
            }
            // The loop stops serving it until its rescan joins.
            self.books().await?.remove_wallet(id);
        }
        let raw_after = after_hash.to_byte_array();
        let result = self
            .store
            .write(move |tx| {
                let mut wallet = match Wallet::load(tx, id) {
                    Err(lockstep_wallet::WalletError::NotFound(_)) => {
                        return Err(ManagerError::UnknownWallet(id));
                    }
                    loaded => loaded?,
                };
                let scripts: Vec<(Keychain, u32, ScriptBuf)> = match import {
                    ScriptImport::Range { keychain, end } => {
                        wallet.derive_until(tx, keychain, end)?;
                        wallet
                            .watch_scripts()
                            .filter(|(k, i, _)| *k == keychain && *i < end)
                            .map(|(k, i, s)| (k, i, s.to_owned()))
                            .collect()
                    }
                    ScriptImport::Scripts(list) => list
                        .into_iter()
                        .map(|script| match wallet.script_index(&script) {
                            Some((k, i)) => Ok((k, i, script)),
                            None => Err(ManagerError::NotWalletScript {
                                wallet: wallet.id(),
                                script: script.to_hex_string(),
                            }),
                        })
                        .collect::<Result<_, _>>()?,
                };
                // Marked importing: a crash from here on resumes as a full
                // rescan of the wallet from `after`, which ingest's
                // idempotence makes exact.
                tx.set_import_progress(wallet.id(), after, &raw_after)?;
                Ok::<_, ManagerError>((wallet, scripts))
            })
            .await;
        let (wallet, scripts) = match result {
            Ok(done) => done,
            Err(e) => {
                self.books = None;
                return Err(e);
            }
        };
        if !owner {
            return Ok(());
        }
        tracing::info!(wallet = %id, scripts = scripts.len(), from = after + 1, "targeted import");
        self.run_import(wallet, Some(scripts), after, Some(after_hash))
            .await
    }

    /// Scans `after + 1 ..= loop tip` for one wallet (all its scripts, or
    /// only `scripts`), in batches that each commit the import's progress;
    /// then the wallet joins the loop's books at the loop's tip. If it
    /// fails or is stopped, the wallet stays marked importing and the
    /// import is resumed (as a rescan of all the wallet's scripts from
    /// where it got to) before the loop goes on.
    async fn run_import(
        &mut self,
        wallet: Wallet,
        scripts: Option<Vec<(Keychain, u32, ScriptBuf)>>,
        after: u32,
        after_hash: Option<BlockHash>,
    ) -> Result<(), ManagerError> {
        let id = wallet.id();
        let tip = self.tip_or_err().height;
        self.out
            .status
            .send_replace(Status::Syncing { height: tip, tip });
        let mut result = self.import_to_tip(wallet, scripts, after, after_hash).await;
        if result.is_err() && self.stopping() {
            result = Err(ManagerError::Stopped);
        }
        if let Err(error) = &result {
            self.pending_imports = true;
            tracing::warn!(wallet = %id, %error, "import interrupted; it resumes before the loop goes on");
        }
        result
    }

    async fn import_to_tip(
        &mut self,
        wallet: Wallet,
        scripts: Option<Vec<(Keychain, u32, ScriptBuf)>>,
        mut after: u32,
        after_hash: Option<BlockHash>,
    ) -> Result<(), ManagerError> {
        let id = wallet.id();
        let birth = wallet.birth_height();
        let mut books = self
            .store
            .read(move |tx| {
                let mut books = match scripts {
                    None => Books::of_wallet(tx, wallet)?,
                    Some(scripts) => {
                        let mut books = Books::empty();
                        for (keychain, index, script) in &scripts {
                            books.watch.add(script, (id, *keychain, *index));
                        }
                        books.load_coins(tx, id)?;
                        books.wallets.insert(id, wallet);
                        books
                    }
                };
                books.watch.compact_all();
                Ok::<_, ManagerError>(books)
            })
            .await?;
        let mut after_hash = match after_hash {
            Some(hash) => hash,
            None => timed(&self.policy(), || self.source.block_hash(after)).await?,
        };
        // The import's own recent hashes, to find its fork if the chain
        // changes under it.
        let mut scanned: VecDeque<(u32, BlockHash)> = VecDeque::from([(after, after_hash)]);
        let (mut failures, mut resets) = (0u32, 0u32);
        loop {
            if self.stopping() {
                return Err(ManagerError::Stopped);
            }
            let tip = self.tip_or_err();
            let mut fork_needed = false;
            if after >= tip.height {
                if after == tip.height && after_hash == tip.hash {
                    break;
                }
                if after == tip.height && !self.on_best_chain(tip.height, tip.hash).await? {
                    // The loop's tip left the source's chain: the loop
                    // follows (if the new branch has more work) first.
                    if !self.handle_reorg().await? {
                        return Err(ManagerError::SourceBehind {
                            reached: after,
                            tip: tip.height,
                        });
                    }
                    continue;
                }
                if after > tip.height {
                    self.rewind_import(&mut books, id, tip.height, tip.hash)
                        .await?;
                    after = tip.height;
                    after_hash = tip.hash;
                    continue;
                }
                // At the loop's tip on another block: the import's own
                // blocks left the chain.
                fork_needed = true;
            }
            let scan = if fork_needed {
                Err(Flow::Reorg)
            } else {
                let pow = self.header_chain(after, after_hash).await;
                match pow {
                    Ok(pow) => {
                        let mut pipe = Pipeline::new(after, after_hash, Some(tip.height), pow);
                        self.import_batches(
                            &mut pipe,
                            &mut books,
                            id,
                            &mut after,
                            &mut after_hash,
                            &mut scanned,
                        )
                        .await
                    }
                    Err(ManagerError::Source(SourceError::NotFound(_))) => Err(Flow::Reorg),
                    Err(e) => Err(Flow::Fail(e)),
                }
            };
            match scan {
                Ok(()) => {}
                Err(Flow::Reorg | Flow::Reset(_)) => {
                    resets += 1;
                    if resets > self.config.request_retries.max(1) + 1 {
                        // The source keeps missing what the import needs.
                        return Err(ManagerError::SourceBehind {
                            reached: after,
                            tip: tip.height,
                        });
                    }
                    // The chain changed under the import: go back to the
                    // last block it scanned that is still on it.
                    let fork = self.highest_on_chain(scanned.iter().rev().copied()).await?;
                    let (height, hash) = match fork {
                        Some(fork) => fork,
                        None => {
                            let height = birth.saturating_sub(1);
                            (
                                height,
                                timed(&self.policy(), || self.source.block_hash(height)).await?,
                            )
                        }
                    };
                    if height < after {
                        self.rewind_import(&mut books, id, height, hash).await?;
                    }
                    after = height;
                    after_hash = hash;
                    scanned.retain(|(h, _)| *h <= height);
                    if scanned.is_empty() {
                        scanned.push_back((height, hash));
                    }
                    // The loop's own tip may have gone with the reorg.
                    self.follow_reorg_below_tip().await?;
                    if resets > 1 {
                        self.pause(self.config.initial_backoff * resets).await;
                    }
                }
                Err(Flow::Stop) => return Err(ManagerError::Stopped),
                Err(Flow::Fail(e)) => {
                    failures += 1;
                    if self.stopping() {
                        return Err(ManagerError::Stopped);
                    }
                    if e.kind() != crate::ErrorKind::Retryable || failures > 5 {
                        return Err(e);
                    }
                    self.pause(self.config.initial_backoff * failures).await;
                }
            }
        }
        // Join: the wallet's synced-to is the loop's from now on.
        self.store
            .write(move |tx| tx.set_importing_height(id, None))
            .await?;
        Counters::add(&self.out.counters.commits, 1);
        Counters::add(&self.out.counters.imports, 1);
        let main = self.books().await?;
        main.merge(books);
        self.out.publish(Event::WalletImported {
            wallet: id,
            height: after,
        });
        tracing::info!(wallet = %id, height = after, "import joined the loop");
        Ok(())
    }

    /// Undoes an import's blocks above `height`.
    async fn rewind_import(
        &mut self,
        books: &mut Books,
        id: WalletId,
        height: u32,
        hash: BlockHash,
    ) -> Result<(), ManagerError> {
        let raw = hash.to_byte_array();
        let taken = std::mem::replace(books, Books::empty());
        *books = self
            .store
            .write(move |tx| {
                let mut books = taken;
                tx.disconnect_wallet(id, height + 1)?;
                tx.set_import_progress(id, height, &raw)?;
                books.reload_coins(tx)?;
                Ok::<_, ManagerError>(books)
            })
            .await?;
        Ok(())
    }

    /// Connects the pipeline's blocks for an import, batch by batch.
    async fn import_batches(
        &mut self,
        pipe: &mut Pipeline,
        books: &mut Books,
        id: WalletId,
        after: &mut u32,
        after_hash: &mut BlockHash,
        scanned: &mut VecDeque<(u32, BlockHash)>,
    ) -> Result<(), Flow> {
        // The newcomer's watchlist is small: the filter path unless forced.
        let path = initial_path(self.config.strategy);
        let mut filter_header = None;
        let stop = self.stop.clone();
        loop {
            if self.stopping() {
                return Err(Flow::Stop);
            }
            pipe.top_up_headers(&self.source, &self.config, &stop)
                .await?;
            if pipe.pending() == 0 {
                let tip = self.tip_or_err().height;
                if pipe.at_source_tip() && *after < tip {
                    // The source's chain ends below the loop's tip: it
                    // lags, or it is on a branch with less work.
                    return Err(Flow::Fail(ManagerError::SourceBehind {
                        reached: pipe.known_height(),
                        tip,
                    }));
                }
                return Ok(());
            }
            let (items, failure) = self
                .next_batch(
                    pipe,
                    books,
                    path,
                    false,
                    *after_hash,
                    &mut filter_header,
                    &stop,
                )
                .await;
            if items.is_empty() {
                match failure {
                    Some(failure) => return Err(failure),
                    None => continue,
                }
            }
            let taken = std::mem::replace(books, Books::empty());
            let (returned, mut outcome) = match self
                .store
                .write(move |tx| connect_batch(tx, taken, items, Mode::Import(id), None))
                .await
            {
                Ok(done) => done,
                Err(e) => {
                    // The import's mirror may be ahead of the database:
                    // read it again from what was committed.
                    *books = self
                        .store
                        .read(move |tx| Books::of_wallet(tx, Wallet::load(tx, id)?))
                        .await?;
                    return Err(Flow::Fail(e));
                }
            };
            *books = returned;
            Counters::add(&self.out.counters.commits, 1);
            self.count(&outcome);
            pipe.unread(std::mem::take(&mut outcome.rest));
            for block in &outcome.connected {
                *after = block.height;
                *after_hash = block.hash;
                scanned.push_back((block.height, block.hash));
                filter_header = block.filter_header;
                self.out.publish_activity(block.height, &block.activity);
            }
            while scanned.len() > self.config.recent_hashes as usize + 1 {
                scanned.pop_front();
            }
            let tip = self.tip_or_err().height;
            self.out.status.send_replace(Status::Syncing {
                height: tip,
                tip: tip.max(pipe.known_height()),
            });
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
    }
}

/// What [`register`] found or made.
struct Registered {
    wallet: Wallet,
    /// Registered before (a retry, or another process).
    existing: bool,
    /// Marked importing from after this height.
    importing_after: Option<u32>,
}

/// In one write transaction: the wallet named `spec.name` if it has the
/// same descriptors (a retried registration), or a new one, marked
/// importing unless it is born above the loop's committed tip (read here,
/// so whichever process registers agrees with the loop's commits).
fn register(tx: &mut WriteTx<'_>, spec: NewWallet) -> Result<Registered, ManagerError> {
    if let Some(row) = tx.wallet_by_name(&spec.name)? {
        let wallet = Wallet::load(tx, row.wallet_id)?;
        let same = wallet.network() == spec.descriptors.network()
            && Keychain::ALL
                .into_iter()
                .all(|k| wallet.descriptors().descriptor(k) == spec.descriptors.descriptor(k));
        if !same {
            return Err(ManagerError::WalletNameTaken {
                name: spec.name,
                wallet: row.wallet_id,
            });
        }
        return Ok(Registered {
            wallet,
            existing: true,
            importing_after: row.importing_height,
        });
    }
    let joins_now = tx.tip()?.is_some_and(|(tip, _)| spec.birth_height > tip);
    let after = spec.birth_height.saturating_sub(1);
    let params = WalletParams {
        name: &spec.name,
        birth_height: spec.birth_height,
        lookahead: spec.lookahead,
        passphrase: spec.passphrase.as_deref(),
    };
    let wallet = Wallet::create(tx, &params, spec.descriptors)?;
    if !joins_now {
        tx.set_importing_height(wallet.id(), Some(after))?;
    }
    Ok(Registered {
        wallet,
        existing: false,
        importing_after: (!joins_now).then_some(after),
    })
}

/// The path a scan starts on: filters, unless blocks are forced.
fn initial_path(strategy: Strategy) -> Path {
    match strategy {
        Strategy::Blocks => Path::Blocks,
        Strategy::Auto | Strategy::Filters => Path::Filters,
    }
}

/// What prefetch tasks started now match against.
fn snapshot(books: &Books, path: Path) -> Snapshot {
    let (base, checked) = books.watch.snapshot();
    Snapshot {
        base,
        checked,
        path,
        idle: books.watch.len() == 0,
    }
}

/// Takes up to a batch of fetched blocks, in order, from the pipeline,
/// fetching more headers and starting more tasks as it goes.
async fn collect(
    pipe: &mut Pipeline,
    source: &Arc<dyn ChainSource>,
    config: &crate::ManagerConfig,
    snapshot: &Snapshot,
    stop: &watch::Receiver<bool>,
) -> (Vec<Fetched>, Option<Flow>) {
    let mut items = Vec::new();
    let mut halt = stop.clone();
    while items.len() < config.batch_size.max(1) as usize {
        match pipe.next(Some(&mut halt)).await {
            None => break,
            Some(Ok(item)) => items.push(item),
            // A stop abandons the batch; any other failure ends it at the
            // last good block, which is still committed.
            Some(Err(Flow::Stop)) => return (Vec::new(), Some(Flow::Stop)),
            Some(Err(e)) => return (items, Some(e)),
        }
        if !pipe.at_source_tip() {
            match pipe.top_up_headers(source, config, stop).await {
                Ok(()) => {}
                // Headers beyond what this batch holds changed: commit the
                // batch; the next step sees the reorg from its tip.
                Err(Flow::Reorg) => break,
                Err(e) => return (items, Some(e)),
            }
        }
        pipe.spawn(source, config, stop, snapshot);
    }
    (items, None)
}

impl Books {
    /// Takes in the wallets of an import's books: their scripts join the
    /// watchlist, their coins replace what this map held for them.
    pub(crate) fn merge(&mut self, other: Books) {
        for (script, owner) in other.watch.entries() {
            self.watch.add(script, *owner);
        }
        for id in other.wallets.keys() {
            self.outpoints.retain(|_, owners| {
                owners.retain(|o| o != id);
                !owners.is_empty()
            });
        }
        for (outpoint, owners) in other.outpoints {
            let entry = self.outpoints.entry(outpoint).or_default();
            for owner in owners {
                if !entry.contains(&owner) {
                    entry.push(owner);
                }
            }
        }
        self.wallets.extend(other.wallets);
        self.watch.compact();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cost model measured `samples` times at these per-block costs.
    fn measured(
        filter_ns: u64,
        scripts: usize,
        block_fetch_ns: u64,
        block_check_ns: u64,
    ) -> CostModel {
        let mut cost = CostModel::default();
        for _ in 0..10 {
            cost.filter.add(filter_ns);
            cost.block_fetch.add(block_fetch_ns);
            cost.block_check.add(block_check_ns);
            cost.route.add(0);
        }
        cost.filter_scripts = scripts;
        cost
    }

    #[test]
    fn the_block_path_is_taken_past_the_crossover_from_a_local_source_only() {
        // Matching 100,000 scripts costs 900 µs; checking a block 400 µs.
        let local = measured(900_000, 100_000, 5_000, 400_000);
        assert_eq!(local.next_path(Path::Filters, 100_000), Path::Blocks);
        // A small watchlist: the filter path stays.
        assert_eq!(local.next_path(Path::Filters, 10_000), Path::Filters);
        // Within a quarter of each other: no switch either way.
        assert_eq!(local.next_path(Path::Filters, 50_000), Path::Filters);
        assert_eq!(local.next_path(Path::Blocks, 50_000), Path::Blocks);
        // The watchlist shrank far enough: back to filters.
        assert_eq!(local.next_path(Path::Blocks, 20_000), Path::Filters);
        // A remote source (a block takes 5 ms to arrive): never blocks,
        // and back to filters at once.
        let remote = measured(900_000, 100_000, 5_000_000, 400_000);
        assert_eq!(remote.next_path(Path::Filters, 1_000_000), Path::Filters);
        assert_eq!(remote.next_path(Path::Blocks, 1_000_000), Path::Filters);
        // Too few measurements: stay.
        assert_eq!(
            CostModel::default().next_path(Path::Filters, 1_000_000),
            Path::Filters
        );
    }
}
