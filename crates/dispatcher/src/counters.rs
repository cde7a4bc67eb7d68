//! The dispatcher's counters, striped by thread, and the action ids they
//! hand out; [`Stats`] is their snapshot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::DispatchId;

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
pub(crate) const STRIPES: usize = 16;

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
pub(crate) struct Counters {
    pub(crate) stripes: Box<[Padded<Stripe>]>,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Padded::default()).collect(),
        }
    }

    /// This thread's stripe.
    pub(crate) fn mine(&self) -> &Stripe {
        &self.stripes[stripe_index()].0
    }

    /// A fresh action id: unique because stripe `i` hands out only ids
    /// `n * STRIPES + i + 1`.
    pub(crate) fn next_id(&self) -> DispatchId {
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
pub(crate) fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|index| *index)
}

/// One stripe of [`Counters`].
#[derive(Default)]
pub(crate) struct Stripe {
    /// How many ids this stripe handed out.
    pub(crate) next_id: AtomicU64,
    pub(crate) dispatched: AtomicU64,
    pub(crate) busy_rejections: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) deepest_queue: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) cancellations: AtomicU64,
    pub(crate) expirations: AtomicU64,
}
