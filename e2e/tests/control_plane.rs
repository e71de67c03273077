//! The control plane under the faults of RELIABILITY.md, with real
//! processes on 127.0.0.2-6 in a private network namespace (cuts with
//! `ip rule ... blackhole`), writers through the smart client on 127.0.0.1
//! (never cut), every acknowledged write recorded and read back:
//!
//! - the majorities ring (each member reaches only its two ring neighbours),
//!   backup 1 and 2, then heal: nothing acknowledged lost, one table;
//! - a symmetric partition {n0,n1} | {n2,n3,n4}, backup 1 and 2: the
//!   minority acknowledges nothing once its lease has lapsed, nothing lost;
//! - kill -9 and restart within a second, then kill -9 another member;
//! - churn: random kill -9 / restart of one member (also immediate restarts),
//!   with and without WAL, with the time to safe per round.
//!
//! Each scenario runs once (CI); `DISTCACHE_FAULT_REPEAT=N` repeats it, and
//! `DISTCACHE_CHURN_SECS` sets the churn length (default 20 s; 60 s in the
//! closing notes' runs).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use distcache_client::{Client, ClientConfig, Error};
use distcache_e2e::cluster::{
    ProcCluster, WriteLoad, assert_no_acknowledged_write_lost, health_of,
};
use distcache_e2e::netns::{self, IPS, cut};

const SAFE: Duration = Duration::from_secs(90);

fn backup(n: u32) -> Vec<String> {
    vec!["--backup-count".into(), n.to_string()]
}

fn start(n: usize, extra: &[String]) -> ProcCluster {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    ProcCluster::start_on(&IPS[..n], &extra)
}

/// Every pair of members not adjacent in `order` (a ring) is cut (`on`).
fn ring(order: &[usize], on: bool) {
    let n = order.len();
    for i in 0..n {
        for j in i + 1..n {
            let adjacent = j == i + 1 || (i == 0 && j == n - 1);
            if !adjacent {
                cut(IPS[order[i]], IPS[order[j]], on);
            }
        }
    }
}

