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

mod config;
mod connect;
mod error;
mod rest;
mod rpc;
mod source;
#[cfg(feature = "zmq")]
mod zmq;

use std::sync::RwLock;
use std::sync::atomic::AtomicU64;

use bitcoin::Network;

pub use config::{BitcoindAuth, BitcoindConfig};
pub use error::{BitcoindError, RpcFailure};

#[cfg(doc)]
use crate::source::{ChainSource, SourceError};

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
    #[cfg(feature = "zmq")]
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

/// Requests of the loop's own lane (`Lane::Loop`) in flight at once, besides
/// [`BitcoindConfig::max_in_flight`] of the bulk lane.
pub const LOOP_TURNS: usize = 2;

impl BitcoindSource {
    /// Whether reads go through REST (else JSON-RPC).
    pub fn uses_rest(&self) -> bool {
        self.rest
    }

    /// The network the node was checked to be on.
    pub fn network(&self) -> Network {
        self.config.network
    }

    fn lane(&self, lane: Lane) -> &tokio::sync::Semaphore {
        match lane {
            Lane::Bulk => &self.bulk,
            Lane::Loop => &self.loop_turns,
        }
    }
}
