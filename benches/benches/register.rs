//! Registering many wallets and restarting with them, with its
//! own harness: `cargo xtask bench register`.
//!
//! 100 watch-only wallets ([`test_descriptors`]`(REGISTER_SEED, i)`: wpkh,
//! tr and 2-of-2 wsh by `i % 3`), lookahead 500 on each keychain = 1,000
//! scripts each, 100,000 in all. Each round measures, in this order:
//!
//! - **serial derivation**: the 100,000 scripts derived on this thread
//!   with `WalletDescriptors::script_at`, no database: the reference, what
//!   one core costs;
//! - **rayon derivation**: the same, each keychain's 500 scripts as
//!   `(0..500).into_par_iter()` as `Wallet::create` derives them, no
//!   database: what spreading over the cores buys at best;
//! - **register**: `Manager::register` of the 100 wallets, one after the
//!   other, into a fresh database (a manager synced to a 5-block chain;
//!   every wallet born above its tip, so nothing is scanned);
//! - **register, 100 tasks at once**: the same from 100 tasks: the
//!   manager takes one registration at a time, but each derives its first
//!   scripts before, so derivation overlaps the commits;
//! - **database floor**: the rows `Wallet::create` writes (wallet,
//!   keychains, the 100,000 precomputed scripts), one transaction per
//!   wallet as registration commits, into a fresh database: the part of
//!   registering no derivation is in;
//! - **restart**: on the database `register` filled, with its manager
//!   dropped: `Store::open` (its integrity check included), `Manager::new`
//!   and the first `sync()`, which loads the books from the stored scripts
//!   (nothing derived);
//! - **registry load**: `Registry::get_or_load` of the 100 wallets on a
//!   fresh registry over that store (each `Wallet::load` reads its 1,000
//!   scripts and derives one per keychain to check them).
//!
//! One run takes a minute or two: criterion's ten samples of a 7-second
//! row would take minutes per row, so this harness runs every row once per
//! round, [`ROUNDS`] rounds, and reports medians; the rows of a round run
//! back to back, so the machine's drift reaches all of them alike and
//! their ratios hold. Each row also reports the process's CPU time, which
//! a busy machine does not inflate as it does wall time. Output: a markdown report on stdout, also written to
//! `target/lockstep-bench/register-results.md`; progress on stderr.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::ScriptBuf;
use lockstep_benches::{load_average, publish_report, thousands};
use lockstep_chain::ChainSource;
use lockstep_manager::{Manager, ManagerConfig, NewWallet};
use lockstep_sim::{SimChain, SimParams};
use lockstep_store::{NewKeychain, Store, StoreError, StoreOptions, WalletId};
use lockstep_testkit::oracle::{KINDS, test_descriptors};
use lockstep_wallet::{DEFAULT_CAPACITY, Keychain, Registry, WalletDescriptors, WalletError};
use rayon::prelude::*;

/// Rounds; every row's median is over these.
const ROUNDS: usize = 3;
/// Wallets registered.
const WALLETS: u32 = 100;
/// Scripts derived per keychain: 2 × 500 = 1,000 per wallet.
const LOOKAHEAD: u32 = 500;
/// Seed of the wallets' descriptors.
const REGISTER_SEED: u64 = 14;
/// Height of the chain the manager syncs before registering.
const CHAIN_HEIGHT: u32 = 5;
/// The reference figure for serial derivation per script (µs), printed
/// beside the measured one to show how this machine compares.
const ISSUE_US_PER_SCRIPT: &str = "62–74";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// A wallet's scripts: external then internal.
type Scripts = [Vec<ScriptBuf>; 2];

/// A wallet's rows as the floor writes them: name, descriptors, scripts.
type WalletRows = (String, [String; 2], [Vec<Vec<u8>>; 2]);

/// One row's timing in a round.
type Timing = fn(&Round) -> Duration;

/// One round's timings.
#[derive(Debug, Clone, Default)]
struct Round {
    serial: Duration,
    /// The serial row split by script kind (wpkh, tr, wsh-multi).
    serial_by_kind: [Duration; 3],
    parallel: Duration,
    register: Duration,
    register_concurrent: Duration,
    floor: Duration,
    restart_open: Duration,
    restart_sync: Duration,
    registry_load: Duration,
    /// CPU time (user + system, every thread of the process) of the rows.
    cpu: Cpu,
    /// What the checked round found (its first).
    notes: Vec<String>,
}

