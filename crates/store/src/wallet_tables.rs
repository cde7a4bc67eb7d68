//! Descriptor wallets' rows: keychains and their derived scripts, coins,
//! coin locks, and the wallets' transactions, one module per table (the
//! registry of wallets itself is in `tx`).
//!
//! Typed functions only; the wallet crate never sees SQL.

use crate::error::StoreError;

mod coins;
mod disconnect;
mod keychains;
mod locks;
mod transactions;

pub use coins::CoinRow;
pub use disconnect::Disconnected;
pub use keychains::{KeychainRow, NewKeychain};
pub use transactions::{PendingBroadcast, UnconfirmedRow, WalletTxRow};

/// Reads a non-negative integer column as `u64` (SQLite integers are i64).
pub(crate) fn get_u64(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(column)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(column, value))
}

/// The money supply in satoshis (21 million BTC, Core's `MAX_MONEY`).
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// An amount for the database: at most 21 million BTC (so it fits an
/// i64), refused above that rather than clamped to a value nobody paid.
pub(super) fn sql_amount(value: u64) -> Result<i64, StoreError> {
    if value > MAX_MONEY {
        return Err(StoreError::AmountOutOfRange { sats: value });
    }
    Ok(value as i64)
}
