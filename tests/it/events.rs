//! The manager's per-wallet events add up: a block's `WalletActivity`
//! events say exactly what the block did to each wallet, also when the
//! block is routed twice because a transaction's ingest moved a lookahead
//! window past a script an earlier transaction of the block paid.

use std::collections::BTreeMap;

use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut, Txid};
use lockstep_manager::Event;
use lockstep_sim::SimChain;
use lockstep_store::WalletId;
use lockstep_tests::rig::{Rig, runtime};
use lockstep_wallet::Keychain;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::broadcast::Receiver;

/// Per (wallet, height): received − sent, as the events told it.
fn event_nets(events: &mut Receiver<Event>) -> BTreeMap<(WalletId, u32), i64> {
    let mut nets = BTreeMap::new();
    while let Ok(event) = events.try_recv() {
        if let Event::WalletActivity {
            wallet,
            height,
            received,
            sent,
            ..
        } = event
        {
            *nets.entry((wallet, height)).or_default() +=
                received.to_sat() as i64 - sent.to_sat() as i64;
        }
    }
    nets
}

/// Per height: received − sent of `scripts`, as a full scan of the chain
/// tells it (blocks that do not touch them are left out).
fn oracle_nets(chain: &SimChain, scripts: &[ScriptBuf]) -> BTreeMap<u32, i64> {
    let mut nets = BTreeMap::new();
    for t in chain.truth(scripts).history {
        *nets.entry(t.height).or_default() += t.received.to_sat() as i64 - t.sent.to_sat() as i64;
    }
    nets
}

/// Scripts `0..end` of both keychains of test wallet `index`.
fn scripts(index: u32, end: u32) -> Vec<ScriptBuf> {
    Keychain::ALL
        .into_iter()
        .flat_map(|k| (0..end).map(move |i| Rig::script(index, k, i)))
        .collect()
}

fn balance(rig: &Rig, id: WalletId) -> i64 {
    rig.store
        .read_blocking(move |tx| tx.wallet_balance(id))
        .unwrap() as i64
}

/// One block: a wallet coin spent first, then a payment to external
/// script 7 (past the window 0..6 that using script 0 left), then a
/// payment to script 3 that moves the window past 7. The block is routed
/// twice; the spend must still be in its events.
#[test]
fn a_block_routed_twice_reports_its_spend() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), 21, 2);
        let lookahead = 5;
        let id = rig.add(0, lookahead).await;
        let coin = rig.pay(0, Keychain::External, 0, 100_000);
        rig.chain.mine(1).unwrap();
        rig.sync().await;
        let before = balance(&rig, id);
        assert_eq!(before, 100_000);

        let foreign = lockstep_tests::p2wpkh(&lockstep_tests::key(3));
        let spend = rig.chain.spend_to(coin, foreign, None).unwrap();
        let far = rig.pay(0, Keychain::External, 7, 20_000);
        let mover = rig.pay(0, Keychain::External, 3, 10_000);
        let height = rig.chain.height() + 1;
        rig.chain.mine(1).unwrap();
        // The block holds them in that order (what the test is about).
        let block = rig.chain.block_at(height).unwrap();
        let position = |txid: Txid| {
            block
                .txdata
                .iter()
                .position(|t| t.compute_txid() == txid)
                .unwrap()
        };
        assert!(position(spend) < position(far.txid));
        assert!(position(far.txid) < position(mover.txid));

        let mut events = rig.manager.subscribe();
        rig.sync().await;
        let delta = balance(&rig, id) - before;
        assert_eq!(
            delta,
            20_000 + 10_000 - 100_000,
            "the wallet found all three"
        );
        let nets = event_nets(&mut events);
        assert_eq!(
            nets.get(&(id, height)).copied(),
            Some(delta),
            "the events of block {height} say what it did to the balance"
        );
        let oracle = oracle_nets(&rig.chain, &scripts(0, 20));
        assert_eq!(oracle.get(&height).copied(), Some(delta));
        let check = rig.check(id);
        assert!(check.ok(), "{check:?}");
    });
}

/// Where the random scenario may pay: per (wallet, keychain), every index
/// below `reach` is watched once the block is ingested (the gap-limit rule
/// over what was paid so far).
struct Reach {
    lookahead: u32,
    reach: BTreeMap<(u32, Keychain), u32>,
}

