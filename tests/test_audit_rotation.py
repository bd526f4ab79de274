"""Audit file rotation (size and time), the rotated set, and verify across files."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from sidecar.audit import AuditUnavailable, AuditWriter, chain_files, verify_files
from sidecar.audit.files import rotated_files

SECRETS = {"k1": b"1" * 32}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DirFsync:
    """Counts directory fsyncs; can fail them."""

    def __init__(self) -> None:
        self.dir_calls = 0
        self.fail_dir = False

    def __call__(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dir_calls += 1
            if self.fail_dir:
                raise OSError(errno.EIO, "I/O error")
        os.fsync(fd)


def records(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_bytes().splitlines()]


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def make(path: Path, **kw: Any) -> AuditWriter:
    w = AuditWriter(path, SECRETS, "k1", **kw)
    await w.start()
    return w


def assert_linked(files: list[str]) -> None:
    """seq continues across files; each file's first prev = previous file's last hash;
    every rotated file ends with a checkpoint covering its last caller record."""
    prev_last: dict[str, Any] | None = None
    for f in files:
        recs = records(f)
        assert recs, f"{f} is empty"
        if prev_last is not None:
            assert recs[0]["seq"] == prev_last["seq"] + 1
            assert recs[0]["prev"] == prev_last["hash"]
        prev_last = recs[-1]
    for f in files[:-1]:
        last = records(f)[-1]
        assert last["kind"] == "checkpoint" and last["checkpoint_seq"] == last["seq"] - 1


async def test_size_rotation_chains_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fs = DirFsync()
    w = await make(path, max_bytes=1500, fsync=fs)
    for i in range(30):
        await w.append({"kind": "read", "correlation_id": f"corr-{i:04d}", "method": "GET"})
    assert w.stats.rotations >= 3
    await w.close()
    files = chain_files(path)
    assert files[-1] == str(path) and len(files) == w.stats.rotations + 1
    for f in files[:-1]:
        assert re.fullmatch(r".*/audit\.jsonl\.\d{8}T\d{6}Z\.\d{6}", f)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        # a file is rotated at the first batch boundary after it reaches max_bytes
        assert os.path.getsize(f) < 1500 + 600
    assert fs.dir_calls == 1 + w.stats.rotations           # create + every rotation
    assert_linked(files)
    seqs = [r["seq"] for f in files for r in records(f)]
    assert seqs == list(range(1, len(seqs) + 1))
    result = verify_files(files, SECRETS)
    assert result.code == 0, result.message


async def test_verify_detects_a_missing_or_reordered_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path, max_bytes=800)
    for i in range(12):
        await w.append({"kind": "read"})
    await w.close()
    files = chain_files(path)
    assert len(files) >= 3
    assert verify_files(files[:1] + files[2:], SECRETS).code == 1
    assert verify_files([files[1], files[0], *files[2:]], SECRETS).code == 1


async def test_time_rotation_with_injected_clock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    w = await make(path, max_age_s=60, clock=clock)
    for _ in range(3):
        await w.append({"kind": "read"})
    assert w.stats.rotations == 0
    clock.now += 61
    await w.append({"kind": "read"})        # lands in the old file, which then rotates
    await wait_for(lambda: w.stats.rotations == 1)
    rotated = rotated_files(path)
    assert [n for n, _ in rotated] == [1]
    assert rotated[0][1].endswith(".20231114T221421Z.000001")     # stamp from the injected clock
    await w.append({"kind": "read"})
    await w.close()
    assert [r["kind"] for r in records(rotated[0][1])] == ["read"] * 4 + ["checkpoint"]
    assert [r["seq"] for r in records(path)] == [6, 7]
    assert_linked(chain_files(path))
    assert verify_files(chain_files(path), SECRETS).code == 0


async def test_idle_file_rotates_on_time_without_writes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    w = await make(path, max_age_s=10, clock=clock, idle_poll_s=0.01)
    await w.append({"kind": "read"})
    clock.now += 11
    await wait_for(lambda: w.stats.rotations == 1)
    await asyncio.sleep(0.05)
    assert w.stats.rotations == 1           # the new, empty file is not rotated again
    clock.now += 100
    await asyncio.sleep(0.05)
    assert w.stats.rotations == 1
    await w.close()
    assert verify_files(chain_files(path), SECRETS).code == 0


async def test_time_rotation_age_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path, max_age_s=3600)
    await w.append({"kind": "read"})
    await w.close()
    # restart two hours later: the file's age comes from its first record, not the restart
    clock = Clock(time.time() + 7200)
    w = await make(path, max_age_s=3600, clock=clock, idle_poll_s=0.01)
    await wait_for(lambda: w.stats.rotations == 1)
    await w.close()


async def test_restart_continues_rotation_numbers_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for _ in range(3):
        w = await make(path, max_bytes=600)
        for _ in range(4):
            await w.append({"kind": "read"})
        await w.close()
    ns = [n for n, _ in rotated_files(path)]
    assert ns == list(range(1, len(ns) + 1)) and len(ns) >= 3
    assert_linked(chain_files(path))
    assert verify_files(chain_files(path), SECRETS).code == 0


async def test_crash_between_rename_and_create_continues_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    for _ in range(3):
        await w.append({"kind": "read"})
    await w.close()
    tip = records(path)[-1]
    os.rename(path, f"{path}.20240101T000000Z.000001")    # renamed, new file never created
    w = await make(path)
    assert w.last == (tip["seq"], tip["hash"])
    rec = await w.append({"kind": "read"})
    assert rec["prev"] == tip["hash"]
    await w.close()
    assert verify_files(chain_files(path), SECRETS).code == 0


async def test_torn_rotated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append({"kind": "read"})
    await w.close()
    old = f"{path}.20240101T000000Z.000001"
    os.rename(path, old)
    with open(old, "ab") as f:
        f.write(b'{"v":1,')
    w = AuditWriter(path, SECRETS, "k1")
    with pytest.raises(AuditUnavailable, match="torn"):
        await w.start()


def test_chain_files_orders_by_rotation_number(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # the clock stepped back between rotations 1 and 2: order is still by n
    names = ["audit.jsonl.20250101T000000Z.000001", "audit.jsonl.20240101T000000Z.000002",
             "audit.jsonl.20260101T000000Z.000010"]
    for name in names + ["audit.jsonl.bak", "audit.jsonl.20240101T000000Z.x",
                         "other.jsonl.20240101T000000Z.000003", "audit.jsonl"]:
        (tmp_path / name).write_text("")
    assert chain_files(path) == [str(tmp_path / n) for n in names] + [str(path)]
    (tmp_path / "audit.jsonl").unlink()
    assert chain_files(path) == [str(tmp_path / n) for n in names]
    assert chain_files(tmp_path / "nowhere" / "audit.jsonl") == []


async def test_failed_rotation_is_sticky(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fs = DirFsync()
    failures: list[int] = []
    w = await make(path, max_bytes=300, fsync=fs, on_failure=lambda: failures.append(1))
    fs.fail_dir = True
    await w.append({"kind": "read"})
    await w.append({"kind": "read"})        # crosses max_bytes: rotation's directory fsync fails
    await wait_for(lambda: not w.healthy)
    with pytest.raises(AuditUnavailable):
        await w.append({"kind": "read"})
    assert failures == [1] and w.stats.failures == 1
    await w.close()


def test_rotation_parameters_are_validated(tmp_path: Path) -> None:
    for kw in ({"max_bytes": 0}, {"max_age_s": 0}, {"unknown_scan_records": -1}):
        with pytest.raises(ValueError):
            AuditWriter(tmp_path / "a", SECRETS, "k1", **kw)  # type: ignore[arg-type]
