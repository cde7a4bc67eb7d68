//! The manager end to end, every wallet checked against SimChain's oracle:
//! many wallets, imports, targeted imports, reorgs (at the tip, deep, during
//! an import), a lookahead burst, stop and start, a flaky source, and a
//! source that lies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Amount, Block, BlockHash, OutPoint, ScriptBuf, Transaction, TxOut, Txid};
use lockstep_chain::metered::Metered;
use lockstep_chain::{BlockId, BroadcastError, ChainSource, ErrorKind, SourceError};
use lockstep_manager::{
    Event, Manager, ManagerConfig, ManagerError, NewWallet, ScriptImport, Status,
};
use lockstep_sim::{ReorgTxs, SimChain, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{check_wallet_imported, test_descriptors};
use lockstep_tests::wait::eventually;
use lockstep_wallet::Keychain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A test world: a chain, a database, a manager, and what the test paid.
struct World {
    _dir: tempfile::TempDir,
    chain: SimChain,
    store: Store,
    manager: Manager,
    /// Per wallet: its descriptors' seed index, and its lookahead.
    wallets: BTreeMap<WalletId, (u32, u32)>,
    /// Coins the test paid to wallets and has not spent yet.
    paid: Vec<(WalletId, OutPoint)>,
    /// Per wallet, per keychain, the highest index paid.
    used: BTreeMap<(WalletId, u8), u32>,
    /// Per wallet, the ranges targeted imports derived past its gap limit
    /// (keychain, end): the oracle expects them watched.
    imported: BTreeMap<WalletId, Vec<(Keychain, u32)>>,
    rng: ChaCha8Rng,
}

const SEED: u64 = 61;

/// The simulator pays from matured coinbases: chains start this high.
const MATURE: u32 = 101;

fn config() -> ManagerConfig {
    ManagerConfig {
        batch_size: 16,
        prefetch: 8,
        poll_interval: Duration::from_millis(10),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        ..ManagerConfig::default()
    }
}

impl World {
    fn new(seed: u64, height: u32) -> World {
        let chain = SimChain::generate(
            SimParams::unsigned(seed).with_load(3..=8, 1..=2),
            MATURE + height,
        )
        .unwrap();
        World::with_source(chain.clone(), Arc::new(chain), config(), seed)
    }

    fn with_source(
        chain: SimChain,
        source: Arc<dyn ChainSource>,
        config: ManagerConfig,
        seed: u64,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(store.clone(), source, config);
        World {
            _dir: dir,
            chain,
            store,
            manager,
            wallets: BTreeMap::new(),
            paid: Vec::new(),
            used: BTreeMap::new(),
            imported: BTreeMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    async fn add(&mut self, index: u32, birth_height: u32, lookahead: u32) -> WalletId {
        let id = self
            .manager
            .register(NewWallet {
                name: format!("w{index}"),
                descriptors: test_descriptors(SEED, index),
                birth_height,
                lookahead,
                passphrase: None,
            })
            .await
            .unwrap();
        self.wallets.insert(id, (index, lookahead));
        id
    }

    fn script(&self, id: WalletId, keychain: Keychain, i: u32) -> ScriptBuf {
        let (index, _) = self.wallets[&id];
        test_descriptors(SEED, index)
            .script_at(keychain, i)
            .unwrap()
    }

    /// Pays a random script inside the wallet's lookahead window.
    fn pay_random(&mut self, id: WalletId) -> OutPoint {
        let (_, lookahead) = self.wallets[&id];
        let keychain = if self.rng.gen_bool(0.7) {
            Keychain::External
        } else {
            Keychain::Internal
        };
        let used = self.used.get(&(id, keychain as u8)).map_or(0, |u| u + 1);
        let i = used + self.rng.gen_range(0..lookahead);
        let amount = Amount::from_sat(self.rng.gen_range(10_000..5_000_000));
        self.pay(id, keychain, i, amount)
    }

    fn pay(&mut self, id: WalletId, keychain: Keychain, i: u32, amount: Amount) -> OutPoint {
        let op = self
            .chain
            .pay(self.script(id, keychain, i), amount)
            .unwrap();
        let e = self.used.entry((id, keychain as u8)).or_insert(i);
        *e = (*e).max(i);
        self.paid.push((id, op));
        op
    }

    /// Spends a random coin the test paid: to another wallet's window, or
    /// back to the same wallet's internal keychain.
    fn spend_random(&mut self) {
        if self.paid.is_empty() {
            return;
        }
        let pick = self.rng.gen_range(0..self.paid.len());
        let (from, op) = self.paid.swap_remove(pick);
        let Some(out) = self
            .chain
            .unspent(&op)
            .filter(|o| o.value.to_sat() >= 20_000)
        else {
            return;
        };
        let ids: Vec<WalletId> = self.wallets.keys().copied().collect();
        let to = ids[self.rng.gen_range(0..ids.len())];
        let half = out.value.to_sat() / 2;
        let used_to = self.used.get(&(to, 0)).map_or(0, |u| u + 1);
        let used_change = self.used.get(&(from, 1)).map_or(0, |u| u + 1);
        let outputs = vec![
            TxOut {
                value: Amount::from_sat(half),
                script_pubkey: self.script(to, Keychain::External, used_to),
            },
            TxOut {
                value: Amount::from_sat(out.value.to_sat() - half - 1_000),
                script_pubkey: self.script(from, Keychain::Internal, used_change),
            },
        ];
        let txid = self.chain.spend(op, outputs, None).unwrap();
        *self.used.entry((to, 0)).or_insert(used_to) = used_to;
        *self.used.entry((from, 1)).or_insert(used_change) = used_change;
        self.paid.push((to, OutPoint { txid, vout: 0 }));
        self.paid.push((from, OutPoint { txid, vout: 1 }));
    }

    /// A few blocks of activity: payments and spends, then mining.
    fn activity(&mut self, rounds: u32) {
        let ids: Vec<WalletId> = self.wallets.keys().copied().collect();
        for _ in 0..rounds {
            for _ in 0..self.rng.gen_range(1..6) {
                let id = ids[self.rng.gen_range(0..ids.len())];
                self.pay_random(id);
            }
            for _ in 0..self.rng.gen_range(0..3) {
                self.spend_random();
            }
            self.chain.mine(self.rng.gen_range(1..3)).unwrap();
        }
    }

    /// Every registered wallet equals the oracle at the loop's tip, which
    /// is the chain's tip.
    fn check_all(&self) {
        let tip = self.chain.tip();
        let checks = self
            .store
            .read_blocking(|tx| {
                let (height, hash) = tx.tip()?.expect("the loop has a tip");
                assert_eq!(height, tip.height, "the loop is at the chain's tip");
                assert_eq!(hash, bitcoin::hashes::Hash::to_byte_array(tip.hash));
                let mut checks = Vec::new();
                for row in tx.wallets()? {
                    assert_eq!(
                        row.importing_height, None,
                        "{} is still importing",
                        row.name
                    );
                    let imported = self
                        .imported
                        .get(&row.wallet_id)
                        .map_or(&[][..], Vec::as_slice);
                    checks.push(check_wallet_imported(
                        tx,
                        &self.chain,
                        row.wallet_id,
                        height,
                        imported,
                    )?);
                }
                Ok::<_, lockstep_wallet::WalletError>(checks)
            })
            .unwrap();
        assert_eq!(checks.len(), self.wallets.len());
        let bad: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
        assert!(bad.is_empty(), "wallets differ from the oracle: {bad:#?}");
        let received: usize = checks.iter().map(|c| c.txs).sum();
        assert!(received > 0, "the scenario paid wallets");
    }

    async fn sync(&self) {
        let height = self.manager.sync().await.unwrap();
        assert_eq!(height, self.chain.height());
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn hundred_wallets_equal_the_oracle() {
    runtime().block_on(async {
        let mut w = World::new(1, 30);
        for i in 0..100 {
            // Mixed types (by index) and birth heights, some below the
            // loop's tip (imports), some above.
            w.add(i, MATURE + (i * 7) % 45, 8 + i % 5).await;
        }
        w.activity(40);
        w.sync().await;
        w.check_all();
        w.activity(20);
        w.sync().await;
        w.check_all();
        let stats = w.manager.stats();
        assert!(stats.blocks_fetched < stats.filters_matched, "{stats:?}");
        assert!(
            stats.commits < stats.blocks_connected,
            "catch-up commits batches: {stats:?}"
        );
    });
}

/// N wallets cost the requests of one: each block's filter is asked for
/// once whatever the number of wallets, and filter headers come in one
/// request per batch of block headers (BIP157 `getcfheaders`), not one per
/// block.
#[test]
fn many_wallets_cost_the_requests_of_one() {
    runtime().block_on(async {
        let chain =
            SimChain::generate(SimParams::unsigned(12).with_load(3..=8, 1..=2), MATURE + 60)
                .unwrap();
        let header_batch = 25;
        let config = ManagerConfig {
            header_batch,
            ..config()
        };
        let mut meters = Vec::new();
        for wallets in [1, 12] {
            let metered = Metered::new(Arc::new(chain.clone()));
            let mut w =
                World::with_source(chain.clone(), Arc::new(metered.clone()), config.clone(), 12);
            for i in 0..wallets {
                w.add(i, 1, 10).await;
            }
            w.sync().await;
            meters.push(metered.meter());
        }
        let (one, many) = (meters[0], meters[1]);
        let blocks = u64::from(chain.height());
        assert_eq!(many.filters, one.filters, "{one:?} {many:?}");
        assert_eq!(many.filters, blocks, "one filter request per block");
        // Per batch: the headers and their filter headers. Then at most a
        // few more: the genesis block's hash (the source is on the
        // configured network), the block the loop starts from and its
        // header (its difficulty target), the filter header the scan
        // starts from, the empty answer at the tip.
        let batches = blocks.div_ceil(u64::from(header_batch));
        assert!(many.headers <= 2 * batches + 5, "{many:?}");
        assert!(many.headers >= 2 * batches, "{many:?}");
        assert_eq!(many.headers, one.headers, "{one:?} {many:?}");
    });
}

#[test]
fn import_mid_run_and_targeted_import() {
    runtime().block_on(async {
        let mut w = World::new(2, 20);
        let a = w.add(0, 1, 10).await;
        w.add(1, 1, 10).await;
        w.activity(10);
        w.sync().await;
        // A newcomer paid before it is registered, born at height 5.
        w.wallets.insert(WalletId::from_i64(-1), (7, 10));
        let early = w.pay(
            WalletId::from_i64(-1),
            Keychain::External,
            3,
            Amount::from_sat(777_000),
        );
        w.chain.mine(2).unwrap();
        w.wallets.remove(&WalletId::from_i64(-1));
        w.paid.retain(|(_, op)| *op != early);
        w.sync().await;
        let mut events = w.manager.subscribe();
        let before = w.manager.stats();
        let newcomer = w.add(7, MATURE + 5, 10).await;
        let imported = loop {
            match events.recv().await.unwrap() {
                Event::WalletImported { wallet, height } if wallet == newcomer => break height,
                Event::BlockConnected { .. } => panic!("the loop moved during the import"),
                _ => {}
            }
        };
        assert_eq!(imported, w.chain.height());
        let after = w.manager.stats();
        assert_eq!(
            after.blocks_connected, before.blocks_connected,
            "existing wallets got nothing"
        );
        w.check_all();
        let balance = w
            .store
            .read_blocking(|tx| tx.wallet_balance(newcomer))
            .unwrap();
        assert_eq!(balance, 777_000);

        // A payment past wallet a's window: invisible until a targeted
        // import derives and rescans it.
        let far = w.pay(a, Keychain::External, 500, Amount::from_sat(123_456));
        w.chain.mine(3).unwrap();
        w.activity(3);
        w.sync().await;
        w.check_all();
        let has_far = |w: &World| {
            w.store
                .read_blocking(|tx| tx.wallet_coins(a, false))
                .unwrap()
                .iter()
                .any(|c| c.txid == bitcoin::hashes::Hash::to_byte_array(far.txid))
        };
        assert!(!has_far(&w), "past the gap limit");
        let from = w.chain.height() - 8;
        w.manager
            .import_scripts(
                a,
                ScriptImport::Range {
                    keychain: Keychain::External,
                    end: 501,
                },
                from,
            )
            .await
            .unwrap();
        w.imported
            .entry(a)
            .or_default()
            .push((Keychain::External, 501));
        assert!(has_far(&w), "the targeted import found the payment");
        w.check_all();
        // A script the wallet does not derive is refused with a typed error.
        let foreign = w.script(newcomer, Keychain::External, 0);
        let err = w
            .manager
            .import_scripts(a, ScriptImport::Scripts(vec![foreign]), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, ManagerError::NotWalletScript { .. }), "{err}");
        w.activity(3);
        w.sync().await;
        w.check_all();
    });
}

#[test]
fn reorgs_at_the_tip_and_deep() {
    runtime().block_on(async {
        let mut w = World::new(3, 20);
        for i in 0..12 {
            w.add(i, 1, 10).await;
        }
        for (round, (depth, txs)) in [
            (1, ReorgTxs::Drop),
            (3, ReorgTxs::Reappear),
            (25, ReorgTxs::Drop),
            (2, ReorgTxs::Reappear),
            (40, ReorgTxs::Reappear),
        ]
        .into_iter()
        .enumerate()
        {
            w.activity(30);
            w.sync().await;
            w.check_all();
            let mut events = w.manager.subscribe();
            w.chain.reorg(depth, txs).unwrap();
            w.activity(2);
            w.sync().await;
            w.check_all();
            let mut disconnected = 0;
            while let Ok(event) = events.try_recv() {
                if let Event::BlockDisconnected { .. } = event {
                    disconnected += 1;
                }
            }
            assert!(
                disconnected >= depth,
                "round {round}: {disconnected} disconnected for depth {depth}"
            );
        }
    });
}

#[test]
fn lookahead_burst_across_blocks_and_inside_one() {
    runtime().block_on(async {
        let mut w = World::new(4, 10);
        let id = w.add(0, 1, 10).await;
        w.sync().await;
        // Inside one block: scripts 0..30 (3 windows), paid in reverse
        // order so each payment's script is derived by a later one.
        let mut total = 0;
        for i in (0..30).rev() {
            w.pay(
                id,
                Keychain::External,
                i,
                Amount::from_sat(10_000 + u64::from(i)),
            );
            total += 10_000 + u64::from(i);
        }
        w.chain.mine(1).unwrap();
        // Across consecutive blocks: internal scripts 0..30, 9 apart.
        for i in (0..30).step_by(9) {
            w.pay(id, Keychain::Internal, i, Amount::from_sat(20_000));
            total += 20_000;
            w.chain.mine(1).unwrap();
        }
        w.sync().await;
        w.check_all();
        let balance = w.store.read_blocking(|tx| tx.wallet_balance(id)).unwrap();
        assert_eq!(balance, total, "every payment of the burst was found");
    });
}

#[test]
fn stop_and_start_many_times() {
    runtime().block_on(async {
        let mut w = World::new(5, 10);
        for i in 0..6 {
            w.add(i, 1, 10).await;
        }
        w.sync().await;
        let first = w.chain.height() + 1;
        let mut events = w.manager.subscribe();
        let mut connected: Vec<u32> = Vec::new();
        for round in 0..40 {
            w.manager.start();
            w.activity(2);
            if round % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(round % 7)).await;
            }
            w.manager.stop().await;
            while let Ok(event) = events.try_recv() {
                if let Event::BlockConnected { height, .. } = event {
                    connected.push(height);
                }
            }
        }
        w.manager.start();
        w.manager
            .wait_for_block(w.chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        w.manager.stop().await;
        while let Ok(event) = events.try_recv() {
            if let Event::BlockConnected { height, .. } = event {
                connected.push(height);
            }
        }
        // Every block once, in order: none twice, none skipped.
        let expected: Vec<u32> = (first..=w.chain.height()).collect();
        assert_eq!(connected, expected);
        w.check_all();
    });
}

/// A source that fails a fraction of its requests, and sometimes hangs
/// past the request timeout.
struct Flaky {
    inner: SimChain,
    calls: AtomicU64,
    failed: AtomicU64,
    /// An outage: every request fails.
    down: AtomicBool,
}

impl Flaky {
    fn roll(&self) -> Result<(), SourceError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(SourceError::Unavailable {
                reason: "outage".to_owned(),
            });
        }
        // A fixed pseudo-random pattern: about one request in five fails.
        if (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) < 6 {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(SourceError::Unavailable {
                reason: format!("flaky request {n}"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ChainSource for Flaky {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        self.roll()?;
        ChainSource::tip(&self.inner).await
    }
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.roll()?;
        ChainSource::block_hash(&self.inner, height).await
    }
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        self.roll()?;
        self.inner.header(hash).await
    }
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        self.roll()?;
        self.inner.headers(from, count).await
    }
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        self.roll()?;
        if self.calls.load(Ordering::Relaxed).is_multiple_of(97) {
            // Hangs past the manager's request timeout.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.inner.filter(hash).await
    }
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        self.roll()?;
        self.inner.filter_header(hash).await
    }
    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        self.roll()?;
        self.inner.filter_headers(blocks).await
    }
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        self.roll()?;
        self.inner.block(hash).await
    }
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        self.inner.broadcast(tx).await
    }
}

