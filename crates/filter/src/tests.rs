//! The matcher against rust-bitcoin's `BlockFilter::match_any` (the
//! reference) and Bitcoin Core's vectors, and every way a filter can be bad.

use std::collections::HashMap;
use std::str::FromStr;

use bitcoin::bip158::{BlockFilter, GcsFilterWriter};
use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::hex::FromHex;
use bitcoin::{Block, BlockHash, ScriptBuf};
use proptest::prelude::*;

use crate::*;

/// A filter of `elements` for `block_hash`, written by rust-bitcoin.
fn reference_filter(block_hash: &BlockHash, elements: &[Vec<u8>]) -> Vec<u8> {
    let key = block_hash.to_byte_array();
    let k0 = u64::from_le_bytes(key[0..8].try_into().unwrap());
    let k1 = u64::from_le_bytes(key[8..16].try_into().unwrap());
    let mut out = Vec::new();
    let mut writer = GcsFilterWriter::new(&mut out, k0, k1, M, P as u8);
    for e in elements {
        writer.add_element(e);
    }
    writer.finish().unwrap();
    out
}

fn reference_match(block_hash: &BlockHash, filter: &[u8], script: &[u8]) -> bool {
    BlockFilter::new(filter)
        .match_any(block_hash, std::iter::once(script))
        .unwrap()
}

fn script_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 22..=22),
        proptest::collection::vec(any::<u8>(), 34..=34),
        proptest::collection::vec(any::<u8>(), 1..60),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For random filters and query sets with planted positives and
    /// negatives, every answer equals `match_any`'s, and every planted
    /// positive is found.
    #[test]
    fn answers_equal_match_any(
        hash in any::<[u8; 32]>(),
        elements in proptest::collection::vec(script_strategy(), 0..400),
        negatives in proptest::collection::vec(script_strategy(), 0..400),
        planted in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let block_hash = BlockHash::from_byte_array(hash);
        let raw = reference_filter(&block_hash, &elements);
        let filter = BasicFilter::decode(&block_hash, &raw).unwrap();
        let mut watchlist = Watchlist::new();
        let mut planted_scripts = Vec::new();
        if !elements.is_empty() {
            for index in &planted {
                let script = &elements[index.index(elements.len())];
                watchlist.insert(script, 1u32);
                planted_scripts.push(script.clone());
            }
        }
        for script in &negatives {
            watchlist.insert(script, 2u32);
        }
        let found = matches(&filter, &watchlist);
        for (id, script) in watchlist.iter() {
            let expected = reference_match(&block_hash, &raw, script);
            prop_assert_eq!(found.contains(&id), expected, "script {:?}", script);
            prop_assert_eq!(filter.contains(script), expected);
        }
        for script in &planted_scripts {
            prop_assert!(found.contains(&watchlist.id_of(script).unwrap()));
        }
    }

    /// Garbage never panics or hangs: it decodes or gives a typed error, and
    /// when it decodes, the answers still equal `match_any`'s.
    #[test]
    fn garbage_gives_an_error_or_the_reference_answer(
        hash in any::<[u8; 32]>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        queries in proptest::collection::vec(script_strategy(), 0..20),
    ) {
        let block_hash = BlockHash::from_byte_array(hash);
        if let Ok(filter) = BasicFilter::decode(&block_hash, &bytes) {
            for q in &queries {
                let reference = BlockFilter::new(&bytes).match_any(&block_hash, std::iter::once(q.as_slice()));
                if let Ok(reference) = reference {
                    prop_assert_eq!(filter.contains(q), reference);
                }
            }
        }
    }

    /// Any cut of a valid filter is refused, never read as "no match".
    #[test]
    fn every_truncation_is_an_error(
        hash in any::<[u8; 32]>(),
        elements in proptest::collection::vec(script_strategy(), 1..200),
        cut in any::<prop::sample::Index>(),
    ) {
        let block_hash = BlockHash::from_byte_array(hash);
        let raw = reference_filter(&block_hash, &elements);
        let at = cut.index(raw.len());
        prop_assert!(BasicFilter::decode(&block_hash, &raw[..at]).is_err(), "cut at {} of {}", at, raw.len());
    }

    /// Four parallel tasks find what one thread finds.
    #[test]
    fn parallel_equals_serial(hash in any::<[u8; 32]>(), seed: u64) {
        let block_hash = BlockHash::from_byte_array(hash);
        let scripts: Vec<Vec<u8>> = (0..70_000u64).map(|i| {
            let x = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut s = vec![0x00, 0x14];
            s.extend_from_slice(&x.to_le_bytes());
            s.extend_from_slice(&(x >> 3).to_le_bytes());
            s.extend_from_slice(&(i as u32).to_le_bytes());
            s
        }).collect();
        let raw = reference_filter(&block_hash, &scripts[..3_000]);
        let filter = BasicFilter::decode(&block_hash, &raw).unwrap();
        let watchlist = Watchlist::from_scripts(scripts.iter().map(|s| (s.as_slice(), 0u8)));
        let mut serial = matches(&filter, &watchlist);
        let mut parallel = matches_parallel(&filter, &watchlist);
        serial.sort();
        parallel.sort();
        prop_assert!(serial.len() >= 3_000);
        prop_assert_eq!(serial, parallel);
    }
}

