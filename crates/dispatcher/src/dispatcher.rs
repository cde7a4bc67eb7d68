//! The dispatcher: grants wallets' slots to actions, starts them, and
//! stops those whose deadline the tip reached.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, oneshot};
use tracing::Instrument;

use crate::counters::{Counters, Padded, STRIPES, Stripe, stripe_index};
use crate::place::{Grant, Place};
use crate::running::{ActionShared, EXPIRED, Lease, RUNNING};
use crate::slots::{Holder, Slots};
use crate::{
    ActionCtx, ActionHandle, ActionKind, ActionSpec, DispatchError, DispatchId, Outcome, Stats,
    WalletKey, lock, write,
};

/// The callback run once for each action that expired (see
/// [`Dispatcher::on_expired`]).
pub(crate) type ExpiredCallback<K> = Arc<dyn Fn(&K, DispatchId, &ActionKind) + Send + Sync>;

/// The value of `Inner::tip` before the first `set_tip`.
pub(crate) const NO_TIP: u64 = u64::MAX;

/// The chain tip and the actions that have a deadline, by height.
#[derive(Default)]
pub(crate) struct Deadlines<K> {
    /// The last height given to [`Dispatcher::set_tip`].
    pub(crate) tip: Option<u32>,
    /// Running actions with a deadline, keyed by (deadline, id).
    pub(crate) pending: BTreeMap<(u32, DispatchId), Arc<ActionShared<K>>>,
}

/// State shared by all clones of a [`Dispatcher`].
pub(crate) struct Inner<K> {
    /// The per-wallet slots (sharded; see [`Slots`]).
    pub(crate) slots: Slots<K>,
    /// The tip and the deadline index. One lock, taken only by actions that
    /// have a deadline (at start and end) and by `set_tip`.
    pub(crate) deadlines: Mutex<Deadlines<K>>,
    /// A copy of the tip for lock-free reads (`NO_TIP`: none yet), written
    /// under the `deadlines` lock.
    pub(crate) tip: AtomicU64,
    /// Signing safety margin per kind, in blocks.
    pub(crate) margins: RwLock<HashMap<ActionKind, u32>>,
    /// Named signer limits shared by every wallet.
    pub(crate) signers: RwLock<HashMap<String, Arc<Semaphore>>>,
    /// Run once for each expired action.
    pub(crate) on_expired: RwLock<Option<ExpiredCallback<K>>>,
    /// Counters.
    pub(crate) counters: Counters,
}

impl<K> Inner<K> {
    /// The last height given to `set_tip` (no lock taken).
    pub(crate) fn tip(&self) -> Option<u32> {
        u32::try_from(self.tip.load(Ordering::SeqCst)).ok()
    }
}

/// A reference to the dispatcher's shared state, held by each running
/// action (its lease and its context). Each stripe has one of its own
/// ([`Dispatcher::inner_ref`]): cloning and dropping it per action then
/// counts on that stripe's reference count, not on one count every thread
/// writes to (which, with two threads dispatching, costs more than the
/// dispatch itself).
pub(crate) type InnerRef<K> = Arc<Arc<Inner<K>>>;

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