#[test]
fn a_flaky_source_is_retried_until_synced() {
    runtime().block_on(async {
        let chain = SimChain::generate(SimParams::unsigned(6).with_load(3..=8, 1..=2), MATURE + 10)
            .unwrap();
        let flaky = Arc::new(Flaky {
            inner: chain.clone(),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            down: AtomicBool::new(false),
        });
        let config = ManagerConfig {
            request_timeout: Duration::from_millis(100),
            ..config()
        };
        let mut w = World::with_source(chain, flaky.clone(), config, 6);
        for i in 0..8 {
            // Registration needs the source; retry it like a caller would.
            loop {
                match w
                    .manager
                    .register(NewWallet {
                        name: format!("w{i}"),
                        descriptors: test_descriptors(SEED, i),
                        birth_height: 1,
                        lookahead: 10,
                        passphrase: None,
                    })
                    .await
                {
                    Ok(id) => {
                        w.wallets.insert(id, (i, 10));
                        break;
                    }
                    Err(e) => assert_eq!(e.kind(), lockstep_manager::ErrorKind::Retryable, "{e}"),
                }
            }
        }
        let mut status = w.manager.status();
        let offline = Arc::new(AtomicBool::new(false));
        let seen = offline.clone();
        let watcher = tokio::spawn(async move {
            while status.changed().await.is_ok() {
                if matches!(*status.borrow(), Status::Offline { .. }) {
                    seen.store(true, Ordering::Relaxed);
                }
            }
        });
        w.manager.start();
        w.activity(30);
        // An outage: the loop goes offline, commits nothing, and comes
        // back when the source does.
        let failed = || flaky.failed.load(Ordering::Relaxed);
        let outage = failed();
        flaky.down.store(true, Ordering::Relaxed);
        w.activity(5);
        let status = w.manager.status();
        let is_offline = || matches!(*status.borrow(), Status::Offline { .. });
        // Anything fetched before the outage may still commit: the tip is
        // taken once the loop has seen the outage and gone offline...
        eventually("the loop to go offline", async || {
            is_offline() && failed() >= outage + 5
        })
        .await;
        let stalled = *w.manager.tip().borrow();
        // ... and must not move while the loop keeps trying.
        let tried = failed();
        eventually("the loop to try again", async || failed() >= tried + 10).await;
        assert!(
            is_offline(),
            "the loop stays offline while the source is down"
        );
        assert_eq!(
            *w.manager.tip().borrow(),
            stalled,
            "nothing commits while the source is down"
        );
        assert!(
            stalled.is_some_and(|t| t.height < w.chain.height()),
            "blocks were waiting to be connected: {stalled:?}"
        );
        flaky.down.store(false, Ordering::Relaxed);
        w.activity(30);
        w.manager
            .wait_for_block(w.chain.tip(), Duration::from_secs(60))
            .await
            .unwrap();
        w.manager.stop().await;
        watcher.abort();
        w.check_all();
        assert!(
            flaky.failed.load(Ordering::Relaxed) > 20,
            "the source failed often"
        );
        assert!(
            offline.load(Ordering::Relaxed),
            "the status said offline while it failed"
        );
    });
}

