//! The `wallet_keychains` and `wallet_scripts` tables: a wallet's
//! keychains (descriptor, lookahead, indexes, encrypted secret) and the
//! scripts derived from them.

use rusqlite::{OptionalExtension as _, params};

use crate::error::{SqlResultExt as _, StoreError};
use crate::tx::{ReadTx, WalletId, WriteTx};

/// A keychain to register with a wallet.
#[derive(Debug, Clone, Copy)]
pub struct NewKeychain<'a> {
    /// 0 external (receive), 1 internal (change).
    pub keychain: u8,
    /// The network's name as Bitcoin Core spells it (`main`, `regtest`, ...).
    pub network: &'a str,
    /// The public descriptor. Never a secret.
    pub descriptor: &'a str,
    /// Scripts kept derived past the last used index.
    pub lookahead: u32,
}

/// A keychain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeychainRow {
    /// 0 external (receive), 1 internal (change).
    pub keychain: u8,
    /// The network's name as Bitcoin Core spells it.
    pub network: String,
    /// The public descriptor.
    pub descriptor: String,
    /// Scripts kept derived past the last used index.
    pub lookahead: u32,
    /// The next index to reveal.
    pub next_index: u32,
    /// The highest index seen used on chain.
    pub last_used: Option<u32>,
    /// Scripts `0..derived_to` are stored.
    pub derived_to: u32,
}

impl ReadTx<'_> {
    /// A wallet's keychains, external first.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn keychains(&self, wallet_id: WalletId) -> Result<Vec<KeychainRow>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT keychain, network, descriptor, lookahead, next_index, last_used, derived_to \
                 FROM wallet_keychains WHERE wallet_id = ?1 ORDER BY keychain",
            )
            .or_store()?;
        let rows = stmt
            .query_map([wallet_id.as_i64()], |row| {
                Ok(KeychainRow {
                    keychain: row.get(0)?,
                    network: row.get(1)?,
                    descriptor: row.get(2)?,
                    lookahead: row.get(3)?,
                    next_index: row.get(4)?,
                    last_used: row.get(5)?,
                    derived_to: row.get(6)?,
                })
            })
            .or_store()?;
        rows.collect::<Result<_, _>>().or_store()
    }

    /// A wallet's stored scripts of one keychain, by index from 0.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if an index is missing; otherwise busy (retry)
    /// or corrupt (fatal).
    pub fn keychain_scripts(
        &self,
        wallet_id: WalletId,
        keychain: u8,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT idx, script FROM wallet_scripts WHERE wallet_id = ?1 AND keychain = ?2 ORDER BY idx")
            .or_store()?;
        let rows = stmt
            .query_map(params![wallet_id.as_i64(), keychain], |row| {
                Ok((row.get::<_, u32>(0)?, row.get(1)?))
            })
            .or_store()?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, script) = row.or_store()?;
            if idx as usize != out.len() {
                return Err(StoreError::Corrupt {
                    detail: format!(
                        "wallet {wallet_id} keychain {keychain} lacks script {}",
                        out.len()
                    ),
                    source: None,
                });
            }
            out.push(script);
        }
        Ok(out)
    }

    /// A keychain's encrypted private descriptor, if the wallet signs.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry) or corrupt (fatal).
    pub fn keychain_secret(
        &self,
        wallet_id: WalletId,
        keychain: u8,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.tx
            .prepare_cached("SELECT encrypted_secret FROM wallet_keychains WHERE wallet_id = ?1 AND keychain = ?2")
            .or_store()?
            .query_row(params![wallet_id.as_i64(), keychain], |row| row.get(0))
            .optional()
            .map(Option::flatten)
            .or_store()
    }
}

