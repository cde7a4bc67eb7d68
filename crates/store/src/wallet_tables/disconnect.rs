//! Undoing a wallet's blocks above a height (a reorg, or an import that
//! starts again): spans the coins and the transactions tables, in one
//! write transaction.

use rusqlite::params;

use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{WalletId, WriteTx};

/// What [`WriteTx::disconnect_wallet`] undid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Disconnected {
    /// Coins created at or above the height, removed.
    pub coins_removed: usize,
    /// Coins spent at or above the height, unspent again.
    pub coins_restored: usize,
    /// Transactions confirmed at or above the height, dropped (or back to
    /// unconfirmed when the wallet broadcast them).
    pub txs_unconfirmed: usize,
}

impl WriteTx<'_> {
    /// Undoes, for one wallet, everything blocks at `height` and above did:
    /// their coins go, coins they spent come back, their transactions are
    /// dropped (or return to unconfirmed if the wallet broadcast them).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn disconnect_wallet(
        &mut self,
        wallet_id: WalletId,
        height: u32,
    ) -> Result<Disconnected, StoreError> {
        let tx = &self.read.tx;
        let id = wallet_id.as_i64();
        let coins_removed = tx
            .prepare_cached("DELETE FROM wallet_coins WHERE wallet_id = ?1 AND height >= ?2")
            .or_store()?
            .execute(params![id, height])
            .or_store()?;
        let coins_restored = if crate::faults::active(crate::faults::Fault::DisconnectKeepsSpent) {
            0
        } else {
            tx.prepare_cached(
                "UPDATE wallet_coins SET spent_txid = NULL, spent_height = NULL \
                 WHERE wallet_id = ?1 AND spent_height >= ?2",
            )
            .or_store()?
            .execute(params![id, height])
            .or_store()?
        };
        let dropped = tx
            .prepare_cached(
                "DELETE FROM wallet_txs WHERE wallet_id = ?1 AND height >= ?2 AND raw IS NULL",
            )
            .or_store()?
            .execute(params![id, height])
            .or_store()?;
        let unconfirmed = tx
            .prepare_cached(
                "UPDATE wallet_txs SET height = NULL, left_mempool = 0 WHERE wallet_id = ?1 AND height >= ?2",
            )
            .or_store()?
            .execute(params![id, height])
            .or_store()?;
        tx.prepare_cached(
            "UPDATE wallet_txs SET conflicted_by = NULL, conflicted_height = NULL \
             WHERE wallet_id = ?1 AND conflicted_height >= ?2",
        )
        .or_store()?
        .execute(params![id, height])
        .or_store()?;
        Ok(Disconnected {
            coins_removed,
            coins_restored,
            txs_unconfirmed: dropped + unconfirmed,
        })
    }
}
