//! lockstep keeps many Bitcoin wallets in sync with one chain.
//!
//! This facade is what node software depends on: it re-exports the crates
//! that make up lockstep, each with one job.
//!
//! - [`chain`]: the `ChainSource` trait and the embedded simulated regtest
//!   chain, [`chain::SimChain`];
//! - [`store`]: the one SQLite database that holds every wallet;
//! - [`filter`], [`wallet`], [`manager`]: the matcher, the wallets, the one
//!   chain loop for all of them;
//! - [`dispatcher`], [`actions`]: action slots and durable actions, filled
//!   in by their issues.

pub use lockstep_actions as actions;
pub use lockstep_chain as chain;
pub use lockstep_dispatcher as dispatcher;
pub use lockstep_filter as filter;
pub use lockstep_manager as manager;
pub use lockstep_store as store;
pub use lockstep_wallet as wallet;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
