//! What can go wrong with a wallet operation, and whether retrying helps.

use super::*;

/// What went wrong with a wallet operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalletError {
    /// A descriptor was refused (invalid input).
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// The database refused (see [`StoreError::kind`]; a duplicate name is
    /// [`StoreError::DuplicateWalletName`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No wallet has this id.
    #[error("wallet {0} not found")]
    NotFound(WalletId),
    /// The lookahead must be at least 1.
    #[error("lookahead must be at least 1 (got {0})")]
    InvalidLookahead(u32),
    /// A keychain has used every non-hardened index.
    #[error("{0} keychain has no index left")]
    IndexExhausted(Keychain),
    /// A signing wallet needs a passphrase to encrypt its keys.
    #[error("a wallet with private keys needs a passphrase")]
    PassphraseRequired,
    /// The passphrase does not decrypt the wallet's keys.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// The wallet holds no private keys.
    #[error("wallet {0} is watch-only")]
    WatchOnly(WalletId),
    /// Signing needs the wallet unlocked.
    #[error("wallet {0} is locked")]
    Locked(WalletId),
    /// The wallet's unlocked coins do not cover the payment and its fee.
    #[error(
        "insufficient funds: {needed} needed, {available} available, {locked} locked by other holders"
    )]
    InsufficientFunds {
        /// The payment plus the fee.
        needed: Amount,
        /// What the unlocked coins hold.
        available: Amount,
        /// What in-flight holders have locked (it may come back).
        locked: Amount,
    },
    /// Building, signing or finalising a transaction failed.
    #[error("signing: {0}")]
    Sign(String),
    /// A malformed request.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// Loading the wallet failed; every caller that waited for the same
    /// load gets the same error.
    #[error("loading wallet {wallet}: {error}")]
    LoadFailed {
        /// The wallet.
        wallet: WalletId,
        /// Why.
        error: std::sync::Arc<WalletError>,
    },
    /// What the database holds contradicts itself or the descriptors.
    #[error("wallet {wallet_id} is corrupt in the database: {detail}")]
    Corrupt {
        /// The wallet.
        wallet_id: WalletId,
        /// What does not hold together.
        detail: String,
    },
}

impl WalletError {
    /// What the caller can do: retry, fix the input, or stop.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WalletError::Store(e) => e.kind(),
            WalletError::LoadFailed { error, .. } => error.kind(),
            WalletError::Descriptor(_)
            | WalletError::NotFound(_)
            | WalletError::InvalidLookahead(_)
            | WalletError::IndexExhausted(_)
            | WalletError::PassphraseRequired
            | WalletError::WrongPassphrase
            | WalletError::WatchOnly(_)
            | WalletError::Locked(_)
            | WalletError::InsufficientFunds { .. }
            | WalletError::InvalidRequest(_)
            | WalletError::Sign(_) => ErrorKind::Invalid,
            WalletError::Corrupt { .. } => ErrorKind::Fatal,
        }
    }
}
