//! Unit tests of the store: opening (good and bad files), migrations,
//! transactions (atomicity, panics, errors) and concurrency.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use crate::schema::{MIGRATIONS, latest_version, migrate};
use crate::{
    APPLICATION_ID, BlockHash, ErrorKind, OpenError, Store, StoreError, StoreOptions, WalletId,
};

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("lockstep.db")
}

fn open(path: &Path) -> Store {
    Store::open(path, StoreOptions::default()).expect("open store")
}

/// The names of the files in `dir`.
fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn hash(n: u32) -> BlockHash {
    let mut hash = [0u8; 32];
    hash[..4].copy_from_slice(&n.to_le_bytes());
    hash[31] = 0xAA;
    hash
}

fn raw(path: &Path) -> Connection {
    Connection::open(path).unwrap()
}

fn pragma_i64(conn: &Connection, name: &str) -> i64 {
    conn.pragma_query_value(None, name, |row| row.get(0))
        .unwrap()
}

/// A closed lockstep database with some rows in it.
fn make_ours(path: &Path, block_hashes: u32) {
    let store = open(path);
    store
        .write_blocking(move |tx| {
            for height in 0..block_hashes {
                tx.put_block_hash(height, &hash(height))?;
            }
            tx.insert_wallet("w", 0, None)?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
}

/// Scribbles over the header of the page in the middle of the file, which
/// (with thousands of block hashes) belongs to the `block_hashes` table.
fn corrupt_middle_page(path: &Path) {
    let mut data = fs::read(path).unwrap();
    let page_size = usize::from(u16::from_be_bytes([data[16], data[17]]));
    let offset = (data.len() / page_size / 2) * page_size;
    data[offset..offset + 64].fill(0xFF);
    fs::write(path, data).unwrap();
}

// ---------------------------------------------------------------- opening

/// Builds a file at the given path.
type MakeFile = fn(&Path);

struct BadFile {
    name: &'static str,
    make: MakeFile,
    expect: fn(&OpenError) -> bool,
    kind: ErrorKind,
}

const BAD_FILES: &[BadFile] = &[
    BadFile {
        name: "text_file",
        make: |path| fs::write(path, "not a database, just text\n".repeat(40)).unwrap(),
        expect: |e| matches!(e, OpenError::NotADatabase { .. }),
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "shorter_than_the_magic",
        make: |path| fs::write(path, b"SQLite").unwrap(),
        expect: |e| matches!(e, OpenError::NotADatabase { .. }),
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "foreign_application_id_zero_with_tables",
        make: |path| {
            raw(path)
                .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
                .unwrap();
        },
        expect: |e| {
            matches!(
                e,
                OpenError::Foreign {
                    application_id: 0,
                    ..
                }
            )
        },
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "foreign_application_id_in_wal_mode",
        make: |path| {
            raw(path)
                .execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA application_id = 4660; \
                     CREATE TABLE t (x); INSERT INTO t VALUES (1);",
                )
                .unwrap();
        },
        expect: |e| {
            matches!(
                e,
                OpenError::Foreign {
                    application_id: 4660,
                    ..
                }
            )
        },
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "blank_but_with_a_user_version",
        make: |path| raw(path).execute_batch("PRAGMA user_version = 3;").unwrap(),
        expect: |e| {
            matches!(
                e,
                OpenError::Foreign {
                    application_id: 0,
                    ..
                }
            )
        },
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "too_new",
        make: |path| {
            make_ours(path, 3);
            raw(path)
                .pragma_update(None, "user_version", latest_version() + 1)
                .unwrap();
        },
        expect: |e| {
            matches!(e, OpenError::TooNew { found, supported, .. }
                if *found == latest_version() + 1 && *supported == latest_version())
        },
        kind: ErrorKind::Invalid,
    },
    BadFile {
        name: "corrupt_table_page",
        make: |path| {
            make_ours(path, 2000);
            corrupt_middle_page(path);
        },
        expect: |e| matches!(e, OpenError::Corrupt { .. }),
        kind: ErrorKind::Fatal,
    },
    BadFile {
        name: "garbage_after_the_magic",
        make: |path| {
            let mut data = b"SQLite format 3\0".to_vec();
            data.extend_from_slice(&[0xAB; 4096]);
            fs::write(path, data).unwrap();
        },
        expect: |e| matches!(e, OpenError::Corrupt { .. }),
        kind: ErrorKind::Fatal,
    },
    BadFile {
        name: "truncated",
        make: |path| {
            make_ours(path, 2000);
            let len = fs::metadata(path).unwrap().len();
            fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        },
        expect: |e| matches!(e, OpenError::Corrupt { .. }),
        kind: ErrorKind::Fatal,
    },
];

#[test]
fn bad_files_are_refused_and_left_untouched() {
    for case in BAD_FILES {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        (case.make)(&path);
        let bytes = fs::read(&path).unwrap();
        let files = listing(dir.path());
        assert_eq!(
            files,
            BTreeSet::from(["lockstep.db".to_owned()]),
            "{}: setup left side files",
            case.name
        );

        let err = Store::open(&path, StoreOptions::default())
            .expect_err(&format!("{}: opened a bad file", case.name));

        assert!(
            (case.expect)(&err),
            "{}: unexpected error {err:?}",
            case.name
        );
        assert_eq!(err.kind(), case.kind, "{}: kind of {err:?}", case.name);
        assert!(
            fs::read(&path).unwrap() == bytes,
            "{}: the file changed",
            case.name
        );
        assert_eq!(listing(dir.path()), files, "{}: side files left", case.name);
    }
}

#[test]
fn corrupt_file_opens_without_integrity_check() {
    // quick_check is what finds damage away from the header; without it the
    // file opens (and the damage surfaces later as StoreError::Corrupt).
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    make_ours(&path, 6000);
    corrupt_middle_page(&path);
    let options = StoreOptions {
        verify_integrity: false,
        ..StoreOptions::default()
    };
    let store = Store::open(&path, options).expect("opens without quick_check");
    let err = store
        .read_blocking(|tx| tx.recent_block_hashes(usize::MAX))
        .expect_err("damaged page read");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Fatal);
}

