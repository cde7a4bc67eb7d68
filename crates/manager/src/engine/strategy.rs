//! The matching strategy: the cost model that measures what a block costs
//! on the filter path and on the block path, and the switch between them.
//! Apart from the loop's driving so that the arithmetic (and its test) can
//! be read alone.

use super::Engine;
use crate::config::Strategy;
use crate::events::Counters;
use crate::pipeline::Path;

/// A running average of one path's cost per block (nanoseconds, or bytes).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ema {
    value: f64,
    samples: u32,
}

impl Ema {
    pub(super) fn add(&mut self, sample: u64) {
        self.samples += 1;
        let alpha = 1.0 / f64::from(self.samples.min(64));
        self.value += alpha * (sample as f64 - self.value);
    }
}

/// The measured costs behind the per-block strategy. Fetches overlap (the
/// pipeline keeps many in flight), so what limits throughput is CPU, and for
/// a remote source the link: the filter path costs decoding and hashing
/// every watched script, and moving a filter; the block path costs checking
/// and routing every block, and moving every whole block (about 30 times a
/// filter's bytes on a loaded chain).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostModel {
    /// CPU per block of decoding and matching a filter.
    pub(super) filter: Ema,
    /// Watched scripts when `filter` was last measured (it grows with them).
    pub(super) filter_scripts: usize,
    /// Bytes of a filter as served.
    pub(super) filter_bytes: Ema,
    /// Wall time of a block request.
    pub(super) block_fetch: Ema,
    /// CPU per block of checking a block against its header.
    pub(super) block_check: Ema,
    /// Bytes of a whole block as served.
    pub(super) block_bytes: Ema,
    /// CPU of routing a block that touches no wallet.
    pub(super) route: Ema,
    /// Consecutive decisions that found the other path cheaper (see
    /// [`CONFIRM_SWITCH`]).
    pub(super) leaning: u32,
}

impl CostModel {
    /// The estimated cost per block of the filter path and of the block
    /// path with `scripts` watched, in nanoseconds: CPU as measured, plus
    /// every byte fetched at [`fetched_byte_ns`](Self::fetched_byte_ns).
    /// `None` until both paths have been measured.
    fn per_block(&self, scripts: usize) -> Option<(f64, f64)> {
        if self.block_check.samples < 8 || self.filter.samples == 0 {
            return None;
        }
        let byte = self.fetched_byte_ns();
        // Filter cost grows with the watchlist; scale the last measurement.
        let filter = self.filter.value * scripts.max(1) as f64 / self.filter_scripts.max(1) as f64
            + self.filter_bytes.value * byte;
        let block = self.block_check.value + self.route.value + self.block_bytes.value * byte;
        Some((filter, block))
    }

    /// What a fetched byte costs: what block requests took per byte, but no
    /// less than [`HOST_BYTE_NS`]. A source in the process hands over a
    /// shared block for nothing, but a real node (Bitcoin Core, even on the
    /// same host) sends every byte over a socket to be read and decoded.
    fn fetched_byte_ns(&self) -> f64 {
        let measured = if self.block_bytes.value > 0.0 {
            self.block_fetch.value / self.block_bytes.value
        } else {
            0.0
        };
        measured.max(HOST_BYTE_NS)
    }

    /// The path the next blocks should take, from `path`, with `scripts`
    /// watched. The block path is taken only from a local source, when it
    /// is a quarter cheaper, and at the [`CONFIRM_SWITCH`]th decision in a
    /// row that finds so; it is left the same way. The two bands and the
    /// confirmation are the hysteresis: costs measured on a busy machine
    /// drift by tens of percent from one batch to the next, and a switch
    /// on one noisy estimate made runs of the same sync fetch 460 blocks
    /// one time and 1,500 the next.
    fn next_path(&mut self, path: Path, scripts: usize) -> Path {
        let Some((filter, block)) = self.per_block(scripts) else {
            return path;
        };
        let local = self.block_fetch.value < LOCAL_BLOCK_FETCH_NS;
        let other = match path {
            Path::Filters if local && block * 1.25 < filter => Path::Blocks,
            Path::Blocks if !local || block > filter * 1.25 => Path::Filters,
            path => path,
        };
        if other == path {
            self.leaning = 0;
            return path;
        }
        // A remote source leaves the block path at once: every block
        // crosses the network.
        self.leaning += 1;
        if self.leaning >= CONFIRM_SWITCH || !local {
            self.leaning = 0;
            return other;
        }
        path
    }
}

/// Decisions in a row (one after each committed batch, 250 blocks by
/// default) that must find the other path cheaper before the loop switches.
const CONFIRM_SWITCH: u32 = 2;

/// A block request answered faster than this comes from a source in the
/// process or next door, where moving a whole block costs next to nothing;
/// a slower one crosses a network, and the filter path stays (fetching
/// every block would move ~30× the bytes of its filter).
const LOCAL_BLOCK_FETCH_NS: f64 = 200_000.0;

