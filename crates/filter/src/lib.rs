//! BIP158 basic-filter matching for the aggregate watchlist of every wallet.
//! No I/O.
//!
//! For each block lockstep asks one question for all wallets at once: which
//! watched scripts may be in this block? [`BasicFilter::decode`] reads the
//! block's filter once (typed errors for anything malformed);
//! [`matches`] / [`matches_parallel`] hash every script of a [`Watchlist`]
//! (or of a [`Watchlist::subset`]) with the block's key and return the ids
//! that hit, so the manager can route to their owners and count false
//! positives. Hashing each watched script once per block is the unavoidable
//! floor ([`hash_floor`]); everything else is kept to a small fraction of
//! it. [`scan_block`] is the other side of the trade-off: a cost that grows
//! with the block rather than the watchlist.
//!
//! Design choices and their measured costs are in docs/benchmarks.md.

mod block;
mod gcs;
mod matcher;
mod siphash;
mod watchlist;

#[cfg(test)]
mod tests;

pub use block::scan_block;
pub use gcs::{BasicFilter, DENSE_FROM, DecodeFilterError, M, P};
pub use matcher::{hash_floor, matches, matches_parallel};
pub use siphash::{LANES, for_each_block, push_message, siphash24, words_per_message};
pub use watchlist::{ScriptId, Watchlist};