#[test]
fn new_file_is_owner_only_wal_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    store
        .write_blocking(|tx| {
            tx.set_tip(1, &hash(1))?;
            // The writer connection's settings.
            let conn = &tx.read.tx;
            assert_eq!(pragma_i64(conn, "synchronous"), 2, "FULL");
            assert_eq!(pragma_i64(conn, "foreign_keys"), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();

    for file in ["lockstep.db", "lockstep.db-wal", "lockstep.db-shm"] {
        let mode = fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: mode {mode:o}");
    }
    let conn = raw(&path);
    let journal_mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(journal_mode, "wal");
    assert_eq!(
        pragma_i64(&conn, "user_version"),
        i64::from(latest_version())
    );
    assert_eq!(
        pragma_i64(&conn, "application_id"),
        i64::from(APPLICATION_ID)
    );
}

#[test]
fn blank_files_are_treated_as_new() {
    let cases: &[(&str, MakeFile)] = &[
        ("empty_file", |path| fs::write(path, b"").unwrap()),
        ("blank_sqlite_file", |path| {
            raw(path)
                .execute_batch("CREATE TABLE t (x); DROP TABLE t;")
                .unwrap();
        }),
    ];
    for (name, make) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        make(&path);
        let store =
            Store::open(&path, StoreOptions::default()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let wallets = store.read_blocking(|tx| tx.wallets()).unwrap();
        assert!(wallets.is_empty(), "{name}");
        drop(store);
        assert_eq!(
            pragma_i64(&raw(&path), "user_version"),
            i64::from(latest_version()),
            "{name}"
        );
    }
}

#[test]
fn reopening_keeps_data_and_runs_no_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    make_ours(&path, 5);
    // Hold the write lock from elsewhere: an up-to-date file must open without
    // needing it (no migration transaction is even begun).
    let holder = raw(&path);
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let options = StoreOptions {
        busy_timeout: Duration::from_millis(10),
        ..StoreOptions::default()
    };
    let store = Store::open(&path, options).expect("reopen while another holds the write lock");
    let (tip, hashes, wallets) = store
        .read_blocking(|tx| {
            Ok::<_, StoreError>((tx.tip()?, tx.recent_block_hashes(10)?, tx.wallets()?))
        })
        .unwrap();
    assert_eq!(tip, None);
    assert_eq!(hashes.len(), 5);
    assert_eq!(wallets.len(), 1);
    holder.execute_batch("ROLLBACK").unwrap();
}

#[test]
fn second_store_on_a_live_file() {
    // The -wal file exists while the first store is open: validation reads
    // through it.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = open(&path);
    first
        .write_blocking(|tx| tx.insert_wallet("a", 1, None).map(drop))
        .unwrap();
    assert!(dir.path().join("lockstep.db-wal").exists());
    let second = open(&path);
    second
        .write_blocking(|tx| tx.insert_wallet("b", 2, None).map(drop))
        .unwrap();
    let names: Vec<String> = first
        .read_blocking(|tx| tx.wallets())
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn dropping_the_last_handle_closes_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    let clone = store.clone();
    clone.write_blocking(|tx| tx.set_tip(3, &hash(3))).unwrap();
    drop(store);
    assert!(
        dir.path().join("lockstep.db-wal").exists(),
        "one handle left"
    );
    drop(clone);
    // The writer checkpointed and removed its side files.
    assert_eq!(
        listing(dir.path()),
        BTreeSet::from(["lockstep.db".to_owned()])
    );
    let tip = open(&path).read_blocking(|tx| tx.tip()).unwrap();
    assert_eq!(tip, Some((3, hash(3))));
}

// ------------------------------------------------------------- migrations

#[test]
fn migrations_move_forward_one_transaction_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    make_ours(&path, 1); // at version 1
    let next: Vec<&str> = MIGRATIONS
        .iter()
        .copied()
        .chain(["CREATE TABLE later (x INTEGER) STRICT;"])
        .collect();
    let mut conn = raw(&path);
    migrate(&mut conn, &path, &next).unwrap();
    assert_eq!(
        pragma_i64(&conn, "user_version"),
        i64::from(latest_version()) + 1
    );
    conn.execute("INSERT INTO later VALUES (1)", []).unwrap();
    // Idempotent.
    migrate(&mut conn, &path, &next).unwrap();
    // The shipped list now sees a file that is too new.
    let err = migrate(&mut conn, &path, MIGRATIONS).unwrap_err();
    assert!(matches!(err, OpenError::TooNew { .. }), "{err:?}");
}

