"""Tamper-evident, group-committed audit writer (JSON Lines, HMAC chain).

One asyncio task owns the file. `append` seals a record synchronously (so the
order of calls is the chain order) and buffers its line; the task writes
everything buffered with one write and one fsync in a worker thread, then wakes
every waiter of that batch. No timers: latency is one fsync, and throughput
grows with concurrency because a batch collects while the previous fsync runs.

Failure is sticky: after a failed write or fsync the page cache can no longer
be trusted, so every later append raises AuditUnavailable until restart.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
from typing import Any, Callable, Iterator, Mapping

from .record import (
    HMAC_PURPOSE, ZERO_HASH, build_record, check_name, check_record, derive_key, dumps_line,
    hash_ok, loads_line, utc_timestamp, validate_fields,
)

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class AuditUnavailable(Exception):
    """The sink cannot record: callers answer 503 and forward nothing."""


def _reverse_lines(fd: int, size: int) -> Iterator[bytes]:
    """Yield the bytes after the last newline (possibly b""), then every
    complete line from the end backwards, without newlines."""
    pos, buf = size, b""
    while pos > 0:
        n = min(_CHUNK, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf
        parts = buf.split(b"\n")
        buf = parts[0]
        yield from reversed(parts[1:])
    yield buf


def _acknowledges(later: Mapping[str, Any] | None, raw: bytes) -> bool:
    """Is `later` the admin record the writer wrote right after torn bytes `raw`?"""
    return (later is not None and later.get("kind") == "admin"
            and isinstance(later.get("reasons"), list) and "torn-tail" in later["reasons"]
            and later.get("torn_sha256") == hashlib.sha256(raw).hexdigest())


class AuditWriter:
    def __init__(self, path: str | os.PathLike[str], secrets: dict[str, bytes],
                 active_key_id: str, chain: str = "main", *,
                 fsync: Callable[[int], None] = os.fsync, checkpoint_every: int = 1000,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 max_pending: int = 100_000) -> None:
        if not secrets or active_key_id not in secrets:
            raise ValueError("active_key_id must name one of the secrets")
        if checkpoint_every < 0 or max_pending < 1:
            raise ValueError("checkpoint_every must be >= 0 and max_pending >= 1")
        self._keys = {check_name("key_id", kid): derive_key(s, HMAC_PURPOSE)
                      for kid, s in secrets.items()}
        self._key_id = active_key_id
        self._chain = check_name("chain", chain)
        self._path = os.fspath(path)
        self._fsync = fsync
        self._checkpoint_every = checkpoint_every  # 0 disables periodic checkpoints
        self._on_checkpoint = on_checkpoint
        self._max_pending = max_pending

        self._state = "new"          # new -> open -> closing -> closed
        self._failed: str | None = None
        self._fd: int | None = None
        self._seq, self._prev = 0, ZERO_HASH
        self._since_checkpoint = 0
        self._buf: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._checkpoints: list[dict[str, Any]] = []   # emitted once durable
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ properties

    @property
    def healthy(self) -> bool:
        return self._state == "open" and self._failed is None

    @property
    def last(self) -> tuple[int, str]:
        """(seq, hash) of the last record sealed (not necessarily durable yet)."""
        return self._seq, self._prev

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("AuditWriter.start() called twice")
        try:
            fd, torn = await asyncio.to_thread(self._open_and_scan)
        except AuditUnavailable:
            self._state = "closed"
            raise
        except Exception as exc:
            self._state = "closed"
            raise AuditUnavailable(f"cannot open audit file: {_describe(exc)}") from exc
        self._fd = fd
        self._state = "open"
        self._task = asyncio.create_task(self._run(), name=f"audit-writer:{self._chain}")
        if torn is not None:
            # Leave the torn bytes as evidence, terminate them, and acknowledge
            # them in-chain so verify can tell a crash from tampering.
            self._buf.append(b"\n")
            try:
                await self.append({"kind": "admin", "reasons": ["torn-tail"],
                                   "torn_sha256": hashlib.sha256(torn).hexdigest()})
            except BaseException:
                await self.close()    # releases the fd and lock; the failure is sticky anyway
                raise

    async def close(self) -> None:
        """Flush, seal with a checkpoint record, fsync, close. Raises
        AuditUnavailable if that final flush fails."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            raise RuntimeError("AuditWriter.close() already in progress")
        fut: asyncio.Future[None] | None = None
        if self._failed is None and self._seq > 0:
            _, fut = self._enqueue({"kind": "checkpoint", "checkpoint_seq": self._seq,
                                    "checkpoint_hash": self._prev}, durable=True)
        self._state = "closing"
        try:
            if fut is not None:
                await fut
        finally:
            self._stopping = True
            self._wake.set()
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
            if self._fd is not None:
                os.close(self._fd)   # also drops the flock
                self._fd = None
            self._state = "closed"

    # ---------------------------------------------------------------- append

    async def append(self, fields: Mapping[str, Any], *, durable: bool = True) -> dict[str, Any]:
        """Seal and enqueue one record; with durable=True return only once it
        is written and fsync'd. Raises AuditUnavailable if the sink has failed,
        ValueError for bad fields."""
        clean = validate_fields(fields)
        self._check_usable()
        if len(self._buf) >= self._max_pending:
            # Backpressure rather than unbounded memory; nothing was sealed.
            raise AuditUnavailable("audit sink overloaded")
        rec, fut = self._enqueue(clean, durable=durable)
        if clean["kind"] != "checkpoint":
            self._since_checkpoint += 1
            if self._checkpoint_every and self._since_checkpoint >= self._checkpoint_every:
                self._enqueue({"kind": "checkpoint", "checkpoint_seq": rec["seq"],
                               "checkpoint_hash": rec["hash"]}, durable=False)
        if fut is not None:
            await fut
        return rec

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditUnavailable(f"audit sink failed earlier ({self._failed}); restart required")
        if self._state != "open":
            raise AuditUnavailable(f"audit writer is {self._state}")

    def _enqueue(self, clean: dict[str, Any], *,
                 durable: bool) -> tuple[dict[str, Any], asyncio.Future[None] | None]:
        """Seal the next record and buffer its line. Synchronous: between two
        awaits nobody else can take a seq, so call order is chain order."""
        seq = self._seq + 1
        rec = build_record(clean, chain=self._chain, seq=seq, ts=utc_timestamp(),
                           prev=self._prev, key_id=self._key_id,
                           key=self._keys[self._key_id])
        line = dumps_line(rec)     # serialise before mutating state: no gaps on error
        self._seq, self._prev = seq, rec["hash"]
        self._buf.append(line)
        if rec["kind"] == "checkpoint":
            self._since_checkpoint = 0
            self._checkpoints.append(rec)
        fut: asyncio.Future[None] | None = None
        if durable:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
        self._wake.set()
        return dict(rec), fut

    # ----------------------------------------------------------- writer task

    async def _run(self) -> None:
        try:
            while True:
                if not self._buf:
                    if self._stopping:
                        return
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                if not await self._flush():
                    return
        except BaseException as exc:   # a bug or cancellation must not leave waiters hanging
            self._fail(exc, [])
            raise

    async def _flush(self) -> bool:
        data = b"".join(self._buf)
        waiters, checkpoints = self._waiters, self._checkpoints
        self._buf, self._waiters, self._checkpoints = [], [], []
        try:
            await asyncio.to_thread(self._write_and_sync, data)
        except BaseException as exc:
            self._fail(exc, waiters)
            if not isinstance(exc, Exception):
                raise
            return False
        for w in waiters:
            if not w.done():       # a caller may have been cancelled meanwhile
                w.set_result(None)
        for cp in checkpoints:
            self._emit_checkpoint(cp)
        return True

    def _write_and_sync(self, data: bytes) -> None:
        """Worker thread: one write (looped only on a short write), one fsync."""
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "short write to audit file")
            view = view[n:]
        self._fsync(self._fd)

    def _fail(self, exc: BaseException, waiters: list[asyncio.Future[None]]) -> None:
        if self._failed is None:
            self._failed = _describe(exc)
            # Only the error class/errno: never record contents.
            log.error("audit sink failed (%s); refusing all records until restart", self._failed)
        err = AuditUnavailable(f"audit sink failed ({self._failed}); restart required")
        for w in waiters + self._waiters:
            if not w.done():
                w.set_exception(err)
        self._buf, self._waiters, self._checkpoints = [], [], []

    def _emit_checkpoint(self, rec: dict[str, Any]) -> None:
        if self._on_checkpoint is None:
            return
        try:
            self._on_checkpoint(dict(rec))
        except Exception as exc:   # shipping the copy is best effort; the chain is intact
            log.warning("audit on_checkpoint callback failed (%s)", type(exc).__name__)

    # ------------------------------------------------------- open and resume

    def _open_and_scan(self) -> tuple[int, bytes | None]:
        """Worker thread: open/lock/create the file and find this chain's tip."""
        parent = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self._path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(self._path, flags)
            created = False
        try:
            try:
                # Two writers on one file would fork the chain: refuse.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise AuditUnavailable(
                    f"audit file is locked by another writer ({_describe(exc)})") from exc
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            if created:
                # Make the new directory entry itself durable.
                dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    self._fsync(dfd)
                finally:
                    os.close(dfd)
                return fd, None
            torn = self._scan_tail(fd)
            return fd, torn
        except BaseException:
            os.close(fd)
            raise

    def _scan_tail(self, fd: int) -> bytes | None:
        """Set seq/prev from the last complete line of this chain; return the
        torn tail bytes, if any. Never guesses: anything odd is an error."""
        lines = _reverse_lines(fd, os.fstat(fd).st_size)
        torn = next(lines) or None
        later: dict[str, Any] | None = None   # the line after `raw` in file order
        for raw in lines:
            if _acknowledges(later, raw):
                later = None                  # an earlier crash, already acknowledged
                continue
            try:
                rec = loads_line(raw)
            except ValueError:
                raise AuditUnavailable(
                    f"{self._path}: unparseable line before the end of chain "
                    f"{self._chain!r}; refusing to continue (run verify and repair)") from None
            if rec.get("chain") != self._chain:
                later = rec
                continue
            try:
                check_record(rec)
            except ValueError as exc:
                raise AuditUnavailable(
                    f"{self._path}: last record of chain {self._chain!r} is malformed "
                    f"({exc}); refusing to fork the chain") from None
            key = self._keys.get(rec["key_id"])
            if key is None:
                raise AuditUnavailable(
                    f"{self._path}: last record of chain {self._chain!r} uses key id "
                    f"{rec['key_id']!r} which is not configured; refusing to fork the chain")
            if not hash_ok(key, rec):
                raise AuditUnavailable(
                    f"{self._path}: last record of chain {self._chain!r} (seq {rec['seq']}) "
                    f"fails its HMAC; refusing to fork the chain")
            self._seq, self._prev = rec["seq"], rec["hash"]
            break
        return torn


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} errno={exc.errno} {errno.errorcode.get(exc.errno, '')}"
    return type(exc).__name__
