//! Replacement by fee in SimChain's mempool: Bitcoin Core's full-RBF rules,
//! and the simulator's bookkeeping staying consistent after an eviction.

use bitcoin::absolute::LockTime;
use bitcoin::sighash::SighashCache;
use bitcoin::transaction::Version;
use bitcoin::{Sequence, Transaction, TxIn, Txid, Witness};

use std::collections::HashSet;

use super::*;
use lockstep_chain::{FeeRule, MAX_REPLACEMENTS};

/// The output at `outpoint`: confirmed, or created by a mempool
/// transaction (spent in the mempool or not).
fn output(chain: &SimChain, outpoint: OutPoint) -> TxOut {
    let state = chain.read();
    state
        .utxos
        .get(&outpoint)
        .map(|u| u.txout.clone())
        .or_else(|| {
            state
                .mempool
                .txs
                .iter()
                .find(|tx| tx.compute_txid() == outpoint.txid)
                .map(|tx| tx.output[outpoint.vout as usize].clone())
        })
        .unwrap_or_else(|| panic!("{outpoint} is unknown"))
}

/// The key of a confirmed output the simulator owns.
fn sim_key(chain: &SimChain, outpoint: OutPoint) -> SecretKey {
    let state = chain.read();
    let (seed, vout) = state.utxos[&outpoint].key.expect("the simulator's coin");
    state.keys.secret_key(seed, vout)
}

/// A transaction spending `coins` (with their keys; `None` on an unsigned
/// chain) to `outputs`, signed but not submitted.
fn build(
    chain: &SimChain,
    coins: &[(OutPoint, Option<SecretKey>)],
    outputs: Vec<TxOut>,
) -> Transaction {
    let spent: Vec<TxOut> = coins.iter().map(|(o, _)| output(chain, *o)).collect();
    let mut tx = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: coins
            .iter()
            .map(|(outpoint, _)| TxIn {
                previous_output: *outpoint,
                script_sig: ScriptBuf::new(),
                // No BIP125 signal: full RBF does not ask for one.
                sequence: Sequence::MAX,
                witness: Witness::new(),
            })
            .collect(),
        output: outputs,
    };
    let state = chain.read();
    let witnesses: Vec<Witness> = coins
        .iter()
        .enumerate()
        .map(|(i, (_, key))| match key {
            Some(key) => {
                let mut cache = SighashCache::new(&tx);
                keys::sign_input(state.keys.secp(), &mut cache, i, &spent, key).unwrap()
            }
            None => keys::placeholder_witness(&spent[i].script_pubkey),
        })
        .collect();
    for (input, witness) in tx.input.iter_mut().zip(witnesses) {
        input.witness = witness;
    }
    tx
}

fn pay_to(script: &ScriptBuf, sats: u64) -> TxOut {
    TxOut {
        value: Amount::from_sat(sats),
        script_pubkey: script.clone(),
    }
}

fn vsize(tx: &Transaction) -> u64 {
    tx.vsize() as u64
}

/// Submits `tx`, which must be rejected leaving the mempool and the pool
/// as they were; returns the reason.
fn rejected(chain: &SimChain, tx: Transaction) -> RejectReason {
    let before = chain.mempool();
    let pool_before: Vec<OutPoint> = chain.read().pool.iter().map(|c| c.outpoint).collect();
    let reason = chain.submit(tx).unwrap_err();
    assert_eq!(chain.mempool(), before, "{reason}");
    let pool_after: Vec<OutPoint> = chain.read().pool.iter().map(|c| c.outpoint).collect();
    assert_eq!(pool_after, pool_before, "{reason}");
    reason
}

/// Every block from genesis passes the independent checker.
fn all_blocks_valid(chain: &SimChain) {
    let mut checker = Checker::new();
    for h in 1..=chain.height() {
        checker
            .connect(&chain.block_at(h).unwrap())
            .unwrap_or_else(|e| panic!("block {h} invalid: {e:?}"));
    }
}

