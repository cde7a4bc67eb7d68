//! The REST interface, as Core's `src/rest.cpp`: the format from the
//! path's extension, errors as `text/plain` with a trailing `\r\n`, 400
//! for a malformed request and 404 for what the node does not have.

use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, Txid, VarInt};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::answers::{blockchain_info, hex, mempool_info, mempool_txids, mempool_verbose};
use super::{Shared, reply};

/// Core's `MAX_REST_HEADERS_RESULTS`.
const MAX_HEADERS: usize = 2000;

/// The output formats, from the path's extension (Core's `RetFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Undef,
    Bin,
    Hex,
    Json,
}

/// Core's `ParseDataFormat`: the query string is not part of the
/// parameter, and an unknown extension is left in it.
fn parse_format(part: &str) -> (&str, Format) {
    let Some(dot) = part.rfind('.') else {
        return (part, Format::Undef);
    };
    let format = match &part[dot + 1..] {
        "bin" => Format::Bin,
        "hex" => Format::Hex,
        "json" => Format::Json,
        _ => return (part, Format::Undef),
    };
    (&part[..dot], format)
}

/// Core's `RESTERR`.
fn error(status: StatusCode, message: impl AsRef<str>) -> Response<Full<Bytes>> {
    reply(status, "text/plain", format!("{}\r\n", message.as_ref()))
}

fn bad(message: impl AsRef<str>) -> Response<Full<Bytes>> {
    error(StatusCode::BAD_REQUEST, message)
}

fn not_found(message: impl AsRef<str>) -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, message)
}

fn format_not_found(available: &str) -> Response<Full<Bytes>> {
    not_found(format!("output format not found (available: {available})"))
}

const ALL_FORMATS: &str = ".bin, .hex, .json";

/// Core's `ParseHashStr`: 64 hex digits, displayed (reversed) order.
fn parse_hash(s: &str) -> Option<BlockHash> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    s.parse().ok()
}

/// A body in the chosen binary or hex form.
fn bin_or_hex(format: Format, bytes: Vec<u8>, available: &str) -> Response<Full<Bytes>> {
    match format {
        Format::Bin => reply(StatusCode::OK, "application/octet-stream", bytes),
        Format::Hex => reply(StatusCode::OK, "text/plain", format!("{}\n", hex(&bytes))),
        _ => format_not_found(available),
    }
}

fn json_body(value: &impl ToString) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        format!("{}\n", value.to_string()),
    )
}

/// The value of `name` in a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The count of a headers request: from the path (deprecated form) or
/// `?count=` (default 5), checked as Core does.
fn parse_count(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_HEADERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "Header count is invalid or out of acceptable range (1-{MAX_HEADERS}): {raw}"
        )),
    }
}

/// Up to `count` heights of the best chain from the block `hash`: none if
/// the block is not on it (Core answers an empty list, not 404).
fn chain_from(shared: &Shared, hash: &BlockHash, count: usize) -> Vec<u32> {
    let Some(start) = shared.chain.height_of(hash) else {
        return Vec::new();
    };
    let tip = shared.chain.height();
    (start..=tip).take(count).collect()
}

pub(super) fn handle(shared: &Shared, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let (endpoint, rest) = path.split_once('/').unwrap_or((path, ""));
    match endpoint {
        "chaininfo.json" => json_body(&blockchain_info(shared)),
        e if e.starts_with("chaininfo") => format_not_found("json"),
        "blockhashbyheight" => block_hash_by_height(shared, rest),
        "headers" => headers(shared, rest, query),
        "block" => block(shared, rest),
        "blockfilter" => block_filter(shared, rest),
        "blockfilterheaders" => filter_headers(shared, rest, query),
        "mempool" => mempool(shared, rest, query),
        "tx" => tx(shared, rest),
        _ => reply(StatusCode::NOT_FOUND, "text/html", ""),
    }
}

fn block_hash_by_height(shared: &Shared, part: &str) -> Response<Full<Bytes>> {
    let (raw, format) = parse_format(part);
    let Some(height) = raw.parse::<i32>().ok().filter(|h| *h >= 0) else {
        return bad(format!("Invalid height: {raw}"));
    };
    let Some(hash) = shared.chain.hash_at(height as u32) else {
        return not_found("Block height out of range");
    };
    match format {
        Format::Bin => reply(StatusCode::OK, "application/octet-stream", serialize(&hash)),
        Format::Hex => reply(StatusCode::OK, "text/plain", format!("{hash}\n")),
        Format::Json => json_body(&json!({ "blockhash": hash.to_string() })),
        Format::Undef => format_not_found(ALL_FORMATS),
    }
}

fn headers(shared: &Shared, part: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let (param, format) = parse_format(part);
    let parts: Vec<&str> = param.split('/').collect();
    let (raw_count, raw_hash) = match parts.as_slice() {
        [count, hash] => (*count, *hash),
        [hash] => (query_param(query, "count").unwrap_or("5"), *hash),
        _ => {
            return bad("Invalid URI format. Expected /rest/headers/<hash>.<ext>?count=<count>");
        }
    };
    let count = match parse_count(raw_count) {
        Ok(n) => n,
        Err(message) => return bad(message),
    };
    let Some(hash) = parse_hash(raw_hash) else {
        return bad(format!("Invalid hash: {raw_hash}"));
    };
    let mut bytes = Vec::new();
    for height in chain_from(shared, &hash, count) {
        if let Some(header) = shared.header_at(height) {
            bytes.extend(serialize(&header));
        }
    }
    bin_or_hex(format, bytes, ALL_FORMATS)
}

