//! SimChain's tests. Validity is judged by an independent checker written
//! here against Bitcoin Core's rules, with signatures checked by Bitcoin
//! Core's own interpreter (`bitcoinconsensus` 0.106, called directly with all
//! spent outputs so Taproot is on): nothing the simulator used to build a
//! block is trusted to check it.

use std::collections::HashMap;
use std::sync::Arc;

use bitcoin::bip158::BlockFilter;
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::consensus::serialize;
use bitcoin::hashes::Hash;
use bitcoin::script::Builder;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, Block, CompressedPublicKey, Network, OutPoint, ScriptBuf, Target, TxOut};

use super::*;
use lockstep_chain::{FeeRule, InvalidTx};

mod rbf;

fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n; 32]).unwrap()
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
}

fn p2tr(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2tr(&secp, key.public_key(&secp).x_only_public_key().0, None)
}

/// Why the independent checker refused a block.
#[derive(Debug, PartialEq)]
enum Invalid {
    PrevHash,
    Pow,
    Bits,
    Time,
    MerkleRoot,
    Bip34,
    MissingInput(OutPoint),
    ImmatureCoinbase(OutPoint),
    CoinbaseValue,
    Script { tx: usize, input: usize },
    WitnessCommitment,
    Weight,
}

/// Bitcoin Core's block rules, replayed from genesis over its own UTXO set.
struct Checker {
    utxos: HashMap<OutPoint, (TxOut, u32, bool)>,
    prev: Block,
    height: u32,
    p2wpkh_inputs: usize,
    p2tr_inputs: usize,
}

impl Checker {
    fn new() -> Checker {
        Checker {
            utxos: HashMap::new(),
            prev: genesis_block(Network::Regtest),
            height: 0,
            p2wpkh_inputs: 0,
            p2tr_inputs: 0,
        }
    }

