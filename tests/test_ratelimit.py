"""Per-client token buckets, shared by two store instances (two replicas), on both backends."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import Refusal
from sidecar.ratelimit import ClientLimits, Limit, RateLimiter
from tests.redis_server import redis_server, store_factory  # noqa: F401  (fixtures)

LIMITS = ClientLimits(reads=Limit(rate=1.0, burst=4), writes=Limit(rate=0.5, burst=2))


async def test_bucket_is_shared_across_instances(store_factory) -> None:
    a = RateLimiter(store_factory(), LIMITS)
    b = RateLimiter(store_factory(), LIMITS)
    assert (await a.allow("app", True))[0]
    assert (await b.allow("app", True))[0]
    ok, wait = await a.allow("app", True)                  # 2 writes across 2 replicas drained the burst
    assert not ok and 1.0 < wait <= 2.0                     # rate 0.5/s: a token in <= 2 s
    ok, _ = await b.allow("app", True)
    assert not ok
    reads = [(await (a if i % 2 else b).allow("app", False))[0] for i in range(5)]
    assert reads == [True, True, True, True, False]        # reads have their own bucket


async def test_clients_have_their_own_buckets(store_factory) -> None:
    rl = RateLimiter(store_factory(), LIMITS, {"bulk": ClientLimits(writes=Limit(rate=100, burst=50))})
    for _ in range(2):
        await rl.check("app", True)
    with pytest.raises(Refusal) as ei:
        await rl.check("app", True)
    assert ei.value.status == 429 and ei.value.code == "throttled"
    assert dict(ei.value.headers)["Retry-After"] == "2"
    await rl.check("app:x", True)                           # another client is untouched
    for _ in range(50):
        await rl.check("bulk", True)
    for _ in range(10):
        await rl.check("bulk", False)                       # per-client reads: None = unlimited


async def test_refill_over_time(store_factory) -> None:
    rl = RateLimiter(store_factory(), ClientLimits(writes=Limit(rate=10, burst=1)))
    assert (await rl.allow("app", True))[0]
    ok, wait = await rl.allow("app", True)
    assert not ok and 0 < wait <= 0.1
    await asyncio.sleep(wait + 0.03)
    assert (await rl.allow("app", True))[0]


async def test_batch_cost_is_capped_at_burst(store_factory) -> None:
    rl = RateLimiter(store_factory(), ClientLimits(writes=Limit(rate=1, burst=3)))
    assert (await rl.allow("app", True, cost=50))[0]        # a big batch takes the whole burst
    assert not (await rl.allow("app", True))[0]


def test_limit_validation() -> None:
    with pytest.raises(ValueError):
        Limit(rate=0, burst=1)
    with pytest.raises(ValueError):
        Limit(rate=1, burst=0.5)
