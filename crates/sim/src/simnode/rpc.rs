//! JSON-RPC, as Core's `src/httprpc.cpp` and `src/rpc/request.cpp`: 1.0
//! replies (`result`, `error`, `id`, HTTP 500/404/400 on error) unless the
//! request says `"jsonrpc": "2.0"` (HTTP 200, `result` or `error`), batches
//! as arrays, and the methods of `src/rpc/blockchain.cpp`,
//! `src/rpc/mempool.cpp` and `src/rpc/rawtransaction.cpp` this node serves.
//!
//! Objects are written field by field in Core's order (serde_json's map
//! sorts its keys), numbers as Core's UniValue writes them (amounts with
//! eight decimals).

use std::collections::HashSet;

use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::{Amount, BlockHash, Transaction, Txid};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::Value;

use super::answers::{
    Obj, amount, blockchain_info, chain_work, difficulty, hex, median_time, mempool_info,
    mempool_txids, mempool_verbose, target_hex,
};
use super::{Shared, reply};
use lockstep_chain::core_format::*;

/// An RPC error: Core's code and message.
type RpcError = (i64, String);

fn err(code: i64, message: impl Into<String>) -> RpcError {
    (code, message.into())
}

pub(super) fn handle(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            return legacy_reply(None, Err(err(RPC_PARSE_ERROR, "Parse error")), &Value::Null);
        }
    };
    match request {
        Value::Array(batch) => {
            let replies: Vec<String> = batch.iter().map(|r| one(shared, r).1).collect();
            reply(
                StatusCode::OK,
                "application/json",
                format!("[{}]\n", replies.join(",")),
            )
        }
        single => {
            let (status, text) = one(shared, &single);
            reply(status, "application/json", format!("{text}\n"))
        }
    }
}

/// One request: the HTTP status it would have alone, and its reply.
fn one(shared: &Shared, request: &Value) -> (StatusCode, String) {
    let Some(object) = request.as_object() else {
        let r = legacy_text(
            Err(err(RPC_INVALID_REQUEST, "Invalid Request object")),
            &Value::Null,
        );
        return (StatusCode::BAD_REQUEST, r);
    };
    let id = object.get("id").cloned().unwrap_or(Value::Null);
    let v2 = object.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let result = call(shared, object);
    if v2 {
        let id_text = id.to_string();
        let text = match result {
            Ok(r) => format!("{{\"jsonrpc\":\"2.0\",\"result\":{r},\"id\":{id_text}}}"),
            Err((code, message)) => format!(
                "{{\"jsonrpc\":\"2.0\",\"error\":{},\"id\":{id_text}}}",
                Obj::new().put("code", code).put("message", message)
            ),
        };
        (StatusCode::OK, text)
    } else {
        let status = match &result {
            Ok(_) => StatusCode::OK,
            Err((RPC_INVALID_REQUEST, _)) => StatusCode::BAD_REQUEST,
            Err((RPC_METHOD_NOT_FOUND, _)) => StatusCode::NOT_FOUND,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, legacy_text(result, &id))
    }
}

fn legacy_text(result: Result<String, RpcError>, id: &Value) -> String {
    match result {
        Ok(r) => format!("{{\"result\":{r},\"error\":null,\"id\":{id}}}"),
        Err((code, message)) => format!(
            "{{\"result\":null,\"error\":{},\"id\":{id}}}",
            Obj::new().put("code", code).put("message", message)
        ),
    }
}

fn legacy_reply(
    status: Option<StatusCode>,
    result: Result<String, RpcError>,
    id: &Value,
) -> Response<Full<Bytes>> {
    let status = status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(
        status,
        "application/json",
        format!("{}\n", legacy_text(result, id)),
    )
}

/// The parameters of one call, positional or named.
struct Params<'a> {
    method: &'a str,
    positional: Vec<&'a Value>,
    named: Option<&'a serde_json::Map<String, Value>>,
    names: &'static [&'static str],
}

