//! [`SimNode`]: a stand-in Bitcoin Core node that serves a [`SimChain`]
//! over HTTP on loopback, through Core's REST interface and JSON-RPC, in
//! Core's formats (bodies, content types, status codes, RPC error codes
//! and messages, cookie authentication).
//!
//! It exists so that [`lockstep_chain::BitcoindSource`] — and any other Core client
//! — can be tested, benchmarked and demonstrated over real HTTP without a
//! `bitcoind`. Formats follow Core 28/29's `doc/REST-interface.md`,
//! `src/rest.cpp` and `src/rpc/*.cpp`; what it serves and what it does not
//! is listed on [`SimNode`]. [`SimNodeConfig`] plays misconfigured and
//! lying nodes, for clients' error paths.

mod answers;
mod rest;
mod rpc;
#[cfg(feature = "zmq")]
mod zmq;

#[cfg(test)]
mod tests;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bitcoin::Block;
use bitcoin::block::Header;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::SimChain;

/// Largest request body the node reads (Core's `MAX_SIZE`-like bound for a
/// JSON-RPC request; a transaction of 4 MB in hex fits).
const MAX_BODY: usize = 32 * 1024 * 1024;

/// How a [`SimNode`] presents itself and who may call its RPC.
#[derive(Debug, Clone)]
pub struct SimNodeConfig {
    /// Core's `-rpcworkqueue`: past this many requests being served at
    /// once, a request is answered HTTP 503 "Work queue depth exceeded",
    /// as Core does (REST and RPC alike). `None`: no limit.
    pub work_queue: Option<usize>,
    /// How long the node takes to serve each request (a busy node), so
    /// that requests pile up as they do at a real one.
    pub service_time: Option<std::time::Duration>,
    /// Whether to publish each transaction entering the mempool on a ZMQ
    /// `rawtx` endpoint on 127.0.0.1 (Core's `-zmqpubrawtx`), at
    /// [`SimNode::zmq_rawtx`]. The chain's mempool is looked at every
    /// 10 ms for that (it may change under the node, through the
    /// `SimChain` handle the test holds).
    #[cfg(feature = "zmq")]
    pub zmq_rawtx: bool,
    /// The port on 127.0.0.1; 0 lets the system choose (see
    /// [`SimNode::addr`]).
    pub port: u16,
    /// Where to write Core's `.cookie` file (`__cookie__:<64 hex>`), as
    /// `bitcoind -datadir` does; `None` writes none.
    pub cookie_dir: Option<PathBuf>,
    /// A user and password the RPC also accepts (Core's `-rpcuser` and
    /// `-rpcpassword`).
    pub user_password: Option<(String, String)>,
    /// The chain name `getblockchaininfo` reports: "regtest" (the
    /// SimChain's), or another to play a node on the wrong network.
    pub chain: String,
    /// Whether the REST interface is on (Core's `-rest`); off, every
    /// `/rest/` path is 404 as in Core.
    pub rest: bool,
    /// Whether the basic block filter index is on (Core's
    /// `-blockfilterindex`).
    pub filter_index: bool,
    /// What `getblockchaininfo` says of `initialblockdownload`.
    pub initial_block_download: bool,
    /// Wrong data to serve for one block, to play a lying (or broken)
    /// node: a client must check what it reads against what it asked for
    /// and what the node committed to. `None`: every answer is right.
    pub lie: Option<Lie>,
}

/// Wrong data a [`SimNode`] serves for the block at a height (see
/// [`SimNodeConfig::lie`]), through REST and JSON-RPC alike. Each answer is
/// well formed and is the real data of another block (the one below, or
/// block 1 for the genesis block), so that only a client that checks
/// hashes and commitments notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lie {
    /// The block asked for by its hash is another block (REST `block`,
    /// `getblock`): its header does not hash to the hash asked for.
    Block(u32),
    /// The header asked for by its hash is another block's header (REST
    /// `headers`, `getblockheader`).
    Header(u32),
    /// The basic filter is another block's, served under this block's
    /// hash (REST `blockfilter`, `getblockfilter`'s `filter`): it decodes,
    /// but the node's own filter header for this block does not commit to
    /// it.
    Filter(u32),
}

impl Lie {
    /// The height whose data is served instead of `height`'s, if this lie
    /// is about `height` and `kind` of data.
    fn instead(self, kind: fn(u32) -> Lie, height: u32) -> u32 {
        if self == kind(height) {
            height.checked_sub(1).unwrap_or(1)
        } else {
            height
        }
    }
}

