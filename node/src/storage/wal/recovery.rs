//! Reading a log back: the newest checkpoint, then the segments after it;
//! a torn tail is cut, other damage is an error naming file and offset.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::Path;

use super::blocks::{is_block_segment, read_blocks};
use super::record::{Read_, WalRecord, read_records};
use super::{WalError, checkpoint_name, list, segment_name};

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Records in order (checkpoint first, then segments).
    pub records: Vec<WalRecord>,
    /// Bytes cut off a torn last segment.
    pub truncated_bytes: u64,
}

/// Reads the log in `dir`: the newest checkpoint, then the segments from its
/// sequence on. A torn tail of the last segment is truncated; damage anywhere
/// else is an error naming the file and offset, unless `skip_corrupt`, which
/// stops at the last good record (and cuts the log there).
pub fn recover(dir: &Path, skip_corrupt: bool) -> Result<Recovered, WalError> {
    fs::create_dir_all(dir).map_err(|e| WalError::io(format!("wal dir {}", dir.display()), &e))?;
    let (checkpoints, segments) = list(dir)?;
    let mut rec = Recovered::default();
    let mut from = 0;
    if let Some(&cp) = checkpoints.last() {
        let path = dir.join(checkpoint_name(cp));
        let buf = read_all(&path)?;
        match read_records(&buf) {
            Read_::Clean(r) => rec.records = r,
            Read_::Torn(_, at) | Read_::Corrupt(_, at, _) => {
                return Err(WalError::Damaged(format!(
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
        match read_segment(&buf, *seq) {
            Read_::Clean(r) => rec.records.extend(r),
            Read_::Torn(r, at) if last => {
                rec.records.extend(r);
                // Zeros after the torn bytes (a block segment's prepared
                // space) were never written: not counted as cut.
                let written = buf.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
                rec.truncated_bytes = (written as u64).saturating_sub(at);
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
                return Err(WalError::Damaged(format!(
                    "WAL segment {} ends mid-record at offset {at} but is not the last segment \
                     (start with --wal-skip-corrupt to keep only what precedes it)",
                    path.display()
                )));
            }
            Read_::Corrupt(_, at, why) => {
                return Err(WalError::Damaged(format!(
                    "WAL segment {} is damaged at offset {at}: {why} \
                     (start with --wal-skip-corrupt to keep only what precedes it)",
                    path.display()
                )));
            }
        }
    }
    Ok(rec)
}

/// Reads segment `seq`: a block segment, or appended records. A file of
/// zeros only (a segment created and never written, whose header did not
/// reach the disk) reads as torn at 0.
fn read_segment(buf: &[u8], seq: u64) -> Read_ {
    if is_block_segment(buf) {
        read_blocks(buf, seq)
    } else if !buf.is_empty() && buf.iter().all(|b| *b == 0) {
        Read_::Torn(Vec::new(), 0)
    } else {
        read_records(buf)
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>, WalError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| WalError::io(format!("reading {}", path.display()), &e))?;
    Ok(buf)
}

fn truncate(path: &Path, len: u64) -> Result<(), WalError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| WalError::io(format!("truncating {}", path.display()), &e))
}
