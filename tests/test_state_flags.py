"""The shared kill-switch flags on both backends: set by one replica, seen by another; an
unreachable store or a stale view counts as engaged (fail closed)."""

from __future__ import annotations

from sidecar.state import open_store
from sidecar.state.flags import SharedKillFlags, is_engaged, set_killswitch
from tests.redis_server import fresh_redis, redis_server, store_factory  # noqa: F401  (fixtures)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_flags_shared_between_replicas(store_factory) -> None:
    clock = Clock()
    admin, flags = store_factory(), SharedKillFlags(store_factory(), ["scribe-app", "lab"], clock=clock)
    assert flags.engaged("lab")                            # never read: engaged
    assert await flags.refresh()
    assert not flags.engaged("lab") and not flags.engaged(None)
    await set_killswitch(admin, True, "scribe-app", reason="bad deploy")
    await flags.refresh()
    assert flags.engaged("scribe-app") and not flags.engaged("lab")
    await set_killswitch(admin, True)
    await flags.refresh()
    assert flags.engaged("lab") and flags.engaged(None)
    await set_killswitch(admin, False)
    await set_killswitch(admin, False, "scribe-app")
    await flags.refresh()
    assert not flags.engaged("scribe-app")
    clock.now += 10                                        # poll task stopped: stale view
    assert flags.engaged("lab")


async def test_unreachable_store_counts_as_engaged(fresh_redis) -> None:
    s = open_store(fresh_redis.url, fresh_redis.password)
    try:
        flags = SharedKillFlags(s, ["lab"])
        assert await flags.refresh() and not flags.engaged("lab")
        fresh_redis.stop()
        assert not await flags.refresh()
        assert flags.engaged("lab")
    finally:
        await s.close()


def test_flag_values() -> None:
    assert is_engaged("on") and is_engaged("") and is_engaged("yes\n")
    assert not is_engaged(None) and not is_engaged("off") and not is_engaged(" OFF \nreason")
