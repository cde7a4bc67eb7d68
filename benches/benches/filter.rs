//! Filter matching: ours vs rust-bitcoin's `match_any` vs the floor, in one
//! run, on a 3,000-element filter and Q watched scripts (none present, the
//! usual case); the same on two cores; and the full-block matcher.
#![allow(missing_docs)] // criterion_group! generates undocumented functions.

use std::hint::black_box;

use bitcoin::bip158::{BlockFilter, GcsFilterWriter};
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Block, BlockHash, OutPoint, ScriptBuf, Transaction, TxIn, TxOut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lockstep_filter::{
    BasicFilter, M, P, Watchlist, hash_floor, matches, matches_parallel, scan_block,
};

/// A deterministic script: P2WPKH (22 bytes) or P2TR (34 bytes) shaped.
fn script(i: u64, salt: u64) -> ScriptBuf {
    let mut x = (i ^ salt.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    let mut bytes = Vec::with_capacity(34);
    let (prefix, len) = if i.is_multiple_of(2) {
        ([0x00, 0x14], 20)
    } else {
        ([0x51, 0x20], 32)
    };
    bytes.extend_from_slice(&prefix);
    while bytes.len() < 2 + len {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f);
        bytes.push((x >> 56) as u8);
    }
    ScriptBuf::from(bytes)
}

fn block_hash() -> BlockHash {
    BlockHash::from_byte_array([0x42; 32])
}

/// A 3,000-element filter of scripts none of the watchlists hold.
fn filter_3000() -> Vec<u8> {
    let key = block_hash().to_byte_array();
    let k0 = u64::from_le_bytes(key[0..8].try_into().unwrap());
    let k1 = u64::from_le_bytes(key[8..16].try_into().unwrap());
    let mut out = Vec::new();
    let mut writer = GcsFilterWriter::new(&mut out, k0, k1, M, P as u8);
    for i in 0..3_000 {
        writer.add_element(script(i, 1).as_bytes());
    }
    writer.finish().unwrap();
    out
}

fn watchlist(q: u64) -> (Vec<ScriptBuf>, Watchlist<u32>) {
    let scripts: Vec<ScriptBuf> = (0..q).map(|i| script(i, 2)).collect();
    let list = Watchlist::from_scripts(
        scripts
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_bytes(), i as u32 / 1_000)),
    );
    (scripts, list)
}

