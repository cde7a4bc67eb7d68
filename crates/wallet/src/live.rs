//! A live wallet: the one instance of a wallet in a process, shared by the
//! chain loop and by whoever hands out its addresses, reads it or spends
//! from it (see [`crate::Registry`]).
//!
//! Memory changes only after the database did. Every change runs inside a
//! write transaction on the store's writer thread, on a working copy of
//! the wallet staged for that transaction (the first change of a
//! transaction copies the committed state; later changes in the same
//! transaction, such as every block of a batch the loop connects, go on
//! the same copy). The copy becomes the wallet's state in the store's
//! after-commit callback, on the writer thread, before the next
//! transaction and before the writer's caller gets its result; if the
//! transaction rolls back or its COMMIT fails, the copy is dropped and
//! readers never saw it. The mutexes are only ever taken inside a
//! transaction's closure, on a blocking thread or for a moment, never held
//! across an await, so they cannot deadlock with the writer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bitcoin::{Address, Network, ScriptBuf, Transaction, Txid};
use lockstep_store::{ReadTx, Store, WalletId, WriteTx};

use crate::descriptor::Keychain;
use crate::grown::Grown;
use crate::selection::{Selection, SpendRequest};
use crate::wallet::{Balance, Coin, HistoryTx, Wallet, WalletError};

/// The one live instance of a wallet. Handles are `Arc<LiveWallet>`, from
/// [`crate::Registry::get_or_load`].
pub struct LiveWallet {
    id: WalletId,
    name: String,
    network: Network,
    birth_height: u32,
    /// The committed state: what readers see.
    state: Mutex<Wallet>,
    /// The working copy of the write transaction in progress, if one
    /// changed the wallet (lock order: `staged`, then `state`).
    staged: Mutex<Option<Staged>>,
    store: Store,
    /// The registry's set of grown wallets (not the registry itself: it
    /// holds this instance, and a handle back would keep both alive).
    grown: Grown,
    pins: AtomicUsize,
}

impl std::fmt::Debug for LiveWallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveWallet")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An address handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revealed {
    /// Its keychain.
    pub keychain: Keychain,
    /// Its derivation index.
    pub index: u32,
    /// The address.
    pub address: Address,
}

/// Where a coin stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoinState {
    /// A coinbase output not yet spendable (Bitcoin Core's wallet rule: 100
    /// blocks on top of its own).
    Immature,
    /// Free to spend.
    Spendable,
    /// Reserved by a holder (an action).
    Locked {
        /// The holder's id.
        holder: String,
    },
    /// Spent on chain.
    Spent {
        /// The spending transaction.
        txid: Txid,
        /// Its block's height.
        height: u32,
    },
}

/// A coin and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoinInfo {
    /// The coin.
    pub coin: Coin,
    /// Its state at the wallet's tip.
    pub state: CoinState,
}

/// One keychain's indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeychainInfo {
    /// The last index handed out (revealed, or used on chain), if any.
    pub last_revealed: Option<u32>,
    /// The highest index seen used on chain, if any.
    pub last_used: Option<u32>,
    /// Scripts derived and watched: `0..derived`.
    pub derived: u32,
}

/// Keeps a wallet from being evicted while an action runs on it.
#[derive(Debug)]
pub struct Pin(Arc<LiveWallet>);

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A working copy of a wallet, for the write transaction `serial`.
struct Staged {
    serial: u64,
    wallet: Wallet,
}

/// The wallet as a write transaction sees and changes it: its working copy
/// for that transaction, which becomes the wallet's state once the
/// transaction commits.
pub struct StagedWallet<'a>(MutexGuard<'a, Option<Staged>>);

impl std::ops::Deref for StagedWallet<'_> {
    type Target = Wallet;

    fn deref(&self) -> &Wallet {
        &self
            .0
            .as_ref()
            .expect("a staged wallet holds its copy")
            .wallet
    }
}

impl std::ops::DerefMut for StagedWallet<'_> {
    fn deref_mut(&mut self) -> &mut Wallet {
        &mut self
            .0
            .as_mut()
            .expect("a staged wallet holds its copy")
            .wallet
    }
}

impl std::fmt::Debug for StagedWallet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StagedWallet").field(&**self).finish()
    }
}

impl LiveWallet {
    pub(crate) fn new(wallet: Wallet, store: Store, grown: Grown) -> LiveWallet {
        LiveWallet {
            id: wallet.id(),
            name: wallet.name().to_owned(),
            network: wallet.network(),
            birth_height: wallet.birth_height(),
            state: Mutex::new(wallet),
            staged: Mutex::new(None),
            store,
            grown,
            pins: AtomicUsize::new(0),
        }
    }

    /// The wallet's id.
    pub fn id(&self) -> WalletId {
        self.id
    }

    /// Its unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network.
    pub fn network(&self) -> Network {
        self.network
    }