/// The least a fetched byte costs the host from a real node: decoding it
/// into a block, before reading it off a socket is even counted.
/// Deserialising a 162 kB block took 289 µs here (`cargo xtask bench
/// filter`, "full block"; docs/benchmarks.md).
const HOST_BYTE_NS: f64 = 1.8;

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

    /// Per-block costs as the loop measures them.
    struct Costs {
        filter_ns: u64,
        scripts: usize,
        filter_bytes: u64,
        block_fetch_ns: u64,
        block_check_ns: u64,
        block_bytes: u64,
    }

    /// Matching 100,000 scripts costs 900 µs and a 4 kB filter (7 µs at
    /// [`HOST_BYTE_NS`]); checking a block 400 µs and its 100 kB (180 µs);
    /// a source that answers a block in 5 µs.
    const LOCAL: Costs = Costs {
        filter_ns: 900_000,
        scripts: 100_000,
        filter_bytes: 4_000,
        block_fetch_ns: 5_000,
        block_check_ns: 400_000,
        block_bytes: 100_000,
    };

    /// A cost model measured ten times at these costs.
    fn measured(c: &Costs) -> CostModel {
        let mut cost = CostModel::default();
        for _ in 0..10 {
            cost.filter.add(c.filter_ns);
            cost.filter_bytes.add(c.filter_bytes);
            cost.block_fetch.add(c.block_fetch_ns);
            cost.block_check.add(c.block_check_ns);
            cost.block_bytes.add(c.block_bytes);
            cost.route.add(0);
        }
        cost.filter_scripts = c.scripts;
        cost
    }

    /// The path after `decisions` decisions in a row from `path`.
    fn after(cost: &mut CostModel, path: Path, scripts: usize, decisions: u32) -> Path {
        (0..decisions).fold(path, |path, _| cost.next_path(path, scripts))
    }

    #[test]
    fn the_block_path_is_taken_past_the_crossover_from_a_local_source_only() {
        // 100,000 scripts: filters 907 µs a block, blocks 580 µs.
        let mut local = measured(&LOCAL);
        assert_eq!(after(&mut local, Path::Filters, 100_000, 2), Path::Blocks);
        // A small watchlist: the filter path stays.
        assert_eq!(after(&mut local, Path::Filters, 10_000, 5), Path::Filters);
        // Within a quarter of each other: no switch either way.
        assert_eq!(after(&mut local, Path::Filters, 60_000, 5), Path::Filters);
        assert_eq!(after(&mut local, Path::Blocks, 60_000, 5), Path::Blocks);
        // The watchlist shrank far enough: back to filters.
        assert_eq!(after(&mut local, Path::Blocks, 20_000, 2), Path::Filters);
        // A remote source (a block takes 5 ms to arrive): never blocks,
        // and back to filters at the first decision.
        let mut remote = measured(&Costs {
            block_fetch_ns: 5_000_000,
            ..LOCAL
        });
        assert_eq!(
            after(&mut remote, Path::Filters, 1_000_000, 5),
            Path::Filters
        );
        assert_eq!(remote.next_path(Path::Blocks, 1_000_000), Path::Filters);
        // Too few measurements: stay.
        assert_eq!(
            CostModel::default().next_path(Path::Filters, 1_000_000),
            Path::Filters
        );
    }

    #[test]
    fn a_whole_blocks_bytes_count_against_the_block_path() {
        // 1 MB blocks: checking one costs 400 µs of CPU, less than half of
        // matching the filter (900 µs), but its bytes cost 1.8 ms more: the
        // filter path stays. Counting CPU alone would switch.
        let mut big = measured(&Costs {
            block_bytes: 1_000_000,
            ..LOCAL
        });
        assert_eq!(after(&mut big, Path::Filters, 100_000, 5), Path::Filters);
        // On the block path, it leaves.
        assert_eq!(after(&mut big, Path::Blocks, 100_000, 2), Path::Filters);
        // Bytes are charged at what block requests took per byte when that
        // is more than the floor. Checking a 50 kB block costs 600 µs: at
        // the floor (1.8 ns a byte) a block costs 690 µs, more than a
        // quarter under the filter's 907 µs; but a block that took 150 µs
        // to arrive (3 ns a byte) costs 750 µs, and the filter path stays.
        let heavy = Costs {
            block_check_ns: 600_000,
            block_bytes: 50_000,
            ..LOCAL
        };
        let mut fast = measured(&heavy);
        assert!((fast.fetched_byte_ns() - HOST_BYTE_NS).abs() < 1e-9);
        assert_eq!(after(&mut fast, Path::Filters, 100_000, 2), Path::Blocks);
        let mut slow = measured(&Costs {
            block_fetch_ns: 150_000,
            ..heavy
        });
        assert!((slow.fetched_byte_ns() - 3.0).abs() < 1e-9);
        assert_eq!(after(&mut slow, Path::Filters, 100_000, 5), Path::Filters);
    }

    #[test]
    fn one_decision_alone_does_not_switch() {
        let mut local = measured(&LOCAL);
        // The first decision that finds blocks cheaper only leans.
        assert_eq!(local.next_path(Path::Filters, 100_000), Path::Filters);
        // One that does not (a smaller watchlist) forgets the lean...
        assert_eq!(local.next_path(Path::Filters, 10_000), Path::Filters);
        assert_eq!(local.next_path(Path::Filters, 100_000), Path::Filters);
        // ...and the second in a row switches.
        assert_eq!(local.next_path(Path::Filters, 100_000), Path::Blocks);
        // The same way back.
        assert_eq!(local.next_path(Path::Blocks, 20_000), Path::Blocks);
        assert_eq!(local.next_path(Path::Blocks, 100_000), Path::Blocks);
        assert_eq!(local.next_path(Path::Blocks, 20_000), Path::Blocks);
        assert_eq!(local.next_path(Path::Blocks, 20_000), Path::Filters);
    }
}