impl<'a> Params<'a> {
    /// Parameter `i` (called `names[i]`), `None` when absent or null.
    fn get(&self, i: usize) -> Option<&'a Value> {
        let value = match self.named {
            Some(map) => map.get(*self.names.get(i)?),
            None => self.positional.get(i).copied(),
        };
        value.filter(|v| !v.is_null())
    }

    fn required(&self, i: usize) -> Result<&'a Value, RpcError> {
        self.get(i).ok_or_else(|| self.usage())
    }

    /// Core answers a call with the wrong parameters with its help text
    /// as `RPC_MISC_ERROR`; the usage line stands for it here.
    fn usage(&self) -> RpcError {
        err(
            RPC_MISC_ERROR,
            format!("{} {}", self.method, self.names.join(" ")),
        )
    }

    fn hash(&self, i: usize) -> Result<String, RpcError> {
        let name = self.names.get(i).copied().unwrap_or("hash");
        let s = as_str(self.required(i)?)?;
        if s.len() != 64 {
            return Err(err(
                RPC_INVALID_PARAMETER,
                format!("{name} must be of length 64 (not {}, for '{s}')", s.len()),
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(
                RPC_INVALID_PARAMETER,
                format!("{name} must be hexadecimal string (not '{s}')"),
            ));
        }
        Ok(s.to_owned())
    }

    fn block_hash(&self, i: usize) -> Result<BlockHash, RpcError> {
        self.hash(i)?
            .parse()
            .map_err(|_| err(RPC_INVALID_PARAMETER, "invalid hash"))
    }

    fn bool_or(&self, i: usize, default: bool) -> Result<bool, RpcError> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(type_error(v, "bool")),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Core's `RPC_TYPE_ERROR` message for a parameter of the wrong type.
fn type_error(v: &Value, expected: &str) -> RpcError {
    err(
        RPC_TYPE_ERROR,
        format!(
            "JSON value of type {} is not of expected type {expected}",
            type_name(v)
        ),
    )
}

fn as_str(v: &Value) -> Result<&str, RpcError> {
    v.as_str().ok_or_else(|| type_error(v, "string"))
}

fn as_i64(v: &Value) -> Result<i64, RpcError> {
    v.as_i64().ok_or_else(|| type_error(v, "number"))
}

/// Core's parameter names per method, in order.
fn names(method: &str) -> Option<&'static [&'static str]> {
    Some(match method {
        "getblockchaininfo" | "getblockcount" | "getbestblockhash" | "getmempoolinfo" => &[],
        "getblockhash" => &["height"],
        "getblockheader" => &["blockhash", "verbose"],
        "getblockfilter" => &["blockhash", "filtertype"],
        "getblock" => &["blockhash", "verbosity"],
        "getrawmempool" => &["verbose", "mempool_sequence"],
        "getrawtransaction" => &["txid", "verbose", "blockhash"],
        "sendrawtransaction" => &["hexstring", "maxfeerate", "maxburnamount"],
        "testmempoolaccept" => &["rawtxs", "maxfeerate"],
        _ => return None,
    })
}

