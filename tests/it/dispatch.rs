//! The dispatcher wired into the facade: sends as exclusive
//! actions that give up the wallet once their coins are locked.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bitcoin::{Amount, OutPoint, TxOut};
use lockstep::{ActionKind, ActionSpec, Keychain, Lockstep, NewWallet, Outcome, SpendRequest};
use lockstep_manager::{Manager, ManagerConfig};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{Store, StoreOptions};
use lockstep_testkit::oracle::check_wallet;
use lockstep_tests::rig::runtime;
use lockstep_tests::wait::eventually;
use lockstep_tests::{key, p2wpkh, signing_descriptors};
use lockstep_wallet::WalletError;

/// What a send action ends with.
#[derive(Debug)]
enum SendFailed {
    Funds,
    Other(#[allow(dead_code, reason = "shown through Debug when a send fails")] String),
}

#[test]
fn fifty_sends_released_early_share_no_coin_and_all_confirm() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(151), 110).unwrap();
        let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
        let config = ManagerConfig {
            poll_interval: Duration::from_millis(10),
            ..ManagerConfig::default()
        };
        let manager = Manager::new(store, Arc::new(chain.clone()), config);
        let lockstep = Lockstep::from_manager(manager.clone());
        lockstep.start();
        lockstep
            .wait_for(110, Duration::from_secs(60))
            .await
            .unwrap();
        let descriptors = signing_descriptors(15);
        let id = lockstep
            .register(
                NewWallet::new("sender", descriptors)
                    .born_at(111)
                    .passphrase("pw"),
            )
            .await
            .unwrap();
        let wallet = lockstep.wallet(id).await.unwrap();
        // 30 coins of 40,000 sat for 50 sends of 30,000: some must run short.
        for _ in 0..30 {
            let address = wallet.reveal_address(Keychain::External).await.unwrap();
            chain
                .pay(address.address.script_pubkey(), Amount::from_sat(40_000))
                .unwrap();
        }
        chain.mine(1).unwrap();
        lockstep
            .wait_for(chain.tip().height, Duration::from_secs(60))
            .await
            .unwrap();
        wallet.unlock("pw").await.unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let mining = {
            let (chain, stop) = (chain.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    chain.mine(1).unwrap();
                }
            })
        };
        // Past its early release, how many sends run at once.
        let released = Arc::new(AtomicUsize::new(0));
        let most_released = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for i in 0..50u8 {
            let lockstep = lockstep.clone();
            let chain = chain.clone();
            let (released, most_released) = (Arc::clone(&released), Arc::clone(&most_released));
            handles.push(tokio::spawn(async move {
                let spec = ActionSpec::new(ActionKind::SEND).early_release(true);
                let handle = lockstep
                    .dispatch_wait(
                        id,
                        spec,
                        move |ctx, wallet| async move {
                            let holder = format!("send-{}", ctx.id());
                            let request = SpendRequest {
                                recipients: vec![TxOut {
                                    value: Amount::from_sat(30_000),
                                    script_pubkey: p2wpkh(&key(i + 1)),
                                }],
                                fee_rate_sat_vb: 2.0,
                            };
                            let selection = match wallet.select_and_lock(request, &holder).await {
                                Ok(selection) => selection,
                                Err(WalletError::InsufficientFunds { .. }) => {
                                    return Err(SendFailed::Funds);
                                }
                                Err(e) => return Err(SendFailed::Other(e.to_string())),
                            };
                            // The coins are ours: the next send may start.
                            assert!(ctx.release_early());
                            let now = released.fetch_add(1, Ordering::SeqCst) + 1;
                            most_released.fetch_max(now, Ordering::SeqCst);
                            let coins: Vec<OutPoint> =
                                selection.coins.iter().map(|c| c.outpoint).collect();
                            let signed = wallet.sign(selection).await;
                            let result = match signed {
                                Ok(tx) => {
                                    // Broadcasting takes a while.
                                    tokio::time::sleep(Duration::from_millis(30)).await;
                                    match chain.submit(tx.clone()) {
                                        Ok(txid) => {
                                            wallet.record_broadcast(tx).await.unwrap();
                                            Ok((txid, coins))
                                        }
                                        Err(reason) => {
                                            Err(SendFailed::Other(format!("{reason:?}")))
                                        }
                                    }
                                }
                                Err(e) => Err(SendFailed::Other(e.to_string())),
                            };
                            released.fetch_sub(1, Ordering::SeqCst);
                            result
                        },
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap();
                handle.outcome().await
            }));
        }
        let mut sent = Vec::new();
        let mut short = 0;
        for handle in handles {
            match handle.await.unwrap() {
                Outcome::Completed(done) => sent.push(done),
                Outcome::Failed(SendFailed::Funds) => short += 1,
                other => panic!("a send ended otherwise: {other:?}"),
            }
        }
        stop.store(true, Ordering::SeqCst);
        mining.join().unwrap();
        chain.mine(2).unwrap();
        lockstep
            .wait_for(chain.tip().height, Duration::from_secs(60))
            .await
            .unwrap();

        assert_eq!(sent.len() + short, 50);
        assert!(short > 0, "30 coins cannot pay 50 sends");
        assert!(sent.len() >= 20, "{} sends made", sent.len());
        assert!(
            most_released.load(Ordering::SeqCst) > 1,
            "sends overlapped once their coins were locked"
        );
        // No coin used twice.
        let mut used: HashMap<OutPoint, bitcoin::Txid> = HashMap::new();
        for (txid, coins) in &sent {
            for coin in coins {
                assert!(used.insert(*coin, *txid).is_none(), "{coin} used twice");
            }
        }
        // Every send confirmed; the wallet is free and equals the oracle.
        let history = wallet.history().await.unwrap();
        for (txid, _) in &sent {
            let entry = history.iter().find(|h| h.txid == *txid).unwrap();
            assert!(entry.height.is_some(), "{txid} confirmed");
        }
        assert!(!lockstep.dispatcher().is_busy(&id));
        assert_eq!(wallet.balance().await.unwrap().locked, Amount::ZERO);
        let tip = chain.tip().height;
        let check = manager
            .store()
            .read(move |tx| check_wallet(tx, &chain, id, tip))
            .await
            .unwrap();
        assert!(check.ok(), "{:?}", check.mismatch);
        lockstep.stop().await;
    });
}

