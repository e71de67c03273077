"""distcache: the Python client (the seed's API over distcache's gRPC)."""

from .client import Collection, DistributedCache, Lock
from .errors import (ClusterNotReadyError, CollectionNotFoundError, DistributedCacheError,
                     InvalidArgumentError, LimitExceededError, LockAcquireTimeoutError,
                     LockHoldTimeoutError, LockNotHeldError, MemoryLimitError, NotAuthorizedError,
                     PartitionNotOwnedError, QuorumLostError, UnauthenticatedError,
                     UnavailableError)
from .partition import lock_partition_for, partition_for

__all__ = [
    "DistributedCache", "Collection", "Lock", "partition_for", "lock_partition_for",
    "DistributedCacheError", "LockAcquireTimeoutError", "LockHoldTimeoutError", "LockNotHeldError",
    "QuorumLostError", "ClusterNotReadyError", "CollectionNotFoundError", "PartitionNotOwnedError",
    "LimitExceededError", "InvalidArgumentError", "UnavailableError", "UnauthenticatedError",
    "NotAuthorizedError", "MemoryLimitError",
]
