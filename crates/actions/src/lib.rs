//! Durable step-by-step wallet actions: each step is persisted (in the same
//! transaction as the coin locks and wallet changes it made), so that a
//! crash, a restart, a rejection or a reorg at any step never loses funds,
//! never pays twice and never leaves coins locked.
//!
//! - [`WalletAction`]: the model (a state machine whose `advance` returns
//!   [`Advance`]); its idempotence contract is on the trait.
//! - [`Executor`]: drives actions through the dispatcher, one drive per
//!   action id, resumes every checkpoint at start-up, and can run each
//!   step twice to test idempotence.
//! - [`Spend`]: a send (with fee bumping by replacement) or a
//!   consolidation, end to end.

mod action;
mod executor;
mod spend;

#[cfg(test)]
mod tests;

pub use action::{Advance, StepCtx, StepError, WalletAction};
pub use executor::{DriveError, DriveMode, DriveOutcome, Executor, ExecutorConfig, StopError};
pub use spend::{FeeBump, Plan, SelectionRecord, Spend, SpendState};