impl Default for SimNodeConfig {
    fn default() -> Self {
        SimNodeConfig {
            work_queue: None,
            service_time: None,
            #[cfg(feature = "zmq")]
            zmq_rawtx: false,
            port: 0,
            cookie_dir: None,
            user_password: None,
            chain: "regtest".to_owned(),
            rest: true,
            filter_index: true,
            initial_block_download: false,
            lie: None,
        }
    }
}

/// Why a [`SimNode`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimNodeError {
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The cookie file could not be written.
    #[error("cannot write the cookie file {path}: {source}")]
    Cookie {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
}

/// A stand-in Bitcoin Core node serving a [`SimChain`] on 127.0.0.1.
///
/// Served (REST, no authentication, as Core): `chaininfo.json`,
/// `blockhashbyheight/<h>.{bin,hex,json}`, `headers/<count>/<hash>.{bin,hex}`
/// and `headers/<hash>.{bin,hex}?count=N`, `block/<hash>.{bin,hex}`,
/// `blockfilter/basic/<hash>.{bin,hex,json}`,
/// `blockfilterheaders/basic/<count>/<hash>.{bin,hex,json}` and the
/// `?count=` form, `mempool/contents.json` (`?verbose=false` too), `tx/<txid>.{bin,hex}`
/// (mempool only, as Core without `-txindex`).
///
/// Served (JSON-RPC 1.0 and 2.0 on `/`, basic auth with the cookie or the
/// configured user): `getblockchaininfo`, `getblockcount`,
/// `getbestblockhash`, `getblockhash`, `getblockheader` (both verbosities),
/// `getblockfilter`, `getblock` (verbosity 0), `getrawmempool` (verbose
/// false), `getrawtransaction` (raw hex; mempool, or in the block given),
/// `sendrawtransaction`, `testmempoolaccept`.
///
/// Not served: JSON forms of blocks, headers and transactions (REST
/// `.json`, `getblock` verbosity 1 and 2, verbose `getrawtransaction`,
/// `getrawmempool true`), `getutxos`, `gettxout`, wallets, ZMQ topics
/// other than `rawtx` (published with `SimNodeConfig::zmq_rawtx`, under the
/// `zmq` feature). They
/// answer as Core does for an unknown method or format.
#[derive(Debug)]
pub struct SimNode {
    addr: SocketAddr,
    /// The ZMQ `rawtx` endpoint and its publishing task.
    #[cfg(feature = "zmq")]
    zmq: Option<(String, JoinHandle<()>)>,
    cookie: Option<PathBuf>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// TCP connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

/// What every request handler sees.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) chain: SimChain,
    pub(crate) config: SimNodeConfig,
    /// Accepted `Authorization: Basic …` values, precomputed.
    credentials: Vec<String>,
    /// Requests being served now (for [`SimNodeConfig::work_queue`]).
    serving: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// The height whose `kind` of data is served for `height`: itself,
    /// unless the node is configured to lie about it.
    fn served(&self, kind: fn(u32) -> Lie, height: u32) -> u32 {
        self.config
            .lie
            .map_or(height, |lie| lie.instead(kind, height))
    }

    /// The block served for `height`.
    pub(crate) fn block_at(&self, height: u32) -> Option<Arc<Block>> {
        self.chain.block_at(self.served(Lie::Block, height))
    }

    /// The header served for `height`.
    pub(crate) fn header_at(&self, height: u32) -> Option<Header> {
        let served = self.served(Lie::Header, height);
        self.chain.block_at(served).map(|b| b.header)
    }

    /// The basic filter served for `height`.
    pub(crate) fn filter_at(&self, height: u32) -> Option<Vec<u8>> {
        self.chain.filter_at(self.served(Lie::Filter, height))
    }
}

