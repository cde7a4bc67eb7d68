//! Durable actions' rows: each live action's checkpoint, how finished
//! actions ended, and the expiry heights of their coin locks.
//!
//! The actions crate encodes an action's state; the store keeps the bytes.
//! A checkpoint is written in the same transaction as whatever else its
//! step changed (coin locks, a transaction recorded as broadcast), so that
//! after a crash the database holds either the step entirely or not at all.

use rusqlite::{OptionalExtension as _, params};

use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

/// One live action's last persisted step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// The action's stable id (derived from its identity).
    pub id: String,
    /// The kind of action, which decodes `state`.
    pub namespace: String,
    /// The wallet it acts on.
    pub wallet_id: WalletId,
    /// How many steps it has persisted.
    pub step: u64,
    /// Failed attempts at the current step.
    pub attempts: u32,
    /// The action's encoded state.
    pub state: Vec<u8>,
}

/// How a finished action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRow {
    /// The action's id.
    pub id: String,
    /// Its kind.
    pub namespace: String,
    /// The wallet it acted on.
    pub wallet_id: WalletId,
    /// `done`, `failed`, `stopped` or `expired`.
    pub outcome: String,
    /// What it did or why it failed.
    pub detail: String,
}

/// How a persisted step leaves its action's coin locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockExpiry {
    /// As they are (the tip is not known yet, so no height to expire at).
    Unchanged,
    /// Never expire: they guard a transaction persisted for broadcast.
    Never,
    /// Expire when a block reaches this height.
    At(u32),
}

/// A checkpoint as an action's step persists it: the row, and the expiry
/// the action's coin locks take with it. Written in one transaction (with
/// the wallet change of the step, if any), so that after a crash the step
/// is there entirely or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The checkpoint.
    pub row: CheckpointRow,
    /// The holder the action's coins are locked under.
    pub holder: String,
    /// The expiry its locks take.
    pub locks: LockExpiry,
}

/// What [`WriteTx::stop_action`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The action was live and is stopped.
    Stopped,
    /// No live action has that id.
    NotFound,
    /// It holds a transaction persisted for broadcast, which can still
    /// confirm: left running.
    BroadcastPending,
}

fn checkpoint_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: row.get(0)?,
        namespace: row.get(1)?,
        wallet_id: WalletId::from_i64(row.get(2)?),
        step: crate::wallet_tables::get_u64(row, 3)?,
        attempts: row.get(4)?,
        state: row.get(5)?,
    })
}

const CHECKPOINT_COLUMNS: &str = "id, namespace, wallet_id, step, attempts, state";

impl ReadTx<'_> {
    /// The checkpoint of action `id`, if it is live.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn checkpoint(&self, id: &str) -> Result<Option<CheckpointRow>, StoreError> {
        self.tx
            .prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM action_checkpoints WHERE id = ?1"
            ))
            .or_store()?
            .query_row([id], checkpoint_from_row)
            .optional()
            .or_store()
    }

    /// Every live action's checkpoint, oldest first.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn checkpoints(&self) -> Result<Vec<CheckpointRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM action_checkpoints ORDER BY created_at, id"
            ))
            .or_store()?;
        let rows = stmt.query_map([], checkpoint_from_row).or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// How action `id` ended, if it has.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn action_outcome(&self, id: &str) -> Result<Option<OutcomeRow>, StoreError> {
        self.tx
            .prepare_cached(
                "SELECT id, namespace, wallet_id, outcome, detail FROM action_outcomes WHERE id = ?1",
            )
            .or_store()?
            .query_row([id], |row| {
                Ok(OutcomeRow {
                    id: row.get(0)?,
                    namespace: row.get(1)?,
                    wallet_id: WalletId::from_i64(row.get(2)?),
                    outcome: row.get(3)?,
                    detail: row.get(4)?,
                })
            })
            .optional()
            .or_store()
    }

    /// How many of `holder`'s coin locks never expire (they guard a
    /// transaction persisted for broadcast).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn guarded_locks(&self, holder: &str) -> Result<u64, StoreError> {
        self.tx
            .prepare_cached(
                "SELECT count(*) FROM coin_locks WHERE holder = ?1 AND expires_at IS NULL",
            )
            .or_store()?
            .query_row([holder], |row| crate::wallet_tables::get_u64(row, 0))
            .or_store()
    }

    /// How many coins are locked, by holder (every wallet).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn lock_holders(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT holder, count(*) FROM coin_locks GROUP BY holder ORDER BY holder",
            )
            .or_store()?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get(0)?, crate::wallet_tables::get_u64(row, 1)?))
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }
}

