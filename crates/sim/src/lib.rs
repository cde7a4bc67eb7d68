//! lockstep's simulated chain: everything that stands in for the Bitcoin
//! network in tests, benchmarks and the demo.
//!
//! - [`SimChain`]: the embedded regtest chain, deterministic from a seed,
//!   consensus valid in its signed mode, with background load, scripted
//!   payments, spends, a validating mempool that replaces by fee as Bitcoin
//!   Core does (full RBF), and reorgs. It is a
//!   [`ChainSource`](lockstep_chain::ChainSource); its [`SimChain::truth`]
//!   is the oracle every wallet test compares with.
//! - [`SimNode`]: a stand-in Core node serving a [`SimChain`] over HTTP in
//!   Core's REST and JSON-RPC formats (those of
//!   [`lockstep_chain::core_format`], the ones
//!   [`BitcoindSource`](lockstep_chain::BitcoindSource) reads), for tests,
//!   benchmarks and trying lockstep without a node.
//! - [`verify`]: Bitcoin Core's script interpreter (`bitcoinconsensus` 0.106),
//!   Taproot included, which the simulated mempool validates with.
//!
//! It depends on `lockstep-chain` (the contract it implements), never the
//! other way: an embedder's build carries none of the simulator's
//! dependencies (`rand`, hyper's server, `bitcoinconsensus`).
//!
//! # Features
//!
//! - `zmq` (off by default): [`SimNode`] can publish each transaction
//!   entering the mempool on a ZMQ `rawtx` endpoint, as Core's
//!   `-zmqpubrawtx` does (`SimNodeConfig::zmq_rawtx`). It brings the
//!   `zeromq` crate; a client's side of it is `lockstep-chain/zmq`.

mod sim;
pub mod simnode;
pub mod verify;

pub use simnode::{Lie, SimNode, SimNodeConfig, SimNodeError};

pub use sim::{
    Accepted, ChainStats, Load, LoadError, MempoolTruth, PendingTruthTx, ReorgReport, ReorgTxs,
    SaveError, ScriptTotals, SignError, SimChain, SimError, SimMode, SimParams, SpentCoin, Truth,
    TruthCoin, TruthTx,
};
