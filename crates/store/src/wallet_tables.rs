//! Descriptor wallets' rows: keychains and their derived scripts.
//!
//! Typed functions only; the wallet crate never sees SQL.

use rusqlite::{OptionalExtension as _, params};

use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

/// A keychain to register with a wallet.
#[derive(Debug, Clone, Copy)]
pub struct NewKeychain<'a> {
    /// 0 external (receive), 1 internal (change).
    pub keychain: u8,
    /// The network's name as Bitcoin Core spells it (`main`, `regtest`, ...).
    pub network: &'a str,
    /// The public descriptor. Never a secret.
    pub descriptor: &'a str,
    /// Scripts kept derived past the last used index.
    pub lookahead: u32,
}

/// A keychain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeychainRow {
    /// 0 external (receive), 1 internal (change).
    pub keychain: u8,
    /// The network's name as Bitcoin Core spells it.
    pub network: String,
    /// The public descriptor.
    pub descriptor: String,
    /// Scripts kept derived past the last used index.
    pub lookahead: u32,
    /// The next index to reveal.
    pub next_index: u32,
    /// The highest index seen used on chain.
    pub last_used: Option<u32>,
    /// Scripts `0..derived_to` are stored.
    pub derived_to: u32,
}

impl ReadTx<'_> {
    /// A wallet's keychains, external first.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn keychains(&self, wallet_id: WalletId) -> Result<Vec<KeychainRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT keychain, network, descriptor, lookahead, next_index, last_used, derived_to \
                 FROM wallet_keychains WHERE wallet_id = ?1 ORDER BY keychain",
            )
            .or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], |row| {
                Ok(KeychainRow {
                    keychain: row.get(0)?,
                    network: row.get(1)?,
                    descriptor: row.get(2)?,
                    lookahead: row.get(3)?,
                    next_index: row.get(4)?,
                    last_used: row.get(5)?,
                    derived_to: row.get(6)?,
                })
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// A wallet's stored scripts of one keychain, by index from 0.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if an index is missing; otherwise busy (retry)
    /// or corrupt (fatal).
    pub fn keychain_scripts(
        &self,
        wallet_id: WalletId,
        keychain: u8,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT idx, script FROM wallet_scripts WHERE wallet_id = ?1 AND keychain = ?2 ORDER BY idx")
            .or_store()?;
        let rows = stmt
            .query_map(params![wallet_id.as_i64(), keychain], |row| {
                Ok((row.get::<_, u32>(0)?, row.get(1)?))
            })
            .or_store()?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, script) = row.or_store()?;
            if idx as usize != out.len() {
                return Err(StoreError::Corrupt {
                    detail: format!(
                        "wallet {wallet_id} keychain {keychain} lacks script {}",
                        out.len()
                    ),
                    source: None,
                });
            }
            out.push(script);
        }
        Ok(out)
    }
}

impl WriteTx<'_> {
    /// Registers a keychain of a wallet.
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) for an unknown wallet;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn insert_keychain(
        &mut self,
        wallet_id: WalletId,
        keychain: NewKeychain<'_>,
    ) -> Result<(), StoreError> {
        if self.wallet(wallet_id)?.is_none() {
            return Err(StoreError::WalletNotFound { wallet_id });
        }
        self.read
            .tx
            .prepare_cached(
                "INSERT INTO wallet_keychains (wallet_id, keychain, network, descriptor, lookahead) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .or_store()?
            .execute(params![
                wallet_id.as_i64(),
                keychain.keychain,
                keychain.network,
                keychain.descriptor,
                keychain.lookahead
            ])
            .or_store()?;
        Ok(())
    }

    /// Stores derived scripts `first..first + scripts.len()` of a keychain
    /// and moves its `derived_to` past them.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if `first` is not the keychain's `derived_to`
    /// (scripts must stay contiguous); otherwise busy (retry), corrupt or
    /// full disk (fatal).
    pub fn append_scripts(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        first: u32,
        scripts: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let tx = &self.read.tx;
        let derived_to: u32 = tx
            .prepare_cached(
                "SELECT derived_to FROM wallet_keychains WHERE wallet_id = ?1 AND keychain = ?2",
            )
            .or_store()?
            .query_row(params![wallet_id.as_i64(), keychain], |row| row.get(0))
            .or_store()?;
        if derived_to != first {
            return Err(StoreError::Corrupt {
                detail: format!(
                    "appending scripts from {first} to a keychain derived to {derived_to}"
                ),
                source: None,
            });
        }
        let mut insert = tx
            .prepare_cached("INSERT INTO wallet_scripts (wallet_id, keychain, idx, script) VALUES (?1, ?2, ?3, ?4)")
            .or_store()?;
        for (i, script) in scripts.iter().enumerate() {
            insert
                .execute(params![
                    wallet_id.as_i64(),
                    keychain,
                    first + i as u32,
                    script
                ])
                .or_store()?;
        }
        tx.prepare_cached(
            "UPDATE wallet_keychains SET derived_to = ?3 WHERE wallet_id = ?1 AND keychain = ?2",
        )
        .or_store()?
        .execute(params![
            wallet_id.as_i64(),
            keychain,
            first + scripts.len() as u32
        ])
        .or_store()?;
        Ok(())
    }

    /// Sets a keychain's next index to reveal and its highest used index.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_keychain_indexes(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        next_index: u32,
        last_used: Option<u32>,
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached(
                "UPDATE wallet_keychains SET next_index = ?3, last_used = ?4 WHERE wallet_id = ?1 AND keychain = ?2",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), keychain, next_index, last_used])
            .or_store()?;
        Ok(())
    }
}

/// A transaction the wallet broadcast that is neither confirmed nor
/// conflicted: its txid and raw bytes.
pub type PendingBroadcast = ([u8; 32], Vec<u8>);

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

/// Reads a non-negative integer column as `u64` (SQLite integers are i64).
fn get_u64(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(column)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(column, value))
}

/// The money supply in satoshis (21 million BTC, Core's `MAX_MONEY`).
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// An amount for the database: at most 21 million BTC (so it fits an
/// i64), refused above that rather than clamped to a value nobody paid.
fn sql_amount(value: u64) -> Result<i64, StoreError> {
    if value > MAX_MONEY {
        return Err(StoreError::AmountOutOfRange { sats: value });
    }
    Ok(value as i64)
}

fn coin_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CoinRow> {
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
                "UPDATE wallet_txs SET height = NULL WHERE wallet_id = ?1 AND height >= ?2",
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

impl ReadTx<'_> {
    /// A keychain's encrypted private descriptor, if the wallet signs.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn keychain_secret(
        &self,
        wallet_id: WalletId,
        keychain: u8,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.tx
            .prepare_cached("SELECT encrypted_secret FROM wallet_keychains WHERE wallet_id = ?1 AND keychain = ?2")
            .or_store()?
            .query_row(params![wallet_id.as_i64(), keychain], |row| row.get(0))
            .optional()
            .map(Option::flatten)
            .or_store()
    }
}

impl WriteTx<'_> {
    /// Stores a keychain's encrypted private descriptor (already encrypted
    /// by the caller: the store never sees a secret in clear).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_keychain_secret(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        encrypted: &[u8],
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached("UPDATE wallet_keychains SET encrypted_secret = ?3 WHERE wallet_id = ?1 AND keychain = ?2")
            .or_store()?
            .execute(params![wallet_id.as_i64(), keychain, encrypted])
            .or_store()?;
        Ok(())
    }
}

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

impl ReadTx<'_> {
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

impl ReadTx<'_> {
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
