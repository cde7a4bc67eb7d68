//! The versioned schema: [`MIGRATIONS`] and the code that applies them.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};
use tracing::info;

use crate::APPLICATION_ID;
use crate::error::{OpenError, SqliteError};

/// The schema migrations, oldest first: `MIGRATIONS[i]` takes a database from
/// version `i` to version `i + 1` (`PRAGMA user_version`).
///
/// Never edit a released entry: append a new one. Each runs inside its own
/// `BEGIN IMMEDIATE` transaction together with the `user_version` bump (and,
/// for the first, the `application_id`), so a crash or an error leaves the
/// file at the previous version.
pub(crate) const MIGRATIONS: &[&str] = &[
    // Version 1: the chain loop's state and the wallet registry.
    //
    // `chain_tip` holds at most one row (id 0), absent until the loop first
    // commits. Every active wallet's synced-to is this tip by construction.
    //
    // `block_hashes` holds the loop's recent block hashes (about 100; the
    // caller prunes) for reorg detection.
    //
    // `wallets.importing_height` is NULL for an active wallet and the height an
    // in-progress import has reached otherwise. AUTOINCREMENT: a wallet id is
    // never reused, even after a deletion, so a stale id cannot name another
    // wallet.
    "
    CREATE TABLE chain_tip (
        id     INTEGER PRIMARY KEY CHECK (id = 0),
        height INTEGER NOT NULL CHECK (height BETWEEN 0 AND 4294967295),
        hash   BLOB    NOT NULL CHECK (length(hash) = 32)
    ) STRICT;

    CREATE TABLE block_hashes (
        height INTEGER PRIMARY KEY CHECK (height BETWEEN 0 AND 4294967295),
        hash   BLOB    NOT NULL CHECK (length(hash) = 32)
    ) STRICT;

    CREATE TABLE wallets (
        wallet_id        INTEGER PRIMARY KEY AUTOINCREMENT,
        name             TEXT    NOT NULL UNIQUE,
        birth_height     INTEGER NOT NULL CHECK (birth_height BETWEEN 0 AND 4294967295),
        importing_height INTEGER NULL CHECK (importing_height BETWEEN 0 AND 4294967295),
        created_at       INTEGER NOT NULL
    ) STRICT;
    ",
    // Version 2: descriptor wallets' keychains and derived scripts.
    //
    // `wallet_keychains` has one row per wallet and keychain (0 external,
    // 1 internal): the public descriptor (never a secret), the network, the
    // lookahead window, the next index to reveal, the highest index seen
    // used on chain, and `derived_to`: scripts `0..derived_to` are stored in
    // `wallet_scripts`, so nothing is derived on the chain loop's hot path.
    "
    CREATE TABLE wallet_keychains (
        wallet_id  INTEGER NOT NULL REFERENCES wallets (wallet_id) ON DELETE CASCADE,
        keychain   INTEGER NOT NULL CHECK (keychain IN (0, 1)),
        network    TEXT    NOT NULL,
        descriptor TEXT    NOT NULL,
        lookahead  INTEGER NOT NULL CHECK (lookahead BETWEEN 1 AND 1000000),
        next_index INTEGER NOT NULL DEFAULT 0 CHECK (next_index BETWEEN 0 AND 2147483648),
        last_used  INTEGER NULL CHECK (last_used BETWEEN 0 AND 2147483647),
        derived_to INTEGER NOT NULL DEFAULT 0 CHECK (derived_to BETWEEN 0 AND 2147483648),
        PRIMARY KEY (wallet_id, keychain)
    ) STRICT;

    CREATE TABLE wallet_scripts (
        wallet_id INTEGER NOT NULL REFERENCES wallets (wallet_id) ON DELETE CASCADE,
        keychain  INTEGER NOT NULL CHECK (keychain IN (0, 1)),
        idx       INTEGER NOT NULL CHECK (idx BETWEEN 0 AND 2147483647),
        script    BLOB    NOT NULL,
        PRIMARY KEY (wallet_id, keychain, idx)
    ) STRICT, WITHOUT ROWID;

    CREATE INDEX wallet_scripts_by_script ON wallet_scripts (script);
    ",
    // Version 3: what wallets own and did.
    //
    // `wallet_coins`: every output paying a wallet script on the best chain,
    // with where it was created and, once spent, by what and where.
    // Disconnecting height h deletes coins created at h and above and
    // un-spends coins spent at h and above: the exact inverse of ingest.
    //
    // `wallet_txs`: every transaction that touched a wallet, with what it
    // paid the wallet and what it spent of it. `height` NULL: unconfirmed
    // (kept only for transactions the wallet broadcast itself, `raw` set).
    "
    CREATE TABLE wallet_coins (
        wallet_id    INTEGER NOT NULL REFERENCES wallets (wallet_id) ON DELETE CASCADE,
        txid         BLOB    NOT NULL CHECK (length(txid) = 32),
        vout         INTEGER NOT NULL CHECK (vout BETWEEN 0 AND 4294967295),
        value        INTEGER NOT NULL CHECK (value BETWEEN 0 AND 2100000000000000),
        script       BLOB    NOT NULL,
        keychain     INTEGER NOT NULL CHECK (keychain IN (0, 1)),
        idx          INTEGER NOT NULL CHECK (idx BETWEEN 0 AND 2147483647),
        height       INTEGER NOT NULL CHECK (height BETWEEN 0 AND 4294967295),
        is_coinbase  INTEGER NOT NULL CHECK (is_coinbase IN (0, 1)),
        spent_txid   BLOB    NULL CHECK (length(spent_txid) = 32),
        spent_height INTEGER NULL CHECK (spent_height BETWEEN 0 AND 4294967295),
        PRIMARY KEY (wallet_id, txid, vout)
    ) STRICT, WITHOUT ROWID;

    CREATE INDEX wallet_coins_by_height ON wallet_coins (wallet_id, height);
    CREATE INDEX wallet_coins_by_spent_height ON wallet_coins (wallet_id, spent_height);

    CREATE TABLE wallet_txs (
        wallet_id INTEGER NOT NULL REFERENCES wallets (wallet_id) ON DELETE CASCADE,
        txid      BLOB    NOT NULL CHECK (length(txid) = 32),
        height    INTEGER NULL CHECK (height BETWEEN 0 AND 4294967295),
        received  INTEGER NOT NULL CHECK (received >= 0),
        sent      INTEGER NOT NULL CHECK (sent >= 0),
        raw       BLOB    NULL,
        PRIMARY KEY (wallet_id, txid)
    ) STRICT, WITHOUT ROWID;

    CREATE INDEX wallet_txs_by_height ON wallet_txs (wallet_id, height);
    ",
    // Version 4: a signing wallet's private descriptor per keychain,
    // encrypted by the wallet crate (Argon2id + XChaCha20-Poly1305) before
    // it gets here. The store never sees a secret in clear.
    "
    ALTER TABLE wallet_keychains ADD COLUMN encrypted_secret BLOB NULL;
    ",
    // Version 5: coin locks. A coin is reserved by at most one holder (an
    // action id): the primary key says so, and a lock goes with its coin
    // when a reorg disconnects the coin.
    "
    CREATE TABLE coin_locks (
        wallet_id INTEGER NOT NULL,
        txid      BLOB    NOT NULL,
        vout      INTEGER NOT NULL,
        holder    TEXT    NOT NULL,
        locked_at INTEGER NOT NULL,
        PRIMARY KEY (wallet_id, txid, vout),
        FOREIGN KEY (wallet_id, txid, vout) REFERENCES wallet_coins (wallet_id, txid, vout) ON DELETE CASCADE
    ) STRICT, WITHOUT ROWID;

    CREATE INDEX coin_locks_by_holder ON coin_locks (holder);
    ",
    // Version 6: a transaction the wallet broadcast can be conflicted: a
    // block spent one of its inputs with another transaction. Cleared when
    // that block is disconnected.
    "
    ALTER TABLE wallet_txs ADD COLUMN conflicted_by BLOB NULL CHECK (length(conflicted_by) = 32);
    ALTER TABLE wallet_txs ADD COLUMN conflicted_height INTEGER NULL;
    ",
    // Version 7: the hash of the block an import has reached, so that an
    // import resumed after a restart can tell whether a reorg while the
    // process was down replaced what it had scanned.
    "
    ALTER TABLE wallets ADD COLUMN importing_hash BLOB NULL CHECK (length(importing_hash) = 32);
    ",
    // Version 8: trust.
    //
    // `block_hashes.bits`: each recent block's difficulty target (compact),
    // so that the loop can weigh its own branch's chain work against a
    // source's after a restart: it follows only a branch with more work.
    //
    // `registry_version` counts changes to the wallet set (a wallet added,
    // an import started or finished), bumped by triggers whoever writes:
    // a chain loop reads this one row in each of its write transactions and
    // picks up a wallet another process registered before it commits past
    // the wallet's payments.
    "
    ALTER TABLE block_hashes ADD COLUMN bits INTEGER NULL CHECK (bits BETWEEN 0 AND 4294967295);

    CREATE TABLE registry_version (
        id      INTEGER PRIMARY KEY CHECK (id = 0),
        version INTEGER NOT NULL
    ) STRICT;
    INSERT INTO registry_version (id, version) VALUES (0, 0);

    CREATE TRIGGER wallet_added AFTER INSERT ON wallets
    BEGIN
        UPDATE registry_version SET version = version + 1 WHERE id = 0;
    END;

    CREATE TRIGGER wallet_import_changed AFTER UPDATE OF importing_height ON wallets
    WHEN (OLD.importing_height IS NULL) != (NEW.importing_height IS NULL)
    BEGIN
        UPDATE registry_version SET version = version + 1 WHERE id = 0;
    END;
    ",
    // v9: how many addresses each wallet has handed out. A process that
    // reveals an address bumps it, and through the trigger the registry
    // version: the chain loop (perhaps in another process) reads its live
    // instance of that wallet again and watches the new scripts before it
    // commits another block.
    "
    ALTER TABLE wallets ADD COLUMN reveals INTEGER NOT NULL DEFAULT 0 CHECK (reveals >= 0);

    CREATE TRIGGER wallet_revealed AFTER UPDATE OF reveals ON wallets
    BEGIN
        UPDATE registry_version SET version = version + 1 WHERE id = 0;
    END;
    ",
    // v10: durable actions. `action_checkpoints` holds each live action's
    // last persisted step (its state, encoded by the actions crate), written
    // in the same transaction as the coin locks and wallet changes of that
    // step; `action_outcomes` keeps how each finished action ended, so that
    // a restarted caller can ask. A coin lock may expire at a height: an
    // action renews its locks while it lives, so the coins of an action
    // that can never resume come back on their own (NULL: never, e.g. the
    // inputs of a transaction already broadcast).
    "
    CREATE TABLE action_checkpoints (
        id         TEXT    PRIMARY KEY,
        namespace  TEXT    NOT NULL,
        wallet_id  INTEGER NOT NULL REFERENCES wallets (wallet_id),
        step       INTEGER NOT NULL CHECK (step >= 0),
        attempts   INTEGER NOT NULL CHECK (attempts >= 0),
        state      BLOB    NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE action_outcomes (
        id          TEXT    PRIMARY KEY,
        namespace   TEXT    NOT NULL,
        wallet_id   INTEGER NOT NULL REFERENCES wallets (wallet_id),
        outcome     TEXT    NOT NULL,
        detail      TEXT    NOT NULL,
        finished_at INTEGER NOT NULL
    ) STRICT;

    ALTER TABLE coin_locks ADD COLUMN expires_at INTEGER NULL CHECK (expires_at >= 0);
    ",
    // v11: unconfirmed transactions seen in the chain source's mempool.
    // They are `wallet_txs` rows with no height and their raw bytes, like
    // the wallet's own broadcasts, and `from_mempool = 1`: such a row goes
    // when its transaction leaves the mempool unconfirmed (replaced,
    // evicted). The wallet's own broadcasts stay, with `left_mempool = 1`
    // while the source's mempool does not hold them (they no longer count
    // as pending), since the action that made one may broadcast it again.
    "
    ALTER TABLE wallet_txs ADD COLUMN from_mempool INTEGER NOT NULL DEFAULT 0 CHECK (from_mempool IN (0, 1));
    ALTER TABLE wallet_txs ADD COLUMN left_mempool INTEGER NOT NULL DEFAULT 0 CHECK (left_mempool IN (0, 1));
    ",
    // v12: parked wallets. A wallet the chain loop could not process (its
    // stored state is corrupt, say) is parked: `parked_height` is the
    // height its state is synced to (and `parked_hash` that block's hash,
    // when known), `parked_error` why. The loop serves every other wallet
    // meanwhile; resuming the wallet turns it into an import from the
    // parked height. Parking and resuming bump the registry version, so a
    // loop in another process sees it at its next commit.
    "
    ALTER TABLE wallets ADD COLUMN parked_height INTEGER NULL CHECK (parked_height BETWEEN 0 AND 4294967295);
    ALTER TABLE wallets ADD COLUMN parked_hash BLOB NULL CHECK (parked_hash IS NULL OR length(parked_hash) = 32);
    ALTER TABLE wallets ADD COLUMN parked_error TEXT NULL;

    CREATE TRIGGER wallet_park_changed AFTER UPDATE OF parked_height ON wallets
    WHEN (OLD.parked_height IS NULL) != (NEW.parked_height IS NULL)
    BEGIN
        UPDATE registry_version SET version = version + 1 WHERE id = 0;
    END;
    ",
];

/// The latest schema version this build knows.
pub(crate) fn latest_version() -> i32 {
    version_count(MIGRATIONS)
}

fn version_count(migrations: &[&str]) -> i32 {
    i32::try_from(migrations.len()).expect("fewer than 2^31 migrations")
}

fn user_version(conn: &Connection) -> rusqlite::Result<i32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Brings the database up to `migrations.len()`, one transaction per step.
/// A database already at that version is only read.
pub(crate) fn migrate(
    conn: &mut Connection,
    path: &Path,
    migrations: &[&str],
) -> Result<(), OpenError> {
    let latest = version_count(migrations);
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_owned(),
        source: SqliteError::new(source),
    };
    // Fast path: an up-to-date file takes no write lock at all.
    if user_version(conn).map_err(sqlite)? == latest {
        return Ok(());
    }
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        // Read again under the write lock: another process may have migrated.
        let version = user_version(&tx).map_err(sqlite)?;
        if version > latest {
            return Err(OpenError::TooNew {
                path: path.to_owned(),
                found: version,
                supported: latest,
            });
        }
        if version == latest {
            return Ok(());
        }
        if version < 0 {
            return Err(OpenError::Corrupt {
                path: path.to_owned(),
                detail: format!("negative schema version {version}"),
                source: None,
            });
        }
        if version > 0 {
            let application_id: i32 = tx
                .pragma_query_value(None, "application_id", |row| row.get(0))
                .map_err(sqlite)?;
            if application_id != APPLICATION_ID {
                return Err(OpenError::Foreign {
                    path: path.to_owned(),
                    application_id,
                });
            }
        }
        let next = version + 1;
        let failed = |source| OpenError::Migration {
            path: path.to_owned(),
            version: next,
            source: SqliteError::new(source),
        };
        // `version` is in 0..latest here, so the index is in bounds.
        let sql = migrations[usize::try_from(version).expect("non-negative")];
        tx.execute_batch(sql).map_err(failed)?;
        if version == 0 {
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(failed)?;
        }
        tx.pragma_update(None, "user_version", next)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
        info!(path = %path.display(), version = next, "migrated store schema");
    }
}
