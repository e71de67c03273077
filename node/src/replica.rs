//! What one replica sends another: the replicated form of a write
//! ([`ReplOp`]), a lock's replicated state, a whole partition's snapshot,
//! and what a local write changed ([`Written`]). Shared by storage, locks,
//! the write-ahead log and the peer protocol; imports nothing of them.

use bytes::Bytes;

/// One write as sent to backups. Expiry is absolute (wall-clock ms).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplOp {
    /// Store an entry.
    Put {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
        /// Wall-clock expiry, 0 = never.
        expires_at: u64,
    },
    /// Remove an entry.
    Delete {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// Remove every entry of a collection in the partition.
    Clear {
        /// Collection.
        collection: String,
    },
    /// Set a lock's replicated state.
    Lock {
        /// Lock key.
        key: Bytes,
        /// New state.
        state: LockReplica,
    },
}

/// A lock's state as replicated: holder token and remaining lease (ms), and
/// the fencing counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockReplica {
    /// Highest token issued for the key.
    pub fence: u64,
    /// Current holder: (token, lease ms left).
    pub holder: Option<(u64, u64)>,
}

/// (key, value, expires_at) of one entry in a snapshot.
pub type SnapshotEntry = (Bytes, Bytes, u64);

/// The whole state of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionSnapshot {
    /// (collection, [(key, value, expires_at)]).
    pub collections: Vec<(String, Vec<SnapshotEntry>)>,
    /// Locks of the partition.
    pub locks: Vec<(Bytes, LockReplica)>,
    /// The highest fencing token ever granted in the partition (released
    /// lock states are dropped; this keeps tokens increasing).
    #[serde(default)]
    pub lock_high_water: u64,
}

/// Ops, each with its partition: what a write plans and applies. Inline
/// for the usual one op (a write allocates no list for it).
pub type Ops = smallvec::SmallVec<[(u32, ReplOp); 1]>;

/// What a write changed, per partition, for replication.
#[derive(Debug, Default)]
pub struct Written {
    /// Ops applied, each with its partition, in order (including LRU
    /// evictions in the written partitions).
    pub ops: Ops,
    /// The LRU evictions among `ops` (logged after the fact).
    pub evicted: Vec<(u32, ReplOp)>,
    /// LRU evictions applied in other partitions than the written ones.
    pub evicted_elsewhere: Vec<(u32, ReplOp)>,
}

/// Splits a snapshot into chunks of about `max_bytes` of entries each (an
/// entry larger than that travels alone): the first carries the locks, the
/// order of entries within a collection is kept. Never empty.
pub fn chunk_snapshot(snapshot: PartitionSnapshot, max_bytes: usize) -> Vec<PartitionSnapshot> {
    let mut chunks = vec![PartitionSnapshot {
        collections: Vec::new(),
        locks: snapshot.locks,
        lock_high_water: snapshot.lock_high_water,
    }];
    let mut size: usize = chunks[0].locks.iter().map(|(k, _)| k.len() + 64).sum();
    for (name, entries) in snapshot.collections {
        let mut part: Vec<SnapshotEntry> = Vec::new();
        for e in entries {
            let n = e.0.len() + e.1.len() + name.len() + 32;
            if size + n > max_bytes && (size > 0 || !part.is_empty()) {
                if let Some(last) = chunks.last_mut()
                    && !part.is_empty()
                {
                    last.collections
                        .push((name.clone(), std::mem::take(&mut part)));
                }
                chunks.push(PartitionSnapshot::default());
                size = 0;
            }
            size += n;
            part.push(e);
        }
        if let Some(last) = chunks.last_mut() {
            last.collections.push((name, part));
        }
    }
    chunks
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    #[test]
    fn chunks_fit_and_keep_everything_in_order() {
        let entries: Vec<SnapshotEntry> = (0..1000u32)
            .map(|i| {
                (
                    Bytes::from(i.to_be_bytes().to_vec()),
                    Bytes::from(vec![1u8; 100]),
                    0,
                )
            })
            .collect();
        let snap = PartitionSnapshot {
            collections: vec![("a".into(), entries.clone()), ("b".into(), Vec::new())],
            locks: Vec::new(),
            lock_high_water: 9,
        };
        let chunks = chunk_snapshot(snap, 10_000);
        assert!(chunks.len() >= 12, "{} chunks", chunks.len());
        assert_eq!(chunks[0].lock_high_water, 9);
        let mut back = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for c in &chunks {
            let bytes: usize = c
                .collections
                .iter()
                .flat_map(|(_, es)| es.iter().map(|e| e.0.len() + e.1.len() + 33))
                .sum();
            assert!(bytes <= 10_000, "chunk of {bytes} bytes");
            for (n, es) in &c.collections {
                names.insert(n.clone());
                if n == "a" {
                    back.extend(es.iter().cloned());
                }
            }
        }
        assert_eq!(back, entries);
        assert!(names.contains("b"), "an empty collection still travels");
        let one = chunk_snapshot(PartitionSnapshot::default(), 10);
        assert_eq!(one.len(), 1);
    }
}
