//! The registry under contention: one load and one instance per wallet,
//! failures shared and not kept, eviction that never touches a wallet in
//! use, and addresses revealed concurrently on the live instance.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bitcoin::bip32::Xpriv;
use bitcoin::{Network, NetworkKind};
use lockstep_store::{CoinRow, Store, StoreOptions, WalletId};

use crate::*;

fn descriptors(seed: u8) -> WalletDescriptors {
    let root = Xpriv::new_master(NetworkKind::Test, &[seed; 32]).unwrap();
    let xpub = bitcoin::bip32::Xpub::from_priv(&bitcoin::secp256k1::Secp256k1::new(), &root);
    WalletDescriptors::parse(
        &format!("wpkh({xpub}/0/*)"),
        &format!("wpkh({xpub}/1/*)"),
        Network::Regtest,
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A store with `n` watch-only wallets, created without the registry.
fn store_with(n: u8) -> (tempfile::TempDir, Store, Vec<WalletId>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    let mut ids = Vec::new();
    for seed in 0..n {
        let id = store
            .write_blocking(move |tx| {
                let name = format!("w{seed}");
                let params = WalletParams {
                    name: &name,
                    birth_height: 0,
                    lookahead: 10,
                    passphrase: None,
                };
                Ok::<_, WalletError>(Wallet::create(tx, &params, descriptors(seed + 1))?.id())
            })
            .unwrap();
        ids.push(id);
    }
    (dir, store, ids)
}

#[test]
fn a_thousand_concurrent_callers_cause_one_load_and_share_one_instance() {
    let (_dir, store, ids) = store_with(1);
    let runtime = runtime();
    let registry = Registry::new(store, 10);
    let id = ids[0];
    let handles = runtime.block_on(async {
        let tasks: Vec<_> = (0..1_000)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.get_or_load(id).await })
            })
            .collect();
        let mut handles = Vec::new();
        for task in tasks {
            handles.push(task.await.unwrap().unwrap());
        }
        handles
    });
    let first = &handles[0];
    assert!(
        handles.iter().all(|h| Arc::ptr_eq(h, first)),
        "one instance"
    );
    let stats = registry.stats();
    assert_eq!(stats.loads, 1, "{stats:?}");
    // Every caller either found the instance live or joined the one load.
    assert!(stats.joined <= 999, "{stats:?}");
    // While a handle lives, the same instance comes back.
    let again = runtime.block_on(registry.get_or_load(id)).unwrap();
    assert!(Arc::ptr_eq(&again, first));
    assert_eq!(registry.stats().loads, 1);
}

#[test]
fn a_failed_load_reaches_every_waiter_and_is_not_kept() {
    let (_dir, store, ids) = store_with(1);
    let runtime = runtime();
    let registry = Registry::new(store, 10);
    let id = ids[0];
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&attempts);
    registry.set_before_load(Some(Arc::new(move |_| {
        // Slow enough that every caller arrives while the load is queued.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(WalletError::InvalidRequest("injected load failure"))
        } else {
            Ok(())
        }
    })));
    let results = runtime.block_on(async {
        let tasks: Vec<_> = (0..1_000)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.get_or_load(id).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "one load for all");
    for result in &results {
        match result {
            Err(WalletError::LoadFailed { wallet, error }) => {
                assert_eq!(*wallet, id);
                assert!(matches!(**error, WalletError::InvalidRequest(_)));
            }
            other => panic!("every waiter gets the error, got {other:?}"),
        }
    }
    assert!(!registry.is_loaded(id), "a failure is not kept");
    assert_eq!(registry.stats().failed, 1);
    // The next call loads again, and succeeds.
    let wallet = runtime.block_on(registry.get_or_load(id)).unwrap();
    assert_eq!(wallet.id(), id);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    // An unknown wallet is NotFound, also not kept.
    let missing = runtime.block_on(registry.get_or_load(WalletId::from_i64(999)));
    assert!(
        matches!(missing, Err(WalletError::NotFound(_))),
        "{missing:?}"
    );
}

