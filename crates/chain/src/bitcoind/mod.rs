//! [`BitcoindSource`]: Bitcoin Core as a [`ChainSource`].
//!
//! Bulk reads go through Core's REST interface (`-rest=1`): headers and
//! filter headers 2,000 per request, blocks and filters as raw bytes, no
//! hex or JSON to decode. Broadcasts go through JSON-RPC
//! (`sendrawtransaction`), which is also the fallback for every read when
//! REST is off (`getblockhash`, `getblockheader`, `getblock`,
//! `getblockfilter`: one request per block). Everything Core answers is
//! checked against what it was asked (hashes, Merkle roots), and data that
//! does not match is [`SourceError::Invalid`], as for SimChain.
//!
//! The HTTP client is `reqwest` over hyper: keep-alive pooling so the
//! manager's concurrent prefetches reuse connections, and a timeout per
//! request. No TLS: Core's RPC/REST port is plain HTTP, on loopback or a
//! LAN.

#[cfg(test)]
mod tests;
mod zmq;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
// reqwest's body type (`bytes::Bytes`), named through hyper.
use base64::Engine;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize, deserialize_partial, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Network, Transaction, Txid, VarInt};
use hyper::body::Bytes;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::simnode::format::{
    RPC_DESERIALIZATION_ERROR, RPC_IN_WARMUP, RPC_INVALID_ADDRESS_OR_KEY, RPC_INVALID_PARAMETER,
    RPC_MISC_ERROR, RPC_VERIFY_ALREADY_IN_CHAIN, RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED,
    rpc_to_reject,
};
use crate::source::{BlockId, BroadcastError, ChainSource, Missing, RejectReason, SourceError};

/// Most headers or filter headers Core's REST interface returns at once
/// (`MAX_REST_HEADERS_RESULTS`).
const REST_MAX_HEADERS: u32 = 2000;

/// How lockstep logs in to the node's RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitcoindAuth {
    /// Core's cookie file (`<datadir>/<network>/.cookie`), re-read when the
    /// node refuses it (a restarted node writes a new one).
    Cookie(PathBuf),
    /// `-rpcuser`/`-rpcpassword` (or an `-rpcauth` entry's user).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

/// Where the node is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitcoindConfig {
    /// The node's RPC URL, e.g. `http://127.0.0.1:18443` (REST is served
    /// on the same port).
    pub url: String,
    /// How to log in to the RPC.
    pub auth: BitcoindAuth,
    /// The network the wallets are on; a node on another is refused.
    pub network: Network,
    /// How long one request may take before it is a
    /// [`SourceError::Timeout`] (a 4 MB block over a LAN takes well under
    /// a second; the default is 30 s).
    pub timeout: Duration,
    /// Most idle keep-alive connections kept to the node; never fewer
    /// than [`max_in_flight`](Self::max_in_flight), whatever this says. A
    /// pool keeping fewer idle than can be in flight closes connections
    /// after every burst of the manager's prefetch and opens them again in
    /// the next (each a TCP handshake, a task on both sides and a
    /// teardown: 16 idle against 32 in flight opened 16 a burst). The
    /// default keeps twice as many: a connection goes back to the pool a
    /// moment after its request's turn ends, so the next request may open
    /// another (the sync benchmark's 256 in flight opened up to 470 in one
    /// sync), and those are then kept for reuse too.
    pub max_idle_connections: usize,
    /// Most bulk requests (filters, blocks, filter headers in bulk,
    /// mempool transactions) in flight to the node at once; more wait for
    /// a turn. The loop's own requests (headers, the tip, the mempool's
    /// txids, a broadcast) have [`LOOP_TURNS`] more turns of their own,
    /// so that they never wait behind the prefetch. Bitcoin Core queues
    /// at most `-rpcworkqueue` requests (64 by default in recent versions,
    /// 16 in older ones) and answers HTTP 503 "Work queue depth exceeded"
    /// past that, REST included, so the manager's deep prefetch (256) must
    /// not reach the node as is. The default, 32 (34 with the loop's),
    /// leaves about half the default queue to the node's other clients.
    pub max_in_flight: usize,
    /// The node's ZMQ `rawtx` endpoint (its `-zmqpubrawtx=`, e.g.
    /// `tcp://127.0.0.1:28332`), if the operator enabled it: new
    /// transactions then wake the manager's mempool poll at once, and come
    /// with the notification. `None`: the mempool is polled on the
    /// manager's schedule only (its `mempool_poll_interval`, and after
    /// each new block).
    pub zmq_rawtx: Option<String>,
}

