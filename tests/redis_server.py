"""A throwaway redis-server for tests: 127.0.0.1, a free port, a temp dir, stopped by its PID.

It runs the settings the store's guarantees need (noeviction, AOF everysec) and an ACL user
`fhir-sidecar` limited to the `fhir-sidecar:*` keys and the commands the store uses (the
default user is off), so the tests also prove that the documented ACL is enough.
Debian package: `redis-server`. Missing binary: the Redis tests skip, unless CI is set (fail).

Fixtures (import them into a test module): `redis_server` (one per session),
`fresh_redis` (one per test, for tests that stop it), `store_factory` (parametrized over
sqlite and redis: call it for each independent store instance, like separate sidecars).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest

ACL = ("resetkeys ~fhir-sidecar:* resetchannels -@all +ping +get +set +del +eval +evalsha "
       "+script|load +hmget +hset +pexpire +time +select")


def _die_with_parent() -> None:
    # Linux: if pytest is killed (timeout, SIGKILL) before teardown, the kernel stops the server.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="fhs-redis-"))
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://fhir-sidecar@127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        for _ in range(3):  # the free port may be taken between probe and bind: try another
            self.port = _free_port()
            conf = self.dir / "redis.conf"
            conf.write_text("\n".join([
                "bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f"dir {self.dir}",
                "daemonize no", 'save ""', "appendonly yes", "appendfsync everysec",
                "maxmemory 64mb", "maxmemory-policy noeviction", "loglevel warning",
                f"logfile {self.dir / 'redis.log'}",
                "user default off", f"user fhir-sidecar on >{self.password} {ACL}", ""]))
            self.proc = subprocess.Popen([self.binary, str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
            if self._wait_ready(5.0):
                return self
            self.stop()
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] if (self.dir / "redis.log").exists() else ""
        self.cleanup()
        raise RuntimeError(f"redis-server did not start: {log}")

    def _wait_ready(self, timeout: float) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                r = redis.Redis(host="127.0.0.1", port=self.port, username="fhir-sidecar",
                                password=self.password, socket_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))
                try:
                    if r.ping():
                        return True
                finally:
                    r.close()
            except redis.RedisError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)  # by PID: only the server this fixture started
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)
    if found is None:
        msg = "redis-server not found (Debian package: redis-server)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer(_binary()).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    srv = RedisServer(_binary()).start()
    try:
        yield srv
    finally:
        srv.cleanup()


StoreFactory = Callable[[], object]


@pytest.fixture(params=["sqlite", "redis"])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Each call opens another store instance on the same state (one file / one prefix)."""
    from sidecar.state import open_store

    made: list = []
    if request.param == "sqlite":
        spec, password, opts = f"sqlite:{tmp_path / 'state.db'}", None, {}
    else:
        srv: RedisServer = request.getfixturevalue("redis_server")
        # A prefix per test keeps tests apart on the shared server (inside the ACL's key pattern).
        spec, password, opts = srv.url, srv.password, {"prefix": f"fhir-sidecar:t{uuid.uuid4().hex[:12]}:"}

    def make() -> object:
        s = open_store(spec, password, **opts)
        made.append(s)
        return s

    make.backend = request.param  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for s in made:
            await s.close()
