//! One-way cuts (RELIABILITY.md cuts both ways; a real network also fails
//! in one direction: a bad NIC queue, a firewall rule, a half-dead link).
//! Five real processes on 127.0.0.2-6 in a private network namespace, a
//! write load through the smart client on 127.0.0.1 (never cut), every
//! acknowledged write recorded and read back. In turn, each for a few
//! seconds, then healed:
//!
//! 1. the metadata leader's packets to one follower are dropped (the
//!    follower hears nothing from the leader; the leader still hears it);
//! 2. that follower's packets to the leader are dropped (the reverse);
//! 3. everything the leader sends is dropped (it hears all, none hear it);
//! 4. everything sent to the leader is dropped (it is heard, hears none);
//! 5. one way between two followers.
//!
//! Checked: nothing acknowledged is lost; the cluster is safe again after
//! the heal and takes writes (no wedge); every backup's copy equals its
//! primary's once the load stopped (digests over the peer port). Runs once per backup count (1, 2);
//! `DISTCACHE_FAULT_REPEAT=N` repeats it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};
use distcache_e2e::netns::{self, IPS, cut_one_way};

const SAFE: Duration = Duration::from_secs(90);
const HOLD: Duration = Duration::from_secs(5);

async fn leader_of(c: &ProcCluster) -> usize {
    c.leader_index()
        .await
        .expect("no member names a metadata leader")
}

/// Holds the one-way cuts `pairs` (from, to) for [`HOLD`], then heals them.
async fn hold(what: &str, pairs: &[(usize, usize)], load: &WriteLoad) {
    for (a, b) in pairs {
        cut_one_way(IPS[*a], IPS[*b], true);
    }
    let before = load.acked.load(Ordering::SeqCst);
    tokio::time::sleep(HOLD).await;
    let during = load.acked.load(Ordering::SeqCst) - before;
    for (a, b) in pairs {
        cut_one_way(IPS[*a], IPS[*b], false);
    }
    println!("one way, {what}: {during} writes acknowledged during the cut");
}

async fn one_way_once(backups: u32) {
    let args = ["--backup-count".to_string(), backups.to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = ProcCluster::start_on(&IPS, &args);
    c.wait_safe(5, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let l = leader_of(&c).await;
    let f = (l + 1) % 5;
    let (x, y) = ((l + 2) % 5, (l + 3) % 5);
    hold("leader -> a follower", &[(l, f)], &load).await;
    hold("a follower -> the leader", &[(f, l)], &load).await;
    let l = leader_of(&c).await;
    let out: Vec<(usize, usize)> = (0..5).filter(|j| *j != l).map(|j| (l, j)).collect();
    hold("leader -> everyone", &out, &load).await;
    let l = leader_of(&c).await;
    let inbound: Vec<(usize, usize)> = (0..5).filter(|j| *j != l).map(|j| (j, l)).collect();
    hold("everyone -> leader", &inbound, &load).await;
    hold("between two followers", &[(x, y)], &load).await;
    let epoch = c.wait_safe(5, SAFE).await;
    let healed = load.acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = load.acked.load(Ordering::SeqCst) - healed;
    let (history, acked, failed) = load.stop().await;
    println!(
        "one-way cuts, backup {backups}: {acked} acknowledged, {failed} failed; safe again at epoch {epoch}, {after} acknowledged in the 2 s after"
    );
    assert!(after > 0, "no write acknowledged after the heal: wedged");
    assert_no_acknowledged_write_lost(&client, &history).await;
    let (with_data, diverging) = c.diverging_copies(&client).await;
    println!(
        "{with_data} copies with data compared, {} differ",
        diverging.len()
    );
    assert!(with_data > 0, "no copy holds data: nothing was compared");
    assert!(diverging.is_empty(), "copies differ: {diverging:?}");
}

#[test]
fn one_way_cuts_lose_no_acknowledged_write_and_heal() {
    netns::run(
        "one_way_cuts_lose_no_acknowledged_write_and_heal",
        || async {
            for _ in 0..netns::repeat() {
                for backups in [1u32, 2] {
                    one_way_once(backups).await;
                }
            }
        },
    );
}