#[test]
fn failed_migration_leaves_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    make_ours(&path, 1);
    let broken: Vec<&str> = MIGRATIONS
        .iter()
        .copied()
        .chain(["CREATE TABLE fine (x); CREATE TABLE wallets (x);"])
        .collect();
    let mut conn = raw(&path);
    let err = migrate(&mut conn, &path, &broken).unwrap_err();
    assert!(
        matches!(err, OpenError::Migration { version, .. } if version == latest_version() + 1),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert_eq!(
        pragma_i64(&conn, "user_version"),
        i64::from(latest_version())
    );
    let fine: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'fine'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(fine, 0, "the failed migration's first statement was kept");
}

// ------------------------------------------------------------ transactions

#[derive(Debug)]
enum TestError {
    Store(#[expect(dead_code, reason = "shown by Debug in failure messages")] StoreError),
    Rejected,
}

impl From<StoreError> for TestError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Writes several wallets, the tip and hashes; then fails or not.
fn many_wallets(tx: &mut crate::WriteTx<'_>, fail: bool) -> Result<Vec<WalletId>, TestError> {
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(tx.insert_wallet(&format!("wallet-{i}"), 10 * i, Some(i))?);
    }
    tx.set_importing_height(ids[0], None)?;
    tx.set_tip(42, &hash(42))?;
    tx.put_block_hash(42, &hash(42))?;
    // Reads see the transaction's own writes.
    assert_eq!(tx.wallets()?.len(), 5);
    assert_eq!(tx.tip()?, Some((42, hash(42))));
    if fail {
        return Err(TestError::Rejected);
    }
    Ok(ids)
}

#[test]
fn a_failing_closure_leaves_nothing_and_a_succeeding_one_commits_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));

    let err = store
        .write_blocking(|tx| many_wallets(tx, true))
        .unwrap_err();
    assert!(matches!(err, TestError::Rejected), "{err:?}");
    let (wallets, tip, hash42) = store
        .read_blocking(|tx| Ok::<_, StoreError>((tx.wallets()?, tx.tip()?, tx.block_hash(42)?)))
        .unwrap();
    assert!(wallets.is_empty());
    assert_eq!(tip, None);
    assert_eq!(hash42, None);

    let ids = store.write_blocking(|tx| many_wallets(tx, false)).unwrap();
    let (wallets, tip) = store
        .read_blocking(|tx| Ok::<_, StoreError>((tx.wallets()?, tx.tip()?)))
        .unwrap();
    assert_eq!(tip, Some((42, hash(42))));
    assert_eq!(wallets.iter().map(|w| w.wallet_id).collect::<Vec<_>>(), ids);
    assert_eq!(wallets[0].importing_height, None);
    assert_eq!(wallets[3].importing_height, Some(3));
    assert_eq!(wallets[3].birth_height, 30);
    assert!(wallets[3].created_at > 1_600_000_000);
}

