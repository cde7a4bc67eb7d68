//! A descriptor wallet whose state lives in the shared database.

use std::collections::HashMap;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, Network, OutPoint, Script, ScriptBuf, Transaction, TxOut, Txid};
use lockstep_store::{
    CoinRow, Disconnected, ErrorKind, NewKeychain, ReadTx, StoreError, WalletId, WalletTxRow,
    WriteTx,
};

use crate::descriptor::{DescriptorError, Keychain, WalletDescriptors};

mod error;
mod ingest;
mod reads;

pub use error::WalletError;
pub use ingest::IngestSummary;
pub(crate) use reads::is_immature;
pub use reads::{Balance, Coin, HistoryTx, decode_stored};

/// Scripts kept derived past the last used index of each keychain, by
/// default.
///
/// Bitcoin Core keeps 1,000, BDK 25. lockstep's wallets share one aggregate
/// watchlist, and every watched script adds a 1/784,931 chance per block of
/// a false-positive block fetch *for all of them*: 1,000 wallets × 2
/// keychains × 25 scripts is 50,000 scripts, about 6 % of blocks fetched for
/// nothing; with Core's 1,000 it would be 2,000,000 scripts and nearly every
/// block. The window moves forward the moment a block uses a script in it
/// (even inside one block), so a wallet that hands out its own addresses in
/// order never needs a deep one; raise it for wallets restored from a seed
/// that was used elsewhere with gaps.
pub const DEFAULT_LOOKAHEAD: u32 = 25;

/// How a wallet is registered.
#[derive(Debug, Clone)]
pub struct WalletParams<'a> {
    /// A unique name.
    pub name: &'a str,
    /// The height from which the chain must be scanned for it.
    pub birth_height: u32,
    /// Scripts kept derived past the last used index (at least 1).
    pub lookahead: u32,
    /// Encrypts a signing wallet's private descriptors at rest; required
    /// when the descriptors carry private keys, ignored otherwise.
    pub passphrase: Option<&'a str>,
}

/// One keychain's place: what is revealed, what was used, what is derived.
#[derive(Debug, Clone)]
struct KeychainState {
    next_index: u32,
    last_used: Option<u32>,
    /// Scripts `0..scripts.len()`, all stored.
    scripts: Vec<ScriptBuf>,
}

/// A descriptor wallet.
///
/// Its state is rows of the shared database keyed by its wallet id; this
/// value mirrors them for the chain loop (scripts to watch, and which
/// keychain and index a script is). Methods that change state take the
/// caller's [`WriteTx`] and update this mirror at once: if that transaction
/// does not commit, drop the wallet and [`Wallet::load`] it again.
#[derive(Debug, Clone)]
pub struct Wallet {
    id: WalletId,
    name: String,
    birth_height: u32,
    lookahead: u32,
    /// Unlocked: with private keys; locked or watch-only: without.
    descriptors: WalletDescriptors,
    /// Whether the database holds encrypted private keys for it.
    signing: bool,
    keychains: [KeychainState; 2],
    by_script: HashMap<ScriptBuf, (Keychain, u32)>,
}

/// What a keychain's encrypted secret is bound to, so that a ciphertext
/// cannot be moved to another wallet or keychain.
fn secret_context(id: WalletId, keychain: Keychain) -> Vec<u8> {
    format!("lockstep wallet {id} {keychain} keychain").into_bytes()
}

/// Scripts a change derived, to be added to the manager's watchlist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewScripts(pub Vec<(Keychain, u32, ScriptBuf)>);

impl Wallet {
    /// Registers a wallet in the caller's transaction: its row, its two
    /// keychains (public descriptors only) and its first `lookahead`
    /// scripts of each keychain.
    pub fn create(
        tx: &mut WriteTx<'_>,
        params: &WalletParams<'_>,
        descriptors: WalletDescriptors,
    ) -> Result<Wallet, WalletError> {
        Self::create_with(tx, params, descriptors, None)
    }

