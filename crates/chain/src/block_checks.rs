//! Checking a block against what its header commits to, fast enough to
//! run on every block fetched: its transactions against the merkle root
//! (refusing a mutated tree) and its witnesses against the coinbase's
//! witness commitment (BIP141).
//!
//! rust-bitcoin's `Block::check_merkle_root` and
//! `Block::check_witness_commitment` feed the SHA-256 engine field by
//! field; these serialise each transaction into one reused buffer and
//! hash it in one call. A profile of a sync over HTTP put rust-bitcoin's
//! two at a tenth of the CPU; both `BitcoindSource` (before it answers) and
//! the manager (for any source) use these.

use bitcoin::consensus::Encodable as _;
use bitcoin::hashes::{Hash as _, sha256d};
use bitcoin::{Block, BlockHash};

use crate::source::{Missing, SourceError, invalid};

/// Checks that `block`'s transactions hash to its header's merkle root, and
/// that no two sibling nodes of the tree are equal: a block whose last
/// transactions are repeated has the same root as the real one (CVE-2012-
/// 2459), so a source could pass off such a copy; Core refuses it as
/// mutated, and so does this (`Block::check_merkle_root` does not).
///
/// Each transaction is serialised without its witness into one reused
/// buffer and hashed in one call: `Block::check_merkle_root` feeds the
/// SHA-256 engine field by field, and with the copies that makes it was a
/// tenth of a 100-wallet sync.
pub fn check_merkle_root(block: &Block) -> Result<(), &'static str> {
    use bitcoin::consensus::Encodable as _;
    use bitcoin::hashes::sha256d;

    const MISMATCH: &str = "its transactions do not match its header's merkle root";
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut level = Vec::with_capacity(block.txdata.len() + 1);
    for tx in &block.txdata {
        buf.clear();
        // The txid's serialisation: no marker, flag or witness (`TxIn`
        // encodes none of them). Writing to a Vec cannot fail; were it to,
        // the block is refused.
        let encoded = tx.version.consensus_encode(&mut buf).is_ok()
            && tx.input.consensus_encode(&mut buf).is_ok()
            && tx.output.consensus_encode(&mut buf).is_ok()
            && tx.lock_time.consensus_encode(&mut buf).is_ok();
        if !encoded {
            return Err(MISMATCH);
        }
        level.push(sha256d::Hash::hash(&buf).to_byte_array());
    }
    if level.is_empty() {
        return Err("it has no transactions");
    }
    let (root, mutated) = merkle_root(level);
    if root != block.header.merkle_root.to_byte_array() {
        return Err(MISMATCH);
    }
    if mutated {
        return Err("it repeats transactions: its merkle tree is mutated (CVE-2012-2459)");
    }
    Ok(())
}

