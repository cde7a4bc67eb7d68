//! The demo's second part: signing wallets pay each other through the
//! facade's dispatcher and durable-actions executor, as an embedder would
//! (`Lockstep::open` over the first part's database file).
//!
//! In order: signing wallets funded and unlocked; one wallet held by an
//! action while a second action on it is refused (`WalletBusy`); sends
//! driven all at once; a send whose first version the source drops,
//! replaced with a higher fee; sends parked, the facade dropped and a new
//! one resuming them from the database; a table of what each wallet sent
//! and received, with every payee's receipts checked against the chain.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, NetworkKind, ScriptBuf, TxOut, Txid};
use lockstep::{
    ActError, ActionKind, ActionSpec, Config, DispatchError, DispatchStats, DriveError, DriveMode,
    DriveOutcome, FeeBump, Keychain, Lockstep, NewWallet, Outcome, Spend, WalletDescriptors,
    WalletError, WalletId,
};
use lockstep_chain::ChainSource;
use lockstep_sim::SimChain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;

use crate::source::DemoSource;

/// The signing wallets' passphrase (their keys are encrypted with it).
const PASSPHRASE: &str = "demo passphrase";
/// Coins each signing wallet is paid before it sends.
const FUNDING_COINS: usize = 4;
/// The fee rate of every send (sat/vB).
const FEE_RATE: f32 = 2.0;
/// How long the demo waits for the loop to reach a block.
const WAIT: Duration = Duration::from_secs(60);
/// Blocks a phase may mine before its sends must have finished.
const MAX_BLOCKS: u32 = 12;

/// The facades' configuration: the default, except that the loop asks the
/// in-process chain for a new tip every 20 ms instead of 200 ms (a question
/// that costs nothing here), since every phase waits for the blocks it mines.
fn config() -> Config {
    Config {
        poll_interval: Duration::from_millis(20),
        ..Config::default()
    }
}

/// One payment between two signing wallets (indices into the signers).
struct Payment {
    /// The action id (stable: driving it again never pays twice).
    id: String,
    from: usize,
    to: usize,
    amount: Amount,
    /// A fresh address the payee revealed for this payment only.
    script: ScriptBuf,
    /// How its drive ended (the phase fills it in).
    outcome: Option<DriveOutcome>,
}

impl Payment {
    fn spend(&self, signers: &[Signer]) -> Spend {
        Spend::send(
            self.id.clone(),
            signers[self.from].id,
            vec![TxOut {
                value: self.amount,
                script_pubkey: self.script.clone(),
            }],
            FEE_RATE,
            1,
        )
    }

    fn done(&self) -> bool {
        matches!(self.outcome, Some(DriveOutcome::Done(_)))
    }
}

/// A signing wallet of the demo.
struct Signer {
    id: WalletId,
    name: String,
    /// Its confirmed balance once funded.
    funded: Amount,
}

/// The descriptors of signing wallet `index`: P2WPKH or P2TR (alternately)
/// from a master key derived from the demo's seed.
fn signing_descriptors(
    seed: u64,
    index: usize,
) -> anyhow::Result<(&'static str, WalletDescriptors)> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    bytes[16..20].copy_from_slice(b"sign");
    let root = Xpriv::new_master(NetworkKind::Test, &bytes)?;
    let (kind, external, internal) = if index.is_multiple_of(2) {
        (
            "wpkh",
            format!("wpkh({root}/84h/1h/0h/0/*)"),
            format!("wpkh({root}/84h/1h/0h/1/*)"),
        )
    } else {
        (
            "tr",
            format!("tr({root}/86h/1h/0h/0/*)"),
            format!("tr({root}/86h/1h/0h/1/*)"),
        )
    };
    Ok((
        kind,
        WalletDescriptors::parse(&external, &internal, bitcoin::Network::Regtest)?,
    ))
}

/// Mines `blocks` blocks and waits until the loop has them; returns the tip.
async fn mine(lockstep: &Lockstep, chain: &SimChain, blocks: u32) -> anyhow::Result<u32> {
    chain.mine(blocks)?;
    let height = chain.height();
    lockstep.wait_for(height, WAIT).await?;
    Ok(height)
}