impl BitcoindConfig {
    /// A node at `url` on `network`, with the default timeout (30 s),
    /// requests in flight (32) and idle connections kept (64).
    pub fn new(url: impl Into<String>, auth: BitcoindAuth, network: Network) -> BitcoindConfig {
        BitcoindConfig {
            url: url.into(),
            auth,
            network,
            timeout: Duration::from_secs(30),
            max_idle_connections: 64,
            max_in_flight: 32,
            zmq_rawtx: None,
        }
    }

    /// Subscribes to the node's ZMQ `rawtx` notifications at `endpoint`
    /// (see [`BitcoindConfig::zmq_rawtx`]).
    pub fn with_zmq_rawtx(mut self, endpoint: impl Into<String>) -> BitcoindConfig {
        self.zmq_rawtx = Some(endpoint.into());
        self
    }
}

/// Why lockstep cannot use the node: each says what the operator must
/// change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitcoindError {
    /// The node cannot be reached, or answered in a way that retrying may
    /// fix (connection refused, timeout, warming up).
    #[error("cannot reach Bitcoin Core at {url}: {source}")]
    Unreachable {
        /// The node's URL.
        url: String,
        /// What happened.
        source: SourceError,
    },
    /// The cookie file cannot be read.
    #[error(
        "cannot read Bitcoin Core's cookie file {path}: {reason}; point lockstep at the \
         .cookie in the node's data directory for this network (e.g. <datadir>/regtest/.cookie) \
         and let lockstep's user read it, or configure a user and password (-rpcuser/-rpcpassword)"
    )]
    CookieUnreadable {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The node refused the credentials (HTTP 401).
    #[error(
        "Bitcoin Core at {url} refused the RPC credentials (HTTP 401): check the user and \
         password against the node's -rpcuser/-rpcpassword/-rpcauth, or the cookie path \
         (the node writes a new cookie each time it starts)"
    )]
    Unauthorized {
        /// The node's URL.
        url: String,
    },
    /// The node is on another network than the wallets.
    #[error(
        "Bitcoin Core at {url} is on {node}, the wallets are on {expected}: point lockstep at a \
         node started with -chain={expected}"
    )]
    WrongNetwork {
        /// The node's URL.
        url: String,
        /// What the node says (`getblockchaininfo`'s `chain`).
        node: String,
        /// What the wallets need (Core's name).
        expected: &'static str,
    },
    /// The node is still catching up with the network.
    #[error(
        "Bitcoin Core at {url} is in initial block download ({blocks} of {headers} blocks): \
         wait until it has synced (getblockchaininfo's initialblockdownload turns false)"
    )]
    InitialBlockDownload {
        /// The node's URL.
        url: String,
        /// Blocks it has validated.
        blocks: u64,
        /// Headers it knows.
        headers: u64,
    },
    /// The node has no basic block filter index.
    #[error(
        "Bitcoin Core at {url} has no basic block filter index: restart it with \
         -blockfilterindex=1 (it builds the index in the background, then serves filters)"
    )]
    NoFilterIndex {
        /// The node's URL.
        url: String,
    },
    /// The node answered something Core would not.
    #[error("Bitcoin Core at {url} answered {what} unexpectedly: {reason}")]
    Unexpected {
        /// The node's URL.
        url: String,
        /// The request.
        what: String,
        /// What was wrong.
        reason: String,
    },
}

impl From<BitcoindError> for SourceError {
    fn from(e: BitcoindError) -> SourceError {
        match e {
            BitcoindError::Unreachable { source, .. } => source,
            BitcoindError::Unexpected { .. } => SourceError::Unavailable {
                reason: e.to_string(),
            },
            other => SourceError::Misconfigured {
                reason: other.to_string(),
            },
        }
    }
}

/// What one RPC call gave besides a result.
#[derive(Debug)]
enum RpcFailure {
    /// HTTP 401, after re-reading the cookie.
    Unauthorized,
    /// The request did not get an answer.
    Source(SourceError),
    /// Core's error object.
    Error { code: i64, message: String },
}

