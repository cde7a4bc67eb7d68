//! Unconfirmed transactions: the manager's view of the source's mempool,
//! compared with the SimChain's mempool oracle after unconfirmed
//! receives, spends (chained too), a replacement, an eviction, a
//! confirmation and a reorg that returns a block's transactions to the
//! mempool. Each scenario runs twice: on the embedded SimChain, and
//! through `BitcoindSource` over real loopback HTTP to the stand-in node
//! (REST, then JSON-RPC only).

use std::sync::Arc;
use std::time::Duration;

use bitcoin::{Amount, Network, OutPoint, ScriptBuf, TxOut, Txid};
use lockstep_chain::metered::Metered;
use lockstep_chain::{BitcoindAuth, BitcoindConfig, BitcoindSource, ChainSource};
use lockstep_manager::{Event, Manager, ManagerConfig, NewWallet};
use lockstep_sim::{ReorgTxs, SimChain, SimNode, SimNodeConfig, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{check_unconfirmed, check_wallet, test_descriptors};
use lockstep_wallet::Keychain;

const SEED: u64 = 1717;
const WALLETS: u32 = 6;

/// How the manager reaches the chain.
#[derive(Debug, Clone, Copy)]
enum Via {
    Embedded,
    Rest,
    RpcOnly,
}

/// The stand-in node serving `chain`, with the user lockstep/test.
async fn start_node(chain: &SimChain, config: SimNodeConfig) -> SimNode {
    let config = SimNodeConfig {
        user_password: Some(("lockstep".to_owned(), "test".to_owned())),
        ..config
    };
    SimNode::start(chain.clone(), config).await.unwrap()
}

/// A source configuration for `node`, logging in as lockstep/test.
fn source_config(node: &SimNode) -> BitcoindConfig {
    let auth = BitcoindAuth::UserPassword {
        user: "lockstep".to_owned(),
        password: "test".to_owned(),
    };
    BitcoindConfig::new(node.url(), auth, Network::Regtest)
}

struct Rig {
    chain: SimChain,
    store: Store,
    manager: Manager,
    wallets: Vec<WalletId>,
    _node: Option<SimNode>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new(via: Via) -> Rig {
        let chain =
            SimChain::generate(SimParams::unsigned(SEED).with_load(2..=5, 1..=2), 105).unwrap();
        let (source, node): (Arc<dyn ChainSource>, _) = match via {
            Via::Embedded => (Arc::new(chain.clone()), None),
            Via::Rest | Via::RpcOnly => {
                let node = start_node(
                    &chain,
                    SimNodeConfig {
                        rest: matches!(via, Via::Rest),
                        ..SimNodeConfig::default()
                    },
                )
                .await;
                let source = BitcoindSource::connect(source_config(&node)).await.unwrap();
                (Arc::new(source), Some(node))
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(
            store.clone(),
            source,
            ManagerConfig {
                poll_interval: Duration::from_millis(10),
                initial_backoff: Duration::from_millis(5),
                ..ManagerConfig::default()
            },
        );
        let mut wallets = Vec::new();
        for i in 0..WALLETS {
            wallets.push(
                manager
                    .register(NewWallet {
                        name: format!("w{i}"),
                        descriptors: test_descriptors(SEED, i),
                        birth_height: 1,
                        lookahead: 5,
                        passphrase: None,
                    })
                    .await
                    .unwrap(),
            );
        }
        Rig {
            chain,
            store,
            manager,
            wallets,
            _node: node,
            _dir: dir,
        }
    }

    fn script(&self, wallet: u32, keychain: Keychain, index: u32) -> ScriptBuf {
        test_descriptors(SEED, wallet)
            .script_at(keychain, index)
            .unwrap()
    }

    /// Syncs blocks and the mempool, then checks every wallet's confirmed
    /// and unconfirmed state against the oracle; returns the wallets'
    /// unconfirmed counts.
    async fn sync_and_check(&self, step: &str) -> Vec<usize> {
        let height = self.manager.sync().await.unwrap();
        assert_eq!(height, self.chain.height(), "{step}");
        let chain = self.chain.clone();
        let wallets = self.wallets.clone();
        let (confirmed, unconfirmed) = self
            .store
            .read_blocking(move |tx| {
                let mut confirmed = Vec::new();
                let mut unconfirmed = Vec::new();
                for id in &wallets {
                    confirmed.push(check_wallet(tx, &chain, *id, height)?);
                    unconfirmed.push(check_unconfirmed(tx, &chain, *id, height)?);
                }
                Ok::<_, lockstep_wallet::WalletError>((confirmed, unconfirmed))
            })
            .unwrap();
        let bad: Vec<_> = confirmed.iter().filter(|c| !c.ok()).collect();
        assert!(bad.is_empty(), "{step}: confirmed differs: {bad:#?}");
        let bad: Vec<_> = unconfirmed.iter().filter(|c| !c.ok()).collect();
        assert!(bad.is_empty(), "{step}: unconfirmed differs: {bad:#?}");
        unconfirmed.iter().map(|c| c.txs).collect()
    }

    async fn balance(&self, wallet: usize) -> lockstep_wallet::Balance {
        let live = self.manager.wallet(self.wallets[wallet]).await.unwrap();
        live.balance().await.unwrap()
    }

    async fn history_of(&self, wallet: usize, txid: Txid) -> Option<lockstep_wallet::HistoryTx> {
        let live = self.manager.wallet(self.wallets[wallet]).await.unwrap();
        live.history()
            .await
            .unwrap()
            .into_iter()
            .find(|h| h.txid == txid)
    }
}

async fn scenario(via: Via) {
    let rig = Rig::new(via).await;
    let mut events = rig.manager.subscribe();
    // Confirmed coins first: every wallet paid twice, mined.
    let mut coins: Vec<OutPoint> = Vec::new();
    for i in 0..WALLETS {
        coins.push(
            rig.chain
                .pay(
                    rig.script(i, Keychain::External, 0),
                    Amount::from_sat(90_000 + u64::from(i)),
                )
                .unwrap(),
        );
        rig.chain
            .pay(
                rig.script(i, Keychain::External, 1),
                Amount::from_sat(40_000),
            )
            .unwrap();
    }
    rig.chain.mine(1).unwrap();
    assert_eq!(
        rig.sync_and_check("confirmed").await,
        vec![0; WALLETS as usize]
    );

    // Unconfirmed receives from others. w1's go each to the script past
    // the window the one before moves it to, listed last first: all four
    // must be seen in one poll, in passes, as for a block.
    let payment = rig
        .chain
        .pay(
            rig.script(0, Keychain::External, 2),
            Amount::from_sat(25_000),
        )
        .unwrap();
    for index in [18, 14, 10, 6] {
        rig.chain
            .pay(
                rig.script(1, Keychain::External, index),
                Amount::from_sat(26_000),
            )
            .unwrap();
    }
    let counts = rig.sync_and_check("receives").await;
    assert_eq!(&counts[..2], &[1, 4], "every receive of w1 counted");
    let w0 = rig.manager.wallet(rig.wallets[0]).await.unwrap();
    let b0 = w0.balance().await.unwrap();
    assert_eq!(b0.untrusted_pending, Amount::from_sat(25_000));
    assert_eq!(b0.trusted_pending, Amount::ZERO);
    let seen = rig.history_of(0, payment.txid).await.unwrap();
    assert_eq!((seen.height, seen.from_mempool), (None, true));
    let mut announced = false;
    while let Ok(event) = events.try_recv() {
        if let Event::Unconfirmed { txid, wallets } = event
            && txid == payment.txid
        {
            assert_eq!(wallets, vec![rig.wallets[0]]);
            announced = true;
        }
    }
    assert!(announced, "the unconfirmed payment was announced");

    // Spends: w2 pays itself (trusted), w3 pays w4 (outgoing for w3,
    // untrusted for w4), and w4 passes that unconfirmed output on to w5 (a
    // chain of two unconfirmed transactions).
    let own = rig
        .chain
        .spend_to(coins[2], rig.script(2, Keychain::Internal, 0), None)
        .unwrap();
    let to_w4 = rig
        .chain
        .spend_to(coins[3], rig.script(4, Keychain::External, 2), None)
        .unwrap();
    let to_w5 = rig
        .chain
        .spend_to(
            OutPoint::new(to_w4, 0),
            rig.script(5, Keychain::External, 2),
            None,
        )
        .unwrap();
    rig.sync_and_check("spends").await;
    let b2 = rig.balance(2).await;
    assert_eq!(b2.trusted_pending, Amount::from_sat(90_002 - 500));
    assert_eq!(b2.unconfirmed_outgoing, Amount::from_sat(90_002));
    let b4 = rig.balance(4).await;
    assert_eq!(b4.untrusted_pending, Amount::ZERO, "w4 passed it on");
    assert!(rig.history_of(4, to_w5).await.is_some());

    // A replacement: the payment to w4 is replaced by one to w1, paying
    // more; w4 and w5 lose both transactions, w1 gains one, w3 keeps its
    // outgoing coin through the replacement.
    let replacement = rig
        .chain
        .spend(
            coins[3],
            vec![TxOut {
                value: Amount::from_sat(90_003 - 5_000),
                script_pubkey: rig.script(1, Keychain::Internal, 0),
            }],
            None,
        )
        .unwrap();
    assert!(
        !rig.chain
            .mempool()
            .iter()
            .any(|t| t.compute_txid() == to_w4)
    );
    rig.sync_and_check("replacement").await;
    assert!(rig.history_of(4, to_w4).await.is_none());
    assert!(rig.history_of(5, to_w5).await.is_none());
    assert!(rig.history_of(1, replacement).await.is_some());

    // An eviction: the payment to w0 expires from the mempool.
    assert_eq!(rig.chain.evict(payment.txid), vec![payment.txid]);
    rig.sync_and_check("eviction").await;
    assert!(rig.history_of(0, payment.txid).await.is_none());
    let b0 = w0.balance().await.unwrap();
    assert_eq!(b0.untrusted_pending, Amount::ZERO);

    // Confirmation: everything left in the mempool confirms.
    rig.chain.mine(1).unwrap();
    let counts = rig.sync_and_check("confirmation").await;
    assert_eq!(counts, vec![0; WALLETS as usize]);
    assert!(rig.history_of(2, own).await.unwrap().height.is_some());

    // A reorg returns the block's transactions to the mempool.
    rig.chain
        .pay(
            rig.script(0, Keychain::External, 3),
            Amount::from_sat(31_000),
        )
        .unwrap();
    rig.chain.mine(1).unwrap();
    rig.sync_and_check("before the reorg").await;
    rig.chain.reorg(2, ReorgTxs::ToMempool).unwrap();
    let counts = rig.sync_and_check("reorg").await;
    assert!(counts.iter().sum::<usize>() >= 3, "{counts:?}");
    assert!(rig.history_of(2, own).await.unwrap().height.is_none());
    rig.chain.mine(1).unwrap();
    let counts = rig.sync_and_check("after the reorg").await;
    assert_eq!(counts, vec![0; WALLETS as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_view_follows_the_embedded_mempool() {
    scenario(Via::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_view_follows_a_node_over_rest() {
    scenario(Via::Rest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_view_follows_a_node_over_rpc_only() {
    scenario(Via::RpcOnly).await;
}

/// The wallet's own broadcast that leaves the mempool stays in its
/// history, marked, and counts in no balance until the mempool takes it
/// back; one seen only in the mempool goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_broadcast_out_of_the_mempool_is_marked_not_forgotten() {
    let rig = Rig::new(Via::Embedded).await;
    let coin = rig
        .chain
        .pay(
            rig.script(0, Keychain::External, 0),
            Amount::from_sat(70_000),
        )
        .unwrap();
    rig.chain.mine(1).unwrap();
    rig.sync_and_check("paid").await;
    // w0 builds a transaction to itself; the wallet records it as its
    // broadcast before the source gets it (as an action does).
    let spend = bitcoin::Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![bitcoin::TxIn {
            previous_output: coin,
            script_sig: ScriptBuf::new(),
            sequence: bitcoin::Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: bitcoin::Witness::from_slice(&[vec![0u8; 72], vec![2u8; 33]]),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(69_000),
            script_pubkey: rig.script(0, Keychain::Internal, 0),
        }],
    };
    let txid = spend.compute_txid();
    let live = rig.manager.wallet(rig.wallets[0]).await.unwrap();
    let recorded = spend.clone();
    live.record_broadcast(recorded).await.unwrap();
    rig.chain.submit(spend.clone()).unwrap();
    rig.sync_and_check("broadcast").await;
    assert_eq!(
        live.balance().await.unwrap().trusted_pending,
        Amount::from_sat(69_000)
    );

    rig.chain.evict(txid);
    rig.sync_and_check("evicted").await;
    let history = rig.history_of(0, txid).await.expect("kept in the history");
    assert!(history.left_mempool && !history.from_mempool);
    let balance = live.balance().await.unwrap();
    assert_eq!(balance.trusted_pending, Amount::ZERO);
    assert_eq!(balance.unconfirmed_outgoing, Amount::ZERO);

    rig.chain.submit(spend).unwrap();
    rig.sync_and_check("back").await;
    assert!(!rig.history_of(0, txid).await.unwrap().left_mempool);
    assert_eq!(
        live.balance().await.unwrap().trusted_pending,
        Amount::from_sat(69_000)
    );
}

/// A running loop over `source` (serving `chain`) with one wallet, `w0`,
/// looking for blocks every 10 ms and listing the mempool every
/// `mempool_poll_interval`; returned once it reached the chain's tip.
async fn synced_loop(
    chain: &SimChain,
    source: Arc<dyn ChainSource>,
    mempool_poll_interval: Duration,
) -> (Manager, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
    let manager = Manager::new(
        store,
        source,
        ManagerConfig {
            poll_interval: Duration::from_millis(10),
            mempool_poll_interval,
            initial_backoff: Duration::from_millis(5),
            ..ManagerConfig::default()
        },
    );
    manager
        .register(NewWallet {
            name: "w0".to_owned(),
            descriptors: test_descriptors(SEED, 0),
            birth_height: 1,
            lookahead: 5,
            passphrase: None,
        })
        .await
        .unwrap();
    manager.start();
    manager
        .wait_for(chain.height(), Duration::from_secs(30))
        .await
        .unwrap();
    (manager, dir)
}

/// Starts a node publishing ZMQ `rawtx` (or, with `dead_endpoint`, points
/// the source at a port nobody publishes on) and a running loop that polls
/// its mempool every `mempool_poll_interval`; returns what a test needs
/// to pay and watch.
async fn zmq_rig(
    dead_endpoint: bool,
    mempool_poll_interval: Duration,
) -> (SimChain, SimNode, Manager, ScriptBuf, tempfile::TempDir) {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(2..=5, 1..=2), 105).unwrap();
    let node = start_node(
        &chain,
        SimNodeConfig {
            zmq_rawtx: true,
            ..SimNodeConfig::default()
        },
    )
    .await;
    let endpoint = if dead_endpoint {
        // A port that was free a moment ago: nothing publishes there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("tcp://127.0.0.1:{port}")
    } else {
        node.zmq_rawtx().unwrap().to_owned()
    };
    let source = BitcoindSource::connect(source_config(&node).with_zmq_rawtx(endpoint))
        .await
        .unwrap();
    let (manager, dir) = synced_loop(&chain, Arc::new(source), mempool_poll_interval).await;
    let script = test_descriptors(SEED, 0)
        .script_at(Keychain::External, 0)
        .unwrap();
    (chain, node, manager, script, dir)
}

/// Pays `script` until the loop announces an unconfirmed transaction,
/// giving each payment `patience`; whether one was announced in `tries`.
async fn announced_within(
    chain: &SimChain,
    manager: &Manager,
    script: &ScriptBuf,
    tries: u32,
    patience: Duration,
) -> bool {
    let mut events = manager.subscribe();
    for _ in 0..tries {
        chain.pay(script.clone(), Amount::from_sat(30_000)).unwrap();
        let seen = tokio::time::timeout(patience, async {
            loop {
                match events.recv().await {
                    Ok(Event::Unconfirmed { .. }) => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if seen == Ok(true) {
            return true;
        }
    }
    false
}

/// With the node's ZMQ `rawtx` feed, a payment is seen at once although the
/// loop polls the mempool only every minute: the feed wakes the poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_rawtx_wakes_the_mempool_poll_at_once() {
    let (chain, _node, manager, script, _dir) = zmq_rig(false, Duration::from_secs(60)).await;
    // The loop's first poll at the tip finds a first payment whatever
    // wakes it; then it settles into its minute-long wait.
    assert!(announced_within(&chain, &manager, &script, 1, Duration::from_secs(10)).await);
    // Time passes, not a wait for a state: the first poll's tail is over,
    // so that what follows is found by a wake (the assertion below waits
    // for its own events).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ZMQ subscribers may miss what is published while they connect: a
    // few payments, 2 s each, well inside the minute a poll would take.
    assert!(
        announced_within(&chain, &manager, &script, 5, Duration::from_secs(2)).await,
        "no unconfirmed payment seen within 10 s: the ZMQ feed did not wake the poll"
    );
    manager.stop().await;
}

/// With the feed down (nothing publishes at the endpoint), polling finds
/// the payment all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_zmq_feed_polling_finds_the_payment() {
    let (chain, _node, manager, script, _dir) = zmq_rig(true, Duration::from_millis(50)).await;
    assert!(announced_within(&chain, &manager, &script, 1, Duration::from_secs(10)).await);
    manager.stop().await;
}

/// The synced loop looks for blocks every `poll_interval` but lists the
/// source's mempool (all of it, each time) only every
/// `mempool_poll_interval`, and after each new block: at 10 ms between
/// looks for blocks, a second at the tip lists the mempool once or twice,
/// not a hundred times; a mined block brings one more listing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synced_loop_lists_the_mempool_on_its_own_schedule() {
    let chain = SimChain::generate(SimParams::unsigned(SEED).with_load(2..=5, 1..=2), 105).unwrap();
    let metered = Metered::new(Arc::new(chain.clone()));
    let (manager, _dir) =
        synced_loop(&chain, Arc::new(metered.clone()), Duration::from_secs(60)).await;
    let at_tip = metered.meter();
    // A rate over a second, and that something does not happen: no more
    // than one listing in that time; the second has to pass.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = metered.meter();
    let looks = idle.tips - at_tip.tips;
    let listings = idle.mempool_listings - at_tip.mempool_listings;
    assert!(
        looks >= 20,
        "the loop looked for blocks {looks} times in a second"
    );
    assert!(
        listings <= 1,
        "{listings} mempool listings in a second at the tip (looks for blocks: {looks})"
    );
    // A new block: the mempool is listed again at once.
    chain.mine(1).unwrap();
    manager
        .wait_for(chain.height(), Duration::from_secs(30))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metered.meter().mempool_listings == idle.mempool_listings {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mempool listing after a new block"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    manager.stop().await;
}
