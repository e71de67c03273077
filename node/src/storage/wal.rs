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
//! One writer thread appends what concurrent callers hand it, then fsyncs
//! once for all of them (group commit) when `fsync` is on. A write or fsync
//! error poisons the log: every later append fails and nothing is retried
//! into a false success.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::replica::{PartitionSnapshot, ReplOp};

/// One logged change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WalRecord {
    /// Writes to a partition, in order.
    Ops {
        /// Partition.
        partition: u32,
        /// Writes.
        ops: Vec<ReplOp>,
    },
    /// A partition replaced wholesale (snapshot received, or checkpoint).
    Install {
        /// Partition.
        partition: u32,
        /// Its state.
        snapshot: PartitionSnapshot,
    },
    /// A partition dropped (no longer a replica here).
    Drop {
        /// Partition.
        partition: u32,
    },
    /// A collection created.
    CreateCollection {
        /// Name.
        name: String,
        /// Default TTL, ms.
        default_ttl_ms: u64,
        /// LRU limit.
        max_entries: u64,
    },
    /// A collection deleted.
    DeleteCollection {
        /// Name.
        name: String,
    },
    /// The installed partition table (msgpack of the cluster's `Table`).
    Table(Bytes),
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Records in order (checkpoint first, then segments).
    pub records: Vec<WalRecord>,
    /// Bytes cut off a torn last segment.
    pub truncated_bytes: u64,
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

fn checkpoint_name(seq: u64) -> String {
    format!("checkpoint-{seq:020}.bin")
}

fn parse_seq(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// Frames one record.
pub fn frame(rec: &WalRecord) -> Result<Vec<u8>> {
    let payload =
        rmp_serde::to_vec(rec).map_err(|e| Error::Internal(format!("wal encode: {e}")))?;
    let len = u32::try_from(payload.len())
        .map_err(|_| Error::Internal("wal record over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Outcome of reading a file of records.
enum Read_ {
    /// Every record complete.
    Clean(Vec<WalRecord>),
    /// The last record is incomplete: it starts at `good_len`.
    Torn(Vec<WalRecord>, u64),
    /// A complete record is damaged at `offset`.
    Corrupt(Vec<WalRecord>, u64, String),
}

fn read_records(buf: &[u8]) -> Read_ {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        if buf.len() - at < 8 {
            return Read_::Torn(out, at as u64);
        }
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let crc = u32::from_le_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        let Some(end) = (at + 8).checked_add(len).filter(|e| *e <= buf.len()) else {
            return Read_::Torn(out, at as u64);
        };
        let payload = &buf[at + 8..end];
        if crc32fast::hash(payload) != crc {
            return Read_::Corrupt(out, at as u64, "checksum mismatch".into());
        }
        match rmp_serde::from_slice(payload) {
            Ok(r) => out.push(r),
            Err(e) => return Read_::Corrupt(out, at as u64, format!("undecodable record: {e}")),
        }
        at = end;
    }
    Read_::Clean(out)
}

/// Reads the log in `dir`: the newest checkpoint, then the segments from its
/// sequence on. A torn tail of the last segment is truncated; damage anywhere
/// else is an error naming the file and offset, unless `skip_corrupt`, which
/// stops at the last good record (and cuts the log there).
pub fn recover(dir: &Path, skip_corrupt: bool) -> Result<Recovered> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::Internal(format!("wal dir {}: {e}", dir.display())))?;
    let (checkpoints, segments) = list(dir)?;
    let mut rec = Recovered::default();
    let mut from = 0;
    if let Some(&cp) = checkpoints.last() {
        let path = dir.join(checkpoint_name(cp));
        let buf = read_all(&path)?;
        match read_records(&buf) {
            Read_::Clean(r) => rec.records = r,
            Read_::Torn(_, at) | Read_::Corrupt(_, at, _) => {
                return Err(Error::Internal(format!(
                    "WAL checkpoint {} damaged at offset {at}",
                    path.display()
                )));
            }
        }
        from = cp;
    }
    let live: Vec<u64> = segments.into_iter().filter(|s| *s >= from).collect();
    for (i, seq) in live.iter().enumerate() {
        let path = dir.join(segment_name(*seq));
        let buf = read_all(&path)?;
        let last = i + 1 == live.len();
        match read_records(&buf) {
            Read_::Clean(r) => rec.records.extend(r),
            Read_::Torn(r, at) if last => {
                rec.records.extend(r);
                rec.truncated_bytes = buf.len() as u64 - at;
                truncate(&path, at)?;
                tracing::warn!(file = %path.display(), offset = at, "WAL: torn tail truncated");
            }
            Read_::Torn(r, at) | Read_::Corrupt(r, at, _) if skip_corrupt => {
                rec.records.extend(r);
                tracing::warn!(file = %path.display(), offset = at, "WAL: damaged; starting from the last good record");
                truncate(&path, at)?;
                for later in &live[i + 1..] {
                    let _ = fs::remove_file(dir.join(segment_name(*later)));
                }
                break;
            }
            Read_::Torn(_, at) => {
                return Err(Error::Internal(format!(
                    "WAL segment {} ends mid-record at offset {at} but is not the last segment \
                     (start with --wal-skip-corrupt to keep only what precedes it)",
                    path.display()
                )));
            }
            Read_::Corrupt(_, at, why) => {
                return Err(Error::Internal(format!(
                    "WAL segment {} is damaged at offset {at}: {why} \
                     (start with --wal-skip-corrupt to keep only what precedes it)",
                    path.display()
                )));
            }
        }
    }
    Ok(rec)
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
    Ok(buf)
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| Error::Internal(format!("truncating {}: {e}", path.display())))
}

