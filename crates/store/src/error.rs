//! Errors of the store: one enum per operation ([`OpenError`] for
//! [`Store::open`](crate::Store::open), [`StoreError`] for transactions), each
//! answering "what can the caller do?" through [`ErrorKind`].

use std::fmt;
use std::path::PathBuf;

use rusqlite::ErrorCode;

use crate::WalletId;

pub use lockstep_error::ErrorKind;

/// An error reported by SQLite.
///
/// Kept opaque so that no other crate depends on the SQLite binding; its
/// [`Display`](fmt::Display) is SQLite's message.
#[derive(Debug)]
pub struct SqliteError(rusqlite::Error);

impl SqliteError {
    pub(crate) fn new(source: rusqlite::Error) -> Self {
        Self(source)
    }

    /// SQLite's extended result code, if SQLite itself reported the error
    /// (see <https://sqlite.org/rescode.html>).
    pub fn code(&self) -> Option<i32> {
        self.0.sqlite_extended_error_code()
    }

    /// What the caller can do: busy or locked is [`ErrorKind::Retryable`]; a
    /// constraint or size violation is [`ErrorKind::Invalid`]; anything else
    /// (corruption, full disk, I/O, a value of the wrong type in the file) is
    /// [`ErrorKind::Fatal`].
    pub fn kind(&self) -> ErrorKind {
        match self.0.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ErrorKind::Retryable,
            Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig) => ErrorKind::Invalid,
            _ => ErrorKind::Fatal,
        }
    }

    /// Whether SQLite reported the file as corrupt or not a database.
    pub(crate) fn is_corrupt(&self) -> bool {
        matches!(
            self.0.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        )
    }

    /// Whether a value read back does not have the type or range the schema
    /// promises (the file was changed behind our back).
    fn is_bad_value(&self) -> bool {
        matches!(
            self.0,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
        )
    }
}

impl fmt::Display for SqliteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SqliteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Why [`Store::open`](crate::Store::open) failed.
///
/// For every variant but [`OpenError::Io`], [`OpenError::Sqlite`] and
/// [`OpenError::Migration`], the existing file was left exactly as it was:
/// it was only read, and no `-wal` or `-shm` file was created next to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file exists but does not start with SQLite's magic header.
    /// Kind: [`ErrorKind::Invalid`] (wrong path).
    #[error("{} is not an SQLite database", path.display())]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file is an SQLite database that belongs to some other program (its
    /// `application_id` is not [`APPLICATION_ID`](crate::APPLICATION_ID)).
    /// Kind: [`ErrorKind::Invalid`] (wrong path).
    #[error(
        "{} is an SQLite database of another application (application_id {application_id:#x})",
        path.display()
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The `application_id` found in the file.
        application_id: i32,
    },
    /// The file (or its directory) cannot be written: SQLite would open it
    /// read-only and fail at the first write. Kind: [`ErrorKind::Invalid`]
    /// (give the process write access, or open another path).
    #[error("{} is read-only for this process", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer lockstep whose schema this build does
    /// not know. Kind: [`ErrorKind::Invalid`] (upgrade lockstep).
    #[error(
        "{} has schema version {found}, this build supports up to {supported}",
        path.display()
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// The schema version (`user_version`) found in the file.
        found: i32,
        /// The latest schema version this build knows.
        supported: i32,
    },
    /// The file is damaged (failed `PRAGMA quick_check`, or SQLite reported
    /// it corrupt while reading it). Kind: [`ErrorKind::Fatal`] (restore a
    /// backup).
    #[error("{} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the check reported.
        detail: String,
        /// SQLite's error, if the damage surfaced as one.
        #[source]
        source: Option<SqliteError>,
    },
    /// SQLite could not switch the file to write-ahead logging (for example
    /// on a file system without shared memory). Kind: [`ErrorKind::Fatal`].
    #[error("{} cannot use WAL journaling (journal_mode is {journal_mode})", path.display())]
    WalUnavailable {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        journal_mode: String,
    },
    /// Creating, reading or inspecting the file failed, or the writer thread
    /// could not be started. Kind: [`ErrorKind::Fatal`].
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed while opening or configuring the connection. Kind: that
    /// of the source ([`ErrorKind::Retryable`] if another process held the
    /// database locked for longer than the busy timeout).
    #[error("SQLite failed to open {}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: SqliteError,
    },
    /// A schema migration failed; its transaction was rolled back, so the file
    /// stays at the previous version. Kind: [`ErrorKind::Retryable`] if the
    /// database was busy, else [`ErrorKind::Fatal`].
    #[error("migrating {} to schema version {version} failed", path.display())]
    Migration {
        /// The file.
        path: PathBuf,
        /// The version the failed migration would have reached.
        version: i32,
        /// SQLite's error.
        #[source]
        source: SqliteError,
    },
}

