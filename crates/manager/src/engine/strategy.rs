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
/// every block and moving it (about 30 times a filter's bytes on a loaded
/// chain), and routing every block's transactions to the wallets.
///
/// Where the work runs matters as much as how much there is: a filter is
/// decoded and matched, and a block checked and received, in its fetch
/// task, many blocks at once over every core; but routing runs in the
/// batch's one write transaction, one block after another. The estimate
/// of each path is the wall time per block that follows.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostModel {
    /// Threads the per-block work of the fetch tasks spreads over (rayon's
    /// pool, which is where the heavy part of it runs).
    pub(super) cores: usize,
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
    /// CPU of routing a block that touches no wallet (the writer thread's
    /// CPU time, not wall time).
    pub(super) route: Ema,
    /// The share of blocks on the filter path whose filter matched, so
    /// that the block was fetched too, in [`FRACTION_ONE`]ths: those cost
    /// the filter path what every block costs the block path. With 100
    /// wallets of 1,000 scripts, 460 of 2,000 (paying blocks and the
    /// filters' false positives).
    pub(super) filter_fetches: Ema,
    /// Consecutive decisions that found the other path cheaper (see
    /// [`CONFIRM_SWITCH`]).
    pub(super) leaning: u32,
}

impl CostModel {
    /// A model for fetch tasks spread over `cores` threads.
    pub(super) fn for_cores(cores: usize) -> CostModel {
        CostModel {
            cores,
            ..CostModel::default()
        }
    }

    /// The estimated wall time per block of the filter path and of the
    /// block path with `scripts` watched, in nanoseconds. Each fetch
    /// task's work (CPU as measured, plus every byte it fetches at what
    /// block requests took per byte) divides over [`cores`](Self::cores);
    /// routing does too, as CPU the cores share, but the block path can go
    /// no faster than routing one block after another on the writer
    /// thread. `None` until both paths have been measured.
    ///
    /// The reported 16-core machine: matching 100,000 scripts cost it
    /// about 1.2 ms a block, 75 µs over 16 cores, while routing each block
    /// on one thread takes hundreds of microseconds: it took the block
    /// path on CPU alone and ran at 1.95 times the floor plus blocks. On
    /// two cores the same filters cost 600 µs a block, and the block path
    /// is the faster one (the sync benchmark in the process, 100 wallets:
    /// 0.88 s against 1.21 s).
    fn per_block(&self, scripts: usize) -> Option<(f64, f64)> {
        if self.block_check.samples < 8 || self.filter.samples == 0 {
            return None;
        }
        let byte = self.fetched_byte_ns();
        let cores = self.cores.max(1) as f64;
        let whole_block = self.block_check.value + self.block_bytes.value * byte + self.route.value;
        // Filter cost grows with the watchlist; scale the last measurement.
        let filter = (self.filter.value * scripts.max(1) as f64
            / self.filter_scripts.max(1) as f64
            + self.filter_bytes.value * byte
            + self.filter_fetches.value / FRACTION_ONE as f64 * whole_block)
            / cores;
        let block = (whole_block / cores).max(self.route.value);
        Some((filter, block))
    }

