//! BitcoindSource against the stand-in node over real HTTP on loopback:
//! every read equals SimChain's own answer, through REST and through the
//! JSON-RPC fallback; broadcasts and their rejections; each configuration
//! error is its typed error and says what to change; a node that lies,
//! goes away, hangs or is reconfigured after connect is caught.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, BlockHash, CompressedPublicKey, Network, ScriptBuf, TxOut};
use lockstep_chain::block_checks::check_block;
use lockstep_chain::core_format::parse_rest_filter;
use lockstep_chain::{
    BitcoindAuth, BitcoindConfig, BitcoindError, BitcoindSource, BlockId, BroadcastError,
    ChainSource, ErrorKind, Missing, RejectReason, RpcFailure, SourceError,
};
use lockstep_sim::{Lie, SimChain, SimNode, SimNodeConfig, SimParams};
use serde_json::json;

fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n; 32]).expect("a valid key")
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
}

/// A node serving `chain` with a cookie in a temporary directory and the
/// user alice/secret.
async fn node(chain: &SimChain, config: SimNodeConfig) -> (SimNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = SimNodeConfig {
        cookie_dir: Some(dir.path().to_owned()),
        user_password: Some(("alice".to_owned(), "secret".to_owned())),
        ..config
    };
    (SimNode::start(chain.clone(), config).await.unwrap(), dir)
}

fn cookie_config(node: &SimNode) -> BitcoindConfig {
    let mut config = BitcoindConfig::new(
        node.url(),
        BitcoindAuth::Cookie(node.cookie_path().unwrap().to_owned()),
        Network::Regtest,
    );
    config.timeout = Duration::from_secs(10);
    config
}

/// Every read through `source` equals SimChain's answer.
async fn reads_equal_simchain(source: &BitcoindSource, chain: &SimChain) {
    let tip = chain.tip();
    assert_eq!(source.tip().await.unwrap(), tip);
    assert_eq!(ChainSource::tip(chain).await.unwrap(), tip);
    for height in [0, 1, 57, tip.height] {
        let hash = chain.hash_at(height).unwrap();
        assert_eq!(source.block_hash(height).await.unwrap(), hash);
        assert_eq!(
            source.header(hash).await.unwrap(),
            chain.header(hash).await.unwrap()
        );
        assert_eq!(
            source.filter(hash).await.unwrap(),
            chain.filter(hash).await.unwrap()
        );
        assert_eq!(
            source.filter_header(hash).await.unwrap(),
            chain.filter_header(hash).await.unwrap()
        );
        assert_eq!(
            *source.block(hash).await.unwrap(),
            *chain.block(hash).await.unwrap()
        );
    }
    assert_eq!(
        source.headers(0, 200).await.unwrap(),
        chain.headers(0, 200).await.unwrap()
    );
    assert_eq!(
        source.headers(100, 5).await.unwrap(),
        chain.headers(100, 5).await.unwrap()
    );
    let blocks: Vec<BlockId> = (3..=tip.height)
        .map(|height| BlockId {
            height,
            hash: chain.hash_at(height).unwrap(),
        })
        .collect();
    assert_eq!(
        source.filter_headers(&blocks).await.unwrap(),
        chain.filter_headers(&blocks).await.unwrap()
    );
    // Above the tip, and an unknown block: not found, as SimChain says.
    let unknown = BlockHash::all_zeros();
    assert!(matches!(
        source.block_hash(tip.height + 1).await,
        Err(SourceError::NotFound(Missing::Height(_)))
    ));
    assert!(matches!(
        source.header(unknown).await,
        Err(SourceError::NotFound(_))
    ));
    assert!(matches!(
        source.block(unknown).await,
        Err(SourceError::NotFound(_))
    ));
    assert!(matches!(
        source.filter(unknown).await,
        Err(SourceError::NotFound(_))
    ));
    assert!(matches!(
        source.filter_header(unknown).await,
        Err(SourceError::NotFound(_))
    ));
}

