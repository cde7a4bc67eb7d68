//! Trust: the synced state stays exact under a second process, a lagging,
//! lying or inconsistent source, and a hiccup in the middle of an import.
//! Each test fails when the check it names is taken out.
//!
//! One source, [`Rig`], serves a `SimChain` that the test can swap for
//! another branch, truncate (a lagging node), hold back filters for (an
//! index behind its block index), extend with forged blocks, make hang, or
//! make fail at one height.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::hashes::Hash as _;
use bitcoin::pow::CompactTarget;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{
    Amount, Block, BlockHash, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxMerkleNode,
    TxOut, Txid, Witness,
};
use lockstep_chain::filters::{basic_filter, filter_header};
use lockstep_chain::{BlockId, BroadcastError, ChainSource, Missing, SourceError};
use lockstep_manager::{
    BlockHook, ErrorKind, Event, HookError, Manager, ManagerConfig, ManagerError, NewWallet,
    ScriptImport, Status,
};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId, WriteTx};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_tests::rig::runtime;
use lockstep_tests::wait::eventually;
use lockstep_wallet::{Keychain, WalletDescriptors};

const SEED: u64 = 131;
const MATURE: u32 = 101;

fn config() -> ManagerConfig {
    ManagerConfig {
        batch_size: 8,
        prefetch: 8,
        poll_interval: Duration::from_millis(10),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        request_retries: 2,
        ..ManagerConfig::default()
    }
}

fn chain(seed: u64, height: u32) -> SimChain {
    SimChain::generate(SimParams::unsigned(seed).with_load(2..=5, 1..=2), height).unwrap()
}

/// An independent copy of a chain (clones share state).
fn copy(chain: &SimChain, dir: &std::path::Path, name: &str) -> SimChain {
    let path = dir.join(name);
    chain.save(&path).unwrap();
    SimChain::load(&path).unwrap()
}

/// A block the rig serves above its chain, built by the test.
#[derive(Clone)]
struct Forged {
    block: Arc<Block>,
    filter: Vec<u8>,
    filter_header: FilterHeader,
}

/// The test's chain source: see the module docs.
struct Rig {
    chain: RwLock<SimChain>,
    /// Serve nothing above this height (a lagging node).
    limit: AtomicU32,
    /// Filters above this height are "not found" (an index behind).
    filter_limit: AtomicU32,
    /// Every request hangs while set.
    hang: AtomicBool,
    /// Requests hanging right now.
    hanging: AtomicU64,
    /// `block_hash` at this height fails (unavailable).
    fail_at: AtomicU32,
    /// Blocks above the chain's tip.
    forged: Mutex<Vec<Forged>>,
    filters: AtomicU64,
}

const NONE: u32 = u32::MAX;

impl Rig {
    fn new(chain: SimChain) -> Arc<Rig> {
        Arc::new(Rig {
            chain: RwLock::new(chain),
            limit: AtomicU32::new(NONE),
            filter_limit: AtomicU32::new(NONE),
            hang: AtomicBool::new(false),
            hanging: AtomicU64::new(0),
            fail_at: AtomicU32::new(NONE),
            forged: Mutex::new(Vec::new()),
            filters: AtomicU64::new(0),
        })
    }

    fn chain(&self) -> SimChain {
        self.chain.read().unwrap().clone()
    }

