//! The eviction order of a capped collection: least recently used first,
//! except that an entry already expired (not swept yet) always goes before
//! any live one.

use std::collections::BTreeSet;

use bytes::Bytes;
use lru::LruCache;

/// (partition, key) of an indexed entry.
pub(super) type Slot = (u32, Bytes);

/// LRU order plus the expiry order of the entries that expire.
#[derive(Debug)]
pub(super) struct LruIndex {
    /// Slot -> its expiry (0 = never), in recency order.
    order: LruCache<Slot, u64>,
    /// (expiry, slot) of every indexed entry that expires.
    expiring: BTreeSet<(u64, u32, Bytes)>,
}

impl LruIndex {
    pub(super) fn new() -> Self {
        LruIndex {
            order: LruCache::unbounded(),
            expiring: BTreeSet::new(),
        }
    }

    /// Entries indexed.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether `slot` is indexed.
    pub(super) fn contains(&self, slot: &Slot) -> bool {
        self.order.contains(slot)
    }

    /// Marks `slot` most recently used.
    pub(super) fn touch(&mut self, slot: &Slot) {
        self.order.get(slot);
    }

    /// Indexes (or re-indexes) `slot`, expiring at `expires_at` (0 = never),
    /// as most recently used.
    pub(super) fn put(&mut self, slot: Slot, expires_at: u64) {
        if let Some(old) = self.order.put(slot.clone(), expires_at)
            && old != 0
        {
            self.expiring.remove(&(old, slot.0, slot.1.clone()));
        }
        if expires_at != 0 {
            self.expiring.insert((expires_at, slot.0, slot.1));
        }
    }

    /// Takes `slot` out of the index.
    pub(super) fn remove(&mut self, slot: &Slot) {
        if let Some(exp) = self.order.pop(slot)
            && exp != 0
        {
            self.expiring.remove(&(exp, slot.0, slot.1.clone()));
        }
    }

    /// The next entry to evict at wall-clock `now`: the earliest-expiring
    /// one if it has expired, else the least recently used.
    pub(super) fn pop_victim(&mut self, now: u64) -> Option<Slot> {
        if let Some((exp, p, key)) = self.expiring.first().cloned()
            && exp <= now
        {
            let slot = (p, key);
            self.remove(&slot);
            return Some(slot);
        }
        let (slot, exp) = self.order.pop_lru()?;
        if exp != 0 {
            self.expiring.remove(&(exp, slot.0, slot.1.clone()));
        }
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(k: &str) -> Slot {
        (0, Bytes::copy_from_slice(k.as_bytes()))
    }

    #[test]
    fn an_expired_entry_is_evicted_before_the_least_recently_used_live_one() {
        let mut ix = LruIndex::new();
        ix.put(slot("old-live"), 0);
        ix.put(slot("expiring"), 100);
        ix.put(slot("new-live"), 0);
        // Before expiry: plain LRU order.
        assert_eq!(ix.pop_victim(50), Some(slot("old-live")));
        ix.put(slot("old-live"), 0);
        // After: the expired entry goes first, though more recently used.
        assert_eq!(ix.pop_victim(100), Some(slot("expiring")));
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.pop_victim(1_000), Some(slot("new-live")));
    }

    #[test]
    fn re_putting_or_removing_keeps_both_orders_consistent() {
        let mut ix = LruIndex::new();
        ix.put(slot("a"), 10);
        ix.put(slot("a"), 0); // no longer expires
        assert_eq!(ix.expiring.len(), 0);
        ix.put(slot("b"), 20);
        ix.remove(&slot("b"));
        assert!(ix.expiring.is_empty() && !ix.contains(&slot("b")));
        assert_eq!(ix.pop_victim(1_000), Some(slot("a")));
        assert_eq!(ix.pop_victim(1_000), None);
    }
}
