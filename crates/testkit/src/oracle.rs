//! Checking wallets against the simulated chain's oracle, and deterministic
//! test wallets: what the demo, the end-to-end tests and the crash test
//! share.
//!
//! The oracle ([`SimChain::truth`]) is a full scan of the best chain for a
//! set of scripts. A wallet is right when its coins (unspent and spent, with
//! heights and spenders), its confirmed history and its balance equal the
//! oracle's, up to the height it is synced to.
//!
//! Which scripts? Not the ones the wallet says it derives: a wallet whose
//! window is one script too narrow would then be checked against its own
//! mistake and pass. [`check_wallet`] works out on its own what the wallet
//! must watch, from its descriptors and the chain: the gap-limit rule
//! walked over the best chain, block by block (see [`expected_scripts`]).
//! It shares no code with the wallet's window logic; it uses only the
//! descriptor library to turn an index into a script.

use std::collections::{BTreeSet, HashMap};

use bitcoin::bip32::{Xpriv, Xpub};
use bitcoin::hashes::Hash as _;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Amount, Network, NetworkKind, ScriptBuf};
use lockstep_sim::{SimChain, Truth};
use lockstep_store::{CoinRow, ReadTx, WalletId};
use lockstep_wallet::{DescriptorError, Keychain, Wallet, WalletDescriptors, WalletError};

/// The script types the test wallets cycle through.
pub const KINDS: [&str; 3] = ["wpkh", "tr", "wsh-multi"];

/// The watch-only descriptors of test wallet `index` (from `seed`): P2WPKH,
/// P2TR or a 2-of-2 P2WSH sortedmulti, by `index % 3`.
pub fn test_descriptors(seed: u64, index: u32) -> WalletDescriptors {
    let secp = Secp256k1::new();
    let xpub = |n: u32| {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..12].copy_from_slice(&index.to_le_bytes());
        bytes[12..16].copy_from_slice(&n.to_le_bytes());
        let xprv =
            Xpriv::new_master(NetworkKind::Test, &bytes).expect("32 bytes make a master key");
        Xpub::from_priv(&secp, &xprv)
    };
    let (a, b) = (xpub(0), xpub(1));
    let (external, internal) = match index % 3 {
        0 => (format!("wpkh({a}/0/*)"), format!("wpkh({a}/1/*)")),
        1 => (format!("tr({a}/0/*)"), format!("tr({a}/1/*)")),
        _ => (
            format!("wsh(sortedmulti(2,{a}/0/*,{b}/0/*))"),
            format!("wsh(sortedmulti(2,{a}/1/*,{b}/1/*))"),
        ),
    };
    WalletDescriptors::parse(&external, &internal, Network::Regtest)
        .expect("test descriptors are valid")
}

/// One wallet compared with the oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletCheck {
    /// The wallet.
    pub wallet: WalletId,
    /// Its name.
    pub name: String,
    /// Its confirmed balance.
    pub balance: Amount,
    /// Its unspent coins.
    pub coins: usize,
    /// Its confirmed transactions.
    pub txs: usize,
    /// Scripts it derives.
    pub scripts: usize,
    /// `None` when it equals the oracle; what differs otherwise.
    pub mismatch: Option<String>,
}

impl WalletCheck {
    /// Whether the wallet equals the oracle.
    pub fn ok(&self) -> bool {
        self.mismatch.is_none()
    }
}

/// Compares wallet `id` with the oracle of `chain` at `height` (the
/// wallet's synced-to: the loop's tip, or its import height), for the
/// scripts the gap-limit rule reaches on that chain (see
/// [`expected_scripts`]).
///
/// # Errors
/// The wallet cannot be read.
pub fn check_wallet(
    tx: &ReadTx<'_>,
    chain: &SimChain,
    id: WalletId,
    height: u32,
) -> Result<WalletCheck, WalletError> {
    check_wallet_imported(tx, chain, id, height, &[])
}

