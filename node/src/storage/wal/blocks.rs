//! Block segments, the layout of the log with `--wal-fsync true`.
//!
//! Appending to a file makes every `fdatasync` commit the file's new size
//! to the filesystem journal as well as the data. Overwriting space that is
//! already written (synced zeros) needs no such commit. Session 17 measured
//! a write of one group commit plus its `fdatasync` on this VM's ext4 at
//! 111-115 µs into synced zeros against 140-218 µs appending. So with
//! fsync on, a segment is written in place: a preparer thread keeps some
//! synced zeros ahead of the writer ([`Prep`]), and each group commit is
//! one *batch* at the next sector (512-byte) boundary:
//!
//! ```text
//! block 0:  FILE_MAGIC | seq u64 LE | crc32(magic, seq) u32 LE | zeros
//! batch at offset X (X % SECTOR == 0):
//!           BATCH_MAGIC u32 | len u32 | crc32(seq, X, records) u32 | crc32(first 12 bytes) u32
//!           records (the usual framing, `len` bytes), zeros to the next block
//! ```
//!
//! Starting each batch on its own sector means no sector holding an earlier
//! (acknowledged) batch is ever written again, so a torn sector write can
//! only hit the batch being written. The segment ends at the first sector
//! boundary with all zeros from there
//! to the end of the file. After a crash, the last group commit may be on
//! disk in part, in any order of its pages: the writer writes a batch only
//! after the previous batch's `fdatasync` returned, so only that last batch
//! can be incomplete, and nothing valid follows it. Recovery therefore
//! reads a bad batch as a torn tail (cut, never acknowledged) only when no
//! valid batch follows it and it looks cut short (the file ends in it, or a
//! sector of it is unwritten). Any other bad batch is damage to
//! acknowledged data, reported with the file and offset (RELIABILITY.md
//! row 11). The sequence number and the offset in each
//! batch's checksum make a stale or misplaced block read as bad, never as
//! a batch of this segment.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::record::{Read_, WalRecord, read_records};

/// The size of the file header block.
pub(super) const BLOCK: u64 = 4096;
/// Alignment of batches.
pub(super) const SECTOR: u64 = 512;
const FILE_MAGIC: [u8; 8] = *b"DCWAL2\r\n";
/// The file header's bytes: magic, sequence number, CRC (zeros follow).
const FILE_HEADER: usize = 20;
const BATCH_MAGIC: u32 = 0xDC5A_B10C;
const BATCH_HEADER: usize = 16;
/// Most zeros written (and synced) per step of the preparer.
const CHUNK: u64 = 1 << 20;
/// Free space the preparer never takes: the rest of the node (its metadata
/// log, checkpoints) and other users of the volume keep it, and near a full
/// disk the writer appends into real space as before.
const RESERVE: u64 = 64 << 20;

pub(super) fn align_up(at: u64) -> u64 {
    at.div_ceil(SECTOR) * SECTOR
}