    /// [`Wallet::create`] with its first scripts derived beforehand (see
    /// [`FirstScripts`]); scripts for other descriptors or another
    /// lookahead are ignored and derived here.
    pub fn create_with(
        tx: &mut WriteTx<'_>,
        params: &WalletParams<'_>,
        descriptors: WalletDescriptors,
        first: Option<FirstScripts>,
    ) -> Result<Wallet, WalletError> {
        if params.lookahead == 0 {
            return Err(WalletError::InvalidLookahead(0));
        }
        let signing = !descriptors.is_watch_only();
        if signing && params.passphrase.is_none_or(str::is_empty) {
            return Err(WalletError::PassphraseRequired);
        }
        let id = tx.insert_wallet(params.name, params.birth_height, None)?;
        let mut wallet = Wallet {
            id,
            name: params.name.to_owned(),
            birth_height: params.birth_height,
            lookahead: params.lookahead,
            signing,
            keychains: [Keychain::External, Keychain::Internal].map(|_| KeychainState {
                next_index: 0,
                last_used: None,
                scripts: Vec::new(),
            }),
            descriptors,
            by_script: HashMap::new(),
        };
        for keychain in Keychain::ALL {
            let descriptor = wallet.descriptors.descriptor(keychain).to_string();
            tx.insert_keychain(
                id,
                NewKeychain {
                    keychain: keychain.as_u8(),
                    network: wallet.descriptors.network().to_core_arg(),
                    descriptor: &descriptor,
                    lookahead: params.lookahead,
                },
            )?;
            if let (Some(secret), Some(passphrase)) = (
                wallet.descriptors.secret_descriptor(keychain),
                params.passphrase,
            ) {
                let blob =
                    crate::secrets::encrypt(&secret, passphrase, &secret_context(id, keychain));
                tx.set_keychain_secret(id, keychain.as_u8(), &blob)?;
            }
            match first
                .as_ref()
                .filter(|f| f.fits(&wallet.descriptors, params.lookahead))
            {
                Some(first) => wallet.store_scripts(
                    tx,
                    keychain,
                    first.scripts[keychain.as_u8() as usize].clone(),
                )?,
                None => wallet.derive_to(tx, keychain, params.lookahead)?,
            }
        }
        Ok(wallet)
    }

    /// Loads a wallet from the database: its public descriptors and stored
    /// scripts (nothing is derived). A signing wallet loads locked.
    pub fn load(tx: &ReadTx<'_>, id: WalletId) -> Result<Wallet, WalletError> {
        let row = tx.wallet(id)?.ok_or(WalletError::NotFound(id))?;
        let corrupt = |detail: String| WalletError::Corrupt {
            wallet_id: id,
            detail,
        };
        let rows = tx.keychains(id)?;
        let [ext, int] = rows.as_slice() else {
            return Err(corrupt(format!("{} keychains instead of 2", rows.len())));
        };
        let network = Network::from_core_arg(&ext.network).map_err(|e| corrupt(e.to_string()))?;
        let descriptors = WalletDescriptors::parse(&ext.descriptor, &int.descriptor, network)
            .map_err(|e| corrupt(format!("stored descriptor: {e}")))?;
        let mut keychains = Vec::with_capacity(2);
        let mut by_script = HashMap::new();
        for (keychain, row) in Keychain::ALL.into_iter().zip([ext, int]) {
            let scripts: Vec<ScriptBuf> = tx
                .keychain_scripts(id, keychain.as_u8())?
                .into_iter()
                .map(ScriptBuf::from)
                .collect();
            if scripts.len() != row.derived_to as usize {
                return Err(corrupt(format!(
                    "{keychain}: {} scripts stored, {} recorded",
                    scripts.len(),
                    row.derived_to
                )));
            }
            // A cheap check that the stored scripts are this descriptor's.
            if let Some(last) = scripts.last() {
                let index = scripts.len() as u32 - 1;
                if descriptors.script_at(keychain, index)? != *last {
                    return Err(corrupt(format!(
                        "{keychain} script {index} does not match the descriptor"
                    )));
                }
            }
            for (index, script) in scripts.iter().enumerate() {
                by_script.insert(script.clone(), (keychain, index as u32));
            }
            keychains.push(KeychainState {
                next_index: row.next_index,
                last_used: row.last_used,
                scripts,
            });
        }
        let keychains: [KeychainState; 2] = keychains.try_into().expect("two keychains");
        let signing = tx.keychain_secret(id, 0)?.is_some();
        Ok(Wallet {
            id,
            name: row.name,
            birth_height: row.birth_height,
            lookahead: ext.lookahead,
            descriptors,
            signing,
            keychains,
            by_script,
        })
    }

    /// Decrypts the wallet's private keys with `passphrase` and keeps them in
    /// memory until [`Wallet::lock`]. The decrypted descriptors must be the
    /// stored public ones, or the database is corrupt.
    pub fn unlock(&mut self, tx: &ReadTx<'_>, passphrase: &str) -> Result<(), WalletError> {
        if !self.signing {
            return Err(WalletError::WatchOnly(self.id));
        }
        let unlocked = Self::decrypt_descriptors(tx, self.id, &self.descriptors, passphrase)?;
        self.descriptors = unlocked;
        Ok(())
    }

