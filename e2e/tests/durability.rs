//! Durability with the WAL, on real processes: crash recovery (fsync on, and
//! off with grouped appends),
//! the un-fsynced tail cut after a crash, ENOSPC on a small tmpfs, fsync EIO
//! (an LD_PRELOAD shim built with cc), and a full
//! 3-node cluster restart on new addresses.

use std::process::Command;
use std::time::Duration;

use distcache_client::{Client, ClientConfig, Error, LockOptions};
use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const SAFE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_fsync_then_restart_keeps_every_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    // Once in CI; DISTCACHE_FAULT_REPEAT=N runs it N times.
    for _ in 0..distcache_e2e::netns::repeat() {
        kill_9_with_fsync_once().await;
    }
}

async fn kill_9_with_fsync_once() {
    let mut c = ProcCluster::start(1, &["--wal", "--wal-fsync", "true"]);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    client
        .collection_with(
            "capped",
            distcache_client::CollectionOptions::default().max_entries(50),
        )
        .await
        .expect("collection");
    let token_before = client
        .acquire_lock("job", LockOptions::default().hold(Duration::from_secs(1)))
        .await
        .expect("lock")
        .detach();
    client
        .put_with_ttl("short-lived", "x", Duration::from_millis(500))
        .await
        .expect("put");
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill(0);
    let (history, acked, failed) = load.stop().await;
    println!("crash: {acked} acknowledged writes before the kill, {failed} failed");
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    assert_no_acknowledged_write_lost(&client, &history).await;
    assert!(
        client.collection_exists("capped").await.expect("exists"),
        "collections survive"
    );
    assert_eq!(
        client.get("short-lived").await.expect("get"),
        None,
        "TTLs are absolute"
    );
    let g = client
        .acquire_lock("job", LockOptions::default().wait(Duration::from_secs(5)))
        .await
        .expect("lock after restart");
    assert!(
        g.fencing_token() > token_before,
        "fencing tokens never go backwards"
    );
}

/// `--wal-fsync false`: the appends of the commands one Batch stream runs
/// are written together (one `write`), each before its command applies and
/// is answered; a kill -9 keeps the page cache, so every acknowledged write
/// must be back after the restart. Many callers, so the client's batch
/// streams carry several commands per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_without_fsync_keeps_every_acknowledged_write_of_grouped_appends() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(1, &["--wal", "--wal-fsync", "false"]);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 32, 256);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill(0);
    let (history, acked, failed) = load.stop().await;
    println!("crash without fsync: {acked} acknowledged writes before the kill, {failed} failed");
    assert!(acked > 1000, "the load made progress: {acked}");
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    assert_no_acknowledged_write_lost(&client, &history).await;
}

/// Checkpoints every second under a write load: each rotates the log only
/// while no write is between its record and its apply, so a write logged
/// into a segment the checkpoint deletes is in the checkpoint's state.
/// After kill -9 and a restart (checkpoint + later segments), every
/// acknowledged write is back; a checkpoint that waited forever for the
/// writes (or they for it) would stall the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_under_write_load_keep_every_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(
        1,
        &[
            "--wal",
            "--wal-fsync",
            "false",
            "--wal-checkpoint-interval-secs",
            "1",
        ],
    );
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 16, 4096);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    c.kill(0);
    let (history, acked, failed) = load.stop().await;
    println!("checkpoints under load: {acked} acknowledged writes, {failed} failed");
    assert!(
        acked > 1000,
        "the load made progress across checkpoints: {acked}"
    );
    let wal = c.dir.join("node-0").join("wal");
    let checkpoints = std::fs::read_dir(&wal)
        .expect("wal dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .count();
    assert!(checkpoints >= 1, "a checkpoint was written under the load");
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    assert_no_acknowledged_write_lost(&client, &history).await;
}

