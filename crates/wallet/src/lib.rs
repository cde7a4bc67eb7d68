//! Descriptor wallets whose whole state lives in the shared database.
//!
//! A [`Wallet`] is made from two ranged output descriptors
//! ([`WalletDescriptors`]: external and internal keychains, parsed and
//! checked with `miniscript`: network, range, derivability) and is stored
//! through `lockstep-store` as rows keyed by its wallet id, so the manager
//! can make many wallets change inside one database transaction. It never
//! talks to the chain.
//!
//! Built so far (issue #5, first step): descriptors with typed errors,
//! derivation checked against the BIP84, BIP86 and BIP341 vectors, and a
//! persisted lookahead window that moves forward the moment an index is
//! used. Coins, ingest and its inverse, coin selection, signing, encrypted
//! keys and coin locks follow.

mod descriptor;
mod grown;
mod live;
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
pub use live::{CoinInfo, CoinState, KeychainInfo, LiveWallet, Pin, Revealed};
pub use registry::{DEFAULT_CAPACITY, Registry, RegistryStats};
pub use selection::{Selection, SpendRequest};
pub use wallet::{
    Balance, Coin, DEFAULT_LOOKAHEAD, FirstScripts, HistoryTx, IngestSummary, NewScripts, Wallet,
    WalletError, WalletParams, decode_stored,
};
