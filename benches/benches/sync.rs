//! The sync benchmark, with its own harness (one run
//! takes minutes, not microseconds): `cargo xtask bench sync`.
//!
//! On the cached 2,000-block chain of [`sync_chain`] (standard load, filters
//! of about 1,500 elements, three payments to each benchmark wallet), for
//! W = 10 and 100 watch-only wallets of 1,000 scripts each, in one run:
//!
//! - **(a)** the manager: the W wallets registered, then one `sync()` from
//!   height 0 to the tip; in each run three times, with the automatic
//!   strategy and with it forced to filters and to blocks, so that the
//!   automatic choice is judged against the better fixed one on the same
//!   machine at the same moment, and its blocks-fetched count is printed
//!   per run (a choice that flips with noise shows as counts that differ);
//! - **(b)** one light client per wallet, all W at the same time on one
//!   shared link (one charging model, or one stand-in node), each with its
//!   own database, manager and loop: what W light clients on one machine
//!   cost, not W runs one after another each on a free link;
//! - **(c)** the floor: every filter fetched through the same kind of
//!   source with the manager's prefetch depth, decoded, checked against
//!   the served filter-header chain (as any BIP158 client must), and every
//!   watched script tested against it: hashed once per block with the
//!   block's SipHash keys and looked up in the decoded set (what any BIP158
//!   client must do to learn whether a filter matches: hashing alone tells
//!   a client nothing); nothing committed;
//! - **(d)** the floor plus the blocks any BIP158 client must fetch (those
//!   paying the wallets, and the filters' false positives), fetched and
//!   checked against their headers' merkle roots, as any client must before
//!   trusting what they pay. (d)/(c) shows how much of (a)/(c) no manager can
//!   avoid, and (a)/(d) ≤ 1.3 is the manager's target.
//!
//! Each row gives wall time, requests, filter requests, bytes, blocks
//! fetched (per run too) and commits. Everything runs three times over:
//! with the in-process source; through [`Metered::charging`] (a
//! per-request latency and a shared bandwidth, stated in the output); and
//! over real HTTP on loopback, the stand-in node (`SimNode`) serving the
//! same chain in Bitcoin Core's REST formats, read through
//! `BitcoindSource` (what a deployment next to its node pays: sockets,
//! serialising, parsing). Then the import row: one wallet imported into a
//! manager whose 99 wallets are synced, against a fresh manager syncing
//! that wallet alone. The ratios are printed next to their targets.
//!
//! Output: a markdown report on stdout, also written to
//! `target/lockstep-bench/sync-results.md`; progress on stderr.
//!
//! Arguments after `--` narrow a run while iterating (the report then says
//! it is partial): `in-process`, `charging` or `http`, `10` or `100`,
//! `no-b`, `no-import`; `auto`, `filters` or `blocks` run (a) with those
//! strategies only. E.g. `cargo xtask bench sync -- http 100 no-b auto`.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bitcoin::bip158::{FilterHash, FilterHeader};
use bitcoin::block::Header;
use bitcoin::hashes::Hash as _;
use bitcoin::{Block, BlockHash, Network, Transaction, Txid};
use lockstep_benches::{
    SYNC_FROM, SYNC_PAYMENTS_PER_WALLET, SYNC_WALLET_SEED, SYNC_WALLETS, load_average,
    publish_report, sync_chain, sync_payments, thousands,
};
use lockstep_chain::block_checks::check_merkle_root;
use lockstep_chain::metered::{LinkModel, Meter, Metered};
use lockstep_chain::{
    BitcoindAuth, BitcoindConfig, BitcoindSource, BlockId, BroadcastError, ChainSource, SourceError,
};
use lockstep_filter::{BasicFilter, Watchlist, matches};
use lockstep_manager::{Manager, ManagerConfig, NewWallet, Stats, Strategy};
use lockstep_sim::{SimChain, SimNode, SimNodeConfig};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_wallet::Wallet;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Runs whose median is reported for (a), (c) and the import row.
const RUNS: usize = 5;
/// (b) is run [`RUNS`] times only while one run takes less than this;
/// otherwise once.
const B_REPEAT_BELOW: Duration = Duration::from_secs(40);
/// Scripts kept derived past the last used one, per keychain: 500
/// external + 500 internal = 1,000 scripts per wallet.
const LOOKAHEAD: u32 = 500;
/// The wallet counts measured.
const WALLET_COUNTS: [u32; 2] = [10, 100];
/// The manager's matcher spreads over rayon from this many scripts on
/// (`lockstep_filter::matches_parallel`: twice its 16,384-script chunk);
/// the floor does the same.
const PARALLEL_FROM: usize = 2 * 16_384;
/// The import row's targets: the ratio import / alone at most this.
const IMPORT_TARGET: f64 = 1.2;
/// (a)/(c) at most this.
const FLOOR_TARGET: f64 = 1.3;
/// (b)/(a) at least this (W = 100, charging source and HTTP).
const ONE_BY_ONE_TARGET: f64 = 10.0;
/// (a)/(d) at most this: the manager against the floor plus the blocks any
/// BIP158 client must fetch.
const BLOCKS_FLOOR_TARGET: f64 = 1.3;
/// The automatic strategy's wall at most this times the better of the two
/// forced ones.
const AUTO_TARGET: f64 = 1.1;
/// The automatic strategy's blocks fetched per run differ by less than a
/// batch divided by this. A switch decided one batch earlier or later
/// moves the count by most of a batch (its blocks whose filters do not
/// match: 190 of 250 at 100 wallets), and the reported flip-flop fetched
/// 1,317-1,572; a switch at the same batch still varies by a few dozen,
/// the blocks whose filter fetches were already under way on the old path
/// (a full run: 1,219-1,259).
const STABLE_SHARE_OF_BATCH: u64 = 4;
/// Requests the W light clients of (b) keep in flight to the stand-in node
/// at once, all together (each client 1,024 / W of them, on as many
/// connections of its own): a W = 100 run would otherwise open up to
/// 100 × 256 connections, each two file descriptors in this process
/// (client and node), beyond its 20,000; a first run with one shared limit
/// but a pool per client failed with a request that could not be sent.
/// Four times one manager's prefetch.
const SHARED_HTTP_REQUESTS: usize = 1_024;

/// What to run: everything unless arguments after `--` narrow it
/// (`cargo xtask bench sync -- in-process 100 no-b no-import`), or force
/// the managers' strategy for a diagnostic run (`filters`, `blocks`).
#[derive(Debug, Clone)]
struct Selection {
    in_process: bool,
    charging: bool,
    http: bool,
    counts: Vec<u32>,
    per_wallet_clients: bool,
    import: bool,
    /// The strategies (a) is run with, each in every run: all three unless
    /// `auto`, `filters` or `blocks` name some.
    strategies: Vec<Strategy>,
    /// Some argument narrowed the run.
    partial: bool,
}

