//! Live wallets: addresses handed out and payments built on the
//! one live instance of a wallet while the chain loop runs and connects
//! blocks that pay and spend it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut};
use lockstep_manager::{Manager, ManagerConfig, NewWallet, WaitError};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{Store, StoreOptions};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_tests::rig::runtime;
use lockstep_tests::{key, p2wpkh, signing_descriptors};
use lockstep_wallet::{CoinState, Keychain, SpendRequest, WalletError};

fn config() -> ManagerConfig {
    ManagerConfig {
        poll_interval: Duration::from_millis(10),
        ..ManagerConfig::default()
    }
}

/// A chain of `height` blocks and a manager whose loop runs and has
/// reached its tip.
async fn started(dir: &std::path::Path, params: SimParams, height: u32) -> (SimChain, Manager) {
    let chain = SimChain::generate(params, height).unwrap();
    let store = Store::open(&dir.join("w.db"), StoreOptions::default()).unwrap();
    let manager = Manager::new(store, Arc::new(chain.clone()), config());
    manager.start();
    synced(&manager, &chain).await;
    (chain, manager)
}

/// Waits until the loop has reached the chain's tip.
async fn synced(manager: &Manager, chain: &SimChain) {
    manager
        .wait_for(chain.tip().height, Duration::from_secs(60))
        .await
        .unwrap();
}

/// Mines a block every `every` until `stop` is set.
fn miner(chain: SimChain, stop: Arc<AtomicBool>, every: Duration) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut mined = 0;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(every);
            chain.mine(1).unwrap();
            mined += 1;
        }
        mined
    })
}

/// Pays `script`, mining a block first if the simulator has no coin free.
fn pay(chain: &SimChain, script: ScriptBuf, sats: u64) -> OutPoint {
    for _ in 0..20 {
        if let Ok(outpoint) = chain.pay(script.clone(), Amount::from_sat(sats)) {
            return outpoint;
        }
        chain.mine(1).unwrap();
    }
    panic!("the simulator could not pay");
}

#[test]
fn addresses_revealed_while_the_loop_runs_are_credited_in_the_next_block() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let (chain, manager) = started(dir.path(), SimParams::unsigned(141), 110).await;
        // A narrow window: 100 reveals move it 20 times over.
        let id = manager
            .register(
                NewWallet::new("payee", test_descriptors(141, 0))
                    .born_at(111)
                    .lookahead(5),
            )
            .await
            .unwrap();
        // First alone: the 30th address, six windows past what the loop
        // watched, is paid in the very next block and nothing else pays
        // the wallet: only the loop watching what was revealed finds it.
        let wallet = manager.wallet(id).await.unwrap();
        let mut first = Vec::new();
        for _ in 0..30 {
            first.push(wallet.reveal_address(Keychain::External).await.unwrap());
        }
        let last = first.pop().unwrap();
        assert_eq!(last.index, 29);
        let early = pay(&chain, last.address.script_pubkey(), 5_000);
        chain.mine(1).unwrap();
        synced(&manager, &chain).await;
        let coins = wallet.coins().await.unwrap();
        assert!(
            coins.iter().any(|c| c.coin.outpoint == early),
            "a payment to a revealed address in the next block is credited"
        );
        drop(wallet);

        let stop = Arc::new(AtomicBool::new(false));
        let mining = miner(chain.clone(), Arc::clone(&stop), Duration::from_millis(15));
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let manager = manager.clone();
                let chain = chain.clone();
                tokio::spawn(async move {
                    // Spread over some 20 blocks.
                    tokio::time::sleep(Duration::from_millis(i * 3)).await;
                    let wallet = manager.wallet(id).await.unwrap();
                    let revealed = wallet.reveal_address(Keychain::External).await.unwrap();
                    // Paid at once: the next block the miner makes holds it.
                    let script = revealed.address.script_pubkey();
                    let outpoint =
                        tokio::task::spawn_blocking(move || pay(&chain, script, 10_000 + i))
                            .await
                            .unwrap();
                    (revealed, outpoint, 10_000 + i)
                })
            })
            .collect();
        let mut paid = Vec::new();
        for task in tasks {
            paid.push(task.await.unwrap());
        }
        stop.store(true, Ordering::SeqCst);
        assert!(mining.join().unwrap() > 2, "blocks were mined meanwhile");
        chain.mine(1).unwrap();
        synced(&manager, &chain).await;

        let addresses: HashSet<_> = paid.iter().map(|(r, _, _)| r.address.clone()).collect();
        assert_eq!(addresses.len(), 100, "no address handed out twice");
        let wallet = manager.wallet(id).await.unwrap();
        let coins: HashMap<OutPoint, _> = wallet
            .coins()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.coin.outpoint, c))
            .collect();
        for (revealed, outpoint, sats) in &paid {
            let coin = coins
                .get(outpoint)
                .unwrap_or_else(|| panic!("payment to index {} not credited", revealed.index));
            assert_eq!(coin.coin.txout.value.to_sat(), *sats);
            assert_eq!(
                (coin.coin.keychain, coin.coin.index),
                (Keychain::External, revealed.index)
            );
            assert_eq!(coin.state, CoinState::Spendable);
        }
        let total: u64 = 5_000 + paid.iter().map(|(_, _, s)| s).sum::<u64>();
        assert_eq!(wallet.balance().await.unwrap().confirmed.to_sat(), total);
        let external = wallet.keychain(Keychain::External);
        assert_eq!(external.last_revealed, Some(129));
        assert_eq!(external.last_used, Some(129));
        let tip = chain.tip().height;
        let check = manager
            .store()
            .read(move |tx| check_wallet(tx, &chain, id, tip))
            .await
            .unwrap();
        assert!(check.ok(), "{:?}", check.mismatch);
        manager.stop().await;
    });
}

