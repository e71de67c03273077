//! One logged change and its framing (length, checksum, msgpack payload).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::WalError;
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

/// Frames one record.
pub fn frame(rec: &WalRecord) -> Result<Vec<u8>, WalError> {
    let mut out = Vec::new();
    frame_into(&mut out, rec)?;
    Ok(out)
}

/// Appends the framing of one record (anything that encodes as a
/// [`WalRecord`]) to `out`: the payload is encoded in place, then its length
/// and checksum are written in front of it.
pub(super) fn frame_into<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    rec: &T,
) -> Result<(), WalError> {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    if let Err(e) = rmp_serde::encode::write(out, rec) {
        out.truncate(start);
        return Err(WalError::Encode(e.to_string()));
    }
    let payload = &out[start + 8..];
    let Ok(len) = u32::try_from(payload.len()) else {
        out.truncate(start);
        return Err(WalError::Encode("record over 4 GiB".into()));
    };
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// `WalRecord::Ops` borrowing its writes: encodes to the same bytes.
#[derive(Serialize)]
enum OpsRef<'a> {
    Ops { partition: u32, ops: Run<'a> },
}

/// The ops of a run of `(partition, op)` pairs, encoded as a list of ops.
struct Run<'a>(&'a [(u32, ReplOp)]);

impl Serialize for Run<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(_, op)| op))
    }
}

/// Appends the framed `Ops` records of `ops` (one record per run of the same
/// partition, in order) to `out`, without copying any op.
pub fn frame_ops_into(out: &mut Vec<u8>, ops: &[(u32, ReplOp)]) -> Result<(), WalError> {
    let mut rest = ops;
    while let Some(&(partition, _)) = rest.first() {
        let run = rest.iter().take_while(|(p, _)| *p == partition).count();
        let (this, next) = rest.split_at(run);
        frame_into(
            out,
            &OpsRef::Ops {
                partition,
                ops: Run(this),
            },
        )?;
        rest = next;
    }
    Ok(())
}

/// Outcome of reading a file of records.
pub(super) enum Read_ {
    /// Every record complete.
    Clean(Vec<WalRecord>),
    /// The last record is incomplete: it starts at `good_len`.
    Torn(Vec<WalRecord>, u64),
    /// A complete record is damaged at `offset`.
    Corrupt(Vec<WalRecord>, u64, String),
}

pub(super) fn read_records(buf: &[u8]) -> Read_ {
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
