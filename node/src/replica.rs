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

/// What a write changed, per partition, for replication.
#[derive(Debug, Default)]
pub struct Written {
    /// Ops applied, each with its partition, in order (including LRU
    /// evictions in the written partitions).
    pub ops: Vec<(u32, ReplOp)>,
    /// The LRU evictions among `ops` (logged after the fact).
    pub evicted: Vec<(u32, ReplOp)>,
    /// LRU evictions applied in other partitions than the written ones.
    pub evicted_elsewhere: Vec<(u32, ReplOp)>,
}