/// Whether `block`'s witnesses match its coinbase's witness commitment
/// (BIP141), as rust-bitcoin's `Block::check_witness_commitment` decides
/// it: a block without witness data needs no commitment; otherwise the
/// coinbase's last output starting with the commitment's magic must hold
/// the double SHA-256 of the wtxid merkle root (the coinbase's wtxid taken
/// as zero) and the coinbase's single 32-byte witness item.
pub fn check_witness_commitment(block: &Block) -> bool {
    const MAGIC: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    if block
        .txdata
        .iter()
        .all(|tx| tx.input.iter().all(|input| input.witness.is_empty()))
    {
        return true;
    }
    let Some(coinbase) = block.txdata.first() else {
        return false;
    };
    if !coinbase.is_coinbase() {
        return false;
    }
    let Some(commitment) = coinbase.output.iter().rev().find_map(|out| {
        let script = out.script_pubkey.as_bytes();
        (script.len() >= 38 && script[..6] == MAGIC).then(|| &script[6..38])
    }) else {
        return false;
    };
    let reserved = match coinbase.input[0].witness.iter().collect::<Vec<_>>()[..] {
        [item] if item.len() == 32 => item,
        _ => return false,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut level = Vec::with_capacity(block.txdata.len() + 1);
    level.push([0u8; 32]);
    for tx in &block.txdata[1..] {
        buf.clear();
        // With its witness (the wtxid's serialisation). Writing to a Vec
        // cannot fail; were it to, the block is refused.
        if tx.consensus_encode(&mut buf).is_err() {
            return false;
        }
        level.push(sha256d::Hash::hash(&buf).to_byte_array());
    }
    let (root, _) = merkle_root(level);
    let mut preimage = [0u8; 64];
    preimage[..32].copy_from_slice(&root);
    preimage[32..].copy_from_slice(reserved);
    sha256d::Hash::hash(&preimage).to_byte_array()[..] == *commitment
}

/// The merkle root of `level` (not empty), and whether any two siblings
/// were equal on the way up (a mutated tree, CVE-2012-2459).
fn merkle_root(mut level: Vec<[u8; 32]>) -> ([u8; 32], bool) {
    let mut mutated = false;
    let mut pair = [0u8; 64];
    while level.len() > 1 {
        mutated |= level.chunks_exact(2).any(|p| p[0] == p[1]);
        if level.len() % 2 == 1 {
            level.push(level[level.len() - 1]);
        }
        for i in 0..level.len() / 2 {
            pair[..32].copy_from_slice(&level[2 * i]);
            pair[32..].copy_from_slice(&level[2 * i + 1]);
            level[i] = sha256d::Hash::hash(&pair).to_byte_array();
        }
        level.truncate(level.len() / 2);
    }
    (level[0], mutated)
}

/// A block's header and transactions checked against the hash asked for:
/// the header hashes to it and the transactions to its Merkle root (and,
/// with witnesses, to the coinbase's witness commitment).
pub fn check_block(block: &Block, hash: BlockHash) -> Result<(), SourceError> {
    let what = Missing::Block(hash);
    if block.block_hash() != hash {
        return Err(invalid(what, "the block has another hash"));
    }
    if let Err(reason) = check_merkle_root(block) {
        return Err(invalid(what, reason));
    }
    if !check_witness_commitment(block) {
        return Err(invalid(what, "the witnesses do not match the commitment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash as _;
    use bitcoin::{Amount, OutPoint, ScriptBuf, Transaction, TxIn, TxMerkleNode, TxOut, Witness};

    use super::*;

    fn block_of(txdata: Vec<Transaction>) -> Block {
        let mut block = Block {
            header: bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest).header,
            txdata,
        };
        block.header.merkle_root = block
            .compute_merkle_root()
            .unwrap_or(TxMerkleNode::all_zeros());
        block
    }

    fn tx(n: u8, witness: bool) -> Transaction {
        Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::from_consensus(u32::from(n)),
            input: vec![TxIn {
                previous_output: OutPoint::new(bitcoin::Txid::from_byte_array([n; 32]), 1),
                witness: if witness {
                    Witness::from_slice(&[vec![n; 72], vec![2; 33]])
                } else {
                    Witness::new()
                },
                ..Default::default()
            }],
            output: vec![TxOut {
                value: Amount::from_sat(1_000 + u64::from(n)),
                script_pubkey: ScriptBuf::from_bytes(vec![0x00, 0x14, n, 1, 2, 3]),
            }],
        }
    }

    #[test]
    fn merkle_check_agrees_with_rust_bitcoin_and_refuses_any_change() {
        let merkle_root_matches = |block: &Block| check_merkle_root(block).is_ok();
        // Witness transactions (whose txid leaves the witness out), legacy
        // ones, one alone, and an odd count (the last is paired with itself).
        for txdata in [
            vec![tx(1, true)],
            vec![tx(1, false), tx(2, true), tx(3, true)],
            (0..8).map(|n| tx(n, n % 2 == 0)).collect(),
        ] {
            let block = block_of(txdata);
            assert!(block.check_merkle_root());
            assert!(merkle_root_matches(&block));
            // A changed witness keeps the txid, so the root still matches.
            let mut rewitnessed = block.clone();
            rewitnessed.txdata[0].input[0].witness = Witness::from_slice(&[vec![9u8; 10]]);
            assert!(merkle_root_matches(&rewitnessed));
            // Any change to what the txid covers is refused.
            let mut paid_elsewhere = block.clone();
            paid_elsewhere.txdata[0].output[0].value = Amount::from_sat(1);
            assert!(!merkle_root_matches(&paid_elsewhere));
            let mut dropped = block.clone();
            dropped.txdata.pop();
            assert!(!merkle_root_matches(&dropped));
            let mut wrong_header = block.clone();
            wrong_header.header.merkle_root = TxMerkleNode::all_zeros();
            assert!(!merkle_root_matches(&wrong_header));
        }
        assert!(
            !merkle_root_matches(&block_of(Vec::new())),
            "no transactions"
        );
    }

    /// A block without witness data passes without a commitment; one with
    /// a witness and no commitment is refused.
    #[test]
    fn only_a_block_with_witness_data_needs_a_commitment() {
        let legacy = block_of(vec![tx(1, false), tx(2, false)]);
        assert!(check_witness_commitment(&legacy));
        let uncommitted = block_of(vec![tx(1, false), tx(2, true)]);
        assert!(!check_witness_commitment(&uncommitted));
    }

    /// A block whose last transactions are repeated keeps its merkle root
    /// (rust-bitcoin's check passes it); the check refuses it as mutated.
    #[test]
    fn a_block_repeating_its_last_transactions_is_refused() {
        for (count, repeat) in [(3, 1), (5, 1), (6, 2), (2, 0)] {
            let txdata: Vec<_> = (0..count).map(|n| tx(n, n % 2 == 1)).collect();
            let block = block_of(txdata);
            assert_eq!(check_merkle_root(&block), Ok(()), "{count} transactions");
            let mut mutated = block.clone();
            let tail = block.txdata[block.txdata.len() - repeat.max(1)..].to_vec();
            if repeat == 0 {
                // Two equal transactions side by side at the bottom.
                mutated.txdata[1] = mutated.txdata[0].clone();
                mutated.header.merkle_root = mutated
                    .compute_merkle_root()
                    .unwrap_or(TxMerkleNode::all_zeros());
            } else {
                mutated.txdata.extend(tail);
                assert!(mutated.check_merkle_root(), "same root, {count}+{repeat}");
            }
            let err = check_merkle_root(&mutated).unwrap_err();
            assert!(err.contains("mutated"), "{count}+{repeat}: {err}");
        }
    }
}
