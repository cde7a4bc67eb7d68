//! Signed transactions of each script type pass Bitcoin Core's interpreter
//! (`bitcoinconsensus` 0.106, all spent outputs, Taproot on), the same
//! check rejects them after one signature byte is flipped, and SimChain's
//! validating mempool accepts them.

use bitcoin::bip32::{Xpriv, Xpub};
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Amount, Network, NetworkKind, ScriptBuf, Transaction, TxOut};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{Store, StoreOptions};

use crate::*;

/// Bitcoin Core's interpreter (`bitcoinconsensus` 0.106) on every input,
/// with all spent outputs and Taproot on; the failing input on error.
fn verify(tx: &Transaction, spent: &[TxOut]) -> Result<(), (usize, String)> {
    lockstep_sim::verify::verify_transaction(tx, spent).map_err(|e| (e.input, e.reason))
}

struct World {
    _dir: tempfile::TempDir,
    chain: SimChain,
    store: Store,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
        World {
            _dir: dir,
            chain: SimChain::generate(SimParams::signed(77), 101).unwrap(),
            store,
        }
    }

    fn wallet(&self, name: &'static str, ext: String, int: String) -> Wallet {
        let d = WalletDescriptors::parse(&ext, &int, Network::Regtest).unwrap();
        let params = WalletParams {
            name,
            birth_height: 0,
            lookahead: 5,
            passphrase: Some("pw"),
        };
        self.store
            .write_blocking(move |tx| Wallet::create(tx, &params, d))
            .unwrap()
    }

    /// Pays the wallet's first two receive scripts, mines, and ingests.
    fn fund(&self, wallets: &mut [&mut Wallet]) {
        let from = self.chain.height() + 1;
        for i in 0..2 {
            let script = wallets[0]
                .descriptors()
                .script_at(Keychain::External, i)
                .unwrap();
            self.chain
                .pay(script, Amount::from_sat(60_000 + u64::from(i)))
                .unwrap();
        }
        self.chain.mine(1).unwrap();
        self.ingest(wallets, from);
    }

    fn ingest(&self, wallets: &mut [&mut Wallet], from: u32) {
        for height in from..=self.chain.height() {
            let txs = self.chain.block_at(height).unwrap().txdata.clone();
            for w in wallets.iter_mut() {
                let (mut owned, txs) = ((**w).clone(), txs.clone());
                **w = self
                    .store
                    .write_blocking(move |tx| {
                        owned.ingest(tx, height, &txs)?;
                        Ok::<_, WalletError>(owned)
                    })
                    .unwrap();
            }
        }
    }
}

fn foreign_payment() -> SpendRequest {
    let to = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([3; 20]));
    SpendRequest {
        recipients: vec![TxOut {
            value: Amount::from_sat(90_000),
            script_pubkey: to,
        }],
        fee_rate_sat_vb: 3.0,
    }
}

