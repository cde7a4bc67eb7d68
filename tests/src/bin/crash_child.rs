//! The crash test's child process (`tests/it/crash.rs`): runs the chain
//! loop over a database and a SimChain saved to a file that the parent
//! keeps replacing (new blocks, reorgs) while the child runs, importing a
//! late wallet on the way. The parent kills it with SIGKILL at random
//! moments and starts it again; the last run ends when the parent has
//! written the done file (the final tip) and the loop has reached it.
//!
//! On stdout, `started` once the manager exists, then a `phase ...` line
//! each time the child enters another phase ([`Phase`]), so that the parent
//! can tell where a kill landed: stdout is line-buffered, so every line is
//! in the pipe before the next step begins.
//!
//! Usage: `crash-child DB CHAIN DONE`.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bitcoin::bip158::FilterHeader;
use bitcoin::block::Header;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use lockstep_chain::{BlockId, BroadcastError, ChainSource, SourceError};
use lockstep_manager::{BlockHook, Event, HookError, Manager, ManagerConfig, NewWallet};
use lockstep_sim::SimChain;
use lockstep_store::{Store, StoreOptions, WriteTx};
use lockstep_testkit::oracle::test_descriptors;
use lockstep_tests::crash::{
    LATE_WALLET, LATE_WALLET_AT, WALLET_SEED, WALLETS, parse_done, wallet_spec,
};
use tokio::sync::watch;

/// How often the child looks at the chain file and the done file: a few
/// milliseconds, so the loop meets a new block or a reorg while it is
/// still busy with the previous one.
const POLL: Duration = Duration::from_millis(2);

/// A chain source that follows a file: it answers from the last version
/// loaded, and [`follow`] loads each new version the parent writes. The
/// parent replaces the file by a rename, so every version read is whole;
/// a version is kept in memory, so one answer never mixes two versions.
struct FollowedFile {
    chain: RwLock<SimChain>,
}

impl FollowedFile {
    /// The version answering now (a handle: a clone shares its state).
    fn current(&self) -> SimChain {
        self.chain
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, chain: SimChain) {
        *self.chain.write().unwrap_or_else(PoisonError::into_inner) = chain;
    }
}

#[async_trait]
impl ChainSource for FollowedFile {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        ChainSource::tip(&self.current()).await
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        ChainSource::block_hash(&self.current(), height).await
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        ChainSource::header(&self.current(), hash).await
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        ChainSource::filter(&self.current(), hash).await
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        ChainSource::filter_header(&self.current(), hash).await
    }

    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        ChainSource::filter_headers(&self.current(), blocks).await
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        ChainSource::block(&self.current(), hash).await
    }

    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        ChainSource::headers(&self.current(), from, count).await
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        ChainSource::broadcast(&self.current(), tx).await
    }
}

/// What identifies one version of the chain file: the parent writes each
/// version to a new file and renames it over the old one, so the inode
/// changes (and with it, almost surely, the size or the modification time,
/// should an inode number be reused).
fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec()))
}

/// Loads each new version of `chain_file` into `source`, and publishes the
/// final tip once the parent has written `done_file`. Runs until the
/// process ends.
async fn follow(
    source: Arc<FollowedFile>,
    chain_file: PathBuf,
    mut seen: Option<(u64, u64, i64, i64)>,
    done_file: PathBuf,
    done: watch::Sender<Option<BlockId>>,
) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        // The stamp is taken before loading: a version written during the
        // load changes the stamp again and is loaded at the next tick.
        let now = stamp(&chain_file);
        if now != seen {
            let path = chain_file.clone();
            let chain = tokio::task::spawn_blocking(move || SimChain::load(&path))
                .await
                .expect("the load task")
                .expect("every version of the chain file loads: it is replaced whole");
            source.replace(chain);
            seen = now;
        }
        if done.borrow().is_none()
            && let Ok(text) = std::fs::read_to_string(&done_file)
        {
            let tip = parse_done(&text).expect("the done file names a block");
            done.send_replace(Some(tip));
        }
    }
}

/// Where the child is, as the parent's histogram of kills counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// From the start (opening the database, registering wallets, the
    /// loop's first look at the chain) to the first transaction.
    Start,
    /// Inside the write transaction of a batch, from its first block's
    /// hook until the event of its last block (`hash`): a kill here
    /// leaves the batch committed or not at all.
    Commit(BlockHash),
    /// Inside the transaction that disconnects every block above `fork`,
    /// until the event of the lowest one.
    Disconnect(u32),
    /// Between batches: fetching, matching, or idle at the tip.
    Between,
    /// A wallet import, from the call (or from the start of a run that
    /// resumes one a kill cut) until the wallet joins: its own batches
    /// commit without the hook. The call waits for the loop's step under
    /// way, so a little of this is the loop's.
    Import,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Commit(_) => "commit",
            Phase::Disconnect(_) => "disconnect",
            Phase::Between => "between",
            Phase::Import => "import",
        }
    }
}

struct Now {
    phase: Phase,
    importing: bool,
}

/// The child's phase, moved by the block hook (called inside the commit
/// transaction), the loop's events (published after the commit) and the
/// import calls. Printed under the lock, so the lines come out in the
/// order the phases were entered.
struct Phases {
    now: Mutex<Now>,
}