#[test]
fn eviction_takes_the_least_recently_used_and_never_a_wallet_in_use() {
    let (_dir, store, ids) = store_with(8);
    let runtime = runtime();
    let registry = Registry::new(store.clone(), 2);
    // In use: a held handle, a pin, a locked coin.
    let held = runtime.block_on(registry.get_or_load(ids[0])).unwrap();
    let pinned = runtime
        .block_on(registry.get_or_load(ids[1]))
        .unwrap()
        .pin();
    let locked = ids[2];
    store
        .write_blocking(move |tx| {
            tx.insert_coin(
                locked,
                &CoinRow {
                    txid: [7; 32],
                    vout: 0,
                    value: 1_000,
                    script: vec![0x51],
                    keychain: 0,
                    index: 0,
                    height: 1,
                    is_coinbase: false,
                    spent: None,
                },
            )?;
            tx.lock_coins(locked, &[([7; 32], 0)], "action-1")
        })
        .unwrap();
    runtime.block_on(registry.get_or_load(locked)).unwrap();
    // Then five idle wallets, one after the other: each load evicts.
    for id in &ids[3..] {
        runtime.block_on(registry.get_or_load(*id)).unwrap();
    }
    for id in &ids[..3] {
        assert!(registry.is_loaded(*id), "{id} is in use and stays loaded");
    }
    let stats = registry.stats();
    assert!(stats.evicted >= 4, "{stats:?}");
    // Idle wallets were evicted, oldest first: only the newest is left.
    let idle_loaded: Vec<_> = ids[3..]
        .iter()
        .filter(|id| registry.is_loaded(**id))
        .collect();
    assert_eq!(idle_loaded, vec![&ids[7]]);
    // The held handle is still the one instance.
    let again = runtime.block_on(registry.get_or_load(ids[0])).unwrap();
    assert!(Arc::ptr_eq(&again, &held));
    // Once no longer in use, they can go.
    drop((held, again, pinned));
    store
        .write_blocking(|tx| tx.release_locks("action-1"))
        .unwrap();
    runtime.block_on(registry.get_or_load(ids[3])).unwrap();
    assert!(registry.stats().loaded <= 2, "{:?}", registry.stats());
}

#[test]
fn concurrent_reveals_never_hand_out_one_address_twice() {
    let (_dir, store, ids) = store_with(1);
    let runtime = runtime();
    let registry = Registry::new(store.clone(), 10);
    let id = ids[0];
    let revealed = runtime.block_on(async {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let wallet = registry.get_or_load(id).await?;
                    let keychain = if i % 4 == 0 {
                        Keychain::Internal
                    } else {
                        Keychain::External
                    };
                    wallet.reveal_address(keychain).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap().unwrap());
        }
        out
    });
    let addresses: HashSet<_> = revealed.iter().map(|r| r.address.clone()).collect();
    assert_eq!(addresses.len(), 100, "no address twice");
    for keychain in Keychain::ALL {
        let mut indexes: Vec<u32> = revealed
            .iter()
            .filter(|r| r.keychain == keychain)
            .map(|r| r.index)
            .collect();
        indexes.sort_unstable();
        let n = indexes.len() as u32;
        assert_eq!(indexes, (0..n).collect::<Vec<_>>(), "{keychain}: in order");
        let wallet = runtime.block_on(registry.get_or_load(id)).unwrap();
        let info = wallet.keychain(keychain);
        assert_eq!(info.last_revealed, Some(n - 1));
        assert_eq!(info.derived, n + 10, "the window moved past them");
    }
    // The loop is told, and the database agrees with the instance.
    assert_eq!(registry.take_grown(), vec![id]);
    let reloaded = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    assert_eq!(reloaded.next_index(Keychain::External), 75);
    assert_eq!(reloaded.next_index(Keychain::Internal), 25);
}

#[test]
fn a_wallet_created_in_a_rolled_back_transaction_does_not_stay_live() {
    let (_dir, store, _) = store_with(0);
    let registry = Registry::new(store.clone(), 10);
    let inner = registry.clone();
    let failed: Result<WalletId, WalletError> = store.write_blocking(move |tx| {
        let params = WalletParams {
            name: "gone",
            birth_height: 0,
            lookahead: 5,
            passphrase: None,
        };
        let id = inner.create_in(tx, &params, descriptors(50), None)?.id();
        assert!(inner.is_loaded(id));
        Err(WalletError::InvalidRequest("rolled back after the create"))
    });
    assert!(failed.is_err());
    assert_eq!(registry.stats().loaded, 1, "still there until forgotten");
    let forgotten = store
        .read_blocking(|tx| registry.forget_missing(tx))
        .unwrap();
    assert_eq!(forgotten, 1);
    assert_eq!(registry.stats().loaded, 0);
}

#[test]
fn first_scripts_derived_ahead_are_used_only_for_their_own_descriptors() {
    let (_dir, store, _) = store_with(0);
    let ahead = FirstScripts::derive(&descriptors(60), 7).unwrap();
    for (name, seed, lookahead) in [("same", 60, 7), ("other keys", 61, 7), ("deeper", 60, 9)] {
        let first = ahead.clone();
        let wallet = store
            .write_blocking(move |tx| {
                let params = WalletParams {
                    name,
                    birth_height: 0,
                    lookahead,
                    passphrase: None,
                };
                Wallet::create_with(tx, &params, descriptors(seed), Some(first))
            })
            .unwrap();
        let expected = descriptors(seed);
        for keychain in Keychain::ALL {
            let derived: Vec<_> = (0..lookahead)
                .map(|i| expected.script_at(keychain, i).unwrap())
                .collect();
            assert_eq!(
                wallet.scripts(keychain),
                derived.as_slice(),
                "{name} {keychain}"
            );
        }
    }
}
