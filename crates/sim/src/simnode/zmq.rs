//! The stand-in node's ZMQ `rawtx` publisher: each transaction entering
//! the SimChain's mempool, published as Bitcoin Core publishes it
//! (`-zmqpubrawtx`): the topic `rawtx`, the raw transaction, and a 4-byte
//! little-endian sequence number counting the messages sent.

use std::collections::HashSet;
use std::time::Duration;

use bitcoin::Txid;
use hyper::body::Bytes;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

use crate::SimChain;

/// How often the chain's mempool is looked at for new transactions.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// Binds a publisher on 127.0.0.1 (a free port) and publishes, until
/// aborted, every transaction that enters `chain`'s mempool; returns the
/// endpoint and the task.
pub(crate) async fn publish_rawtx(
    chain: SimChain,
) -> Result<(String, JoinHandle<()>), zeromq::ZmqError> {
    let mut socket = PubSocket::new();
    let endpoint = socket.bind("tcp://127.0.0.1:0").await?.to_string();
    let task = tokio::spawn(async move {
        let mut published: HashSet<Txid> = HashSet::new();
        let mut sequence: u32 = 0;
        loop {
            let mempool = chain.mempool();
            let now: HashSet<Txid> = mempool.iter().map(|t| t.compute_txid()).collect();
            for tx in &mempool {
                let txid = tx.compute_txid();
                if published.contains(&txid) {
                    continue;
                }
                let frames = vec![
                    Bytes::from_static(b"rawtx"),
                    Bytes::from(bitcoin::consensus::serialize(tx)),
                    Bytes::copy_from_slice(&sequence.to_le_bytes()),
                ];
                let Ok(message) = ZmqMessage::try_from(frames) else {
                    continue;
                };
                if let Err(e) = socket.send(message).await {
                    tracing::debug!("simnode: ZMQ publish failed: {e}");
                }
                sequence = sequence.wrapping_add(1);
            }
            published = now;
            tokio::time::sleep(LOOK_EVERY).await;
        }
    });
    Ok((endpoint, task))
}