    /// Checks `block` as the next block; applies it when valid. Also returns
    /// every input's spent output (for the filter cross-check).
    fn connect(&mut self, block: &Block) -> Result<HashMap<OutPoint, ScriptBuf>, Invalid> {
        let height = self.height + 1;
        if block.header.prev_blockhash != self.prev.block_hash() {
            return Err(Invalid::PrevHash);
        }
        if block.header.bits != self.prev.header.bits
            || block.header.target() != Target::MAX_ATTAINABLE_REGTEST
        {
            return Err(Invalid::Bits);
        }
        block
            .header
            .validate_pow(Target::MAX_ATTAINABLE_REGTEST)
            .map_err(|_| Invalid::Pow)?;
        if block.header.time <= self.prev.header.time {
            return Err(Invalid::Time);
        }
        if !block.check_merkle_root() {
            return Err(Invalid::MerkleRoot);
        }
        // BIP34, as Core checks it: the script starts with `CScript() << height`.
        let expect = Builder::new().push_int(i64::from(height)).into_script();
        let sig = &block.txdata[0].input[0].script_sig;
        if !block.txdata[0].is_coinbase()
            || !sig.as_bytes().starts_with(expect.as_bytes())
            || sig.len() < 2
            || sig.len() > 100
        {
            return Err(Invalid::Bip34);
        }
        if block.weight().to_wu() > 4_000_000 {
            return Err(Invalid::Weight);
        }
        let mut view = self.utxos.clone();
        let mut prevouts = HashMap::new();
        let mut fees = 0u64;
        for (t, tx) in block.txdata.iter().enumerate().skip(1) {
            let mut spent = Vec::new();
            for input in &tx.input {
                let (out, created, coinbase) = view
                    .remove(&input.previous_output)
                    .ok_or(Invalid::MissingInput(input.previous_output))?;
                if coinbase && height - created < 100 {
                    return Err(Invalid::ImmatureCoinbase(input.previous_output));
                }
                prevouts.insert(input.previous_output, out.script_pubkey.clone());
                spent.push(out);
            }
            let bytes = serialize(tx);
            let utxos: Vec<bitcoinconsensus::Utxo> = spent
                .iter()
                .map(|o| bitcoinconsensus::Utxo {
                    script_pubkey: o.script_pubkey.as_bytes().as_ptr(),
                    script_pubkey_len: o.script_pubkey.len() as u32,
                    value: o.value.to_sat() as i64,
                })
                .collect();
            for (i, out) in spent.iter().enumerate() {
                bitcoinconsensus::verify_with_flags(
                    out.script_pubkey.as_bytes(),
                    out.value.to_sat(),
                    &bytes,
                    Some(&utxos),
                    i,
                    bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT,
                )
                .map_err(|_| Invalid::Script { tx: t, input: i })?;
                if out.script_pubkey.is_p2tr() {
                    self.p2tr_inputs += 1;
                } else if out.script_pubkey.is_p2wpkh() {
                    self.p2wpkh_inputs += 1;
                }
            }
            let value_in: u64 = spent.iter().map(|o| o.value.to_sat()).sum();
            let value_out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
            assert!(value_out <= value_in, "outputs exceed inputs");
            fees += value_in - value_out;
            let txid = tx.compute_txid();
            for (vout, out) in tx.output.iter().enumerate() {
                view.insert(
                    OutPoint::new(txid, vout as u32),
                    (out.clone(), height, false),
                );
            }
        }
        let subsidy = (50 * 100_000_000u64) >> (height / 150);
        let coinbase_out: u64 = block.txdata[0]
            .output
            .iter()
            .map(|o| o.value.to_sat())
            .sum();
        if coinbase_out > subsidy + fees {
            return Err(Invalid::CoinbaseValue);
        }
        let has_witness = block
            .txdata
            .iter()
            .skip(1)
            .any(|tx| tx.input.iter().any(|i| !i.witness.is_empty()));
        if has_witness && !block.check_witness_commitment() {
            return Err(Invalid::WitnessCommitment);
        }
        let txid = block.txdata[0].compute_txid();
        for (vout, out) in block.txdata[0].output.iter().enumerate() {
            view.insert(
                OutPoint::new(txid, vout as u32),
                (out.clone(), height, true),
            );
        }
        self.utxos = view;
        self.prev = block.clone();
        self.height = height;
        Ok(prevouts)
    }
}

/// A signed chain with background load, and payments to and spends from
/// the test's own P2WPKH and P2TR keys.
fn busy_signed_chain() -> (SimChain, Vec<OutPoint>) {
    let chain = SimChain::generate(SimParams::signed(7), 105).unwrap();
    let a = chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(50_000))
        .unwrap();
    let b = chain.pay(p2tr(&key(2)), Amount::from_sat(70_000)).unwrap();
    chain.mine(1).unwrap();
    chain.spend_to(a, p2tr(&key(3)), Some(&key(1))).unwrap();
    chain.spend_to(b, p2wpkh(&key(4)), Some(&key(2))).unwrap();
    chain.mine(3).unwrap();
    (chain, vec![a, b])
}

#[test]
fn same_seed_same_chain() {
    let one = SimChain::generate(SimParams::signed(11), 110).unwrap();
    let two = SimChain::generate(SimParams::signed(11), 110).unwrap();
    let other = SimChain::generate(SimParams::signed(12), 110).unwrap();
    for h in 0..=110 {
        assert_eq!(one.hash_at(h), two.hash_at(h), "height {h}");
        assert_eq!(one.filter_at(h), two.filter_at(h), "height {h}");
    }
    assert_ne!(one.tip(), other.tip());
    assert_eq!(
        one.hash_at(0).unwrap(),
        genesis_block(Network::Regtest).block_hash()
    );
}

