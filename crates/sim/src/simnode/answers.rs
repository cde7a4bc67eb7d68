//! What both interfaces answer alike: REST's `chaininfo.json` and
//! `mempool/*.json` are the bodies of `getblockchaininfo`,
//! `getmempoolinfo` and `getrawmempool`, so the JSON writer (Core's field
//! order and number formats) and those answers live here, used by the REST
//! and RPC modules, neither of which uses the other.

use std::collections::{HashMap, HashSet};
use std::fmt;

use bitcoin::block::Header;
use bitcoin::{Amount, Txid, Work};
use serde_json::Value;

use super::Shared;

/// A JSON object with its fields in the order they were put (Core's order).
#[derive(Debug, Default)]
pub(super) struct Obj(Vec<(&'static str, String)>);

impl Obj {
    pub(super) fn new() -> Obj {
        Obj::default()
    }

    /// A field from any serialisable value.
    pub(super) fn put(mut self, key: &'static str, value: impl Into<Value>) -> Obj {
        let text = value.into().to_string();
        self.0.push((key, text));
        self
    }

    /// A field whose JSON text is given (numbers written as Core does).
    pub(super) fn raw(mut self, key: &'static str, text: impl Into<String>) -> Obj {
        self.0.push((key, text.into()));
        self
    }
}

impl fmt::Display for Obj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "\"{key}\":{value}")?;
        }
        f.write_str("}")
    }
}

/// Core's `ValueFromAmount`: BTC with exactly eight decimals.
pub(super) fn amount(a: Amount) -> String {
    let sat = a.to_sat();
    format!("{}.{:08}", sat / 100_000_000, sat % 100_000_000)
}

/// Core's `GetMedianTimePast` of the block at `height`.
pub(super) fn median_time(shared: &Shared, height: u32) -> u32 {
    let mut times: Vec<u32> = (height.saturating_sub(10)..=height)
        .filter_map(|h| shared.chain.block_at(h).map(|b| b.header.time))
        .collect();
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or(0)
}

/// The chain work up to and including `height`, as Core's 64 hex digits.
pub(super) fn chain_work(shared: &Shared, height: u32) -> String {
    let mut work = Work::from_be_bytes([0; 32]);
    for h in 0..=height {
        if let Some(block) = shared.chain.block_at(h) {
            work = work + block.header.work();
        }
    }
    hex(&work.to_be_bytes())
}

/// Core's `GetDifficulty`, printed as UniValue prints a double.
pub(super) fn difficulty(header: &Header) -> String {
    let bits = header.bits.to_consensus();
    let mut shift = (bits >> 24) & 0xff;
    let mut diff = 65535.0_f64 / f64::from(bits & 0x00ff_ffff);
    while shift < 29 {
        diff *= 256.0;
        shift += 1;
    }
    while shift > 29 {
        diff /= 256.0;
        shift -= 1;
    }
    format_g16(diff)
}

/// C++'s `operator<<` with `setprecision(16)` (that is, `%.16g`), as
/// UniValue writes a double: 16 significant digits, trailing zeros
/// trimmed, scientific below 1e-4 and from 1e16.
fn format_g16(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return "0".to_owned();
    }
    let sci = format!("{value:.15e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exponent.abs())
    } else {
        let decimals = (15 - exponent).max(0) as usize;
        trim(&format!("{value:.decimals$}"))
    }
}

pub(super) fn target_hex(header: &Header) -> String {
    hex(&header.target().to_be_bytes())
}

/// `getblockchaininfo` (and REST `chaininfo.json`), Core 29's fields.
pub(super) fn blockchain_info(shared: &Shared) -> Obj {
    let chain = &shared.chain;
    let tip = chain.tip();
    let tip_block = chain.block_at(tip.height);
    let header = tip_block.as_ref().map(|b| b.header);
    let size_on_disk = chain.blocks_size();
    let ibd = shared.config.initial_block_download;
    Obj::new()
        .put("chain", shared.config.chain.as_str())
        .put("blocks", tip.height)
        .put("headers", tip.height)
        .put("bestblockhash", tip.hash.to_string())
        .put(
            "bits",
            header.map_or(String::new(), |h| format!("{:08x}", h.bits.to_consensus())),
        )
        .put("target", header.as_ref().map_or(String::new(), target_hex))
        .raw(
            "difficulty",
            header.as_ref().map_or("0".to_owned(), difficulty),
        )
        .put("time", header.map_or(0, |h| h.time))
        .put("mediantime", median_time(shared, tip.height))
        .raw("verificationprogress", if ibd { "0.5" } else { "1" })
        .put("initialblockdownload", ibd)
        .put("chainwork", chain_work(shared, tip.height))
        .put("size_on_disk", size_on_disk)
        .put("pruned", false)
        .put("warnings", Vec::<String>::new())
}

