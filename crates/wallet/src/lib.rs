//! Descriptor wallets whose whole state lives in the shared database.
//!
//! A [`Wallet`] is made from two ranged output descriptors
//! ([`WalletDescriptors`]: external and internal keychains, parsed and
//! checked with `miniscript`: network, range, derivability) and is stored
//! through `lockstep-store` as rows keyed by its wallet id, so the manager
//! can make many wallets change inside one database transaction. It never
//! talks to the chain.
//!
//! It owns: descriptors with typed errors (derivation checked against the
//! BIP84, BIP86 and BIP341 vectors); a persisted lookahead window that
//! moves forward the moment an index is used; coins, ingest of routed
//! transactions and its exact inverse (disconnect); coin selection under
//! locks; PSBT signing; private descriptors encrypted at rest; and the
//! registry that keeps one live instance of each wallet per process.

mod descriptor;
mod grown;
mod live;
mod live_actions;
mod registry;
mod secrets;
mod selection;
mod signing;
mod wallet;

#[cfg(test)]
mod oracle_tests;
#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod selection_tests;
#[cfg(test)]
mod signing_tests;
#[cfg(test)]
mod tests;

pub use descriptor::{DescriptorError, Keychain, WalletDescriptors};
pub use live::{CoinInfo, CoinState, KeychainInfo, LiveWallet, Pin, Revealed, StagedWallet};
pub use live_actions::{BroadcastChange, CoinChoice, Release};
pub use registry::{DEFAULT_CAPACITY, Registry, RegistryStats};
pub use selection::{Selection, SpendRequest};
pub use wallet::{
    Balance, Coin, DEFAULT_LOOKAHEAD, FirstScripts, HistoryTx, IngestSummary, NewScripts, Wallet,
    WalletError, WalletParams, decode_stored,
};
