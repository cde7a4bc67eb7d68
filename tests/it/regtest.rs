//! lockstep against a real Bitcoin Core on regtest, when `BITCOIND_EXE`
//! names a `bitcoind` binary (`BITCOIND_EXE=/path/to/bitcoind cargo xtask
//! regtest`). Each is ignored by default, its attribute giving the reason
//! ("needs BITCOIND_EXE"), so that `cargo test` needs no node and counts
//! them as ignored in its summary; `cargo xtask regtest` runs them with `--ignored`, and a run of
//! them without `BITCOIND_EXE` fails instead of passing unrun.
//!
//! The stand-in node (`tests/it/bitcoind.rs`) follows Core's documented
//! formats; these tests check lockstep against Core itself. Core's own
//! wallet pays lockstep's test wallets; the manager syncs them through
//! `BitcoindSource`; each is compared with a watch-only descriptor wallet
//! in Core holding the same public descriptors (`importdescriptors`), so
//! that Core's wallet is the oracle: its unspent coins (`listunspent`) and
//! confirmed balance (`getbalances`), before and after a reorg
//! (`invalidateblock`).
//!
//! RPC names, arguments and result fields are Core's (checked against
//! `src/wallet/rpc/*.cpp`, `src/rpc/*.cpp` for Core 28 to 30).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::hashes::Hash as _;
use bitcoin::{Address, Amount, BlockHash, Denomination, Network, Transaction, Txid};
use lockstep_chain::{
    BitcoindAuth, BitcoindConfig, BitcoindError, BitcoindSource, BroadcastError, ChainSource,
    RejectReason,
};
use lockstep_manager::{ErrorKind, Manager, ManagerConfig, NewWallet};
use lockstep_store::{Store, StoreOptions, WalletId};
use lockstep_testkit::oracle::test_descriptors;
use lockstep_wallet::Keychain;
use serde_json::{Value, json};

/// Why the tests are ignored by default, and how to run them.
const NEEDS: &str = "set BITCOIND_EXE to a bitcoind binary to run the real-Core tests \
                     (BITCOIND_EXE=/path/to/bitcoind cargo xtask regtest)";

/// Seed of the lockstep test wallets paid here.
const SEED: u64 = 2917;

/// The test wallets: one of each script type (P2WPKH, P2TR, 2-of-2 P2WSH).
const WALLETS: u32 = 3;

/// How long Core may take to start, to index, or to answer.
const PATIENCE: Duration = Duration::from_secs(60);

/// The `bitcoind` to run, or `None`.
fn bitcoind_exe() -> Option<PathBuf> {
    std::env::var_os("BITCOIND_EXE")
        .filter(|exe| !exe.is_empty())
        .map(PathBuf::from)
}

/// A free port on 127.0.0.1 (free when asked: Core binds it moments later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The options that differ between the nodes started here: lockstep needs
/// both on (docs/bitcoind.md); the refusal tests turn them off.
#[derive(Debug, Clone, Copy)]
struct Options {
    /// `-blockfilterindex`.
    filter_index: bool,
    /// `-rest`.
    rest: bool,
}

impl Options {
    /// What lockstep needs.
    const LOCKSTEP: Options = Options {
        filter_index: true,
        rest: true,
    };
}

/// A `bitcoind -regtest` in a temporary data directory, killed on drop.
struct Bitcoind {
    child: Child,
    datadir: tempfile::TempDir,
    rpc_port: u16,
    http: reqwest::Client,
}

/// A JSON-RPC error object (or a transport failure, code 0).
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RPC error {}: {}", self.code, self.message)
    }
}