impl Selection {
    fn from_args() -> Selection {
        let args: Vec<String> = std::env::args()
            .skip(1)
            // `cargo bench` passes `--bench`.
            .filter(|a| !a.starts_with("--"))
            .collect();
        let has = |word: &str| args.iter().any(|a| a == word);
        let any_link = has("in-process") || has("charging") || has("http");
        let counts: Vec<u32> = WALLET_COUNTS
            .iter()
            .copied()
            .filter(|w| has(&w.to_string()))
            .collect();
        for a in &args {
            let known = [
                "in-process",
                "charging",
                "http",
                "no-b",
                "no-import",
                "auto",
                "filters",
                "blocks",
            ]
            .contains(&a.as_str())
                || WALLET_COUNTS.iter().any(|w| w.to_string() == *a);
            if !known {
                eprintln!(
                    "ignoring argument {a:?} (known: in-process, charging, http, 10, 100, no-b, no-import, auto, filters, blocks)"
                );
            }
        }
        let all = [Strategy::Auto, Strategy::Filters, Strategy::Blocks];
        let named: Vec<Strategy> = all.into_iter().filter(|s| has(strategy_name(*s))).collect();
        Selection {
            in_process: !any_link || has("in-process"),
            charging: !any_link || has("charging"),
            http: !any_link || has("http"),
            counts: if counts.is_empty() {
                WALLET_COUNTS.to_vec()
            } else {
                counts
            },
            per_wallet_clients: !has("no-b"),
            import: !has("no-import"),
            strategies: if named.is_empty() {
                all.to_vec()
            } else {
                named
            },
            partial: !args.is_empty(),
        }
    }
}

/// The name of a strategy on the command line and in the report.
fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Filters => "filters",
        Strategy::Blocks => "blocks",
        _ => "auto",
    }
}

/// The configuration of every manager the benchmark runs: the default,
/// with `strategy`.
fn manager_config(strategy: Strategy) -> ManagerConfig {
    ManagerConfig {
        // Blocks up to SYNC_FROM - 1 are taken as already processed.
        start_height: SYNC_FROM - 1,
        strategy,
        ..ManagerConfig::default()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Which source the runs read through.
#[derive(Debug, Clone)]
enum Link {
    /// The simulated chain in the same process, behind a counting wrapper.
    InProcess,
    /// The same, charging each request a network's cost.
    Charging(LinkModel),
    /// The stand-in node serving the chain in Bitcoin Core's formats over
    /// HTTP on loopback, read through `BitcoindSource` (REST) behind a
    /// counting wrapper that charges nothing: what a deployment next to
    /// its node pays, real sockets, parsing and all.
    Http(Arc<HttpNode>),
}

impl Link {
    fn name(&self) -> &'static str {
        match self {
            Link::InProcess => "in-process",
            Link::Charging(_) => "charging",
            Link::Http(_) => "http",
        }
    }

    /// A fresh wrapper (fresh counters, a free link; over HTTP a client
    /// with its own connections) over the chain.
    async fn source(&self, chain: &SimChain) -> Res<Metered> {
        let inner: Arc<dyn ChainSource> = Arc::new(chain.clone());
        Ok(match self {
            Link::InProcess => Metered::new(inner),
            Link::Charging(link) => Metered::charging(inner, *link),
            Link::Http(node) => Metered::new(Arc::new(node.client(None).await?)),
        })
    }

    /// The sources of `n` light clients on one machine, and the wrappers
    /// whose counters add up to what they all asked. They share one link:
    /// one charging model (its bandwidth is shared, so concurrent answers
    /// queue), or one stand-in node reached through one machine's sockets
    /// (each client with its own connections, [`SHARED_HTTP_REQUESTS`] / n
    /// requests in flight at most).
    async fn clients(&self, chain: &SimChain, n: usize) -> Res<(Vec<Metered>, Vec<Metered>)> {
        match self {
            Link::InProcess | Link::Charging(_) => {
                let shared = self.source(chain).await?;
                Ok((vec![shared.clone(); n], vec![shared]))
            }
            Link::Http(node) => {
                let each = (SHARED_HTTP_REQUESTS / n.max(1)).max(1);
                let mut sources = Vec::with_capacity(n);
                for _ in 0..n {
                    let gated = Gated {
                        inner: Arc::new(node.client(Some(each)).await?),
                        gate: Arc::new(Semaphore::new(each)),
                    };
                    sources.push(Metered::new(Arc::new(gated)));
                }
                Ok((sources.clone(), sources))
            }
        }
    }
}

/// The stand-in node of the HTTP runs, serving the benchmark's chain on
/// 127.0.0.1 in the same process (its handlers share the runtime's two
/// workers with the clients, as a node on the same two-core host would
/// share the cores), and its cookie.
#[derive(Debug)]
struct HttpNode {
    node: SimNode,
    cookie: PathBuf,
    _dir: tempfile::TempDir,
}

impl HttpNode {
    async fn start(chain: &SimChain) -> Res<HttpNode> {
        let dir = tempfile::tempdir()?;
        let node = SimNode::start(
            chain.clone(),
            SimNodeConfig {
                cookie_dir: Some(dir.path().to_owned()),
                ..SimNodeConfig::default()
            },
        )
        .await?;
        let cookie = node
            .cookie_path()
            .ok_or("the stand-in node wrote no cookie")?
            .to_owned();
        Ok(HttpNode {
            node,
            cookie,
            _dir: dir,
        })
    }

    /// A client of its own, as a separate program would have: REST reads,
    /// with `BitcoindConfig`'s defaults (32 requests in flight, 64 idle
    /// connections kept: what a deployment runs with), or with
    /// `connections` in flight and kept.
    ///
    /// The rows (a), (c) and (d) run with the defaults rather than 256 in
    /// flight (the manager's prefetch): on two cores the extra concurrency
    /// buys nothing, and each sync would open 300-470 connections (the
    /// floor's about 256), whose handshakes and teardowns cost both rows
    /// CPU; with 32, each opens 32-50.
    async fn client(&self, connections: Option<usize>) -> Res<BitcoindSource> {
        let mut config = BitcoindConfig::new(
            self.node.url(),
            BitcoindAuth::Cookie(self.cookie.clone()),
            Network::Regtest,
        );
        if let Some(connections) = connections {
            config.max_idle_connections = connections;
            // The stand-in node has no work queue to overflow (a real
            // node's `-rpcworkqueue` is what `max_in_flight`'s default
            // of 32 is for).
            config.max_in_flight = connections;
        }
        let source = BitcoindSource::connect(config).await?;
        if !source.uses_rest() {
            return Err("the stand-in node's REST interface is off".into());
        }
        Ok(source)
    }
}

/// A source whose requests wait for a permit: its share of one machine's
/// connections to the node, for the W light clients of (b) over HTTP.
struct Gated {
    inner: Arc<dyn ChainSource>,
    gate: Arc<Semaphore>,
}

impl Gated {
    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SourceError> {
        self.gate
            .acquire()
            .await
            .map_err(|_| SourceError::Unavailable {
                reason: "the shared gate closed".into(),
            })
    }
}

#[async_trait]
impl ChainSource for Gated {
    async fn tip(&self) -> Result<BlockId, SourceError> {
        let _permit = self.permit().await?;
        self.inner.tip().await
    }

    async fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        let _permit = self.permit().await?;
        self.inner.block_hash(height).await
    }

    async fn header(&self, hash: BlockHash) -> Result<Header, SourceError> {
        let _permit = self.permit().await?;
        self.inner.header(hash).await
    }

    async fn filter(&self, hash: BlockHash) -> Result<Vec<u8>, SourceError> {
        let _permit = self.permit().await?;
        self.inner.filter(hash).await
    }

    async fn filter_header(&self, hash: BlockHash) -> Result<FilterHeader, SourceError> {
        let _permit = self.permit().await?;
        self.inner.filter_header(hash).await
    }

    async fn filter_headers(&self, blocks: &[BlockId]) -> Result<Vec<FilterHeader>, SourceError> {
        let _permit = self.permit().await?;
        self.inner.filter_headers(blocks).await
    }

    async fn block(&self, hash: BlockHash) -> Result<Arc<Block>, SourceError> {
        let _permit = self.permit().await?;
        self.inner.block(hash).await
    }

    async fn headers(&self, from: u32, count: u32) -> Result<Vec<Header>, SourceError> {
        let _permit = self.permit().await?;
        self.inner.headers(from, count).await
    }

    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, BroadcastError> {
        let _permit = self.permit().await?;
        self.inner.broadcast(tx).await
    }
}

