//! Fixtures shared by lockstep's criterion benchmarks.
//!
//! Large chains are generated once and cached under `target/lockstep-bench/`
//! (see [`SimChain::load_or_generate`]), so a benchmark run measures the
//! operation, not the chain's generation.

use std::path::PathBuf;

use lockstep_chain::{SimChain, SimParams};

/// Where cached benchmark chains live: `target/lockstep-bench/`.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("lockstep-bench")
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