    async fn gate(&self) {
        if self.hang.load(Ordering::SeqCst) {
            self.hanging.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    }

    fn top(&self) -> u32 {
        let chain = self.chain();
        let height = chain.height() + self.forged.lock().unwrap().len() as u32;
        height.min(self.limit.load(Ordering::SeqCst))
    }

    /// The forged block with this hash, and its height.
    fn forged(&self, hash: &BlockHash) -> Option<(u32, Forged)> {
        let base = self.chain().height();
        let forged = self.forged.lock().unwrap();
        forged
            .iter()
            .position(|f| f.block.block_hash() == *hash)
            .map(|i| (base + 1 + i as u32, forged[i].clone()))
    }

    /// The height of a served block, if it is served.
    fn served(&self, hash: &BlockHash) -> Option<u32> {
        let height = self
            .chain()
            .height_of(hash)
            .or_else(|| self.forged(hash).map(|(h, _)| h))?;
        (height <= self.top()).then_some(height)
    }

    fn hash_at(&self, height: u32) -> Option<BlockHash> {
        if height > self.top() {
            return None;
        }
        let chain = self.chain();
        chain.hash_at(height).or_else(|| {
            let forged = self.forged.lock().unwrap();
            let i = height.checked_sub(chain.height() + 1)? as usize;
            forged.get(i).map(|f| f.block.block_hash())
        })
    }

    /// Forges a block on top of whatever the rig serves, holding `txs`
    /// after a coinbase; `mined` chooses a nonce that meets its target (or
    /// one that does not).
    fn forge(&self, txs: Vec<Transaction>, bits: CompactTarget, mined: bool) -> BlockId {
        let chain = self.chain();
        let (height, prev, prev_filter_header) = {
            let forged = self.forged.lock().unwrap();
            match forged.last() {
                Some(f) => (
                    chain.height() + 1 + forged.len() as u32,
                    f.block.block_hash(),
                    f.filter_header,
                ),
                None => (
                    chain.height() + 1,
                    chain.tip().hash,
                    chain.filter_header_at(chain.height()).unwrap(),
                ),
            }
        };
        let coinbase = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: Builder::new()
                    .push_int(i64::from(height))
                    .push_slice(PushBytesBuf::from([0xf0u8; 4]))
                    .into_script(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(50_000),
                script_pubkey: ScriptBuf::new_op_return([1u8; 4]),
            }],
        };
        let mut block = Block {
            header: Header {
                version: BlockVersion::from_consensus(0x2000_0000),
                prev_blockhash: prev,
                merkle_root: TxMerkleNode::all_zeros(),
                time: chain.block_at(chain.height()).unwrap().header.time
                    + 600 * (height - chain.height()),
                bits,
                nonce: 0,
            },
            txdata: std::iter::once(coinbase).chain(txs).collect(),
        };
        block.header.merkle_root = block.compute_merkle_root().unwrap();
        while block.header.target().is_met_by(block.block_hash()) != mined {
            block.header.nonce += 1;
        }
        let filter = basic_filter(&block, |_| Some(ScriptBuf::new_op_return([9u8; 4]))).unwrap();
        let header = filter_header(&filter, &prev_filter_header);
        let hash = block.block_hash();
        self.forged.lock().unwrap().push(Forged {
            block: Arc::new(block),
            filter,
            filter_header: header,
        });
        BlockId { height, hash }
    }
}

fn missing(what: Missing) -> SourceError {
    SourceError::NotFound(what)
}

#[async_trait]
impl ChainSource for Rig {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        self.gate().await;
        let height = self.top();
        Ok(BlockId {
            height,
            hash: self.hash_at(height).unwrap(),
        })
    }
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.gate().await;
        if height == self.fail_at.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable {
                reason: format!("height {height} fails"),
            });
        }
        self.hash_at(height).ok_or(missing(Missing::Height(height)))
    }
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        self.gate().await;
        self.served(&hash).ok_or(missing(Missing::Header(hash)))?;
        match self.forged(&hash) {
            Some((_, f)) => Ok(f.block.header),
            None => self.chain().header(hash).await,
        }
    }
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        self.gate().await;
        let mut out = Vec::new();
        for height in from..from.saturating_add(count) {
            let Some(hash) = self.hash_at(height) else {
                break;
            };
            out.push(self.header(hash).await?);
        }
        if out.is_empty() {
            return Err(missing(Missing::Height(from)));
        }
        Ok(out)
    }
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        self.gate().await;
        self.filters.fetch_add(1, Ordering::SeqCst);
        let height = self.served(&hash).ok_or(missing(Missing::Filter(hash)))?;
        if height > self.filter_limit.load(Ordering::SeqCst) {
            return Err(missing(Missing::Filter(hash)));
        }
        match self.forged(&hash) {
            Some((_, f)) => Ok(f.filter),
            None => self.chain().filter(hash).await,
        }
    }
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        self.gate().await;
        self.served(&hash)
            .ok_or(missing(Missing::FilterHeader(hash)))?;
        match self.forged(&hash) {
            Some((_, f)) => Ok(f.filter_header),
            None => self.chain().filter_header(hash).await,
        }
    }
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        self.gate().await;
        self.served(&hash).ok_or(missing(Missing::Block(hash)))?;
        match self.forged(&hash) {
            Some((_, f)) => Ok(f.block),
            None => self.chain().block(hash).await,
        }
    }
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        self.chain().broadcast(tx).await
    }
}

