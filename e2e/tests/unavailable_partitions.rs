//! No silent empty partitions: with backup 0, kill -9 a member (no WAL, not
//! restarted). Its partitions have no in-sync replica left: requests for
//! their keys get PARTITION_UNAVAILABLE (not an empty answer) and the
//! cluster does not restart them empty on its own. `distcache cluster
//! forget MEMBER` declares the member gone: the partitions restart empty,
//! Health and the metrics report the data loss, and writes succeed again.

use std::process::Command;
use std::time::{Duration, Instant};

use distcache_client::error::REASON_METADATA;
use distcache_client::proto::{self, cache_client::CacheClient, cluster_client::ClusterClient};
use distcache_client::{Client, ClientConfig};
use distcache_e2e::bin;
use distcache_e2e::cluster::ProcCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_without_in_sync_replicas_is_unavailable_until_its_member_is_forgotten() {
    let mut c = ProcCluster::start(3, &["--backup-count", "0"]);
    c.wait_safe(3, Duration::from_secs(60)).await;
    let client = c.client().await;
    let table = client.partition_table().await.expect("table");
    let key = (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| c.primary_of(&table, "__default__", k).1 == 2)
        .expect("a key node-2 owns");
    client.put(&key, "v").await.expect("put");
    c.kill(2);
    let survivor = c.members[0].grpc.clone();
    let plain = Client::with_config(ClientConfig::new([survivor.clone()]).max_retries(0))
        .await
        .expect("connect");
    // A plain gRPC client on a survivor (the smart client would go to the
    // dead primary itself): after the failure timeout the partition is
    // PARTITION_UNAVAILABLE, and stays so.
    let mut raw = CacheClient::connect(format!("http://{survivor}"))
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut unavailable_since = None;
    let mut last = String::new();
    while Instant::now() < deadline {
        let req = proto::GetRequest {
            collection: String::new(),
            key: key.clone().into_bytes().into(),
        };
        match raw.get(req).await {
            Err(status)
                if status
                    .metadata()
                    .get(REASON_METADATA)
                    .is_some_and(|r| r == "PARTITION_UNAVAILABLE") =>
            {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                let since = *unavailable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
            Ok(r) if r.get_ref().found => panic!("a dead member's partition served a value"),
            Ok(_) => {
                panic!("the partition was restarted empty without anyone forgetting its member")
            }
            Err(status) => {
                last = format!("{status:?}");
                unavailable_since = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        unavailable_since.is_some(),
        "PARTITION_UNAVAILABLE within 20 s; last answer: {last}"
    );
    let since = unavailable_since.expect("checked above");
    assert!(
        since.elapsed() > Duration::from_secs(5),
        "unavailable for 5 s straight"
    );
    let health = plain.health().await.expect("health");
    assert_eq!(health.partitions_lost, 0, "nothing lost before the forget");
    assert!(
        !health.metadata_leader.is_empty(),
        "a metadata leader is known"
    );
    assert_eq!(
        health.metadata_voters.len(),
        3,
        "three voters: {:?}",
        health.metadata_voters
    );

    let out = Command::new(bin("distcache"))
        .args(["--endpoints", &survivor, "cluster", "forget", "node-2"])
        .output()
        .expect("run distcache");
    assert!(
        out.status.success(),
        "cluster forget failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // The partitions restart empty elsewhere, reported as loss.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.get(&key).await {
            Ok(v) => {
                assert!(v.is_none(), "the partition restarted empty: {v:?}");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "still unavailable after forget: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
        .put(&key, "again")
        .await
        .expect("writes succeed again");
    let health = plain.health().await.expect("health");
    assert!(
        health.partitions_lost > 0,
        "the restart is reported as data loss: {health:?}"
    );
    println!("partitions reported lost: {}", health.partitions_lost);
    // Forgetting an unknown member is a clear error.
    let out = Command::new(bin("distcache"))
        .args(["--endpoints", &survivor, "cluster", "forget", "nobody"])
        .output()
        .expect("run distcache");
    assert!(!out.status.success(), "forgetting an unknown member fails");
}

/// `--unclean-promotion`: a backup that fell out of the in-sync set (paused
/// while writes went on) is promoted when the primary dies, instead of the
/// partition waiting for it; the cluster reports the partitions as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unclean_promotion_trades_the_lost_writes_for_availability() {
    let mut c = ProcCluster::start(3, &["--backup-count", "1", "--unclean-promotion"]);
    c.wait_safe(3, Duration::from_secs(60)).await;
    let client = c.client().await;
    let table = client.partition_table().await.expect("table");
    let owners = table
        .partitions
        .iter()
        .find(|o| o.backups.len() == 1)
        .expect("a partition with a backup")
        .clone();
    let index = |name: &str| {
        c.members
            .iter()
            .position(|m| m.name == name)
            .expect("member")
    };
    let (primary, backup) = (index(&owners.primary), index(&owners.backups[0]));
    let key = (0..100_000)
        .map(|i| format!("u{i}"))
        .find(|k| {
            distcache_client::partition::partition_for(
                "__default__",
                k.as_bytes(),
                table.partition_count,
            ) == owners.partition
        })
        .expect("a key of the partition");
    // The backup stops answering; a write makes the primary drop it from the
    // in-sync set (after the 1 s replication timeout, before the 1.5 s
    // failure timeout: no other member replaces it).
    c.pause(backup);
    client
        .put(&key, "after-the-pause")
        .await
        .expect("put without the paused backup");
    // The primary dies before the backup can be re-synced.
    c.kill(primary);
    c.resume(backup);
    // The leader promotes the out-of-sync backup (reported as loss).
    let survivor = c
        .members
        .iter()
        .enumerate()
        .find(|(i, _)| *i != primary && *i != backup)
        .map(|(_, m)| m.grpc.clone())
        .expect("a third member");
    let deadline = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        let mut raw = ClusterClient::connect(format!("http://{survivor}"))
            .await
            .expect("connect");
        let h = raw
            .health(proto::HealthRequest {})
            .await
            .expect("health")
            .into_inner();
        if h.partitions_lost > 0 {
            break h.partitions_lost;
        }
        assert!(
            Instant::now() < deadline,
            "no unclean promotion within 30 s: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("partitions reported lost after the unclean promotion: {lost}");
    let v = client.get(&key).await.expect("the partition serves again");
    println!("read after the unclean promotion: {v:?}");
}