#[tokio::test]
async fn reads_through_rest_equal_simchain() {
    let chain = SimChain::generate(SimParams::signed(1), 120).unwrap();
    let (node, _dir) = node(&chain, SimNodeConfig::default()).await;
    let source = BitcoindSource::connect(cookie_config(&node)).await.unwrap();
    assert!(source.uses_rest());
    reads_equal_simchain(&source, &chain).await;
}

#[tokio::test]
async fn reads_fall_back_to_rpc_without_rest() {
    let chain = SimChain::generate(SimParams::signed(1), 120).unwrap();
    let config = SimNodeConfig {
        rest: false,
        ..SimNodeConfig::default()
    };
    let (node, _dir) = node(&chain, config).await;
    let source = BitcoindSource::connect(cookie_config(&node)).await.unwrap();
    assert!(!source.uses_rest());
    reads_equal_simchain(&source, &chain).await;
}

#[tokio::test]
async fn a_reorg_is_seen_and_stale_blocks_are_not_found() {
    let chain = SimChain::generate(SimParams::unsigned(2), 60).unwrap();
    let (node, _dir) = node(&chain, SimNodeConfig::default()).await;
    let source = BitcoindSource::connect(cookie_config(&node)).await.unwrap();
    let old: Vec<BlockId> = (50..=60)
        .map(|height| BlockId {
            height,
            hash: chain.hash_at(height).unwrap(),
        })
        .collect();
    chain.reorg(3, lockstep_sim::ReorgTxs::Reappear).unwrap();
    assert_eq!(source.tip().await.unwrap(), chain.tip());
    // The old branch's filter headers: its last blocks are gone.
    assert!(matches!(
        source.filter_headers(&old).await,
        Err(SourceError::NotFound(_))
    ));
    assert!(matches!(
        source.header(old[10].hash).await,
        Err(SourceError::NotFound(_))
    ));
    assert_eq!(
        source.headers(55, 10).await.unwrap(),
        chain.headers(55, 10).await.unwrap()
    );
}

