//! The stand-in node against Bitcoin Core's documented formats: each REST
//! endpoint and RPC method over real HTTP on loopback, compared with
//! expectations built by hand from `doc/REST-interface.md`, `src/rest.cpp`
//! and the RPC help texts (byte layouts from rust-bitcoin's consensus
//! encoding, which is Core's), plus authentication and the error cases.

use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, Block, CompressedPublicKey, ScriptBuf, Transaction, TxOut};
use serde_json::{Value, json};

use super::*;
use crate::SimParams;

fn key(n: u8) -> SecretKey {
    SecretKey::from_slice(&[n; 32]).expect("a valid key")
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let secp = Secp256k1::new();
    ScriptBuf::new_p2wpkh(&CompressedPublicKey(key.public_key(&secp)).wpubkey_hash())
}

fn hex(bytes: &[u8]) -> String {
    super::answers::hex(bytes)
}

struct Node {
    node: SimNode,
    chain: SimChain,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(chain: SimChain, config: SimNodeConfig) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = SimNodeConfig {
            cookie_dir: Some(dir.path().to_owned()),
            user_password: Some(("alice".to_owned(), "secret".to_owned())),
            ..config
        };
        let node = SimNode::start(chain.clone(), config).await.unwrap();
        Node {
            node,
            chain,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        let response = self
            .http
            .get(format!("{}{path}", self.node.url()))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (
            status,
            content_type,
            response.bytes().await.unwrap().to_vec(),
        )
    }

