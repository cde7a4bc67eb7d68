//! The crash test: the chain loop runs in a child process
//! (`src/bin/crash_child.rs`) that is killed with SIGKILL at random moments
//! and started again, while the parent grows the chain (payments, spends)
//! and reorganises it UNDER the running child: the child follows a chain
//! file the parent replaces after every change. After every kill the
//! database must show every active wallet exactly as the oracle says at the
//! loop's tip (a wallet's synced-to *is* the loop's tip), and every
//! importing wallet exactly as the oracle says at its import height, on
//! whichever version of the chain the child had followed; at the end, every
//! wallet equals the oracle at the chain's tip.
//!
//! The child prints the phase it enters (see `Phase` in the child); the last
//! phase before the kill is where the kill landed, and the test counts the
//! kills per phase, so it shows that the kills really cut commits, imports
//! and disconnects in the middle, not only the quiet time between them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitcoin::hashes::Hash as _;
use bitcoin::{Amount, BlockHash, OutPoint, TxOut};
use lockstep_sim::{ReorgTxs, SimChain, SimParams};
use lockstep_store::{Store, StoreOptions, WalletRow};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_tests::crash::{LATE_WALLET, WALLET_SEED, done_text, wallet_spec};
use lockstep_wallet::Keychain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Kills in all, each followed by a check of everything committed.
const KILLS: u32 = 50;
/// A run of the child is killed after a random time up to this long
/// (from when it says it started).
const MAX_RUN: Duration = Duration::from_millis(250);
/// Between two changes of the chain, the parent waits a random time up to
/// this long (writing a version takes about as long again): the child
/// meets a few new blocks per run, and a reorg every other run or so.
const MAX_GAP: Duration = Duration::from_millis(20);
/// Kills aimed at the late wallet's import.
const IMPORT_KILLS: u32 = 5;
/// Of the changes, the share that are reorgs.
const REORGS: f64 = 0.15;
/// How long a child may take to say it started, and the last run to sync.
const PATIENCE: Duration = Duration::from_secs(120);

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

/// What a child left in the database, checked.
struct Committed {
    /// The loop's tip height.
    tip: Option<u32>,
    wallets: Vec<WalletRow>,
}

impl Committed {
    /// Whether every wallet, the late one too, is registered and active.
    fn all_joined(&self) -> bool {
        self.wallets.len() == LATE_WALLET as usize + 1
            && self.wallets.iter().all(|w| w.importing_height.is_none())
    }
}

