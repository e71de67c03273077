//! Lock leases across real node processes (RELIABILITY.md 6 and 8): a
//! holder that stops acting past its lease (a paused process) is
//! superseded by a waiter queued behind it, with a larger fencing token,
//! and the stale holder's token is refused when it comes back.

use std::time::{Duration, Instant};

use distcache_client::{Error, LockOptions};
use distcache_e2e::cluster::ProcCluster;

const SAFE: Duration = Duration::from_secs(60);
const HOLD: Duration = Duration::from_millis(800);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_holder_is_superseded_with_a_larger_token_and_its_stale_token_is_refused() {
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let holder = c.client().await;
    let waiter = c.client().await;
    let key = "lease-key";

    let mut stale = holder
        .acquire_lock(key, LockOptions::default().hold(HOLD))
        .await
        .expect("first acquire");
    let t1 = stale.fencing_token();
    let asked = Instant::now();
    // Queued behind the holder while its lease runs: it must get the lock
    // only once the lease has ended, and with a new, larger token.
    let queued = tokio::spawn(async move {
        let g = waiter
            .acquire_lock(
                key,
                LockOptions::default()
                    .hold(Duration::from_secs(10))
                    .wait(Duration::from_secs(20)),
            )
            .await;
        (g, asked.elapsed(), waiter)
    });
    // The holder "pauses": it does nothing until well past its lease.
    tokio::time::sleep(HOLD * 3).await;
    let (granted, waited, waiter) = queued.await.expect("waiter task");
    let mut current = granted.expect("the waiter gets the lock after the lease");
    let t2 = current.fencing_token();
    println!("holder token {t1}, waiter token {t2} after {waited:?}");
    assert!(t2 > t1, "the new owner's token {t2} must exceed {t1}");
    assert!(
        waited >= HOLD / 2,
        "the waiter got the lock after {waited:?}, inside the holder's {HOLD:?} lease"
    );

    // The paused holder comes back: its token is stale everywhere.
    match stale.extend(Duration::from_secs(5)).await {
        Err(Error::LockNotHeld(_) | Error::LockHoldTimeout(_)) => {}
        other => panic!("a stale holder's extend must be refused, got {other:?}"),
    }
    match stale.release().await {
        Err(Error::LockNotHeld(_) | Error::LockHoldTimeout(_)) => {}
        other => panic!("a stale holder's release must be refused, got {other:?}"),
    }
    // ...and it did not disturb the current owner.
    current
        .extend(Duration::from_secs(5))
        .await
        .expect("the current owner extends");
    current.release().await.expect("the current owner releases");

    // The next grant is larger again.
    let next = waiter
        .acquire_lock(key, LockOptions::default().hold(HOLD))
        .await
        .expect("acquire after release");
    assert!(
        next.fencing_token() > t2,
        "tokens keep increasing: {} after {t2}",
        next.fencing_token()
    );
    next.release().await.expect("release");
}
