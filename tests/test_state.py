"""The state-store primitives on both backends (sqlite file, real redis-server), open_store
parsing, and fail-closed behaviour when the store goes away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sidecar.idempotency import Idempotency, fingerprint
from sidecar.state import SqliteStore, StateStore, StateUnavailable, open_store, retry_after_s
from tests.redis_server import fresh_redis, redis_server, store_factory  # noqa: F401  (fixtures)


async def test_cas_get_delete(store_factory) -> None:
    s = store_factory()
    assert isinstance(s, StateStore)
    assert await s.get("k") is None
    assert await s.cas("k", None, b"v1", 60)
    assert not await s.cas("k", None, b"other", 60)            # NX: present
    assert not await s.cas("k", b"wrong", b"v2", 60)           # compare fails
    assert await s.get("k") == b"v1"
    assert await s.cas("k", b"v1", b"\x00bin\xffary", 60)     # binary-safe
    assert await s.get("k") == b"\x00bin\xffary"
    assert await s.cas("k", b"\x00bin\xffary", None, None)     # delete
    assert await s.get("k") is None
    assert not await s.cas("k", b"v1", None, None)


async def test_ttl_expiry(store_factory) -> None:
    s = store_factory()
    assert await s.cas("short", None, b"x", 0.2)
    assert await s.get("short") == b"x"
    await asyncio.sleep(0.35)
    assert await s.get("short") is None
    assert await s.cas("short", None, b"y", 60)                # expired counts as absent


async def test_two_instances_share_state(store_factory) -> None:
    a, b = store_factory(), store_factory()
    assert await a.cas("shared", None, b"1", 60)
    assert await b.get("shared") == b"1"
    assert await b.cas("shared", b"1", b"2", 60)
    assert not await a.cas("shared", b"1", b"3", 60)


async def test_flags(store_factory) -> None:
    a, b = store_factory(), store_factory()
    assert await b.get_flag("killswitch") is None
    await a.set_flag("killswitch", "on")
    await a.set_flag("killswitch:scribe-app", "on")
    assert await b.get_flag("killswitch") == "on"
    assert await b.get_flag("killswitch:scribe-app") == "on"
    await a.set_flag("killswitch", None)
    assert await b.get_flag("killswitch") is None
    await a.set_flag("temp", "x", ttl_s=0.2)
    await asyncio.sleep(0.35)
    assert await b.get_flag("temp") is None


async def test_token_bucket_primitive(store_factory) -> None:
    s = store_factory()
    results = [await s.take("b", rate=1.0, burst=3) for _ in range(4)]
    assert [ok for ok, _ in results] == [True, True, True, False]
    assert all(w == 0.0 for _, w in results[:3])
    assert 0.5 < results[3][1] <= 1.0
    fast = [await s.take("fast", rate=20.0, burst=1) for _ in range(2)]
    assert [ok for ok, _ in fast] == [True, False]
    await asyncio.sleep(fast[1][1] + 0.02)
    assert (await s.take("fast", rate=20.0, burst=1))[0]
    with pytest.raises(ValueError):
        await s.take("b", rate=0, burst=1)


async def test_ping(store_factory) -> None:
    await store_factory().ping()


def test_open_store_specs(tmp_path: Path) -> None:
    assert open_store(f"sqlite:{tmp_path}/a.db").path == f"{tmp_path}/a.db"        # type: ignore[attr-defined]
    assert open_store(f"sqlite://{tmp_path}/a.db").path == f"{tmp_path}/a.db"      # type: ignore[attr-defined]
    assert open_store("sqlite:rel/state.db").path == "rel/state.db"                # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        open_store("sqlite:")
    with pytest.raises(ValueError):
        open_store("sqlite:/x.db", "pw")
    with pytest.raises(ValueError, match="password"):
        open_store("redis://user:inline@127.0.0.1:6379/0")
    with pytest.raises(ValueError):
        open_store("memcached://127.0.0.1")
    r = open_store("redis://fhir-sidecar@127.0.0.1:1/0", "pw")
    assert r.backend == "redis"


def test_retry_after_rounding() -> None:
    assert retry_after_s(0.01) == 1 and retry_after_s(1.0) == 1 and retry_after_s(1.2) == 2


async def test_sqlite_unusable_path_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    s = SqliteStore(tmp_path / "file" / "state.db")
    for call in (s.ping(), s.get("k"), s.cas("k", None, b"v", 1), s.take("b", 1, 1)):
        with pytest.raises(StateUnavailable):
            await call
    await s.close()
    with pytest.raises(StateUnavailable):
        await s.get("k")                                        # closed store: fail closed too


async def test_sqlite_two_processes_style_connections(tmp_path: Path) -> None:
    # Two stores on one file behave like two worker processes: WAL, BEGIN IMMEDIATE.
    a, b = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    try:
        wins = await asyncio.gather(*[(a if i % 2 else b).cas("one", None, str(i).encode(), 60) for i in range(40)])
        assert sum(wins) == 1
    finally:
        await a.close()
        await b.close()


async def test_redis_stopped_mid_test_fails_closed(fresh_redis) -> None:
    s = open_store(fresh_redis.url, fresh_redis.password, prefix="fhir-sidecar:stop:")
    idem = Idempotency(s)
    fp = fingerprint("POST", "/Observation", {}, b"{}")
    try:
        assert await s.cas("k", None, b"v", 60)
        assert await idem.lookup_or_reserve("app", "key-00000001", fp)
        fresh_redis.stop()
        t0 = time.monotonic()
        for call in (s.get("k"), s.cas("k", b"v", b"w", 60), s.cas("n", None, b"v", 60), s.take("b", 1, 1),
                     s.set_flag("killswitch", "on"), s.get_flag("killswitch"), s.ping(),
                     idem.lookup_or_reserve("app", "key-00000002", fp)):
            with pytest.raises(StateUnavailable) as ei:
                await call
            assert ei.value.refusal().status == 503
        assert time.monotonic() - t0 < 10                     # fails fast, no long retry loop
    finally:
        await s.close()


async def test_redis_wrong_password_fails_closed(redis_server) -> None:
    s = open_store(redis_server.url, "not-the-password")
    try:
        with pytest.raises(StateUnavailable):
            await s.ping()
    finally:
        await s.close()


async def test_redis_acl_confines_keys(redis_server) -> None:
    # The ACL user may only touch fhir-sidecar:*; a store with another prefix is refused (NOPERM).
    s = open_store(redis_server.url, redis_server.password, prefix="elsewhere:")
    try:
        with pytest.raises(StateUnavailable, match="NoPermission|NOPERM|permission"):
            await s.get("k")
    finally:
        await s.close()


async def test_sqlite_many_stores_open_a_new_file_at_once(tmp_path: Path) -> None:
    # Workers starting together all switch the new file to WAL and create the schema.
    for round_ in range(5):
        stores = [SqliteStore(tmp_path / f"n{round_}.db") for _ in range(6)]
        try:
            wins = await asyncio.gather(*[s.cas("k", None, b"v", 60) for s in stores])
            assert sum(wins) == 1
        finally:
            for s in stores:
                await s.close()
