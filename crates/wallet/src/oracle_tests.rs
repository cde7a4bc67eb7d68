//! A wallet driven through random SimChain histories (payments, bursts
//! across the lookahead window inside one block, spends, a coin created
//! and spent in one block, reorgs of both kinds), compared after every step
//! with the chain's oracle: an exact full scan for the wallet's scripts.

use std::collections::{BTreeSet, HashSet};

use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, BlockHash, Network, NetworkKind, OutPoint, ScriptBuf, Txid};
use lockstep_sim::{ReorgTxs, SimChain, SimParams};
use lockstep_store::{Store, StoreOptions};
use proptest::prelude::*;

use crate::*;

const LOOKAHEAD: u32 = 4;

struct Harness {
    _dir: tempfile::TempDir,
    chain: SimChain,
    store: Store,
    wallet: Option<Wallet>,
    /// The hashes the wallet has ingested, by height.
    hashes: Vec<BlockHash>,
    /// Every wallet script the test paid, by keychain and index: a payment
    /// the wallet should have found but did not would show.
    paid: HashSet<(Keychain, u32)>,
    /// When the wallet derived each of its scripts (the height of the block
    /// whose ingest derived it; 0 for those derived at creation).
    derived_at: std::collections::HashMap<ScriptBuf, u32>,
}

