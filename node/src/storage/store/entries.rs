//! Compact entries: one allocation per entry holding its key and value
//! together, in a hash table of 32-byte slots (the buffer pointer and
//! length, the key's length, the last use and the expiry), looked up by the
//! key bytes. A read copies the value out.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use hashbrown::HashTable;

/// One stored entry.
#[derive(Debug)]
pub(in crate::storage) struct Entry {
    /// The key's bytes, then the value's.
    data: Box<[u8]>,
    /// Length of the key in `data`.
    klen: u32,
    /// Last use, seconds on the store's clock (the memory limit's LRU
    /// sampling); updated under the partition's read lock.
    pub(in crate::storage) used_at: AtomicU32,
    /// Wall-clock ms after which the entry is gone; 0 = never.
    pub(in crate::storage) expires_at: u64,
}

impl Clone for Entry {
    fn clone(&self) -> Self {
        Entry {
            data: self.data.clone(),
            klen: self.klen,
            used_at: AtomicU32::new(self.used_at.load(Ordering::Relaxed)),
            expires_at: self.expires_at,
        }
    }
}

impl Entry {
    /// An entry of `key` and `value`, used at `used_at` (seconds).
    pub(in crate::storage) fn new(key: &[u8], value: &[u8], expires_at: u64, used_at: u32) -> Self {
        let mut data = Vec::with_capacity(key.len() + value.len());
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        Entry {
            data: data.into_boxed_slice(),
            // Keys are bounded far below 4 GiB (frames and messages are).
            klen: u32::try_from(key.len()).unwrap_or(u32::MAX),
            used_at: AtomicU32::new(used_at),
            expires_at,
        }
    }

    /// The key.
    pub(in crate::storage) fn key(&self) -> &[u8] {
        &self.data[..self.klen as usize]
    }

    /// The value.
    pub(in crate::storage) fn value(&self) -> &[u8] {
        &self.data[self.klen as usize..]
    }

    /// A copy of the key.
    pub(in crate::storage) fn key_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.key())
    }

    /// A copy of the value.
    pub(in crate::storage) fn value_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.value())
    }

    /// Key and value bytes.
    pub(in crate::storage) fn len(&self) -> usize {
        self.data.len()
    }

    /// Not expired at `now` (wall-clock ms).
    pub(in crate::storage) fn live(&self, now: u64) -> bool {
        self.expires_at == 0 || self.expires_at > now
    }
}

/// One collection's entries in one partition.
#[derive(Debug, Default)]
pub(in crate::storage) struct EntryMap {
    table: HashTable<Entry>,
    hasher: std::hash::RandomState,
}

impl EntryMap {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The entry of `key`.
    pub(in crate::storage) fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.table.find(self.hash(key), |e| e.key() == key)
    }

    /// Stores `e`; the entry it replaced.
    pub(in crate::storage) fn insert(&mut self, e: Entry) -> Option<Entry> {
        let hash = self.hash(e.key());
        let hasher = &self.hasher;
        match self.table.entry(
            hash,
            |x| x.key() == e.key(),
            |x| hasher.hash_one(x.key()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                Some(std::mem::replace(o.get_mut(), e))
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(e);
                None
            }
        }
    }

    /// Removes `key`'s entry.
    pub(in crate::storage) fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let hash = self.hash(key);
        self.table
            .find_entry(hash, |e| e.key() == key)
            .ok()
            .map(|o| o.remove().0)
    }

    /// Every entry, as (key, entry).
    pub(in crate::storage) fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.table.iter().map(|e| (e.key(), e))
    }

    /// Every entry.
    pub(in crate::storage) fn values(&self) -> impl Iterator<Item = &Entry> {
        self.table.iter()
    }

    /// Number of entries.
    pub(in crate::storage) fn len(&self) -> usize {
        self.table.len()
    }

    /// No entries.
    pub(in crate::storage) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Keeps the entries `keep` says yes to.
    pub(in crate::storage) fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        self.table.retain(|e| keep(e));
    }
}

impl IntoIterator for EntryMap {
    type Item = Entry;
    type IntoIter = hashbrown::hash_table::IntoIter<Entry>;

    fn into_iter(self) -> Self::IntoIter {
        self.table.into_iter()
    }
}

impl FromIterator<Entry> for EntryMap {
    fn from_iter<I: IntoIterator<Item = Entry>>(iter: I) -> Self {
        let mut map = EntryMap::default();
        for e in iter {
            map.insert(e);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_replaced_and_removed_by_key() {
        let mut m = EntryMap::default();
        assert!(m.insert(Entry::new(b"k1", b"v1", 0, 1)).is_none());
        assert!(m.insert(Entry::new(b"k2", b"", 5, 1)).is_none());
        assert!(m.insert(Entry::new(b"", b"empty key", 0, 1)).is_none());
        let old = m.insert(Entry::new(b"k1", b"v1bis", 7, 2)).expect("replaced");
        assert_eq!((old.key(), old.value()), (&b"k1"[..], &b"v1"[..]));
        assert_eq!(m.len(), 3);
        let e = m.get(b"k1").expect("k1");
        assert_eq!((e.value(), e.expires_at), (&b"v1bis"[..], 7));
        assert_eq!(m.get(b"").map(Entry::value), Some(&b"empty key"[..]));
        assert_eq!(m.get(b"k2").map(Entry::value), Some(&b""[..]));
        assert!(m.get(b"k").is_none());
        assert_eq!(m.remove(b"k2").map(|e| e.key_bytes()), Some(Bytes::from("k2")));
        assert!(m.remove(b"k2").is_none());
        for i in 0..10_000u32 {
            m.insert(Entry::new(&i.to_le_bytes(), &[i as u8; 3], 0, 0));
        }
        assert_eq!(m.len(), 10_002);
        m.retain(|e| e.key().len() != 4 || e.value()[0] % 2 == 0);
        assert!(m.get(&1u32.to_le_bytes()).is_none());
        assert!(m.get(&2u32.to_le_bytes()).is_some());
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }
}
