//! Saving a [`super::SimChain`] to one file and loading it back.
//!
//! Layout: the magic `LKSTSIM\0`, a format version (u32), the body, and the
//! SHA-256 of everything before it. The body holds the parameters, the
//! random generator's position, every block (consensus encoding) with its
//! filter and filter header, and what the simulator needs to go on exactly
//! as the original would (foreign outputs, mempool, coin pool order,
//! scheduled payments). The UTXO set and indexes are rebuilt by replaying
//! the blocks, and the filter-header chain is checked on the way.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bitcoin::bip158::FilterHeader;
use bitcoin::consensus::{Decodable, Encodable};
use bitcoin::hashes::{Hash, sha256};
use bitcoin::{Amount, Block, OutPoint, ScriptBuf, Transaction};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::state::{State, Stored};
use super::{Load, SimMode, SimParams};
use lockstep_chain::filters;

const MAGIC: &[u8; 8] = b"LKSTSIM\0";
const FORMAT_VERSION: u32 = 1;

/// Why a chain could not be saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaveError {
    /// Writing the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a saved chain could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a saved chain.
    #[error("{0} is not a saved lockstep chain")]
    NotASimChain(PathBuf),
    /// Written by a newer lockstep.
    #[error("saved chain format {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// The file's format.
        found: u32,
        /// The format this build reads.
        supported: u32,
    },
    /// The file is damaged: its checksum, its encoding or its content does
    /// not hold together.
    #[error("saved chain {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn put<T: Encodable + ?Sized>(out: &mut Vec<u8>, value: &T) {
    value
        .consensus_encode(out)
        .expect("writing to a Vec cannot fail");
}

pub(crate) fn save(state: &State, path: &Path) -> Result<(), SaveError> {
    let mut out = Vec::with_capacity(
        state
            .blocks
            .iter()
            .map(|s| s.size + s.filter.len() + 64)
            .sum(),
    );
    out.extend_from_slice(MAGIC);
    put(&mut out, &FORMAT_VERSION);
    let p = &state.params;
    put(&mut out, &p.seed);
    put(&mut out, &(p.mode == SimMode::Signed));
    for n in [
        p.load.txs_per_block.start(),
        p.load.txs_per_block.end(),
        p.load.outputs_per_tx.start(),
        p.load.outputs_per_tx.end(),
    ] {
        put(&mut out, n);
    }
    put(&mut out, &(p.pool_target as u64));
    put(&mut out, &p.max_reorg_depth);
    out.extend_from_slice(&state.rng.get_seed());
    put(&mut out, &state.rng.get_stream());
    out.extend_from_slice(&state.rng.get_word_pos().to_le_bytes());
    put(&mut out, &state.branch);

    put(&mut out, &(state.blocks.len() as u32));
    for stored in &state.blocks {
        put(&mut out, &*stored.block);
        put(&mut out, &stored.filter);
        put(&mut out, &stored.filter_header);
    }
    let mut foreign: Vec<&OutPoint> = state.foreign.iter().collect();
    foreign.sort();
    put(&mut out, &(foreign.len() as u64));
    for outpoint in foreign {
        put(&mut out, outpoint);
    }
    put(&mut out, &state.mempool.txs);
    put(&mut out, &(state.pool.len() as u64));
    for coin in state.pool.iter() {
        put(&mut out, &coin.outpoint);
    }
    let scheduled: Vec<(u32, &ScriptBuf, Amount)> = state
        .scheduled
        .iter()
        .flat_map(|(h, payments)| payments.iter().map(move |(s, a)| (*h, s, *a)))
        .collect();
    put(&mut out, &(scheduled.len() as u64));
    for (height, script, amount) in scheduled {
        put(&mut out, &height);
        put(&mut out, script);
        put(&mut out, &amount.to_sat());
    }
    let checksum = sha256::Hash::hash(&out);
    out.extend_from_slice(checksum.as_byte_array());

    // Write beside, then rename: a crash never leaves half a file behind.
    let io = |source| SaveError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&out).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

