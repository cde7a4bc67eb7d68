//! Per-wallet action slots: one exclusive action per wallet, deadlines in
//! blocks, release on every exit path, early release and shared signer
//! limits.
//!
//! [`Dispatcher`] decides who may act on a wallet. A second action on a busy
//! wallet is refused at once ([`Dispatcher::try_dispatch`] returns
//! [`DispatchError::WalletBusy`]) or waits its turn in a fair FIFO queue
//! ([`Dispatcher::dispatch_wait`]). Each action runs as a tokio task; the
//! slot is freed by a guard's `Drop` inside that task, so it is freed when the
//! action completes, fails, panics, is cancelled (its [`ActionHandle`]
//! dropped or [`ActionHandle::cancel`]led) or expires (its deadline height
//! reached, [`Dispatcher::set_tip`]). A wallet is never busy with an action
//! that no longer runs.
//!
//! The dispatcher knows wallet keys and block heights only: it is generic
//! over the wallet key `K` and depends on no other lockstep crate.

mod error;
mod holder;
mod kind;
mod outcome;
mod slots;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::AbortHandle;
use tracing::Instrument;

pub use error::DispatchError;
pub use holder::{LockHolder, lock_holder};
pub use kind::{ActionKind, ActionSpec, DispatchId};
pub use outcome::{ActionHandle, Outcome};

use slots::{Holder, Slots};

/// What a wallet key must be: compared, hashed, cloned into errors and logs,
/// and shared between tasks.
pub trait WalletKey: Eq + Hash + Clone + Debug + Send + Sync + 'static {}

impl<K: Eq + Hash + Clone + Debug + Send + Sync + 'static> WalletKey for K {}

/// The callback run once for each action that expired (see
/// [`Dispatcher::on_expired`]).
type ExpiredCallback<K> = Arc<dyn Fn(&K, DispatchId, &ActionKind) + Send + Sync>;

/// The value of `Inner::tip` before the first `set_tip`.
const NO_TIP: u64 = u64::MAX;

/// Why an action's task was stopped from outside, if it was.
const RUNNING: u8 = 0;
/// Its handle cancelled it (or was dropped without `detach`).
const CANCELLED: u8 = 1;
/// Its deadline height was reached.
const EXPIRED: u8 = 2;

/// A snapshot of the dispatcher's counters ([`Dispatcher::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Actions started (granted a slot and spawned).
    pub dispatched: u64,
    /// `try_dispatch` calls refused with [`DispatchError::WalletBusy`].
    pub busy_rejections: u64,
    /// `dispatch_wait` calls that gave up with [`DispatchError::Timeout`].
    pub timeouts: u64,
    /// The longest wait queue seen on any one wallet.
    pub deepest_queue: u64,
    /// Actions whose future returned `Ok`.
    pub completed: u64,
    /// Actions whose future returned `Err`.
    pub failed: u64,
    /// Actions that panicked.
    pub panics: u64,
    /// Actions cancelled (handle cancelled or dropped, or the runtime shut
    /// down under them).
    pub cancellations: u64,
    /// Actions stopped because their deadline height was reached.
    pub expirations: u64,
}

/// How many stripes the counters (and action ids) are split into: more than
/// the threads that dispatch at once on any machine we run on.
const STRIPES: usize = 16;

/// Keeps its content on cache lines of its own (128 bytes: x86 prefetches
/// lines in pairs), so that writes to it never evict a neighbour's line
/// from another core.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// The counters behind [`Stats`], striped by thread: each thread counts in
/// its own stripe (and takes action ids from it), so that dispatching from
/// two threads never bounces a shared counter's cache line between their
/// cores. [`Dispatcher::stats`] adds the stripes up.
struct Counters {
    stripes: Box<[Padded<Stripe>]>,
}

