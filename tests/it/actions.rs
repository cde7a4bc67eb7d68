//! Durable actions: sends and consolidations that persist every
//! step (each step run twice, to test idempotence), survive a restart of
//! the whole process state between any two steps, pay each payee once and
//! leave no coin locked.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Amount, ScriptBuf, TxOut};
use bitcoin::{Block, BlockHash, Transaction, Txid};
use lockstep::{
    DriveMode, DriveOutcome, ExecutorConfig, FeeBump, Keychain, Lockstep, NewWallet, Spend,
    WalletId,
};
use lockstep_chain::{BlockId, BroadcastError, ChainSource, RejectReason, SourceError};
use lockstep_manager::{Manager, ManagerConfig};
use lockstep_sim::{ReorgTxs, SimChain, SimParams};
use lockstep_store::{Store, StoreError, StoreOptions};
use lockstep_testkit::oracle::check_wallet;
use lockstep_tests::rig::runtime;
use lockstep_tests::wait::eventually;
use lockstep_tests::{key, p2wpkh, signing_descriptors};

/// A facade over the database in `dir`, every action step run twice.
fn open(dir: &Path, chain: &SimChain) -> (Lockstep, Manager) {
    open_on(dir, Arc::new(chain.clone()))
}

/// [`open`] over any source.
fn open_on(dir: &Path, source: Arc<dyn ChainSource>) -> (Lockstep, Manager) {
    let config = ExecutorConfig {
        run_each_step_twice: true,
        ..ExecutorConfig::default()
    };
    open_with(dir, source, config)
}

/// [`open_on`] with the executor's configuration given.
fn open_with(
    dir: &Path,
    source: Arc<dyn ChainSource>,
    config: ExecutorConfig,
) -> (Lockstep, Manager) {
    let store = Store::open(&dir.join("w.db"), StoreOptions::default()).unwrap();
    let manager = Manager::new(store, source, ManagerConfig::default());
    (
        Lockstep::from_manager_with(manager.clone(), config),
        manager,
    )
}

/// A signing wallet (passphrase "pw") born after `height`, paid `coins`
/// coins of `sats` in one block, synced and unlocked.
async fn funded(
    lockstep: &Lockstep,
    chain: &SimChain,
    seed: u8,
    coins: usize,
    sats: u64,
) -> WalletId {
    let descriptors = signing_descriptors(seed);
    let id = lockstep
        .register(
            NewWallet::new(format!("w{seed}"), descriptors)
                .born_at(chain.tip().height + 1)
                .passphrase("pw"),
        )
        .await
        .unwrap();
    let wallet = lockstep.wallet(id).await.unwrap();
    for _ in 0..coins {
        let address = wallet.reveal_address(Keychain::External).await.unwrap();
        chain
            .pay(address.address.script_pubkey(), Amount::from_sat(sats))
            .unwrap();
    }
    chain.mine(1).unwrap();
    lockstep.sync().await.unwrap();
    wallet.unlock("pw").await.unwrap();
    id
}

/// A send of `sats` to `script`.
fn pay(
    id: impl Into<String>,
    wallet: WalletId,
    script: &ScriptBuf,
    sats: u64,
    rate: f32,
    confirmations: u32,
) -> Spend {
    let output = TxOut {
        value: Amount::from_sat(sats),
        script_pubkey: script.clone(),
    };
    Spend::send(id, wallet, vec![output], rate, confirmations)
}

/// What the chain paid `script`, output by output.
fn paid_to(chain: &SimChain, script: &ScriptBuf) -> Vec<Amount> {
    let truth = chain.truth([script]);
    truth
        .unspent
        .iter()
        .map(|c| c.txout.value)
        .chain(truth.spent.iter().map(|c| c.coin.txout.value))
        .collect()
}