    /// Decrypts wallet `id`'s private descriptors with `passphrase`; they
    /// must be `public` with keys. No wallet is borrowed meanwhile, so a
    /// live wallet stays usable during the key derivation's ~50 ms.
    pub(crate) fn decrypt_descriptors(
        tx: &ReadTx<'_>,
        id: WalletId,
        public: &WalletDescriptors,
        passphrase: &str,
    ) -> Result<WalletDescriptors, WalletError> {
        let mut secret = Vec::with_capacity(2);
        for keychain in Keychain::ALL {
            let blob =
                tx.keychain_secret(id, keychain.as_u8())?
                    .ok_or_else(|| WalletError::Corrupt {
                        wallet_id: id,
                        detail: format!("{keychain} keychain has no stored secret"),
                    })?;
            secret.push(
                crate::secrets::decrypt(&blob, passphrase, &secret_context(id, keychain)).map_err(
                    |e| match e {
                        crate::secrets::DecryptError::WrongPassphrase => {
                            WalletError::WrongPassphrase
                        }
                        crate::secrets::DecryptError::Format => WalletError::Corrupt {
                            wallet_id: id,
                            detail: "stored secret format".into(),
                        },
                    },
                )?,
            );
        }
        let unlocked =
            WalletDescriptors::parse(&secret[0], &secret[1], public.network()).map_err(|e| {
                WalletError::Corrupt {
                    wallet_id: id,
                    detail: format!("decrypted descriptor: {e}"),
                }
            })?;
        for keychain in Keychain::ALL {
            if unlocked.descriptor(keychain) != public.descriptor(keychain) {
                return Err(WalletError::Corrupt {
                    wallet_id: id,
                    detail: format!("decrypted {keychain} descriptor is not the stored one"),
                });
            }
        }
        Ok(unlocked)
    }

    /// Takes descriptors with keys that [`Wallet::decrypt_descriptors`]
    /// checked against this wallet's.
    pub(crate) fn set_unlocked(&mut self, descriptors: WalletDescriptors) {
        self.descriptors = descriptors;
    }

    /// A keychain's derived scripts, by index.
    pub fn scripts(&self, keychain: Keychain) -> &[ScriptBuf] {
        &self.state(keychain).scripts
    }

    /// How many scripts each keychain has derived (external, internal).
    pub fn derived_counts(&self) -> [u32; 2] {
        [
            self.keychains[0].scripts.len() as u32,
            self.keychains[1].scripts.len() as u32,
        ]
    }

    /// Takes `committed`'s keys (unlocked, or locked): a working copy made
    /// before an unlock or a lock becomes the state after it.
    pub(crate) fn keep_keys_of(&mut self, committed: &Wallet) {
        if self.id == committed.id {
            self.descriptors = committed.descriptors.clone();
        }
    }

    /// Forgets the private keys (signing then needs [`Wallet::unlock`]).
    pub fn lock(&mut self) {
        self.descriptors = self.descriptors.without_secrets();
    }

    /// Whether the wallet has private keys, stored encrypted.
    pub fn is_signing(&self) -> bool {
        self.signing
    }

    /// Whether a signing wallet's keys are not in memory.
    pub fn is_locked(&self) -> bool {
        self.signing && self.descriptors.is_watch_only()
    }

    /// The wallet's id in the database.
    pub fn id(&self) -> WalletId {
        self.id
    }

    /// Its unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where scanning must start for it.
    pub fn birth_height(&self) -> u32 {
        self.birth_height
    }

    /// Its network.
    pub fn network(&self) -> Network {
        self.descriptors.network()
    }

    /// Its descriptors.
    pub fn descriptors(&self) -> &WalletDescriptors {
        &self.descriptors
    }

    /// Scripts kept derived past the last used index.
    pub fn lookahead(&self) -> u32 {
        self.lookahead
    }

    /// The next index a keychain will reveal.
    pub fn next_index(&self, keychain: Keychain) -> u32 {
        self.state(keychain).next_index
    }

    /// The highest index of a keychain seen used on chain.
    pub fn last_used(&self, keychain: Keychain) -> Option<u32> {
        self.state(keychain).last_used
    }

    fn state(&self, keychain: Keychain) -> &KeychainState {
        &self.keychains[keychain.as_u8() as usize]
    }

