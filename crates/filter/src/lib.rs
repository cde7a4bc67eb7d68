//! BIP158 basic-filter decoding and matching against the aggregate watchlist of
//! every wallet. No I/O.
//!
//! This crate is filled in by the filter issue (#4); until then it holds only
//! this description so that the workspace's dependency graph is in place.
