"""The state-store contract shared by replicas: a few atomic primitives, nothing domain-specific.

Idempotency records, breaker state and back-off holds are built in Python on `get` + `cas`
(compare-and-set of whole values), so their logic exists once, not once in Lua and once in SQL.
Token buckets get their own atomic `take` because a bucket is contended by every request of a
client and an optimistic read-then-CAS loop would spin under load.

Every failure to reach or use the store raises `StateUnavailable`: callers fail closed (a write
is answered 503 by the sidecar and never forwarded).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from sidecar.errors import Refusal, unavailable


class StateUnavailable(Exception):
    """The shared state store cannot be reached or refused the operation (fail closed: 503)."""

    def refusal(self) -> Refusal:
        return unavailable("state store unavailable")


@runtime_checkable
class StateStore(Protocol):
    """Async, shared, TTL'd key/value state. Keys are short ASCII strings chosen by the callers.

    `ttl_s=None` means no expiry (kill-switch flags: a flag must never lapse silently);
    every other caller passes a TTL so nothing grows without bound.
    """

    backend: str  # "sqlite" | "redis"

    async def get(self, key: str) -> bytes | None:
        """The current value, or None when absent or expired."""
        ...

    async def cas(self, key: str, expect: bytes | None, new: bytes | None, ttl_s: float | None) -> bool:
        """Atomically: if the current value equals `expect` (None: absent or expired), replace it
        with `new` (None: delete) expiring after `ttl_s`. True when the swap happened."""
        ...

    async def take(self, key: str, rate: float, burst: float, cost: float = 1.0) -> tuple[bool, float]:
        """Token bucket (`rate` tokens/s, capacity `burst`, starts full): take `cost` tokens.
        Returns (allowed, seconds until `cost` tokens will be there; 0.0 when allowed)."""
        ...

    async def set_flag(self, name: str, value: str | None, ttl_s: float | None = None) -> None:
        """Set (None: clear) a shared flag, e.g. the kill switch `killswitch` / `killswitch:CLIENT`."""
        ...

    async def get_flag(self, name: str) -> str | None: ...

    async def ping(self) -> None:
        """Raise StateUnavailable unless the store answers (readiness, `check --resolve`)."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> None:
    # Keys are built by our own modules; a bad one is a programming error, not a request error.
    if not key or len(key) > 512 or not key.isascii() or any(c.isspace() for c in key):
        raise ValueError(f"bad state key {key!r}")


def check_bucket(rate: float, burst: float, cost: float) -> None:
    if not (rate > 0 and burst > 0 and cost > 0):
        raise ValueError("token bucket rate, burst and cost must be > 0")


def retry_after_s(seconds: float) -> int:
    """Whole seconds for a Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))
