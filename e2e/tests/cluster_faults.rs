//! The cluster's promises under real faults, with real `distcache-node`
//! processes on loopback: every acknowledged write must be readable
//! afterwards with its last acknowledged value (full history check).

use std::time::{Duration, Instant};

use distcache_client::LockOptions;
use distcache_client::partition::lock_partition_for;
use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};

const SAFE: Duration = Duration::from_secs(60);

/// These tests each run a cluster of processes; one at a time keeps the
/// 2-core CI machine from starving heartbeats.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn report(what: &str, acked: u64, failed: u64) {
    println!(
        "{what}: {acked} acknowledged writes, {failed} client-visible failures (indeterminate, retried by the load)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_one_of_three_under_write_load_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Kill the primary of a known key's partition, then time until that
    // partition takes writes again.
    let table = client.partition_table().await.expect("table");
    let probe_key = "probe";
    let p = distcache_client::partition::partition_for(
        "__default__",
        probe_key.as_bytes(),
        table.partition_count,
    );
    let victim_name = table
        .partitions
        .iter()
        .find(|o| o.partition == p)
        .map(|o| o.primary.clone())
        .expect("owner");
    let victim = c
        .members
        .iter()
        .position(|m| m.name == victim_name)
        .expect("member");
    let killed_at = Instant::now();
    c.kill(victim);
    loop {
        if client.put(probe_key, "after-kill").await.is_ok() {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "partition never accepted writes again"
        );
    }
    let recovered = killed_at.elapsed();
    println!(
        "partition {p} accepted writes again {recovered:?} after the kill (failure timeout 1.5 s)"
    );
    assert!(
        recovered < Duration::from_millis(1500) + Duration::from_secs(5),
        "took {recovered:?}"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (history, acked, failed) = load.stop().await;
    report("kill -9", acked, failed);
    c.wait_safe(2, SAFE).await;
    assert_no_acknowledged_write_lost(&client, &history).await;
    assert!(acked > 100, "the load made progress");
    assert_eq!(
        client.get(probe_key).await.expect("get").as_deref(),
        Some(&b"after-kill"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_fencing_tokens_keep_increasing_across_a_primary_kill() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let key = "fenced-resource";
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let g = client
            .acquire_lock(key, LockOptions::default().hold(Duration::from_secs(1)))
            .await
            .expect("acquire");
        tokens.push(g.fencing_token());
        g.release().await.expect("release");
    }
    // Hold it, then kill the lock's primary: the lease is replicated.
    let held = client
        .acquire_lock(key, LockOptions::default().hold(Duration::from_secs(2)))
        .await
        .expect("acquire");
    tokens.push(held.fencing_token());
    let _ = held.detach();
    let table = client.partition_table().await.expect("table");
    let p = lock_partition_for(key.as_bytes(), table.partition_count);
    let primary = table
        .partitions
        .iter()
        .find(|o| o.partition == p)
        .map(|o| o.primary.clone())
        .expect("owner");
    let victim = c
        .members
        .iter()
        .position(|m| m.name == primary)
        .expect("member");
    c.kill(victim);
    let g = client
        .acquire_lock(
            key,
            LockOptions::default()
                .hold(Duration::from_secs(5))
                .wait(Duration::from_secs(30)),
        )
        .await
        .expect("acquire after failover");
    tokens.push(g.fencing_token());
    println!("tokens: {tokens:?}");
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_coordinator_cannot_install_its_stale_table() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    let before = c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 4, 32);
    // node-0 started first: the oldest member, the coordinator.
    c.pause(0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The others moved on without it.
    let mut others = ProcCluster::endpoints_except(&mut c, 0);
    let other = distcache_client::Client::connect([others.remove(0)])
        .await
        .expect("connect");
    let moved_on = other.partition_table().await.expect("table");
    assert!(
        moved_on.epoch > before,
        "the majority installed a newer table"
    );
    assert!(
        moved_on
            .members
            .iter()
            .all(|m| m.name != "node-0" || m.primaries == 0)
    );
    c.resume(0);
    // node-0 rejoins as a new participant: everyone converges on one table,
    // never on the paused coordinator's stale one.
    let after = c.wait_safe(3, SAFE).await;
    assert!(
        after >= moved_on.epoch,
        "node-0 adopted the majority's table (converged at epoch {after}, the majority had {})",
        moved_on.epoch
    );
    let (history, acked, failed) = load.stop().await;
    report("paused coordinator", acked, failed);
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(c.terminate(i), "graceful exit of member {i}");
        c.spawn(i);
        c.wait_safe(3, SAFE).await;
    }
    let (history, acked, failed) = load.stop().await;
    report("rolling restart", acked, failed);
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_three_to_five_to_three_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    c.join();
    c.join();
    c.wait_safe(5, SAFE).await;
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
    let (history, acked, failed) = load.stop().await;
    report("scale 3 -> 5 -> 3", acked, failed);
    assert_no_acknowledged_write_lost(&client, &history).await;
}

/// Members with a WAL come back with their old data and roles after a
/// crash: they must neither serve as primary from their stale table nor
/// count as in-sync backups before a fresh copy (found by the operator e2e).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_and_restart_with_wal_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &["--wal", "--wal-fsync", "false"]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    // node-0 is the oldest member, the coordinator, and stays the oldest
    // across restarts (its incarnation is in its WAL).
    for (i, down_ms) in [(0, 2500), (1, 300), (2, 2500), (0, 2500)] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.kill(i);
        // Failed over (after the 1.5 s heartbeat timeout), or back before it.
        tokio::time::sleep(Duration::from_millis(down_ms)).await;
        c.spawn(i);
        c.wait_safe(3, SAFE).await;
    }
    let (history, acked, failed) = load.stop().await;
    report("kill -9 + restart with WAL", acked, failed);
    assert!(acked > 100, "the load made progress");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_with_wal_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &["--wal", "--wal-fsync", "false"]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    for i in [2, 1, 0] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(c.terminate(i), "graceful exit of member {i}");
        c.spawn(i);
        c.wait_safe(3, SAFE).await;
    }
    let (history, acked, failed) = load.stop().await;
    report("rolling restart with WAL", acked, failed);
    assert_no_acknowledged_write_lost(&client, &history).await;
}

