//! The `wallet_coins` table: the coins blocks paid each wallet, and their
//! spends.

use rusqlite::{OptionalExtension as _, params};

use super::{get_u64, sql_amount};
use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

/// A wallet's coin as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoinRow {
    /// The creating transaction.
    pub txid: [u8; 32],
    /// The output's index.
    pub vout: u32,
    /// Its value in satoshis.
    pub value: u64,
    /// Its script.
    pub script: Vec<u8>,
    /// 0 external, 1 internal.
    pub keychain: u8,
    /// The script's derivation index.
    pub index: u32,
    /// The height of the block that created it.
    pub height: u32,
    /// Whether a coinbase created it.
    pub is_coinbase: bool,
    /// The spending transaction and its height, once spent.
    pub spent: Option<([u8; 32], u32)>,
}

pub(super) fn coin_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CoinRow> {
    let spent_txid: Option<[u8; 32]> = row.get(9)?;
    let spent_height: Option<u32> = row.get(10)?;
    Ok(CoinRow {
        txid: row.get(0)?,
        vout: row.get(1)?,
        value: get_u64(row, 2)?,
        script: row.get(3)?,
        keychain: row.get(4)?,
        index: row.get(5)?,
        height: row.get(6)?,
        is_coinbase: row.get(7)?,
        spent: spent_txid.zip(spent_height),
    })
}

const COIN_COLUMNS: &str = "txid, vout, value, script, keychain, idx, height, is_coinbase, wallet_id, spent_txid, spent_height";

impl ReadTx<'_> {
    /// A wallet's coins (unspent only, or all), by outpoint.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_coins(
        &self,
        wallet_id: WalletId,
        unspent_only: bool,
    ) -> Result<Vec<CoinRow>, StoreError> {
        let sql = if unspent_only {
            format!(
                "SELECT {COIN_COLUMNS} FROM wallet_coins WHERE wallet_id = ?1 AND spent_txid IS NULL ORDER BY txid, vout"
            )
        } else {
            format!(
                "SELECT {COIN_COLUMNS} FROM wallet_coins WHERE wallet_id = ?1 ORDER BY txid, vout"
            )
        };
        let mut stmt = self.tx.prepare_cached(&sql).or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], coin_from_row)
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// The sum of a wallet's unspent coins, in satoshis.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_balance(&self, wallet_id: WalletId) -> Result<u64, StoreError> {
        self.tx
            .prepare_cached("SELECT COALESCE(SUM(value), 0) FROM wallet_coins WHERE wallet_id = ?1 AND spent_txid IS NULL")
            .or_store()?
            .query_row([wallet_id.as_i64()], |row| get_u64(row, 0))
            .or_store()
    }

    /// One of the wallet's coins, spent or not.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_coin(
        &self,
        wallet_id: WalletId,
        txid: &[u8; 32],
        vout: u32,
    ) -> Result<Option<CoinRow>, StoreError> {
        self.tx
            .prepare_cached(&format!("SELECT {COIN_COLUMNS} FROM wallet_coins WHERE wallet_id = ?1 AND txid = ?2 AND vout = ?3"))
            .or_store()?
            .query_row(params![wallet_id.as_i64(), txid, vout], coin_from_row)
            .optional()
            .or_store()
    }
}

impl WriteTx<'_> {
    /// Records a coin a block paid the wallet. Idempotent: a coin already
    /// recorded is left as it is (a rescan of scripts imported later sees
    /// the block again), and `false` is returned.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn insert_coin(&mut self, wallet_id: WalletId, coin: &CoinRow) -> Result<bool, StoreError> {
        let inserted = self
            .read
            .tx
            .prepare_cached(&format!(
                "INSERT INTO wallet_coins ({COIN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (wallet_id, txid, vout) DO NOTHING"
            ))
            .or_store()?
            .execute(params![
                coin.txid,
                coin.vout,
                sql_amount(coin.value)?,
                coin.script,
                coin.keychain,
                coin.index,
                coin.height,
                coin.is_coinbase,
                wallet_id.as_i64(),
                coin.spent.map(|s| s.0),
                coin.spent.map(|s| s.1),
            ])
            .or_store()?;
        Ok(inserted == 1)
    }

    /// Marks the wallet's coin at `(txid, vout)` spent by `spent_txid` at
    /// `height`, if the wallet has it unspent (or already spent by that same
    /// transaction: a rescan sees the block again). Returns its value then.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn spend_coin(
        &mut self,
        wallet_id: WalletId,
        txid: &[u8; 32],
        vout: u32,
        spent_txid: &[u8; 32],
        height: u32,
    ) -> Result<Option<u64>, StoreError> {
        self.read
            .tx
            .prepare_cached(
                "UPDATE wallet_coins SET spent_txid = ?4, spent_height = ?5 \
                 WHERE wallet_id = ?1 AND txid = ?2 AND vout = ?3 \
                 AND (spent_txid IS NULL OR spent_txid = ?4) RETURNING value",
            )
            .or_store()?
            .query_row(
                params![wallet_id.as_i64(), txid, vout, spent_txid, height],
                |row| get_u64(row, 0),
            )
            .optional()
            .or_store()
    }
}
