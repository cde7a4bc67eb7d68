//! [`Store`]: the handle, its writer thread and its pool of read-only
//! connections.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;
use tracing::{error, warn};

use crate::error::{OpenError, SqlResultExt as _, StoreError};
use crate::open::{StoreOptions, open_reader, open_writer, side_file};
use crate::tx::{ReadTx, WriteTx};

/// A job for the writer thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The one database: a cheap, cloneable handle (`Clone + Send + Sync`) to a
/// writer thread that owns the read-write connection and a pool of read-only
/// connections. See the crate docs for the design.
///
/// When the last handle is dropped, the writer thread finishes the jobs
/// already queued, closes the database and exits. Outside a tokio runtime
/// the drop waits for that (unless it happens on the writer thread itself),
/// so everything is flushed and the file closed when the drop returns.
/// Inside a runtime it does not wait (it may be on a worker thread, which a
/// long write would stall): the writer still finishes every queued job, and
/// the database stays consistent whenever the process exits.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: StoreOptions,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    /// `None` only while dropping.
    writer: Option<JoinHandle<()>>,
    writer_id: ThreadId,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The idle readers close first: SQLite checkpoints the write-ahead
        // log and deletes it when the last connection closes, and only a
        // read-write connection may. Closed after the writer, they would
        // leave the `-wal` and `-shm` files behind.
        drop(std::mem::take(
            &mut *self.readers.lock().unwrap_or_else(PoisonError::into_inner),
        ));
        // Closing the channel lets the writer drain its queue and exit.
        drop(self.jobs.take());
        let Some(writer) = self.writer.take() else {
            return;
        };
        // A closure that held the last handle drops it on the writer thread,
        // which must not wait for itself: it exits once the job returns.
        if writer.thread().id() == thread::current().id() {
            return;
        }
        let path = std::mem::take(&mut self.path);
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside a runtime this may be a worker thread: waiting for the
            // writer to drain its queue (a slow write, a checkpoint) would
            // stall every task on it. The writer finishes on its own once
            // the channel is closed; a detached thread waits for it, only to
            // report a panic.
            let joiner = thread::Builder::new()
                .name("lockstep-store-joiner".to_owned())
                .spawn(move || join_writer(writer, &path));
            if let Err(e) = joiner {
                warn!(error = %e, "no thread to wait for the store writer; it exits on its own");
            }
            return;
        }
        join_writer(writer, &path);
    }
}

/// Waits for the writer thread to finish its queue and exit.
fn join_writer(writer: JoinHandle<()>, path: &Path) {
    if writer.join().is_err() {
        error!(path = %path.display(), "store writer thread panicked");
    }
}

/// The right to run the chain loop on one database file, held until
/// dropped: an exclusive lock on the file `<database>-loop.lock` (an OS
/// advisory lock, released by the kernel when the holder exits or is
/// killed, so a crash never leaves it taken).
///
/// One loop per database: two would commit over each other's tips and
/// import the same wallet twice. A process that does not hold it (the CLI
/// while a daemon syncs, an API server) still registers wallets and
/// starts imports through the database, and the holder's loop picks them
/// up (see [`ReadTx::registry_version`](crate::ReadTx::registry_version)).
#[derive(Debug)]
pub struct LoopClaim {
    _file: std::fs::File,
}

