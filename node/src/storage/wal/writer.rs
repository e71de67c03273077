//! The log writer: with durability `Fsync`, one thread appends what
//! concurrent callers hand it, then fsyncs once for all of them (group
//! commit); with `Buffered` a caller writes its records to the OS itself,
//! under the writer's lock (no channel round trip per write; the write is in
//! the OS, so it survives a process crash, before the append returns). A
//! write or fsync error poisons the log: every later append fails and
//! nothing is retried into a false success.
//!
//! Segments are written by appending with `Buffered`, and with `Fsync` in
//! place, one block-aligned batch per group commit into synced zeros kept
//! ahead by a preparer thread ([`blocks`](super::blocks)). Opening the log
//! always starts a new segment, so a segment is only ever written in one
//! layout.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::blocks::{self, Prep};
use super::deferred::{Deferred, Outcome, Waiter};
use super::record::{WalRecord, frame_into, frame_ops_into};
use super::{Durability, WalError, list, segment_name};
use crate::replica::ReplOp;

/// See [`Wal::applying`].
pub type Applying<'a> = tokio::sync::RwLockReadGuard<'a, ()>;

pub(super) enum Job {
    /// One or more records framed back to back (one append, or a
    /// [`Deferred`] queue), and who waits for them.
    Append(Vec<u8>, Waiter),
    /// Start a new segment; answers its sequence number.
    Rotate(oneshot::Sender<Result<u64, WalError>>),
}

/// The log writer. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Wal {
    pub(super) dir: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    failed: Arc<Mutex<Option<String>>>,
    /// The writer (the thread, for group commit and rotation, and with
    /// `Buffered` durability the callers themselves write under its lock),
    /// the failure and whether it is final.
    shared: Arc<Shared>,
    /// `Buffered`: callers write directly.
    direct: bool,
    /// Held shared from before a record is logged until its change is
    /// applied ([`Wal::applying`]); a checkpoint rotates holding it
    /// exclusively.
    pub(super) gate: tokio::sync::RwLock<()>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `Fsync`: the preparer of segment space, and its thread.
    prep: Option<Preparer>,
}

/// The preparer of block segments' space and its thread.
#[derive(Debug)]
struct Preparer {
    prep: Arc<Prep>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    file: Arc<File>,
    seq: u64,
    /// Appending: the file's length. Blocks: where the next batch goes.
    size: u64,
    max_segment_bytes: u64,
    /// Block segments, and who prepares their space: present exactly
    /// with `Fsync` (so also whether a group commit fsyncs).
    blocks: Option<Arc<Prep>>,
    /// Appending: where the chunk whose write-back was last started begins
    /// and ends ([`Writer::write_back`]).
    written_back: (u64, u64),
}

/// Appending (`--wal-fsync false`): the write-back of each this many bytes
/// is started as they are written, so a rotation's sync waits for at most
/// about this much, not a whole segment.
const WRITE_BACK_STEP: u64 = 4 << 20;

impl Writer {
    /// Creates segment `seq` (it must not exist): appended to, or a block
    /// segment whose header is synced before it is used.
    fn create(
        dir: &Path,
        seq: u64,
        blocks: Option<&Prep>,
        max_segment_bytes: u64,
    ) -> std::io::Result<(Arc<File>, u64)> {
        let path = dir.join(segment_name(seq));
        let mut options = OpenOptions::new();
        options.create_new(true);
        let (file, size) = match blocks {
            None => (options.append(true).open(&path)?, 0),
            Some(_) => {
                let mut file = options.write(true).open(&path)?;
                file.write_all(&blocks::file_header(seq))?;
                file.sync_all()?;
                (file, blocks::BLOCK)
            }
        };
        if let Ok(d) = File::open(dir) {
            d.sync_all()?;
        }
        let file = Arc::new(file);
        if let Some(prep) = blocks {
            let limit = blocks::align_up(max_segment_bytes) + blocks::BLOCK;
            prep.switch(file.clone(), size, limit);
        }
        Ok((file, size))
    }