impl Counters {
    fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Padded::default()).collect(),
        }
    }

    /// This thread's stripe.
    fn mine(&self) -> &Stripe {
        &self.stripes[stripe_index()].0
    }

    /// A fresh action id: unique because stripe `i` hands out only ids
    /// `n * STRIPES + i + 1`.
    fn next_id(&self) -> DispatchId {
        let index = stripe_index();
        let n = self.stripes[index]
            .0
            .next_id
            .fetch_add(1, Ordering::Relaxed);
        DispatchId::new(n * STRIPES as u64 + index as u64 + 1)
    }
}

/// The stripe of the calling thread (threads are numbered as they first
/// ask, modulo [`STRIPES`]).
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|index| *index)
}

/// One stripe of [`Counters`].
#[derive(Default)]
struct Stripe {
    /// How many ids this stripe handed out.
    next_id: AtomicU64,
    dispatched: AtomicU64,
    busy_rejections: AtomicU64,
    timeouts: AtomicU64,
    deepest_queue: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    panics: AtomicU64,
    cancellations: AtomicU64,
    expirations: AtomicU64,
}

/// The chain tip and the actions that have a deadline, by height.
#[derive(Default)]
struct Deadlines<K> {
    /// The last height given to [`Dispatcher::set_tip`].
    tip: Option<u32>,
    /// Running actions with a deadline, keyed by (deadline, id).
    pending: BTreeMap<(u32, DispatchId), Arc<ActionShared<K>>>,
}

/// State shared by all clones of a [`Dispatcher`].
struct Inner<K> {
    /// The per-wallet slots (sharded; see [`Slots`]).
    slots: Slots<K>,
    /// The tip and the deadline index. One lock, taken only by actions that
    /// have a deadline (at start and end) and by `set_tip`.
    deadlines: Mutex<Deadlines<K>>,
    /// A copy of the tip for lock-free reads (`NO_TIP`: none yet), written
    /// under the `deadlines` lock.
    tip: AtomicU64,
    /// Signing safety margin per kind, in blocks.
    margins: RwLock<HashMap<ActionKind, u32>>,
    /// Named signer limits shared by every wallet.
    signers: RwLock<HashMap<String, Arc<Semaphore>>>,
    /// Run once for each expired action.
    on_expired: RwLock<Option<ExpiredCallback<K>>>,
    /// Counters.
    counters: Counters,
}

impl<K> Inner<K> {
    /// The last height given to `set_tip` (no lock taken).
    fn tip(&self) -> Option<u32> {
        u32::try_from(self.tip.load(Ordering::SeqCst)).ok()
    }
}

/// One running action, shared by its task, its context and its handle.
struct ActionShared<K> {
    id: DispatchId,
    wallet: K,
    kind: ActionKind,
    deadline_height: Option<u32>,
    early_release: bool,
    /// [`RUNNING`], [`CANCELLED`] or [`EXPIRED`]: set once, by whoever stops
    /// the task first.
    reason: AtomicU8,
    /// Set once exclusivity was given up early.
    released_early: AtomicBool,
    /// The task's abort handle, set right after it is spawned (never, for
    /// an action run in its caller's task: [`Dispatcher::try_run`]).
    abort: OnceLock<AbortHandle>,
    /// Notified when the action is stopped, for an action run in its
    /// caller's task (which has no task to abort).
    stopped: Notify,
}

impl<K> ActionShared<K> {
    /// Marks the action stopped for `reason` (unless something else stopped
    /// it first) and aborts its task. Returns whether this call marked it.
    fn stop(&self, reason: u8) -> bool {
        let marked = self
            .reason
            .compare_exchange(RUNNING, reason, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if let Some(abort) = self.abort.get() {
            abort.abort();
        }
        // Stores a permit if the inline run is not waiting yet.
        self.stopped.notify_one();
        marked
    }
}

/// Gives up and cleans up one action's slot, deadline entry and counters
/// when dropped: whatever way its task ends (completion, panic, abort), this
/// runs inside it.
struct Lease<K: WalletKey> {
    inner: InnerRef<K>,
    shared: Arc<ActionShared<K>>,
    /// When the slot was granted.
    granted_at: Instant,
    /// Set when the action's future returned (`Some(is_ok)`).
    finished: Option<bool>,
}

/// Frees an action's slot when dropped (if the action still holds it).
struct FreeSlot<'a, K: WalletKey> {
    inner: &'a Inner<K>,
    shared: &'a ActionShared<K>,
}