/// A database, a rig and a manager on them.
struct World {
    dir: tempfile::TempDir,
    rig: Arc<Rig>,
    store: Store,
    manager: Manager,
}

impl World {
    fn new(chain: SimChain) -> World {
        World::with_config(chain, config())
    }

    fn with_config(chain: SimChain, config: ManagerConfig) -> World {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(chain);
        let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(store.clone(), rig.clone(), config);
        World {
            dir,
            rig,
            store,
            manager,
        }
    }

    /// Another process on the same database file: its own store handle
    /// (its own connections and lock file descriptor) and its own manager.
    fn second_process(&self) -> (Store, Manager) {
        let store = Store::open(
            &self.dir.path().join("lockstep.db"),
            StoreOptions::default(),
        )
        .unwrap();
        let manager = Manager::new(store.clone(), self.rig.clone(), config());
        (store, manager)
    }

    fn chain(&self) -> SimChain {
        self.rig.chain()
    }

    fn tip(&self) -> Option<(u32, BlockHash)> {
        self.store
            .read_blocking(|tx| tx.tip())
            .unwrap()
            .map(|(h, hash)| (h, BlockHash::from_byte_array(hash)))
    }

    fn balance(&self, id: WalletId) -> u64 {
        self.store
            .read_blocking(move |tx| tx.wallet_balance(id))
            .unwrap()
    }

    /// The wallet equals the oracle at the loop's tip, and is active.
    fn check(&self, id: WalletId) {
        let chain = self.chain();
        let check = self
            .store
            .read_blocking(move |tx| {
                let (height, _) = tx.tip()?.unwrap();
                let row = tx.wallet(id)?.unwrap();
                assert_eq!(row.importing_height, None, "{} is importing", row.name);
                check_wallet(tx, &chain, id, height)
            })
            .unwrap();
        assert!(check.ok(), "{check:#?}");
    }
}

fn wallet(index: u32, birth: u32) -> NewWallet {
    NewWallet {
        name: format!("t{index}"),
        descriptors: test_descriptors(SEED, index),
        birth_height: birth,
        lookahead: 10,
        passphrase: None,
    }
}

fn script(index: u32, i: u32) -> ScriptBuf {
    test_descriptors(SEED, index)
        .script_at(Keychain::External, i)
        .unwrap()
}

/// A second process registers wallets (one born above the loop's tip, one
/// below it) and starts a targeted import while the loop runs: the loop
/// picks each up and none of their payments is lost, also after a restart.
/// Before: the loop never loaded them and committed its tip past their
/// payments for good.
#[test]
fn wallets_registered_by_another_process_are_picked_up() {
    runtime().block_on(async {
        let mut w = World::new(chain(1, MATURE + 10));
        let a = w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.start();
        let chain = w.chain();
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        // A payment the newcomer born below the tip must find by import.
        chain.pay(script(2, 1), Amount::from_sat(222_000)).unwrap();
        chain.mine(1).unwrap();
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        let (_other_store, other) = w.second_process();
        let tip = chain.height();
        let above = other.register(wallet(1, tip + 1)).await.unwrap();
        let below = other.register(wallet(2, MATURE)).await.unwrap();
        // The other process does not run the loop: it registered only.
        let err = other.sync().await.unwrap_err();
        assert!(matches!(err, ManagerError::LoopElsewhere), "{err}");
        // Payments right after: the loop must already watch both.
        chain.pay(script(1, 0), Amount::from_sat(111_000)).unwrap();
        chain.pay(script(2, 2), Amount::from_sat(333_000)).unwrap();
        chain
            .pay(script(0, 400), Amount::from_sat(444_000))
            .unwrap();
        chain.mine(2).unwrap();
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        eventually("the import below the tip to finish", async || {
            importing(&w, below).is_none()
        })
        .await;
        for id in [a, above, below] {
            w.check(id);
        }
        assert_eq!(w.balance(above), 111_000);
        assert_eq!(w.balance(below), 222_000 + 333_000);
        // A targeted import from the other process: the loop rescans.
        assert_eq!(w.balance(a), 0, "index 400 is past the window");
        other
            .import_scripts(
                a,
                ScriptImport::Range {
                    keychain: Keychain::External,
                    end: 401,
                },
                MATURE,
            )
            .await
            .unwrap();
        chain.mine(1).unwrap();
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        // The loop ran the other process's targeted import.
        eventually("the import of a to finish with its coins", async || {
            importing(&w, a).is_none() && w.balance(a) == 444_000
        })
        .await;
        // After a restart, still all there.
        w.manager.stop().await;
        drop(other);
        w.manager = Manager::new(w.store.clone(), w.rig.clone(), config());
        chain.mine(1).unwrap();
        w.manager.sync().await.unwrap();
        assert_eq!(w.balance(above), 111_000);
        assert_eq!(w.balance(below), 555_000);
        assert_eq!(w.balance(a), 444_000);
        w.check(above);
        w.check(below);
    });
}

