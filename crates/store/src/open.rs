//! Opening the database file: create it owner-only, or validate an existing
//! one without writing a byte, then configure the writer connection and
//! migrate.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tracing::debug;

use crate::APPLICATION_ID;
use crate::error::{OpenError, SqliteError};
use crate::schema::{MIGRATIONS, latest_version, migrate};

/// How [`Store::open`](crate::Store::open) opens the database.
///
/// Build it with struct update syntax:
/// `StoreOptions { verify_integrity: false, ..StoreOptions::default() }`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Run `PRAGMA quick_check` on an existing file before using it (default
    /// `true`). It reads the whole file, so it costs time proportional to its
    /// size; turn it off only where start-up time matters more than finding
    /// damage early.
    pub verify_integrity: bool,
    /// How long a connection waits for a lock held by another process before
    /// failing with a [`Retryable`](crate::ErrorKind::Retryable) error
    /// (default 5 s).
    pub busy_timeout: Duration,
    /// How many idle read-only connections to keep for reuse (default 4).
    /// More concurrent reads than this still run, on extra connections that
    /// are closed afterwards.
    pub max_idle_readers: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            verify_integrity: true,
            busy_timeout: Duration::from_secs(5),
            max_idle_readers: 4,
        }
    }
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Opens (creating if needed), validates, configures and migrates the
/// database; returns the read-write connection.
pub(crate) fn open_writer(path: &Path, options: &StoreOptions) -> Result<Connection, OpenError> {
    if !create_or_is_empty(path)? {
        validate(path, options)?;
    }
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| sqlite_error(path, source))?;
    // SQLite opens a file it may not write read-only without a word, and
    // the first write would fail as an opaque error deep in the loop.
    if conn
        .is_readonly(rusqlite::MAIN_DB)
        .map_err(|source| sqlite_error(path, source))?
    {
        return Err(OpenError::ReadOnly {
            path: path.to_owned(),
        });
    }
    configure_writer(&conn, path, options)?;
    migrate(&mut conn, path, MIGRATIONS)?;
    debug!(path = %path.display(), "store opened");
    Ok(conn)
}

/// Opens one pooled read-only connection.
pub(crate) fn open_reader(path: &Path, options: &StoreOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(options.busy_timeout)?;
    Ok(conn)
}

fn io_error(path: &Path, source: io::Error) -> OpenError {
    OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sqlite_error(path: &Path, source: rusqlite::Error) -> OpenError {
    OpenError::Sqlite {
        path: path.to_owned(),
        source: SqliteError::new(source),
    }
}

/// Creates the file owner-only (0o600) if it does not exist, before SQLite
/// opens it: SQLite gives its `-wal` and `-shm` files the database's mode, so
/// they are owner-only too. Returns whether the file is new (just created, or
/// an existing empty file, whose permissions are left as its owner set them).
fn create_or_is_empty(path: &Path) -> Result<bool, OpenError> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let metadata = fs::metadata(path).map_err(|e| io_error(path, e))?;
            Ok(metadata.is_file() && metadata.len() == 0)
        }
        Err(e) => Err(io_error(path, e)),
    }
}

/// Checks an existing, non-empty file without writing anything: SQLite's
/// magic header, our `application_id`, a schema version we know, and (if
/// asked) `PRAGMA quick_check`.
fn validate(path: &Path, options: &StoreOptions) -> Result<(), OpenError> {
    check_magic(path)?;
    let conn = open_validator(path)?;
    let read_error = |source: rusqlite::Error| {
        let source = SqliteError::new(source);
        if source.is_corrupt() {
            OpenError::Corrupt {
                path: path.to_owned(),
                detail: source.to_string(),
                source: Some(source),
            }
        } else {
            OpenError::Sqlite {
                path: path.to_owned(),
                source,
            }
        }
    };
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(read_error)?;
    let user_version: i32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(read_error)?;
    if application_id != APPLICATION_ID {
        // A blank SQLite file (say, made by `sqlite3 file.db 'VACUUM'`) is
        // nobody's: treat it as new.
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(read_error)?;
        if application_id == 0 && user_version == 0 && objects == 0 {
            debug!(path = %path.display(), "blank SQLite file: treating as new");
            return Ok(());
        }
        return Err(OpenError::Foreign {
            path: path.to_owned(),
            application_id,
        });
    }
    if user_version > latest_version() {
        return Err(OpenError::TooNew {
            path: path.to_owned(),
            found: user_version,
            supported: latest_version(),
        });
    }
    if user_version < 0 {
        return Err(OpenError::Corrupt {
            path: path.to_owned(),
            detail: format!("negative schema version {user_version}"),
            source: None,
        });
    }
    if options.verify_integrity {
        let mut statement = conn.prepare("PRAGMA quick_check(20)").map_err(read_error)?;
        let lines = statement
            .query_map([], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(read_error)?;
        if lines != ["ok"] {
            return Err(OpenError::Corrupt {
                path: path.to_owned(),
                detail: format!("quick_check: {}", lines.join("; ")),
                source: None,
            });
        }
    }
    Ok(())
}

fn check_magic(path: &Path) -> Result<(), OpenError> {
    let mut file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut header = [0u8; 16];
    match file.read_exact(&mut header) {
        Ok(()) if &header == SQLITE_MAGIC => Ok(()),
        Ok(()) => Err(OpenError::NotADatabase {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(OpenError::NotADatabase {
            path: path.to_owned(),
        }),
        Err(e) => Err(io_error(path, e)),
    }
}

/// A read-only connection that creates nothing on disk.
///
/// A plain read-only connection to a WAL-mode file creates `-wal` and `-shm`
/// files and, being unable to checkpoint, leaves them behind. When no `-wal`
/// file exists the main file holds every committed transaction, so we open it
/// `immutable` (no locks, no side files). When a `-wal` file exists (a live
/// writer, or a crash) it holds committed transactions and must be read: a
/// plain read-only connection then uses the side files already there.
fn open_validator(path: &Path) -> Result<Connection, OpenError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let wal = side_file(path, "-wal");
    let wal_exists = wal.try_exists().map_err(|e| io_error(&wal, e))?;
    let opened = if wal_exists {
        Connection::open_with_flags(path, flags)
    } else {
        let uri = immutable_uri(path).map_err(|e| io_error(path, e))?;
        Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
    };
    opened.map_err(|source| sqlite_error(path, source))
}

/// `path` with `suffix` appended to its file name, as SQLite names its side
/// files.
pub(crate) fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A `file:` URI for `path`, read-only and immutable
/// (<https://sqlite.org/uri.html>). Every byte outside the unreserved set is
/// percent-encoded, so any path (even a non-UTF-8 one) round-trips.
fn immutable_uri(path: &Path) -> io::Result<String> {
    let absolute = std::path::absolute(path)?;
    let mut uri = String::from("file://localhost");
    for &byte in absolute.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            write!(uri, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    Ok(uri)
}

fn configure_writer(
    conn: &Connection,
    path: &Path,
    options: &StoreOptions,
) -> Result<(), OpenError> {
    let sqlite = |source| sqlite_error(path, source);
    conn.busy_timeout(options.busy_timeout).map_err(sqlite)?;
    let journal_mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(sqlite)?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::WalUnavailable {
            path: path.to_owned(),
            journal_mode,
        });
    }
    // Durability of every commit; see the crate docs for why and what it costs.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sqlite)?;
    Ok(())
}
