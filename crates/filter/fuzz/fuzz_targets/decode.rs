//! Fuzzes the BIP158 decoder: any bytes must decode or give a typed error
//! (never panic or hang), and a decoded filter must answer exactly as
//! rust-bitcoin's reference reader does.
#![no_main]

use bitcoin::BlockHash;
use bitcoin::bip158::BlockFilter;
use bitcoin::hashes::Hash;
use libfuzzer_sys::fuzz_target;
use lockstep_filter::{BasicFilter, Watchlist, matches};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte picks the block key and a query count; the rest is the filter.
    let block_hash = BlockHash::from_byte_array([data[0]; 32]);
    let raw = &data[1..];
    let Ok(filter) = BasicFilter::decode(&block_hash, raw) else { return };
    let queries: Vec<[u8; 22]> = (0..data[0] % 16).map(|i| [i.wrapping_mul(data[0]); 22]).collect();
    let watchlist = Watchlist::from_scripts(queries.iter().map(|q| (&q[..], ())));
    let found = matches(&filter, &watchlist);
    for (id, script) in watchlist.iter() {
        let reference = BlockFilter::new(raw).match_any(&block_hash, std::iter::once(script));
        if let Ok(reference) = reference {
            assert_eq!(found.contains(&id), reference);
        }
    }
});