/// Under contention: three other processes register eight wallets each at
/// once (born below the tip, or above it), and pay them, while the loop
/// runs and the chain grows: the loop picks every one up and each equals
/// the oracle.
#[test]
fn many_wallets_registered_elsewhere_under_contention() {
    runtime().block_on(async {
        let w = World::new(chain(11, MATURE + 5));
        w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.start();
        let chain = w.chain();
        let mut tasks = Vec::new();
        for process in 0..3u32 {
            let (store, other) = w.second_process();
            let chain = chain.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for k in 0..8u32 {
                    let index = 1 + process * 8 + k;
                    let birth = if k % 2 == 0 {
                        MATURE
                    } else {
                        chain.height() + 1
                    };
                    ids.push((index, other.register(wallet(index, birth)).await.unwrap()));
                    let sats = 10_000 + u64::from(index);
                    chain
                        .pay(script(index, k % 3), Amount::from_sat(sats))
                        .unwrap();
                    if k % 3 == process % 3 {
                        chain.mine(1).unwrap();
                    }
                }
                drop(store);
                ids
            }));
        }
        let mut ids = Vec::new();
        for task in tasks {
            ids.extend(task.await.unwrap());
        }
        chain.mine(2).unwrap();
        eventually("every import to finish", async || {
            ids.iter().all(|(_, id)| importing(&w, *id).is_none())
        })
        .await;
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(60))
            .await
            .unwrap();
        w.manager.stop().await;
        for (index, id) in ids {
            assert_eq!(w.balance(id), 10_000 + u64::from(index), "wallet {index}");
            w.check(id);
        }
    });
}

/// A process that only registers (a CLI run while no daemon is up) lets go
/// of the loop's claim when done, so the daemon can start; registering
/// again while the daemon runs only writes, and the daemon imports.
#[test]
fn a_process_that_only_registers_does_not_hold_the_loop() {
    runtime().block_on(async {
        let w = World::new(chain(10, MATURE + 3));
        let (_store, cli) = w.second_process();
        let first = cli.register(wallet(0, 1)).await.unwrap();
        w.manager.sync().await.expect("the daemon runs the loop");
        w.check(first);
        let second = cli.register(wallet(1, 1)).await.unwrap();
        assert_eq!(importing(&w, second), Some(0), "written, for the daemon");
        w.manager.sync().await.unwrap();
        w.check(second);
    });
}

/// A wallet transaction paying 1 BTC to `to` from an input that exists
/// nowhere.
fn from_nowhere(to: ScriptBuf) -> Transaction {
    Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(Txid::from_byte_array([7; 32]), 0),
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![1u8; 72], vec![2u8; 33]]),
        }],
        output: vec![TxOut {
            value: Amount::ONE_BTC,
            script_pubkey: to,
        }],
    }
}

fn paying(outputs: Vec<(ScriptBuf, u64)>) -> Transaction {
    let mut tx = from_nowhere(ScriptBuf::new());
    tx.output = outputs
        .into_iter()
        .map(|(script_pubkey, sats)| TxOut {
            value: Amount::from_sat(sats),
            script_pubkey,
        })
        .collect();
    tx
}