/// Mines a block at a time (each once the loop has the previous one) until
/// every task has finished; returns how many blocks that took (none if
/// they finish on the blocks already mined).
async fn mine_until_finished<T>(
    lockstep: &Lockstep,
    chain: &SimChain,
    tasks: &[JoinHandle<T>],
) -> anyhow::Result<u32> {
    let mut blocks = 0;
    loop {
        // Lets the drives take their steps (broadcast, or see a
        // confirmation) before the next block.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tasks.iter().all(JoinHandle::is_finished) {
            return Ok(blocks);
        }
        if blocks == MAX_BLOCKS {
            bail!("sends still running after {MAX_BLOCKS} blocks");
        }
        mine(lockstep, chain, 1).await?;
        blocks += 1;
    }
}

/// Awaits drive tasks, in order.
async fn outcomes(
    tasks: Vec<JoinHandle<Result<DriveOutcome, DriveError>>>,
) -> anyhow::Result<Vec<DriveOutcome>> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

/// What the chain paid each of `scripts`, output by output (confirmed
/// ones, spent or not): one entry per payment received. One scan of the
/// chain for them all.
fn paid_to<'a>(
    chain: &SimChain,
    scripts: impl IntoIterator<Item = &'a ScriptBuf>,
) -> HashMap<ScriptBuf, Vec<(Txid, Amount)>> {
    let truth = chain.truth(scripts);
    let mut paid: HashMap<ScriptBuf, Vec<(Txid, Amount)>> = HashMap::new();
    for coin in truth
        .unspent
        .iter()
        .chain(truth.spent.iter().map(|spent| &spent.coin))
    {
        paid.entry(coin.txout.script_pubkey.clone())
            .or_default()
            .push((coin.outpoint.txid, coin.txout.value));
    }
    paid
}

/// Reveals a fresh receiving address of `payee` for one payment.
async fn payee_script(lockstep: &Lockstep, payee: &Signer) -> anyhow::Result<ScriptBuf> {
    let wallet = lockstep.wallet(payee.id).await?;
    Ok(wallet
        .reveal_address(Keychain::External)
        .await?
        .address
        .script_pubkey())
}

/// Plans a payment from `from` to `to` of a random amount.
async fn plan(
    lockstep: &Lockstep,
    signers: &[Signer],
    rng: &mut ChaCha8Rng,
    label: &str,
    from: usize,
    to: usize,
) -> anyhow::Result<Payment> {
    Ok(Payment {
        id: format!("{label}-{}-to-{}", signers[from].name, signers[to].name),
        from,
        to,
        amount: Amount::from_sat(rng.gen_range(20_000..150_000)),
        script: payee_script(lockstep, &signers[to]).await?,
        outcome: None,
    })
}

/// Drives every payment in a task of its own, all at once.
fn spawn_drives(
    lockstep: &Lockstep,
    signers: &[Signer],
    payments: &[Payment],
    mode: DriveMode,
) -> Vec<JoinHandle<Result<DriveOutcome, DriveError>>> {
    payments
        .iter()
        .map(|p| {
            let executor = lockstep.executor().clone();
            let spend = p.spend(signers);
            tokio::spawn(async move { executor.drive(spend, mode).await })
        })
        .collect()
}

/// Unlocks every signing wallet of this facade (keys live in memory only,
/// so a new facade unlocks again).
async fn unlock_all(lockstep: &Lockstep, signers: &[Signer]) -> anyhow::Result<()> {
    for signer in signers {
        lockstep.wallet(signer.id).await?.unlock(PASSPHRASE).await?;
    }
    Ok(())
}

