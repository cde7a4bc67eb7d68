//! Checking wallets against the simulated chain's oracle, and deterministic
//! test wallets: what the demo, the end-to-end tests and the crash test
//! share.
//!
//! The oracle ([`SimChain::truth`]) is a full scan of the best chain for a
//! set of scripts. A wallet is right when its coins (unspent and spent, with
//! heights and spenders), its confirmed history and its balance equal the
//! oracle's for exactly the scripts the wallet derives, up to the height it
//! is synced to.

use std::collections::BTreeSet;

use bitcoin::bip32::{Xpriv, Xpub};
use bitcoin::hashes::Hash as _;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Amount, Network, NetworkKind, ScriptBuf};
use lockstep_chain::SimChain;
use lockstep_store::{ReadTx, WalletId};
use lockstep_wallet::{Wallet, WalletDescriptors, WalletError};

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
/// wallet's synced-to: the loop's tip, or its import height).
///
/// # Errors
/// The wallet cannot be read.
pub fn check_wallet(
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

    type CoinKey = ([u8; 32], u32, u64, u32, Option<([u8; 32], u32)>);
    let ours: BTreeSet<CoinKey> = tx
        .wallet_coins(id, false)?
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
    let mut problems = Vec::new();
    if ours != expected {
        problems.push(format!(
            "coins: {} missing, {} unexpected",
            expected.difference(&ours).count(),
            ours.difference(&expected).count()
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
        name: wallet.name().to_owned(),
        balance,
        coins: ours.iter().filter(|c| c.4.is_none()).count(),
        txs: our_txs.len(),
        scripts: scripts.len(),
        mismatch: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}
