//! The write-ahead log: a folder of segment files plus checkpoints.
//!
//! Record: `len: u32 LE | crc32(payload): u32 LE | payload` where payload is
//! a msgpack [`WalRecord`]. Segments are `wal-<seq>.log`, rotated past
//! `max_segment_bytes`. A checkpoint `checkpoint-<seq>.bin` (same record
//! framing, one record per partition / collection / table) holds the whole
//! state as of some point in segment `<seq>`; replaying segments `>= seq` on
//! top of it gives the current state because every logged write is a blind
//! write of a key's (or lock's, or collection's) new state.
//!
//! With `--wal-fsync true` segments are *block segments*: each group commit
//! is one checksummed batch of such records at a 4 KiB boundary, written in
//! place into synced zeros (see `blocks` for the layout and why).
//!
//! Rooms: `record` (the record and its framing), `blocks` (block segments
//! and the preparer of their space), `recovery` (reading a log back),
//! `writer` (the writer thread and group commit), `deferred` (appends of a
//! batch of commands written together), `checkpoint`.

mod blocks;
mod checkpoint;
mod deferred;
mod record;
mod recovery;
mod writer;

use std::fs;
use std::path::Path;

pub use deferred::Deferred;
pub use record::{WalRecord, frame, frame_ops_into};
pub use recovery::{Recovered, recover};
pub use writer::{Applying, Wal};

/// Whether an acknowledged append is on stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync (group commit) before an append is acknowledged: survives a
    /// machine crash.
    Fsync,
    /// Written to the OS before acknowledged: survives a process crash only.
    Buffered,
}

impl Durability {
    /// `--wal-fsync`.
    pub fn from_fsync(fsync: bool) -> Self {
        if fsync {
            Durability::Fsync
        } else {
            Durability::Buffered
        }
    }
}

/// Everything the log can fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    /// A file operation failed.
    #[error("{0}")]
    Io(String),
    /// The log is damaged (a checkpoint, or a segment other than a torn tail).
    #[error("{0}")]
    Damaged(String),
    /// A record could not be encoded.
    #[error("wal encode: {0}")]
    Encode(String),
    /// The log was closed (the node is stopping).
    #[error("WAL closed")]
    Closed,
    /// The log refuses writes (out of space, or failed): not acknowledged.
    #[error("{0}")]
    Failed(String),
}

impl WalError {
    fn io(what: String, e: &dyn std::fmt::Display) -> Self {
        WalError::Io(format!("{what}: {e}"))
    }
}

impl From<WalError> for crate::error::Error {
    fn from(e: WalError) -> Self {
        use crate::error::Error;
        match e {
            WalError::Closed | WalError::Failed(_) => Error::Unavailable(e.to_string()),
            WalError::Io(_) | WalError::Damaged(_) | WalError::Encode(_) => {
                Error::Internal(e.to_string())
            }
        }
    }
}

pub(super) fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

pub(super) fn checkpoint_name(seq: u64) -> String {
    format!("checkpoint-{seq:020}.bin")
}