/// [`check_wallet`] for a wallet that was also given targeted imports:
/// each `(keychain, end)` of `imported` is a `ScriptImport::Range` whose
/// scripts `0..end` the wallet derived past its gap limit and rescanned.
///
/// # Errors
/// The wallet cannot be read.
pub fn check_wallet_imported(
    tx: &ReadTx<'_>,
    chain: &SimChain,
    id: WalletId,
    height: u32,
    imported: &[(Keychain, u32)],
) -> Result<WalletCheck, WalletError> {
    // The wallet is loaded for its descriptors, name and lookahead only.
    let wallet = Wallet::load(tx, id)?;
    let coins = tx.wallet_coins(id, false)?;
    let mut problems = Vec::new();
    let expected = expected_scripts(
        chain,
        wallet.descriptors(),
        wallet.lookahead(),
        height,
        imported,
        &coins,
        &mut problems,
    )?;
    let truth = chain.truth(expected.keys());
    compare(tx, id, wallet.name(), &truth, height, coins, problems)
}

/// One wallet's unconfirmed view compared with the mempool oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnconfirmedCheck {
    /// The wallet.
    pub wallet: WalletId,
    /// Unconfirmed transactions it counts.
    pub txs: usize,
    /// Its trusted and untrusted pending amounts, and its outgoing.
    pub pending: (Amount, Amount, Amount),
    /// `None` when it equals the oracle; what differs otherwise.
    pub mismatch: Option<String>,
}

impl UnconfirmedCheck {
    /// Whether the wallet equals the oracle.
    pub fn ok(&self) -> bool {
        self.mismatch.is_none()
    }
}