/// A world whose source is a [`Liar`] (telling the truth for now), with one
/// wallet, synced.
async fn liar_world(seed: u64) -> (World, Arc<Liar>, WalletId) {
    let chain = SimChain::generate(
        SimParams::unsigned(seed).with_load(3..=8, 1..=2),
        MATURE + 5,
    )
    .unwrap();
    let liar = Arc::new(Liar::new(chain.clone()));
    let mut w = World::with_source(chain, liar.clone(), config(), seed);
    let id = w.add(0, 1, 10).await;
    w.sync().await;
    (w, liar, id)
}

/// A batch of filter headers that does not answer every block asked is a
/// typed error, and nothing of that batch is committed.
#[test]
fn a_short_batch_of_filter_headers_is_a_typed_error() {
    runtime().block_on(async {
        let (mut w, liar, id) = liar_world(9).await;
        let before = w.chain.tip();
        w.pay(id, Keychain::External, 0, Amount::from_sat(50_000));
        w.chain.mine(4).unwrap();
        liar.short_batches.store(true, Ordering::SeqCst);
        let err = w.manager.sync().await.unwrap_err();
        assert!(
            matches!(&err, ManagerError::Source(e) if e.kind() == ErrorKind::Invalid),
            "{err:?}"
        );
        assert_eq!(err.kind(), lockstep_manager::ErrorKind::Invalid);
        assert_eq!(*w.manager.tip().borrow(), Some(before));
        liar.short_batches.store(false, Ordering::SeqCst);
        w.sync().await;
        w.check_all();
    });
}

