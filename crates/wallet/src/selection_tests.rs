//! Coin selection and locks: what is chosen, what is excluded, what is
//! reported, and no coin selected twice under real contention.

use std::collections::HashSet;

use bitcoin::bip32::Xpriv;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Network, NetworkKind, OutPoint, ScriptBuf, Transaction, TxIn, TxOut, Txid};
use lockstep_store::{Store, StoreOptions};

use crate::*;

fn descriptors(seed: u8) -> WalletDescriptors {
    let root = Xpriv::new_master(NetworkKind::Test, &[seed; 32]).unwrap();
    WalletDescriptors::parse(
        &format!("tr({root}/0/*)"),
        &format!("wpkh({root}/1/*)"),
        Network::Regtest,
    )
    .unwrap()
}

/// A wallet holding one coin per value, paid by one transaction at height 1.
fn funded(values: &[u64]) -> (tempfile::TempDir, Store, Wallet) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    let params = WalletParams {
        name: "payer",
        birth_height: 0,
        lookahead: 20,
        passphrase: Some("pw"),
    };
    let mut wallet = store
        .write_blocking(move |tx| Wallet::create(tx, &params, descriptors(3)))
        .unwrap();
    let outputs: Vec<TxOut> = values
        .iter()
        .enumerate()
        .map(|(i, v)| TxOut {
            value: Amount::from_sat(*v),
            script_pubkey: wallet
                .descriptors()
                .script_at(Keychain::External, i as u32)
                .unwrap(),
        })
        .collect();
    let funding = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(Txid::all_zeros(), 7),
            ..Default::default()
        }],
        output: outputs,
    };
    wallet = store
        .write_blocking(move |tx| {
            wallet.ingest(tx, 1, &[funding])?;
            Ok::<_, WalletError>(wallet)
        })
        .unwrap();
    (dir, store, wallet)
}

fn request(sats: u64) -> SpendRequest {
    let to = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([9; 20]));
    SpendRequest {
        recipients: vec![TxOut {
            value: Amount::from_sat(sats),
            script_pubkey: to,
        }],
        fee_rate_sat_vb: 2.0,
    }
}

#[test]
fn select_locks_excludes_reports_and_releases() {
    let (_dir, store, wallet) = funded(&[10_000, 20_000, 50_000, 100_000]);
    let w = wallet.clone();
    let first = store
        .write_blocking(move |tx| w.select_and_lock(tx, &request(60_000), "send-1"))
        .unwrap();
    let input: u64 = first.coins.iter().map(|c| c.txout.value.to_sat()).sum();
    let change = first.change.as_ref().map_or(0, |c| c.value.to_sat());
    assert_eq!(input, 60_000 + change + first.fee.to_sat(), "{first:?}");
    assert!(
        first.fee.to_sat() > 0 && first.fee.to_sat() < 2_000,
        "fee {}",
        first.fee
    );
    if let Some(change) = &first.change {
        assert_eq!(
            wallet.script_index(&change.script_pubkey).map(|(k, _)| k),
            Some(Keychain::Internal)
        );
    }

    // The locked coins are not offered again.
    let w = wallet.clone();
    let second = store
        .write_blocking(move |tx| w.select_and_lock(tx, &request(15_000), "send-2"))
        .unwrap();
    let taken: HashSet<OutPoint> = first.coins.iter().map(|c| c.outpoint).collect();
    assert!(second.coins.iter().all(|c| !taken.contains(&c.outpoint)));

    // Not enough left: the error says how much in-flight holders have locked.
    let w = wallet.clone();
    let err = store
        .write_blocking(move |tx| w.select_and_lock(tx, &request(150_000), "send-3"))
        .unwrap_err();
    match err {
        WalletError::InsufficientFunds {
            locked, available, ..
        } => {
            let second_in: u64 = second.coins.iter().map(|c| c.txout.value.to_sat()).sum();
            assert_eq!(locked.to_sat(), input + second_in);
            assert_eq!(available.to_sat(), 180_000 - input - second_in);
        }
        other => panic!("{other:?}"),
    }
    // Releasing one holder frees exactly its coins.
    let released = store
        .write_blocking(|tx| Wallet::release(tx, "send-1"))
        .unwrap();
    assert_eq!(released, first.coins.len());
    let w = wallet.clone();
    let third = store
        .write_blocking(move |tx| w.select_and_lock(tx, &request(60_000), "send-4"))
        .unwrap();
    assert!(
        third
            .coins
            .iter()
            .all(|c| taken.contains(&c.outpoint) || !second.coins.contains(c))
    );
    assert!(matches!(
        store.write_blocking(move |tx| wallet.select_and_lock(
            tx,
            &SpendRequest {
                recipients: vec![],
                fee_rate_sat_vb: 1.0
            },
            "x"
        )),
        Err(WalletError::InvalidRequest(_))
    ));
}

#[test]
fn a_disconnected_coin_takes_its_lock_with_it() {
    let (_dir, store, wallet) = funded(&[40_000]);
    let w = wallet.clone();
    store
        .write_blocking(move |tx| w.select_and_lock(tx, &request(10_000), "a"))
        .unwrap();
    assert_eq!(store.read_blocking(|tx| tx.locks_of("a")).unwrap().len(), 1);
    store
        .write_blocking(move |tx| {
            wallet.disconnect(tx, 1)?;
            Ok::<_, WalletError>(())
        })
        .unwrap();
    assert!(
        store
            .read_blocking(|tx| tx.locks_of("a"))
            .unwrap()
            .is_empty()
    );
}

/// 40 holders select at once on a multi-threaded runtime: no coin is
/// selected twice, every selection is locked, and the locks survive a
/// reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_selections_never_share_a_coin_and_locks_survive_reopen() {
    let values: Vec<u64> = (0..200).map(|i| 10_000 + i * 10).collect();
    let (dir, store, wallet) = tokio::task::spawn_blocking(move || funded(&values))
        .await
        .unwrap();
    let path = dir.path().join("w.db");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (store, wallet) = (store.clone(), wallet.clone());
        tasks.push(tokio::spawn(async move {
            let holder = format!("holder-{i}");
            let h = holder.clone();
            let selection = store
                .write(move |tx| wallet.select_and_lock(tx, &request(25_000 + i * 100), &h))
                .await;
            (holder, selection)
        }));
    }
    let mut seen = HashSet::new();
    let mut by_holder = Vec::new();
    for task in tasks {
        let (holder, selection) = task.await.unwrap();
        let selection = selection.unwrap();
        assert!(selection.coins.len() >= 2);
        for coin in &selection.coins {
            assert!(
                seen.insert(coin.outpoint),
                "{} selected twice",
                coin.outpoint
            );
        }
        by_holder.push((holder, selection.coins.len()));
    }
    drop(store);
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    for (holder, n) in by_holder {
        let h = holder.clone();
        let locks = store.read(move |tx| tx.locks_of(&h)).await.unwrap();
        assert_eq!(locks.len(), n, "{holder}");
    }
}