impl Store {
    /// Takes the right to run the chain loop on this database, if no
    /// other holder (in this process or another) has it: `Ok(None)` then.
    ///
    /// # Errors
    /// [`StoreError::LockFile`] (fatal) if the lock file cannot be opened.
    pub fn try_claim_loop(&self) -> Result<Option<LoopClaim>, StoreError> {
        use std::os::unix::fs::OpenOptionsExt as _;

        let path = side_file(&self.inner.path, "-loop.lock");
        let lock_error = |source| StoreError::LockFile {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(LoopClaim { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_error(e)),
        }
    }

    /// Opens the database at `path`, creating it (mode 0o600) if it does not
    /// exist, and brings its schema up to date.
    ///
    /// An existing file is first validated through a connection that writes
    /// nothing: any error below except `Io`, `Sqlite` and `Migration` leaves
    /// it byte-for-byte unchanged with no `-wal`/`-shm` file added. Then the
    /// read-write connection is set to `journal_mode=WAL`,
    /// `synchronous=FULL`, `foreign_keys=ON` and the configured busy timeout,
    /// and pending migrations run, each in its own transaction.
    ///
    /// This does blocking file I/O (and, with
    /// [`StoreOptions::verify_integrity`], reads the whole file): call it from
    /// synchronous code or `spawn_blocking`, not on a tokio worker.
    ///
    /// # Errors
    /// See [`OpenError`]; each variant documents its [`kind`](OpenError::kind).
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, OpenError> {
        let conn = open_writer(path, &options)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let writer = thread::Builder::new()
            .name("lockstep-store-writer".to_owned())
            .spawn(move || writer_loop(conn, queue))
            .map_err(|source| OpenError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                options,
                jobs: Some(jobs),
                writer_id: writer.thread().id(),
                writer: Some(writer),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` inside one write transaction on the writer thread and returns
    /// its result: `BEGIN IMMEDIATE`, then `f`, then `COMMIT` if `f` returned
    /// `Ok` or `ROLLBACK` if it returned `Err`. Writers run one at a time, in
    /// the order they were submitted; the calling task only awaits a reply.
    ///
    /// Contract:
    /// - If `f` returns `Err(e)`, nothing it did is kept and `Err(e)` is
    ///   returned.
    /// - If `COMMIT` fails (busy, full disk, I/O), the transaction is rolled
    ///   back and the converted [`StoreError`] is returned.
    /// - If `f` panics, the transaction is rolled back,
    ///   [`StoreError::Panicked`] is returned and the store keeps working.
    /// - `f` must not block on another write (it would deadlock the writer:
    ///   [`write_blocking`](Self::write_blocking) from inside `f` returns
    ///   [`StoreError::Reentrant`]).
    /// - Cancellation: once submitted, the transaction runs to completion even
    ///   if this future is dropped; only its result is lost.
    ///
    /// # Errors
    /// `f`'s own error, or a [`StoreError`] converted into `E`:
    /// [`Closed`](StoreError::Closed) if the writer thread is gone, and any
    /// error of `BEGIN` or `COMMIT`.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        self.submit(Box::new(move |conn| {
            // The caller may have gone away; its transaction still ran.
            let _ = reply.send(run_write(conn, f));
        }))?;
        result
            .await
            .unwrap_or_else(|_| Err(E::from(StoreError::Closed)))
    }

    /// [`write`](Self::write) for synchronous callers (tests, the CLI): same
    /// contract, blocking the calling thread until the transaction is done.
    ///
    /// Must not be called on a tokio worker thread (it would stall every task
    /// on that worker while the writer works); use [`write`](Self::write)
    /// there. Called from inside a write closure it returns
    /// [`StoreError::Reentrant`] instead of deadlocking.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn write_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        if thread::current().id() == self.inner.writer_id {
            return Err(E::from(StoreError::Reentrant));
        }
        let (reply, result) = mpsc::sync_channel(1);
        self.submit(Box::new(move |conn| {
            let _ = reply.send(run_write(conn, f));
        }))?;
        result
            .recv()
            .unwrap_or_else(|_| Err(E::from(StoreError::Closed)))
    }

    /// Runs `f` inside one read transaction on tokio's blocking pool, with a
    /// pooled read-only connection. `f` sees one consistent snapshot (taken
    /// at its first read) even while writes commit; reads run concurrently
    /// with each other and with the writer.
    ///
    /// If `f` panics, [`StoreError::Panicked`] is returned. If this future is
    /// dropped, the read still runs to completion on the blocking pool.
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    ///
    /// # Errors
    /// `f`'s own error, or a [`StoreError`] converted into `E` (opening a
    /// connection or beginning the transaction failed; the runtime is shutting
    /// down: [`Closed`](StoreError::Closed)).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&ReadTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || inner.run_read(f)).await {
            Ok(result) => result,
            Err(join_error) => Err(E::from(if join_error.is_panic() {
                StoreError::panicked(join_error.into_panic().as_ref())
            } else {
                StoreError::Closed
            })),
        }
    }

    /// [`read`](Self::read) for synchronous callers: same contract, on the
    /// calling thread. Must not be called on a tokio worker thread.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&ReadTx<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        self.inner.run_read(f)
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.inner
            .jobs
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)
    }
}

impl Inner {
    fn run_read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&ReadTx<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let mut conn = self.take_reader().map_err(E::from)?;
        let result = read_in(&mut conn, f);
        self.return_reader(conn);
        result
    }

    fn take_reader(&self) -> Result<Connection, StoreError> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path, &self.options).or_store(),
        }
    }

    fn return_reader(&self, conn: Connection) {
        if !conn.is_autocommit() {
            // The rollback failed; do not reuse a connection stuck in a
            // transaction (it would pin an old snapshot).
            warn!(path = %self.path.display(), "discarding a read connection left in a transaction");
            return;
        }
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if readers.len() < self.options.max_idle_readers {
            readers.push(conn);
        }
    }
}

fn read_in<T, E, F>(conn: &mut Connection, f: F) -> Result<T, E>
where
    F: FnOnce(&ReadTx<'_>) -> Result<T, E>,
    E: From<StoreError>,
{
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .or_store()?;
    let read = ReadTx { tx };
    let result = catch_unwind(AssertUnwindSafe(|| f(&read)));
    // Dropping the transaction rolls it back, ending the snapshot.
    drop(read);
    match result {
        Ok(result) => result,
        Err(payload) => Err(E::from(StoreError::panicked(payload.as_ref()))),
    }
}

fn writer_loop(mut conn: Connection, queue: mpsc::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        job(&mut conn);
        if !conn.is_autocommit() {
            // Only if a ROLLBACK itself failed; never carry a transaction over
            // into the next job.
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                error!(error = %e, "store writer could not roll back");
            }
        }
    }
    // The last connection to close checkpoints the WAL into the main file.
    if let Err((_, e)) = conn.close() {
        warn!(error = %e, "closing the store's writer connection failed");
    }
}

/// One write transaction on the writer thread.
fn run_write<T, E, F>(conn: &mut Connection, f: F) -> Result<T, E>
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, E>,
    E: From<StoreError>,
{
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_store()?;
    let mut write = WriteTx {
        read: ReadTx { tx },
        serial: next_serial(),
        after_commit: std::cell::RefCell::new(Vec::new()),
    };
    match catch_unwind(AssertUnwindSafe(|| f(&mut write))) {
        Ok(Ok(value)) => {
            let after_commit = write.after_commit.take();
            crate::faults::before_commit();
            if crate::faults::active(crate::faults::Fault::CommitFails) {
                rollback(write);
                return Err(E::from(crate::faults::commit_failed()));
            }
            // If COMMIT fails, dropping the transaction rolls it back.
            write.read.tx.commit().or_store().map_err(E::from)?;
            for f in after_commit {
                f();
            }
            Ok(value)
        }
        Ok(Err(e)) => {
            rollback(write);
            Err(e)
        }
        Err(payload) => {
            rollback(write);
            let e = StoreError::panicked(payload.as_ref());
            warn!(error = %e, "write transaction rolled back");
            Err(E::from(e))
        }
    }
}

/// The next write transaction's number (unique in the process).
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn rollback(write: WriteTx<'_>) {
    if let Err(e) = write.read.tx.rollback() {
        error!(error = %e, "rolling back a write transaction failed");
    }
}
