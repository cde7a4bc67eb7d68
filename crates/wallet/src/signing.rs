//! Building, signing and finalising the transaction of a [`Selection`].
//!
//! The PSBT carries every input's spent output and key origins (miniscript
//! fills them from the definite descriptor), so any signer holding one of
//! the keys can sign: a multisig wallet signs its share and a co-signer
//! adds the rest. rust-bitcoin signs (ECDSA for P2WPKH and wsh, Schnorr
//! for Taproot key path); miniscript finalises.

use bitcoin::absolute::LockTime;
use bitcoin::psbt::Psbt;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::transaction::Version;
use bitcoin::{ScriptBuf, Sequence, Transaction, TxIn, Witness};
use miniscript::psbt::PsbtExt;

use crate::descriptor::Keychain;
use crate::selection::Selection;
use crate::wallet::{Wallet, WalletError};

impl Wallet {
    /// The unsigned PSBT paying a selection's recipients (and its change)
    /// from its coins: version 2, no lock time, replaceable.
    pub fn build_psbt(&self, selection: &Selection) -> Result<Psbt, WalletError> {
        let mut outputs = selection.recipients.clone();
        outputs.extend(selection.change.clone());
        let unsigned = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: selection
                .coins
                .iter()
                .map(|c| TxIn {
                    previous_output: c.outpoint,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness: Witness::new(),
                })
                .collect(),
            output: outputs,
        };
        let mut psbt =
            Psbt::from_unsigned_tx(unsigned).map_err(|e| WalletError::Sign(e.to_string()))?;
        for (i, coin) in selection.coins.iter().enumerate() {
            psbt.inputs[i].witness_utxo = Some(coin.txout.clone());
            let definite = self
                .descriptors()
                .descriptor(coin.keychain)
                .at_derivation_index(coin.index)
                .map_err(|e| WalletError::Sign(e.to_string()))?;
            psbt.update_input_with_descriptor(i, &definite)
                .map_err(|e| WalletError::Sign(e.to_string()))?;
        }
        if let Some(change) = &selection.change
            && let Some((Keychain::Internal, index)) = self.script_index(&change.script_pubkey)
        {
            let definite = self
                .descriptors()
                .descriptor(Keychain::Internal)
                .at_derivation_index(index)
                .map_err(|e| WalletError::Sign(e.to_string()))?;
            let at = psbt.outputs.len() - 1;
            psbt.update_output_with_descriptor(at, &definite)
                .map_err(|e| WalletError::Sign(e.to_string()))?;
        }
        Ok(psbt)
    }

    /// Signs every input of `psbt` this wallet holds a key for. Returns how
    /// many inputs it signed. Needs the wallet unlocked.
    pub fn sign(&self, psbt: &mut Psbt) -> Result<usize, WalletError> {
        if !self.is_signing() {
            return Err(WalletError::WatchOnly(self.id()));
        }
        let keys = self
            .descriptors()
            .signing_keys()
            .ok_or(WalletError::Locked(self.id()))?;
        let secp = Secp256k1::new();
        match psbt.sign(&keys, &secp) {
            Ok(used) => Ok(used.len()),
            Err((_, errors)) => Err(WalletError::Sign(format!("{errors:?}"))),
        }
    }

    /// Finalises a fully signed PSBT with miniscript and extracts the
    /// transaction.
    pub fn finalize(mut psbt: Psbt) -> Result<Transaction, WalletError> {
        let secp = Secp256k1::verification_only();
        psbt.finalize_mut(&secp)
            .map_err(|errors| WalletError::Sign(format!("cannot finalise: {errors:?}")))?;
        psbt.extract_tx()
            .map_err(|e| WalletError::Sign(e.to_string()))
    }
}