/// Signs, checks with Core's interpreter (and that a flipped signature
/// byte fails it), broadcasts, confirms.
fn spend_and_check(world: &World, wallet: &mut Wallet, cosigner: Option<&Wallet>) {
    let w = wallet.clone();
    let selection = world
        .store
        .write_blocking(move |tx| w.select_and_lock(tx, &foreign_payment(), "pay"))
        .unwrap();
    assert!(selection.coins.len() >= 2);
    let mut psbt = wallet.build_psbt(&selection).unwrap();
    assert_eq!(wallet.sign(&mut psbt).unwrap(), selection.coins.len());
    if let Some(cosigner) = cosigner {
        // One of two signatures is not enough.
        assert!(matches!(
            Wallet::finalize(psbt.clone()),
            Err(WalletError::Sign(_))
        ));
        assert_eq!(cosigner.sign(&mut psbt).unwrap(), selection.coins.len());
    }
    let tx = Wallet::finalize(psbt).unwrap();
    let spent: Vec<TxOut> = selection.coins.iter().map(|c| c.txout.clone()).collect();
    verify(&tx, &spent).unwrap();

    // The same check rejects a flipped signature byte (the last witness
    // item that is a signature: the first for single-key, a middle one for
    // multisig).
    let mut bad = tx.clone();
    let witness: Vec<Vec<u8>> = bad.input[0].witness.iter().map(|w| w.to_vec()).collect();
    let sig_at = witness
        .iter()
        .position(|w| w.len() >= 64 && w.len() <= 73)
        .unwrap();
    let mut items = witness.clone();
    items[sig_at][8] ^= 1;
    bad.input[0].witness = bitcoin::Witness::from_slice(&items);
    assert!(matches!(verify(&bad, &spent), Err((0, _))));

    let before = world.chain.height();
    world.chain.submit(tx.clone()).unwrap();
    world.chain.mine(1).unwrap();
    world.ingest(&mut [wallet], before + 1);
    let w = wallet.clone();
    let history = world.store.read_blocking(move |tx| w.history(tx)).unwrap();
    let sent = history
        .iter()
        .find(|h| h.txid == tx.compute_txid())
        .unwrap();
    assert_eq!(sent.height, Some(before + 1));
    assert_eq!(sent.net(), -(90_000 + selection.fee.to_sat() as i64));
}

#[test]
fn p2wpkh_wallet_signs_what_core_accepts() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[11; 32]).unwrap();
    let mut w = world.wallet(
        "wpkh",
        format!("wpkh({root}/84'/1'/0'/0/*)"),
        format!("wpkh({root}/84'/1'/0'/1/*)"),
    );
    world.fund(&mut [&mut w]);
    spend_and_check(&world, &mut w, None);
}

#[test]
fn p2tr_wallet_signs_what_core_accepts() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[12; 32]).unwrap();
    let mut w = world.wallet(
        "tr",
        format!("tr({root}/86'/1'/0'/0/*)"),
        format!("tr({root}/86'/1'/0'/1/*)"),
    );
    world.fund(&mut [&mut w]);
    spend_and_check(&world, &mut w, None);
}

#[test]
fn two_of_two_multisig_wallets_sign_their_share() {
    let world = World::new();
    let secp = Secp256k1::new();
    let a = Xpriv::new_master(NetworkKind::Test, &[21; 32]).unwrap();
    let b = Xpriv::new_master(NetworkKind::Test, &[22; 32]).unwrap();
    let (a_pub, b_pub) = (Xpub::from_priv(&secp, &a), Xpub::from_priv(&secp, &b));
    let desc = |x: String, y: String, k: u8| format!("wsh(sortedmulti(2,{x}/{k}/*,{y}/{k}/*))");
    let mut alice = world.wallet(
        "alice",
        desc(a.to_string(), b_pub.to_string(), 0),
        desc(a.to_string(), b_pub.to_string(), 1),
    );
    let mut bob = world.wallet(
        "bob",
        desc(a_pub.to_string(), b.to_string(), 0),
        desc(a_pub.to_string(), b.to_string(), 1),
    );
    assert_eq!(
        alice
            .descriptors()
            .script_at(Keychain::External, 0)
            .unwrap(),
        bob.descriptors().script_at(Keychain::External, 0).unwrap()
    );
    world.fund(&mut [&mut alice, &mut bob]);
    spend_and_check(&world, &mut alice, Some(&bob));
}

#[test]
fn a_locked_wallet_cannot_sign() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[13; 32]).unwrap();
    let mut w = world.wallet(
        "locked",
        format!("wpkh({root}/0/*)"),
        format!("wpkh({root}/1/*)"),
    );
    world.fund(&mut [&mut w]);
    let id = w.id();
    let mut loaded = world
        .store
        .read_blocking(move |tx| Wallet::load(tx, id))
        .unwrap();
    assert!(loaded.is_locked());
    let l = loaded.clone();
    let selection = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "p"))
        .unwrap();
    let mut psbt = loaded.build_psbt(&selection).unwrap();
    assert!(matches!(
        loaded.sign(&mut psbt),
        Err(WalletError::Locked(_))
    ));
    loaded = world
        .store
        .read_blocking(move |tx| {
            loaded.unlock(tx, "pw")?;
            Ok::<_, WalletError>(loaded)
        })
        .unwrap();
    assert_eq!(loaded.sign(&mut psbt).unwrap(), selection.coins.len());
    Wallet::finalize(psbt).unwrap();
}