/// The wallet equals the oracle and no coin is locked by anyone.
async fn settled(manager: &Manager, chain: &SimChain, id: WalletId) {
    let chain = chain.clone();
    let tip = chain.tip().height;
    let (check, holders) = manager
        .store()
        .read(move |tx| {
            let check = check_wallet(tx, &chain, id, tip).map_err(|e| e.to_string());
            Ok::<_, StoreError>((check, tx.lock_holders()?))
        })
        .await
        .unwrap();
    let check = check.unwrap();
    assert!(check.ok(), "{:?}", check.mismatch);
    assert!(holders.is_empty(), "coins still locked: {holders:?}");
}

#[test]
fn a_send_survives_a_restart_after_each_step_and_pays_once() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(161), 105).unwrap();
        let payee = p2wpkh(&key(61));
        let id = {
            let (lockstep, _) = open(dir.path(), &chain);
            lockstep.sync().await.unwrap();
            funded(&lockstep, &chain, 61, 3, 50_000).await
        };
        let send = pay("invoice-61", id, &payee, 70_000, 2.0, 2);

        // Each round: a fresh process state over the same database (the
        // previous one dropped as a crash would), one drive until it parks.
        let mut parked = 0;
        let outcome = loop {
            let (lockstep, _) = open(dir.path(), &chain);
            lockstep.sync().await.unwrap();
            lockstep
                .wallet(id)
                .await
                .unwrap()
                .unlock("pw")
                .await
                .unwrap();
            let outcome = lockstep
                .executor()
                .drive(send.clone(), DriveMode::UntilParkOrDone)
                .await
                .unwrap();
            if outcome != DriveOutcome::Parked {
                break outcome;
            }
            parked += 1;
            assert!(parked < 10, "the send never finished");
            chain.mine(1).unwrap();
        };
        assert!(
            matches!(&outcome, DriveOutcome::Done(detail) if detail.contains("confirmed")),
            "{outcome:?}"
        );
        assert!(
            parked >= 2,
            "it waited for 2 confirmations ({parked} parks)"
        );
        assert_eq!(paid_to(&chain, &payee), vec![Amount::from_sat(70_000)]);

        // Driven again after the end: not run again.
        let (lockstep, manager) = open(dir.path(), &chain);
        lockstep.sync().await.unwrap();
        let again = lockstep
            .executor()
            .drive(send.clone(), DriveMode::UntilDone)
            .await
            .unwrap();
        assert!(
            matches!(&again, DriveOutcome::Finished(row) if row.outcome == "done"),
            "{again:?}"
        );
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        assert_eq!(paid_to(&chain, &payee), vec![Amount::from_sat(70_000)]);
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn resume_all_finishes_what_a_previous_process_left_and_a_second_drive_takes_no_step() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(162), 105).unwrap();
        let payees: Vec<ScriptBuf> = (0..3).map(|i| p2wpkh(&key(70 + i))).collect();
        let id = {
            let (lockstep, _) = open(dir.path(), &chain);
            lockstep.sync().await.unwrap();
            let id = funded(&lockstep, &chain, 62, 6, 40_000).await;
            // Three sends, each driven until it parks, then the process ends.
            for (i, payee) in payees.iter().enumerate() {
                let send = pay(format!("pay-{i}"), id, payee, 25_000, 1.5, 1);
                let outcome = lockstep
                    .executor()
                    .drive(send, DriveMode::UntilParkOrDone)
                    .await
                    .unwrap();
                assert_eq!(outcome, DriveOutcome::Parked);
            }
            id
        };
        chain.mine(1).unwrap();
        let (lockstep, manager) = open(dir.path(), &chain);
        lockstep.start();
        lockstep
            .wait_for(chain.tip().height, Duration::from_secs(60))
            .await
            .unwrap();
        let tasks = lockstep.executor().resume_all().await.unwrap();
        assert_eq!(tasks.len(), 3);
        // A drive of an action resume_all is driving takes no step.
        let twin = Spend::send("pay-0", id, Vec::new(), 1.0, 1);
        let second = lockstep
            .executor()
            .drive(twin, DriveMode::UntilDone)
            .await
            .unwrap();
        assert!(
            matches!(
                second,
                DriveOutcome::AlreadyRunning | DriveOutcome::Finished(_)
            ),
            "resume_all claimed pay-0 before returning: {second:?}"
        );
        for task in tasks {
            let outcome = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("resumed in time")
                .unwrap()
                .unwrap();
            assert!(matches!(outcome, DriveOutcome::Done(_)), "{outcome:?}");
        }
        for payee in &payees {
            assert_eq!(paid_to(&chain, payee), vec![Amount::from_sat(25_000)]);
        }
        chain.mine(1).unwrap();
        lockstep
            .wait_for(chain.tip().height, Duration::from_secs(60))
            .await
            .unwrap();
        lockstep.stop().await;
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn a_consolidation_sweeps_small_coins_into_one_and_a_short_send_fails_with_no_coin_locked() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(163), 105).unwrap();
        let (lockstep, manager) = open(dir.path(), &chain);
        lockstep.sync().await.unwrap();
        let id = funded(&lockstep, &chain, 63, 8, 10_000).await;
        let sweep = Spend::consolidate("sweep-63", id, 5, 20, 1.0, 1);
        let outcome = lockstep
            .executor()
            .drive(sweep, DriveMode::UntilParkOrDone)
            .await
            .unwrap();
        assert_eq!(outcome, DriveOutcome::Parked);
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        let outcome = lockstep
            .executor()
            .drive(
                Spend::consolidate("sweep-63", id, 5, 20, 1.0, 1),
                DriveMode::UntilParkOrDone,
            )
            .await
            .unwrap();
        assert!(matches!(outcome, DriveOutcome::Done(_)), "{outcome:?}");
        let wallet = lockstep.wallet(id).await.unwrap();
        let coins = wallet.coins().await.unwrap();
        let unspent: Vec<_> = coins
            .iter()
            .filter(|c| !matches!(c.state, lockstep::CoinState::Spent { .. }))
            .collect();
        assert_eq!(unspent.len(), 1, "{unspent:?}");
        let total = unspent[0].coin.txout.value.to_sat();
        assert!(
            (79_000..80_000).contains(&total),
            "8 × 10,000 less a small fee: {total}"
        );

        // A send the wallet cannot pay fails and keeps nothing locked.
        let short = pay("too-much", id, &p2wpkh(&key(63)), 1_000_000, 1.0, 1);
        let outcome = lockstep
            .executor()
            .drive(short, DriveMode::UntilDone)
            .await
            .unwrap();
        assert!(
            matches!(&outcome, DriveOutcome::Failed(why) if why.contains("insufficient")),
            "{outcome:?}"
        );
        settled(&manager, &chain, id).await;
    });
}

