//! The full-block matcher: the other side of the trade-off.
//!
//! Filter matching costs one SipHash per *watched* script per block, so it
//! grows with the watchlist. Scanning the block itself looks up each of the
//! block's output scripts and spent scripts in the watchlist's hash map (a
//! key fixed for the watchlist's life, not per block), so it grows with the
//! block instead. Past the crossover measured in `benches/benches/filter.rs`
//! (see docs/benchmarks.md) the manager fetches blocks and scans them.

use bitcoin::{Block, Script};

use crate::watchlist::{ScriptId, Watchlist};

/// Which watched scripts `block` touches: those its outputs pay and those
/// of the outputs it spends (`spent`, the scripts of its inputs' prevouts,
/// which a block does not carry). Each id appears once.
pub fn scan_block<'a, O: Copy + Eq>(
    block: &'a Block,
    spent: impl IntoIterator<Item = &'a Script>,
    watchlist: &Watchlist<O>,
) -> Vec<ScriptId> {
    let mut out = Vec::new();
    let outputs = block
        .txdata
        .iter()
        .flat_map(|tx| tx.output.iter().map(|o| o.script_pubkey.as_script()));
    for script in outputs.chain(spent) {
        if let Some(id) = watchlist.id_of(script.as_bytes()) {
            out.push(id);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
