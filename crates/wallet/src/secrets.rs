//! Encryption of a signing wallet's private descriptors at rest.
//!
//! Argon2id (RustCrypto `argon2`, its default cost: 19 MiB, 2 passes, 1
//! lane, OWASP's recommendation) turns the passphrase and a random 16-byte
//! salt into a 256-bit key; XChaCha20-Poly1305 (RustCrypto
//! `chacha20poly1305`, 24-byte random nonce, so random nonces never
//! collide) encrypts the descriptor, authenticated together with the wallet
//! id and keychain so a ciphertext cannot be moved to another wallet.
//!
//! Layout: `LKS1` | salt (16) | nonce (24) | ciphertext and tag.

use argon2::Argon2;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 4] = b"LKS1";
const SALT: usize = 16;
const NONCE: usize = 24;

/// Why a secret could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecryptError {
    /// Wrong passphrase, or the ciphertext was altered or moved.
    #[error("wrong passphrase (or the stored secret was altered)")]
    WrongPassphrase,
    /// Not something this module wrote.
    #[error("the stored secret is not in a known format")]
    Format,
}

fn key(passphrase: &str, salt: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    Argon2::default()
        .hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .expect("a 16-byte salt and a 32-byte output are within Argon2's limits");
    key
}

/// Encrypts `secret` under `passphrase`, bound to `context`.
pub(crate) fn encrypt(secret: &str, passphrase: &str, context: &[u8]) -> Vec<u8> {
    let mut salt = [0u8; SALT];
    OsRng.fill_bytes(&mut salt);
    let cipher = XChaCha20Poly1305::new(&key(passphrase, &salt).into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: secret.as_bytes(),
                aad: context,
            },
        )
        .expect("encrypting into a Vec cannot fail");
    let mut out = Vec::with_capacity(4 + SALT + NONCE + ciphertext.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

/// Decrypts what [`encrypt`] wrote.
pub(crate) fn decrypt(
    blob: &[u8],
    passphrase: &str,
    context: &[u8],
) -> Result<String, DecryptError> {
    if blob.len() < 4 + SALT + NONCE + 16 || &blob[..4] != MAGIC {
        return Err(DecryptError::Format);
    }
    let (salt, rest) = blob[4..].split_at(SALT);
    let (nonce, ciphertext) = rest.split_at(NONCE);
    let cipher = XChaCha20Poly1305::new(&key(passphrase, salt).into());
    let plain = cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: context,
            },
        )
        .map_err(|_| DecryptError::WrongPassphrase)?;
    String::from_utf8(plain).map_err(|_| DecryptError::Format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_tampering_is_refused() {
        let blob = encrypt("tr(tprv.../0/*)", "correct horse", b"wallet 1 keychain 0");
        assert_eq!(
            decrypt(&blob, "correct horse", b"wallet 1 keychain 0").unwrap(),
            "tr(tprv.../0/*)"
        );
        assert_eq!(
            decrypt(&blob, "wrong horse", b"wallet 1 keychain 0"),
            Err(DecryptError::WrongPassphrase)
        );
        assert_eq!(
            decrypt(&blob, "correct horse", b"wallet 2 keychain 0"),
            Err(DecryptError::WrongPassphrase)
        );
        for at in [4, 4 + SALT, 4 + SALT + NONCE, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 1;
            assert_eq!(
                decrypt(&bad, "correct horse", b"wallet 1 keychain 0"),
                Err(DecryptError::WrongPassphrase),
                "byte {at}"
            );
        }
        assert_eq!(
            decrypt(&blob[..20], "correct horse", b"x"),
            Err(DecryptError::Format)
        );
        // Two encryptions of the same secret differ (fresh salt and nonce).
        assert_ne!(encrypt("s", "p", b"c"), encrypt("s", "p", b"c"));
    }
}