#[test]
fn signed_blocks_are_consensus_valid_and_filters_are_the_reference() {
    let (chain, _) = busy_signed_chain();
    let mut checker = Checker::new();
    let mut previous_header = chain.filter_header_at(0).unwrap();
    assert_eq!(
        previous_header,
        BlockFilter::new_script_filter(&genesis_block(Network::Regtest), |o| Err::<ScriptBuf, _>(
            bitcoin::bip158::Error::UtxoMissing(*o)
        ))
        .unwrap()
        .filter_header(&bitcoin::bip158::FilterHeader::all_zeros())
    );
    for h in 1..=chain.height() {
        let block = chain.block_at(h).unwrap();
        let prevouts = checker
            .connect(&block)
            .unwrap_or_else(|e| panic!("block {h} invalid: {e:?}"));
        let reference = BlockFilter::new_script_filter(&block, |o| {
            prevouts
                .get(o)
                .cloned()
                .ok_or(bitcoin::bip158::Error::UtxoMissing(*o))
        })
        .unwrap();
        assert_eq!(chain.filter_at(h).unwrap(), reference.content, "filter {h}");
        let header = reference.filter_header(&previous_header);
        assert_eq!(
            chain.filter_header_at(h).unwrap(),
            header,
            "filter header {h}"
        );
        previous_header = header;
    }
    assert!(
        checker.p2wpkh_inputs > 50,
        "{} P2WPKH inputs",
        checker.p2wpkh_inputs
    );
    assert!(
        checker.p2tr_inputs > 50,
        "{} P2TR inputs",
        checker.p2tr_inputs
    );
}

/// Flips one byte of a signature of the first input spending `kind`; the
/// block must then fail Core's interpreter at exactly that input.
fn corrupt_signature(kind: fn(&ScriptBuf) -> bool) {
    let (chain, _) = busy_signed_chain();
    let mut checker = Checker::new();
    for h in 1..=chain.height() {
        let block = chain.block_at(h).unwrap();
        let mut spent_kind = None;
        for (t, tx) in block.txdata.iter().enumerate().skip(1) {
            for (i, input) in tx.input.iter().enumerate() {
                let script = checker
                    .utxos
                    .get(&input.previous_output)
                    .map(|u| u.0.script_pubkey.clone())
                    .or_else(|| {
                        block
                            .txdata
                            .iter()
                            .find(|p| p.compute_txid() == input.previous_output.txid)
                            .map(|p| {
                                p.output[input.previous_output.vout as usize]
                                    .script_pubkey
                                    .clone()
                            })
                    });
                if spent_kind.is_none() && script.as_ref().is_some_and(kind) {
                    spent_kind = Some((t, i));
                }
            }
        }
        if let Some((t, i)) = spent_kind {
            let mut bad: Block = (*block).clone();
            let mut items: Vec<Vec<u8>> = bad.txdata[t].input[i]
                .witness
                .iter()
                .map(|w| w.to_vec())
                .collect();
            items[0][10] ^= 0x01;
            bad.txdata[t].input[i].witness = bitcoin::Witness::from_slice(&items);
            let mut probe = Checker {
                utxos: checker.utxos.clone(),
                prev: checker.prev.clone(),
                height: checker.height,
                p2wpkh_inputs: 0,
                p2tr_inputs: 0,
            };
            assert_eq!(
                probe.connect(&bad),
                Err(Invalid::Script { tx: t, input: i })
            );
            // The untouched block passes the same checker.
            checker.connect(&block).unwrap();
            return;
        }
        checker.connect(&block).unwrap();
    }
    panic!("no input of that kind in the chain");
}

#[test]
fn a_corrupted_p2wpkh_signature_fails_verification() {
    corrupt_signature(|s| s.is_p2wpkh());
}

#[test]
fn a_corrupted_p2tr_signature_fails_verification() {
    corrupt_signature(|s| s.is_p2tr());
}

