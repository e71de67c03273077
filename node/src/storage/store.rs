//! The partitioned in-memory store: entries with TTL, collections with LRU.
//!
//! Layout: one `RwLock` per partition holding `collection -> key -> entry`.
//! A collection with `max_entries` also has an LRU index (one mutex per
//! collection) of `(partition, key)`; the index is the authority on which
//! entries of a capped collection exist, so an entry popped from it is
//! invisible at once and removed from its partition right after.
//!
//! Lock order: partition lock, then the collection's LRU mutex; never the
//! other way round, and never two partition locks at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use distcache_client::partition::{DEFAULT_COLLECTION, partition_for, resolve_collection};
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::replica::{ReplOp, Written};

mod entries;
mod lru_index;
mod partition;
mod planned;
mod room;

use entries::{Entry, EntryMap};
use lru_index::LruIndex;
pub use room::Room;

/// Longest collection name, bytes.
pub const MAX_COLLECTION_NAME_BYTES: usize = 255;

/// Size limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest key, bytes.
    pub max_key_bytes: u64,
    /// Largest value, bytes.
    pub max_value_bytes: u64,
    /// Most keys in one batch operation.
    pub max_batch_keys: u64,
    /// Largest answer of a batch read (keys and values, bytes): the
    /// largest message a client or peer may be sent.
    pub max_answer_bytes: u64,
}

/// A collection's settings and LRU index.
#[derive(Debug)]
pub struct CollectionMeta {
    /// Name.
    pub name: Arc<str>,
    /// Default TTL in ms (0 = none).
    pub default_ttl_ms: u64,
    /// Configured entry limit (0 = none).
    pub max_entries: u64,
    deleted: AtomicBool,
    lru: Option<Mutex<LruIndex>>,
}

impl CollectionMeta {
    fn new(name: &str, default_ttl_ms: u64, max_entries: u64) -> Self {
        CollectionMeta {
            name: name.into(),
            default_ttl_ms,
            max_entries,
            deleted: AtomicBool::new(false),
            lru: (max_entries > 0).then(|| Mutex::new(LruIndex::new())),
        }
    }

    /// The entry limit this node enforces when it is primary of `primaries`
    /// of `partition_count` partitions: `ceil(max_entries × primaries /
    /// partition_count)`, at least 1 (the whole limit on a lone node).
    pub fn node_limit(&self, primaries: u32, partition_count: u32) -> u64 {
        let share = self.max_entries as u128 * primaries as u128;
        (share.div_ceil(partition_count.max(1) as u128) as u64).max(1)
    }
}

fn secs(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

/// Bytes an entry is accounted at besides its key and value: its 32-byte
/// hash-table slot at the table's load factor (up to 64), the allocator's
/// header and rounding of its one buffer; kept on the safe side.
pub const ENTRY_OVERHEAD: usize = 96;

fn cost(e: &Entry) -> usize {
    e.len() + ENTRY_OVERHEAD
}

/// What a write does when the entries would exceed `--max-memory`
/// (Redis's `maxmemory-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MemoryPolicy {
    /// Refuse the write (`MEMORY_LIMIT`); reads and deletes keep working.
    #[default]
    Reject,
    /// Evict least recently used entries (sampled, of the written
    /// partition, any collection) to make room; replicated as deletes.
    EvictLru,
}

/// The entries' memory limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryLimit {
    /// Most bytes of entries (accounted per entry: key + value +
    /// [`ENTRY_OVERHEAD`]); 0 = no limit.
    pub max_bytes: u64,
    /// What a write over it does.
    pub policy: MemoryPolicy,
}

type PartitionData = HashMap<Arc<str>, EntryMap>;

/// The store of one node.
#[derive(Debug)]
pub struct Store {
    partition_count: u32,
    partitions: Box<[RwLock<PartitionData>]>,
    collections: RwLock<HashMap<Arc<str>, Arc<CollectionMeta>>>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    sweep_cursor: AtomicUsize,
    primaries: AtomicU32,
    memory: MemoryLimit,
    /// Bytes of entries held (every copy: primary and backup).
    used: AtomicUsize,
    /// Entries evicted for the memory limit.
    evicted: AtomicU64,
}

