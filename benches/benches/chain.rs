//! Generating, saving and loading simulated chains.
//!
//! - 1,000 unsigned blocks of 500 transactions, on top of the 100 blocks
//!   regtest needs before a coinbase matures;
//! - 1,000 signed blocks of 50 transactions, likewise;
//! - saving and loading the standard 2,000-block chain (filters of about
//!   1,300 elements), whose file size is printed.
#![allow(missing_docs)] // criterion_group! generates undocumented functions.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lockstep_benches::{cache_dir, standard_chain};
use lockstep_sim::{SimChain, SimParams};

fn generate(c: &mut Criterion) {
    let mut group = c.benchmark_group("generate");
    group.sample_size(10);
    let cases = [
        (
            "unsigned 1000 blocks x 500 txs",
            SimParams::unsigned(1).with_load(500..=500, 1..=3),
        ),
        (
            "signed 1000 blocks x 50 txs",
            SimParams::signed(1).with_load(50..=50, 1..=3),
        ),
    ];
    for (name, params) in cases {
        group.bench_function(name, |b| {
            b.iter_batched(
                || SimChain::generate(params.clone(), 100).unwrap(),
                |chain| {
                    chain.mine(1_000).unwrap();
                    chain
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn save_load(c: &mut Criterion) {
    let chain = standard_chain();
    let stats = chain.stats();
    let dir = cache_dir();
    let path = dir.join("save-load-bench.sim");
    chain.save(&path).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "standard chain: {} blocks, {} transactions, mean {:.0} filter elements (min {}, max {}), file {:.1} MB",
        stats.height + 1,
        stats.transactions,
        stats.mean_filter_elements,
        stats.min_filter_elements,
        stats.max_filter_elements,
        size as f64 / 1e6
    );
    let mut group = c.benchmark_group("file");
    group.sample_size(10);
    group.bench_function("save 2000 blocks", |b| {
        b.iter(|| chain.save(&path).unwrap())
    });
    group.bench_function("load 2000 blocks", |b| {
        b.iter(|| SimChain::load(&path).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, generate, save_load);
criterion_main!(benches);