#[test]
fn broadcast_rejects_with_the_right_reason() {
    let chain = SimChain::generate(SimParams::signed(3), 102).unwrap();
    let coin = chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
        .unwrap();
    chain.mine(1).unwrap();
    let to = |n: u64| {
        vec![TxOut {
            value: Amount::from_sat(n),
            script_pubkey: p2tr(&key(9)),
        }]
    };

    // Accepted once; a second spend of the same coin paying less does not
    // replace it.
    let first = chain.spend(coin, to(90_000), Some(&key(1))).unwrap();
    match chain.spend(coin, to(95_000), Some(&key(1))) {
        Err(SimError::Rejected(RejectReason::InsufficientFee {
            rule: FeeRule::FeeRate { conflict, .. },
        })) => assert_eq!(conflict, first),
        other => panic!("{other:?}"),
    }
    chain.mine(1).unwrap();
    // Once confirmed, it conflicts with the chain.
    assert!(matches!(
        chain.spend(coin, to(80_000), Some(&key(1))),
        Err(SimError::UnknownOutpoint(_))
    ));
    let spent_tx = chain
        .block_at(chain.height())
        .unwrap()
        .txdata
        .iter()
        .find(|t| t.compute_txid() == first)
        .cloned()
        .unwrap();
    let mut again = spent_tx.clone();
    again.output[0].value = Amount::from_sat(70_000);
    assert_eq!(
        chain.submit(again),
        Err(RejectReason::ConflictConfirmed { outpoint: coin })
    );
    assert_eq!(chain.submit(spent_tx), Err(RejectReason::AlreadyConfirmed));

    // Unknown inputs, overspending and a bad signature.
    let coin2 = chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
        .unwrap();
    chain.mine(1).unwrap();
    let mut unknown = chain.block_at(chain.height()).unwrap().txdata[1].clone();
    unknown.input[0].previous_output = OutPoint::new(bitcoin::Txid::all_zeros(), 5);
    assert!(matches!(
        chain.submit(unknown),
        Err(RejectReason::MissingInputs { .. })
    ));
    assert!(matches!(
        chain.spend(coin2, to(100_001), Some(&key(1))),
        Err(SimError::Rejected(RejectReason::Invalid(
            InvalidTx::OutputsExceedInputs { .. }
        )))
    ));
    assert!(matches!(
        chain.spend(coin2, to(1), Some(&key(5))),
        Err(SimError::Sign(SignError::WrongKey { .. }))
    ));
    assert!(matches!(
        chain.spend(coin2, to(1), None),
        Err(SimError::KeyRequired(_))
    ));
    let txid = chain.spend(coin2, to(90_000), Some(&key(1))).unwrap();
    let mut forged = chain
        .mempool()
        .into_iter()
        .find(|t| t.compute_txid() == txid)
        .unwrap();
    chain.mine(1).unwrap();
    let coin3 = chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
        .unwrap();
    chain.mine(1).unwrap();
    forged.input[0].previous_output = coin3; // signature now commits to the wrong outpoint
    assert!(matches!(
        chain.submit(forged),
        Err(RejectReason::Invalid(InvalidTx::Script { input: 0, .. }))
    ));
}

