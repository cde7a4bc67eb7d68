//! Helpers shared by lockstep's cross-crate tests (`tests/it`).

use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, ScriptBuf};

/// A test key from one repeated byte (never zero).
pub fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n.max(1); 32]).expect("a repeated non-zero byte is a valid key")
}

/// The P2WPKH script of a key.
pub fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::signing_only();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
}

/// The key-path-only P2TR script of a key.
pub fn p2tr(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2tr(&secp, key.public_key(&secp).x_only_public_key().0, None)
}

/// What the crash test's parent (`tests/it/crash.rs`) and child
/// (`src/bin/crash_child.rs`) agree on.
pub mod crash {
    use std::str::FromStr as _;

    use bitcoin::BlockHash;
    use lockstep::chain::BlockId;

    /// Seed of the test wallets' descriptors.
    pub const WALLET_SEED: u64 = 77;
    /// Wallets registered at start: indexes `0..WALLETS`.
    pub const WALLETS: u32 = 8;
    /// The wallet imported mid-sync.
    pub const LATE_WALLET: u32 = WALLETS;
    /// The loop height at which the child imports the late wallet.
    pub const LATE_WALLET_AT: u32 = 250;

    /// Name, birth height and lookahead of test wallet `index`.
    pub fn wallet_spec(index: u32) -> (String, u32, u32) {
        let birth = if index == LATE_WALLET {
            105
        } else {
            1 + index * 20
        };
        (format!("crash-{index}"), birth, 6 + index % 4)
    }

    /// The done file's text: the final tip, which the last run of the
    /// child syncs to before it exits.
    pub fn done_text(tip: BlockId) -> String {
        format!("{} {}\n", tip.height, tip.hash)
    }

    /// Reads [`done_text`]'s text back; `None` if it is not that.
    pub fn parse_done(text: &str) -> Option<BlockId> {
        let mut words = text.split_whitespace();
        let height = words.next()?.parse().ok()?;
        let hash = BlockHash::from_str(words.next()?).ok()?;
        words.next().is_none().then_some(BlockId { height, hash })
    }
}