/// One send's record.
struct Sent {
    holder: String,
    /// The loop's tip before the selection began.
    before: u32,
    coins: Vec<OutPoint>,
    change: Option<ScriptBuf>,
    txid: bitcoin::Txid,
    accepted: bool,
}

#[test]
fn sends_built_while_blocks_spend_the_wallet_never_share_a_coin_or_a_change_script() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let (chain, manager) = started(dir.path(), SimParams::signed(142), 110).await;
        let id = manager
            .register(
                NewWallet::new("payer", signing_descriptors(9))
                    .born_at(111)
                    .passphrase("pw"),
            )
            .await
            .unwrap();
        let wallet = manager.wallet(id).await.unwrap();
        // 70 coins of 40,000 sat.
        for _ in 0..70 {
            let address = wallet.reveal_address(Keychain::External).await.unwrap();
            pay(&chain, address.address.script_pubkey(), 40_000);
        }
        chain.mine(1).unwrap();
        synced(&manager, &chain).await;
        assert_eq!(
            wallet.balance().await.unwrap().spendable().to_sat(),
            70 * 40_000
        );
        wallet.unlock("pw").await.unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let mining = miner(chain.clone(), Arc::clone(&stop), Duration::from_millis(20));
        // Behind the wallet's back: the same keys spend coins elsewhere
        // (another program with the seed). Their locks are let go at once,
        // so the coins look free while a block is about to spend them.
        let outside = {
            let wallet = Arc::clone(&wallet);
            let chain = chain.clone();
            tokio::spawn(async move {
                let mut spent = Vec::new();
                for k in 0..8 {
                    let holder = format!("outside-{k}");
                    let request = SpendRequest {
                        recipients: vec![TxOut {
                            value: Amount::from_sat(30_000),
                            script_pubkey: p2wpkh(&key(200)),
                        }],
                        // Above the sends' 2 sat/vB: SimChain replaces by
                        // fee (full RBF), so a send paying more could
                        // otherwise replace an outside spend instead of
                        // being refused.
                        fee_rate_sat_vb: 3.0,
                    };
                    let Ok(selection) = wallet.select_and_lock(request, &holder).await else {
                        continue;
                    };
                    let tx = wallet.sign(selection).await.unwrap();
                    if chain.submit(tx.clone()).is_ok() {
                        spent.push(tx.compute_txid());
                    }
                    wallet.release(&holder).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                spent
            })
        };
        let start = manager.tip().borrow().map_or(0, |t| t.height);
        let sends: Vec<_> = (0..50u8)
            .map(|i| {
                let manager = manager.clone();
                let chain = chain.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(i) * 4)).await;
                    if i >= 25 {
                        // The second half is built after the loop has
                        // connected a block mined meanwhile, however busy
                        // the machine: the sends straddle blocks.
                        let mut tip = manager.tip();
                        tokio::time::timeout(
                            Duration::from_secs(60),
                            tip.wait_for(|t| t.is_some_and(|t| t.height > start)),
                        )
                        .await
                        .expect("the loop connects a mined block")
                        .expect("the manager lives");
                    }
                    let wallet = manager.wallet(id).await.unwrap();
                    let holder = format!("send-{i}");
                    let before = manager.tip().borrow().map_or(0, |t| t.height);
                    let request = SpendRequest {
                        recipients: vec![TxOut {
                            value: Amount::from_sat(12_000 + u64::from(i)),
                            script_pubkey: p2wpkh(&key(i + 1)),
                        }],
                        fee_rate_sat_vb: 2.0,
                    };
                    let selection = match wallet.select_and_lock(request, &holder).await {
                        Ok(selection) => selection,
                        Err(WalletError::InsufficientFunds { .. }) => return None,
                        Err(e) => panic!("{e}"),
                    };
                    let coins = selection.coins.iter().map(|c| c.outpoint).collect();
                    let change = selection.change.as_ref().map(|c| c.script_pubkey.clone());
                    let tx = wallet.sign(selection).await.unwrap();
                    let txid = tx.compute_txid();
                    // A send whose coin was spent behind the wallet's back is
                    // refused by the node; it keeps its locks.
                    let accepted = chain.submit(tx.clone()).is_ok();
                    if accepted {
                        wallet.record_broadcast(tx).await.unwrap();
                    }
                    Some(Sent {
                        holder,
                        before,
                        coins,
                        change,
                        txid,
                        accepted,
                    })
                })
            })
            .collect();
        let mut sent = Vec::new();
        for task in sends {
            sent.extend(task.await.unwrap());
        }
        let outside = outside.await.unwrap();
        stop.store(true, Ordering::SeqCst);
        mining.join().unwrap();
        chain.mine(2).unwrap();
        synced(&manager, &chain).await;

        let accepted = sent.iter().filter(|s| s.accepted).count();
        assert!(
            accepted >= 30,
            "{accepted} of {} sends accepted",
            sent.len()
        );
        assert!(
            !outside.is_empty(),
            "some coins were spent behind the wallet's back"
        );
        let first = sent.iter().map(|s| s.before).min().unwrap();
        let last = sent.iter().map(|s| s.before).max().unwrap();
        assert!(last > first, "blocks were connected while sends were built");

        // No coin selected by two sends.
        let mut owner: HashMap<OutPoint, &str> = HashMap::new();
        for s in &sent {
            for coin in &s.coins {
                if let Some(other) = owner.insert(*coin, &s.holder) {
                    panic!("{coin} selected by {other} and {}", s.holder);
                }
            }
        }
        // No coin selected after the block spending it was connected.
        let coins: HashMap<OutPoint, _> = wallet
            .coins()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.coin.outpoint, c))
            .collect();
        for s in &sent {
            for coin in &s.coins {
                if let CoinState::Spent { txid, height } = coins[coin].state
                    && txid != s.txid
                {
                    assert!(
                        height > s.before,
                        "{} selected {coin}, spent at {height}, at tip {} or later",
                        s.holder,
                        s.before
                    );
                }
            }
        }
        // Every change script is revealed, and used by one transaction only.
        let changes: Vec<&ScriptBuf> = sent.iter().filter_map(|s| s.change.as_ref()).collect();
        let distinct: HashSet<_> = changes.iter().collect();
        assert_eq!(distinct.len(), changes.len(), "a change script shared");
        let last_change = wallet.keychain(Keychain::Internal).last_revealed.unwrap();
        for s in sent.iter().filter(|s| s.accepted) {
            let Some(change) = &s.change else { continue };
            let paid: Vec<_> = coins
                .values()
                .filter(|c| &c.coin.txout.script_pubkey == change)
                .collect();
            assert_eq!(paid.len(), 1, "{}'s change script paid once", s.holder);
            assert_eq!(paid[0].coin.outpoint.txid, s.txid);
            assert_eq!(paid[0].coin.keychain, Keychain::Internal);
            assert!(paid[0].coin.index <= last_change);
        }
        // Every accepted send confirmed, and the wallet equals the oracle.
        let history = wallet.history().await.unwrap();
        for s in sent.iter().filter(|s| s.accepted) {
            let entry = history.iter().find(|h| h.txid == s.txid).unwrap();
            assert!(entry.height.is_some(), "{} confirmed", s.holder);
        }
        let tip = chain.tip().height;
        let check = manager
            .store()
            .read(move |tx| check_wallet(tx, &chain, id, tip))
            .await
            .unwrap();
        assert!(check.ok(), "{:?}", check.mismatch);
        manager.stop().await;
    });
}

