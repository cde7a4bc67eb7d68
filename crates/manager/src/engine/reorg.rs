//! Following reorgs: finding the fork below the loop's tip, weighing the
//! source's branch's work against the loop's, waiting for a source that
//! lags, and disconnecting every wallet above the fork in one transaction.

use bitcoin::BlockHash;
use bitcoin::hashes::Hash as _;
use bitcoin::pow::Work;
use lockstep_chain::{BlockId, SourceError};

use super::{Engine, Tip};
use crate::events::Counters;
use crate::pipeline::timed;
use crate::pow::{no_work, work_of};
use crate::{Event, ManagerError};

impl Engine {
    /// Whether the source's best chain, from the fork below the loop's tip
    /// to `best`, has more work than the loop's own blocks above the fork.
    /// Every header of the source's branch is checked for proof of work on
    /// the way; a branch that changes while it is read is "not more".
    async fn source_has_more_work(
        &self,
        fork: u32,
        fork_hash: BlockHash,
        best: BlockId,
    ) -> Result<bool, ManagerError> {
        let ours = self
            .recent
            .range(fork + 1..)
            .fold(no_work(), |work, (_, (_, bits))| work + work_of(*bits));
        let mut theirs: Work = no_work();
        let mut pow = self.header_chain(fork, fork_hash).await?;
        let (mut next, mut prev) = (fork + 1, fork_hash);
        while next <= best.height && theirs <= ours {
            let count = (best.height - next + 1).min(self.config.header_batch.max(1));
            let headers = match timed(&self.policy(), || self.source.headers(next, count)).await {
                Ok(headers) => headers,
                Err(SourceError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            };
            if headers.is_empty() {
                break;
            }
            for header in headers {
                if header.prev_blockhash != prev {
                    return Ok(false);
                }
                let hash = header.block_hash();
                pow.connect(next, &header, hash)
                    .map_err(|reason| ManagerError::BadHeader {
                        height: next,
                        hash,
                        reason,
                    })?;
                theirs = theirs + header.work();
                (next, prev) = (next + 1, hash);
            }
        }
        Ok(theirs > ours)
    }

    /// The highest of `blocks` (given highest first) still on the source's
    /// best chain: a fork point.
    pub(super) async fn highest_on_chain(
        &self,
        blocks: impl Iterator<Item = (u32, BlockHash)>,
    ) -> Result<Option<(u32, BlockHash)>, ManagerError> {
        for (height, hash) in blocks {
            if self.on_best_chain(height, hash).await? {
                return Ok(Some((height, hash)));
            }
        }
        Ok(None)
    }

    /// Follows a reorg if the loop's tip has left the source's best chain
    /// for a branch with more work.
    pub(super) async fn follow_reorg_below_tip(&mut self) -> Result<(), ManagerError> {
        let tip = self.tip_or_err();
        if !self.on_best_chain(tip.height, tip.hash).await? {
            self.handle_reorg().await?;
        }
        Ok(())
    }

    /// Whether the source's tip `best` is behind the loop's on the loop's
    /// own chain (a node restarting, an index catching up), or below every
    /// block the loop keeps: waited for, with no request to find a fork.
    pub(super) fn source_lags(&self, best: BlockId) -> bool {
        let tip = self.tip_or_err();
        let lowest = self.recent.keys().next().copied().unwrap_or(tip.height);
        let ours = self.recent.get(&best.height).map(|(hash, _)| *hash);
        best.height <= tip.height && (ours == Some(best.hash) || best.height < lowest)
    }

    /// Follows a reorg: finds the highest recorded block still on the
    /// source's best chain and, if the source's branch above it has more
    /// work than the loop's, disconnects every wallet above it in one
    /// transaction (the loop then connects the new branch). Returns
    /// whether the loop's tip is on the source's best chain now: `false`
    /// when the source lags or offers a branch with no more work, which is
    /// waited for, not followed.
    pub(crate) async fn handle_reorg(&mut self) -> Result<bool, ManagerError> {
        let tip = self.tip_or_err();
        let best = timed(&self.policy(), || self.source.tip()).await?;
        if self.source_lags(best) {
            tracing::info!(
                source_tip = best.height,
                tip = tip.height,
                "the source lags behind the loop: waiting"
            );
            return Ok(false);
        }
        let lowest = self.recent.keys().next().copied().unwrap_or(tip.height);
        let recent: Vec<(u32, BlockHash)> = self
            .recent
            .iter()
            .rev()
            .map(|(h, (b, _))| (*h, *b))
            .collect();
        let Some((fork_height, fork_hash)) = self.highest_on_chain(recent.into_iter()).await?
        else {
            return Err(ManagerError::ReorgTooDeep {
                kept: self.recent.len(),
                lowest,
            });
        };
        if fork_height == tip.height {
            return Ok(true);
        }
        if !self
            .source_has_more_work(fork_height, fork_hash, best)
            .await?
        {
            tracing::info!(
                fork = fork_height,
                source_tip = best.height,
                tip = tip.height,
                "the source's branch has no more work than the loop's: waiting"
            );
            return Ok(false);
        }
        self.pipe = None;
        let disconnected: Vec<(u32, BlockHash)> = self
            .recent
            .range(fork_height + 1..)
            .rev()
            .map(|(h, (hash, _))| (*h, *hash))
            .collect();
        tracing::info!(fork = fork_height, depth = disconnected.len(), "reorg");
        let mut books = self.take_books().await?;
        let hook = self.hook.clone();
        let raw_fork = fork_hash.to_byte_array();
        let result = self
            .store
            .write(move |tx| {
                for row in tx.wallets()? {
                    tx.disconnect_wallet(row.wallet_id, fork_height + 1)?;
                    if row.importing_height.is_some_and(|h| h > fork_height) {
                        tx.set_import_progress(row.wallet_id, fork_height, &raw_fork)?;
                    }
                    if row.parked.is_some_and(|p| p.height > fork_height) {
                        tx.set_parked_height(row.wallet_id, fork_height, &raw_fork)?;
                    }
                }
                tx.delete_block_hashes_above(fork_height)?;
                tx.set_tip(fork_height, &raw_fork)?;
                if let Some(hook) = &hook {
                    hook.blocks_disconnected(tx, fork_height)
                        .map_err(ManagerError::Hook)?;
                }
                books.reload_coins(tx)?;
                Ok::<_, ManagerError>(books)
            })
            .await?;
        self.books = Some(result);
        self.mempool_after_reorg();
        Counters::add(&self.out.counters.commits, 1);
        Counters::add(
            &self.out.counters.blocks_disconnected,
            disconnected.len() as u64,
        );
        self.recent.retain(|h, _| *h <= fork_height);
        self.tip = Some(Tip {
            height: fork_height,
            hash: fork_hash,
        });
        self.tip_filter_header = None;
        self.resets = 0;
        self.publish_tip();
        for (height, hash) in disconnected {
            self.out.publish(Event::BlockDisconnected { height, hash });
        }
        Ok(true)
    }
}
