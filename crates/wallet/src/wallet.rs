//! A descriptor wallet whose state lives in the shared database.

use std::collections::HashMap;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, Network, OutPoint, Script, ScriptBuf, Transaction, TxOut, Txid};
use lockstep_store::{
    CoinRow, Disconnected, ErrorKind, NewKeychain, ReadTx, StoreError, WalletId, WalletTxRow,
    WriteTx,
};

use crate::descriptor::{DescriptorError, Keychain, WalletDescriptors};

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

/// What went wrong with a wallet operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalletError {
    /// A descriptor was refused (invalid input).
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// The database refused (see [`StoreError::kind`]; a duplicate name is
    /// [`StoreError::DuplicateWalletName`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No wallet has this id.
    #[error("wallet {0} not found")]
    NotFound(WalletId),
    /// The lookahead must be at least 1.
    #[error("lookahead must be at least 1 (got {0})")]
    InvalidLookahead(u32),
    /// A keychain has used every non-hardened index.
    #[error("{0} keychain has no index left")]
    IndexExhausted(Keychain),
    /// A signing wallet needs a passphrase to encrypt its keys.
    #[error("a wallet with private keys needs a passphrase")]
    PassphraseRequired,
    /// The passphrase does not decrypt the wallet's keys.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// The wallet holds no private keys.
    #[error("wallet {0} is watch-only")]
    WatchOnly(WalletId),
    /// Signing needs the wallet unlocked.
    #[error("wallet {0} is locked")]
    Locked(WalletId),
    /// The wallet's unlocked coins do not cover the payment and its fee.
    #[error(
        "insufficient funds: {needed} needed, {available} available, {locked} locked by other holders"
    )]
    InsufficientFunds {
        /// The payment plus the fee.
        needed: Amount,
        /// What the unlocked coins hold.
        available: Amount,
        /// What in-flight holders have locked (it may come back).
        locked: Amount,
    },
    /// Building, signing or finalising a transaction failed.
    #[error("signing: {0}")]
    Sign(String),
    /// A malformed request.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// Loading the wallet failed; every caller that waited for the same
    /// load gets the same error.
    #[error("loading wallet {wallet}: {error}")]
    LoadFailed {
        /// The wallet.
        wallet: WalletId,
        /// Why.
        error: std::sync::Arc<WalletError>,
    },
    /// What the database holds contradicts itself or the descriptors.
    #[error("wallet {wallet_id} is corrupt in the database: {detail}")]
    Corrupt {
        /// The wallet.
        wallet_id: WalletId,
        /// What does not hold together.
        detail: String,
    },
}

impl WalletError {
    /// What the caller can do: retry, fix the input, or stop.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WalletError::Store(e) => e.kind(),
            WalletError::LoadFailed { error, .. } => error.kind(),
            WalletError::Descriptor(_)
            | WalletError::NotFound(_)
            | WalletError::InvalidLookahead(_)
            | WalletError::IndexExhausted(_)
            | WalletError::PassphraseRequired
            | WalletError::WrongPassphrase
            | WalletError::WatchOnly(_)
            | WalletError::Locked(_)
            | WalletError::InsufficientFunds { .. }
            | WalletError::InvalidRequest(_)
            | WalletError::Sign(_) => ErrorKind::Invalid,
            WalletError::Corrupt { .. } => ErrorKind::Fatal,
        }
    }
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

/// What [`Wallet::ingest`] did with one block's transactions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestSummary {
    /// Paid to the wallet's scripts.
    pub received: Amount,
    /// Spent of the wallet's coins.
    pub sent: Amount,
    /// Coins created.
    pub coins_created: u32,
    /// Coins spent.
    pub coins_spent: u32,
    /// Transactions that touched the wallet, in block order.
    pub txids: Vec<Txid>,
    /// Scripts derived because the block used the lookahead window: the
    /// manager adds them to its watchlist.
    pub new_scripts: NewScripts,
}

