//! The typed transaction handles: [`ReadTx`] (read methods) and [`WriteTx`]
//! (write methods, and every read method through `Deref<Target = ReadTx>`).
//! No SQL crosses this boundary.

use std::fmt;
use std::ops::Deref;

use rusqlite::{OptionalExtension as _, Row, params};

use crate::error::{SqlResultExt as _, StoreError};

/// A block hash, in the byte order the chain crate stores it.
pub type BlockHash = [u8; 32];

/// A wallet's id: assigned by [`WriteTx::insert_wallet`], never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WalletId(i64);

impl WalletId {
    /// The id with this integer value (as printed by [`Display`](fmt::Display)).
    pub fn from_i64(value: i64) -> Self {
        Self(value)
    }

    /// The id's integer value.
    pub fn as_i64(self) -> i64 {
        self.0
    }
}

impl fmt::Display for WalletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One row of the wallet registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalletRow {
    /// The wallet's id.
    pub wallet_id: WalletId,
    /// The wallet's unique name.
    pub name: String,
    /// The height from which the wallet's history must be scanned.
    pub birth_height: u32,
    /// `None` for an active wallet, whose synced-to is the loop's tip by
    /// construction; `Some(h)` while an import is in progress and has reached
    /// height `h`.
    pub importing_height: Option<u32>,
    /// The hash of the block at `importing_height`, once the import has
    /// scanned a block (see [`WriteTx::set_import_progress`]).
    pub importing_hash: Option<BlockHash>,
    /// When the wallet was registered, in seconds since the Unix epoch.
    pub created_at: i64,
    /// How many addresses it has handed out (any process): a change tells
    /// a loop that holds the wallet to read it again.
    pub reveals: u64,
    /// Set while the wallet is parked: the chain loop could not process it
    /// and serves the others (see [`WriteTx::park_wallet`]).
    pub parked: Option<Parked>,
}

/// Why and where a wallet is parked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parked {
    /// The height its stored state is synced to.
    pub height: u32,
    /// That block's hash, when known.
    pub hash: Option<BlockHash>,
    /// The error that parked it.
    pub error: String,
}

impl WalletRow {
    /// Whether the chain loop serves it: neither importing nor parked.
    pub fn is_active(&self) -> bool {
        self.importing_height.is_none() && self.parked.is_none()
    }

    const COLUMNS: &'static str = "wallet_id, name, birth_height, importing_height, created_at, \
         importing_hash, reveals, parked_height, parked_hash, parked_error";

    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            wallet_id: WalletId(row.get(0)?),
            name: row.get(1)?,
            birth_height: row.get(2)?,
            importing_height: row.get(3)?,
            created_at: row.get(4)?,
            importing_hash: row.get(5)?,
            reveals: row.get::<_, i64>(6)?.unsigned_abs(),
            parked: match row.get::<_, Option<u32>>(7)? {
                Some(height) => Some(Parked {
                    height,
                    hash: row.get(8)?,
                    error: row.get::<_, Option<String>>(9)?.unwrap_or_default(),
                }),
                None => None,
            },
        })
    }
}

/// A read transaction: one consistent snapshot of the database, taken at its
/// first read and held until the closure returns. Given to the closures of
/// [`Store::read`](crate::Store::read) and
/// [`Store::read_blocking`](crate::Store::read_blocking); every method is
/// also available on [`WriteTx`], where it sees the transaction's own writes.
pub struct ReadTx<'c> {
    pub(crate) tx: rusqlite::Transaction<'c>,
}

impl fmt::Debug for ReadTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadTx").finish_non_exhaustive()
    }
}