/// `getrawmempool false` and REST `mempool/contents.json?verbose=false`.
pub(super) fn mempool_txids(shared: &Shared) -> Value {
    Value::from(
        shared
            .chain
            .mempool()
            .iter()
            .map(|t| t.compute_txid().to_string())
            .collect::<Vec<_>>(),
    )
}

/// `getmempoolinfo` and REST `mempool/info.json`.
pub(super) fn mempool_info(shared: &Shared) -> Obj {
    let pool = shared.chain.mempool_fees();
    let bytes: usize = pool.iter().map(|(t, _)| t.vsize()).sum();
    let fees: Amount = pool.iter().map(|(_, f)| *f).sum();
    Obj::new()
        .put("loaded", true)
        .put("size", pool.len())
        .put("bytes", bytes)
        .put("usage", bytes)
        .raw("total_fee", amount(fees))
        .put("maxmempool", 300_000_000u64)
        .raw("mempoolminfee", "0.00001000")
        .raw("minrelaytxfee", "0.00001000")
        .raw("incrementalrelayfee", "0.00001000")
        .put("unbroadcastcount", 0)
        .put("fullrbf", true)
}

/// `getrawmempool true` and REST `mempool/contents.json`: Core's entry
/// fields; `time` is 0 (SimChain keeps no entry time).
pub(super) fn mempool_verbose(shared: &Shared) -> String {
    let pool = shared.chain.mempool_fees();
    let height = shared.chain.height();
    let index: HashMap<Txid, usize> = pool
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (t.compute_txid(), i))
        .collect();
    // In-mempool parents and children of each transaction.
    let parents: Vec<Vec<usize>> = pool
        .iter()
        .map(|(t, _)| {
            let mut p: Vec<usize> = t
                .input
                .iter()
                .filter_map(|i| index.get(&i.previous_output.txid).copied())
                .collect();
            p.sort_unstable();
            p.dedup();
            p
        })
        .collect();
    let mut children = vec![Vec::new(); pool.len()];
    for (child, ps) in parents.iter().enumerate() {
        for p in ps {
            children[*p].push(child);
        }
    }
    let closure = |start: usize, edges: &Vec<Vec<usize>>| {
        let mut seen = HashSet::from([start]);
        let mut todo = vec![start];
        while let Some(n) = todo.pop() {
            for m in &edges[n] {
                if seen.insert(*m) {
                    todo.push(*m);
                }
            }
        }
        seen
    };
    let mut entries = Vec::new();
    for (i, (tx, fee)) in pool.iter().enumerate() {
        let ancestors = closure(i, &parents);
        let descendants = closure(i, &children);
        let size = |set: &HashSet<usize>| set.iter().map(|j| pool[*j].0.vsize()).sum::<usize>();
        let fees = |set: &HashSet<usize>| set.iter().map(|j| pool[*j].1).sum::<Amount>();
        let signals = tx.input.iter().any(|i| i.sequence.is_rbf());
        let entry = Obj::new()
            .put("vsize", tx.vsize())
            .put("weight", tx.weight().to_wu())
            .put("time", 0)
            .put("height", height)
            .put("descendantcount", descendants.len())
            .put("descendantsize", size(&descendants))
            .put("ancestorcount", ancestors.len())
            .put("ancestorsize", size(&ancestors))
            .put("wtxid", tx.compute_wtxid().to_string())
            .raw(
                "fees",
                Obj::new()
                    .raw("base", amount(*fee))
                    .raw("modified", amount(*fee))
                    .raw("ancestor", amount(fees(&ancestors)))
                    .raw("descendant", amount(fees(&descendants)))
                    .to_string(),
            )
            .put(
                "depends",
                parents[i]
                    .iter()
                    .map(|p| pool[*p].0.compute_txid().to_string())
                    .collect::<Vec<_>>(),
            )
            .put(
                "spentby",
                children[i]
                    .iter()
                    .map(|c| pool[*c].0.compute_txid().to_string())
                    .collect::<Vec<_>>(),
            )
            .put("bip125-replaceable", signals)
            .put("unbroadcast", false);
        entries.push((tx.compute_txid().to_string(), entry.to_string()));
    }
    // Keys are txids, not static names: written here, in mempool order.
    let mut text = String::from("{");
    for (n, (txid, entry)) in entries.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(&format!("\"{txid}\":{entry}"));
    }
    text.push('}');
    text
}

/// Bytes as lowercase hex, as Core writes them.
pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
