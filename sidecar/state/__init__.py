"""Shared state (receipts, rate limits, breaker, kill-switch flag) over SQLite or Redis.

`open_store("sqlite:/var/lib/fhir-sidecar/state.db", None)` or
`open_store("redis://fhir-sidecar@redis:6379/0", password)`: nothing is contacted until the
first call (use `await store.ping()` for readiness). Every failure raises `StateUnavailable`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sidecar.state.base import StateStore, StateUnavailable, retry_after_s
from sidecar.state.sqlite import SqliteStore

if TYPE_CHECKING:
    from sidecar.state.redis_store import RedisStore

__all__ = ["StateStore", "StateUnavailable", "SqliteStore", "RedisStore", "open_store", "retry_after_s"]


def open_store(spec: str, password: str | None = None, **options: Any) -> StateStore:
    """`sqlite:PATH` (`sqlite:/abs/path`, `sqlite:///abs/path`, `sqlite:rel/path`) or
    `redis://user@host:port/db` / `rediss://…` with the password from a resolved reference."""
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]  # sqlite:///abs -> /abs (empty authority)
        if not path:
            raise ValueError("sqlite store needs a path: sqlite:/var/lib/fhir-sidecar/state.db")
        if password is not None:
            raise ValueError("a sqlite store takes no password")
        return SqliteStore(path, **options)
    if spec.startswith(("redis://", "rediss://")):
        from sidecar.state.redis_store import RedisStore  # redis-py only when configured

        return RedisStore(spec, password, **options)
    raise ValueError("state.store must be sqlite:PATH or redis://user@host:port/db")


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from sidecar.state.redis_store import RedisStore

        return RedisStore
    raise AttributeError(name)
