//! Matching one decoded filter against a watchlist, on one core or spread
//! across several.

use rayon::prelude::*;

use crate::gcs::BasicFilter;
use crate::siphash::{LANES, for_each_block, for_each_probe_hit};
use crate::watchlist::{Group, ScriptId, Watchlist};

/// Scripts per parallel task: large enough that splitting costs nothing
/// measurable next to hashing them (~20 ns each).
const CHUNK: usize = 16_384;

/// Which watched scripts the filter probably contains (each at a false
/// positive rate of 1/M; never a false negative), in no particular order.
pub fn matches<O: Copy + Eq>(filter: &BasicFilter, watchlist: &Watchlist<O>) -> Vec<ScriptId> {
    let mut out = Vec::new();
    if filter.is_empty() {
        return out;
    }
    for group in &watchlist.groups {
        match_group(filter, group, 0, group.ids.len(), &mut out);
    }
    out
}

/// As [`matches`], spread over the rayon thread pool when the watchlist is
/// large enough for that to pay.
pub fn matches_parallel<O: Copy + Eq + Sync>(
    filter: &BasicFilter,
    watchlist: &Watchlist<O>,
) -> Vec<ScriptId> {
    if watchlist.len() < 2 * CHUNK || filter.is_empty() || rayon::current_num_threads() < 2 {
        return matches(filter, watchlist);
    }
    let tasks: Vec<(&Group, usize, usize)> = watchlist
        .groups
        .iter()
        .flat_map(|g| {
            (0..g.ids.len())
                .step_by(CHUNK)
                .map(move |start| (g, start, (start + CHUNK).min(g.ids.len())))
        })
        .collect();
    tasks
        .into_par_iter()
        .map(|(group, start, end)| {
            let mut out = Vec::new();
            match_group(filter, group, start, end, &mut out);
            out
        })
        .reduce(Vec::new, |mut a, mut b| {
            a.append(&mut b);
            a
        })
}

/// Scripts `start..end` of one length group (`start` a multiple of
/// [`LANES`]).
#[inline]
fn match_group(
    filter: &BasicFilter,
    group: &Group,
    start: usize,
    end: usize,
    out: &mut Vec<ScriptId>,
) {
    debug_assert_eq!(start % LANES, 0);
    let (k0, k1) = filter.keys();
    let blocks = start / LANES..end.div_ceil(LANES);
    let probe = filter.probe();
    for_each_probe_hit(
        k0,
        k1,
        &group.words,
        group.per_message(),
        blocks,
        &probe,
        |b, lanes, mapped| confirm_hits(filter, group, end, b, mapped, lanes, out),
    );
}

/// The lanes of block `b` that passed the bitmap test: one in ~32 per
/// script, so kept out of the hashing loop.
#[inline(never)]
fn confirm_hits(
    filter: &BasicFilter,
    group: &Group,
    end: usize,
    b: usize,
    mapped: &[u64; LANES],
    mut hits: u32,
    out: &mut Vec<ScriptId>,
) {
    while hits != 0 {
        let lane = hits.trailing_zeros() as usize;
        hits &= hits - 1;
        let i = b * LANES + lane;
        if i < end && filter.contains_value(mapped[lane]) {
            out.push(group.ids[i]);
        }
    }
}

/// The floor of filter matching: hashing every watched script with the
/// block's keys and nothing else (the same kernel and layout as
/// [`matches`]). Benchmarks compare [`matches`] with it.
pub fn hash_floor<O: Copy + Eq>(k0: u64, k1: u64, watchlist: &Watchlist<O>) -> u64 {
    let mut acc = 0u64;
    for group in &watchlist.groups {
        for_each_block(
            k0,
            k1,
            &group.words,
            group.per_message(),
            0..group.blocks(),
            |_, hashes| {
                for h in hashes {
                    acc = acc.wrapping_add(*h);
                }
            },
        );
    }
    acc
}