impl Store {
    /// An empty store holding only the default collection.
    pub fn new(partition_count: u32, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        let partition_count = partition_count.max(1);
        let mut collections = HashMap::new();
        collections.insert(
            Arc::from(DEFAULT_COLLECTION),
            Arc::new(CollectionMeta::new(DEFAULT_COLLECTION, 0, 0)),
        );
        Store {
            partition_count,
            partitions: (0..partition_count).map(|_| RwLock::default()).collect(),
            collections: RwLock::new(collections),
            clock,
            limits,
            sweep_cursor: AtomicUsize::new(0),
            primaries: AtomicU32::new(partition_count),
            memory: MemoryLimit::default(),
            used: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// The store with a memory limit on its entries.
    pub fn with_memory_limit(mut self, memory: MemoryLimit) -> Self {
        self.memory = memory;
        self
    }

    /// (bytes of entries held, the limit (0 = none), entries evicted for it).
    pub fn memory(&self) -> (u64, u64, u64) {
        (
            self.used.load(Ordering::Relaxed) as u64,
            self.memory.max_bytes,
            self.evicted.load(Ordering::Relaxed),
        )
    }

    fn charge(&self, add: usize, sub: usize) {
        if add >= sub {
            self.used.fetch_add(add - sub, Ordering::Relaxed);
        } else {
            let d = sub - add;
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(d))
                });
        }
    }

    /// With the reject policy, refuses `incoming` bytes of new entries that
    /// would take the store over its limit, and otherwise counts them at
    /// once (checked and counted in one step when a write is planned,
    /// before anything is logged or applied): the [`Room`] they take is
    /// used up when the write is applied, and given back if it is not.
    pub fn admit(&self, incoming: usize) -> Result<Room<'_>> {
        let max = self.memory.max_bytes;
        if max == 0 || self.memory.policy != MemoryPolicy::Reject {
            return Ok(Room::none());
        }
        let reserved = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                ((u as u64).saturating_add(incoming as u64) <= max)
                    .then_some(u.saturating_add(incoming))
            });
        match reserved {
            Ok(_) => Ok(Room::of(&self.used, incoming)),
            Err(used) => Err(Error::MemoryLimit {
                used: used as u64,
                max,
            }),
        }
    }

    /// With the evict-lru policy (the caller checks it), evicts from partition `p` (its lock held
    /// by the caller as a write lock, `part`) the least recently used of
    /// sampled entries until `incoming` bytes fit, and counts them in
    /// `used` at once (the caller's charge deducts them): writes to other
    /// partitions, under other locks, make room at the same time, and a
    /// check followed by a later charge would let two of them both fit in
    /// the same room. The evictions are recorded in `w` (replicated and
    /// logged like LRU evictions). An error when nothing is left to evict.
    fn make_room(
        &self,
        part: &mut PartitionData,
        p: u32,
        incoming: usize,
        w: &mut Written,
    ) -> Result<()> {
        let max = self.memory.max_bytes;
        let metas = self.collections.read().clone();
        let mut round = 0u64;
        loop {
            let reserved = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    ((u as u64).saturating_add(incoming as u64) <= max).then_some(u + incoming)
                });
            let used = match reserved {
                Ok(_) => return Ok(()),
                Err(u) => u as u64,
            };
            round += 1;
            // Sample up to 16 entries from a pseudo-random position of each
            // collection of the partition; evict the least recently used.
            let seed = xxhash_rust::xxh3::xxh3_64(
                &[p.to_le_bytes(), (round as u32).to_le_bytes()].concat(),
            ) ^ self.evicted.load(Ordering::Relaxed);
            let mut victim: Option<(Arc<str>, Bytes, u32)> = None;
            for (name, map) in part.iter() {
                if map.is_empty() {
                    continue;
                }
                let start = (seed as usize) % map.len();
                for (k, e) in map.iter().skip(start).chain(map.iter()).take(16) {
                    let t = e.used_at.load(Ordering::Relaxed);
                    if victim.as_ref().is_none_or(|v| t < v.2) {
                        victim = Some((name.clone(), Bytes::copy_from_slice(k), t));
                    }
                }
            }
            let Some((name, key, _)) = victim else {
                return Err(Error::MemoryLimit { used, max });
            };
            if let Some(map) = part.get_mut(&name)
                && let Some(old) = map.remove(&key)
            {
                self.charge(0, cost(&old));
                if let Some(l) = metas.get(&name).and_then(|m| m.lru.as_ref()) {
                    l.lock().remove(&(p, key.clone()));
                }
                self.evicted.fetch_add(1, Ordering::Relaxed);
                let del = ReplOp::Delete {
                    collection: name.to_string(),
                    key,
                };
                w.ops.push((p, del.clone()));
                w.evicted.push((p, del));
            }
        }
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// Records how many partitions this node is primary of (LRU limits follow).
    pub fn set_primaries(&self, n: u32) {
        self.primaries.store(n, Ordering::Relaxed);
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    // ------------------------------------------------------------ collections

    /// The collection called `name` ("" = default).
    pub fn collection(&self, name: &str) -> Result<Arc<CollectionMeta>> {
        let name = resolve_collection(name);
        self.collections
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::CollectionNotFound(name.to_string()))
    }

    /// Gets collection `name` or creates it with these settings; returns it and
    /// whether it was created. An existing collection keeps its settings.
    pub fn get_or_create_collection(
        &self,
        name: &str,
        default_ttl_ms: u64,
        max_entries: u64,
    ) -> Result<(Arc<CollectionMeta>, bool)> {
        let name = resolve_collection(name);
        validate_collection_name(name)?;
        if let Some(c) = self.collections.read().get(name) {
            return Ok((c.clone(), false));
        }
        let mut all = self.collections.write();
        if let Some(c) = all.get(name) {
            return Ok((c.clone(), false));
        }
        let meta = Arc::new(CollectionMeta::new(name, default_ttl_ms, max_entries));
        all.insert(meta.name.clone(), meta.clone());
        Ok((meta, true))
    }

    /// How many collections exist.
    pub fn collection_count(&self) -> usize {
        self.collections.read().len()
    }

    /// Every collection, sorted by name.
    pub fn list_collections(&self) -> Vec<Arc<CollectionMeta>> {
        let mut v: Vec<_> = self.collections.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Clears and removes collection `name`; false if it did not exist. The
    /// default collection cannot be deleted.
    pub fn delete_collection(&self, name: &str) -> Result<bool> {
        let name = resolve_collection(name);
        if name == DEFAULT_COLLECTION {
            return Err(Error::InvalidArgument(
                "the default collection cannot be deleted (clear it instead)".into(),
            ));
        }
        let Some(meta) = self.collections.write().remove(name) else {
            return Ok(false);
        };
        // Writers re-check `deleted` under the partition lock, so nothing can
        // land in a partition after it has been cleared below.
        meta.deleted.store(true, Ordering::SeqCst);
        self.clear_meta(&meta);
        Ok(true)
    }

    // ------------------------------------------------------------ validation

    /// Refuses a key over `--max-key-bytes`.
    pub fn check_key(&self, key: &[u8]) -> Result<()> {
        check_limit("max-key-bytes", key.len(), self.limits.max_key_bytes)
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        check_limit("max-value-bytes", value.len(), self.limits.max_value_bytes)
    }

    /// Refuses a batch read's answer (parts from several members, merged)
    /// larger than a message may be.
    pub fn check_answer(&self, entries: &[(Bytes, Bytes)]) -> Result<()> {
        let answer = entries
            .iter()
            .map(|(k, v)| answered_bytes(k, v))
            .fold(0usize, usize::saturating_add);
        check_limit("max-message-bytes", answer, self.limits.max_answer_bytes)
    }

    fn check_batch(&self, n: usize) -> Result<()> {
        check_limit("max-batch-keys", n, self.limits.max_batch_keys)
    }

    fn partition(&self, meta: &CollectionMeta, key: &[u8]) -> u32 {
        partition_for(&meta.name, key, self.partition_count)
    }

    fn expiry(&self, meta: &CollectionMeta, ttl_ms: Option<u64>) -> u64 {
        match ttl_ms.filter(|t| *t > 0).unwrap_or(meta.default_ttl_ms) {
            0 => 0,
            ttl => self.clock.wall_ms().saturating_add(ttl),
        }
    }

    // ------------------------------------------------------------ single-key ops

    /// The live value of `key`.
    /// The live value of `key` and its expiry (0 = never), without counting
    /// as a use (conditional writes read with it under the partition lock).
    pub fn peek(&self, collection: &str, key: &Bytes) -> Result<Option<(Bytes, u64)>> {
        let meta = self.collection(collection)?;
        self.check_key(key)?;
        let p = self.partition(&meta, key);
        let now = self.clock.wall_ms();
        let part = self.partitions[p as usize].read();
        Ok(part
            .get(&*meta.name)
            .and_then(|m| m.get(key))
            .filter(|e| e.live(now))
            .map(|e| (e.value_bytes(), e.expires_at)))
    }

    /// The value of `key`, if present and not expired (a use, for LRU).
    pub fn get(&self, collection: &str, key: &Bytes) -> Result<Option<Bytes>> {
        let meta = self.collection(collection)?;
        self.check_key(key)?;
        let p = self.partition(&meta, key);
        Ok(self.get_in(&meta, p, key))
    }

    fn get_in(&self, meta: &CollectionMeta, p: u32, key: &Bytes) -> Option<Bytes> {
        let now = self.clock.wall_ms();
        let part = self.partitions[p as usize].read();
        let entry = part.get(&*meta.name)?.get(key)?;
        if !entry.live(now) {
            return None;
        }
        entry.used_at.store(secs(now), Ordering::Relaxed);
        if let Some(lru) = &meta.lru {
            // A read is a use: move the key to the most recently used end.
            lru.lock().touch(&(p, key.clone()));
        }
        Some(entry.value_bytes())
    }

    /// Stores `value` under `key`; `ttl_ms` None or 0 = the collection
    /// default. Returns what was written (with its absolute expiry) and the
    /// entries LRU eviction removed, for replication.
    #[cfg(test)]
    pub fn put(
        &self,
        collection: &str,
        key: Bytes,
        value: Bytes,
        ttl_ms: Option<u64>,
    ) -> Result<Written> {
        self.put_many(collection, vec![(key, value)], ttl_ms)
    }

    /// Stores one planned put; `collection` is the planned op's name (the
    /// op recorded in `w` reuses it).
    fn put_in(
        &self,
        meta: &CollectionMeta,
        collection: String,
        (key, value, expires_at): (Bytes, Bytes, u64),
        w: &mut Written,
        room: &mut Room<'_>,
    ) -> Result<()> {
        let p = self.partition(meta, &key);
        let mut evicted = Vec::new();
        {
            let mut part = self.partitions[p as usize].write();
            if meta.deleted.load(Ordering::SeqCst) {
                return Err(Error::CollectionNotFound(meta.name.to_string()));
            }
            let now = self.clock.wall_ms();
            let entry = Entry::new(&key, &value, expires_at, secs(now));
            let add = cost(&entry);
            // Bytes make_room or the plan (`room`) already counted in `used`
            // for this entry.
            let mut reserved = 0;
            if self.memory.max_bytes > 0 {
                match self.memory.policy {
                    MemoryPolicy::EvictLru => {
                        let replaced = part
                            .get(&*meta.name)
                            .and_then(|m| m.get(&key))
                            .map_or(0, cost);
                        if add > replaced {
                            self.make_room(&mut part, p, add - replaced, w)?;
                            reserved = add - replaced;
                        }
                    }
                    MemoryPolicy::Reject => reserved = room.take(add),
                }
            }
            let map = part.entry(meta.name.clone()).or_default();
            let old = map.insert(entry);
            self.charge(add, old.as_ref().map_or(0, cost) + reserved);
            // The collection's own name (a plan names it so already).
            let collection = if *collection == *meta.name {
                collection
            } else {
                meta.name.to_string()
            };
            w.ops.push((
                p,
                ReplOp::Put {
                    collection,
                    key: key.clone(),
                    value,
                    expires_at,
                },
            ));
            if let Some(lru) = &meta.lru {
                let mut index = lru.lock();
                index.put((p, key), expires_at);
                let limit =
                    meta.node_limit(self.primaries.load(Ordering::Relaxed), self.partition_count);
                let now = self.clock.wall_ms();
                while index.len() as u64 > limit {
                    // Expired entries go first, then the least recently used.
                    let Some((vp, vk)) = index.pop_victim(now) else {
                        break;
                    };
                    if vp == p {
                        if let Some(old) = map.remove(&vk) {
                            self.charge(0, cost(&old));
                        }
                        let del = ReplOp::Delete {
                            collection: meta.name.to_string(),
                            key: vk,
                        };
                        w.ops.push((p, del.clone()));
                        w.evicted.push((p, del));
                    } else {
                        evicted.push((vp, vk));
                    }
                }
            }
        }
        for (vp, vk) in evicted {
            if self.remove_evicted(meta, vp, &vk) {
                w.evicted_elsewhere.push((
                    vp,
                    ReplOp::Delete {
                        collection: meta.name.to_string(),
                        key: vk,
                    },
                ));
            }
        }
        Ok(())
    }

    /// Removes an entry popped from the LRU index unless it was put again
    /// since; true if it removed it.
    fn remove_evicted(&self, meta: &CollectionMeta, p: u32, key: &Bytes) -> bool {
        let mut part = self.partitions[p as usize].write();
        let Some(map) = part.get_mut(&*meta.name) else {
            return false;
        };
        let reindexed = meta
            .lru
            .as_ref()
            .is_some_and(|l| l.lock().contains(&(p, key.clone())));
        if reindexed {
            return false;
        }
        match map.remove(key) {
            Some(old) => {
                self.charge(0, cost(&old));
                true
            }
            None => false,
        }
    }

    /// Removes `key`; true if a live entry was there.
    #[cfg(test)]
    pub fn delete(&self, collection: &str, key: &Bytes) -> Result<(bool, Written)> {
        let (live, w) = self.delete_many(collection, std::slice::from_ref(key))?;
        Ok((live > 0, w))
    }

    fn delete_in(&self, meta: &CollectionMeta, key: &Bytes, w: &mut Written) -> bool {
        let p = self.partition(meta, key);
        let now = self.clock.wall_ms();
        let mut part = self.partitions[p as usize].write();
        let Some(map) = part.get_mut(&*meta.name) else {
            return false;
        };
        let Some(old) = map.remove(key) else {
            return false;
        };
        self.charge(0, cost(&old));
        if let Some(l) = &meta.lru {
            l.lock().remove(&(p, key.clone()));
        }
        w.ops.push((
            p,
            ReplOp::Delete {
                collection: meta.name.to_string(),
                key: key.clone(),
            },
        ));
        old.live(now)
    }

    // ------------------------------------------------------------ batch ops

    /// The live values of `keys`, in request order, missing keys left out.
    pub fn get_many(&self, collection: &str, keys: &[Bytes]) -> Result<Vec<(Bytes, Bytes)>> {
        let meta = self.collection(collection)?;
        self.check_batch(keys.len())?;
        keys.iter().try_for_each(|k| self.check_key(k))?;
        // Counted as it is built: a key asked for many times answers its
        // value as often (shared, not copied), and its encoding would not.
        let mut answer = 0usize;
        let mut found = Vec::new();
        for k in keys {
            let p = self.partition(&meta, k);
            if let Some(v) = self.get_in(&meta, p, k) {
                answer = answer.saturating_add(answered_bytes(k, &v));
                check_limit("max-message-bytes", answer, self.limits.max_answer_bytes)?;
                found.push((k.clone(), v));
            }
        }
        Ok(found)
    }

    /// Stores every entry. All entries are validated before any is stored.
    #[cfg(test)]
    pub fn put_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
        ttl_ms: Option<u64>,
    ) -> Result<Written> {
        let (planned, room) = self.plan_puts(collection, entries, ttl_ms)?;
        Ok(self.apply_planned(planned, room)?.1)
    }

    /// Removes `keys`; returns how many live entries were removed.
    #[cfg(test)]
    pub fn delete_many(&self, collection: &str, keys: &[Bytes]) -> Result<(u64, Written)> {
        let planned = self.plan_deletes(collection, keys)?;
        self.apply_planned(planned, Room::none())
    }

    // ------------------------------------------------------------ whole-collection ops

    /// Every live key of the collection in the partitions `owned` selects.
    pub fn keys(&self, collection: &str, owned: impl Fn(u32) -> bool) -> Result<Vec<Bytes>> {
        let meta = self.collection(collection)?;
        let now = self.clock.wall_ms();
        let mut out = Vec::new();
        for (p, part) in self.partitions.iter().enumerate() {
            if !owned(p as u32) {
                continue;
            }
            if let Some(map) = part.read().get(&*meta.name) {
                out.extend(map.values().filter(|e| e.live(now)).map(|e| e.key_bytes()));
            }
        }
        Ok(out)
    }

    /// The live keys of the collection in partition `p`, sorted.
    pub fn sorted_keys(&self, collection: &str, p: u32) -> Result<Vec<Bytes>> {
        let meta = self.collection(collection)?;
        let now = self.clock.wall_ms();
        let Some(part) = self.partitions.get(p as usize) else {
            return Ok(Vec::new());
        };
        let mut keys: Vec<Bytes> = part
            .read()
            .get(&*meta.name)
            .map(|map| {
                map.values()
                    .filter(|e| e.live(now))
                    .map(|e| e.key_bytes())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort_unstable();
        Ok(keys)
    }

    /// Entries held per collection over every partition, expired ones the
    /// sweep has not removed yet included: one pass reading map sizes, no
    /// entry visited (for metrics).
    pub fn held_entries(&self) -> HashMap<Arc<str>, u64> {
        let mut out: HashMap<Arc<str>, u64> = HashMap::new();
        for part in self.partitions.iter() {
            for (name, map) in part.read().iter() {
                *out.entry(name.clone()).or_default() += map.len() as u64;
            }
        }
        out
    }

    /// Number of live entries of the collection in the partitions `owned` selects.
    pub fn size(&self, collection: &str, owned: impl Fn(u32) -> bool) -> Result<u64> {
        let meta = self.collection(collection)?;
        let now = self.clock.wall_ms();
        let mut n = 0u64;
        for (p, part) in self.partitions.iter().enumerate() {
            if !owned(p as u32) {
                continue;
            }
            if let Some(map) = part.read().get(&*meta.name) {
                n += map.values().filter(|e| e.live(now)).count() as u64;
            }
        }
        Ok(n)
    }

    /// Removes every entry of the collection everywhere on this node.
    #[cfg(test)]
    pub fn clear(&self, collection: &str) -> Result<u64> {
        let meta = self.collection(collection)?;
        Ok(self.clear_meta(&meta))
    }

    fn clear_meta(&self, meta: &CollectionMeta) -> u64 {
        (0..self.partition_count)
            .map(|p| self.clear_in(meta, p))
            .sum()
    }

    fn clear_in(&self, meta: &CollectionMeta, p: u32) -> u64 {
        let now = self.clock.wall_ms();
        let mut part = self.partitions[p as usize].write();
        let Some(map) = part.remove(&*meta.name) else {
            return 0;
        };
        let mut index = meta.lru.as_ref().map(|l| l.lock());
        let mut removed = 0;
        self.charge(0, map.values().map(cost).sum());
        for e in map {
            if let Some(i) = index.as_mut() {
                i.remove(&(p, e.key_bytes()));
            }
            if e.live(now) {
                removed += 1;
            }
        }
        removed
    }
}

/// Bytes an answered entry adds to a message, at most: its key and value
/// and their field tags and lengths (16 bytes).
fn answered_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 16
}