impl Bitcoind {
    /// Starts `exe` with `options` and waits until its RPC answers.
    async fn start(exe: &Path, options: Options) -> Bitcoind {
        let datadir = tempfile::tempdir().expect("a temporary directory");
        let rpc_port = free_port();
        let p2p_port = std::iter::repeat_with(free_port)
            .find(|p| *p != rpc_port)
            .expect("another free port");
        // What Core says before its log is open (a bad option) goes here.
        let stderr = std::fs::File::create(datadir.path().join("stderr.txt"))
            .expect("a file in the temporary directory");
        let child = Command::new(exe)
            .args([
                "-regtest",
                "-server=1",
                "-fallbackfee=0.0002",
                "-bind=127.0.0.1",
                "-listen=0",
                "-printtoconsole=0",
            ])
            .arg(format!(
                "-blockfilterindex={}",
                u8::from(options.filter_index)
            ))
            .arg(format!("-rest={}", u8::from(options.rest)))
            .arg(format!("-rpcport={rpc_port}"))
            .arg(format!("-port={p2p_port}"))
            .arg(format!("-datadir={}", datadir.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("BITCOIND_EXE={} does not start: {e}", exe.display()));
        let mut node = Bitcoind {
            child,
            datadir,
            rpc_port,
            http: reqwest::Client::new(),
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!(
                    "bitcoind exited with {status} at start; {}",
                    node.debug_log_tail()
                );
            }
            // Core writes the cookie once its RPC server is up, and answers
            // -28 (warming up) until it has loaded.
            if node.cookie_path().exists()
                && node.rpc(None, "getblockchaininfo", json!([])).await.is_ok()
            {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "bitcoind's RPC did not answer within {PATIENCE:?}; {}",
                node.debug_log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    /// `<datadir>/regtest/.cookie`.
    fn cookie_path(&self) -> PathBuf {
        self.datadir.path().join("regtest").join(".cookie")
    }

    /// What Core wrote on stderr and the end of its log, for a failure
    /// message.
    fn debug_log_tail(&self) -> String {
        let stderr = self.datadir.path().join("stderr.txt");
        let log = self.datadir.path().join("regtest").join("debug.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "{}:\n{}\n{}:\n{}",
            stderr.display(),
            std::fs::read_to_string(&stderr).unwrap_or_default(),
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// One JSON-RPC call, on the node or on a wallet (`/wallet/<name>`).
    async fn rpc(
        &self,
        wallet: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, RpcError> {
        let cookie = std::fs::read_to_string(self.cookie_path()).map_err(|e| RpcError {
            code: 0,
            message: format!("the cookie: {e}"),
        })?;
        let (user, password) = cookie.trim().split_once(':').ok_or(RpcError {
            code: 0,
            message: "the cookie has no ':'".to_owned(),
        })?;
        let url = match wallet {
            Some(name) => format!("{}/wallet/{name}", self.url()),
            None => self.url(),
        };
        let body = json!({"jsonrpc": "1.0", "id": method, "method": method, "params": params});
        let reply: Value = self
            .http
            .post(url)
            .basic_auth(user, Some(password))
            .json(&body)
            .timeout(PATIENCE)
            .send()
            .await
            .map_err(|e| RpcError {
                code: 0,
                message: e.to_string(),
            })?
            .json()
            .await
            .map_err(|e| RpcError {
                code: 0,
                message: e.to_string(),
            })?;
        match &reply["error"] {
            Value::Null => Ok(reply["result"].clone()),
            error => Err(RpcError {
                code: error["code"].as_i64().unwrap_or(0),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            }),
        }
    }

    /// A node RPC that must succeed.
    async fn call(&self, method: &str, params: Value) -> Value {
        self.rpc(None, method, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{method} {params}: {e}"))
    }

    /// A wallet RPC that must succeed.
    async fn wallet_call(&self, wallet: &str, method: &str, params: Value) -> Value {
        self.rpc(Some(wallet), method, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{wallet}: {method} {params}: {e}"))
    }

    /// The best block's height and hash.
    async fn tip(&self) -> (u32, BlockHash) {
        let info = self.call("getblockchaininfo", json!([])).await;
        let height = info["blocks"].as_u64().expect("blocks") as u32;
        let hash = info["bestblockhash"]
            .as_str()
            .and_then(|h| h.parse().ok())
            .expect("bestblockhash");
        (height, hash)
    }

    /// Waits until the filter index has reached the tip: Core indexes in
    /// the background, and a filter asked for too early is not found.
    async fn wait_for_index(&self) {
        let started = Instant::now();
        loop {
            let (height, _) = self.tip().await;
            let info = self
                .call("getindexinfo", json!(["basic block filter index"]))
                .await;
            let index = &info["basic block filter index"];
            if index["synced"].as_bool() == Some(true)
                && index["best_block_height"].as_u64() == Some(u64::from(height))
            {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the filter index is not at height {height}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Bitcoind {
    fn drop(&mut self) {
        // A test that failed must not leave a node running; the data
        // directory goes with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Core amount (BTC, as a JSON number) in satoshis. Through `f64`'s
/// shortest decimal form, which gives back Core's digits (at most 16
/// significant) and, unlike serde_json's, never an exponent (`1e-5`).
fn sats(value: &Value) -> u64 {
    let text = value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
        .to_string();
    Amount::from_str_in(&text, Denomination::Bitcoin)
        .unwrap_or_else(|e| panic!("{text} is not an amount: {e}"))
        .to_sat()
}

/// The regtest address of a keychain's script `n` of test wallet `index`.
fn address(index: u32, keychain: Keychain, n: u32) -> String {
    let script = test_descriptors(SEED, index)
        .script_at(keychain, n)
        .expect("test descriptors derive");
    Address::from_script(&script, Network::Regtest)
        .expect("the test scripts have addresses")
        .to_string()
}

/// The name of the watch-only Core wallet mirroring test wallet `index`.
fn watch_name(index: u32) -> String {
    format!("watch-{index}")
}

/// Core with a funded wallet of its own (`miner`), and lockstep's manager
/// syncing test wallets through `BitcoindSource`, each mirrored by a
/// watch-only Core wallet.
struct World {
    core: Bitcoind,
    store: Store,
    manager: Manager,
    /// Test wallet `i` is `wallets[i]`.
    wallets: Vec<WalletId>,
    _db: tempfile::TempDir,
}

impl World {
    async fn start(exe: &Path) -> World {
        let core = Bitcoind::start(exe, Options::LOCKSTEP).await;
        core.call("createwallet", json!({"wallet_name": "miner"}))
            .await;
        let mine_to = core.wallet_call("miner", "getnewaddress", json!([])).await;
        // 101 blocks: the first coinbase matures.
        core.call("generatetoaddress", json!([101, mine_to])).await;
        for i in 0..WALLETS {
            mirror_in_core(&core, i).await;
        }
        core.wait_for_index().await;

        let source = BitcoindSource::connect(source_config(&core))
            .await
            .expect("lockstep connects to a node started as docs/bitcoind.md says");
        assert!(source.uses_rest());
        let db = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&db.path().join("lockstep.db"), StoreOptions::default())
            .expect("the database opens");
        let config = ManagerConfig {
            network: Network::Regtest,
            request_timeout: PATIENCE,
            ..ManagerConfig::default()
        };
        let manager = Manager::new(store.clone(), Arc::new(source), config);
        let mut wallets = Vec::new();
        for i in 0..WALLETS {
            let id = manager
                .register(NewWallet {
                    name: format!("w{i}"),
                    descriptors: test_descriptors(SEED, i),
                    birth_height: 1,
                    lookahead: 20,
                    passphrase: None,
                })
                .await
                .expect("the wallet registers");
            wallets.push(id);
        }
        World {
            core,
            store,
            manager,
            wallets,
            _db: db,
        }
    }

    /// Core's wallet pays `sat` to a keychain's script `n` of test wallet
    /// `index`; returns the transaction.
    async fn pay(&self, index: u32, keychain: Keychain, n: u32, sat: u64) -> Txid {
        let amount = Amount::from_sat(sat).to_string_in(Denomination::Bitcoin);
        let txid = self
            .core
            .wallet_call(
                "miner",
                "sendtoaddress",
                json!([address(index, keychain, n), amount]),
            )
            .await;
        txid.as_str()
            .and_then(|t| t.parse().ok())
            .expect("sendtoaddress answers a txid")
    }

    /// Mines `n` blocks to Core's wallet (a new address each time, so that
    /// a branch mined after `invalidateblock` never repeats a block).
    async fn mine(&self, n: u32) {
        let to = self
            .core
            .wallet_call("miner", "getnewaddress", json!([]))
            .await;
        self.core.call("generatetoaddress", json!([n, to])).await;
    }

    /// Syncs the manager to Core's tip (retrying what Core may answer
    /// while it indexes) and returns it.
    async fn sync(&self) -> (u32, BlockHash) {
        self.core.wait_for_index().await;
        let tip = self.core.tip().await;
        let started = Instant::now();
        loop {
            match self.manager.sync().await {
                Ok(height) if height == tip.0 => break,
                Ok(height) => panic!("synced to {height}, Core's tip is {}", tip.0),
                Err(e) if e.kind() == ErrorKind::Retryable && started.elapsed() < PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the manager does not sync from Core: {e}"),
            }
        }
        let committed = self
            .store
            .read_blocking(|tx| tx.tip())
            .expect("the tip reads")
            .expect("the loop has a tip");
        assert_eq!(
            (committed.0, BlockHash::from_byte_array(committed.1)),
            tip,
            "the loop's tip is Core's"
        );
        tip
    }

    /// Each lockstep wallet against its watch-only twin in Core: the same
    /// confirmed unspent coins (outpoint, value, height) and the same
    /// confirmed balance. Returns how many coins the wallets hold.
    async fn compare_with_core(&self) -> usize {
        let (tip, _) = self.core.tip().await;
        let mut coins = 0;
        for (i, id) in (0u32..).zip(self.wallets.iter().copied()) {
            let watch = watch_name(i);
            // Confirmed only: lockstep's coins are confirmed ones.
            let unspent = self
                .core
                .wallet_call(&watch, "listunspent", json!([1, 9_999_999]))
                .await;
            let core_coins: BTreeSet<(Txid, u32, u64, u32)> = unspent
                .as_array()
                .expect("listunspent answers an array")
                .iter()
                .map(|u| {
                    let confirmations = u["confirmations"].as_u64().expect("confirmations") as u32;
                    (
                        u["txid"]
                            .as_str()
                            .and_then(|t| t.parse().ok())
                            .expect("txid"),
                        u["vout"].as_u64().expect("vout") as u32,
                        sats(&u["amount"]),
                        tip + 1 - confirmations,
                    )
                })
                .collect();
            let rows = self
                .store
                .read_blocking(move |tx| tx.wallet_coins(id, true))
                .expect("the coins read");
            let ours: BTreeSet<(Txid, u32, u64, u32)> = rows
                .iter()
                .map(|c| (Txid::from_byte_array(c.txid), c.vout, c.value, c.height))
                .collect();
            assert_eq!(
                ours, core_coins,
                "wallet {i}: lockstep's coins, then Core's"
            );

            let balances = self
                .core
                .wallet_call(&watch, "getbalances", json!([]))
                .await;
            // Only Core's wallet creates transactions here: nothing of the
            // watch-only wallet's is unconfirmed, so trusted is confirmed.
            let core_balance =
                sats(&balances["mine"]["trusted"]) + sats(&balances["mine"]["immature"]);
            let balance = self
                .store
                .read_blocking(move |tx| tx.wallet_balance(id))
                .expect("the balance reads");
            assert_eq!(
                balance, core_balance,
                "wallet {i}: lockstep's balance, then Core's"
            );
            coins += ours.len();
        }
        coins
    }
}

/// A watch-only descriptor wallet in Core with test wallet `index`'s two
/// public descriptors, checksummed by Core (`getdescriptorinfo`), scanned
/// from the genesis block.
async fn mirror_in_core(core: &Bitcoind, index: u32) {
    let name = watch_name(index);
    core.call(
        "createwallet",
        json!({
            "wallet_name": name,
            "disable_private_keys": true,
            "blank": true,
            "descriptors": true,
        }),
    )
    .await;
    let descriptors = test_descriptors(SEED, index);
    let mut requests = Vec::new();
    for keychain in [Keychain::External, Keychain::Internal] {
        let text = descriptors.descriptor(keychain).to_string();
        // Without the checksum miniscript may append: Core's is asked for.
        let body = text.split('#').next().unwrap_or(&text);
        let info = core.call("getdescriptorinfo", json!([body])).await;
        let checksum = info["checksum"].as_str().expect("a checksum");
        if let Some((_, ours)) = text.split_once('#') {
            assert_eq!(ours, checksum, "miniscript's checksum is Core's");
        }
        requests.push(json!({
            "desc": format!("{body}#{checksum}"),
            "range": [0, 99],
            "timestamp": 0,
            "internal": keychain == Keychain::Internal,
        }));
    }
    let results = core
        .wallet_call(&name, "importdescriptors", json!([requests]))
        .await;
    for result in results
        .as_array()
        .expect("importdescriptors answers an array")
    {
        assert_eq!(result["success"], json!(true), "{name}: {result}");
    }
}

/// Runs `test` against the `bitcoind` that `BITCOIND_EXE` names; without
/// one the test fails (it runs only when asked for with `--ignored`).
fn with_bitcoind<F: Future<Output = ()>>(test: impl FnOnce(PathBuf) -> F) {
    let exe = bitcoind_exe().unwrap_or_else(|| panic!("{NEEDS}"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the runtime starts")
        .block_on(test(exe))
}

async fn wallets_equal_core(exe: PathBuf) {
    let world = World::start(&exe).await;
    world.sync().await;
    assert_eq!(world.compare_with_core().await, 0);
    // Payments to every wallet, on both keychains, over a few blocks; the
    // last index stays inside the lookahead of 20, which Core's range
    // (0 to 99) covers too.
    for round in 0..3 {
        for i in 0..WALLETS {
            world
                .pay(
                    i,
                    Keychain::External,
                    round * 2,
                    100_000 + u64::from(i * 1_000 + round),
                )
                .await;
            world
                .pay(i, Keychain::Internal, round, 30_000 + u64::from(round))
                .await;
        }
        world.mine(1).await;
    }
    world.sync().await;
    assert_eq!(world.compare_with_core().await, 18);
}

#[test]
#[ignore = "needs BITCOIND_EXE (cargo xtask regtest)"]
fn wallets_synced_from_core_equal_core_s_own_wallets() {
    with_bitcoind(wallets_equal_core);
}

async fn reorg_equals_core(exe: PathBuf) {
    let world = World::start(&exe).await;
    world.pay(0, Keychain::External, 0, 200_000).await;
    world.mine(1).await;
    let (fork, _) = world.sync().await;
    // Two blocks each paying a wallet, then a longer branch without them.
    world.pay(1, Keychain::External, 0, 210_000).await;
    world.mine(1).await;
    world.pay(2, Keychain::External, 1, 220_000).await;
    world.mine(1).await;
    world.sync().await;
    assert_eq!(world.compare_with_core().await, 3);
    let first_gone = world.core.call("getblockhash", json!([fork + 1])).await;
    world
        .core
        .call("invalidateblock", json!([first_gone]))
        .await;
    assert_eq!(world.core.tip().await.0, fork);
    // `generateblock` with no transactions: the two payments stay in
    // Core's mempool, off the new branch.
    let to = world
        .core
        .wallet_call("miner", "getnewaddress", json!([]))
        .await;
    for _ in 0..3 {
        world.core.call("generateblock", json!([to, []])).await;
    }
    let (height, _) = world.sync().await;
    assert_eq!(height, fork + 3);
    assert_eq!(world.compare_with_core().await, 1);
    // Mined again, on the new branch, at other heights.
    world.mine(1).await;
    world.sync().await;
    assert_eq!(world.compare_with_core().await, 3);
}

#[test]
#[ignore = "needs BITCOIND_EXE (cargo xtask regtest)"]
fn wallets_follow_a_core_reorg_as_core_s_own_wallets_do() {
    with_bitcoind(reorg_equals_core);
}

/// A config for lockstep to connect to `core` with.
fn source_config(core: &Bitcoind) -> BitcoindConfig {
    BitcoindConfig::new(
        core.url(),
        BitcoindAuth::Cookie(core.cookie_path()),
        Network::Regtest,
    )
}

async fn refusals(exe: PathBuf) {
    // Core's own answers, not the stand-in's, must map to the typed errors:
    // no filter index first (REST off too, so that the index is the one
    // thing refused).
    let bare = Bitcoind::start(
        &exe,
        Options {
            filter_index: false,
            rest: false,
        },
    )
    .await;
    match BitcoindSource::connect(source_config(&bare)).await {
        Err(e @ BitcoindError::NoFilterIndex { .. }) => {
            assert!(e.to_string().contains("-blockfilterindex=1"), "{e}");
        }
        other => panic!("a node without -blockfilterindex: {other:?}"),
    }
    drop(bare);

    let no_rest = Bitcoind::start(
        &exe,
        Options {
            filter_index: true,
            rest: false,
        },
    )
    .await;
    no_rest.wait_for_index().await;
    let source = BitcoindSource::connect(source_config(&no_rest))
        .await
        .expect("a node without REST is used through RPC");
    assert!(!source.uses_rest());
    let (height, hash) = no_rest.tip().await;
    let tip = source.tip().await.expect("the tip through RPC");
    assert_eq!((tip.height, tip.hash), (height, hash));

    let mut wrong = source_config(&no_rest);
    wrong.auth = BitcoindAuth::UserPassword {
        user: "__cookie__".to_owned(),
        password: "not-the-cookie".to_owned(),
    };
    match BitcoindSource::connect(wrong).await {
        Err(e @ BitcoindError::Unauthorized { .. }) => {
            assert!(e.to_string().contains("-rpcuser/-rpcpassword"), "{e}");
        }
        other => panic!("a wrong password: {other:?}"),
    }
    let mut signet = source_config(&no_rest);
    signet.network = Network::Signet;
    match BitcoindSource::connect(signet).await {
        Err(BitcoindError::WrongNetwork { node, expected, .. }) => {
            assert_eq!((node.as_str(), expected), ("regtest", "signet"));
        }
        other => panic!("a regtest node for signet wallets: {other:?}"),
    }
}

#[test]
#[ignore = "needs BITCOIND_EXE (cargo xtask regtest)"]
fn core_s_refusals_are_lockstep_s_typed_errors() {
    with_bitcoind(refusals);
}

/// A transaction of Core's wallet spending its coin `(txid, vout)` of
/// `value` sats whole to `to`, less `fee`, signalling replacement, signed
/// by Core.
async fn core_spend(
    core: &Bitcoind,
    coin: (&str, u64),
    value: u64,
    to: &str,
    fee: u64,
) -> Transaction {
    let (txid, vout) = coin;
    let amount = Amount::from_sat(value - fee).to_string_in(Denomination::Bitcoin);
    let raw = core
        .call(
            "createrawtransaction",
            json!([[{"txid": txid, "vout": vout, "sequence": 0xffff_fffd_u32}], [{to: amount}]]),
        )
        .await;
    let signed = core
        .wallet_call("miner", "signrawtransactionwithwallet", json!([raw]))
        .await;
    assert_eq!(signed["complete"], json!(true), "{signed}");
    let hex = signed["hex"].as_str().expect("signed hex");
    deserialize_hex(hex).expect("Core's transaction decodes")
}

async fn replacement(exe: PathBuf) {
    let world = World::start(&exe).await;
    world.sync().await;
    // A matured coinbase of Core's wallet.
    let unspent = world
        .core
        .wallet_call("miner", "listunspent", json!([100]))
        .await;
    let coin = &unspent.as_array().expect("listunspent answers an array")[0];
    let (txid, vout) = (
        coin["txid"].as_str().expect("txid"),
        coin["vout"].as_u64().expect("vout"),
    );
    let value = sats(&coin["amount"]);
    let to = address(0, Keychain::External, 5);
    let source = world.manager.source();

    let original = core_spend(&world.core, (txid, vout), value, &to, 10_000).await;
    assert_eq!(
        source.broadcast(&original).await.expect("Core takes it"),
        original.compute_txid()
    );
    // The same spend paying less: Core's `insufficient fee` words are
    // lockstep's InsufficientFee.
    let cheaper = core_spend(&world.core, (txid, vout), value, &to, 5_000).await;
    match source.broadcast(&cheaper).await {
        Err(BroadcastError::Rejected {
            txid,
            reason: RejectReason::InsufficientFee { .. },
        }) => assert_eq!(txid, cheaper.compute_txid()),
        other => panic!("a replacement paying less: {other:?}"),
    }
    // Paying more: it replaces the original, and is what confirms.
    let bumped = core_spend(&world.core, (txid, vout), value, &to, 50_000).await;
    assert_eq!(
        source
            .broadcast(&bumped)
            .await
            .expect("Core takes the replacement"),
        bumped.compute_txid()
    );
    let mempool = world.core.call("getrawmempool", json!([])).await;
    assert_eq!(mempool, json!([bumped.compute_txid().to_string()]));
    world.mine(1).await;
    world.sync().await;
    assert_eq!(world.compare_with_core().await, 1);
    let rows = world
        .store
        .read_blocking({
            let id = world.wallets[0];
            move |tx| tx.wallet_coins(id, true)
        })
        .expect("the coins read");
    assert_eq!(
        Txid::from_byte_array(rows[0].txid),
        bumped.compute_txid(),
        "the wallet holds the replacement's output"
    );
}

#[test]
#[ignore = "needs BITCOIND_EXE (cargo xtask regtest)"]
fn a_replacement_through_core_is_refused_then_accepted() {
    with_bitcoind(replacement);
}

async fn mempool_payment_seen(exe: PathBuf) {
    let world = World::start(&exe).await;
    world.sync().await;
    let sat = 150_000;
    let txid = world.pay(0, Keychain::External, 3, sat).await;
    // Not mined: `sync` also polls the mempool.
    world.sync().await;
    let wallet = world.manager.wallet(world.wallets[0]).await.unwrap();
    let balance = wallet.balance().await.unwrap();
    assert_eq!(balance.confirmed, Amount::ZERO);
    assert_eq!(balance.untrusted_pending, Amount::from_sat(sat));
    assert_eq!(balance.trusted_pending, Amount::ZERO);
    let core = world
        .core
        .wallet_call(&watch_name(0), "getbalances", json!([]))
        .await;
    assert_eq!(sats(&core["mine"]["untrusted_pending"]), sat);
    let history = wallet.history().await.unwrap();
    let pending = history
        .iter()
        .find(|t| t.txid == txid)
        .expect("the payment");
    assert_eq!(pending.height, None);
    assert_eq!(pending.received, Amount::from_sat(sat));
    // Mined: confirmed, and no longer pending.
    world.mine(1).await;
    let (height, _) = world.sync().await;
    let balance = wallet.balance().await.unwrap();
    assert_eq!(balance.confirmed, Amount::from_sat(sat));
    assert_eq!(balance.untrusted_pending, Amount::ZERO);
    let history = wallet.history().await.unwrap();
    let mined = history
        .iter()
        .find(|t| t.txid == txid)
        .expect("the payment");
    assert_eq!(mined.height, Some(height));
    assert_eq!(world.compare_with_core().await, 1);
}

#[test]
#[ignore = "needs BITCOIND_EXE (cargo xtask regtest)"]
fn a_core_mempool_payment_is_seen_before_it_confirms() {
    with_bitcoind(mempool_payment_seen);
}
