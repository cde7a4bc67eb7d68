//! The block checks of `lockstep_chain::block_checks` on the simulated
//! chain's blocks: real witness spends and coinbase commitments, which only
//! a signed chain has (so the test lives beside the simulator).

use bitcoin::{ScriptBuf, Witness};
use lockstep_chain::block_checks::{check_merkle_root, check_witness_commitment};
use lockstep_sim::{SimChain, SimParams};

/// On the simulated chain's blocks (witness spends, a commitment in
/// each coinbase) the check agrees with rust-bitcoin's, and refuses a
/// changed witness, a changed commitment and a changed reserved value
/// (blocks without witness data: the unit tests of `block_checks`).
#[test]
fn witness_commitment_check_agrees_with_rust_bitcoin_and_refuses_any_change() {
    let chain = SimChain::generate(SimParams::signed(7), 112).unwrap();
    let mut with_witnesses = 0;
    for height in 1..=chain.height() {
        let block = (*chain.block_at(height).unwrap()).clone();
        assert_eq!(
            check_witness_commitment(&block),
            block.check_witness_commitment(),
            "height {height}"
        );
        assert!(check_witness_commitment(&block), "height {height}");
        let Some((t, i)) = block.txdata.iter().enumerate().skip(1).find_map(|(t, tx)| {
            let i = tx
                .input
                .iter()
                .position(|input| !input.witness.is_empty())?;
            Some((t, i))
        }) else {
            continue;
        };
        with_witnesses += 1;
        let mut rewitnessed = block.clone();
        rewitnessed.txdata[t].input[i].witness = Witness::from_slice(&[vec![9u8; 71]]);
        assert!(!rewitnessed.check_witness_commitment());
        assert!(!check_witness_commitment(&rewitnessed));
        // The txids did not change: the merkle root still matches.
        assert_eq!(check_merkle_root(&rewitnessed), Ok(()));
        let mut recommitted = block.clone();
        let out = recommitted.txdata[0]
            .output
            .iter_mut()
            .rev()
            .find(|o| o.script_pubkey.as_bytes().starts_with(&[0x6a, 0x24, 0xaa]))
            .expect("a commitment");
        let mut bytes = out.script_pubkey.to_bytes();
        bytes[20] ^= 1;
        out.script_pubkey = ScriptBuf::from_bytes(bytes);
        assert!(!check_witness_commitment(&recommitted));
        let mut reserved = block.clone();
        reserved.txdata[0].input[0].witness = Witness::from_slice(&[vec![1u8; 32]]);
        assert!(!check_witness_commitment(&reserved));
    }
    assert!(with_witnesses > 0, "no block with witness spends to check");
}