/// RELIABILITY #2: with two backups, one backup is paused (it misses writes
/// and falls out of sync), then the primary is killed and the paused backup
/// resumes at once. Only the backup holding every acknowledged write may be
/// promoted: no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_backup_then_primary_killed_promotes_only_the_in_sync_backup() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(5, &["--backup-count", "2"]);
    c.wait_safe(5, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 256);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // A partition whose primary is not the coordinator (node-0), and its
    // first backup: the one promotion order would pick.
    let table = client.partition_table().await.expect("table");
    let owners = table
        .partitions
        .iter()
        .find(|o| o.primary != "node-0" && o.backups.len() == 2 && o.backups[0] != "node-0")
        .expect("a partition away from the coordinator");
    let index = |name: &str| {
        c.members
            .iter()
            .position(|m| m.name == name)
            .expect("member")
    };
    let (primary, paused) = (index(&owners.primary), index(&owners.backups[0]));
    println!(
        "partition {}: pausing backup {} then killing primary {}",
        owners.partition, owners.backups[0], owners.primary
    );
    c.pause(paused);
    // Longer than the replication and failure timeouts: writes go on without
    // the paused backup, which is reported out of sync.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    c.kill(primary);
    c.resume(paused);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (history, acked, failed) = load.stop().await;
    report("paused backup + primary killed", acked, failed);
    c.wait_safe(4, SAFE).await;
    assert!(acked > 100, "the load made progress");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

/// A member that stalls again and again around the failure timeout (1.5 s
/// here): the metadata leader of the moment is stopped (SIGSTOP) for
/// 0.8-3 s and resumed for 0.5-3 s, eight times, under a write load, so
/// members are suspected, declared failed, rejoin and lead in turn.
/// Nothing acknowledged is lost and the cluster is safe again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_leader_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stops = [800u64, 1_600, 2_500, 1_200, 2_000, 1_400, 3_000, 1_000];
    let runs = [1_000u64, 2_000, 500, 3_000, 1_000, 1_500, 2_000, 1_000];
    let mut paused = Vec::new();
    for (stop, run) in stops.into_iter().zip(runs) {
        // No leader named (an election is on): stall member 0.
        let i = c.leader_index().await.unwrap_or(0);
        paused.push(c.members[i].name.clone());
        c.pause(i);
        tokio::time::sleep(Duration::from_millis(stop)).await;
        c.resume(i);
        tokio::time::sleep(Duration::from_millis(run)).await;
    }
    let epoch = c.wait_safe(3, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!("flapping leader (stalled in turn: {paused:?}): safe again at epoch {epoch}");
    report("flapping leader", acked, failed);
    assert!(acked > 100, "the load made progress");
    assert_no_acknowledged_write_lost(&client, &history).await;
}