/// SimChain, except that it acknowledges the first transaction broadcast to
/// it and every later broadcast of that same transaction without relaying
/// them: a node that lost it, so that it stays unconfirmed while blocks
/// are mined.
struct Forgetful {
    chain: SimChain,
    lost: std::sync::Mutex<Option<Txid>>,
    /// Refuses every broadcast with this reason instead.
    reject: Option<RejectReason>,
}

#[async_trait]
impl ChainSource for Forgetful {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        ChainSource::tip(&self.chain).await
    }
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        ChainSource::block_hash(&self.chain, height).await
    }
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        self.chain.header(hash).await
    }
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        self.chain.filter(hash).await
    }
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        self.chain.filter_header(hash).await
    }
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        self.chain.block(hash).await
    }
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let txid = tx.compute_txid();
        if let Some(reason) = &self.reject {
            return Err(BroadcastError::Rejected {
                txid,
                reason: reason.clone(),
            });
        }
        {
            let mut lost = self.lost.lock().unwrap();
            if lost.is_none_or(|l| l == txid) {
                *lost = Some(txid);
                return Ok(txid);
            }
        }
        self.chain.broadcast(tx).await
    }
}

#[test]
fn a_send_left_unconfirmed_is_replaced_with_a_higher_fee_and_the_replacement_completes_it() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(164), 105).unwrap();
        let source = Arc::new(Forgetful {
            chain: chain.clone(),
            lost: std::sync::Mutex::new(None),
            reject: None,
        });
        let (lockstep, manager) = open_on(dir.path(), source.clone());
        lockstep.sync().await.unwrap();
        let id = funded(&lockstep, &chain, 64, 2, 60_000).await;
        let payee = p2wpkh(&key(64));
        let send = pay("bumped-64", id, &payee, 50_000, 2.0, 1).with_fee_bump(FeeBump {
            after_blocks: 2,
            max_bumps: 3,
            factor: 2.0,
        });
        let mut rounds = 0;
        let outcome = loop {
            let outcome = lockstep
                .executor()
                .drive(send.clone(), DriveMode::UntilParkOrDone)
                .await
                .unwrap();
            if outcome != DriveOutcome::Parked {
                break outcome;
            }
            rounds += 1;
            assert!(rounds < 12, "never finished");
            chain.mine(1).unwrap();
            lockstep.sync().await.unwrap();
        };
        let lost = source
            .lost
            .lock()
            .unwrap()
            .expect("the first version was lost");
        let DriveOutcome::Done(detail) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(
            detail.contains(&format!("replaced: [{lost}]")),
            "the replacement confirmed, the lost version is recorded as replaced: {detail}"
        );
        assert!(!detail.starts_with(&lost.to_string()), "{detail}");
        assert_eq!(paid_to(&chain, &payee), vec![Amount::from_sat(50_000)]);
        // The lost version left the history as conflicted by its
        // replacement; the wallet equals the oracle and nothing is locked.
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn resumed_actions_hold_their_wallets_before_any_new_action_is_admitted() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(165), 105).unwrap();
        let payee = p2wpkh(&key(65));
        let send = |id: &str, wallet| pay(id, wallet, &payee, 15_000, 1.0, 1);
        let id = {
            let (lockstep, _) = open(dir.path(), &chain);
            lockstep.sync().await.unwrap();
            let id = funded(&lockstep, &chain, 65, 2, 40_000).await;
            // The wallet is busy: the send is persisted (step 0) and waits
            // for its turn when the process ends.
            let (_release, held) = tokio::sync::oneshot::channel::<()>();
            let holder = lockstep
                .try_dispatch(
                    id,
                    lockstep::ActionSpec::new(lockstep::ActionKind::HEARTBEAT),
                    |_, _| async move {
                        let _ = held.await;
                        Ok::<_, ()>(())
                    },
                )
                .await
                .unwrap();
            let waiting = tokio::spawn({
                let lockstep = lockstep.clone();
                let action = send("resumed-65", id);
                async move {
                    lockstep
                        .executor()
                        .drive(action, DriveMode::UntilDone)
                        .await
                }
            });
            eventually("the send to queue behind the holder", async || {
                lockstep.dispatcher().queue_len(&id) == 1
            })
            .await;
            assert_eq!(lockstep.dispatcher().queue_len(&id), 1);
            // The process ends: everything holding the database goes
            // (awaited, so the next open does not find this one's loop).
            waiting.abort();
            let _ = waiting.await;
            holder.cancel();
            let _ = holder.outcome().await;
            drop(lockstep);
            id
        };
        let (lockstep, manager) = open(dir.path(), &chain);
        lockstep.sync().await.unwrap();
        let tasks = lockstep.executor().resume_all().await.unwrap();
        assert_eq!(tasks.len(), 1);
        // Before the resumed task ever ran, its wallet is taken.
        let refused = lockstep
            .try_dispatch(
                id,
                lockstep::ActionSpec::new(lockstep::ActionKind::SEND),
                |_, _| async { Ok::<_, ()>(()) },
            )
            .await;
        assert!(
            matches!(
                &refused,
                Err(lockstep::ActError::Dispatch(lockstep::DispatchError::WalletBusy { kind, .. }))
                    if *kind == lockstep::ActionKind::SEND
            ),
            "{refused:?}"
        );
        let task = tasks.into_iter().next().unwrap();
        // Blocks keep coming until the send is done (however late a loaded
        // machine lets it broadcast), a minute at most.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mined = {
            let chain = chain.clone();
            let lockstep = lockstep.clone();
            let done = done.clone();
            tokio::spawn(async move {
                for _ in 0..1200 {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    chain.mine(1).unwrap();
                    lockstep.sync().await.unwrap();
                }
            })
        };
        // Signing needs the keys: unlocked after the restart.
        lockstep
            .wallet(id)
            .await
            .unwrap()
            .unlock("pw")
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, DriveOutcome::Done(_)), "{outcome:?}");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        mined.await.unwrap();
        assert_eq!(paid_to(&chain, &payee), vec![Amount::from_sat(15_000)]);
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn the_coins_of_an_action_never_resumed_come_back_with_the_block_that_reaches_their_expiry() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(166), 105).unwrap();
        let config = ExecutorConfig {
            lock_ttl: 3,
            ..ExecutorConfig::default()
        };
        let (lockstep, manager) = open_with(dir.path(), Arc::new(chain.clone()), config);
        lockstep.sync().await.unwrap();
        let id = funded(&lockstep, &chain, 66, 2, 40_000).await;
        // Locked keys: the send locks its coins, then waits to sign.
        lockstep.wallet(id).await.unwrap().lock_keys();
        let send = pay("stuck-66", id, &p2wpkh(&key(66)), 15_000, 1.0, 1);
        let outcome = lockstep
            .executor()
            .drive(send, DriveMode::UntilParkOrDone)
            .await
            .unwrap();
        assert_eq!(outcome, DriveOutcome::Parked);
        let holders = |manager: &Manager| {
            manager
                .store()
                .read_blocking(|tx| tx.lock_holders())
                .unwrap()
        };
        assert_eq!(holders(&manager).len(), 1, "the send holds its coin");
        let locked_at = chain.tip().height;
        // Nobody resumes it: two blocks keep the lock, the third frees it,
        // in that block's own transaction.
        for n in 1..=3 {
            chain.mine(1).unwrap();
            lockstep.sync().await.unwrap();
            let expected = usize::from(n < 3);
            assert_eq!(
                holders(&manager).len(),
                expected,
                "{n} blocks after height {locked_at}"
            );
        }
        let left = manager
            .store()
            .read_blocking(|tx| tx.checkpoints())
            .unwrap();
        assert_eq!(
            left.len(),
            1,
            "the checkpoint itself stays (stop removes it)"
        );
        lockstep.executor().stop("stuck-66", false).await.unwrap();
        settled(&manager, &chain, id).await;
    });
}