/// A wallet's balance in parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Unspent confirmed coins (immature and locked ones included).
    pub confirmed: Amount,
    /// Of those, coinbase outputs not yet spendable: as Bitcoin Core's
    /// wallet counts them, until 100 blocks are on top of their own.
    pub immature: Amount,
    /// Of those, what in-flight holders (actions) have locked.
    pub locked: Amount,
    /// Unspent outputs to the wallet of unconfirmed transactions that are
    /// trusted: every input spends a confirmed coin of the wallet or an
    /// output of another trusted one (its own payments and their change,
    /// as Bitcoin Core's wallet counts `trusted_pending`).
    pub trusted_pending: Amount,
    /// Unspent outputs to the wallet of the other unconfirmed transactions
    /// (payments from others, seen in the source's mempool): they may
    /// never confirm.
    pub untrusted_pending: Amount,
    /// Confirmed coins that unconfirmed transactions spend (on their way
    /// out; still counted in `confirmed`).
    pub unconfirmed_outgoing: Amount,
}

impl Balance {
    /// What a new payment can use now: confirmed, mature, not locked.
    pub fn spendable(&self) -> Amount {
        self.confirmed
            .checked_sub(self.locked + self.immature)
            .unwrap_or(Amount::ZERO)
    }
}

/// Whether a coin created at `height` is an immature coinbase output at
/// `tip`, as Bitcoin Core's wallet counts it (`GetBlocksToMaturity`: 100
/// blocks must be on top of its own, one more than consensus needs for the
/// spend to enter the next block). With no tip recorded, every coinbase
/// output is immature.
pub(crate) fn is_immature(is_coinbase: bool, height: u32, tip: Option<u32>) -> bool {
    is_coinbase && tip.is_none_or(|tip| tip < height.saturating_add(100))
}

/// An unconfirmed transaction of wallet `id` as stored (its broadcast, or
/// one seen in the mempool); bytes that do not decode are a corrupt
/// database, never a panic.
pub fn decode_stored(id: WalletId, raw: &[u8]) -> Result<Transaction, WalletError> {
    bitcoin::consensus::deserialize(raw).map_err(|e| WalletError::Corrupt {
        wallet_id: id,
        detail: format!("stored unconfirmed transaction: {e}"),
    })
}

/// The unconfirmed parts of a wallet's balance, in satoshis.
#[derive(Debug, Default)]
struct PendingParts {
    trusted: u64,
    untrusted: u64,
    outgoing: u64,
}

/// Reads the wallet's unconfirmed transactions (those neither conflicted
/// nor out of the source's mempool) and splits what they leave the wallet:
/// their outputs to it that none of them spends, trusted or not, and the
/// confirmed coins they spend. Computed from the transactions themselves
/// each time, so that chains of unconfirmed transactions (a payment
/// spending the change of another) count each coin once.
fn pending_parts(tx: &ReadTx<'_>, id: WalletId) -> Result<PendingParts, WalletError> {
    let mut live: HashMap<Txid, Transaction> = HashMap::new();
    for row in tx.unconfirmed_txs(Some(id))? {
        if !row.conflicted && !row.left_mempool {
            live.insert(
                Txid::from_byte_array(row.txid),
                decode_stored(id, &row.raw)?,
            );
        }
    }
    let mut parts = PendingParts::default();
    if live.is_empty() {
        return Ok(parts);
    }
    // Outputs to the wallet, and the outpoints the live transactions spend.
    let mut ours: HashMap<OutPoint, u64> = HashMap::new();
    for (txid, t) in &live {
        for (vout, out) in t.output.iter().enumerate() {
            if tx.wallet_owns_script(id, out.script_pubkey.as_bytes())? {
                ours.insert(OutPoint::new(*txid, vout as u32), out.value.to_sat());
            }
        }
    }
    let mut spent_here: std::collections::HashSet<OutPoint> = std::collections::HashSet::new();
    let mut confirmed_in: HashMap<OutPoint, u64> = HashMap::new();
    for t in live.values() {
        for input in &t.input {
            let prev = input.previous_output;
            spent_here.insert(prev);
            if !ours.contains_key(&prev)
                && let Some(coin) = tx.wallet_coin(id, &prev.txid.to_byte_array(), prev.vout)?
                && coin.spent.is_none()
            {
                confirmed_in.insert(prev, coin.value);
            }
        }
    }
    parts.outgoing = confirmed_in.values().sum();
    // Trusted: every input is a confirmed coin of the wallet or an output
    // to it of a trusted live transaction (parents first, memoised).
    let mut trusted: HashMap<Txid, bool> = HashMap::new();
    fn is_trusted(
        txid: Txid,
        live: &HashMap<Txid, Transaction>,
        ours: &HashMap<OutPoint, u64>,
        confirmed_in: &HashMap<OutPoint, u64>,
        memo: &mut HashMap<Txid, bool>,
    ) -> bool {
        if let Some(&known) = memo.get(&txid) {
            return known;
        }
        // A cycle is impossible between valid transactions; guard anyway.
        memo.insert(txid, false);
        let t = &live[&txid];
        let verdict = !t.input.is_empty()
            && t.input.iter().all(|input| {
                let prev = input.previous_output;
                confirmed_in.contains_key(&prev)
                    || (ours.contains_key(&prev)
                        && live.contains_key(&prev.txid)
                        && is_trusted(prev.txid, live, ours, confirmed_in, memo))
            });
        memo.insert(txid, verdict);
        verdict
    }
    for (outpoint, value) in &ours {
        if spent_here.contains(outpoint) {
            continue;
        }
        if is_trusted(outpoint.txid, &live, &ours, &confirmed_in, &mut trusted) {
            parts.trusted += value;
        } else {
            parts.untrusted += value;
        }
    }
    Ok(parts)
}