fn call(shared: &Shared, request: &serde_json::Map<String, Value>) -> Result<String, RpcError> {
    let method = match request.get("method") {
        None => return Err(err(RPC_INVALID_REQUEST, "Missing method")),
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return Err(err(RPC_INVALID_REQUEST, "Method must be a string")),
    };
    let Some(names) = names(method) else {
        return Err(err(RPC_METHOD_NOT_FOUND, "Method not found"));
    };
    let params = match request.get("params") {
        None | Some(Value::Null) => Params {
            method,
            positional: Vec::new(),
            named: None,
            names,
        },
        Some(Value::Array(a)) => Params {
            method,
            positional: a.iter().collect(),
            named: None,
            names,
        },
        Some(Value::Object(o)) => {
            if let Some(unknown) = o.keys().find(|k| !names.contains(&k.as_str())) {
                return Err(err(
                    RPC_INVALID_PARAMETER,
                    format!("Unknown named parameter {unknown}"),
                ));
            }
            Params {
                method,
                positional: Vec::new(),
                named: Some(o),
                names,
            }
        }
        Some(_) => {
            return Err(err(
                RPC_INVALID_REQUEST,
                "Params must be an array or object",
            ));
        }
    };
    if params.positional.len() > names.len() {
        return Err(params.usage());
    }
    let chain = &shared.chain;
    match method {
        "getblockchaininfo" => Ok(blockchain_info(shared).to_string()),
        "getblockcount" => Ok(chain.height().to_string()),
        "getbestblockhash" => Ok(json_string(&chain.tip().hash.to_string())),
        "getmempoolinfo" => Ok(mempool_info(shared).to_string()),
        "getblockhash" => {
            let height = as_i64(params.required(0)?)?;
            u32::try_from(height)
                .ok()
                .and_then(|h| chain.hash_at(h))
                .map(|hash| json_string(&hash.to_string()))
                .ok_or_else(|| err(RPC_INVALID_PARAMETER, "Block height out of range"))
        }
        "getblockheader" => {
            let hash = params.block_hash(0)?;
            let verbose = params.bool_or(1, true)?;
            let height = chain
                .height_of(&hash)
                .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Block not found"))?;
            let (Some(block), Some(header)) = (chain.block_at(height), shared.header_at(height))
            else {
                return Err(err(RPC_INVALID_ADDRESS_OR_KEY, "Block not found"));
            };
            if verbose {
                Ok(header_json(shared, height, &header, block.txdata.len()).to_string())
            } else {
                Ok(json_string(&hex(&serialize(&header))))
            }
        }
        "getblockfilter" => {
            let hash = params.block_hash(0)?;
            let filter_type = match params.get(1) {
                None => "basic",
                Some(v) => as_str(v)?,
            };
            if filter_type != "basic" {
                return Err(err(RPC_INVALID_ADDRESS_OR_KEY, "Unknown filtertype"));
            }
            if !shared.config.filter_index {
                return Err(err(
                    RPC_MISC_ERROR,
                    format!("Index is not enabled for filtertype {filter_type}"),
                ));
            }
            let height = chain
                .height_of(&hash)
                .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Block not found"))?;
            let (Some(filter), Some(header)) =
                (shared.filter_at(height), chain.filter_header_at(height))
            else {
                return Err(err(RPC_MISC_ERROR, "Filter not found."));
            };
            Ok(Obj::new()
                .put("filter", hex(&filter))
                .put("header", header.to_string())
                .to_string())
        }
        "getblock" => {
            let hash = params.block_hash(0)?;
            let verbosity = match params.get(1) {
                None => 1,
                Some(Value::Bool(b)) => i64::from(*b),
                Some(v) => as_i64(v)?,
            };
            let block = chain
                .height_of(&hash)
                .and_then(|h| shared.block_at(h))
                .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Block not found"))?;
            if verbosity != 0 {
                return Err(err(
                    RPC_INVALID_PARAMETER,
                    format!("verbosity {verbosity} is not served by this stand-in node (only 0)"),
                ));
            }
            Ok(json_string(&hex(&serialize(&*block))))
        }
        "getrawmempool" => {
            if params.bool_or(0, false)? {
                Ok(mempool_verbose(shared).to_string())
            } else {
                Ok(mempool_txids(shared).to_string())
            }
        }
        "getrawtransaction" => raw_transaction(shared, &params),
        "sendrawtransaction" => send(shared, &params),
        "testmempoolaccept" => test_accept(shared, &params),
        _ => Err(err(RPC_METHOD_NOT_FOUND, "Method not found")),
    }
}

fn json_string(s: &str) -> String {
    Value::from(s).to_string()
}

fn raw_transaction(shared: &Shared, params: &Params<'_>) -> Result<String, RpcError> {
    let txid: Txid = params
        .hash(0)?
        .parse()
        .map_err(|_| err(RPC_INVALID_PARAMETER, "invalid txid"))?;
    let verbose = match params.get(1) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => as_i64(v)? != 0,
    };
    if verbose {
        return Err(err(
            RPC_INVALID_PARAMETER,
            "verbose transactions are not served by this stand-in node (only raw hex)",
        ));
    }
    let tx = if params.get(2).is_some() {
        let hash = params.block_hash(2)?;
        let block = shared
            .chain
            .height_of(&hash)
            .and_then(|h| shared.chain.block_at(h))
            .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Block hash not found"))?;
        block
            .txdata
            .iter()
            .find(|t| t.compute_txid() == txid)
            .cloned()
            .ok_or_else(|| {
                err(
                    RPC_INVALID_ADDRESS_OR_KEY,
                    "No such transaction found in the provided block. Use gettransaction for wallet transactions.",
                )
            })?
    } else {
        shared
            .chain
            .mempool()
            .into_iter()
            .find(|t| t.compute_txid() == txid)
            .ok_or_else(|| {
                err(
                    RPC_INVALID_ADDRESS_OR_KEY,
                    "No such mempool transaction. Use -txindex or provide a block hash to enable blockchain transaction queries. Use gettransaction for wallet transactions.",
                )
            })?
    };
    Ok(json_string(&hex(&serialize(&tx))))
}

