"""Tamper-evident, group-committed audit writer (JSON Lines, HMAC chain).

One asyncio task owns the file. `append` seals a record synchronously (so the
order of calls is the chain order) and buffers its line; the task writes
everything buffered with one write and one fsync in a worker thread, then wakes
every waiter of that batch. No timers: latency is one fsync, and throughput
grows with concurrency because a batch collects while the previous fsync runs.

Failure is sticky: after a failed write or fsync the page cache can no longer
be trusted, so every later append raises AuditUnavailable until restart.

Rotation (`max_bytes`, `max_age_s`) happens in the writer task between two
batches: the old file gets a closing checkpoint, is fsync'd and renamed to
`<path>.<UTC stamp>.<n>` (see files.py), a new file is created at `<path>` and
the directory fsync'd. The chain simply continues: the new file's first record
has the next seq and the old file's last hash as `prev`.

Start-up: the chain's tip is found (strictly, across rotated files if the
active one has none of it), a torn tail is acknowledged, a key change is noted,
and every intent of the last `unknown_scan_records` records that has no
outcome gets an `outcome: unknown` record so an auditor sees the crash.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .files import (
    create_locked, describe_error as _describe, first_record_time, fsync_dir, lock, rotated_files,
    rotated_name,
)
from .record import (
    HMAC_PURPOSE, ZERO_HASH, AuditUnavailable, build_record, check_name, derive_key, dumps_line,
    utc_timestamp, validate_fields,
)
from .scan import ScanResult, scan, unknown_outcome_fields

__all__ = ["AuditStats", "AuditUnavailable", "AuditWriter"]

log = logging.getLogger(__name__)

OnCommit = Callable[[Mapping[str, int], int, float], None]   # (records by kind, bytes, seconds)


@dataclass
class AuditStats:
    """Running totals since start (for metrics that poll instead of hooking)."""
    records: Counter[str] = field(default_factory=Counter)   # durable records by kind
    bytes: int = 0
    commits: int = 0             # write+fsync batches
    failures: int = 0            # 0 or 1: failure is sticky
    rotations: int = 0
    unknown_outcomes: int = 0    # written at start-up for intents without an outcome


LAZY_SYNC_S = 0.2  # records nobody waits for are fsync'd at most this late


class AuditWriter:
    def __init__(self, path: str | os.PathLike[str], secrets: dict[str, bytes],
                 active_key_id: str, chain: str = "main", *,
                 fsync: Callable[[int], None] = os.fsync, checkpoint_every: int = 1000,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 max_pending: int = 100_000, max_bytes: int | None = None,
                 max_age_s: float | None = None, clock: Callable[[], float] = time.time,
                 unknown_scan_records: int = 10_000, on_commit: OnCommit | None = None,
                 on_failure: Callable[[], None] | None = None,
                 idle_poll_s: float = 1.0) -> None:
        if not secrets or active_key_id not in secrets:
            raise ValueError("active_key_id must name one of the secrets")
        if checkpoint_every < 0 or max_pending < 1:
            raise ValueError("checkpoint_every must be >= 0 and max_pending >= 1")
        if (max_bytes is not None and max_bytes < 1) or (max_age_s is not None and max_age_s <= 0):
            raise ValueError("max_bytes must be >= 1 and max_age_s > 0 when set")
        if unknown_scan_records < 0 or idle_poll_s <= 0:
            raise ValueError("unknown_scan_records must be >= 0 and idle_poll_s > 0")
        self._keys = {check_name("key_id", kid): derive_key(s, HMAC_PURPOSE)
                      for kid, s in secrets.items()}
        # keyed once: each record's HMAC starts from a copy (the key schedule is not redone per record)
        self._macs = {kid: hmac.new(k, digestmod=hashlib.sha256) for kid, k in self._keys.items()}
        self._key_id = active_key_id
        self._chain = check_name("chain", chain)
        self._path = os.fspath(path)
        self._fsync = fsync
        self._checkpoint_every = checkpoint_every  # 0 disables periodic checkpoints
        self._on_checkpoint = on_checkpoint
        self._max_pending = max_pending
        self._max_bytes, self._max_age_s = max_bytes, max_age_s
        self._clock = clock            # wall clock for time rotation (injectable for tests)
        self._unknown_scan = unknown_scan_records
        self._on_commit, self._on_failure = on_commit, on_failure
        self._idle_poll_s = idle_poll_s
        self.stats = AuditStats()

        self._state = "new"          # new -> open -> closing -> closed
        self._failed: str | None = None
        self._fd: int | None = None
        self._seq, self._prev = 0, ZERO_HASH
        self._since_checkpoint = 0
        self._last_kind: str | None = None
        self._size = 0                 # bytes in the active file
        self._opened_at = 0.0          # clock() when the active file was started
        self._next_rotation = 1        # n of the next rotated file name
        self._buf: list[bytes] = []
        self._last_sync = float('-inf')   # perf_counter of the last fsync
        self._dirty = False               # bytes written since the last fsync
        self._buf_kinds: Counter[str] = Counter()
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
            fd, found = await asyncio.to_thread(self._open_and_scan)
        except AuditUnavailable:
            self._state = "closed"
            raise
        except Exception as exc:
            self._state = "closed"
            raise AuditUnavailable(f"cannot open audit file: {_describe(exc)}") from exc
        self._fd = fd
        self._seq, self._prev = found.seq, found.prev
        self._state = "open"
        self._task = asyncio.create_task(self._run(), name=f"audit-writer:{self._chain}")
        try:
            await self._startup_records(found)
        except BaseException:
            await self.close()    # releases the fd and lock; the failure is sticky anyway
            raise

    async def _startup_records(self, found: ScanResult) -> None:
        pending: list[Mapping[str, Any]] = []
        if found.torn is not None:
            # Leave the torn bytes as evidence, terminate them, and acknowledge
            # them in-chain so verify can tell a crash from tampering.
            self._buf.append(b"\n")
            pending.append({"kind": "admin", "reasons": ["torn-tail"],
                            "torn_sha256": hashlib.sha256(found.torn).hexdigest()})
        if found.key_id is not None and found.key_id != self._key_id:
            pending.append({"kind": "admin", "reasons": ["key-rotation",
                                                         f"previous key_id {found.key_id}"]})
        for intent in found.unanswered:
            try:
                pending.append(validate_fields(unknown_outcome_fields(intent)))
            except ValueError:
                # Only a hand-edited file gets here; verify reports it, we carry on.
                log.warning("audit: skipped an unanswered intent with invalid fields (seq %s)",
                            intent.get("seq"))
        self.stats.unknown_outcomes = sum(1 for p in pending if p.get("outcome") == "unknown")
        if self.stats.unknown_outcomes:
            log.warning("audit: %d write(s) had no outcome before restart; recorded as unknown",
                        self.stats.unknown_outcomes)
        for i, fields in enumerate(pending):
            # One fsync for the lot: the last durable append covers the earlier lines.
            await self.append(fields, durable=i == len(pending) - 1)

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
                           key=self._keys[self._key_id], mac=self._macs[self._key_id])
        line = dumps_line(rec)     # serialise before mutating state: no gaps on error
        self._seq, self._prev = seq, rec["hash"]
        self._buf.append(line)
        self._buf_kinds[rec["kind"]] += 1
        self._last_kind = rec["kind"]
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
                    if self._rotation_due():          # time rotation of an idle file
                        if not await self._rotate():
                            return
                        continue
                    timeout = self._idle_timeout()
                    if self._dirty:
                        timeout = LAZY_SYNC_S if timeout is None else min(timeout, LAZY_SYNC_S)
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        if self._dirty and not await self._flush():   # an empty batch: the lazy fsync
                            return
                    self._wake.clear()
                    continue
                if not await self._flush():
                    return
                if self._rotation_due() and not await self._rotate():
                    return
        except BaseException as exc:   # a bug or cancellation must not leave waiters hanging
            self._fail(exc, [])
            raise

    def _idle_timeout(self) -> float | None:
        if self._max_age_s is None:
            return None
        remaining = self._opened_at + self._max_age_s - self._clock()
        return min(self._idle_poll_s, max(remaining, 0.001))

    def _rotation_due(self) -> bool:
        if self._state != "open" or self._failed is not None or self._size == 0:
            return False               # never rotate while closing, nor an empty file
        if self._max_bytes is not None and self._size >= self._max_bytes:
            return True
        return self._max_age_s is not None and self._clock() - self._opened_at >= self._max_age_s

    async def _flush(self) -> bool:
        data = b"".join(self._buf)
        waiters, checkpoints, kinds = self._waiters, self._checkpoints, self._buf_kinds
        self._buf, self._waiters, self._checkpoints, self._buf_kinds = [], [], [], Counter()
        started = time.perf_counter()
        try:
            if not waiters and not checkpoints and started - self._last_sync < LAZY_SYNC_S:
                # nobody waits for these (reads, denials, outcomes): write to the page cache now,
                # fsync with the next durable batch or within LAZY_SYNC_S (no thread hop per read)
                self._write_all(data)
                self._dirty = True
            else:
                await asyncio.to_thread(self._write_and_sync, data)
                self._last_sync, self._dirty = time.perf_counter(), False
        except BaseException as exc:
            self._fail(exc, waiters)
            if not isinstance(exc, Exception):
                raise
            return False
        seconds = time.perf_counter() - started
        self._size += len(data)
        self.stats.records.update(kinds)
        self.stats.bytes += len(data)
        self.stats.commits += 1
        for w in waiters:
            if not w.done():       # a caller may have been cancelled meanwhile
                w.set_result(None)
        for cp in checkpoints:
            self._emit_checkpoint(cp)
        self._hook("on_commit", self._on_commit, dict(kinds), len(data), seconds)
        return True

    async def _rotate(self) -> bool:
        """Seal the active file with a checkpoint, rename it, start a new one."""
        if self._seq > 0 and self._last_kind != "checkpoint":
            self._enqueue({"kind": "checkpoint", "checkpoint_seq": self._seq,
                           "checkpoint_hash": self._prev}, durable=False)
            if not await self._flush():     # no await in between: the checkpoint ends the file
                return False
        try:
            await asyncio.to_thread(self._rotate_files)
        except BaseException as exc:
            self._fail(exc, [])
            if not isinstance(exc, Exception):
                raise
            return False
        self.stats.rotations += 1
        return True

    def _rotate_files(self) -> None:
        """Worker thread. The old fd stays locked until the new file is ours."""
        target = rotated_name(self._path, self._next_rotation, self._clock())
        if os.path.lexists(target):     # rename would silently replace history
            raise FileExistsError(errno.EEXIST, "rotated audit file name taken")
        os.rename(self._path, target)
        self._next_rotation += 1
        new_fd = create_locked(self._path)
        old_fd, self._fd = self._fd, new_fd
        if old_fd is not None:
            os.close(old_fd)
        self._size, self._opened_at = 0, self._clock()
        fsync_dir(self._path, self._fsync)   # the rename and the create, durably
        log.info("audit file rotated (rotation %d)", self._next_rotation - 1)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "short write to audit file")
            view = view[n:]

    def _write_and_sync(self, data: bytes) -> None:
        """Worker thread: one write (looped only on a short write), one fsync."""
        assert self._fd is not None
        if data:
            self._write_all(data)
        self._fsync(self._fd)

    def _fail(self, exc: BaseException, waiters: list[asyncio.Future[None]]) -> None:
        if self._failed is None:
            self._failed = _describe(exc)
            self.stats.failures += 1
            # Only the error class/errno: never record contents.
            log.error("audit sink failed (%s); refusing all records until restart", self._failed)
            self._hook("on_failure", self._on_failure)
        err = AuditUnavailable(f"audit sink failed ({self._failed}); restart required")
        for w in waiters + self._waiters:
            if not w.done():
                w.set_exception(err)
        self._buf, self._waiters, self._checkpoints, self._buf_kinds = [], [], [], Counter()

    def _emit_checkpoint(self, rec: dict[str, Any]) -> None:
        if self._on_checkpoint is not None:
            self._hook("on_checkpoint", self._on_checkpoint, dict(rec))

    @staticmethod
    def _hook(name: str, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:   # observers are best effort; the chain is intact
            log.warning("audit %s callback failed (%s)", name, type(exc).__name__)

    # ------------------------------------------------------- open and resume

    def _open_and_scan(self) -> tuple[int, ScanResult]:
        """Worker thread: open/lock/create the file and find this chain's tip."""
        parent = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        rotated = rotated_files(self._path)
        self._next_rotation = (rotated[-1][0] + 1) if rotated else 1
        try:
            fd = create_locked(self._path)
            created = True
        except FileExistsError:
            fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            created = False
        try:
            if created:
                fsync_dir(self._path, self._fsync)   # make the new directory entry durable
            else:
                lock(fd)
            found = scan(fd, self._path, self._chain, self._keys,
                         rotated=[p for _, p in rotated], limit=self._unknown_scan)
            self._size = os.fstat(fd).st_size
            self._opened_at = first_record_time(fd) or self._clock()
            return fd, found
        except BaseException:
            os.close(fd)
            raise