/// How [`Liar`] lies about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// A byte of its filter flipped (it still decodes).
    FlippedFilterByte,
    /// Its filter cut short.
    TruncatedFilter,
    /// A wrong filter header.
    WrongFilterHeader,
    /// A transaction of the block altered (the merkle root no longer
    /// matches).
    TamperedBlock,
}

/// A source that lies about the block at one hash, and can trigger a reorg
/// of its chain after some number of filter requests.
struct Liar {
    inner: SimChain,
    lie: std::sync::Mutex<Option<(BlockHash, Lie)>>,
    /// Filter requests left before the reorg (0: none armed).
    reorg_in: AtomicU64,
    reorged: AtomicBool,
    /// Answer batches of filter headers one short.
    short_batches: AtomicBool,
}

impl Liar {
    fn new(inner: SimChain) -> Liar {
        Liar {
            inner,
            lie: std::sync::Mutex::new(None),
            reorg_in: AtomicU64::new(0),
            reorged: AtomicBool::new(false),
            short_batches: AtomicBool::new(false),
        }
    }

    fn lie_about(&self, hash: BlockHash) -> Option<Lie> {
        match *self.lie.lock().unwrap() {
            Some((at, lie)) if at == hash => Some(lie),
            _ => None,
        }
    }
}

#[async_trait]
impl ChainSource for Liar {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        ChainSource::tip(&self.inner).await
    }
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        ChainSource::block_hash(&self.inner, height).await
    }
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        self.inner.header(hash).await
    }
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        self.inner.headers(from, count).await
    }
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        let left = self.reorg_in.load(Ordering::SeqCst);
        if left > 0 && self.reorg_in.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.reorg(3, ReorgTxs::Reappear).unwrap();
            self.inner.mine(2).unwrap();
            self.reorged.store(true, Ordering::SeqCst);
        }
        let mut filter = self.inner.filter(hash).await?;
        match self.lie_about(hash) {
            Some(Lie::FlippedFilterByte) => {
                let last = filter.len() - 1;
                filter[last] ^= 0x01;
            }
            Some(Lie::TruncatedFilter) => filter.truncate(filter.len() / 2),
            _ => {}
        }
        Ok(filter)
    }
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        let header = self.inner.filter_header(hash).await?;
        Ok(match self.lie_about(hash) {
            Some(Lie::WrongFilterHeader) => FilterHeader::all_zeros(),
            _ => header,
        })
    }
    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        let mut headers = Vec::with_capacity(blocks.len());
        for block in blocks {
            headers.push(self.filter_header(block.hash).await?);
        }
        if self.short_batches.load(Ordering::SeqCst) {
            headers.pop();
        }
        Ok(headers)
    }
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        let block = self.inner.block(hash).await?;
        Ok(match self.lie_about(hash) {
            Some(Lie::TamperedBlock) => {
                let mut block = (*block).clone();
                let last = block.txdata.len() - 1;
                block.txdata[last].output[0].value += Amount::from_sat(1);
                Arc::new(block)
            }
            _ => block,
        })
    }
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        self.inner.broadcast(tx).await
    }
}