fn parse_seq(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

pub(super) fn list(dir: &Path) -> Result<(Vec<u64>, Vec<u64>), WalError> {
    let mut cps = Vec::new();
    let mut segs = Vec::new();
    let rd =
        fs::read_dir(dir).map_err(|e| WalError::io(format!("wal dir {}", dir.display()), &e))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(s) = parse_seq(&name, "checkpoint-", ".bin") {
            cps.push(s);
        } else if let Some(s) = parse_seq(&name, "wal-", ".log") {
            segs.push(s);
        }
    }
    cps.sort_unstable();
    segs.sort_unstable();
    Ok((cps, segs))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytes::Bytes;

    use super::*;
    use crate::replica::ReplOp;

    fn put(i: u64) -> WalRecord {
        WalRecord::Ops {
            partition: (i % 7) as u32,
            ops: vec![ReplOp::Put {
                collection: "c".into(),
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from(vec![b'v'; (i % 50) as usize]),
                expires_at: 0,
            }],
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dc-wal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("dir");
        d
    }

    async fn write(dir: &Path, n: u64, fsync: bool) {
        let wal = Wal::open(dir, Durability::from_fsync(fsync), 64 << 20).expect("open");
        for i in 0..n {
            wal.append(&put(i)).await.expect("append");
        }
        wal.close();
    }

    /// The borrowed framing of a write batch is byte for byte the framing of
    /// its owned records (one per run of the same partition).
    #[test]
    fn framed_ops_are_the_owned_records_bytes() {
        let ops: Vec<(u32, ReplOp)> = [3, 3, 5, 3, 3, 3]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let WalRecord::Ops { ops, .. } = put(i as u64) else {
                    unreachable!("put is an Ops record")
                };
                (*p, ops.into_iter().next().expect("one op"))
            })
            .collect();
        let mut framed = Vec::new();
        frame_ops_into(&mut framed, &ops).expect("frame");
        let owned = [(3, 0..2), (5, 2..3), (3, 3..6)];
        let mut expected = Vec::new();
        for (partition, range) in owned {
            let rec = WalRecord::Ops {
                partition,
                ops: ops[range].iter().map(|(_, op)| op.clone()).collect(),
            };
            expected.extend(frame(&rec).expect("frame"));
        }
        assert_eq!(framed, expected);
        assert!(matches!(record::read_records(&framed), record::Read_::Clean(r) if r.len() == 3));
    }

    /// Inside a `Deferred` scope appends (records, and replicated ops
    /// framed straight into the queue) wait until the scope's task
    /// flushes; the flush writes them in queue order and answers each; the
    /// log then reads back exactly those records. Outside a scope an
    /// append is written at once.
    #[tokio::test]
    async fn deferred_appends_wait_for_the_flush_and_land_in_order() {
        use std::sync::Arc;
        use std::task::Poll;

        let dir = tmpdir("deferred");
        let wal = Arc::new(Wal::open(&dir, Durability::Buffered, 64 << 20).expect("open"));
        wal.append(&put(0)).await.expect("outside a scope: at once");
        let deferred = Arc::new(Deferred::default());
        // Records and replicated ops (framed straight into the queue) mixed.
        let appends = (1..=5).map(|i| {
            let wal = wal.clone();
            async move {
                if i % 2 == 0 {
                    let WalRecord::Ops { partition, ops } = put(i) else {
                        unreachable!("put is an Ops record")
                    };
                    let ops: Vec<(u32, ReplOp)> =
                        ops.into_iter().map(|op| (partition, op)).collect();
                    wal.append_ops(&ops).await
                } else {
                    wal.append(&put(i)).await
                }
            }
        });
        let mut all = Box::pin(futures::future::join_all(appends));
        let d = deferred.clone();
        let seen = deferred
            .clone()
            .scope(std::future::poll_fn(|cx| {
                // First poll: every append queued, none written or answered.
                assert!(
                    all.as_mut().poll(cx).is_pending(),
                    "answered before the flush"
                );
                let queued = !d.is_empty();
                let on_disk = recover(&dir, false).expect("recover").records.len();
                wal.flush_deferred(&d);
                match all.as_mut().poll(cx) {
                    Poll::Ready(results) => Poll::Ready((queued, on_disk, results)),
                    Poll::Pending => panic!("not answered after the flush"),
                }
            }))
            .await;
        let (queued, on_disk_before_flush, results) = seen;
        assert!(queued, "the appends were queued");
        assert_eq!(
            on_disk_before_flush, 1,
            "nothing deferred was written before the flush"
        );
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert!(deferred.is_empty());
        wal.close();
        let rec = recover(&dir, false).expect("recover");
        assert_eq!(rec.records, (0..=5).map(put).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&dir);
    }

    /// With fsync on, a flushed queue is one job of the writer thread:
    /// every append is answered once it is fsynced, in queue order.
    #[tokio::test]
    async fn deferred_appends_with_fsync_are_one_group_commit_job() {
        use std::sync::Arc;

        let dir = tmpdir("deferred-fsync");
        let wal = Arc::new(Wal::open(&dir, Durability::Fsync, 64 << 20).expect("open"));
        let deferred = Arc::new(Deferred::default());
        let appends = (0..8).map(|i| {
            let wal = wal.clone();
            async move { wal.append(&put(i)).await }
        });
        let mut all = Box::pin(futures::future::join_all(appends));
        let d = deferred.clone();
        deferred
            .clone()
            .scope(std::future::poll_fn(|cx| {
                assert!(
                    all.as_mut().poll(cx).is_pending(),
                    "answered before the flush"
                );
                assert!(!d.is_empty(), "queued");
                wal.flush_deferred(&d);
                std::task::Poll::Ready(())
            }))
            .await;
        let results = all.await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        wal.close();
        let rec = recover(&dir, false).expect("recover");
        assert_eq!(rec.records, (0..8).map(put).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&dir);
    }

    /// A checkpoint rotates only while no change is between its record and
    /// its apply: with a change logged and not yet applied (its `applying`
    /// guard held) the checkpoint waits, and it completes once the change
    /// is applied. Without this, a record logged just before the rotation
    /// and applied after the state was taken would be in neither.
    #[tokio::test]
    async fn a_checkpoint_waits_for_a_logged_change_to_be_applied() {
        let dir = tmpdir("gate");
        let wal = Wal::open(&dir, Durability::Buffered, 64 << 20).expect("open");
        let applying = wal.applying().await;
        wal.append(&put(1)).await.expect("append");
        let mut checkpoint = Box::pin(wal.checkpoint(|| vec![put(1)]));
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), checkpoint.as_mut()).await;
        assert!(
            waited.is_err(),
            "the checkpoint rotated while a change was being applied"
        );
        drop(applying);
        checkpoint
            .await
            .expect("checkpoint once the change is applied");
        wal.close();
        let rec = recover(&dir, false).expect("recover");
        assert_eq!(rec.records, vec![put(1)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn round_trip_and_rotation() {
        let dir = tmpdir("rt");
        let wal = Wal::open(&dir, Durability::Buffered, 1024).expect("open");
        for i in 0..200 {
            wal.append(&put(i)).await.expect("append");
        }
        wal.close();
        let (_, segs) = list(&dir).expect("list");
        assert!(segs.len() > 3, "rotated: {segs:?}");
        let rec = recover(&dir, false).expect("recover");
        assert_eq!(rec.records, (0..200).map(put).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&dir);
    }

    /// Cut the last segment at every byte offset inside its last records:
    /// recovery never panics and yields exactly the complete records.
    #[tokio::test]
    async fn truncation_at_every_offset_keeps_exactly_the_complete_records() {
        let dir = tmpdir("trunc");
        write(&dir, 20, false).await;
        let path = dir.join(segment_name(1));
        let full = fs::read(&path).expect("read");
        let ends: Vec<usize> = (0..=20)
            .map(|n| (0..n).map(|i| frame(&put(i)).expect("frame").len()).sum())
            .collect();
        let from = ends[15];
        for cut in from..=full.len() {
            fs::write(&path, &full[..cut]).expect("write");
            let rec = recover(&dir, false).expect("recover a torn tail");
            let complete = ends.iter().filter(|e| **e <= cut).count() - 1;
            assert_eq!(rec.records.len(), complete, "cut at {cut}");
            assert_eq!(
                rec.records,
                (0..complete as u64).map(put).collect::<Vec<_>>()
            );
            assert_eq!(
                fs::metadata(&path).expect("meta").len() as usize,
                ends[complete],
                "truncated to the last good record"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_flipped_bit_mid_log_names_file_and_offset() {
        let dir = tmpdir("flip");
        write(&dir, 20, false).await;
        let path = dir.join(segment_name(1));
        let mut buf = fs::read(&path).expect("read");
        let at: usize = (0..5).map(|i| frame(&put(i)).expect("frame").len()).sum();
        buf[at + 10] ^= 0x04;
        fs::write(&path, &buf).expect("write");
        let err = recover(&dir, false).expect_err("corruption is an error");
        let msg = err.to_string();
        assert!(
            msg.contains("wal-00000000000000000001.log") && msg.contains(&format!("offset {at}")),
            "{msg}"
        );
        // The documented escape hatch keeps what precedes the damage.
        let rec = recover(&dir, true).expect("skip corrupt");
        assert_eq!(rec.records.len(), 5);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn checkpoint_bounds_the_log_and_recovers_the_same_state() {
        let dir = tmpdir("cp");
        let wal = Wal::open(&dir, Durability::Buffered, 4096).expect("open");
        for i in 0..500 {
            wal.append(&put(i)).await.expect("append");
        }
        let before = wal.disk_bytes();
        wal.checkpoint(|| vec![put(1_000)])
            .await
            .expect("checkpoint");
        wal.append(&put(1_001)).await.expect("append");
        let after = wal.disk_bytes();
        wal.close();
        assert!(after < before / 4, "log shrank: {before} -> {after}");
        let rec = recover(&dir, false).expect("recover");
        assert_eq!(rec.records, vec![put(1_000), put(1_001)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