impl ReadTx<'_> {
    /// The chain loop's tip (height and hash), or `None` before the loop's
    /// first commit.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn tip(&self) -> Result<Option<(u32, BlockHash)>, StoreError> {
        self.tx
            .prepare_cached("SELECT height, hash FROM chain_tip WHERE id = 0")
            .or_store()?
            .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .or_store()
    }

    /// The recorded hash of the block at `height`, if the loop kept it.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn block_hash(&self, height: u32) -> Result<Option<BlockHash>, StoreError> {
        self.tx
            .prepare_cached("SELECT hash FROM block_hashes WHERE height = ?1")
            .or_store()?
            .query_row([height], |row| row.get(0))
            .optional()
            .or_store()
    }

    /// Up to `limit` recorded block hashes, highest first.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn recent_block_hashes(&self, limit: usize) -> Result<Vec<(u32, BlockHash)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut statement = self
            .tx
            .prepare_cached("SELECT height, hash FROM block_hashes ORDER BY height DESC LIMIT ?1")
            .or_store()?;
        let rows = statement
            .query_map([limit], |row| Ok((row.get(0)?, row.get(1)?)))
            .or_store()?;
        rows.collect::<rusqlite::Result<_>>().or_store()
    }

    /// Up to `limit` recorded blocks, highest first: height, hash, and the
    /// compact difficulty target (`bits`) when it was recorded with one.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn recent_blocks(
        &self,
        limit: usize,
    ) -> Result<Vec<(u32, BlockHash, Option<u32>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut statement = self
            .tx
            .prepare_cached(
                "SELECT height, hash, bits FROM block_hashes ORDER BY height DESC LIMIT ?1",
            )
            .or_store()?;
        let rows = statement
            .query_map([limit], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .or_store()?;
        rows.collect::<rusqlite::Result<_>>().or_store()
    }

    /// How many times the wallet set has changed: a wallet registered, an
    /// import started or finished, by this process or another one on the
    /// same file. A chain loop compares it with what it last saw inside
    /// each of its write transactions (which SQLite serialises with every
    /// other writer), so it never commits past a wallet it does not know.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn registry_version(&self) -> Result<u64, StoreError> {
        let version: i64 = self
            .tx
            .prepare_cached("SELECT version FROM registry_version WHERE id = 0")
            .or_store()?
            .query_row([], |row| row.get(0))
            .or_store()?;
        Ok(version.unsigned_abs())
    }

    /// The wallet with this id, if any.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet(&self, wallet_id: WalletId) -> Result<Option<WalletRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM wallets WHERE wallet_id = ?1",
            WalletRow::COLUMNS
        );
        self.tx
            .prepare_cached(&sql)
            .or_store()?
            .query_row([wallet_id.0], WalletRow::from_row)
            .optional()
            .or_store()
    }

    /// The wallet with this name, if any.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallet_by_name(&self, name: &str) -> Result<Option<WalletRow>, StoreError> {
        let sql = format!("SELECT {} FROM wallets WHERE name = ?1", WalletRow::COLUMNS);
        self.tx
            .prepare_cached(&sql)
            .or_store()?
            .query_row([name], WalletRow::from_row)
            .optional()
            .or_store()
    }

    /// Every wallet, in id order.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn wallets(&self) -> Result<Vec<WalletRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM wallets ORDER BY wallet_id",
            WalletRow::COLUMNS
        );
        let mut statement = self.tx.prepare_cached(&sql).or_store()?;
        let rows = statement.query_map([], WalletRow::from_row).or_store()?;
        rows.collect::<rusqlite::Result<_>>().or_store()
    }
}

/// A write transaction (`BEGIN IMMEDIATE`), given to the closures of
/// [`Store::write`](crate::Store::write) and
/// [`Store::write_blocking`](crate::Store::write_blocking). It commits when
/// the closure returns `Ok` and rolls back otherwise, so everything done
/// through it (for any number of wallets) is atomic.
///
/// Every [`ReadTx`] method is available through `Deref`; reads see this
/// transaction's own writes.
pub struct WriteTx<'c> {
    pub(crate) read: ReadTx<'c>,
    /// This transaction's number: unique among the store's transactions.
    pub(crate) serial: u64,
    /// What runs once this transaction has committed (see
    /// [`WriteTx::after_commit`]).
    pub(crate) after_commit: std::cell::RefCell<Vec<AfterCommit>>,
}

/// A callback run on the writer thread once a transaction committed.
pub(crate) type AfterCommit = Box<dyn FnOnce() + Send>;

impl WriteTx<'_> {
    /// This transaction's number, unique among the store's transactions:
    /// state staged for it (a live wallet's working copy) knows whose it is.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Runs `f` once this transaction has committed, on the writer thread,
    /// before the next transaction begins and before the caller of the
    /// write gets its result; never if it rolls back (or its COMMIT fails).
    /// In-memory state that mirrors the database (a live wallet's) changes
    /// here, so that it never shows what may still roll back.
    pub fn after_commit(&self, f: impl FnOnce() + Send + 'static) {
        self.after_commit.borrow_mut().push(Box::new(f));
    }
}