/// The first block of segment `seq`.
pub(super) fn file_header(seq: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    out[..8].copy_from_slice(&FILE_MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..FILE_HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Whether `buf` (a segment's bytes) is in this layout.
pub(super) fn is_block_segment(buf: &[u8]) -> bool {
    buf.starts_with(&FILE_MAGIC)
}

fn batch_crc(seq: u64, at: u64, records: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&at.to_le_bytes());
    h.update(records);
    h.finalize()
}

/// The batch carrying `records` (framed records) at offset `at` of segment
/// `seq`; `None` if they are over 4 GiB.
pub(super) fn batch(seq: u64, at: u64, records: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(records.len()).ok()?;
    let mut out = Vec::with_capacity(BATCH_HEADER + records.len());
    out.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&batch_crc(seq, at, records).to_le_bytes());
    let hcrc = crc32fast::hash(&out);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(records);
    Some(out)
}

fn word(buf: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The end of the valid batch at `at`, if there is one.
fn batch_at(buf: &[u8], at: usize, seq: u64) -> Option<usize> {
    let head = buf.get(at..at.checked_add(BATCH_HEADER)?)?;
    if word(head, 0) != BATCH_MAGIC || word(head, 12) != crc32fast::hash(&head[..12]) {
        return None;
    }
    let start = at + BATCH_HEADER;
    let end = start.checked_add(word(head, 4) as usize)?;
    let records = buf.get(start..end)?;
    (batch_crc(seq, at as u64, records) == word(head, 8)).then_some(end)
}

/// Reads a block segment named with sequence `seq`.
pub(super) fn read_blocks(buf: &[u8], seq: u64) -> Read_ {
    let header = file_header(seq);
    if buf.len() < BLOCK as usize && header.starts_with(&buf[..buf.len().min(FILE_HEADER)]) {
        // The header block itself was cut short: no batch was ever in it.
        return Read_::Torn(Vec::new(), 0);
    }
    if buf.len() < BLOCK as usize || buf[..FILE_HEADER] != header[..FILE_HEADER] {
        return Read_::Corrupt(
            Vec::new(),
            0,
            format!("block segment header does not name sequence {seq}"),
        );
    }
    let mut records = Vec::new();
    let mut at = BLOCK as usize;
    while at < buf.len() {
        let Some(end) = batch_at(buf, at, seq) else {
            return tail(buf, at, seq, records);
        };
        match read_records(&buf[at + BATCH_HEADER..end]) {
            Read_::Clean(r) => records.extend(r),
            Read_::Torn(_, _) | Read_::Corrupt(_, _, _) => {
                return Read_::Corrupt(
                    records,
                    at as u64,
                    "batch checksum matches but its records do not decode".into(),
                );
            }
        }
        at = align_up(end as u64) as usize;
    }
    Read_::Clean(records)
}

/// What follows the last valid batch, at `at`: zeros to the end are the
/// segment's end; a bad batch with a valid one after it is damage; a bad
/// last batch is the torn last group commit if it looks cut short
/// ([`cut_short`]), else damage.
fn tail(buf: &[u8], at: usize, seq: u64, records: Vec<WalRecord>) -> Read_ {
    if buf[at..].iter().all(|b| *b == 0) {
        return Read_::Clean(records);
    }
    let later = (at + SECTOR as usize..buf.len())
        .step_by(SECTOR as usize)
        .find(|y| batch_at(buf, *y, seq).is_some());
    match later {
        Some(y) => Read_::Corrupt(
            records,
            at as u64,
            format!("bad batch, and a valid batch follows at offset {y}"),
        ),
        None if cut_short(buf, at) => Read_::Torn(records, at as u64),
        None => Read_::Corrupt(
            records,
            at as u64,
            "the last batch is damaged (checksum mismatch, every sector of it written)".into(),
        ),
    }
}

/// Whether the bad batch at `at` looks like a write cut short rather than
/// damaged bytes: the file ends inside it, or a sector of it is unwritten
/// (zeros). A `pwrite` interrupted by SIGKILL stops at a page boundary, and
/// after a power loss each sector holds its new bytes or its old zeros, so
/// a torn batch always has one of these. A batch whose sectors all hold
/// data but whose checksum fails was damaged after it was written. (A
/// value with 512 zero bytes at a sector boundary can make damage look
/// torn; etcd's WAL uses the same test.)
fn cut_short(buf: &[u8], at: usize) -> bool {
    let unwritten = |from: usize, to: usize| buf[from..to].iter().all(|b| *b == 0);
    let Some(head) = buf.get(at..at + BATCH_HEADER) else {
        return true;
    };
    if word(head, 0) != BATCH_MAGIC || word(head, 12) != crc32fast::hash(&head[..12]) {
        return unwritten(at, (at + SECTOR as usize).min(buf.len()));
    }
    let end = at + BATCH_HEADER + word(head, 4) as usize;
    if end > buf.len() {
        return true;
    }
    (at..end)
        .step_by(SECTOR as usize)
        .any(|s| unwritten(s, (s + SECTOR as usize).min(end)))
}

/// The preparer: keeps `ahead` bytes (`--wal-prepare-bytes`) of synced
/// zeros past what the writer wrote in the current segment, [`CHUNK`] at a
/// time, on its own thread (owned by the [`Wal`](super::Wal), stopped by
/// its `close`).
#[derive(Debug)]
pub(super) struct Prep {
    state: Mutex<PrepState>,
    cv: Condvar,
    ahead: u64,
}

#[derive(Debug, Default)]
struct PrepState {
    /// The current segment.
    file: Option<Arc<File>>,
    /// Where the writer has written to.
    written: u64,
    /// Everything below is written: synced zeros, or the writer's batches.
    zeroed: u64,
    /// Zeros are not written past this (the segment's size limit).
    limit: u64,
    /// A chunk is being written from `zeroed`: the writer must not write past `zeroed`.
    filling: bool,
    /// A chunk failed (e.g. out of space): no more in this segment.
    paused: bool,
    stop: bool,
}

impl Prep {
    /// A preparer keeping `ahead` bytes of zeros ahead (0: none).
    pub(super) fn new(ahead: u64) -> Self {
        Prep {
            state: Mutex::default(),
            cv: Condvar::new(),
            ahead,
        }
    }

    /// A new segment, written from `start`, whose zeros stop at `limit`.
    pub(super) fn switch(&self, file: Arc<File>, start: u64, limit: u64) {
        let mut s = self.state.lock();
        self.cv.wait_while(&mut s, |s| s.filling);
        s.file = Some(file);
        s.written = start;
        s.zeroed = start;
        s.limit = limit;
        s.paused = false;
        self.cv.notify_all();
    }

    /// Called before the writer writes up to `end`: past the zeros it waits
    /// for a chunk being written, and the zeros start after its write.
    pub(super) fn before_write(&self, end: u64) {
        let mut s = self.state.lock();
        if end > s.zeroed {
            self.cv.wait_while(&mut s, |s| s.filling);
            s.zeroed = s.zeroed.max(end);
        }
    }

    /// The writer has written up to `end`.
    pub(super) fn written(&self, end: u64) {
        let mut s = self.state.lock();
        s.written = end;
        if s.zeroed < end.saturating_add(self.ahead) {
            self.cv.notify_all();
        }
    }

    /// Runs `cut` (which shortens the file to `len`) with no chunk being
    /// written.
    pub(super) fn cut(
        &self,
        len: u64,
        cut: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut s = self.state.lock();
        self.cv.wait_while(&mut s, |s| s.filling);
        s.written = len;
        s.zeroed = s.zeroed.min(len);
        cut()
    }

    pub(super) fn stop(&self) {
        self.state.lock().stop = true;
        self.cv.notify_all();
    }

    /// The preparer thread's loop, until [`Prep::stop`].
    pub(super) fn run(&self) {
        let chunk = CHUNK.min(self.ahead).max(1);
        let zeros = vec![0u8; chunk as usize];
        loop {
            let (file, from, to) = {
                let mut s = self.state.lock();
                self.cv
                    .wait_while(&mut s, |s| !s.stop && !Self::wanted(s, self.ahead));
                if s.stop {
                    return;
                }
                let Some(file) = s.file.clone() else { continue };
                s.filling = true;
                (file, s.zeroed, (s.zeroed + chunk).min(s.limit))
            };
            let len = (to - from) as usize;
            let result = Self::room(&file, len as u64)
                .and_then(|()| file.write_all_at(&zeros[..len], from))
                .and_then(|()| file.sync_data());
            let mut s = self.state.lock();
            match result {
                Ok(()) => s.zeroed = s.zeroed.max(to),
                Err(e) => {
                    // Give the space back; the writer appends past the zeros.
                    let _ = file.set_len(from);
                    s.paused = true;
                    tracing::info!(error = %e, "WAL: not preparing more of this segment; writes append");
                }
            }
            s.filling = false;
            self.cv.notify_all();
        }
    }

    /// Whether `len` more bytes leave [`RESERVE`] free on the volume.
    fn room(file: &File, len: u64) -> std::io::Result<()> {
        let st = nix::sys::statvfs::fstatvfs(file).map_err(std::io::Error::from)?;
        let free = st.blocks_available().saturating_mul(st.fragment_size());
        if free < len.saturating_add(RESERVE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("{free} bytes free, {RESERVE} kept free"),
            ));
        }
        Ok(())
    }

    fn wanted(s: &PrepState, ahead: u64) -> bool {
        s.file.is_some()
            && !s.filling
            && !s.paused
            && s.zeroed < s.limit
            && s.zeroed < s.written.saturating_add(ahead)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use bytes::Bytes;

    use super::*;
    use crate::replica::ReplOp;
    use crate::storage::wal::{Durability, Wal, frame, list, recover, segment_name};

    fn put(i: u64, len: usize) -> WalRecord {
        WalRecord::Ops {
            partition: (i % 7) as u32,
            ops: vec![ReplOp::Put {
                collection: "c".into(),
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from(vec![b'v'; len]),
                // Not 0: the last byte of a record is not a zero.
                expires_at: 1 + i,
            }],
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dc-blocks-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("dir");
        d
    }

    /// A block segment `seq` holding one batch per record of `recs`, as the
    /// writer lays it out, followed by `zeros` bytes of prepared space;
    /// returns it and each batch's offset.
    fn segment(seq: u64, recs: &[WalRecord], zeros: usize) -> (Vec<u8>, Vec<usize>) {
        let mut buf = file_header(seq);
        let mut starts = Vec::new();
        for r in recs {
            let at = buf.len() as u64;
            starts.push(at as usize);
            let b = batch(seq, at, &frame(r).expect("frame")).expect("batch");
            buf.extend_from_slice(&b);
            buf.resize(align_up(buf.len() as u64) as usize, 0);
        }
        buf.resize(buf.len() + zeros, 0);
        (buf, starts)
    }

    fn recover_file(dir: &Path, seq: u64, buf: &[u8]) -> Result<Vec<WalRecord>, String> {
        for s in list(dir).expect("list").1 {
            fs::remove_file(dir.join(segment_name(s))).expect("rm");
        }
        fs::write(dir.join(segment_name(seq)), buf).expect("write");
        recover(dir, false)
            .map(|r| r.records)
            .map_err(|e| e.to_string())
    }

    /// With fsync on, concurrent appends go out as block batches; rotation
    /// trims each finished segment to its batches, and closing the log the
    /// last one; everything reads back
    /// in order, and a second open starts a new segment (here appended to,
    /// with fsync off) that reads back after it.
    #[tokio::test]
    async fn fsync_segments_round_trip_rotate_and_reopen() {
        let dir = tmpdir("rt");
        let wal = std::sync::Arc::new(Wal::open(&dir, Durability::Fsync, 16 << 10).expect("open"));
        for round in 0..10u64 {
            let appends = (0..30u64).map(|i| {
                let wal = wal.clone();
                async move { wal.append(&put(round * 30 + i, 100)).await }
            });
            for r in futures::future::join_all(appends).await {
                r.expect("append");
            }
        }
        wal.close();
        let (_, segs) = list(&dir).expect("list");
        assert!(segs.len() > 2, "rotated: {segs:?}");
        // Finished segments are trimmed by rotation, the last one by close.
        for s in &segs {
            let buf = fs::read(dir.join(segment_name(*s))).expect("read");
            assert!(is_block_segment(&buf), "segment {s} is a block segment");
            assert_eq!(buf.len() as u64 % SECTOR, 0, "trimmed to a sector");
            let last_sector = &buf[buf.len() - SECTOR as usize..];
            assert!(
                last_sector.iter().any(|b| *b != 0),
                "segment {s}: no prepared zeros left after its last batch ({} bytes)",
                buf.len()
            );
        }
        let mut got = recover(&dir, false).expect("recover").records;
        assert_eq!(got.len(), 300);
        // Concurrent appends may be grouped in any order: compare as sets.
        let mut want: Vec<WalRecord> = (0..300).map(|i| put(i, 100)).collect();
        let key = |r: &WalRecord| format!("{r:?}");
        got.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(got, want);

        let wal = Wal::open(&dir, Durability::Buffered, 64 << 20).expect("reopen");
        wal.append(&put(1_000, 10)).await.expect("append");
        wal.close();
        let (_, after) = list(&dir).expect("list");
        assert_eq!(after.len(), segs.len() + 1, "reopening starts a segment");
        let rec = recover(&dir, false).expect("recover").records;
        assert_eq!(rec.len(), 301);
        assert_eq!(rec.last(), Some(&put(1_000, 10)));
        let _ = fs::remove_dir_all(&dir);
    }

    /// `--wal-prepare-bytes 0`: block segments without prepared zeros (the
    /// writer grows the file), read back the same.
    #[tokio::test]
    async fn without_prepared_zeros_the_writer_grows_the_segment() {
        let dir = tmpdir("noprep");
        let wal = Wal::open_with(&dir, Durability::Fsync, 64 << 20, 0).expect("open");
        for i in 0..50 {
            wal.append(&put(i, 100)).await.expect("append");
        }
        let buf = fs::read(dir.join(segment_name(1))).expect("read");
        assert!(is_block_segment(&buf));
        assert_ne!(
            buf.last(),
            Some(&0),
            "no zeros past the last batch while open"
        );
        wal.close();
        let rec = recover(&dir, false).expect("recover").records;
        assert_eq!(rec, (0..50).map(|i| put(i, 100)).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&dir);
    }

    /// The last batch on disk in part: the file cut at every 97th byte of
    /// it, or any one of its sectors never written before prepared zeros
    /// (pages reach the disk in any order): recovery keeps exactly the
    /// batches before it, cuts the segment there, and the next recovery
    /// reads it clean.
    #[test]
    fn a_torn_last_batch_keeps_exactly_the_batches_before_it() {
        let dir = tmpdir("torn");
        // The last record spans three blocks.
        let recs: Vec<WalRecord> = (0..6).map(|i| put(i, 50)).chain([put(6, 9_000)]).collect();
        let (full, starts) = segment(1, &recs, 8 * BLOCK as usize);
        let last = starts[6];
        let end = last + BATCH_HEADER + frame(&recs[6]).expect("frame").len();
        let mut cases = Vec::new();
        for cut in (last + 1..end).step_by(97).chain([end - 1]) {
            cases.push((format!("file cut at {cut}"), full[..cut].to_vec()));
        }
        for sector in (last..end).step_by(SECTOR as usize) {
            let mut buf = full.clone();
            buf[sector..sector + SECTOR as usize].fill(0);
            cases.push((format!("sector at {sector} unwritten"), buf));
        }
        for (what, buf) in cases {
            let got = recover_file(&dir, 1, &buf).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, recs[..6], "{what}");
            let len = fs::metadata(dir.join(segment_name(1))).expect("meta").len();
            assert_eq!(len as usize, last, "{what}: cut at the torn batch");
            let again = recover(&dir, false).expect("second recovery").records;
            assert_eq!(again, recs[..6], "{what}: clean after the cut");
        }
        // Complete, with prepared zeros after it: everything, nothing cut.
        assert_eq!(recover_file(&dir, 1, &full).expect("clean"), recs);
        let len = fs::metadata(dir.join(segment_name(1))).expect("meta").len();
        assert_eq!(len as usize, full.len(), "a clean end is not cut");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Damage with a valid batch after it is reported with file and
    /// offset, never read as a torn tail: a flipped bit, a batch header
    /// never written (a lost block), in the last segment or an earlier one.
    /// `--wal-skip-corrupt` keeps what precedes it.
    #[test]
    fn damage_before_a_valid_batch_is_reported_with_file_and_offset() {
        let dir = tmpdir("damage");
        let recs: Vec<WalRecord> = (0..8).map(|i| put(i, 200)).collect();
        let (full, starts) = segment(1, &recs, 2 * BLOCK as usize);
        let bad = starts[3];
        let damaged = [
            ("payload bit", bad + BATCH_HEADER + 20),
            ("length bit", bad + 5),
            ("magic bit", bad),
        ];
        for (what, byte) in damaged {
            let mut buf = full.clone();
            buf[byte] ^= 0x10;
            let err = recover_file(&dir, 1, &buf).expect_err(what);
            assert!(
                err.contains("wal-00000000000000000001.log")
                    && err.contains(&format!("offset {bad}")),
                "{what}: {err}"
            );
            let kept = recover(&dir, true).expect("skip corrupt").records;
            assert_eq!(kept, recs[..3], "{what}: skip keeps what precedes");
        }
        let mut lost = full.clone();
        lost[bad..bad + SECTOR as usize].fill(0);
        let err = recover_file(&dir, 1, &lost).expect_err("lost block");
        assert!(err.contains(&format!("offset {bad}")), "{err}");
        // The last batch, every sector of it written: a flipped bit in its
        // payload or header is damage too, not a torn tail.
        let last = starts[7];
        for (what, byte) in [
            ("last payload", last + BATCH_HEADER + 20),
            ("last magic", last),
        ] {
            let mut buf = full.clone();
            buf[byte] ^= 0x10;
            let err = recover_file(&dir, 1, &buf).expect_err(what);
            assert!(err.contains(&format!("offset {last}")), "{what}: {err}");
        }
        // In a segment that is not the last, even a bad last batch is damage.
        let mut torn = full.clone();
        torn[starts[7] + BATCH_HEADER + 3] ^= 1;
        for s in list(&dir).expect("list").1 {
            fs::remove_file(dir.join(segment_name(s))).expect("rm");
        }
        fs::write(dir.join(segment_name(1)), &torn).expect("write");
        fs::write(dir.join(segment_name(2)), segment(2, &[put(9, 1)], 0).0).expect("write");
        let err = recover(&dir, false)
            .expect_err("not the last segment")
            .to_string();
        assert!(err.contains("wal-00000000000000000001.log"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A batch is valid only in its own segment and at its own offset: a
    /// stale or misplaced block (another segment's batch, or this
    /// segment's batch copied elsewhere) after the end is never replayed.
    /// Right at the end, with every sector written, it is reported as
    /// damage; after an unwritten sector it is cut as a torn tail. A
    /// header naming another segment is reported.
    #[test]
    fn stale_or_misplaced_batches_are_never_replayed() {
        let dir = tmpdir("stale");
        let recs: Vec<WalRecord> = (0..4).map(|i| put(i, 30)).collect();
        let (mine, starts) = segment(2, &recs, 4 * BLOCK as usize);
        let end = starts[3] + SECTOR as usize;
        let (other, other_starts) = segment(1, &[put(99, 30)], 0);
        let mut buf = mine.clone();
        let o = other_starts[0];
        buf[end..end + SECTOR as usize].copy_from_slice(&other[o..o + SECTOR as usize]);
        let err = recover_file(&dir, 2, &buf).expect_err("stale");
        assert!(err.contains(&format!("offset {end}")), "{err}");
        assert_eq!(recover(&dir, true).expect("skip").records, recs);
        let mut buf = mine.clone();
        let s = starts[1];
        buf.copy_within(s..s + BLOCK as usize, end + BLOCK as usize);
        assert_eq!(recover_file(&dir, 2, &buf).expect("misplaced"), recs);
        let err = recover_file(&dir, 3, &mine).expect_err("header names 2");
        assert!(err.contains("sequence 3"), "{err}");
        // A segment created and never written (its header not on disk), or
        // whose header block was cut short: empty, cut to nothing.
        let got = recover_file(&dir, 5, &vec![0u8; BLOCK as usize]).expect("empty");
        assert!(got.is_empty());
        for cut in [8, 20, 1000] {
            let got = recover_file(&dir, 5, &file_header(5)[..cut]).expect("short header");
            assert!(got.is_empty(), "cut at {cut}");
            let len = fs::metadata(dir.join(segment_name(5))).expect("meta").len();
            assert_eq!(len, 0, "cut to nothing");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// The preparer writes synced zeros ahead of the writer, never over
    /// what the writer wrote, stays within the segment's limit, and stops.
    #[test]
    fn the_preparer_stays_ahead_of_the_writer_and_within_the_limit() {
        let dir = tmpdir("prep");
        let path = dir.join("seg");
        let file = Arc::new(
            fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .expect("open"),
        );
        let prep = Arc::new(Prep::new(4 << 20));
        let limit = 3 * CHUNK + BLOCK;
        prep.switch(file.clone(), BLOCK, limit);
        let p = prep.clone();
        let thread = std::thread::spawn(move || p.run());
        let mut at = BLOCK;
        for i in 0..200u64 {
            let data = vec![(i % 250 + 1) as u8; 10_000];
            let end = at + data.len() as u64;
            prep.before_write(end);
            file.write_all_at(&data, at).expect("write");
            at = align_up(end);
            prep.written(at);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        prep.stop();
        thread.join().expect("preparer stops");
        let buf = fs::read(&path).expect("read");
        let mut at = BLOCK as usize;
        for i in 0..200u64 {
            let want = (i % 250 + 1) as u8;
            assert!(
                buf[at..at + 10_000].iter().all(|b| *b == want),
                "write {i} intact"
            );
            at = align_up((at + 10_000) as u64) as usize;
        }
        assert!(buf.len() as u64 <= limit.max(at as u64), "{}", buf.len());
        assert!(buf.len() > at, "zeros prepared past the writes");
        let _ = fs::remove_dir_all(&dir);
    }
}
