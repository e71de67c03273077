//! The metadata Raft group itself, with real processes:
//! - voters follow the member list: 3 -> 5 -> 3 under write load (joint
//!   consensus), nothing acknowledged lost;
//! - kill -9 of the metadata leader under load: a new leader is elected,
//!   tables keep being committed, nothing acknowledged lost;
//! - a full-cluster restart with WAL restores the metadata (the epoch
//!   continues, it does not start over) and every acknowledged write.

use std::time::{Duration, Instant};

use distcache_client::proto::{self, cluster_client::ClusterClient};
use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};
use tokio::sync::Mutex;

const SAFE: Duration = Duration::from_secs(90);
/// One cluster at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn health(addr: &str) -> Option<proto::HealthResponse> {
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    Some(c.health(proto::HealthRequest {}).await.ok()?.into_inner())
}

/// Waits until every running member names the same leader and `voters`
/// voters; returns the leader.
async fn agreed(c: &mut ProcCluster, voters: usize) -> String {
    let end = Instant::now() + SAFE;
    let mut last = String::new();
    while Instant::now() < end {
        let mut leaders = Vec::new();
        let mut ok = true;
        for ep in c.endpoints() {
            match health(&ep).await {
                Some(h) if !h.metadata_leader.is_empty() && h.metadata_voters.len() == voters => {
                    leaders.push(h.metadata_leader)
                }
                Some(h) => {
                    last = format!(
                        "{ep}: leader {:?} voters {:?}",
                        h.metadata_leader, h.metadata_voters
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
        leaders.dedup();
        if ok && leaders.len() == 1 {
            return leaders.remove(0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no agreed metadata leader with {voters} voters: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voters_follow_the_members_three_to_five_to_three_under_load() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    agreed(&mut c, 3).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    c.join();
    c.join();
    c.wait_safe(5, SAFE).await;
    let leader = agreed(&mut c, 5).await;
    println!("5 members, 5 voters, leader {leader}");
    for i in [4usize, 3] {
        assert!(c.terminate(i), "graceful exit of member {i}");
        let keep: Vec<String> = c
            .listed()
            .into_iter()
            .filter(|n| *n != c.members[i].name)
            .collect();
        c.write_file(&keep);
        c.wait_safe(keep.len(), SAFE).await;
    }
    let leader = agreed(&mut c, 3).await;
    println!("back to 3 voters, leader {leader}");
    let (history, acked, failed) = load.stop().await;
    println!("raft 3 -> 5 -> 3: {acked} acknowledged, {failed} failed");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_metadata_leader_elects_another_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    for round in 0..2 {
        let leader = agreed(&mut c, 3).await;
        let i = c
            .members
            .iter()
            .position(|m| m.name == leader)
            .expect("leader is a member");
        let before = health(&c.endpoints_except(i)[0])
            .await
            .expect("health")
            .epoch;
        c.kill(i);
        let t0 = Instant::now();
        // The others elect a leader among themselves and commit a failover.
        let end = Instant::now() + SAFE;
        loop {
            let eps = c.endpoints_except(i);
            if let Some(h) = health(&eps[0]).await
                && !h.metadata_leader.is_empty()
                && h.metadata_leader != leader
                && h.epoch > before
            {
                println!(
                    "round {round}: leader {leader} killed; {} leads and committed epoch {} after {:?}",
                    h.metadata_leader,
                    h.epoch,
                    t0.elapsed()
                );
                break;
            }
            assert!(Instant::now() < end, "no new leader committed a table");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.spawn(i);
        c.wait_safe(3, SAFE).await;
    }
    let (history, acked, failed) = load.stop().await;
    println!("leader kills: {acked} acknowledged, {failed} failed");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_restart_with_wal_restores_the_metadata_and_the_data() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &["--wal", "--wal-fsync", "false"]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    // A few table changes first: kill -9 and restart one member.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.spawn(1);
    let epoch = c.wait_safe(3, SAFE).await;
    let (history, acked, _) = load.stop().await;
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    let after = c.wait_safe(3, SAFE).await;
    println!("full restart: epoch {epoch} before, {after} after; {acked} acknowledged writes");
    assert!(
        after >= epoch,
        "the committed metadata survived: {epoch} -> {after}"
    );
    let client = c.client().await;
    assert_no_acknowledged_write_lost(&client, &history).await;
}
