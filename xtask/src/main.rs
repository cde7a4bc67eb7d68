//! lockstep's automation, in Rust rather than shell scripts:
//! `cargo xtask ci | bench [NAME] | demo | regtest`.

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// What CI runs: format check, clippy with warnings denied, every test.
    Ci,
    /// Benchmarks: all, or one bench target of lockstep-benches. Criterion's:
    /// chain, filter, wallet, dispatcher; with their own harness (minutes, a
    /// markdown report): sync, register.
    Bench {
        /// A bench target of the lockstep-benches package.
        name: Option<String>,
        /// Passed on to the bench (a criterion filter, or sync's options).
        #[arg(last = true)]
        criterion_args: Vec<String>,
    },
    /// The demo, in release mode.
    Demo,
    /// The tests against a real Bitcoin Core on regtest (tests/it/regtest.rs),
    /// which `cargo test` counts as ignored: BITCOIND_EXE must name a bitcoind binary.
    Regtest,
}

/// The variable naming the `bitcoind` the regtest tests start.
const BITCOIND_EXE: &str = "BITCOIND_EXE";

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            // As `.ci/run`: the lock file must be up to date.
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["test", "--workspace", "--locked"])
        }
        Task::Bench {
            name,
            criterion_args,
        } => {
            let mut args = vec!["bench", "-p", "lockstep-benches"];
            if let Some(name) = &name {
                args.extend(["--bench", name]);
            }
            if !criterion_args.is_empty() {
                args.push("--");
                args.extend(criterion_args.iter().map(String::as_str));
            }
            cargo(&args)
        }
        Task::Demo => cargo(&["run", "--release", "-p", "lockstep-cli", "--", "demo"]),
        Task::Regtest => {
            // The tests are ignored by default; without the variable they
            // fail: say what to set before running them.
            let exe = std::env::var_os(BITCOIND_EXE)
                .filter(|exe| !exe.is_empty())
                .with_context(|| {
                    format!(
                        "set {BITCOIND_EXE} to a bitcoind binary (Bitcoin Core 28 or later), e.g. \
                         {BITCOIND_EXE}=/path/to/bitcoind cargo xtask regtest"
                    )
                })?;
            let path = std::path::Path::new(&exe);
            if !path.is_file() {
                bail!(
                    "{BITCOIND_EXE}={} is not a file: set it to a bitcoind binary",
                    path.display()
                );
            }
            cargo(&[
                "test",
                "-p",
                "lockstep-tests",
                "--test",
                "it",
                "regtest::",
                "--",
                "--ignored",
                "--nocapture",
            ])
        }
    }
}