/// Bitcoin Core's BIP158 vectors (testdata/bip158/blockfilters.json): a
/// header row, then one row a block.
fn core_vectors() -> Vec<serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/bip158/blockfilters.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bitcoin_core_vectors_decode_and_match_their_scripts() {
    let rows = core_vectors();
    for row in rows.iter().skip(1) {
        let hex = |i: usize| Vec::<u8>::from_hex(row[i].as_str().unwrap()).unwrap();
        let block: Block = deserialize(&hex(2)).unwrap();
        let block_hash = BlockHash::from_str(row[1].as_str().unwrap()).unwrap();
        let raw = hex(5);
        let filter = BasicFilter::decode(&block_hash, &raw).unwrap();
        let mut scripts: Vec<ScriptBuf> = row[3]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| ScriptBuf::from(Vec::<u8>::from_hex(s.as_str().unwrap()).unwrap()))
            .collect();
        scripts.extend(
            block
                .txdata
                .iter()
                .flat_map(|tx| tx.output.iter().map(|o| o.script_pubkey.clone())),
        );
        let elements: Vec<&ScriptBuf> = scripts
            .iter()
            .filter(|s| !s.is_empty() && !s.is_op_return())
            .collect();
        let watchlist = Watchlist::from_scripts(elements.iter().map(|s| (s.as_bytes(), ())));
        assert_eq!(
            matches(&filter, &watchlist).len(),
            watchlist.len(),
            "block {}",
            row[0]
        );
        for s in &elements {
            assert!(filter.contains(s.as_bytes()));
            assert!(reference_match(&block_hash, &raw, s.as_bytes()));
        }
        assert_eq!(
            filter.len() as u64,
            bitcoin::consensus::deserialize_partial::<bitcoin::VarInt>(&raw)
                .unwrap()
                .0
                .0
        );
    }
}

#[test]
fn bad_filters_give_their_typed_errors() {
    let block_hash = BlockHash::all_zeros();
    let elements: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 22]).collect();
    let good = reference_filter(&block_hash, &elements);
    assert_eq!(BasicFilter::decode(&block_hash, &good).unwrap().len(), 100);

    type Expect = fn(&DecodeFilterError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty", vec![], |e| {
            matches!(e, DecodeFilterError::MissingCount)
        }),
        ("count cut off", vec![0xfe, 0x01], |e| {
            matches!(e, DecodeFilterError::MissingCount)
        }),
        ("non-canonical count", vec![0xfd, 0x05, 0x00, 0xff], |e| {
            matches!(e, DecodeFilterError::NonCanonicalCount)
        }),
        (
            "oversized count",
            {
                let mut v = vec![0xff];
                v.extend_from_slice(&u64::MAX.to_le_bytes());
                v.extend_from_slice(&good[1..]);
                v
            },
            |e| matches!(e, DecodeFilterError::CountTooLarge { .. }),
        ),
        (
            "count above 2^32",
            {
                let mut v = vec![0xff];
                v.extend_from_slice(&(1u64 << 33).to_le_bytes());
                v.extend(std::iter::repeat_n(0u8, 1 << 16));
                v
            },
            |e| matches!(e, DecodeFilterError::CountTooLarge { .. }),
        ),
        (
            "count a little high",
            {
                let mut v = good.clone();
                v[0] = 110;
                v
            },
            |e| {
                matches!(
                    e,
                    DecodeFilterError::Truncated { .. } | DecodeFilterError::CountTooLarge { .. }
                )
            },
        ),
        (
            "truncated",
            good[..good.len() - 3].to_vec(),
            |e| matches!(e, DecodeFilterError::Truncated { decoded, n: 100 } if *decoded < 100),
        ),
        (
            "excess data",
            {
                let mut v = good.clone();
                v.extend_from_slice(&[0, 0]);
                v
            },
            |e| matches!(e, DecodeFilterError::ExcessData { bytes: 2 }),
        ),
        (
            "all ones",
            {
                let mut v = vec![10];
                v.extend(std::iter::repeat_n(0xffu8, 60));
                v
            },
            |e| matches!(e, DecodeFilterError::Truncated { decoded: 0, n: 10 }),
        ),
        (
            "value out of range",
            {
                // One element whose quotient alone puts it past N·M = M.
                let mut v = vec![1];
                v.extend(std::iter::repeat_n(0xffu8, 3));
                v.extend_from_slice(&[0x00, 0x00, 0x00]);
                v
            },
            |e| matches!(e, DecodeFilterError::ValueOutOfRange { index: 0 }),
        ),
    ];
    for (name, bytes, expected) in cases {
        match BasicFilter::decode(&block_hash, &bytes) {
            Err(e) => assert!(expected(&e), "{name}: got {e:?}"),
            Ok(f) => panic!("{name}: decoded {} elements", f.len()),
        }
    }
}

