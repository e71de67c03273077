//! Clock skew: one member of three runs with its wall clock 5 minutes ahead
//! (libfaketime, monotonic clock untouched). It reports itself skewed in
//! Health and the metrics, is made no primary, and TTLs still expire on
//! time (the primary's clock decides) within a stated tolerance. Needs
//! libfaketime (apt package `faketime`; `.ci/run` installs it); without it
//! the test fails with one line saying so.

use std::time::{Duration, Instant};

use distcache_client::proto::{self, cluster_client::ClusterClient};
use distcache_e2e::cluster::ProcCluster;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Expiry tolerance: the sweep period (1 s) plus scheduling slack.
const TOLERANCE: Duration = Duration::from_millis(2_000);

async fn health(addr: &str) -> proto::HealthResponse {
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.health(proto::HealthRequest {})
        .await
        .expect("health")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_five_minutes_ahead_is_reported_made_no_primary_and_ttls_hold() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "libfaketime is not installed (apt install faketime): the clock-skew test cannot run here"
    );
    let mut c = ProcCluster::start(3, &[]);
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
    let h = loop {
        let h = health(&skewed).await;
        if h.clock_skewed {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "node-2 never reported skewed: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
