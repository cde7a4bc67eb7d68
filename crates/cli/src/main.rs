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

mod demo;
mod sends;
mod source;

use clap::{Parser, Subcommand};
use lockstep_sim::{SimChain, SimParams};

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
            runtime.block_on(demo::run(args))
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
