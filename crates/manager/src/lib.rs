//! The one chain loop for all wallets: aggregate matching, one database
//! transaction per block, stop-the-world import, reorgs and restart.
//!
//! Filled in by the manager issue (#6).