#[tokio::test]
async fn async_write_is_atomic_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let err = store.write(|tx| many_wallets(tx, true)).await.unwrap_err();
    assert!(matches!(err, TestError::Rejected));
    let ids = store.write(|tx| many_wallets(tx, false)).await.unwrap();
    let wallets = store.read(|tx| tx.wallets()).await.unwrap();
    assert_eq!(wallets.len(), ids.len());
}

#[test]
fn wallet_registry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let (a, b) = store
        .write_blocking(|tx| {
            let a = tx.insert_wallet("alice", 100, None)?;
            let b = tx.insert_wallet("bob", 200, Some(150))?;
            // A failed statement does not end the transaction.
            let dup = tx.insert_wallet("alice", 1, None).unwrap_err();
            assert!(
                matches!(&dup, StoreError::DuplicateWalletName { name } if name == "alice"),
                "{dup:?}"
            );
            assert_eq!(dup.kind(), ErrorKind::Invalid);
            let missing = WalletId::from_i64(999);
            let err = tx.set_importing_height(missing, None).unwrap_err();
            assert!(
                matches!(err, StoreError::WalletNotFound { wallet_id } if wallet_id == missing),
                "{err:?}"
            );
            assert_eq!(err.kind(), ErrorKind::Invalid);
            tx.set_importing_height(b, Some(180))?;
            Ok::<_, StoreError>((a, b))
        })
        .unwrap();
    assert!(a < b);
    assert_eq!(WalletId::from_i64(a.as_i64()), a);
    assert_eq!(b.to_string(), b.as_i64().to_string());

    let (alice, bob, nobody, by_id) = store
        .read_blocking(move |tx| {
            Ok::<_, StoreError>((
                tx.wallet_by_name("alice")?,
                tx.wallet_by_name("bob")?,
                tx.wallet_by_name("carol")?,
                tx.wallet(b)?,
            ))
        })
        .unwrap();
    let alice = alice.unwrap();
    assert_eq!((alice.wallet_id, alice.birth_height), (a, 100));
    assert_eq!(alice.importing_height, None);
    let bob = bob.unwrap();
    assert_eq!(bob.importing_height, Some(180));
    assert_eq!(by_id, Some(bob));
    assert_eq!(nobody, None);

    // Ids are never reused, even after the newest wallet is gone.
    store
        .write_blocking(move |tx| {
            tx.read
                .tx
                .execute("DELETE FROM wallets WHERE wallet_id = ?1", [b.as_i64()])
                .unwrap();
            let c = tx.insert_wallet("carol", 0, None)?;
            assert!(c > b);
            Ok::<_, StoreError>(())
        })
        .unwrap();
}

#[test]
fn block_hash_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    store
        .write_blocking(|tx| {
            for height in 0..10 {
                tx.put_block_hash(height, &hash(height))?;
            }
            assert_eq!(
                tx.recent_block_hashes(3)?,
                vec![(9, hash(9)), (8, hash(8)), (7, hash(7))]
            );
            assert_eq!(tx.delete_block_hashes_above(7)?, 2);
            assert_eq!(tx.prune_block_hashes_below(5)?, 5);
            // A reorg replaces the hash at a height.
            tx.put_block_hash(7, &hash(700))?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
    let (all, six, four) = store
        .read_blocking(|tx| {
            Ok::<_, StoreError>((
                tx.recent_block_hashes(100)?,
                tx.block_hash(6)?,
                tx.block_hash(4)?,
            ))
        })
        .unwrap();
    assert_eq!(all, vec![(7, hash(700)), (6, hash(6)), (5, hash(5))]);
    assert_eq!(six, Some(hash(6)));
    assert_eq!(four, None);
    assert_eq!(
        store.read_blocking(|tx| tx.recent_block_hashes(0)).unwrap(),
        vec![]
    );
}

#[test]
fn tip_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    for (height, h) in [(0, hash(0)), (u32::MAX, hash(1)), (5, hash(5))] {
        store
            .write_blocking(move |tx| tx.set_tip(height, &h))
            .unwrap();
        let tip = store.read_blocking(|tx| tx.tip()).unwrap();
        assert_eq!(tip, Some((height, h)));
    }
}