/// A facade over `dir` whose source loses the first transaction it is
/// sent (or refuses every one with `reject`), and a funded wallet.
async fn unreliable(
    dir: &Path,
    chain: &SimChain,
    seed: u8,
    reject: Option<RejectReason>,
) -> (Lockstep, Manager, WalletId) {
    let source = Arc::new(Forgetful {
        chain: chain.clone(),
        lost: std::sync::Mutex::new(None),
        reject,
    });
    let (lockstep, manager) = open_on(dir, source);
    lockstep.sync().await.unwrap();
    let id = funded(&lockstep, chain, seed, 2, 40_000).await;
    (lockstep, manager, id)
}

#[test]
fn a_rejected_broadcast_fails_the_send_with_its_reason_and_frees_its_coins() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(167), 105).unwrap();
        let reason = RejectReason::MissingInputs {
            outpoint: bitcoin::OutPoint::null(),
        };
        let (lockstep, manager, id) = unreliable(dir.path(), &chain, 67, Some(reason)).await;
        let send = pay("refused-67", id, &p2wpkh(&key(67)), 15_000, 1.0, 1);
        let outcome = lockstep
            .executor()
            .drive(send, DriveMode::UntilDone)
            .await
            .unwrap();
        assert!(
            matches!(&outcome, DriveOutcome::Failed(why) if why.contains("unknown output")),
            "{outcome:?}"
        );
        // Nothing of it stays: no pending transaction, no lock.
        let history = lockstep.wallet(id).await.unwrap().history().await.unwrap();
        assert!(history.iter().all(|h| h.height.is_some()), "{history:?}");
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn stop_refuses_while_a_broadcast_can_confirm_unless_forced() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(168), 105).unwrap();
        let (lockstep, manager, id) = unreliable(dir.path(), &chain, 68, None).await;
        let send = pay("pending-68", id, &p2wpkh(&key(68)), 15_000, 1.0, 1);
        let outcome = lockstep
            .executor()
            .drive(send, DriveMode::UntilParkOrDone)
            .await
            .unwrap();
        assert_eq!(outcome, DriveOutcome::Parked, "broadcast, waiting");
        let refused = lockstep.executor().stop("pending-68", false).await;
        assert!(
            matches!(refused, Err(lockstep::StopError::BroadcastPending(_))),
            "{refused:?}"
        );
        lockstep.executor().stop("pending-68", true).await.unwrap();
        let (left, locks, outcome) = manager
            .store()
            .read_blocking(|tx| {
                Ok::<_, StoreError>((
                    tx.checkpoints()?,
                    tx.lock_holders()?,
                    tx.action_outcome("pending-68")?,
                ))
            })
            .unwrap();
        assert!(left.is_empty() && locks.is_empty(), "{left:?} {locks:?}");
        assert_eq!(outcome.unwrap().outcome, "stopped");
        assert!(matches!(
            lockstep.executor().stop("pending-68", true).await,
            Err(lockstep::StopError::NotFound(_))
        ));
    });
}