#[test]
fn broadcast_through_the_trait_object() {
    let chain = SimChain::generate(SimParams::unsigned(5), 101).unwrap();
    let source: Arc<dyn ChainSource> = Arc::new(chain.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let tip = source.tip().await.unwrap();
        assert_eq!(tip, chain.tip());
        assert_eq!(
            source.block_hash(50).await.unwrap(),
            chain.hash_at(50).unwrap()
        );
        let block = source.block(tip.hash).await.unwrap();
        assert_eq!(source.header(tip.hash).await.unwrap(), block.header);
        assert_eq!(
            source.filter(tip.hash).await.unwrap(),
            chain.filter_at(tip.height).unwrap()
        );
        assert_eq!(
            source.filter_header(tip.hash).await.unwrap(),
            chain.filter_header_at(tip.height).unwrap()
        );
        // A batch of filter headers equals them one by one; a block off
        // the chain (or at another height) is not found.
        let blocks: Vec<BlockId> = (40..60)
            .map(|height| BlockId {
                height,
                hash: chain.hash_at(height).unwrap(),
            })
            .collect();
        let batch = source.filter_headers(&blocks).await.unwrap();
        assert_eq!(batch.len(), blocks.len());
        for (block, header) in blocks.iter().zip(&batch) {
            assert_eq!(*header, source.filter_header(block.hash).await.unwrap());
        }
        let mut shifted = blocks.clone();
        shifted[3].height += 1;
        assert!(matches!(
            source.filter_headers(&shifted).await,
            Err(SourceError::NotFound(Missing::FilterHeader(_)))
        ));
        let missing = source.block_hash(1_000).await.unwrap_err();
        assert!(missing.is_not_found());
        assert_eq!(missing.kind(), ErrorKind::Retryable);
        assert!(matches!(
            source.block(bitcoin::BlockHash::all_zeros()).await,
            Err(SourceError::NotFound(Missing::Block(_)))
        ));

        // The tip's coinbase is immature; spending it is refused.
        let coinbase = OutPoint::new(block.txdata[0].compute_txid(), 0);
        let mut tx = block.txdata[1].clone();
        tx.input.truncate(1);
        tx.input[0].previous_output = coinbase;
        tx.output.truncate(1);
        tx.output[0].value = Amount::from_sat(1_000);
        match source.broadcast(&tx).await {
            Err(BroadcastError::Rejected {
                reason: RejectReason::Invalid(InvalidTx::PrematureCoinbaseSpend { mature_at, .. }),
                ..
            }) => {
                assert_eq!(mature_at, tip.height + 100)
            }
            other => panic!("{other:?}"),
        }
    });
}

use lockstep_chain::{BroadcastError, ErrorKind, Missing, SourceError};

#[test]
fn the_oracle_counts_receipts_and_spends() {
    let chain = SimChain::generate(SimParams::signed(21), 101).unwrap();
    let (s1, s2) = (p2wpkh(&key(1)), p2tr(&key(2)));
    let a = chain.pay(s1.clone(), Amount::from_sat(10_000)).unwrap();
    let b = chain.pay(s1.clone(), Amount::from_sat(20_000)).unwrap();
    let c = chain.pay(s2.clone(), Amount::from_sat(40_000)).unwrap();
    chain.mine(1).unwrap();
    // A spends to s2 (an internal move), B leaves.
    chain
        .spend(
            a,
            vec![TxOut {
                value: Amount::from_sat(9_000),
                script_pubkey: s2.clone(),
            }],
            Some(&key(1)),
        )
        .unwrap();
    chain.spend_to(b, p2wpkh(&key(8)), Some(&key(1))).unwrap();
    chain.mine(2).unwrap();

    let truth = chain.truth([&s1, &s2]);
    assert_eq!(truth.balance(), Amount::from_sat(49_000));
    let unspent: Vec<OutPoint> = truth.unspent.iter().map(|c| c.outpoint).collect();
    assert_eq!(unspent.len(), 2);
    assert!(unspent.contains(&c));
    assert_eq!(truth.spent.len(), 2);
    assert!(truth.spent.iter().all(|s| s.spent_height == 103));
    assert_eq!(
        truth.per_script[&s1],
        ScriptTotals {
            received: Amount::from_sat(30_000),
            sent: Amount::from_sat(30_000),
            coins_received: 2,
            coins_spent: 2
        }
    );
    assert_eq!(
        truth.per_script[&s2],
        ScriptTotals {
            received: Amount::from_sat(49_000),
            sent: Amount::ZERO,
            coins_received: 2,
            coins_spent: 0
        }
    );
    assert_eq!(truth.history.len(), 5);
    // One script alone sees only its side.
    assert_eq!(chain.truth([&s2]).balance(), Amount::from_sat(49_000));
    assert_eq!(chain.truth([&s1]).balance(), Amount::ZERO);
}

