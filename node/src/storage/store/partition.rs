//! Whole-partition operations: applying replicated ops, snapshots, digests,
//! dropping and (un)indexing a partition, and the expiry sweep.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Entry, EntryMap, PartitionData, Store, cost, secs};
use crate::replica::{PartitionSnapshot, ReplOp};

/// Accounted bytes of one collection's entries in a partition.
fn total(map: &EntryMap) -> usize {
    map.values().map(cost).sum()
}

impl Store {
    // ------------------------------------------------------------ replication

    /// Applies a primary's writes to this node's backup copy of `p`
    /// (no LRU bookkeeping: the primary decides evictions).
    pub fn apply(&self, p: u32, ops: &[ReplOp]) {
        let now = self.clock.wall_ms();
        let mut part = self.partitions[p as usize].write();
        for op in ops {
            match op {
                ReplOp::Put {
                    collection,
                    key,
                    value,
                    expires_at,
                } => {
                    let name = self.intern(collection);
                    let entry = Entry::new(key, value, *expires_at, secs(now));
                    let add = cost(&entry);
                    let old = part.entry(name).or_default().insert(entry);
                    self.charge(add, old.as_ref().map_or(0, cost));
                }
                ReplOp::Delete { collection, key } => {
                    if let Some(old) = part
                        .get_mut(collection.as_str())
                        .and_then(|map| map.remove(key))
                    {
                        self.charge(0, cost(&old));
                    }
                }
                ReplOp::Clear { collection } => {
                    if let Some(map) = part.remove(collection.as_str()) {
                        self.charge(0, total(&map));
                    }
                }
                ReplOp::Lock { .. } => {}
            }
        }
    }

    fn intern(&self, name: &str) -> Arc<str> {
        self.collections
            .read()
            .get(name)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| Arc::from(name))
    }

    /// The whole state of partition `p` (entries only; locks are added by the node).
    pub fn snapshot(&self, p: u32) -> PartitionSnapshot {
        let part = self.partitions[p as usize].read();
        PartitionSnapshot {
            collections: part
                .iter()
                .map(|(name, map)| {
                    (
                        name.to_string(),
                        map.iter()
                            .map(|(_, e)| (e.key_bytes(), e.value_bytes(), e.expires_at))
                            .collect(),
                    )
                })
                .collect(),
            locks: Vec::new(),
            lock_high_water: 0,
        }
    }

    /// Replaces partition `p` with `snap` (a backup receiving a full copy).
    pub fn install(&self, p: u32, snap: &PartitionSnapshot) {
        let now = self.clock.wall_ms();
        let mut data = PartitionData::new();
        for (name, entries) in &snap.collections {
            let map = entries
                .iter()
                .map(|(k, v, exp)| Entry::new(k, v, *exp, secs(now)))
                .collect();
            data.insert(self.intern(name), map);
        }
        self.unindex_partition(p);
        let add: usize = data.values().map(total).sum();
        let old = std::mem::replace(&mut *self.partitions[p as usize].write(), data);
        self.charge(add, old.values().map(total).sum());
    }

    /// An order-independent digest of partition `p`'s live entries.
    pub fn digest(&self, p: u32) -> u64 {
        let now = self.clock.wall_ms();
        let part = self.partitions[p as usize].read();
        let mut d = 0u64;
        for (name, map) in part.iter() {
            for (k, e) in map.iter().filter(|(_, e)| e.live(now)) {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                h.update(name.as_bytes());
                h.update(&[0xFF]);
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k);
                h.update(e.value());
                h.update(&e.expires_at.to_le_bytes());
                d = d.wrapping_add(h.digest());
            }
        }
        d
    }

    /// Drops partition `p`'s data (no longer a replica of it).
    pub fn drop_partition(&self, p: u32) {
        self.unindex_partition(p);
        let old = std::mem::take(&mut *self.partitions[p as usize].write());
        self.charge(0, old.values().map(total).sum());
    }

    /// Enters partition `p`'s entries of capped collections into their LRU
    /// order (this node became its primary).
    pub fn index_partition(&self, p: u32) {
        let part = self.partitions[p as usize].read();
        for meta in self.collections.read().values() {
            let (Some(lru), Some(map)) = (&meta.lru, part.get(&*meta.name)) else {
                continue;
            };
            let mut index = lru.lock();
            for (k, e) in map.iter() {
                let k = bytes::Bytes::copy_from_slice(k);
                if !index.contains(&(p, k.clone())) {
                    index.put((p, k), e.expires_at);
                }
            }
        }
    }

    /// Takes partition `p` out of the LRU orders (no longer its primary).
    pub fn unindex_partition(&self, p: u32) {
        let part = self.partitions[p as usize].read();
        for meta in self.collections.read().values() {
            let (Some(lru), Some(map)) = (&meta.lru, part.get(&*meta.name)) else {
                continue;
            };
            let mut index = lru.lock();
            for (k, _) in map.iter() {
                index.remove(&(p, bytes::Bytes::copy_from_slice(k)));
            }
        }
    }

    // ------------------------------------------------------------ expiry

    /// Removes expired entries from the next `partitions` partitions (a
    /// bounded slice of work per call, round robin); returns how many.
    pub fn sweep(&self, partitions: usize) -> u64 {
        let now = self.clock.wall_ms();
        let n = self.partitions.len();
        let start = self.sweep_cursor.fetch_add(partitions, Ordering::Relaxed);
        let metas = self.collections.read().clone();
        let mut removed = 0u64;
        let mut freed = 0usize;
        for i in 0..partitions.min(n) {
            let p = (start + i) % n;
            let mut part = self.partitions[p].write();
            part.retain(|name, map| {
                let index = metas.get(name).and_then(|m| m.lru.as_ref());
                map.retain(|e| {
                    if e.live(now) {
                        return true;
                    }
                    if let Some(l) = index {
                        l.lock().remove(&(p as u32, e.key_bytes()));
                    }
                    removed += 1;
                    freed += cost(e);
                    false
                });
                !map.is_empty()
            });
        }
        self.charge(0, freed);
        removed
    }
}
