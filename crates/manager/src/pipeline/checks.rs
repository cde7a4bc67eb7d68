//! Fetching one block and checking it as the source committed to it: its
//! hash, its merkle root (refusing a mutated tree), and its amounts. Pure
//! functions over a block, with their tests, apart from the fetching
//! machinery around them.

use std::sync::Arc;
use std::time::Instant;

use bitcoin::hashes::Hash as _;
use bitcoin::{Block, BlockHash};
use lockstep_chain::ChainSource;

use super::{BlockTiming, Flow, Policy, on_cpu_pool, task_failed, timed};
use crate::ManagerError;

/// Fetches and checks one block, as the source committed to it.
pub(crate) async fn fetch_block(
    source: &Arc<dyn ChainSource>,
    height: u32,
    hash: BlockHash,
    policy: &Policy,
) -> Result<(Arc<Block>, BlockTiming), Flow> {
    let start = Instant::now();
    let block = timed(policy, || source.block(hash)).await?;
    let fetched = Instant::now();
    if block.block_hash() != hash {
        return Err(Flow::Fail(ManagerError::BadBlock {
            height,
            hash,
            reason: "its header does not hash to the block asked for",
        }));
    }
    // Hashing every transaction is CPU over the whole block: on rayon's
    // pool, timed inside (the cost model wants CPU, not the wait).
    let checked = Arc::clone(&block);
    let (verdict, check_nanos) = on_cpu_pool(move || {
        let start = Instant::now();
        let verdict = check_merkle_root(&checked).and_then(|()| check_amounts(&checked));
        (verdict, start.elapsed().as_nanos() as u64)
    })
    .await
    .map_err(|e| task_failed("block check", &e))?;
    if let Err(reason) = verdict {
        return Err(Flow::Fail(ManagerError::BadBlock {
            height,
            hash,
            reason,
        }));
    }
    let timing = BlockTiming {
        fetch_nanos: (fetched - start).as_nanos() as u64,
        check_nanos,
        bytes: block.total_size() as u64,
    };
    Ok((block, timing))
}

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
pub(crate) fn check_merkle_root(block: &Block) -> Result<(), &'static str> {
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
    if level[0] != block.header.merkle_root.to_byte_array() {
        return Err(MISMATCH);
    }
    if mutated {
        return Err("it repeats transactions: its merkle tree is mutated (CVE-2012-2459)");
    }
    Ok(())
}

/// The money supply in satoshis (Core's `MAX_MONEY`).
const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// Checks every amount a block holds as Core's `CheckTransaction` does:
/// each output at most 21 million BTC, and so is each transaction's sum
/// of outputs. A source controls these numbers; above the supply they are
/// a lie (and would overflow sums or be clamped on their way into the
/// database), so the block is refused.
pub(crate) fn check_amounts(block: &Block) -> Result<(), &'static str> {
    for tx in &block.txdata {
        let mut sum: u64 = 0;
        for out in &tx.output {
            let value = out.value.to_sat();
            if value > MAX_MONEY {
                return Err("an output pays more than the 21 million BTC supply");
            }
            sum = sum
                .checked_add(value)
                .filter(|sum| *sum <= MAX_MONEY)
                .ok_or("a transaction's outputs add up to more than the 21 million BTC supply")?;
        }
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