pub(crate) fn load(path: &Path) -> Result<State, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..8] != MAGIC {
        return Err(LoadError::NotASimChain(path.to_owned()));
    }
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(LoadError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 32);
    if sha256::Hash::hash(body).as_byte_array() != checksum {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut r = &body[12..];
    decode_state(&mut r).map_err(corrupt)
}

fn get<T: Decodable>(r: &mut &[u8]) -> Result<T, String> {
    T::consensus_decode_from_finite_reader(r).map_err(|e| e.to_string())
}

fn get_bytes<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], String> {
    if r.len() < N {
        return Err("file ends early".into());
    }
    let (head, rest) = r.split_at(N);
    *r = rest;
    Ok(head.try_into().expect("N bytes"))
}

fn decode_state(r: &mut &[u8]) -> Result<State, String> {
    let seed: u64 = get(r)?;
    let mode = if get::<bool>(r)? {
        SimMode::Signed
    } else {
        SimMode::Unsigned
    };
    let [a, b, c, d] = [get::<u32>(r)?, get(r)?, get(r)?, get(r)?];
    let pool_target = get::<u64>(r)? as usize;
    let max_reorg_depth: u32 = get(r)?;
    let params = SimParams {
        seed,
        mode,
        load: Load {
            txs_per_block: a..=b,
            outputs_per_tx: c..=d,
        },
        pool_target,
        max_reorg_depth,
    };
    let mut rng = ChaCha8Rng::from_seed(get_bytes::<32>(r)?);
    rng.set_stream(get(r)?);
    rng.set_word_pos(u128::from_le_bytes(get_bytes::<16>(r)?));

    let mut state = State::new(params, rng);
    state.branch = get(r)?;
    let n_blocks: u32 = get(r)?;
    for height in 0..n_blocks {
        let block: Block = get(r)?;
        let filter: Vec<u8> = get(r)?;
        let filter_header: FilterHeader = get(r)?;
        let previous = match height {
            0 => filters::genesis_previous_filter_header(),
            _ => state.blocks.last().expect("genesis").filter_header,
        };
        if filters::filter_header(&filter, &previous) != filter_header {
            return Err(format!(
                "the filter header of block {height} does not chain"
            ));
        }
        let hash = block.block_hash();
        if height == 0 {
            if hash != state.tip().hash || filter_header != state.blocks[0].filter_header {
                return Err("the first block is not the regtest genesis block".into());
            }
            continue;
        }
        let stored = Stored::new(block, filter, filter_header);
        state.replay(stored).map_err(|e| e.to_string())?;
    }
    let n_foreign: u64 = get(r)?;
    for _ in 0..n_foreign {
        state.foreign.insert(get(r)?);
    }
    // Ownership depends on the foreign set, which is read after the blocks:
    // recompute it for the unspent outputs now that the set is complete.
    let foreign = std::mem::take(&mut state.foreign);
    for (outpoint, utxo) in state.utxos.iter_mut() {
        if foreign.contains(outpoint) {
            utxo.key = None;
        }
    }
    state
        .immature
        .retain(|(_, coin)| !foreign.contains(&coin.outpoint));
    state.foreign = foreign;
    let mempool: Vec<Transaction> = get(r)?;
    let n_pool: u64 = get(r)?;
    let mut pool_order = Vec::with_capacity(n_pool.min(1 << 24) as usize);
    for _ in 0..n_pool {
        pool_order.push(get(r)?);
    }
    state
        .restore(mempool, pool_order)
        .map_err(|e| e.to_string())?;
    let n_scheduled: u64 = get(r)?;
    for _ in 0..n_scheduled {
        let height: u32 = get(r)?;
        let script: ScriptBuf = get(r)?;
        let amount = Amount::from_sat(get(r)?);
        state
            .scheduled
            .entry(height)
            .or_default()
            .push((script, amount));
    }
    if !r.is_empty() {
        return Err(format!("{} unexpected bytes at the end", r.len()));
    }
    Ok(state)
}
