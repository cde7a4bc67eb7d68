//! What can go wrong in the chain loop, and whether retrying helps.

use bitcoin::{BlockHash, Network};
use lockstep_chain::SourceError;
use lockstep_filter::DecodeFilterError;
use lockstep_store::{StoreError, WalletId};
use lockstep_wallet::WalletError;

pub use lockstep_error::ErrorKind;

/// An error of a block hook ([`crate::BlockHook`]).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong in the chain loop or in an import.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The chain source failed (see [`SourceError::kind`]).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The database failed (see [`StoreError::kind`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A wallet refused (see [`WalletError::kind`]).
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// One wallet could not be processed (its stored state is corrupt, or
    /// a block or transaction it must record is refused by it). Unless
    /// retrying can help, the loop parks it (see [`crate::Manager::resume_wallet`])
    /// and goes on for every other wallet.
    #[error("wallet {wallet} cannot be processed: {source}")]
    WalletFailed {
        /// The wallet.
        wallet: WalletId,
        /// Why.
        #[source]
        source: WalletError,
    },
    /// The source sent a basic filter that does not decode.
    #[error("basic filter of block {hash} at height {height} is corrupt")]
    BadFilter {
        /// The block's height.
        height: u32,
        /// The block's hash.
        hash: BlockHash,
        /// What is wrong with it.
        #[source]
        source: DecodeFilterError,
    },
    /// The source sent a basic filter that its own filter-header chain does
    /// not commit to: trusting it could miss a payment silently.
    #[error("basic filter of block {hash} at height {height} does not match its filter header")]
    FilterHeaderMismatch {
        /// The block's height.
        height: u32,
        /// The block's hash.
        hash: BlockHash,
    },
    /// The source sent a block or header that is not what it committed to.
    #[error("block {hash} at height {height} is invalid: {reason}")]
    BadBlock {
        /// The block's height.
        height: u32,
        /// The hash asked for.
        hash: BlockHash,
        /// What does not match.
        reason: &'static str,
    },
    /// The source sent a header without the proof of work the network's
    /// rules require (its hash misses its own target, or its target is not
    /// the one the difficulty rules give at its height).
    #[error("header {hash} at height {height} is invalid: {reason}")]
    BadHeader {
        /// The header's height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
        /// What is wrong.
        reason: &'static str,
    },
    /// The source serves another network's chain (its genesis block is not
    /// the configured network's).
    #[error("the chain source is not on {expected}: its genesis block is {genesis}")]
    SourceNetwork {
        /// The network the manager is configured for.
        expected: Network,
        /// The source's block at height 0.
        genesis: BlockHash,
    },
    /// A wallet's descriptors are for another network than the chain's.
    /// Nothing was written.
    #[error("the wallet's descriptors are for {wallet}, the chain is {chain}")]
    WrongNetwork {
        /// The wallet's network.
        wallet: Network,
        /// The chain's.
        chain: Network,
    },
    /// A wallet with this name is registered with other descriptors.
    /// Nothing was written.
    #[error("a wallet named {name:?} is already registered (id {wallet}) with other descriptors")]
    WalletNameTaken {
        /// The name.
        name: String,
        /// The wallet that has it.
        wallet: WalletId,
    },
    /// The wallet is registered (its row committed) but its import did not
    /// finish; the loop finishes it before it goes on, and registering it
    /// again (same name, same descriptors) returns it.
    #[error("wallet {wallet} is registered but its import did not finish: {source}")]
    ImportIncomplete {
        /// The registered wallet.
        wallet: WalletId,
        /// Why the import stopped.
        #[source]
        source: Box<ManagerError>,
    },
    /// The source's best chain does not reach the loop's tip (it lags, or
    /// it is on a branch with less work): waited for, not followed.
    #[error(
        "the source's chain reaches height {reached}, below the loop's tip {tip}: waiting for it"
    )]
    SourceBehind {
        /// How far the source's chain goes, as far as the scan saw.
        reached: u32,
        /// The loop's tip.
        tip: u32,
    },
    /// Another manager (in this process or another) runs the chain loop
    /// on this database. Wallets can still be registered through this one:
    /// that loop picks them up.
    #[error("another chain loop runs on this database")]
    LoopElsewhere,
    /// The source's chain forks below every block hash the loop keeps.
    #[error("reorg deeper than the {kept} recorded block hashes (below height {lowest})")]
    ReorgTooDeep {
        /// How many hashes the loop keeps.
        kept: usize,
        /// The lowest height checked.
        lowest: u32,
    },
    /// The block hook refused; the block was not committed.
    #[error("block hook failed: {0}")]
    Hook(HookError),
    /// No registered wallet has this id.
    #[error("wallet {0} is not registered with the manager")]
    UnknownWallet(WalletId),
    /// A targeted import named a script the wallet does not derive.
    #[error("wallet {wallet} does not derive script {script}")]
    NotWalletScript {
        /// The wallet.
        wallet: WalletId,
        /// The script, in hex.
        script: String,
    },
    /// The manager was stopped while the operation waited.
    #[error("the manager was stopped")]
    Stopped,
}