/// Whether any block of the chain holds `txid`.
fn mined(chain: &SimChain, txid: Txid) -> bool {
    (1..=chain.height()).any(|h| {
        chain
            .block_at(h)
            .unwrap()
            .txdata
            .iter()
            .any(|tx| tx.compute_txid() == txid)
    })
}

#[test]
fn a_replacement_evicts_the_original_and_its_descendant_and_is_mined_instead() {
    let chain = SimChain::generate(SimParams::signed(31).with_load(0..=0, 1..=1), 101).unwrap();
    let (s1, s3, s4, s5) = (p2tr(&key(1)), p2tr(&key(3)), p2tr(&key(4)), p2tr(&key(5)));
    let coin = chain.pay(s1.clone(), Amount::from_sat(100_000)).unwrap();
    chain.mine(1).unwrap();

    let original = build(&chain, &[(coin, Some(key(1)))], vec![pay_to(&s3, 99_000)]);
    let original = chain.submit(original).unwrap();
    let child = build(
        &chain,
        &[(OutPoint::new(original, 0), Some(key(3)))],
        vec![pay_to(&s4, 98_000)],
    );
    let child = chain.submit(child).unwrap();
    // 4,000 sats against the 2,000 of the two it evicts, plus relay.
    let replacement = build(&chain, &[(coin, Some(key(1)))], vec![pay_to(&s5, 96_000)]);
    let accepted = chain.submit_replacing(replacement.clone()).unwrap();
    assert_eq!(accepted.replaced, vec![original, child]);
    let replacement = accepted.txid;

    assert_eq!(
        chain
            .mempool()
            .iter()
            .map(Transaction::compute_txid)
            .collect::<Vec<_>>(),
        vec![replacement]
    );
    assert_eq!(chain.unspent(&coin), None);
    assert_eq!(chain.unspent(&OutPoint::new(original, 0)), None);
    assert_eq!(chain.unspent(&OutPoint::new(child, 0)), None);
    let paid = OutPoint::new(replacement, 0);
    assert_eq!(chain.unspent(&paid), Some(pay_to(&s5, 96_000)));

    chain.mine(1).unwrap();
    assert!(mined(&chain, replacement));
    assert!(!mined(&chain, original));
    assert!(!mined(&chain, child));
    let truth = chain.truth([&s1, &s3, &s4, &s5]);
    assert_eq!(
        truth.unspent.iter().map(|c| c.outpoint).collect::<Vec<_>>(),
        vec![paid]
    );
    assert_eq!(truth.unspent[0].height, chain.height());
    assert_eq!(Some(truth.unspent[0].txout.clone()), chain.unspent(&paid));
    assert_eq!(truth.spent.len(), 1);
    assert_eq!(truth.spent[0].spent_by, replacement);
    assert!(!truth.per_script.contains_key(&s3));
    assert!(!truth.per_script.contains_key(&s4));
    assert!(
        truth
            .history
            .iter()
            .all(|t| t.txid != original && t.txid != child)
    );
    assert!(chain.mempool().is_empty());
    all_blocks_valid(&chain);
}