    /// Where scanning starts for it.
    pub fn birth_height(&self) -> u32 {
        self.birth_height
    }

    /// The wallet as write transaction `tx` sees it, for lockstep's code
    /// running inside one (the chain loop ingesting a block): its working
    /// copy for `tx` (made from the committed state at the transaction's
    /// first call), which becomes the wallet's state once `tx` commits.
    /// The transaction is asked for so that the guard is only ever taken
    /// on the writer thread, where no await can hold it.
    #[doc(hidden)]
    pub fn wallet_in(self: &Arc<Self>, tx: &WriteTx<'_>) -> StagedWallet<'_> {
        let serial = tx.serial();
        let mut staged = lock(&self.staged);
        if staged.as_ref().is_none_or(|s| s.serial != serial) {
            // A copy left by a transaction that rolled back is dropped.
            let wallet = lock(&self.state).clone();
            *staged = Some(Staged { serial, wallet });
            let me = Arc::downgrade(self);
            tx.after_commit(move || {
                if let Some(me) = me.upgrade() {
                    me.apply_staged(serial);
                }
            });
        }
        StagedWallet(staged)
    }

    /// Whether a working copy is staged (by a transaction in progress, or
    /// left by one that rolled back until the next change replaces it).
    pub(crate) fn is_staged(&self) -> bool {
        lock(&self.staged).is_some()
    }

    /// Transaction `serial` committed: its working copy becomes the state.
    /// Keys unlocked or locked meanwhile (outside any transaction) stay as
    /// they are now.
    fn apply_staged(&self, serial: u64) {
        let mut staged = lock(&self.staged);
        if staged.as_ref().is_none_or(|s| s.serial != serial) {
            return;
        }
        let Some(Staged { mut wallet, .. }) = staged.take() else {
            return;
        };
        let mut state = lock(&self.state);
        wallet.keep_keys_of(&state);
        *state = wallet;
    }

    /// Keeps the wallet loaded (never evicted) while the pin lives.
    pub fn pin(self: &Arc<Self>) -> Pin {
        self.pins.fetch_add(1, Ordering::AcqRel);
        Pin(Arc::clone(self))
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    /// Reloads the instance from `tx` in place, keeping unlocked keys.
    pub(crate) fn reload_in(&self, tx: &ReadTx<'_>) -> Result<(), WalletError> {
        lock(&self.state).reload(tx)
    }

    /// Runs `f` on the wallet's working copy in a write transaction; the
    /// copy becomes the wallet's state only if the transaction commits.
    pub(crate) async fn change<T, F>(self: &Arc<Self>, f: F) -> Result<T, WalletError>
    where
        F: FnOnce(&mut Wallet, &mut WriteTx<'_>) -> Result<T, WalletError> + Send + 'static,
        T: Send + 'static,
    {
        let me = Arc::clone(self);
        self.store
            .write(move |tx| {
                let mut wallet = me.wallet_in(tx);
                let before = wallet.derived_counts();
                let out = f(&mut wallet, tx);
                if wallet.derived_counts() != before {
                    // Scripts derived outside the loop: it watches them
                    // inside its next write transaction, which SQLite runs
                    // after this one commits.
                    me.grown.mark(me.id);
                }
                out
            })
            .await
    }

    /// Hands out the next address of a keychain (external: to be paid;
    /// internal: change). Its script is watched by the chain loop before
    /// this returns, and the lookahead window moves past it; concurrent
    /// calls never return the same address.
    ///
    /// # Errors
    /// [`WalletError::IndexExhausted`], or the database's error.
    pub async fn reveal_address(
        self: &Arc<Self>,
        keychain: Keychain,
    ) -> Result<Revealed, WalletError> {
        let network = self.network;
        self.change(move |wallet, tx| {
            let (index, script, _) = wallet.reveal_next(tx, keychain)?;
            Ok(Revealed {
                keychain,
                index,
                address: address_of(&script, network)?,
            })
        })
        .await
    }

    /// The balance in parts: confirmed, immature, locked, spendable, and
    /// what the wallet's own pending broadcasts move.
    ///
    /// # Errors
    /// The database's error.
    pub async fn balance(&self) -> Result<Balance, WalletError> {
        let id = self.id;
        self.store.read(move |tx| Wallet::balance_of(tx, id)).await
    }

    /// Every coin the wallet has had, with its state now.
    ///
    /// # Errors
    /// The database's error.
    pub async fn coins(&self) -> Result<Vec<CoinInfo>, WalletError> {
        let id = self.id;
        self.store
            .read(move |tx| Wallet::coins_with_state(tx, id))
            .await
    }

    /// The transactions that touched the wallet, oldest first.
    ///
    /// # Errors
    /// The database's error.
    pub async fn history(&self) -> Result<Vec<HistoryTx>, WalletError> {
        let id = self.id;
        self.store.read(move |tx| Wallet::history_of(tx, id)).await
    }

    /// A keychain's indexes: last handed out, last used, derived.
    pub fn keychain(&self, keychain: Keychain) -> KeychainInfo {
        let wallet = lock(&self.state);
        KeychainInfo {
            last_revealed: wallet.next_index(keychain).checked_sub(1),
            last_used: wallet.last_used(keychain),
            derived: wallet.derived_counts()[keychain.as_u8() as usize],
        }
    }

    /// Whether the wallet holds private keys (stored encrypted).
    pub fn is_signing(&self) -> bool {
        lock(&self.state).is_signing()
    }

    /// Whether a signing wallet's keys are not in memory.
    pub fn is_locked(&self) -> bool {
        lock(&self.state).is_locked()
    }

    /// Decrypts the keys (Argon2id, off the async runtime) and keeps them
    /// in memory until [`lock_keys`](Self::lock_keys) or eviction.
    ///
    /// # Errors
    /// [`WalletError::WrongPassphrase`], [`WalletError::WatchOnly`].
    pub async fn unlock(self: &Arc<Self>, passphrase: &str) -> Result<(), WalletError> {
        let me = Arc::clone(self);
        let passphrase = passphrase.to_owned();
        let public = lock(&self.state).descriptors().without_secrets();
        let signing = self.is_signing();
        let unlocked = self
            .store
            .read(move |tx| {
                if !signing {
                    return Err(WalletError::WatchOnly(me.id));
                }
                Wallet::decrypt_descriptors(tx, me.id, &public, &passphrase)
            })
            .await?;
        lock(&self.state).set_unlocked(unlocked);
        Ok(())
    }

    /// Forgets the private keys.
    pub fn lock_keys(&self) {
        lock(&self.state).lock();
    }

    /// Chooses coins for a payment among those no holder has locked and
    /// locks them for `holder`, in one write transaction. Change, if any,
    /// goes to a newly revealed internal script that no other transaction
    /// uses, watched by the loop before this returns. Coins a connected
    /// block spent are never chosen (blocks and this run one after the
    /// other on the writer), nor immature ones.
    ///
    /// # Errors
    /// [`WalletError::InsufficientFunds`] (says what holders locked), a bad
    /// request, or the database's error.
    pub async fn select_and_lock(
        self: &Arc<Self>,
        request: SpendRequest,
        holder: &str,
    ) -> Result<Selection, WalletError> {
        let holder = holder.to_owned();
        self.change(move |wallet, tx| wallet.select_lock_and_reveal_change(tx, &request, &holder))
            .await
    }

    /// Builds, signs and finalises the transaction of a selection, off the
    /// async runtime. Needs the wallet unlocked (a multisig wallet signs
    /// only its share: use [`crate::Wallet::build_psbt`] for that).
    ///
    /// # Errors
    /// [`WalletError::Locked`], [`WalletError::WatchOnly`], or a signing
    /// failure.
    pub async fn sign(self: &Arc<Self>, selection: Selection) -> Result<Transaction, WalletError> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let wallet = lock(&me.state);
            let mut psbt = wallet.build_psbt(&selection)?;
            wallet.sign(&mut psbt)?;
            Wallet::finalize(psbt)
        })
        .await
        .map_err(|e| WalletError::Sign(format!("signing task: {e}")))?
    }