/// Wall and process CPU time from one point on.
struct Stopwatch {
    wall: Instant,
    cpu: Option<cpu_time::ProcessTime>,
}

/// What a [`Stopwatch`] measured.
#[derive(Debug, Clone, Copy, Default)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

impl Stopwatch {
    fn start() -> Stopwatch {
        Stopwatch {
            cpu: cpu_time::ProcessTime::try_now().ok(),
            wall: Instant::now(),
        }
    }

    fn took(&self) -> Took {
        Took {
            wall: self.wall.elapsed(),
            cpu: self.cpu.map_or(Duration::ZERO, |cpu| cpu.elapsed()),
        }
    }
}

/// What one measured run cost.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    wall: Duration,
    /// The process's CPU time (every thread: the loop, the writer, rayon's
    /// pool and, over HTTP, the stand-in node) over the same window: with
    /// both cores busy, wall time is CPU time over two, and the ratio of
    /// the two says how much of a row's wall time is idle cores.
    cpu: Duration,
    meter: Meter,
    commits: u64,
    /// The manager's own count of blocks fetched (cross-checks the meter).
    stats_blocks: u64,
    switches: u64,
    false_positives: u64,
}

impl Measured {
    fn of(took: Took, m0: Meter, m1: Meter, s0: Stats, s1: Stats) -> Measured {
        Measured {
            wall: took.wall,
            cpu: took.cpu,
            meter: Meter {
                requests: m1.requests - m0.requests,
                filters: m1.filters - m0.filters,
                blocks: m1.blocks - m0.blocks,
                headers: m1.headers - m0.headers,
                tips: m1.tips - m0.tips,
                mempool_listings: m1.mempool_listings - m0.mempool_listings,
                bytes: m1.bytes - m0.bytes,
            },
            commits: s1.commits - s0.commits,
            stats_blocks: s1.blocks_fetched - s0.blocks_fetched,
            switches: s1.strategy_switches - s0.strategy_switches,
            false_positives: s1.false_positives - s0.false_positives,
        }
    }

    fn add(&mut self, other: &Measured) {
        self.wall += other.wall;
        self.cpu += other.cpu;
        self.meter.requests += other.meter.requests;
        self.meter.filters += other.meter.filters;
        self.meter.blocks += other.meter.blocks;
        self.meter.headers += other.meter.headers;
        self.meter.bytes += other.meter.bytes;
        self.commits += other.commits;
        self.stats_blocks += other.stats_blocks;
        self.switches += other.switches;
        self.false_positives += other.false_positives;
    }
}

/// The runs of one row, and what went wrong or is worth saying.
#[derive(Debug, Default)]
struct Row {
    runs: Vec<Measured>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Row {
    /// The run of median wall time.
    fn median(&self) -> Option<Measured> {
        let mut runs = self.runs.clone();
        runs.sort_by_key(|m| m.wall);
        runs.get(runs.len().saturating_sub(1) / 2).copied()
    }

    fn record(&mut self, what: &str, result: Res<Measured>) -> Option<Measured> {
        match result {
            Ok(m) => {
                self.runs.push(m);
                Some(m)
            }
            Err(e) => {
                // The whole chain: reqwest's "error sending request" says
                // why only in its sources.
                let mut message = e.to_string();
                let mut source = e.source();
                while let Some(cause) = source {
                    let _ = write!(message, ": {cause}");
                    source = cause.source();
                }
                eprintln!("  {what}: ERROR {message}");
                self.errors.push(format!("{what}: {message}"));
                None
            }
        }
    }

    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

fn new_wallet(index: u32) -> NewWallet {
    NewWallet {
        name: format!("w{index}"),
        descriptors: test_descriptors(SYNC_WALLET_SEED, index),
        birth_height: SYNC_FROM,
        lookahead: LOOKAHEAD,
        passphrase: None,
    }
}

/// A fresh database, source wrapper and manager. Fields drop in order:
/// the database closes before its directory goes.
struct Fresh {
    manager: Manager,
    store: Store,
    metered: Metered,
    _dir: tempfile::TempDir,
}

/// Profiling only the measured windows: with `LOCKSTEP_PERF_CTL` naming
/// the control FIFO of `perf record --delay=-1 --control fifo:PATH`, each
/// measured `sync()` (and floor run) is bracketed by `enable`/`disable`;
/// `LOCKSTEP_PERF_ROW=sync`, `floor` ((c)) or `floor+blocks` ((d)) keeps only one.
fn perf_control(row: &str, command: &str) {
    if std::env::var("LOCKSTEP_PERF_ROW").is_ok_and(|only| only != row) {
        return;
    }
    use std::io::Write as _;
    static FIFO: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
    let fifo = FIFO.get_or_init(|| {
        let path = std::env::var_os("LOCKSTEP_PERF_CTL")?;
        let file = std::fs::OpenOptions::new().write(true).open(path).ok()?;
        Some(std::sync::Mutex::new(file))
    });
    if let Some(file) = fifo
        && let Ok(mut file) = file.lock()
    {
        let _ = writeln!(file, "{command}");
    }
}

/// A fresh database and manager over a fresh source of `link`.
async fn fresh(chain: &SimChain, link: &Link, strategy: Strategy) -> Res<Fresh> {
    Fresh::open(link.source(chain).await?, strategy)
}

/// What every wrapper in `meters` counted, added up.
fn total(meters: &[Metered]) -> Meter {
    meters
        .iter()
        .map(Metered::meter)
        .fold(Meter::default(), |a, m| Meter {
            requests: a.requests + m.requests,
            filters: a.filters + m.filters,
            blocks: a.blocks + m.blocks,
            headers: a.headers + m.headers,
            tips: a.tips + m.tips,
            mempool_listings: a.mempool_listings + m.mempool_listings,
            bytes: a.bytes + m.bytes,
        })
}

impl Fresh {
    /// A fresh database, and a manager over `metered`.
    fn open(metered: Metered, strategy: Strategy) -> Res<Fresh> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default())?;
        let manager = Manager::new(
            store.clone(),
            Arc::new(metered.clone()),
            manager_config(strategy),
        );
        Ok(Fresh {
            manager,
            store,
            metered,
            _dir: dir,
        })
    }

    /// `sync()` to the tip, measured; checks it connected every block.
    async fn timed_sync(&self, tip: u32) -> Res<Measured> {
        let (m0, s0) = (self.metered.meter(), self.manager.stats());
        perf_control("sync", "enable");
        let start = Stopwatch::start();
        let height = self.manager.sync().await?;
        let took = start.took();
        perf_control("sync", "disable");
        let (m1, s1) = (self.metered.meter(), self.manager.stats());
        if height != tip {
            return Err(format!("sync() stopped at {height}, the source's tip is {tip}").into());
        }
        let connected = s1.blocks_connected - s0.blocks_connected;
        if connected != u64::from(tip - (SYNC_FROM - 1)) {
            return Err(format!("sync() connected {connected} blocks, expected {tip}").into());
        }
        Ok(Measured::of(took, m0, m1, s0, s1))
    }

    /// Every script the wallets derive now.
    async fn scripts(&self, ids: &[WalletId]) -> Res<Vec<Vec<u8>>> {
        let ids = ids.to_vec();
        let scripts = self
            .store
            .read(move |tx| {
                let mut out = Vec::new();
                for id in ids {
                    let wallet = Wallet::load(tx, id)?;
                    out.extend(wallet.watch_scripts().map(|(_, _, s)| s.to_bytes()));
                }
                Ok::<_, lockstep_wallet::WalletError>(out)
            })
            .await?;
        Ok(scripts)
    }