impl Reach {
    /// A script the wallet will find: mostly near the window's edge, so
    /// that payments of one block move its window for each other.
    fn pick(&mut self, rng: &mut ChaCha8Rng, wallet: u32) -> ScriptBuf {
        let keychain = if rng.gen_bool(0.7) {
            Keychain::External
        } else {
            Keychain::Internal
        };
        let reach = self
            .reach
            .entry((wallet, keychain))
            .or_insert(self.lookahead);
        let low = reach.saturating_sub(2);
        let i = if rng.gen_bool(0.8) {
            rng.gen_range(low..*reach)
        } else {
            rng.gen_range(0..*reach)
        };
        *reach = (*reach).max(i + 1 + self.lookahead);
        Rig::script(wallet, keychain, i)
    }

    fn max(&self) -> u32 {
        self.reach.values().copied().max().unwrap_or(self.lookahead)
    }
}

/// Random blocks of payments and spends to and from a few wallets, each
/// block's payments shuffled so that many pay a script only a later
/// transaction of the block derives, and spends of wallet coins (confirmed
/// ones and ones the block creates) mixed in. For every block and wallet
/// the events add up to the oracle's net, and every wallet equals the
/// oracle at the end.
fn random_blocks(seed: u64, blocks: u32) -> Result<(), TestCaseError> {
    const WALLETS: u32 = 3;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rig = Rig::new(dir.path(), seed, 1);
        let lookahead = 3;
        let mut ids = Vec::new();
        for w in 0..WALLETS {
            ids.push(rig.add(10 + w, lookahead).await);
        }
        rig.sync().await;
        let first = rig.chain.height() + 1;
        let mut events = rig.manager.subscribe();
        let mut reach = Reach {
            lookahead,
            reach: BTreeMap::new(),
        };
        let foreign = lockstep_tests::p2wpkh(&lockstep_tests::key(9));
        // Wallet coins not yet spent: (outpoint, value).
        let mut coins: Vec<(OutPoint, u64)> = Vec::new();
        for _ in 0..blocks {
            let mut payments: Vec<(u32, ScriptBuf)> = (0..rng.gen_range(2..8))
                .map(|_| {
                    let w = rng.gen_range(0..WALLETS);
                    (w, reach.pick(&mut rng, 10 + w))
                })
                .collect();
            payments.shuffle(&mut rng);
            for (_, script) in payments {
                if rng.gen_bool(0.4) && !coins.is_empty() {
                    let (coin, value) = coins.swap_remove(rng.gen_range(0..coins.len()));
                    let to = if rng.gen_bool(0.5) {
                        foreign.clone()
                    } else {
                        let w = rng.gen_range(0..WALLETS);
                        reach.pick(&mut rng, 10 + w)
                    };
                    let out = TxOut {
                        value: Amount::from_sat(value - 1_000),
                        script_pubkey: to.clone(),
                    };
                    let txid = rig.chain.spend(coin, vec![out], None).unwrap();
                    if to != foreign {
                        coins.push((OutPoint { txid, vout: 0 }, value - 1_000));
                    }
                }
                let value = rng.gen_range(10_000..200_000);
                let coin = rig.chain.pay(script, Amount::from_sat(value)).unwrap();
                coins.push((coin, value));
            }
            rig.chain.mine(1).unwrap();
        }
        rig.sync().await;
        let nets = event_nets(&mut events);
        let end = reach.max() + lookahead;
        for (w, id) in ids.iter().enumerate() {
            let oracle = oracle_nets(&rig.chain, &scripts(10 + w as u32, end));
            for height in first..=rig.chain.height() {
                prop_assert_eq!(
                    nets.get(&(*id, height)).copied().unwrap_or(0),
                    oracle.get(&height).copied().unwrap_or(0),
                    "wallet {} at height {}",
                    w,
                    height
                );
            }
            let check = rig.check(*id);
            prop_assert!(check.ok(), "{:?}", check);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn events_add_up_to_the_oracle(seed in any::<u64>(), blocks in 2u32..6) {
        random_blocks(seed, blocks)?;
    }
}
