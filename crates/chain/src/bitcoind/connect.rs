//! Connecting: the checks that the node can serve lockstep, and the login
//! header.

use std::sync::RwLock;
use std::sync::atomic::AtomicU64;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{
    BitcoindAuth, BitcoindConfig, BitcoindError, BitcoindSource, LOOP_TURNS, Lane, RpcFailure,
};
use crate::core_format::RPC_IN_WARMUP;
use crate::source::SourceError;

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
            #[cfg(feature = "zmq")]
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
        #[cfg(feature = "zmq")]
        {
            source.feed = source
                .config
                .zmq_rawtx
                .clone()
                .map(super::zmq::RawTxFeed::start);
        }
        Ok(source)
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
}

/// The `Authorization` header for `auth`, reading the cookie file.
pub(super) fn authorization(auth: &BitcoindAuth) -> Result<String, BitcoindError> {
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
