"""Alert windows shared by the workers of `run --workers N` (see sidecar/workers.py).

One process's `AlertEngine` counts in memory; N workers would each see 1/N of the traffic
and raise N copies. Here the windows (timestamps of the last `limit + 1` events) and the
time an alert last fired live in the state store, updated by compare-and-swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.alerts import Alert, AlertEngine, AlertEvent

log = logging.getLogger(__name__)


class SharedAlertWindows:
    """Alert windows and repeat suppression kept in the state store (compare-and-swap), fed
    from a bounded queue by one task: the request path never waits for the store. If the store
    fails, the events of that moment are counted locally instead (an alert is never lost to a
    store outage; it may then fire once per process)."""

    MAX_QUEUE = 10_000
    CAS_TRIES = 8

    def __init__(self, engine: AlertEngine, store: Any, emit: Callable[[Alert], Awaitable[None]]) -> None:
        self._engine = engine
        self._store = store
        self._emit = emit
        self._queue: asyncio.Queue[tuple[AlertEvent, list[tuple[str, str | None, int | None]]]] = \
            asyncio.Queue(self.MAX_QUEUE)
        self.dropped = 0

    def submit(self, e: AlertEvent, actions: list[tuple[str, str | None, int | None]]) -> None:
        try:
            self._queue.put_nowait((e, actions))
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self, stop: asyncio.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            e, actions = await self._queue.get()
            for kind, client, limit in actions:
                try:
                    alert = await self._decide(kind, client, e, limit)
                except Exception as exc:  # the store is down: fall back to this process's windows
                    log.error("shared alert window unavailable (%s); counted locally", type(exc).__name__)
                    local: list[Alert] = []
                    if limit is None:
                        self._engine._fire(kind, client, e, None, local)
                    else:
                        self._engine._count(kind, client, e, limit, local)
                    alert = local[0] if local else None
                if alert is not None:
                    try:
                        await self._emit(alert)
                    except Exception as exc:
                        log.error("alert emitter failed (%s)", type(exc).__name__)

    async def drained(self) -> None:
        """Wait until every submitted event has been decided (tests)."""
        while not self._queue.empty():
            await asyncio.sleep(0.01)

    async def _decide(self, kind: str, client: str | None, e: AlertEvent, limit: int | None) -> Alert | None:
        name = f"{kind}:{client if client is not None else '-'}"
        count = None
        if limit is not None:
            window = self._engine._cfg.window_s
            times = await self._update(f"alerts:win:{name}", window,
                                        lambda ts: (ts + [e.ts])[-(limit + 1):], keep=lambda t: t > e.ts - window)
            count = len(times)
            if count <= limit:
                return None
        repeat = self._engine._repeat
        for _ in range(self.CAS_TRIES):
            old = await self._store.get(f"alerts:last:{name}")
            if old is not None and 0 <= e.ts - float(old) < repeat:
                self._engine.suppressed += 1
                return None
            if await self._store.cas(f"alerts:last:{name}", old, repr(e.ts).encode(), max(repeat, 1.0)):
                return self._engine._alert(kind, client, e, count)
        raise RuntimeError("alert suppression: too much contention")

    async def _update(self, key: str, ttl_s: float, change: Callable[[list[float]], list[float]],
                      keep: Callable[[float], bool]) -> list[float]:
        for _ in range(self.CAS_TRIES):
            old = await self._store.get(key)
            times = [t for t in (json.loads(old) if old else []) if keep(t)]
            new = change(times)
            if await self._store.cas(key, old, json.dumps(new).encode(), max(ttl_s, 1.0)):
                return new
        raise RuntimeError("alert window: too much contention")
