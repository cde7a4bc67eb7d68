//! The filter headers of a scan, asked for per batch of block headers (one
//! request per batch instead of one per block, running while the filters
//! are fetched and matched), and answered per block when its filter is
//! checked. Apart from the pipeline's fetch tasks so that the batch's
//! states (not asked, on its way, got, failed) read in one place.

use std::sync::Arc;

use bitcoin::bip158::FilterHeader;
use lockstep_chain::{BlockId, ChainSource, Missing, SourceError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Flow, Pipeline, Policy, timed};
use crate::{ManagerConfig, ManagerError};

/// The filter headers of one batch of headers.
pub(super) struct FilterHeaderBatch {
    /// Never empty; shared with the task asking for them.
    pub(super) blocks: Arc<[BlockId]>,
    pub(super) state: FilterHeaders,
}

impl FilterHeaderBatch {
    fn first(&self) -> u32 {
        self.blocks[0].height
    }

    /// The height after the batch's last block.
    fn end(&self) -> u32 {
        self.first().saturating_add(self.blocks.len() as u32)
    }
}

pub(super) enum FilterHeaders {
    /// Not asked for yet (the scan was on the block path): asked when
    /// first needed.
    NotAsked,
    /// On their way.
    Asked(JoinHandle<Result<Vec<FilterHeader>, SourceError>>),
    Got(Vec<FilterHeader>),
    /// Asked twice and failed: each block asks alone.
    Failed,
}

impl Pipeline {
    /// The source's filter header for `block`, one of this pipeline's: from
    /// the request made with its header (waited for if still on its way;
    /// asked again, once, if it failed), or asked alone if none covers it.
    pub(crate) async fn filter_header(
        &mut self,
        source: &Arc<dyn ChainSource>,
        config: &ManagerConfig,
        stop: &watch::Receiver<bool>,
        block: BlockId,
    ) -> Result<FilterHeader, Flow> {
        self.forget_filter_headers(block.height);
        let policy = &Policy::of(config, stop);
        let Some(batch) = self
            .filter_headers
            .front_mut()
            .filter(|b| b.first() <= block.height)
        else {
            return Ok(timed(policy, || source.filter_header(block.hash)).await?);
        };
        let at = (block.height - batch.first()) as usize;
        if batch.blocks[at] != block {
            // Not the block this pipeline fetched at that height.
            return Err(Flow::Reset(None));
        }
        let answer = match &mut batch.state {
            FilterHeaders::NotAsked => {
                Some(timed(policy, || source.filter_headers(&batch.blocks)).await)
            }
            FilterHeaders::Asked(task) => Some(match task.await {
                Ok(Err(e)) if e.is_retryable() => {
                    timed(policy, || source.filter_headers(&batch.blocks)).await
                }
                Ok(answer) => answer,
                Err(e) => Err(SourceError::Unavailable {
                    reason: format!("filter header task failed: {e}"),
                }),
            }),
            FilterHeaders::Got(_) | FilterHeaders::Failed => None,
        };
        if let Some(answer) = answer {
            // Whatever the answer, this request is over.
            batch.state = FilterHeaders::Failed;
            let headers = answer?;
            if headers.len() != batch.blocks.len() {
                return Err(Flow::Fail(ManagerError::Source(SourceError::Invalid {
                    what: Missing::FilterHeader(batch.blocks[0].hash),
                    reason: format!(
                        "{} filter headers for {} blocks",
                        headers.len(),
                        batch.blocks.len()
                    ),
                })));
            }
            batch.state = FilterHeaders::Got(headers);
        }
        match &batch.state {
            FilterHeaders::Got(headers) => Ok(headers[at]),
            _ => Ok(timed(policy, || source.filter_header(block.hash)).await?),
        }
    }

    /// Drops the filter-header batches wholly below `height`: the scan has
    /// passed them.
    pub(crate) fn forget_filter_headers(&mut self, height: u32) {
        while self
            .filter_headers
            .front()
            .is_some_and(|b| b.end() <= height)
        {
            if let Some(FilterHeaderBatch {
                state: FilterHeaders::Asked(task),
                ..
            }) = self.filter_headers.pop_front()
            {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pow::HeaderChain;

    /// On the block path a batch's filter headers are not asked for; when
    /// needed at last (the path switched) the whole batch is one request;
    /// and batches behind the scan are dropped, so a long block-path scan
    /// holds none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filter_headers_are_asked_per_batch_when_needed_and_forgotten_behind() {
        use lockstep_chain::metered::Metered;
        use lockstep_sim::{SimChain, SimParams};

        let chain = SimChain::generate(SimParams::unsigned(3), 130).unwrap();
        let metered = Metered::new(Arc::new(chain.clone()));
        let source: Arc<dyn ChainSource> = Arc::new(metered.clone());
        let config = ManagerConfig {
            header_batch: 50,
            prefetch: 200,
            ..ManagerConfig::default()
        };
        let (_keep, stop) = watch::channel(false);
        let pow = HeaderChain::new(bitcoin::Network::Regtest);
        let mut pipe = Pipeline::new(0, chain.hash_at(0).unwrap(), None, pow);
        pipe.ask_filter_headers = false;
        pipe.top_up_headers(&source, &config, &stop).await.unwrap();
        pipe.top_up_headers(&source, &config, &stop).await.unwrap();
        assert_eq!(pipe.filter_headers.len(), 2);
        assert_eq!(metered.meter().headers, 2, "block headers only");
        for height in 1..=50 {
            let block = BlockId {
                height,
                hash: chain.hash_at(height).unwrap(),
            };
            let header = pipe
                .filter_header(&source, &config, &stop, block)
                .await
                .unwrap();
            assert_eq!(Some(header), chain.filter_header_at(height));
        }
        assert_eq!(metered.meter().headers, 3, "one request for 50");
        // A block the pipeline did not fetch at that height: start again.
        let stranger = BlockId {
            height: 60,
            hash: chain.hash_at(61).unwrap(),
        };
        assert!(matches!(
            pipe.filter_header(&source, &config, &stop, stranger).await,
            Err(Flow::Reset(None))
        ));
        pipe.forget_filter_headers(101);
        assert!(pipe.filter_headers.is_empty());
    }
}
