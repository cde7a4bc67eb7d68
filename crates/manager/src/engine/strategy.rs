//! The matching strategy: the cost model that measures what a block costs
//! on the filter path and on the block path, and the switch between them.
//! Apart from the loop's driving so that the arithmetic (and its test) can
//! be read alone.

use super::Engine;
use crate::config::Strategy;
use crate::events::Counters;
use crate::pipeline::Path;

/// A running average of one path's cost per block, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ema {
    value: f64,
    samples: u32,
}

impl Ema {
    pub(super) fn add(&mut self, nanos: u64) {
        self.samples += 1;
        let alpha = 1.0 / f64::from(self.samples.min(64));
        self.value += alpha * (nanos as f64 - self.value);
    }
}

/// The measured costs behind the per-block strategy. Fetches overlap (the
/// pipeline keeps many in flight), so what limits throughput is CPU, and for
/// a remote source the link: the filter path costs decoding and hashing
/// every watched script; the block path costs checking and routing every
/// block, and moving every block over the link.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostModel {
    /// CPU per block of decoding and matching a filter.
    pub(super) filter: Ema,
    /// Watched scripts when `filter` was last measured (it grows with them).
    pub(super) filter_scripts: usize,
    /// Wall time of a block request.
    pub(super) block_fetch: Ema,
    /// CPU per block of checking a block against its header.
    pub(super) block_check: Ema,
    /// CPU of routing a block that touches no wallet.
    pub(super) route: Ema,
}

impl CostModel {
    /// The path the next blocks should take, from `path`, with `scripts`
    /// watched: the block path is taken only from a local source and when
    /// it is a quarter cheaper, and left the same way.
    fn next_path(&self, path: Path, scripts: usize) -> Path {
        if self.block_check.samples < 8 || self.filter.samples == 0 {
            return path;
        }
        // Filter cost grows with the watchlist; scale the last measurement.
        let filter = self.filter.value * scripts.max(1) as f64 / self.filter_scripts.max(1) as f64;
        let block = self.block_check.value + self.route.value;
        let local = self.block_fetch.value < LOCAL_BLOCK_FETCH_NS;
        match path {
            Path::Filters if local && block * 1.25 < filter => Path::Blocks,
            Path::Blocks if !local || block > filter * 1.25 => Path::Filters,
            path => path,
        }
    }
}

/// A block request answered faster than this comes from a source in the
/// process or next door, where moving a whole block costs next to nothing;
/// a slower one crosses a network, and the filter path stays (fetching
/// every block would move ~100× the bytes of its filter).
const LOCAL_BLOCK_FETCH_NS: f64 = 200_000.0;

impl Engine {
    /// Switches between the filter and the block path when the measured
    /// costs cross (by a quarter either way, so that noise does not flip
    /// it), and says so in the log. The block path is only taken from a
    /// source that answers a block request at once.
    pub(super) fn choose_path(&mut self) {
        if self.config.strategy != Strategy::Auto {
            return;
        }
        let scripts = self.books.as_ref().map_or(0, |b| b.watch.len());
        let next = self.cost.next_path(self.path, scripts);
        if next != self.path {
            tracing::info!(
                from = ?self.path,
                to = ?next,
                watched_scripts = scripts,
                cost = ?self.cost,
                "matching strategy switched"
            );
            Counters::add(&self.out.counters.strategy_switches, 1);
            self.path = next;
        }
    }
}

/// The path a scan starts on: filters, unless blocks are forced.
pub(super) fn initial_path(strategy: Strategy) -> Path {
    match strategy {
        Strategy::Blocks => Path::Blocks,
        Strategy::Auto | Strategy::Filters => Path::Filters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cost model measured `samples` times at these per-block costs.
    fn measured(
        filter_ns: u64,
        scripts: usize,
        block_fetch_ns: u64,
        block_check_ns: u64,
    ) -> CostModel {
        let mut cost = CostModel::default();
        for _ in 0..10 {
            cost.filter.add(filter_ns);
            cost.block_fetch.add(block_fetch_ns);
            cost.block_check.add(block_check_ns);
            cost.route.add(0);
        }
        cost.filter_scripts = scripts;
        cost
    }

    #[test]
    fn the_block_path_is_taken_past_the_crossover_from_a_local_source_only() {
        // Matching 100,000 scripts costs 900 µs; checking a block 400 µs.
        let local = measured(900_000, 100_000, 5_000, 400_000);
        assert_eq!(local.next_path(Path::Filters, 100_000), Path::Blocks);
        // A small watchlist: the filter path stays.
        assert_eq!(local.next_path(Path::Filters, 10_000), Path::Filters);
        // Within a quarter of each other: no switch either way.
        assert_eq!(local.next_path(Path::Filters, 50_000), Path::Filters);
        assert_eq!(local.next_path(Path::Blocks, 50_000), Path::Blocks);
        // The watchlist shrank far enough: back to filters.
        assert_eq!(local.next_path(Path::Blocks, 20_000), Path::Filters);
        // A remote source (a block takes 5 ms to arrive): never blocks,
        // and back to filters at once.
        let remote = measured(900_000, 100_000, 5_000_000, 400_000);
        assert_eq!(remote.next_path(Path::Filters, 1_000_000), Path::Filters);
        assert_eq!(remote.next_path(Path::Blocks, 1_000_000), Path::Filters);
        // Too few measurements: stay.
        assert_eq!(
            CostModel::default().next_path(Path::Filters, 1_000_000),
            Path::Filters
        );
    }
}