/// A basic filter's bytes for exactly `values` (ascending): CompactSize N,
/// then each gap as a Golomb-Rice code (quotient in unary, P bits).
fn encode_values(values: &[u64]) -> Vec<u8> {
    let mut bits: Vec<bool> = Vec::new();
    let mut last = 0;
    for &v in values {
        let delta = v - last;
        last = v;
        bits.extend(std::iter::repeat_n(true, (delta >> P) as usize));
        bits.push(false);
        bits.extend((0..P).rev().map(|b| delta >> b & 1 == 1));
    }
    let mut out = Vec::new();
    bitcoin::consensus::Encodable::consensus_encode(
        &bitcoin::VarInt(values.len() as u64),
        &mut out,
    )
    .unwrap();
    out.extend(bits.chunks(8).map(|byte| {
        byte.iter()
            .enumerate()
            .fold(0u8, |acc, (i, &bit)| acc | u8::from(bit) << (7 - i))
    }));
    out
}

/// Quotients around and far past what one refill of the reader holds
/// (its fast path takes up to 44 ones) decode exactly, as do short ones.
#[test]
fn long_and_short_quotients_decode_exactly() {
    let hash = BlockHash::all_zeros();
    let n = 2_000u64;
    let mut values = Vec::new();
    let mut v = 0u64;
    for i in 0..n {
        let quotient = if i % 50 == 0 { 38 + (i / 50) % 12 } else { 0 };
        v += (quotient << P) | ((i * 7_919) % (1 << P));
        values.push(v);
    }
    assert!(v < n * M);
    // And one filter whose first gap is a run of ~300 ones.
    let top: Vec<u64> = (200 * M - 200..200 * M).collect();
    for values in [values, top] {
        let raw = encode_values(&values);
        let filter = BasicFilter::decode(&hash, &raw).unwrap();
        assert_eq!(filter.values(), values.as_slice());
        let dense = BasicFilter::decode_for(&hash, &raw, crate::DENSE_FROM).unwrap();
        assert_eq!(dense.values(), values.as_slice());
        for &value in &values {
            assert!(filter.contains_value(value) && dense.contains_value(value));
        }
        // Cut inside the stream: an error, never a short answer (too few
        // bytes for the count, or the stream ending early).
        for cut in [raw.len() - 1, raw.len() / 2, 3] {
            assert!(matches!(
                BasicFilter::decode(&hash, &raw[..cut]),
                Err(DecodeFilterError::Truncated { .. } | DecodeFilterError::CountTooLarge { .. })
            ));
        }
        assert!(matches!(
            BasicFilter::decode(&hash, &raw[..raw.len() - 1]),
            Err(DecodeFilterError::Truncated { .. })
        ));
    }
}

