//! The engine's own commands and outcomes: what a client may ask of the
//! cache, independent of how it arrived. The gRPC layer (`grpc/convert.rs`)
//! maps protobuf to these and back; forwarding between nodes carries them
//! as they are (msgpack), so no protobuf crosses the engine.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::locking::Grant;

/// One data or lock command. Lock durations are resolved (defaults applied)
/// before a command is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Read one entry.
    Get {
        /// Collection name ("" = default).
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// Store one entry.
    Put {
        /// Collection name.
        collection: String,
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
        /// TTL, ms (None: the collection's default).
        ttl_ms: Option<u64>,
    },
    /// Remove one entry.
    Delete {
        /// Collection name.
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// Store a value only if the key holds no live entry.
    PutIfAbsent {
        /// Collection name.
        collection: String,
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
        /// TTL, ms (None: the collection's default).
        ttl_ms: Option<u64>,
    },
    /// Replace the value only if it equals `expected`.
    CompareAndSet {
        /// Collection name.
        collection: String,
        /// Key.
        key: Bytes,
        /// The value the key must hold.
        expected: Bytes,
        /// The new value.
        value: Bytes,
        /// TTL, ms (None: the collection's default).
        ttl_ms: Option<u64>,
    },
    /// Add `delta` to the decimal integer stored at the key (absent = 0).
    Increment {
        /// Collection name.
        collection: String,
        /// Key.
        key: Bytes,
        /// Amount added.
        delta: i64,
        /// TTL, ms (None: keep the entry's expiry).
        ttl_ms: Option<u64>,
    },
    /// Read several entries.
    GetMany {
        /// Collection name.
        collection: String,
        /// Keys.
        keys: Vec<Bytes>,
    },
    /// Store several entries.
    PutMany {
        /// Collection name.
        collection: String,
        /// (key, value) pairs.
        entries: Vec<(Bytes, Bytes)>,
        /// TTL, ms (None: the collection's default).
        ttl_ms: Option<u64>,
    },
    /// Remove several entries.
    DeleteMany {
        /// Collection name.
        collection: String,
        /// Keys.
        keys: Vec<Bytes>,
    },
    /// Take a lock, waiting up to `wait_ms`.
    Acquire {
        /// Lock key.
        key: Bytes,
        /// Lease, ms.
        hold_ms: u64,
        /// Longest wait, ms.
        wait_ms: u64,
    },
    /// Take a lock if it is free.
    TryAcquire {
        /// Lock key.
        key: Bytes,
        /// Lease, ms.
        hold_ms: u64,
    },
    /// Release a lock held with `token`.
    Release {
        /// Lock key.
        key: Bytes,
        /// Fencing token of the holder.
        token: u64,
    },
    /// Renew the lease of a lock held with `token`.
    Extend {
        /// Lock key.
        key: Bytes,
        /// Fencing token of the holder.
        token: u64,
        /// New lease, ms.
        hold_ms: u64,
    },
    /// Release a lock whoever holds it.
    ForceRelease {
        /// Lock key.
        key: Bytes,
    },
    /// Count the live entries of a collection, cluster-wide.
    Size {
        /// Collection name.
        collection: String,
        /// Only these partitions (None: all; a node asking a peer names them).
        partitions: Option<Vec<u32>>,
    },
    /// One page of the live keys of a collection, cluster-wide, in
    /// (partition, key) order.
    Keys {
        /// Collection name.
        collection: String,
        /// Only these partitions (None: all).
        partitions: Option<Vec<u32>>,
        /// Start after this (partition, key) (the previous page's end).
        after: Option<(u32, Bytes)>,
        /// Most keys in the page.
        limit: u32,
    },
    /// Remove every entry of a collection, cluster-wide.
    Clear {
        /// Collection name.
        collection: String,
        /// Only these partitions (None: all).
        partitions: Option<Vec<u32>>,
    },
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Get: the value, if found.
    Value(Option<Bytes>),
    /// Put: stored.
    Stored,
    /// PutMany: stored.
    StoredMany,
    /// Delete: whether a live entry was removed.
    Deleted(bool),
    /// PutIfAbsent: whether the key was absent and now holds the value.
    Inserted(bool),
    /// CompareAndSet: whether the value was replaced.
    Swapped(bool),
    /// Increment: the new value.
    Counter(i64),
    /// GetMany: the entries found.
    Entries(Vec<(Bytes, Bytes)>),
    /// DeleteMany: how many live entries were removed.
    DeletedCount(u64),
    /// Acquire / Extend: the grant.
    Granted(Grant),
    /// TryAcquire: the grant, if the lock was free.
    MaybeGranted(Option<Grant>),
    /// Release: done.
    Released,
    /// ForceRelease: whether the lock was held.
    ForceReleased(bool),
    /// Size: live entries.
    Count(u64),
    /// Clear: entries removed.
    Cleared(u64),
    /// Keys: one page.
    KeysPage {
        /// Keys in (partition, key) order.
        keys: Vec<Bytes>,
        /// (partition, key) of the last key of the page.
        last: Option<(u32, Bytes)>,
        /// The page is full: more keys may follow `last`.
        more: bool,
    },
}

impl Outcome {
    /// The variant's name (for messages: never formats a value).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Value(_) => "Value",
            Outcome::Stored => "Stored",
            Outcome::StoredMany => "StoredMany",
            Outcome::Deleted(_) => "Deleted",
            Outcome::Inserted(_) => "Inserted",
            Outcome::Swapped(_) => "Swapped",
            Outcome::Counter(_) => "Counter",
            Outcome::Entries(_) => "Entries",
            Outcome::DeletedCount(_) => "DeletedCount",
            Outcome::Granted(_) => "Granted",
            Outcome::MaybeGranted(_) => "MaybeGranted",
            Outcome::Released => "Released",
            Outcome::ForceReleased(_) => "ForceReleased",
            Outcome::Count(_) => "Count",
            Outcome::Cleared(_) => "Cleared",
            Outcome::KeysPage { .. } => "KeysPage",
        }
    }
}

