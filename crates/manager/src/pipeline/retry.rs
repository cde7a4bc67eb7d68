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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use lockstep_chain::Missing;

    use super::*;

    fn policy() -> (Policy, watch::Sender<bool>) {
        let (stop, watch) = watch::channel(false);
        let policy = Policy {
            timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_secs(60),
            stop: watch,
        };
        (policy, stop)
    }

    /// What the source does not have on its best chain is answered at
    /// once: asking again before re-reading the tip gives the same, and
    /// waiting out the backoff would stall every scan that reaches the
    /// source's tip.
    #[tokio::test]
    async fn not_found_is_returned_at_once_not_retried() {
        let (policy, _stop) = policy();
        let asked = AtomicU32::new(0);
        let result: Result<(), SourceError> = tokio::time::timeout(
            Duration::from_secs(10),
            timed(&policy, || {
                asked.fetch_add(1, Ordering::Relaxed);
                async { Err(SourceError::NotFound(Missing::Height(7))) }
            }),
        )
        .await
        .expect("not retried with a 60 s backoff");
        assert!(matches!(result, Err(SourceError::NotFound(_))));
        assert_eq!(asked.load(Ordering::Relaxed), 1);
    }

    /// A source that is down is asked again, up to the policy's retries.
    #[tokio::test]
    async fn an_unavailable_source_is_asked_again() {
        let (mut policy, _stop) = policy();
        policy.backoff = Duration::from_millis(1);
        let asked = AtomicU32::new(0);
        let result: Result<(), SourceError> = timed(&policy, || {
            asked.fetch_add(1, Ordering::Relaxed);
            async {
                Err(SourceError::Unavailable {
                    reason: "down".to_owned(),
                })
            }
        })
        .await;
        assert!(matches!(result, Err(SourceError::Unavailable { .. })));
        assert_eq!(asked.load(Ordering::Relaxed), 4);
    }
}
