//! A wallet driven through random SimChain histories (payments, bursts
//! across the lookahead window inside one block, spends, a coin created
//! and spent in one block, reorgs of both kinds), compared after every step
//! with the chain's oracle: an exact full scan for the wallet's scripts.

use std::collections::{BTreeSet, HashSet};

use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, BlockHash, Network, NetworkKind, OutPoint, ScriptBuf, Txid};
use lockstep_chain::{ReorgTxs, SimChain, SimParams};
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
    /// Every script the test paid: the oracle looks at these too, so a
    /// payment the wallet missed would show.
    paid: HashSet<ScriptBuf>,
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
        };
        let wallet = store
            .write_blocking(move |tx| Wallet::create(tx, &params, descriptors))
            .unwrap();
        let mut h = Harness {
            _dir: dir,
            chain,
            store,
            wallet: Some(wallet),
            hashes: Vec::new(),
            paid: HashSet::new(),
        };
        h.sync();
        h
    }

    fn wallet(&self) -> &Wallet {
        self.wallet.as_ref().unwrap()
    }

    /// A script the wallet must find: within its window.
    fn reachable(&self, keychain: Keychain, offset: u32) -> ScriptBuf {
        let w = self.wallet();
        let base = w
            .next_index(keychain)
            .max(w.last_used(keychain).map_or(0, |u| u + 1));
        w.descriptors().script_at(keychain, base + offset).unwrap()
    }

    fn pay(&mut self, script: ScriptBuf, sats: u64) -> OutPoint {
        self.paid.insert(script.clone());
        self.chain.pay(script, Amount::from_sat(sats)).unwrap()
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
                    wallet.ingest(tx, height, &txs)?;
                    Ok::<_, WalletError>(wallet)
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
                let script = self.reachable(keychain, offset);
                self.pay(script, sats);
            }
            Op::Burst => {
                // Three windows deep inside one block: each payment is only
                // reachable once the previous one has moved the window.
                let base = self.reachable(Keychain::External, 0);
                let first = self.wallet().script_index(&base).unwrap().1;
                for k in 0..3 {
                    let script = self
                        .wallet()
                        .descriptors()
                        .script_at(Keychain::External, first + k * (LOOKAHEAD - 1))
                        .unwrap();
                    self.pay(script, 20_000 + u64::from(k));
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
                    self.reachable(Keychain::Internal, 0)
                } else {
                    ScriptBuf::new_op_return([7u8; 4])
                };
                if to_self {
                    self.paid.insert(to.clone());
                }
                if coin.txout.value > Amount::from_sat(1_000) {
                    self.chain.spend_to(coin.outpoint, to, None).unwrap();
                }
            }
            Op::PayAndSpend => {
                let script = self.reachable(Keychain::External, 0);
                let coin = self.pay(script, 50_000);
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

    /// The wallet equals the oracle: coins, spends, balance, history.
    fn check(&self) -> Result<(), TestCaseError> {
        let mut scripts: HashSet<ScriptBuf> = self.paid.clone();
        scripts.extend(self.wallet().watch_scripts().map(|(_, _, s)| s.to_owned()));
        let truth = self.chain.truth(scripts.iter());
        let w = self.wallet().clone();
        let (all, balance, history) = self
            .store
            .read_blocking(move |tx| {
                Ok::<_, WalletError>((w.coins(tx, false)?, w.balance(tx)?, w.history(tx)?))
            })
            .unwrap();
        let unspent: BTreeSet<(OutPoint, u64, u32)> = all
            .iter()
            .filter(|c| c.spent.is_none())
            .map(|c| (c.outpoint, c.txout.value.to_sat(), c.height))
            .collect();
        let expected: BTreeSet<(OutPoint, u64, u32)> = truth
            .unspent
            .iter()
            .map(|c| (c.outpoint, c.txout.value.to_sat(), c.height))
            .collect();
        prop_assert_eq!(&unspent, &expected);
        prop_assert_eq!(balance, truth.balance());
        let spent: BTreeSet<(OutPoint, Txid, u32)> = all
            .iter()
            .filter_map(|c| c.spent.map(|(t, h)| (c.outpoint, t, h)))
            .collect();
        let expected: BTreeSet<(OutPoint, Txid, u32)> = truth
            .spent
            .iter()
            .map(|s| (s.coin.outpoint, s.spent_by, s.spent_height))
            .collect();
        prop_assert_eq!(spent, expected);
        let mine: BTreeSet<(Option<u32>, Txid, u64, u64)> = history
            .iter()
            .map(|t| (t.height, t.txid, t.received.to_sat(), t.sent.to_sat()))
            .collect();
        let expected: BTreeSet<(Option<u32>, Txid, u64, u64)> = truth
            .history
            .iter()
            .map(|t| (Some(t.height), t.txid, t.received.to_sat(), t.sent.to_sat()))
            .collect();
        prop_assert_eq!(mine, expected);
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
