//! A live wallet's memory changes only after the database did: with every
//! COMMIT made to fail (the `CommitFails` fault switch, as `SQLITE_BUSY`
//! past the busy timeout would), an address reveal, a send's coin
//! selection and a block's ingest each fail, and what readers see of the
//! wallet, at the failing COMMIT itself and after it, is what the database
//! holds.
//!
//! The switch is process-wide: this binary runs its scenarios one after
//! another in ONE test.

use std::sync::{Arc, Mutex};

use bitcoin::{Amount, TxOut};
use lockstep_manager::ErrorKind;
use lockstep_store::faults::{self, Fault};
use lockstep_store::{Store, WalletId};
use lockstep_tests::rig::{Rig, runtime};
use lockstep_wallet::{Keychain, KeychainInfo, LiveWallet, SpendRequest};

/// Both keychains' indexes, as one comparable value.
type View = [(Option<u32>, Option<u32>, u32); 2];

/// What readers see of the wallet in memory.
fn memory(live: &LiveWallet) -> View {
    Keychain::ALL.map(|k| {
        let KeychainInfo {
            last_revealed,
            last_used,
            derived,
        } = live.keychain(k);
        (last_revealed, last_used, derived)
    })
}

/// What the database holds of the wallet's keychains.
fn database(store: &Store, id: WalletId) -> View {
    let rows = store.read_blocking(move |tx| tx.keychains(id)).unwrap();
    [0, 1].map(|k| {
        let row = &rows[k];
        (row.next_index.checked_sub(1), row.last_used, row.derived_to)
    })
}

/// Every COMMIT fails while it lives; meanwhile, what readers see of
/// `live` at each COMMIT is recorded.
struct CommitsFail {
    seen: Arc<Mutex<Vec<View>>>,
}

impl CommitsFail {
    fn new(live: &Arc<LiveWallet>) -> CommitsFail {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, live) = (Arc::clone(&seen), Arc::clone(live));
        faults::set_before_commit(Some(Arc::new(move || {
            record.lock().unwrap().push(memory(&live));
        })));
        faults::set(Some(Fault::CommitFails));
        CommitsFail { seen }
    }

    /// Every COMMIT succeeds again; returns what readers saw at each
    /// failing one.
    fn finish(self) -> Vec<View> {
        let seen = self.seen.lock().unwrap().clone();
        drop(self);
        seen
    }
}

impl Drop for CommitsFail {
    fn drop(&mut self) {
        faults::set(None);
        faults::set_before_commit(None);
    }
}

/// Asserts that readers saw `committed` at every failing COMMIT (at least
/// one), and that memory and the database both hold it now.
fn assert_unchanged(what: &str, seen: &[View], live: &LiveWallet, store: &Store, committed: View) {
    assert!(!seen.is_empty(), "{what}: no COMMIT was attempted");
    for view in seen {
        assert_eq!(
            *view, committed,
            "{what}: readers saw a change that was rolled back"
        );
    }
    assert_eq!(memory(live), committed, "{what}: memory moved");
    assert_eq!(
        database(store, live.id()),
        committed,
        "{what}: the database moved"
    );
}

#[test]
fn memory_changes_only_after_commit() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 21, 4);
        let lookahead = 5;
        let id = rig.add(0, lookahead).await;
        rig.pay(0, Keychain::External, 0, 100_000);
        rig.chain.mine(1).unwrap();
        rig.sync().await;
        let live = rig.manager.wallet(id).await.unwrap();

        // An address reveal.
        let committed = database(&rig.store, id);
        assert_eq!(memory(&live), committed);
        let failing = CommitsFail::new(&live);
        let error = live.reveal_address(Keychain::External).await.unwrap_err();
        assert_eq!(
            error.kind(),
            lockstep_store::ErrorKind::Retryable,
            "{error}"
        );
        let seen = failing.finish();
        assert_unchanged("reveal", &seen, &live, &rig.store, committed);
        let revealed = live.reveal_address(Keychain::External).await.unwrap();
        assert_eq!(Some(revealed.index), memory(&live)[0].0);
        assert_eq!(memory(&live), database(&rig.store, id));

        // A send's coin selection (it locks coins and reveals a change
        // script).
        let committed = database(&rig.store, id);
        let request = SpendRequest {
            recipients: vec![TxOut {
                value: Amount::from_sat(30_000),
                script_pubkey: lockstep_tests::p2wpkh(&lockstep_tests::key(9)),
            }],
            fee_rate_sat_vb: 2.0,
        };
        let failing = CommitsFail::new(&live);
        let error = live
            .select_and_lock(request.clone(), "send-1")
            .await
            .unwrap_err();
        assert_eq!(
            error.kind(),
            lockstep_store::ErrorKind::Retryable,
            "{error}"
        );
        let seen = failing.finish();
        assert_unchanged("send", &seen, &live, &rig.store, committed);
        assert_eq!(live.balance().await.unwrap().locked, Amount::ZERO);
        live.select_and_lock(request, "send-1").await.unwrap();
        assert_eq!(memory(&live), database(&rig.store, id));
        assert_ne!(memory(&live), committed, "the change script was revealed");
        live.release("send-1").await.unwrap();

        // A block's ingest: a payment at the window's edge, which moves the
        // window (derives scripts) when the block is ingested.
        let committed = database(&rig.store, id);
        let edge = committed[0].2 - 1;
        rig.pay(0, Keychain::External, edge, 40_000);
        rig.chain.mine(1).unwrap();
        let failing = CommitsFail::new(&live);
        let error = rig.manager.sync().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Retryable, "{error}");
        let seen = failing.finish();
        assert_unchanged("ingest", &seen, &live, &rig.store, committed);
        assert!(faults::commits_failed() >= 3);
        rig.sync().await;
        let now = memory(&live);
        assert_eq!(now, database(&rig.store, id));
        assert_eq!(now[0].1, Some(edge), "the payment was ingested");
        assert!(now[0].2 > committed[0].2, "the window moved");
        assert!(rig.check(id).ok());
    });
}
