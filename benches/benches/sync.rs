//! The sync benchmark of issue #6, with its own harness (one run takes
//! minutes, not microseconds): `cargo xtask bench sync`.
//!
//! On the cached 2,000-block chain of [`sync_chain`] (standard load, filters
//! of about 1,500 elements, three payments to each benchmark wallet), for
//! W = 10 and 100 watch-only wallets of 1,000 scripts each, in one run:
//!
//! - **(a)** the manager: the W wallets registered, then one `sync()` from
//!   height 0 to the tip;
//! - **(b)** the same wallets one by one, each with its own database,
//!   manager, source wrapper and loop (its own matching, fetching and
//!   commits): what one light client per wallet costs;
//! - **(c)** the floor: every filter fetched through the same kind of
//!   source with the manager's prefetch depth, and every watched script
//!   hashed once per block with the block's SipHash keys; nothing else;
//! - **(d)** the floor plus the blocks any BIP158 client must fetch (those
//!   paying the wallets, and the filters' false positives), fetched and
//!   left untouched. (d)/(c) shows how much of (a)/(c) no manager can
//!   avoid.
//!
//! Each row gives wall time, requests, filter requests, bytes, blocks
//! fetched and commits. Everything runs twice: with the in-process source,
//! and through [`Metered::charging`] (a per-request latency and a shared
//! bandwidth, stated in the output). Then the import row: one wallet
//! imported into a manager whose 99 wallets are synced, against a fresh
//! manager syncing that wallet alone. The ratios are printed next to the
//! issue's targets.
//!
//! Output: a markdown report on stdout, also written to
//! `target/lockstep-bench/sync-results.md`; progress on stderr.
//!
//! Arguments after `--` narrow a run while iterating (the report then says
//! it is partial): `in-process` or `charging`, `10` or `100`, `no-b`,
//! `no-import`; `filters` or `blocks` force every manager's strategy (a
//! diagnostic run). E.g. `cargo xtask bench sync -- charging 100 no-b`.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bitcoin::hashes::Hash as _;
use lockstep_benches::{
    SYNC_FROM, SYNC_PAYMENTS_PER_WALLET, SYNC_WALLET_SEED, SYNC_WALLETS, load_average,
    publish_report, sync_chain, sync_payments, thousands,
};
use lockstep_chain::metered::{LinkModel, Meter, Metered};
use lockstep_chain::{ChainSource, SimChain};
use lockstep_filter::{BasicFilter, Watchlist, hash_floor, matches};
use lockstep_manager::{Manager, ManagerConfig, NewWallet, Stats, Strategy};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::{check_wallet, test_descriptors};
use lockstep_wallet::Wallet;
use tokio::task::JoinHandle;

/// Runs whose median is reported for (a), (c) and the import row.
const RUNS: usize = 3;
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
/// (b)/(a) at least this (W = 100, charging source).
const ONE_BY_ONE_TARGET: f64 = 10.0;

/// What to run: everything unless arguments after `--` narrow it
/// (`cargo xtask bench sync -- in-process 100 no-b no-import`), or force
/// the managers' strategy for a diagnostic run (`filters`, `blocks`).
#[derive(Debug, Clone)]
struct Selection {
    in_process: bool,
    charging: bool,
    counts: Vec<u32>,
    one_by_one: bool,
    import: bool,
    /// `filters` or `blocks`: every manager uses that strategy (diagnostic).
    strategy: Option<Strategy>,
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
        let any_link = has("in-process") || has("charging");
        let counts: Vec<u32> = WALLET_COUNTS
            .iter()
            .copied()
            .filter(|w| has(&w.to_string()))
            .collect();
        for a in &args {
            let known = [
                "in-process",
                "charging",
                "no-b",
                "no-import",
                "filters",
                "blocks",
            ]
            .contains(&a.as_str())
                || WALLET_COUNTS.iter().any(|w| w.to_string() == *a);
            if !known {
                eprintln!(
                    "ignoring argument {a:?} (known: in-process, charging, 10, 100, no-b, no-import, filters, blocks)"
                );
            }
        }
        Selection {
            in_process: !any_link || has("in-process"),
            charging: !any_link || has("charging"),
            counts: if counts.is_empty() {
                WALLET_COUNTS.to_vec()
            } else {
                counts
            },
            one_by_one: !has("no-b"),
            import: !has("no-import"),
            strategy: if has("filters") {
                Some(Strategy::Filters)
            } else if has("blocks") {
                Some(Strategy::Blocks)
            } else {
                None
            },
            partial: !args.is_empty(),
        }
    }
}

