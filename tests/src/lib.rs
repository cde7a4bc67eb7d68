//! Helpers shared by lockstep's cross-crate tests (`tests/it`).

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, NetworkKind, ScriptBuf};
use lockstep_wallet::WalletDescriptors;

/// A test key from one repeated byte (never zero).
pub fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n.max(1); 32]).expect("a repeated non-zero byte is a valid key")
}

/// The P2WPKH script of a key.
pub fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::signing_only();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
}

/// The P2WPKH descriptors (with private keys, BIP84 paths on regtest) of a
/// master key from one repeated `seed` byte: a wallet that can sign.
pub fn signing_descriptors(seed: u8) -> WalletDescriptors {
    let root = Xpriv::new_master(NetworkKind::Test, &[seed; 32])
        .expect("a 32-byte seed makes a master key");
    WalletDescriptors::parse(
        &format!("wpkh({root}/84h/1h/0h/0/*)"),
        &format!("wpkh({root}/84h/1h/0h/1/*)"),
        bitcoin::Network::Regtest,
    )
    .expect("the test descriptors parse")
}

/// The key-path-only P2TR script of a key.
pub fn p2tr(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2tr(&secp, key.public_key(&secp).x_only_public_key().0, None)
}

/// What the crash test's parent (`tests/it/crash.rs`) and child
/// (`src/bin/crash_child.rs`) agree on.
pub mod crash {
    use std::str::FromStr as _;

    use bitcoin::BlockHash;
    use lockstep_chain::BlockId;

    /// Seed of the test wallets' descriptors.
    pub const WALLET_SEED: u64 = 77;
    /// Wallets registered at start: indexes `0..WALLETS`.
    pub const WALLETS: u32 = 8;
    /// The wallet imported mid-sync.
    pub const LATE_WALLET: u32 = WALLETS;
    /// The loop height at which the child imports the late wallet.
    pub const LATE_WALLET_AT: u32 = 250;

    /// Name, birth height and lookahead of test wallet `index`.
    pub fn wallet_spec(index: u32) -> (String, u32, u32) {
        let birth = if index == LATE_WALLET {
            105
        } else {
            1 + index * 20
        };
        (format!("crash-{index}"), birth, 6 + index % 4)
    }

    /// The done file's text: the final tip, which the last run of the
    /// child syncs to before it exits.
    pub fn done_text(tip: BlockId) -> String {
        format!("{} {}\n", tip.height, tip.hash)
    }

    /// Reads [`done_text`]'s text back; `None` if it is not that.
    pub fn parse_done(text: &str) -> Option<BlockId> {
        let mut words = text.split_whitespace();
        let height = words.next()?.parse().ok()?;
        let hash = BlockHash::from_str(words.next()?).ok()?;
        words.next().is_none().then_some(BlockId { height, hash })
    }
}

/// A small world for scenario tests: a chain, a database, a manager, and
/// test wallets registered from birth height 1 (the fault tests in
/// `tests/faults` and the event tests in `tests/it/events.rs`).
pub mod rig {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use bitcoin::{Amount, OutPoint, ScriptBuf};
    use lockstep_manager::{Manager, ManagerConfig, NewWallet};
    use lockstep_sim::{SimChain, SimParams};
    use lockstep_store::{Store, StoreOptions, WalletId};
    use lockstep_testkit::oracle::{WalletCheck, check_wallet, test_descriptors};
    use lockstep_wallet::Keychain;

    /// Seed of the rig's wallet descriptors.
    pub const WALLET_SEED: u64 = 91;

    /// The simulator pays from matured coinbases: chains start this high.
    pub const MATURE: u32 = 101;

