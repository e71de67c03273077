//! Clock skew: one member of three runs with its wall clock 5 minutes ahead
//! (libfaketime, monotonic clock untouched). It reports itself skewed in
//! Health and the metrics, is made no primary, and TTLs still expire on
//! time (the primary's clock decides) within a stated tolerance. Under a
//! write load with 16 held locks, a kill -9 of another member loses no
//! acknowledged write and grants no held lock twice. Needs
//! libfaketime (apt package `faketime`; `.ci/run` installs it); without it
//! the test fails with one line saying so.

use std::time::{Duration, Instant};

use distcache_client::partition::lock_partition_for;
use distcache_client::proto::{self, cluster_client::ClusterClient};
use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Expiry tolerance: the sweep period (1 s) plus scheduling slack.
const TOLERANCE: Duration = Duration::from_millis(2_000);
/// One scenario at a time: the TTL check has a time tolerance.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn health(addr: &str) -> proto::HealthResponse {
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.health(proto::HealthRequest {})
        .await
        .expect("health")
        .into_inner()
}

/// Restarts member 2 of `c` with its wall clock 5 minutes ahead
/// (monotonic clock untouched) and waits until it reports itself skewed.
async fn skew_member_2(c: &mut ProcCluster) -> proto::HealthResponse {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "libfaketime is not installed (apt install faketime): the clock-skew test cannot run here"
    );
    c.wait_safe(3, Duration::from_secs(60)).await;
    c.env.insert(
        2,
        vec![
            ("LD_PRELOAD".into(), LIBFAKETIME.into()),
            ("FAKETIME".into(), "+5m".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
    );
    c.kill(2);
    c.spawn(2);
    let skewed = c.members[2].grpc.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&skewed).await;
        if h.clock_skewed {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "node-2 never reported skewed: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_five_minutes_ahead_is_reported_made_no_primary_and_ttls_hold() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    let h = skew_member_2(&mut c).await;
    println!("node-2 reports a clock offset of {} ms", h.clock_offset_ms);
    assert!(
        h.clock_offset_ms > 250_000,
        "about +5 min: {}",
        h.clock_offset_ms
    );
    let fine = health(&c.members[0].grpc).await;
    assert!(!fine.clock_skewed, "node-0 is not skewed: {fine:?}");
    // The two others hold every primary (wait_safe(2): two owners).
    c.wait_safe(2, Duration::from_secs(60)).await;
    let client = c.client().await;
    let table = client.partition_table().await.expect("table");
    let n2 = table
        .members
        .iter()
        .find(|m| m.name == "node-2")
        .map_or(0, |m| m.primaries);
    assert_eq!(n2, 0, "the skewed member is no primary");

    // TTLs: 3 s, written and read through the cluster (node-2 forwards).
    let ttl = Duration::from_secs(3);
    let col = client.collection("skew").await.expect("collection");
    for i in 0..50 {
        col.put_with_ttl(format!("t{i}"), "v", ttl)
            .await
            .expect("put");
    }
    let written = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..50 {
        assert!(
            col.get(format!("t{i}")).await.expect("get").is_some(),
            "t{i} expired early (the skewed clock must not decide)"
        );
    }
    tokio::time::sleep((ttl + TOLERANCE).saturating_sub(written.elapsed())).await;
    for i in 0..50 {
        assert!(
            col.get(format!("t{i}")).await.expect("get").is_none(),
            "t{i} outlived its TTL by more than {TOLERANCE:?}"
        );
    }
    println!("TTLs of 3 s held and expired within {TOLERANCE:?}");
}

/// RELIABILITY #9 under a failover: with one member 5 minutes ahead, a
/// write load and 16 held locks (30 s leases), the primary of many
/// partitions is killed -9 and restarted. No acknowledged write is lost; no
/// held lock is granted to another client (leases run on the monotonic
/// clock); every holder can still release with its token; and every later
/// grant's token is larger than every earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_skewed_member_a_kill_loses_no_write_and_grants_no_lock_twice() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    skew_member_2(&mut c).await;
    c.wait_safe(2, Duration::from_secs(60)).await;
    let client = c.client().await;
    let other = c.client().await;
    let load = WriteLoad::start(&client, 4, 32);
    let lease = Duration::from_secs(30);
    let mut held = Vec::new();
    for i in 0..16 {
        let key = format!("skew-lock-{i}");
        let guard = client
            .try_acquire_lock(&key, lease)
            .await
            .expect("try_acquire")
            .unwrap_or_else(|| panic!("{key} was free"));
        held.push((key, guard));
    }
    let acquired = Instant::now();
    // The locks whose partition node-0 leads: they fail over.
    let table = client.partition_table().await.expect("table");
    let moved = held
        .iter()
        .filter(|(key, _)| {
            let p = lock_partition_for(key.as_bytes(), table.partition_count);
            table
                .partitions
                .iter()
                .any(|o| o.partition == p && o.primary == "node-0")
        })
        .count();
    assert!(moved > 0, "no held lock has its partition on node-0");
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.spawn(0);
    c.wait_safe(2, Duration::from_secs(90)).await;
    for (key, _) in &held {
        let stolen = other
            .try_acquire_lock(key, lease)
            .await
            .expect("try_acquire by another client");
        assert!(
            stolen.is_none(),
            "{key} granted twice {:?} into a 30 s lease",
            acquired.elapsed()
        );
    }
    for (key, guard) in held {
        let token = guard.fencing_token();
        guard
            .release()
            .await
            .unwrap_or_else(|e| panic!("the holder of {key} could not release: {e}"));
        let next = other
            .try_acquire_lock(&key, lease)
            .await
            .expect("try_acquire after the release")
            .unwrap_or_else(|| panic!("{key} not free after its release"));
        assert!(
            next.fencing_token() > token,
            "{key}: token {} after {token}",
            next.fencing_token()
        );
        next.release().await.expect("release");
    }
    let (history, acked, failed) = load.stop().await;
    println!(
        "skewed member, kill -9 of node-0: {acked} acknowledged, {failed} failed; 16 locks held across it ({moved} failed over), none granted twice"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
}