/// Bitcoin Core as a [`ChainSource`]; see the module documentation.
///
/// Cheap to share: one instance holds one connection pool, and every
/// method may be called concurrently.
#[derive(Debug)]
pub struct BitcoindSource {
    http: reqwest::Client,
    /// The URL without a trailing slash.
    url: String,
    config: BitcoindConfig,
    /// The `Authorization` header value (replaced when the cookie changes).
    authorization: RwLock<String>,
    rest: bool,
    next_id: AtomicU64,
    /// The ZMQ `rawtx` subscription, when configured.
    feed: Option<zmq::RawTxFeed>,
    /// Turns for the prefetch's requests in flight
    /// ([`BitcoindConfig::max_in_flight`]).
    bulk: tokio::sync::Semaphore,
    /// Turns for the loop's own requests ([`LOOP_TURNS`]).
    loop_turns: tokio::sync::Semaphore,
}

/// Which turns a request waits for. The manager's prefetch keeps hundreds
/// of filter and block requests waiting for turns; the loop's own requests
/// (headers, the tip, a single filter header, the mempool, a broadcast)
/// are few, and the loop waits on each: behind the prefetch's queue, one
/// header request at the end of a sync waited 10-28 ms, the loop stalled
/// meanwhile (the HTTP sync benchmark, 10 wallets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Filters, blocks, filter headers in bulk, mempool transactions.
    Bulk,
    /// Everything else.
    Loop,
}

/// Requests of [`Lane::Loop`] in flight at once, besides
/// [`BitcoindConfig::max_in_flight`] of the bulk lane.
pub const LOOP_TURNS: usize = 2;

impl BitcoindSource {
    /// Connects to the node and checks that lockstep can use it: the
    /// credentials, the network, that it is not in initial block download,
    /// that it has the basic filter index, and whether REST is on (without
    /// REST every read falls back to JSON-RPC, one request per block).
    pub async fn connect(config: BitcoindConfig) -> Result<BitcoindSource, BitcoindError> {
        let url = config.url.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(
                config
                    .max_idle_connections
                    .max(config.max_in_flight.max(1) + LOOP_TURNS),
            )
            .build()
            .map_err(|e| BitcoindError::Unexpected {
                url: url.clone(),
                what: "the HTTP client".to_owned(),
                reason: e.to_string(),
            })?;
        let authorization = RwLock::new(authorization(&config.auth)?);
        let bulk = tokio::sync::Semaphore::new(config.max_in_flight.max(1));
        let loop_turns = tokio::sync::Semaphore::new(LOOP_TURNS);
        let mut source = BitcoindSource {
            http,
            url,
            config,
            authorization,
            rest: false,
            next_id: AtomicU64::new(0),
            feed: None,
            bulk,
            loop_turns,
        };
        let info = source
            .checked_call(Lane::Loop, "getblockchaininfo", json!([]))
            .await?;
        let unexpected = |reason: &str| BitcoindError::Unexpected {
            url: source.url.clone(),
            what: "getblockchaininfo".to_owned(),
            reason: reason.to_owned(),
        };
        let chain = info["chain"]
            .as_str()
            .ok_or_else(|| unexpected("no chain"))?;
        let expected = source.config.network.to_core_arg();
        if chain != expected {
            return Err(BitcoindError::WrongNetwork {
                url: source.url.clone(),
                node: chain.to_owned(),
                expected,
            });
        }
        if info["initialblockdownload"].as_bool() == Some(true) {
            return Err(BitcoindError::InitialBlockDownload {
                url: source.url.clone(),
                blocks: info["blocks"].as_u64().unwrap_or(0),
                headers: info["headers"].as_u64().unwrap_or(0),
            });
        }
        // The filter index, on the genesis block (indexed first).
        let genesis = source
            .checked_call(Lane::Loop, "getblockhash", json!([0]))
            .await?;
        match source
            .call(Lane::Loop, "getblockfilter", json!([genesis, "basic"]))
            .await
        {
            Ok(_) => {}
            Err(RpcFailure::Error { message, .. })
                if message.starts_with("Index is not enabled") =>
            {
                return Err(BitcoindError::NoFilterIndex {
                    url: source.url.clone(),
                });
            }
            Err(e) => return Err(source.connect_error("getblockfilter", e)),
        }
        // REST: Core answers 404 for every /rest/ path without -rest.
        source.rest = match source.rest_get(Lane::Loop, "chaininfo.json").await {
            Ok((StatusCode::OK, _)) => true,
            Ok((StatusCode::NOT_FOUND, _)) => {
                tracing::warn!(
                    url = %source.url,
                    "Bitcoin Core's REST interface is off: reading through JSON-RPC, one request \
                     per block; start the node with -rest=1 for faster syncing"
                );
                false
            }
            Ok((status, body)) => {
                return Err(BitcoindError::Unexpected {
                    url: source.url.clone(),
                    what: "/rest/chaininfo.json".to_owned(),
                    reason: format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                });
            }
            Err(source_error) => {
                return Err(BitcoindError::Unreachable {
                    url: source.url.clone(),
                    source: source_error,
                });
            }
        };
        source.feed = source.config.zmq_rawtx.clone().map(zmq::RawTxFeed::start);
        Ok(source)
    }