use bitcoin::hashes::Hash as _;

#[test]
fn a_lying_source_gets_a_typed_error_and_nothing_is_committed() {
    runtime().block_on(async {
        let (mut w, liar, id) = liar_world(8).await;
        for (round, lie) in [
            Lie::FlippedFilterByte,
            Lie::TruncatedFilter,
            Lie::WrongFilterHeader,
            Lie::TamperedBlock,
        ]
        .into_iter()
        .enumerate()
        {
            // Three clean blocks, then the one lied about, which pays the
            // wallet (so the tampered block is fetched), then more.
            w.chain.mine(3).unwrap();
            let good = w.chain.tip();
            w.pay(
                id,
                Keychain::External,
                round as u32,
                Amount::from_sat(50_000),
            );
            let bad = w.chain.mine(1).unwrap()[0];
            w.chain.mine(2).unwrap();
            *liar.lie.lock().unwrap() = Some((bad.hash, lie));
            let err = w.manager.sync().await.unwrap_err();
            let expected = match (&err, lie) {
                (
                    ManagerError::FilterHeaderMismatch { height, .. },
                    Lie::FlippedFilterByte | Lie::WrongFilterHeader,
                ) => *height == bad.height,
                (ManagerError::BadFilter { height, .. }, Lie::TruncatedFilter) => {
                    *height == bad.height
                }
                (ManagerError::BadBlock { height, .. }, Lie::TamperedBlock) => {
                    *height == bad.height
                }
                _ => false,
            };
            assert!(expected, "{lie:?} gave {err:?}");
            assert_eq!(err.kind(), lockstep_manager::ErrorKind::Invalid);
            // Nothing at or past the bad block was committed.
            assert_eq!(*w.manager.tip().borrow(), Some(good), "{lie:?}");
            let committed = w.store.read_blocking(|tx| tx.tip()).unwrap().unwrap();
            assert_eq!(committed, (good.height, good.hash.to_byte_array()));
            // The source mends its ways: the loop goes on, and is right.
            *liar.lie.lock().unwrap() = None;
            w.sync().await;
            w.check_all();
        }
    });
}