/// A coin of the wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coin {
    /// Where it is.
    pub outpoint: OutPoint,
    /// Its value and script.
    pub txout: TxOut,
    /// The keychain and index of its script.
    pub keychain: Keychain,
    /// The derivation index of its script.
    pub index: u32,
    /// The height of the block that created it.
    pub height: u32,
    /// Whether a coinbase created it.
    pub is_coinbase: bool,
    /// The spending transaction and its height, once spent.
    pub spent: Option<(Txid, u32)>,
}

/// A transaction in the wallet's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryTx {
    /// The transaction.
    pub txid: Txid,
    /// Its block's height, `None` while unconfirmed.
    pub height: Option<u32>,
    /// What it paid the wallet.
    pub received: Amount,
    /// What it spent of the wallet's coins.
    pub sent: Amount,
    /// For a transaction the wallet broadcast: the confirmed transaction
    /// that spent one of its inputs instead, and its height.
    pub conflicted_by: Option<(Txid, u32)>,
    /// First seen in the chain source's mempool (a payment from others, or
    /// a transaction of the wallet's keys made elsewhere), rather than
    /// broadcast by the wallet or first seen in a block.
    pub from_mempool: bool,
    /// For an unconfirmed broadcast of the wallet: the source's mempool no
    /// longer holds it (replaced, evicted), so it counts in no balance.
    pub left_mempool: bool,
}

impl HistoryTx {
    /// What it did to the wallet's balance, in satoshis.
    pub fn net(&self) -> i64 {
        self.received.to_sat() as i64 - self.sent.to_sat() as i64
    }
}

impl Coin {
    /// A stored coin row of wallet `wallet_id` as a [`Coin`]: the one
    /// conversion, so that a selection and a listing read rows alike.
    ///
    /// # Errors
    /// [`WalletError::Corrupt`] if the row names no known keychain.
    pub(crate) fn from_row(wallet_id: WalletId, row: CoinRow) -> Result<Coin, WalletError> {
        let keychain = Keychain::from_u8(row.keychain).ok_or_else(|| WalletError::Corrupt {
            wallet_id,
            detail: format!("keychain {}", row.keychain),
        })?;
        Ok(Coin {
            outpoint: OutPoint::new(Txid::from_byte_array(row.txid), row.vout),
            txout: TxOut {
                value: Amount::from_sat(row.value),
                script_pubkey: ScriptBuf::from(row.script),
            },
            keychain,
            index: row.index,
            height: row.height,
            is_coinbase: row.is_coinbase,
            spent: row.spent.map(|(t, h)| (Txid::from_byte_array(t), h)),
        })
    }
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