/// Where a command came from. A command from a peer was already forwarded
/// once: if this node is not the owner either, it answers NOT_OWNER rather
/// than forwarding again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client of this node.
    Client,
    /// Another node, forwarding a client's command to its owner.
    Peer,
}

/// How a command's keys are placed on partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace<'a> {
    /// Entries of the named collection.
    Collection(&'a str),
    /// Lock keys.
    Locks,
}

impl Command {
    /// The metric name of the command.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Get { .. } => "get",
            Command::Put { .. } => "put",
            Command::Delete { .. } => "delete",
            Command::PutIfAbsent { .. } => "put_if_absent",
            Command::CompareAndSet { .. } => "compare_and_set",
            Command::Increment { .. } => "increment",
            Command::GetMany { .. } => "get_many",
            Command::PutMany { .. } => "put_many",
            Command::DeleteMany { .. } => "delete_many",
            Command::Acquire { .. } => "lock_acquire",
            Command::TryAcquire { .. } => "lock_try_acquire",
            Command::Release { .. } => "lock_release",
            Command::Extend { .. } => "lock_extend",
            Command::ForceRelease { .. } => "lock_force_release",
            Command::Size { .. } => "size",
            Command::Keys { .. } => "keys",
            Command::Clear { .. } => "clear",
        }
    }

    /// Where the command's keys live.
    pub fn keyspace(&self) -> Keyspace<'_> {
        match self {
            Command::Get { collection, .. }
            | Command::Put { collection, .. }
            | Command::Delete { collection, .. }
            | Command::PutIfAbsent { collection, .. }
            | Command::CompareAndSet { collection, .. }
            | Command::Increment { collection, .. }
            | Command::GetMany { collection, .. }
            | Command::PutMany { collection, .. }
            | Command::DeleteMany { collection, .. }
            | Command::Size { collection, .. }
            | Command::Keys { collection, .. }
            | Command::Clear { collection, .. } => Keyspace::Collection(collection),
            _ => Keyspace::Locks,
        }
    }

    /// The key of a single-key command (None for batches).
    pub fn key(&self) -> Option<&Bytes> {
        match self {
            Command::Get { key, .. }
            | Command::Put { key, .. }
            | Command::Delete { key, .. }
            | Command::PutIfAbsent { key, .. }
            | Command::CompareAndSet { key, .. }
            | Command::Increment { key, .. }
            | Command::Acquire { key, .. }
            | Command::TryAcquire { key, .. }
            | Command::Release { key, .. }
            | Command::Extend { key, .. }
            | Command::ForceRelease { key } => Some(key),
            Command::GetMany { .. }
            | Command::PutMany { .. }
            | Command::DeleteMany { .. }
            | Command::Size { .. }
            | Command::Keys { .. }
            | Command::Clear { .. } => None,
        }
    }

    /// Whether the command changes state (refused at once without quorum).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Command::Get { .. }
                | Command::GetMany { .. }
                | Command::Size { .. }
                | Command::Keys { .. }
        )
    }

    /// Whether running the command twice leaves the same state as once (a
    /// blind write of the keys' new state).
    pub fn is_idempotent_write(&self) -> bool {
        matches!(
            self,
            Command::Put { .. }
                | Command::Delete { .. }
                | Command::PutMany { .. }
                | Command::DeleteMany { .. }
        )
    }

    /// Whether the command spans a whole collection (every partition).
    pub fn is_collection_wide(&self) -> bool {
        matches!(
            self,
            Command::Size { .. } | Command::Keys { .. } | Command::Clear { .. }
        )
    }

    /// Longest a client may have to wait for this command beyond the usual
    /// request timeout (an Acquire's wait).
    pub fn extra_wait_ms(&self) -> u64 {
        match self {
            Command::Acquire { wait_ms, .. } => *wait_ms,
            _ => 0,
        }
    }

    /// Splits a batch command into one command per group, grouping its
    /// items by `group(key)` (first-seen order within a group, groups in
    /// key order). A single-key command is one group.
    pub fn split_by<G: Ord, E>(
        self,
        mut group: impl FnMut(&Bytes) -> Result<G, E>,
    ) -> Result<Vec<(G, Command)>, E> {
        use std::collections::BTreeMap;
        fn by<G: Ord, T, E>(
            items: Vec<T>,
            key: impl Fn(&T) -> &Bytes,
            group: &mut impl FnMut(&Bytes) -> Result<G, E>,
        ) -> Result<BTreeMap<G, Vec<T>>, E> {
            let mut out: BTreeMap<G, Vec<T>> = BTreeMap::new();
            for item in items {
                out.entry(group(key(&item))?).or_default().push(item);
            }
            Ok(out)
        }
        Ok(match self {
            Command::GetMany { collection, keys } => by(keys, |k| k, &mut group)?
                .into_iter()
                .map(|(g, keys)| {
                    let collection = collection.clone();
                    (g, Command::GetMany { collection, keys })
                })
                .collect(),
            Command::DeleteMany { collection, keys } => by(keys, |k| k, &mut group)?
                .into_iter()
                .map(|(g, keys)| {
                    let collection = collection.clone();
                    (g, Command::DeleteMany { collection, keys })
                })
                .collect(),
            Command::PutMany {
                collection,
                entries,
                ttl_ms,
            } => by(entries, |(k, _)| k, &mut group)?
                .into_iter()
                .map(|(g, entries)| {
                    let collection = collection.clone();
                    (
                        g,
                        Command::PutMany {
                            collection,
                            entries,
                            ttl_ms,
                        },
                    )
                })
                .collect(),
            single => {
                let g = match single.key() {
                    Some(k) => group(k)?,
                    None => return Ok(Vec::new()),
                };
                vec![(g, single)]
            }
        })
    }
}