/// Builds, signs and finalises a payment of `sats` from `selection`'s coins.
fn signed(wallet: &Wallet, selection: &Selection, sats: u64) -> Transaction {
    let mut selection = selection.clone();
    let extra = selection.recipients[0].value.to_sat() - sats;
    selection.recipients[0].value = Amount::from_sat(sats);
    if let Some(change) = selection.change.as_mut() {
        change.value += Amount::from_sat(extra);
    }
    let mut psbt = wallet.build_psbt(&selection).unwrap();
    wallet.sign(&mut psbt).unwrap();
    Wallet::finalize(psbt).unwrap()
}

#[test]
fn own_broadcasts_are_tracked_until_confirmed_or_conflicted() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[14; 32]).unwrap();
    let mut w = world.wallet(
        "tracker",
        format!("wpkh({root}/0/*)"),
        format!("tr({root}/1/*)"),
    );
    world.fund(&mut [&mut w]);
    let history = |w: &Wallet| {
        let w = w.clone();
        world.store.read_blocking(move |tx| w.history(tx)).unwrap()
    };

    // Recorded, it shows unconfirmed; once mined and ingested, confirmed.
    let l = w.clone();
    let selection = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "a"))
        .unwrap();
    let t1 = signed(&w, &selection, 90_000);
    let (l, t) = (w.clone(), t1.clone());
    let recorded = world
        .store
        .write_blocking(move |tx| l.record_broadcast(tx, &t))
        .unwrap();
    assert_eq!(recorded.height, None);
    assert_eq!(
        recorded.sent.to_sat(),
        selection
            .coins
            .iter()
            .map(|c| c.txout.value.to_sat())
            .sum::<u64>()
    );
    assert!(
        history(&w)
            .iter()
            .any(|h| h.txid == t1.compute_txid() && h.height.is_none())
    );
    world.chain.submit(t1.clone()).unwrap();
    world.chain.mine(1).unwrap();
    world.ingest(&mut [&mut w], world.chain.height());
    let entry = history(&w)
        .into_iter()
        .find(|h| h.txid == t1.compute_txid())
        .unwrap();
    assert_eq!(
        (entry.height, entry.conflicted_by),
        (Some(world.chain.height()), None)
    );

    // A second payment is recorded, but another spend of the same coins
    // confirms instead: the recorded one is conflicted, until that block
    // is disconnected.
    world.fund(&mut [&mut w]);
    let l = w.clone();
    let selection = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "b"))
        .unwrap();
    let (mine, other) = (
        signed(&w, &selection, 90_000),
        signed(&w, &selection, 80_000),
    );
    let (l, t) = (w.clone(), mine.clone());
    world
        .store
        .write_blocking(move |tx| l.record_broadcast(tx, &t))
        .unwrap();
    world.chain.submit(other.clone()).unwrap();
    world.chain.mine(1).unwrap();
    let height = world.chain.height();
    world.ingest(&mut [&mut w], height);
    let entry = history(&w)
        .into_iter()
        .find(|h| h.txid == mine.compute_txid())
        .unwrap();
    assert_eq!(entry.height, None);
    assert_eq!(entry.conflicted_by, Some((other.compute_txid(), height)));
    let l = w.clone();
    world
        .store
        .write_blocking(move |tx| l.disconnect(tx, height))
        .unwrap();
    let entry = history(&w)
        .into_iter()
        .find(|h| h.txid == mine.compute_txid())
        .unwrap();
    assert_eq!((entry.height, entry.conflicted_by), (None, None));
    assert!(history(&w).iter().all(|h| h.txid != other.compute_txid()));
}