#[test]
fn scheduled_payments_land_at_their_height() {
    let chain = SimChain::generate(SimParams::unsigned(2), 101).unwrap();
    let s = p2wpkh(&key(1));
    chain
        .schedule_payment(105, s.clone(), Amount::from_sat(5_000))
        .unwrap();
    assert!(matches!(
        chain.schedule_payment(100, s.clone(), Amount::ONE_SAT),
        Err(SimError::HeightInPast { .. })
    ));
    chain.mine_to(110).unwrap();
    let truth = chain.truth([&s]);
    assert_eq!(truth.unspent.len(), 1);
    assert_eq!(truth.unspent[0].height, 105);
}

#[test]
fn after_a_reorg_the_best_chain_changes_and_the_oracle_follows() {
    for mode in [ReorgTxs::Drop, ReorgTxs::Reappear, ReorgTxs::ToMempool] {
        let chain = SimChain::generate(SimParams::signed(9), 110).unwrap();
        let s = p2tr(&key(1));
        chain.pay(s.clone(), Amount::from_sat(25_000)).unwrap();
        chain.mine(3).unwrap();
        assert_eq!(chain.truth([&s]).unspent[0].height, 111);
        let old: Vec<_> = (108..=113).map(|h| chain.hash_at(h).unwrap()).collect();

        let report = chain.reorg(4, mode).unwrap();
        assert_eq!(report.fork.height, 109);
        assert_eq!(report.disconnected.len(), 4);
        assert_eq!(chain.height(), 114);
        assert_eq!(chain.hash_at(109).unwrap(), old[1]);
        for h in 110..=113 {
            assert_ne!(
                chain.hash_at(h).unwrap(),
                old[(h - 108) as usize],
                "height {h}"
            );
            assert!(chain.height_of(&old[(h - 108) as usize]).is_none());
        }
        let truth = chain.truth([&s]);
        match mode {
            ReorgTxs::Drop => assert!(truth.unspent.is_empty()),
            ReorgTxs::Reappear => {
                assert_eq!(truth.unspent.len(), 1);
                assert_eq!(truth.unspent[0].height, 110);
            }
            ReorgTxs::ToMempool => {
                assert!(truth.unspent.is_empty());
                let pending = chain.mempool_truth([&s]);
                assert_eq!(pending.txs.len(), 1);
                assert_eq!(pending.untrusted_pending(), Amount::from_sat(25_000));
            }
        }
        if mode == ReorgTxs::ToMempool {
            // It confirms in the next block.
            chain.mine(1).unwrap();
            assert_eq!(chain.truth([&s]).unspent[0].height, 115);
            assert!(chain.mempool_truth([&s]).txs.is_empty());
        }
        // The new branch is as valid as the old one.
        let mut checker = Checker::new();
        for h in 1..=chain.height() {
            checker
                .connect(&chain.block_at(h).unwrap())
                .unwrap_or_else(|e| panic!("{mode:?} {h}: {e:?}"));
        }
    }
    let chain = SimChain::generate(SimParams::unsigned(9), 20).unwrap();
    assert!(matches!(
        chain.reorg(21, ReorgTxs::Drop),
        Err(SimError::ReorgTooDeep { .. })
    ));
}