fn one_core(c: &mut Criterion) {
    let raw = filter_3000();
    let hash = block_hash();
    let key = hash.to_byte_array();
    let (k0, k1) = (
        u64::from_le_bytes(key[0..8].try_into().unwrap()),
        u64::from_le_bytes(key[8..16].try_into().unwrap()),
    );
    let mut group = c.benchmark_group("filter match, 3000 elements, one core");
    group.sample_size(20);
    for q in [1_000u64, 10_000, 100_000, 1_000_000] {
        let (scripts, list) = watchlist(q);
        group.throughput(Throughput::Elements(q));
        group.bench_with_input(BenchmarkId::new("ours (decode + match)", q), &q, |b, _| {
            b.iter(|| {
                let filter = BasicFilter::decode(&hash, black_box(&raw)).unwrap();
                black_box(matches(&filter, &list))
            })
        });
        group.bench_with_input(BenchmarkId::new("rust-bitcoin match_any", q), &q, |b, _| {
            let filter = BlockFilter::new(&raw);
            b.iter(|| {
                black_box(
                    filter
                        .match_any(&hash, scripts.iter().map(|s| s.as_bytes()))
                        .unwrap(),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("floor (SipHash only)", q), &q, |b, _| {
            b.iter(|| black_box(hash_floor(k0, k1, black_box(&list))))
        });
    }
    group.finish();
}

/// `count` filters of 1,500 elements (the sync chain's mean), each under
/// its own block hash: what the chain loop meets, a fresh key and bitmap
/// per block, where [`one_core`] repeats one filter.
fn fresh_filters(count: u64) -> Vec<(BlockHash, Vec<u8>)> {
    (0..count)
        .map(|f| {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&(f + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
            let hash = BlockHash::from_byte_array(bytes);
            let (k0, k1) = (u64::from_le_bytes(bytes[0..8].try_into().unwrap()), 0);
            let mut out = Vec::new();
            let mut writer = GcsFilterWriter::new(&mut out, k0, k1, M, P as u8);
            for i in 0..1_500 {
                writer.add_element(script(i, 10 + f).as_bytes());
            }
            writer.finish().unwrap();
            (hash, out)
        })
        .collect()
}

fn many_blocks(c: &mut Criterion) {
    let filters = fresh_filters(32);
    let mut group = c.benchmark_group("filter match, 32 blocks of 1500 elements, one core");
    group.sample_size(20);
    for q in [10_000u64, 100_000] {
        let (_, list) = watchlist(q);
        group.throughput(Throughput::Elements(q * filters.len() as u64));
        group.bench_with_input(BenchmarkId::new("ours (decode + match)", q), &q, |b, _| {
            b.iter(|| {
                for (hash, raw) in &filters {
                    // Sized for the watchlist, as the chain loop decodes.
                    let filter = BasicFilter::decode_for(hash, black_box(raw), list.len()).unwrap();
                    black_box(matches(&filter, &list));
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("decode only", q), &q, |b, _| {
            b.iter(|| {
                for (hash, raw) in &filters {
                    black_box(BasicFilter::decode_for(hash, black_box(raw), list.len()).unwrap());
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("floor (SipHash only)", q), &q, |b, _| {
            b.iter(|| {
                for (hash, _) in &filters {
                    let key = hash.to_byte_array();
                    let k0 = u64::from_le_bytes(key[0..8].try_into().unwrap());
                    let k1 = u64::from_le_bytes(key[8..16].try_into().unwrap());
                    black_box(hash_floor(k0, k1, black_box(&list)));
                }
            })
        });
    }
    group.finish();
}

fn two_cores(c: &mut Criterion) {
    let raw = filter_3000();
    let hash = block_hash();
    let (_, list) = watchlist(200_000);
    let mut group = c.benchmark_group("filter match, Q = 200000, blocks per second");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    group.bench_function("one core", |b| {
        b.iter(|| black_box(matches(&BasicFilter::decode(&hash, &raw).unwrap(), &list)))
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    group.bench_function("two cores", |b| {
        pool.install(|| {
            b.iter(|| {
                black_box(matches_parallel(
                    &BasicFilter::decode(&hash, &raw).unwrap(),
                    &list,
                ))
            })
        })
    });
    group.finish();
}

/// A block of 1,000 transactions with 3 outputs each, and the scripts of
/// the outputs its inputs spend.
fn block_3000() -> (Block, Vec<ScriptBuf>) {
    let mut txdata = Vec::new();
    let mut spent = Vec::new();
    for t in 0..1_000u64 {
        let prev = bitcoin::Txid::from_byte_array([(t % 251) as u8; 32]);
        spent.push(script(t, 3));
        txdata.push(Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::new(prev, t as u32),
                ..Default::default()
            }],
            output: (0..3)
                .map(|o| TxOut {
                    value: Amount::from_sat(1_000),
                    script_pubkey: script(t * 3 + o, 4),
                })
                .collect(),
        });
    }
    let header = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest).header;
    (Block { header, txdata }, spent)
}

fn full_block(c: &mut Criterion) {
    let (block, spent) = block_3000();
    let bytes = bitcoin::consensus::serialize(&block);
    let mut group = c.benchmark_group("full block, 3000 outputs");
    group.sample_size(20);
    for q in [10_000u64, 100_000, 1_000_000] {
        let (_, list) = watchlist(q);
        group.bench_with_input(BenchmarkId::new("scan", q), &q, |b, _| {
            b.iter(|| {
                black_box(scan_block(
                    &block,
                    spent.iter().map(|s| s.as_script()),
                    &list,
                ))
            })
        });
    }
    group.bench_function(format!("deserialize ({} bytes)", bytes.len()), |b| {
        b.iter(|| black_box(bitcoin::consensus::deserialize::<Block>(black_box(&bytes)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, one_core, many_blocks, two_cores, full_block);
criterion_main!(benches);
