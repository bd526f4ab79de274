#!/usr/bin/env python3
"""fsync micro-benchmark: what one durable audit append costs on a filesystem.

    python3 bench/fsync_bench.py DIR [DIR ...] [--iterations 2000] [--bytes 200]

In each DIR: a new file opened the way the audit writer opens its file (O_RDWR|O_APPEND|O_CREAT),
then N times: write BYTES bytes (one audit line's worth) with os.write, os.fsync; both timed
together with time.perf_counter_ns. Reports p50/p90/p99/max in ms, the process CPU time per
write+fsync (time.process_time_ns over the loop: on this VM an ext4 fsync is about half CPU, kernel
time in the calling thread; journal threads are not counted), and the filesystem type as
`stat -f -c %T` (which says ext2/ext3 for ext4: it reports the superblock magic, shared by all
three) and `findmnt -no FSTYPE -T DIR` (or `df -T` without findmnt). The file is removed.
Standard library only (bench/run.py imports it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def fs_type(directory: Path) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    info = {"stat_f": out(["stat", "-f", "-c", "%T", str(directory)])}
    if shutil.which("findmnt"):
        line = out(["findmnt", "-no", "FSTYPE,SOURCE,TARGET", "-T", str(directory)]).split()
        info.update(fstype=line[0] if line else "", source=line[1] if len(line) > 1 else "",
                    mountpoint=line[2] if len(line) > 2 else "", how="findmnt")
    else:
        rows = out(["df", "-T", str(directory)]).splitlines()
        cols = rows[-1].split() if len(rows) > 1 else []
        info.update(fstype=cols[1] if len(cols) > 1 else "", source=cols[0] if cols else "",
                    mountpoint=cols[-1] if cols else "", how="df -T")
    return info


def describe(fs: dict[str, str]) -> str:
    """e.g. 'ext4 (/dev/vda on /; stat -f: ext2/ext3)'."""
    return f"{fs.get('fstype') or '?'} ({fs.get('source', '?')} on {fs.get('mountpoint', '?')}; stat -f: {fs['stat_f']})"


def _pct(sorted_ns: list[int], p: float) -> float:
    k = max(0, min(len(sorted_ns) - 1, math.ceil(p / 100 * len(sorted_ns)) - 1))  # nearest rank
    return sorted_ns[k] / 1e6


def summarize(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {"n": len(s), "p50_ms": _pct(s, 50), "p90_ms": _pct(s, 90), "p99_ms": _pct(s, 99),
            "max_ms": s[-1] / 1e6, "mean_ms": sum(s) / len(s) / 1e6}


def fsync_bench(directory: Path, iterations: int = 2000, nbytes: int = 200) -> dict:
    """write(nbytes) + fsync, `iterations` times, in a new file in `directory`."""
    path = directory / f".fsync-bench-{os.getpid()}-{time.monotonic_ns()}"
    line = (b"x" * (nbytes - 1)) + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    samples: list[int] = []
    try:
        for _ in range(5):  # the first fsyncs also commit the file's creation
            os.write(fd, line)
            os.fsync(fd)
        pc = time.perf_counter_ns
        cpu0 = time.process_time_ns()
        for _ in range(iterations):
            t0 = pc()
            os.write(fd, line)
            os.fsync(fd)
            samples.append(pc() - t0)
        cpu_ns = time.process_time_ns() - cpu0
    finally:
        os.close(fd)
        os.unlink(path)
    return dict(summarize(samples), cpu_us_per_fsync=cpu_ns / iterations / 1e3, dir=str(directory),
                fs=fs_type(directory), iterations=iterations, bytes=nbytes, samples_ns=samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--bytes", type=int, default=200)
    a = ap.parse_args(argv)
    for d in a.dirs:
        r = fsync_bench(d, a.iterations, a.bytes)
        print(f"{d}: {describe(r['fs'])}: write {a.bytes} B + fsync x{a.iterations}: p50 {r['p50_ms']:.3f} ms, "
              f"p90 {r['p90_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, max {r['max_ms']:.2f} ms; "
              f"this process's CPU {r['cpu_us_per_fsync']:.0f} µs per write+fsync")
        r.pop("samples_ns")
        print("FSYNC_JSON " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