impl ManagerError {
    /// Whether retrying can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ManagerError::Source(e) => e.kind(),
            ManagerError::Store(e) => e.kind(),
            ManagerError::Wallet(e) | ManagerError::WalletFailed { source: e, .. } => e.kind(),
            ManagerError::BadFilter { .. }
            | ManagerError::FilterHeaderMismatch { .. }
            | ManagerError::BadBlock { .. }
            | ManagerError::BadHeader { .. }
            | ManagerError::SourceNetwork { .. }
            | ManagerError::WrongNetwork { .. }
            | ManagerError::WalletNameTaken { .. }
            | ManagerError::UnknownWallet(_)
            | ManagerError::NotWalletScript { .. } => ErrorKind::Invalid,
            ManagerError::ImportIncomplete { source, .. } => source.kind(),
            ManagerError::ReorgTooDeep { .. } | ManagerError::Hook(_) => ErrorKind::Fatal,
            ManagerError::Stopped
            | ManagerError::SourceBehind { .. }
            | ManagerError::LoopElsewhere => ErrorKind::Retryable,
        }
    }
}

impl ManagerError {
    /// `error` of wallet `wallet`, attributed to it unless it is the
    /// database's (a busy or failing database is every wallet's problem,
    /// not one wallet's).
    pub(crate) fn of_wallet(wallet: WalletId, error: WalletError) -> ManagerError {
        let database = match &error {
            WalletError::Store(_) => true,
            WalletError::LoadFailed { error, .. } => matches!(**error, WalletError::Store(_)),
            _ => false,
        };
        if database {
            ManagerError::Wallet(error)
        } else {
            ManagerError::WalletFailed {
                wallet,
                source: error,
            }
        }
    }

    /// The wallet to park for this error: one wallet's failure that
    /// retrying cannot mend.
    pub(crate) fn wallet_to_park(&self) -> Option<WalletId> {
        match self {
            ManagerError::WalletFailed { wallet, .. } if self.kind() != ErrorKind::Retryable => {
                Some(*wallet)
            }
            ManagerError::ImportIncomplete { source, .. } => source.wallet_to_park(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wallet whose stored state is corrupt cannot be mended by trying
    /// again: retrying it forever would spin the loop.
    #[test]
    fn a_corrupt_wallet_is_not_retried_as_bad_input() {
        let corrupt = ManagerError::Wallet(WalletError::Corrupt {
            wallet_id: WalletId::from_i64(3),
            detail: "stored descriptor: bad checksum".to_owned(),
        });
        assert_eq!(corrupt.kind(), ErrorKind::Fatal);
        let busy = ManagerError::Wallet(WalletError::Locked(WalletId::from_i64(3)));
        assert_eq!(busy.kind(), ErrorKind::Invalid);
    }

    /// A wallet's own failure parks it; the database's does not.
    #[test]
    fn only_a_wallet_s_own_lasting_failure_parks_it() {
        let id = WalletId::from_i64(4);
        let corrupt = WalletError::Corrupt {
            wallet_id: id,
            detail: "x".to_owned(),
        };
        assert_eq!(
            ManagerError::of_wallet(id, corrupt).wallet_to_park(),
            Some(id)
        );
        let closed = WalletError::Store(StoreError::Closed);
        assert_eq!(ManagerError::of_wallet(id, closed).wallet_to_park(), None);
    }
}
