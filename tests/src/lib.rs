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