#[test]
fn the_balance_shows_confirmed_locked_and_pending_parts() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[15; 32]).unwrap();
    let mut w = world.wallet(
        "parts",
        format!("wpkh({root}/0/*)"),
        format!("wpkh({root}/1/*)"),
    );
    world.fund(&mut [&mut w]);
    let balance = |w: &Wallet| {
        let w = w.clone();
        world
            .store
            .read_blocking(move |tx| w.balance_details(tx))
            .unwrap()
    };
    let b = balance(&w);
    assert_eq!(
        (b.confirmed.to_sat(), b.locked, b.spendable().to_sat()),
        (120_001, Amount::ZERO, 120_001)
    );
    let l = w.clone();
    let selection = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "x"))
        .unwrap();
    let t = signed(&w, &selection, 90_000);
    let (l, tt) = (w.clone(), t.clone());
    world
        .store
        .write_blocking(move |tx| l.record_broadcast(tx, &tt))
        .unwrap();
    let b = balance(&w);
    let inputs: u64 = selection.coins.iter().map(|c| c.txout.value.to_sat()).sum();
    assert_eq!(b.locked.to_sat(), inputs);
    assert_eq!(b.unconfirmed_outgoing.to_sat(), inputs);
    assert_eq!(b.untrusted_pending, Amount::ZERO);
    assert_eq!(
        b.trusted_pending,
        selection.change.as_ref().map_or(Amount::ZERO, |c| c.value)
    );
    assert_eq!(b.spendable().to_sat(), 120_001 - inputs);
}

#[test]
fn immature_coinbase_coins_are_not_selected() {
    let world = World::new();
    let root = Xpriv::new_master(NetworkKind::Test, &[16; 32]).unwrap();
    let w = world.wallet(
        "miner",
        format!("wpkh({root}/0/*)"),
        format!("wpkh({root}/1/*)"),
    );
    let coinbase = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![bitcoin::TxIn {
            previous_output: bitcoin::OutPoint::null(),
            ..Default::default()
        }],
        output: vec![TxOut {
            value: Amount::from_sat(500_000),
            script_pubkey: w.descriptors().script_at(Keychain::External, 0).unwrap(),
        }],
    };
    assert!(coinbase.is_coinbase());
    let mut owned = w.clone();
    let w = world
        .store
        .write_blocking(move |tx| {
            owned.ingest(tx, 200, &[coinbase])?;
            tx.set_tip(250, &[0; 32])?;
            Ok::<_, WalletError>(owned)
        })
        .unwrap();
    let l = w.clone();
    let err = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "m"))
        .unwrap_err();
    assert!(
        matches!(err, WalletError::InsufficientFunds { .. }),
        "{err:?}"
    );
    // As Bitcoin Core's wallet counts it: at 299 (99 blocks on top) the
    // coin is still immature, though consensus would take its spend in
    // block 300; at 300 it is spendable. The balance says the same.
    let l = w.clone();
    world
        .store
        .write_blocking(|tx| tx.set_tip(299, &[0; 32]))
        .unwrap();
    let err = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "m"))
        .unwrap_err();
    assert!(
        matches!(err, WalletError::InsufficientFunds { .. }),
        "{err:?}"
    );
    let l = w.clone();
    let balance = world
        .store
        .read_blocking(move |tx| l.balance_details(tx))
        .unwrap();
    assert_eq!(balance.immature, Amount::from_sat(500_000));
    assert_eq!(balance.spendable(), Amount::ZERO);
    let l = w.clone();
    world
        .store
        .write_blocking(|tx| tx.set_tip(300, &[0; 32]))
        .unwrap();
    let balance = world
        .store
        .read_blocking(move |tx| l.balance_details(tx))
        .unwrap();
    assert_eq!(balance.immature, Amount::ZERO);
    assert_eq!(balance.spendable(), Amount::from_sat(500_000));
    let l = w.clone();
    let selection = world
        .store
        .write_blocking(move |tx| l.select_and_lock(tx, &foreign_payment(), "m"))
        .unwrap();
    assert_eq!(selection.coins.len(), 1);
}
