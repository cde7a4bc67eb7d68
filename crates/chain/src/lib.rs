//! Where lockstep's chain data comes from.
//!
//! - [`ChainSource`]: the async, object-safe trait the manager's one chain
//!   loop reads through (tip, hashes, headers, BIP158 filters and BIP157
//!   filter headers, blocks) and broadcasts through, with typed errors that
//!   say whether retrying helps.
//! - [`BitcoindSource`]: Bitcoin Core as a source, through its REST
//!   interface and JSON-RPC.
//! - [`core_format`]: the Core wire formats BitcoindSource reads (RPC error
//!   codes, reject strings, the REST filter encoding), shared with
//!   lockstep-sim's stand-in node so both sides speak the same contract.
//! - [`block_checks`]: a block against its header's commitments, fast
//!   enough for every block fetched.
//! - [`filters`]: building BIP158 basic filters and chaining their headers
//!   (rust-bitcoin's reference construction, tested on Bitcoin Core's
//!   vectors).
//! - [`metered`]: a source wrapper that counts and shapes requests.
//!
//! The simulated regtest chain and the stand-in node live in
//! `lockstep-sim`, which builds on this crate.
//!
//! # Features
//!
//! - `zmq` (off by default): [`BitcoindSource`] subscribes to Core's ZMQ
//!   `rawtx` notifications when given an endpoint
//!   (`BitcoindConfig::with_zmq_rawtx`), so new transactions wake the
//!   manager's mempool poll at once. It brings the `zeromq` crate. Without
//!   it the mempool is polled on the manager's schedule, and the option is
//!   not there to be set, so a configuration never asks for a feed it
//!   cannot have.

mod bitcoind;
pub mod block_checks;
pub mod core_format;
pub mod filters;
pub mod metered;
mod source;

pub use bitcoind::{
    BitcoindAuth, BitcoindConfig, BitcoindError, BitcoindSource, LOOP_TURNS, RpcFailure,
};
pub use lockstep_error::ErrorKind;
pub use source::{
    BlockId, BroadcastError, ChainSource, FeeRule, InvalidTx, MAX_REPLACEMENTS, Missing,
    RejectReason, SourceError,
};
