"""A read cache in front of the state store for hot, rarely-changing keys (breaker, back-off).

Every request consults the breaker and the back-off hold; a store round trip each time (a
thread hop for SQLite, a network call for Redis) would dominate the request. Reads of those
keys are served from memory for `ttl_s`; this process's own writes update the cache at once,
other replicas' writes are seen within `ttl_s`. An unreachable store still fails closed once
the cached value is older than `ttl_s`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from sidecar.state.base import StateStore


class CachedReads:
    def __init__(self, store: StateStore, *, prefixes: tuple[str, ...], ttl_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._prefixes = prefixes
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, bytes | None]] = {}

    def __getattr__(self, name: str) -> Any:  # take, flags, ping, close: straight through
        return getattr(self._store, name)

    async def get(self, key: str) -> bytes | None:
        if not key.startswith(self._prefixes):
            return await self._store.get(key)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        value = await self._store.get(key)
        self._cache[key] = (now, value)
        return value

    async def cas(self, key: str, expect: bytes | None, new: bytes | None, ttl_s: float | None) -> bool:
        self._cache.pop(key, None)
        ok = await self._store.cas(key, expect, new, ttl_s)
        if ok and key.startswith(self._prefixes):
            self._cache[key] = (self._clock(), new)
        return ok