/// The segments of node 0's log, oldest first.
fn segments(c: &ProcCluster) -> Vec<std::path::PathBuf> {
    let wal = c.dir.join("node-0").join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .expect("wal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    segs
}

/// Every key holds a value that was written (a prefix of its history),
/// none invented.
async fn assert_only_written_values(
    client: &Client,
    history: &std::collections::HashMap<String, distcache_e2e::cluster::KeyHistory>,
) {
    for (key, h) in history {
        if let Some(v) = client.get(key).await.expect("get") {
            let v: u64 = std::str::from_utf8(&v)
                .expect("utf8")
                .parse()
                .expect("number");
            assert!(v <= h.attempted, "{key}: {v} was never written");
        }
    }
}

/// `--wal-fsync true` (block segments), on a real process: after kill -9,
/// the last batch is cut short (a machine crash before that group commit's
/// fsync). The node starts from a clean prefix of history. Then, after a
/// second kill, one bit of the log's first batch is flipped, with later
/// batches intact: that is damage, not a torn tail, and the node refuses
/// to start, naming the file and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_a_torn_last_batch_is_cut_and_damage_before_valid_batches_stops_the_start() {
    let _serial = SERIAL.lock().await;
    // Once in CI; DISTCACHE_FAULT_REPEAT=N runs it N times.
    for _ in 0..distcache_e2e::netns::repeat() {
        fsync_tear_once().await;
    }
}