async fn ring_once(backups: u32, order: &[usize]) {
    let mut c = start(5, &backup(backups));
    c.wait_safe(5, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ring(order, true);
    let before = load.acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = load.acked.load(Ordering::SeqCst) - before;
    ring(order, false);
    let epoch = c.wait_safe(5, SAFE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (history, acked, failed) = load.stop().await;
    println!(
        "ring {order:?} backup {backups}: {acked} acknowledged ({during} during the ring), {failed} failed; healed at epoch {epoch}"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[test]
fn majorities_ring_loses_no_acknowledged_write() {
    netns::run("majorities_ring_loses_no_acknowledged_write", || async {
        // Orders: the identity ring, and one where members 0 and 4 (the first
        // started) are far apart, so each sees itself among the "oldest".
        let orders: [[usize; 5]; 3] = [[0, 1, 2, 3, 4], [0, 2, 4, 1, 3], [4, 1, 3, 0, 2]];
        for run in 0..netns::repeat() {
            for (i, backups) in [1u32, 2].into_iter().enumerate() {
                let order = if netns::repeat() > 1 {
                    orders[(run + i) % orders.len()]
                } else {
                    orders[i]
                };
                ring_once(backups, &order).await;
            }
        }
    });
}

async fn symmetric_once(backups: u32) {
    let mut c = start(5, &backup(backups));
    c.wait_safe(5, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let minority = [0usize, 1];
    let majority = [2usize, 3, 4];
    let table = client.partition_table().await.expect("table");
    for a in minority {
        for b in majority {
            cut(IPS[a], IPS[b], true);
        }
    }
    let cut_at = Instant::now();
    // A plain client on the minority: keys whose primary is there.
    let lonely = Client::with_config(ClientConfig::new([c.members[0].grpc.clone()]).max_retries(0))
        .await
        .expect("connect to the minority");
    let keys: Vec<String> = (0..50_000u32)
        .map(|i| format!("min-{i}"))
        .filter(|k| {
            let (_, idx) = c.primary_of(&table, "__default__", k);
            minority.contains(&idx)
        })
        .take(200)
        .collect();
    // The lease is half the failure timeout (1.5 s in these tests).
    let lease = Duration::from_millis(750);
    let (mut early, mut late) = (0, 0);
    let mut i = 0;
    while cut_at.elapsed() < Duration::from_secs(6) {
        let k = &keys[i % keys.len()];
        i += 1;
        let at = cut_at.elapsed();
        if lonely.put(k, "minority").await.is_ok() {
            if at <= lease + Duration::from_millis(250) {
                early += 1;
            } else {
                late += 1;
            }
        }
    }
    println!(
        "symmetric backup {backups}: the minority acknowledged {early} writes within the lease ({lease:?} + 250 ms) and {late} after"
    );
    assert_eq!(
        late, 0,
        "the minority acknowledged writes after its lease lapsed"
    );
    let during = load.acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let progressed = load.acked.load(Ordering::SeqCst) - during;
    for a in minority {
        for b in majority {
            cut(IPS[a], IPS[b], false);
        }
    }
    c.wait_safe(5, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!(
        "symmetric backup {backups}: {acked} acknowledged, {failed} failed, {progressed} acknowledged in the last 3 s of the cut"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
    match lonely.get(&keys[0]).await {
        Ok(_) | Err(Error::Unavailable(_)) => {}
        Err(e) => panic!("reading after the heal: {e}"),
    }
}

#[test]
fn symmetric_partition_minority_stops_within_its_lease() {
    netns::run(
        "symmetric_partition_minority_stops_within_its_lease",
        || async {
            for _ in 0..netns::repeat() {
                symmetric_once(1).await;
                symmetric_once(2).await;
            }
        },
    );
}

async fn fast_restart_once() {
    let mut c = start(3, &backup(1));
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.spawn(1);
    let t0 = Instant::now();
    c.wait_safe(3, SAFE).await;
    println!(
        "kill -9 + restart within 1 s: safe again after {:?}",
        t0.elapsed()
    );
    // node-1 restarted empty: the cluster is safe only once it is back in
    // every in-sync set it holds a place in, so losing another member now
    // loses nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (history, acked, failed) = load.stop().await;
    println!("fast restart: {acked} acknowledged, {failed} failed");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[test]
fn kill_and_restart_within_a_second_then_kill_another() {
    netns::run(
        "kill_and_restart_within_a_second_then_kill_another",
        || async {
            for _ in 0..netns::repeat() {
                fast_restart_once().await;
            }
        },
    );
}

/// xorshift: a deterministic sequence for the churn's choices.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn churn_once(wal: bool, secs: u64, seed: u64) {
    let mut extra = backup(1);
    if wal {
        extra.push("--wal".into());
    }
    let mut c = start(3, &extra);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rng = seed | 1;
    let mut rounds = Vec::new();
    while Instant::now() < end {
        let victim = (next(&mut rng) % 3) as usize;
        let downtime = Duration::from_millis(next(&mut rng) % 2_000);
        c.kill(victim);
        tokio::time::sleep(downtime).await;
        c.spawn(victim);
        let t0 = Instant::now();
        c.wait_safe(3, SAFE).await;
        rounds.push((victim, downtime, t0.elapsed()));
    }
    let (history, acked, failed) = load.stop().await;
    for (victim, down, safe) in &rounds {
        println!("churn (wal {wal}): node-{victim} down {down:?}, safe again after {safe:?}");
    }
    println!(
        "churn (wal {wal}): {} rounds, {acked} acknowledged, {failed} failed",
        rounds.len()
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[test]
fn churn_of_kill_9_and_restarts_loses_nothing() {
    netns::run("churn_of_kill_9_and_restarts_loses_nothing", || async {
        let secs = std::env::var("DISTCACHE_CHURN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        for run in 0..netns::repeat() {
            churn_once(false, secs, 0x9e37_79b9 + run as u64).await;
            churn_once(true, secs, 0x7f4a_7c15 + run as u64).await;
        }
    });
}

async fn partitioned_leader_once() {
    let mut c = start(3, &backup(1));
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 6, 48);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = health_of(&c.members[0].grpc)
        .await
        .map(|h| h.metadata_leader)
        .expect("health");
    let li = c
        .members
        .iter()
        .position(|m| m.name == leader)
        .expect("the leader is a member");
    let before = health_of(&c.members[li].grpc).await.expect("health").epoch;
    for (j, ip) in IPS.iter().enumerate().take(3) {
        if j != li {
            cut(IPS[li], ip, true);
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let old = health_of(&c.members[li].grpc)
        .await
        .expect("old leader health");
    let other = (0..3).find(|j| *j != li).expect("another member");
    let new = health_of(&c.members[other].grpc)
        .await
        .expect("majority health");
    println!(
        "partitioned leader {leader}: its epoch {before} -> {}, majority leader {} at epoch {}",
        old.epoch, new.metadata_leader, new.epoch
    );
    assert_eq!(
        old.epoch, before,
        "a partitioned old leader commits nothing"
    );
    assert!(
        !old.safe,
        "the cut-off old leader does not call itself safe"
    );
    assert!(new.epoch > before, "the majority moved on");
    assert!(
        !new.metadata_leader.is_empty() && new.metadata_leader != leader,
        "the majority elected another leader"
    );
    for (j, ip) in IPS.iter().enumerate().take(3) {
        if j != li {
            cut(IPS[li], ip, false);
        }
    }
    c.wait_safe(3, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!("partitioned leader: {acked} acknowledged, {failed} failed");
    assert_no_acknowledged_write_lost(&client, &history).await;
}

#[test]
fn a_partitioned_old_leader_cannot_commit() {
    netns::run("a_partitioned_old_leader_cannot_commit", || async {
        for _ in 0..netns::repeat() {
            partitioned_leader_once().await;
        }
    });
}
