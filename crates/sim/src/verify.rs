//! Script verification with Bitcoin Core's own interpreter.
//!
//! [`bitcoinconsensus`] 0.106 is Bitcoin Core 26's script interpreter. It is
//! called with every spent output, which is what lets it check Taproot
//! (BIP341 sighashes commit to all of them). rust-bitcoin 0.32's own
//! `bitcoinconsensus` feature links 0.105, which has no Taproot flag and so
//! passes any P2TR spend unchecked: lockstep never enables it.

use bitcoin::TxOut;
use bitcoin::{Transaction, consensus};

/// Core's flags for a block today: P2SH, DERSIG, NULLDUMMY, CLTV, CSV,
/// WITNESS and TAPROOT.
pub const VERIFY_ALL: u32 =
    bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT;

/// An input whose script does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input {input}: {reason}")]
pub struct ScriptVerifyError {
    /// Index of the failing input.
    pub input: usize,
    /// Bitcoin Core's verdict.
    pub reason: String,
}

/// Verifies every input of `tx`, whose spent outputs are `spent` in input
/// order, with Bitcoin Core's interpreter and [`VERIFY_ALL`].
pub fn verify_transaction(tx: &Transaction, spent: &[TxOut]) -> Result<(), ScriptVerifyError> {
    if spent.len() != tx.input.len() {
        return Err(ScriptVerifyError {
            input: spent.len().min(tx.input.len()),
            reason: format!(
                "{} spent outputs for {} inputs",
                spent.len(),
                tx.input.len()
            ),
        });
    }
    let bytes = consensus::serialize(tx);
    let utxos: Vec<bitcoinconsensus::Utxo> = spent
        .iter()
        .map(|out| bitcoinconsensus::Utxo {
            script_pubkey: out.script_pubkey.as_bytes().as_ptr(),
            script_pubkey_len: out.script_pubkey.len() as u32,
            value: out.value.to_sat() as i64,
        })
        .collect();
    for (input, out) in spent.iter().enumerate() {
        bitcoinconsensus::verify_with_flags(
            out.script_pubkey.as_bytes(),
            out.value.to_sat(),
            &bytes,
            Some(&utxos),
            input,
            VERIFY_ALL,
        )
        .map_err(|e| ScriptVerifyError {
            input,
            reason: format!("{e:?}"),
        })?;
    }
    Ok(())
}
