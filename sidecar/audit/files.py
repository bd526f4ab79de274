"""Audit file layout: the active file and its rotated predecessors.

Rotation renames the active file `audit.jsonl` to
`audit.jsonl.<UTC YYYYmmddTHHMMSSZ>.<n>` and creates a fresh `audit.jsonl`.
`n` is a rotation number, one more than the highest already present, so the
order of the set is the order of `n` (the timestamp is for humans; a clock
stepping backwards cannot reorder the set). The active path never changes, so
tooling and `audit verify --config` always find the newest records in the same
place, and `chain_files()` lists the whole set oldest first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from datetime import datetime, timezone
from typing import Callable, Iterator

from .record import AuditUnavailable, loads_line

_CHUNK = 64 * 1024
_ROTATED_SUFFIX = re.compile(r"\.(\d{8}T\d{6}Z)\.(\d{1,12})")


def rotated_files(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(n, path) of every rotated file of `path`, ordered by rotation number."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith(base):
            continue
        m = _ROTATED_SUFFIX.fullmatch(name[len(base):])
        if m:
            found.append((int(m.group(2)), os.path.join(os.path.dirname(path), name)))
    found.sort()
    return found


def chain_files(path: str | os.PathLike[str]) -> list[str]:
    """The rotated files of an audit path, oldest first, then the active file
    if it exists: the argument list `verify_files` wants."""
    path = os.fspath(path)
    out = [p for _, p in rotated_files(path)]
    if os.path.exists(path):
        out.append(path)
    return out


def active_path(path: str) -> str:
    """The active file a (possibly rotated) audit file belongs to."""
    m = _ROTATED_SUFFIX.search(path)
    return path[:m.start()] if m and m.end() == len(path) else path


def worker_paths(path: str | os.PathLike[str]) -> list[str]:
    """The active files of `run --workers N` next to `path` (`audit.jsonl` -> `audit.w0.jsonl`,
    `audit.w1.jsonl`, ...; rotated ones included even if the active file is gone), by index."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    stem, suffix = os.path.splitext(os.path.basename(path))
    pat = re.compile(re.escape(stem) + r"\.w(\d{1,3})" + re.escape(suffix))
    found: dict[int, str] = {}
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    for name in names:
        m = pat.match(name)
        if m and (m.end() == len(name) or _ROTATED_SUFFIX.fullmatch(name[m.end():])):
            found[int(m.group(1))] = os.path.join(os.path.dirname(path), name[:m.end()])
    return [found[i] for i in sorted(found)]


def all_chain_files(path: str | os.PathLike[str]) -> list[str]:
    """`chain_files` of the configured path, then of every worker's path: each set oldest first."""
    out = chain_files(path)
    for p in worker_paths(path):
        out.extend(chain_files(p))
    return out


def rotated_name(path: str, n: int, now: float) -> str:
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{path}.{stamp}.{n:06d}"


def fsync_dir(path: str, fsync: Callable[[int], None]) -> None:
    """Make directory entries (create, rename) durable."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(dfd)
    finally:
        os.close(dfd)


def reverse_lines(fd: int, size: int) -> Iterator[bytes]:
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


def first_record_time(fd: int) -> float | None:
    """Epoch seconds of the first record in an open file (its age for time
    rotation after a restart); None if there is no parseable first line."""
    head = os.pread(fd, _CHUNK, 0)
    line, nl, _ = head.partition(b"\n")
    if not nl:
        return None
    try:
        ts = loads_line(line).get("ts")
        return datetime.strptime(str(ts), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def describe_error(exc: BaseException) -> str:
    """Error class and errno only: messages may carry paths or data."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} errno={exc.errno} {errno.errorcode.get(exc.errno, '')}"
    return type(exc).__name__


def lock(fd: int) -> None:
    """Exclusive, non-blocking: two writers on one file would fork the chain."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise AuditUnavailable(
            f"audit file is locked by another writer ({describe_error(exc)})") from exc
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)


def create_locked(path: str) -> int:
    """Create (never reuse) and lock a new active file; FileExistsError if present."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        lock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