#[test]
fn save_then_load_gives_the_identical_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.sim");
    let chain = SimChain::generate(SimParams::signed(4), 104).unwrap();
    chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(30_000))
        .unwrap();
    chain.mine(1).unwrap();
    chain.reorg(2, ReorgTxs::Reappear).unwrap();
    chain
        .pay(p2wpkh(&key(2)), Amount::from_sat(30_000))
        .unwrap(); // in the mempool
    chain
        .schedule_payment(110, p2tr(&key(3)), Amount::from_sat(1_000))
        .unwrap();
    chain.save(&path).unwrap();

    let loaded = SimChain::load(&path).unwrap();
    assert_eq!(loaded.params(), chain.params());
    assert_eq!(loaded.height(), chain.height());
    for h in 0..=chain.height() {
        assert_eq!(loaded.block_at(h), chain.block_at(h));
        assert_eq!(loaded.filter_at(h), chain.filter_at(h));
        assert_eq!(loaded.filter_header_at(h), chain.filter_header_at(h));
    }
    assert_eq!(loaded.mempool(), chain.mempool());
    // It goes on exactly as the original does.
    chain.mine(6).unwrap();
    loaded.mine(6).unwrap();
    assert_eq!(loaded.tip(), chain.tip());
    assert_eq!(
        loaded.truth([&p2tr(&key(3))]),
        chain.truth([&p2tr(&key(3))])
    );

    // Damage is a typed error, never a panic.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        SimChain::load(&path),
        Err(LoadError::Corrupt { .. })
    ));
    std::fs::write(&path, b"not a chain at all, just some text").unwrap();
    assert!(matches!(
        SimChain::load(&path),
        Err(LoadError::NotASimChain(_))
    ));
    bytes.truncate(20);
    std::fs::write(&path, &bytes).unwrap();
    assert!(SimChain::load(&path).is_err());
}

#[test]
fn background_load_sets_filter_sizes() {
    let light = SimChain::generate(SimParams::unsigned(1).with_load(0..=0, 1..=1), 103).unwrap();
    let heavy =
        SimChain::generate(SimParams::unsigned(1).with_load(1_000..=1_000, 2..=2), 103).unwrap();
    let light = light.stats();
    let heavy = heavy.stats();
    assert!(light.max_filter_elements <= 2, "{light:?}");
    assert!(heavy.max_filter_elements >= 2_500, "{heavy:?}");
}

#[test]
fn the_mempool_oracle_splits_trusted_from_untrusted_and_follows_evictions() {
    let chain = SimChain::generate(SimParams::unsigned(21), 105).unwrap();
    let (a, b) = (p2wpkh(&key(1)), p2wpkh(&key(2)));
    let coin = chain.pay(a.clone(), Amount::from_sat(50_000)).unwrap();
    chain.mine(1).unwrap();
    // `a` pays itself (trusted), then passes that on to `b`; `b` also
    // receives from the simulator (untrusted for `b`).
    let own = chain.spend_to(coin, a.clone(), None).unwrap();
    let to_b = chain
        .spend_to(OutPoint::new(own, 0), b.clone(), None)
        .unwrap();
    let from_sim = chain.pay(b.clone(), Amount::from_sat(7_000)).unwrap();

    let only_a = chain.mempool_truth([&a]);
    assert_eq!(only_a.spends, vec![coin]);
    assert_eq!(only_a.outgoing, Amount::from_sat(50_000));
    assert_eq!(only_a.trusted_pending(), Amount::ZERO, "passed on to b");
    assert_eq!(only_a.txs.len(), 2);
    let only_b = chain.mempool_truth([&b]);
    assert_eq!(only_b.untrusted_pending(), Amount::from_sat(49_000 + 7_000));
    let both = chain.mempool_truth([&a, &b]);
    assert_eq!(both.trusted_pending(), Amount::from_sat(49_000));
    assert_eq!(both.untrusted_pending(), Amount::from_sat(7_000));

    // Evicting `a`'s own payment evicts its child too.
    assert_eq!(chain.evict(own), vec![own, to_b]);
    assert_eq!(chain.evict(own), Vec::<bitcoin::Txid>::new());
    let both = chain.mempool_truth([&a, &b]);
    assert_eq!(both.txs.len(), 1);
    assert_eq!(both.txs[0].txid, from_sim.txid);
    assert!(both.spends.is_empty());
    // The evicted coin can be spent again, and the chain stays valid.
    chain.spend_to(coin, b.clone(), None).unwrap();
    chain.mine(1).unwrap();
    assert_eq!(chain.truth([&b]).unspent.len(), 2);
}
