//! The chain source and the store together, as the chain loop will use them.

use std::sync::Arc;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, BlockHash};
use lockstep_chain::ChainSource;
use lockstep_sim::{ReorgTxs, SimChain, SimParams};
use lockstep_store::{Store, StoreOptions};
use lockstep_tests::{key, p2tr, p2wpkh};

/// Walks a chain through the trait object, recording every block's hash in
/// batches of one transaction each, then survives a reorg and a reopen: the
/// stored hashes always equal the source's best chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_hashes_follow_the_source_across_a_reorg_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockstep.db");
    let chain = SimChain::generate(SimParams::signed(99), 110).unwrap();
    let source: Arc<dyn ChainSource> = Arc::new(chain.clone());
    let store = Store::open(&path, StoreOptions::default()).unwrap();

    async fn record(source: &Arc<dyn ChainSource>, store: &Store, from: u32) {
        let tip = source.tip().await.unwrap();
        let mut hashes = Vec::new();
        for height in from..=tip.height {
            hashes.push((height, source.block_hash(height).await.unwrap()));
        }
        for batch in hashes.chunks(25) {
            let batch = batch.to_vec();
            store
                .write(move |tx| {
                    for (height, hash) in &batch {
                        tx.put_block_hash(*height, &hash.to_byte_array())?;
                    }
                    let (height, hash) = batch.last().unwrap();
                    tx.set_tip(*height, &hash.to_byte_array())
                })
                .await
                .unwrap();
        }
    }

    async fn assert_matches(source: &Arc<dyn ChainSource>, store: &Store) {
        let tip = source.tip().await.unwrap();
        assert_eq!(
            store.read(|tx| tx.tip()).await.unwrap(),
            Some((tip.height, tip.hash.to_byte_array()))
        );
        for height in 0..=tip.height {
            let stored = store
                .read(move |tx| tx.block_hash(height))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                BlockHash::from_byte_array(stored),
                source.block_hash(height).await.unwrap(),
                "height {height}"
            );
        }
    }

    record(&source, &store, 0).await;
    assert_matches(&source, &store).await;

    chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(10_000))
        .unwrap();
    chain.pay(p2tr(&key(2)), Amount::from_sat(10_000)).unwrap();
    chain.mine(2).unwrap();
    let report = chain.reorg(3, ReorgTxs::Reappear).unwrap();
    let fork = report.fork.height;
    store
        .write(move |tx| tx.delete_block_hashes_above(fork))
        .await
        .unwrap();
    record(&source, &store, fork + 1).await;
    assert_matches(&source, &store).await;

    drop(store);
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    assert_matches(&source, &store).await;
}
