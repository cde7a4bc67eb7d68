//! The `lockstep` command line.
//!
//! `lockstep demo` runs the manager on the embedded simulated regtest chain:
//! 50 wallets of mixed script types and birth heights, receiving and
//! spending, synced by one chain loop while the chain grows; one wallet
//! imported mid-sync (stop the world), one targeted script import, a reorg
//! near the tip; then every wallet is checked against the chain's oracle.
//! A second part (`sends`) adds signing wallets that pay each other through
//! the facade's dispatcher and durable-actions executor (a refusal of a
//! busy wallet, concurrent sends, a fee bump, a restart resumed from the
//! database), and checks every wallet against the oracle once more.
//! The exit status is non-zero if any wallet differs or any payment was not
//! made exactly once.

mod sends;
mod source;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bitcoin::hashes::Hash as _;
use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_chain::metered::Metered;
use lockstep_chain::{BitcoindAuth, BitcoindConfig, BitcoindSource, ChainSource};
use lockstep_manager::{Manager, ManagerConfig, NewWallet, ScriptImport};
use lockstep_sim::{ReorgTxs, SimChain, SimNode, SimNodeConfig, SimParams};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{
    KINDS, WalletCheck, check_unconfirmed, check_wallet_imported, test_descriptors,
};
use lockstep_wallet::Keychain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use source::DemoSource;

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Many Bitcoin wallets in sync with one chain"
)]
struct Cli {
    /// How log lines are written (to stderr; `RUST_LOG` picks what is
    /// logged): `text` for people, `json` (one object per line, with each
    /// span's fields: wallet, action id, kind, ...) to analyse a run
    /// afterwards.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Sync many wallets on a simulated chain and check them all against
    /// its oracle.
    Demo(DemoArgs),
    /// Serve a simulated regtest chain as a stand-in Bitcoin Core node
    /// (REST and JSON-RPC in Core's formats, cookie authentication) on
    /// 127.0.0.1, to try lockstep or any Core client without a node.
    Simnode(SimnodeArgs),
}

#[derive(clap::Args)]
struct SimnodeArgs {
    /// Height of the chain it starts with.
    #[arg(long, default_value_t = 200)]
    blocks: u32,
    /// Seed of the chain.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The port on 127.0.0.1 (0: any free one; the address is printed).
    #[arg(long, default_value_t = 18443)]
    port: u16,
    /// Where to write the `.cookie` file, as `bitcoind -datadir` does.
    #[arg(long, default_value = ".")]
    datadir: std::path::PathBuf,
    /// Mine a block this often, in seconds (0: never).
    #[arg(long, default_value_t = 10)]
    mine_every: u64,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Height of the chain at the end (at least 2,000 for the full story).
    #[arg(long, default_value_t = 2_000)]
    blocks: u32,
    /// Wallets, one of them imported mid-sync.
    #[arg(long, default_value_t = 50)]
    wallets: u32,
    /// Seed of the chain and of the wallets' activity.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Background transactions per block (at most; at least half that).
    #[arg(long, default_value_t = 40)]
    txs_per_block: u32,
    /// Depth of the reorg near the tip.
    #[arg(long, default_value_t = 4)]
    reorg_depth: u32,
    /// Keep the database here instead of a temporary directory.
    #[arg(long)]
    db: Option<std::path::PathBuf>,
    /// Signing wallets that pay each other in the second part (at least 3,
    /// so that each can pay two others; 0 skips the second part).
    #[arg(long, default_value_t = 5)]
    signers: u32,
    /// Read the simulated chain in process instead of through the stand-in
    /// node (`lockstep simnode`'s server, on a free loopback port, read
    /// with `BitcoindSource` over REST and JSON-RPC as a real node is).
    #[arg(long)]
    embedded: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    match cli.command {
        Command::Demo(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(demo(args))
        }
        Command::Simnode(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(simnode(args))
        }
    }
}