    async fn rpc_raw(&self, body: Value, auth: Option<(&str, &str)>) -> (u16, Value) {
        let mut request = self.http.post(self.node.url()).json(&body);
        if let Some((user, password)) = auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A JSON-RPC 1.0 call with the user's password: the HTTP status and
    /// the whole reply.
    async fn rpc(&self, method: &str, params: Value) -> (u16, Value) {
        self.rpc_raw(
            json!({"jsonrpc": "1.0", "id": "t", "method": method, "params": params}),
            Some(("alice", "secret")),
        )
        .await
    }

    async fn ok(&self, method: &str, params: Value) -> Value {
        let (status, reply) = self.rpc(method, params).await;
        assert_eq!(status, 200, "{method}: {reply}");
        assert_eq!(reply["error"], Value::Null);
        reply["result"].clone()
    }

    async fn error(&self, method: &str, params: Value) -> (u16, i64, String) {
        let (status, reply) = self.rpc(method, params).await;
        assert_eq!(reply["result"], Value::Null, "{method}: {reply}");
        (
            status,
            reply["error"]["code"].as_i64().unwrap(),
            reply["error"]["message"].as_str().unwrap().to_owned(),
        )
    }
}

async fn started(blocks: u32) -> Node {
    let chain = SimChain::generate(SimParams::signed(1), blocks).unwrap();
    Node::start(chain, SimNodeConfig::default()).await
}

#[tokio::test]
async fn rest_serves_core_formats() {
    let n = started(30).await;
    let chain = &n.chain;
    let tip = chain.tip();

    // chaininfo.json: Core's getblockchaininfo object, fields in Core's order.
    let (status, content_type, body) = n.get("/rest/chaininfo.json").await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("}\n"));
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["chain"], "regtest");
    assert_eq!(info["blocks"], 30);
    assert_eq!(info["headers"], 30);
    assert_eq!(info["bestblockhash"], tip.hash.to_string());
    assert_eq!(info["bits"], "207fffff");
    assert_eq!(info["initialblockdownload"], false);
    assert_eq!(info["pruned"], false);
    // Regtest blocks each add 2 to the chain work.
    assert_eq!(info["chainwork"], format!("{:064x}", 2 * 31));
    // UniValue writes doubles with 16 significant digits.
    assert!(
        text.contains("\"difficulty\":4.656542373906925e-10,"),
        "{text}"
    );
    let keys: Vec<&str> = [
        "\"chain\"",
        "\"blocks\"",
        "\"headers\"",
        "\"bestblockhash\"",
    ]
    .into_iter()
    .collect();
    let positions: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");

    // blockhashbyheight in its three formats.
    let hash7 = chain.hash_at(7).unwrap();
    let (status, content_type, body) = n.get("/rest/blockhashbyheight/7.bin").await;
    assert_eq!(
        (status, content_type.as_str(), body),
        (200, "application/octet-stream", serialize(&hash7))
    );
    let (_, _, body) = n.get("/rest/blockhashbyheight/7.hex").await;
    assert_eq!(body, format!("{hash7}\n").into_bytes());
    let (_, _, body) = n.get("/rest/blockhashbyheight/7.json").await;
    assert_eq!(
        body,
        format!("{{\"blockhash\":\"{hash7}\"}}\n").into_bytes()
    );
    let (status, _, body) = n.get("/rest/blockhashbyheight/31.bin").await;
    assert_eq!(
        (status, body),
        (404, b"Block height out of range\r\n".to_vec())
    );
    let (status, _, body) = n.get("/rest/blockhashbyheight/-1.bin").await;
    assert_eq!((status, body), (400, b"Invalid height: -1\r\n".to_vec()));

    // headers, deprecated path and the ?count= form: 80-byte headers from
    // the block given, stopping at the tip.
    let expected: Vec<u8> = (5..=30)
        .flat_map(|h| serialize(&chain.block_at(h).unwrap().header))
        .collect();
    let hash5 = chain.hash_at(5).unwrap();
    let (status, _, body) = n.get(&format!("/rest/headers/100/{hash5}.bin")).await;
    assert_eq!((status, body.len()), (200, 26 * 80));
    assert_eq!(body, expected);
    let (_, _, body) = n.get(&format!("/rest/headers/{hash5}.bin?count=3")).await;
    assert_eq!(body, expected[..240]);
    let (_, _, body) = n.get(&format!("/rest/headers/{hash5}.hex?count=2")).await;
    assert_eq!(body, format!("{}\n", hex(&expected[..160])).into_bytes());
    // An unknown block gives no headers (200, empty), as Core.
    let unknown = bitcoin::BlockHash::all_zeros();
    let (status, _, body) = n.get(&format!("/rest/headers/5/{unknown}.bin")).await;
    assert_eq!((status, body.len()), (200, 0));
    let (status, _, body) = n.get(&format!("/rest/headers/2001/{hash5}.bin")).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        b"Header count is invalid or out of acceptable range (1-2000): 2001\r\n".to_vec()
    );
    let (status, _, body) = n.get("/rest/headers/5/nothex.bin").await;
    assert_eq!((status, body), (400, b"Invalid hash: nothex\r\n".to_vec()));

    // block: the consensus serialisation, 404 for an unknown block.
    let (status, _, body) = n.get(&format!("/rest/block/{hash7}.bin")).await;
    assert_eq!(status, 200);
    assert_eq!(body, serialize(&*chain.block_at(7).unwrap()));
    let block: Block = deserialize(&body).unwrap();
    assert_eq!(block.block_hash(), hash7);
    let (status, _, body) = n.get(&format!("/rest/block/{unknown}.bin")).await;
    assert_eq!(
        (status, body),
        (404, format!("{unknown} not found\r\n").into_bytes())
    );
    let (status, _, body) = n.get(&format!("/rest/block/{hash7}.xml")).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // blockfilter: Core's serialised BlockFilter (type 0, block hash,
    // filter as a byte vector).
    let filter = chain.filter_at(7).unwrap();
    let mut expected = vec![0u8];
    expected.extend(hash7.as_byte_array());
    expected.extend(serialize(&filter));
    let (status, _, body) = n.get(&format!("/rest/blockfilter/basic/{hash7}.bin")).await;
    assert_eq!((status, body), (200, expected));
    let (_, _, body) = n
        .get(&format!("/rest/blockfilter/basic/{hash7}.json"))
        .await;
    assert_eq!(
        body,
        format!("{{\"filter\":\"{}\"}}\n", hex(&filter)).into_bytes()
    );
    let (status, _, body) = n
        .get(&format!("/rest/blockfilter/extended/{hash7}.bin"))
        .await;
    assert_eq!(
        (status, body),
        (400, b"Unknown filtertype extended\r\n".to_vec())
    );
    let (status, _, _) = n
        .get(&format!("/rest/blockfilter/basic/{unknown}.bin"))
        .await;
    assert_eq!(status, 404);

    // blockfilterheaders: 32 bytes each, both path forms.
    let expected: Vec<u8> = (7..=30)
        .flat_map(|h| serialize(&chain.filter_header_at(h).unwrap()))
        .collect();
    let (status, _, body) = n
        .get(&format!("/rest/blockfilterheaders/basic/2000/{hash7}.bin"))
        .await;
    assert_eq!((status, body.len()), (200, 24 * 32));
    assert_eq!(body, expected);
    let (_, _, body) = n
        .get(&format!(
            "/rest/blockfilterheaders/basic/{hash7}.bin?count=4"
        ))
        .await;
    assert_eq!(body, expected[..128]);
    let (_, _, body) = n
        .get(&format!(
            "/rest/blockfilterheaders/basic/{hash7}.json?count=1"
        ))
        .await;
    let header7 = chain.filter_header_at(7).unwrap();
    assert_eq!(body, format!("[\"{header7}\"]\n").into_bytes());
    let (status, _, _) = n
        .get(&format!("/rest/blockfilterheaders/basic/0/{hash7}.bin"))
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn rest_mempool_contents() {
    let n = started(101).await;
    let (_, _, body) = n.get("/rest/mempool/contents.json").await;
    assert_eq!(body, b"{}\n".to_vec());
    let txid = n
        .chain
        .spend_to(
            n.chain
                .pay(p2wpkh(&key(1)), Amount::from_sat(50_000))
                .unwrap(),
            p2wpkh(&key(2)),
            Some(&key(1)),
        )
        .unwrap();
    let (status, _, body) = n.get("/rest/mempool/contents.json").await;
    assert_eq!(status, 200);
    let contents: Value = serde_json::from_slice(&body).unwrap();
    let pool = n.chain.mempool_fees();
    assert_eq!(contents.as_object().unwrap().len(), pool.len());
    let entry = &contents[txid.to_string()];
    let tx = pool.iter().find(|(t, _)| t.compute_txid() == txid).unwrap();
    assert_eq!(entry["vsize"], tx.0.vsize());
    assert_eq!(entry["wtxid"], tx.0.compute_wtxid().to_string());
    assert_eq!(entry["fees"]["base"].as_f64().unwrap(), tx.1.to_btc());
    assert_eq!(entry["depends"].as_array().unwrap().len(), 1, "{entry}");
    let (_, _, body) = n.get("/rest/mempool/contents.json?verbose=false").await;
    let txids: Vec<String> = serde_json::from_slice(&body).unwrap();
    assert!(txids.contains(&txid.to_string()));
    let (status, _, _) = n.get("/rest/mempool/contents.bin").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn rest_off_and_filter_index_off() {
    let chain = SimChain::generate(SimParams::unsigned(1), 5).unwrap();
    let n = Node::start(
        chain,
        SimNodeConfig {
            rest: false,
            filter_index: false,
            ..SimNodeConfig::default()
        },
    )
    .await;
    let (status, _, _) = n.get("/rest/chaininfo.json").await;
    assert_eq!(status, 404);
    let hash = n.chain.hash_at(1).unwrap().to_string();
    assert_eq!(
        n.error("getblockfilter", json!([hash])).await,
        (
            500,
            -1,
            "Index is not enabled for filtertype basic".to_owned()
        )
    );
}

#[tokio::test]
async fn rpc_reads_in_core_formats() {
    let n = started(30).await;
    let chain = &n.chain;
    let tip = chain.tip();
    let info = n.ok("getblockchaininfo", json!([])).await;
    assert_eq!(info["chain"], "regtest");
    assert_eq!(info["bestblockhash"], tip.hash.to_string());
    assert_eq!(n.ok("getblockcount", json!([])).await, 30);
    assert_eq!(
        n.ok("getbestblockhash", json!([])).await,
        tip.hash.to_string()
    );
    let hash9 = chain.hash_at(9).unwrap();
    assert_eq!(n.ok("getblockhash", json!([9])).await, hash9.to_string());
    // Named parameters too.
    assert_eq!(
        n.ok("getblockhash", json!({"height": 9})).await,
        hash9.to_string()
    );
    let block9 = chain.block_at(9).unwrap();
    assert_eq!(
        n.ok("getblockheader", json!([hash9.to_string(), false]))
            .await,
        hex(&serialize(&block9.header))
    );
    let header = n.ok("getblockheader", json!([hash9.to_string()])).await;
    assert_eq!(header["hash"], hash9.to_string());
    assert_eq!(header["height"], 9);
    assert_eq!(header["confirmations"], 22);
    assert_eq!(
        header["previousblockhash"],
        chain.hash_at(8).unwrap().to_string()
    );
    assert_eq!(
        header["nextblockhash"],
        chain.hash_at(10).unwrap().to_string()
    );
    assert_eq!(header["merkleroot"], block9.header.merkle_root.to_string());
    assert_eq!(header["bits"], "207fffff");
    assert_eq!(header["nTx"], block9.txdata.len());
    assert_eq!(header["chainwork"], format!("{:064x}", 20));
    let filter = n
        .ok("getblockfilter", json!([hash9.to_string(), "basic"]))
        .await;
    assert_eq!(filter["filter"], hex(&chain.filter_at(9).unwrap()));
    assert_eq!(
        filter["header"],
        chain.filter_header_at(9).unwrap().to_string()
    );
    assert_eq!(
        n.ok("getblock", json!([hash9.to_string(), 0])).await,
        hex(&serialize(&*block9))
    );
    let coinbase = &block9.txdata[0];
    assert_eq!(
        n.ok(
            "getrawtransaction",
            json!([
                coinbase.compute_txid().to_string(),
                false,
                hash9.to_string()
            ])
        )
        .await,
        hex(&serialize(coinbase))
    );
    assert_eq!(n.ok("getrawmempool", json!([])).await, json!([]));

    // Errors, with Core's codes, messages and HTTP statuses (JSON-RPC 1.0).
    assert_eq!(
        n.error("getblockhash", json!([31])).await,
        (500, -8, "Block height out of range".to_owned())
    );
    assert_eq!(
        n.error("getblockhash", json!(["9"])).await,
        (
            500,
            -3,
            "JSON value of type string is not of expected type number".to_owned()
        )
    );
    let zeros = "00".repeat(32);
    assert_eq!(
        n.error("getblockheader", json!([zeros])).await,
        (500, -5, "Block not found".to_owned())
    );
    assert_eq!(
        n.error("getblock", json!(["abc"])).await,
        (
            500,
            -8,
            "blockhash must be of length 64 (not 3, for 'abc')".to_owned()
        )
    );
    assert_eq!(
        n.error("getblockfilter", json!([hash9.to_string(), "extended"]))
            .await,
        (500, -5, "Unknown filtertype".to_owned())
    );
    assert_eq!(
        n.error("getnetworkinfo", json!([])).await,
        (404, -32601, "Method not found".to_owned())
    );
    assert_eq!(n.error("getblockhash", json!([])).await.1, -1);
    assert_eq!(n.error("getrawtransaction", json!([zeros])).await.1, -5);

    // JSON-RPC 2.0: HTTP 200 even on error, no "error" member on success.
    let (status, reply) = n
        .rpc_raw(
            json!({"jsonrpc": "2.0", "id": 7, "method": "getblockcount"}),
            Some(("alice", "secret")),
        )
        .await;
    assert_eq!(
        (status, reply),
        (200, json!({"jsonrpc": "2.0", "result": 30, "id": 7}))
    );
    let (status, reply) = n
        .rpc_raw(
            json!({"jsonrpc": "2.0", "id": 8, "method": "nope"}),
            Some(("alice", "secret")),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["error"]["code"], -32601);
    assert!(reply.get("result").is_none());
    // A batch answers each request in order.
    let (status, reply) = n
        .rpc_raw(
            json!([
                {"id": 1, "method": "getblockcount"},
                {"id": 2, "method": "getblockhash", "params": [0]}
            ]),
            Some(("alice", "secret")),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply[0]["result"], 30);
    assert_eq!(reply[1]["result"], chain.hash_at(0).unwrap().to_string());
}

#[tokio::test]
async fn rpc_authentication() {
    let n = started(1).await;
    let body = json!({"id": 1, "method": "getblockcount"});
    let (status, _) = n.rpc_raw(body.clone(), None).await;
    assert_eq!(status, 401);
    let (status, _) = n.rpc_raw(body.clone(), Some(("alice", "wrong"))).await;
    assert_eq!(status, 401);
    // The cookie file holds `__cookie__:<64 hex>`, and that login works.
    let cookie = std::fs::read_to_string(n.node.cookie_path().unwrap()).unwrap();
    let (user, password) = cookie.split_once(':').unwrap();
    assert_eq!(user, "__cookie__");
    assert_eq!(password.len(), 64);
    assert!(password.bytes().all(|b| b.is_ascii_hexdigit()));
    let (status, reply) = n.rpc_raw(body.clone(), Some((user, password))).await;
    assert_eq!((status, reply["result"].clone()), (200, json!(1)));
    // The 401 carries Core's challenge.
    let response = n.http.post(n.node.url()).json(&body).send().await.unwrap();
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"jsonrpc\""
    );
    // REST needs no authentication, as in Core.
    assert_eq!(n.get("/rest/chaininfo.json").await.0, 200);
    let path = n.node.cookie_path().unwrap().to_owned();
    n.node.shutdown().await;
    assert!(!path.exists(), "the cookie is removed on shutdown");
}