    /// Compares wallets with the chain's oracle at `height`; returns the
    /// problems found (none when all agree).
    async fn check(&self, chain: &SimChain, ids: &[WalletId], height: u32) -> Res<Vec<String>> {
        let (ids, chain) = (ids.to_vec(), chain.clone());
        let checks = self
            .store
            .read(move |tx| {
                ids.iter()
                    .map(|id| check_wallet(tx, &chain, *id, height))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut problems = Vec::new();
        for c in checks {
            if c.txs != SYNC_PAYMENTS_PER_WALLET as usize {
                problems.push(format!(
                    "{}: {} transactions, the chain pays it {}",
                    c.name, c.txs, SYNC_PAYMENTS_PER_WALLET
                ));
            }
            if let Some(m) = c.mismatch {
                problems.push(format!("{}: {m}", c.name));
            }
        }
        Ok(problems)
    }
}

/// (a): the W wallets registered (not measured), then one measured
/// `sync()` with `strategy`. The first run also compares some wallets with
/// the oracle and returns the scripts the wallets were registered with, for
/// the floor.
async fn manager_run(
    chain: &SimChain,
    link: &Link,
    strategy: Strategy,
    wallets: &[u32],
    first: bool,
    row: &mut Row,
) -> Res<(Measured, Option<Vec<Vec<u8>>>)> {
    let tip = chain.height();
    let f = fresh(chain, link, strategy).await?;
    let mut ids = Vec::with_capacity(wallets.len());
    let registering = Instant::now();
    for &i in wallets {
        ids.push(f.manager.register(new_wallet(i)).await?);
    }
    let registering = registering.elapsed();
    let scripts = if first {
        Some(f.scripts(&ids).await?)
    } else {
        None
    };
    let measured = f.timed_sync(tip).await?;
    if first {
        // wpkh, tr, wsh-multi and the last wallet.
        let mut sample: Vec<WalletId> = ids.iter().take(3).copied().collect();
        sample.extend(ids.last().copied());
        sample.dedup();
        let problems = f.check(chain, &sample, tip).await?;
        if problems.is_empty() {
            row.note(format!("{} sampled wallets equal the oracle", sample.len()));
        } else {
            for p in problems {
                row.errors.push(format!("oracle: {p}"));
            }
        }
        let before = scripts.as_ref().map_or(0, Vec::len);
        let after = f.scripts(&ids).await?.len();
        row.note(format!(
            "watched scripts {} at start, {} at the tip",
            thousands(before as u64),
            thousands(after as u64)
        ));
        row.note(format!(
            "set-up: registering (deriving {} scripts) took {:.2} s, {:.0} µs per script",
            thousands(before as u64),
            registering.as_secs_f64(),
            registering.as_secs_f64() * 1e6 / before.max(1) as f64
        ));
    }
    Ok((measured, scripts))
}

/// (b): one light client per wallet, all at the same time on one machine
/// and one shared link (as W light clients on one host would run): per
/// wallet its own database, manager and source, registration not
/// measured; then all W `sync()` calls started together, measured until
/// the last ends. Counters are the sum over the clients.
async fn per_wallet_clients(chain: &SimChain, link: &Link, wallets: &[u32]) -> Res<Measured> {
    let tip = chain.height();
    let (sources, meters) = link.clients(chain, wallets.len()).await?;
    let mut clients = Vec::with_capacity(wallets.len());
    for (&i, source) in wallets.iter().zip(sources) {
        let f = Fresh::open(source, Strategy::Auto)?;
        f.manager.register(new_wallet(i)).await?;
        clients.push(f);
    }
    let stats: Vec<Stats> = clients.iter().map(|f| f.manager.stats()).collect();
    let m0 = total(&meters);
    let start = Stopwatch::start();
    let mut syncs = JoinSet::new();
    for f in &clients {
        let manager = f.manager.clone();
        syncs.spawn(async move { manager.sync().await });
    }
    while let Some(done) = syncs.join_next().await {
        let height = done??;
        if height != tip {
            return Err(format!("a client's sync() stopped at {height}, the tip is {tip}").into());
        }
    }
    let took = start.took();
    let mut sum = Measured::of(took, m0, total(&meters), Stats::default(), Stats::default());
    for (f, s0) in clients.iter().zip(stats) {
        let s1 = f.manager.stats();
        let connected = s1.blocks_connected - s0.blocks_connected;
        if connected != u64::from(tip - (SYNC_FROM - 1)) {
            return Err(format!("a client connected {connected} blocks, expected {tip}").into());
        }
        sum.add(&Measured::of(
            Took::default(),
            Meter::default(),
            Meter::default(),
            s0,
            s1,
        ));
    }
    Ok(sum)
}

/// The floor's watchlists: one, or (at [`PARALLEL_FROM`] scripts and more,
/// with two rayon threads) two halves of the same composition, matched in
/// parallel.
fn floor_lists(scripts: &[Vec<u8>]) -> Vec<Watchlist<u32>> {
    let parts = if scripts.len() >= PARALLEL_FROM && rayon::current_num_threads() >= 2 {
        2
    } else {
        1
    };
    (0..parts)
        .map(|part| {
            Watchlist::from_scripts(
                scripts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % parts == part)
                    .map(|(i, s)| (s.as_slice(), i as u32)),
            )
        })
        .collect()
}

/// How many watched scripts `filter` probably holds: every script hashed
/// with the block's keys and looked up in the decoded set, with the
/// fastest matcher we have (the manager's own, 6.6-10 times faster than
/// rust-bitcoin's `match_any`). Hashing alone (the SipHash floor of
/// `cargo xtask bench filter`) is not enough: a client that drops the
/// hashes has not learned whether it must fetch the block.
fn match_all(filter: &BasicFilter, lists: &[Watchlist<u32>]) -> usize {
    match lists {
        [a, b] => {
            let (x, y) = rayon::join(|| matches(filter, a).len(), || matches(filter, b).len());
            x + y
        }
        _ => lists.iter().map(|l| matches(filter, l).len()).sum(),
    }
}

/// (c): block hashes from batched headers, the filter headers in one
/// request beside the filter fetches, then every filter fetched with the
/// manager's prefetch depth of concurrent tasks, each decoding its filter
/// and testing every watched script against it ([`match_all`]); in height
/// order, each filter's header computed from the filter and the previous
/// header and compared with the served one (BIP157's chain, which any
/// BIP158 client must check before trusting a filter). Nothing committed.
///
/// (d), with `also_fetch` the heights of [`must_fetch`]: the same, and
/// those blocks fetched too (by the task of their height, after its
/// filter) and checked against their headers' merkle roots. No BIP158 client can fetch less, so (d)/(c) bounds
/// how close to (c) any manager can come.
async fn floor_run(
    chain: &SimChain,
    link: &Link,
    lists: Arc<Vec<Watchlist<u32>>>,
    also_fetch: Arc<BTreeSet<u32>>,
) -> Res<Measured> {
    let config = ManagerConfig::default();
    let tip = chain.height();
    let metered = link.source(chain).await?;
    let source: Arc<dyn ChainSource> = Arc::new(metered.clone());
    let m0 = metered.meter();
    let start = Stopwatch::start();
    // From the block before the first scanned: its filter header starts
    // the chain.
    let from = SYNC_FROM - 1;
    let mut blocks: Vec<BlockId> = Vec::with_capacity((tip - from + 1) as usize);
    while (blocks.len() as u32) < tip - from + 1 {
        let first = from + blocks.len() as u32;
        let count = config.header_batch.min(tip - first + 1);
        let headers = source.headers(first, count).await?;
        if headers.is_empty() {
            return Err(format!("no headers from {first}").into());
        }
        blocks.extend(headers.iter().enumerate().map(|(i, h)| BlockId {
            height: first + i as u32,
            hash: h.block_hash(),
        }));
    }
    let mut served = Some({
        let (source, blocks) = (Arc::clone(&source), blocks.clone());
        tokio::spawn(async move { source.filter_headers(&blocks).await })
    });
    // The served filter headers, and the last one checked.
    let mut chain_of: Option<(Vec<FilterHeader>, FilterHeader)> = None;
    let mut index = 0;
    let mut inflight: VecDeque<JoinHandle<Res<(FilterHash, u64)>>> = VecDeque::new();
    let mut next = 1;
    let mut acc = 0u64;
    let perf_row = if also_fetch.is_empty() {
        "floor"
    } else {
        "floor+blocks"
    };
    let watched: usize = lists.iter().map(Watchlist::len).sum();
    perf_control(perf_row, "enable");
    loop {
        while inflight.len() < config.prefetch && next < blocks.len() {
            let (source, lists, block) = (Arc::clone(&source), Arc::clone(&lists), blocks[next]);
            let fetch_block = also_fetch.contains(&block.height);
            inflight.push_back(tokio::spawn(async move {
                let raw = source.filter(block.hash).await?;
                // Sized for the watchlist as the manager's decoding is.
                let decoded = BasicFilter::decode_for(&block.hash, &raw, watched)?;
                let hits = match_all(&decoded, &lists);
                if fetch_block {
                    // Checked against its header, as any client must
                    // before it trusts what a block pays (the manager
                    // does the same, with the same function).
                    let fetched = source.block(block.hash).await?;
                    check_merkle_root(&fetched)
                        .map_err(|reason| format!("block {}: {reason}", block.height))?;
                    black_box(fetched);
                }
                Ok((FilterHash::hash(&raw), hits as u64))
            }));
            next += 1;
        }
        let Some(task) = inflight.pop_front() else {
            break;
        };
        let (filter_hash, hashed) = task.await??;
        acc = acc.wrapping_add(hashed);
        index += 1;
        if let Some(served) = served.take() {
            let headers = served.await??;
            if headers.len() != blocks.len() {
                return Err(format!(
                    "{} filter headers served for {} blocks",
                    headers.len(),
                    blocks.len()
                )
                .into());
            }
            let start = headers[0];
            chain_of = Some((headers, start));
        }
        let (headers, previous) = chain_of.as_mut().ok_or("no filter headers")?;
        let header = filter_hash.filter_header(previous);
        if header != headers[index] {
            return Err(format!(
                "the filter of height {} does not match its served filter header",
                blocks[index].height
            )
            .into());
        }
        *previous = header;
    }
    black_box(acc);
    let took = start.took();
    perf_control(perf_row, "disable");
    let s = Stats::default();
    Ok(Measured::of(took, m0, metered.meter(), s, s))
}

/// The blocks any BIP158 client watching `lists` must fetch: those paying
/// the wallets (`paying`), and those whose filter matches a watched script
/// though nothing pays it (the filter's false positives, 1 in M per script
/// per block: about Q / M of all blocks). Found before timing, with the
/// scripts registered at the start (the few derived during the sync add a
/// false positive or two).
async fn must_fetch(
    chain: &SimChain,
    lists: &[Watchlist<u32>],
    paying: &BTreeSet<u32>,
) -> Res<BTreeSet<u32>> {
    let mut heights = paying.clone();
    for height in SYNC_FROM..=chain.height() {
        let hash = chain.block_hash(height).await?;
        let filter = BasicFilter::decode(&hash, &chain.filter(hash).await?)?;
        if lists.iter().any(|list| !matches(&filter, list).is_empty()) {
            heights.insert(height);
        }
    }
    Ok(heights)
}

/// The import row, one run: 99 wallets registered and synced (not
/// measured), then `register` of the 100th (born at the first scanned
/// height), measured: creating it (deriving its 1,000 scripts) and
/// scanning to the tip for it.
async fn import_run(chain: &SimChain, link: &Link, first: bool, row: &mut Row) -> Res<Measured> {
    let tip = chain.height();
    let f = fresh(chain, link, Strategy::Auto).await?;
    for i in 0..SYNC_WALLETS - 1 {
        f.manager.register(new_wallet(i)).await?;
    }
    let height = f.manager.sync().await?;
    if height != tip {
        return Err(format!("the 99 wallets synced to {height}, not {tip}").into());
    }
    let (m0, s0) = (f.metered.meter(), f.manager.stats());
    let start = Stopwatch::start();
    let id = f.manager.register(new_wallet(SYNC_WALLETS - 1)).await?;
    let took = start.took();
    let (m1, s1) = (f.metered.meter(), f.manager.stats());
    if s1.imports - s0.imports != 1 {
        return Err(format!("{} imports counted, expected 1", s1.imports - s0.imports).into());
    }
    if first {
        let problems = f.check(chain, &[id], tip).await?;
        if problems.is_empty() {
            row.note("the imported wallet equals the oracle".into());
        }
        for p in problems {
            row.errors.push(format!("oracle: {p}"));
        }
    }
    Ok(Measured::of(took, m0, m1, s0, s1))
}

/// The import row's reference, one run: a fresh manager with that wallet
/// alone, measured from registration (deriving its scripts, as the import
/// does) to the end of `sync()`.
async fn alone_run(chain: &SimChain, link: &Link) -> Res<Measured> {
    let tip = chain.height();
    let f = fresh(chain, link, Strategy::Auto).await?;
    let (m0, s0) = (f.metered.meter(), f.manager.stats());
    let start = Stopwatch::start();
    f.manager.register(new_wallet(SYNC_WALLETS - 1)).await?;
    let height = f.manager.sync().await?;
    let took = start.took();
    let (m1, s1) = (f.metered.meter(), f.manager.stats());
    if height != tip {
        return Err(format!("sync() stopped at {height}, not {tip}").into());
    }
    Ok(Measured::of(took, m0, m1, s0, s1))
}

/// The rows and their ratios for one source and one W.
struct Case {
    w: u32,
    /// (a), once per strategy run (automatic first).
    a: Vec<(Strategy, Row)>,
    b: Row,
    c: Row,
    d: Row,
    /// Blocks paying these wallets.
    paying: usize,
    /// Blocks paying them or matching their scripts by a filter's false
    /// positive: what the manager must fetch at least.
    must_fetch: usize,
}

impl Case {
    /// (a) with the automatic strategy, or the first one run.
    fn manager(&self) -> Option<&Row> {
        self.a
            .iter()
            .find(|(s, _)| *s == Strategy::Auto)
            .or(self.a.first())
            .map(|(_, row)| row)
    }