    /// Everything the chain loop must watch for this wallet: every revealed
    /// script and the lookahead window past the last used and revealed one.
    /// Already derived; costs nothing but iteration.
    pub fn watch_scripts(&self) -> impl Iterator<Item = (Keychain, u32, &Script)> + '_ {
        Keychain::ALL.into_iter().flat_map(move |k| {
            self.state(k)
                .scripts
                .iter()
                .enumerate()
                .map(move |(i, s)| (k, i as u32, s.as_script()))
        })
    }

    /// The keychain and index of one of the wallet's scripts.
    pub fn script_index(&self, script: &Script) -> Option<(Keychain, u32)> {
        self.by_script.get(script).copied()
    }

    /// Reveals the next script of a keychain (an address to hand out), and
    /// derives what keeps the lookahead window full past it.
    ///
    /// Another process may have handed out addresses of this wallet since
    /// it was loaded: the stored keychains are read first, and the wallet
    /// is loaded again if they moved, so no address is handed out twice.
    /// The reveal is counted in the database (see
    /// [`WriteTx::count_reveal`]), so a chain loop in any process watches
    /// the scripts it derives before it commits another block.
    pub fn reveal_next(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
    ) -> Result<(u32, ScriptBuf, NewScripts), WalletError> {
        self.refresh_if_moved(tx)?;
        tx.count_reveal(self.id)?;
        let index = self.state(keychain).next_index;
        if index >= (1 << 31) - 1 {
            return Err(WalletError::IndexExhausted(keychain));
        }
        let state = &mut self.keychains[keychain.as_u8() as usize];
        state.next_index = index + 1;
        tx.set_keychain_indexes(self.id, keychain.as_u8(), state.next_index, state.last_used)?;
        let new = self.fill_window(tx, keychain)?;
        Ok((
            index,
            self.state(keychain).scripts[index as usize].clone(),
            new,
        ))
    }

    /// Loads the wallet again (keeping unlocked keys) if its stored
    /// keychains moved without it: another process revealed addresses or
    /// derived scripts. Returns whether it did.
    pub fn refresh_if_moved(&mut self, tx: &ReadTx<'_>) -> Result<bool, WalletError> {
        let rows = tx.keychains(self.id)?;
        let moved = rows.len() != 2
            || rows.iter().zip(Keychain::ALL).any(|(row, keychain)| {
                let state = self.state(keychain);
                row.derived_to as usize != state.scripts.len()
                    || row.next_index != state.next_index
                    || row.last_used != state.last_used
            });
        if moved {
            self.reload(tx)?;
        }
        Ok(moved)
    }

    /// Loads the wallet again from `tx` in place, keeping unlocked keys.
    pub(crate) fn reload(&mut self, tx: &ReadTx<'_>) -> Result<(), WalletError> {
        let unlocked = (!self.is_locked() && self.signing).then(|| self.descriptors.clone());
        *self = Wallet::load(tx, self.id)?;
        if let Some(descriptors) = unlocked {
            self.descriptors = descriptors;
        }
        Ok(())
    }

    /// Records that a block used `index` of a keychain, and moves the
    /// lookahead window past it at once (so a later transaction of the same
    /// block paying a newly derived script is found). Returns the scripts
    /// newly derived, for the manager's watchlist.
    pub fn mark_used(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
        index: u32,
    ) -> Result<NewScripts, WalletError> {
        let state = &mut self.keychains[keychain.as_u8() as usize];
        if state.last_used.is_some_and(|used| used >= index) && state.next_index > index {
            return Ok(NewScripts::default());
        }
        state.last_used = Some(state.last_used.map_or(index, |used| used.max(index)));
        state.next_index = state.next_index.max(index + 1);
        tx.set_keychain_indexes(self.id, keychain.as_u8(), state.next_index, state.last_used)?;
        self.fill_window(tx, keychain)
    }

    /// Derives and stores a keychain's scripts up to (not including)
    /// `end` without marking any of them used: a targeted import of
    /// scripts past the lookahead window (a gap the window did not reach)
    /// derives them first, then rescans for them. Returns the scripts
    /// newly derived.
    pub fn derive_until(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
        end: u32,
    ) -> Result<NewScripts, WalletError> {
        if end > 1 << 31 {
            return Err(WalletError::IndexExhausted(keychain));
        }
        let first = self.state(keychain).scripts.len() as u32;
        self.derive_to(tx, keychain, end)?;
        let scripts = &self.state(keychain).scripts;
        Ok(NewScripts(
            (first..scripts.len() as u32)
                .map(|i| (keychain, i, scripts[i as usize].clone()))
                .collect(),
        ))
    }
    /// Derives until `lookahead` scripts lie past both the last used and
    /// the last revealed index.
    fn fill_window(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
    ) -> Result<NewScripts, WalletError> {
        let state = self.state(keychain);
        let past = state.next_index.max(state.last_used.map_or(0, |u| u + 1));
        let mut want = past.saturating_add(self.lookahead).min(1 << 31);
        if lockstep_store::faults::active(lockstep_store::faults::Fault::WindowOneShort) {
            want -= 1;
        }
        let first = state.scripts.len() as u32;
        self.derive_to(tx, keychain, want)?;
        let scripts = &self.state(keychain).scripts;
        Ok(NewScripts(
            (first..scripts.len() as u32)
                .map(|i| (keychain, i, scripts[i as usize].clone()))
                .collect(),
        ))
    }

    /// Derives and stores scripts up to (not including) `end`.
    fn derive_to(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
        end: u32,
    ) -> Result<(), WalletError> {
        let first = self.state(keychain).scripts.len() as u32;
        if end <= first {
            return Ok(());
        }
        let scripts = derive_range(&self.descriptors, keychain, first..end)?;
        self.store_scripts(tx, keychain, scripts)
    }

    /// Stores `scripts` as the next ones of a keychain.
    fn store_scripts(
        &mut self,
        tx: &mut WriteTx<'_>,
        keychain: Keychain,
        scripts: Vec<ScriptBuf>,
    ) -> Result<(), WalletError> {
        let first = self.state(keychain).scripts.len() as u32;
        let raw: Vec<Vec<u8>> = scripts.iter().map(|s| s.to_bytes()).collect();
        tx.append_scripts(self.id, keychain.as_u8(), first, &raw)?;
        for (i, script) in scripts.into_iter().enumerate() {
            self.by_script
                .insert(script.clone(), (keychain, first + i as u32));
            self.keychains[keychain.as_u8() as usize]
                .scripts
                .push(script);
        }
        Ok(())
    }
}

