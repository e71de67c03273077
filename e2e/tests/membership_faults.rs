//! RELIABILITY.md scenario 13: members join and leave while a migration
//! runs or the network is cut, under a write load through the smart client
//! with every acknowledged write recorded and read back.
//!
//! - a migration's source killed midway: 3 members holding preloaded data,
//!   2 join, and an original member (every migration's source is one) is
//!   killed -9 while partitions are moving, then restarted empty;
//! - a member joins while another is cut off (private network namespace,
//!   `ip rule ... blackhole`), and a member leaves gracefully while another
//!   is cut off.
//!
//! Checked: nothing acknowledged is lost (the preloaded keys included), the
//! cluster is safe again with one table, and every partition's backups hold
//! the same copy as its primary (digests over the peer port). Each runs once (CI);
//! `DISTCACHE_FAULT_REPEAT=N` repeats them.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use distcache_e2e::cluster::{
    ProcCluster, WriteLoad, assert_no_acknowledged_write_lost, health_of,
};
use distcache_e2e::netns::{self, IPS, cut};

const SAFE: Duration = Duration::from_secs(120);
const PRELOAD_KEYS: usize = 30_000;
const PRELOAD_BYTES: usize = 2_048;

fn preload_value(i: usize) -> Bytes {
    let mut v = format!("pre-{i}-").into_bytes();
    v.resize(PRELOAD_BYTES, b'p');
    Bytes::from(v)
}

/// Reads every preloaded key back: each must hold its value.
async fn assert_preload_kept(client: &distcache_client::Client) {
    let keys: Vec<String> = (0..PRELOAD_KEYS).map(|i| format!("pre-{i}")).collect();
    let mut missing = Vec::new();
    for chunk in keys.chunks(500) {
        let got = client
            .default_collection()
            .get_many(chunk)
            .await
            .expect("read the preload back");
        for k in chunk {
            let i: usize = k[4..].parse().expect("index");
            if got.get(k.as_bytes()) != Some(&preload_value(i)) {
                missing.push(k.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} preloaded keys lost or changed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Every partition's backups hold its primary's copy (and there is data).
async fn assert_copies_agree(c: &ProcCluster, client: &distcache_client::Client) {
    let (with_data, diverging) = c.diverging_copies(client).await;
    println!(
        "{with_data} copies with data compared, {} differ",
        diverging.len()
    );
    assert!(with_data > 0, "no copy holds data: nothing was compared");
    assert!(diverging.is_empty(), "copies differ: {diverging:?}");
}

async fn migration_source_killed_once() {
    let mut c = ProcCluster::start(3, &[]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    for start in (0..PRELOAD_KEYS).step_by(500) {
        let end = (start + 500).min(PRELOAD_KEYS);
        client
            .default_collection()
            .put_many(
                (start..end).map(|i| (format!("pre-{i}"), preload_value(i))),
                None,
            )
            .await
            .expect("preload");
    }
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.join();
    c.join();
    // Wait for partitions to be moving, then kill a source.
    let until = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while Instant::now() < until && seen == 0 {
        for m in &c.members[..3] {
            if let Some(h) = health_of(&m.grpc).await {
                seen = seen.max(h.migrations_running);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen > 0, "no migration was seen running after the joins");
    c.kill(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.spawn(1);
    let epoch = c.wait_safe(5, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!(
        "migration source killed with {seen} migrations running: {acked} acknowledged, {failed} failed; safe at epoch {epoch}"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
    assert_preload_kept(&client).await;
    assert_copies_agree(&c, &client).await;
}

/// One scenario at a time (they share the machine's 2 cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn a_migration_source_killed_midway_loses_nothing() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for _ in 0..netns::repeat() {
            migration_source_killed_once().await;
        }
    });
}

/// Cuts member `i` off from every other member (`on`) or heals it.
fn isolate(i: usize, members: usize, on: bool) {
    for (j, ip) in IPS.iter().enumerate().take(members) {
        if j != i {
            cut(IPS[i], ip, on);
        }
    }
}

async fn join_and_leave_during_a_cut_once() {
    let mut c = ProcCluster::start_first_of(&IPS, 4, &[]);
    c.wait_safe(4, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Member 3 cut off; member 4 joins meanwhile (cut from 3 too).
    isolate(3, 5, true);
    let joined = c.join();
    assert_eq!(joined, 4);
    tokio::time::sleep(Duration::from_secs(6)).await;
    isolate(3, 5, false);
    let epoch = c.wait_safe(5, SAFE).await;
    println!("joined during a cut: safe at epoch {epoch}");
    // Member 0 cut off; member 4 leaves gracefully meanwhile.
    isolate(0, 5, true);
    assert!(c.terminate(4), "graceful exit of member 4 during a cut");
    let keep: Vec<String> = c
        .listed()
        .into_iter()
        .filter(|n| *n != c.members[4].name)
        .collect();
    c.write_file(&keep);
    tokio::time::sleep(Duration::from_secs(4)).await;
    isolate(0, 5, false);
    let epoch = c.wait_safe(4, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!(
        "joined and left during cuts: {acked} acknowledged, {failed} failed; safe at epoch {epoch}"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
    assert_copies_agree(&c, &client).await;
}

#[test]
fn members_join_and_leave_during_a_cut_losing_nothing() {
    let _serial = serial();
    netns::run(
        "members_join_and_leave_during_a_cut_losing_nothing",
        || async {
            for _ in 0..netns::repeat() {
                join_and_leave_during_a_cut_once().await;
            }
        },
    );
}
