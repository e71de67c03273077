"""The synchronous client: ``DistributedCache`` with the seed's operations,
routing each key straight to its partition's primary."""

import random
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import grpc

from . import errors, values
from .partition import lock_partition_for, partition_for, resolve_collection
from .v1 import distcache_pb2 as pb
from .v1 import distcache_pb2_grpc as rpc

Key = Union[str, bytes]

# Answers that guarantee nothing was applied: retried for every call
# (QUORUM_LOST: refused before applying, e.g. a member that lost its lease
# for a moment; as the Rust client does).
_RETRY_ROUTING = {"NOT_OWNER", "CLUSTER_NOT_READY", "QUORUM_LOST"}


def _key(k: Key) -> bytes:
    return k.encode("utf-8") if isinstance(k, str) else bytes(k)


def _ttl_ms(ttl: Optional[float]) -> Optional[int]:
    return None if ttl is None else max(int(ttl * 1000), 1)


def _backoff(attempt: int) -> float:
    """Exponential from 20 ms to 1.28 s with full jitter over its upper half."""
    ceiling = 0.02 * (2 ** min(attempt, 6))
    return ceiling / 2 + random.random() * ceiling / 2


class DistributedCache:
    """A cluster, seen through any of its members.

    >>> cache = DistributedCache(["127.0.0.1:7100"])  # doctest: +SKIP
    >>> sessions = cache.get_collection("sessions", default_ttl=3600)  # doctest: +SKIP
    """

    def __init__(self, endpoints: Union[str, Sequence[str]], *, token: Optional[str] = None,
                 tls_ca: Optional[bytes] = None, tls_server_name: Optional[str] = None,
                 timeout: float = 10.0, max_retries: int = 5):
        self._seeds = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self._seeds:
            raise ValueError("no endpoints given")
        self._token, self._tls_ca, self._server_name = token, tls_ca, tls_server_name
        self.timeout, self.max_retries = timeout, max_retries
        self._channels: Dict[str, grpc.Channel] = {}
        self._guard = threading.Lock()
        self._epoch, self._count = -1, 271
        self._owners: Dict[int, str] = {}
        self._addresses: List[str] = list(self._seeds)
        self.refresh()

    # ------------------------------------------------------------ plumbing

    def _channel(self, address: str) -> grpc.Channel:
        with self._guard:
            ch = self._channels.get(address)
            if ch is None:
                if self._tls_ca is not None:
                    creds = grpc.ssl_channel_credentials(root_certificates=self._tls_ca)
                    opts = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
                    ch = grpc.secure_channel(address, creds, options=opts)
                else:
                    ch = grpc.insecure_channel(address)
                self._channels[address] = ch
            return ch

    def _md(self):
        return [("authorization", f"Bearer {self._token}")] if self._token else None

    def refresh(self) -> None:
        """Reloads the partition table, keeping the newest epoch any member has."""
        best, last = None, None
        for address in dict.fromkeys(self._addresses + self._seeds):
            try:
                t = rpc.ClusterStub(self._channel(address)).PartitionTable(
                    pb.PartitionTableRequest(), timeout=min(self.timeout, 2.0), metadata=self._md())
            except grpc.RpcError as e:
                last = e
                continue
            if best is None or t.epoch > best.epoch:
                best = t
        if best is None:
            raise errors.from_rpc_error(last) if last else errors.UnavailableError("no member reachable")
        if best.epoch < self._epoch:
            return
        address_of = {m.name: m.address for m in best.members}
        self._epoch, self._count = best.epoch, best.partition_count
        self._owners = {p.partition: address_of.get(p.primary, "") for p in best.partitions}
        self._addresses = [m.address for m in best.members] or list(self._seeds)

    def _owner(self, partition: Optional[int]) -> str:
        if partition is not None and self._owners.get(partition):
            return self._owners[partition]
        return random.choice(self._addresses)

    def _call(self, partition: Optional[int], fn, *, repeatable: bool = True):
        """Runs ``fn(channel)`` on the partition's primary; retries routing
        answers, and (for ``repeatable`` calls) unavailability, with
        jittered backoff after a table refresh."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn(self._channel(self._owner(partition)))
            except grpc.RpcError as e:
                reason = errors.reason_of(e)
                unavailable = e.code() in (grpc.StatusCode.UNAVAILABLE,) and reason in (None, "UNAVAILABLE")
                if attempt == self.max_retries or not (reason in _RETRY_ROUTING or (repeatable and unavailable)):
                    raise errors.from_rpc_error(e) from None
                try:
                    self.refresh()
                except errors.DistributedCacheError:
                    pass
                time.sleep(_backoff(attempt))
        raise errors.UnavailableError("retries exhausted")

    def _unary(self, partition, service, method: str, request, *, repeatable: bool = True, timeout=None):
        def go(ch):
            return getattr(service(ch), method)(request, timeout=timeout or self.timeout, metadata=self._md())
        return self._call(partition, go, repeatable=repeatable)

    def partition_of(self, collection: str, key: Key) -> int:
        """The partition of ``key`` in ``collection``."""
        return partition_for(resolve_collection(collection), _key(key), self._count)

    # ------------------------------------------------------------ collections

    def get_collection(self, name: str, default_ttl: Optional[float] = None,
                       max_entries: Optional[int] = None) -> "Collection":
        """Gets or creates collection ``name`` (the options apply when it is created)."""
        req = pb.GetOrCreateCollectionRequest(name=name, default_ttl_ms=_ttl_ms(default_ttl) or 0,
                                              max_entries=max_entries or 0)
        self._unary(None, rpc.CollectionsStub, "GetOrCreate", req)
        return Collection(self, name)

    def collection(self, name: str) -> "Collection":
        """A handle on ``name`` without creating it (operations raise
        ``CollectionNotFoundError`` while it does not exist)."""
        return Collection(self, name)

    def list_collections(self) -> List[str]:
        """Names of every collection (that this client may see)."""
        names, token = [], ""
        while True:
            r = self._unary(None, rpc.CollectionsStub, "List", pb.ListCollectionsRequest(page_token=token))
            names += [c.name for c in r.collections]
            if not r.next_page_token:
                return names
            token = r.next_page_token

    def delete_collection(self, name: str) -> bool:
        """Clears and removes collection ``name``."""
        return self._unary(None, rpc.CollectionsStub, "Delete", pb.DeleteCollectionRequest(name=name)).deleted

    # ------------------------------------------------------------ default collection

    def __getattr__(self, op: str):
        if op in Collection.OPERATIONS:
            return getattr(Collection(self, ""), op)
        raise AttributeError(op)

    # ------------------------------------------------------------ locks

    def lock(self, key: Key, hold_timeout: float = 60.0, acquire_timeout: float = 30.0) -> "Lock":
        """A lock on ``key``, taken when the ``with`` block is entered."""
        return Lock(self, _key(key), hold_timeout, acquire_timeout)

    def force_release(self, key: Key) -> bool:
        """Releases lock ``key`` whoever holds it; True if it was held."""
        k = _key(key)
        return self._unary(lock_partition_for(k, self._count), rpc.LocksStub, "ForceRelease",
                           pb.ForceReleaseLockRequest(key=k)).released

    # ------------------------------------------------------------ cluster

    def cluster_info(self) -> Dict[str, Any]:
        """Epoch, partition count, safety and members, as one member sees them."""
        h = self._unary(None, rpc.ClusterStub, "Health", pb.HealthRequest())
        m = self._unary(None, rpc.ClusterStub, "Members", pb.MembersRequest())
        return {"epoch": h.epoch, "partition_count": h.partition_count, "safe": h.safe,
                "quorum": h.quorum, "members": [{"name": x.name, "address": x.address, "alive": x.alive}
                                                for x in m.members]}

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Collection:
    """A named collection."""

    OPERATIONS = {"put", "get", "delete", "put_many", "get_many", "delete_many", "keys", "size",
                  "clear", "put_if_absent", "compare_and_set", "increment"}

    def __init__(self, cache: DistributedCache, name: str):
        self._cache, self.name = cache, name

    def _p(self, key: bytes) -> int:
        return self._cache.partition_of(self.name, key)

    def put(self, key: Key, value: Any, ttl: Optional[float] = None) -> None:
        """Stores ``value`` (bytes as is, str and other objects marked)."""
        k = _key(key)
        self._cache._unary(self._p(k), rpc.CacheStub, "Put", pb.PutRequest(
            collection=self.name, key=k, value=values.encode(value), ttl_ms=_ttl_ms(ttl)))

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        k = _key(key)
        r = self._cache._unary(self._p(k), rpc.CacheStub, "Get", pb.GetRequest(collection=self.name, key=k))
        return values.decode(r.value) if r.found else default

    def delete(self, key: Key) -> bool:
        """Removes ``key``; True if it was there."""
        k = _key(key)
        return self._cache._unary(self._p(k), rpc.CacheStub, "Delete",
                                  pb.DeleteRequest(collection=self.name, key=k)).deleted

    def _by_owner(self, keys: Iterable[bytes]) -> Dict[str, List[bytes]]:
        groups: Dict[str, List[bytes]] = {}
        for k in keys:
            groups.setdefault(self._cache._owner(self._p(k)), []).append(k)
        return groups

    def put_many(self, entries: Union[Dict[Key, Any], Iterable[Tuple[Key, Any]]],
                 ttl: Optional[float] = None) -> None:
        """Stores every entry, one call per owner."""
        items = entries.items() if isinstance(entries, dict) else entries
        by_key = {_key(k): values.encode(v) for k, v in items}
        for keys in self._by_owner(by_key).values():
            kvs = [pb.KeyValue(key=k, value=by_key[k]) for k in keys]
            self._cache._unary(self._p(keys[0]), rpc.CacheStub, "PutMany",
                               pb.PutManyRequest(collection=self.name, entries=kvs, ttl_ms=_ttl_ms(ttl)))

    def get_many(self, keys: Iterable[Key]) -> Dict[Key, Any]:
        """The present values of ``keys`` (missing ones left out)."""
        wanted = {_key(k): k for k in keys}
        out: Dict[Key, Any] = {}
        for group in self._by_owner(wanted).values():
            r = self._cache._unary(self._p(group[0]), rpc.CacheStub, "GetMany",
                                   pb.GetManyRequest(collection=self.name, keys=group))
            for e in r.entries:
                out[wanted[e.key]] = values.decode(e.value)
        return out

    def delete_many(self, keys: Iterable[Key]) -> int:
        """Removes ``keys``; how many were there."""
        n = 0
        for group in self._by_owner(_key(k) for k in keys).values():
            n += self._cache._unary(self._p(group[0]), rpc.CacheStub, "DeleteMany",
                                    pb.DeleteManyRequest(collection=self.name, keys=group)).deleted
        return n

    def keys(self) -> List[bytes]:
        """Every live key (the whole cluster; paged)."""
        out, token = [], b""
        while True:
            r = self._cache._unary(None, rpc.CacheStub, "Keys",
                                   pb.KeysRequest(collection=self.name, page_token=token))
            out += list(r.keys)
            if not r.next_page_token:
                return out
            token = r.next_page_token

    def size(self) -> int:
        """Live entries in the whole cluster."""
        return self._cache._unary(None, rpc.CacheStub, "Size", pb.SizeRequest(collection=self.name)).size

    def clear(self) -> int:
        """Removes every entry; how many were removed."""
        return self._cache._unary(None, rpc.CacheStub, "Clear", pb.ClearRequest(collection=self.name)).removed

    def put_if_absent(self, key: Key, value: Any, ttl: Optional[float] = None) -> bool:
        """Stores ``value`` only if ``key`` holds nothing; True if stored."""
        k = _key(key)
        return self._cache._unary(self._p(k), rpc.CacheStub, "PutIfAbsent", pb.PutIfAbsentRequest(
            collection=self.name, key=k, value=values.encode(value), ttl_ms=_ttl_ms(ttl)),
            repeatable=False).stored

    def compare_and_set(self, key: Key, expected: Any, new: Any, ttl: Optional[float] = None) -> bool:
        """Replaces ``expected`` with ``new``; True if replaced."""
        k = _key(key)
        return self._cache._unary(self._p(k), rpc.CacheStub, "CompareAndSet", pb.CompareAndSetRequest(
            collection=self.name, key=k, expected=values.encode(expected), value=values.encode(new),
            ttl_ms=_ttl_ms(ttl)), repeatable=False).swapped

    def increment(self, key: Key, delta: int = 1) -> int:
        """Adds ``delta`` to the integer at ``key`` (absent = 0); the new value."""
        k = _key(key)
        return self._cache._unary(self._p(k), rpc.CacheStub, "Increment",
                                  pb.IncrementRequest(collection=self.name, key=k, delta=delta),
                                  repeatable=False).value


class Lock:
    """A held lock: ``with cache.lock("job") as lock: use(lock.fencing_token)``.
    Leaving the block releases it, also when the block raised."""

    def __init__(self, cache: DistributedCache, key: bytes, hold_timeout: float, acquire_timeout: float):
        self._cache, self.key = cache, key
        self.hold_timeout, self.acquire_timeout = hold_timeout, acquire_timeout
        self.fencing_token: Optional[int] = None

    def _p(self) -> int:
        return lock_partition_for(self.key, self._cache._count)

    def acquire(self) -> "Lock":
        g = self._cache._unary(self._p(), rpc.LocksStub, "Acquire", pb.AcquireLockRequest(
            key=self.key, hold_timeout_ms=_ttl_ms(self.hold_timeout), acquire_timeout_ms=_ttl_ms(self.acquire_timeout)),
            repeatable=False, timeout=self._cache.timeout + self.acquire_timeout)
        self.fencing_token = g.fencing_token
        return self

    def release(self) -> None:
        """Releases the lock (``LockHoldTimeoutError`` if its lease ran out)."""
        token, self.fencing_token = self.fencing_token, None
        if token is not None:
            self._cache._unary(self._p(), rpc.LocksStub, "Release",
                               pb.ReleaseLockRequest(key=self.key, fencing_token=token), repeatable=False)

    def extend(self, hold_timeout: float) -> None:
        """Renews the lease to ``hold_timeout`` seconds from now."""
        self._cache._unary(self._p(), rpc.LocksStub, "Extend", pb.ExtendLockRequest(
            key=self.key, fencing_token=self.fencing_token or 0, hold_timeout_ms=_ttl_ms(hold_timeout)),
            repeatable=False)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except errors.DistributedCacheError:
            if exc_type is None:
                raise