impl fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteTx").finish_non_exhaustive()
    }
}

impl<'c> Deref for WriteTx<'c> {
    type Target = ReadTx<'c>;

    fn deref(&self) -> &ReadTx<'c> {
        &self.read
    }
}

impl WriteTx<'_> {
    fn tx(&self) -> &rusqlite::Transaction<'_> {
        &self.read.tx
    }

    /// Sets the chain loop's tip.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_tip(&mut self, height: u32, hash: &BlockHash) -> Result<(), StoreError> {
        self.tx()
            .prepare_cached(
                "INSERT INTO chain_tip (id, height, hash) VALUES (0, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET height = excluded.height, hash = excluded.hash",
            )
            .or_store()?
            .execute(params![height, hash])
            .or_store()?;
        Ok(())
    }

    /// Records the hash of the block at `height`, replacing any hash recorded
    /// there before.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn put_block_hash(&mut self, height: u32, hash: &BlockHash) -> Result<(), StoreError> {
        self.tx()
            .prepare_cached(
                "INSERT INTO block_hashes (height, hash) VALUES (?1, ?2) \
                 ON CONFLICT (height) DO UPDATE SET hash = excluded.hash, bits = NULL",
            )
            .or_store()?
            .execute(params![height, hash])
            .or_store()?;
        Ok(())
    }

    /// Records the block at `height`: its hash and compact difficulty
    /// target (`bits`), replacing any block recorded there before.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn put_block(
        &mut self,
        height: u32,
        hash: &BlockHash,
        bits: u32,
    ) -> Result<(), StoreError> {
        self.tx()
            .prepare_cached(
                "INSERT INTO block_hashes (height, hash, bits) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (height) DO UPDATE SET hash = excluded.hash, bits = excluded.bits",
            )
            .or_store()?
            .execute(params![height, hash, bits])
            .or_store()?;
        Ok(())
    }

    /// Forgets the hashes of every block above `height` (a reorg's
    /// disconnected blocks). Returns how many were removed.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn delete_block_hashes_above(&mut self, height: u32) -> Result<usize, StoreError> {
        self.tx()
            .prepare_cached("DELETE FROM block_hashes WHERE height > ?1")
            .or_store()?
            .execute([height])
            .or_store()
    }

    /// Forgets the hashes of every block below `height` (pruning the window
    /// kept for reorg detection). Returns how many were removed.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn prune_block_hashes_below(&mut self, height: u32) -> Result<usize, StoreError> {
        self.tx()
            .prepare_cached("DELETE FROM block_hashes WHERE height < ?1")
            .or_store()?
            .execute([height])
            .or_store()
    }

    /// Counts an address handed out by wallet `wallet_id` (which bumps the
    /// registry version, so that a loop in any process reads the wallet
    /// again).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn count_reveal(&mut self, wallet_id: WalletId) -> Result<(), StoreError> {
        self.tx()
            .prepare_cached("UPDATE wallets SET reveals = reveals + 1 WHERE wallet_id = ?1")
            .or_store()?
            .execute([wallet_id.0])
            .or_store()?;
        Ok(())
    }

    /// Registers a wallet and returns its new id. `importing_height` is `None`
    /// for a wallet that is in lockstep with the loop from the start, and the
    /// height its import has reached otherwise.
    ///
    /// # Errors
    /// [`StoreError::DuplicateWalletName`] (invalid) if the name is taken;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn insert_wallet(
        &mut self,
        name: &str,
        birth_height: u32,
        importing_height: Option<u32>,
    ) -> Result<WalletId, StoreError> {
        let inserted = self
            .tx()
            .prepare_cached(
                "INSERT INTO wallets (name, birth_height, importing_height, created_at) \
                 VALUES (?1, ?2, ?3, unixepoch())",
            )
            .or_store()?
            .execute(params![name, birth_height, importing_height]);
        match inserted {
            Ok(_) => Ok(WalletId(self.tx().last_insert_rowid())),
            Err(e)
                if e.sqlite_extended_error_code()
                    == Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE) =>
            {
                Err(StoreError::DuplicateWalletName {
                    name: name.to_owned(),
                })
            }
            Err(e) => Err(StoreError::sqlite(e)),
        }
    }

    /// Sets how far a wallet's import has reached (`Some(h)`), or marks it
    /// active, in lockstep with the loop's tip (`None`).
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) if no wallet has this id;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn set_importing_height(
        &mut self,
        wallet_id: WalletId,
        importing_height: Option<u32>,
    ) -> Result<(), StoreError> {
        let changed = self
            .tx()
            .prepare_cached(
                "UPDATE wallets SET importing_height = ?2, importing_hash = NULL WHERE wallet_id = ?1",
            )
            .or_store()?
            .execute(params![wallet_id.0, importing_height])
            .or_store()?;
        if changed == 0 {
            return Err(StoreError::WalletNotFound { wallet_id });
        }
        Ok(())
    }

    /// Parks a wallet the chain loop cannot process, with `error`: at the
    /// height its stored state is synced to (its import's progress if it
    /// was importing, the loop's tip otherwise). The loop leaves it alone
    /// until [`resume_wallet`](Self::resume_wallet). Returns that height.
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) if no wallet has this id;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn park_wallet(&mut self, wallet_id: WalletId, error: &str) -> Result<u32, StoreError> {
        let row = self
            .wallet(wallet_id)?
            .ok_or(StoreError::WalletNotFound { wallet_id })?;
        if let Some(parked) = row.parked {
            return Ok(parked.height);
        }
        let (height, hash) = match row.importing_height {
            Some(height) => (height, row.importing_hash),
            None => match self.tip()? {
                Some((height, hash)) => (height, Some(hash)),
                None => (row.birth_height.saturating_sub(1), None),
            },
        };
        self.tx()
            .prepare_cached(
                "UPDATE wallets SET parked_height = ?2, parked_hash = ?3, parked_error = ?4, \
                 importing_height = NULL, importing_hash = NULL WHERE wallet_id = ?1",
            )
            .or_store()?
            .execute(params![wallet_id.0, height, hash, error])
            .or_store()?;
        Ok(height)
    }

    /// Lowers a parked wallet's height to `height` (whose block is `hash`):
    /// a reorg disconnected what it held above.
    ///
    /// # Errors
    /// Busy (retry), corrupt or full disk (fatal).
    pub fn set_parked_height(
        &mut self,
        wallet_id: WalletId,
        height: u32,
        hash: &BlockHash,
    ) -> Result<(), StoreError> {
        self.tx()
            .prepare_cached(
                "UPDATE wallets SET parked_height = ?2, parked_hash = ?3 \
                 WHERE wallet_id = ?1 AND parked_height IS NOT NULL",
            )
            .or_store()?
            .execute(params![wallet_id.0, height, hash])
            .or_store()?;
        Ok(())
    }

    /// Takes a parked wallet back: it becomes an import from the height it
    /// was parked at, which the chain loop finishes before it goes on.
    /// Returns that height, or `None` if the wallet was not parked.
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) if no wallet has this id;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn resume_wallet(&mut self, wallet_id: WalletId) -> Result<Option<u32>, StoreError> {
        let row = self
            .wallet(wallet_id)?
            .ok_or(StoreError::WalletNotFound { wallet_id })?;
        let Some(parked) = row.parked else {
            return Ok(None);
        };
        self.tx()
            .prepare_cached(
                "UPDATE wallets SET importing_height = ?2, importing_hash = ?3, \
                 parked_height = NULL, parked_hash = NULL, parked_error = NULL WHERE wallet_id = ?1",
            )
            .or_store()?
            .execute(params![wallet_id.0, parked.height, parked.hash])
            .or_store()?;
        Ok(Some(parked.height))
    }

    /// Records that a wallet's import has scanned every block up to
    /// `height`, whose hash is `hash`: a restart resumes after it, once it
    /// has checked that `hash` is still on the best chain.
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) if no wallet has this id;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn set_import_progress(
        &mut self,
        wallet_id: WalletId,
        height: u32,
        hash: &BlockHash,
    ) -> Result<(), StoreError> {
        let changed = self
            .tx()
            .prepare_cached(
                "UPDATE wallets SET importing_height = ?2, importing_hash = ?3 WHERE wallet_id = ?1",
            )
            .or_store()?
            .execute(params![wallet_id.0, height, hash])
            .or_store()?;
        if changed == 0 {
            return Err(StoreError::WalletNotFound { wallet_id });
        }
        Ok(())
    }
}