    fn rotate(&mut self) -> std::io::Result<u64> {
        // Synced before the next segment exists: only the last segment
        // may end in a torn write.
        self.file.sync_all()?;
        let (file, size) = Writer::create(
            &self.dir,
            self.seq + 1,
            self.blocks.as_deref(),
            self.max_segment_bytes,
        )?;
        let old = std::mem::replace(&mut self.file, file);
        self.written_back = (0, 0);
        if self.blocks.is_some() {
            // The preparer moved to the new segment: drop the old one's
            // unused zeros (every batch in it is already synced).
            old.set_len(self.size)?;
            old.sync_all()?;
        }
        self.seq += 1;
        self.size = size;
        Ok(self.seq)
    }

    /// Appending: starts the write-back of what was written since the last
    /// call, without waiting for it, and drops the chunk before it from
    /// the page cache (written back by now; recovery is the only reader of
    /// the log). Without it a rotation's `sync_all` would write a whole
    /// segment while every append waits for the writer's lock, and the log
    /// would fill the page cache (which counts against a pod's memory).
    /// `POSIX_FADV_DONTNEED` starts write-back of dirty pages and drops
    /// clean ones; it is advice, so a failure changes nothing but timing.
    fn write_back(&mut self) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let (from, to) = (self.written_back.0, self.size);
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from)))
        else {
            return;
        };
        if let Err(e) = posix_fadvise(
            &*self.file,
            offset,
            len,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            tracing::debug!(error = %e, "WAL: write-back advice refused");
        }
        self.written_back = (self.written_back.1, to);
    }

    /// Cuts the segment back to `len` (a write that ran out of space).
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        let file = &self.file;
        self.written_back = (self.written_back.0.min(len), self.written_back.1.min(len));
        match &self.blocks {
            None => file.set_len(len),
            Some(prep) => prep.cut(len, || file.set_len(len)),
        }
    }

    /// Writes `bytes` (framed records) at the end of the segment.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let Some(prep) = &self.blocks else {
            (&*self.file).write_all(bytes)?;
            self.size += bytes.len() as u64;
            if self.size.saturating_sub(self.written_back.1) >= WRITE_BACK_STEP {
                self.write_back();
            }
            return Ok(());
        };
        let batch = blocks::batch(self.seq, self.size, bytes).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "WAL batch over 4 GiB")
        })?;
        let end = self.size + batch.len() as u64;
        prep.before_write(end);
        self.file.write_all_at(&batch, self.size)?;
        self.size = blocks::align_up(end);
        prep.written(self.size);
        Ok(())
    }
}

impl Wal {
    /// Opens the log for appending after [`recover`](super::recover): new
    /// records go to a new segment (so each segment has one layout).
    pub fn open(
        dir: &Path,
        durability: Durability,
        max_segment_bytes: u64,
    ) -> Result<Wal, WalError> {
        let prepare = crate::config::DEFAULT_WAL_PREPARE_BYTES;
        Self::open_with(dir, durability, max_segment_bytes, prepare)
    }

