//! The `wallet_txs` table: the transactions that touched each wallet, the
//! ones it broadcast (kept raw until they confirm) and their conflicts.

use rusqlite::params;

use super::{get_u64, sql_amount};
use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

/// A transaction the wallet broadcast that is neither confirmed nor
/// conflicted: its txid and raw bytes.
pub type PendingBroadcast = ([u8; 32], Vec<u8>);

/// A transaction that touched a wallet, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletTxRow {
    /// The transaction.
    pub txid: [u8; 32],
    /// Its block's height; `None` while unconfirmed.
    pub height: Option<u32>,
    /// What it paid the wallet, in satoshis.
    pub received: u64,
    /// What it spent of the wallet's coins, in satoshis.
    pub sent: u64,
    /// The confirmed transaction that conflicts with it, and where.
    pub conflicted_by: Option<([u8; 32], u32)>,
}

impl ReadTx<'_> {
    /// The transactions that touched a wallet, confirmed ones by height
    /// then unconfirmed ones.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_txs(&self, wallet_id: WalletId) -> Result<Vec<WalletTxRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT txid, height, received, sent, conflicted_by, conflicted_height FROM wallet_txs \
                 WHERE wallet_id = ?1 ORDER BY height IS NULL, height, txid",
            )
            .or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], |row| {
                let by: Option<[u8; 32]> = row.get(4)?;
                let at: Option<u32> = row.get(5)?;
                Ok(WalletTxRow {
                    txid: row.get(0)?,
                    height: row.get(1)?,
                    received: get_u64(row, 2)?,
                    sent: get_u64(row, 3)?,
                    conflicted_by: by.zip(at),
                })
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// The wallet's own broadcast transactions that are neither confirmed
    /// nor conflicted: (txid, raw transaction).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn pending_broadcasts(
        &self,
        wallet_id: WalletId,
    ) -> Result<Vec<PendingBroadcast>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT txid, raw FROM wallet_txs WHERE wallet_id = ?1 AND raw IS NOT NULL \
                 AND height IS NULL AND conflicted_by IS NULL ORDER BY txid",
            )
            .or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], |row| Ok((row.get(0)?, row.get(1)?)))
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }
}

impl WriteTx<'_> {
    /// Records (or adds to) a transaction that touched the wallet at
    /// `height`.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn record_wallet_tx(
        &mut self,
        wallet_id: WalletId,
        row: &WalletTxRow,
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached(
                "INSERT INTO wallet_txs (wallet_id, txid, height, received, sent) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (wallet_id, txid) DO UPDATE SET height = excluded.height, \
                 received = excluded.received, sent = excluded.sent",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), row.txid, row.height, sql_amount(row.received)?, sql_amount(row.sent)?])
            .or_store()?;
        Ok(())
    }

    /// Records a transaction the wallet broadcast, unconfirmed, with its
    /// raw bytes (kept until it confirms or is conflicted).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn record_broadcast(
        &mut self,
        wallet_id: WalletId,
        row: &WalletTxRow,
        raw: &[u8],
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached(
                "INSERT INTO wallet_txs (wallet_id, txid, height, received, sent, raw) VALUES (?1, ?2, NULL, ?3, ?4, ?5) \
                 ON CONFLICT (wallet_id, txid) DO UPDATE SET raw = excluded.raw",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), row.txid, sql_amount(row.received)?, sql_amount(row.sent)?, raw])
            .or_store()?;
        Ok(())
    }

    /// Forgets a broadcast the source rejected: the row of `txid` goes if
    /// it is still unconfirmed and carries raw bytes (a transaction seen in
    /// a block is never forgotten). Returns whether it went.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn forget_broadcast(
        &mut self,
        wallet_id: WalletId,
        txid: &[u8; 32],
    ) -> Result<bool, StoreError> {
        let removed = self
            .read
            .tx
            .prepare_cached(
                "DELETE FROM wallet_txs WHERE wallet_id = ?1 AND txid = ?2 AND height IS NULL AND raw IS NOT NULL",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), txid])
            .or_store()?;
        Ok(removed > 0)
    }

    /// Marks the wallet's transaction `txid` conflicted by the confirmed
    /// transaction `by` at `height`.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_conflicted(
        &mut self,
        wallet_id: WalletId,
        txid: &[u8; 32],
        by: &[u8; 32],
        height: u32,
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached(
                "UPDATE wallet_txs SET conflicted_by = ?3, conflicted_height = ?4 WHERE wallet_id = ?1 AND txid = ?2",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), txid, by, height])
            .or_store()?;
        Ok(())
    }
}
