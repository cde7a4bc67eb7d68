//! What can go wrong with the node: [`BitcoindError`] (what the operator
//! must change) and [`RpcFailure`] (one RPC call's failure).

use std::path::PathBuf;

use crate::source::SourceError;

#[cfg(doc)]
use super::BitcoindSource;

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

/// Why one JSON-RPC call ([`BitcoindSource::rpc`]) gave no result.
#[derive(Debug)]
#[non_exhaustive]
pub enum RpcFailure {
    /// HTTP 401, after re-reading the cookie.
    Unauthorized,
    /// The request did not get an answer.
    Source(SourceError),
    /// Core's error object.
    Error {
        /// Core's RPC error code (`src/rpc/protocol.h`).
        code: i64,
        /// Core's message.
        message: String,
    },
}