    /// [`Wal::open`] with `--wal-prepare-bytes`: with `Fsync`, the synced
    /// zeros kept ahead of the writer (0: none, the writer grows the file).
    pub fn open_with(
        dir: &Path,
        durability: Durability,
        max_segment_bytes: u64,
        prepare_bytes: u64,
    ) -> Result<Wal, WalError> {
        let (_, segs) = list(dir)?;
        let seq = segs.last().map_or(1, |s| s + 1);
        let max_segment_bytes = max_segment_bytes.max(1024);
        let fsync = durability == Durability::Fsync;
        let prep = fsync.then(|| Arc::new(Prep::new(prepare_bytes)));
        let (file, size) = Writer::create(dir, seq, prep.as_deref(), max_segment_bytes)
            .map_err(|e| WalError::io(format!("opening WAL in {}", dir.display()), &e))?;
        let prep = match prep {
            Some(prep) if prepare_bytes > 0 => {
                let p = prep.clone();
                let thread = std::thread::Builder::new()
                    .name("distcache-wal-prep".into())
                    .spawn(move || p.run())
                    .map_err(|e| WalError::io("WAL preparer thread".into(), &e))?;
                Some(Preparer {
                    prep,
                    thread: Mutex::new(Some(thread)),
                })
            }
            Some(prep) => Some(Preparer {
                prep,
                thread: Mutex::new(None),
            }),
            None => None,
        };
        let writer = Arc::new(Mutex::new(Writer {
            dir: dir.to_path_buf(),
            file,
            seq,
            size,
            max_segment_bytes,
            blocks: prep.as_ref().map(|p| p.prep.clone()),
            written_back: (0, 0),
        }));
        let (tx, rx) = mpsc::channel::<Job>();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let poisoned = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            writer,
            failed: failed.clone(),
            poisoned,
        });
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("distcache-wal".into())
            .spawn(move || writer_loop(&state, rx))
            .map_err(|e| WalError::io("WAL thread".into(), &e))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            failed,
            shared,
            direct: durability == Durability::Buffered,
            gate: tokio::sync::RwLock::new(()),
            thread: Mutex::new(Some(thread)),
            prep,
        })
    }

    /// Taken before logging a change and held until it is applied: a
    /// checkpoint rotates the log only while no change is between the two,
    /// so every record in the segments it replaces is in the state it
    /// takes. Never take a second one while holding one (a waiting
    /// checkpoint queues new holders behind it).
    pub async fn applying(&self) -> Applying<'_> {
        // Without a checkpoint at the gate (the usual case) no future is
        // polled; a waiting checkpoint makes `try_read` fail, and the
        // change queues behind it as before.
        match self.gate.try_read() {
            Ok(g) => g,
            Err(_) => self.gate.read().await,
        }
    }

    /// Why the last append failed, while the log refuses writes (out of space
    /// clears once a later append succeeds; any other failure is final).
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// Why the log failed for good, if it did: a write or fsync error other
    /// than running out of space. Nothing more is acknowledged from it (the
    /// kernel may have dropped the pages a failed fsync left dirty).
    pub fn poisoned(&self) -> Option<String> {
        self.shared
            .poisoned
            .load(Ordering::SeqCst)
            .then(|| self.failure().unwrap_or_default())
    }

    pub(super) fn send(&self, job: Job) -> Result<(), WalError> {
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) => tx.send(job).map_err(|_| WalError::Closed),
            None => Err(WalError::Closed),
        }
    }

    /// Appends `rec`; returns once it is written (and fsynced, if on).
    pub async fn append(&self, rec: &WalRecord) -> Result<(), WalError> {
        self.append_all(std::slice::from_ref(rec)).await
    }

    /// Appends `recs` in order as one unit of the group commit.
    pub async fn append_all(&self, recs: &[WalRecord]) -> Result<(), WalError> {
        let mut bytes = Vec::new();
        for r in recs {
            frame_into(&mut bytes, r)?;
        }
        self.append_framed(bytes).await
    }

    /// Appends already framed records as one unit of the group commit.
    /// Inside a [`Deferred`] scope the append waits for the scope's task to
    /// hand its queue over as one unit.
    pub async fn append_framed(&self, bytes: Vec<u8>) -> Result<(), WalError> {
        match Deferred::queue_with(|buf| {
            buf.extend_from_slice(&bytes);
            Ok(())
        }) {
            Some(outcome) => Self::wait(outcome).await,
            None => self.append_now(bytes).await,
        }
    }

    /// Appends the replicated ops `ops` (framed as by
    /// [`frame_ops_into`]) as one unit; inside a [`Deferred`] scope they
    /// are framed straight into the scope's queue.
    pub async fn append_ops(&self, ops: &[(u32, ReplOp)]) -> Result<(), WalError> {
        match Deferred::queue_with(|buf| frame_ops_into(buf, ops)) {
            Some(outcome) => Self::wait(outcome).await,
            None => {
                let mut framed = Vec::with_capacity(64 * ops.len());
                frame_ops_into(&mut framed, ops)?;
                self.append_now(framed).await
            }
        }
    }

    /// Waits for the flush of a [`Deferred`] queue that carries an append.
    async fn wait(outcome: Result<Outcome, WalError>) -> Result<(), WalError> {
        outcome?.await.map_err(|_| WalError::Closed)?
    }

    /// Writes `bytes` now (`Buffered`) or as one job of the group commit.
    async fn append_now(&self, bytes: Vec<u8>) -> Result<(), WalError> {
        if self.direct {
            return self.write_now(&bytes);
        }
        let (done, rx) = oneshot::channel();
        self.send(Job::Append(bytes, done))?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Queues `recs` without waiting for them (ordered with every other append).
    pub fn append_nowait(&self, recs: &[WalRecord]) {
        let mut bytes = Vec::new();
        for r in recs {
            if let Err(e) = frame_into(&mut bytes, r) {
                tracing::error!(error = %e, "WAL record not encodable");
            }
        }
        if self.direct {
            // A failure is recorded (and refuses later writes) by write_now.
            let _ = self.write_now(&bytes);
            return;
        }
        let (done, _rx) = oneshot::channel();
        let _ = self.send(Job::Append(bytes, done));
    }

    /// Hands every append queued on `deferred` to the log as one unit, in
    /// queue order (`Buffered`: one `write` now; `Fsync`: one job of the
    /// group commit); each waiter gets the outcome.
    pub fn flush_deferred(&self, deferred: &Deferred) {
        if self.direct {
            deferred.write_with(|bytes| self.write_now(bytes));
            return;
        }
        let Some((bytes, waiter)) = deferred.take() else {
            return;
        };
        if let Err(e) = self.send(Job::Append(bytes, waiter)) {
            // The job (and its waiter) came back with the error only in
            // the message: it is dropped, and each append sees the log closed.
            tracing::debug!(error = %e, "WAL closed before a grouped append");
        }
    }

    /// `Buffered`: writes `bytes` to the OS now, under the writer's lock
    /// (ordered with every other append and with rotations).
    fn write_now(&self, bytes: &[u8]) -> Result<(), WalError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let state = &self.shared;
        let mut w = state.writer.lock();
        if state.poisoned.load(Ordering::SeqCst) {
            let why = state.failed.lock().clone().unwrap_or_default();
            return Err(WalError::Failed(format!("WAL failed: {why}")));
        }
        let size_before = w.size;
        let mut result = w.write(bytes);
        if result.is_ok() && w.size > w.max_segment_bytes {
            result = w.rotate().map(|_| ());
        }
        state.settle(&mut w, result, size_before, false)
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
        if let Some(p) = &self.prep {
            p.prep.stop();
            if let Some(t) = p.thread.lock().take() {
                let _ = t.join();
            }
            // A log closed cleanly ends at its last batch: the prepared
            // zeros are given back (a crash leaves them; recovery reads
            // them as the segment's end).
            let w = self.shared.writer.lock();
            if let Err(e) = w.file.set_len(w.size).and_then(|()| w.file.sync_all()) {
                tracing::warn!(error = %e, "WAL: trimming the last segment on close");
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the thread and direct writers share.
#[derive(Debug)]
struct Shared {
    writer: Arc<Mutex<Writer>>,
    failed: Arc<Mutex<Option<String>>>,
    poisoned: Arc<AtomicBool>,
}

impl Shared {
    /// Records the outcome of one write (of one or more appends): out of
    /// space while writing (not while fsyncing) cuts the partial write off
    /// and refuses this batch only; any other error poisons the log.
    fn settle(
        &self,
        w: &mut Writer,
        result: std::io::Result<()>,
        size_before: u64,
        synced: bool,
    ) -> Result<(), WalError> {
        match result {
            Ok(()) => {
                self.failed.lock().take();
                Ok(())
            }
            Err(e) if !synced && e.raw_os_error() == Some(28) && w.cut(size_before).is_ok() => {
                w.size = size_before;
                let why = format!("{e} (in {})", w.dir.display());
                tracing::error!(error = %why, "WAL out of space: writes are refused until space returns");
                *self.failed.lock() = Some(why.clone());
                Err(WalError::Failed(format!(
                    "WAL out of space, write not acknowledged: {why}"
                )))
            }
            Err(e) => {
                let why = format!("{e} (in {})", w.dir.display());
                tracing::error!(error = %why, "WAL write failed: this node stops acknowledging writes");
                self.failed.lock().get_or_insert(why.clone());
                self.poisoned.store(true, Ordering::SeqCst);
                Err(WalError::Failed(format!(
                    "WAL failed, write not acknowledged: {why}"
                )))
            }
        }
    }
}

fn writer_loop(state: &Shared, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let mut w = state.writer.lock();
        if state.poisoned.load(Ordering::SeqCst) {
            let why = state.failed.lock().clone().unwrap_or_default();
            for job in jobs {
                refuse(job, &why);
            }
            continue;
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
                    let r = flush(&mut w, &mut buf).and_then(|()| w.rotate());
                    match r {
                        Ok(seq) => {
                            let _ = done.send(Ok(seq));
                        }
                        Err(e) => {
                            result = Err(e);
                            let _ = done.send(Err(WalError::Failed("WAL rotation failed".into())));
                        }
                    }
                }
            }
        }
        if result.is_ok() {
            result = flush(&mut w, &mut buf);
            if result.is_ok() && w.blocks.is_some() {
                synced = true;
                result = w.file.sync_data();
            }
            if result.is_ok() && w.size > w.max_segment_bytes {
                result = w.rotate().map(|_| ());
            }
        }
        let outcome = state.settle(&mut w, result, size_before, synced);
        for a in acks {
            let _ = a.send(outcome.clone());
        }
    }
}