#[test]
fn an_expired_send_frees_its_coins_unless_it_broadcast() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(169), 105).unwrap();
        let (lockstep, manager, id) = unreliable(dir.path(), &chain, 69, None).await;
        let tip = chain.tip().height;
        lockstep.dispatcher().set_tip(tip);
        let wallet = lockstep.wallet(id).await.unwrap();
        let locks = |manager: &Manager| {
            manager
                .store()
                .read_blocking(|tx| tx.lock_holders())
                .unwrap()
        };

        // Keys locked: it locks a coin, then waits to sign, until expiry.
        wallet.lock_keys();
        let waiting = tokio::spawn({
            let lockstep = lockstep.clone();
            let send = pay("late-69", id, &p2wpkh(&key(69)), 15_000, 1.0, 1).with_deadline(tip + 2);
            async move { lockstep.executor().drive(send, DriveMode::UntilDone).await }
        });
        eventually("the send to lock its coin", async || {
            locks(&manager).len() == 1
        })
        .await;
        assert_eq!(locks(&manager).len(), 1, "it holds its coin");
        lockstep.dispatcher().set_tip(tip + 2);
        let outcome = waiting.await.unwrap();
        assert!(
            matches!(outcome, Err(lockstep::DriveError::Expired)),
            "{outcome:?}"
        );
        assert!(
            locks(&manager).is_empty(),
            "nothing broadcast: its coin came back"
        );

        // Broadcast (the source lost it), then expired: its inputs stay
        // locked, since the transaction can still confirm.
        wallet.unlock("pw").await.unwrap();
        let send = pay("sent-69", id, &p2wpkh(&key(70)), 15_000, 1.0, 1).with_deadline(tip + 4);
        let waiting = tokio::spawn({
            let lockstep = lockstep.clone();
            async move { lockstep.executor().drive(send, DriveMode::UntilDone).await }
        });
        // Signed and recorded as broadcast (the commit that makes it one the
        // chain may confirm) before its deadline comes.
        eventually("the send to record its broadcast", async || {
            let history = wallet.history().await.unwrap();
            history.iter().any(|h| h.height.is_none())
        })
        .await;
        lockstep.dispatcher().set_tip(tip + 4);
        let outcome = waiting.await.unwrap();
        assert!(
            matches!(outcome, Err(lockstep::DriveError::Expired)),
            "{outcome:?}"
        );
        let held = locks(&manager);
        assert_eq!(
            held.len(),
            1,
            "the broadcast's inputs stay locked: {held:?}"
        );
        let ended = manager
            .store()
            .read_blocking(|tx| tx.action_outcome("sent-69"))
            .unwrap();
        assert_eq!(ended.unwrap().outcome, "expired");
    });
}