/// A strategy forced by the command line (a diagnostic run); `None`: the
/// default configuration's.
static FORCED_STRATEGY: OnceLock<Option<Strategy>> = OnceLock::new();

/// The configuration of every manager the benchmark runs.
fn manager_config() -> ManagerConfig {
    let mut config = ManagerConfig {
        // Blocks up to SYNC_FROM - 1 are taken as already processed.
        start_height: SYNC_FROM - 1,
        ..ManagerConfig::default()
    };
    if let Some(Some(strategy)) = FORCED_STRATEGY.get() {
        config.strategy = *strategy;
    }
    config
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Which source the runs read through.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// The simulated chain in the same process, behind a counting wrapper.
    InProcess,
    /// The same, charging each request a network's cost.
    Charging(LinkModel),
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::InProcess => "in-process",
            Link::Charging(_) => "charging",
        }
    }

    /// A fresh wrapper (fresh counters, a free link) over the chain.
    fn source(self, chain: &SimChain) -> Metered {
        let inner: Arc<dyn ChainSource> = Arc::new(chain.clone());
        match self {
            Link::InProcess => Metered::new(inner),
            Link::Charging(link) => Metered::charging(inner, link),
        }
    }
}

/// What one measured run cost.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    wall: Duration,
    meter: Meter,
    commits: u64,
    /// The manager's own count of blocks fetched (cross-checks the meter).
    stats_blocks: u64,
    switches: u64,
    false_positives: u64,
}

