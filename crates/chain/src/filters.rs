//! Building BIP158 basic filters and chaining BIP157 filter headers.
//!
//! Construction is rust-bitcoin's [`bitcoin::bip158`], the reference: the
//! simulated chain's filters must stay independent of lockstep's own matcher
//! (`lockstep-filter`), which is tested against them.

use bitcoin::bip158::{self, BlockFilter, FilterHeader};
use bitcoin::hashes::Hash;
use bitcoin::{Block, OutPoint, ScriptBuf};

/// Why a basic filter could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildFilterError {
    /// The script of an output that the block spends was not supplied.
    #[error("the script spent by input {0} is unknown")]
    MissingPrevout(OutPoint),
    /// rust-bitcoin's writer failed.
    #[error("filter construction failed: {0}")]
    Bip158(String),
}

/// The BIP158 basic filter of `block`, raw (CompactSize element count, then
/// the Golomb-Rice coded set). `prevout_script` gives the script of every
/// output the block spends (coinbase inputs excepted).
pub fn basic_filter<F>(block: &Block, prevout_script: F) -> Result<Vec<u8>, BuildFilterError>
where
    F: Fn(&OutPoint) -> Option<ScriptBuf>,
{
    BlockFilter::new_script_filter(block, |outpoint| {
        prevout_script(outpoint).ok_or(bip158::Error::UtxoMissing(*outpoint))
    })
    .map(|filter| filter.content)
    .map_err(|e| match e {
        bip158::Error::UtxoMissing(outpoint) => BuildFilterError::MissingPrevout(outpoint),
        other => BuildFilterError::Bip158(other.to_string()),
    })
}

/// The BIP157 filter header of a filter: `double-SHA256(filter hash ||
/// previous header)`.
pub fn filter_header(filter: &[u8], previous: &FilterHeader) -> FilterHeader {
    BlockFilter::new(filter).filter_header(previous)
}

/// The previous filter header of the genesis block: all zeros.
pub fn genesis_previous_filter_header() -> FilterHeader {
    FilterHeader::all_zeros()
}

/// The number of elements a raw basic filter says it holds (its leading
/// CompactSize), or `None` when it does not even hold that.
pub fn filter_element_count(filter: &[u8]) -> Option<u64> {
    use bitcoin::consensus::Decodable;
    let mut cursor = filter;
    bitcoin::VarInt::consensus_decode(&mut cursor)
        .ok()
        .map(|v| v.0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::str::FromStr;

    use bitcoin::consensus::deserialize;
    use bitcoin::hex::FromHex;

    use super::*;

    /// Bitcoin Core's BIP158 vectors (testdata/bip158/blockfilters.json): a
    /// header row, then one row a block.
    fn core_vectors() -> Vec<serde_json::Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/bip158/blockfilters.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// On Bitcoin Core's BIP158 vectors, our construction must give every filter byte for byte, and our header
    /// chaining every filter header.
    #[test]
    fn bitcoin_core_vectors_reproduce() {
        let rows = core_vectors();
        let mut checked = 0;
        for row in rows.iter().skip(1) {
            let row = row.as_array().unwrap();
            let hex = |i: usize| Vec::<u8>::from_hex(row[i].as_str().unwrap()).unwrap();
            let block: Block = deserialize(&hex(2)).unwrap();
            assert_eq!(block.block_hash().to_string(), row[1].as_str().unwrap());
            let mut scripts = row[3].as_array().unwrap().iter();
            let mut prevouts = HashMap::new();
            for tx in block.txdata.iter().skip(1) {
                for input in &tx.input {
                    let script =
                        Vec::<u8>::from_hex(scripts.next().unwrap().as_str().unwrap()).unwrap();
                    prevouts.insert(input.previous_output, ScriptBuf::from(script));
                }
            }
            let filter = basic_filter(&block, |o| prevouts.get(o).cloned()).unwrap();
            assert_eq!(filter, hex(5), "filter of block {}", row[0]);
            let previous = FilterHeader::from_str(row[4].as_str().unwrap()).unwrap();
            let header = FilterHeader::from_str(row[6].as_str().unwrap()).unwrap();
            assert_eq!(
                filter_header(&filter, &previous),
                header,
                "header of block {}",
                row[0]
            );
            // The check bites: a filter one byte off does not give the header.
            let mut wrong = filter.clone();
            let last = wrong.len() - 1;
            wrong[last] ^= 1;
            assert_ne!(filter_header(&wrong, &previous), header);
            checked += 1;
        }
        assert_eq!(checked, 10);
    }

    #[test]
    fn missing_prevout_is_a_typed_error() {
        let rows = core_vectors();
        // Block 49291 spends outputs; give none of their scripts.
        let row = rows.iter().skip(1).find(|r| r[0] == 49291).unwrap();
        let block: Block =
            deserialize(&Vec::<u8>::from_hex(row[2].as_str().unwrap()).unwrap()).unwrap();
        assert!(matches!(
            basic_filter(&block, |_| None),
            Err(BuildFilterError::MissingPrevout(_))
        ));
    }

    #[test]
    fn element_count_reads_the_compact_size() {
        assert_eq!(filter_element_count(&[0x03, 0xff]), Some(3));
        assert_eq!(filter_element_count(&[0xfd, 0x10, 0x27]), Some(10_000));
        assert_eq!(filter_element_count(&[]), None);
        assert_eq!(filter_element_count(&[0xfd, 0x10]), None);
    }
}