    /// Whether reads go through REST (else JSON-RPC).
    pub fn uses_rest(&self) -> bool {
        self.rest
    }

    /// The network the node was checked to be on.
    pub fn network(&self) -> Network {
        self.config.network
    }

    fn connect_error(&self, what: &str, e: RpcFailure) -> BitcoindError {
        match e {
            RpcFailure::Unauthorized => BitcoindError::Unauthorized {
                url: self.url.clone(),
            },
            RpcFailure::Source(source) => BitcoindError::Unreachable {
                url: self.url.clone(),
                source,
            },
            RpcFailure::Error { code, message } if code == RPC_IN_WARMUP => {
                BitcoindError::Unreachable {
                    url: self.url.clone(),
                    source: SourceError::Unavailable {
                        reason: format!("the node is starting: {message}"),
                    },
                }
            }
            RpcFailure::Error { code, message } => BitcoindError::Unexpected {
                url: self.url.clone(),
                what: what.to_owned(),
                reason: format!("RPC error {code}: {message}"),
            },
        }
    }

    async fn checked_call(
        &self,
        lane: Lane,
        method: &str,
        params: Value,
    ) -> Result<Value, BitcoindError> {
        self.call(lane, method, params)
            .await
            .map_err(|e| self.connect_error(method, e))
    }

    /// A `reqwest` failure as a retryable [`SourceError`].
    fn transport_error(&self, e: reqwest::Error) -> SourceError {
        if e.is_timeout() {
            SourceError::Timeout {
                after_ms: u64::try_from(self.config.timeout.as_millis()).unwrap_or(u64::MAX),
            }
        } else {
            SourceError::Unavailable {
                reason: format!("{}: {e}", self.url),
            }
        }
    }

    /// One JSON-RPC call. On HTTP 401 with cookie authentication the
    /// cookie is read again and the call repeated once: a restarted node
    /// has a new cookie.
    async fn call(&self, lane: Lane, method: &str, params: Value) -> Result<Value, RpcFailure> {
        match self.call_once(lane, method, &params).await {
            Err(RpcFailure::Unauthorized)
                if matches!(self.config.auth, BitcoindAuth::Cookie(_)) =>
            {
                let fresh =
                    authorization(&self.config.auth).map_err(|_| RpcFailure::Unauthorized)?;
                if let Ok(mut current) = self.authorization.write() {
                    *current = fresh;
                }
                self.call_once(lane, method, &params).await
            }
            other => other,
        }
    }

