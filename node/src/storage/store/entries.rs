//! Compact entries: one allocation per entry holding its key and value
//! together, in a hash table of 32-byte slots (the buffer pointer and
//! length, the key's length, the last use and the expiry), looked up by the
//! key bytes. A read copies a small value out; a value larger than
//! [`INLINE_MAX`] is kept as its own shared buffer instead (behind one more
//! allocation), so reading it copies nothing (a read of a 4 MiB value must
//! not allocate 4 MiB).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use hashbrown::HashTable;

/// Values up to this many bytes are stored inline with their key.
pub(in crate::storage) const INLINE_MAX: usize = 1024;

/// An entry's bytes (16 bytes: the enum fits in the box's pointer niche).
#[derive(Debug, Clone)]
enum Data {
    /// The key's bytes, then the value's.
    Inline(Box<[u8]>),
    /// A value larger than [`INLINE_MAX`], shared, with its key.
    Large(Box<Large>),
}

#[derive(Debug, Clone)]
struct Large {
    key: Box<[u8]>,
    value: Bytes,
}

/// One stored entry.
#[derive(Debug)]
pub(in crate::storage) struct Entry {
    data: Data,
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
    pub(in crate::storage) fn new(
        key: &[u8],
        value: &Bytes,
        expires_at: u64,
        used_at: u32,
    ) -> Self {
        let data = if value.len() > INLINE_MAX {
            Data::Large(Box::new(Large {
                key: key.into(),
                value: value.clone(),
            }))
        } else {
            let mut data = Vec::with_capacity(key.len() + value.len());
            data.extend_from_slice(key);
            data.extend_from_slice(value);
            Data::Inline(data.into_boxed_slice())
        };
        Entry {
            data,
            // Keys are bounded far below 4 GiB (frames and messages are).
            klen: u32::try_from(key.len()).unwrap_or(u32::MAX),
            used_at: AtomicU32::new(used_at),
            expires_at,
        }
    }

    /// The key.
    pub(in crate::storage) fn key(&self) -> &[u8] {
        match &self.data {
            Data::Inline(d) => &d[..self.klen as usize],
            Data::Large(l) => &l.key,
        }
    }

    /// The value.
    pub(in crate::storage) fn value(&self) -> &[u8] {
        match &self.data {
            Data::Inline(d) => &d[self.klen as usize..],
            Data::Large(l) => &l.value,
        }
    }

    /// A copy of the key.
    pub(in crate::storage) fn key_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.key())
    }

    /// The value (a copy of a small one, a share of a large one).
    pub(in crate::storage) fn value_bytes(&self) -> Bytes {
        match &self.data {
            Data::Inline(_) => Bytes::copy_from_slice(self.value()),
            Data::Large(l) => l.value.clone(),
        }
    }

    /// Key and value bytes.
    pub(in crate::storage) fn len(&self) -> usize {
        match &self.data {
            Data::Inline(d) => d.len(),
            Data::Large(l) => l.key.len() + l.value.len(),
        }
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
        match self
            .table
            .entry(hash, |x| x.key() == e.key(), |x| hasher.hash_one(x.key()))
        {
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

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    #[test]
    fn entries_are_found_replaced_and_removed_by_key() {
        let mut m = EntryMap::default();
        assert!(m.insert(Entry::new(b"k1", &b(b"v1"), 0, 1)).is_none());
        assert!(m.insert(Entry::new(b"k2", &b(b""), 5, 1)).is_none());
        assert!(m.insert(Entry::new(b"", &b(b"empty key"), 0, 1)).is_none());
        let old = m
            .insert(Entry::new(b"k1", &b(b"v1bis"), 7, 2))
            .expect("replaced");
        assert_eq!((old.key(), old.value()), (&b"k1"[..], &b"v1"[..]));
        assert_eq!(m.len(), 3);
        let e = m.get(b"k1").expect("k1");
        assert_eq!((e.value(), e.expires_at), (&b"v1bis"[..], 7));
        assert_eq!(m.get(b"").map(Entry::value), Some(&b"empty key"[..]));
        assert_eq!(m.get(b"k2").map(Entry::value), Some(&b""[..]));
        assert!(m.get(b"k").is_none());
        assert_eq!(
            m.remove(b"k2").map(|e| e.key_bytes()),
            Some(Bytes::from("k2"))
        );
        assert!(m.remove(b"k2").is_none());
        for i in 0..10_000u32 {
            m.insert(Entry::new(
                &i.to_le_bytes(),
                &Bytes::copy_from_slice(&[i as u8; 3]),
                0,
                0,
            ));
        }
        assert_eq!(m.len(), 10_002);
        m.retain(|e| e.key().len() != 4 || e.value()[0] % 2 == 0);
        assert!(m.get(&1u32.to_le_bytes()).is_none());
        assert!(m.get(&2u32.to_le_bytes()).is_some());
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn a_large_value_is_shared_not_copied() {
        let big = Bytes::from(vec![7u8; INLINE_MAX + 1]);
        let e = Entry::new(b"big", &big, 0, 0);
        assert_eq!(e.len(), 3 + INLINE_MAX + 1);
        assert_eq!(e.key(), b"big");
        let read = e.value_bytes();
        assert_eq!(read, big);
        assert_eq!(read.as_ptr(), big.as_ptr(), "the read copied the value");
        let small = Entry::new(b"s", &Bytes::from_static(&[1u8; INLINE_MAX]), 0, 0);
        assert_eq!(small.value().len(), INLINE_MAX);
        assert_eq!(small.len(), 1 + INLINE_MAX);
    }
}