/// Compares wallet `id`'s unconfirmed transactions and the unconfirmed
/// parts of its balance with [`SimChain::mempool_truth`], for the scripts
/// the gap-limit rule reaches on the chain up to `height` and then through
/// the mempool (a mempool payment to the window moves it, as a block's
/// does). What the wallet counts: transactions with no height that are
/// neither conflicted nor out of the mempool.
///
/// # Errors
/// The wallet cannot be read.
pub fn check_unconfirmed(
    tx: &ReadTx<'_>,
    chain: &SimChain,
    id: WalletId,
    height: u32,
) -> Result<UnconfirmedCheck, WalletError> {
    let wallet = Wallet::load(tx, id)?;
    let coins = tx.wallet_coins(id, false)?;
    let mut problems = Vec::new();
    let mut scripts = expected_scripts(
        chain,
        wallet.descriptors(),
        wallet.lookahead(),
        height,
        &[],
        &coins,
        &mut problems,
    )?;
    let mempool = chain.mempool();
    loop {
        let mut grow = Vec::new();
        for out in mempool.iter().flat_map(|t| &t.output) {
            if let Some(&(keychain, index)) = scripts.get(&out.script_pubkey) {
                grow.push((
                    keychain,
                    index.saturating_add(1).saturating_add(wallet.lookahead()),
                ));
            }
        }
        let before = scripts.len();
        for (keychain, end) in grow {
            for index in 0..end.min(1 << 31) {
                let script = wallet.descriptors().script_at(keychain, index)?;
                scripts.entry(script).or_insert((keychain, index));
            }
        }
        if scripts.len() == before {
            break;
        }
    }
    let truth = chain.mempool_truth(scripts.keys());
    type TxKey = ([u8; 32], u64, u64);
    let ours: BTreeSet<TxKey> = tx
        .wallet_txs(id)?
        .into_iter()
        .filter(|t| t.height.is_none() && t.conflicted_by.is_none() && !t.left_mempool)
        .map(|t| (t.txid, t.received, t.sent))
        .collect();
    let expected: BTreeSet<TxKey> = truth
        .txs
        .iter()
        .map(|t| (t.txid.to_byte_array(), t.received.to_sat(), t.sent.to_sat()))
        .collect();
    if ours != expected {
        let show = |k: &TxKey| format!("{} +{} -{}", bitcoin::Txid::from_byte_array(k.0), k.1, k.2);
        problems.push(format!(
            "unconfirmed: missing {:?}, unexpected {:?}",
            expected.difference(&ours).map(show).collect::<Vec<_>>(),
            ours.difference(&expected).map(show).collect::<Vec<_>>(),
        ));
    }
    let balance = wallet.balance_details(tx)?;
    let got = (
        balance.trusted_pending,
        balance.untrusted_pending,
        balance.unconfirmed_outgoing,
    );
    let want = (
        truth.trusted_pending(),
        truth.untrusted_pending(),
        truth.outgoing,
    );
    if got != want {
        problems.push(format!(
            "pending (trusted, untrusted, outgoing) {got:?} != oracle {want:?}"
        ));
    }
    Ok(UnconfirmedCheck {
        wallet: id,
        txs: ours.len(),
        pending: got,
        mismatch: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// The weak check: the oracle over the scripts the
/// wallet itself derived. It passes a wallet whose window is too narrow
/// (the payments it misses are to scripts it does not derive, so the oracle
/// does not look for them either). Kept only so that the fault tests can
/// show that [`check_wallet`] catches what this misses.
///
/// # Errors
/// The wallet cannot be read.
#[doc(hidden)]
pub fn check_wallet_own_scripts(
    tx: &ReadTx<'_>,
    chain: &SimChain,
    id: WalletId,
    height: u32,
) -> Result<WalletCheck, WalletError> {
    let wallet = Wallet::load(tx, id)?;
    let scripts: Vec<ScriptBuf> = wallet
        .watch_scripts()
        .map(|(_, _, s)| s.to_owned())
        .collect();
    let truth = chain.truth(&scripts);
    let coins = tx.wallet_coins(id, false)?;
    compare(tx, id, wallet.name(), &truth, height, coins, Vec::new())
}

/// The scripts wallet `descriptors` must watch at `height` of `chain`, with
/// the keychain and index each derives from.
///
/// The gap-limit rule, walked over the best chain: per keychain, scripts
/// `0..lookahead` are watched at first; an output paying watched index `i`
/// moves the window so that `lookahead` scripts lie past `i`. A wallet finds,
/// inside one block, payments to scripts that a *later* transaction of the
/// same block derives, so each block is scanned again while it derives new
/// scripts.
///
/// Two more sources, each a script the wallet may rightly watch though the
/// walk does not reach it:
/// - `imported` ranges (`(keychain, end)`: scripts `0..end`), derived by a
///   targeted import past the gap limit;
/// - the scripts of coins the wallet holds: a wallet keeps the scripts it
///   derived on a branch a reorg removed, so it may find a payment past the
///   current chain's walk. Such a coin counts only if its script re-derives,
///   here, from the descriptors at the keychain and index recorded with it;
///   otherwise it goes in `problems`.
///
/// All of these are watched from the start of the walk and move the window
/// when paid, as they do in the wallet.
///
/// # Errors
/// A descriptor does not derive an index the walk needs.
pub fn expected_scripts(
    chain: &SimChain,
    descriptors: &WalletDescriptors,
    lookahead: u32,
    height: u32,
    imported: &[(Keychain, u32)],
    coins: &[CoinRow],
    problems: &mut Vec<String>,
) -> Result<HashMap<ScriptBuf, (Keychain, u32)>, DescriptorError> {
    let mut walk = GapWalk {
        descriptors,
        derived: [0, 0],
        watched: HashMap::new(),
    };
    for keychain in Keychain::ALL {
        walk.derive_below(keychain, lookahead)?;
    }
    for &(keychain, end) in imported {
        walk.derive_below(keychain, end)?;
    }
    for coin in coins {
        let at = format!(
            "coin {}:{}",
            bitcoin::Txid::from_byte_array(coin.txid),
            coin.vout
        );
        let Some(keychain) = Keychain::from_u8(coin.keychain) else {
            problems.push(format!("{at}: keychain {}", coin.keychain));
            continue;
        };
        match descriptors.script_at(keychain, coin.index) {
            Ok(script) if script.as_bytes() == coin.script.as_slice() => {
                walk.watched.insert(script, (keychain, coin.index));
            }
            _ => problems.push(format!(
                "{at}: its script is not {keychain} index {}",
                coin.index
            )),
        }
    }
    // Height 0: the genesis coinbase pays no one's wallet (and the oracle
    // skips it, as Bitcoin Core does).
    for h in 1..=height {
        let Some(block) = chain.block_at(h) else {
            break;
        };
        loop {
            let mut grew = false;
            for out in block.txdata.iter().flat_map(|t| &t.output) {
                if let Some(&(keychain, index)) = walk.watched.get(&out.script_pubkey) {
                    let end = index.saturating_add(1).saturating_add(lookahead);
                    grew |= walk.derive_below(keychain, end)?;
                }
            }
            if !grew {
                break;
            }
        }
    }
    Ok(walk.watched)
}

/// The oracle's own gap-limit window: a prefix of each keychain, derived.
struct GapWalk<'a> {
    descriptors: &'a WalletDescriptors,
    /// Per keychain (by `as_u8`), scripts `0..derived` are watched.
    derived: [u32; 2],
    watched: HashMap<ScriptBuf, (Keychain, u32)>,
}

impl GapWalk<'_> {
    /// Watches a keychain's scripts `0..end`; whether any was new.
    fn derive_below(&mut self, keychain: Keychain, end: u32) -> Result<bool, DescriptorError> {
        // Non-hardened indexes stop at 2^31.
        let end = end.min(1 << 31);
        let slot = usize::from(keychain.as_u8());
        let first = self.derived[slot];
        for index in first..end {
            let script = self.descriptors.script_at(keychain, index)?;
            self.watched.insert(script, (keychain, index));
        }
        self.derived[slot] = first.max(end);
        Ok(end > first)
    }
}

/// Compares what the database holds for wallet `id` (`coins` are all of its
/// coins) with `truth` at `height`: coins with heights and spenders,
/// confirmed history with what each transaction paid and spent, balance.
/// `problems` found before are reported with what differs here.
fn compare(
    tx: &ReadTx<'_>,
    id: WalletId,
    name: &str,
    truth: &Truth,
    height: u32,
    coins: Vec<CoinRow>,
    mut problems: Vec<String>,
) -> Result<WalletCheck, WalletError> {
    type CoinKey = ([u8; 32], u32, u64, u32, Option<([u8; 32], u32)>);
    let ours: BTreeSet<CoinKey> = coins
        .into_iter()
        .map(|c| (c.txid, c.vout, c.value, c.height, c.spent))
        .collect();
    // Every coin created by `height`, spent if its spender is too.
    let unspent = truth.unspent.iter().map(|coin| (coin, None));
    let spent = truth
        .spent
        .iter()
        .map(|s| (&s.coin, Some((s.spent_by, s.spent_height))));
    let expected: BTreeSet<CoinKey> = unspent
        .chain(spent)
        .filter(|(coin, _)| coin.height <= height)
        .map(|(coin, spender)| {
            (
                coin.outpoint.txid.to_byte_array(),
                coin.outpoint.vout,
                coin.txout.value.to_sat(),
                coin.height,
                spender
                    .filter(|(_, at)| *at <= height)
                    .map(|(by, at)| (by.to_byte_array(), at)),
            )
        })
        .collect();
    type TxKey = ([u8; 32], u32, u64, u64);
    let our_txs: BTreeSet<TxKey> = tx
        .wallet_txs(id)?
        .into_iter()
        .filter_map(|t| t.height.map(|h| (t.txid, h, t.received, t.sent)))
        .collect();
    let expected_txs: BTreeSet<TxKey> = truth
        .history
        .iter()
        .filter(|t| t.height <= height)
        .map(|t| {
            (
                t.txid.to_byte_array(),
                t.height,
                t.received.to_sat(),
                t.sent.to_sat(),
            )
        })
        .collect();
    let balance = Amount::from_sat(tx.wallet_balance(id)?);
    let expected_balance: u64 = expected.iter().filter(|c| c.4.is_none()).map(|c| c.2).sum();
    let coin_at =
        |c: &CoinKey| format!("{}:{} at {}", bitcoin::Txid::from_byte_array(c.0), c.1, c.3);
    if ours != expected {
        problems.push(format!(
            "coins: {} missing (first: {:?}), {} unexpected (first: {:?})",
            expected.difference(&ours).count(),
            expected.difference(&ours).next().map(coin_at),
            ours.difference(&expected).count(),
            ours.difference(&expected).next().map(coin_at),
        ));
    }
    if our_txs != expected_txs {
        problems.push(format!(
            "history: {} missing, {} unexpected",
            expected_txs.difference(&our_txs).count(),
            our_txs.difference(&expected_txs).count()
        ));
    }
    if balance.to_sat() != expected_balance {
        problems.push(format!(
            "balance {} != oracle {}",
            balance.to_sat(),
            expected_balance
        ));
    }
    Ok(WalletCheck {
        wallet: id,
        name: name.to_owned(),
        balance,
        coins: ours.iter().filter(|c| c.4.is_none()).count(),
        txs: our_txs.len(),
        scripts: derived_count(tx, id)?,
        mismatch: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// How many scripts the database records the wallet has derived.
fn derived_count(tx: &ReadTx<'_>, id: WalletId) -> Result<usize, WalletError> {
    Ok(tx
        .keychains(id)?
        .iter()
        .map(|k| k.derived_to as usize)
        .sum())
}
