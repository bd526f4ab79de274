"""SQLite backend: one file shared by the workers/processes of one host.

All SQLite calls run on one dedicated worker thread per store (never on the event loop), with
one connection that only that thread touches. Writers take the write lock up front
(`BEGIN IMMEDIATE`), so a compare-and-set is a real transaction across processes too; WAL mode
lets readers go on meanwhile. Idempotency/flag writes commit with `synchronous=FULL` (a lost
reservation after a power cut could let a retried write through); token buckets with `NORMAL`
(losing a bucket refill is harmless, and buckets are written on every request).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from sidecar.state.base import StateUnavailable, check_bucket, check_key

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL, exp REAL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_exp ON kv(exp) WHERE exp IS NOT NULL;
CREATE TABLE IF NOT EXISTS bucket (k TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL,
                                   exp REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bucket_exp ON bucket(exp);
"""
_SWEEP_EVERY = 256  # write transactions between two sweeps of expired rows
_SWEEP_LIMIT = 1000


class SqliteStore:
    backend = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._busy = busy_timeout_s
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched by the worker thread only
        self._sync: str = ""
        self._writes = 0
        self._closed = False

    # -- worker-thread side ----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            c = sqlite3.connect(self.path, timeout=self._busy, isolation_level=None,
                                check_same_thread=False)
            try:
                c.execute(f"PRAGMA busy_timeout={int(self._busy * 1000)}")
                self._init(c)
            except BaseException:
                c.close()
                raise
            self._conn, self._sync = c, ""
        return self._conn

    def _init(self, c: sqlite3.Connection) -> None:
        # Switching to WAL can answer SQLITE_BUSY at once (no busy handler) while another
        # process opens the same new file: retry within the busy timeout.
        deadline = time.monotonic() + self._busy
        while True:
            try:
                mode = c.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if self.path != ":memory:" and str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
                c.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _tx(self, fn: Callable[[sqlite3.Connection, float], T], durable: bool) -> T:
        c = self._connect()
        level = "FULL" if durable else "NORMAL"
        if self._sync != level:
            c.execute(f"PRAGMA synchronous={level}")
            self._sync = level
        c.execute("BEGIN IMMEDIATE")
        try:
            out = fn(c, self._clock())
            c.execute("COMMIT")
        except BaseException:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep(c)
        return out

    def _sweep(self, c: sqlite3.Connection) -> None:
        now = self._clock()
        for table in ("kv", "bucket"):
            c.execute(f"DELETE FROM {table} WHERE k IN "
                      f"(SELECT k FROM {table} WHERE exp IS NOT NULL AND exp <= ? LIMIT {_SWEEP_LIMIT})", (now,))

    def _read(self, key: str) -> bytes | None:
        row = self._connect().execute("SELECT v, exp FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return bytes(row[0])

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error:
            # Drop the connection: a broken handle (disk error, replaced file) is reopened next call.
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error:
                    pass
                self._conn = None
            raise

    # -- event-loop side -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StateUnavailable("state store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._guarded, fn, *args)
        except (sqlite3.Error, OSError) as e:
            raise StateUnavailable(f"sqlite state store: {e}") from e

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        return await self._run(self._read, key)

    async def cas(self, key: str, expect: bytes | None, new: bytes | None, ttl_s: float | None) -> bool:
        check_key(key)

        def swap(c: sqlite3.Connection, now: float) -> bool:
            row = c.execute("SELECT v, exp FROM kv WHERE k = ?", (key,)).fetchone()
            cur = None if row is None or (row[1] is not None and row[1] <= now) else bytes(row[0])
            if cur != expect:
                return False
            if new is None:
                c.execute("DELETE FROM kv WHERE k = ?", (key,))
            else:
                exp = None if ttl_s is None else now + ttl_s
                c.execute("INSERT INTO kv (k, v, exp) VALUES (?, ?, ?) "
                          "ON CONFLICT(k) DO UPDATE SET v = excluded.v, exp = excluded.exp", (key, new, exp))
            return True

        return await self._run(self._tx, swap, True)

    async def take(self, key: str, rate: float, burst: float, cost: float = 1.0) -> tuple[bool, float]:
        check_key(key)
        check_bucket(rate, burst, cost)

        def take(c: sqlite3.Connection, now: float) -> tuple[bool, float]:
            row = c.execute("SELECT tokens, ts, exp FROM bucket WHERE k = ?", (key,)).fetchone()
            tokens, ts = (burst, now) if row is None or row[2] <= now else (row[0], row[1])
            tokens = min(burst, tokens + max(0.0, now - ts) * rate)  # max(): the clock may step back
            ok = tokens >= cost
            wait = 0.0 if ok else (cost - tokens) / rate
            if ok:
                tokens -= cost
            # A bucket that would be full again anyway can expire: absent == full.
            exp = now + (burst - tokens) / rate + 1.0
            c.execute("INSERT INTO bucket (k, tokens, ts, exp) VALUES (?, ?, ?, ?) ON CONFLICT(k) DO UPDATE "
                      "SET tokens = excluded.tokens, ts = excluded.ts, exp = excluded.exp", (key, tokens, now, exp))
            return ok, wait

        return await self._run(self._tx, take, False)

    async def set_flag(self, name: str, value: str | None, ttl_s: float | None = None) -> None:
        key = "flag:" + name
        check_key(key)

        def put(c: sqlite3.Connection, now: float) -> None:
            if value is None:
                c.execute("DELETE FROM kv WHERE k = ?", (key,))
            else:
                c.execute("INSERT INTO kv (k, v, exp) VALUES (?, ?, ?) "
                          "ON CONFLICT(k) DO UPDATE SET v = excluded.v, exp = excluded.exp",
                          (key, value.encode(), None if ttl_s is None else now + ttl_s))

        await self._run(self._tx, put, True)

    async def get_flag(self, name: str) -> str | None:
        v = await self.get("flag:" + name)
        return None if v is None else v.decode()

    async def ping(self) -> None:
        await self._run(lambda: self._connect().execute("SELECT count(*) FROM kv WHERE 0").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, shut)
        finally:
            self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

