//! [`BitcoindSource`]'s [`ChainSource`] implementation: each read through
//! REST when the node serves it, else JSON-RPC, checked against what was
//! asked.

use std::sync::Arc;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use serde_json::{Value, json};

use super::rest::REST_MAX_HEADERS;
use super::{BitcoindError, BitcoindSource, Lane, RpcFailure};
use crate::block_checks::check_block;
use crate::core_format::{
    RPC_DESERIALIZATION_ERROR, RPC_VERIFY_ALREADY_IN_CHAIN, RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED,
    parse_rest_filter, rpc_to_reject,
};
use crate::source::{
    BlockId, BroadcastError, ChainSource, Missing, RejectReason, SourceError, invalid,
};

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
    /// published; otherwise never (and without the `zmq` feature, the
    /// trait's default, never, is kept).
    #[cfg(feature = "zmq")]
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
        #[cfg(feature = "zmq")]
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
