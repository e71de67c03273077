"""The seed's exception table, one class each, raised from the
``distcache-reason`` a node attaches to every error."""

from typing import Optional

import grpc


class DistributedCacheError(Exception):
    """Base of every distcache error."""


class LockAcquireTimeoutError(DistributedCacheError):
    """Lock not acquired within ``acquire_timeout``."""


class LockHoldTimeoutError(DistributedCacheError):
    """Lock expired while held (raised on ``release()``)."""


class LockNotHeldError(DistributedCacheError):
    """Attempted to release a lock not owned by this handle."""


class QuorumLostError(DistributedCacheError):
    """Write attempted while the node sees no majority (nothing was applied)."""


class ClusterNotReadyError(DistributedCacheError):
    """Operation attempted before the cluster has formed."""


class CollectionNotFoundError(DistributedCacheError):
    """Operation on a non-existent collection."""


class PartitionNotOwnedError(DistributedCacheError):
    """Request routed to a node that does not own the partition (stale table)."""


class LimitExceededError(DistributedCacheError):
    """A key, value or batch above the node's limits."""


class MemoryLimitError(DistributedCacheError):
    """The node holds its --max-memory of entries: writes are refused, reads and deletes work."""


class InvalidArgumentError(DistributedCacheError):
    """The request was malformed (e.g. incrementing a non-integer)."""


class UnavailableError(DistributedCacheError):
    """The node or cluster cannot serve now; a write's outcome is unknown."""


class UnauthenticatedError(DistributedCacheError):
    """No valid credential."""


class NotAuthorizedError(DistributedCacheError):
    """The credential lacks the grant the call needs."""


_BY_REASON = {
    "LOCK_ACQUIRE_TIMEOUT": LockAcquireTimeoutError,
    "LOCK_HOLD_TIMEOUT": LockHoldTimeoutError,
    "LOCK_NOT_HELD": LockNotHeldError,
    "QUORUM_LOST": QuorumLostError,
    "CLUSTER_NOT_READY": ClusterNotReadyError,
    "COLLECTION_NOT_FOUND": CollectionNotFoundError,
    "NOT_OWNER": PartitionNotOwnedError,
    "LIMIT_EXCEEDED": LimitExceededError,
    "MEMORY_LIMIT": MemoryLimitError,
    "INVALID_ARGUMENT": InvalidArgumentError,
    "UNAVAILABLE": UnavailableError,
    "PARTITION_UNAVAILABLE": UnavailableError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "NOT_AUTHORIZED": NotAuthorizedError,
}

_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: NotAuthorizedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
}


def reason_of(err: grpc.RpcError) -> Optional[str]:
    """The ``distcache-reason`` of a failed call, if the node sent one."""
    md = getattr(err, "trailing_metadata", lambda: None)() or ()
    for k, v in md:
        if k == "distcache-reason":
            return v
    return None


def from_rpc_error(err: grpc.RpcError) -> DistributedCacheError:
    """The typed error for a failed call."""
    reason = reason_of(err)
    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(err.code(), DistributedCacheError)
    return cls(f"{err.code().name}: {err.details()}")


def from_reason(reason_name: str, message: str) -> DistributedCacheError:
    """The typed error for a Batch-style error."""
    return _BY_REASON.get(reason_name, DistributedCacheError)(message)
