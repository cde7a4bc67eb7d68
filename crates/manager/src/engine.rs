//! The loop's state and its steps: connect a batch, follow a reorg, run an
//! import. One `Engine` lives behind the manager's mutex; whoever holds the
//! mutex holds the world still (the loop between two batches, or an
//! import for as long as it runs).
//!
//! This file holds the engine's state and the loop's driving (start, step,
//! one batch fetched, checked and connected); imports, reorgs and the
//! matching strategy are in the submodules of the same names.

use std::collections::BTreeMap;
use std::sync::Arc;

use bitcoin::BlockHash;
use bitcoin::bip158::FilterHeader;
use bitcoin::hashes::Hash as _;
use bitcoin::pow::CompactTarget;
use lockstep_chain::{BlockId, ChainSource, Missing, SourceError};
use lockstep_store::{LoopClaim, Store, WalletId};
use lockstep_wallet::{IngestSummary, Registry};
use tokio::sync::{broadcast, watch};

use crate::books::Books;
use crate::connect::{Mode, Outcome, connect_batch};
use crate::events::Counters;
use crate::mempool::{MempoolSync, MempoolView, record_mempool};
use crate::pipeline::{
    Fetched, Flow, Path, Pipeline, Policy, Snapshot, fetch_block, timed, wait_true,
};
use crate::pow::{HeaderChain, Link};
use crate::{BlockHook, Event, ManagerConfig, ManagerError, Status};

mod import;
mod reorg;
mod strategy;

use strategy::{CostModel, FRACTION_ONE, initial_path};

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

pub(crate) struct Engine {
    pub(crate) store: Store,
    pub(crate) source: Arc<dyn ChainSource>,
    pub(crate) config: ManagerConfig,
    pub(crate) hook: Option<Arc<dyn BlockHook>>,
    pub(crate) out: Arc<Outputs>,
    /// The one live instance of each wallet, shared with the embedder.
    pub(crate) registry: Registry,
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
    /// The source's mempool as last polled.
    mempool: MempoolView,
}