/// Runs the stand-in node until Ctrl-C.
async fn simnode(args: SimnodeArgs) -> anyhow::Result<()> {
    let chain = SimChain::generate(SimParams::signed(args.seed), args.blocks)?;
    let config = lockstep_sim::SimNodeConfig {
        port: args.port,
        cookie_dir: Some(args.datadir.clone()),
        ..lockstep_sim::SimNodeConfig::default()
    };
    let node = lockstep_sim::SimNode::start(chain.clone(), config).await?;
    println!(
        "stand-in Bitcoin Core node (regtest, {} blocks)",
        chain.height()
    );
    println!("  url     {}", node.url());
    if let Some(cookie) = node.cookie_path() {
        println!("  cookie  {}", cookie.display());
    }
    println!("  REST and JSON-RPC in Core's formats: docs/bitcoind.md; Ctrl-C stops it");
    let mining = (args.mine_every > 0).then(|| {
        let chain = chain.clone();
        let every = std::time::Duration::from_secs(args.mine_every);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match chain.mine(1) {
                    Ok(blocks) => {
                        if let Some(block) = blocks.last() {
                            println!("  mined   {} {}", block.height, block.hash);
                        }
                    }
                    Err(error) => {
                        eprintln!("mining failed: {error}");
                        return;
                    }
                }
            }
        })
    });
    tokio::signal::ctrl_c().await?;
    if let Some(mining) = mining {
        mining.abort();
    }
    node.shutdown().await;
    Ok(())
}

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

    /// Mines blocks up to `height`, each with payments to born wallets and
    /// spends of their coins.
    fn mine_to(&mut self, height: u32) -> anyhow::Result<()> {
        while self.chain.height() < height {
            let next = self.chain.height() + 1;
            let born: Vec<u32> = (0..self.wallets.len() as u32)
                .filter(|w| self.wallets[*w as usize].0 <= next)
                .collect();
            if !born.is_empty() && next > 101 {
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
                if !self.paid.is_empty() && self.rng.gen_bool(0.4) {
                    let (from, op) = self
                        .paid
                        .swap_remove(self.rng.gen_range(0..self.paid.len()));
                    if let Some(out) = self
                        .chain
                        .unspent(&op)
                        .filter(|o| o.value.to_sat() >= 20_000)
                    {
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
                    }
                }
            }
            self.chain.mine(1)?;
        }
        Ok(())
    }
}