/// CPU time of a round's rows.
#[derive(Debug, Clone, Default)]
struct Cpu {
    serial: Duration,
    parallel: Duration,
    register: Duration,
    register_concurrent: Duration,
    floor: Duration,
    restart: Duration,
    registry_load: Duration,
}

/// The process's CPU time so far, user + system, from `/proc/self/stat`
/// (in ticks of 10 ms: Linux's `USER_HZ` is 100); zero where unreadable.
fn cpu_now() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces): state is
            // field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace().skip(11);
            let user: u64 = fields.next()?.parse().ok()?;
            let system: u64 = fields.next()?.parse().ok()?;
            Some(user + system)
        });
    Duration::from_millis(ticks.unwrap_or(0) * 10)
}

impl Round {
    fn restart(&self) -> Duration {
        self.restart_open + self.restart_sync
    }
}

fn descriptors() -> Vec<WalletDescriptors> {
    (0..WALLETS)
        .map(|i| test_descriptors(REGISTER_SEED, i))
        .collect()
}

fn name(i: usize) -> String {
    format!("w{i}")
}

fn open(dir: &tempfile::TempDir) -> Res<Store> {
    Ok(Store::open(
        &dir.path().join("lockstep.db"),
        StoreOptions::default(),
    )?)
}

fn new_manager(store: Store, chain: &SimChain) -> Manager {
    let source: Arc<dyn ChainSource> = Arc::new(chain.clone());
    Manager::new(store, source, ManagerConfig::default())
}

/// The serial reference: every script on this thread. Returns the scripts
/// (the floor stores them) and the time per script kind.
fn serial(wallets: &[WalletDescriptors]) -> Res<(Vec<Scripts>, [Duration; 3])> {
    let mut by_kind = [Duration::ZERO; 3];
    let mut out = Vec::with_capacity(wallets.len());
    for (i, d) in wallets.iter().enumerate() {
        let began = Instant::now();
        let derive = |k: Keychain| {
            (0..LOOKAHEAD)
                .map(|n| d.script_at(k, n))
                .collect::<Result<Vec<_>, _>>()
        };
        let scripts = [derive(Keychain::External)?, derive(Keychain::Internal)?];
        by_kind[i % 3] += began.elapsed();
        out.push(scripts);
    }
    Ok((out, by_kind))
}

/// The same derivation on rayon's pool, a keychain's range at a time.
fn parallel(wallets: &[WalletDescriptors]) -> Res<Vec<Scripts>> {
    let mut out = Vec::with_capacity(wallets.len());
    for d in wallets {
        let derive = |k: Keychain| {
            (0..LOOKAHEAD)
                .into_par_iter()
                .map(|n| d.script_at(k, n))
                .collect::<Result<Vec<_>, _>>()
        };
        out.push([derive(Keychain::External)?, derive(Keychain::Internal)?]);
    }
    Ok(out)
}

/// A manager synced to the chain's tip on a fresh database in `dir`.
async fn synced_manager(dir: &tempfile::TempDir, chain: &SimChain) -> Res<Manager> {
    let manager = new_manager(open(dir)?, chain);
    let tip = manager.sync().await?;
    assert_eq!(tip, chain.height());
    Ok(manager)
}

/// Registers the wallets (timed); returns their ids.
async fn register(
    manager: &Manager,
    wallets: &[WalletDescriptors],
    born: u32,
) -> Res<(Duration, Duration, Vec<WalletId>)> {
    let (began, cpu) = (Instant::now(), cpu_now());
    let mut ids = Vec::with_capacity(wallets.len());
    for (i, d) in wallets.iter().enumerate() {
        let wallet = NewWallet::new(name(i), d.clone())
            .born_at(born)
            .lookahead(LOOKAHEAD);
        ids.push(manager.register(wallet).await?);
    }
    Ok((began.elapsed(), cpu_now() - cpu, ids))
}

