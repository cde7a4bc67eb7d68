//! Fixtures shared by lockstep's benchmarks (criterion's, and the sync
//! benchmark's own harness).
//!
//! Large chains are generated once and cached under `target/lockstep-bench/`
//! (see [`SimChain::load_or_generate`]), so a benchmark run measures the
//! operation, not the chain's generation.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use bitcoin::{Amount, ScriptBuf};
use lockstep_sim::{SimChain, SimParams};

/// Where cached benchmark chains live: `target/lockstep-bench/`.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("lockstep-bench")
}

/// `n` with thousands separated by commas (`100,000`), for reports.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The machine's load average over the last minute, from `/proc/loadavg`
/// (`?` where there is none).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Ends a benchmark's markdown report with its run time (from `begun`)
/// and the load average, prints it and writes it to
/// `target/lockstep-bench/<file>`.
pub fn publish_report(mut out: String, file: &str, begun: Instant) {
    let _ = writeln!(
        out,
        "\nTotal run time {:.0} s; load average (1 min) at the end {}.",
        begun.elapsed().as_secs_f64(),
        load_average()
    );
    println!("{out}");
    let path = cache_dir().join(file);
    let _ = std::fs::create_dir_all(cache_dir());
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

/// Parameters of the standard benchmark chain: unsigned, 400 background
/// transactions of 1 to 3 outputs per block, so filters past the first
/// hundred blocks hold around 1,300 elements.
pub fn standard_params() -> SimParams {
    SimParams::unsigned(2026).with_load(400..=400, 1..=3)
}

/// Height of the standard benchmark chain.
pub const STANDARD_HEIGHT: u32 = 2_000;

/// The standard benchmark chain (2,000 blocks), from the cache when there.
pub fn standard_chain() -> SimChain {
    let path = cache_dir().join("standard-2000.sim");
    SimChain::load_or_generate(&path, standard_params(), STANDARD_HEIGHT)
        .expect("generating the benchmark chain")
}

/// Seed of the sync benchmark's wallets
/// ([`lockstep_testkit::oracle::test_descriptors`]`(SYNC_WALLET_SEED, index)`).
pub const SYNC_WALLET_SEED: u64 = 6;

/// Wallets the sync benchmark's chain pays (indexes `0..SYNC_WALLETS`).
pub const SYNC_WALLETS: u32 = 100;

/// Payments to each wallet in the sync benchmark's chain.
pub const SYNC_PAYMENTS_PER_WALLET: u32 = 3;

/// The first height the sync benchmark scans. Below it (coinbases mature at
/// 101) the simulator has little to spend and filters hold few elements;
/// from it on, every filter holds over 1,000.
pub const SYNC_FROM: u32 = 102;

/// The sync benchmark's chain height: 2,000 blocks scanned.
pub const SYNC_HEIGHT: u32 = SYNC_FROM + 1_999;

/// The first height a payment may be scheduled at.
const SYNC_FIRST_PAYMENT: u32 = 120;

/// One payment the sync benchmark's chain makes to a wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPayment {
    /// The wallet's index (its test descriptors' index).
    pub wallet: u32,
    /// The external index paid.
    pub index: u32,
    /// The block that holds the payment.
    pub height: u32,
    /// The amount, in satoshis.
    pub sats: u64,
}

/// A splitmix64 step: deterministic pseudo-random numbers without a
/// dependency.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The payments of the sync benchmark's chain: [`SYNC_PAYMENTS_PER_WALLET`]
/// per wallet at deterministic pseudo-random heights from 120 to
/// [`SYNC_HEIGHT`], each to the wallet's next unused external index (0, 1,
/// 2, ...), as a wallet hands out addresses: each payment moves the
/// lookahead window by one script. (A payment far past the last used
/// index derives every script in between inside the block's transaction:
/// 30 to 60 µs each, see docs/benchmarks.md.)
pub fn sync_payments() -> Vec<SyncPayment> {
    let mut state = 0x5eed_0006_u64;
    let mut out = Vec::new();
    for wallet in 0..SYNC_WALLETS {
        let span = u64::from(SYNC_HEIGHT - SYNC_FIRST_PAYMENT + 1);
        let mut heights: Vec<u32> = (0..SYNC_PAYMENTS_PER_WALLET)
            .map(|_| SYNC_FIRST_PAYMENT + (splitmix(&mut state) % span) as u32)
            .collect();
        heights.sort_unstable();
        for (index, height) in heights.into_iter().enumerate() {
            let sats = 10_000 + splitmix(&mut state) % 990_000;
            out.push(SyncPayment {
                wallet,
                index: index as u32,
                height,
                sats,
            });
        }
    }
    out
}

/// The script a payment pays.
pub fn sync_payment_script(payment: &SyncPayment) -> ScriptBuf {
    lockstep_testkit::oracle::test_descriptors(SYNC_WALLET_SEED, payment.wallet)
        .script_at(lockstep_wallet::Keychain::External, payment.index)
        .expect("test descriptors derive")
}

/// The sync benchmark's chain: the standard parameters
/// ([`standard_params`]) mined to [`SYNC_HEIGHT`], with [`sync_payments`]
/// to the benchmark's wallets. Cached at
/// `target/lockstep-bench/sync-2101.sim`; a cached file is used only if it
/// has these parameters, this height and every payment in its block.
pub fn sync_chain() -> SimChain {
    let path = cache_dir().join("sync-2101.sim");
    let payments: Vec<(SyncPayment, ScriptBuf)> = sync_payments()
        .into_iter()
        .map(|p| {
            let script = sync_payment_script(&p);
            (p, script)
        })
        .collect();
    if let Ok(chain) = SimChain::load(&path) {
        let holds = |(p, script): &(SyncPayment, ScriptBuf)| {
            chain.block_at(p.height).is_some_and(|block| {
                block.txdata.iter().any(|tx| {
                    tx.output
                        .iter()
                        .any(|o| o.script_pubkey == *script && o.value.to_sat() == p.sats)
                })
            })
        };
        if chain.params() == standard_params()
            && chain.height() == SYNC_HEIGHT
            && payments.iter().all(holds)
        {
            return chain;
        }
        eprintln!("{} is stale: generating it again", path.display());
    }
    eprintln!(
        "generating the sync benchmark's chain ({SYNC_HEIGHT} blocks, {} payments to wallets); cached afterwards",
        payments.len()
    );
    let chain = SimChain::new(standard_params());
    for (p, script) in payments {
        chain
            .schedule_payment(p.height, script, Amount::from_sat(p.sats))
            .expect("payments are scheduled above the tip");
    }
    chain
        .mine_to(SYNC_HEIGHT)
        .expect("mining the sync benchmark's chain");
    let _ = std::fs::create_dir_all(cache_dir());
    if let Err(e) = chain.save(&path) {
        eprintln!("could not cache the chain at {}: {e}", path.display());
    }
    chain
}
