//! Where the node is and how to log in: [`BitcoindConfig`] and
//! [`BitcoindAuth`].

use std::path::PathBuf;
use std::time::Duration;

use bitcoin::Network;

#[cfg(doc)]
use super::LOOP_TURNS;
#[cfg(doc)]
use crate::source::SourceError;

/// How lockstep logs in to the node's RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitcoindAuth {
    /// Core's cookie file (`<datadir>/<network>/.cookie`), re-read when the
    /// node refuses it (a restarted node writes a new one).
    Cookie(PathBuf),
    /// `-rpcuser`/`-rpcpassword` (or an `-rpcauth` entry's user).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

/// Where the node is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitcoindConfig {
    /// The node's RPC URL, e.g. `http://127.0.0.1:18443` (REST is served
    /// on the same port).
    pub url: String,
    /// How to log in to the RPC.
    pub auth: BitcoindAuth,
    /// The network the wallets are on; a node on another is refused.
    pub network: Network,
    /// How long one request may take before it is a
    /// [`SourceError::Timeout`] (a 4 MB block over a LAN takes well under
    /// a second; the default is 30 s).
    pub timeout: Duration,
    /// Most idle keep-alive connections kept to the node; never fewer
    /// than [`max_in_flight`](Self::max_in_flight), whatever this says. A
    /// pool keeping fewer idle than can be in flight closes connections
    /// after every burst of the manager's prefetch and opens them again in
    /// the next (each a TCP handshake, a task on both sides and a
    /// teardown: 16 idle against 32 in flight opened 16 a burst). The
    /// default keeps twice as many: a connection goes back to the pool a
    /// moment after its request's turn ends, so the next request may open
    /// another (the sync benchmark's 256 in flight opened up to 470 in one
    /// sync), and those are then kept for reuse too.
    pub max_idle_connections: usize,
    /// Most bulk requests (filters, blocks, filter headers in bulk,
    /// mempool transactions) in flight to the node at once; more wait for
    /// a turn. The loop's own requests (headers, the tip, the mempool's
    /// txids, a broadcast) have [`LOOP_TURNS`] more turns of their own,
    /// so that they never wait behind the prefetch. Bitcoin Core queues
    /// at most `-rpcworkqueue` requests (64 by default in recent versions,
    /// 16 in older ones) and answers HTTP 503 "Work queue depth exceeded"
    /// past that, REST included, so the manager's deep prefetch (256) must
    /// not reach the node as is. The default, 32 (34 with the loop's),
    /// leaves about half the default queue to the node's other clients.
    pub max_in_flight: usize,
    /// The node's ZMQ `rawtx` endpoint (its `-zmqpubrawtx=`, e.g.
    /// `tcp://127.0.0.1:28332`), if the operator enabled it: new
    /// transactions then wake the manager's mempool poll at once, and come
    /// with the notification. `None`: the mempool is polled on the
    /// manager's schedule only (its `mempool_poll_interval`, and after
    /// each new block).
    #[cfg(feature = "zmq")]
    pub zmq_rawtx: Option<String>,
}

impl BitcoindConfig {
    /// A node at `url` on `network`, with the default timeout (30 s),
    /// requests in flight (32) and idle connections kept (64).
    pub fn new(url: impl Into<String>, auth: BitcoindAuth, network: Network) -> BitcoindConfig {
        BitcoindConfig {
            url: url.into(),
            auth,
            network,
            timeout: Duration::from_secs(30),
            max_idle_connections: 64,
            max_in_flight: 32,
            #[cfg(feature = "zmq")]
            zmq_rawtx: None,
        }
    }

    /// Subscribes to the node's ZMQ `rawtx` notifications at `endpoint`
    /// (see [`BitcoindConfig::zmq_rawtx`]).
    #[cfg(feature = "zmq")]
    pub fn with_zmq_rawtx(mut self, endpoint: impl Into<String>) -> BitcoindConfig {
        self.zmq_rawtx = Some(endpoint.into());
        self
    }
}
