//! How an action ended, and the handle that reports it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;

use crate::{ActionKind, ActionShared, CANCELLED, DispatchId, EXPIRED};

/// How an action ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T, E> {
    /// Its future returned `Ok`.
    Completed(T),
    /// Its future returned `Err`.
    Failed(E),
    /// It panicked (the panic's message).
    Panicked(String),
    /// It was cancelled ([`ActionHandle::cancel`], the handle dropped, or
    /// the runtime shut down).
    Cancelled,
    /// The tip reached its deadline before it ended.
    Expired,
}

/// The caller's side of a running action: await its [`Outcome`], cancel it,
/// or detach it. Dropping the handle cancels the action, unless it was
/// [`detach`](ActionHandle::detach)ed.
pub struct ActionHandle<T, E> {
    join: Option<JoinHandle<Result<T, E>>>,
    id: DispatchId,
    kind: ActionKind,
    stop: Arc<dyn Stop>,
}

/// Stops an action's task (type-erased over the wallet key).
trait Stop: Send + Sync {
    fn stop(&self, reason: u8) -> bool;
    fn reason(&self) -> u8;
}

impl<K: Send + Sync> Stop for ActionShared<K> {
    fn stop(&self, reason: u8) -> bool {
        ActionShared::stop(self, reason)
    }

    fn reason(&self) -> u8 {
        self.reason.load(Ordering::SeqCst)
    }
}

impl<T, E> fmt::Debug for ActionHandle<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActionHandle")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("detached", &self.join.is_none())
            .finish()
    }
}

impl<T, E> ActionHandle<T, E> {
    pub(crate) fn new<K: Send + Sync + 'static>(
        join: JoinHandle<Result<T, E>>,
        shared: Arc<ActionShared<K>>,
    ) -> Self {
        Self {
            join: Some(join),
            id: shared.id,
            kind: shared.kind.clone(),
            stop: shared,
        }
    }

    /// The action's id.
    pub fn id(&self) -> DispatchId {
        self.id
    }

    /// The action's kind.
    pub fn kind(&self) -> &ActionKind {
        &self.kind
    }

    /// Whether the action's task has ended.
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Cancels the action: it stops at its next `.await`, which frees the
    /// wallet; its outcome is then [`Outcome::Cancelled`] (unless it ended
    /// first).
    pub fn cancel(&self) {
        self.stop.stop(CANCELLED);
    }

    /// Lets the action run to its end without this handle (it then frees the
    /// wallet); its outcome is not reported.
    pub fn detach(mut self) {
        self.join = None;
    }

    /// Waits for the action's outcome. Dropping this future before it is
    /// ready cancels the action, as dropping the handle does.
    pub async fn outcome(mut self) -> Outcome<T, E> {
        let Some(join) = self.join.as_mut() else {
            return Outcome::Cancelled;
        };
        let result = join.await;
        self.join = None;
        match result {
            Ok(Ok(value)) => Outcome::Completed(value),
            Ok(Err(error)) => Outcome::Failed(error),
            Err(error) if error.is_panic() => {
                let payload = error.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic with a non-string payload".to_owned());
                Outcome::Panicked(message)
            }
            Err(_) if self.stop.reason() == EXPIRED => Outcome::Expired,
            Err(_) => Outcome::Cancelled,
        }
    }
}

impl<T, E> Drop for ActionHandle<T, E> {
    fn drop(&mut self) {
        if let Some(join) = self.join.take()
            && !join.is_finished()
        {
            self.stop.stop(CANCELLED);
        }
    }
}