impl Phases {
    /// Moves to the phase `next` gives (none: stays), printing its name if
    /// it changes.
    fn update(&self, next: impl FnOnce(&mut Now) -> Option<Phase>) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(phase) = next(&mut now) else {
            return;
        };
        if phase.name() != now.phase.name() {
            println!("phase {}", phase.name());
        }
        now.phase = phase;
    }

    /// Where the child is once a transaction has committed.
    fn rest(now: &Now) -> Phase {
        if now.importing {
            Phase::Import
        } else {
            Phase::Between
        }
    }

    /// An import begins (or ends). A transaction under way finishes
    /// first: its event moves on to the import.
    fn importing(&self, importing: bool) {
        self.update(|now| {
            now.importing = importing;
            match now.phase {
                Phase::Commit(_) | Phase::Disconnect(_) => None,
                Phase::Import if !importing => Some(Phase::Between),
                _ if importing => Some(Phase::Import),
                _ => None,
            }
        });
    }

    fn event(&self, event: &Event) {
        match event {
            Event::BlockConnected { hash, .. } => {
                self.update(|now| (now.phase == Phase::Commit(*hash)).then(|| Phases::rest(now)))
            }
            Event::BlockDisconnected { height, .. } => self.update(|now| {
                matches!(now.phase, Phase::Disconnect(fork) if fork + 1 == *height)
                    .then(|| Phases::rest(now))
            }),
            Event::WalletImported { .. } => self.importing(false),
            _ => {}
        }
    }
}

impl BlockHook for Phases {
    fn block_connected(
        &self,
        _tx: &mut WriteTx<'_>,
        _height: u32,
        hash: &BlockHash,
    ) -> Result<(), HookError> {
        self.update(|_| Some(Phase::Commit(*hash)));
        Ok(())
    }

    fn blocks_disconnected(
        &self,
        _tx: &mut WriteTx<'_>,
        fork_height: u32,
    ) -> Result<(), HookError> {
        self.update(|_| Some(Phase::Disconnect(fork_height)));
        Ok(())
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (db, chain_file, done_file) = (
        args.next().expect("DB"),
        args.next().expect("CHAIN"),
        args.next().expect("DONE"),
    );
    let seen = stamp(&chain_file);
    let source = Arc::new(FollowedFile {
        chain: RwLock::new(SimChain::load(&chain_file).expect("loading the chain")),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let (done, mut done_rx) = watch::channel(None);
        tokio::spawn(follow(
            Arc::clone(&source),
            chain_file,
            seen,
            done_file,
            done,
        ));
        let store = Store::open(&db, StoreOptions::default()).expect("opening the database");
        let config = ManagerConfig {
            batch_size: 3,
            prefetch: 8,
            poll_interval: Duration::from_millis(5),
            ..ManagerConfig::default()
        };
        let manager = Manager::new(store.clone(), source, config);
        let phases = Arc::new(Phases {
            now: Mutex::new(Now {
                phase: Phase::Start,
                importing: false,
            }),
        });
        manager
            .set_hook(Arc::clone(&phases) as Arc<dyn BlockHook>)
            .await;
        let mut events = manager.subscribe();
        let listener = Arc::clone(&phases);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(event) => listener.event(&event),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        });
        // The parent kills at random moments after this line.
        println!("started");
        let registered = |name: String| {
            let store = store.clone();
            async move {
                store
                    .read(move |tx| tx.wallet_by_name(&name))
                    .await
                    .expect("reading")
                    .is_some()
            }
        };
        for index in 0..WALLETS {
            let (name, birth, lookahead) = wallet_spec(index);
            if !registered(name.clone()).await {
                manager
                    .register(NewWallet {
                        name,
                        descriptors: test_descriptors(WALLET_SEED, index),
                        birth_height: birth,
                        lookahead,
                        passphrase: None,
                    })
                    .await
                    .expect("registering");
            }
        }
        // An import a kill interrupted is resumed when the loop starts.
        let resuming = store
            .read(|tx| tx.wallets())
            .await
            .expect("reading")
            .iter()
            .any(|w| w.importing_height.is_some());
        phases.importing(resuming);
        manager.start();
        let mut tip = manager.tip();
        let (name, birth, lookahead) = wallet_spec(LATE_WALLET);
        if !registered(name.clone()).await {
            tip.wait_for(|t| t.is_some_and(|t| t.height >= LATE_WALLET_AT))
                .await
                .expect("the loop runs");
            phases.importing(true);
            manager
                .register(NewWallet {
                    name,
                    descriptors: test_descriptors(WALLET_SEED, LATE_WALLET),
                    birth_height: birth,
                    lookahead,
                    passphrase: None,
                })
                .await
                .expect("importing");
            phases.importing(false);
        }
        let target = *done_rx
            .wait_for(Option::is_some)
            .await
            .expect("the follower runs");
        tip.wait_for(|t| *t == target).await.expect("the loop runs");
        manager.stop().await;
        let target = target.expect("waited for");
        println!("synced {} {}", target.height, target.hash);
    });
}
