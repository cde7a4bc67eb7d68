//! Test support for lockstep: what the demo, the end-to-end tests, the
//! crash test and the benchmarks share, kept out of the facade.
//!
//! - [`oracle`]: deterministic test wallets, and checking a wallet against
//!   the simulated chain's oracle.

pub mod oracle;