/// Runs the second part over the database at `db`; returns the signing
/// wallets' ids (for the final oracle check) once every facade is dropped.
pub(crate) async fn run(
    db: &Path,
    chain: &SimChain,
    source: &Arc<DemoSource>,
    seed: u64,
    count: usize,
) -> anyhow::Result<Vec<WalletId>> {
    let started = Instant::now();
    let dyn_source: Arc<dyn ChainSource> = source.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e4d_5e4d);
    println!();
    println!(
        "lockstep demo, part 2: {count} signing wallets pay each other through the dispatcher and the durable-actions executor"
    );

    // An embedder's start-up: the facade over the same database file.
    let lockstep = open_facade(db, &dyn_source, chain).await?;
    let signers = fund_signers(&lockstep, chain, &mut rng, seed, count).await?;
    refuse_a_second_action(&lockstep, &signers).await?;
    let mut payments = pay_each_other(&lockstep, chain, &signers, &mut rng).await?;
    payments.push(bump_a_dropped_send(&lockstep, chain, source, &signers, &mut rng).await?);
    let (lockstep, first_stats) = restart_mid_way(
        lockstep,
        db,
        &dyn_source,
        chain,
        &signers,
        &mut rng,
        &mut payments,
    )
    .await?;

    // 6. What each wallet sent and received; every payee paid exactly once.
    mine(&lockstep, chain, 1).await?;
    let receipts = check_receipts(chain, &payments, count);
    print_ledger(&lockstep, &signers, &payments, &receipts.received).await?;
    println!();
    println!(
        "  paid exactly once           {} of {} payments (SimChain::truth of each payee's script: one output, the amount sent)",
        receipts.exactly_once,
        payments.len()
    );
    println!(
        "  signatures                  {} transactions broadcast, every input checked by Bitcoin Core's interpreter",
        source.verified()
    );
    println!(
        "  dispatcher                  {} actions before the restart, {} refused as busy; {} after",
        first_stats.dispatched,
        first_stats.busy_rejections,
        lockstep.dispatcher().stats().dispatched,
    );
    println!(
        "  time (part 2)               {:.1} s",
        started.elapsed().as_secs_f64()
    );
    lockstep.stop().await;
    drop(lockstep);
    if !receipts.problems.is_empty() {
        bail!(
            "payments not made exactly once: {}",
            receipts.problems.join("; ")
        );
    }
    Ok(signers.iter().map(|s| s.id).collect())
}

/// A facade over the database at `db`, its loop started and at the chain's
/// tip.
async fn open_facade(
    db: &Path,
    source: &Arc<dyn ChainSource>,
    chain: &SimChain,
) -> anyhow::Result<Lockstep> {
    let lockstep = Lockstep::open(db, Arc::clone(source), config())?;
    lockstep.start();
    lockstep.wait_for(chain.height(), WAIT).await?;
    Ok(lockstep)
}

/// First step: signing wallets, funded by the chain, unlocked; each one's funded
/// balance checked against what the chain paid it.
async fn fund_signers(
    lockstep: &Lockstep,
    chain: &SimChain,
    rng: &mut ChaCha8Rng,
    seed: u64,
    count: usize,
) -> anyhow::Result<Vec<Signer>> {
    let mut signers = Vec::with_capacity(count);
    let mut kinds = Vec::new();
    for index in 0..count {
        let (kind, descriptors) = signing_descriptors(seed, index)?;
        let name = format!("signer-{index}");
        let id = lockstep
            .register(
                NewWallet::new(name.clone(), descriptors)
                    .born_at(chain.height() + 1)
                    .passphrase(PASSPHRASE),
            )
            .await?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
        signers.push(Signer {
            id,
            name,
            funded: Amount::ZERO,
        });
    }
    let mut paid = vec![Amount::ZERO; count];
    for (signer, paid) in signers.iter().zip(paid.iter_mut()) {
        let wallet = lockstep.wallet(signer.id).await?;
        for _ in 0..FUNDING_COINS {
            let address = wallet.reveal_address(Keychain::External).await?;
            let amount = Amount::from_sat(rng.gen_range(200_000..1_000_000));
            chain.pay(address.address.script_pubkey(), amount)?;
            *paid += amount;
        }
    }
    let funded_at = mine(lockstep, chain, 1).await?;
    unlock_all(lockstep, &signers).await?;
    for (signer, paid) in signers.iter_mut().zip(&paid) {
        signer.funded = lockstep.wallet(signer.id).await?.balance().await?.confirmed;
        if signer.funded != *paid {
            bail!(
                "{} holds {} after funding, the chain paid it {paid}",
                signer.name,
                signer.funded
            );
        }
    }
    println!(
        "  {count} signing wallets ({}; keys encrypted at rest with a passphrase), paid {FUNDING_COINS} coins each ({:.8} BTC in all) at height {funded_at}, unlocked",
        kinds.join(", "),
        paid.iter().copied().sum::<Amount>().to_btc()
    );
    Ok(signers)
}