impl<K: WalletKey> Drop for FreeSlot<'_, K> {
    fn drop(&mut self) {
        self.inner
            .slots
            .release(&self.shared.wallet, self.shared.id);
    }
}

impl<K: WalletKey> Drop for Lease<K> {
    fn drop(&mut self) {
        let shared = &self.shared;
        // Freed last, after the expiry callback (so that the next action
        // sees the coins it released), and even if that callback panics.
        let _free = FreeSlot {
            inner: &self.inner,
            shared,
        };
        if let Some(deadline) = shared.deadline_height {
            lock(&self.inner.deadlines)
                .pending
                .remove(&(deadline, shared.id));
        }
        let hold_ms = self.granted_at.elapsed().as_secs_f64() * 1e3;
        let c = self.inner.counters.mine();
        let outcome = match self.finished {
            Some(true) => {
                c.completed.fetch_add(1, Ordering::Relaxed);
                "completed"
            }
            Some(false) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                "failed"
            }
            None if std::thread::panicking() => {
                c.panics.fetch_add(1, Ordering::Relaxed);
                "panicked"
            }
            None if shared.reason.load(Ordering::SeqCst) == EXPIRED => {
                c.expirations.fetch_add(1, Ordering::Relaxed);
                let callback = read(&self.inner.on_expired).clone();
                if let Some(callback) = callback {
                    callback(&shared.wallet, shared.id, &shared.kind);
                }
                "expired"
            }
            None => {
                c.cancellations.fetch_add(1, Ordering::Relaxed);
                "cancelled"
            }
        };
        tracing::debug!(
            wallet = ?shared.wallet,
            action_id = shared.id.get(),
            kind = %shared.kind,
            hold_ms,
            outcome,
            "action ended"
        );
    }
}

/// Where a queued `dispatch_wait` learns that the slot passed to it.
type Grant = oneshot::Receiver<()>;

/// A place taken by [`Dispatcher::dispatch_wait`]: the wallet's slot, or a
/// place in its queue. Until disarmed, dropping it gives the place up
/// (leaves the queue, or frees the slot for the next waiter if it was
/// granted meanwhile): a caller that gives up never keeps a wallet or a
/// turn.
struct Place<K: WalletKey> {
    inner: Arc<Inner<K>>,
    wallet: K,
    id: DispatchId,
    armed: bool,
}

impl<K: WalletKey> Place<K> {
    /// Gives up waiting: leaves the queue and returns `false`, or returns
    /// `true` if the slot was granted meanwhile (the caller then holds it).
    fn settle(&mut self) -> bool {
        self.inner.slots.leave(&self.wallet, self.id) == slots::Leave::Granted
    }

    /// The caller holds the slot now (or has left): nothing to undo.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<K: WalletKey> Drop for Place<K> {
    fn drop(&mut self) {
        if self.armed && self.settle() {
            self.inner.slots.release(&self.wallet, self.id);
        }
    }
}

/// What an action's future is given: its identity, early release and signer
/// permits.
pub struct ActionCtx<K: WalletKey> {
    inner: InnerRef<K>,
    shared: Arc<ActionShared<K>>,
}

impl<K: WalletKey> Clone for ActionCtx<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K: WalletKey> Debug for ActionCtx<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionCtx")
            .field("wallet", &self.shared.wallet)
            .field("id", &self.shared.id)
            .field("kind", &self.shared.kind)
            .finish_non_exhaustive()
    }
}

impl<K: WalletKey> ActionCtx<K> {
    /// This action's id.
    pub fn id(&self) -> DispatchId {
        self.shared.id
    }

