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
    let payload = rmp_serde::to_vec(rec).map_err(|e| WalError::Encode(e.to_string()))?;
    let len =
        u32::try_from(payload.len()).map_err(|_| WalError::Encode("record over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
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
