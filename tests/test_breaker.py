"""Circuit breaker (open, single half-open probe, close/reopen) and upstream back-off holds,
shared by two store instances, on both backends. Time is a fake clock."""

from __future__ import annotations

import asyncio
from email.utils import formatdate

import pytest

from sidecar.breaker import Backoff, Breaker, is_failure, parse_retry_after
from sidecar.errors import Refusal
from tests.redis_server import redis_server, store_factory  # noqa: F401  (fixtures)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_opens_after_n_consecutive_failures(store_factory) -> None:
    clock = Clock()
    a = Breaker(store_factory(), threshold=3, cooldown_s=10, clock=clock)
    b = Breaker(store_factory(), threshold=3, cooldown_s=10, clock=clock)
    await a.record(500)
    await b.record(None)                                   # timeouts count
    await a.record(201)                                    # a success resets the streak
    for _ in range(2):
        await a.record(503)
    assert not await b.admit()                             # 2 consecutive: still closed
    await b.record(502)
    assert (await a.state()).state == "open"
    with pytest.raises(Refusal) as ei:
        await a.admit()
    assert ei.value.status == 503 and dict(ei.value.headers)["Retry-After"] == "10"
    await a.record(200)                                    # a late answer does not close it
    assert (await b.state()).state == "open"


async def test_half_open_single_probe_success_closes(store_factory) -> None:
    clock = Clock()
    a = Breaker(store_factory(), threshold=1, cooldown_s=10, probe_timeout_s=30, clock=clock)
    b = Breaker(store_factory(), threshold=1, cooldown_s=10, probe_timeout_s=30, clock=clock)
    await a.record(500)
    clock.now += 10
    results = await asyncio.gather(*[(a if i % 2 else b).admit() for i in range(10)], return_exceptions=True)
    probes = [r for r in results if r is True]
    assert len(probes) == 1                                # exactly one probe across replicas
    assert all(isinstance(r, Refusal) and r.status == 503 for r in results if r is not True)
    await b.record(200)                                    # not the probe: ignored
    assert (await a.state()).state == "half-open"
    await a.record(200, probe=True)
    assert (await b.state()).state == "closed"
    assert await b.admit() is False


async def test_probe_failure_reopens_and_lost_probe_is_replaced(store_factory) -> None:
    clock = Clock()
    br = Breaker(store_factory(), threshold=2, cooldown_s=5, probe_timeout_s=20, clock=clock)
    await br.record(500)
    await br.record(500)
    clock.now += 5
    assert await br.admit() is True
    await br.record(None, probe=True)
    st = await br.state()
    assert st.state == "open" and st.until == clock.now + 5
    clock.now += 5
    assert await br.admit() is True                        # next probe after the cool-down
    clock.now += 19
    with pytest.raises(Refusal):
        await br.admit()                                   # probe still out
    clock.now += 1
    assert await br.admit() is True                        # that probe never reported: replaced
    await br.record(204, probe=True)
    assert (await br.state()).state == "closed"


async def test_backoff_holds_writes_across_instances(store_factory) -> None:
    clock = Clock()
    a, b = Backoff(store_factory(), clock=clock), Backoff(store_factory(), clock=clock)
    assert await a.record(500, "30") is None               # only 429/503
    assert await a.record(429, None) is None               # no Retry-After: nothing held
    assert await a.record(429, "20") == 20
    with pytest.raises(Refusal) as ei:
        await b.check(is_write=True)
    assert ei.value.status == 429 and ei.value.code == "throttled"
    assert dict(ei.value.headers)["Retry-After"] == "20"
    await b.check(is_write=False)                          # reads are not held
    assert await b.record(503, "5") == 5                   # a shorter hold does not shorten it
    clock.now += 12
    with pytest.raises(Refusal) as ei:
        await a.check(True)
    assert dict(ei.value.headers)["Retry-After"] == "8"
    clock.now += 8
    await a.check(True)                                    # time passed: writes go again


async def test_backoff_http_date_and_cap(store_factory) -> None:
    clock = Clock()
    bo = Backoff(store_factory(), max_hold_s=60, clock=clock)
    assert await bo.record(503, formatdate(clock.now + 45, usegmt=True)) == pytest.approx(45, abs=1)
    with pytest.raises(Refusal) as ei:
        await bo.check(True)
    assert ei.value.status == 503 and ei.value.code == "transient"
    assert await bo.record(503, "86400") == 60             # capped


def test_helpers() -> None:
    assert is_failure(None) and is_failure(500) and is_failure(503) and not is_failure(501)
    assert not is_failure(404) and not is_failure(429)
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("soon", 0) is None and parse_retry_after(None, 0) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 2e9) == 0.0