    /// The wallet this action runs on.
    pub fn wallet(&self) -> &K {
        &self.shared.wallet
    }

    /// This action's kind.
    pub fn kind(&self) -> &ActionKind {
        &self.shared.kind
    }

    /// The height at which this action expires, if it has one.
    pub fn deadline_height(&self) -> Option<u32> {
        self.shared.deadline_height
    }

    /// Gives up the wallet's exclusivity while this action goes on: the next
    /// action on the wallet may start, and this one no longer counts as
    /// busy. Its deadline still applies and its outcome still arrives.
    ///
    /// Returns `true` if the slot was given up by this call; `false` if the
    /// spec did not allow early release ([`ActionSpec::early_release`]) or it
    /// was already given up.
    pub fn release_early(&self) -> bool {
        if !self.shared.early_release || self.shared.released_early.swap(true, Ordering::SeqCst) {
            return false;
        }
        let released = self
            .inner
            .slots
            .release(&self.shared.wallet, self.shared.id);
        tracing::debug!(
            wallet = ?self.shared.wallet,
            action_id = self.shared.id.get(),
            kind = %self.shared.kind,
            "released early"
        );
        released
    }

    /// Checks there is still time to sign: refused once
    /// `tip + margin >= deadline` (the kind's margin, [`Dispatcher::set_margin`]).
    fn check_time_to_sign(&self) -> Result<(), DispatchError<K>> {
        let Some(deadline) = self.shared.deadline_height else {
            return Ok(());
        };
        let Some(tip) = self.inner.tip() else {
            return Ok(());
        };
        let margin = read(&self.inner.margins)
            .get(&self.shared.kind)
            .copied()
            .unwrap_or(0);
        if u64::from(tip) + u64::from(margin) >= u64::from(deadline) {
            return Err(DispatchError::TooLateToSign {
                tip,
                deadline,
                margin,
            });
        }
        Ok(())
    }

    /// Waits for a permit of the named signer limit
    /// ([`Dispatcher::add_signer_limit`]), to be held only while signing.
    ///
    /// Refused with [`DispatchError::TooLateToSign`] once the tip plus this
    /// kind's margin reaches the action's deadline (checked before and again
    /// after waiting for the permit), and with
    /// [`DispatchError::UnknownSigner`] for a name never added.
    pub async fn sign_permit(&self, limit: &str) -> Result<SignPermit, DispatchError<K>> {
        self.check_time_to_sign()?;
        let semaphore = read(&self.inner.signers)
            .get(limit)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownSigner(limit.to_owned()))?;
        let waited = Instant::now();
        // The dispatcher never closes a signer's semaphore.
        let permit = semaphore
            .acquire_owned()
            .await
            .map_err(|_| DispatchError::UnknownSigner(limit.to_owned()))?;
        self.check_time_to_sign()?;
        tracing::debug!(
            wallet = ?self.shared.wallet,
            action_id = self.shared.id.get(),
            limit,
            wait_ms = waited.elapsed().as_secs_f64() * 1e3,
            "signer permit granted"
        );
        Ok(SignPermit { _permit: permit })
    }
}

/// A permit of a signer limit; the signer is free again when it is dropped.
#[derive(Debug)]
pub struct SignPermit {
    _permit: OwnedSemaphorePermit,
}

/// A reference to the dispatcher's shared state, held by each running
/// action (its lease and its context). Each stripe has one of its own
/// ([`Dispatcher::inner_ref`]): cloning and dropping it per action then
/// counts on that stripe's reference count, not on one count every thread
/// writes to (which, with two threads dispatching, costs more than the
/// dispatch itself).
type InnerRef<K> = Arc<Arc<Inner<K>>>;

/// Decides who may act on a wallet: one exclusive action per wallet.
///
/// Cheap to clone (an `Arc` inside); all clones share the slots, tip,
/// margins, signer limits and counters.
pub struct Dispatcher<K: WalletKey> {
    inner: Arc<Inner<K>>,
    /// One [`InnerRef`] per stripe of [`Counters`].
    refs: Arc<[Padded<InnerRef<K>>]>,
}

