//! The simulator's own keys: every output it creates for itself (coinbases,
//! background payments, change) is locked to a key derived from the chain's
//! seed and the output's position, so nothing but the seed needs storing.
//!
//! A key is derived from a [`KeySeed`] (the first outpoint the creating
//! transaction spends, or the coinbase's height: both are known before the
//! transaction is built and unique on one branch) and the output index.

use bitcoin::hashes::{Hash, HashEngine, sha256};
use bitcoin::key::{Keypair, TapTweak};
use bitcoin::secp256k1::{All, Message, Secp256k1, SecretKey};
use bitcoin::sighash::{Prevouts, SighashCache};
use bitcoin::{
    CompressedPublicKey, EcdsaSighashType, OutPoint, ScriptBuf, TapSighashType, Transaction, TxOut,
    Witness, WitnessProgram, WitnessVersion, ecdsa, taproot,
};

use super::SimMode;

/// What a simulator-owned output's key is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KeySeed {
    /// A coinbase at this height.
    Coinbase(u32),
    /// A transaction whose first input spends this outpoint.
    FirstInput(OutPoint),
}

impl KeySeed {
    /// The seed of a transaction's outputs.
    pub(crate) fn of(tx: &Transaction, height: u32) -> KeySeed {
        if tx.is_coinbase() {
            KeySeed::Coinbase(height)
        } else {
            KeySeed::FirstInput(tx.input[0].previous_output)
        }
    }
}

/// The two script types the simulator pays itself with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnKind {
    P2wpkh,
    P2tr,
}

impl OwnKind {
    /// The kind of a simulator-owned script, told apart by its witness
    /// version (v0 keyhash or v1 taproot).
    pub(crate) fn of(script: &ScriptBuf) -> Option<OwnKind> {
        if script.is_p2wpkh() {
            Some(OwnKind::P2wpkh)
        } else if script.is_p2tr() {
            Some(OwnKind::P2tr)
        } else {
            None
        }
    }
}

/// Derives keys and scripts and signs for the simulator.
#[derive(Clone)]
pub(crate) struct Keys {
    seed: u64,
    mode: SimMode,
    secp: Secp256k1<All>,
}

impl Keys {
    pub(crate) fn new(seed: u64, mode: SimMode) -> Keys {
        Keys {
            seed,
            mode,
            secp: Secp256k1::new(),
        }
    }

    fn digest(&self, seed: KeySeed, vout: u32, counter: u32) -> [u8; 32] {
        let mut engine = sha256::Hash::engine();
        engine.input(b"lockstep/sim/key");
        engine.input(&self.seed.to_le_bytes());
        match seed {
            KeySeed::Coinbase(height) => {
                engine.input(&[0]);
                engine.input(&height.to_le_bytes());
            }
            KeySeed::FirstInput(outpoint) => {
                engine.input(&[1]);
                engine.input(outpoint.txid.as_byte_array());
                engine.input(&outpoint.vout.to_le_bytes());
            }
        }
        engine.input(&vout.to_le_bytes());
        engine.input(&counter.to_le_bytes());
        sha256::Hash::from_engine(engine).to_byte_array()
    }

    /// The secret key of output `vout` of a transaction with this seed.
    pub(crate) fn secret_key(&self, seed: KeySeed, vout: u32) -> SecretKey {
        (0u32..)
            .find_map(|counter| SecretKey::from_slice(&self.digest(seed, vout, counter)).ok())
            .expect("a hash is a valid secret key with overwhelming probability")
    }

    /// The script of output `vout` of a transaction with this seed.
    ///
    /// In unsigned mode the script is a witness program made straight from
    /// the hash, with no elliptic-curve work: it looks like a real output to
    /// a filter but nobody holds its key.
    pub(crate) fn script(&self, seed: KeySeed, vout: u32, kind: OwnKind) -> ScriptBuf {
        match self.mode {
            SimMode::Unsigned => {
                let digest = self.digest(seed, vout, 0);
                let program = match kind {
                    OwnKind::P2wpkh => WitnessProgram::new(WitnessVersion::V0, &digest[..20]),
                    OwnKind::P2tr => WitnessProgram::new(WitnessVersion::V1, &digest),
                }
                .expect("20 and 32 bytes are valid v0 and v1 program lengths");
                ScriptBuf::new_witness_program(&program)
            }
            SimMode::Signed => script_for_key(&self.secp, &self.secret_key(seed, vout), kind),
        }
    }