#[test]
fn wait_for_follows_a_height_across_a_reorg_and_times_out_with_its_own_error() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let (chain, manager) = started(dir.path(), SimParams::unsigned(143), 105).await;
        // Waiting for the block a reorg replaces would wait forever; a
        // height is reached on whichever branch gets there.
        let replaced = chain.tip();
        let waiter = {
            let manager = manager.clone();
            tokio::spawn(async move { manager.wait_for(107, Duration::from_secs(60)).await })
        };
        chain.reorg(2, lockstep_sim::ReorgTxs::Drop).expect("reorg");
        chain.mine(1).unwrap();
        let reached = waiter.await.unwrap().unwrap();
        assert!(reached.height >= 107);
        assert_ne!(manager.tip().borrow().unwrap(), replaced);
        let late = manager.wait_for(10_000, Duration::from_millis(100)).await;
        match late {
            Err(WaitError::Timeout { height, reached }) => {
                assert_eq!(height, 10_000);
                assert!(reached.is_some_and(|t| t.height >= 107));
            }
            other => panic!("{other:?}"),
        }
        manager.stop().await;
    });
}

#[test]
fn addresses_another_process_hands_out_are_watched_and_never_handed_out_again() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let (chain, manager) = started(dir.path(), SimParams::unsigned(144), 105).await;
        let id = manager
            .register(
                NewWallet::new("shared", test_descriptors(144, 0))
                    .born_at(106)
                    .lookahead(5),
            )
            .await
            .unwrap();
        let ours = manager.wallet(id).await.unwrap();
        let first = ours.reveal_address(Keychain::External).await.unwrap();
        // A block later, this process has nothing of its own left to tell
        // its loop.
        chain.mine(1).unwrap();
        synced(&manager, &chain).await;
        // A second process (its own store handle, registry and instance)
        // hands out 20 addresses: four windows past what this loop watched.
        let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
        let other = Manager::new(store, Arc::new(chain.clone()), config());
        let theirs = other.wallet(id).await.unwrap();
        assert!(
            !Arc::ptr_eq(&ours, &theirs),
            "another process, another instance"
        );
        let mut handed = vec![first.clone()];
        for _ in 0..20 {
            handed.push(theirs.reveal_address(Keychain::External).await.unwrap());
        }
        let last = handed.last().unwrap().clone();
        assert_eq!(last.index, 20);
        // This process hands out the next address at once, not one of
        // theirs (its instance is behind: it reads the keychains first).
        let next = ours.reveal_address(Keychain::External).await.unwrap();
        assert_eq!(next.index, 21);
        assert!(handed.iter().all(|h| h.address != next.address));
        // Paid in the next block: this process's loop credits it.
        let paid = pay(&chain, last.address.script_pubkey(), 7_000);
        chain.mine(1).unwrap();
        synced(&manager, &chain).await;
        let coins = ours.coins().await.unwrap();
        assert!(coins.iter().any(|c| c.coin.outpoint == paid), "credited");
        assert!(
            !matches!(
                *manager.status().borrow(),
                lockstep_manager::Status::Failed { .. }
            ),
            "the loop goes on"
        );
        let tip = chain.tip().height;
        let check = manager
            .store()
            .read(move |tx| check_wallet(tx, &chain, id, tip))
            .await
            .unwrap();
        assert!(check.ok(), "{:?}", check.mismatch);
        manager.stop().await;
    });
}
