//! Dispatcher costs, on a tokio multi-thread runtime of 2 workers:
//!
//! - `try_dispatch` of a trivial action on an idle wallet, and awaiting its
//!   outcome;
//! - `try_dispatch` on a busy wallet (refused at once with `WalletBusy`);
//! - dispatch and release across 10,000 wallets (each action trivial), from
//!   1 task, and from 2 tasks (disjoint halves, or interleaved wallets);
//!   throughput in actions per second;
//! - 20 sends queued on one wallet (`dispatch_wait`), each a short "select"
//!   step then a 100 ms "broadcast" (a tokio sleep): released early after the
//!   select step, against holding the slot for the whole action. Total wall
//!   time for the 20. The select step is either a 1 ms tokio sleep (which the
//!   timer's millisecond ticks make 1-2 ms) or 100 µs of busy work; early
//!   release serialises only the select steps, so the ideal ratio is
//!   `20 (select + broadcast) / (20 select + broadcast)`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lockstep_dispatcher::{ActionKind, ActionSpec, DispatchError, Dispatcher, Outcome};
use tokio::runtime::Runtime;

/// The number of wallets in the throughput rows.
const WALLETS: u32 = 10_000;
/// The number of sends in the early-release rows.
const SENDS: usize = 20;
/// How long the "select" step of a send sleeps (`Select::Sleep`).
const SELECT_SLEEP: Duration = Duration::from_millis(1);
/// How long the "select" step of a send spins (`Select::Spin`).
const SELECT_SPIN: Duration = Duration::from_micros(100);
/// How long the "broadcast" step of a send takes.
const BROADCAST: Duration = Duration::from_millis(100);

fn runtime() -> Runtime {
    runtime_of(2)
}

/// A multi-thread runtime of `workers` worker threads.
fn runtime_of(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

fn spec() -> ActionSpec {
    ActionSpec::new(ActionKind::SEND)
}

fn single(c: &mut Criterion) {
    let rt = runtime();
    let d: Dispatcher<u32> = Dispatcher::new();
    let mut g = c.benchmark_group("dispatcher");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    g.bench_function("try_dispatch + outcome, idle wallet", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let h = d
                        .try_dispatch(0, spec(), |_| async { Ok::<(), ()>(()) })
                        .unwrap();
                    assert_eq!(h.outcome().await, Outcome::Completed(()));
                }
                start.elapsed()
            })
        });
    });

    // Wallet 1 held by an action that waits for `release`.
    let _enter = rt.enter();
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let holder = d
        .try_dispatch(1, spec(), |_| async move {
            let _ = held.await;
            Ok::<(), ()>(())
        })
        .unwrap();
    g.bench_function("try_dispatch, busy wallet (refused)", |b| {
        b.iter(|| {
            let r = d.try_dispatch(1, spec(), |_| async { Ok::<(), ()>(()) });
            assert!(matches!(r, Err(DispatchError::WalletBusy { .. })));
        });
    });
    release.send(()).unwrap();
    rt.block_on(async { assert_eq!(holder.outcome().await, Outcome::Completed(())) });
    g.finish();
}

/// Dispatches a trivial action to each of `wallets`, then awaits them all.
async fn round(d: Dispatcher<u32>, wallets: Arc<[u32]>) {
    for chunk in wallets.chunks(CHUNK) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&w| {
                d.try_dispatch(w, spec(), |_| async { Ok::<(), ()>(()) })
                    .unwrap()
            })
            .collect();
        for h in handles {
            assert_eq!(h.outcome().await, Outcome::Completed(()));
        }
    }
}

/// How many actions each dispatching task has in flight at most.
const CHUNK: usize = 64;

/// The floor of [`round`]: spawns the trivial actions without a dispatcher.
async fn spawn_round(wallets: Arc<[u32]>) {
    for chunk in wallets.chunks(CHUNK) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|_| tokio::spawn(async { Ok::<(), ()>(()) }))
            .collect();
        for h in handles {
            assert_eq!(h.await.unwrap(), Ok(()));
        }
    }
}

/// A group whose rows dispatch once to each of the 10,000 wallets.
fn throughput_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(u64::from(WALLETS)));
    g
}

