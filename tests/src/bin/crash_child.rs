//! The crash test's child process (`tests/it/crash.rs`): runs the chain
//! loop over a database and a saved SimChain until the loop reaches the
//! chain's tip, importing a late wallet on the way. The parent kills it with
//! SIGKILL at random moments and starts it again.
//!
//! Usage: `crash-child DB CHAIN`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockstep::chain::SimChain;
use lockstep::manager::{Manager, ManagerConfig, NewWallet};
use lockstep::oracle::test_descriptors;
use lockstep::store::{Store, StoreOptions};
use lockstep_tests::crash::{LATE_WALLET, LATE_WALLET_AT, WALLET_SEED, WALLETS, wallet_spec};

fn main() {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (db, chain) = (args.next().expect("DB"), args.next().expect("CHAIN"));
    let chain = SimChain::load(&chain).expect("loading the chain");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let store = Store::open(&db, StoreOptions::default()).expect("opening the database");
        let config = ManagerConfig {
            batch_size: 3,
            prefetch: 8,
            poll_interval: Duration::from_millis(5),
            ..ManagerConfig::default()
        };
        let manager = Manager::new(store.clone(), Arc::new(chain.clone()), config);
        // The parent kills at random moments after this line.
        println!("started");
        let registered = |name: String| {
            let store = store.clone();
            async move {
                store
                    .read(move |tx| tx.wallet_by_name(&name))
                    .await
                    .expect("reading")
                    .is_some()
            }
        };
        for index in 0..WALLETS {
            let (name, birth, lookahead) = wallet_spec(index);
            if !registered(name.clone()).await {
                manager
                    .register(NewWallet {
                        name,
                        descriptors: test_descriptors(WALLET_SEED, index),
                        birth_height: birth,
                        lookahead,
                        passphrase: None,
                    })
                    .await
                    .expect("registering");
            }
        }
        manager.start();
        let mut tip = manager.tip();
        let (name, birth, lookahead) = wallet_spec(LATE_WALLET);
        if !registered(name.clone()).await {
            tip.wait_for(|t| t.is_some_and(|t| t.height >= LATE_WALLET_AT))
                .await
                .expect("the loop runs");
            manager
                .import_wallet(NewWallet {
                    name,
                    descriptors: test_descriptors(WALLET_SEED, LATE_WALLET),
                    birth_height: birth,
                    lookahead,
                    passphrase: None,
                })
                .await
                .expect("importing");
        }
        let target = chain.tip();
        tip.wait_for(|t| *t == Some(target))
            .await
            .expect("the loop runs");
        manager.stop().await;
        println!("synced {}", target.height);
    });
}
