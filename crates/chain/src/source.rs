//! The [`ChainSource`] trait: everything lockstep asks of a chain.

use std::sync::Arc;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Amount, Block, BlockHash, OutPoint, Transaction, Txid};
use lockstep_error::ErrorKind;

/// A block's place in a chain: its height and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// Height above genesis (genesis is 0).
    pub height: u32,
    /// The block's hash.
    pub hash: BlockHash,
}

/// A source of chain data for the one chain loop, and the way out for
/// transactions.
///
/// The manager holds an `Arc<dyn ChainSource>`, so the trait is object safe.
/// Every method may be called concurrently (the loop prefetches filters while
/// it matches). Implementations answer for their *current* best chain: a hash
/// that was reorganised away may give [`SourceError::NotFound`], and the
/// caller re-reads the tip.
///
/// Implementations: [`crate::BitcoindSource`] here, a Bitcoin Core node,
/// and lockstep-sim's `SimChain`, the embedded regtest chain.
#[async_trait]
pub trait ChainSource: Send + Sync + 'static {
    /// The best chain's tip.
    async fn tip(&self) -> Result<BlockId, SourceError>;

    /// The hash of the best chain's block at `height`.
    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError>;

    /// The header of the block `hash`.
    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError>;

    /// The block's BIP158 basic filter, raw as served by BIP157 (`cfilter`):
    /// the element count as a CompactSize followed by the Golomb-Rice set.
    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError>;

    /// The block's BIP157 basic filter header, which commits to its filter
    /// and to every filter before it.
    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError>;

    /// The basic filter headers of `blocks`, one per block in their order,
    /// in one request where the source can. `blocks` are consecutive blocks
    /// of one chain, lowest first (the caller has their headers): that is
    /// what BIP157 peers answer in one `cfheaders` message (`getcfheaders`
    /// from the first height to the last hash, up to 2,000) and Core's REST
    /// interface in one `blockfilterheaders/basic/<count>/<first hash>`.
    /// A block not on the source's best chain gives
    /// [`SourceError::NotFound`].
    ///
    /// The default asks [`filter_header`](Self::filter_header) once per
    /// block.
    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        let mut out = Vec::with_capacity(blocks.len());
        for block in blocks {
            out.push(self.filter_header(block.hash).await?);
        }
        Ok(out)
    }

    /// The block itself.
    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError>;

    /// Up to `count` consecutive headers of the best chain from height
    /// `from` (fewer at the tip, none above it), in one request where the
    /// source can: BIP157 peers and Core's REST interface serve 2,000
    /// headers per message. The caller checks that they chain.
    ///
    /// The default asks [`block_hash`](Self::block_hash) and
    /// [`header`](Self::header) once per height.
    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        let mut out = Vec::with_capacity(count as usize);
        for height in from..from.saturating_add(count) {
            let hash = match self.block_hash(height).await {
                Ok(hash) => hash,
                Err(SourceError::NotFound(_)) if !out.is_empty() || height > from => break,
                Err(e) => return Err(e),
            };
            out.push(self.header(hash).await?);
        }
        Ok(out)
    }

    /// Hands a transaction to the network. `Ok` means the source accepted it
    /// into its mempool; a rejection says why in [`RejectReason`].
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError>;

    /// The txids of the transactions in the source's mempool, in no
    /// particular order, or `None` when the source shows no mempool (then
    /// wallets see only confirmed transactions and their own broadcasts).
    ///
    /// The manager polls this at the tip and fetches each txid it has not
    /// seen with [`mempool_tx`](Self::mempool_tx), so a source answers it
    /// cheaply (Core: REST `mempool/contents.json?verbose=false`, or
    /// `getrawmempool`). The default has no mempool.
    async fn mempool_txids(&self) -> Result<Option<Vec<Txid>>, SourceError> {
        Ok(None)
    }

    /// The mempool transaction `txid`. A transaction that left the mempool
    /// since it was listed (mined, replaced, evicted) is
    /// [`SourceError::NotFound`] of [`Missing::Transaction`]; the caller
    /// checks that what it gets hashes to `txid`.
    ///
    /// The default, for sources with no mempool, finds nothing.
    async fn mempool_tx(&self, txid: Txid) -> Result<Transaction, SourceError> {
        Err(SourceError::NotFound(Missing::Transaction(txid)))
    }

    /// Resolves when the source has heard of more than `seen` new mempool
    /// transactions since it started, sooner than a poll would find them
    /// (Bitcoin Core's ZMQ `rawtx`), and returns how many it has heard of:
    /// the manager then polls the mempool at once. A hint only: the
    /// mempool listing stays the truth.
    ///
    /// The default never resolves: the manager polls on its own schedule
    /// (`mempool_poll_interval`, and after each new block).
    async fn mempool_news(&self, seen: u64) -> u64 {
        let _ = seen;
        std::future::pending().await
    }
}

