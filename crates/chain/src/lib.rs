//! Where lockstep's chain data comes from.
//!
//! - [`ChainSource`]: the async, object-safe trait the manager's one chain
//!   loop reads through (tip, hashes, headers, BIP158 filters and BIP157
//!   filter headers, blocks) and broadcasts through, with typed errors that
//!   say whether retrying helps.
//! - [`SimChain`]: the embedded regtest chain, deterministic from a seed,
//!   consensus valid in its signed mode, with background load, scripted
//!   payments, spends, a validating mempool that replaces by fee as Bitcoin
//!   Core does (full RBF), and reorgs. Its [`SimChain::truth`] is the oracle
//!   every wallet test compares with.
//! - [`BitcoindSource`]: Bitcoin Core as a source, through its REST
//!   interface and JSON-RPC.
//! - [`SimNode`]: a stand-in Core node serving a [`SimChain`] over HTTP in
//!   Core's formats, for tests, benchmarks and trying lockstep without a
//!   node.
//! - [`filters`]: building BIP158 basic filters and chaining their headers
//!   (rust-bitcoin's reference construction, tested on Bitcoin Core's
//!   vectors).
//! - [`verify`]: Bitcoin Core's script interpreter (`bitcoinconsensus` 0.106),
//!   Taproot included.

mod bitcoind;
pub mod block_checks;
pub mod core_format;
pub mod filters;
pub mod metered;
mod sim;
pub mod simnode;
mod source;
pub mod verify;

pub use bitcoind::{
    BitcoindAuth, BitcoindConfig, BitcoindError, BitcoindSource, LOOP_TURNS, RpcFailure,
};
pub use simnode::{Lie, SimNode, SimNodeConfig, SimNodeError};

pub use sim::{
    Accepted, ChainStats, Load, LoadError, MempoolTruth, PendingTruthTx, ReorgReport, ReorgTxs,
    SaveError, ScriptTotals, SignError, SimChain, SimError, SimMode, SimParams, SpentCoin, Truth,
    TruthCoin, TruthTx,
};
pub use source::{
    BlockId, BroadcastError, ChainSource, FeeRule, InvalidTx, MAX_REPLACEMENTS, Missing,
    RejectReason, SourceError, SourceErrorKind,
};
