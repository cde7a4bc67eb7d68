//! The JSON-RPC transport: one call, the cookie re-read on a refusal, and
//! Core's errors as [`SourceError`]s for reads.

use std::sync::atomic::Ordering;

use bitcoin::BlockHash;
use bitcoin::bip158::FilterHeader;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::connect::authorization;
use super::{BitcoindAuth, BitcoindError, BitcoindSource, Lane, RpcFailure};
use crate::core_format::{RPC_INVALID_ADDRESS_OR_KEY, RPC_INVALID_PARAMETER, RPC_MISC_ERROR};
use crate::source::invalid;
use crate::source::{Missing, SourceError};

#[cfg(doc)]
use crate::source::ChainSource;

impl BitcoindSource {
    /// One JSON-RPC call of any `method`, on the loop's turns and with the
    /// source's credentials (a refused cookie is read again, once): for
    /// what [`ChainSource`] does not cover, such as `getnetworkinfo`.
    pub async fn rpc(&self, method: &str, params: Value) -> Result<Value, RpcFailure> {
        self.call(Lane::Loop, method, params).await
    }

    /// A `reqwest` failure as a retryable [`SourceError`].
    pub(super) fn transport_error(&self, e: reqwest::Error) -> SourceError {
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
    pub(super) async fn call(
        &self,
        lane: Lane,
        method: &str,
        params: Value,
    ) -> Result<Value, RpcFailure> {
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
    pub(super) async fn read_call(
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

    /// A block's filter header through `getblockfilter` (no REST).
    pub(super) async fn rpc_filter_header(
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

    pub(super) fn hex_result(value: &Value, what: Missing) -> Result<Vec<u8>, SourceError> {
        value
            .as_str()
            .and_then(decode_hex)
            .ok_or_else(|| SourceError::Invalid {
                what,
                reason: format!("expected a hex string, got {value}"),
            })
    }
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
