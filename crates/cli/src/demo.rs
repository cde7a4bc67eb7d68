//! The demo's first part: wallets synced by one chain loop while the chain
//! grows (a wallet imported mid-sync, a targeted script import, a reorg near
//! the tip), every wallet checked against the chain's oracle, then the
//! mempool; after the second part (`sends`), every wallet checked once more.
//!
//! `run` tells the story in order; each step is a function of its own, so
//! that the order of the steps (and of what they print) reads at a glance.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bitcoin::hashes::Hash as _;
use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_chain::metered::{Meter, Metered};
use lockstep_chain::{BitcoindAuth, BitcoindConfig, BitcoindSource, BlockId, ChainSource};
use lockstep_manager::{Manager, ManagerConfig, NewWallet, ScriptImport, Stats};
use lockstep_sim::{ReorgReport, ReorgTxs, SimChain, SimNode, SimNodeConfig, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{
    KINDS, WalletCheck, check_unconfirmed, check_wallet_imported, test_descriptors,
};
use lockstep_wallet::Keychain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;

use crate::DemoArgs;
use crate::sends;
use crate::source::DemoSource;

/// The wallet (by demo index) paid past its gap limit, so that only a
/// targeted import finds the payment.
const GAP_WALLET: u32 = 0;

/// How long the demo waits for the loop to reach a block.
const WAIT: Duration = Duration::from_secs(600);

/// The demo's wallets and what it paid them.
struct Scenario {
    chain: SimChain,
    rng: ChaCha8Rng,
    seed: u64,
    /// Per wallet (by demo index): birth height, lookahead, next index per
    /// keychain.
    wallets: Vec<(u32, u32, [u32; 2])>,
    /// Coins paid to wallets, not yet spent by the demo.
    paid: Vec<(u32, OutPoint)>,
}

impl Scenario {
    /// `n` wallets with birth heights spread over the first 60% of a chain
    /// of `final_height` blocks; the last wallet is the one imported
    /// mid-sync, born early.
    fn new(args: &DemoArgs, final_height: u32, n: u32) -> Scenario {
        let params = SimParams::unsigned(args.seed)
            .with_load(args.txs_per_block / 2..=args.txs_per_block.max(1), 1..=3);
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let wallets: Vec<(u32, u32, [u32; 2])> = (0..n)
            .map(|i| {
                let birth = if i == n - 1 {
                    final_height / 10
                } else {
                    1 + rng.gen_range(0..final_height * 6 / 10)
                };
                (birth, [10, 20, 30][i as usize % 3], [0, 0])
            })
            .collect();
        Scenario {
            chain: SimChain::new(params),
            rng,
            seed: args.seed,
            wallets,
            paid: Vec::new(),
        }
    }

    fn script(&self, wallet: u32, keychain: Keychain, index: u32) -> anyhow::Result<ScriptBuf> {
        Ok(test_descriptors(self.seed, wallet).script_at(keychain, index)?)
    }

    /// A script inside the wallet's lookahead window, and moves the window.
    fn next_script(&mut self, wallet: u32, keychain: Keychain) -> anyhow::Result<ScriptBuf> {
        let (_, lookahead, next) = self.wallets[wallet as usize];
        let k = keychain as usize;
        let index = next[k] + self.rng.gen_range(0..lookahead.min(4));
        self.wallets[wallet as usize].2[k] = index + 1;
        self.script(wallet, keychain, index)
    }

    /// The registration of wallet `index`.
    fn wallet_spec(&self, index: u32) -> NewWallet {
        let (birth, lookahead, _) = self.wallets[index as usize];
        NewWallet {
            name: format!("{}-{index:02}", KINDS[index as usize % 3]),
            descriptors: test_descriptors(self.seed, index),
            birth_height: birth,
            lookahead,
            passphrase: None,
        }
    }

    /// Mines blocks up to `height`, each with payments to born wallets and
    /// spends of their coins.
    fn mine_to(&mut self, height: u32) -> anyhow::Result<()> {
        while self.chain.height() < height {
            let next = self.chain.height() + 1;
            let born: Vec<u32> = (0..self.wallets.len() as u32)
                .filter(|w| self.wallets[*w as usize].0 <= next)
                .collect();
            if !born.is_empty() && next > 101 {
                self.pay_born(&born)?;
                self.spend_a_paid_coin(&born)?;
            }
            self.chain.mine(1)?;
        }
        Ok(())
    }

    /// Pays up to two born wallets, mostly to their external keychain.
    fn pay_born(&mut self, born: &[u32]) -> anyhow::Result<()> {
        for _ in 0..self.rng.gen_range(0..3) {
            let wallet = born[self.rng.gen_range(0..born.len())];
            let keychain = if self.rng.gen_bool(0.8) {
                Keychain::External
            } else {
                Keychain::Internal
            };
            let script = self.next_script(wallet, keychain)?;
            let amount = Amount::from_sat(self.rng.gen_range(10_000..5_000_000));
            let op = self.chain.pay(script, amount)?;
            self.paid.push((wallet, op));
        }
        Ok(())
    }

    /// Sometimes spends a coin paid earlier: half to a born wallet, the
    /// rest (less a fee) back to the spender's change keychain.
    fn spend_a_paid_coin(&mut self, born: &[u32]) -> anyhow::Result<()> {
        if self.paid.is_empty() || !self.rng.gen_bool(0.4) {
            return Ok(());
        }
        let (from, op) = self
            .paid
            .swap_remove(self.rng.gen_range(0..self.paid.len()));
        let Some(out) = self
            .chain
            .unspent(&op)
            .filter(|o| o.value.to_sat() >= 20_000)
        else {
            return Ok(());
        };
        let to = born[self.rng.gen_range(0..born.len())];
        let half = out.value.to_sat() / 2;
        let outputs = vec![
            TxOut {
                value: Amount::from_sat(half),
                script_pubkey: self.next_script(to, Keychain::External)?,
            },
            TxOut {
                value: Amount::from_sat(out.value.to_sat() - half - 1_000),
                script_pubkey: self.next_script(from, Keychain::Internal)?,
            },
        ];
        let txid = self.chain.spend(op, outputs, None)?;
        self.paid.push((to, OutPoint { txid, vout: 0 }));
        self.paid.push((from, OutPoint { txid, vout: 1 }));
        Ok(())
    }
}

/// Scripts a targeted import derived: up to an index, per keychain.
type Imported = Vec<(Keychain, u32)>;

/// The payment past [`GAP_WALLET`]'s gap limit.
struct GapPayment {
    /// The external index it pays.
    index: u32,
    /// The height of the block that holds it.
    height: u32,
    amount: Amount,
}

impl GapPayment {
    /// What the targeted import derived for wallet `wallet` beyond the
    /// gap-limit rule: the oracle watches those scripts too.
    fn imported(&self, wallet: u32) -> Imported {
        if wallet == GAP_WALLET {
            vec![(Keychain::External, self.index + 1)]
        } else {
            Vec::new()
        }
    }
}

/// Runs the demo: both parts, each wallet checked against the oracle.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let final_height = args.blocks.max(200);
    let n = args.wallets.max(2);
    let mut scenario = Scenario::new(&args, final_height, n);
    let chain = scenario.chain.clone();
    generate_first_half(&args, &mut scenario, final_height, n)?;

    let dir = tempfile::tempdir()?;
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| dir.path().join("lockstep.db"));
    let store = Store::open(&db, StoreOptions::default())?;
    let (_node, inner) = connect_source(&args, &chain).await?;
    let metered = Metered::new(inner);
    let demo_source = DemoSource::new(metered.clone(), chain.clone());
    let source: Arc<dyn ChainSource> = demo_source.clone();
    let manager = Manager::new(store.clone(), source, ManagerConfig::default());

    // Every wallet but the last is registered before the loop starts.
    let mut ids: BTreeMap<u32, WalletId> = BTreeMap::new();
    for i in 0..n - 1 {
        ids.insert(i, manager.register(scenario.wallet_spec(i)).await?);
    }
    let (bar, progress) = progress_bar(&manager, final_height)?;
    let tip = manager.tip();
    manager.start();

    let late = n - 1;
    let import_at = final_height * 4 / 10;
    let (late_id, import_time) =
        import_mid_sync(&manager, &scenario, &bar, tip, import_at, late).await?;
    ids.insert(late, late_id);
    let (gap, targeted_time) =
        import_past_the_gap_limit(&manager, &mut scenario, &bar, &ids, final_height).await?;
    let (report, chain_tip) = reorg_near_the_tip(&manager, &mut scenario, &bar, &args).await?;
    manager.stop().await;
    progress.abort();
    bar.finish_and_clear();
    let elapsed = started.elapsed();

    let checks = check_against_the_oracle(&store, &chain, &ids, &gap, chain_tip.height).await?;
    print_wallets(&checks, &scenario, late);
    let ok = checks.iter().filter(|(_, c)| c.ok()).count();
    print_totals(
        &checks,
        &manager.stats(),
        &metered.meter(),
        Timings {
            import: import_time,
            targeted: targeted_time,
            elapsed,
        },
        &args,
        &report,
    );
    let gap_found = gap_payment_found(&store, ids[&GAP_WALLET], &gap).await?;
    println!(
        "  targeted import              {} the payment past {}'s gap limit",
        if gap_found { "found" } else { "MISSED" },
        checks[GAP_WALLET as usize].1.name
    );
    if ok != checks.len() || !gap_found {
        bail!("{} wallets differ from the oracle", checks.len() - ok);
    }

    check_the_mempool(&manager, &store, &scenario, &ids, n, chain_tip.height).await?;
    if args.signers == 0 {
        return Ok(());
    }

    // The second part opens the database itself, as an embedder would:
    // this part's handles go first.
    drop((manager, store));
    let signers = sends::run(
        &db,
        &chain,
        &demo_source,
        args.seed,
        args.signers.max(3) as usize,
    )
    .await?;
    check_everything_again(&db, &chain, &ids, &gap, &signers).await
}