/// Registers the wallets from 100 tasks at once (timed): the manager holds
/// one registration at a time, but each derives its scripts before that.
async fn register_concurrently(
    manager: &Manager,
    wallets: &[WalletDescriptors],
    born: u32,
) -> Res<(Duration, Duration)> {
    let (began, cpu) = (Instant::now(), cpu_now());
    let tasks: Vec<_> = wallets
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let manager = manager.clone();
            let wallet = NewWallet::new(name(i), d.clone())
                .born_at(born)
                .lookahead(LOOKAHEAD);
            tokio::spawn(async move { manager.register(wallet).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((began.elapsed(), cpu_now() - cpu))
}

/// The database's part: what `Wallet::create` writes, from precomputed
/// scripts, one transaction per wallet.
async fn floor(
    store: &Store,
    wallets: &[WalletDescriptors],
    scripts: &[Scripts],
    born: u32,
) -> Res<(Duration, Duration)> {
    // Serialized outside the timing: the wallet does this too, but it is
    // not the database's work.
    let rows: Vec<WalletRows> = wallets
        .iter()
        .zip(scripts)
        .enumerate()
        .map(|(i, (d, s))| {
            (
                name(i),
                Keychain::ALL.map(|k| d.descriptor(k).to_string()),
                [0, 1].map(|k| s[k].iter().map(|s| s.to_bytes()).collect()),
            )
        })
        .collect();
    let network = wallets[0].network().to_core_arg();
    let (began, cpu) = (Instant::now(), cpu_now());
    for (name, descriptors, scripts) in rows {
        store
            .write(move |tx| {
                let id = tx.insert_wallet(&name, born, None)?;
                for k in Keychain::ALL {
                    let keychain = NewKeychain {
                        keychain: k.as_u8(),
                        network,
                        descriptor: &descriptors[k.as_u8() as usize],
                        lookahead: LOOKAHEAD,
                    };
                    tx.insert_keychain(id, keychain)?;
                    tx.append_scripts(id, k.as_u8(), 0, &scripts[k.as_u8() as usize])?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
    }
    Ok((began.elapsed(), cpu_now() - cpu))
}

/// One round of every row. `check`: compare what each path produced
/// (outside the timings).
async fn round(chain: &SimChain, wallets: &[WalletDescriptors], check: bool) -> Res<Round> {
    let mut r = Round::default();
    let born = chain.height() + 1;

    eprintln!("  serial derivation");
    let (began, cpu) = (Instant::now(), cpu_now());
    let (scripts, by_kind) = serial(wallets)?;
    r.serial = began.elapsed();
    r.cpu.serial = cpu_now() - cpu;
    r.serial_by_kind = by_kind;

    eprintln!("  rayon derivation");
    let (began, cpu) = (Instant::now(), cpu_now());
    let spread = black_box(parallel(wallets)?);
    r.parallel = began.elapsed();
    r.cpu.parallel = cpu_now() - cpu;
    if check {
        assert!(spread == scripts, "rayon and serial derivations differ");
    }
    drop(spread);

    eprintln!("  register");
    let dir = tempfile::tempdir()?;
    let manager = synced_manager(&dir, chain).await?;
    let (took, cpu, ids) = register(&manager, wallets, born).await?;
    (r.register, r.cpu.register) = (took, cpu);
    if check {
        r.notes.push(format!(
            "register: {} wallets joined without an import scan, {} loaded in the registry",
            manager.stats().imports,
            manager.registry().stats().loaded
        ));
    }
    drop(manager);

    eprintln!("  register, 100 at once");
    let at_once_dir = tempfile::tempdir()?;
    let at_once = synced_manager(&at_once_dir, chain).await?;
    (r.register_concurrent, r.cpu.register_concurrent) =
        register_concurrently(&at_once, wallets, born).await?;
    if check {
        assert_eq!(at_once.registry().stats().loaded, wallets.len());
    }
    drop(at_once);
    drop(at_once_dir);

    eprintln!("  database floor");
    let floor_dir = tempfile::tempdir()?;
    let store = open(&floor_dir)?;
    (r.floor, r.cpu.floor) = floor(&store, wallets, &scripts, born).await?;
    drop(store);
    drop(floor_dir);

    eprintln!("  restart");
    let (began, cpu) = (Instant::now(), cpu_now());
    let store = open(&dir)?;
    r.restart_open = began.elapsed();
    let began = Instant::now();
    let manager = new_manager(store.clone(), chain);
    let tip = manager.sync().await?;
    r.restart_sync = began.elapsed();
    r.cpu.restart = cpu_now() - cpu;
    assert_eq!(tip, chain.height());
    if check {
        r.notes.push(format!(
            "restart: the first sync loaded {} wallets (the books come from the stored scripts) and made {} commits",
            manager.registry().stats().loads,
            manager.stats().commits
        ));
    }
    drop(manager);

    eprintln!("  registry load");
    let registry = Registry::new(store.clone(), DEFAULT_CAPACITY);
    let (began, cpu) = (Instant::now(), cpu_now());
    let loads: Vec<_> = ids
        .iter()
        .map(|&id| {
            let registry = registry.clone();
            tokio::spawn(async move { registry.get_or_load(id).await })
        })
        .collect();
    let mut live = Vec::with_capacity(loads.len());
    for load in loads {
        live.push(load.await??);
    }
    r.registry_load = began.elapsed();
    r.cpu.registry_load = cpu_now() - cpu;
    if check {
        for (w, s) in live.iter().zip(&scripts) {
            // The live instance's scripts, read on the writer as the loop does.
            let live = Arc::clone(w);
            let w = registry
                .store()
                .write(move |tx| Ok::<_, WalletError>(live.wallet_in(tx).clone()))
                .await?;
            for k in Keychain::ALL {
                assert!(
                    w.scripts(k) == s[k.as_u8() as usize].as_slice(),
                    "wallet {} loaded other scripts than derived",
                    w.id()
                );
            }
        }
        r.notes.push(format!(
            "registry load: every wallet's 1,000 scripts equal the serial derivation's ({} loads)",
            registry.stats().loads
        ));
    }
    drop(live);
    drop(registry);
    drop(store);
    drop(dir);
    Ok(r)
}

fn median(rounds: &[Round], f: impl Fn(&Round) -> Duration) -> Duration {
    let mut v: Vec<Duration> = rounds.iter().map(f).collect();
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`: nothing to choose.
    let begun = Instant::now();
    let load_start = load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let chain = SimChain::generate(SimParams::unsigned(REGISTER_SEED), CHAIN_HEIGHT)
        .expect("generating a 5-block chain");
    let wallets = descriptors();
    let scripts = u64::from(WALLETS) * 2 * u64::from(LOOKAHEAD);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut rounds = Vec::new();
    for n in 0..ROUNDS {
        eprintln!("register benchmark: round {}/{ROUNDS}", n + 1);
        match runtime.block_on(round(&chain, &wallets, n == 0)) {
            Ok(r) => {
                eprintln!(
                    "    serial {} / rayon {} / register {} / floor {} / restart {} / registry {}",
                    ms(r.serial),
                    ms(r.parallel),
                    ms(r.register),
                    ms(r.floor),
                    ms(r.restart()),
                    ms(r.registry_load)
                );
                rounds.push(r);
            }
            Err(e) => {
                eprintln!("round {}: ERROR {e}", n + 1);
                std::process::exit(1);
            }
        }
    }

    let per_script = |d: Duration| d.as_secs_f64() * 1e6 / scripts as f64;
    let mut out = String::new();
    let _ = writeln!(out, "# lockstep register benchmark\n");
    let _ = writeln!(
        out,
        "- **wallets**: {WALLETS} watch-only `test_descriptors({REGISTER_SEED}, i)` (wpkh / tr / wsh 2-of-2 by i % 3), lookahead {LOOKAHEAD} per keychain: {} scripts",
        thousands(scripts)
    );
    let _ = writeln!(
        out,
        "- **machine**: {cores} cores (`available_parallelism`), rayon {} threads, tokio 2 workers; load average (1 min) at start {load_start}",
        rayon::current_num_threads()
    );
    let _ = writeln!(
        out,
        "- **database**: SQLite (WAL, synchronous=FULL) in a temporary directory, a fresh one per round for `register` and for the floor; `restart` and `registry load` use `register`'s, its manager dropped (warm page cache)"
    );
    let _ = writeln!(
        out,
        "- medians of {ROUNDS} rounds; every row runs once per round, back to back; CPU = user + system time of the whole process (every thread) during the row, in 10 ms ticks: unlike wall time, it does not grow when another process takes a core\n"
    );
    out.push_str(
        "| row | wall (median) | wall per script | rounds (wall) | CPU (median) | CPU per script |\n|---|---:|---:|---|---:|---:|\n",
    );
    let rows: [(&str, Timing, Option<Timing>); 8] = [
        (
            "serial derivation (one core, no database)",
            |r| r.serial,
            Some(|r| r.cpu.serial),
        ),
        (
            "rayon derivation (no database)",
            |r| r.parallel,
            Some(|r| r.cpu.parallel),
        ),
        (
            "**register** (`Manager::register` × 100)",
            |r| r.register,
            Some(|r| r.cpu.register),
        ),
        (
            "**register, 100 tasks at once**",
            |r| r.register_concurrent,
            Some(|r| r.cpu.register_concurrent),
        ),
        (
            "database floor (the rows `Wallet::create` writes, scripts precomputed)",
            |r| r.floor,
            Some(|r| r.cpu.floor),
        ),
        (
            "**restart**: `Store::open` + `Manager::new` + first `sync()`",
            |r| r.restart(),
            Some(|r| r.cpu.restart),
        ),
        (
            "… of which `Store::open` (integrity check)",
            |r| r.restart_open,
            None,
        ),
        (
            "registry load (`get_or_load` × 100, fresh registry)",
            |r| r.registry_load,
            Some(|r| r.cpu.registry_load),
        ),
    ];
    for (label, wall, cpu) in rows {
        let m = median(&rounds, wall);
        let all = rounds
            .iter()
            .map(|r| ms(wall(r)))
            .collect::<Vec<_>>()
            .join(" / ");
        let cpu = cpu.map_or_else(
            || " | ".to_owned(),
            |cpu| {
                let c = median(&rounds, cpu);
                format!("{} | {:.1} µs", ms(c), per_script(c))
            },
        );
        let _ = writeln!(
            out,
            "| {label} | {} | {:.1} µs | {all} | {cpu} |",
            ms(m),
            per_script(m)
        );
    }
    let _ = writeln!(out);
    let kinds = KINDS
        .iter()
        .enumerate()
        .map(|(k, kind)| {
            let n = (0..WALLETS).filter(|i| *i as usize % 3 == k).count() as f64 * 1_000.0;
            let m = median(&rounds, |r| r.serial_by_kind[k]);
            format!("{kind} {:.1} µs", m.as_secs_f64() * 1e6 / n)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "Serial derivation per script by kind: {kinds} (reference: {ISSUE_US_PER_SCRIPT} µs).\n"
    );
    let ratio =
        |a: Timing, b: Timing| median(&rounds, a).as_secs_f64() / median(&rounds, b).as_secs_f64();
    out.push_str("| ratio | medians |\n|---|---:|\n");
    let ratios: [(&str, f64); 9] = [
        (
            "serial derivation / register (what registering gains over one core)",
            ratio(|r| r.serial, |r| r.register),
        ),
        (
            "serial / rayon derivation (the speed-up of derivation alone)",
            ratio(|r| r.serial, |r| r.parallel),
        ),
        (
            "serial derivation / register 100 at once",
            ratio(|r| r.serial, |r| r.register_concurrent),
        ),
        (
            "register / rayon derivation",
            ratio(|r| r.register, |r| r.parallel),
        ),
        (
            "database floor / register (the database's share)",
            ratio(|r| r.floor, |r| r.register),
        ),
        ("restart / register", ratio(|r| r.restart(), |r| r.register)),
        (
            "registry load / register",
            ratio(|r| r.registry_load, |r| r.register),
        ),
        (
            "CPU: register / serial derivation (work beyond deriving)",
            ratio(|r| r.cpu.register, |r| r.cpu.serial),
        ),
        (
            "CPU: rayon / serial derivation",
            ratio(|r| r.cpu.parallel, |r| r.cpu.serial),
        ),
    ];
    for (label, r) in ratios {
        let _ = writeln!(out, "| {label} | {r:.3} |");
    }
    for note in rounds.iter().flat_map(|r| &r.notes) {
        let _ = writeln!(out, "- {note}");
    }
    publish_report(out, "register-results.md", begun);
}
