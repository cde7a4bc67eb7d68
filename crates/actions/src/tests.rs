//! Unit tests: a spend's checkpoint round-trips and a corrupt one is an
//! error.

use bitcoin::{Amount, ScriptBuf, TxOut};
use lockstep_store::WalletId;

use crate::action::{decode, encode};
use crate::{FeeBump, Spend, SpendState};

fn payee() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::all_zeros(),
    ))
}

#[test]
fn a_spend_round_trips_through_its_checkpoint_and_garbage_does_not_decode() {
    let spend = Spend::send(
        "invoice-1",
        WalletId::from_i64(7),
        vec![TxOut {
            value: Amount::from_sat(12_345),
            script_pubkey: payee(),
        }],
        2.5,
        3,
    )
    .with_fee_bump(FeeBump {
        after_blocks: 6,
        max_bumps: 2,
        factor: 1.5,
    });
    let bytes = encode(&spend);
    let back: Spend = decode(&bytes).unwrap();
    assert_eq!(back, spend);
    assert_eq!(back.state, SpendState::Start);

    let mut corrupt = bytes.clone();
    corrupt.truncate(bytes.len() / 2);
    let error = decode::<Spend>(&corrupt).unwrap_err();
    assert!(error.contains("does not decode"), "{error}");
    assert!(decode::<Spend>(b"{\"id\":1}").is_err());
}