/// Two chains from the same seed stay identical as long as the same
/// calls are made on both: a transaction built and signed by `spend` on
/// the twin is a valid transaction for the served chain that the served
/// chain has not seen.
fn twins(blocks: u32) -> (SimChain, SimChain) {
    let a = SimChain::generate(SimParams::signed(4), blocks).unwrap();
    let b = SimChain::generate(SimParams::signed(4), blocks).unwrap();
    (a, b)
}

fn to(value: u64) -> Vec<TxOut> {
    vec![TxOut {
        value: Amount::from_sat(value),
        script_pubkey: p2wpkh(&key(9)),
    }]
}

fn pooled(chain: &SimChain, txid: bitcoin::Txid) -> Transaction {
    chain
        .mempool()
        .into_iter()
        .find(|t| t.compute_txid() == txid)
        .unwrap()
}

#[tokio::test]
async fn sendrawtransaction_maps_rejections_to_core_errors() {
    let (served, twin) = twins(102);
    let coin = served
        .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
        .unwrap();
    assert_eq!(
        twin.pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
            .unwrap(),
        coin
    );
    served.mine(1).unwrap();
    twin.mine(1).unwrap();
    let n = Node::start(served, SimNodeConfig::default()).await;

    // A valid transaction: testmempoolaccept allows it without taking it,
    // sendrawtransaction takes it and answers its txid.
    let tx = pooled(&twin, twin.spend(coin, to(90_000), Some(&key(1))).unwrap());
    let raw = hex(&serialize(&tx));
    let verdict = n.ok("testmempoolaccept", json!([[raw]])).await;
    assert_eq!(verdict[0]["allowed"], true, "{verdict}");
    assert_eq!(verdict[0]["txid"], tx.compute_txid().to_string());
    assert_eq!(verdict[0]["fees"]["base"].as_f64().unwrap(), 0.0001);
    assert!(n.chain.mempool().is_empty());
    assert_eq!(
        n.ok("sendrawtransaction", json!([raw])).await,
        tx.compute_txid().to_string()
    );
    assert_eq!(
        n.ok("getrawmempool", json!([])).await,
        json!([tx.compute_txid().to_string()])
    );
    assert_eq!(
        n.ok("getrawtransaction", json!([tx.compute_txid().to_string()]))
            .await,
        raw
    );
    // Again: already in the mempool is not an error for sendrawtransaction.
    assert_eq!(
        n.ok("sendrawtransaction", json!([raw])).await,
        tx.compute_txid().to_string()
    );

    // A replacement paying less: -26 "insufficient fee, rejecting
    // replacement <txid>; new feerate … <= old feerate …", built on a fresh
    // twin where the first spend is not in the mempool.
    let worse = {
        let (_, fresh) = twins(102);
        fresh
            .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
            .unwrap();
        fresh.mine(1).unwrap();
        pooled(
            &fresh,
            fresh.spend(coin, to(95_000), Some(&key(1))).unwrap(),
        )
    };
    let worse_raw = hex(&serialize(&worse));
    let (status, code, message) = n.error("sendrawtransaction", json!([worse_raw])).await;
    assert_eq!((status, code), (500, -26));
    assert!(
        message.starts_with(&format!(
            "insufficient fee, rejecting replacement {}; new feerate 0.",
            worse.compute_txid()
        )),
        "{message}"
    );
    assert!(message.contains(" BTC/kvB <= old feerate "), "{message}");
    let verdict = n.ok("testmempoolaccept", json!([[worse_raw]])).await;
    assert_eq!(verdict[0]["allowed"], false);
    assert_eq!(verdict[0]["reject-reason"], "insufficient fee");
    assert_eq!(verdict[0]["reject-details"], message.as_str());

    // Mined: sending it again is -27, a conflicting spend of its input -25.
    n.chain.mine(1).unwrap();
    assert_eq!(
        n.error("sendrawtransaction", json!([raw])).await,
        (
            500,
            -27,
            lockstep_chain::core_format::ALREADY_IN_UTXO_SET.to_owned()
        )
    );
    let mut conflicting = tx.clone();
    conflicting.output[0].value = Amount::from_sat(80_000);
    assert_eq!(
        n.error("sendrawtransaction", json!([hex(&serialize(&conflicting))]))
            .await,
        (500, -25, "bad-txns-inputs-missingorspent".to_owned())
    );
    let verdict = n
        .ok(
            "testmempoolaccept",
            json!([[hex(&serialize(&conflicting))]]),
        )
        .await;
    assert_eq!(verdict[0]["reject-reason"], "missing-inputs");
    assert!(verdict[0].get("reject-details").is_none(), "{verdict}");
    // Overspending: -26 with Core's reason and amounts.
    let mut overspend = conflicting.clone();
    overspend.input[0].previous_output = n
        .chain
        .pay(p2wpkh(&key(1)), Amount::from_sat(100_000))
        .unwrap();
    overspend.output[0].value = Amount::from_sat(150_000);
    n.chain.mine(1).unwrap();
    assert_eq!(
        n.error("sendrawtransaction", json!([hex(&serialize(&overspend))]))
            .await,
        (
            500,
            -26,
            "bad-txns-in-belowout, value in (0.00100000) < value out (0.00150000)"
                .replace("0.00100000", "0.001")
                .replace("0.00150000", "0.0015")
        )
    );
    // Not a transaction at all.
    assert_eq!(
        n.error("sendrawtransaction", json!(["00zz"])).await,
        (
            500,
            -22,
            "TX decode failed. Make sure the tx has at least one input.".to_owned()
        )
    );
}