fn check_limit(limit: &'static str, actual: usize, max: u64) -> Result<()> {
    if actual as u64 > max {
        return Err(Error::LimitExceeded {
            limit,
            actual: actual as u64,
            max,
        });
    }
    Ok(())
}

fn validate_collection_name(name: &str) -> Result<()> {
    if name.len() > MAX_COLLECTION_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "collection name longer than {MAX_COLLECTION_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(
            "collection name contains control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn store(clock: Arc<ManualClock>) -> Store {
        Store::new(
            271,
            clock,
            Limits {
                max_key_bytes: 64,
                max_value_bytes: 1024,
                max_batch_keys: 100,
                max_answer_bytes: 1 << 20,
            },
        )
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn limited(clock: Arc<ManualClock>, max_bytes: u64, policy: MemoryPolicy) -> Store {
        Store::new(
            4,
            clock,
            Limits {
                max_key_bytes: 64,
                max_value_bytes: 1024,
                max_batch_keys: 100,
                max_answer_bytes: 1 << 20,
            },
        )
        .with_memory_limit(MemoryLimit { max_bytes, policy })
    }

    /// Runs `write(thread, i)` for i in 0..2,000 on four threads at once;
    /// the highest accounted use seen after any write, or returned by one
    /// (a use it saw midway).
    fn peak_of_writers(s: &Store, write: impl Fn(usize, usize) -> u64 + Sync) -> u64 {
        std::thread::scope(|scope| {
            let writers: Vec<_> = (0..4)
                .map(|t| {
                    let write = &write;
                    scope.spawn(move || {
                        (0..2_000).fold(0, |peak, i| {
                            let midway = write(t, i);
                            peak.max(midway).max(s.memory().0)
                        })
                    })
                })
                .collect();
            writers
                .into_iter()
                .map(|w| w.join().expect("writer"))
                .max()
                .unwrap_or(0)
        })
    }

    /// A batch read's answer may not outgrow a message, counted as it is
    /// built: a key asked for again and again answers its value each time.
    #[test]
    fn a_batch_answer_larger_than_a_message_is_refused() {
        let s = Store::new(
            271,
            ManualClock::new(1_000),
            Limits {
                max_key_bytes: 64,
                max_value_bytes: 1024,
                max_batch_keys: 100,
                max_answer_bytes: 4096,
            },
        );
        s.put("", b("k"), Bytes::from(vec![7u8; 1000]), None)
            .expect("put");
        let three = s.get_many("", &vec![b("k"); 3]).expect("3 KiB fits");
        assert_eq!(three.len(), 3);
        assert!(s.check_answer(&three).is_ok());
        let e = s
            .get_many("", &vec![b("k"); 50])
            .expect_err("50 KiB does not");
        assert!(
            matches!(
                e,
                Error::LimitExceeded {
                    limit: "max-message-bytes",
                    max: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        let merged = [three.clone(), three].concat();
        assert!(
            s.check_answer(&merged).is_err(),
            "merged parts are counted too"
        );
        assert!(
            s.get_many("", &vec![b("absent"); 100]).is_ok(),
            "keys not found add nothing"
        );
    }

    #[test]
    fn memory_is_accounted_per_entry_through_every_change() {
        let clock = ManualClock::new(1_000);
        let s = limited(clock.clone(), 0, MemoryPolicy::Reject);
        let each = 2 + 100 + ENTRY_OVERHEAD;
        for i in 0..50 {
            s.put(
                "",
                b(&format!("{i:02}")),
                Bytes::from(vec![0u8; 100]),
                Some(1_000),
            )
            .expect("put");
        }
        assert_eq!(s.memory().0 as usize, 50 * each);
        // Overwrite: the same size.
        s.put("", b("00"), Bytes::from(vec![0u8; 100]), None)
            .expect("put");
        assert_eq!(s.memory().0 as usize, 50 * each);
        s.delete("", &b("01")).expect("delete");
        assert_eq!(s.memory().0 as usize, 49 * each);
        // Expired entries are freed by the sweep ("00" has no TTL now).
        clock.advance(2_000);
        s.sweep(4);
        assert_eq!(s.memory().0 as usize, each);
        // Snapshot install and drop move the count with the partition.
        let p = s.partition(&s.collection("").expect("collection"), &b("00"));
        let snap = s.snapshot(p);
        s.drop_partition(p);
        assert_eq!(s.memory().0, 0);
        s.install(p, &snap);
        assert_eq!(s.memory().0 as usize, each);
        s.clear("").expect("clear");
        assert_eq!(s.memory().0, 0);
    }

    #[test]
    fn reject_refuses_writes_at_the_limit_and_keeps_reads_and_deletes() {
        let clock = ManualClock::new(1_000);
        let each = 3 + 100 + ENTRY_OVERHEAD;
        let s = limited(clock, (each * 10) as u64, MemoryPolicy::Reject);
        for i in 0..10 {
            s.put("", b(&format!("{i:03}")), Bytes::from(vec![1u8; 100]), None)
                .expect("under the limit");
        }
        let e = s
            .put("", b("010"), Bytes::from(vec![1u8; 100]), None)
            .expect_err("over the limit");
        assert!(matches!(e, Error::MemoryLimit { .. }), "{e}");
        assert_eq!(s.memory().0 as usize, 10 * each);
        assert_eq!(
            s.get("", &b("003")).expect("read").map(|v| v.len()),
            Some(100)
        );
        s.delete("", &b("003")).expect("delete works");
        s.put("", b("010"), Bytes::from(vec![1u8; 100]), None)
            .expect("room again after a delete");
        assert_eq!(s.memory().2, 0, "nothing evicted under reject");
    }

    #[test]
    fn evict_lru_makes_room_in_the_written_partition_and_keeps_recent_keys() {
        let clock = ManualClock::new(1_000_000);
        let each = 4 + 100 + ENTRY_OVERHEAD;
        let s = limited(clock.clone(), (each * 100) as u64, MemoryPolicy::EvictLru);
        let mut evictions = 0;
        for i in 0..1_000 {
            clock.advance(1_000);
            // Key "0000" is read before every write: always recently used.
            let _ = s.get("", &b("0000"));
            let w = s
                .put("", b(&format!("{i:04}")), Bytes::from(vec![2u8; 100]), None)
                .expect("evicts instead of refusing");
            evictions += w.evicted.len();
            assert!(
                w.evicted
                    .iter()
                    .all(|(p, op)| matches!(op, ReplOp::Delete { .. })
                        && w.ops.iter().any(|(q, o)| q == p && o == op)),
                "evictions are replicated with the write"
            );
            assert!(s.memory().0 as usize <= 100 * each, "over the limit");
        }
        assert!(evictions >= 900, "{evictions} evictions");
        assert_eq!(s.memory().2 as usize, evictions);
        assert!(
            s.get("", &b("0000")).expect("read").is_some(),
            "a hot key was evicted"
        );
        assert!(
            s.get("", &b("0999")).expect("read").is_some(),
            "the newest key was evicted"
        );
    }

    /// Writers to different partitions (under different locks) making
    /// room at once never take the entries past the limit: the room is
    /// reserved when it is found, not checked and charged later.
    #[test]
    fn evict_lru_writers_on_other_partitions_never_overshoot_the_limit() {
        let clock = ManualClock::new(1_000_000);
        let each = 6 + 1000 + ENTRY_OVERHEAD;
        let max = (each * 20) as u64;
        let s = limited(clock, max, MemoryPolicy::EvictLru);
        let peak = peak_of_writers(&s, |t, i| {
            let key = b(&format!("{t}{i:05}"));
            // A partition with nothing left to evict refuses (by design);
            // the others evict.
            match s.put("", key, Bytes::from(vec![7u8; 1000]), None) {
                Ok(_) | Err(Error::MemoryLimit { .. }) => {}
                Err(e) => panic!("{e}"),
            }
            0
        });
        assert!(peak <= max, "accounted {peak} > limit {max}");
        assert!(s.memory().0 <= max);
        assert!(s.memory().2 > 0, "writes past the limit evicted");
    }

    /// Reject: a planned write's bytes are counted when it is planned, so
    /// writes planned at the same moment never both fit in the same room;
    /// a planned write that is not applied gives its room back.
    #[test]
    fn reject_counts_planned_writes_at_once_and_gives_back_unapplied_room() {
        let clock = ManualClock::new(1_000_000);
        let each = 2 + 100 + ENTRY_OVERHEAD;
        let max = (each * 3) as u64;
        let s = limited(clock, max, MemoryPolicy::Reject);
        let v = || Bytes::from(vec![1u8; 100]);
        let (a, room_a) = s.plan_put("", b("k1"), v(), None).expect("fits");
        let (b2, room_b) = s.plan_put("", b("k2"), v(), None).expect("fits");
        let (c, room_c) = s.plan_put("", b("k3"), v(), None).expect("fits");
        // Planned before any of the three is applied: no room left.
        assert!(matches!(
            s.plan_put("", b("k4"), v(), None),
            Err(Error::MemoryLimit { .. })
        ));
        assert_eq!(s.memory().0, max);
        s.apply_planned(smallvec::smallvec![a], room_a)
            .expect("apply");
        assert_eq!(s.memory().0, max, "applying uses the room up");
        drop((b2, room_b));
        assert_eq!(s.memory().0, (each * 2) as u64, "unapplied room given back");
        // The collection goes between plan and apply: nothing is applied,
        // and the room comes back.
        s.get_or_create_collection("gone", 0, 0).expect("create");
        let (g, room_g) = s.plan_put("gone", b("k5"), v(), None).expect("fits");
        assert_eq!(s.memory().0, max);
        s.delete_collection("gone").expect("delete");
        assert!(s.apply_planned(smallvec::smallvec![g], room_g).is_err());
        assert_eq!(s.memory().0, (each * 2) as u64);
        s.apply_planned(smallvec::smallvec![c], room_c)
            .expect("apply");
        // Overwriting k1 needs room for the new entry when planned, and
        // frees the old one when applied.
        let (o, room_o) = s.plan_put("", b("k1"), v(), None).expect("fits");
        s.apply_planned(smallvec::smallvec![o], room_o)
            .expect("apply");
        assert_eq!(s.memory().0, (each * 2) as u64);
        assert_eq!(s.size("", |_| true).expect("size"), 2);
    }

    /// Reject under concurrent writers that plan, wait, then apply (or
    /// drop) their writes: the count never passes the limit, and once they
    /// are done it is exactly what the entries take (no room leaks).
    #[test]
    fn reject_writers_on_other_partitions_never_overshoot_and_leak_nothing() {
        let clock = ManualClock::new(1_000_000);
        let each = 6 + 1000 + ENTRY_OVERHEAD;
        let max = (each * 20) as u64;
        let s = limited(clock, max, MemoryPolicy::Reject);
        let peak = peak_of_writers(&s, |t, i| {
            let key = b(&format!("{t}{:05}", i % 40));
            match s.plan_put("", key.clone(), Bytes::from(vec![7u8; 1000]), None) {
                Ok((op, room)) => {
                    std::thread::yield_now();
                    let between = s.memory().0;
                    if i % 7 == 0 {
                        drop((op, room));
                    } else {
                        s.apply_planned(smallvec::smallvec![op], room)
                            .expect("apply");
                    }
                    between
                }
                Err(Error::MemoryLimit { .. }) => {
                    // Make room: delete one of ours.
                    s.delete_many("", &[key]).expect("delete");
                    0
                }
                Err(e) => panic!("{e}"),
            }
        });
        assert!(peak <= max, "accounted {peak} > limit {max}");
        let entries = s.size("", |_| true).expect("size");
        assert!(entries > 0);
        assert_eq!(s.memory().0, entries * each as u64, "no room leaked");
    }

    #[test]
    fn ttl_expires_lazily_and_sweep_removes() {
        let clock = ManualClock::new(1_000);
        let s = store(clock.clone());
        s.put("", b("k"), b("v"), Some(500)).expect("put");
        s.put("", b("forever"), b("v"), None).expect("put");
        assert_eq!(s.get("", &b("k")).expect("get"), Some(b("v")));
        clock.advance(499);
        assert_eq!(s.get("", &b("k")).expect("get"), Some(b("v")));
        clock.advance(1);
        assert_eq!(s.get("", &b("k")).expect("get"), None);
        assert_eq!(s.size("", |_| true).expect("size"), 1);
        assert_eq!(s.sweep(271), 1);
        assert_eq!(s.get("", &b("forever")).expect("get"), Some(b("v")));
    }

    #[test]
    fn default_ttl_applies_and_explicit_ttl_wins() {
        let clock = ManualClock::new(0);
        let s = store(clock.clone());
        s.get_or_create_collection("c", 100, 0).expect("create");
        s.put("c", b("a"), b("1"), None).expect("put");
        s.put("c", b("b"), b("2"), Some(1_000)).expect("put");
        clock.advance(100);
        assert_eq!(s.get("c", &b("a")).expect("get"), None);
        assert_eq!(s.get("c", &b("b")).expect("get"), Some(b("2")));
    }

    #[test]
    fn an_expired_entry_is_evicted_before_a_live_least_recently_used_one() {
        let clock = ManualClock::new(1_000);
        let s = store(clock.clone());
        s.get_or_create_collection("hot", 0, 2).expect("create");
        s.put("hot", b("live"), b("1"), None).expect("put");
        s.put("hot", b("short"), b("2"), Some(10)).expect("put");
        // "live" is the least recently used; "short" then expires unswept.
        clock.advance(50);
        s.put("hot", b("new"), b("3"), None).expect("put");
        assert!(
            s.get("hot", &b("live")).expect("get").is_some(),
            "the live entry must not be evicted while an expired one holds a slot"
        );
        assert!(s.get("hot", &b("new")).expect("get").is_some());
        assert_eq!(s.size("hot", |_| true).expect("size"), 2);
    }

    #[test]
    fn lru_evicts_least_recently_used_and_bounds_size() {
        let clock = ManualClock::new(0);
        let s = store(clock);
        s.get_or_create_collection("hot", 0, 3).expect("create");
        for k in ["a", "b", "c"] {
            s.put("hot", b(k), b(k), None).expect("put");
        }
        // Touch "a": "b" becomes the least recently used.
        assert!(s.get("hot", &b("a")).expect("get").is_some());
        s.put("hot", b("d"), b("d"), None).expect("put");
        assert_eq!(s.get("hot", &b("b")).expect("get"), None);
        for k in ["a", "c", "d"] {
            assert!(s.get("hot", &b(k)).expect("get").is_some(), "{k}");
        }
        for i in 0..50 {
            s.put("hot", b(&format!("x{i}")), b("v"), None)
                .expect("put");
            assert!(s.size("hot", |_| true).expect("size") <= 3);
        }
        assert_eq!(s.size("hot", |_| true).expect("size"), 3);
        assert_eq!(s.keys("hot", |_| true).expect("keys").len(), 3);
    }

    #[test]
    fn limits_name_the_limit_and_change_nothing() {
        let s = store(ManualClock::new(0));
        let big_key = Bytes::from(vec![b'k'; 65]);
        let e = s.put("", big_key, b("v"), None).expect_err("too big");
        assert!(e.to_string().contains("max-key-bytes"), "{e}");
        let e = s
            .put_many(
                "",
                vec![(b("ok"), b("v")), (b("big"), Bytes::from(vec![0; 1025]))],
                None,
            )
            .expect_err("too big");
        assert!(e.to_string().contains("max-value-bytes"), "{e}");
        assert_eq!(
            s.get("", &b("ok")).expect("get"),
            None,
            "batch is all or nothing"
        );
    }

    #[test]
    fn deleted_collection_is_not_found_and_default_is_permanent() {
        let s = store(ManualClock::new(0));
        s.get_or_create_collection("tmp", 0, 0).expect("create");
        s.put("tmp", b("k"), b("v"), None).expect("put");
        assert!(s.delete_collection("tmp").expect("delete"));
        assert!(matches!(
            s.get("tmp", &b("k")),
            Err(Error::CollectionNotFound(_))
        ));
        assert!(matches!(
            s.put("tmp", b("k"), b("v"), None),
            Err(Error::CollectionNotFound(_))
        ));
        assert!(!s.delete_collection("tmp").expect("delete again"));
        assert!(s.delete_collection("").is_err());
        // Re-created: empty.
        s.get_or_create_collection("tmp", 0, 0).expect("create");
        assert_eq!(s.size("tmp", |_| true).expect("size"), 0);
    }
}
