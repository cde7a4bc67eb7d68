//! The oracle catches a broken engine: each fault switch of
//! `lockstep_store::faults` breaks one rule the engine must keep, and a
//! scenario built to exercise that rule passes the oracle with the fault
//! off and fails it with the fault on.
//!
//! The switch is process-wide, so these scenarios live in their own test
//! binary and run one after another in ONE test: no other test can run
//! while a fault is on.

use lockstep_sim::ReorgTxs;
use lockstep_store::faults::{self, Fault};
use lockstep_testkit::oracle::{WalletCheck, check_wallet_own_scripts};
use lockstep_tests::rig::{Rig, runtime};
use lockstep_wallet::Keychain;

/// Turns a fault on for as long as it lives, and every fault off when it
/// goes (also when the scenario panics).
struct FaultOn;

impl FaultOn {
    fn new(fault: Option<Fault>) -> FaultOn {
        faults::set(fault);
        FaultOn
    }
}

impl Drop for FaultOn {
    fn drop(&mut self) {
        faults::set(None);
    }
}

const LOOKAHEAD: u32 = 5;

/// A payment exactly at the window's edge: index `last_used + lookahead`,
/// in a block after the one that used `last_used`. Returns the oracle's
/// check and the old check (the oracle over the wallet's own scripts).
fn window_edge(fault: Option<Fault>) -> (WalletCheck, WalletCheck) {
    let _on = FaultOn::new(fault);
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 1, 2);
        let id = rig.add(0, LOOKAHEAD).await;
        let used = 2;
        rig.pay(0, Keychain::External, used, 50_000);
        rig.chain.mine(1).unwrap();
        rig.pay(0, Keychain::External, used + LOOKAHEAD, 70_000);
        rig.chain.mine(2).unwrap();
        rig.sync().await;
        let old = rig
            .store
            .read_blocking({
                let chain = rig.chain.clone();
                move |tx| check_wallet_own_scripts(tx, &chain, id, chain.height())
            })
            .unwrap();
        (rig.check(id), old)
    })
}

/// A wallet coin spent at the tip, then a reorg of depth 1 that drops the
/// spend: the coin must be unspent again.
fn dropped_spend(fault: Option<Fault>) -> WalletCheck {
    let _on = FaultOn::new(fault);
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 2, 2);
        let id = rig.add(1, LOOKAHEAD).await;
        let coin = rig.pay(1, Keychain::External, 0, 90_000);
        rig.chain.mine(2).unwrap();
        rig.sync().await;
        let foreign = lockstep_tests::p2wpkh(&lockstep_tests::key(7));
        rig.chain.spend_to(coin, foreign, None).unwrap();
        rig.chain.mine(1).unwrap();
        rig.sync().await;
        assert_eq!(
            rig.store
                .read_blocking(move |tx| tx.wallet_balance(id))
                .unwrap(),
            0,
            "the spend was seen"
        );
        // The fork is below the spend's block and above the coin's.
        rig.chain.reorg(1, ReorgTxs::Drop).unwrap();
        rig.sync().await;
        rig.check(id)
    })
}

/// One block paying scripts `0..3 × lookahead` in reverse order: each
/// payment's script is derived by a later transaction of the block, so the
/// block must be routed again until nothing new is found.
fn reverse_burst(fault: Option<Fault>) -> WalletCheck {
    let _on = FaultOn::new(fault);
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 3, 2);
        let id = rig.add(2, LOOKAHEAD).await;
        rig.sync().await;
        for i in (0..3 * LOOKAHEAD).rev() {
            rig.pay(2, Keychain::External, i, 10_000 + u64::from(i));
        }
        rig.chain.mine(1).unwrap();
        rig.sync().await;
        rig.check(id)
    })
}

#[test]
fn the_oracle_catches_each_fault() {
    // A window one script short.
    let (good, old) = window_edge(None);
    assert!(good.ok(), "fault off: {good:?}");
    assert!(old.ok(), "fault off, old check: {old:?}");
    let (bad, old) = window_edge(Some(Fault::WindowOneShort));
    assert!(!bad.ok(), "the oracle missed a window one short: {bad:?}");
    assert!(
        old.ok(),
        "the oracle over the wallet's own scripts cannot see a window one short: {old:?}"
    );

    // A disconnect that does not restore a coin spent above the fork.
    let good = dropped_spend(None);
    assert!(good.ok(), "fault off: {good:?}");
    let bad = dropped_spend(Some(Fault::DisconnectKeepsSpent));
    assert!(
        !bad.ok(),
        "the oracle missed a spend a reorg dropped: {bad:?}"
    );

    // A block routed once although a derived script paid an earlier
    // transaction of it.
    let good = reverse_burst(None);
    assert!(good.ok(), "fault off: {good:?}");
    let bad = reverse_burst(Some(Fault::SinglePass));
    assert!(!bad.ok(), "the oracle missed a single pass: {bad:?}");

    // Every switch is off again for whatever runs after.
    for fault in [
        Fault::WindowOneShort,
        Fault::DisconnectKeepsSpent,
        Fault::SinglePass,
    ] {
        assert!(!faults::active(fault));
    }
}