    /// Ingests, inside the caller's transaction, the transactions of the
    /// block at `height` that the manager routed to this wallet (in block
    /// order; the wallet never scans a whole block): coins for outputs to
    /// its scripts, spends of its coins (a coin created and spent in the same
    /// block included), the transactions, and the lookahead window moved at
    /// once as scripts are used.
    ///
    /// The wallet's synced-to is the chain loop's tip, which the manager
    /// moves in the same transaction.
    pub fn ingest(
        &mut self,
        tx: &mut WriteTx<'_>,
        height: u32,
        txs: &[Transaction],
    ) -> Result<IngestSummary, WalletError> {
        let mut summary = IngestSummary::default();
        // The wallet's own unconfirmed broadcasts, by the outpoints they
        // spend: a block spending one of those with another transaction
        // conflicts them.
        let mut pending: HashMap<OutPoint, [u8; 32]> = HashMap::new();
        for (own, raw) in tx.pending_broadcasts(self.id)? {
            let own_tx = decode_stored(self.id, &raw)?;
            for input in &own_tx.input {
                pending.insert(input.previous_output, own);
            }
        }
        for t in txs {
            let txid = t.compute_txid();
            let txid_bytes = txid.to_byte_array();
            if !pending.is_empty() && !t.is_coinbase() {
                for input in &t.input {
                    if let Some(own) = pending
                        .get(&input.previous_output)
                        .filter(|own| **own != txid_bytes)
                    {
                        tx.set_conflicted(self.id, own, &txid_bytes, height)?;
                    }
                }
            }
            let (mut received, mut sent, mut touched) = (0u64, 0u64, false);
            if !t.is_coinbase() {
                for input in &t.input {
                    let prev = input.previous_output;
                    if let Some(value) = tx.spend_coin(
                        self.id,
                        &prev.txid.to_byte_array(),
                        prev.vout,
                        &txid_bytes,
                        height,
                    )? {
                        sent += value;
                        summary.coins_spent += 1;
                        touched = true;
                    }
                }
            }
            for (vout, out) in t.output.iter().enumerate() {
                let Some((keychain, index)) = self.script_index(&out.script_pubkey) else {
                    continue;
                };
                let new_coin = tx.insert_coin(
                    self.id,
                    &CoinRow {
                        txid: txid_bytes,
                        vout: vout as u32,
                        value: out.value.to_sat(),
                        script: out.script_pubkey.to_bytes(),
                        keychain: keychain.as_u8(),
                        index,
                        height,
                        is_coinbase: t.is_coinbase(),
                        spent: None,
                    },
                )?;
                received += out.value.to_sat();
                summary.coins_created += u32::from(new_coin);
                touched = true;
                summary
                    .new_scripts
                    .0
                    .extend(self.mark_used(tx, keychain, index)?.0);
            }
            if touched {
                tx.record_wallet_tx(
                    self.id,
                    &WalletTxRow {
                        txid: txid_bytes,
                        height: Some(height),
                        received,
                        sent,
                        conflicted_by: None,
                        from_mempool: false,
                        left_mempool: false,
                    },
                )?;
                summary.received += Amount::from_sat(received);
                summary.sent += Amount::from_sat(sent);
                summary.txids.push(txid);
            }
        }
        Ok(summary)
    }

    /// Records a transaction the wallet is broadcasting: it shows in the
    /// history as unconfirmed (with what it pays and spends of the wallet)
    /// until a block confirms it, or conflicts it by spending one of its
    /// inputs with another transaction. Call it in the same transaction
    /// that hands it to the chain source's broadcast queue, or before.
    pub fn record_broadcast(
        &self,
        tx: &mut WriteTx<'_>,
        transaction: &Transaction,
    ) -> Result<HistoryTx, WalletError> {
        let txid = transaction.compute_txid();
        let mut sent = 0u64;
        for input in &transaction.input {
            let prev = input.previous_output;
            if let Some(coin) = tx.wallet_coin(self.id, &prev.txid.to_byte_array(), prev.vout)? {
                sent += coin.value;
            }
        }
        let received: u64 = transaction
            .output
            .iter()
            .filter(|o| self.script_index(&o.script_pubkey).is_some())
            .map(|o| o.value.to_sat())
            .sum();
        let row = WalletTxRow {
            txid: txid.to_byte_array(),
            height: None,
            received,
            sent,
            conflicted_by: None,
            from_mempool: false,
            left_mempool: false,
        };
        tx.record_broadcast(self.id, &row, &bitcoin::consensus::serialize(transaction))?;
        Ok(HistoryTx {
            txid,
            height: None,
            received: Amount::from_sat(received),
            sent: Amount::from_sat(sent),
            conflicted_by: None,
            from_mempool: false,
            left_mempool: false,
        })
    }