/// Checks what a killed child left: the database opens, and every wallet
/// equals the oracle at its synced-to (an importing one at its import
/// height, never above the loop's tip). `chains` are the chain versions the
/// child may have followed (the newest of each reorg epoch): the block
/// hash at a height names the version.
fn check_database(db: &Path, chains: &[SimChain]) -> Committed {
    let store = Store::open(db, StoreOptions::default()).expect("the database opens after a kill");
    store
        .read_blocking(|tx| {
            let wallets = tx.wallets()?;
            let Some((tip, tip_hash)) = tx.tip()? else {
                return Ok(Committed { tip: None, wallets });
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
            for row in &wallets {
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
            Ok::<_, lockstep_wallet::WalletError>(Committed {
                tip: Some(tip),
                wallets,
            })
        })
        .unwrap()
}

/// The chain the parent changes, the file the child follows, and the
/// versions a killed child may have followed.
struct World {
    chain: SimChain,
    activity: Activity,
    /// Picks the changes: blocks or reorgs, and the time between them.
    rng: ChaCha8Rng,
    file: PathBuf,
    /// Where the next version is written before it is renamed over `file`.
    tmp: PathBuf,
    /// The last version of each reorg epoch, as independent copies
    /// (`SimChain` clones share state): a growing chain keeps its blocks,
    /// so every version the child saw is a prefix of one of these or of
    /// `chain`.
    epochs: Vec<SimChain>,
    changes: u32,
    reorgs: u32,
}

impl World {
    /// Replaces the followed file by the current chain, atomically: the
    /// child never reads half a version.
    fn publish(&self) {
        self.chain.save(&self.tmp).unwrap();
        std::fs::rename(&self.tmp, &self.file).unwrap();
    }

    /// One more block, with payments and spends.
    fn grow(&mut self) {
        self.activity.mine(&self.chain, 1);
        self.changes += 1;
        self.publish();
    }

    /// Replaces the last 1 to 5 blocks with one more new ones, their
    /// transactions dropped or back in the new branch.
    fn reorg(&mut self) {
        // The file holds the current chain (every change is published):
        // loading it keeps the old branch as an independent copy.
        self.epochs.push(SimChain::load(&self.file).unwrap());
        let txs = if self.rng.gen_bool(0.5) {
            ReorgTxs::Drop
        } else {
            ReorgTxs::Reappear
        };
        self.chain.reorg(self.rng.gen_range(1..6), txs).unwrap();
        self.changes += 1;
        self.reorgs += 1;
        self.publish();
    }

    /// Changes the chain every few milliseconds until `stop`.
    fn keep_changing(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if self.rng.gen_bool(REORGS) {
                self.reorg();
            } else {
                self.grow();
            }
            std::thread::sleep(MAX_GAP.mul_f64(self.rng.gen_range(0.0..1.0)));
        }
    }

    /// Every version the child may have followed.
    fn versions(&self) -> Vec<SimChain> {
        let mut versions = self.epochs.clone();
        versions.push(self.chain.clone());
        versions
    }
}

/// A moment to kill the child at, beyond a random time: entering a phase
/// that random times rarely hit (a disconnect is one short transaction; the
/// late wallet's import happens once), then a random time up to `within`.
/// The histogram counts where the kill really landed.
#[derive(Debug, Clone, Copy)]
struct Aim {
    phase: &'static str,
    within: Duration,
}

/// A running child. Its stdout is read on a thread of its own, so the pipe
/// never fills, a phase line reaches the parent at once, and every line the
/// child wrote before it died is read.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    /// The last phase the child said it entered.
    phase: String,
}

impl Child {
    /// Starts a child and waits until it says it started.
    fn spawn(exe: &str, db: &Path, chain_file: &Path, done: &Path) -> Child {
        let mut command = Command::new(exe);
        command.arg(db).arg(chain_file).arg(done);
        let (process, lines) = lockstep_tests::child::spawn(command, PATIENCE);
        Child {
            process,
            lines,
            phase: "start".to_owned(),
        }
    }