    /// What a fetched byte costs: what block requests took per byte. A
    /// source in the process hands over a shared block for next to
    /// nothing; a node sends every byte over a socket to be read and
    /// decoded, and its requests take that long.
    fn fetched_byte_ns(&self) -> f64 {
        if self.block_bytes.value > 0.0 {
            self.block_fetch.value / self.block_bytes.value
        } else {
            0.0
        }
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

/// One, as [`CostModel::filter_fetches`] counts shares.
pub(super) const FRACTION_ONE: u64 = 1_000_000;

/// Decisions in a row (one after each committed batch, 250 blocks by
/// default) that must find the other path cheaper before the loop switches.
const CONFIRM_SWITCH: u32 = 2;

/// A block request answered faster than this comes from a source in the
/// process or next door, where moving a whole block costs next to nothing;
/// a slower one crosses a network, and the filter path stays (fetching
/// every block would move ~30× the bytes of its filter).
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

    /// Per-block costs as the loop measures them.
    struct Costs {
        cores: usize,
        filter_ns: u64,
        scripts: usize,
        filter_bytes: u64,
        block_fetch_ns: u64,
        block_check_ns: u64,
        block_bytes: u64,
        route_ns: u64,
        /// The share of filters that match, in [`FRACTION_ONE`]ths.
        matched_share: u64,
    }

    /// One core. Matching 100,000 scripts costs 900 µs and a 4 kB filter;
    /// checking a block 400 µs, and its 100 kB come from a source in the
    /// process in 5 µs (0.05 ns a byte); routing it next to nothing.
    const LOCAL: Costs = Costs {
        cores: 1,
        filter_ns: 900_000,
        scripts: 100_000,
        filter_bytes: 4_000,
        block_fetch_ns: 5_000,
        block_check_ns: 400_000,
        block_bytes: 100_000,
        route_ns: 0,
        matched_share: 0,
    };

    /// A cost model measured ten times at these costs.
    fn measured(c: &Costs) -> CostModel {
        let mut cost = CostModel::for_cores(c.cores);
        for _ in 0..10 {
            cost.filter.add(c.filter_ns);
            cost.filter_bytes.add(c.filter_bytes);
            cost.block_fetch.add(c.block_fetch_ns);
            cost.block_check.add(c.block_check_ns);
            cost.block_bytes.add(c.block_bytes);
            cost.route.add(c.route_ns);
            cost.filter_fetches.add(c.matched_share);
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
        // 100,000 scripts: filters 900 µs a block, blocks 405 µs.
        let mut local = measured(&LOCAL);
        assert_eq!(after(&mut local, Path::Filters, 100_000, 2), Path::Blocks);
        // A small watchlist: the filter path stays.
        assert_eq!(after(&mut local, Path::Filters, 10_000, 5), Path::Filters);
        // Within a quarter of each other (450 µs against 405): no switch
        // either way.
        assert_eq!(after(&mut local, Path::Filters, 50_000, 5), Path::Filters);
        assert_eq!(after(&mut local, Path::Blocks, 50_000, 5), Path::Blocks);
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
        // A local source that takes 150 µs for a 100 kB block (1.5 ns a
        // byte): checking it costs 600 µs of CPU, a third less than
        // matching the filter (900 µs), but with its bytes it costs
        // 750 µs, within a quarter: the filter path stays. Counting CPU
        // alone would switch.
        let costs = Costs {
            block_check_ns: 600_000,
            block_fetch_ns: 150_000,
            ..LOCAL
        };
        let mut slow = measured(&costs);
        assert!((slow.fetched_byte_ns() - 1.5).abs() < 1e-9);
        assert_eq!(after(&mut slow, Path::Filters, 100_000, 5), Path::Filters);
        // The same block in 5 µs: the block path.
        let mut fast = measured(&Costs {
            block_fetch_ns: 5_000,
            ..costs
        });
        assert_eq!(after(&mut fast, Path::Filters, 100_000, 2), Path::Blocks);
        // On the block path, a check of 950 µs alone stays (not a quarter
        // above the filter's 900 µs), but with its bytes (100 kB in
        // 199 µs) it leaves.
        let slower = Costs {
            block_check_ns: 950_000,
            block_fetch_ns: 199_000,
            ..costs
        };
        let mut free = measured(&Costs {
            block_fetch_ns: 0,
            ..slower
        });
        assert_eq!(after(&mut free, Path::Blocks, 100_000, 5), Path::Blocks);
        let mut slower = measured(&slower);
        assert_eq!(after(&mut slower, Path::Blocks, 100_000, 2), Path::Filters);
    }

    #[test]
    fn routing_on_one_thread_keeps_the_filter_path_on_many_cores() {
        // The reported machine: matching 100,000 scripts costs 1.2 ms a
        // block, checking one 150 µs, routing one 300 µs.
        let costs = Costs {
            cores: 16,
            filter_ns: 1_200_000,
            block_check_ns: 150_000,
            block_bytes: 135_000,
            route_ns: 300_000,
            ..LOCAL
        };
        // 16 cores: filters 75 µs a block, blocks no faster than routing
        // one after another, 300 µs. CPU alone (1.2 ms against 450 µs)
        // would take the block path.
        let mut many = measured(&costs);
        assert_eq!(after(&mut many, Path::Filters, 100_000, 5), Path::Filters);
        assert_eq!(after(&mut many, Path::Blocks, 100_000, 2), Path::Filters);
        // 2 cores: filters 600 µs a block, blocks 300 µs.
        let mut two = measured(&Costs { cores: 2, ..costs });
        assert_eq!(after(&mut two, Path::Filters, 100_000, 2), Path::Blocks);
    }

    #[test]
    fn blocks_the_filter_path_fetches_anyway_count_against_it() {
        // Two cores, 75,000 scripts. Matching a filter costs 675 µs; a
        // block 300 µs to check, 300 µs to route and 5 µs for its bytes:
        // 338 µs a block over two cores against 303 µs, within a quarter,
        // while no filter matches...
        let costs = Costs {
            cores: 2,
            block_check_ns: 300_000,
            route_ns: 300_000,
            ..LOCAL
        };
        let mut few = measured(&costs);
        assert_eq!(after(&mut few, Path::Filters, 75_000, 5), Path::Filters);
        // ...but when half of them match, so that those blocks are
        // fetched, checked and routed on the filter path as well, it costs
        // 489 µs a block: the block path.
        let mut many = measured(&Costs {
            matched_share: FRACTION_ONE / 2,
            ..costs
        });
        assert_eq!(after(&mut many, Path::Filters, 75_000, 2), Path::Blocks);
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
