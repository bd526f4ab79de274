"""The processes a bench script starts, each stopped by its own PID (SIGTERM, then SIGKILL).

Standard library only; bench/run.py, bench/soak.py and bench/workers.py use it (their directory
is on sys.path when run as scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    logfile: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Processes:
    """Every process a script starts, in order; each keeps its output in `<logdir>/<name>.log`."""

    def __init__(self, log: Callable[[str], None] = _stderr) -> None:
        self.procs: list[Proc] = []
        self.log = log

    def start(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        logfile = logdir / f"{name}.log"
        with open(logfile, "wb") as out:
            # own session: a Ctrl-C on the terminal reaches only the script, which stops them in order
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True)
        proc = Proc(name, p, logfile)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 30.0) -> int | None:
        """SIGTERM, up to `timeout` s to exit, then SIGKILL; the exit status."""
        if proc.popen.poll() is None:
            _signal(proc, signal.SIGTERM)
        self._reap(proc, time.monotonic() + timeout)
        return proc.popen.returncode

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM to every live one (newest first) at once, then the same deadline for all."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):
            self._reap(p, deadline)

    def _reap(self, proc: Proc, deadline: float) -> None:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.log(f"{proc.name} (pid {proc.pid}) did not stop on SIGTERM; killing it")
            _signal(proc, signal.SIGKILL)
            proc.popen.wait(timeout=10)


def _signal(proc: Proc, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