fn refuse(job: Job, why: &str) {
    match job {
        Job::Append(_, done) => {
            let _ = done.send(Err(WalError::Failed(format!("WAL failed: {why}"))));
        }
        Job::Rotate(done) => {
            let _ = done.send(Err(WalError::Failed(format!("WAL failed: {why}"))));
        }
    }
}

fn flush(w: &mut Writer, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    w.write(buf)?;
    buf.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::wal::recover;

    /// With `--wal-fsync false` the write-back of each `WRITE_BACK_STEP`
    /// is started as it is written (so a rotation's sync is short), a
    /// rotation starts the count again, and every record reads back.
    #[tokio::test]
    async fn appending_starts_write_back_per_step_and_loses_nothing() {
        let dir = std::env::temp_dir().join(format!("dc-wal-wb-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let wal = Wal::open(&dir, Durability::Buffered, 8 << 20).expect("open");
        let rec = |i: u64| WalRecord::Ops {
            partition: (i % 271) as u32,
            ops: vec![ReplOp::Put {
                collection: "c".into(),
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from(vec![b'v'; 1000]),
                expires_at: 0,
            }],
        };
        let (mut n, mut seen_back) = (0u64, 0u64);
        while wal.shared.writer.lock().seq < 3 {
            let batch: Vec<WalRecord> = (n..n + 100).map(rec).collect();
            wal.append_all(&batch).await.expect("append");
            n += 100;
            let w = wal.shared.writer.lock();
            assert!(w.written_back.0 <= w.written_back.1 && w.written_back.1 <= w.size);
            assert!(
                w.size - w.written_back.1 < WRITE_BACK_STEP + 200 * 1024,
                "{w:?}"
            );
            seen_back = seen_back.max(w.written_back.1);
        }
        assert!(
            seen_back >= WRITE_BACK_STEP,
            "write-back never started: {seen_back}"
        );
        wal.close();
        let back = recover(&dir, false).expect("recover");
        assert_eq!(back.records.len() as u64, n);
        for (i, r) in back.records.iter().enumerate() {
            assert_eq!(r, &rec(i as u64));
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