#[test]
fn replacements_that_break_a_rule_are_rejected_and_change_nothing() {
    let chain = SimChain::generate(SimParams::signed(32).with_load(0..=0, 1..=1), 101).unwrap();
    let (s1, s3, s4, s5) = (p2tr(&key(1)), p2tr(&key(3)), p2tr(&key(4)), p2tr(&key(5)));
    let coins: Vec<OutPoint> = (0..5)
        .map(|_| chain.pay(s1.clone(), Amount::from_sat(100_000)).unwrap())
        .collect();
    chain.mine(1).unwrap();
    let k1 = Some(key(1));

    // An original paying 1,000 and its child paying 2,000.
    let o1 = chain
        .submit(build(&chain, &[(coins[0], k1)], vec![pay_to(&s3, 99_000)]))
        .unwrap();
    let d1 = chain
        .submit(build(
            &chain,
            &[(OutPoint::new(o1, 0), Some(key(3)))],
            vec![pay_to(&s4, 97_000)],
        ))
        .unwrap();

    // Rule 3: 1,500 beats the original (same size, so a higher rate too)
    // but not the original and its child.
    let beats_one = build(&chain, &[(coins[0], k1)], vec![pay_to(&s5, 98_500)]);
    assert_eq!(
        rejected(&chain, beats_one),
        RejectReason::InsufficientFee {
            rule: FeeRule::AbsoluteFee {
                fee: Amount::from_sat(1_500),
                replaced_fees: Amount::from_sat(3_000),
                replaced: 2,
            }
        }
    );

    // Rule 3 with no descendant: a smaller transaction paying a higher rate
    // but less than the original's 2,000.
    let o2_tx = build(
        &chain,
        &[(coins[1], k1)],
        vec![pay_to(&s3, 50_000), pay_to(&s3, 48_000)],
    );
    let o2_vsize = vsize(&o2_tx);
    let o2 = chain.submit(o2_tx).unwrap();
    let smaller = build(&chain, &[(coins[1], k1)], vec![pay_to(&s5, 98_200)]);
    assert!(1_800 * o2_vsize > 2_000 * vsize(&smaller), "a higher rate");
    assert_eq!(
        rejected(&chain, smaller),
        RejectReason::InsufficientFee {
            rule: FeeRule::AbsoluteFee {
                fee: Amount::from_sat(1_800),
                replaced_fees: Amount::from_sat(2_000),
                replaced: 1,
            }
        }
    );

    // Rule 4: one sat short of 1 sat/vB over what it replaces.
    let size = vsize(&build(&chain, &[(coins[0], k1)], vec![pay_to(&s5, 1)]));
    let short = build(
        &chain,
        &[(coins[0], k1)],
        vec![pay_to(&s5, 100_000 - 3_000 - size + 1)],
    );
    assert_eq!(vsize(&short), size);
    assert_eq!(
        rejected(&chain, short),
        RejectReason::InsufficientFee {
            rule: FeeRule::RelayFee {
                additional: Amount::from_sat(size - 1),
                required: Amount::from_sat(size),
            }
        }
    );

    // Rule 6: twice the original's fee, but spread over so many outputs
    // that the rate is lower.
    let o3_tx = build(&chain, &[(coins[2], k1)], vec![pay_to(&s3, 90_000)]);
    let (o3_vsize, o3) = (vsize(&o3_tx), o3_tx.compute_txid());
    chain.submit(o3_tx).unwrap();
    let wide = build(&chain, &[(coins[2], k1)], vec![pay_to(&s5, 8_000); 10]);
    let wide_vsize = vsize(&wide);
    assert!(20_000 * o3_vsize < 10_000 * wide_vsize, "a lower rate");
    assert_eq!(
        rejected(&chain, wide),
        RejectReason::InsufficientFee {
            rule: FeeRule::FeeRate {
                fee: Amount::from_sat(20_000),
                vsize: wide_vsize,
                conflict: o3,
                conflict_fee: Amount::from_sat(10_000),
                conflict_vsize: o3_vsize,
            }
        }
    );
    // An equal rate is not higher either.
    let same = build(&chain, &[(coins[2], k1)], vec![pay_to(&s5, 90_000)]);
    assert_eq!(vsize(&same), o3_vsize);
    assert!(matches!(
        rejected(&chain, same),
        RejectReason::InsufficientFee {
            rule: FeeRule::FeeRate { conflict, .. }
        } if conflict == o3
    ));
    // The same fee in one output is a higher rate: the rule, not the
    // amount, refused it.
    let narrow = build(&chain, &[(coins[2], k1)], vec![pay_to(&s5, 80_000)]);
    assert_eq!(chain.submit_replacing(narrow).unwrap().replaced, vec![o3]);

    // Spending an output of a transaction it would evict: the child's
    // output (with the original's input), or the original's own output.
    let d1_out = OutPoint::new(d1, 0);
    let own_child = build(
        &chain,
        &[(coins[0], k1), (d1_out, Some(key(4)))],
        vec![pay_to(&s5, 100_000)],
    );
    assert_eq!(
        rejected(&chain, own_child),
        RejectReason::SpendsConflictingTx { outpoint: d1_out }
    );
    let o2_out = OutPoint::new(o2, 1);
    let own_parent = build(
        &chain,
        &[(coins[1], k1), (o2_out, Some(key(3)))],
        vec![pay_to(&s5, 100_000)],
    );
    assert_eq!(
        rejected(&chain, own_parent),
        RejectReason::SpendsConflictingTx { outpoint: o2_out }
    );

    // Rule 5: a fan of the original and 100 children is 101 evictions; with
    // 99 children it is 100, which is allowed.
    let fan = |coin: OutPoint, children: u32| -> Vec<Txid> {
        let parent = chain
            .submit(build(&chain, &[(coin, k1)], vec![pay_to(&s3, 900); 100]))
            .unwrap();
        let mut txids = vec![parent];
        for vout in 0..children {
            let spend = build(
                &chain,
                &[(OutPoint::new(parent, vout), Some(key(3)))],
                vec![pay_to(&s4, 800)],
            );
            txids.push(chain.submit(spend).unwrap());
        }
        txids
    };
    let big = fan(coins[3], 100);
    let too_many = build(&chain, &[(coins[3], k1)], vec![pay_to(&s5, 60_000)]);
    assert_eq!(
        rejected(&chain, too_many),
        RejectReason::TooManyReplacements {
            count: 101,
            max: MAX_REPLACEMENTS,
        }
    );
    let small = fan(coins[4], 99);
    let enough = build(&chain, &[(coins[4], k1)], vec![pay_to(&s5, 60_000)]);
    assert_eq!(chain.submit_replacing(enough).unwrap().replaced, small);

    // Rule 4 exactly met: the replacement of the original and its child
    // goes in.
    let exact = build(
        &chain,
        &[(coins[0], k1)],
        vec![pay_to(&s5, 100_000 - 3_000 - size)],
    );
    let accepted = chain.submit_replacing(exact).unwrap();
    assert_eq!(accepted.replaced, vec![o1, d1]);

    // What was refused stays out of the chain, what replaced it is mined,
    // and the blocks are valid.
    chain.mine(1).unwrap();
    for txid in [o1, d1, o3] {
        assert!(!mined(&chain, txid));
    }
    for txid in small {
        assert!(!mined(&chain, txid));
    }
    assert!(mined(&chain, accepted.txid));
    assert!(big.iter().all(|t| mined(&chain, *t)));
    assert!(mined(&chain, o2));
    all_blocks_valid(&chain);
}