impl WriteTx<'_> {
    /// Writes (creates or replaces) an action's checkpoint.
    ///
    /// # Errors
    /// [`StoreError`]: an unknown wallet (invalid), busy (retry), corrupt
    /// or full disk (fatal).
    pub fn put_checkpoint(&mut self, row: &CheckpointRow) -> Result<(), StoreError> {
        // Steps count one per persisted step: never near 2^63.
        let step = i64::try_from(row.step).unwrap_or(i64::MAX);
        self.read
            .tx
            .prepare_cached(
                "INSERT INTO action_checkpoints (id, namespace, wallet_id, step, attempts, state, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch(), unixepoch()) \
                 ON CONFLICT (id) DO UPDATE SET namespace = ?2, wallet_id = ?3, step = ?4, attempts = ?5, \
                 state = ?6, updated_at = unixepoch()",
            )
            .or_store()?
            .execute(params![
                row.id,
                row.namespace,
                row.wallet_id.as_i64(),
                step,
                row.attempts,
                row.state
            ])
            .or_store()?;
        Ok(())
    }

    /// Writes a step's checkpoint and sets its action's coin locks' expiry
    /// (see [`Checkpoint`]).
    ///
    /// # Errors
    /// As [`WriteTx::put_checkpoint`].
    pub fn put_step(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.put_checkpoint(&checkpoint.row)?;
        match checkpoint.locks {
            LockExpiry::Unchanged => {}
            LockExpiry::Never => {
                self.set_lock_expiry(&checkpoint.holder, None)?;
            }
            LockExpiry::At(height) => {
                self.set_lock_expiry(&checkpoint.holder, Some(height))?;
            }
        }
        Ok(())
    }

    /// Removes an action's checkpoint and records how it ended, releasing
    /// every coin lock `holder` still has (in one transaction: a finished
    /// action never keeps a coin). Returns whether a checkpoint was there.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn finish_action(
        &mut self,
        outcome: &OutcomeRow,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let removed = self
            .read
            .tx
            .prepare_cached("DELETE FROM action_checkpoints WHERE id = ?1")
            .or_store()?
            .execute([&outcome.id])
            .or_store()?;
        self.read
            .tx
            .prepare_cached(
                "INSERT OR REPLACE INTO action_outcomes (id, namespace, wallet_id, outcome, detail, finished_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, unixepoch())",
            )
            .or_store()?
            .execute(params![
                outcome.id,
                outcome.namespace,
                outcome.wallet_id.as_i64(),
                outcome.outcome,
                outcome.detail
            ])
            .or_store()?;
        self.release_locks(holder)?;
        Ok(removed > 0)
    }

    /// Stops live action `id` by hand: removes its checkpoint and releases
    /// `holder`'s coin locks, recording the outcome `stopped` with
    /// `detail`, in one transaction. Refused while a lock of `holder`
    /// guards a broadcast, unless `force`.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn stop_action(
        &mut self,
        id: &str,
        holder: &str,
        force: bool,
        detail: &str,
    ) -> Result<Stop, StoreError> {
        let Some(row) = self.checkpoint(id)? else {
            return Ok(Stop::NotFound);
        };
        if !force && self.guarded_locks(holder)? > 0 {
            return Ok(Stop::BroadcastPending);
        }
        self.finish_action(
            &OutcomeRow {
                id: row.id,
                namespace: row.namespace,
                wallet_id: row.wallet_id,
                outcome: "stopped".into(),
                detail: detail.to_owned(),
            },
            holder,
        )?;
        Ok(Stop::Stopped)
    }

    /// Sets the expiry height of every coin lock `holder` has (`None`:
    /// never). Returns how many locks it changed.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_lock_expiry(
        &mut self,
        holder: &str,
        expires_at: Option<u32>,
    ) -> Result<usize, StoreError> {
        self.read
            .tx
            .prepare_cached("UPDATE coin_locks SET expires_at = ?2 WHERE holder = ?1")
            .or_store()?
            .execute(params![holder, expires_at])
            .or_store()
    }

    /// Sets the expiry height of `holder`'s locks that have one (the locks
    /// with none, e.g. a broadcast transaction's inputs, stay as they are).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn renew_locks(&mut self, holder: &str, expires_at: u32) -> Result<usize, StoreError> {
        self.read
            .tx
            .prepare_cached(
                "UPDATE coin_locks SET expires_at = ?2 WHERE holder = ?1 AND expires_at IS NOT NULL",
            )
            .or_store()?
            .execute(params![holder, expires_at])
            .or_store()
    }

    /// Releases every coin lock whose expiry height is at or below
    /// `height`. Returns how many.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn expire_locks(&mut self, height: u32) -> Result<usize, StoreError> {
        self.read
            .tx
            .prepare_cached(
                "DELETE FROM coin_locks WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            )
            .or_store()?
            .execute([height])
            .or_store()
    }
}