fn many_wallets(c: &mut Criterion) {
    let d: Dispatcher<u32> = Dispatcher::new();
    let mut g = throughput_group(c, "dispatcher 10k wallets");

    let part = |wallets: &mut dyn Iterator<Item = u32>| -> Arc<[u32]> { wallets.collect() };
    // Each variant: the wallets of each dispatching task.
    let variants = [
        (
            "1 thread (1 worker, 1 task)",
            1,
            vec![part(&mut (0..WALLETS))],
        ),
        (
            "2 threads (2 workers, 2 tasks, disjoint halves)",
            2,
            vec![
                part(&mut (0..WALLETS / 2)),
                part(&mut (WALLETS / 2..WALLETS)),
            ],
        ),
        ("2 workers, 1 task", 2, vec![part(&mut (0..WALLETS))]),
        (
            "2 workers, 2 tasks, interleaved",
            2,
            vec![
                part(&mut (0..WALLETS).step_by(2)),
                part(&mut (1..WALLETS).step_by(2)),
            ],
        ),
    ];
    for (name, workers, parts) in variants {
        let rt = runtime_of(workers);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = parts
                            .iter()
                            .map(|p| tokio::spawn(round(d.clone(), Arc::clone(p))))
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    }
                    start.elapsed()
                })
            });
        });
        g.bench_function(format!("{name}, floor: tokio::spawn alone"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = parts
                            .iter()
                            .map(|p| tokio::spawn(spawn_round(Arc::clone(p))))
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    }
                    start.elapsed()
                })
            });
        });
    }
    g.finish();
}

/// Runs a trivial action inline (`try_run`) on each of `wallets`.
async fn inline_round(d: &Dispatcher<u32>, wallets: &[u32]) {
    for &w in wallets {
        let outcome = d
            .try_run(w, spec(), |_| async { Ok::<(), ()>(()) })
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Completed(()));
    }
}

/// `iters` inline rounds on OS threads of their own, one per part, each on a
/// current-thread runtime, started together; the wall time until the last
/// thread is done.
fn inline_on_threads(d: &Dispatcher<u32>, parts: &[Arc<[u32]>], iters: u64) -> Duration {
    let barrier = Barrier::new(parts.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = parts
            .iter()
            .map(|part| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    barrier.wait();
                    let start = Instant::now();
                    rt.block_on(async {
                        for _ in 0..iters {
                            inline_round(d, part).await;
                        }
                    });
                    start.elapsed()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .max()
            .unwrap_or_default()
    })
}

/// The dispatcher's own cost of dispatch and release, without a task spawn
/// per action (which does not scale from 1 worker to 2 on these machines:
/// see the floor rows above): `try_run` across 10,000 wallets from 1 OS
/// thread and from 2.
fn many_wallets_inline(c: &mut Criterion) {
    let d: Dispatcher<u32> = Dispatcher::new();
    let mut g = throughput_group(c, "dispatcher 10k wallets inline");
    let all: Arc<[u32]> = (0..WALLETS).collect();
    let halves: [Arc<[u32]>; 2] = [(0..WALLETS / 2).collect(), (WALLETS / 2..WALLETS).collect()];
    g.bench_function("try_run, 1 thread", |b| {
        b.iter_custom(|iters| inline_on_threads(&d, std::slice::from_ref(&all), iters));
    });
    g.bench_function("try_run, 2 threads", |b| {
        b.iter_custom(|iters| inline_on_threads(&d, &halves, iters));
    });
    g.finish();
}

/// What a send's "select" step does.
#[derive(Clone, Copy)]
enum Select {
    /// A tokio sleep of `SELECT_SLEEP`.
    Sleep,
    /// Busy work for `SELECT_SPIN`.
    Spin,
}

impl Select {
    async fn run(self) {
        match self {
            Select::Sleep => tokio::time::sleep(SELECT_SLEEP).await,
            Select::Spin => {
                let start = Instant::now();
                while start.elapsed() < SELECT_SPIN {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// 20 sends queued on one wallet; the time until all 20 have ended.
async fn sends(d: &Dispatcher<u32>, select: Select, early: bool) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..SENDS)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move {
                let h = d
                    .dispatch_wait(
                        7,
                        spec().early_release(early),
                        |ctx| async move {
                            select.run().await;
                            ctx.release_early();
                            tokio::time::sleep(BROADCAST).await;
                            Ok::<(), ()>(())
                        },
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap();
                assert_eq!(h.outcome().await, Outcome::Completed(()));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn early_release(c: &mut Criterion) {
    let rt = runtime();
    let d: Dispatcher<u32> = Dispatcher::new();
    let mut g = c.benchmark_group("dispatcher 20 sends, 100 ms broadcast");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(1));
    for (name, select, early) in [
        ("1 ms select, early release", Select::Sleep, true),
        ("1 ms select, held to the end", Select::Sleep, false),
        ("100 µs select, early release", Select::Spin, true),
        ("100 µs select, held to the end", Select::Spin, false),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += sends(&d, select, early).await;
                    }
                    total
                })
            });
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    single,
    many_wallets,
    many_wallets_inline,
    early_release
);
criterion_main!(benches);