    /// Records an unconfirmed transaction seen in the chain source's
    /// mempool that pays the wallet or spends its coins (confirmed, or
    /// outputs of its other unconfirmed transactions), unless the wallet
    /// has it already. Scripts it pays count as used, as a block's would:
    /// the window moves and the new scripts are returned for the
    /// watchlist. `None` when the wallet had it.
    pub fn record_from_mempool(
        &mut self,
        tx: &mut WriteTx<'_>,
        transaction: &Transaction,
    ) -> Result<Option<NewScripts>, WalletError> {
        let txid = transaction.compute_txid();
        // Each input's parent looked up by its txid (not every unconfirmed
        // transaction of the wallet read for each one recorded): a spend
        // of the wallet's coin, confirmed or in one of its unconfirmed
        // transactions still in the mempool.
        let mut parents: HashMap<Txid, Option<Transaction>> = HashMap::new();
        let mut sent = 0u64;
        for input in &transaction.input {
            let prev = input.previous_output;
            if let Some(coin) = tx.wallet_coin(self.id, &prev.txid.to_byte_array(), prev.vout)? {
                sent += coin.value;
                continue;
            }
            let parent = match parents.entry(prev.txid) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let row = tx
                        .unconfirmed_tx(self.id, &prev.txid.to_byte_array())?
                        .filter(|row| !row.conflicted && !row.left_mempool);
                    let parent = match row {
                        Some(row) => Some(decode_stored(self.id, &row.raw)?),
                        None => None,
                    };
                    slot.insert(parent)
                }
            };
            if let Some(out) = parent
                .as_ref()
                .and_then(|parent| parent.output.get(prev.vout as usize))
                && self.script_index(&out.script_pubkey).is_some()
            {
                sent += out.value.to_sat();
            }
        }
        let mut received = 0u64;
        let mut used = Vec::new();
        for out in &transaction.output {
            if let Some((keychain, index)) = self.script_index(&out.script_pubkey) {
                received += out.value.to_sat();
                used.push((keychain, index));
            }
        }
        let row = WalletTxRow {
            txid: txid.to_byte_array(),
            height: None,
            received,
            sent,
            conflicted_by: None,
            from_mempool: true,
            left_mempool: false,
        };
        if !tx.record_from_mempool(self.id, &row, &bitcoin::consensus::serialize(transaction))? {
            return Ok(None);
        }
        let mut new_scripts = NewScripts::default();
        for (keychain, index) in used {
            new_scripts.0.extend(self.mark_used(tx, keychain, index)?.0);
        }
        Ok(Some(new_scripts))
    }

    /// Says whether the source's mempool holds the wallet's unconfirmed
    /// transaction `txid`. One seen in the mempool that left it goes from
    /// the wallet (it comes back as new if the mempool takes it again);
    /// the wallet's own broadcast stays in the history, marked
    /// [`HistoryTx::left_mempool`] and counted in no balance until the
    /// mempool holds it again. Returns whether anything changed.
    pub fn set_in_mempool(
        &self,
        tx: &mut WriteTx<'_>,
        txid: Txid,
        in_mempool: bool,
    ) -> Result<bool, WalletError> {
        Ok(tx.set_in_mempool(self.id, &txid.to_byte_array(), in_mempool)?)
    }

    /// Undoes exactly what [`Wallet::ingest`] did at `height` and above:
    /// coins created there go, coins spent there come back, transactions
    /// confirmed there are dropped (or return to unconfirmed if the wallet
    /// broadcast them). Derived scripts stay: a wider window loses nothing,
    /// and reconnecting the same blocks gives the identical state.
    pub fn disconnect(
        &self,
        tx: &mut WriteTx<'_>,
        height: u32,
    ) -> Result<Disconnected, WalletError> {
        Ok(tx.disconnect_wallet(self.id, height)?)
    }

    /// The sum of the wallet's unspent confirmed coins.
    pub fn balance(&self, tx: &ReadTx<'_>) -> Result<Amount, WalletError> {
        Ok(Amount::from_sat(tx.wallet_balance(self.id)?))
    }

    /// The balance in parts: confirmed coins, the immature coinbase outputs
    /// and what in-flight holders have locked of them, and what the
    /// wallet's own pending broadcasts will move (their inputs leaving,
    /// their outputs to the wallet arriving).
    pub fn balance_details(&self, tx: &ReadTx<'_>) -> Result<Balance, WalletError> {
        Self::balance_of(tx, self.id)
    }

    pub(crate) fn balance_of(tx: &ReadTx<'_>, id: WalletId) -> Result<Balance, WalletError> {
        let tip = tx.tip()?.map(|(h, _)| h);
        let coins = tx.unspent_coins_with_locks(id)?;
        let (mut confirmed, mut immature, mut locked) = (0u64, 0u64, 0u64);
        for (coin, holder) in &coins {
            confirmed += coin.value;
            if holder.is_some() {
                locked += coin.value;
            } else if is_immature(coin.is_coinbase, coin.height, tip) {
                immature += coin.value;
            }
        }
        let pending = pending_parts(tx, id)?;
        Ok(Balance {
            confirmed: Amount::from_sat(confirmed),
            immature: Amount::from_sat(immature),
            locked: Amount::from_sat(locked),
            trusted_pending: Amount::from_sat(pending.trusted),
            untrusted_pending: Amount::from_sat(pending.untrusted),
            unconfirmed_outgoing: Amount::from_sat(pending.outgoing),
        })
    }

    /// The wallet's coins (unspent only, or all), by outpoint.
    pub fn coins(&self, tx: &ReadTx<'_>, unspent_only: bool) -> Result<Vec<Coin>, WalletError> {
        Self::coins_of(tx, self.id, unspent_only)
    }

    fn coins_of(
        tx: &ReadTx<'_>,
        id: WalletId,
        unspent_only: bool,
    ) -> Result<Vec<Coin>, WalletError> {
        tx.wallet_coins(id, unspent_only)?
            .into_iter()
            .map(|row| Coin::from_row(id, row))
            .collect()
    }

    /// Every coin of wallet `id` with its state at the loop's tip.
    pub(crate) fn coins_with_state(
        tx: &ReadTx<'_>,
        id: WalletId,
    ) -> Result<Vec<crate::CoinInfo>, WalletError> {
        use crate::CoinState;
        let tip = tx.tip()?.map(|(h, _)| h);
        let holders: HashMap<OutPoint, String> = tx
            .unspent_coins_with_locks(id)?
            .into_iter()
            .filter_map(|(c, holder)| {
                holder.map(|h| (OutPoint::new(Txid::from_byte_array(c.txid), c.vout), h))
            })
            .collect();
        Ok(Self::coins_of(tx, id, false)?
            .into_iter()
            .map(|coin| {
                let state = match (coin.spent, holders.get(&coin.outpoint)) {
                    (Some((txid, height)), _) => CoinState::Spent { txid, height },
                    (None, Some(holder)) => CoinState::Locked {
                        holder: holder.clone(),
                    },
                    (None, None) if is_immature(coin.is_coinbase, coin.height, tip) => {
                        CoinState::Immature
                    }
                    (None, None) => CoinState::Spendable,
                };
                crate::CoinInfo { coin, state }
            })
            .collect())
    }

    /// The transactions that touched the wallet, oldest first, with what
    /// each paid it and spent of it.
    pub fn history(&self, tx: &ReadTx<'_>) -> Result<Vec<HistoryTx>, WalletError> {
        Self::history_of(tx, self.id)
    }

    pub(crate) fn history_of(tx: &ReadTx<'_>, id: WalletId) -> Result<Vec<HistoryTx>, WalletError> {
        Ok(tx
            .wallet_txs(id)?
            .into_iter()
            .map(|row| HistoryTx {
                txid: Txid::from_byte_array(row.txid),
                height: row.height,
                received: Amount::from_sat(row.received),
                sent: Amount::from_sat(row.sent),
                conflicted_by: row
                    .conflicted_by
                    .map(|(t, h)| (Txid::from_byte_array(t), h)),
                from_mempool: row.from_mempool,
                left_mempool: row.left_mempool,
            })
            .collect())
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
