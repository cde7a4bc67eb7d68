//! Imports: registering a wallet, rescanning some of a wallet's scripts,
//! resuming the imports a crash or another process left waiting, and the
//! stop-the-world scan that brings one wallet up to the loop's tip before
//! it joins the loop's books.

use std::collections::VecDeque;

use bitcoin::hashes::Hash as _;
use bitcoin::{BlockHash, ScriptBuf};
use lockstep_chain::SourceError;
use lockstep_store::{WalletId, WalletRow, WriteTx};
use lockstep_wallet::{FirstScripts, Keychain, Registry, WalletParams};

use super::Engine;
use super::strategy::initial_path;
use crate::books::Books;
use crate::connect::{Mode, connect_batch};
use crate::events::Counters;
use crate::pipeline::{Flow, Pipeline, timed};
use crate::{Event, ManagerError, NewWallet, ScriptImport, Status};

impl Engine {
    /// Finishes every import the database says is in progress (each
    /// import that fails marks them pending again).
    pub(super) async fn resume_imports(&mut self) -> Result<(), ManagerError> {
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
            // Another process may have started this import and derived
            // scripts for it: this process's instance reads them again.
            let registry = self.registry.clone();
            self.store
                .write(move |tx| registry.refresh_in(tx, id))
                .await?;
            tracing::info!(wallet = %id, from = after + 1, "resuming import");
            self.run_import(id, row.birth_height, None, after, after_hash)
                .await?;
        }
        Ok(())
    }

    /// Takes a parked wallet back as an import from its parked height,
    /// and (if this engine runs the loop) runs it now.
    pub(crate) async fn resume_wallet(&mut self, id: WalletId) -> Result<(), ManagerError> {
        let owner = self.owns_loop().await?;
        if owner {
            self.ensure_loaded().await?;
        }
        let resumed = self
            .store
            .write(move |tx| match tx.resume_wallet(id) {
                Err(lockstep_store::StoreError::WalletNotFound { .. }) => {
                    Err(ManagerError::UnknownWallet(id))
                }
                other => Ok(other?),
            })
            .await?;
        let Some(height) = resumed else {
            return Ok(());
        };
        tracing::info!(wallet = %id, from = height + 1, "resuming a parked wallet");
        if !owner {
            return Ok(());
        }
        self.pending_imports = true;
        let resumed = self.resume_imports().await;
        if let Err(error) = &resumed
            && let Some(wallet) = error.wallet_to_park()
        {
            self.park(wallet, error).await?;
        }
        resumed
    }

    /// Registers a wallet. Born above the loop's tip, it joins at once;
    /// otherwise it is imported (the world stands still meanwhile). The
    /// same name with the same descriptors again returns the wallet (and
    /// finishes its import if a failure interrupted it); another manager's
    /// loop on the database picks the wallet up instead of this one.
    pub(crate) async fn add_wallet(
        &mut self,
        spec: NewWallet,
        first: Option<FirstScripts>,
    ) -> Result<WalletId, ManagerError> {
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
        let registry = self.registry.clone();
        let registered = self
            .store
            .write(move |tx| register(tx, &registry, spec, first))
            .await;
        let registered = match registered {
            Ok(registered) => registered,
            Err(error) => {
                // The instance made inside the rolled-back transaction
                // must not outlive it.
                let registry = self.registry.clone();
                let forgotten: Result<usize, ManagerError> = self
                    .store
                    .write(move |tx| Ok(registry.forget_missing(tx)?))
                    .await;
                if let Err(e) = forgotten {
                    tracing::warn!(error = %e, "forgetting a rolled-back wallet");
                }
                return Err(error);
            }
        };
        let id = registered.id;
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
                let registry = self.registry.clone();
                let joined = self
                    .store
                    .read(move |tx| Books::of_wallet(tx, &registry, id))
                    .await?;
                self.merge_books(joined).await?;
                Counters::add(&self.out.counters.imports, 1);
                self.out.publish(Event::WalletImported {
                    wallet: id,
                    height: tip.height,
                });
            }
            (false, Some(after)) => self
                .run_import(id, registered.birth, None, after, None)
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
            // An import of this wallet (or another) that a stop or a
            // failure interrupted is finished first: this one must not
            // take its place in the wallet's row.
            self.ensure_started().await?;
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
        let registry = self.registry.clone();
        let result = self
            .store
            .write(move |tx| {
                let live = match registry.get_in(tx, id) {
                    Err(lockstep_wallet::WalletError::NotFound(_)) => {
                        return Err(ManagerError::UnknownWallet(id));
                    }
                    loaded => loaded?,
                };
                let mut wallet = live.wallet_in(tx);
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
                // idempotence makes exact. An import already waiting from
                // lower down (another process marked it) is kept: the
                // full rescan from there covers this one too.
                let waiting = tx
                    .wallet(wallet.id())?
                    .and_then(|row| row.importing_height)
                    .is_some_and(|height| height <= after);
                if !waiting {
                    tx.set_import_progress(wallet.id(), after, &raw_after)?;
                }
                Ok::<_, ManagerError>((wallet.birth_height(), scripts, waiting))
            })
            .await;
        let (birth, scripts, waiting) = match result {
            Ok(done) => done,
            Err(e) => {
                self.books = None;
                return Err(e);
            }
        };
        if !owner {
            return Ok(());
        }
        if waiting {
            self.pending_imports = true;
            return self.resume_imports().await;
        }
        tracing::info!(wallet = %id, scripts = scripts.len(), from = after + 1, "targeted import");
        self.run_import(id, birth, Some(scripts), after, Some(after_hash))
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
        id: WalletId,
        birth: u32,
        scripts: Option<Vec<(Keychain, u32, ScriptBuf)>>,
        after: u32,
        after_hash: Option<BlockHash>,
    ) -> Result<(), ManagerError> {
        let tip = self.tip_or_err().height;
        self.out
            .status
            .send_replace(Status::Syncing { height: tip, tip });
        let mut result = self
            .import_to_tip(id, birth, scripts, after, after_hash)
            .await;
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
        id: WalletId,
        birth: u32,
        scripts: Option<Vec<(Keychain, u32, ScriptBuf)>>,
        mut after: u32,
        after_hash: Option<BlockHash>,
    ) -> Result<(), ManagerError> {
        let registry = self.registry.clone();
        let mut books = self
            .store
            .read(move |tx| {
                let mut books = match scripts {
                    None => Books::of_wallet(tx, &registry, id)?,
                    Some(scripts) => {
                        let mut books = Books::empty(&registry);
                        for (keychain, index, script) in &scripts {
                            books.watch.add(script, (id, *keychain, *index));
                        }
                        books.load_coins(tx, id)?;
                        books.wallets.insert(id, None);
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
        self.merge_books(books).await?;
        self.out.publish(Event::WalletImported {
            wallet: id,
            height: after,
        });
        tracing::info!(wallet = %id, height = after, "import joined the loop");
        Ok(())
    }

    /// Joins an import's books to the loop's, on the blocking pool: with
    /// many wallets the watchlist's base may be rebuilt, milliseconds of
    /// CPU that must not stall a tokio worker.
    async fn merge_books(&mut self, joined: Books) -> Result<(), ManagerError> {
        let mut main = self.take_books().await?;
        let merged = tokio::task::spawn_blocking(move || {
            main.merge(joined);
            main
        })
        .await
        .map_err(|e| {
            ManagerError::Source(SourceError::Unavailable {
                reason: format!("merging an import's books: {e}"),
            })
        })?;
        self.books = Some(merged);
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
        let taken = std::mem::replace(books, Books::empty(&self.registry));
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
            let taken = std::mem::replace(books, Books::empty(&self.registry));
            let commit = self
                .store
                .write(move |tx| connect_batch(tx, taken, items, Mode::Import(id), None));
            let (returned, mut outcome) = match pipe.fill_while(commit).await {
                Ok(done) => done,
                Err(e) => {
                    // The import's books may be ahead of the database:
                    // read them again from what was committed.
                    let registry = self.registry.clone();
                    *books = self
                        .store
                        .write(move |tx| Books::of_wallet(tx, &registry, id))
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
    id: WalletId,
    birth: u32,
    /// Registered before (a retry, or another process).
    existing: bool,
    /// Marked importing from after this height.
    importing_after: Option<u32>,
}

/// In one write transaction: the wallet named `spec.name` if it has the
/// same descriptors (a retried registration), or a new one, marked
/// importing unless it is born above the loop's committed tip (read here,
/// so whichever process registers agrees with the loop's commits).
fn register(
    tx: &mut WriteTx<'_>,
    registry: &Registry,
    spec: NewWallet,
    first: Option<FirstScripts>,
) -> Result<Registered, ManagerError> {
    if let Some(row) = tx.wallet_by_name(&spec.name)? {
        let live = registry.get_in(tx, row.wallet_id)?;
        let wallet = live.wallet_in(tx);
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
            id: row.wallet_id,
            birth: row.birth_height,
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
    let id = registry
        .create_in(tx, &params, spec.descriptors, first)?
        .id();
    if !joins_now {
        tx.set_importing_height(id, Some(after))?;
    }
    Ok(Registered {
        id,
        birth: spec.birth_height,
        existing: false,
        importing_after: (!joins_now).then_some(after),
    })
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
        for (id, watched) in other.wallets {
            // A targeted import watched only some scripts: the loop looks
            // at all of the wallet's again at its next write.
            if watched.is_none() {
                self.registry.mark_grown(id);
            }
            self.wallets.insert(id, Some(watched.unwrap_or([0, 0])));
        }
        // Not compacted here: registering many wallets in a row would
        // rebuild the watchlist's base once per wallet (the tail of one
        // wallet's 1,000 scripts passes 1/64 of any base under 64,000).
        // The loop compacts once, before it starts its next batch.
    }
}
