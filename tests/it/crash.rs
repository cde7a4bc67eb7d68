//! The crash test: the chain loop runs in a child process
//! (`src/bin/crash_child.rs`) that is killed with SIGKILL at random moments
//! and started again, while the chain grows, pays and spends, and reorgs.
//! After every kill the database must show every active wallet exactly as
//! the oracle says at the loop's tip (a wallet's synced-to *is* the loop's
//! tip), and every importing wallet exactly as the oracle says at its import
//! height; at the end, every wallet equals the oracle at the chain's tip.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bitcoin::hashes::Hash as _;
use bitcoin::{Amount, BlockHash, OutPoint, TxOut};
use lockstep::chain::{ReorgTxs, SimChain, SimParams};
use lockstep::oracle::{check_wallet, test_descriptors};
use lockstep::store::{Store, StoreOptions};
use lockstep::wallet::Keychain;
use lockstep_tests::crash::{LATE_WALLET, WALLET_SEED, wallet_spec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KILLS: u32 = 50;

/// Pays and spends for the test wallets, as blocks are mined.
struct Activity {
    rng: ChaCha8Rng,
    /// Per wallet and keychain, the next index to pay.
    next: Vec<[u32; 2]>,
    paid: Vec<(u32, OutPoint)>,
}

impl Activity {
    fn script(&self, wallet: u32, keychain: Keychain) -> bitcoin::ScriptBuf {
        let index = self.next[wallet as usize][keychain as usize];
        test_descriptors(WALLET_SEED, wallet)
            .script_at(keychain, index)
            .unwrap()
    }

    fn advance(&mut self, wallet: u32, keychain: Keychain) {
        self.next[wallet as usize][keychain as usize] += 1;
    }

    /// Mines `blocks` blocks, each with some payments and spends.
    fn mine(&mut self, chain: &SimChain, blocks: u32) {
        for _ in 0..blocks {
            for _ in 0..self.rng.gen_range(0..4) {
                let wallet = self.rng.gen_range(0..=LATE_WALLET);
                let keychain = if self.rng.gen_bool(0.8) {
                    Keychain::External
                } else {
                    Keychain::Internal
                };
                let script = self.script(wallet, keychain);
                let op = chain
                    .pay(
                        script,
                        Amount::from_sat(self.rng.gen_range(20_000..2_000_000)),
                    )
                    .unwrap();
                self.advance(wallet, keychain);
                self.paid.push((wallet, op));
            }
            if !self.paid.is_empty() && self.rng.gen_bool(0.5) {
                let (wallet, op) = self
                    .paid
                    .swap_remove(self.rng.gen_range(0..self.paid.len()));
                if let Some(out) = chain.unspent(&op).filter(|o| o.value.to_sat() >= 20_000) {
                    let to = self.rng.gen_range(0..=LATE_WALLET);
                    let half = out.value.to_sat() / 2;
                    let outputs = vec![
                        TxOut {
                            value: Amount::from_sat(half),
                            script_pubkey: self.script(to, Keychain::External),
                        },
                        TxOut {
                            value: Amount::from_sat(out.value.to_sat() - half - 1_000),
                            script_pubkey: self.script(wallet, Keychain::Internal),
                        },
                    ];
                    self.advance(to, Keychain::External);
                    self.advance(wallet, Keychain::Internal);
                    let txid = chain.spend(op, outputs, None).unwrap();
                    self.paid.push((to, OutPoint { txid, vout: 0 }));
                    self.paid.push((wallet, OutPoint { txid, vout: 1 }));
                }
            }
            chain.mine(1).unwrap();
        }
    }
}

/// Checks what a killed child left: every wallet equals the oracle at its
/// synced-to. `chains` are the chain versions the child may have followed
/// (the newest of each reorg epoch). Returns the loop's tip height.
fn check_database(db: &Path, chains: &[SimChain]) -> Option<u32> {
    let store = Store::open(db, StoreOptions::default()).expect("the database opens after a kill");
    store
        .read_blocking(|tx| {
            let Some((tip, tip_hash)) = tx.tip()? else {
                return Ok(None);
            };
            let on = |height: u32, hash: [u8; 32]| {
                let hash = BlockHash::from_byte_array(hash);
                chains
                    .iter()
                    .rev()
                    .find(|c| c.hash_at(height) == Some(hash))
                    .unwrap_or_else(|| panic!("block {hash} at {height} is on no chain version"))
            };
            let chain = on(tip, tip_hash);
            for row in tx.wallets()? {
                let (height, chain) = match row.importing_height {
                    None => (tip, chain),
                    Some(h) => {
                        assert!(
                            h <= tip,
                            "{} imported to {h}, above the loop's tip {tip}",
                            row.name
                        );
                        (h, row.importing_hash.map_or(chain, |hash| on(h, hash)))
                    }
                };
                let check = check_wallet(tx, chain, row.wallet_id, height)?;
                assert!(check.ok(), "after a kill at loop tip {tip}: {check:#?}");
            }
            Ok::<_, lockstep::wallet::WalletError>(Some(tip))
        })
        .unwrap()
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let child_exe = env!("CARGO_BIN_EXE_crash-child");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lockstep.db");
    let chain_file = dir.path().join("chain.sim");
    let chain = SimChain::generate(SimParams::unsigned(9).with_load(5..=15, 1..=2), 101).unwrap();
    let mut activity = Activity {
        rng: ChaCha8Rng::seed_from_u64(9),
        next: vec![[0, 0]; LATE_WALLET as usize + 1],
        paid: Vec::new(),
    };
    activity.mine(&chain, 200);
    // The newest chain of each reorg epoch, to check a killed child's
    // database against whichever one it followed.
    let mut epochs: Vec<SimChain> = Vec::new();
    let (mut kills, mut finished, mut rounds) = (0u32, 0u32, 0u32);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    while kills < KILLS {
        rounds += 1;
        assert!(rounds < 400, "{kills} kills in {rounds} rounds");
        if rounds % 15 == 0 {
            // A reorg while the child is down: keep the old branch to
            // check against, then follow the new one.
            let old = dir.path().join(format!("epoch-{rounds}.sim"));
            chain.save(&old).unwrap();
            epochs.push(SimChain::load(&old).unwrap());
            let txs = if rounds % 30 == 0 {
                ReorgTxs::Drop
            } else {
                ReorgTxs::Reappear
            };
            chain.reorg(rng.gen_range(2..6), txs).unwrap();
        }
        activity.mine(&chain, rng.gen_range(3..12));
        chain.save(&chain_file).unwrap();
        let mut child = Command::new(child_exe)
            .arg(&db)
            .arg(&chain_file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "started");
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..60_000)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        } else {
            finished += 1;
        }
        let status = child.wait().unwrap();
        assert!(
            status.success() || status.code().is_none(),
            "the child failed: {status}"
        );
        let mut versions = epochs.clone();
        versions.push(chain.clone());
        check_database(&db, &versions);
    }
    // One last run to the end, undisturbed.
    let status = Command::new(child_exe)
        .arg(&db)
        .arg(&chain_file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the last run failed: {status}");
    let tip = check_database(&db, std::slice::from_ref(&chain));
    assert_eq!(tip, Some(chain.height()));
    let store = Store::open(&db, StoreOptions::default()).unwrap();
    let wallets = store.read_blocking(|tx| tx.wallets()).unwrap();
    assert_eq!(wallets.len(), LATE_WALLET as usize + 1);
    assert!(wallets.iter().all(|w| w.importing_height.is_none()));
    assert_eq!(
        wallets[LATE_WALLET as usize].name,
        wallet_spec(LATE_WALLET).0
    );
    eprintln!(
        "{kills} kills, {finished} runs finished before the kill, {rounds} rounds, tip {}",
        chain.height()
    );
}
