"""A real ENOSPC from a size-capped tmpfs: the sink fails closed and stays failed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from sidecar.audit import AuditUnavailable, AuditWriter, verify_files

SECRETS = {"k1": b"1" * 32}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount ({type(exc).__name__}): needs root and a mount binary")
    if proc.returncode != 0:
        pytest.skip("mounting a 64k tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): "
                    + proc.stderr.decode(errors="replace").strip()[:200])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


async def test_enospc_fails_closed(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    failures: list[int] = []
    w = AuditWriter(path, SECRETS, "k1", on_failure=lambda: failures.append(1))
    await w.start()
    assert w.healthy
    reasons = ["r" * 1000] * 8                       # ~8 KB per record: the disk fills fast
    written = 0
    with pytest.raises(AuditUnavailable):
        for _ in range(100):                         # 64k can never hold 100 of these
            await w.append({"kind": "intent", "correlation_id": "c-enospc", "reasons": reasons})
            written += 1
    assert 0 < written < 100
    assert not w.healthy and failures == [1]
    assert w.stats.failures == 1
    with pytest.raises(AuditUnavailable, match="ENOSPC|restart"):
        await w.append({"kind": "read"})             # sticky, durable or not
    with pytest.raises(AuditUnavailable):
        await w.append({"kind": "read"}, durable=False)
    await w.close()                                  # does not raise
    # what reached the disk is a clean prefix of the chain (possibly with a torn tail)
    assert verify_files([str(path)], SECRETS).code in (0, 2)
