//! The durable actions' crash test: the executor runs in a child process
//! (`src/bin/actions_child.rs`: chain, loop and executor together, every
//! step run twice) killed with SIGKILL at random moments, some aimed just
//! after a transaction reaches the source (between persisting it and the
//! broadcast's answer) and just after the source answered (between the
//! broadcast and its checkpoint), then started again, at least 50 times
//! for each of sends, fee-bumped sends and consolidations. At the end:
//! every planned action is Done (a consolidation may fail for want of
//! coins); each payee received its payment exactly once; each sweep
//! confirmed once; every wallet equals the SimChain oracle; no coin stays
//! locked.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitcoin::Amount;
use lockstep::{Keychain, Lockstep, NewWallet, WalletAction as _};
use lockstep_manager::{Manager, ManagerConfig};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{Store, StoreError, StoreOptions};
use lockstep_testkit::oracle::check_wallet;
use lockstep_tests::actions_crash::{
    COIN_SATS, COINS, Kind, PASSPHRASE, WALLETS, amount, descriptors, name, payee, plan,
};
use lockstep_tests::rig::runtime;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Kills per scenario.
const KILLS: u32 = 50;
/// A run not aimed at a phase is killed at a random time up to this long
/// after it starts driving its actions.
const MAX_RUN: Duration = Duration::from_millis(250);
/// How long a child may take to start, and the last run to finish.
const PATIENCE: Duration = Duration::from_secs(120);

/// Sets up the wallets (funded, synced) and saves the chain.
fn set_up(dir: &Path, chain_file: &Path, seed: u64) {
    let chain = SimChain::generate(SimParams::signed(seed), 105).unwrap();
    runtime().block_on(async {
        let store = Store::open(&dir.join("w.db"), StoreOptions::default()).unwrap();
        let manager = Manager::new(store, Arc::new(chain.clone()), ManagerConfig::default());
        let lockstep = Lockstep::from_manager(manager);
        lockstep.sync().await.unwrap();
        for index in 0..WALLETS {
            let id = lockstep
                .register(
                    NewWallet::new(name(index), descriptors(index))
                        .born_at(chain.tip().height + 1)
                        .passphrase(PASSPHRASE),
                )
                .await
                .unwrap();
            let wallet = lockstep.wallet(id).await.unwrap();
            for _ in 0..COINS {
                let address = wallet.reveal_address(Keychain::External).await.unwrap();
                chain
                    .pay(address.address.script_pubkey(), Amount::from_sat(COIN_SATS))
                    .unwrap();
            }
        }
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
    });
    chain.save(chain_file).unwrap();
}

/// A running child; its stdout read on a thread of its own.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    phase: String,
}

impl Child {
    fn spawn(dir: &Path, chain_file: &Path, kind: Kind) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_actions-child"));
        command
            .arg(dir.join("w.db"))
            .arg(chain_file)
            .arg(kind.name());
        let (process, lines) = lockstep_tests::child::spawn(command, PATIENCE);
        Child {
            process,
            lines,
            phase: "start".into(),
        }
    }

    /// Follows the child until `deadline`, or until it enters `aim` (then
    /// at once). Returns `true` if it finished everything first.
    fn run_until(&mut self, deadline: Instant, aim: Option<&str>) -> bool {
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "all-done" => return true,
                Ok(line) => {
                    if let Some(phase) = line.strip_prefix("phase ") {
                        self.phase = phase.split(' ').next().unwrap_or(phase).to_owned();
                        if aim == Some(self.phase.as_str()) {
                            return false;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.process.wait().unwrap();
                    panic!("the child ended on its own before the kill: {status}");
                }
            }
        }
        false
    }

    /// Kills it; returns the phase the kill landed in.
    fn kill(mut self) -> String {
        self.process.kill().unwrap();
        let status = self.process.wait().unwrap();
        assert!(status.code().is_none(), "the child failed: {status}");
        for line in self.lines.iter() {
            if let Some(phase) = line.strip_prefix("phase ") {
                self.phase = phase.split(' ').next().unwrap_or(phase).to_owned();
            }
        }
        self.phase
    }

    /// Waits for it to finish everything and exit.
    fn finish(mut self) {
        let done = self.run_until(Instant::now() + PATIENCE, None);
        let status = self.process.wait().unwrap();
        assert!(done && status.success(), "the last run finished: {status}");
    }
}