    /// A small multi-threaded runtime for one scenario.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the runtime starts")
    }

    /// A chain, a database and a manager over them.
    pub struct Rig {
        /// The chain (the manager reads another handle of it).
        pub chain: SimChain,
        /// The database.
        pub store: Store,
        /// The manager.
        pub manager: Manager,
    }

    impl Rig {
        /// An unsigned chain of `MATURE + height` blocks with a light
        /// background load, and a database in `dir`.
        pub fn new(dir: &Path, seed: u64, height: u32) -> Rig {
            let chain = SimChain::generate(
                SimParams::unsigned(seed).with_load(2..=4, 1..=2),
                MATURE + height,
            )
            .expect("the chain generates");
            let store = Store::open(&dir.join("lockstep.db"), StoreOptions::default())
                .expect("the database opens");
            let manager = Manager::new(store.clone(), Arc::new(chain.clone()), Rig::config());
            Rig {
                chain,
                store,
                manager,
            }
        }

        /// The rig's manager configuration: small batches, quick polls.
        pub fn config() -> ManagerConfig {
            ManagerConfig {
                batch_size: 8,
                prefetch: 4,
                poll_interval: Duration::from_millis(10),
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(50),
                ..ManagerConfig::default()
            }
        }

        /// Replaces the manager with a new one on the same database and
        /// chain, as a restarted process has (nothing loaded yet). Stop
        /// the old one first.
        pub fn restart(&mut self) {
            self.manager = Manager::new(
                self.store.clone(),
                Arc::new(self.chain.clone()),
                Rig::config(),
            );
        }

        /// Registers test wallet `index` (born at height 1).
        pub async fn add(&self, index: u32, lookahead: u32) -> WalletId {
            self.manager
                .register(NewWallet {
                    name: format!("w{index}"),
                    descriptors: test_descriptors(WALLET_SEED, index),
                    birth_height: 1,
                    lookahead,
                    passphrase: None,
                })
                .await
                .expect("the wallet registers")
        }

        /// Script `i` of a keychain of test wallet `index`.
        pub fn script(index: u32, keychain: Keychain, i: u32) -> ScriptBuf {
            test_descriptors(WALLET_SEED, index)
                .script_at(keychain, i)
                .expect("test descriptors derive")
        }

        /// Pays `sats` to script `i` of a keychain of test wallet `index`
        /// (into the mempool). Returns the paying output.
        pub fn pay(&self, index: u32, keychain: Keychain, i: u32, sats: u64) -> OutPoint {
            self.chain
                .pay(Rig::script(index, keychain, i), Amount::from_sat(sats))
                .expect("the simulator pays")
        }

        /// Syncs the manager to the chain's tip.
        pub async fn sync(&self) {
            let height = self.manager.sync().await.expect("the manager syncs");
            assert_eq!(height, self.chain.height());
        }

        /// Wallet `id` against the oracle at the loop's tip.
        pub fn check(&self, id: WalletId) -> WalletCheck {
            let chain = self.chain.clone();
            self.store
                .read_blocking(move |tx| {
                    let (height, _) = tx.tip()?.expect("the loop has a tip");
                    check_wallet(tx, &chain, id, height)
                })
                .expect("the wallet reads")
        }
    }
}

/// What the actions crash test (`tests/it/actions_crash.rs`) and its child
/// (`src/bin/actions_child.rs`) agree on: the wallets and the plan.
pub mod actions_crash {
    use bitcoin::{Amount, ScriptBuf, TxOut};
    use lockstep::{FeeBump, Spend, WalletId};
    use lockstep_wallet::WalletDescriptors;

    /// The wallets that act.
    pub const WALLETS: u8 = 3;
    /// Coins each wallet is funded with.
    pub const COINS: usize = 100;
    /// The value of each funding coin.
    pub const COIN_SATS: u64 = 50_000;
    /// Their passphrase.
    pub const PASSPHRASE: &str = "pw";
    /// The source relays no transaction paying less than this (sat/vB):
    /// a fee-bump scenario's first versions stay unconfirmed.
    pub const RELAY_FLOOR: f64 = 1.5;