#[test]
fn a_reorg_during_an_import_ends_consistent() {
    for trigger in [3, 20, 45] {
        runtime().block_on(async {
            let chain =
                SimChain::generate(SimParams::unsigned(11).with_load(3..=8, 1..=2), MATURE + 5)
                    .unwrap();
            let liar = Arc::new(Liar::new(chain.clone()));
            let mut w = World::with_source(chain, liar.clone(), config(), 11);
            for i in 0..4 {
                w.add(i, 1, 8).await;
            }
            // The newcomer is paid all along, including in the blocks the
            // reorg will replace.
            w.wallets.insert(WalletId::from_i64(-1), (9, 8));
            w.activity(40);
            w.wallets.remove(&WalletId::from_i64(-1));
            w.paid.retain(|(id, _)| *id != WalletId::from_i64(-1));
            w.sync().await;
            liar.reorg_in.store(trigger, Ordering::SeqCst);
            w.add(9, MATURE, 8).await;
            assert!(
                liar.reorged.load(Ordering::SeqCst),
                "trigger {trigger}: the reorg happened during the import"
            );
            w.sync().await;
            w.check_all();
            w.activity(5);
            w.sync().await;
            w.check_all();
        });
    }
}

#[test]
fn every_strategy_gives_the_oracle() {
    use lockstep_manager::Strategy;
    runtime().block_on(async {
        let mut fetched = Vec::new();
        for strategy in [Strategy::Filters, Strategy::Blocks, Strategy::Auto] {
            let mut w = World::new(12, 5);
            w.manager = Manager::new(
                w.store.clone(),
                Arc::new(w.chain.clone()),
                ManagerConfig {
                    strategy,
                    ..config()
                },
            );
            for i in 0..10 {
                w.add(i, 1, 10).await;
            }
            w.activity(60);
            w.sync().await;
            w.check_all();
            let stats = w.manager.stats();
            if strategy == Strategy::Blocks {
                assert_eq!(
                    stats.blocks_fetched, stats.blocks_connected,
                    "the block path fetches every block"
                );
                assert_eq!(stats.filters_matched, 0);
            }
            fetched.push(stats.blocks_fetched);
        }
        assert!(
            fetched[0] < fetched[1],
            "filters fetch fewer blocks: {fetched:?}"
        );
    });
}