fn scenario(kind: Kind, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let chain_file = dir.path().join("chain.sim");
    set_up(dir.path(), &chain_file, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut landed: BTreeMap<String, u32> = BTreeMap::new();
    let mut kills = 0;
    let mut finished_early = false;
    while kills < KILLS {
        let mut child = Child::spawn(dir.path(), &chain_file, kind);
        let aim = match rng.gen_range(0..10) {
            0..=3 => Some("broadcasting"),
            4..=6 => Some("broadcast-returned"),
            _ => None,
        };
        // The clock starts once the actions are being driven (opening,
        // unlocking and resuming come first).
        if child.run_until(Instant::now() + PATIENCE, Some("driving")) {
            finished_early = true;
            let _ = child.process.wait();
            break;
        }
        // An aimed run waits longer for its phase (it is killed there).
        let longest = if aim.is_some() { 4 * MAX_RUN } else { MAX_RUN };
        let deadline = Instant::now() + longest.mul_f64(rng.gen_range(0.0..1.0));
        if child.run_until(deadline, aim) {
            finished_early = true;
            let _ = child.process.wait();
            break;
        }
        *landed.entry(child.kill()).or_default() += 1;
        kills += 1;
    }
    if !finished_early {
        Child::spawn(dir.path(), &chain_file, kind).finish();
    }
    assert!(
        kills >= KILLS,
        "{kind:?}: everything finished after {kills} kills ({landed:?}): the plan is too small"
    );
    for phase in ["broadcasting", "broadcast-returned"] {
        assert!(
            landed.get(phase).copied().unwrap_or(0) >= 3,
            "{kind:?}: kills landed {landed:?}"
        );
    }

    // The end state, against the chain as the child last saved it.
    let chain = SimChain::load(&chain_file).unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    let ids: Vec<_> = store
        .read_blocking(|tx| {
            (0..WALLETS)
                .map(|i| tx.wallet_by_name(&name(i)).map(|w| w.unwrap().wallet_id))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .unwrap();
    let actions = plan(kind, &ids);
    let outcomes = {
        let planned: Vec<String> = actions.iter().map(|a| a.id()).collect();
        store
            .read_blocking(move |tx| {
                planned
                    .iter()
                    .map(|id| tx.action_outcome(id).map(|o| o.expect("an outcome")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap()
    };
    for outcome in &outcomes {
        let allowed = outcome.outcome == "done"
            || (kind == Kind::Consolidate
                && outcome.outcome == "failed"
                && outcome.detail.contains("insufficient"));
        assert!(allowed, "{kind:?}: {outcome:?}");
    }
    match kind {
        Kind::Send | Kind::Bump => {
            for i in 0..actions.len() {
                let truth = chain.truth([&payee(i)]);
                let paid: Vec<Amount> = truth
                    .unspent
                    .iter()
                    .map(|c| c.txout.value)
                    .chain(truth.spent.iter().map(|c| c.coin.txout.value))
                    .collect();
                assert_eq!(
                    paid,
                    vec![amount(i)],
                    "{kind:?}: payee {i} paid exactly once"
                );
            }
            if kind == Kind::Bump {
                let bumped = outcomes
                    .iter()
                    .filter(|o| !o.detail.ends_with("replaced: []"))
                    .count();
                assert_eq!(bumped, outcomes.len(), "every first version was replaced");
            }
        }
        Kind::Consolidate => {
            // Each sweep that is done confirmed once: one transaction of
            // the wallet's history per done sweep, all spending and
            // receiving the wallet's own coins.
            let done = outcomes.iter().filter(|o| o.outcome == "done").count();
            assert!(done >= 2 * ids.len(), "{done} sweeps done");
        }
    }
    let (tip, locks) = store
        .read_blocking(|tx| Ok::<_, StoreError>((tx.tip()?.unwrap().0, tx.lock_holders()?)))
        .unwrap();
    assert!(locks.is_empty(), "{kind:?}: coins still locked: {locks:?}");
    let mut sweeps = 0;
    for id in ids {
        let chain = chain.clone();
        let check = store
            .read_blocking(move |tx| check_wallet(tx, &chain, id, tip))
            .unwrap();
        assert!(check.ok(), "{kind:?}: {:?}", check.mismatch);
        let history = store.read_blocking(move |tx| tx.wallet_txs(id)).unwrap();
        sweeps += history
            .iter()
            .filter(|h| h.height.is_some() && h.sent > 0 && h.received > 0 && h.received < h.sent)
            .count();
    }
    if kind == Kind::Consolidate {
        let done = outcomes.iter().filter(|o| o.outcome == "done").count();
        assert_eq!(sweeps, done, "each sweep confirmed exactly once");
    }
    eprintln!("{kind:?}: {kills} kills, landed {landed:?}");
}

#[test]
fn sends_killed_at_random_moments_pay_each_payee_once() {
    scenario(Kind::Send, 171);
}

#[test]
fn fee_bumped_sends_killed_at_random_moments_pay_each_payee_once() {
    scenario(Kind::Bump, 172);
}

#[test]
fn consolidations_killed_at_random_moments_confirm_once_each() {
    scenario(Kind::Consolidate, 173);
}