/// The lane-wise mapping equals `map_hash` exactly, and the bitmap probe
/// never misses a value the filter holds, on both paths (a range below
/// 2^32, up to N = 5,471, and above it).
#[test]
fn bitmap_probe_finds_every_value_on_both_range_paths() {
    let hash = BlockHash::from_byte_array([7; 32]);
    // Both bitmap densities (`decode` and `decode_for` a large watchlist).
    for (n, watched) in [1u64, 100, 5_471, 6_000]
        .into_iter()
        .flat_map(|n| [(n, 0), (n, crate::DENSE_FROM)])
    {
        let elements: Vec<Vec<u8>> = (0..n).map(|i| i.to_le_bytes().to_vec()).collect();
        let raw = reference_filter(&hash, &elements);
        let filter = BasicFilter::decode_for(&hash, &raw, watched).unwrap();
        let sparse = BasicFilter::decode(&hash, &raw).unwrap();
        assert_eq!(filter.values(), sparse.values());
        if watched > 0 && n > 1 {
            assert!(filter.probe().bitmap.len() > sparse.probe().bitmap.len());
        }
        let range = filter.len() as u64 * M;
        assert_eq!(range > u64::from(u32::MAX), n == 6_000);
        // Hashes at the edges of the 32-bit halves, where carries happen.
        let edges = [
            0,
            1,
            u64::MAX,
            u64::MAX - 1,
            0xffff_ffff,
            1 << 32,
            (1 << 32) - 1,
            1 << 63,
        ];
        // A hash that maps onto value v: ceil(v · 2^64 / range).
        let preimage = |v: u64| ((u128::from(v) << 64).div_ceil(u128::from(range))) as u64;
        let mut hashes: Vec<u64> = filter.values().iter().map(|&v| preimage(v)).collect();
        let members = hashes.len();
        hashes.extend(edges);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4_000 {
            x = x.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(1);
            hashes.push(x);
        }
        for (b, block) in hashes.chunks(LANES).enumerate() {
            let mut lanes = [0u64; LANES];
            lanes[..block.len()].copy_from_slice(block);
            let probe = filter.probe();
            let hits = probe.hits(&lanes);
            let mapped = probe.map_lanes(&lanes);
            for (lane, &h) in block.iter().enumerate() {
                let value = filter.map_hash(h);
                assert_eq!(mapped[lane], value, "n {n}, hash {h}");
                let hit = hits & (1 << lane) != 0;
                assert_eq!(hit, filter.bitmap_has(value), "n {n}, hash {h}");
                if b * LANES + lane < members {
                    assert!(hit && filter.contains_value(value), "n {n}: member missed");
                }
            }
        }
        // Through the kernels (AVX-512's own probe where the CPU has it):
        // every element of the filter matches, others almost never.
        let list = Watchlist::from_scripts(elements.iter().map(|e| (e.as_slice(), ())));
        assert_eq!(matches(&filter, &list).len(), elements.len(), "n {n}");
        let others: Vec<Vec<u8>> = (n..n + 20_000).map(|i| i.to_le_bytes().to_vec()).collect();
        let list = Watchlist::from_scripts(others.iter().map(|e| (e.as_slice(), ())));
        let false_positives = matches(&filter, &list).len();
        assert!(
            false_positives < 5,
            "n {n}: {false_positives} false positives"
        );
    }
}

#[test]
fn an_empty_filter_matches_nothing() {
    let filter = BasicFilter::decode(&BlockHash::all_zeros(), &[0]).unwrap();
    assert!(filter.is_empty());
    let watchlist = Watchlist::from_scripts([(&[0u8; 22][..], ())]);
    assert!(matches(&filter, &watchlist).is_empty());
}

#[test]
fn watchlist_dedupes_scripts_and_keeps_every_owner() {
    let mut list = Watchlist::new();
    let (a, new_a) = list.insert(&[1; 22], (1u32, 0u32));
    let (a2, new_a2) = list.insert(&[1; 22], (2, 7));
    let (b, _) = list.insert(&[2; 34], (1, 1));
    list.insert(&[1; 22], (1, 0));
    assert!(new_a && !new_a2);
    assert_eq!(a, a2);
    assert_eq!(list.len(), 2);
    assert_eq!(list.owners(a).collect::<Vec<_>>(), vec![(1, 0), (2, 7)]);
    assert_eq!(list.script(b), &[2; 34]);
    let wallet_two = list.subset(|(wallet, _)| *wallet == 2);
    assert_eq!(wallet_two.len(), 1);
    assert_eq!(
        wallet_two
            .owners(wallet_two.id_of(&[1; 22]).unwrap())
            .collect::<Vec<_>>(),
        vec![(2, 7)]
    );
}

#[test]
fn scanning_a_block_finds_outputs_and_spent_scripts() {
    let rows = core_vectors();
    let row = rows.iter().skip(1).find(|r| r[0] == 926485).unwrap();
    let block: Block =
        deserialize(&Vec::<u8>::from_hex(row[2].as_str().unwrap()).unwrap()).unwrap();
    let spent: Vec<ScriptBuf> = row[3]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ScriptBuf::from(Vec::<u8>::from_hex(s.as_str().unwrap()).unwrap()))
        .collect();
    let output = block.txdata[0].output[0].script_pubkey.clone();
    let mut list = Watchlist::new();
    let (out_id, _) = list.insert(output.as_bytes(), 'o');
    let (spent_id, _) = list.insert(spent[0].as_bytes(), 's');
    list.insert(&[9; 22], 'n');
    let found = scan_block(&block, spent.iter().map(|s| s.as_script()), &list);
    let mut expected = vec![out_id, spent_id];
    expected.sort();
    expected.dedup();
    assert_eq!(found, expected);
    let mut counts = HashMap::new();
    for id in &found {
        *counts.entry(id).or_insert(0) += 1;
    }
    assert!(counts.values().all(|&c| c == 1));
}