/// What a chain source could not be asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source cannot be reached or refused to answer. Retryable.
    #[error("chain source unavailable: {reason}")]
    Unavailable {
        /// What happened, for the log.
        reason: String,
    },
    /// The source cannot serve lockstep until its operator changes its
    /// configuration (a node without the block filter index, on another
    /// network, refusing the credentials, …); `reason` says what to change.
    /// Counted as retryable: fixing the node is enough, lockstep picks it
    /// up on its next attempt without a restart.
    #[error("chain source misconfigured: {reason}")]
    Misconfigured {
        /// What is wrong and what the operator must change.
        reason: String,
    },
    /// The source did not answer in time. Retryable.
    #[error("chain source timed out after {after_ms} ms")]
    Timeout {
        /// How long the caller waited.
        after_ms: u64,
    },
    /// The thing asked for is not on the source's best chain.
    #[error("{0} not found on the best chain")]
    NotFound(Missing),
    /// The source answered with data that cannot be right (it does not
    /// decode, or does not match what it committed to).
    #[error("chain source sent invalid data for {what}: {reason}")]
    Invalid {
        /// Which request the data answered.
        what: Missing,
        /// What is wrong with it.
        reason: String,
    },
}

/// A [`SourceError::Invalid`] of `what`: what every check of a source's
/// answer (the node's formats, the block checks) returns when it refuses.
pub(crate) fn invalid(what: Missing, reason: impl std::fmt::Display) -> SourceError {
    SourceError::Invalid {
        what,
        reason: reason.to_string(),
    }
}

impl SourceError {
    /// What the caller can do about it: a source that is down, slow,
    /// misconfigured or does not have it on its best chain (a reorg, or a
    /// height above its tip: re-read the tip before asking again) is
    /// [`ErrorKind::Retryable`]; data that cannot be right is
    /// [`ErrorKind::Invalid`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Unavailable { .. }
            | SourceError::Timeout { .. }
            | SourceError::Misconfigured { .. }
            | SourceError::NotFound(_) => ErrorKind::Retryable,
            SourceError::Invalid { .. } => ErrorKind::Invalid,
        }
    }

    /// Whether asking the same again, after a pause, can succeed: the
    /// source is down, slow or misconfigured. Not when it does not have
    /// it on its best chain ([`is_not_found`](Self::is_not_found)): that
    /// is retryable too, but only after re-reading the tip, so a request
    /// retry loop must not wait it out.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::Unavailable { .. }
                | SourceError::Timeout { .. }
                | SourceError::Misconfigured { .. }
        )
    }

    /// Whether the source does not have it on its best chain.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SourceError::NotFound(_))
    }
}

/// Names what a [`SourceError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// The block at this height of the best chain.
    Height(u32),
    /// The header of this block.
    Header(BlockHash),
    /// The block itself.
    Block(BlockHash),
    /// The basic filter of this block.
    Filter(BlockHash),
    /// The basic filter header of this block.
    FilterHeader(BlockHash),
    /// This transaction in the source's mempool.
    Transaction(Txid),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Height(h) => write!(f, "block at height {h}"),
            Missing::Header(b) => write!(f, "header {b}"),
            Missing::Block(b) => write!(f, "block {b}"),
            Missing::Filter(b) => write!(f, "basic filter of {b}"),
            Missing::FilterHeader(b) => write!(f, "basic filter header of {b}"),
            Missing::Transaction(t) => write!(f, "mempool transaction {t}"),
        }
    }
}

/// A broadcast that did not go through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The source examined the transaction and refused it. Retrying the same
    /// transaction does not help; the reason says what would.
    #[error("transaction {txid} rejected: {reason}")]
    Rejected {
        /// The rejected transaction.
        txid: Txid,
        /// Why.
        reason: RejectReason,
    },
    /// The source could not be asked (see [`SourceError::kind`]).
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Why a source refused a transaction, in Bitcoin Core's categories.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// An input is already spent by a confirmed transaction (Core:
    /// `bad-txns-inputs-missingorspent` for a known output).
    #[error("input {outpoint} is already spent in the best chain")]
    ConflictConfirmed {
        /// The input that is spent.
        outpoint: OutPoint,
    },
    /// The transaction conflicts with mempool transactions (spends an
    /// outpoint they spend) and would replace them, but does not pay enough
    /// for it (Core: `insufficient fee`). Which of BIP125's fee rules it
    /// fails, with the amounts compared, is in `rule`: bumping the fee far
    /// enough gets it in.
    #[error("insufficient fee: {rule}")]
    InsufficientFee {
        /// The replacement rule it fails.
        rule: FeeRule,
    },
    /// Replacing would evict more than [`MAX_REPLACEMENTS`] transactions
    /// (the direct conflicts and all their mempool descendants; Core: `too
    /// many potential replacements`, its rule 5). Each is counted once,
    /// where Core adds up every direct conflict's descendant count and so
    /// may count a descendant shared by two conflicts twice.
    #[error("replacing would evict {count} transactions (at most {max})")]
    TooManyReplacements {
        /// How many it would evict.
        count: usize,
        /// The limit, [`MAX_REPLACEMENTS`].
        max: usize,
    },
    /// The transaction spends an output of a transaction it would replace,
    /// so it could never be valid after the replacement (Core:
    /// `bad-txns-spends-conflicting-tx`).
    #[error("input {outpoint} spends an output of a transaction it would replace")]
    SpendsConflictingTx {
        /// The input that spends an output of a replaced transaction.
        outpoint: OutPoint,
    },
    /// An input refers to an output the source does not know (Core:
    /// `missing-inputs`).
    #[error("input {outpoint} refers to an unknown output")]
    MissingInputs {
        /// The first input that could not be found.
        outpoint: OutPoint,
    },
    /// The very same transaction is already confirmed.
    #[error("transaction already confirmed")]
    AlreadyConfirmed,
    /// The transaction breaks a consensus or standardness rule.
    #[error("invalid transaction: {0}")]
    Invalid(InvalidTx),
    /// A node refused it for a reason none of the above names (a policy
    /// rule SimChain does not simulate, such as Core's `dust` or
    /// `min relay fee not met`), in the node's own words.
    #[error("rejected by the node: {0}")]
    Other(String),
}