#[test]
fn a_panicking_closure_is_reported_and_the_store_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let err = store
        .write_blocking(|tx| -> Result<(), StoreError> {
            tx.insert_wallet("half-done", 0, None)?;
            panic!("boom in write");
        })
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Panicked { message } if message == "boom in write"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Fatal);

    let err = store
        .read_blocking(|_| -> Result<(), StoreError> { panic!("boom {}", "in read") })
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Panicked { message } if message == "boom in read"),
        "{err:?}"
    );

    store
        .write_blocking(|tx| tx.insert_wallet("after", 0, None).map(drop))
        .unwrap();
    let names: Vec<String> = store
        .read_blocking(|tx| tx.wallets())
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["after"]);
}

#[tokio::test]
async fn async_panics_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let err = store
        .write(|_| -> Result<(), StoreError> { panic!("async write") })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Panicked { .. }), "{err:?}");
    let err = store
        .read(|_| -> Result<(), StoreError> { panic!("async read") })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Panicked { .. }), "{err:?}");
    store.write(|tx| tx.set_tip(1, &hash(1))).await.unwrap();
    assert_eq!(store.read(|tx| tx.tip()).await.unwrap(), Some((1, hash(1))));
}

#[test]
fn nested_blocking_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let inner = store.clone();
    let err = store
        .write_blocking(move |_| inner.write_blocking(|tx| tx.set_tip(1, &hash(1))))
        .unwrap_err();
    assert!(matches!(err, StoreError::Reentrant), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

#[test]
fn a_write_lock_held_elsewhere_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let options = StoreOptions {
        busy_timeout: Duration::from_millis(20),
        ..StoreOptions::default()
    };
    let store = Store::open(&path, options).unwrap();
    let holder = raw(&path);
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = store
        .write_blocking(|tx| tx.set_tip(1, &hash(1)))
        .unwrap_err();
    assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Retryable);
    // Readers are not blocked by a writer.
    assert_eq!(store.read_blocking(|tx| tx.tip()).unwrap(), None);
    holder.execute_batch("ROLLBACK").unwrap();
    store.write_blocking(|tx| tx.set_tip(1, &hash(1))).unwrap();
}

#[test]
fn error_kinds() {
    let path = PathBuf::from("x.db");
    let open_cases: &[(&str, OpenError, ErrorKind)] = &[
        (
            "not_a_database",
            OpenError::NotADatabase { path: path.clone() },
            ErrorKind::Invalid,
        ),
        (
            "foreign",
            OpenError::Foreign {
                path: path.clone(),
                application_id: 1,
            },
            ErrorKind::Invalid,
        ),
        (
            "too_new",
            OpenError::TooNew {
                path: path.clone(),
                found: 9,
                supported: 1,
            },
            ErrorKind::Invalid,
        ),
        (
            "corrupt",
            OpenError::Corrupt {
                path: path.clone(),
                detail: String::new(),
                source: None,
            },
            ErrorKind::Fatal,
        ),
        (
            "io",
            OpenError::Io {
                path: path.clone(),
                source: std::io::Error::other("disk"),
            },
            ErrorKind::Fatal,
        ),
    ];
    for (name, err, kind) in open_cases {
        assert_eq!(err.kind(), *kind, "{name}");
    }

    let sqlite = |code: std::ffi::c_int| {
        StoreError::sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    };
    let store_cases: &[(&str, StoreError, ErrorKind)] = &[
        (
            "busy",
            sqlite(rusqlite::ffi::SQLITE_BUSY),
            ErrorKind::Retryable,
        ),
        (
            "locked",
            sqlite(rusqlite::ffi::SQLITE_LOCKED),
            ErrorKind::Retryable,
        ),
        (
            "corrupt",
            sqlite(rusqlite::ffi::SQLITE_CORRUPT),
            ErrorKind::Fatal,
        ),
        (
            "not_a_db",
            sqlite(rusqlite::ffi::SQLITE_NOTADB),
            ErrorKind::Fatal,
        ),
        ("full", sqlite(rusqlite::ffi::SQLITE_FULL), ErrorKind::Fatal),
        (
            "ioerr",
            sqlite(rusqlite::ffi::SQLITE_IOERR),
            ErrorKind::Fatal,
        ),
        ("closed", StoreError::Closed, ErrorKind::Fatal),
        (
            "bad_value",
            StoreError::sqlite(rusqlite::Error::IntegralValueOutOfRange(0, -1)),
            ErrorKind::Fatal,
        ),
    ];
    for (name, err, kind) in store_cases {
        assert_eq!(err.kind(), *kind, "{name}: {err:?}");
    }
    assert!(matches!(store_cases[0].1, StoreError::Busy { .. }));
    assert!(matches!(store_cases[2].1, StoreError::Corrupt { .. }));
    assert!(matches!(store_cases[3].1, StoreError::Corrupt { .. }));
    assert!(matches!(store_cases[7].1, StoreError::Corrupt { .. }));
    // The source chain is kept.
    let err = sqlite(rusqlite::ffi::SQLITE_FULL);
    assert!(std::error::Error::source(&err).is_some());
}