/// How an action on a funded wallet ends after locking a coin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Fails,
    Panics,
    Cancelled,
    Expires,
    FailsAfterBroadcast,
}

#[test]
fn an_action_that_fails_panics_is_cancelled_or_expires_leaves_no_coin_locked() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::unsigned(152), 105).unwrap();
        let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(store, Arc::new(chain.clone()), ManagerConfig::default());
        let lockstep = Lockstep::from_manager(manager);
        lockstep.sync().await.unwrap();
        let id = lockstep
            .register(
                NewWallet::new("holder", lockstep_testkit::oracle::test_descriptors(152, 0))
                    .born_at(106),
            )
            .await
            .unwrap();
        let wallet = lockstep.wallet(id).await.unwrap();
        for _ in 0..3 {
            let address = wallet.reveal_address(Keychain::External).await.unwrap();
            chain
                .pay(address.address.script_pubkey(), Amount::from_sat(50_000))
                .unwrap();
        }
        chain.mine(1).unwrap();
        let tip = lockstep.sync().await.unwrap();
        lockstep.dispatcher().set_tip(tip);
        let request = SpendRequest {
            recipients: vec![TxOut {
                value: Amount::from_sat(20_000),
                script_pubkey: p2wpkh(&key(9)),
            }],
            fee_rate_sat_vb: 1.0,
        };
        for ending in [
            Ending::Fails,
            Ending::Panics,
            Ending::Cancelled,
            Ending::Expires,
            Ending::FailsAfterBroadcast,
        ] {
            let (locked_tx, locked) = tokio::sync::oneshot::channel::<()>();
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let request = request.clone();
            let spec = ActionSpec::new(ActionKind::SEND).deadline(tip + 10);
            let handle = lockstep
                .try_dispatch(id, spec, move |ctx, wallet| async move {
                    let holder = lockstep::lock_holder(lockstep::LockHolder::Dispatched(ctx.id()));
                    let selection = wallet.select_and_lock(request, &holder).await?;
                    if ending == Ending::FailsAfterBroadcast {
                        let tx = bitcoin::Transaction {
                            version: bitcoin::transaction::Version::TWO,
                            lock_time: bitcoin::absolute::LockTime::ZERO,
                            input: selection
                                .coins
                                .iter()
                                .map(|c| bitcoin::TxIn {
                                    previous_output: c.outpoint,
                                    ..Default::default()
                                })
                                .collect(),
                            output: selection.recipients.clone(),
                        };
                        wallet.record_broadcast(tx).await?;
                    }
                    let _ = locked_tx.send(());
                    // Ends only once the test saw the coins locked.
                    let _ = wait.await;
                    match ending {
                        Ending::Fails | Ending::FailsAfterBroadcast => {
                            Err(WalletError::InvalidRequest("the action gives up"))
                        }
                        Ending::Panics => panic!("the action panics"),
                        Ending::Cancelled | Ending::Expires => {
                            std::future::pending::<()>().await;
                            Ok(())
                        }
                    }
                })
                .await
                .unwrap();
            locked.await.unwrap();
            assert!(
                wallet.balance().await.unwrap().locked > Amount::ZERO,
                "{ending:?}"
            );
            go.send(()).unwrap();
            match ending {
                Ending::Cancelled => handle.cancel(),
                Ending::Expires => {
                    lockstep.dispatcher().set_tip(tip + 10);
                }
                _ => {}
            }
            let outcome = handle.outcome().await;
            let expected = match ending {
                Ending::Fails | Ending::FailsAfterBroadcast => {
                    matches!(outcome, Outcome::Failed(_))
                }
                Ending::Panics => matches!(outcome, Outcome::Panicked(_)),
                Ending::Cancelled => matches!(outcome, Outcome::Cancelled),
                Ending::Expires => matches!(outcome, Outcome::Expired),
            };
            assert!(expected, "{ending:?}: {outcome:?}");
            assert!(
                !lockstep.dispatcher().is_busy(&id),
                "{ending:?}: the wallet is free"
            );
            // The coins come back (at once for a failure; from the dropped
            // future's guard otherwise), except a broadcast's inputs.
            if ending == Ending::FailsAfterBroadcast {
                // That something does not happen: the inputs stay locked
                // for a whole second (looked at every 2 ms).
                let mut locked = Amount::MAX;
                for _ in 0..500 {
                    locked = wallet.balance().await.unwrap().locked;
                    if locked == Amount::ZERO {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(locked > Amount::ZERO, "a broadcast's inputs stay locked");
            } else {
                eventually(&format!("{ending:?}: no coin left locked"), async || {
                    wallet.balance().await.unwrap().locked == Amount::ZERO
                })
                .await;
                let locked = wallet.balance().await.unwrap().locked;
                assert_eq!(locked, Amount::ZERO, "{ending:?}: no coin left locked");
            }
            lockstep.dispatcher().set_tip(tip);
        }
    });
}