impl SimNode {
    /// Binds 127.0.0.1:`config.port`, writes the cookie file if asked, and
    /// serves `chain` until [`SimNode::shutdown`] or drop. Must be called
    /// inside a Tokio runtime.
    pub async fn start(chain: SimChain, config: SimNodeConfig) -> Result<SimNode, SimNodeError> {
        let listener = TcpListener::bind(("127.0.0.1", config.port))
            .await
            .map_err(|source| SimNodeError::Bind {
                port: config.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimNodeError::Bind {
            port: config.port,
            source,
        })?;
        let mut credentials = Vec::new();
        let mut cookie = None;
        if let Some(dir) = &config.cookie_dir {
            let password = random_hex();
            let path = dir.join(".cookie");
            let line = format!("__cookie__:{password}");
            std::fs::write(&path, &line).map_err(|source| SimNodeError::Cookie {
                path: path.clone(),
                source,
            })?;
            credentials.push(basic(&line));
            cookie = Some(path);
        }
        if let Some((user, password)) = &config.user_password {
            credentials.push(basic(&format!("{user}:{password}")));
        }
        #[cfg(feature = "zmq")]
        let zmq = if config.zmq_rawtx {
            Some(
                zmq::publish_rawtx(chain.clone())
                    .await
                    .map_err(|e| SimNodeError::Bind {
                        port: 0,
                        source: std::io::Error::other(e.to_string()),
                    })?,
            )
        } else {
            None
        };
        let shared = Arc::new(Shared {
            chain,
            config,
            credentials,
            serving: std::sync::atomic::AtomicUsize::new(0),
        });
        let (stop, mut stopped) = watch::channel(false);
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            stream
                        }
                        Err(e) => {
                            tracing::debug!("simnode: accept failed: {e}");
                            continue;
                        }
                    },
                    _ = stopped.changed() => break,
                };
                let shared = shared.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        result = conn.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!("simnode: connection ended: {e}");
                            }
                        }
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Ok(SimNode {
            addr,
            #[cfg(feature = "zmq")]
            zmq,
            cookie,
            stop,
            task,
            accepted,
        })
    }

    /// How many TCP connections it has accepted: a client that keeps its
    /// connections alive and reuses them opens few, one that closes and
    /// reopens them shows here.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, the URL a Core client is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ZMQ `rawtx` endpoint (`tcp://127.0.0.1:<port>`), when
    /// [`SimNodeConfig::zmq_rawtx`] is on.
    #[cfg(feature = "zmq")]
    pub fn zmq_rawtx(&self) -> Option<&str> {
        self.zmq.as_ref().map(|(endpoint, _)| endpoint.as_str())
    }

    /// The cookie file it wrote, if any.
    pub fn cookie_path(&self) -> Option<&Path> {
        self.cookie.as_deref()
    }

    /// Stops listening and closes every connection; removes the cookie
    /// file, as Core does on shutdown.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        #[cfg(feature = "zmq")]
        if let Some((_, task)) = &self.zmq {
            task.abort();
        }
        // The accept loop ends on the signal and drops the listener, so
        // that the port is free when this returns.
        let _ = (&mut self.task).await;
        if let Some(path) = &self.cookie {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        #[cfg(feature = "zmq")]
        if let Some((_, task)) = &self.zmq {
            task.abort();
        }
        self.task.abort();
    }
}

/// 32 random bytes in hex, from the standard library's randomly seeded
/// hasher keys (the OS's randomness), so that no RNG crate with OS
/// entropy is needed for one cookie.
fn random_hex() -> String {
    let mut out = String::with_capacity(64);
    for i in 0..4u64 {
        let word =
            RandomState::new().hash_one((i, std::process::id(), std::time::SystemTime::now()));
        out.push_str(&format!("{word:016x}"));
    }
    out
}

/// The `Authorization` header value for `user:password`.
fn basic(user_password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// A response with a body and a content type.
pub(crate) fn reply(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering;
    let serving = shared.serving.fetch_add(1, Ordering::SeqCst) + 1;
    let response = if shared
        .config
        .work_queue
        .is_some_and(|depth| serving > depth)
    {
        // Core's `http_request_cb` when its work queue is full.
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/html",
            "Work queue depth exceeded",
        )
    } else {
        if let Some(time) = shared.config.service_time {
            tokio::time::sleep(time).await;
        }
        serve(shared, req).await
    };
    shared.serving.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn serve(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    if let Some(rest) = path.strip_prefix("/rest/") {
        if !shared.config.rest || req.method() != Method::GET {
            // Core registers no REST handlers without -rest: libevent's 404.
            return reply(StatusCode::NOT_FOUND, "text/html", "");
        }
        return rest::handle(shared, rest, query.as_deref());
    }
    if path != "/" && !path.starts_with("/wallet/") {
        return reply(StatusCode::NOT_FOUND, "text/html", "");
    }
    if req.method() != Method::POST {
        // Core: "JSONRPC server handles only POST requests".
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/html",
            "JSONRPC server handles only POST requests",
        );
    }
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| shared.credentials.iter().any(|c| c == v));
    if !authorized {
        let mut response = reply(StatusCode::UNAUTHORIZED, "text/html", "");
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"jsonrpc\""),
        );
        return response;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, "text/html", "request too large"),
    };
    rpc::handle(shared, &body)
}
