//! The dispatcher's errors.

use std::fmt::Debug;
use std::time::Duration;

use crate::{ActionKind, DispatchId};

/// Why an action was not started, or may not sign.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError<K: Debug> {
    /// The wallet already runs an exclusive action (refused at once).
    #[error(
        "wallet {wallet:?} is busy with action {action_id} ({kind}, started at height \
         {started_at_height:?}, deadline {deadline_height:?})"
    )]
    WalletBusy {
        /// The wallet asked for.
        wallet: K,
        /// The action holding it.
        action_id: DispatchId,
        /// That action's kind.
        kind: ActionKind,
        /// The tip when that action was dispatched, if one was known.
        started_at_height: Option<u32>,
        /// That action's deadline height, if it has one.
        deadline_height: Option<u32>,
    },
    /// `dispatch_wait` gave up before the wallet was free.
    #[error("waited {waited:?} for wallet {wallet:?}, which stayed busy")]
    Timeout {
        /// The wallet waited for.
        wallet: K,
        /// How long it waited.
        waited: Duration,
    },
    /// The tip has already reached the action's deadline.
    #[error("deadline height {deadline} already reached (tip {tip})")]
    DeadlinePassed {
        /// The current tip.
        tip: u32,
        /// The action's deadline height.
        deadline: u32,
    },
    /// Too close to the deadline to sign: `tip + margin >= deadline`.
    #[error("too late to sign: tip {tip} + margin {margin} reaches deadline {deadline}")]
    TooLateToSign {
        /// The current tip.
        tip: u32,
        /// The action's deadline height.
        deadline: u32,
        /// The safety margin of the action's kind, in blocks.
        margin: u32,
    },
    /// No signer limit of this name was added.
    #[error("no signer limit named {0:?}")]
    UnknownSigner(String),
    /// Called outside a tokio runtime (actions run as tokio tasks).
    #[error("no tokio runtime to run the action on")]
    NoRuntime,
}
