//! The key -> partition function: fixed contract #1.
//!
//! `partition = xxh3_64(collection_utf8 || 0xFF || key) mod partition_count`,
//! with xxh3 seed 0. The 0xFF separator never occurs in UTF-8, so distinct
//! (collection, key) pairs never produce the same hashed byte string. The node
//! calls this very function; the pinned vectors in the tests below must never
//! change without a wire-version bump.

use xxhash_rust::xxh3::Xxh3;

/// Partition count used when none is configured (as in Hazelcast).
pub const DEFAULT_PARTITION_COUNT: u32 = 271;

/// Name of the collection that always exists; an empty collection name in a
/// request means this one.
pub const DEFAULT_COLLECTION: &str = "__default__";

/// Namespace hashed in place of a collection name for lock keys, so locks are
/// partitioned like entries.
pub const LOCK_NAMESPACE: &str = "__lock__";

/// The partition that owns `key` of `collection`.
///
/// `collection` must already be resolved (empty means [`DEFAULT_COLLECTION`],
/// see [`resolve_collection`]). Panics never; `partition_count` 0 is treated
/// as 1.
///
/// ```
/// use distcache_client::partition::{partition_for, DEFAULT_PARTITION_COUNT};
/// let p = partition_for("sessions", b"user:123", DEFAULT_PARTITION_COUNT);
/// assert!(p < DEFAULT_PARTITION_COUNT);
/// ```
pub fn partition_for(collection: &str, key: &[u8], partition_count: u32) -> u32 {
    let mut h = Xxh3::new();
    h.update(collection.as_bytes());
    h.update(&[0xFF]);
    h.update(key);
    (h.digest() % u64::from(partition_count.max(1))) as u32
}

/// The partition that owns lock `key`.
pub fn lock_partition_for(key: &[u8], partition_count: u32) -> u32 {
    partition_for(LOCK_NAMESPACE, key, partition_count)
}

/// Maps the wire's empty collection name to [`DEFAULT_COLLECTION`].
pub fn resolve_collection(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_COLLECTION
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned vectors: the contract between every client and every node.
    #[test]
    fn pinned_vectors() {
        let cases: &[(&str, &[u8], u32)] = &[
            ("__default__", b"user:123", PINNED[0]),
            ("__default__", b"", PINNED[1]),
            ("sessions", b"sess:abc", PINNED[2]),
            ("sessions", b"\x00\xff\x10", PINNED[3]),
            ("__lock__", b"resource-x", PINNED[4]),
        ];
        for (c, k, want) in cases {
            assert_eq!(partition_for(c, k, 271), *want, "{c}/{k:?}");
        }
    }

    const PINNED: [u32; 5] = [173, 173, 269, 266, 60];

    #[test]
    fn collection_and_key_do_not_run_together() {
        // ("ab","c") and ("a","bc") hash different byte strings.
        let mut differ = 0;
        for i in 0..100u32 {
            let k = format!("k{i}");
            if partition_for("ab", format!("c{k}").as_bytes(), 1 << 30)
                != partition_for("a", format!("bc{k}").as_bytes(), 1 << 30)
            {
                differ += 1;
            }
        }
        assert_eq!(differ, 100);
    }

    #[test]
    fn spread_is_even() {
        let mut counts = vec![0u32; 271];
        for i in 0..271_000u32 {
            counts[partition_for("c", format!("key-{i}").as_bytes(), 271) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(
            min > Some(800) && max < Some(1200),
            "min {min:?} max {max:?}"
        );
    }

    #[test]
    fn zero_partitions_is_one() {
        assert_eq!(partition_for("c", b"k", 0), 0);
        assert_eq!(resolve_collection(""), DEFAULT_COLLECTION);
        assert_eq!(resolve_collection("x"), "x");
    }
}