    fn forced(&self, strategy: Strategy) -> Option<&Row> {
        self.a.iter().find(|(s, _)| *s == strategy).map(|(_, r)| r)
    }
}

/// One run of (a) with `strategy`, recorded in `row` with its checks. The
/// first returns the registered scripts.
async fn record_manager_run(
    chain: &SimChain,
    link: &Link,
    strategy: Strategy,
    wallets: &[u32],
    first: bool,
    (case_paying, case_must_fetch): (usize, usize),
    row: &mut Row,
) -> Option<Vec<Vec<u8>>> {
    let result = manager_run(chain, link, strategy, wallets, first, row).await;
    let (measured, scripts) = match result {
        Ok((m, scripts)) => (Ok(m), scripts),
        Err(e) => (Err(e), None),
    };
    if let Some(m) = row.record("(a)", measured) {
        eprintln!(
            "    {:.3} s, {} blocks fetched",
            m.wall.as_secs_f64(),
            m.meter.blocks
        );
        if m.stats_blocks != m.meter.blocks {
            row.note(format!(
                "manager counted {} blocks fetched, the source {}",
                m.stats_blocks, m.meter.blocks
            ));
        }
        if (m.meter.blocks as usize) < case_paying {
            row.errors.push(format!(
                "fetched {} blocks, but {case_paying} blocks pay these wallets",
                m.meter.blocks
            ));
        }
        if (m.meter.blocks as usize) < case_must_fetch {
            row.note(format!(
                "fetched {} blocks, fewer than the {case_must_fetch} whose filters match the scripts registered at the start",
                m.meter.blocks
            ));
        }
    }
    scripts
}

async fn run_case(
    chain: &SimChain,
    link: &Link,
    w: u32,
    strategies: &[Strategy],
    with_b: bool,
) -> Case {
    let wallets: Vec<u32> = (0..w).collect();
    let paying: BTreeSet<u32> = sync_payments()
        .iter()
        .filter(|p| p.wallet < w)
        .map(|p| p.height)
        .collect();
    let mut case = Case {
        w,
        a: strategies.iter().map(|s| (*s, Row::default())).collect(),
        b: Row::default(),
        c: Row::default(),
        d: Row::default(),
        paying: paying.len(),
        must_fetch: 0,
    };
    let mut must: Option<Arc<BTreeSet<u32>>> = None;
    let mut lists: Option<Arc<Vec<Watchlist<u32>>>> = None;
    for run in 0..RUNS {
        // Every strategy in every run, so that a machine's drift during
        // the run weighs on all alike, and each run starts with another
        // (the first full run had the automatic one always first, and
        // slower than forced filters doing the very same requests).
        let n = case.a.len();
        for k in 0..n {
            let (strategy, row) = &mut case.a[(k + run) % n];
            eprintln!(
                "  [{} W={w}] (a) manager, {}, run {}/{RUNS}",
                link.name(),
                strategy_name(*strategy),
                run + 1
            );
            let scripts = record_manager_run(
                chain,
                link,
                *strategy,
                &wallets,
                lists.is_none(),
                (case.paying, case.must_fetch),
                row,
            )
            .await;
            if let Some(scripts) = scripts {
                let built = floor_lists(&scripts);
                if built.len() > 1 {
                    case.c.note(format!(
                        "{} scripts matched in {} parts on rayon::join",
                        thousands(scripts.len() as u64),
                        built.len()
                    ));
                } else {
                    case.c.note(format!(
                        "{} scripts matched per block on one core (below {}; blocks run in parallel across tasks, as the manager's do)",
                        thousands(scripts.len() as u64),
                        thousands(PARALLEL_FROM as u64)
                    ));
                }
                lists = Some(Arc::new(built));
            }
        }
        let Some(lists) = lists.clone() else {
            case.c.errors.push("no scripts: (a)'s set-up failed".into());
            continue;
        };
        eprintln!(
            "  [{} W={w}] (c) floor, run {}/{RUNS}",
            link.name(),
            run + 1
        );
        let floor = floor_run(chain, link, Arc::clone(&lists), Arc::default()).await;
        if let Some(m) = case.c.record("(c)", floor) {
            eprintln!("    {:.3} s", m.wall.as_secs_f64());
        }
        eprintln!(
            "  [{} W={w}] (d) floor + paying blocks, run {}/{RUNS}",
            link.name(),
            run + 1
        );
        if must.is_none() {
            match must_fetch(chain, &lists, &paying).await {
                Ok(heights) => {
                    case.must_fetch = heights.len();
                    must = Some(Arc::new(heights));
                }
                Err(e) => {
                    case.d
                        .errors
                        .push(format!("finding the blocks to fetch: {e}"));
                    continue;
                }
            }
        }
        let heights = must.clone().unwrap_or_default();
        let floor = floor_run(chain, link, lists, heights).await;
        if let Some(m) = case.d.record("(d)", floor) {
            eprintln!("    {:.3} s", m.wall.as_secs_f64());
        }
    }
    for run in 0..if with_b { RUNS } else { 0 } {
        eprintln!(
            "  [{} W={w}] (b) one client per wallet, run {}/{RUNS}",
            link.name(),
            run + 1
        );
        let started = Instant::now();
        let result = per_wallet_clients(chain, link, &wallets).await;
        let took = started.elapsed();
        match case.b.record("(b)", result) {
            Some(m) => eprintln!(
                "    {:.3} s measured ({:.0} s with set-up)",
                m.wall.as_secs_f64(),
                took.as_secs_f64()
            ),
            None => break,
        }
        if took >= B_REPEAT_BELOW && run + 1 < RUNS {
            case.b.note(format!(
                "run once: one run took {:.0} s with set-up (≥ {} s)",
                took.as_secs_f64(),
                B_REPEAT_BELOW.as_secs()
            ));
            break;
        }
    }
    case
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn ratio(x: Duration, y: Duration) -> f64 {
    x.as_secs_f64() / y.as_secs_f64()
}

const HEADER: &str = "| W | row | wall (s) | CPU (s) | runs (s) | requests | filter req | MB fetched | blocks fetched | blocks per run | commits | notes |\n|---:|---|---:|---:|---|---:|---:|---:|---:|---|---:|---|\n";

fn table_row(out: &mut String, w: &str, label: &str, row: &Row) {
    let runs = row
        .runs
        .iter()
        .map(|m| format!("{:.2}", m.wall.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" / ");
    let mut notes = row.notes.clone();
    let per_run = |f: fn(&Measured) -> u64| {
        row.runs
            .iter()
            .map(|m| thousands(f(m)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    if row.runs.iter().any(|m| m.switches > 0) {
        notes.push(format!(
            "strategy switches per run: {}",
            per_run(|m| m.switches)
        ));
    }
    if row.runs.windows(2).any(|p| p[0].meter != p[1].meter) {
        notes.push(format!(
            "counts differ between runs (requests: {})",
            per_run(|m| m.meter.requests)
        ));
    }
    let blocks = per_run(|m| m.meter.blocks);
    notes.extend(row.errors.iter().map(|e| format!("**ERROR** {e}")));
    let notes = notes.join("; ");
    match row.median() {
        Some(m) => {
            let _ = writeln!(
                out,
                "| {w} | {label} | {} | {} | {runs} | {} | {} | {:.2} | {} | {blocks} | {} | {notes} |",
                secs(m.wall),
                secs(m.cpu),
                thousands(m.meter.requests),
                thousands(m.meter.filters),
                m.meter.bytes as f64 / 1e6,
                thousands(m.meter.blocks),
                thousands(m.commits),
            );
        }
        None => {
            let _ = writeln!(out, "| {w} | {label} | n/a | | | | | | | | | {notes} |");
        }
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// A ratio row: `measured` against `target` (`None`: information only).
fn ratio_row(
    out: &mut String,
    w: u32,
    what: &str,
    measured: Option<f64>,
    target: Option<(&str, bool)>,
) {
    let (target, verdict) = match (measured, target) {
        (None, Some((t, _))) => (t.to_owned(), "MISS (no data)"),
        (None, None) => (String::new(), "n/a"),
        (Some(_), Some((t, pass))) => (t.to_owned(), self::verdict(pass)),
        (Some(_), None) => (String::new(), "info"),
    };
    let measured = measured.map_or("n/a".to_owned(), |r| format!("{r:.2}"));
    let _ = writeln!(out, "| {w} | {what} | {measured} | {target} | {verdict} |");
}

fn case_tables(out: &mut String, link: &Link, cases: &[Case]) {
    out.push_str(HEADER);
    for case in cases {
        let w = case.w.to_string();
        for (strategy, row) in &case.a {
            let label = match strategy {
                Strategy::Auto => "(a) manager".to_owned(),
                s => format!("(a) manager, {} forced", strategy_name(*s)),
            };
            table_row(out, &w, &label, row);
        }
        table_row(out, &w, "(b) one client per wallet, all at once", &case.b);
        table_row(out, &w, "(c) floor", &case.c);
        table_row(out, &w, "(d) floor + blocks to fetch", &case.d);
    }
    out.push('\n');
    out.push_str("| W | ratio | measured | target | verdict |\n|---:|---|---:|---|---|\n");
    for case in cases {
        let a = case.manager().and_then(Row::median);
        let (b, c, d) = (case.b.median(), case.c.median(), case.d.median());
        let w = case.w;
        let wall = |x: Option<Measured>, y: Option<Measured>| Some(ratio(x?.wall, y?.wall));
        let r = wall(a, d);
        ratio_row(
            out,
            w,
            "(a)/(d) wall: the manager against the floor + blocks to fetch",
            r,
            Some((
                &format!("≤ {BLOCKS_FLOOR_TARGET}"),
                r.is_some_and(|r| r <= BLOCKS_FLOOR_TARGET),
            )),
        );
        let r = wall(a, c);
        ratio_row(
            out,
            w,
            "(a)/(c) wall",
            r,
            Some((
                &format!("≤ {FLOOR_TARGET}"),
                r.is_some_and(|r| r <= FLOOR_TARGET),
            )),
        );
        ratio_row(
            out,
            w,
            "(a)/(d) CPU (process, the median-wall runs)",
            a.zip(d).map(|(a, d)| ratio(a.cpu, d.cpu)),
            None,
        );
        ratio_row(
            out,
            w,
            "(d)/(c) wall: the blocks to fetch alone",
            wall(d, c),
            None,
        );
        let targeted = w == 100 && !matches!(link, Link::InProcess);
        let r = wall(b, a);
        if targeted {
            ratio_row(
                out,
                w,
                "(b)/(a) wall",
                r,
                Some((
                    &format!("≥ {ONE_BY_ONE_TARGET}"),
                    r.is_some_and(|r| r >= ONE_BY_ONE_TARGET),
                )),
            );
        } else {
            ratio_row(
                out,
                w,
                "(b)/(a) wall (target at W = 100, charging and http)",
                r,
                None,
            );
        }
        if let (Some(a), Some(b)) = (a, b) {
            // The manager asks each block's filter once for all W wallets
            // (or not at all, on the block path), the W clients once each.
            let fr = b.meter.filters as f64 / a.meter.filters.max(1) as f64;
            let once = b.meter.filters >= u64::from(w) * a.meter.filters;
            let _ = writeln!(
                out,
                "| {w} | (b)/(a) filter requests | {fr:.2} ({} / {}) | ≥ W = {w} | {} |",
                thousands(b.meter.filters),
                thousands(a.meter.filters),
                verdict(once)
            );
            let rr = b.meter.requests as f64 / a.meter.requests.max(1) as f64;
            ratio_row(out, w, "(b)/(a) requests", Some(rr), None);
        }
        // The automatic strategy against the better forced one.
        let forced = [Strategy::Filters, Strategy::Blocks]
            .into_iter()
            .filter_map(|s| Some((s, case.forced(s)?.median()?)))
            .min_by_key(|(_, m)| m.wall);
        if let (Some(auto), Some((best, m))) =
            (case.forced(Strategy::Auto).and_then(Row::median), forced)
        {
            let r = ratio(auto.wall, m.wall);
            ratio_row(
                out,
                w,
                &format!("automatic / better forced ({}) wall", strategy_name(best)),
                Some(r),
                Some((&format!("≤ {AUTO_TARGET}"), r <= AUTO_TARGET)),
            );
            let batch = u64::from(ManagerConfig::default().batch_size);
            let apart = batch / STABLE_SHARE_OF_BATCH;
            let stable = case.forced(Strategy::Auto).is_some_and(|row| {
                let counts = row.runs.iter().map(|m| m.meter.blocks);
                let (low, high) = (counts.clone().min(), counts.max());
                low.zip(high).is_some_and(|(low, high)| high - low < apart)
            });
            let _ = writeln!(
                out,
                "| {w} | automatic: blocks fetched per run | {} | fewer than {apart} apart (a switch one batch of {batch} earlier or later: most of {batch}) | {} |",
                case.forced(Strategy::Auto).map_or(String::new(), |row| row
                    .runs
                    .iter()
                    .map(|m| thousands(m.meter.blocks))
                    .collect::<Vec<_>>()
                    .join(" / ")),
                verdict(stable)
            );
        }
        let _ = writeln!(
            out,
            "| {w} | blocks paying these wallets | {} ({} with the filters' false positives) | (a) fetches at least these | {} |",
            case.paying,
            case.must_fetch,
            match a {
                Some(a) => verdict(a.meter.blocks as usize >= case.paying),
                None => "n/a",
            }
        );
    }
    out.push('\n');
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter): nothing to choose.
    let begun = Instant::now();
    let load_start = load_average();
    eprintln!("sync benchmark: loading the chain");
    let chain = sync_chain();
    let tip = chain.height();
    let stats = chain.stats();
    let small = (SYNC_FROM..=tip)
        .filter(|h| {
            chain
                .filter_at(*h)
                .and_then(|f| lockstep_chain::filters::filter_element_count(&f))
                .is_some_and(|n| n < 1_000)
        })
        .collect::<Vec<u32>>();
    let payments = sync_payments();
    let paying: BTreeSet<u32> = payments.iter().map(|p| p.height).collect();
    let link = LinkModel::datacenter();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let selection = Selection::from_args();
    let config = manager_config(Strategy::Auto);

    let mut out = String::new();
    let _ = writeln!(out, "# lockstep sync benchmark\n");
    let _ = writeln!(
        out,
        "- **chain**: heights 0..={tip} (`target/lockstep-bench/sync-2101.sim`), {} transactions, {:.1} MB of blocks; filters: mean {:.0} elements, min {}, max {} over the whole chain; every run scans heights {SYNC_FROM}..={tip} ({} blocks), where {} filters hold fewer than 1,000 elements{}",
        thousands(stats.transactions),
        stats.block_bytes as f64 / 1e6,
        stats.mean_filter_elements,
        stats.min_filter_elements,
        stats.max_filter_elements,
        tip - SYNC_FROM + 1,
        small.len(),
        match (small.first(), small.last()) {
            (Some(lo), Some(hi)) => format!(
                " (heights {lo}..={hi}: before coinbases mature the simulator has little to spend)"
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "- **wallets**: W watch-only wallets `test_descriptors({SYNC_WALLET_SEED}, i)` (wpkh / tr / wsh 2-of-2 by i % 3), lookahead {LOOKAHEAD} per keychain = 1,000 scripts each, birth height {SYNC_FROM}; the chain pays each wallet {SYNC_PAYMENTS_PER_WALLET} times, each at its next unused external index (0, 1, 2, as a wallet hands out addresses) ({} payments in {} blocks, heights ≥ 120); registration and derivation are set-up, not measured (except in the import row)",
        payments.len(),
        paying.len()
    );
    let _ = writeln!(
        out,
        "- **manager**: `ManagerConfig::default()` (batch {}, prefetch {}, {} headers per request, strategy {:?}); (a) is also run with the strategy forced to filters and to blocks, in the same runs ({}); one SQLite database per manager (synchronous=FULL) in a temporary directory on the same disk as `target/`",
        config.batch_size,
        config.prefetch,
        config.header_batch,
        config.strategy,
        selection
            .strategies
            .iter()
            .map(|s| strategy_name(*s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "- **runtime**: tokio multi-thread, 2 workers; rayon {} threads; {} cores; load average (1 min) at start {load_start}",
        rayon::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        out,
        "- **(a) manager**: the W wallets registered, then one measured `sync()` from height {} (the loop's start) to {tip}",
        SYNC_FROM - 1
    );
    let _ = writeln!(
        out,
        "- **(b) one client per wallet, all at once**: per wallet its own database, manager and loop (registration not measured), all W `sync()` calls started together on one shared link and measured until the last ends: in-process one counting wrapper, charging one `Metered::charging` whose bandwidth they share, http one stand-in node, each client with its own `BitcoindSource` and connections, each client at most {} / W requests in flight on its own connections",
        thousands(SHARED_HTTP_REQUESTS as u64)
    );
    let _ = writeln!(
        out,
        "- **(c) floor**: block hashes from headers in batches of {}, the filter headers in one request beside the filters, then every filter fetched through the same kind of source by {} concurrent tokio tasks, each decoding it and testing every watched script (the W × 1,000 registered) against it: hashed once with its block's SipHash keys and looked up in the decoded set, with the manager's own matcher (hashing alone tells a client nothing); in height order each filter's header is computed from the filter and the previous header and compared with the served one (the BIP157 chain check any BIP158 client makes); no commits. From {} scripts on, the watchlist is split in 2 halves matched with `rayon::join` (the manager instead matches each block on one thread, blocks in parallel across tasks: the same work on the same two cores)",
        config.header_batch,
        config.prefetch,
        thousands(PARALLEL_FROM as u64)
    );
    let _ = writeln!(
        out,
        "- **(d) floor + blocks to fetch**: (c), and the task of each block any BIP158 client watching these scripts must fetch also fetches it (after its filter) and checks it against its header's merkle root (as any client must before it trusts what the block pays), nothing more. Those blocks are the ones paying the W wallets and the ones whose filter matches a watched script by a false positive (1 in M per script per block, so about W × 1,000 / 784,931 of all blocks), found before timing. (d)/(c) is the part of (a)/(c) no manager can avoid"
    );
    let defaults = BitcoindConfig::new("", BitcoindAuth::Cookie(PathBuf::new()), Network::Regtest);
    let _ = writeln!(
        out,
        "- **sources**: *in-process* = the SimChain behind `Metered::new` (counts, costs nothing); *charging* = `Metered::charging(LinkModel::datacenter())`: **{link}**; *http* = the stand-in node (`SimNode`, the same chain in Bitcoin Core's REST formats on 127.0.0.1, in this process and runtime) read through `BitcoindSource` (REST; `BitcoindConfig`'s defaults for (a), (c) and (d): {} requests in flight, {} idle keep-alive connections kept) behind `Metered::new` (counts, charges nothing; bytes are the payloads' wire sizes, not HTTP's); a fresh wrapper (and HTTP client) per measured run",
        defaults.max_in_flight, defaults.max_idle_connections
    );
    let _ = writeln!(
        out,
        "- **columns**: wall = median of {RUNS} runs for (a), (c) and the import row (all runs listed); requests = every request to the source (headers, filter headers, filters, blocks, tip); MB = wire bytes answered; blocks fetched = block requests; commits = the manager's database transactions\n"
    );

    if selection.partial {
        let _ = writeln!(out, "- **partial run**: {selection:?}\n");
    }
    let mut links = Vec::new();
    if selection.in_process {
        links.push(Link::InProcess);
    }
    if selection.charging {
        links.push(Link::Charging(link));
    }
    if selection.http {
        match runtime.block_on(HttpNode::start(&chain)) {
            Ok(node) => links.push(Link::Http(Arc::new(node))),
            Err(e) => {
                eprintln!("the stand-in node did not start: {e}");
                let _ = writeln!(out, "**ERROR**: the stand-in node did not start: {e}\n");
            }
        }
    }
    let mut imports: Vec<(Link, Row, Row)> = Vec::new();
    for l in links {
        let cases: Vec<Case> = selection
            .counts
            .iter()
            .map(|&w| {
                runtime.block_on(run_case(
                    &chain,
                    &l,
                    w,
                    &selection.strategies,
                    selection.per_wallet_clients,
                ))
            })
            .collect();
        match &l {
            Link::InProcess => {
                let _ = writeln!(out, "## In-process source\n");
            }
            Link::Charging(link) => {
                let _ = writeln!(out, "## Charging source ({link})\n");
            }
            Link::Http(_) => {
                let _ = writeln!(
                    out,
                    "## Over HTTP: the stand-in node on loopback, read through BitcoindSource\n"
                );
            }
        }
        case_tables(&mut out, &l, &cases);
        eprintln!("  {:.0} s elapsed", begun.elapsed().as_secs_f64());

        let (mut import, mut alone) = (Row::default(), Row::default());
        if !selection.import {
            continue;
        }
        for run in 0..RUNS {
            eprintln!(
                "  [{}] import into 99 synced, run {}/{RUNS}",
                l.name(),
                run + 1
            );
            let r = runtime.block_on(import_run(&chain, &l, run == 0, &mut import));
            if let Some(m) = import.record("import", r) {
                eprintln!("    {:.3} s", m.wall.as_secs_f64());
            }
            eprintln!(
                "  [{}] the same wallet alone, run {}/{RUNS}",
                l.name(),
                run + 1
            );
            let r = runtime.block_on(alone_run(&chain, &l));
            if let Some(m) = alone.record("alone", r) {
                eprintln!("    {:.3} s", m.wall.as_secs_f64());
            }
        }
        imports.push((l, import, alone));
        eprintln!("  {:.0} s elapsed", begun.elapsed().as_secs_f64());
    }

    if !imports.is_empty() {
        import_tables(&mut out, tip, &imports);
    }
    publish_report(out, "sync-results.md", begun);
}

fn import_tables(out: &mut String, tip: u32, imports: &[(Link, Row, Row)]) {
    let _ = writeln!(
        out,
        "## Import one wallet (w{}, born at the first scanned height) while 99 are synced\n\nBoth rows are measured from the call that creates the wallet (deriving its 1,000 scripts) to the end of its scan: `register` into a manager whose 99 wallets are synced to {tip}, against a fresh manager that registers it alone and runs `sync()`.\n",
        SYNC_WALLETS - 1
    );
    out.push_str(
        &HEADER
            .replacen("| W |", "| source |", 1)
            .replacen("|---:|", "|---|", 1),
    );
    for (l, import, alone) in imports {
        table_row(out, l.name(), "import into 99 synced", import);
        table_row(out, l.name(), "alone: register + sync", alone);
    }
    out.push('\n');
    out.push_str("| source | ratio | measured | target | verdict |\n|---|---|---:|---|---|\n");
    for (l, import, alone) in imports {
        match (import.median(), alone.median()) {
            (Some(i), Some(a)) => {
                let r = ratio(i.wall, a.wall);
                let _ = writeln!(
                    out,
                    "| {} | import / alone wall | {r:.2} | ≤ {IMPORT_TARGET} | {} |",
                    l.name(),
                    verdict(r <= IMPORT_TARGET)
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "| {} | import / alone wall | n/a | ≤ {IMPORT_TARGET} | MISS (no data) |",
                    l.name()
                );
            }
        }
    }
}