/// A signed chain with load where a wallet's transaction replaced a
/// simulator payment of several inputs (and the wallet's spend of it) by
/// spending only its first input. Returns the chain, the payment, its
/// inputs and the wallet's spend.
fn replaced_simulator_payment() -> (SimChain, Txid, Vec<OutPoint>, Txid) {
    let chain = SimChain::generate(SimParams::signed(33), 104).unwrap();
    // More than any one coin holds, so it takes several.
    let paid = chain.pay(p2tr(&key(1)), Amount::from_int_btc(60)).unwrap();
    let payment = chain
        .mempool()
        .into_iter()
        .find(|tx| tx.compute_txid() == paid.txid)
        .unwrap();
    let inputs: Vec<OutPoint> = payment.input.iter().map(|i| i.previous_output).collect();
    assert!(inputs.len() >= 2, "{} inputs", inputs.len());
    let child = chain.spend_to(paid, p2tr(&key(3)), Some(&key(1))).unwrap();

    let first = inputs[0];
    let value = output(&chain, first).value.to_sat();
    let replacement = build(
        &chain,
        &[(first, Some(sim_key(&chain, first)))],
        vec![pay_to(&p2tr(&key(5)), value - 50_000)],
    );
    let accepted = chain.submit_replacing(replacement).unwrap();
    assert_eq!(accepted.replaced, vec![paid.txid, child]);
    (chain, paid.txid, inputs, accepted.txid)
}