#[test]
fn a_reorg_that_drops_the_confirmation_sends_it_back_to_waiting_and_it_confirms_once() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(170), 105).unwrap();
        let (lockstep, manager) = open(dir.path(), &chain);
        lockstep.sync().await.unwrap();
        let id = funded(&lockstep, &chain, 70, 2, 40_000).await;
        let payee = p2wpkh(&key(71));
        let send = pay("reorged-70", id, &payee, 15_000, 1.0, 3);
        let drive = |lockstep: &Lockstep| {
            let lockstep = lockstep.clone();
            let send = send.clone();
            async move {
                lockstep
                    .executor()
                    .drive(send, DriveMode::UntilParkOrDone)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(drive(&lockstep).await, DriveOutcome::Parked);
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        assert_eq!(
            drive(&lockstep).await,
            DriveOutcome::Parked,
            "1 of 3 confirmations"
        );
        // The block that confirmed it goes, and the transaction with it.
        chain.reorg(1, ReorgTxs::Drop).unwrap();
        lockstep.sync().await.unwrap();
        assert!(paid_to(&chain, &payee).is_empty());
        // Back to waiting: it sends the transaction again, and it confirms.
        let mut outcome = drive(&lockstep).await;
        for _ in 0..6 {
            if outcome != DriveOutcome::Parked {
                break;
            }
            chain.mine(1).unwrap();
            lockstep.sync().await.unwrap();
            outcome = drive(&lockstep).await;
        }
        assert!(matches!(outcome, DriveOutcome::Done(_)), "{outcome:?}");
        assert_eq!(paid_to(&chain, &payee), vec![Amount::from_sat(15_000)]);
        settled(&manager, &chain, id).await;
    });
}