fn wallet_spec(seed: u64, index: u32, birth: u32, lookahead: u32) -> NewWallet {
    NewWallet {
        name: format!("{}-{index:02}", KINDS[index as usize % 3]),
        descriptors: test_descriptors(seed, index),
        birth_height: birth,
        lookahead,
        passphrase: None,
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let final_height = args.blocks.max(200);
    let n = args.wallets.max(2);
    let params = SimParams::unsigned(args.seed)
        .with_load(args.txs_per_block / 2..=args.txs_per_block.max(1), 1..=3);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    // Birth heights spread over the first 60% of the chain; the last
    // wallet is the one imported mid-sync, born early.
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
    let mut scenario = Scenario {
        chain: SimChain::new(params),
        rng,
        seed: args.seed,
        wallets,
        paid: Vec::new(),
    };
    let chain = scenario.chain.clone();
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

    let dir = tempfile::tempdir()?;
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| dir.path().join("lockstep.db"));
    let store = Store::open(&db, StoreOptions::default())?;
    // The stand-in node serves the chain as Bitcoin Core would; lockstep
    // reads it over loopback HTTP, the path a deployment takes.
    let (_node, inner): (Option<SimNode>, Arc<dyn ChainSource>) = if args.embedded {
        (None, Arc::new(chain.clone()))
    } else {
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
        (Some(node), Arc::new(source))
    };
    let metered = Metered::new(inner);
    let demo_source = DemoSource::new(metered.clone(), chain.clone());
    let source: Arc<dyn ChainSource> = demo_source.clone();
    let manager = Manager::new(store.clone(), source, ManagerConfig::default());

    // Every wallet but the last is registered before the loop starts.
    let mut ids: BTreeMap<u32, WalletId> = BTreeMap::new();
    for i in 0..n - 1 {
        let (birth, lookahead, _) = scenario.wallets[i as usize];
        ids.insert(
            i,
            manager
                .register(wallet_spec(args.seed, i, birth, lookahead))
                .await?,
        );
    }
    let bar = ProgressBar::new(u64::from(final_height));
    bar.set_style(
        ProgressStyle::with_template("  {spinner} loop at {pos:>5}/{len} {wide_bar} {msg}")?
            .progress_chars("=> "),
    );
    let mut tip = manager.tip();
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
    manager.start();

    // Mid-sync: the chain grows while the loop works; when the loop passes
    // 40% of the way, the last wallet is imported (stop the world).
    let import_at = final_height * 4 / 10;
    tip.wait_for(|t| t.is_some_and(|t| t.height >= import_at))
        .await?;
    let late = n - 1;
    let (birth, lookahead, _) = scenario.wallets[late as usize];
    bar.set_message(format!("importing wallet {late} from height {birth}"));
    let importing = Instant::now();
    let late_id = manager
        .register(wallet_spec(args.seed, late, birth, lookahead))
        .await?;
    let import_time = importing.elapsed();
    ids.insert(late, late_id);
    bar.set_message("");

    // A payment past a wallet's gap limit, found by a targeted import.
    let gap_wallet = 0;
    let gap_index = scenario.wallets[gap_wallet as usize].2[0] + 200;
    let gap_script = scenario.script(gap_wallet, Keychain::External, gap_index)?;
    let gap_height = chain.height() + 1;
    let gap_amount = Amount::from_sat(4_242_000);
    chain.pay(gap_script, gap_amount)?;
    scenario.mine_to(final_height)?;
    let chain_tip = chain.tip();
    manager
        .wait_for_block(chain_tip, Duration::from_secs(600))
        .await?;
    bar.set_message(format!(
        "targeted import of {} from height {gap_height}",
        ids[&gap_wallet]
    ));
    let targeted = Instant::now();
    manager
        .import_scripts(
            ids[&gap_wallet],
            ScriptImport::Range {
                keychain: Keychain::External,
                end: gap_index + 1,
            },
            gap_height,
        )
        .await?;
    let targeted_time = targeted.elapsed();

    // A reorg near the tip: the last blocks are replaced by a longer branch.
    bar.set_message(format!("reorg of depth {}", args.reorg_depth));
    let report = chain.reorg(args.reorg_depth, ReorgTxs::Reappear)?;
    scenario.mine_to(chain.height() + 2)?;
    let chain_tip = chain.tip();
    manager
        .wait_for_block(chain_tip, Duration::from_secs(600))
        .await?;
    manager.stop().await;
    progress.abort();
    bar.finish_and_clear();
    let elapsed = started.elapsed();

    // Every wallet against the oracle.
    let checks: Vec<(u32, WalletCheck)> = {
        let ids = ids.clone();
        let chain = chain.clone();
        store
            .read(move |tx| {
                ids.iter()
                    .map(|(i, id)| {
                        // The targeted import derived past the gap limit.
                        let imported: &[(Keychain, u32)] = if *i == gap_wallet {
                            &[(Keychain::External, gap_index + 1)]
                        } else {
                            &[]
                        };
                        let check =
                            check_wallet_imported(tx, &chain, *id, chain_tip.height, imported)?;
                        Ok((*i, check))
                    })
                    .collect::<Result<Vec<_>, lockstep_wallet::WalletError>>()
            })
            .await?
    };
    println!();
    println!(
        "  {:<14} {:>6} {:>16} {:>6} {:>5} {:>8}  oracle",
        "wallet", "birth", "balance (BTC)", "coins", "txs", "scripts"
    );
    for (i, check) in &checks {
        let mark = if check.ok() {
            "✓".to_owned()
        } else {
            format!("✗ {}", check.mismatch.as_deref().unwrap_or(""))
        };
        let note = if *i == late {
            " (imported mid-sync)"
        } else if *i == gap_wallet {
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
    let stats = manager.stats();
    let meter = metered.meter();
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
        import_time.as_secs_f64() * 1e3,
        targeted_time.as_secs_f64() * 1e3
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
        elapsed.as_secs_f64()
    );
    let gap_id = ids[&gap_wallet];
    let gap_found = store
        .read(move |tx| tx.wallet_coins(gap_id, false))
        .await?
        .iter()
        .any(|c| c.value == gap_amount.to_sat() && c.height >= gap_height);
    println!(
        "  targeted import              {} the payment past {}'s gap limit",
        if gap_found { "found" } else { "MISSED" },
        checks[gap_wallet as usize].1.name
    );
    if ok != checks.len() || !gap_found {
        bail!("{} wallets differ from the oracle", checks.len() - ok);
    }

    // Unconfirmed: payments to every third wallet and a payment from wallet
    // 1 to wallet 2 enter the mempool; one poll records them for every
    // wallet they touch, compared with the mempool oracle.
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
        let ids = ids.clone();
        let chain = chain.clone();
        store
            .read(move |tx| {
                ids.values()
                    .map(|id| check_unconfirmed(tx, &chain, *id, chain_tip.height))
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

    // Every wallet against the oracle again, the signing ones included, at
    // the tip the second part left.
    let store = Store::open(&db, StoreOptions::default())?;
    let height = store.read(|tx| tx.tip()).await?.map_or(0, |(h, _)| h);
    if height != chain.height() {
        bail!(
            "the database is at height {height}, the chain at {}",
            chain.height()
        );
    }
    let wallets: Vec<(WalletId, Vec<(Keychain, u32)>)> = ids
        .iter()
        .map(|(i, id)| {
            let imported = if *i == gap_wallet {
                vec![(Keychain::External, gap_index + 1)]
            } else {
                Vec::new()
            };
            (*id, imported)
        })
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