#[tokio::test]
async fn broadcast_then_mine_and_rejections_map_back() {
    // The served chain and a twin with the same history: the twin signs
    // transactions the served chain has not seen.
    let chain = SimChain::generate(SimParams::signed(1), 102).unwrap();
    let twin = SimChain::generate(SimParams::signed(1), 102).unwrap();
    let mut coins = Vec::new();
    for c in [&chain, &twin] {
        coins.push((
            c.pay(p2wpkh(&key(1)), Amount::from_sat(100_000)).unwrap(),
            c.pay(p2wpkh(&key(1)), Amount::from_sat(100_000)).unwrap(),
        ));
        c.mine(1).unwrap();
    }
    assert_eq!(coins[0], coins[1]);
    let (coin, coin2) = coins[0];
    let to = |sat| {
        vec![TxOut {
            value: Amount::from_sat(sat),
            script_pubkey: p2wpkh(&key(9)),
        }]
    };
    let pooled = |txid| {
        twin.mempool()
            .into_iter()
            .find(|t| t.compute_txid() == txid)
            .unwrap()
    };
    let tx = pooled(twin.spend(coin, to(90_000), Some(&key(1))).unwrap());
    let txid = tx.compute_txid();
    let cheaper = pooled(twin.spend(coin2, to(95_000), Some(&key(1))).unwrap());
    // On the served chain coin2 is already spent in the mempool, paying
    // more than `cheaper` would.
    let first = chain.spend(coin2, to(90_000), Some(&key(1))).unwrap();

    let (node, _dir) = node(&chain, SimNodeConfig::default()).await;
    let source = BitcoindSource::connect(cookie_config(&node)).await.unwrap();

    // A replacement paying less than what it replaces: InsufficientFee,
    // with Core's explanation.
    match source.broadcast(&cheaper).await {
        Err(BroadcastError::Rejected {
            reason: RejectReason::InsufficientFee { rule },
            txid: t,
        }) => {
            assert_eq!(t, cheaper.compute_txid());
            assert!(rule.to_string().contains("new feerate"), "{rule}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(chain.mempool().len(), 1);

    // A valid transaction goes in, and is mined.
    assert_eq!(source.broadcast(&tx).await.unwrap(), txid);
    assert!(chain.mempool().contains(&tx));
    chain.mine(1).unwrap();
    let tip = source.tip().await.unwrap();
    let block = source.block(tip.hash).await.unwrap();
    assert!(block.txdata.iter().any(|t| t.compute_txid() == txid));
    assert!(block.txdata.iter().any(|t| t.compute_txid() == first));

    // Mined: again is AlreadyConfirmed, a conflicting spend is refused for
    // its spent input (Core does not say whether spent or unknown:
    // MissingInputs, where SimChain says ConflictConfirmed).
    match source.broadcast(&tx).await {
        Err(BroadcastError::Rejected { txid: t, reason }) => {
            assert_eq!((t, reason), (txid, RejectReason::AlreadyConfirmed));
        }
        other => panic!("{other:?}"),
    }
    let mut conflicting = tx.clone();
    conflicting.output[0].value = Amount::from_sat(80_000);
    assert_eq!(
        chain.submit(conflicting.clone()),
        Err(RejectReason::ConflictConfirmed { outpoint: coin })
    );
    match source.broadcast(&conflicting).await {
        Err(BroadcastError::Rejected { reason, .. }) => {
            assert_eq!(reason, RejectReason::MissingInputs { outpoint: coin });
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn configuration_errors_are_typed() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let (good, _dir) = node(&chain, SimNodeConfig::default()).await;

    // Wrong password.
    let mut config = BitcoindConfig::new(
        good.url(),
        BitcoindAuth::UserPassword {
            user: "alice".to_owned(),
            password: "wrong".to_owned(),
        },
        Network::Regtest,
    );
    let err = BitcoindSource::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, BitcoindError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("-rpcuser/-rpcpassword"), "{err}");
    // The right user and password work.
    config.auth = BitcoindAuth::UserPassword {
        user: "alice".to_owned(),
        password: "secret".to_owned(),
    };
    BitcoindSource::connect(config.clone()).await.unwrap();

    // An unreadable cookie.
    let mut missing = cookie_config(&good);
    missing.auth = BitcoindAuth::Cookie(good.cookie_path().unwrap().with_file_name("nope"));
    let err = BitcoindSource::connect(missing).await.unwrap_err();
    assert!(
        matches!(err, BitcoindError::CookieUnreadable { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(".cookie in the node's data directory")
    );

    // The wallets are on signet, the node on regtest.
    let mut signet = cookie_config(&good);
    signet.network = Network::Signet;
    let err = BitcoindSource::connect(signet).await.unwrap_err();
    match &err {
        BitcoindError::WrongNetwork { node, expected, .. } => {
            assert_eq!((node.as_str(), *expected), ("regtest", "signet"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("-chain=signet"));
    // …and a node that says it is on main while the wallets are on regtest.
    let (mainnet, _dir2) = node(
        &chain,
        SimNodeConfig {
            chain: "main".to_owned(),
            ..SimNodeConfig::default()
        },
    )
    .await;
    assert!(matches!(
        BitcoindSource::connect(cookie_config(&mainnet)).await,
        Err(BitcoindError::WrongNetwork { .. })
    ));

    // No filter index.
    let (no_index, _dir3) = node(
        &chain,
        SimNodeConfig {
            filter_index: false,
            ..SimNodeConfig::default()
        },
    )
    .await;
    let err = BitcoindSource::connect(cookie_config(&no_index))
        .await
        .unwrap_err();
    assert!(matches!(err, BitcoindError::NoFilterIndex { .. }), "{err}");
    assert!(err.to_string().contains("-blockfilterindex=1"));

    // Initial block download.
    let (ibd, _dir4) = node(
        &chain,
        SimNodeConfig {
            initial_block_download: true,
            ..SimNodeConfig::default()
        },
    )
    .await;
    let err = BitcoindSource::connect(cookie_config(&ibd))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BitcoindError::InitialBlockDownload { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("wait until it has synced"),
        "{err}"
    );

    // Nobody listening: unreachable, and retryable as a SourceError.
    let url = good.url();
    good.shutdown().await;
    let mut gone = BitcoindConfig::new(
        url,
        BitcoindAuth::UserPassword {
            user: "alice".to_owned(),
            password: "secret".to_owned(),
        },
        Network::Regtest,
    );
    gone.timeout = Duration::from_secs(2);
    match BitcoindSource::connect(gone).await {
        Err(BitcoindError::Unreachable { source, .. }) => {
            assert_eq!(source.kind(), ErrorKind::Retryable);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_restarted_node_with_a_new_cookie_is_picked_up() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = SimNodeConfig {
        cookie_dir: Some(dir.path().to_owned()),
        ..SimNodeConfig::default()
    };
    let first = SimNode::start(chain.clone(), config.clone()).await.unwrap();
    let port = first.addr().port();
    let source = BitcoindSource::connect(cookie_config(&first))
        .await
        .unwrap();
    first.shutdown().await;
    // Same port, new cookie.
    let second = SimNode::start(chain.clone(), SimNodeConfig { port, ..config })
        .await
        .unwrap();
    chain.mine(1).unwrap();
    assert_eq!(source.tip().await.unwrap(), chain.tip());
    // REST needs no login; the RPC path re-reads the cookie.
    assert_eq!(
        source.rpc("getblockcount", json!([])).await.unwrap(),
        json!(chain.height())
    );
    // A cookie that cannot be read any more is a configuration error.
    let cookie = second.cookie_path().unwrap().to_owned();
    second.shutdown().await;
    assert!(!cookie.exists());
    let third = SimNode::start(
        chain.clone(),
        SimNodeConfig {
            port,
            ..SimNodeConfig::default()
        },
    )
    .await
    .unwrap();
    let tx = chain.mempool();
    assert!(tx.is_empty());
    match source.rpc("getblockcount", json!([])).await {
        Err(RpcFailure::Unauthorized) => {}
        other => panic!("{other:?}"),
    }
    drop(third);
}

#[tokio::test]
async fn a_node_that_does_not_answer_times_out() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let mut config = BitcoindConfig::new(
        format!("http://{addr}"),
        BitcoindAuth::UserPassword {
            user: "u".to_owned(),
            password: "p".to_owned(),
        },
        Network::Regtest,
    );
    config.timeout = Duration::from_millis(200);
    match BitcoindSource::connect(config).await {
        Err(BitcoindError::Unreachable {
            source: SourceError::Timeout { after_ms },
            ..
        }) => assert_eq!(after_ms, 200),
        other => panic!("{other:?}"),
    }
    hold.abort();
}

#[test]
fn data_that_does_not_match_its_request_is_invalid() {
    let chain = SimChain::generate(SimParams::unsigned(5), 3).unwrap();
    let block = chain.block_at(2).unwrap();
    let hash = block.block_hash();
    check_block(&block, hash).unwrap();
    // Another block's hash, and a transaction that is not in the root.
    assert!(matches!(
        check_block(&block, chain.hash_at(1).unwrap()),
        Err(SourceError::Invalid { .. })
    ));
    let mut tampered = (*block).clone();
    tampered.txdata[0].output[0].value = Amount::from_sat(1);
    assert!(matches!(
        check_block(&tampered, hash),
        Err(SourceError::Invalid { .. })
    ));
    // A REST filter: right, for another block, truncated, another type.
    let filter = chain.filter_at(2).unwrap();
    let mut rest = vec![0u8];
    rest.extend(hash.as_byte_array());
    rest.extend(serialize(&filter));
    assert_eq!(parse_rest_filter(&rest, hash).unwrap(), filter);
    let other = chain.hash_at(1).unwrap();
    assert!(matches!(
        parse_rest_filter(&rest, other),
        Err(SourceError::Invalid { .. })
    ));
    assert!(matches!(
        parse_rest_filter(&rest[..rest.len() - 1], hash),
        Err(SourceError::Invalid { .. })
    ));
    rest[0] = 1;
    assert!(matches!(
        parse_rest_filter(&rest, hash),
        Err(SourceError::Invalid { .. })
    ));
    assert!(matches!(
        parse_rest_filter(&[], hash),
        Err(SourceError::Invalid { .. })
    ));
}

#[tokio::test]
async fn a_cookie_that_is_not_core_s_says_where_to_point() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let (node, dir) = node(&chain, SimNodeConfig::default()).await;
    let with_cookie = |path: PathBuf| {
        let mut config = cookie_config(&node);
        config.auth = BitcoindAuth::Cookie(path);
        config
    };
    // Garbage, without Core's `user:password`; and a path that is a
    // directory (a datadir given for the cookie: unreadable as a file,
    // even for root, which reads files whatever their mode).
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "not a cookie\n").unwrap();
    for path in [garbage, dir.path().to_owned()] {
        let err = BitcoindSource::connect(with_cookie(path.clone()))
            .await
            .unwrap_err();
        match &err {
            BitcoindError::CookieUnreadable { path: p, .. } => assert_eq!(*p, path),
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains(".cookie in the node's data directory"),
            "{message}"
        );
    }
    // Shaped like a cookie but not the node's (a stale one): refused by
    // the node, Unauthorized, pointing at the cookie path.
    let stale = dir.path().join("stale");
    std::fs::write(&stale, format!("__cookie__:{}\n", "ab".repeat(32))).unwrap();
    let err = BitcoindSource::connect(with_cookie(stale))
        .await
        .unwrap_err();
    assert!(matches!(err, BitcoindError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("the cookie path"), "{err}");
}

/// WARN events' messages, from lockstep's own code, while installed as the
/// thread's default subscriber.
#[derive(Default, Clone)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target().starts_with("lockstep")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn rest_off_falls_back_to_rpc_and_says_how_to_turn_it_on() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let warnings = Warnings::default();
    // The test runtime is single-threaded: connect logs on this thread.
    let _guard = tracing::subscriber::set_default(warnings.clone());
    for rest in [true, false] {
        let config = SimNodeConfig {
            rest,
            ..SimNodeConfig::default()
        };
        let (node, _dir) = node(&chain, config).await;
        let source = BitcoindSource::connect(cookie_config(&node)).await.unwrap();
        assert_eq!(source.uses_rest(), rest);
        assert_eq!(source.tip().await.unwrap(), chain.tip());
        let said = std::mem::take(&mut *warnings.0.lock().unwrap());
        if rest {
            assert!(said.is_empty(), "{said:?}");
        } else {
            assert_eq!(said.len(), 1, "{said:?}");
            assert!(said[0].contains("REST interface is off"), "{said:?}");
            assert!(said[0].contains("-rest=1"), "{said:?}");
        }
    }
}

#[tokio::test]
async fn a_lying_node_is_invalid() {
    let chain = SimChain::generate(SimParams::unsigned(4).with_load(2..=4, 1..=2), 20).unwrap();
    let at = 12;
    let hash = chain.hash_at(at).unwrap();
    for rest in [true, false] {
        let start = |lie| {
            node(
                &chain,
                SimNodeConfig {
                    rest,
                    lie: Some(lie),
                    ..SimNodeConfig::default()
                },
            )
        };
        let invalid = |result: Result<(), SourceError>, what: Missing| match result {
            Err(SourceError::Invalid { what: w, reason }) => {
                assert_eq!(w, what, "{reason}");
                assert_eq!(
                    SourceError::Invalid { what, reason }.kind(),
                    ErrorKind::Invalid
                );
            }
            other => panic!("rest {rest}: {other:?}"),
        };

        // Another block for the hash.
        let (lying, _dir) = start(Lie::Block(at)).await;
        let source = BitcoindSource::connect(cookie_config(&lying))
            .await
            .unwrap();
        invalid(source.block(hash).await.map(drop), Missing::Block(hash));
        // Only that block: the others are served and accepted.
        let below = chain.hash_at(at - 1).unwrap();
        assert_eq!(
            *source.block(below).await.unwrap(),
            *chain.block_at(at - 1).unwrap()
        );

        // A header that does not hash to the hash asked for.
        let (lying, _dir) = start(Lie::Header(at)).await;
        let source = BitcoindSource::connect(cookie_config(&lying))
            .await
            .unwrap();
        invalid(source.header(hash).await.map(drop), Missing::Header(hash));
        assert_eq!(
            source.header(below).await.unwrap(),
            chain.block_at(at - 1).unwrap().header
        );

        // A filter the node's filter header does not commit to: it decodes
        // and is served under the right hash, so the source passes it on;
        // the manager checks it against the filter-header chain
        // (tests/it/bitcoind.rs).
        let (lying, _dir) = start(Lie::Filter(at)).await;
        let source = BitcoindSource::connect(cookie_config(&lying))
            .await
            .unwrap();
        let served = source.filter(hash).await.unwrap();
        assert_eq!(served, chain.filter_at(at - 1).unwrap());
        assert_ne!(served, chain.filter_at(at).unwrap());
        assert_eq!(
            source.filter_header(hash).await.unwrap(),
            chain.filter_header_at(at).unwrap()
        );
    }
}

#[tokio::test]
async fn a_node_reconfigured_after_connect_is_misconfigured_and_retryable() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let hash = chain.hash_at(5).unwrap();
    for rest in [true, false] {
        let (first, _dir) = node(
            &chain,
            SimNodeConfig {
                rest,
                ..SimNodeConfig::default()
            },
        )
        .await;
        let port = first.addr().port();
        let mut config = cookie_config(&first);
        config.auth = BitcoindAuth::UserPassword {
            user: "alice".to_owned(),
            password: "secret".to_owned(),
        };
        let source = BitcoindSource::connect(config).await.unwrap();
        source.filter(hash).await.unwrap();
        first.shutdown().await;
        // Restarted on the same port without the filter index.
        let (second, _dir2) = node(
            &chain,
            SimNodeConfig {
                port,
                rest,
                filter_index: false,
                ..SimNodeConfig::default()
            },
        )
        .await;
        for result in [
            source.filter(hash).await.map(drop),
            source.filter_header(hash).await.map(drop),
        ] {
            match result {
                Err(e @ SourceError::Misconfigured { .. }) => {
                    assert!(e.is_retryable());
                    assert!(e.to_string().contains("-blockfilterindex=1"), "{e}");
                }
                other => panic!("rest {rest}: {other:?}"),
            }
        }
        second.shutdown().await;
    }
}

#[tokio::test]
async fn a_node_that_goes_away_or_hangs_after_connect_is_retryable() {
    let chain = SimChain::generate(SimParams::unsigned(3), 10).unwrap();
    let (node, _dir) = node(&chain, SimNodeConfig::default()).await;
    let addr = node.addr();
    let mut config = cookie_config(&node);
    config.timeout = Duration::from_millis(300);
    let source = BitcoindSource::connect(config).await.unwrap();
    assert_eq!(source.tip().await.unwrap(), chain.tip());

    // Gone: nothing listens.
    node.shutdown().await;
    for result in [
        source.tip().await.map(drop),
        source.block(chain.tip().hash).await.map(drop),
    ] {
        match result {
            Err(e @ SourceError::Unavailable { .. }) => assert!(e.is_retryable()),
            other => panic!("{other:?}"),
        }
    }

    // Back on the port, but it accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    for result in [
        source.tip().await.map(drop),
        source.filter(chain.tip().hash).await.map(drop),
    ] {
        match result {
            Err(e @ SourceError::Timeout { after_ms: 300 }) => assert!(e.is_retryable()),
            other => panic!("{other:?}"),
        }
    }
    hold.abort();
}

/// Bitcoin Core answers 503 past its `-rpcworkqueue`: the source keeps at
/// most `max_in_flight` requests at the node, so the manager's deep
/// prefetch fits a busy node's queue; without that limit the same burst
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_stay_within_the_node_s_work_queue() {
    let chain = SimChain::generate(SimParams::unsigned(31), 80).unwrap();
    let (node, _dir) = node(
        &chain,
        SimNodeConfig {
            work_queue: Some(8),
            service_time: Some(Duration::from_millis(5)),
            ..SimNodeConfig::default()
        },
    )
    .await;
    let burst = |source: Arc<BitcoindSource>| {
        let chain = chain.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for height in 1..=64 {
                let (source, hash) = (source.clone(), chain.hash_at(height).unwrap());
                tasks.spawn(async move { source.filter(hash).await });
            }
            let mut refused = 0;
            while let Some(result) = tasks.join_next().await {
                match result.unwrap() {
                    Ok(_) => {}
                    Err(SourceError::Unavailable { reason }) => {
                        assert!(reason.contains("Work queue depth exceeded"), "{reason}");
                        refused += 1;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            refused
        }
    };
    let mut within = cookie_config(&node);
    within.max_in_flight = 8;
    let within = Arc::new(BitcoindSource::connect(within).await.unwrap());
    assert_eq!(
        burst(within).await,
        0,
        "64 filters, 8 at a time: none refused"
    );
    let mut beyond = cookie_config(&node);
    beyond.max_in_flight = 64;
    let beyond = Arc::new(BitcoindSource::connect(beyond).await.unwrap());
    assert!(burst(beyond).await > 0, "64 at once overflow a queue of 8");
}

/// Waves of more requests than may be in flight, as the manager's
/// prefetch sends them: with the default configuration the source reuses
/// its keep-alive connections instead of closing some after each wave and
/// opening them again (each a TCP handshake, a task on both sides and a
/// teardown). A pool keeping fewer idle connections than requests in
/// flight (16 against 32, the defaults before) opened some 16 more per
/// wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_of_requests_reuse_the_connections() {
    let chain = SimChain::generate(SimParams::unsigned(32), 100).unwrap();
    let (node, _dir) = node(&chain, SimNodeConfig::default()).await;
    let config = cookie_config(&node);
    let in_flight = config.max_in_flight as u64;
    let source = Arc::new(BitcoindSource::connect(config).await.unwrap());
    let before = node.connections_accepted();
    const WAVES: u64 = 20;
    for _ in 0..WAVES {
        let mut tasks = tokio::task::JoinSet::new();
        for height in 1..=2 * in_flight as u32 {
            let (source, hash) = (source.clone(), chain.hash_at(height).unwrap());
            tasks.spawn(async move { source.filter(hash).await });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap().unwrap();
        }
        // Idle between waves, as the loop is while it commits a batch.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let opened = node.connections_accepted() - before;
    assert!(
        opened <= 2 * in_flight,
        "{opened} connections opened for {WAVES} waves of {} requests, {in_flight} in flight",
        2 * in_flight
    );
}

/// The loop's own requests (headers, the tip) have turns of their own: a
/// header request made while the prefetch keeps many filter requests
/// waiting for their turns is answered before that queue drains, not
/// after it (one at the end of a benchmark's sync waited 10-28 ms behind
/// it, the loop stalled meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_s_requests_do_not_wait_behind_the_prefetch() {
    let chain = SimChain::generate(SimParams::unsigned(33), 80).unwrap();
    let (node, _dir) = node(
        &chain,
        SimNodeConfig {
            service_time: Some(Duration::from_millis(5)),
            ..SimNodeConfig::default()
        },
    )
    .await;
    let mut config = cookie_config(&node);
    config.max_in_flight = 2;
    let source = Arc::new(BitcoindSource::connect(config).await.unwrap());
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    const QUEUED: usize = 60;
    for height in 1..=QUEUED as u32 {
        let (source, hash, asked, answered) = (
            source.clone(),
            chain.hash_at(height).unwrap(),
            asked.clone(),
            answered.clone(),
        );
        tasks.spawn(async move {
            // Counted as it asks: nothing yields between the count and the
            // request taking its place in the queue of turns.
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            source.filter(hash).await.unwrap();
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    // Every filter request is waiting for a turn or in flight.
    tokio::time::timeout(Duration::from_secs(10), async {
        while asked.load(std::sync::atomic::Ordering::SeqCst) < QUEUED {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every filter request asked within 10 s");
    let headers = source.headers(1, 10).await.unwrap();
    let tip = source.tip().await.unwrap();
    let before = answered.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(headers.len(), 10);
    assert_eq!(tip.height, chain.height());
    // 60 filters two at a time take 30 service times; the header request
    // and the tip take two. Sharing the prefetch's turns, they came after
    // all 60.
    assert!(
        before <= QUEUED / 2,
        "{before} of {QUEUED} queued filters were answered before the loop's two requests"
    );
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}