    async fn call_once(
        &self,
        lane: Lane,
        method: &str,
        params: &Value,
    ) -> Result<Value, RpcFailure> {
        // Never closed: the semaphores live as long as `self`.
        let _turn = self.lane(lane).acquire().await.ok();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "1.0", "id": id, "method": method, "params": params});
        let authorization = self
            .authorization
            .read()
            .map(|a| a.clone())
            .unwrap_or_default();
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .json(&body)
            .send()
            .await
            .map_err(|e| RpcFailure::Source(self.transport_error(e)))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(RpcFailure::Unauthorized);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| RpcFailure::Source(self.transport_error(e)))?;
        let reply: Value = serde_json::from_slice(&bytes).map_err(|_| {
            RpcFailure::Source(SourceError::Unavailable {
                reason: format!(
                    "{method}: HTTP {status} without a JSON-RPC reply: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            })
        })?;
        match reply.get("error") {
            Some(error) if !error.is_null() => Err(RpcFailure::Error {
                code: error["code"].as_i64().unwrap_or(0),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            }),
            _ => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// An RPC call for a read: Core's errors as [`SourceError`]s, with
    /// "not found" answers (`-5`, `-8`) as [`SourceError::NotFound`] of
    /// `missing`.
    async fn read_call(
        &self,
        lane: Lane,
        method: &str,
        params: Value,
        missing: Missing,
    ) -> Result<Value, SourceError> {
        match self.call(lane, method, params).await {
            Ok(value) => Ok(value),
            Err(RpcFailure::Source(e)) => Err(e),
            Err(RpcFailure::Unauthorized) => Err(BitcoindError::Unauthorized {
                url: self.url.clone(),
            }
            .into()),
            Err(RpcFailure::Error { code, .. })
                if code == RPC_INVALID_ADDRESS_OR_KEY || code == RPC_INVALID_PARAMETER =>
            {
                Err(SourceError::NotFound(missing))
            }
            Err(RpcFailure::Error { code, message })
                if code == RPC_MISC_ERROR && message.starts_with("Index is not enabled") =>
            {
                Err(BitcoindError::NoFilterIndex {
                    url: self.url.clone(),
                }
                .into())
            }
            Err(RpcFailure::Error { code, message }) => Err(SourceError::Unavailable {
                reason: format!("{method}: RPC error {code}: {message}"),
            }),
        }
    }

    /// A REST GET of `/rest/<path>`: the status and body.
    async fn rest_get(&self, lane: Lane, path: &str) -> Result<(StatusCode, Bytes), SourceError> {
        // Never closed: the semaphores live as long as `self`.
        let _turn = self.lane(lane).acquire().await.ok();
        let response = self
            .http
            .get(format!("{}/rest/{path}", self.url))
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok((status, body))
    }

    /// A REST read whose 200 body is returned; 404 is `missing` not found,
    /// 400 about the filter index a configuration error, anything else
    /// unavailable.
    async fn rest_read(
        &self,
        lane: Lane,
        path: &str,
        missing: Missing,
    ) -> Result<Bytes, SourceError> {
        let (status, body) = self.rest_get(lane, path).await?;
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::NOT_FOUND => Err(SourceError::NotFound(missing)),
            StatusCode::BAD_REQUEST if body.starts_with(b"Index is not enabled") => {
                Err(BitcoindError::NoFilterIndex {
                    url: self.url.clone(),
                }
                .into())
            }
            _ => Err(SourceError::Unavailable {
                reason: format!(
                    "/rest/{path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim_end()
                ),
            }),
        }
    }

    /// A block's filter header through `getblockfilter` (no REST).
    async fn rpc_filter_header(
        &self,
        lane: Lane,
        hash: BlockHash,
    ) -> Result<FilterHeader, SourceError> {
        let what = Missing::FilterHeader(hash);
        let value = self
            .read_call(
                lane,
                "getblockfilter",
                json!([hash.to_string(), "basic"]),
                what,
            )
            .await?;
        value["header"]
            .as_str()
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| invalid(what, format!("not a filter header: {value}")))
    }

    fn lane(&self, lane: Lane) -> &tokio::sync::Semaphore {
        match lane {
            Lane::Bulk => &self.bulk,
            Lane::Loop => &self.loop_turns,
        }
    }

    fn hex_result(value: &Value, what: Missing) -> Result<Vec<u8>, SourceError> {
        value
            .as_str()
            .and_then(decode_hex)
            .ok_or_else(|| SourceError::Invalid {
                what,
                reason: format!("expected a hex string, got {value}"),
            })
    }
}

/// The `Authorization` header for `auth`, reading the cookie file.
fn authorization(auth: &BitcoindAuth) -> Result<String, BitcoindError> {
    let user_password = match auth {
        BitcoindAuth::UserPassword { user, password } => format!("{user}:{password}"),
        BitcoindAuth::Cookie(path) => {
            let unreadable = |reason: String| BitcoindError::CookieUnreadable {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
            let line = text.trim();
            if !line.contains(':') {
                return Err(unreadable(
                    "it does not hold `user:password` as Core writes it".to_owned(),
                ));
            }
            line.to_owned()
        }
    };
    Ok(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    ))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn invalid(what: Missing, reason: impl std::fmt::Display) -> SourceError {
    SourceError::Invalid {
        what,
        reason: reason.to_string(),
    }
}

/// A block's header and transactions checked against the hash asked for:
/// the header hashes to it and the transactions to its Merkle root (and,
/// with witnesses, to the coinbase's witness commitment).
fn check_block(block: &Block, hash: BlockHash) -> Result<(), SourceError> {
    let what = Missing::Block(hash);
    if block.block_hash() != hash {
        return Err(invalid(what, "the block has another hash"));
    }
    if let Err(reason) = crate::block_checks::check_merkle_root(block) {
        return Err(invalid(what, reason));
    }
    if !crate::block_checks::check_witness_commitment(block) {
        return Err(invalid(what, "the witnesses do not match the commitment"));
    }
    Ok(())
}

/// Core's serialised `BlockFilter` (REST `blockfilter/basic/<hash>.bin`):
/// the filter type, the block hash, the encoded filter as a byte vector.
fn parse_rest_filter(bytes: &[u8], hash: BlockHash) -> Result<Vec<u8>, SourceError> {
    let what = Missing::Filter(hash);
    let (&kind, rest) = bytes
        .split_first()
        .ok_or_else(|| invalid(what, "empty answer"))?;
    if kind != 0 {
        return Err(invalid(what, format!("filter type {kind}, not basic (0)")));
    }
    if rest.len() < 32 || rest[..32] != *hash.as_byte_array() {
        return Err(invalid(what, "the filter is for another block"));
    }
    let (len, used): (VarInt, usize) =
        deserialize_partial(&rest[32..]).map_err(|e| invalid(what, e))?;
    let filter = &rest[32 + used..];
    if filter.len() as u64 != len.0 {
        return Err(invalid(
            what,
            format!("{} filter bytes, {} announced", filter.len(), len.0),
        ));
    }
    Ok(filter.to_vec())
}

#[async_trait]
impl ChainSource for BitcoindSource {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        let info: Value = if self.rest {
            let body = self
                .rest_read(Lane::Loop, "chaininfo.json", Missing::Height(0))
                .await?;
            serde_json::from_slice(&body).map_err(|e| SourceError::Unavailable {
                reason: format!("/rest/chaininfo.json: {e}"),
            })?
        } else {
            self.read_call(
                Lane::Loop,
                "getblockchaininfo",
                json!([]),
                Missing::Height(0),
            )
            .await?
        };
        let height = info["blocks"].as_u64().and_then(|h| u32::try_from(h).ok());
        let hash = info["bestblockhash"]
            .as_str()
            .and_then(|h| h.parse::<BlockHash>().ok());
        match (height, hash) {
            (Some(height), Some(hash)) => Ok(BlockId { height, hash }),
            _ => Err(SourceError::Unavailable {
                reason: format!("getblockchaininfo without blocks and bestblockhash: {info}"),
            }),
        }
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        let what = Missing::Height(height);
        if self.rest {
            let body = self
                .rest_read(Lane::Loop, &format!("blockhashbyheight/{height}.bin"), what)
                .await?;
            deserialize(&body).map_err(|e| invalid(what, e))
        } else {
            let value = self
                .read_call(Lane::Loop, "getblockhash", json!([height]), what)
                .await?;
            value
                .as_str()
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| invalid(what, format!("not a block hash: {value}")))
        }
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        let what = Missing::Header(hash);
        let bytes = if self.rest {
            let body = self
                .rest_read(Lane::Loop, &format!("headers/1/{hash}.bin"), what)
                .await?;
            if body.is_empty() {
                // Core answers an unknown block with no headers.
                return Err(SourceError::NotFound(what));
            }
            body.to_vec()
        } else {
            let value = self
                .read_call(
                    Lane::Loop,
                    "getblockheader",
                    json!([hash.to_string(), false]),
                    what,
                )
                .await?;
            Self::hex_result(&value, what)?
        };
        let header: Header = deserialize(&bytes).map_err(|e| invalid(what, e))?;
        if header.block_hash() != hash {
            return Err(invalid(what, "the header has another hash"));
        }
        Ok(header)
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        let what = Missing::Filter(hash);
        if self.rest {
            let body = self
                .rest_read(Lane::Bulk, &format!("blockfilter/basic/{hash}.bin"), what)
                .await?;
            parse_rest_filter(&body, hash)
        } else {
            let value = self
                .read_call(
                    Lane::Bulk,
                    "getblockfilter",
                    json!([hash.to_string(), "basic"]),
                    what,
                )
                .await?;
            Self::hex_result(&value["filter"], what)
        }
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        let what = Missing::FilterHeader(hash);
        if self.rest {
            let body = self
                .rest_read(
                    Lane::Loop,
                    &format!("blockfilterheaders/basic/1/{hash}.bin"),
                    what,
                )
                .await?;
            if body.is_empty() {
                return Err(SourceError::NotFound(what));
            }
            deserialize(&body).map_err(|e| invalid(what, e))
        } else {
            self.rpc_filter_header(Lane::Loop, hash).await
        }
    }

    /// Through REST, 2,000 per request: Core walks its best chain from
    /// the first block, so the chunk's last block is then checked to be
    /// on the best chain at its height (if it is, the whole chunk is,
    /// being consecutive); without REST, one `getblockfilter` per block.
    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        if !self.rest {
            // One `getblockfilter` per block, in the prefetch's lane.
            let mut out = Vec::with_capacity(blocks.len());
            for block in blocks {
                out.push(self.rpc_filter_header(Lane::Bulk, block.hash).await?);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(REST_MAX_HEADERS as usize) {
            let (first, last) = match (chunk.first(), chunk.last()) {
                (Some(first), Some(last)) => (first, last),
                _ => continue,
            };
            let what = Missing::FilterHeader(first.hash);
            let body = self
                .rest_read(
                    Lane::Bulk,
                    &format!(
                        "blockfilterheaders/basic/{}/{}.bin",
                        chunk.len(),
                        first.hash
                    ),
                    what,
                )
                .await?;
            if body.len() % 32 != 0 {
                return Err(invalid(what, format!("{} bytes, not 32 each", body.len())));
            }
            let got: Vec<FilterHeader> = body
                .chunks(32)
                .map(deserialize)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(what, e))?;
            if got.len() < chunk.len() {
                // The best chain no longer reaches that far from `first`
                // (or no longer holds it).
                let gone = chunk[got.len()].hash;
                return Err(SourceError::NotFound(Missing::FilterHeader(gone)));
            }
            if got.len() > chunk.len() {
                return Err(invalid(what, "more filter headers than asked for"));
            }
            match self.block_hash(last.height).await {
                Ok(hash) if hash == last.hash => {}
                Ok(_) | Err(SourceError::NotFound(_)) => {
                    return Err(SourceError::NotFound(Missing::FilterHeader(last.hash)));
                }
                Err(e) => return Err(e),
            }
            out.extend(got);
        }
        Ok(out)
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        let what = Missing::Block(hash);
        let bytes = if self.rest {
            self.rest_read(Lane::Bulk, &format!("block/{hash}.bin"), what)
                .await?
                .to_vec()
        } else {
            let value = self
                .read_call(Lane::Bulk, "getblock", json!([hash.to_string(), 0]), what)
                .await?;
            Self::hex_result(&value, what)?
        };
        let block: Block = deserialize(&bytes).map_err(|e| invalid(what, e))?;
        check_block(&block, hash)?;
        Ok(Arc::new(block))
    }

    /// Through REST, the hash at `from`, then 2,000 headers per request
    /// along the best chain from it; without REST, one request per height.
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        if !self.rest {
            let mut out = Vec::with_capacity(count as usize);
            for height in from..from.saturating_add(count) {
                let hash = match self.block_hash(height).await {
                    Ok(hash) => hash,
                    Err(SourceError::NotFound(_)) if height > from => break,
                    Err(e) => return Err(e),
                };
                out.push(self.header(hash).await?);
            }
            return Ok(out);
        }
        let mut out: Vec<Header> = Vec::with_capacity(count as usize);
        let mut next = self.block_hash(from).await?;
        while (out.len() as u32) < count {
            let want = (count - out.len() as u32).min(REST_MAX_HEADERS);
            let what = Missing::Header(next);
            let body = self
                .rest_read(Lane::Loop, &format!("headers/{want}/{next}.bin"), what)
                .await?;
            if body.len() % 80 != 0 || body.len() / 80 > want as usize {
                return Err(invalid(what, format!("{} bytes of headers", body.len())));
            }
            let got: Vec<Header> = body
                .chunks(80)
                .map(deserialize)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(what, e))?;
            match got.first() {
                // A reorg took `next` off the best chain between requests.
                None if out.is_empty() => return Err(SourceError::NotFound(what)),
                None => break,
                Some(first) if first.block_hash() != next => {
                    return Err(invalid(what, "the first header has another hash"));
                }
                Some(_) => {}
            }
            let reached_tip = (got.len() as u32) < want;
            out.extend(got);
            if reached_tip {
                break;
            }
            // Core starts from a hash: the next request needs the one above
            // the last header received.
            match self.block_hash(from + out.len() as u32).await {
                Ok(hash) => next = hash,
                Err(SourceError::NotFound(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// REST `mempool/contents.json?verbose=false` (Core 25 and later), or
    /// `getrawmempool`: the txids only, so that a poll costs 65 bytes per
    /// mempool transaction and the manager fetches only the new ones.
    async fn mempool_txids(&self) -> Result<Option<Vec<Txid>>, SourceError> {
        let what = Missing::Transaction(Txid::all_zeros());
        let value: Value = if self.rest {
            let body = self
                .rest_read(Lane::Loop, "mempool/contents.json?verbose=false", what)
                .await?;
            serde_json::from_slice(&body)
                .map_err(|e| invalid(what, format!("mempool contents: {e}")))?
        } else {
            self.read_call(Lane::Loop, "getrawmempool", json!([false]), what)
                .await?
        };
        let list = value
            .as_array()
            .ok_or_else(|| invalid(what, format!("expected a list of txids, got {value}")))?;
        list.iter()
            .map(|t| {
                t.as_str()
                    .and_then(|t| t.parse::<Txid>().ok())
                    .ok_or_else(|| invalid(what, format!("not a txid: {t}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// With ZMQ `rawtx` configured, resolves as soon as a transaction is
    /// published; otherwise never.
    async fn mempool_news(&self, seen: u64) -> u64 {
        match &self.feed {
            Some(feed) => feed.news(seen).await,
            None => std::future::pending().await,
        }
    }

    /// REST `tx/<txid>.bin`, or `getrawtransaction`: Core finds a mempool
    /// transaction without `-txindex`; one that left the mempool is
    /// not found.
    async fn mempool_tx(&self, txid: Txid) -> Result<Transaction, SourceError> {
        if let Some(tx) = self.feed.as_ref().and_then(|feed| feed.take(&txid)) {
            return Ok(tx);
        }
        let what = Missing::Transaction(txid);
        let bytes = if self.rest {
            self.rest_read(Lane::Bulk, &format!("tx/{txid}.bin"), what)
                .await?
                .to_vec()
        } else {
            let value = self
                .read_call(
                    Lane::Bulk,
                    "getrawtransaction",
                    json!([txid.to_string()]),
                    what,
                )
                .await?;
            Self::hex_result(&value, what)?
        };
        let tx: Transaction = deserialize(&bytes).map_err(|e| invalid(what, e))?;
        if tx.compute_txid() != txid {
            return Err(invalid(what, "the transaction has another txid"));
        }
        Ok(tx)
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let txid = tx.compute_txid();
        let raw: String = serialize(tx).iter().map(|b| format!("{b:02x}")).collect();
        match self
            .call(Lane::Loop, "sendrawtransaction", json!([raw]))
            .await
        {
            Ok(value) => match value.as_str().and_then(|t| t.parse::<Txid>().ok()) {
                Some(answered) if answered == txid => Ok(txid),
                _ => Err(SourceError::Unavailable {
                    reason: format!("sendrawtransaction answered {value} for {txid}"),
                }
                .into()),
            },
            Err(RpcFailure::Error { code, message })
                if code == RPC_VERIFY_ERROR
                    || code == RPC_VERIFY_REJECTED
                    || code == RPC_VERIFY_ALREADY_IN_CHAIN =>
            {
                Err(BroadcastError::Rejected {
                    txid,
                    reason: rpc_to_reject(tx, code, &message),
                })
            }
            Err(RpcFailure::Error { code, message }) if code == RPC_DESERIALIZATION_ERROR => {
                Err(BroadcastError::Rejected {
                    txid,
                    reason: RejectReason::Other(message),
                })
            }
            Err(RpcFailure::Error { code, message }) => Err(SourceError::Unavailable {
                reason: format!("sendrawtransaction: RPC error {code}: {message}"),
            }
            .into()),
            Err(RpcFailure::Unauthorized) => Err(SourceError::from(BitcoindError::Unauthorized {
                url: self.url.clone(),
            })
            .into()),
            Err(RpcFailure::Source(e)) => Err(e.into()),
        }
    }
}