/// Prints what the demo does and mines the first half of the chain; the
/// rest is mined while the loop syncs.
fn generate_first_half(
    args: &DemoArgs,
    scenario: &mut Scenario,
    final_height: u32,
    n: u32,
) -> anyhow::Result<()> {
    let first = final_height / 2;
    println!(
        "lockstep demo: {n} wallets ({}), one chain of {final_height} blocks with {}..={} background transactions per block",
        KINDS.join(", "),
        args.txs_per_block / 2,
        args.txs_per_block
    );
    let generating = Instant::now();
    scenario.mine_to(first)?;
    println!(
        "  generated the first {first} blocks in {:.1} s; the rest is mined while the loop syncs",
        generating.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The source the loop reads: the chain in process (`--embedded`), or the
/// stand-in node serving it as Bitcoin Core would, read over loopback HTTP
/// (the path a deployment takes). The node, if any, lives as long as the
/// first value.
async fn connect_source(
    args: &DemoArgs,
    chain: &SimChain,
) -> anyhow::Result<(Option<SimNode>, Arc<dyn ChainSource>)> {
    if args.embedded {
        return Ok((None, Arc::new(chain.clone())));
    }
    let (user, password) = ("lockstep".to_owned(), format!("demo-{}", args.seed));
    let node = SimNode::start(
        chain.clone(),
        SimNodeConfig {
            user_password: Some((user.clone(), password.clone())),
            ..SimNodeConfig::default()
        },
    )
    .await?;
    let source = BitcoindSource::connect(BitcoindConfig::new(
        node.url(),
        BitcoindAuth::UserPassword { user, password },
        bitcoin::Network::Regtest,
    ))
    .await?;
    println!(
        "  through the stand-in node at {} (Bitcoin Core's REST and JSON-RPC; --embedded reads in process)",
        node.url()
    );
    Ok((Some(node), Arc::new(source)))
}

/// A progress bar that follows the loop's tip, and the task moving it.
fn progress_bar(
    manager: &Manager,
    final_height: u32,
) -> anyhow::Result<(ProgressBar, JoinHandle<()>)> {
    let bar = ProgressBar::new(u64::from(final_height));
    bar.set_style(
        ProgressStyle::with_template("  {spinner} loop at {pos:>5}/{len} {wide_bar} {msg}")?
            .progress_chars("=> "),
    );
    let progress = {
        let bar = bar.clone();
        let mut tip = manager.tip();
        tokio::spawn(async move {
            while tip.changed().await.is_ok() {
                if let Some(t) = *tip.borrow_and_update() {
                    bar.set_position(u64::from(t.height));
                }
            }
        })
    };
    Ok((bar, progress))
}

/// Waits until the loop passes `import_at` (the chain growing meanwhile),
/// then registers wallet `late` (stop the world); returns its id and how
/// long the import took.
async fn import_mid_sync(
    manager: &Manager,
    scenario: &Scenario,
    bar: &ProgressBar,
    mut tip: tokio::sync::watch::Receiver<Option<BlockId>>,
    import_at: u32,
    late: u32,
) -> anyhow::Result<(WalletId, Duration)> {
    tip.wait_for(|t| t.is_some_and(|t| t.height >= import_at))
        .await?;
    let birth = scenario.wallets[late as usize].0;
    bar.set_message(format!("importing wallet {late} from height {birth}"));
    let importing = Instant::now();
    let id = manager.register(scenario.wallet_spec(late)).await?;
    let import_time = importing.elapsed();
    bar.set_message("");
    Ok((id, import_time))
}

/// Pays [`GAP_WALLET`] far past its gap limit, mines the rest of the chain,
/// and once the loop has it finds the payment with a targeted import;
/// returns the payment and how long the import took.
async fn import_past_the_gap_limit(
    manager: &Manager,
    scenario: &mut Scenario,
    bar: &ProgressBar,
    ids: &BTreeMap<u32, WalletId>,
    final_height: u32,
) -> anyhow::Result<(GapPayment, Duration)> {
    let chain = scenario.chain.clone();
    let gap = GapPayment {
        index: scenario.wallets[GAP_WALLET as usize].2[0] + 200,
        height: chain.height() + 1,
        amount: Amount::from_sat(4_242_000),
    };
    let gap_script = scenario.script(GAP_WALLET, Keychain::External, gap.index)?;
    chain.pay(gap_script, gap.amount)?;
    scenario.mine_to(final_height)?;
    manager.wait_for_block(chain.tip(), WAIT).await?;
    bar.set_message(format!(
        "targeted import of {} from height {}",
        ids[&GAP_WALLET], gap.height
    ));
    let targeted = Instant::now();
    manager
        .import_scripts(
            ids[&GAP_WALLET],
            ScriptImport::Range {
                keychain: Keychain::External,
                end: gap.index + 1,
            },
            gap.height,
        )
        .await?;
    Ok((gap, targeted.elapsed()))
}

/// Replaces the last blocks with a longer branch and waits until the loop
/// follows; returns the reorg and the new tip.
async fn reorg_near_the_tip(
    manager: &Manager,
    scenario: &mut Scenario,
    bar: &ProgressBar,
    args: &DemoArgs,
) -> anyhow::Result<(ReorgReport, BlockId)> {
    let chain = scenario.chain.clone();
    bar.set_message(format!("reorg of depth {}", args.reorg_depth));
    let report = chain.reorg(args.reorg_depth, ReorgTxs::Reappear)?;
    scenario.mine_to(chain.height() + 2)?;
    let chain_tip = chain.tip();
    manager.wait_for_block(chain_tip, WAIT).await?;
    Ok((report, chain_tip))
}

/// Every wallet of the first part against the oracle at `height`, by demo
/// index.
async fn check_against_the_oracle(
    store: &Store,
    chain: &SimChain,
    ids: &BTreeMap<u32, WalletId>,
    gap: &GapPayment,
    height: u32,
) -> anyhow::Result<Vec<(u32, WalletCheck)>> {
    let wallets: Vec<(u32, WalletId, Imported)> = ids
        .iter()
        .map(|(i, id)| (*i, *id, gap.imported(*i)))
        .collect();
    let chain = chain.clone();
    Ok(store
        .read(move |tx| {
            wallets
                .iter()
                .map(|(i, id, imported)| {
                    let check = check_wallet_imported(tx, &chain, *id, height, imported)?;
                    Ok((*i, check))
                })
                .collect::<Result<Vec<_>, lockstep_wallet::WalletError>>()
        })
        .await?)
}

/// The table of wallets: what each holds and whether it equals the oracle.
fn print_wallets(checks: &[(u32, WalletCheck)], scenario: &Scenario, late: u32) {
    println!();
    println!(
        "  {:<14} {:>6} {:>16} {:>6} {:>5} {:>8}  oracle",
        "wallet", "birth", "balance (BTC)", "coins", "txs", "scripts"
    );
    for (i, check) in checks {
        let mark = if check.ok() {
            "✓".to_owned()
        } else {
            format!("✗ {}", check.mismatch.as_deref().unwrap_or(""))
        };
        let note = if *i == late {
            " (imported mid-sync)"
        } else if *i == GAP_WALLET {
            " (targeted import)"
        } else {
            ""
        };
        println!(
            "  {:<14} {:>6} {:>16.8} {:>6} {:>5} {:>8}  {mark}{note}",
            check.name,
            scenario.wallets[*i as usize].0,
            check.balance.to_btc(),
            check.coins,
            check.txs,
            check.scripts,
        );
    }
}

/// How long the first part's steps took.
struct Timings {
    /// The mid-sync wallet import.
    import: Duration,
    /// The targeted script import.
    targeted: Duration,
    /// The whole first part, chain generation included.
    elapsed: Duration,
}

/// The first part's totals: wallets equal to the oracle, the loop's and the
/// source's counters, the times.
fn print_totals(
    checks: &[(u32, WalletCheck)],
    stats: &Stats,
    meter: &Meter,
    times: Timings,
    args: &DemoArgs,
    report: &ReorgReport,
) {
    let ok = checks.iter().filter(|(_, c)| c.ok()).count();
    let total: Amount = checks.iter().map(|(_, c)| c.balance).sum();
    println!();
    println!("  wallets equal to the oracle  {ok} of {}", checks.len());
    println!("  total balance                {:.8} BTC", total.to_btc());
    println!(
        "  blocks connected             {} (loop), {} disconnected by a reorg of depth {} at height {}",
        stats.blocks_connected,
        stats.blocks_disconnected,
        args.reorg_depth,
        report.fork.height + 1
    );
    println!("  filters matched              {}", stats.filters_matched);
    println!(
        "  blocks fetched               {} ({} false positives)",
        stats.blocks_fetched, stats.false_positives
    );
    println!("  commits                      {}", stats.commits);
    println!(
        "  imports                      {} (wallet import {:.0} ms, targeted import {:.0} ms)",
        stats.imports,
        times.import.as_secs_f64() * 1e3,
        times.targeted.as_secs_f64() * 1e3
    );
    println!(
        "  source requests              {} ({} filters, {} blocks, {} header and filter-header), {:.1} MB",
        meter.requests,
        meter.filters,
        meter.blocks,
        meter.headers,
        meter.bytes as f64 / 1e6
    );
    println!(
        "  strategy switches            {} (filters or whole blocks, by measured cost; RUST_LOG=info shows them)",
        stats.strategy_switches
    );
    println!(
        "  time                         {:.1} s (chain generation included)",
        times.elapsed.as_secs_f64()
    );
}

/// Whether wallet `id` holds the payment past its gap limit.
async fn gap_payment_found(store: &Store, id: WalletId, gap: &GapPayment) -> anyhow::Result<bool> {
    let (amount, height) = (gap.amount.to_sat(), gap.height);
    Ok(store
        .read(move |tx| tx.wallet_coins(id, false))
        .await?
        .iter()
        .any(|c| c.value == amount && c.height >= height))
}

/// Payments to every third wallet and a payment from wallet 1 to wallet 2
/// enter the mempool; one poll records them for every wallet they touch,
/// compared with the mempool oracle.
async fn check_the_mempool(
    manager: &Manager,
    store: &Store,
    scenario: &Scenario,
    ids: &BTreeMap<u32, WalletId>,
    n: u32,
    height: u32,
) -> anyhow::Result<()> {
    let chain = &scenario.chain;
    let mut pending = 0;
    for i in (0..n).step_by(3) {
        let script = scenario.script(i, Keychain::External, 0)?;
        chain.pay(script, Amount::from_sat(12_345 + u64::from(i)))?;
        pending += 1;
    }
    let from = ids[&1];
    let coin = store
        .read(move |tx| tx.wallet_coins(from, true))
        .await?
        .into_iter()
        .find(|c| c.value > 1_000);
    if let Some(coin) = coin {
        let outpoint = OutPoint::new(bitcoin::Txid::from_byte_array(coin.txid), coin.vout);
        chain.spend_to(outpoint, scenario.script(2, Keychain::External, 0)?, None)?;
        pending += 1;
    }
    let polled = manager
        .sync_mempool()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the source shows no mempool"))?;
    let unconfirmed = {
        let ids: Vec<WalletId> = ids.values().copied().collect();
        let chain = chain.clone();
        store
            .read(move |tx| {
                ids.iter()
                    .map(|id| check_unconfirmed(tx, &chain, *id, height))
                    .collect::<Result<Vec<_>, lockstep_wallet::WalletError>>()
            })
            .await?
    };
    let pending_ok = unconfirmed.iter().filter(|c| c.ok()).count();
    let touched = unconfirmed.iter().filter(|c| c.txs > 0).count();
    println!(
        "  unconfirmed                  {pending} payments in the mempool ({} listed, {} fetched): {touched} wallets see them; unconfirmed views equal to the oracle {pending_ok} of {}",
        polled.listed,
        polled.fetched,
        unconfirmed.len()
    );
    if pending_ok != unconfirmed.len() {
        let bad: Vec<String> = unconfirmed
            .iter()
            .filter_map(|c| c.mismatch.clone())
            .collect();
        bail!(
            "unconfirmed views differ from the oracle: {}",
            bad.join("; ")
        );
    }
    Ok(())
}

/// Every wallet against the oracle again, the signing ones included, at
/// the tip the second part left.
async fn check_everything_again(
    db: &Path,
    chain: &SimChain,
    ids: &BTreeMap<u32, WalletId>,
    gap: &GapPayment,
    signers: &[WalletId],
) -> anyhow::Result<()> {
    let store = Store::open(db, StoreOptions::default())?;
    let height = store.read(|tx| tx.tip()).await?.map_or(0, |(h, _)| h);
    if height != chain.height() {
        bail!(
            "the database is at height {height}, the chain at {}",
            chain.height()
        );
    }
    let wallets: Vec<(WalletId, Imported)> = ids
        .iter()
        .map(|(i, id)| (*id, gap.imported(*i)))
        .chain(signers.iter().map(|id| (*id, Vec::new())))
        .collect();
    // One read per wallet, all at once: each is a full scan of the chain,
    // and the reads run on as many cores as there are.
    let checking = Instant::now();
    let reads: Vec<_> = wallets
        .into_iter()
        .map(|(id, imported)| {
            let (store, chain) = (store.clone(), chain.clone());
            tokio::spawn(async move {
                store
                    .read(move |tx| check_wallet_imported(tx, &chain, id, height, &imported))
                    .await
            })
        })
        .collect();
    let mut checks = Vec::with_capacity(reads.len());
    for read in reads {
        checks.push(read.await??);
    }
    let differ: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| format!("{}: {}", c.name, c.mismatch.as_deref().unwrap_or("")))
        .collect();
    println!(
        "  wallets equal to the oracle {} of {} at height {height} (the {} signing wallets included; checked in {:.1} s)",
        checks.len() - differ.len(),
        checks.len(),
        signers.len(),
        checking.elapsed().as_secs_f64()
    );
    if !differ.is_empty() {
        bail!("wallets differ from the oracle: {}", differ.join("; "));
    }
    Ok(())
}
