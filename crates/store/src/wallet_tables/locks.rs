//! The `coin_locks` table: coins a holder (a transaction being built) has
//! reserved, so that two spends never pick the same coin.

use rusqlite::params;

use super::coins::{CoinRow, coin_from_row};
use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

impl ReadTx<'_> {
    /// A wallet's unspent coins, each with the holder that has it locked.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn unspent_coins_with_locks(
        &self,
        wallet_id: WalletId,
    ) -> Result<Vec<(CoinRow, Option<String>)>, StoreError> {
        let sql = "SELECT c.txid, c.vout, c.value, c.script, c.keychain, c.idx, c.height, c.is_coinbase, \
                   c.wallet_id, c.spent_txid, c.spent_height, l.holder \
                   FROM wallet_coins c LEFT JOIN coin_locks l \
                   ON l.wallet_id = c.wallet_id AND l.txid = c.txid AND l.vout = c.vout \
                   WHERE c.wallet_id = ?1 AND c.spent_txid IS NULL ORDER BY c.txid, c.vout";
        let mut stmt = self.tx.prepare_cached(sql).or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], |row| {
                Ok((coin_from_row(row)?, row.get(11)?))
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// The coins `holder` has locked, as (wallet, txid, vout).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn locks_of(&self, holder: &str) -> Result<Vec<(WalletId, [u8; 32], u32)>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT wallet_id, txid, vout FROM coin_locks WHERE holder = ?1 ORDER BY wallet_id, txid, vout")
            .or_store()?;
        let rows = stmt
            .query_map([holder], |row| {
                Ok((WalletId::from_i64(row.get(0)?), row.get(1)?, row.get(2)?))
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }
}

impl WriteTx<'_> {
    /// Locks coins of a wallet for `holder`.
    ///
    /// # Errors
    /// [`StoreError::CoinLocked`] (invalid) if a coin is already locked;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn lock_coins(
        &mut self,
        wallet_id: WalletId,
        coins: &[([u8; 32], u32)],
        holder: &str,
    ) -> Result<(), StoreError> {
        let mut insert = self
            .read
            .tx
            .prepare_cached(
                "INSERT INTO coin_locks (wallet_id, txid, vout, holder, locked_at) VALUES (?1, ?2, ?3, ?4, unixepoch())",
            )
            .or_store()?;
        for (txid, vout) in coins {
            match insert.execute(params![wallet_id.as_i64(), txid, vout, holder]) {
                Ok(_) => {}
                Err(e)
                    if e.sqlite_extended_error_code()
                        == Some(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) =>
                {
                    return Err(StoreError::CoinLocked { vout: *vout });
                }
                Err(e) => return Err(StoreError::sqlite(e)),
            }
        }
        Ok(())
    }

    /// Releases one coin's lock, if `holder` holds it. Returns whether it
    /// did.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn release_lock(
        &mut self,
        wallet_id: WalletId,
        txid: &[u8; 32],
        vout: u32,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let released = self
            .read
            .tx
            .prepare_cached(
                "DELETE FROM coin_locks WHERE wallet_id = ?1 AND txid = ?2 AND vout = ?3 AND holder = ?4",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), txid, vout, holder])
            .or_store()?;
        Ok(released > 0)
    }

    /// Releases every coin `holder` has locked. Returns how many.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn release_locks(&mut self, holder: &str) -> Result<usize, StoreError> {
        self.read
            .tx
            .prepare_cached("DELETE FROM coin_locks WHERE holder = ?1")
            .or_store()?
            .execute([holder])
            .or_store()
    }
}