fn decode_tx(text: &str) -> Option<Transaction> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    deserialize(&bytes?).ok()
}

fn send(shared: &Shared, params: &Params<'_>) -> Result<String, RpcError> {
    let text = as_str(params.required(0)?)?;
    let tx = decode_tx(text).ok_or_else(|| {
        err(
            RPC_DESERIALIZATION_ERROR,
            "TX decode failed. Make sure the tx has at least one input.",
        )
    })?;
    match shared.chain.submit(tx.clone()) {
        Ok(txid) => Ok(json_string(&txid.to_string())),
        Err(reason) => Err(reject_to_rpc(&tx, &reason)),
    }
}

fn test_accept(shared: &Shared, params: &Params<'_>) -> Result<String, RpcError> {
    let raw = params.required(0)?;
    let Value::Array(rawtxs) = raw else {
        return Err(type_error(raw, "array"));
    };
    if rawtxs.is_empty() || rawtxs.len() > 25 {
        return Err(err(
            RPC_INVALID_PARAMETER,
            "Array must contain between 1 and 25 transactions.",
        ));
    }
    let mut txs = Vec::new();
    for raw in rawtxs {
        let text = as_str(raw)?;
        txs.push(decode_tx(text).ok_or_else(|| {
            err(
                RPC_DESERIALIZATION_ERROR,
                format!("TX decode failed: {text} Make sure the tx has at least one input."),
            )
        })?);
    }
    let in_mempool: HashSet<Txid> = shared
        .chain
        .mempool()
        .iter()
        .map(Transaction::compute_txid)
        .collect();
    let mut results = Vec::new();
    for tx in &txs {
        let txid = tx.compute_txid();
        let base = Obj::new()
            .put("txid", txid.to_string())
            .put("wtxid", tx.compute_wtxid().to_string());
        let verdict = if in_mempool.contains(&txid) {
            Err((
                "txn-already-in-mempool".to_owned(),
                "txn-already-in-mempool".to_owned(),
            ))
        } else {
            shared
                .chain
                .test_accept(tx)
                .map_err(|reason| (reject_reason_short(&reason), reject_to_rpc(tx, &reason).1))
        };
        let obj = match verdict {
            Ok(fee) => {
                let vsize = tx.vsize() as u64;
                let rate = Amount::from_sat(fee.to_sat().saturating_mul(1000) / vsize.max(1));
                base.put("allowed", true).put("vsize", vsize).raw(
                    "fees",
                    Obj::new()
                        .raw("base", amount(fee))
                        .raw("effective-feerate", amount(rate))
                        .put("effective-includes", [tx.compute_wtxid().to_string()])
                        .to_string(),
                )
            }
            // Core gives no details for missing inputs.
            Err((short, _)) if short == "missing-inputs" => {
                base.put("allowed", false).put("reject-reason", short)
            }
            Err((short, details)) => base
                .put("allowed", false)
                .put("reject-reason", short)
                .put("reject-details", details),
        };
        results.push(obj.to_string());
    }
    Ok(format!("[{}]", results.join(",")))
}

/// `getblockheader <hash> true`.
fn header_json(shared: &Shared, height: u32, header: &Header, n_tx: usize) -> Obj {
    let chain = &shared.chain;
    let mut obj = Obj::new()
        .put("hash", header.block_hash().to_string())
        .put(
            "confirmations",
            i64::from(chain.height()) - i64::from(height) + 1,
        )
        .put("height", height)
        .put("version", header.version.to_consensus())
        .put(
            "versionHex",
            format!("{:08x}", header.version.to_consensus()),
        )
        .put("merkleroot", header.merkle_root.to_string())
        .put("time", header.time)
        .put("mediantime", median_time(shared, height))
        .put("nonce", header.nonce)
        .put("bits", format!("{:08x}", header.bits.to_consensus()))
        .put("target", target_hex(header))
        .raw("difficulty", difficulty(header))
        .put("chainwork", chain_work(shared, height))
        .put("nTx", n_tx);
    if height > 0 {
        obj = obj.put("previousblockhash", header.prev_blockhash.to_string());
    }
    if let Some(next) = chain.hash_at(height + 1) {
        obj = obj.put("nextblockhash", next.to_string());
    }
    obj
}
