//! Per-wallet action slots: one exclusive action per wallet, deadlines in
//! blocks, early release, shared signer limits and the wallet registry.
//!
//! Filled in by a later issue.
