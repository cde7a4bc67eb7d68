//! A wallet that cannot be processed is parked with its error, and the
//! loop goes on for every other wallet; resumed once mended, it catches up
//! by an import and equals the oracle like the rest.

use std::time::Duration;

use lockstep_manager::{Event, ManagerError};
use lockstep_store::{StoreError, faults};
use lockstep_tests::rig::{Rig, runtime};
use lockstep_wallet::Keychain;

const PATIENCE: Duration = Duration::from_secs(60);
const WALLETS: u32 = 20;

/// Pays every rig wallet on its external keychain at index `round`, and
/// mines a block.
fn pay_everyone(rig: &Rig, round: u32) {
    for i in 0..WALLETS {
        rig.pay(
            i,
            Keychain::External,
            round,
            10_000 + u64::from(i * 100 + round),
        );
    }
    rig.chain.mine(1).unwrap();
}

#[test]
fn a_corrupt_wallet_is_parked_while_the_others_sync_then_resumed() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut rig = Rig::new(dir.path(), 11, 10);
        let mut ids = Vec::new();
        for i in 0..WALLETS {
            ids.push(rig.add(i, 5).await);
        }
        for round in 0..2 {
            pay_everyone(&rig, round);
        }
        rig.sync().await;
        let parked_at = rig.chain.height();
        let broken = ids[7];
        // The process restarts with one wallet's stored descriptor
        // damaged: its instance is loaded again when a block touches it.
        rig.manager.stop().await;
        let good = rig
            .store
            .read_blocking(move |tx| {
                Ok::<_, StoreError>(tx.keychains(broken)?[0].descriptor.clone())
            })
            .unwrap();
        rig.store
            .write_blocking(move |tx| faults::overwrite_descriptor(tx, broken, 0, "wpkh(damaged)"))
            .unwrap();
        rig.restart();
        let mut events = rig.manager.subscribe();
        for round in 2..5 {
            pay_everyone(&rig, round);
        }
        rig.manager.start();
        rig.manager
            .wait_for(rig.chain.height(), PATIENCE)
            .await
            .expect("the loop goes on without the broken wallet");
        // Parked, with its error and the height it had reached.
        let (height, error) = tokio::time::timeout(PATIENCE, async {
            loop {
                match events.recv().await {
                    Ok(Event::WalletParked {
                        wallet,
                        height,
                        error,
                    }) if wallet == broken => return (height, error),
                    Ok(_) => {}
                    Err(error) => panic!("events: {error}"),
                }
            }
        })
        .await
        .expect("a WalletParked event");
        assert_eq!(height, parked_at);
        assert!(error.contains("descriptor"), "{error}");
        let info = rig.manager.wallets().await.unwrap();
        let row = info.iter().find(|w| w.id == broken).unwrap();
        let parked = row.parked.as_ref().expect("shown as parked");
        assert_eq!(parked.height, parked_at);
        assert_eq!(parked.error, error);
        assert!(
            info.iter()
                .filter(|w| w.id != broken)
                .all(|w| w.parked.is_none())
        );
        assert_eq!(rig.manager.stats().parked, 1);
        // Every other wallet is exact at the tip.
        for &id in ids.iter().filter(|&&id| id != broken) {
            let check = rig.check(id);
            assert!(check.ok(), "{check:?}");
        }
        // The loop keeps going without it.
        pay_everyone(&rig, 5);
        rig.manager
            .wait_for(rig.chain.height(), PATIENCE)
            .await
            .unwrap();
        assert!(rig.check(ids[0]).ok());

        // Resumed before it is mended: parked again, with the same error.
        let again = rig.manager.resume_wallet(broken).await.unwrap_err();
        assert!(
            matches!(
                again,
                ManagerError::ImportIncomplete { .. } | ManagerError::WalletFailed { .. }
            ),
            "{again}"
        );
        let row = rig
            .store
            .read_blocking(move |tx| Ok::<_, StoreError>(tx.wallet(broken)?.unwrap()))
            .unwrap();
        assert_eq!(row.parked.map(|p| p.height), Some(parked_at));

        // Mended, then resumed: imported from where it was parked, and
        // exact at the tip like every other wallet.
        rig.store
            .write_blocking(move |tx| faults::overwrite_descriptor(tx, broken, 0, &good))
            .unwrap();
        rig.manager.resume_wallet(broken).await.unwrap();
        let info = rig.manager.wallets().await.unwrap();
        let row = info.iter().find(|w| w.id == broken).unwrap();
        assert_eq!((row.parked.is_none(), row.importing), (true, None));
        pay_everyone(&rig, 6);
        rig.manager
            .wait_for(rig.chain.height(), PATIENCE)
            .await
            .unwrap();
        for &id in &ids {
            let check = rig.check(id);
            assert!(check.ok(), "{check:?}");
        }
        rig.manager.stop().await;
    });
}