    /// Fills in the witness of every input listed in `own` (input index, key
    /// seed and vout of the coin it spends); `spent` holds every input's
    /// spent output, in input order, as Taproot's sighash commits to all.
    pub(crate) fn sign(
        &self,
        tx: &mut Transaction,
        spent: &[TxOut],
        own: &[(usize, KeySeed, u32)],
    ) -> Result<(), SignError> {
        let witnesses = match self.mode {
            SimMode::Unsigned => own
                .iter()
                .map(|&(input, _, _)| (input, placeholder_witness(&spent[input].script_pubkey)))
                .collect::<Vec<_>>(),
            SimMode::Signed => {
                let mut out = Vec::with_capacity(own.len());
                let mut cache = SighashCache::new(&*tx);
                for &(input, seed, vout) in own {
                    let key = self.secret_key(seed, vout);
                    out.push((
                        input,
                        sign_input(&self.secp, &mut cache, input, spent, &key)?,
                    ));
                }
                out
            }
        };
        for (input, witness) in witnesses {
            tx.input[input].witness = witness;
        }
        Ok(())
    }

    pub(crate) fn secp(&self) -> &Secp256k1<All> {
        &self.secp
    }
}

/// The P2WPKH or key-path-only P2TR script of a key.
pub(crate) fn script_for_key(secp: &Secp256k1<All>, key: &SecretKey, kind: OwnKind) -> ScriptBuf {
    let public = key.public_key(secp);
    match kind {
        OwnKind::P2wpkh => ScriptBuf::new_p2wpkh(&CompressedPublicKey(public).wpubkey_hash()),
        OwnKind::P2tr => ScriptBuf::new_p2tr(secp, public.x_only_public_key().0, None),
    }
}

/// Why the simulator could not sign an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The spent output's script is neither P2WPKH nor P2TR.
    #[error(
        "input {input} spends a script the simulator cannot sign (only P2WPKH and P2TR key path)"
    )]
    UnsupportedScript {
        /// The input.
        input: usize,
    },
    /// The key given does not own the spent output.
    #[error("the key given does not control the output spent by input {input}")]
    WrongKey {
        /// The input.
        input: usize,
    },
    /// The sighash could not be computed (an input index out of range).
    #[error("sighash of input {input}: {reason}")]
    Sighash {
        /// The input.
        input: usize,
        /// rust-bitcoin's reason.
        reason: String,
    },
}

/// Signs input `input` of the transaction behind `cache` with `key`, as a
/// P2WPKH or a P2TR key-path spend according to the spent script.
pub(crate) fn sign_input(
    secp: &Secp256k1<All>,
    cache: &mut SighashCache<&Transaction>,
    input: usize,
    spent: &[TxOut],
    key: &SecretKey,
) -> Result<Witness, SignError> {
    let script = &spent[input].script_pubkey;
    let kind = OwnKind::of(script).ok_or(SignError::UnsupportedScript { input })?;
    if script_for_key(secp, key, kind) != *script {
        return Err(SignError::WrongKey { input });
    }
    let sighash_err = |e: &dyn std::fmt::Display| SignError::Sighash {
        input,
        reason: e.to_string(),
    };
    match kind {
        OwnKind::P2wpkh => {
            let sighash = cache
                .p2wpkh_signature_hash(input, script, spent[input].value, EcdsaSighashType::All)
                .map_err(|e| sighash_err(&e))?;
            let msg = Message::from_digest(sighash.to_byte_array());
            let signature = ecdsa::Signature {
                signature: secp.sign_ecdsa(&msg, key),
                sighash_type: EcdsaSighashType::All,
            };
            Ok(Witness::p2wpkh(&signature, &key.public_key(secp)))
        }
        OwnKind::P2tr => {
            let sighash = cache
                .taproot_key_spend_signature_hash(
                    input,
                    &Prevouts::All(spent),
                    TapSighashType::Default,
                )
                .map_err(|e| sighash_err(&e))?;
            let msg = Message::from_digest(sighash.to_byte_array());
            let tweaked = Keypair::from_secret_key(secp, key).tap_tweak(secp, None);
            let signature = taproot::Signature {
                signature: secp.sign_schnorr_no_aux_rand(&msg, &tweaked.to_keypair()),
                sighash_type: TapSighashType::Default,
            };
            Ok(Witness::p2tr_key_spend(&signature))
        }
    }
}

/// A witness of the right shape and size for the spent script, holding no
/// valid signature: unsigned mode keeps blocks realistic in size and witness
/// structure without paying for signing.
pub(crate) fn placeholder_witness(spent: &ScriptBuf) -> Witness {
    let mut witness = Witness::new();
    if spent.is_p2tr() {
        witness.push([0x5a; 64]);
    } else {
        witness.push([0x5a; 72]);
        let mut public = [0x5a; 33];
        public[0] = 0x02;
        witness.push(public);
    }
    witness
}
