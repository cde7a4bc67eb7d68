//! Descriptor wallets whose whole state lives in the shared database: scripts
//! and lookahead, coins, ingest and its exact inverse, coin selection, signing
//! and coin locks.
//!
//! Filled in by the wallet issue (#5).