const REGTEST_BITS: u32 = 0x207f_ffff;
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// Headers without proof of work, or with a target the network's rules do
/// not give, are refused and nothing of them is committed; amounts above
/// the money supply make the block bad. Before: a block nobody mined that
/// paid 1 BTC from nowhere was connected, and amounts were taken as given.
#[test]
fn proof_of_work_and_amounts_are_checked() {
    runtime().block_on(async {
        let w = World::new(chain(2, MATURE + 5));
        let id = w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.sync().await.unwrap();
        let good = w.tip().unwrap();
        let regtest = CompactTarget::from_consensus(REGTEST_BITS);
        let harder = CompactTarget::from_consensus(0x207f_fffe);
        // (what, its transactions, bits, mined, refused as a header)
        type Case = (&'static str, Vec<Transaction>, CompactTarget, bool, bool);
        let cases: Vec<Case> = vec![
            (
                "no proof of work",
                vec![from_nowhere(script(0, 0))],
                regtest,
                false,
                true,
            ),
            (
                "a target regtest does not give",
                vec![from_nowhere(script(0, 0))],
                harder,
                true,
                true,
            ),
            (
                "an output above the supply",
                vec![paying(vec![(script(0, 1), MAX_MONEY + 1)])],
                regtest,
                true,
                false,
            ),
            (
                "outputs adding up above the supply",
                vec![paying(vec![
                    (script(0, 1), MAX_MONEY),
                    (script(0, 2), MAX_MONEY),
                ])],
                regtest,
                true,
                false,
            ),
            (
                "an output of u64::MAX satoshis",
                vec![paying(vec![(script(0, 3), u64::MAX)])],
                regtest,
                true,
                false,
            ),
        ];
        for (name, txs, bits, mined, as_header) in cases {
            let forged = w.rig.forge(txs, bits, mined);
            let err = w.manager.sync().await.unwrap_err();
            let refused = match &err {
                ManagerError::BadHeader { height, .. } => as_header && *height == forged.height,
                ManagerError::BadBlock { height, .. } => !as_header && *height == forged.height,
                _ => false,
            };
            assert!(refused, "{name}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::Invalid, "{name}");
            assert_eq!(w.tip(), Some(good), "{name}: nothing committed");
            assert_eq!(w.balance(id), 0, "{name}");
            w.rig.forged.lock().unwrap().clear();
        }
        // The checks refuse only what is wrong: a mined block at regtest's
        // target is connected (on regtest proof of work costs nothing; see
        // the trust model in docs/architecture.md).
        w.rig.forge(vec![from_nowhere(script(0, 0))], regtest, true);
        w.manager.sync().await.unwrap();
        assert_eq!(w.balance(id), Amount::ONE_BTC.to_sat());
    });
}

/// The source's tip falls behind the loop on the same chain (a node
/// restarting), or moves to a branch with less work: the loop waits and
/// disconnects nothing; it follows a branch with more work. Before: a
/// source two blocks behind made the loop disconnect two confirmed blocks.
#[test]
fn a_lagging_source_or_a_lighter_branch_is_waited_for() {
    runtime().block_on(async {
        let base = chain(3, MATURE + 10);
        let w = World::new(base.clone());
        let id = w.manager.register(wallet(0, 1)).await.unwrap();
        let fork_height = base.height();
        let other = copy(&base, w.dir.path(), "other.sim");
        base.pay(script(0, 0), Amount::from_sat(50_000)).unwrap();
        base.mine(3).unwrap();
        w.manager.sync().await.unwrap();
        let top = w.tip().unwrap();
        assert_eq!(top.0, fork_height + 3);
        let mut events = w.manager.subscribe();
        // Two blocks behind, same chain.
        w.rig.limit.store(top.0 - 2, Ordering::SeqCst);
        w.manager.sync().await.unwrap();
        assert_eq!(w.tip(), Some(top), "the loop kept its tip");
        // A branch with less work: two blocks above the fork against three.
        other.pay(script(0, 1), Amount::from_sat(70_000)).unwrap();
        other.mine(2).unwrap();
        *w.rig.chain.write().unwrap() = other.clone();
        w.rig.limit.store(NONE, Ordering::SeqCst);
        w.manager.sync().await.unwrap();
        assert_eq!(w.tip(), Some(top), "no more work: not followed");
        assert_eq!(w.balance(id), 50_000);
        let disconnected = std::iter::from_fn(|| events.try_recv().ok())
            .filter(|e| matches!(e, Event::BlockDisconnected { .. }))
            .count();
        assert_eq!(disconnected, 0);
        assert_eq!(w.manager.stats().blocks_disconnected, 0);
        // Two more blocks: four against three, more work: followed.
        other.mine(2).unwrap();
        w.manager.sync().await.unwrap();
        assert_eq!(
            w.tip(),
            Some((other.height(), other.tip().hash)),
            "more work: followed"
        );
        assert_eq!(w.manager.stats().blocks_disconnected, 3);
        assert_eq!(w.balance(id), 70_000);
        w.check(id);
    });
}

/// Descriptors of another network are refused with nothing written, and
/// so is a source on another network. Before: a mainnet wallet registered
/// on a regtest chain and showed a balance.
#[test]
fn another_network_is_a_typed_error() {
    runtime().block_on(async {
        let w = World::new(chain(4, MATURE));
        let xpub = "xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8";
        let mainnet = WalletDescriptors::parse(
            &format!("wpkh({xpub}/0/*)"),
            &format!("wpkh({xpub}/1/*)"),
            bitcoin::Network::Bitcoin,
        )
        .unwrap();
        let err = w
            .manager
            .register(NewWallet {
                descriptors: mainnet,
                ..wallet(0, 1)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, ManagerError::WrongNetwork { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Invalid);
        let wallets = w.store.read_blocking(|tx| tx.wallets()).unwrap();
        assert!(wallets.is_empty(), "nothing written");
        // A manager configured for testnet on a regtest source.
        let store = Store::open(&w.dir.path().join("other.db"), StoreOptions::default()).unwrap();
        let testnet = Manager::new(
            store,
            w.rig.clone(),
            ManagerConfig {
                network: bitcoin::Network::Testnet,
                ..config()
            },
        );
        let err = testnet.sync().await.unwrap_err();
        assert!(matches!(err, ManagerError::SourceNetwork { .. }), "{err}");
    });
}

/// Registering is safe to retry: the same name and descriptors give the
/// same wallet, other descriptors under the name a typed error, and an
/// error after the wallet's row committed carries its id. An import cut by
/// a hiccup resumes in the same process once the source answers, also
/// when the hiccup hits the resumption at start-up. Before: the wallet
/// stayed importing (missing its payments, the loop saying Synced) until a
/// restart, and a retry gave `DuplicateWalletName`.
#[test]
fn registration_retries_and_import_hiccups() {
    runtime().block_on(async {
        let mut w = World::new(chain(5, MATURE + 30));
        let chain = w.chain();
        w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.sync().await.unwrap();
        // Paid before it is registered, born at MATURE + 5.
        let birth = MATURE + 5;
        chain.pay(script(1, 2), Amount::from_sat(90_000)).unwrap();
        chain.mine(2).unwrap();
        w.manager.sync().await.unwrap();
        // The import's first request fails, whatever the retries.
        w.rig.fail_at.store(birth - 1, Ordering::SeqCst);
        let err = w.manager.register(wallet(1, birth)).await.unwrap_err();
        let ManagerError::ImportIncomplete { wallet: id, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(importing(&w, id), Some(birth - 1));
        // Other descriptors under the taken name: refused, nothing written.
        let taken = w
            .manager
            .register(NewWallet {
                descriptors: test_descriptors(SEED, 9),
                ..wallet(1, birth)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(taken, ManagerError::WalletNameTaken { wallet, .. } if wallet == id),
            "{taken}"
        );
        assert_eq!(w.store.read_blocking(|tx| tx.wallets()).unwrap().len(), 2);
        // A restart while the source still fails at that height: the
        // resumption at start-up fails too, and is retried by the loop.
        w.manager = Manager::new(w.store.clone(), w.rig.clone(), config());
        w.manager.start();
        let mut status = w.manager.status();
        tokio::time::timeout(
            Duration::from_secs(30),
            status.wait_for(|s| matches!(s, Status::Offline { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(importing(&w, id), Some(birth - 1), "still importing");
        assert!(
            !matches!(*w.manager.status().borrow(), Status::Synced { .. }),
            "not synced while an import waits"
        );
        // The source answers again: the same process finishes the import.
        w.rig.fail_at.store(NONE, Ordering::SeqCst);
        tokio::time::timeout(
            Duration::from_secs(30),
            status.wait_for(|s| matches!(s, Status::Synced { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(importing(&w, id), None);
        assert_eq!(w.balance(id), 90_000);
        w.check(id);
        // The retry returns the same wallet.
        assert_eq!(w.manager.register(wallet(1, birth)).await.unwrap(), id);
        w.manager.stop().await;
    });
}

/// The wallet's import height (`None`: active).
fn importing(w: &World, id: WalletId) -> Option<u32> {
    w.store
        .read_blocking(move |tx| tx.wallet(id))
        .unwrap()
        .unwrap()
        .importing_height
}

/// A source whose filter index is behind its block index: its headers go
/// on, its filters are "not found". The loop retries a bounded number of
/// times, then shows Offline naming the missing filter, backing off; an
/// import returns instead of spinning; `stop()` returns. Before: the loop
/// spun through requests without end, an import never returned and held
/// the engine, and `stop()` waited forever.
#[test]
fn a_source_missing_part_of_its_own_chain_is_bounded() {
    runtime().block_on(async {
        let w = World::new(chain(6, MATURE + 5));
        w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.sync().await.unwrap();
        let chain = w.chain();
        w.rig
            .filter_limit
            .store(chain.height() + 2, Ordering::SeqCst);
        chain.mine(10).unwrap();
        w.manager.start();
        let mut status = w.manager.status();
        let offline = tokio::time::timeout(
            Duration::from_secs(30),
            status.wait_for(|s| matches!(s, Status::Offline { .. })),
        )
        .await
        .expect("the loop goes offline")
        .unwrap()
        .clone();
        let Status::Offline { error, .. } = offline else {
            unreachable!()
        };
        assert!(
            error.contains("basic filter"),
            "names what is missing: {error}"
        );
        // Backing off: few requests per second, not millions.
        let before = w.rig.filters.load(Ordering::SeqCst);
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let mut changes = w.manager.status();
        let watcher = tokio::spawn(async move {
            // Two more failed steps (the status is re-sent each time).
            for _ in 0..2 {
                changes.changed().await.unwrap();
            }
            let _ = tx.send(());
        });
        tokio::time::timeout(Duration::from_secs(30), &mut rx)
            .await
            .unwrap()
            .unwrap();
        watcher.abort();
        let during = w.rig.filters.load(Ordering::SeqCst) - before;
        assert!(during < 200, "{during} filter requests in two failed steps");
        assert_eq!(w.tip().unwrap().0, chain.height() - 8, "up to the index");
        tokio::time::timeout(Duration::from_secs(5), w.manager.stop())
            .await
            .expect("stop returns");
        // An import under the same source returns with an error: its
        // blocks from MATURE on have no filter now.
        w.rig.filter_limit.store(MATURE, Ordering::SeqCst);
        let import =
            tokio::time::timeout(Duration::from_secs(30), w.manager.register(wallet(1, 1)))
                .await
                .expect("the import returns");
        let err = import.unwrap_err();
        assert!(
            matches!(err, ManagerError::ImportIncomplete { .. }),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::Retryable);
        // The index catches up: everything completes.
        w.rig.filter_limit.store(NONE, Ordering::SeqCst);
        w.manager.sync().await.unwrap();
        assert_eq!(w.tip().unwrap().0, chain.height());
    });
}

/// A hook that fails from one height on.
struct FailingHook {
    from: AtomicU32,
}

impl BlockHook for FailingHook {
    fn block_connected(
        &self,
        _tx: &mut WriteTx<'_>,
        height: u32,
        _hash: &BlockHash,
    ) -> Result<(), HookError> {
        if height >= self.from.load(Ordering::SeqCst) {
            return Err("the hook's own table is gone".into());
        }
        Ok(())
    }

    fn blocks_disconnected(&self, _tx: &mut WriteTx<'_>, _fork: u32) -> Result<(), HookError> {
        Ok(())
    }
}

/// A fatal error stops the loop with a status that carries it. Before:
/// it was retried forever and the status said Offline.
#[test]
fn a_fatal_error_stops_the_loop() {
    runtime().block_on(async {
        let w = World::new(chain(7, MATURE + 5));
        w.manager
            .set_hook(Arc::new(FailingHook {
                from: AtomicU32::new(MATURE + 3),
            }))
            .await;
        w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.start();
        let mut status = w.manager.status();
        let failed = tokio::time::timeout(
            Duration::from_secs(30),
            status.wait_for(|s| matches!(s, Status::Failed { .. } | Status::Offline { .. })),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        let Status::Failed { error } = failed else {
            panic!("{failed:?}");
        };
        assert!(error.contains("hook"), "{error}");
        // The loop has ended by itself; stop keeps the status that says why.
        w.manager.stop().await;
        assert!(matches!(
            *w.manager.status().borrow(),
            Status::Failed { .. }
        ));
        assert!(w.tip().unwrap().0 < MATURE + 3);
    });
}

/// `stop()` returns promptly while requests hang (a timeout of a minute)
/// in the loop and in an import; the import is resumed at the next start.
/// Before: stop waited out every timeout and retry.
#[test]
fn stop_returns_promptly_while_requests_hang() {
    runtime().block_on(async {
        let w = World::with_config(
            chain(8, MATURE + 20),
            ManagerConfig {
                request_timeout: Duration::from_secs(60),
                ..config()
            },
        );
        let chain = w.chain();
        w.manager.register(wallet(0, 1)).await.unwrap();
        w.manager.sync().await.unwrap();
        w.manager.start();
        w.rig.hang.store(true, Ordering::SeqCst);
        chain.pay(script(1, 0), Amount::from_sat(10_000)).unwrap();
        chain.mine(2).unwrap();
        eventually("a request to hang", async || {
            w.rig.hanging.load(Ordering::SeqCst) > 0
        })
        .await;
        tokio::time::timeout(Duration::from_secs(2), w.manager.stop())
            .await
            .expect("stop returns while the loop's request hangs");
        // An import whose request hangs: stop ends it too.
        let hung = w.rig.hanging.load(Ordering::SeqCst);
        let manager = w.manager.clone();
        let import = tokio::spawn(async move { manager.register(wallet(1, MATURE)).await });
        eventually("another request to hang", async || {
            w.rig.hanging.load(Ordering::SeqCst) > hung
        })
        .await;
        tokio::time::timeout(Duration::from_secs(2), w.manager.stop())
            .await
            .expect("stop returns while an import's request hangs");
        let err = import.await.unwrap().unwrap_err();
        let ManagerError::ImportIncomplete { wallet: id, source } = err else {
            panic!("{err:?}");
        };
        assert!(matches!(*source, ManagerError::Stopped), "{source}");
        assert!(importing(&w, id).is_some(), "still importing");
        // The next start resumes it.
        w.rig.hang.store(false, Ordering::SeqCst);
        w.manager.start();
        w.manager
            .wait_for_block(chain.tip(), Duration::from_secs(30))
            .await
            .unwrap();
        eventually("the import to finish", async || importing(&w, id).is_none()).await;
        w.manager.stop().await;
        assert_eq!(w.balance(id), 10_000);
        w.check(id);
    });
}

/// The rig serves its chain as SimChain does, and its lag cuts it.
#[test]
fn the_rig_serves_the_chain_faithfully() {
    runtime().block_on(async {
        let w = World::new(chain(9, MATURE + 3));
        let chain = w.chain();
        for height in 0..=chain.height() {
            let hash = ChainSource::block_hash(&*w.rig, height).await.unwrap();
            assert_eq!(Some(hash), chain.hash_at(height));
        }
        let headers = w.rig.headers(1, 1000).await.unwrap();
        assert_eq!(headers.len() as u32, chain.height());
        w.rig.limit.store(5, Ordering::SeqCst);
        assert_eq!(ChainSource::tip(&*w.rig).await.unwrap().height, 5);
        assert!(ChainSource::block_hash(&*w.rig, 6).await.is_err());
    });
}