impl Outcome {
    /// Folds the outcome of one part of a split batch into `self`.
    pub fn merge(&mut self, part: Outcome) {
        match (self, part) {
            (Outcome::Entries(all), Outcome::Entries(more)) => all.extend(more),
            (Outcome::DeletedCount(all), Outcome::DeletedCount(more)) => *all += more,
            (slot, other) => *slot = other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn split_groups_items_and_keeps_their_order_within_a_group() {
        let cmd = Command::GetMany {
            collection: "c".into(),
            keys: vec![b("a1"), b("b1"), b("a2"), b("b2")],
        };
        let parts = cmd
            .split_by(|k| Ok::<_, ()>(k[0]))
            .expect("grouping never fails here");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].1,
            Command::GetMany {
                collection: "c".into(),
                keys: vec![b("a1"), b("a2")]
            }
        );
        assert_eq!(parts[1].0, b'b');
    }

    #[test]
    fn merge_sums_counts_and_concatenates_entries() {
        let mut n = Outcome::DeletedCount(2);
        n.merge(Outcome::DeletedCount(3));
        assert_eq!(n, Outcome::DeletedCount(5));
        let mut e = Outcome::Entries(vec![(b("a"), b("1"))]);
        e.merge(Outcome::Entries(vec![(b("b"), b("2"))]));
        assert_eq!(
            e,
            Outcome::Entries(vec![(b("a"), b("1")), (b("b"), b("2"))])
        );
    }
}