    /// Follows what the child says until `deadline`, or until it enters
    /// the phase aimed at and the aim's random time passes.
    fn run_until(&mut self, mut deadline: Instant, aim: Option<Aim>, rng: &mut ChaCha8Rng) {
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let Some(phase) = line.strip_prefix("phase ") else {
                        continue;
                    };
                    self.phase = phase.to_owned();
                    if let Some(aim) = aim.filter(|a| a.phase == phase) {
                        let at = Instant::now() + aim.within.mul_f64(rng.gen_range(0.0..1.0));
                        deadline = deadline.min(at);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.process.wait().unwrap();
                    panic!("the child ended before the kill: {status}");
                }
            }
        }
    }

    /// Kills the child; returns the phase the kill landed in: the last one
    /// it said it entered (the pipe holds every line it wrote).
    fn kill(mut self) -> String {
        self.process.kill().unwrap();
        let status = self.process.wait().unwrap();
        assert!(status.code().is_none(), "the child failed: {status}");
        for line in self.lines.iter() {
            if let Some(phase) = line.strip_prefix("phase ") {
                self.phase = phase.to_owned();
            }
        }
        self.phase
    }

    /// Waits for the child to exit by itself; returns what it said it
    /// synced to.
    fn finish(mut self) -> String {
        let mut synced = None;
        let until = Instant::now() + PATIENCE;
        loop {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                let _ = self.process.kill();
                panic!("the last run did not reach the tip in {PATIENCE:?}");
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => synced = line.strip_prefix("synced ").map(str::to_owned).or(synced),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = self.process.wait().unwrap();
        assert!(status.success(), "the last run failed: {status}");
        synced.expect("the last run says where it synced to")
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let started = Instant::now();
    let child_exe = env!("CARGO_BIN_EXE_crash-child");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lockstep.db");
    let done = dir.path().join("done");
    let chain = SimChain::generate(SimParams::unsigned(9).with_load(5..=15, 1..=2), 101).unwrap();
    let mut world = World {
        chain,
        activity: Activity {
            rng: ChaCha8Rng::seed_from_u64(9),
            next: vec![[0, 0]; LATE_WALLET as usize + 1],
            paid: Vec::new(),
        },
        rng: ChaCha8Rng::seed_from_u64(11),
        file: dir.path().join("chain.sim"),
        tmp: dir.path().join("chain.sim.tmp"),
        epochs: Vec::new(),
        changes: 0,
        reorgs: 0,
    };
    world.activity.mine(&world.chain, 200);
    world.publish();
    let mut landed: BTreeMap<String, u32> = BTreeMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let mut all_joined = false;
    for _ in 0..KILLS {
        // Kills at random times land mostly between batches and in
        // commits. Until the late wallet has joined, runs aim at its import
        // (a kill there resumes it from what it committed), a few times:
        // each resumed run gets only a batch or two done before the kill.
        let import_kills = landed.get("import").copied().unwrap_or(0);
        let aim = if !all_joined && import_kills < IMPORT_KILLS {
            Some(Aim {
                phase: "import",
                within: Duration::from_millis(30),
            })
        } else if rng.gen_bool(0.2) {
            Some(Aim {
                phase: "disconnect",
                within: Duration::ZERO,
            })
        } else {
            None
        };
        let mut child = Child::spawn(child_exe, &db, &world.file, &done);
        let deadline = Instant::now()
            + if aim.is_some() {
                MAX_RUN
            } else {
                MAX_RUN.mul_f64(rng.gen_range(0.0..1.0))
            };
        let stop = AtomicBool::new(false);
        let phase = std::thread::scope(|scope| {
            // The chain changes while the child runs.
            scope.spawn(|| world.keep_changing(&stop));
            child.run_until(deadline, aim, &mut rng);
            let phase = child.kill();
            stop.store(true, Ordering::Relaxed);
            phase
        });
        *landed.entry(phase).or_default() += 1;
        all_joined = check_database(&db, &world.versions()).all_joined();
    }
    // One last run to the end, undisturbed.
    let tmp = dir.path().join("done.tmp");
    std::fs::write(&tmp, done_text(world.chain.tip())).unwrap();
    std::fs::rename(&tmp, &done).unwrap();
    let synced = Child::spawn(child_exe, &db, &world.file, &done).finish();
    let tip = world.chain.tip();
    assert_eq!(synced, format!("{} {}", tip.height, tip.hash));
    let end = check_database(&db, std::slice::from_ref(&world.chain));
    assert_eq!(end.tip, Some(tip.height));
    assert!(end.all_joined(), "a wallet is missing or importing");
    assert_eq!(
        end.wallets[LATE_WALLET as usize].name,
        wallet_spec(LATE_WALLET).0
    );
    eprintln!(
        "{KILLS} kills while the chain changed {} times ({} reorgs), tip {}, in {:?}",
        world.changes,
        world.reorgs,
        tip.height,
        started.elapsed()
    );
    eprintln!("where the kills landed: {landed:?}");
    let at = |phase: &str| landed.get(phase).copied().unwrap_or(0);
    assert!(
        at("commit") > 0 && at("between") > 0 && at("import") + at("disconnect") > 0,
        "the kills must cut commits, and imports or disconnects, not only the time between: {landed:?}"
    );
}
