//! The manager syncing through Bitcoin Core's interfaces: `BitcoindSource`
//! talking REST and JSON-RPC over real loopback HTTP to the stand-in node
//! (`SimNode`) that serves a SimChain, every wallet compared with the
//! chain's oracle — the same path a deployment against a real node takes:
//! syncing from scratch, importing a wallet while others are synced,
//! broadcasting and replacing through `sendrawtransaction`, a node that
//! goes away and comes back, and a node that lies.

use std::sync::Arc;
use std::time::Duration;

use bitcoin::{
    Amount, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness,
};
use lockstep_chain::{
    BitcoindAuth, BitcoindConfig, BitcoindSource, BroadcastError, ChainSource, RejectReason,
    SourceError,
};
use lockstep_manager::{ErrorKind, Manager, ManagerConfig, ManagerError, NewWallet, Status};
use lockstep_sim::{Lie, ReorgTxs, SimChain, SimNode, SimNodeConfig, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_wallet::Keychain;

const SEED: u64 = 17;
/// Wallets synced from scratch through the node.
const WALLETS: u32 = 20;

fn config() -> ManagerConfig {
    ManagerConfig {
        batch_size: 16,
        prefetch: 8,
        poll_interval: Duration::from_millis(10),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(10),
        ..ManagerConfig::default()
    }
}

/// Every wallet equals the oracle at the chain's tip.
fn check_all(store: &Store, chain: &SimChain, wallets: &[WalletId]) {
    let tip = chain.tip();
    let checks = store
        .read_blocking(|tx| {
            let (height, _) = tx.tip()?.expect("the loop has a tip");
            assert_eq!(height, tip.height);
            wallets
                .iter()
                .map(|id| check_wallet(tx, chain, *id, height))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    let bad: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(bad.is_empty(), "wallets differ from the oracle: {bad:#?}");
    assert!(checks.iter().map(|c| c.txs).sum::<usize>() > 0);
}

async fn run(rest: bool) {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(3..=8, 1..=2), 110).unwrap();
    let config = SimNodeConfig {
        rest,
        ..SimNodeConfig::default()
    };
    let served = Served::start(chain.clone(), config).await;
    assert_eq!(served.source.uses_rest(), rest);
    let (store, manager) = (&served.store, &served.manager);
    let mut wallets = Vec::new();
    for i in 0..WALLETS {
        wallets.push(served.add(i).await);
    }
    let pay = |i: u32, k: Keychain, n: u32, sat: u64| {
        let script = test_descriptors(SEED, i).script_at(k, n).unwrap();
        chain.pay(script, Amount::from_sat(sat)).unwrap()
    };
    for round in 0..6u32 {
        for i in 0..WALLETS {
            pay(
                i,
                Keychain::External,
                round,
                50_000 + u64::from(i * 1000 + round),
            );
        }
        pay(round % WALLETS, Keychain::Internal, round, 20_000);
        chain.mine(2).unwrap();
    }
    assert_eq!(manager.sync().await.unwrap(), chain.height());
    check_all(store, &chain, &wallets);

    // A spend between wallets, and a reorg that drops a block.
    let coin = pay(0, Keychain::External, 7, 80_000);
    chain.mine(1).unwrap();
    chain.spend_to(coin, script(1, 8), None).unwrap();
    chain.mine(3).unwrap();
    assert_eq!(manager.sync().await.unwrap(), chain.height());
    check_all(store, &chain, &wallets);
    chain.reorg(2, ReorgTxs::Drop).unwrap();
    assert_eq!(manager.sync().await.unwrap(), chain.height());
    check_all(store, &chain, &wallets);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn wallets_synced_through_core_rest_equal_the_oracle() {
    runtime().block_on(run(true));
}

#[test]
fn wallets_synced_through_core_rpc_only_equal_the_oracle() {
    runtime().block_on(run(false));
}

/// A node serving a chain, and a manager syncing through it.
struct Served {
    chain: SimChain,
    node: Option<SimNode>,
    /// The node's data directory (its cookie).
    datadir: tempfile::TempDir,
    /// The source the manager reads, for broadcasting.
    source: Arc<BitcoindSource>,
    store: Store,
    manager: Manager,
    _db: tempfile::TempDir,
}

impl Served {
    /// `chain` served with `config` (the cookie in a fresh data
    /// directory), and a manager over a fresh database.
    async fn start(chain: SimChain, node_config: SimNodeConfig) -> Served {
        let datadir = tempfile::tempdir().unwrap();
        let node = SimNode::start(
            chain.clone(),
            SimNodeConfig {
                cookie_dir: Some(datadir.path().to_owned()),
                ..node_config
            },
        )
        .await
        .unwrap();
        let source = Arc::new(
            BitcoindSource::connect(BitcoindConfig::new(
                node.url(),
                BitcoindAuth::Cookie(node.cookie_path().unwrap().to_owned()),
                Network::Regtest,
            ))
            .await
            .unwrap(),
        );
        let db = tempfile::tempdir().unwrap();
        let store = Store::open(&db.path().join("lockstep.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(store.clone(), source.clone(), config());
        Served {
            chain,
            node: Some(node),
            datadir,
            source,
            store,
            manager,
            _db: db,
        }
    }

    /// Registers test wallet `index` (born at height 1).
    async fn add(&self, index: u32) -> WalletId {
        self.manager
            .register(NewWallet {
                name: format!("w{index}"),
                descriptors: test_descriptors(SEED, index),
                birth_height: 1,
                lookahead: 10,
                passphrase: None,
            })
            .await
            .unwrap()
    }

    /// Pays `sat` to script `n` of test wallet `index`'s external keychain.
    fn pay(&self, index: u32, n: u32, sat: u64) -> OutPoint {
        self.chain
            .pay(script(index, n), Amount::from_sat(sat))
            .unwrap()
    }

    /// The wallet's transactions: txid and height (`None`: unconfirmed).
    fn history(&self, id: WalletId) -> Vec<(Txid, Option<u32>)> {
        use bitcoin::hashes::Hash as _;
        self.store
            .read_blocking(move |tx| tx.wallet_txs(id))
            .unwrap()
            .into_iter()
            .map(|t| (Txid::from_byte_array(t.txid), t.height))
            .collect()
    }
}

/// External script `n` of test wallet `index`.
fn script(index: u32, n: u32) -> ScriptBuf {
    test_descriptors(SEED, index)
        .script_at(Keychain::External, n)
        .unwrap()
}

/// A transaction spending `coin` (of `value`, paid to a P2WPKH script) to
/// `to`, leaving `fee`. The chain is unsigned: the witness has the shape
/// and size of a P2WPKH spend, as SimChain's own, and no signature.
fn spend(coin: OutPoint, value: u64, to: ScriptBuf, fee: u64) -> Transaction {
    let mut witness = Witness::new();
    witness.push([0x5a; 72]);
    let mut public = [0x5a; 33];
    public[0] = 0x02;
    witness.push(public);
    Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: coin,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness,
        }],
        output: vec![TxOut {
            value: Amount::from_sat(value - fee),
            script_pubkey: to,
        }],
    }
}

async fn wallet_imported_while_others_are_synced() {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(2..=4, 1..=2), 105).unwrap();
    let served = Served::start(chain, SimNodeConfig::default()).await;
    let mut wallets = Vec::new();
    for i in 0..3 {
        wallets.push(served.add(i).await);
    }
    // Payments to the synced wallets and to the one imported later.
    for round in 0..4 {
        for i in 0..4 {
            served.pay(i, round, 30_000 + u64::from(i * 100 + round));
        }
        served.chain.mine(2).unwrap();
    }
    assert_eq!(served.manager.sync().await.unwrap(), served.chain.height());
    check_all(&served.store, &served.chain, &wallets);
    // Imported at the loop's tip, its history read through the node.
    let late = served.add(3).await;
    let imported = served.history(late);
    assert_eq!(imported.len(), 4, "{imported:?}");
    wallets.push(late);
    check_all(&served.store, &served.chain, &wallets);
    // And it follows the chain with the others afterwards.
    served.pay(3, 4, 41_000);
    served.pay(0, 4, 42_000);
    served.chain.mine(1).unwrap();
    assert_eq!(served.manager.sync().await.unwrap(), served.chain.height());
    check_all(&served.store, &served.chain, &wallets);
}

#[test]
fn a_wallet_imported_through_core_while_others_are_synced_equals_the_oracle() {
    runtime().block_on(wallet_imported_while_others_are_synced());
}

async fn broadcast_and_replacement() {
    let chain = SimChain::generate(SimParams::unsigned(SEED), 102).unwrap();
    let served = Served::start(chain, SimNodeConfig::default()).await;
    let (payer, payee) = (served.add(0).await, served.add(1).await);
    // Test wallet 0 is P2WPKH: `spend`'s witness has the right shape.
    assert!(script(0, 0).is_p2wpkh());
    let first = served.pay(0, 0, 100_000);
    let second = served.pay(0, 1, 100_000);
    served.chain.mine(1).unwrap();
    served.manager.sync().await.unwrap();

    // A broadcast through sendrawtransaction, confirmed, seen by both.
    let tx = spend(first, 100_000, script(1, 0), 1_000);
    let txid = served.source.broadcast(&tx).await.unwrap();
    assert_eq!(txid, tx.compute_txid());
    assert!(served.history(payee).is_empty(), "not mined yet");
    let mined = served.chain.mine(1).unwrap()[0];
    assert_eq!(served.manager.sync().await.unwrap(), mined.height);
    assert!(served.history(payee).contains(&(txid, Some(mined.height))));
    assert!(served.history(payer).contains(&(txid, Some(mined.height))));
    check_all(&served.store, &served.chain, &[payer, payee]);

    // A replacement paying less than the original: InsufficientFee, and
    // the original stays; one paying enough replaces it.
    let original = spend(second, 100_000, script(1, 1), 1_000);
    let original_txid = served.source.broadcast(&original).await.unwrap();
    let cheaper = spend(second, 100_000, script(1, 2), 500);
    match served.source.broadcast(&cheaper).await {
        Err(BroadcastError::Rejected {
            txid,
            reason: RejectReason::InsufficientFee { rule },
        }) => {
            assert_eq!(txid, cheaper.compute_txid());
            assert!(rule.to_string().contains("new feerate"), "{rule}");
        }
        other => panic!("{other:?}"),
    }
    assert!(served.chain.mempool().contains(&original));
    let bumped = spend(second, 100_000, script(1, 3), 3_000);
    let bumped_txid = served.source.broadcast(&bumped).await.unwrap();
    let mempool = served.chain.mempool();
    assert!(mempool.contains(&bumped) && !mempool.contains(&original));
    let mined = served.chain.mine(1).unwrap()[0];
    served.manager.sync().await.unwrap();
    let history = served.history(payee);
    assert!(
        history.contains(&(bumped_txid, Some(mined.height))),
        "{history:?}"
    );
    assert!(
        !history.iter().any(|(t, _)| *t == original_txid),
        "{history:?}"
    );
    check_all(&served.store, &served.chain, &[payer, payee]);
}

#[test]
fn a_broadcast_and_a_replacement_through_core_are_seen_confirmed() {
    runtime().block_on(broadcast_and_replacement());
}

async fn node_goes_away_mid_sync() {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(2..=4, 1..=2), 103).unwrap();
    let mut served = Served::start(chain, SimNodeConfig::default()).await;
    let wallets = vec![served.add(0).await, served.add(1).await];
    served.pay(0, 0, 60_000);
    served.chain.mine(1).unwrap();
    served.manager.start();
    let wait = Duration::from_secs(30);
    served
        .manager
        .wait_for(served.chain.height(), wait)
        .await
        .unwrap();

    // The node stops (and removes its cookie); blocks keep coming.
    let node = served.node.take().unwrap();
    let port = node.addr().port();
    node.shutdown().await;
    let stalled = served.manager.tip().borrow().unwrap();
    for n in 1..4 {
        served.pay(n % 2, n, 61_000);
        served.chain.mine(2).unwrap();
    }
    let mut status = served.manager.status();
    let offline = tokio::time::timeout(
        wait,
        status.wait_for(|s| matches!(s, Status::Offline { .. })),
    )
    .await
    .expect("the loop goes offline")
    .unwrap()
    .clone();
    match offline {
        Status::Offline { error, .. } => assert!(error.contains("unavailable"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(served.manager.tip().borrow().unwrap(), stalled);

    // Back on the same port with a new cookie: the loop catches up alone.
    let node = SimNode::start(
        served.chain.clone(),
        SimNodeConfig {
            port,
            cookie_dir: Some(served.datadir.path().to_owned()),
            ..SimNodeConfig::default()
        },
    )
    .await
    .unwrap();
    let tip = served.chain.tip();
    served.manager.wait_for_block(tip, wait).await.unwrap();
    tokio::time::timeout(
        wait,
        status.wait_for(|s| matches!(s, Status::Synced { .. })),
    )
    .await
    .expect("the loop is synced again")
    .unwrap();
    served.manager.stop().await;
    check_all(&served.store, &served.chain, &wallets);
    // The broadcast path logs in again with the new cookie.
    let coin = served.pay(0, 9, 50_000);
    served.chain.mine(1).unwrap();
    let tx = spend(coin, 50_000, script(1, 9), 1_000);
    assert_eq!(
        served.source.broadcast(&tx).await.unwrap(),
        tx.compute_txid()
    );
    node.shutdown().await;
}

#[test]
fn the_manager_recovers_when_a_node_that_went_away_comes_back() {
    runtime().block_on(node_goes_away_mid_sync());
}

/// A database synced through a node that lies about the block at `at`,
/// where wallet 0 was paid (so that the block is fetched): the error, and
/// the loop's tip after it.
async fn sync_from_a_liar(lie: impl Fn(u32) -> Lie) -> (ManagerError, u32, u32) {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(2..=4, 1..=2), 101).unwrap();
    let paid = |chain: &SimChain, n| {
        chain.pay(script(0, n), Amount::from_sat(70_000)).unwrap();
        chain.mine(1).unwrap()[0].height
    };
    paid(&chain, 0);
    let at = paid(&chain, 1);
    paid(&chain, 2);
    let config = SimNodeConfig {
        lie: Some(lie(at)),
        ..SimNodeConfig::default()
    };
    let served = Served::start(chain, config).await;
    served.add(0).await;
    let error = served.manager.sync().await.unwrap_err();
    let tip = served
        .store
        .read_blocking(|tx| tx.tip())
        .unwrap()
        .map_or(0, |(height, _)| height);
    (error, at, tip)
}

async fn lying_node() {
    // A filter the node's own filter headers do not commit to.
    let (error, at, tip) = sync_from_a_liar(Lie::Filter).await;
    match &error {
        ManagerError::FilterHeaderMismatch { height, .. } => assert_eq!(*height, at),
        other => panic!("{other:?}"),
    }
    assert_eq!(error.kind(), ErrorKind::Invalid);
    assert!(
        tip < at,
        "nothing from the lie is committed: tip {tip}, lie at {at}"
    );
    // Another block for the hash.
    let (error, at, tip) = sync_from_a_liar(Lie::Block).await;
    match &error {
        ManagerError::Source(SourceError::Invalid { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(error.kind(), ErrorKind::Invalid);
    assert!(tip < at, "tip {tip}, lie at {at}");
}

#[test]
fn a_node_that_lies_stops_the_sync_as_invalid() {
    runtime().block_on(lying_node());
}