impl Engine {
    pub(crate) fn new(
        store: Store,
        source: Arc<dyn ChainSource>,
        config: ManagerConfig,
        out: Arc<Outputs>,
        stop: watch::Receiver<bool>,
        registry: Registry,
    ) -> Engine {
        let path = initial_path(config.strategy);
        Engine {
            store,
            source,
            config,
            hook: None,
            out,
            registry,
            books: None,
            tip: None,
            tip_filter_header: None,
            recent: BTreeMap::new(),
            pipe: None,
            started: false,
            cost: CostModel::for_cores(rayon::current_num_threads()),
            path,
            stop,
            claim: None,
            registry_seen: None,
            pending_imports: false,
            resets: 0,
            mempool: MempoolView::default(),
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
            None => {
                // A failed write may have left the books ahead of the
                // database (live wallets never are: they change only after
                // a commit). Read on the writer, so that no commit slips
                // between the read and the loop's next write.
                let registry = self.registry.clone();
                self.store
                    .write(move |tx| Books::load_active(tx, &registry))
                    .await
            }
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
        let wallets = self.registry.clone();
        let (books, tip, recent, registry) = self
            .store
            .read(move |tx| {
                Ok::<_, ManagerError>((
                    Books::load_active(tx, &wallets)?,
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

    /// Polls the source's mempool and brings every active wallet's
    /// unconfirmed view in step with it, in one write transaction (see
    /// `crate::mempool`). `None` when the source shows no mempool. Called
    /// at the tip, between batches.
    pub(crate) async fn sync_mempool(&mut self) -> Result<Option<MempoolSync>, ManagerError> {
        self.ensure_started().await?;
        if self.pending_imports {
            // Imports first: a wallet being imported is not in the books.
            return Ok(None);
        }
        let books = self.take_books().await?;
        let shape = |b: &Books, seen| (b.watch.len(), b.wallets.len(), seen);
        let before = shape(&books, self.registry_seen);
        let refreshed = match self
            .mempool
            .refresh(&self.source, &self.policy(), before)
            .await
        {
            Ok(Some(refreshed)) => refreshed,
            Ok(None) => {
                self.books = Some(books);
                return Ok(None);
            }
            Err(e) => {
                self.books = Some(books);
                return Err(e);
            }
        };
        let (listed, candidates) = (refreshed.listed, refreshed.candidates);
        let result = self
            .store
            .write(move |tx| record_mempool(tx, books, &listed, &candidates))
            .await;
        let (books, mut sync) = match result {
            Ok(done) => done,
            Err(e) => {
                // The books may be ahead of what was committed: read again.
                self.mempool.forget_checks();
                if let Some(wallet) = e.wallet_to_park() {
                    self.park(wallet, &e).await?;
                }
                return Err(e);
            }
        };
        sync.fetched = refreshed.fetched;
        self.mempool
            .checked_against(shape(&books, self.registry_seen));
        self.books = Some(books);
        for (txid, wallets) in &sync.added {
            self.out.publish(Event::Unconfirmed {
                txid: *txid,
                wallets: wallets.clone(),
            });
        }
        for (txid, wallets) in &sync.left {
            self.out.publish(Event::LeftMempool {
                txid: *txid,
                wallets: wallets.clone(),
            });
        }
        Ok(Some(sync))
    }

    /// After a reorg, the next mempool poll checks everything again.
    pub(crate) fn mempool_after_reorg(&mut self) {
        self.mempool.forget_checks();
    }

    fn publish_tip(&self) {
        self.out.tip.send_replace(self.tip());
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
        match result {
            Err(error) => match error.wallet_to_park() {
                Some(wallet) => {
                    self.park(wallet, &error).await?;
                    Ok(StepOutcome::Progress)
                }
                None => Err(error),
            },
            ok => ok,
        }
    }

    /// Parks `wallet`, which `error` says cannot be processed: marked in
    /// the database with the error and the height its state is synced to
    /// (the batch that failed was rolled back), out of the books, its live
    /// instance unloaded; the loop goes on for every other wallet.
    pub(crate) async fn park(
        &mut self,
        wallet: WalletId,
        error: &ManagerError,
    ) -> Result<(), ManagerError> {
        let text = error.to_string();
        let reason = text.clone();
        let height = self
            .store
            .write(move |tx| tx.park_wallet(wallet, &reason))
            .await?;
        if let Some(books) = &mut self.books {
            books.remove_wallet(wallet);
        }
        self.registry.unload(wallet);
        self.pipe = None;
        tracing::error!(%wallet, height, error = %text, "wallet parked; the loop goes on for the others");
        Counters::add(&self.out.counters.parked, 1);
        self.out.publish(Event::WalletParked {
            wallet,
            height,
            error: text,
        });
        Ok(())
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
        // Wallets joined since the last commit (registrations add their
        // scripts to the tail, uncompacted): the prefetch tasks must match
        // against a base that holds them, or the loop would re-check every
        // filter against the tail on its own task. On the blocking pool
        // (rebuilding a large base is milliseconds of CPU), while the
        // headers are asked for: after registering 10 wallets, 6 ms of
        // compacting beside a 4 ms header request, each of which the
        // first fetch waited for in turn.
        let books = self.take_books().await?;
        let compacting = async move {
            if !books.watch.wants_compaction() {
                return Ok(books);
            }
            tokio::task::spawn_blocking(move || {
                let mut books = books;
                books.watch.compact();
                books
            })
            .await
            .map_err(|e| crate::pipeline::task_failed("compacting the watchlist", &e))
        };
        let (topped, books) = tokio::join!(
            pipe.top_up_headers(&self.source, &self.config, &self.stop),
            compacting
        );
        self.books = Some(books?);
        topped?;
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
        let result = pipe
            .fill_while(
                self.store
                    .write(move |tx| connect_batch(tx, books, items, mode, hook)),
            )
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
                    self.cost.filter_bytes.add(f.bytes);
                    self.cost.filter_scripts = watch.len();
                }
            } else {
                *filter_header = None;
                pipe.forget_filter_headers(item.height);
            }
            if let (Some(timing), true) = (item.block_timing, main) {
                self.cost.block_fetch.add(timing.fetch_nanos);
                self.cost.block_check.add(timing.check_nanos);
                self.cost.block_bytes.add(timing.bytes);
            }
            let need = item.needs_block(watch);
            if main && item.filter.is_some() {
                self.cost
                    .filter_fetches
                    .add(if need { FRACTION_ONE } else { 0 });
            }
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
