//! Who owns what, and for how long: a stopped loop lets another manager
//! take the database, a dropped manager leaves the database closed, and an
//! import that a stop interrupted is finished by the next start.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lockstep_manager::Event;
use lockstep_manager::{Manager, ManagerConfig, ScriptImport};
use lockstep_store::{Store, StoreOptions};
use lockstep_testkit::oracle::check_wallet_imported;
use lockstep_tests::rig::{MATURE, Rig, runtime};
use lockstep_wallet::Keychain;

const PATIENCE: Duration = Duration::from_secs(60);

/// The files in `dir`, by name.
fn files_in(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("the directory reads")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A manager that was stopped runs no loop: another manager on the same
/// database (a standby) can start its own at once, without the first
/// being dropped.
#[test]
fn a_stopped_loop_releases_the_database_to_another_manager() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 5, 10);
        let id = rig.add(0, 5).await;
        rig.manager.start();
        rig.manager
            .wait_for(rig.chain.height(), PATIENCE)
            .await
            .unwrap();
        rig.manager.stop().await;

        let standby = Manager::new(
            rig.store.clone(),
            Arc::new(rig.chain.clone()),
            ManagerConfig::default(),
        );
        rig.pay(0, Keychain::External, 1, 42_000);
        rig.chain.mine(1).unwrap();
        // `sync` runs the loop in this task: it needs the claim the first
        // manager's loop held.
        let height = standby.sync().await.expect("the standby takes the loop");
        assert_eq!(height, rig.chain.height());
        assert!(rig.check(id).ok(), "{:?}", rig.check(id));
        drop(standby);
        drop(rig);
    });
}

/// Once every manager and store handle is gone (the runtime too), the
/// database is closed: its write-ahead log is checkpointed and removed, and
/// only the database file and the loop's lock file are left.
#[test]
fn dropping_everything_closes_the_database() {
    let dir = tempfile::tempdir().unwrap();
    {
        let runtime = runtime();
        let rig = runtime.block_on(async {
            let rig = Rig::new(dir.path(), 6, 10);
            let id = rig.add(0, 5).await;
            rig.pay(0, Keychain::External, 0, 10_000);
            rig.chain.mine(1).unwrap();
            rig.manager.start();
            rig.manager
                .wait_for(rig.chain.height(), PATIENCE)
                .await
                .unwrap();
            let wallet = rig.manager.wallet(id).await.unwrap();
            assert_eq!(wallet.balance().await.unwrap().confirmed.to_sat(), 10_000);
            rig.manager.stop().await;
            rig
        });
        // The last handles go outside the runtime, where the store's drop
        // waits for its writer to close the database.
        drop(runtime);
        drop(rig);
    }
    assert_eq!(
        files_in(dir.path()),
        BTreeSet::from(["lockstep.db".to_owned(), "lockstep.db-loop.lock".to_owned()]),
        "something still holds the database open"
    );
    // And it opens again, with what was committed.
    let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
    assert!(store.read_blocking(|tx| tx.tip()).unwrap().is_some());
}

/// A targeted import racing `stop()`, ten rounds on one manager, each
/// followed by `start()`: an import may end with a stop error, but the
/// next start finishes it, so that once the loop is at the tip the wallet
/// holds every coin paid to the scripts it was given.
#[test]
fn a_targeted_import_interrupted_by_stop_is_finished_by_the_next_start() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 8, 30);
        let id = rig.add(0, 5).await;
        rig.manager.start();
        let mut end = 0;
        let mut stopped = 0;
        for round in 0..10u32 {
            // A payment far past the window, which only a targeted import
            // of the range finds, and one inside it.
            let far = 100 + round * 7;
            rig.pay(0, Keychain::External, far, 1_000 + u64::from(round));
            rig.pay(0, Keychain::External, round % 3, 1);
            rig.chain.mine(2).unwrap();
            end = far + 1;
            rig.manager
                .wait_for(rig.chain.height(), PATIENCE)
                .await
                .unwrap();
            // The import rescans from low down, so it finds every earlier
            // round's payment again, one block (and one event) at a time;
            // it is stopped after a different number of them each round
            // (0: at once, perhaps before it wrote anything).
            let mut events = rig.manager.subscribe();
            let manager = rig.manager.clone();
            let import = tokio::spawn(async move {
                manager
                    .import_scripts(
                        id,
                        ScriptImport::Range {
                            keychain: Keychain::External,
                            end,
                        },
                        MATURE + 1,
                    )
                    .await
            });
            let mut seen = 0;
            while seen < round % 4 {
                match events.recv().await {
                    Ok(Event::WalletActivity { wallet, .. }) if wallet == id => seen += 1,
                    Ok(_) => {}
                    Err(error) => panic!("events: {error}"),
                }
            }
            rig.manager.stop().await;
            if import.await.unwrap().is_err() {
                stopped += 1;
            }
            rig.manager.start();
        }
        assert!(
            stopped > 0,
            "no import was interrupted: the race was not run"
        );
        // The loop finishes waiting imports before it connects a block:
        // once it has connected the next one, none is left.
        rig.chain.mine(1).unwrap();
        rig.manager
            .wait_for(rig.chain.height(), PATIENCE)
            .await
            .unwrap();
        let importing = rig
            .store
            .read_blocking(move |tx| {
                Ok::<_, lockstep_store::StoreError>(tx.wallet(id)?.and_then(|w| w.importing_height))
            })
            .unwrap();
        assert_eq!(importing, None);
        let chain = rig.chain.clone();
        let check = rig
            .store
            .read_blocking(move |tx| {
                let (height, _) = tx.tip()?.expect("a tip");
                check_wallet_imported(tx, &chain, id, height, &[(Keychain::External, end)])
            })
            .unwrap();
        assert!(check.ok(), "after {stopped} interrupted imports: {check:?}");
        rig.manager.stop().await;
    });
}

/// An import that a stop interrupted after it began, then a second
/// targeted import of the same wallet from higher up before the loop
/// runs again: the second must not take the first's place (which would
/// leave the blocks between the two unscanned for the first's scripts).
#[test]
fn a_second_import_does_not_replace_an_interrupted_one() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 9, 4);
        let id = rig.add(0, 5).await;
        // Payments past the window, one per block over 40 blocks.
        for i in 0..40 {
            rig.pay(0, Keychain::External, 100 + i, 2_000 + u64::from(i));
            rig.chain.mine(1).unwrap();
        }
        rig.sync().await;
        let range = ScriptImport::Range {
            keychain: Keychain::External,
            end: 140,
        };
        let mut events = rig.manager.subscribe();
        let manager = rig.manager.clone();
        let first = {
            let range = range.clone();
            tokio::spawn(async move { manager.import_scripts(id, range, MATURE + 1).await })
        };
        // Stopped once it has committed its first batch.
        loop {
            match events.recv().await {
                Ok(Event::WalletActivity { wallet, .. }) if wallet == id => break,
                Ok(_) => {}
                Err(error) => panic!("events: {error}"),
            }
        }
        rig.manager.stop().await;
        let first = first.await.unwrap();
        assert!(
            first.is_err(),
            "the import finished before the stop: {first:?}"
        );
        rig.manager
            .import_scripts(id, range, rig.chain.height())
            .await
            .expect("the second import finishes");
        rig.sync().await;
        let chain = rig.chain.clone();
        let check = rig
            .store
            .read_blocking(move |tx| {
                let (height, _) = tx.tip()?.expect("a tip");
                check_wallet_imported(tx, &chain, id, height, &[(Keychain::External, 140)])
            })
            .unwrap();
        assert!(check.ok(), "{check:?}");
    });
}