#[derive(Debug, Clone)]
enum Op {
    Pay {
        keychain: bool,
        offset: u32,
        sats: u64,
    },
    Burst,
    Spend {
        pick: usize,
        to_self: bool,
    },
    PayAndSpend,
    Mine(u32),
    Reorg {
        depth: u32,
        reappear: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<bool>(), 0..LOOKAHEAD, 1_000u64..5_000_000).prop_map(|(keychain, offset, sats)| Op::Pay { keychain, offset, sats }),
        1 => Just(Op::Burst),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, to_self)| Op::Spend { pick, to_self }),
        1 => Just(Op::PayAndSpend),
        3 => (1u32..3).prop_map(Op::Mine),
        1 => (1u32..4, any::<bool>()).prop_map(|(depth, reappear)| Op::Reorg { depth, reappear }),
    ]
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
        let chain =
            SimChain::generate(SimParams::unsigned(seed).with_load(2..=6, 1..=2), 101).unwrap();
        let root = Xpriv::new_master(NetworkKind::Test, &seed.to_le_bytes()).unwrap();
        let descriptors = WalletDescriptors::parse(
            &format!("wpkh({root}/0/*)"),
            &format!("tr({root}/1/*)"),
            Network::Regtest,
        )
        .unwrap();
        let params = WalletParams {
            name: "w",
            birth_height: 0,
            lookahead: LOOKAHEAD,
            passphrase: Some("test passphrase"),
        };
        let wallet = store
            .write_blocking(move |tx| Wallet::create(tx, &params, descriptors))
            .unwrap();
        let derived_at = wallet
            .watch_scripts()
            .map(|(_, _, s)| (s.to_owned(), 0))
            .collect();
        let mut h = Harness {
            _dir: dir,
            chain,
            store,
            wallet: Some(wallet),
            hashes: Vec::new(),
            paid: HashSet::new(),
            derived_at,
        };
        h.sync();
        h
    }

    fn wallet(&self) -> &Wallet {
        self.wallet.as_ref().unwrap()
    }

    /// An index the wallet must find: within its window.
    fn reachable(&self, keychain: Keychain, offset: u32) -> u32 {
        let w = self.wallet();
        w.next_index(keychain)
            .max(w.last_used(keychain).map_or(0, |u| u + 1))
            + offset
    }

    fn script(&self, keychain: Keychain, index: u32) -> ScriptBuf {
        self.wallet()
            .descriptors()
            .script_at(keychain, index)
            .unwrap()
    }

    fn pay(&mut self, keychain: Keychain, index: u32, sats: u64) -> OutPoint {
        self.paid.insert((keychain, index));
        self.chain
            .pay(self.script(keychain, index), Amount::from_sat(sats))
            .unwrap()
    }

    /// Brings the wallet to the chain's tip like a one-wallet chain loop:
    /// disconnect back to the fork, then ingest block by block.
    fn sync(&mut self) {
        let mut fork = self.hashes.len();
        while fork > 0 && self.chain.hash_at(fork as u32 - 1) != Some(self.hashes[fork - 1]) {
            fork -= 1;
        }
        let mut wallet = self.wallet.take().unwrap();
        if fork < self.hashes.len() {
            let height = fork as u32;
            wallet = self
                .store
                .write_blocking(move |tx| {
                    wallet.disconnect(tx, height)?;
                    Ok::<_, WalletError>(wallet)
                })
                .unwrap();
            self.hashes.truncate(fork);
        }
        for height in self.hashes.len() as u32..=self.chain.height() {
            let block = self.chain.block_at(height).unwrap();
            let txs = block.txdata.clone();
            wallet = self
                .store
                .write_blocking(move |tx| {
                    let summary = wallet.ingest(tx, height, &txs)?;
                    Ok::<_, WalletError>((wallet, summary))
                })
                .map(|(wallet, summary)| {
                    for (_, _, script) in summary.new_scripts.0 {
                        self.derived_at.entry(script).or_insert(height);
                    }
                    wallet
                })
                .unwrap();
            self.hashes.push(block.block_hash());
        }
        self.wallet = Some(wallet);
    }

    fn unspent(&self) -> Vec<Coin> {
        let w = self.wallet().clone();
        self.store
            .read_blocking(move |tx| w.coins(tx, true))
            .unwrap()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Pay {
                keychain,
                offset,
                sats,
            } => {
                let keychain = if keychain {
                    Keychain::Internal
                } else {
                    Keychain::External
                };
                let index = self.reachable(keychain, offset);
                self.pay(keychain, index, sats);
            }
            Op::Burst => {
                // Three windows deep inside one block: each payment is only
                // reachable once the previous one has moved the window.
                let first = self.reachable(Keychain::External, 0);
                for k in 0..3 {
                    self.pay(
                        Keychain::External,
                        first + k * (LOOKAHEAD - 1),
                        20_000 + u64::from(k),
                    );
                }
            }
            Op::Spend { pick, to_self } => {
                let mempool_spent: HashSet<OutPoint> = self
                    .chain
                    .mempool()
                    .iter()
                    .flat_map(|t| t.input.iter().map(|i| i.previous_output))
                    .collect();
                let coins: Vec<Coin> = self
                    .unspent()
                    .into_iter()
                    .filter(|c| !mempool_spent.contains(&c.outpoint))
                    .collect();
                if coins.is_empty() {
                    return;
                }
                let coin = &coins[pick % coins.len()];
                let to = if to_self {
                    let index = self.reachable(Keychain::Internal, 0);
                    self.paid.insert((Keychain::Internal, index));
                    self.script(Keychain::Internal, index)
                } else {
                    ScriptBuf::new_op_return([7u8; 4])
                };
                if coin.txout.value > Amount::from_sat(1_000) {
                    self.chain.spend_to(coin.outpoint, to, None).unwrap();
                }
            }
            Op::PayAndSpend => {
                let index = self.reachable(Keychain::External, 0);
                let coin = self.pay(Keychain::External, index, 50_000);
                self.chain
                    .spend_to(coin, ScriptBuf::new_op_return([8u8; 4]), None)
                    .unwrap();
            }
            Op::Mine(n) => {
                self.chain.mine(n).unwrap();
                self.sync();
            }
            Op::Reorg { depth, reappear } => {
                let mode = if reappear {
                    ReorgTxs::Reappear
                } else {
                    ReorgTxs::Drop
                };
                self.chain.reorg(depth, mode).unwrap();
                self.sync();
            }
        }
    }

    /// The wallet equals the oracle for its scripts (coins, spends, balance,
    /// history), and it watches every paid script that a gap-limit scan of
    /// the best chain reaches (a reorg can drop the payment that made a
    /// later one reachable: then no wallet can see that one).
    fn check(&self) -> Result<(), TestCaseError> {
        let descriptors = self.wallet().descriptors().clone();
        let script_of = |&(k, i): &(Keychain, u32)| descriptors.script_at(k, i).unwrap();
        let paid_truth = self
            .chain
            .truth(self.paid.iter().map(script_of).collect::<Vec<_>>().iter());
        let on_chain: BTreeSet<(Keychain, u32)> = paid_truth
            .per_script
            .keys()
            .map(|s| *self.paid.iter().find(|p| script_of(p) == *s).unwrap())
            .collect();
        for keychain in Keychain::ALL {
            let mut reach = LOOKAHEAD;
            for &(_, index) in on_chain.iter().filter(|(k, _)| *k == keychain) {
                if index >= reach {
                    break;
                }
                reach = reach.max(index + 1 + LOOKAHEAD);
                prop_assert!(
                    self.wallet()
                        .script_index(&script_of(&(keychain, index)))
                        .is_some(),
                    "{} {} is reachable but not watched",
                    keychain,
                    index
                );
            }
        }

        // Exactness: the wallet equals the oracle for every coin whose script
        // it had derived before the coin's block. A coin paid to a script
        // derived only later (its predecessor payment was dropped by a
        // reorg) cannot be found without a rescan, by this wallet or any
        // gap-limit wallet; one paid in the very block that derived its
        // script depends on the order inside the block. Those are left out
        // of the comparison on both sides, with the transactions that
        // touch them.
        let scripts: Vec<ScriptBuf> = self
            .wallet()
            .watch_scripts()
            .map(|(_, _, s)| s.to_owned())
            .collect();
        let truth = self.chain.truth(scripts.iter());
        let late = |script: &ScriptBuf, height: u32| {
            self.derived_at
                .get(script)
                .is_none_or(|d| *d >= height && *d > 0)
        };
        let mut skip_coins: HashSet<OutPoint> = HashSet::new();
        let mut skip_txs: HashSet<Txid> = HashSet::new();
        for coin in truth
            .unspent
            .iter()
            .chain(truth.spent.iter().map(|s| &s.coin))
        {
            if late(&coin.txout.script_pubkey, coin.height) {
                skip_coins.insert(coin.outpoint);
                skip_txs.insert(coin.outpoint.txid);
            }
        }
        for s in &truth.spent {
            if skip_coins.contains(&s.coin.outpoint) {
                skip_txs.insert(s.spent_by);
            }
        }
        let w = self.wallet().clone();
        let (all, history) = self
            .store
            .read_blocking(move |tx| Ok::<_, WalletError>((w.coins(tx, false)?, w.history(tx)?)))
            .unwrap();
        let all: Vec<&Coin> = all
            .iter()
            .filter(|c| !skip_coins.contains(&c.outpoint))
            .collect();
        let unspent: BTreeSet<(OutPoint, u64, u32)> = all
            .iter()
            .filter(|c| c.spent.is_none())
            .map(|c| (c.outpoint, c.txout.value.to_sat(), c.height))
            .collect();
        let expected: BTreeSet<(OutPoint, u64, u32)> = truth
            .unspent
            .iter()
            .filter(|c| !skip_coins.contains(&c.outpoint))
            .map(|c| (c.outpoint, c.txout.value.to_sat(), c.height))
            .collect();
        prop_assert_eq!(&unspent, &expected);
        let spent: BTreeSet<(OutPoint, Txid, u32)> = all
            .iter()
            .filter_map(|c| c.spent.map(|(t, h)| (c.outpoint, t, h)))
            .collect();
        let expected: BTreeSet<(OutPoint, Txid, u32)> = truth
            .spent
            .iter()
            .filter(|s| !skip_coins.contains(&s.coin.outpoint))
            .map(|s| (s.coin.outpoint, s.spent_by, s.spent_height))
            .collect();
        prop_assert_eq!(spent, expected);
        let mine: BTreeSet<(Option<u32>, Txid, u64, u64)> = history
            .iter()
            .filter(|t| !skip_txs.contains(&t.txid))
            .map(|t| (t.height, t.txid, t.received.to_sat(), t.sent.to_sat()))
            .collect();
        let expected: BTreeSet<(Option<u32>, Txid, u64, u64)> = truth
            .history
            .iter()
            .filter(|t| !skip_txs.contains(&t.txid))
            .map(|t| (Some(t.height), t.txid, t.received.to_sat(), t.sent.to_sat()))
            .collect();
        prop_assert_eq!(mine, expected);
        if skip_coins.is_empty() {
            let w = self.wallet().clone();
            let balance = self.store.read_blocking(move |tx| w.balance(tx)).unwrap();
            prop_assert_eq!(balance, truth.balance());
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_wallet_equals_the_oracle_after_every_step(seed in 1u64..1_000_000, ops in proptest::collection::vec(op(), 1..30)) {
        let mut h = Harness::new(seed);
        for op in &ops {
            h.apply(op);
            h.check()?;
        }
        h.apply(&Op::Mine(1));
        h.check()?;
    }
}

/// Everything the database says about the wallet.
/// Coins, history, watched scripts and last used indexes.
type Snapshot = (
    Vec<Coin>,
    Vec<HistoryTx>,
    Vec<(Keychain, u32, ScriptBuf)>,
    Vec<Option<u32>>,
);

fn snapshot(h: &Harness) -> Snapshot {
    let w = h.wallet().clone();
    let id = w.id();
    h.store
        .read_blocking(move |tx| {
            let reloaded = Wallet::load(tx, id)?;
            let scripts = reloaded
                .watch_scripts()
                .map(|(k, i, s)| (k, i, s.to_owned()))
                .collect();
            let used = Keychain::ALL
                .iter()
                .map(|k| reloaded.last_used(*k))
                .collect();
            Ok::<_, WalletError>((w.coins(tx, false)?, w.history(tx)?, scripts, used))
        })
        .unwrap()
}

#[test]
fn disconnect_then_reconnect_gives_the_identical_state() {
    let mut h = Harness::new(42);
    for op in [
        Op::Burst,
        Op::Mine(1),
        Op::PayAndSpend,
        Op::Pay {
            keychain: true,
            offset: 1,
            sats: 70_000,
        },
        Op::Mine(1),
    ] {
        h.apply(&op);
    }
    h.apply(&Op::Spend {
        pick: 1,
        to_self: true,
    });
    h.apply(&Op::Mine(2));
    h.check().unwrap();
    let before = snapshot(&h);
    assert!(before.0.len() >= 5, "{} coins", before.0.len());
    // Forget the last four blocks and ingest them again.
    let height = h.chain.height() - 3;
    let wallet = h.wallet.take().unwrap();
    let wallet = h
        .store
        .write_blocking(move |tx| {
            let removed = wallet.disconnect(tx, height)?;
            assert!(removed.coins_removed + removed.coins_restored > 0);
            Ok::<_, WalletError>(wallet)
        })
        .unwrap();
    h.wallet = Some(wallet);
    h.hashes.truncate(height as usize);
    assert_ne!(snapshot(&h).0, before.0);
    h.sync();
    assert_eq!(snapshot(&h), before);
}

/// Payments to scripts 0 up to 3× the window, in order inside one block:
/// ingest moves the window after each, so every one is found.
#[test]
fn a_burst_three_windows_deep_in_one_block_is_found() {
    let mut h = Harness::new(7);
    let first = h.reachable(Keychain::External, 0);
    let indexes: Vec<u32> = (0..=3 * LOOKAHEAD)
        .step_by((LOOKAHEAD - 1) as usize)
        .map(|k| first + k)
        .collect();
    assert!(indexes.last().unwrap() - first >= 3 * LOOKAHEAD);
    for (n, &index) in indexes.iter().enumerate() {
        assert!(
            h.wallet()
                .script_index(&h.script(Keychain::External, index))
                .is_none()
                || n == 0
                || index < LOOKAHEAD
        );
        h.pay(Keychain::External, index, 10_000 + n as u64);
    }
    h.apply(&Op::Mine(1));
    let tip = h.chain.height();
    let found: BTreeSet<u32> = h
        .unspent()
        .iter()
        .filter(|c| c.height == tip)
        .map(|c| c.index)
        .collect();
    assert_eq!(found, indexes.iter().copied().collect());
    h.check().unwrap();
}