impl WriteTx<'_> {
    /// Registers a keychain of a wallet.
    ///
    /// # Errors
    /// [`StoreError::WalletNotFound`] (invalid) for an unknown wallet;
    /// otherwise busy (retry), corrupt or full disk (fatal).
    pub fn insert_keychain(
        &mut self,
        wallet_id: WalletId,
        keychain: NewKeychain<'_>,
    ) -> Result<(), StoreError> {
        if self.wallet(wallet_id)?.is_none() {
            return Err(StoreError::WalletNotFound { wallet_id });
        }
        self.read
            .tx
            .prepare_cached(
                "INSERT INTO wallet_keychains (wallet_id, keychain, network, descriptor, lookahead) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .or_store()?
            .execute(params![
                wallet_id.as_i64(),
                keychain.keychain,
                keychain.network,
                keychain.descriptor,
                keychain.lookahead
            ])
            .or_store()?;
        Ok(())
    }

    /// Stores derived scripts `first..first + scripts.len()` of a keychain
    /// and moves its `derived_to` past them.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if `first` is not the keychain's `derived_to`
    /// (scripts must stay contiguous); otherwise busy (retry), corrupt or
    /// full disk (fatal).
    pub fn append_scripts(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        first: u32,
        scripts: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let tx = &self.read.tx;
        let derived_to: u32 = tx
            .prepare_cached(
                "SELECT derived_to FROM wallet_keychains WHERE wallet_id = ?1 AND keychain = ?2",
            )
            .or_store()?
            .query_row(params![wallet_id.as_i64(), keychain], |row| row.get(0))
            .or_store()?;
        if derived_to != first {
            return Err(StoreError::Corrupt {
                detail: format!(
                    "appending scripts from {first} to a keychain derived to {derived_to}"
                ),
                source: None,
            });
        }
        let mut insert = tx
            .prepare_cached("INSERT INTO wallet_scripts (wallet_id, keychain, idx, script) VALUES (?1, ?2, ?3, ?4)")
            .or_store()?;
        for (i, script) in scripts.iter().enumerate() {
            insert
                .execute(params![
                    wallet_id.as_i64(),
                    keychain,
                    first + i as u32,
                    script
                ])
                .or_store()?;
        }
        tx.prepare_cached(
            "UPDATE wallet_keychains SET derived_to = ?3 WHERE wallet_id = ?1 AND keychain = ?2",
        )
        .or_store()?
        .execute(params![
            wallet_id.as_i64(),
            keychain,
            first + scripts.len() as u32
        ])
        .or_store()?;
        Ok(())
    }

    /// Sets a keychain's next index to reveal and its highest used index.
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_keychain_indexes(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        next_index: u32,
        last_used: Option<u32>,
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached(
                "UPDATE wallet_keychains SET next_index = ?3, last_used = ?4 WHERE wallet_id = ?1 AND keychain = ?2",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), keychain, next_index, last_used])
            .or_store()?;
        Ok(())
    }

    /// See [`crate::faults::overwrite_descriptor`].
    #[cfg(feature = "faults")]
    pub(crate) fn overwrite_descriptor(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        descriptor: &str,
    ) -> Result<(), StoreError> {
        let changed = self
            .read
            .tx
            .prepare_cached(
                "UPDATE wallet_keychains SET descriptor = ?3 WHERE wallet_id = ?1 AND keychain = ?2",
            )
            .or_store()?
            .execute(params![wallet_id.as_i64(), keychain, descriptor])
            .or_store()?;
        if changed == 0 {
            return Err(StoreError::WalletNotFound { wallet_id });
        }
        Ok(())
    }

    /// Stores a keychain's encrypted private descriptor (already encrypted
    /// by the caller: the store never sees a secret in clear).
    ///
    /// # Errors
    /// [`StoreError`]: busy (retry), corrupt or full disk (fatal).
    pub fn set_keychain_secret(
        &mut self,
        wallet_id: WalletId,
        keychain: u8,
        encrypted: &[u8],
    ) -> Result<(), StoreError> {
        self.read
            .tx
            .prepare_cached("UPDATE wallet_keychains SET encrypted_secret = ?3 WHERE wallet_id = ?1 AND keychain = ?2")
            .or_store()?
            .execute(params![wallet_id.as_i64(), keychain, encrypted])
            .or_store()?;
        Ok(())
    }
}
