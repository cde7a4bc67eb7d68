//! The actions crash test's child process (`tests/it/actions_crash.rs`):
//! the chain, the chain loop and the action executor in one process, as a
//! node embedding lockstep would run them. It mines a block every few
//! milliseconds, saves the chain to its file (write beside, then rename)
//! and only then lets the loop see the block, so the database never holds
//! a block the file lost. It resumes every action a previous run left,
//! drives the scenario's plan (every step run twice), and says `all-done`
//! once every planned action has an outcome and the loop has seen one more
//! block. The parent kills it with SIGKILL at random moments.
//!
//! On stdout: `started`, then `phase ...` lines (`driving` once the
//! wallets are unlocked and the actions resumed and driven, `broadcasting` when a
//! transaction reaches the source, `broadcast-returned` when the source
//! answered, `dropped` when it did not relay one, `mined H`), so that the
//! parent can aim kills between persisting and broadcasting and between
//! broadcasting and the next checkpoint.
//!
//! Usage: `actions-child DB CHAIN KIND`, KIND `send`, `bump` or
//! `consolidate`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use lockstep::{DriveMode, ExecutorConfig, Lockstep, WalletAction as _};
use lockstep_chain::{BlockId, BroadcastError, ChainSource, Missing, SourceError};
use lockstep_manager::{Manager, ManagerConfig};
use lockstep_sim::SimChain;
use lockstep_store::{Store, StoreError, StoreOptions};
use lockstep_tests::actions_crash::{Kind, PASSPHRASE, RELAY_FLOOR, WALLETS, name, plan};

/// How often the child mines a block.
const MINE_EVERY: Duration = Duration::from_millis(15);

/// Prints a line and flushes it at once (the parent reads line by line).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The chain as saved: the loop sees only blocks already in the file.
struct Published {
    chain: SimChain,
    tip: Mutex<BlockId>,
    kind: Kind,
}

impl Published {
    fn tip(&self) -> BlockId {
        *self.tip.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fee rate of `tx` in sat/vB, if its inputs are known.
    fn fee_rate(&self, tx: &Transaction) -> Option<f64> {
        let mut paid = 0u64;
        for input in &tx.input {
            paid += self.chain.unspent(&input.previous_output)?.value.to_sat();
        }
        let out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
        Some(paid.checked_sub(out)? as f64 / tx.vsize() as f64)
    }
}

#[async_trait]
impl ChainSource for Published {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        Ok(Published::tip(self))
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        if height > Published::tip(self).height {
            return Err(SourceError::NotFound(Missing::Height(height)));
        }
        ChainSource::block_hash(&self.chain, height).await
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        ChainSource::header(&self.chain, hash).await
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        ChainSource::filter(&self.chain, hash).await
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        ChainSource::filter_header(&self.chain, hash).await
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        ChainSource::block(&self.chain, hash).await
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        say("phase broadcasting");
        if self.kind == Kind::Bump && self.fee_rate(tx).is_some_and(|rate| rate < RELAY_FLOOR) {
            // A node that acknowledges and does not relay: the version
            // stays unconfirmed until a replacement pays more.
            say("phase dropped");
            return Ok(tx.compute_txid());
        }
        let result = ChainSource::broadcast(&self.chain, tx).await;
        say("phase broadcast-returned");
        result
    }
}

/// Mines a block, saves the chain, then publishes the block to the loop.
fn mine(published: &Published, path: &Path) -> Result<u32, String> {
    published.chain.mine(1).map_err(|e| e.to_string())?;
    published.chain.save(path).map_err(|e| e.to_string())?;
    let tip = published.chain.tip();
    *published.tip.lock().unwrap_or_else(PoisonError::into_inner) = tip;
    Ok(tip.height)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, db, chain_file, kind] = args.as_slice() else {
        return Err("usage: actions-child DB CHAIN KIND".into());
    };
    let kind = Kind::parse(kind).ok_or("KIND: send, bump or consolidate")?;
    let chain_file = PathBuf::from(chain_file);
    let chain = SimChain::load(&chain_file).map_err(|e| e.to_string())?;
    let published = Arc::new(Published {
        tip: Mutex::new(chain.tip()),
        chain,
        kind,
    });
    let runtime = lockstep_tests::rig::runtime();
    runtime.block_on(async move {
        let store =
            Store::open(Path::new(db), StoreOptions::default()).map_err(|e| e.to_string())?;
        let config = ManagerConfig {
            poll_interval: Duration::from_millis(5),
            ..ManagerConfig::default()
        };
        let manager = Manager::new(
            store,
            Arc::clone(&published) as Arc<dyn ChainSource>,
            config,
        );
        let executor_config = ExecutorConfig {
            run_each_step_twice: true,
            lock_ttl: 1_000,
            ..ExecutorConfig::default()
        };
        let lockstep = Lockstep::from_manager_with(manager.clone(), executor_config);
        say("started");
        lockstep.start();
        let mut ids = Vec::new();
        for index in 0..WALLETS {
            let wallet = lockstep
                .wallet_named(&name(index))
                .await
                .map_err(|e| e.to_string())?;
            wallet.unlock(PASSPHRASE).await.map_err(|e| e.to_string())?;
            ids.push(wallet.id());
        }
        let resumed = lockstep
            .executor()
            .resume_all()
            .await
            .map_err(|e| e.to_string())?;
        let actions = plan(kind, &ids);
        // One lane per wallet, its actions one after the other (each run
        // then makes a little progress, so kills land all along the plan);
        // the lanes run at once.
        let mut drives = Vec::new();
        for lane in 0..ids.len() {
            let lockstep = lockstep.clone();
            let mine: Vec<_> = actions
                .iter()
                .skip(lane)
                .step_by(ids.len())
                .cloned()
                .collect();
            drives.push(tokio::spawn(async move {
                for action in mine {
                    lockstep
                        .executor()
                        .drive(action, DriveMode::UntilDone)
                        .await?;
                }
                Ok::<_, lockstep::DriveError>(())
            }));
        }
        say("phase driving");
        let miner = {
            let published = Arc::clone(&published);
            let chain_file = chain_file.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MINE_EVERY).await;
                    let published = Arc::clone(&published);
                    let path = chain_file.clone();
                    let height = tokio::task::spawn_blocking(move || mine(&published, &path))
                        .await
                        .map_err(|e| e.to_string())??;
                    say(&format!("phase mined {height}"));
                }
                #[allow(unreachable_code, reason = "the loop ends only by an error")]
                Ok::<(), String>(())
            })
        };
        for task in resumed {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        for task in drives {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        // Every planned action has an outcome.
        let planned: Vec<String> = actions.iter().map(|a| a.id()).collect();
        let missing = manager
            .store()
            .read(move |tx| {
                let mut missing = Vec::new();
                for id in planned {
                    if tx.action_outcome(&id)?.is_none() {
                        missing.push(id);
                    }
                }
                Ok::<_, StoreError>(missing)
            })
            .await
            .map_err(|e| e.to_string())?;
        if !missing.is_empty() {
            return Err(format!("actions without an outcome: {missing:?}"));
        }
        // One more block, seen by the loop, then stop.
        let target = published.chain.height() + 1;
        lockstep
            .wait_for(target, Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        miner.abort();
        lockstep.stop().await;
        say("all-done");
        Ok(())
    })
}