// ------------------------------------------------------------- concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_readers() {
    const TASKS: u32 = 32;
    const ITERATIONS: u32 = 50;
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let readers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut snapshots = 0u32;
                let mut last_seen = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let (tip, recent) = store
                        .read(|tx| Ok::<_, StoreError>((tx.tip()?, tx.recent_block_hashes(1)?)))
                        .await
                        .unwrap();
                    match tip {
                        None => assert!(recent.is_empty(), "hashes without a tip"),
                        Some((height, tip_hash)) => {
                            assert_eq!(tip_hash, hash(height), "tip hash");
                            assert_eq!(recent, vec![(height, hash(height))], "snapshot torn");
                            assert!(height >= last_seen, "tip went back");
                            last_seen = height;
                        }
                    }
                    snapshots += 1;
                }
                snapshots
            })
        })
        .collect();

    let writers: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..ITERATIONS {
                    store
                        .write(|tx| {
                            let height = tx.tip()?.map_or(0, |(height, _)| height) + 1;
                            tx.set_tip(height, &hash(height))?;
                            tx.put_block_hash(height, &hash(height))?;
                            tx.prune_block_hashes_below(height.saturating_sub(100))?;
                            Ok::<_, StoreError>(())
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut snapshots = 0;
    for reader in readers {
        snapshots += reader.await.unwrap();
    }
    assert!(snapshots > 0);

    let (tip, kept) = store
        .read(|tx| Ok::<_, StoreError>((tx.tip()?, tx.recent_block_hashes(usize::MAX)?)))
        .await
        .unwrap();
    assert_eq!(tip, Some((TASKS * ITERATIONS, hash(TASKS * ITERATIONS))));
    assert_eq!(kept.len(), 101);
}

/// A database file this process may not write is refused when it is
/// opened, with a typed error, instead of failing opaquely at the first
/// write. As root, permission bits do not stop writes, so the file is also
/// made immutable (`chattr +i`); where neither works (root without
/// `chattr`), the test says so and checks nothing.
#[test]
fn a_read_only_file_is_refused_at_open() {
    use std::process::Command;

    /// Makes the file mutable again, so the temporary directory goes.
    struct Mutable(PathBuf, bool);
    impl Drop for Mutable {
        fn drop(&mut self) {
            if self.1 {
                let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
            }
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    make_ours(&path, 3);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    let writable = fs::OpenOptions::new().write(true).open(&path).is_ok();
    let immutable = writable
        && Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
    let _mutable = Mutable(path.clone(), immutable);
    if writable && !immutable {
        eprintln!("skipped: running as root without chattr, no file can be made read-only");
        return;
    }
    let before = fs::read(&path).unwrap();
    let err = Store::open(&path, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::ReadOnly { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(fs::read(&path).unwrap(), before, "left as it was");
}

/// Dropping the last handle on a runtime's worker does not wait for the
/// writer: with a 500 ms write in progress, the task that drops it returns
/// at once; the write still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_on_a_worker_does_not_wait_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    let (started, has_started) = tokio::sync::oneshot::channel();
    let writer = store.clone();
    let write = tokio::spawn(async move {
        writer
            .write(move |tx| {
                let _ = started.send(());
                std::thread::sleep(Duration::from_millis(500));
                tx.set_tip(7, &hash(7))
            })
            .await
    });
    has_started.await.unwrap();
    // The write is on the writer thread; its caller goes away (the
    // transaction still runs), leaving `store` the last handle.
    write.abort();
    assert!(write.await.unwrap_err().is_cancelled());
    let took = tokio::spawn(async move {
        let start = std::time::Instant::now();
        drop(store);
        start.elapsed()
    })
    .await
    .unwrap();
    assert!(took < Duration::from_millis(200), "drop took {took:?}");
    // The writer finishes the write on its own: reopened, it is there.
    let reopened = tokio::task::spawn_blocking(move || open(&path))
        .await
        .unwrap();
    let mut tip = None;
    for _ in 0..100 {
        tip = reopened.read(|tx| tx.tip()).await.unwrap();
        if tip.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tip, Some((7, hash(7))));
}

#[test]
fn a_checkpoint_is_replaced_step_by_step_and_finishing_keeps_only_the_outcome() {
    use crate::{CheckpointRow, OutcomeRow};
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let wallet = store
        .write_blocking(|tx| tx.insert_wallet("w", 0, None))
        .unwrap();
    let row = move |step: u64, state: &[u8]| CheckpointRow {
        id: "send-1".into(),
        namespace: "send".into(),
        wallet_id: wallet,
        step,
        attempts: 0,
        state: state.to_vec(),
    };
    store
        .write_blocking(move |tx| {
            tx.put_checkpoint(&row(1, b"selected"))?;
            tx.put_checkpoint(&row(2, b"signed"))
        })
        .unwrap();
    let (one, all) = store
        .read_blocking(|tx| Ok::<_, StoreError>((tx.checkpoint("send-1")?, tx.checkpoints()?)))
        .unwrap();
    assert_eq!(one, Some(row(2, b"signed")));
    assert_eq!(all, vec![row(2, b"signed")]);
    // A checkpoint for a wallet that does not exist is refused.
    let mut orphan = row(1, b"x");
    orphan.id = "orphan".into();
    orphan.wallet_id = WalletId::from_i64(999);
    let err = store
        .write_blocking(move |tx| tx.put_checkpoint(&orphan))
        .unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Invalid, "{err:?}");

    let outcome = OutcomeRow {
        id: "send-1".into(),
        namespace: "send".into(),
        wallet_id: wallet,
        outcome: "done".into(),
        detail: "confirmed".into(),
    };
    let removed = store
        .write_blocking({
            let outcome = outcome.clone();
            move |tx| tx.finish_action(&outcome, "action-send-1")
        })
        .unwrap();
    assert!(removed);
    let (one, all, ended) = store
        .read_blocking(|tx| {
            Ok::<_, StoreError>((
                tx.checkpoint("send-1")?,
                tx.checkpoints()?,
                tx.action_outcome("send-1")?,
            ))
        })
        .unwrap();
    assert_eq!((one, all.len()), (None, 0));
    assert_eq!(ended, Some(outcome));
}

/// `unconfirmed_tx` finds one row by its key: the same row
/// `unconfirmed_txs` lists, nothing for another wallet or an unknown txid.
#[test]
fn one_unconfirmed_transaction_is_found_by_its_txid() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    store
        .write_blocking(|tx| {
            let a = tx.insert_wallet("a", 0, None)?;
            let b = tx.insert_wallet("b", 0, None)?;
            for (n, wallet) in [(1u8, a), (2, a), (3, b)] {
                let row = crate::WalletTxRow {
                    txid: [n; 32],
                    height: None,
                    received: 1_000 * u64::from(n),
                    sent: 0,
                    conflicted_by: None,
                    from_mempool: true,
                    left_mempool: false,
                };
                assert!(tx.record_from_mempool(wallet, &row, &[n; 60])?);
            }
            let listed = tx.unconfirmed_txs(Some(a))?;
            assert_eq!(listed.len(), 2);
            for row in &listed {
                let found = tx.unconfirmed_tx(a, &row.txid)?.expect("listed, so found");
                assert_eq!(
                    (found.wallet_id, found.txid, &found.raw, found.from_mempool),
                    (row.wallet_id, row.txid, &row.raw, row.from_mempool)
                );
            }
            assert_eq!(
                tx.unconfirmed_tx(a, &[2; 32])?.map(|r| r.raw),
                Some(vec![2; 60])
            );
            assert!(tx.unconfirmed_tx(a, &[3; 32])?.is_none(), "wallet b's");
            assert!(tx.unconfirmed_tx(b, &[9; 32])?.is_none(), "unknown");
            Ok::<_, StoreError>(())
        })
        .unwrap();
}
