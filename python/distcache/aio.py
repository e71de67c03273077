"""The asyncio variant: the same surface as ``distcache.DistributedCache``,
each call awaited (run on a worker thread over the synchronous client, so an
event loop is never blocked)."""

import asyncio
from typing import Any

from . import client


class _Async:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any):
            result = await asyncio.to_thread(attr, *args, **kwargs)
            if isinstance(result, (client.Collection, client.Lock)):
                return Collection(result) if isinstance(result, client.Collection) else Lock(result)
            return result
        return call


class Collection(_Async):
    """An async handle on a collection."""


class Lock(_Async):
    """An async lock: ``async with await cache.lock("job") as lock``."""

    @property
    def fencing_token(self):
        return self._inner.fencing_token

    async def __aenter__(self) -> "Lock":
        await asyncio.to_thread(self._inner.acquire)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await asyncio.to_thread(self._inner.__exit__, exc_type, exc, tb)


class DistributedCache(_Async):
    """``await DistributedCache.connect(endpoints, ...)``, then the sync API awaited."""

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> "DistributedCache":
        return cls(await asyncio.to_thread(client.DistributedCache, *args, **kwargs))

    def collection(self, name: str) -> Collection:
        return Collection(self._inner.collection(name))

    def lock(self, *args: Any, **kwargs: Any) -> Lock:
        return Lock(self._inner.lock(*args, **kwargs))