/// Second step: one exclusive action per wallet: while an action holds the first
/// signer, a second one is refused at once (`WalletBusy`, naming the
/// holder).
async fn refuse_a_second_action(lockstep: &Lockstep, signers: &[Signer]) -> anyhow::Result<()> {
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let hold = lockstep
        .try_dispatch(
            signers[0].id,
            ActionSpec::new(ActionKind::SEND),
            move |_, _| async move {
                // Holds the wallet until released (it never lets go early).
                let _ = held.await;
                Ok::<_, WalletError>(())
            },
        )
        .await?;
    let refused = lockstep
        .try_dispatch(
            signers[0].id,
            ActionSpec::new(ActionKind::CONSOLIDATE),
            |_, _| async { Ok::<_, WalletError>(()) },
        )
        .await;
    match refused {
        Err(ActError::Dispatch(DispatchError::WalletBusy {
            action_id, kind, ..
        })) => {
            if action_id != hold.id() {
                bail!(
                    "WalletBusy named action {action_id}, the holder is {}",
                    hold.id()
                );
            }
            println!(
                "  WalletBusy: while action {} ({}) holds {}, a second try_dispatch (consolidate) is refused: busy with action {action_id} ({kind})",
                hold.id(),
                ActionKind::SEND,
                signers[0].name
            );
        }
        Ok(_) => bail!("a second action on a busy wallet was admitted"),
        Err(other) => return Err(other.into()),
    }
    release
        .send(())
        .map_err(|()| anyhow::anyhow!("the holding action ended early"))?;
    match hold.outcome().await {
        Outcome::Completed(()) => Ok(()),
        other => bail!("the holding action ended as {other:?}"),
    }
}