impl<K: WalletKey> Clone for Dispatcher<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            refs: Arc::clone(&self.refs),
        }
    }
}

impl<K: WalletKey> Debug for Dispatcher<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<K: WalletKey> Default for Dispatcher<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: WalletKey> Dispatcher<K> {
    /// A dispatcher with no tip, no margins and no signer limits.
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            slots: Slots::new(),
            deadlines: Mutex::new(Deadlines {
                tip: None,
                pending: BTreeMap::new(),
            }),
            tip: AtomicU64::new(NO_TIP),
            margins: RwLock::new(HashMap::new()),
            signers: RwLock::new(HashMap::new()),
            on_expired: RwLock::new(None),
            counters: Counters::new(),
        });
        let refs = (0..STRIPES)
            .map(|_| Padded(Arc::new(Arc::clone(&inner))))
            .collect();
        Self { inner, refs }
    }

    /// The calling thread's stripe's reference to the shared state.
    fn inner_ref(&self) -> InnerRef<K> {
        Arc::clone(&self.refs[stripe_index()].0)
    }

    /// Runs `action` on `wallet` if the wallet has no exclusive action;
    /// otherwise returns [`DispatchError::WalletBusy`] at once, naming the
    /// action that holds it.
    ///
    /// The action runs as a task on the current tokio runtime. Action ids
    /// are given by the dispatcher (a counter): unique without the callers
    /// agreeing on anything, and known to the action ([`ActionCtx::id`]) and
    /// the caller ([`ActionHandle::id`]).
    pub fn try_dispatch<F, Fut, T, E>(
        &self,
        wallet: K,
        spec: ActionSpec,
        action: F,
    ) -> Result<ActionHandle<T, E>, DispatchError<K>>
    where
        F: FnOnce(ActionCtx<K>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let id = self.acquire_now(&wallet, &spec, true)?;
        Ok(self.start(wallet, spec, id, Duration::ZERO, action))
    }

    /// Takes `wallet`'s slot for a new action of `spec` and returns its id,
    /// or refuses at once with `WalletBusy`.
    fn acquire_now(
        &self,
        wallet: &K,
        spec: &ActionSpec,
        spawned: bool,
    ) -> Result<DispatchId, DispatchError<K>> {
        self.check_can_start(spec, spawned)?;
        let holder = self.holder_for(spec);
        let id = holder.id;
        if let Err(busy) = self.inner.slots.try_acquire(wallet, holder) {
            self.inner
                .counters
                .mine()
                .busy_rejections
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(wallet = ?wallet, busy_with = busy.id.get(), "wallet busy");
            return Err(DispatchError::WalletBusy {
                wallet: wallet.clone(),
                action_id: busy.id,
                kind: busy.kind,
                started_at_height: busy.started_at_height,
                deadline_height: busy.deadline_height,
            });
        }
        Ok(id)
    }

    /// Like [`Dispatcher::try_dispatch`], but a busy wallet makes it wait
    /// its turn, for at most `timeout`, in a FIFO queue per wallet (grants in
    /// call order). A waiter that gives up (timeout, or this future
    /// dropped) leaves the queue without costing anyone else their turn.
    ///
    /// The place in line is taken when this is called, not when the
    /// future is first polled: a caller can take places for several
    /// actions in a known order (the executor's `resume_all` does, so the
    /// actions it resumes come before any new one) and await them later.
    /// Dropping the future gives the place (or the slot) up.
    pub fn dispatch_wait<F, Fut, T, E>(
        &self,
        wallet: K,
        spec: ActionSpec,
        action: F,
        timeout: Duration,
    ) -> impl Future<Output = Result<ActionHandle<T, E>, DispatchError<K>>> + use<F, Fut, T, E, K>
    where
        F: FnOnce(ActionCtx<K>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let arrived = Instant::now();
        let taken = self.take_place(&wallet, &spec);
        let me = self.clone();
        async move {
            let (mut place, grant) = taken?;
            if let Some(grant) = grant {
                let granted = match tokio::time::timeout(timeout, grant).await {
                    Ok(Ok(())) => true,
                    // Timed out: leave the queue, unless the slot was granted
                    // in the meantime (then take it).
                    _ => place.settle(),
                };
                if !granted {
                    place.disarm();
                    me.inner
                        .counters
                        .mine()
                        .timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(wallet = ?wallet, action_id = place.id.get(), "dispatch_wait timed out");
                    return Err(DispatchError::Timeout {
                        wallet,
                        waited: arrived.elapsed(),
                    });
                }
            }
            let id = place.id;
            place.disarm();
            Ok(me.start(wallet, spec, id, arrived.elapsed(), action))
        }
    }

    /// Takes `wallet`'s slot for a new action of `spec`, or a place in its
    /// queue (then the receiver the grant arrives on).
    fn take_place(
        &self,
        wallet: &K,
        spec: &ActionSpec,
    ) -> Result<(Place<K>, Option<Grant>), DispatchError<K>> {
        self.check_can_start(spec, true)?;
        let holder = self.holder_for(spec);
        let id = holder.id;
        let (tx, rx) = oneshot::channel();
        let queued = self.inner.slots.acquire_or_enqueue(wallet, holder, tx);
        if let Some(depth) = queued {
            self.inner
                .counters
                .mine()
                .deepest_queue
                .fetch_max(depth as u64, Ordering::Relaxed);
        }
        let place = Place {
            inner: Arc::clone(&self.inner),
            wallet: wallet.clone(),
            id,
            armed: true,
        };
        Ok((place, queued.map(|_| rx)))
    }

    /// Refuses an action whose deadline the tip has already reached, and,
    /// if the action is to be spawned, a call made outside a tokio runtime.
    /// (An action run inline needs no runtime to be spawned on; the check
    /// clones the runtime's handle, a count every worker writes to.)
    fn check_can_start(&self, spec: &ActionSpec, spawned: bool) -> Result<(), DispatchError<K>> {
        if spawned && tokio::runtime::Handle::try_current().is_err() {
            return Err(DispatchError::NoRuntime);
        }
        if let (Some(deadline), Some(tip)) = (spec.deadline_height, self.tip())
            && deadline <= tip
        {
            return Err(DispatchError::DeadlinePassed { tip, deadline });
        }
        Ok(())
    }

    /// A fresh action id and the slot entry describing it.
    fn holder_for(&self, spec: &ActionSpec) -> Holder {
        Holder {
            id: self.inner.counters.next_id(),
            kind: spec.kind.clone(),
            started_at_height: self.tip(),
            deadline_height: spec.deadline_height,
        }
    }

    /// Sets up the action that was just granted `wallet`'s slot: its shared
    /// state, the lease that frees the slot whatever happens from here on,
    /// its deadline entry and its tracing span.
    fn admit(
        &self,
        wallet: K,
        spec: ActionSpec,
        id: DispatchId,
        waited: Duration,
    ) -> (Arc<ActionShared<K>>, Lease<K>, tracing::Span) {
        let shared = Arc::new(ActionShared {
            id,
            wallet,
            kind: spec.kind,
            deadline_height: spec.deadline_height,
            early_release: spec.early_release,
            reason: AtomicU8::new(RUNNING),
            released_early: AtomicBool::new(false),
            abort: OnceLock::new(),
            stopped: Notify::new(),
        });
        // From here on the lease frees the slot, whatever happens.
        let lease = Lease {
            inner: self.inner_ref(),
            shared: Arc::clone(&shared),
            granted_at: Instant::now(),
            finished: None,
        };
        self.inner
            .counters
            .mine()
            .dispatched
            .fetch_add(1, Ordering::Relaxed);
        if let Some(deadline) = shared.deadline_height {
            let mut deadlines = lock(&self.inner.deadlines);
            if deadlines.tip.is_some_and(|tip| deadline <= tip) {
                // The tip reached the deadline since `check_can_start`.
                shared.stop(EXPIRED);
            }
            deadlines
                .pending
                .insert((deadline, id), Arc::clone(&shared));
        }
        let span = tracing::info_span!(
            "action",
            wallet = ?shared.wallet,
            action_id = id.get(),
            kind = %shared.kind,
        );
        span.in_scope(|| {
            tracing::debug!(wait_ms = waited.as_secs_f64() * 1e3, "action granted");
        });
        (shared, lease, span)
    }

    /// The context handed to an admitted action.
    fn ctx(&self, shared: &Arc<ActionShared<K>>) -> ActionCtx<K> {
        ActionCtx {
            inner: self.inner_ref(),
            shared: Arc::clone(shared),
        }
    }

    /// Spawns the action that was just granted `wallet`'s slot.
    fn start<F, Fut, T, E>(
        &self,
        wallet: K,
        spec: ActionSpec,
        id: DispatchId,
        waited: Duration,
        action: F,
    ) -> ActionHandle<T, E>
    where
        F: FnOnce(ActionCtx<K>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (shared, mut lease, span) = self.admit(wallet, spec, id, waited);
        let fut = action(self.ctx(&shared));
        let join = tokio::spawn(
            async move {
                let result = fut.await;
                lease.finished = Some(result.is_ok());
                // Free the slot before the result reaches the handle.
                drop(lease);
                result
            }
            .instrument(span),
        );
        let _ = shared.abort.set(join.abort_handle());
        if shared.reason.load(Ordering::SeqCst) != RUNNING {
            // Stopped (expired) before the abort handle was set.
            join.abort();
        }
        ActionHandle::new(join, shared)
    }

    /// Like [`Dispatcher::try_dispatch`], but runs the action in the
    /// caller's task instead of spawning one: a busy wallet is refused at
    /// once ([`DispatchError::WalletBusy`]); otherwise this future runs the
    /// action to its end and returns its outcome. For callers that already
    /// run in a task of their own per piece of work (a request handler, a
    /// test), this saves a spawn and lets the action borrow from the
    /// caller; it also measures the dispatcher's own cost.
    ///
    /// The same guarantees hold: the slot is freed however the action ends.
    /// It expires at its deadline ([`Outcome::Expired`], the
    /// [`Dispatcher::on_expired`] callback run), and dropping this future
    /// cancels it. A panic in the action frees the slot (counted in
    /// [`Stats::panics`]) and goes on unwinding into the caller, as any
    /// panic in the caller's own code would.
    pub async fn try_run<F, Fut, T, E>(
        &self,
        wallet: K,
        spec: ActionSpec,
        action: F,
    ) -> Result<Outcome<T, E>, DispatchError<K>>
    where
        F: FnOnce(ActionCtx<K>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let id = self.acquire_now(&wallet, &spec, false)?;
        let (shared, mut lease, span) = self.admit(wallet, spec, id, Duration::ZERO);
        let fut = action(self.ctx(&shared));
        let result = async {
            tokio::select! {
                biased;
                () = shared.stopped.notified() => None,
                result = fut => Some(result),
            }
        }
        .instrument(span)
        .await;
        // The action's future is dropped: free the slot (the lease's `Drop`
        // counts the outcome and runs the expiry callback).
        let outcome = match result {
            Some(Ok(value)) => {
                lease.finished = Some(true);
                Outcome::Completed(value)
            }
            Some(Err(error)) => {
                lease.finished = Some(false);
                Outcome::Failed(error)
            }
            None if shared.reason.load(Ordering::SeqCst) == EXPIRED => Outcome::Expired,
            None => Outcome::Cancelled,
        };
        drop(lease);
        Ok(outcome)
    }

    /// Whether `wallet` has an exclusive action now.
    pub fn is_busy(&self, wallet: &K) -> bool {
        self.inner.slots.is_busy(wallet)
    }

    /// How many `dispatch_wait` calls wait for `wallet` now.
    pub fn queue_len(&self, wallet: &K) -> usize {
        self.inner.slots.queue_len(wallet)
    }

    /// The last height given to [`Dispatcher::set_tip`].
    pub fn tip(&self) -> Option<u32> {
        self.inner.tip()
    }

    /// Sets the chain tip. Every action whose deadline is at or below
    /// `height` is stopped: its task is aborted (it stops at its next
    /// `.await`), which runs the [`Dispatcher::on_expired`] callback, then
    /// frees its slot, and makes its outcome [`Outcome::Expired`]. Returns how many
    /// actions this call expired.
    pub fn set_tip(&self, height: u32) -> usize {
        let expired: Vec<Arc<ActionShared<K>>> = {
            let mut deadlines = lock(&self.inner.deadlines);
            deadlines.tip = Some(height);
            self.inner.tip.store(u64::from(height), Ordering::SeqCst);
            let later = deadlines
                .pending
                .split_off(&(height.saturating_add(1), DispatchId::new(0)));
            let due = std::mem::replace(&mut deadlines.pending, later);
            if height == u32::MAX {
                // `height + 1` saturated: every entry is due.
                let rest = std::mem::take(&mut deadlines.pending);
                due.into_values().chain(rest.into_values()).collect()
            } else {
                due.into_values().collect()
            }
        };
        let mut count = 0;
        for shared in expired {
            if shared.stop(EXPIRED) {
                count += 1;
                tracing::debug!(
                    wallet = ?shared.wallet,
                    action_id = shared.id.get(),
                    kind = %shared.kind,
                    tip = height,
                    "action expired"
                );
            }
        }
        count
    }

    /// Sets the callback run once for each expired action, inside its task
    /// as it is dropped, before its wallet is freed (e.g. to free the coins
    /// it reserved, so that the next action on the wallet sees them free).
    /// Replaces the previous one.
    pub fn on_expired(
        &self,
        callback: impl Fn(&K, DispatchId, &ActionKind) + Send + Sync + 'static,
    ) {
        *write(&self.inner.on_expired) = Some(Arc::new(callback));
    }

    /// Sets the signing safety margin of `kind`, in blocks: its actions may
    /// take a signer permit only while `tip + margin < deadline`.
    pub fn set_margin(&self, kind: ActionKind, blocks: u32) {
        write(&self.inner.margins).insert(kind, blocks);
    }

    /// Adds a named signer limit shared by every wallet: at most `permits`
    /// actions sign with it at once. Returns `false` (and changes nothing)
    /// if the name is already taken.
    pub fn add_signer_limit(&self, name: impl Into<String>, permits: usize) -> bool {
        let mut signers = write(&self.inner.signers);
        let name = name.into();
        if signers.contains_key(&name) {
            return false;
        }
        signers.insert(name, Arc::new(Semaphore::new(permits)));
        true
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let stripes = &self.inner.counters.stripes;
        let sum = |field: fn(&Stripe) -> &AtomicU64| {
            stripes
                .iter()
                .map(|s| field(&s.0).load(Ordering::Relaxed))
                .sum()
        };
        Stats {
            dispatched: sum(|s| &s.dispatched),
            busy_rejections: sum(|s| &s.busy_rejections),
            timeouts: sum(|s| &s.timeouts),
            deepest_queue: stripes
                .iter()
                .map(|s| s.0.deepest_queue.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            completed: sum(|s| &s.completed),
            failed: sum(|s| &s.failed),
            panics: sum(|s| &s.panics),
            cancellations: sum(|s| &s.cancellations),
            expirations: sum(|s| &s.expirations),
        }
    }
}

/// Locks a mutex; a poisoned one is used as is (no critical section here
/// leaves its data half-changed).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a lock, ignoring poisoning (see [`lock`]).
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a lock, ignoring poisoning (see [`lock`]).
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