/// Most transactions one replacement may evict, the direct conflicts and
/// their descendants together (Bitcoin Core's `MAX_REPLACEMENT_CANDIDATES`,
/// BIP125 rule 5).
pub const MAX_REPLACEMENTS: usize = 100;

/// The BIP125 fee rule a replacement fails ([`RejectReason::InsufficientFee`]),
/// in the order Bitcoin Core checks them: rule 6 against each direct
/// conflict first, then rules 3 and 4 against everything it would evict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeeRule {
    /// Rule 6: its fee rate is not above that of a transaction it directly
    /// conflicts with (Core compares the rates in whole sat/kvB, truncated).
    #[error(
        "fee rate {fee} / {vsize} vB is not above {conflict}'s {conflict_fee} / {conflict_vsize} vB"
    )]
    FeeRate {
        /// The replacement's absolute fee.
        fee: Amount,
        /// The replacement's virtual size.
        vsize: u64,
        /// The direct conflict paying at least as high a rate.
        conflict: Txid,
        /// That conflict's absolute fee.
        conflict_fee: Amount,
        /// That conflict's virtual size.
        conflict_vsize: u64,
    },
    /// Rule 3: its absolute fee is below the sum of the fees of everything
    /// it would evict (the direct conflicts and their descendants).
    #[error(
        "fee {fee} is below the {replaced_fees} paid by the {replaced} transactions it replaces"
    )]
    AbsoluteFee {
        /// The replacement's absolute fee.
        fee: Amount,
        /// The fees of every transaction it would evict.
        replaced_fees: Amount,
        /// How many transactions it would evict.
        replaced: usize,
    },
    /// Rule 4: what it pays above the evicted transactions does not cover
    /// its own relay at the incremental relay fee (1 sat/vB).
    #[error("it adds {additional} in fees, below the {required} its relay needs")]
    RelayFee {
        /// Its fee minus the evicted transactions' fees.
        additional: Amount,
        /// The incremental relay fee times its virtual size.
        required: Amount,
    },
    /// A node said which rule in words that do not give back the amounts
    /// above (Bitcoin Core prints fee rates, not fees and sizes): its
    /// explanation, as it gave it. Bumping the fee still helps.
    #[error("{0}")]
    Reported(String),
}

/// The rule a transaction breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTx {
    /// No inputs.
    #[error("no inputs")]
    NoInputs,
    /// No outputs.
    #[error("no outputs")]
    NoOutputs,
    /// A coinbase cannot be broadcast.
    #[error("a coinbase transaction cannot be broadcast")]
    Coinbase,
    /// The same outpoint is spent twice in the transaction.
    #[error("input {0} is spent twice")]
    DuplicateInput(OutPoint),
    /// The outputs are worth more than the inputs.
    #[error("outputs ({outputs}) exceed inputs ({inputs})")]
    OutputsExceedInputs {
        /// Sum of the inputs.
        inputs: Amount,
        /// Sum of the outputs.
        outputs: Amount,
    },
    /// An output value is above the money supply.
    #[error("output value out of range")]
    ValueOutOfRange,
    /// A coinbase output is spent before it has 100 confirmations.
    #[error("coinbase output {outpoint} is immature until height {mature_at}")]
    PrematureCoinbaseSpend {
        /// The immature coinbase output.
        outpoint: OutPoint,
        /// The first height at which it may be spent.
        mature_at: u32,
    },
    /// An input's script does not verify (Bitcoin Core's interpreter).
    #[error("input {input} fails script verification: {reason}")]
    Script {
        /// Index of the failing input.
        input: usize,
        /// The interpreter's verdict.
        reason: String,
    },
}
