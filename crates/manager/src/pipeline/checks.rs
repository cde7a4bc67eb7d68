//! Fetching one block and checking it as the source committed to it: its
//! hash, its merkle root (refusing a mutated tree, with
//! `lockstep_chain::block_checks`), and its amounts.

use std::sync::Arc;
use std::time::Instant;

use bitcoin::{Block, BlockHash};
use lockstep_chain::ChainSource;

use lockstep_chain::block_checks::check_merkle_root;

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
    use bitcoin::{Amount, ScriptBuf, TxOut};

    use super::*;

    #[test]
    fn amounts_above_the_money_supply_are_refused() {
        let block = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest);
        assert_eq!(check_amounts(&block), Ok(()));
        let paying = |values: &[u64]| {
            let mut block = block.clone();
            block.txdata[0].output = values
                .iter()
                .map(|&sat| TxOut {
                    value: Amount::from_sat(sat),
                    script_pubkey: ScriptBuf::new(),
                })
                .collect();
            check_amounts(&block)
        };
        assert_eq!(paying(&[MAX_MONEY]), Ok(()));
        assert!(paying(&[MAX_MONEY + 1]).is_err());
        // Each output within the supply, their sum beyond it.
        assert_eq!(paying(&[MAX_MONEY / 2, MAX_MONEY / 2]), Ok(()));
        assert!(paying(&[MAX_MONEY / 2 + 1, MAX_MONEY / 2]).is_err());
    }
}
