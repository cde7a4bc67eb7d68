//! Wallet costs, each inside one committed database transaction (WAL,
//! synchronous=FULL, so each includes a durable commit):
//!
//! - ingesting a 2,000-transaction block that touches a wallet of 10,000
//!   derived scripts 10 times (the manager routes only those 10);
//! - disconnecting that block;
//! - `select_and_lock` (and release) on a wallet of 10,000 coins.
#![allow(missing_docs)] // criterion_group! generates undocumented functions.

use bitcoin::bip32::Xpriv;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Network, NetworkKind, OutPoint, ScriptBuf, Transaction, TxIn, TxOut, Txid};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lockstep_store::{Store, StoreOptions};
use lockstep_wallet::{
    Keychain, SpendRequest, Wallet, WalletDescriptors, WalletError, WalletParams,
};

fn wallet(store: &Store, lookahead: u32) -> Wallet {
    let root = Xpriv::new_master(NetworkKind::Test, &[5; 32]).unwrap();
    let d = WalletDescriptors::parse(
        &format!("wpkh({root}/0/*)"),
        &format!("tr({root}/1/*)"),
        Network::Regtest,
    )
    .unwrap();
    let params = WalletParams {
        name: "bench",
        birth_height: 0,
        lookahead,
        passphrase: Some("pw"),
    };
    store
        .write_blocking(move |tx| Wallet::create(tx, &params, d))
        .unwrap()
}

fn tx(seed: u32, outputs: Vec<TxOut>) -> Transaction {
    Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(Txid::from_byte_array([(seed % 251) as u8; 32]), seed),
            ..Default::default()
        }],
        output: outputs,
    }
}

fn foreign(i: u32) -> TxOut {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&i.to_le_bytes());
    TxOut {
        value: Amount::from_sat(10_000),
        script_pubkey: ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(h)),
    }
}

fn ingest_and_disconnect(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    let wallet = wallet(&store, 5_000);
    assert_eq!(wallet.watch_scripts().count(), 10_000);
    // A 2,000-transaction block; every 200th transaction pays the wallet.
    let block: Vec<Transaction> = (0..2_000u32)
        .map(|i| {
            let mut outs = vec![foreign(i * 2), foreign(i * 2 + 1)];
            if i % 200 == 0 {
                outs[1].script_pubkey = wallet
                    .descriptors()
                    .script_at(Keychain::External, i / 2)
                    .unwrap();
            }
            tx(i, outs)
        })
        .collect();
    // What the manager routes: the transactions that touch the wallet.
    let routed: Vec<Transaction> = block
        .iter()
        .filter(|t| {
            t.output
                .iter()
                .any(|o| wallet.script_index(&o.script_pubkey).is_some())
        })
        .cloned()
        .collect();
    assert_eq!(routed.len(), 10);
    // Ingest once and reload, so that the window has already moved past
    // the block's scripts and each measured ingest does the same work.
    let (mut w, txs) = (wallet.clone(), routed.clone());
    let id = store
        .write_blocking(move |tx| w.ingest(tx, 500, &txs).map(|_| w.id()))
        .unwrap();
    let wallet = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    eprintln!("wallet watches {} scripts", wallet.watch_scripts().count());
    let mut group = c.benchmark_group("wallet (10,000 scripts)");
    group.sample_size(30);
    group.bench_function("ingest 2000-tx block touching it 10 times (routed)", |b| {
        b.iter_batched(
            || {
                let w = wallet.clone();
                store
                    .write_blocking(move |tx| w.disconnect(tx, 500).map(|_| ()))
                    .unwrap();
                (wallet.clone(), routed.clone())
            },
            |(mut w, txs)| {
                store
                    .write_blocking(move |tx| w.ingest(tx, 500, &txs).map(|s| s.coins_created))
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("disconnect that block", |b| {
        b.iter_batched(
            || {
                let (mut w, txs) = (wallet.clone(), routed.clone());
                store
                    .write_blocking(move |tx| {
                        w.disconnect(tx, 500)?;
                        w.ingest(tx, 500, &txs).map(|_| ())
                    })
                    .unwrap();
                wallet.clone()
            },
            |w| {
                store
                    .write_blocking(move |tx| w.disconnect(tx, 500))
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn select(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    let mut wallet = wallet(&store, 100);
    let outputs: Vec<TxOut> = (0..10_000u32)
        .map(|i| TxOut {
            value: Amount::from_sat(20_000 + u64::from(i) * 7),
            script_pubkey: wallet
                .descriptors()
                .script_at(Keychain::External, i)
                .unwrap(),
        })
        .collect();
    let funding = tx(1, outputs);
    wallet = store
        .write_blocking(move |t| {
            wallet.ingest(t, 1, &[funding])?;
            Ok::<_, WalletError>(wallet)
        })
        .unwrap();
    let request = SpendRequest {
        recipients: vec![foreign(1)],
        fee_rate_sat_vb: 2.0,
    };
    let request = SpendRequest {
        recipients: vec![TxOut {
            value: Amount::from_sat(250_000),
            ..request.recipients[0].clone()
        }],
        ..request
    };
    let mut group = c.benchmark_group("wallet (10,000 coins)");
    group.sample_size(20);
    group.bench_function("select_and_lock + release", |b| {
        b.iter(|| {
            let (w, r) = (wallet.clone(), request.clone());
            store
                .write_blocking(move |tx| {
                    let s = w.select_and_lock(tx, &r, "bench")?;
                    Wallet::release(tx, "bench")?;
                    Ok::<_, WalletError>(s.coins.len())
                })
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, ingest_and_disconnect, select);
criterion_main!(benches);