#[test]
fn background_load_after_a_replacement_never_builds_on_evicted_outputs() {
    let (chain, payment, inputs, replacement) = replaced_simulator_payment();
    {
        let state = chain.read();
        let pool: HashSet<OutPoint> = state.pool.iter().map(|c| c.outpoint).collect();
        // The payment's change is gone with it; the inputs the replacement
        // left alone are the simulator's to spend again.
        assert!(!pool.contains(&OutPoint::new(payment, 1)));
        assert!(!pool.contains(&inputs[0]));
        for input in &inputs[1..] {
            assert!(pool.contains(input), "{input} not back in the pool");
            assert!(!state.mempool.spent.contains_key(input));
        }
        assert!(
            (0..2).all(|vout| !state.foreign.contains(&OutPoint::new(payment, vout))),
            "the evicted payment's outputs are forgotten"
        );
    }
    chain.mine(4).unwrap();
    all_blocks_valid(&chain);
    assert!(mined(&chain, replacement));
    assert!(!mined(&chain, payment));
    let state = chain.read();
    // The freed coins are either still the simulator's to spend or spent
    // on the chain by background load; never lost.
    for input in &inputs[1..] {
        let in_pool = state.pool.iter().any(|c| c.outpoint == *input);
        assert!(in_pool || !state.utxos.contains_key(input), "{input} lost");
    }
}

#[test]
fn a_chain_that_saw_replacements_saves_and_loads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.sim");
    let (chain, _, _, _) = replaced_simulator_payment();
    chain.save(&path).unwrap();
    let loaded = SimChain::load(&path).unwrap();
    assert_eq!(loaded.mempool(), chain.mempool());
    let order =
        |c: &SimChain| -> Vec<OutPoint> { c.read().pool.iter().map(|c| c.outpoint).collect() };
    assert_eq!(order(&loaded), order(&chain));
    assert_eq!(loaded.read().foreign, chain.read().foreign);
    chain.mine(3).unwrap();
    loaded.mine(3).unwrap();
    assert_eq!(loaded.tip(), chain.tip());
    for h in 0..=chain.height() {
        assert_eq!(loaded.block_at(h), chain.block_at(h));
    }
    all_blocks_valid(&loaded);
}

#[test]
fn evicting_a_child_frees_its_mempool_parents_output_for_the_pool() {
    // Unsigned, so the test can spend the simulator's coins without keys.
    let chain = SimChain::generate(SimParams::unsigned(34), 102).unwrap();
    let paid = chain.pay(p2tr(&key(1)), Amount::from_sat(100_000)).unwrap();
    let change = OutPoint::new(paid.txid, 1);
    let other = chain.pay(p2tr(&key(2)), Amount::from_sat(100_000)).unwrap();
    let in_pool = |c: &SimChain, o: OutPoint| c.read().pool.iter().any(|coin| coin.outpoint == o);
    assert!(in_pool(&chain, change));
    let change_out = output(&chain, change);

    // A child of the payment spends its change and another coin; a
    // replacement spends only the other coin.
    let s5 = p2tr(&key(5));
    let total = change_out.value.to_sat() + 100_000;
    let child = build(
        &chain,
        &[(change, None), (other, None)],
        vec![pay_to(&s5, total - 1_000)],
    );
    let child = chain.submit(child).unwrap();
    assert!(!in_pool(&chain, change));
    assert_eq!(chain.unspent(&change), None);
    let replacement = build(&chain, &[(other, None)], vec![pay_to(&s5, 90_000)]);
    let accepted = chain.submit_replacing(replacement).unwrap();
    assert_eq!(accepted.replaced, vec![child]);

    // The change is an unspent mempool output of the simulator again.
    assert!(in_pool(&chain, change));
    assert_eq!(chain.unspent(&change), Some(change_out));
    // Mining (which builds on the pool, and fails on a missing input)
    // goes on.
    chain.mine(3).unwrap();
    assert!(mined(&chain, accepted.txid));
    assert!(!mined(&chain, child));
}