impl Measured {
    fn of(wall: Duration, m0: Meter, m1: Meter, s0: Stats, s1: Stats) -> Measured {
        Measured {
            wall,
            meter: Meter {
                requests: m1.requests - m0.requests,
                filters: m1.filters - m0.filters,
                blocks: m1.blocks - m0.blocks,
                headers: m1.headers - m0.headers,
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
                eprintln!("  {what}: ERROR {e}");
                self.errors.push(format!("{what}: {e}"));
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
/// `LOCKSTEP_PERF_ROW=sync` or `floor` keeps only one of the two.
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

fn fresh(chain: &SimChain, link: Link) -> Res<Fresh> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("lockstep.db"), StoreOptions::default())?;
    let metered = link.source(chain);
    let manager = Manager::new(store.clone(), Arc::new(metered.clone()), manager_config());
    Ok(Fresh {
        manager,
        store,
        metered,
        _dir: dir,
    })
}

impl Fresh {
    /// `sync()` to the tip, measured; checks it connected every block.
    async fn timed_sync(&self, tip: u32) -> Res<Measured> {
        let (m0, s0) = (self.metered.meter(), self.manager.stats());
        perf_control("sync", "enable");
        let start = Instant::now();
        let height = self.manager.sync().await?;
        let wall = start.elapsed();
        perf_control("sync", "disable");
        let (m1, s1) = (self.metered.meter(), self.manager.stats());
        if height != tip {
            return Err(format!("sync() stopped at {height}, the source's tip is {tip}").into());
        }
        let connected = s1.blocks_connected - s0.blocks_connected;
        if connected != u64::from(tip - (SYNC_FROM - 1)) {
            return Err(format!("sync() connected {connected} blocks, expected {tip}").into());
        }
        Ok(Measured::of(wall, m0, m1, s0, s1))
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
/// `sync()`. The first run also compares some wallets with the oracle and
/// returns the scripts the wallets were registered with, for the floor.
async fn manager_run(
    chain: &SimChain,
    link: Link,
    wallets: &[u32],
    first: bool,
    row: &mut Row,
) -> Res<(Measured, Option<Vec<Vec<u8>>>)> {
    let tip = chain.height();
    let f = fresh(chain, link)?;
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

/// (b): each wallet on its own: a fresh database, manager and source
/// wrapper; registration not measured, `sync()` measured; the sum.
async fn one_by_one(chain: &SimChain, link: Link, wallets: &[u32]) -> Res<Measured> {
    let tip = chain.height();
    let mut total = Measured::default();
    let started = Instant::now();
    for (n, &i) in wallets.iter().enumerate() {
        let f = fresh(chain, link)?;
        f.manager.register(new_wallet(i)).await?;
        let m = f.timed_sync(tip).await?;
        total.add(&m);
        if (n + 1) % 10 == 0 && wallets.len() > 10 {
            eprintln!(
                "    {}/{} wallets, {:.1} s measured, {:.0} s elapsed",
                n + 1,
                wallets.len(),
                total.wall.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(total)
}

/// The floor's watchlists: one, or (at [`PARALLEL_FROM`] scripts and more,
/// with two rayon threads) two halves of the same composition, hashed in
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

fn hash_all(k0: u64, k1: u64, lists: &[Watchlist<u32>]) -> u64 {
    match lists {
        [a, b] => {
            let (x, y) = rayon::join(|| hash_floor(k0, k1, a), || hash_floor(k0, k1, b));
            x.wrapping_add(y)
        }
        _ => lists
            .iter()
            .fold(0, |acc, l| acc.wrapping_add(hash_floor(k0, k1, l))),
    }
}

/// (c): block hashes from batched headers, then every filter fetched with
/// the manager's prefetch depth of concurrent tasks, each hashing every
/// watched script with its block's keys. Nothing decoded, checked or
/// committed.
///
/// (d), with `also_fetch` the heights of [`must_fetch`]: the same, and
/// those blocks fetched too (by the task of their height, after its
/// filter), untouched. No BIP158 client can fetch less, so (d)/(c) bounds
/// how close to (c) any manager can come.
async fn floor_run(
    chain: &SimChain,
    link: Link,
    lists: Arc<Vec<Watchlist<u32>>>,
    also_fetch: Arc<BTreeSet<u32>>,
) -> Res<Measured> {
    let config = ManagerConfig::default();
    let tip = chain.height();
    let metered = link.source(chain);
    let source: Arc<dyn ChainSource> = Arc::new(metered.clone());
    let m0 = metered.meter();
    let start = Instant::now();
    let blocks = tip - (SYNC_FROM - 1);
    let mut hashes = Vec::with_capacity(blocks as usize);
    while (hashes.len() as u32) < blocks {
        let from = SYNC_FROM + hashes.len() as u32;
        let count = config.header_batch.min(tip - from + 1);
        let headers = source.headers(from, count).await?;
        if headers.is_empty() {
            return Err(format!("no headers from {from}").into());
        }
        hashes.extend(headers.iter().map(|h| h.block_hash()));
    }
    let mut inflight: VecDeque<JoinHandle<Res<u64>>> = VecDeque::new();
    let mut next = 0;
    let mut acc = 0u64;
    perf_control("floor", "enable");
    loop {
        while inflight.len() < config.prefetch && next < hashes.len() {
            let (source, lists, hash) = (Arc::clone(&source), Arc::clone(&lists), hashes[next]);
            let fetch_block = also_fetch.contains(&(SYNC_FROM + next as u32));
            inflight.push_back(tokio::spawn(async move {
                let raw = source.filter(hash).await?;
                black_box(&raw);
                if fetch_block {
                    black_box(source.block(hash).await?);
                }
                let key = hash.to_byte_array();
                let k0 = u64::from_le_bytes(key[0..8].try_into().expect("8 bytes"));
                let k1 = u64::from_le_bytes(key[8..16].try_into().expect("8 bytes"));
                Ok(hash_all(k0, k1, &lists))
            }));
            next += 1;
        }
        let Some(task) = inflight.pop_front() else {
            break;
        };
        acc = acc.wrapping_add(task.await??);
    }
    black_box(acc);
    let wall = start.elapsed();
    perf_control("floor", "disable");
    let s = Stats::default();
    Ok(Measured::of(wall, m0, metered.meter(), s, s))
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
async fn import_run(chain: &SimChain, link: Link, first: bool, row: &mut Row) -> Res<Measured> {
    let tip = chain.height();
    let f = fresh(chain, link)?;
    for i in 0..SYNC_WALLETS - 1 {
        f.manager.register(new_wallet(i)).await?;
    }
    let height = f.manager.sync().await?;
    if height != tip {
        return Err(format!("the 99 wallets synced to {height}, not {tip}").into());
    }
    let (m0, s0) = (f.metered.meter(), f.manager.stats());
    let start = Instant::now();
    let id = f.manager.register(new_wallet(SYNC_WALLETS - 1)).await?;
    let wall = start.elapsed();
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
    Ok(Measured::of(wall, m0, m1, s0, s1))
}

/// The import row's reference, one run: a fresh manager with that wallet
/// alone, measured from registration (deriving its scripts, as the import
/// does) to the end of `sync()`.
async fn alone_run(chain: &SimChain, link: Link) -> Res<Measured> {
    let tip = chain.height();
    let f = fresh(chain, link)?;
    let (m0, s0) = (f.metered.meter(), f.manager.stats());
    let start = Instant::now();
    f.manager.register(new_wallet(SYNC_WALLETS - 1)).await?;
    let height = f.manager.sync().await?;
    let wall = start.elapsed();
    let (m1, s1) = (f.metered.meter(), f.manager.stats());
    if height != tip {
        return Err(format!("sync() stopped at {height}, not {tip}").into());
    }
    Ok(Measured::of(wall, m0, m1, s0, s1))
}

/// The three rows and their ratios for one source and one W.
struct Case {
    w: u32,
    a: Row,
    b: Row,
    c: Row,
    d: Row,
    /// Blocks paying these wallets.
    paying: usize,
    /// Blocks paying them or matching their scripts by a filter's false
    /// positive: what the manager must fetch at least.
    must_fetch: usize,
}

async fn run_case(chain: &SimChain, link: Link, w: u32, with_b: bool) -> Case {
    let wallets: Vec<u32> = (0..w).collect();
    let paying: BTreeSet<u32> = sync_payments()
        .iter()
        .filter(|p| p.wallet < w)
        .map(|p| p.height)
        .collect();
    let mut case = Case {
        w,
        a: Row::default(),
        b: Row::default(),
        c: Row::default(),
        d: Row::default(),
        paying: paying.len(),
        must_fetch: 0,
    };
    let mut must: Option<Arc<BTreeSet<u32>>> = None;
    let mut lists: Option<Arc<Vec<Watchlist<u32>>>> = None;
    for run in 0..RUNS {
        eprintln!(
            "  [{} W={w}] (a) manager, run {}/{RUNS}",
            link.name(),
            run + 1
        );
        let mut row = std::mem::take(&mut case.a);
        let result = manager_run(chain, link, &wallets, lists.is_none(), &mut row).await;
        let measured = result.map(|(m, scripts)| {
            if let Some(scripts) = scripts {
                let built = floor_lists(&scripts);
                if built.len() > 1 {
                    case.c.note(format!(
                        "{} scripts hashed in {} parts on rayon::join",
                        thousands(scripts.len() as u64),
                        built.len()
                    ));
                } else {
                    case.c.note(format!(
                        "{} scripts hashed per block on one core (below {}; blocks run in parallel across tasks, as the manager's do)",
                        thousands(scripts.len() as u64),
                        thousands(PARALLEL_FROM as u64)
                    ));
                }
                lists = Some(Arc::new(built));
            }
            m
        });
        if let Some(m) = row.record("(a)", measured) {
            eprintln!("    {:.3} s", m.wall.as_secs_f64());
            if m.stats_blocks != m.meter.blocks {
                row.note(format!(
                    "manager counted {} blocks fetched, the source {}",
                    m.stats_blocks, m.meter.blocks
                ));
            }
            if (m.meter.blocks as usize) < paying.len() {
                row.errors.push(format!(
                    "fetched {} blocks, but {} blocks pay these wallets",
                    m.meter.blocks,
                    paying.len()
                ));
            }
            if (m.meter.blocks as usize) < case.must_fetch {
                row.note(format!(
                    "fetched {} blocks, fewer than the {} whose filters match the scripts registered at the start",
                    m.meter.blocks, case.must_fetch
                ));
            }
        }
        case.a = row;
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
            "  [{} W={w}] (b) one by one, run {}/{RUNS}",
            link.name(),
            run + 1
        );
        let started = Instant::now();
        let result = one_by_one(chain, link, &wallets).await;
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

const HEADER: &str = "| W | row | wall (s) | runs (s) | requests | filter req | MB fetched | blocks fetched | commits | notes |\n|---:|---|---:|---|---:|---:|---:|---:|---:|---|\n";

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
            "counts differ between runs (blocks fetched: {}; requests: {})",
            per_run(|m| m.meter.blocks),
            per_run(|m| m.meter.requests)
        ));
    }
    notes.extend(row.errors.iter().map(|e| format!("**ERROR** {e}")));
    let notes = notes.join("; ");
    match row.median() {
        Some(m) => {
            let _ = writeln!(
                out,
                "| {w} | {label} | {} | {runs} | {} | {} | {:.2} | {} | {} | {notes} |",
                secs(m.wall),
                thousands(m.meter.requests),
                thousands(m.meter.filters),
                m.meter.bytes as f64 / 1e6,
                thousands(m.meter.blocks),
                thousands(m.commits),
            );
        }
        None => {
            let _ = writeln!(out, "| {w} | {label} | n/a | | | | | | | {notes} |");
        }
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn case_tables(out: &mut String, link: Link, cases: &[Case]) {
    out.push_str(HEADER);
    for case in cases {
        let w = case.w.to_string();
        table_row(out, &w, "(a) manager", &case.a);
        table_row(out, &w, "(b) one by one", &case.b);
        table_row(out, &w, "(c) floor", &case.c);
        table_row(out, &w, "(d) floor + blocks to fetch", &case.d);
    }
    out.push('\n');
    out.push_str("| W | ratio | measured | target | verdict |\n|---:|---|---:|---|---|\n");
    for case in cases {
        let (a, b, c) = (case.a.median(), case.b.median(), case.c.median());
        let d = case.d.median();
        let w = case.w;
        match (a, c) {
            (Some(a), Some(c)) => {
                let r = ratio(a.wall, c.wall);
                let _ = writeln!(
                    out,
                    "| {w} | (a)/(c) wall | {r:.2} | ≤ {FLOOR_TARGET} | {} |",
                    verdict(r <= FLOOR_TARGET)
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "| {w} | (a)/(c) wall | n/a | ≤ {FLOOR_TARGET} | MISS (no data) |"
                );
            }
        }
        if let (Some(a), Some(c), Some(d)) = (a, c, d) {
            let _ = writeln!(
                out,
                "| {w} | (d)/(c) wall: the blocks to fetch alone | {:.2} | (above {FLOOR_TARGET}, no manager meets (a)/(c) ≤ {FLOOR_TARGET}) | info |",
                ratio(d.wall, c.wall)
            );
            let _ = writeln!(
                out,
                "| {w} | (a)/(d) wall | {:.2} | | info |",
                ratio(a.wall, d.wall)
            );
        }
        let targeted = w == 100 && matches!(link, Link::Charging(_));
        match (a, b) {
            (Some(a), Some(b)) => {
                let r = ratio(b.wall, a.wall);
                let (target, v) = if targeted {
                    (
                        format!("≥ {ONE_BY_ONE_TARGET}"),
                        verdict(r >= ONE_BY_ONE_TARGET),
                    )
                } else {
                    (
                        format!("(≥ {ONE_BY_ONE_TARGET} at W = 100, charging)"),
                        "info",
                    )
                };
                let _ = writeln!(out, "| {w} | (b)/(a) wall | {r:.2} | {target} | {v} |");
                let fr = b.meter.filters as f64 / a.meter.filters.max(1) as f64;
                let exact = b.meter.filters == u64::from(w) * a.meter.filters;
                let _ = writeln!(
                    out,
                    "| {w} | (b)/(a) filter requests | {fr:.2} ({} / {}) | = W = {w} | {} |",
                    thousands(b.meter.filters),
                    thousands(a.meter.filters),
                    verdict(exact)
                );
                let rr = b.meter.requests as f64 / a.meter.requests.max(1) as f64;
                let _ = writeln!(out, "| {w} | (b)/(a) requests | {rr:.2} | | info |");
            }
            _ => {
                let _ = writeln!(out, "| {w} | (b)/(a) | n/a | | MISS (no data) |");
            }
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
    FORCED_STRATEGY
        .set(selection.strategy)
        .expect("set once, before any manager");
    let config = manager_config();

    let mut out = String::new();
    let _ = writeln!(out, "# lockstep sync benchmark (issue #6)\n");
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
        "- **manager**: `ManagerConfig::default()`{} (batch {}, prefetch {}, {} headers per request, strategy {:?}); one SQLite database per manager (synchronous=FULL) in a temporary directory on the same disk as `target/`",
        if selection.strategy.is_some() {
            " **with the strategy forced (diagnostic run)**"
        } else {
            ""
        },
        config.batch_size,
        config.prefetch,
        config.header_batch,
        config.strategy
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
        "- **(b) one by one**: per wallet its own database, manager, source wrapper and loop; the sum of the W measured `sync()` calls"
    );
    let _ = writeln!(
        out,
        "- **(c) floor**: block hashes from headers in batches of {}, then every filter fetched through the same kind of source by {} concurrent tokio tasks, each hashing every watched script (the W × 1,000 registered) once with its block's SipHash keys; no decoding, filter headers, checks or commits. From {} scripts on, the watchlist is split in 2 halves hashed with `rayon::join` (the manager instead matches each block on one thread, blocks in parallel across tasks: the same work on the same two cores)",
        config.header_batch,
        config.prefetch,
        thousands(PARALLEL_FROM as u64)
    );
    let _ = writeln!(
        out,
        "- **(d) floor + blocks to fetch**: (c), and the task of each block any BIP158 client watching these scripts must fetch also fetches it (after its filter) and does nothing with it. Those blocks are the ones paying the W wallets and the ones whose filter matches a watched script by a false positive (1 in M per script per block, so about W × 1,000 / 784,931 of all blocks), found before timing. (d)/(c) is the part of (a)/(c) no manager can avoid"
    );
    let _ = writeln!(
        out,
        "- **sources**: *in-process* = the SimChain behind `Metered::new` (counts, costs nothing); *charging* = `Metered::charging(LinkModel::datacenter())`: **{link}**; a fresh wrapper per measured run (per wallet in (b))"
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
    let mut imports: Vec<(Link, Row, Row)> = Vec::new();
    for l in links {
        let cases: Vec<Case> = selection
            .counts
            .iter()
            .map(|&w| runtime.block_on(run_case(&chain, l, w, selection.one_by_one)))
            .collect();
        match l {
            Link::InProcess => {
                let _ = writeln!(out, "## In-process source\n");
            }
            Link::Charging(link) => {
                let _ = writeln!(out, "## Charging source ({link})\n");
            }
        }
        case_tables(&mut out, l, &cases);

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
            let r = runtime.block_on(import_run(&chain, l, run == 0, &mut import));
            if let Some(m) = import.record("import", r) {
                eprintln!("    {:.3} s", m.wall.as_secs_f64());
            }
            eprintln!(
                "  [{}] the same wallet alone, run {}/{RUNS}",
                l.name(),
                run + 1
            );
            let r = runtime.block_on(alone_run(&chain, l));
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
