"""The key -> partition contract shared by every client and node:
``xxh3_64(collection_utf8 || 0xFF || key) mod partition_count`` (seed 0);
the empty collection name means ``__default__``; lock keys hash under
``__lock__``. Pinned vectors: ``client/src/partition.rs``."""

import xxhash

DEFAULT_COLLECTION = "__default__"
LOCK_NAMESPACE = "__lock__"


def resolve_collection(name: str) -> str:
    """The wire's empty collection name is the default collection."""
    return name or DEFAULT_COLLECTION


def partition_for(collection: str, key: bytes, partition_count: int) -> int:
    """The partition of ``key`` in ``collection``."""
    h = xxhash.xxh3_64()
    h.update(collection.encode("utf-8"))
    h.update(b"\xff")
    h.update(key)
    return h.intdigest() % max(partition_count, 1)


def lock_partition_for(key: bytes, partition_count: int) -> int:
    """The partition that owns lock ``key``."""
    return partition_for(LOCK_NAMESPACE, key, partition_count)
