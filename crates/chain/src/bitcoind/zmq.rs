//! Bitcoin Core's ZMQ `rawtx` notifications (`-zmqpubrawtx=<endpoint>`),
//! where the operator enables them: each transaction entering the node's
//! mempool (or a block) is published at once as three frames, the topic
//! `rawtx`, the raw transaction, and a 4-byte little-endian sequence
//! number (Core's `doc/zmq.md`).
//!
//! The feed is a hint, never the truth: it wakes the manager's mempool
//! poll as soon as something arrives (instead of at the next poll
//! interval), and keeps the transactions it received so that the poll's
//! fetch of a new txid needs no request. ZMQ drops messages when a
//! subscriber falls behind or reconnects, so the poll of the node's
//! mempool listing stays what decides; with the feed down (no endpoint,
//! the node restarted, a wrong port), lockstep polls as it does without
//! ZMQ.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::consensus::encode::deserialize;
use bitcoin::{Transaction, Txid};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SubSocket};

/// Transactions kept from the feed at most; past it the oldest half is
/// not worth keeping (the poll fetches what it needs anyway).
const KEEP: usize = 50_000;

/// How long the feed waits before subscribing again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// A subscription to a node's `rawtx` notifications, running in a task of
/// its own until dropped.
#[derive(Debug)]
pub(crate) struct RawTxFeed {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    /// Transactions received and not yet taken by a fetch.
    txs: Mutex<HashMap<Txid, Transaction>>,
    /// How many transactions arrived so far.
    arrived: watch::Sender<u64>,
}

impl RawTxFeed {
    /// Subscribes to `rawtx` at `endpoint` (e.g. `tcp://127.0.0.1:28332`),
    /// in the background: a node that is not listening yet is tried again
    /// every second.
    pub(crate) fn start(endpoint: String) -> RawTxFeed {
        let shared = Arc::new(Shared {
            txs: Mutex::new(HashMap::new()),
            arrived: watch::channel(0).0,
        });
        let task = tokio::spawn(run(endpoint, shared.clone()));
        RawTxFeed { shared, task }
    }

    /// The transaction `txid` if the feed delivered it (taken: a later
    /// fetch asks the node).
    pub(crate) fn take(&self, txid: &Txid) -> Option<Transaction> {
        lock(&self.shared.txs).remove(txid)
    }

    /// Resolves once more than `seen` transactions have arrived; returns
    /// how many have.
    pub(crate) async fn news(&self, seen: u64) -> u64 {
        let mut arrived = self.shared.arrived.subscribe();
        let found = arrived.wait_for(|n| *n > seen).await.map(|n| *n);
        match found {
            Ok(n) => n,
            // The sender lives in `shared`, which outlives this borrow.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for RawTxFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run(endpoint: String, shared: Arc<Shared>) {
    loop {
        if let Err(e) = subscribe_and_read(&endpoint, &shared).await {
            tracing::debug!(%endpoint, "ZMQ rawtx feed: {e}; polling meanwhile, subscribing again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn subscribe_and_read(endpoint: &str, shared: &Shared) -> Result<(), zeromq::ZmqError> {
    let mut socket = SubSocket::new();
    socket.connect(endpoint).await?;
    socket.subscribe("rawtx").await?;
    tracing::info!(%endpoint, "subscribed to Bitcoin Core's ZMQ rawtx notifications");
    loop {
        let message = socket.recv().await?;
        let (Some(topic), Some(body)) = (message.get(0), message.get(1)) else {
            continue;
        };
        if topic.as_ref() != b"rawtx" {
            continue;
        }
        // A body that does not decode is ignored: the poll still sees the
        // transaction (and checks what the node serves for it).
        let Ok(tx) = deserialize::<Transaction>(body) else {
            tracing::debug!(%endpoint, "ZMQ rawtx: a body that is not a transaction");
            continue;
        };
        {
            let mut txs = lock(&shared.txs);
            if txs.len() >= KEEP {
                txs.clear();
            }
            txs.insert(tx.compute_txid(), tx);
        }
        shared.arrived.send_modify(|n| *n += 1);
    }
}
