//! Network partition {1} | {2,3}: three nodes on 127.0.0.2/.3/.4 inside a
//! private network namespace, cut with `ip rule ... blackhole` between their
//! addresses. The isolated node refuses writes with QUORUM_LOST, the majority
//! keeps serving, and after healing no acknowledged write is lost.
//!
//! The test re-runs itself inside a namespace it creates (`ip netns`, needs
//! root); where that is impossible it says so in one line and fails.

use std::process::Command;
use std::time::Duration;

use distcache_client::{Client, ClientConfig, Error};
use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};

const INSIDE: &str = "DISTCACHE_NETNS_INSIDE";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn ns_ip(args: &[&str]) {
    assert!(ip(args), "ip {args:?} failed");
}

fn cut(a: &str, b: &str, on: bool) {
    let verb = if on { "add" } else { "del" };
    for (x, y) in [(a, b), (b, a)] {
        ns_ip(&["rule", verb, "pref", "10", "from", x, "to", y, "blackhole"]);
    }
}

#[test]
fn minority_refuses_writes_majority_serves_nothing_acknowledged_is_lost() {
    if std::env::var_os(INSIDE).is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(inside());
        return;
    }
    let ns = format!("dc-part-{}", std::process::id());
    if !ip(&["netns", "add", &ns]) {
        panic!(
            "cannot create a network namespace (needs root and iproute2): the partition test cannot run here"
        );
    }
    let exe = std::env::current_exe().expect("test exe");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args([
            "--exact",
            "minority_refuses_writes_majority_serves_nothing_acknowledged_is_lost",
            "--nocapture",
        ])
        .env(INSIDE, "1")
        .status();
    let _ = ip(&["netns", "del", &ns]);
    assert!(
        status.expect("run inside the namespace").success(),
        "partition scenario failed"
    );
}

async fn inside() {
    ns_ip(&["link", "set", "lo", "up"]);
    // Local routes after the blackhole rules, so the rules apply on loopback.
    ns_ip(&["rule", "add", "pref", "100", "lookup", "local"]);
    ns_ip(&["rule", "del", "pref", "0"]);
    // The test's own client talks from 127.0.0.1, which no rule cuts.
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut c = ProcCluster::start_on(&ips, &[]);
    c.wait_safe(3, Duration::from_secs(60)).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Isolate node-0 (127.0.0.2) from the others.
    cut(ips[0], ips[1], true);
    cut(ips[0], ips[2], true);
    let before = load.acked.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The isolated node: no quorum, writes refused with QUORUM_LOST.
    let lonely = Client::with_config(ClientConfig::new([c.members[0].grpc.clone()]).max_retries(0))
        .await
        .expect("connect to the isolated node");
    let health = lonely.health().await.expect("health");
    assert!(!health.quorum, "isolated node must see no quorum");
    let table = lonely.partition_table().await.expect("table");
    let mine = (0..100_000u32)
        .map(|i| format!("iso-{i}"))
        .find(|k| {
            let p = distcache_client::partition::partition_for(
                "__default__",
                k.as_bytes(),
                table.partition_count,
            );
            table
                .partitions
                .iter()
                .any(|o| o.partition == p && o.primary == "node-0")
        })
        .expect("a key node-0 owns in its stale table");
    match lonely.put(&mine, "x").await {
        Err(Error::QuorumLost(m)) => println!("isolated node refused a write: {m}"),
        other => panic!("isolated node must refuse writes with QUORUM_LOST, got {other:?}"),
    }
    // The majority kept serving.
    let during = load.acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        during > before + 50,
        "majority stalled: {before} -> {during} acked"
    );
    println!("acked during the partition: {}", during - before);

    // Heal; the cluster converges; nothing acknowledged is lost.
    cut(ips[0], ips[1], false);
    cut(ips[0], ips[2], false);
    c.wait_safe(3, Duration::from_secs(60)).await;
    let (history, acked, failed) = load.stop().await;
    println!("partition: {acked} acknowledged writes, {failed} client-visible failures");
    assert_no_acknowledged_write_lost(&client, &history).await;
    assert!(
        lonely.get(&mine).await.expect("get").is_none(),
        "the refused write did not happen"
    );
}
