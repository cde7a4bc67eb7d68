//! The `lockstep` command line.
//!
//! `lockstep demo` generates the embedded simulated regtest chain and shows
//! what it holds. It becomes the multi-wallet demo once the manager exists.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use bitcoin::hashes::Hash as _;
use clap::{Parser, Subcommand};
use lockstep::chain::{ChainSource, SimChain, SimMode, SimParams};
use lockstep::store::{Store, StoreOptions};

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Many Bitcoin wallets in sync with one chain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a simulated regtest chain and show what it holds.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Blocks to generate above genesis.
    #[arg(long, default_value_t = 2_000)]
    blocks: u32,
    /// Seed of the chain (the same seed gives the same chain).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Background transactions per block (at most).
    #[arg(long, default_value_t = 40)]
    txs_per_block: u32,
    /// Skip signatures (much faster; blocks are then not consensus valid).
    #[arg(long)]
    unsigned: bool,
    /// Also save the chain to this file.
    #[arg(long)]
    save: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(args) => demo(args),
    }
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mode = if args.unsigned {
        SimMode::Unsigned
    } else {
        SimMode::Signed
    };
    let params = SimParams {
        mode,
        ..SimParams::signed(args.seed)
    }
    .with_load(args.txs_per_block / 2..=args.txs_per_block, 1..=3);
    println!(
        "lockstep demo: generating a {mode:?} regtest chain of {} blocks (seed {})",
        args.blocks, args.seed
    );
    let started = Instant::now();
    let chain = SimChain::generate(params, args.blocks).context("generating the chain")?;
    let generated = started.elapsed();
    let stats = chain.stats();
    let tip = chain.tip();

    println!();
    println!(
        "  tip                  {} at height {}",
        tip.hash, tip.height
    );
    println!("  blocks               {}", stats.height + 1);
    println!("  transactions         {}", stats.transactions);
    println!("  outputs              {}", stats.outputs);
    println!(
        "  block bytes          {:.1} MB",
        stats.block_bytes as f64 / 1e6
    );
    println!(
        "  filter elements      min {} / mean {:.0} / max {}",
        stats.min_filter_elements, stats.mean_filter_elements, stats.max_filter_elements
    );
    println!(
        "  filter bytes         {:.1} MB",
        stats.filter_bytes as f64 / 1e6
    );
    println!("  generated in         {:.2} s", generated.as_secs_f64());

    // Read it back through the ChainSource trait, as the manager will, and
    // record the loop's starting point in a fresh lockstep database.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let source: std::sync::Arc<dyn ChainSource> = std::sync::Arc::new(chain.clone());
        let started = Instant::now();
        let mut filter_bytes = 0usize;
        for height in 0..=tip.height {
            let hash = source.block_hash(height).await?;
            filter_bytes += source.filter(hash).await?.len();
        }
        println!(
            "  read every filter    {:.1} MB in {:.0} ms through ChainSource",
            filter_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64() * 1e3
        );

        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default())?;
        store
            .write(move |tx| {
                tx.set_tip(tip.height, &tip.hash.to_byte_array())?;
                tx.put_block_hash(tip.height, &tip.hash.to_byte_array())
            })
            .await?;
        let stored = store.read(|tx| tx.tip()).await?;
        println!(
            "  database tip         height {} in {}",
            stored.map_or(0, |t| t.0),
            dir.path().join("lockstep.db").display()
        );
        anyhow::Ok(())
    })?;

    if let Some(path) = args.save {
        chain
            .save(&path)
            .with_context(|| format!("saving to {}", path.display()))?;
        println!(
            "  saved to             {} ({:.1} MB)",
            path.display(),
            std::fs::metadata(&path)?.len() as f64 / 1e6
        );
    }
    Ok(())
}
