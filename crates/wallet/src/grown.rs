//! The wallets whose scripts grew outside the chain loop: shared by the
//! registry (which the loop drains) and each live wallet (which marks
//! itself), so that neither needs the other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use lockstep_store::WalletId;

/// Wallets with scripts derived outside the chain loop (an address or a
/// change script revealed): the loop drains the set inside its next write
/// transaction and watches their new scripts before committing a block.
#[derive(Debug, Clone, Default)]
pub(crate) struct Grown(Arc<Mutex<HashSet<WalletId>>>);

impl Grown {
    /// Marks `id` as grown.
    pub(crate) fn mark(&self, id: WalletId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    /// Every wallet marked since the last call.
    pub(crate) fn take(&self) -> Vec<WalletId> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }
}
