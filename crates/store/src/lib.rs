//! lockstep's one SQLite database: every wallet, the chain loop's state and
//! every action checkpoint live in one file, and only this crate
//! speaks SQL. Other crates call typed methods on a transaction handle
//! ([`WriteTx`], [`ReadTx`]) inside a closure they pass to [`Store::write`] or
//! [`Store::read`], so the chain loop can ingest a block for many wallets and
//! move its tip in ONE transaction. The crate does not depend on `bitcoin`:
//! hashes are `[u8; 32]` ([`BlockHash`]) and heights `u32`.
//!
//! # Opening
//!
//! [`Store::open`] creates a missing file with mode 0o600 *before* SQLite
//! opens it, so the database and SQLite's `-wal`/`-shm` files (which copy its
//! mode) are readable by the owner only. An existing file is validated first
//! through a connection that writes nothing (not even `-wal`/`-shm` files):
//! SQLite's magic header, our [`APPLICATION_ID`], a schema version this build
//! knows, and `PRAGMA quick_check`. A wrong path therefore fails with a typed
//! [`OpenError`] and leaves the file byte-for-byte as it was. Only then is the
//! read-write connection opened, switched to WAL and migrated; migrations are
//! versioned (`PRAGMA user_version`) and each runs in its own transaction.
//!
//! # Durability: `synchronous=FULL`
//!
//! A committed block must survive a power cut: the invariant is that a crash
//! at any instant loses nothing that was committed, and that a restart
//! reaches the same state as an uninterrupted run. In WAL mode with
//! `synchronous=NORMAL`, SQLite does not sync the WAL at each commit, so a
//! power loss (not a mere process crash) can roll back the last commits even
//! though `COMMIT` returned, and the events published after them would then
//! describe a state that no longer exists. With `FULL`, the WAL is synced at
//! every commit. Measured on the project's machines
//! (`shared/design/limits.md`), one transaction of 100 UPDATEs + 50 INSERTs
//! costs 1.70 ms with `FULL` against 1.51 ms with `NORMAL`: durability is
//! cheap, and batching blocks during catch-up amortises it further.
//!
//! # Concurrency: one writer thread, pooled readers
//!
//! SQLite allows one writer at a time anyway. A dedicated OS thread owns the
//! read-write connection and runs write jobs, fed through a channel, one after
//! another. Compared with `spawn_blocking` per write this:
//! - serialises writers without lock contention and without `SQLITE_BUSY`
//!   inside the process (busy can only come from another process);
//! - keeps the connection's prepared-statement cache warm (every hot
//!   statement is `prepare_cached`);
//! - never ties up tokio's blocking pool behind a queue of writers, and never
//!   runs SQLite on a tokio worker: the async caller only awaits a oneshot
//!   reply.
//!
//! Reads go to `spawn_blocking` with a small pool of reusable read-only
//! connections, because WAL readers run in parallel with each other and with
//! the writer; each read runs in one deferred transaction, so it sees one
//! consistent snapshot. The cost: a write pays a channel hop and a thread
//! wake-up (microseconds, against a commit's ~1.7 ms fsync), and a write
//! closure must be `Send + 'static` (it runs on another thread), so it owns
//! its inputs and returns its outputs. No lock guard or transaction ever
//! lives across an `.await`.
//!
//! # Errors
//!
//! One enum per operation, [`OpenError`] and [`StoreError`]; each has
//! `kind()` returning an [`ErrorKind`]: [`Retryable`](ErrorKind::Retryable)
//! (busy, locked, timeout), [`Invalid`](ErrorKind::Invalid) (the caller's
//! input was bad) or [`Fatal`](ErrorKind::Fatal) (corrupt database, full
//! disk, writer gone: stop cleanly).
//!
//! # Example
//!
//! ```
//! use lockstep_store::{Store, StoreError, StoreOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default()).unwrap();
//! let id = store
//!     .write_blocking(|tx| {
//!         let id = tx.insert_wallet("alice", 100, None)?;
//!         tx.set_tip(100, &[7; 32])?;
//!         Ok::<_, StoreError>(id)
//!     })
//!     .unwrap();
//! let (wallet, tip) = store
//!     .read_blocking(move |tx| Ok::<_, StoreError>((tx.wallet(id)?, tx.tip()?)))
//!     .unwrap();
//! assert_eq!(wallet.unwrap().name, "alice");
//! assert_eq!(tip, Some((100, [7; 32])));
//! ```

mod actions;
mod error;
#[doc(hidden)]
pub mod faults;
mod open;
mod schema;
mod store;
mod tx;
mod wallet_tables;

#[cfg(test)]
mod tests;

pub use actions::{Checkpoint, CheckpointRow, LockExpiry, OutcomeRow, Stop};
pub use error::{ErrorKind, OpenError, SqliteError, StoreError};
pub use open::StoreOptions;
pub use store::{LoopClaim, Store};
pub use tx::{BlockHash, Parked, ReadTx, WalletId, WalletRow, WriteTx};
pub use wallet_tables::{
    CoinRow, Disconnected, KeychainRow, NewKeychain, PendingBroadcast, UnconfirmedRow, WalletTxRow,
};

/// The `application_id` stamped in every lockstep database's header ("LKST"),
/// so that [`Store::open`] recognises its own files and refuses others'.
pub const APPLICATION_ID: i32 = 0x4C4B_5354;
