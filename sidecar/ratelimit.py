"""Per-client token buckets for reads and writes, shared through the state store.

The bucket lives in the store (Redis: one Lua script on the server's clock; SQLite: one
transaction), so every replica and worker draws from the same bucket: N replicas do not
multiply a client's allowance by N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote

from sidecar.errors import Refusal
from sidecar.state.base import StateStore, retry_after_s


@dataclass(frozen=True, slots=True)
class Limit:
    rate: float   # tokens per second (sustained requests/s)
    burst: float  # bucket capacity (requests allowed at once after a quiet spell)

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError("rate limit needs rate > 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class ClientLimits:
    reads: Limit | None = None   # None: unlimited
    writes: Limit | None = None


class RateLimiter:
    def __init__(self, store: StateStore, default: ClientLimits = ClientLimits(),
                 per_client: Mapping[str, ClientLimits] | None = None) -> None:
        self.store = store
        self.default = default
        self.per_client = dict(per_client or {})

    def limit_for(self, client_id: str, is_write: bool) -> Limit | None:
        lim = self.per_client.get(client_id, self.default)
        return lim.writes if is_write else lim.reads

    async def allow(self, client_id: str, is_write: bool, cost: float = 1.0) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying). `cost`: e.g. a batch's entry count,
        capped at the burst so a big batch is slow, never impossible.
        Raises StateUnavailable when the store cannot be reached (callers fail closed)."""
        lim = self.limit_for(client_id, is_write)
        if lim is None:
            return True, 0.0
        key = f"rl:{'w' if is_write else 'r'}:{quote(client_id, safe='')}"
        return await self.store.take(key, lim.rate, lim.burst, min(max(cost, 1.0), lim.burst))

    async def check(self, client_id: str, is_write: bool, cost: float = 1.0) -> None:
        """The pipeline guard: raises 429 + Retry-After when over the limit."""
        ok, wait = await self.allow(client_id, is_write, cost)
        if not ok:
            raise Refusal(429, f"rate limit exceeded for this client's {'writes' if is_write else 'reads'}",
                          "throttled", (("Retry-After", str(retry_after_s(wait))),))
