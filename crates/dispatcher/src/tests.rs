//! The dispatcher's tests: exclusivity and FIFO under real contention, every
//! exit path freeing the wallet, early release, expiry, signer limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::{ActionKind, ActionSpec, DispatchError, DispatchId, Dispatcher, Outcome};

type Result<T> = std::result::Result<T, String>;

/// A spec of the given kind.
fn spec(kind: ActionKind) -> ActionSpec {
    ActionSpec::new(kind)
}

/// Waits (at most 5 s) until `check` holds.
async fn eventually(mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Bounds a wait, so that a regression fails the test instead of hanging it.
trait Within: Future + Sized {
    async fn within(self) -> Self::Output {
        tokio::time::timeout(Duration::from_secs(10), self)
            .await
            .expect("still waiting after 10 s")
    }
}

impl<F: Future> Within for F {}

/// An action that runs until it is stopped or `go` is notified.
async fn park(go: Arc<Notify>) -> Result<()> {
    go.notified().await;
    Ok(())
}

/// Sets its flag when dropped: proves an action's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What one iteration of the stress test records.
#[derive(Default)]
struct Record {
    /// Per successful dispatch: (wallet, seq before dispatching, seq after
    /// the outcome arrived, i.e. after the slot was freed).
    ran: HashMap<DispatchId, (u32, u64, u64)>,
    /// Per `WalletBusy`: (wallet, named action, seq before the call, seq
    /// after it returned).
    busy: Vec<(u32, DispatchId, u64, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_one_action_per_wallet_and_busy_names_a_running_action() {
    const WALLETS: u32 = 100;
    const TASKS: u32 = 10_000;
    const ITERATIONS: u32 = 50;
    let started = Instant::now();
    let d: Dispatcher<u32> = Dispatcher::new();
    let inside: Arc<Vec<AtomicUsize>> =
        Arc::new((0..WALLETS).map(|_| AtomicUsize::new(0)).collect());
    let violations = Arc::new(AtomicUsize::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let mut total_busy = 0;
    let mut total_ran = 0;
    for iteration in 0..ITERATIONS {
        let record = Arc::new(Mutex::new(Record::default()));
        let mut tasks = Vec::with_capacity(TASKS as usize);
        for task in 0..TASKS {
            let wallet = (task * 7 + iteration) % WALLETS;
            let d = d.clone();
            let inside = Arc::clone(&inside);
            let violations = Arc::clone(&violations);
            let seq = Arc::clone(&seq);
            let record = Arc::clone(&record);
            tasks.push(tokio::spawn(async move {
                // Some actions give up exclusivity early, after their
                // "coins are reserved" (leaving the counter first).
                let early = task % 5 == 0;
                let action = move |ctx: crate::ActionCtx<u32>| async move {
                    let counter = &inside[*ctx.wallet() as usize];
                    if counter.fetch_add(1, Ordering::SeqCst) != 0 {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                    counter.fetch_sub(1, Ordering::SeqCst);
                    if early {
                        ctx.release_early();
                        tokio::task::yield_now().await;
                    }
                    Ok::<_, ()>(())
                };
                let spec = spec(ActionKind::SEND).early_release(early);
                let before = seq.fetch_add(1, Ordering::SeqCst);
                let dispatched = if task % 2 == 0 {
                    d.try_dispatch(wallet, spec, action)
                } else {
                    d.dispatch_wait(wallet, spec, action, Duration::from_secs(10))
                        .await
                };
                match dispatched {
                    Ok(handle) => {
                        let id = handle.id();
                        assert_eq!(handle.outcome().within().await, Outcome::Completed(()));
                        let after = seq.fetch_add(1, Ordering::SeqCst);
                        record
                            .lock()
                            .unwrap()
                            .ran
                            .insert(id, (wallet, before, after));
                    }
                    Err(DispatchError::WalletBusy {
                        wallet: busy_wallet,
                        action_id,
                        kind,
                        ..
                    }) => {
                        let after = seq.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(busy_wallet, wallet);
                        assert_eq!(kind, ActionKind::SEND);
                        record
                            .lock()
                            .unwrap()
                            .busy
                            .push((wallet, action_id, before, after));
                    }
                    Err(other) => panic!("unexpected {other}"),
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let record = record.lock().unwrap();
        for &(wallet, id, before, after) in &record.busy {
            let &(ran_wallet, start, end) = record
                .ran
                .get(&id)
                .unwrap_or_else(|| panic!("WalletBusy names {id}, which never ran"));
            assert_eq!(
                ran_wallet, wallet,
                "WalletBusy names another wallet's action"
            );
            // The named action was dispatched before the refusal returned
            // and not yet freed when the refused call began.
            assert!(
                start < after && before < end,
                "WalletBusy names {id}, which ran over [{start}, {end}], not during [{before}, {after}]"
            );
        }
        total_busy += record.busy.len();
        total_ran += record.ran.len();
        assert_eq!(record.busy.len() + record.ran.len(), TASKS as usize);
        for wallet in 0..WALLETS {
            assert!(!d.is_busy(&wallet), "wallet {wallet} left busy");
        }
    }
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "two actions at once on a wallet"
    );
    assert!(total_busy > 0, "no contention: the test proves nothing");
    let stats = d.stats();
    assert_eq!(stats.dispatched as usize, total_ran);
    assert_eq!(stats.completed as usize, total_ran);
    assert_eq!(stats.busy_rejections as usize, total_busy);
    assert!(stats.deepest_queue > 0);
    eprintln!(
        "stress: {} actions, {total_busy} busy, deepest queue {} in {:?}",
        total_ran,
        stats.deepest_queue,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_wait_grants_in_arrival_order_and_quitters_lose_no_turns() {
    let d: Dispatcher<u32> = Dispatcher::new();
    let go = Arc::new(Notify::new());
    let holder = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let go = Arc::clone(&go);
            move |_| park(go)
        })
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..10usize {
        let d2 = d.clone();
        let order = Arc::clone(&order);
        // Waiter 6 gives up by timing out, waiter 3 by being dropped.
        let timeout = if i == 6 {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(10)
        };
        waiters.push(tokio::spawn(async move {
            let handle = d2
                .dispatch_wait(
                    1,
                    spec(ActionKind::SEND),
                    move |_| async move {
                        order.lock().unwrap().push(i);
                        Ok::<_, ()>(())
                    },
                    timeout,
                )
                .await?;
            Ok::<_, DispatchError<u32>>(handle.outcome().within().await)
        }));
        eventually(|| d.queue_len(&1) == i + 1).await;
    }
    waiters[3].abort();
    eventually(|| d.queue_len(&1) == 9).await;
    // The timed-out waiter leaves the queue.
    eventually(|| d.queue_len(&1) == 8).await;
    assert!(d.is_busy(&1));
    go.notify_one();
    assert_eq!(holder.outcome().within().await, Outcome::Completed(()));
    for (i, waiter) in waiters.into_iter().enumerate() {
        match (i, waiter.await) {
            (3, Err(join)) => assert!(join.is_cancelled()),
            (6, Ok(Err(DispatchError::Timeout { wallet: 1, .. }))) => {}
            (_, Ok(Ok(Outcome::Completed(())))) => {}
            (i, other) => panic!("waiter {i}: {other:?}"),
        }
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 4, 5, 7, 8, 9]);
    assert!(!d.is_busy(&1));
    assert_eq!(d.stats().timeouts, 1);
    assert_eq!(d.stats().deepest_queue, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_wait_is_fifo_on_many_wallets_at_once() {
    const WALLETS: u32 = 100;
    const WAITERS: usize = 20;
    let d: Dispatcher<u32> = Dispatcher::new();
    for _ in 0..5 {
        let mut wallets = Vec::new();
        for wallet in 0..WALLETS {
            let d = d.clone();
            wallets.push(tokio::spawn(async move {
                let go = Arc::new(Notify::new());
                let holder = d
                    .try_dispatch(wallet, spec(ActionKind::SEND), {
                        let go = Arc::clone(&go);
                        move |_| park(go)
                    })
                    .unwrap();
                let order = Arc::new(Mutex::new(Vec::new()));
                let mut waiters = Vec::new();
                for i in 0..WAITERS {
                    let d2 = d.clone();
                    let order = Arc::clone(&order);
                    waiters.push(tokio::spawn(async move {
                        let action = move |_| async move {
                            order.lock().unwrap().push(i);
                            tokio::task::yield_now().await;
                            Ok::<_, ()>(())
                        };
                        let spec = spec(ActionKind::SEND);
                        let handle = d2
                            .dispatch_wait(wallet, spec, action, Duration::from_secs(10))
                            .await
                            .unwrap();
                        handle.outcome().within().await
                    }));
                    // Arrival order: each waiter is queued before the next
                    // is spawned.
                    eventually(|| d.queue_len(&wallet) == i + 1).await;
                }
                go.notify_one();
                assert_eq!(holder.outcome().within().await, Outcome::Completed(()));
                for waiter in waiters {
                    assert_eq!(waiter.await.unwrap(), Outcome::Completed(()));
                }
                assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
                assert!(!d.is_busy(&wallet));
            }));
        }
        for wallet in wallets {
            wallet.await.unwrap();
        }
    }
    assert_eq!(d.stats().deepest_queue, WAITERS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_names_the_holder_and_a_timeout_is_typed() {
    let d: Dispatcher<&'static str> = Dispatcher::new();
    d.set_tip(100);
    let go = Arc::new(Notify::new());
    let first = d
        .try_dispatch("a", spec(ActionKind::CONSOLIDATE).deadline(200), {
            let go = Arc::clone(&go);
            move |_| park(go)
        })
        .unwrap();
    match d.try_dispatch("a", spec(ActionKind::SEND), |_| async { Ok::<_, ()>(()) }) {
        Err(DispatchError::WalletBusy {
            wallet: "a",
            action_id,
            kind,
            started_at_height: Some(100),
            deadline_height: Some(200),
        }) => {
            assert_eq!(action_id, first.id());
            assert_eq!(kind, ActionKind::CONSOLIDATE);
        }
        other => panic!("{other:?}"),
    }
    // Another wallet is not affected.
    let other = d
        .try_dispatch("b", spec(ActionKind::SEND), |_| async { Ok::<_, ()>(7) })
        .unwrap();
    assert_eq!(other.outcome().within().await, Outcome::Completed(7));
    let waited = d
        .dispatch_wait(
            "a",
            spec(ActionKind::SEND),
            |_| async { Ok::<_, ()>(()) },
            Duration::from_millis(20),
        )
        .await;
    assert!(
        matches!(waited, Err(DispatchError::Timeout { wallet: "a", .. })),
        "{waited:?}"
    );
    assert_eq!(d.queue_len(&"a"), 0);
    go.notify_one();
    assert_eq!(first.outcome().within().await, Outcome::Completed(()));
    let stats = d.stats();
    assert_eq!(
        (stats.busy_rejections, stats.timeouts, stats.completed),
        (1, 1, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exit_path_frees_the_wallet() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let free = |d: &Dispatcher<u64>| {
        d.try_dispatch(1, spec(ActionKind::HEARTBEAT), |_| async {
            Ok::<_, ()>(())
        })
        .expect("the wallet is free")
    };

    // Failed.
    let failed = d
        .try_dispatch(1, spec(ActionKind::SEND), |_| async {
            Err::<(), _>("no coins")
        })
        .unwrap();
    assert_eq!(failed.outcome().within().await, Outcome::Failed("no coins"));
    assert_eq!(free(&d).outcome().within().await, Outcome::Completed(()));

    // Panicked.
    let panicked = d
        .try_dispatch(1, spec(ActionKind::SEND), |_| async {
            tokio::task::yield_now().await;
            if true {
                panic!("boom");
            }
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(
        panicked.outcome().within().await,
        Outcome::Panicked("boom".to_owned())
    );
    assert_eq!(free(&d).outcome().within().await, Outcome::Completed(()));

    // Cancelled.
    let dropped = Arc::new(AtomicBool::new(false));
    let cancelled = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let flag = DropFlag(Arc::clone(&dropped));
            move |_| async move {
                let _flag = flag;
                std::future::pending::<Result<()>>().await
            }
        })
        .unwrap();
    assert!(d.is_busy(&1));
    cancelled.cancel();
    assert_eq!(cancelled.outcome().within().await, Outcome::Cancelled);
    assert!(dropped.load(Ordering::SeqCst));
    assert_eq!(free(&d).outcome().within().await, Outcome::Completed(()));

    // Handle dropped.
    let dropped = Arc::new(AtomicBool::new(false));
    let handle = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let flag = DropFlag(Arc::clone(&dropped));
            move |_| async move {
                let _flag = flag;
                std::future::pending::<Result<()>>().await
            }
        })
        .unwrap();
    drop(handle);
    eventually(|| !d.is_busy(&1)).await;
    assert!(dropped.load(Ordering::SeqCst), "the action stopped running");
    assert_eq!(free(&d).outcome().within().await, Outcome::Completed(()));

    // Detached: runs to its end, then frees the wallet.
    let go = Arc::new(Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let detached = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let go = Arc::clone(&go);
            let done = Arc::clone(&done);
            move |_| async move {
                go.notified().await;
                done.store(true, Ordering::SeqCst);
                Ok::<_, ()>(())
            }
        })
        .unwrap();
    detached.detach();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(d.is_busy(&1), "a detached action keeps running");
    go.notify_one();
    eventually(|| !d.is_busy(&1)).await;
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(free(&d).outcome().within().await, Outcome::Completed(()));

    let stats = d.stats();
    assert_eq!(
        (
            stats.failed,
            stats.panics,
            stats.cancellations,
            stats.completed
        ),
        (1, 1, 2, 6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_action_is_stopped_its_wallet_freed_and_its_callback_run_once() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let expired = Arc::new(Mutex::new(Vec::new()));
    d.on_expired({
        let expired = Arc::clone(&expired);
        // (A clone inside its own callback: a cycle, harmless in a test.)
        let d = d.clone();
        move |wallet, id, kind| {
            // Runs before the wallet is freed.
            let busy = d.is_busy(wallet);
            expired
                .lock()
                .unwrap()
                .push((*wallet, id, kind.clone(), busy))
        }
    });
    d.set_tip(100);
    let dropped = Arc::new(AtomicBool::new(false));
    let handle = d
        .try_dispatch(5, spec(ActionKind::SWEEP).deadline(105), {
            let flag = DropFlag(Arc::clone(&dropped));
            move |_| async move {
                let _flag = flag;
                std::future::pending::<Result<()>>().await
            }
        })
        .unwrap();
    let id = handle.id();
    // A later deadline is untouched.
    let go = Arc::new(Notify::new());
    let later = d
        .try_dispatch(6, spec(ActionKind::SEND).deadline(106), {
            let go = Arc::clone(&go);
            move |_| park(go)
        })
        .unwrap();
    assert_eq!(d.set_tip(104), 0);
    assert!(d.is_busy(&5));
    assert_eq!(d.set_tip(105), 1);
    assert_eq!(handle.outcome().within().await, Outcome::Expired);
    assert!(dropped.load(Ordering::SeqCst));
    assert!(!d.is_busy(&5));
    assert!(d.is_busy(&6));
    assert_eq!(
        *expired.lock().unwrap(),
        vec![(5, id, ActionKind::SWEEP, true)]
    );
    // Setting the tip again does not expire it twice.
    assert_eq!(d.set_tip(105), 0);
    go.notify_one();
    assert_eq!(later.outcome().within().await, Outcome::Completed(()));
    assert_eq!(expired.lock().unwrap().len(), 1, "the callback ran once");
    assert_eq!(d.stats().expirations, 1);
    // A deadline the tip already reached is refused.
    let late = d.try_dispatch(5, spec(ActionKind::SEND).deadline(105), |_| async {
        Ok::<_, ()>(())
    });
    assert!(
        matches!(
            late,
            Err(DispatchError::DeadlinePassed {
                tip: 105,
                deadline: 105
            })
        ),
        "{late:?}"
    );
    let ok = d
        .try_dispatch(5, spec(ActionKind::SEND), |_| async { Ok::<_, ()>(()) })
        .unwrap();
    assert_eq!(ok.outcome().within().await, Outcome::Completed(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_release_lets_the_next_action_start_while_the_first_goes_on() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let reserved = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let first = d
        .try_dispatch(1, spec(ActionKind::SEND).early_release(true), {
            let reserved = Arc::clone(&reserved);
            let go = Arc::clone(&go);
            move |ctx| async move {
                // Coins chosen and locked: the rest need not be exclusive.
                assert!(ctx.release_early());
                assert!(!ctx.release_early(), "only once");
                reserved.notify_one();
                go.notified().await;
                Ok::<_, ()>("broadcast")
            }
        })
        .unwrap();
    reserved.notified().await;
    assert!(!d.is_busy(&1), "no longer counted busy");
    let second = d
        .try_dispatch(1, spec(ActionKind::SEND), |_| async {
            Ok::<_, ()>("second")
        })
        .expect("the second starts while the first runs");
    assert_eq!(
        second.outcome().within().await,
        Outcome::Completed("second")
    );
    assert!(!first.is_finished());
    go.notify_one();
    assert_eq!(
        first.outcome().within().await,
        Outcome::Completed("broadcast")
    );

    // Without the spec's permission, release_early does nothing.
    let go = Arc::new(Notify::new());
    let exclusive = d
        .try_dispatch(1, spec(ActionKind::CONSOLIDATE), {
            let go = Arc::clone(&go);
            move |ctx| async move {
                assert!(!ctx.release_early());
                go.notified().await;
                Ok::<_, ()>(())
            }
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(d.is_busy(&1));
    go.notify_one();
    assert_eq!(exclusive.outcome().within().await, Outcome::Completed(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_released_action_still_expires() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let calls = Arc::new(AtomicUsize::new(0));
    d.on_expired({
        let calls = Arc::clone(&calls);
        move |_, _, _| {
            calls.fetch_add(1, Ordering::SeqCst);
        }
    });
    d.set_tip(10);
    let released = Arc::new(Notify::new());
    let handle = d
        .try_dispatch(
            1,
            spec(ActionKind::SEND).deadline(12).early_release(true),
            {
                let released = Arc::clone(&released);
                move |ctx| async move {
                    ctx.release_early();
                    released.notify_one();
                    std::future::pending::<Result<()>>().await
                }
            },
        )
        .unwrap();
    released.notified().await;
    assert!(!d.is_busy(&1));
    d.set_tip(12);
    assert_eq!(handle.outcome().within().await, Outcome::Expired);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_signer_signs_one_at_a_time_while_other_work_goes_on() {
    let d: Dispatcher<u32> = Dispatcher::new();
    assert!(d.add_signer_limit("ledger", 1));
    assert!(!d.add_signer_limit("ledger", 5), "a name is added once");

    // A signer holds the permit; a non-signing action on another wallet
    // completes meanwhile.
    let holding = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let signer = d
        .try_dispatch(100, spec(ActionKind::SEND), {
            let holding = Arc::clone(&holding);
            let go = Arc::clone(&go);
            move |ctx| async move {
                let _permit = ctx.sign_permit("ledger").await.map_err(|e| e.to_string())?;
                holding.notify_one();
                go.notified().await;
                Ok::<_, String>(())
            }
        })
        .unwrap();
    holding.notified().await;
    let other = d
        .try_dispatch(101, spec(ActionKind::HEARTBEAT), |_| async {
            Ok::<_, String>(())
        })
        .unwrap();
    let other = tokio::time::timeout(Duration::from_secs(5), other.outcome()).await;
    assert_eq!(other, Ok(Outcome::Completed(())));

    // Twenty wallets on the one limit: never two signing at once.
    let signing = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for wallet in 0..20 {
        let signing = Arc::clone(&signing);
        let most = Arc::clone(&most);
        handles.push(
            d.try_dispatch(wallet, spec(ActionKind::SEND), move |ctx| async move {
                let permit = ctx.sign_permit("ledger").await.map_err(|e| e.to_string())?;
                let now = signing.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                signing.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                Ok::<_, String>(())
            })
            .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        0,
        "all wait for the held permit"
    );
    go.notify_one();
    assert_eq!(signer.outcome().within().await, Outcome::Completed(()));
    for handle in handles {
        assert_eq!(handle.outcome().within().await, Outcome::Completed(()));
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two signing at once");

    let unknown = d
        .try_dispatch(1, spec(ActionKind::SEND), |ctx| async move {
            ctx.sign_permit("trezor").await.map(drop)
        })
        .unwrap();
    assert!(matches!(
        unknown.outcome().within().await,
        Outcome::Failed(DispatchError::UnknownSigner(name)) if name == "trezor"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_is_refused_within_the_kinds_margin() {
    let d: Dispatcher<u32> = Dispatcher::new();
    d.add_signer_limit("hsm", 2);
    d.set_margin(ActionKind::SEND, 6);
    d.set_tip(100);
    let sign = |deadline: u32, kind: ActionKind| {
        d.try_dispatch(deadline, spec(kind).deadline(deadline), |ctx| async move {
            ctx.sign_permit("hsm").await.map(drop)
        })
        .unwrap()
    };
    assert!(matches!(
        sign(106, ActionKind::SEND).outcome().within().await,
        Outcome::Failed(DispatchError::TooLateToSign {
            tip: 100,
            deadline: 106,
            margin: 6
        })
    ));
    assert_eq!(
        sign(107, ActionKind::SEND).outcome().within().await,
        Outcome::Completed(())
    );
    // The margin is per kind: sweeps have none.
    assert_eq!(
        sign(101, ActionKind::SWEEP).outcome().within().await,
        Outcome::Completed(())
    );
    // As the tip moves, the same action becomes too late.
    d.set_tip(101);
    assert!(matches!(
        sign(107, ActionKind::SEND).outcome().within().await,
        Outcome::Failed(DispatchError::TooLateToSign { tip: 101, .. })
    ));
}

#[test]
fn dispatching_outside_a_runtime_is_an_error() {
    let d: Dispatcher<u32> = Dispatcher::new();
    let result = d.try_dispatch(1, spec(ActionKind::IMPORT), |_| async { Ok::<_, ()>(()) });
    assert!(matches!(result, Err(DispatchError::NoRuntime)));
    assert!(!d.is_busy(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_run_holds_the_wallet_in_the_callers_task_and_frees_it_on_every_exit_path() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let expired = Arc::new(AtomicUsize::new(0));
    d.on_expired({
        let expired = Arc::clone(&expired);
        move |_, _, _| {
            expired.fetch_add(1, Ordering::SeqCst);
        }
    });
    let free = |d: &Dispatcher<u64>| {
        let d = d.clone();
        async move {
            d.try_run(1, spec(ActionKind::HEARTBEAT), |_| async {
                Ok::<_, ()>(())
            })
            .await
            .expect("the wallet is free")
        }
    };

    // Completed, borrowing from the caller (no 'static needed).
    let mut seen = Vec::new();
    let outcome = d
        .try_run(1, spec(ActionKind::SEND), |ctx| {
            let seen = &mut seen;
            async move {
                seen.push(ctx.id());
                Ok::<_, ()>(7)
            }
        })
        .within()
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Completed(7));
    assert_eq!(seen.len(), 1);

    // Busy while it runs, with a spawned action or another inline run.
    let go = Arc::new(Notify::new());
    let running = tokio::spawn({
        let d = d.clone();
        let go = Arc::clone(&go);
        async move { d.try_run(1, spec(ActionKind::SWEEP), |_| park(go)).await }
    });
    eventually(|| d.is_busy(&1)).await;
    let busy = d
        .try_run(1, spec(ActionKind::SEND), |_| async { Ok::<_, ()>(()) })
        .await;
    assert!(
        matches!(&busy, Err(DispatchError::WalletBusy { kind, .. }) if *kind == ActionKind::SWEEP),
        "{busy:?}"
    );
    assert!(matches!(
        d.try_dispatch(1, spec(ActionKind::SEND), |_| async { Ok::<_, ()>(()) }),
        Err(DispatchError::WalletBusy { .. })
    ));
    go.notify_one();
    assert_eq!(
        running.within().await.unwrap().unwrap(),
        Outcome::Completed(())
    );
    assert_eq!(free(&d).await, Outcome::Completed(()));

    // Failed.
    let failed = d
        .try_run(1, spec(ActionKind::SEND), |_| async {
            Err::<(), _>("no coins")
        })
        .await
        .unwrap();
    assert_eq!(failed, Outcome::Failed("no coins"));
    assert_eq!(free(&d).await, Outcome::Completed(()));

    // Panicked: the panic reaches the caller's task; the wallet is freed.
    let panicked = tokio::spawn({
        let d = d.clone();
        async move {
            d.try_run(1, spec(ActionKind::SEND), |_| async {
                tokio::task::yield_now().await;
                if true {
                    panic!("boom");
                }
                Ok::<(), ()>(())
            })
            .await
        }
    });
    assert!(panicked.within().await.unwrap_err().is_panic());
    assert_eq!(free(&d).await, Outcome::Completed(()));

    // Cancelled: the caller drops the future.
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(20),
        d.try_run(1, spec(ActionKind::SEND), move |_| async move {
            let _flag = flag;
            std::future::pending::<Result<()>>().await
        }),
    )
    .await;
    assert!(cancelled.is_err(), "still running when the caller gave up");
    assert!(dropped.load(Ordering::SeqCst));
    assert!(!d.is_busy(&1));
    assert_eq!(free(&d).await, Outcome::Completed(()));

    // Expired: the tip reaches its deadline while it runs.
    d.set_tip(10);
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let expiring = tokio::spawn({
        let d = d.clone();
        async move {
            d.try_run(
                1,
                spec(ActionKind::SEND).deadline(12),
                move |_| async move {
                    let _flag = flag;
                    std::future::pending::<Result<()>>().await
                },
            )
            .await
        }
    });
    eventually(|| d.is_busy(&1)).await;
    assert_eq!(d.set_tip(12), 1);
    assert_eq!(expiring.within().await.unwrap().unwrap(), Outcome::Expired);
    assert!(dropped.load(Ordering::SeqCst));
    assert_eq!(expired.load(Ordering::SeqCst), 1, "the callback ran once");
    assert_eq!(free(&d).await, Outcome::Completed(()));

    let stats = d.stats();
    assert_eq!(
        (
            stats.completed,
            stats.failed,
            stats.panics,
            stats.cancellations,
            stats.expirations,
            stats.busy_rejections,
        ),
        (7, 1, 1, 1, 1, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn try_run_and_try_dispatch_share_the_slots_under_contention() {
    // 2,000 tasks over 20 wallets, half running inline and half spawning:
    // an independent per-wallet counter never sees two actions at once.
    let d: Dispatcher<u32> = Dispatcher::new();
    let inside: Arc<Vec<AtomicUsize>> = Arc::new((0..20).map(|_| AtomicUsize::new(0)).collect());
    let ran = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..2_000u32)
        .map(|i| {
            let (d, inside, ran) = (d.clone(), Arc::clone(&inside), Arc::clone(&ran));
            tokio::spawn(async move {
                let wallet = i % 20;
                let body = move |_ctx| async move {
                    let now = inside[wallet as usize].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(now, 0, "two actions on wallet {wallet} at once");
                    tokio::task::yield_now().await;
                    inside[wallet as usize].fetch_sub(1, Ordering::SeqCst);
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(())
                };
                if i % 2 == 0 {
                    match d.try_run(wallet, spec(ActionKind::SEND), body).await {
                        Ok(outcome) => assert_eq!(outcome, Outcome::Completed(())),
                        Err(e) => assert!(matches!(e, DispatchError::WalletBusy { .. })),
                    }
                } else {
                    match d.try_dispatch(wallet, spec(ActionKind::SEND), body) {
                        Ok(handle) => assert_eq!(handle.outcome().await, Outcome::Completed(())),
                        Err(e) => assert!(matches!(e, DispatchError::WalletBusy { .. })),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.within().await.unwrap();
    }
    let stats = d.stats();
    assert_eq!(stats.completed, ran.load(Ordering::SeqCst) as u64);
    assert_eq!(stats.dispatched + stats.busy_rejections, 2_000);
    assert!((0..20).all(|w| !d.is_busy(&w)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_wait_takes_its_place_when_called_and_gives_it_up_when_dropped() {
    let d: Dispatcher<u64> = Dispatcher::new();
    let go = Arc::new(Notify::new());
    let first = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let go = Arc::clone(&go);
            move |_| park(go)
        })
        .unwrap();
    // Called, not polled: in line already.
    let second = d.dispatch_wait(
        1,
        spec(ActionKind::SWEEP),
        |_| async { Ok::<_, ()>(2) },
        Duration::from_secs(10),
    );
    let dropped = d.dispatch_wait(
        1,
        spec(ActionKind::SWEEP),
        |_| async { Ok::<_, ()>(3) },
        Duration::from_secs(10),
    );
    assert_eq!(d.queue_len(&1), 2);
    drop(dropped);
    assert_eq!(d.queue_len(&1), 1, "a dropped place leaves the queue");
    go.notify_one();
    assert_eq!(first.outcome().within().await, Outcome::Completed(()));
    // The slot passed to the waiter that was called first, before it was
    // ever polled: nobody can jump in.
    assert!(d.is_busy(&1));
    assert!(matches!(
        d.try_dispatch(1, spec(ActionKind::SEND), |_| async { Ok::<_, ()>(9) }),
        Err(DispatchError::WalletBusy { kind, .. }) if kind == ActionKind::SWEEP
    ));
    let handle = second.within().await.unwrap();
    assert_eq!(handle.outcome().within().await, Outcome::Completed(2));
    assert!(!d.is_busy(&1));

    // Granted while unpolled, then dropped: the wallet comes back.
    let go = Arc::new(Notify::new());
    let holder = d
        .try_dispatch(1, spec(ActionKind::SEND), {
            let go = Arc::clone(&go);
            move |_| park(go)
        })
        .unwrap();
    let never_polled = d.dispatch_wait(
        1,
        spec(ActionKind::SWEEP),
        |_| async { Ok::<_, ()>(4) },
        Duration::from_secs(10),
    );
    go.notify_one();
    assert_eq!(holder.outcome().within().await, Outcome::Completed(()));
    assert!(d.is_busy(&1), "granted to the unpolled waiter");
    drop(never_polled);
    assert!(!d.is_busy(&1), "given back when dropped");
    assert_eq!(d.queue_len(&1), 0);
}