/// The first `lookahead` scripts of both keychains of a wallet to be
/// registered, derived before its write transaction: off the store's
/// writer thread (which every other write waits for) and, for many
/// registrations, while another one commits.
#[derive(Debug, Clone)]
pub struct FirstScripts {
    descriptors: [miniscript::Descriptor<miniscript::DescriptorPublicKey>; 2],
    lookahead: u32,
    scripts: [Vec<ScriptBuf>; 2],
}

impl FirstScripts {
    /// Derives the first `lookahead` scripts of each keychain (spread over
    /// the cores; seconds of CPU for deep windows: call it on a blocking
    /// thread).
    ///
    /// # Errors
    /// A script cannot be derived.
    pub fn derive(
        descriptors: &WalletDescriptors,
        lookahead: u32,
    ) -> Result<FirstScripts, DescriptorError> {
        Ok(FirstScripts {
            descriptors: Keychain::ALL.map(|k| descriptors.descriptor(k).clone()),
            lookahead,
            scripts: [
                derive_range(descriptors, Keychain::External, 0..lookahead)?,
                derive_range(descriptors, Keychain::Internal, 0..lookahead)?,
            ],
        })
    }

    /// Whether these are the scripts `descriptors` would give.
    fn fits(&self, descriptors: &WalletDescriptors, lookahead: u32) -> bool {
        self.lookahead == lookahead
            && Keychain::ALL
                .iter()
                .all(|k| descriptors.descriptor(*k) == &self.descriptors[k.as_u8() as usize])
    }
}

/// Scripts `range` of a keychain. Deriving costs ~70 µs a script (curve
/// arithmetic), so a long range is spread over the cores (rayon's pool):
/// registering a wallet with a deep window, or many wallets, is not bound
/// to one core. Short ranges (a window moving by one) stay on this thread.
fn derive_range(
    descriptors: &WalletDescriptors,
    keychain: Keychain,
    range: std::ops::Range<u32>,
) -> Result<Vec<ScriptBuf>, DescriptorError> {
    use rayon::prelude::*;
    const PARALLEL_FROM: u32 = 64;
    if range.len() < PARALLEL_FROM as usize {
        return range.map(|i| descriptors.script_at(keychain, i)).collect();
    }
    range
        .into_par_iter()
        .map(|i| descriptors.script_at(keychain, i))
        .collect()
}