fn list(dir: &Path) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut cps = Vec::new();
    let mut segs = Vec::new();
    let rd = fs::read_dir(dir)
        .map_err(|e| Error::Internal(format!("wal dir {}: {e}", dir.display())))?;
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

enum Job {
    Append(Vec<u8>, oneshot::Sender<Result<()>>),
    /// Start a new segment; answers its sequence number.
    Rotate(oneshot::Sender<Result<u64>>),
}

/// The log writer. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Writer {
    dir: PathBuf,
    file: File,
    seq: u64,
    size: u64,
    max_segment_bytes: u64,
    fsync: bool,
}

impl Writer {
    fn open(dir: &Path, seq: u64) -> std::io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(segment_name(seq)))?;
        let size = file.metadata()?.len();
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((file, size))
    }

    fn rotate(&mut self) -> std::io::Result<u64> {
        self.file.sync_all()?;
        let (file, size) = Writer::open(&self.dir, self.seq + 1)?;
        self.seq += 1;
        self.file = file;
        self.size = size;
        Ok(self.seq)
    }
}

impl Wal {
    /// Opens the log for appending after [`recover`] (new records go to the
    /// last segment, or a first one).
    pub fn open(dir: &Path, fsync: bool, max_segment_bytes: u64) -> Result<Wal> {
        let (_, segs) = list(dir)?;
        let seq = segs.last().copied().unwrap_or(1);
        let (file, size) = Writer::open(dir, seq)
            .map_err(|e| Error::Internal(format!("opening WAL in {}: {e}", dir.display())))?;
        let mut w = Writer {
            dir: dir.to_path_buf(),
            file,
            seq,
            size,
            max_segment_bytes: max_segment_bytes.max(1024),
            fsync,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let poisoned = failed.clone();
        let thread = std::thread::Builder::new()
            .name("distcache-wal".into())
            .spawn(move || writer_loop(&mut w, rx, &poisoned))
            .map_err(|e| Error::Internal(format!("WAL thread: {e}")))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            failed,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Why the last append failed, while the log refuses writes (out of space
    /// clears once a later append succeeds; any other failure is final).
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    fn send(&self, job: Job) -> Result<()> {
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) => tx
                .send(job)
                .map_err(|_| Error::Unavailable("WAL closed".into())),
            None => Err(Error::Unavailable("WAL closed".into())),
        }
    }

    /// Appends `rec`; returns once it is written (and fsynced, if on).
    pub async fn append(&self, rec: &WalRecord) -> Result<()> {
        self.append_all(std::slice::from_ref(rec)).await
    }

    /// Appends `recs` in order as one unit of the group commit.
    pub async fn append_all(&self, recs: &[WalRecord]) -> Result<()> {
        let mut bytes = Vec::new();
        for r in recs {
            bytes.extend(frame(r)?);
        }
        let (done, rx) = oneshot::channel();
        self.send(Job::Append(bytes, done))?;
        rx.await
            .map_err(|_| Error::Unavailable("WAL closed".into()))?
    }

    /// Queues `recs` without waiting for them (ordered with every other append).
    pub fn append_nowait(&self, recs: &[WalRecord]) {
        let mut bytes = Vec::new();
        for r in recs {
            match frame(r) {
                Ok(b) => bytes.extend(b),
                Err(e) => tracing::error!(error = %e, "WAL record not encodable"),
            }
        }
        let (done, _rx) = oneshot::channel();
        let _ = self.send(Job::Append(bytes, done));
    }

    /// Writes a checkpoint of `state` (taken after this call rotated the log)
    /// and deletes the segments and checkpoints it makes obsolete. `state`
    /// is called after the rotation and must return the whole state.
    pub async fn checkpoint(&self, state: impl FnOnce() -> Vec<WalRecord>) -> Result<u64> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Rotate(done))?;
        let seq = rx
            .await
            .map_err(|_| Error::Unavailable("WAL closed".into()))??;
        let mut buf = Vec::new();
        for r in state() {
            buf.extend(frame(&r)?);
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let tmp = dir.join("checkpoint.tmp");
            let io = |e: std::io::Error| Error::Internal(format!("writing checkpoint: {e}"));
            let mut f = File::create(&tmp).map_err(io)?;
            f.write_all(&buf).map_err(io)?;
            f.sync_all().map_err(io)?;
            fs::rename(&tmp, dir.join(checkpoint_name(seq))).map_err(io)?;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            let (cps, segs) = list(&dir)?;
            for s in segs.into_iter().filter(|s| *s < seq) {
                let _ = fs::remove_file(dir.join(segment_name(s)));
            }
            for c in cps.into_iter().filter(|c| *c < seq) {
                let _ = fs::remove_file(dir.join(checkpoint_name(c)));
            }
            Ok(buf.len() as u64)
        })
        .await
        .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))?
    }

    /// Bytes of log files (segments + checkpoints) on disk.
    pub fn disk_bytes(&self) -> u64 {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Stops the writer after what is queued.
    pub fn close(&self) {
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(w: &mut Writer, rx: mpsc::Receiver<Job>, failed: &Mutex<Option<String>>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let mut acks = Vec::new();
        let mut buf = Vec::new();
        let mut result: std::io::Result<()> = Ok(());
        let size_before = w.size;
        let mut synced = false;
        for job in jobs {
            match job {
                Job::Append(bytes, done) => {
                    buf.extend_from_slice(&bytes);
                    acks.push(done);
                }
                Job::Rotate(done) => {
                    let r = flush(w, &mut buf).and_then(|()| w.rotate());
                    match r {
                        Ok(seq) => {
                            let _ = done.send(Ok(seq));
                        }
                        Err(e) => {
                            result = Err(e);
                            let _ =
                                done.send(Err(Error::Unavailable("WAL rotation failed".into())));
                        }
                    }
                }
            }
        }
        if result.is_ok() {
            result = flush(w, &mut buf);
            if result.is_ok() && w.fsync {
                synced = true;
                result = w.file.sync_data();
            }
            if result.is_ok() && w.size > w.max_segment_bytes {
                result = w.rotate().map(|_| ());
            }
        }
        match result {
            Ok(()) => {
                failed.lock().take();
                for a in acks {
                    let _ = a.send(Ok(()));
                }
            }
            // Out of space while writing (not while fsyncing): nothing of the
            // batch counts; cut the partial write off and keep trying later
            // batches, so the node recovers when space returns.
            Err(e)
                if !synced
                    && e.raw_os_error() == Some(28)
                    && w.file.set_len(size_before).is_ok() =>
            {
                w.size = size_before;
                let why = format!("{e} (in {})", w.dir.display());
                tracing::error!(error = %why, "WAL out of space: writes are refused until space returns");
                *failed.lock() = Some(why.clone());
                for a in acks {
                    let _ = a.send(Err(Error::Unavailable(format!(
                        "WAL out of space, write not acknowledged: {why}"
                    ))));
                }
            }
            Err(e) => {
                let why = format!("{e} (in {})", w.dir.display());
                tracing::error!(error = %why, "WAL write failed: this node stops acknowledging writes");
                failed.lock().get_or_insert(why.clone());
                for a in acks {
                    let _ = a.send(Err(Error::Unavailable(format!(
                        "WAL failed, write not acknowledged: {why}"
                    ))));
                }
                // Poisoned: refuse everything that is still queued.
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Append(_, done) => {
                            let _ =
                                done.send(Err(Error::Unavailable(format!("WAL failed: {why}"))));
                        }
                        Job::Rotate(done) => {
                            let _ =
                                done.send(Err(Error::Unavailable(format!("WAL failed: {why}"))));
                        }
                    }
                }
                return;
            }
        }
    }
}

fn flush(w: &mut Writer, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    w.file.write_all(buf)?;
    w.size += buf.len() as u64;
    buf.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let wal = Wal::open(dir, fsync, 64 << 20).expect("open");
        for i in 0..n {
            wal.append(&put(i)).await.expect("append");
        }
        wal.close();
    }

    #[tokio::test]
    async fn round_trip_and_rotation() {
        let dir = tmpdir("rt");
        let wal = Wal::open(&dir, false, 1024).expect("open");
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
        let wal = Wal::open(&dir, false, 4096).expect("open");
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