impl OpenError {
    /// What the caller can do; see each variant.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotADatabase { .. }
            | Self::Foreign { .. }
            | Self::TooNew { .. }
            | Self::ReadOnly { .. } => ErrorKind::Invalid,
            Self::Corrupt { .. } | Self::WalUnavailable { .. } | Self::Io { .. } => {
                ErrorKind::Fatal
            }
            Self::Sqlite { source, .. } => source.kind(),
            Self::Migration { source, .. } => match source.kind() {
                ErrorKind::Retryable => ErrorKind::Retryable,
                _ => ErrorKind::Fatal,
            },
        }
    }
}

/// Why a transaction ([`Store::write`](crate::Store::write),
/// [`Store::read`](crate::Store::read) and their blocking twins) or one of its
/// typed operations failed. Whenever a transaction returns an error, nothing
/// it did was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database was busy or locked by another process for longer than the
    /// busy timeout. Kind: [`ErrorKind::Retryable`].
    #[error("the database is busy")]
    Busy {
        /// SQLite's error.
        #[source]
        source: SqliteError,
    },
    /// The database file is damaged, or holds a value the schema does not
    /// allow. Kind: [`ErrorKind::Fatal`].
    #[error("the database is corrupt: {detail}")]
    Corrupt {
        /// What was wrong.
        detail: String,
        /// SQLite's error, if the damage surfaced as one.
        #[source]
        source: Option<SqliteError>,
    },
    /// Any other SQLite failure (full disk, I/O error, ...). Kind: that of the
    /// source, almost always [`ErrorKind::Fatal`].
    #[error("SQLite failed")]
    Sqlite {
        /// SQLite's error.
        #[source]
        source: SqliteError,
    },
    /// The writer thread is gone, or the runtime is shutting down, so the
    /// transaction's outcome is unknown to this call. Kind:
    /// [`ErrorKind::Fatal`].
    #[error("the store's writer thread is gone")]
    Closed,
    /// The caller's closure panicked; the transaction was rolled back and the
    /// store keeps working. Kind: [`ErrorKind::Fatal`] (a bug in the caller:
    /// retrying would panic again).
    #[error("a transaction closure panicked: {message}")]
    Panicked {
        /// The panic's message.
        message: String,
    },
    /// A blocking write was started from inside a write closure, which would
    /// deadlock the writer thread. Kind: [`ErrorKind::Invalid`].
    #[error("write_blocking called from inside a write transaction")]
    Reentrant,
    /// A wallet with this name already exists. Kind: [`ErrorKind::Invalid`].
    #[error("a wallet named {name:?} already exists")]
    DuplicateWalletName {
        /// The name asked for.
        name: String,
    },
    /// A coin is already locked by another holder. Kind:
    /// [`ErrorKind::Invalid`].
    #[error("output {vout} of the coin is already locked by another holder")]
    CoinLocked {
        /// The output index of the coin.
        vout: u32,
    },
    /// No wallet has this id. Kind: [`ErrorKind::Invalid`].
    #[error("no wallet has id {wallet_id}")]
    WalletNotFound {
        /// The id asked for.
        wallet_id: WalletId,
    },
    /// The loop's lock file (see [`Store::try_claim_loop`](crate::Store::try_claim_loop))
    /// could not be opened or locked. Kind: [`ErrorKind::Fatal`].
    #[error("cannot use the lock file {}", path.display())]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An amount above the 21 million BTC money supply was to be written:
    /// it is refused, never clamped. Kind: [`ErrorKind::Invalid`].
    #[error("amount of {sats} sat is above the money supply")]
    AmountOutOfRange {
        /// The amount, in satoshis.
        sats: u64,
    },
}

impl StoreError {
    /// What the caller can do; see each variant.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Busy { .. } => ErrorKind::Retryable,
            Self::Corrupt { .. } | Self::Closed | Self::Panicked { .. } | Self::LockFile { .. } => {
                ErrorKind::Fatal
            }
            Self::Sqlite { source } => source.kind(),
            Self::Reentrant
            | Self::DuplicateWalletName { .. }
            | Self::CoinLocked { .. }
            | Self::WalletNotFound { .. }
            | Self::AmountOutOfRange { .. } => ErrorKind::Invalid,
        }
    }

    /// Classifies an error from SQLite.
    pub(crate) fn sqlite(source: rusqlite::Error) -> Self {
        let source = SqliteError::new(source);
        if source.is_corrupt() {
            Self::Corrupt {
                detail: source.to_string(),
                source: Some(source),
            }
        } else if source.is_bad_value() {
            Self::Corrupt {
                detail: format!("unexpected value in the database: {source}"),
                source: Some(source),
            }
        } else if source.kind() == ErrorKind::Retryable {
            Self::Busy { source }
        } else {
            Self::Sqlite { source }
        }
    }

    /// A [`StoreError::Panicked`] from a caught panic's payload.
    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        Self::Panicked { message }
    }
}

/// `?`-friendly conversion of SQLite results, kept private so that the
/// binding's error type is not part of the public API.
pub(crate) trait SqlResultExt<T> {
    /// Converts the error with [`StoreError::sqlite`].
    fn or_store(self) -> Result<T, StoreError>;
}

impl<T> SqlResultExt<T> for rusqlite::Result<T> {
    fn or_store(self) -> Result<T, StoreError> {
        self.map_err(StoreError::sqlite)
    }
}