async fn fsync_tear_once() {
    let mut c = ProcCluster::start(1, &["--wal", "--wal-fsync", "true"]);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 4, 32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    let (history, acked, _) = load.stop().await;
    assert!(acked > 100, "the load made progress: {acked}");
    let last = segments(&c).pop().expect("a segment");
    let buf = std::fs::read(&last).expect("read");
    assert!(buf.starts_with(b"DCWAL2"), "fsync on writes block segments");
    // Batches start on 512-byte sectors with a magic number: the last one
    // is cut short 20 bytes in (its header and a little of its records on
    // disk, as when a SIGKILL or power loss interrupts its write).
    let magic = 0xDC5A_B10Cu32.to_le_bytes();
    let batch = (4096..buf.len())
        .step_by(512)
        .rfind(|at| buf[*at..].starts_with(&magic))
        .expect("a batch");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .and_then(|f| f.set_len(batch as u64 + 20))
        .expect("cut the last batch");
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    assert_only_written_values(&client, &history).await;
    client.put("after-tear", "ok").await.expect("writes resume");
    let log = std::fs::read_to_string(c.dir.join("node-0.log")).expect("node log");
    assert!(
        log.contains("torn tail truncated"),
        "recovery cut the torn batch"
    );

    let load = WriteLoad::start(&client, 4, 32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    load.stop().await;
    let first = segments(&c).into_iter().next().expect("a segment");
    let mut buf = std::fs::read(&first).expect("read");
    buf[4096 + 40] ^= 0x20;
    std::fs::write(&first, &buf).expect("flip");
    let out = Command::new(distcache_e2e::bin("distcache-node"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", distcache_e2e::free_port()),
        ])
        .args([
            "--peer-listen",
            &format!("127.0.0.1:{}", distcache_e2e::free_port()),
        ])
        .args(["--name", "node-0", "--wal-dir"])
        .arg(c.dir.join("node-0").join("wal"))
        .output()
        .expect("run the node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a damaged log stops the start: {err}"
    );
    let name = first.file_name().expect("name").to_string_lossy();
    assert!(
        err.contains(name.as_ref()) && err.contains("offset 4096"),
        "the error names the file and offset: {err}"
    );
    println!("fsync tear: {acked} acknowledged before the first kill; damage reported: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsynced_tail_cut_after_a_crash_recovers_a_clean_prefix() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(1, &["--wal", "--wal-fsync", "false"]);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 4, 32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    let (history, _, _) = load.stop().await;
    // SIGKILL keeps the page cache: emulate losing what was not fsynced by
    // cutting the last segment mid-record.
    let last = segments(&c).pop().expect("a segment");
    let len = std::fs::metadata(&last).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    f.set_len(len.saturating_sub(37)).expect("cut");
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    assert_only_written_values(&client, &history).await;
    client.put("after", "ok").await.expect("writes resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enospc_refuses_writes_loses_nothing_and_recovers_when_space_returns() {
    let _serial = SERIAL.lock().await;
    let mnt = std::env::temp_dir().join(format!("dc-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        panic!("cannot mount a tmpfs (needs root): the ENOSPC test cannot run here");
    }
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; 1 << 20]).expect("ballast");
    let wal_dir = mnt.join("wal");
    let run = async {
        let mut c = ProcCluster::start(
            1,
            &[
                "--wal-dir",
                wal_dir.to_str().expect("utf8"),
                "--max-value-bytes",
                "262144",
            ],
        );
        c.wait_safe(1, SAFE).await;
        let client = Client::with_config(ClientConfig::new(c.endpoints()).max_retries(0))
            .await
            .expect("client");
        let value = vec![b'v'; 200 * 1024];
        let mut acked = Vec::new();
        let mut refused = None;
        for i in 0..40 {
            match client.put(format!("big{i}"), value.clone()).await {
                Ok(()) => acked.push(i),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let e = refused.expect("the log filled up");
        assert!(
            matches!(&e, Error::Unavailable(m) if m.contains("space")),
            "clear error: {e}"
        );
        let health = client.health().await.expect("health");
        assert!(
            health.problem.contains("WAL"),
            "health shows it: {}",
            health.problem
        );
        for i in &acked {
            assert!(
                client.get(format!("big{i}")).await.expect("get").is_some(),
                "acked big{i} kept"
            );
        }
        // Space returns: writes are accepted again.
        std::fs::remove_file(&ballast).expect("free space");
        client
            .put("after-space", "ok")
            .await
            .expect("writes resume when space returns");
        c.kill(0);
        c.spawn(0);
        c.wait_safe(1, SAFE).await;
        let client = c.client().await;
        for i in &acked {
            assert!(
                client.get(format!("big{i}")).await.expect("get").is_some(),
                "acked big{i} survives restart"
            );
        }
        assert!(client.get("after-space").await.expect("get").is_some());
        println!(
            "ENOSPC: {} writes acknowledged before the disk filled; all kept",
            acked.len()
        );
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("in time");
    let _ = Command::new("umount").arg(&mnt).status();
}

/// An `LD_PRELOAD` shim: `fsync` and `fdatasync` fail with EIO while the
/// file named by `DISTCACHE_EIO_WHEN` exists (a disk that starts failing).
const EIO_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int tripped(void) {
    const char *f = getenv("DISTCACHE_EIO_WHEN");
    return f != NULL && access(f, F_OK) == 0;
}
int fdatasync(int fd) {
    if (tripped()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
int fsync(int fd) {
    if (tripped()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"#;

/// Builds the EIO shim into `dir`; returns (the library, the trip file).
fn eio_shim(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("dir");
    let (src, shim) = (dir.join("eio.c"), dir.join("libeio.so"));
    std::fs::write(&src, EIO_SHIM).expect("shim source");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&src)
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        built,
        "cannot build the fsync-EIO shim (needs a C compiler, cc): the EIO test cannot run here"
    );
    (shim, dir.join("trip"))
}

/// Restarts member `i` of `c` with the EIO shim preloaded.
fn under_shim(c: &mut ProcCluster, i: usize, shim: &std::path::Path, trip: &std::path::Path) {
    c.env.insert(
        i,
        vec![
            ("LD_PRELOAD".into(), shim.display().to_string()),
            ("DISTCACHE_EIO_WHEN".into(), trip.display().to_string()),
        ],
    );
    c.kill(i);
    c.spawn(i);
}

/// Waits up to 10 s for member `i`'s process to exit.
async fn exits(c: &mut ProcCluster, i: usize) -> bool {
    for _ in 0..100 {
        if !c.members[i].running() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// RELIABILITY #12, EIO (one node): once `fdatasync` fails the write is not
/// acknowledged and the node stops at once (fail-stop: it never retries
/// into a false success, since the kernel may have dropped the pages the
/// failed fsync left dirty); after a restart on a good disk every
/// acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_eio_stops_the_node_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("dc-eio-{}", std::process::id()));
    let (shim, trip) = eio_shim(&dir);
    let wal = dir.join("wal");
    let mut c = ProcCluster::start(1, &["--wal-dir", wal.to_str().expect("utf8")]);
    under_shim(&mut c, 0, &shim, &trip);
    c.wait_safe(1, SAFE).await;
    let client = Client::with_config(ClientConfig::new(c.endpoints()).max_retries(0))
        .await
        .expect("client");
    for i in 0..100 {
        client
            .put(format!("eio{i}"), format!("v{i}"))
            .await
            .expect("put before the disk fails");
    }
    std::fs::write(&trip, b"").expect("trip");
    let e = client
        .put("during", "x")
        .await
        .expect_err("a write whose fsync failed is not acknowledged");
    println!("write with a failing fsync: {e}");
    assert!(
        exits(&mut c, 0).await,
        "the node kept running on a failed log"
    );
    std::fs::remove_file(&trip).expect("untrip");
    c.env.remove(&0);
    c.spawn(0);
    c.wait_safe(1, SAFE).await;
    let client = c.client().await;
    for i in 0..100 {
        assert_eq!(
            client
                .get(format!("eio{i}"))
                .await
                .expect("get after restart"),
            Some(bytes::Bytes::from(format!("v{i}"))),
            "acknowledged eio{i} survives"
        );
    }
    client
        .put("after-restart", "ok")
        .await
        .expect("writes resume on a good disk");
    println!(
        "fsync EIO, one node: stopped at once; 100 acknowledged before, all kept after a restart"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// RELIABILITY #12, EIO in a cluster: member 0's disk fails under a write
/// load (backup 1). It stops at once, its partitions fail over to their
/// in-sync backups, writes go on, and nothing acknowledged is lost; it
/// rejoins after a restart on a good disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_eio_on_one_member_fails_over_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("dc-eio3-{}", std::process::id()));
    let (shim, trip) = eio_shim(&dir);
    let mut c = ProcCluster::start(3, &["--wal"]);
    under_shim(&mut c, 0, &shim, &trip);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&trip, b"").expect("trip");
    assert!(
        exits(&mut c, 0).await,
        "member 0 kept running on a failed log"
    );
    let stopped = load.acked.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = load.acked.load(std::sync::atomic::Ordering::SeqCst) - stopped;
    assert!(
        after > 0,
        "no write acknowledged after member 0 stopped: no failover"
    );
    std::fs::remove_file(&trip).expect("untrip");
    c.env.remove(&0);
    c.spawn(0);
    c.wait_safe(3, SAFE).await;
    let (history, acked, failed) = load.stop().await;
    println!(
        "fsync EIO on member 0 of 3: it stopped, {after} acknowledged in the 5 s after; {acked} acknowledged, {failed} failed in all"
    );
    assert_no_acknowledged_write_lost(&client, &history).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_cluster_restart_on_new_addresses_keeps_every_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut c = ProcCluster::start(3, &["--wal"]);
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    let token_before = client
        .acquire_lock(
            "cluster-job",
            LockOptions::default().hold(Duration::from_secs(1)),
        )
        .await
        .expect("lock")
        .detach();
    let load = WriteLoad::start(&client, 8, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        c.kill(i);
    }
    let (history, acked, failed) = load.stop().await;
    println!("full restart: {acked} acknowledged writes, {failed} failed before the stop");
    c.shuffle_addresses();
    for i in [2, 0, 1] {
        c.spawn(i);
    }
    c.wait_safe(3, SAFE).await;
    let client = c.client().await;
    assert_no_acknowledged_write_lost(&client, &history).await;
    let g = client
        .acquire_lock(
            "cluster-job",
            LockOptions::default().wait(Duration::from_secs(10)),
        )
        .await
        .expect("lock after restart");
    assert!(
        g.fencing_token() > token_before,
        "fencing tokens continue above their old values"
    );
}