/// A hook that fails at one height, and counts what it saw.
struct Hook {
    fail_at: AtomicU64,
    connected: AtomicU64,
    disconnected: AtomicU64,
}

impl lockstep_manager::BlockHook for Hook {
    fn block_connected(
        &self,
        _tx: &mut lockstep_store::WriteTx<'_>,
        height: u32,
        _hash: &BlockHash,
    ) -> Result<(), lockstep_manager::HookError> {
        if u64::from(height) == self.fail_at.load(Ordering::SeqCst) {
            return Err("the hook refuses this block".into());
        }
        self.connected.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn blocks_disconnected(
        &self,
        _tx: &mut lockstep_store::WriteTx<'_>,
        _fork_height: u32,
    ) -> Result<(), lockstep_manager::HookError> {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn the_block_hook_commits_with_the_block_or_not_at_all() {
    runtime().block_on(async {
        let mut w = World::new(13, 5);
        let hook = Arc::new(Hook {
            fail_at: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
        });
        w.manager.set_hook(hook.clone()).await;
        for i in 0..4 {
            w.add(i, 1, 10).await;
        }
        w.activity(10);
        w.sync().await;
        let before = w.chain.height();
        w.activity(10);
        let fail_at = before + 3;
        hook.fail_at.store(u64::from(fail_at), Ordering::SeqCst);
        let err = w.manager.sync().await.unwrap_err();
        assert!(matches!(err, ManagerError::Hook(_)), "{err}");
        assert_eq!(err.kind(), lockstep_manager::ErrorKind::Fatal);
        let (tip, _) = w.store.read_blocking(|tx| tx.tip()).unwrap().unwrap();
        assert!(
            tip < fail_at,
            "the refused block and its batch were not committed"
        );
        // No wallet holds anything from the refused block or later.
        for id in w.wallets.keys() {
            let coins = w
                .store
                .read_blocking(move |tx| tx.wallet_coins(*id, false))
                .unwrap();
            assert!(coins.iter().all(|c| c.height <= tip));
        }
        hook.fail_at.store(0, Ordering::SeqCst);
        w.sync().await;
        w.check_all();
        w.chain.reorg(2, ReorgTxs::Drop).unwrap();
        w.sync().await;
        w.check_all();
        assert_eq!(hook.disconnected.load(Ordering::SeqCst), 1);
        assert!(hook.connected.load(Ordering::SeqCst) >= u64::from(w.chain.height() - 1));
    });
}
