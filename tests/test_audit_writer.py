from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from sidecar.audit import AuditUnavailable, AuditWriter, verify_files
from sidecar.audit.record import ZERO_HASH

SECRETS = {"k1": b"1" * 32}


class Fsync:
    """Injected fsync: counts calls, can block on a threading.Event or fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.dir_calls = 0
        self.delay = delay
        self.block = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.fail: BaseException | None = None

    def __call__(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dir_calls += 1
            os.fsync(fd)
            return
        self.calls += 1
        self.entered.set()
        if self.block:
            assert self.release.wait(10), "test never released fsync"
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail is not None:
            raise self.fail
        os.fsync(fd)
        self.returned.set()


def lines(path: Path) -> list[dict]:
    """Parsed records, skipping torn fragments."""
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            pass
    return out


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def make(path: Path, **kw: object) -> AuditWriter:
    w = AuditWriter(path, kw.pop("secrets", SECRETS), kw.pop("key_id", "k1"), **kw)  # type: ignore[arg-type]
    await w.start()
    return w


async def test_start_creates_private_file_and_syncs_directory(tmp_path: Path) -> None:
    fs = Fsync()
    path = tmp_path / "a" / "b" / "audit.jsonl"
    w = await make(path, fsync=fs)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fs.dir_calls == 1 and w.healthy and w.last == (0, ZERO_HASH)
    await w.close()
    assert not w.healthy


async def test_chain_continues_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    for i in range(3):
        await w.append({"kind": "read", "correlation_id": f"c{i}"})
    await w.close()                                   # + checkpoint record, seq 4
    tip = lines(path)[-1]
    assert tip["kind"] == "checkpoint" and tip["checkpoint_seq"] == 3

    w = await make(path)
    assert w.last == (tip["seq"], tip["hash"])
    rec = await w.append({"kind": "outcome", "outcome": "committed"})
    assert rec["seq"] == 5 and rec["prev"] == tip["hash"]
    await w.close()
    assert [r["seq"] for r in lines(path)] == [1, 2, 3, 4, 5, 6]
    assert verify_files([str(path)], SECRETS).code == 0


async def test_restart_finds_own_chain_among_others(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for chain in ("a", "b", "a", "b"):
        w = await make(path, chain=chain)
        await w.append({"kind": "read"})
        await w.close()
    recs = lines(path)
    assert [(r["chain"], r["seq"]) for r in recs] == [
        ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 3), ("b", 4)]
    assert verify_files([str(path)], SECRETS).code == 0


async def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    fs = Fsync(delay=0.005)
    path = tmp_path / "audit.jsonl"
    w = await make(path, fsync=fs)
    recs = await asyncio.gather(*(
        w.append({"kind": "intent", "correlation_id": f"c{i}"}) for i in range(200)))
    assert sorted(r["seq"] for r in recs) == list(range(1, 201))
    assert fs.calls <= 10, f"{fs.calls} fsyncs for 200 records: no group commit"
    await w.close()
    assert [r["seq"] for r in lines(path)] == list(range(1, 202))   # file order = chain order
    assert verify_files([str(path)], SECRETS).code == 0


async def test_batches_form_while_fsync_in_flight(tmp_path: Path) -> None:
    fs = Fsync()
    w = await make(tmp_path / "audit.jsonl", fsync=fs)
    fs.block = True
    first = asyncio.create_task(w.append({"kind": "intent"}))
    await wait_for(fs.entered.is_set)
    rest = [asyncio.create_task(w.append({"kind": "intent"})) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert fs.calls == 1 and not first.done() and not any(t.done() for t in rest)
    fs.release.set()
    await asyncio.gather(first, *rest)
    assert fs.calls == 2                     # the 50 waiting records went in one batch
    await w.close()


async def test_durable_append_waits_for_fsync(tmp_path: Path) -> None:
    fs = Fsync()
    w = await make(tmp_path / "audit.jsonl", fsync=fs)
    fs.block = True
    task = asyncio.create_task(w.append({"kind": "intent"}))
    await wait_for(fs.entered.is_set)
    for _ in range(20):                      # the loop keeps running; the append does not finish
        await asyncio.sleep(0.002)
    assert not task.done() and not fs.returned.is_set()
    fs.release.set()
    rec = await asyncio.wait_for(task, 5)
    assert fs.returned.is_set() and rec["seq"] == 1
    await w.close()


async def test_non_durable_append_returns_before_fsync(tmp_path: Path) -> None:
    fs = Fsync()
    w = await make(tmp_path / "audit.jsonl", fsync=fs)
    fs.block = True
    rec = await asyncio.wait_for(w.append({"kind": "read"}, durable=False), 1)
    assert rec["seq"] == 1 and not fs.returned.is_set()
    await wait_for(fs.entered.is_set)
    assert not fs.returned.is_set()
    fs.release.set()
    await w.close()
    assert fs.returned.is_set()


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "I/O error"), RuntimeError("boom")])
async def test_fsync_failure_is_sticky(tmp_path: Path, exc: BaseException,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fs = Fsync()
    w = await make(tmp_path / "audit.jsonl", fsync=fs)
    await w.append({"kind": "intent"})
    fs.fail = exc
    batch = await asyncio.gather(*(w.append({"kind": "intent", "user": f"secret-user-{i}"})
                                   for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, AuditUnavailable) for r in batch)
    assert not w.healthy
    fs.fail = None                           # even if the disk "recovers"...
    for durable in (True, False):
        with pytest.raises(AuditUnavailable):
            await w.append({"kind": "read"}, durable=durable)
    assert not w.healthy
    assert "secret-user" not in caplog.text
    await w.close()                          # releases the file, does not raise


async def test_torn_tail_is_acknowledged_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    for _ in range(3):
        await w.append({"kind": "intent"})
    await w.close()
    torn = b'{"v":1,"chain":"main","seq":5,"ts":"2024-'
    with open(path, "ab") as f:
        f.write(torn)
    assert verify_files([str(path)], SECRETS).code == 2

    w = await make(path)
    await w.close()
    raw = path.read_bytes()
    assert torn + b"\n" in raw
    admin = lines(path)[-2]
    assert admin["kind"] == "admin" and admin["reasons"] == ["torn-tail"]
    assert admin["torn_sha256"] == hashlib.sha256(torn).hexdigest() and admin["seq"] == 5
    result = verify_files([str(path)], SECRETS)
    assert result.code == 0, result.message


@pytest.mark.parametrize("layout", ["only-torn", "full-record-no-newline"])
async def test_torn_tail_variants(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "audit.jsonl"
    if layout == "only-torn":
        path.write_bytes(b'{"v":1,"ch')
        expected_seq = 1
    else:
        w = await make(path)
        await w.append({"kind": "intent"})
        await w.close()
        data = path.read_bytes()
        path.write_bytes(data[:-1])          # the checkpoint lost only its newline
        expected_seq = 2                     # so it was never written: seq 2 is reused
    w = await make(path)
    assert w.last[0] == expected_seq
    await w.close()
    assert verify_files([str(path)], SECRETS).code == 0


@pytest.mark.parametrize("damage", ["hmac", "unknown-key", "unparseable"])
async def test_restart_refuses_to_fork_a_damaged_chain(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append({"kind": "intent", "method": "PUT"})
    await w.close()
    data = path.read_bytes()
    if damage == "hmac":
        data = data.replace(b'"checkpoint_seq":1', b'"checkpoint_seq":2')
    elif damage == "unknown-key":
        w = await make(path, secrets={"k1": SECRETS["k1"], "k9": b"9" * 32}, key_id="k9")
        await w.close()
        data = path.read_bytes()
    else:
        data += b"garbage\n"
    path.write_bytes(data)
    w = AuditWriter(path, SECRETS, "k1")
    with pytest.raises(AuditUnavailable, match="refusing"):
        await w.start()
    assert not w.healthy


async def test_second_writer_on_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    with pytest.raises(AuditUnavailable, match="locked"):
        await make(path)
    await w.close()


async def test_periodic_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    shipped: list[dict] = []
    w = await make(path, checkpoint_every=10, on_checkpoint=shipped.append)
    for i in range(25):
        await w.append({"kind": "read"}, durable=i % 2 == 0)
    await w.close()
    cps = [r for r in lines(path) if r["kind"] == "checkpoint"]
    assert [c["checkpoint_seq"] for c in cps] == [10, 21, 27]
    assert shipped == cps
    cp_file = tmp_path / "checkpoints.jsonl"
    cp_file.write_text("".join(json.dumps(c) + "\n" for c in shipped))
    assert verify_files([str(path)], SECRETS, str(cp_file)).code == 0


async def test_bad_fields_do_not_consume_a_seq(tmp_path: Path) -> None:
    w = await make(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError):
        await w.append({"kind": "intent", "body": "free text"})
    with pytest.raises(ValueError):
        await w.append({"kind": "intent", "seq": 99})
    assert (await w.append({"kind": "intent"}))["seq"] == 1
    await w.close()


async def test_append_outside_lifetime_is_unavailable(tmp_path: Path) -> None:
    w = AuditWriter(tmp_path / "audit.jsonl", SECRETS, "k1")
    assert not w.healthy
    with pytest.raises(AuditUnavailable):
        await w.append({"kind": "read"})
    await w.start()
    await w.close()
    with pytest.raises(AuditUnavailable):
        await w.append({"kind": "read"})


async def test_cancelled_waiter_does_not_break_the_writer(tmp_path: Path) -> None:
    fs = Fsync()
    path = tmp_path / "audit.jsonl"
    w = await make(path, fsync=fs)
    fs.block = True
    task = asyncio.create_task(w.append({"kind": "intent"}))
    await wait_for(fs.entered.is_set)
    task.cancel()
    fs.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await w.append({"kind": "intent"}))["seq"] == 2 and w.healthy
    await w.close()
    assert verify_files([str(path)], SECRETS).code == 0


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AuditWriter(tmp_path / "a", SECRETS, "nope")
    with pytest.raises(ValueError):
        AuditWriter(tmp_path / "a", SECRETS, "k1", chain="bad chain\n")