#[test]
fn a_send_resumed_after_its_locks_expired_chooses_again_instead_of_spending_a_coin_taken_since() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let chain = SimChain::generate(SimParams::signed(171), 105).unwrap();
        let config = ExecutorConfig {
            lock_ttl: 2,
            run_each_step_twice: true,
            ..ExecutorConfig::default()
        };
        let (lockstep, manager) = open_with(dir.path(), Arc::new(chain.clone()), config);
        lockstep.sync().await.unwrap();
        let id = funded(&lockstep, &chain, 71, 2, 40_000).await;
        let wallet = lockstep.wallet(id).await.unwrap();
        let (first_payee, second_payee) = (p2wpkh(&key(72)), p2wpkh(&key(73)));
        // The first send locks a coin, then waits for the keys...
        wallet.lock_keys();
        let first = pay("first-71", id, &first_payee, 15_000, 5.0, 1);
        let drive = |send: Spend| {
            let lockstep = lockstep.clone();
            async move {
                lockstep
                    .executor()
                    .drive(send, DriveMode::UntilParkOrDone)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(drive(first.clone()).await, DriveOutcome::Parked);
        // ... longer than its locks live.
        chain.mine(2).unwrap();
        lockstep.sync().await.unwrap();
        // A second send needs both coins, the first one's included.
        wallet.unlock("pw").await.unwrap();
        let second = pay("second-71", id, &second_payee, 60_000, 1.0, 1);
        assert_eq!(drive(second.clone()).await, DriveOutcome::Parked);
        // Resumed, the first send finds its coin taken: it chooses again,
        // finds nothing free, and fails without broadcasting anything.
        let outcome = drive(first).await;
        assert!(
            matches!(&outcome, DriveOutcome::Failed(why) if why.contains("insufficient")),
            "{outcome:?}"
        );
        chain.mine(1).unwrap();
        lockstep.sync().await.unwrap();
        let outcome = drive(second).await;
        assert!(matches!(outcome, DriveOutcome::Done(_)), "{outcome:?}");
        assert!(paid_to(&chain, &first_payee).is_empty());
        assert_eq!(
            paid_to(&chain, &second_payee),
            vec![Amount::from_sat(60_000)]
        );
        settled(&manager, &chain, id).await;
    });
}
