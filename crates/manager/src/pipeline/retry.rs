//! How each request to the source is made: a deadline, bounded retries
//! with a growing pause, and the manager's stop flag, which ends a request
//! (or its pause) at once. Shared by the pipeline, the loop and imports.

use std::time::Duration;

use lockstep_chain::SourceError;
use tokio::sync::watch;

use crate::ManagerConfig;

/// Resolves once the stop flag is set.
pub(crate) async fn wait_true(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How one request to the source is made: its deadline, how often a
/// retryable failure is tried again (with a growing pause) before the
/// batch it belongs to gives up, and the manager's stop flag, which ends
/// it at once.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) stop: watch::Receiver<bool>,
}

impl Policy {
    pub(crate) fn of(config: &ManagerConfig, stop: &watch::Receiver<bool>) -> Policy {
        Policy {
            timeout: config.request_timeout,
            retries: config.request_retries,
            backoff: config.initial_backoff,
            stop: stop.clone(),
        }
    }
}

/// What a request ended by [`Manager::stop`](crate::Manager::stop) returns:
/// retryable, and the caller, seeing the stop flag, stops instead.
pub(crate) fn stopping() -> SourceError {
    SourceError::Unavailable {
        reason: "the manager is stopping".to_owned(),
    }
}

/// A source request with a deadline, retried while it fails retryably;
/// the request in flight (or the pause before a retry) is abandoned as
/// soon as the manager is asked to stop.
pub(crate) async fn timed<T, F, Fut>(policy: &Policy, mut request: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut stop = policy.stop.clone();
    let attempts = async {
        let mut attempt = 0;
        loop {
            let result = match tokio::time::timeout(policy.timeout, request()).await {
                Ok(result) => result,
                Err(_) => Err(SourceError::Timeout {
                    after_ms: policy.timeout.as_millis() as u64,
                }),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < policy.retries => {
                    attempt += 1;
                    tokio::time::sleep(policy.backoff * attempt).await;
                }
                result => return result,
            }
        }
    };
    tokio::select! {
        biased;
        _ = wait_true(&mut stop) => Err(stopping()),
        result = attempts => result,
    }
}