    /// Releases every coin `holder` locked.
    ///
    /// # Errors
    /// The database's error.
    pub async fn release(self: &Arc<Self>, holder: &str) -> Result<usize, WalletError> {
        let holder = holder.to_owned();
        self.change(move |_, tx| Wallet::release(tx, &holder)).await
    }

    /// Releases the coins `holder` locked except the inputs of a pending
    /// broadcast (see [`Wallet::release_unbroadcast`]).
    ///
    /// # Errors
    /// The database's error.
    pub async fn release_unbroadcast(self: &Arc<Self>, holder: &str) -> Result<usize, WalletError> {
        let holder = holder.to_owned();
        self.change(move |_, tx| Wallet::release_unbroadcast(tx, &holder))
            .await
    }

    /// Records a transaction the wallet is broadcasting (unconfirmed in its
    /// history until a block confirms or conflicts it).
    ///
    /// # Errors
    /// The database's error.
    pub async fn record_broadcast(
        self: &Arc<Self>,
        transaction: Transaction,
    ) -> Result<HistoryTx, WalletError> {
        self.change(move |wallet, tx| wallet.record_broadcast(tx, &transaction))
            .await
    }
}

/// The address of one of the wallet's scripts.
fn address_of(script: &ScriptBuf, network: Network) -> Result<Address, WalletError> {
    Address::from_script(script, network)
        .map_err(|_| WalletError::InvalidRequest("the descriptor's script has no address form"))
}
