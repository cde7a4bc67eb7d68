//! What a running action is given: its identity, early release and
//! signer permits.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use crate::dispatcher::InnerRef;
use crate::running::ActionShared;
use crate::{ActionKind, DispatchError, DispatchId, WalletKey, read};

/// What an action's future is given: its identity, early release and signer
/// permits.
pub struct ActionCtx<K: WalletKey> {
    pub(crate) inner: InnerRef<K>,
    pub(crate) shared: Arc<ActionShared<K>>,
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
    pub(crate) _permit: OwnedSemaphorePermit,
}
