//! Helpers shared by lockstep's cross-crate tests (`tests/it`).

use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, ScriptBuf};

/// A test key from one repeated byte (never zero).
pub fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n.max(1); 32]).expect("a repeated non-zero byte is a valid key")
}

/// The P2WPKH script of a key.
pub fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::signing_only();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
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
    use lockstep_chain::{SimChain, SimParams};
    use lockstep_manager::{Manager, ManagerConfig, NewWallet};
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
            let config = ManagerConfig {
                batch_size: 8,
                prefetch: 4,
                poll_interval: Duration::from_millis(10),
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(50),
                ..ManagerConfig::default()
            };
            let manager = Manager::new(store.clone(), Arc::new(chain.clone()), config);
            Rig {
                chain,
                store,
                manager,
            }
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
