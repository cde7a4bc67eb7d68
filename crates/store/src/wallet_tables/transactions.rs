//! The `wallet_txs` table: the transactions that touched each wallet, the
//! ones it broadcast (kept raw until they confirm) and their conflicts.

use rusqlite::{OptionalExtension as _, params};

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
    /// Whether it was first seen in the chain source's mempool (not
    /// broadcast by the wallet, not first seen in a block).
    pub from_mempool: bool,
    /// For an unconfirmed broadcast of the wallet: the source's mempool no
    /// longer holds it.
    pub left_mempool: bool,
}

/// An unconfirmed transaction of a wallet kept with its raw bytes (its
/// own broadcast, or one seen in the source's mempool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnconfirmedRow {
    /// The wallet.
    pub wallet_id: WalletId,
    /// The transaction.
    pub txid: [u8; 32],
    /// Its raw bytes.
    pub raw: Vec<u8>,
    /// Seen in the source's mempool, rather than broadcast by the wallet.
    pub from_mempool: bool,
    /// The source's mempool no longer holds it (own broadcasts only).
    pub left_mempool: bool,
    /// A confirmed transaction spends one of its inputs.
    pub conflicted: bool,
}

/// An [`UnconfirmedRow`] from a row of `wallet_id, txid, raw,
/// from_mempool, left_mempool, conflicted_by IS NOT NULL`.
fn unconfirmed_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UnconfirmedRow> {
    Ok(UnconfirmedRow {
        wallet_id: WalletId::from_i64(row.get(0)?),
        txid: row.get(1)?,
        raw: row.get(2)?,
        from_mempool: row.get(3)?,
        left_mempool: row.get(4)?,
        conflicted: row.get(5)?,
    })
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
                "SELECT txid, height, received, sent, conflicted_by, conflicted_height, from_mempool, left_mempool \
                 FROM wallet_txs WHERE wallet_id = ?1 ORDER BY height IS NULL, height, txid",
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
                    from_mempool: row.get(6)?,
                    left_mempool: row.get(7)?,
                })
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// The unconfirmed transactions kept with their raw bytes, of one
    /// wallet or (`None`) of every wallet, conflicted ones included.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn unconfirmed_txs(
        &self,
        wallet_id: Option<WalletId>,
    ) -> Result<Vec<UnconfirmedRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT wallet_id, txid, raw, from_mempool, left_mempool, conflicted_by IS NOT NULL \
                 FROM wallet_txs WHERE (?1 IS NULL OR wallet_id = ?1) AND height IS NULL \
                 AND raw IS NOT NULL ORDER BY wallet_id, txid",
            )
            .or_store()?;
        let rows = stmt
            .query_map([wallet_id.map(WalletId::as_i64)], unconfirmed_row)
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// The wallet's unconfirmed transaction `txid` kept with its raw
    /// bytes, if it has one (conflicted ones included): one lookup by the
    /// table's key, where [`Self::unconfirmed_txs`] reads them all.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn unconfirmed_tx(
        &self,
        wallet_id: WalletId,
        txid: &[u8; 32],
    ) -> Result<Option<UnconfirmedRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT wallet_id, txid, raw, from_mempool, left_mempool, conflicted_by IS NOT NULL \
                 FROM wallet_txs WHERE wallet_id = ?1 AND txid = ?2 AND height IS NULL \
                 AND raw IS NOT NULL",
            )
            .or_store()?;
        stmt.query_row(params![wallet_id.as_i64(), &txid[..]], unconfirmed_row)
            .optional()
            .or_store()
    }

    /// Whether `script` is one of the wallet's derived scripts.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_owns_script(
        &self,
        wallet_id: WalletId,
        script: &[u8],
    ) -> Result<bool, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT 1 FROM wallet_scripts WHERE script = ?2 AND wallet_id = ?1 LIMIT 1",
            )
            .or_store()?;
        stmt.exists(params![wallet_id.as_i64(), script]).or_store()
    }

    /// The wallet's own broadcast transactions that are neither confirmed
    /// nor conflicted: (txid, raw transaction). Unconfirmed transactions
    /// seen in the source's mempool are among them: their inputs are on
    /// their way out just the same.
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

    /// Records an unconfirmed transaction seen in the source's mempool,
    /// unless the wallet has it already (confirmed, or its own broadcast);
    /// returns whether it was recorded.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn record_from_mempool(
        &mut self,
        wallet_id: WalletId,
        row: &WalletTxRow,
        raw: &[u8],
    ) -> Result<bool, StoreError> {
        let added = self
            .read
            .tx
            .prepare_cached(
                "INSERT INTO wallet_txs (wallet_id, txid, height, received, sent, raw, from_mempool) \
                 VALUES (?1, ?2, NULL, ?3, ?4, ?5, 1) ON CONFLICT (wallet_id, txid) DO NOTHING",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), row.txid, sql_amount(row.received)?, sql_amount(row.sent)?, raw])
            .or_store()?;
        Ok(added > 0)
    }

    /// What follows when the source's mempool stops (`left`) or starts
    /// again to hold the wallet's unconfirmed transaction `txid`: one seen
    /// in the mempool goes (it returns as new if it comes back); the
    /// wallet's own broadcast is marked. Returns whether anything changed.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_in_mempool(
        &mut self,
        wallet_id: WalletId,
        txid: &[u8; 32],
        in_mempool: bool,
    ) -> Result<bool, StoreError> {
        let tx = &self.read.tx;
        let mut changed = 0;
        if !in_mempool {
            changed += tx
                .prepare_cached(
                    "DELETE FROM wallet_txs WHERE wallet_id = ?1 AND txid = ?2 AND height IS NULL AND from_mempool = 1",
                )
                .or_store()?
                .execute(params![wallet_id.as_i64(), txid])
                .or_store()?;
        }
        changed += tx
            .prepare_cached(
                "UPDATE wallet_txs SET left_mempool = ?3 WHERE wallet_id = ?1 AND txid = ?2 \
                 AND height IS NULL AND from_mempool = 0 AND left_mempool != ?3",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), txid, !in_mempool])
            .or_store()?;
        Ok(changed > 0)
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