fn block(shared: &Shared, part: &str) -> Response<Full<Bytes>> {
    let (raw_hash, format) = parse_format(part);
    let Some(hash) = parse_hash(raw_hash) else {
        return bad(format!("Invalid hash: {raw_hash}"));
    };
    let Some(block) = shared
        .chain
        .height_of(&hash)
        .and_then(|h| shared.block_at(h))
    else {
        return not_found(format!("{raw_hash} not found"));
    };
    bin_or_hex(format, serialize(&*block), ALL_FORMATS)
}

fn block_filter(shared: &Shared, part: &str) -> Response<Full<Bytes>> {
    let (param, format) = parse_format(part);
    let parts: Vec<&str> = param.split('/').collect();
    let [filter_type, raw_hash] = parts.as_slice() else {
        return bad("Invalid URI format. Expected /rest/blockfilter/<filtertype>/<blockhash>");
    };
    let Some(hash) = parse_hash(raw_hash) else {
        return bad(format!("Invalid hash: {raw_hash}"));
    };
    if *filter_type != "basic" {
        return bad(format!("Unknown filtertype {filter_type}"));
    }
    if !shared.config.filter_index {
        return bad(format!("Index is not enabled for filtertype {filter_type}"));
    }
    let Some(height) = shared.chain.height_of(&hash) else {
        return not_found(format!("{raw_hash} not found"));
    };
    let Some(filter) = shared.filter_at(height) else {
        return not_found("Filter not found.");
    };
    match format {
        Format::Bin | Format::Hex => {
            // Core serialises its BlockFilter: type, block hash, then the
            // encoded filter as a byte vector.
            let mut bytes = vec![0u8];
            bytes.extend(hash.as_byte_array());
            bytes.extend(serialize(&VarInt(filter.len() as u64)));
            bytes.extend(&filter);
            bin_or_hex(format, bytes, ALL_FORMATS)
        }
        Format::Json => json_body(&json!({ "filter": hex(&filter) })),
        Format::Undef => format_not_found(ALL_FORMATS),
    }
}

fn filter_headers(shared: &Shared, part: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let (param, format) = parse_format(part);
    let parts: Vec<&str> = param.split('/').collect();
    let (filter_type, raw_count, raw_hash) = match parts.as_slice() {
        [t, count, hash] => (*t, *count, *hash),
        [t, hash] => (*t, query_param(query, "count").unwrap_or("5"), *hash),
        _ => {
            return bad(
                "Invalid URI format. Expected /rest/blockfilterheaders/<filtertype>/<blockhash>.<ext>?count=<count>",
            );
        }
    };
    let count = match parse_count(raw_count) {
        Ok(n) => n,
        Err(message) => return bad(message),
    };
    let Some(hash) = parse_hash(raw_hash) else {
        return bad(format!("Invalid hash: {raw_hash}"));
    };
    if filter_type != "basic" {
        return bad(format!("Unknown filtertype {filter_type}"));
    }
    if !shared.config.filter_index {
        return bad(format!("Index is not enabled for filtertype {filter_type}"));
    }
    let mut headers = Vec::new();
    for height in chain_from(shared, &hash, count) {
        match shared.chain.filter_header_at(height) {
            Some(header) => headers.push(header),
            None => return not_found("Filter not found."),
        }
    }
    match format {
        Format::Bin | Format::Hex => {
            let bytes: Vec<u8> = headers.iter().flat_map(serialize).collect();
            bin_or_hex(format, bytes, ALL_FORMATS)
        }
        Format::Json => json_body(&serde_json::Value::from(
            headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        )),
        Format::Undef => format_not_found(ALL_FORMATS),
    }
}

fn mempool(shared: &Shared, part: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let (what, format) = parse_format(part);
    if format != Format::Json {
        return format_not_found("json");
    }
    match what {
        "contents" => {
            let verbose = query_param(query, "verbose").unwrap_or("true");
            match verbose {
                "true" => json_body(&mempool_verbose(shared)),
                "false" => json_body(&mempool_txids(shared)),
                _ => bad("The \"verbose\" query parameter must be either \"true\" or \"false\"."),
            }
        }
        "info" => json_body(&mempool_info(shared)),
        _ => bad("Invalid URI format. Expected /rest/mempool/<info|contents>.json"),
    }
}

fn tx(shared: &Shared, part: &str) -> Response<Full<Bytes>> {
    let (raw, format) = parse_format(part);
    let Some(txid) = (raw.len() == 64)
        .then(|| raw.parse::<Txid>().ok())
        .flatten()
    else {
        return bad(format!("Invalid hash: {raw}"));
    };
    let Some(tx) = shared
        .chain
        .mempool()
        .into_iter()
        .find(|t| t.compute_txid() == txid)
    else {
        return not_found(format!("{raw} not found"));
    };
    bin_or_hex(format, serialize(&tx), ALL_FORMATS)
}