    /// Which kind of action a scenario runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// Sends to external payees.
        Send,
        /// Sends whose first version the source does not relay, replaced
        /// with a higher fee.
        Bump,
        /// Consolidations of each wallet's small coins.
        Consolidate,
    }

    impl Kind {
        /// The kind named on the child's command line.
        pub fn parse(name: &str) -> Option<Kind> {
            match name {
                "send" => Some(Kind::Send),
                "bump" => Some(Kind::Bump),
                "consolidate" => Some(Kind::Consolidate),
                _ => None,
            }
        }

        /// Its name on the child's command line.
        pub fn name(self) -> &'static str {
            match self {
                Kind::Send => "send",
                Kind::Bump => "bump",
                Kind::Consolidate => "consolidate",
            }
        }
    }

    /// Wallet `index`'s descriptors (with private keys).
    pub fn descriptors(index: u8) -> WalletDescriptors {
        crate::signing_descriptors(200 + index)
    }

    /// Wallet `index`'s name.
    pub fn name(index: u8) -> String {
        format!("actor-{index}")
    }

    /// The payee of send `i` (outside every wallet).
    pub fn payee(i: usize) -> ScriptBuf {
        let mut secret = [0x5a; 32];
        secret[28..].copy_from_slice(&u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes());
        let key = bitcoin::secp256k1::SecretKey::from_slice(&secret)
            .expect("a 32-byte value below the curve order is a key");
        crate::p2wpkh(&key)
    }

    /// What send `i` pays (distinct, so that each payment is recognised).
    pub fn amount(i: usize) -> Amount {
        Amount::from_sat(20_000 + 10 * i as u64)
    }

    /// The actions of a scenario, for wallets `ids` (in index order):
    /// action `i` acts on wallet `i % ids.len()`.
    pub fn plan(kind: Kind, ids: &[WalletId]) -> Vec<Spend> {
        let wallet = |i: usize| ids[i % ids.len()];
        match kind {
            Kind::Send => (0..300)
                .map(|i| {
                    let out = TxOut {
                        value: amount(i),
                        script_pubkey: payee(i),
                    };
                    Spend::send(format!("send-{i}"), wallet(i), vec![out], 2.0, 2)
                })
                .collect(),
            Kind::Bump => (0..240)
                .map(|i| {
                    let out = TxOut {
                        value: amount(i),
                        script_pubkey: payee(i),
                    };
                    Spend::send(format!("bump-{i}"), wallet(i), vec![out], 1.0, 1).with_fee_bump(
                        FeeBump {
                            after_blocks: 1,
                            max_bumps: 4,
                            factor: 2.0,
                        },
                    )
                })
                .collect(),
            Kind::Consolidate => (0..240)
                .map(|i| Spend::consolidate(format!("sweep-{i}"), wallet(i), 2, 2, 1.0, 3))
                .collect(),
        }
    }
}

/// Child processes of the crash tests.
pub mod child {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Starts `command` with its stdout read line by line on a thread of
    /// its own (so the pipe never fills, a line reaches the parent at once,
    /// and every line the child wrote before it died is read), and waits
    /// for its first line, which must be `started`.
    ///
    /// # Panics
    /// If the child does not start or does not say so within `patience`.
    pub fn spawn(mut command: Command, patience: Duration) -> (Child, mpsc::Receiver<String>) {
        let mut process = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("the child process starts");
        let stdout = process.stdout.take().expect("stdout is piped");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(patience)
            .expect("the child starts and says so");
        assert_eq!(first, "started");
        (process, lines)
    }
}

/// Waiting for a condition with a bound, for the tests' state that
/// announces no change of its own (counters, rows, queue lengths): where a
/// watch or an event exists, a test waits on that instead.
pub mod wait {
    use std::time::Duration;

    /// How long [`eventually`] waits before it fails the test: far beyond
    /// what any condition here takes on a loaded machine, short of a hung
    /// run.
    pub const PATIENCE: Duration = Duration::from_secs(30);

    /// Waits until `done` holds, looking every millisecond; panics naming
    /// `what` after [`PATIENCE`].
    pub async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {PATIENCE:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