/// Third step: sends driven all at once: each wallet pays the next two, so two
/// sends ask for each wallet; the second waits in the dispatcher's queue
/// until the first has locked its coins and released the wallet. Returns
/// the payments with their outcomes.
async fn pay_each_other(
    lockstep: &Lockstep,
    chain: &SimChain,
    signers: &[Signer],
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Payment>> {
    let count = signers.len();
    let mut payments: Vec<Payment> = Vec::new();
    for from in 0..count {
        for step in 1..=2 {
            let to = (from + step) % count;
            payments.push(plan(lockstep, signers, rng, "pay", from, to).await?);
        }
    }
    let phase = Instant::now();
    let tasks = spawn_drives(lockstep, signers, &payments, DriveMode::UntilDone);
    let blocks = mine_until_finished(lockstep, chain, &tasks).await?;
    for (payment, outcome) in payments.iter_mut().zip(outcomes(tasks).await?) {
        payment.outcome = Some(outcome);
    }
    let stats = lockstep.dispatcher().stats();
    let done = payments.iter().filter(|p| p.done()).count();
    println!(
        "  {} sends driven at once (each wallet pays the next two; a wallet's second send queued, longest queue {}): {done} done, {} not, in {blocks} blocks, {:.0} ms",
        payments.len(),
        stats.deepest_queue,
        payments.len() - done,
        phase.elapsed().as_secs_f64() * 1e3
    );
    Ok(payments)
}

/// Fourth step: a fee bump: the source drops the first version, so it stays
/// unconfirmed; after a block the executor replaces it with a higher fee.
/// Returns the payment, checked to have confirmed once, as the replacement.
async fn bump_a_dropped_send(
    lockstep: &Lockstep,
    chain: &SimChain,
    source: &DemoSource,
    signers: &[Signer],
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Payment> {
    let last = signers.len() - 1;
    let mut payment = plan(lockstep, signers, rng, "bumped", 0, last).await?;
    let spend = payment.spend(signers).with_fee_bump(FeeBump {
        after_blocks: 1,
        max_bumps: 3,
        factor: 2.0,
    });
    source.drop_next_broadcast();
    let executor = lockstep.executor().clone();
    let task = tokio::spawn(async move { executor.drive(spend, DriveMode::UntilDone).await });
    let tasks = vec![task];
    let blocks = mine_until_finished(lockstep, chain, &tasks).await?;
    payment.outcome = outcomes(tasks).await?.pop();
    let (dropped, dropped_times) = source
        .dropped()
        .context("the source dropped no broadcast")?;
    let confirmed: Vec<Txid> = paid_to(chain, [&payment.script])
        .remove(&payment.script)
        .unwrap_or_default()
        .iter()
        .map(|(txid, _)| *txid)
        .collect();
    let [replacement] = confirmed[..] else {
        bail!("the bumped payment confirmed {} times", confirmed.len());
    };
    if replacement == dropped || !payment.done() {
        bail!("the fee bump did not replace the dropped version");
    }
    let fee = |txid: &Txid| {
        source
            .fee_of(txid)
            .map_or_else(|| "?".to_owned(), |f| f.to_sat().to_string())
    };
    println!(
        "  fee bump: {} → {}: the source dropped the first version {dropped} (acknowledged {dropped_times} broadcasts of it, relayed none); unconfirmed a block later, it was replaced by {replacement} (fee {} sat instead of {} sat), confirmed; {blocks} blocks",
        signers[0].name,
        signers[last].name,
        fee(&replacement),
        fee(&dropped),
    );
    Ok(payment)
}

/// Fifth step: a restart mid-way: sends driven until they park (broadcast, waiting
/// for their confirmation), then the facade is dropped; a new one over the
/// same file unlocks the wallets (keys are never stored in the clear) and
/// resumes what the previous one left. Appends the sends to `payments`
/// with their recorded outcomes; returns the new facade and the first
/// one's dispatcher counters.
async fn restart_mid_way(
    lockstep: Lockstep,
    db: &Path,
    source: &Arc<dyn ChainSource>,
    chain: &SimChain,
    signers: &[Signer],
    rng: &mut ChaCha8Rng,
    payments: &mut Vec<Payment>,
) -> anyhow::Result<(Lockstep, DispatchStats)> {
    let count = signers.len();
    let first_restarted = payments.len();
    for from in 0..count {
        let to = (from + count - 1) % count;
        payments.push(plan(&lockstep, signers, rng, "resumed", from, to).await?);
    }
    let restarted = first_restarted..payments.len();
    let tasks = spawn_drives(
        &lockstep,
        signers,
        &payments[restarted.clone()],
        DriveMode::UntilParkOrDone,
    );
    let parked = outcomes(tasks)
        .await?
        .iter()
        .filter(|o| **o == DriveOutcome::Parked)
        .count();
    let first_stats = lockstep.dispatcher().stats();
    lockstep.stop().await;
    drop(lockstep);
    chain.mine(1)?;
    let down_block = chain.height();

    let lockstep = open_facade(db, source, chain).await?;
    unlock_all(&lockstep, signers).await?;
    let tasks = lockstep.executor().resume_all().await?;
    let resumed = tasks.len();
    let blocks = mine_until_finished(&lockstep, chain, &tasks).await?;
    let resumed_done = outcomes(tasks)
        .await?
        .iter()
        .filter(|o| matches!(o, DriveOutcome::Done(_)))
        .count();
    // Each parked send's outcome as recorded: driving a finished send
    // again takes no step and returns it.
    for payment in &mut payments[restarted.clone()] {
        payment.outcome = Some(
            lockstep
                .executor()
                .drive(payment.spend(signers), DriveMode::UntilParkOrDone)
                .await?,
        );
        if let Some(DriveOutcome::Finished(row)) = &payment.outcome
            && row.outcome == "done"
        {
            payment.outcome = Some(DriveOutcome::Done(row.detail.clone()));
        }
    }
    println!(
        "  restart: {} sends driven until they parked ({parked} parked: broadcast, awaiting a confirmation); the facade stopped and dropped; block {down_block} mined while down; a new facade over the same database file: resume_all resumed {resumed}, {resumed_done} done ({blocks} more blocks)",
        restarted.len(),
    );
    Ok((lockstep, first_stats))
}

/// What the chain shows of the payments.
struct Receipts {
    /// Payments done whose payee received exactly their amount, once.
    exactly_once: usize,
    /// The others, each described.
    problems: Vec<String>,
    /// What each signer received from the payments, by signer index.
    received: Vec<Amount>,
}

/// Checks every payee's receipts against the chain: each payment done, and
/// its payee's fresh address paid once, with the amount sent.
fn check_receipts(chain: &SimChain, payments: &[Payment], count: usize) -> Receipts {
    let mut exactly_once = 0;
    let mut problems = Vec::new();
    let mut received = vec![Amount::ZERO; count];
    let receipts = paid_to(chain, payments.iter().map(|p| &p.script));
    for payment in payments {
        let amounts: Vec<Amount> = receipts
            .get(&payment.script)
            .map(|r| r.iter().map(|(_, a)| *a).collect())
            .unwrap_or_default();
        if payment.done() && amounts == [payment.amount] {
            exactly_once += 1;
        } else {
            problems.push(format!(
                "{}: {:?}, the payee received {amounts:?}",
                payment.id, payment.outcome
            ));
        }
        received[payment.to] += amounts.iter().copied().sum::<Amount>();
    }
    Receipts {
        exactly_once,
        problems,
        received,
    }
}

/// The table of what each signing wallet sent, received, paid in fees and
/// holds, with a line of totals.
async fn print_ledger(
    lockstep: &Lockstep,
    signers: &[Signer],
    payments: &[Payment],
    received: &[Amount],
) -> anyhow::Result<()> {
    println!();
    println!(
        "  {:<10} {:>5} {:>7} {:>14} {:>14} {:>10} {:>14}",
        "wallet", "done", "failed", "sent (BTC)", "received (BTC)", "fees (sat)", "balance (BTC)"
    );
    let mut totals = (0, 0, Amount::ZERO, Amount::ZERO, Amount::ZERO, Amount::ZERO);
    for (index, signer) in signers.iter().enumerate() {
        let outgoing: Vec<&Payment> = payments.iter().filter(|p| p.from == index).collect();
        let done = outgoing.iter().filter(|p| p.done()).count();
        let failed = outgoing.len() - done;
        let sent: Amount = outgoing.iter().filter(|p| p.done()).map(|p| p.amount).sum();
        let balance = lockstep.wallet(signer.id).await?.balance().await?.confirmed;
        // What left the wallet beyond its payments: the fees it paid.
        let fees = (signer.funded + received[index])
            .checked_sub(sent + balance)
            .with_context(|| format!("{} holds more than it was paid", signer.name))?;
        println!(
            "  {:<10} {:>5} {:>7} {:>14.8} {:>14.8} {:>10} {:>14.8}",
            signer.name,
            done,
            failed,
            sent.to_btc(),
            received[index].to_btc(),
            fees.to_sat(),
            balance.to_btc()
        );
        totals.0 += done;
        totals.1 += failed;
        totals.2 += sent;
        totals.3 += received[index];
        totals.4 += fees;
        totals.5 += balance;
    }
    println!(
        "  {:<10} {:>5} {:>7} {:>14.8} {:>14.8} {:>10} {:>14.8}",
        "total",
        totals.0,
        totals.1,
        totals.2.to_btc(),
        totals.3.to_btc(),
        totals.4.to_sat(),
        totals.5.to_btc()
    );
    Ok(())
}
